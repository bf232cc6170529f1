//! Durability on etcd: every write a broker replica acknowledged survives
//! `kill -9` of that replica and of one etcd member, over rounds of
//! concurrent writers (the same standard as the sled `kill9` test).
#![allow(clippy::unwrap_used, clippy::expect_used)]

use common::etcd::EtcdCluster;
use common::start_on;
use l2mesh_broker::client;
use l2mesh_broker::pki::AdminCredential;
use l2mesh_broker::process::BrokerProcess;
use l2mesh_proto::broker as pb;
use l2mesh_proto::broker::broker_admin_client::BrokerAdminClient;
use std::collections::BTreeMap;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tonic::transport::Channel;

mod common;

const WRITERS: usize = 4;
const ROUNDS: usize = 3;

async fn admin(p: &BrokerProcess, dir: &Path) -> BrokerAdminClient<Channel> {
    let cred = AdminCredential::load(&dir.join("admin.pem")).unwrap();
    client::admin_client(std::slice::from_ref(&p.addr), &cred)
        .await
        .unwrap()
}

/// Every network the broker lists, by name, with its VNI.
async fn networks(a: &mut BrokerAdminClient<Channel>) -> BTreeMap<String, u32> {
    let mut out = BTreeMap::new();
    let mut page_token = String::new();
    loop {
        let r = a
            .list_networks(pb::ListNetworksRequest {
                page_size: 1000,
                page_token,
            })
            .await
            .unwrap()
            .into_inner();
        out.extend(r.networks.into_iter().map(|n| (n.name, n.vni)));
        if r.next_page_token.is_empty() {
            return out;
        }
        page_token = r.next_page_token;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acknowledged_writes_survive_kill_9_of_the_replica_and_of_an_etcd_member() {
    let Some(mut etcd) = EtcdCluster::start(3).await else {
        return;
    };
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let store = etcd.store();
    // name -> VNI of every acknowledged create.
    let acked: Arc<Mutex<BTreeMap<String, u32>>> = Arc::default();
    let mut killed_member: Option<usize> = None;
    for round in 0..ROUNDS {
        // A new replica comes up while one etcd member is still down.
        let mut p = start_on(dir, &store);
        let mut a = admin(&p, dir).await;
        let listed = networks(&mut a).await;
        for (name, vni) in acked.lock().unwrap().iter() {
            assert_eq!(
                listed.get(name),
                Some(vni),
                "round {round}: acknowledged network {name} lost or changed"
            );
        }
        if let Some(m) = killed_member.take() {
            etcd.restart(m);
        }
        let writers: Vec<_> = (0..WRITERS)
            .map(|w| {
                let acked = Arc::clone(&acked);
                let mut a = a.clone();
                tokio::spawn(async move {
                    for i in 0.. {
                        let name = format!("r{round}-w{w}-{i}");
                        let r = a
                            .create_network(pb::CreateNetworkRequest {
                                name: name.clone(),
                                allow_all: true,
                                ..Default::default()
                            })
                            .await;
                        match r {
                            Ok(info) => {
                                acked.lock().unwrap().insert(name, info.into_inner().vni);
                            }
                            Err(_) => return,
                        }
                    }
                })
            })
            .collect();
        // Let the writers get going, then kill in the middle of their writes.
        let target = acked.lock().unwrap().len() + 30;
        let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
        while acked.lock().unwrap().len() < target {
            assert!(
                tokio::time::Instant::now() < deadline,
                "round {round}: the writers made no progress"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let member = round % 3;
        p.child.kill().unwrap(); // SIGKILL
        etcd.kill(member);
        p.child.wait().unwrap();
        for w in writers {
            w.await.unwrap();
        }
        killed_member = Some(member);
    }
    let p = start_on(dir, &store);
    let mut a = admin(&p, dir).await;
    let listed = networks(&mut a).await;
    let acked = acked.lock().unwrap().clone();
    for (name, vni) in &acked {
        assert_eq!(
            listed.get(name),
            Some(vni),
            "acknowledged network {name} lost"
        );
    }
    let vnis: std::collections::BTreeSet<u32> = listed.values().copied().collect();
    assert_eq!(vnis.len(), listed.len(), "two networks share a VNI");
    assert!(acked.len() >= ROUNDS * 30);
    assert!(
        !dir.join("store").exists(),
        "the state went to etcd, not sled"
    );
}
