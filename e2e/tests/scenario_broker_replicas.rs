//! Two broker replicas on a 3-member etcd (on the broker host), both named
//! in the join strings. The replica the agents are connected to is killed:
//! pods keep pinging, the agents reconnect to the survivor without
//! rejoining, and a network created on the survivor reaches every cluster.
//! Root only; the workspace binaries are built once per test process.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::Duration;

use l2mesh_e2e::Lab;
use l2mesh_e2e::binaries::workspace_binaries;
use l2mesh_e2e::mesh::{Mesh, network_manifest};
use l2mesh_e2e::should_run;

mod common;
use common::*;

#[test]
fn scenario_broker_replicas_on_etcd_survive_losing_one() {
    if !should_run(
        "scenario_broker_replicas_on_etcd_survive_losing_one",
        &["ip", "ping", "etcd"],
    ) {
        return;
    }
    let bins = workspace_binaries().unwrap_or_else(|e| panic!("{e}"));
    let lab = Lab::build(two_clusters()).unwrap();
    let mesh = Mesh::start_replicated(&lab, bins, &mut |_| {}, 2).unwrap_or_else(|e| panic!("{e}"));
    assert_all_reach(&lab, &mesh, false);
    let sessions = |i: usize| {
        lab.procs()
            .log(mesh.agents[i])
            .unwrap()
            .matches("broker session up")
            .count()
    };
    lab.wait_until(
        "agents hold their broker sessions",
        Duration::from_secs(20),
        || (0..mesh.agents.len()).all(|i| sessions(i) >= 1),
    )
    .unwrap();
    let before: Vec<usize> = (0..mesh.agents.len()).map(sessions).collect();
    let bg = ping_between(
        &lab,
        &mesh,
        "ping-across-replica-loss",
        "c1-n1-p1",
        "c2-n1-p1",
        Duration::from_millis(200),
    );

    // The first replica (where every agent connected: it comes first in
    // the join string) dies.
    lab.procs().kill(mesh.replicas[0]).unwrap();
    lab.wait_until(
        "every agent reconnects to the surviving replica",
        Duration::from_secs(60),
        || (0..mesh.agents.len()).all(|i| sessions(i) > before[i]),
    )
    .unwrap_or_else(|e| panic!("{e}\n{}", lab.procs().report(30)));
    for (i, agent) in mesh.agents.iter().enumerate() {
        let log = lab.procs().log(*agent).unwrap();
        assert!(
            log.matches("joined the broker").count() <= 1,
            "agent {i} joined again instead of resuming"
        );
    }

    // A network created on the survivor reaches every cluster.
    mesh.admin(
        &lab,
        &[
            "network",
            "create",
            "red",
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
            &format!("{c}/agent/manifests/red.yaml"),
            &network_manifest("red"),
        )
        .unwrap();
    }
    lab.wait_until(
        "both clusters are members of the new network",
        Duration::from_secs(30),
        || {
            mesh.admin(&lab, &["network", "list"]).is_ok_and(|out| {
                // The last column is MEMBERS.
                out.lines()
                    .any(|l| l.starts_with("red ") && l.split_whitespace().last() == Some("c1,c2"))
            })
        },
    )
    .unwrap_or_else(|e| {
        panic!(
            "{e}\n{}\n{}",
            mesh.admin(&lab, &["network", "list"]).unwrap_or_default(),
            lab.procs().report(30)
        )
    });
    lab.wait_until(
        "every agent's view has both networks",
        Duration::from_secs(30),
        || {
            mesh.agents.iter().all(|a| {
                lab.procs().log(*a).is_ok_and(|l| {
                    l.lines()
                        .any(|x| x.contains("cluster view") && x.contains("networks=2"))
                })
            })
        },
    )
    .unwrap_or_else(|e| panic!("{e}\n{}", lab.procs().report(30)));

    // Pods kept talking through it all.
    let stats = bg.finish(lab.procs()).unwrap();
    assert!(stats.received > 0, "no ping answered: {stats:?}");
    assert_all_reach(&lab, &mesh, false);
}
