//! Coalescing for TAP writes: in-order runs of one TCP or UDP flow become
//! one super-frame, which the pod's stack takes in one trip through bridge
//! and veth (the receive-side counterpart of [`super::segment`]).

use super::{
    ETHERTYPE_IPV4, ETHERTYPE_IPV6, F_DATA_VALID, F_NEEDS_CSUM, GSO_TCPV4, GSO_TCPV6, GSO_UDP_L4,
    IP_PROTO_TCP, IP_PROTO_UDP, TCP_ACK, TCP_PSH, VNET_HDR_LEN, VnetHdr, fold, sum16,
};

/// Header of a frame written to the TAP as it is: no GSO, checksum already
/// verified (WireGuard authenticated it; the kernel's WireGuard also marks
/// what it decrypts this way).
pub const PLAIN_RX_HDR: [u8; VNET_HDR_LEN] = [F_DATA_VALID, 0, 0, 0, 0, 0, 0, 0, 0, 0];

/// The parts of a TCP segment that decide whether it can join a run.
struct TcpSeg {
    v4: bool,
    l3: usize,
    l4: usize,
    hdrs: usize,
    seq: u32,
    flags: u8,
    payload: usize,
}

fn parse_tcp(f: &[u8]) -> Option<TcpSeg> {
    let l3 = 14;
    let et = u16::from_be_bytes([*f.get(12)?, *f.get(13)?]);
    let (v4, l4, ip_end) = match et {
        ETHERTYPE_IPV4 => {
            let ip = f.get(l3..l3 + 20)?;
            // No options, no fragments, TCP.
            if ip[0] != 0x45
                || u16::from_be_bytes([ip[6], ip[7]]) & 0x3fff != 0
                || ip[9] != IP_PROTO_TCP
            {
                return None;
            }
            (
                true,
                l3 + 20,
                l3 + usize::from(u16::from_be_bytes([ip[2], ip[3]])),
            )
        }
        ETHERTYPE_IPV6 => {
            let ip = f.get(l3..l3 + 40)?;
            if ip[0] >> 4 != 6 || ip[6] != IP_PROTO_TCP {
                return None;
            }
            (
                false,
                l3 + 40,
                l3 + 40 + usize::from(u16::from_be_bytes([ip[4], ip[5]])),
            )
        }
        _ => return None,
    };
    // Padded frames (short ACKs) never join: the IP length must be exact.
    if ip_end != f.len() {
        return None;
    }
    let thlen = usize::from(f.get(l4 + 12)? >> 4) * 4;
    let hdrs = l4 + thlen;
    if thlen < 20 || hdrs > f.len() {
        return None;
    }
    Some(TcpSeg {
        v4,
        l3,
        l4,
        hdrs,
        seq: u32::from_be_bytes([f[l4 + 4], f[l4 + 5], f[l4 + 6], f[l4 + 7]]),
        flags: f[l4 + 13],
        payload: f.len() - hdrs,
    })
}

/// Whether `g` (segment `t`) belongs to the same flow and shape as `f` (`s`):
/// identical headers except lengths, IPv4 id and checksums, sequence number,
/// window and PSH.
fn same_flow(f: &[u8], s: &TcpSeg, g: &[u8], t: &TcpSeg) -> bool {
    if s.v4 != t.v4 || s.hdrs != t.hdrs || f[..s.l3] != g[..t.l3] {
        return false;
    }
    let ip_same = if s.v4 {
        f[s.l3..s.l3 + 2] == g[s.l3..s.l3 + 2]
            && f[s.l3 + 6..s.l3 + 10] == g[s.l3 + 6..s.l3 + 10]
            && f[s.l3 + 12..s.l4] == g[s.l3 + 12..s.l4]
    } else {
        f[s.l3..s.l3 + 4] == g[s.l3..s.l3 + 4] && f[s.l3 + 6..s.l4] == g[s.l3 + 6..s.l4]
    };
    let l4 = s.l4;
    ip_same
        && f[l4..l4 + 4] == g[l4..l4 + 4]
        && f[l4 + 8..l4 + 13] == g[l4 + 8..l4 + 13]
        && f[l4 + 20..s.hdrs] == g[l4 + 20..s.hdrs]
        && (s.flags & !TCP_PSH) == (t.flags & !TCP_PSH)
}

/// Receive-side coalescing, the inverse of [`segment`]: joins the longest
/// prefix of `frames` that forms one in-order run of a TCP flow (equal-sized
/// segments, a shorter or PSH one last) or of a UDP flow (see
/// [`coalesce_udp`]) into a super-frame with its virtio-net header in `out`,
/// for one TAP write. Returns how many frames it
/// took (0 for none). For a single frame `out` is left empty: write it with
/// [`PLAIN_RX_HDR`].
pub fn coalesce(frames: &[&[u8]], out: &mut Vec<u8>) -> usize {
    out.clear();
    let Some(first) = frames.first() else {
        return 0;
    };
    let Some(s) = parse_tcp(first) else {
        return coalesce_udp(frames, out);
    };
    if s.flags & !(TCP_ACK | TCP_PSH) != 0 || s.flags & TCP_PSH != 0 || s.payload == 0 {
        return 1;
    }
    let max_l4 = if s.v4 { 65_535 - 20 } else { 65_535 };
    let mut l4_len = first.len() - s.l4;
    let mut next = s.seq.wrapping_add(s.payload as u32);
    let mut n = 1;
    let mut psh = false;
    for g in &frames[1..] {
        let Some(t) = parse_tcp(g) else { break };
        if t.seq != next
            || t.payload == 0
            || t.payload > s.payload
            || l4_len + t.payload > max_l4
            || !same_flow(first, &s, g, &t)
        {
            break;
        }
        if n == 1 {
            out.extend_from_slice(&[0; VNET_HDR_LEN]);
            out.extend_from_slice(first);
        }
        out.extend_from_slice(&g[t.hdrs..]);
        n += 1;
        l4_len += t.payload;
        next = next.wrapping_add(t.payload as u32);
        psh = t.flags & TCP_PSH != 0;
        if psh || t.payload < s.payload {
            break;
        }
    }
    if n == 1 {
        return 1;
    }
    let f = &mut out[VNET_HDR_LEN..];
    let (l3, l4) = (s.l3, s.l4);
    if s.v4 {
        f[l3 + 2..l3 + 4].copy_from_slice(&((20 + l4_len) as u16).to_be_bytes());
        f[l3 + 10..l3 + 12].fill(0);
        let c = !fold(sum16(0, &f[l3..l4]));
        f[l3 + 10..l3 + 12].copy_from_slice(&c.to_be_bytes());
    } else {
        f[l3 + 4..l3 + 6].copy_from_slice(&(l4_len as u16).to_be_bytes());
    }
    if psh {
        f[l4 + 13] |= TCP_PSH;
    }
    // CHECKSUM_PARTIAL: the field holds the pseudo-header sum, as the
    // kernel's own TSO packets do.
    let addrs = if s.v4 {
        &f[l3 + 12..l3 + 20]
    } else {
        &f[l3 + 8..l3 + 40]
    };
    let pseudo = fold(sum16(0, addrs) + u64::from(IP_PROTO_TCP) + l4_len as u64);
    f[l4 + 16..l4 + 18].copy_from_slice(&pseudo.to_be_bytes());
    let hdr = VnetHdr {
        flags: F_NEEDS_CSUM,
        gso_type: if s.v4 { GSO_TCPV4 } else { GSO_TCPV6 },
        hdr_len: s.hdrs as u16,
        gso_size: s.payload as u16,
        csum_start: l4 as u16,
        csum_offset: 16,
    };
    out[..VNET_HDR_LEN].copy_from_slice(&hdr.to_bytes());
    n
}

/// The parts of a UDP datagram that decide whether it can join a run.
struct UdpDgram {
    v4: bool,
    l3: usize,
    l4: usize,
    id: u16,
    payload: usize,
}

fn parse_udp(f: &[u8]) -> Option<UdpDgram> {
    let l3 = 14;
    let et = u16::from_be_bytes([*f.get(12)?, *f.get(13)?]);
    let (v4, l4, ip_end, id) = match et {
        ETHERTYPE_IPV4 => {
            let ip = f.get(l3..l3 + 20)?;
            // No options; not a fragment; DF set, so the IPv4 id carries
            // no meaning for the receiver.
            if ip[0] != 0x45
                || u16::from_be_bytes([ip[6], ip[7]]) != 0x4000
                || ip[9] != IP_PROTO_UDP
            {
                return None;
            }
            (
                true,
                l3 + 20,
                l3 + usize::from(u16::from_be_bytes([ip[2], ip[3]])),
                u16::from_be_bytes([ip[4], ip[5]]),
            )
        }
        ETHERTYPE_IPV6 => {
            let ip = f.get(l3..l3 + 40)?;
            if ip[0] >> 4 != 6 || ip[6] != IP_PROTO_UDP {
                return None;
            }
            (
                false,
                l3 + 40,
                l3 + 40 + usize::from(u16::from_be_bytes([ip[4], ip[5]])),
                0,
            )
        }
        _ => return None,
    };
    if ip_end != f.len() {
        return None;
    }
    let udp = f.get(l4..l4 + 8)?;
    let udp_len = usize::from(u16::from_be_bytes([udp[4], udp[5]]));
    // A zero checksum (IPv4 "none") would be recomputed by segmentation:
    // leave such datagrams alone.
    if udp_len != f.len() - l4 || udp[6..8] == [0, 0] {
        return None;
    }
    Some(UdpDgram {
        v4,
        l3,
        l4,
        id,
        payload: udp_len - 8,
    })
}

/// Most datagrams joined into one UDP super-frame (the kernel's own
/// `UDP_MAX_SEGMENTS` for a send).
const MAX_UDP_SEGMENTS: usize = 64;

/// The UDP half of [`coalesce`]: a run of datagrams of one flow (same
/// addresses, ports, TOS and TTL; equal payloads, a shorter one last; IPv4
/// ids counting up by one, as the kernel's segmentation would write them)
/// becomes one `GSO_UDP_L4` super-frame. The receiving pod's stack splits
/// it again before any socket sees it, so applications get the same
/// datagrams; the bridge and veth on the way carry one packet instead of
/// up to 64.
fn coalesce_udp(frames: &[&[u8]], out: &mut Vec<u8>) -> usize {
    let Some(first) = frames.first() else {
        return 0;
    };
    let Some(s) = parse_udp(first) else {
        return 1;
    };
    if s.payload == 0 {
        return 1;
    }
    let max_l4 = if s.v4 { 65_535 - 20 } else { 65_535 };
    let mut l4_len = first.len() - s.l4;
    let mut n = 1;
    for g in &frames[1..] {
        if n == MAX_UDP_SEGMENTS {
            break;
        }
        let Some(t) = parse_udp(g) else { break };
        let same_flow = t.v4 == s.v4
            && first[..s.l3] == g[..t.l3]
            && if s.v4 {
                // version/IHL, TOS; flags; TTL, protocol; addresses, ports
                first[s.l3..s.l3 + 2] == g[s.l3..s.l3 + 2]
                    && first[s.l3 + 6..s.l3 + 10] == g[s.l3 + 6..s.l3 + 10]
                    && first[s.l3 + 12..s.l4 + 4] == g[s.l3 + 12..s.l4 + 4]
            } else {
                first[s.l3..s.l3 + 4] == g[s.l3..s.l3 + 4]
                    && first[s.l3 + 6..s.l4 + 4] == g[s.l3 + 6..s.l4 + 4]
            };
        if !same_flow
            || t.payload == 0
            || t.payload > s.payload
            || (s.v4 && t.id != s.id.wrapping_add(n as u16))
            || l4_len + t.payload > max_l4
        {
            break;
        }
        if n == 1 {
            out.extend_from_slice(&[0; VNET_HDR_LEN]);
            out.extend_from_slice(first);
        }
        out.extend_from_slice(&g[t.l4 + 8..]);
        n += 1;
        l4_len += t.payload;
        if t.payload < s.payload {
            break;
        }
    }
    if n == 1 {
        return 1;
    }
    let f = &mut out[VNET_HDR_LEN..];
    let (l3, l4) = (s.l3, s.l4);
    if s.v4 {
        f[l3 + 2..l3 + 4].copy_from_slice(&((20 + l4_len) as u16).to_be_bytes());
        f[l3 + 10..l3 + 12].fill(0);
        let c = !fold(sum16(0, &f[l3..l4]));
        f[l3 + 10..l3 + 12].copy_from_slice(&c.to_be_bytes());
    } else {
        f[l3 + 4..l3 + 6].copy_from_slice(&(l4_len as u16).to_be_bytes());
    }
    f[l4 + 4..l4 + 6].copy_from_slice(&(l4_len as u16).to_be_bytes());
    let addrs = if s.v4 {
        &f[l3 + 12..l3 + 20]
    } else {
        &f[l3 + 8..l3 + 40]
    };
    let pseudo = fold(sum16(0, addrs) + u64::from(IP_PROTO_UDP) + l4_len as u64);
    f[l4 + 6..l4 + 8].copy_from_slice(&pseudo.to_be_bytes());
    let hdr = VnetHdr {
        flags: F_NEEDS_CSUM,
        gso_type: GSO_UDP_L4,
        hdr_len: (l4 + 8) as u16,
        gso_size: s.payload as u16,
        csum_start: l4 as u16,
        csum_offset: 6,
    };
    out[..VNET_HDR_LEN].copy_from_slice(&hdr.to_bytes());
    n
}
