//! Root integration tests: tenant networks never touch a node's own stack,
//! whatever the node's sysctls, with `/proc/sys` read-only for the daemons;
//! and the node API refuses the node's own interfaces.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::net::Ipv4Addr;
use std::time::{Duration, Instant};

use common::raw::{
    BROADCAST, SLOW_PROTOCOLS, arp_request, mac_of, received, send_frames, udp_in, udp4,
};
use common::{Netns, Node, Proc, Underlay, can_run, ping_ok};
use l2mesh_dataplane::client;
use l2mesh_proto::node::{AttachPortRequest, DetachPortRequest, PeerGroup};

const BLUE: u32 = 100;
const NETS: &[(&str, u32)] = &[("blue", BLUE)];

/// The sysctls of a Kubernetes node at their most permissive: forwarding
/// on, no reverse-path filter, IPv6 on every new device.
fn permissive_sysctls(ns: &Netns) {
    for (k, v) in [
        ("net.ipv4.ip_forward", "1"),
        ("net.ipv4.conf.all.rp_filter", "0"),
        ("net.ipv4.conf.default.rp_filter", "0"),
        ("net.ipv4.conf.all.arp_ignore", "0"),
        ("net.ipv6.conf.all.forwarding", "1"),
        ("net.ipv6.conf.default.disable_ipv6", "0"),
    ] {
        ns.sysctl(k, v);
    }
}

/// Captures on a pod's eth0 until finished; returns tcpdump's lines.
fn capture(pod: &Netns) -> Proc {
    let p = pod.spawn(&["tcpdump", "-l", "-e", "-n", "-i", "eth0"]);
    // tcpdump says "listening" on stderr once its socket is open; the ping
    // that follows in every caller is captured either way, what matters is
    // that the probes come after it.
    std::thread::sleep(Duration::from_millis(700));
    p
}

/// Source MACs of every frame in tcpdump `-e -n` output.
fn sources(out: &str) -> Vec<(String, String)> {
    out.lines()
        .filter_map(|l| {
            let mut it = l.split_whitespace();
            let _time = it.next()?;
            let src = it.next()?;
            (src.len() == 17 && src.matches(':').count() == 5)
                .then(|| (src.to_string(), l.to_string()))
        })
        .collect()
}

fn fmt_mac(m: [u8; 6]) -> String {
    m.iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(":")
}

/// Addresses (of any family) on a device, as `ip -o addr` prints them.
fn addresses(ns: &Netns, dev: &str) -> String {
    ns.exec(&["ip", "-o", "addr", "show", "dev", dev])
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pods_never_reach_a_nodes_stack_and_nodes_never_speak_into_tenant_networks() {
    if !can_run(&["ping", "tcpdump", "unshare", "mount"]) {
        return;
    }
    let mut wire = Underlay::new();
    // a: the pod's node (and its cluster's gateway); b: another node of
    // that cluster; c: the gateway of another cluster.
    let a = Node::start_ro_proc_sys("a", &mut wire, "100.64.0.1").await;
    let b = Node::start_ro_proc_sys("b", &mut wire, "100.64.0.2").await;
    let c = Node::start_ro_proc_sys("c", &mut wire, "100.64.0.3").await;
    for n in [&a, &b, &c] {
        permissive_sysctls(&n.ns);
    }
    // a also has a LAN with its default route: what a tenant must never
    // reach through it.
    let lan = Netns::new("lan");
    a.ns.exec(&[
        "ip", "link", "add", "lan0", "type", "veth", "peer", "name", "eth0", "netns", &lan.name,
    ]);
    a.ns.exec(&["ip", "addr", "add", "192.168.50.1/24", "dev", "lan0"]);
    a.ns.exec(&["ip", "link", "set", "lan0", "up"]);
    lan.exec(&["ip", "addr", "add", "192.168.50.2/24", "dev", "eth0"]);
    lan.exec(&["ip", "link", "set", "eth0", "up"]);
    lan.exec(&["ip", "route", "add", "default", "via", "192.168.50.1"]);
    a.ns.exec(&["ip", "route", "add", "default", "via", "192.168.50.2"]);

    // b and c (and their pods) come first, so their pods' captures see
    // whatever a's stack would say when a's devices are made.
    b.apply(NETS, vec![a.as_peer(PeerGroup::Local, &[BLUE])])
        .await;
    c.apply(NETS, vec![a.as_peer(PeerGroup::Remote, &[BLUE])])
        .await;
    let pb = b.pod("pb", "blue", &["10.1.0.2/24", "fd00:1::2/64"]).await;
    let pc = c.pod("pc", "blue", &["10.1.0.3/24", "fd00:1::3/64"]).await;
    let cap_b = capture(&pb);
    let cap_c = capture(&pc);
    a.apply(
        NETS,
        vec![
            b.as_peer(PeerGroup::Local, &[BLUE]),
            c.as_peer(PeerGroup::Remote, &[BLUE]),
        ],
    )
    .await;
    let pa = a.pod("pa", "blue", &["10.1.0.1/24", "fd00:1::1/64"]).await;
    let cap_a = capture(&pa);
    assert!(
        ping_ok(&pa, "10.1.0.2", Duration::from_secs(15)),
        "pa -> pb"
    );
    assert!(
        ping_ok(&pa, "10.1.0.3", Duration::from_secs(15)),
        "pa -> pc"
    );
    assert!(
        ping_ok(&pa, "fd00:1::3", Duration::from_secs(10)),
        "pa -> pc v6"
    );

    // Every node has a UDP socket on 0.0.0.0, and so has the LAN host.
    let sockets: Vec<(String, std::net::UdpSocket)> =
        [("a", &a.ns), ("b", &b.ns), ("c", &c.ns), ("lan host", &lan)]
            .into_iter()
            .map(|(name, ns)| (name.to_string(), udp_in(ns)))
            .collect();

    let pa_mac = mac_of(&pa, "eth0");
    let pod_ip = Ipv4Addr::new(10, 1, 0, 1);
    let node_ips: Vec<Ipv4Addr> = [&a.underlay_ip, &b.underlay_ip, &c.underlay_ip]
        .iter()
        .map(|s| s.parse().unwrap())
        .chain([
            Ipv4Addr::new(192, 168, 50, 1),
            Ipv4Addr::new(192, 168, 50, 2),
        ])
        .collect();
    let bridge_macs: Vec<[u8; 6]> = [&a, &b, &c]
        .iter()
        .map(|n| mac_of(&n.ns, &format!("l2mb-{BLUE:06x}")))
        .collect();

    // ARP and ping the way a pod's own stack does it.
    pa.exec(&["ip", "route", "add", "default", "dev", "eth0"]);
    for ip in &node_ips {
        let ip = ip.to_string();
        let o = pa.try_exec(&["ping", "-c", "1", "-W", "1", &ip]);
        assert!(!o.status.success(), "pa got a ping reply from {ip}");
        let neigh = pa.exec(&["ip", "neigh", "show", &ip]);
        assert!(!neigh.contains("lladdr"), "{ip} answered pa's ARP: {neigh}");
    }
    // And by hand: ARP and UDP to broadcast, to the link-local group a
    // bridge hands to its port's own stack, and to each bridge's MAC (the
    // route through a node into its LAN).
    let mut frames = Vec::new();
    for (i, ip) in node_ips.iter().enumerate() {
        for dst in [BROADCAST, SLOW_PROTOCOLS]
            .into_iter()
            .chain(bridge_macs.iter().copied())
        {
            frames.push(arp_request(dst, pa_mac, pod_ip, *ip));
            for (_, s) in &sockets {
                let port = s.local_addr().unwrap().port();
                frames.push(udp4(dst, pa_mac, pod_ip, *ip, port, &[i as u8; 8]));
            }
        }
    }
    // A datagram to pod pb after them all: once it has arrived, so has
    // everything before it on the same path.
    let pb_sock = udp_in(&pb);
    let pb_port = pb_sock.local_addr().unwrap().port();
    let pb_ip = Ipv4Addr::new(10, 1, 0, 2);
    frames.push(udp4(
        mac_of(&pb, "eth0"),
        pa_mac,
        pod_ip,
        pb_ip,
        pb_port,
        b"marker",
    ));
    send_frames(&pa, "eth0", frames);
    let deadline = Instant::now() + Duration::from_secs(10);
    while received(&pb_sock) == 0 {
        assert!(Instant::now() < deadline, "the marker never reached pb");
        std::thread::sleep(Duration::from_millis(50));
    }
    for (name, s) in &sockets {
        assert_eq!(received(s), 0, "a tenant pod's UDP reached {name}");
    }
    for n in [&a, &b, &c] {
        let neigh = n.ns.exec(&["ip", "neigh", "show", "10.1.0.1"]);
        assert!(
            neigh.trim().is_empty(),
            "{} learned the pod: {neigh}",
            n.ns.name
        );
        for dev in [format!("l2mb-{BLUE:06x}"), format!("l2mt-{BLUE:06x}")] {
            let addrs = addresses(&n.ns, &dev);
            assert!(addrs.trim().is_empty(), "{dev} has addresses: {addrs}");
        }
    }

    let pod_macs: Vec<String> = [&pa, &pb, &pc]
        .iter()
        .map(|p| fmt_mac(mac_of(p, "eth0")))
        .collect();
    for (pod, cap) in [("pa", cap_a), ("pb", cap_b), ("pc", cap_c)] {
        let out = cap.finish();
        let seen = sources(&out);
        assert!(!seen.is_empty(), "{pod}'s capture saw nothing: {out}");
        for (src, line) in seen {
            assert!(
                pod_macs.contains(&src),
                "{pod} saw a frame from a node: {line}"
            );
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn attach_refuses_the_nodes_own_interfaces_and_detach_restores_the_port() {
    if !can_run(&[]) {
        return;
    }
    let mut wire = Underlay::new();
    let a = Node::start("a", &mut wire, "100.64.0.1").await;
    a.apply(NETS, vec![]).await;
    a.ns.exec(&[
        "ip", "link", "add", "up0", "type", "veth", "peer", "name", "up0b",
    ]);
    a.ns.exec(&["ip", "link", "set", "up0", "up"]);
    a.ns.exec(&["ip", "route", "add", "default", "dev", "up0"]);
    a.ns.exec(&["ip", "link", "add", "br9", "type", "bridge"]);
    a.ns.exec(&[
        "ip", "link", "add", "pod0", "type", "veth", "peer", "name", "pod0b",
    ]);
    a.ns.exec(&["ip", "link", "set", "pod0", "mtu", "1500", "up"]);
    let mut c = client::connect(&a.socket).await.unwrap();
    for (ifname, why) in [
        ("lo", "loopback"),
        ("eth0", "10.200.0.1"),
        ("up0", "default route"),
        ("br9", "bridge interface"),
    ] {
        let e = c
            .attach_port(AttachPortRequest {
                network: "blue".into(),
                ifname: ifname.into(),
                ..Default::default()
            })
            .await
            .unwrap_err();
        assert_eq!(e.code(), tonic::Code::InvalidArgument, "{ifname}: {e:?}");
        assert!(e.message().contains(why), "{ifname}: {}", e.message());
        let link = a.ns.exec(&["ip", "-d", "link", "show", ifname]);
        assert!(!link.contains("l2mb-"), "{ifname} was attached: {link}");
    }

    let before = a.ns.exec(&["ip", "-d", "link", "show", "pod0"]);
    assert!(
        before.contains("mtu 1500") && !before.contains("NOARP"),
        "{before}"
    );
    c.attach_port(AttachPortRequest {
        network: "blue".into(),
        ifname: "pod0".into(),
        ..Default::default()
    })
    .await
    .unwrap();
    let attached = a.ns.exec(&["ip", "-d", "link", "show", "pod0"]);
    assert!(
        attached.contains("mtu 1390") && attached.contains("NOARP"),
        "{attached}"
    );
    assert!(
        attached.contains("addrgenmode none"),
        "no IPv6 address of the node's on a port: {attached}"
    );
    c.detach_port(DetachPortRequest {
        network: "blue".into(),
        ifname: "pod0".into(),
    })
    .await
    .unwrap();
    let after = a.ns.exec(&["ip", "-d", "link", "show", "pod0"]);
    assert!(after.contains("mtu 1500"), "MTU restored: {after}");
    assert!(!after.contains("NOARP"), "ARP restored: {after}");
    assert!(after.contains("group default"), "group restored: {after}");
    assert!(after.contains("addrgenmode eui64"), "{after}");
    assert!(!after.contains("l2mesh-pod"), "alias cleared: {after}");
}
