//! The persisted records. Plain data; the rules live in [`crate::state`].

use ipnet::IpNet;
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, BTreeSet};
use std::net::Ipv4Addr;

/// An onboarding token. Only the SHA-256 of the secret is kept.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Token {
    pub id: String,
    pub cluster: String,
    pub secret_sha256: [u8; 32],
    pub created_unix: i64,
    pub expires_unix: i64,
    pub uses_total: u32,
    pub uses_left: u32,
    pub revoked: bool,
    /// When it was used up or revoked (0: not yet), for the retention purge.
    #[serde(default)]
    pub ended_unix: i64,
}

/// A gateway node of a cluster, as last reported by its agent.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Gateway {
    pub node: String,
    pub public_key: Vec<u8>,
    pub endpoints: Vec<String>,
    pub tunnel_ip: Ipv4Addr,
}

/// A joined cluster.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Cluster {
    pub name: String,
    /// Index of this cluster's /24 inside 100.64.0.0/10.
    pub subnet_index: u32,
    /// SHA-256 of the DER of the one client certificate that speaks for it.
    pub cert_sha256: [u8; 32],
    /// The certificate it renewed from, still accepted until it expires
    /// (a renewal must not cut open streams); a join clears it.
    #[serde(default)]
    pub prev_cert_sha256: Option<[u8; 32]>,
    pub joined_unix: i64,
    pub last_seen_unix: i64,
    pub gateways: Vec<Gateway>,
    /// Multi-cluster networks its L2Networks ask for (sorted, unique).
    pub requested: BTreeSet<String>,
    /// Revision of its view: bumped whenever what it sees changes.
    pub view_rev: u64,
}

/// A multi-cluster network declared by the admin.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Network {
    pub name: String,
    pub vni: u32,
    pub mtu: u32,
    pub cidr: Option<IpNet>,
    pub allowed: BTreeSet<String>,
    pub allow_all: bool,
    pub created_unix: i64,
    /// Member cluster -> index of its slice of `cidr`; kept while it stays a
    /// member so its pods' addresses do not move when others come and go.
    pub slots: BTreeMap<String, u32>,
}

/// Counters that must survive restarts.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Meta {
    /// Highest view revision handed out.
    pub revision: u64,
    /// Where the next automatic VNI search starts, so a deleted network's VNI
    /// is not handed out again right away.
    pub next_vni: u32,
    /// How the views of the stored revisions were built (see
    /// `view::VIEW_FORMAT`); 0 for brokers from before it was recorded.
    #[serde(default)]
    pub view_format: u32,
}
