//! The agent renews its cluster certificate before it expires, with the
//! current one (no token), and keeps its broker session: the real agent
//! binary (standalone mode) against the real broker in-process, loopback.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use l2mesh_proto::broker as pb;
use std::time::{Duration, Instant};
use support::broker::TestBroker;
use support::standalone_agent::{NODES, spawn_agent, status_file, wait_for};

const NETWORKS: &str = "apiVersion: l2mesh.io/v1alpha1\nkind: L2Network\nmetadata: {name: shared}\nspec: {scope: multiCluster}\n";

fn cert_of(state: &std::path::Path) -> Option<String> {
    let text = std::fs::read_to_string(state.join("identity.json")).ok()?;
    let v: serde_json::Value = serde_json::from_str(&text).ok()?;
    v["cert_pem"].as_str().map(str::to_owned)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_agent_renews_its_certificate_before_it_expires() {
    let lifetime = Duration::from_secs(12);
    let broker = TestBroker::start_with(|c| c.cluster_cert_lifetime = lifetime).await;
    broker.network("shared", &["edge"]).await;
    let join = broker.token("edge").await.encode();
    let dir = tempfile::tempdir().unwrap();
    let manifests = dir.path().join("manifests");
    let state = dir.path().join("state");
    std::fs::create_dir_all(&manifests).unwrap();
    std::fs::write(manifests.join("nodes.yaml"), NODES).unwrap();
    std::fs::write(manifests.join("networks.yaml"), NETWORKS).unwrap();
    let _agent = spawn_agent(&manifests, &state, Some(&join));
    let status = |needle: &str| {
        std::fs::read_to_string(status_file(&state, "shared"))
            .ok()
            .filter(|s| s.contains(needle))
    };
    wait_for("shared admitted", || status("reason: Admitted")).await;
    let first = cert_of(&state).expect("identity stored after the join");
    let joined = Instant::now();
    // Renewed two thirds into the lifetime, well before it ends.
    let deadline = joined + lifetime;
    loop {
        if cert_of(&state).is_some_and(|c| c != first) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the certificate was not renewed before it expired"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    // Past the first certificate's end the session still works: a change at
    // the broker reaches the agent.
    tokio::time::sleep_until((joined + lifetime + Duration::from_secs(1)).into()).await;
    broker
        .admin()
        .await
        .delete_network(pb::DeleteNetworkRequest {
            name: "shared".into(),
        })
        .await
        .unwrap();
    wait_for("the deletion seen with the renewed certificate", || {
        status("reason: UnknownNetwork")
    })
    .await;
}
