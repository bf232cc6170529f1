//! Tenant networks never touch a node's own stack, across clusters: with
//! forwarding on and no reverse-path filter on every node, a pod cannot
//! ARP, ping or route through any node (its own, another of its cluster,
//! or one of another cluster, on any of their addresses), and a capture on
//! a pod's interface holds no frame from a node. Root only.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::net::IpAddr;

use l2mesh_e2e::capture::Capture;
use l2mesh_e2e::mesh::POD_IF;
use l2mesh_e2e::should_run;

mod common;
use common::*;

#[test]
fn pods_reach_no_node_in_any_cluster_and_hear_nothing_from_one() {
    if !should_run(
        "pods_reach_no_node_in_any_cluster_and_hear_nothing_from_one",
        &["ip", "ping", "tcpdump", "sysctl"],
    ) {
        return;
    }
    let (lab, mesh) = converged_mesh(two_clusters());
    let topo = lab.topology();
    for n in &mesh.nodes {
        let ns = topo.netns(&n.role).unwrap();
        for (k, v) in [
            ("net.ipv4.ip_forward", "1"),
            ("net.ipv4.conf.all.rp_filter", "0"),
            ("net.ipv4.conf.default.rp_filter", "0"),
        ] {
            ns.sysctl(k, v).unwrap();
        }
    }
    let pod_macs: Vec<String> = mesh
        .pods
        .iter()
        .map(|p| {
            topo.netns(&p.role)
                .unwrap()
                .run("cat", [format!("/sys/class/net/{POD_IF}/address")])
                .unwrap()
                .trim()
                .to_owned()
        })
        .collect();
    let from = pod(&mesh, "c1-n1-p1");
    let from_ns = topo.netns(&from.role).unwrap();
    let cap = Capture::start(lab.procs(), "pod-iso", from_ns, POD_IF, "").unwrap();
    // Every address is on the pod's link: the pod ARPs for each directly.
    from_ns
        .run("ip", ["route", "add", "default", "dev", POD_IF])
        .unwrap();
    let node_addrs: Vec<IpAddr> = topo
        .plan()
        .hosts()
        .flat_map(|h| h.ifaces.iter().map(|i| IpAddr::V4(i.addr.addr())))
        .collect();
    assert!(node_addrs.len() >= 5, "{node_addrs:?}");
    for addr in &node_addrs {
        lab.assert_unreachable(from_ns, *addr).unwrap();
        let neigh = from_ns
            .run("ip", ["neigh", "show", &addr.to_string()])
            .unwrap();
        assert!(!neigh.contains("lladdr"), "{addr} answered ARP: {neigh}");
    }
    // The pods themselves still reach each other.
    let to = pod(&mesh, "c2-n1-p1");
    lab.wait_reachable(
        from_ns,
        IpAddr::V4(to.v4),
        std::time::Duration::from_secs(10),
    )
    .unwrap();
    let pcap = cap.stop(lab.procs()).unwrap();
    let frames = pcap.frames();
    assert!(!frames.is_empty(), "the capture saw nothing");
    for f in frames {
        let src: Vec<String> = f[6..12].iter().map(|b| format!("{b:02x}")).collect();
        let src = src.join(":");
        assert!(
            pod_macs.contains(&src),
            "{} heard a frame from {src}, not a pod: {:02x?}",
            from.role,
            &f[..f.len().min(64)]
        );
    }
}
