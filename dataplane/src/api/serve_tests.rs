//! A client that speaks HTTP/2 by hand, as grpcio does on a unix socket
//! (`:authority` = the socket path), against the API's server.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::Duration;

use l2mesh_proto::node::dataplane_server::Dataplane;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::UnixStream;

use super::authority::{encode_frame, encode_literal};
use super::*;

/// Answers `GetStatus` with a recognisable node name; nothing else.
#[derive(Debug)]
struct Stub;

#[tonic::async_trait]
impl Dataplane for Stub {
    async fn apply(&self, _: Request<DesiredState>) -> Result<Response<ApplyResult>, Status> {
        Err(Status::unimplemented("stub"))
    }
    async fn get_status(&self, _: Request<StatusRequest>) -> Result<Response<NodeStatus>, Status> {
        Ok(Response::new(NodeStatus {
            node_name: "stub-node".into(),
            ..Default::default()
        }))
    }
    async fn attach_port(
        &self,
        _: Request<AttachPortRequest>,
    ) -> Result<Response<PortResult>, Status> {
        Err(Status::unimplemented("stub"))
    }
    async fn detach_port(
        &self,
        _: Request<DetachPortRequest>,
    ) -> Result<Response<PortResult>, Status> {
        Err(Status::unimplemented("stub"))
    }
    async fn rotate_key(
        &self,
        _: Request<RotateKeyRequest>,
    ) -> Result<Response<RotateKeyResult>, Status> {
        Err(Status::unimplemented("stub"))
    }
}

#[derive(Debug, PartialEq)]
enum Outcome {
    /// The trailers' `grpc-status` and the response body.
    Answer { grpc_status: String, body: Vec<u8> },
    /// `RST_STREAM` with this error code.
    Reset(u32),
}

/// Sends one unary `GetStatus` call on stream 1 with the given `:authority`
/// and reads until the stream ends.
async fn raw_get_status(path: &std::path::Path, authority: &str) -> Outcome {
    let mut s = UnixStream::connect(path).await.unwrap();
    let mut out = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".to_vec();
    encode_frame(0x4, 0, 0, &[], &mut out);
    let mut block = Vec::new();
    for (n, v) in [
        (":method", "POST"),
        (":scheme", "http"),
        (":path", "/l2mesh.node.v1.Dataplane/GetStatus"),
        (":authority", authority),
        ("content-type", "application/grpc"),
        ("te", "trailers"),
    ] {
        encode_literal(n.as_bytes(), v.as_bytes(), &mut block);
    }
    encode_frame(0x1, 0x4, 1, &block, &mut out);
    // An empty StatusRequest: uncompressed, length 0.
    encode_frame(0x0, 0x1, 1, &[0, 0, 0, 0, 0], &mut out);
    s.write_all(&out).await.unwrap();

    let mut dec = loona_hpack::Decoder::new();
    let mut body = Vec::new();
    let mut grpc_status = None;
    loop {
        let mut h = [0u8; 9];
        s.read_exact(&mut h).await.unwrap();
        let len = usize::from(h[0]) << 16 | usize::from(h[1]) << 8 | usize::from(h[2]);
        let (kind, flags) = (h[3], h[4]);
        let stream = u32::from_be_bytes([h[5], h[6], h[7], h[8]]);
        let mut payload = vec![0; len];
        s.read_exact(&mut payload).await.unwrap();
        match kind {
            0x4 if flags & 0x1 == 0 => {
                let mut ack = Vec::new();
                encode_frame(0x4, 0x1, 0, &[], &mut ack);
                s.write_all(&ack).await.unwrap();
            }
            0x3 if stream == 1 => {
                return Outcome::Reset(u32::from_be_bytes(payload[..4].try_into().unwrap()));
            }
            0x1 if stream == 1 => {
                for (n, v) in dec.decode(&payload).unwrap() {
                    if n == b"grpc-status" {
                        grpc_status = Some(String::from_utf8(v).unwrap());
                    }
                }
            }
            0x0 if stream == 1 => body.extend_from_slice(&payload),
            0x7 => panic!("GOAWAY: {payload:?}"),
            _ => {}
        }
        if stream == 1 && flags & 0x1 != 0 {
            return Outcome::Answer {
                grpc_status: grpc_status.expect("trailers with grpc-status"),
                body,
            };
        }
    }
}

async fn with_server<F, Fut>(rewrite: bool, f: F)
where
    F: FnOnce(std::path::PathBuf) -> Fut,
    Fut: Future<Output = ()>,
{
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("dataplane.sock");
    let listener = bind(&path).unwrap();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn(async move {
        let shutdown = async {
            let _ = stopped.await;
        };
        if rewrite {
            serve_service(listener, Stub, shutdown).await.unwrap();
        } else {
            // What tonic does on its own.
            tonic::transport::Server::builder()
                .add_service(DataplaneServer::new(Stub))
                .serve_with_incoming_shutdown(
                    tokio_stream::wrappers::UnixListenerStream::new(listener),
                    shutdown,
                )
                .await
                .unwrap();
        }
    });
    tokio::time::timeout(Duration::from_secs(30), f(path))
        .await
        .expect("the call ended");
    let _ = stop.send(());
    server.await.unwrap();
}

#[tokio::test]
async fn a_socket_path_authority_gets_an_answer() {
    with_server(true, |path| async move {
        for authority in [
            "/run/l2mesh/dataplane.sock",
            "%2Frun%2Fl2mesh%2Fdataplane.sock",
            "localhost",
        ] {
            match raw_get_status(&path, authority).await {
                Outcome::Answer { grpc_status, body } => {
                    assert_eq!(grpc_status, "0", "{authority}");
                    let status = <NodeStatus as prost::Message>::decode(&body[5..]).unwrap();
                    assert_eq!(status.node_name, "stub-node");
                }
                other => panic!("{authority}: {other:?}"),
            }
        }
        // The crate's own client still works.
        let mut c = crate::client::connect(&path).await.unwrap();
        let st = c.get_status(StatusRequest::default()).await.unwrap();
        assert_eq!(st.into_inner().node_name, "stub-node");
    })
    .await;
}

#[tokio::test]
async fn plain_h2_resets_a_socket_path_authority() {
    // Why the rewriter exists: without it h2 answers PROTOCOL_ERROR (1).
    with_server(false, |path| async move {
        assert_eq!(
            raw_get_status(&path, "/run/l2mesh/dataplane.sock").await,
            Outcome::Reset(1)
        );
    })
    .await;
}
