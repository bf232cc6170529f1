//! The fake API server's store: objects, the event log and watchers.

use super::*;

impl Store {
    pub(super) fn next_rv(&mut self) -> u64 {
        self.rv += 1;
        self.rv
    }

    /// Record an event and hand it to the matching watchers.
    pub(super) fn emit(&mut self, key: &Key, kind: &'static str, object: Value) {
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

    pub(super) fn create(&mut self, t: &Target, mut obj: Value) -> Response<FakeBody> {
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
    pub(super) fn update(
        &mut self,
        key: &Key,
        mut next: Value,
        sub: Option<&str>,
    ) -> Response<FakeBody> {
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

    pub(super) fn delete(&mut self, key: &Key) -> Response<FakeBody> {
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

    pub(super) fn list(&self, t: &Target) -> Value {
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

impl Store {
    /// `None`: not implemented.
    pub(super) fn route(
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

    pub(super) fn patch(
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

    pub(super) fn watch(&mut self, t: &Target, from: Option<&str>) -> Response<FakeBody> {
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
