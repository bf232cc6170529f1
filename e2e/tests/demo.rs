//! The demo binary: it runs the real mesh and cleans up, `--keep` leaves
//! it working, `--cleanup` removes it, Ctrl-C mid-build removes everything.
//! Root only (skipped with a reason otherwise, failing when `CI` is set).

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::process::Command;
use std::time::Duration;

use l2mesh_e2e::netns::{self, NameScope};
use l2mesh_e2e::preflight::NETNS_TOOLS;
use l2mesh_e2e::process::Processes;
use l2mesh_e2e::should_run;

fn leftovers(prefix: &str) -> Vec<String> {
    l2mesh_e2e::registry::parse_netns_list(&netns::list_all().expect("ip netns list"))
        .into_iter()
        .filter(|n| n.starts_with(prefix))
        .collect()
}

/// Where the workspace binaries are, for the demo (so it does not build).
fn bin_dir() -> std::path::PathBuf {
    let bins = l2mesh_e2e::binaries::workspace_binaries().unwrap_or_else(|e| panic!("{e}"));
    bins.path("l2mesh-broker")
        .unwrap()
        .parent()
        .unwrap()
        .to_path_buf()
}

fn demo() -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_l2mesh-demo"));
    cmd.env(l2mesh_e2e::binaries::BIN_DIR_ENV, bin_dir())
        .env_remove("L2MESH_DEMO_KEEP");
    cmd
}

fn prefix_of(text: &str) -> String {
    let prefix = text
        .lines()
        .find_map(|l| l.trim().strip_prefix("namespace prefix: "))
        .and_then(|rest| rest.split_whitespace().next())
        .unwrap_or_else(|| panic!("the demo did not print its namespace prefix:\n{text}"))
        .to_owned();
    assert!(prefix.starts_with("l2e-"), "{prefix}");
    prefix
}

#[test]
fn the_demo_runs_the_mesh_pings_across_clusters_and_cleans_up() {
    if !should_run(
        "the_demo_runs_the_mesh_pings_across_clusters_and_cleans_up",
        &NETNS_TOOLS,
    ) {
        return;
    }
    let out = demo()
        .args(["--clusters", "2", "--nodes", "2"])
        .output()
        .unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "the demo failed:\n{text}");
    for needle in [
        "underlay ok",
        "clusters at the broker",
        "tunnels of c1-gw",
        "all 12 pod pairs reach each other over IPv4 and IPv6",
    ] {
        assert!(text.contains(needle), "lacks {needle:?}:\n{text}");
    }
    let prefix = prefix_of(&text);
    assert_eq!(
        leftovers(&prefix),
        Vec::<String>::new(),
        "the demo left namespaces behind"
    );
}

#[test]
fn demo_keep_leaves_the_topology_up_and_cleanup_removes_it() {
    if !should_run(
        "demo_keep_leaves_the_topology_up_and_cleanup_removes_it",
        &NETNS_TOOLS,
    ) {
        return;
    }
    // Even if an assertion fails, what the kept demo left goes.
    struct Sweep;
    impl Drop for Sweep {
        fn drop(&mut self) {
            let _ = l2mesh_e2e::registry::sweep_stale();
        }
    }
    let _sweep = Sweep;
    let out = demo()
        .args(["--clusters", "2", "--nodes", "1", "--pods", "1", "--keep"])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "{text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let prefix = prefix_of(&text);
    let kept = leftovers(&prefix);
    assert_eq!(
        kept.len(),
        1 + 1 + 2 + 2,
        "sw, broker, 2 nodes, 2 pods: {kept:?}"
    );
    assert!(
        text.contains("ip netns exec"),
        "instructions missing:\n{text}"
    );
    // Nothing was built, and the demo says where its binaries came from;
    // the hints name binaries by full path (they are not on PATH).
    assert!(
        text.contains("[1/5] using the prebuilt binaries") && !text.contains("building the l2mesh"),
        "{text}"
    );
    let dataplane = bin_dir().join("l2mesh-dataplane");
    assert!(
        text.contains(&format!("{} status --socket", dataplane.display())),
        "{text}"
    );
    // The mesh keeps working after the demo exited: pod of c1 to pod of c2.
    let pod = format!("{prefix}c1-gw-p1");
    let ping = Command::new("ip")
        .args(["netns", "exec", &pod, "ping", "-c1", "-W2", "10.200.0.2"])
        .status()
        .unwrap();
    assert!(ping.success(), "the kept mesh should still work:\n{text}");

    let out = demo().arg("--cleanup").output().unwrap();
    let cleaned = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{cleaned}");
    assert_eq!(leftovers(&prefix), Vec::<String>::new(), "{cleaned}");
}

#[test]
fn demo_interrupted_mid_build_removes_everything() {
    if !should_run(
        "demo_interrupted_mid_build_removes_everything",
        &NETNS_TOOLS,
    ) {
        return;
    }
    use nix::sys::signal::{Signal, kill};
    use nix::unistd::Pid;
    let scope = NameScope::new();
    let log_path = std::env::temp_dir().join(format!("{}demo-int.log", scope.prefix()));
    let log = std::fs::File::create(&log_path).unwrap();
    let mut child = demo()
        .args(["--clusters", "12", "--nodes", "3", "--pods", "1"])
        .stdout(log.try_clone().unwrap())
        .stderr(log)
        .spawn()
        .unwrap();
    let procs = Processes::new(std::env::temp_dir());
    let waited = procs.wait_until(
        "the demo is building hosts",
        Duration::from_secs(20),
        || std::fs::read_to_string(&log_path).is_ok_and(|l| l.contains("+ host c2-gw")),
    );
    kill(
        Pid::from_raw(i32::try_from(child.id()).unwrap()),
        Signal::SIGINT,
    )
    .unwrap();
    let status = child.wait().unwrap();
    let text = std::fs::read_to_string(&log_path).unwrap_or_default();
    let _ = std::fs::remove_file(&log_path);
    waited.unwrap_or_else(|e| panic!("{e}\n{text}"));
    assert_eq!(status.code(), Some(130), "{text}");
    assert!(text.contains("cleaning up"), "{text}");
    let prefix = format!("l2e-{}-", child.id());
    assert_eq!(leftovers(&prefix), Vec::<String>::new(), "{text}");
}
