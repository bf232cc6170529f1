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
}

/// The fake API server; clones share the same state.
#[derive(Clone, Debug, Default)]
pub struct FakeApi {
    store: Arc<Mutex<Store>>,
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

impl Store {
    fn next_rv(&mut self) -> u64 {
        self.rv += 1;
        self.rv
    }

    /// Record an event and hand it to the matching watchers.
    fn emit(&mut self, key: &Key, kind: &'static str, object: Value) {
        let rv = self.rv;
        let line = watch_line(kind, &object);
        self.watchers.retain(|w| {
            if w.collection != key.0 || w.namespace.as_ref().is_some_and(|ns| *ns != key.1) {
                return !w.tx.is_closed();
            }
            w.tx.send(line.clone()).is_ok()
        });
        self.log.push(Logged {
            rv,
            collection: key.0.clone(),
            namespace: key.1.clone(),
            kind,
            object,
        });
    }

    fn create(&mut self, t: &Target, mut obj: Value) -> Response<FakeBody> {
        let name = match meta(&obj, "name").and_then(|n| n.as_str().map(str::to_owned)) {
            Some(n) if !n.is_empty() => n,
            _ => match meta(&obj, "generateName").and_then(|n| n.as_str().map(str::to_owned)) {
                Some(prefix) => {
                    self.uid += 1;
                    format!("{prefix}{:05x}", self.uid)
                }
                None => {
                    return status(
                        StatusCode::UNPROCESSABLE_ENTITY,
                        "Invalid",
                        "name is required",
                    );
                }
            },
        };
        let ns = t.namespace.clone().unwrap_or_default();
        let key = (t.collection.clone(), ns.clone(), name.clone());
        if self.objects.contains_key(&key) {
            return status(
                StatusCode::CONFLICT,
                "AlreadyExists",
                &format!("{name} already exists"),
            );
        }
        self.uid += 1;
        let rv = self.next_rv();
        set_meta(&mut obj, "name", json!(name));
        if !ns.is_empty() {
            set_meta(&mut obj, "namespace", json!(ns));
        }
        set_meta(&mut obj, "uid", json!(format!("uid-{}", self.uid)));
        set_meta(&mut obj, "resourceVersion", json!(rv.to_string()));
        set_meta(&mut obj, "creationTimestamp", json!(now()));
        set_meta(&mut obj, "generation", json!(1));
        if let Some(m) = obj["metadata"].as_object_mut() {
            m.remove("deletionTimestamp");
        }
        self.objects.insert(key.clone(), obj.clone());
        self.emit(&key, "ADDED", obj.clone());
        respond(StatusCode::CREATED, &obj)
    }

    /// Store `next` as the new version of `key` (which exists), with the
    /// server-owned fields kept, and finish a deletion whose finalizers are gone.
    fn update(&mut self, key: &Key, mut next: Value, sub: Option<&str>) -> Response<FakeBody> {
        let old = self.objects[key].clone();
        if sub == Some("status") {
            let status = next.get("status").cloned();
            next = old.clone();
            match status {
                Some(s) => next["status"] = s,
                None => {
                    next.as_object_mut().unwrap().remove("status");
                }
            }
        } else {
            match old.get("status") {
                Some(s) => next["status"] = s.clone(),
                None => {
                    if let Some(o) = next.as_object_mut() {
                        o.remove("status");
                    }
                }
            }
        }
        for field in [
            "uid",
            "creationTimestamp",
            "deletionTimestamp",
            "name",
            "namespace",
        ] {
            match meta(&old, field) {
                Some(v) => set_meta(&mut next, field, v),
                None => {
                    if let Some(m) = next["metadata"].as_object_mut() {
                        m.remove(field);
                    }
                }
            }
        }
        let generation = meta(&old, "generation")
            .and_then(|g| g.as_i64())
            .unwrap_or(1);
        let changed_spec = old.get("spec") != next.get("spec");
        set_meta(
            &mut next,
            "generation",
            json!(generation + i64::from(changed_spec)),
        );
        set_meta(
            &mut next,
            "resourceVersion",
            meta(&old, "resourceVersion").unwrap(),
        );
        if next == old {
            return respond(StatusCode::OK, &next);
        }
        let rv = self.next_rv();
        set_meta(&mut next, "resourceVersion", json!(rv.to_string()));
        if meta(&next, "deletionTimestamp").is_some() && !has_finalizers(&next) {
            self.objects.remove(key);
            self.emit(key, "DELETED", next.clone());
        } else {
            self.objects.insert(key.clone(), next.clone());
            self.emit(key, "MODIFIED", next.clone());
        }
        respond(StatusCode::OK, &next)
    }

    fn delete(&mut self, key: &Key) -> Response<FakeBody> {
        let Some(mut obj) = self.objects.get(key).cloned() else {
            return not_found(key);
        };
        let rv = self.next_rv();
        set_meta(&mut obj, "resourceVersion", json!(rv.to_string()));
        if has_finalizers(&obj) {
            if meta(&obj, "deletionTimestamp").is_none() {
                set_meta(&mut obj, "deletionTimestamp", json!(now()));
            }
            self.objects.insert(key.clone(), obj.clone());
            self.emit(key, "MODIFIED", obj.clone());
        } else {
            self.objects.remove(key);
            self.emit(key, "DELETED", obj.clone());
        }
        respond(StatusCode::OK, &obj)
    }

    fn list(&self, t: &Target) -> Value {
        let items: Vec<Value> = self
            .objects
            .iter()
            .filter(|((c, ns, _), _)| {
                *c == t.collection && t.namespace.as_ref().is_none_or(|n| n == ns)
            })
            .map(|(_, v)| v.clone())
            .collect();
        json!({
            "apiVersion": "v1", "kind": "List",
            "metadata": {"resourceVersion": self.rv.to_string()},
            "items": items,
        })
    }
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
        let mut store = self.store.lock().unwrap();
        store.requests.push(line.clone());
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

impl Store {
    /// `None`: not implemented.
    fn route(
        &mut self,
        method: &Method,
        t: &Target,
        q: &BTreeMap<String, String>,
        content_type: &str,
        sent: Option<Value>,
    ) -> Option<Response<FakeBody>> {
        if q.keys()
            .any(|k| k == "labelSelector" || k == "fieldSelector")
        {
            return None;
        }
        let key = |name: &str| {
            (
                t.collection.clone(),
                t.namespace.clone().unwrap_or_default(),
                name.to_owned(),
            )
        };
        if let Some(sub) = &t.subresource
            && sub != "status"
        {
            return None;
        }
        Some(match (method, &t.name) {
            (&Method::GET, None) if q.get("watch").is_some_and(|w| w == "true" || w == "1") => {
                self.watch(t, q.get("resourceVersion").map(String::as_str))
            }
            (&Method::GET, None) => respond(StatusCode::OK, &self.list(t)),
            (&Method::GET, Some(name)) => match self.objects.get(&key(name)) {
                Some(obj) => respond(StatusCode::OK, obj),
                None => not_found(&key(name)),
            },
            (&Method::POST, None) => self.create(t, sent?),
            (&Method::PUT, Some(name)) => {
                let k = key(name);
                let Some(old) = self.objects.get(&k) else {
                    return Some(not_found(&k));
                };
                let next = sent?;
                if let Some(rv) = meta(&next, "resourceVersion")
                    && Some(&rv) != meta(old, "resourceVersion").as_ref()
                {
                    return Some(conflict(name));
                }
                self.update(&k, next, t.subresource.as_deref())
            }
            (&Method::PATCH, Some(name)) => self.patch(t, &key(name), content_type, sent?)?,
            (&Method::DELETE, Some(name)) => self.delete(&key(name)),
            _ => return None,
        })
    }

    fn patch(
        &mut self,
        t: &Target,
        k: &Key,
        content_type: &str,
        patch: Value,
    ) -> Option<Response<FakeBody>> {
        let kind = content_type.split(';').next().unwrap_or_default().trim();
        let Some(old) = self.objects.get(k).cloned() else {
            if kind == "application/apply-patch+yaml" && t.subresource.is_none() {
                return Some(self.create(t, patch));
            }
            return Some(not_found(k));
        };
        let mut next = old.clone();
        match kind {
            "application/merge-patch+json" | "application/apply-patch+yaml" => {
                if let Some(rv) = meta(&patch, "resourceVersion")
                    && Some(&rv) != meta(&old, "resourceVersion").as_ref()
                {
                    return Some(conflict(&k.2));
                }
                json_patch::merge(&mut next, &patch);
            }
            "application/json-patch+json" => {
                // Like the API server: `test` for null passes on a missing path.
                let mut patch = patch;
                if let Some(ops) = patch.as_array_mut() {
                    let mut failed = None;
                    ops.retain(|op| {
                        let null_test = op["op"] == "test" && op["value"].is_null();
                        if null_test {
                            let path = op["path"].as_str().unwrap_or_default();
                            if old.pointer(path).is_some_and(|v| !v.is_null()) {
                                failed = Some(path.to_owned());
                            }
                        }
                        !null_test
                    });
                    if let Some(path) = failed {
                        return Some(status(
                            StatusCode::UNPROCESSABLE_ENTITY,
                            "Invalid",
                            &format!("test failed: {path} is not null"),
                        ));
                    }
                }
                let ops: json_patch::Patch = match serde_json::from_value(patch) {
                    Ok(p) => p,
                    Err(e) => {
                        return Some(status(
                            StatusCode::BAD_REQUEST,
                            "BadRequest",
                            &e.to_string(),
                        ));
                    }
                };
                if let Err(e) = json_patch::patch(&mut next, &ops) {
                    return Some(status(
                        StatusCode::UNPROCESSABLE_ENTITY,
                        "Invalid",
                        &e.to_string(),
                    ));
                }
            }
            _ => return None,
        }
        Some(self.update(k, next, t.subresource.as_deref()))
    }

    fn watch(&mut self, t: &Target, from: Option<&str>) -> Response<FakeBody> {
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel::<Bytes>();
        let from = from.and_then(|v| v.parse::<u64>().ok()).filter(|v| *v > 0);
        let in_scope =
            |c: &str, ns: &str| c == t.collection && t.namespace.as_ref().is_none_or(|n| n == ns);
        match from {
            // Replay what happened since the version the client saw.
            Some(rv) => {
                for e in self
                    .log
                    .iter()
                    .filter(|e| e.rv > rv && in_scope(&e.collection, &e.namespace))
                {
                    let _ = tx.send(watch_line(e.kind, &e.object));
                }
            }
            // No version: the current objects as ADDED, then changes.
            None => {
                for ((c, ns, _), obj) in &self.objects {
                    if in_scope(c, ns) {
                        let _ = tx.send(watch_line("ADDED", obj));
                    }
                }
            }
        }
        self.watchers.push(Watcher {
            collection: t.collection.clone(),
            namespace: t.namespace.clone(),
            tx,
        });
        let stream = tokio_stream::wrappers::UnboundedReceiverStream::new(rx);
        Response::builder()
            .status(StatusCode::OK)
            .header("content-type", "application/json")
            .body(FakeBody(Box::pin(stream)))
            .unwrap()
    }
}

fn conflict(name: &str) -> Response<FakeBody> {
    status(
        StatusCode::CONFLICT,
        "Conflict",
        &format!("Operation cannot be fulfilled on {name}: the object has been modified"),
    )
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
