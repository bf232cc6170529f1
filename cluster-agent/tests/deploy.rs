//! Every manifest in deploy/ parses as the Kubernetes type it claims to be,
//! with no field lost on the way (a misspelled field would be dropped by the
//! typed parse). The charts are rendered and validated by deploy/validate.py.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use k8s_openapi::api::apps::v1::{DaemonSet, Deployment};
use k8s_openapi::api::batch::v1::Job;
use k8s_openapi::api::core::v1::{
    Namespace, PersistentVolumeClaim, ResourceQuota, Secret, Service, ServiceAccount,
};
use k8s_openapi::api::rbac::v1::{ClusterRole, ClusterRoleBinding, Role, RoleBinding};
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use serde::Serialize;
use serde::de::DeserializeOwned;
use serde_json::Value;
use std::path::{Path, PathBuf};

fn deploy_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy")
}

fn docs(text: &str, origin: &str) -> Vec<Value> {
    use serde::Deserialize as _;
    serde_yaml::Deserializer::from_str(text)
        .map(|d| {
            let v = serde_yaml::Value::deserialize(d).unwrap_or_else(|e| panic!("{origin}: {e}"));
            serde_json::to_value(v).unwrap()
        })
        .filter(|v| !v.is_null())
        .collect()
}

fn round_trip<T: DeserializeOwned + Serialize>(doc: &Value, origin: &str) {
    let typed: T = serde_json::from_value(doc.clone())
        .unwrap_or_else(|e| panic!("{origin}: {} does not parse: {e}", doc["kind"]));
    let back = serde_json::to_value(&typed).unwrap();
    assert_eq!(
        &back, doc,
        "{origin}: {} lost or changed fields in the typed parse",
        doc["kind"]
    );
}

fn check_doc(doc: &Value, origin: &str) -> String {
    let kind = doc["kind"].as_str().unwrap_or_default().to_owned();
    match kind.as_str() {
        "Namespace" => round_trip::<Namespace>(doc, origin),
        "PersistentVolumeClaim" => round_trip::<PersistentVolumeClaim>(doc, origin),
        "ResourceQuota" => round_trip::<ResourceQuota>(doc, origin),
        "Deployment" => round_trip::<Deployment>(doc, origin),
        "DaemonSet" => round_trip::<DaemonSet>(doc, origin),
        "Service" => round_trip::<Service>(doc, origin),
        "ServiceAccount" => round_trip::<ServiceAccount>(doc, origin),
        "Secret" => round_trip::<Secret>(doc, origin),
        "ClusterRole" => round_trip::<ClusterRole>(doc, origin),
        "ClusterRoleBinding" => round_trip::<ClusterRoleBinding>(doc, origin),
        "Role" => round_trip::<Role>(doc, origin),
        "RoleBinding" => round_trip::<RoleBinding>(doc, origin),
        "Job" => round_trip::<Job>(doc, origin),
        "CustomResourceDefinition" => round_trip::<CustomResourceDefinition>(doc, origin),
        other => panic!("{origin}: kind {other:?} has no check; add it to this test"),
    }
    kind
}

fn yaml_files(dir: &Path) -> Vec<PathBuf> {
    let mut out: Vec<PathBuf> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "yaml"))
        .collect();
    out.sort();
    out
}

#[test]
fn every_plain_manifest_parses_as_its_kubernetes_type() {
    let mut kinds = Vec::new();
    for dir in [deploy_dir(), deploy_dir().join("crds")] {
        for file in yaml_files(&dir) {
            let text = std::fs::read_to_string(&file).unwrap();
            for doc in docs(&text, &file.display().to_string()) {
                kinds.push(check_doc(&doc, &file.display().to_string()));
            }
        }
    }
    for want in [
        "DaemonSet",
        "Deployment",
        "ClusterRole",
        "CustomResourceDefinition",
        "Service",
        "Job",
    ] {
        assert!(kinds.iter().any(|k| k == want), "no {want} in deploy/");
    }
}

/// The chart's templates are rendered by Helm's own engine in
/// `deploy/validate.py` (run by the e2e test `manifests`); here only what
/// needs no Helm: the chart is a v2 chart and ships the current CRDs.
#[test]
fn helm_charts_ship_the_current_crds() {
    let chart = deploy_dir().join("helm/l2mesh");
    let meta: serde_yaml::Value =
        serde_yaml::from_str(&std::fs::read_to_string(chart.join("Chart.yaml")).unwrap()).unwrap();
    assert_eq!(meta["apiVersion"], "v2");
    assert_eq!(meta["name"], "l2mesh");
    let crd = std::fs::read_to_string(chart.join("crds/l2network.yaml")).unwrap();
    assert_eq!(
        crd,
        l2mesh_cluster_agent::crd::crds_yaml().unwrap(),
        "deploy/helm/l2mesh/crds/l2network.yaml is stale: copy deploy/crds/l2network.yaml there"
    );
}

#[test]
fn rbac_is_least_privilege() {
    for file in ["agent-rbac.yaml", "uninstall.yaml"] {
        least_privilege(file);
    }
}

fn least_privilege(file: &str) {
    let text = std::fs::read_to_string(deploy_dir().join(file)).unwrap();
    for doc in docs(&text, file) {
        let Some(rules) = doc["rules"].as_array() else {
            continue;
        };
        for rule in rules {
            let list = |k: &str| -> Vec<String> {
                rule[k]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .map(|v| v.as_str().unwrap().to_owned())
                    .collect()
            };
            for k in ["verbs", "resources", "apiGroups"] {
                assert!(!list(k).contains(&"*".to_owned()), "wildcard {k} in {rule}");
            }
            if list("resources").contains(&"secrets".to_owned()) {
                assert_eq!(doc["kind"], "Role", "secrets only in the agent's namespace");
                let verbs = list("verbs");
                assert!(
                    !verbs.iter().any(|v| v == "list" || v == "watch"),
                    "no listing secrets: {rule}"
                );
                if verbs.iter().any(|v| v == "get") {
                    assert!(
                        rule["resourceNames"].is_array(),
                        "secret reads are limited by name"
                    );
                }
            }
        }
    }
}

#[test]
fn dataplane_daemonset_has_what_a_node_needs_and_no_more() {
    let text = std::fs::read_to_string(deploy_dir().join("dataplane.yaml")).unwrap();
    let ds: DaemonSet = serde_json::from_value(docs(&text, "dataplane.yaml").remove(0)).unwrap();
    let spec = ds.spec.template.spec.unwrap();
    assert_eq!(spec.host_network, Some(true));
    let c = &spec.containers[0];
    let sc = c.security_context.clone().unwrap();
    assert_ne!(
        sc.privileged,
        Some(true),
        "NET_ADMIN is enough; no privileged pods"
    );
    let caps = sc.capabilities.unwrap().add.unwrap();
    assert!(caps.contains(&"NET_ADMIN".to_owned()));
    let init = &spec.init_containers.unwrap()[0];
    assert!(
        init.command
            .as_ref()
            .unwrap()
            .iter()
            .any(|a| a.ends_with("l2mesh-cni"))
    );
    let vols = spec.volumes.unwrap();
    assert!(vols.iter().any(|v| {
        v.host_path
            .as_ref()
            .is_some_and(|h| h.path == "/opt/cni/bin")
    }));
}
