//! A stock peer (a bare boringtun tunnel here): inner packets its kernel
//! fragmented reach the TAP whole, and a key rotation completes while it
//! never sends first.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use boringtun::noise::{Tunn, TunnResult};

use super::tests::{VNI, addr, config, peer, pubkey, secret, tip};
use super::*;
use crate::reassembly::split;
use crate::switch::Group;
use crate::wire;

/// Engine 1 and a bare boringtun tunnel as peer 2 (a stock peer), with a
/// session between them.
fn engine_and_stock_peer() -> (Engine, Tunn) {
    let e = Engine::new(secret(1));
    e.apply(config(1, vec![peer(2, Group::Local, &[VNI])]));
    let stock = stock_peer_of(&e, pubkey(1));
    (e, stock)
}

/// A stock peer (key 2) configured with the engine's key `key`, after a
/// handshake it initiated.
fn stock_peer_of(e: &Engine, key: [u8; 32]) -> Tunn {
    let mut stock = Tunn::new(secret(2), PublicKey::from(key), None, None, 7, None);
    let mut buf = vec![0; BUF_SIZE];
    let TunnResult::WriteToNetwork(init) = stock.format_handshake_initiation(&mut buf, false)
    else {
        panic!("initiation")
    };
    let mut out = Vec::new();
    e.handle_datagram(
        addr(2),
        init,
        Instant::now(),
        &mut Buffers::default(),
        &mut out,
    );
    let Some(Output::Udp { data, .. }) = out.into_iter().next() else {
        panic!("handshake response")
    };
    let mut dec = vec![0; BUF_SIZE];
    assert!(!matches!(
        stock.decapsulate(None, &data, &mut dec),
        TunnResult::Err(_)
    ));
    stock
}

fn full_frame() -> Vec<u8> {
    // A full-size frame of a 1390 network: 1404 bytes.
    let mut f = vec![2, 0, 0, 0, 0, 1, 2, 0, 0, 0, 0, 2, 0x08, 0x00];
    f.extend((0..1390).map(|i| (i % 251) as u8));
    f
}

/// The inner packet as the stock peer's vxlan device makes it (no DF).
fn stock_inner(frame: &[u8], src: Ipv4Addr) -> Vec<u8> {
    let mut p = Vec::new();
    wire::encode(&mut p, src, tip(1), VNI, frame);
    p[6] = 0;
    p[10] = 0;
    p[11] = 0;
    let c = wire::ipv4_checksum(&p[..20]);
    p[10..12].copy_from_slice(&c.to_be_bytes());
    p
}

fn send(e: &Engine, stock: &mut Tunn, inner: &[u8]) -> Vec<Output> {
    let mut buf = vec![0; BUF_SIZE];
    let TunnResult::WriteToNetwork(d) = stock.encapsulate(inner, &mut buf) else {
        panic!("encrypt")
    };
    let mut out = Vec::new();
    e.handle_datagram(
        addr(2),
        d,
        Instant::now(),
        &mut Buffers::default(),
        &mut out,
    );
    out
}

#[test]
fn fragments_of_a_full_size_frame_reach_the_tap_whole() {
    let (e, mut stock) = engine_and_stock_peer();
    let frame = full_frame();
    let frags = split(&stock_inner(&frame, tip(2)), 1420, 0x4242);
    assert_eq!(frags.len(), 2);
    assert!(send(&e, &mut stock, &frags[0]).is_empty());
    let out = send(&e, &mut stock, &frags[1]);
    assert_eq!(
        out,
        vec![Output::Tap {
            vni: VNI,
            frame: frame.clone()
        }]
    );
    let drops = &e.peers()[0].stats.drops;
    assert!(drops.is_empty(), "{drops:?}");
}

#[test]
fn spoofed_or_lost_fragments_are_counted() {
    let (e, mut stock) = engine_and_stock_peer();
    // Another inner source than the peer's tunnel address: never held.
    let frags = split(&stock_inner(&full_frame(), tip(3)), 1420, 1);
    assert!(send(&e, &mut stock, &frags[0]).is_empty());
    assert_eq!(e.peers()[0].stats.drops.get("bad_inner_source"), Some(&1));
    // A first fragment whose rest never comes times out on a later tick.
    let frags = split(&stock_inner(&full_frame(), tip(2)), 1420, 2);
    assert!(send(&e, &mut stock, &frags[0]).is_empty());
    let mut out = Vec::new();
    e.tick(
        Instant::now() + crate::reassembly::TIMEOUT,
        &mut Buffers::default(),
        &mut out,
    );
    assert_eq!(e.peers()[0].stats.drops.get("fragment_timeout"), Some(&1));
}

/// What the engine sends to the stock peer as the stock peer sees it: the
/// inner packets decrypted and anything it answers, given back to the
/// engine (a stock peer answers handshakes, never starts one).
fn exchange(e: &Engine, stock: &mut Tunn, from_engine: Vec<Output>) -> Vec<Vec<u8>> {
    let mut pending = from_engine;
    let mut delivered = Vec::new();
    let mut rounds = 0;
    while let Some(o) = pending.pop() {
        rounds += 1;
        assert!(rounds < 100);
        let Output::Udp { data, .. } = o else {
            continue;
        };
        let mut dec = vec![0; BUF_SIZE];
        match stock.decapsulate(None, &data, &mut dec) {
            TunnResult::WriteToTunnelV4(p, _) => delivered.push(p.to_vec()),
            TunnResult::WriteToNetwork(reply) => {
                let reply = reply.to_vec();
                e.handle_datagram(
                    addr(2),
                    &reply,
                    Instant::now(),
                    &mut Buffers::default(),
                    &mut pending,
                );
            }
            _ => {}
        }
    }
    delivered
}

fn from_tap(e: &Engine, marker: u8) -> Vec<Output> {
    let mut out = Vec::new();
    e.handle_tap(
        VNI,
        &super::tests::frame([0xff; 6], 1, marker),
        Instant::now(),
        &mut Buffers::default(),
        &mut out,
    );
    out
}

#[test]
fn a_rotation_completes_towards_a_peer_that_never_sends_first() {
    let (e, mut stock) = engine_and_stock_peer();
    assert_eq!(exchange(&e, &mut stock, from_tap(&e, 1)).len(), 1);
    e.set_private_key(secret(11));
    // The stock peer is reconfigured by hand with the new key: the old peer
    // entry, and its session, are gone.
    let new_key = *PublicKey::from(&secret(11)).as_bytes();
    let mut stock = Tunn::new(secret(2), PublicKey::from(new_key), None, None, 8, None);
    // Frames on the old session are lost on the stock side...
    assert!(exchange(&e, &mut stock, from_tap(&e, 2)).is_empty());
    // ...and the next tick probes with the new key, which the stock peer
    // answers: the tunnel moves without the stock peer sending first.
    let mut out = Vec::new();
    e.tick(Instant::now(), &mut Buffers::default(), &mut out);
    assert!(!out.is_empty(), "a probe with the new key");
    exchange(&e, &mut stock, out);
    let got = exchange(&e, &mut stock, from_tap(&e, 3));
    assert_eq!(got.len(), 1, "traffic flows on the new key");
    assert_eq!(
        wire::decode(&got[0]).unwrap().frame,
        &super::tests::frame([0xff; 6], 1, 3)[..]
    );
    // No more probes once moved.
    let mut out = Vec::new();
    e.tick(
        Instant::now() + PROBE_INTERVAL,
        &mut Buffers::default(),
        &mut out,
    );
    exchange(&e, &mut stock, from_tap(&e, 4));
    let mut out = Vec::new();
    e.tick(
        Instant::now() + 2 * PROBE_INTERVAL,
        &mut Buffers::default(),
        &mut out,
    );
    assert!(out.is_empty(), "{out:?}");
}

#[test]
fn probes_go_out_only_while_sending_and_at_most_once_per_interval() {
    let (e, mut stock) = engine_and_stock_peer();
    exchange(&e, &mut stock, from_tap(&e, 1));
    // The handshake a new peer gets on its first tick, done with.
    let mut out = Vec::new();
    e.tick(Instant::now(), &mut Buffers::default(), &mut out);
    exchange(&e, &mut stock, out);
    e.set_private_key(secret(11));
    let t0 = Instant::now();
    let tick = |at: Instant| {
        let mut out = Vec::new();
        e.tick(at, &mut Buffers::default(), &mut out);
        out.len()
    };
    assert_eq!(tick(t0), 0, "nothing sent since the rotation: no probe");
    from_tap(&e, 2);
    assert_eq!(tick(t0), 1, "sending: a probe");
    from_tap(&e, 3);
    assert_eq!(tick(t0 + PROBE_INTERVAL / 2), 0, "within the interval");
    assert_eq!(tick(t0 + PROBE_INTERVAL), 1, "the next one");
    // The old session still carries traffic both ways while the peer has
    // not moved (make-before-break for l2mesh peers).
    assert_eq!(exchange(&e, &mut stock, from_tap(&e, 4)).len(), 1);
}

#[test]
fn a_cookie_reply_from_the_limiter_is_no_answer_to_the_probe() {
    // The engine's limiter passes the handshake response, but the probe's
    // own check of it finds the node under load and answers with a cookie
    // reply: the peer has not completed the probe's handshake, so the
    // tunnel must stay on its session with the previous key.
    let (e, mut stock) = engine_and_stock_peer();
    exchange(&e, &mut stock, from_tap(&e, 1));
    e.set_private_key(secret(11));
    let new_key = *PublicKey::from(&secret(11)).as_bytes();
    let mut stock = Tunn::new(secret(2), PublicKey::from(new_key), None, None, 8, None);
    from_tap(&e, 2);
    let mut out = Vec::new();
    e.tick(Instant::now(), &mut Buffers::default(), &mut out);
    let Some(Output::Udp { data: probe, .. }) = out.pop() else {
        panic!("a probe: {out:?}")
    };
    let mut dec = vec![0; BUF_SIZE];
    let TunnResult::WriteToNetwork(response) = stock.decapsulate(None, &probe, &mut dec) else {
        panic!("a handshake response")
    };
    let response = response.to_vec();
    // Handshake messages seen this second, up to one below the limit.
    let mut scratch = vec![0; BUF_SIZE];
    for _ in 0..HANDSHAKE_RATE_LIMIT - 1 {
        assert!(
            e.read()
                .limiter
                .verify_packet(Some(addr(2).ip()), &response, &mut scratch)
                .is_ok()
        );
    }
    let mut out = Vec::new();
    e.handle_datagram(
        addr(2),
        &response,
        Instant::now(),
        &mut Buffers::default(),
        &mut out,
    );
    let st = e.read();
    let peer = lock(st.peers.values().next().unwrap());
    assert!(peer.on_previous_key, "the tunnel moved on a cookie reply");
    assert!(
        peer.tunn.time_since_last_handshake().is_some(),
        "the tunnel lost its session"
    );
}
