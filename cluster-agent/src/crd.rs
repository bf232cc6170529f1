//! The `L2Network` custom resource (group `l2mesh.io`) and its validation.
//!
//! The same type is read from the Kubernetes API and, in standalone mode, from
//! YAML manifests in a directory, so validation lives here and not in an
//! admission webhook.

use ipnet::IpNet;
use kube::CustomResource;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// API group of every l2mesh resource.
pub const GROUP: &str = "l2mesh.io";
/// API version of `L2Network`.
pub const VERSION: &str = "v1alpha1";
/// Default pod MTU: 1500 underlay minus WireGuard, VXLAN and Ethernet headers.
pub const DEFAULT_MTU: u32 = 1390;
/// Smallest MTU accepted (the IPv4 minimum).
pub const MIN_MTU: u32 = 576;
/// Largest MTU accepted (jumbo underlay minus overhead).
pub const MAX_MTU: u32 = 8890;
/// What the API server checks of `spec.ipRange` at admission: an IPv4 CIDR
/// of /28 or larger, or an IPv6 CIDR of /124 or larger (at least 16
/// addresses, as [`L2Network::ip_range`] requires). The agent still parses
/// it fully; this keeps `not-a-cidr` and `10.1.0.0/33` out of the API.
pub const IP_RANGE_PATTERN: &str = r"^((25[0-5]|2[0-4][0-9]|1[0-9]{2}|[1-9]?[0-9])\.){3}(25[0-5]|2[0-4][0-9]|1[0-9]{2}|[1-9]?[0-9])/([0-9]|1[0-9]|2[0-8])$|^[0-9a-fA-F]{0,4}(:[0-9a-fA-F]{0,4}){2,7}/([0-9]|[1-9][0-9]|1[01][0-9]|12[0-4])$";

/// What the API server checks of a route's `dst`: an IPv4 or IPv6 CIDR.
pub const ROUTE_DST_PATTERN: &str = r"^((25[0-5]|2[0-4][0-9]|1[0-9]{2}|[1-9]?[0-9])\.){3}(25[0-5]|2[0-4][0-9]|1[0-9]{2}|[1-9]?[0-9])/([0-9]|[12][0-9]|3[0-2])$|^[0-9a-fA-F]{0,4}(:[0-9a-fA-F]{0,4}){2,7}/([0-9]|[1-9][0-9]|1[01][0-9]|12[0-8])$";

/// What the API server checks of a gateway address: an IPv4 or IPv6 address.
pub const IP_ADDRESS_PATTERN: &str = r"^((25[0-5]|2[0-4][0-9]|1[0-9]{2}|[1-9]?[0-9])\.){3}(25[0-5]|2[0-4][0-9]|1[0-9]{2}|[1-9]?[0-9])$|^[0-9a-fA-F]{0,4}(:[0-9a-fA-F]{0,4}){2,7}$";

/// A route l2mesh IPAM installs in every attached pod.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct L2NetworkRoute {
    /// Destination CIDR, e.g. `10.30.0.0/16` or `0.0.0.0/0`.
    #[schemars(regex(pattern = ROUTE_DST_PATTERN), length(max = 43))]
    pub dst: String,
    /// Next hop on this network; without it the route goes via the
    /// network's gateway of the same family (`spec.gateway`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(regex(pattern = IP_ADDRESS_PATTERN), length(max = 39))]
    pub gw: Option<String>,
}

/// Whether a network stays inside this cluster or spans clusters through the broker.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub enum Scope {
    /// Only this cluster's nodes; the VNI is allocated by the agent (1..=4095).
    #[default]
    Local,
    /// Joined through the broker with other clusters; the VNI comes from the broker.
    MultiCluster,
}

/// An isolated layer-2 network that pods attach to as a secondary interface.
#[derive(CustomResource, Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[kube(
    group = "l2mesh.io",
    version = "v1alpha1",
    kind = "L2Network",
    plural = "l2networks",
    shortname = "l2net",
    category = "l2mesh",
    namespaced,
    status = "L2NetworkStatus",
    doc = "An isolated layer-2 network (one broadcast domain) that pods attach to as a secondary interface through Multus; local to this cluster or joined with other clusters through the l2mesh broker.",
    printcolumn = r#"{"name":"Scope","type":"string","jsonPath":".spec.scope"}"#,
    printcolumn = r#"{"name":"VNI","type":"integer","jsonPath":".status.vni"}"#,
    printcolumn = r#"{"name":"Ready","type":"string","jsonPath":".status.conditions[?(@.type==\"Ready\")].status"}"#,
    printcolumn = r#"{"name":"Age","type":"date","jsonPath":".metadata.creationTimestamp"}"#
)]
#[serde(rename_all = "camelCase")]
pub struct L2NetworkSpec {
    /// `local` (default) or `multiCluster`.
    #[serde(default)]
    pub scope: Scope,
    /// MTU of the pod interfaces; default 1390.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 576, max = 8890))]
    pub mtu: Option<u32>,
    /// IPv4 or IPv6 range (CIDR) pods get addresses from; none means no l2mesh IPAM.
    /// One family per network. For multi-cluster networks the broker's range
    /// wins; this one must match it if set.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(regex(pattern = IP_RANGE_PATTERN), length(max = 43))]
    pub ip_range: Option<String>,
    /// Prefix length of each node's slice of the range (this cluster's share
    /// of it for multiCluster), e.g. 24 gives every node a /24. Default: 16
    /// slices, each at most a /28 (IPv4) or /120 (IPv6).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 126))]
    pub node_slice_prefix: Option<u8>,
    /// Name of the network at the broker (multiCluster only); defaults to the resource name.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub broker_network: Option<String>,
    /// Gateway address(es) of the pods on this network (at most one per
    /// family), e.g. a router pod's address; l2mesh IPAM only.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 2), inner(regex(pattern = IP_ADDRESS_PATTERN)))]
    pub gateway: Vec<String>,
    /// Routes installed in every attached pod; l2mesh IPAM only.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 32))]
    pub routes: Vec<L2NetworkRoute>,
}

/// Observed state of an `L2Network`.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct L2NetworkStatus {
    /// `Ready` (every node with a dataplane applied the network), `Admitted`
    /// (multi-cluster: the broker's answer), `PeersConnected`, and
    /// `Attachable` while the NetworkAttachmentDefinition CRD is missing.
    #[serde(default)]
    #[schemars(extend("x-kubernetes-list-type" = "map", "x-kubernetes-list-map-keys" = ["type"]))]
    pub conditions: Vec<Condition>,
    /// VXLAN network identifier in use.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vni: Option<u32>,
    /// Clusters admitted to this network, this one included.
    #[serde(default)]
    pub member_clusters: Vec<String>,
    /// Pod interfaces plugged into the network, per node: the first 64 by
    /// node (`attachedPodCount` counts them all).
    #[serde(default)]
    #[schemars(length(max = 64))]
    pub attached_pods: Vec<AttachedPod>,
    /// How many pod interfaces are plugged into the network in all.
    #[serde(default)]
    pub attached_pod_count: u32,
    /// The tunnels carrying this network: how many are up and down, and
    /// some of those down (`l2mesh-agent status` lists every link).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub links: Option<LinkSummary>,
    /// Generation of the spec this status describes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// The address range in effect: `spec.ipRange`, or for multiCluster the
    /// range the broker holds for the network. Pods get their prefix length
    /// from it (the NetworkAttachmentDefinition's `ipam.subnet`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ip_range: Option<String>,
    /// The MTU in effect on the pod interfaces.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mtu: Option<u32>,
}

/// A status condition in the usual Kubernetes shape.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Condition {
    /// `Ready`, `Admitted`, `PeersConnected` or `Attachable`.
    #[serde(rename = "type")]
    pub type_: String,
    /// `True`, `False` or `Unknown`.
    pub status: String,
    /// CamelCase machine-readable reason.
    #[serde(default)]
    pub reason: String,
    /// Human-readable explanation.
    #[serde(default)]
    pub message: String,
    /// RFC 3339 time of the last status change.
    #[serde(default)]
    pub last_transition_time: String,
}

/// One pod interface on a node's bridge for this network.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct AttachedPod {
    pub node: String,
    /// `namespace/name` of the pod; the host-side interface name when the
    /// port was attached without a pod (e.g. by hand or a non-Kubernetes runtime).
    pub pod: String,
    /// Host-side interface name.
    pub interface: String,
}

/// The tunnels carrying one network, summed over the nodes.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct LinkSummary {
    /// Tunnels with a handshake in the last 3 minutes.
    pub up: u32,
    /// Tunnels without one.
    pub down: u32,
    /// The first down tunnels by node, `node->peer` (at most 8).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 8))]
    pub down_links: Vec<String>,
}

/// Why an `L2Network` manifest was rejected. Nothing is changed when this is returned.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ValidationError {
    #[error("L2Network {0}: metadata.name is missing: give the network a name")]
    MissingName(String),
    #[error(
        "L2Network {key}: name {name:?} is not a DNS-1123 label (lowercase letters, digits and '-', at most 63 characters, starting and ending with a letter or digit): rename it"
    )]
    BadName { key: String, name: String },
    #[error(
        "L2Network {name}: mtu {mtu} is outside {MIN_MTU}..={MAX_MTU}: pick an MTU in that range or leave it out for {DEFAULT_MTU}"
    )]
    BadMtu { name: String, mtu: u32 },
    #[error(
        "L2Network {name}: ipRange {range:?} is not a CIDR like 10.10.0.0/16 or fd00:10::/64: fix spec.ipRange"
    )]
    BadRange { name: String, range: String },
    #[error(
        "L2Network {name}: ipRange {range} is too small (prefix /{prefix}); use /{max} or larger so every node gets addresses"
    )]
    RangeTooSmall {
        name: String,
        range: String,
        prefix: u8,
        max: u8,
    },
    #[error("L2Network {name}: nodeSlicePrefix: {reason}")]
    BadSlicePrefix { name: String, reason: String },
    #[error(
        "L2Network {name}: brokerNetwork is only meaningful with scope multiCluster: remove it or set scope: multiCluster"
    )]
    BrokerNetworkOnLocal { name: String },
}

fn is_dns_label(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 63
        && s.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !s.starts_with('-')
        && !s.ends_with('-')
}

impl L2Network {
    /// `namespace/name` for messages and keys.
    #[must_use]
    pub fn key(&self) -> String {
        format!(
            "{}/{}",
            self.metadata.namespace.as_deref().unwrap_or("default"),
            self.metadata.name.as_deref().unwrap_or("")
        )
    }

    /// The MTU in effect.
    #[must_use]
    pub fn mtu(&self) -> u32 {
        self.spec.mtu.unwrap_or(DEFAULT_MTU)
    }

    /// The name the network has at the broker (multi-cluster scope).
    #[must_use]
    pub fn broker_name(&self) -> String {
        self.spec
            .broker_network
            .clone()
            .unwrap_or_else(|| self.metadata.name.clone().unwrap_or_default())
    }

    /// The name the network has on the nodes (dataplane, CNI config).
    /// Multi-cluster networks use the broker name; local ones their own name,
    /// prefixed with the namespace outside `default` so names never clash.
    #[must_use]
    pub fn dataplane_name(&self) -> String {
        match self.spec.scope {
            Scope::MultiCluster => self.broker_name(),
            Scope::Local => {
                let name = self.metadata.name.clone().unwrap_or_default();
                match self.metadata.namespace.as_deref() {
                    None | Some("default") => name,
                    Some(ns) => format!("{ns}.{name}"),
                }
            }
        }
    }

    /// The parsed IP range, if any.
    pub fn ip_range(&self) -> Result<Option<IpNet>, ValidationError> {
        let name = self.key();
        match self.spec.ip_range.as_deref().map(str::trim) {
            None | Some("") => Ok(None),
            Some(range) => {
                let net: IpNet = range.parse().map_err(|_| ValidationError::BadRange {
                    name: name.clone(),
                    range: range.to_owned(),
                })?;
                // At least 16 addresses, so one node slice has room for pods.
                let max = net.max_prefix_len() - 4;
                if net.prefix_len() > max {
                    return Err(ValidationError::RangeTooSmall {
                        name,
                        range: range.to_owned(),
                        prefix: net.prefix_len(),
                        max,
                    });
                }
                Ok(Some(net.trunc()))
            }
        }
    }

    /// Check `nodeSlicePrefix` against the range it would split.
    pub fn check_node_slice_prefix(&self, range: Option<IpNet>) -> Result<(), ValidationError> {
        let Some(prefix) = self.spec.node_slice_prefix else {
            return Ok(());
        };
        let bad = |reason: String| ValidationError::BadSlicePrefix {
            name: self.key(),
            reason,
        };
        match range {
            Some(range) => {
                crate::ipam::check_slice_prefix(range, prefix).map_err(|e| bad(e.to_string()))
            }
            None if self.spec.scope == Scope::Local => Err(bad(
                "it splits spec.ipRange, which is not set: set ipRange or remove nodeSlicePrefix"
                    .to_owned(),
            )),
            // Multi-cluster: checked against the broker's share once known.
            None => Ok(()),
        }
    }

    /// Check everything a manifest can get wrong.
    pub fn validate(&self) -> Result<(), ValidationError> {
        let key = self.key();
        let name = self
            .metadata
            .name
            .as_deref()
            .ok_or_else(|| ValidationError::MissingName(key.clone()))?;
        if !is_dns_label(name) {
            return Err(ValidationError::BadName {
                key: key.clone(),
                name: name.to_owned(),
            });
        }
        if let Some(mtu) = self.spec.mtu
            && !(MIN_MTU..=MAX_MTU).contains(&mtu)
        {
            return Err(ValidationError::BadMtu { name: key, mtu });
        }
        let range = self.ip_range()?;
        self.check_node_slice_prefix(range)?;
        if self.spec.scope == Scope::Local && self.spec.broker_network.is_some() {
            return Err(ValidationError::BrokerNetworkOnLocal { name: key });
        }
        Ok(())
    }
}

/// The CustomResourceDefinitions as one multi-document YAML text.
pub fn crds_yaml() -> Result<String, serde_yaml::Error> {
    use kube::CustomResourceExt as _;
    let crd = L2Network::crd();
    Ok(format!(
        "# Generated by `l2mesh-agent crd`; do not edit.\n---\n{}",
        serde_yaml::to_string(&crd)?
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn net(yaml: &str) -> L2Network {
        serde_yaml::from_str(yaml).unwrap()
    }

    #[test]
    fn checked_in_crds_are_current() {
        let generated = crds_yaml().unwrap();
        let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../deploy/crds/l2network.yaml");
        let checked_in = std::fs::read_to_string(path).unwrap_or_default();
        assert!(
            generated == checked_in,
            "deploy/crds/l2network.yaml is stale: run `cargo run -p l2mesh-cluster-agent --bin l2mesh-agent -- crd > deploy/crds/l2network.yaml`"
        );
    }

    #[test]
    fn crd_has_group_scope_and_status_subresource() {
        let text = crds_yaml().unwrap();
        assert!(text.contains("name: l2networks.l2mesh.io"));
        assert!(text.contains("scope: Namespaced"));
        assert!(text.contains("status: {}"));
        assert!(text.contains("multiCluster"));
    }

    #[test]
    fn a_minimal_manifest_gets_defaults() {
        let n = net(
            "apiVersion: l2mesh.io/v1alpha1\nkind: L2Network\nmetadata: {name: blue}\nspec: {}\n",
        );
        n.validate().unwrap();
        assert_eq!(n.spec.scope, Scope::Local);
        assert_eq!(n.mtu(), DEFAULT_MTU);
        assert_eq!(n.dataplane_name(), "blue");
        assert_eq!(n.ip_range().unwrap(), None);
    }

    #[test]
    fn ipv6_ranges_and_slice_sizes_are_accepted() {
        let n = net(
            "apiVersion: l2mesh.io/v1alpha1\nkind: L2Network\nmetadata: {name: six}\nspec: {ipRange: 'fd00:10::1/64', nodeSlicePrefix: 80}\n",
        );
        n.validate().unwrap();
        assert_eq!(n.ip_range().unwrap(), Some("fd00:10::/64".parse().unwrap()));
        assert_eq!(n.spec.node_slice_prefix, Some(80));
    }

    #[test]
    fn names_and_keys() {
        let n = net(
            "apiVersion: l2mesh.io/v1alpha1\nkind: L2Network\nmetadata: {name: red, namespace: team}\nspec: {scope: multiCluster, brokerNetwork: shared-red, ipRange: 10.9.0.0/16}\n",
        );
        n.validate().unwrap();
        assert_eq!(n.key(), "team/red");
        assert_eq!(n.dataplane_name(), "shared-red");
        assert_eq!(n.broker_name(), "shared-red");
        let local = net(
            "apiVersion: l2mesh.io/v1alpha1\nkind: L2Network\nmetadata: {name: red, namespace: team}\nspec: {}\n",
        );
        assert_eq!(local.dataplane_name(), "team.red");
    }

    #[test]
    fn bad_manifests_get_specific_errors() {
        let base =
            "apiVersion: l2mesh.io/v1alpha1\nkind: L2Network\nmetadata: {name: NAME}\nspec: SPEC\n";
        let make = |name: &str, spec: &str| net(&base.replace("NAME", name).replace("SPEC", spec));
        assert!(matches!(
            make("Blue_1", "{}").validate(),
            Err(ValidationError::BadName { .. })
        ));
        let e = make("Blue_1", "{}").validate().unwrap_err().to_string();
        assert!(
            e.starts_with("L2Network default/Blue_1:"),
            "names the namespace: {e}"
        );
        assert!(matches!(
            make("b", "{mtu: 100}").validate(),
            Err(ValidationError::BadMtu { mtu: 100, .. })
        ));
        assert!(matches!(
            make("b", "{ipRange: 10.0.0.0/33}").validate(),
            Err(ValidationError::BadRange { .. })
        ));
        assert!(matches!(
            make("b", "{ipRange: 10.0.0.0/30}").validate(),
            Err(ValidationError::RangeTooSmall { prefix: 30, .. })
        ));
        assert!(matches!(
            make("b", "{ipRange: 'fd00::/125'}").validate(),
            Err(ValidationError::RangeTooSmall {
                prefix: 125,
                max: 124,
                ..
            })
        ));
        let slice = make("b", "{ipRange: 10.0.0.0/16, nodeSlicePrefix: 31}")
            .validate()
            .unwrap_err();
        assert!(
            matches!(slice, ValidationError::BadSlicePrefix { .. }),
            "{slice}"
        );
        assert!(slice.to_string().contains("between /16 and /30"), "{slice}");
        let no_range = make("b", "{nodeSlicePrefix: 24}").validate().unwrap_err();
        assert!(no_range.to_string().contains("ipRange"), "{no_range}");
        make("b", "{scope: multiCluster, nodeSlicePrefix: 24}")
            .validate()
            .unwrap();
        assert!(matches!(
            make("b", "{brokerNetwork: x}").validate(),
            Err(ValidationError::BrokerNetworkOnLocal { .. })
        ));
        let msg = make("b", "{ipRange: nope}")
            .validate()
            .unwrap_err()
            .to_string();
        assert!(msg.contains("spec.ipRange"), "{msg}");
        assert!(
            serde_yaml::from_str::<L2Network>(
                &base.replace("NAME", "b").replace("SPEC", "{scope: galaxy}")
            )
            .is_err()
        );
    }
}
