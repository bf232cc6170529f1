//! Reassembly of fragmented inner IPv4 packets, one bounded table per peer.
//!
//! A stock WireGuard peer runs its interface at MTU 1420; its kernel `vxlan`
//! device sends full-size frames of a 1390 network as 1440-byte inner packets
//! without DF, so its kernel fragments them before WireGuard encrypts. The
//! fragments arrive here decrypted and authenticated (WireGuard drops
//! replays, so a fragment never arrives twice), and are joined back before
//! the VXLAN decoder sees the packet.
//!
//! Bounds, so that a peer cannot make the node hold more than a few pending
//! packets: at most [`MAX_PENDING`] packets per peer (a new one evicts the
//! oldest), at most [`MAX_PACKET`] bytes each, [`MAX_FRAGMENTS`] fragments
//! each, and [`TIMEOUT`] from the first fragment to the last. Overlapping or
//! inconsistent fragments drop the whole packet. Every drop is counted under
//! a `fragment_*` reason.

use std::collections::BTreeMap;
use std::net::Ipv4Addr;
use std::time::{Duration, Instant};

use crate::wire::{ETH_HEADER, Fragment, OVERHEAD, ipv4_checksum};

/// Packets being reassembled per peer.
pub const MAX_PENDING: usize = 8;
/// The largest reassembled inner packet: a frame of the largest network MTU
/// with a VLAN tag, in VXLAN/UDP/IPv4.
pub const MAX_PACKET: usize = crate::config::MAX_MTU as usize + ETH_HEADER + 4 + OVERHEAD;
/// Fragments per packet (a kernel at MTU 1420 makes 2 of a 1440-byte
/// packet; 9000-byte jumbo frames over 576-byte links make 17).
pub const MAX_FRAGMENTS: usize = 32;
/// An IPv4 header without options.
const MIN_IPV4_HEADER: usize = 20;
/// How long the fragments of one packet may take to arrive.
pub const TIMEOUT: Duration = Duration::from_secs(2);

/// The drop reasons this module counts.
pub const DROP_TIMEOUT: &str = "fragment_timeout";
pub const DROP_EVICTED: &str = "fragment_evicted";
pub const DROP_TOO_LARGE: &str = "fragment_too_large";
pub const DROP_BAD: &str = "fragment_bad";

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Key {
    src: Ipv4Addr,
    dst: Ipv4Addr,
    id: u16,
    protocol: u8,
}

#[derive(Debug)]
struct Pending {
    key: Key,
    started: Instant,
    /// The first fragment's header (offset 0), once it arrived.
    header: Option<Vec<u8>>,
    /// The payload, with holes where fragments are missing.
    data: Vec<u8>,
    /// Received byte ranges of the payload, sorted, never overlapping.
    ranges: Vec<(usize, usize)>,
    /// The payload length, known from the last fragment.
    total: Option<usize>,
}

impl Pending {
    fn complete(&self) -> bool {
        let (Some(total), Some(_)) = (self.total, &self.header) else {
            return false;
        };
        let mut next = 0;
        for &(start, end) in &self.ranges {
            if start != next {
                return false;
            }
            next = end;
        }
        next == total
    }

    /// Adds a fragment; `Err` is the reason to drop the whole packet.
    fn add(&mut self, f: &Fragment<'_>) -> Result<(), &'static str> {
        let start = f.offset;
        let end = start + f.payload.len();
        // The whole packet gets the first fragment's header, whose options
        // the others need not carry: bound it with that header's length.
        let header_len = match (start, &self.header) {
            (0, _) => f.header.len(),
            (_, Some(h)) => h.len(),
            (_, None) => MIN_IPV4_HEADER,
        };
        let payload_len = end.max(self.data.len());
        if header_len + payload_len > MAX_PACKET {
            return Err(DROP_TOO_LARGE);
        }
        if f.payload.is_empty() || (f.more && !f.payload.len().is_multiple_of(8)) {
            return Err(DROP_BAD);
        }
        if self.ranges.len() >= MAX_FRAGMENTS {
            return Err(DROP_BAD);
        }
        if !f.more {
            if self.total.is_some_and(|t| t != end) {
                return Err(DROP_BAD);
            }
            self.total = Some(end);
        }
        if let Some(total) = self.total
            && (end > total || self.ranges.last().is_some_and(|&(_, e)| e > total))
        {
            return Err(DROP_BAD);
        }
        let at = self.ranges.partition_point(|&(s, _)| s < start);
        let overlaps_prev = at > 0 && self.ranges[at - 1].1 > start;
        let overlaps_next = self.ranges.get(at).is_some_and(|&(s, _)| s < end);
        if overlaps_prev || overlaps_next {
            return Err(DROP_BAD);
        }
        self.ranges.insert(at, (start, end));
        if start == 0 {
            self.header = Some(f.header.to_vec());
        }
        if self.data.len() < end {
            // Exactly: the bound on what a peer can make us hold is the
            // capacity, not the length.
            self.data.reserve_exact(end - self.data.len());
            self.data.resize(end, 0);
        }
        self.data[start..end].copy_from_slice(f.payload);
        Ok(())
    }

    /// The whole packet: the first fragment's header with the fragment
    /// fields cleared, the total length set and the checksum redone.
    fn packet(self) -> Vec<u8> {
        let mut pkt = self.header.unwrap_or_default();
        let len = pkt.len() + self.data.len();
        let len16 = u16::try_from(len).unwrap_or(u16::MAX);
        pkt[2..4].copy_from_slice(&len16.to_be_bytes());
        pkt[6] = 0;
        pkt[7] = 0;
        pkt[10] = 0;
        pkt[11] = 0;
        let csum = ipv4_checksum(&pkt);
        pkt[10..12].copy_from_slice(&csum.to_be_bytes());
        pkt.extend_from_slice(&self.data);
        pkt
    }
}

/// One peer's packets in reassembly.
#[derive(Debug, Default)]
pub struct Reassembly {
    pending: Vec<Pending>,
}

impl Reassembly {
    /// Adds a fragment; returns the whole packet once its last piece is in.
    /// Drops are counted in `drops`.
    pub fn insert(
        &mut self,
        f: &Fragment<'_>,
        now: Instant,
        drops: &mut BTreeMap<&'static str, u64>,
    ) -> Option<Vec<u8>> {
        self.expire(now, drops);
        let key = Key {
            src: f.src,
            dst: f.dst,
            id: f.id,
            protocol: f.protocol,
        };
        let at = match self.pending.iter().position(|p| p.key == key) {
            Some(at) => at,
            None => {
                if self.pending.len() >= MAX_PENDING {
                    // The oldest is first: entries are pushed in arrival order.
                    self.pending.remove(0);
                    bump(drops, DROP_EVICTED);
                }
                self.pending.push(Pending {
                    key,
                    started: now,
                    header: None,
                    data: Vec::new(),
                    ranges: Vec::new(),
                    total: None,
                });
                self.pending.len() - 1
            }
        };
        if let Err(reason) = self.pending[at].add(f) {
            self.pending.remove(at);
            bump(drops, reason);
            return None;
        }
        if self.pending[at].complete() {
            return Some(self.pending.remove(at).packet());
        }
        None
    }

    /// Drops packets whose fragments took longer than [`TIMEOUT`].
    pub fn expire(&mut self, now: Instant, drops: &mut BTreeMap<&'static str, u64>) {
        if self.pending.is_empty() {
            return;
        }
        let before = self.pending.len();
        self.pending
            .retain(|p| now.saturating_duration_since(p.started) < TIMEOUT);
        for _ in self.pending.len()..before {
            bump(drops, DROP_TIMEOUT);
        }
    }

    /// Packets waiting for fragments.
    pub fn pending(&self) -> usize {
        self.pending.len()
    }

    /// Bytes held for packets waiting for fragments.
    pub fn held_bytes(&self) -> usize {
        self.pending.iter().map(|p| p.data.capacity()).sum()
    }
}

fn bump(drops: &mut BTreeMap<&'static str, u64>, reason: &'static str) {
    *drops.entry(reason).or_default() += 1;
}

/// Splits a whole IPv4 packet (20-byte header) into fragments of at most
/// `mtu` bytes, as a kernel does; for tests.
#[cfg(test)]
pub(crate) fn split(pkt: &[u8], mtu: usize, id: u16) -> Vec<Vec<u8>> {
    let payload = &pkt[20..];
    let step = (mtu - 20) / 8 * 8;
    let mut out = Vec::new();
    let mut off = 0;
    while off < payload.len() {
        let end = (off + step).min(payload.len());
        let mut h = pkt[..20].to_vec();
        let more = end < payload.len();
        let len = u16::try_from(20 + end - off).unwrap_or(u16::MAX);
        h[2..4].copy_from_slice(&len.to_be_bytes());
        h[4..6].copy_from_slice(&id.to_be_bytes());
        let frag = u16::try_from(off / 8).unwrap_or(0) | if more { 0x2000 } else { 0 };
        h[6..8].copy_from_slice(&frag.to_be_bytes());
        h[10] = 0;
        h[11] = 0;
        let c = ipv4_checksum(&h);
        h[10..12].copy_from_slice(&c.to_be_bytes());
        h.extend_from_slice(&payload[off..end]);
        out.push(h);
        off = end;
    }
    out
}

#[cfg(test)]
#[path = "reassembly_tests.rs"]
mod tests;
