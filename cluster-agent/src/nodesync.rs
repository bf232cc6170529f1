//! The NodeSync gRPC server: each node's dataplane watches its desired state
//! and reports its status. Authenticated with TLS (the agent's own CA) plus a
//! bearer token; only nodes listed in the intent are served.

use crate::desired::Hello;
use crate::engine::Shared;
use l2mesh_proto::node::node_sync_server::{NodeSync, NodeSyncServer};
use l2mesh_proto::node::{DesiredState, NodeHello, NodeStatus, SyncAck};
use std::pin::Pin;
use std::sync::Arc;
use tokio_stream::{Stream, StreamExt as _};
use tonic::{Request, Response, Status};

/// The service; clone-cheap.
#[derive(Clone, Debug)]
pub struct NodeSyncService {
    shared: Arc<Shared>,
    /// Ends every watch when it turns true: a graceful server shutdown
    /// waits for open streams, and watches never end by themselves.
    stop: Option<tokio::sync::watch::Receiver<bool>>,
}

/// Wrap a shutdown future: the returned future completes with it after
/// telling the watches to end (pass the receiver to
/// [`NodeSyncService::stop_on`]).
pub fn stopping_watches(
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> (
    impl std::future::Future<Output = ()> + Send + 'static,
    tokio::sync::watch::Receiver<bool>,
) {
    let (tx, rx) = tokio::sync::watch::channel(false);
    (
        async move {
            shutdown.await;
            let _ = tx.send(true);
        },
        rx,
    )
}

use l2mesh_proto::limits::{
    MAX_ENDPOINT_BYTES, MAX_ENDPOINTS_PER_GATEWAY as MAX_ENDPOINTS, MAX_NAME_BYTES, check_len,
};

type DesiredStream = Pin<Box<dyn Stream<Item = Result<DesiredState, Status>> + Send>>;

impl NodeSyncService {
    #[must_use]
    pub fn new(shared: Arc<Shared>) -> Self {
        Self { shared, stop: None }
    }

    /// End the watches when `stop` turns true.
    #[must_use]
    pub fn stop_on(mut self, stop: tokio::sync::watch::Receiver<bool>) -> Self {
        self.stop = Some(stop);
        self
    }

    /// The tonic service with the bearer-token check in front.
    #[must_use]
    pub fn into_server(
        self,
        token: String,
    ) -> tonic::service::interceptor::InterceptedService<
        NodeSyncServer<Self>,
        impl tonic::service::Interceptor + Clone,
    > {
        let expected = format!("Bearer {token}");
        NodeSyncServer::with_interceptor(self, move |req: Request<()>| {
            let given = req
                .metadata()
                .get("authorization")
                .and_then(|v| v.to_str().ok())
                .unwrap_or_default();
            if subtle::ConstantTimeEq::ct_eq(given.as_bytes(), expected.as_bytes()).into() {
                Ok(req)
            } else {
                Err(Status::unauthenticated(
                    "missing or wrong bearer token: use the token file from the agent's state dir (node-sync/token)",
                ))
            }
        })
    }
}

fn known_node(shared: &Shared, name: &str) -> Result<(), Status> {
    if name.is_empty() {
        return Err(Status::invalid_argument("node_name is empty"));
    }
    check_len("node_name", name, MAX_NAME_BYTES).map_err(Status::invalid_argument)?;
    if !shared.nodes_listed() {
        return Err(Status::unavailable(
            "the agent has not read the node list yet: retry shortly",
        ));
    }
    if shared.is_known_node(name) {
        Ok(())
    } else {
        Err(Status::permission_denied(format!(
            "node {name:?} is not in this cluster's node list: add it to the Nodes manifest"
        )))
    }
}

#[tonic::async_trait]
impl NodeSync for NodeSyncService {
    type WatchDesiredStream = DesiredStream;

    async fn watch_desired(
        &self,
        request: Request<NodeHello>,
    ) -> Result<Response<Self::WatchDesiredStream>, Status> {
        let hello = request.into_inner();
        known_node(&self.shared, &hello.node_name)?;
        if hello.public_key.len() != 32 {
            return Err(Status::invalid_argument(
                "public_key must be the node's 32-byte WireGuard public key",
            ));
        }
        if hello.endpoints.len() > MAX_ENDPOINTS {
            return Err(Status::invalid_argument(format!(
                "at most {MAX_ENDPOINTS} endpoints"
            )));
        }
        for e in &hello.endpoints {
            check_len("endpoint", e, MAX_ENDPOINT_BYTES).map_err(Status::invalid_argument)?;
        }
        if let Some(bad) = hello
            .endpoints
            .iter()
            .find(|e| e.parse::<std::net::SocketAddr>().is_err())
        {
            return Err(Status::invalid_argument(format!(
                "endpoint {bad:?} is not ip:port"
            )));
        }
        tracing::info!(node = %hello.node_name, endpoints = ?hello.endpoints, "node connected");
        let rx = self.shared.subscribe(&hello.node_name);
        // The stream's life is the node's liveness for the gateway election.
        let guard = self.shared.node_connected(&hello.node_name);
        self.shared.set_hello(
            &hello.node_name,
            Hello {
                public_key: hello.public_key,
                listen_port: hello.listen_port,
                endpoints: hello.endpoints,
            },
        );
        let stream = tokio_stream::wrappers::WatchStream::new(rx).filter_map(move |state| {
            let _alive = &guard;
            state.map(Ok)
        });
        let mut stop = self.stop.clone();
        let stopped = async move {
            match stop.as_mut() {
                Some(s) => drop(s.wait_for(|v| *v).await),
                None => std::future::pending().await,
            }
        };
        Ok(Response::new(Box::pin(futures::StreamExt::take_until(
            stream, stopped,
        ))))
    }

    async fn report_status(
        &self,
        request: Request<NodeStatus>,
    ) -> Result<Response<SyncAck>, Status> {
        let status = request.into_inner();
        known_node(&self.shared, &status.node_name)?;
        let revision = self.shared.set_node_status(status);
        Ok(Response::new(SyncAck { revision }))
    }
}
