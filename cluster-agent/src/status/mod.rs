//! L2Network status from a network's outcome and what the nodes reported
//! (their [`NodeDigest`]s). Pure: both the Kubernetes status patch and the
//! standalone status files use it.
//!
//! The status stays small whatever the cluster's size: per-link detail is
//! not in it (counts and a few down links are; `l2mesh-agent status` and
//! the metrics have the rest), lists that grow with the nodes are cut at
//! [`MAX_NAMED`] or [`MAX_LISTED_PODS`] with complete counts, and nothing
//! in it moves while the cluster does not (no handshake ages or counters),
//! so a steady cluster writes no status.

pub mod digest;

pub use digest::{LINK_DOWN_AFTER_MS, LinkRow, MAX_NAMED, NodeDigest, link_up};

use crate::crd::{Condition, L2NetworkStatus, LinkSummary, Scope};
use crate::desired::NetworkOutcome;
use l2mesh_proto::broker::{AdmissionState, LinkHealth};
use std::collections::BTreeMap;

/// How many attached pods a status lists at most (`attachedPodCount`
/// counts them all; `l2mesh-dataplane status` on a node lists its own).
pub const MAX_LISTED_PODS: usize = 64;

/// `a, b, c and 5 more`: at most [`MAX_NAMED`] names of `total`.
fn some_names(names: &[String], total: usize) -> String {
    let shown = names
        .iter()
        .take(MAX_NAMED)
        .cloned()
        .collect::<Vec<_>>()
        .join(", ");
    if total > MAX_NAMED.min(names.len()) {
        format!("{shown} and {} more", total - MAX_NAMED.min(names.len()))
    } else {
        shown
    }
}

fn condition(type_: &str, status: &str, reason: &str, message: impl Into<String>) -> Condition {
    Condition {
        type_: type_.to_owned(),
        status: status.to_owned(),
        reason: reason.to_owned(),
        message: message.into(),
        last_transition_time: String::new(),
    }
}

/// Compute the status. `expected` are the nodes that should apply the
/// network (those whose dataplane said hello); `prev` keeps transition times
/// of unchanged conditions. Fields that do not hold are left out (`None` or
/// empty), so a writer can remove them.
#[must_use]
pub fn network_status(
    o: &NetworkOutcome,
    nodes: &BTreeMap<String, NodeDigest>,
    expected: &[String],
    prev: Option<&L2NetworkStatus>,
    now: &str,
) -> L2NetworkStatus {
    let mut status = L2NetworkStatus {
        vni: o.vni,
        member_clusters: o.members.clone(),
        ip_range: o.range.map(|r| r.to_string()),
        mtu: Some(o.mtu),
        ..L2NetworkStatus::default()
    };
    let admitted = match (o.scope, &o.admission) {
        (Scope::MultiCluster, _) if o.broker_refusal.is_some() => condition(
            "Admitted",
            "False",
            "ClusterRefused",
            o.broker_refusal.clone().unwrap_or_default(),
        ),
        (Scope::Local, _) => condition(
            "Admitted",
            "True",
            "LocalScope",
            "local networks need no admission",
        ),
        (Scope::MultiCluster, Some((AdmissionState::Admitted, _))) => condition(
            "Admitted",
            "True",
            "Admitted",
            "the broker admitted this cluster",
        ),
        (Scope::MultiCluster, Some((AdmissionState::Denied, why))) => {
            condition("Admitted", "False", "Denied", why.clone())
        }
        (Scope::MultiCluster, Some((AdmissionState::UnknownNetwork, why))) => {
            condition("Admitted", "False", "UnknownNetwork", why.clone())
        }
        (Scope::MultiCluster, other) => condition(
            "Admitted",
            "Unknown",
            "Pending",
            other
                .as_ref()
                .map_or_else(|| "waiting for the broker".to_owned(), |(_, w)| w.clone()),
        ),
    };
    let prev_ready = prev
        .and_then(|p| p.conditions.iter().find(|c| c.type_ == "Ready"))
        .is_some_and(|c| c.status == "True");
    let ready = match (&o.problem, o.active()) {
        (problem, true) => {
            let missing = not_applied(&o.name, nodes, expected, prev_ready);
            if expected.is_empty() {
                condition(
                    "Ready",
                    "False",
                    "NoDataplane",
                    "no node's dataplane has connected yet",
                )
            } else if !missing.is_empty() {
                condition(
                    "Ready",
                    "False",
                    "Applying",
                    format!(
                        "not yet applied on {} of {} nodes: {}",
                        missing.len(),
                        expected.len(),
                        some_names(&missing, missing.len())
                    ),
                )
            } else if let Some(p) = problem {
                condition("Ready", "True", "ActiveWithWarning", p.clone())
            } else {
                condition(
                    "Ready",
                    "True",
                    "Active",
                    format!("applied on {} nodes", expected.len()),
                )
            }
        }
        (Some(p), false) => condition("Ready", "False", o.problem_reason(), p.clone()),
        (None, false) => condition(
            "Ready",
            "False",
            "NotAdmitted",
            format!(
                "not active until the broker admits it: {}",
                admitted.message
            ),
        ),
    };

    let mut links = LinkSummary::default();
    let mut pods = 0usize;
    if let Some(vni) = o.vni {
        for (node, d) in nodes {
            if let Some(p) = d.networks.get(&o.name) {
                pods += p.len();
                let room = MAX_LISTED_PODS.saturating_sub(status.attached_pods.len());
                status.attached_pods.extend(p.iter().take(room).cloned());
            }
            for g in d.links.iter().filter(|g| g.vnis.contains(&vni)) {
                links.up += g.up;
                links.down += g.down;
                for peer in &g.down_peers {
                    if links.down_links.len() < MAX_NAMED {
                        links.down_links.push(format!("{node}->{peer}"));
                    }
                }
            }
        }
    }
    status.attached_pod_count = u32::try_from(pods).unwrap_or(u32::MAX);
    let total = links.up + links.down;
    let peers = if !o.active() {
        condition(
            "PeersConnected",
            "Unknown",
            "Inactive",
            "the network is not active",
        )
    } else if total == 0 {
        condition(
            "PeersConnected",
            "Unknown",
            "NoPeers",
            "no node reports a tunnel for this network",
        )
    } else if links.down == 0 {
        condition(
            "PeersConnected",
            "True",
            "AllUp",
            format!("{total} tunnels up"),
        )
    } else {
        condition(
            "PeersConnected",
            "False",
            "LinksDown",
            format!(
                "{} of {total} tunnels down: {}",
                links.down,
                some_names(&links.down_links, links.down as usize)
            ),
        )
    };
    if o.active() && total > 0 {
        status.links = Some(links);
    }
    status.conditions = vec![ready, admitted, peers];
    if let Some(why) = &o.attach_problem {
        status.conditions.push(condition(
            "Attachable",
            "False",
            "NadCrdMissing",
            why.clone(),
        ));
    }
    for c in &mut status.conditions {
        c.last_transition_time = prev
            .and_then(|p| p.conditions.iter().find(|x| x.type_ == c.type_))
            .filter(|x| x.status == c.status)
            .map_or_else(|| now.to_owned(), |x| x.last_transition_time.clone());
    }
    status
}

/// Expected nodes that have not applied network `name`: their last report
/// lacks it. A node not heard from since the agent started is taken at the
/// previous status's word (`prev_ready`), so a restart does not flap Ready.
fn not_applied(
    name: &str,
    nodes: &BTreeMap<String, NodeDigest>,
    expected: &[String],
    prev_ready: bool,
) -> Vec<String> {
    expected
        .iter()
        .filter(|node| match nodes.get(*node) {
            Some(d) => !d.networks.contains_key(name),
            None => !prev_ready,
        })
        .cloned()
        .collect()
}

/// Link health of the gateways' tunnels to other clusters, for the broker.
#[must_use]
pub fn remote_link_health(links: &BTreeMap<String, Vec<LinkRow>>) -> Vec<LinkHealth> {
    links
        .values()
        .flatten()
        .filter(|l| l.remote)
        .map(|l| LinkHealth {
            peer_cluster: l.peer.split('/').next().unwrap_or_default().to_owned(),
            peer_public_key: l.public_key.clone(),
            up: l.up,
            last_handshake_age_ms: l.last_handshake_age_ms.unwrap_or_default(),
            rx_bytes: l.rx_bytes,
            tx_bytes: l.tx_bytes,
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::crd::AttachedPod;
    use l2mesh_proto::node::{NetworkStatus, NodeStatus, PeerGroup, PeerStatus, PortStatus};

    /// The status from whole node reports, as the engine gets them.
    fn from_reports(
        o: &NetworkOutcome,
        nodes: &BTreeMap<String, NodeStatus>,
        expected: &[String],
        prev: Option<&L2NetworkStatus>,
        now: &str,
    ) -> L2NetworkStatus {
        let digests = nodes
            .iter()
            .map(|(n, s)| (n.clone(), NodeDigest::of(n, s)))
            .collect();
        network_status(o, &digests, expected, prev, now)
    }

    fn outcome(scope: Scope, vni: Option<u32>) -> NetworkOutcome {
        NetworkOutcome {
            key: "default/blue".into(),
            name: "blue".into(),
            scope,
            mtu: 1390,
            vni,
            cluster_range: None,
            range: None,
            node_slice_prefix: None,
            admission: None,
            broker_refusal: None,
            problem: None,
            problem_kind: crate::desired::ProblemKind::Invalid,
            attach_problem: None,
            members: vec![],
            remote_peers: vec![],
        }
    }

    /// A node that reports network `net` applied.
    fn applied(node: &str, net: &str) -> BTreeMap<String, NodeStatus> {
        let ns = NodeStatus {
            node_name: node.into(),
            networks: vec![NetworkStatus {
                name: net.into(),
                ..Default::default()
            }],
            ..Default::default()
        };
        [(node.to_owned(), ns)].into()
    }

    #[test]
    fn ready_only_once_every_expected_node_applied_the_network() {
        let o = outcome(Scope::Local, Some(3));
        let none = from_reports(&o, &BTreeMap::new(), &[], None, "t");
        assert_eq!(
            (
                get(&none, "Ready").status.as_str(),
                get(&none, "Ready").reason.as_str()
            ),
            ("False", "NoDataplane"),
            "no dataplane connected: not Ready"
        );
        assert_eq!(get(&none, "PeersConnected").status, "Unknown");
        let expected = ["n1".to_owned(), "n2".to_owned()];
        let mut nodes = applied("n1", "blue");
        nodes.extend(applied("n2", "red"));
        let half = from_reports(&o, &nodes, &expected, None, "t");
        let ready = get(&half, "Ready");
        assert_eq!(
            (ready.status.as_str(), ready.reason.as_str()),
            ("False", "Applying")
        );
        assert!(ready.message.contains("n2"), "{}", ready.message);
        nodes.extend(applied("n2", "blue"));
        let all = from_reports(&o, &nodes, &expected, Some(&half), "t");
        assert_eq!(get(&all, "Ready").status, "True");
        // After an agent restart a node not heard from yet does not flip a
        // Ready network, nor make a not-ready one Ready.
        let quiet = from_reports(&o, &applied("n1", "blue"), &expected, Some(&all), "t");
        assert_eq!(get(&quiet, "Ready").status, "True");
        let quiet = from_reports(&o, &applied("n1", "blue"), &expected, Some(&half), "t");
        assert_eq!(get(&quiet, "Ready").status, "False");
    }

    #[test]
    fn the_dataplanes_own_tap_is_no_attached_pod() {
        let o = outcome(Scope::Local, Some(3));
        let node = NodeStatus {
            networks: vec![NetworkStatus {
                name: "blue".into(),
                ports: vec!["l2mt-000003".into(), "l2a".into()],
                port_status: vec![PortStatus {
                    ifname: "l2mt-000003".into(),
                    ..Default::default()
                }],
                ..Default::default()
            }],
            ..Default::default()
        };
        let s = from_reports(&o, &[("n1".to_owned(), node)].into(), &[], None, "t");
        let ifaces: Vec<&str> = s
            .attached_pods
            .iter()
            .map(|p| p.interface.as_str())
            .collect();
        assert_eq!(ifaces, ["l2a"]);
    }

    #[test]
    fn a_missing_nad_crd_is_a_condition_naming_it() {
        let mut o = outcome(Scope::Local, Some(3));
        o.attach_problem = Some("the NetworkAttachmentDefinition CRD is not installed".into());
        let s = from_reports(&o, &BTreeMap::new(), &[], None, "t");
        let c = get(&s, "Attachable");
        assert_eq!(
            (c.status.as_str(), c.reason.as_str()),
            ("False", "NadCrdMissing")
        );
        assert!(c.message.contains("NetworkAttachmentDefinition"));
    }

    fn get<'a>(s: &'a L2NetworkStatus, t: &str) -> &'a Condition {
        s.conditions.iter().find(|c| c.type_ == t).unwrap()
    }

    #[test]
    fn a_refused_cluster_shows_it_on_multi_cluster_networks_only() {
        let mut o = outcome(Scope::MultiCluster, Some(7));
        o.admission = Some((AdmissionState::Admitted, String::new()));
        o.broker_refusal = Some("the broker refuses this cluster".into());
        let s = from_reports(&o, &applied("n1", "blue"), &["n1".into()], None, "t0");
        let a = get(&s, "Admitted");
        assert_eq!(
            (a.status.as_str(), a.reason.as_str()),
            ("False", "ClusterRefused")
        );
        assert_eq!(
            get(&s, "Ready").status,
            "True",
            "the nodes keep their state"
        );
        let mut local = outcome(Scope::Local, Some(3));
        local.broker_refusal = o.broker_refusal.clone();
        let s = from_reports(&local, &BTreeMap::new(), &[], None, "t0");
        assert_eq!(get(&s, "Admitted").reason, "LocalScope");
    }

    #[test]
    fn denied_network_shows_the_brokers_reason() {
        let mut o = outcome(Scope::MultiCluster, None);
        o.admission = Some((AdmissionState::Denied, "edge may not join red".into()));
        let s = from_reports(&o, &BTreeMap::new(), &[], None, "t0");
        let a = get(&s, "Admitted");
        assert_eq!((a.status.as_str(), a.reason.as_str()), ("False", "Denied"));
        assert_eq!(a.message, "edge may not join red");
        assert_eq!(get(&s, "Ready").status, "False");
        assert!(get(&s, "Ready").message.contains("edge may not join red"));
    }

    #[test]
    fn links_ports_and_transition_times() {
        let o = outcome(Scope::Local, Some(3));
        let node = NodeStatus {
            node_name: "n1".into(),
            networks: vec![NetworkStatus {
                name: "blue".into(),
                ports: vec!["l2abc".into()],
                ..Default::default()
            }],
            peers: vec![
                PeerStatus {
                    name: "n2".into(),
                    vnis: vec![3],
                    last_handshake_age_ms: Some(1000),
                    ..Default::default()
                },
                PeerStatus {
                    name: "n3".into(),
                    vnis: vec![3],
                    last_handshake_age_ms: None,
                    ..Default::default()
                },
                PeerStatus {
                    name: "other".into(),
                    vnis: vec![9],
                    ..Default::default()
                },
            ],
            ..Default::default()
        };
        let nodes: BTreeMap<String, NodeStatus> = [("n1".to_owned(), node)].into();
        let s1 = from_reports(&o, &nodes, &["n1".into()], None, "t1");
        assert_eq!(
            s1.attached_pods,
            vec![AttachedPod {
                node: "n1".into(),
                pod: "l2abc".into(),
                interface: "l2abc".into()
            }]
        );
        let links = s1.links.clone().unwrap();
        assert_eq!((links.up, links.down), (1, 1));
        assert_eq!(links.down_links, vec!["n1->n3".to_owned()]);
        let pc = get(&s1, "PeersConnected");
        assert_eq!(pc.status, "False");
        assert!(pc.message.contains("n1->n3"));
        assert_eq!(get(&s1, "Ready").status, "True");
        let s2 = from_reports(&o, &nodes, &["n1".into()], Some(&s1), "t2");
        assert_eq!(
            get(&s2, "Ready").last_transition_time,
            "t1",
            "unchanged keeps its time"
        );
        let quiet = from_reports(&o, &BTreeMap::new(), &["n1".into()], Some(&s1), "t3");
        assert_eq!(get(&quiet, "PeersConnected").last_transition_time, "t3");
    }

    #[test]
    fn attached_pods_are_named_by_their_pod() {
        let o = outcome(Scope::Local, Some(3));
        let port = |ifname: &str, ns: &str, name: &str| PortStatus {
            ifname: ifname.into(),
            pod_namespace: ns.into(),
            pod_name: name.into(),
        };
        let node = NodeStatus {
            networks: vec![
                NetworkStatus {
                    name: "blue".into(),
                    ports: vec!["l2a".into(), "l2b".into(), "l2c".into()],
                    port_status: vec![
                        port("l2a", "team", "web-0"),
                        port("l2b", "", ""),
                        port("l2d", "", "lonely"),
                    ],
                    ..Default::default()
                },
                NetworkStatus {
                    name: "red".into(),
                    ports: vec!["l2x".into()],
                    port_status: vec![port("l2x", "team", "other-net")],
                    ..Default::default()
                },
            ],
            ..Default::default()
        };
        let s = from_reports(&o, &[("n1".to_owned(), node)].into(), &[], None, "t");
        let got: Vec<(&str, &str, &str)> = s
            .attached_pods
            .iter()
            .map(|p| (p.node.as_str(), p.pod.as_str(), p.interface.as_str()))
            .collect();
        assert_eq!(
            got,
            vec![
                ("n1", "team/web-0", "l2a"),
                ("n1", "l2b", "l2b"),
                ("n1", "l2c", "l2c"),
                ("n1", "default/lonely", "l2d"),
            ]
        );
    }

    #[test]
    fn remote_links_are_reported_per_peer_cluster() {
        let node = NodeStatus {
            peers: vec![
                PeerStatus {
                    name: "cloud/gw".into(),
                    group: PeerGroup::Remote.into(),
                    last_handshake_age_ms: Some(5),
                    rx_bytes: 10,
                    ..Default::default()
                },
                PeerStatus {
                    name: "n2".into(),
                    group: PeerGroup::Local.into(),
                    ..Default::default()
                },
            ],
            ..Default::default()
        };
        let links =
            remote_link_health(&[("gw".to_owned(), digest::link_rows("gw", node.peers))].into());
        assert_eq!(links.len(), 1);
        assert_eq!(links[0].peer_cluster, "cloud");
        assert!(links[0].up);
        assert_eq!(links[0].rx_bytes, 10);
    }
}
