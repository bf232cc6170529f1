//! `l2mesh-broker-bench`: N simulated cluster agents joined to a real broker
//! process and watching; measures how long a change (network created or
//! deleted, gateway key rotated, cluster removed) takes to reach every
//! affected agent, how many bytes of watch messages it sends in total, and
//! the broker's memory. Prints the figures; with `--compare-broker-bin` it
//! runs every layout against that broker first and prints the ratios.
//!
//! Run it from a release build for meaningful numbers:
//! `cargo run --release -p l2mesh-broker --bin l2mesh-broker-bench -- --agents 1000 --spread 5000:50`

use anyhow::{Context as _, Result, anyhow};
use clap::Parser;
use l2mesh_broker::client::{self, ClusterCredential};
use l2mesh_broker::pki::AdminCredential;
use l2mesh_broker::process::BrokerProcess;
use l2mesh_proto::broker as pb;
use l2mesh_proto::join::JoinString;
use prost::Message as _;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::sync::Semaphore;

#[path = "bench/figures.rs"]
mod figures;
use figures::{Rounds, Summary, bytes, compare, ms, pct};

/// Benchmark the broker's fan-out with simulated agents.
#[derive(Debug, Parser)]
#[command(name = "l2mesh-broker-bench", version, about)]
struct Args {
    /// Run with N agents all in one network (repeatable: one run each).
    #[arg(long = "agents", env = "L2MESH_BENCH_AGENTS", value_delimiter = ',', default_values_t = [100, 1000])]
    agents: Vec<usize>,
    /// Run with N agents in networks of M members each, as `N:M`
    /// (repeatable), e.g. `5000:50` for 100 networks of 50.
    #[arg(long = "spread", env = "L2MESH_BENCH_SPREAD", value_delimiter = ',', value_parser = parse_spread)]
    spread: Vec<(usize, usize)>,
    /// Rounds per kind of change.
    #[arg(long, env = "L2MESH_BENCH_ROUNDS", default_value_t = 3)]
    rounds: usize,
    /// The broker binary [default: `l2mesh-broker` next to this binary].
    #[arg(long, env = "L2MESH_BENCH_BROKER_BIN")]
    broker_bin: Option<PathBuf>,
    /// Store of the broker (repeatable: one run each): `sled` (a temp dir),
    /// `etcd://host:port,...` (an existing etcd; each run uses its own key
    /// prefix), or `etcd-local:N` (N etcd members started on loopback for
    /// the run, data in temp dirs; needs the `etcd` binary).
    #[arg(long = "store", env = "L2MESH_BENCH_STORE", default_values_t = [String::from("sled")])]
    stores: Vec<String>,
    /// A second broker binary (for example one built from an older
    /// commit) to run every layout against first, for before/after ratios.
    #[arg(long, env = "L2MESH_BENCH_COMPARE_BROKER_BIN")]
    compare_broker_bin: Option<PathBuf>,
    /// The simulated agents ask for full snapshots on every change (the
    /// watch protocol of agents that do not apply deltas).
    #[arg(long, env = "L2MESH_BENCH_SNAPSHOTS")]
    snapshots: bool,
}

/// etcd members on loopback for `--store etcd-local:N`, killed on drop.
struct LocalEtcd {
    children: Vec<std::process::Child>,
    store: String,
    _tmp: tempfile::TempDir,
}

impl LocalEtcd {
    async fn start(n: usize) -> Result<Self> {
        let tmp = tempfile::tempdir()?;
        let held: Vec<std::net::TcpListener> = (0..2 * n)
            .map(|_| std::net::TcpListener::bind("127.0.0.1:0"))
            .collect::<std::io::Result<_>>()?;
        let ports: Vec<u16> = held
            .iter()
            .map(|l| l.local_addr().map(|a| a.port()))
            .collect::<std::io::Result<_>>()?;
        drop(held);
        let initial = (0..n)
            .map(|i| format!("m{i}=http://127.0.0.1:{}", ports[2 * i + 1]))
            .collect::<Vec<_>>()
            .join(",");
        let mut me = Self {
            children: Vec::new(),
            store: format!(
                "etcd://{}",
                (0..n)
                    .map(|i| format!("127.0.0.1:{}", ports[2 * i]))
                    .collect::<Vec<_>>()
                    .join(",")
            ),
            _tmp: tmp,
        };
        for i in 0..n {
            let client = format!("http://127.0.0.1:{}", ports[2 * i]);
            let peer = format!("http://127.0.0.1:{}", ports[2 * i + 1]);
            let child = Command::new("etcd")
                .args(["--name", &format!("m{i}")])
                .arg("--data-dir")
                .arg(me._tmp.path().join(format!("m{i}")))
                .args([
                    "--listen-client-urls",
                    &client,
                    "--advertise-client-urls",
                    &client,
                ])
                .args([
                    "--listen-peer-urls",
                    &peer,
                    "--initial-advertise-peer-urls",
                    &peer,
                ])
                .args([
                    "--initial-cluster",
                    &initial,
                    "--initial-cluster-state",
                    "new",
                ])
                .args(["--max-txn-ops", "100000", "--max-request-bytes", "33554432"])
                .args(["--logger", "zap", "--log-level", "error"])
                .stdout(std::process::Stdio::null())
                .stderr(std::process::Stdio::null())
                .spawn()
                .context("cannot start etcd (Debian package etcd-server)")?;
            me.children.push(child);
        }
        let spec = l2mesh_broker::store::StoreSpec::parse(&me.store)?;
        let l2mesh_broker::store::StoreSpec::Etcd(config) = spec else {
            return Err(anyhow!("not an etcd store: {}", me.store));
        };
        let probe = l2mesh_broker::store::EtcdStore::connect(config).await?;
        let t = Instant::now();
        while !probe.probe().await {
            if t.elapsed() > Duration::from_secs(30) {
                return Err(anyhow!("etcd did not become ready within 30 s"));
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        Ok(me)
    }
}

impl Drop for LocalEtcd {
    fn drop(&mut self) {
        for c in &mut self.children {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

fn parse_spread(s: &str) -> Result<(usize, usize), String> {
    let (n, m) = s
        .split_once(':')
        .ok_or_else(|| format!("{s:?}: expected N:M, e.g. 5000:50"))?;
    let n: usize = n.parse().map_err(|_| format!("{s:?}: N is not a number"))?;
    let m: usize = m.parse().map_err(|_| format!("{s:?}: M is not a number"))?;
    if m < 2 || n < m {
        return Err(format!("{s:?}: need 2 <= M <= N"));
    }
    Ok((n, m))
}

type Pred = Box<dyn Fn(usize, &pb::ClusterView) -> bool + Send>;

/// Which agents must see what, and when each first did.
struct Probe {
    pred: Option<Pred>,
    hits: Vec<Option<Instant>>,
    remaining: usize,
    done: Option<tokio::sync::oneshot::Sender<()>>,
}

impl Probe {
    fn offer(&mut self, i: usize, view: &pb::ClusterView) {
        let Some(pred) = &self.pred else { return };
        if self.hits.get(i).is_some_and(Option::is_none) && pred(i, view) {
            self.hits[i] = Some(Instant::now());
            self.remaining -= 1;
            if self.remaining == 0
                && let Some(tx) = self.done.take()
            {
                let _ = tx.send(());
            }
        }
    }
}

fn start_broker(bin: &Path, dir: &Path, store: Option<(&str, &str)>) -> Result<BrokerProcess> {
    let mut cmd = Command::new(bin);
    cmd.arg("--data-dir").arg(dir).args([
        "serve",
        "--listen",
        "127.0.0.1:0",
        "--metrics-listen",
        "127.0.0.1:0",
    ]);
    if let Some((store, prefix)) = store {
        cmd.args(["--store", store, "--etcd-prefix", prefix]);
    }
    cmd.args(["--join-failures-per-minute", "0"])
        // Every simulated agent connects from 127.0.0.1 and reports as fast
        // as the benchmark drives it: lift the per-source and rate bounds.
        .args(["--max-connections-per-source", "100000"])
        .args(["--max-unauthenticated-per-source", "100000"])
        .args(["--max-unauthenticated-connections", "100000"])
        .args(["--max-connections", "100000"])
        .args(["--reports-per-minute", "0"])
        .args(["--view-interval-ms", "0"])
        .env("L2MESH_LOG", "warn,l2mesh_broker=info");
    BrokerProcess::spawn(cmd, Duration::from_secs(30))
        .with_context(|| format!("cannot start {}", bin.display()))
}

fn rss_kib(pid: u32, field: &str) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with(field))
                .and_then(|l| l.split_whitespace().nth(1).and_then(|v| v.parse().ok()))
        })
        .unwrap_or(0)
}

fn gateway(i: usize, cred: &ClusterCredential, key: u8) -> pb::Gateway {
    let base: std::net::Ipv4Addr = cred
        .tunnel_subnet
        .split('/')
        .next()
        .and_then(|s| s.parse().ok())
        .unwrap_or(std::net::Ipv4Addr::UNSPECIFIED);
    let mut public_key = vec![key; 32];
    public_key[..8].copy_from_slice(&(i as u64).to_be_bytes());
    pb::Gateway {
        node: format!("gw-{i}"),
        public_key,
        endpoints: vec![format!(
            "192.0.{}.{}:{}",
            i / 250 % 250,
            i % 250 + 1,
            40000 + i % 20000
        )],
        tunnel_ip: std::net::Ipv4Addr::from(u32::from(base) + 1).to_string(),
    }
}

struct Run {
    n: usize,
    probe: Arc<Mutex<Probe>>,
    received: Arc<AtomicU64>,
    admin: pb::broker_admin_client::BrokerAdminClient<tonic::transport::Channel>,
}

impl Run {
    /// Arm the probe, run `change`, wait until every expected agent matched.
    /// Returns the latencies and the watch bytes all agents received.
    async fn measure(
        &mut self,
        what: &str,
        expected: Vec<usize>,
        pred: Pred,
        change: impl AsyncFnOnce(&mut Self) -> Result<()>,
    ) -> Result<(Vec<Duration>, u64)> {
        let (tx, rx) = tokio::sync::oneshot::channel();
        {
            let mut p = self.probe.lock().map_err(|_| anyhow!("poisoned"))?;
            p.hits = vec![Some(Instant::now()); self.n];
            for &i in &expected {
                p.hits[i] = None;
            }
            p.remaining = expected.len();
            p.done = Some(tx);
            p.pred = Some(pred);
        }
        let before = self.received.load(Ordering::Relaxed);
        let t0 = Instant::now();
        change(self).await?;
        tokio::time::timeout(Duration::from_secs(300), rx)
            .await
            .with_context(|| format!("{what}: not every agent saw the change within 300 s"))??;
        let sent = self.received.load(Ordering::Relaxed) - before;
        let mut p = self.probe.lock().map_err(|_| anyhow!("poisoned"))?;
        p.pred = None;
        let mut lat: Vec<Duration> = expected
            .iter()
            .filter_map(|&i| p.hits[i].map(|t| t.saturating_duration_since(t0)))
            .collect();
        lat.sort();
        Ok((lat, sent))
    }
}

/// How the agents are spread: `group` members per network.
#[derive(Clone, Copy, Debug)]
struct Layout {
    n: usize,
    group: usize,
}

impl Layout {
    fn network_of(self, i: usize) -> String {
        if self.group >= self.n {
            "bench".into()
        } else {
            format!("bench-{}", i / self.group)
        }
    }

    fn networks(self) -> usize {
        self.n.div_ceil(self.group)
    }

    fn members_of(self, i: usize) -> Vec<usize> {
        let first = i / self.group * self.group;
        (first..(first + self.group).min(self.n)).collect()
    }

    fn label(self) -> String {
        if self.group >= self.n {
            format!("N = {}, one network", self.n)
        } else {
            format!(
                "N = {}, {} networks of {}",
                self.n,
                self.networks(),
                self.group
            )
        }
    }
}

async fn create_network(
    admin: &mut pb::broker_admin_client::BrokerAdminClient<tonic::transport::Channel>,
    name: String,
    members: usize,
) -> Result<()> {
    admin
        .create_network(pb::CreateNetworkRequest {
            name,
            allow_all: true,
            // A cidr splits into at most 256 cluster slices.
            cidr: if members <= 256 {
                "10.128.0.0/9".into()
            } else {
                String::new()
            },
            ..Default::default()
        })
        .await?;
    Ok(())
}

#[allow(clippy::too_many_lines)]
async fn run(
    bin: &Path,
    layout: Layout,
    rounds: usize,
    deltas: bool,
    store: Option<(&str, &str)>,
) -> Result<Summary> {
    let n = layout.n;
    let tmp = tempfile::tempdir()?;
    let broker = start_broker(bin, tmp.path(), store)?;
    let pid = broker.child.id();
    let addr = broker.addr.clone();
    let cred = AdminCredential::load(&tmp.path().join("admin.pem"))?;
    let mut admin = client::admin_client(std::slice::from_ref(&addr), &cred).await?;
    let rss_idle = rss_kib(pid, "VmRSS:");
    let one_network = layout.group >= n;

    // Write latency: one token created at a time (one record, acknowledged
    // once durable).
    let mut writes = Vec::with_capacity(200);
    for i in 0..200 {
        let t = Instant::now();
        admin
            .create_token(pb::CreateTokenRequest {
                cluster: format!("probe-{i}"),
                ttl_seconds: 60,
                uses: 1,
            })
            .await?;
        writes.push(t.elapsed());
    }
    writes.sort();
    println!(
        "N = {n}: write latency (token create, sequential) p50 {} p99 {}",
        ms(pct(&writes, 0.5)),
        ms(pct(&writes, 0.99))
    );

    // Join N agents, 16 at a time.
    let t_join = Instant::now();
    let sem = Arc::new(Semaphore::new(16));
    let mut joins = Vec::new();
    for i in 0..n {
        let tok = admin
            .create_token(pb::CreateTokenRequest {
                cluster: format!("agent-{i}"),
                ttl_seconds: 3600,
                uses: 1,
            })
            .await?
            .into_inner();
        let join = JoinString::parse(&tok.join_string)?;
        let sem = Arc::clone(&sem);
        let net = layout.network_of(i);
        joins.push(tokio::spawn(async move {
            let _permit = sem.acquire_owned().await?;
            let cred = client::join(&join).await?;
            let mut c = cred.connect().await?;
            c.report_gateways(pb::GatewayReport {
                gateways: vec![gateway(i, &cred, 1)],
            })
            .await?;
            c.request_networks(pb::NetworkRequest {
                networks: vec![net],
            })
            .await?;
            Ok::<_, anyhow::Error>((cred, c))
        }));
    }
    let mut agents = Vec::with_capacity(n);
    for j in joins {
        agents.push(j.await??);
    }
    let join_time = t_join.elapsed();

    // Every agent watches; views (snapshots, or deltas applied to the view
    // held) go through the probe.
    let probe = Arc::new(Mutex::new(Probe {
        pred: None,
        hits: vec![None; n],
        remaining: 0,
        done: None,
    }));
    let received = Arc::new(AtomicU64::new(0));
    let (ready_tx, mut ready_rx) = tokio::sync::mpsc::channel::<()>(n);
    let mut clients = Vec::with_capacity(n);
    for (i, (cred, mut c)) in agents.into_iter().enumerate() {
        let mut stream = c
            .watch(pb::WatchRequest {
                last_revision: 0,
                deltas,
            })
            .await?
            .into_inner();
        let probe = Arc::clone(&probe);
        let received = Arc::clone(&received);
        let ready = ready_tx.clone();
        tokio::spawn(async move {
            let mut held = None;
            while let Ok(Some(msg)) = stream.message().await {
                received.fetch_add(msg.encoded_len() as u64, Ordering::Relaxed);
                let first = held.is_none();
                if let Err(e) = l2mesh_proto::view::apply(&mut held, msg) {
                    eprintln!("agent {i}: {e}");
                    return;
                }
                if first {
                    let _ = ready.send(()).await;
                }
                if let (Ok(mut p), Some(view)) = (probe.lock(), held.as_ref()) {
                    p.offer(i, view);
                }
            }
        });
        clients.push((cred, c));
    }
    for _ in 0..n {
        ready_rx.recv().await;
    }
    let rss_watching = rss_kib(pid, "VmRSS:");
    #[allow(clippy::cast_precision_loss)]
    let joins_per_s = n as f64 / join_time.as_secs_f64();
    println!(
        "{}: joined in {:.2} s ({joins_per_s:.0} joins/s); broker RSS idle {} MiB, with {n} agents watching {} MiB",
        layout.label(),
        join_time.as_secs_f64(),
        rss_idle / 1024,
        rss_watching / 1024
    );

    let mut run = Run {
        n,
        probe,
        received,
        admin: admin.clone(),
    };
    let everyone: Vec<usize> = (0..n).collect();
    let mut summary = Summary {
        joins_per_s,
        rss_watching_kib: rss_watching,
        ..Summary::default()
    };
    if one_network {
        let (mut create, mut delete) = (Rounds::default(), Rounds::default());
        for _ in 0..rounds {
            create.add(
                run.measure(
                    "network create",
                    everyone.clone(),
                    Box::new(|_, v| v.networks.iter().any(|x| x.name == "bench")),
                    async |r: &mut Run| create_network(&mut r.admin, "bench".into(), r.n).await,
                )
                .await?,
            );
            delete.add(
                run.measure(
                    "network delete",
                    everyone.clone(),
                    Box::new(|_, v| v.networks.is_empty()),
                    async |r: &mut Run| {
                        r.admin
                            .delete_network(pb::DeleteNetworkRequest {
                                name: "bench".into(),
                            })
                            .await?;
                        Ok(())
                    },
                )
                .await?,
            );
        }
        summary.changes.push(("network create", create.figures(n)));
        summary.changes.push(("network delete", delete.figures(n)));
    }
    run.measure(
        "setup",
        everyone.clone(),
        Box::new(|_, v| {
            v.networks
                .iter()
                .any(|x| x.name.starts_with("bench") && !x.peers.is_empty())
        }),
        async |r: &mut Run| {
            for net in 0..layout.networks() {
                let name = layout.network_of(net * layout.group);
                create_network(&mut r.admin, name, layout.group).await?;
            }
            Ok(())
        },
    )
    .await?;
    summary.rss_full_kib = rss_kib(pid, "VmRSS:");

    let mut rotation = Rounds::default();
    for round in 0..rounds {
        let key = u8::try_from(round + 2).unwrap_or(2);
        // Spread the rotating agents over the networks.
        let rotating = (round * layout.group + round) % n;
        let expect_key = gateway(rotating, &clients[rotating].0, key).public_key;
        let name = format!("agent-{rotating}");
        let expected: Vec<usize> = layout
            .members_of(rotating)
            .into_iter()
            .filter(|&i| i != rotating)
            .collect();
        let gw = gateway(rotating, &clients[rotating].0, key);
        let mut c = clients[rotating].1.clone();
        rotation.add(
            run.measure(
                "key rotation",
                expected,
                Box::new(move |_, v| {
                    v.networks.iter().any(|x| {
                        x.peers
                            .iter()
                            .any(|p| p.cluster == name && p.public_key == expect_key)
                    })
                }),
                async move |_: &mut Run| {
                    c.report_gateways(pb::GatewayReport { gateways: vec![gw] })
                        .await?;
                    Ok(())
                },
            )
            .await?,
        );
    }
    summary
        .changes
        .push(("gateway change", rotation.figures(layout.group.min(n) - 1)));

    let mut removal = Rounds::default();
    let mut removed = Vec::new();
    let mut affected = 0;
    for round in 0..rounds.min(layout.group.saturating_sub(2)) {
        // The last members of the first network go.
        let victim = layout.group.min(n) - 1 - round;
        removed.push(victim);
        let name = format!("agent-{victim}");
        let expected: Vec<usize> = layout
            .members_of(victim)
            .into_iter()
            .filter(|i| !removed.contains(i))
            .collect();
        affected = expected.len();
        let gone = name.clone();
        removal.add(
            run.measure(
                "cluster remove",
                expected,
                Box::new(move |_, v| v.networks.iter().all(|x| !x.members.contains(&gone))),
                async move |r: &mut Run| {
                    r.admin
                        .remove_cluster(pb::RemoveClusterRequest { name })
                        .await?;
                    Ok(())
                },
            )
            .await?,
        );
    }
    summary
        .changes
        .push(("cluster remove", removal.figures(affected)));
    summary.rss_peak_kib = rss_kib(pid, "VmHWM:");

    println!(
        "  per change: latency from the change to each affected agent's view, over {rounds} round(s); bytes of watch messages all agents received"
    );
    for (what, f) in &summary.changes {
        println!(
            "  {what:<16} affected {:>5}  p50 {:>10}  p99 {:>10}  all-received (worst round) {:>10}  sent {:>9}",
            f.affected,
            ms(f.p50),
            ms(f.p99),
            ms(f.worst_round),
            bytes(f.bytes_per_change)
        );
    }
    println!(
        "  broker RSS with every agent in its network: {} MiB; peak (VmHWM) {} MiB",
        summary.rss_full_kib / 1024,
        summary.rss_peak_kib / 1024
    );
    admin = run.admin;
    drop(admin);
    drop(clients);
    drop(broker);
    Ok(summary)
}

#[tokio::main]
async fn main() -> Result<()> {
    let args = Args::parse();
    let bin = match args.broker_bin {
        Some(b) => b,
        None => std::env::current_exe()?
            .parent()
            .ok_or_else(|| anyhow!("no parent dir of this binary"))?
            .join("l2mesh-broker"),
    };
    raise_fd_limit();
    println!(
        "l2mesh broker benchmark: broker {} (one process, loopback TLS), {} core(s), agents take {}",
        bin.display(),
        std::thread::available_parallelism().map_or(1, std::num::NonZero::get),
        if args.snapshots {
            "snapshots"
        } else {
            "deltas"
        }
    );
    let mut layouts: Vec<Layout> = Vec::new();
    for &n in &args.agents {
        if n < 2 {
            return Err(anyhow!("--agents must be at least 2"));
        }
        layouts.push(Layout { n, group: n });
    }
    layouts.extend(args.spread.iter().map(|&(n, group)| Layout { n, group }));
    for (k, store) in args.stores.iter().enumerate() {
        let local = match store.strip_prefix("etcd-local:") {
            Some(members) => Some(
                LocalEtcd::start(members.parse().map_err(|_| {
                    anyhow!("--store etcd-local:N needs a number of members, got {store:?}")
                })?)
                .await?,
            ),
            None => None,
        };
        let spec = match (&local, store.as_str()) {
            (Some(l), _) => Some(l.store.clone()),
            (None, "sled") => None,
            (None, s) if s.starts_with("etcd://") => Some(s.to_owned()),
            (None, s) => {
                return Err(anyhow!(
                    "--store {s:?}: use sled, etcd://... or etcd-local:N"
                ));
            }
        };
        println!("store: {store}");
        for (j, &layout) in layouts.iter().enumerate() {
            let prefix = format!("/l2mesh-bench-{}-{k}-{j}/", std::process::id());
            let at = spec.as_deref().map(|s| (s, prefix.as_str()));
            let before = match &args.compare_broker_bin {
                Some(old) => {
                    println!("-- before: {}", old.display());
                    let old_prefix = format!("{prefix}before/");
                    let old_at = spec.as_deref().map(|s| (s, old_prefix.as_str()));
                    Some(run(old, layout, args.rounds.max(1), !args.snapshots, old_at).await?)
                }
                None => None,
            };
            if before.is_some() {
                println!("-- after: {}", bin.display());
            }
            let after = run(&bin, layout, args.rounds.max(1), !args.snapshots, at).await?;
            if let Some(before) = before {
                compare(&before, &after);
            }
        }
        drop(local);
    }
    Ok(())
}

/// Thousands of agents need thousands of sockets in this process.
fn raise_fd_limit() {
    use nix::sys::resource::{Resource, getrlimit, setrlimit};
    if let Ok((_, hard)) = getrlimit(Resource::RLIMIT_NOFILE) {
        let _ = setrlimit(Resource::RLIMIT_NOFILE, hard, hard);
    }
}
