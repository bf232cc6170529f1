//! A client for the local API, used by the CLI and the tests.

use std::path::{Path, PathBuf};

use hyper_util::rt::TokioIo;
use l2mesh_proto::node::dataplane_client::DataplaneClient;
use tonic::transport::{Channel, Endpoint};

/// Connects to the daemon's unix socket.
pub async fn connect(path: &Path) -> Result<DataplaneClient<Channel>, tonic::transport::Error> {
    let path: PathBuf = path.to_path_buf();
    // The URI is required by the API but unused: the connector dials the socket.
    let channel = Endpoint::from_static("http://localhost")
        .connect_with_connector(tower::service_fn(move |_| {
            let path = path.clone();
            async move {
                let s = tokio::net::UnixStream::connect(path).await?;
                Ok::<_, std::io::Error>(TokioIo::new(s))
            }
        }))
        .await?;
    Ok(DataplaneClient::new(channel))
}
