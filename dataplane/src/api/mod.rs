//! The local control API (`l2mesh.node.v1.Dataplane`) on a unix socket.

pub mod authority;

use std::future::Future;
use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::path::Path;
use std::sync::Arc;

use l2mesh_proto::node::dataplane_server::{Dataplane, DataplaneServer};
use l2mesh_proto::node::{
    ApplyResult, AttachPortRequest, DesiredState, DetachPortRequest, NodeStatus, PortResult,
    RotateKeyRequest, RotateKeyResult, StatusRequest,
};
use tokio::net::UnixListener;
use tonic::{Request, Response, Status};

use crate::Error;
use crate::daemon::Daemon;

/// The gRPC service backed by a running daemon.
#[derive(Debug, Clone)]
pub struct Service {
    daemon: Arc<Daemon>,
}

impl Service {
    pub fn new(daemon: Arc<Daemon>) -> Self {
        Self { daemon }
    }
}

fn status(e: Error) -> Status {
    match e {
        Error::Config(_)
        | Error::OwnedInterface(_)
        | Error::RefusedInterface { .. }
        | Error::InvalidPod(_) => Status::invalid_argument(e.to_string()),
        Error::NoSuchNetwork(_) | Error::NoSuchInterface(_) => Status::not_found(e.to_string()),
        // A failed apply changed nothing; its cause (a taken port or name)
        // is the node's state, not a fault of the daemon.
        Error::NotAttached { .. } | Error::Apply { .. } => {
            Status::failed_precondition(e.to_string())
        }
        _ => Status::internal(e.to_string()),
    }
}

#[tonic::async_trait]
impl Dataplane for Service {
    async fn apply(&self, req: Request<DesiredState>) -> Result<Response<ApplyResult>, Status> {
        self.daemon
            .apply(req.into_inner())
            .await
            .map(Response::new)
            .map_err(status)
    }

    async fn get_status(&self, _: Request<StatusRequest>) -> Result<Response<NodeStatus>, Status> {
        self.daemon
            .status()
            .await
            .map(Response::new)
            .map_err(status)
    }

    async fn attach_port(
        &self,
        req: Request<AttachPortRequest>,
    ) -> Result<Response<PortResult>, Status> {
        let r = req.into_inner();
        self.daemon
            .attach(&r.network, &r.ifname, &r.pod_namespace, &r.pod_name)
            .await
            .map(Response::new)
            .map_err(status)
    }

    async fn detach_port(
        &self,
        req: Request<DetachPortRequest>,
    ) -> Result<Response<PortResult>, Status> {
        let r = req.into_inner();
        self.daemon
            .detach(&r.network, &r.ifname)
            .await
            .map(Response::new)
            .map_err(status)
    }

    async fn rotate_key(
        &self,
        _: Request<RotateKeyRequest>,
    ) -> Result<Response<RotateKeyResult>, Status> {
        let key = self.daemon.rotate_key().map_err(status)?;
        Ok(Response::new(RotateKeyResult {
            public_key: key.to_vec(),
        }))
    }
}

/// Binds the API socket with mode 0600, replacing a stale socket file (but
/// never a regular file someone put there).
pub fn bind(path: &Path) -> Result<UnixListener, Error> {
    if let Ok(meta) = std::fs::symlink_metadata(path) {
        if meta.file_type().is_socket() {
            std::fs::remove_file(path)?;
        } else {
            return Err(Error::Io(std::io::Error::new(
                std::io::ErrorKind::AlreadyExists,
                format!(
                    "{} exists and is not a socket; remove it or pick another --socket",
                    path.display()
                ),
            )));
        }
    }
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    let l = UnixListener::bind(path)?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))?;
    Ok(l)
}

/// Serves the API until `shutdown` completes.
pub async fn serve(
    listener: UnixListener,
    daemon: Arc<Daemon>,
    shutdown: impl Future<Output = ()> + Send,
) -> Result<(), tonic::transport::Error> {
    serve_service(listener, Service::new(daemon), shutdown).await
}

/// Serves `service` on the socket; every connection's `:authority` is made
/// acceptable to h2 first (see [`authority`]).
pub async fn serve_service<S: Dataplane>(
    listener: UnixListener,
    service: S,
    shutdown: impl Future<Output = ()> + Send,
) -> Result<(), tonic::transport::Error> {
    let incoming = tokio_stream::StreamExt::map(
        tokio_stream::wrappers::UnixListenerStream::new(listener),
        |conn| conn.map(authority::LocalConn::new),
    );
    tonic::transport::Server::builder()
        .add_service(DataplaneServer::new(service))
        .serve_with_incoming_shutdown(incoming, shutdown)
        .await
}

#[cfg(test)]
#[path = "serve_tests.rs"]
mod serve_tests;
