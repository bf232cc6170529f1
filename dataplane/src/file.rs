//! The desired state as a JSON file, for `l2mesh-dataplane apply FILE`.
//! Keys are base64 as `wg` prints them; groups are "local" or "remote".

use base64::Engine as _;
use l2mesh_proto::node::{DesiredState, NetworkSpec, NodeIdentity, PeerGroup, PeerSpec};
use serde::Deserialize;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DesiredFile {
    #[serde(default)]
    pub revision: u64,
    #[serde(default)]
    pub node_name: String,
    #[serde(default)]
    pub tunnel_ip: String,
    #[serde(default)]
    pub listen_port: u32,
    #[serde(default)]
    pub networks: Vec<NetworkFile>,
    #[serde(default)]
    pub peers: Vec<PeerFile>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NetworkFile {
    pub name: String,
    pub vni: u32,
    #[serde(default)]
    pub mtu: u32,
    #[serde(default)]
    pub pod_cidr: String,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PeerFile {
    pub public_key: String,
    #[serde(default)]
    pub endpoint: String,
    pub tunnel_ip: String,
    #[serde(default)]
    pub vnis: Vec<u32>,
    pub group: String,
    #[serde(default)]
    pub persistent_keepalive: u32,
    #[serde(default)]
    pub name: String,
}

/// Parses the JSON text; errors say which field is wrong.
pub fn parse(text: &str) -> Result<DesiredState, String> {
    let f: DesiredFile = serde_json::from_str(text).map_err(|e| e.to_string())?;
    let mut peers = Vec::new();
    for p in f.peers {
        let key = base64::engine::general_purpose::STANDARD
            .decode(p.public_key.trim())
            .map_err(|e| format!("peer {:?}: public_key is not base64: {e}", p.name))?;
        let group = match p.group.as_str() {
            "local" => PeerGroup::Local,
            "remote" => PeerGroup::Remote,
            other => {
                return Err(format!(
                    "peer {:?}: group {other:?} must be \"local\" or \"remote\"",
                    p.name
                ));
            }
        };
        peers.push(PeerSpec {
            public_key: key,
            endpoint: p.endpoint,
            tunnel_ip: p.tunnel_ip,
            vnis: p.vnis,
            group: group.into(),
            persistent_keepalive: p.persistent_keepalive,
            name: p.name,
        });
    }
    Ok(DesiredState {
        revision: f.revision,
        identity: Some(NodeIdentity {
            node_name: f.node_name,
            tunnel_ip: f.tunnel_ip,
            listen_port: f.listen_port,
        }),
        networks: f
            .networks
            .into_iter()
            .map(|n| NetworkSpec {
                name: n.name,
                vni: n.vni,
                mtu: n.mtu,
                pod_cidr: n.pod_cidr,
            })
            .collect(),
        peers,
    })
}

#[cfg(test)]
mod tests {
    #[test]
    fn parses_and_rejects_with_reasons() {
        let ok = r#"{"revision":3,"tunnel_ip":"100.64.0.1","networks":[{"name":"blue","vni":10}],
            "peers":[{"public_key":"AQEBAQEBAQEBAQEBAQEBAQEBAQEBAQEBAQEBAQEBAQE=","tunnel_ip":"100.64.0.2","group":"local","vnis":[10]}]}"#;
        let d = super::parse(ok).unwrap();
        assert_eq!(d.peers[0].public_key, vec![1; 32]);
        assert!(
            super::parse(&ok.replace("\"local\"", "\"side\""))
                .unwrap_err()
                .contains("group")
        );
        assert!(
            super::parse(&ok.replace("revision", "revison"))
                .unwrap_err()
                .contains("revison")
        );
    }
}
