//! `l2mesh-broker migrate`: a sled store copied into etcd serves the same
//! clusters, tokens and networks (a joined cluster keeps its certificate
//! and its watch revision), and etcd copies back into sled; a store that
//! already holds records is never overwritten.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use common::etcd::EtcdCluster;
use common::{assert_quiet, start, start_on, view_until, watch};
use l2mesh_broker::client;
use l2mesh_broker::pki::AdminCredential;
use l2mesh_broker::process::BrokerProcess;
use l2mesh_proto::broker as pb;
use l2mesh_proto::join::JoinString;
use std::path::Path;
use std::process::Command;

mod common;

fn migrate(from: &str, to: &str) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_l2mesh-broker"))
        .args(["migrate", "--from", from, "--to", to])
        .output()
        .unwrap()
}

async fn summary(p: &BrokerProcess, dir: &Path) -> (Vec<String>, Vec<(String, u32)>, Vec<String>) {
    let cred = AdminCredential::load(&dir.join("admin.pem")).unwrap();
    let mut a = client::admin_client(std::slice::from_ref(&p.addr), &cred)
        .await
        .unwrap();
    let tokens = a
        .list_tokens(pb::ListTokensRequest::default())
        .await
        .unwrap()
        .into_inner()
        .tokens
        .into_iter()
        .map(|t| format!("{} {} {} {}", t.id, t.cluster, t.uses_left, t.revoked))
        .collect();
    let nets = a
        .list_networks(pb::ListNetworksRequest::default())
        .await
        .unwrap()
        .into_inner()
        .networks
        .into_iter()
        .map(|n| (n.name, n.vni))
        .collect();
    let clusters = a
        .list_clusters(pb::ListClustersRequest::default())
        .await
        .unwrap()
        .into_inner()
        .clusters
        .into_iter()
        .map(|c| c.name)
        .collect();
    (tokens, nets, clusters)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sled_migrates_into_etcd_and_back() {
    let Some(etcd) = EtcdCluster::start(3).await else {
        return;
    };
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    // One broker on sled with a joined cluster in a network.
    let p = start(dir);
    let cred = AdminCredential::load(&dir.join("admin.pem")).unwrap();
    let mut a = client::admin_client(std::slice::from_ref(&p.addr), &cred)
        .await
        .unwrap();
    a.create_network(pb::CreateNetworkRequest {
        name: "blue".into(),
        allow_all: true,
        cidr: "10.40.0.0/16".into(),
        ..Default::default()
    })
    .await
    .unwrap();
    let js = a
        .create_token(pb::CreateTokenRequest {
            cluster: "alpha".into(),
            ttl_seconds: 600,
            uses: 1,
        })
        .await
        .unwrap()
        .into_inner()
        .join_string;
    a.create_token(pb::CreateTokenRequest {
        cluster: "later".into(),
        ttl_seconds: 600,
        uses: 2,
    })
    .await
    .unwrap();
    let alpha = client::join(&JoinString::parse(&js).unwrap())
        .await
        .unwrap();
    let mut c = alpha.connect().await.unwrap();
    c.request_networks(pb::NetworkRequest {
        networks: vec!["blue".into()],
    })
    .await
    .unwrap();
    let mut w = watch(&mut c, 0).await;
    let seen = view_until(&mut w, |v| v.networks.len() == 1).await;
    let before = summary(&p, dir).await;
    drop(p); // the broker is stopped before its store is copied

    let sled = format!("sled:{}", dir.join("store").display());
    let out = migrate(&sled, &etcd.store());
    assert!(out.status.success(), "{out:?}");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("copied"), "{text}");

    // A replica on etcd serves the same state to the same certificate.
    let p = start_on(dir, &etcd.store());
    assert_eq!(summary(&p, dir).await, before);
    let mut alpha = alpha;
    alpha.brokers = vec![p.addr.clone()];
    let mut c = alpha.connect().await.unwrap();
    let mut w = watch(&mut c, seen.revision).await;
    assert_quiet(&mut w, "the migrated view was resent").await;

    // Copying into a store that holds records is refused, naming it.
    let again = migrate(&sled, &etcd.store());
    assert!(!again.status.success());
    let err = String::from_utf8_lossy(&again.stderr);
    assert!(err.contains("already holds broker records"), "{err}");

    // And back into sled, in another data dir with the same CA.
    drop(p);
    let back = tempfile::tempdir().unwrap();
    for f in ["ca.pem", "ca.key", "admin.pem"] {
        std::fs::copy(dir.join(f), back.path().join(f)).unwrap();
    }
    let out = migrate(
        &etcd.store(),
        &format!("sled:{}", back.path().join("store").display()),
    );
    assert!(out.status.success(), "{out:?}");
    let p = start(back.path());
    assert_eq!(summary(&p, back.path()).await, before);
}
