//! Which TAP queue a frame belongs to. With a multi-queue TAP the kernel
//! sends a pod's packets of a flow to the queue that flow's packets last
//! came in from (its flow table learns from our writes), so the queue we
//! write a flow's frames to decides the queue, and the worker, that reads
//! its other direction. Hashing the flow the same way in both directions
//! spreads unrelated flows over the workers and keeps each flow in order
//! on one.

use super::{ETHERTYPE_IPV4, ETHERTYPE_IPV6, IP_PROTO_TCP, IP_PROTO_UDP, l3_offset};

/// FNV-1a over `bytes`, continuing from `h`.
fn fnv(mut h: u32, bytes: &[u8]) -> u32 {
    for b in bytes {
        h ^= u32::from(*b);
        h = h.wrapping_mul(0x0100_0193);
    }
    h
}

const FNV_BASIS: u32 = 0x811c_9dc5;

/// One end of a flow: address and port, hashed.
fn end(addr: &[u8], port: &[u8]) -> u32 {
    fnv(fnv(FNV_BASIS, addr), port)
}

/// A hash of the frame's flow that is the same in both directions: the IP
/// addresses and, for TCP and UDP (not IPv4 fragments, which carry no
/// ports after the first), the ports, behind at most one VLAN tag; other
/// frames hash by their Ethernet addresses.
pub fn flow_hash(frame: &[u8]) -> u32 {
    let (a, b) = ends(frame).unwrap_or_else(|| {
        let mac = |r: std::ops::Range<usize>| frame.get(r).map_or(0, |m| end(m, &[]));
        (mac(0..6), mac(6..12))
    });
    // Adding is symmetric; the finaliser makes every bit of the result
    // depend on every bit of the sum (a queue is picked by the low bits,
    // and connect() favours even ports).
    fmix32(a.wrapping_add(b))
}

/// MurmurHash3's 32-bit finaliser.
fn fmix32(mut h: u32) -> u32 {
    h ^= h >> 16;
    h = h.wrapping_mul(0x85eb_ca6b);
    h ^= h >> 13;
    h = h.wrapping_mul(0xc2b2_ae35);
    h ^ (h >> 16)
}

fn ends(f: &[u8]) -> Option<(u32, u32)> {
    let (l3, et) = l3_offset(f)?;
    let (src, dst, proto, l4, fragment) = match et {
        ETHERTYPE_IPV4 => {
            let ip = f.get(l3..l3 + 20)?;
            let l4 = l3 + usize::from(ip[0] & 0xf) * 4;
            let fragment = u16::from_be_bytes([ip[6], ip[7]]) & 0x3fff != 0;
            (l3 + 12..l3 + 16, l3 + 16..l3 + 20, ip[9], l4, fragment)
        }
        ETHERTYPE_IPV6 => {
            let ip = f.get(l3..l3 + 40)?;
            (l3 + 8..l3 + 24, l3 + 24..l3 + 40, ip[6], l3 + 40, false)
        }
        _ => return None,
    };
    let ports = if (proto == IP_PROTO_TCP || proto == IP_PROTO_UDP) && !fragment {
        f.get(l4..l4 + 4)
    } else {
        None
    };
    let (sp, dp) = ports.map_or((&[][..], &[][..]), |p| (&p[..2], &p[2..]));
    Some((end(f.get(src)?, sp), end(f.get(dst)?, dp)))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ipv4(src: [u8; 4], dst: [u8; 4], proto: u8, sport: u16, dport: u16, frag: u16) -> Vec<u8> {
        let mut f = vec![0u8; 12];
        f[..6].copy_from_slice(&[2, 0, 0, 0, 0, 2]);
        f[6..12].copy_from_slice(&[2, 0, 0, 0, 0, 1]);
        f.extend_from_slice(&[0x08, 0x00, 0x45, 0, 0, 40, 0, 1]);
        f.extend_from_slice(&frag.to_be_bytes());
        f.extend_from_slice(&[64, proto, 0, 0]);
        f.extend_from_slice(&src);
        f.extend_from_slice(&dst);
        f.extend_from_slice(&sport.to_be_bytes());
        f.extend_from_slice(&dport.to_be_bytes());
        f.extend_from_slice(&[0; 16]);
        f
    }

    fn swap(f: &[u8]) -> Vec<u8> {
        let mut g = f.to_vec();
        g[..6].copy_from_slice(&f[6..12]);
        g[6..12].copy_from_slice(&f[..6]);
        g[26..30].copy_from_slice(&f[30..34]);
        g[30..34].copy_from_slice(&f[26..30]);
        g[34..36].copy_from_slice(&f[36..38]);
        g[36..38].copy_from_slice(&f[34..36]);
        g
    }

    #[test]
    fn both_directions_of_a_flow_hash_alike() {
        for proto in [IP_PROTO_TCP, IP_PROTO_UDP, 1] {
            let f = ipv4([10, 0, 0, 1], [10, 0, 0, 2], proto, 40_000, 5201, 0);
            assert_eq!(flow_hash(&f), flow_hash(&swap(&f)), "proto {proto}");
        }
        let mut v6 = vec![0u8; 12];
        v6.extend_from_slice(&[0x86, 0xdd, 0x60, 0, 0, 0, 0, 8, IP_PROTO_UDP, 64]);
        v6.extend_from_slice(&[0xfd; 16]);
        v6.extend_from_slice(&[0xfe; 16]);
        v6.extend_from_slice(&[0x9c, 0x40, 0x14, 0x51, 0, 8, 0, 0]);
        let mut back = v6.clone();
        back[22..38].copy_from_slice(&v6[38..54]);
        back[38..54].copy_from_slice(&v6[22..38]);
        back[54..56].copy_from_slice(&v6[56..58]);
        back[56..58].copy_from_slice(&v6[54..56]);
        assert_eq!(flow_hash(&v6), flow_hash(&back));
    }

    #[test]
    fn flows_that_differ_in_a_port_spread_over_queues() {
        let queues: std::collections::BTreeSet<u32> = (0..64)
            .map(|p| {
                let f = ipv4(
                    [10, 0, 0, 1],
                    [10, 0, 0, 2],
                    IP_PROTO_TCP,
                    40_000 + p,
                    5201,
                    0,
                );
                flow_hash(&f) % 8
            })
            .collect();
        assert_eq!(queues.len(), 8, "64 flows should reach all 8 queues");
    }

    #[test]
    fn fragments_of_a_datagram_stay_together_and_odd_frames_hash() {
        let first = ipv4([10, 0, 0, 1], [10, 0, 0, 2], IP_PROTO_UDP, 1, 2, 0x2000);
        let later = ipv4([10, 0, 0, 1], [10, 0, 0, 2], IP_PROTO_UDP, 77, 88, 0x00b9);
        assert_eq!(flow_hash(&first), flow_hash(&later));
        // ARP, runts and empty frames still get a queue, without panics.
        let mut arp = ipv4([10, 0, 0, 1], [10, 0, 0, 2], 0, 0, 0, 0);
        arp[12..14].copy_from_slice(&[0x08, 0x06]);
        assert_eq!(flow_hash(&arp), flow_hash(&swap(&arp)[..]));
        for n in 0..40 {
            let _ = flow_hash(&arp[..n]);
        }
    }
}
