//! `l2mesh-cni` invoked as a real binary, per the CNI spec, in real network
//! namespaces. The plugin runs inside a "node" namespace (like a runtime on a
//! host) and puts veths into "pod" namespaces; a test-local `Dataplane` gRPC
//! server really plugs the host ends into a bridge the test made in the node
//! namespace. The plugin itself runs with an empty `PATH`: it uses netlink,
//! no tools. The harness needs root and `ip`; skips otherwise unless `CI` is set.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod cni_support;

use cni_support::{BRIDGE, Netns, can_run, lab, ping, pod_ip, sh};
use serde_json::json;
use std::collections::BTreeSet;
use std::path::Path;
use std::process::Command;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn add_check_del_with_l2mesh_ipam_and_pods_talk_over_the_bridge() {
    if !can_run() {
        return;
    }
    let lab = lab(1400).await;
    let (pod1, pod2) = (Netns::new("pod1"), Netns::new("pod2"));
    let mut conf = lab.conf(lab.l2mesh_ipam());
    conf["runtimeConfig"] = json!({"mac": "02:12:34:56:78:9a"});
    // What Multus passes: the pod's identity among keys the plugin ignores.
    let multus_args = "IgnoreUnknown=true;K8S_POD_NAMESPACE=team;K8S_POD_NAME=web-0;\
                       K8S_POD_INFRA_CONTAINER_ID=abc123;K8S_POD_UID=u-1";
    let a = lab
        .cni_env(
            "ADD",
            &pod1.path(),
            "net1",
            &conf,
            &[("CNI_ARGS", multus_args)],
        )
        .await;
    assert!(a.ok, "{}", a.json);
    assert_eq!(a.json["cniVersion"], "1.0.0");
    assert_eq!(a.json["interfaces"][1]["name"], "net1");
    assert_eq!(a.json["interfaces"][1]["mac"], "02:12:34:56:78:9a");
    assert_eq!(
        a.json["interfaces"][1]["mtu"], 1400,
        "MTU comes from the dataplane"
    );
    assert_eq!(a.json["interfaces"][1]["sandbox"], pod1.path());
    assert_eq!(a.json["ips"][0]["interface"], 1);
    let ip1 = pod_ip(&a.json);
    assert!(ip1.starts_with("10.77.1.") && ip1.ends_with("/16"), "{ip1}");

    let b = lab
        .cni("ADD", &pod2.path(), "net1", &lab.conf(lab.l2mesh_ipam()))
        .await;
    assert!(b.ok, "{}", b.json);
    let ip2 = pod_ip(&b.json);
    assert_ne!(ip1, ip2);
    let host1 = a.json["interfaces"][0]["name"].as_str().unwrap().to_owned();
    let host2 = b.json["interfaces"][0]["name"].as_str().unwrap().to_owned();
    assert!(lab.ports.lock().unwrap()["blue"].contains(&host1));
    assert_eq!(
        lab.pods.lock().unwrap()[&host1],
        ("team".to_owned(), "web-0".to_owned()),
        "AttachPort names the pod from CNI_ARGS"
    );
    assert_eq!(
        lab.pods.lock().unwrap()[&host2],
        (String::new(), String::new()),
        "no K8S_POD_* args, no pod"
    );
    assert!(lab.host_links().contains(&format!("master {BRIDGE}")));
    assert!(
        ping(&pod1, ip2.split('/').next().unwrap()),
        "pods on one bridge must reach each other"
    );

    let mut check = conf.clone();
    check["prevResult"] = a.json.clone();
    let c = lab.cni("CHECK", &pod1.path(), "net1", &check).await;
    assert!(c.ok, "{}", c.json);
    // CHECK notices an interface that no longer matches the result.
    sh(&["ip", "-n", &pod1.0, "link", "set", "net1", "mtu", "1300"]);
    let c = lab.cni("CHECK", &pod1.path(), "net1", &check).await;
    assert!(!c.ok);
    assert_eq!(c.json["code"], 101, "{}", c.json);
    assert!(
        c.json["msg"].as_str().unwrap().contains("MTU 1300"),
        "{}",
        c.json
    );
    sh(&["ip", "-n", &pod1.0, "link", "set", "net1", "mtu", "1400"]);
    sh(&["ip", "-n", &pod1.0, "addr", "flush", "dev", "net1"]);
    let c = lab.cni("CHECK", &pod1.path(), "net1", &check).await;
    assert_eq!(c.json["code"], 101, "{}", c.json);
    assert!(
        c.json["msg"].as_str().unwrap().contains("missing"),
        "{}",
        c.json
    );

    let d = lab.cni("DEL", &pod1.path(), "net1", &conf).await;
    assert!(d.ok, "{}", d.json);
    assert!(!lab.host_links().contains(&host1));
    assert!(!lab.ports.lock().unwrap()["blue"].contains(&host1));
    let again = lab.cni("DEL", &pod1.path(), "net1", &conf).await;
    assert!(again.ok, "DEL is idempotent: {}", again.json);
    let c = lab.cni("CHECK", &pod1.path(), "net1", &check).await;
    assert!(!c.ok);
    assert_eq!(c.json["code"], 101, "{}", c.json);

    // The released address is not handed out again right away.
    let pod3 = Netns::new("pod3");
    let e = lab
        .cni("ADD", &pod3.path(), "net1", &lab.conf(lab.l2mesh_ipam()))
        .await;
    assert!(e.ok, "{}", e.json);
    assert_ne!(pod_ip(&e.json), ip1);
    assert_ne!(pod_ip(&e.json), ip2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn static_addresses_from_runtime_config() {
    if !can_run() {
        return;
    }
    let lab = lab(1390).await;
    let (pod1, pod2) = (Netns::new("s1"), Netns::new("s2"));
    let mut conf = lab.conf(lab.l2mesh_ipam());
    conf["runtimeConfig"] = json!({"ips": ["10.77.9.9/16"]});
    let a = lab.cni("ADD", &pod1.path(), "eth7", &conf).await;
    assert!(a.ok, "{}", a.json);
    assert_eq!(pod_ip(&a.json), "10.77.9.9/16");
    let b = lab.cni("ADD", &pod2.path(), "eth7", &conf).await;
    assert!(!b.ok, "the same static address twice must fail");
    assert_eq!(b.json["code"], 100, "{}", b.json);
    assert!(b.json["msg"].as_str().unwrap().contains("in use"));
    assert_eq!(
        lab.host_links().matches("master").count(),
        1,
        "failed ADD leaves nothing behind"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn delegates_ipam_to_host_local() {
    if !can_run() {
        return;
    }
    let host_local = Path::new("/usr/lib/cni/host-local");
    if !host_local.exists() {
        assert!(
            std::env::var_os("CI").is_none(),
            "{} is missing in CI",
            host_local.display()
        );
        eprintln!(
            "skipping: {} is missing (apt install containernetworking-plugins)",
            host_local.display()
        );
        return;
    }
    let lab = lab(1390).await;
    let pod = Netns::new("hl");
    let leases = lab.dir.path().join("host-local");
    let conf = lab.conf(json!({
        "type": "host-local",
        "ranges": [[{"subnet": "10.78.0.0/24"}], [{"subnet": "fd00:78::/64"}]],
        "routes": [{"dst": "10.79.0.0/16"}, {"dst": "fd00:79::/48"}],
        "dataDir": leases,
    }));
    let a = lab.cni("ADD", &pod.path(), "net1", &conf).await;
    assert!(a.ok, "{}", a.json);
    let ip = pod_ip(&a.json);
    assert!(ip.starts_with("10.78.0.") && ip.ends_with("/24"), "{ip}");
    assert_eq!(a.json["ips"][0]["interface"], 1);
    let ip6 = a.json["ips"][1]["address"].as_str().unwrap();
    assert!(
        ip6.starts_with("fd00:78::") && ip6.ends_with("/64"),
        "{ip6}"
    );
    // Both families' addresses and routes are in the pod.
    let show = |args: &[&str]| {
        let out = Command::new("ip")
            .args(["-n", &pod.0])
            .args(args)
            .output()
            .unwrap();
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    let addrs = show(&["addr", "show", "dev", "net1"]);
    assert!(addrs.contains(&ip) && addrs.contains(ip6), "{addrs}");
    let routes = show(&["route"]) + &show(&["-6", "route"]);
    // Routes without "gw" go by the family's gateway, as the reference
    // plugins install them.
    assert!(
        routes.contains("10.79.0.0/16 via 10.78.0.1 dev net1")
            && routes.contains("fd00:79::/48 via fd00:78::1 dev net1"),
        "{routes}"
    );
    let lease = leases.join("blue").join(ip.split('/').next().unwrap());
    assert!(lease.exists(), "host-local wrote its lease");
    let mut check = conf.clone();
    check["prevResult"] = a.json.clone();
    let c = lab.cni("CHECK", &pod.path(), "net1", &check).await;
    assert!(c.ok, "{}", c.json);
    let d = lab.cni("DEL", &pod.path(), "net1", &conf).await;
    assert!(d.ok, "{}", d.json);
    assert!(!lease.exists(), "host-local released its lease");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_configs_and_environments_get_cni_errors() {
    if !can_run() {
        return;
    }
    let lab = lab(1390).await;
    let pod = Netns::new("bad");
    let good = lab.conf(lab.l2mesh_ipam());

    let v = lab
        .cni("VERSION", "", "", &json!({"cniVersion": "1.0.0"}))
        .await;
    assert!(v.ok);
    assert!(
        v.json["supportedVersions"]
            .as_array()
            .unwrap()
            .contains(&json!("1.0.0"))
    );

    let mut no_name = good.clone();
    no_name.as_object_mut().unwrap().remove("name");
    let r = lab.cni("ADD", &pod.path(), "net1", &no_name).await;
    assert!(!r.ok);
    assert_eq!(r.json["code"], 7, "{}", r.json);
    assert!(r.json["msg"].as_str().unwrap().contains("name"));

    let mut unknown = good.clone();
    unknown["name"] = json!("purple");
    let r = lab.cni("ADD", &pod.path(), "net1", &unknown).await;
    assert!(!r.ok);
    assert_eq!(r.json["code"], 7, "{}", r.json);
    assert!(
        r.json["msg"].as_str().unwrap().contains("not known"),
        "{}",
        r.json
    );

    let r = lab
        .cni("ADD", "/run/netns/l2cni-does-not-exist", "net1", &good)
        .await;
    assert!(!r.ok);
    assert_eq!(r.json["code"], 3, "{}", r.json);

    let r = lab.cni("ADD", &pod.path(), "", &good).await;
    assert_eq!(r.json["code"], 4, "{}", r.json);

    let not_netns = lab.dir.path().join("not-a-netns");
    std::fs::write(&not_netns, "").unwrap();
    let r = lab
        .cni("ADD", not_netns.to_str().unwrap(), "net1", &good)
        .await;
    assert_eq!(r.json["code"], 4, "{}", r.json);
    assert!(
        r.json["msg"]
            .as_str()
            .unwrap()
            .contains("not a network namespace"),
        "{}",
        r.json
    );

    let mut no_dp = good.clone();
    no_dp["dataplaneSocket"] = json!(lab.dir.path().join("nope.sock"));
    let r = lab.cni("ADD", &pod.path(), "net1", &no_dp).await;
    assert_eq!(r.json["code"], 11, "{}", r.json);

    let r = lab
        .cni_env("ADD", &pod.path(), "net1", &json!("not an object"), &[])
        .await;
    assert_eq!(r.json["code"], 6, "{}", r.json);

    let mut bad_mac = good.clone();
    bad_mac["runtimeConfig"] = json!({"mac": "zz:00"});
    let r = lab.cni("ADD", &pod.path(), "net1", &bad_mac).await;
    assert_eq!(r.json["code"], 7, "{}", r.json);

    let mut no_prev = good.clone();
    no_prev.as_object_mut().unwrap().remove("prevResult");
    let r = lab.cni("CHECK", &pod.path(), "net1", &no_prev).await;
    assert_eq!(r.json["code"], 7, "{}", r.json);

    assert!(
        !lab.host_links().contains("master"),
        "no failed ADD left an interface behind"
    );
    let pod_links = Command::new("ip")
        .args(["-n", &pod.0, "-o", "link"])
        .output()
        .unwrap();
    assert!(!String::from_utf8_lossy(&pod_links.stdout).contains("net1"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_adds_never_share_an_address() {
    if !can_run() {
        return;
    }
    let lab = lab(1390).await;
    let pods: Vec<Netns> = (0..6).map(|i| Netns::new(&format!("c{i}"))).collect();
    let conf = lab.conf(lab.l2mesh_ipam());
    let paths: Vec<String> = pods.iter().map(Netns::path).collect();
    let results =
        futures::future::join_all(paths.iter().map(|p| lab.cni("ADD", p, "net1", &conf))).await;
    let mut ips = BTreeSet::new();
    for r in &results {
        assert!(r.ok, "{}", r.json);
        assert!(
            ips.insert(pod_ip(&r.json)),
            "address handed out twice: {ips:?}"
        );
    }
    assert_eq!(lab.ports.lock().unwrap()["blue"].len(), 6);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ipv6_l2mesh_ipam_and_static_addresses() {
    if !can_run() {
        return;
    }
    let lab = lab(1390).await;
    let (pod1, pod2) = (Netns::new("v6a"), Netns::new("v6b"));
    let mut conf = lab.conf(json!({
        "type": "l2mesh",
        "subnet": "fd00:77::/48",
        "dataDir": lab.dir.path().join("ipam"),
    }));
    conf["name"] = json!("six");
    let a = lab.cni("ADD", &pod1.path(), "net1", &conf).await;
    assert!(a.ok, "{}", a.json);
    let ip1 = pod_ip(&a.json);
    assert_eq!(
        ip1, "fd00:77:0:1::1/48",
        "first of the node's slice, range prefix"
    );
    let mut fixed = conf.clone();
    fixed["runtimeConfig"] = json!({"ips": ["fd00:77:0:9::9"]});
    let b = lab.cni("ADD", &pod2.path(), "net1", &fixed).await;
    assert!(b.ok, "{}", b.json);
    assert_eq!(pod_ip(&b.json), "fd00:77:0:9::9/48");
    assert!(
        ping(&pod1, "fd00:77:0:9::9"),
        "IPv6 pods on one bridge must reach each other"
    );
    let mut check = conf.clone();
    check["prevResult"] = a.json.clone();
    let c = lab.cni("CHECK", &pod1.path(), "net1", &check).await;
    assert!(c.ok, "{}", c.json);
    // A static address of the other family is refused and leaves nothing.
    let pod3 = Netns::new("v6c");
    let mut wrong = conf.clone();
    wrong["runtimeConfig"] = json!({"ips": ["10.77.0.9/16"]});
    let r = lab.cni("ADD", &pod3.path(), "net1", &wrong).await;
    assert!(!r.ok);
    assert_eq!(r.json["code"], 100, "{}", r.json);
    assert!(
        r.json["msg"].as_str().unwrap().contains("outside"),
        "{}",
        r.json
    );
    let d = lab.cni("DEL", &pod1.path(), "net1", &conf).await;
    assert!(d.ok, "{}", d.json);
    let lease = lab.dir.path().join("ipam/six/fd00:77:0:1::1");
    assert!(!lease.exists(), "DEL released the IPv6 lease");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn delegated_static_ipam_gets_ignore_unknown_and_installs_routes() {
    if !can_run() {
        return;
    }
    let static_plugin = Path::new("/usr/lib/cni/static");
    if !static_plugin.exists() {
        assert!(
            std::env::var_os("CI").is_none(),
            "{} is missing in CI",
            static_plugin.display()
        );
        eprintln!("skipping: {} is missing", static_plugin.display());
        return;
    }
    let lab = lab(1390).await;
    let pod = Netns::new("st");
    let conf = lab.conf(json!({
        "type": "static",
        "addresses": [{"address": "10.81.0.5/24", "gateway": "10.81.0.1"}],
        "routes": [{"dst": "10.82.0.0/16"}],
    }));
    // The kubelet's keys, without IgnoreUnknown: static refuses unknown
    // keys unless the delegating plugin adds IgnoreUnknown=1.
    let args = "K8S_POD_NAMESPACE=team;K8S_POD_NAME=router-0";
    let a = lab
        .cni_env("ADD", &pod.path(), "net1", &conf, &[("CNI_ARGS", args)])
        .await;
    assert!(a.ok, "{}", a.json);
    assert_eq!(pod_ip(&a.json), "10.81.0.5/24");
    let out = Command::new("ip")
        .args(["-n", &pod.0, "route"])
        .output()
        .unwrap();
    let routes = String::from_utf8_lossy(&out.stdout);
    assert!(routes.contains("10.82.0.0/16 via 10.81.0.1"), "{routes}");
    let d = lab
        .cni_env("DEL", &pod.path(), "net1", &conf, &[("CNI_ARGS", args)])
        .await;
    assert!(d.ok, "{}", d.json);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn l2mesh_ipam_carries_routes_and_gateway_and_0_4_0_results_name_versions() {
    if !can_run() {
        return;
    }
    let lab = lab(1390).await;
    let pod = Netns::new("rt");
    let mut ipam = lab.l2mesh_ipam();
    ipam["gateway"] = json!(["10.77.0.1"]);
    ipam["routes"] = json!([
        {"dst": "10.90.0.0/16"},
        {"dst": "10.91.0.0/16", "gw": "10.77.0.254"},
    ]);
    let mut conf = lab.conf(ipam);
    conf["cniVersion"] = json!("0.4.0");
    let a = lab.cni("ADD", &pod.path(), "net1", &conf).await;
    assert!(a.ok, "{}", a.json);
    assert_eq!(a.json["cniVersion"], "0.4.0");
    assert_eq!(a.json["ips"][0]["version"], "4", "{}", a.json);
    assert_eq!(a.json["ips"][0]["gateway"], "10.77.0.1");
    assert_eq!(a.json["routes"][0]["dst"], "10.90.0.0/16");
    assert_eq!(a.json["routes"][1]["gw"], "10.77.0.254");
    let out = Command::new("ip")
        .args(["-n", &pod.0, "route"])
        .output()
        .unwrap();
    let routes = String::from_utf8_lossy(&out.stdout);
    assert!(
        routes.contains("10.90.0.0/16 via 10.77.0.1")
            && routes.contains("10.91.0.0/16 via 10.77.0.254"),
        "{routes}"
    );
    // CHECK takes the 0.4.0 result back as prevResult.
    let mut check = conf.clone();
    check["prevResult"] = a.json.clone();
    let c = lab.cni("CHECK", &pod.path(), "net1", &check).await;
    assert!(c.ok, "{}", c.json);
    // A 1.0.0 result has no version field.
    let pod2 = Netns::new("rt2");
    let b = lab
        .cni("ADD", &pod2.path(), "net1", &lab.conf(lab.l2mesh_ipam()))
        .await;
    assert!(b.ok, "{}", b.json);
    assert!(b.json["ips"][0].get("version").is_none(), "{}", b.json);
    let mut bad = lab.l2mesh_ipam();
    bad["gateway"] = json!(["10.77.0.1", "10.77.0.2"]);
    let e = lab
        .cni("ADD", &Netns::new("rt3").path(), "net1", &lab.conf(bad))
        .await;
    assert!(!e.ok && e.json["code"] == 7, "{}", e.json);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gc_frees_the_leases_of_attachments_that_are_gone() {
    if !can_run() {
        return;
    }
    let lab = lab(1390).await;
    let (live, gone) = (Netns::new("live"), Netns::new("gone"));
    let conf = lab.conf(lab.l2mesh_ipam());
    let a = lab.cni("ADD", &live.path(), "net1", &conf).await;
    let b = lab.cni("ADD", &gone.path(), "net1", &conf).await;
    assert!(a.ok && b.ok, "{} {}", a.json, b.json);
    let v = lab.cni("VERSION", "", "", &json!({})).await;
    assert!(
        v.json["supportedVersions"]
            .as_array()
            .unwrap()
            .contains(&json!("1.1.0")),
        "{}",
        v.json
    );
    let mut gc = conf.clone();
    gc["cniVersion"] = json!("1.1.0");
    // Without the list of valid attachments nothing is freed.
    let e = lab.cni("GC", "", "", &gc).await;
    assert!(!e.ok && e.json["code"] == 7, "{}", e.json);
    let container = |ns: &Netns| format!("ctr-{}-net1", ns.0);
    gc["cni.dev/valid-attachments"] = json!([{"containerID": container(&live), "ifname": "net1"}]);
    let r = lab.cni("GC", "", "", &gc).await;
    assert!(r.ok, "{}", r.json);
    // b's address (whose DEL was lost) is free again, a's is not.
    let take = |ip: &str| {
        let mut c = conf.clone();
        c["runtimeConfig"] = json!({"ips": [ip]});
        c
    };
    let ip_a = pod_ip(&a.json);
    let ip_b = pod_ip(&b.json);
    let again = lab
        .cni("ADD", &Netns::new("next").path(), "net2", &take(&ip_b))
        .await;
    assert!(again.ok, "{ip_b} was freed: {}", again.json);
    let clash = lab
        .cni("ADD", &Netns::new("clash").path(), "net2", &take(&ip_a))
        .await;
    assert!(!clash.ok && clash.json["code"] == 100, "{}", clash.json);
    let status = lab.cni("STATUS", "", "", &gc).await;
    assert!(status.ok, "{}", status.json);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_recreated_pod_announces_its_address_and_neighbours_update_at_once() {
    if !can_run() {
        return;
    }
    let lab = lab(1390).await;
    let (client, server) = (Netns::new("cl"), Netns::new("sv"));
    let mut sv_conf = lab.conf(lab.l2mesh_ipam());
    sv_conf["runtimeConfig"] = json!({"ips": ["10.77.5.5/16"], "mac": "02:00:00:00:05:01"});
    let a = lab
        .cni("ADD", &client.path(), "net1", &lab.conf(lab.l2mesh_ipam()))
        .await;
    let b = lab.cni("ADD", &server.path(), "net1", &sv_conf).await;
    assert!(a.ok && b.ok, "{} {}", a.json, b.json);
    assert!(ping(&client, "10.77.5.5"));
    let mac_seen = || {
        let out = Command::new("ip")
            .args(["-n", &client.0, "neigh", "show", "10.77.5.5"])
            .output()
            .unwrap();
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    assert!(mac_seen().contains("02:00:00:00:05:01"), "{}", mac_seen());
    // The kernel takes no new MAC within a second (locktime) of the last
    // update of an entry; a re-created pod comes back later than that.
    std::thread::sleep(std::time::Duration::from_millis(1500));
    let d = lab.cni("DEL", &server.path(), "net1", &sv_conf).await;
    assert!(d.ok, "{}", d.json);
    sv_conf["runtimeConfig"]["mac"] = json!("02:00:00:00:05:02");
    let again = lab.cni("ADD", &server.path(), "net1", &sv_conf).await;
    assert!(again.ok, "{}", again.json);
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(3);
    while !mac_seen().contains("02:00:00:00:05:02") {
        assert!(
            std::time::Instant::now() < deadline,
            "the client still has {}",
            mac_seen()
        );
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
}
