//! The agent's state and reconcile step, shared by the node sync server, the
//! broker link and the intent source. Inputs are set through [`Shared`]; each
//! change wakes [`Shared::reconcile`], which recomputes everything with the
//! pure core and publishes what changed.

use crate::crd::{L2Network, L2NetworkStatus, Scope};
use crate::desired::{self, Hello, NodeEntry};
use crate::ipam::Allocations;
use crate::status;
use failover::{Election, Liveness};
use ipnet::Ipv4Net;
use l2mesh_proto::broker::{Admission, ClusterView, Gateway, LinkHealth};
use l2mesh_proto::node::{DesiredState, NodeStatus};
use std::collections::BTreeMap;
use std::sync::{Mutex, MutexGuard};
use std::time::Instant;
use tokio::sync::{Notify, watch};

pub mod failover;
mod stores;

pub use stores::{AllocStore, FileAllocStore, FileStatusSink, StatusSink};

/// What the agent tells the broker; sent again whenever it changes.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct BrokerReports {
    pub gateways: Vec<Gateway>,
    pub networks: Vec<String>,
}

#[derive(Debug, Default)]
struct State {
    nodes: Option<Vec<NodeEntry>>,
    networks: Vec<L2Network>,
    hellos: BTreeMap<String, Hello>,
    node_status: BTreeMap<String, NodeStatus>,
    view: Option<ClusterView>,
    admissions: Vec<Admission>,
    allocs: Allocations,
    /// What the store holds, to save only changes.
    saved: Allocations,
    desired: BTreeMap<String, watch::Sender<Option<DesiredState>>>,
    revision: u64,
    statuses: BTreeMap<String, (L2Network, L2NetworkStatus)>,
    /// Node dataplanes' liveness, for the gateway election.
    live: BTreeMap<String, Liveness>,
    election: Election,
    /// The active gateway as the store holds it.
    saved_gateway: Option<String>,
    /// Why the broker refuses this cluster, while it does.
    broker_refusal: Option<String>,
}

/// How often the gateway election is re-checked without other changes
/// (a silent gateway times out without any event).
const LIVENESS_CHECK: std::time::Duration = std::time::Duration::from_secs(1);

/// Gateway nodes that said hello, with their dataplane's liveness.
fn gateway_candidates<'a>(
    nodes: &'a [NodeEntry],
    hellos: &BTreeMap<String, Hello>,
    live: &BTreeMap<String, Liveness>,
) -> Vec<(&'a str, Liveness)> {
    nodes
        .iter()
        .filter(|n| n.gateway && hellos.contains_key(&n.name))
        .map(|n| {
            (
                n.name.as_str(),
                live.get(&n.name).copied().unwrap_or_default(),
            )
        })
        .collect()
}

/// Held while a node's watch is open; dropping it marks the stream gone.
#[derive(Debug)]
pub struct StreamGuard {
    shared: std::sync::Arc<Shared>,
    node: String,
}

impl Drop for StreamGuard {
    fn drop(&mut self) {
        let mut s = self.shared.lock();
        if let Some(l) = s.live.get_mut(&self.node) {
            l.streams = l.streams.saturating_sub(1);
        }
        drop(s);
        self.shared.touch();
    }
}

/// The state, behind one lock; every method is short and never awaits.
#[derive(Debug)]
pub struct Shared {
    state: Mutex<State>,
    dirty: Notify,
    tunnel_subnet: Ipv4Net,
    allocs_store: Box<dyn AllocStore>,
    sink: Box<dyn StatusSink>,
    reports: watch::Sender<BrokerReports>,
    /// Set when the cluster has a broker; otherwise multi-cluster networks wait.
    has_broker: bool,
    pub metrics: crate::metrics::Metrics,
}

fn now() -> String {
    let ts = k8s_openapi::jiff::Timestamp::now();
    k8s_openapi::jiff::Timestamp::from_second(ts.as_second())
        .map_or_else(|_| ts.to_string(), |t| t.to_string())
}

impl Shared {
    /// `allocs_store` holds the allocations (loaded now, saved on change).
    pub fn new(
        tunnel_subnet: Ipv4Net,
        allocs_store: Box<dyn AllocStore>,
        sink: Box<dyn StatusSink>,
        has_broker: bool,
    ) -> Result<Self, String> {
        let allocs = allocs_store.load()?;
        // Revisions grow across restarts: nodes may ignore older ones.
        let revision = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(1, |d| u64::try_from(d.as_millis()).unwrap_or(1));
        let hellos = allocs
            .known_nodes
            .iter()
            .map(|(name, k)| {
                (
                    name.clone(),
                    Hello {
                        public_key: k.public_key.clone(),
                        listen_port: k.listen_port,
                        endpoints: k.endpoints.clone(),
                    },
                )
            })
            .collect();
        let gateway = allocs_store.load_gateway();
        Ok(Self {
            state: Mutex::new(State {
                saved: allocs.clone(),
                allocs,
                hellos,
                revision,
                election: Election::default().resume(gateway.clone()),
                saved_gateway: gateway,
                ..State::default()
            }),
            dirty: Notify::new(),
            tunnel_subnet,
            allocs_store,
            sink,
            reports: watch::channel(BrokerReports::default()).0,
            has_broker,
            metrics: crate::metrics::Metrics::default(),
        })
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // A panic while holding the lock leaves plain data; keep serving.
        self.state
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Gateways count as dead after `timeout` without a report.
    #[must_use]
    pub fn with_gateway_timeout(self, timeout: std::time::Duration) -> Self {
        let mut s = self.lock();
        let active = s.election.active().map(str::to_owned);
        s.election = Election::new(Instant::now(), timeout).resume(active);
        drop(s);
        self
    }

    /// A node's watch opened; the stream is live until the guard drops.
    #[must_use]
    pub fn node_connected(self: &std::sync::Arc<Self>, node: &str) -> StreamGuard {
        let mut s = self.lock();
        let l = s.live.entry(node.to_owned()).or_default();
        l.streams += 1;
        l.last_heard = Some(Instant::now());
        drop(s);
        self.touch();
        StreamGuard {
            shared: self.clone(),
            node: node.to_owned(),
        }
    }

    /// Whether the gateway election would now pick another gateway.
    #[must_use]
    pub fn gateway_change_due(&self) -> bool {
        let s = self.lock();
        let Some(nodes) = &s.nodes else {
            return false;
        };
        let mut e = s.election.clone();
        let before = e.active().map(str::to_owned);
        let after = e.elect(
            &gateway_candidates(nodes, &s.hellos, &s.live),
            Instant::now(),
        );
        before != after
    }

    /// Wait until an input changed or a gateway's liveness ran out.
    pub async fn next_change(&self) {
        loop {
            tokio::select! {
                () = self.dirty.notified() => return,
                () = tokio::time::sleep(LIVENESS_CHECK) => {
                    if self.gateway_change_due() {
                        return;
                    }
                }
            }
        }
    }

    fn touch(&self) {
        self.dirty.notify_one();
    }

    /// Replace the intent.
    pub fn set_intent(&self, nodes: Vec<NodeEntry>, networks: Vec<L2Network>) {
        let mut s = self.lock();
        s.nodes = Some(nodes);
        s.networks = networks;
        drop(s);
        self.touch();
    }

    /// Replace the L2Networks only (Kubernetes mode: one controller per kind).
    pub fn set_networks(&self, networks: Vec<L2Network>) {
        self.lock().networks = networks;
        self.touch();
    }

    /// Replace the node list only.
    pub fn set_nodes(&self, nodes: Vec<NodeEntry>) {
        self.lock().nodes = Some(nodes);
        self.touch();
    }

    #[must_use]
    pub fn is_known_node(&self, name: &str) -> bool {
        self.lock()
            .nodes
            .as_ref()
            .is_some_and(|n| n.iter().any(|x| x.name == name))
    }

    pub fn set_hello(&self, node: &str, hello: Hello) {
        let mut s = self.lock();
        let changed = s.hellos.insert(node.to_owned(), hello.clone()) != Some(hello.clone());
        if changed {
            // Saved with the allocations on the next reconcile.
            s.allocs.known_nodes.insert(
                node.to_owned(),
                crate::ipam::KnownNode {
                    public_key: hello.public_key,
                    listen_port: hello.listen_port,
                    endpoints: hello.endpoints,
                },
            );
        }
        drop(s);
        if changed {
            self.touch();
        }
    }

    /// Store a node's status; returns the node's current desired revision.
    /// A status carrying a new public key is a key rotation: the node's hello
    /// is updated so that its peers (and the broker) get the new key at once.
    pub fn set_node_status(&self, status: NodeStatus) -> u64 {
        let rotated = {
            let s = self.lock();
            s.hellos.get(&status.node_name).and_then(|hello| {
                (status.public_key.len() == 32 && hello.public_key != status.public_key).then(
                    || Hello {
                        public_key: status.public_key.clone(),
                        ..hello.clone()
                    },
                )
            })
        };
        if let Some(hello) = rotated {
            tracing::info!(node = %status.node_name, "node rotated its WireGuard key");
            self.set_hello(&status.node_name, hello);
        }
        let mut s = self.lock();
        let rev = s
            .desired
            .get(&status.node_name)
            .and_then(|tx| tx.borrow().as_ref().map(|d| d.revision))
            .unwrap_or_default();
        if let Some(l) = s.live.get_mut(&status.node_name) {
            l.last_heard = Some(Instant::now());
        }
        s.node_status.insert(status.node_name.clone(), status);
        drop(s);
        self.touch();
        rev
    }

    pub fn set_view(&self, view: ClusterView) {
        self.lock().view = Some(view);
        self.touch();
    }

    #[must_use]
    pub fn view_revision(&self) -> u64 {
        self.lock().view.as_ref().map_or(0, |v| v.revision)
    }

    /// The broker refuses (Some) or accepts again (None) this cluster's
    /// identity; multi-cluster networks show it in their Admitted condition.
    pub fn set_broker_refusal(&self, why: Option<String>) {
        let mut s = self.lock();
        if s.broker_refusal != why {
            s.broker_refusal = why;
            drop(s);
            self.touch();
        }
    }

    pub fn set_admissions(&self, admissions: Vec<Admission>) {
        self.lock().admissions = admissions;
        self.touch();
    }

    /// Desired state of one node, now and after every change.
    pub fn subscribe(&self, node: &str) -> watch::Receiver<Option<DesiredState>> {
        self.lock()
            .desired
            .entry(node.to_owned())
            .or_insert_with(|| watch::channel(None).0)
            .subscribe()
    }

    /// What to tell the broker, now and after every change.
    #[must_use]
    pub fn reports(&self) -> watch::Receiver<BrokerReports> {
        self.reports.subscribe()
    }

    /// Link health of the tunnels to other clusters.
    #[must_use]
    pub fn link_health(&self) -> Vec<LinkHealth> {
        status::remote_link_health(&self.lock().node_status)
    }

    /// Wait for the next change of any input.
    pub async fn changed(&self) {
        self.dirty.notified().await;
    }

    /// Recompute and publish. Returns problems worth logging.
    pub fn reconcile(&self) -> Vec<String> {
        let started = std::time::Instant::now();
        let mut guard = self.lock();
        let s = &mut *guard;
        let Some(nodes) = s.nodes.clone() else {
            return Vec::new();
        };
        let mut outcomes =
            desired::resolve_networks(&s.networks, s.view.as_ref(), &s.admissions, &mut s.allocs);
        for o in outcomes
            .iter_mut()
            .filter(|o| o.scope == Scope::MultiCluster)
        {
            if !self.has_broker {
                o.admission = Some((
                    l2mesh_proto::broker::AdmissionState::Unspecified,
                    "this agent runs without a broker (no join string)".into(),
                ));
            }
            o.broker_refusal.clone_from(&s.broker_refusal);
        }
        // Only the elected gateway is handed to the plan as one: the plan
        // gives remote tunnels to a single gateway and reports it.
        let before = s.election.active().map(str::to_owned);
        let gateway = s.election.elect(
            &gateway_candidates(&nodes, &s.hellos, &s.live),
            Instant::now(),
        );
        if before.is_some() && before != gateway {
            tracing::warn!(from = ?before, to = ?gateway, "gateway failover");
            self.metrics.gateway_failovers.inc();
        }
        let plan_nodes: Vec<NodeEntry> = nodes
            .iter()
            .map(|n| NodeEntry {
                gateway: n.gateway && gateway.as_deref() == Some(n.name.as_str()),
                ..n.clone()
            })
            .collect();
        let plan = desired::plan(
            &plan_nodes,
            &s.hellos,
            &outcomes,
            self.tunnel_subnet,
            &mut s.allocs,
        );
        let mut problems = plan.problems.clone();
        if gateway != s.saved_gateway {
            match self.allocs_store.save_gateway(gateway.as_deref()) {
                Ok(()) => s.saved_gateway.clone_from(&gateway),
                Err(e) => problems.push(format!("cannot store the active gateway: {e}")),
            }
        }
        // Nodes that left the list: their watch ends (the sender is
        // dropped) and a reconnect is refused; forget what they said.
        s.desired.retain(|node, _| plan.nodes.contains_key(node));
        s.live.retain(|node, _| plan.nodes.contains_key(node));
        s.hellos.retain(|node, _| plan.nodes.contains_key(node));
        s.allocs
            .known_nodes
            .retain(|node, _| plan.nodes.contains_key(node));
        s.node_status
            .retain(|node, _| plan.nodes.contains_key(node));
        if s.allocs != s.saved {
            match self.allocs_store.save(&s.allocs) {
                Ok(()) => s.saved = s.allocs.clone(),
                Err(e) => problems.push(e),
            }
        }
        for (node, mut state) in plan.nodes {
            let tx = s
                .desired
                .entry(node)
                .or_insert_with(|| watch::channel(None).0);
            let same = tx.borrow().as_ref().is_some_and(|cur| {
                state.revision = cur.revision;
                *cur == state
            });
            if !same {
                s.revision += 1;
                state.revision = s.revision;
                tx.send_replace(Some(state));
            }
        }
        self.reports.send_if_modified(|r| {
            let next = BrokerReports {
                gateways: plan.gateways.clone(),
                networks: plan.requested_networks.clone(),
            };
            let changed = *r != next;
            *r = next;
            changed
        });
        let now = now();
        let mut seen = BTreeMap::new();
        for (net, o) in s
            .networks
            .iter()
            .filter_map(|n| outcomes.iter().find(|o| o.key == n.key()).map(|o| (n, o)))
        {
            let prev = s.statuses.get(&o.key).map(|(_, st)| st);
            let new = status::network_status(o, &s.node_status, prev, &now);
            if prev != Some(&new) {
                self.sink.write(net, Some(&new));
            }
            seen.insert(o.key.clone(), (net.clone(), new));
        }
        for (key, (net, _)) in &s.statuses {
            if !seen.contains_key(key) {
                self.sink.write(net, None);
            }
        }
        s.statuses = seen;
        problems.extend(
            outcomes
                .iter()
                .filter_map(|o| o.problem.as_ref().map(|p| format!("{}: {p}", o.key))),
        );
        let m = &self.metrics;
        let count = |n: usize| i64::try_from(n).unwrap_or(i64::MAX);
        m.reconciles.inc();
        m.reconcile_seconds.observe(started.elapsed().as_secs_f64());
        m.desired_revision
            .set(i64::try_from(s.revision).unwrap_or(i64::MAX));
        m.nodes_known.set(count(nodes.len()));
        m.nodes_with_hello.set(count(s.hellos.len()));
        let active = outcomes.iter().filter(|o| o.active()).count();
        m.networks_active.set(count(active));
        m.networks_inactive.set(count(outcomes.len() - active));
        m.problems.set(count(problems.len()));
        problems
    }

    /// The current status of a network (`namespace/name`).
    #[must_use]
    pub fn status_of(&self, key: &str) -> Option<L2NetworkStatus> {
        self.lock().statuses.get(key).map(|(_, s)| s.clone())
    }
}

#[cfg(test)]
mod tests;
