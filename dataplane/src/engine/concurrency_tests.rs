//! The engine shared by several workers: MAC learning, traffic and control
//! operations at the same time.

use super::tests::{VNI, frame, pair};
use super::*;

#[test]
fn the_engine_can_be_shared_by_workers() {
    fn shared<T: Send + Sync>() {}
    shared::<Engine>();
}

#[test]
fn two_workers_learning_at_once_lose_no_mac() {
    let net = pair();
    let a = net.engine(1);
    let rounds = 200u8;
    std::thread::scope(|s| {
        for worker in 0..2u8 {
            s.spawn(move || {
                let mut bufs = Buffers::default();
                let mut out = Vec::new();
                for i in 0..rounds {
                    // Distinct sources per worker; every frame floods.
                    let mut f = frame([0xff; 6], 0, i);
                    f[10] = worker;
                    f[11] = i;
                    a.handle_tap(VNI, &f, Instant::now(), &mut bufs, &mut out);
                    out.clear();
                }
            });
        }
    });
    let macs = a.macs(VNI, Instant::now());
    assert_eq!(macs.len(), 2 * usize::from(rounds));
    assert!(macs.iter().all(|(_, port, _)| port == "tap"));
}

#[test]
fn a_mac_moving_between_ports_under_concurrent_traffic_ends_where_last_seen() {
    let mut net = pair();
    // Both nodes learn each other first (handshake done).
    net.send_tap(1, VNI, &frame([0xff; 6], 1, 1));
    net.send_tap(2, VNI, &frame([0xff; 6], 2, 1));
    let b = net.engine(2);
    std::thread::scope(|s| {
        for _ in 0..2 {
            s.spawn(|| {
                let mut bufs = Buffers::default();
                let mut out = Vec::new();
                for i in 0..100 {
                    b.handle_tap(
                        VNI,
                        &frame([0xff; 6], 7, i),
                        Instant::now(),
                        &mut bufs,
                        &mut out,
                    );
                    out.clear();
                }
            });
        }
    });
    let seven = b
        .macs(VNI, Instant::now())
        .into_iter()
        .find(|(mac, _, _)| mac == "02:00:00:00:00:07")
        .map(|(_, port, _)| port);
    assert_eq!(seven.as_deref(), Some("tap"));
}

#[test]
fn control_operations_and_traffic_run_side_by_side() {
    let mut net = pair();
    net.send_tap(1, VNI, &frame([0xff; 6], 1, 1));
    let a = net.engine(1);
    let stop = std::sync::atomic::AtomicBool::new(false);
    std::thread::scope(|s| {
        s.spawn(|| {
            let mut bufs = Buffers::default();
            let mut out = Vec::new();
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                a.handle_tap(
                    VNI,
                    &frame([0xff; 6], 1, 2),
                    Instant::now(),
                    &mut bufs,
                    &mut out,
                );
                out.clear();
            }
        });
        let mut bufs = Buffers::default();
        let mut out = Vec::new();
        for i in 0..50u8 {
            let mut cfg = a.config();
            cfg.revision = u64::from(i) + 2;
            a.apply(cfg);
            a.tick(Instant::now(), &mut bufs, &mut out);
            let _ = a.peers();
            let _ = a.macs(VNI, Instant::now());
        }
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
    });
    assert_eq!(a.peers().len(), 1);
    assert!(a.peers()[0].stats.tx_packets > 1);
}
