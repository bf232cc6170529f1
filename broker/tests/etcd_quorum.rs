//! etcd quorum loss: the broker refuses writes with UNAVAILABLE naming etcd,
//! keeps serving reads and watches from memory, and takes writes again by
//! itself when quorum returns.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use common::etcd::EtcdCluster;
use common::{TestBroker, assert_quiet, gateway, request, view_until, watch};
use l2mesh_broker::store::StoreSpec;
use l2mesh_proto::broker as pb;
use std::time::Duration;
use tokio::time::{Instant, timeout};

mod common;

async fn metrics(addr: &str) -> String {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    s.write_all(b"GET /metrics HTTP/1.0\r\nHost: x\r\n\r\n")
        .await
        .unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).await.unwrap();
    out
}

/// Wait until the broker's metrics contain `line`.
async fn metric_until(addr: &str, line: &str) {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let body = metrics(addr).await;
        if body.lines().any(|l| l == line) {
            return;
        }
        assert!(Instant::now() < deadline, "no {line:?} in {body}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn token_request(cluster: &str) -> pb::CreateTokenRequest {
    pb::CreateTokenRequest {
        cluster: cluster.into(),
        ttl_seconds: 600,
        uses: 1,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn quorum_loss_refuses_writes_keeps_reads_and_watches_and_recovers() {
    let Some(mut etcd) = EtcdCluster::start(3).await else {
        return;
    };
    let spec = StoreSpec::parse(&etcd.store()).unwrap();
    let b = TestBroker::start_with(move |c| c.store = Some(spec)).await;
    b.network("blue", &[]).await;
    let (_, mut alpha) = b.join("alpha").await;
    request(&mut alpha, &["blue"]).await;
    alpha
        .report_gateways(pb::GatewayReport {
            gateways: vec![gateway("gw", 9, "100.64.0.9")],
        })
        .await
        .unwrap();
    let mut w = watch(&mut alpha, 0).await;
    let before = view_until(&mut w, |v| v.networks.len() == 1).await;

    etcd.kill(1);
    etcd.kill(2);

    // Writes are refused, by name, within a few request deadlines.
    let mut admin = b.admin().await;
    // Until the member notices that it lost its peers, a write may wait
    // for them; it can never commit without them.
    let refused = timeout(
        Duration::from_secs(10),
        admin.create_token(token_request("beta")),
    )
    .await
    .expect("a write hung instead of being refused")
    .expect_err("a write committed without quorum");
    assert_eq!(refused.code(), tonic::Code::Unavailable, "{refused:?}");
    assert!(refused.message().contains("etcd"), "{refused:?}");
    // Once refused, further writes are refused at once.
    let t = Instant::now();
    let again = admin.create_token(token_request("beta")).await.unwrap_err();
    assert_eq!(again.code(), tonic::Code::Unavailable, "{again:?}");
    assert!(t.elapsed() < Duration::from_secs(2), "{:?}", t.elapsed());

    metric_until(&b.metrics_addr, "l2mesh_broker_store_writable 0").await;

    // Reads and watches go on from memory.
    let listed = timeout(
        Duration::from_secs(2),
        admin.list_networks(pb::ListNetworksRequest::default()),
    )
    .await
    .expect("a read hung during the quorum loss")
    .unwrap()
    .into_inner();
    assert_eq!(listed.networks.len(), 1);
    let mut resumed = timeout(Duration::from_secs(2), watch(&mut alpha, before.revision))
        .await
        .expect("a watch could not open during the quorum loss");
    assert_quiet(&mut resumed, "resumed watch during the quorum loss").await;
    let mut fresh = watch(&mut alpha, 0).await;
    assert_eq!(view_until(&mut fresh, |_| true).await, before);
    assert_quiet(&mut w, "the open watch during the quorum loss").await;

    // Quorum returns: writes are taken again without any restart.
    etcd.restart(1);
    etcd.restart(2);
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        match admin.create_token(token_request("beta")).await {
            Ok(_) => break,
            Err(s) => {
                assert_eq!(s.code(), tonic::Code::Unavailable, "{s:?}");
                assert!(
                    Instant::now() < deadline,
                    "writes still refused 30 s after quorum returned: {s:?}"
                );
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        }
    }
    metric_until(&b.metrics_addr, "l2mesh_broker_store_writable 1").await;
    // And a change reaches the watch that stayed open.
    b.network("red", &[]).await;
    request(&mut alpha, &["blue", "red"]).await;
    let after = view_until(&mut w, |v| v.networks.len() == 2).await;
    assert!(after.revision > before.revision);
}
