//! `l2mesh-broker-bench`: N simulated cluster agents joined to a real broker
//! process and watching; measures how long a change (network created or
//! deleted, key rotated, cluster removed) takes to reach every affected
//! agent, and the broker's memory. Prints the figures.
//!
//! Run it from a release build for meaningful numbers:
//! `cargo run --release -p l2mesh-broker --bin l2mesh-broker-bench -- --agents 100 --agents 1000`

use anyhow::{Context as _, Result, anyhow};
use clap::Parser;
use l2mesh_broker::client::{self, ClusterCredential};
use l2mesh_broker::pki::AdminCredential;
use l2mesh_broker::process::BrokerProcess;
use l2mesh_proto::broker as pb;
use l2mesh_proto::join::JoinString;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::sync::Semaphore;

/// Benchmark the broker's fan-out with simulated agents.
#[derive(Debug, Parser)]
#[command(name = "l2mesh-broker-bench", version, about)]
struct Args {
    /// Number of simulated agents (repeatable: one run each).
    #[arg(long = "agents", env = "L2MESH_BENCH_AGENTS", default_values_t = [100, 1000])]
    agents: Vec<usize>,
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

fn pct(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    #[allow(
        clippy::cast_possible_truncation,
        clippy::cast_sign_loss,
        clippy::cast_precision_loss
    )]
    let idx = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[idx.min(sorted.len() - 1)]
}

fn ms(d: Duration) -> String {
    format!("{:.1} ms", d.as_secs_f64() * 1000.0)
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
        endpoints: vec![format!("192.0.2.{}:{}", i % 250 + 1, 40000 + i % 20000)],
        tunnel_ip: std::net::Ipv4Addr::from(u32::from(base) + 1).to_string(),
    }
}

struct Run {
    n: usize,
    probe: Arc<Mutex<Probe>>,
    admin: pb::broker_admin_client::BrokerAdminClient<tonic::transport::Channel>,
}

impl Run {
    /// Arm the probe, run `change`, wait until every expected agent matched.
    async fn measure(
        &mut self,
        what: &str,
        expected: Vec<usize>,
        pred: Pred,
        change: impl AsyncFnOnce(&mut Self) -> Result<()>,
    ) -> Result<Vec<Duration>> {
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
        let t0 = Instant::now();
        change(self).await?;
        tokio::time::timeout(Duration::from_secs(120), rx)
            .await
            .with_context(|| format!("{what}: not every agent saw the change within 120 s"))??;
        let mut p = self.probe.lock().map_err(|_| anyhow!("poisoned"))?;
        p.pred = None;
        let mut lat: Vec<Duration> = expected
            .iter()
            .filter_map(|&i| p.hits[i].map(|t| t.saturating_duration_since(t0)))
            .collect();
        lat.sort();
        Ok(lat)
    }
}

fn report(what: &str, n_affected: usize, mut all: Vec<Duration>, rounds: &[Duration]) {
    all.sort();
    let worst = rounds.iter().max().copied().unwrap_or_default();
    println!(
        "  {what:<18} affected {n_affected:>5}  p50 {:>10}  p99 {:>10}  all-received (worst round) {:>10}",
        ms(pct(&all, 0.5)),
        ms(pct(&all, 0.99)),
        ms(worst)
    );
}

#[allow(clippy::too_many_lines)]
async fn run(bin: &Path, n: usize, rounds: usize, store: Option<(&str, &str)>) -> Result<()> {
    let tmp = tempfile::tempdir()?;
    let broker = start_broker(bin, tmp.path(), store)?;
    let pid = broker.child.id();
    let addr = broker.addr.clone();
    let cred = AdminCredential::load(&tmp.path().join("admin.pem"))?;
    let mut admin = client::admin_client(std::slice::from_ref(&addr), &cred).await?;
    let rss_idle = rss_kib(pid, "VmRSS:");

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
        joins.push(tokio::spawn(async move {
            let _permit = sem.acquire_owned().await?;
            let cred = client::join(&join).await?;
            let mut c = cred.connect().await?;
            c.report_gateways(pb::GatewayReport {
                gateways: vec![gateway(i, &cred, 1)],
            })
            .await?;
            c.request_networks(pb::NetworkRequest {
                networks: vec!["bench".into()],
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

    // Every agent watches; views go through the probe.
    let probe = Arc::new(Mutex::new(Probe {
        pred: None,
        hits: vec![None; n],
        remaining: 0,
        done: None,
    }));
    let (ready_tx, mut ready_rx) = tokio::sync::mpsc::channel::<()>(n);
    let mut clients = Vec::with_capacity(n);
    for (i, (cred, mut c)) in agents.into_iter().enumerate() {
        let mut stream = c.watch(pb::WatchRequest::default()).await?.into_inner();
        let probe = Arc::clone(&probe);
        let ready = ready_tx.clone();
        tokio::spawn(async move {
            let mut first = true;
            while let Ok(Some(view)) = stream.message().await {
                if first {
                    first = false;
                    let _ = ready.send(()).await;
                }
                if let Ok(mut p) = probe.lock() {
                    p.offer(i, &view);
                }
            }
        });
        clients.push((cred, c));
    }
    for _ in 0..n {
        ready_rx.recv().await;
    }
    let rss_watching = rss_kib(pid, "VmRSS:");
    println!(
        "N = {n}: joined in {:.2} s ({:.0} joins/s); broker RSS idle {} MiB, with {n} agents watching {} MiB",
        join_time.as_secs_f64(),
        n as f64 / join_time.as_secs_f64(),
        rss_idle / 1024,
        rss_watching / 1024
    );

    let mut run = Run {
        n,
        probe,
        admin: admin.clone(),
    };
    let everyone: Vec<usize> = (0..n).collect();
    let (mut create_all, mut create_rounds) = (Vec::new(), Vec::new());
    let (mut delete_all, mut delete_rounds) = (Vec::new(), Vec::new());
    for _ in 0..rounds {
        let lat = run
            .measure(
                "network create",
                everyone.clone(),
                Box::new(|_, v| v.networks.iter().any(|x| x.name == "bench")),
                async |r: &mut Run| {
                    r.admin
                        .create_network(pb::CreateNetworkRequest {
                            name: "bench".into(),
                            allow_all: true,
                            // A cidr splits into at most 256 cluster slices.
                            cidr: if r.n <= 256 {
                                "10.128.0.0/9".into()
                            } else {
                                String::new()
                            },
                            ..Default::default()
                        })
                        .await?;
                    Ok(())
                },
            )
            .await?;
        create_rounds.push(lat.last().copied().unwrap_or_default());
        create_all.extend(lat);
        let lat = run
            .measure(
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
            .await?;
        delete_rounds.push(lat.last().copied().unwrap_or_default());
        delete_all.extend(lat);
    }
    run.measure(
        "setup",
        everyone.clone(),
        Box::new(|_, v| {
            v.networks
                .iter()
                .any(|x| x.name == "bench" && !x.peers.is_empty())
        }),
        async |r: &mut Run| {
            r.admin
                .create_network(pb::CreateNetworkRequest {
                    name: "bench".into(),
                    allow_all: true,
                    ..Default::default()
                })
                .await?;
            Ok(())
        },
    )
    .await?;
    let rss_full = rss_kib(pid, "VmRSS:");

    let (mut rot_all, mut rot_rounds) = (Vec::new(), Vec::new());
    for round in 0..rounds {
        let key = u8::try_from(round + 2).unwrap_or(2);
        let rotating = round % n;
        let expect_key = gateway(rotating, &clients[rotating].0, key).public_key;
        let name = format!("agent-{rotating}");
        let expected: Vec<usize> = (0..n).filter(|&i| i != rotating).collect();
        let gw = gateway(rotating, &clients[rotating].0, key);
        let mut c = clients[rotating].1.clone();
        let lat = run
            .measure(
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
            .await?;
        rot_rounds.push(lat.last().copied().unwrap_or_default());
        rot_all.extend(lat);
    }

    let (mut rm_all, mut rm_rounds) = (Vec::new(), Vec::new());
    let mut removed = Vec::new();
    for round in 0..rounds.min(n.saturating_sub(1)) {
        let victim = n - 1 - round;
        removed.push(victim);
        let name = format!("agent-{victim}");
        let expected: Vec<usize> = (0..n).filter(|i| !removed.contains(i)).collect();
        let gone = name.clone();
        let lat = run
            .measure(
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
            .await?;
        rm_rounds.push(lat.last().copied().unwrap_or_default());
        rm_all.extend(lat);
    }

    println!(
        "  change-to-received latency per agent over {rounds} round(s), all N agents in one network:"
    );
    report("network create", n, create_all, &create_rounds);
    report("network delete", n, delete_all, &delete_rounds);
    report("key rotation", n - 1, rot_all, &rot_rounds);
    report("cluster remove", n.saturating_sub(2), rm_all, &rm_rounds);
    println!(
        "  broker RSS with every agent in one network: {} MiB; peak (VmHWM) {} MiB",
        rss_full / 1024,
        rss_kib(pid, "VmHWM:") / 1024
    );
    admin = run.admin;
    drop(admin);
    drop(clients);
    drop(broker);
    Ok(())
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
    println!(
        "l2mesh broker benchmark: broker {} (one process, loopback TLS), {} core(s)",
        bin.display(),
        std::thread::available_parallelism().map_or(1, std::num::NonZero::get)
    );
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
        for &n in &args.agents {
            if n < 2 {
                return Err(anyhow!("--agents must be at least 2"));
            }
            let prefix = format!("/l2mesh-bench-{}-{k}-{n}/", std::process::id());
            run(
                &bin,
                n,
                args.rounds.max(1),
                spec.as_deref().map(|s| (s, prefix.as_str())),
            )
            .await?;
        }
        drop(local);
    }
    Ok(())
}
