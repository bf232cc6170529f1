//! `l2mesh-dataplane status -o json`: the daemon's status as a stable JSON
//! document for scripts (keys in base64, peer groups by name, ages in ms).

use l2mesh_proto::node::{DropCounter, NodeStatus, PeerGroup};
use serde_json::{Value, json};

use crate::config::key_b64;

fn drops(d: &[DropCounter]) -> Value {
    d.iter()
        .map(|c| (c.reason.clone(), Value::from(c.count)))
        .collect::<serde_json::Map<_, _>>()
        .into()
}

fn group(g: PeerGroup) -> &'static str {
    match g {
        PeerGroup::Local => "local",
        PeerGroup::Remote => "remote",
        PeerGroup::Unspecified => "unspecified",
    }
}

/// The status as JSON.
#[must_use]
pub fn status_json(s: &NodeStatus) -> Value {
    json!({
        "node": s.node_name,
        "publicKey": key_b64(&s.public_key),
        "listenPort": s.listen_port,
        "tunnelIp": s.tunnel_ip,
        "appliedRevision": s.applied_revision,
        "drops": drops(&s.drops),
        "peers": s.peers.iter().map(|p| json!({
            "name": p.name,
            "publicKey": key_b64(&p.public_key),
            "group": group(p.group()),
            "endpoint": p.endpoint,
            "tunnelIp": p.tunnel_ip,
            "lastHandshakeAgeMs": p.last_handshake_age_ms,
            "rxBytes": p.rx_bytes,
            "txBytes": p.tx_bytes,
            "rxPackets": p.rx_packets,
            "txPackets": p.tx_packets,
            "vnis": p.vnis,
            "drops": drops(&p.drops),
        })).collect::<Vec<_>>(),
        "networks": s.networks.iter().map(|n| json!({
            "name": n.name,
            "vni": n.vni,
            "mtu": n.mtu,
            "bridge": n.bridge,
            "tap": n.tap,
            "podCidr": n.pod_cidr,
            "ports": n.port_status.iter().map(|p| json!({
                "ifname": p.ifname,
                "pod": if p.pod_name.is_empty() {
                    Value::Null
                } else {
                    Value::from(format!("{}/{}", p.pod_namespace, p.pod_name))
                },
            })).collect::<Vec<_>>(),
            "macs": n.macs.iter().map(|m| json!({
                "mac": m.mac, "port": m.port, "ageMs": m.age_ms,
            })).collect::<Vec<_>>(),
        })).collect::<Vec<_>>(),
    })
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use l2mesh_proto::node::{NetworkStatus, PeerStatus, PortStatus};

    #[test]
    fn status_is_plain_json_with_names_not_numbers() {
        let s = NodeStatus {
            node_name: "n1".into(),
            public_key: vec![1; 32],
            listen_port: 51820,
            applied_revision: 7,
            peers: vec![PeerStatus {
                name: "n2".into(),
                group: PeerGroup::Remote as i32,
                last_handshake_age_ms: Some(1500),
                drops: vec![DropCounter {
                    reason: "not_member".into(),
                    count: 3,
                }],
                ..PeerStatus::default()
            }],
            networks: vec![NetworkStatus {
                name: "blue".into(),
                vni: 4096,
                port_status: vec![
                    PortStatus {
                        ifname: "l2p1".into(),
                        pod_namespace: "default".into(),
                        pod_name: "web-0".into(),
                    },
                    PortStatus {
                        ifname: "eth9".into(),
                        ..PortStatus::default()
                    },
                ],
                ..NetworkStatus::default()
            }],
            ..NodeStatus::default()
        };
        let v = status_json(&s);
        let back: Value = serde_json::from_str(&v.to_string()).unwrap();
        assert_eq!(back["node"], "n1");
        assert_eq!(back["publicKey"], key_b64(&[1; 32]));
        assert_eq!(back["appliedRevision"], 7);
        assert_eq!(back["peers"][0]["group"], "remote");
        assert_eq!(back["peers"][0]["lastHandshakeAgeMs"], 1500);
        assert_eq!(back["peers"][0]["drops"]["not_member"], 3);
        assert_eq!(back["networks"][0]["ports"][0]["pod"], "default/web-0");
        assert!(back["networks"][0]["ports"][1]["pod"].is_null());
    }
}
