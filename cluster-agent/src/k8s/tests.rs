//! The Kubernetes edge against kube's mock API (tower-test), scenario by
//! scenario: each test plays the API server and checks every request.

use super::controller::{self, Context, FINALIZER, K8sStatusSink};
use super::{lease, secrets};
use crate::crd::L2Network;
use crate::desired::NodeEntry;
use crate::engine::{AllocStore, Shared};
use crate::ipam::Allocations;
use http::{Method, Request, Response, StatusCode};
use kube::Client;
use kube::client::Body;
use serde_json::{Value, json};
use std::sync::Arc;
use std::time::Duration;
use tower_test::mock::{Handle, pair};

type ApiHandle = Handle<Request<Body>, Response<Body>>;

fn mock() -> (Client, ApiHandle) {
    let (svc, handle) = pair::<Request<Body>, Response<Body>>();
    (Client::new(svc, "default"), handle)
}

/// Wait for the next request, check method and path, answer with `status` and `body`.
async fn expect(
    handle: &mut ApiHandle,
    method: Method,
    path: &str,
    status: StatusCode,
    body: Value,
) -> (String, Value) {
    let (req, send) = tokio::time::timeout(Duration::from_secs(5), handle.next_request())
        .await
        .unwrap_or_else(|_| panic!("no request; expected {method} {path}"))
        .expect("client gone");
    assert_eq!(req.method(), method, "for {}", req.uri());
    let uri = req.uri().to_string();
    assert!(uri.starts_with(path), "expected {path}, got {uri}");
    let bytes = req.into_body().collect_bytes().await.unwrap();
    let sent = if bytes.is_empty() {
        Value::Null
    } else {
        serde_json::from_slice(&bytes).unwrap()
    };
    send.send_response(
        Response::builder()
            .status(status)
            .body(Body::from(serde_json::to_vec(&body).unwrap()))
            .unwrap(),
    );
    (uri, sent)
}

fn not_found() -> Value {
    json!({"kind": "Status", "apiVersion": "v1", "status": "Failure", "reason": "NotFound", "code": 404, "message": "not found"})
}

fn net(extra_meta: Value) -> L2Network {
    let mut meta = json!({"name": "blue", "namespace": "default", "uid": "uid-1", "generation": 3, "resourceVersion": "7"});
    if let (Some(m), Some(e)) = (meta.as_object_mut(), extra_meta.as_object()) {
        m.extend(e.clone());
    }
    serde_json::from_value(json!({
        "apiVersion": "l2mesh.io/v1alpha1",
        "kind": "L2Network",
        "metadata": meta,
        "spec": {"ipRange": "10.1.0.0/16"},
    }))
    .unwrap()
}

#[derive(Debug)]
struct MemAllocs;

impl AllocStore for MemAllocs {
    fn load(&self) -> Result<Allocations, String> {
        Ok(Allocations::default())
    }
    fn save(&self, _: &Allocations, _: Option<&str>) -> crate::engine::SaveFuture {
        Box::pin(std::future::ready(Ok(())))
    }
}

#[derive(Debug)]
struct NoSink;

impl crate::engine::StatusSink for NoSink {
    fn write(&self, _: &L2Network, _: Option<&crate::crd::L2NetworkStatus>) {}
}

fn shared(sink: Box<dyn crate::engine::StatusSink>) -> Arc<Shared> {
    Arc::new(
        Shared::new(
            "100.64.1.0/24".parse().unwrap(),
            Box::new(MemAllocs),
            sink,
            true,
        )
        .unwrap(),
    )
}

const NETS: &str = "/apis/l2mesh.io/v1alpha1/namespaces/default/l2networks/blue";
const NADS: &str =
    "/apis/k8s.cni.cncf.io/v1/namespaces/default/network-attachment-definitions/blue";
const EVENTS: &str = "/apis/events.k8s.io/v1/namespaces/default/events";

#[tokio::test]
async fn finalizer_is_added_first() {
    let (client, mut api) = mock();
    let ctx = Arc::new(Context::new(client, shared(Box::new(NoSink))));
    let obj = net(json!({}));
    let task = tokio::spawn(controller::reconcile(Arc::new(obj.clone()), ctx.clone()));
    let with_finalizer = net(json!({"finalizers": [FINALIZER]}));
    let (_, patch) = expect(
        &mut api,
        Method::PATCH,
        NETS,
        StatusCode::OK,
        serde_json::to_value(&with_finalizer).unwrap(),
    )
    .await;
    let text = patch.to_string();
    assert!(
        text.contains("/metadata/finalizers") && text.contains(FINALIZER),
        "{text}"
    );
    task.await.unwrap().unwrap();
    let next = tokio::time::timeout(Duration::from_millis(200), api.next_request()).await;
    assert!(
        !matches!(next, Ok(Some(_))),
        "nothing is applied before the finalizer is in place"
    );
}

#[tokio::test]
async fn apply_creates_the_nad_once_the_network_list_is_in() {
    let (client, mut api) = mock();
    let ctx = Arc::new(Context::new(client, shared(Box::new(NoSink))));
    let obj = net(json!({"finalizers": [FINALIZER]}));
    // Before the engine has the complete list nothing is written.
    let action = controller::reconcile(Arc::new(obj.clone()), ctx.clone())
        .await
        .unwrap();
    assert_eq!(
        action,
        kube::runtime::controller::Action::requeue(Duration::from_secs(1))
    );
    ctx.shared.set_networks(vec![obj.clone()]);
    let task = tokio::spawn(controller::reconcile(Arc::new(obj), ctx.clone()));
    let (uri, nad) = expect(
        &mut api,
        Method::PATCH,
        NADS,
        StatusCode::OK,
        json!({
            "apiVersion": "k8s.cni.cncf.io/v1", "kind": "NetworkAttachmentDefinition",
            "metadata": {"name": "blue", "namespace": "default"}, "spec": {"config": "{}"}
        }),
    )
    .await;
    assert!(
        uri.contains("fieldManager=l2mesh-agent") && uri.contains("force=true"),
        "server-side apply: {uri}"
    );
    assert_eq!(nad["metadata"]["ownerReferences"][0]["uid"], "uid-1");
    let conf: Value = serde_json::from_str(nad["spec"]["config"].as_str().unwrap()).unwrap();
    assert_eq!(conf["type"], "l2mesh-cni");
    assert_eq!(conf["ipam"]["subnet"], "10.1.0.0/16");
    task.await.unwrap().unwrap();
    assert!(ctx.shared.nad_missing().is_none());
}

#[tokio::test]
async fn an_invalid_or_name_clashing_network_has_its_nad_removed() {
    let (client, mut api) = mock();
    let ctx = Arc::new(Context::new(client, shared(Box::new(NoSink))));
    let mut bad = net(json!({"finalizers": [FINALIZER]}));
    bad.spec.mtu = Some(100);
    ctx.shared.set_networks(vec![bad.clone()]);
    let task = tokio::spawn(controller::reconcile(Arc::new(bad), ctx.clone()));
    expect(
        &mut api,
        Method::DELETE,
        NADS,
        StatusCode::OK,
        json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Success"}),
    )
    .await;
    task.await.unwrap().unwrap();

    // A newer network with the same name on the nodes: no NAD for it.
    let older =
        net(json!({"finalizers": [FINALIZER], "creationTimestamp": "2026-01-01T00:00:00Z"}));
    let newer: L2Network = serde_json::from_value(json!({
        "apiVersion": "l2mesh.io/v1alpha1", "kind": "L2Network",
        "metadata": {"name": "blue", "namespace": "team", "uid": "uid-2",
            "creationTimestamp": "2026-02-01T00:00:00Z", "finalizers": [FINALIZER]},
        "spec": {"scope": "multiCluster", "brokerNetwork": "blue"},
    }))
    .unwrap();
    ctx.shared.set_networks(vec![newer.clone(), older]);
    let task = tokio::spawn(controller::reconcile(Arc::new(newer.clone()), ctx.clone()));
    expect(
        &mut api,
        Method::DELETE,
        "/apis/k8s.cni.cncf.io/v1/namespaces/team/network-attachment-definitions/blue",
        StatusCode::NOT_FOUND,
        not_found(),
    )
    .await;
    task.await.unwrap().unwrap();
}

#[tokio::test]
async fn a_missing_nad_crd_is_reported_once_and_not_an_error() {
    let (client, mut api) = mock();
    let ctx = Arc::new(Context::new(client, shared(Box::new(NoSink))));
    let obj = net(json!({"finalizers": [FINALIZER]}));
    ctx.shared.set_networks(vec![obj.clone()]);
    let task = tokio::spawn(controller::reconcile(Arc::new(obj), ctx.clone()));
    // What a real API server answers for a resource type it does not serve.
    let (req, send) = api.next_request().await.unwrap();
    assert!(req.uri().path().starts_with(NADS));
    send.send_response(
        Response::builder()
            .status(StatusCode::NOT_FOUND)
            .body(Body::from(b"404 page not found\n".to_vec()))
            .unwrap(),
    );
    let action = task.await.unwrap().expect("not a reconcile error");
    assert_eq!(
        action,
        kube::runtime::controller::Action::requeue(Duration::from_secs(60))
    );
    let why = ctx.shared.nad_missing().expect("the engine knows");
    assert!(
        why.contains("NetworkAttachmentDefinition") && why.contains("Multus"),
        "{why}"
    );
}

#[tokio::test]
async fn status_is_patched_from_the_engine() {
    let (client, mut api) = mock();
    let (sink, task) = K8sStatusSink::new(client);
    tokio::spawn(task);
    let shared = shared(Box::new(sink));
    shared.set_nodes(vec![NodeEntry {
        name: "n1".into(),
        gateway: false,
        endpoint: None,
    }]);
    shared.set_networks(vec![net(json!({"finalizers": [FINALIZER]}))]);
    shared.reconcile().await;
    let (uri, patch) = expect(
        &mut api,
        Method::PATCH,
        &format!("{NETS}/status"),
        StatusCode::OK,
        serde_json::to_value(net(json!({}))).unwrap(),
    )
    .await;
    assert!(uri.contains("/status"));
    let status = &patch["status"];
    assert_eq!(status["vni"], 1);
    assert_eq!(status["observedGeneration"], 3);
    let types: Vec<&str> = status["conditions"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["type"].as_str().unwrap())
        .collect();
    assert_eq!(types, vec!["Ready", "Admitted", "PeersConnected"]);
    assert_eq!(status["conditions"][0]["status"], "False");
    assert_eq!(status["conditions"][0]["reason"], "NoDataplane");
    // Unchanged inputs: no second patch.
    shared.reconcile().await;
    let next = tokio::time::timeout(Duration::from_millis(200), api.next_request()).await;
    assert!(
        !matches!(next, Ok(Some(_))),
        "unchanged status is not patched again"
    );
}

#[tokio::test]
async fn a_denied_multi_cluster_network_gets_its_status_and_a_warning_event() {
    let (client, mut api) = mock();
    let (sink, task) = K8sStatusSink::new(client);
    tokio::spawn(task);
    let shared = shared(Box::new(sink));
    shared.set_nodes(vec![NodeEntry {
        name: "n1".into(),
        gateway: true,
        endpoint: None,
    }]);
    let mut red = net(json!({"finalizers": [FINALIZER]}));
    red.spec.scope = crate::crd::Scope::MultiCluster;
    red.spec.ip_range = None;
    shared.set_networks(vec![red]);
    shared.set_admissions(vec![l2mesh_proto::broker::Admission {
        network: "blue".into(),
        state: l2mesh_proto::broker::AdmissionState::Denied.into(),
        reason: "cluster edge may not join blue".into(),
    }]);
    shared.reconcile().await;
    let (_, patch) = expect(
        &mut api,
        Method::PATCH,
        &format!("{NETS}/status"),
        StatusCode::OK,
        serde_json::to_value(net(json!({}))).unwrap(),
    )
    .await;
    let admitted = patch["status"]["conditions"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["type"] == "Admitted")
        .unwrap()
        .clone();
    assert_eq!(admitted["status"], "False");
    assert_eq!(admitted["message"], "cluster edge may not join blue");
    let (_, event) = expect(&mut api, Method::POST, EVENTS, StatusCode::CREATED, json!({
        "apiVersion": "events.k8s.io/v1", "kind": "Event", "metadata": {"name": "e3"}, "eventTime": null
    }))
    .await;
    assert_eq!(event["type"], "Warning");
    assert_eq!(event["reason"], "NotAdmitted");
    assert_eq!(event["note"], "cluster edge may not join blue");
}

#[tokio::test]
async fn deletion_removes_the_nad_the_intent_and_then_the_finalizer() {
    let (client, mut api) = mock();
    let ctx = Arc::new(Context::new(client, shared(Box::new(NoSink))));
    let obj = net(json!({"finalizers": [FINALIZER], "deletionTimestamp": "2026-01-01T00:00:00Z"}));
    let task = tokio::spawn(controller::reconcile(Arc::new(obj), ctx.clone()));
    // An already missing NAD is fine: cleanup is idempotent.
    expect(
        &mut api,
        Method::DELETE,
        NADS,
        StatusCode::NOT_FOUND,
        not_found(),
    )
    .await;
    let (_, event) = expect(&mut api, Method::POST, EVENTS, StatusCode::CREATED, json!({
        "apiVersion": "events.k8s.io/v1", "kind": "Event", "metadata": {"name": "e2"}, "eventTime": null
    }))
    .await;
    assert_eq!(event["reason"], "Deleted");
    let (_, patch) = expect(
        &mut api,
        Method::PATCH,
        NETS,
        StatusCode::OK,
        serde_json::to_value(net(json!({}))).unwrap(),
    )
    .await;
    let text = patch.to_string();
    assert!(
        text.contains("remove") && text.contains("/metadata/finalizers/0"),
        "{text}"
    );
    task.await.unwrap().unwrap();
}

#[tokio::test]
async fn a_failed_nad_delete_keeps_the_finalizer() {
    let (client, mut api) = mock();
    let ctx = Arc::new(Context::new(client, shared(Box::new(NoSink))));
    let obj = net(json!({"finalizers": [FINALIZER], "deletionTimestamp": "2026-01-01T00:00:00Z"}));
    let task = tokio::spawn(controller::reconcile(Arc::new(obj), ctx));
    expect(&mut api, Method::DELETE, NADS, StatusCode::FORBIDDEN, json!({
        "kind": "Status", "apiVersion": "v1", "status": "Failure", "reason": "Forbidden", "code": 403, "message": "no"
    }))
    .await;
    assert!(task.await.unwrap().is_err());
    let next = tokio::time::timeout(Duration::from_millis(200), api.next_request()).await;
    assert!(!matches!(next, Ok(Some(_))), "no finalizer removal");
}

#[tokio::test]
async fn lease_is_created_when_missing_and_respected_when_held() {
    let (client, mut api) = mock();
    let lock = lease::LeaseLock {
        api: kube::Api::namespaced(client, "l2mesh-system"),
        name: "l2mesh-agent".into(),
        me: "pod-a".into(),
        duration_secs: 15,
    };
    const LEASES: &str = "/apis/coordination.k8s.io/v1/namespaces/l2mesh-system/leases";
    let l2 = lock.clone();
    let task = tokio::spawn(async move { l2.try_acquire_or_renew().await });
    expect(
        &mut api,
        Method::GET,
        &format!("{LEASES}/l2mesh-agent"),
        StatusCode::NOT_FOUND,
        not_found(),
    )
    .await;
    let (_, created) = expect(&mut api, Method::POST, LEASES, StatusCode::CREATED, json!({
        "apiVersion": "coordination.k8s.io/v1", "kind": "Lease", "metadata": {"name": "l2mesh-agent"}
    }))
    .await;
    assert_eq!(created["spec"]["holderIdentity"], "pod-a");
    assert!(task.await.unwrap().unwrap());

    let l2 = lock.clone();
    let task = tokio::spawn(async move { l2.try_acquire_or_renew().await });
    let now = k8s_openapi::jiff::Timestamp::now();
    expect(&mut api, Method::GET, &format!("{LEASES}/l2mesh-agent"), StatusCode::OK, json!({
        "apiVersion": "coordination.k8s.io/v1", "kind": "Lease",
        "metadata": {"name": "l2mesh-agent", "resourceVersion": "5"},
        "spec": {"holderIdentity": "pod-b", "leaseDurationSeconds": 15, "renewTime": now.to_string()}
    }))
    .await;
    assert!(
        !task.await.unwrap().unwrap(),
        "a fresh lease of another replica is not taken"
    );
}

#[tokio::test]
async fn identity_goes_into_a_secret_and_comes_back() {
    let (client, mut api) = mock();
    let secrets_api: kube::Api<k8s_openapi::api::core::v1::Secret> =
        kube::Api::namespaced(client, "l2mesh-system");
    let id = crate::identity::Identity {
        cluster: "edge".into(),
        brokers: vec!["192.0.2.1:7443".into()],
        ca_pin: l2mesh_proto::join::JoinString::format_pin(&[2; 32]),
        tunnel_subnet: "100.64.1.0/24".into(),
        cert_pem: "cert".into(),
        key_pem: "key".into(),
        ca_pem: "ca".into(),
    };
    const SECRETS: &str = "/api/v1/namespaces/l2mesh-system/secrets";
    let (a, i) = (secrets_api.clone(), id.clone());
    let task = tokio::spawn(async move { secrets::store_identity(&a, &i).await });
    expect(
        &mut api,
        Method::GET,
        &format!("{SECRETS}/l2mesh-agent-identity"),
        StatusCode::NOT_FOUND,
        not_found(),
    )
    .await;
    let (_, created) = expect(
        &mut api,
        Method::POST,
        SECRETS,
        StatusCode::CREATED,
        json!({
            "apiVersion": "v1", "kind": "Secret", "metadata": {"name": "l2mesh-agent-identity"}
        }),
    )
    .await;
    task.await.unwrap().unwrap();
    assert_eq!(created["metadata"]["name"], "l2mesh-agent-identity");
    let stored = created["data"]["identity.json"].clone();
    assert!(stored.is_string());

    let a = secrets_api.clone();
    let task = tokio::spawn(async move { secrets::load_identity(&a).await });
    expect(
        &mut api,
        Method::GET,
        &format!("{SECRETS}/l2mesh-agent-identity"),
        StatusCode::OK,
        json!({
            "apiVersion": "v1", "kind": "Secret", "metadata": {"name": "l2mesh-agent-identity"},
            "data": {"identity.json": stored}
        }),
    )
    .await;
    assert_eq!(task.await.unwrap().unwrap(), Some(id));
}

#[test]
fn nodes_become_gateways_by_label_with_endpoint_annotation() {
    let node: k8s_openapi::api::core::v1::Node = serde_json::from_value(json!({
        "metadata": {"name": "n1", "labels": {"l2mesh.io/gateway": "true"}, "annotations": {"l2mesh.io/endpoint": "192.0.2.7:51820"}}
    }))
    .unwrap();
    let e = super::node_entry(&node);
    assert!(e.gateway);
    assert_eq!(e.endpoint.as_deref(), Some("192.0.2.7:51820"));
    let plain: k8s_openapi::api::core::v1::Node =
        serde_json::from_value(json!({"metadata": {"name": "n2"}})).unwrap();
    assert!(!super::node_entry(&plain).gateway);
}
