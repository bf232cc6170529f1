//! UDP between two namespaces with every datagram checked: plain bursts of
//! equal-sized datagrams (coalesced into UDP super-frames on the receiving
//! TAP), sends with `UDP_SEGMENT` (UDP super-frames read from the sending
//! TAP), odd tails and datagrams over the MTU (IP fragments).

use std::collections::BTreeMap;
use std::net::{SocketAddr, UdpSocket};
use std::time::{Duration, Instant};

use super::Netns;

/// A UDP socket bound inside `ns` (it stays in that namespace).
pub fn udp_in(ns: &Netns, addr: &str) -> UdpSocket {
    let path = format!("/run/netns/{}", ns.name);
    let addr = addr.to_string();
    std::thread::spawn(move || {
        let f = std::fs::File::open(&path).expect("open netns");
        nix::sched::setns(&f, nix::sched::CloneFlags::CLONE_NEWNET).expect("setns");
        let s = UdpSocket::bind(addr).expect("bind udp in netns");
        let s2 = socket2::SockRef::from(&s);
        s2.set_recv_buffer_size(8 << 20).expect("rcvbuf");
        s
    })
    .join()
    .expect("udp thread")
}

/// Datagram `seq` of `len` bytes: the sequence number, then a pattern that
/// depends on both, so a datagram cut, shifted or joined with another shows.
pub fn datagram(seq: u32, len: usize) -> Vec<u8> {
    let mut d: Vec<u8> = (0..len)
        .map(|i| (i as u32).wrapping_mul(31).wrapping_add(seq) as u8)
        .collect();
    let n = len.min(4);
    d[..n].copy_from_slice(&seq.to_be_bytes()[..n]);
    d
}

/// What one test sends: `(seq, len)` per datagram, in order, grouped into
/// sends (`UDP_SEGMENT` sends carry several datagrams of one size, the last
/// possibly shorter).
pub struct Plan {
    pub sends: Vec<Send>,
}

/// One `send`: its `UDP_SEGMENT` size, if any, and its datagrams as
/// `(seq, len)`.
pub type Send = (Option<u16>, Vec<(u32, usize)>);

impl Plan {
    /// Bursts of equal plain datagrams at the sizes given, `UDP_SEGMENT`
    /// sends of `segs` datagrams of each GSO size with a tail of `tail`
    /// bytes, and single datagrams larger than the MTU.
    pub fn new(
        plain: &[usize],
        burst: usize,
        gso: &[usize],
        segs: usize,
        tail: usize,
        big: &[usize],
    ) -> Self {
        let mut seq = 0u32;
        let mut next = |len: usize| {
            seq += 1;
            (seq, len)
        };
        let mut sends = Vec::new();
        for &len in plain {
            for _ in 0..burst {
                sends.push((None, vec![next(len)]));
            }
        }
        for &size in gso {
            let mut v: Vec<(u32, usize)> = (0..segs).map(|_| next(size)).collect();
            // A tail is shorter than the segment size, or it would be cut.
            let tail = tail.min(size - 1);
            if tail > 0 {
                v.push(next(tail));
            }
            sends.push((Some(size as u16), v));
        }
        for &len in big {
            sends.push((None, vec![next(len)]));
        }
        Self { sends }
    }

    pub fn count(&self) -> usize {
        self.sends.iter().map(|(_, v)| v.len()).sum()
    }
}

/// Sends the plan from `tx` to `to`, pausing between groups of sends so no
/// socket buffer on the way overflows, and collects what `rx` gets within
/// `wait`: returns the datagrams in the order they came.
pub fn exchange(
    tx: &UdpSocket,
    rx: UdpSocket,
    to: SocketAddr,
    plan: &Plan,
    wait: Duration,
) -> Vec<Vec<u8>> {
    use nix::sys::socket::{setsockopt, sockopt::UdpGsoSegment};
    let expected = plan.count();
    let receiver = std::thread::spawn(move || {
        rx.set_read_timeout(Some(Duration::from_millis(200)))
            .unwrap();
        let mut got = Vec::new();
        let mut buf = vec![0u8; 70_000];
        let deadline = Instant::now() + wait;
        while got.len() < expected && Instant::now() < deadline {
            if let Ok(n) = rx.recv(&mut buf) {
                got.push(buf[..n].to_vec());
            }
        }
        got
    });
    for (i, (gso, dgrams)) in plan.sends.iter().enumerate() {
        let mut payload = Vec::new();
        for &(seq, len) in dgrams {
            payload.extend_from_slice(&datagram(seq, len));
        }
        setsockopt(tx, UdpGsoSegment, &i32::from(gso.unwrap_or(0))).expect("UDP_SEGMENT");
        tx.send_to(&payload, to).expect("udp send");
        if i % 32 == 31 {
            std::thread::sleep(Duration::from_millis(3));
        }
    }
    receiver.join().expect("receiver")
}

/// Every datagram that arrived is exactly what was sent, and at least
/// `min_share` of each send kind arrived (UDP may drop under load; broken
/// segmentation or coalescing loses or corrupts all of a kind).
pub fn check(plan: &Plan, received: &[Vec<u8>], min_share: f64, what: &str) {
    let mut sent: BTreeMap<u32, usize> = BTreeMap::new();
    for (_, v) in &plan.sends {
        sent.extend(v.iter().copied());
    }
    let mut got = BTreeMap::new();
    for d in received {
        let seq = u32::from_be_bytes(d.get(..4).and_then(|s| s.try_into().ok()).unwrap_or([0; 4]));
        assert!(
            got.insert(seq, d).is_none(),
            "{what}: datagram {seq} arrived twice"
        );
    }
    for (seq, d) in &got {
        let len = *sent
            .get(seq)
            .unwrap_or_else(|| panic!("{what}: datagram {seq} was never sent ({} bytes)", d.len()));
        assert_eq!(d.len(), len, "{what}: datagram {seq} has the wrong length");
        assert!(
            **d == datagram(*seq, len),
            "{what}: datagram {seq} ({len} bytes) is corrupt"
        );
    }
    for (kind, segmented) in [("plain", false), ("UDP_SEGMENT", true)] {
        let seqs: Vec<u32> = plan
            .sends
            .iter()
            .filter(|s| s.0.is_some() == segmented)
            .flat_map(|(_, v)| v.iter().map(|(s, _)| *s))
            .collect();
        if seqs.is_empty() {
            continue;
        }
        let arrived = seqs.iter().filter(|s| got.contains_key(s)).count();
        assert!(
            arrived as f64 >= min_share * seqs.len() as f64,
            "{what}: only {arrived} of {} {kind} datagrams arrived",
            seqs.len()
        );
    }
}
