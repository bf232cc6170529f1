//! A broker that cannot take a report now (its etcd lost quorum: UNAVAILABLE)
//! does not cost the agent its session: the view stays, and the report is
//! sent again until the broker takes it, on the same watch stream.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use support::standalone_agent::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unavailable_broker_gets_the_report_again_on_the_same_session() {
    let (join, seen) = start_broker("good-secret").await;
    seen.lock().unwrap().unavailable_reports = 2;
    let dir = tempfile::tempdir().unwrap();
    let manifests = dir.path().join("manifests");
    let state = dir.path().join("state");
    std::fs::create_dir_all(&manifests).unwrap();
    std::fs::write(manifests.join("nodes.yaml"), NODES).unwrap();
    std::fs::write(manifests.join("networks.yaml"), NETS).unwrap();

    let _agent = spawn_agent(&manifests, &state, Some(&join));
    let mut gw = node_client(&state, None).await;
    let _gw_watch = gw.watch_desired(hello("gw", 1)).await.unwrap().into_inner();

    wait_for("the broker to take a gateway report", || {
        let s = seen.lock().unwrap();
        (!s.gateways.is_empty()).then_some(())
    })
    .await;
    let s = seen.lock().unwrap();
    assert_eq!(s.unavailable_reports, 0, "both refusals were met");
    assert_eq!(s.joins, 1);
    assert_eq!(
        s.watches, 1,
        "the agent kept its session: one watch stream throughout"
    );
}
