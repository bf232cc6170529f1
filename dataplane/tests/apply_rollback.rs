//! Root integration tests: an apply that fails halfway changes nothing (no
//! devices of its own left behind, the old state still in force and saved),
//! and a corrected apply afterwards works.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use common::{Netns, Node, Underlay, can_run};
use l2mesh_dataplane::client;
use l2mesh_proto::node::{DesiredState, NetworkSpec, NodeIdentity, NodeStatus, PeerGroup};

fn desired(node: &Node, revision: u64, port: u32, networks: &[(&str, u32, u32)]) -> DesiredState {
    DesiredState {
        revision,
        identity: Some(NodeIdentity {
            node_name: node.ns.name.clone(),
            tunnel_ip: node.tunnel_ip.clone(),
            listen_port: port,
        }),
        networks: networks
            .iter()
            .map(|(name, vni, mtu)| NetworkSpec {
                name: (*name).into(),
                vni: *vni,
                mtu: *mtu,
                pod_cidr: String::new(),
            })
            .collect(),
        peers: Vec::new(),
    }
}

async fn try_apply(node: &Node, d: DesiredState) -> Result<(), tonic::Status> {
    let mut c = client::connect(&node.socket).await.unwrap();
    c.apply(d).await.map(|_| ())
}

/// Names of the devices in `ns` that the dataplane names as its own.
fn owned_links(ns: &Netns) -> Vec<String> {
    let out = ns.exec(&["ip", "-o", "link", "show"]);
    let mut v: Vec<String> = out
        .lines()
        .filter_map(|l| l.split(": ").nth(1))
        .map(|n| n.split('@').next().unwrap_or(n).to_string())
        .filter(|n| n.starts_with("l2mb-") || n.starts_with("l2mt-"))
        .collect();
    v.sort();
    v
}

fn mtu_of(ns: &Netns, dev: &str) -> String {
    let out = ns.exec(&["cat", &format!("/sys/class/net/{dev}/mtu")]);
    out.trim().to_string()
}

fn networks(s: &NodeStatus) -> Vec<(String, u32)> {
    let mut v: Vec<(String, u32)> = s.networks.iter().map(|n| (n.name.clone(), n.vni)).collect();
    v.sort();
    v
}

/// A UDP socket bound to a free port inside `ns` (it stays in that
/// namespace after the helper thread that entered it exits).
fn udp_in(ns: &Netns) -> std::net::UdpSocket {
    let path = format!("/run/netns/{}", ns.name);
    std::thread::spawn(move || {
        let f = std::fs::File::open(&path).expect("open netns");
        nix::sched::setns(&f, nix::sched::CloneFlags::CLONE_NEWNET).expect("setns");
        std::net::UdpSocket::bind("0.0.0.0:0").expect("bind in netns")
    })
    .join()
    .expect("socket thread")
}

fn names(v: &[&str]) -> Vec<String> {
    v.iter().map(|s| (*s).to_string()).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_network_that_cannot_be_created_undoes_the_whole_apply() {
    if !can_run(&[]) {
        return;
    }
    let mut wire = Underlay::new();
    let mut node = Node::start("rb", &mut wire, "100.64.0.1").await;
    let old = &[("keep", 0x10, 1390), ("old", 0x11, 1390)];
    try_apply(&node, desired(&node, 1, 0, old)).await.unwrap();
    let before = owned_links(&node.ns);
    assert_eq!(
        before,
        names(&["l2mb-000010", "l2mb-000011", "l2mt-000010", "l2mt-000011"])
    );

    // A device that is not a bridge (a veth) holds the name of new2's bridge, so its
    // TAP cannot join it: the second of two new networks fails, after the
    // first one was created.
    node.ns.exec(&[
        "ip",
        "link",
        "add",
        "l2mb-000013",
        "type",
        "veth",
        "peer",
        "name",
        "squat",
    ]);
    let bad = &[("keep", 0x10, 1300), ("new1", 0x12, 0), ("new2", 0x13, 0)];
    let err = try_apply(&node, desired(&node, 2, 0, bad))
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::FailedPrecondition);
    let msg = err.message();
    eprintln!("apply error: {msg}");
    assert!(msg.contains("network new2 (vni 19)"), "{msg}");
    assert!(msg.contains("nothing was changed"), "{msg}");
    assert!(msg.contains("apply again"), "{msg}");

    let mut expected = before.clone();
    expected.push("l2mb-000013".into());
    expected.sort();
    assert_eq!(
        owned_links(&node.ns),
        expected,
        "only the squatting veth is new"
    );
    assert_eq!(mtu_of(&node.ns, "l2mb-000010"), "1390");
    let s = node.status().await;
    assert_eq!(s.applied_revision, 1);
    assert_eq!(
        networks(&s),
        [("keep".to_string(), 0x10), ("old".to_string(), 0x11)]
    );

    // The old state is also the one saved for the next start.
    node.ns.exec(&["ip", "link", "del", "l2mb-000013"]);
    node.proc.take().unwrap().finish();
    node.launch().await;
    let s = node.status().await;
    assert_eq!(s.applied_revision, 1);
    assert_eq!(owned_links(&node.ns), before);

    // The corrected apply works.
    try_apply(&node, desired(&node, 3, 0, bad)).await.unwrap();
    assert_eq!(
        owned_links(&node.ns),
        names(&[
            "l2mb-000010",
            "l2mb-000012",
            "l2mb-000013",
            "l2mt-000010",
            "l2mt-000012",
            "l2mt-000013"
        ])
    );
    assert_eq!(mtu_of(&node.ns, "l2mb-000010"), "1300");
    let s = node.status().await;
    assert_eq!(s.applied_revision, 3);
    assert_eq!(
        networks(&s),
        [
            ("keep".to_string(), 0x10),
            ("new1".to_string(), 0x12),
            ("new2".to_string(), 0x13)
        ]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_taken_listen_port_or_a_self_peer_changes_nothing() {
    if !can_run(&[]) {
        return;
    }
    let mut wire = Underlay::new();
    let node = Node::start("rp", &mut wire, "100.64.0.1").await;
    let old = &[("blue", 0x20, 0)];
    try_apply(&node, desired(&node, 1, 0, old)).await.unwrap();
    let before = owned_links(&node.ns);
    let port_before = node.status().await.listen_port;

    let taken = udp_in(&node.ns);
    let port = taken.local_addr().unwrap().port();
    let more = &[("blue", 0x20, 0), ("red", 0x21, 0)];
    let err = try_apply(&node, desired(&node, 2, port.into(), more))
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::FailedPrecondition);
    let msg = err.message();
    eprintln!("apply error: {msg}");
    assert!(msg.contains(&format!("binding UDP port {port}")), "{msg}");
    assert!(msg.contains("nothing was changed"), "{msg}");
    assert_eq!(owned_links(&node.ns), before);
    let s = node.status().await;
    assert_eq!(s.applied_revision, 1);
    assert_eq!(s.listen_port, port_before);
    assert_eq!(networks(&s), [("blue".to_string(), 0x20)]);

    // This node listed as its own peer.
    let mut d = desired(&node, 3, 0, more);
    d.peers.push(node.as_peer(PeerGroup::Local, &[0x20]));
    let err = try_apply(&node, d).await.unwrap_err();
    assert_eq!(err.code(), tonic::Code::InvalidArgument);
    assert!(
        err.message().contains("as its own peer"),
        "{}",
        err.message()
    );
    assert_eq!(owned_links(&node.ns), before);

    // Once the port is free, the same state applies.
    drop(taken);
    try_apply(&node, desired(&node, 4, port.into(), more))
        .await
        .unwrap();
    let s = node.status().await;
    assert_eq!(s.applied_revision, 4);
    assert_eq!(s.listen_port, u32::from(port));
    assert_eq!(
        owned_links(&node.ns),
        names(&["l2mb-000020", "l2mb-000021", "l2mt-000020", "l2mt-000021"])
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_vni_taken_over_from_a_removed_network_is_given_back_on_failure() {
    if !can_run(&[]) {
        return;
    }
    let mut wire = Underlay::new();
    let node = Node::start("rv", &mut wire, "100.64.0.1").await;
    let old = &[("a", 0x30, 0), ("b", 0x31, 0)];
    try_apply(&node, desired(&node, 1, 0, old)).await.unwrap();
    let before = owned_links(&node.ns);

    // "a" moves to b's VNI (so b's devices go first), and the new "c"
    // fails: b must come back and a must stay on its old VNI.
    node.ns.exec(&[
        "ip",
        "link",
        "add",
        "l2mb-000033",
        "type",
        "veth",
        "peer",
        "name",
        "squat",
    ]);
    let bad = &[("a", 0x31, 0), ("c", 0x33, 0)];
    let err = try_apply(&node, desired(&node, 2, 0, bad))
        .await
        .unwrap_err();
    let msg = err.message();
    assert!(msg.contains("network c (vni 51)"), "{msg}");
    assert!(msg.contains("nothing was changed"), "{msg}");
    node.ns.exec(&["ip", "link", "del", "l2mb-000033"]);
    assert_eq!(owned_links(&node.ns), before);
    let s = node.status().await;
    assert_eq!(s.applied_revision, 1);
    assert_eq!(
        networks(&s),
        [("a".to_string(), 0x30), ("b".to_string(), 0x31)]
    );
    // b's re-created bridge takes ports again.
    let _pod = node.pod("rvp", "b", &["10.9.0.1/24"]).await;
    let b = s.networks.iter().find(|n| n.name == "b").unwrap();
    let ports = node
        .ns
        .exec(&["ip", "-o", "link", "show", "master", &b.bridge]);
    assert!(ports.contains("l2mt-000031"), "{ports}");

    try_apply(&node, desired(&node, 3, 0, bad)).await.unwrap();
    assert_eq!(
        owned_links(&node.ns),
        names(&["l2mb-000031", "l2mb-000033", "l2mt-000031", "l2mt-000033"])
    );
    let s = node.status().await;
    assert_eq!(
        networks(&s),
        [("a".to_string(), 0x31), ("c".to_string(), 0x33)]
    );
}

/// `GET /metrics` from the daemon's default endpoint inside its namespace.
fn scrape(node: &Node) -> String {
    node.ns.exec(&[
        "bash",
        "-c",
        "exec 3<>/dev/tcp/127.0.0.1/9431 && printf 'GET /metrics HTTP/1.0\\r\\n\\r\\n' >&3 && cat <&3",
    ])
}

fn sample(body: &str, name: &str) -> Option<f64> {
    body.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.parse().ok())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn applies_are_timed_in_a_histogram_that_promtool_accepts() {
    if !can_run(&["bash", "promtool"]) {
        return;
    }
    let mut wire = Underlay::new();
    let node = Node::start("metrics", &mut wire, "100.64.0.1").await;
    // The daemon re-applies its (empty) saved state at start; count from here.
    let before = sample(&scrape(&node), "l2mesh_dataplane_apply_seconds_count").unwrap_or(0.0);
    try_apply(&node, desired(&node, 1, 0, &[("blue", 100, 1390)]))
        .await
        .unwrap();
    // A failing apply is timed too (an MTU the network cannot have).
    assert!(
        try_apply(&node, desired(&node, 2, 0, &[("blue", 100, 70_000)]))
            .await
            .is_err()
    );
    let response = scrape(&node);
    let body = response.split("\r\n\r\n").nth(1).unwrap();
    assert_eq!(
        sample(body, "l2mesh_dataplane_apply_seconds_count"),
        Some(before + 2.0),
        "{body}"
    );
    assert!(sample(body, "l2mesh_dataplane_apply_seconds_sum").unwrap() > 0.0);
    assert!(body.contains("l2mesh_dataplane_apply_seconds_bucket{le=\"+Inf\"}"));
    let mut check = std::process::Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    std::io::Write::write_all(&mut check.stdin.take().unwrap(), body.as_bytes()).unwrap();
    let out = check.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "promtool: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}
