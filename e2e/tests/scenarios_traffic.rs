//! Scenarios 1, 2 and 8: connectivity across clusters, isolation
//! between networks, and what the wire shows. Root only; the workspace
//! binaries are built once per test process.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::net::IpAddr;
use std::time::Duration;

use l2mesh_e2e::binaries::workspace_binaries;
use l2mesh_e2e::capture::{Capture, FrameKind};
use l2mesh_e2e::mesh::{Mesh, POD_IF, WG_PORT};
use l2mesh_e2e::plan::TopologySpec;
use l2mesh_e2e::{Lab, should_run};

mod common;
use common::*;

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
    let t0 = std::time::Instant::now();
    let bins = workspace_binaries().unwrap_or_else(|e| panic!("{e}"));
    let lab = Lab::build(TopologySpec::default()).unwrap();
    let mut progress = |what: &str| eprintln!("[{:5.1}s] {what}", t0.elapsed().as_secs_f64());
    progress("binaries and topology ready");
    let mesh = Mesh::start(&lab, bins, &mut progress).unwrap_or_else(|e| panic!("{e}"));
    progress("mesh up");
    assert_eq!(mesh.pods.len(), 6);

    assert_all_reach(&lab, &mesh, false);
    progress("IPv4 matrix ok");
    assert_all_reach(&lab, &mesh, true);
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

/// Scenario 2: two networks on the same clusters are isolated from each
/// other, even with addresses of one subnet; a cluster not admitted to a
/// network gets Admitted=False in its status and no traffic.
#[test]
fn scenario_2_networks_are_isolated_and_unadmitted_clusters_get_nothing() {
    if !should_run(
        "scenario_2_networks_are_isolated_and_unadmitted_clusters_get_nothing",
        &["ip", "ping"],
    ) {
        return;
    }
    use std::net::{Ipv4Addr, Ipv6Addr};
    let bins = workspace_binaries().unwrap_or_else(|e| panic!("{e}"));
    let lab = Lab::build(TopologySpec {
        clusters: 3,
        nodes_per_cluster: 1,
        pods_per_node: 2,
    })
    .unwrap();
    // p1 pods join blue; p2 pods are for red.
    let mesh = Mesh::start_with(&lab, bins, &mut |_| {}, &|pod| pod.ends_with("-p1"))
        .unwrap_or_else(|e| panic!("{e}"));
    assert_all_reach(&lab, &mesh, false);

    // red: only c1 and c2 are allowed; all three clusters ask for it.
    mesh.admin(
        &lab,
        &[
            "network",
            "create",
            "red",
            "--cidr",
            "10.200.0.0/16",
            "--allow",
            "c1",
            "--allow",
            "c2",
        ],
    )
    .unwrap();
    for c in ["c1", "c2", "c3"] {
        lab.write_file(
            &format!("{c}/agent/manifests/red.yaml"),
            &l2mesh_e2e::mesh::network_manifest("red"),
        )
        .unwrap();
    }
    let status_file = lab.log_dir().join("c3/agent/state/status/default.red.yaml");
    lab.wait_until(
        "c3's red status says Admitted=False",
        Duration::from_secs(20),
        || {
            std::fs::read_to_string(&status_file).is_ok_and(|s| {
                let flat: String = s.split_whitespace().collect::<Vec<_>>().join(" ");
                // One condition: status 'False', type Admitted, and the
                // reason a network c3 may not join gets: UnknownNetwork (a
                // cluster does not learn which networks exist).
                flat.contains("reason: UnknownNetwork status: 'False' type: Admitted")
            })
        },
    )
    .unwrap_or_else(|e| {
        panic!(
            "{e}\nstatus file: {:?}",
            std::fs::read_to_string(&status_file)
        )
    });

    // Red pods use addresses inside blue's subnet: only L2 isolation keeps
    // them apart.
    let cni = bins.path("l2mesh-cni").unwrap();
    let red_addr = |c: u8| Ipv4Addr::new(10, 200, 0, 100 + c);
    for c in 1..=2u8 {
        let node = mesh
            .nodes
            .iter()
            .find(|n| n.role == format!("c{c}-gw"))
            .unwrap();
        mesh.attach(
            &lab,
            cni,
            "red",
            node,
            &format!("c{c}-gw-p2"),
            "net1",
            red_addr(c),
            Ipv6Addr::new(0xfd00, 0x202, 0, 0, 0, 0, 0, u16::from(c)),
        )
        .unwrap();
    }
    let topo = lab.topology();
    let red1 = topo.netns("c1-gw-p2").unwrap();
    lab.wait_reachable(red1, IpAddr::V4(red_addr(2)), Duration::from_secs(20))
        .unwrap();
    let blue1 = topo.netns("c1-gw-p1").unwrap();
    let blue2 = topo.netns("c2-gw-p1").unwrap();
    for (from, to) in [
        (blue1, red_addr(2)),
        (blue2, red_addr(1)),
        (red1, Ipv4Addr::new(10, 200, 0, 2)),
    ] {
        lab.assert_unreachable(from, IpAddr::V4(to)).unwrap();
    }

    // c3 is not admitted: its node has no red network to attach to.
    let c3_node = mesh.nodes.iter().find(|n| n.role == "c3-gw").unwrap();
    let conf = serde_json::json!({
        "cniVersion": "1.0.0",
        "name": "red",
        "type": "l2mesh-cni",
        "dataplaneSocket": c3_node.socket,
        "ipam": {"type": "static", "addresses": [{"address": "10.200.0.103/16"}]},
    })
    .to_string();
    let attached = l2mesh_e2e::cni::CniCall::add(topo.netns("c3-gw-p2").unwrap(), "net1", conf)
        .run(topo.netns("c3-gw").unwrap(), cni);
    if attached.is_ok() {
        // If the plugin accepted it, the pod must still reach no one.
        let c3 = topo.netns("c3-gw-p2").unwrap();
        lab.assert_unreachable(c3, IpAddr::V4(red_addr(1))).unwrap();
    }
    let c3_status = mesh.status(&lab, bins, "c3-gw").unwrap();
    assert!(
        !c3_status.contains("\nred "),
        "c3 got the red network:\n{c3_status}"
    );
}

/// Scenario 8: a capture on the WAN and on both LANs shows only WireGuard
/// between nodes (and TLS to the broker); a marker sent in clear between
/// pods of different clusters never appears.
#[test]
fn scenario_8_the_wire_shows_only_wireguard() {
    if !should_run(
        "scenario_8_the_wire_shows_only_wireguard",
        &["ip", "ping", "tcpdump"],
    ) {
        return;
    }
    let (lab, mesh) = converged_mesh(two_clusters());
    let sw = lab.topology().switch();
    let caps: Vec<Capture> = ["br-wan", "br-c1", "br-c2"]
        .iter()
        .map(|br| Capture::start(lab.procs(), &format!("wire-{br}"), sw, br, "").unwrap())
        .collect();
    // From the non-gateway pod of c1 to the non-gateway pod of c2: LAN,
    // WAN and LAN again.
    let (from, to) = (pod(&mesh, "c1-n1-p1"), pod(&mesh, "c2-n1-p1"));
    let marker = b"L2MESHCLEARTEXT";
    let pattern: String = marker[..16.min(marker.len())]
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    let out = lab
        .topology()
        .netns(&from.role)
        .unwrap()
        .run(
            "ping",
            [
                "-c",
                "3",
                "-i",
                "0.2",
                "-W",
                "2",
                "-p",
                &pattern,
                &to.v4.to_string(),
            ],
        )
        .unwrap();
    assert!(out.contains("3 received"), "{out}");
    for cap in caps {
        let pcap = cap.stop(lab.procs()).unwrap();
        // ping -p repeats up to 16 pattern bytes; any 8 of them in a row
        // would betray clear text.
        assert!(
            !pcap.contains(&marker[..8]),
            "the marker crossed the wire in clear"
        );
        let mut wireguard = 0;
        for kind in pcap.kinds() {
            match kind {
                FrameKind::Udp4 {
                    src_port,
                    dst_port,
                    first_payload_byte,
                } => {
                    assert!(
                        src_port == WG_PORT && dst_port == WG_PORT,
                        "UDP that is not node-to-node WireGuard: {kind:?}"
                    );
                    assert!(
                        matches!(first_payload_byte, Some(1..=4)),
                        "not a WireGuard message: {kind:?}"
                    );
                    wireguard += 1;
                }
                // Agents' TLS sessions (broker, node sync), ARP, and IGMP
                // membership reports the kernel sends for the underlay
                // interfaces themselves (they carry no pod data).
                FrameKind::Ip4(6) | FrameKind::Ip4(2) | FrameKind::Arp => {}
                other => panic!("unexpected frame on the wire: {other:?}"),
            }
        }
        assert!(wireguard >= 3, "the pings should have crossed as WireGuard");
    }
}
