//! The desired states of every node, kept up to date incrementally: each
//! update compares the inputs with those of the last one and recomputes only
//! the node states an input change reaches (the pattern of the linkerd
//! policy controller's index). [`plan`](super::plan) computes the same
//! states from scratch; a test holds the two equal over random changes.
//!
//! What reaches which node:
//! - a node's hello, endpoint or tunnel IP: its peer entry in every other
//!   node's state (patched in place, the other entries are not touched);
//!   a new node's own state is built;
//! - the set of active networks (a network added, removed, or its VNI,
//!   MTU, range or slice size changed): every node, since every node
//!   carries every network and lists its VNIs on every peer;
//! - a remote gateway (the broker's view), or which node is the active
//!   gateway: only the active gateway's state (and the previous one's).

use super::{
    Hello, NetworkOutcome, NodeEntry, PERSISTENT_KEEPALIVE_SECS, lan_endpoint, remote_peers,
    wan_endpoints,
};
use crate::ipam::{self, Allocations};
use ipnet::{IpNet, Ipv4Net};
use l2mesh_proto::broker::Gateway;
use l2mesh_proto::node::{DesiredState, NetworkSpec, NodeIdentity, PeerGroup, PeerSpec};
use std::collections::{BTreeMap, BTreeSet};

/// What an active network puts on every node.
#[derive(Clone, Debug, PartialEq, Eq)]
struct NetShape {
    key: String,
    name: String,
    vni: u32,
    mtu: u32,
    cluster_range: Option<IpNet>,
    node_slice_prefix: Option<u8>,
}

/// What a node's own peer entry (in the other nodes' states) is made from.
#[derive(Clone, Debug, PartialEq, Eq)]
struct PeerInputs {
    entry: NodeEntry,
    hello: Option<Hello>,
    tunnel_ip: Option<String>,
}

/// The result of one [`DesiredIndex::update`].
#[derive(Debug, Default, PartialEq, Eq)]
pub struct IndexUpdate {
    /// Nodes whose desired state was recomputed (built or patched).
    pub recomputed: BTreeSet<String>,
    /// Nodes that left the list: their state is gone.
    pub removed: BTreeSet<String>,
}

/// The cluster's desired states, by node, kept up to date by [`Self::update`].
#[derive(Debug, Default)]
pub struct DesiredIndex {
    /// Node list order (allocations are made in it, as `plan` does).
    order: Vec<String>,
    inputs: BTreeMap<String, PeerInputs>,
    nets: Vec<NetShape>,
    /// Names of every network outcome, active or not (their slices are kept).
    net_names: BTreeSet<String>,
    all_vnis: Vec<u32>,
    /// Each node's entry in the other nodes' states (nodes with a hello and
    /// a tunnel IP only).
    peers: BTreeMap<String, PeerSpec>,
    remote: Vec<PeerSpec>,
    gateway: Option<String>,
    states: BTreeMap<String, DesiredState>,
    /// Problems found while building each node's state (its slices).
    node_problems: BTreeMap<String, Vec<String>>,
    /// Nodes that got no tunnel IP, with why.
    ip_problems: BTreeMap<String, String>,
    gateways: Vec<Gateway>,
}

impl DesiredIndex {
    /// Every node's desired state (revision 0).
    #[must_use]
    pub fn states(&self) -> &BTreeMap<String, DesiredState> {
        &self.states
    }

    /// The gateway to report to the broker.
    #[must_use]
    pub fn gateways(&self) -> &[Gateway] {
        &self.gateways
    }

    /// Problems that keep a node from a tunnel IP or a slice.
    #[must_use]
    pub fn problems(&self) -> Vec<String> {
        self.order
            .iter()
            .flat_map(|n| {
                self.ip_problems
                    .get(n)
                    .into_iter()
                    .cloned()
                    .chain(self.node_problems.get(n).into_iter().flatten().cloned())
            })
            .collect()
    }

    /// Bring every state up to date with the inputs (the same as
    /// [`super::plan`] takes, allocations included) and say which changed.
    pub fn update(
        &mut self,
        nodes: &[NodeEntry],
        hellos: &BTreeMap<String, Hello>,
        networks: &[NetworkOutcome],
        tunnel_subnet: Ipv4Net,
        allocs: &mut Allocations,
    ) -> IndexUpdate {
        let mut out = IndexUpdate::default();
        let names: BTreeSet<String> = nodes.iter().map(|n| n.name.clone()).collect();
        let order: Vec<String> = nodes.iter().map(|n| n.name.clone()).collect();
        let nodes_changed = order != self.order;
        let net_names: BTreeSet<String> = networks.iter().map(|n| n.name.clone()).collect();
        let active: Vec<&NetworkOutcome> = networks.iter().filter(|n| n.active()).collect();
        let nets: Vec<NetShape> = active
            .iter()
            .map(|n| NetShape {
                key: n.key.clone(),
                name: n.name.clone(),
                vni: n.vni.unwrap_or_default(),
                mtu: n.mtu,
                cluster_range: n.cluster_range,
                node_slice_prefix: n.node_slice_prefix,
            })
            .collect();
        let nets_changed = nets != self.nets;
        // Allocations are released as `plan` releases them: tunnel IPs and
        // slices of nodes gone from the list, slices of networks gone.
        if nodes_changed || net_names != self.net_names || nets_changed {
            allocs.tunnel_ips.retain(&names);
            for n in &active {
                if let Some(slices) = allocs.slices.get_mut(&n.name) {
                    slices.retain(&names);
                }
            }
            allocs.retain_slices(&net_names);
        }
        self.net_names = net_names;
        for gone in self.states.keys().filter(|n| !names.contains(*n)) {
            out.removed.insert(gone.clone());
        }
        self.states.retain(|n, _| names.contains(n));
        self.node_problems.retain(|n, _| names.contains(n));
        self.inputs.retain(|n, _| names.contains(n));
        self.ip_problems.clear();

        // Tunnel IPs, in list order (a lookup for nodes that have one).
        let mut tunnel_ips = BTreeMap::new();
        for node in nodes {
            match allocs.tunnel_ip(&node.name, tunnel_subnet) {
                Ok(ip) => {
                    tunnel_ips.insert(node.name.clone(), ip.to_string());
                }
                Err(e) => {
                    self.ip_problems
                        .insert(node.name.clone(), format!("node {}: {e}", node.name));
                }
            }
        }
        let all_vnis: Vec<u32> = nets
            .iter()
            .map(|n| n.vni)
            .collect::<BTreeSet<_>>()
            .into_iter()
            .collect();
        let vnis_changed = all_vnis != self.all_vnis;
        self.all_vnis = all_vnis;
        self.nets = nets;
        self.order = order;

        // Each node's own peer entry.
        let mut peer_changes: BTreeSet<String> = BTreeSet::new();
        let mut own_changes: BTreeSet<String> = BTreeSet::new();
        for node in nodes {
            let inputs = PeerInputs {
                entry: node.clone(),
                hello: hellos.get(&node.name).cloned(),
                tunnel_ip: tunnel_ips.get(&node.name).cloned(),
            };
            let old = self.inputs.get(&node.name);
            if old == Some(&inputs) && !vnis_changed {
                continue;
            }
            if old.map(|o| &o.tunnel_ip) != Some(&inputs.tunnel_ip) {
                own_changes.insert(node.name.clone());
            }
            let peer = match (&inputs.hello, &inputs.tunnel_ip) {
                (Some(hello), Some(ip)) => Some(PeerSpec {
                    public_key: hello.public_key.clone(),
                    endpoint: lan_endpoint(node, hello),
                    tunnel_ip: ip.clone(),
                    vnis: self.all_vnis.clone(),
                    group: PeerGroup::Local.into(),
                    persistent_keepalive: PERSISTENT_KEEPALIVE_SECS,
                    name: node.name.clone(),
                }),
                _ => None,
            };
            if self.peers.get(&node.name) != peer.as_ref() {
                peer_changes.insert(node.name.clone());
                match peer {
                    Some(p) => self.peers.insert(node.name.clone(), p),
                    None => self.peers.remove(&node.name),
                };
            }
            self.inputs.insert(node.name.clone(), inputs);
        }
        for gone in &out.removed {
            if self.peers.remove(gone).is_some() {
                peer_changes.insert(gone.clone());
            }
        }

        // The active gateway (the engine hands only the elected one to the
        // index as a gateway) and the remote tunnels it carries.
        let gateway = nodes
            .iter()
            .filter(|n| {
                n.gateway && hellos.contains_key(&n.name) && tunnel_ips.contains_key(&n.name)
            })
            .min_by(|a, b| a.name.cmp(&b.name));
        self.gateways = gateway
            .and_then(|node| {
                let (hello, ip) = (hellos.get(&node.name)?, tunnel_ips.get(&node.name)?);
                Some(Gateway {
                    node: node.name.clone(),
                    public_key: hello.public_key.clone(),
                    endpoints: wan_endpoints(node, hello),
                    tunnel_ip: ip.clone(),
                })
            })
            .into_iter()
            .collect();
        let gateway = gateway.map(|g| g.name.clone());
        let remote = remote_peers(&active);
        let mut remote_changes: BTreeSet<String> = BTreeSet::new();
        if gateway != self.gateway || remote != self.remote {
            remote_changes.extend(self.gateway.iter().cloned());
            remote_changes.extend(gateway.iter().cloned());
            self.gateway = gateway;
            self.remote = remote;
        }

        // Which states to build from scratch, which to patch.
        let rebuild_all = nets_changed || vnis_changed;
        let with_problems: Vec<String> = if nodes_changed {
            self.node_problems.keys().cloned().collect()
        } else {
            Vec::new()
        };
        for node in nodes {
            let Some(ip) = tunnel_ips.get(&node.name) else {
                if self.states.remove(&node.name).is_some() {
                    out.removed.insert(node.name.clone());
                }
                continue;
            };
            let name = &node.name;
            if rebuild_all
                || !self.states.contains_key(name)
                || own_changes.contains(name)
                || with_problems.contains(name)
            {
                let state = self.build(node, ip, allocs);
                self.states.insert(name.clone(), state);
                out.recomputed.insert(name.clone());
                continue;
            }
            let mut touched = false;
            if let Some(state) = self.states.get_mut(name) {
                for changed in peer_changes.iter().filter(|c| *c != name) {
                    patch_peer(state, changed, self.peers.get(changed));
                    touched = true;
                }
                if remote_changes.contains(name) {
                    let gateway = self.gateway.as_deref() == Some(name.as_str());
                    state.peers.retain(|p| p.group() != PeerGroup::Remote);
                    if gateway {
                        state.peers.extend(self.remote.iter().cloned());
                    }
                    touched = true;
                }
            }
            if touched {
                out.recomputed.insert(name.clone());
            }
        }
        out.removed.retain(|n| !self.states.contains_key(n));
        out
    }

    /// One node's state from scratch (allocating its slices).
    fn build(
        &mut self,
        node: &NodeEntry,
        tunnel_ip: &str,
        allocs: &mut Allocations,
    ) -> DesiredState {
        let mut problems = Vec::new();
        let networks = self
            .nets
            .iter()
            .map(|n| {
                let pod_cidr = match n.cluster_range {
                    Some(range) => match ipam::slice_prefix(range, n.node_slice_prefix)
                        .and_then(|prefix| allocs.node_slice(&n.name, &node.name, range, prefix))
                    {
                        Ok(s) => s.to_string(),
                        Err(e) => {
                            problems.push(format!("network {}: node {}: {e}", n.key, node.name));
                            String::new()
                        }
                    },
                    None => String::new(),
                };
                NetworkSpec {
                    name: n.name.clone(),
                    vni: n.vni,
                    mtu: n.mtu,
                    pod_cidr,
                }
            })
            .collect();
        if problems.is_empty() {
            self.node_problems.remove(&node.name);
        } else {
            self.node_problems.insert(node.name.clone(), problems);
        }
        let mut peers: Vec<PeerSpec> = self
            .peers
            .iter()
            .filter(|(name, _)| **name != node.name)
            .map(|(_, p)| p.clone())
            .collect();
        if self.gateway.as_deref() == Some(node.name.as_str()) {
            peers.extend(self.remote.iter().cloned());
        }
        DesiredState {
            revision: 0,
            identity: Some(NodeIdentity {
                node_name: node.name.clone(),
                tunnel_ip: tunnel_ip.to_owned(),
                listen_port: 0,
            }),
            networks,
            peers,
        }
    }
}

/// Set (or remove, with `None`) the local peer `name` in a state whose
/// local peers come first, sorted by name.
fn patch_peer(state: &mut DesiredState, name: &str, peer: Option<&PeerSpec>) {
    let locals = state
        .peers
        .partition_point(|p| p.group() == PeerGroup::Local);
    match (
        state.peers[..locals].binary_search_by(|p| p.name.as_str().cmp(name)),
        peer,
    ) {
        (Ok(i), Some(p)) => state.peers[i].clone_from(p),
        (Ok(i), None) => {
            state.peers.remove(i);
        }
        (Err(i), Some(p)) => state.peers.insert(i, p.clone()),
        (Err(_), None) => {}
    }
}

#[cfg(test)]
#[path = "index_tests.rs"]
mod tests;
