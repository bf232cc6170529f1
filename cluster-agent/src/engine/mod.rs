//! The agent's state and reconcile step, shared by the node sync server, the
//! broker link and the intent source. Inputs are set through [`Shared`]; an
//! input that changed wakes [`Shared::reconcile`], which recomputes only what
//! the change reaches (the node states through the [`DesiredIndex`], the
//! statuses of the networks concerned) and publishes what changed. An input
//! set again unchanged wakes nothing: a node's periodic report changes
//! nothing unless what the agent uses of it changed (see [`NodeDigest`]).
//!
//! Two rules keep the state of running networks stable across restarts:
//! - nothing is computed, freed or published before both the node list and
//!   the L2Network list have been set once (in Kubernetes mode: after each
//!   kind's initial list), so a network not seen *yet* never loses its
//!   allocations; only a network missing from a complete list is gone;
//! - allocations are made durable ([`AllocStore::save`]) before anything that
//!   depends on them reaches the nodes, the broker or the status; while a
//!   save fails nothing new is published and the save is retried.

use crate::crd::{L2Network, L2NetworkStatus};
use crate::desired::index::DesiredIndex;
use crate::desired::{Hello, NetworkOutcome, NodeEntry};
use crate::ipam::Allocations;
use crate::status::{self, LinkRow, NodeDigest};
use failover::{Election, Liveness};
use ipnet::Ipv4Net;
use l2mesh_proto::broker::{Admission, ClusterView, Gateway, LinkHealth};
use l2mesh_proto::node::{DesiredState, NodeStatus};
use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Mutex, MutexGuard};
use std::time::Instant;
use tokio::sync::{Notify, watch};

pub mod failover;
mod reconcile;
mod stores;

pub use stores::{AllocStore, FileAllocStore, FileStatusSink, SaveFuture, StatusSink};

/// What the agent tells the broker; sent again whenever it changes.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct BrokerReports {
    pub gateways: Vec<Gateway>,
    pub networks: Vec<String>,
}

#[derive(Debug, Default)]
struct State {
    /// `None` until the node list is complete.
    nodes: Option<Vec<NodeEntry>>,
    /// `None` until the L2Network list is complete.
    networks: Option<Vec<L2Network>>,
    hellos: BTreeMap<String, Hello>,
    /// What the status uses of each node's last report.
    digests: BTreeMap<String, NodeDigest>,
    /// Each node's links as last reported (the per-link table).
    links: BTreeMap<String, Vec<LinkRow>>,
    view: Option<ClusterView>,
    /// Whether `view` came from the broker in this run (not from the store).
    view_live: bool,
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
    /// The last save that failed, while the allocations stay unsaved.
    unsaved: Option<String>,
    /// Set when the NetworkAttachmentDefinition CRD is missing (Kubernetes mode).
    nad_missing: Option<String>,
    /// Every node's desired state, updated incrementally.
    index: DesiredIndex,
    /// Nodes whose state was recomputed and is not published yet.
    unpublished: BTreeSet<String>,
    /// The network outcomes of the last reconcile.
    outcomes: BTreeMap<String, NetworkOutcome>,
    /// The nodes expected to apply the networks, as of the last reconcile.
    expected: Vec<String>,
    /// Statuses to recompute at the next publish.
    stale: Stale,
}

/// Which statuses an input change reaches (kept until they are published).
#[derive(Debug, Default)]
struct Stale {
    all: bool,
    /// L2Network keys.
    keys: BTreeSet<String>,
    /// Network names on the nodes (a node's pods or applied networks changed).
    names: BTreeSet<String>,
    /// VNIs whose links changed.
    vnis: BTreeSet<u32>,
}

impl Stale {
    fn covers(&self, o: &NetworkOutcome) -> bool {
        self.all
            || self.keys.contains(&o.key)
            || self.names.contains(&o.name)
            || o.vni.is_some_and(|v| self.vnis.contains(&v))
    }
}

/// Whether two L2Network lists mean the same intent: the agent's own
/// status writes (and other metadata) come back through the watch and
/// must not start a reconcile.
fn same_intent(a: &[L2Network], b: &[L2Network]) -> bool {
    a.len() == b.len()
        && a.iter().zip(b).all(|(x, y)| {
            x.spec == y.spec
                && x.metadata.name == y.metadata.name
                && x.metadata.namespace == y.metadata.namespace
                && x.metadata.generation == y.metadata.generation
                && x.metadata.creation_timestamp == y.metadata.creation_timestamp
                && x.metadata.deletion_timestamp == y.metadata.deletion_timestamp
        })
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
    /// `None` until the first complete reconcile: the broker must never see
    /// a request made from half the intent.
    reports: watch::Sender<Option<BrokerReports>>,
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
        // The last broker view, so that multi-cluster networks stay on the
        // nodes while the broker is not (yet) reachable after a restart.
        let view = allocs.broker_view();
        Ok(Self {
            state: Mutex::new(State {
                saved: allocs.clone(),
                allocs,
                hellos,
                view,
                revision,
                election: Election::default().resume(gateway.clone()),
                saved_gateway: gateway,
                ..State::default()
            }),
            dirty: Notify::new(),
            tunnel_subnet,
            allocs_store,
            sink,
            reports: watch::channel(None).0,
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

    /// Replace the intent (both lists complete).
    pub fn set_intent(&self, nodes: Vec<NodeEntry>, networks: Vec<L2Network>) {
        self.set_nodes(nodes);
        self.set_networks(networks);
    }

    /// Replace the L2Networks only, with the complete list (Kubernetes mode:
    /// called once the initial list is in, then on every change).
    pub fn set_networks(&self, networks: Vec<L2Network>) {
        let mut s = self.lock();
        let changed = !s
            .networks
            .as_ref()
            .is_some_and(|old| same_intent(old, &networks));
        s.networks = Some(networks);
        drop(s);
        if changed {
            self.touch();
        }
    }

    /// Replace the node list only, with the complete list.
    pub fn set_nodes(&self, nodes: Vec<NodeEntry>) {
        let mut s = self.lock();
        if s.nodes.as_ref() != Some(&nodes) {
            s.nodes = Some(nodes);
            drop(s);
            self.touch();
        }
    }

    /// Whether the node list and the L2Network list are both complete.
    #[must_use]
    pub fn intent_complete(&self) -> bool {
        let s = self.lock();
        s.nodes.is_some() && s.networks.is_some()
    }

    /// The complete L2Network list, `None` until it is in.
    #[must_use]
    pub fn networks(&self) -> Option<Vec<L2Network>> {
        self.lock().networks.clone()
    }

    /// The NetworkAttachmentDefinition CRD is missing (`Some(why)`) or back.
    pub fn set_nad_missing(&self, why: Option<String>) {
        let mut s = self.lock();
        if s.nad_missing != why {
            s.nad_missing = why;
            drop(s);
            self.touch();
        }
    }

    /// Why pods cannot attach (the NAD CRD is missing), while so.
    #[must_use]
    pub fn nad_missing(&self) -> Option<String> {
        self.lock().nad_missing.clone()
    }

    /// Why the allocations are not saved, while they are not.
    #[must_use]
    pub fn unsaved(&self) -> Option<String> {
        self.lock().unsaved.clone()
    }

    /// Whether the node list is complete (before, no node can be refused).
    #[must_use]
    pub fn nodes_listed(&self) -> bool {
        self.lock().nodes.is_some()
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

    /// Take a node's status report; returns the node's current desired
    /// revision. Only a change of what the agent uses (see [`NodeDigest`])
    /// wakes a reconcile, and only the statuses of the networks it concerns
    /// are recomputed. A status carrying a new public key is a key rotation:
    /// the node's hello is updated so that its peers (and the broker) get
    /// the new key at once.
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
        let digest = NodeDigest::of(&status.node_name, &status);
        let node = status.node_name;
        let rows = status::digest::link_rows(&node, status.peers);
        let mut s = self.lock();
        let rev = s
            .desired
            .get(&node)
            .and_then(|tx| tx.borrow().as_ref().map(|d| d.revision))
            .unwrap_or_default();
        if let Some(l) = s.live.get_mut(&node) {
            l.last_heard = Some(Instant::now());
        }
        s.links.insert(node.clone(), rows);
        let changed = s.digests.get(&node) != Some(&digest);
        if changed {
            let (names, vnis) = NodeDigest::changes(s.digests.get(&node), Some(&digest));
            s.stale.names.extend(names);
            s.stale.vnis.extend(vnis);
            s.digests.insert(node, digest);
        }
        drop(s);
        if changed {
            self.touch();
        }
        rev
    }

    /// Every link as the nodes last reported it, by node then peer.
    #[must_use]
    pub fn link_table(&self) -> Vec<LinkRow> {
        self.lock().links.values().flatten().cloned().collect()
    }

    /// The broker's view of this cluster; a view that differs from the
    /// last one only in its revision changes nothing.
    pub fn set_view(&self, view: ClusterView) {
        let mut s = self.lock();
        let same = s.view.as_ref().is_some_and(|old| {
            old.networks == view.networks
                && old.admissions == view.admissions
                && old.cluster_name == view.cluster_name
                && old.tunnel_subnet == view.tunnel_subnet
        });
        if !same {
            s.allocs.set_broker_view(&view);
        }
        s.view = Some(view);
        s.view_live = true;
        drop(s);
        if !same {
            self.touch();
        }
    }

    /// The revision to resume the broker watch from: 0 (a full snapshot)
    /// until the broker sent a view in this run.
    #[must_use]
    pub fn view_revision(&self) -> u64 {
        let s = self.lock();
        s.view
            .as_ref()
            .filter(|_| s.view_live)
            .map_or(0, |v| v.revision)
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
        let mut s = self.lock();
        if s.admissions != admissions {
            s.admissions = admissions;
            drop(s);
            self.touch();
        }
    }

    /// Desired state of one node, now and after every change.
    pub fn subscribe(&self, node: &str) -> watch::Receiver<Option<DesiredState>> {
        self.lock()
            .desired
            .entry(node.to_owned())
            .or_insert_with(|| watch::channel(None).0)
            .subscribe()
    }

    /// What to tell the broker, now and after every change; `None` until
    /// the intent is complete and its allocations are saved.
    #[must_use]
    pub fn reports(&self) -> watch::Receiver<Option<BrokerReports>> {
        self.reports.subscribe()
    }

    /// Link health of the tunnels to other clusters.
    #[must_use]
    pub fn link_health(&self) -> Vec<LinkHealth> {
        status::remote_link_health(&self.lock().links)
    }

    /// Wait for the next change of any input.
    pub async fn changed(&self) {
        self.dirty.notified().await;
    }

    /// Whether allocations were changed that are not saved yet (and so
    /// were never published).
    #[must_use]
    pub fn pending_save(&self) -> bool {
        let s = self.lock();
        s.allocs != s.saved
    }

    /// Reconcile on every change, forever; a failed save is retried with
    /// backoff even without a change.
    pub async fn run(self: std::sync::Arc<Self>) {
        let mut backoff = crate::identity::Backoff::default();
        let mut last: Vec<String> = Vec::new();
        loop {
            let problems = self.reconcile().await;
            if problems != last {
                for p in &problems {
                    tracing::warn!(problem = %p, "reconcile");
                }
                last = problems;
            }
            if self.unsaved().is_some() {
                tokio::time::sleep(backoff.next_delay()).await;
            } else {
                backoff.reset();
                self.next_change().await;
            }
        }
    }

    /// The current status of a network (`namespace/name`).
    #[must_use]
    pub fn status_of(&self, key: &str) -> Option<L2NetworkStatus> {
        self.lock().statuses.get(key).map(|(_, s)| s.clone())
    }
}

#[cfg(test)]
mod steady_tests;
#[cfg(test)]
mod tests;
