//! The hook through which pods get their l2mesh interface.
//!
//! Today no one attaches pods: their namespaces hold only loopback, and the
//! self-tests check they reach nothing. The scenarios attach them with the
//! real `l2mesh-cni`, called the way a container runtime (through Multus)
//! calls a CNI plugin: run inside the *node's* namespace, with the `CNI_*`
//! environment naming the pod's namespace, and the network configuration on
//! stdin.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Stdio;

use crate::netns::{Netns, describe};
use crate::{Error, Result};

/// One CNI plugin invocation (CNI spec 1.0).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CniCall {
    /// `ADD`, `DEL`, `CHECK` or `VERSION`.
    pub command: String,
    pub container_id: String,
    /// Path of the pod's namespace, `/run/netns/<pod>`.
    pub netns: PathBuf,
    /// Interface name inside the pod, e.g. `net1`.
    pub ifname: String,
    /// Directories with delegated plugins (IPAM), `:`-separated.
    pub cni_path: String,
    /// The network configuration, JSON, passed on stdin.
    pub config: String,
    /// `CNI_ARGS`: `;`-separated `KEY=VALUE` pairs (empty: not set).
    pub args: String,
}

impl CniCall {
    /// An `ADD` of `pod` with the given network configuration.
    pub fn add(pod: &Netns, ifname: &str, config: impl Into<String>) -> Self {
        Self {
            command: "ADD".to_owned(),
            container_id: pod.name().to_owned(),
            netns: pod.path(),
            ifname: ifname.to_owned(),
            cni_path: "/usr/lib/cni:/opt/cni/bin".to_owned(),
            config: config.into(),
            args: String::new(),
        }
    }

    /// Names the Kubernetes pod in `CNI_ARGS`, as the kubelet (through
    /// Multus) does.
    pub fn with_pod(mut self, namespace: &str, name: &str) -> Self {
        self.args = format!("IgnoreUnknown=1;K8S_POD_NAMESPACE={namespace};K8S_POD_NAME={name}");
        self
    }

    /// The same call with another command (`DEL`, `CHECK`).
    pub fn with_command(mut self, command: &str) -> Self {
        command.clone_into(&mut self.command);
        self
    }

    /// The `CNI_*` environment of this call.
    pub fn env(&self) -> Vec<(String, String)> {
        let mut env = vec![
            ("CNI_COMMAND".to_owned(), self.command.clone()),
            ("CNI_CONTAINERID".to_owned(), self.container_id.clone()),
            ("CNI_NETNS".to_owned(), self.netns.display().to_string()),
            ("CNI_IFNAME".to_owned(), self.ifname.clone()),
            ("CNI_PATH".to_owned(), self.cni_path.clone()),
        ];
        if !self.args.is_empty() {
            env.push(("CNI_ARGS".to_owned(), self.args.clone()));
        }
        env
    }

    /// Runs `plugin` inside `node`'s namespace; returns its stdout (the CNI
    /// result JSON) or an error carrying its stdout (CNI errors are JSON on
    /// stdout) and stderr.
    pub fn run(&self, node: &Netns, plugin: &Path) -> Result<String> {
        let mut cmd = node.command(plugin);
        cmd.envs(self.env())
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let command = describe(&cmd);
        let mut child = cmd.spawn().map_err(|source| Error::Spawn {
            command: command.clone(),
            source,
        })?;
        if let Some(mut stdin) = child.stdin.take() {
            stdin
                .write_all(self.config.as_bytes())
                .map_err(|e| Error::io(plugin, e))?;
        }
        let out = child.wait_with_output().map_err(|e| Error::io(plugin, e))?;
        let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
        if out.status.success() {
            Ok(stdout)
        } else {
            Err(Error::Command {
                command: format!("{command} (CNI_COMMAND={})", self.command),
                status: out.status.to_string(),
                stderr: format!(
                    "stdout: {} stderr: {}",
                    stdout.trim(),
                    String::from_utf8_lossy(&out.stderr).trim()
                ),
            })
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn env_names_pod_namespace_and_interface() {
        let call = CniCall {
            command: "ADD".into(),
            container_id: "l2e-1-0-c1-gw-p1".into(),
            netns: "/run/netns/l2e-1-0-c1-gw-p1".into(),
            ifname: "net1".into(),
            cni_path: "/usr/lib/cni".into(),
            config: "{}".into(),
            args: String::new(),
        }
        .with_command("DEL")
        .with_pod("default", "web-0");
        let env = call.env();
        let get = |k: &str| env.iter().find(|(n, _)| n == k).map(|(_, v)| v.as_str());
        assert_eq!(get("CNI_COMMAND"), Some("DEL"));
        assert_eq!(get("CNI_NETNS"), Some("/run/netns/l2e-1-0-c1-gw-p1"));
        assert_eq!(get("CNI_IFNAME"), Some("net1"));
        assert_eq!(get("CNI_PATH"), Some("/usr/lib/cni"));
        assert_eq!(
            get("CNI_ARGS"),
            Some("IgnoreUnknown=1;K8S_POD_NAMESPACE=default;K8S_POD_NAME=web-0")
        );
    }
}
