//! Helpers shared by the scenario test binaries.
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)]

use std::net::IpAddr;
use std::time::Duration;

use l2mesh_e2e::Lab;
use l2mesh_e2e::binaries::workspace_binaries;
use l2mesh_e2e::mesh::{Mesh, PodInfo};
use l2mesh_e2e::ping::BackgroundPing;
use l2mesh_e2e::plan::TopologySpec;

pub fn failed(results: &[(String, String, bool)]) -> Vec<String> {
    results
        .iter()
        .filter(|r| !r.2)
        .map(|(a, b, _)| format!("{a} -> {b}"))
        .collect()
}

pub fn mesh_lab(spec: TopologySpec) -> (Lab, Mesh) {
    let bins = workspace_binaries().unwrap_or_else(|e| panic!("{e}"));
    let lab = Lab::build(spec).unwrap();
    let mesh = Mesh::start(&lab, bins, &mut |_| {}).unwrap_or_else(|e| panic!("{e}"));
    (lab, mesh)
}

/// Starts the mesh and waits until every pod reaches every other over IPv4.
pub fn converged_mesh(spec: TopologySpec) -> (Lab, Mesh) {
    let (lab, mesh) = mesh_lab(spec);
    assert_all_reach(&lab, &mesh, false);
    (lab, mesh)
}

/// Every pod pings every other (IPv6 if `v6`) within 20 s, or the test
/// fails with the pairs that did not and the processes' recent logs.
pub fn assert_all_reach(lab: &Lab, mesh: &Mesh, v6: bool) {
    let results = mesh.ping_matrix(lab, v6, Duration::from_secs(20)).unwrap();
    let bad = failed(&results);
    let family = if v6 { "IPv6" } else { "IPv4" };
    assert!(
        bad.is_empty(),
        "{family} pings failed: {bad:?}\n{}",
        lab.procs().report(30)
    );
}

/// The pod with this role ("c1-n1-p1"); panics if the mesh has none.
pub fn pod<'a>(mesh: &'a Mesh, role: &str) -> &'a PodInfo {
    mesh.pods
        .iter()
        .find(|p| p.role == role)
        .unwrap_or_else(|| panic!("no pod {role} in the mesh"))
}

/// A ping every `interval` from one pod to another's IPv4 address.
pub fn ping_between(
    lab: &Lab,
    mesh: &Mesh,
    name: &str,
    from: &str,
    to: &str,
    interval: Duration,
) -> BackgroundPing {
    BackgroundPing::start(
        lab.procs(),
        name,
        lab.topology().netns(&pod(mesh, from).role).unwrap(),
        IpAddr::V4(pod(mesh, to).v4),
        interval,
    )
    .unwrap()
}

pub fn two_clusters() -> TopologySpec {
    TopologySpec {
        clusters: 2,
        nodes_per_cluster: 2,
        pods_per_node: 1,
    }
}

/// Lines of `network list` / `cluster list` output, minus the header.
pub fn rows(out: &str) -> Vec<String> {
    out.lines().skip(1).map(str::to_owned).collect()
}

/// Rewrites one field of a join string (`l2mesh1.` + base64url JSON).
pub fn forge(join: &str, field: &str, value: &str) -> String {
    use base64::Engine as _;
    use base64::engine::general_purpose::URL_SAFE_NO_PAD;
    let body = join.trim().strip_prefix("l2mesh1.").expect("a join string");
    let mut json: serde_json::Value =
        serde_json::from_slice(&URL_SAFE_NO_PAD.decode(body).unwrap()).unwrap();
    json[field] = serde_json::Value::String(value.to_owned());
    format!("l2mesh1.{}", URL_SAFE_NO_PAD.encode(json.to_string()))
}
