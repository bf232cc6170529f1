//! The broker removes this cluster: the real agent binary (standalone mode)
//! against the real broker in-process. Multi-cluster networks say so in
//! their Admitted condition; local networks are untouched. Loopback, port 0.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use l2mesh_proto::broker as pb;
use support::broker::TestBroker;
use support::standalone_agent::{NODES, spawn_agent, status_file, wait_for};

const NETWORKS: &str = "apiVersion: l2mesh.io/v1alpha1\nkind: L2Network\nmetadata: {name: blue}\nspec: {ipRange: 10.1.0.0/16}\n---\napiVersion: l2mesh.io/v1alpha1\nkind: L2Network\nmetadata: {name: shared}\nspec: {scope: multiCluster}\n";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cluster_the_broker_removed_says_so_in_admitted() {
    let broker = TestBroker::start().await;
    broker.network("shared", &["edge"]).await;
    let join = broker.token("edge").await.encode();
    let dir = tempfile::tempdir().unwrap();
    let manifests = dir.path().join("manifests");
    let state = dir.path().join("state");
    std::fs::create_dir_all(&manifests).unwrap();
    std::fs::write(manifests.join("nodes.yaml"), NODES).unwrap();
    std::fs::write(manifests.join("networks.yaml"), NETWORKS).unwrap();
    let _agent = spawn_agent(&manifests, &state, Some(&join));
    let status = |name: &str, needle: &str| {
        std::fs::read_to_string(status_file(&state, name))
            .ok()
            .filter(|s| s.contains(needle))
    };
    wait_for("shared admitted by the broker", || {
        status("shared", "reason: Admitted")
    })
    .await;

    broker
        .admin()
        .await
        .remove_cluster(pb::RemoveClusterRequest {
            name: "edge".into(),
        })
        .await
        .unwrap();
    let shared = wait_for("shared showing the refusal", || {
        status("shared", "reason: ClusterRefused")
    })
    .await;
    assert!(
        shared.contains("new join string"),
        "the condition says what to do:\n{shared}"
    );
    let blue = status("blue", "reason: LocalScope").expect("blue keeps its status");
    assert!(!blue.contains("ClusterRefused"), "{blue}");
}
