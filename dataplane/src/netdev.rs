//! Linux devices owned by the dataplane, over netlink: one bridge and one
//! TAP per network. Names carry a fixed prefix and the VNI so that a
//! restarted daemon recognises (adopts or removes) what it created.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use futures::TryStreamExt;
use rtnetlink::packet_route::address::{AddressAttribute, AddressMessage};
use rtnetlink::packet_route::link::{
    AfSpecInet6, AfSpecUnspec, In6AddrGenMode, InfoKind, LinkAttribute, LinkFlags, LinkInfo,
    LinkMessage,
};
use rtnetlink::packet_route::route::{RouteAttribute, RouteMessage};
use rtnetlink::{Handle, LinkBridge, LinkMessageBuilder, LinkUnspec, RouteMessageBuilder};

use crate::Error;
use crate::nft::PORT_GROUP;
use crate::port::{PodRef, Port, PortSettings};

const ENODEV: i32 = 19;
/// Below this MTU a device has no IPv6 (RFC 8200).
const IPV6_MIN_MTU: u32 = 1280;

/// Prefix of the bridges this daemon owns ("l2mb-" + 6 hex digits of the VNI).
pub const BRIDGE_PREFIX: &str = "l2mb-";
/// Prefix of the TAP devices this daemon owns.
pub const TAP_PREFIX: &str = l2mesh_proto::DATAPLANE_TAP_PREFIX;

/// Bridge name of a network: 11 characters, within IFNAMSIZ.
pub fn bridge_name(vni: u32) -> String {
    format!("{BRIDGE_PREFIX}{vni:06x}")
}

pub fn tap_name(vni: u32) -> String {
    format!("{TAP_PREFIX}{vni:06x}")
}

/// The VNI encoded in a device name of ours, if it is one.
pub fn owned_vni(name: &str) -> Option<u32> {
    let hex = name
        .strip_prefix(BRIDGE_PREFIX)
        .or_else(|| name.strip_prefix(TAP_PREFIX))?;
    if hex.len() != 6 {
        return None;
    }
    u32::from_str_radix(hex, 16).ok()
}

/// A link as netlink reports it.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Link {
    pub index: u32,
    pub name: String,
    pub controller: Option<u32>,
    pub alias: Option<String>,
    /// The link kind ("veth", "tun", "bridge", ...); none for a physical NIC.
    pub kind: Option<String>,
    pub loopback: bool,
    pub up: bool,
    /// MTU, interface group, ARP flag and IPv6 address generation mode: the
    /// settings an attach changes.
    pub settings: PortSettings,
}

fn to_link(m: &LinkMessage) -> Link {
    let mut l = Link {
        index: m.header.index,
        loopback: m.header.flags.contains(LinkFlags::Loopback),
        ..Link::default()
    };
    l.settings.noarp = m.header.flags.contains(LinkFlags::Noarp);
    l.settings.nomulticast = !m.header.flags.contains(LinkFlags::Multicast);
    l.up = m.header.flags.contains(LinkFlags::Up);
    for a in &m.attributes {
        match a {
            LinkAttribute::IfName(n) => l.name.clone_from(n),
            LinkAttribute::Controller(c) => l.controller = Some(*c),
            LinkAttribute::IfAlias(a) if !a.is_empty() => l.alias = Some(a.clone()),
            LinkAttribute::Mtu(m) => l.settings.mtu = *m,
            LinkAttribute::Group(g) => l.settings.group = *g,
            LinkAttribute::LinkInfo(infos) => {
                for i in infos {
                    if let LinkInfo::Kind(k) = i {
                        l.kind = Some(k.to_string());
                    }
                }
            }
            LinkAttribute::AfSpecUnspec(specs) => {
                for spec in specs {
                    if let AfSpecUnspec::Inet6(v) = spec {
                        for x in v {
                            if let AfSpecInet6::AddrGenMode(mode) = x {
                                l.settings.addr_gen_mode = u8::from(mode);
                            }
                        }
                    }
                }
            }
            _ => {}
        }
    }
    l
}

/// An address of a link as netlink reports it.
fn to_addr(m: &AddressMessage) -> Option<IpAddr> {
    m.attributes.iter().find_map(|a| match a {
        AddressAttribute::Address(ip) => Some(*ip),
        _ => None,
    })
}

/// True for an address that only ever speaks on its own link.
pub fn is_link_local(ip: &IpAddr) -> bool {
    match ip {
        IpAddr::V4(v4) => v4.is_link_local(),
        IpAddr::V6(v6) => v6.is_unicast_link_local(),
    }
}

fn nl(what: &str, e: rtnetlink::Error) -> Error {
    Error::Netlink(format!("{what}: {e}"))
}

/// A netlink handle in the daemon's network namespace.
#[derive(Debug, Clone)]
pub struct Netlink {
    handle: Handle,
}

impl Netlink {
    /// Opens a netlink socket; must run inside a tokio runtime.
    pub fn new() -> Result<Self, Error> {
        let (conn, handle, _) = rtnetlink::new_connection()?;
        tokio::spawn(conn);
        Ok(Self { handle })
    }

    pub async fn links(&self) -> Result<Vec<Link>, Error> {
        let msgs: Vec<LinkMessage> = self
            .handle
            .link()
            .get()
            .execute()
            .try_collect()
            .await
            .map_err(|e| nl("listing links", e))?;
        Ok(msgs.iter().map(to_link).collect())
    }

    pub async fn find(&self, name: &str) -> Result<Option<Link>, Error> {
        Ok(self.links().await?.into_iter().find(|l| l.name == name))
    }

    /// Creates the bridge (down, so that the node's stack never speaks on
    /// it) or adopts an existing one; keeps the node's stack off it
    /// ([`Self::isolate`]), sets the MTU and brings it up. Multicast snooping
    /// is off: the bridge floods multicast like the tunnels do, and sends
    /// no IGMP/MLD queries of its own.
    pub async fn ensure_bridge(&self, name: &str, mtu: u32) -> Result<u32, Error> {
        if self.find(name).await?.is_none() {
            self.handle
                .link()
                .add(
                    LinkMessageBuilder::<LinkBridge>::new(name)
                        .mtu(mtu)
                        .mcast_snooping(false)
                        .build(),
                )
                .execute()
                .await
                .map_err(|e| nl(&format!("creating bridge {name}"), e))?;
        }
        let link = self
            .find(name)
            .await?
            .ok_or_else(|| Error::Netlink(format!("bridge {name} vanished after creation")))?;
        self.handle
            .link()
            .change(
                LinkMessageBuilder::<LinkBridge>::new_with_info_kind(InfoKind::Bridge)
                    .index(link.index)
                    .mcast_snooping(false)
                    .build(),
            )
            .execute()
            .await
            .map_err(|e| {
                nl(
                    &format!("turning multicast snooping off on bridge {name}"),
                    e,
                )
            })?;
        self.isolate(link.index).await?;
        self.set_mtu_up(link.index, mtu).await?;
        Ok(link.index)
    }

    /// Keeps the node's own stack out of a tenant network on one of its
    /// devices (bridge, TAP, pod port): interface group [`PORT_GROUP`] (the
    /// nftables rules of [`crate::nft`] match it), no ARP, no multicast, no
    /// IPv6 address generation, and no addresses. Done over netlink, so it
    /// works where `/proc/sys` is read-only.
    ///
    /// A device that is down also gets its IPv6 state made afresh: the
    /// kernel joined it to the all-routers group when it was registered if
    /// IPv6 forwarding was on, and would report that group (MLD, from
    /// "::") the moment it comes up. Dropping the MTU below IPv6's minimum
    /// and back re-creates the device's IPv6 state, this time without
    /// multicast, so without the group. The device stays down until its
    /// caller brings it up, so its stack never had a chance to speak.
    pub async fn isolate(&self, index: u32) -> Result<(), Error> {
        let link = self
            .links()
            .await?
            .into_iter()
            .find(|l| l.index == index)
            .ok_or_else(|| Error::Netlink(format!("link {index} vanished")))?;
        let what = || {
            format!(
                "isolating link {index} ({}) from the node's stack",
                link.name
            )
        };
        let base = || {
            LinkUnspec::new_with_index(index)
                .link_group(PORT_GROUP)
                .arp(false)
                .multicast(false)
        };
        self.handle
            .link()
            .set(base().build())
            .execute()
            .await
            .map_err(|e| nl(&what(), e))?;
        let mtu = link.settings.mtu;
        if !link.up && mtu >= IPV6_MIN_MTU {
            for step in [IPV6_MIN_MTU - 1, mtu] {
                self.handle
                    .link()
                    .set(LinkUnspec::new_with_index(index).mtu(step).build())
                    .execute()
                    .await
                    .map_err(|e| nl(&what(), e))?;
            }
        }
        let v6 = LinkUnspec::new_with_index(index)
            .append_extra_attribute(LinkAttribute::AfSpecUnspec(vec![AfSpecUnspec::Inet6(
                vec![AfSpecInet6::AddrGenMode(In6AddrGenMode::None)],
            )]))
            .build();
        if let Err(e) = self.handle.link().set(v6).execute().await {
            // A kernel without IPv6 (or a device below IPv6's MTU) refuses
            // it; there is no IPv6 to keep quiet then.
            tracing::debug!(error = %e, index, "no IPv6 on the link to set addr_gen_mode on");
        }
        self.flush_addresses(index).await
    }

    /// Restores the settings an attach changed on a port.
    pub async fn restore(&self, index: u32, s: &PortSettings) -> Result<(), Error> {
        let mut b = LinkUnspec::new_with_index(index)
            .link_group(s.group)
            .arp(!s.noarp)
            .multicast(!s.nomulticast);
        if s.mtu > 0 {
            b = b.mtu(s.mtu);
        }
        let msg = b
            .append_extra_attribute(LinkAttribute::AfSpecUnspec(vec![AfSpecUnspec::Inet6(
                vec![AfSpecInet6::AddrGenMode(In6AddrGenMode::from(
                    s.addr_gen_mode,
                ))],
            )]))
            .build();
        self.handle
            .link()
            .set(msg)
            .execute()
            .await
            .map_err(|e| nl(&format!("restoring the settings of link {index}"), e))
    }

    /// The addresses on a link.
    pub async fn addresses(&self, index: u32) -> Result<Vec<IpAddr>, Error> {
        Ok(self
            .address_messages(index)
            .await?
            .iter()
            .filter_map(to_addr)
            .collect())
    }

    /// The kernel's address messages of one link (the filter is a hint the
    /// kernel may ignore, so the index is checked here).
    async fn address_messages(&self, index: u32) -> Result<Vec<AddressMessage>, Error> {
        let msgs: Vec<AddressMessage> = self
            .handle
            .address()
            .get()
            .set_link_index_filter(index)
            .execute()
            .try_collect()
            .await
            .map_err(|e| nl(&format!("listing the addresses of link {index}"), e))?;
        Ok(msgs
            .into_iter()
            .filter(|m| m.header.index == index)
            .collect())
    }

    async fn flush_addresses(&self, index: u32) -> Result<(), Error> {
        for m in self.address_messages(index).await? {
            let ip = to_addr(&m);
            self.handle
                .address()
                .del(m)
                .execute()
                .await
                .map_err(|e| nl(&format!("removing address {ip:?} from link {index}"), e))?;
        }
        Ok(())
    }

    /// The interfaces a default route (IPv4 or IPv6, any table) leaves by.
    pub async fn default_route_links(&self) -> Result<Vec<u32>, Error> {
        let mut out = Vec::new();
        for query in [
            RouteMessageBuilder::<Ipv4Addr>::new().build(),
            RouteMessageBuilder::<Ipv6Addr>::new().build(),
        ] {
            let routes: Vec<RouteMessage> = self
                .handle
                .route()
                .get(query)
                .execute()
                .try_collect()
                .await
                .map_err(|e| nl("listing routes", e))?;
            for r in routes
                .iter()
                .filter(|r| r.header.destination_prefix_length == 0)
            {
                for a in &r.attributes {
                    match a {
                        RouteAttribute::Oif(i) => out.push(*i),
                        RouteAttribute::MultiPath(hops) => {
                            out.extend(hops.iter().map(|h| h.interface_index));
                        }
                        _ => {}
                    }
                }
            }
        }
        out.sort_unstable();
        out.dedup();
        Ok(out)
    }

    pub async fn set_down(&self, index: u32) -> Result<(), Error> {
        self.handle
            .link()
            .set(LinkUnspec::new_with_index(index).down().build())
            .execute()
            .await
            .map_err(|e| nl(&format!("taking link {index} down"), e))
    }

    pub async fn set_mtu_up(&self, index: u32, mtu: u32) -> Result<(), Error> {
        self.handle
            .link()
            .set(LinkUnspec::new_with_index(index).mtu(mtu).up().build())
            .execute()
            .await
            .map_err(|e| nl(&format!("setting MTU {mtu} on link {index}"), e))
    }

    /// Puts `index` into `bridge` with the network MTU and brings it up.
    pub async fn enslave(&self, index: u32, bridge: u32, mtu: u32) -> Result<(), Error> {
        self.handle
            .link()
            .set(
                LinkUnspec::new_with_index(index)
                    .controller(bridge)
                    .mtu(mtu)
                    .up()
                    .build(),
            )
            .execute()
            .await
            .map_err(|e| nl(&format!("attaching link {index} to bridge {bridge}"), e))
    }

    /// Sets a link's alias; an empty alias removes it.
    pub async fn set_alias(&self, index: u32, alias: &str) -> Result<(), Error> {
        self.handle
            .link()
            .set(LinkUnspec::new_with_index(index).alias(alias).build())
            .execute()
            .await
            .map_err(|e| nl(&format!("setting the alias of link {index}"), e))
    }

    pub async fn release(&self, index: u32) -> Result<(), Error> {
        self.handle
            .link()
            .set(LinkUnspec::new_with_index(index).nocontroller().build())
            .execute()
            .await
            .map_err(|e| nl(&format!("detaching link {index}"), e))
    }

    /// Deletes a link; one that is already gone (a TAP vanishes when its
    /// last file descriptor closes) counts as deleted.
    pub async fn delete(&self, index: u32) -> Result<(), Error> {
        match self.handle.link().del(index).execute().await {
            Ok(()) => Ok(()),
            Err(rtnetlink::Error::NetlinkError(m)) if m.to_io().raw_os_error() == Some(ENODEV) => {
                Ok(())
            }
            Err(e) => Err(nl(&format!("deleting link {index}"), e)),
        }
    }

    /// The interfaces attached to a bridge with their pods, sorted by name.
    pub async fn ports(&self, bridge: &str) -> Result<Vec<Port>, Error> {
        let links = self.links().await?;
        let Some(br) = links.iter().find(|l| l.name == bridge).map(|l| l.index) else {
            return Ok(Vec::new());
        };
        let mut v: Vec<Port> = links
            .into_iter()
            .filter(|l| l.controller == Some(br))
            .map(|l| Port {
                pod: l.alias.as_deref().and_then(PodRef::from_alias),
                ifname: l.name,
            })
            .collect();
        v.sort_by(|a, b| a.ifname.cmp(&b.ifname));
        Ok(v)
    }

    /// Deletes every device of ours whose VNI is not in `keep`. Returns the names.
    pub async fn remove_stale(&self, keep: &[u32]) -> Result<Vec<String>, Error> {
        let mut removed = Vec::new();
        for l in self.links().await? {
            if let Some(vni) = owned_vni(&l.name)
                && !keep.contains(&vni)
            {
                self.delete(l.index).await?;
                removed.push(l.name);
            }
        }
        Ok(removed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_fit_ifnamsiz_and_round_trip() {
        for vni in [1, 4097, 0x00ff_ffff] {
            let (b, t) = (bridge_name(vni), tap_name(vni));
            assert!(b.len() <= 15 && t.len() <= 15);
            assert_eq!(owned_vni(&b), Some(vni));
            assert_eq!(owned_vni(&t), Some(vni));
        }
        assert_eq!(owned_vni("eth0"), None);
        assert_eq!(owned_vni("l2mb-xyz"), None);
        assert_eq!(owned_vni("l2mb-0000011"), None);
    }
}
