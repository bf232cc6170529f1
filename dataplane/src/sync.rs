//! The NodeSync client: holds a watch on the cluster agent, applies every
//! desired state it sends, reports status back, and reconnects forever with
//! backoff while the last applied state keeps forwarding.
//!
//! The CA and token files are read again before every connection attempt:
//! when the agent's credentials are regenerated, kubelet updates the
//! mounted Secret and the next reconnect uses the new files. A TLS or token
//! failure is logged as such, naming the file to check.

use std::future::Future;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use l2mesh_proto::node::node_sync_client::NodeSyncClient;
use l2mesh_proto::node::{ApplyResult, DesiredState, NodeHello, NodeStatus};
use tonic::metadata::MetadataValue;
use tonic::transport::{Certificate, ClientTlsConfig, Endpoint};

use crate::Error;
use crate::daemon::Daemon;

/// The name the agent's certificate must carry.
pub const AGENT_SERVER_NAME: &str = "l2mesh-agent";
const REPORT_EVERY: Duration = Duration::from_secs(5);
/// How often the node's public key is compared with the one last reported: a
/// rotated key must reach the agent (and through it every peer) at once, since
/// peers cannot handshake with us again until they have it.
const KEY_CHECK_EVERY: Duration = Duration::from_millis(250);
const MAX_BACKOFF: Duration = Duration::from_secs(30);

/// What the sync loop needs from the dataplane (the daemon, or a fake in tests).
pub trait Applier: Send + Sync + 'static {
    fn apply(&self, d: DesiredState) -> impl Future<Output = Result<ApplyResult, Error>> + Send;
    fn status(&self) -> impl Future<Output = Result<NodeStatus, Error>> + Send;
    /// The node's current WireGuard public key (cheap; polled).
    fn public_key(&self) -> [u8; 32];
}

impl Applier for Arc<Daemon> {
    fn apply(&self, d: DesiredState) -> impl Future<Output = Result<ApplyResult, Error>> + Send {
        Daemon::apply(self, d)
    }

    fn status(&self) -> impl Future<Output = Result<NodeStatus, Error>> + Send {
        Daemon::status(self)
    }

    fn public_key(&self) -> [u8; 32] {
        Daemon::public_key(self)
    }
}

/// How to reach the agent.
#[derive(Clone, Debug)]
pub struct SyncOptions {
    /// "https://host:port".
    pub agent: String,
    /// PEM file of the CA that signed the agent's certificate.
    pub ca_file: PathBuf,
    /// File holding the bearer token.
    pub token_file: PathBuf,
    pub node_name: String,
    pub endpoints: Vec<String>,
}

/// The credentials as the files hold them now.
#[derive(Clone)]
pub struct Credentials {
    pub ca_pem: Vec<u8>,
    pub token: String,
}

impl std::fmt::Debug for Credentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Credentials")
            .field("token", &"<redacted>")
            .finish_non_exhaustive()
    }
}

impl SyncOptions {
    /// Read the CA and token files (on every connection attempt).
    pub fn credentials(&self) -> Result<Credentials, SyncError> {
        let read = |path: &PathBuf| {
            std::fs::read(path).map_err(|e| SyncError::Credentials {
                path: path.display().to_string(),
                detail: e.to_string(),
            })
        };
        let ca_pem = read(&self.ca_file)?;
        let token = String::from_utf8_lossy(&read(&self.token_file)?)
            .trim()
            .to_owned();
        Ok(Credentials { ca_pem, token })
    }
}

/// Why one session with the agent ended.
#[derive(Debug, thiserror::Error)]
pub enum SyncError {
    #[error("agent address {0:?} is not a valid URL (expected https://HOST:PORT)")]
    BadAddress(String),
    #[error("cannot read {path}: {detail}")]
    Credentials { path: String, detail: String },
    #[error(
        "TLS with the agent failed ({detail}): the agent's certificate is not signed by the CA in {ca_file}; if the node-sync credentials were regenerated, the file is re-read on the next attempt"
    )]
    Tls { detail: String, ca_file: String },
    #[error(
        "the agent refused the token from {token_file} ({detail}); if the node-sync credentials were regenerated, the file is re-read on the next attempt"
    )]
    Auth { detail: String, token_file: String },
    #[error("connecting to the agent: {0}")]
    Transport(#[from] tonic::transport::Error),
    #[error("agent: {0}")]
    Rpc(#[from] tonic::Status),
    #[error("the token contains characters not allowed in a header")]
    BadToken,
    #[error("dataplane: {0}")]
    Dataplane(#[from] Error),
}

/// The next backoff after a failed attempt: doubles up to a ceiling.
pub fn next_backoff(current: Duration) -> Duration {
    (current * 2).min(MAX_BACKOFF)
}

/// Runs sessions forever. Never returns unless the task is cancelled.
pub async fn run<A: Applier>(applier: A, opts: SyncOptions) {
    let mut backoff = Duration::from_millis(500);
    let mut last_revision = 0;
    loop {
        match session(&applier, &opts, &mut last_revision).await {
            Ok(()) => {
                tracing::info!("agent closed the watch; reconnecting");
                backoff = Duration::from_millis(500);
            }
            Err(e) => {
                tracing::warn!(error = %e, retry_in = ?backoff, "agent session failed; forwarding continues")
            }
        }
        // Jitter keeps a fleet of nodes from reconnecting in lockstep.
        let jitter = Duration::from_millis(rand::random::<u64>() % 250);
        tokio::time::sleep(backoff + jitter).await;
        backoff = next_backoff(backoff);
    }
}

/// Every message of an error and its sources, outermost first.
fn chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut parts = vec![e.to_string()];
    let mut source = e.source();
    while let Some(s) = source {
        parts.push(s.to_string());
        source = s.source();
    }
    parts.join(": ")
}

/// Whether a connection error is the TLS handshake failing (rather than the
/// agent being unreachable): rustls' errors name the certificate.
fn is_tls_failure(detail: &str) -> bool {
    let d = detail.to_ascii_lowercase();
    [
        "certificate",
        "unknownissuer",
        "handshake",
        "badsignature",
        "tls",
    ]
    .iter()
    .any(|w| d.contains(w))
}

/// Name TLS and token failures as such.
fn classify(e: SyncError, opts: &SyncOptions) -> SyncError {
    match e {
        SyncError::Transport(t) => {
            let detail = chain(&t);
            if is_tls_failure(&detail) {
                SyncError::Tls {
                    detail,
                    ca_file: opts.ca_file.display().to_string(),
                }
            } else {
                SyncError::Transport(t)
            }
        }
        SyncError::Rpc(s) if s.code() == tonic::Code::Unauthenticated => SyncError::Auth {
            detail: s.message().to_owned(),
            token_file: opts.token_file.display().to_string(),
        },
        SyncError::Rpc(s) if s.code() == tonic::Code::Unavailable && is_tls_failure(&chain(&s)) => {
            SyncError::Tls {
                detail: chain(&s),
                ca_file: opts.ca_file.display().to_string(),
            }
        }
        other => other,
    }
}

async fn session<A: Applier>(
    applier: &A,
    opts: &SyncOptions,
    last_revision: &mut u64,
) -> Result<(), SyncError> {
    session_with(applier, opts, last_revision)
        .await
        .map_err(|e| classify(e, opts))
}

async fn session_with<A: Applier>(
    applier: &A,
    opts: &SyncOptions,
    last_revision: &mut u64,
) -> Result<(), SyncError> {
    let creds = opts.credentials()?;
    let tls = ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(&creds.ca_pem))
        .domain_name(AGENT_SERVER_NAME);
    let channel = Endpoint::from_shared(opts.agent.clone())
        .map_err(|_| SyncError::BadAddress(opts.agent.clone()))?
        .connect_timeout(Duration::from_secs(10))
        .tls_config(tls)?
        .connect()
        .await?;
    let bearer: MetadataValue<_> = format!("Bearer {}", creds.token)
        .parse()
        .map_err(|_| SyncError::BadToken)?;
    let mut client =
        NodeSyncClient::with_interceptor(channel, move |mut req: tonic::Request<()>| {
            req.metadata_mut().insert("authorization", bearer.clone());
            Ok(req)
        });
    let status = applier.status().await?;
    let hello = NodeHello {
        node_name: opts.node_name.clone(),
        public_key: status.public_key.clone(),
        listen_port: status.listen_port,
        endpoints: opts.endpoints.clone(),
        last_revision: *last_revision,
    };
    let mut stream = client.watch_desired(hello).await?.into_inner();
    tracing::info!(agent = %opts.agent, "watching the agent for desired state");
    let mut tick = tokio::time::interval(REPORT_EVERY);
    let mut key_check = tokio::time::interval(KEY_CHECK_EVERY);
    let mut reported_key = status.public_key;
    loop {
        tokio::select! {
            msg = stream.message() => {
                let Some(desired) = msg? else { return Ok(()) };
                let revision = desired.revision;
                match applier.apply(desired).await {
                    Ok(r) => *last_revision = r.applied_revision,
                    Err(e) => tracing::warn!(revision, error = %e, "rejected desired state; keeping the last one"),
                }
                let status = applier.status().await?;
                reported_key.clone_from(&status.public_key);
                client.report_status(for_agent(status)).await?;
            }
            _ = tick.tick() => {
                let status = applier.status().await?;
                reported_key.clone_from(&status.public_key);
                client.report_status(for_agent(status)).await?;
            }
            _ = key_check.tick() => {
                if applier.public_key().as_slice() != reported_key.as_slice() {
                    let status = applier.status().await?;
                    tracing::info!("public key rotated; reporting it to the agent");
                    reported_key.clone_from(&status.public_key);
                    client.report_status(for_agent(status)).await?;
                }
            }
        }
    }
}

/// The report the agent gets: the status without the MAC tables, which
/// the agent does not use (they stay in `l2mesh-dataplane status`).
fn for_agent(mut status: NodeStatus) -> NodeStatus {
    for n in &mut status.networks {
        n.macs = Vec::new();
    }
    status
}

#[cfg(test)]
#[path = "sync_tests.rs"]
mod tests;
