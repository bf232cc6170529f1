//! The sans-IO layer-2 switch: per-VNI MAC learning with aging, ingress
//! replication of broadcast/multicast/unknown unicast, and split horizon by
//! peer group. It decides, the shell moves bytes.

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use crate::wire::ETH_HEADER;

/// Stable id of a peer inside this process (also its boringtun index).
pub type PeerId = u32;

/// Where a frame entered or leaves the switch.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Port {
    /// The network's TAP device, i.e. the local bridge and its pods.
    Tap,
    Peer(PeerId),
}

/// Split-horizon group of a peer: a frame from a peer never goes to another
/// peer of the same group.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Group {
    /// A node of this cluster.
    Local,
    /// A gateway of another cluster.
    Remote,
}

/// Why the switch refused a frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum DropReason {
    /// No network with this VNI on this node.
    UnknownVni,
    /// The sending peer is not a member of the VNI.
    NotMember,
    /// Larger than the network MTU allows.
    Oversized,
    /// Shorter than an Ethernet header.
    Runt,
    /// Source MAC is a multicast address.
    BadSourceMac,
    /// The destination was learned behind a peer of the sender's group (or
    /// the sender itself): forwarding it would break split horizon.
    SplitHorizon,
    /// Known unicast destination behind the port it came from.
    Hairpin,
}

impl DropReason {
    /// The label used in status and metrics.
    pub fn as_str(self) -> &'static str {
        match self {
            DropReason::UnknownVni => "unknown_vni",
            DropReason::NotMember => "vni_not_member",
            DropReason::Oversized => "oversized",
            DropReason::Runt => "runt",
            DropReason::BadSourceMac => "bad_source_mac",
            DropReason::SplitHorizon => "split_horizon",
            DropReason::Hairpin => "hairpin",
        }
    }
}

/// A `HashMap` with a fast, randomly seeded hash: every frame costs a few
/// lookups (network, source and destination MAC, peer), and SipHash was a
/// visible share of the per-packet CPU. The seed is per process, so MACs
/// chosen by a pod cannot be aimed at one bucket.
pub(crate) type FastMap<K, V> = std::collections::HashMap<K, V, foldhash::fast::RandomState>;

/// The peers a frame goes to, in ascending id order. Known unicast (nearly
/// every frame) names one peer and allocates nothing; only a flood to two
/// or more peers needs the heap.
#[derive(Debug, Clone, Default)]
pub enum Peers {
    #[default]
    None,
    One(PeerId),
    Many(Vec<PeerId>),
}

impl Peers {
    pub fn as_slice(&self) -> &[PeerId] {
        match self {
            Peers::None => &[],
            Peers::One(id) => std::slice::from_ref(id),
            Peers::Many(v) => v,
        }
    }

    pub fn is_empty(&self) -> bool {
        self.as_slice().is_empty()
    }

    pub fn len(&self) -> usize {
        self.as_slice().len()
    }

    pub fn iter(&self) -> std::slice::Iter<'_, PeerId> {
        self.as_slice().iter()
    }

    fn push(&mut self, id: PeerId) {
        *self = match std::mem::take(self) {
            Peers::None => Peers::One(id),
            Peers::One(first) => Peers::Many(vec![first, id]),
            Peers::Many(mut v) => {
                v.push(id);
                Peers::Many(v)
            }
        };
    }

    fn sort(&mut self) {
        if let Peers::Many(v) = self {
            v.sort_unstable();
        }
    }
}

/// Equal when they name the same peers, however they are stored.
impl PartialEq for Peers {
    fn eq(&self, other: &Self) -> bool {
        self.as_slice() == other.as_slice()
    }
}

impl Eq for Peers {}

impl PartialEq<[PeerId]> for Peers {
    fn eq(&self, other: &[PeerId]) -> bool {
        self.as_slice() == other
    }
}

impl<const N: usize> PartialEq<[PeerId; N]> for Peers {
    fn eq(&self, other: &[PeerId; N]) -> bool {
        self.as_slice() == other
    }
}

impl PartialEq<Vec<PeerId>> for Peers {
    fn eq(&self, other: &Vec<PeerId>) -> bool {
        self.as_slice() == other.as_slice()
    }
}

impl<'a> IntoIterator for &'a Peers {
    type Item = &'a PeerId;
    type IntoIter = std::slice::Iter<'a, PeerId>;

    fn into_iter(self) -> Self::IntoIter {
        self.iter()
    }
}

impl From<Vec<PeerId>> for Peers {
    fn from(v: Vec<PeerId>) -> Self {
        match v.as_slice() {
            [] => Peers::None,
            [id] => Peers::One(*id),
            _ => Peers::Many(v),
        }
    }
}

/// Where a frame goes.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Forward {
    pub to_tap: bool,
    /// Peers to send a copy to, in ascending id order.
    pub peers: Peers,
    /// Copies not sent to members because of split horizon.
    pub suppressed: u32,
}

#[derive(Debug, Clone)]
struct MacEntry {
    port: Port,
    seen: Instant,
}

#[derive(Debug, Clone)]
struct Net {
    max_frame: usize,
    macs: FastMap<[u8; 6], MacEntry>,
}

#[derive(Debug, Clone)]
struct PeerInfo {
    group: Group,
    vnis: BTreeSet<u32>,
}

/// One learned MAC, for status output.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MacView {
    pub mac: [u8; 6],
    pub port: Port,
    pub age: Duration,
}

/// The switch for all networks of the node.
#[derive(Debug, Clone)]
pub struct Switch {
    nets: FastMap<u32, Net>,
    peers: FastMap<PeerId, PeerInfo>,
    aging: Duration,
    max_macs: usize,
}

/// Default MAC aging, as Linux bridges do.
pub const DEFAULT_AGING: Duration = Duration::from_secs(300);
/// Bound on learned MACs per network so a flood of random sources cannot
/// exhaust memory; beyond it frames are still forwarded (flooded).
pub const DEFAULT_MAX_MACS: usize = 16_384;

impl Default for Switch {
    fn default() -> Self {
        Self::new(DEFAULT_AGING, DEFAULT_MAX_MACS)
    }
}

fn is_multicast(mac: &[u8; 6]) -> bool {
    mac[0] & 1 == 1
}

impl Switch {
    pub fn new(aging: Duration, max_macs: usize) -> Self {
        Self {
            nets: FastMap::default(),
            peers: FastMap::default(),
            aging,
            max_macs,
        }
    }

    /// Adds or updates a network; learned MACs survive an MTU change.
    pub fn set_network(&mut self, vni: u32, mtu: u32) {
        // Allow one 802.1Q tag on top of the MTU.
        let max_frame = mtu as usize + ETH_HEADER + 4;
        self.nets
            .entry(vni)
            .and_modify(|n| n.max_frame = max_frame)
            .or_insert_with(|| Net {
                max_frame,
                macs: FastMap::default(),
            });
    }

    pub fn remove_network(&mut self, vni: u32) {
        self.nets.remove(&vni);
    }

    /// Adds or updates a peer. MACs learned behind it in VNIs it left are
    /// forgotten. A MAC is learned behind a peer only in the VNIs it is a
    /// member of, so only the tables of the VNIs it left are scanned; returns
    /// how many entries that was.
    pub fn set_peer(&mut self, id: PeerId, group: Group, vnis: BTreeSet<u32>) -> usize {
        let mut scanned = 0;
        if let Some(old) = self.peers.get(&id) {
            for vni in old.vnis.difference(&vnis) {
                scanned += forget_peer(self.nets.get_mut(vni), id);
            }
        }
        self.peers.insert(id, PeerInfo { group, vnis });
        scanned
    }

    /// Removes a peer and the MACs learned behind it (scanning the tables of
    /// its VNIs only); returns how many entries were scanned.
    pub fn remove_peer(&mut self, id: PeerId) -> usize {
        let Some(old) = self.peers.remove(&id) else {
            return 0;
        };
        old.vnis
            .iter()
            .map(|vni| forget_peer(self.nets.get_mut(vni), id))
            .sum()
    }

    /// Whether `peer` may carry frames of `vni`.
    pub fn is_member(&self, peer: PeerId, vni: u32) -> bool {
        self.peers.get(&peer).is_some_and(|p| p.vnis.contains(&vni))
    }

    /// A frame read from the network's TAP.
    pub fn from_tap(
        &mut self,
        vni: u32,
        frame: &[u8],
        now: Instant,
    ) -> Result<Forward, DropReason> {
        self.forward(Port::Tap, vni, frame, now)
    }

    /// A frame that arrived from `peer` (already decrypted and decoded).
    pub fn from_peer(
        &mut self,
        peer: PeerId,
        vni: u32,
        frame: &[u8],
        now: Instant,
    ) -> Result<Forward, DropReason> {
        self.forward(Port::Peer(peer), vni, frame, now)
    }

    fn forward(
        &mut self,
        ingress: Port,
        vni: u32,
        frame: &[u8],
        now: Instant,
    ) -> Result<Forward, DropReason> {
        let src_group = match ingress {
            Port::Tap => None,
            Port::Peer(id) => {
                let p = self.peers.get(&id).ok_or(DropReason::NotMember)?;
                if !p.vnis.contains(&vni) {
                    return Err(DropReason::NotMember);
                }
                Some(p.group)
            }
        };
        let net = self.nets.get_mut(&vni).ok_or(DropReason::UnknownVni)?;
        if frame.len() < ETH_HEADER {
            return Err(DropReason::Runt);
        }
        if frame.len() > net.max_frame {
            return Err(DropReason::Oversized);
        }
        let (dst, src) = crate::wire::macs(frame).ok_or(DropReason::Runt)?;
        if is_multicast(&src) {
            return Err(DropReason::BadSourceMac);
        }
        // Learn the source.
        let room = net.macs.len() < self.max_macs;
        match net.macs.get_mut(&src) {
            Some(e) => {
                e.port = ingress;
                e.seen = now;
            }
            None if room => {
                net.macs.insert(
                    src,
                    MacEntry {
                        port: ingress,
                        seen: now,
                    },
                );
            }
            None => {}
        }
        let known = if is_multicast(&dst) {
            None
        } else {
            net.macs
                .get(&dst)
                .filter(|e| now.saturating_duration_since(e.seen) <= self.aging)
                .map(|e| e.port)
        };
        let allowed = |id: PeerId, info: &PeerInfo| {
            Port::Peer(id) != ingress && src_group.is_none_or(|g| g != info.group)
        };
        match known {
            Some(port) if port == ingress => Err(DropReason::Hairpin),
            Some(Port::Tap) => Ok(Forward {
                to_tap: true,
                ..Forward::default()
            }),
            Some(Port::Peer(id)) => match self.peers.get(&id) {
                Some(info) if info.vnis.contains(&vni) && allowed(id, info) => Ok(Forward {
                    peers: Peers::One(id),
                    ..Forward::default()
                }),
                Some(info) if info.vnis.contains(&vni) => Err(DropReason::SplitHorizon),
                // Stale entry for a peer that left: flood instead.
                _ => Ok(self.flood(ingress, src_group, vni)),
            },
            None => Ok(self.flood(ingress, src_group, vni)),
        }
    }

    fn flood(&self, ingress: Port, src_group: Option<Group>, vni: u32) -> Forward {
        let mut fwd = Forward {
            to_tap: ingress != Port::Tap,
            ..Forward::default()
        };
        for (id, info) in &self.peers {
            if Port::Peer(*id) == ingress || !info.vnis.contains(&vni) {
                continue;
            }
            if src_group == Some(info.group) {
                fwd.suppressed += 1;
            } else {
                fwd.peers.push(*id);
            }
        }
        fwd.peers.sort();
        fwd
    }

    /// Forgets MACs not seen for longer than the aging time.
    pub fn expire(&mut self, now: Instant) {
        let aging = self.aging;
        for net in self.nets.values_mut() {
            net.macs
                .retain(|_, e| now.saturating_duration_since(e.seen) <= aging);
        }
    }

    /// The MAC table of one network, sorted by MAC.
    pub fn macs(&self, vni: u32, now: Instant) -> Vec<MacView> {
        let mut v: Vec<MacView> = self
            .nets
            .get(&vni)
            .map(|n| {
                n.macs
                    .iter()
                    .map(|(mac, e)| MacView {
                        mac: *mac,
                        port: e.port,
                        age: now.saturating_duration_since(e.seen),
                    })
                    .collect()
            })
            .unwrap_or_default();
        v.sort_by_key(|m| m.mac);
        v
    }
}

/// Drops the MACs learned behind `id` from one network's table; the number
/// of entries scanned.
fn forget_peer(net: Option<&mut Net>, id: PeerId) -> usize {
    let Some(net) = net else {
        return 0;
    };
    let scanned = net.macs.len();
    net.macs.retain(|_, e| e.port != Port::Peer(id));
    scanned
}

#[cfg(test)]
mod tests {
    use super::*;

    const BCAST: [u8; 6] = [0xff; 6];

    fn mac(n: u8) -> [u8; 6] {
        [2, 0, 0, 0, 0, n]
    }

    fn frame(dst: [u8; 6], src: [u8; 6]) -> Vec<u8> {
        let mut f = dst.to_vec();
        f.extend_from_slice(&src);
        f.extend_from_slice(&[0x08, 0x00]);
        f.resize(64, 0);
        f
    }

    fn set(v: &[u32]) -> BTreeSet<u32> {
        v.iter().copied().collect()
    }

    /// A gateway: local peers 1 and 2, remote peers 10 and 11, all on VNI 5;
    /// peer 3 (local) only on VNI 6.
    fn gateway() -> Switch {
        let mut s = Switch::default();
        s.set_network(5, 1390);
        s.set_network(6, 1390);
        s.set_peer(1, Group::Local, set(&[5]));
        s.set_peer(2, Group::Local, set(&[5]));
        s.set_peer(3, Group::Local, set(&[6]));
        s.set_peer(10, Group::Remote, set(&[5]));
        s.set_peer(11, Group::Remote, set(&[5]));
        s
    }

    #[test]
    fn broadcast_from_tap_goes_to_every_member_peer() {
        let mut s = gateway();
        let f = s
            .from_tap(5, &frame(BCAST, mac(1)), Instant::now())
            .unwrap();
        assert_eq!(
            f,
            Forward {
                to_tap: false,
                peers: vec![1, 2, 10, 11].into(),
                suppressed: 0
            }
        );
    }

    #[test]
    fn split_horizon_from_local_reaches_tap_and_remotes_only() {
        let mut s = gateway();
        let f = s
            .from_peer(1, 5, &frame(BCAST, mac(1)), Instant::now())
            .unwrap();
        assert_eq!(
            f,
            Forward {
                to_tap: true,
                peers: vec![10, 11].into(),
                suppressed: 1
            }
        );
    }

    #[test]
    fn split_horizon_from_remote_reaches_tap_and_locals_only() {
        let mut s = gateway();
        let f = s
            .from_peer(10, 5, &frame(BCAST, mac(1)), Instant::now())
            .unwrap();
        assert_eq!(
            f,
            Forward {
                to_tap: true,
                peers: vec![1, 2].into(),
                suppressed: 1
            }
        );
    }

    #[test]
    fn learned_unicast_goes_to_one_port_and_respects_split_horizon() {
        let mut s = gateway();
        let now = Instant::now();
        s.from_peer(2, 5, &frame(BCAST, mac(22)), now).unwrap();
        s.from_peer(10, 5, &frame(BCAST, mac(100)), now).unwrap();
        s.from_tap(5, &frame(BCAST, mac(7)), now).unwrap();
        // tap -> learned peer
        let f = s.from_tap(5, &frame(mac(22), mac(7)), now).unwrap();
        assert_eq!(f.peers, vec![2]);
        assert!(!f.to_tap);
        // local -> remote is fine
        let f = s.from_peer(1, 5, &frame(mac(100), mac(11)), now).unwrap();
        assert_eq!(f.peers, vec![10]);
        // local -> local is not
        assert_eq!(
            s.from_peer(1, 5, &frame(mac(22), mac(11)), now),
            Err(DropReason::SplitHorizon)
        );
        // peer -> pod behind tap
        let f = s.from_peer(10, 5, &frame(mac(7), mac(100)), now).unwrap();
        assert!(f.to_tap && f.peers.is_empty());
        // back to where it came from
        assert_eq!(
            s.from_peer(10, 5, &frame(mac(100), mac(101)), now),
            Err(DropReason::Hairpin)
        );
    }

    #[test]
    fn non_members_and_unknown_vnis_are_dropped() {
        let mut s = gateway();
        let now = Instant::now();
        assert_eq!(
            s.from_peer(3, 5, &frame(BCAST, mac(1)), now),
            Err(DropReason::NotMember)
        );
        assert_eq!(
            s.from_peer(99, 5, &frame(BCAST, mac(1)), now),
            Err(DropReason::NotMember)
        );
        assert_eq!(
            s.from_tap(77, &frame(BCAST, mac(1)), now),
            Err(DropReason::UnknownVni)
        );
        // peer 3 is on VNI 6 only, so a VNI-6 broadcast from the tap goes only there
        assert_eq!(
            s.from_tap(6, &frame(BCAST, mac(1)), now).unwrap().peers,
            vec![3]
        );
    }

    #[test]
    fn bad_frames_are_dropped() {
        let mut s = gateway();
        let now = Instant::now();
        assert_eq!(s.from_tap(5, &[0; 10], now), Err(DropReason::Runt));
        let mut big = frame(BCAST, mac(1));
        big.resize(1390 + 14 + 5, 0);
        assert_eq!(s.from_tap(5, &big, now), Err(DropReason::Oversized));
        big.truncate(1390 + 14);
        assert!(s.from_tap(5, &big, now).is_ok());
        assert_eq!(
            s.from_tap(5, &frame(mac(1), BCAST), now),
            Err(DropReason::BadSourceMac)
        );
    }

    #[test]
    fn entries_age_out_and_unknown_unicast_floods() {
        let mut s = Switch::new(Duration::from_secs(10), 100);
        s.set_network(5, 1390);
        s.set_peer(1, Group::Local, set(&[5]));
        s.set_peer(2, Group::Local, set(&[5]));
        let t0 = Instant::now();
        s.from_peer(1, 5, &frame(BCAST, mac(1)), t0).unwrap();
        assert_eq!(
            s.from_tap(5, &frame(mac(1), mac(9)), t0).unwrap().peers,
            vec![1]
        );
        let later = t0 + Duration::from_secs(11);
        assert_eq!(
            s.from_tap(5, &frame(mac(1), mac(9)), later).unwrap().peers,
            vec![1, 2]
        );
        s.expire(later);
        let table = s.macs(5, later);
        assert_eq!(
            table.len(),
            1,
            "only the tap MAC refreshed at `later` stays"
        );
        assert_eq!(table[0].port, Port::Tap);
    }

    #[test]
    fn removing_a_peer_forgets_its_macs_and_mac_table_is_bounded() {
        let mut s = Switch::new(DEFAULT_AGING, 2);
        s.set_network(5, 1390);
        s.set_peer(1, Group::Local, set(&[5]));
        let now = Instant::now();
        for n in 1..5 {
            s.from_peer(1, 5, &frame(BCAST, mac(n)), now).unwrap();
        }
        assert_eq!(s.macs(5, now).len(), 2);
        s.remove_peer(1);
        assert!(s.macs(5, now).is_empty());
        s.set_peer(1, Group::Local, set(&[5]));
        s.from_peer(1, 5, &frame(BCAST, mac(1)), now).unwrap();
        s.set_peer(1, Group::Local, set(&[]));
        assert!(
            s.macs(5, now).is_empty(),
            "leaving the VNI forgets MACs behind the peer"
        );
    }
    #[test]
    fn a_single_destination_is_held_inline() {
        let mut s = gateway();
        let now = Instant::now();
        s.from_peer(2, 5, &frame(BCAST, mac(22)), now).unwrap();
        let f = s.from_tap(5, &frame(mac(22), mac(7)), now).unwrap();
        assert!(matches!(f.peers, Peers::One(2)), "{f:?}");
        // A flood that reaches one peer is inline too; two or more are not.
        let f = s.from_tap(6, &frame(BCAST, mac(8)), now).unwrap();
        assert!(matches!(f.peers, Peers::One(3)), "{f:?}");
        let f = s.from_tap(5, &frame(BCAST, mac(7)), now).unwrap();
        assert!(
            matches!(&f.peers, Peers::Many(v) if v == &[1, 2, 10, 11]),
            "{f:?}"
        );
    }

    #[test]
    fn peer_sets_compare_by_their_peers() {
        assert_eq!(Peers::One(4), Peers::from(vec![4]));
        assert_eq!(Peers::Many(vec![]), Peers::None);
        assert_eq!(Peers::from(vec![1, 2]).as_slice(), &[1, 2]);
        assert_ne!(Peers::One(1), Peers::Many(vec![1, 2]));
        let mut p = Peers::None;
        for id in [9, 3, 5] {
            p.push(id);
        }
        p.sort();
        assert_eq!(p, [3, 5, 9]);
        assert_eq!(p.len(), 3);
        assert!(!p.is_empty() && Peers::None.is_empty());
    }
}
