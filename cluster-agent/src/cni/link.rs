//! Interface operations for the CNI plugin, over rtnetlink. A netlink socket
//! belongs to the network namespace it was created in, so the pod's socket
//! is opened on a short-lived thread that has entered the pod namespace
//! (`setns` on the path the runtime hands us); every request on it then acts
//! inside the pod without moving any thread of the plugin itself.

use futures::TryStreamExt;
use ipnet::IpNet;
use nix::sched::CloneFlags;
use rtnetlink::packet_route::AddressFamily;
use rtnetlink::packet_route::address::{AddressAttribute, AddressFlags};
use rtnetlink::packet_route::link::{
    InfoData, InfoKind, InfoVeth, LinkAttribute, LinkFlags, LinkMessage,
};
use rtnetlink::{Handle, LinkMessageBuilder, LinkUnspec, RouteMessageBuilder};
use std::fs::File;
use std::net::IpAddr;
use std::os::fd::AsRawFd;

const ENODEV: i32 = 19;

/// What netlink tells about one interface.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct LinkInfo {
    pub index: u32,
    /// Lower-case `aa:bb:cc:dd:ee:ff`.
    pub mac: String,
    pub mtu: u32,
    pub up: bool,
}

/// Why a connection inside a namespace could not be made.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum NetnsError {
    /// `setns` refused the file: it is not a network namespace.
    #[error("{0}")]
    NotANetns(String),
    #[error("{0}")]
    Netlink(String),
}

/// A netlink connection in one network namespace.
#[derive(Clone, Debug)]
pub struct Netlink {
    handle: Handle,
}

fn nl(what: &str, e: &rtnetlink::Error) -> String {
    match e {
        rtnetlink::Error::NetlinkError(m) => format!("{what}: {}", m.to_io()),
        other => format!("{what}: {other}"),
    }
}

fn is_enodev(e: &rtnetlink::Error) -> bool {
    matches!(e, rtnetlink::Error::NetlinkError(m) if m.raw_code().abs() == ENODEV)
}

/// `aa:bb:cc:dd:ee:ff` → bytes; `None` if malformed.
#[must_use]
pub fn parse_mac(mac: &str) -> Option<[u8; 6]> {
    let mut out = [0u8; 6];
    let mut parts = mac.split(':');
    for b in &mut out {
        let p = parts.next()?;
        if p.len() != 2 {
            return None;
        }
        *b = u8::from_str_radix(p, 16).ok()?;
    }
    parts.next().is_none().then_some(out)
}

#[must_use]
pub fn format_mac(bytes: &[u8]) -> String {
    bytes
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(":")
}

fn to_info(m: &LinkMessage) -> LinkInfo {
    let mut info = LinkInfo {
        index: m.header.index,
        up: m.header.flags.contains(LinkFlags::Up),
        ..LinkInfo::default()
    };
    for a in &m.attributes {
        match a {
            LinkAttribute::Address(mac) => info.mac = format_mac(mac),
            LinkAttribute::Mtu(mtu) => info.mtu = *mtu,
            _ => {}
        }
    }
    info
}

/// The open file of a network namespace (kept open while we refer to it).
pub fn open_netns(path: &str) -> Result<File, String> {
    File::open(path).map_err(|e| format!("cannot open network namespace {path}: {e}"))
}

impl Netlink {
    /// A connection in this process's namespace; needs a tokio runtime.
    pub fn host() -> Result<Self, String> {
        let (conn, handle, _) =
            rtnetlink::new_connection().map_err(|e| format!("cannot open netlink: {e}"))?;
        tokio::spawn(conn);
        Ok(Self { handle })
    }

    /// A connection inside the namespace `ns`. The socket is created on a
    /// thread of its own that entered `ns` and then ends, so no thread
    /// that keeps running (or a runtime's pool) is left in the pod.
    pub async fn in_netns(ns: &File) -> Result<Self, NetnsError> {
        let ns = ns.try_clone().map_err(|e| {
            NetnsError::Netlink(format!("cannot duplicate the namespace handle: {e}"))
        })?;
        let runtime = tokio::runtime::Handle::current();
        let (tx, rx) = tokio::sync::oneshot::channel();
        std::thread::spawn(move || {
            let made = nix::sched::setns(&ns, CloneFlags::CLONE_NEWNET)
                .map_err(|e| {
                    NetnsError::NotANetns(format!("cannot enter it as a network namespace: {e}"))
                })
                .and_then(|()| {
                    // The socket registers with the caller's runtime.
                    let _guard = runtime.enter();
                    rtnetlink::new_connection().map_err(|e| {
                        NetnsError::Netlink(format!("cannot open netlink in the pod: {e}"))
                    })
                });
            let _ = tx.send(made.map(|(conn, handle, _)| (conn, handle)));
        });
        let (conn, handle) = rx
            .await
            .map_err(|_| NetnsError::Netlink("the namespace thread died".to_owned()))??;
        tokio::spawn(conn);
        Ok(Self { handle })
    }

    /// Interface details, `None` if it does not exist.
    pub async fn link(&self, name: &str) -> Result<Option<LinkInfo>, String> {
        let mut links = self.handle.link().get().match_name(name).execute();
        match links.try_next().await {
            Ok(Some(m)) => Ok(Some(to_info(&m))),
            Ok(None) => Ok(None),
            Err(e) if is_enodev(&e) => Ok(None),
            Err(e) => Err(nl(&format!("looking up {name}"), &e)),
        }
    }

    async fn index(&self, name: &str) -> Result<u32, String> {
        self.link(name)
            .await?
            .map(|l| l.index)
            .ok_or_else(|| format!("interface {name} does not exist"))
    }

    /// Create a veth pair: `host` here, `ifname` directly inside `pod`
    /// (so a pod name that also exists on the host never clashes), both
    /// with `mtu`, the pod end with `mac` if given.
    pub async fn create_veth(
        &self,
        host: &str,
        pod: &File,
        ifname: &str,
        mtu: u32,
        mac: Option<[u8; 6]>,
    ) -> Result<(), String> {
        let mut peer = LinkMessageBuilder::<LinkUnspec>::new()
            .name(ifname)
            .mtu(mtu)
            .setns_by_fd(pod.as_raw_fd());
        if let Some(mac) = mac {
            peer = peer.address(mac.to_vec());
        }
        let msg = LinkMessageBuilder::<LinkUnspec>::new_with_info_kind(InfoKind::Veth)
            .name(host)
            .mtu(mtu)
            .set_info_data(InfoData::Veth(InfoVeth::Peer(peer.build())))
            .build();
        self.handle
            .link()
            .add(msg)
            .execute()
            .await
            .map_err(|e| nl(&format!("creating veth {host} / {ifname}"), &e))
    }

    pub async fn set_mtu(&self, name: &str, mtu: u32) -> Result<(), String> {
        let index = self.index(name).await?;
        self.handle
            .link()
            .set(LinkUnspec::new_with_index(index).mtu(mtu).build())
            .execute()
            .await
            .map_err(|e| nl(&format!("setting MTU {mtu} on {name}"), &e))
    }

    pub async fn set_up(&self, name: &str) -> Result<(), String> {
        let index = self.index(name).await?;
        self.handle
            .link()
            .set(LinkUnspec::new_with_index(index).up().build())
            .execute()
            .await
            .map_err(|e| nl(&format!("bringing {name} up"), &e))
    }

    /// Add an address; IPv6 ones skip duplicate address detection because
    /// l2mesh IPAM (or the delegated plugin) already made them unique and
    /// a pod must be able to use its address as soon as ADD returns.
    pub async fn add_address(&self, name: &str, addr: IpNet) -> Result<(), String> {
        let index = self.index(name).await?;
        let mut req = self
            .handle
            .address()
            .add(index, addr.addr(), addr.prefix_len());
        if addr.addr().is_ipv6() {
            req.message_mut()
                .attributes
                .push(AddressAttribute::Flags(AddressFlags::Nodad));
        }
        req.execute()
            .await
            .map_err(|e| nl(&format!("adding {addr} to {name}"), &e))
    }

    /// Addresses on an interface, both families, link-local ones included.
    pub async fn addresses(&self, name: &str) -> Result<Vec<IpNet>, String> {
        let index = self.index(name).await?;
        let msgs: Vec<_> = self
            .handle
            .address()
            .get()
            .set_link_index_filter(index)
            .execute()
            .try_collect()
            .await
            .map_err(|e| nl(&format!("listing addresses of {name}"), &e))?;
        let mut out = Vec::new();
        for m in msgs {
            // IFA_LOCAL is the interface's own address on IPv4 (IFA_ADDRESS
            // is the peer on point-to-point links); IPv6 has only IFA_ADDRESS.
            let local = m.attributes.iter().find_map(|a| match a {
                AddressAttribute::Local(ip) => Some(*ip),
                _ => None,
            });
            let addr = local.or_else(|| {
                m.attributes.iter().find_map(|a| match a {
                    AddressAttribute::Address(ip) => Some(*ip),
                    _ => None,
                })
            });
            if let Some(ip) = addr
                && let Ok(net) = IpNet::new(ip, m.header.prefix_len)
            {
                out.push(net);
            }
        }
        Ok(out)
    }

    pub async fn add_route(
        &self,
        name: &str,
        dst: IpNet,
        gw: Option<IpAddr>,
    ) -> Result<(), String> {
        let index = self.index(name).await?;
        let what = || format!("adding route {dst} on {name}");
        let mut builder = RouteMessageBuilder::<IpAddr>::new()
            .destination_prefix(dst.addr(), dst.prefix_len())
            .map_err(|e| format!("{}: {e}", what()))?
            .output_interface(index);
        if let Some(gw) = gw {
            builder = builder
                .gateway(gw)
                .map_err(|e| format!("{}: {e}", what()))?;
        }
        let mut msg = builder.build();
        if msg.header.address_family == AddressFamily::Unspec {
            msg.header.address_family = if dst.addr().is_ipv4() {
                AddressFamily::Inet
            } else {
                AddressFamily::Inet6
            };
        }
        self.handle
            .route()
            .add(msg)
            .execute()
            .await
            .map_err(|e| nl(&what(), &e))
    }

    /// Delete an interface; a missing one is not an error (DEL is idempotent).
    pub async fn delete(&self, name: &str) -> Result<(), String> {
        let Some(link) = self.link(name).await? else {
            return Ok(());
        };
        match self.handle.link().del(link.index).execute().await {
            Ok(()) => Ok(()),
            // Deleting one end of a veth takes the other with it.
            Err(e) if is_enodev(&e) => Ok(()),
            Err(e) => Err(nl(&format!("deleting {name}"), &e)),
        }
    }
}

/// The host-side name for a pod interface: stable per (container, ifname),
/// at most 15 characters.
#[must_use]
pub fn host_ifname(container_id: &str, ifname: &str) -> String {
    use sha2::{Digest, Sha256};
    let digest = Sha256::digest(format!("{container_id}/{ifname}").as_bytes());
    let mut name = String::from("l2");
    for b in digest.iter().take(6) {
        name.push_str(&format!("{b:02x}"));
    }
    name
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn host_names_are_short_stable_and_distinct() {
        let a = host_ifname("c1", "net1");
        assert_eq!(a, host_ifname("c1", "net1"));
        assert_ne!(a, host_ifname("c1", "net2"));
        assert_ne!(a, host_ifname("c2", "net1"));
        assert!(a.len() <= 15 && a.starts_with("l2"));
    }

    #[test]
    fn macs_parse_and_format() {
        let mac = parse_mac("02:AB:cd:00:00:01").unwrap();
        assert_eq!(mac, [2, 0xab, 0xcd, 0, 0, 1]);
        assert_eq!(format_mac(&mac), "02:ab:cd:00:00:01");
        for bad in [
            "",
            "02:00",
            "02:00:00:00:00:00:00",
            "zz:00:00:00:00:00",
            "2:0:0:0:0:0",
        ] {
            assert!(parse_mac(bad).is_none(), "{bad}");
        }
    }
}
