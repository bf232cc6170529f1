//! Builds a [`Plan`] out of real namespaces, veths and bridges.
//!
//! A "switch" namespace holds one bridge per segment; every host namespace
//! reaches a segment through a veth whose other end is a port of that
//! bridge. Both ends of every veth live in our namespaces, so deleting the
//! namespaces (on drop) removes every device we made.

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::time::{Duration, Instant};

use ipnet::IpNet;

use crate::netns::{NameScope, Netns};
use crate::plan::{HostPlan, Plan, Probe, SWITCH_ROLE, TopologySpec};
use crate::{Error, Result};

/// A built topology. Dropping it deletes every namespace (and so every
/// device) it made, and kills whatever still runs inside them.
#[derive(Debug)]
pub struct Topology {
    // Pods and hosts go before the switch: devices die with their namespace.
    namespaces: BTreeMap<String, Netns>,
    switch: Netns,
    plan: Plan,
    scope: NameScope,
}

/// The underlay is IPv4 only: without this, every host would chatter
/// IPv6 neighbour discovery onto the segments, which is noise in captures.
/// Pods keep IPv6 (their namespaces are left alone).
fn ipv4_only(ns: &Netns) -> Result<()> {
    ns.sysctl("net.ipv6.conf.all.disable_ipv6", "1")?;
    ns.sysctl("net.ipv6.conf.default.disable_ipv6", "1")
}

/// Outcome of one underlay [`Probe`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProbeResult {
    pub probe: Probe,
    /// Whether the expectation held.
    pub ok: bool,
    /// Whether a reply came.
    pub replied: bool,
}

impl Topology {
    /// Builds the topology for `spec`, reporting each step to `progress`.
    pub fn build(spec: TopologySpec, progress: &mut dyn FnMut(&str)) -> Result<Self> {
        let plan = Plan::new(spec)?;
        let scope = NameScope::new();
        progress(&format!(
            "switch namespace with {} segments",
            plan.segments().len()
        ));
        let switch = Netns::create(&scope, SWITCH_ROLE)?;
        ipv4_only(&switch)?;
        for seg in plan.segments() {
            switch.add_bridge(&seg.bridge())?;
        }
        let mut topo = Self {
            namespaces: BTreeMap::new(),
            switch,
            plan,
            scope,
        };
        let hosts: Vec<HostPlan> = topo.plan.hosts().cloned().collect();
        for host in &hosts {
            progress(&format!("host {}", host.role));
            topo.add_host(host)?;
        }
        let pods: Vec<String> = topo
            .plan
            .clusters
            .iter()
            .flat_map(|c| c.nodes.iter().flat_map(|n| n.pods.iter().cloned()))
            .collect();
        if !pods.is_empty() {
            progress(&format!(
                "{} pod namespaces (isolated until l2mesh-cni attaches them)",
                pods.len()
            ));
        }
        for pod in pods {
            let ns = Netns::create(&topo.scope, &pod)?;
            topo.namespaces.insert(pod, ns);
        }
        Ok(topo)
    }

    fn add_host(&mut self, host: &HostPlan) -> Result<()> {
        let ns = Netns::create(&self.scope, &host.role)?;
        ipv4_only(&ns)?;
        for iface in &host.ifaces {
            self.switch.add_veth(&iface.switch_port, &ns, &iface.name)?;
            self.switch
                .set_master(&iface.switch_port, &iface.segment.bridge())?;
            self.switch.link_up(&iface.switch_port)?;
            ns.add_addr(&iface.name, IpNet::V4(iface.addr))?;
            ns.link_up(&iface.name)?;
        }
        self.namespaces.insert(host.role.clone(), ns);
        Ok(())
    }

    /// The plan this topology was built from.
    pub fn plan(&self) -> &Plan {
        &self.plan
    }

    /// The `l2e-<pid>-<n>-` prefix shared by all its namespaces.
    pub fn prefix(&self) -> &str {
        self.scope.prefix()
    }

    /// The switch namespace (one bridge per segment).
    pub fn switch(&self) -> &Netns {
        &self.switch
    }

    /// The namespace with this role (`broker`, `c1-gw`, `c2-n1`, `c1-gw-p1`).
    pub fn netns(&self, role: &str) -> Result<&Netns> {
        self.namespaces.get(role).ok_or_else(|| Error::InvalidName {
            name: role.to_owned(),
            reason: "no namespace with this role in the topology",
        })
    }

    /// The broker host.
    pub fn broker(&self) -> Result<&Netns> {
        self.netns(crate::plan::BROKER_ROLE)
    }

    /// Node `k` of cluster `c` (1-based cluster, node 0 is the gateway).
    pub fn node(&self, c: usize, k: usize) -> Result<&Netns> {
        self.netns(&self.node_role(c, k)?)
    }

    /// The gateway of cluster `c`.
    pub fn gateway(&self, c: usize) -> Result<&Netns> {
        self.node(c, 0)
    }

    /// Pod `p` (1-based) of node `k` of cluster `c`.
    pub fn pod(&self, c: usize, k: usize, p: usize) -> Result<&Netns> {
        self.netns(&format!("{}-p{p}", self.node_role(c, k)?))
    }

    fn node_role(&self, c: usize, k: usize) -> Result<String> {
        self.plan
            .clusters
            .get(c.wrapping_sub(1))
            .and_then(|cl| cl.nodes.get(k))
            .map(|n| n.host.role.clone())
            .ok_or_else(|| Error::InvalidName {
                name: format!("cluster {c} node {k}"),
                reason: "no such node in the topology",
            })
    }

    /// Every namespace name with its role, the switch first.
    pub fn namespace_names(&self) -> Vec<(String, String)> {
        std::iter::once((SWITCH_ROLE.to_owned(), self.switch.name().to_owned()))
            .chain(
                self.namespaces
                    .iter()
                    .map(|(role, ns)| (role.clone(), ns.name().to_owned())),
            )
            .collect()
    }

    /// Runs every underlay probe of the plan, in parallel. Pings that should
    /// succeed are retried (the first one waits for ARP) up to `timeout`;
    /// isolation probes are one ping each.
    pub fn check_underlay(&self, timeout: Duration) -> Result<Vec<ProbeResult>> {
        let probes = self.plan.underlay_probes();
        let results = std::thread::scope(|s| {
            let handles: Vec<_> = probes
                .into_iter()
                .map(|probe| s.spawn(move || self.run_probe(probe, timeout)))
                .collect();
            handles
                .into_iter()
                .map(|h| {
                    h.join()
                        .unwrap_or_else(|_| Err(Error::Spec("probe thread panicked".into())))
                })
                .collect::<Result<Vec<_>>>()
        })?;
        Ok(results)
    }

    fn run_probe(&self, probe: Probe, timeout: Duration) -> Result<ProbeResult> {
        let ns = self.netns(&probe.from)?;
        let addr = IpAddr::V4(probe.addr);
        let deadline = Instant::now() + timeout;
        let replied = loop {
            let replied = ns.ping(addr, 1)?;
            if replied || !probe.expect_reply || Instant::now() >= deadline {
                break replied;
            }
        };
        Ok(ProbeResult {
            ok: replied == probe.expect_reply,
            replied,
            probe,
        })
    }

    /// Leaves every namespace in place (for `l2mesh-demo --keep`) and
    /// returns `(role, namespace)` pairs.
    pub fn keep(self) -> Vec<(String, String)> {
        let mut kept = vec![(SWITCH_ROLE.to_owned(), self.switch.keep())];
        for (role, ns) in self.namespaces {
            kept.push((role, ns.keep()));
        }
        kept
    }
}
