//! `k8s::run` as a whole: the agent's Kubernetes mode against the stateful
//! fake API server (tests/support/fake_apiserver.rs) and a real broker
//! (the l2mesh-broker library, in-process on 127.0.0.1 port 0), with a
//! NodeSync client playing a node's dataplane.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use k8s_openapi::api::core::v1::Node;
use kube::Api;
use kube::api::{DeleteParams, PostParams};
use l2mesh_cluster_agent::k8s;
use l2mesh_proto::join::JoinString;
use serde_json::{Value, json};
use std::time::{Duration, Instant};
use support::broker::TestBroker;
use support::fake_apiserver::FakeApi;
use support::k8s_agent::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn run_end_to_end_against_the_fake_api_and_a_real_broker() {
    init();
    let broker = TestBroker::start().await;
    let shared_net = broker.network("shared", &["edge"]).await;
    let api = FakeApi::new();
    seed_nodes(&api).await;
    create_net(&api, "blue", json!({"ipRange": "10.1.0.0/16"})).await;
    create_net(&api, "shared", json!({"scope": "multiCluster"})).await;

    let mut agent = Agent::start(&api, "agent-0", Some(broker.token("edge").await));
    let addr = agent
        .listening(Duration::from_secs(20))
        .await
        .expect("the only replica leads and serves node sync");

    // Finalizer, NAD, status and events for the local network.
    let blue = wait_for("blue with a VNI", 20, || {
        api.get(NETS, "default", "blue")
            .filter(|o| o["status"]["vni"].as_u64().is_some())
    })
    .await;
    assert_eq!(blue["metadata"]["finalizers"], json!(["l2mesh.io/cleanup"]));
    assert_eq!(blue["status"]["observedGeneration"], json!(1));
    let nad = wait_for("a NAD for blue", 20, || api.get(NADS, "default", "blue")).await;
    let conf: Value = serde_json::from_str(nad["spec"]["config"].as_str().unwrap()).unwrap();
    assert_eq!(conf["type"], "l2mesh-cni");
    assert_eq!(conf["ipam"]["subnet"], "10.1.0.0/16");
    assert_eq!(
        nad["metadata"]["ownerReferences"][0]["uid"],
        blue["metadata"]["uid"]
    );

    // NAD upkeep: a NAD deleted behind the agent's back comes back.
    let nads: Api<k8s::nad::NetworkAttachmentDefinition> = Api::namespaced(api.client(), "default");
    nads.delete("blue", &DeleteParams::default()).await.unwrap();
    wait_for("the NAD recreated", 20, || api.get(NADS, "default", "blue")).await;

    // The multi-cluster network: admitted by the real broker, its VNI.
    // The admission and the view that carries the VNI may land in two
    // status writes; wait for both.
    let shared = wait_for("shared Admitted with its VNI", 20, || {
        api.get(NETS, "default", "shared").filter(|o| {
            condition(o, "Admitted").as_deref() == Some("True") && !o["status"]["vni"].is_null()
        })
    })
    .await;
    assert_eq!(shared["status"]["vni"], json!(shared_net.vni));
    assert_eq!(broker.members("shared").await, vec!["edge".to_owned()]);
    // Its spec names no range: the NAD takes the broker's, so pods get
    // addresses from l2mesh IPAM with the whole network's prefix.
    assert_eq!(shared["status"]["ipRange"], "10.20.0.0/16");
    wait_for("the shared NAD with the broker's range", 20, || {
        let nad = api.get(NADS, "default", "shared")?;
        let conf: Value = serde_json::from_str(nad["spec"]["config"].as_str()?).ok()?;
        (conf["ipam"]["subnet"] == "10.20.0.0/16").then_some(())
    })
    .await;

    let events = wait_for("the Admitted event", 10, || {
        let evs = api.all(EVENTS);
        let has = |reason: &str, name: &str| {
            evs.iter()
                .any(|e| e["reason"] == reason && e["regarding"]["name"] == name)
        };
        has("Admitted", "shared").then_some(evs)
    })
    .await;
    assert!(
        events
            .iter()
            .all(|e| e["reportingController"] == "l2mesh-agent")
    );

    // The identity and the node-sync credentials are in Secrets.
    let identity = secret_value(&api, "l2mesh-agent-identity", "identity.json")
        .expect("identity stored in the Secret");
    assert!(identity.contains("\"cluster\":\"edge\""), "{identity}");

    // A node gets both networks; the gateway would get the remote peers.
    let mut w1 = node_watch(&api, addr, "w1").await;
    let d = next_matching(&mut w1, "blue and shared", |d| {
        has_net(d, "blue") && has_net(d, "shared")
    })
    .await;
    assert_eq!(
        d.networks.iter().find(|n| n.name == "shared").unwrap().vni,
        shared_net.vni
    );

    // Deletion: the nodes and the broker forget the networks, then the
    // finalizer goes and with it the objects.
    delete_net(&api, "blue").await;
    delete_net(&api, "shared").await;
    next_matching(&mut w1, "neither network", |d| {
        !has_net(d, "blue") && !has_net(d, "shared")
    })
    .await;
    wait_for("both L2Networks and the NAD gone", 20, || {
        (api.get(NETS, "default", "blue").is_none()
            && api.get(NETS, "default", "shared").is_none()
            && api.get(NADS, "default", "blue").is_none())
        .then_some(())
    })
    .await;
    let deadline = Instant::now() + Duration::from_secs(20);
    while !broker.members("shared").await.is_empty() {
        assert!(
            Instant::now() < deadline,
            "the broker still lists edge in shared"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let evs = api.all(EVENTS);
    assert!(
        evs.iter()
            .any(|e| e["reason"] == "Deleted" && e["regarding"]["name"] == "blue"),
        "a Deleted event"
    );
    // Shutdown ends the node's watch instead of waiting for it.
    agent.stop().await;
    let ended = tokio::time::timeout(Duration::from_secs(5), async {
        while let Ok(Some(_)) = w1.message().await {}
    })
    .await;
    assert!(ended.is_ok(), "the watch ends with the agent");

    // A restart joins with the stored identity: no join string (the token
    // was single-use anyway), same identity afterwards.
    let mut agent = Agent::start(&api, "agent-0", None);
    agent
        .listening(Duration::from_secs(20))
        .await
        .expect("the restarted agent leads again");
    create_net(&api, "green", json!({})).await;
    wait_for("green configured after the restart", 20, || {
        api.get(NETS, "default", "green")
            .filter(|o| o["status"]["vni"].as_u64().is_some())
    })
    .await;
    assert_eq!(
        secret_value(&api, "l2mesh-agent-identity", "identity.json").as_deref(),
        Some(identity.as_str()),
        "the identity is reused, not replaced"
    );
    agent.stop().await;
    assert!(
        api.unhandled().is_empty(),
        "unhandled requests: {:?}",
        api.unhandled()
    );
    // Everything the agent asked stays within deploy/agent-rbac.yaml.
    support::rbac::assert_allowed_by_shipped_rbac(&api.requests(), "agent-", NS);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_the_lease_holder_acts_and_a_standby_takes_over_on_release() {
    init();
    let broker = TestBroker::start().await;
    let api = FakeApi::new();
    seed_nodes(&api).await;
    let js = broker.token("edge").await;
    let mut a = Agent::start(&api, "agent-a", Some(js.clone()));
    a.listening(Duration::from_secs(20)).await.expect("a leads");
    let mut b = Agent::start(&api, "agent-b", Some(js));
    create_net(&api, "blue", json!({})).await;
    wait_for("blue configured", 20, || {
        api.get(NETS, "default", "blue")
            .filter(|o| o["status"]["vni"].as_u64().is_some())
    })
    .await;
    assert!(
        b.listening(Duration::from_secs(3)).await.is_none(),
        "b must not serve node sync while a holds the lease"
    );
    let lease = api.get(LEASES, NS, "l2mesh-agent").unwrap();
    assert_eq!(lease["spec"]["holderIdentity"], "agent-a");
    wait_for("a labelled as the node-sync leader", 10, || {
        (leader_label(&api, "agent-a").as_deref() == Some("leader")).then_some(())
    })
    .await;
    assert_eq!(
        leader_label(&api, "agent-b"),
        None,
        "the standby is not selected"
    );
    let by_b: Vec<String> = api
        .requests()
        .into_iter()
        .filter(|r| r.starts_with("agent-b "))
        .collect();
    assert!(!by_b.is_empty(), "b tries for the lease");
    assert!(
        by_b.iter().all(|r| r.contains("/leases")),
        "the standby only looks at the lease: {by_b:?}"
    );

    // a stops and releases the lease: b takes over without waiting for it
    // to run out, with the identity a stored (the token was single-use).
    a.stop().await;
    let lease = api.get(LEASES, NS, "l2mesh-agent").unwrap();
    assert!(lease["spec"]["holderIdentity"].is_null(), "{lease}");
    assert_eq!(
        leader_label(&api, "agent-a"),
        None,
        "a stopped serving and dropped the label"
    );
    b.listening(Duration::from_secs(12))
        .await
        .expect("b leads once a released the lease");
    wait_for("b labelled as the node-sync leader", 10, || {
        (leader_label(&api, "agent-b").as_deref() == Some("leader")).then_some(())
    })
    .await;
    assert_eq!(
        api.get(LEASES, NS, "l2mesh-agent").unwrap()["spec"]["holderIdentity"],
        "agent-b"
    );
    create_net(&api, "red", json!({})).await;
    wait_for("red configured under b", 20, || {
        api.get(NETS, "default", "red")
            .filter(|o| o["status"]["vni"].as_u64().is_some())
    })
    .await;
    assert!(
        api.requests()
            .iter()
            .any(|r| r.starts_with("agent-b PATCH") && r.contains("/l2networks/red")),
        "b acts once it leads"
    );
    b.stop().await;
    assert!(
        api.unhandled().is_empty(),
        "unhandled requests: {:?}",
        api.unhandled()
    );
    // Leader and standby alike stay within deploy/agent-rbac.yaml.
    support::rbac::assert_allowed_by_shipped_rbac(&api.requests(), "agent-", NS);
}

fn leader_label(api: &FakeApi, pod: &str) -> Option<String> {
    api.get("api/v1/pods", NS, pod)?["metadata"]["labels"]["l2mesh.io/node-sync"]
        .as_str()
        .map(str::to_owned)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_leader_that_cannot_renew_stops_serving_before_the_lease_runs_out() {
    init();
    let broker = TestBroker::start().await;
    let api = FakeApi::new();
    seed_nodes(&api).await;
    create_net(&api, "blue", json!({})).await;
    let mut agent = Agent::start(&api, "agent-a", Some(broker.token("edge").await));
    let addr = agent.listening(Duration::from_secs(20)).await.unwrap();
    let mut w1 = node_watch(&api, addr, "w1").await;
    next_matching(&mut w1, "blue", |d| has_net(d, "blue")).await;
    wait_for("labelled leader", 10, || leader_label(&api, "agent-a")).await;
    // The API server refuses lease writes from now on.
    api.fail_writes(LEASES, true);
    let cut = Instant::now();
    let ended = tokio::time::timeout(Duration::from_secs(14), async {
        while let Ok(Some(_)) = w1.message().await {}
    })
    .await;
    assert!(
        ended.is_ok(),
        "the node watch ends within the renew deadline"
    );
    let after = cut.elapsed();
    assert!(
        after < k8s::LEASE_DURATION,
        "stopped serving after {after:?}, before the lease ran out"
    );
    let result = tokio::time::timeout(Duration::from_secs(10), agent.task)
        .await
        .expect("run ends")
        .unwrap();
    assert!(
        matches!(result, Err(k8s::KubeError::LostLease)),
        "{result:?}"
    );
    assert_eq!(leader_label(&api, "agent-a"), None, "the label is gone");
    api.fail_writes(LEASES, false);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_join_string_for_another_broker_ends_run_with_a_final_error() {
    init();
    let broker = TestBroker::start().await;
    let api = FakeApi::new();
    let mut js = broker.token("edge").await;
    js.ca = JoinString::format_pin(&[7; 32]);
    let agent = Agent::start(&api, "agent-0", Some(js));
    let result = tokio::time::timeout(Duration::from_secs(20), agent.task)
        .await
        .expect("a final join error ends run, not a retry loop")
        .unwrap();
    let err = result.expect_err("run fails").to_string();
    assert!(err.contains("get a fresh join string"), "{err}");
    assert!(
        secret_value(&api, "l2mesh-agent-identity", "identity.json").is_none(),
        "nothing stored"
    );
    let lease = api.get(LEASES, NS, "l2mesh-agent").unwrap();
    assert!(
        lease["spec"]["holderIdentity"].is_null(),
        "the lease is given back: {lease}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_lease_is_renewed_while_the_join_waits_for_an_unreachable_broker() {
    init();
    let api = FakeApi::new();
    // Nothing listens there: the join is retried with backoff.
    let addr = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let js = JoinString {
        brokers: vec![addr.to_string()],
        ca: JoinString::format_pin(&[7; 32]),
        id: "t".into(),
        secret: "s".into(),
        cluster: "edge".into(),
    };
    let agent = Agent::start(&api, "agent-0", Some(js));
    let renewed = || {
        api.get(LEASES, NS, "l2mesh-agent")
            .and_then(|l| l["spec"]["renewTime"].as_str().map(str::to_owned))
    };
    let first = wait_for("the lease taken", 10, renewed).await;
    wait_for("the lease renewed during the join", 15, || {
        renewed().filter(|t| *t != first)
    })
    .await;
    assert!(!agent.task.is_finished(), "still joining");
    agent.stop().await;
}

/// The fake itself: the API server behaviour the tests above rely on.
#[tokio::test]
async fn the_fake_api_server_keeps_the_semantics_the_agent_relies_on() {
    use futures::StreamExt as _;
    use k8s_openapi::api::core::v1::ConfigMap;
    use kube::api::{Patch, PatchParams, WatchEvent, WatchParams};
    let api = FakeApi::new();
    let cms: Api<ConfigMap> = Api::namespaced(api.client(), "default");
    let cm: ConfigMap = serde_json::from_value(json!({
        "apiVersion": "v1", "kind": "ConfigMap",
        "metadata": {"name": "c", "finalizers": ["x/y"]}, "data": {"k": "1"},
    }))
    .unwrap();
    let created = cms.create(&PostParams::default(), &cm).await.unwrap();
    let rv0 = created.metadata.resource_version.clone().unwrap();
    let err = cms.create(&PostParams::default(), &cm).await.unwrap_err();
    assert!(
        matches!(err, kube::Error::Api(ref s) if s.code == 409),
        "{err}"
    );

    // A write with a stale resourceVersion is a conflict.
    let mut stale = created.clone();
    stale.data = Some([("k".to_owned(), "2".to_owned())].into());
    cms.replace("c", &PostParams::default(), &stale)
        .await
        .unwrap();
    let err = cms
        .replace("c", &PostParams::default(), &stale)
        .await
        .unwrap_err();
    assert!(
        matches!(err, kube::Error::Api(ref s) if s.code == 409),
        "{err}"
    );

    // Delete with a finalizer only marks; removing the finalizer deletes.
    cms.delete("c", &DeleteParams::default()).await.unwrap();
    let marked = cms.get("c").await.unwrap();
    assert!(marked.metadata.deletion_timestamp.is_some());
    cms.patch(
        "c",
        &PatchParams::default(),
        &Patch::Merge(json!({"metadata": {"finalizers": null}})),
    )
    .await
    .unwrap();
    assert!(cms.get_opt("c").await.unwrap().is_none());

    // A watch from the first version replays what happened since.
    let events: Vec<String> = cms
        .watch(&WatchParams::default(), &rv0)
        .await
        .unwrap()
        .take(3)
        .map(|e| match e.unwrap() {
            WatchEvent::Added(_) => "ADDED".to_owned(),
            WatchEvent::Modified(_) => "MODIFIED".to_owned(),
            WatchEvent::Deleted(_) => "DELETED".to_owned(),
            other => format!("{other:?}"),
        })
        .collect()
        .await;
    assert_eq!(events, ["MODIFIED", "MODIFIED", "DELETED"]);
    assert!(api.unhandled().is_empty(), "{:?}", api.unhandled());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kubernetes_mode_fails_over_to_a_standby_gateway_and_stores_it() {
    init();
    let broker = TestBroker::start().await;
    let api = FakeApi::new();
    seed_nodes(&api).await;
    let gw2: Node = serde_json::from_value(json!({"apiVersion": "v1", "kind": "Node",
        "metadata": {"name": "gw2", "labels": {"l2mesh.io/gateway": "true"}}}))
    .unwrap();
    Api::<Node>::all(api.client())
        .create(&PostParams::default(), &gw2)
        .await
        .unwrap();
    let mut agent = Agent::start(&api, "agent-0", Some(broker.token("edge").await));
    let addr = agent.listening(Duration::from_secs(20)).await.unwrap();
    let active = || secret_value(&api, "l2mesh-agent-identity", "active-gateway");
    let broker_gateways = || async {
        let list = broker
            .admin()
            .await
            .list_clusters(l2mesh_proto::broker::ListClustersRequest::default())
            .await
            .unwrap()
            .into_inner();
        list.clusters
            .iter()
            .find(|c| c.name == "edge")
            .map(|c| {
                c.gateways
                    .iter()
                    .map(|g| g.node.clone())
                    .collect::<Vec<_>>()
            })
            .unwrap_or_default()
    };

    let gw = node_watch(&api, addr, "gw").await;
    wait_for("gw active", 20, || active().filter(|g| g == "gw")).await;
    let _gw2 = node_watch(&api, addr, "gw2").await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(active().as_deref(), Some("gw"), "the role is sticky");

    drop(gw);
    wait_for("gw2 takes over", 20, || active().filter(|g| g == "gw2")).await;
    let deadline = Instant::now() + Duration::from_secs(20);
    while broker_gateways().await != ["gw2"] {
        assert!(Instant::now() < deadline, "the broker never heard of gw2");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    agent.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kubernetes_mode_runs_without_a_broker_on_a_tunnel_subnet() {
    init();
    let api = FakeApi::new();
    seed_nodes(&api).await;
    create_net(&api, "blue", json!({"ipRange": "10.1.0.0/16"})).await;
    create_net(&api, "shared", json!({"scope": "multiCluster"})).await;
    // Neither identity nor join string nor subnet: a clear error.
    let lost = Agent::start(&api, "agent-0", None);
    let err = tokio::time::timeout(Duration::from_secs(20), lost.task)
        .await
        .expect("ends")
        .unwrap()
        .expect_err("nothing to run with")
        .to_string();
    assert!(err.contains("--tunnel-subnet"), "{err}");

    let mut agent = Agent::start_with(&api, "agent-0", None, Some("100.127.0.0/24"));
    let addr = agent.listening(Duration::from_secs(20)).await.unwrap();
    let mut w1 = node_watch(&api, addr, "w1").await;
    let d = next_matching(&mut w1, "blue", |d| has_net(d, "blue")).await;
    assert!(!has_net(&d, "shared"), "multi-cluster networks wait");
    let ip = d.identity.unwrap().tunnel_ip;
    assert!(ip.starts_with("100.127.0."), "{ip}");
    let shared = wait_for("shared pending without a broker", 20, || {
        api.get(NETS, "default", "shared").filter(|o| {
            o["status"]["conditions"].as_array().is_some_and(|cs| {
                cs.iter().any(|c| {
                    c["type"] == "Admitted"
                        && c["message"]
                            .as_str()
                            .is_some_and(|m| m.contains("without a broker"))
                })
            })
        })
    })
    .await;
    assert!(shared["status"].get("vni").is_none());
    assert!(
        secret_value(&api, "l2mesh-agent-identity", "identity.json").is_none(),
        "no identity is made up"
    );
    agent.stop().await;
}
