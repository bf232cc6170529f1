//! The real `l2mesh-agent` binary in standalone mode, a test-local `Broker`
//! gRPC server (TLS with a CA the join string pins) and node-sync clients
//! that speak as node dataplanes. Loopback only, port 0.
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)]

use l2mesh_proto::broker::broker_server::{Broker, BrokerServer};
use l2mesh_proto::broker::{
    Admission, AdmissionState, ClusterView, GatewayReport, JoinRequest, JoinResponse,
    LinkHealthReport, NetworkRequest, NetworkRequestResult, PeerGateway, ReportAck, ViewNetwork,
    WatchRequest,
};
use l2mesh_proto::join::JoinString;
use l2mesh_proto::node::node_sync_client::NodeSyncClient;
use l2mesh_proto::node::{DesiredState, NodeHello};
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
pub struct Seen {
    pub joins: usize,
    pub gateways: Vec<GatewayReport>,
    pub mtls_reports: usize,
    pub requests: Vec<NetworkRequest>,
    /// Watch streams opened (a new one means the agent reconnected).
    pub watches: usize,
    /// Gateway reports still to answer UNAVAILABLE, as a broker whose
    /// store lost quorum does.
    pub unavailable_reports: usize,
}

pub struct FakeBroker {
    ca: CertifiedIssuer<'static, KeyPair>,
    seen: Arc<Mutex<Seen>>,
}

pub fn view() -> ClusterView {
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
        delta: None,
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
        if seen.unavailable_reports > 0 {
            seen.unavailable_reports -= 1;
            return Err(Status::unavailable(
                "the broker's store (etcd) has no quorum: retry later",
            ));
        }
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
    async fn renew_certificate(
        &self,
        _: Request<l2mesh_proto::broker::RenewRequest>,
    ) -> Result<Response<l2mesh_proto::broker::RenewResponse>, Status> {
        Err(Status::unimplemented("not in this fake"))
    }
    type WatchStream = Pin<Box<dyn Stream<Item = Result<ClusterView, Status>> + Send>>;
    async fn watch(&self, _: Request<WatchRequest>) -> Result<Response<Self::WatchStream>, Status> {
        use tokio_stream::StreamExt as _;
        self.seen.lock().unwrap().watches += 1;
        let s = tokio_stream::iter(vec![Ok(view())]).chain(tokio_stream::pending());
        Ok(Response::new(Box::pin(s)))
    }
}

/// Starts the fake broker; returns its join string (pinning its CA) and what it saw.
pub async fn start_broker(secret: &str) -> (String, Arc<Mutex<Seen>>) {
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
pub struct Agent(pub Child);

impl Drop for Agent {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// The agent binary in standalone mode on loopback: node sync on port 0,
/// no metrics server (its default port is fixed), the given manifests and
/// state dir. Callers add what their test needs.
pub fn agent_command(manifests: &Path, state: &Path) -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_l2mesh-agent"));
    cmd.args([
        "standalone",
        "--node-sync-listen",
        "127.0.0.1:0",
        "--metrics-listen",
        "",
    ])
    .arg("--manifests")
    .arg(manifests)
    .arg("--state-dir")
    .arg(state)
    .env("L2MESH_LOG", "info");
    cmd
}

/// The agent without a broker: local networks only, tunnel IPs from
/// 100.127.0.0/24.
pub fn spawn_brokerless_agent(manifests: &Path, state: &Path) -> Agent {
    let mut cmd = agent_command(manifests, state);
    cmd.args(["--tunnel-subnet", "100.127.0.0/24", "--poll-ms", "100"])
        .stdout(Stdio::null());
    Agent(cmd.spawn().unwrap())
}

pub fn spawn_agent(manifests: &Path, state: &Path, join: Option<&str>) -> Agent {
    spawn_agent_env(manifests, state, join, &[])
}

pub fn spawn_agent_env(
    manifests: &Path,
    state: &Path,
    join: Option<&str>,
    env: &[(&str, &str)],
) -> Agent {
    let _ = std::fs::remove_file(state.join("node-sync/listen-addr"));
    let mut cmd = agent_command(manifests, state);
    cmd.args(["--poll-ms", "100"])
        .stdout(Stdio::null())
        .stderr(Stdio::inherit());
    if let Some(j) = join {
        cmd.arg("--join-string").arg(j);
    }
    cmd.envs(env.iter().copied());
    Agent(cmd.spawn().unwrap())
}

pub async fn wait_for<T>(what: &str, mut f: impl FnMut() -> Option<T>) -> T {
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
pub struct Auth(pub tonic::metadata::MetadataValue<tonic::metadata::Ascii>);

impl tonic::service::Interceptor for Auth {
    fn call(&mut self, mut req: Request<()>) -> Result<Request<()>, Status> {
        req.metadata_mut().insert("authorization", self.0.clone());
        Ok(req)
    }
}

pub type Client = NodeSyncClient<tonic::service::interceptor::InterceptedService<Channel, Auth>>;

pub async fn node_client(state: &Path, token: Option<&str>) -> Client {
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
pub async fn next_matching(
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

pub fn has_net(d: &DesiredState, name: &str) -> bool {
    d.networks.iter().any(|n| n.name == name)
}

pub fn hello(node: &str, key: u8) -> NodeHello {
    NodeHello {
        node_name: node.into(),
        public_key: vec![key; 32],
        listen_port: 51820,
        endpoints: vec![format!("127.0.0.{key}:51820")],
        last_revision: 0,
    }
}

pub const NODES: &str = "apiVersion: l2mesh.io/v1alpha1\nkind: Nodes\nnodes:\n  - {name: gw, gateway: true, endpoint: '127.0.0.1:51820'}\n  - {name: w1}\n";
pub const NETS: &str = "apiVersion: l2mesh.io/v1alpha1\nkind: L2Network\nmetadata: {name: blue}\nspec: {ipRange: 10.1.0.0/16}\n---\napiVersion: l2mesh.io/v1alpha1\nkind: L2Network\nmetadata: {name: shared}\nspec: {scope: multiCluster}\n---\napiVersion: l2mesh.io/v1alpha1\nkind: L2Network\nmetadata: {name: secret}\nspec: {scope: multiCluster}\n";

pub fn status_file(state: &Path, name: &str) -> PathBuf {
    state.join("status").join(format!("default.{name}.yaml"))
}
