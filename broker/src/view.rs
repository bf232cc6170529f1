//! What one cluster may see: its admitted networks with the peer gateways of
//! the other members, and nothing about any other network or cluster.

use crate::state::{Admission, State, cluster_slice, sha256, tunnel_subnet};
use l2mesh_proto::broker as pb;
use prost::Message;
use std::collections::BTreeSet;

/// The view of `cluster`, with revision 0 (the caller sets it), or `None`
/// for an unknown cluster.
#[must_use]
pub fn compute(state: &State, cluster: &str) -> Option<pb::ClusterView> {
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
        let members = state.members(net);
        let mut peers = Vec::new();
        for member in members.iter().filter(|m| *m != cluster) {
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
            members,
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

/// Recompute the views of `affected`, record their hashes and revisions in
/// `state`, and return the views with their revisions set.
pub fn refresh(state: &mut State, affected: &BTreeSet<String>) -> Vec<pb::ClusterView> {
    let mut out = Vec::with_capacity(affected.len());
    for name in affected {
        let Some(mut view) = compute(state, name) else {
            continue;
        };
        let hash = sha256(&view.encode_to_vec());
        if let Some(rev) = state.record_view(name, hash) {
            view.revision = rev;
            out.push(view);
        }
    }
    out
}

#[cfg(test)]
#[path = "view_tests.rs"]
mod tests;
