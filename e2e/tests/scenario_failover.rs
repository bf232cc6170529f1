//! Standby gateway failover on real processes: cluster c1 gets a second
//! gateway (c1-n1, given a WAN leg), then the active gateway's dataplane
//! is killed. The agent sees its node-sync stream close, moves the remote
//! tunnels to c1-n1, reports it to the broker, and c1's pods reach c2 again
//! through it. Root only; the workspace binaries are built once per test
//! process.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::net::IpAddr;
use std::time::{Duration, Instant};

use l2mesh_e2e::mesh::WG_PORT;
use l2mesh_e2e::plan::Segment;
use l2mesh_e2e::should_run;

mod common;
use common::*;

/// WAN address of c1-n1's extra leg (the plan uses .1 and .10+c).
const N1_WAN: &str = "192.0.2.50";

#[test]
fn scenario_failover_standby_gateway_takes_over_when_the_active_dataplane_dies() {
    if !should_run(
        "scenario_failover_standby_gateway_takes_over_when_the_active_dataplane_dies",
        &["ip", "ping"],
    ) {
        return;
    }
    let (lab, mesh) = converged_mesh(two_clusters());
    let topo = lab.topology();

    // c1-n1 gets a leg on the WAN, like a second gateway machine would have.
    let n1 = topo.netns("c1-n1").unwrap();
    topo.switch().add_veth("c1n1-w", n1, "wan1").unwrap();
    topo.switch()
        .set_master("c1n1-w", &Segment::Wan.bridge())
        .unwrap();
    topo.switch().link_up("c1n1-w").unwrap();
    n1.link_up("wan1").unwrap();
    n1.add_addr("wan1", format!("{N1_WAN}/24").parse().unwrap())
        .unwrap();

    // Both are gateways now; c1-gw stays active (the role is sticky).
    lab.write_file(
        "c1/agent/manifests/nodes.yaml",
        &format!(
            "apiVersion: l2mesh.io/v1alpha1\nkind: Nodes\nnodes:\n  - {{name: c1-gw, gateway: true, endpoint: '192.0.2.11:{WG_PORT}'}}\n  - {{name: c1-n1, gateway: true, endpoint: '{N1_WAN}:{WG_PORT}'}}\n"
        ),
    )
    .unwrap();
    let agent = mesh.agents[0];
    let log = || lab.procs().log(agent).unwrap();
    lab.wait_until(
        "the agent reads the new node list",
        Duration::from_secs(10),
        || log().matches("manifests loaded").count() >= 2,
    )
    .unwrap();
    let gateways = || {
        rows(&mesh.admin(&lab, &["cluster", "list"]).unwrap())
            .into_iter()
            .find(|r| r.starts_with("c1 "))
            .unwrap_or_default()
    };
    assert!(gateways().contains("c1-gw"), "{}", gateways());
    assert!(!log().contains("gateway failover"));
    let to = IpAddr::V4(pod(&mesh, "c2-n1-p1").v4);
    let from = topo.netns("c1-n1-p1").unwrap();
    assert!(
        from.ping(to, 5).unwrap(),
        "c1-n1-p1 reaches c2 through c1-gw"
    );

    // The active gateway's dataplane dies.
    let gw_dp = mesh.nodes.iter().find(|n| n.role == "c1-gw").unwrap().proc;
    let killed = Instant::now();
    lab.procs().kill(gw_dp).unwrap();
    lab.wait_until("the agent fails over", Duration::from_secs(5), || {
        log().contains("gateway failover")
    })
    .unwrap();
    let noticed = killed.elapsed();
    lab.wait_until(
        "the broker hears of the new gateway",
        Duration::from_secs(10),
        || gateways().contains("c1-n1") && !gateways().contains("c1-gw"),
    )
    .unwrap();
    lab.wait_until(
        "c1-n1-p1 reaches c2 through c1-n1",
        Duration::from_secs(30),
        || from.ping(to, 1).unwrap_or(false),
    )
    .unwrap();
    let recovered = killed.elapsed();
    eprintln!("failover noticed after {noticed:?}, traffic back after {recovered:?}");
    assert!(
        noticed < Duration::from_secs(3),
        "a closed stream is noticed at once ({noticed:?})"
    );
    // And the other way round, from the remote cluster.
    let back = topo.netns("c2-gw-p1").unwrap();
    assert!(
        back.ping(IpAddr::V4(pod(&mesh, "c1-n1-p1").v4), 5).unwrap(),
        "c2 reaches c1-n1-p1 through the new gateway"
    );
}
