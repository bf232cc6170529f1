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

/// The IP layer of a frame that may join a run, TCP or UDP alike.
struct IpInfo {
    v4: bool,
    /// Always 14: only untagged frames are joined (unlike [`super::l3_offset`],
    /// which also steps over a VLAN tag for segmentation).
    l3: usize,
    /// Start of the TCP or UDP header: no IPv4 options, no IPv6 extension
    /// headers.
    l4: usize,
    /// IPv4 protocol or IPv6 next header.
    proto: u8,
    /// IPv4 flags and fragment offset; 0 for IPv6.
    fragment: u16,
    /// IPv4 id; 0 for IPv6.
    id: u16,
}

impl IpInfo {
    /// Largest TCP or UDP length one IP packet can carry: the IPv4 total
    /// length includes its header, the IPv6 payload length does not.
    fn max_l4(&self) -> usize {
        if self.v4 { 65_535 - 20 } else { 65_535 }
    }

    /// The addresses that go into the pseudo-header.
    fn addrs<'f>(&self, f: &'f [u8]) -> &'f [u8] {
        if self.v4 {
            &f[self.l3 + 12..self.l3 + 20]
        } else {
            &f[self.l3 + 8..self.l3 + 40]
        }
    }
}

/// Parses the Ethernet and IP headers of `f`, the same for TCP and UDP:
/// untagged IPv4 without options or IPv6 without extension headers, with an
/// IP length that ends exactly at the end of the frame (padded frames, such
/// as short ACKs, never join).
fn parse_ip(f: &[u8]) -> Option<IpInfo> {
    let l3 = 14;
    let et = u16::from_be_bytes([*f.get(12)?, *f.get(13)?]);
    let (ip, ip_end) = match et {
        ETHERTYPE_IPV4 => {
            let ip = f.get(l3..l3 + 20)?;
            if ip[0] != 0x45 {
                return None;
            }
            let ip_end = l3 + usize::from(u16::from_be_bytes([ip[2], ip[3]]));
            let info = IpInfo {
                v4: true,
                l3,
                l4: l3 + 20,
                proto: ip[9],
                fragment: u16::from_be_bytes([ip[6], ip[7]]),
                id: u16::from_be_bytes([ip[4], ip[5]]),
            };
            (info, ip_end)
        }
        ETHERTYPE_IPV6 => {
            let ip = f.get(l3..l3 + 40)?;
            if ip[0] >> 4 != 6 {
                return None;
            }
            let ip_end = l3 + 40 + usize::from(u16::from_be_bytes([ip[4], ip[5]]));
            let info = IpInfo {
                v4: false,
                l3,
                l4: l3 + 40,
                proto: ip[6],
                fragment: 0,
                id: 0,
            };
            (info, ip_end)
        }
        _ => return None,
    };
    (ip_end == f.len()).then_some(ip)
}

/// Whether `g` (IP layer `t`) is on the same path and ports as `f` (`s`):
/// identical Ethernet header and IP header except lengths, IPv4 id and
/// checksum, and the same source and destination ports. Both frames are
/// long enough for their ports (their parse checked it).
fn same_addresses_and_ports(f: &[u8], s: &IpInfo, g: &[u8], t: &IpInfo) -> bool {
    if s.v4 != t.v4 || f[..s.l3] != g[..t.l3] {
        return false;
    }
    let (l3, ports_end) = (s.l3, s.l4 + 4);
    if s.v4 {
        // version/IHL, TOS; flags; TTL, protocol; addresses, ports
        f[l3..l3 + 2] == g[l3..l3 + 2]
            && f[l3 + 6..l3 + 10] == g[l3 + 6..l3 + 10]
            && f[l3 + 12..ports_end] == g[l3 + 12..ports_end]
    } else {
        // version, traffic class, flow label; next header, hop limit,
        // addresses, ports
        f[l3..l3 + 4] == g[l3..l3 + 4] && f[l3 + 6..ports_end] == g[l3 + 6..ports_end]
    }
}

/// What differs between the virtio-net headers of a TCP and a UDP
/// super-frame.
struct Gso {
    gso_type: u8,
    /// Ethernet, IP and TCP or UDP headers.
    hdr_len: usize,
    gso_size: usize,
    /// Where the TCP or UDP checksum field sits after the start of its header.
    csum_offset: usize,
}

/// Finishes a super-frame in `out` (room for the virtio-net header, then the
/// first frame of the run followed by the payloads of the others): the IP
/// length (and the IPv4 header checksum) for an L4 length of `l4_len`, the
/// pseudo-header sum in the checksum field, and the virtio-net header. The
/// TCP flags or the UDP length are the caller's.
fn finish_super_frame(out: &mut [u8], ip: &IpInfo, l4_len: usize, gso: &Gso) {
    let f = &mut out[VNET_HDR_LEN..];
    let (l3, l4) = (ip.l3, ip.l4);
    if ip.v4 {
        f[l3 + 2..l3 + 4].copy_from_slice(&((20 + l4_len) as u16).to_be_bytes());
        f[l3 + 10..l3 + 12].fill(0);
        let c = !fold(sum16(0, &f[l3..l4]));
        f[l3 + 10..l3 + 12].copy_from_slice(&c.to_be_bytes());
    } else {
        f[l3 + 4..l3 + 6].copy_from_slice(&(l4_len as u16).to_be_bytes());
    }
    // CHECKSUM_PARTIAL: the field holds the pseudo-header sum, as the
    // kernel's own TSO and USO packets do.
    let pseudo = fold(sum16(0, ip.addrs(f)) + u64::from(ip.proto) + l4_len as u64);
    let at = l4 + gso.csum_offset;
    f[at..at + 2].copy_from_slice(&pseudo.to_be_bytes());
    let hdr = VnetHdr {
        flags: F_NEEDS_CSUM,
        gso_type: gso.gso_type,
        hdr_len: gso.hdr_len as u16,
        gso_size: gso.gso_size as u16,
        csum_start: l4 as u16,
        csum_offset: gso.csum_offset as u16,
    };
    out[..VNET_HDR_LEN].copy_from_slice(&hdr.to_bytes());
}

/// The parts of a TCP segment that decide whether it can join a run.
struct TcpSeg {
    ip: IpInfo,
    hdrs: usize,
    seq: u32,
    flags: u8,
    payload: usize,
}

fn parse_tcp(f: &[u8]) -> Option<TcpSeg> {
    parse_ip(f).and_then(|ip| tcp_of(f, ip))
}

/// The TCP segment in `f`, whose IP layer `ip` is already parsed.
fn tcp_of(f: &[u8], ip: IpInfo) -> Option<TcpSeg> {
    // No fragments.
    if ip.proto != IP_PROTO_TCP || ip.fragment & 0x3fff != 0 {
        return None;
    }
    let l4 = ip.l4;
    let thlen = usize::from(f.get(l4 + 12)? >> 4) * 4;
    let hdrs = l4 + thlen;
    if thlen < 20 || hdrs > f.len() {
        return None;
    }
    Some(TcpSeg {
        ip,
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
    if s.hdrs != t.hdrs || !same_addresses_and_ports(f, &s.ip, g, &t.ip) {
        return false;
    }
    let l4 = s.ip.l4;
    f[l4 + 8..l4 + 13] == g[l4 + 8..l4 + 13]
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
///
/// [`segment`]: super::segment
pub fn coalesce(frames: &[&[u8]], out: &mut Vec<u8>) -> usize {
    out.clear();
    let Some(first) = frames.first() else {
        return 0;
    };
    // The first frame's IP layer is parsed once, for either protocol.
    let Some(ip) = parse_ip(first) else {
        return 1;
    };
    if ip.proto == IP_PROTO_UDP {
        return coalesce_udp(frames, ip, out);
    }
    let Some(s) = tcp_of(first, ip) else {
        return 1;
    };
    if s.flags & !(TCP_ACK | TCP_PSH) != 0 || s.flags & TCP_PSH != 0 || s.payload == 0 {
        return 1;
    }
    let max_l4 = s.ip.max_l4();
    let mut l4_len = first.len() - s.ip.l4;
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
    if psh {
        out[VNET_HDR_LEN + s.ip.l4 + 13] |= TCP_PSH;
    }
    let gso = Gso {
        gso_type: if s.ip.v4 { GSO_TCPV4 } else { GSO_TCPV6 },
        hdr_len: s.hdrs,
        gso_size: s.payload,
        csum_offset: 16,
    };
    finish_super_frame(out, &s.ip, l4_len, &gso);
    n
}

/// The parts of a UDP datagram that decide whether it can join a run.
struct UdpDgram {
    ip: IpInfo,
    payload: usize,
}

fn parse_udp(f: &[u8]) -> Option<UdpDgram> {
    parse_ip(f).and_then(|ip| udp_of(f, ip))
}

/// The UDP datagram in `f`, whose IP layer `ip` is already parsed.
fn udp_of(f: &[u8], ip: IpInfo) -> Option<UdpDgram> {
    // Not a fragment; DF set, so the IPv4 id carries no meaning for the
    // receiver.
    if ip.proto != IP_PROTO_UDP || (ip.v4 && ip.fragment != 0x4000) {
        return None;
    }
    let l4 = ip.l4;
    let udp = f.get(l4..l4 + 8)?;
    let udp_len = usize::from(u16::from_be_bytes([udp[4], udp[5]]));
    // A zero checksum (IPv4 "none") would be recomputed by segmentation:
    // leave such datagrams alone.
    if udp_len != f.len() - l4 || udp[6..8] == [0, 0] {
        return None;
    }
    Some(UdpDgram {
        ip,
        payload: udp_len - 8,
    })
}

/// Most datagrams joined into one UDP super-frame (the kernel's own
/// `UDP_MAX_SEGMENTS` for a send).
const MAX_UDP_SEGMENTS: usize = 64;

/// The UDP half of [`coalesce`], for a first frame whose IP layer `first_ip`
/// says UDP: a run of datagrams of one flow (same addresses, ports, TOS and
/// TTL; equal payloads, a shorter one last; IPv4 ids counting up by one, as
/// the kernel's segmentation would write them) becomes one `GSO_UDP_L4`
/// super-frame. The receiving pod's stack splits it again before any socket
/// sees it, so applications get the same datagrams; the bridge and veth on
/// the way carry one packet instead of up to 64.
fn coalesce_udp(frames: &[&[u8]], first_ip: IpInfo, out: &mut Vec<u8>) -> usize {
    let Some(first) = frames.first() else {
        return 0;
    };
    let Some(s) = udp_of(first, first_ip) else {
        return 1;
    };
    if s.payload == 0 {
        return 1;
    }
    let max_l4 = s.ip.max_l4();
    let mut l4_len = first.len() - s.ip.l4;
    let mut n = 1;
    for g in &frames[1..] {
        if n == MAX_UDP_SEGMENTS {
            break;
        }
        let Some(t) = parse_udp(g) else { break };
        if !same_addresses_and_ports(first, &s.ip, g, &t.ip)
            || t.payload == 0
            || t.payload > s.payload
            || (s.ip.v4 && t.ip.id != s.ip.id.wrapping_add(n as u16))
            || l4_len + t.payload > max_l4
        {
            break;
        }
        if n == 1 {
            out.extend_from_slice(&[0; VNET_HDR_LEN]);
            out.extend_from_slice(first);
        }
        out.extend_from_slice(&g[t.ip.l4 + 8..]);
        n += 1;
        l4_len += t.payload;
        if t.payload < s.payload {
            break;
        }
    }
    if n == 1 {
        return 1;
    }
    let l4 = VNET_HDR_LEN + s.ip.l4;
    out[l4 + 4..l4 + 6].copy_from_slice(&(l4_len as u16).to_be_bytes());
    let gso = Gso {
        gso_type: GSO_UDP_L4,
        hdr_len: s.ip.l4 + 8,
        gso_size: s.payload,
        csum_offset: 6,
    };
    finish_super_frame(out, &s.ip, l4_len, &gso);
    n
}
