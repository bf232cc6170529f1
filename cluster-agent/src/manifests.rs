//! Standalone intent: a directory of YAML manifests, the same `L2Network`
//! documents as in Kubernetes plus one `Nodes` document describing the
//! cluster's nodes:
//!
//! ```yaml
//! apiVersion: l2mesh.io/v1alpha1
//! kind: Nodes
//! nodes:
//!   - name: gw-1
//!     gateway: true
//!     endpoint: 192.0.2.10:51820
//!   - name: worker-1
//! ```

use crate::crd::{GROUP, L2Network, VERSION};
use crate::desired::NodeEntry;
use serde::Deserialize;
use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

/// Everything read from the directory.
#[derive(Clone, Debug, Default)]
pub struct Manifests {
    pub nodes: Vec<NodeEntry>,
    pub networks: Vec<L2Network>,
}

/// A manifest directory that cannot be used; the previous state stays in force.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("manifests in {dir}: {}", problems.join("; "))]
pub struct ManifestError {
    pub dir: String,
    pub problems: Vec<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct NodesDoc {
    #[serde(rename = "apiVersion")]
    _api_version: String,
    #[serde(rename = "kind")]
    _kind: String,
    #[serde(default)]
    #[allow(dead_code)]
    metadata: Option<serde_yaml::Value>,
    nodes: Vec<NodeEntry>,
}

/// The YAML files of a directory, sorted, with their contents.
pub fn read_dir(dir: &Path) -> Result<Vec<(PathBuf, String)>, ManifestError> {
    let err = |p: String| ManifestError {
        dir: dir.display().to_string(),
        problems: vec![p],
    };
    let entries =
        std::fs::read_dir(dir).map_err(|e| err(format!("cannot read the directory: {e}")))?;
    let mut files = Vec::new();
    for entry in entries {
        let path = entry.map_err(|e| err(e.to_string()))?.path();
        let yaml = path.extension().is_some_and(|e| e == "yaml" || e == "yml");
        if yaml && path.is_file() {
            let text = std::fs::read_to_string(&path)
                .map_err(|e| err(format!("{}: {e}", path.display())))?;
            files.push((path, text));
        }
    }
    files.sort();
    Ok(files)
}

/// Parse the files; every problem is collected, none is partially applied.
pub fn parse(dir: &Path, files: &[(PathBuf, String)]) -> Result<Manifests, ManifestError> {
    let mut out = Manifests::default();
    let mut problems = Vec::new();
    let api_version = format!("{GROUP}/{VERSION}");
    for (path, text) in files {
        let name = path
            .file_name()
            .map_or_else(String::new, |n| n.to_string_lossy().into_owned());
        for (i, doc) in serde_yaml::Deserializer::from_str(text).enumerate() {
            let at = format!("{name} document {}", i + 1);
            let value = match serde_yaml::Value::deserialize(doc) {
                Ok(serde_yaml::Value::Null) => continue,
                Ok(v) => v,
                Err(e) => {
                    problems.push(format!("{at}: not valid YAML: {e}"));
                    break;
                }
            };
            let kind = value
                .get("kind")
                .and_then(|k| k.as_str())
                .unwrap_or_default();
            let version = value
                .get("apiVersion")
                .and_then(|k| k.as_str())
                .unwrap_or_default();
            if version != api_version {
                problems.push(format!(
                    "{at}: apiVersion is {version:?}; use {api_version}"
                ));
                continue;
            }
            match kind {
                "L2Network" => match serde_yaml::from_value::<L2Network>(value) {
                    Ok(mut net) => {
                        if net.metadata.namespace.is_none() {
                            net.metadata.namespace = Some("default".into());
                        }
                        out.networks.push(net);
                    }
                    Err(e) => problems.push(format!("{at}: L2Network: {e}")),
                },
                "Nodes" => match serde_yaml::from_value::<NodesDoc>(value) {
                    Ok(doc) => out.nodes.extend(doc.nodes),
                    Err(e) => problems.push(format!("{at}: Nodes: {e}")),
                },
                other => problems.push(format!("{at}: kind {other:?} is not L2Network or Nodes")),
            }
        }
    }
    let mut names = BTreeSet::new();
    for n in &out.nodes {
        if n.name.is_empty() {
            problems.push("a node has an empty name".into());
        } else if !names.insert(n.name.clone()) {
            problems.push(format!("node {:?} is listed twice", n.name));
        }
        if let Some(ep) = &n.endpoint
            && ep.parse::<std::net::SocketAddr>().is_err()
        {
            problems.push(format!("node {:?}: endpoint {ep:?} is not ip:port", n.name));
        }
    }
    let mut keys = BTreeSet::new();
    for net in &out.networks {
        if !keys.insert(net.key()) {
            problems.push(format!("L2Network {} is defined twice", net.key()));
        }
    }
    if problems.is_empty() {
        Ok(out)
    } else {
        Err(ManifestError {
            dir: dir.display().to_string(),
            problems,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn files(list: &[(&str, &str)]) -> Vec<(PathBuf, String)> {
        list.iter()
            .map(|(n, t)| (PathBuf::from(n), (*t).to_owned()))
            .collect()
    }

    const GOOD: &str = "apiVersion: l2mesh.io/v1alpha1\nkind: Nodes\nnodes:\n  - {name: gw, gateway: true, endpoint: '10.0.0.1:51820'}\n  - {name: w1}\n---\napiVersion: l2mesh.io/v1alpha1\nkind: L2Network\nmetadata: {name: blue}\nspec: {ipRange: 10.1.0.0/16}\n";

    #[test]
    fn nodes_and_networks_are_read() {
        let m = parse(Path::new("d"), &files(&[("a.yaml", GOOD)])).unwrap();
        assert_eq!(m.nodes.len(), 2);
        assert!(m.nodes[0].gateway);
        assert_eq!(m.networks[0].key(), "default/blue");
    }

    #[test]
    fn every_problem_is_reported_with_its_place() {
        let bad = "apiVersion: l2mesh.io/v1alpha1\nkind: Pod\n---\napiVersion: v1\nkind: L2Network\n---\napiVersion: l2mesh.io/v1alpha1\nkind: Nodes\nnodes: [{name: a, endpoint: nope}, {name: a}]\n---\napiVersion: l2mesh.io/v1alpha1\nkind: L2Network\nmetadata: {name: x}\nspec: {scope: wide}\n";
        let e = parse(Path::new("d"), &files(&[("b.yaml", bad)])).unwrap_err();
        let text = e.to_string();
        for want in [
            "b.yaml document 1: kind \"Pod\"",
            "document 2: apiVersion",
            "not ip:port",
            "listed twice",
            "document 4: L2Network",
        ] {
            assert!(text.contains(want), "{want} missing in {text}");
        }
        let e = parse(Path::new("d"), &files(&[("c.yaml", "a: [")])).unwrap_err();
        assert!(e.to_string().contains("not valid YAML"));
        let e = parse(
            Path::new("d"),
            &files(&[("a.yaml", GOOD), ("b.yaml", GOOD)]),
        )
        .unwrap_err();
        assert!(e.to_string().contains("defined twice"));
    }

    #[test]
    fn directory_reading_takes_only_yaml_files() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("net.yaml"), GOOD).unwrap();
        std::fs::write(dir.path().join("README.md"), "# not yaml").unwrap();
        let f = read_dir(dir.path()).unwrap();
        assert_eq!(f.len(), 1);
        assert!(read_dir(&dir.path().join("missing")).is_err());
    }
}
