//! `l2mesh-broker`: the central service and its admin CLI.

mod cli_admin;

use clap::{Parser, Subcommand};
use l2mesh_broker::store::{EtcdTls, StoreSpec};
use l2mesh_broker::{Broker, ServeConfig};
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

/// The l2mesh broker: holds clusters, networks, onboarding tokens and the CA,
/// and streams to each cluster agent the view it needs.
#[derive(Debug, Parser)]
#[command(name = "l2mesh-broker", version = l2mesh_telemetry::VERSION, about, long_about = None)]
struct Cli {
    /// Directory holding the store, the CA and the admin credential.
    #[arg(
        long,
        global = true,
        env = "L2MESH_DATA_DIR",
        default_value = "/var/lib/l2mesh-broker"
    )]
    data_dir: PathBuf,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run the broker (gRPC over TLS, state in an embedded store).
    Serve(Box<ServeArgs>),
    /// Manage onboarding tokens (talks to a running broker).
    Token(cli_admin::AdminArgs<cli_admin::TokenCmd>),
    /// Manage multi-cluster networks (talks to a running broker).
    Network(cli_admin::AdminArgs<cli_admin::NetworkCmd>),
    /// List or remove clusters (talks to a running broker).
    Cluster(cli_admin::AdminArgs<cli_admin::ClusterCmd>),
    /// Copy a store into another, empty one: sled into etcd to grow from
    /// one broker to several replicas, or etcd back into sled. Stop every
    /// broker that uses either store first.
    Migrate(MigrateArgs),
    /// Create the CA and the admin credential in --data-dir (kept if they
    /// exist) and print the CA pin: the files to put in the one Secret
    /// that every replica on etcd mounts.
    Init,
}

/// Options of an etcd store (`--store etcd://...`).
#[derive(Debug, Clone, clap::Args)]
struct EtcdArgs {
    /// Prefix of this broker's keys in etcd (brokers sharing one etcd need
    /// different prefixes).
    #[arg(long, env = "L2MESH_ETCD_PREFIX", default_value = l2mesh_broker::store::etcd::DEFAULT_PREFIX)]
    etcd_prefix: String,
    /// CA certificate (PEM) of the etcd members' server certificates;
    /// given, the broker talks TLS to etcd.
    #[arg(long, env = "L2MESH_ETCD_CA")]
    etcd_ca: Option<PathBuf>,
    /// Client certificate (PEM) for etcd's --client-cert-auth (needs
    /// --etcd-ca and --etcd-key).
    #[arg(long, env = "L2MESH_ETCD_CERT", requires_all = ["etcd_ca", "etcd_key"])]
    etcd_cert: Option<PathBuf>,
    /// Key (PEM) of --etcd-cert.
    #[arg(long, env = "L2MESH_ETCD_KEY", requires = "etcd_cert")]
    etcd_key: Option<PathBuf>,
    /// Name the etcd members' certificates are verified under (default:
    /// the host of each member address).
    #[arg(long, env = "L2MESH_ETCD_SERVER_NAME", requires = "etcd_ca")]
    etcd_server_name: Option<String>,
    /// Deadline of one request to etcd; a write that gets no answer within
    /// it is refused with UNAVAILABLE.
    #[arg(long, env = "L2MESH_ETCD_TIMEOUT", default_value = "3s", value_parser = cli_admin::parse_duration)]
    etcd_timeout: Duration,
}

impl EtcdArgs {
    /// The store `text` names, with these options on an etcd store.
    fn store(&self, text: &str) -> anyhow::Result<StoreSpec> {
        let spec = StoreSpec::parse(text)?;
        Ok(match spec {
            StoreSpec::Etcd(mut c) => {
                c.prefix.clone_from(&self.etcd_prefix);
                c.timeout = self.etcd_timeout;
                c.tls = self.etcd_ca.as_ref().map(|ca| EtcdTls {
                    ca: ca.clone(),
                    cert: self.etcd_cert.clone(),
                    key: self.etcd_key.clone(),
                    server_name: self.etcd_server_name.clone(),
                });
                StoreSpec::Etcd(c)
            }
            sled => sled,
        })
    }
}

#[derive(Debug, clap::Args)]
struct MigrateArgs {
    /// The store to copy: sled:<dir> or etcd://host:port,...
    #[arg(long, env = "L2MESH_MIGRATE_FROM")]
    from: String,
    /// The empty store to copy into: etcd://host:port,... or sled:<dir>.
    #[arg(long, env = "L2MESH_MIGRATE_TO")]
    to: String,
    #[command(flatten)]
    etcd: EtcdArgs,
}

#[derive(Debug, clap::Args)]
struct ServeArgs {
    /// Where the state lives: sled:<dir> (embedded, one broker; default
    /// <data-dir>/store) or etcd://host:port,host:port,... (several broker
    /// replicas share it; every replica needs the same ca.pem, ca.key and
    /// admin.pem in its --data-dir).
    #[arg(long, env = "L2MESH_STORE")]
    store: Option<String>,
    #[command(flatten)]
    etcd: EtcdArgs,
    /// Address the gRPC API listens on.
    #[arg(long, env = "L2MESH_LISTEN", default_value = "0.0.0.0:7443")]
    listen: std::net::SocketAddr,
    /// Address (`host:port`) agents reach the broker at; goes into join
    /// strings and the server certificate. Repeatable; default: --listen.
    #[arg(long, env = "L2MESH_ADVERTISE", value_delimiter = ',')]
    advertise: Vec<String>,
    /// Address of the HTTP health (`/healthz`) and Prometheus (`/metrics`) endpoint.
    #[arg(long, env = "L2MESH_METRICS_LISTEN", default_value = "127.0.0.1:9443")]
    metrics_listen: std::net::SocketAddr,
    /// TTL of tokens created without `--ttl`, e.g. 1h, 30m, 90s.
    #[arg(long, env = "L2MESH_TOKEN_TTL", default_value = "1h", value_parser = cli_admin::parse_duration)]
    token_ttl: Duration,
    /// Failed joins allowed per source address per minute (0 disables the limit).
    #[arg(long, env = "L2MESH_JOIN_FAILURES_PER_MINUTE", default_value_t = 10)]
    join_failures_per_minute: u32,
    /// Largest accepted request message, in bytes.
    #[arg(long, env = "L2MESH_MAX_REQUEST_BYTES", default_value_t = 1 << 20)]
    max_request_bytes: usize,
    /// Open client connections in total. Lowered at start to the open-file
    /// limit (raised to its hard limit) minus 64 kept for the broker itself.
    #[arg(long, env = "L2MESH_MAX_CONNECTIONS", default_value_t = 4096)]
    max_connections: usize,
    /// Open client connections from one source address.
    #[arg(long, env = "L2MESH_MAX_CONNECTIONS_PER_SOURCE", default_value_t = 256)]
    max_connections_per_source: usize,
    /// Open connections that have not (yet) made an authenticated call
    /// (TLS handshakes, joins). At most half of --max-connections, so the
    /// rest stays for the admin and the clusters.
    #[arg(
        long,
        env = "L2MESH_MAX_UNAUTHENTICATED_CONNECTIONS",
        default_value_t = 256
    )]
    max_unauthenticated_connections: usize,
    /// Open unauthenticated connections from one source address.
    #[arg(
        long,
        env = "L2MESH_MAX_UNAUTHENTICATED_PER_SOURCE",
        default_value_t = 16
    )]
    max_unauthenticated_per_source: usize,
    /// Time a client has to finish the TLS handshake.
    #[arg(long, env = "L2MESH_HANDSHAKE_TIMEOUT", default_value = "10s", value_parser = cli_admin::parse_duration)]
    handshake_timeout: Duration,
    /// Time from connecting to the first authenticated call (a join is done
    /// well within it); a connection that has not made one is closed.
    #[arg(long, env = "L2MESH_UNAUTHENTICATED_TIMEOUT", default_value = "30s", value_parser = cli_admin::parse_duration)]
    unauthenticated_timeout: Duration,
    /// Reports (gateways, networks, link health) one cluster may send per
    /// minute on average (0: no limit).
    #[arg(long, env = "L2MESH_REPORTS_PER_MINUTE", default_value_t = 120)]
    reports_per_minute: u32,
    /// Reports one cluster may send in a burst.
    #[arg(long, env = "L2MESH_REPORT_BURST", default_value_t = 30)]
    report_burst: u32,
    /// Shortest time between two views on one watch stream, in
    /// milliseconds; faster changes are merged into one view.
    #[arg(long, env = "L2MESH_VIEW_INTERVAL_MS", default_value_t = 100)]
    view_interval_ms: u64,
    /// How long used, revoked and expired tokens stay listed before they are
    /// deleted.
    #[arg(long, env = "L2MESH_TOKEN_RETENTION", default_value = "7d", value_parser = cli_admin::parse_duration)]
    token_retention: Duration,
    /// Largest view of one cluster, in bytes; a report or request that would
    /// make any view larger is refused. At most 16 MiB, what agents accept.
    #[arg(long, env = "L2MESH_MAX_VIEW_BYTES", default_value_t = l2mesh_proto::limits::MAX_MESSAGE_BYTES)]
    max_view_bytes: usize,
    /// Lifetime of cluster certificates (agents renew them before expiry).
    #[arg(long, env = "L2MESH_CLUSTER_CERT_LIFETIME", default_value = "90d", value_parser = cli_admin::parse_duration)]
    cluster_cert_lifetime: Duration,
}

async fn shutdown_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        let mut term =
            match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                Ok(s) => s,
                Err(_) => {
                    let _ = ctrl_c.await;
                    return;
                }
            };
        tokio::select! {
            _ = ctrl_c => {}
            _ = term.recv() => {}
        }
    }
    #[cfg(not(unix))]
    let _ = ctrl_c.await;
}

async fn serve(data_dir: PathBuf, args: ServeArgs) -> anyhow::Result<()> {
    use anyhow::Context as _;
    let listener = tokio::net::TcpListener::bind(args.listen)
        .await
        .with_context(|| format!("cannot listen on {}", args.listen))?;
    let metrics = tokio::net::TcpListener::bind(args.metrics_listen)
        .await
        .with_context(|| format!("cannot listen on {} for metrics", args.metrics_listen))?;
    let local = listener.local_addr()?;
    let advertise = if args.advertise.is_empty() {
        vec![local.to_string()]
    } else {
        args.advertise
    };
    if advertise.iter().any(|a| {
        a.parse::<std::net::SocketAddr>()
            .is_ok_and(|s| s.ip().is_unspecified())
    }) {
        tracing::warn!(
            advertise = ?advertise,
            "join strings will carry an unspecified address that agents cannot reach: pass --advertise HOST:PORT"
        );
    }
    let mut config = ServeConfig::new(data_dir, advertise);
    config.store = args
        .store
        .as_deref()
        .map(|s| args.etcd.store(s))
        .transpose()?;
    config.default_token_ttl = args.token_ttl;
    config.join_failures_per_minute = args.join_failures_per_minute;
    config.max_request_bytes = args.max_request_bytes;
    config.conn = l2mesh_broker::conn::ConnLimits {
        max_total: args.max_connections,
        max_per_source: args.max_connections_per_source,
        max_unauthenticated: args.max_unauthenticated_connections,
        max_unauthenticated_per_source: args.max_unauthenticated_per_source,
        handshake_timeout: args.handshake_timeout,
        unauthenticated_timeout: args.unauthenticated_timeout,
    };
    config.reports_per_minute = args.reports_per_minute;
    config.report_burst = args.report_burst;
    config.view_interval = Duration::from_millis(args.view_interval_ms);
    config.token_retention = args.token_retention;
    config.cluster_cert_lifetime = args.cluster_cert_lifetime;
    config.max_view_bytes = args.max_view_bytes;
    let broker = Broker::open(config.clone())
        .await
        .with_context(|| format!("cannot open the data dir {}", config.data_dir.display()))?;
    tracing::info!(
        listen = %local,
        metrics = %metrics.local_addr()?,
        advertise = ?config.advertise,
        ca_pin = %broker.ca_pin(),
        admin_credential = %broker.admin_credential_path().display(),
        "broker serving"
    );
    broker
        .serve(listener, Some(metrics), shutdown_signal())
        .await?;
    tracing::info!("broker stopped");
    Ok(())
}

fn init(data_dir: &std::path::Path) -> anyhow::Result<()> {
    let pki = l2mesh_broker::pki::Pki::load_or_create(data_dir, &[])?;
    println!(
        "CA and admin credential in {} (ca.pem, ca.key, admin.pem); CA pin {}",
        data_dir.display(),
        pki.ca_pin()
    );
    Ok(())
}

async fn migrate(args: MigrateArgs) -> anyhow::Result<()> {
    use anyhow::Context as _;
    let from = args.etcd.store(&args.from)?;
    let to = args.etcd.store(&args.to)?;
    let n = l2mesh_broker::store::migrate(&from, &to)
        .await
        .with_context(|| format!("cannot copy {} into {}", args.from, args.to))?;
    println!("copied {n} records from {} into {}", args.from, args.to);
    Ok(())
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    l2mesh_telemetry::init_logs("L2MESH_LOG", "info");
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(r) => r,
        Err(e) => {
            eprintln!("l2mesh-broker: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let result = runtime.block_on(async move {
        match cli.command {
            Command::Serve(args) => serve(cli.data_dir, *args).await,
            Command::Token(a) => cli_admin::token(&cli.data_dir, a).await,
            Command::Network(a) => cli_admin::network(&cli.data_dir, a).await,
            Command::Cluster(a) => cli_admin::cluster(&cli.data_dir, a).await,
            Command::Migrate(a) => migrate(a).await,
            Command::Init => init(&cli.data_dir),
        }
    });
    l2mesh_telemetry::exit_code("l2mesh-broker", result)
}

#[cfg(test)]
mod tests {
    use clap::CommandFactory;

    #[test]
    fn cli_definition_is_consistent() {
        super::Cli::command().debug_assert();
    }

    fn serve_args(args: &[&str]) -> super::ServeArgs {
        use clap::Parser as _;
        let cli = super::Cli::try_parse_from(
            ["l2mesh-broker", "serve"]
                .iter()
                .chain(args.iter())
                .copied(),
        )
        .unwrap();
        match cli.command {
            super::Command::Serve(a) => *a,
            other => panic!("not serve: {other:?}"),
        }
    }

    #[test]
    fn serve_without_store_flags_keeps_sled_in_the_data_dir() {
        let a = serve_args(&[]);
        assert_eq!(a.store, None);
    }

    #[test]
    fn etcd_store_flags_reach_the_store_config() {
        let a = serve_args(&[
            "--store",
            "etcd://e0:2379,e1:2379",
            "--etcd-prefix",
            "/mesh-a/",
            "--etcd-ca",
            "/ca.crt",
            "--etcd-cert",
            "/c.crt",
            "--etcd-key",
            "/c.key",
            "--etcd-timeout",
            "5s",
        ]);
        let spec = a.etcd.store(a.store.as_deref().unwrap()).unwrap();
        let l2mesh_broker::store::StoreSpec::Etcd(c) = spec else {
            panic!("not etcd: {spec:?}");
        };
        assert_eq!(c.endpoints, vec!["e0:2379", "e1:2379"]);
        assert_eq!(c.prefix, "/mesh-a/");
        assert_eq!(c.timeout, std::time::Duration::from_secs(5));
        let tls = c.tls.unwrap();
        assert_eq!(tls.ca, std::path::PathBuf::from("/ca.crt"));
        assert_eq!(tls.key, Some("/c.key".into()));
        // A client certificate needs its key and the CA.
        use clap::Parser as _;
        assert!(
            super::Cli::try_parse_from(["l2mesh-broker", "serve", "--etcd-cert", "/c.crt"])
                .is_err()
        );
    }
}
