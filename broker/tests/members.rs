//! An authenticated cluster is not trusted: what it reports is bounded in
//! size and rate and checked against the other clusters' data.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use common::{TestBroker, gateway, next_view, request, view_until, watch};
use l2mesh_proto::broker as pb;
use std::time::{Duration, Instant};
use tonic::Code;

fn big_gateways(n: usize, subnet: u8, key_base: u8) -> Vec<pb::Gateway> {
    (0..n)
        .map(|i| {
            let i8 = u8::try_from(i).unwrap();
            pb::Gateway {
                node: format!("{}-{i}", "n".repeat(200)),
                public_key: vec![key_base.wrapping_add(i8); 32],
                endpoints: (0..16)
                    .map(|p| format!("198.51.{subnet}.{}:{}", i + 1, 1000 + p))
                    .collect(),
                tunnel_ip: format!("100.64.{subnet}.{}", i + 1),
            }
        })
        .collect()
}

#[tokio::test]
async fn a_member_cannot_push_another_clusters_view_over_the_limit() {
    let b = TestBroker::start_with(|c| c.max_view_bytes = 16 << 10).await;
    let (_, mut victim) = b.join("victim").await;
    let (_, mut big) = b.join("big").await;
    b.network("blue", &[]).await;
    request(&mut victim, &["blue"]).await;
    request(&mut big, &["blue"]).await;
    let mut w = watch(&mut victim, 0).await;
    next_view(&mut w).await;
    // 40 gateways of ~600 bytes each fit the report limits but make the
    // victim's view larger than 16 KiB.
    let err = big
        .report_gateways(pb::GatewayReport {
            gateways: big_gateways(40, 1, 10),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::ResourceExhausted, "{err:?}");
    assert!(
        err.message().contains("\"victim\"") && err.message().contains("16384"),
        "names the cluster and the bound: {}",
        err.message()
    );
    // A smaller report goes through and reaches the victim.
    big.report_gateways(pb::GatewayReport {
        gateways: big_gateways(8, 1, 10),
    })
    .await
    .unwrap();
    let v = view_until(&mut w, |v| v.networks.iter().any(|n| n.peers.len() == 8)).await;
    assert!(prost::Message::encoded_len(&v) <= 16 << 10);
    // Static bounds are named too.
    let err = big
        .report_gateways(pb::GatewayReport {
            gateways: big_gateways(65, 1, 100),
        })
        .await
        .unwrap_err();
    assert!(err.message().contains("limit is 64"), "{}", err.message());
    let mut long = gateway("gw", 5, "100.64.1.1");
    long.node = "x".repeat(5000);
    let err = big
        .report_gateways(pb::GatewayReport {
            gateways: vec![long],
        })
        .await
        .unwrap_err();
    assert!(
        err.message().contains("253 bytes") && err.message().len() < 300,
        "{}",
        err.message()
    );
}

#[tokio::test]
async fn gateway_reports_are_checked_against_other_clusters() {
    let b = TestBroker::start().await;
    let (_, mut a) = b.join("alpha").await;
    let (_, mut c) = b.join("gamma").await;
    b.network("blue", &[]).await;
    request(&mut a, &["blue"]).await;
    request(&mut c, &["blue"]).await;
    a.report_gateways(pb::GatewayReport {
        gateways: vec![gateway("gw-a", 1, "100.64.0.1")],
    })
    .await
    .unwrap();
    let mut w = watch(&mut a, 0).await;
    next_view(&mut w).await;
    let mut stolen = gateway("gw-a", 1, "100.64.1.1");
    stolen.endpoints = vec!["198.51.100.7:51820".into()];
    let mut zero = gateway("gw", 0, "100.64.1.1");
    zero.endpoints = vec!["198.51.100.7:51820".into()];
    let mut lo = gateway("gw", 3, "100.64.1.1");
    lo.endpoints = vec!["127.0.0.1:51820".into()];
    let mut bcast = gateway("gw", 3, "100.64.1.1");
    bcast.endpoints = vec!["255.255.255.255:51820".into()];
    let same_endpoint = gateway("gw", 3, "100.64.1.1");
    let mut same_endpoint = same_endpoint;
    same_endpoint.endpoints = vec!["192.0.2.1:51820".into()];
    for (g, rule) in [
        (stolen, "one key, one cluster"),
        (zero, "usable key"),
        (lo, "reachable endpoint"),
        (bcast, "reachable endpoint"),
        (same_endpoint, "one endpoint, one cluster"),
    ] {
        let err = c
            .report_gateways(pb::GatewayReport { gateways: vec![g] })
            .await
            .unwrap_err();
        assert_eq!(err.code(), Code::InvalidArgument);
        assert!(err.message().contains(rule), "{rule}: {}", err.message());
        assert!(!err.message().contains("alpha"), "{}", err.message());
    }
    // alpha saw none of it.
    common::assert_quiet(&mut w, "refused reports change no view").await;
}

#[tokio::test]
async fn link_health_stays_in_memory_and_lists_are_paged() {
    let tmp = tempfile::tempdir().unwrap();
    let mut b = TestBroker::start_in(tmp.path(), |_| {}).await;
    let (_, mut a) = b.join("alpha").await;
    for n in ["c1", "c2", "c3", "c4"] {
        b.join(n).await;
    }
    let links = (0..1000)
        .map(|i| pb::LinkHealth {
            peer_cluster: format!("peer-{i}"),
            peer_public_key: vec![1; 32],
            up: true,
            last_handshake_age_ms: 5,
            rx_bytes: i,
            tx_bytes: i,
        })
        .collect::<Vec<_>>();
    a.report_link_health(pb::LinkHealthReport {
        links: links.clone(),
    })
    .await
    .unwrap();
    let mut admin = b.admin().await;
    let mut names = Vec::new();
    let mut token = String::new();
    let mut pages = 0;
    loop {
        let r = admin
            .list_clusters(pb::ListClustersRequest {
                page_size: 2,
                page_token: token,
            })
            .await
            .unwrap()
            .into_inner();
        pages += 1;
        assert!(r.clusters.len() <= 2);
        for c in &r.clusters {
            if c.name == "alpha" {
                assert_eq!(c.links.len(), 1000);
            }
        }
        names.extend(r.clusters.into_iter().map(|c| c.name));
        if r.next_page_token.is_empty() {
            break;
        }
        token = r.next_page_token;
    }
    assert_eq!(pages, 3);
    assert_eq!(names, ["alpha", "c1", "c2", "c3", "c4"]);
    // Too many links in one report are refused by name.
    let too_many = pb::LinkHealthReport {
        links: [links.clone(), links].concat(),
    };
    let err = a.report_link_health(too_many).await.unwrap_err();
    assert!(err.message().contains("limit is 1024"), "{}", err.message());
    // Not written to the store: gone after a restart.
    b.stop().await;
    let b = TestBroker::start_in(tmp.path(), |_| {}).await;
    let list = b
        .admin()
        .await
        .list_clusters(pb::ListClustersRequest::default())
        .await
        .unwrap()
        .into_inner();
    assert_eq!(list.clusters.len(), 5);
    assert!(list.clusters.iter().all(|c| c.links.is_empty()));
}

#[tokio::test]
async fn ended_tokens_are_purged_after_the_retention() {
    let b = TestBroker::start_with(|c| c.token_retention = Duration::from_secs(1)).await;
    b.join("edge").await;
    let live = b.token("other", 600, 1).await;
    let start = Instant::now();
    loop {
        let tokens = b
            .admin()
            .await
            .list_tokens(pb::ListTokensRequest::default())
            .await
            .unwrap()
            .into_inner()
            .tokens;
        if tokens.len() == 1 {
            assert_eq!(tokens[0].id, live.id);
            break;
        }
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "the used token was not purged: {tokens:?}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

#[tokio::test]
async fn membership_churn_is_rate_limited_and_views_are_merged() {
    let b = TestBroker::start_with(|c| {
        c.reports_per_minute = 60;
        c.report_burst = 10;
        c.view_interval = Duration::from_millis(500);
    })
    .await;
    let (_, mut a) = b.join("alpha").await;
    let (_, mut c) = b.join("gamma").await;
    b.network("blue", &[]).await;
    request(&mut c, &["blue"]).await;
    let mut w = watch(&mut c, 0).await;
    next_view(&mut w).await;
    let start = Instant::now();
    let (mut ok, mut limited) = (0, 0);
    for i in 0..60 {
        let nets = if i % 2 == 0 {
            vec!["blue".to_owned()]
        } else {
            vec![]
        };
        match a
            .request_networks(pb::NetworkRequest { networks: nets })
            .await
        {
            Ok(_) => ok += 1,
            Err(e) => {
                assert_eq!(e.code(), Code::ResourceExhausted, "{e:?}");
                assert!(e.message().contains("\"alpha\""), "{}", e.message());
                limited += 1;
            }
        }
    }
    let elapsed = start.elapsed().as_secs_f64();
    assert!(limited > 0, "60 toggles must hit the limit");
    // At most the burst plus the refill during the loop.
    assert!(
        f64::from(ok) <= 10.0 + elapsed + 1.0,
        "{ok} toggles accepted in {elapsed} s"
    );
    // gamma got merged views: at most one per 500 ms (plus the first).
    let mut views = 0;
    while tokio::time::timeout(Duration::from_millis(1200), w.message())
        .await
        .is_ok_and(|m| m.is_ok_and(|v| v.is_some()))
    {
        views += 1;
    }
    let window = start.elapsed().as_secs_f64();
    assert!(
        f64::from(views) <= window / 0.5 + 2.0,
        "{views} views in {window} s"
    );
}

#[tokio::test]
async fn a_cluster_renews_its_certificate_without_a_token() {
    let b = TestBroker::start().await;
    let (cred, mut old) = b.join("edge").await;
    b.network("blue", &[]).await;
    request(&mut old, &["blue", "red"]).await;
    let mut w = watch(&mut old, 0).await;
    next_view(&mut w).await;
    let now = l2mesh_broker::server::now_unix();
    let not_after = cred.not_after_unix().unwrap();
    assert!(
        not_after > now && not_after < now + 91 * 86_400,
        "finite lifetime"
    );
    assert!(!cred.due_for_renewal(now).unwrap());
    assert!(cred.due_for_renewal(not_after - 86_400).unwrap());
    let renewed = cred.renew().await.unwrap();
    assert_ne!(renewed.cert_pem, cred.cert_pem);
    let mut new = renewed.connect().await.unwrap();
    request(&mut new, &["blue", "red"]).await;
    // The stream on the old certificate stays up and gets the change.
    b.network("red", &[]).await;
    let v = view_until(&mut w, |v| v.networks.len() == 2).await;
    assert_eq!(v.cluster_name, "edge");
    // A second renewal (from the new certificate) retires the first one.
    let third = renewed.renew().await.unwrap();
    third.connect().await.unwrap();
    let err = cred
        .connect()
        .await
        .unwrap()
        .request_networks(pb::NetworkRequest::default())
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::Unauthenticated);
}

#[tokio::test]
async fn a_watch_from_a_future_revision_gets_the_current_view() {
    let b = TestBroker::start().await;
    let (_, mut c) = b.join("edge").await;
    let mut w = watch(&mut c, 0).await;
    let current = next_view(&mut w).await;
    let mut w = watch(&mut c, current.revision + 1000).await;
    let v = next_view(&mut w).await;
    assert_eq!(v.revision, current.revision, "the current view, as defined");
    assert!(v.revision < current.revision + 1000);
}
