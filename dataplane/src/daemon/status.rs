//! What `GetStatus` reports: configuration, peers, networks and ports.

use std::collections::HashMap;
use std::time::Instant;

use l2mesh_proto::node::{
    DropCounter, MacEntry, NetworkStatus, NodeStatus, PeerGroup, PeerStatus, PortStatus,
};

use super::Daemon;
use crate::Error;
use crate::config::key_b64;
use crate::netdev;
use crate::port::Port;
use crate::switch::Group;

impl Daemon {
    /// Everything `GetStatus` reports.
    pub async fn status(&self) -> Result<NodeStatus, Error> {
        let now = Instant::now();
        let e = &self.engine;
        let cfg = e.config();
        let macs: HashMap<u32, _> = cfg
            .networks
            .values()
            .map(|n| (n.vni, e.macs(n.vni, now)))
            .collect();
        let (peers, drops, pubkey) = (e.peers(), e.drops(), e.public_key());
        let counters = |m: &std::collections::BTreeMap<&'static str, u64>| {
            m.iter()
                .map(|(r, c)| DropCounter {
                    reason: (*r).to_string(),
                    count: *c,
                })
                .collect::<Vec<_>>()
        };
        let mut networks = Vec::new();
        for n in cfg.networks.values() {
            let bridge = netdev::bridge_name(n.vni);
            let ports = self.netlink.ports(&bridge).await?;
            networks.push(NetworkStatus {
                name: n.name.clone(),
                vni: n.vni,
                mtu: n.mtu,
                ports: ports.iter().map(|p| p.ifname.clone()).collect(),
                port_status: ports.into_iter().map(port_status).collect(),
                bridge,
                tap: netdev::tap_name(n.vni),
                macs: macs
                    .get(&n.vni)
                    .map(|v| {
                        v.iter()
                            .map(|(mac, port, age)| MacEntry {
                                mac: mac.clone(),
                                port: port.clone(),
                                age_ms: u64::try_from(age.as_millis()).unwrap_or(u64::MAX),
                            })
                            .collect()
                    })
                    .unwrap_or_default(),
                pod_cidr: n.pod_cidr.clone(),
            });
        }
        Ok(NodeStatus {
            node_name: cfg.node_name.clone(),
            public_key: pubkey.to_vec(),
            listen_port: u32::from(self.local_port()),
            tunnel_ip: cfg.tunnel_ip.map(|i| i.to_string()).unwrap_or_default(),
            applied_revision: cfg.revision,
            peers: peers
                .iter()
                .map(|p| PeerStatus {
                    public_key: p.cfg.key.to_vec(),
                    name: if p.cfg.name.is_empty() {
                        key_b64(&p.cfg.key)
                    } else {
                        p.cfg.name.clone()
                    },
                    group: match p.cfg.group {
                        Group::Local => PeerGroup::Local,
                        Group::Remote => PeerGroup::Remote,
                    }
                    .into(),
                    endpoint: p.endpoint.map(|e| e.to_string()).unwrap_or_default(),
                    last_handshake_age_ms: p
                        .last_handshake
                        .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX)),
                    rx_bytes: p.stats.rx_bytes,
                    tx_bytes: p.stats.tx_bytes,
                    rx_packets: p.stats.rx_packets,
                    tx_packets: p.stats.tx_packets,
                    drops: counters(&p.stats.drops),
                    vnis: p.cfg.vnis.iter().copied().collect(),
                    tunnel_ip: p.cfg.tunnel_ip.to_string(),
                })
                .collect(),
            networks,
            drops: counters(&drops),
        })
    }
}

fn port_status(p: Port) -> PortStatus {
    let (pod_namespace, pod_name) = p.pod.map(|r| (r.namespace, r.name)).unwrap_or_default();
    PortStatus {
        ifname: p.ifname,
        pod_namespace,
        pod_name,
    }
}
