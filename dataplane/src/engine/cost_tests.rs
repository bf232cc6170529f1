//! The engine's CPU cost per small frame, without any I/O: a TAP frame in,
//! its datagram out (switch, encode, encrypt), and that datagram into the
//! peer's engine, its frame out (decrypt, decode, switch). The figures of
//! the network benchmark include the kernel and vary with the machine's
//! load; this one isolates the engine's own share, so two builds can be
//! compared. Timing only, so ignored by default; run it in release:
//!
//! ```sh
//! cargo test --release -p l2mesh-dataplane engine_cost -- --ignored --nocapture
//! ```

use super::tests::{VNI, frame, pair};
use super::*;

/// A 64-byte UDP payload in IPv4 in Ethernet, as the benchmark's floods.
const FRAME_LEN: usize = 14 + 20 + 8 + 64;
const ROUNDS: usize = 200_000;
const REPEATS: usize = 5;

/// Runs `f` `ROUNDS` times per repeat; the best repeat's ns per round.
fn best_ns(mut f: impl FnMut()) -> f64 {
    let mut best = f64::MAX;
    for _ in 0..REPEATS {
        let t = Instant::now();
        for _ in 0..ROUNDS {
            f();
        }
        best = best.min(t.elapsed().as_nanos() as f64 / ROUNDS as f64);
    }
    best
}

#[test]
#[ignore = "timing; run in release with --ignored --nocapture"]
fn engine_cost_per_small_frame() {
    let mut net = pair();
    // Handshake, then each side learns the other's MAC: known unicast.
    net.send_tap(1, VNI, &frame([0xff; 6], 1, 0));
    net.send_tap(2, VNI, &frame([2, 0, 0, 0, 0, 1], 2, 0));
    let (a, b) = (net.engine(1), net.engine(2));
    let mut f = frame([2, 0, 0, 0, 0, 2], 1, 0x55);
    f.truncate(FRAME_LEN);
    let from_a = SocketAddr::from(([192, 0, 2, 1], 51820));
    let (mut bufs_a, mut bufs_b) = (Buffers::default(), Buffers::default());
    let (mut out_a, mut out_b) = (Vec::new(), Vec::new());
    let mut spent = Vec::new();
    let now = Instant::now();

    let send = best_ns(|| {
        a.handle_tap(VNI, &f, now, &mut bufs_a, &mut out_a);
        match out_a.pop() {
            Some(Output::Udp { data, .. }) => spent.push(data),
            other => panic!("expected one datagram, got {other:?}"),
        }
        bufs_a.recycle(&mut spent);
    });
    // Every round needs a fresh datagram (replay protection), so the
    // receive figure is that of both ways minus the send.
    let both = best_ns(|| {
        a.handle_tap(VNI, &f, now, &mut bufs_a, &mut out_a);
        let Some(Output::Udp { data, .. }) = out_a.pop() else {
            panic!("expected one datagram");
        };
        b.handle_datagram(from_a, &data, now, &mut bufs_b, &mut out_b);
        spent.push(data);
        bufs_a.recycle(&mut spent);
        match out_b.pop() {
            Some(Output::Tap { frame, .. }) => spent.push(frame),
            other => panic!("expected one TAP frame, got {other:?}"),
        }
        bufs_b.recycle(&mut spent);
    });
    println!(
        "engine cost per {FRAME_LEN}-byte frame: send {send:.0} ns, receive {:.0} ns, both {both:.0} ns",
        both - send
    );
}
