//! A pod re-created with a new MAC and the same addresses is reachable at
//! once from another cluster: `l2mesh-cni` announces its addresses after
//! ADD (gratuitous ARP, unsolicited neighbour advertisement), so the peer's
//! neighbour entries change without waiting for them to time out. Root
//! only; the workspace binaries are built once per test process.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::net::IpAddr;
use std::time::Duration;

use l2mesh_e2e::binaries::workspace_binaries;
use l2mesh_e2e::cni::CniCall;
use l2mesh_e2e::mesh::{NETWORK, POD_IF};
use l2mesh_e2e::netns::Netns;
use l2mesh_e2e::should_run;

mod common;
use common::*;

/// The lladdr of `ip` in `ns`'s neighbour table on the pod interface.
fn neighbour_mac(ns: &Netns, ip: IpAddr) -> Option<String> {
    let out = ns
        .run("ip", ["neigh", "show", &ip.to_string(), "dev", POD_IF])
        .unwrap_or_default();
    let mut words = out.split_whitespace();
    words.find(|w| *w == "lladdr")?;
    words.next().map(str::to_owned)
}

#[test]
fn a_recreated_pod_with_a_new_mac_is_reachable_at_once_across_clusters() {
    if !should_run(
        "a_recreated_pod_with_a_new_mac_is_reachable_at_once_across_clusters",
        &["ip", "ping"],
    ) {
        return;
    }
    let bins = workspace_binaries().unwrap_or_else(|e| panic!("{e}"));
    let cni = bins.path("l2mesh-cni").unwrap().to_path_buf();
    let (lab, mesh) = converged_mesh(two_clusters());
    // The agents got their join strings (token secrets) from files: no
    // command line, which every user can read in /proc, carries one.
    for entry in std::fs::read_dir("/proc").unwrap().flatten() {
        let cmdline = std::fs::read(entry.path().join("cmdline")).unwrap_or_default();
        let cmdline = String::from_utf8_lossy(&cmdline).replace('\0', " ");
        assert!(
            !(cmdline.contains("l2mesh-agent") && cmdline.contains("l2mesh1.")),
            "a join string on a command line: {cmdline}"
        );
    }
    let topo = lab.topology();
    let (a, b) = (pod(&mesh, "c1-n1-p1"), pod(&mesh, "c2-n1-p1"));
    let a_ns = topo.netns(&a.role).unwrap();
    let b_ns = topo.netns(&b.role).unwrap();
    lab.wait_reachable(a_ns, IpAddr::V6(b.v6), Duration::from_secs(20))
        .unwrap();
    let old_mac = neighbour_mac(a_ns, IpAddr::V4(b.v4)).expect("a knows b's MAC");
    assert_eq!(
        neighbour_mac(a_ns, IpAddr::V6(b.v6)).as_deref(),
        Some(old_mac.as_str())
    );
    // The kernel ignores an update within a second (locktime) of the last
    // one it took for an entry; a re-created pod comes back later than that.
    std::thread::sleep(Duration::from_millis(1500));

    // b is re-created: DEL, then ADD with a new MAC and the same addresses.
    let node = mesh.nodes.iter().find(|n| n.role == b.node).unwrap();
    let conf = serde_json::json!({
        "cniVersion": "1.0.0",
        "name": NETWORK,
        "type": "l2mesh-cni",
        "dataplaneSocket": node.socket,
        "ipam": {"type": "static", "addresses": [
            {"address": format!("{}/16", b.v4)},
            {"address": format!("{}/64", b.v6)},
        ]},
    })
    .to_string();
    let node_ns = topo.netns(&node.role).unwrap();
    let add = CniCall::add(b_ns, POD_IF, conf).with_pod("default", &b.role);
    add.clone().with_command("DEL").run(node_ns, &cni).unwrap();
    let new_mac = "02:00:5e:10:20:30";
    let mut readd = add;
    readd.args.push_str(&format!(";MAC={new_mac}"));
    readd.run(node_ns, &cni).unwrap();

    // a sends nothing: only b's announcements can change a's entries.
    for ip in [IpAddr::V4(b.v4), IpAddr::V6(b.v6)] {
        let mut seen = None;
        lab.wait_until(
            &format!("{} learns {ip} at {new_mac}", a.role),
            Duration::from_secs(3),
            || {
                seen = neighbour_mac(a_ns, ip);
                seen.as_deref() == Some(new_mac)
            },
        )
        .unwrap_or_else(|e| panic!("{e}; still {seen:?} (was {old_mac})"));
    }
    lab.wait_reachable(a_ns, IpAddr::V4(b.v4), Duration::from_secs(5))
        .unwrap();
}
