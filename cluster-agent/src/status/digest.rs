//! What the agent keeps of a node's status report. A report is reduced to
//! a [`NodeDigest`] (what the L2Network status is made of) and to link rows
//! (the per-link table of `l2mesh-agent status`, and the remote links the
//! broker hears about). Two reports with the same digest change nothing:
//! handshake ages and byte counters are not in it, only whether a link is up.

use crate::crd::AttachedPod;
use l2mesh_proto::node::{NetworkStatus, NodeStatus, PeerGroup};
use serde::Serialize;
use std::collections::{BTreeMap, BTreeSet};

/// A tunnel whose last handshake is older than this is down (WireGuard
/// rekeys every 2 minutes while traffic or keepalives flow).
pub const LINK_DOWN_AFTER_MS: u64 = 180_000;

/// How many names a status lists at most where the list could grow with
/// the cluster (down links, nodes that have not applied a network); the
/// counts are always complete.
pub const MAX_NAMED: usize = 8;

/// Whether a link with this handshake age counts as up.
#[must_use]
pub fn link_up(last_handshake_age_ms: Option<u64>) -> bool {
    last_handshake_age_ms.is_some_and(|age| age < LINK_DOWN_AFTER_MS)
}

/// The links of one node that carry the same VNIs.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct LinkGroup {
    pub vnis: Vec<u32>,
    pub up: u32,
    pub down: u32,
    /// The first down peers by name, at most [`MAX_NAMED`].
    pub down_peers: Vec<String>,
}

/// What the L2Network status uses of one node's report.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct NodeDigest {
    /// The networks applied on the node (by name on the nodes), with the
    /// pods on each.
    pub networks: BTreeMap<String, Vec<AttachedPod>>,
    /// The node's links, grouped by the VNIs they carry (sorted by VNIs).
    pub links: Vec<LinkGroup>,
}

impl NodeDigest {
    /// The digest of node `node`'s report.
    #[must_use]
    pub fn of(node: &str, status: &NodeStatus) -> Self {
        let networks = status
            .networks
            .iter()
            .map(|n| (n.name.clone(), attached_pods(node, n)))
            .collect();
        let mut links: Vec<LinkGroup> = Vec::new();
        let mut downs: Vec<Vec<&str>> = Vec::new();
        for p in &status.peers {
            let i = match links.iter().position(|g| g.vnis == p.vnis) {
                Some(i) => i,
                None => {
                    links.push(LinkGroup {
                        vnis: p.vnis.clone(),
                        ..LinkGroup::default()
                    });
                    downs.push(Vec::new());
                    links.len() - 1
                }
            };
            if link_up(p.last_handshake_age_ms) {
                links[i].up += 1;
            } else {
                links[i].down += 1;
                downs[i].push(&p.name);
            }
        }
        for (g, mut d) in links.iter_mut().zip(downs) {
            d.sort_unstable();
            g.down_peers = d.into_iter().take(MAX_NAMED).map(str::to_owned).collect();
        }
        links.sort_by(|a, b| a.vnis.cmp(&b.vnis));
        Self { networks, links }
    }

    /// What differs between two digests: the network names whose pods or
    /// presence changed, and the VNIs whose links changed.
    #[must_use]
    pub fn changes(old: Option<&Self>, new: Option<&Self>) -> (BTreeSet<String>, BTreeSet<u32>) {
        let empty = Self::default();
        let (old, new) = (old.unwrap_or(&empty), new.unwrap_or(&empty));
        let names = old
            .networks
            .keys()
            .chain(new.networks.keys())
            .filter(|n| old.networks.get(*n) != new.networks.get(*n))
            .cloned()
            .collect();
        let vnis = if old.links == new.links {
            BTreeSet::new()
        } else {
            old.links
                .iter()
                .chain(&new.links)
                .flat_map(|g| g.vnis.iter().copied())
                .collect()
        };
        (names, vnis)
    }
}

/// One tunnel as a node last reported it, for the per-link table.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct LinkRow {
    /// The node that reports the link.
    pub node: String,
    /// The peer node, or `cluster/node` of a remote gateway.
    pub peer: String,
    /// A gateway of another cluster.
    pub remote: bool,
    pub up: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub last_handshake_age_ms: Option<u64>,
    pub rx_bytes: u64,
    pub tx_bytes: u64,
    /// The remote gateway's public key (remote links only; the broker checks it).
    #[serde(skip)]
    pub public_key: Vec<u8>,
}

/// The link rows of a report; takes the report apart instead of copying it.
#[must_use]
pub fn link_rows(node: &str, peers: Vec<l2mesh_proto::node::PeerStatus>) -> Vec<LinkRow> {
    peers
        .into_iter()
        .map(|p| {
            let remote = p.group() == PeerGroup::Remote;
            LinkRow {
                node: node.to_owned(),
                up: link_up(p.last_handshake_age_ms),
                peer: p.name,
                remote,
                last_handshake_age_ms: p.last_handshake_age_ms,
                rx_bytes: p.rx_bytes,
                tx_bytes: p.tx_bytes,
                public_key: if remote { p.public_key } else { Vec::new() },
            }
        })
        .collect()
}

/// The pods on one node's bridge: every port, named by its pod when the
/// dataplane knows it (from the CNI's `AttachPort`), else by its interface.
fn attached_pods(node: &str, net: &NetworkStatus) -> Vec<AttachedPod> {
    let mut ifnames: Vec<&str> = net.ports.iter().map(String::as_str).collect();
    // The dataplane's own TAP is a port of every bridge, not a pod.
    ifnames.retain(|i| !i.starts_with(l2mesh_proto::DATAPLANE_TAP_PREFIX));
    // A dataplane that fills only `port_status` still has its ports listed.
    for p in &net.port_status {
        if !ifnames.contains(&p.ifname.as_str())
            && !p.ifname.starts_with(l2mesh_proto::DATAPLANE_TAP_PREFIX)
        {
            ifnames.push(&p.ifname);
        }
    }
    ifnames
        .into_iter()
        .map(|ifname| {
            let pod = net
                .port_status
                .iter()
                .find(|p| p.ifname == ifname && !p.pod_name.is_empty())
                .map_or_else(
                    || ifname.to_owned(),
                    |p| {
                        let ns = if p.pod_namespace.is_empty() {
                            "default"
                        } else {
                            &p.pod_namespace
                        };
                        format!("{ns}/{}", p.pod_name)
                    },
                );
            AttachedPod {
                node: node.to_owned(),
                pod,
                interface: ifname.to_owned(),
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use l2mesh_proto::node::PeerStatus;

    fn peer(name: &str, age: Option<u64>, rx: u64) -> PeerStatus {
        PeerStatus {
            name: name.into(),
            vnis: vec![3, 4],
            last_handshake_age_ms: age,
            rx_bytes: rx,
            ..Default::default()
        }
    }

    fn report(peers: Vec<PeerStatus>) -> NodeStatus {
        NodeStatus {
            node_name: "n1".into(),
            networks: vec![NetworkStatus {
                name: "blue".into(),
                ports: vec!["l2a".into()],
                ..Default::default()
            }],
            peers,
            ..Default::default()
        }
    }

    #[test]
    fn handshake_ages_and_counters_are_no_change() {
        let a = NodeDigest::of(
            "n1",
            &report(vec![peer("n2", Some(1_000), 5), peer("n3", None, 0)]),
        );
        let b = NodeDigest::of(
            "n1",
            &report(vec![peer("n2", Some(120_000), 900), peer("n3", None, 7)]),
        );
        assert_eq!(a, b);
        assert_eq!(
            a.links,
            vec![LinkGroup {
                vnis: vec![3, 4],
                up: 1,
                down: 1,
                down_peers: vec!["n3".into()],
            }]
        );
        // A link going down is a change, of the VNIs it carries only.
        let c = NodeDigest::of(
            "n1",
            &report(vec![peer("n2", Some(200_000), 5), peer("n3", None, 0)]),
        );
        let (names, vnis) = NodeDigest::changes(Some(&a), Some(&c));
        assert!(names.is_empty());
        assert_eq!(vnis, BTreeSet::from([3, 4]));
    }

    #[test]
    fn down_peers_are_bounded_and_counted() {
        let peers = (0..50)
            .map(|i| peer(&format!("n{i:02}"), None, 0))
            .collect();
        let d = NodeDigest::of("x", &report(peers));
        assert_eq!(d.links[0].down, 50);
        assert_eq!(d.links[0].down_peers.len(), MAX_NAMED);
        assert_eq!(d.links[0].down_peers[0], "n00");
    }

    #[test]
    fn a_pod_attached_is_a_change_of_its_network() {
        let a = NodeDigest::of("n1", &report(vec![]));
        let mut r = report(vec![]);
        r.networks[0].ports.push("l2b".into());
        let b = NodeDigest::of("n1", &r);
        let (names, vnis) = NodeDigest::changes(Some(&a), Some(&b));
        assert_eq!(names, BTreeSet::from(["blue".to_owned()]));
        assert!(vnis.is_empty());
    }
}
