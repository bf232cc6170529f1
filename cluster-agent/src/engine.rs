//! The agent's state and reconcile step, shared by the node sync server, the
//! broker link and the intent source. Inputs are set through [`Shared`]; each
//! change wakes [`Shared::reconcile`], which recomputes everything with the
//! pure core and publishes what changed.

use crate::crd::{L2Network, L2NetworkStatus};
use crate::desired::{self, Hello, NodeEntry};
use crate::ipam::Allocations;
use crate::status;
use ipnet::Ipv4Net;
use l2mesh_proto::broker::{Admission, ClusterView, Gateway, LinkHealth};
use l2mesh_proto::node::{DesiredState, NodeStatus};
use std::collections::BTreeMap;
use std::path::PathBuf;
#[cfg(test)]
use std::sync::Arc;
use std::sync::{Mutex, MutexGuard};
use tokio::sync::{Notify, watch};

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
}

/// Where allocations (VNIs, tunnel IPs, pod slices) persist.
pub trait AllocStore: Send + Sync + std::fmt::Debug {
    fn load(&self) -> Result<Allocations, String>;
    fn save(&self, allocs: &Allocations) -> Result<(), String>;
}

/// Allocations in a JSON file (standalone mode).
#[derive(Debug)]
pub struct FileAllocStore(pub PathBuf);

impl AllocStore for FileAllocStore {
    fn load(&self) -> Result<Allocations, String> {
        match std::fs::read_to_string(&self.0) {
            Ok(text) => serde_json::from_str(&text)
                .map_err(|e| format!("{} is corrupt: {e}", self.0.display())),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Allocations::default()),
            Err(e) => Err(format!("{}: {e}", self.0.display())),
        }
    }
    fn save(&self, allocs: &Allocations) -> Result<(), String> {
        save_json(&self.0, allocs)
    }
}

/// Where the results of a reconcile go.
pub trait StatusSink: Send + Sync + std::fmt::Debug {
    /// Called with every network whose status changed, and with `None` for
    /// networks that no longer exist.
    fn write(&self, network: &L2Network, status: Option<&L2NetworkStatus>);
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
        Ok(Self {
            state: Mutex::new(State {
                saved: allocs.clone(),
                allocs,
                hellos,
                revision,
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
        let mut guard = self.lock();
        let s = &mut *guard;
        let Some(nodes) = s.nodes.clone() else {
            return Vec::new();
        };
        let mut outcomes =
            desired::resolve_networks(&s.networks, s.view.as_ref(), &s.admissions, &mut s.allocs);
        if !self.has_broker {
            for o in outcomes
                .iter_mut()
                .filter(|o| o.scope == crate::crd::Scope::MultiCluster)
            {
                o.admission = Some((
                    l2mesh_proto::broker::AdmissionState::Unspecified,
                    "this agent runs without a broker (no join string)".into(),
                ));
            }
        }
        let plan = desired::plan(
            &nodes,
            &s.hellos,
            &outcomes,
            self.tunnel_subnet,
            &mut s.allocs,
        );
        let mut problems = plan.problems.clone();
        // Nodes that left the list: their watch ends (the sender is
        // dropped) and a reconnect is refused; forget what they said.
        s.desired.retain(|node, _| plan.nodes.contains_key(node));
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

fn save_json(path: &std::path::Path, value: &impl serde::Serialize) -> Result<(), String> {
    let text = serde_json::to_string_pretty(value).map_err(|e| e.to_string())?;
    let dir = path.parent().unwrap_or_else(|| std::path::Path::new("."));
    let name = path.file_name().map_or_else(
        || "allocations.json".to_owned(),
        |n| n.to_string_lossy().into_owned(),
    );
    crate::tls::write_private(dir, &name, &text, 0o644).map_err(|e| e.to_string())
}

/// Status files `<dir>/<namespace>.<name>.yaml` (standalone mode).
#[derive(Debug)]
pub struct FileStatusSink {
    pub dir: PathBuf,
}

impl StatusSink for FileStatusSink {
    fn write(&self, network: &L2Network, status: Option<&L2NetworkStatus>) {
        let ns = network.metadata.namespace.as_deref().unwrap_or("default");
        let name = network.metadata.name.as_deref().unwrap_or_default();
        let file = format!("{ns}.{name}.yaml");
        let result = match status {
            Some(st) => {
                let doc = serde_json::json!({
                    "apiVersion": "l2mesh.io/v1alpha1",
                    "kind": "L2Network",
                    "metadata": {"name": name, "namespace": ns},
                    "status": st,
                });
                serde_yaml::to_string(&doc)
                    .map_err(|e| e.to_string())
                    .and_then(|text| {
                        crate::tls::write_private(&self.dir, &file, &text, 0o644)
                            .map_err(|e| e.to_string())
                    })
            }
            None => match std::fs::remove_file(self.dir.join(&file)) {
                Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(e.to_string()),
                _ => Ok(()),
            },
        };
        if let Err(e) = result {
            tracing::warn!(file, error = %e, "cannot write the L2Network status");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, Default)]
    struct Mem(Mutex<Option<Allocations>>);

    impl AllocStore for Mem {
        fn load(&self) -> Result<Allocations, String> {
            Ok(Allocations::default())
        }
        fn save(&self, a: &Allocations) -> Result<(), String> {
            *self.0.lock().unwrap() = Some(a.clone());
            Ok(())
        }
    }

    #[derive(Debug, Default)]
    struct Sink;

    impl StatusSink for Sink {
        fn write(&self, _: &L2Network, _: Option<&L2NetworkStatus>) {}
    }

    fn node(name: &str) -> NodeEntry {
        NodeEntry {
            name: name.into(),
            gateway: false,
            endpoint: None,
        }
    }

    fn shared() -> Shared {
        Shared::new(
            "100.64.0.0/24".parse().unwrap(),
            Box::new(Mem::default()),
            Box::new(Sink),
            false,
        )
        .unwrap()
    }

    fn blue() -> L2Network {
        serde_yaml::from_str(
            "apiVersion: l2mesh.io/v1alpha1\nkind: L2Network\nmetadata: {name: blue, namespace: default}\nspec: {}\n",
        )
        .unwrap()
    }

    #[test]
    fn revisions_change_only_with_the_state() {
        let s = shared();
        let rx = s.subscribe("a");
        s.set_intent(vec![node("a"), node("b")], vec![blue()]);
        s.reconcile();
        let first = rx.borrow().clone().unwrap();
        assert_eq!(first.networks[0].vni, 1);
        s.reconcile();
        assert_eq!(
            rx.borrow().as_ref().unwrap().revision,
            first.revision,
            "no change, same revision"
        );
        s.set_hello(
            "b",
            Hello {
                public_key: vec![2; 32],
                listen_port: 1,
                endpoints: vec!["127.0.0.1:1".into()],
            },
        );
        s.reconcile();
        let second = rx.borrow().clone().unwrap();
        assert!(second.revision > first.revision);
        assert_eq!(second.peers.len(), 1);
        assert!(s.is_known_node("b"));
        assert!(!s.is_known_node("c"));
    }

    #[test]
    fn a_status_with_a_new_key_is_a_rotation_that_reaches_the_peers() {
        let s = shared();
        let rx_a = s.subscribe("a");
        s.set_intent(vec![node("a"), node("b")], vec![blue()]);
        let hello = |key: u8| Hello {
            public_key: vec![key; 32],
            listen_port: 1,
            endpoints: vec!["127.0.0.1:1".into()],
        };
        s.set_hello("b", hello(2));
        s.reconcile();
        let before = rx_a.borrow().clone().unwrap();
        assert_eq!(before.peers[0].public_key, vec![2; 32]);

        // Same key again: nothing changes.
        s.set_node_status(NodeStatus {
            node_name: "b".into(),
            public_key: vec![2; 32],
            ..Default::default()
        });
        s.reconcile();
        assert_eq!(rx_a.borrow().as_ref().unwrap().revision, before.revision);

        s.set_node_status(NodeStatus {
            node_name: "b".into(),
            public_key: vec![3; 32],
            ..Default::default()
        });
        s.reconcile();
        let after = rx_a.borrow().clone().unwrap();
        assert!(after.revision > before.revision);
        assert_eq!(
            after.peers[0].public_key,
            vec![3; 32],
            "peer a learns b's new key"
        );
        assert_eq!(
            after.peers[0].endpoint, before.peers[0].endpoint,
            "endpoint kept"
        );

        // A malformed key in a status is ignored, not adopted.
        s.set_node_status(NodeStatus {
            node_name: "b".into(),
            public_key: vec![4; 5],
            ..Default::default()
        });
        s.reconcile();
        assert_eq!(
            rx_a.borrow().as_ref().unwrap().peers[0].public_key,
            vec![3; 32]
        );
    }

    #[derive(Debug, Default, Clone)]
    struct SharedMem(Arc<Mutex<Option<Allocations>>>);

    impl AllocStore for SharedMem {
        fn load(&self) -> Result<Allocations, String> {
            Ok(self.0.lock().unwrap().clone().unwrap_or_default())
        }
        fn save(&self, a: &Allocations) -> Result<(), String> {
            *self.0.lock().unwrap() = Some(a.clone());
            Ok(())
        }
    }

    #[test]
    fn after_a_restart_the_first_node_back_still_gets_every_peer() {
        let store = SharedMem::default();
        let make = || {
            Shared::new(
                "100.64.0.0/24".parse().unwrap(),
                Box::new(store.clone()),
                Box::new(Sink),
                false,
            )
            .unwrap()
        };
        let s = make();
        s.set_intent(vec![node("a"), node("b")], vec![blue()]);
        for (n, k) in [("a", 1u8), ("b", 2)] {
            s.set_hello(
                n,
                Hello {
                    public_key: vec![k; 32],
                    ..Hello::default()
                },
            );
        }
        s.reconcile();
        drop(s);
        let restarted = make();
        restarted.set_intent(vec![node("a"), node("b")], vec![blue()]);
        let rx = restarted.subscribe("a");
        restarted.reconcile();
        let d = rx.borrow().clone().unwrap();
        assert_eq!(d.peers.len(), 1, "b is known from before the restart");
        assert_eq!(d.peers[0].public_key, vec![2; 32]);
    }

    #[test]
    fn a_removed_node_loses_its_watch_and_its_peers_forget_it() {
        let s = shared();
        s.set_intent(vec![node("a"), node("b")], vec![blue()]);
        let rx_b = s.subscribe("b");
        let rx_a = s.subscribe("a");
        s.set_hello(
            "b",
            Hello {
                public_key: vec![2; 32],
                ..Hello::default()
            },
        );
        s.reconcile();
        assert_eq!(rx_a.borrow().as_ref().unwrap().peers.len(), 1);
        s.set_nodes(vec![node("a")]);
        s.reconcile();
        assert!(rx_b.has_changed().is_err(), "b's watch is closed");
        assert!(rx_a.borrow().as_ref().unwrap().peers.is_empty());
        assert!(!s.is_known_node("b"));
    }

    #[test]
    fn multi_cluster_networks_wait_without_a_broker() {
        let s = shared();
        let net: L2Network = serde_yaml::from_str(
            "apiVersion: l2mesh.io/v1alpha1\nkind: L2Network\nmetadata: {name: red, namespace: default}\nspec: {scope: multiCluster}\n",
        )
        .unwrap();
        s.set_intent(vec![node("a")], vec![net]);
        s.reconcile();
        let st = s.status_of("default/red").unwrap();
        let admitted = st
            .conditions
            .iter()
            .find(|c| c.type_ == "Admitted")
            .unwrap();
        assert!(
            admitted.message.contains("without a broker"),
            "{admitted:?}"
        );
        assert!(
            s.metrics
                .encode()
                .contains("l2mesh_agent_networks_inactive 1")
        );
    }
}
