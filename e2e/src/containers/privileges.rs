//! What a container of a shipped manifest may do, read from the manifest
//! itself, and the `podman run` flags that give a container exactly that:
//! the same user, capabilities, read-only root, seccomp and no-new-privileges
//! as the kubelet would set, and the same volumes. Pure: no podman here.

use serde_json::Value;

use crate::{Error, Result};

/// Where a volume of the pod comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum VolumeSource {
    /// A host path; `kind` is its `type` (`CharDevice`, `DirectoryOrCreate`, ...).
    HostPath { path: String, kind: String },
    /// A Secret (files, read-only).
    Secret { name: String },
    /// A PersistentVolumeClaim.
    Claim { name: String },
    /// An emptyDir.
    EmptyDir,
}

/// One volume mount of the container.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Mount {
    pub volume: String,
    pub source: VolumeSource,
    pub path: String,
    pub read_only: bool,
}

/// The security-relevant settings of one container of a workload.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Privileges {
    pub container: String,
    pub host_network: bool,
    pub run_as_user: Option<i64>,
    pub run_as_group: Option<i64>,
    pub drop_all: bool,
    pub cap_add: Vec<String>,
    pub read_only_root: bool,
    pub no_new_privileges: bool,
    /// `RuntimeDefault` seccomp (else the kubelet's default, unconfined).
    pub seccomp_runtime_default: bool,
    pub mounts: Vec<Mount>,
    pub command: Vec<String>,
    pub args: Vec<String>,
}

fn strings(v: &Value) -> Vec<String> {
    v.as_array()
        .into_iter()
        .flatten()
        .filter_map(|s| s.as_str().map(str::to_owned))
        .collect()
}

fn bad(workload: &str, what: String) -> Error {
    Error::Check(format!("manifest {workload}: {what}"))
}

/// The privileges of container (or init container) `container` of the
/// Deployment/DaemonSet `doc`. Refuses what the test cannot reproduce or
/// what the project's manifests must never ask for (`privileged`).
pub fn of_container(doc: &Value, container: &str) -> Result<Privileges> {
    let workload = doc["metadata"]["name"].as_str().unwrap_or("?").to_owned();
    let pod = &doc["spec"]["template"]["spec"];
    let all = pod["containers"]
        .as_array()
        .into_iter()
        .flatten()
        .chain(pod["initContainers"].as_array().into_iter().flatten());
    let c = all
        .into_iter()
        .find(|c| c["name"] == container)
        .ok_or_else(|| bad(&workload, format!("no container {container}")))?;
    let psc = &pod["securityContext"];
    let sc = &c["securityContext"];
    // A container's own setting wins over the pod's.
    let pick = |key: &str| {
        if sc[key].is_null() {
            psc[key].clone()
        } else {
            sc[key].clone()
        }
    };
    if sc["privileged"] == true {
        return Err(bad(&workload, format!("{container} asks to be privileged")));
    }
    let seccomp = pick("seccompProfile");
    let mut p = Privileges {
        container: container.to_owned(),
        host_network: pod["hostNetwork"] == true,
        run_as_user: pick("runAsUser").as_i64(),
        run_as_group: pick("runAsGroup").as_i64(),
        drop_all: strings(&sc["capabilities"]["drop"])
            .iter()
            .any(|d| d == "ALL"),
        cap_add: strings(&sc["capabilities"]["add"]),
        read_only_root: sc["readOnlyRootFilesystem"] == true,
        no_new_privileges: sc["allowPrivilegeEscalation"] == false,
        seccomp_runtime_default: seccomp["type"] == "RuntimeDefault",
        mounts: Vec::new(),
        command: strings(&c["command"]),
        args: strings(&c["args"]),
    };
    for m in c["volumeMounts"].as_array().into_iter().flatten() {
        let name = m["name"].as_str().unwrap_or_default();
        let vol = pod["volumes"]
            .as_array()
            .into_iter()
            .flatten()
            .find(|v| v["name"] == name)
            .ok_or_else(|| bad(&workload, format!("mount of unknown volume {name}")))?;
        let source = if let Some(hp) = vol.get("hostPath") {
            VolumeSource::HostPath {
                path: hp["path"].as_str().unwrap_or_default().to_owned(),
                kind: hp["type"].as_str().unwrap_or_default().to_owned(),
            }
        } else if let Some(s) = vol.get("secret") {
            VolumeSource::Secret {
                name: s["secretName"].as_str().unwrap_or_default().to_owned(),
            }
        } else if let Some(c) = vol.get("persistentVolumeClaim") {
            VolumeSource::Claim {
                name: c["claimName"].as_str().unwrap_or_default().to_owned(),
            }
        } else if vol.get("emptyDir").is_some() {
            VolumeSource::EmptyDir
        } else {
            return Err(bad(&workload, format!("volume {name} of an unknown kind")));
        };
        p.mounts.push(Mount {
            volume: name.to_owned(),
            read_only: m["readOnly"] == true || matches!(source, VolumeSource::Secret { .. }),
            source,
            path: m["mountPath"].as_str().unwrap_or_default().to_owned(),
        });
    }
    p.cap_add.sort();
    Ok(p)
}

impl Privileges {
    /// `podman run` flags for these privileges. `host_dir(mount)` names the
    /// directory (or file) of this host that stands in for a volume; a
    /// character device host path is bound as itself, as the kubelet does.
    pub fn podman_flags(
        &self,
        host_dir: &dyn Fn(&Mount) -> Option<std::path::PathBuf>,
    ) -> Result<Vec<String>> {
        let mut f = Vec::new();
        match (self.run_as_user, self.run_as_group) {
            (Some(u), Some(g)) => f.push(format!("--user={u}:{g}")),
            (Some(u), None) => f.push(format!("--user={u}")),
            _ => {}
        }
        if self.drop_all {
            f.push("--cap-drop=all".to_owned());
        }
        for cap in &self.cap_add {
            f.push(format!("--cap-add={cap}"));
        }
        if self.read_only_root {
            // Kubernetes adds no tmpfs on a read-only root; podman would.
            f.extend([
                "--read-only".to_owned(),
                "--read-only-tmpfs=false".to_owned(),
            ]);
        }
        if self.no_new_privileges {
            f.push("--security-opt=no-new-privileges".to_owned());
        }
        if !self.seccomp_runtime_default {
            f.push("--security-opt=seccomp=unconfined".to_owned());
        }
        for m in &self.mounts {
            let ro = if m.read_only { ":ro" } else { "" };
            match &m.source {
                VolumeSource::HostPath { path, kind } if kind == "CharDevice" => {
                    f.push(format!("--volume={path}:{}{ro}", m.path));
                }
                _ => {
                    let dir = host_dir(m).ok_or_else(|| {
                        Error::Check(format!(
                            "{}: no host directory given for volume {} ({:?})",
                            self.container, m.volume, m.source
                        ))
                    })?;
                    f.push(format!("--volume={}:{}{ro}", dir.display(), m.path));
                }
            }
        }
        Ok(f)
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use serde_json::json;

    fn daemonset() -> Value {
        json!({
            "metadata": {"name": "dp"},
            "spec": {"template": {"spec": {
                "hostNetwork": true,
                "securityContext": {"seccompProfile": {"type": "RuntimeDefault"}, "runAsUser": 5},
                "initContainers": [{"name": "init", "securityContext": {"runAsUser": 0}}],
                "containers": [{
                    "name": "dp",
                    "command": ["l2mesh-dataplane"],
                    "args": ["run"],
                    "securityContext": {
                        "runAsUser": 0,
                        "allowPrivilegeEscalation": false,
                        "readOnlyRootFilesystem": true,
                        "capabilities": {"drop": ["ALL"], "add": ["NET_RAW", "NET_ADMIN"]}
                    },
                    "volumeMounts": [
                        {"name": "tun", "mountPath": "/dev/net/tun"},
                        {"name": "sync", "mountPath": "/etc/sync"},
                        {"name": "state", "mountPath": "/var/lib/x"}
                    ]
                }],
                "volumes": [
                    {"name": "tun", "hostPath": {"path": "/dev/net/tun", "type": "CharDevice"}},
                    {"name": "sync", "secret": {"secretName": "s"}},
                    {"name": "state", "hostPath": {"path": "/var/lib/x", "type": "DirectoryOrCreate"}}
                ]
            }}}
        })
    }

    #[test]
    fn container_settings_win_over_the_pods_and_become_podman_flags() {
        let p = of_container(&daemonset(), "dp").unwrap();
        assert!(p.host_network && p.drop_all && p.read_only_root && p.no_new_privileges);
        assert_eq!(p.run_as_user, Some(0));
        assert_eq!(p.cap_add, ["NET_ADMIN", "NET_RAW"]);
        assert_eq!(p.command, ["l2mesh-dataplane"]);
        let flags = p
            .podman_flags(&|m| Some(format!("/tmp/lab/{}", m.volume).into()))
            .unwrap();
        assert_eq!(
            flags,
            [
                "--user=0",
                "--cap-drop=all",
                "--cap-add=NET_ADMIN",
                "--cap-add=NET_RAW",
                "--read-only",
                "--read-only-tmpfs=false",
                "--security-opt=no-new-privileges",
                "--volume=/dev/net/tun:/dev/net/tun",
                "--volume=/tmp/lab/sync:/etc/sync:ro",
                "--volume=/tmp/lab/state:/var/lib/x",
            ]
        );
    }

    #[test]
    fn privileged_containers_and_unknown_names_are_refused() {
        let mut ds = daemonset();
        ds["spec"]["template"]["spec"]["containers"][0]["securityContext"]["privileged"] =
            json!(true);
        assert!(of_container(&ds, "dp").is_err());
        assert!(of_container(&daemonset(), "nope").is_err());
        let init = of_container(&daemonset(), "init").unwrap();
        assert_eq!(init.run_as_user, Some(0));
        assert!(!init.drop_all);
    }

    #[test]
    fn no_seccomp_profile_means_unconfined_as_in_the_kubelet() {
        let mut ds = daemonset();
        ds["spec"]["template"]["spec"]["securityContext"] = json!({});
        let flags = of_container(&ds, "dp")
            .unwrap()
            .podman_flags(&|_| Some("/x".into()))
            .unwrap();
        assert!(flags.contains(&"--security-opt=seccomp=unconfined".to_owned()));
    }
}
