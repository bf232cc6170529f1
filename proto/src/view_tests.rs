use super::*;
use crate::broker::{AdmissionState, PeerGateway};

/// splitmix64: enough randomness for shuffled test data, no dependency.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
    fn chance(&mut self, percent: u64) -> bool {
        self.below(100) < percent
    }
}

fn peers_of(rng: &mut Rng, cluster: &str) -> Vec<PeerGateway> {
    (0..rng.below(3))
        .map(|i| PeerGateway {
            cluster: cluster.into(),
            node: format!("gw{i}"),
            public_key: vec![u8::try_from(rng.below(256)).unwrap_or(0); 32],
            endpoints: vec![format!("192.0.2.{}:51820", rng.below(250))],
            tunnel_ip: format!("100.64.0.{}", i + 1),
        })
        .collect()
}

fn random_network(rng: &mut Rng, name: String) -> ViewNetwork {
    let mut net = ViewNetwork {
        name,
        vni: u32::try_from(4096 + rng.below(100)).unwrap_or(4096),
        mtu: 1390,
        ..ViewNetwork::default()
    };
    for c in 0..6 {
        if rng.chance(50) {
            let cluster = format!("c{c}");
            let m = MemberChange {
                peers: peers_of(rng, &cluster),
                cluster,
                left: false,
            };
            apply_member(&mut net, &m);
        }
    }
    net
}

fn random_delta(rng: &mut Rng, view: &ClusterView, base: u64) -> ViewDelta {
    let mut d = ViewDelta {
        base_revision: base,
        ..ViewDelta::default()
    };
    let mut names: Vec<String> = view.networks.iter().map(|n| n.name.clone()).collect();
    for n in &view.networks {
        if rng.chance(15) {
            d.removed_networks.push(n.name.clone());
        }
    }
    names.retain(|n| !d.removed_networks.contains(n));
    for _ in 0..rng.below(2) {
        let name = format!("n{}", rng.below(8));
        if !d.upserted_networks.iter().any(|n| n.name == name) {
            names.push(name.clone());
            d.upserted_networks.push(random_network(rng, name));
        }
    }
    names.sort();
    names.dedup();
    for name in names {
        if rng.chance(40) {
            let members = (0..rng.below(3))
                .map(|_| {
                    let cluster = format!("c{}", rng.below(6));
                    MemberChange {
                        left: rng.chance(30),
                        peers: peers_of(rng, &cluster),
                        cluster,
                    }
                })
                .collect();
            d.changed_networks.push(NetworkChange {
                network: name,
                members,
            });
        }
    }
    for i in 0..8 {
        let network = format!("n{i}");
        if rng.chance(10) {
            d.removed_admissions.push(network);
        } else if rng.chance(15) {
            d.admissions.push(Admission {
                network,
                state: AdmissionState::Admitted.into(),
                reason: format!("r{}", rng.below(3)),
            });
        }
    }
    d
}

fn delta_msg(rev: u64, d: ViewDelta) -> ClusterView {
    ClusterView {
        revision: rev,
        delta: Some(d),
        ..ClusterView::default()
    }
}

/// Applying two deltas one after the other and applying their merge give
/// the same view, over many random pairs.
#[test]
fn a_merged_delta_has_the_effect_of_both() {
    let seed = std::env::var("L2MESH_TEST_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(0x5eed);
    let mut rng = Rng(seed);
    for round in 0..500 {
        let mut held = Some(ClusterView {
            revision: 1,
            cluster_name: "me".into(),
            ..ClusterView::default()
        });
        let view = held.clone().unwrap();
        let a = random_delta(&mut rng, &view, 1);
        let mut mid = view.clone();
        // Member changes of a network `a` does not hold are invalid: skip.
        if apply_delta(&mut mid, &a).is_err() {
            continue;
        }
        let b = random_delta(&mut rng, &mid, 2);
        let mut one_by_one = held.clone();
        apply(&mut one_by_one, delta_msg(2, a.clone())).unwrap();
        if apply(&mut one_by_one, delta_msg(3, b.clone())).is_err() {
            continue;
        }
        apply(&mut held, delta_msg(3, merge(a.clone(), b.clone()))).unwrap();
        assert_eq!(
            held, one_by_one,
            "seed {seed} round {round}: merge of {a:?} and {b:?}"
        );
    }
}

#[test]
fn a_delta_needs_the_view_it_starts_from() {
    let mut held = None;
    let d = delta_msg(2, ViewDelta::default());
    assert_eq!(apply(&mut held, d.clone()), Err(ViewError::NoView));
    apply(
        &mut held,
        ClusterView {
            revision: 5,
            ..ClusterView::default()
        },
    )
    .unwrap();
    let err = apply(&mut held, d).unwrap_err();
    assert_eq!(err, ViewError::WrongBase { base: 0, held: 5 });
    assert_eq!(held.as_ref().map(|v| v.revision), Some(5), "unchanged");
}

#[test]
fn member_changes_keep_the_canonical_order() {
    let mut net = ViewNetwork::default();
    for c in ["c", "a", "b"] {
        apply_member(
            &mut net,
            &MemberChange {
                cluster: c.into(),
                left: false,
                peers: vec![PeerGateway {
                    cluster: c.into(),
                    ..PeerGateway::default()
                }],
            },
        );
    }
    assert_eq!(net.members, ["a", "b", "c"]);
    let order: Vec<&str> = net.peers.iter().map(|p| p.cluster.as_str()).collect();
    assert_eq!(order, ["a", "b", "c"]);
    apply_member(
        &mut net,
        &MemberChange {
            cluster: "b".into(),
            left: true,
            peers: vec![],
        },
    );
    assert_eq!(net.members, ["a", "c"]);
    assert_eq!(net.peers.len(), 2);
}

#[test]
fn a_delta_that_does_not_fit_changes_nothing() {
    let mut held = Some(ClusterView {
        revision: 1,
        networks: vec![ViewNetwork {
            name: "a".into(),
            ..ViewNetwork::default()
        }],
        ..ClusterView::default()
    });
    let before = held.clone();
    let bad = ViewDelta {
        base_revision: 1,
        removed_networks: vec!["a".into()],
        changed_networks: vec![NetworkChange {
            network: "b".into(),
            members: vec![],
        }],
        ..ViewDelta::default()
    };
    let err = apply(&mut held, delta_msg(2, bad)).unwrap_err();
    assert_eq!(err, ViewError::UnknownNetwork("b".into()));
    assert_eq!(held, before);
}
