//! `k8s::run` as a whole: the agent's Kubernetes mode against the stateful
//! fake API server (tests/support/fake_apiserver.rs) and a real broker
//! (the l2mesh-broker library, in-process on 127.0.0.1 port 0), with a
//! NodeSync client playing a node's dataplane.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use k8s_openapi::api::core::v1::Node;
use kube::Api;
use kube::api::{DeleteParams, PostParams};
use l2mesh_cluster_agent::crd::L2Network;
use l2mesh_cluster_agent::k8s::{self, KubeConfig};
use l2mesh_proto::join::JoinString;
use l2mesh_proto::node::node_sync_client::NodeSyncClient;
use l2mesh_proto::node::{DesiredState, NodeHello};
use serde_json::{Value, json};
use std::net::SocketAddr;
use std::time::{Duration, Instant};
use support::broker::TestBroker;
use support::fake_apiserver::FakeApi;
use tonic::transport::{Certificate, Channel, ClientTlsConfig};

const NS: &str = "l2mesh-system";
const NETS: &str = "apis/l2mesh.io/v1alpha1/l2networks";
const NADS: &str = "apis/k8s.cni.cncf.io/v1/network-attachment-definitions";
const SECRETS: &str = "api/v1/secrets";
const EVENTS: &str = "apis/events.k8s.io/v1/events";
const LEASES: &str = "apis/coordination.k8s.io/v1/leases";

fn init() {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let _ = tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("L2MESH_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .with_test_writer()
        .try_init();
}

/// A running `k8s::run`.
struct Agent {
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    task: tokio::task::JoinHandle<Result<(), k8s::KubeError>>,
    listening: tokio::sync::oneshot::Receiver<SocketAddr>,
}

impl Agent {
    fn start(api: &FakeApi, pod: &str, js: Option<JoinString>) -> Self {
        let (tx, listening) = tokio::sync::oneshot::channel();
        let (stop, rx) = tokio::sync::oneshot::channel::<()>();
        let config = KubeConfig {
            namespace: NS.into(),
            pod_name: pod.into(),
            join_string: js,
            metrics_listen: None,
            on_listening: Some(tx),
            gateway_timeout: Duration::from_secs(10),
        };
        let client = api.client_as(pod);
        let task = tokio::spawn(async move {
            k8s::run(client, config, "127.0.0.1:0", async move {
                let _ = rx.await;
            })
            .await
        });
        Self {
            stop: Some(stop),
            task,
            listening,
        }
    }

    async fn listening(&mut self, within: Duration) -> Option<SocketAddr> {
        tokio::time::timeout(within, &mut self.listening)
            .await
            .ok()
            .and_then(Result::ok)
    }

    async fn stop(mut self) {
        if let Some(tx) = self.stop.take() {
            let _ = tx.send(());
        }
        tokio::time::timeout(Duration::from_secs(10), self.task)
            .await
            .expect("the agent did not stop within 10 s")
            .unwrap()
            .expect("the agent stopped with an error");
    }
}

async fn wait_for<T>(what: &str, secs: u64, mut f: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + Duration::from_secs(secs);
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn seed_nodes(api: &FakeApi) {
    let nodes: Api<Node> = Api::all(api.client());
    for n in [
        json!({"apiVersion": "v1", "kind": "Node", "metadata": {"name": "gw",
            "labels": {"l2mesh.io/gateway": "true"},
            "annotations": {"l2mesh.io/endpoint": "192.0.2.1:51820"}}}),
        json!({"apiVersion": "v1", "kind": "Node", "metadata": {"name": "w1"}}),
    ] {
        let node: Node = serde_json::from_value(n).unwrap();
        nodes.create(&PostParams::default(), &node).await.unwrap();
    }
}

async fn create_net(api: &FakeApi, name: &str, spec: Value) {
    let nets: Api<L2Network> = Api::namespaced(api.client(), "default");
    let net: L2Network = serde_json::from_value(json!({
        "apiVersion": "l2mesh.io/v1alpha1", "kind": "L2Network",
        "metadata": {"name": name, "namespace": "default"}, "spec": spec,
    }))
    .unwrap();
    nets.create(&PostParams::default(), &net).await.unwrap();
}

async fn delete_net(api: &FakeApi, name: &str) {
    let nets: Api<L2Network> = Api::namespaced(api.client(), "default");
    nets.delete(name, &DeleteParams::default()).await.unwrap();
}

fn condition(obj: &Value, type_: &str) -> Option<String> {
    obj["status"]["conditions"]
        .as_array()?
        .iter()
        .find(|c| c["type"] == type_)
        .and_then(|c| c["status"].as_str().map(str::to_owned))
}

fn secret_value(api: &FakeApi, name: &str, key: &str) -> Option<String> {
    use base64::Engine as _;
    let s = api.get(SECRETS, NS, name)?;
    let b64 = s["data"][key].as_str()?;
    let bytes = base64::engine::general_purpose::STANDARD
        .decode(b64)
        .unwrap();
    Some(String::from_utf8(bytes).unwrap())
}

#[derive(Clone)]
struct Auth(tonic::metadata::MetadataValue<tonic::metadata::Ascii>);

impl tonic::service::Interceptor for Auth {
    fn call(&mut self, mut req: tonic::Request<()>) -> Result<tonic::Request<()>, tonic::Status> {
        req.metadata_mut().insert("authorization", self.0.clone());
        Ok(req)
    }
}

/// Watch desired state as node `node`, with what the node-sync Secret holds.
async fn node_watch(api: &FakeApi, addr: SocketAddr, node: &str) -> tonic::Streaming<DesiredState> {
    let ca = wait_for("node-sync ca.crt", 20, || {
        secret_value(api, "l2mesh-node-sync", "ca.crt")
    })
    .await;
    let token = secret_value(api, "l2mesh-node-sync", "token").expect("node-sync token");
    let channel = Channel::from_shared(format!("https://{addr}"))
        .unwrap()
        .tls_config(
            ClientTlsConfig::new()
                .ca_certificate(Certificate::from_pem(ca))
                .domain_name("l2mesh-agent"),
        )
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut client = NodeSyncClient::with_interceptor(
        channel,
        Auth(format!("Bearer {}", token.trim()).parse().unwrap()),
    );
    client
        .watch_desired(NodeHello {
            node_name: node.into(),
            public_key: vec![7; 32],
            listen_port: 51820,
            endpoints: vec!["192.0.2.2:51821".into()],
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
}

async fn next_matching(
    stream: &mut tonic::Streaming<DesiredState>,
    what: &str,
    pred: impl Fn(&DesiredState) -> bool,
) -> DesiredState {
    tokio::time::timeout(Duration::from_secs(20), async {
        loop {
            let d = stream.message().await.unwrap().expect("stream ended");
            if pred(&d) {
                return d;
            }
        }
    })
    .await
    .unwrap_or_else(|_| panic!("timed out waiting for a desired state with {what}"))
}

fn has_net(d: &DesiredState, name: &str) -> bool {
    d.networks.iter().any(|n| n.name == name)
}

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
    let blue = wait_for("blue Ready with a VNI", 20, || {
        api.get(NETS, "default", "blue")
            .filter(|o| condition(o, "Ready").as_deref() == Some("True"))
            .filter(|o| o["status"]["vni"].as_u64().is_some())
    })
    .await;
    assert_eq!(blue["metadata"]["finalizers"], json!(["l2mesh.io/cleanup"]));
    assert_eq!(blue["status"]["observedGeneration"], json!(1));
    let nad = api.get(NADS, "default", "blue").expect("a NAD for blue");
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
    let shared = wait_for("shared Admitted", 20, || {
        api.get(NETS, "default", "shared")
            .filter(|o| condition(o, "Admitted").as_deref() == Some("True"))
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

    let events = wait_for("Configured and Admitted events", 10, || {
        let evs = api.all(EVENTS);
        let has = |reason: &str, name: &str| {
            evs.iter()
                .any(|e| e["reason"] == reason && e["regarding"]["name"] == name)
        };
        (has("Configured", "blue") && has("Admitted", "shared")).then_some(evs)
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
    wait_for("green Ready after the restart", 20, || {
        api.get(NETS, "default", "green")
            .filter(|o| condition(o, "Ready").as_deref() == Some("True"))
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
    wait_for("blue Ready", 20, || {
        api.get(NETS, "default", "blue")
            .filter(|o| condition(o, "Ready").as_deref() == Some("True"))
    })
    .await;
    assert!(
        b.listening(Duration::from_secs(3)).await.is_none(),
        "b must not serve node sync while a holds the lease"
    );
    let lease = api.get(LEASES, NS, "l2mesh-agent").unwrap();
    assert_eq!(lease["spec"]["holderIdentity"], "agent-a");
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
    b.listening(Duration::from_secs(12))
        .await
        .expect("b leads once a released the lease");
    assert_eq!(
        api.get(LEASES, NS, "l2mesh-agent").unwrap()["spec"]["holderIdentity"],
        "agent-b"
    );
    create_net(&api, "red", json!({})).await;
    wait_for("red Ready under b", 20, || {
        api.get(NETS, "default", "red")
            .filter(|o| condition(o, "Ready").as_deref() == Some("True"))
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
