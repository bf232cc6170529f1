//! The pure core: every decision the broker makes, on plain data.
//!
//! A mutation works on a clone of the [`State`]; the shell persists the keys
//! it marked dirty and only then swaps the clone in, so a failed write
//! changes nothing. The maps are persistent (structure-sharing): a clone
//! costs O(1) and a change copies only the path to what it touches.

use crate::error::{Error, Result};
use crate::model::{Cluster, Gateway, Meta, Network, Token};
use imbl::{OrdMap, OrdSet};
use ipnet::{IpNet, Ipv4Net};
use l2mesh_proto::limits::{
    MAX_ENDPOINT_BYTES, MAX_ENDPOINTS_PER_GATEWAY, MAX_GATEWAYS_PER_CLUSTER, MAX_LABEL_BYTES,
    MAX_NAME_BYTES, MAX_NETWORKS_PER_CLUSTER, check_len, preview,
};
use std::collections::BTreeSet;
use std::net::Ipv4Addr;
use subtle::ConstantTimeEq;

/// First VNI the broker hands out; agents use 1..=4095 for local networks.
pub const VNI_MIN: u32 = 4096;
/// Largest 24-bit VNI.
pub const VNI_MAX: u32 = 0x00FF_FFFF;
/// Default MTU of pod interfaces (see DESIGN.md, MTU).
pub const DEFAULT_MTU: u32 = 1390;
/// The pool of tunnel subnets: one /24 per cluster.
pub const TUNNEL_POOL: Ipv4Net = match Ipv4Net::new(Ipv4Addr::new(100, 64, 0, 0), 10) {
    Ok(n) => n,
    Err(_) => panic!("constant prefix is valid"),
};
const TUNNEL_SUBNETS: u32 = 1 << (24 - 10);

/// Clusters one network's allow list may name.
pub const MAX_ALLOWED: usize = 4096;

/// A key of the store: which record a mutation touched.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Key {
    Token(String),
    Cluster(String),
    Network(String),
    Meta,
}

/// Who is calling, from the verified client certificate.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Principal {
    Admin,
    Cluster(String),
}

/// Everything the broker knows.
#[derive(Clone, Debug, Default)]
pub struct State {
    pub tokens: OrdMap<String, Token>,
    pub clusters: OrdMap<String, Cluster>,
    pub networks: OrdMap<String, Network>,
    pub meta: Meta,
    /// Certificate hash -> the cluster it speaks for.
    cert_index: imbl::HashMap<[u8; 32], String>,
    /// Network name -> the clusters that ask for it (admitted or not).
    requesters: OrdMap<String, OrdSet<String>>,
    dirty: OrdSet<Key>,
}

/// SHA-256 of some bytes (the same function that checks join-string pins).
pub use l2mesh_proto::pinned::sha256;

/// Cluster and network names: DNS labels, so they fit in Kubernetes names.
pub fn validate_name(what: &str, name: &str) -> Result<()> {
    let ok = !name.is_empty()
        && name.len() <= MAX_LABEL_BYTES
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !name.starts_with('-')
        && !name.ends_with('-');
    if ok {
        Ok(())
    } else {
        Err(Error::InvalidArgument(format!(
            "invalid {what} name {:?}: use 1-{MAX_LABEL_BYTES} lowercase letters, digits and '-', not starting or ending with '-'",
            preview(name)
        )))
    }
}

/// The /24 tunnel subnet with the given index.
#[must_use]
pub fn tunnel_subnet(index: u32) -> Ipv4Net {
    let base = u32::from(TUNNEL_POOL.network()) + (index << 8);
    Ipv4Net::new(Ipv4Addr::from(base), 24).unwrap_or(TUNNEL_POOL)
}

/// Prefix length of the per-cluster slices of a network's cidr: 256 slices
/// where the range allows it, never smaller than 16 addresses.
#[must_use]
pub fn slice_prefix(cidr: &IpNet) -> u8 {
    (cidr.prefix_len() + 8).min(cidr.max_prefix_len() - 4)
}

/// The `slot`-th slice of `cidr`.
#[must_use]
pub fn cluster_slice(cidr: &IpNet, slot: u32) -> Option<IpNet> {
    cidr.subnets(slice_prefix(cidr)).ok()?.nth(slot as usize)
}

pub(crate) fn slice_count(cidr: &IpNet) -> u32 {
    let bits = u32::from(slice_prefix(cidr) - cidr.prefix_len());
    1u32.checked_shl(bits).unwrap_or(u32::MAX)
}

/// Why a token did not let a cluster join. The secret never appears here.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum JoinDenied {
    /// Unknown id and wrong secret get the same answer, so that nobody
    /// learns which token ids exist.
    #[error(
        "token {0:?} is unknown or its secret does not match: copy the whole join string again, or ask the broker admin for a new one"
    )]
    NoSuchToken(String),
    #[error("token {0:?} was revoked: ask the broker admin for a new join string")]
    Revoked(String),
    #[error("token {0:?} expired: ask the broker admin for a new join string")]
    Expired(String),
    #[error("token {0:?} has no uses left: ask the broker admin for a new join string")]
    UsedUp(String),
    #[error(
        "token {id:?} is for cluster {expected:?}, not {got:?}: join with the name the token was made for"
    )]
    WrongCluster {
        id: String,
        expected: String,
        got: String,
    },
}

impl From<JoinDenied> for Error {
    fn from(e: JoinDenied) -> Self {
        match e {
            JoinDenied::WrongCluster { .. } => Error::PermissionDenied(e.to_string()),
            other => Error::Unauthenticated(other.to_string()),
        }
    }
}

/// One network's answer to a cluster's request.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Admission {
    Admitted,
    Denied(String),
    Unknown(String),
}

impl State {
    /// Build from loaded records.
    #[must_use]
    pub fn from_records(
        tokens: Vec<Token>,
        clusters: Vec<Cluster>,
        networks: Vec<Network>,
        meta: Meta,
    ) -> Self {
        let mut s = Self {
            tokens: tokens.into_iter().map(|t| (t.id.clone(), t)).collect(),
            clusters: clusters.into_iter().map(|c| (c.name.clone(), c)).collect(),
            networks: networks.into_iter().map(|n| (n.name.clone(), n)).collect(),
            meta,
            ..Self::default()
        };
        s.reindex();
        s
    }

    /// The keys changed since the last call; the caller persists them.
    pub fn take_dirty(&mut self) -> BTreeSet<Key> {
        std::mem::take(&mut self.dirty).into_iter().collect()
    }

    fn touch(&mut self, key: Key) {
        self.dirty.insert(key);
    }

    /// The cluster a client certificate (by its SHA-256) speaks for.
    #[must_use]
    pub fn cluster_for_cert(&self, cert_sha256: &[u8; 32]) -> Option<&str> {
        self.cert_index.get(cert_sha256).map(String::as_str)
    }

    // ------------------------------------------------------------ tokens

    /// Record a new token; `id` and `secret` come from the caller's RNG.
    pub fn create_token(
        &mut self,
        cluster: &str,
        id: String,
        secret: &str,
        ttl_seconds: u64,
        uses: u32,
        now: i64,
    ) -> Result<Token> {
        validate_name("cluster", cluster)?;
        if ttl_seconds == 0 {
            return Err(Error::InvalidArgument(
                "token TTL must be at least 1 second".into(),
            ));
        }
        if uses == 0 {
            return Err(Error::InvalidArgument(
                "token uses must be at least 1".into(),
            ));
        }
        if self.tokens.contains_key(&id) {
            return Err(Error::AlreadyExists(format!("token id {id} exists")));
        }
        let ttl = i64::try_from(ttl_seconds).unwrap_or(i64::MAX);
        let token = Token {
            id: id.clone(),
            cluster: cluster.to_owned(),
            secret_sha256: sha256(secret.as_bytes()),
            created_unix: now,
            expires_unix: now.saturating_add(ttl),
            uses_total: uses,
            uses_left: uses,
            revoked: false,
            ended_unix: 0,
        };
        self.tokens.insert(id.clone(), token.clone());
        self.touch(Key::Token(id));
        Ok(token)
    }

    /// Revoke a token; revoking twice is fine.
    pub fn revoke_token(&mut self, id: &str, now: i64) -> Result<Token> {
        let token = self.tokens.get_mut(id).ok_or_else(|| {
            Error::NotFound(format!(
                "no token with id {:?}: see `token list`",
                preview(id)
            ))
        })?;
        token.revoked = true;
        if token.ended_unix == 0 {
            token.ended_unix = now;
        }
        let out = token.clone();
        self.touch(Key::Token(id.to_owned()));
        Ok(out)
    }

    /// Would this token let `cluster` join now? Read-only.
    pub fn check_token(
        &self,
        id: &str,
        secret: &str,
        cluster: &str,
        now: i64,
    ) -> Result<(), JoinDenied> {
        let token = self
            .tokens
            .get(id)
            .ok_or_else(|| JoinDenied::NoSuchToken(preview(id)))?;
        let given = sha256(secret.as_bytes());
        if !bool::from(given.ct_eq(&token.secret_sha256)) {
            return Err(JoinDenied::NoSuchToken(id.to_owned()));
        }
        if token.revoked {
            return Err(JoinDenied::Revoked(id.to_owned()));
        }
        if now >= token.expires_unix {
            return Err(JoinDenied::Expired(id.to_owned()));
        }
        if token.uses_left == 0 {
            return Err(JoinDenied::UsedUp(id.to_owned()));
        }
        if token.cluster != cluster {
            return Err(JoinDenied::WrongCluster {
                id: id.to_owned(),
                expected: token.cluster.clone(),
                got: cluster.to_owned(),
            });
        }
        Ok(())
    }

    // ------------------------------------------------------------ clusters

    /// Consume one use of the token and (re)register the cluster with the
    /// certificate just issued. A re-join keeps the cluster's data and
    /// subnet but replaces its certificate, so the old one stops working.
    pub fn join(
        &mut self,
        id: &str,
        secret: &str,
        cluster: &str,
        cert_sha256: [u8; 32],
        now: i64,
    ) -> Result<Cluster> {
        validate_name("cluster", cluster)?;
        self.check_token(id, secret, cluster, now)?;
        if let Some(token) = self.tokens.get_mut(id) {
            token.uses_left -= 1;
            if token.uses_left == 0 {
                token.ended_unix = now;
            }
        }
        self.touch(Key::Token(id.to_owned()));
        let subnet_index = match self.clusters.get(cluster) {
            Some(c) => c.subnet_index,
            None => self.free_subnet_index()?,
        };
        let mut c = self
            .clusters
            .get(cluster)
            .cloned()
            .unwrap_or_else(|| Cluster {
                name: cluster.to_owned(),
                subnet_index,
                cert_sha256,
                prev_cert_sha256: None,
                joined_unix: now,
                last_seen_unix: 0,
                gateways: Vec::new(),
                requested: BTreeSet::new(),
                view_rev: 0,
            });
        c.cert_sha256 = cert_sha256;
        c.prev_cert_sha256 = None;
        c.joined_unix = now;
        self.put_cluster(c.clone());
        self.touch(Key::Cluster(cluster.to_owned()));
        Ok(c)
    }

    fn free_subnet_index(&self) -> Result<u32> {
        let used: BTreeSet<u32> = self.clusters.values().map(|c| c.subnet_index).collect();
        (0..TUNNEL_SUBNETS)
            .find(|i| !used.contains(i))
            .ok_or_else(|| {
                Error::Exhausted("all tunnel subnets of 100.64.0.0/10 are in use".into())
            })
    }

    fn cluster_mut(&mut self, name: &str) -> Result<&mut Cluster> {
        self.clusters.get_mut(name).ok_or_else(|| {
            Error::NotFound(format!("no cluster named {name:?}: see `cluster list`"))
        })
    }

    /// Give a cluster a renewed certificate; the one it called with stays
    /// valid (until it expires), any older one stops working.
    pub fn renew_cert(&mut self, name: &str, current: [u8; 32], renewed: [u8; 32]) -> Result<()> {
        let mut c = self.cluster_mut(name)?.clone();
        c.prev_cert_sha256 = Some(current);
        c.cert_sha256 = renewed;
        self.put_cluster(c);
        self.touch(Key::Cluster(name.to_owned()));
        Ok(())
    }

    /// Note that the cluster called in; persisted with its next write.
    pub fn seen(&mut self, name: &str, now: i64) {
        if let Some(c) = self.clusters.get_mut(name) {
            c.last_seen_unix = now;
        }
    }

    /// Replace a cluster's gateways. Returns the clusters whose view may change.
    pub fn report_gateways(
        &mut self,
        name: &str,
        gateways: Vec<Gateway>,
    ) -> Result<BTreeSet<String>> {
        let cluster = self.cluster_mut(name)?;
        if cluster.gateways == gateways {
            return Ok(BTreeSet::new());
        }
        let subnet = tunnel_subnet(cluster.subnet_index);
        validate_gateways(&gateways, subnet)?;
        self.check_against_others(name, &gateways)?;
        let cluster = self.cluster_mut(name)?;
        cluster.gateways = gateways;
        let requested = cluster.requested.clone();
        self.touch(Key::Cluster(name.to_owned()));
        let mut affected = self.requesters_of(&requested);
        affected.insert(name.to_owned());
        Ok(affected)
    }

    /// Replace the networks a cluster asks for.
    pub fn request_networks(
        &mut self,
        name: &str,
        networks: Vec<String>,
    ) -> Result<BTreeSet<String>> {
        if networks.len() > MAX_NETWORKS_PER_CLUSTER {
            return Err(Error::InvalidArgument(format!(
                "cluster {name:?} asks for {} networks; the limit is {MAX_NETWORKS_PER_CLUSTER}",
                networks.len()
            )));
        }
        for n in &networks {
            validate_name("network", n)?;
        }
        let new: BTreeSet<String> = networks.into_iter().collect();
        let mut cluster = self.cluster_mut(name)?.clone();
        if cluster.requested == new {
            return Ok(BTreeSet::new());
        }
        let old = std::mem::replace(&mut cluster.requested, new.clone());
        self.put_cluster(cluster);
        self.touch(Key::Cluster(name.to_owned()));
        // Other clusters' views change only where the membership did: asking
        // for an unknown network, or being denied, changes nothing for them.
        let changed: BTreeSet<String> = old
            .union(&new)
            .filter(|net| self.reconcile_slots(net))
            .cloned()
            .collect();
        let mut affected = self.requesters_of(&changed);
        affected.insert(name.to_owned());
        Ok(affected)
    }

    /// Forget a cluster everywhere. Returns it and the clusters whose view changes.
    pub fn remove_cluster(&mut self, name: &str, now: i64) -> Result<(Cluster, BTreeSet<String>)> {
        let cluster = self.clusters.remove(name).ok_or_else(|| {
            Error::NotFound(format!("no cluster named {name:?}: see `cluster list`"))
        })?;
        self.unindex(&cluster);
        self.touch(Key::Cluster(name.to_owned()));
        // Its unused tokens go too, so a removed cluster cannot walk back in
        // with a leftover multi-use token; re-adding it takes a new token.
        let leftover: Vec<String> = self
            .tokens
            .values()
            .filter(|t| t.cluster == name && !t.revoked && t.uses_left > 0)
            .map(|t| t.id.clone())
            .collect();
        for id in leftover {
            if let Some(t) = self.tokens.get_mut(&id) {
                t.revoked = true;
                t.ended_unix = now;
            }
            self.touch(Key::Token(id));
        }
        for net in &cluster.requested {
            let _ = self.reconcile_slots(net);
        }
        let affected = self.requesters_of(&cluster.requested);
        Ok((cluster, affected))
    }

    /// A cluster's view changed: give it the next revision (durable, with
    /// the cluster record). Returns the new revision.
    pub fn bump_view_rev(&mut self, cluster: &str) -> Option<u64> {
        let next = self.meta.revision + 1;
        let c = self.clusters.get_mut(cluster)?;
        c.view_rev = next;
        self.meta.revision = next;
        self.touch(Key::Cluster(cluster.to_owned()));
        self.touch(Key::Meta);
        Some(next)
    }

    /// Views of the stored revisions were built by a broker that built them
    /// differently (`meta.view_format` is not `format`): give every cluster
    /// a new revision, so every agent gets a fresh snapshot. Returns whether
    /// it did.
    pub fn upgrade_view_format(&mut self, format: u32) -> bool {
        if self.meta.view_format == format {
            return false;
        }
        let names: Vec<String> = self.clusters.keys().cloned().collect();
        for name in names {
            self.bump_view_rev(&name);
        }
        self.meta.view_format = format;
        self.touch(Key::Meta);
        true
    }
}

impl State {
    /// Whether [`Self::purge_tokens`] would delete anything (read-only).
    #[must_use]
    pub fn tokens_due(&self, now: i64, retention_secs: i64) -> bool {
        self.tokens.values().any(|t| {
            token_ended(t, now).is_some_and(|end| now >= end.saturating_add(retention_secs))
        })
    }

    /// Delete tokens that ended (used up, revoked or expired) at least
    /// `retention_secs` ago. Returns how many went.
    pub fn purge_tokens(&mut self, now: i64, retention_secs: i64) -> usize {
        let dead: Vec<String> = self
            .tokens
            .values()
            .filter(|t| {
                token_ended(t, now).is_some_and(|end| now >= end.saturating_add(retention_secs))
            })
            .map(|t| t.id.clone())
            .collect();
        for id in &dead {
            self.tokens.remove(id);
            self.touch(Key::Token(id.clone()));
        }
        dead.len()
    }

    /// Cross-cluster rules: a WireGuard key, and an endpoint, belong to one
    /// cluster. Says which rule refused what; names no other cluster.
    fn check_against_others(&self, name: &str, gateways: &[Gateway]) -> Result<()> {
        for other in self.clusters.values().filter(|c| c.name != name) {
            for theirs in &other.gateways {
                for g in gateways {
                    if g.public_key == theirs.public_key {
                        return Err(Error::InvalidArgument(format!(
                            "gateway {:?}: refused by rule `one key, one cluster`: its WireGuard public key is already reported by another cluster; every gateway needs a key of its own",
                            g.node
                        )));
                    }
                    if let Some(e) = g.endpoints.iter().find(|e| theirs.endpoints.contains(e)) {
                        return Err(Error::InvalidArgument(format!(
                            "gateway {:?}: refused by rule `one endpoint, one cluster`: endpoint {e} is already reported by another cluster",
                            g.node
                        )));
                    }
                }
            }
        }
        Ok(())
    }
}

/// When a token stopped being usable, or `None` while it still is.
fn token_ended(t: &Token, now: i64) -> Option<i64> {
    if t.revoked || t.uses_left == 0 {
        // Records from before `ended_unix` existed count from their expiry.
        Some(if t.ended_unix > 0 {
            t.ended_unix
        } else {
            t.expires_unix.min(now)
        })
    } else if now >= t.expires_unix {
        Some(t.expires_unix)
    } else {
        None
    }
}

/// x25519 public keys of small order (and their non-canonical encodings):
/// every shared secret with them is all-zero, so they can never be a peer.
const LOW_ORDER_KEYS: [[u8; 32]; 7] = {
    let mut k = [[0u8; 32]; 7];
    k[1][0] = 1;
    k[2] = [
        0xe0, 0xeb, 0x7a, 0x7c, 0x3b, 0x41, 0xb8, 0xae, 0x16, 0x56, 0xe3, 0xfa, 0xf1, 0x9f, 0xc4,
        0x6a, 0xda, 0x09, 0x8d, 0xeb, 0x9c, 0x32, 0xb1, 0xfd, 0x86, 0x62, 0x05, 0x16, 0x5f, 0x49,
        0xb8, 0x00,
    ];
    k[3] = [
        0x5f, 0x9c, 0x95, 0xbc, 0xa3, 0x50, 0x8c, 0x24, 0xb1, 0xd0, 0xb1, 0x55, 0x9c, 0x83, 0xef,
        0x5b, 0x04, 0x44, 0x5c, 0xc4, 0x58, 0x1c, 0x8e, 0x86, 0xd8, 0x22, 0x4e, 0xdd, 0xd0, 0x9f,
        0x11, 0x57,
    ];
    // p - 1, p, p + 1 (p = 2^255 - 19).
    let mut i = 4;
    while i < 7 {
        let mut j = 1;
        while j < 31 {
            k[i][j] = 0xff;
            j += 1;
        }
        k[i][31] = 0x7f;
        k[i][0] = 0xec + (i as u8 - 4);
        i += 1;
    }
    k
};

/// Whether a 32-byte x25519 public key has small order (all-zero included).
#[must_use]
pub fn is_low_order_key(key: &[u8]) -> bool {
    let Ok(mut k) = <[u8; 32]>::try_from(key) else {
        return false;
    };
    // x25519 ignores the top bit.
    k[31] &= 0x7f;
    LOW_ORDER_KEYS.contains(&k)
}

/// Why an underlay endpoint can never be a peer, if it cannot.
fn unusable_endpoint(e: &std::net::SocketAddr) -> Option<&'static str> {
    let ip = e.ip().to_canonical();
    if e.port() == 0 {
        Some("port 0")
    } else if ip.is_unspecified() {
        Some("an unspecified address")
    } else if ip.is_loopback() {
        Some("a loopback address")
    } else if ip.is_multicast() {
        Some("a multicast address")
    } else if ip == std::net::IpAddr::V4(Ipv4Addr::BROADCAST) {
        Some("the broadcast address")
    } else {
        None
    }
}

fn validate_gateways(gateways: &[Gateway], subnet: Ipv4Net) -> Result<()> {
    if gateways.len() > MAX_GATEWAYS_PER_CLUSTER {
        return Err(Error::InvalidArgument(format!(
            "the report has {} gateways; the limit is {MAX_GATEWAYS_PER_CLUSTER} per cluster",
            gateways.len()
        )));
    }
    let mut nodes = BTreeSet::new();
    let mut ips = BTreeSet::new();
    let mut keys = BTreeSet::new();
    for g in gateways {
        if g.node.is_empty() {
            return Err(Error::InvalidArgument(
                "every gateway needs a node name".into(),
            ));
        }
        check_len("gateway node name", &g.node, MAX_NAME_BYTES)
            .map_err(|e| Error::InvalidArgument(format!("{e}: {:?}", preview(&g.node))))?;
        if !nodes.insert(&g.node) {
            return Err(Error::InvalidArgument(format!(
                "gateway node {:?} is listed twice",
                g.node
            )));
        }
        if g.public_key.len() != 32 {
            return Err(Error::InvalidArgument(format!(
                "gateway {:?}: the WireGuard public key must be 32 bytes, got {}",
                g.node,
                g.public_key.len()
            )));
        }
        if is_low_order_key(&g.public_key) {
            return Err(Error::InvalidArgument(format!(
                "gateway {:?}: refused by rule `usable key`: the WireGuard public key is all-zero or of small order, which no peer can use",
                g.node
            )));
        }
        if !keys.insert(&g.public_key) {
            return Err(Error::InvalidArgument(format!(
                "gateway {:?} reuses another gateway's public key",
                g.node
            )));
        }
        if !subnet.contains(&g.tunnel_ip) || g.tunnel_ip == subnet.network() {
            return Err(Error::InvalidArgument(format!(
                "gateway {:?}: tunnel IP {} is not a host address of this cluster's tunnel subnet {subnet}",
                g.node, g.tunnel_ip
            )));
        }
        if !ips.insert(g.tunnel_ip) {
            return Err(Error::InvalidArgument(format!(
                "tunnel IP {} is used by two gateways",
                g.tunnel_ip
            )));
        }
        if g.endpoints.len() > MAX_ENDPOINTS_PER_GATEWAY {
            return Err(Error::InvalidArgument(format!(
                "gateway {:?}: {} endpoints; the limit is {MAX_ENDPOINTS_PER_GATEWAY}",
                g.node,
                g.endpoints.len()
            )));
        }
        for e in &g.endpoints {
            check_len("endpoint", e, MAX_ENDPOINT_BYTES)
                .map_err(|m| Error::InvalidArgument(format!("gateway {:?}: {m}", g.node)))?;
            let addr = e.parse::<std::net::SocketAddr>().map_err(|_| {
                Error::InvalidArgument(format!(
                    "gateway {:?}: endpoint {e:?} is not ip:port",
                    g.node
                ))
            })?;
            if let Some(why) = unusable_endpoint(&addr) {
                return Err(Error::InvalidArgument(format!(
                    "gateway {:?}: refused by rule `reachable endpoint`: {e} is {why}, which can never be a peer",
                    g.node
                )));
            }
        }
    }
    Ok(())
}

mod index;
mod networks;

#[cfg(test)]
#[path = "state_tests.rs"]
mod tests;
