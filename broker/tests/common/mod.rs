//! A real broker on 127.0.0.1 port 0 in a temp dir, and helpers to talk to it.
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)]

use l2mesh_broker::client::{self, ClusterCredential};
use l2mesh_broker::pki::AdminCredential;
use l2mesh_broker::process::BrokerProcess;
use l2mesh_broker::{Broker, ServeConfig};
use l2mesh_proto::broker as pb;
use l2mesh_proto::broker::broker_admin_client::BrokerAdminClient;
use l2mesh_proto::broker::broker_client::BrokerClient;
use l2mesh_proto::join::JoinString;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;
use tonic::transport::Channel;

pub mod etcd;

pub struct TestBroker {
    pub dir: PathBuf,
    pub addr: String,
    pub metrics_addr: String,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    task: Option<tokio::task::JoinHandle<()>>,
    _tmp: Option<tempfile::TempDir>,
}

impl TestBroker {
    pub async fn start() -> Self {
        Self::start_with(|_| {}).await
    }

    pub async fn start_with(tune: impl FnOnce(&mut ServeConfig)) -> Self {
        let tmp = tempfile::tempdir().unwrap();
        let mut b = Self::start_in(tmp.path(), tune).await;
        b._tmp = Some(tmp);
        b
    }

    pub async fn start_in(dir: &Path, tune: impl FnOnce(&mut ServeConfig)) -> Self {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let metrics = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        let metrics_addr = metrics.local_addr().unwrap().to_string();
        let mut config = ServeConfig::new(dir.to_path_buf(), vec![addr.clone()]);
        config.join_failures_per_minute = 0;
        tune(&mut config);
        let broker = Broker::open(config).await.unwrap();
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        let task = tokio::spawn(async move {
            broker
                .serve(listener, Some(metrics), async move {
                    let _ = rx.await;
                })
                .await
                .unwrap();
        });
        Self {
            dir: dir.to_path_buf(),
            addr,
            metrics_addr,
            stop: Some(tx),
            task: Some(task),
            _tmp: None,
        }
    }

    /// Graceful stop; waits for the server to finish.
    pub async fn stop(&mut self) {
        if let Some(tx) = self.stop.take() {
            let _ = tx.send(());
        }
        if let Some(t) = self.task.take() {
            tokio::time::timeout(Duration::from_secs(10), t)
                .await
                .expect("broker did not stop within 10 s")
                .unwrap();
        }
    }

    pub fn admin_credential(&self) -> AdminCredential {
        AdminCredential::load(&self.dir.join("admin.pem")).unwrap()
    }

    pub async fn admin(&self) -> BrokerAdminClient<Channel> {
        client::admin_client(std::slice::from_ref(&self.addr), &self.admin_credential())
            .await
            .unwrap()
    }

    pub async fn token(&self, cluster: &str, ttl: u64, uses: u32) -> JoinString {
        let r = self
            .admin()
            .await
            .create_token(pb::CreateTokenRequest {
                cluster: cluster.into(),
                ttl_seconds: ttl,
                uses,
            })
            .await
            .unwrap()
            .into_inner();
        JoinString::parse(&r.join_string).unwrap()
    }

    pub async fn join(&self, cluster: &str) -> (ClusterCredential, BrokerClient<Channel>) {
        let cred = client::join(&self.token(cluster, 600, 1).await)
            .await
            .unwrap();
        let c = cred.connect().await.unwrap();
        (cred, c)
    }

    pub async fn network(&self, name: &str, allow: &[&str]) -> pb::NetworkInfo {
        self.admin()
            .await
            .create_network(pb::CreateNetworkRequest {
                name: name.into(),
                allowed_clusters: allow.iter().map(|s| (*s).to_owned()).collect(),
                allow_all: allow.is_empty(),
                cidr: "10.20.0.0/16".into(),
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner()
    }
}

impl Drop for TestBroker {
    fn drop(&mut self) {
        if let Some(tx) = self.stop.take() {
            let _ = tx.send(());
        }
    }
}

pub fn gateway(node: &str, key: u8, ip: &str) -> pb::Gateway {
    pb::Gateway {
        node: node.into(),
        public_key: vec![key; 32],
        endpoints: vec![format!("192.0.2.{key}:51820")],
        tunnel_ip: ip.into(),
    }
}

pub async fn request(c: &mut BrokerClient<Channel>, nets: &[&str]) -> pb::NetworkRequestResult {
    c.request_networks(pb::NetworkRequest {
        networks: nets.iter().map(|s| (*s).to_owned()).collect(),
    })
    .await
    .unwrap()
    .into_inner()
}

/// Opens a watch that resumes after `last_revision` (0: from the start).
pub async fn watch(
    c: &mut BrokerClient<Channel>,
    last_revision: u64,
) -> tonic::Streaming<pb::ClusterView> {
    c.watch(pb::WatchRequest {
        last_revision,
        ..Default::default()
    })
    .await
    .unwrap()
    .into_inner()
}

/// Opens a watch that takes deltas, resuming after `last_revision`.
pub async fn watch_deltas(
    c: &mut BrokerClient<Channel>,
    last_revision: u64,
) -> tonic::Streaming<pb::ClusterView> {
    c.watch(pb::WatchRequest {
        last_revision,
        deltas: true,
    })
    .await
    .unwrap()
    .into_inner()
}

/// Next message of a delta watch, applied to `held`; returns the message.
pub async fn next_applied(
    s: &mut tonic::Streaming<pb::ClusterView>,
    held: &mut Option<pb::ClusterView>,
) -> pb::ClusterView {
    let msg = next_view(s).await;
    l2mesh_proto::view::apply(held, msg.clone()).unwrap();
    msg
}

/// Asserts that a watch stays silent for 400 ms (nothing changed, so
/// nothing may be resent).
pub async fn assert_quiet(s: &mut tonic::Streaming<pb::ClusterView>, why: &str) {
    let nothing = tokio::time::timeout(Duration::from_millis(400), s.message()).await;
    assert!(nothing.is_err(), "{why}: {nothing:?}");
}

/// Next view from a stream, or panic after 5 s.
pub async fn next_view(s: &mut tonic::Streaming<pb::ClusterView>) -> pb::ClusterView {
    tokio::time::timeout(Duration::from_secs(5), s.message())
        .await
        .expect("no view within 5 s")
        .expect("stream error")
        .expect("stream ended")
}

/// Wait for a view satisfying `f`.
pub async fn view_until(
    s: &mut tonic::Streaming<pb::ClusterView>,
    f: impl Fn(&pb::ClusterView) -> bool,
) -> pb::ClusterView {
    loop {
        let v = next_view(s).await;
        if f(&v) {
            return v;
        }
    }
}

/// The real broker binary serving on port 0 with its data in `dir`;
/// killed when dropped, even if the test panics.
pub fn start(dir: &Path) -> BrokerProcess {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_l2mesh-broker"));
    cmd.arg("--data-dir")
        .arg(dir)
        .args([
            "serve",
            "--listen",
            "127.0.0.1:0",
            "--metrics-listen",
            "127.0.0.1:0",
        ])
        .env("L2MESH_LOG", "info");
    BrokerProcess::spawn(cmd, Duration::from_secs(20)).unwrap()
}

/// The real broker binary serving on port 0 with its CA in `dir` and its
/// state in `store` (`etcd://...`); killed when dropped.
pub fn start_on(dir: &Path, store: &str) -> BrokerProcess {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_l2mesh-broker"));
    cmd.arg("--data-dir")
        .arg(dir)
        .args([
            "serve",
            "--listen",
            "127.0.0.1:0",
            "--metrics-listen",
            "127.0.0.1:0",
            "--store",
            store,
        ])
        .env("L2MESH_LOG", "info");
    BrokerProcess::spawn(cmd, Duration::from_secs(30)).unwrap()
}
