//! `l2mesh-demo`: a local three-cluster demo on network namespaces.

use std::io::Write as _;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use clap::Parser;
use l2mesh_e2e::plan::{Segment, TopologySpec};
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
    /// Leave the topology up on exit, with instructions for poking at it.
    #[arg(long, env = "L2MESH_DEMO_KEEP")]
    keep: bool,
    /// Remove what earlier `--keep` runs (or killed tests) left behind, then exit.
    #[arg(long, env = "L2MESH_DEMO_CLEANUP", conflicts_with = "keep")]
    cleanup: bool,
}

/// Exit code when the demo ran as far as it can but l2mesh itself is
/// missing: never a success.
const EXIT_NOT_BUILT: u8 = 3;

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
    const STEPS: usize = 3;

    step(1, STEPS, "building the topology out of network namespaces");
    let started = Instant::now();
    let topo = Topology::build(spec, &mut |what| {
        println!("      + {what}");
        let _ = std::io::stdout().flush();
    })?;
    println!(
        "      namespace prefix: {} ({:.1}s)",
        topo.prefix(),
        started.elapsed().as_secs_f64()
    );

    step(2, STEPS, "checking the underlay (WAN and cluster LANs)");
    let results = topo.check_underlay(Duration::from_secs(5))?;
    let mut probes = Table::new(["from", "to", "address", "expect", "result"]);
    for r in &results {
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
    print!("{}", indent(&probes.render()));
    let failed = results.iter().filter(|r| !r.ok).count();
    anyhow::ensure!(
        failed == 0,
        "{failed} underlay checks failed (see the table above)"
    );
    println!("      underlay ok: {} checks passed", results.len());
    print!("{}", indent(&hosts_table(&topo).render()));

    step(3, STEPS, "l2mesh: broker, agents, dataplanes, pods");
    println!(
        "      not built yet: the demo does not run the l2mesh broker, agents and dataplanes\n\
         \x20     yet, so there are no tunnels and no pod traffic to show. Only the underlay\n\
         \x20     above was built and checked."
    );
    if cli.keep {
        let plan = topo.plan().clone();
        let kept = topo.keep();
        println!("\nkept the topology up (--keep). Namespaces:");
        let mut t = Table::new(["role", "namespace"]);
        for (role, ns) in &kept {
            t.row([role.clone(), ns.clone()]);
        }
        print!("{}", indent(&t.render()));
        if let Some((_, gw)) = kept.iter().find(|(role, _)| role == "c1-gw") {
            let broker = plan
                .broker
                .addr_on(Segment::Wan)
                .map_or_else(String::new, |a| a.to_string());
            println!("\nfor example:");
            println!("      ip netns exec {gw} ip addr");
            println!("      ip netns exec {gw} ping -c1 {broker}");
        }
        println!("remove it with: l2mesh-demo --cleanup");
    }
    Ok(ExitCode::from(EXIT_NOT_BUILT))
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
    fn indent_prefixes_every_line() {
        assert_eq!(super::indent("a\nb\n"), "      a\n      b\n");
    }
}
