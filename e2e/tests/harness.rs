//! Self-tests of the harness: topologies come up, isolation holds, the
//! process runner captures output, and teardown leaves nothing behind, even
//! after a panic. Root only; skipped with a reason otherwise (failing when
//! `CI` is set).

// Helpers outside #[test] functions panic on purpose too: they are test code.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::net::{IpAddr, Ipv4Addr};
use std::process::Command;
use std::time::Duration;

use l2mesh_e2e::netns::{self, NameScope, Netns};
use l2mesh_e2e::plan::TopologySpec;
use l2mesh_e2e::preflight::NETNS_TOOLS;
use l2mesh_e2e::process::{ProcSpec, ProcState, Processes};
use l2mesh_e2e::{Lab, should_run};

fn netns_list() -> Vec<String> {
    l2mesh_e2e::registry::parse_netns_list(&netns::list_all().expect("ip netns list"))
}

fn leftovers(prefix: &str) -> Vec<String> {
    netns_list()
        .into_iter()
        .filter(|n| n.starts_with(prefix))
        .collect()
}

fn root_links() -> String {
    let out = Command::new("ip")
        .args(["-o", "link", "show"])
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn pid_alive(pid: u32) -> bool {
    // A zombie is dead for our purposes; the harness reaps its children.
    std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|stat| !stat.contains(") Z "))
}

#[test]
fn three_cluster_underlay_comes_up_and_pods_are_isolated() {
    if !should_run(
        "three_cluster_underlay_comes_up_and_pods_are_isolated",
        &NETNS_TOOLS,
    ) {
        return;
    }
    let lab = Lab::build(TopologySpec::default()).unwrap();
    let topo = lab.topology();
    let results = topo.check_underlay(Duration::from_secs(5)).unwrap();
    let failed: Vec<_> = results.iter().filter(|r| !r.ok).collect();
    assert!(failed.is_empty(), "underlay probes failed: {failed:#?}");
    // Every gateway pinged every other gateway and the broker over the WAN.
    for c in 1..=3 {
        let from = format!("c{c}-gw");
        let wan_peers = results
            .iter()
            .filter(|r| r.probe.from == from && r.replied && r.probe.addr.octets()[0] == 192)
            .count();
        assert_eq!(
            wan_peers, 3,
            "{from} should reach the broker and two gateways"
        );
    }
    // A non-gateway node reaches its gateway over the LAN...
    let node = topo.node(2, 1).unwrap();
    let gw2_lan = IpAddr::V4(Ipv4Addr::new(10, 2, 0, 1));
    lab.wait_reachable(node, gw2_lan, Duration::from_secs(5))
        .unwrap();
    // ...but not the WAN or the broker: clusters sit behind their gateways.
    lab.assert_unreachable(node, IpAddr::V4(Ipv4Addr::new(192, 0, 2, 1)))
        .unwrap();
    // Pods hold only loopback until l2mesh-cni attaches them.
    let pod = topo.pod(1, 1, 1).unwrap();
    assert_eq!(pod.links().unwrap(), vec!["lo"]);
    lab.assert_unreachable(pod, IpAddr::V4(Ipv4Addr::new(10, 1, 0, 2)))
        .unwrap();
    // A broken isolation expectation reports as such.
    let err = lab
        .assert_unreachable(node, gw2_lan)
        .unwrap_err()
        .to_string();
    assert!(err.contains("unexpectedly reached 10.2.0.1"), "{err}");
}

#[test]
fn process_runner_captures_output_restarts_and_reports_logs_on_timeout() {
    if !should_run(
        "process_runner_captures_output_restarts_and_reports_logs_on_timeout",
        &NETNS_TOOLS,
    ) {
        return;
    }
    let scope = NameScope::new();
    let ns = Netns::create(&scope, "proc").unwrap();
    let logs = tempdir(&scope);
    let procs = Processes::new(&logs);
    let id = procs
        .spawn(
            ProcSpec::new("talker", &ns, "sh")
                .arg("-c")
                .arg("echo out-$GREETING; echo err-line >&2; ip -o link show; exec sleep 60")
                .env("GREETING", "hello"),
        )
        .unwrap();
    procs
        .wait_until(
            "talker printed on stdout and stderr",
            Duration::from_secs(5),
            || {
                let log = procs.log(id).unwrap();
                log.contains("out-hello") && log.contains("err-line") && log.contains("lo:")
            },
        )
        .unwrap();
    let log = procs.log(id).unwrap();
    assert!(
        !log.contains("wan0") && !log.contains("eth0"),
        "ran outside its namespace:\n{log}"
    );
    let ProcState::Running { pid } = procs.state(id).unwrap() else {
        panic!("talker should run");
    };

    procs.restart(id).unwrap();
    assert!(!pid_alive(pid), "the first talker survived its restart");
    procs
        .wait_until(
            "the restarted talker printed again",
            Duration::from_secs(5),
            || procs.log(id).unwrap().matches("out-hello").count() == 2,
        )
        .unwrap();

    let failing = procs
        .spawn(ProcSpec::new("quitter", &ns, "sh").args(["-c", "echo giving-up; exit 3"]))
        .unwrap();
    procs
        .wait_until("quitter exited", Duration::from_secs(5), || {
            matches!(procs.state(failing), Ok(ProcState::Exited(_)))
        })
        .unwrap();

    let err = procs
        .wait_until(
            "a condition that never holds",
            Duration::from_millis(300),
            || false,
        )
        .unwrap_err()
        .to_string();
    for needle in [
        "waiting for: a condition that never holds",
        "talker in",
        "out-hello",
        "err-line",
        "quitter in",
        "giving-up",
        "EXITED",
        "exit status: 3",
    ] {
        assert!(
            err.contains(needle),
            "timeout message lacks {needle:?}:\n{err}"
        );
    }

    procs.kill(id).unwrap();
    assert_eq!(procs.state(id).unwrap(), ProcState::Stopped);
    assert!(
        procs.spawn(ProcSpec::new("talker", &ns, "true")).is_err(),
        "duplicate names must be refused"
    );
    drop(procs);
    let _ = std::fs::remove_dir_all(&logs);
}

fn tempdir(scope: &NameScope) -> std::path::PathBuf {
    let dir = std::env::temp_dir().join(format!("{}logs", scope.prefix()));
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

fn small() -> TopologySpec {
    TopologySpec {
        clusters: 2,
        nodes_per_cluster: 2,
        pods_per_node: 1,
    }
}

#[test]
fn teardown_removes_every_namespace_device_and_process() {
    if !should_run(
        "teardown_removes_every_namespace_device_and_process",
        &NETNS_TOOLS,
    ) {
        return;
    }
    let lab = Lab::build(small()).unwrap();
    let prefix = lab.topology().prefix().to_owned();
    let manifest = lab
        .write_file("c1/manifests/net.yaml", "kind: L2Network\n")
        .unwrap();
    assert!(manifest.starts_with(lab.log_dir()));
    assert!(lab.write_file("../escape", "x").is_err());
    let made = leftovers(&prefix);
    assert_eq!(
        made.len(),
        1 + 1 + 4 + 4,
        "switch, broker, 4 nodes, 4 pods: {made:?}"
    );
    let node = lab.topology().node(1, 1).unwrap();
    let id = lab
        .spawn(ProcSpec::new("sleeper", node, "sleep").arg("60"))
        .unwrap();
    let ProcState::Running { pid } = lab.procs().state(id).unwrap() else {
        panic!("sleeper should run");
    };
    // A stray process started behind the harness's back also goes.
    let stray = node.command("sleep").arg("60").spawn().unwrap();
    let log_dir = lab.log_dir().to_owned();
    drop(lab);
    assert_eq!(leftovers(&prefix), Vec::<String>::new());
    assert!(!pid_alive(pid), "sleeper {pid} survived teardown");
    let mut stray = stray;
    let status = stray.wait().unwrap();
    assert!(!status.success(), "stray process should have been killed");
    assert!(!log_dir.exists(), "logs of a passing test are removed");
    let links = root_links();
    assert!(
        !links.contains("c1gw-"),
        "a veth leaked into the root namespace:\n{links}"
    );
}

#[test]
fn teardown_after_a_panicking_test_leaves_nothing() {
    if !should_run(
        "teardown_after_a_panicking_test_leaves_nothing",
        &NETNS_TOOLS,
    ) {
        return;
    }
    let (tx, rx) = std::sync::mpsc::channel();
    let outcome = std::thread::spawn(move || {
        let lab = Lab::build(small()).unwrap();
        let node = lab.topology().gateway(2).unwrap();
        let id = lab
            .spawn(ProcSpec::new("victim", node, "sleep").arg("60"))
            .unwrap();
        let ProcState::Running { pid } = lab.procs().state(id).unwrap() else {
            panic!("victim should run");
        };
        tx.send((
            lab.topology().prefix().to_owned(),
            pid,
            lab.log_dir().to_owned(),
        ))
        .unwrap();
        panic!("deliberate panic inside a running lab");
    })
    .join();
    assert!(outcome.is_err(), "the thread should have panicked");
    let (prefix, pid, log_dir) = rx.recv().unwrap();
    assert_eq!(leftovers(&prefix), Vec::<String>::new());
    assert!(!pid_alive(pid), "victim {pid} survived the panic");
    assert!(
        log_dir.exists(),
        "logs of a failing test are kept for reading"
    );
    let _ = std::fs::remove_dir_all(log_dir);
}

#[test]
fn routes_and_forwarding_join_two_segments() {
    if !should_run("routes_and_forwarding_join_two_segments", &NETNS_TOOLS) {
        return;
    }
    let scope = NameScope::new();
    let a = Netns::create(&scope, "a").unwrap();
    let r = Netns::create(&scope, "router").unwrap();
    let b = Netns::create(&scope, "b").unwrap();
    a.add_veth("eth0", &r, "ra").unwrap();
    b.add_veth("eth0", &r, "rb").unwrap();
    for (ns, dev, addr) in [
        (&a, "eth0", "10.77.1.2/24"),
        (&r, "ra", "10.77.1.1/24"),
        (&r, "rb", "10.77.2.1/24"),
        (&b, "eth0", "10.77.2.2/24"),
    ] {
        ns.add_addr(dev, addr.parse().unwrap()).unwrap();
        ns.link_up(dev).unwrap();
    }
    let b_addr = IpAddr::V4(Ipv4Addr::new(10, 77, 2, 2));
    assert!(!a.ping(b_addr, 1).unwrap(), "no route yet");
    a.add_route(None, "10.77.1.1".parse().unwrap()).unwrap();
    b.add_route(
        Some("10.77.1.0/24".parse().unwrap()),
        "10.77.2.1".parse().unwrap(),
    )
    .unwrap();
    r.sysctl("net.ipv4.ip_forward", "1").unwrap();
    assert!(
        a.ping(b_addr, 2).unwrap(),
        "a should reach b through the router"
    );
    let names: Vec<String> = [&a, &r, &b].iter().map(|n| n.name().to_owned()).collect();
    drop((a, r, b));
    let left = netns_list();
    assert!(
        names.iter().all(|n| !left.contains(n)),
        "{names:?} left in {left:?}"
    );
}

#[test]
fn a_dying_daemon_fails_the_wait_at_once_with_its_log() {
    if !should_run(
        "a_dying_daemon_fails_the_wait_at_once_with_its_log",
        &NETNS_TOOLS,
    ) {
        return;
    }
    let scope = NameScope::new();
    let ns = Netns::create(&scope, "dying").unwrap();
    let logs = tempdir(&scope);
    let procs = Processes::new(&logs);
    procs
        .spawn(
            ProcSpec::new("fragile", &ns, "sh")
                .args(["-c", "echo about-to-crash; exit 7"])
                .daemon(),
        )
        .unwrap();
    let started = std::time::Instant::now();
    let err = procs
        .wait_until(
            "something the daemon would have done",
            Duration::from_secs(30),
            || false,
        )
        .unwrap_err();
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "did not fail fast"
    );
    let msg = err.to_string();
    assert!(matches!(err, l2mesh_e2e::Error::ProcessDied(_)), "{msg}");
    for needle in [
        "fragile (exit status: 7) exited while waiting for",
        "about-to-crash",
    ] {
        assert!(msg.contains(needle), "lacks {needle:?}:\n{msg}");
    }
    drop(procs);
    let _ = std::fs::remove_dir_all(&logs);
}

#[test]
fn wan_capture_sees_clear_text_and_background_ping_counts_losses() {
    if !should_run(
        "wan_capture_sees_clear_text_and_background_ping_counts_losses",
        &["ip", "ping", "tcpdump"],
    ) {
        return;
    }
    use l2mesh_e2e::capture::{Capture, FrameKind};
    use l2mesh_e2e::ping::BackgroundPing;
    let lab = Lab::build(TopologySpec {
        clusters: 2,
        nodes_per_cluster: 1,
        pods_per_node: 0,
    })
    .unwrap();
    let topo = lab.topology();
    let gw1 = topo.gateway(1).unwrap();
    let gw2_wan = IpAddr::V4(Ipv4Addr::new(192, 0, 2, 12));

    // The underlay carries clear text; scenario 8 asserts the opposite
    // for pod traffic once l2mesh encrypts it.
    let cap = Capture::start(lab.procs(), "wan-capture", topo.switch(), "br-wan", "icmp").unwrap();
    let marker = b"L2MESHMARK";
    let pattern: String = marker.iter().map(|b| format!("{b:02x}")).collect();
    let out = gw1
        .run(
            "ping",
            ["-n", "-c", "1", "-W", "2", "-p", &pattern, "192.0.2.12"],
        )
        .unwrap();
    assert!(out.contains("1 received"), "{out}");
    let pcap = cap.stop(lab.procs()).unwrap();
    assert!(
        pcap.contains(marker),
        "the marker should be visible on the WAN"
    );
    assert!(
        pcap.kinds().contains(&FrameKind::Icmp4),
        "{:?}",
        pcap.kinds()
    );

    // Losses are counted: cut the WAN port of gateway 2 while pinging.
    let ping = BackgroundPing::start(
        lab.procs(),
        "ping-gw2",
        gw1,
        gw2_wan,
        Duration::from_millis(20),
    )
    .unwrap();
    let replies = |n: usize| {
        let log = lab.procs().log(ping.id()).unwrap();
        log.matches(" bytes from ").count() >= n
    };
    lab.wait_until("10 replies", Duration::from_secs(10), || replies(10))
        .unwrap();
    topo.switch()
        .ip(&["link", "set", "dev", "c2gw-w", "down"])
        .unwrap();
    lab.wait_until("3 unanswered pings", Duration::from_secs(10), || {
        lab.procs()
            .log(ping.id())
            .unwrap()
            .matches("no answer yet")
            .count()
            >= 3
    })
    .unwrap();
    topo.switch().link_up("c2gw-w").unwrap();
    let before = lab
        .procs()
        .log(ping.id())
        .unwrap()
        .matches(" bytes from ")
        .count();
    lab.wait_until("replies again", Duration::from_secs(10), || {
        replies(before + 5)
    })
    .unwrap();
    let stats = ping.finish(lab.procs()).unwrap();
    assert!(stats.transmitted >= 18, "{stats:?}");
    assert!(stats.lost() >= 3, "{stats:?}");
    // The finished ping is not a dead daemon: waits still work.
    lab.wait_until("nothing", Duration::from_secs(1), || true)
        .unwrap();
}
