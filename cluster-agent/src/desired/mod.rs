//! The pure core: from the cluster's nodes (and what they said in their
//! hellos), its L2Networks and the broker's view, compute every node's
//! desired dataplane state, the gateways to report, and each network's status.
//! No I/O here; both the Kubernetes controller and standalone mode call it.

use crate::crd::{L2Network, Scope};
use crate::ipam::{self, Allocations};
use ipnet::{IpNet, Ipv4Net};
use l2mesh_proto::broker::{Admission, AdmissionState, ClusterView, Gateway, PeerGateway};
use l2mesh_proto::node::{DesiredState, NetworkSpec, NodeIdentity, PeerGroup, PeerSpec};
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, BTreeSet};

pub mod index;

/// Keepalive for every tunnel: keeps NAT and conntrack state alive and makes
/// link health measurable even when a network is idle.
pub const PERSISTENT_KEEPALIVE_SECS: u32 = 25;

/// A node of this cluster as the operator declared it.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct NodeEntry {
    pub name: String,
    /// Gateway nodes also tunnel to the gateways of other clusters.
    #[serde(default)]
    pub gateway: bool,
    /// Underlay `ip:port` of this node for other clusters (the WAN side a
    /// gateway is reported to the broker with). The nodes of this cluster use
    /// the endpoints the node reports itself, and this one only when it
    /// reports none.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub endpoint: Option<String>,
}

/// What a node's dataplane told the agent in its `NodeHello`.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Hello {
    pub public_key: Vec<u8>,
    pub listen_port: u32,
    pub endpoints: Vec<String>,
}

/// What became of one L2Network this round.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NetworkOutcome {
    /// `namespace/name` of the L2Network.
    pub key: String,
    /// Name on the nodes.
    pub name: String,
    pub scope: Scope,
    pub mtu: u32,
    /// Set when the network is active on the nodes.
    pub vni: Option<u32>,
    /// The range pods of this cluster get addresses from (local: ipRange;
    /// multi-cluster: the broker's share for this cluster).
    pub cluster_range: Option<IpNet>,
    /// The network's whole range (pods use its prefix length).
    pub range: Option<IpNet>,
    /// `spec.nodeSlicePrefix`: the size of each node's slice of `cluster_range`.
    pub node_slice_prefix: Option<u8>,
    /// Multi-cluster: whether the broker admitted this cluster, and why not.
    pub admission: Option<(AdmissionState, String)>,
    /// Multi-cluster: the broker refuses this cluster's identity (removed,
    /// or its CA changed). Status only: the nodes keep their last state.
    pub broker_refusal: Option<String>,
    /// Problem that keeps the network from being ready.
    pub problem: Option<String>,
    /// What `problem` is: `Invalid` (the spec), `NameConflict` (another
    /// L2Network has this name on the nodes) or `Unavailable` (allocation).
    pub problem_kind: ProblemKind,
    /// Why pods cannot attach (e.g. the NAD CRD is missing), status only.
    pub attach_problem: Option<String>,
    pub members: Vec<String>,
    pub remote_peers: Vec<PeerGateway>,
}

/// What kind of problem keeps a network off the nodes.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum ProblemKind {
    #[default]
    Invalid,
    NameConflict,
    Unavailable,
}

impl NetworkOutcome {
    /// The `Ready` reason of an inactive network with a problem.
    #[must_use]
    pub fn problem_reason(&self) -> &'static str {
        match self.problem_kind {
            ProblemKind::Invalid => "Invalid",
            ProblemKind::NameConflict => "NameConflict",
            ProblemKind::Unavailable => "Unavailable",
        }
    }

    /// Whether the network is installed on the nodes.
    #[must_use]
    pub fn active(&self) -> bool {
        self.vni.is_some()
    }
}

/// Resolve each L2Network against the allocations and the broker view.
/// `admissions` are the broker's latest answers to `RequestNetworks`; those in
/// the view win when both exist.
pub fn resolve_networks(
    networks: &[L2Network],
    view: Option<&ClusterView>,
    admissions: &[Admission],
    allocs: &mut Allocations,
) -> Vec<NetworkOutcome> {
    let owners = node_name_owners(networks);
    let mut out = Vec::new();
    let mut sorted: Vec<&L2Network> = networks.iter().collect();
    sorted.sort_by_key(|n| n.key());
    for net in sorted {
        let mut o = NetworkOutcome {
            key: net.key(),
            name: net.dataplane_name(),
            scope: net.spec.scope,
            mtu: net.mtu(),
            vni: None,
            cluster_range: None,
            range: None,
            node_slice_prefix: net.spec.node_slice_prefix,
            admission: None,
            broker_refusal: None,
            problem: None,
            problem_kind: ProblemKind::Invalid,
            attach_problem: None,
            members: Vec::new(),
            remote_peers: Vec::new(),
        };
        if let Err(e) = net.validate() {
            o.problem = Some(e.to_string());
            out.push(o);
            continue;
        }
        if let Some(other) = owners.get(&o.name).filter(|k| **k != o.key) {
            o.problem = Some(format!(
                "network name {:?} on the nodes is already used by L2Network {other}: rename one of them",
                o.name
            ));
            o.problem_kind = ProblemKind::NameConflict;
            out.push(o);
            continue;
        }
        let own_range = net.ip_range().ok().flatten();
        match net.spec.scope {
            Scope::Local => match allocs.local_vni(&o.name) {
                Ok(vni) => {
                    o.vni = Some(vni);
                    o.range = own_range;
                    o.cluster_range = own_range;
                }
                Err(e) => {
                    o.problem = Some(e.to_string());
                    o.problem_kind = ProblemKind::Unavailable;
                }
            },
            Scope::MultiCluster => resolve_multi(&mut o, net, own_range, view, admissions),
        }
        out.push(o);
    }
    // Local VNIs are released only for networks that are gone from the
    // (complete) list, and reused only after the rest of the space. A
    // network that is invalid for a while keeps its VNI.
    let keep: BTreeSet<String> = out
        .iter()
        .filter(|o| o.scope == Scope::Local)
        .map(|o| o.name.clone())
        .collect();
    allocs.vnis.retain(&keep);
    out
}

/// Which L2Network (`namespace/name`) owns each name on the nodes: among
/// valid networks with the same name the oldest (creation time, then key)
/// keeps it, so a new network can never take a running one's name.
#[must_use]
pub fn node_name_owners(networks: &[L2Network]) -> BTreeMap<String, String> {
    let mut sorted: Vec<&L2Network> = networks.iter().filter(|n| n.validate().is_ok()).collect();
    sorted.sort_by_key(|n| (n.metadata.creation_timestamp.as_ref().map(|t| t.0), n.key()));
    let mut owners = BTreeMap::new();
    for n in sorted {
        owners.entry(n.dataplane_name()).or_insert_with(|| n.key());
    }
    owners
}

fn resolve_multi(
    o: &mut NetworkOutcome,
    net: &L2Network,
    own_range: Option<IpNet>,
    view: Option<&ClusterView>,
    admissions: &[Admission],
) {
    let broker_name = net.broker_name();
    let admission = view
        .into_iter()
        .flat_map(|v| v.admissions.iter())
        .chain(admissions.iter())
        .find(|a| a.network == broker_name);
    if let Some(a) = admission {
        o.admission = Some((a.state(), a.reason.clone()));
    }
    let Some(vn) = view.and_then(|v| v.networks.iter().find(|n| n.name == broker_name)) else {
        if o.admission.is_none() {
            o.admission = Some((
                AdmissionState::Unspecified,
                "waiting for the broker's answer".to_owned(),
            ));
        }
        return;
    };
    o.admission = Some((AdmissionState::Admitted, String::new()));
    o.vni = Some(vn.vni);
    if vn.mtu != 0 {
        o.mtu = vn.mtu;
    }
    o.range = vn.cidr.parse::<IpNet>().ok().map(|r| r.trunc());
    o.cluster_range = vn.cluster_cidr.parse::<IpNet>().ok().map(|r| r.trunc());
    if let (Some(mine), Some(theirs)) = (own_range, o.range)
        && mine != theirs
    {
        o.problem = Some(format!(
            "spec.ipRange {mine} differs from the broker's range {theirs}: the broker's range is used; fix or remove spec.ipRange"
        ));
    }
    if let Some(share) = o.cluster_range
        && let Err(e) = net.check_node_slice_prefix(Some(share))
    {
        o.problem = Some(format!(
            "{e} (this cluster's share of the broker's range is {share}); pods get no l2mesh addresses until it is fixed"
        ));
    }
    o.members = vn.members.clone();
    o.remote_peers = vn.peers.clone();
}

/// The broker network names to request: multi-cluster networks, except
/// invalid or clashing manifests; admitted ones with a warning (range
/// mismatch) still are.
pub fn requested_networks<'a>(
    networks: impl IntoIterator<Item = &'a NetworkOutcome>,
) -> Vec<String> {
    networks
        .into_iter()
        .filter(|n| n.scope == Scope::MultiCluster && (n.problem.is_none() || n.vni.is_some()))
        .map(|n| n.name.clone())
        .collect::<BTreeSet<_>>()
        .into_iter()
        .collect()
}

/// Everything the nodes should have, plus what to tell the broker.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct ClusterPlan {
    /// Node name → desired state (revision left 0; the server stamps it).
    pub nodes: BTreeMap<String, DesiredState>,
    /// Gateways to report to the broker.
    pub gateways: Vec<Gateway>,
    /// Broker network names to request.
    pub requested_networks: Vec<String>,
    /// Problems that are not about one network (e.g. tunnel subnet exhausted).
    pub problems: Vec<String>,
}

/// Where other clusters' gateways reach this (gateway) node: its configured
/// WAN endpoint, else what it reported.
fn wan_endpoints(node: &NodeEntry, hello: &Hello) -> Vec<String> {
    match &node.endpoint {
        Some(e) => vec![e.clone()],
        None => hello.endpoints.clone(),
    }
}

/// Where the nodes of this cluster reach `node`: what the node reported
/// itself (its LAN address; the first one that is not its configured WAN
/// endpoint), and the configured endpoint only when it reported nothing
/// else. The same rule for every node, so a standby gateway (which the
/// engine hands to the plan as a plain node) is reached on its LAN side too.
fn lan_endpoint(node: &NodeEntry, hello: &Hello) -> String {
    hello
        .endpoints
        .iter()
        .find(|e| Some(*e) != node.endpoint.as_ref())
        .or(node.endpoint.as_ref())
        .cloned()
        .unwrap_or_default()
}

/// Compute every node's desired state from scratch. The engine keeps them
/// up to date with [`index::DesiredIndex`], which must give the same.
pub fn plan(
    nodes: &[NodeEntry],
    hellos: &BTreeMap<String, Hello>,
    networks: &[NetworkOutcome],
    tunnel_subnet: Ipv4Net,
    allocs: &mut Allocations,
) -> ClusterPlan {
    let mut plan = ClusterPlan {
        requested_networks: requested_networks(networks),
        ..ClusterPlan::default()
    };
    // Tunnel IPs: stable per node; released when a node leaves the list.
    let names: BTreeSet<String> = nodes.iter().map(|n| n.name.clone()).collect();
    allocs.tunnel_ips.retain(&names);
    let mut tunnel_ips = BTreeMap::new();
    for node in nodes {
        match allocs.tunnel_ip(&node.name, tunnel_subnet) {
            Ok(ip) => {
                tunnel_ips.insert(node.name.clone(), ip.to_string());
            }
            Err(e) => plan.problems.push(format!("node {}: {e}", node.name)),
        }
    }
    let active: Vec<&NetworkOutcome> = networks.iter().filter(|n| n.active()).collect();
    let all_vnis: Vec<u32> = active
        .iter()
        .filter_map(|n| n.vni)
        .collect::<BTreeSet<_>>()
        .into_iter()
        .collect();
    // Node slices of each network's range; released when a node leaves the
    // list or the network is gone from it (an inactive network keeps them).
    for n in &active {
        if let Some(slices) = allocs.slices.get_mut(&n.name) {
            slices.retain(&names);
        }
    }
    allocs.retain_slices(&networks.iter().map(|n| n.name.clone()).collect());

    // One gateway per cluster carries the remote tunnels: with two, a frame
    // from a remote gateway would come back to it through the second one
    // (local peer -> remote peers) and every frame would cross twice. The
    // engine's failover logic elects the active gateway and hands only that
    // one to the plan as a gateway; standbys arrive here as plain nodes. If
    // several do arrive, the first by name that has said hello wins.
    let active_gateway = nodes
        .iter()
        .filter(|n| n.gateway && hellos.contains_key(&n.name) && tunnel_ips.contains_key(&n.name))
        .min_by(|a, b| a.name.cmp(&b.name));
    // Local peers by name (the index patches them in place by name).
    let mut by_name: Vec<&NodeEntry> = nodes.iter().collect();
    by_name.sort_by(|a, b| a.name.cmp(&b.name));
    for node in nodes {
        let Some(tunnel_ip) = tunnel_ips.get(&node.name) else {
            continue;
        };
        let mut state = DesiredState {
            revision: 0,
            identity: Some(NodeIdentity {
                node_name: node.name.clone(),
                tunnel_ip: tunnel_ip.clone(),
                listen_port: 0,
            }),
            networks: Vec::new(),
            peers: Vec::new(),
        };
        for n in &active {
            let pod_cidr = match n.cluster_range {
                Some(range) => match ipam::slice_prefix(range, n.node_slice_prefix)
                    .and_then(|prefix| allocs.node_slice(&n.name, &node.name, range, prefix))
                {
                    Ok(s) => s.to_string(),
                    Err(e) => {
                        plan.problems
                            .push(format!("network {}: node {}: {e}", n.key, node.name));
                        String::new()
                    }
                },
                None => String::new(),
            };
            state.networks.push(NetworkSpec {
                name: n.name.clone(),
                vni: n.vni.unwrap_or_default(),
                mtu: n.mtu,
                pod_cidr,
            });
        }
        for other in &by_name {
            if other.name == node.name {
                continue;
            }
            let (Some(hello), Some(ip)) = (hellos.get(&other.name), tunnel_ips.get(&other.name))
            else {
                continue;
            };
            state.peers.push(PeerSpec {
                public_key: hello.public_key.clone(),
                endpoint: lan_endpoint(other, hello),
                tunnel_ip: ip.clone(),
                vnis: all_vnis.clone(),
                group: PeerGroup::Local.into(),
                persistent_keepalive: PERSISTENT_KEEPALIVE_SECS,
                name: other.name.clone(),
            });
        }
        if active_gateway.is_some_and(|g| g.name == node.name) {
            state.peers.extend(remote_peers(&active));
        }
        plan.nodes.insert(node.name.clone(), state);
    }
    if let Some(node) = active_gateway
        && let (Some(hello), Some(ip)) = (hellos.get(&node.name), tunnel_ips.get(&node.name))
    {
        plan.gateways.push(Gateway {
            node: node.name.clone(),
            public_key: hello.public_key.clone(),
            endpoints: wan_endpoints(node, hello),
            tunnel_ip: ip.clone(),
        });
    }
    plan
}

/// Remote gateways of every active multi-cluster network, one peer per key
/// with the VNIs of all networks it serves.
fn remote_peers(active: &[&NetworkOutcome]) -> Vec<PeerSpec> {
    let mut by_key: BTreeMap<Vec<u8>, PeerSpec> = BTreeMap::new();
    for n in active.iter().filter(|n| n.scope == Scope::MultiCluster) {
        let Some(vni) = n.vni else { continue };
        for p in &n.remote_peers {
            let entry = by_key
                .entry(p.public_key.clone())
                .or_insert_with(|| PeerSpec {
                    public_key: p.public_key.clone(),
                    endpoint: p.endpoints.first().cloned().unwrap_or_default(),
                    tunnel_ip: p.tunnel_ip.clone(),
                    vnis: Vec::new(),
                    group: PeerGroup::Remote.into(),
                    persistent_keepalive: PERSISTENT_KEEPALIVE_SECS,
                    name: format!("{}/{}", p.cluster, p.node),
                });
            if !entry.vnis.contains(&vni) {
                entry.vnis.push(vni);
                entry.vnis.sort_unstable();
            }
        }
    }
    by_key.into_values().collect()
}

#[cfg(test)]
mod tests;
