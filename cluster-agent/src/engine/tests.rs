//! The engine's reconcile step, without sockets.

use super::*;
use std::sync::Arc;

#[derive(Debug, Default)]
struct Mem(Mutex<Option<Allocations>>);

impl AllocStore for Mem {
    fn load(&self) -> Result<Allocations, String> {
        Ok(Allocations::default())
    }
    fn save(&self, a: &Allocations, _: Option<&str>) -> SaveFuture {
        *self.0.lock().unwrap() = Some(a.clone());
        Box::pin(std::future::ready(Ok(())))
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

#[tokio::test]
async fn revisions_change_only_with_the_state() {
    let s = shared();
    let rx = s.subscribe("a");
    s.set_intent(vec![node("a"), node("b")], vec![blue()]);
    s.reconcile().await;
    let first = rx.borrow().clone().unwrap();
    assert_eq!(first.networks[0].vni, 1);
    s.reconcile().await;
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
    s.reconcile().await;
    let second = rx.borrow().clone().unwrap();
    assert!(second.revision > first.revision);
    assert_eq!(second.peers.len(), 1);
    assert!(s.is_known_node("b"));
    assert!(!s.is_known_node("c"));
}

#[tokio::test]
async fn a_status_with_a_new_key_is_a_rotation_that_reaches_the_peers() {
    let s = shared();
    let rx_a = s.subscribe("a");
    s.set_intent(vec![node("a"), node("b")], vec![blue()]);
    let hello = |key: u8| Hello {
        public_key: vec![key; 32],
        listen_port: 1,
        endpoints: vec!["127.0.0.1:1".into()],
    };
    s.set_hello("b", hello(2));
    s.reconcile().await;
    let before = rx_a.borrow().clone().unwrap();
    assert_eq!(before.peers[0].public_key, vec![2; 32]);

    // Same key again: nothing changes.
    s.set_node_status(NodeStatus {
        node_name: "b".into(),
        public_key: vec![2; 32],
        ..Default::default()
    });
    s.reconcile().await;
    assert_eq!(rx_a.borrow().as_ref().unwrap().revision, before.revision);

    s.set_node_status(NodeStatus {
        node_name: "b".into(),
        public_key: vec![3; 32],
        ..Default::default()
    });
    s.reconcile().await;
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
    s.reconcile().await;
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
    fn save(&self, a: &Allocations, _: Option<&str>) -> SaveFuture {
        *self.0.lock().unwrap() = Some(a.clone());
        Box::pin(std::future::ready(Ok(())))
    }
}

#[tokio::test]
async fn after_a_restart_the_first_node_back_still_gets_every_peer() {
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
    s.reconcile().await;
    drop(s);
    let restarted = make();
    restarted.set_intent(vec![node("a"), node("b")], vec![blue()]);
    let rx = restarted.subscribe("a");
    restarted.reconcile().await;
    let d = rx.borrow().clone().unwrap();
    assert_eq!(d.peers.len(), 1, "b is known from before the restart");
    assert_eq!(d.peers[0].public_key, vec![2; 32]);
}

#[tokio::test]
async fn a_removed_node_loses_its_watch_and_its_peers_forget_it() {
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
    s.reconcile().await;
    assert_eq!(rx_a.borrow().as_ref().unwrap().peers.len(), 1);
    s.set_nodes(vec![node("a")]);
    s.reconcile().await;
    assert!(rx_b.has_changed().is_err(), "b's watch is closed");
    assert!(rx_a.borrow().as_ref().unwrap().peers.is_empty());
    assert!(!s.is_known_node("b"));
}

#[tokio::test]
async fn multi_cluster_networks_wait_without_a_broker() {
    let s = shared();
    let net: L2Network = serde_yaml::from_str(
        "apiVersion: l2mesh.io/v1alpha1\nkind: L2Network\nmetadata: {name: red, namespace: default}\nspec: {scope: multiCluster}\n",
    )
    .unwrap();
    s.set_intent(vec![node("a")], vec![net]);
    s.reconcile().await;
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
    // Each recomputation is timed.
    assert!(
        s.metrics
            .encode()
            .contains("l2mesh_agent_reconcile_seconds_count 1")
    );
}

fn gateway(name: &str) -> NodeEntry {
    NodeEntry {
        gateway: true,
        ..node(name)
    }
}

fn reported_gateways(s: &Shared) -> Vec<String> {
    s.reports()
        .borrow()
        .clone()
        .unwrap_or_default()
        .gateways
        .iter()
        .map(|g| g.node.clone())
        .collect()
}

#[tokio::test]
async fn a_gateway_whose_stream_closes_hands_over_to_the_standby_without_hand_back() {
    let s = Arc::new(shared());
    s.set_intent(vec![gateway("gw-b"), gateway("gw-a")], vec![blue()]);
    let hello = |k: u8| Hello {
        public_key: vec![k; 32],
        ..Hello::default()
    };
    let a = s.node_connected("gw-a");
    s.set_hello("gw-a", hello(1));
    let _b = s.node_connected("gw-b");
    s.set_hello("gw-b", hello(2));
    s.reconcile().await;
    assert_eq!(reported_gateways(&s), vec!["gw-a"]);
    assert!(!s.gateway_change_due());

    drop(a);
    assert!(s.gateway_change_due(), "the closed stream is noticed");
    s.reconcile().await;
    assert_eq!(reported_gateways(&s), vec!["gw-b"]);
    assert!(
        s.metrics
            .encode()
            .contains("l2mesh_agent_gateway_failovers_total 1")
    );

    // gw-a is back: gw-b keeps the role.
    let _a = s.node_connected("gw-a");
    assert!(!s.gateway_change_due());
    s.reconcile().await;
    assert_eq!(reported_gateways(&s), vec!["gw-b"]);
}

#[derive(Debug, Default, Clone)]
struct KeepsGateway(Arc<Mutex<Option<String>>>, SharedMem);

impl AllocStore for KeepsGateway {
    fn load(&self) -> Result<Allocations, String> {
        self.1.load()
    }
    fn save(&self, a: &Allocations, g: Option<&str>) -> SaveFuture {
        *self.0.lock().unwrap() = g.map(str::to_owned);
        self.1.save(a, g)
    }
    fn load_gateway(&self) -> Option<String> {
        self.0.lock().unwrap().clone()
    }
}

#[tokio::test]
async fn a_restarted_engine_keeps_the_stored_gateway() {
    let store = KeepsGateway::default();
    let make = || {
        Arc::new(
            Shared::new(
                "100.64.0.0/24".parse().unwrap(),
                Box::new(store.clone()),
                Box::new(Sink),
                false,
            )
            .unwrap(),
        )
    };
    let hello = |k: u8| Hello {
        public_key: vec![k; 32],
        ..Hello::default()
    };
    let s = make();
    s.set_intent(vec![gateway("gw-a"), gateway("gw-b")], vec![blue()]);
    let _b = s.node_connected("gw-b");
    s.set_hello("gw-b", hello(2));
    s.reconcile().await;
    assert_eq!(reported_gateways(&s), vec!["gw-b"]);
    let a = s.node_connected("gw-a");
    s.set_hello("gw-a", hello(1));
    s.reconcile().await;
    assert_eq!(reported_gateways(&s), vec!["gw-b"], "sticky");
    assert_eq!(store.load_gateway().as_deref(), Some("gw-b"));
    drop((a, _b, s));

    let s = make();
    s.set_intent(vec![gateway("gw-a"), gateway("gw-b")], vec![blue()]);
    let _a = s.node_connected("gw-a");
    s.set_hello("gw-a", hello(1));
    s.reconcile().await;
    assert_eq!(
        reported_gateways(&s),
        vec!["gw-b"],
        "gw-b is still expected back after the restart"
    );
}

/// A store whose saves fail while `failing` is set.
#[derive(Debug, Default, Clone)]
struct Flaky {
    mem: SharedMem,
    failing: Arc<std::sync::atomic::AtomicBool>,
}

impl AllocStore for Flaky {
    fn load(&self) -> Result<Allocations, String> {
        self.mem.load()
    }
    fn save(&self, a: &Allocations, g: Option<&str>) -> SaveFuture {
        if self.failing.load(std::sync::atomic::Ordering::SeqCst) {
            return Box::pin(std::future::ready(Err("injected".to_owned())));
        }
        self.mem.save(a, g)
    }
}

fn local(name: &str) -> L2Network {
    serde_yaml::from_str(&format!(
        "apiVersion: l2mesh.io/v1alpha1\nkind: L2Network\nmetadata: {{name: {name}, namespace: default}}\nspec: {{}}\n"
    ))
    .unwrap()
}

#[tokio::test]
async fn nothing_is_published_or_freed_before_both_lists_are_complete() {
    let store = SharedMem::default();
    let make = || {
        Shared::new(
            "100.64.0.0/24".parse().unwrap(),
            Box::new(store.clone()),
            Box::new(Sink),
            true,
        )
        .unwrap()
    };
    let s = make();
    s.set_intent(vec![node("a")], vec![local("x"), local("y"), blue()]);
    s.reconcile().await;
    let vnis = store.load().unwrap().vnis.owners;
    drop(s);

    // Restarted: the nodes are in, the networks are not yet.
    let s = make();
    let rx = s.subscribe("a");
    let reports = s.reports();
    s.set_nodes(vec![node("a")]);
    s.reconcile().await;
    assert!(rx.borrow().is_none(), "no state for the nodes yet");
    assert!(reports.borrow().is_none(), "nothing for the broker yet");
    assert_eq!(store.load().unwrap().vnis.owners, vnis, "nothing freed");
    s.set_networks(vec![blue(), local("y"), local("x")]);
    s.reconcile().await;
    let d = rx.borrow().clone().unwrap();
    let got: BTreeMap<String, u32> = d.networks.iter().map(|n| (n.name.clone(), n.vni)).collect();
    assert_eq!(got, vnis.into_iter().collect());
}

#[tokio::test]
async fn an_invalid_network_keeps_its_vni_and_only_a_deleted_one_frees_it() {
    let s = shared();
    s.set_intent(vec![node("a")], vec![local("x"), blue()]);
    s.reconcile().await;
    let vni = s.status_of("default/blue").unwrap().vni.unwrap();
    let mut bad = blue();
    bad.spec.mtu = Some(10);
    s.set_networks(vec![local("x"), bad]);
    s.reconcile().await;
    let st = s.status_of("default/blue").unwrap();
    assert_eq!(st.vni, None, "an invalid network shows no VNI");
    assert_eq!(st.ip_range, None);
    s.set_networks(vec![local("x"), blue()]);
    s.reconcile().await;
    assert_eq!(
        s.status_of("default/blue").unwrap().vni,
        Some(vni),
        "same VNI back"
    );
    s.set_networks(vec![local("x")]);
    s.reconcile().await;
    s.set_networks(vec![local("x"), local("z")]);
    s.reconcile().await;
    assert_ne!(
        s.status_of("default/z").unwrap().vni,
        Some(vni),
        "a freed VNI is not handed out again at once"
    );
}

#[tokio::test]
async fn a_failed_save_publishes_nothing_until_a_save_succeeds() {
    let store = Flaky::default();
    let s = Shared::new(
        "100.64.0.0/24".parse().unwrap(),
        Box::new(store.clone()),
        Box::new(Sink),
        false,
    )
    .unwrap();
    let rx = s.subscribe("a");
    s.set_intent(vec![node("a")], vec![blue()]);
    s.reconcile().await;
    let before = rx.borrow().clone().unwrap();
    store
        .failing
        .store(true, std::sync::atomic::Ordering::SeqCst);
    s.set_intent(vec![node("a")], vec![blue(), local("x")]);
    let problems = s.reconcile().await;
    assert!(problems[0].contains("not saved"), "{problems:?}");
    assert!(s.unsaved().is_some());
    assert_eq!(*rx.borrow(), Some(before), "x is not handed out unsaved");
    assert!(s.status_of("default/x").is_none());
    assert!(
        s.metrics
            .encode()
            .contains("l2mesh_agent_allocation_save_failures_total 1")
    );
    store
        .failing
        .store(false, std::sync::atomic::Ordering::SeqCst);
    s.reconcile().await;
    assert!(s.unsaved().is_none());
    assert!(has(&rx.borrow(), "x"));
    assert!(
        store.load().unwrap().vnis.owners.contains_key("x"),
        "saved first"
    );
}

fn has(d: &Option<DesiredState>, net: &str) -> bool {
    d.as_ref()
        .is_some_and(|d| d.networks.iter().any(|n| n.name == net))
}
