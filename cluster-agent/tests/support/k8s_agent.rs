//! Running `k8s::run` in tests: the agent against the fake API server,
//! node-sync clients playing the nodes' dataplanes, and small waits.
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)]

use super::fake_apiserver::FakeApi;
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
use tonic::transport::{Certificate, Channel, ClientTlsConfig};

pub const NS: &str = "l2mesh-system";
pub const NETS: &str = "apis/l2mesh.io/v1alpha1/l2networks";
pub const NADS: &str = "apis/k8s.cni.cncf.io/v1/network-attachment-definitions";
pub const SECRETS: &str = "api/v1/secrets";
pub const EVENTS: &str = "apis/events.k8s.io/v1/events";
pub const LEASES: &str = "apis/coordination.k8s.io/v1/leases";

pub fn init() {
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
pub struct Agent {
    pub stop: Option<tokio::sync::oneshot::Sender<()>>,
    pub task: tokio::task::JoinHandle<Result<(), k8s::KubeError>>,
    pub listening: tokio::sync::oneshot::Receiver<SocketAddr>,
}

impl Agent {
    pub fn start(api: &FakeApi, pod: &str, js: Option<JoinString>) -> Self {
        Self::start_with(api, pod, js, None)
    }

    /// `tunnel_subnet`: run without a broker when there is no identity.
    pub fn start_with(
        api: &FakeApi,
        pod: &str,
        js: Option<JoinString>,
        tunnel_subnet: Option<&str>,
    ) -> Self {
        let (tx, listening) = tokio::sync::oneshot::channel();
        let (stop, rx) = tokio::sync::oneshot::channel::<()>();
        let config = KubeConfig {
            namespace: NS.into(),
            pod_name: pod.into(),
            join_string: js,
            metrics_listen: None,
            on_listening: Some(tx),
            gateway_timeout: Duration::from_secs(10),
            tunnel_subnet: tunnel_subnet.map(|s| s.parse().unwrap()),
        };
        let client = api.client_as(pod);
        let pods: Api<k8s_openapi::api::core::v1::Pod> = Api::namespaced(api.client(), NS);
        let pod_object: k8s_openapi::api::core::v1::Pod = serde_json::from_value(
            json!({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": pod, "namespace": NS}}),
        )
        .unwrap();
        let task = tokio::spawn(async move {
            // The replica's own pod, which it labels while it leads.
            let _ = pods.create(&PostParams::default(), &pod_object).await;
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

    pub async fn listening(&mut self, within: Duration) -> Option<SocketAddr> {
        tokio::time::timeout(within, &mut self.listening)
            .await
            .ok()
            .and_then(Result::ok)
    }

    /// Like `kill -9`: everything stops at once, nothing is released.
    pub async fn kill(self) {
        self.task.abort();
        let _ = self.task.await;
    }

    pub async fn stop(mut self) {
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

pub async fn wait_for<T>(what: &str, secs: u64, mut f: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + Duration::from_secs(secs);
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

pub async fn seed_nodes(api: &FakeApi) {
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

pub async fn create_net(api: &FakeApi, name: &str, spec: Value) {
    let nets: Api<L2Network> = Api::namespaced(api.client(), "default");
    let net: L2Network = serde_json::from_value(json!({
        "apiVersion": "l2mesh.io/v1alpha1", "kind": "L2Network",
        "metadata": {"name": name, "namespace": "default"}, "spec": spec,
    }))
    .unwrap();
    nets.create(&PostParams::default(), &net).await.unwrap();
}

pub async fn delete_net(api: &FakeApi, name: &str) {
    let nets: Api<L2Network> = Api::namespaced(api.client(), "default");
    nets.delete(name, &DeleteParams::default()).await.unwrap();
}

pub fn condition(obj: &Value, type_: &str) -> Option<String> {
    obj["status"]["conditions"]
        .as_array()?
        .iter()
        .find(|c| c["type"] == type_)
        .and_then(|c| c["status"].as_str().map(str::to_owned))
}

pub fn secret_value(api: &FakeApi, name: &str, key: &str) -> Option<String> {
    use base64::Engine as _;
    let s = api.get(SECRETS, NS, name)?;
    let b64 = s["data"][key].as_str()?;
    let bytes = base64::engine::general_purpose::STANDARD
        .decode(b64)
        .unwrap();
    Some(String::from_utf8(bytes).unwrap())
}

#[derive(Clone)]
pub struct Auth(tonic::metadata::MetadataValue<tonic::metadata::Ascii>);

impl tonic::service::Interceptor for Auth {
    fn call(&mut self, mut req: tonic::Request<()>) -> Result<tonic::Request<()>, tonic::Status> {
        req.metadata_mut().insert("authorization", self.0.clone());
        Ok(req)
    }
}

/// Watch desired state as node `node`, with what the node-sync Secret holds.
/// A node-sync client with what the node-sync Secret holds.
pub async fn node_client(
    api: &FakeApi,
    addr: SocketAddr,
) -> NodeSyncClient<tonic::service::interceptor::InterceptedService<Channel, Auth>> {
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
    NodeSyncClient::with_interceptor(
        channel,
        Auth(format!("Bearer {}", token.trim()).parse().unwrap()),
    )
}

pub async fn node_watch(
    api: &FakeApi,
    addr: SocketAddr,
    node: &str,
) -> tonic::Streaming<DesiredState> {
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

pub async fn next_matching(
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

pub fn has_net(d: &DesiredState, name: &str) -> bool {
    d.networks.iter().any(|n| n.name == name)
}
