//! The running broker: shared state behind one lock, persistence before
//! acknowledgement, fan-out of views, and the TLS gRPC + metrics servers.

use crate::error::{Error, Result};
use crate::hub::{Hub, Published};
use crate::limiter::JoinLimiter;
use crate::metrics::Metrics;
use crate::pki::Pki;
use crate::state::{Principal, State, sha256};
use crate::store::Store;
use crate::view;
use l2mesh_proto::broker::broker_admin_server::BrokerAdminServer;
use l2mesh_proto::broker::broker_server::BrokerServer;
use std::any::Any;
use std::collections::BTreeSet;
use std::future::Future;
use std::path::PathBuf;
use std::sync::{Arc, Mutex as StdMutex};
use std::time::Duration;
use tokio::net::TcpListener;
use tokio::sync::Mutex;
use tonic::transport::{Certificate, Identity, Server, ServerTlsConfig};

/// How the broker runs.
#[derive(Clone, Debug)]
pub struct ServeConfig {
    /// Holds `store/`, the CA and the admin credential.
    pub data_dir: PathBuf,
    /// `host:port` addresses put in join strings and the server certificate.
    pub advertise: Vec<String>,
    /// TTL of tokens created without one.
    pub default_token_ttl: Duration,
    /// Failed joins allowed per source address per minute (0: no limit).
    pub join_failures_per_minute: u32,
    /// Largest accepted request message.
    pub max_request_bytes: usize,
}

impl ServeConfig {
    /// Defaults for a data dir and advertised addresses.
    #[must_use]
    pub fn new(data_dir: PathBuf, advertise: Vec<String>) -> Self {
        Self {
            data_dir,
            advertise,
            default_token_ttl: Duration::from_secs(3600),
            join_failures_per_minute: 10,
            max_request_bytes: 1 << 20,
        }
    }
}

/// Unix time now, in seconds.
#[must_use]
pub fn now_unix() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX))
}

type Op = Box<dyn FnOnce(&mut State) -> Result<(Box<dyn Any + Send>, BTreeSet<String>)> + Send>;

/// A queued mutation and where its answer goes.
pub(crate) struct Pending {
    op: Op,
    reply: tokio::sync::oneshot::Sender<Result<Box<dyn Any + Send>>>,
}

pub(crate) struct Core {
    pub(crate) state: State,
    store: Store,
}

/// The broker: clone it freely, it is a handle.
#[derive(Clone)]
pub struct Broker {
    pub(crate) core: Arc<Mutex<Core>>,
    queue: Arc<StdMutex<Vec<Pending>>>,
    pub(crate) pki: Arc<Pki>,
    pub(crate) hub: Arc<Hub>,
    pub(crate) limiter: Arc<StdMutex<JoinLimiter>>,
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
        let store = Store::open(&config.data_dir.join("store"))?;
        let mut state = store.load()?;
        let all: BTreeSet<String> = state.clusters.keys().cloned().collect();
        let views = view::refresh(&mut state, &all);
        let dirty = state.take_dirty();
        store.persist(&state, &dirty).await?;
        let broker = Self {
            core: Arc::new(Mutex::new(Core { state, store })),
            queue: Arc::default(),
            pki: Arc::new(pki),
            hub: Arc::new(Hub::default()),
            limiter: Arc::new(StdMutex::new(JoinLimiter::new(
                config.join_failures_per_minute,
                60,
            ))),
            metrics: Arc::new(Metrics::default()),
            config: Arc::new(config),
        };
        {
            let core = broker.core.lock().await;
            broker.publish(&core.state, views);
            broker.update_gauges(&core.state);
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

    fn publish(&self, state: &State, views: Vec<l2mesh_proto::broker::ClusterView>) {
        for v in views {
            if let Some(c) = state.clusters.get(&v.cluster_name) {
                let name = v.cluster_name.clone();
                self.hub.publish(
                    &name,
                    Published {
                        view: Arc::new(v),
                        cert: c.cert_sha256,
                    },
                );
            }
        }
    }

    fn update_gauges(&self, state: &State) {
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
    pub(crate) async fn mutate<T: Send + 'static>(
        &self,
        f: impl FnOnce(&mut State) -> Result<(T, BTreeSet<String>)> + Send + 'static,
    ) -> Result<T> {
        let (reply, rx) = tokio::sync::oneshot::channel();
        let op: Op = Box::new(move |s: &mut State| {
            f(s).map(|(out, affected)| (Box::new(out) as Box<dyn Any + Send>, affected))
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

    async fn commit(&self, core: &mut Core, batch: Vec<Pending>) {
        let mut next: Option<State> = None;
        let mut affected = BTreeSet::new();
        let mut done = Vec::with_capacity(batch.len());
        for p in batch {
            let mut trial = next.as_ref().unwrap_or(&core.state).clone();
            match (p.op)(&mut trial) {
                Ok((out, aff)) => {
                    next = Some(trial);
                    affected.extend(aff);
                    done.push((p.reply, out));
                }
                Err(e) => {
                    let _ = p.reply.send(Err(e));
                }
            }
        }
        let Some(mut next) = next else { return };
        let views = view::refresh(&mut next, &affected);
        let dirty = next.take_dirty();
        if let Err(e) = core.store.persist(&next, &dirty).await {
            tracing::error!(error = %e, "store write failed; the batch was not applied");
            for (reply, _) in done {
                let _ = reply.send(Err(Error::Persist(e.to_string())));
            }
            return;
        }
        let removed: Vec<String> = core
            .state
            .clusters
            .keys()
            .filter(|k| !next.clusters.contains_key(*k))
            .cloned()
            .collect();
        core.state = next;
        for name in removed {
            self.hub.close(&name);
        }
        self.publish(&core.state, views);
        self.update_gauges(&core.state);
        for (reply, out) in done {
            let _ = reply.send(Ok(out));
        }
    }

    /// Who the verified client certificate of this request belongs to.
    pub(crate) async fn identify<T>(&self, req: &tonic::Request<T>) -> Result<Principal> {
        let certs = req.peer_certs().ok_or_else(|| {
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
        let mut core = self.core.lock().await;
        let name = core
            .state
            .cluster_for_cert(&hash)
            .map(str::to_owned)
            .ok_or_else(|| {
                Error::Unauthenticated(
                    "this certificate no longer speaks for any cluster (removed, or replaced by a newer join): join again with a new token"
                        .into(),
                )
            })?;
        core.state.seen(&name, now_unix());
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

    /// Serve gRPC on `listener` (and metrics on `metrics`) until `shutdown`
    /// completes; then end every watch stream and drain.
    pub async fn serve(
        self,
        listener: TcpListener,
        metrics: Option<TcpListener>,
        shutdown: impl Future<Output = ()> + Send + 'static,
    ) -> Result<()> {
        let tls = ServerTlsConfig::new()
            .identity(Identity::from_pem(
                &self.pki.server_chain_pem,
                &self.pki.server_key_pem,
            ))
            .client_ca_root(Certificate::from_pem(self.pki.ca_pem()))
            .client_auth_optional(true)
            .timeout(Duration::from_secs(10));
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
        // `Server::tcp_nodelay` only applies to listeners tonic binds itself;
        // without it every small response waits ~40 ms for Nagle/delayed ACK.
        let incoming = futures::StreamExt::map(
            tokio_stream::wrappers::TcpListenerStream::new(listener),
            |conn| {
                conn.inspect(|s| {
                    if let Err(e) = s.set_nodelay(true) {
                        tracing::debug!(error = %e, "cannot set TCP_NODELAY");
                    }
                })
            },
        );
        let result = Server::builder()
            .tls_config(tls)
            .map_err(|e| Error::Transport(e.to_string()))?
            .tcp_nodelay(true)
            .http2_keepalive_interval(Some(Duration::from_secs(20)))
            .http2_keepalive_timeout(Some(Duration::from_secs(20)))
            .layer(self.metrics.grpc.clone())
            .add_service(
                BrokerServer::new(self.clone())
                    .max_decoding_message_size(max)
                    .max_encoding_message_size(256 << 20),
            )
            .add_service(
                BrokerAdminServer::new(self.clone())
                    .max_decoding_message_size(max)
                    .max_encoding_message_size(256 << 20),
            )
            .serve_with_incoming_shutdown(incoming, async move {
                shutdown.await;
                tracing::info!("shutting down: closing watch streams");
                hub.shut_down();
            })
            .await
            .map_err(|e| Error::Transport(e.to_string()));
        let _ = stop_tx.send(true);
        if let Some(t) = metrics_task {
            let _ = t.await;
        }
        result
    }
}
