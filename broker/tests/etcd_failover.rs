//! Agent failover between replicas: a cluster whose credential names two
//! replicas loses the one it watches (`kill -9`), reconnects to the other
//! with the same certificate (no rejoin), resumes its watch from the last
//! revision it got, and receives what changed meanwhile: revisions only go
//! up, nothing is resent, and the last view is the current one.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use common::etcd::EtcdCluster;
use common::{gateway, next_view, start_on, view_until};
use l2mesh_broker::client;
use l2mesh_broker::pki::AdminCredential;
use l2mesh_proto::broker as pb;
use l2mesh_proto::join::JoinString;
use std::time::Duration;

mod common;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cluster_fails_over_to_another_replica_and_resumes_its_watch() {
    let Some(etcd) = EtcdCluster::start(3).await else {
        return;
    };
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let mut a = start_on(dir, &etcd.store());
    let b = start_on(dir, &etcd.store());
    let cred = AdminCredential::load(&dir.join("admin.pem")).unwrap();
    let both = vec![a.addr.clone(), b.addr.clone()];
    let mut admin = client::admin_client(&both, &cred).await.unwrap();
    admin
        .create_network(pb::CreateNetworkRequest {
            name: "blue".into(),
            allow_all: true,
            cidr: "10.30.0.0/16".into(),
            ..Default::default()
        })
        .await
        .unwrap();
    let token = |cluster: &str| pb::CreateTokenRequest {
        cluster: cluster.into(),
        ttl_seconds: 600,
        uses: 1,
    };
    let mut js = JoinString::parse(
        &admin
            .create_token(token("alpha"))
            .await
            .unwrap()
            .into_inner()
            .join_string,
    )
    .unwrap();
    // The join string of a replicated broker names every replica.
    js.brokers.clone_from(&both);
    let alpha = client::join(&js).await.unwrap();
    assert_eq!(alpha.brokers, both);
    let mut c = alpha.connect().await.unwrap(); // a: first in the list
    c.request_networks(pb::NetworkRequest {
        networks: vec!["blue".into()],
    })
    .await
    .unwrap();
    let mut w = c
        .watch(pb::WatchRequest {
            last_revision: 0,
            deltas: false,
        })
        .await
        .unwrap()
        .into_inner();
    let first = view_until(&mut w, |v| v.networks.len() == 1).await;

    // a dies; meanwhile beta joins through b and becomes alpha's peer.
    a.child.kill().unwrap();
    a.child.wait().unwrap();
    let mut admin_b = client::admin_client(std::slice::from_ref(&b.addr), &cred)
        .await
        .unwrap();
    let mut js_beta = JoinString::parse(
        &admin_b
            .create_token(token("beta"))
            .await
            .unwrap()
            .into_inner()
            .join_string,
    )
    .unwrap();
    js_beta.brokers = vec![b.addr.clone()];
    let beta = client::join(&js_beta).await.unwrap();
    let mut cb = beta.connect().await.unwrap();
    cb.request_networks(pb::NetworkRequest {
        networks: vec!["blue".into()],
    })
    .await
    .unwrap();
    cb.report_gateways(pb::GatewayReport {
        gateways: vec![gateway("gw", 4, "100.64.1.4")],
    })
    .await
    .unwrap();

    // alpha's stream broke; it reconnects with its certificate (a refuses,
    // b answers) and resumes after the last revision it got.
    let broke = tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            match w.message().await {
                Ok(Some(_)) => {}
                _ => return,
            }
        }
    })
    .await;
    assert!(
        broke.is_ok(),
        "the stream from the killed replica did not end"
    );
    let mut c = alpha.connect().await.unwrap();
    let mut w = c
        .watch(pb::WatchRequest {
            last_revision: first.revision,
            deltas: false,
        })
        .await
        .unwrap()
        .into_inner();
    let mut last = first.revision;
    let current = loop {
        let v = next_view(&mut w).await;
        assert!(v.revision > last, "revision {} after {last}", v.revision);
        last = v.revision;
        if v.networks[0].peers.iter().any(|p| p.cluster == "beta") {
            break v;
        }
    };
    assert_eq!(current.networks[0].members, vec!["alpha", "beta"]);
    assert_eq!(current.cluster_name, "alpha");
    common::assert_quiet(&mut w, "a view resent after failover").await;
}
