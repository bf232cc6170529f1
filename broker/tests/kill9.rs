//! Durability: everything the real broker binary acknowledged survives
//! `kill -9` and a restart.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use common::{assert_quiet, start, watch};
use l2mesh_broker::client;
use l2mesh_broker::pki::AdminCredential;
use l2mesh_broker::process::BrokerProcess;
use l2mesh_proto::broker as pb;
use l2mesh_proto::join::JoinString;
use std::path::Path;
use std::time::Duration;

mod common;

async fn admin(
    p: &BrokerProcess,
    dir: &Path,
) -> pb::broker_admin_client::BrokerAdminClient<tonic::transport::Channel> {
    let cred = AdminCredential::load(&dir.join("admin.pem")).unwrap();
    client::admin_client(std::slice::from_ref(&p.addr), &cred)
        .await
        .unwrap()
}

#[tokio::test]
async fn acknowledged_state_survives_kill_9() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let mut p = start(dir);
    let mut a = admin(&p, dir).await;
    let t1 = a
        .create_token(pb::CreateTokenRequest {
            cluster: "alpha".into(),
            ttl_seconds: 600,
            uses: 1,
        })
        .await
        .unwrap()
        .into_inner();
    let t2 = a
        .create_token(pb::CreateTokenRequest {
            cluster: "beta".into(),
            ttl_seconds: 600,
            uses: 1,
        })
        .await
        .unwrap()
        .into_inner();
    let blue = a
        .create_network(pb::CreateNetworkRequest {
            name: "blue".into(),
            allow_all: true,
            cidr: "10.9.0.0/16".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let j1 = JoinString::parse(&t1.join_string).unwrap();
    let cred = client::join(&j1).await.unwrap();
    let mut c = cred.connect().await.unwrap();
    c.request_networks(pb::NetworkRequest {
        networks: vec!["blue".into()],
    })
    .await
    .unwrap();
    c.report_gateways(pb::GatewayReport {
        gateways: vec![pb::Gateway {
            node: "gw".into(),
            public_key: vec![5; 32],
            endpoints: vec!["192.0.2.1:51820".into()],
            tunnel_ip: "100.64.0.1".into(),
        }],
    })
    .await
    .unwrap();
    let mut w = watch(&mut c, 0).await;
    let view = tokio::time::timeout(Duration::from_secs(5), w.message())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert_eq!(view.networks.len(), 1);
    a.revoke_token(pb::RevokeTokenRequest {
        id: t2.token.clone().unwrap().id,
    })
    .await
    .unwrap();
    // A burst of acknowledged writes right before the kill.
    for i in 0..20 {
        a.create_network(pb::CreateNetworkRequest {
            name: format!("n{i}"),
            allow_all: true,
            ..Default::default()
        })
        .await
        .unwrap();
    }
    p.child.kill().unwrap(); // SIGKILL
    p.child.wait().unwrap();
    drop(p);

    let p = start(dir);
    let mut a = admin(&p, dir).await;
    let tokens = a
        .list_tokens(pb::ListTokensRequest::default())
        .await
        .unwrap()
        .into_inner()
        .tokens;
    let tok1 = tokens.iter().find(|t| t.cluster == "alpha").unwrap();
    assert_eq!(tok1.uses_left, 0, "a consumed token stays consumed");
    assert!(tokens.iter().find(|t| t.cluster == "beta").unwrap().revoked);
    let nets = a
        .list_networks(pb::ListNetworksRequest::default())
        .await
        .unwrap()
        .into_inner()
        .networks;
    assert_eq!(nets.len(), 21);
    let b2 = nets.iter().find(|n| n.name == "blue").unwrap();
    assert_eq!(b2.vni, blue.vni);
    assert_eq!(b2.members, vec!["alpha".to_string()]);
    let clusters = a
        .list_clusters(pb::ListClustersRequest::default())
        .await
        .unwrap()
        .into_inner()
        .clusters;
    assert_eq!(clusters.len(), 1);
    assert_eq!(clusters[0].gateways[0].public_key, vec![5; 32]);

    // The used token cannot join again; the revoked one neither.
    let mut j1 = j1;
    j1.brokers = vec![p.addr.clone()];
    let err = tonic::Status::from(client::join(&j1).await.unwrap_err());
    assert!(err.message().contains("no uses left"), "{err:?}");
    let mut j2 = JoinString::parse(&t2.join_string).unwrap();
    j2.brokers = vec![p.addr.clone()];
    let err = tonic::Status::from(client::join(&j2).await.unwrap_err());
    assert!(err.message().contains("revoked"), "{err:?}");

    // alpha's certificate still works, and its watch resumes without a resend.
    let mut cred = cred;
    cred.brokers = vec![p.addr.clone()];
    let mut c = cred.connect().await.unwrap();
    let mut w = watch(&mut c, view.revision).await;
    assert_quiet(&mut w, "unchanged view resent after restart").await;
}
