//! The cluster view as both ends of the broker's `Watch` hold it: applying a
//! snapshot or a delta ([`apply`]), and merging two deltas into one
//! ([`merge`]). Pure functions on the generated messages.
//!
//! Canonical order (the broker builds snapshots in it, [`apply`] keeps it):
//! networks and admissions by name, members by name, peers by member
//! cluster, then in the order that cluster reported its gateways.

use crate::broker::{Admission, ClusterView, MemberChange, NetworkChange, ViewDelta, ViewNetwork};
use std::collections::BTreeMap;

/// Why a delta cannot be applied to the view the client holds. The client
/// drops its view and resumes from revision 0 (a snapshot).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ViewError {
    #[error("a delta from revision {base} came, but the view held is at revision {held}")]
    WrongBase { base: u64, held: u64 },
    #[error("a delta came before any snapshot")]
    NoView,
    #[error("a delta changes members of network {0:?}, which is not in the view")]
    UnknownNetwork(String),
}

/// Whether a stream message is a delta (else a snapshot).
#[must_use]
pub fn is_delta(msg: &ClusterView) -> bool {
    msg.delta.is_some()
}

/// Apply one stream message to the view held (`None`: nothing yet). A
/// snapshot replaces it; a delta must start at its revision. On error the
/// view held is unchanged.
pub fn apply(held: &mut Option<ClusterView>, mut msg: ClusterView) -> Result<(), ViewError> {
    let Some(delta) = msg.delta.take() else {
        *held = Some(msg);
        return Ok(());
    };
    let view = held.as_mut().ok_or(ViewError::NoView)?;
    if view.revision != delta.base_revision {
        return Err(ViewError::WrongBase {
            base: delta.base_revision,
            held: view.revision,
        });
    }
    apply_delta(view, &delta)?;
    view.revision = msg.revision;
    Ok(())
}

/// Apply `delta` to `view` in place (revision untouched). Checked first:
/// on error the view is unchanged.
pub fn apply_delta(view: &mut ClusterView, delta: &ViewDelta) -> Result<(), ViewError> {
    for change in &delta.changed_networks {
        let name = &change.network;
        let kept =
            view.networks.iter().any(|n| &n.name == name) && !delta.removed_networks.contains(name);
        if !kept && !delta.upserted_networks.iter().any(|n| &n.name == name) {
            return Err(ViewError::UnknownNetwork(name.clone()));
        }
    }
    view.networks
        .retain(|n| !delta.removed_networks.contains(&n.name));
    for n in &delta.upserted_networks {
        upsert_by(&mut view.networks, n.clone(), |x| &x.name);
    }
    for change in &delta.changed_networks {
        if let Some(net) = view.networks.iter_mut().find(|n| n.name == change.network) {
            for m in &change.members {
                apply_member(net, m);
            }
        }
    }
    view.admissions
        .retain(|a| !delta.removed_admissions.contains(&a.network));
    for a in &delta.admissions {
        upsert_by(&mut view.admissions, a.clone(), |x| &x.network);
    }
    Ok(())
}

/// Replace one member's entry and peers in a network.
pub fn apply_member(net: &mut ViewNetwork, m: &MemberChange) {
    net.members.retain(|c| *c != m.cluster);
    net.peers.retain(|p| p.cluster != m.cluster);
    if m.left {
        return;
    }
    let at = net.members.partition_point(|c| *c < m.cluster);
    net.members.insert(at, m.cluster.clone());
    let at = net.peers.partition_point(|p| p.cluster < m.cluster);
    net.peers.splice(at..at, m.peers.iter().cloned());
}

fn upsert_by<T>(list: &mut Vec<T>, item: T, key: impl Fn(&T) -> &String) {
    match list.binary_search_by(|x| key(x).cmp(key(&item))) {
        Ok(i) => list[i] = item,
        Err(i) => list.insert(i, item),
    }
}

enum NetOp {
    Removed,
    Whole(ViewNetwork),
    Members(BTreeMap<String, MemberChange>),
}

/// One delta with the effect of `first` then `second` (whose base is the
/// revision `first` leads to). The result's base is `first`'s.
#[must_use]
pub fn merge(first: ViewDelta, second: ViewDelta) -> ViewDelta {
    let mut ops: BTreeMap<String, NetOp> = BTreeMap::new();
    let mut admissions: BTreeMap<String, Option<Admission>> = BTreeMap::new();
    let base_revision = first.base_revision;
    for d in [first, second] {
        for name in d.removed_networks {
            ops.insert(name, NetOp::Removed);
        }
        for n in d.upserted_networks {
            ops.insert(n.name.clone(), NetOp::Whole(n));
        }
        for change in d.changed_networks {
            let op = ops
                .entry(change.network)
                .or_insert_with(|| NetOp::Members(BTreeMap::new()));
            match op {
                // A valid stream never changes members of a network it
                // just removed.
                NetOp::Removed => {}
                NetOp::Whole(net) => change.members.iter().for_each(|m| apply_member(net, m)),
                NetOp::Members(members) => {
                    members.extend(change.members.into_iter().map(|m| (m.cluster.clone(), m)));
                }
            }
        }
        for name in d.removed_admissions {
            admissions.insert(name, None);
        }
        for a in d.admissions {
            admissions.insert(a.network.clone(), Some(a));
        }
    }
    let mut out = ViewDelta {
        base_revision,
        ..ViewDelta::default()
    };
    for (name, op) in ops {
        match op {
            NetOp::Removed => out.removed_networks.push(name),
            NetOp::Whole(n) => out.upserted_networks.push(n),
            NetOp::Members(m) => out.changed_networks.push(NetworkChange {
                network: name,
                members: m.into_values().collect(),
            }),
        }
    }
    for (name, a) in admissions {
        match a {
            Some(a) => out.admissions.push(a),
            None => out.removed_admissions.push(name),
        }
    }
    out
}

/// Whether a delta changes nothing.
#[must_use]
pub fn is_empty(d: &ViewDelta) -> bool {
    d.removed_networks.is_empty()
        && d.upserted_networks.is_empty()
        && d.changed_networks.is_empty()
        && d.admissions.is_empty()
        && d.removed_admissions.is_empty()
}

#[cfg(test)]
#[path = "view_tests.rs"]
mod tests;
