//! The pure core: every decision the broker makes, on plain data.
//!
//! A mutation works on a clone of the [`State`]; the shell persists the keys
//! it marked dirty and only then swaps the clone in, so a failed write
//! changes nothing.

use crate::error::{Error, Result};
use crate::model::{Cluster, Gateway, Link, Meta, Network, Token};
use ipnet::{IpNet, Ipv4Net};
use std::collections::{BTreeMap, BTreeSet, HashMap};
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

/// Limits on what one report may carry.
pub const MAX_GATEWAYS: usize = 64;
pub const MAX_ENDPOINTS: usize = 16;
pub const MAX_REQUESTED_NETWORKS: usize = 1024;
pub const MAX_LINKS: usize = 4096;
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
    pub tokens: BTreeMap<String, Token>,
    pub clusters: BTreeMap<String, Cluster>,
    pub networks: BTreeMap<String, Network>,
    pub meta: Meta,
    cert_index: HashMap<[u8; 32], String>,
    dirty: BTreeSet<Key>,
}

/// SHA-256 of some bytes (the same function that checks join-string pins).
pub use l2mesh_proto::pinned::sha256;

/// Cluster and network names: DNS labels, so they fit in Kubernetes names.
pub fn validate_name(what: &str, name: &str) -> Result<()> {
    let ok = !name.is_empty()
        && name.len() <= 63
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !name.starts_with('-')
        && !name.ends_with('-');
    if ok {
        Ok(())
    } else {
        Err(Error::InvalidArgument(format!(
            "invalid {what} name {name:?}: use 1-63 lowercase letters, digits and '-', not starting or ending with '-'"
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
    #[error("unknown token {0:?}: ask the broker admin for a new join string")]
    UnknownToken(String),
    #[error("the token secret does not match token {0:?}: copy the whole join string again")]
    WrongSecret(String),
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

    fn reindex(&mut self) {
        self.cert_index = self
            .clusters
            .values()
            .map(|c| (c.cert_sha256, c.name.clone()))
            .collect();
    }

    /// The keys changed since the last call; the caller persists them.
    pub fn take_dirty(&mut self) -> BTreeSet<Key> {
        std::mem::take(&mut self.dirty)
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
        };
        self.tokens.insert(id.clone(), token.clone());
        self.touch(Key::Token(id));
        Ok(token)
    }

    /// Revoke a token; revoking twice is fine.
    pub fn revoke_token(&mut self, id: &str) -> Result<Token> {
        let token = self
            .tokens
            .get_mut(id)
            .ok_or_else(|| Error::NotFound(format!("no token with id {id:?}: see `token list`")))?;
        token.revoked = true;
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
            .ok_or_else(|| JoinDenied::UnknownToken(id.to_owned()))?;
        let given = sha256(secret.as_bytes());
        if !bool::from(given.ct_eq(&token.secret_sha256)) {
            return Err(JoinDenied::WrongSecret(id.to_owned()));
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
        }
        self.touch(Key::Token(id.to_owned()));
        let subnet_index = match self.clusters.get(cluster) {
            Some(c) => c.subnet_index,
            None => self.free_subnet_index()?,
        };
        let entry = self
            .clusters
            .entry(cluster.to_owned())
            .or_insert_with(|| Cluster {
                name: cluster.to_owned(),
                subnet_index,
                cert_sha256,
                joined_unix: now,
                last_seen_unix: 0,
                gateways: Vec::new(),
                requested: BTreeSet::new(),
                links: Vec::new(),
                view_rev: 0,
                view_sha256: [0; 32],
            });
        entry.cert_sha256 = cert_sha256;
        entry.joined_unix = now;
        let out = entry.clone();
        self.touch(Key::Cluster(cluster.to_owned()));
        self.reindex();
        Ok(out)
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
        let subnet = tunnel_subnet(self.cluster_mut(name)?.subnet_index);
        validate_gateways(&gateways, subnet)?;
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
        if networks.len() > MAX_REQUESTED_NETWORKS {
            return Err(Error::InvalidArgument(format!(
                "at most {MAX_REQUESTED_NETWORKS} networks per request"
            )));
        }
        for n in &networks {
            validate_name("network", n)?;
        }
        let new: BTreeSet<String> = networks.into_iter().collect();
        let cluster = self.cluster_mut(name)?;
        let old = std::mem::replace(&mut cluster.requested, new.clone());
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

    /// Replace a cluster's link health report. No view depends on it.
    pub fn report_links(&mut self, name: &str, links: Vec<Link>) -> Result<()> {
        if links.len() > MAX_LINKS {
            return Err(Error::InvalidArgument(format!(
                "at most {MAX_LINKS} links per report"
            )));
        }
        self.cluster_mut(name)?.links = links;
        self.touch(Key::Cluster(name.to_owned()));
        Ok(())
    }

    /// Forget a cluster everywhere. Returns it and the clusters whose view changes.
    pub fn remove_cluster(&mut self, name: &str) -> Result<(Cluster, BTreeSet<String>)> {
        let cluster = self.clusters.remove(name).ok_or_else(|| {
            Error::NotFound(format!("no cluster named {name:?}: see `cluster list`"))
        })?;
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
            }
            self.touch(Key::Token(id));
        }
        for net in &cluster.requested {
            let _ = self.reconcile_slots(net);
        }
        self.reindex();
        let affected = self.requesters_of(&cluster.requested);
        Ok((cluster, affected))
    }

    /// Record a freshly computed view hash; bumps the cluster's revision if
    /// the view changed. Returns the cluster's (possibly new) revision.
    pub fn record_view(&mut self, cluster: &str, view_sha256: [u8; 32]) -> Option<u64> {
        let next = self.meta.revision + 1;
        let c = self.clusters.get_mut(cluster)?;
        if c.view_sha256 == view_sha256 && c.view_rev != 0 {
            return Some(c.view_rev);
        }
        c.view_sha256 = view_sha256;
        c.view_rev = next;
        self.meta.revision = next;
        self.touch(Key::Cluster(cluster.to_owned()));
        self.touch(Key::Meta);
        Some(next)
    }
}

fn validate_gateways(gateways: &[Gateway], subnet: Ipv4Net) -> Result<()> {
    if gateways.len() > MAX_GATEWAYS {
        return Err(Error::InvalidArgument(format!(
            "at most {MAX_GATEWAYS} gateways per cluster"
        )));
    }
    let mut nodes = BTreeSet::new();
    let mut ips = BTreeSet::new();
    let mut keys = BTreeSet::new();
    for g in gateways {
        if g.node.is_empty() || g.node.len() > 253 {
            return Err(Error::InvalidArgument(
                "every gateway needs a node name of 1-253 characters".into(),
            ));
        }
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
        if g.endpoints.len() > MAX_ENDPOINTS {
            return Err(Error::InvalidArgument(format!(
                "gateway {:?}: at most {MAX_ENDPOINTS} endpoints",
                g.node
            )));
        }
        for e in &g.endpoints {
            if e.parse::<std::net::SocketAddr>().is_err() {
                return Err(Error::InvalidArgument(format!(
                    "gateway {:?}: endpoint {e:?} is not ip:port",
                    g.node
                )));
            }
        }
    }
    Ok(())
}

mod networks;

#[cfg(test)]
#[path = "state_tests.rs"]
mod tests;
