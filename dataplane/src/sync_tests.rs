use super::*;
use std::pin::Pin;
use std::sync::Mutex;

use l2mesh_proto::node::SyncAck;
use l2mesh_proto::node::node_sync_server::{NodeSync, NodeSyncServer};
use tokio_stream::{Stream, StreamExt as _};
use tonic::transport::{Identity, Server, ServerTlsConfig};
use tonic::{Request, Response, Status};

#[derive(Default)]
struct Seen {
    hellos: Vec<NodeHello>,
    reports: Vec<u64>,
    report_keys: Vec<Vec<u8>>,
}

#[derive(Clone, Default)]
struct Agent {
    seen: Arc<Mutex<Seen>>,
    /// Keep the watch open after the states instead of ending it.
    hold_open: bool,
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
        if auth != Some("Bearer s3cret") {
            return Err(Status::unauthenticated("bad token"));
        }
        self.seen.lock().unwrap().hellos.push(req.into_inner());
        // Two revisions, then the stream ends: the client must reconnect.
        let states = (1..=2).map(|revision| {
            Ok(DesiredState {
                revision,
                ..Default::default()
            })
        });
        let states = tokio_stream::iter(states.collect::<Vec<_>>());
        if self.hold_open {
            Ok(Response::new(Box::pin(
                states.chain(tokio_stream::pending()),
            )))
        } else {
            Ok(Response::new(Box::pin(states)))
        }
    }

    async fn report_status(&self, req: Request<NodeStatus>) -> Result<Response<SyncAck>, Status> {
        let status = req.into_inner();
        let rev = status.applied_revision;
        let mut seen = self.seen.lock().unwrap();
        seen.reports.push(rev);
        seen.report_keys.push(status.public_key);
        Ok(Response::new(SyncAck { revision: rev }))
    }
}

#[derive(Clone, Default)]
struct Fake {
    applied: Arc<Mutex<Vec<u64>>>,
    rotated_key: Arc<Mutex<Option<[u8; 32]>>>,
}

impl Fake {
    fn key(&self) -> [u8; 32] {
        self.rotated_key.lock().unwrap().unwrap_or([7; 32])
    }
}

impl Applier for Fake {
    fn apply(&self, d: DesiredState) -> impl Future<Output = Result<ApplyResult, Error>> + Send {
        self.applied.lock().unwrap().push(d.revision);
        async move {
            Ok(ApplyResult {
                applied_revision: d.revision,
                changes: vec![],
            })
        }
    }

    fn status(&self) -> impl Future<Output = Result<NodeStatus, Error>> + Send {
        let rev = self.applied.lock().unwrap().last().copied().unwrap_or(0);
        let key = self.key();
        async move {
            Ok(NodeStatus {
                public_key: key.to_vec(),
                listen_port: 1234,
                applied_revision: rev,
                ..Default::default()
            })
        }
    }

    fn public_key(&self) -> [u8; 32] {
        self.key()
    }
}

async fn start_agent() -> (Agent, String, Vec<u8>) {
    start_agent_with(Agent::default()).await
}

async fn start_agent_with(agent: Agent) -> (Agent, String, Vec<u8>) {
    let ck = rcgen::generate_simple_self_signed(vec![AGENT_SERVER_NAME.to_string()]).unwrap();
    let (cert, key) = (ck.cert.pem(), ck.signing_key.serialize_pem());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let svc = NodeSyncServer::new(agent.clone());
    tokio::spawn(async move {
        Server::builder()
            .tls_config(ServerTlsConfig::new().identity(Identity::from_pem(&cert, &key)))
            .unwrap()
            .add_service(svc)
            .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener))
            .await
            .unwrap();
    });
    (agent, format!("https://{addr}"), ck.cert.pem().into_bytes())
}

/// Options whose CA and token files live in `dir`.
fn opts_in(dir: &std::path::Path, agent: String, ca: &[u8], token: &str) -> SyncOptions {
    std::fs::write(dir.join("ca.crt"), ca).unwrap();
    std::fs::write(dir.join("token"), format!("{token}\n")).unwrap();
    SyncOptions {
        agent,
        ca_file: dir.join("ca.crt"),
        token_file: dir.join("token"),
        node_name: "node-1".into(),
        endpoints: vec!["192.0.2.1:51820".into()],
    }
}

/// Options with the files in a fresh directory (kept for the test's life).
fn opts(agent: String, ca: Vec<u8>, token: &str) -> SyncOptions {
    let dir = tempfile::tempdir().unwrap().keep();
    opts_in(&dir, agent, &ca, token)
}

#[tokio::test]
async fn credentials_are_read_again_on_every_attempt_and_failures_are_named() {
    let (agent, url, ca) = start_agent().await;
    // A CA of other credentials, as after the agent's were regenerated.
    let (_, _, stale_ca) = start_agent().await;
    let dir = tempfile::tempdir().unwrap();
    let o = opts_in(dir.path(), url, &stale_ca, "s3cret");
    let fake = Fake::default();
    let mut revision = 0;
    let e = session(&fake, &o, &mut revision).await.unwrap_err();
    assert!(matches!(e, SyncError::Tls { .. }), "{e}");
    assert!(e.to_string().contains("ca.crt"), "names the file: {e}");

    // Kubelet updates the mounted Secret: the CA is right, the token stale.
    let o = opts_in(dir.path(), o.agent.clone(), &ca, "old-token");
    let e = session(&fake, &o, &mut revision).await.unwrap_err();
    assert!(matches!(e, SyncError::Auth { .. }), "{e}");
    assert!(e.to_string().contains("token"), "{e}");

    std::fs::write(&o.token_file, "s3cret\n").unwrap();
    session(&fake, &o, &mut revision)
        .await
        .expect("the new files are used without a restart");
    assert_eq!(agent.seen.lock().unwrap().hellos.len(), 1);
    assert_eq!(revision, 2);
}

#[tokio::test]
async fn applies_every_state_reports_and_reconnects_with_last_revision() {
    let (agent, url, ca) = start_agent().await;
    let fake = Fake::default();
    let task = tokio::spawn(run(fake.clone(), opts(url, ca, "s3cret")));
    let deadline = std::time::Instant::now() + Duration::from_secs(15);
    loop {
        let hellos = agent.seen.lock().unwrap().hellos.len();
        if hellos >= 2 {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "no reconnect");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    task.abort();
    let seen = agent.seen.lock().unwrap();
    assert_eq!(seen.hellos[0].node_name, "node-1");
    assert_eq!(seen.hellos[0].public_key, vec![7; 32]);
    assert_eq!(
        seen.hellos[0].endpoints,
        vec!["192.0.2.1:51820".to_string()]
    );
    assert_eq!(seen.hellos[0].last_revision, 0);
    assert_eq!(
        seen.hellos[1].last_revision, 2,
        "resume from the last applied revision"
    );
    assert!(
        seen.reports.contains(&2),
        "status reported after apply: {:?}",
        seen.reports
    );
    assert_eq!(fake.applied.lock().unwrap()[..2], [1, 2]);
}

// Multi-threaded: the checks below block their thread while the client runs.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rotated_key_is_reported_at_once_without_waiting_for_the_periodic_report() {
    let (agent, url, ca) = start_agent_with(Agent {
        hold_open: true,
        ..Agent::default()
    })
    .await;
    let fake = Fake::default();
    let task = tokio::spawn(run(fake.clone(), opts(url, ca, "s3cret")));
    let wait_for = |what: &'static str, cond: &dyn Fn(&Seen) -> bool| {
        let deadline = std::time::Instant::now() + Duration::from_secs(3);
        loop {
            if cond(&agent.seen.lock().unwrap()) {
                return;
            }
            assert!(std::time::Instant::now() < deadline, "{what}");
            std::thread::sleep(Duration::from_millis(20));
        }
    };
    wait_for("first reports", &|s| s.reports.len() >= 2);
    *fake.rotated_key.lock().unwrap() = Some([9; 32]);
    // Well under the 5 s periodic report: the key check must trigger it.
    wait_for("rotated key reported within 3 s", &|s| {
        s.report_keys.iter().any(|k| k == &vec![9; 32])
    });
    task.abort();
    assert_eq!(
        agent.seen.lock().unwrap().hellos.len(),
        1,
        "no reconnect was needed"
    );
}

#[tokio::test]
async fn wrong_token_applies_nothing_and_keeps_retrying() {
    let (agent, url, ca) = start_agent().await;
    let fake = Fake::default();
    let task = tokio::spawn(run(fake.clone(), opts(url, ca, "wrong")));
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert!(!task.is_finished(), "the loop keeps going");
    task.abort();
    assert!(fake.applied.lock().unwrap().is_empty());
    assert!(agent.seen.lock().unwrap().hellos.is_empty());
}

#[test]
fn backoff_doubles_up_to_a_ceiling() {
    assert_eq!(next_backoff(Duration::from_secs(1)), Duration::from_secs(2));
    assert_eq!(next_backoff(Duration::from_secs(20)), MAX_BACKOFF);
}

#[test]
fn the_report_to_the_agent_leaves_the_mac_tables_on_the_node() {
    let status = NodeStatus {
        networks: vec![l2mesh_proto::node::NetworkStatus {
            name: "blue".into(),
            ports: vec!["l2a".into()],
            macs: vec![l2mesh_proto::node::MacEntry {
                mac: "02:00:00:00:00:01".into(),
                port: "tap".into(),
                age_ms: 5,
            }],
            ..Default::default()
        }],
        ..Default::default()
    };
    let sent = for_agent(status);
    assert!(sent.networks[0].macs.is_empty());
    assert_eq!(sent.networks[0].ports, vec!["l2a".to_owned()]);
}
