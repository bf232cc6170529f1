//! The Multus `NetworkAttachmentDefinition` the agent keeps for every
//! L2Network, so pods attach with `k8s.v1.cni.cncf.io/networks: <name>`.

use crate::crd::L2Network;
use kube::{CustomResource, Resource as _};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// `k8s.cni.cncf.io/v1` NetworkAttachmentDefinition (Multus' CRD).
#[derive(CustomResource, Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[kube(
    group = "k8s.cni.cncf.io",
    version = "v1",
    kind = "NetworkAttachmentDefinition",
    plural = "network-attachment-definitions",
    namespaced
)]
pub struct NadSpec {
    /// The CNI network configuration as a JSON string.
    #[serde(default)]
    pub config: String,
}

/// Field manager for server-side apply.
pub const MANAGER: &str = "l2mesh-agent";

/// The CNI configuration pods of this network get.
#[must_use]
pub fn cni_config(net: &L2Network, range: Option<ipnet::IpNet>, mtu: u32) -> serde_json::Value {
    let mut conf = serde_json::json!({
        "cniVersion": "1.0.0",
        "name": net.dataplane_name(),
        "type": "l2mesh-cni",
        "mtu": mtu,
        "capabilities": {"ips": true, "mac": true},
    });
    if let Some(range) = range {
        conf["ipam"] = serde_json::json!({"type": "l2mesh", "subnet": range.to_string()});
        if !net.spec.gateway.is_empty() {
            conf["ipam"]["gateway"] = serde_json::json!(net.spec.gateway);
        }
        if !net.spec.routes.is_empty() {
            conf["ipam"]["routes"] = serde_json::json!(net.spec.routes);
        }
    }
    conf
}

/// The NAD for an L2Network: same name and namespace, owned by it (so the
/// garbage collector also removes it should the finalizer be bypassed).
#[must_use]
pub fn nad_for(
    net: &L2Network,
    range: Option<ipnet::IpNet>,
    mtu: u32,
) -> NetworkAttachmentDefinition {
    let mut nad = NetworkAttachmentDefinition::new(
        net.metadata.name.as_deref().unwrap_or_default(),
        NadSpec {
            config: cni_config(net, range, mtu).to_string(),
        },
    );
    nad.metadata.namespace.clone_from(&net.metadata.namespace);
    nad.metadata.labels = Some(
        [(
            "app.kubernetes.io/managed-by".to_owned(),
            MANAGER.to_owned(),
        )]
        .into(),
    );
    nad.metadata.owner_references = net.controller_owner_ref(&()).map(|o| vec![o]);
    nad
}

/// Whether `existing` already is `wanted` (same CNI config, labels and
/// owner): applying it again would change nothing, so it is not written.
#[must_use]
pub fn up_to_date(
    existing: &NetworkAttachmentDefinition,
    wanted: &NetworkAttachmentDefinition,
) -> bool {
    let has_all = |have: Option<&std::collections::BTreeMap<String, String>>,
                   want: Option<&std::collections::BTreeMap<String, String>>| {
        want.into_iter()
            .flatten()
            .all(|(k, v)| have.and_then(|h| h.get(k)) == Some(v))
    };
    existing.spec == wanted.spec
        && has_all(
            existing.metadata.labels.as_ref(),
            wanted.metadata.labels.as_ref(),
        )
        && wanted.metadata.owner_references.iter().flatten().all(|o| {
            existing
                .metadata
                .owner_references
                .iter()
                .flatten()
                .any(|e| e.uid == o.uid && e.controller == o.controller)
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nad_carries_the_cni_config_and_an_owner_reference() {
        let mut net: L2Network = serde_yaml::from_str(
            "apiVersion: l2mesh.io/v1alpha1\nkind: L2Network\nmetadata: {name: blue, namespace: team, uid: u-1}\nspec: {ipRange: 10.1.0.0/16}\n",
        )
        .unwrap();
        let nad = nad_for(&net, net.ip_range().unwrap(), 1390);
        assert_eq!(nad.metadata.name.as_deref(), Some("blue"));
        assert_eq!(nad.metadata.namespace.as_deref(), Some("team"));
        let owner = &nad.metadata.owner_references.as_ref().unwrap()[0];
        assert_eq!(
            (owner.kind.as_str(), owner.uid.as_str()),
            ("L2Network", "u-1")
        );
        let conf: serde_json::Value = serde_json::from_str(&nad.spec.config).unwrap();
        assert_eq!(conf["name"], "team.blue");
        assert_eq!(conf["type"], "l2mesh-cni");
        assert_eq!(conf["ipam"]["subnet"], "10.1.0.0/16");
        net.spec.ip_range = None;
        let conf = cni_config(&net, None, 1300);
        assert!(conf.get("ipam").is_none());
        assert_eq!(conf["mtu"], 1300);
    }

    #[test]
    fn a_nad_is_up_to_date_only_with_the_same_config_labels_and_owner() {
        let net: L2Network = serde_yaml::from_str(
            "apiVersion: l2mesh.io/v1alpha1\nkind: L2Network\nmetadata: {name: blue, namespace: team, uid: u-1}\nspec: {ipRange: 10.1.0.0/16}\n",
        )
        .unwrap();
        let wanted = nad_for(&net, net.ip_range().unwrap(), 1390);
        let mut existing = wanted.clone();
        existing.metadata.resource_version = Some("7".into());
        assert!(up_to_date(&existing, &wanted));
        existing.spec.config = cni_config(&net, None, 1390).to_string();
        assert!(!up_to_date(&existing, &wanted), "another config");
        let mut existing = wanted.clone();
        existing.metadata.owner_references = None;
        assert!(!up_to_date(&existing, &wanted), "no owner");
    }

    #[test]
    fn routes_and_gateway_of_the_spec_reach_the_cni_ipam_config() {
        let net: L2Network = serde_yaml::from_str(
            "apiVersion: l2mesh.io/v1alpha1\nkind: L2Network\nmetadata: {name: cdn, namespace: team}\nspec:\n  ipRange: 10.30.0.0/24\n  gateway: [10.30.0.1]\n  routes:\n    - {dst: 10.40.0.0/16}\n    - {dst: 0.0.0.0/0, gw: 10.30.0.254}\n",
        )
        .unwrap();
        let conf = cni_config(&net, net.ip_range().unwrap(), 1390);
        // What the NAD carries is what l2mesh-cni reads as its IPAM config.
        let ipam: crate::cni::types::IpamConf =
            serde_json::from_value(conf["ipam"].clone()).unwrap();
        assert_eq!(ipam.gateway, vec!["10.30.0.1".to_owned()]);
        assert_eq!(ipam.routes.len(), 2);
        assert_eq!(ipam.routes[0].dst, "10.40.0.0/16");
        assert_eq!(ipam.routes[0].gw, None);
        assert_eq!(ipam.routes[1].gw.as_deref(), Some("10.30.0.254"));
        // Without l2mesh IPAM there is nowhere to put them.
        let conf = cni_config(&net, None, 1390);
        assert!(conf.get("ipam").is_none());
    }
}
