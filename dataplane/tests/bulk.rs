//! Root integration test of the offload paths: bulk TCP between pods on two
//! nodes goes through TSO super-frames read from the TAP, segmentation, UDP
//! GSO/GRO and coalesced TAP writes. Every byte is checked, both ways, over
//! IPv4 and IPv6, and MTU-sized pings with DF must pass.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::time::Duration;

use common::bulk::both_ways;
use common::{Node, Underlay, can_run, ping_ok};
use l2mesh_proto::node::PeerGroup;

const BLUE: u32 = 100;
const LEN: usize = 24 << 20;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bulk_tcp_both_ways_over_offloads_is_intact() {
    if !can_run(&["ping"]) {
        return;
    }
    let mut wire = Underlay::new();
    let a = Node::start("a", &mut wire, "100.64.0.1").await;
    let b = Node::start("b", &mut wire, "100.64.0.2").await;
    let nets = &[("blue", BLUE)];
    a.apply(nets, vec![b.as_peer(PeerGroup::Local, &[BLUE])])
        .await;
    b.apply(nets, vec![a.as_peer(PeerGroup::Local, &[BLUE])])
        .await;
    let a1 = a.pod("a1", "blue", &["10.1.0.1/24", "fd00:1::1/64"]).await;
    let b1 = b
        .pod("b1", "blue", &["10.1.0.11/24", "fd00:1::11/64"])
        .await;
    assert!(ping_ok(&a1, "10.1.0.11", Duration::from_secs(15)));
    assert!(ping_ok(&a1, "fd00:1::11", Duration::from_secs(10)));

    // A frame of exactly the network MTU (1390) with DF set crosses.
    let o = a1.try_exec(&[
        "ping",
        "-c",
        "2",
        "-W",
        "2",
        "-M",
        "do",
        "-s",
        "1362",
        "10.1.0.11",
    ]);
    assert!(o.status.success(), "MTU-sized ping: {o:?}");
    let o = a1.try_exec(&[
        "ping",
        "-c",
        "2",
        "-W",
        "2",
        "-M",
        "do",
        "-s",
        "1342",
        "fd00:1::11",
    ]);
    assert!(o.status.success(), "MTU-sized IPv6 ping: {o:?}");

    let (a1, b1) = (std::sync::Arc::new(a1), std::sync::Arc::new(b1));
    let (x, y) = (a1.clone(), b1.clone());
    tokio::task::spawn_blocking(move || both_ways(&x, &y, "10.1.0.11:0", LEN))
        .await
        .unwrap();
    let (x, y) = (a1.clone(), b1.clone());
    tokio::task::spawn_blocking(move || both_ways(&x, &y, "[fd00:1::11]:0", LEN))
        .await
        .unwrap();

    for n in [&a, &b] {
        let s = n.status().await;
        let bad: u64 = s
            .drops
            .iter()
            .filter(|d| d.reason == "bad_offload")
            .map(|d| d.count)
            .sum();
        assert_eq!(bad, 0, "frames the TAP offload path could not handle");
    }
}

/// UDP through the offload paths, IPv4 and IPv6: bursts of equal datagrams
/// (joined into `GSO_UDP_L4` super-frames on the receiving TAP), sends with
/// `UDP_SEGMENT` (super-frames read from the sending TAP and cut into
/// datagrams here) at exactly the MTU, one byte under and small, with odd
/// tails, and datagrams over the MTU (IP fragments, never joined). Every
/// datagram that arrives must be exactly the one sent.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn udp_bursts_and_segmented_sends_arrive_intact() {
    use common::udp::{Plan, check, exchange, udp_in};
    if !can_run(&["ping"]) {
        return;
    }
    let mut wire = Underlay::new();
    let a = Node::start("a", &mut wire, "100.64.0.1").await;
    let b = Node::start("b", &mut wire, "100.64.0.2").await;
    let nets = &[("blue", BLUE)];
    a.apply(nets, vec![b.as_peer(PeerGroup::Local, &[BLUE])])
        .await;
    b.apply(nets, vec![a.as_peer(PeerGroup::Local, &[BLUE])])
        .await;
    let a1 = a.pod("a1", "blue", &["10.1.0.1/24", "fd00:1::1/64"]).await;
    let b1 = b
        .pod("b1", "blue", &["10.1.0.11/24", "fd00:1::11/64"])
        .await;
    assert!(ping_ok(&a1, "10.1.0.11", Duration::from_secs(15)));
    assert!(ping_ok(&a1, "fd00:1::11", Duration::from_secs(10)));

    // Network MTU 1390: the largest UDP payload is 1362 over IPv4, 1342
    // over IPv6.
    for (what, from, to, max) in [
        ("IPv4", "10.1.0.1:0", "10.1.0.11:0", 1362),
        ("IPv6", "[fd00:1::1]:0", "[fd00:1::11]:0", 1342),
    ] {
        let plan = Plan::new(
            &[64, 1000, max],
            200,
            &[max, max - 1, 100, 5],
            20,
            7,
            &[max + 1, 4000, 20_000],
        );
        let tx = udp_in(&a1, from);
        let rx = udp_in(&b1, to);
        let dst = rx.local_addr().unwrap();
        let got = tokio::task::spawn_blocking(move || {
            let got = exchange(&tx, rx, dst, &plan, Duration::from_secs(10));
            (plan, got)
        })
        .await
        .unwrap();
        check(&got.0, &got.1, 0.95, what);
    }

    for n in [&a, &b] {
        let s = n.status().await;
        let bad: u64 = s
            .drops
            .iter()
            .filter(|d| d.reason == "bad_offload")
            .map(|d| d.count)
            .sum();
        assert_eq!(bad, 0, "frames the TAP offload path could not handle");
    }
}
