//! Interop with a stock Linux peer: wireguard-go + `wg`, a kernel `vxlan`
//! device on the WireGuard TUN, bridged with a pod namespace.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::time::{Duration, Instant};

use base64::Engine as _;
use common::{Netns, Node, Underlay, can_run, ping_ok};
use l2mesh_proto::node::{PeerGroup, PeerSpec};

const VNI: u32 = 100;

/// wireguard-go killed by SIGKILL leaves its UAPI socket behind.
struct RemoveOnDrop(String);

impl Drop for RemoveOnDrop {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stock_wireguard_go_with_kernel_vxlan_exchanges_frames() {
    if !can_run(&["ping", "wireguard-go", "wg"]) {
        return;
    }
    let mut wire = Underlay::new();
    let node = Node::start("dp", &mut wire, "100.64.0.1").await;

    // The stock peer.
    let w = Netns::new("wg");
    let w_ip = wire.plug(&w);
    // The UAPI socket lives in /var/run/wireguard, shared by all namespaces:
    // the interface name must be unique across parallel tests.
    let counter = w.name.split('-').nth(2).unwrap_or("0");
    let ifname = format!("wg{}x{counter}", std::process::id() % 100_000);
    let _uapi = RemoveOnDrop(format!("/var/run/wireguard/{ifname}.sock"));
    let dir = tempfile::tempdir().unwrap();
    let keyfile = dir.path().join("wg.key");
    let private = common::sh(&["wg", "genkey"]);
    std::fs::write(&keyfile, &private).unwrap();
    let public = {
        let mut child = std::process::Command::new("wg")
            .arg("pubkey")
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        use std::io::Write;
        child
            .stdin
            .take()
            .unwrap()
            .write_all(private.as_bytes())
            .unwrap();
        String::from_utf8(child.wait_with_output().unwrap().stdout).unwrap()
    };
    let _wg = w.spawn(&[
        "env",
        "WG_I_PREFER_BUGGY_USERSPACE_TO_POLISHED_KMOD=1",
        "wireguard-go",
        "-f",
        &ifname,
    ]);
    // Generous: on a loaded 2-core machine wireguard-go has been seen to
    // take longer than 10 s to create its device.
    let deadline = Instant::now() + Duration::from_secs(60);
    while !w.try_exec(&["wg", "show", &ifname]).status.success() {
        assert!(
            Instant::now() < deadline,
            "wireguard-go did not come up within 60 s"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let our_key = base64::engine::general_purpose::STANDARD.encode(&node.public_key);
    w.exec(&[
        "wg",
        "set",
        &ifname,
        "private-key",
        keyfile.to_str().unwrap(),
    ]);
    w.exec(&[
        "wg",
        "set",
        &ifname,
        "peer",
        &our_key,
        "endpoint",
        &node.endpoint(),
        "allowed-ips",
        "100.64.0.1/32",
    ]);
    let w_port = w
        .exec(&["wg", "show", &ifname, "listen-port"])
        .trim()
        .to_string();
    w.exec(&["ip", "addr", "add", "100.64.0.9/24", "dev", &ifname]);
    w.exec(&["ip", "link", "set", &ifname, "up"]);
    w.exec(&[
        "ip",
        "link",
        "add",
        "vx0",
        "type",
        "vxlan",
        "id",
        &VNI.to_string(),
        "local",
        "100.64.0.9",
        "dstport",
        "4789",
    ]);
    // One all-zeros FDB entry per l2mesh node (ingress replication).
    w.exec(&[
        "bridge",
        "fdb",
        "append",
        "00:00:00:00:00:00",
        "dev",
        "vx0",
        "dst",
        "100.64.0.1",
    ]);
    // The stock recipe: wireguard-go keeps its default MTU (1420); the vxlan
    // device and the pods take the network's MTU (1390), so full-size frames
    // leave as 1440-byte inner packets that the stock kernel fragments. The
    // vxlan device has no `dev`: with one, the kernel caps its MTU at the
    // WireGuard MTU minus 50 (1370); the route to the remote picks the
    // WireGuard interface anyway.
    assert_eq!(
        w.exec(&["cat", &format!("/sys/class/net/{ifname}/mtu")])
            .trim(),
        "1420",
        "the stock peer runs at WireGuard's default MTU"
    );
    w.exec(&["ip", "link", "set", "vx0", "mtu", "1390"]);
    w.exec(&["ip", "link", "add", "br0", "type", "bridge"]);
    w.exec(&["ip", "link", "set", "vx0", "master", "br0", "up"]);
    w.exec(&["ip", "link", "set", "br0", "up"]);
    let w_pod = Netns::new("wpod");
    w.exec(&[
        "ip",
        "link",
        "add",
        "pw",
        "type",
        "veth",
        "peer",
        "name",
        "eth0",
        "netns",
        &w_pod.name,
    ]);
    w.exec(&["ip", "link", "set", "pw", "master", "br0", "up"]);
    w_pod.exec(&["ip", "link", "set", "eth0", "mtu", "1390", "up"]);
    w_pod.exec(&["ip", "addr", "add", "10.1.0.9/24", "dev", "eth0"]);

    // Our side.
    let key = base64::engine::general_purpose::STANDARD
        .decode(public.trim())
        .unwrap();
    node.apply(
        &[("blue", VNI)],
        vec![PeerSpec {
            public_key: key,
            endpoint: format!("{w_ip}:{w_port}"),
            tunnel_ip: "100.64.0.9".into(),
            vnis: vec![VNI],
            group: PeerGroup::Local.into(),
            persistent_keepalive: 0,
            name: "stock".into(),
        }],
    )
    .await;
    let pod = node.pod("p", "blue", &["10.1.0.1/24"]).await;

    assert!(
        ping_ok(&pod, "10.1.0.9", Duration::from_secs(20)),
        "our pod -> stock pod"
    );
    assert!(
        ping_ok(&w_pod, "10.1.0.1", Duration::from_secs(10)),
        "stock pod -> our pod"
    );
    // Full-size frames both ways: 1362 bytes of ICMP payload make 1390-byte
    // IPv4 packets. Ours leave with DF; the stock pod's go without DF, which
    // its kernel fragments (with DF its vxlan device answers "fragmentation
    // needed" instead, and the pod lowers its path MTU).
    assert!(
        full_size_ping_ok(&pod, "10.1.0.9", "do"),
        "full-size frames, our pod -> stock pod"
    );
    if !full_size_ping_ok(&w_pod, "10.1.0.1", "dont") {
        panic!(
            "full-size frames, stock pod -> our pod (fragmented by the stock kernel): {:?}\n{}",
            node.status().await.peers,
            w.exec(&["ip", "-s", "link"])
        );
    }
    // Full-size non-IP frames (local experimental ethertype) from the stock
    // pod: fragmented too, and all of them reach our pod.
    let rx_bytes = || -> u64 {
        pod.exec(&["cat", "/sys/class/net/eth0/statistics/rx_bytes"])
            .trim()
            .parse()
            .unwrap()
    };
    let before = rx_bytes();
    let mut raw = vec![0xff; 6];
    raw.extend_from_slice(&common::raw::mac_of(&w_pod, "eth0"));
    raw.extend_from_slice(&[0x88, 0xb5]);
    raw.resize(14 + 1390, 0x5a);
    common::raw::send_frames(&w_pod, "eth0", vec![raw; 20]);
    let deadline = Instant::now() + Duration::from_secs(10);
    while rx_bytes() < before + 20 * 1404 {
        assert!(
            Instant::now() < deadline,
            "full-size non-IP frames from the stock pod: {} of {} bytes arrived; {:?}",
            rx_bytes() - before,
            20 * 1404,
            node.status().await.peers
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let s = node.status().await;
    let p = &s.peers[0];
    assert!(
        p.last_handshake_age_ms.is_some() && p.rx_packets > 0,
        "{p:?}"
    );
    let shown = w.exec(&["wg", "show", &ifname, "latest-handshakes"]);
    assert!(
        !shown.trim().ends_with("\t0"),
        "wg saw a handshake: {shown}"
    );
    // Bulk TCP both ways against a stock kernel stack: our TSO segmentation
    // and TAP coalescing must produce what it accepts, byte for byte.
    common::bulk::both_ways(&pod, &w_pod, "10.1.0.9:0", 8 << 20);
    let s = node.status().await;
    assert_eq!(common::peer_drop(&s, "stock", "bad_vxlan"), 0, "{s:?}");
    assert_eq!(common::peer_drop(&s, "stock", "fragment_bad"), 0, "{s:?}");

    // Key rotation towards a peer that never sends first. The stock peer is
    // reconfigured by hand with our new key and no endpoint, so it cannot
    // start anything: it only answers. Our pod's traffic must resume.
    let new_key = l2mesh_dataplane::client::connect(&node.socket)
        .await
        .unwrap()
        .rotate_key(l2mesh_proto::node::RotateKeyRequest {})
        .await
        .unwrap()
        .into_inner()
        .public_key;
    let new_key = base64::engine::general_purpose::STANDARD.encode(&new_key);
    assert_ne!(new_key, our_key);
    w.exec(&["wg", "set", &ifname, "peer", &our_key, "remove"]);
    w.exec(&[
        "wg",
        "set",
        &ifname,
        "peer",
        &new_key,
        "allowed-ips",
        "100.64.0.1/32",
    ]);
    assert!(
        ping_ok(&pod, "10.1.0.9", Duration::from_secs(30)),
        "our pod -> stock pod after the rotation, the stock peer silent: {:?}",
        node.status().await.peers
    );
    let shown = w.exec(&["wg", "show", &ifname, "latest-handshakes"]);
    assert!(
        shown.contains(&new_key) && !shown.trim().ends_with("\t0"),
        "the stock peer handshook with the new key: {shown}"
    );
}

/// Pings with 1390-byte packets (`df`: ping's `-M` argument) until one
/// answers (20 s at most).
fn full_size_ping_ok(pod: &Netns, target: &str, df: &str) -> bool {
    let deadline = Instant::now() + Duration::from_secs(20);
    while Instant::now() < deadline {
        let o = pod.try_exec(&["ping", "-c", "1", "-W", "1", "-M", df, "-s", "1362", target]);
        if o.status.success() {
            return true;
        }
    }
    false
}
