//! What one cluster may see: its admitted networks with the peer gateways of
//! the other members, and nothing about any other network or cluster.

use crate::error::Error;
use crate::state::{Admission, State, cluster_slice, tunnel_subnet};
use l2mesh_proto::broker as pb;
use prost::Message as _;
use std::collections::{BTreeMap, BTreeSet, HashMap};

/// How this broker builds views. Bump it when a change of the code changes
/// what a stored revision's view looks like: on start, a store written with
/// another format gives every cluster a new revision (and a snapshot).
pub const VIEW_FORMAT: u32 = 1;

/// Members of a network beyond which a cluster that gains the whole
/// network gets a snapshot instead of a delta carrying it.
pub const DELTA_MAX_MEMBERS: usize = 128;

/// Per-network data shared by every member's view: computed once per
/// network instead of once per member (a network of N members would
/// otherwise format N² peer entries).
#[derive(Debug, Default)]
pub struct Shared {
    nets: HashMap<String, (Vec<String>, Vec<pb::PeerGateway>)>,
}

impl Shared {
    fn get<'a>(&'a mut self, state: &State, net: &str) -> &'a (Vec<String>, Vec<pb::PeerGateway>) {
        self.nets.entry(net.to_owned()).or_insert_with(|| {
            let members = state.members(net);
            let peers = members.iter().flat_map(|m| peers_pb(state, m)).collect();
            (members, peers)
        })
    }
}

/// The snapshot of `cluster`'s view at its current revision, or `None` for
/// an unknown cluster.
#[must_use]
pub fn compute(state: &State, cluster: &str) -> Option<pb::ClusterView> {
    let me = state.clusters.get(cluster)?;
    let mut shared = Shared::default();
    let mut networks = Vec::new();
    let mut admissions = Vec::with_capacity(me.requested.len());
    for net in &me.requested {
        let (a, admitted) = admission_pb(state, cluster, net);
        admissions.push(a);
        if admitted && let Some(n) = network_pb(state, cluster, net, &mut shared) {
            networks.push(n);
        }
    }
    Some(pb::ClusterView {
        revision: me.view_rev,
        cluster_name: cluster.to_owned(),
        tunnel_subnet: tunnel_subnet(me.subnet_index).to_string(),
        networks,
        admissions,
        delta: None,
    })
}

/// The admissions of `cluster`'s requests, in name order.
#[must_use]
pub fn admissions(state: &State, cluster: &str) -> Vec<pb::Admission> {
    state.clusters.get(cluster).map_or_else(Vec::new, |me| {
        me.requested
            .iter()
            .map(|net| admission_pb(state, cluster, net).0)
            .collect()
    })
}

fn admission_pb(state: &State, cluster: &str, net: &str) -> (pb::Admission, bool) {
    let (code, reason) = match state.admission(cluster, net) {
        Admission::Admitted => (pb::AdmissionState::Admitted, String::new()),
        Admission::Denied(r) => (pb::AdmissionState::Denied, r),
        Admission::Unknown(r) => (pb::AdmissionState::UnknownNetwork, r),
    };
    (
        pb::Admission {
            network: net.to_owned(),
            state: code.into(),
            reason,
        },
        code == pb::AdmissionState::Admitted,
    )
}

/// What a network looks like to one member, peers aside.
#[derive(Debug, PartialEq, Eq)]
struct Head {
    vni: u32,
    mtu: u32,
    cidr: String,
    cluster_cidr: String,
}

/// A cluster's view without peers and members: enough to tell which of its
/// networks came, went or changed as a whole, and its admissions.
struct Outline {
    heads: BTreeMap<String, Head>,
    admissions: Vec<pb::Admission>,
}

fn outline(state: &State, cluster: &str) -> Option<Outline> {
    let me = state.clusters.get(cluster)?;
    let mut heads = BTreeMap::new();
    let mut admissions = Vec::with_capacity(me.requested.len());
    for net in &me.requested {
        let (a, admitted) = admission_pb(state, cluster, net);
        admissions.push(a);
        if let Some(network) = state.networks.get(net).filter(|_| admitted) {
            heads.insert(
                net.clone(),
                Head {
                    vni: network.vni,
                    mtu: network.mtu,
                    cidr: network.cidr.map(|c| c.to_string()).unwrap_or_default(),
                    cluster_cidr: cluster_cidr(network, cluster),
                },
            );
        }
    }
    Some(Outline { heads, admissions })
}

fn cluster_cidr(network: &crate::model::Network, cluster: &str) -> String {
    match (&network.cidr, network.slots.get(cluster)) {
        (Some(cidr), Some(slot)) => cluster_slice(cidr, *slot)
            .map(|s| s.to_string())
            .unwrap_or_default(),
        _ => String::new(),
    }
}

fn peers_pb(state: &State, member: &str) -> Vec<pb::PeerGateway> {
    state.clusters.get(member).map_or_else(Vec::new, |c| {
        c.gateways
            .iter()
            .map(|g| pb::PeerGateway {
                cluster: member.to_owned(),
                node: g.node.clone(),
                public_key: g.public_key.clone(),
                endpoints: g.endpoints.clone(),
                tunnel_ip: g.tunnel_ip.to_string(),
            })
            .collect()
    })
}

/// Member changes of one network between two states, for every member
/// (each receiver skips its own entry).
fn member_changes(old: &State, new: &State, net: &str) -> Vec<pb::MemberChange> {
    let slots = |s: &State| {
        s.networks
            .get(net)
            .map(|n| n.slots.clone())
            .unwrap_or_default()
    };
    let (before, after) = (slots(old), slots(new));
    let mut out = Vec::new();
    for m in before
        .keys()
        .chain(after.keys().filter(|k| !before.contains_key(*k)))
    {
        let was = before.contains_key(m);
        let is = after.contains_key(m);
        if !is {
            out.push(pb::MemberChange {
                cluster: m.clone(),
                left: true,
                peers: Vec::new(),
            });
            continue;
        }
        let gateways = |s: &State| s.clusters.get(m).map(|c| c.gateways.clone());
        if !was || gateways(old) != gateways(new) {
            out.push(pb::MemberChange {
                cluster: m.clone(),
                left: false,
                peers: peers_pb(new, m),
            });
        }
    }
    out.sort_by(|a, b| a.cluster.cmp(&b.cluster));
    out
}

/// How a cluster's view moved between two states.
#[derive(Debug, PartialEq)]
pub enum Moved {
    /// Nothing a client sees changed.
    Same,
    /// The changes, to apply to the view of the old state.
    Delta(pb::ViewDelta),
    /// No delta: the cluster is new (there is nothing to apply one to), or
    /// the change brings a whole network about as large as a snapshot.
    Fresh,
    /// The cluster is gone.
    Gone,
}

/// Computes the deltas of many clusters between the same two states,
/// sharing the per-network work.
#[derive(Debug)]
pub struct Differ<'a> {
    old: &'a State,
    new: &'a State,
    changes: HashMap<String, Vec<pb::MemberChange>>,
    shared: Shared,
}

impl<'a> Differ<'a> {
    #[must_use]
    pub fn new(old: &'a State, new: &'a State) -> Self {
        Self {
            old,
            new,
            changes: HashMap::new(),
            shared: Shared::default(),
        }
    }

    /// How `cluster`'s view moved (revisions aside).
    pub fn moved(&mut self, cluster: &str) -> Moved {
        let Some(after) = outline(self.new, cluster) else {
            return Moved::Gone;
        };
        let Some(before) = outline(self.old, cluster) else {
            return Moved::Fresh;
        };
        // Removed and joined again in one commit: another cluster to the
        // client, and the tunnel subnet is not part of a delta.
        let subnet = |s: &State| s.clusters.get(cluster).map(|c| c.subnet_index);
        if subnet(self.old) != subnet(self.new) {
            return Moved::Fresh;
        }
        let mut d = pb::ViewDelta {
            removed_networks: before
                .heads
                .keys()
                .filter(|n| !after.heads.contains_key(*n))
                .cloned()
                .collect(),
            ..pb::ViewDelta::default()
        };
        for (net, head) in &after.heads {
            if before.heads.get(net) != Some(head) {
                // A large network arriving whole is sent as part of a
                // snapshot when the watcher asks, not built here for every
                // member at once.
                if self.new.networks.get(net).map_or(0, |n| n.slots.len()) > DELTA_MAX_MEMBERS {
                    return Moved::Fresh;
                }
                if let Some(whole) = network_pb(self.new, cluster, net, &mut self.shared) {
                    d.upserted_networks.push(whole);
                }
                continue;
            }
            let (old, new) = (self.old, self.new);
            let all = self
                .changes
                .entry(net.clone())
                .or_insert_with(|| member_changes(old, new, net));
            let members: Vec<_> = all
                .iter()
                .filter(|m| m.cluster != cluster)
                .cloned()
                .collect();
            if !members.is_empty() {
                d.changed_networks.push(pb::NetworkChange {
                    network: net.clone(),
                    members,
                });
            }
        }
        for a in &after.admissions {
            if !before.admissions.contains(a) {
                d.admissions.push(a.clone());
            }
        }
        d.removed_admissions = before
            .admissions
            .iter()
            .filter(|a| !after.admissions.iter().any(|b| b.network == a.network))
            .map(|a| a.network.clone())
            .collect();
        if l2mesh_proto::view::is_empty(&d) {
            Moved::Same
        } else {
            Moved::Delta(d)
        }
    }
}

/// Move the views of `affected` from `old` to `new`: every cluster whose
/// view changed gets a new revision in `new`. Returns, per such cluster, its
/// new revision and the delta from its revision in `old` (`None` for a new
/// cluster: it has nothing to apply a delta to).
pub fn advance(
    old: &State,
    new: &mut State,
    affected: &BTreeSet<String>,
) -> HashMap<String, (u64, Option<pb::ViewDelta>)> {
    let moved: Vec<(String, Moved)> = {
        let mut differ = Differ::new(old, new);
        let rev = |s: &State, c: &str| s.clusters.get(c).map(|c| c.view_rev);
        affected
            .iter()
            .map(|c| {
                let m = differ.moved(c);
                // Removed and joined again: a new record, a new history.
                let recreated = rev(old, c).is_some() && rev(new, c) != rev(old, c);
                (
                    c.clone(),
                    if recreated && m != Moved::Gone {
                        Moved::Fresh
                    } else {
                        m
                    },
                )
            })
            .collect()
    };
    let mut out = HashMap::new();
    for (name, m) in moved {
        let delta = match m {
            Moved::Same | Moved::Gone => continue,
            Moved::Fresh => None,
            Moved::Delta(mut d) => {
                d.base_revision = old.clusters.get(&name).map_or(0, |c| c.view_rev);
                Some(d)
            }
        };
        if let Some(rev) = new.bump_view_rev(&name) {
            out.insert(name, (rev, delta));
        }
    }
    out
}

/// For a broker that takes a state another broker committed (a replica
/// following a shared store): the clusters whose revision moved from `old`
/// to `new`, each with its revision in `new` and the delta from `old`
/// (`None`: send a snapshot). Revisions are the writer's, never bumped here.
#[must_use]
pub fn follow(old: &State, new: &State) -> HashMap<String, (u64, Option<pb::ViewDelta>)> {
    let mut differ = Differ::new(old, new);
    let mut out = HashMap::new();
    for (name, c) in &new.clusters {
        let before = old.clusters.get(name).map(|o| o.view_rev);
        if before == Some(c.view_rev) {
            continue;
        }
        let delta = match (before, differ.moved(name)) {
            (Some(base), Moved::Delta(mut d)) => {
                d.base_revision = base;
                Some(d)
            }
            _ => None,
        };
        out.insert(name.clone(), (c.view_rev, delta));
    }
    out
}

/// The whole network `net` as `cluster` sees it, if it is admitted there.
fn network_pb(
    state: &State,
    cluster: &str,
    net: &str,
    shared: &mut Shared,
) -> Option<pb::ViewNetwork> {
    let network = state.networks.get(net)?;
    let (members, all_peers) = shared.get(state, net);
    Some(pb::ViewNetwork {
        name: net.to_owned(),
        vni: network.vni,
        mtu: network.mtu,
        cidr: network.cidr.map(|c| c.to_string()).unwrap_or_default(),
        cluster_cidr: cluster_cidr(network, cluster),
        peers: all_peers
            .iter()
            .filter(|p| p.cluster != cluster)
            .cloned()
            .collect(),
        members: members.clone(),
    })
}

/// The encoded size of the views of `affected`, without building them, or
/// an error naming the first cluster whose view would be larger than
/// `max_bytes`: an agent could not receive it, so the change that causes it
/// is refused. Counts the revision at its largest, so it is an upper bound.
pub fn check_bounded(
    state: &State,
    affected: &BTreeSet<String>,
    max_bytes: usize,
) -> Result<(), Error> {
    use prost::encoding::{encoded_len_varint, key_len};
    let field = |tag: u32, len: usize| key_len(tag) + encoded_len_varint(len as u64) + len;
    // Per network: the encoded length of the whole ViewNetwork without a
    // cluster_cidr, and each member's share of it (its peer entries).
    let mut nets: HashMap<&str, (usize, HashMap<&str, usize>)> = HashMap::new();
    for name in affected {
        let Some(me) = state.clusters.get(name) else {
            continue;
        };
        let subnet = tunnel_subnet(me.subnet_index).to_string();
        let mut len = field(2, name.len()) + field(3, subnet.len()) + key_len(1) + 10;
        for net in &me.requested {
            let (a, admitted) = admission_pb(state, name, net);
            len += field(5, a.encoded_len());
            let Some(network) = state.networks.get(net).filter(|_| admitted) else {
                continue;
            };
            let (whole, shares) = nets.entry(net.as_str()).or_insert_with(|| {
                let mut shares = HashMap::new();
                let mut whole = field(1, net.len())
                    + key_len(2)
                    + encoded_len_varint(u64::from(network.vni))
                    + key_len(3)
                    + encoded_len_varint(u64::from(network.mtu))
                    + network.cidr.map_or(0, |c| field(4, c.to_string().len()));
                for m in network.slots.keys() {
                    whole += field(7, m.len());
                    let share: usize = peers_pb(state, m)
                        .iter()
                        .map(|p| field(6, p.encoded_len()))
                        .sum();
                    whole += share;
                    shares.insert(m.as_str(), share);
                }
                (whole, shares)
            });
            let own = shares.get(name.as_str()).copied().unwrap_or(0);
            let cidr = cluster_cidr(network, name);
            let n = *whole - own
                + if cidr.is_empty() {
                    0
                } else {
                    field(5, cidr.len())
                };
            len += field(4, n);
        }
        if len > max_bytes {
            return Err(Error::Exhausted(format!(
                "refused, nothing changed: with this change the view of cluster {name:?} would be {len} bytes, over the {max_bytes}-byte message limit (its networks hold too many or too large gateway reports)"
            )));
        }
    }
    Ok(())
}

#[cfg(test)]
#[path = "view_tests.rs"]
mod tests;
