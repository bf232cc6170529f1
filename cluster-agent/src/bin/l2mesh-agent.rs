//! `l2mesh-agent`: one per cluster.

use anyhow::Context as _;
use clap::{Args, Parser, Subcommand};
use l2mesh_proto::join::JoinString;
use std::path::PathBuf;
use std::process::ExitCode;

/// The l2mesh cluster agent: joins the broker with an onboarding token, reads
/// L2Network intent (Kubernetes or a manifest directory) and serves each
/// node's desired dataplane state.
#[derive(Debug, Parser)]
#[command(name = "l2mesh-agent", version = l2mesh_telemetry::VERSION, about, long_about = None)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run on hosts without Kubernetes: L2Network and Nodes manifests from a
    /// directory (re-read when they change), identity and status files in the
    /// state dir, node sync over TLS.
    Standalone(Standalone),
    /// Run as the cluster's Kubernetes controller (in-cluster or KUBECONFIG):
    /// L2Networks and Nodes from the API, identity in Secrets, a Lease so one
    /// replica acts, node sync over TLS.
    Kubernetes(Kubernetes),
    /// Print the CustomResourceDefinitions as YAML (what deploy/crds/ holds).
    Crd,
    /// Delete every L2Network in the cluster while the agent still runs and
    /// wait until the agent has released each one (NAD, nodes, broker,
    /// finalizer). Run before removing the agent: the Helm chart runs it as
    /// a pre-delete hook. Refuses (changing nothing) when no agent holds the
    /// leader Lease, unless --clear-finalizers.
    Uninstall(Uninstall),
    /// Print every tunnel of the cluster as the nodes last reported it (node,
    /// peer, up or down, last handshake, bytes), read from a running agent's
    /// metrics endpoint. The L2Network status only counts them.
    Status(Status),
}

#[derive(Debug, Args)]
struct Uninstall {
    /// Namespace of the agent (where its leader Lease is).
    #[arg(long, env = "L2MESH_NAMESPACE", default_value = "l2mesh-system")]
    namespace: String,
    /// Give up after this many seconds, naming the L2Networks left.
    #[arg(long, env = "L2MESH_UNINSTALL_TIMEOUT_SECS", default_value_t = 300)]
    timeout_secs: u64,
    /// No agent to wait for: delete the L2Networks and remove the l2mesh
    /// finalizer from them. Nodes keep their devices until their dataplane
    /// is removed, and the broker keeps the cluster's memberships.
    #[arg(long, env = "L2MESH_CLEAR_FINALIZERS")]
    clear_finalizers: bool,
}

#[derive(Debug, Args)]
struct Status {
    /// The agent's metrics endpoint (`--metrics-listen` of the running agent).
    #[arg(long, env = "L2MESH_AGENT_METRICS", default_value = "127.0.0.1:9444")]
    agent: String,
    /// Only links that are down.
    #[arg(long, env = "L2MESH_STATUS_DOWN")]
    down: bool,
    /// Only links reported by this node.
    #[arg(long, env = "L2MESH_STATUS_NODE")]
    node: Option<String>,
    /// Print JSON instead of a table.
    #[arg(long, env = "L2MESH_STATUS_JSON")]
    json: bool,
}

/// One row of `/links`.
#[derive(Debug, serde::Deserialize, serde::Serialize)]
#[serde(rename_all = "camelCase")]
struct LinkRow {
    node: String,
    peer: String,
    remote: bool,
    up: bool,
    #[serde(default)]
    last_handshake_age_ms: Option<u64>,
    rx_bytes: u64,
    tx_bytes: u64,
}

/// GET `/links` from the agent (plain HTTP, the metrics endpoint).
async fn fetch_links(addr: &str) -> anyhow::Result<Vec<LinkRow>> {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    let mut conn = tokio::net::TcpStream::connect(addr)
        .await
        .with_context(|| {
            format!("cannot reach the agent's metrics endpoint at {addr} (--agent)")
        })?;
    conn.write_all(
        format!("GET /links HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n").as_bytes(),
    )
    .await?;
    let mut text = String::new();
    conn.read_to_string(&mut text).await?;
    let (head, body) = text
        .split_once("\r\n\r\n")
        .context("the agent sent no HTTP response")?;
    anyhow::ensure!(
        head.starts_with("HTTP/1.1 200"),
        "the agent answered {}: is {addr} an l2mesh-agent metrics endpoint?",
        head.lines().next().unwrap_or_default()
    );
    serde_json::from_str(body).context("the agent's link table is not JSON")
}

fn render_links(rows: &[LinkRow]) -> String {
    use std::fmt::Write as _;
    let mut out = format!(
        "{:<24} {:<28} {:<6} {:<5} {:>10} {:>14} {:>14}\n",
        "NODE", "PEER", "GROUP", "STATE", "HANDSHAKE", "RX BYTES", "TX BYTES"
    );
    for r in rows {
        let age = r
            .last_handshake_age_ms
            .map_or_else(|| "never".to_owned(), |ms| format!("{}s ago", ms / 1000));
        let _ = writeln!(
            out,
            "{:<24} {:<28} {:<6} {:<5} {:>10} {:>14} {:>14}",
            r.node,
            r.peer,
            if r.remote { "remote" } else { "local" },
            if r.up { "up" } else { "down" },
            age,
            r.rx_bytes,
            r.tx_bytes
        );
    }
    let down = rows.iter().filter(|r| !r.up).count();
    let _ = writeln!(
        out,
        "{} links, {} up, {down} down",
        rows.len(),
        rows.len() - down
    );
    out
}

async fn status(a: Status) -> anyhow::Result<()> {
    let mut rows = fetch_links(&a.agent).await?;
    rows.retain(|r| (!a.down || !r.up) && a.node.as_ref().is_none_or(|n| *n == r.node));
    if a.json {
        println!("{}", serde_json::to_string_pretty(&rows)?);
    } else {
        print!("{}", render_links(&rows));
    }
    Ok(())
}

#[derive(Debug, Args)]
struct Standalone {
    /// Directory of L2Network manifests and the Nodes list (*.yaml, *.yml).
    #[arg(long, env = "L2MESH_MANIFESTS")]
    manifests: PathBuf,
    /// Directory for the identity, allocations, node-sync CA/token and
    /// status/<namespace>.<name>.yaml files.
    #[arg(long, env = "L2MESH_STATE_DIR")]
    state_dir: PathBuf,
    /// The join string from `l2mesh-broker token create`; needed only on the
    /// first start (the identity is kept in the state dir).
    #[arg(
        long,
        env = "L2MESH_JOIN_STRING",
        conflicts_with = "join_string_file",
        hide_env_values = true
    )]
    join_string: Option<String>,
    /// File holding the join string.
    #[arg(long, env = "L2MESH_JOIN_STRING_FILE")]
    join_string_file: Option<PathBuf>,
    /// Address for the NodeSync gRPC server (TLS; nodes trust
    /// <state-dir>/node-sync/ca.crt and send the token in node-sync/token).
    #[arg(long, env = "L2MESH_NODE_SYNC_LISTEN", default_value = "0.0.0.0:7444")]
    node_sync_listen: String,
    /// Run without a broker, handing node tunnel IPs out of this subnet
    /// (multi-cluster networks then stay pending).
    #[arg(long, env = "L2MESH_TUNNEL_SUBNET")]
    tunnel_subnet: Option<ipnet::Ipv4Net>,
    /// Address of the Prometheus `/metrics` and `/healthz` endpoint ("" disables it).
    #[arg(long, env = "L2MESH_METRICS_LISTEN", default_value = "127.0.0.1:9444")]
    metrics_listen: String,
    /// How often the manifest directory is checked for changes, milliseconds.
    #[arg(long, env = "L2MESH_POLL_MS", default_value_t = 1000)]
    poll_ms: u64,
    #[command(flatten)]
    failover: Failover,
}

#[derive(Debug, Args)]
struct Failover {
    /// Seconds without a status report from the active gateway's dataplane
    /// (or at once when its node-sync stream closes) before a live standby
    /// gateway takes the remote tunnels over. The role is not handed back
    /// when the old gateway returns; it moves again only when the new one fails.
    #[arg(long, env = "L2MESH_GATEWAY_TIMEOUT_SECS", default_value_t = 10, value_parser = clap::value_parser!(u64).range(1..=3600))]
    gateway_timeout_secs: u64,
}

impl Failover {
    fn timeout(&self) -> std::time::Duration {
        std::time::Duration::from_secs(self.gateway_timeout_secs)
    }
}

#[derive(Debug, Args)]
struct Kubernetes {
    /// Namespace of the agent's Lease and Secrets.
    #[arg(long, env = "L2MESH_NAMESPACE", default_value = "l2mesh-system")]
    namespace: String,
    /// This replica's name in the leader Lease (the pod name).
    #[arg(long, env = "L2MESH_POD_NAME")]
    pod_name: String,
    /// The join string, needed until the identity Secret exists.
    #[arg(
        long,
        env = "L2MESH_JOIN_STRING",
        conflicts_with = "join_string_file",
        hide_env_values = true
    )]
    join_string: Option<String>,
    /// File holding the join string.
    #[arg(long, env = "L2MESH_JOIN_STRING_FILE")]
    join_string_file: Option<PathBuf>,
    /// Address for the NodeSync gRPC server (TLS).
    #[arg(long, env = "L2MESH_NODE_SYNC_LISTEN", default_value = "0.0.0.0:7444")]
    node_sync_listen: String,
    /// Address of the Prometheus `/metrics` and `/healthz` endpoint ("" disables it).
    #[arg(long, env = "L2MESH_METRICS_LISTEN", default_value = "0.0.0.0:9444")]
    metrics_listen: String,
    /// Run without a broker (no stored identity and no join string), handing
    /// node tunnel IPs out of this subnet: local networks work, multi-cluster
    /// ones stay pending.
    #[arg(long, env = "L2MESH_TUNNEL_SUBNET")]
    tunnel_subnet: Option<ipnet::Ipv4Net>,
    #[command(flatten)]
    failover: Failover,
}

fn read_join_string(
    inline: Option<&String>,
    file: Option<&PathBuf>,
) -> anyhow::Result<Option<JoinString>> {
    let text = match (inline, file) {
        (Some(s), _) if !s.trim().is_empty() => s.clone(),
        (_, Some(path)) => std::fs::read_to_string(path)
            .with_context(|| format!("cannot read the join string file {}", path.display()))?,
        _ => return Ok(None),
    };
    Ok(Some(JoinString::parse(&text)?))
}

async fn shutdown_signal() {
    let mut term = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
        Ok(s) => s,
        Err(_) => return std::future::pending().await,
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
    tracing::info!("shutting down");
}

async fn kubernetes(a: Kubernetes) -> anyhow::Result<()> {
    let js = read_join_string(a.join_string.as_ref(), a.join_string_file.as_ref())?;
    let client = kube::Client::try_default()
        .await
        .context("no Kubernetes API access (in-cluster service account or KUBECONFIG)")?;
    let config = l2mesh_cluster_agent::k8s::KubeConfig {
        namespace: a.namespace,
        pod_name: a.pod_name,
        join_string: js,
        metrics_listen: Some(a.metrics_listen).filter(|m| !m.is_empty()),
        on_listening: None,
        gateway_timeout: a.failover.timeout(),
        tunnel_subnet: a.tunnel_subnet,
    };
    l2mesh_cluster_agent::k8s::run(client, config, &a.node_sync_listen, shutdown_signal()).await?;
    Ok(())
}

async fn uninstall(a: Uninstall) -> anyhow::Result<()> {
    let client = kube::Client::try_default()
        .await
        .context("no Kubernetes API access (in-cluster service account or KUBECONFIG)")?;
    let config = l2mesh_cluster_agent::uninstall::UninstallConfig {
        namespace: a.namespace,
        timeout: std::time::Duration::from_secs(a.timeout_secs),
        clear_finalizers: a.clear_finalizers,
        poll: std::time::Duration::from_secs(1),
    };
    let summary =
        l2mesh_cluster_agent::uninstall::run(client, &config, |line| eprintln!("{line}")).await?;
    println!(
        "deleted {} L2Network(s){}",
        summary.deleted,
        if summary.finalizers_cleared > 0 {
            format!(", cleared {} finalizer(s)", summary.finalizers_cleared)
        } else {
            String::new()
        }
    );
    Ok(())
}

fn join_string(a: &Standalone) -> anyhow::Result<Option<JoinString>> {
    read_join_string(a.join_string.as_ref(), a.join_string_file.as_ref())
}

async fn standalone(a: Standalone) -> anyhow::Result<()> {
    let js = join_string(&a)?;
    let listener = tokio::net::TcpListener::bind(&a.node_sync_listen)
        .await
        .with_context(|| {
            format!(
                "cannot listen on {} (--node-sync-listen)",
                a.node_sync_listen
            )
        })?;
    let config = l2mesh_cluster_agent::standalone::Config {
        manifests: a.manifests,
        state_dir: a.state_dir,
        join_string: js,
        local_tunnel_subnet: a.tunnel_subnet,
        poll_interval: std::time::Duration::from_millis(a.poll_ms.max(50)),
        metrics_listen: Some(a.metrics_listen).filter(|m| !m.is_empty()),
        gateway_timeout: a.failover.timeout(),
    };
    let shutdown = shutdown_signal();
    l2mesh_cluster_agent::standalone::run(config, listener, shutdown).await?;
    Ok(())
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    l2mesh_telemetry::init_logs("L2MESH_LOG", "info");
    // One process-wide TLS provider, whatever features dependencies enable.
    let _ = rustls::crypto::ring::default_provider().install_default();
    let result = match cli.command {
        Command::Crd => l2mesh_cluster_agent::crd::crds_yaml()
            .map(|text| print!("{text}"))
            .map_err(anyhow::Error::from),
        Command::Kubernetes(a) => tokio::runtime::Runtime::new()
            .map_err(anyhow::Error::from)
            .and_then(|rt| rt.block_on(kubernetes(a))),
        Command::Status(a) => tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(anyhow::Error::from)
            .and_then(|rt| rt.block_on(status(a))),
        Command::Standalone(a) => tokio::runtime::Runtime::new()
            .map_err(anyhow::Error::from)
            .and_then(|rt| rt.block_on(standalone(a))),
        Command::Uninstall(a) => tokio::runtime::Runtime::new()
            .map_err(anyhow::Error::from)
            .and_then(|rt| rt.block_on(uninstall(a))),
    };
    l2mesh_telemetry::exit_code("l2mesh-agent", result)
}

#[cfg(test)]
mod tests {
    use clap::CommandFactory;

    #[test]
    fn cli_definition_is_consistent() {
        super::Cli::command().debug_assert();
    }

    #[test]
    fn the_link_table_names_each_link_and_counts_the_down_ones() {
        let rows: Vec<super::LinkRow> = serde_json::from_str(
            r#"[{"node":"n1","peer":"n2","remote":false,"up":true,"lastHandshakeAgeMs":12000,"rxBytes":5,"txBytes":6},
                {"node":"gw","peer":"cloud/gw","remote":true,"up":false,"rxBytes":0,"txBytes":0}]"#,
        )
        .unwrap();
        let text = super::render_links(&rows);
        assert!(text.contains("12s ago"), "{text}");
        assert!(
            text.contains("cloud/gw") && text.contains("never"),
            "{text}"
        );
        assert!(text.contains("2 links, 1 up, 1 down"), "{text}");
    }
}
