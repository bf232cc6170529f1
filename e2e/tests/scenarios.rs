//! End-to-end scenarios with the real binaries (issue 6). Root only; the
//! workspace binaries are built once per test process.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::Duration;

use l2mesh_e2e::binaries::workspace_binaries;
use l2mesh_e2e::capture::Capture;
use l2mesh_e2e::mesh::{Mesh, POD_IF};
use l2mesh_e2e::plan::TopologySpec;
use l2mesh_e2e::preflight::NETNS_TOOLS;
use l2mesh_e2e::{Lab, should_run};

fn failed(results: &[(String, String, bool)]) -> Vec<String> {
    results
        .iter()
        .filter(|r| !r.2)
        .map(|(a, b, _)| format!("{a} -> {b}"))
        .collect()
}

/// Scenario 1: three clusters join with tokens from the broker CLI; one
/// multi-cluster network spans them; pods on gateway and non-gateway nodes
/// reach each other over IPv4 and IPv6; a broadcast reaches every pod.
#[test]
fn scenario_1_three_clusters_share_one_l2_segment() {
    if !should_run(
        "scenario_1_three_clusters_share_one_l2_segment",
        &["ip", "ping", "tcpdump"],
    ) {
        return;
    }
    let _ = NETNS_TOOLS;
    let t0 = std::time::Instant::now();
    let bins = workspace_binaries().unwrap_or_else(|e| panic!("{e}"));
    let lab = Lab::build(TopologySpec::default()).unwrap();
    let mut progress = |what: &str| eprintln!("[{:5.1}s] {what}", t0.elapsed().as_secs_f64());
    progress("binaries and topology ready");
    let mesh = Mesh::start(&lab, bins, &mut progress).unwrap_or_else(|e| panic!("{e}"));
    progress("mesh up");
    assert_eq!(mesh.pods.len(), 6);

    let v4 = mesh
        .ping_matrix(&lab, false, Duration::from_secs(20))
        .unwrap();
    let bad = failed(&v4);
    assert!(
        bad.is_empty(),
        "IPv4 pings failed: {bad:?}\n{}",
        lab.procs().report(30)
    );
    progress("IPv4 matrix ok");
    let v6 = mesh
        .ping_matrix(&lab, true, Duration::from_secs(20))
        .unwrap();
    let bad = failed(&v6);
    assert!(
        bad.is_empty(),
        "IPv6 pings failed: {bad:?}\n{}",
        lab.procs().report(30)
    );

    progress("IPv6 matrix ok");
    // A broadcast from the first pod reaches every other pod.
    let topo = lab.topology();
    let sender = &mesh.pods[0];
    let captures: Vec<(String, Capture)> = mesh.pods[1..]
        .iter()
        .map(|p| {
            let cap = Capture::start(
                lab.procs(),
                &format!("bcast-{}", p.role),
                topo.netns(&p.role).unwrap(),
                POD_IF,
                "icmp",
            )
            .unwrap();
            (p.role.clone(), cap)
        })
        .collect();
    let marker = b"L2MESHBCAST";
    let pattern: String = marker.iter().map(|b| format!("{b:02x}")).collect();
    let out = topo
        .netns(&sender.role)
        .unwrap()
        .exec(
            "ping",
            ["-b", "-c", "1", "-W", "1", "-p", &pattern, "10.200.255.255"],
        )
        .unwrap();
    let _ = out;
    let mut missing = Vec::new();
    for (role, cap) in captures {
        let pcap = cap.stop(lab.procs()).unwrap();
        if !pcap.contains(marker) {
            missing.push(role);
        }
    }
    assert!(
        missing.is_empty(),
        "the broadcast from {} did not reach {missing:?}",
        sender.role
    );
}
