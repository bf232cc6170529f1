//! What Kubernetes mode tells the operator, against the fake API server and
//! a real broker: status fields that no longer hold are removed, invalid or
//! name-clashing networks have no usable NAD, a missing NAD CRD is said once
//! and the nodes keep being served, events say only what is true and are
//! not repeated by a restart, and Ready waits for the nodes.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use kube::Api;
use kube::api::{Patch, PatchParams, PostParams};
use l2mesh_cluster_agent::crd::L2Network;
use l2mesh_proto::node::{NetworkStatus, NodeHello, NodeStatus};
use serde_json::{Value, json};
use std::time::Duration;
use support::broker::TestBroker;
use support::fake_apiserver::FakeApi;
use support::k8s_agent::*;

fn net(api: &FakeApi, ns: &str, name: &str) -> Option<Value> {
    api.get(NETS, ns, name)
}

fn reason(obj: &Value, type_: &str) -> Option<String> {
    obj["status"]["conditions"]
        .as_array()?
        .iter()
        .find(|c| c["type"] == type_)
        .and_then(|c| c["reason"].as_str().map(str::to_owned))
}

fn events_for(api: &FakeApi, name: &str) -> Vec<(String, String)> {
    api.all(EVENTS)
        .iter()
        .filter(|e| e["regarding"]["name"] == name)
        .map(|e| {
            (
                e["reason"].as_str().unwrap_or_default().to_owned(),
                e["note"].as_str().unwrap_or_default().to_owned(),
            )
        })
        .collect()
}

async fn patch_spec(api: &FakeApi, ns: &str, name: &str, spec: Value) {
    let nets: Api<L2Network> = Api::namespaced(api.client(), ns);
    nets.patch(
        name,
        &PatchParams::default(),
        &Patch::Merge(json!({"spec": spec})),
    )
    .await
    .unwrap();
}

fn nad_subnet(api: &FakeApi, ns: &str, name: &str) -> Option<Option<String>> {
    let nad = api.get(NADS, ns, name)?;
    let conf: Value = serde_json::from_str(nad["spec"]["config"].as_str()?).ok()?;
    Some(conf["ipam"]["subnet"].as_str().map(str::to_owned))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_fields_that_no_longer_hold_are_removed_and_invalid_networks_lose_their_nad() {
    init();
    let broker = TestBroker::start().await;
    broker.network("shared", &["edge"]).await;
    let api = FakeApi::new();
    seed_nodes(&api).await;
    create_net(&api, "blue", json!({"ipRange": "10.1.0.0/16"})).await;
    create_net(&api, "shared", json!({"scope": "multiCluster"})).await;
    let mut agent = Agent::start(&api, "agent-0", Some(broker.token("edge").await));
    agent.listening(Duration::from_secs(20)).await.unwrap();
    wait_for("blue and shared configured with a NAD", 20, || {
        (net(&api, "default", "blue")?["status"]["vni"].is_u64()
            && net(&api, "default", "shared")?["status"]["vni"].is_u64()
            && nad_subnet(&api, "default", "shared")?.as_deref() == Some("10.20.0.0/16"))
        .then_some(())
    })
    .await;

    // Invalid: no VNI, no range, no NAD; a warning that says why, and no
    // event claiming it was configured.
    patch_spec(&api, "default", "blue", json!({"mtu": 10})).await;
    let blue = wait_for("blue Invalid without its old fields", 20, || {
        net(&api, "default", "blue").filter(|o| {
            reason(o, "Ready").as_deref() == Some("Invalid")
                && o["status"].get("vni").is_none()
                && o["status"].get("ipRange").is_none()
        })
    })
    .await;
    assert_eq!(blue["status"]["observedGeneration"], 2);
    wait_for("blue's NAD removed", 20, || {
        api.get(NADS, "default", "blue").is_none().then_some(())
    })
    .await;
    let evs = events_for(&api, "blue");
    assert!(evs.iter().any(|(r, _)| r == "Invalid"), "{evs:?}");
    assert!(
        evs.iter().all(|(r, _)| r != "Ready" && r != "Configured"),
        "nothing claims an invalid network is configured: {evs:?}"
    );

    // The broker forgets the network: VNI and range go from the status,
    // the subnet from the NAD.
    broker
        .admin()
        .await
        .delete_network(l2mesh_proto::broker::DeleteNetworkRequest {
            name: "shared".into(),
        })
        .await
        .unwrap();
    wait_for("shared without VNI and range", 20, || {
        net(&api, "default", "shared")
            .filter(|o| o["status"].get("vni").is_none() && o["status"].get("ipRange").is_none())
    })
    .await;
    wait_for("the shared NAD without a subnet", 20, || {
        nad_subnet(&api, "default", "shared")?
            .is_none()
            .then_some(())
    })
    .await;
    agent.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_network_whose_node_name_is_taken_gets_no_nad_and_is_not_requested() {
    init();
    let broker = TestBroker::start().await;
    broker.network("shared", &["edge"]).await;
    let api = FakeApi::new();
    seed_nodes(&api).await;
    // A local network named like the broker network: it owns "shared" on
    // the nodes; a later multi-cluster network joining "shared" must not
    // share its bridge.
    create_net(&api, "shared", json!({})).await;
    let team: L2Network = serde_json::from_value(json!({
        "apiVersion": "l2mesh.io/v1alpha1", "kind": "L2Network",
        "metadata": {"name": "joiner", "namespace": "team"},
        "spec": {"scope": "multiCluster", "brokerNetwork": "shared"},
    }))
    .unwrap();
    tokio::time::sleep(Duration::from_millis(1100)).await;
    Api::<L2Network>::namespaced(api.client(), "team")
        .create(&PostParams::default(), &team)
        .await
        .unwrap();
    let mut agent = Agent::start(&api, "agent-0", Some(broker.token("edge").await));
    agent.listening(Duration::from_secs(20)).await.unwrap();
    let joiner = wait_for("joiner refused by name", 20, || {
        net(&api, "team", "joiner")
            .filter(|o| reason(o, "Ready").as_deref() == Some("NameConflict"))
    })
    .await;
    assert!(
        joiner["status"]["conditions"][0]["message"]
            .as_str()
            .unwrap()
            .contains("default/shared"),
        "{joiner}"
    );
    wait_for("the local network's NAD", 20, || {
        api.get(NADS, "default", "shared")
    })
    .await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(
        api.get(NADS, "team", "joiner").is_none(),
        "no NAD that would put pods on default/shared's bridge"
    );
    assert!(
        broker.members("shared").await.is_empty(),
        "the clashing network is not requested at the broker"
    );
    assert!(
        events_for(&api, "joiner")
            .iter()
            .any(|(r, _)| r == "NameConflict")
    );
    agent.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_the_nad_crd_the_status_and_one_event_say_so_and_nodes_are_served() {
    init();
    let broker = TestBroker::start().await;
    let api = FakeApi::new();
    api.remove_kind(NADS);
    seed_nodes(&api).await;
    create_net(&api, "blue", json!({"ipRange": "10.1.0.0/16"})).await;
    let mut agent = Agent::start(&api, "agent-0", Some(broker.token("edge").await));
    let addr = agent.listening(Duration::from_secs(20)).await.unwrap();
    let blue = wait_for("blue says the CRD is missing", 20, || {
        net(&api, "default", "blue")
            .filter(|o| reason(o, "Attachable").as_deref() == Some("NadCrdMissing"))
    })
    .await;
    assert!(blue["status"]["vni"].is_u64(), "{blue}");
    let mut w1 = node_watch(&api, addr, "w1").await;
    next_matching(&mut w1, "blue", |d| has_net(d, "blue")).await;
    let evs = wait_for("the event naming the CRD", 20, || {
        let evs = events_for(&api, "blue");
        evs.iter()
            .any(|(r, note)| {
                r == "NadCrdMissing"
                    && note.contains("NetworkAttachmentDefinition")
                    && note.contains("Multus")
            })
            .then_some(evs)
    })
    .await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(
        events_for(&api, "blue")
            .iter()
            .filter(|(r, _)| r == "NadCrdMissing")
            .count(),
        1,
        "said once: {evs:?}"
    );
    agent.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ready_waits_for_the_nodes_and_a_restart_repeats_no_event() {
    init();
    let broker = TestBroker::start().await;
    let api = FakeApi::new();
    seed_nodes(&api).await;
    for name in ["blue", "green", "red"] {
        create_net(&api, name, json!({})).await;
    }
    let js = broker.token("edge").await;
    let mut agent = Agent::start(&api, "agent-0", Some(js));
    let addr = agent.listening(Duration::from_secs(20)).await.unwrap();
    wait_for("blue configured", 20, || {
        net(&api, "default", "blue").filter(|o| o["status"]["vni"].is_u64())
    })
    .await;
    let blue = net(&api, "default", "blue").unwrap();
    assert_eq!(
        condition(&blue, "Ready").as_deref(),
        Some("False"),
        "no dataplane yet: {blue}"
    );
    assert_ne!(condition(&blue, "PeersConnected").as_deref(), Some("True"));

    // Both nodes connect; only once both report the networks are they Ready.
    let mut clients = Vec::new();
    for (i, node) in ["gw", "w1"].into_iter().enumerate() {
        let mut c = node_client(&api, addr).await;
        let watch = c
            .watch_desired(NodeHello {
                node_name: node.into(),
                public_key: vec![u8::try_from(i).unwrap() + 1; 32],
                listen_port: 51820,
                endpoints: vec![format!("127.0.0.{}:51820", i + 1)],
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner();
        clients.push((node, c, watch));
    }
    let report = |node: &str, nets: &[&str]| NodeStatus {
        node_name: node.into(),
        networks: nets
            .iter()
            .map(|n| NetworkStatus {
                name: (*n).into(),
                ..Default::default()
            })
            .collect(),
        ..Default::default()
    };
    let all = ["blue", "green", "red"];
    clients[0]
        .1
        .report_status(report("gw", &all))
        .await
        .unwrap();
    // gw applied everything, w1 nothing yet: Ready names w1 alone.
    wait_for("blue Applying on w1 only", 20, || {
        net(&api, "default", "blue").filter(|o| {
            reason(o, "Ready").as_deref() == Some("Applying")
                && o["status"]["conditions"][0]["message"] == "not yet applied on 1 of 2 nodes: w1"
        })
    })
    .await;
    clients[1]
        .1
        .report_status(report("w1", &all))
        .await
        .unwrap();
    for name in all {
        wait_for("Ready once both nodes applied", 20, || {
            net(&api, "default", name).filter(|o| condition(o, "Ready").as_deref() == Some("True"))
        })
        .await;
    }
    let events_before = wait_for("one Ready event per network", 20, || {
        let evs = api.all(EVENTS);
        (evs.iter().filter(|e| e["reason"] == "Ready").count() == 3).then_some(evs.len())
    })
    .await;

    // A restart: the status is unchanged, so nothing is written or said.
    drop(clients);
    agent.stop().await;
    let statuses_before: Vec<Value> = all
        .iter()
        .map(|n| net(&api, "default", n).unwrap()["status"].clone())
        .collect();
    let mut agent = Agent::start(&api, "agent-0", None);
    agent.listening(Duration::from_secs(20)).await.unwrap();
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(api.all(EVENTS).len(), events_before, "no event repeated");
    let statuses_after: Vec<Value> = all
        .iter()
        .map(|n| net(&api, "default", n).unwrap()["status"].clone())
        .collect();
    assert_eq!(
        statuses_after, statuses_before,
        "conditions keep their times"
    );
    agent.stop().await;
}
