//! Scenarios 3 to 6: broker and agent restarts, cluster removal
//! and key rotation under traffic. Root only; the workspace binaries are
//! built once per test process.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::net::IpAddr;
use std::time::Duration;

use l2mesh_e2e::binaries::workspace_binaries;
use l2mesh_e2e::plan::TopologySpec;
use l2mesh_e2e::should_run;

mod common;
use common::*;

/// Scenario 3: the broker is killed and traffic keeps flowing; it restarts
/// with its state, agents reconnect by themselves, and a network created
/// after the restart reaches every cluster.
#[test]
fn scenario_3_broker_restart_loses_nothing_and_agents_reconnect() {
    if !should_run(
        "scenario_3_broker_restart_loses_nothing_and_agents_reconnect",
        &["ip", "ping"],
    ) {
        return;
    }
    let (lab, mesh) = converged_mesh(two_clusters());
    let clusters_before = mesh.admin(&lab, &["cluster", "list"]).unwrap();
    let sessions = |agent| {
        lab.procs()
            .log(agent)
            .unwrap()
            .matches("broker session up")
            .count()
    };
    for &agent in &mesh.agents {
        lab.wait_until(
            "agents hold their broker sessions",
            Duration::from_secs(10),
            || sessions(agent) >= 1,
        )
        .unwrap();
    }

    lab.procs().kill(mesh.broker).unwrap();
    let ping = ping_between(
        &lab,
        &mesh,
        "ping-without-broker",
        "c1-n1-p1",
        "c2-gw-p1",
        Duration::from_millis(50),
    );
    lab.wait_until(
        "pods keep talking with the broker down",
        Duration::from_secs(10),
        || {
            lab.procs()
                .log(ping.id())
                .unwrap()
                .matches(" bytes from ")
                .count()
                >= 20
        },
    )
    .unwrap();
    let stats = ping.finish(lab.procs()).unwrap();
    assert!(stats.lost() <= 1, "{stats:?}");

    lab.procs().restart(mesh.broker).unwrap();
    for &agent in &mesh.agents {
        lab.wait_until(
            "the agents reconnect by themselves",
            Duration::from_secs(30),
            || sessions(agent) >= 2,
        )
        .unwrap();
    }
    let clusters_after = mesh.admin(&lab, &["cluster", "list"]).unwrap();
    let names = |out: &str| -> Vec<String> {
        rows(out)
            .iter()
            .filter_map(|l| l.split_whitespace().next().map(str::to_owned))
            .collect()
    };
    assert_eq!(
        names(&clusters_after),
        names(&clusters_before),
        "{clusters_after}"
    );

    mesh.admin(
        &lab,
        &[
            "network",
            "create",
            "green",
            "--cidr",
            "10.201.0.0/16",
            "--allow",
            "c1",
            "--allow",
            "c2",
        ],
    )
    .unwrap();
    for c in ["c1", "c2"] {
        lab.write_file(
            &format!("{c}/agent/manifests/green.yaml"),
            &l2mesh_e2e::mesh::network_manifest("green"),
        )
        .unwrap();
    }
    lab.wait_until(
        "both clusters are members of green",
        Duration::from_secs(20),
        || {
            mesh.admin(&lab, &["network", "list"]).is_ok_and(|out| {
                rows(&out)
                    .iter()
                    .any(|l| l.starts_with("green") && l.trim_end().ends_with("c1,c2"))
            })
        },
    )
    .unwrap();
    let networks = mesh.admin(&lab, &["network", "list"]).unwrap();
    assert!(
        rows(&networks)
            .iter()
            .any(|l| l.starts_with("blue") && l.trim_end().ends_with("c1,c2")),
        "blue lost its members:\n{networks}"
    );
}

/// Scenario 4: an agent restarts while a ping runs: the dataplanes keep
/// forwarding, and the agent resumes from its state dir without a new
/// token (its join string was single-use and is spent).
#[test]
fn scenario_4_agent_restart_keeps_traffic_and_needs_no_new_token() {
    if !should_run(
        "scenario_4_agent_restart_keeps_traffic_and_needs_no_new_token",
        &["ip", "ping"],
    ) {
        return;
    }
    let (lab, mesh) = converged_mesh(two_clusters());
    let ping = ping_between(
        &lab,
        &mesh,
        "ping-across",
        "c1-n1-p1",
        "c2-n1-p1",
        Duration::from_millis(50),
    );
    let agent = mesh.agents[0];
    let sessions = || {
        lab.procs()
            .log(agent)
            .unwrap()
            .matches("broker session up")
            .count()
    };
    lab.wait_until(
        "the c1 agent holds its broker session",
        Duration::from_secs(10),
        || sessions() >= 1,
    )
    .unwrap();
    lab.procs().kill(agent).unwrap();
    let replies = |log: String| log.matches(" bytes from ").count();
    let before = replies(lab.procs().log(ping.id()).unwrap());
    lab.wait_until(
        "pods keep talking with the agent down",
        Duration::from_secs(10),
        || replies(lab.procs().log(ping.id()).unwrap()) >= before + 20,
    )
    .unwrap();
    lab.procs().restart(agent).unwrap();
    lab.wait_until(
        "the restarted agent is back at the broker",
        Duration::from_secs(20),
        || sessions() >= 2,
    )
    .unwrap();
    let log = lab.procs().log(agent).unwrap();
    assert_eq!(
        log.matches("joined the broker").count(),
        1,
        "the agent joined again instead of resuming:\n{log}"
    );
    let stats = ping.finish(lab.procs()).unwrap();
    assert!(
        stats.lost() <= 2,
        "lost {} of {} pings",
        stats.lost(),
        stats.transmitted
    );
}

/// Scenario 5: a cluster removed at the broker loses its tunnels at the
/// other clusters within seconds, and its pods no longer reach theirs.
#[test]
fn scenario_5_removed_cluster_is_cut_off() {
    if !should_run("scenario_5_removed_cluster_is_cut_off", &["ip", "ping"]) {
        return;
    }
    let bins = workspace_binaries().unwrap_or_else(|e| panic!("{e}"));
    let (lab, mesh) = converged_mesh(TopologySpec {
        clusters: 3,
        nodes_per_cluster: 1,
        pods_per_node: 1,
    });
    let status = mesh.status(&lab, bins, "c1-gw").unwrap();
    assert!(status.contains("c3/c3-gw"), "{status}");

    mesh.admin(&lab, &["cluster", "remove", "c3"]).unwrap();
    lab.wait_until(
        "c1 and c2 drop their tunnels to c3",
        Duration::from_secs(10),
        || {
            ["c1-gw", "c2-gw"].iter().all(|gw| {
                mesh.status(&lab, bins, gw)
                    .is_ok_and(|s| !s.contains("c3/c3-gw"))
            })
        },
    )
    .unwrap();
    let c3 = lab.topology().netns("c3-gw-p1").unwrap();
    lab.wait_until(
        "c3's pod no longer reaches c1's",
        Duration::from_secs(10),
        || {
            !c3.ping(IpAddr::V4(pod(&mesh, "c1-gw-p1").v4), 1)
                .unwrap_or(true)
        },
    )
    .unwrap();
    lab.assert_unreachable(c3, IpAddr::V4(pod(&mesh, "c2-gw-p1").v4))
        .unwrap();
    // The remaining clusters still talk.
    lab.wait_reachable(
        lab.topology().netns("c1-gw-p1").unwrap(),
        IpAddr::V4(pod(&mesh, "c2-gw-p1").v4),
        Duration::from_secs(10),
    )
    .unwrap();
    let clusters = mesh.admin(&lab, &["cluster", "list"]).unwrap();
    assert!(!clusters.contains("c3 "), "{clusters}");
}

/// Scenario 6: the key of a gateway is rotated while a ping crosses it: no
/// more than a couple of packets are lost, and traffic flows on the new key.
#[test]
fn scenario_6_key_rotation_under_traffic_loses_at_most_a_couple_of_packets() {
    if !should_run(
        "scenario_6_key_rotation_under_traffic_loses_at_most_a_couple_of_packets",
        &["ip", "ping"],
    ) {
        return;
    }
    let bins = workspace_binaries().unwrap_or_else(|e| panic!("{e}"));
    let (lab, mesh) = converged_mesh(two_clusters());
    let gw = mesh.nodes.iter().find(|n| n.role == "c1-gw").unwrap();
    let gw_ns = lab.topology().netns(&gw.role).unwrap();
    let dp = bins.path("l2mesh-dataplane").unwrap();
    let pubkey = || {
        gw_ns
            .run(
                dp,
                [
                    std::ffi::OsStr::new("pubkey"),
                    "--socket".as_ref(),
                    gw.socket.as_os_str(),
                ],
            )
            .map(|k| k.trim().to_owned())
    };
    let old_key = pubkey().unwrap();

    let ping = ping_between(
        &lab,
        &mesh,
        "ping-across-rotation",
        "c1-n1-p1",
        "c2-n1-p1",
        Duration::from_millis(20),
    );
    let replies = || {
        lab.procs()
            .log(ping.id())
            .unwrap()
            .matches(" bytes from ")
            .count()
    };
    lab.wait_until(
        "20 replies before the rotation",
        Duration::from_secs(10),
        || replies() >= 20,
    )
    .unwrap();
    let printed = gw_ns
        .run(
            dp,
            [
                std::ffi::OsStr::new("rotate-key"),
                "--socket".as_ref(),
                gw.socket.as_os_str(),
            ],
        )
        .unwrap();
    let new_key = pubkey().unwrap();
    assert_ne!(
        new_key, old_key,
        "rotate-key printed {printed:?} but the key stayed"
    );
    let after = replies();
    lab.wait_until(
        "100 replies after the rotation",
        Duration::from_secs(20),
        || replies() >= after + 100,
    )
    .unwrap();
    let stats = ping.finish(lab.procs()).unwrap();
    assert!(
        stats.lost() <= 2,
        "lost {} of {} pings across the rotation\n{}",
        stats.lost(),
        stats.transmitted,
        lab.procs().report(20)
    );
}
