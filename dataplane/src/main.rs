//! `l2mesh-dataplane`: the per-node daemon and its CLI.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context as _;
use clap::{Parser, Subcommand};
use l2mesh_dataplane::config::key_b64;
use l2mesh_dataplane::{api, client, daemon, file, metrics, sync};
use l2mesh_proto::node::{
    AttachPortRequest, DetachPortRequest, NodeStatus, PeerGroup, RotateKeyRequest, StatusRequest,
};

/// The l2mesh node dataplane: Linux bridges and TAPs per network, WireGuard
/// tunnels (boringtun) to peers, and the MAC-learning switch between them.
#[derive(Debug, Parser)]
#[command(name = "l2mesh-dataplane", version = l2mesh_telemetry::VERSION, about, long_about = None)]
struct Cli {
    /// Unix socket of the local control API.
    #[arg(
        long,
        global = true,
        env = "L2MESH_DATAPLANE_SOCKET",
        default_value = "/run/l2mesh/dataplane.sock"
    )]
    socket: PathBuf,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run the daemon (needs CAP_NET_ADMIN for bridges and TAPs).
    Run {
        /// Directory for the node private key and the last applied state.
        #[arg(
            long,
            env = "L2MESH_STATE_DIR",
            default_value = "/var/lib/l2mesh/dataplane"
        )]
        state_dir: PathBuf,
        /// UDP port of the WireGuard socket (0 picks a free one).
        #[arg(long, env = "L2MESH_LISTEN_PORT", default_value_t = daemon::DEFAULT_LISTEN_PORT)]
        listen_port: u16,
        /// Packet workers, each with its own underlay socket and TAP queue
        /// (0: one per core).
        #[arg(long, env = "L2MESH_WORKERS", default_value_t = 0)]
        workers: usize,
        /// Scheduler slice of the packet workers in microseconds (0: the
        /// kernel's default; 100-100000 on Linux 6.12 and later). A short
        /// slice, e.g. 100, lets a worker preempt busy applications on its
        /// core sooner: less latency for packets when the node's cores are
        /// saturated, somewhat less bulk throughput (see the dataplane
        /// README's Performance section).
        #[arg(
            long,
            env = "L2MESH_WORKER_SLICE_US",
            default_value_t = 0,
            value_parser = parse_slice_us
        )]
        worker_slice_us: u64,
        /// Cluster agent to watch for desired state (https://HOST:PORT). Without
        /// it the daemon only takes state over its local API.
        #[arg(long, env = "L2MESH_AGENT", requires_all = ["agent_ca", "agent_token_file", "node_name"])]
        agent: Option<String>,
        /// PEM CA file that signed the agent's certificate (server name "l2mesh-agent").
        #[arg(long, env = "L2MESH_AGENT_CA")]
        agent_ca: Option<PathBuf>,
        /// File holding the bearer token for the agent.
        #[arg(long, env = "L2MESH_AGENT_TOKEN_FILE")]
        agent_token_file: Option<PathBuf>,
        /// This node's name as the agent knows it.
        #[arg(long, env = "L2MESH_NODE_NAME")]
        node_name: Option<String>,
        /// Underlay endpoint(s) peers can reach this node at, IP:PORT (repeat or comma-separate).
        #[arg(long = "endpoint", env = "L2MESH_ENDPOINTS", value_delimiter = ',')]
        endpoints: Vec<String>,
        /// Address of the HTTP endpoint with Prometheus `/metrics` and
        /// `/healthz` (answers while the daemon answers its own API); "" disables it.
        #[arg(long, env = "L2MESH_METRICS_LISTEN", default_value = "127.0.0.1:9431")]
        metrics_listen: String,
        /// Let `attach` take interfaces of any kind (e.g. a spare NIC meant
        /// for a tenant network), not only veths and TAPs. The node's own
        /// interfaces (loopback, default route, addresses) stay refused.
        #[arg(long, env = "L2MESH_ATTACH_ANY_INTERFACE")]
        attach_any_interface: bool,
    },
    /// Print peers and networks of a running daemon as tables (or JSON).
    Status {
        /// Print the raw status as JSON-like debug output instead of tables.
        #[arg(long, env = "L2MESH_STATUS_RAW", conflicts_with = "output")]
        raw: bool,
        /// `table` (default) or `json` (a stable document for scripts).
        #[arg(short, long, env = "L2MESH_STATUS_OUTPUT", default_value = "table", value_parser = ["table", "json"])]
        output: String,
    },
    /// Apply a desired state from a JSON file (see the README of the crate).
    Apply {
        /// JSON file: {revision, node_name, tunnel_ip, listen_port, networks: [..], peers: [..]}.
        file: PathBuf,
    },
    /// Put a host interface into a network's bridge.
    Attach {
        network: String,
        ifname: String,
        /// The pod the interface belongs to, as NAMESPACE/NAME; shown in
        /// `status` and reported to the agent.
        #[arg(long, env = "L2MESH_POD", value_name = "NAMESPACE/NAME")]
        pod: Option<String>,
    },
    /// Take a host interface out of a network's bridge.
    Detach { network: String, ifname: String },
    /// Print this node's WireGuard public key (base64).
    Pubkey,
    /// Generate a new node key pair; prints the new public key.
    RotateKey,
}

/// `--worker-slice-us`: 0, or what the kernel accepts for a custom slice.
fn parse_slice_us(s: &str) -> Result<u64, String> {
    let v: u64 = s
        .parse()
        .map_err(|_| format!("'{s}' is not a number of microseconds"))?;
    if v == 0 || (100..=100_000).contains(&v) {
        Ok(v)
    } else {
        Err(format!(
            "{v} us is outside what the kernel accepts: use 0 (its default) or 100 to 100000"
        ))
    }
}

/// Ports as `ifname` or `ifname(namespace/pod)`.
fn port_list(n: &l2mesh_proto::node::NetworkStatus) -> String {
    if n.port_status.is_empty() {
        return n.ports.join(",");
    }
    n.port_status
        .iter()
        .map(|p| {
            if p.pod_name.is_empty() {
                p.ifname.clone()
            } else {
                format!("{}({}/{})", p.ifname, p.pod_namespace, p.pod_name)
            }
        })
        .collect::<Vec<_>>()
        .join(",")
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    l2mesh_telemetry::init_logs("L2MESH_LOG", "info");
    let rt = match tokio::runtime::Runtime::new() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("l2mesh-dataplane: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match rt.block_on(run(cli)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            // The daemon's own message says what is wrong and what to do.
            match e.downcast_ref::<tonic::Status>() {
                Some(s) => eprintln!("l2mesh-dataplane: {}", s.message()),
                None => eprintln!(
                    "l2mesh-dataplane: {}",
                    l2mesh_telemetry::error_chain(e.as_ref())
                ),
            }
            ExitCode::FAILURE
        }
    }
}

async fn shutdown_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = match signal(SignalKind::terminate()) {
        Ok(s) => s,
        Err(_) => return std::future::pending().await,
    };
    tokio::select! {
        _ = term.recv() => {},
        _ = tokio::signal::ctrl_c() => {},
    }
}

async fn run(cli: Cli) -> anyhow::Result<()> {
    let socket = cli.socket;
    match cli.command {
        Command::Run {
            state_dir,
            listen_port,
            workers,
            worker_slice_us,
            agent,
            agent_ca,
            agent_token_file,
            node_name,
            endpoints,
            metrics_listen,
            attach_any_interface,
        } => {
            // Read the agent files first: a bad flag must change nothing.
            // They are read again on every reconnect (see `sync`).
            let sync_opts = match (agent, agent_ca, agent_token_file) {
                (Some(agent), Some(ca), Some(token)) => {
                    std::fs::read(&ca)
                        .with_context(|| format!("reading --agent-ca {}", ca.display()))?;
                    std::fs::read_to_string(&token).with_context(|| {
                        format!("reading --agent-token-file {}", token.display())
                    })?;
                    Some(sync::SyncOptions {
                        agent,
                        ca_file: ca,
                        token_file: token,
                        node_name: node_name.unwrap_or_default(),
                        endpoints,
                    })
                }
                _ => None,
            };
            // Bind the listeners before touching devices so a bad address changes nothing.
            let metrics_listener = match metrics_listen.trim() {
                "" => None,
                addr => Some(
                    tokio::net::TcpListener::bind(addr)
                        .await
                        .with_context(|| format!("binding --metrics-listen {addr}"))?,
                ),
            };
            let listener =
                api::bind(&socket).with_context(|| format!("binding {}", socket.display()))?;
            let slice =
                (worker_slice_us > 0).then(|| std::time::Duration::from_micros(worker_slice_us));
            let d = match daemon::Daemon::start(&state_dir, listen_port, workers, slice).await {
                Ok(d) => d,
                Err(e) => {
                    let _ = std::fs::remove_file(&socket);
                    return Err(anyhow::Error::new(e).context("starting the dataplane"));
                }
            };
            d.set_attach_any_kind(attach_any_interface);
            let metrics_task = metrics_listener.map(|l| {
                let d2 = std::sync::Arc::clone(&d);
                tokio::spawn(async move {
                    if let Err(e) = metrics::serve(l, d2, std::future::pending()).await {
                        tracing::warn!(error = %e, "metrics server stopped");
                    }
                })
            });
            let sync_task =
                sync_opts.map(|o| tokio::spawn(sync::run(std::sync::Arc::clone(&d), o)));
            tracing::info!(
                socket = %socket.display(),
                port = d.local_port(),
                public_key = %key_b64(&d.public_key()),
                "dataplane running"
            );
            api::serve(listener, std::sync::Arc::clone(&d), shutdown_signal()).await?;
            for t in [sync_task, metrics_task].into_iter().flatten() {
                t.abort();
            }
            d.stop();
            let _ = std::fs::remove_file(&socket);
            tracing::info!("dataplane stopped; bridges are kept for the next start");
            Ok(())
        }
        Command::Status { raw, output } => {
            let mut c = client::connect(&socket)
                .await
                .with_context(|| connect_hint(&socket))?;
            let s = c.get_status(StatusRequest {}).await?.into_inner();
            if raw {
                println!("{s:#?}");
            } else if output == "json" {
                println!("{}", l2mesh_dataplane::status_json::status_json(&s));
            } else {
                print!("{}", render_status(&s));
            }
            Ok(())
        }
        Command::Apply { file } => {
            let text = std::fs::read_to_string(&file)
                .with_context(|| format!("reading {}", file.display()))?;
            let desired =
                file::parse(&text).map_err(|e| anyhow::anyhow!("{}: {e}", file.display()))?;
            let mut c = client::connect(&socket)
                .await
                .with_context(|| connect_hint(&socket))?;
            let r = c.apply(desired).await?.into_inner();
            println!("applied revision {}", r.applied_revision);
            for ch in r.changes {
                println!("  {ch}");
            }
            Ok(())
        }
        Command::Attach {
            network,
            ifname,
            pod,
        } => {
            let (pod_namespace, pod_name) = match pod.as_deref() {
                None => (String::new(), String::new()),
                Some(p) => p
                    .split_once('/')
                    .map(|(ns, n)| (ns.to_string(), n.to_string()))
                    .with_context(|| format!("--pod {p:?}: expected NAMESPACE/NAME"))?,
            };
            let mut c = client::connect(&socket)
                .await
                .with_context(|| connect_hint(&socket))?;
            let r = c
                .attach_port(AttachPortRequest {
                    network,
                    ifname,
                    pod_namespace,
                    pod_name,
                })
                .await?
                .into_inner();
            println!(
                "bridge={} mtu={} vni={} pod_cidr={}",
                r.bridge, r.mtu, r.vni, r.pod_cidr
            );
            Ok(())
        }
        Command::Detach { network, ifname } => {
            let mut c = client::connect(&socket)
                .await
                .with_context(|| connect_hint(&socket))?;
            c.detach_port(DetachPortRequest { network, ifname }).await?;
            Ok(())
        }
        Command::Pubkey => {
            let mut c = client::connect(&socket)
                .await
                .with_context(|| connect_hint(&socket))?;
            let s = c.get_status(StatusRequest {}).await?.into_inner();
            println!("{}", key_b64(&s.public_key));
            Ok(())
        }
        Command::RotateKey => {
            let mut c = client::connect(&socket)
                .await
                .with_context(|| connect_hint(&socket))?;
            let r = c.rotate_key(RotateKeyRequest {}).await?.into_inner();
            println!("{}", key_b64(&r.public_key));
            Ok(())
        }
    }
}

fn connect_hint(socket: &std::path::Path) -> String {
    format!(
        "connecting to {} (is `l2mesh-dataplane run` running? see --socket)",
        socket.display()
    )
}

fn render_status(s: &NodeStatus) -> String {
    use std::fmt::Write as _;
    let mut o = String::new();
    let _ = writeln!(
        o,
        "node {}  key {}  port {}  tunnel_ip {}  revision {}",
        s.node_name,
        key_b64(&s.public_key),
        s.listen_port,
        s.tunnel_ip,
        s.applied_revision
    );
    let drops = |d: &[l2mesh_proto::node::DropCounter]| {
        d.iter()
            .map(|c| format!("{}={}", c.reason, c.count))
            .collect::<Vec<_>>()
            .join(",")
    };
    let _ = writeln!(o, "\nPEERS");
    let _ = writeln!(
        o,
        "{:<16} {:<7} {:<22} {:>10} {:>10} {:>10} {:>10} {:>10}  DROPS",
        "NAME", "GROUP", "ENDPOINT", "HANDSHAKE", "RX_PKTS", "RX_BYTES", "TX_PKTS", "TX_BYTES"
    );
    for p in &s.peers {
        let group = match p.group() {
            PeerGroup::Local => "local",
            PeerGroup::Remote => "remote",
            PeerGroup::Unspecified => "-",
        };
        let hs = p
            .last_handshake_age_ms
            .map(|ms| format!("{}s", ms / 1000))
            .unwrap_or_else(|| "never".into());
        let _ = writeln!(
            o,
            "{:<16} {:<7} {:<22} {:>10} {:>10} {:>10} {:>10} {:>10}  {}",
            p.name,
            group,
            if p.endpoint.is_empty() {
                "-"
            } else {
                &p.endpoint
            },
            hs,
            p.rx_packets,
            p.rx_bytes,
            p.tx_packets,
            p.tx_bytes,
            drops(&p.drops)
        );
    }
    let _ = writeln!(o, "\nNETWORKS");
    let _ = writeln!(
        o,
        "{:<16} {:>8} {:>5} {:<12} {:<18} PORTS",
        "NAME", "VNI", "MTU", "BRIDGE", "POD_CIDR"
    );
    for n in &s.networks {
        let _ = writeln!(
            o,
            "{:<16} {:>8} {:>5} {:<12} {:<18} {}",
            n.name,
            n.vni,
            n.mtu,
            n.bridge,
            n.pod_cidr,
            port_list(n)
        );
        for m in &n.macs {
            let _ = writeln!(o, "    {}  {:<24} {}s", m.mac, m.port, m.age_ms / 1000);
        }
    }
    if !s.drops.is_empty() {
        let _ = writeln!(o, "\nNODE DROPS {}", drops(&s.drops));
    }
    o
}

#[cfg(test)]
mod tests {
    use clap::CommandFactory;

    #[test]
    fn cli_definition_is_consistent() {
        super::Cli::command().debug_assert();
    }

    #[test]
    fn worker_slices_outside_the_kernels_range_are_refused() {
        assert_eq!(super::parse_slice_us("0"), Ok(0));
        assert_eq!(super::parse_slice_us("100"), Ok(100));
        assert_eq!(super::parse_slice_us("100000"), Ok(100_000));
        let e = super::parse_slice_us("50").unwrap_err();
        assert!(e.contains("100 to 100000"), "{e}");
        assert!(super::parse_slice_us("100001").is_err());
        assert!(
            super::parse_slice_us("fast")
                .unwrap_err()
                .contains("'fast'")
        );
    }

    #[test]
    fn status_renders_tables() {
        let s = l2mesh_proto::node::NodeStatus {
            node_name: "n1".into(),
            peers: vec![l2mesh_proto::node::PeerStatus {
                name: "peer-b".into(),
                ..Default::default()
            }],
            networks: vec![l2mesh_proto::node::NetworkStatus {
                name: "blue".into(),
                vni: 7,
                ..Default::default()
            }],
            ..Default::default()
        };
        let out = super::render_status(&s);
        assert!(
            out.contains("peer-b") && out.contains("blue") && out.contains("never"),
            "{out}"
        );
    }
}
