#![allow(clippy::unwrap_used, clippy::expect_used)]

use super::*;
use crate::wire;

fn frame(len: usize) -> Vec<u8> {
    let mut f = vec![0xff; 6];
    f.extend_from_slice(&[2, 0, 0, 0, 0, 1, 0x08, 0x00]);
    f.extend((0..len - 14).map(|i| i as u8));
    f
}

/// A whole inner packet as a stock peer's vxlan device sends it (no DF).
fn packet(frame_len: usize) -> Vec<u8> {
    let mut p = Vec::new();
    wire::encode(
        &mut p,
        Ipv4Addr::new(100, 64, 0, 9),
        Ipv4Addr::new(100, 64, 0, 1),
        100,
        &frame(frame_len),
    );
    p[6] = 0;
    p[10] = 0;
    p[11] = 0;
    let c = ipv4_checksum(&p[..20]);
    p[10..12].copy_from_slice(&c.to_be_bytes());
    p
}

fn feed(
    r: &mut Reassembly,
    frags: &[Vec<u8>],
    now: Instant,
    drops: &mut BTreeMap<&'static str, u64>,
) -> Vec<Vec<u8>> {
    frags
        .iter()
        .filter_map(|f| r.insert(&wire::fragment(f).unwrap(), now, drops))
        .collect()
}

#[test]
fn a_full_size_frame_from_a_1420_link_is_joined() {
    // 1390 MTU + Ethernet = 1404-byte frame, 1440-byte inner packet, split
    // at 1420 as the stock peer's kernel does.
    let whole = packet(1404);
    assert_eq!(whole.len(), 1440);
    let frags = split(&whole, 1420, 0x1234);
    assert_eq!(frags.len(), 2);
    assert_eq!(wire::decode(&frags[0]), Err(wire::DecodeError::Fragment));
    let mut r = Reassembly::default();
    let mut drops = BTreeMap::new();
    let now = Instant::now();
    let out = feed(&mut r, &frags, now, &mut drops);
    assert_eq!(out.len(), 1);
    let d = wire::decode(&out[0]).unwrap();
    assert_eq!(d.frame, &frame(1404)[..]);
    assert_eq!(d.vni, 100);
    assert!(drops.is_empty());
    assert_eq!(r.pending(), 0);
    assert_eq!(r.held_bytes(), 0);
}

#[test]
fn any_order_and_interleaved_packets() {
    let a = split(&packet(3000), 600, 1);
    let b = split(&packet(2000), 576, 2);
    let mut mixed: Vec<Vec<u8>> = Vec::new();
    let mut ra = a.iter().rev();
    let mut rb = b.iter();
    loop {
        match (ra.next(), rb.next()) {
            (None, None) => break,
            (x, y) => mixed.extend(x.into_iter().chain(y).cloned()),
        }
    }
    let mut r = Reassembly::default();
    let mut drops = BTreeMap::new();
    let out = feed(&mut r, &mixed, Instant::now(), &mut drops);
    assert_eq!(out.len(), 2);
    let frames: Vec<usize> = out
        .iter()
        .map(|p| wire::decode(p).unwrap().frame.len())
        .collect();
    assert!(
        frames.contains(&3000) && frames.contains(&2000),
        "{frames:?}"
    );
    assert!(drops.is_empty(), "{drops:?}");
}

#[test]
fn a_missing_fragment_times_out_and_frees_its_memory() {
    let frags = split(&packet(1404), 1420, 7);
    let mut r = Reassembly::default();
    let mut drops = BTreeMap::new();
    let t0 = Instant::now();
    assert!(feed(&mut r, &frags[..1], t0, &mut drops).is_empty());
    assert_eq!(r.pending(), 1);
    r.expire(t0 + TIMEOUT / 2, &mut drops);
    assert_eq!(r.pending(), 1);
    r.expire(t0 + TIMEOUT, &mut drops);
    assert_eq!(r.pending(), 0);
    assert_eq!(drops.get(DROP_TIMEOUT), Some(&1));
    // The late last fragment starts a new packet that never completes.
    assert!(feed(&mut r, &frags[1..], t0 + TIMEOUT, &mut drops).is_empty());
}

#[test]
fn a_hostile_peer_holds_a_bounded_amount() {
    let mut r = Reassembly::default();
    let mut drops = BTreeMap::new();
    let now = Instant::now();
    // Many packets that never complete: only MAX_PENDING are held.
    for id in 0..1000u16 {
        let frags = split(&packet(8000), 1420, id);
        feed(&mut r, &frags[..frags.len() - 1], now, &mut drops);
    }
    assert_eq!(r.pending(), MAX_PENDING);
    assert!(r.held_bytes() <= MAX_PENDING * MAX_PACKET);
    assert_eq!(drops.get(DROP_EVICTED), Some(&(1000 - MAX_PENDING as u64)));
    // A fragment that would make the packet larger than any frame.
    let mut big = split(&packet(1404), 1420, 5000).remove(1);
    let far = u16::try_from(MAX_PACKET / 8).unwrap();
    big[6..8].copy_from_slice(&far.to_be_bytes());
    big[10] = 0;
    big[11] = 0;
    let c = ipv4_checksum(&big[..20]);
    big[10..12].copy_from_slice(&c.to_be_bytes());
    assert!(feed(&mut r, &[big], now, &mut drops).is_empty());
    assert_eq!(drops.get(DROP_TOO_LARGE), Some(&1));
}

#[test]
fn overlaps_and_inconsistent_lengths_drop_the_packet() {
    let now = Instant::now();
    // The same first fragment twice (overlap).
    let frags = split(&packet(3000), 1000, 9);
    let mut r = Reassembly::default();
    let mut drops = BTreeMap::new();
    let twice = vec![frags[0].clone(), frags[0].clone(), frags[1].clone()];
    assert!(feed(&mut r, &twice, now, &mut drops).is_empty());
    assert_eq!(drops.get(DROP_BAD), Some(&1));
    // Two different "last" fragments.
    let a = split(&packet(3000), 1000, 10);
    let b = split(&packet(2000), 1000, 10);
    let mut r = Reassembly::default();
    let mut drops = BTreeMap::new();
    let lasts = vec![a.last().unwrap().clone(), b.last().unwrap().clone()];
    assert!(feed(&mut r, &lasts, now, &mut drops).is_empty());
    assert_eq!(drops.get(DROP_BAD), Some(&1));
    assert_eq!(r.pending(), 0);
    // A middle fragment whose length is not a multiple of 8.
    let mut odd = split(&packet(3000), 1000, 11)[0].clone();
    odd.truncate(odd.len() - 3);
    let len = u16::try_from(odd.len()).unwrap();
    odd[2..4].copy_from_slice(&len.to_be_bytes());
    odd[10] = 0;
    odd[11] = 0;
    let c = ipv4_checksum(&odd[..20]);
    odd[10..12].copy_from_slice(&c.to_be_bytes());
    let mut r = Reassembly::default();
    let mut drops = BTreeMap::new();
    assert!(feed(&mut r, &[odd], now, &mut drops).is_empty());
    assert_eq!(drops.get(DROP_BAD), Some(&1));
}

/// Gives a fragment's header `options` bytes of IPv4 options (NOPs) and
/// redoes its lengths and checksum.
fn with_options(frag: &[u8], options: usize) -> Vec<u8> {
    let mut h = frag[..20].to_vec();
    h.extend(std::iter::repeat_n(1u8, options));
    h[0] = 0x40 | u8::try_from(h.len() / 4).unwrap();
    let len = u16::try_from(h.len() + frag.len() - 20).unwrap();
    h[2..4].copy_from_slice(&len.to_be_bytes());
    h[10] = 0;
    h[11] = 0;
    let c = ipv4_checksum(&h);
    h[10..12].copy_from_slice(&c.to_be_bytes());
    h.extend_from_slice(&frag[20..]);
    h
}

#[test]
fn a_first_fragment_with_options_counts_towards_the_bound() {
    // The largest packet with a plain header, whose first fragment carries
    // 40 bytes of options: joined, it would be 40 bytes over MAX_PACKET.
    let whole = packet(MAX_PACKET - OVERHEAD);
    assert_eq!(whole.len(), MAX_PACKET);
    for first_last in [true, false] {
        let mut frags = split(&whole, 1500, 3);
        frags[0] = with_options(&frags[0], 40);
        if first_last {
            frags.rotate_left(1);
        }
        let mut r = Reassembly::default();
        let mut drops = BTreeMap::new();
        let out = feed(&mut r, &frags, Instant::now(), &mut drops);
        assert!(
            out.is_empty(),
            "first_last {first_last}: {:?}",
            out[0].len()
        );
        assert_eq!(drops.get(DROP_TOO_LARGE), Some(&1));
    }
    // With fewer options it still fits and is joined.
    let whole = packet(MAX_PACKET - 40 - OVERHEAD);
    let mut frags = split(&whole, 1500, 4);
    frags[0] = with_options(&frags[0], 40);
    let mut r = Reassembly::default();
    let out = feed(&mut r, &frags, Instant::now(), &mut BTreeMap::new());
    assert_eq!(out.len(), 1);
    assert_eq!(out[0].len(), MAX_PACKET);
}

proptest::proptest! {
    #[test]
    fn any_split_in_any_order_gives_the_packet_back(
        frame_len in 14usize..=(MAX_PACKET - OVERHEAD),
        step in 1usize..250,
        options in 0usize..=10,
        order in proptest::collection::vec(proptest::prelude::any::<u32>(), 0..64),
        others in proptest::collection::vec(1usize..64, 0..(MAX_PENDING - 1)),
    ) {
        let whole = packet(frame_len);
        // Fragments of `step` * 8 bytes, but never more than MAX_FRAGMENTS.
        let payload = whole.len() - 20;
        let step = step.max(payload.div_ceil(8 * MAX_FRAGMENTS)) * 8;
        let mut frags = split(&whole, 20 + step, 0x77);
        proptest::prop_assume!(frags.len() > 1);
        proptest::prop_assert!(frags.len() <= MAX_FRAGMENTS);
        frags[0] = with_options(&frags[0], options * 4);
        // A permutation from `order`, and unrelated pending packets of other
        // ids (never complete: only a first fragment each).
        for (i, &k) in order.iter().enumerate() {
            let n = frags.len();
            frags.swap(i % n, usize::try_from(k).unwrap() % n);
        }
        let mut r = Reassembly::default();
        let mut drops = BTreeMap::new();
        let now = Instant::now();
        for (id, len) in (1000u16..).zip(others) {
            let f = split(&packet(600), 20 + len * 8, id);
            feed(&mut r, &f[..1], now, &mut drops);
        }
        let out = feed(&mut r, &frags, now, &mut drops);
        let fits = whole.len() + options * 4 <= MAX_PACKET;
        if fits {
            proptest::prop_assert_eq!(out.len(), 1);
            let d = wire::decode(&out[0]).unwrap();
            proptest::prop_assert_eq!(d.frame, &frame(frame_len)[..]);
            proptest::prop_assert_eq!(out[0].len(), whole.len() + options * 4);
            proptest::prop_assert!(!drops.contains_key(DROP_BAD), "{:?}", drops);
        } else {
            proptest::prop_assert!(out.is_empty());
            proptest::prop_assert_eq!(drops.get(DROP_TOO_LARGE), Some(&1));
        }
    }
}

proptest::proptest! {
    #[test]
    fn arbitrary_fragments_never_panic_and_stay_bounded(
        frags in proptest::collection::vec(
            (0u16..4, 0u16..0x2000, proptest::bool::ANY, 1usize..1500), 0..200),
        options in proptest::collection::vec(0usize..=10, 1..8),
    ) {
        let mut r = Reassembly::default();
        let mut drops = BTreeMap::new();
        let now = Instant::now();
        for (i, (id, off, more, len)) in frags.into_iter().enumerate() {
            let mut h = packet(60)[..20].to_vec();
            let total = u16::try_from(20 + len).unwrap();
            h[2..4].copy_from_slice(&total.to_be_bytes());
            h[4..6].copy_from_slice(&id.to_be_bytes());
            let f = off | if more { 0x2000 } else { 0 };
            h[6..8].copy_from_slice(&f.to_be_bytes());
            h[10] = 0;
            h[11] = 0;
            let c = ipv4_checksum(&h);
            h[10..12].copy_from_slice(&c.to_be_bytes());
            h.resize(20 + len, 0xab);
            let h = with_options(&h, options[i % options.len()] * 4);
            if let Some(fr) = wire::fragment(&h)
                && let Some(p) = r.insert(&fr, now, &mut drops)
            {
                proptest::prop_assert!(p.len() <= MAX_PACKET);
            }
            proptest::prop_assert!(r.pending() <= MAX_PENDING);
            proptest::prop_assert!(r.held_bytes() <= MAX_PENDING * MAX_PACKET);
        }
    }
}
