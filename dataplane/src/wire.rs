//! The inner packet that travels inside WireGuard: IPv4 / UDP dst 4789 /
//! VXLAN (RFC 7348) / Ethernet. A stock Linux host with a kernel `vxlan`
//! device on its WireGuard interface produces and accepts exactly this.

use std::net::Ipv4Addr;

/// IANA VXLAN port.
pub const VXLAN_PORT: u16 = 4789;
/// IPv4 (20, no options) + UDP (8) + VXLAN (8).
pub const OVERHEAD: usize = 36;
/// Ethernet header without VLAN tag.
pub const ETH_HEADER: usize = 14;
/// The largest VNI (24 bits).
pub const MAX_VNI: u32 = 0x00ff_ffff;

const VXLAN_FLAG_I: u8 = 0x08;
const IP_PROTO_UDP: u8 = 17;
const DEFAULT_TTL: u8 = 64;

/// Why an inner packet was rejected.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    #[error("packet too short")]
    Truncated,
    #[error("not IPv4")]
    BadIpVersion,
    #[error("bad IPv4 header length")]
    BadIpHeaderLength,
    #[error("IPv4 total length does not match the packet")]
    BadIpTotalLength,
    #[error("IPv4 header checksum mismatch")]
    BadIpChecksum,
    #[error("fragmented IPv4 packet")]
    Fragment,
    #[error("not UDP")]
    NotUdp,
    #[error("UDP destination port is not 4789")]
    NotVxlanPort,
    #[error("bad UDP length")]
    BadUdpLength,
    #[error("VXLAN flags invalid (I flag must be the only flag set)")]
    BadVxlanFlags,
    #[error("inner Ethernet frame too short")]
    FrameTooShort,
}

/// A decoded inner packet; `frame` borrows from the input.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Decoded<'a> {
    pub src: Ipv4Addr,
    pub dst: Ipv4Addr,
    pub vni: u32,
    pub frame: &'a [u8],
}

/// The ones' complement sum used by the IPv4 header checksum.
pub fn ipv4_checksum(header: &[u8]) -> u16 {
    let mut sum: u32 = 0;
    for chunk in header.chunks(2) {
        let word = match chunk {
            [a, b] => u16::from_be_bytes([*a, *b]),
            [a] => u16::from_be_bytes([*a, 0]),
            _ => 0,
        };
        sum += u32::from(word);
    }
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    // The loop above folds every carry, so the value fits in 16 bits.
    !(sum as u16)
}

/// Spread flows over UDP source ports like the kernel does, so that ECMP
/// and RSS on the receiving side can tell flows apart.
pub fn flow_src_port(frame: &[u8]) -> u16 {
    // FNV-1a over the Ethernet addresses, ethertype and the start of the
    // payload (IP addresses / ports for the common cases).
    let mut h: u32 = 0x811c_9dc5;
    for b in frame.iter().take(ETH_HEADER + 24) {
        h ^= u32::from(*b);
        h = h.wrapping_mul(0x0100_0193);
    }
    49152 + (h % 16384) as u16
}

/// Writes IPv4/UDP/VXLAN headers followed by `frame` into `out` (cleared first).
pub fn encode(out: &mut Vec<u8>, src: Ipv4Addr, dst: Ipv4Addr, vni: u32, frame: &[u8]) {
    out.clear();
    let total = OVERHEAD + frame.len();
    // Frames are bounded by the network MTU (checked by the caller), far
    // below 64 KiB; saturate rather than wrap if someone passes more.
    let total16 = u16::try_from(total).unwrap_or(u16::MAX);
    let udp_len = total16.saturating_sub(20);
    out.reserve(total);
    out.extend_from_slice(&[0x45, 0x00]);
    out.extend_from_slice(&total16.to_be_bytes());
    out.extend_from_slice(&[0, 0, 0x40, 0x00]); // id 0, don't fragment
    out.extend_from_slice(&[DEFAULT_TTL, IP_PROTO_UDP, 0, 0]);
    out.extend_from_slice(&src.octets());
    out.extend_from_slice(&dst.octets());
    let csum = ipv4_checksum(&out[..20]);
    out[10..12].copy_from_slice(&csum.to_be_bytes());
    out.extend_from_slice(&flow_src_port(frame).to_be_bytes());
    out.extend_from_slice(&VXLAN_PORT.to_be_bytes());
    out.extend_from_slice(&udp_len.to_be_bytes());
    out.extend_from_slice(&[0, 0]); // no UDP checksum (allowed for IPv4, kernel default)
    let v = (vni & MAX_VNI).to_be_bytes();
    out.extend_from_slice(&[VXLAN_FLAG_I, 0, 0, 0, v[1], v[2], v[3], 0]);
    out.extend_from_slice(frame);
}

/// One fragment of an inner IPv4 packet; slices borrow from the input.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Fragment<'a> {
    pub src: Ipv4Addr,
    pub dst: Ipv4Addr,
    pub id: u16,
    pub protocol: u8,
    /// Where the payload goes in the original packet's payload, in bytes.
    pub offset: usize,
    /// More fragments follow (MF).
    pub more: bool,
    /// The IPv4 header, options included.
    pub header: &'a [u8],
    pub payload: &'a [u8],
}

/// The IPv4 packet without trailing padding and its header length, once
/// version, lengths and header checksum are right.
fn ipv4(pkt: &[u8]) -> Result<(&[u8], usize), DecodeError> {
    let first = *pkt.first().ok_or(DecodeError::Truncated)?;
    if first >> 4 != 4 {
        return Err(DecodeError::BadIpVersion);
    }
    let ihl = usize::from(first & 0x0f) * 4;
    if ihl < 20 {
        return Err(DecodeError::BadIpHeaderLength);
    }
    if pkt.len() < ihl {
        return Err(DecodeError::Truncated);
    }
    let total = usize::from(u16::from_be_bytes([pkt[2], pkt[3]]));
    // boringtun may hand us trailing padding, never less than the header says.
    if total < ihl || total > pkt.len() {
        return Err(DecodeError::BadIpTotalLength);
    }
    let pkt = &pkt[..total];
    if ipv4_checksum(&pkt[..ihl]) != 0 {
        return Err(DecodeError::BadIpChecksum);
    }
    Ok((pkt, ihl))
}

/// The fragment an inner packet is, or `None` when it is a whole packet
/// (or no valid IPv4 packet at all: [`decode`] says why).
pub fn fragment(pkt: &[u8]) -> Option<Fragment<'_>> {
    let (pkt, ihl) = ipv4(pkt).ok()?;
    let frag = u16::from_be_bytes([pkt[6], pkt[7]]);
    if frag & 0x3fff == 0 {
        return None;
    }
    Some(Fragment {
        src: Ipv4Addr::new(pkt[12], pkt[13], pkt[14], pkt[15]),
        dst: Ipv4Addr::new(pkt[16], pkt[17], pkt[18], pkt[19]),
        id: u16::from_be_bytes([pkt[4], pkt[5]]),
        protocol: pkt[9],
        offset: usize::from(frag & 0x1fff) * 8,
        more: frag & 0x2000 != 0,
        header: &pkt[..ihl],
        payload: &pkt[ihl..],
    })
}

/// Parses an inner IPv4/UDP/VXLAN packet. Never panics on any input.
pub fn decode(pkt: &[u8]) -> Result<Decoded<'_>, DecodeError> {
    let (pkt, ihl) = ipv4(pkt)?;
    let frag = u16::from_be_bytes([pkt[6], pkt[7]]);
    if frag & 0x3fff != 0 {
        return Err(DecodeError::Fragment);
    }
    if pkt[9] != IP_PROTO_UDP {
        return Err(DecodeError::NotUdp);
    }
    let src = Ipv4Addr::new(pkt[12], pkt[13], pkt[14], pkt[15]);
    let dst = Ipv4Addr::new(pkt[16], pkt[17], pkt[18], pkt[19]);
    let udp = &pkt[ihl..];
    if udp.len() < 16 {
        return Err(DecodeError::Truncated);
    }
    if u16::from_be_bytes([udp[2], udp[3]]) != VXLAN_PORT {
        return Err(DecodeError::NotVxlanPort);
    }
    let udp_len = usize::from(u16::from_be_bytes([udp[4], udp[5]]));
    if udp_len != udp.len() {
        return Err(DecodeError::BadUdpLength);
    }
    let vx = &udp[8..16];
    if vx[0] != VXLAN_FLAG_I {
        return Err(DecodeError::BadVxlanFlags);
    }
    let vni = u32::from_be_bytes([0, vx[4], vx[5], vx[6]]);
    let frame = &udp[16..];
    if frame.len() < ETH_HEADER {
        return Err(DecodeError::FrameTooShort);
    }
    Ok(Decoded {
        src,
        dst,
        vni,
        frame,
    })
}

/// Destination and source MAC of an Ethernet frame (caller checked length).
pub fn macs(frame: &[u8]) -> Option<([u8; 6], [u8; 6])> {
    let dst: [u8; 6] = frame.get(0..6)?.try_into().ok()?;
    let src: [u8; 6] = frame.get(6..12)?.try_into().ok()?;
    Some((dst, src))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn frame(len: usize) -> Vec<u8> {
        let mut f = vec![0xff; 6];
        f.extend_from_slice(&[2, 0, 0, 0, 0, 1, 0x08, 0x06]);
        f.resize(len, 0xab);
        f
    }

    #[test]
    fn encode_then_decode_round_trips() {
        let f = frame(98);
        let mut out = Vec::new();
        let (a, b) = (Ipv4Addr::new(100, 64, 0, 1), Ipv4Addr::new(100, 64, 0, 2));
        encode(&mut out, a, b, 0x12_3456, &f);
        assert_eq!(out.len(), OVERHEAD + f.len());
        assert_eq!(ipv4_checksum(&out[..20]), 0, "header checksum verifies");
        let d = decode(&out).unwrap();
        assert_eq!((d.src, d.dst, d.vni, d.frame), (a, b, 0x12_3456, &f[..]));
    }

    #[test]
    fn checksum_matches_a_known_header() {
        // Classic example header from RFC 1071 discussions (checksum 0xb861).
        let h = [
            0x45, 0x00, 0x00, 0x73, 0x00, 0x00, 0x40, 0x00, 0x40, 0x11, 0x00, 0x00, 0xc0, 0xa8,
            0x00, 0x01, 0xc0, 0xa8, 0x00, 0xc7,
        ];
        assert_eq!(ipv4_checksum(&h), 0xb861);
    }

    #[test]
    fn decode_rejects_bad_headers() {
        let mut good = Vec::new();
        encode(
            &mut good,
            Ipv4Addr::LOCALHOST,
            Ipv4Addr::LOCALHOST,
            7,
            &frame(60),
        );
        let fix_csum = |p: &mut Vec<u8>| {
            p[10] = 0;
            p[11] = 0;
            let c = ipv4_checksum(&p[..20]);
            p[10..12].copy_from_slice(&c.to_be_bytes());
        };
        let mut v6 = good.clone();
        v6[0] = 0x65;
        assert_eq!(decode(&v6), Err(DecodeError::BadIpVersion));
        let mut csum = good.clone();
        csum[10] ^= 1;
        assert_eq!(decode(&csum), Err(DecodeError::BadIpChecksum));
        let mut flags = good.clone();
        flags[28] = 0x0c;
        assert_eq!(decode(&flags), Err(DecodeError::BadVxlanFlags));
        let mut noi = good.clone();
        noi[28] = 0;
        assert_eq!(decode(&noi), Err(DecodeError::BadVxlanFlags));
        let mut port = good.clone();
        port[23] = 0x01;
        assert_eq!(decode(&port), Err(DecodeError::NotVxlanPort));
        let mut tcp = good.clone();
        tcp[9] = 6;
        fix_csum(&mut tcp);
        assert_eq!(decode(&tcp), Err(DecodeError::NotUdp));
        let mut frag = good.clone();
        frag[6] = 0x20; // more fragments
        fix_csum(&mut frag);
        assert_eq!(decode(&frag), Err(DecodeError::Fragment));
        assert_eq!(
            decode(&good[..good.len() - 1]),
            Err(DecodeError::BadIpTotalLength)
        );
        assert_eq!(decode(&good[..10]), Err(DecodeError::Truncated));
        assert_eq!(decode(&[]), Err(DecodeError::Truncated));
        let mut udp_len = good.clone();
        udp_len[25] ^= 1;
        assert_eq!(decode(&udp_len), Err(DecodeError::BadUdpLength));
        let mut short = Vec::new();
        encode(
            &mut short,
            Ipv4Addr::LOCALHOST,
            Ipv4Addr::LOCALHOST,
            7,
            &[1, 2, 3],
        );
        assert_eq!(decode(&short), Err(DecodeError::FrameTooShort));
    }

    #[test]
    fn trailing_padding_is_ignored() {
        let f = frame(60);
        let mut out = Vec::new();
        encode(&mut out, Ipv4Addr::LOCALHOST, Ipv4Addr::LOCALHOST, 1, &f);
        out.extend_from_slice(&[0; 12]);
        assert_eq!(decode(&out).unwrap().frame, &f[..]);
    }

    proptest! {
        #[test]
        fn decode_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..200)) {
            let _ = decode(&bytes);
        }

        #[test]
        fn mutated_valid_packets_never_panic(
            len in 14usize..300, vni in 0u32..=MAX_VNI, idx in any::<usize>(), val in any::<u8>(), cut in any::<usize>()
        ) {
            let mut out = Vec::new();
            encode(&mut out, Ipv4Addr::new(10, 0, 0, 1), Ipv4Addr::new(10, 0, 0, 2), vni, &frame(len));
            prop_assert_eq!(decode(&out).map(|d| d.vni), Ok(vni));
            let i = idx % out.len();
            out[i] = val;
            let _ = decode(&out);
            let c = cut % (out.len() + 1);
            let _ = decode(&out[..c]);
        }
    }
}
