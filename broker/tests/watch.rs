//! Watch stream tests against a real broker on 127.0.0.1, port 0.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use common::{
    TestBroker, assert_quiet, gateway, next_applied, next_view, request, view_until, watch,
    watch_deltas,
};
use l2mesh_broker::client;
use l2mesh_proto::broker as pb;
use prost::Message as _;
use std::time::Duration;
use tonic::Code;

#[tokio::test]
async fn removing_a_cluster_closes_its_live_watch_and_refuses_its_certificate() {
    let b = TestBroker::start().await;
    let (_, mut a) = b.join("alpha").await;
    let mut w = watch(&mut a, 0).await;
    next_view(&mut w).await;
    b.admin()
        .await
        .remove_cluster(pb::RemoveClusterRequest {
            name: "alpha".into(),
        })
        .await
        .unwrap();
    let end = tokio::time::timeout(Duration::from_secs(5), w.message())
        .await
        .expect("the stream must close at once");
    let err = end.unwrap_err();
    assert_eq!(err.code(), Code::Unauthenticated, "{err:?}");
    let err = a
        .report_gateways(pb::GatewayReport::default())
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::Unauthenticated);
    let err = a.watch(pb::WatchRequest::default()).await.unwrap_err();
    assert_eq!(err.code(), Code::Unauthenticated);
}

#[tokio::test]
async fn watch_resumes_and_does_not_resend_an_unchanged_view() {
    let b = TestBroker::start().await;
    let (_, mut a) = b.join("alpha").await;
    request(&mut a, &["blue"]).await;
    let mut w = watch(&mut a, 0).await;
    let first = next_view(&mut w).await;
    assert_eq!(
        first.admissions[0].state(),
        pb::AdmissionState::UnknownNetwork
    );
    drop(w);
    let mut w = watch(&mut a, first.revision).await;
    assert_quiet(&mut w, "an unchanged view must not be resent").await;
    // A change while watching arrives at once, with a newer revision.
    let info = b.network("blue", &[]).await;
    let v = next_view(&mut w).await;
    assert!(v.revision > first.revision);
    assert_eq!(v.networks[0].vni, info.vni);
    assert_eq!(v.networks[0].cluster_cidr, "10.20.0.0/24");
    // Reconnecting with an old revision gets the current view.
    let mut w2 = watch(&mut a, first.revision).await;
    assert_eq!(next_view(&mut w2).await.revision, v.revision);
    // A report that changes nothing in the view sends nothing.
    a.report_link_health(pb::LinkHealthReport::default())
        .await
        .unwrap();
    let nothing = tokio::time::timeout(Duration::from_millis(300), w.message()).await;
    assert!(nothing.is_err());
}

#[tokio::test]
async fn key_rotation_and_membership_changes_reach_peers() {
    let b = TestBroker::start().await;
    let (_, mut a) = b.join("alpha").await;
    let (_, mut c) = b.join("beta").await;
    b.network("blue", &["alpha", "beta"]).await;
    a.report_gateways(pb::GatewayReport {
        gateways: vec![gateway("gw", 1, "100.64.0.1")],
    })
    .await
    .unwrap();
    request(&mut a, &["blue"]).await;
    request(&mut c, &["blue"]).await;
    let mut w = watch(&mut c, 0).await;
    let v = view_until(&mut w, |v| {
        v.networks.first().is_some_and(|n| !n.peers.is_empty())
    })
    .await;
    assert_eq!(v.networks[0].peers[0].public_key, vec![1; 32]);
    assert_eq!(
        v.networks[0].members,
        vec!["alpha".to_string(), "beta".to_string()]
    );
    // Rotation.
    a.report_gateways(pb::GatewayReport {
        gateways: vec![gateway("gw", 2, "100.64.0.1")],
    })
    .await
    .unwrap();
    let v = next_view(&mut w).await;
    assert_eq!(v.networks[0].peers[0].public_key, vec![2; 32]);
    // alpha removed: beta's view loses it at once.
    b.admin()
        .await
        .remove_cluster(pb::RemoveClusterRequest {
            name: "alpha".into(),
        })
        .await
        .unwrap();
    let v = next_view(&mut w).await;
    assert!(v.networks[0].peers.is_empty());
    assert_eq!(v.networks[0].members, vec!["beta".to_string()]);
    // Network deleted: gone from the view, admission says unknown.
    b.admin()
        .await
        .delete_network(pb::DeleteNetworkRequest {
            name: "blue".into(),
        })
        .await
        .unwrap();
    let v = next_view(&mut w).await;
    assert!(v.networks.is_empty());
    assert_eq!(v.admissions[0].state(), pb::AdmissionState::UnknownNetwork);
}

#[tokio::test]
async fn restart_keeps_state_and_resumes_watches() {
    let tmp = tempfile::tempdir().unwrap();
    let mut b = TestBroker::start_in(tmp.path(), |_| {}).await;
    let (cred, mut a) = b.join("alpha").await;
    let j = b.token("beta", 600, 1).await;
    request(&mut a, &["blue"]).await;
    b.network("blue", &[]).await;
    let mut w = watch(&mut a, 0).await;
    let v = view_until(&mut w, |v| !v.networks.is_empty()).await;
    b.stop().await;
    // The stream ended with the graceful shutdown.
    let end = tokio::time::timeout(Duration::from_secs(5), w.message())
        .await
        .unwrap();
    assert!(!matches!(end, Ok(Some(_))));

    let mut b = TestBroker::start_in(tmp.path(), |_| {}).await;
    let mut cred = cred;
    cred.brokers = vec![b.addr.clone()];
    let mut a = cred.connect().await.unwrap();
    let mut w = watch(&mut a, v.revision).await;
    assert_quiet(&mut w, "same view after restart must not be resent").await;
    let mut j = j;
    j.brokers = vec![b.addr.clone()];
    client::join(&j).await.unwrap();
    b.stop().await;
}

#[tokio::test]
async fn a_rejoin_replaces_the_certificate_and_closes_the_old_stream() {
    let b = TestBroker::start().await;
    let (old, mut a) = b.join("alpha").await;
    a.report_gateways(pb::GatewayReport {
        gateways: vec![gateway("gw", 1, "100.64.0.1")],
    })
    .await
    .unwrap();
    let mut w = watch(&mut a, 0).await;
    let first = next_view(&mut w).await;
    // The cluster lost its key and joins again with a new token.
    let new = client::join(&b.token("alpha", 600, 1).await).await.unwrap();
    assert_eq!(new.tunnel_subnet, old.tunnel_subnet, "the subnet stays");
    let end = tokio::time::timeout(Duration::from_secs(5), w.message())
        .await
        .expect("the old stream must close at once");
    assert_eq!(end.unwrap_err().code(), Code::Unauthenticated);
    let err = a
        .report_gateways(pb::GatewayReport::default())
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::Unauthenticated);
    // The new certificate sees the same data, and the same view revision.
    let mut c = new.connect().await.unwrap();
    let mut w = watch(&mut c, first.revision).await;
    let nothing = tokio::time::timeout(Duration::from_millis(300), w.message()).await;
    assert!(nothing.is_err(), "{nothing:?}");
    let list = b
        .admin()
        .await
        .list_clusters(pb::ListClustersRequest::default())
        .await
        .unwrap()
        .into_inner();
    assert_eq!(list.clusters[0].gateways.len(), 1);
}

#[tokio::test]
async fn watch_streams_per_cluster_are_limited() {
    let b = TestBroker::start().await;
    let (_, mut a) = b.join("alpha").await;
    let mut open = Vec::new();
    for _ in 0..8 {
        let mut w = watch(&mut a, 0).await;
        next_view(&mut w).await;
        open.push(w);
    }
    let err = a.watch(pb::WatchRequest::default()).await.unwrap_err();
    assert_eq!(err.code(), Code::ResourceExhausted);
    open.pop();
    // The slot frees up once the server notices the stream is gone.
    let mut ok = false;
    for _ in 0..50 {
        if a.watch(pb::WatchRequest::default()).await.is_ok() {
            ok = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(ok, "a closed stream must free its slot");
}

/// A fresh snapshot of `c`'s view, from a new stream.
async fn snapshot(
    c: &mut l2mesh_proto::broker::broker_client::BrokerClient<tonic::transport::Channel>,
) -> pb::ClusterView {
    let mut w = watch(c, 0).await;
    next_view(&mut w).await
}

#[tokio::test]
async fn a_delta_watch_gets_small_deltas_that_rebuild_the_snapshot() {
    let b = TestBroker::start().await;
    let (_, mut a) = b.join("alpha").await;
    let (_, mut c) = b.join("beta").await;
    b.network("blue", &[]).await;
    request(&mut a, &["blue"]).await;
    request(&mut c, &["blue"]).await;
    c.report_gateways(pb::GatewayReport {
        gateways: vec![gateway("gw", 1, "100.64.1.1")],
    })
    .await
    .unwrap();
    let mut held = None;
    let mut w = watch_deltas(&mut a, 0).await;
    let first = next_applied(&mut w, &mut held).await;
    assert!(first.delta.is_none(), "the first message is a snapshot");
    // Key rotation at beta: alpha gets only beta's new entry.
    c.report_gateways(pb::GatewayReport {
        gateways: vec![gateway("gw", 2, "100.64.1.1")],
    })
    .await
    .unwrap();
    let msg = next_applied(&mut w, &mut held).await;
    let delta = msg.delta.as_ref().expect("a delta");
    assert_eq!(delta.base_revision, first.revision);
    assert_eq!(delta.changed_networks[0].members[0].cluster, "beta");
    assert!(msg.encoded_len() < 300, "{} bytes", msg.encoded_len());
    assert_eq!(held.as_ref(), Some(&snapshot(&mut a).await));
    // An admission-only change of alpha: only the admission travels.
    request(&mut a, &["blue", "nosuch"]).await;
    let msg = next_applied(&mut w, &mut held).await;
    let delta = msg.delta.as_ref().expect("a delta");
    assert!(delta.changed_networks.is_empty() && delta.upserted_networks.is_empty());
    assert_eq!(delta.admissions.len(), 1);
    assert_eq!(delta.admissions[0].network, "nosuch");
    assert_eq!(held.as_ref(), Some(&snapshot(&mut a).await));
    // beta leaves: alpha sees it go.
    request(&mut c, &[]).await;
    next_applied(&mut w, &mut held).await;
    let now = held.clone().unwrap();
    assert_eq!(now.networks[0].members, vec!["alpha".to_string()]);
    assert!(now.networks[0].peers.is_empty());
    assert_eq!(Some(now), Some(snapshot(&mut a).await));
}

#[tokio::test]
async fn a_resumed_delta_watch_gets_what_it_missed_in_one_delta() {
    let b = TestBroker::start().await;
    let (_, mut a) = b.join("alpha").await;
    let (_, mut c) = b.join("beta").await;
    b.network("blue", &[]).await;
    request(&mut a, &["blue"]).await;
    request(&mut c, &["blue"]).await;
    let mut held = None;
    let mut w = watch_deltas(&mut a, 0).await;
    next_applied(&mut w, &mut held).await;
    drop(w);
    let at = held.as_ref().unwrap().revision;
    for key in [3, 4, 5] {
        c.report_gateways(pb::GatewayReport {
            gateways: vec![gateway("gw", key, "100.64.1.1")],
        })
        .await
        .unwrap();
    }
    let mut w = watch_deltas(&mut a, at).await;
    let msg = next_applied(&mut w, &mut held).await;
    assert_eq!(msg.delta.as_ref().map(|d| d.base_revision), Some(at));
    assert_eq!(
        held.as_ref().unwrap().networks[0].peers[0].public_key,
        vec![5; 32]
    );
    assert_eq!(held.as_ref(), Some(&snapshot(&mut a).await));
    assert_quiet(&mut w, "caught up: nothing more to send").await;
}

#[tokio::test]
async fn a_revision_from_the_future_gets_a_snapshot_with_the_current_revision() {
    let b = TestBroker::start().await;
    let (_, mut a) = b.join("alpha").await;
    request(&mut a, &["blue"]).await;
    let current = snapshot(&mut a).await;
    let mut w = watch_deltas(&mut a, current.revision + 1000).await;
    let msg = next_view(&mut w).await;
    assert!(msg.delta.is_none(), "a snapshot, not a delta");
    assert_eq!(
        msg.revision, current.revision,
        "lower than asked: replace everything"
    );
    assert_eq!(msg, current);
}
