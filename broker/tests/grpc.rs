//! gRPC tests against a real broker on 127.0.0.1, port 0.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use common::{TestBroker, gateway, next_view, request, watch};
use l2mesh_broker::client::{self, tls_config};
use l2mesh_proto::broker as pb;
use l2mesh_proto::broker::broker_client::BrokerClient;
use l2mesh_proto::join::JoinString;
use std::time::Duration;
use tonic::Code;

async fn try_join(j: &JoinString) -> Result<client::ClusterCredential, tonic::Status> {
    client::join(j).await.map_err(tonic::Status::from)
}

#[tokio::test]
async fn valid_join_gives_a_working_certificate_and_consumes_the_token() {
    let b = TestBroker::start().await;
    let j = b.token("edge-1", 600, 1).await;
    let cred = client::join(&j).await.unwrap();
    assert_eq!(cred.cluster, "edge-1");
    assert_eq!(cred.tunnel_subnet, "100.64.0.0/24");
    // Saved and loaded again, the credential still works.
    let saved = b.dir.join("edge-1.json");
    cred.save(&saved).unwrap();
    let cred = client::ClusterCredential::load(&saved).unwrap();
    let mut c = cred.connect().await.unwrap();
    c.report_gateways(pb::GatewayReport {
        gateways: vec![gateway("gw-1", 1, "100.64.0.1")],
    })
    .await
    .unwrap();
    let tokens = b
        .admin()
        .await
        .list_tokens(pb::ListTokensRequest::default())
        .await
        .unwrap()
        .into_inner();
    assert_eq!(tokens.tokens[0].uses_left, 0);
    let clusters = b
        .admin()
        .await
        .list_clusters(pb::ListClustersRequest::default())
        .await
        .unwrap()
        .into_inner();
    assert_eq!(clusters.clusters.len(), 1);
    assert_eq!(clusters.clusters[0].gateways[0].node, "gw-1");
    assert!(clusters.clusters[0].last_seen_unix > 0);
    // The join string never reaches the token list.
    assert!(!format!("{tokens:?}").contains(&j.secret));
}

#[tokio::test]
async fn every_bad_token_case_is_refused_and_changes_nothing() {
    let b = TestBroker::start().await;
    let good = b.token("edge-1", 600, 1).await;
    let short = b.token("edge-1", 1, 1).await;
    let revoked = b.token("edge-1", 600, 1).await;
    b.admin()
        .await
        .revoke_token(pb::RevokeTokenRequest {
            id: revoked.id.clone(),
        })
        .await
        .unwrap();
    let used = b.token("edge-2", 600, 1).await;
    client::join(&used).await.unwrap();
    tokio::time::sleep(Duration::from_millis(2100)).await;
    let before = b
        .admin()
        .await
        .list_tokens(pb::ListTokensRequest::default())
        .await
        .unwrap()
        .into_inner();

    let mut unknown = good.clone();
    unknown.id = "tok-000000000000".into();
    let mut wrong_secret = good.clone();
    wrong_secret.secret = "not-the-secret".into();
    let mut wrong_cluster = good.clone();
    wrong_cluster.cluster = "edge-9".into();
    let cases = [
        (
            unknown.clone(),
            Code::Unauthenticated,
            "unknown or its secret",
        ),
        (
            wrong_secret.clone(),
            Code::Unauthenticated,
            "unknown or its secret",
        ),
        (revoked, Code::Unauthenticated, "revoked"),
        (short, Code::Unauthenticated, "expired"),
        (used, Code::Unauthenticated, "no uses left"),
        (wrong_cluster, Code::PermissionDenied, "is for cluster"),
    ];
    for (j, code, text) in cases {
        let err = try_join(&j).await.unwrap_err();
        assert_eq!(err.code(), code, "{text}: {err:?}");
        assert!(err.message().contains(text), "{text}: {}", err.message());
        assert!(!err.message().contains(&j.secret));
    }
    // Unknown id and wrong secret read the same: no oracle for token ids.
    let a = try_join(&unknown).await.unwrap_err();
    let w = try_join(&wrong_secret).await.unwrap_err();
    assert_eq!(
        a.message().replace(&unknown.id, "ID"),
        w.message().replace(&wrong_secret.id, "ID")
    );
    // A bad CSR with a good token.
    let mut c = BrokerClient::new(
        client::connect(
            &good.brokers,
            tls_config(good.ca_pin_sha256().unwrap(), None).unwrap(),
        )
        .await
        .unwrap(),
    );
    let err = c
        .join(pb::JoinRequest {
            token_id: good.id.clone(),
            token_secret: good.secret.clone(),
            cluster_name: good.cluster.clone(),
            csr_pem:
                "-----BEGIN CERTIFICATE REQUEST-----\nAAAA\n-----END CERTIFICATE REQUEST-----\n"
                    .into(),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument, "{err:?}");

    let after = b
        .admin()
        .await
        .list_tokens(pb::ListTokensRequest::default())
        .await
        .unwrap()
        .into_inner();
    assert_eq!(before, after, "a refused join must change nothing");
    let clusters = b
        .admin()
        .await
        .list_clusters(pb::ListClustersRequest::default())
        .await
        .unwrap()
        .into_inner();
    assert_eq!(clusters.clusters.len(), 1, "only edge-2 joined");
    // The good token still works after all that.
    client::join(&good).await.unwrap();
}

#[tokio::test]
async fn failed_joins_are_rate_limited_but_a_valid_token_gets_through() {
    let b = TestBroker::start_with(|c| c.join_failures_per_minute = 10).await;
    let good = b.token("edge-1", 600, 1).await;
    let other = b.token("edge-2", 600, 1).await;
    let mut bad = good.clone();
    bad.secret = "wrong".into();
    // Eleven failures from this address (one client behind the same NAT).
    for _ in 0..10 {
        assert_eq!(
            try_join(&bad).await.unwrap_err().code(),
            Code::Unauthenticated
        );
    }
    let err = try_join(&bad).await.unwrap_err();
    assert_eq!(err.code(), Code::ResourceExhausted, "{err:?}");
    assert!(err.message().contains("retry in"), "{err:?}");
    // Every valid token from the same address still joins at once.
    client::join(&other).await.unwrap();
    client::join(&good).await.unwrap();
    // And a made-up token is still refused as rate limited.
    let mut guess = other.clone();
    guess.id = "tok-guess".into();
    assert_eq!(
        try_join(&guess).await.unwrap_err().code(),
        Code::ResourceExhausted
    );
}

#[tokio::test]
async fn a_wrong_ca_pin_is_refused_before_sending_the_secret() {
    let b = TestBroker::start().await;
    let mut j = b.token("edge-1", 600, 1).await;
    j.ca = JoinString::format_pin(&[7; 32]);
    let err = client::join(&j).await.unwrap_err().to_string();
    assert!(
        err.contains("does not match the pin in the join string"),
        "{err}"
    );
    let tokens = b
        .admin()
        .await
        .list_tokens(pb::ListTokensRequest::default())
        .await
        .unwrap()
        .into_inner();
    assert_eq!(tokens.tokens[0].uses_left, 1);
}

#[tokio::test]
async fn client_certificates_from_a_foreign_ca_are_refused() {
    let b = TestBroker::start().await;
    let other = TestBroker::start().await;
    // The other broker's admin credential, pinned to the first broker's CA.
    let foreign = other.admin_credential();
    let mine = b.admin_credential();
    let identity = (
        vec![rustls::pki_types::CertificateDer::from(
            foreign.cert.clone(),
        )],
        foreign.key.clone_key(),
    );
    let pin = l2mesh_broker::state::sha256(&mine.ca);
    let result = async {
        let ch = client::connect(
            std::slice::from_ref(&b.addr),
            tls_config(pin, Some(identity))?,
        )
        .await?;
        pb::broker_admin_client::BrokerAdminClient::new(ch)
            .list_tokens(pb::ListTokensRequest::default())
            .await?;
        Ok::<_, l2mesh_broker::Error>(())
    }
    .await;
    assert!(
        result.is_err(),
        "a foreign CA's certificate must not be accepted"
    );
    // A cluster certificate of the other broker: same.
    let (cred, _) = other.join("edge-1").await;
    let mut cred = cred;
    cred.brokers = vec![b.addr.clone()];
    cred.ca_pem = std::fs::read_to_string(b.dir.join("ca.pem")).unwrap();
    let result = async {
        cred.connect()
            .await?
            .report_gateways(pb::GatewayReport::default())
            .await?;
        Ok::<_, l2mesh_broker::Error>(())
    }
    .await;
    assert!(result.is_err());
}

#[tokio::test]
async fn calls_need_the_right_kind_of_certificate() {
    let b = TestBroker::start().await;
    let j = b.token("edge-1", 600, 1).await;
    // No client certificate: only Join works.
    let ch = client::connect(
        &j.brokers,
        tls_config(j.ca_pin_sha256().unwrap(), None).unwrap(),
    )
    .await
    .unwrap();
    let err = BrokerClient::new(ch.clone())
        .report_gateways(pb::GatewayReport::default())
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::Unauthenticated);
    let err = pb::broker_admin_client::BrokerAdminClient::new(ch)
        .list_clusters(pb::ListClustersRequest::default())
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::Unauthenticated);
    // A cluster certificate cannot call admin APIs.
    let cred = client::join(&j).await.unwrap();
    let ch = client::connect(&cred.brokers, cred.tls_config().unwrap())
        .await
        .unwrap();
    let err = pb::broker_admin_client::BrokerAdminClient::new(ch)
        .create_token(pb::CreateTokenRequest {
            cluster: "edge-1".into(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied);
    // The admin certificate cannot act as a cluster.
    let admin = b.admin_credential();
    let identity = (
        vec![rustls::pki_types::CertificateDer::from(admin.cert.clone())],
        admin.key.clone_key(),
    );
    let ch = client::connect(
        std::slice::from_ref(&b.addr),
        tls_config(l2mesh_broker::state::sha256(&admin.ca), Some(identity)).unwrap(),
    )
    .await
    .unwrap();
    let err = BrokerClient::new(ch)
        .watch(pb::WatchRequest::default())
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied);
}

#[tokio::test]
async fn a_cluster_cannot_read_or_write_what_is_not_its_own() {
    let b = TestBroker::start().await;
    let (_, mut a) = b.join("alpha").await;
    let (_, mut c) = b.join("gamma").await;
    b.network("blue", &["alpha"]).await;
    b.network("secret", &["gamma"]).await;
    c.report_gateways(pb::GatewayReport {
        gateways: vec![gateway("gw", 3, "100.64.1.1")],
    })
    .await
    .unwrap();
    request(&mut c, &["secret"]).await;
    // alpha asks for gamma's network: answered as for a network that does
    // not exist, so alpha learns nothing of it, not even that it exists.
    let r = request(&mut a, &["blue", "secret", "nowhere"]).await;
    let secret = r.admissions.iter().find(|x| x.network == "secret").unwrap();
    let nowhere = r
        .admissions
        .iter()
        .find(|x| x.network == "nowhere")
        .unwrap();
    assert_eq!(secret.state(), pb::AdmissionState::UnknownNetwork);
    assert_eq!(
        secret.reason.replace("secret", "N"),
        nowhere.reason.replace("nowhere", "N")
    );
    let mut w = watch(&mut a, 0).await;
    let v = next_view(&mut w).await;
    assert_eq!(v.cluster_name, "alpha");
    assert_eq!(v.networks.len(), 1);
    assert_eq!(v.networks[0].name, "blue");
    assert!(!format!("{v:?}").contains("gamma"), "{v:?}");
    // alpha cannot claim gamma's tunnel address (a write into gamma's range).
    let err = a
        .report_gateways(pb::GatewayReport {
            gateways: vec![gateway("gw", 9, "100.64.1.1")],
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    // gamma's data is untouched.
    let list = b
        .admin()
        .await
        .list_clusters(pb::ListClustersRequest::default())
        .await
        .unwrap()
        .into_inner();
    let g = list.clusters.iter().find(|x| x.name == "gamma").unwrap();
    assert_eq!(g.gateways[0].public_key, vec![3; 32]);
    let alpha = list.clusters.iter().find(|x| x.name == "alpha").unwrap();
    assert!(alpha.gateways.is_empty());
}

#[tokio::test]
async fn bad_admin_input_gets_clear_errors_and_changes_nothing() {
    let b = TestBroker::start().await;
    let info = b.network("blue", &[]).await;
    let mut admin = b.admin().await;
    let dup = admin
        .create_network(pb::CreateNetworkRequest {
            name: "blue".into(),
            allow_all: true,
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(dup.code(), Code::AlreadyExists);
    let vni = admin
        .create_network(pb::CreateNetworkRequest {
            name: "red".into(),
            vni: info.vni,
            allow_all: true,
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(vni.code(), Code::AlreadyExists);
    assert!(vni.message().contains("blue"));
    let low = admin
        .create_network(pb::CreateNetworkRequest {
            name: "red".into(),
            vni: 10,
            allow_all: true,
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(low.code(), Code::InvalidArgument);
    let nf = admin
        .delete_network(pb::DeleteNetworkRequest {
            name: "nope".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(nf.code(), Code::NotFound);
    let bad = admin
        .create_token(pb::CreateTokenRequest {
            cluster: "Bad Name".into(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(bad.code(), Code::InvalidArgument);
    let list = admin
        .list_networks(pb::ListNetworksRequest::default())
        .await
        .unwrap()
        .into_inner();
    assert_eq!(list.networks.len(), 1);
    assert!(
        admin
            .list_tokens(pb::ListTokensRequest::default())
            .await
            .unwrap()
            .into_inner()
            .tokens
            .is_empty()
    );
}

#[tokio::test]
async fn oversized_requests_are_refused() {
    let b = TestBroker::start_with(|c| c.max_request_bytes = 8 << 10).await;
    let (_, mut a) = b.join("alpha").await;
    let huge = pb::GatewayReport {
        gateways: vec![pb::Gateway {
            node: "x".repeat(20_000),
            ..gateway("gw", 1, "100.64.0.1")
        }],
    };
    let err = a.report_gateways(huge).await.unwrap_err();
    assert!(
        matches!(
            err.code(),
            Code::OutOfRange | Code::ResourceExhausted | Code::InvalidArgument
        ),
        "{err:?}"
    );
    let list = b
        .admin()
        .await
        .list_clusters(pb::ListClustersRequest::default())
        .await
        .unwrap()
        .into_inner();
    assert!(list.clusters[0].gateways.is_empty());
}

#[tokio::test]
async fn metrics_and_health_are_served() {
    let b = TestBroker::start().await;
    b.join("alpha").await;
    let body = http_get(&b.metrics_addr, "/metrics").await;
    assert!(
        body.contains("l2mesh_broker_joins_total{result=\"ok\"} 1"),
        "{body}"
    );
    assert!(body.contains("l2mesh_broker_clusters 1"), "{body}");
    assert!(
        body.contains("l2mesh_broker_grpc_server_handling_seconds_count{method=\"/l2mesh.broker.v1.Broker/Join\"} 1"),
        "{body}"
    );
    assert!(
        http_get(&b.metrics_addr, "/healthz")
            .await
            .ends_with("ok\n")
    );
}

async fn http_get(addr: &str, path: &str) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    s.write_all(format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").as_bytes())
        .await
        .unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).await.unwrap();
    out
}

#[tokio::test]
async fn a_single_use_token_admits_exactly_one_of_many_concurrent_joins() {
    let b = TestBroker::start().await;
    let j = b.token("edge-1", 600, 1).await;
    let tries: Vec<_> = (0..8)
        .map(|_| {
            let j = j.clone();
            tokio::spawn(async move { client::join(&j).await.is_ok() })
        })
        .collect();
    let mut wins = 0;
    for t in tries {
        wins += usize::from(t.await.unwrap());
    }
    assert_eq!(wins, 1);
    // Concurrent, independent writes all land (they share flushes).
    let mut admin = b.admin().await;
    let creates: Vec<_> = (0..10)
        .map(|i| {
            let mut a = admin.clone();
            tokio::spawn(async move {
                a.create_network(pb::CreateNetworkRequest {
                    name: format!("n{i}"),
                    allow_all: true,
                    ..Default::default()
                })
                .await
                .is_ok()
            })
        })
        .collect();
    for c in creates {
        assert!(c.await.unwrap());
    }
    let nets = admin
        .list_networks(pb::ListNetworksRequest::default())
        .await
        .unwrap()
        .into_inner()
        .networks;
    let mut vnis: Vec<u32> = nets.iter().map(|n| n.vni).collect();
    vnis.sort_unstable();
    vnis.dedup();
    assert_eq!(vnis.len(), 10, "VNIs must be unique");
}
