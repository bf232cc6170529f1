//! Linux devices owned by the dataplane, over netlink: one bridge and one
//! TAP per network. Names carry a fixed prefix and the VNI so that a
//! restarted daemon recognises (adopts or removes) what it created.

use futures::TryStreamExt;
use rtnetlink::packet_route::link::{LinkAttribute, LinkMessage};
use rtnetlink::{Handle, LinkBridge, LinkUnspec};

use crate::Error;
use crate::port::{PodRef, Port};

const ENODEV: i32 = 19;

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
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Link {
    pub index: u32,
    pub name: String,
    pub controller: Option<u32>,
    pub alias: Option<String>,
}

fn to_link(m: &LinkMessage) -> Link {
    let mut l = Link {
        index: m.header.index,
        name: String::new(),
        controller: None,
        alias: None,
    };
    for a in &m.attributes {
        match a {
            LinkAttribute::IfName(n) => l.name.clone_from(n),
            LinkAttribute::Controller(c) => l.controller = Some(*c),
            LinkAttribute::IfAlias(a) if !a.is_empty() => l.alias = Some(a.clone()),
            _ => {}
        }
    }
    l
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

    /// Creates the bridge or adopts an existing one; sets MTU and brings it up.
    pub async fn ensure_bridge(&self, name: &str, mtu: u32) -> Result<u32, Error> {
        if self.find(name).await?.is_none() {
            self.handle
                .link()
                .add(LinkBridge::new(name).mtu(mtu).build())
                .execute()
                .await
                .map_err(|e| nl(&format!("creating bridge {name}"), e))?;
        }
        let link = self
            .find(name)
            .await?
            .ok_or_else(|| Error::Netlink(format!("bridge {name} vanished after creation")))?;
        self.set_mtu_up(link.index, mtu).await?;
        Ok(link.index)
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
