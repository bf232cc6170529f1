//! Helpers shared by the scenario test binaries.
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)]

use l2mesh_e2e::Lab;
use l2mesh_e2e::binaries::workspace_binaries;
use l2mesh_e2e::mesh::Mesh;
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
