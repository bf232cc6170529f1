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
use l2mesh_e2e::{Lab, Netns};

fn tools() -> Vec<&'static str> {
    let mut t = vec!["ip", "ping", "promtool"];
    t.extend(CONTAINER_TOOLS);
    t
}

/// Whether `test` can run: the tools, root and runc; otherwise skipped, or
/// under CI a failure that names what is missing.
fn can_run(test: &str) -> bool {
    use l2mesh_e2e::preflight::{Decision, decide, in_ci, missing};
    let mut reasons = missing(&tools());
    if !Path::new(RUNTIME).exists() {
        reasons.push(format!(
            "{RUNTIME} is missing: podman runs the containers with runc here, crun fails on hybrid cgroups (apt-get install runc)"
        ));
    }
    match decide(test, &reasons, in_ci()) {
        Decision::Run => true,
        Decision::Skip(why) => {
            eprintln!("{why}");
            false
        }
        Decision::Fail(why) => panic!("{why}"),
    }
}

/// The image of this test process, or a panic naming the part that failed.
fn image() -> &'static BuiltImage {
    containers::shared_image(Path::new(env!("CARGO_TARGET_TMPDIR")))
        .unwrap_or_else(|e| panic!("building the image failed: {e}"))
}

/// `GET path` over plain HTTP/1.0 from inside `ns` (as the kubelet's probe
/// or a scraper connects), with an optional `Accept`; the raw response.
fn http_get(ns: &Netns, addr: SocketAddr, path: &str, accept: Option<&str>) -> Option<String> {
    let accept = accept
        .map(|a| format!("Accept: {a}\\r\\n"))
        .unwrap_or_default();
    let out = ns
        .exec(
            "bash",
            [
                "-c",
                &format!(
                    "exec 3<>/dev/tcp/{}/{} && printf 'GET {path} HTTP/1.0\\r\\n{accept}\\r\\n' >&3 && cat <&3",
                    addr.ip(),
                    addr.port()
                ),
            ],
        )
        .ok()?;
    out.status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).into_owned())
}

/// The status code of `GET path`.
fn http_status(ns: &Netns, addr: SocketAddr, path: &str) -> Option<u16> {
    http_get(ns, addr, path, None)?
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()
}

/// `(content type, body)` of a response.
fn split_response(resp: &str) -> (String, String) {
    let (head, body) = resp.split_once("\r\n\r\n").unwrap_or((resp, ""));
    let kind = head
        .lines()
        .find_map(|l| {
            let (k, v) = l.split_once(':')?;
            k.eq_ignore_ascii_case("content-type")
                .then(|| v.trim().to_owned())
        })
        .unwrap_or_default();
    (kind, body.to_owned())
}

/// `promtool check metrics` on a body; its complaints, if any.
fn promtool_check(body: &str) -> Result<(), String> {
    use std::io::Write as _;
    let mut child = std::process::Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .map_err(|e| format!("promtool: {e}"))?;
    child
        .stdin
        .take()
        .unwrap()
        .write_all(body.as_bytes())
        .map_err(|e| e.to_string())?;
    let out = child.wait_with_output().map_err(|e| e.to_string())?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ))
    }
}

#[test]
fn containers_image_static_cni_and_privileges() {
    if !can_run("containers_image_static_cni_and_privileges") {
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
    let license = std::fs::read_to_string(image.file("/usr/share/doc/l2mesh/LICENSE")).unwrap();
    assert!(
        license.contains("Apache License"),
        "the image ships the license"
    );
    eprintln!("image built in {:?} ({})", image.took, image.profile);
}

#[test]
fn containers_pods_ping_across_clusters_with_the_manifests_privileges() {
    if !can_run("containers_pods_ping_across_clusters_with_the_manifests_privileges") {
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
    // /metrics of all three: Prometheus text unless OpenMetrics is asked
    // for, accepted by promtool, with process metrics and the build info.
    let gw_ns = topo.netns(&plan.clusters[0].nodes[0].host.role).unwrap();
    let endpoints = [
        ("broker", topo.broker().unwrap(), 9443),
        ("agent", gw_ns, 9444),
        (
            "dataplane",
            gw_ns,
            readiness_http(&dp_doc, "dataplane").unwrap().1,
        ),
    ];
    for (what, ns, port) in endpoints {
        let addr = SocketAddr::from(([127, 0, 0, 1], port));
        let (kind, body) = split_response(&http_get(ns, addr, "/metrics", None).unwrap());
        assert!(
            kind.starts_with("text/plain; version=0.0.4"),
            "{what}: {kind}"
        );
        assert!(!body.contains("# EOF"), "{what}: {body}");
        assert!(
            body.contains("process_resident_memory_bytes "),
            "{what}: {body}"
        );
        assert!(
            body.contains("l2mesh_build_info{version="),
            "{what}: {body}"
        );
        if let Err(e) = promtool_check(&body) {
            panic!("{what}: promtool check metrics: {e}\n{body}");
        }
        let om = http_get(
            ns,
            addr,
            "/metrics",
            Some("application/openmetrics-text; version=1.0.0"),
        );
        let (kind, body) = split_response(&om.unwrap());
        assert!(
            kind.starts_with("application/openmetrics-text"),
            "{what}: {kind}"
        );
        assert!(body.ends_with("# EOF\n"), "{what}: {body}");
    }
    eprintln!("container mesh up and pinging in {:?}", started.elapsed());
}
