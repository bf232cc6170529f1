//! The running broker: one writer (group commit, persistence before
//! acknowledgement), readers on the last committed state, fan-out of view
//! changes, and the TLS gRPC + metrics servers.

use crate::conn::{ConnLimits, RequestConn, Tracker};
use crate::error::{Error, Result};
use crate::hub::Hub;
use crate::limiter::{JoinLimiter, ReportLimiter};
use crate::metrics::Metrics;
use crate::pki::Pki;
use crate::state::{Principal, State, sha256};
use crate::store::{Store, StoreSpec};
use crate::view;
use l2mesh_proto::broker::broker_admin_server::BrokerAdminServer;
use l2mesh_proto::broker::broker_server::BrokerServer;
use l2mesh_proto::limits::MAX_MESSAGE_BYTES;
use std::any::Any;
use std::collections::{BTreeSet, HashMap};
use std::future::Future;
use std::path::PathBuf;
use std::sync::{Arc, Mutex as StdMutex, RwLock};
use std::time::Duration;
use tokio::net::TcpListener;
use tokio::sync::Mutex;
use tonic::transport::Server;

/// How the broker runs.
#[derive(Clone, Debug)]
pub struct ServeConfig {
    /// Holds `store/`, the CA and the admin credential.
    pub data_dir: PathBuf,
    /// Where the state lives; `None`: sled in `<data_dir>/store`.
    pub store: Option<StoreSpec>,
    /// `host:port` addresses put in join strings and the server certificate.
    pub advertise: Vec<String>,
    /// TTL of tokens created without one.
    pub default_token_ttl: Duration,
    /// Failed joins allowed per source address per minute (0: no limit).
    pub join_failures_per_minute: u32,
    /// Largest accepted request message.
    pub max_request_bytes: usize,
    /// Caps and deadlines of client connections.
    pub conn: ConnLimits,
    /// Reports (gateways, networks, link health) one cluster may send per
    /// minute on average, and in one burst.
    pub reports_per_minute: u32,
    pub report_burst: u32,
    /// Shortest time between two views on one watch stream: changes that
    /// come faster are merged into the next view.
    pub view_interval: Duration,
    /// How long used, expired and revoked tokens stay listed.
    pub token_retention: Duration,
    /// Lifetime of the cluster certificates the broker signs.
    pub cluster_cert_lifetime: Duration,
    /// Largest view the broker builds for a cluster; a change that would
    /// make one larger is refused. At most (and by default)
    /// [`MAX_MESSAGE_BYTES`], what agents accept.
    pub max_view_bytes: usize,
}

impl ServeConfig {
    /// Defaults for a data dir and advertised addresses.
    #[must_use]
    pub fn new(data_dir: PathBuf, advertise: Vec<String>) -> Self {
        Self {
            data_dir,
            store: None,
            advertise,
            default_token_ttl: Duration::from_secs(3600),
            join_failures_per_minute: 10,
            max_request_bytes: 1 << 20,
            conn: ConnLimits::default(),
            reports_per_minute: 120,
            report_burst: 30,
            view_interval: Duration::from_millis(100),
            token_retention: Duration::from_secs(7 * 24 * 3600),
            cluster_cert_lifetime: Duration::from_secs(90 * 24 * 3600),
            max_view_bytes: MAX_MESSAGE_BYTES,
        }
    }
}

/// The certificates that may receive a cluster's view.
pub(crate) fn certs_of(c: &crate::model::Cluster) -> Vec<[u8; 32]> {
    std::iter::once(c.cert_sha256)
        .chain(c.prev_cert_sha256)
        .collect()
}

/// Unix time now, in seconds.
#[must_use]
pub fn now_unix() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX))
}

type Op = Box<dyn FnMut(&mut State) -> Result<(Box<dyn Any + Send>, BTreeSet<String>)> + Send>;

/// A queued mutation and where its answer goes.
pub(crate) struct Pending {
    op: Op,
    reply: tokio::sync::oneshot::Sender<Result<Box<dyn Any + Send>>>,
}

pub(crate) struct Core {
    pub(crate) state: State,
    pub(crate) store: Store,
}

/// The last committed state, for readers that must not wait for a commit.
#[derive(Default)]
pub(crate) struct Committed(RwLock<Arc<State>>);

impl Committed {
    pub(crate) fn get(&self) -> Arc<State> {
        Arc::clone(
            &self
                .0
                .read()
                .unwrap_or_else(std::sync::PoisonError::into_inner),
        )
    }

    pub(crate) fn set(&self, state: Arc<State>) {
        *self
            .0
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = state;
    }
}

/// The broker: clone it freely, it is a handle.
#[derive(Clone)]
pub struct Broker {
    pub(crate) core: Arc<Mutex<Core>>,
    /// What the last commit made current (readers and watch snapshots).
    pub(crate) committed: Arc<Committed>,
    /// When each cluster last called in (memory; folded into the state by
    /// the next commit, so persisted with its next write).
    pub(crate) seen: Arc<StdMutex<HashMap<String, i64>>>,
    queue: Arc<StdMutex<Vec<Pending>>>,
    pub(crate) pki: Arc<Pki>,
    pub(crate) hub: Arc<Hub>,
    pub(crate) limiter: Arc<StdMutex<JoinLimiter>>,
    pub(crate) reports: Arc<StdMutex<ReportLimiter>>,
    /// Last link-health report of each cluster (memory only).
    pub(crate) health: Arc<StdMutex<HashMap<String, Vec<l2mesh_proto::broker::LinkHealth>>>>,
    pub(crate) started: tokio::time::Instant,
    pub(crate) metrics: Arc<Metrics>,
    pub(crate) config: Arc<ServeConfig>,
}

impl std::fmt::Debug for Broker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Broker")
            .field("config", &self.config)
            .finish_non_exhaustive()
    }
}

impl Broker {
    /// Open the data dir: store, CA, admin credential; publish every view.
    pub async fn open(config: ServeConfig) -> Result<Self> {
        if config.advertise.iter().all(|a| a.trim().is_empty()) {
            return Err(Error::InvalidArgument(
                "no advertise address: pass --advertise HOST:PORT (where agents reach the broker)"
                    .into(),
            ));
        }
        let pki = Pki::load_or_create(&config.data_dir, &config.advertise)?;
        let spec = config
            .store
            .clone()
            .unwrap_or_else(|| StoreSpec::Sled(config.data_dir.join("store")));
        let store = Store::open(&spec).await?;
        if let Some(etcd) = store.etcd() {
            etcd.claim_ca_pin(&pki.ca_pin()).await?;
        }
        let state = crate::replica::load_and_upgrade(&store).await?;
        let committed = Arc::new(Committed::default());
        committed.set(Arc::new(state.clone()));
        let broker = Self {
            core: Arc::new(Mutex::new(Core { state, store })),
            committed,
            seen: Arc::default(),
            queue: Arc::default(),
            pki: Arc::new(pki),
            hub: Arc::new(Hub::default()),
            limiter: Arc::new(StdMutex::new(JoinLimiter::new(
                config.join_failures_per_minute,
                60,
            ))),
            reports: Arc::new(StdMutex::new(ReportLimiter::new(
                config.reports_per_minute,
                config.report_burst,
            ))),
            health: Arc::default(),
            started: tokio::time::Instant::now(),
            metrics: Arc::new(Metrics::default()),
            config: Arc::new(config),
        };
        {
            let state = broker.committed.get();
            for (name, c) in &state.clusters {
                broker.hub.update(name, |p| {
                    p.advance(c.view_rev, None);
                    p.certs = certs_of(c);
                });
            }
            broker.update_gauges(&state);
            if let Some(etcd) = broker.core.lock().await.store.etcd() {
                broker.follow(etcd.clone());
            }
        }
        Ok(broker)
    }

    /// The join-string pin of this broker's CA.
    #[must_use]
    pub fn ca_pin(&self) -> String {
        self.pki.ca_pin()
    }

    /// Where the admin credential is.
    #[must_use]
    pub fn admin_credential_path(&self) -> PathBuf {
        self.pki.admin_path.clone()
    }

    /// The last committed state. Never waits for a commit in progress.
    pub(crate) fn current(&self) -> Arc<State> {
        self.committed.get()
    }

    /// Drop what memory holds of a removed cluster.
    pub(crate) fn forget(&self, name: &str) {
        self.health
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .remove(name);
        self.reports
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .forget(name);
    }

    /// Every minute or so (sooner for a short retention), delete tokens
    /// whose retention ran out. Writes only when there is one to delete.
    fn spawn_sweeper(
        &self,
        mut stop: tokio::sync::watch::Receiver<bool>,
    ) -> tokio::task::JoinHandle<()> {
        let me = self.clone();
        let retention = self.config.token_retention;
        let every = (retention / 2).clamp(Duration::from_secs(1), Duration::from_secs(60));
        let retention_secs = i64::try_from(retention.as_secs()).unwrap_or(i64::MAX);
        tokio::spawn(async move {
            loop {
                tokio::select! {
                    () = tokio::time::sleep(every) => {}
                    _ = stop.wait_for(|s| *s) => return,
                }
                let now = now_unix();
                let due = me.current().tokens_due(now, retention_secs);
                if !due {
                    continue;
                }
                match me
                    .mutate(move |s| Ok((s.purge_tokens(now, retention_secs), BTreeSet::new())))
                    .await
                {
                    Ok(n) => tracing::info!(purged = n, "deleted tokens past their retention"),
                    Err(e) => tracing::warn!(error = %e, "cannot delete old tokens"),
                }
            }
        })
    }

    pub(crate) fn update_gauges(&self, state: &State) {
        self.metrics
            .clusters
            .set(i64::try_from(state.clusters.len()).unwrap_or(i64::MAX));
        self.metrics
            .networks
            .set(i64::try_from(state.networks.len()).unwrap_or(i64::MAX));
    }

    /// Apply `f` to a copy of the state; persist what it touched, recompute
    /// the views of the clusters it names, and only then make it current.
    /// If anything fails, nothing changed.
    ///
    /// Group commit: mutations that arrive while another batch is being
    /// flushed are applied in order, one after the other, and share the next
    /// flush. The work runs in a spawned task, so a caller that goes away
    /// cannot leave a half-applied batch behind.
    ///
    /// On a shared store (etcd) another replica may write first; then the
    /// batch is applied again to the reloaded state, so `f` may run more
    /// than once (it is cloned for each run).
    pub(crate) async fn mutate<T: Send + 'static>(
        &self,
        f: impl FnOnce(&mut State) -> Result<(T, BTreeSet<String>)> + Clone + Send + 'static,
    ) -> Result<T> {
        let (reply, rx) = tokio::sync::oneshot::channel();
        let op: Op = Box::new(move |s: &mut State| {
            (f.clone())(s).map(|(out, affected)| (Box::new(out) as Box<dyn Any + Send>, affected))
        });
        self.queue
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .push(Pending { op, reply });
        let me = self.clone();
        tokio::spawn(async move {
            let mut core = me.core.lock().await;
            let batch = std::mem::take(
                &mut *me
                    .queue
                    .lock()
                    .unwrap_or_else(std::sync::PoisonError::into_inner),
            );
            if !batch.is_empty() {
                me.commit(&mut core, batch).await;
            }
        });
        let out = rx
            .await
            .map_err(|_| Error::Persist("the write was abandoned".into()))??;
        out.downcast::<T>()
            .map(|b| *b)
            .map_err(|_| Error::Persist("internal type mismatch".into()))
    }

    async fn commit(&self, core: &mut Core, mut batch: Vec<Pending>) {
        let mut attempt = 0;
        let outcomes = loop {
            attempt += 1;
            let result = match crate::replica::catch_up(self, core).await {
                Ok(()) => self.try_commit(core, &mut batch).await,
                Err(e) => Err(e),
            };
            match result {
                Err(Error::Conflict) if attempt < crate::replica::MAX_ATTEMPTS => {
                    self.metrics.store_conflicts.inc();
                    tracing::debug!(
                        attempt,
                        "another replica wrote first: reloading and applying again"
                    );
                }
                Err(Error::Conflict) => {
                    break Err(Error::StoreUnavailable(format!(
                        "the store was changed by other broker replicas {attempt} times while this change was being saved: retry"
                    )));
                }
                other => break other,
            }
        };
        match outcomes {
            Ok(outcomes) => {
                for (p, out) in batch.into_iter().zip(outcomes) {
                    let _ = p.reply.send(out);
                }
            }
            Err(e) => {
                tracing::error!(error = %e, "store write failed; the batch was not applied");
                for p in batch {
                    let _ = p.reply.send(Err(match &e {
                        Error::StoreUnavailable(m) => Error::StoreUnavailable(m.clone()),
                        other => Error::Persist(other.to_string()),
                    }));
                }
            }
        }
    }

    /// Apply the batch to a copy of the state and persist it; on success
    /// the copy becomes current and each op's outcome is returned (in
    /// order). On a store error nothing changed.
    async fn try_commit(
        &self,
        core: &mut Core,
        batch: &mut [Pending],
    ) -> Result<Vec<Result<Box<dyn Any + Send>>>> {
        let mut next: Option<State> = None;
        let mut affected = BTreeSet::new();
        let mut outcomes = Vec::with_capacity(batch.len());
        let max_view = self.config.max_view_bytes.min(MAX_MESSAGE_BYTES);
        for p in batch.iter_mut() {
            let mut trial = next.as_ref().unwrap_or(&core.state).clone();
            let applied = (p.op)(&mut trial).and_then(|(out, touched)| {
                view::check_bounded(&trial, &touched, max_view).map(|()| (out, touched))
            });
            match applied {
                Ok((out, touched)) => {
                    next = Some(trial);
                    affected.extend(touched);
                    outcomes.push(Ok(out));
                }
                Err(e) => outcomes.push(Err(e)),
            }
        }
        let Some(mut next) = next else {
            // Nothing to write, and something was refused: on etcd, make
            // sure it was not refused for want of another replica's write
            // that this one has not followed yet (a token created there).
            if outcomes.iter().any(Result::is_err)
                && let Some(etcd) = core.store.etcd()
                && !etcd.is_current().await
            {
                return Err(Error::Conflict);
            }
            return Ok(outcomes);
        };
        // Copied, not drained: if this write loses a race on a shared store
        // it is applied again, last-seen times included.
        let seen: Vec<(String, i64)> = self
            .seen
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .iter()
            .map(|(name, at)| (name.clone(), *at))
            .collect();
        for (name, at) in &seen {
            next.seen(name, *at);
        }
        // One delta per affected cluster for the whole batch: the views
        // move from the last committed state to this one.
        let moved = view::advance(&core.state, &mut next, &affected);
        let dirty = next.take_dirty();
        core.store.persist(&next, &dirty).await?;
        {
            let mut pending = self
                .seen
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            for (name, at) in &seen {
                if pending.get(name) == Some(at) {
                    pending.remove(name);
                }
            }
        }
        let removed: Vec<String> = dirty
            .iter()
            .filter_map(|k| match k {
                crate::state::Key::Cluster(name) if !next.clusters.contains_key(name) => {
                    Some(name.clone())
                }
                _ => None,
            })
            .collect();
        core.state = next;
        self.committed.set(Arc::new(core.state.clone()));
        for name in removed {
            self.hub.close(&name);
            self.forget(&name);
        }
        for name in &affected {
            let Some(c) = core.state.clusters.get(name) else {
                continue;
            };
            let change = moved.get(name);
            self.hub.update(name, |p| {
                if let Some((revision, delta)) = change {
                    p.advance(*revision, delta.clone());
                }
                p.certs = certs_of(c);
            });
        }
        self.update_gauges(&core.state);
        Ok(outcomes)
    }

    /// Who the verified client certificate of this request belongs to.
    pub(crate) async fn identify<T>(&self, req: &tonic::Request<T>) -> Result<Principal> {
        let conn = req.extensions().get::<RequestConn>();
        let principal = self.identify_certs(conn)?;
        if let Some(c) = conn {
            c.get_ref().handle.authenticate();
        }
        Ok(principal)
    }

    fn identify_certs(&self, conn: Option<&RequestConn>) -> Result<Principal> {
        let certs = conn.and_then(RequestConn::peer_certs).ok_or_else(|| {
            Error::Unauthenticated(
                "this call needs a client certificate: the one Join returned, or the admin credential"
                    .into(),
            )
        })?;
        let leaf = certs
            .first()
            .ok_or_else(|| Error::Unauthenticated("empty client certificate chain".into()))?;
        let hash = sha256(leaf);
        if hash == self.pki.admin_sha256 {
            return Ok(Principal::Admin);
        }
        self.principal_for_cert(&hash)
    }

    /// The cluster a certificate hash speaks for, from the committed state:
    /// authentication never waits for the writer (a commit holds it across
    /// its flush to disk).
    pub(crate) fn principal_for_cert(&self, hash: &[u8; 32]) -> Result<Principal> {
        let name = self
            .current()
            .cluster_for_cert(hash)
            .map(str::to_owned)
            .ok_or_else(|| {
                Error::Unauthenticated(
                    "this certificate no longer speaks for any cluster (removed, or replaced by a newer join): join again with a new token"
                        .into(),
                )
            })?;
        self.seen
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .insert(name.clone(), now_unix());
        Ok(Principal::Cluster(name))
    }

    pub(crate) async fn require_cluster<T>(&self, req: &tonic::Request<T>) -> Result<String> {
        match self.identify(req).await? {
            Principal::Cluster(name) => Ok(name),
            Principal::Admin => Err(Error::PermissionDenied(
                "the admin credential cannot act as a cluster".into(),
            )),
        }
    }

    pub(crate) async fn require_admin<T>(&self, req: &tonic::Request<T>) -> Result<()> {
        match self.identify(req).await? {
            Principal::Admin => Ok(()),
            Principal::Cluster(name) => Err(Error::PermissionDenied(format!(
                "cluster {name:?} may not call admin APIs"
            ))),
        }
    }

    /// TLS for the gRPC port: the server chain, client certificates
    /// optional (a join has none) but, when given, signed by the CA; HTTP/2.
    fn tls_acceptor(&self) -> Result<tokio_rustls::TlsAcceptor> {
        use rustls::pki_types::pem::PemObject as _;
        use rustls::pki_types::{CertificateDer, PrivateKeyDer};
        let pki_err = |e: &dyn std::fmt::Display| Error::Pki(format!("server TLS setup: {e}"));
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let mut roots = rustls::RootCertStore::empty();
        roots
            .add(CertificateDer::from(self.pki.ca_der().to_vec()))
            .map_err(|e| pki_err(&e))?;
        let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
            Arc::new(roots),
            Arc::clone(&provider),
        )
        .allow_unauthenticated()
        .build()
        .map_err(|e| pki_err(&e))?;
        let chain = CertificateDer::pem_slice_iter(self.pki.server_chain_pem.as_bytes())
            .collect::<std::result::Result<Vec<_>, _>>()
            .map_err(|e| pki_err(&e))?;
        let key = PrivateKeyDer::from_pem_slice(self.pki.server_key_pem.as_bytes())
            .map_err(|e| pki_err(&e))?;
        let mut config = rustls::ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(|e| pki_err(&e))?
            .with_client_cert_verifier(verifier)
            .with_single_cert(chain, key)
            .map_err(|e| pki_err(&e))?;
        config.alpn_protocols = vec![b"h2".to_vec()];
        Ok(tokio_rustls::TlsAcceptor::from(Arc::new(config)))
    }

    /// Serve gRPC on `listener` (and metrics on `metrics`) until `shutdown`
    /// completes; then end every watch stream and drain.
    pub async fn serve(
        self,
        listener: TcpListener,
        metrics: Option<TcpListener>,
        shutdown: impl Future<Output = ()> + Send + 'static,
    ) -> Result<()> {
        let tls = self.tls_acceptor()?;
        let fd_limit = crate::conn::raise_fd_limit();
        let limits = self.config.conn.fitted(fd_limit);
        if limits.max_total < self.config.conn.max_total {
            tracing::warn!(
                fd_limit,
                max_connections = limits.max_total,
                "the open-file limit caps the connections below --max-connections"
            );
        }
        let tracker = Tracker::new(limits, Arc::clone(&self.metrics));
        let max = self.config.max_request_bytes;
        let hub = Arc::clone(&self.hub);
        let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
        let metrics_task = metrics.map(|l| {
            let router = crate::metrics::router(Arc::clone(&self.metrics));
            let mut stop = stop_rx.clone();
            tokio::spawn(async move {
                let _ = axum::serve(l, router)
                    .with_graceful_shutdown(async move {
                        let _ = stop.wait_for(|s| *s).await;
                    })
                    .await;
            })
        });
        let (conn_tx, conn_rx) = tokio::sync::mpsc::channel(64);
        let accept_task = tokio::spawn(crate::conn::accept_loop(
            listener,
            tls,
            tracker,
            conn_tx,
            stop_rx.clone(),
        ));
        let incoming = tokio_stream::wrappers::ReceiverStream::new(conn_rx);
        let sweeper = self.spawn_sweeper(stop_rx.clone());
        let stop_accepting = stop_tx.clone();
        let result = Server::builder()
            .http2_keepalive_interval(Some(Duration::from_secs(20)))
            .http2_keepalive_timeout(Some(Duration::from_secs(20)))
            .layer(self.metrics.grpc.clone())
            .add_service(
                BrokerServer::new(self.clone())
                    .max_decoding_message_size(max)
                    .max_encoding_message_size(MAX_MESSAGE_BYTES),
            )
            .add_service(
                BrokerAdminServer::new(self.clone())
                    .max_decoding_message_size(max)
                    .max_encoding_message_size(MAX_MESSAGE_BYTES),
            )
            .serve_with_incoming_shutdown(incoming, async move {
                shutdown.await;
                tracing::info!("shutting down: closing watch streams");
                let _ = stop_accepting.send(true);
                hub.shut_down();
            })
            .await
            .map_err(|e| Error::Transport(e.to_string()));
        let _ = stop_tx.send(true);
        let _ = accept_task.await;
        let _ = sweeper.await;
        if let Some(t) = metrics_task {
            let _ = t.await;
        }
        result
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn authentication_does_not_wait_for_the_writer() {
        let dir = tempfile::tempdir().unwrap();
        let broker = Broker::open(ServeConfig::new(
            dir.path().to_owned(),
            vec!["127.0.0.1:1".into()],
        ))
        .await
        .unwrap();
        broker
            .mutate(|s| {
                s.create_token("edge", "t".into(), "sec", 60, 1, 0)?;
                s.join("t", "sec", "edge", [7; 32], 1)?;
                Ok(((), BTreeSet::from(["edge".to_string()])))
            })
            .await
            .unwrap();
        // A commit in progress holds the writer's lock across its flush.
        let writer = broker.core.lock().await;
        assert_eq!(
            broker.principal_for_cert(&[7; 32]).unwrap(),
            Principal::Cluster("edge".into())
        );
        assert!(broker.principal_for_cert(&[8; 32]).is_err());
        drop(writer);
        // The last call is remembered and folded into the next commit.
        broker.mutate(|_| Ok(((), BTreeSet::new()))).await.unwrap();
        assert!(broker.current().clusters["edge"].last_seen_unix > 0);
    }
}
