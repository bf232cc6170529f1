//! A small in-memory Kubernetes API server as a tower `Service`, for
//! `kube::Client::new(fake, "default")`: kube's mock API (tower-test) made
//! stateful, so the whole agent can run against it.
//!
//! What it implements, and nothing more (anything else gets 404/405 and is
//! recorded in [`FakeApi::unhandled`]):
//! - GET one object, LIST (all namespaces or one), WATCH from a
//!   resourceVersion (replayed from the event log, then live);
//! - POST (name or generateName), PUT with optimistic concurrency (a stale
//!   resourceVersion is 409), PATCH as JSON merge patch, JSON patch
//!   (RFC 6902) and server-side apply (approximated: create, or merge the
//!   applied fields in; no field ownership);
//! - DELETE: with finalizers it only sets deletionTimestamp; the object goes
//!   once a write empties its finalizers;
//! - `/status` writes change only the status, main writes keep the status;
//!   metadata.generation grows when the spec changes.
//!
//! No label or field selectors, no pagination (`limit` is ignored and
//! everything comes in one page), no bookmarks.
//!
//! Hostility on demand, as a real API server can show it:
//! [`FakeApi::delay_lists`] (initial lists arrive late, per kind, so in any
//! order), [`FakeApi::drop_watches`] (every open watch ends; clients re-watch
//! from their last resourceVersion), [`FakeApi::fail_writes`] (writes to a
//! kind fail with 500) and [`FakeApi::remove_kind`] (the kind is not served:
//! `404 page not found` in plain text, like a CRD that is not installed).
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)]

use bytes::Bytes;
use futures::Stream;
use http::{Method, Request, Response, StatusCode};
use http_body::Frame;
use serde_json::{Value, json};
use std::collections::BTreeMap;
use std::convert::Infallible;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};

mod store;

type BodyStream = Pin<Box<dyn Stream<Item = Bytes> + Send>>;

/// Response bodies: one chunk, or a watch's lines as they happen.
pub struct FakeBody(BodyStream);

impl http_body::Body for FakeBody {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        self.get_mut()
            .0
            .as_mut()
            .poll_next(cx)
            .map(|b| b.map(|b| Ok(Frame::data(b))))
    }
}

/// `(collection, namespace, name)`; collection is e.g. `api/v1/secrets` or
/// `apis/l2mesh.io/v1alpha1/l2networks`, namespace is empty when cluster-scoped.
type Key = (String, String, String);

#[derive(Debug)]
struct Logged {
    rv: u64,
    collection: String,
    namespace: String,
    kind: &'static str,
    object: Value,
}

#[derive(Debug)]
struct Watcher {
    collection: String,
    namespace: Option<String>,
    tx: tokio::sync::mpsc::UnboundedSender<Bytes>,
}

#[derive(Debug, Default)]
struct Store {
    rv: u64,
    uid: u64,
    objects: BTreeMap<Key, Value>,
    log: Vec<Logged>,
    watchers: Vec<Watcher>,
    requests: Vec<String>,
    unhandled: Vec<String>,
    chaos: Chaos,
}

/// Injected misbehaviour, per collection.
#[derive(Debug, Default)]
struct Chaos {
    list_delays: BTreeMap<String, std::time::Duration>,
    failing_writes: std::collections::BTreeSet<String>,
    removed: std::collections::BTreeSet<String>,
}

/// The fake API server; clones share the same state.
#[derive(Clone, Debug, Default)]
pub struct FakeApi {
    store: Arc<Mutex<Store>>,
    /// Who is calling, for [`FakeApi::requests`] (see [`FakeApi::client_as`]).
    caller: Option<String>,
}

/// Where a request goes.
#[derive(Debug)]
struct Target {
    collection: String,
    namespace: Option<String>,
    name: Option<String>,
    subresource: Option<String>,
}

fn parse_path(path: &str) -> Option<Target> {
    let segs: Vec<&str> = path.trim_matches('/').split('/').collect();
    let gv_len = match *segs.first()? {
        "api" => 2,
        "apis" => 3,
        _ => return None,
    };
    if segs.len() <= gv_len {
        return None;
    }
    let gv = segs[..gv_len].join("/");
    let rest = &segs[gv_len..];
    let (namespace, rest) = if rest[0] == "namespaces" && rest.len() >= 3 {
        (Some(rest[1].to_owned()), &rest[2..])
    } else {
        (None, rest)
    };
    if rest.len() > 3 {
        return None;
    }
    Some(Target {
        collection: format!("{gv}/{}", rest[0]),
        namespace,
        name: rest.get(1).map(|s| (*s).to_owned()),
        subresource: rest.get(2).map(|s| (*s).to_owned()),
    })
}

fn query(req: &Request<kube::client::Body>) -> BTreeMap<String, String> {
    req.uri()
        .query()
        .unwrap_or_default()
        .split('&')
        .filter_map(|kv| kv.split_once('='))
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .collect()
}

fn body(value: &Value) -> FakeBody {
    let bytes = Bytes::from(serde_json::to_vec(value).unwrap());
    FakeBody(Box::pin(futures::stream::once(async move { bytes })))
}

fn body_text(text: &'static str) -> FakeBody {
    FakeBody(Box::pin(futures::stream::once(async move {
        Bytes::from_static(text.as_bytes())
    })))
}

fn respond(code: StatusCode, value: &Value) -> Response<FakeBody> {
    Response::builder()
        .status(code)
        .header("content-type", "application/json")
        .body(body(value))
        .unwrap()
}

fn status(code: StatusCode, reason: &str, message: &str) -> Response<FakeBody> {
    respond(
        code,
        &json!({
            "kind": "Status", "apiVersion": "v1", "metadata": {},
            "status": "Failure", "reason": reason, "message": message, "code": code.as_u16(),
        }),
    )
}

fn now() -> String {
    let ts = k8s_openapi::jiff::Timestamp::now();
    k8s_openapi::jiff::Timestamp::from_second(ts.as_second())
        .unwrap()
        .to_string()
}

fn meta(obj: &Value, field: &str) -> Option<Value> {
    obj.get("metadata")?.get(field).cloned()
}

fn set_meta(obj: &mut Value, field: &str, value: Value) {
    if !obj.get("metadata").is_some_and(Value::is_object) {
        obj["metadata"] = json!({});
    }
    obj["metadata"][field] = value;
}

fn has_finalizers(obj: &Value) -> bool {
    meta(obj, "finalizers")
        .and_then(|f| f.as_array().map(|a| !a.is_empty()))
        .unwrap_or(false)
}

fn watch_line(kind: &str, object: &Value) -> Bytes {
    let mut line = serde_json::to_vec(&json!({"type": kind, "object": object})).unwrap();
    line.push(b'\n');
    Bytes::from(line)
}

fn not_found(key: &Key) -> Response<FakeBody> {
    status(
        StatusCode::NOT_FOUND,
        "NotFound",
        &format!("{} {:?} not found", key.0, key.2),
    )
}

impl FakeApi {
    #[must_use]
    pub fn new() -> Self {
        Self::default()
    }

    /// A kube client that talks to this server.
    #[must_use]
    pub fn client(&self) -> kube::Client {
        kube::Client::new(self.clone(), "default")
    }

    /// A client whose requests are recorded as `<caller> METHOD uri`.
    #[must_use]
    pub fn client_as(&self, caller: &str) -> kube::Client {
        let mut api = self.clone();
        api.caller = Some(caller.to_owned());
        kube::Client::new(api, "default")
    }

    /// LISTs of `collection` answer only after `delay` (with the objects as
    /// they are then); `Duration::ZERO` removes the delay.
    pub fn delay_lists(&self, collection: &str, delay: std::time::Duration) {
        self.store
            .lock()
            .unwrap()
            .chaos
            .list_delays
            .insert(collection.to_owned(), delay);
    }

    /// End every open watch (clients re-watch from their last version).
    pub fn drop_watches(&self) {
        self.store.lock().unwrap().watchers.clear();
    }

    /// Writes (POST, PUT, PATCH, DELETE) to `collection` fail with 500 while `on`.
    pub fn fail_writes(&self, collection: &str, on: bool) {
        let mut store = self.store.lock().unwrap();
        if on {
            store.chaos.failing_writes.insert(collection.to_owned());
        } else {
            store.chaos.failing_writes.remove(collection);
        }
    }

    /// Stop serving `collection` at all, like a CRD that is not installed.
    pub fn remove_kind(&self, collection: &str) {
        self.store
            .lock()
            .unwrap()
            .chaos
            .removed
            .insert(collection.to_owned());
    }

    /// Requests the server did not implement (`METHOD uri`).
    #[must_use]
    pub fn unhandled(&self) -> Vec<String> {
        self.store.lock().unwrap().unhandled.clone()
    }

    /// Every request so far (`METHOD uri`).
    #[must_use]
    pub fn requests(&self) -> Vec<String> {
        self.store.lock().unwrap().requests.clone()
    }

    /// One object, e.g. `get("api/v1/secrets", "ns", "name")`.
    #[must_use]
    pub fn get(&self, collection: &str, namespace: &str, name: &str) -> Option<Value> {
        self.store
            .lock()
            .unwrap()
            .objects
            .get(&(collection.to_owned(), namespace.to_owned(), name.to_owned()))
            .cloned()
    }

    /// Objects of a collection, in any namespace.
    #[must_use]
    pub fn all(&self, collection: &str) -> Vec<Value> {
        self.store
            .lock()
            .unwrap()
            .objects
            .iter()
            .filter(|((c, _, _), _)| c == collection)
            .map(|(_, v)| v.clone())
            .collect()
    }

    async fn handle(self, req: Request<kube::client::Body>) -> Response<FakeBody> {
        let method = req.method().clone();
        let line = format!("{method} {}", req.uri());
        let q = query(&req);
        let content_type = req
            .headers()
            .get("content-type")
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default()
            .to_owned();
        let target = parse_path(req.uri().path());
        let bytes = req.into_body().collect_bytes().await.unwrap_or_default();
        let sent: Option<Value> = if bytes.is_empty() {
            None
        } else {
            match serde_json::from_slice(&bytes) {
                Ok(v) => Some(v),
                Err(e) => return status(StatusCode::BAD_REQUEST, "BadRequest", &e.to_string()),
            }
        };
        let collection = target.as_ref().map(|t| t.collection.clone());
        let is_list = method == Method::GET
            && target.as_ref().is_some_and(|t| t.name.is_none())
            && !q.get("watch").is_some_and(|w| w == "true" || w == "1");
        let delay = collection.as_ref().and_then(|c| {
            let store = self.store.lock().unwrap();
            store.chaos.list_delays.get(c).copied()
        });
        if let Some(d) = delay.filter(|d| is_list && !d.is_zero()) {
            tokio::time::sleep(d).await;
        }
        let mut store = self.store.lock().unwrap();
        store.requests.push(match &self.caller {
            Some(c) => format!("{c} {line}"),
            None => line.clone(),
        });
        if let Some(c) = &collection {
            if store.chaos.removed.contains(c) {
                return Response::builder()
                    .status(StatusCode::NOT_FOUND)
                    .header("content-type", "text/plain; charset=utf-8")
                    .body(body_text("404 page not found\n"))
                    .unwrap();
            }
            if method != Method::GET && store.chaos.failing_writes.contains(c) {
                return status(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    "InternalError",
                    "injected write failure",
                );
            }
        }
        let response = match target {
            Some(t) => store.route(&method, &t, &q, &content_type, sent),
            None => None,
        };
        response.unwrap_or_else(|| {
            eprintln!("fake apiserver: not implemented: {line}");
            store.unhandled.push(line.clone());
            if method == Method::GET {
                status(
                    StatusCode::NOT_FOUND,
                    "NotFound",
                    "not implemented by the fake API server",
                )
            } else {
                status(
                    StatusCode::METHOD_NOT_ALLOWED,
                    "MethodNotAllowed",
                    "not implemented by the fake API server",
                )
            }
        })
    }
}

fn conflict(name: &str) -> Response<FakeBody> {
    status(
        StatusCode::CONFLICT,
        "Conflict",
        &format!("Operation cannot be fulfilled on {name}: the object has been modified"),
    )
}

impl FakeApi {
    /// Serve this API over plain HTTP on `listener`, for real binaries
    /// (a kubeconfig with `server: http://ADDR`). Runs until dropped.
    pub async fn serve_http(self, listener: tokio::net::TcpListener) {
        let app = axum::Router::new().fallback(move |req: Request<axum::body::Body>| {
            let api = self.clone();
            async move {
                let (parts, body) = req.into_parts();
                let bytes = axum::body::to_bytes(body, usize::MAX)
                    .await
                    .unwrap_or_default();
                let req = Request::from_parts(parts, kube::client::Body::from(bytes));
                let (parts, body) = api.handle(req).await.into_parts();
                let stream = futures::StreamExt::map(body.0, Ok::<_, Infallible>);
                http::Response::from_parts(parts, axum::body::Body::from_stream(stream))
            }
        });
        let _ = axum::serve(listener, app).await;
    }
}

impl tower::Service<Request<kube::client::Body>> for FakeApi {
    type Response = Response<FakeBody>;
    type Error = Infallible;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, Infallible>> + Send>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: Request<kube::client::Body>) -> Self::Future {
        let this = self.clone();
        Box::pin(async move { Ok(this.handle(req).await) })
    }
}
