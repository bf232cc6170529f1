//! `l2mesh-demo`: a local three-cluster demo on network namespaces.

use std::io::Write as _;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use clap::Parser;
use l2mesh_e2e::Lab;
use l2mesh_e2e::binaries;
use l2mesh_e2e::mesh::Mesh;
use l2mesh_e2e::plan::TopologySpec;
use l2mesh_e2e::preflight::{self, NETNS_TOOLS};
use l2mesh_e2e::registry;
use l2mesh_e2e::table::Table;
use l2mesh_e2e::topology::Topology;
use nix::sys::signal::{SigSet, Signal};

/// Build a three-cluster l2mesh topology out of network namespaces on this
/// machine, show who is connected to whom, ping across clusters and clean up.
///
/// Needs root. Everything lives in namespaces named `l2e-<pid>-...`; nothing
/// is changed in the root namespace. Ctrl-C cleans up.
///
/// Binaries: from the directory in L2MESH_E2E_BIN_DIR if set; otherwise,
/// run from a checkout, `cargo build --workspace --bins` there (same
/// profile as the demo); otherwise the l2mesh-* binaries beside the demo.
#[derive(Debug, Parser)]
#[command(name = "l2mesh-demo", version, about, long_about)]
struct Cli {
    /// Number of clusters (1-50).
    #[arg(long, env = "L2MESH_DEMO_CLUSTERS", default_value_t = 3)]
    clusters: usize,
    /// Nodes per cluster, including its gateway (1-50).
    #[arg(long, env = "L2MESH_DEMO_NODES", default_value_t = 2)]
    nodes: usize,
    /// Pods per node (0-20).
    #[arg(long, env = "L2MESH_DEMO_PODS", default_value_t = 1)]
    pods: usize,
    /// Broker replicas on a 3-member etcd (started on the broker host);
    /// 0: one broker on its embedded sled store.
    #[arg(long, env = "L2MESH_DEMO_BROKER_REPLICAS", default_value_t = 0, value_parser = clap::value_parser!(u8).range(0..=5))]
    broker_replicas: u8,
    /// Leave the topology up on exit, with instructions for poking at it.
    #[arg(long, env = "L2MESH_DEMO_KEEP")]
    keep: bool,
    /// Remove what earlier `--keep` runs (or killed tests) left behind, then exit.
    #[arg(long, env = "L2MESH_DEMO_CLEANUP", conflicts_with = "keep")]
    cleanup: bool,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    if let Err(e) = install_signal_cleanup() {
        eprintln!("l2mesh-demo: cannot install the Ctrl-C handler: {e:#}");
        return ExitCode::FAILURE;
    }
    match run(&cli) {
        Ok(code) => code,
        Err(_) if registry::is_closed() => loop {
            // Interrupted: the signal thread has cleaned up and exits with 130.
            std::thread::park();
        },
        Err(e) => {
            eprintln!("l2mesh-demo: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// Blocks the termination signals in every thread and waits for them in a
/// dedicated one, which tears down whatever exists at that moment. Children
/// start with an empty signal mask (std resets it), so they are unaffected.
fn install_signal_cleanup() -> anyhow::Result<()> {
    let mut set = SigSet::empty();
    for s in [Signal::SIGINT, Signal::SIGTERM, Signal::SIGHUP] {
        set.add(s);
    }
    set.thread_block().context("blocking signals")?;
    std::thread::Builder::new()
        .name("signals".into())
        .spawn(move || {
            let Ok(sig) = set.wait() else { return };
            eprintln!("\nl2mesh-demo: {sig}: cleaning up");
            let report = registry::cleanup_all();
            eprintln!(
                "l2mesh-demo: removed {} namespaces, stopped {} processes{}",
                report.deleted_netns.len(),
                report.killed_process_groups,
                if report.failures.is_empty() {
                    String::new()
                } else {
                    format!("; failures: {}", report.failures.join("; "))
                }
            );
            std::process::exit(130);
        })
        .context("starting the signal thread")?;
    Ok(())
}

fn step(n: usize, total: usize, what: &str) {
    println!("[{n}/{total}] {what}");
    let _ = std::io::stdout().flush();
}

fn run(cli: &Cli) -> anyhow::Result<ExitCode> {
    if cli.cleanup {
        let report = registry::sweep_stale()?;
        if report.deleted_netns.is_empty() {
            println!("nothing to clean up");
        }
        for name in &report.deleted_netns {
            println!("removed {name}");
        }
        for failure in &report.failures {
            eprintln!("could not remove: {failure}");
        }
        return Ok(if report.failures.is_empty() {
            ExitCode::SUCCESS
        } else {
            ExitCode::FAILURE
        });
    }
    let missing = preflight::missing(&NETNS_TOOLS);
    anyhow::ensure!(
        missing.is_empty(),
        "cannot build the demo here: {}",
        missing.join("; ")
    );
    let spec = TopologySpec {
        clusters: cli.clusters,
        nodes_per_cluster: cli.nodes,
        pods_per_node: cli.pods,
    };
    l2mesh_e2e::Plan::new(spec)?;
    const STEPS: usize = 5;
    let started = Instant::now();
    let progress = &mut |what: &str| {
        println!("      + {what}");
        let _ = std::io::stdout().flush();
    };

    let source = binaries::DemoBinaries::choose();
    step(1, STEPS, &source.describe());
    let bins = source.get()?;
    for name in binaries::PRODUCT_BINARIES {
        println!("      {name}: {}", bins.path(name)?.display());
    }

    step(2, STEPS, "building the topology out of network namespaces");
    let lab = Lab::build_with_progress(spec, progress)?;
    let topo = lab.topology();
    println!(
        "      namespace prefix: {} ({:.1}s)",
        topo.prefix(),
        started.elapsed().as_secs_f64()
    );

    step(3, STEPS, "checking the underlay (WAN and cluster LANs)");
    let results = topo.check_underlay(Duration::from_secs(5))?;
    let failed = results.iter().filter(|r| !r.ok).count();
    if failed > 0 {
        print!("{}", indent(&probe_table(&results).render()));
    }
    anyhow::ensure!(
        failed == 0,
        "{failed} underlay checks failed (see the table above)"
    );
    println!("      underlay ok: {} checks passed", results.len());
    print!("{}", indent(&hosts_table(topo).render()));

    step(
        4,
        STEPS,
        "starting l2mesh: broker, network, tokens, agents, dataplanes, pods",
    );
    let mesh = if cli.broker_replicas > 0 {
        Mesh::start_replicated(&lab, &bins, progress, usize::from(cli.broker_replicas))?
    } else {
        Mesh::start(&lab, &bins, progress)?
    };
    println!("\n      clusters at the broker:");
    print!("{}", indent(&mesh.admin(&lab, &["cluster", "list"])?));
    println!("\n      networks at the broker:");
    print!("{}", indent(&mesh.admin(&lab, &["network", "list"])?));

    step(
        5,
        STEPS,
        "pinging between every pair of pods, across clusters",
    );
    let v4 = mesh.ping_matrix(&lab, false, Duration::from_secs(20))?;
    let v6 = mesh.ping_matrix(&lab, true, Duration::from_secs(20))?;
    print!("{}", indent(&ping_table(&mesh, &v4, &v6).render()));
    for c in topo.plan().clusters.iter() {
        if let Some(gw) = c.nodes.first() {
            println!(
                "\n      tunnels of {} (l2mesh-dataplane status):",
                gw.host.role
            );
            print!("{}", indent(&mesh.status(&lab, &bins, &gw.host.role)?));
        }
    }
    let failures = v4.iter().chain(&v6).filter(|r| !r.2).count();
    if failures == 0 {
        println!(
            "\nall {} pod pairs reach each other over IPv4 and IPv6 ({:.1}s)",
            v4.len(),
            started.elapsed().as_secs_f64()
        );
    } else {
        println!(
            "\n{failures} pings FAILED (logs in {})",
            lab.log_dir().display()
        );
    }
    if cli.keep {
        keep(lab, &mesh, &bins);
    }
    Ok(if failures == 0 {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

fn keep(lab: Lab, mesh: &Mesh, bins: &binaries::Binaries) {
    let l2mesh_e2e::lab::Kept {
        namespaces: kept,
        processes: procs,
        dir,
    } = lab.keep();
    println!("\nkept the topology up (--keep). Namespaces:");
    let mut t = Table::new(["role", "namespace", "l2mesh address"]);
    for (role, ns) in &kept {
        let addr = mesh
            .pods
            .iter()
            .find(|p| &p.role == role)
            .map(|p| format!("{} {}", p.v4, p.v6))
            .unwrap_or_default();
        t.row([role.clone(), ns.clone(), addr]);
    }
    print!("{}", indent(&t.render()));
    println!(
        "      {} processes keep running; state and logs in {}",
        procs.len(),
        dir.display()
    );
    let ns_of = |role: &str| kept.iter().find(|(r, _)| r == role).map(|(_, n)| n.clone());
    if let (Some(a), Some(b)) = (mesh.pods.first(), mesh.pods.last())
        && let Some(ns) = ns_of(&a.role)
    {
        println!("\nfor example:");
        println!("      ip netns exec {ns} ping -c3 {}", b.v4);
        println!(
            "      ip netns exec {ns} ip addr show {}",
            l2mesh_e2e::mesh::POD_IF
        );
    }
    if let Some(n) = mesh.nodes.first()
        && let Some(ns) = ns_of(&n.role)
        && let Ok(dataplane) = bins.path("l2mesh-dataplane")
    {
        println!(
            "      ip netns exec {ns} {} status --socket {}",
            dataplane.display(),
            n.socket.display()
        );
    }
    println!("remove it with: l2mesh-demo --cleanup");
}

fn probe_table(results: &[l2mesh_e2e::topology::ProbeResult]) -> Table {
    let mut probes = Table::new(["from", "to", "address", "expect", "result"]);
    for r in results {
        probes.row([
            r.probe.from.clone(),
            r.probe.to.clone(),
            r.probe.addr.to_string(),
            if r.probe.expect_reply {
                "reply"
            } else {
                "isolated"
            }
            .to_owned(),
            match (r.ok, r.replied) {
                (true, _) => "ok".to_owned(),
                (false, true) => "FAILED: got a reply".to_owned(),
                (false, false) => "FAILED: no reply".to_owned(),
            },
        ]);
    }
    probes
}

/// From-pod rows, to-pod columns; each cell `v4/v6`.
fn ping_table(mesh: &Mesh, v4: &[(String, String, bool)], v6: &[(String, String, bool)]) -> Table {
    let mark = |set: &[(String, String, bool)], a: &str, b: &str| {
        set.iter()
            .find(|r| r.0 == a && r.1 == b)
            .map_or("?", |r| if r.2 { "ok" } else { "FAIL" })
    };
    let mut header = vec!["from \\ to (v4/v6)".to_owned()];
    header.extend(mesh.pods.iter().map(|p| p.role.clone()));
    let mut t = Table::new(header);
    for a in &mesh.pods {
        let mut row = vec![a.role.clone()];
        for b in &mesh.pods {
            row.push(if a.role == b.role {
                "-".to_owned()
            } else {
                format!(
                    "{}/{}",
                    mark(v4, &a.role, &b.role),
                    mark(v6, &a.role, &b.role)
                )
            });
        }
        t.row(row);
    }
    t
}

fn hosts_table(topo: &Topology) -> Table {
    let plan = topo.plan();
    let mut t = Table::new(["role", "namespace", "interfaces"]);
    for h in plan.hosts() {
        let ns = topo
            .netns(&h.role)
            .map(|n| n.name().to_owned())
            .unwrap_or_default();
        let ifaces: Vec<String> = h
            .ifaces
            .iter()
            .map(|i| format!("{} {} ({})", i.name, i.addr, i.segment.label()))
            .collect();
        t.row([h.role.clone(), ns, ifaces.join(", ")]);
    }
    for c in &plan.clusters {
        for n in &c.nodes {
            for p in &n.pods {
                let ns = topo
                    .netns(p)
                    .map(|n| n.name().to_owned())
                    .unwrap_or_default();
                t.row([p.clone(), ns, "lo only (awaiting l2mesh-cni)".to_owned()]);
            }
        }
    }
    t
}

fn indent(text: &str) -> String {
    text.lines().map(|l| format!("      {l}\n")).collect()
}

#[cfg(test)]
mod tests {
    use clap::CommandFactory;

    #[test]
    fn cli_definition_is_consistent() {
        super::Cli::command().debug_assert();
    }

    #[test]
    fn help_names_the_prebuilt_binaries_variable() {
        let help = super::Cli::command().render_long_help().to_string();
        assert!(help.contains(l2mesh_e2e::binaries::BIN_DIR_ENV), "{help}");
    }

    #[test]
    fn indent_prefixes_every_line() {
        assert_eq!(super::indent("a\nb\n"), "      a\n      b\n");
    }
}
