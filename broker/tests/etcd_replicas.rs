//! Two broker replicas active-active on one etcd: racing writes keep the
//! invariants (a token is spent once, VNIs stay unique) and a change made
//! on one replica reaches the watch streams of the other.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use common::etcd::EtcdCluster;
use common::{TestBroker, gateway, request, view_until, watch};
use l2mesh_broker::client;
use l2mesh_broker::store::StoreSpec;
use l2mesh_broker::{Broker, ServeConfig};
use l2mesh_proto::broker as pb;
use std::collections::BTreeSet;
use std::path::Path;

mod common;

/// Two in-process replicas on `store`, sharing the CA in `dir`, each under
/// the etcd prefix `prefix`.
async fn replicas(dir: &Path, store: &str, prefix: &str) -> (TestBroker, TestBroker) {
    let spec = match StoreSpec::parse(store).unwrap() {
        StoreSpec::Etcd(mut c) => {
            c.prefix = prefix.to_owned();
            StoreSpec::Etcd(c)
        }
        other => other,
    };
    let s = spec.clone();
    let a = TestBroker::start_in(dir, move |c| c.store = Some(s)).await;
    let b = TestBroker::start_in(dir, move |c| c.store = Some(spec)).await;
    (a, b)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replicas_share_one_state_and_racing_writes_keep_the_invariants() {
    let Some(etcd) = EtcdCluster::start(3).await else {
        return;
    };
    let tmp = tempfile::tempdir().unwrap();
    let (a, b) = replicas(tmp.path(), &etcd.store(), "/race/").await;

    // One one-use token, eight joins racing on the two replicas.
    let js = a.token("edge", 600, 1).await;
    let joins: Vec<_> = (0..8)
        .map(|i| {
            let mut js = js.clone();
            js.brokers = vec![if i % 2 == 0 {
                a.addr.clone()
            } else {
                b.addr.clone()
            }];
            tokio::spawn(async move { client::join(&js).await })
        })
        .collect();
    let mut won = 0;
    for j in joins {
        match j.await.unwrap() {
            Ok(_) => won += 1,
            Err(e) => {
                let s = tonic::Status::from(e);
                assert!(s.message().contains("no uses left"), "{s:?}");
            }
        }
    }
    assert_eq!(won, 1, "exactly one join may spend a one-use token");

    // A token made on one replica works on the other at once (the other
    // checks etcd before refusing a token it has not followed yet).
    for i in 0..20 {
        let mut js = a.token(&format!("quick-{i}"), 600, 1).await;
        js.brokers = vec![b.addr.clone()];
        client::join(&js)
            .await
            .unwrap_or_else(|e| panic!("join {i} on the other replica: {e}"));
    }

    // Networks created at once on both replicas get distinct VNIs.
    let (admin_a, admin_b) = (a.admin().await, b.admin().await);
    let creates: Vec<_> = (0..16)
        .map(|i| {
            let mut admin = if i % 2 == 0 {
                admin_a.clone()
            } else {
                admin_b.clone()
            };
            async move {
                admin
                    .create_network(pb::CreateNetworkRequest {
                        name: format!("n{i}"),
                        allow_all: true,
                        ..Default::default()
                    })
                    .await
                    .unwrap()
                    .into_inner()
            }
        })
        .collect();
    let created = futures::future::join_all(creates).await;
    let vnis: BTreeSet<u32> = created.iter().map(|n| n.vni).collect();
    assert_eq!(vnis.len(), 16, "duplicate VNI: {created:?}");

    // Both replicas list the same networks (b follows what a wrote).
    for broker in [&a, &b] {
        let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(10);
        loop {
            let listed: BTreeSet<(String, u32)> = broker
                .admin()
                .await
                .list_networks(pb::ListNetworksRequest {
                    page_size: 1000,
                    page_token: String::new(),
                })
                .await
                .unwrap()
                .into_inner()
                .networks
                .into_iter()
                .map(|n| (n.name, n.vni))
                .collect();
            let want: BTreeSet<(String, u32)> =
                created.iter().map(|n| (n.name.clone(), n.vni)).collect();
            if listed == want {
                break;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "{} does not list what was created: {listed:?}",
                broker.addr
            );
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_with_another_ca_is_refused() {
    let Some(etcd) = EtcdCluster::start(1).await else {
        return;
    };
    let one = tempfile::tempdir().unwrap();
    let (_a, _b) = replicas(one.path(), &etcd.store(), "/ca/").await;
    let other = tempfile::tempdir().unwrap();
    let mut config = ServeConfig::new(other.path().to_path_buf(), vec!["127.0.0.1:1".into()]);
    let StoreSpec::Etcd(mut c) = StoreSpec::parse(&etcd.store()).unwrap() else {
        unreachable!()
    };
    c.prefix = "/ca/".into();
    config.store = Some(StoreSpec::Etcd(c));
    let err = Broker::open(config).await.unwrap_err().to_string();
    assert!(err.contains("same ca.pem and ca.key"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_change_on_one_replica_reaches_a_watch_on_the_other() {
    let Some(etcd) = EtcdCluster::start(3).await else {
        return;
    };
    let tmp = tempfile::tempdir().unwrap();
    let (a, b) = replicas(tmp.path(), &etcd.store(), "/watch/").await;
    a.network("blue", &[]).await;
    // alpha joins through a and watches on b; beta works through a.
    let (alpha, _) = a.join("alpha").await;
    let mut on_b = alpha.clone();
    on_b.brokers = vec![b.addr.clone()];
    let mut alpha_b = on_b.connect().await.unwrap();
    let (_, mut beta) = a.join("beta").await;
    request(&mut alpha_b, &["blue"]).await;
    let mut w = watch(&mut alpha_b, 0).await;
    // The same cluster taking deltas on b: what a above writes reaches it
    // as deltas derived from the followed records.
    let mut wd = common::watch_deltas(&mut alpha_b.clone(), 0).await;
    let mut held = None;
    request(&mut beta, &["blue"]).await;
    beta.report_gateways(pb::GatewayReport {
        gateways: vec![gateway("gw", 7, "100.64.1.1")],
    })
    .await
    .unwrap();
    let v = view_until(&mut w, |v| {
        v.networks
            .first()
            .is_some_and(|n| n.peers.iter().any(|p| p.cluster == "beta"))
    })
    .await;
    assert_eq!(v.networks[0].members, vec!["alpha", "beta"]);

    // Both replicas give alpha the same view under the same revision.
    let mut alpha_a = alpha.connect().await.unwrap();
    let mut wa = watch(&mut alpha_a, 0).await;
    let va = view_until(&mut wa, |x| x.revision >= v.revision).await;
    assert_eq!(va, v, "the replicas disagree on alpha's view");

    // Changes to alpha's view made at once on both replicas: each replica
    // streams alpha strictly increasing revisions, ending in the same view.
    let wanted: Vec<String> = std::iter::once("blue".to_owned())
        .chain((0..4).flat_map(|i| [format!("ga{i}"), format!("gb{i}")]))
        .collect();
    let wanted_refs: Vec<&str> = wanted.iter().map(String::as_str).collect();
    request(&mut alpha_b, &wanted_refs).await;
    let (admin_a, admin_b) = (a.admin().await, b.admin().await);
    let creates = (0..4).flat_map(|i| {
        [
            (admin_a.clone(), format!("ga{i}")),
            (admin_b.clone(), format!("gb{i}")),
        ]
    });
    let creates = creates.map(|(mut admin, name)| async move {
        admin
            .create_network(pb::CreateNetworkRequest {
                name,
                allow_all: true,
                ..Default::default()
            })
            .await
            .unwrap();
    });
    futures::future::join_all(creates).await;
    let mut finals = Vec::new();
    for (stream, last) in [(&mut w, v.revision), (&mut wa, va.revision)] {
        let mut last = last;
        let end = loop {
            let next = common::next_view(stream).await;
            assert!(
                next.revision > last,
                "revision {} after {last}",
                next.revision
            );
            last = next.revision;
            if next.networks.len() == 9 {
                break next;
            }
        };
        finals.push(end);
    }
    assert_eq!(finals[0], finals[1], "the replicas end on different views");
    let mut deltas = 0;
    loop {
        let msg = common::next_applied(&mut wd, &mut held).await;
        deltas += usize::from(msg.delta.is_some());
        if held
            .as_ref()
            .is_some_and(|h| h.revision >= finals[0].revision)
        {
            break;
        }
    }
    assert!(deltas > 0, "the replica sent no delta");
    assert_eq!(
        held.as_ref(),
        Some(&finals[0]),
        "deltas applied on the following replica differ from its snapshot"
    );

    // A removal on a closes alpha's stream on b.
    a.admin()
        .await
        .remove_cluster(pb::RemoveClusterRequest {
            name: "alpha".into(),
        })
        .await
        .unwrap();
    let end = tokio::time::timeout(std::time::Duration::from_secs(10), async {
        loop {
            match w.message().await {
                Ok(Some(_)) => {}
                Ok(None) => return None,
                Err(s) => return Some(s),
            }
        }
    })
    .await
    .expect("alpha's stream on b stayed open after its removal on a");
    assert_eq!(end.map(|s| s.code()), Some(tonic::Code::Unauthenticated));
}
