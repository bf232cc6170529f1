//! Pure allocators: local VNIs, node tunnel IPs, per-node pod CIDR slices and
//! pod addresses. Each keeps its state in a plain serializable struct so the
//! callers decide where it is persisted (state dir, Secret, CNI data dir).
//!
//! Rule for all of them: an allocation is stable for its owner, two owners
//! never share a value, and a released value is handed out again only after
//! every never-used value (round robin from the last allocation, like CNI
//! host-local), so a stale holder is unlikely to collide.
//!
//! Pod ranges, node slices and pod addresses work for IPv4 and IPv6 alike
//! (one family per network); node tunnel IPs are IPv4 (the VXLAN inner header).

use ipnet::{IpNet, Ipv4Net};
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, BTreeSet};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

/// First VNI the agent gives a local network.
pub const LOCAL_VNI_MIN: u32 = 1;
/// Last VNI the agent gives a local network; the broker allocates from 4096.
pub const LOCAL_VNI_MAX: u32 = 4095;
/// By default node slices are this many bits longer than the range (16
/// slices), but never longer than [`default_slice_max`].
const SLICE_EXTRA_BITS: u8 = 4;
/// A node slice has at least this many addresses (bits of host part) so a
/// node can run a pod or two besides the reserved addresses.
const SLICE_MIN_HOST_BITS: u8 = 2;
/// At most 2^20 node slices per network: more is a typo, not a cluster.
const SLICE_MAX_SPLIT_BITS: u8 = 20;

/// Why an allocation failed.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum AllocError {
    #[error("{what} is exhausted ({detail}): release unused ones or use a larger range")]
    Exhausted { what: &'static str, detail: String },
    #[error("address {0} is already in use by another interface")]
    InUse(IpAddr),
    #[error("address {addr} is outside {range}")]
    OutOfRange { addr: IpAddr, range: IpNet },
    #[error(
        "node slice /{prefix} does not fit range {range}: use a prefix length between /{} and /{} (or leave nodeSlicePrefix out)",
        range.prefix_len(),
        slice_max_prefix(*range)
    )]
    BadSlicePrefix { range: IpNet, prefix: u8 },
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
    /// Network → `range/slice-prefix` the indices of `slices` refer to; when
    /// either changes the indices mean other slices, so they start over.
    #[serde(default)]
    pub slice_shapes: BTreeMap<String, String>,
    /// What each node last said in its hello, so that after an agent restart
    /// the first node to reconnect still gets all its peers (its dataplane
    /// would otherwise drop the tunnels of nodes that have not reconnected yet).
    #[serde(default)]
    pub known_nodes: BTreeMap<String, KnownNode>,
    /// The broker's last view of this cluster (protobuf, base64), so that
    /// after a restart multi-cluster networks stay on the nodes with the
    /// same VNI and peers until the broker answers again.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub broker_view: Option<String>,
}

/// A node's last hello, as persisted.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct KnownNode {
    pub public_key: Vec<u8>,
    pub listen_port: u32,
    pub endpoints: Vec<String>,
}

impl Allocations {
    /// The stored broker view; a corrupt one counts as none (the broker
    /// sends a fresh one on connect).
    #[must_use]
    pub fn broker_view(&self) -> Option<l2mesh_proto::broker::ClusterView> {
        use base64::Engine as _;
        use prost::Message as _;
        let bytes = base64::engine::general_purpose::STANDARD
            .decode(self.broker_view.as_deref()?)
            .ok()?;
        l2mesh_proto::broker::ClusterView::decode(bytes.as_slice()).ok()
    }

    /// Store the broker's view (see [`Allocations::broker_view`]).
    pub fn set_broker_view(&mut self, view: &l2mesh_proto::broker::ClusterView) {
        use base64::Engine as _;
        use prost::Message as _;
        self.broker_view =
            Some(base64::engine::general_purpose::STANDARD.encode(view.encode_to_vec()));
    }

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

    /// The pod CIDR slice of `node` inside a network's cluster range, with
    /// prefix length `prefix` (see [`slice_prefix`]).
    pub fn node_slice(
        &mut self,
        network: &str,
        node: &str,
        range: IpNet,
        prefix: u8,
    ) -> Result<IpNet, AllocError> {
        let range = range.trunc();
        check_slice_prefix(range, prefix)?;
        let shape = format!("{range}/{prefix}");
        let split = prefix - range.prefix_len();
        let max_index = u32::try_from((1u64 << split) - 1).unwrap_or(u32::MAX);
        // State saved before shapes were recorded has none: its indices
        // were made with the default shape and are kept while they fit, so
        // an upgrade does not move every node to another slice.
        let reshaped = match self.slice_shapes.get(network) {
            Some(known) => *known != shape,
            None => self
                .slices
                .get(network)
                .is_some_and(|a| a.owners.values().any(|i| *i > max_index)),
        };
        if reshaped {
            self.slices.remove(network);
        }
        self.slice_shapes.insert(network.to_owned(), shape);
        let index = self
            .slices
            .entry(network.to_owned())
            .or_default()
            .get_or_allocate(node, 0, max_index, "node slices of the IP range")?;
        let host_bits = u32::from(bits(range) - prefix);
        let base = to_u128(range.network()) + (u128::from(index) << host_bits);
        IpNet::new(from_u128(base, range.addr().is_ipv6()), prefix).map_err(|_| {
            AllocError::Exhausted {
                what: "node slices of the IP range",
                detail: range.to_string(),
            }
        })
    }

    /// Forget the slices of networks not in `keep`.
    pub fn retain_slices(&mut self, keep: &BTreeSet<String>) {
        self.slices.retain(|name, _| keep.contains(name));
        self.slice_shapes.retain(|name, _| keep.contains(name));
    }
}

fn bits(net: IpNet) -> u8 {
    net.max_prefix_len()
}

fn to_u128(a: IpAddr) -> u128 {
    match a {
        IpAddr::V4(v4) => u128::from(u32::from(v4)),
        IpAddr::V6(v6) => u128::from(v6),
    }
}

fn from_u128(v: u128, v6: bool) -> IpAddr {
    if v6 {
        IpAddr::V6(Ipv6Addr::from(v))
    } else {
        IpAddr::V4(Ipv4Addr::from(u32::try_from(v).unwrap_or(u32::MAX)))
    }
}

/// Longest node slice prefix allowed in `range`: at least four addresses
/// per node, at most 2^20 slices.
#[must_use]
pub fn slice_max_prefix(range: IpNet) -> u8 {
    (bits(range) - SLICE_MIN_HOST_BITS)
        .min(range.prefix_len().saturating_add(SLICE_MAX_SPLIT_BITS))
        .max(range.prefix_len())
}

/// The default node slice prefix: 16 slices, but not longer than /28 on
/// IPv4 or /120 on IPv6 (so a node keeps 16 or 256 addresses).
#[must_use]
pub fn default_slice_max(range: IpNet) -> u8 {
    if range.addr().is_ipv6() { 120 } else { 28 }
}

/// Whether `prefix` is a valid node slice length inside `range`.
pub fn check_slice_prefix(range: IpNet, prefix: u8) -> Result<(), AllocError> {
    if prefix < range.prefix_len() || prefix > slice_max_prefix(range) {
        return Err(AllocError::BadSlicePrefix { range, prefix });
    }
    Ok(())
}

/// Prefix length of one node's slice of `range`: `requested` (the
/// L2Network's `nodeSlicePrefix`) if given and valid, else the default.
pub fn slice_prefix(range: IpNet, requested: Option<u8>) -> Result<u8, AllocError> {
    match requested {
        Some(p) => check_slice_prefix(range, p).map(|()| p),
        None => Ok(range
            .prefix_len()
            .saturating_add(SLICE_EXTRA_BITS)
            .min(default_slice_max(range))
            .max(range.prefix_len())),
    }
}

fn host_count(net: Ipv4Net) -> u32 {
    let size = 1u64 << (32 - net.prefix_len());
    u32::try_from(size.saturating_sub(2)).unwrap_or(u32::MAX)
}

fn nth(net: Ipv4Net, index: u32) -> Ipv4Addr {
    Ipv4Addr::from(u32::from(net.network()).wrapping_add(index))
}

/// Pick a pod address in `slice`: never the slice's (or the whole `range`'s)
/// first or last address (network and broadcast on IPv4, the subnet-router
/// anycast on IPv6), never one in `used`, round robin after `last`.
pub fn pick_pod_address(
    slice: IpNet,
    range: Option<IpNet>,
    used: &BTreeSet<IpAddr>,
    last: Option<IpAddr>,
) -> Result<IpAddr, AllocError> {
    let slice = slice.trunc();
    let reserved = |a: IpAddr| {
        a == slice.network()
            || a == slice.broadcast()
            || range.is_some_and(|r| a == r.network() || a == r.broadcast())
            || used.contains(&a)
    };
    let v6 = slice.addr().is_ipv6();
    let first = to_u128(slice.network());
    let host_bits = u32::from(bits(slice) - slice.prefix_len());
    // The slice size, or u128::MAX for a whole /0 of IPv6 (never reached).
    let size = 1u128.checked_shl(host_bits).unwrap_or(u128::MAX);
    let start = last
        .filter(|l| slice.contains(l))
        .map_or(0, |l| to_u128(l) - first + 1);
    // At most `used` plus four reserved addresses can be skipped, so a huge
    // (IPv6) slice is never walked to its end.
    let tries = size.min(used.len() as u128 + 5);
    for i in 0..tries {
        let candidate = from_u128(first + (start + i) % size, v6);
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
pub fn check_static(addr: IpAddr, range: IpNet, used: &BTreeSet<IpAddr>) -> Result<(), AllocError> {
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

    fn net(s: &str) -> IpNet {
        s.parse().unwrap()
    }

    fn ip(s: &str) -> IpAddr {
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
        let subnet: Ipv4Net = "100.64.3.0/30".parse().unwrap();
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

    fn assert_disjoint(seen: &[IpNet], s: IpNet) {
        assert!(
            seen.iter()
                .all(|o| !o.contains(&s.network()) && !s.contains(&o.network())),
            "{s} overlaps {seen:?}"
        );
    }

    #[test]
    fn node_slices_never_overlap() {
        let mut a = Allocations::default();
        let range = net("10.10.0.0/16");
        let prefix = slice_prefix(range, None).unwrap();
        assert_eq!(prefix, 20);
        let mut seen: Vec<IpNet> = Vec::new();
        for i in 0..16 {
            let s = a
                .node_slice("blue", &format!("node-{i}"), range, prefix)
                .unwrap();
            assert_eq!(s.prefix_len(), 20);
            assert!(range.contains(&s));
            assert_disjoint(&seen, s);
            seen.push(s);
        }
        assert!(a.node_slice("blue", "node-16", range, prefix).is_err());
        // Another network has its own slices.
        let red = net("10.20.0.0/24");
        assert_eq!(
            a.node_slice("red", "node-5", red, slice_prefix(red, None).unwrap())
                .unwrap(),
            net("10.20.0.0/28")
        );
        assert_eq!(slice_prefix(net("10.0.0.0/28"), None).unwrap(), 28);
    }

    #[test]
    fn ipv6_ranges_get_disjoint_node_slices_and_addresses() {
        let mut a = Allocations::default();
        let range = net("fd00:10::/64");
        let prefix = slice_prefix(range, None).unwrap();
        assert_eq!(prefix, 68);
        let mut seen = Vec::new();
        for i in 0..16 {
            let s = a.node_slice("v6", &format!("n{i}"), range, prefix).unwrap();
            assert!(range.contains(&s) && s.addr().is_ipv6());
            assert_disjoint(&seen, s);
            seen.push(s);
        }
        assert_eq!(seen[1], net("fd00:10:0:0:1000::/68"));
        assert!(a.node_slice("v6", "n16", range, prefix).is_err());
        // Addresses: never the slice's first address, round robin, no repeats.
        let slice = seen[0];
        let mut used = BTreeSet::new();
        let mut last = None;
        for want in ["fd00:10::1", "fd00:10::2", "fd00:10::3"] {
            let got = pick_pod_address(slice, Some(range), &used, last).unwrap();
            assert_eq!(got, ip(want));
            used.insert(got);
            last = Some(got);
        }
        // Small IPv6 ranges default to at most /120 slices.
        assert_eq!(slice_prefix(net("fd00::/112"), None).unwrap(), 116);
        assert_eq!(slice_prefix(net("fd00::/118"), None).unwrap(), 120);
        // Statics are checked by family too.
        assert!(check_static(ip("fd00:10::99"), range, &used).is_ok());
        assert!(matches!(
            check_static(ip("10.0.0.1"), range, &used),
            Err(AllocError::OutOfRange { .. })
        ));
    }

    #[test]
    fn node_slice_prefix_is_configurable_and_validated() {
        let mut a = Allocations::default();
        let range = net("10.30.0.0/16");
        // /24 per node: 256 nodes of 254 pods instead of the default 16 /20s.
        assert_eq!(slice_prefix(range, Some(24)).unwrap(), 24);
        let s0 = a.node_slice("big", "n0", range, 24).unwrap();
        let s1 = a.node_slice("big", "n1", range, 24).unwrap();
        assert_eq!((s0, s1), (net("10.30.0.0/24"), net("10.30.1.0/24")));
        // Longer than the default cap of /28 is fine where asked for.
        assert_eq!(slice_prefix(net("10.0.0.0/24"), Some(30)).unwrap(), 30);
        for bad in [15, 31, 32] {
            let e = slice_prefix(range, Some(bad)).unwrap_err();
            assert!(matches!(e, AllocError::BadSlicePrefix { prefix, .. } if prefix == bad));
            assert!(e.to_string().contains("between /16 and /30"), "{e}");
        }
        // At most 2^20 slices.
        assert!(slice_prefix(net("fd00::/48"), Some(69)).is_err());
        assert!(slice_prefix(net("fd00::/48"), Some(68)).is_ok());
        // A changed slice size starts the network's slices over.
        let s = a.node_slice("big", "n1", range, 20).unwrap();
        assert_eq!(s, net("10.30.0.0/20"), "n1 is the first of the new shape");
        a.retain_slices(&BTreeSet::new());
        assert!(a.slices.is_empty() && a.slice_shapes.is_empty());
    }

    #[test]
    fn slices_saved_before_shapes_were_recorded_are_kept() {
        // allocations.json of an older agent: indices, no shapes.
        let old = r#"{"slices": {"blue": {"owners": {"n0": 3, "n1": 7}, "last": 7}}}"#;
        let mut a: Allocations = serde_json::from_str(old).unwrap();
        let range = net("10.10.0.0/16");
        let prefix = slice_prefix(range, None).unwrap();
        assert_eq!(
            a.node_slice("blue", "n1", range, prefix).unwrap(),
            net("10.10.112.0/20")
        );
        assert_eq!(
            a.node_slice("blue", "n2", range, prefix).unwrap(),
            net("10.10.128.0/20")
        );
        // Old indices that do not fit a new shape start over.
        let mut a: Allocations = serde_json::from_str(old).unwrap();
        assert_eq!(
            a.node_slice("blue", "n1", range, 17).unwrap(),
            net("10.10.0.0/17")
        );
    }

    #[test]
    fn pod_addresses_round_robin_and_never_collide() {
        let slice = net("10.1.0.0/29");
        let range = Some(net("10.1.0.0/16"));
        let mut used = BTreeSet::new();
        let mut last = None;
        for expected in 1..=6u8 {
            let a = pick_pod_address(slice, range, &used, last).unwrap();
            assert_eq!(a, IpAddr::V4(Ipv4Addr::new(10, 1, 0, expected)));
            used.insert(a);
            last = Some(a);
        }
        assert!(pick_pod_address(slice, range, &used, last).is_err());
        used.remove(&ip("10.1.0.3"));
        assert_eq!(
            pick_pod_address(slice, range, &used, last).unwrap(),
            ip("10.1.0.3")
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
        used.insert(ip("10.1.0.9"));
        assert!(check_static(ip("10.1.0.8"), range, &used).is_ok());
        assert_eq!(
            check_static(ip("10.1.0.9"), range, &used),
            Err(AllocError::InUse(ip("10.1.0.9")))
        );
        assert!(matches!(
            check_static(ip("10.2.0.1"), range, &used),
            Err(AllocError::OutOfRange { .. })
        ));
    }
}
