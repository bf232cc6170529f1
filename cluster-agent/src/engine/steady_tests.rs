//! A steady cluster costs nothing: reports that only move handshake ages
//! and counters wake no reconcile, recompute no state and write no status;
//! a change recomputes only what it reaches.

use super::*;
use futures::FutureExt as _;
use l2mesh_proto::node::{NetworkStatus, PeerStatus, PortStatus};

#[derive(Debug, Default)]
struct Mem;

impl AllocStore for Mem {
    fn load(&self) -> Result<Allocations, String> {
        Ok(Allocations::default())
    }
    fn save(&self, _: &Allocations, _: Option<&str>) -> SaveFuture {
        Box::pin(std::future::ready(Ok(())))
    }
}

#[derive(Debug, Default)]
struct Sink;

impl StatusSink for Sink {
    fn write(&self, _: &L2Network, _: Option<&L2NetworkStatus>) {}
}

fn net(name: &str) -> L2Network {
    serde_yaml::from_str(&format!(
        "apiVersion: l2mesh.io/v1alpha1\nkind: L2Network\nmetadata: {{name: {name}, namespace: default}}\nspec: {{}}\n"
    ))
    .unwrap()
}

const NODES: [&str; 3] = ["a", "b", "c"];

fn key(node: &str) -> Vec<u8> {
    vec![node.as_bytes()[0]; 32]
}

/// A report of `node`: both networks applied, `pods` on blue, links to the
/// other nodes whose handshakes are `age` ms old.
fn report(node: &str, age: u64, pods: &[&str]) -> NodeStatus {
    NodeStatus {
        node_name: node.into(),
        public_key: key(node),
        networks: ["blue", "red"]
            .iter()
            .map(|n| NetworkStatus {
                name: (*n).into(),
                ports: if *n == "blue" {
                    pods.iter().map(|p| (*p).to_owned()).collect()
                } else {
                    vec![]
                },
                port_status: vec![],
                ..Default::default()
            })
            .collect(),
        peers: NODES
            .iter()
            .filter(|p| **p != node)
            .map(|p| PeerStatus {
                name: (*p).into(),
                public_key: key(p),
                vnis: vec![1, 2],
                last_handshake_age_ms: Some(age),
                rx_bytes: age * 3,
                ..Default::default()
            })
            .collect(),
        ..Default::default()
    }
}

/// A converged engine: three nodes, two networks, every node reported.
async fn converged() -> Shared {
    let s = Shared::new(
        "100.64.0.0/24".parse().unwrap(),
        Box::new(Mem),
        Box::new(Sink),
        false,
    )
    .unwrap();
    s.set_intent(
        NODES
            .iter()
            .map(|n| NodeEntry {
                name: (*n).into(),
                ..NodeEntry::default()
            })
            .collect(),
        vec![net("blue"), net("red")],
    );
    for n in NODES {
        s.set_hello(
            n,
            Hello {
                public_key: key(n),
                listen_port: 51820,
                endpoints: vec!["192.0.2.1:51820".into()],
            },
        );
    }
    s.reconcile().await;
    for n in NODES {
        s.set_node_status(report(n, 1_000, &[]));
    }
    s.reconcile().await;
    assert_eq!(
        s.status_of("default/blue").unwrap().links.unwrap().up,
        6,
        "every link up"
    );
    s
}

/// Whether an input change is waiting to wake a reconcile.
fn woken(s: &Shared) -> bool {
    s.changed().now_or_never().is_some()
}

fn counts(s: &Shared) -> (u64, u64, u64) {
    (
        s.metrics.desired_recomputes.get(),
        s.metrics.status_recomputes.get(),
        s.metrics.status_writes.get(),
    )
}

#[tokio::test]
async fn periodic_reports_wake_nothing_recompute_nothing_and_write_nothing() {
    let s = converged().await;
    let _ = woken(&s);
    let before = counts(&s);
    for round in 2..10 {
        for n in NODES {
            s.set_node_status(report(n, round * 5_000, &[]));
        }
        assert!(
            !woken(&s),
            "round {round}: a report with only new ages woke the engine"
        );
        s.reconcile().await;
    }
    assert_eq!(
        counts(&s),
        before,
        "no state, no status recomputed or written"
    );
    // The link table still has the latest ages.
    let table = s.link_table();
    assert_eq!(table.len(), 6);
    assert!(
        table
            .iter()
            .all(|l| l.last_handshake_age_ms == Some(45_000))
    );
}

#[tokio::test]
async fn a_change_in_a_report_recomputes_only_the_statuses_it_concerns() {
    let s = converged().await;
    let (desired, statuses, writes) = counts(&s);
    // A pod attached on blue: blue's status only.
    s.set_node_status(report("a", 2_000, &["l2pod"]));
    assert!(woken(&s));
    s.reconcile().await;
    assert_eq!(counts(&s), (desired, statuses + 1, writes + 1));
    assert_eq!(s.status_of("default/blue").unwrap().attached_pod_count, 1);
    assert_eq!(s.status_of("default/red").unwrap().attached_pod_count, 0);
    // A link going down: the networks it carries, no node state.
    s.set_node_status(report("b", 400_000, &[]));
    s.reconcile().await;
    assert_eq!(counts(&s), (desired, statuses + 3, writes + 3));
    let links = s.status_of("default/red").unwrap().links.unwrap();
    assert_eq!((links.up, links.down), (4, 2));
    assert_eq!(links.down_links, vec!["b->a".to_owned(), "b->c".to_owned()]);
}

#[tokio::test]
async fn inputs_set_again_unchanged_wake_nothing() {
    let s = converged().await;
    let _ = woken(&s);
    let nodes: Vec<NodeEntry> = NODES
        .iter()
        .map(|n| NodeEntry {
            name: (*n).into(),
            ..NodeEntry::default()
        })
        .collect();
    s.set_nodes(nodes);
    s.set_hello(
        "a",
        Hello {
            public_key: key("a"),
            listen_port: 51820,
            endpoints: vec!["192.0.2.1:51820".into()],
        },
    );
    // The agent's own status write comes back with the object.
    let mut blue = net("blue");
    blue.status = s.status_of("default/blue");
    s.set_networks(vec![blue, net("red")]);
    s.set_admissions(vec![]);
    assert!(!woken(&s));
    s.set_networks(vec![net("blue")]);
    assert!(woken(&s), "a network deleted is a change");
}

#[tokio::test]
async fn a_mac_table_in_a_report_is_not_kept() {
    let s = converged().await;
    let mut r = report("a", 1_000, &["l2pod"]);
    r.networks[0].macs = (0..100)
        .map(|i| l2mesh_proto::node::MacEntry {
            mac: format!("02:00:00:00:00:{i:02x}"),
            port: "tap".into(),
            age_ms: 0,
        })
        .collect();
    r.networks[0].port_status = vec![PortStatus {
        ifname: "l2pod".into(),
        pod_namespace: "team".into(),
        pod_name: "web".into(),
    }];
    s.set_node_status(r);
    s.reconcile().await;
    let st = s.status_of("default/blue").unwrap();
    assert_eq!(st.attached_pods[0].pod, "team/web");
    let text = serde_json::to_string(&st).unwrap();
    assert!(!text.contains("02:00:00"), "{text}");
}
