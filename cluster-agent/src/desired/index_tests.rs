//! The index equals the full plan after any sequence of changes, and
//! recomputes only the states a change reaches.

use super::*;
use crate::crd::Scope;
use crate::desired::{ClusterPlan, ProblemKind, plan};
use l2mesh_proto::broker::PeerGateway;
use rand::{Rng as _, SeedableRng as _};

fn subnet() -> Ipv4Net {
    "100.64.0.0/24".parse().unwrap()
}

fn node(i: usize, gateway: bool) -> NodeEntry {
    NodeEntry {
        name: format!("n{i}"),
        gateway,
        endpoint: gateway.then(|| format!("192.0.2.{i}:51820")),
    }
}

fn hello(key: u8, port: u16) -> Hello {
    Hello {
        public_key: vec![key; 32],
        listen_port: 51820,
        endpoints: vec![format!("198.51.100.{key}:{port}")],
    }
}

fn remote(cluster: usize, port: u16) -> PeerGateway {
    PeerGateway {
        cluster: format!("c{cluster}"),
        node: "gw".into(),
        public_key: vec![100 + u8::try_from(cluster).unwrap(); 32],
        endpoints: vec![format!("203.0.113.{cluster}:{port}")],
        tunnel_ip: format!("100.65.0.{cluster}"),
    }
}

fn outcome(i: usize, multi: bool, vni: Option<u32>) -> NetworkOutcome {
    NetworkOutcome {
        key: format!("default/net{i}"),
        name: format!("net{i}"),
        scope: if multi {
            Scope::MultiCluster
        } else {
            Scope::Local
        },
        mtu: 1390,
        vni,
        cluster_range: Some(format!("10.{i}.0.0/24").parse().unwrap()),
        range: None,
        node_slice_prefix: Some(28),
        admission: None,
        broker_refusal: None,
        problem: None,
        problem_kind: ProblemKind::Invalid,
        attach_problem: None,
        members: vec![],
        remote_peers: if multi {
            vec![remote(1, 51820), remote(2, 51820)]
        } else {
            vec![]
        },
    }
}

struct World {
    nodes: Vec<NodeEntry>,
    hellos: BTreeMap<String, Hello>,
    nets: Vec<NetworkOutcome>,
}

impl World {
    fn new() -> Self {
        let nodes: Vec<NodeEntry> = (0..6).map(|i| node(i, i < 2)).collect();
        let hellos = (0..5)
            .map(|i| (format!("n{i}"), hello(u8::try_from(i).unwrap(), 1)))
            .collect();
        Self {
            nodes,
            hellos,
            nets: vec![outcome(0, false, Some(1)), outcome(1, true, Some(5000))],
        }
    }
}

fn full(w: &World, allocs: &mut Allocations) -> ClusterPlan {
    plan(&w.nodes, &w.hellos, &w.nets, subnet(), allocs)
}

fn sorted(mut v: Vec<String>) -> Vec<String> {
    v.sort();
    v
}

/// One random change to the world.
fn mutate(w: &mut World, rng: &mut rand::rngs::StdRng) {
    match rng.gen_range(0..10) {
        0 => {
            let i = rng.gen_range(0..10);
            if let Some(pos) = w.nodes.iter().position(|n| n.name == format!("n{i}")) {
                w.nodes.remove(pos);
            } else {
                w.nodes.push(node(i, rng.gen_bool(0.3)));
            }
        }
        1 => {
            if !w.nodes.is_empty() {
                let i = rng.gen_range(0..w.nodes.len());
                w.nodes[i].gateway = !w.nodes[i].gateway;
            }
        }
        2 | 3 => {
            let i = rng.gen_range(0..10);
            let name = format!("n{i}");
            if rng.gen_bool(0.2) {
                w.hellos.remove(&name);
            } else {
                let key = u8::try_from(i).unwrap() + 10 * rng.gen_range(0..2);
                w.hellos.insert(name, hello(key, rng.gen_range(1..3)));
            }
        }
        4 => {
            let i = rng.gen_range(0..5);
            if let Some(pos) = w.nets.iter().position(|n| n.name == format!("net{i}")) {
                w.nets.remove(pos);
            } else {
                let multi = rng.gen_bool(0.5);
                let vni = if multi { 5000 + i } else { 1 + i };
                w.nets
                    .push(outcome(i, multi, Some(u32::try_from(vni).unwrap())));
                w.nets.sort_by(|a, b| a.key.cmp(&b.key));
            }
        }
        5 => {
            if let Some(n) = w.nets.first_mut() {
                n.vni = if n.vni.is_some() { None } else { Some(7) };
            }
        }
        6 | 7 => {
            for n in w.nets.iter_mut().filter(|n| n.scope == Scope::MultiCluster) {
                let port = rng.gen_range(51820..51823);
                n.remote_peers = vec![remote(1, port), remote(3, 51820)];
            }
        }
        8 => {
            if let Some(n) = w.nets.last_mut() {
                n.mtu = if n.mtu == 1390 { 1380 } else { 1390 };
            }
        }
        _ => {
            if !w.nodes.is_empty() {
                let i = rng.gen_range(0..w.nodes.len());
                w.nodes[i].endpoint = Some(format!("192.0.2.{}:{}", i, rng.gen_range(1..3)));
            }
        }
    }
}

#[test]
fn the_index_equals_the_full_plan_after_random_changes() {
    for seed in 0..40 {
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
        let mut w = World::new();
        let (mut a, mut b) = (Allocations::default(), Allocations::default());
        let mut index = DesiredIndex::default();
        for step in 0..60 {
            let before = index.states().clone();
            let update = index.update(&w.nodes, &w.hellos, &w.nets, subnet(), &mut a);
            let p = full(&w, &mut b);
            assert_eq!(index.states(), &p.nodes, "seed {seed} step {step}");
            assert_eq!(a, b, "allocations, seed {seed} step {step}");
            assert_eq!(index.gateways(), p.gateways.as_slice());
            assert_eq!(sorted(index.problems()), sorted(p.problems.clone()));
            for (name, state) in index.states() {
                if before.get(name) != Some(state) {
                    assert!(
                        update.recomputed.contains(name),
                        "seed {seed} step {step}: {name} changed but was not reported"
                    );
                }
            }
            for name in before.keys().filter(|n| !index.states().contains_key(*n)) {
                assert!(update.removed.contains(name), "{name} removed silently");
            }
            mutate(&mut w, &mut rng);
        }
    }
}

fn update(index: &mut DesiredIndex, w: &World, allocs: &mut Allocations) -> IndexUpdate {
    index.update(&w.nodes, &w.hellos, &w.nets, subnet(), allocs)
}

#[test]
fn each_change_recomputes_only_the_states_it_reaches() {
    let mut w = World::new();
    let mut allocs = Allocations::default();
    let mut index = DesiredIndex::default();
    let first = update(&mut index, &w, &mut allocs);
    assert_eq!(first.recomputed.len(), 6, "every node's first state");

    let same = update(&mut index, &w, &mut allocs);
    assert!(same.recomputed.is_empty(), "no change, nothing recomputed");

    // A node's new key: its entry in every other node's state.
    w.hellos.insert("n3".into(), hello(33, 1));
    let rotated = update(&mut index, &w, &mut allocs);
    assert_eq!(
        rotated.recomputed,
        ["n0", "n1", "n2", "n4", "n5"]
            .into_iter()
            .map(String::from)
            .collect()
    );

    // A remote gateway moves: the active gateway's state only.
    w.nets[1].remote_peers = vec![remote(1, 51821), remote(2, 51820)];
    let moved = update(&mut index, &w, &mut allocs);
    assert_eq!(
        moved.recomputed,
        BTreeSet::from(["n0".to_owned()]),
        "n0 is the active gateway"
    );

    // A network added: every node carries it.
    w.nets.push(outcome(2, false, Some(2)));
    let added = update(&mut index, &w, &mut allocs);
    assert_eq!(added.recomputed.len(), 6);

    // A node leaves: its entry leaves the others' states.
    w.nodes.retain(|n| n.name != "n5");
    let left = update(&mut index, &w, &mut allocs);
    assert_eq!(left.removed, BTreeSet::from(["n5".to_owned()]));
    assert!(
        left.recomputed.is_empty(),
        "n5 never said hello: no state lists it"
    );
}
