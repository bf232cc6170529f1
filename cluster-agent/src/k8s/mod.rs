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
use k8s_openapi::api::core::v1::{Node, Pod, Secret};
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
    /// Without a stored identity or a join string: run without a broker,
    /// with node tunnel IPs from this subnet.
    pub tunnel_subnet: Option<ipnet::Ipv4Net>,
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

/// How long a Lease holds without renewal.
pub const LEASE_DURATION: Duration = Duration::from_secs(15);
/// How often the leader renews, and a standby retries.
pub const LEASE_RETRY: Duration = Duration::from_secs(2);
/// A leader that could not renew for this long gives up, well before the
/// Lease runs out and another replica may take it.
pub const LEASE_RENEW_DEADLINE: Duration = Duration::from_secs(10);
/// Label on the leading replica's pod; the node-sync Service selects it.
pub const LEADER_LABEL: &str = "l2mesh.io/node-sync";

/// Run as the cluster's controller until `shutdown` or loss of the lease.
/// NodeSync binds `node_sync_listen` only once this replica leads, and the
/// replica's pod is labelled `l2mesh.io/node-sync: leader` while it serves,
/// so the Service sends nodes to the leader alone. On shutdown or loss of
/// the lease, serving and publishing stop first, then the label goes, then
/// the lease is released so that a standby takes over at once.
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
        duration_secs: i32::try_from(LEASE_DURATION.as_secs()).unwrap_or(15),
    };
    tracing::info!(me = %lock.me, "waiting for the leader lease");
    let wait = async {
        while !lock.try_acquire_or_renew().await? {
            tokio::time::sleep(LEASE_RETRY).await;
        }
        Ok::<_, KubeError>(())
    };
    tokio::select! {
        r = wait => r?,
        () = shutdown.clone() => return Ok(()),
    }
    tracing::info!("leader");
    let lost = Arc::new(tokio::sync::Notify::new());
    let stop = {
        let (shutdown, lost) = (shutdown.clone(), lost.clone());
        futures::FutureExt::shared(Box::pin(async move {
            tokio::select! {
                () = shutdown => {}
                () = lost.notified() => {}
            }
        }))
    };
    // The lease is renewed from the start: joining a broker that is down
    // may take longer than the lease lasts.
    let leading = lead(client.clone(), &mut config, node_sync_listen, stop);
    tokio::pin!(leading);
    let result = tokio::select! {
        r = &mut leading => r,
        () = hold(&lock) => {
            tracing::error!("lost the leader lease: stopping node sync and publishing");
            lost.notify_one();
            // `lead` ends the node watches and its tasks on `stop`.
            let _ = tokio::time::timeout(Duration::from_secs(5), &mut leading).await;
            Err(KubeError::LostLease)
        }
    };
    if let Err(e) = lock.release().await {
        tracing::warn!(error = %e, "cannot release the leader lease");
    }
    result
}

/// Keep renewing the lease; returns when it is lost: another holder, or no
/// successful renewal for [`LEASE_RENEW_DEADLINE`].
async fn hold(lock: &lease::LeaseLock) {
    let mut last_renewed = tokio::time::Instant::now();
    loop {
        tokio::time::sleep(LEASE_RETRY).await;
        match lock.try_acquire_or_renew().await {
            Ok(true) => last_renewed = tokio::time::Instant::now(),
            Ok(false) => return,
            Err(e) => {
                tracing::warn!(error = %e, "lease renewal failed");
                if last_renewed.elapsed() >= LEASE_RENEW_DEADLINE {
                    return;
                }
            }
        }
    }
}

/// Keep this replica's pod labelled as the node-sync leader (retrying
/// until the patch succeeds); pending forever afterwards.
async fn label_leader(pods: Api<Pod>, pod: String) {
    let mut backoff = Backoff::default();
    loop {
        match set_leader_label(&pods, &pod, true).await {
            Ok(()) => {
                tracing::info!(pod, "labelled {LEADER_LABEL}=leader");
                return std::future::pending().await;
            }
            Err(e) => {
                let delay = backoff.next_delay();
                tracing::warn!(pod, error = %e, ?delay, "cannot label this pod as the node-sync leader; retrying");
                tokio::time::sleep(delay).await;
            }
        }
    }
}

async fn set_leader_label(pods: &Api<Pod>, pod: &str, on: bool) -> Result<(), kube::Error> {
    let value = if on {
        serde_json::Value::from("leader")
    } else {
        serde_json::Value::Null
    };
    let patch = serde_json::json!({"metadata": {"labels": {LEADER_LABEL: value}}});
    pods.patch(
        pod,
        &kube::api::PatchParams::default(),
        &kube::api::Patch::Merge(&patch),
    )
    .await
    .map(drop)
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
    // A stored identity or a join string: with the broker. Neither, but a
    // tunnel subnet: a local-only cluster (multi-cluster networks wait).
    let id = if config.join_string.is_none()
        && config.tunnel_subnet.is_some()
        && secrets::load_identity(&secrets_api).await?.is_none()
    {
        tracing::info!("no identity and no join string: running without a broker");
        None
    } else {
        tokio::select! {
            r = identity(&secrets_api, config.join_string.as_ref()) => Some(r?),
            () = shutdown.clone() => return Ok(()),
        }
    };
    let subnet = match (&id, config.tunnel_subnet) {
        (Some(id), _) => id.tunnel_subnet.parse().map_err(|_| {
            KubeError::State(format!(
                "stored tunnel subnet {:?} is invalid",
                id.tunnel_subnet
            ))
        })?,
        (None, Some(subnet)) => subnet,
        (None, None) => {
            return Err(KubeError::State(
                "no tunnel subnet: join a broker or pass --tunnel-subnet".into(),
            ));
        }
    };
    let pki = secrets::load_or_create_pki(&secrets_api).await?;
    // The Secrets are read in full before the engine starts: it never
    // works from allocations it has not loaded.
    let allocs = secrets::SecretAllocStore::new(secrets_api.clone()).await?;
    let (sink, sink_task) = controller::K8sStatusSink::new(client.clone());
    let shared = Arc::new(
        Shared::new(subnet, Box::new(allocs), Box::new(sink), id.is_some())
            .map_err(KubeError::State)?
            .with_gateway_timeout(config.gateway_timeout),
    );
    let mut tasks = tokio::task::JoinSet::new();
    if let Some(addr) = &config.metrics_listen {
        tasks.spawn(crate::standalone::serve_metrics(
            addr.clone(),
            shared.clone(),
        ));
    }
    tasks.spawn(sink_task);
    if let Some(id) = id {
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
    }
    tasks.spawn(shared.clone().run());
    let engine = shared.clone();
    tasks.spawn(mirror(
        Api::<Node>::all(client.clone()),
        "Node",
        move |nodes| {
            let mut nodes: Vec<NodeEntry> = nodes.iter().map(|n| node_entry(n)).collect();
            nodes.sort_by(|a, b| a.name.cmp(&b.name));
            engine.set_nodes(nodes);
        },
    ));
    let engine = shared.clone();
    tasks.spawn(mirror(
        Api::<L2Network>::all(client.clone()),
        "L2Network",
        move |nets| {
            // A network being deleted is gone for the engine: it leaves the
            // nodes and the broker request, then the finalizer lets it go.
            engine.set_networks(
                nets.iter()
                    .filter(|n| n.metadata.deletion_timestamp.is_none())
                    .map(|n| (**n).clone())
                    .collect(),
            );
        },
    ));
    // The NADs as they are, so that the controller writes only those that
    // must change.
    let (nad_store, nad_writer) = reflector::store();
    tasks.spawn(
        watcher(
            Api::<nad::NetworkAttachmentDefinition>::all(client.clone()),
            watcher::Config::default(),
        )
        .default_backoff()
        .reflect(nad_writer)
        .for_each(|_| std::future::ready(())),
    );
    let ctx = Arc::new(
        controller::Context::new(client.clone(), shared.clone()).with_nad_store(nad_store),
    );
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
    let engine_of_lead = shared.clone();
    let pods: Api<Pod> = Api::namespaced(client.clone(), &config.namespace);
    tasks.spawn(label_leader(pods.clone(), config.pod_name.clone()));
    let (shutdown, stop) = crate::nodesync::stopping_watches(shutdown);
    let server = tonic::transport::Server::builder()
        .tls_config(pki.server_tls())?
        .add_service(
            NodeSyncService::new(shared.clone())
                .stop_on(stop)
                .into_server(pki.token.clone()),
        )
        .serve_with_incoming_shutdown(
            tokio_stream::wrappers::TcpListenerStream::new(listener),
            shutdown,
        );
    let result = server.await.map_err(KubeError::from);
    // Serving and publishing stop first; then the Service stops choosing
    // this pod.
    tasks.abort_all();
    warn_unsaved(&engine_of_lead);
    match tokio::time::timeout(
        Duration::from_secs(5),
        set_leader_label(&pods, &config.pod_name, false),
    )
    .await
    {
        // The pod is gone: so is its label.
        Ok(Ok(())) => {}
        Ok(Err(kube::Error::Api(s))) if s.code == 404 => {}
        Ok(Err(e)) => tracing::warn!(error = %e, "cannot remove the leader label"),
        Err(_) => tracing::warn!("cannot remove the leader label: the API server did not answer"),
    }
    result
}

/// Said when leading ends: allocations made but not saved were never
/// published, so the next leader starts from what the Secret holds and
/// the nodes use.
fn warn_unsaved(shared: &Shared) {
    if shared.pending_save() {
        tracing::warn!(
            "allocations changed since the last save were not published and are dropped; the next leader recomputes them"
        );
    }
}

/// Mirror a kind into the engine: `set` gets the complete list once the
/// initial list is in (and again after a relist when a watch dropped), then
/// after every change; never a partial list.
async fn mirror<K>(api: Api<K>, kind: &'static str, mut set: impl FnMut(Vec<Arc<K>>) + Send)
where
    K: kube::Resource
        + Clone
        + serde::de::DeserializeOwned
        + std::fmt::Debug
        + Send
        + Sync
        + 'static,
    K::DynamicType: Default + Eq + std::hash::Hash + Clone,
{
    let (reader, writer) = reflector::store();
    let stream = reflector(writer, watcher(api, watcher::Config::default())).default_backoff();
    futures::pin_mut!(stream);
    let mut last_error = String::new();
    while let Some(item) = stream.next().await {
        match item {
            // During a (re)list the store only changes at InitDone.
            Ok(watcher::Event::Init | watcher::Event::InitApply(_)) => {}
            Ok(_) => {
                last_error.clear();
                set(reader.state());
            }
            Err(e) => {
                let text = e.to_string();
                if text != last_error {
                    tracing::warn!(kind, error = %text, "watch failed; retrying");
                    last_error = text;
                }
            }
        }
    }
}
