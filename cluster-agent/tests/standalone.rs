//! Standalone mode end to end: the real `l2mesh-agent` binary against a
//! test-local `Broker` gRPC server (TLS with a CA the join string pins) and
//! node-sync clients that speak as node dataplanes. Loopback only, port 0.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use l2mesh_proto::broker::broker_server::{Broker, BrokerServer};
use l2mesh_proto::broker::{
    Admission, AdmissionState, ClusterView, GatewayReport, JoinRequest, JoinResponse,
    LinkHealthReport, NetworkRequest, NetworkRequestResult, PeerGateway, ReportAck, ViewNetwork,
    WatchRequest,
};
use l2mesh_proto::join::JoinString;
use l2mesh_proto::node::node_sync_client::NodeSyncClient;
use l2mesh_proto::node::{DesiredState, NodeHello, NodeStatus, PeerGroup};
use rcgen::{BasicConstraints, CertificateParams, CertifiedIssuer, IsCa, KeyPair};
use sha2::Digest as _;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio_stream::Stream;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Identity, ServerTlsConfig};
use tonic::{Request, Response, Status};

#[derive(Default)]
struct Seen {
    joins: usize,
    gateways: Vec<GatewayReport>,
    mtls_reports: usize,
    requests: Vec<NetworkRequest>,
}

struct FakeBroker {
    ca: CertifiedIssuer<'static, KeyPair>,
    seen: Arc<Mutex<Seen>>,
}

fn view() -> ClusterView {
    ClusterView {
        revision: 1,
        cluster_name: "edge".into(),
        tunnel_subnet: "100.64.7.0/24".into(),
        networks: vec![ViewNetwork {
            name: "shared".into(),
            vni: 4100,
            mtu: 1380,
            cidr: "10.50.0.0/16".into(),
            cluster_cidr: "10.50.16.0/20".into(),
            peers: vec![PeerGateway {
                cluster: "cloud".into(),
                node: "gw".into(),
                public_key: vec![9; 32],
                endpoints: vec!["127.0.0.1:40000".into()],
                tunnel_ip: "100.64.8.1".into(),
            }],
            members: vec!["cloud".into(), "edge".into()],
        }],
        admissions: vec![],
    }
}

#[tonic::async_trait]
impl Broker for FakeBroker {
    async fn join(&self, req: Request<JoinRequest>) -> Result<Response<JoinResponse>, Status> {
        let req = req.into_inner();
        if req.token_secret != "good-secret" || req.cluster_name != "edge" {
            return Err(Status::unauthenticated("token is not valid"));
        }
        let csr = rcgen::CertificateSigningRequestParams::from_pem(&req.csr_pem)
            .map_err(|e| Status::invalid_argument(e.to_string()))?;
        let cert = csr
            .signed_by(&self.ca)
            .map_err(|e| Status::internal(e.to_string()))?;
        self.seen.lock().unwrap().joins += 1;
        Ok(Response::new(JoinResponse {
            cluster_name: "edge".into(),
            client_cert_pem: cert.pem(),
            ca_cert_pem: self.ca.pem(),
            tunnel_subnet: "100.64.7.0/24".into(),
        }))
    }
    async fn report_gateways(
        &self,
        req: Request<GatewayReport>,
    ) -> Result<Response<ReportAck>, Status> {
        let mtls = req.peer_certs().is_some_and(|c| !c.is_empty());
        let mut seen = self.seen.lock().unwrap();
        if mtls {
            seen.mtls_reports += 1;
        }
        seen.gateways.push(req.into_inner());
        Ok(Response::new(ReportAck { revision: 1 }))
    }
    async fn request_networks(
        &self,
        req: Request<NetworkRequest>,
    ) -> Result<Response<NetworkRequestResult>, Status> {
        let req = req.into_inner();
        let admissions = req
            .networks
            .iter()
            .map(|n| Admission {
                network: n.clone(),
                state: if n == "shared" {
                    AdmissionState::Admitted
                } else {
                    AdmissionState::Denied
                }
                .into(),
                reason: if n == "shared" {
                    String::new()
                } else {
                    format!("cluster edge is not allowed on network {n}")
                },
            })
            .collect();
        self.seen.lock().unwrap().requests.push(req);
        Ok(Response::new(NetworkRequestResult { admissions }))
    }
    async fn report_link_health(
        &self,
        _: Request<LinkHealthReport>,
    ) -> Result<Response<ReportAck>, Status> {
        Ok(Response::new(ReportAck { revision: 1 }))
    }
    type WatchStream = Pin<Box<dyn Stream<Item = Result<ClusterView, Status>> + Send>>;
    async fn watch(&self, _: Request<WatchRequest>) -> Result<Response<Self::WatchStream>, Status> {
        use tokio_stream::StreamExt as _;
        let s = tokio_stream::iter(vec![Ok(view())]).chain(tokio_stream::pending());
        Ok(Response::new(Box::pin(s)))
    }
}

/// Starts the fake broker; returns its join string (pinning its CA) and what it saw.
async fn start_broker(secret: &str) -> (String, Arc<Mutex<Seen>>) {
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    let ca = CertifiedIssuer::self_signed(ca_params, KeyPair::generate().unwrap()).unwrap();
    let key = KeyPair::generate().unwrap();
    let cert = CertificateParams::new(vec!["l2mesh-broker".to_owned()])
        .unwrap()
        .signed_by(&key, &ca)
        .unwrap();
    let pin: [u8; 32] = sha2::Sha256::digest(ca.der().as_ref()).into();
    let tls = ServerTlsConfig::new()
        .identity(Identity::from_pem(
            format!("{}{}", cert.pem(), ca.pem()),
            key.serialize_pem(),
        ))
        .client_ca_root(Certificate::from_pem(ca.pem()))
        .client_auth_optional(true);
    let seen = Arc::new(Mutex::new(Seen::default()));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let svc = FakeBroker {
        ca,
        seen: seen.clone(),
    };
    tokio::spawn(
        tonic::transport::Server::builder()
            .tls_config(tls)
            .unwrap()
            .add_service(BrokerServer::new(svc))
            .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener)),
    );
    let js = JoinString {
        brokers: vec![addr.to_string()],
        ca: JoinString::format_pin(&pin),
        id: "tok-1".into(),
        secret: secret.into(),
        cluster: "edge".into(),
    };
    (js.encode(), seen)
}

/// The agent process, killed on drop.
struct Agent(Child);

impl Drop for Agent {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn spawn_agent(manifests: &Path, state: &Path, join: Option<&str>) -> Agent {
    spawn_agent_env(manifests, state, join, &[])
}

fn spawn_agent_env(
    manifests: &Path,
    state: &Path,
    join: Option<&str>,
    env: &[(&str, &str)],
) -> Agent {
    let _ = std::fs::remove_file(state.join("node-sync/listen-addr"));
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_l2mesh-agent"));
    cmd.args([
        "standalone",
        "--node-sync-listen",
        "127.0.0.1:0",
        "--poll-ms",
        "100",
    ])
    .arg("--manifests")
    .arg(manifests)
    .arg("--state-dir")
    .arg(state)
    .env("L2MESH_LOG", "info")
    .stdout(Stdio::null())
    .stderr(Stdio::inherit());
    if let Some(j) = join {
        cmd.arg("--join-string").arg(j);
    }
    cmd.envs(env.iter().copied());
    Agent(cmd.spawn().unwrap())
}

async fn wait_for<T>(what: &str, mut f: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[derive(Clone)]
struct Auth(tonic::metadata::MetadataValue<tonic::metadata::Ascii>);

impl tonic::service::Interceptor for Auth {
    fn call(&mut self, mut req: Request<()>) -> Result<Request<()>, Status> {
        req.metadata_mut().insert("authorization", self.0.clone());
        Ok(req)
    }
}

type Client = NodeSyncClient<tonic::service::interceptor::InterceptedService<Channel, Auth>>;

async fn node_client(state: &Path, token: Option<&str>) -> Client {
    let addr = wait_for("the node sync address", || {
        std::fs::read_to_string(state.join("node-sync/listen-addr")).ok()
    })
    .await;
    let ca = std::fs::read_to_string(state.join("node-sync/ca.crt")).unwrap();
    let token = token.map_or_else(
        || std::fs::read_to_string(state.join("node-sync/token")).unwrap(),
        str::to_owned,
    );
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
    let header = format!("Bearer {}", token.trim()).parse().unwrap();
    NodeSyncClient::with_interceptor(channel, Auth(header))
}

/// Next desired state from a watch that satisfies `pred`.
async fn next_matching(
    stream: &mut tonic::Streaming<DesiredState>,
    what: &str,
    pred: impl Fn(&DesiredState) -> bool,
) -> DesiredState {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    loop {
        let msg = tokio::time::timeout_at(deadline, stream.message())
            .await
            .unwrap_or_else(|_| panic!("timed out waiting for {what}"))
            .unwrap()
            .unwrap_or_else(|| panic!("stream ended waiting for {what}"));
        if pred(&msg) {
            return msg;
        }
    }
}

fn has_net(d: &DesiredState, name: &str) -> bool {
    d.networks.iter().any(|n| n.name == name)
}

fn hello(node: &str, key: u8) -> NodeHello {
    NodeHello {
        node_name: node.into(),
        public_key: vec![key; 32],
        listen_port: 51820,
        endpoints: vec![format!("127.0.0.{key}:51820")],
        last_revision: 0,
    }
}

const NODES: &str = "apiVersion: l2mesh.io/v1alpha1\nkind: Nodes\nnodes:\n  - {name: gw, gateway: true, endpoint: '127.0.0.1:51820'}\n  - {name: w1}\n";
const NETS: &str = "apiVersion: l2mesh.io/v1alpha1\nkind: L2Network\nmetadata: {name: blue}\nspec: {ipRange: 10.1.0.0/16}\n---\napiVersion: l2mesh.io/v1alpha1\nkind: L2Network\nmetadata: {name: shared}\nspec: {scope: multiCluster}\n---\napiVersion: l2mesh.io/v1alpha1\nkind: L2Network\nmetadata: {name: secret}\nspec: {scope: multiCluster}\n";

fn status_file(state: &Path, name: &str) -> PathBuf {
    state.join("status").join(format!("default.{name}.yaml"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn standalone_agent_joins_serves_nodes_writes_status_and_restarts_without_token() {
    let (join, seen) = start_broker("good-secret").await;
    let dir = tempfile::tempdir().unwrap();
    let manifests = dir.path().join("manifests");
    let state = dir.path().join("state");
    std::fs::create_dir_all(&manifests).unwrap();
    std::fs::write(manifests.join("nodes.yaml"), NODES).unwrap();
    std::fs::write(manifests.join("networks.yaml"), NETS).unwrap();

    let agent = spawn_agent(&manifests, &state, Some(&join));
    let mut gw = node_client(&state, None).await;
    let mut gw_watch = gw.watch_desired(hello("gw", 1)).await.unwrap().into_inner();
    let d = next_matching(
        &mut gw_watch,
        "gw with both networks and the remote gateway",
        |d| {
            has_net(d, "blue")
                && has_net(d, "shared")
                && d.peers.iter().any(|p| p.group() == PeerGroup::Remote)
        },
    )
    .await;
    let id = d.identity.clone().unwrap();
    assert_eq!(id.node_name, "gw");
    assert!(id.tunnel_ip.starts_with("100.64.7."), "{id:?}");
    assert!(!has_net(&d, "secret"), "a denied network is not installed");
    let shared = d.networks.iter().find(|n| n.name == "shared").unwrap();
    assert_eq!((shared.vni, shared.mtu), (4100, 1380));
    assert!(shared.pod_cidr.starts_with("10.50."), "{shared:?}");
    let remote = d.peers.iter().find(|p| p.name == "cloud/gw").unwrap();
    assert_eq!(remote.vnis, vec![4100]);

    // A second node appears: the gateway gets it as a local peer.
    let mut w1 = node_client(&state, None).await;
    let mut w1_watch = w1.watch_desired(hello("w1", 2)).await.unwrap().into_inner();
    let dw = next_matching(&mut w1_watch, "w1 state with gw", |d| !d.peers.is_empty()).await;
    assert!(
        dw.peers.iter().all(|p| p.group() == PeerGroup::Local),
        "workers never get remote peers"
    );
    assert_eq!(
        dw.peers[0].endpoint, "127.0.0.1:51820",
        "the Nodes endpoint wins"
    );
    let d = next_matching(&mut gw_watch, "gw with w1", |d| {
        d.peers.iter().any(|p| p.name == "w1")
    })
    .await;
    let local = d.peers.iter().find(|p| p.name == "w1").unwrap();
    assert_eq!(local.endpoint, "127.0.0.2:51820");
    assert!(d.revision > 0);
    let ack = w1
        .report_status(NodeStatus {
            node_name: "w1".into(),
            applied_revision: dw.revision,
            ..NodeStatus::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert!(ack.revision >= dw.revision);

    // Authentication and membership.
    let mut bad = node_client(&state, Some("wrong-token")).await;
    let e = bad.watch_desired(hello("gw", 1)).await.unwrap_err();
    assert_eq!(e.code(), tonic::Code::Unauthenticated);
    let mut bad_endpoint = hello("w1", 2);
    bad_endpoint.endpoints = vec!["not-an-address".into()];
    let e = w1.watch_desired(bad_endpoint).await.unwrap_err();
    assert_eq!(e.code(), tonic::Code::InvalidArgument);
    let e = w1.watch_desired(hello("stranger", 3)).await.unwrap_err();
    assert_eq!(e.code(), tonic::Code::PermissionDenied);
    assert!(e.message().contains("Nodes manifest"));

    // The broker saw the gateway over mTLS, and the denial reaches the status file.
    wait_for("gateway report", || {
        let s = seen.lock().unwrap();
        s.gateways
            .iter()
            .any(|g| {
                g.gateways
                    .iter()
                    .any(|x| x.node == "gw" && x.public_key == vec![1; 32])
            })
            .then_some(())
    })
    .await;
    assert!(
        seen.lock().unwrap().mtls_reports > 0,
        "reports must use the cluster certificate"
    );
    let secret = wait_for("denied status", || {
        std::fs::read_to_string(status_file(&state, "secret"))
            .ok()
            .filter(|t| t.contains("Denied"))
    })
    .await;
    assert!(
        secret.contains("cluster edge is not allowed on network secret"),
        "{secret}"
    );
    let blue = wait_for("blue status", || {
        std::fs::read_to_string(status_file(&state, "blue")).ok()
    })
    .await;
    assert!(
        blue.contains("vni: 1") && blue.contains("LocalScope"),
        "{blue}"
    );

    // Intent changes are picked up; a broken manifest changes nothing.
    std::fs::write(manifests.join("broken.yaml"), "kind: [").unwrap();
    tokio::time::sleep(Duration::from_millis(400)).await;
    std::fs::remove_file(manifests.join("broken.yaml")).unwrap();
    std::fs::write(
        manifests.join("networks.yaml"),
        NETS.replace("name: blue", "name: green"),
    )
    .unwrap();
    let d = next_matching(&mut gw_watch, "blue replaced by green", |d| {
        has_net(d, "green") && !has_net(d, "blue")
    })
    .await;
    assert_eq!(
        d.networks.iter().find(|n| n.name == "green").unwrap().vni,
        2,
        "released VNIs are not reused at once"
    );
    wait_for("blue status removed", || {
        (!status_file(&state, "blue").exists()).then_some(())
    })
    .await;

    // Restart: no token needed, same identity, same node-sync CA.
    drop(agent);
    let ca_before = std::fs::read_to_string(state.join("node-sync/ca.crt")).unwrap();
    let _agent = spawn_agent(&manifests, &state, None);
    let mut gw = node_client(&state, None).await;
    let mut gw_watch = gw.watch_desired(hello("gw", 1)).await.unwrap().into_inner();
    let d2 = next_matching(&mut gw_watch, "state after restart", |d| {
        has_net(d, "shared")
    })
    .await;
    assert_eq!(
        d2.identity.unwrap().tunnel_ip,
        id.tunnel_ip,
        "tunnel IPs survive restarts"
    );
    assert!(d2.revision > d.revision, "revisions grow across restarts");
    assert_eq!(
        std::fs::read_to_string(state.join("node-sync/ca.crt")).unwrap(),
        ca_before
    );
    assert_eq!(seen.lock().unwrap().joins, 1, "the token is used once");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rejected_token_is_a_clear_error_and_changes_nothing() {
    let (join, seen) = start_broker("another-secret-than-expected").await;
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("nodes.yaml"), NODES).unwrap();
    let state = dir.path().join("state");
    let out = Command::new(env!("CARGO_BIN_EXE_l2mesh-agent"))
        .args([
            "standalone",
            "--node-sync-listen",
            "127.0.0.1:0",
            "--metrics-listen",
            "",
            "--join-string",
            &join,
        ])
        .arg("--manifests")
        .arg(dir.path())
        .arg("--state-dir")
        .arg(&state)
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("rejected the join") && err.contains("token create"),
        "{err}"
    );
    assert!(!state.join("identity.json").exists());
    assert_eq!(seen.lock().unwrap().joins, 0);

    let out = Command::new(env!("CARGO_BIN_EXE_l2mesh-agent"))
        .args([
            "standalone",
            "--node-sync-listen",
            "127.0.0.1:0",
            "--metrics-listen",
            "",
            "--join-string",
            "garbage",
        ])
        .arg("--manifests")
        .arg(dir.path())
        .arg("--state-dir")
        .arg(&state)
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("l2mesh1."));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_a_broker_local_networks_work_and_multi_cluster_ones_wait() {
    let dir = tempfile::tempdir().unwrap();
    let manifests = dir.path().join("manifests");
    let state = dir.path().join("state");
    std::fs::create_dir_all(&manifests).unwrap();
    std::fs::write(manifests.join("all.yaml"), format!("{NODES}---\n{NETS}")).unwrap();
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_l2mesh-agent"));
    cmd.args([
        "standalone",
        "--node-sync-listen",
        "127.0.0.1:0",
        "--metrics-listen",
        "",
    ])
    .args(["--tunnel-subnet", "100.127.0.0/24", "--poll-ms", "100"])
    .arg("--manifests")
    .arg(&manifests)
    .arg("--state-dir")
    .arg(&state)
    .stdout(Stdio::null());
    let _agent = Agent(cmd.spawn().unwrap());
    let mut w1 = node_client(&state, None).await;
    let mut watch = w1.watch_desired(hello("w1", 2)).await.unwrap().into_inner();
    let d = next_matching(&mut watch, "local network", |d| has_net(d, "blue")).await;
    assert!(!has_net(&d, "shared"));
    assert!(d.identity.unwrap().tunnel_ip.starts_with("100.127.0."));
    let shared = wait_for("pending status", || {
        std::fs::read_to_string(status_file(&state, "shared"))
            .ok()
            .filter(|t| t.contains("without a broker"))
    })
    .await;
    assert!(shared.contains("Pending"), "{shared}");
}

/// A node that says hello and then reports its status every 200 ms while
/// `reporting` is set; dropping it closes its watch.
struct FakeNode {
    watch: tonic::Streaming<DesiredState>,
    reporting: Arc<std::sync::atomic::AtomicBool>,
    task: tokio::task::JoinHandle<()>,
}

impl FakeNode {
    async fn start(state: &Path, name: &'static str, key: u8) -> Self {
        let mut client = node_client(state, None).await;
        let watch = client
            .watch_desired(hello(name, key))
            .await
            .unwrap()
            .into_inner();
        let reporting = Arc::new(std::sync::atomic::AtomicBool::new(true));
        let on = reporting.clone();
        let task = tokio::spawn(async move {
            loop {
                if on.load(std::sync::atomic::Ordering::Relaxed) {
                    let _ = client
                        .report_status(NodeStatus {
                            node_name: name.into(),
                            public_key: vec![key; 32],
                            ..NodeStatus::default()
                        })
                        .await;
                }
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        });
        Self {
            watch,
            reporting,
            task,
        }
    }

    fn set_reporting(&self, on: bool) {
        self.reporting
            .store(on, std::sync::atomic::Ordering::Relaxed);
    }
}

impl Drop for FakeNode {
    fn drop(&mut self) {
        self.task.abort();
    }
}

fn remote_peers(d: &DesiredState) -> usize {
    d.peers
        .iter()
        .filter(|p| p.group() == PeerGroup::Remote)
        .count()
}

/// The newest desired state: `last`, or whatever came after it.
async fn latest(
    stream: &mut tonic::Streaming<DesiredState>,
    mut last: DesiredState,
) -> DesiredState {
    while let Ok(Ok(Some(d))) =
        tokio::time::timeout(Duration::from_millis(300), stream.message()).await
    {
        last = d;
    }
    last
}

const TWO_GATEWAYS: &str = "apiVersion: l2mesh.io/v1alpha1\nkind: Nodes\nnodes:\n  - {name: gw-a, gateway: true}\n  - {name: gw-b, gateway: true}\n";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_standby_gateway_takes_over_from_a_dead_one_and_keeps_the_role() {
    let (join, seen) = start_broker("good-secret").await;
    let dir = tempfile::tempdir().unwrap();
    let manifests = dir.path().join("manifests");
    let state = dir.path().join("state");
    std::fs::create_dir_all(&manifests).unwrap();
    std::fs::write(manifests.join("nodes.yaml"), TWO_GATEWAYS).unwrap();
    std::fs::write(manifests.join("networks.yaml"), NETS).unwrap();
    let _agent = spawn_agent_env(
        &manifests,
        &state,
        Some(&join),
        &[("L2MESH_GATEWAY_TIMEOUT_SECS", "3")],
    );
    let last_reported = || {
        seen.lock()
            .unwrap()
            .gateways
            .last()
            .and_then(|r| r.gateways.first().map(|g| g.node.clone()))
    };

    let mut a = FakeNode::start(&state, "gw-a", 1).await;
    next_matching(&mut a.watch, "gw-a active", |d| remote_peers(d) > 0).await;
    let mut b = FakeNode::start(&state, "gw-b", 2).await;
    let d = next_matching(&mut b.watch, "gw-b's first state", |d| has_net(d, "shared")).await;
    assert_eq!(remote_peers(&d), 0, "one active gateway per cluster");
    wait_for("gw-a reported to the broker", || {
        (last_reported().as_deref() == Some("gw-a")).then_some(())
    })
    .await;

    // gw-a goes silent with its watch still open: after the timeout (3 s)
    // gw-b carries the remote tunnels and is the one the broker hears of.
    a.set_reporting(false);
    let silent = Instant::now();
    let d = next_matching(&mut b.watch, "gw-b takes over", |d| remote_peers(d) > 0).await;
    let took = silent.elapsed();
    assert!(
        took >= Duration::from_secs(2) && took < Duration::from_secs(8),
        "took {took:?} for a 3 s timeout"
    );
    next_matching(&mut a.watch, "gw-a stands down", |d| remote_peers(d) == 0).await;
    wait_for("gw-b reported to the broker", || {
        (last_reported().as_deref() == Some("gw-b")).then_some(())
    })
    .await;

    // gw-a is back: no hand back.
    a.set_reporting(true);
    tokio::time::sleep(Duration::from_secs(4)).await;
    let d = latest(&mut b.watch, d).await;
    assert!(remote_peers(&d) > 0, "gw-b keeps the role");
    assert_eq!(last_reported().as_deref(), Some("gw-b"));

    // gw-b's dataplane dies (watch closed): gw-a takes over at once, well
    // before the silence timeout.
    drop(b);
    let closed = Instant::now();
    next_matching(&mut a.watch, "gw-a takes over again", |d| {
        remote_peers(d) > 0
    })
    .await;
    assert!(
        closed.elapsed() < Duration::from_secs(2),
        "a closed stream is noticed at once, took {:?}",
        closed.elapsed()
    );
}
