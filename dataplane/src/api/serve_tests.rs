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
    /// Echoes what it received: the revision, the `x-call` metadata and a
    /// digest of the body, so that a test sees the request arrived intact.
    async fn apply(&self, req: Request<DesiredState>) -> Result<Response<ApplyResult>, Status> {
        let call = metadata(&req, "x-call");
        let state = req.into_inner();
        Ok(Response::new(ApplyResult {
            applied_revision: state.revision,
            changes: vec![call, body_digest(&state)],
        }))
    }
    /// `node_name` is the `x-echo` metadata when there is one.
    async fn get_status(
        &self,
        req: Request<StatusRequest>,
    ) -> Result<Response<NodeStatus>, Status> {
        let echo = metadata(&req, "x-echo");
        Ok(Response::new(NodeStatus {
            node_name: if echo.is_empty() {
                "stub-node".into()
            } else {
                echo
            },
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

fn metadata<T>(req: &Request<T>, name: &str) -> String {
    req.metadata()
        .get(name)
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_owned()
}

fn body_digest(state: &DesiredState) -> String {
    let bytes: usize = state.peers.iter().map(|p| p.endpoint.len()).sum();
    let sum: u64 = state
        .peers
        .iter()
        .flat_map(|p| p.endpoint.bytes())
        .map(u64::from)
        .sum();
    format!("{} peers {bytes} bytes sum {sum}", state.peers.len())
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

/// A request whose body is about `size` bytes of peer endpoints.
fn big_state(revision: u64, size: usize) -> DesiredState {
    let peers = (0..size / 1000 + 1)
        .map(|i| l2mesh_proto::node::PeerSpec {
            endpoint: format!("{i}-{revision}-").repeat(1000 / 8),
            ..Default::default()
        })
        .collect();
    DesiredState {
        revision,
        peers,
        ..Default::default()
    }
}

#[tokio::test]
async fn one_connection_carries_many_calls_with_changing_metadata() {
    // h2's client encoder indexes metadata in its HPACK table; values of
    // many sizes evict entries, so a table the rewriter and the client
    // disagree on shows up as a wrong echo or a broken connection. Large
    // bodies go through flow control while other calls run.
    with_server(true, |path| async move {
        let path2 = path.clone();
        let channel = tonic::transport::Endpoint::from_static("http://dataplane.node.invalid:9")
            .connect_with_connector(tower::service_fn(move |_| {
                let path = path2.clone();
                async move {
                    let s = UnixStream::connect(path).await?;
                    Ok::<_, std::io::Error>(hyper_util::rt::TokioIo::new(s))
                }
            }))
            .await
            .unwrap();
        let c = l2mesh_proto::node::dataplane_client::DataplaneClient::new(channel);
        for i in 0..60u64 {
            let mut req = Request::new(StatusRequest::default());
            let echo = format!(
                "call-{i}-{}",
                "v".repeat(usize::try_from(i * 37 % 900).unwrap())
            );
            req.metadata_mut().insert("x-echo", echo.parse().unwrap());
            req.metadata_mut()
                .insert("x-fixed", "the same value every time".parse().unwrap());
            let key = format!("x-rotating-{}", i % 5);
            req.metadata_mut().insert(
                tonic::metadata::MetadataKey::from_bytes(key.as_bytes()).unwrap(),
                "r".repeat(usize::try_from(i % 3 * 700).unwrap())
                    .parse()
                    .unwrap(),
            );
            let st = c.clone().get_status(req).await.unwrap().into_inner();
            assert_eq!(st.node_name, echo);
        }
        let calls = (0..16u64).map(|i| {
            let mut c = c.clone();
            async move {
                if i % 2 == 0 {
                    let state = big_state(i, 200_000 + usize::try_from(i).unwrap() * 10_000);
                    let digest = body_digest(&state);
                    let mut req = Request::new(state);
                    req.metadata_mut()
                        .insert("x-call", format!("apply-{i}").parse().unwrap());
                    let r = c.apply(req).await.unwrap().into_inner();
                    assert_eq!(r.applied_revision, i);
                    assert_eq!(r.changes, vec![format!("apply-{i}"), digest]);
                } else {
                    let mut req = Request::new(StatusRequest::default());
                    req.metadata_mut()
                        .insert("x-echo", format!("concurrent-{i}").parse().unwrap());
                    let st = c.get_status(req).await.unwrap().into_inner();
                    assert_eq!(st.node_name, format!("concurrent-{i}"));
                }
            }
        });
        futures::future::join_all(calls).await;
    })
    .await;
}
