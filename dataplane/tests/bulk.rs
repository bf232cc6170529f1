//! Root integration test of the offload paths: bulk TCP between pods on two
//! nodes goes through TSO super-frames read from the TAP, segmentation, UDP
//! GSO/GRO and coalesced TAP writes. Every byte is checked, both ways, over
//! IPv4 and IPv6, and MTU-sized pings with DF must pass.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::time::Duration;

use common::bulk::{PodAddrs, TwoNodePods, both_ways};

const LEN: usize = 24 << 20;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bulk_tcp_both_ways_over_offloads_is_intact() {
    let Some(t) = TwoNodePods::start(&[], PodAddrs::DualStack).await else {
        return;
    };

    // A frame of exactly the network MTU (1390) with DF set crosses.
    let o = t.a1.try_exec(&[
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
    let o = t.a1.try_exec(&[
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

    let (x, y) = (t.a1.clone(), t.b1.clone());
    tokio::task::spawn_blocking(move || both_ways(&x, &y, "10.1.0.11:0", LEN))
        .await
        .unwrap();
    let (x, y) = (t.a1.clone(), t.b1.clone());
    tokio::task::spawn_blocking(move || both_ways(&x, &y, "[fd00:1::11]:0", LEN))
        .await
        .unwrap();

    t.assert_no_bad_offload().await;
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
    let Some(t) = TwoNodePods::start(&[], PodAddrs::DualStack).await else {
        return;
    };

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
        let tx = udp_in(&t.a1, from);
        let rx = udp_in(&t.b1, to);
        let dst = rx.local_addr().unwrap();
        let got = tokio::task::spawn_blocking(move || {
            let got = exchange(&tx, rx, dst, &plan, Duration::from_secs(10));
            (plan, got)
        })
        .await
        .unwrap();
        check(&got.0, &got.1, 0.95, what);
    }

    t.assert_no_bad_offload().await;
}

/// CPU ticks (user + system) of each packet worker thread of a process.
fn worker_ticks(pid: u32) -> Vec<u64> {
    let mut v = Vec::new();
    for t in std::fs::read_dir(format!("/proc/{pid}/task")).unwrap() {
        let t = t.unwrap().path();
        let comm = std::fs::read_to_string(t.join("comm")).unwrap_or_default();
        if !comm.starts_with("l2dp-worker") {
            continue;
        }
        let stat = std::fs::read_to_string(t.join("stat")).unwrap_or_default();
        // Fields after the parenthesised name: utime and stime are 14 and 15.
        let rest = stat.rsplit_once(')').map_or("", |(_, r)| r);
        let f: Vec<u64> = rest
            .split_whitespace()
            .map(|x| x.parse().unwrap_or(0))
            .collect();
        v.push(f[11] + f[12]);
    }
    v
}

/// Many TCP flows from one pod to one pod on another node (so one peer,
/// one underlay 4-tuple) are spread over the sending node's workers: each
/// TAP write goes to the queue of its flow's hash, so the kernel puts the
/// flow's packets in the other direction there too. Before, every flow
/// followed its replies onto the one worker that reads the peer's
/// datagrams, and the other workers stayed idle.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn flows_to_one_peer_spread_over_the_workers() {
    use common::bulk::{check_all, connect_in, send_all};
    let Some(t) = TwoNodePods::start(&["--workers", "2"], PodAddrs::Ipv4).await else {
        return;
    };

    const FLOWS: usize = 16;
    const EACH: usize = 8 << 20;
    let pid = t.a.proc.as_ref().unwrap().child.id();
    let before = worker_ticks(pid);
    assert_eq!(before.len(), 2, "node a runs two workers");
    let listener = common::listen_in(&t.b1, "10.1.0.11:0");
    let dst = listener.local_addr().unwrap();
    let a1 = t.a1.clone();
    tokio::task::spawn_blocking(move || {
        let server = std::thread::spawn(move || {
            let readers: Vec<_> = (0..FLOWS)
                .map(|_| {
                    let (s, _) = listener.accept().unwrap();
                    std::thread::spawn(move || check_all(s, EACH))
                })
                .collect();
            readers
                .into_iter()
                .map(|r| r.join().unwrap())
                .collect::<Vec<_>>()
        });
        let senders: Vec<_> = (0..FLOWS)
            .map(|_| {
                let c = connect_in(&a1, dst);
                std::thread::spawn(move || send_all(c, EACH))
            })
            .collect();
        for s in senders {
            s.join().unwrap();
        }
        for r in server.join().unwrap() {
            assert_eq!(r, Ok(()), "a flow lost or corrupted data");
        }
    })
    .await
    .unwrap();
    let after = worker_ticks(pid);
    let used: Vec<u64> = after.iter().zip(&before).map(|(x, y)| x - y).collect();
    let (lo, hi) = (used.iter().min().unwrap(), used.iter().max().unwrap());
    assert!(
        *hi > 0 && *lo * 4 >= *hi,
        "the sending node's workers shared the {FLOWS} flows unevenly: CPU ticks {used:?}"
    );
}
