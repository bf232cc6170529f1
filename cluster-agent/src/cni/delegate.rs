//! Delegated IPAM: run another CNI plugin (e.g. `host-local`) from
//! `CNI_PATH` with the same environment and configuration, as the spec says.

use super::types::{CniEnv, CniError, CniResult, code};
use std::io::Write;
use std::path::PathBuf;
use std::process::{Command, Stdio};

fn find(env: &CniEnv, plugin: &str) -> Result<PathBuf, CniError> {
    env.path
        .split(':')
        .filter(|d| !d.is_empty())
        .map(|d| PathBuf::from(d).join(plugin))
        .find(|p| p.is_file())
        .ok_or_else(|| {
            CniError::new(
                code::INVALID_CONFIG,
                format!(
                    "IPAM plugin {plugin:?} was not found in CNI_PATH {:?}",
                    env.path
                ),
                "install the plugin or fix ipam.type / CNI_PATH",
            )
        })
}

/// `CNI_ARGS` for a delegated plugin: with `IgnoreUnknown=1`, so that a
/// plugin that knows none of the runtime's keys (`K8S_POD_NAME`, ...), such
/// as `static`, does not fail on them.
#[must_use]
pub fn delegate_args(args: &str) -> String {
    let has = args.split(';').any(|kv| {
        kv.split_once('=')
            .is_some_and(|(k, _)| k.trim().eq_ignore_ascii_case("IgnoreUnknown"))
    });
    match (has, args.trim().is_empty()) {
        (true, _) => args.to_owned(),
        (false, true) => "IgnoreUnknown=1".to_owned(),
        (false, false) => format!("IgnoreUnknown=1;{args}"),
    }
}

/// Run `plugin` with `command` (ADD, DEL, CHECK, GC). ADD returns its result.
pub fn exec(
    env: &CniEnv,
    plugin: &str,
    command: &str,
    stdin: &[u8],
) -> Result<Option<CniResult>, CniError> {
    let path = find(env, plugin)?;
    let mut child = Command::new(&path)
        .env("CNI_COMMAND", command)
        .env("CNI_CONTAINERID", &env.container_id)
        .env("CNI_NETNS", &env.netns)
        .env("CNI_IFNAME", &env.ifname)
        .env("CNI_PATH", &env.path)
        .env("CNI_ARGS", delegate_args(&env.args))
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| {
            CniError::new(
                code::IO_FAILURE,
                format!("cannot run IPAM plugin {}: {e}", path.display()),
                "check the plugin is executable",
            )
        })?;
    if let Some(mut input) = child.stdin.take() {
        // A plugin that exits without reading stdin is reported by its result.
        let _ = input.write_all(stdin);
    }
    let out = child
        .wait_with_output()
        .map_err(|e| CniError::new(code::IO_FAILURE, format!("IPAM plugin {plugin}: {e}"), ""))?;
    if !out.status.success() {
        let mut err: CniError = serde_json::from_slice(&out.stdout).unwrap_or_else(|_| {
            CniError::new(
                code::IO_FAILURE,
                format!("IPAM plugin {plugin} failed ({})", out.status),
                String::from_utf8_lossy(&out.stderr).trim().to_owned(),
            )
        });
        err.msg = format!("IPAM plugin {plugin}: {}", err.msg);
        if err.cni_version.is_empty() {
            super::types::CNI_VERSION.clone_into(&mut err.cni_version);
        }
        return Err(err);
    }
    if command != "ADD" {
        return Ok(None);
    }
    serde_json::from_slice(&out.stdout).map(Some).map_err(|e| {
        CniError::new(
            code::DECODE_FAILURE,
            format!("IPAM plugin {plugin} printed a result that is not a CNI result: {e}"),
            "",
        )
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn delegated_plugins_are_told_to_ignore_unknown_args() {
        assert_eq!(delegate_args(""), "IgnoreUnknown=1");
        assert_eq!(
            delegate_args("K8S_POD_NAMESPACE=a;K8S_POD_NAME=b"),
            "IgnoreUnknown=1;K8S_POD_NAMESPACE=a;K8S_POD_NAME=b"
        );
        assert_eq!(
            delegate_args("IgnoreUnknown=true;K8S_POD_NAME=b"),
            "IgnoreUnknown=true;K8S_POD_NAME=b"
        );
    }
}
