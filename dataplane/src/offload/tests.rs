use super::*;
use proptest::prelude::*;

const MTU: usize = 1390;
const MSS4: usize = MTU - 40;
const MSS6: usize = MTU - 60;

fn payload(n: usize) -> Vec<u8> {
    (0..n).map(|i| (i * 7 + i / 251) as u8).collect()
}

/// A TSO super-frame as the kernel hands it over: vnet header, Ethernet,
/// IP with the total length of the whole thing, TCP with the pseudo-header
/// sum in the checksum field.
fn super_frame(v6: bool, vlan: bool, data: &[u8], mss: usize, flags: u8) -> Vec<u8> {
    let mut f = vec![0u8; VNET_HDR_LEN];
    f.extend_from_slice(&[2, 0, 0, 0, 0, 2, 2, 0, 0, 0, 0, 1]);
    if vlan {
        f.extend_from_slice(&[0x81, 0x00, 0x00, 0x05]);
    }
    f.extend_from_slice(if v6 { &[0x86, 0xdd] } else { &[0x08, 0x00] });
    let l3 = f.len() - VNET_HDR_LEN;
    let tcp_len = 32 + data.len();
    if v6 {
        f.extend_from_slice(&[0x60, 0, 0, 0]);
        f.extend_from_slice(&(tcp_len as u16).to_be_bytes());
        f.extend_from_slice(&[IP_PROTO_TCP, 64]);
        f.extend_from_slice(&[0xfd; 16]);
        f.extend_from_slice(&[0xfe; 16]);
    } else {
        f.extend_from_slice(&[0x45, 0]);
        f.extend_from_slice(&((20 + tcp_len) as u16).to_be_bytes());
        f.extend_from_slice(&[0xff, 0xfe, 0x40, 0, 64, IP_PROTO_TCP, 0, 0]);
        f.extend_from_slice(&[10, 9, 0, 1, 10, 9, 0, 2]);
    }
    let l4 = f.len() - VNET_HDR_LEN;
    // ports, seq near the wrap, ack, data offset 8 (12 bytes of options)
    f.extend_from_slice(&[0x1f, 0x90, 0xc0, 0x01, 0xff, 0xff, 0xfc, 0x00, 0, 0, 0, 9]);
    f.extend_from_slice(&[0x80, flags, 0x01, 0x00, 0, 0, 0, 0]);
    f.extend_from_slice(&[1, 1, 8, 10, 0, 0, 0, 1, 0, 0, 0, 2]);
    f.extend_from_slice(data);
    let hdr = VnetHdr {
        flags: F_NEEDS_CSUM,
        gso_type: if v6 { GSO_TCPV6 } else { GSO_TCPV4 },
        hdr_len: (l4 + 32) as u16,
        gso_size: mss as u16,
        csum_start: l4 as u16,
        csum_offset: 16,
    };
    f[..VNET_HDR_LEN].copy_from_slice(&hdr.to_bytes());
    let _ = l3;
    f
}

struct Seg {
    frame: Vec<u8>,
}

fn l3_l4(f: &[u8]) -> (usize, usize, bool) {
    let (l3, et) = l3_offset(f).unwrap();
    let v6 = et == ETHERTYPE_IPV6;
    (l3, l3 + if v6 { 40 } else { 20 }, v6)
}

/// Checks one emitted frame the way a receiving stack would and returns its
/// TCP payload, sequence number and flags.
fn check(s: &Seg) -> (Vec<u8>, u32, u8) {
    let f = &s.frame;
    let (l3, l4, v6) = l3_l4(f);
    let tcp_len = f.len() - l4;
    if v6 {
        assert_eq!(
            usize::from(u16::from_be_bytes([f[l3 + 4], f[l3 + 5]])),
            tcp_len
        );
    } else {
        assert_eq!(
            usize::from(u16::from_be_bytes([f[l3 + 2], f[l3 + 3]])),
            f.len() - l3
        );
        assert_eq!(fold(sum16(0, &f[l3..l4])), 0xffff, "IPv4 header checksum");
    }
    let addrs = if v6 {
        &f[l3 + 8..l3 + 40]
    } else {
        &f[l3 + 12..l3 + 20]
    };
    let pseudo = sum16(0, addrs) + u64::from(IP_PROTO_TCP) + tcp_len as u64;
    assert_eq!(fold(sum16(pseudo, &f[l4..])), 0xffff, "TCP checksum");
    let hl = usize::from(f[l4 + 12] >> 4) * 4;
    let seq = u32::from_be_bytes([f[l4 + 4], f[l4 + 5], f[l4 + 6], f[l4 + 7]]);
    (f[l4 + hl..].to_vec(), seq, f[l4 + 13])
}

fn run(raw: &mut [u8]) -> Vec<Seg> {
    let mut out = Vec::new();
    let mut scratch = Vec::new();
    segment(raw, &mut scratch, |f| out.push(Seg { frame: f.to_vec() })).unwrap();
    out
}

fn round_trip(v6: bool, vlan: bool, len: usize, mss: usize) -> Vec<Seg> {
    let data = payload(len);
    let flags = TCP_PSH | TCP_FIN | 0x10 | TCP_CWR;
    let mut raw = super_frame(v6, vlan, &data, mss, flags);
    let segs = run(&mut raw);
    assert_eq!(segs.len(), len.div_ceil(mss).max(1));
    let mut joined = Vec::new();
    let mut expect_seq = 0xffff_fc00u32;
    for (i, s) in segs.iter().enumerate() {
        let (p, seq, fl) = check(s);
        let (l3, _, _) = l3_l4(&s.frame);
        assert!(s.frame.len() - l3 <= mss + if v6 { 60 } else { 40 } + 12);
        assert_eq!(seq, expect_seq, "segment {i}");
        expect_seq = expect_seq.wrapping_add(p.len() as u32);
        let last = i + 1 == segs.len();
        assert_eq!(
            fl & (TCP_PSH | TCP_FIN) != 0,
            last,
            "PSH/FIN only on the last"
        );
        assert_eq!(fl & TCP_CWR != 0, i == 0, "CWR only on the first");
        if !v6 {
            let id = u16::from_be_bytes([s.frame[l3 + 4], s.frame[l3 + 5]]);
            assert_eq!(id, 0xfffeu16.wrapping_add(i as u16));
        }
        joined.extend_from_slice(&p);
    }
    assert_eq!(joined, data);
    segs
}

#[test]
fn payload_of_exactly_one_mss_is_one_frame_at_the_mtu() {
    // 12 bytes of TCP options: MSS is what the options leave of the MTU.
    let segs = round_trip(false, false, MSS4 - 12, MSS4 - 12);
    assert_eq!(segs[0].frame.len(), ETH_LEN + MTU);
    let segs = round_trip(true, false, MSS6 - 12, MSS6 - 12);
    assert_eq!(segs[0].frame.len(), ETH_LEN + MTU);
}

const ETH_LEN: usize = 14;

#[test]
fn one_byte_over_the_mss_gives_a_one_byte_tail() {
    let segs = round_trip(false, false, MSS4 - 12 + 1, MSS4 - 12);
    assert_eq!(segs.len(), 2);
    assert_eq!(segs[0].frame.len(), ETH_LEN + MTU);
    assert_eq!(segs[1].frame.len(), ETH_LEN + 20 + 32 + 1);
    round_trip(true, false, MSS6 - 12 + 1, MSS6 - 12);
}

#[test]
fn super_frames_with_odd_tails() {
    for len in [3 * 1338 + 7, 65_000, 64 * 1024 - 60 - 33, 2 * 1338 - 1, 1] {
        round_trip(false, false, len, 1338);
        round_trip(true, false, len, 1318);
        round_trip(false, true, len, 1338);
    }
    // A tiny MSS exercises many segments and the IPv4 id wrap.
    round_trip(false, false, 1001, 1);
}

#[test]
fn plain_frames_pass_through_and_partial_checksums_are_completed() {
    let data = payload(101);
    let mut raw = super_frame(false, false, &data, 1338, 0x18);
    let expect = {
        // The frame with a correct checksum, computed the long way.
        let mut f = raw[VNET_HDR_LEN..].to_vec();
        f[14 + 20 + 16..14 + 20 + 18].fill(0);
        let pseudo = sum16(0, &f[14 + 12..14 + 20]) + 6 + (f.len() - 34) as u64;
        let c = !fold(sum16(pseudo, &f[34..]));
        f[14 + 20 + 16..14 + 20 + 18].copy_from_slice(&c.to_be_bytes());
        f
    };
    // What the kernel puts in the field: the folded pseudo-header sum.
    let pseudo = fold(
        sum16(0, &raw[VNET_HDR_LEN + 26..VNET_HDR_LEN + 34])
            + 6
            + (raw.len() - VNET_HDR_LEN - 34) as u64,
    );
    raw[VNET_HDR_LEN + 50..VNET_HDR_LEN + 52].copy_from_slice(&pseudo.to_be_bytes());
    raw[1] = GSO_NONE;
    let segs = run(&mut raw);
    assert_eq!(segs.len(), 1);
    assert_eq!(segs[0].frame, expect);

    let mut plain = vec![0u8; VNET_HDR_LEN];
    plain.extend_from_slice(&payload(60));
    let segs = run(&mut plain);
    assert_eq!(segs[0].frame, payload(60));
}

#[test]
fn header_round_trips() {
    let h = VnetHdr {
        flags: 1,
        gso_type: 4,
        hdr_len: 66,
        gso_size: 1338,
        csum_start: 54,
        csum_offset: 16,
    };
    assert_eq!(VnetHdr::parse(&h.to_bytes()), Ok(h));
}

#[test]
fn malformed_offload_frames_are_rejected() {
    let mut scratch = Vec::new();
    let mut n = 0;
    assert_eq!(
        segment(&mut [0u8; 5], &mut scratch, |_| n += 1),
        Err(OffloadError::NoHeader)
    );
    let mut raw = super_frame(false, false, &payload(3000), 1338, 0x10);
    raw[1] = 3; // UFO (fragmenting UDP): never enabled on our TAPs
    assert_eq!(
        segment(&mut raw, &mut scratch, |_| n += 1),
        Err(OffloadError::UnsupportedGso(3))
    );
    let mut raw = super_frame(false, false, &payload(3000), 1338, 0x10);
    raw[1] = GSO_UDP_L4; // claims UDP over a TCP packet
    assert_eq!(
        segment(&mut raw, &mut scratch, |_| n += 1),
        Err(OffloadError::BadGsoFrame)
    );
    let mut raw = super_frame(false, false, &payload(3000), 1338, 0x10);
    raw[1] = GSO_TCPV6; // claims IPv6 over an IPv4 frame
    assert_eq!(
        segment(&mut raw, &mut scratch, |_| n += 1),
        Err(OffloadError::BadGsoFrame)
    );
    let mut raw = super_frame(false, false, &payload(3000), 0, 0x10);
    assert_eq!(
        segment(&mut raw, &mut scratch, |_| n += 1),
        Err(OffloadError::BadGsoFrame)
    );
    let mut raw = super_frame(false, false, &payload(10), 1338, 0x10);
    raw[8] = 0xff; // csum_start past the end
    raw[1] = GSO_NONE;
    assert_eq!(
        segment(&mut raw, &mut scratch, |_| n += 1),
        Err(OffloadError::BadChecksumOffsets)
    );
    assert_eq!(n, 0);
}

proptest! {
    #[test]
    fn segment_never_panics(mut raw in proptest::collection::vec(any::<u8>(), 0..300)) {
        let mut scratch = Vec::new();
        let _ = segment(&mut raw, &mut scratch, |_| {});
    }

    #[test]
    fn mutated_super_frames_never_panic(
        len in 1usize..4000,
        at in 0usize..120,
        byte in any::<u8>(),
        v6 in any::<bool>(),
    ) {
        let mut raw = super_frame(v6, false, &payload(len), 536, 0x10);
        let i = at.min(raw.len() - 1);
        raw[i] = byte;
        let mut scratch = Vec::new();
        let _ = segment(&mut raw, &mut scratch, |_| {});
    }
}

/// Segments a super-frame, then joins the segments again.
fn segments_of(v6: bool, len: usize, mss: usize, flags: u8) -> Vec<Vec<u8>> {
    let mut raw = super_frame(v6, false, &payload(len), mss, flags);
    run(&mut raw).into_iter().map(|s| s.frame).collect()
}

fn coalesce_all(frames: &[Vec<u8>]) -> Vec<(usize, Vec<u8>)> {
    let refs: Vec<&[u8]> = frames.iter().map(Vec::as_slice).collect();
    let mut i = 0;
    let mut v = Vec::new();
    let mut out = Vec::new();
    while i < refs.len() {
        let n = coalesce(&refs[i..], &mut out);
        assert!(n >= 1);
        v.push((n, out.clone()));
        i += n;
    }
    v
}

#[test]
fn coalesced_segments_resegment_to_the_same_frames() {
    for (v6, len, mss) in [
        (false, 3 * 1338 + 7, 1338),
        (true, 5 * 1318, 1318),
        (false, 64 * 1024 - 60 - 33, 1338),
        (false, 1338 + 1, 1338),
    ] {
        let segs = segments_of(v6, len, mss, TCP_ACK | TCP_PSH);
        let runs = coalesce_all(&segs);
        assert_eq!(runs.len(), 1, "one run for {len}");
        let (n, mut sup) = runs.into_iter().next().unwrap();
        assert_eq!(n, segs.len());
        let h = VnetHdr::parse(&sup).unwrap();
        assert_eq!(usize::from(h.gso_size), mss);
        assert_eq!(h.flags, F_NEEDS_CSUM);
        let again: Vec<Vec<u8>> = run(&mut sup).into_iter().map(|s| s.frame).collect();
        assert_eq!(again, segs);
    }
}

#[test]
fn runs_stop_at_gaps_other_flows_and_odd_segments() {
    let segs = segments_of(false, 4 * 1338, 1338, TCP_ACK);
    let refs: Vec<&[u8]> = segs.iter().map(Vec::as_slice).collect();
    let mut out = Vec::new();
    // A lost segment: the run stops before the gap.
    let gap = [refs[0], refs[1], refs[3]];
    assert_eq!(coalesce(&gap, &mut out), 2);
    // Another flow in between.
    let other = segments_of(true, 3 * 1318, 1318, TCP_ACK);
    let mixed = [refs[0], other[0].as_slice(), refs[1]];
    assert_eq!(coalesce(&mixed, &mut out), 1);
    assert!(out.is_empty());
    // A single frame is left for a plain write.
    assert_eq!(coalesce(&refs[..1], &mut out), 1);
    assert!(out.is_empty());
    assert_eq!(coalesce(&[], &mut out), 0);
    // A short segment ends the run and is part of it.
    let short = segments_of(false, 1338 + 5, 1338, TCP_ACK);
    let v = [short[0].as_slice(), short[1].as_slice(), refs[2]];
    assert_eq!(coalesce(&v, &mut out), 2);
    // FIN/SYN segments and non-TCP frames are never joined.
    let fin = segments_of(false, 2 * 1338, 1338, TCP_ACK | TCP_FIN);
    let v = [fin[0].as_slice(), fin[1].as_slice()];
    assert_eq!(coalesce(&v, &mut out), 1);
    let not_tcp = vec![0u8; 100];
    assert_eq!(coalesce(&[&not_tcp, &not_tcp], &mut out), 1);
    // The coalesced IPv4 header checksum is right.
    assert_eq!(coalesce(&refs, &mut out), 4);
    let f = &out[VNET_HDR_LEN..];
    assert_eq!(fold(sum16(0, &f[14..34])), 0xffff);
    assert_eq!(
        usize::from(u16::from_be_bytes([f[16], f[17]])),
        f.len() - 14
    );
}

proptest! {
    #[test]
    fn coalesce_never_panics(
        frames in proptest::collection::vec(proptest::collection::vec(any::<u8>(), 0..200), 0..5),
    ) {
        let refs: Vec<&[u8]> = frames.iter().map(Vec::as_slice).collect();
        let mut out = Vec::new();
        let n = coalesce(&refs, &mut out);
        prop_assert!(n <= refs.len());
    }

    #[test]
    fn mutated_runs_never_panic(at in 0usize..120, byte in any::<u8>(), which in 0usize..3) {
        let mut segs = segments_of(false, 3 * 536, 536, TCP_ACK);
        let i = at.min(segs[which].len() - 1);
        segs[which][i] = byte;
        let refs: Vec<&[u8]> = segs.iter().map(Vec::as_slice).collect();
        let mut out = Vec::new();
        prop_assert!(coalesce(&refs, &mut out) >= 1);
    }
}

/// A `GSO_UDP_L4` super-frame as the kernel hands it over for a pod's
/// `UDP_SEGMENT` send: IP and UDP lengths of the whole, the pseudo-header
/// sum in the UDP checksum field.
fn udp_super_frame(v6: bool, data: &[u8], size: usize) -> Vec<u8> {
    let mut f = vec![0u8; VNET_HDR_LEN];
    f.extend_from_slice(&[2, 0, 0, 0, 0, 2, 2, 0, 0, 0, 0, 1]);
    f.extend_from_slice(if v6 { &[0x86, 0xdd] } else { &[0x08, 0x00] });
    let udp_len = 8 + data.len();
    if v6 {
        f.extend_from_slice(&[0x60, 0, 0, 0]);
        f.extend_from_slice(&(udp_len as u16).to_be_bytes());
        f.extend_from_slice(&[IP_PROTO_UDP, 64]);
        f.extend_from_slice(&[0xfd; 16]);
        f.extend_from_slice(&[0xfe; 16]);
    } else {
        f.extend_from_slice(&[0x45, 0]);
        f.extend_from_slice(&((20 + udp_len) as u16).to_be_bytes());
        f.extend_from_slice(&[0xff, 0xf0, 0x40, 0, 64, IP_PROTO_UDP, 0, 0]);
        f.extend_from_slice(&[10, 9, 0, 1, 10, 9, 0, 2]);
    }
    let l4 = f.len() - VNET_HDR_LEN;
    f.extend_from_slice(&[0x1f, 0x90, 0x14, 0xe9]);
    f.extend_from_slice(&((udp_len as u16).to_be_bytes()));
    f.extend_from_slice(&[0, 0]);
    f.extend_from_slice(data);
    let hdr = VnetHdr {
        flags: F_NEEDS_CSUM,
        gso_type: GSO_UDP_L4,
        hdr_len: (l4 + 8) as u16,
        gso_size: size as u16,
        csum_start: l4 as u16,
        csum_offset: 6,
    };
    f[..VNET_HDR_LEN].copy_from_slice(&hdr.to_bytes());
    f
}

/// Checks one UDP datagram the way a receiving stack would (lengths, IPv4
/// header checksum, UDP checksum) and returns its payload and IPv4 id.
fn check_udp(f: &[u8]) -> (Vec<u8>, u16) {
    let (l3, l4, v6) = l3_l4(f);
    let udp_len = f.len() - l4;
    assert_eq!(
        usize::from(u16::from_be_bytes([f[l4 + 4], f[l4 + 5]])),
        udp_len
    );
    let addrs = if v6 {
        assert_eq!(
            usize::from(u16::from_be_bytes([f[l3 + 4], f[l3 + 5]])),
            udp_len
        );
        &f[l3 + 8..l3 + 40]
    } else {
        assert_eq!(
            usize::from(u16::from_be_bytes([f[l3 + 2], f[l3 + 3]])),
            f.len() - l3
        );
        assert_eq!(fold(sum16(0, &f[l3..l4])), 0xffff, "IPv4 header checksum");
        &f[l3 + 12..l3 + 20]
    };
    assert_ne!(&f[l4 + 6..l4 + 8], &[0, 0], "UDP checksum left out");
    let sum = sum16(
        sum16(0, addrs) + u64::from(IP_PROTO_UDP) + udp_len as u64,
        &f[l4..],
    );
    assert_eq!(fold(sum), 0xffff, "UDP checksum");
    let id = if v6 {
        0
    } else {
        u16::from_be_bytes([f[l3 + 4], f[l3 + 5]])
    };
    (f[l4 + 8..].to_vec(), id)
}

fn udp_segments(v6: bool, len: usize, size: usize) -> Vec<Vec<u8>> {
    let mut raw = udp_super_frame(v6, &payload(len), size);
    run(&mut raw).into_iter().map(|s| s.frame).collect()
}

#[test]
fn udp_super_frames_become_datagrams_at_the_mtu_with_odd_tails() {
    const MAX4: usize = MTU - 28;
    const MAX6: usize = MTU - 48;
    for (v6, len, size, want) in [
        // Exactly one datagram at the MTU.
        (false, MAX4, MAX4, vec![MAX4]),
        (true, MAX6, MAX6, vec![MAX6]),
        // One byte over: a one-byte tail.
        (false, MAX4 + 1, MAX4, vec![MAX4, 1]),
        (true, MAX6 + 1, MAX6, vec![MAX6, 1]),
        // Small datagrams with an odd tail, and a run of 64.
        (false, 10 * 64 + 13, 64, [vec![64; 10], vec![13]].concat()),
        (true, 64 * 1000, 1000, vec![1000; 64]),
        // An empty payload is one empty datagram.
        (false, 0, 100, vec![0]),
    ] {
        let segs = udp_segments(v6, len, size);
        let mut data = Vec::new();
        let mut ids = Vec::new();
        let mut lens = Vec::new();
        for s in &segs {
            let (p, id) = check_udp(s);
            lens.push(p.len());
            ids.push(id);
            data.extend_from_slice(&p);
        }
        assert_eq!(lens, want, "v6 {v6} len {len} size {size}");
        assert_eq!(data, payload(len));
        if !v6 {
            let first = ids[0];
            for (i, id) in ids.iter().enumerate() {
                assert_eq!(*id, first.wrapping_add(i as u16), "IPv4 ids count up");
            }
        }
    }
}

#[test]
fn udp_runs_coalesce_and_resegment_to_the_same_datagrams() {
    for (v6, len, size) in [
        (false, 40 * 64, 64),
        (false, 3 * 1362 + 5, 1362),
        (true, 7 * 1342, 1342),
        (true, 2 * 100 + 1, 100),
    ] {
        let segs = udp_segments(v6, len, size);
        let runs = {
            let refs: Vec<&[u8]> = segs.iter().map(Vec::as_slice).collect();
            let mut out = Vec::new();
            let n = coalesce(&refs, &mut out);
            (n, out)
        };
        assert_eq!(runs.0, segs.len(), "one run for {len}/{size}");
        let mut sup = runs.1;
        let h = VnetHdr::parse(&sup).unwrap();
        assert_eq!(h.gso_type, GSO_UDP_L4);
        assert_eq!(usize::from(h.gso_size), size);
        let again: Vec<Vec<u8>> = run(&mut sup).into_iter().map(|s| s.frame).collect();
        assert_eq!(again, segs);
    }
}

/// TCP and UDP runs go through one IP parse and one super-frame finish:
/// runs of both, back to back, come out as one super-frame each that
/// re-segments to exactly the frames that went in.
#[test]
fn tcp_and_udp_runs_back_to_back_resegment_to_the_same_frames() {
    for v6 in [false, true] {
        let tcp = segments_of(v6, 3 * 1000 + 9, 1000, TCP_ACK);
        let udp = udp_segments(v6, 5 * 200 + 1, 200);
        let frames: Vec<Vec<u8>> = tcp.iter().chain(&udp).chain(&tcp).cloned().collect();
        let runs = coalesce_all(&frames);
        let lens: Vec<usize> = runs.iter().map(|(n, _)| *n).collect();
        assert_eq!(lens, [tcp.len(), udp.len(), tcp.len()], "v6 {v6}");
        let mut again = Vec::new();
        for (_, mut sup) in runs {
            again.extend(run(&mut sup).into_iter().map(|s| s.frame));
        }
        assert_eq!(again, frames, "v6 {v6}");
    }
}

#[test]
fn udp_runs_stop_where_a_receiver_could_tell() {
    let segs = udp_segments(false, 100 * 64, 64);
    let refs: Vec<&[u8]> = segs.iter().map(Vec::as_slice).collect();
    let mut out = Vec::new();
    // At most 64 datagrams per super-frame.
    assert_eq!(coalesce(&refs, &mut out), 64);
    // An IPv4 id that does not count up (a lost or reordered datagram).
    assert_eq!(coalesce(&[refs[0], refs[1], refs[3]], &mut out), 2);
    // Another flow (other port) in between.
    let mut other = segs[1].clone();
    other[14 + 20 + 1] ^= 1;
    assert_eq!(coalesce(&[refs[0], &other, refs[2]], &mut out), 1);
    assert!(out.is_empty());
    // A longer datagram after shorter ones, and a shorter one ends the run.
    let long = udp_segments(false, 2 * 65, 65);
    assert_eq!(coalesce(&[refs[0], &long[1]], &mut out), 1);
    let tail = udp_segments(false, 64 + 3, 64);
    assert_eq!(coalesce(&[&tail[0], &tail[1], refs[2]], &mut out), 2);
    // Without DF, a fragment, or without a UDP checksum: never joined.
    for (at, byte) in [(14 + 6, 0x00), (14 + 6, 0x20), (14 + 20 + 6, 0)] {
        let mut a = segs[0].clone();
        let mut b = segs[1].clone();
        a[at] = byte;
        b[at] = byte;
        if at == 14 + 20 + 6 {
            a[at + 1] = 0;
            b[at + 1] = 0;
        }
        assert_eq!(coalesce(&[&a, &b], &mut out), 1, "byte {at} = {byte:#x}");
    }
}

proptest! {
    #[test]
    fn mutated_udp_super_frames_never_panic(at in 0usize..80, byte in any::<u8>()) {
        let mut raw = udp_super_frame(false, &payload(300), 64);
        let i = at.min(raw.len() - 1);
        raw[i] = byte;
        let mut scratch = Vec::new();
        let _ = segment(&mut raw, &mut scratch, |_| {});
    }

    #[test]
    fn mutated_udp_runs_never_panic(at in 0usize..60, byte in any::<u8>(), which in 0usize..3) {
        let mut segs = udp_segments(true, 3 * 64, 64);
        let i = at.min(segs[which].len() - 1);
        segs[which][i] = byte;
        let refs: Vec<&[u8]> = segs.iter().map(Vec::as_slice).collect();
        let mut out = Vec::new();
        prop_assert!(coalesce(&refs, &mut out) >= 1);
    }
}
