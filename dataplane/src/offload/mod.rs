//! TAP offloads without I/O: the `virtio_net_hdr` that precedes every frame
//! on a TAP opened with `IFF_VNET_HDR`, checksum completion, segmentation of
//! the TCP and UDP super-frames the kernel hands over when the TAP
//! advertises TSO and USO, and the inverse, coalescing, for the frames
//! written to a TAP. One read or write then carries up to 64 KiB of a TCP
//! stream or up to 64 datagrams of a UDP flow, which is where the per-packet
//! cost of the shell goes away; the frames that go on the wire are still
//! ordinary MTU-sized Ethernet frames.

/// `struct virtio_net_hdr` without the `num_buffers` field (the TAP default).
pub const VNET_HDR_LEN: usize = 10;

const F_NEEDS_CSUM: u8 = 1;
const F_DATA_VALID: u8 = 2;
const GSO_NONE: u8 = 0;
const GSO_TCPV4: u8 = 1;
const GSO_TCPV6: u8 = 4;
const GSO_UDP_L4: u8 = 5;
const GSO_ECN: u8 = 0x80;

const ETHERTYPE_IPV4: u16 = 0x0800;
const ETHERTYPE_IPV6: u16 = 0x86dd;
const ETHERTYPE_VLAN: u16 = 0x8100;
const IP_PROTO_TCP: u8 = 6;
const IP_PROTO_UDP: u8 = 17;
const TCP_FIN: u8 = 0x01;
const TCP_PSH: u8 = 0x08;
const TCP_ACK: u8 = 0x10;
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
    #[error("GSO frame is not the TCP or UDP packet its header claims")]
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
    let (v4, udp) = match gso {
        GSO_TCPV4 => (true, false),
        GSO_TCPV6 => (false, false),
        GSO_UDP_L4 => (
            l3_offset(frame).map(|(_, et)| et) == Some(ETHERTYPE_IPV4),
            true,
        ),
        other => return Err(OffloadError::UnsupportedGso(other)),
    };
    let bad = OffloadError::BadGsoFrame;
    let (l3, et) = l3_offset(frame).ok_or(bad)?;
    let l4 = usize::from(hdr.csum_start);
    if et != if v4 { ETHERTYPE_IPV4 } else { ETHERTYPE_IPV6 } || l4 < l3 + 20 {
        return Err(bad);
    }
    let proto = if udp { IP_PROTO_UDP } else { IP_PROTO_TCP };
    let l4_hlen = if udp {
        8
    } else {
        usize::from(frame.get(l4 + 12).ok_or(bad)? >> 4) * 4
    };
    let hdrs = l4 + l4_hlen;
    if (!udp && l4_hlen < 20) || hdrs > frame.len() || hdr.gso_size == 0 {
        return Err(bad);
    }
    if v4 {
        if frame[l3] >> 4 != 4
            || frame[l3 + 9] != proto
            || l4 != l3 + usize::from(frame[l3] & 0xf) * 4
        {
            return Err(bad);
        }
    } else if frame[l3] >> 4 != 6 || l4 < l3 + 40 {
        return Err(bad);
    }
    let mss = usize::from(hdr.gso_size);
    let payload_len = frame.len() - hdrs;
    let (seq0, flags0) = if udp {
        (0, 0)
    } else {
        (
            u32::from_be_bytes([frame[l4 + 4], frame[l4 + 5], frame[l4 + 6], frame[l4 + 7]]),
            frame[l4 + 13],
        )
    };
    let id0 = u16::from_be_bytes([frame[l3 + 4], frame[l3 + 5]]);
    // Pseudo-header parts that stay the same across segments.
    let addr_sum = if v4 {
        sum16(0, &frame[l3 + 12..l3 + 20])
    } else {
        sum16(0, &frame[l3 + 8..l3 + 40])
    };
    let csum_at = l4 + if udp { 6 } else { 16 };
    let mut off = 0;
    let mut i: u16 = 0;
    loop {
        let n = mss.min(payload_len - off);
        let last = off + n >= payload_len;
        scratch.clear();
        scratch.extend_from_slice(&frame[..hdrs]);
        scratch.extend_from_slice(&frame[hdrs + off..hdrs + off + n]);
        let seg = scratch.as_mut_slice();
        let l4_len = l4_hlen + n;
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
        if udp {
            seg[l4 + 4..l4 + 6].copy_from_slice(&(l4_len as u16).to_be_bytes());
        } else {
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
        }
        seg[csum_at..csum_at + 2].fill(0);
        let pseudo = addr_sum + u64::from(proto) + l4_len as u64;
        let mut c = !fold(sum16(pseudo, &seg[l4..]));
        if udp && c == 0 {
            // Zero means "no checksum" in UDP.
            c = 0xffff;
        }
        seg[csum_at..csum_at + 2].copy_from_slice(&c.to_be_bytes());
        emit(seg);
        off += n;
        i = i.wrapping_add(1);
        if last {
            return Ok(());
        }
    }
}

mod coalesce;
mod flow;
pub use coalesce::{PLAIN_RX_HDR, coalesce};
pub use flow::flow_hash;

#[cfg(test)]
mod tests;
