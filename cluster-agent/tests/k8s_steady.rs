//! A converged cluster writes nothing to Kubernetes: node reports that
//! only move handshake ages and counters, report period after report
//! period, cause no status patch, no NAD write and no event; the agent's
//! own status write does not make its controller write either. Counted on
//! the fake API server (writes, not time; the Lease renewals are the only
//! writes a steady leader makes and are left out).
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use l2mesh_proto::node::{NetworkStatus, NodeHello, NodeStatus, PeerGroup, PeerStatus};
use serde_json::{Value, json};
use std::time::Duration;
use support::fake_apiserver::FakeApi;
use support::k8s_agent::*;

/// The agent's writes so far, without the Lease renewals.
fn writes(api: &FakeApi) -> Vec<String> {
    api.requests()
        .into_iter()
        .filter(|r| {
            let method = r.split_whitespace().nth(1).unwrap_or_default();
            r.starts_with("agent-0 ")
                && matches!(method, "POST" | "PUT" | "PATCH" | "DELETE")
                && !r.contains("/leases")
        })
        .collect()
}

fn key(node: &str) -> Vec<u8> {
    vec![if node == "gw" { 1 } else { 2 }; 32]
}

/// What `node` reports at report period `period`: blue applied (with
/// `pods`), its tunnel to the other node up, with ages and counters moving.
fn report(node: &str, vni: u32, period: u64, pods: &[&str]) -> NodeStatus {
    let other = if node == "gw" { "w1" } else { "gw" };
    NodeStatus {
        node_name: node.into(),
        public_key: key(node),
        listen_port: 51820,
        networks: vec![NetworkStatus {
            name: "blue".into(),
            vni,
            ports: pods.iter().map(|p| (*p).to_owned()).collect(),
            ..Default::default()
        }],
        peers: vec![PeerStatus {
            public_key: key(other),
            name: other.into(),
            group: PeerGroup::Local.into(),
            last_handshake_age_ms: Some(period * 5_000 % 120_000),
            rx_bytes: period * 1_000,
            tx_bytes: period * 2_000,
            vnis: vec![vni],
            ..Default::default()
        }],
        ..Default::default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_converged_cluster_makes_no_kubernetes_writes() {
    init();
    let api = FakeApi::new();
    seed_nodes(&api).await;
    create_net(&api, "blue", json!({"ipRange": "10.1.0.0/16"})).await;
    let mut agent = Agent::start_with(&api, "agent-0", None, Some("100.127.0.0/24"));
    let addr = agent.listening(Duration::from_secs(20)).await.unwrap();

    let mut clients = Vec::new();
    let mut vni = 0;
    for node in ["gw", "w1"] {
        let mut c = node_client(&api, addr).await;
        let mut watch = c
            .watch_desired(NodeHello {
                node_name: node.into(),
                public_key: key(node),
                listen_port: 51820,
                endpoints: vec![format!("192.0.2.{}:51820", clients.len() + 10)],
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner();
        let d = next_matching(&mut watch, "blue", |d| has_net(d, "blue")).await;
        vni = d.networks[0].vni;
        clients.push((node, c, watch));
    }
    let report_all = |period: u64, pods: &'static [&'static str]| {
        let clients: Vec<_> = clients.iter().map(|(n, c, _)| (*n, c.clone())).collect();
        async move {
            for (node, mut c) in clients {
                let gw_pods: &[&str] = if node == "gw" { pods } else { &[] };
                c.report_status(report(node, vni, period, gw_pods))
                    .await
                    .unwrap();
            }
        }
    };
    report_all(1, &[]).await;
    let converged = |o: &Value| {
        condition(o, "Ready").as_deref() == Some("True")
            && condition(o, "PeersConnected").as_deref() == Some("True")
    };
    wait_for(
        "blue Ready with its tunnels up, its NAD and its Ready event",
        20,
        || {
            let blue = api.get(NETS, "default", "blue")?;
            (converged(&blue)
                && api.get(NADS, "default", "blue").is_some()
                && api.all(EVENTS).iter().any(|e| e["reason"] == "Ready"))
            .then_some(())
        },
    )
    .await;
    let mark = writes(&api).len();

    // Several report periods of a steady cluster.
    for period in 2..8 {
        report_all(period, &[]).await;
    }
    // Then one real change, as a barrier: once its status write is in,
    // every write the steady reports could have caused is in too.
    report_all(8, &["l2pod1"]).await;
    wait_for("the pod in blue's status", 20, || {
        let blue = api.get(NETS, "default", "blue")?;
        (blue["status"]["attachedPodCount"] == 1).then_some(())
    })
    .await;
    let since: Vec<String> = writes(&api).split_off(mark);
    assert_eq!(
        since.len(),
        1,
        "steady reports wrote to Kubernetes; only the pod's status patch may appear: {since:#?}"
    );
    assert!(
        since[0].contains("PATCH") && since[0].contains("/l2networks/blue/status"),
        "{since:?}"
    );
    let blue = api.get(NETS, "default", "blue").unwrap();
    assert!(blue["status"].get("linkHealth").is_none(), "{blue}");
    assert_eq!(blue["status"]["links"]["up"], 2, "{blue}");
    let size = serde_json::to_vec(&blue["status"]).unwrap().len();
    assert!(size < 16 * 1024, "status of {size} bytes");
    drop(clients);
    agent.stop().await;
}
