//! `l2mesh-agent uninstall` against the stateful fake API server and a real
//! broker: it refuses (changing nothing) without a live agent; with one, it
//! deletes every L2Network and returns once the agent has released each
//! (NAD gone, membership left at the broker, finalizer removed); with the
//! agent gone it names what is stuck, and `--clear-finalizers` ends it.
//! Everything it asks stays within deploy/uninstall.yaml.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use l2mesh_cluster_agent::uninstall::{self, UninstallConfig, UninstallError};
use serde_json::json;
use std::time::Duration;
use support::broker::TestBroker;
use support::fake_apiserver::FakeApi;
use support::k8s_agent::*;

fn config(timeout_secs: u64, clear_finalizers: bool) -> UninstallConfig {
    UninstallConfig {
        namespace: NS.into(),
        timeout: Duration::from_secs(timeout_secs),
        clear_finalizers,
        poll: Duration::from_millis(100),
    }
}

fn names(api: &FakeApi) -> Vec<String> {
    ["blue", "shared"]
        .into_iter()
        .filter(|n| api.get(NETS, "default", n).is_some())
        .map(str::to_owned)
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn uninstall_waits_for_the_agent_to_release_every_network() {
    init();
    let broker = TestBroker::start().await;
    broker.network("shared", &["edge"]).await;
    let api = FakeApi::new();
    seed_nodes(&api).await;
    create_net(&api, "blue", json!({"ipRange": "10.1.0.0/16"})).await;
    create_net(&api, "shared", json!({"scope": "multiCluster"})).await;

    // No agent yet: refused, nothing deleted.
    let err = uninstall::run(api.client_as("uninstall"), &config(5, false), |_| {})
        .await
        .unwrap_err();
    assert!(matches!(err, UninstallError::NoAgent { .. }), "{err}");
    assert_eq!(names(&api), ["blue", "shared"]);
    assert!(
        api.get(NETS, "default", "blue").unwrap()["metadata"]["deletionTimestamp"].is_null(),
        "a refused uninstall changes nothing"
    );

    let mut agent = Agent::start(&api, "agent-0", Some(broker.token("edge").await));
    agent.listening(Duration::from_secs(20)).await.unwrap();
    wait_for("both NADs and the shared membership", 30, || {
        (api.get(NADS, "default", "blue").is_some() && api.get(NADS, "default", "shared").is_some())
            .then_some(())
    })
    .await;
    let start = std::time::Instant::now();
    while !broker.members("shared").await.contains(&"edge".to_owned()) {
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "edge never joined shared"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    let mut lines = Vec::new();
    let summary = uninstall::run(api.client_as("uninstall"), &config(60, false), |l| {
        lines.push(l.to_owned());
    })
    .await
    .unwrap();
    assert_eq!(summary.deleted, 2);
    assert_eq!(summary.finalizers_cleared, 0, "the agent released them");
    assert!(names(&api).is_empty(), "every L2Network is gone");
    assert!(api.get(NADS, "default", "blue").is_none());
    assert!(api.get(NADS, "default", "shared").is_none());
    assert!(
        !broker.members("shared").await.contains(&"edge".to_owned()),
        "the agent left the shared network at the broker before releasing it"
    );
    assert_eq!(
        lines.first().map(String::as_str),
        Some("deleting 2 L2Network(s)")
    );
    assert_eq!(
        lines.last().map(String::as_str),
        Some("all L2Networks are gone")
    );

    support::rbac::assert_allowed_by_rbac("uninstall.yaml", &api.requests(), "uninstall ", NS);
    agent.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_the_agent_uninstall_names_what_is_stuck_and_can_clear_it() {
    init();
    let api = FakeApi::new();
    seed_nodes(&api).await;
    create_net(&api, "blue", json!({"ipRange": "10.1.0.0/16"})).await;
    let mut agent = Agent::start_with(&api, "agent-0", None, Some("10.99.0.0/24"));
    agent.listening(Duration::from_secs(20)).await.unwrap();
    wait_for("blue's finalizer", 20, || {
        api.get(NETS, "default", "blue")
            .filter(|o| o["metadata"]["finalizers"] == json!(["l2mesh.io/cleanup"]))
    })
    .await;
    // Killed: its lease still looks held, nothing will release the finalizer.
    agent.kill().await;

    let err = uninstall::run(api.client_as("uninstall"), &config(1, false), |_| {})
        .await
        .unwrap_err();
    match &err {
        UninstallError::Stuck { remaining, .. } => assert_eq!(remaining, &["default/blue"]),
        other => panic!("expected Stuck, got {other}"),
    }
    assert!(err.to_string().contains("--clear-finalizers"), "{err}");
    assert!(
        names(&api).contains(&"blue".to_owned()),
        "Terminating, not gone"
    );

    let summary = uninstall::run(api.client(), &config(10, true), |_| {})
        .await
        .unwrap();
    assert_eq!(summary.finalizers_cleared, 1);
    assert!(names(&api).is_empty());
}
