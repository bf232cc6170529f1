use super::*;
use crate::model::Gateway;
use prost::Message;
use std::collections::{BTreeMap, BTreeSet, HashMap};

fn gw(node: &str, key: u8, ip: &str) -> Gateway {
    Gateway {
        node: node.into(),
        public_key: vec![key; 32],
        endpoints: vec![format!("192.0.2.{key}:51820")],
        tunnel_ip: ip.parse().unwrap(),
    }
}

fn world() -> State {
    let mut s = State::default();
    for (i, n) in ["a", "b", "c"].iter().enumerate() {
        let id = format!("t{i}");
        s.create_token(n, id.clone(), "sec", 60, 1, 0).unwrap();
        s.join(&id, "sec", n, [i as u8; 32], 1).unwrap();
        s.report_gateways(n, vec![gw("gw", i as u8 + 1, &format!("100.64.{i}.1"))])
            .unwrap();
    }
    s.create_network(
        "blue",
        0,
        0,
        "10.1.0.0/16",
        vec!["a".into(), "b".into()],
        false,
        0,
    )
    .unwrap();
    s.create_network("red", 0, 0, "", vec!["b".into(), "c".into()], false, 0)
        .unwrap();
    s.request_networks("a", vec!["blue".into(), "red".into()])
        .unwrap();
    s.request_networks("b", vec!["blue".into(), "red".into()])
        .unwrap();
    s.request_networks("c", vec!["red".into()]).unwrap();
    s
}

#[test]
fn a_cluster_sees_only_its_admitted_networks_and_their_peers() {
    let s = world();
    let a = compute(&s, "a").unwrap();
    assert_eq!(a.tunnel_subnet, "100.64.0.0/24");
    assert_eq!(a.networks.len(), 1, "{a:?}");
    let blue = &a.networks[0];
    assert_eq!(blue.name, "blue");
    assert_eq!(blue.members, vec!["a".to_string(), "b".to_string()]);
    assert_eq!(blue.peers.len(), 1);
    assert_eq!(blue.peers[0].cluster, "b");
    assert_eq!(blue.cluster_cidr, "10.1.0.0/24");
    // Not allowed on red: answered like an unknown network, and nothing
    // about red's members or peers.
    let red = a.admissions.iter().find(|x| x.network == "red").unwrap();
    assert_eq!(red.state(), pb::AdmissionState::UnknownNetwork);
    let text = format!("{a:?}");
    assert!(!text.contains("\"c\""), "a must not learn of c: {text}");

    let c = compute(&s, "c").unwrap();
    assert_eq!(c.networks.len(), 1);
    assert_eq!(c.networks[0].name, "red");
    assert_eq!(c.networks[0].peers[0].cluster, "b");
    assert!(!format!("{c:?}").contains("blue"));
    assert!(compute(&s, "nobody").is_none());
}

/// Commit-like step: apply `op`, move the views, return the changes.
fn step(
    s: &mut State,
    op: impl FnOnce(&mut State) -> BTreeSet<String>,
) -> HashMap<String, (u64, Option<pb::ViewDelta>)> {
    let old = s.clone();
    let affected = op(s);
    advance(&old, s, &affected)
}

fn all(s: &mut State) -> BTreeSet<String> {
    s.clusters.keys().cloned().collect()
}

#[test]
fn revisions_move_only_for_changed_views_and_deltas_are_small() {
    let mut s = world();
    let again = step(&mut s, all);
    assert!(again.is_empty(), "nothing changed: {again:?}");
    // Key rotation at c: b sees it on red; a asked for red but is not
    // allowed there, so its view stays; c's own view has no own peers.
    let before_b = s.clusters["b"].view_rev;
    let moved = step(&mut s, |s| {
        s.report_gateways("c", vec![gw("gw", 77, "100.64.2.1")])
            .unwrap()
    });
    assert_eq!(moved.keys().collect::<Vec<_>>(), vec!["b"], "{moved:?}");
    let (rev, delta) = &moved["b"];
    assert!(*rev > before_b);
    let delta = delta.as_ref().unwrap();
    assert_eq!(delta.base_revision, before_b);
    assert!(delta.upserted_networks.is_empty(), "{delta:?}");
    assert_eq!(delta.changed_networks.len(), 1);
    let change = &delta.changed_networks[0];
    assert_eq!(change.network, "red");
    assert_eq!(change.members.len(), 1);
    assert_eq!(change.members[0].cluster, "c");
    assert_eq!(change.members[0].peers[0].public_key, vec![77; 32]);
    let b = compute(&s, "b").unwrap();
    assert_eq!(b.revision, *rev);
}

#[test]
fn a_new_cluster_starts_fresh_and_a_removed_one_is_gone() {
    let mut s = world();
    s.create_token("d", "td".into(), "sec", 60, 1, 0).unwrap();
    let moved = step(&mut s, |s| {
        s.join("td", "sec", "d", [9; 32], 1).unwrap();
        BTreeSet::from(["d".to_string()])
    });
    assert!(matches!(moved.get("d"), Some((_, None))), "{moved:?}");
    let moved = step(&mut s, |s| s.remove_cluster("c", 2).unwrap().1);
    assert!(!moved.contains_key("c"));
    // b saw c leave red.
    let d = moved["b"].1.as_ref().unwrap();
    assert_eq!(d.changed_networks[0].members[0].cluster, "c");
    assert!(d.changed_networks[0].members[0].left);
}

/// One random change to the state (errors are part of the game: a refused
/// change changes nothing).
fn random_change(rng: &mut impl rand::Rng, s: &mut State, round: usize) -> BTreeSet<String> {
    let cluster = format!("k{}", rng.gen_range(0..6));
    let net = format!("n{}", rng.gen_range(0..4));
    let none = BTreeSet::new();
    match rng.gen_range(0..10) {
        0 => {
            let id = format!("tok{round}");
            let _ = s.create_token(&cluster, id.clone(), "sec", 60, 1, 0);
            s.join(
                &id,
                "sec",
                &cluster,
                [u8::try_from(round % 250).unwrap(); 32],
                1,
            )
            .map_or(none, |_| BTreeSet::from([cluster]))
        }
        1 => {
            let allowed: Vec<String> = (0..6)
                .filter(|_| rng.gen_bool(0.6))
                .map(|i| format!("k{i}"))
                .collect();
            let cidr = if rng.gen_bool(0.5) { "10.9.0.0/28" } else { "" };
            let all = allowed.is_empty();
            s.create_network(&net, 0, 0, cidr, allowed, all, 0)
                .map_or(none, |x| x.1)
        }
        2 => s.delete_network(&net).map_or(none, |x| x.1),
        3 => s.remove_cluster(&cluster, 0).map_or(none, |x| x.1),
        4..=6 => {
            let nets: Vec<String> = (0..4)
                .filter(|_| rng.gen_bool(0.5))
                .map(|i| format!("n{i}"))
                .collect();
            s.request_networks(&cluster, nets).unwrap_or(none)
        }
        _ => {
            let Some(c) = s.clusters.get(&cluster) else {
                return none;
            };
            let base = u32::from(tunnel_subnet(c.subnet_index).network());
            let k: u8 = rng.gen_range(10..200);
            let gws = (0..rng.gen_range(0..3u32))
                .map(|i| {
                    let mut g = gw(
                        &format!("gw{i}"),
                        k,
                        &std::net::Ipv4Addr::from(base + 1 + i).to_string(),
                    );
                    g.public_key[0] = u8::try_from(c.subnet_index).unwrap();
                    g.public_key[1] = u8::try_from(i).unwrap();
                    g.endpoints = vec![format!("192.0.{}.{k}:{}", c.subnet_index, 1000 + i)];
                    g
                })
                .collect();
            s.report_gateways(&cluster, gws).unwrap_or(none)
        }
    }
}

/// The core promise of the watch protocol: after any sequence of changes,
/// a client that applied the deltas (one by one, or merged by the hub
/// after falling behind, or a snapshot when the hub no longer holds them)
/// holds exactly the snapshot the broker would send.
#[test]
fn deltas_applied_in_any_grouping_equal_the_snapshot() {
    use crate::hub::Published;
    use rand::SeedableRng as _;
    let seed = std::env::var("L2MESH_TEST_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(rand::random::<u64>);
    eprintln!("L2MESH_TEST_SEED={seed}");
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    for sequence in 0..40 {
        let mut s = State::default();
        let mut published: HashMap<String, Published> = HashMap::new();
        let mut clients: HashMap<String, Option<pb::ClusterView>> = HashMap::new();
        for round in 0..60 {
            let old = s.clone();
            // Sometimes several changes share one commit.
            let mut affected = BTreeSet::new();
            for _ in 0..rand::Rng::gen_range(&mut rng, 1..3) {
                affected.extend(random_change(&mut rng, &mut s, round));
            }
            assert!(
                s.indexes_match_records(),
                "seed {seed} seq {sequence} round {round}"
            );
            let moved = advance(&old, &mut s, &affected);
            // A replica that only sees the two states finds the same
            // revisions and deltas (where it cannot tell a cluster that was
            // removed and joined again, a delta no client can use is fine).
            let followed = follow(&old, &s);
            assert_eq!(
                followed
                    .iter()
                    .map(|(k, v)| (k, v.0))
                    .collect::<BTreeMap<_, _>>(),
                moved
                    .iter()
                    .map(|(k, v)| (k, v.0))
                    .collect::<BTreeMap<_, _>>(),
                "seed {seed} seq {sequence} round {round}"
            );
            for (name, (_, delta)) in &moved {
                if delta.is_some() {
                    assert_eq!(&followed[name].1, delta, "seed {seed}: {name}");
                }
            }
            for (name, (rev, delta)) in moved {
                published.entry(name).or_default().advance(rev, delta);
            }
            published.retain(|n, _| s.clusters.contains_key(n));
            clients.retain(|n, _| s.clusters.contains_key(n));
            // Each client catches up now or later, as a watcher would.
            for (name, p) in &published {
                if rand::Rng::gen_bool(&mut rng, 0.4) {
                    continue;
                }
                let held = clients.entry(name.clone()).or_default();
                let at = held.as_ref().map_or(0, |v| v.revision);
                if at != p.revision {
                    let msg = match p.since(at) {
                        Some(delta) => pb::ClusterView {
                            revision: p.revision,
                            cluster_name: name.clone(),
                            delta: Some(delta),
                            ..pb::ClusterView::default()
                        },
                        None => compute(&s, name).unwrap(),
                    };
                    l2mesh_proto::view::apply(held, msg).unwrap_or_else(|e| {
                        panic!("seed {seed} seq {sequence} round {round}: {e}")
                    });
                }
                // Also when nothing was sent: a view that changed without a
                // new revision would stay stale here.
                let want = compute(&s, name).unwrap();
                assert_eq!(
                    held.as_ref(),
                    Some(&want),
                    "seed {seed} seq {sequence} round {round}: {name}"
                );
            }
        }
    }
}

#[test]
fn view_size_bound_is_an_upper_bound_of_the_encoding() {
    let s = world();
    for name in ["a", "b", "c"] {
        let len = compute(&s, name).unwrap().encoded_len();
        let one = BTreeSet::from([name.to_string()]);
        assert!(check_bounded(&s, &one, len + 11).is_ok(), "{name}");
        let err = check_bounded(&s, &one, len - 1).unwrap_err();
        assert!(err.to_string().contains(name), "{err}");
    }
}

#[test]
fn a_change_shares_what_it_did_not_touch() {
    let s = world();
    let mut t = s.clone();
    t.report_gateways("c", vec![gw("gw", 99, "100.64.2.1")])
        .unwrap();
    assert!(s.tokens.ptr_eq(&t.tokens), "tokens are shared, not copied");
    assert!(s.networks.ptr_eq(&t.networks));
    assert!(!s.clusters.ptr_eq(&t.clusters));
    assert_eq!(s.clusters["a"], t.clusters["a"]);
}

#[test]
fn a_large_network_arriving_whole_comes_as_a_snapshot() {
    let mut s = State::default();
    let n = DELTA_MAX_MEMBERS + 2;
    for i in 0..n {
        let name = format!("k{i}");
        s.create_token(&name, format!("t{i}"), "sec", 60, 1, 0)
            .unwrap();
        s.join(&format!("t{i}"), "sec", &name, [1; 32], 1).unwrap();
        s.request_networks(&name, vec!["big".into(), "small".into()])
            .unwrap();
    }
    let all_names: BTreeSet<String> = s.clusters.keys().cloned().collect();
    let _ = step(&mut s, |_| all_names.clone());
    let moved = step(&mut s, |s| {
        s.create_network("small", 0, 0, "", vec!["k0".into(), "k1".into()], false, 0)
            .unwrap()
            .1
    });
    assert!(
        moved["k0"]
            .1
            .as_ref()
            .is_some_and(|d| d.upserted_networks.len() == 1),
        "a small network comes whole in a delta"
    );
    let moved = step(&mut s, |s| {
        s.create_network("big", 0, 0, "", vec![], true, 0)
            .unwrap()
            .1
    });
    assert_eq!(moved.len(), n);
    assert!(moved.values().all(|(_, d)| d.is_none()), "snapshots");
}
