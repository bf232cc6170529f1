use super::*;
use crate::config::{NetConfig, PeerConfig};
use crate::switch::Group;
use std::collections::BTreeSet;

pub(super) const VNI: u32 = 100;

pub(super) fn secret(n: u8) -> StaticSecret {
    StaticSecret::from([n; 32])
}

pub(super) fn pubkey(n: u8) -> [u8; 32] {
    *PublicKey::from(&secret(n)).as_bytes()
}

pub(super) fn addr(n: u8) -> SocketAddr {
    SocketAddr::from(([192, 0, 2, n], 51820))
}

pub(super) fn tip(n: u8) -> Ipv4Addr {
    Ipv4Addr::new(100, 64, 0, n)
}

pub(super) fn peer(n: u8, group: Group, vnis: &[u32]) -> PeerConfig {
    PeerConfig {
        key: pubkey(n),
        name: format!("node{n}"),
        endpoint: Some(addr(n)),
        tunnel_ip: tip(n),
        vnis: vnis.iter().copied().collect::<BTreeSet<_>>(),
        group,
        keepalive: None,
    }
}

pub(super) fn config(me: u8, peers: Vec<PeerConfig>) -> Config {
    let mut c = Config {
        revision: 1,
        node_name: format!("node{me}"),
        tunnel_ip: Some(tip(me)),
        ..Config::default()
    };
    for vni in [VNI, VNI + 1] {
        c.networks.insert(
            format!("net{vni}"),
            NetConfig {
                name: format!("net{vni}"),
                vni,
                mtu: 1390,
                pod_cidr: String::new(),
            },
        );
    }
    for p in peers {
        c.peers.insert(p.key, p);
    }
    c
}

pub(super) fn frame(dst: [u8; 6], src: u8, marker: u8) -> Vec<u8> {
    let mut f = dst.to_vec();
    f.extend_from_slice(&[2, 0, 0, 0, 0, src, 0x08, 0x00]);
    f.resize(100, marker);
    f
}

/// A little network of engines that delivers each other's datagrams.
pub(super) struct Net {
    nodes: Vec<(u8, Engine)>,
    taps: Vec<(u8, u32, Vec<u8>)>,
}

impl Net {
    fn run(&mut self, mut pending: Vec<(u8, Output)>) {
        let now = Instant::now();
        let mut rounds = 0;
        while let Some((from, o)) = pending.pop() {
            rounds += 1;
            assert!(rounds < 1000, "forwarding loop");
            match o {
                Output::Tap { vni, frame } => self.taps.push((from, vni, frame)),
                Output::Udp { to, data } => {
                    let Some((n, e)) = self.nodes.iter_mut().find(|(n, _)| addr(*n) == to) else {
                        continue;
                    };
                    let mut out = Vec::new();
                    e.handle_datagram(addr(from), &data, now, &mut Buffers::default(), &mut out);
                    let n = *n;
                    pending.extend(out.into_iter().map(|o| (n, o)));
                }
            }
        }
    }

    pub(super) fn send_tap(&mut self, node: u8, vni: u32, f: &[u8]) {
        let mut out = Vec::new();
        let e = &mut self.nodes.iter_mut().find(|(n, _)| *n == node).unwrap().1;
        e.handle_tap(vni, f, Instant::now(), &mut Buffers::default(), &mut out);
        self.run(out.into_iter().map(|o| (node, o)).collect());
    }

    fn tick(&mut self, node: u8) {
        let mut out = Vec::new();
        self.engine_mut(node)
            .tick(Instant::now(), &mut Buffers::default(), &mut out);
        self.run(out.into_iter().map(|o| (node, o)).collect());
    }

    pub(super) fn engine(&self, node: u8) -> &Engine {
        &self.nodes.iter().find(|(n, _)| *n == node).unwrap().1
    }

    fn engine_mut(&mut self, node: u8) -> &mut Engine {
        &mut self.nodes.iter_mut().find(|(n, _)| *n == node).unwrap().1
    }
}

pub(super) fn pair() -> Net {
    let a = Engine::new(secret(1));
    a.apply(config(1, vec![peer(2, Group::Local, &[VNI])]));
    let b = Engine::new(secret(2));
    b.apply(config(2, vec![peer(1, Group::Local, &[VNI])]));
    Net {
        nodes: vec![(1, a), (2, b)],
        taps: vec![],
    }
}

#[test]
fn frames_cross_after_the_handshake_both_ways() {
    let mut net = pair();
    net.send_tap(1, VNI, &frame([0xff; 6], 1, 0xaa));
    assert_eq!(
        net.taps,
        vec![(2, VNI, frame([0xff; 6], 1, 0xaa))],
        "queued frame delivered after handshake"
    );
    net.taps.clear();
    net.send_tap(2, VNI, &frame([2, 0, 0, 0, 0, 1], 2, 0xbb));
    assert_eq!(net.taps, vec![(1, VNI, frame([2, 0, 0, 0, 0, 1], 2, 0xbb))]);
    let a = net.engine(1);
    let p = &a.peers()[0];
    assert!(p.last_handshake.is_some());
    assert!(p.stats.rx_packets > 0 && p.stats.tx_packets > 0);
    assert_eq!(a.macs(VNI, Instant::now()).len(), 2);
}

#[test]
fn network_the_peer_is_not_in_is_not_sent_and_is_dropped_on_receive() {
    let mut net = pair();
    net.send_tap(1, VNI, &frame([0xff; 6], 1, 1));
    net.taps.clear();
    // B thinks A is a member of VNI+1, A does not: A must drop and count.
    let mut cfg = net.engine(2).config();
    cfg.peers.get_mut(&pubkey(1)).unwrap().vnis.insert(VNI + 1);
    net.engine_mut(2).apply(cfg);
    net.send_tap(2, VNI + 1, &frame([0xff; 6], 2, 2));
    assert!(net.taps.is_empty());
    assert_eq!(
        net.engine(1).peers()[0].stats.drops.get("vni_not_member"),
        Some(&1)
    );
    // And A never sends VNI+1 to B.
    let mut out = Vec::new();
    net.engine_mut(1).handle_tap(
        VNI + 1,
        &frame([0xff; 6], 1, 3),
        Instant::now(),
        &mut Buffers::default(),
        &mut out,
    );
    assert!(out.is_empty());
}

#[test]
fn unknown_keys_garbage_and_replays_are_counted_not_delivered() {
    let mut net = pair();
    // A stranger (key 9) tries to handshake with A.
    let stranger = Engine::new(secret(9));
    stranger.apply(config(9, vec![peer(1, Group::Local, &[VNI])]));
    let mut out = Vec::new();
    stranger.handle_tap(
        VNI,
        &frame([0xff; 6], 9, 0),
        Instant::now(),
        &mut Buffers::default(),
        &mut out,
    );
    let Output::Udp { data, .. } = &out[0] else {
        panic!("handshake expected")
    };
    let mut none = Vec::new();
    net.engine_mut(1).handle_datagram(
        addr(9),
        data,
        Instant::now(),
        &mut Buffers::default(),
        &mut none,
    );
    assert!(none.is_empty());
    assert_eq!(net.engine(1).drops().get("unknown_key"), Some(&1));
    // Garbage.
    for junk in [
        &[][..],
        &[1, 0, 0, 0][..],
        &[4, 0, 0, 0, 1, 2, 3][..],
        &[0xff; 200][..],
    ] {
        net.engine_mut(1).handle_datagram(
            addr(9),
            junk,
            Instant::now(),
            &mut Buffers::default(),
            &mut none,
        );
    }
    assert!(none.is_empty());
    // Replay: capture a data packet from B to A and deliver it twice.
    net.send_tap(1, VNI, &frame([0xff; 6], 1, 0));
    net.taps.clear();
    let mut out = Vec::new();
    net.engine_mut(2).handle_tap(
        VNI,
        &frame([0xff; 6], 2, 7),
        Instant::now(),
        &mut Buffers::default(),
        &mut out,
    );
    let Output::Udp { data, .. } = out.pop().unwrap() else {
        panic!()
    };
    let mut got = Vec::new();
    net.engine_mut(1).handle_datagram(
        addr(2),
        &data,
        Instant::now(),
        &mut Buffers::default(),
        &mut got,
    );
    net.engine_mut(1).handle_datagram(
        addr(2),
        &data,
        Instant::now(),
        &mut Buffers::default(),
        &mut got,
    );
    assert_eq!(
        got.iter()
            .filter(|o| matches!(o, Output::Tap { .. }))
            .count(),
        1
    );
    assert_eq!(net.engine(1).peers()[0].stats.drops.get("replay"), Some(&1));
}

#[test]
fn peer_roams_to_the_address_of_a_valid_packet() {
    let mut net = pair();
    net.send_tap(1, VNI, &frame([0xff; 6], 1, 0));
    let mut out = Vec::new();
    net.engine_mut(2).handle_tap(
        VNI,
        &frame([0xff; 6], 2, 7),
        Instant::now(),
        &mut Buffers::default(),
        &mut out,
    );
    let Output::Udp { data, .. } = out.pop().unwrap() else {
        panic!()
    };
    let roamed = SocketAddr::from(([198, 51, 100, 7], 40000));
    net.engine_mut(1).handle_datagram(
        roamed,
        &data,
        Instant::now(),
        &mut Buffers::default(),
        &mut Vec::new(),
    );
    assert_eq!(net.engine(1).peers()[0].endpoint, Some(roamed));
}

#[test]
fn gateway_forwards_local_to_remote_with_split_horizon() {
    // A(1) --local-- G(2) --remote-- R(3); A2(4) is another local node of G.
    let a = Engine::new(secret(1));
    a.apply(config(1, vec![peer(2, Group::Local, &[VNI])]));
    let a2 = Engine::new(secret(4));
    a2.apply(config(4, vec![peer(2, Group::Local, &[VNI])]));
    let g = Engine::new(secret(2));
    g.apply(config(
        2,
        vec![
            peer(1, Group::Local, &[VNI]),
            peer(4, Group::Local, &[VNI]),
            peer(3, Group::Remote, &[VNI]),
        ],
    ));
    let r = Engine::new(secret(3));
    r.apply(config(3, vec![peer(2, Group::Remote, &[VNI])]));
    let mut net = Net {
        nodes: vec![(1, a), (2, g), (3, r), (4, a2)],
        taps: vec![],
    };
    net.send_tap(1, VNI, &frame([0xff; 6], 1, 0x11));
    let mut got: Vec<u8> = net.taps.iter().map(|t| t.0).collect();
    got.sort_unstable();
    assert_eq!(
        got,
        vec![2, 3],
        "G's tap and R get it; A2 does not (split horizon)"
    );
    let g_peers = net.engine(2).peers();
    let from_a = g_peers.iter().find(|p| p.cfg.key == pubkey(1)).unwrap();
    assert_eq!(from_a.stats.drops.get("split_horizon"), Some(&1));
    // Unicast reply from R to A's MAC goes via G only to A.
    net.taps.clear();
    net.send_tap(3, VNI, &frame([2, 0, 0, 0, 0, 1], 3, 0x22));
    assert_eq!(net.taps.iter().map(|t| t.0).collect::<Vec<_>>(), vec![1]);
}

#[test]
fn rotating_the_key_keeps_other_state_and_peers_rehandshake() {
    let mut net = pair();
    net.send_tap(1, VNI, &frame([0xff; 6], 1, 0));
    net.taps.clear();
    net.engine_mut(1).set_private_key(secret(11));
    // Make-before-break: until node 2 learns the new key, the sessions on the
    // previous key carry traffic both ways.
    net.tick(1);
    net.send_tap(1, VNI, &frame([0xff; 6], 1, 3));
    net.send_tap(2, VNI, &frame([0xff; 6], 2, 4));
    assert_eq!(
        net.taps.len(),
        2,
        "traffic flows before the peer learns the key"
    );
    net.taps.clear();
    let mut cfg = net.engine(2).config();
    let mut p = cfg.peers.remove(&pubkey(1)).unwrap();
    p.key = *PublicKey::from(&secret(11)).as_bytes();
    cfg.peers.insert(p.key, p);
    net.engine_mut(2).apply(cfg);
    // Node 2 handshakes with the new key at once; node 1 moves that tunnel.
    net.tick(2);
    net.send_tap(1, VNI, &frame([0xff; 6], 1, 5));
    net.send_tap(2, VNI, &frame([0xff; 6], 2, 6));
    assert_eq!(net.taps.len(), 2, "traffic flows on the new key");
    assert_eq!(
        net.engine(1).peers()[0].stats.drops.get("bad_handshake"),
        None
    );
}

#[test]
fn removing_a_peer_does_not_disturb_the_others() {
    let a = Engine::new(secret(1));
    a.apply(config(
        1,
        vec![peer(2, Group::Local, &[VNI]), peer(3, Group::Local, &[VNI])],
    ));
    let b = Engine::new(secret(2));
    b.apply(config(2, vec![peer(1, Group::Local, &[VNI])]));
    let mut net = Net {
        nodes: vec![(1, a), (2, b)],
        taps: vec![],
    };
    net.send_tap(1, VNI, &frame([0xff; 6], 1, 0));
    let to_b = |net: &Net| {
        net.engine(1)
            .peers()
            .into_iter()
            .find(|p| p.cfg.key == pubkey(2))
            .unwrap()
    };
    assert!(to_b(&net).last_handshake.is_some());
    let mut cfg = net.engine(1).config();
    cfg.peers.remove(&pubkey(3));
    let diff = net.engine_mut(1).apply(cfg);
    assert_eq!(diff.peers_removed.len(), 1);
    assert!(to_b(&net).last_handshake.is_some(), "session to B kept");
    net.taps.clear();
    net.send_tap(1, VNI, &frame([0xff; 6], 1, 1));
    assert_eq!(net.taps.len(), 1);
}

#[test]
fn timers_send_handshake_initiations_for_queued_traffic_and_keepalives() {
    let a = Engine::new(secret(1));
    let mut p = peer(2, Group::Local, &[VNI]);
    p.keepalive = Some(1);
    a.apply(config(1, vec![p]));
    let mut out = Vec::new();
    a.tick(Instant::now(), &mut Buffers::default(), &mut out);
    // Persistent keepalive makes boringtun initiate without traffic.
    assert!(
        out.iter()
            .all(|o| matches!(o, Output::Udp { to, .. } if *to == addr(2)))
    );
}

proptest::proptest! {
    #[test]
    fn random_datagrams_never_panic(data in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..400), kind in 0u8..6) {
        let mut net = pair();
        let mut d = data;
        if let Some(b) = d.first_mut() { *b = kind; }
        let mut out = Vec::new();
        net.engine_mut(1).handle_datagram(addr(2), &d, Instant::now(), &mut Buffers::default(), &mut out);
        let no_tap = out.iter().all(|o| !matches!(o, Output::Tap { .. }));
        proptest::prop_assert!(no_tap);
    }
}

#[test]
fn handshake_floods_get_cookie_replies_instead_of_work() {
    let mut net = pair();
    let now = Instant::now();
    let mut cookies = 0;
    for i in 0..300u32 {
        // A fresh initiator each time, like an attacker replaying the key.
        let b = Engine::new(secret(2));
        b.apply(config(2, vec![peer(1, Group::Local, &[VNI])]));
        let mut out = Vec::new();
        b.handle_tap(
            VNI,
            &frame([0xff; 6], 2, (i % 250) as u8),
            now,
            &mut Buffers::default(),
            &mut out,
        );
        let Some(Output::Udp { data, .. }) = out.pop() else {
            panic!("handshake expected")
        };
        let mut replies = Vec::new();
        net.engine_mut(1).handle_datagram(
            addr(2),
            &data,
            now,
            &mut Buffers::default(),
            &mut replies,
        );
        cookies += replies
            .iter()
            .filter(|o| matches!(o, Output::Udp { data, .. } if data.first() == Some(&3)))
            .count();
    }
    assert!(
        cookies > 0,
        "under load the responder answers with cookie replies"
    );
    assert!(
        net.engine(1)
            .drops()
            .get("cookie_sent")
            .copied()
            .unwrap_or(0)
            > 0
    );
    // After the limiter resets (boringtun measures a real second) handshakes work again.
    std::thread::sleep(Duration::from_millis(1100));
    let mut out = Vec::new();
    net.engine_mut(1).tick(
        now + Duration::from_secs(2),
        &mut Buffers::default(),
        &mut out,
    );
    // A newer initiator (older handshake timestamps count as replays).
    let b = Engine::new(secret(2));
    b.apply(config(2, vec![peer(1, Group::Local, &[VNI])]));
    let mut out = Vec::new();
    b.handle_tap(
        VNI,
        &frame([0xff; 6], 2, 1),
        now,
        &mut Buffers::default(),
        &mut out,
    );
    let Some(Output::Udp { data, .. }) = out.pop() else {
        panic!()
    };
    let mut replies = Vec::new();
    net.engine_mut(1)
        .handle_datagram(addr(2), &data, now, &mut Buffers::default(), &mut replies);
    assert!(
        matches!(replies.first(), Some(Output::Udp { data, .. }) if data.first() == Some(&2)),
        "handshake response"
    );
}

#[test]
fn a_rotated_peer_is_reached_where_it_was_last_heard_from() {
    let mut net = pair();
    net.send_tap(1, VNI, &frame([0xff; 6], 1, 0));
    net.send_tap(2, VNI, &frame([0xff; 6], 2, 0));
    net.taps.clear();
    net.engine_mut(1).set_private_key(secret(11));
    let mut cfg = net.engine(2).config();
    let mut p = cfg.peers.remove(&pubkey(1)).unwrap();
    p.key = *PublicKey::from(&secret(11)).as_bytes();
    // The configured endpoint is one node 2 cannot reach (as a gateway's WAN
    // address is for the nodes on its LAN); the last heard one still works.
    p.endpoint = Some(addr(99));
    cfg.peers.insert(p.key, p);
    net.engine_mut(2).apply(cfg);
    net.tick(1);
    net.tick(2);
    net.send_tap(2, VNI, &frame([0xff; 6], 2, 6));
    net.send_tap(1, VNI, &frame([0xff; 6], 1, 5));
    assert_eq!(net.taps.len(), 2, "traffic flows on the new key");
}
