//! What applying a desired state costs when it differs in one peer, next to
//! applying the whole state: the benchmark (ignored, prints figures) and
//! the check that such an apply works on that peer only.
//!
//! ```sh
//! cargo test --release -p l2mesh-dataplane apply_cost -- --ignored --nocapture
//! ```

use l2mesh_proto::node::{DesiredState, NetworkSpec, NodeIdentity, PeerGroup, PeerSpec};
use prost::Message as _;

use super::tests::secret;
use super::*;
use crate::config::Diff;

/// A desired state with `peers` peers, each a member of all `vnis` networks.
fn big_state(peers: u32, vnis: u32) -> DesiredState {
    DesiredState {
        revision: 1,
        identity: Some(NodeIdentity {
            node_name: "node-0".into(),
            tunnel_ip: "100.64.0.1".into(),
            listen_port: 0,
        }),
        networks: (1..=vnis)
            .map(|v| NetworkSpec {
                name: format!("net-{v}"),
                vni: 1000 + v,
                mtu: 1390,
                pod_cidr: String::new(),
            })
            .collect(),
        peers: (1..=peers)
            .map(|i| {
                let key = PublicKey::from(&StaticSecret::from(seed(i)));
                PeerSpec {
                    public_key: key.as_bytes().to_vec(),
                    endpoint: format!("10.{}.{}.{}:51820", i >> 16, (i >> 8) & 0xff, i & 0xff),
                    tunnel_ip: format!("100.{}.{}.{}", 64 + (i >> 16), (i >> 8) & 0xff, i & 0xff),
                    vnis: (1..=vnis).map(|v| 1000 + v).collect(),
                    group: PeerGroup::Local.into(),
                    persistent_keepalive: 0,
                    name: format!("node-{i}"),
                }
            })
            .collect(),
    }
}

fn seed(i: u32) -> [u8; 32] {
    let mut s = [7u8; 32];
    s[1..5].copy_from_slice(&i.to_le_bytes());
    s
}

/// The same state with peer #`index` moved to another endpoint.
fn one_peer_moved(d: &DesiredState, index: usize) -> DesiredState {
    let mut d = d.clone();
    d.revision += 1;
    d.peers[index].endpoint = format!("192.0.2.{}:51820", d.revision % 250);
    d
}

/// Seconds of each step of an apply as the daemon runs it (the device
/// steps aside: they depend only on the networks, which do not change).
#[derive(Debug, Default, Clone, Copy)]
struct Steps {
    validate: f64,
    diff: f64,
    engine: f64,
    encode: f64,
}

/// One apply as the daemon runs it; the seconds of each step and the
/// engine's work.
/// `whole_diff`: as the daemon did before, compare against a clone of the
/// whole applied state and look at every peer for handshakes to start.
fn timed_apply(e: &Engine, d: &DesiredState, whole_diff: bool) -> (Steps, ApplyWork) {
    let t = Instant::now();
    let cfg = Config::from_desired(d).unwrap();
    let validate = t.elapsed().as_secs_f64();
    let t = Instant::now();
    if whole_diff {
        let current = e.config();
        let _ = Diff::between(&current, &cfg);
    } else {
        let current = e.config_without_peers();
        let _ = Diff::networks_between(&current, &cfg);
    }
    let diff = t.elapsed().as_secs_f64();
    let t = Instant::now();
    let (applied, work) = e.apply_counted(cfg);
    let mut out = Vec::new();
    if whole_diff {
        e.initiate_pending_handshakes(&mut Buffers::default(), &mut out);
    } else {
        e.initiate_handshakes_for(&applied.peers_added, &mut Buffers::default(), &mut out);
    }
    let engine = t.elapsed().as_secs_f64();
    let t = Instant::now();
    let bytes = d.encode_to_vec();
    assert!(!bytes.is_empty());
    let encode = t.elapsed().as_secs_f64();
    (
        Steps {
            validate,
            diff,
            engine,
            encode,
        },
        work,
    )
}

fn ms(s: f64) -> String {
    format!("{:.3}", s * 1e3)
}

#[test]
#[ignore = "timing; run in release with --ignored --nocapture"]
fn apply_cost_full_state_vs_one_peer_changed() {
    println!(
        "| peers x VNIs | apply | validate ms | devices diff ms | engine ms | encode ms | total ms | engine work |"
    );
    println!("|---|---|---|---|---|---|---|---|");
    for (peers, vnis) in [(1000, 1), (1000, 20), (5000, 20)] {
        let full = big_state(peers, vnis);
        let e = Engine::new(secret(1));
        let first = timed_apply(&e, &full, false);
        let mut rows = vec![("whole state, new node", first)];
        // Best of five one-peer changes, each to a fresh endpoint.
        let mut d = full.clone();
        for (what, whole_diff) in [
            ("one peer changed", false),
            ("one peer changed, whole-state diff", true),
        ] {
            let mut best: Option<(f64, (Steps, ApplyWork))> = None;
            for i in 0..5 {
                d = one_peer_moved(&d, 17 * i + 3);
                let r = timed_apply(&e, &d, whole_diff);
                let s = r.0;
                let total = s.validate + s.diff + s.engine + s.encode;
                if best.is_none_or(|(b, _)| total < b) {
                    best = Some((total, r));
                }
            }
            let Some((_, one)) = best else { unreachable!() };
            rows.push((what, one));
        }
        for (what, (s, w)) in rows {
            println!(
                "| {peers} x {vnis} | {what} | {} | {} | {} | {} | {} | {} tunnels made, {} updated |",
                ms(s.validate),
                ms(s.diff),
                ms(s.engine),
                ms(s.encode),
                ms(s.validate + s.diff + s.engine + s.encode),
                w.tunnels_created,
                w.peers_updated
            );
        }
    }
}

/// Learns one MAC behind every peer in every VNI it is a member of.
fn learn_macs(e: &Engine) {
    let st = e.read();
    let mut switch = lock(&e.switch);
    let now = Instant::now();
    for (&id, cell) in st.peers.iter() {
        for &vni in &lock(cell).cfg.vnis {
            let mut f = vec![0xff; 6];
            f.extend_from_slice(&[2, 0, 0, 0, 0, 0]);
            f[8..12].copy_from_slice(&id.to_be_bytes());
            f.extend_from_slice(&[0x08, 0x00]);
            f.resize(60, 0);
            switch.from_peer(id, vni, &f, now).unwrap();
        }
    }
}

fn mac_count(e: &Engine) -> usize {
    let st = e.read();
    st.cfg
        .networks
        .values()
        .map(|n| lock(&e.switch).macs(n.vni, Instant::now()).len())
        .sum()
}

#[test]
fn an_apply_that_differs_in_one_peer_works_on_that_peer_only() {
    const PEERS: u32 = 200;
    const VNIS: u32 = 4;
    let mut d = big_state(PEERS, VNIS);
    let e = Engine::new(secret(1));
    let (_, work) = e.apply_counted(Config::from_desired(&d).unwrap());
    assert_eq!(work.tunnels_created, PEERS as usize);
    learn_macs(&e);
    assert_eq!(mac_count(&e), (PEERS * VNIS) as usize);

    // The same state again: nothing to do.
    let (diff, work) = e.apply_counted(Config::from_desired(&d).unwrap());
    assert!(diff.is_empty());
    assert_eq!(work, ApplyWork::default());

    // One peer moves: one peer updated, no tunnel made, no MAC table read.
    d = one_peer_moved(&d, 7);
    let (diff, work) = e.apply_counted(Config::from_desired(&d).unwrap());
    assert_eq!(diff.peers_changed.len(), 1);
    assert_eq!(
        work,
        ApplyWork {
            peers_updated: 1,
            ..ApplyWork::default()
        }
    );

    // One peer leaves a VNI: only that VNI's table is scanned, and only
    // the MAC behind that peer goes.
    d.revision += 1;
    d.peers[9].vnis.retain(|v| *v != 1001);
    let (_, work) = e.apply_counted(Config::from_desired(&d).unwrap());
    assert_eq!(work.peers_updated, 1);
    assert_eq!(work.mac_entries_scanned, PEERS as usize);
    assert_eq!(mac_count(&e), (PEERS * VNIS) as usize - 1);

    // One peer removed and one added: one tunnel each, the removed peer's
    // VNIs scanned once.
    d.revision += 1;
    let gone = d.peers.remove(20);
    let mut new_peer = gone.clone();
    new_peer.public_key = PublicKey::from(&StaticSecret::from(seed(PEERS + 1)))
        .as_bytes()
        .to_vec();
    new_peer.tunnel_ip = "100.65.0.1".into();
    d.peers.push(new_peer.clone());
    let (diff, work) = e.apply_counted(Config::from_desired(&d).unwrap());
    assert_eq!(
        (
            diff.peers_added.len(),
            diff.peers_removed.len(),
            diff.peers_changed.len()
        ),
        (1, 1, 0)
    );
    assert_eq!(work.tunnels_created, 1);
    assert_eq!(work.tunnels_removed, 1);
    assert_eq!(work.peers_updated, 0);
    assert!(work.mac_entries_scanned <= (PEERS * VNIS) as usize);
    assert_eq!(mac_count(&e), (PEERS * VNIS) as usize - 1 - VNIS as usize);
    // Only the new peer gets a handshake initiation.
    let mut out = Vec::new();
    e.initiate_handshakes_for(&diff.peers_added, &mut Buffers::default(), &mut out);
    assert_eq!(out.len(), 1, "{out:?}");
}
