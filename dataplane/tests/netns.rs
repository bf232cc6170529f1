//! Root integration tests: real daemons in network namespaces.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::time::Duration;

use common::{Netns, Node, Underlay, can_run, peer_drop, ping_ok};
use l2mesh_proto::node::PeerGroup;

const BLUE: u32 = 100;
const RED: u32 = 200;
const NETS: &[(&str, u32)] = &[("blue", BLUE), ("red", RED)];

/// Nodes `a` (tunnel IP 100.64.0.1) and `b` (100.64.0.2) on `wire`, both
/// with blue and red, each the other's local peer on `vnis`.
async fn two_peered_nodes(wire: &mut Underlay, vnis: &[u32]) -> (Node, Node) {
    let a = Node::start("a", wire, "100.64.0.1").await;
    let b = Node::start("b", wire, "100.64.0.2").await;
    a.apply(NETS, vec![b.as_peer(PeerGroup::Local, vnis)]).await;
    b.apply(NETS, vec![a.as_peer(PeerGroup::Local, vnis)]).await;
    (a, b)
}

/// Pod `a1` (10.1.0.1/24) on `a` and `b1` (10.1.0.11/24) on `b`, both on
/// blue.
async fn blue_pod_each(a: &Node, b: &Node) -> (Netns, Netns) {
    let a1 = a.pod("a1", "blue", &["10.1.0.1/24"]).await;
    let b1 = b.pod("b1", "blue", &["10.1.0.11/24"]).await;
    (a1, b1)
}

/// Asserts, in order, that each `(pod, target, seconds, what)` gets a ping
/// reply within that many seconds; a failure names `what`.
#[track_caller]
fn assert_pings(checks: &[(&Netns, &str, u64, &str)]) {
    for &(pod, target, secs, what) in checks {
        assert!(ping_ok(pod, target, Duration::from_secs(secs)), "{what}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_nodes_two_networks_ping_arp_nd_broadcast_and_isolation() {
    if !can_run(&["ping"]) {
        return;
    }
    let mut wire = Underlay::new();
    let (a, b) = two_peered_nodes(&mut wire, &[BLUE, RED]).await;
    // All pods share one subnet, so only the L2 networks keep them apart.
    let a1 = a.pod("a1", "blue", &["10.1.0.1/24", "fd00:1::1/64"]).await;
    let _a2 = a.pod("a2", "blue", &["10.1.0.2/24"]).await;
    let a3 = a.pod("a3", "red", &["10.1.0.3/24"]).await;
    let b1 = b
        .pod("b1", "blue", &["10.1.0.11/24", "fd00:1::11/64"])
        .await;
    let b2 = b.pod("b2", "blue", &["10.1.0.12/24"]).await;
    let b3 = b.pod("b3", "red", &["10.1.0.13/24"]).await;

    assert_pings(&[
        (&a1, "10.1.0.11", 15, "blue a1 -> b1 (IPv4, ARP)"),
        (&b2, "10.1.0.2", 5, "blue b2 -> a2"),
        (&a3, "10.1.0.13", 5, "red a3 -> b3"),
        (&b3, "10.1.0.3", 5, "red b3 -> a3"),
        (&a1, "fd00:1::11", 10, "IPv6 a1 -> b1 (ND)"),
        (&b1, "fd00:1::1", 5, "IPv6 b1 -> a1"),
    ]);
    let neigh = a1.exec(&["ip", "neigh", "show", "10.1.0.11"]);
    assert!(neigh.contains("lladdr"), "ARP resolved: {neigh}");

    // A broadcast from a1 reaches every blue member and no red one.
    let out = a1.try_exec(&[
        "ping",
        "-b",
        "-c",
        "4",
        "-i",
        "0.3",
        "-W",
        "2",
        "10.1.0.255",
    ]);
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    for member in ["10.1.0.2", "10.1.0.11", "10.1.0.12"] {
        assert!(
            text.contains(&format!("from {member}")),
            "{member} missing in {text}"
        );
    }
    for outsider in ["10.1.0.3", "10.1.0.13"] {
        assert!(
            !text.contains(&format!("from {outsider}:")),
            "{outsider} answered: {text}"
        );
    }
    // Different networks cannot reach each other even on one subnet.
    assert!(
        !ping_ok(&a1, "10.1.0.13", Duration::from_secs(3)),
        "blue reached red across nodes"
    );
    assert!(
        !ping_ok(&a1, "10.1.0.3", Duration::from_secs(2)),
        "blue reached red on one node"
    );

    let s = a.status().await;
    let p = &s.peers[0];
    assert!(
        p.last_handshake_age_ms.is_some() && p.rx_packets > 0 && p.tx_packets > 0,
        "{p:?}"
    );
    let blue = s.networks.iter().find(|n| n.name == "blue").unwrap();
    assert_eq!(blue.ports.len(), 3, "tap + 2 pods: {:?}", blue.ports);
    assert!(
        blue.macs.iter().any(|m| m.port == b.ns.name),
        "MACs learned behind b: {:?}",
        blue.macs
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn underlay_carries_only_wireguard_and_never_the_cleartext() {
    if !can_run(&["ping", "tcpdump"]) {
        return;
    }
    let mut wire = Underlay::new();
    let (a, b) = two_peered_nodes(&mut wire, &[BLUE]).await;
    let (a1, _b1) = blue_pod_each(&a, &b).await;
    let dir = tempfile::tempdir().unwrap();
    let pcap = dir.path().join("wire.pcap");
    let cap = wire.ns.spawn(&[
        "tcpdump",
        "-i",
        "br0",
        "-U",
        "-n",
        "-s",
        "0",
        "-w",
        pcap.to_str().unwrap(),
    ]);
    std::thread::sleep(Duration::from_millis(1500));
    // "l2mesh-marker!" as the ping padding pattern.
    let pattern = "6c326d6573682d6d61726b657221";
    assert!(ping_ok(&a1, "10.1.0.11", Duration::from_secs(15)));
    let out = a1.try_exec(&["ping", "-c", "5", "-i", "0.2", "-p", pattern, "10.1.0.11"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
    std::thread::sleep(Duration::from_millis(500));
    cap.finish();
    let bytes = std::fs::read(&pcap).unwrap();
    assert!(bytes.len() > 1000, "capture is empty");
    let marker = b"l2mesh-marker";
    assert!(
        !bytes.windows(marker.len()).any(|w| w == marker),
        "cleartext on the wire"
    );
    // ARP and IGMP are the kernel's own link chatter on the underlay, not ours.
    let filter = format!(
        "not arp and not igmp and not (udp and (port {} or port {}))",
        a.port, b.port
    );
    let other = common::sh(&["tcpdump", "-n", "-r", pcap.to_str().unwrap(), &filter]);
    assert!(
        other.trim().is_empty(),
        "non-WireGuard traffic on the underlay:\n{other}"
    );
    let wg = common::sh(&["tcpdump", "-n", "-r", pcap.to_str().unwrap(), "udp"]);
    assert!(
        wg.lines().count() >= 10,
        "expected WireGuard datagrams:\n{wg}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gateway_forwards_between_groups_with_split_horizon() {
    if !can_run(&["ping"]) {
        return;
    }
    // Cluster 1: A, A2 and gateway G (full local mesh). Cluster 2: gateway R.
    let mut wire = Underlay::new();
    let a = Node::start("a", &mut wire, "100.64.1.1").await;
    let a2 = Node::start("a2", &mut wire, "100.64.1.2").await;
    let g = Node::start("g", &mut wire, "100.64.1.3").await;
    let r = Node::start("r", &mut wire, "100.64.2.1").await;
    let nets = &[("blue", BLUE)];
    let local = |n: &Node| n.as_peer(PeerGroup::Local, &[BLUE]);
    a.apply(nets, vec![local(&a2), local(&g)]).await;
    a2.apply(nets, vec![local(&a), local(&g)]).await;
    g.apply(
        nets,
        vec![local(&a), local(&a2), r.as_peer(PeerGroup::Remote, &[BLUE])],
    )
    .await;
    r.apply(nets, vec![g.as_peer(PeerGroup::Remote, &[BLUE])])
        .await;
    let pa = a.pod("pa", "blue", &["10.1.0.1/24"]).await;
    let _pa2 = a2.pod("pa2", "blue", &["10.1.0.2/24"]).await;
    let pr = r.pod("pr", "blue", &["10.1.0.21/24"]).await;

    assert_pings(&[
        (&pa, "10.1.0.21", 20, "A's pod reaches R's pod via G"),
        (&pr, "10.1.0.2", 10, "R's pod reaches A2's pod via G"),
    ]);
    let out = pa.try_exec(&["ping", "-c", "5", "-i", "0.2", "10.1.0.21"]);
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(
        out.status.success() && !text.contains("DUP"),
        "no duplicates: {text}"
    );
    // Broadcasts from A reach A2 directly; G must not echo them to A2.
    let out = pa.try_exec(&["ping", "-b", "-c", "3", "-i", "0.3", "10.1.0.255"]);
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(
        text.contains("from 10.1.0.2") && text.contains("from 10.1.0.21"),
        "{text}"
    );
    let gs = g.status().await;
    assert!(
        peer_drop(&gs, &a.ns.name, "split_horizon") > 0,
        "G counts suppressed local->local copies: {:?}",
        gs.peers
    );
    // A2 never received a frame from A through G.
    let rs = r.status().await;
    assert_eq!(rs.peers[0].name, g.ns.name);
    assert!(rs.peers[0].rx_packets > 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restart_keeps_key_adopts_bridges_and_keeps_forwarding() {
    if !can_run(&["ping"]) {
        return;
    }
    let mut wire = Underlay::new();
    let (mut a, b) = two_peered_nodes(&mut wire, &[BLUE]).await;
    let (a1, _b1) = blue_pod_each(&a, &b).await;
    assert!(ping_ok(&a1, "10.1.0.11", Duration::from_secs(15)));
    let key = a.public_key.clone();
    let port = a.port;
    a.proc.take().unwrap().finish();
    // A stale device of ours that the state does not mention must go.
    a.ns.exec(&["ip", "link", "add", "l2mb-0000ff", "type", "bridge"]);
    a.launch().await;
    assert_eq!(a.public_key, key, "key survives the restart");
    // The port is picked anew (0), so tell B; a real agent would re-sync.
    if a.port != port {
        b.apply(NETS, vec![a.as_peer(PeerGroup::Local, &[BLUE])])
            .await;
    }
    assert!(
        ping_ok(&a1, "10.1.0.11", Duration::from_secs(20)),
        "pod still attached and forwarding"
    );
    let links = a.ns.exec(&["ip", "-br", "link"]);
    assert!(
        !links.contains("l2mb-0000ff"),
        "stale bridge removed: {links}"
    );
    let s = a.status().await;
    assert_eq!(s.networks.len(), 2);
}

/// The state saved in `node`'s state directory, changed by `edit`.
fn edit_saved_state(node: &Node, edit: impl FnOnce(&mut l2mesh_proto::node::DesiredState)) {
    use prost::Message as _;
    let path = node.dir.path().join("state").join("desired.pb");
    let mut saved =
        l2mesh_proto::node::DesiredState::decode(std::fs::read(&path).unwrap().as_slice()).unwrap();
    edit(&mut saved);
    std::fs::write(&path, saved.encode_to_vec()).unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_saved_state_is_repaired_or_its_bridges_kept_when_it_cannot_be_restored() {
    if !can_run(&["ping"]) {
        return;
    }
    let mut wire = Underlay::new();
    let (mut a, b) = two_peered_nodes(&mut wire, &[BLUE]).await;
    let (a1, _b1) = blue_pod_each(&a, &b).await;
    assert!(ping_ok(&a1, "10.1.0.11", Duration::from_secs(15)));

    // A saved state naming the node's own key as a peer (an older version
    // accepted one) is restored without that peer, not dropped whole.
    a.proc.take().unwrap().finish();
    let own = a.public_key.clone();
    edit_saved_state(&a, |s| {
        let mut me = s.peers[0].clone();
        me.public_key = own;
        me.name = "itself".into();
        me.tunnel_ip = "100.64.0.9".into();
        s.peers.push(me);
    });
    a.launch().await;
    let s = a.status().await;
    assert_eq!(s.networks.len(), 2, "networks restored: {s:?}");
    let names: Vec<&str> = s.peers.iter().map(|p| p.name.as_str()).collect();
    assert_eq!(
        names,
        vec![b.ns.name.as_str()],
        "only the own-key peer is gone"
    );
    b.apply(NETS, vec![a.as_peer(PeerGroup::Local, &[BLUE])])
        .await;
    assert!(
        ping_ok(&a1, "10.1.0.11", Duration::from_secs(20)),
        "forwarding after the repaired restore"
    );

    // A saved state that cannot be applied (a device squats on a new
    // network's bridge name) leaves the saved bridges, and the pods on them,
    // in place until the next apply.
    a.proc.take().unwrap().finish();
    edit_saved_state(&a, |s| {
        let mut green = s.networks[0].clone();
        green.name = "green".into();
        green.vni = 300;
        s.networks.push(green);
    });
    a.ns.exec(&[
        "ip",
        "link",
        "add",
        "l2mb-00012c",
        "type",
        "veth",
        "peer",
        "name",
        "squat",
    ]);
    a.launch().await;
    assert!(a.status().await.networks.is_empty(), "nothing restored");
    let links = a.ns.exec(&["ip", "-br", "link"]);
    assert!(
        links.contains("l2mb-000064") && links.contains("l2mb-0000c8"),
        "saved bridges kept: {links}"
    );
    let blue_ports =
        a.ns.exec(&["ip", "-br", "link", "show", "master", "l2mb-000064"]);
    assert!(
        !blue_ports.trim().is_empty(),
        "the pod's port is still on blue"
    );
    // The agent's next apply brings forwarding back.
    a.apply(NETS, vec![b.as_peer(PeerGroup::Local, &[BLUE])])
        .await;
    b.apply(NETS, vec![a.as_peer(PeerGroup::Local, &[BLUE])])
        .await;
    assert!(
        ping_ok(&a1, "10.1.0.11", Duration::from_secs(20)),
        "forwarding after the next apply"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn runtime_changes_key_rotation_mtu_and_garbage_do_not_break_forwarding() {
    if !can_run(&["ping", "bash"]) {
        return;
    }
    let mut wire = Underlay::new();
    let (mut a, b) = two_peered_nodes(&mut wire, &[BLUE]).await;
    let (a1, _b1) = blue_pod_each(&a, &b).await;
    assert!(ping_ok(&a1, "10.1.0.11", Duration::from_secs(15)));

    // Random and truncated datagrams at B's port from A's node.
    // Each message type (1..4) with random, often truncated, bodies.
    let junk = format!(
        "f=$(mktemp); for i in $(seq 400); do {{ printf \"\\\\x0$((1 + i % 4))\\\\x00\\\\x00\\\\x00\"; \
         head -c $((i % 300)) /dev/urandom; }} > $f; cat $f > /dev/udp/{}/{}; done; rm -f $f",
        b.underlay_ip, b.port
    );
    a.ns.exec(&["bash", "-c", &junk]);
    assert!(
        ping_ok(&a1, "10.1.0.11", Duration::from_secs(5)),
        "still forwarding after junk"
    );
    let bs = b.status().await;
    let node_drops: u64 = bs.drops.iter().map(|d| d.count).sum();
    assert!(node_drops > 0, "junk counted: {:?}", bs.drops);

    // Key rotation on A: B learns the new key, traffic resumes.
    let mut c = l2mesh_dataplane::client::connect(&a.socket).await.unwrap();
    let new_key = c
        .rotate_key(l2mesh_proto::node::RotateKeyRequest {})
        .await
        .unwrap()
        .into_inner()
        .public_key;
    assert_ne!(new_key, a.public_key);
    a.public_key = new_key;
    b.apply(NETS, vec![a.as_peer(PeerGroup::Local, &[BLUE])])
        .await;
    assert!(
        ping_ok(&a1, "10.1.0.11", Duration::from_secs(15)),
        "forwarding after rotation"
    );

    // MTU change reaches the bridge and its ports.
    let mut d = l2mesh_proto::node::DesiredState {
        revision: 2,
        identity: Some(l2mesh_proto::node::NodeIdentity {
            node_name: "a".into(),
            tunnel_ip: a.tunnel_ip.clone(),
            listen_port: 0,
        }),
        ..Default::default()
    };
    d.networks.push(l2mesh_proto::node::NetworkSpec {
        name: "blue".into(),
        vni: BLUE,
        mtu: 1300,
        pod_cidr: String::new(),
    });
    d.peers.push(b.as_peer(PeerGroup::Local, &[BLUE]));
    let r = c.apply(d.clone()).await.unwrap().into_inner();
    assert!(
        r.changes.iter().any(|c| c.contains("removed network red")),
        "{:?}",
        r.changes
    );
    let links = a.ns.exec(&["ip", "-o", "link"]);
    let blue_links: Vec<&str> = links
        .lines()
        .filter(|l| l.contains("l2mb-000064"))
        .collect();
    assert!(blue_links.len() >= 3, "bridge, TAP and pod port: {links}");
    for line in links
        .lines()
        .filter(|l| l.contains("l2mb-000064") || l.contains("master l2mb-000064"))
    {
        assert!(line.contains("mtu 1300"), "{line}");
    }
    assert!(!links.contains("l2mb-0000c8"), "red's bridge removed");
    // Idempotent: the same state again changes nothing.
    let again = c.apply(d).await.unwrap().into_inner();
    assert!(again.changes.is_empty(), "{:?}", again.changes);
    // Bad input names the problem and changes nothing.
    let bad = l2mesh_proto::node::DesiredState {
        networks: vec![l2mesh_proto::node::NetworkSpec {
            name: "x".into(),
            vni: 0,
            ..Default::default()
        }],
        ..Default::default()
    };
    let err = c.apply(bad).await.unwrap_err();
    assert_eq!(err.code(), tonic::Code::InvalidArgument);
    assert!(err.message().contains("VNI"), "{}", err.message());
    assert!(ping_ok(&a1, "10.1.0.11", Duration::from_secs(5)));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cli_apply_status_attach_detach_and_helpful_errors() {
    if !can_run(&[]) {
        return;
    }
    let mut wire = Underlay::new();
    let a = Node::start("a", &mut wire, "100.64.0.1").await;
    let sock = a.socket.to_str().unwrap().to_string();
    let file = a.dir.path().join("state.json");
    std::fs::write(
        &file,
        r#"{"revision": 7, "node_name": "cli", "tunnel_ip": "100.64.0.1",
            "networks": [{"name": "green", "vni": 4097, "pod_cidr": "10.7.0.0/24"}],
            "peers": [{"name": "other", "public_key": "AQEBAQEBAQEBAQEBAQEBAQEBAQEBAQEBAQEBAQEBAQE=",
                       "tunnel_ip": "100.64.0.2", "vnis": [4097], "group": "remote"}]}"#,
    )
    .unwrap();
    let cli = |args: &[&str]| {
        let mut v = vec![common::BIN, "--socket", &sock];
        v.extend_from_slice(args);
        common::run(&v)
    };
    let out = cli(&["apply", file.to_str().unwrap()]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("added network green"));
    a.ns.exec(&[
        "ip", "link", "add", "pod0", "type", "veth", "peer", "name", "pod0b",
    ]);
    // A pod name Kubernetes would refuse is rejected before anything changes.
    let out = cli(&["attach", "green", "pod0", "--pod", "Team-A/web-0"]);
    let err = String::from_utf8_lossy(&out.stderr).to_string();
    assert!(
        !out.status.success() && err.contains("not a Kubernetes name"),
        "{err}"
    );
    let links = a.ns.exec(&["ip", "-d", "link", "show", "pod0"]);
    assert!(
        !links.contains("master"),
        "a refused attach changed nothing: {links}"
    );
    let out = cli(&["attach", "green", "pod0", "--pod", "team-a/web-0"]);
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(
        text.contains("bridge=l2mb-001001") && text.contains("pod_cidr=10.7.0.0/24"),
        "{text}"
    );
    let status = String::from_utf8_lossy(&cli(&["status"]).stdout).to_string();
    for needle in [
        "green",
        "4097",
        "pod0(team-a/web-0)",
        "other",
        "remote",
        "revision 7",
    ] {
        assert!(status.contains(needle), "{needle} missing:\n{status}");
    }
    // The pod lives on the interface, so a restarted daemon still knows it.
    let alias = a.ns.exec(&["ip", "link", "show", "pod0"]);
    assert!(alias.contains("alias l2mesh-pod:team-a/web-0"), "{alias}");
    assert!(cli(&["detach", "green", "pod0"]).status.success());
    let alias = a.ns.exec(&["ip", "link", "show", "pod0"]);
    assert!(
        !alias.contains("l2mesh-pod"),
        "detach clears the pod: {alias}"
    );
    let out = cli(&["attach", "green", "nope0"]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr).to_string();
    assert!(err.contains("no interface named \"nope0\""), "{err}");
    let out = cli(&["attach", "purple", "pod0"]);
    assert!(String::from_utf8_lossy(&out.stderr).contains("no network named \"purple\""));
    std::fs::write(
        &file,
        r#"{"networks": [{"name": "x", "vni": 1}], "bogus": 1}"#,
    )
    .unwrap();
    let out = cli(&["apply", file.to_str().unwrap()]);
    assert!(!out.status.success() && String::from_utf8_lossy(&out.stderr).contains("bogus"));
    // Nothing changed by the bad file.
    assert!(String::from_utf8_lossy(&cli(&["status"]).stdout).contains("revision 7"));
}
