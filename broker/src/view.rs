//! What one cluster may see: its admitted networks with the peer gateways of
//! the other members, and nothing about any other network or cluster.

use crate::error::Error;
use crate::state::{Admission, State, cluster_slice, tunnel_subnet};
use l2mesh_proto::broker as pb;
use prost::Message as _;
use sha2::{Digest as _, Sha256};
use std::collections::{BTreeSet, HashMap};

/// Per-network data shared by every member's view: computed once per
/// refresh instead of once per member (a network of N members would
/// otherwise format N² peer entries).
#[derive(Debug, Default)]
pub struct Shared {
    nets: HashMap<String, (Vec<String>, Vec<pb::PeerGateway>)>,
}

impl Shared {
    fn get<'a>(&'a mut self, state: &State, net: &str) -> &'a (Vec<String>, Vec<pb::PeerGateway>) {
        self.nets.entry(net.to_owned()).or_insert_with(|| {
            let members = state.members(net);
            let mut peers = Vec::new();
            for member in &members {
                let Some(other) = state.clusters.get(member) else {
                    continue;
                };
                peers.extend(other.gateways.iter().map(|g| pb::PeerGateway {
                    cluster: member.clone(),
                    node: g.node.clone(),
                    public_key: g.public_key.clone(),
                    endpoints: g.endpoints.clone(),
                    tunnel_ip: g.tunnel_ip.to_string(),
                }));
            }
            (members, peers)
        })
    }
}

/// The view of `cluster`, with revision 0 (the caller sets it), or `None`
/// for an unknown cluster.
#[must_use]
pub fn compute(state: &State, cluster: &str) -> Option<pb::ClusterView> {
    compute_shared(state, cluster, &mut Shared::default())
}

fn compute_shared(state: &State, cluster: &str, shared: &mut Shared) -> Option<pb::ClusterView> {
    let me = state.clusters.get(cluster)?;
    let mut networks = Vec::new();
    let mut admissions = Vec::new();
    for net in &me.requested {
        let (code, reason) = match state.admission(cluster, net) {
            Admission::Admitted => (pb::AdmissionState::Admitted, String::new()),
            Admission::Denied(r) => (pb::AdmissionState::Denied, r),
            Admission::Unknown(r) => (pb::AdmissionState::UnknownNetwork, r),
        };
        admissions.push(pb::Admission {
            network: net.clone(),
            state: code.into(),
            reason,
        });
        if code != pb::AdmissionState::Admitted {
            continue;
        }
        let Some(network) = state.networks.get(net) else {
            continue;
        };
        let (members, all_peers) = shared.get(state, net);
        let peers = all_peers
            .iter()
            .filter(|p| p.cluster != cluster)
            .cloned()
            .collect();
        let cluster_cidr = match (&network.cidr, network.slots.get(cluster)) {
            (Some(cidr), Some(slot)) => cluster_slice(cidr, *slot)
                .map(|s| s.to_string())
                .unwrap_or_default(),
            _ => String::new(),
        };
        networks.push(pb::ViewNetwork {
            name: net.clone(),
            vni: network.vni,
            mtu: network.mtu,
            cidr: network.cidr.map(|c| c.to_string()).unwrap_or_default(),
            cluster_cidr,
            peers,
            members: members.clone(),
        });
    }
    Some(pb::ClusterView {
        revision: 0,
        cluster_name: cluster.to_owned(),
        tunnel_subnet: tunnel_subnet(me.subnet_index).to_string(),
        networks,
        admissions,
    })
}

/// SHA-256 over every field of a view except its revision, fed straight
/// into the hasher (no encoding pass). Length prefixes keep it unambiguous.
#[must_use]
pub fn digest(view: &pb::ClusterView) -> [u8; 32] {
    fn put(h: &mut Sha256, bytes: &[u8]) {
        h.update((bytes.len() as u64).to_le_bytes());
        h.update(bytes);
    }
    let mut h = Sha256::new();
    put(&mut h, view.cluster_name.as_bytes());
    put(&mut h, view.tunnel_subnet.as_bytes());
    h.update((view.networks.len() as u64).to_le_bytes());
    for n in &view.networks {
        put(&mut h, n.name.as_bytes());
        h.update(n.vni.to_le_bytes());
        h.update(n.mtu.to_le_bytes());
        put(&mut h, n.cidr.as_bytes());
        put(&mut h, n.cluster_cidr.as_bytes());
        h.update((n.peers.len() as u64).to_le_bytes());
        for p in &n.peers {
            put(&mut h, p.cluster.as_bytes());
            put(&mut h, p.node.as_bytes());
            put(&mut h, &p.public_key);
            h.update((p.endpoints.len() as u64).to_le_bytes());
            for e in &p.endpoints {
                put(&mut h, e.as_bytes());
            }
            put(&mut h, p.tunnel_ip.as_bytes());
        }
        h.update((n.members.len() as u64).to_le_bytes());
        for m in &n.members {
            put(&mut h, m.as_bytes());
        }
    }
    h.update((view.admissions.len() as u64).to_le_bytes());
    for a in &view.admissions {
        put(&mut h, a.network.as_bytes());
        h.update(a.state.to_le_bytes());
        put(&mut h, a.reason.as_bytes());
    }
    h.finalize().into()
}

/// Recompute the views of `affected`, record their hashes and revisions in
/// `state`, and return the views with their revisions set.
pub fn refresh(state: &mut State, affected: &BTreeSet<String>) -> Vec<pb::ClusterView> {
    let mut shared = Shared::default();
    let views: Vec<_> = affected
        .iter()
        .filter_map(|name| compute_shared(state, name, &mut shared))
        .collect();
    record(state, views)
}

/// The views of `affected` (revision 0), or an error naming the first
/// cluster whose view would be larger than `max_bytes`: an agent could not
/// receive it, so the change that causes it is refused.
pub fn compute_bounded(
    state: &State,
    affected: &BTreeSet<String>,
    max_bytes: usize,
) -> Result<Vec<pb::ClusterView>, Error> {
    let mut shared = Shared::default();
    let mut out = Vec::with_capacity(affected.len());
    for name in affected {
        let Some(view) = compute_shared(state, name, &mut shared) else {
            continue;
        };
        let len = view.encoded_len();
        if len > max_bytes {
            return Err(Error::Exhausted(format!(
                "refused, nothing changed: with this change the view of cluster {name:?} would be {len} bytes, over the {max_bytes}-byte message limit (its networks hold too many or too large gateway reports)"
            )));
        }
        out.push(view);
    }
    Ok(out)
}

/// Record the hashes and revisions of freshly computed views in `state`;
/// returns them with their revisions set.
pub fn record(state: &mut State, views: Vec<pb::ClusterView>) -> Vec<pb::ClusterView> {
    let mut out = Vec::with_capacity(views.len());
    for mut view in views {
        if let Some(rev) = state.record_view(&view.cluster_name, digest(&view)) {
            view.revision = rev;
            out.push(view);
        }
    }
    out
}

#[cfg(test)]
#[path = "view_tests.rs"]
mod tests;
