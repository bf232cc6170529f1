//! TAP offloads without I/O: the `virtio_net_hdr` that precedes every frame
//! on a TAP opened with `IFF_VNET_HDR`, checksum completion, and TCP
//! segmentation of the super-frames the kernel hands over when the TAP
//! advertises TSO. One read then carries up to 64 KiB of a TCP stream, which
//! is where the per-packet cost of the shell goes away; the frames that go on
//! the wire are still ordinary MTU-sized Ethernet frames.

/// `struct virtio_net_hdr` without the `num_buffers` field (the TAP default).
pub const VNET_HDR_LEN: usize = 10;

const F_NEEDS_CSUM: u8 = 1;
const GSO_NONE: u8 = 0;
const GSO_TCPV4: u8 = 1;
const GSO_TCPV6: u8 = 4;
const GSO_ECN: u8 = 0x80;

const ETHERTYPE_IPV4: u16 = 0x0800;
const ETHERTYPE_IPV6: u16 = 0x86dd;
const ETHERTYPE_VLAN: u16 = 0x8100;
const IP_PROTO_TCP: u8 = 6;
const TCP_FIN: u8 = 0x01;
const TCP_PSH: u8 = 0x08;
const TCP_CWR: u8 = 0x80;

/// Why a frame read from the TAP could not be turned into wire frames.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum OffloadError {
    #[error("shorter than the virtio-net header")]
    NoHeader,
    #[error("checksum offsets outside the frame")]
    BadChecksumOffsets,
    #[error("GSO type {0} is not supported")]
    UnsupportedGso(u8),
    #[error("GSO frame is not the TCP packet its header claims")]
    BadGsoFrame,
}

/// The fields of `virtio_net_hdr` (little endian on every Linux host we run on).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct VnetHdr {
    pub flags: u8,
    pub gso_type: u8,
    pub hdr_len: u16,
    pub gso_size: u16,
    pub csum_start: u16,
    pub csum_offset: u16,
}

impl VnetHdr {
    pub fn parse(b: &[u8]) -> Result<Self, OffloadError> {
        let h = b.get(..VNET_HDR_LEN).ok_or(OffloadError::NoHeader)?;
        let u16_at = |i: usize| u16::from_le_bytes([h[i], h[i + 1]]);
        Ok(Self {
            flags: h[0],
            gso_type: h[1],
            hdr_len: u16_at(2),
            gso_size: u16_at(4),
            csum_start: u16_at(6),
            csum_offset: u16_at(8),
        })
    }

    pub fn to_bytes(self) -> [u8; VNET_HDR_LEN] {
        let mut b = [0u8; VNET_HDR_LEN];
        b[0] = self.flags;
        b[1] = self.gso_type;
        b[2..4].copy_from_slice(&self.hdr_len.to_le_bytes());
        b[4..6].copy_from_slice(&self.gso_size.to_le_bytes());
        b[6..8].copy_from_slice(&self.csum_start.to_le_bytes());
        b[8..10].copy_from_slice(&self.csum_offset.to_le_bytes());
        b
    }
}

/// Ones' complement sum of `data` added to `sum`, not yet folded.
fn sum16(mut sum: u64, data: &[u8]) -> u64 {
    let mut chunks = data.chunks_exact(8);
    for c in &mut chunks {
        // Four 16-bit words at a time; the u64 accumulator cannot overflow
        // for any frame we handle (< 2^16 bytes).
        let w = u64::from_be_bytes([c[0], c[1], c[2], c[3], c[4], c[5], c[6], c[7]]);
        sum += (w >> 48) + ((w >> 32) & 0xffff) + ((w >> 16) & 0xffff) + (w & 0xffff);
    }
    let mut rest = chunks.remainder().chunks_exact(2);
    for c in &mut rest {
        sum += u64::from(u16::from_be_bytes([c[0], c[1]]));
    }
    if let [b] = rest.remainder() {
        sum += u64::from(u16::from_be_bytes([*b, 0]));
    }
    sum
}

fn fold(mut sum: u64) -> u16 {
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    // The loop leaves at most 16 bits.
    sum as u16
}

/// Finishes a `CHECKSUM_PARTIAL` frame: the field at `start + offset` holds
/// the pseudo-header sum, the rest is summed from `start` to the end.
pub fn complete_checksum(
    frame: &mut [u8],
    start: usize,
    offset: usize,
) -> Result<(), OffloadError> {
    let at = start
        .checked_add(offset)
        .ok_or(OffloadError::BadChecksumOffsets)?;
    if at + 2 > frame.len() {
        return Err(OffloadError::BadChecksumOffsets);
    }
    let c = !fold(sum16(0, &frame[start..]));
    frame[at..at + 2].copy_from_slice(&c.to_be_bytes());
    Ok(())
}

/// Offset of the IP header: after the Ethernet header and at most one VLAN tag.
fn l3_offset(frame: &[u8]) -> Option<(usize, u16)> {
    let et = u16::from_be_bytes([*frame.get(12)?, *frame.get(13)?]);
    if et == ETHERTYPE_VLAN {
        Some((18, u16::from_be_bytes([*frame.get(16)?, *frame.get(17)?])))
    } else {
        Some((14, et))
    }
}

/// Turns one frame read from an `IFF_VNET_HDR` TAP (header included) into
/// complete Ethernet frames, calling `emit` for each. Small frames pass
/// through as they are (checksum completed if the kernel left it to us);
/// TCP super-frames are cut into `gso_size` segments with their own IP
/// lengths, IPv4 ids, sequence numbers, flags and checksums, like a NIC
/// doing TSO would. `scratch` is reused between calls.
pub fn segment(
    raw: &mut [u8],
    scratch: &mut Vec<u8>,
    mut emit: impl FnMut(&[u8]),
) -> Result<(), OffloadError> {
    let hdr = VnetHdr::parse(raw)?;
    let frame = &mut raw[VNET_HDR_LEN..];
    let gso = hdr.gso_type & !GSO_ECN;
    if gso == GSO_NONE {
        if hdr.flags & F_NEEDS_CSUM != 0 {
            complete_checksum(
                frame,
                usize::from(hdr.csum_start),
                usize::from(hdr.csum_offset),
            )?;
        }
        emit(frame);
        return Ok(());
    }
    let v4 = match gso {
        GSO_TCPV4 => true,
        GSO_TCPV6 => false,
        other => return Err(OffloadError::UnsupportedGso(other)),
    };
    let bad = OffloadError::BadGsoFrame;
    let (l3, et) = l3_offset(frame).ok_or(bad)?;
    let l4 = usize::from(hdr.csum_start);
    if et != if v4 { ETHERTYPE_IPV4 } else { ETHERTYPE_IPV6 } || l4 < l3 + 20 {
        return Err(bad);
    }
    let tcp_hlen = usize::from(frame.get(l4 + 12).ok_or(bad)? >> 4) * 4;
    let hdrs = l4 + tcp_hlen;
    if tcp_hlen < 20 || hdrs > frame.len() || hdr.gso_size == 0 {
        return Err(bad);
    }
    if v4 {
        if frame[l3] >> 4 != 4
            || frame[l3 + 9] != IP_PROTO_TCP
            || l4 != l3 + usize::from(frame[l3] & 0xf) * 4
        {
            return Err(bad);
        }
    } else if frame[l3] >> 4 != 6 || l4 < l3 + 40 {
        return Err(bad);
    }
    let mss = usize::from(hdr.gso_size);
    let payload_len = frame.len() - hdrs;
    let seq0 = u32::from_be_bytes([frame[l4 + 4], frame[l4 + 5], frame[l4 + 6], frame[l4 + 7]]);
    let id0 = u16::from_be_bytes([frame[l3 + 4], frame[l3 + 5]]);
    let flags0 = frame[l4 + 13];
    // Pseudo-header parts that stay the same across segments.
    let addr_sum = if v4 {
        sum16(0, &frame[l3 + 12..l3 + 20])
    } else {
        sum16(0, &frame[l3 + 8..l3 + 40])
    };
    let mut off = 0;
    let mut i: u16 = 0;
    loop {
        let n = mss.min(payload_len - off);
        let last = off + n >= payload_len;
        scratch.clear();
        scratch.extend_from_slice(&frame[..hdrs]);
        scratch.extend_from_slice(&frame[hdrs + off..hdrs + off + n]);
        let seg = scratch.as_mut_slice();
        let l4_len = tcp_hlen + n;
        if v4 {
            let total = (l4 - l3 + l4_len) as u16;
            seg[l3 + 2..l3 + 4].copy_from_slice(&total.to_be_bytes());
            seg[l3 + 4..l3 + 6].copy_from_slice(&id0.wrapping_add(i).to_be_bytes());
            seg[l3 + 10..l3 + 12].fill(0);
            let c = !fold(sum16(0, &seg[l3..l4]));
            seg[l3 + 10..l3 + 12].copy_from_slice(&c.to_be_bytes());
        } else {
            let plen = (l4 - l3 - 40 + l4_len) as u16;
            seg[l3 + 4..l3 + 6].copy_from_slice(&plen.to_be_bytes());
        }
        let seq = seq0.wrapping_add(off as u32);
        seg[l4 + 4..l4 + 8].copy_from_slice(&seq.to_be_bytes());
        let mut flags = flags0;
        if !last {
            flags &= !(TCP_FIN | TCP_PSH);
        }
        if i > 0 {
            flags &= !TCP_CWR;
        }
        seg[l4 + 13] = flags;
        seg[l4 + 16..l4 + 18].fill(0);
        let pseudo = addr_sum + u64::from(IP_PROTO_TCP) + l4_len as u64;
        let c = !fold(sum16(pseudo, &seg[l4..]));
        seg[l4 + 16..l4 + 18].copy_from_slice(&c.to_be_bytes());
        emit(seg);
        off += n;
        i = i.wrapping_add(1);
        if last {
            return Ok(());
        }
    }
}

/// Header of a frame written to the TAP as it is: no GSO, checksum already
/// verified (WireGuard authenticated it; the kernel's WireGuard also marks
/// what it decrypts this way).
pub const PLAIN_RX_HDR: [u8; VNET_HDR_LEN] = [F_DATA_VALID, 0, 0, 0, 0, 0, 0, 0, 0, 0];
const F_DATA_VALID: u8 = 2;
const TCP_ACK: u8 = 0x10;

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
/// segments, a shorter or PSH one last) into a super-frame with its
/// virtio-net header in `out`, for one TAP write. Returns how many frames it
/// took (0 for none). For a single frame `out` is left empty: write it with
/// [`PLAIN_RX_HDR`].
pub fn coalesce(frames: &[&[u8]], out: &mut Vec<u8>) -> usize {
    out.clear();
    let Some(first) = frames.first() else {
        return 0;
    };
    let Some(s) = parse_tcp(first) else {
        return 1;
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

#[cfg(test)]
#[path = "offload_tests.rs"]
mod tests;
