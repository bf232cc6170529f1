//! Kubernetes mode: the same engine as standalone mode, fed by the API
//! server (L2Networks, Nodes), with the identity and allocations in Secrets,
//! status patched on the L2Networks, a NAD per L2Network, events, and a Lease
//! so that only one replica acts.

pub mod controller;
pub mod lease;
pub mod nad;
pub mod secrets;
#[cfg(test)]
mod tests;

use crate::crd::L2Network;
use crate::desired::NodeEntry;
use crate::engine::Shared;
use crate::identity::{self, Backoff, JoinError};
use crate::nodesync::NodeSyncService;
use futures::StreamExt as _;
use k8s_openapi::api::core::v1::{Node, Secret};
use kube::runtime::{Controller, WatchStreamExt as _, reflector, watcher};
use kube::{Api, Client};
use l2mesh_proto::join::JoinString;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

/// Node label that makes a node a gateway.
pub const GATEWAY_LABEL: &str = "l2mesh.io/gateway";
/// Node annotation with the underlay `ip:port` other nodes should use.
pub const ENDPOINT_ANNOTATION: &str = "l2mesh.io/endpoint";
/// Name of the leader-election Lease.
pub const LEASE_NAME: &str = "l2mesh-agent";

/// Kubernetes-mode settings.
#[derive(Debug)]
pub struct KubeConfig {
    pub namespace: String,
    /// This replica's identity in the Lease (the pod name).
    pub pod_name: String,
    pub join_string: Option<JoinString>,
    /// Where to serve `/metrics` and `/healthz`; `None` disables it.
    pub metrics_listen: Option<String>,
    /// Told the NodeSync address once this replica leads and listens
    /// (tests and tools that bind port 0).
    pub on_listening: Option<tokio::sync::oneshot::Sender<std::net::SocketAddr>>,
    /// A gateway silent this long (or whose watch closed) hands the remote
    /// tunnels to a standby gateway.
    pub gateway_timeout: Duration,
}

/// Why Kubernetes mode stopped.
#[derive(Debug, thiserror::Error)]
pub enum KubeError {
    #[error("Kubernetes API: {0}")]
    Kube(#[from] kube::Error),
    #[error(transparent)]
    Secret(#[from] secrets::SecretError),
    #[error(transparent)]
    Join(#[from] JoinError),
    #[error("{0}")]
    State(String),
    #[error("lost the leader lease; exiting so that a single replica acts")]
    LostLease,
    #[error("the node sync server failed: {0}")]
    Serve(#[from] tonic::transport::Error),
}

/// A Node as the engine sees it.
#[must_use]
pub fn node_entry(node: &Node) -> NodeEntry {
    let meta = &node.metadata;
    NodeEntry {
        name: meta.name.clone().unwrap_or_default(),
        gateway: meta
            .labels
            .as_ref()
            .and_then(|l| l.get(GATEWAY_LABEL))
            .is_some_and(|v| v == "true"),
        endpoint: meta
            .annotations
            .as_ref()
            .and_then(|a| a.get(ENDPOINT_ANNOTATION))
            .cloned(),
    }
}

async fn identity(
    secrets: &Api<Secret>,
    js: Option<&JoinString>,
) -> Result<identity::Identity, KubeError> {
    if let Some(id) = secrets::load_identity(secrets).await? {
        return Ok(id);
    }
    let js =
        js.ok_or_else(|| JoinError::NoJoinString(format!("Secret {}", secrets::IDENTITY_SECRET)))?;
    let mut backoff = Backoff::default();
    loop {
        match identity::join_once(js).await {
            Ok(id) => {
                secrets::store_identity(secrets, &id).await?;
                tracing::info!(cluster = %id.cluster, "joined the broker");
                return Ok(id);
            }
            Err(e) if e.retryable() => {
                let delay = backoff.next_delay();
                tracing::warn!(error = %e, ?delay, "join failed");
                tokio::time::sleep(delay).await;
            }
            Err(e) => return Err(e.into()),
        }
    }
}

/// Run as the cluster's controller until `shutdown` or loss of the lease.
/// NodeSync binds `node_sync_listen` only once this replica leads, so a
/// readiness probe on that port marks the leader alone ready and the
/// Service sends nodes to it. On shutdown the lease is released so that a
/// standby replica takes over at once instead of after the lease runs out.
pub async fn run(
    client: Client,
    mut config: KubeConfig,
    node_sync_listen: &str,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), KubeError> {
    let shutdown = futures::FutureExt::shared(Box::pin(shutdown));
    let lock = lease::LeaseLock {
        api: Api::namespaced(client.clone(), &config.namespace),
        name: LEASE_NAME.into(),
        me: config.pod_name.clone(),
        duration_secs: 15,
    };
    tracing::info!(me = %lock.me, "waiting for the leader lease");
    let wait = async {
        while !lock.try_acquire_or_renew().await? {
            tokio::time::sleep(Duration::from_secs(5)).await;
        }
        Ok::<_, KubeError>(())
    };
    tokio::select! {
        r = wait => r?,
        () = shutdown.clone() => return Ok(()),
    }
    tracing::info!("leader");
    // The lease is renewed from the start: joining a broker that is down
    // may take longer than the lease lasts.
    let result = tokio::select! {
        r = lead(client, &mut config, node_sync_listen, shutdown) => r,
        () = hold(&lock) => Err(KubeError::LostLease),
    };
    if let Err(e) = lock.release().await {
        tracing::warn!(error = %e, "cannot release the leader lease");
    }
    result
}

/// Keep renewing the lease; returns when it is lost.
async fn hold(lock: &lease::LeaseLock) {
    let mut failures = 0u32;
    loop {
        tokio::time::sleep(Duration::from_secs(5)).await;
        match lock.try_acquire_or_renew().await {
            Ok(true) => failures = 0,
            Ok(false) => return,
            // A blip is fine while the lease (15 s) has not run out.
            Err(e) => {
                failures += 1;
                tracing::warn!(error = %e, "lease renewal failed");
                if failures >= 2 {
                    return;
                }
            }
        }
    }
}

async fn lead(
    client: Client,
    config: &mut KubeConfig,
    node_sync_listen: &str,
    shutdown: impl Future<Output = ()> + Clone + Send + 'static,
) -> Result<(), KubeError> {
    let listener = tokio::net::TcpListener::bind(node_sync_listen)
        .await
        .map_err(|e| KubeError::State(format!("cannot listen on {node_sync_listen}: {e}")))?;
    if let (Some(tx), Ok(addr)) = (config.on_listening.take(), listener.local_addr()) {
        let _ = tx.send(addr);
    }
    let secrets_api: Api<Secret> = Api::namespaced(client.clone(), &config.namespace);
    let id = tokio::select! {
        r = identity(&secrets_api, config.join_string.as_ref()) => r?,
        () = shutdown.clone() => return Ok(()),
    };
    let subnet = id.tunnel_subnet.parse().map_err(|_| {
        KubeError::State(format!(
            "stored tunnel subnet {:?} is invalid",
            id.tunnel_subnet
        ))
    })?;
    let pki = secrets::load_or_create_pki(&secrets_api).await?;
    let (allocs, allocs_task) = secrets::SecretAllocStore::new(secrets_api.clone()).await?;
    let (sink, sink_task) = controller::K8sStatusSink::new(client.clone());
    let shared = Arc::new(
        Shared::new(subnet, Box::new(allocs), Box::new(sink), true)
            .map_err(KubeError::State)?
            .with_gateway_timeout(config.gateway_timeout),
    );
    let mut tasks = tokio::task::JoinSet::new();
    if let Some(addr) = &config.metrics_listen {
        tasks.spawn(crate::standalone::serve_metrics(
            addr.clone(),
            shared.metrics.clone(),
        ));
    }
    tasks.spawn(allocs_task);
    tasks.spawn(sink_task);
    let api = secrets_api.clone();
    let store: crate::broker_link::StoreIdentity = Arc::new(move |id| {
        let api = api.clone();
        Box::pin(async move {
            secrets::store_identity(&api, &id)
                .await
                .map_err(|e| e.to_string())
        })
    });
    tasks.spawn(crate::broker_link::run(id, shared.clone(), store));
    tasks.spawn(reconcile_loop(shared.clone()));
    tasks.spawn(watch_nodes(client.clone(), shared.clone()));
    let ctx = Arc::new(controller::Context::new(client.clone(), shared.clone()));
    let nets: Api<L2Network> = Api::all(client.clone());
    let nads: Api<nad::NetworkAttachmentDefinition> = Api::all(client.clone());
    tasks.spawn(
        Controller::new(nets, watcher::Config::default())
            .owns(nads, watcher::Config::default())
            .run(controller::reconcile, controller::error_policy, ctx)
            .for_each(|res| async move {
                if let Err(e) = res {
                    tracing::debug!(error = %e, "controller");
                }
            }),
    );
    let (shutdown, stop) = crate::nodesync::stopping_watches(shutdown);
    let server = tonic::transport::Server::builder()
        .tls_config(pki.server_tls())?
        .add_service(
            NodeSyncService::new(shared)
                .stop_on(stop)
                .into_server(pki.token.clone()),
        )
        .serve_with_incoming_shutdown(
            tokio_stream::wrappers::TcpListenerStream::new(listener),
            shutdown,
        );
    let result = server.await.map_err(KubeError::from);
    tasks.abort_all();
    result
}

async fn reconcile_loop(shared: Arc<Shared>) {
    loop {
        for p in shared.reconcile() {
            tracing::debug!(problem = %p, "reconcile");
        }
        shared.next_change().await;
    }
}

async fn watch_nodes(client: Client, shared: Arc<Shared>) {
    let api: Api<Node> = Api::all(client);
    let (reader, writer) = reflector::store();
    let stream = reflector(writer, watcher(api, watcher::Config::default())).default_backoff();
    futures::pin_mut!(stream);
    while let Some(item) = stream.next().await {
        match item {
            // During a (re)list the store only changes at InitDone.
            Ok(watcher::Event::Init | watcher::Event::InitApply(_)) => {}
            Ok(_) => {
                let mut nodes: Vec<NodeEntry> =
                    reader.state().iter().map(|n| node_entry(n)).collect();
                nodes.sort_by(|a, b| a.name.cmp(&b.name));
                shared.set_nodes(nodes);
            }
            Err(e) => tracing::warn!(error = %e, "node watch"),
        }
    }
}
