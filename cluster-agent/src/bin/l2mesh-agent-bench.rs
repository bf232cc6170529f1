//! `l2mesh-agent-bench`: drives the agent's engine with synthetic nodes and
//! networks (no sockets, no Kubernetes) and prints what each kind of input
//! costs: agent CPU time, node desired states and L2Network statuses
//! recomputed, statuses written, and the size of the largest status.
//!
//! CPU time is this thread's user+system time (`getrusage`), so the other
//! processes on the machine do not count; it is a benchmark, not a test.

use anyhow::Context as _;
use clap::Parser;
use l2mesh_cluster_agent::crd::{L2Network, L2NetworkStatus};
use l2mesh_cluster_agent::desired::{Hello, NodeEntry};
use l2mesh_cluster_agent::engine::{AllocStore, SaveFuture, Shared, StatusSink};
use l2mesh_cluster_agent::ipam::Allocations;
use l2mesh_proto::broker::{ClusterView, PeerGateway, ViewNetwork};
use l2mesh_proto::node::{MacEntry, NetworkStatus, NodeStatus, PeerGroup, PeerStatus, PortStatus};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

/// Benchmark the cluster agent's engine with synthetic nodes and networks.
#[derive(Debug, Parser)]
#[command(name = "l2mesh-agent-bench", version = l2mesh_telemetry::VERSION, about, long_about = None)]
struct Cli {
    /// Nodes in the cluster (the first one is the gateway).
    #[arg(long, env = "L2MESH_BENCH_NODES", default_value_t = 1000)]
    nodes: usize,
    /// L2Networks; the last `--multi-cluster` of them are multi-cluster.
    #[arg(long, env = "L2MESH_BENCH_NETWORKS", default_value_t = 20, value_parser = clap::value_parser!(u64).range(1..=200))]
    networks: u64,
    /// How many of the networks are multi-cluster (joined through the broker).
    #[arg(long, env = "L2MESH_BENCH_MULTI_CLUSTER", default_value_t = 2)]
    multi_cluster: u64,
    /// Remote gateways (other clusters) in each multi-cluster network.
    #[arg(long, env = "L2MESH_BENCH_REMOTE_CLUSTERS", default_value_t = 5)]
    remote_clusters: usize,
    /// Node reports timed for the "nothing changed" figure (spread over the nodes).
    #[arg(long, env = "L2MESH_BENCH_REPORTS", default_value_t = 50)]
    reports: usize,
    /// MAC table entries per network in each node report.
    #[arg(long, env = "L2MESH_BENCH_MACS", default_value_t = 16)]
    macs: usize,
}

/// Allocations in memory; saves always succeed.
#[derive(Debug, Default)]
struct MemStore;

impl AllocStore for MemStore {
    fn load(&self) -> Result<Allocations, String> {
        Ok(Allocations::default())
    }
    fn save(&self, _: &Allocations, _: Option<&str>) -> SaveFuture {
        Box::pin(std::future::ready(Ok(())))
    }
}

/// Counts status writes and remembers the largest status written.
#[derive(Debug, Default)]
struct CountingSink {
    writes: AtomicU64,
    largest: AtomicU64,
}

/// The sink handed to the engine; the bench keeps the other handle.
#[derive(Debug)]
struct Counted(Arc<CountingSink>);

impl StatusSink for Counted {
    fn write(&self, _: &L2Network, status: Option<&L2NetworkStatus>) {
        self.0.writes.fetch_add(1, Ordering::Relaxed);
        if let Some(s) = status {
            let size = serde_json::to_vec(s).map_or(0, |v| v.len() as u64);
            self.0.largest.fetch_max(size, Ordering::Relaxed);
        }
    }
}

/// This thread's CPU time so far.
fn cpu() -> Duration {
    use nix::sys::resource::{UsageWho, getrusage};
    getrusage(UsageWho::RUSAGE_THREAD).map_or(Duration::ZERO, |u| {
        let t = |tv: nix::sys::time::TimeVal| {
            Duration::from_secs(u64::try_from(tv.tv_sec()).unwrap_or_default())
                + Duration::from_micros(u64::try_from(tv.tv_usec()).unwrap_or_default())
        };
        t(u.user_time()) + t(u.system_time())
    })
}

fn rss_mib() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))
                .and_then(|l| l.split_whitespace().nth(1)?.parse::<u64>().ok())
        })
        .map_or(0, |kib| kib / 1024)
}

fn node_name(i: usize) -> String {
    format!("node-{i:05}")
}

fn key(tag: u8, i: usize) -> Vec<u8> {
    let mut k = vec![tag; 32];
    k[..8].copy_from_slice(&(i as u64).to_le_bytes());
    k
}

fn ip(i: usize) -> String {
    format!("10.{}.{}.{}", 200 + i / 65536, (i / 256) % 256, i % 256)
}

fn network(i: u64, multi: bool) -> anyhow::Result<L2Network> {
    let spec = if multi {
        format!("{{scope: multiCluster, brokerNetwork: shared-{i}, nodeSlicePrefix: 26}}")
    } else {
        format!("{{ipRange: 10.{}.0.0/16, nodeSlicePrefix: 26}}", i % 200)
    };
    Ok(serde_yaml::from_str(&format!(
        "apiVersion: l2mesh.io/v1alpha1\nkind: L2Network\nmetadata: {{name: net-{i}, namespace: default}}\nspec: {spec}\n"
    ))?)
}

fn view(cli: &Cli, revision: u64, moved: Option<usize>) -> ClusterView {
    let first_multi = cli.networks - cli.multi_cluster.min(cli.networks);
    let networks = (first_multi..cli.networks)
        .map(|i| ViewNetwork {
            name: format!("shared-{i}"),
            vni: 100_000 + u32::try_from(i).unwrap_or_default(),
            mtu: 1390,
            cidr: format!("10.{}.0.0/12", 208 + (i % 2) * 16),
            cluster_cidr: format!("10.{}.0.0/16", 208 + (i % 2) * 16),
            peers: (0..cli.remote_clusters)
                .map(|c| PeerGateway {
                    cluster: format!("remote-{c}"),
                    node: "gw".into(),
                    public_key: key(9, c),
                    endpoints: vec![format!(
                        "203.0.113.{}:{}",
                        c,
                        if moved == Some(c) { 51821 } else { 51820 }
                    )],
                    tunnel_ip: format!("100.65.{c}.1"),
                })
                .collect(),
            members: std::iter::once("bench".to_owned())
                .chain((0..cli.remote_clusters).map(|c| format!("remote-{c}")))
                .collect(),
        })
        .collect();
    ClusterView {
        revision,
        cluster_name: "bench".into(),
        tunnel_subnet: "100.64.0.0/16".into(),
        networks,
        admissions: vec![],
        delta: None,
    }
}

/// What node `i` reports: every network applied (one pod on the first
/// network), a link to every other node, MAC tables; `tick` moves the
/// handshake ages and counters as time passes.
fn report(cli: &Cli, i: usize, vnis: &[(String, u32)], tick: u64) -> NodeStatus {
    let all: Vec<u32> = vnis.iter().map(|(_, v)| *v).collect();
    let peers = (0..cli.nodes)
        .filter(|p| *p != i)
        .map(|p| PeerStatus {
            public_key: key(1, p),
            name: node_name(p),
            group: PeerGroup::Local.into(),
            endpoint: format!("{}:51820", ip(p)),
            last_handshake_age_ms: Some((tick * 5000 + p as u64 * 7) % 120_000),
            rx_bytes: tick * 1000 + p as u64,
            tx_bytes: tick * 2000 + p as u64,
            rx_packets: tick * 10,
            tx_packets: tick * 20,
            drops: vec![],
            vnis: all.clone(),
            tunnel_ip: String::new(),
        })
        .collect();
    let networks = vnis
        .iter()
        .enumerate()
        .map(|(n, (name, vni))| {
            let mut ports = vec![format!("l2mt-{vni:06}")];
            let mut port_status = Vec::new();
            if n == 0 {
                ports.push(format!("l2pod{i}"));
                port_status.push(PortStatus {
                    ifname: format!("l2pod{i}"),
                    pod_namespace: "default".into(),
                    pod_name: format!("pod-{i}"),
                });
            }
            NetworkStatus {
                name: name.clone(),
                vni: *vni,
                mtu: 1390,
                bridge: format!("l2mb-{vni:06}"),
                tap: format!("l2mt-{vni:06}"),
                ports,
                macs: (0..cli.macs)
                    .map(|m| MacEntry {
                        mac: format!("02:00:00:00:{:02x}:{:02x}", m / 256, m % 256),
                        port: node_name(m % cli.nodes),
                        age_ms: tick * 5000,
                    })
                    .collect(),
                pod_cidr: String::new(),
                port_status,
            }
        })
        .collect();
    NodeStatus {
        node_name: node_name(i),
        public_key: key(1, i),
        listen_port: 51820,
        tunnel_ip: String::new(),
        applied_revision: 0,
        peers,
        networks,
        drops: vec![],
    }
}

/// Hand a report to the engine as the node-sync server does, then
/// reconcile only if that woke the engine (as its run loop does).
fn deliver(rt: &tokio::runtime::Runtime, shared: &Shared, report: NodeStatus) -> bool {
    use futures::FutureExt as _;
    // An earlier wake-up already handled must not count.
    let _ = shared.changed().now_or_never();
    shared.set_node_status(report);
    let woken = shared.changed().now_or_never().is_some();
    if woken {
        rt.block_on(shared.reconcile());
    }
    woken
}

/// Counters before and after one step.
#[derive(Clone, Copy, Debug, Default)]
struct Snapshot {
    cpu: Duration,
    desired: u64,
    statuses: u64,
    writes: u64,
}

fn snapshot(shared: &Shared, sink: &CountingSink) -> Snapshot {
    Snapshot {
        cpu: cpu(),
        desired: shared.metrics.desired_recomputes.get(),
        statuses: shared.metrics.status_recomputes.get(),
        writes: sink.writes.load(Ordering::Relaxed),
    }
}

fn delta(a: Snapshot, b: Snapshot) -> Snapshot {
    Snapshot {
        cpu: b.cpu.saturating_sub(a.cpu),
        desired: b.desired - a.desired,
        statuses: b.statuses - a.statuses,
        writes: b.writes - a.writes,
    }
}

fn add(a: Snapshot, b: Snapshot) -> Snapshot {
    Snapshot {
        cpu: a.cpu + b.cpu,
        desired: a.desired + b.desired,
        statuses: a.statuses + b.statuses,
        writes: a.writes + b.writes,
    }
}

fn line(what: &str, d: Snapshot, times: u64) {
    let per = |v: u64| v as f64 / times as f64;
    println!(
        "{what:<44} {:>10.3} ms CPU {:>9.1} node states {:>6.1} statuses {:>6.1} status writes",
        d.cpu.as_secs_f64() * 1000.0 / times as f64,
        per(d.desired),
        per(d.statuses),
        per(d.writes),
    );
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    anyhow::ensure!(cli.nodes >= 2, "--nodes must be at least 2");
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let sink = Arc::new(CountingSink::default());
    let shared = Shared::new(
        "100.64.0.0/16".parse()?,
        Box::new(MemStore),
        Box::new(Counted(sink.clone())),
        true,
    )
    .map_err(anyhow::Error::msg)?;
    let nodes: Vec<NodeEntry> = (0..cli.nodes)
        .map(|i| NodeEntry {
            name: node_name(i),
            gateway: i == 0,
            endpoint: (i == 0).then(|| "192.0.2.1:51820".to_owned()),
        })
        .collect();
    let first_multi = cli.networks - cli.multi_cluster.min(cli.networks);
    let mut networks = (0..cli.networks)
        .map(|i| network(i, i >= first_multi))
        .collect::<anyhow::Result<Vec<_>>>()?;
    println!(
        "l2mesh-agent-bench: {} nodes x {} networks ({} multi-cluster, {} remote gateways each), {} MAC entries per network in each report",
        cli.nodes, cli.networks, cli.multi_cluster, cli.remote_clusters, cli.macs
    );

    // Setup: intent, the broker view, every node's hello, every node's report.
    let t0 = snapshot(&shared, &sink);
    shared.set_intent(nodes, networks.clone());
    shared.set_view(view(&cli, 1, None));
    // A node is served once it says hello: the node-sync server subscribes it.
    let _watches: Vec<_> = (0..cli.nodes)
        .map(|i| shared.subscribe(&node_name(i)))
        .collect();
    for i in 0..cli.nodes {
        shared.set_hello(
            &node_name(i),
            Hello {
                public_key: key(1, i),
                listen_port: 51820,
                endpoints: vec![format!("{}:51820", ip(i))],
            },
        );
    }
    rt.block_on(shared.reconcile());
    line(
        "setup: intent, view, every hello",
        delta(t0, snapshot(&shared, &sink)),
        1,
    );
    let vnis: Vec<(String, u32)> = {
        let rx = shared.subscribe(&node_name(1));
        let state = rx.borrow().clone().context("node 1 has no desired state")?;
        state
            .networks
            .iter()
            .map(|n| (n.name.clone(), n.vni))
            .collect()
    };
    // Building the reports is not the agent's work: only the calls count.
    let mut first = Snapshot::default();
    for i in 0..cli.nodes {
        let r = report(&cli, i, &vnis, 1);
        let t0 = snapshot(&shared, &sink);
        shared.set_node_status(r);
        first = add(first, delta(t0, snapshot(&shared, &sink)));
    }
    let t0 = snapshot(&shared, &sink);
    rt.block_on(shared.reconcile());
    line(
        "first report of every node",
        add(first, delta(t0, snapshot(&shared, &sink))),
        1,
    );

    // Steady state: one report at a time, as they arrive, each with only
    // handshake ages and counters moved.
    let reports: Vec<NodeStatus> = (0..cli.reports)
        .map(|r| report(&cli, (r * 7919) % cli.nodes, &vnis, 2 + r as u64))
        .collect();
    let t0 = snapshot(&shared, &sink);
    let mut woken = 0u64;
    for r in reports {
        woken += u64::from(deliver(&rt, &shared, r));
    }
    let steady = delta(t0, snapshot(&shared, &sink));
    line(
        "one node report, nothing changed",
        steady,
        cli.reports as u64,
    );
    println!(
        "{:<44} {woken:>10} of {}",
        "  reports that woke a reconcile", cli.reports
    );
    let per_minute = steady.writes as f64 / cli.reports as f64 * cli.nodes as f64 * 12.0;
    println!(
        "{:<44} {per_minute:>10.0} (every node reports every 5 s)",
        "status writes per minute, steady state"
    );

    // One remote gateway moves (a broker view change in every multi-cluster network).
    let t0 = snapshot(&shared, &sink);
    shared.set_view(view(&cli, 2, Some(0)));
    rt.block_on(shared.reconcile());
    line(
        "one remote gateway moved",
        delta(t0, snapshot(&shared, &sink)),
        1,
    );

    // One node rotates its WireGuard key.
    let t0 = snapshot(&shared, &sink);
    let mut rotated = report(&cli, 1, &vnis, 100);
    rotated.public_key = key(2, 1);
    deliver(&rt, &shared, rotated);
    line(
        "one node rotated its key",
        delta(t0, snapshot(&shared, &sink)),
        1,
    );

    // One network added.
    let t0 = snapshot(&shared, &sink);
    networks.push(network(cli.networks, false)?);
    let nodes = (0..cli.nodes)
        .map(|i| NodeEntry {
            name: node_name(i),
            gateway: i == 0,
            endpoint: (i == 0).then(|| "192.0.2.1:51820".to_owned()),
        })
        .collect();
    shared.set_intent(nodes, networks);
    rt.block_on(shared.reconcile());
    line("one network added", delta(t0, snapshot(&shared, &sink)), 1);

    let largest = (0..=cli.networks)
        .filter_map(|i| shared.status_of(&format!("default/net-{i}")))
        .filter_map(|s| serde_json::to_vec(&s).ok())
        .map(|v| v.len())
        .max()
        .unwrap_or_default();
    println!(
        "{:<44} {largest:>10} bytes (JSON)",
        "largest L2Network status"
    );
    println!("{:<44} {:>10} MiB", "agent RSS", rss_mib());
    Ok(())
}
