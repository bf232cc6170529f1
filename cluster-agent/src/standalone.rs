//! Standalone mode: intent from a manifest directory (polled), identity in
//! the state dir, NodeSync over TLS on a TCP listener, status files.

use crate::engine::{FileStatusSink, Shared};
use crate::identity::{self, JoinError};
use crate::manifests;
use crate::nodesync::NodeSyncService;
use crate::tls::{NodeSyncPki, TlsError};
use ipnet::Ipv4Net;
use l2mesh_proto::join::JoinString;
use std::future::Future;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

/// `<state-dir>/node-sync/<this>` holds the address NodeSync listens on.
pub const LISTEN_ADDR_FILE: &str = "listen-addr";

/// Everything standalone mode needs.
#[derive(Debug)]
pub struct Config {
    pub manifests: PathBuf,
    pub state_dir: PathBuf,
    pub join_string: Option<JoinString>,
    /// Without a broker: the tunnel subnet to use (multi-cluster networks wait).
    pub local_tunnel_subnet: Option<Ipv4Net>,
    pub poll_interval: Duration,
    /// Where to serve `/metrics` and `/healthz`; `None` disables it.
    pub metrics_listen: Option<String>,
    /// A gateway silent this long (or whose watch closed) hands the remote
    /// tunnels to a standby gateway.
    pub gateway_timeout: Duration,
}

/// Why standalone mode stopped.
#[derive(Debug, thiserror::Error)]
pub enum StandaloneError {
    #[error(transparent)]
    Join(#[from] JoinError),
    #[error(transparent)]
    Tls(#[from] TlsError),
    #[error("{0}")]
    State(String),
    #[error("the node sync server failed: {0}")]
    Serve(#[from] tonic::transport::Error),
}

/// Run until `shutdown` completes.
pub async fn run(
    config: Config,
    listener: tokio::net::TcpListener,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), StandaloneError> {
    std::fs::create_dir_all(&config.state_dir)
        .map_err(|e| StandaloneError::State(format!("{}: {e}", config.state_dir.display())))?;
    let stored = identity::Identity::load(&config.state_dir)?;
    let identity = if stored.is_some() || config.join_string.is_some() {
        Some(identity::onboard(&config.state_dir, config.join_string.as_ref()).await?)
    } else if config.local_tunnel_subnet.is_some() {
        None
    } else {
        return Err(JoinError::NoJoinString(config.state_dir.display().to_string()).into());
    };
    let subnet = match (&identity, config.local_tunnel_subnet) {
        (Some(id), _) => id.tunnel_subnet.parse().map_err(|_| {
            StandaloneError::State(format!(
                "stored tunnel subnet {:?} is invalid",
                id.tunnel_subnet
            ))
        })?,
        (None, Some(s)) => s,
        (None, None) => unreachable_subnet()?,
    };
    let pki = NodeSyncPki::load_or_create(&config.state_dir)?;
    let shared = Arc::new(
        Shared::new(
            subnet,
            Box::new(crate::engine::FileAllocStore(
                config.state_dir.join("allocations.json"),
            )),
            Box::new(FileStatusSink {
                dir: config.state_dir.join("status"),
            }),
            identity.is_some(),
        )
        .map_err(StandaloneError::State)?
        .with_gateway_timeout(config.gateway_timeout),
    );
    let mut tasks = tokio::task::JoinSet::new();
    if let Some(addr) = &config.metrics_listen {
        tasks.spawn(serve_metrics(addr.clone(), shared.clone()));
    }
    tasks.spawn(watch_manifests(
        config.manifests.clone(),
        config.poll_interval,
        shared.clone(),
    ));
    tasks.spawn(shared.clone().run());
    if let Some(id) = identity {
        let dir = config.state_dir.clone();
        let store: crate::broker_link::StoreIdentity = Arc::new(move |id: identity::Identity| {
            let dir = dir.clone();
            Box::pin(async move { id.save(&dir).map_err(|e| e.to_string()) })
        });
        tasks.spawn(crate::broker_link::run(id, shared.clone(), store));
    }
    // Tools and tests that bind port 0 learn the real address from this file.
    if let Ok(addr) = listener.local_addr() {
        crate::tls::write_private(&pki.dir, LISTEN_ADDR_FILE, &addr.to_string(), 0o644)?;
    }
    tracing::info!(
        addr = ?listener.local_addr().ok(),
        ca = %pki.dir.join(NodeSyncPki::CA_FILE).display(),
        "serving node sync"
    );
    let (shutdown, stop) = crate::nodesync::stopping_watches(shutdown);
    let result = tonic::transport::Server::builder()
        .tls_config(pki.server_tls())?
        .add_service(
            NodeSyncService::new(shared)
                .stop_on(stop)
                .into_server(pki.token.clone()),
        )
        .serve_with_incoming_shutdown(
            tokio_stream::wrappers::TcpListenerStream::new(listener),
            shutdown,
        )
        .await;
    tasks.abort_all();
    result.map_err(Into::into)
}

fn unreachable_subnet() -> Result<Ipv4Net, StandaloneError> {
    Err(StandaloneError::State(
        "no tunnel subnet: join a broker or pass --tunnel-subnet".into(),
    ))
}

/// Serve metrics and the link table; a failure is logged and does not
/// stop the agent.
pub async fn serve_metrics(addr: String, shared: Arc<Shared>) {
    let metrics = shared.metrics.clone();
    let links: crate::metrics::LinkTable = Arc::new(move || shared.link_table());
    match tokio::net::TcpListener::bind(&addr).await {
        Ok(listener) => {
            if let Err(e) = crate::metrics::serve(listener, metrics, links).await {
                tracing::error!(%addr, error = %e, "metrics endpoint stopped");
            }
        }
        Err(e) => tracing::error!(%addr, error = %e, "cannot serve metrics"),
    }
}

async fn watch_manifests(dir: PathBuf, every: Duration, shared: Arc<Shared>) {
    let mut last: Option<Vec<(PathBuf, String)>> = None;
    let mut last_error = String::new();
    loop {
        match manifests::read_dir(&dir) {
            Ok(files) if last.as_ref() != Some(&files) => {
                match manifests::parse(&dir, &files) {
                    Ok(m) => {
                        tracing::info!(
                            nodes = m.nodes.len(),
                            networks = m.networks.len(),
                            "manifests loaded"
                        );
                        shared.set_intent(m.nodes, m.networks);
                        last_error.clear();
                    }
                    Err(e) => {
                        // Keep the previous intent: half a change is worse than none.
                        if e.to_string() != last_error {
                            tracing::error!(error = %e, "manifests not applied");
                            last_error = e.to_string();
                        }
                    }
                }
                last = Some(files);
            }
            Ok(_) => {}
            Err(e) => {
                if e.to_string() != last_error {
                    tracing::error!(error = %e, "manifests not readable");
                    last_error = e.to_string();
                }
            }
        }
        tokio::time::sleep(every).await;
    }
}
