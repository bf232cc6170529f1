//! The address and naming plan of a topology: pure, so it is unit-tested
//! without namespaces, and the demo can print it.
//!
//! - WAN `192.0.2.0/24` (documentation range, only ever inside our
//!   namespaces): broker `.1`, gateway of cluster `i` `.(10+i)`.
//! - LAN of cluster `i`: `10.i.0.0/24`; its gateway `.1`, node `k` `.(1+k)`.
//! - Node 0 of every cluster is its gateway (`c1-gw`); others are `c1-n1`, ...
//! - Pods `c1-gw-p1`, `c1-n1-p1`, ...: namespaces with only loopback until
//!   the real `l2mesh-cni` attaches them.
//!
//! Clusters' LANs are private: nodes have no route off their LAN, and
//! gateways do not forward, as between real clusters behind their gateways.

use std::net::Ipv4Addr;

use ipnet::Ipv4Net;

use crate::{Error, Result};

/// Name of the switch namespace's role; it holds one bridge per segment.
pub const SWITCH_ROLE: &str = "sw";
/// Role of the broker host.
pub const BROKER_ROLE: &str = "broker";
/// Interface name of a host's WAN port.
pub const WAN_IF: &str = "wan0";
/// Interface name of a node's LAN port.
pub const LAN_IF: &str = "lan0";

/// How big a topology to build.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TopologySpec {
    /// Number of clusters (1..=50).
    pub clusters: usize,
    /// Nodes per cluster including the gateway (1..=50).
    pub nodes_per_cluster: usize,
    /// Pod namespaces per node (0..=20).
    pub pods_per_node: usize,
}

impl Default for TopologySpec {
    /// Three clusters of two nodes, one pod per node: scenario 1's shape.
    fn default() -> Self {
        Self {
            clusters: 3,
            nodes_per_cluster: 2,
            pods_per_node: 1,
        }
    }
}

/// An L2 segment: one bridge in the switch namespace.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Segment {
    /// The WAN between the broker and the gateways.
    Wan,
    /// The LAN of cluster `i` (1-based).
    Lan(usize),
}

impl Segment {
    /// The bridge's name in the switch namespace.
    pub fn bridge(self) -> String {
        match self {
            Segment::Wan => "br-wan".to_owned(),
            Segment::Lan(i) => format!("br-c{i}"),
        }
    }

    /// `wan` or `c<i>-lan`, for tables.
    pub fn label(self) -> String {
        match self {
            Segment::Wan => "wan".to_owned(),
            Segment::Lan(i) => format!("c{i}-lan"),
        }
    }
}

/// One interface of a host: `name` inside the host, `switch_port` the veth
/// end on the segment's bridge.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IfacePlan {
    pub name: String,
    pub switch_port: String,
    pub segment: Segment,
    pub addr: Ipv4Net,
}

/// A host namespace on one or more segments.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HostPlan {
    /// Role, i.e. the namespace name without the scope prefix.
    pub role: String,
    pub ifaces: Vec<IfacePlan>,
}

impl HostPlan {
    /// The host's address on a segment.
    pub fn addr_on(&self, segment: Segment) -> Option<Ipv4Addr> {
        self.ifaces
            .iter()
            .find(|i| i.segment == segment)
            .map(|i| i.addr.addr())
    }
}

/// A node of a cluster and its pods.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodePlan {
    pub host: HostPlan,
    pub is_gateway: bool,
    /// Pod roles, e.g. `c1-n1-p1`.
    pub pods: Vec<String>,
}

/// A cluster: its LAN and its nodes, the gateway first.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClusterPlan {
    /// 1-based.
    pub index: usize,
    /// `c<i>`.
    pub name: String,
    pub lan: Ipv4Net,
    pub nodes: Vec<NodePlan>,
}

/// The whole topology.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Plan {
    pub spec: TopologySpec,
    pub wan: Ipv4Net,
    pub broker: HostPlan,
    pub clusters: Vec<ClusterPlan>,
}

fn net(a: [u8; 4], len: u8) -> Result<Ipv4Net> {
    Ipv4Net::new(Ipv4Addr::from(a), len).map_err(|e| Error::Spec(e.to_string()))
}

fn check_range(what: &str, value: usize, min: usize, max: usize) -> Result<u8> {
    if (min..=max).contains(&value) {
        u8::try_from(value).map_err(|e| Error::Spec(e.to_string()))
    } else {
        Err(Error::Spec(format!(
            "{what} is {value}; use {min} to {max}"
        )))
    }
}

impl Plan {
    /// Lays out a topology; refuses sizes the address plan cannot hold.
    pub fn new(spec: TopologySpec) -> Result<Self> {
        let clusters = check_range("the number of clusters", spec.clusters, 1, 50)?;
        let nodes = check_range(
            "the number of nodes per cluster",
            spec.nodes_per_cluster,
            1,
            50,
        )?;
        check_range("the number of pods per node", spec.pods_per_node, 0, 20)?;

        let wan = net([192, 0, 2, 0], 24)?;
        let broker = HostPlan {
            role: BROKER_ROLE.to_owned(),
            ifaces: vec![IfacePlan {
                name: WAN_IF.to_owned(),
                switch_port: "brk-w".to_owned(),
                segment: Segment::Wan,
                addr: net([192, 0, 2, 1], 24)?,
            }],
        };
        let mut cluster_plans = Vec::new();
        for c in 1..=clusters {
            let lan = net([10, c, 0, 0], 24)?;
            let mut node_plans = Vec::new();
            for k in 0..nodes {
                let is_gateway = k == 0;
                let short = if is_gateway {
                    format!("c{c}gw")
                } else {
                    format!("c{c}n{k}")
                };
                let role = if is_gateway {
                    format!("c{c}-gw")
                } else {
                    format!("c{c}-n{k}")
                };
                let mut ifaces = vec![IfacePlan {
                    name: LAN_IF.to_owned(),
                    switch_port: format!("{short}-l"),
                    segment: Segment::Lan(c.into()),
                    addr: net([10, c, 0, 1 + k], 24)?,
                }];
                if is_gateway {
                    ifaces.push(IfacePlan {
                        name: WAN_IF.to_owned(),
                        switch_port: format!("{short}-w"),
                        segment: Segment::Wan,
                        addr: net([192, 0, 2, 10 + c], 24)?,
                    });
                }
                let pods = (1..=spec.pods_per_node)
                    .map(|p| format!("{role}-p{p}"))
                    .collect();
                node_plans.push(NodePlan {
                    host: HostPlan { role, ifaces },
                    is_gateway,
                    pods,
                });
            }
            cluster_plans.push(ClusterPlan {
                index: c.into(),
                name: format!("c{c}"),
                lan,
                nodes: node_plans,
            });
        }
        Ok(Self {
            spec,
            wan,
            broker,
            clusters: cluster_plans,
        })
    }

    /// Every segment, WAN first.
    pub fn segments(&self) -> Vec<Segment> {
        std::iter::once(Segment::Wan)
            .chain(self.clusters.iter().map(|c| Segment::Lan(c.index)))
            .collect()
    }

    /// Every host (broker, then nodes cluster by cluster).
    pub fn hosts(&self) -> impl Iterator<Item = &HostPlan> {
        std::iter::once(&self.broker).chain(
            self.clusters
                .iter()
                .flat_map(|c| c.nodes.iter().map(|n| &n.host)),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeSet;

    #[test]
    fn default_plan_has_three_clusters_with_gateways_on_both_segments() {
        let plan = Plan::new(TopologySpec::default()).unwrap();
        assert_eq!(plan.clusters.len(), 3);
        let c2 = &plan.clusters[1];
        assert_eq!(c2.name, "c2");
        let gw = &c2.nodes[0];
        assert!(gw.is_gateway);
        assert_eq!(gw.host.role, "c2-gw");
        assert_eq!(
            gw.host.addr_on(Segment::Wan),
            Some(Ipv4Addr::new(192, 0, 2, 12))
        );
        assert_eq!(
            gw.host.addr_on(Segment::Lan(2)),
            Some(Ipv4Addr::new(10, 2, 0, 1))
        );
        let n1 = &c2.nodes[1];
        assert!(!n1.is_gateway);
        assert_eq!(n1.host.addr_on(Segment::Wan), None);
        assert_eq!(
            n1.host.addr_on(Segment::Lan(2)),
            Some(Ipv4Addr::new(10, 2, 0, 2))
        );
        assert_eq!(n1.pods, vec!["c2-n1-p1"]);
        assert_eq!(
            plan.broker.addr_on(Segment::Wan),
            Some(Ipv4Addr::new(192, 0, 2, 1))
        );
        assert_eq!(plan.segments().len(), 4);
    }

    #[test]
    fn names_and_addresses_never_collide_even_at_the_limits() {
        let plan = Plan::new(TopologySpec {
            clusters: 50,
            nodes_per_cluster: 50,
            pods_per_node: 2,
        })
        .unwrap();
        let mut roles = BTreeSet::new();
        let mut ports = BTreeSet::new();
        let mut addrs = BTreeSet::new();
        for h in plan.hosts() {
            assert!(roles.insert(h.role.clone()), "duplicate role {}", h.role);
            for i in &h.ifaces {
                assert!(i.switch_port.len() <= 15, "{} too long", i.switch_port);
                assert!(
                    ports.insert(i.switch_port.clone()),
                    "dup port {}",
                    i.switch_port
                );
                assert!(addrs.insert(i.addr.addr()), "dup addr {}", i.addr);
            }
        }
        for c in &plan.clusters {
            for n in &c.nodes {
                for p in &n.pods {
                    assert!(roles.insert(p.clone()), "duplicate role {p}");
                }
            }
        }
        assert!(plan.segments().iter().all(|s| s.bridge().len() <= 15));
    }

    #[test]
    fn sizes_out_of_range_are_refused_with_the_allowed_range() {
        for spec in [
            TopologySpec {
                clusters: 0,
                ..TopologySpec::default()
            },
            TopologySpec {
                clusters: 51,
                ..TopologySpec::default()
            },
            TopologySpec {
                nodes_per_cluster: 0,
                ..TopologySpec::default()
            },
            TopologySpec {
                pods_per_node: 21,
                ..TopologySpec::default()
            },
        ] {
            let err = Plan::new(spec).unwrap_err().to_string();
            assert!(err.contains("use "), "{err}");
        }
    }
}

/// One reachability expectation of the underlay.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Probe {
    /// Role of the namespace the ping starts from.
    pub from: String,
    /// What is pinged, for tables (a role or a segment).
    pub to: String,
    pub addr: Ipv4Addr,
    /// Whether a reply is expected; `false` checks isolation.
    pub expect_reply: bool,
}

impl Plan {
    /// What the underlay must and must not reach: the broker and every
    /// gateway reach each other over the WAN; every node reaches its
    /// gateway over its LAN; no cluster reaches another cluster's LAN; pods
    /// reach nothing until l2mesh attaches them.
    pub fn underlay_probes(&self) -> Vec<Probe> {
        let mut probes = Vec::new();
        let wan_hosts: Vec<&HostPlan> = self
            .hosts()
            .filter(|h| h.addr_on(Segment::Wan).is_some())
            .collect();
        for from in &wan_hosts {
            for to in &wan_hosts {
                if let (false, Some(addr)) = (from.role == to.role, to.addr_on(Segment::Wan)) {
                    probes.push(Probe {
                        from: from.role.clone(),
                        to: to.role.clone(),
                        addr,
                        expect_reply: true,
                    });
                }
            }
        }
        for c in &self.clusters {
            let seg = Segment::Lan(c.index);
            let Some(gw) = c.nodes.first() else { continue };
            let Some(gw_lan) = gw.host.addr_on(seg) else {
                continue;
            };
            for n in c.nodes.iter().skip(1) {
                probes.push(Probe {
                    from: n.host.role.clone(),
                    to: gw.host.role.clone(),
                    addr: gw_lan,
                    expect_reply: true,
                });
            }
            // Another cluster's LAN (its last node) is out of reach.
            let other = self
                .clusters
                .iter()
                .find(|o| o.index != c.index)
                .and_then(|o| o.nodes.last().map(|n| (o, n)));
            if let Some((other, far)) = other
                && let Some(addr) = far.host.addr_on(Segment::Lan(other.index))
            {
                probes.push(Probe {
                    from: gw.host.role.clone(),
                    to: format!("{} (LAN)", far.host.role),
                    addr,
                    expect_reply: false,
                });
            }
            for n in &c.nodes {
                let Some(node_addr) = n.host.addr_on(seg) else {
                    continue;
                };
                for p in &n.pods {
                    probes.push(Probe {
                        from: p.clone(),
                        to: n.host.role.clone(),
                        addr: node_addr,
                        expect_reply: false,
                    });
                }
            }
        }
        probes
    }
}

#[cfg(test)]
mod probe_tests {
    use super::*;

    #[test]
    fn probes_cover_wan_mesh_lans_and_isolated_pods() {
        let plan = Plan::new(TopologySpec::default()).unwrap();
        let probes = plan.underlay_probes();
        let reply = |from: &str, to: &str| {
            probes
                .iter()
                .find(|p| p.from == from && p.to == to)
                .map(|p| p.expect_reply)
        };
        // 4 WAN hosts, each to the 3 others.
        assert_eq!(
            probes.iter().filter(|p| p.addr.octets()[0] == 192).count(),
            12
        );
        assert_eq!(reply("c1-gw", "c3-gw"), Some(true));
        assert_eq!(reply("broker", "c2-gw"), Some(true));
        assert_eq!(reply("c2-n1", "c2-gw"), Some(true));
        assert_eq!(reply("c1-gw-p1", "c1-gw"), Some(false));
        assert_eq!(reply("c3-n1-p1", "c3-n1"), Some(false));
        assert_eq!(reply("c1-gw", "c2-n1 (LAN)"), Some(false));
    }
}
