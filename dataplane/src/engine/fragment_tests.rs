//! Inner packets that a stock peer's kernel fragmented (WireGuard MTU 1420,
//! network MTU 1390) reach the TAP whole.
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
    let mut stock = Tunn::new(secret(2), PublicKey::from(pubkey(1)), None, None, 7, None);
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
    (e, stock)
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
