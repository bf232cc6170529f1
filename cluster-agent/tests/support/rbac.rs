//! deploy/agent-rbac.yaml against what the agent really asks the API server:
//! each recorded request (`<caller> METHOD uri`) is mapped to the verb,
//! API group, resource and namespace RBAC authorizes, and must be allowed by
//! the ClusterRole or (in the agent's namespace) the Role.
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)]

use serde_json::Value;

/// What RBAC sees of one request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Access {
    pub verb: String,
    pub group: String,
    /// `resource` or `resource/subresource`.
    pub resource: String,
    pub namespace: Option<String>,
    pub name: Option<String>,
}

/// Maps `METHOD /api...` (with query) to an [`Access`].
#[must_use]
pub fn access(method: &str, uri: &str) -> Option<Access> {
    let (path, query) = uri.split_once('?').unwrap_or((uri, ""));
    let parts: Vec<&str> = path.trim_start_matches('/').split('/').collect();
    let (group, rest) = match *parts.first()? {
        "api" => (String::new(), parts.get(2..)?),
        "apis" => (parts.get(1)?.to_string(), parts.get(3..)?),
        _ => return None,
    };
    let (namespace, rest) = if rest.first() == Some(&"namespaces") && rest.len() > 2 {
        (Some(rest[1].to_owned()), &rest[2..])
    } else {
        (None, rest)
    };
    let resource = rest.first()?.to_string();
    let name = rest.get(1).map(|n| n.to_string());
    let resource = match rest.get(2) {
        Some(sub) => format!("{resource}/{sub}"),
        None => resource,
    };
    let watch = query
        .split('&')
        .any(|kv| kv == "watch=true" || kv == "watch=1");
    let verb = match (method, name.is_some()) {
        ("GET", _) if watch => "watch",
        ("GET", true) => "get",
        ("GET", false) => "list",
        ("POST", _) => "create",
        ("PUT", _) => "update",
        ("PATCH", _) => "patch",
        ("DELETE", true) => "delete",
        ("DELETE", false) => "deletecollection",
        _ => return None,
    };
    Some(Access {
        verb: verb.to_owned(),
        group,
        resource,
        namespace,
        name,
    })
}

fn strings(v: &Value) -> Vec<String> {
    v.as_array()
        .into_iter()
        .flatten()
        .filter_map(|s| s.as_str().map(str::to_owned))
        .collect()
}

fn rule_allows(rule: &Value, a: &Access) -> bool {
    let names = strings(&rule["resourceNames"]);
    strings(&rule["verbs"]).contains(&a.verb)
        && strings(&rule["apiGroups"]).contains(&a.group)
        && strings(&rule["resources"]).contains(&a.resource)
        && (names.is_empty() || a.name.as_ref().is_some_and(|n| names.contains(n)))
}

/// The rules of deploy/agent-rbac.yaml: (cluster-wide, in the agent's namespace).
#[must_use]
pub fn shipped_rules() -> (Vec<Value>, Vec<Value>) {
    rules_of("agent-rbac.yaml")
}

/// The rules of a manifest in deploy/: (cluster-wide, namespaced).
#[must_use]
pub fn rules_of(deploy_file: &str) -> (Vec<Value>, Vec<Value>) {
    use serde::Deserialize as _;
    let path = format!("{}/../deploy/{deploy_file}", env!("CARGO_MANIFEST_DIR"));
    let text = std::fs::read_to_string(path).unwrap();
    let mut cluster = Vec::new();
    let mut namespaced = Vec::new();
    for doc in serde_yaml::Deserializer::from_str(&text) {
        let v: Value = serde_json::to_value(serde_yaml::Value::deserialize(doc).unwrap()).unwrap();
        let rules = v["rules"].as_array().cloned().unwrap_or_default();
        match v["kind"].as_str() {
            Some("ClusterRole") => cluster.extend(rules),
            Some("Role") => namespaced.extend(rules),
            _ => {}
        }
    }
    (cluster, namespaced)
}

/// Panics naming every request of a caller starting with `caller_prefix`
/// that the shipped RBAC would refuse (the agent runs in `namespace`).
pub fn assert_allowed_by_shipped_rbac(requests: &[String], caller_prefix: &str, namespace: &str) {
    assert_allowed_by_rbac("agent-rbac.yaml", requests, caller_prefix, namespace);
}

/// Like [`assert_allowed_by_shipped_rbac`] for the rules of `deploy_file`.
pub fn assert_allowed_by_rbac(
    deploy_file: &str,
    requests: &[String],
    caller_prefix: &str,
    namespace: &str,
) {
    let (cluster, namespaced) = rules_of(deploy_file);
    let mut refused = Vec::new();
    let mut checked = 0;
    for line in requests.iter().filter(|l| l.starts_with(caller_prefix)) {
        let mut words = line.split_whitespace().skip(1);
        let (Some(method), Some(uri)) = (words.next(), words.next()) else {
            continue;
        };
        let Some(a) = access(method, uri) else {
            refused.push(format!("{line} (not an API request)"));
            continue;
        };
        checked += 1;
        let ok = cluster.iter().any(|r| rule_allows(r, &a))
            || (a.namespace.as_deref() == Some(namespace)
                && namespaced.iter().any(|r| rule_allows(r, &a)));
        if !ok {
            refused.push(format!("{line} -> {a:?}"));
        }
    }
    assert!(checked > 0, "no request of {caller_prefix}* to check");
    refused.dedup();
    assert!(
        refused.is_empty(),
        "deploy/{deploy_file} refuses what the caller does:\n{}",
        refused.join("\n")
    );
}

#[test]
fn requests_map_to_what_rbac_authorizes() {
    let a = access(
        "GET",
        "/apis/l2mesh.io/v1alpha1/l2networks?&watch=true&timeoutSeconds=290",
    )
    .unwrap();
    assert_eq!(
        (a.verb.as_str(), a.group.as_str(), a.resource.as_str()),
        ("watch", "l2mesh.io", "l2networks")
    );
    let a = access(
        "PATCH",
        "/apis/l2mesh.io/v1alpha1/namespaces/default/l2networks/blue/status?",
    )
    .unwrap();
    assert_eq!(
        (a.verb.as_str(), a.resource.as_str()),
        ("patch", "l2networks/status")
    );
    assert_eq!(a.namespace.as_deref(), Some("default"));
    let a = access(
        "PUT",
        "/api/v1/namespaces/l2mesh-system/secrets/l2mesh-node-sync",
    )
    .unwrap();
    assert_eq!((a.verb.as_str(), a.group.as_str()), ("update", ""));
    assert_eq!(a.name.as_deref(), Some("l2mesh-node-sync"));
    assert_eq!(access("GET", "/api/v1/nodes").unwrap().verb, "list");
}
