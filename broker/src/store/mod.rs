//! Persistence, behind one boundary: the pure [`State`] core never sees
//! which store holds it.
//!
//! - [`sled`](SledStore): the embedded default, one broker per data dir.
//! - [`etcd`](EtcdStore): several broker replicas share one etcd cluster;
//!   every write is a transaction that commits only if nothing changed since
//!   the state it was computed from, and each replica follows etcd's watch.
//!
//! Both keep one JSON record per key: `token/<id>`, `cluster/<name>`,
//! `network/<name>` and `meta` (under a prefix on etcd).

pub mod etcd;
pub mod sled;

pub use self::etcd::{EtcdConfig, EtcdStore, EtcdTls};
pub use self::sled::SledStore;

use crate::error::{Error, Result};
use crate::model::{Cluster, Meta, Network, Token};
use crate::state::{Key, State};
use serde::Serialize;
use serde::de::DeserializeOwned;
use std::collections::BTreeSet;
use std::path::PathBuf;

const TOKEN: &str = "token/";
const CLUSTER: &str = "cluster/";
const NETWORK: &str = "network/";
const META: &str = "meta";

/// Where the broker keeps its state, as given to `--store`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum StoreSpec {
    /// `sled:<dir>`: the embedded store in a directory.
    Sled(PathBuf),
    /// `etcd://host:port,host:port,...`: an etcd cluster shared by replicas.
    Etcd(EtcdConfig),
}

impl StoreSpec {
    /// Parse `sled:<dir>` or `etcd://h1:2379,h2:2379` (TLS and prefix are
    /// set on the [`EtcdConfig`] afterwards).
    pub fn parse(text: &str) -> Result<Self> {
        let text = text.trim();
        if let Some(dir) = text.strip_prefix("sled:") {
            if dir.is_empty() {
                return Err(Error::InvalidArgument(
                    "--store sled: needs a directory, e.g. sled:/var/lib/l2mesh-broker/store"
                        .into(),
                ));
            }
            return Ok(Self::Sled(PathBuf::from(dir)));
        }
        if let Some(list) = text.strip_prefix("etcd://") {
            let endpoints: Vec<String> = list
                .split(',')
                .map(str::trim)
                .filter(|e| !e.is_empty())
                .map(str::to_owned)
                .collect();
            if endpoints.is_empty() {
                return Err(Error::InvalidArgument(
                    "--store etcd:// needs at least one member address, e.g. etcd://etcd-0:2379,etcd-1:2379,etcd-2:2379".into(),
                ));
            }
            for e in &endpoints {
                let port_ok = e
                    .rsplit_once(':')
                    .is_some_and(|(h, p)| !h.is_empty() && p.parse::<u16>().is_ok_and(|p| p != 0));
                if !port_ok || e.contains('/') {
                    return Err(Error::InvalidArgument(format!(
                        "etcd member {e:?} is not host:port (e.g. etcd-0:2379)"
                    )));
                }
            }
            return Ok(Self::Etcd(EtcdConfig::new(endpoints)));
        }
        Err(Error::InvalidArgument(format!(
            "--store {text:?}: use sled:<dir> (one broker, embedded) or etcd://host:port,host:port (several replicas)"
        )))
    }
}

/// The store of a running broker.
#[derive(Debug, Clone)]
pub enum Store {
    Sled(SledStore),
    Etcd(EtcdStore),
}

impl Store {
    /// Open (or create) the store `spec` names.
    pub async fn open(spec: &StoreSpec) -> Result<Self> {
        match spec {
            StoreSpec::Sled(dir) => Ok(Self::Sled(SledStore::open(dir)?)),
            StoreSpec::Etcd(config) => Ok(Self::Etcd(EtcdStore::connect(config.clone()).await?)),
        }
    }

    /// Read everything into a [`State`].
    pub async fn load(&self) -> Result<State> {
        match self {
            Self::Sled(s) => s.load(),
            Self::Etcd(s) => s.load().await,
        }
    }

    /// Make the `dirty` keys of `state` durable (absent records are
    /// deleted), all or nothing, before the caller acknowledges anything.
    /// On etcd, [`Error::Conflict`] means another replica wrote first:
    /// nothing was written; reload and apply the change again.
    pub async fn persist(&self, state: &State, dirty: &BTreeSet<Key>) -> Result<()> {
        match self {
            Self::Sled(s) => s.persist(state, dirty).await,
            Self::Etcd(s) => s.persist(state, dirty).await,
        }
    }

    /// The etcd store, when several replicas share the state.
    #[must_use]
    pub fn etcd(&self) -> Option<&EtcdStore> {
        match self {
            Self::Etcd(s) => Some(s),
            Self::Sled(_) => None,
        }
    }
}

/// Copy every record of the store `from` into the empty store `to` (sled
/// to etcd to grow to several replicas, or back). Every broker using either
/// store must be stopped first. Returns how many records were copied.
pub async fn migrate(from: &StoreSpec, to: &StoreSpec) -> Result<usize> {
    if from == to {
        return Err(Error::InvalidArgument(
            "--from and --to name the same store".into(),
        ));
    }
    let state = Store::open(from).await?.load().await?;
    match Store::open(to).await? {
        Store::Sled(dst) => {
            let existing = dst.load()?;
            if has_records(&existing) {
                return Err(Error::AlreadyExists(format!(
                    "the sled store {to:?} already holds broker records: migrate into an empty directory"
                )));
            }
            let keys = all_keys(&state);
            dst.persist(&state, &keys).await?;
            Ok(keys.len())
        }
        Store::Etcd(dst) => dst.import(&state, IMPORT_BATCH).await,
    }
}

/// Records per etcd transaction when importing (below etcd's default
/// `--max-txn-ops` of 128, with room for the commit key).
const IMPORT_BATCH: usize = 100;

/// Whether a state holds any token, cluster or network.
#[must_use]
pub fn has_records(state: &State) -> bool {
    !state.tokens.is_empty() || !state.clusters.is_empty() || !state.networks.is_empty()
}

/// The store key (without prefix) of a record key.
#[must_use]
pub fn key_name(key: &Key) -> String {
    match key {
        Key::Token(id) => format!("{TOKEN}{id}"),
        Key::Cluster(n) => format!("{CLUSTER}{n}"),
        Key::Network(n) => format!("{NETWORK}{n}"),
        Key::Meta => META.to_owned(),
    }
}

/// The record key of a store key, or `None` for keys that hold no record.
#[must_use]
pub fn parse_key(name: &str) -> Option<Key> {
    if let Some(id) = name.strip_prefix(TOKEN) {
        Some(Key::Token(id.to_owned()))
    } else if let Some(n) = name.strip_prefix(CLUSTER) {
        Some(Key::Cluster(n.to_owned()))
    } else if let Some(n) = name.strip_prefix(NETWORK) {
        Some(Key::Network(n.to_owned()))
    } else if name == META {
        Some(Key::Meta)
    } else {
        None
    }
}

fn encode<T: Serialize>(key: &str, value: &T) -> Result<Vec<u8>> {
    serde_json::to_vec(value).map_err(|e| Error::Corrupt {
        key: key.to_owned(),
        reason: e.to_string(),
    })
}

fn decode<T: DeserializeOwned>(key: &str, value: &[u8]) -> Result<T> {
    serde_json::from_slice(value).map_err(|e| Error::Corrupt {
        key: key.to_owned(),
        reason: e.to_string(),
    })
}

/// The encoded record of `key` in `state`, or `None` if it was deleted.
pub fn encode_record(state: &State, key: &Key) -> Result<Option<Vec<u8>>> {
    let k = key_name(key);
    match key {
        Key::Token(id) => state.tokens.get(id).map(|v| encode(&k, v)).transpose(),
        Key::Cluster(n) => state.clusters.get(n).map(|v| encode(&k, v)).transpose(),
        Key::Network(n) => state.networks.get(n).map(|v| encode(&k, v)).transpose(),
        Key::Meta => Some(encode(&k, &state.meta)).transpose(),
    }
}

/// Every record key `state` holds.
#[must_use]
pub fn all_keys(state: &State) -> BTreeSet<Key> {
    state
        .tokens
        .keys()
        .map(|k| Key::Token(k.clone()))
        .chain(state.clusters.keys().map(|k| Key::Cluster(k.clone())))
        .chain(state.networks.keys().map(|k| Key::Network(k.clone())))
        .chain(std::iter::once(Key::Meta))
        .collect()
}

/// Records read from a store, gathered into a [`State`].
#[derive(Debug, Default)]
pub(crate) struct Records {
    tokens: Vec<Token>,
    clusters: Vec<Cluster>,
    networks: Vec<Network>,
    meta: Meta,
}

impl Records {
    /// Add one stored record; keys that hold no record are skipped.
    pub(crate) fn add(&mut self, name: &str, value: &[u8]) -> Result<()> {
        match parse_key(name) {
            Some(Key::Token(_)) => self.tokens.push(decode(name, value)?),
            Some(Key::Cluster(_)) => self.clusters.push(decode(name, value)?),
            Some(Key::Network(_)) => self.networks.push(decode(name, value)?),
            Some(Key::Meta) => self.meta = decode(name, value)?,
            None => {}
        }
        Ok(())
    }

    pub(crate) fn into_state(self) -> State {
        State::from_records(self.tokens, self.clusters, self.networks, self.meta)
    }
}

/// Apply changed records (`None`: deleted) to a copy of `state`.
pub fn apply_changes(state: &State, changes: Vec<(Key, Option<Vec<u8>>)>) -> Result<State> {
    let mut tokens = state.tokens.clone();
    let mut clusters = state.clusters.clone();
    let mut networks = state.networks.clone();
    let mut meta = state.meta.clone();
    for (key, value) in changes {
        let name = key_name(&key);
        match (key, value) {
            (Key::Token(id), Some(v)) => {
                tokens.insert(id, decode(&name, &v)?);
            }
            (Key::Token(id), None) => {
                tokens.remove(&id);
            }
            (Key::Cluster(n), Some(v)) => {
                clusters.insert(n, decode(&name, &v)?);
            }
            (Key::Cluster(n), None) => {
                clusters.remove(&n);
            }
            (Key::Network(n), Some(v)) => {
                networks.insert(n, decode(&name, &v)?);
            }
            (Key::Network(n), None) => {
                networks.remove(&n);
            }
            (Key::Meta, Some(v)) => meta = decode(&name, &v)?,
            (Key::Meta, None) => meta = Meta::default(),
        }
    }
    Ok(State::from_records(
        tokens.into_iter().map(|(_, v)| v).collect(),
        clusters.into_iter().map(|(_, v)| v).collect(),
        networks.into_iter().map(|(_, v)| v).collect(),
        meta,
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn store_specs_parse_and_bad_ones_are_named() {
        assert_eq!(
            StoreSpec::parse("sled:/var/x").unwrap(),
            StoreSpec::Sled("/var/x".into())
        );
        let StoreSpec::Etcd(c) = StoreSpec::parse("etcd://a:2379, b:2380").unwrap() else {
            panic!("not etcd");
        };
        assert_eq!(c.endpoints, vec!["a:2379", "b:2380"]);
        for bad in [
            "sled:",
            "etcd://",
            "etcd://a",
            "etcd://a:0",
            "etcd://a:2379/x",
            "redis://a:1",
            "",
        ] {
            let e = StoreSpec::parse(bad).unwrap_err().to_string();
            assert!(
                e.contains("store") || e.contains("etcd member"),
                "{bad}: {e}"
            );
        }
    }

    #[test]
    fn keys_round_trip() {
        for k in [
            Key::Token("t".into()),
            Key::Cluster("c".into()),
            Key::Network("n".into()),
            Key::Meta,
        ] {
            assert_eq!(parse_key(&key_name(&k)), Some(k));
        }
        assert_eq!(parse_key("commit"), None);
    }

    #[test]
    fn changes_apply_puts_and_deletes() {
        let mut s = State::default();
        s.create_token("edge", "t1".into(), "sec", 60, 1, 0)
            .unwrap();
        s.join("t1", "sec", "edge", [3; 32], 1).unwrap();
        let value = encode_record(&s, &Key::Cluster("edge".into())).unwrap();
        let t = encode_record(&s, &Key::Token("t1".into())).unwrap();
        let next = apply_changes(
            &State::default(),
            vec![
                (Key::Cluster("edge".into()), value),
                (Key::Token("t1".into()), t),
            ],
        )
        .unwrap();
        assert_eq!(next.clusters, s.clusters);
        assert_eq!(next.cluster_for_cert(&[3; 32]), Some("edge"));
        let gone = apply_changes(&next, vec![(Key::Cluster("edge".into()), None)]).unwrap();
        assert!(gone.clusters.is_empty());
        assert_eq!(gone.cluster_for_cert(&[3; 32]), None);
        assert_eq!(gone.tokens.len(), 1);
    }
}
