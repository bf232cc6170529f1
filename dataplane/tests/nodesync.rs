//! The real daemon driven by a (fake) cluster agent over NodeSync/TLS.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::{Node, Underlay, can_run, ping_ok};
use l2mesh_proto::node::node_sync_server::{NodeSync, NodeSyncServer};
use l2mesh_proto::node::{
    DesiredState, NetworkSpec, NodeHello, NodeIdentity, NodeStatus, PeerGroup, SyncAck,
};
use tokio_stream::Stream;
use tokio_stream::StreamExt as _;
use tonic::transport::{Identity, Server, ServerTlsConfig};
use tonic::{Request, Response, Status};

const BLUE: u32 = 100;

#[derive(Clone, Default)]
struct Agent {
    desired: Arc<Mutex<Option<DesiredState>>>,
    hellos: Arc<Mutex<Vec<NodeHello>>>,
    reports: Arc<Mutex<Vec<NodeStatus>>>,
}

#[tonic::async_trait]
impl NodeSync for Agent {
    type WatchDesiredStream = Pin<Box<dyn Stream<Item = Result<DesiredState, Status>> + Send>>;

    async fn watch_desired(
        &self,
        req: Request<NodeHello>,
    ) -> Result<Response<Self::WatchDesiredStream>, Status> {
        let auth = req
            .metadata()
            .get("authorization")
            .and_then(|v| v.to_str().ok());
        if auth != Some("Bearer node-token") {
            return Err(Status::unauthenticated("bad token"));
        }
        self.hellos.lock().unwrap().push(req.into_inner());
        let d = self.desired.lock().unwrap().clone().unwrap_or_default();
        // One state, then the watch stays open.
        let s = tokio_stream::iter(vec![Ok(d)]).chain(tokio_stream::pending());
        Ok(Response::new(Box::pin(s)))
    }

    async fn report_status(&self, req: Request<NodeStatus>) -> Result<Response<SyncAck>, Status> {
        let s = req.into_inner();
        let revision = s.applied_revision;
        self.reports.lock().unwrap().push(s);
        Ok(Response::new(SyncAck { revision }))
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn daemon_applies_state_from_the_agent_and_reports_back() {
    if !can_run(&["ping"]) {
        return;
    }
    let mut wire = Underlay::new();
    let b = Node::start("b", &mut wire, "100.64.0.2").await;

    let ck = rcgen::generate_simple_self_signed(vec!["l2mesh-agent".to_string()]).unwrap();
    let agent = Agent::default();
    *agent.desired.lock().unwrap() = Some(DesiredState {
        revision: 42,
        identity: Some(NodeIdentity {
            node_name: "a".into(),
            tunnel_ip: "100.64.0.1".into(),
            listen_port: 0,
        }),
        networks: vec![NetworkSpec {
            name: "blue".into(),
            vni: BLUE,
            mtu: 0,
            pod_cidr: String::new(),
        }],
        peers: vec![b.as_peer(PeerGroup::Local, &[BLUE])],
    });
    let server_agent = agent.clone();
    let (cert_pem, key_pem) = (ck.cert.pem(), ck.signing_key.serialize_pem());
    let a = Node::start_with("a", &mut wire, "100.64.0.1", |node| {
        // The agent listens on the loopback of A's namespace.
        let listener = common::listen_in(&node.ns, "127.0.0.1:0");
        let agent_addr = format!("https://{}", listener.local_addr().unwrap());
        listener.set_nonblocking(true).unwrap();
        let listener = tokio::net::TcpListener::from_std(listener).unwrap();
        let svc = NodeSyncServer::new(server_agent);
        tokio::spawn(async move {
            Server::builder()
                .tls_config(
                    ServerTlsConfig::new().identity(Identity::from_pem(&cert_pem, &key_pem)),
                )
                .unwrap()
                .add_service(svc)
                .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener))
                .await
                .unwrap();
        });
        let ca = node.dir.path().join("agent-ca.pem");
        std::fs::write(&ca, ck.cert.pem()).unwrap();
        let token = node.dir.path().join("token");
        std::fs::write(&token, "node-token\n").unwrap();
        vec![
            "--agent".into(),
            agent_addr,
            "--agent-ca".into(),
            ca.to_str().unwrap().into(),
            "--agent-token-file".into(),
            token.to_str().unwrap().into(),
            "--node-name".into(),
            "a".into(),
            "--endpoint".into(),
            "192.0.2.1:51820".into(),
        ]
    })
    .await;
    b.apply(
        &[("blue", BLUE)],
        vec![a.as_peer(PeerGroup::Local, &[BLUE])],
    )
    .await;

    // Wait until A applied what the agent sent.
    let deadline = Instant::now() + Duration::from_secs(20);
    while a.status().await.applied_revision != 42 {
        assert!(
            Instant::now() < deadline,
            "state from the agent never applied"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let pa = a.pod("pa", "blue", &["10.1.0.1/24"]).await;
    let _pb = b.pod("pb", "blue", &["10.1.0.2/24"]).await;
    assert!(
        ping_ok(&pa, "10.1.0.2", Duration::from_secs(15)),
        "forwarding with the agent's state"
    );

    let hello = agent.hellos.lock().unwrap()[0].clone();
    assert_eq!(hello.node_name, "a");
    assert_eq!(hello.public_key, a.public_key);
    assert_eq!(hello.endpoints, vec!["192.0.2.1:51820".to_string()]);
    let deadline = Instant::now() + Duration::from_secs(10);
    while !agent
        .reports
        .lock()
        .unwrap()
        .iter()
        .any(|r| r.applied_revision == 42)
    {
        assert!(
            Instant::now() < deadline,
            "no status report with revision 42"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}
