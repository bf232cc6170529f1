//! The shipped image and manifests, run for real: `deploy/image/build.sh`
//! builds the image once per test process (buildah, from scratch), then the
//! broker, one standalone agent per cluster and every node's dataplane run
//! from it as podman containers in the namespace topology, each with exactly
//! the privileges its manifest in `deploy/` declares (user, capabilities,
//! read-only root, seccomp, no-new-privileges, /dev/net/tun, /proc/sys
//! read-only). The dataplane DaemonSet's init container installs
//! `l2mesh-cni` from the image into each node's CNI bin dir, and pods attach
//! through that installed copy and ping across clusters. Root only; fails
//! loudly under CI when podman, buildah or runc cannot run here.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::net::SocketAddr;
use std::path::Path;
use std::time::{Duration, Instant};

use l2mesh_e2e::containers::mesh::{ContainerMesh, readiness_http, workload};
use l2mesh_e2e::containers::{self, BuiltImage, CONTAINER_TOOLS, RUNTIME};
use l2mesh_e2e::plan::TopologySpec;
use l2mesh_e2e::{Lab, Netns, should_run};

fn tools() -> Vec<&'static str> {
    let mut t = vec!["ip", "ping"];
    t.extend(CONTAINER_TOOLS);
    t
}

/// The image of this test process, or a panic naming the part that failed.
fn image() -> &'static BuiltImage {
    if !Path::new(RUNTIME).exists() {
        panic!("{RUNTIME} is missing: podman needs runc here (apt-get install runc)");
    }
    containers::shared_image(Path::new(env!("CARGO_TARGET_TMPDIR")))
        .unwrap_or_else(|e| panic!("building the image failed: {e}"))
}

/// `GET path` over plain HTTP from inside `ns`; the status code.
fn http_status(ns: &Netns, addr: SocketAddr, path: &str) -> Option<u16> {
    // A connect from the namespace: run a tiny client there with the
    // harness's own `ip netns exec`, as the kubelet's probe would connect.
    let out = ns
        .exec(
            "bash",
            [
                "-c",
                &format!(
                    "exec 3<>/dev/tcp/{}/{} && printf 'GET {path} HTTP/1.0\\r\\n\\r\\n' >&3 && head -n1 <&3",
                    addr.ip(),
                    addr.port()
                ),
            ],
        )
        .ok()?;
    String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()
}

#[test]
fn containers_image_static_cni_and_privileges() {
    if !should_run("containers_image_static_cni_and_privileges", &tools()) {
        return;
    }
    let image = image();
    let cni = image.file("/usr/local/bin/l2mesh-cni");
    assert!(
        containers::is_static(&cni).unwrap(),
        "l2mesh-cni in the image must be static (no NEEDED, no INTERP): {}",
        cni.display()
    );
    // Small enough to copy onto every host: unstripped it was over 100 MB.
    let limit_mib = if image.profile == "release" { 12 } else { 24 };
    let size = std::fs::metadata(&cni).unwrap().len();
    assert!(
        size < limit_mib << 20,
        "l2mesh-cni is {} MiB ({} build), over {limit_mib} MiB",
        size >> 20,
        image.profile
    );
    eprintln!("image built in {:?} ({})", image.took, image.profile);
}

#[test]
fn containers_pods_ping_across_clusters_with_the_manifests_privileges() {
    if !should_run(
        "containers_pods_ping_across_clusters_with_the_manifests_privileges",
        &tools(),
    ) {
        return;
    }
    let image = image();
    let started = Instant::now();
    let lab = Lab::build(TopologySpec {
        clusters: 2,
        nodes_per_cluster: 2,
        pods_per_node: 1,
    })
    .unwrap();
    let mesh = ContainerMesh::start(&lab, image, &mut |s| eprintln!("containers: {s}"))
        .unwrap_or_else(|e| panic!("{e}"));

    // The privileges really were the manifests' (no capability beyond them).
    let dp_flags = &mesh.flags()[&format!("{}-dp", mesh.nodes[0].role)];
    for want in [
        "--cap-drop=all",
        "--cap-add=NET_ADMIN",
        "--cap-add=NET_RAW",
        "--read-only",
    ] {
        assert!(
            dp_flags.iter().any(|f| f == want),
            "{want} not in {dp_flags:?}"
        );
    }
    assert!(
        !dp_flags.iter().any(|f| f.contains("privileged")),
        "{dp_flags:?}"
    );

    let bad = mesh
        .unreachable_pairs(&lab, Duration::from_secs(60))
        .unwrap();
    assert!(
        bad.is_empty(),
        "pings failed between {bad:?}\n{}",
        lab.procs().report(40)
    );

    // `status -o json` inside a gateway's dataplane container, as
    // `kubectl exec` would run it: the network and a remote gateway peer.
    let gw = &mesh.nodes[0].role;
    let status = mesh
        .exec(
            &lab,
            &format!("{gw}-dp"),
            &["l2mesh-dataplane", "status", "-o", "json"],
        )
        .unwrap();
    let status: serde_json::Value = serde_json::from_str(&status)
        .unwrap_or_else(|e| panic!("status -o json is not JSON ({e}): {status}"));
    assert_eq!(status["node"], gw.as_str(), "{status}");
    assert_eq!(status["networks"][0]["name"], "blue", "{status}");
    assert!(
        status["peers"]
            .as_array()
            .unwrap()
            .iter()
            .any(|p| p["group"] == "remote"),
        "a gateway peers with the other cluster's gateway: {status}"
    );

    // Every readiness probe of the manifests answers 200 where the kubelet
    // would ask: the broker's, the agents' (health, so standbys are Ready
    // too) and the dataplanes'.
    let topo = lab.topology();
    let plan = topo.plan();
    let mut probes = Vec::new();
    let broker_doc = workload("broker.yaml", "Deployment", "l2mesh-broker").unwrap();
    probes.push((
        topo.broker().unwrap(),
        readiness_http(&broker_doc, "broker").unwrap(),
    ));
    let agent_doc = workload("agent.yaml", "Deployment", "l2mesh-agent").unwrap();
    let dp_doc = workload("dataplane.yaml", "DaemonSet", "l2mesh-dataplane").unwrap();
    for c in &plan.clusters {
        let gw = topo.netns(&c.nodes[0].host.role).unwrap();
        probes.push((gw, readiness_http(&agent_doc, "agent").unwrap()));
        for n in &c.nodes {
            let ns = topo.netns(&n.host.role).unwrap();
            probes.push((ns, readiness_http(&dp_doc, "dataplane").unwrap()));
        }
    }
    for (ns, (path, port)) in probes {
        lab.wait_until(
            &format!("GET {path} on port {port} in {} answers 200", ns.name()),
            Duration::from_secs(20),
            || http_status(ns, SocketAddr::from(([127, 0, 0, 1], port)), &path) == Some(200),
        )
        .unwrap();
    }
    eprintln!("container mesh up and pinging in {:?}", started.elapsed());
}
