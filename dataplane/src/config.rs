//! The desired state, validated, and its diff against the current one.

use std::collections::{BTreeMap, BTreeSet};
use std::net::{Ipv4Addr, SocketAddr};

use base64::Engine as _;
use l2mesh_proto::node::{DesiredState, PeerGroup};

use crate::switch::Group;
use crate::wire::MAX_VNI;

/// Pod interface MTU when a network does not say: 1500 underlay minus
/// WireGuard, inner IPv4/UDP/VXLAN and Ethernet overhead.
pub const DEFAULT_MTU: u32 = 1390;
const MIN_MTU: u32 = 576;
pub const MAX_MTU: u32 = 9000;

/// A desired state that cannot be applied; nothing was changed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ConfigError {
    #[error("network #{index}: name is empty; give every network a name")]
    EmptyNetworkName { index: usize },
    #[error("network {name:?} appears twice; network names must be unique")]
    DuplicateNetwork { name: String },
    #[error("network {name:?}: VNI {vni} is outside 1..=16777215; pick a 24-bit VNI")]
    BadVni { name: String, vni: u32 },
    #[error(
        "network {name:?}: VNI {vni} is already used by network {other:?}; VNIs must be unique"
    )]
    DuplicateVni {
        name: String,
        vni: u32,
        other: String,
    },
    #[error("network {name:?}: MTU {mtu} is outside {MIN_MTU}..={MAX_MTU} (0 means {DEFAULT_MTU})")]
    BadMtu { name: String, mtu: u32 },
    #[error("network {name:?}: pod_cidr {value:?} is not a CIDR like 10.1.2.0/24")]
    BadPodCidr { name: String, value: String },
    #[error(
        "identity.tunnel_ip {value:?} is not an IPv4 address; set this node's tunnel IPv4 address"
    )]
    BadTunnelIp { value: String },
    #[error(
        "peers are configured but identity.tunnel_ip is empty; set this node's tunnel IPv4 address"
    )]
    MissingTunnelIp,
    #[error(
        "identity.listen_port {value} is not a UDP port (1..=65535, or 0 to keep the current one)"
    )]
    BadListenPort { value: u32 },
    #[error("peer #{index} ({name:?}): public key has {len} bytes; a WireGuard public key has 32")]
    BadPeerKey {
        index: usize,
        name: String,
        len: usize,
    },
    #[error("peer {key}: appears twice; every public key may be listed once")]
    DuplicatePeer { key: String },
    #[error("peer {key}: endpoint {value:?} is not ip:port")]
    BadEndpoint { key: String, value: String },
    #[error("peer {key}: tunnel_ip {value:?} is not an IPv4 address")]
    BadPeerTunnelIp { key: String, value: String },
    #[error("peer {key}: group is unspecified; set PEER_GROUP_LOCAL or PEER_GROUP_REMOTE")]
    MissingGroup { key: String },
    #[error("peer {key}: VNI {vni} is outside 1..=16777215")]
    BadPeerVni { key: String, vni: u32 },
    #[error("peer {key}: persistent_keepalive {value} is over 65535 seconds")]
    BadKeepalive { key: String, value: u32 },
    #[error(
        "peer {name:?} ({key}) has this node's own public key: the desired state lists this node \
         as its own peer; remove it from the peers (if it is another node, that node shares this \
         node's key: delete its key file and restart it to get a key of its own)"
    )]
    SelfPeer { name: String, key: String },
    #[error("{what} is {len} bytes long; the limit is {max} bytes: shorten it")]
    TooLong {
        what: String,
        len: usize,
        max: usize,
    },
}

/// Every string of a desired state within the shared limits, checked before
/// anything else so that no error, log line or status copies a huge value.
fn check_lengths(d: &DesiredState) -> Result<(), ConfigError> {
    use l2mesh_proto::limits::{MAX_ENDPOINT_BYTES, MAX_FIELD_BYTES, MAX_NAME_BYTES};
    let check = |what: &dyn Fn() -> String, s: &str, max: usize| {
        if s.len() > max {
            Err(ConfigError::TooLong {
                what: what(),
                len: s.len(),
                max,
            })
        } else {
            Ok(())
        }
    };
    if let Some(id) = &d.identity {
        check(
            &|| "identity.node_name".into(),
            &id.node_name,
            MAX_NAME_BYTES,
        )?;
        check(
            &|| "identity.tunnel_ip".into(),
            &id.tunnel_ip,
            MAX_FIELD_BYTES,
        )?;
    }
    for (i, n) in d.networks.iter().enumerate() {
        check(&|| format!("network #{i}: name"), &n.name, MAX_NAME_BYTES)?;
        check(
            &|| format!("network #{i}: pod_cidr"),
            &n.pod_cidr,
            MAX_FIELD_BYTES,
        )?;
    }
    for (i, p) in d.peers.iter().enumerate() {
        check(&|| format!("peer #{i}: name"), &p.name, MAX_NAME_BYTES)?;
        check(
            &|| format!("peer #{i}: endpoint"),
            &p.endpoint,
            MAX_ENDPOINT_BYTES,
        )?;
        check(
            &|| format!("peer #{i}: tunnel_ip"),
            &p.tunnel_ip,
            MAX_FIELD_BYTES,
        )?;
    }
    Ok(())
}

/// Base64 of a public key, as `wg` prints it.
pub fn key_b64(key: &[u8]) -> String {
    base64::engine::general_purpose::STANDARD.encode(key)
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NetConfig {
    pub name: String,
    pub vni: u32,
    pub mtu: u32,
    pub pod_cidr: String,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeerConfig {
    pub key: [u8; 32],
    pub name: String,
    pub endpoint: Option<SocketAddr>,
    pub tunnel_ip: Ipv4Addr,
    pub vnis: BTreeSet<u32>,
    pub group: Group,
    pub keepalive: Option<u16>,
}

impl PeerConfig {
    /// The name shown in status: the given name or the key.
    pub fn label(&self) -> String {
        if self.name.is_empty() {
            key_b64(&self.key)
        } else {
            self.name.clone()
        }
    }
}

/// A validated desired state.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Config {
    pub revision: u64,
    pub node_name: String,
    pub tunnel_ip: Option<Ipv4Addr>,
    /// 0 keeps the current port.
    pub listen_port: u16,
    pub networks: BTreeMap<String, NetConfig>,
    pub peers: BTreeMap<[u8; 32], PeerConfig>,
}

impl Config {
    pub fn from_desired(d: &DesiredState) -> Result<Self, ConfigError> {
        check_lengths(d)?;
        let mut cfg = Config {
            revision: d.revision,
            ..Config::default()
        };
        if let Some(id) = &d.identity {
            cfg.node_name.clone_from(&id.node_name);
            if !id.tunnel_ip.is_empty() {
                cfg.tunnel_ip =
                    Some(id.tunnel_ip.parse().map_err(|_| ConfigError::BadTunnelIp {
                        value: id.tunnel_ip.clone(),
                    })?);
            }
            cfg.listen_port =
                u16::try_from(id.listen_port).map_err(|_| ConfigError::BadListenPort {
                    value: id.listen_port,
                })?;
        }
        let mut vnis: BTreeMap<u32, String> = BTreeMap::new();
        for (index, n) in d.networks.iter().enumerate() {
            if n.name.is_empty() {
                return Err(ConfigError::EmptyNetworkName { index });
            }
            if cfg.networks.contains_key(&n.name) {
                return Err(ConfigError::DuplicateNetwork {
                    name: n.name.clone(),
                });
            }
            if n.vni == 0 || n.vni > MAX_VNI {
                return Err(ConfigError::BadVni {
                    name: n.name.clone(),
                    vni: n.vni,
                });
            }
            if let Some(other) = vnis.get(&n.vni) {
                return Err(ConfigError::DuplicateVni {
                    name: n.name.clone(),
                    vni: n.vni,
                    other: other.clone(),
                });
            }
            let mtu = if n.mtu == 0 { DEFAULT_MTU } else { n.mtu };
            if !(MIN_MTU..=MAX_MTU).contains(&mtu) {
                return Err(ConfigError::BadMtu {
                    name: n.name.clone(),
                    mtu: n.mtu,
                });
            }
            if !n.pod_cidr.is_empty() && n.pod_cidr.parse::<ipnet::IpNet>().is_err() {
                return Err(ConfigError::BadPodCidr {
                    name: n.name.clone(),
                    value: n.pod_cidr.clone(),
                });
            }
            vnis.insert(n.vni, n.name.clone());
            cfg.networks.insert(
                n.name.clone(),
                NetConfig {
                    name: n.name.clone(),
                    vni: n.vni,
                    mtu,
                    pod_cidr: n.pod_cidr.clone(),
                },
            );
        }
        for (index, p) in d.peers.iter().enumerate() {
            let key: [u8; 32] =
                p.public_key
                    .as_slice()
                    .try_into()
                    .map_err(|_| ConfigError::BadPeerKey {
                        index,
                        name: p.name.clone(),
                        len: p.public_key.len(),
                    })?;
            // Encoded only for an error message: most states have none.
            let k = || key_b64(&key);
            if cfg.peers.contains_key(&key) {
                return Err(ConfigError::DuplicatePeer { key: k() });
            }
            let endpoint = if p.endpoint.is_empty() {
                None
            } else {
                Some(p.endpoint.parse().map_err(|_| ConfigError::BadEndpoint {
                    key: k(),
                    value: p.endpoint.clone(),
                })?)
            };
            let tunnel_ip = p
                .tunnel_ip
                .parse()
                .map_err(|_| ConfigError::BadPeerTunnelIp {
                    key: k(),
                    value: p.tunnel_ip.clone(),
                })?;
            let group = match p.group() {
                PeerGroup::Local => Group::Local,
                PeerGroup::Remote => Group::Remote,
                PeerGroup::Unspecified => return Err(ConfigError::MissingGroup { key: k() }),
            };
            if let Some(vni) = p.vnis.iter().find(|v| **v == 0 || **v > MAX_VNI) {
                return Err(ConfigError::BadPeerVni {
                    key: k(),
                    vni: *vni,
                });
            }
            let keepalive = match p.persistent_keepalive {
                0 => None,
                v => Some(
                    u16::try_from(v)
                        .map_err(|_| ConfigError::BadKeepalive { key: k(), value: v })?,
                ),
            };
            cfg.peers.insert(
                key,
                PeerConfig {
                    key,
                    name: p.name.clone(),
                    endpoint,
                    tunnel_ip,
                    vnis: p.vnis.iter().copied().collect(),
                    group,
                    keepalive,
                },
            );
        }
        if !cfg.peers.is_empty() && cfg.tunnel_ip.is_none() {
            return Err(ConfigError::MissingTunnelIp);
        }
        Ok(cfg)
    }

    /// Rejects a peer whose key is `own`, this node's public key: a node
    /// cannot tunnel to itself, and skipping it silently would hide a
    /// mistake in whatever computed the state (or two nodes sharing a key).
    pub fn reject_own_key(&self, own: &[u8; 32]) -> Result<(), ConfigError> {
        match self.peers.get(own) {
            Some(p) => Err(ConfigError::SelfPeer {
                name: p.name.clone(),
                key: key_b64(own),
            }),
            None => Ok(()),
        }
    }
}

/// What differs between the current and the desired state.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Diff {
    pub networks_added: Vec<NetConfig>,
    pub networks_removed: Vec<NetConfig>,
    /// (old, new) for networks whose VNI, MTU or pod CIDR changed.
    pub networks_changed: Vec<(NetConfig, NetConfig)>,
    pub peers_added: Vec<PeerConfig>,
    pub peers_removed: Vec<PeerConfig>,
    pub peers_changed: Vec<(PeerConfig, PeerConfig)>,
    pub identity_changed: bool,
}

impl Diff {
    pub fn between(old: &Config, new: &Config) -> Self {
        let mut d = Self::networks_between(old, new);
        for (key, p) in &new.peers {
            match old.peers.get(key) {
                None => d.peers_added.push(p.clone()),
                Some(o) if o != p => d.peers_changed.push((o.clone(), p.clone())),
                Some(_) => {}
            }
        }
        for (key, o) in &old.peers {
            if !new.peers.contains_key(key) {
                d.peers_removed.push(o.clone());
            }
        }
        d
    }

    /// The identity and network part of the diff only (peers are the
    /// engine's business): what the device steps of an apply need.
    pub fn networks_between(old: &Config, new: &Config) -> Self {
        let mut d = Diff {
            identity_changed: old.tunnel_ip != new.tunnel_ip
                || old.node_name != new.node_name
                || (new.listen_port != 0 && old.listen_port != new.listen_port),
            ..Diff::default()
        };
        for (name, n) in &new.networks {
            match old.networks.get(name) {
                None => d.networks_added.push(n.clone()),
                Some(o) if o != n => d.networks_changed.push((o.clone(), n.clone())),
                Some(_) => {}
            }
        }
        for (name, o) in &old.networks {
            if !new.networks.contains_key(name) {
                d.networks_removed.push(o.clone());
            }
        }
        d
    }

    pub fn is_empty(&self) -> bool {
        *self == Diff::default()
    }

    /// One human-readable line per change.
    pub fn describe(&self) -> Vec<String> {
        let mut v = Vec::new();
        if self.identity_changed {
            v.push("changed node identity".to_string());
        }
        v.extend(
            self.networks_added
                .iter()
                .map(|n| format!("added network {} (vni {})", n.name, n.vni)),
        );
        v.extend(
            self.networks_changed
                .iter()
                .map(|(_, n)| format!("changed network {}", n.name)),
        );
        v.extend(
            self.networks_removed
                .iter()
                .map(|n| format!("removed network {}", n.name)),
        );
        v.extend(
            self.peers_added
                .iter()
                .map(|p| format!("added peer {}", p.label())),
        );
        v.extend(
            self.peers_changed
                .iter()
                .map(|(_, p)| format!("changed peer {}", p.label())),
        );
        v.extend(
            self.peers_removed
                .iter()
                .map(|p| format!("removed peer {}", p.label())),
        );
        v
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use l2mesh_proto::node::{NetworkSpec, NodeIdentity, PeerSpec};

    fn desired() -> DesiredState {
        DesiredState {
            revision: 1,
            identity: Some(NodeIdentity {
                node_name: "a".into(),
                tunnel_ip: "100.64.0.1".into(),
                listen_port: 0,
            }),
            networks: vec![
                NetworkSpec {
                    name: "blue".into(),
                    vni: 10,
                    mtu: 0,
                    pod_cidr: "10.1.0.0/24".into(),
                },
                NetworkSpec {
                    name: "red".into(),
                    vni: 20,
                    mtu: 1400,
                    pod_cidr: String::new(),
                },
            ],
            peers: vec![PeerSpec {
                public_key: vec![1; 32],
                endpoint: "192.0.2.1:51820".into(),
                tunnel_ip: "100.64.0.2".into(),
                vnis: vec![10, 20],
                group: PeerGroup::Local.into(),
                persistent_keepalive: 25,
                name: "b".into(),
            }],
        }
    }

    #[test]
    fn valid_state_parses_with_defaults() {
        let c = Config::from_desired(&desired()).unwrap();
        assert_eq!(c.networks["blue"].mtu, DEFAULT_MTU);
        assert_eq!(c.peers[&[1; 32]].keepalive, Some(25));
        assert_eq!(c.tunnel_ip, Some(Ipv4Addr::new(100, 64, 0, 1)));
    }

    #[test]
    fn invalid_states_name_the_problem() {
        type Mutation = Box<dyn Fn(&mut DesiredState)>;
        let cases: Vec<(Mutation, &str)> = vec![
            (Box::new(|d| d.networks[1].vni = 10), "already used"),
            (
                Box::new(|d| d.networks[1].name = "blue".into()),
                "appears twice",
            ),
            (Box::new(|d| d.networks[0].vni = 1 << 24), "24-bit"),
            (Box::new(|d| d.networks[0].mtu = 100), "MTU 100"),
            (
                Box::new(|d| d.networks[0].pod_cidr = "nope".into()),
                "not a CIDR",
            ),
            (
                Box::new(|d| d.peers[0].public_key = vec![1; 31]),
                "31 bytes",
            ),
            (
                Box::new(|d| d.peers[0].endpoint = "1.2.3.4".into()),
                "not ip:port",
            ),
            (Box::new(|d| d.peers[0].group = 0), "unspecified"),
            (
                Box::new(|d| d.peers[0].name = "n".repeat(1_500_000)),
                "peer #0: name is 1500000 bytes long; the limit is 253",
            ),
            (
                Box::new(|d| d.peers[0].endpoint = format!("{}:1", "1".repeat(80))),
                "peer #0: endpoint is 82 bytes long; the limit is 64",
            ),
            (
                Box::new(|d| d.networks[0].name = "n".repeat(300)),
                "network #0: name",
            ),
            (Box::new(|d| d.peers[0].tunnel_ip = "x".into()), "tunnel_ip"),
            (
                Box::new(|d| d.identity = None),
                "identity.tunnel_ip is empty",
            ),
            (
                Box::new(|d| {
                    let p = d.peers[0].clone();
                    d.peers.push(p)
                }),
                "appears twice",
            ),
        ];
        for (mutate, needle) in cases {
            let mut d = desired();
            mutate(&mut d);
            let err = Config::from_desired(&d).unwrap_err().to_string();
            assert!(err.contains(needle), "{err:?} should mention {needle:?}");
        }
    }

    #[test]
    fn a_peer_with_the_nodes_own_key_is_rejected_by_name() {
        let c = Config::from_desired(&desired()).unwrap();
        assert_eq!(c.reject_own_key(&[9; 32]), Ok(()));
        let err = c.reject_own_key(&[1; 32]).unwrap_err();
        assert_eq!(
            err,
            ConfigError::SelfPeer {
                name: "b".into(),
                key: key_b64(&[1; 32]),
            }
        );
        let text = err.to_string();
        assert!(text.contains("\"b\""), "{text}");
        assert!(text.contains(&key_b64(&[1; 32])), "{text}");
        assert!(text.contains("as its own peer"), "{text}");
        assert!(text.contains("remove it from the peers"), "{text}");
    }

    #[test]
    fn diff_finds_exactly_what_changed() {
        let old = Config::from_desired(&desired()).unwrap();
        assert!(
            Diff::between(&old, &old).is_empty(),
            "applying the same state is a no-op"
        );
        let mut d = desired();
        d.revision = 2;
        d.networks.remove(1);
        d.networks.push(NetworkSpec {
            name: "green".into(),
            vni: 30,
            mtu: 0,
            pod_cidr: String::new(),
        });
        d.networks[0].mtu = 1300;
        d.peers[0].endpoint = "192.0.2.9:1".into();
        d.peers.push(PeerSpec {
            public_key: vec![2; 32],
            tunnel_ip: "100.64.0.3".into(),
            group: PeerGroup::Remote.into(),
            ..Default::default()
        });
        let new = Config::from_desired(&d).unwrap();
        let diff = Diff::between(&old, &new);
        assert_eq!(diff.networks_added.len(), 1);
        assert_eq!(diff.networks_removed[0].name, "red");
        assert_eq!(diff.networks_changed[0].1.mtu, 1300);
        assert_eq!(diff.peers_added.len(), 1);
        assert_eq!(diff.peers_changed.len(), 1);
        assert!(diff.peers_removed.is_empty());
        assert!(!diff.identity_changed);
        assert_eq!(diff.describe().len(), 5);
    }
}
