//! CNI spec 1.0 wire types: the network configuration the runtime passes on
//! stdin, the success result and the error result.

use serde::{Deserialize, Serialize};
use serde_json::Value;
use std::path::PathBuf;

/// The only result version this plugin writes.
pub const CNI_VERSION: &str = "1.0.0";
/// Versions accepted in a network configuration. Results follow the
/// configuration's version: 1.x results are one shape, 0.4.0 adds
/// `ips[].version`. 1.1.0 adds the GC and STATUS commands.
pub const SUPPORTED_VERSIONS: &[&str] = &["0.4.0", "1.0.0", "1.1.0"];
/// Where the node's dataplane listens unless the configuration says otherwise.
pub const DEFAULT_DATAPLANE_SOCKET: &str = "/run/l2mesh/dataplane.sock";
/// Where l2mesh IPAM keeps its leases unless the configuration says otherwise.
pub const DEFAULT_IPAM_DIR: &str = "/var/lib/cni/l2mesh";

/// Well-known error codes from the CNI spec.
pub mod code {
    pub const INCOMPATIBLE_VERSION: u32 = 1;
    pub const UNSUPPORTED_FIELD: u32 = 2;
    pub const UNKNOWN_CONTAINER: u32 = 3;
    pub const INVALID_ENV: u32 = 4;
    pub const IO_FAILURE: u32 = 5;
    pub const DECODE_FAILURE: u32 = 6;
    pub const INVALID_CONFIG: u32 = 7;
    pub const TRY_AGAIN_LATER: u32 = 11;
    /// STATUS (CNI 1.1): the plugin cannot serve ADDs now.
    pub const PLUGIN_NOT_AVAILABLE: u32 = 50;
    /// Plugin-specific: an address could not be allocated.
    pub const IPAM_FAILURE: u32 = 100;
    /// Plugin-specific: CHECK found the interface differs from the result.
    pub const CHECK_FAILED: u32 = 101;
}

/// A CNI error result. `msg` says what went wrong, `details` what to do.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
#[error("CNI error {code}: {msg} ({details})")]
pub struct CniError {
    #[serde(rename = "cniVersion", default)]
    pub cni_version: String,
    pub code: u32,
    pub msg: String,
    #[serde(default)]
    pub details: String,
}

impl CniError {
    pub fn new(code: u32, msg: impl Into<String>, details: impl Into<String>) -> Self {
        Self {
            cni_version: CNI_VERSION.to_owned(),
            code,
            msg: msg.into(),
            details: details.into(),
        }
    }
}

/// The `ipam` section. `type: l2mesh` (the node's slice from the dataplane),
/// any other type is a delegated IPAM plugin found in `CNI_PATH`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct IpamConf {
    #[serde(rename = "type", default)]
    pub type_: String,
    /// l2mesh IPAM: the network's whole range; pods get its prefix length so
    /// they reach pods in other nodes' slices on the same L2 segment.
    #[serde(default)]
    pub subnet: Option<String>,
    /// l2mesh IPAM: lease directory.
    #[serde(default)]
    pub data_dir: Option<PathBuf>,
    /// l2mesh IPAM: the gateway of the pods' addresses (one per family),
    /// returned as `ips[].gateway` and used by routes without `gw`.
    #[serde(default)]
    pub gateway: Vec<String>,
    /// l2mesh IPAM: routes installed in the pod and returned in the result.
    #[serde(default)]
    pub routes: Vec<Route>,
}

/// The network configuration (stdin).
#[derive(Clone, Debug, Default, PartialEq, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct NetConf {
    #[serde(default)]
    pub cni_version: String,
    #[serde(default)]
    pub name: String,
    #[serde(rename = "type", default)]
    pub type_: String,
    /// Network name on the node; defaults to `name`.
    #[serde(default)]
    pub network: Option<String>,
    #[serde(default)]
    pub dataplane_socket: Option<PathBuf>,
    /// Overrides the network's MTU for this attachment.
    #[serde(default)]
    pub mtu: Option<u32>,
    #[serde(default)]
    pub ipam: Option<IpamConf>,
    #[serde(default)]
    pub runtime_config: RuntimeConfig,
    #[serde(default)]
    pub args: Option<Value>,
    #[serde(default)]
    pub prev_result: Option<Value>,
    /// GC (CNI 1.1): the attachments that still exist; every other lease
    /// is freed.
    #[serde(rename = "cni.dev/valid-attachments", default)]
    pub valid_attachments: Option<Vec<Attachment>>,
}

/// An attachment named in a GC request.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Attachment {
    #[serde(rename = "containerID")]
    pub container_id: String,
    pub ifname: String,
}

/// Capabilities Multus passes (`ips`, `mac`).
#[derive(Clone, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct RuntimeConfig {
    #[serde(default)]
    pub ips: Vec<String>,
    #[serde(default)]
    pub mac: Option<String>,
}

/// An interface in a result.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Interface {
    pub name: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub mac: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mtu: Option<u32>,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub sandbox: String,
}

/// An address in a result.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct IpConfig {
    /// CIDR notation, e.g. `10.1.0.5/16`.
    pub address: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gateway: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub interface: Option<usize>,
    /// "4" or "6"; results of cniVersion 0.4.0 carry it, 1.x ones do not.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub version: Option<String>,
}

/// A route in a result.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Route {
    pub dst: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gw: Option<String>,
}

/// A success result.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct CniResult {
    pub cni_version: String,
    #[serde(default)]
    pub interfaces: Vec<Interface>,
    #[serde(default)]
    pub ips: Vec<IpConfig>,
    #[serde(default)]
    pub routes: Vec<Route>,
    #[serde(default)]
    pub dns: Value,
}

impl CniResult {
    /// Puts the result in the shape of its `cniVersion`: 0.x results name
    /// each address's IP version, 1.x results must not.
    pub fn shape_for_version(&mut self) {
        let old = self.cni_version.starts_with("0.");
        for ip in &mut self.ips {
            ip.version = old.then(|| if ip.address.contains(':') { "6" } else { "4" }.to_owned());
        }
    }
}

/// `CNI_*` environment of one invocation.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct CniEnv {
    pub command: String,
    pub container_id: String,
    pub netns: String,
    pub ifname: String,
    pub path: String,
    pub args: String,
}

impl CniEnv {
    /// Read from a lookup function (the process environment in the binary).
    pub fn from_lookup(get: impl Fn(&str) -> Option<String>) -> Self {
        let v = |k: &str| get(k).unwrap_or_default();
        Self {
            command: v("CNI_COMMAND"),
            container_id: v("CNI_CONTAINERID"),
            netns: v("CNI_NETNS"),
            ifname: v("CNI_IFNAME"),
            path: v("CNI_PATH"),
            args: v("CNI_ARGS"),
        }
    }

    /// One of the `KEY=VALUE;...` pairs of `CNI_ARGS` (e.g. `IP`, `MAC`,
    /// `K8S_POD_NAME`). Keys this plugin does not know are simply never asked
    /// for, so `IgnoreUnknown` needs no handling; a pair without `=` is
    /// skipped; an empty value counts as absent.
    #[must_use]
    pub fn arg(&self, key: &str) -> Option<String> {
        self.args.split(';').find_map(|kv| {
            let (k, v) = kv.split_once('=')?;
            (k.trim() == key && !v.trim().is_empty()).then(|| v.trim().to_owned())
        })
    }

    /// The pod this attachment is for (`K8S_POD_NAMESPACE`, `K8S_POD_NAME`,
    /// which Multus and CRI runtimes pass); `None` unless both are there.
    #[must_use]
    pub fn pod(&self) -> Option<(String, String)> {
        Some((self.arg("K8S_POD_NAMESPACE")?, self.arg("K8S_POD_NAME")?))
    }

    /// Fail with code 4 naming the first missing variable.
    pub fn require(&self, names: &[&str]) -> Result<(), CniError> {
        for name in names {
            let value = match *name {
                "CNI_CONTAINERID" => &self.container_id,
                "CNI_NETNS" => &self.netns,
                "CNI_IFNAME" => &self.ifname,
                _ => &self.command,
            };
            if value.is_empty() {
                return Err(CniError::new(
                    code::INVALID_ENV,
                    format!("{name} is not set"),
                    "the container runtime must set it; nothing was changed",
                ));
            }
        }
        if !self.ifname.is_empty() && !valid_ifname(&self.ifname) {
            return Err(CniError::new(
                code::INVALID_ENV,
                format!("CNI_IFNAME {:?} is not a valid interface name", self.ifname),
                "use 1 to 15 characters without '/', ':' or whitespace",
            ));
        }
        Ok(())
    }
}

/// Linux interface name rules.
#[must_use]
pub fn valid_ifname(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 15
        && name != "."
        && name != ".."
        && !name
            .chars()
            .any(|c| c == '/' || c == ':' || c.is_whitespace())
}

impl NetConf {
    /// Parse and check the configuration; errors name the field to fix.
    pub fn parse(bytes: &[u8]) -> Result<Self, CniError> {
        let conf: Self = serde_json::from_slice(bytes).map_err(|e| {
            CniError::new(
                code::DECODE_FAILURE,
                format!("the network configuration is not valid JSON: {e}"),
                "pass the CNI network configuration on stdin",
            )
        })?;
        if conf.cni_version.is_empty() {
            return Err(CniError::new(
                code::INVALID_CONFIG,
                "cniVersion is missing from the network configuration",
                "add \"cniVersion\": \"1.0.0\"",
            ));
        }
        if !SUPPORTED_VERSIONS.contains(&conf.cni_version.as_str()) {
            return Err(CniError::new(
                code::INCOMPATIBLE_VERSION,
                format!("cniVersion {} is not supported", conf.cni_version),
                format!("use one of {SUPPORTED_VERSIONS:?}"),
            ));
        }
        if conf.name.is_empty() {
            return Err(CniError::new(
                code::INVALID_CONFIG,
                "name is missing from the network configuration",
                "set \"name\" to the l2mesh network (the L2Network's name on the nodes)",
            ));
        }
        if let Some(mtu) = conf.mtu
            && !(crate::crd::MIN_MTU..=crate::crd::MAX_MTU).contains(&mtu)
        {
            return Err(CniError::new(
                code::INVALID_CONFIG,
                format!("mtu {mtu} is out of range"),
                format!(
                    "use {}..={} or leave it out",
                    crate::crd::MIN_MTU,
                    crate::crd::MAX_MTU
                ),
            ));
        }
        if let Some(ipam) = &conf.ipam
            && !ipam.type_.is_empty()
            && ipam.type_ != "l2mesh"
            && !valid_plugin_name(&ipam.type_)
        {
            return Err(CniError::new(
                code::INVALID_CONFIG,
                format!("ipam.type {:?} is not a plugin name", ipam.type_),
                "use l2mesh or the file name of an IPAM plugin in CNI_PATH",
            ));
        }
        Ok(conf)
    }

    /// Network name on the node.
    #[must_use]
    pub fn network(&self) -> &str {
        self.network.as_deref().unwrap_or(&self.name)
    }

    #[must_use]
    pub fn socket(&self) -> PathBuf {
        self.dataplane_socket
            .clone()
            .unwrap_or_else(|| PathBuf::from(DEFAULT_DATAPLANE_SOCKET))
    }
}

fn valid_plugin_name(name: &str) -> bool {
    !name.is_empty()
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_' || c == '.')
        && !name.starts_with('.')
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn configs_parse_with_defaults() {
        let conf =
            NetConf::parse(br#"{"cniVersion":"1.0.0","name":"blue","type":"l2mesh"}"#).unwrap();
        assert_eq!(conf.network(), "blue");
        assert_eq!(conf.socket(), PathBuf::from(DEFAULT_DATAPLANE_SOCKET));
        assert!(conf.ipam.is_none());
    }

    #[test]
    fn bad_configs_get_cni_error_codes() {
        let cases: &[(&[u8], u32, &str)] = &[
            (b"{", code::DECODE_FAILURE, "JSON"),
            (br#"{"name":"x"}"#, code::INVALID_CONFIG, "cniVersion"),
            (
                br#"{"cniVersion":"0.1.0","name":"x"}"#,
                code::INCOMPATIBLE_VERSION,
                "0.1.0",
            ),
            (br#"{"cniVersion":"1.0.0"}"#, code::INVALID_CONFIG, "name"),
            (
                br#"{"cniVersion":"1.0.0","name":"x","mtu":20}"#,
                code::INVALID_CONFIG,
                "mtu",
            ),
            (
                br#"{"cniVersion":"1.0.0","name":"x","ipam":{"type":"../evil"}}"#,
                code::INVALID_CONFIG,
                "ipam.type",
            ),
        ];
        for (input, want, word) in cases {
            let e = NetConf::parse(input).unwrap_err();
            assert_eq!(e.code, *want, "{e}");
            assert!(e.msg.contains(word), "{e}");
        }
    }

    #[test]
    fn env_checks_and_args() {
        let env = CniEnv::from_lookup(|k| match k {
            "CNI_COMMAND" => Some("ADD".into()),
            "CNI_IFNAME" => Some("net1".into()),
            "CNI_ARGS" => Some("IgnoreUnknown=1;MAC=02:00:00:00:00:01".into()),
            _ => None,
        });
        assert_eq!(env.arg("MAC").as_deref(), Some("02:00:00:00:00:01"));
        let e = env.require(&["CNI_CONTAINERID"]).unwrap_err();
        assert_eq!(e.code, code::INVALID_ENV);
        assert!(e.msg.contains("CNI_CONTAINERID"));
        assert_eq!(env.pod(), None);
        assert!(!valid_ifname("a/b"));
        assert!(!valid_ifname("sixteen-chars-xx"));
    }

    #[test]
    fn pod_comes_from_kubernetes_cni_args() {
        let env = |args: &str| CniEnv {
            args: args.to_owned(),
            ..CniEnv::default()
        };
        let multus = env(
            "IgnoreUnknown=true;K8S_POD_NAMESPACE=team;K8S_POD_NAME=web-0;K8S_POD_INFRA_CONTAINER_ID=abc;K8S_POD_UID=u-1",
        );
        assert_eq!(multus.pod(), Some(("team".into(), "web-0".into())));
        // Order does not matter, stray separators and pairs without `=` are skipped.
        let messy = env(";K8S_POD_NAME=db;;garbage;K8S_POD_NAMESPACE=prod;");
        assert_eq!(messy.pod(), Some(("prod".into(), "db".into())));
        // Half a pod, or empty values, is no pod.
        assert_eq!(env("K8S_POD_NAME=web-0").pod(), None);
        assert_eq!(env("K8S_POD_NAMESPACE=;K8S_POD_NAME=x").pod(), None);
        assert_eq!(env("").pod(), None);
        // A key is matched whole, not by prefix.
        assert_eq!(env("K8S_POD_NAME_X=a;K8S_POD_NAMESPACE=n").pod(), None);
        assert_eq!(
            env("IP=10.0.0.1/24;MAC=02:00:00:00:00:01")
                .arg("IP")
                .as_deref(),
            Some("10.0.0.1/24")
        );
    }

    #[test]
    fn error_json_has_spec_fields() {
        let text = serde_json::to_string(&CniError::new(7, "m", "d")).unwrap();
        assert_eq!(
            text,
            r#"{"cniVersion":"1.0.0","code":7,"msg":"m","details":"d"}"#
        );
    }
}
