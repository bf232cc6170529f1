//! The shared store on etcd (v3 API over gRPC, our own client generated from
//! the subset of etcd's protos in `l2mesh-proto`).
//!
//! Every record is one key under the prefix, plus one `commit` key that
//! every write puts. A write is one transaction: it compares the `commit`
//! key's mod revision with the one the broker's state was loaded or last
//! updated at, and only then puts and deletes its records. The pure core
//! reads the whole state to decide (a token's uses, a free VNI or tunnel
//! subnet, a key another cluster reports), so comparing that one key is
//! comparing every key it read: of two replicas racing, exactly one commits
//! and the other gets [`Error::Conflict`], reloads and decides again.
//!
//! Requests carry etcd's `hasleader` metadata, so a member cut off from its
//! quorum refuses at once instead of timing out. After a failed request the
//! store refuses writes at once ([`Error::StoreUnavailable`]) until a probe
//! (see [`EtcdStore::probe`]) or a successful request shows etcd answering
//! again; reads and watches are served from memory meanwhile.

use super::{Records, encode_record, key_name, parse_key};
use crate::error::{Error, Result};
use crate::state::{Key, State};
use l2mesh_proto::etcd as pb;
use pb::kv_client::KvClient;
use pb::watch_client::WatchClient;
use std::collections::BTreeSet;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity};

/// The key every write puts (under the prefix); its mod revision is what a
/// write compares.
pub const COMMIT_KEY: &str = "commit";
/// The key holding the pin of the CA every replica must present (the CA
/// itself stays in each replica's data dir, never in etcd).
pub const CA_PIN_KEY: &str = "ca-pin";
/// Default key prefix.
pub const DEFAULT_PREFIX: &str = "/l2mesh/";
/// Records read per range request while loading.
const PAGE: i64 = 1000;
/// Largest etcd response the broker accepts (a page of records).
const MAX_RESPONSE_BYTES: usize = 64 << 20;

/// How to reach etcd.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EtcdConfig {
    /// Member client addresses, `host:port`.
    pub endpoints: Vec<String>,
    /// Every key of this broker starts with it (several brokers can share
    /// one etcd under different prefixes).
    pub prefix: String,
    /// TLS to etcd; plain gRPC when `None`.
    pub tls: Option<EtcdTls>,
    /// Deadline of one request to etcd.
    pub timeout: Duration,
}

impl EtcdConfig {
    /// Plain gRPC to `endpoints`, default prefix and timeout.
    #[must_use]
    pub fn new(endpoints: Vec<String>) -> Self {
        Self {
            endpoints,
            prefix: DEFAULT_PREFIX.to_owned(),
            tls: None,
            timeout: Duration::from_secs(3),
        }
    }
}

/// TLS to etcd: the CA that signed the members' certificates, and an
/// optional client certificate and key (etcd's `--client-cert-auth`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EtcdTls {
    pub ca: PathBuf,
    pub cert: Option<PathBuf>,
    pub key: Option<PathBuf>,
    /// Name to verify the members' certificates under (default: the host
    /// of each endpoint).
    pub server_name: Option<String>,
}

/// Where the broker's in-memory state stands in etcd's history.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Position {
    /// The etcd revision the state reflects.
    pub revision: i64,
    /// Mod revision of the commit key in that state (0: never written).
    pub commit: i64,
}

/// Changes of one etcd revision, read from the watch.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Revision {
    pub revision: i64,
    /// Changed records (`None`: deleted).
    pub changes: Vec<(Key, Option<Vec<u8>>)>,
    /// Whether the commit key was written (a broker's write; anything else
    /// under the prefix was written by someone else).
    pub commit: bool,
}

/// What the watch delivered.
#[derive(Debug)]
pub enum WatchEvent {
    /// Changes, oldest first.
    Revisions(Vec<Revision>),
    /// The revisions after the position were compacted away: reload.
    Compacted,
}

/// The etcd store; clones share the connection and the position.
#[derive(Clone)]
pub struct EtcdStore {
    inner: Arc<Inner>,
}

struct Inner {
    config: EtcdConfig,
    channels: Vec<Channel>,
    /// The member tried first.
    current: AtomicUsize,
    position: Mutex<Position>,
    /// A request failed and nothing has answered since: writes are refused
    /// at once (the last error is the reason).
    down: Mutex<Option<String>>,
    /// Set when a write's outcome is unknown: the state must be reloaded.
    stale: AtomicBool,
    replica: String,
}

impl std::fmt::Debug for EtcdStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EtcdStore")
            .field("config", &self.inner.config)
            .field("position", &self.position())
            .finish_non_exhaustive()
    }
}

fn read_file(path: &PathBuf, what: &str) -> Result<Vec<u8>> {
    std::fs::read(path)
        .map_err(|e| Error::io(format!("cannot read the etcd {what} {}", path.display()), e))
}

fn endpoint(addr: &str, config: &EtcdConfig) -> Result<Endpoint> {
    let scheme = if config.tls.is_some() {
        "https"
    } else {
        "http"
    };
    let mut ep = Endpoint::from_shared(format!("{scheme}://{addr}"))
        .map_err(|e| Error::InvalidArgument(format!("etcd member {addr:?}: {e}")))?
        .connect_timeout(config.timeout)
        .http2_keep_alive_interval(Duration::from_secs(10))
        .keep_alive_timeout(Duration::from_secs(5))
        .keep_alive_while_idle(true);
    if let Some(tls) = &config.tls {
        let mut t =
            ClientTlsConfig::new().ca_certificate(Certificate::from_pem(read_file(&tls.ca, "CA")?));
        match (&tls.cert, &tls.key) {
            (Some(cert), Some(key)) => {
                t = t.identity(Identity::from_pem(
                    read_file(cert, "client certificate")?,
                    read_file(key, "client key")?,
                ));
            }
            (None, None) => {}
            _ => {
                return Err(Error::InvalidArgument(
                    "--etcd-cert and --etcd-key go together: give both or neither".into(),
                ));
            }
        }
        let host = addr
            .rsplit_once(':')
            .map_or(addr, |(h, _)| h)
            .trim_matches(['[', ']']);
        t = t.domain_name(tls.server_name.clone().unwrap_or_else(|| host.to_owned()));
        ep = ep
            .tls_config(t)
            .map_err(|e| Error::InvalidArgument(format!("etcd TLS setup: {e}")))?;
    }
    Ok(ep)
}

/// The end of the key range of everything starting with `prefix`.
fn prefix_end(prefix: &[u8]) -> Vec<u8> {
    let mut end = prefix.to_vec();
    while let Some(last) = end.pop() {
        if last < 0xff {
            end.push(last + 1);
            return end;
        }
    }
    vec![0]
}

fn with_leader<T>(msg: T) -> tonic::Request<T> {
    let mut req = tonic::Request::new(msg);
    req.metadata_mut().insert(
        "hasleader",
        tonic::metadata::MetadataValue::from_static("true"),
    );
    req
}

/// Whether a failed request certainly did not reach etcd's log (so it may
/// go to another member).
fn not_applied(status: &tonic::Status) -> bool {
    let m = status.message();
    status.code() == tonic::Code::Unavailable
        && (m.contains("no leader")
            || m.contains("connect")
            || m.contains("refused")
            || m.contains("not ready"))
}

/// etcd's own refusals that no retry fixes, with what to do about them.
fn refusal(status: &tonic::Status) -> Option<String> {
    let m = status.message();
    if m.contains("too many operations in txn request") {
        Some(format!(
            "etcd refused the write ({m}): this change touches more records than etcd's --max-txn-ops allows; raise it on every etcd member (the broker's manifests use 100000)"
        ))
    } else if m.contains("request is too large") {
        Some(format!(
            "etcd refused the write ({m}): raise --max-request-bytes on every etcd member (the broker's manifests use 33554432)"
        ))
    } else if status.code() == tonic::Code::Unauthenticated
        || status.code() == tonic::Code::PermissionDenied
    {
        Some(format!(
            "etcd refused the broker's credentials ({m}): check --etcd-cert/--etcd-key and etcd's client CA"
        ))
    } else {
        None
    }
}

impl EtcdStore {
    /// Set up the connections to every member (nothing is sent yet).
    pub async fn connect(config: EtcdConfig) -> Result<Self> {
        if config.endpoints.is_empty() {
            return Err(Error::InvalidArgument(
                "no etcd member address given".into(),
            ));
        }
        if config.prefix.is_empty() {
            return Err(Error::InvalidArgument(
                "the etcd key prefix must not be empty (default /l2mesh/)".into(),
            ));
        }
        let channels = config
            .endpoints
            .iter()
            .map(|a| endpoint(a, &config).map(|e| e.connect_lazy()))
            .collect::<Result<Vec<_>>>()?;
        let replica = format!("{}-{:016x}", std::process::id(), rand::random::<u64>());
        Ok(Self {
            inner: Arc::new(Inner {
                config,
                channels,
                current: AtomicUsize::new(0),
                position: Mutex::default(),
                down: Mutex::default(),
                stale: AtomicBool::new(false),
                replica,
            }),
        })
    }

    /// The configuration it was opened with.
    #[must_use]
    pub fn config(&self) -> &EtcdConfig {
        &self.inner.config
    }

    /// Where the state in memory stands.
    #[must_use]
    pub fn position(&self) -> Position {
        *self
            .inner
            .position
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn set_position(&self, p: Position) {
        *self
            .inner
            .position
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = p;
    }

    /// Whether a write's outcome was unknown since the last load: the state
    /// must be reloaded before the next write.
    #[must_use]
    pub fn is_stale(&self) -> bool {
        self.inner.stale.load(Ordering::Relaxed)
    }

    fn down_reason(&self) -> Option<String> {
        self.inner
            .down
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
    }

    fn mark_down(&self, why: String) {
        let mut down = self
            .inner
            .down
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if down.is_none() {
            tracing::warn!(reason = %why, "etcd is not answering: writes are refused until it does; reads and watches go on from memory");
        }
        *down = Some(why);
    }

    fn mark_up(&self) {
        let was = self
            .inner
            .down
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .take();
        if was.is_some() {
            tracing::info!("etcd answers again: writes are accepted");
        }
    }

    /// Whether writes are being refused because etcd does not answer.
    #[must_use]
    pub fn is_down(&self) -> bool {
        self.down_reason().is_some()
    }

    fn unavailable(&self, why: &str) -> Error {
        Error::StoreUnavailable(format!(
            "etcd ({}) cannot take writes now: {why}; nothing was changed, retry later (reads and watches keep working)",
            self.inner.config.endpoints.join(",")
        ))
    }

    fn key(&self, name: &str) -> Vec<u8> {
        format!("{}{name}", self.inner.config.prefix).into_bytes()
    }

    /// Channels in the order to try them: the current member first.
    fn order(&self) -> impl Iterator<Item = (usize, Channel)> + '_ {
        let n = self.inner.channels.len();
        let start = self.inner.current.load(Ordering::Relaxed);
        (0..n).map(move |i| {
            let at = (start + i) % n;
            (at, self.inner.channels[at].clone())
        })
    }

    /// A linearizable range, on the first member that answers.
    async fn range(&self, req: pb::RangeRequest) -> Result<pb::RangeResponse> {
        let mut last = String::from("no member tried");
        for (at, ch) in self.order() {
            let mut kv = KvClient::new(ch).max_decoding_message_size(MAX_RESPONSE_BYTES);
            match tokio::time::timeout(
                self.inner.config.timeout,
                kv.range(with_leader(req.clone())),
            )
            .await
            {
                Ok(Ok(r)) => {
                    self.inner.current.store(at, Ordering::Relaxed);
                    self.mark_up();
                    return Ok(r.into_inner());
                }
                Ok(Err(s)) => {
                    if let Some(m) = refusal(&s) {
                        return Err(Error::StoreUnavailable(m));
                    }
                    last = format!("{}: {}", self.inner.config.endpoints[at], s.message());
                }
                Err(_) => {
                    last = format!(
                        "{}: no answer within {:?}",
                        self.inner.config.endpoints[at], self.inner.config.timeout
                    );
                }
            }
        }
        self.mark_down(last.clone());
        Err(self.unavailable(&last))
    }

    /// Read every record at one revision into a [`State`]; the position
    /// moves to that revision.
    pub async fn load(&self) -> Result<State> {
        let prefix = self.inner.config.prefix.as_bytes().to_vec();
        let end = prefix_end(&prefix);
        let mut records = Records::default();
        let mut from = prefix.clone();
        let mut at_revision = 0;
        let mut commit = 0;
        loop {
            let r = self
                .range(pb::RangeRequest {
                    key: from.clone(),
                    range_end: end.clone(),
                    limit: PAGE,
                    revision: at_revision,
                    serializable: false,
                })
                .await?;
            if at_revision == 0 {
                at_revision = r.header.map_or(0, |h| h.revision);
            }
            for kv in &r.kvs {
                let name =
                    String::from_utf8_lossy(&kv.key[prefix.len().min(kv.key.len())..]).into_owned();
                if name == COMMIT_KEY {
                    commit = kv.mod_revision;
                }
                records.add(&name, &kv.value)?;
            }
            match r.kvs.last() {
                Some(last) if r.more => {
                    from = last.key.clone();
                    from.push(0);
                }
                _ => break,
            }
        }
        self.set_position(Position {
            revision: at_revision,
            commit,
        });
        self.inner.stale.store(false, Ordering::Relaxed);
        Ok(records.into_state())
    }

    /// Write the `dirty` records of `state` in one transaction that commits
    /// only if nothing was written since the position.
    pub async fn persist(&self, state: &State, dirty: &BTreeSet<Key>) -> Result<()> {
        if dirty.is_empty() {
            return Ok(());
        }
        if let Some(why) = self.down_reason() {
            return Err(self.unavailable(&why));
        }
        if self.is_stale() {
            return Err(Error::Conflict);
        }
        let mut success = Vec::with_capacity(dirty.len() + 1);
        for key in dirty {
            let k = self.key(&key_name(key));
            success.push(pb::RequestOp {
                request: Some(match encode_record(state, key)? {
                    Some(value) => {
                        pb::request_op::Request::RequestPut(pb::PutRequest { key: k, value })
                    }
                    None => pb::request_op::Request::RequestDeleteRange(pb::DeleteRangeRequest {
                        key: k,
                        range_end: Vec::new(),
                    }),
                }),
            });
        }
        let commit_key = self.key(COMMIT_KEY);
        success.push(pb::RequestOp {
            request: Some(pb::request_op::Request::RequestPut(pb::PutRequest {
                key: commit_key.clone(),
                value: self.inner.replica.clone().into_bytes(),
            })),
        });
        let txn = pb::TxnRequest {
            compare: vec![pb::Compare {
                result: pb::compare::CompareResult::Equal.into(),
                target: pb::compare::CompareTarget::Mod.into(),
                key: commit_key,
                target_union: Some(pb::compare::TargetUnion::ModRevision(
                    self.position().commit,
                )),
            }],
            success,
            failure: Vec::new(),
        };
        let mut last = String::from("no member tried");
        for (at, ch) in self.order() {
            let mut kv = KvClient::new(ch);
            let member = &self.inner.config.endpoints[at];
            match tokio::time::timeout(self.inner.config.timeout, kv.txn(with_leader(txn.clone())))
                .await
            {
                Ok(Ok(r)) => {
                    self.inner.current.store(at, Ordering::Relaxed);
                    self.mark_up();
                    let r = r.into_inner();
                    if !r.succeeded {
                        // The position is behind: reload before the retry.
                        self.inner.stale.store(true, Ordering::Relaxed);
                        return Err(Error::Conflict);
                    }
                    let revision = r.header.map_or(0, |h| h.revision);
                    self.set_position(Position {
                        revision,
                        commit: revision,
                    });
                    return Ok(());
                }
                Ok(Err(s)) if not_applied(&s) => {
                    last = format!("{member}: {}", s.message());
                }
                Ok(Err(s)) => {
                    if let Some(m) = refusal(&s) {
                        return Err(Error::StoreUnavailable(m));
                    }
                    return Err(self.unknown_outcome(&format!("{member}: {}", s.message())));
                }
                Err(_) => {
                    return Err(self.unknown_outcome(&format!(
                        "{member}: no answer within {:?}",
                        self.inner.config.timeout
                    )));
                }
            }
        }
        self.mark_down(last.clone());
        Err(self.unavailable(&last))
    }

    /// A write was sent but not confirmed: it may still commit. The state
    /// is reloaded before the next write (whose compare fails if it did).
    fn unknown_outcome(&self, why: &str) -> Error {
        self.inner.stale.store(true, Ordering::Relaxed);
        self.mark_down(why.to_owned());
        Error::StoreUnavailable(format!(
            "etcd ({}) did not confirm the write ({why}): it may or may not have been saved; check before retrying (reads and watches keep working)",
            self.inner.config.endpoints.join(",")
        ))
    }

    /// Whether the state in memory has every write of every replica (a
    /// linearizable read of the commit key). When not, the state is marked
    /// stale, to be reloaded. When etcd cannot tell, it counts as current.
    pub async fn is_current(&self) -> bool {
        let r = self
            .range(pb::RangeRequest {
                key: self.key(COMMIT_KEY),
                limit: 1,
                ..Default::default()
            })
            .await;
        let Ok(r) = r else { return true };
        let latest = r.kvs.first().map_or(0, |kv| kv.mod_revision);
        if latest == self.position().commit {
            return true;
        }
        self.inner.stale.store(true, Ordering::Relaxed);
        false
    }

    /// One linearizable read: clears the refusal of writes when etcd
    /// answers. Returns whether it did.
    pub async fn probe(&self) -> bool {
        let r = self
            .range(pb::RangeRequest {
                key: self.key(COMMIT_KEY),
                limit: 1,
                ..Default::default()
            })
            .await;
        r.is_ok()
    }

    /// Record `pin` as the CA of this store if none is recorded yet, and
    /// refuse a replica whose CA is another one: agents pin the CA, so
    /// every replica must present the same.
    pub async fn claim_ca_pin(&self, pin: &str) -> Result<()> {
        let key = self.key(CA_PIN_KEY);
        let txn = pb::TxnRequest {
            compare: vec![pb::Compare {
                result: pb::compare::CompareResult::Equal.into(),
                target: pb::compare::CompareTarget::Create.into(),
                key: key.clone(),
                target_union: Some(pb::compare::TargetUnion::CreateRevision(0)),
            }],
            success: vec![pb::RequestOp {
                request: Some(pb::request_op::Request::RequestPut(pb::PutRequest {
                    key: key.clone(),
                    value: pin.as_bytes().to_vec(),
                })),
            }],
            failure: vec![pb::RequestOp {
                request: Some(pb::request_op::Request::RequestRange(pb::RangeRequest {
                    key,
                    ..Default::default()
                })),
            }],
        };
        let mut last = String::from("no member tried");
        for (at, ch) in self.order() {
            let mut kv = KvClient::new(ch);
            match tokio::time::timeout(self.inner.config.timeout, kv.txn(with_leader(txn.clone())))
                .await
            {
                Ok(Ok(r)) => {
                    let r = r.into_inner();
                    if r.succeeded {
                        tracing::info!(ca_pin = %pin, "recorded this broker's CA in etcd: every replica must load the same CA");
                        return Ok(());
                    }
                    let recorded = r
                        .responses
                        .into_iter()
                        .find_map(|op| match op.response {
                            Some(pb::response_op::Response::ResponseRange(rr)) => {
                                rr.kvs.into_iter().next().map(|kv| kv.value)
                            }
                            _ => None,
                        })
                        .unwrap_or_default();
                    let recorded = String::from_utf8_lossy(&recorded);
                    if recorded == pin {
                        return Ok(());
                    }
                    return Err(Error::Pki(format!(
                        "this replica's CA ({pin}) is not the CA of the other replicas on this etcd prefix ({recorded}): every replica must load the same ca.pem and ca.key (mount one Secret on all of them), or agents would reject it"
                    )));
                }
                Ok(Err(s)) => {
                    last = format!("{}: {}", self.inner.config.endpoints[at], s.message())
                }
                Err(_) => last = format!("{}: no answer", self.inner.config.endpoints[at]),
            }
        }
        Err(self.unavailable(&last))
    }

    /// Follow every change after `after` (the position's revision).
    pub async fn watch(&self, after: i64) -> Result<EtcdWatch> {
        let prefix = self.inner.config.prefix.as_bytes().to_vec();
        let create = pb::WatchRequest {
            request_union: Some(pb::watch_request::RequestUnion::CreateRequest(
                pb::WatchCreateRequest {
                    range_end: prefix_end(&prefix),
                    key: prefix.clone(),
                    start_revision: after + 1,
                    progress_notify: true,
                },
            )),
        };
        let mut last = String::from("no member tried");
        for (at, ch) in self.order() {
            let (tx, rx) = tokio::sync::mpsc::channel(4);
            if tx.send(create.clone()).await.is_err() {
                continue;
            }
            let mut client = WatchClient::new(ch).max_decoding_message_size(MAX_RESPONSE_BYTES);
            let call = client.watch(with_leader(tokio_stream::wrappers::ReceiverStream::new(rx)));
            match tokio::time::timeout(self.inner.config.timeout, call).await {
                Ok(Ok(stream)) => {
                    self.inner.current.store(at, Ordering::Relaxed);
                    return Ok(EtcdWatch {
                        stream: stream.into_inner(),
                        _requests: tx,
                        prefix_len: prefix.len(),
                        member: self.inner.config.endpoints[at].clone(),
                    });
                }
                Ok(Err(s)) => {
                    last = format!("{}: {}", self.inner.config.endpoints[at], s.message())
                }
                Err(_) => last = format!("{}: no answer", self.inner.config.endpoints[at]),
            }
        }
        Err(self.unavailable(&last))
    }

    /// Copy every record of `state` into this (empty) store, in one
    /// transaction per `batch` keys. Refuses a store that holds records.
    pub async fn import(&self, state: &State, batch: usize) -> Result<usize> {
        let existing = self.load().await?;
        if super::has_records(&existing) {
            return Err(Error::AlreadyExists(format!(
                "etcd prefix {:?} already holds broker records: migrate into an empty prefix (or delete it first with etcdctl del --prefix)",
                self.inner.config.prefix
            )));
        }
        let keys: Vec<Key> = super::all_keys(state).into_iter().collect();
        for chunk in keys.chunks(batch.max(1)) {
            let dirty: BTreeSet<Key> = chunk.iter().cloned().collect();
            self.persist(state, &dirty).await?;
        }
        Ok(keys.len())
    }
}

/// An open etcd watch on the prefix.
#[derive(Debug)]
pub struct EtcdWatch {
    stream: tonic::Streaming<pb::WatchResponse>,
    /// Kept open: etcd ends the watch when the request stream closes.
    _requests: tokio::sync::mpsc::Sender<pb::WatchRequest>,
    prefix_len: usize,
    /// The member it follows.
    pub member: String,
}

impl EtcdWatch {
    /// The next changes (an empty list for a progress notification), or an
    /// error when the watch broke (reconnect from the position).
    pub async fn next(&mut self) -> Result<WatchEvent> {
        let r = self
            .stream
            .message()
            .await
            .map_err(|s| {
                Error::StoreUnavailable(format!("etcd watch on {}: {}", self.member, s.message()))
            })?
            .ok_or_else(|| {
                Error::StoreUnavailable(format!("etcd watch on {} ended", self.member))
            })?;
        if r.compact_revision != 0 {
            return Ok(WatchEvent::Compacted);
        }
        if r.canceled {
            return Err(Error::StoreUnavailable(format!(
                "etcd cancelled the watch on {}: {}",
                self.member, r.cancel_reason
            )));
        }
        let mut out: Vec<Revision> = Vec::new();
        for ev in r.events {
            let Some(kv) = ev.kv else { continue };
            let name =
                String::from_utf8_lossy(&kv.key[self.prefix_len.min(kv.key.len())..]).into_owned();
            let rev = kv.mod_revision;
            if out.last().is_none_or(|l| l.revision != rev) {
                out.push(Revision {
                    revision: rev,
                    changes: Vec::new(),
                    commit: false,
                });
            }
            let Some(cur) = out.last_mut() else { continue };
            if name == COMMIT_KEY {
                cur.commit = true;
                continue;
            }
            let Some(key) = parse_key(&name) else {
                continue;
            };
            let deleted = ev.r#type == pb::event::EventType::Delete as i32;
            cur.changes
                .push((key, if deleted { None } else { Some(kv.value) }));
        }
        Ok(WatchEvent::Revisions(out))
    }
}

impl EtcdStore {
    /// Record that the state now reflects `rev` (applied from the watch).
    pub fn advance(&self, rev: &Revision) {
        let mut p = self.position();
        if rev.revision <= p.revision {
            return;
        }
        p.revision = rev.revision;
        if rev.commit {
            p.commit = rev.revision;
        }
        self.set_position(p);
        self.mark_up();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prefix_end_covers_the_prefix() {
        assert_eq!(prefix_end(b"/l2mesh/"), b"/l2mesh0".to_vec());
        assert_eq!(prefix_end(b"a\xff"), b"b".to_vec());
        assert_eq!(prefix_end(b"\xff"), vec![0]);
    }

    #[test]
    fn only_refusals_before_the_log_may_go_to_another_member() {
        assert!(not_applied(&tonic::Status::unavailable(
            "etcdserver: no leader"
        )));
        assert!(not_applied(&tonic::Status::unavailable(
            "tcp connect error: Connection refused"
        )));
        assert!(!not_applied(&tonic::Status::unavailable(
            "etcdserver: request timed out"
        )));
        assert!(!not_applied(&tonic::Status::internal("no leader")));
    }

    #[test]
    fn refusals_say_what_to_change() {
        let m = refusal(&tonic::Status::invalid_argument(
            "etcdserver: too many operations in txn request",
        ))
        .unwrap();
        assert!(m.contains("--max-txn-ops"), "{m}");
        assert!(refusal(&tonic::Status::unavailable("x")).is_none());
    }
}
