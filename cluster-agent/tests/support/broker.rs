//! A real broker (the l2mesh-broker library) in-process on 127.0.0.1 port 0.
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)]

use l2mesh_broker::{Broker, ServeConfig};
use l2mesh_proto::broker as pb;
use l2mesh_proto::join::JoinString;
use tonic::transport::Channel;

pub struct TestBroker {
    pub dir: tempfile::TempDir,
    pub addr: String,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
}

impl TestBroker {
    pub async fn start() -> Self {
        Self::start_with(|_| {}).await
    }

    pub async fn start_with(tune: impl FnOnce(&mut ServeConfig)) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        let mut config = ServeConfig::new(dir.path().to_path_buf(), vec![addr.clone()]);
        config.join_failures_per_minute = 0;
        tune(&mut config);
        let broker = Broker::open(config).await.unwrap();
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        tokio::spawn(async move {
            broker
                .serve(listener, None, async move {
                    let _ = rx.await;
                })
                .await
                .unwrap();
        });
        Self {
            dir,
            addr,
            stop: Some(tx),
        }
    }

    pub async fn admin(&self) -> pb::broker_admin_client::BrokerAdminClient<Channel> {
        let cred =
            l2mesh_broker::pki::AdminCredential::load(&self.dir.path().join("admin.pem")).unwrap();
        l2mesh_broker::client::admin_client(std::slice::from_ref(&self.addr), &cred)
            .await
            .unwrap()
    }

    pub async fn token(&self, cluster: &str) -> JoinString {
        self.token_ttl(cluster, 600).await
    }

    pub async fn token_ttl(&self, cluster: &str, ttl_seconds: u64) -> JoinString {
        let r = self
            .admin()
            .await
            .create_token(pb::CreateTokenRequest {
                cluster: cluster.into(),
                ttl_seconds,
                uses: 1,
            })
            .await
            .unwrap()
            .into_inner();
        JoinString::parse(&r.join_string).unwrap()
    }

    pub async fn network(&self, name: &str, allow: &[&str]) -> pb::NetworkInfo {
        self.admin()
            .await
            .create_network(pb::CreateNetworkRequest {
                name: name.into(),
                allowed_clusters: allow.iter().map(|s| (*s).to_owned()).collect(),
                cidr: "10.20.0.0/16".into(),
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner()
    }

    pub async fn members(&self, network: &str) -> Vec<String> {
        let list = self
            .admin()
            .await
            .list_networks(pb::ListNetworksRequest::default())
            .await
            .unwrap()
            .into_inner();
        list.networks
            .into_iter()
            .find(|n| n.name == network)
            .map(|n| n.members)
            .unwrap_or_default()
    }
}

impl Drop for TestBroker {
    fn drop(&mut self) {
        if let Some(tx) = self.stop.take() {
            let _ = tx.send(());
        }
    }
}
