//! Pure allocators: local VNIs, node tunnel IPs, per-node pod CIDR slices and
//! pod addresses. Each keeps its state in a plain serializable struct so the
//! callers decide where it is persisted (state dir, Secret, CNI data dir).
//!
//! Rule for all of them: an allocation is stable for its owner, two owners
//! never share a value, and a released value is handed out again only after
//! every never-used value (round robin from the last allocation, like CNI
//! host-local), so a stale holder is unlikely to collide.

use ipnet::Ipv4Net;
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, BTreeSet};
use std::net::Ipv4Addr;

/// First VNI the agent gives a local network.
pub const LOCAL_VNI_MIN: u32 = 1;
/// Last VNI the agent gives a local network; the broker allocates from 4096.
pub const LOCAL_VNI_MAX: u32 = 4095;
/// Node slices are this many bits longer than the range (16 slices), but
/// never longer than /28.
const SLICE_EXTRA_BITS: u8 = 4;
const SLICE_MAX_PREFIX: u8 = 28;

/// Why an allocation failed.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum AllocError {
    #[error("{what} is exhausted ({detail}): release unused ones or use a larger range")]
    Exhausted { what: &'static str, detail: String },
    #[error("address {0} is already in use by another interface")]
    InUse(Ipv4Addr),
    #[error("address {addr} is outside {range}")]
    OutOfRange { addr: Ipv4Addr, range: Ipv4Net },
}

/// A round-robin allocator of integers in `min..=max`, keyed by owner.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct IndexAllocator {
    /// Owner → value.
    pub owners: BTreeMap<String, u32>,
    /// Last value handed out; the next search starts after it.
    #[serde(default)]
    pub last: Option<u32>,
}

impl IndexAllocator {
    /// The owner's value, allocating the next free one if it has none.
    pub fn get_or_allocate(
        &mut self,
        owner: &str,
        min: u32,
        max: u32,
        what: &'static str,
    ) -> Result<u32, AllocError> {
        if let Some(v) = self.owners.get(owner) {
            return Ok(*v);
        }
        let used: BTreeSet<u32> = self.owners.values().copied().collect();
        let start = match self.last {
            Some(l) if l >= min && l < max => l + 1,
            _ => min,
        };
        let span = u64::from(max - min) + 1;
        for i in 0..span {
            // Wrap around inside min..=max, starting after the last allocation.
            let offset = (u64::from(start - min) + i) % span;
            let candidate = min + u32::try_from(offset).unwrap_or(0);
            if !used.contains(&candidate) {
                self.owners.insert(owner.to_owned(), candidate);
                self.last = Some(candidate);
                return Ok(candidate);
            }
        }
        Err(AllocError::Exhausted {
            what,
            detail: format!("{} of {span} in use", used.len()),
        })
    }

    /// Forget an owner's value. Returns it if there was one.
    pub fn release(&mut self, owner: &str) -> Option<u32> {
        self.owners.remove(owner)
    }

    /// Release every owner not in `keep`.
    pub fn retain(&mut self, keep: &BTreeSet<String>) -> Vec<String> {
        let gone: Vec<String> = self
            .owners
            .keys()
            .filter(|k| !keep.contains(*k))
            .cloned()
            .collect();
        for k in &gone {
            self.owners.remove(k);
        }
        gone
    }
}

/// Everything the agent allocates, persisted as one document.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Allocations {
    /// Local network (dataplane name) → VNI in 1..=4095.
    #[serde(default)]
    pub vnis: IndexAllocator,
    /// Node → host index inside the cluster's tunnel subnet.
    #[serde(default)]
    pub tunnel_ips: IndexAllocator,
    /// Network → (node → slice index inside the network's cluster range).
    #[serde(default)]
    pub slices: BTreeMap<String, IndexAllocator>,
    /// What each node last said in its hello, so that after an agent restart
    /// the first node to reconnect still gets all its peers (its dataplane
    /// would otherwise drop the tunnels of nodes that have not reconnected yet).
    #[serde(default)]
    pub known_nodes: BTreeMap<String, KnownNode>,
}

/// A node's last hello, as persisted.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct KnownNode {
    pub public_key: Vec<u8>,
    pub listen_port: u32,
    pub endpoints: Vec<String>,
}

impl Allocations {
    /// VNI of a local-scope network.
    pub fn local_vni(&mut self, network: &str) -> Result<u32, AllocError> {
        self.vnis.get_or_allocate(
            network,
            LOCAL_VNI_MIN,
            LOCAL_VNI_MAX,
            "local VNI space 1..=4095",
        )
    }

    /// The tunnel IP of a node inside `subnet` (never the network or broadcast address).
    pub fn tunnel_ip(&mut self, node: &str, subnet: Ipv4Net) -> Result<Ipv4Addr, AllocError> {
        let hosts = host_count(subnet);
        if hosts == 0 {
            return Err(AllocError::Exhausted {
                what: "tunnel subnet",
                detail: format!("{subnet} has no host addresses"),
            });
        }
        let index = self
            .tunnel_ips
            .get_or_allocate(node, 1, hosts, "tunnel subnet")?;
        Ok(nth(subnet, index))
    }

    /// The pod CIDR slice of `node` inside a network's cluster range.
    pub fn node_slice(
        &mut self,
        network: &str,
        node: &str,
        range: Ipv4Net,
    ) -> Result<Ipv4Net, AllocError> {
        let prefix = slice_prefix(range);
        let count = 1u32 << (prefix - range.prefix_len());
        let index = self
            .slices
            .entry(network.to_owned())
            .or_default()
            .get_or_allocate(node, 0, count - 1, "node slices of the IP range")?;
        let base = u32::from(range.network()) + (index << (32 - prefix));
        Ipv4Net::new(Ipv4Addr::from(base), prefix).map_err(|_| AllocError::Exhausted {
            what: "node slices of the IP range",
            detail: range.to_string(),
        })
    }
}

/// Prefix length of one node's slice of `range`.
#[must_use]
pub fn slice_prefix(range: Ipv4Net) -> u8 {
    range
        .prefix_len()
        .saturating_add(SLICE_EXTRA_BITS)
        .min(SLICE_MAX_PREFIX)
        .max(range.prefix_len())
}

fn host_count(net: Ipv4Net) -> u32 {
    let size = 1u64 << (32 - net.prefix_len());
    u32::try_from(size.saturating_sub(2)).unwrap_or(u32::MAX)
}

fn nth(net: Ipv4Net, index: u32) -> Ipv4Addr {
    Ipv4Addr::from(u32::from(net.network()).wrapping_add(index))
}

/// Pick a pod address in `slice`: never the slice's (or the whole `range`'s)
/// network or broadcast address, never one in `used`, round robin after `last`.
pub fn pick_pod_address(
    slice: Ipv4Net,
    range: Option<Ipv4Net>,
    used: &BTreeSet<Ipv4Addr>,
    last: Option<Ipv4Addr>,
) -> Result<Ipv4Addr, AllocError> {
    let reserved = |a: Ipv4Addr| {
        a == slice.network()
            || a == slice.broadcast()
            || range.is_some_and(|r| a == r.network() || a == r.broadcast())
            || used.contains(&a)
    };
    let first = u32::from(slice.network());
    let size = 1u64 << (32 - slice.prefix_len());
    let start = last
        .filter(|l| slice.contains(l))
        .map_or(0, |l| u64::from(u32::from(l) - first) + 1);
    for i in 0..size {
        let offset = u32::try_from((start + i) % size).unwrap_or(0);
        let candidate = Ipv4Addr::from(first + offset);
        if !reserved(candidate) {
            return Ok(candidate);
        }
    }
    Err(AllocError::Exhausted {
        what: "the node's pod address slice",
        detail: format!("{slice}, {} in use", used.len()),
    })
}

/// Check a static address requested for a pod.
pub fn check_static(
    addr: Ipv4Addr,
    range: Ipv4Net,
    used: &BTreeSet<Ipv4Addr>,
) -> Result<(), AllocError> {
    if !range.contains(&addr) {
        return Err(AllocError::OutOfRange { addr, range });
    }
    if used.contains(&addr) {
        return Err(AllocError::InUse(addr));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn net(s: &str) -> Ipv4Net {
        s.parse().unwrap()
    }

    #[test]
    fn local_vnis_are_stable_unique_and_reused_only_after_release() {
        let mut a = Allocations::default();
        let blue = a.local_vni("blue").unwrap();
        let red = a.local_vni("red").unwrap();
        assert_eq!(blue, 1);
        assert_eq!(red, 2);
        assert_eq!(a.local_vni("blue").unwrap(), 1);
        a.vnis.release("blue");
        // Released 1 is not handed out while fresh values remain.
        assert_eq!(a.local_vni("green").unwrap(), 3);
        // Persisted state round-trips and keeps allocating where it left off.
        let text = serde_json::to_string(&a).unwrap();
        let mut b: Allocations = serde_json::from_str(&text).unwrap();
        assert_eq!(b.local_vni("red").unwrap(), 2);
        assert_eq!(b.local_vni("pink").unwrap(), 4);
    }

    #[test]
    fn vni_space_exhaustion_is_an_error_and_wraps_to_released_values() {
        let mut alloc = IndexAllocator::default();
        for i in 0..4 {
            alloc.get_or_allocate(&format!("n{i}"), 1, 4, "x").unwrap();
        }
        assert!(matches!(
            alloc.get_or_allocate("n5", 1, 4, "x"),
            Err(AllocError::Exhausted { .. })
        ));
        alloc.release("n1");
        assert_eq!(alloc.get_or_allocate("n5", 1, 4, "x").unwrap(), 2);
    }

    #[test]
    fn tunnel_ips_skip_network_and_broadcast() {
        let mut a = Allocations::default();
        let subnet = net("100.64.3.0/30");
        assert_eq!(
            a.tunnel_ip("a", subnet).unwrap(),
            Ipv4Addr::new(100, 64, 3, 1)
        );
        assert_eq!(
            a.tunnel_ip("b", subnet).unwrap(),
            Ipv4Addr::new(100, 64, 3, 2)
        );
        assert!(a.tunnel_ip("c", subnet).is_err());
        assert_eq!(
            a.tunnel_ip("a", subnet).unwrap(),
            Ipv4Addr::new(100, 64, 3, 1)
        );
    }

    #[test]
    fn node_slices_never_overlap() {
        let mut a = Allocations::default();
        let range = net("10.10.0.0/16");
        let mut seen: Vec<Ipv4Net> = Vec::new();
        for i in 0..16 {
            let s = a.node_slice("blue", &format!("node-{i}"), range).unwrap();
            assert_eq!(s.prefix_len(), 20);
            assert!(range.contains(&s));
            assert!(
                seen.iter()
                    .all(|o| !o.contains(&s.network()) && !s.contains(&o.network()))
            );
            seen.push(s);
        }
        assert!(a.node_slice("blue", "node-16", range).is_err());
        // Another network has its own slices.
        assert_eq!(
            a.node_slice("red", "node-5", net("10.20.0.0/24")).unwrap(),
            net("10.20.0.0/28")
        );
        assert_eq!(slice_prefix(net("10.0.0.0/28")), 28);
    }

    #[test]
    fn pod_addresses_round_robin_and_never_collide() {
        let slice = net("10.1.0.0/29");
        let range = Some(net("10.1.0.0/16"));
        let mut used = BTreeSet::new();
        let mut last = None;
        for expected in 1..=6u8 {
            let a = pick_pod_address(slice, range, &used, last).unwrap();
            assert_eq!(a, Ipv4Addr::new(10, 1, 0, expected));
            used.insert(a);
            last = Some(a);
        }
        assert!(pick_pod_address(slice, range, &used, last).is_err());
        used.remove(&Ipv4Addr::new(10, 1, 0, 3));
        assert_eq!(
            pick_pod_address(slice, range, &used, last).unwrap(),
            Ipv4Addr::new(10, 1, 0, 3)
        );
    }

    #[test]
    fn released_pod_address_is_not_reused_while_fresh_ones_remain() {
        let slice = net("10.1.0.0/28");
        let mut used = BTreeSet::new();
        let a = pick_pod_address(slice, None, &used, None).unwrap();
        used.insert(a);
        let b = pick_pod_address(slice, None, &used, Some(a)).unwrap();
        used.remove(&a);
        let c = pick_pod_address(slice, None, &used, Some(b)).unwrap();
        assert_ne!(c, a);
    }

    #[test]
    fn static_addresses_are_checked() {
        let range = net("10.1.0.0/24");
        let mut used = BTreeSet::new();
        used.insert(Ipv4Addr::new(10, 1, 0, 9));
        assert!(check_static(Ipv4Addr::new(10, 1, 0, 8), range, &used).is_ok());
        assert_eq!(
            check_static(Ipv4Addr::new(10, 1, 0, 9), range, &used),
            Err(AllocError::InUse(Ipv4Addr::new(10, 1, 0, 9)))
        );
        assert!(matches!(
            check_static(Ipv4Addr::new(10, 2, 0, 1), range, &used),
            Err(AllocError::OutOfRange { .. })
        ));
    }
}
