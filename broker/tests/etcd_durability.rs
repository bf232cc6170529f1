//! Durability on etcd: every write a broker replica acknowledged survives
//! `kill -9` of that replica and of one etcd member, over rounds of
//! concurrent writers on two replicas (the same standard as the sled
//! `kill9` test).
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
        // Two replicas come up while one etcd member is still down; both
        // see everything acknowledged so far.
        let mut a = start_on(dir, &store);
        let mut b = start_on(dir, &store);
        let mut admin_a = admin(&a, dir).await;
        let admin_b = admin(&b, dir).await;
        let listed = networks(&mut admin_a).await;
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
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let writers: Vec<_> = (0..WRITERS)
            .map(|w| {
                let acked = Arc::clone(&acked);
                let stop = Arc::clone(&stop);
                // Half the writers on each replica.
                let mut admin = if w % 2 == 0 {
                    admin_a.clone()
                } else {
                    admin_b.clone()
                };
                tokio::spawn(async move {
                    for i in 0.. {
                        if stop.load(std::sync::atomic::Ordering::Relaxed) {
                            return;
                        }
                        let name = format!("r{round}-w{w}-{i}");
                        let r = admin
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
                            // The killed replica's writers stop; the other
                            // replica's may see a write refused while etcd
                            // elects a new leader: go on.
                            Err(s) if s.code() == tonic::Code::Unavailable && w % 2 == 1 => {}
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
        a.child.kill().unwrap(); // SIGKILL
        etcd.kill(member);
        a.child.wait().unwrap();
        // b goes on writing a little through the loss, then stops.
        tokio::time::sleep(Duration::from_millis(300)).await;
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
        for w in writers {
            w.await.unwrap();
        }
        // The survivor gets every write either replica acknowledged (a's
        // last ones reach it through etcd's watch, which may have been on
        // the killed member).
        let mut admin_b = admin_b;
        let want = acked.lock().unwrap().clone();
        let deadline = tokio::time::Instant::now() + Duration::from_secs(15);
        loop {
            let listed = networks(&mut admin_b).await;
            let missing: Vec<&String> = want
                .iter()
                .filter(|(name, vni)| listed.get(*name) != Some(*vni))
                .map(|(name, _)| name)
                .collect();
            if missing.is_empty() {
                break;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "round {round}: the surviving replica lacks acknowledged networks {missing:?}"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        b.child.kill().unwrap();
        b.child.wait().unwrap();
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
