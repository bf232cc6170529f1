//! Kubernetes mode through restarts, leader changes and a hostile API
//! server: initial lists late and in random order, dropped watches, Secret
//! writes that fail, the agent killed mid-stream. Whatever the sequence,
//! every network keeps its VNI, every node its tunnel IP and its slices,
//! no node is ever handed a state without a network it had, and the broker
//! never sees this cluster leave a network it is in.
//!
//! The sequences come from a seeded generator; a failure prints the seed,
//! and `L2MESH_TEST_SEED=<seed>` replays it.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use l2mesh_cluster_agent::{identity, tls};
use l2mesh_proto::broker::broker_client::BrokerClient;
use l2mesh_proto::broker::{NetworkRequest, WatchRequest};
use l2mesh_proto::node::{DesiredState, NetworkStatus, NodeHello, NodeStatus};
use rand::{Rng as _, SeedableRng as _};
use serde_json::json;
use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use support::broker::TestBroker;
use support::fake_apiserver::FakeApi;
use support::k8s_agent::*;

const NODES_KIND: &str = "api/v1/nodes";
const KINDS: [&str; 4] = [NODES_KIND, NETS, NADS, SECRETS];

/// What must never change once seen.
#[derive(Debug, Default)]
struct Stable {
    vni: BTreeMap<String, u32>,
    tunnel_ip: BTreeMap<String, String>,
    slice: BTreeMap<(String, String), String>,
    /// The lowest revision each network was seen in. Revisions grow across
    /// the states of one agent and across agent starts, so a state newer
    /// than that which lacks the network took it away (an older state may
    /// arrive late at a slow node: that is no violation).
    first_seen: BTreeMap<String, u64>,
    /// Problems found, with the state that showed them.
    violations: Vec<String>,
}

impl Stable {
    fn check(&mut self, node: &str, d: &DesiredState) {
        let ip = d
            .identity
            .as_ref()
            .map(|i| i.tunnel_ip.clone())
            .unwrap_or_default();
        let was = self
            .tunnel_ip
            .entry(node.to_owned())
            .or_insert_with(|| ip.clone());
        if *was != ip {
            self.violations
                .push(format!("{node}: tunnel IP {was} became {ip}"));
        }
        for n in &d.networks {
            let first = self.first_seen.entry(n.name.clone()).or_insert(d.revision);
            *first = (*first).min(d.revision);
        }
        for (net, first) in &self.first_seen {
            if *first < d.revision && !d.networks.iter().any(|n| n.name == *net) {
                self.violations.push(format!(
                    "{node}: revision {} lacks network {net}",
                    d.revision
                ));
            }
        }
        for n in &d.networks {
            let vni = *self.vni.entry(n.name.clone()).or_insert(n.vni);
            if vni != n.vni {
                self.violations.push(format!(
                    "{node}: network {} VNI {vni} became {}",
                    n.name, n.vni
                ));
            }
            let key = (n.name.clone(), node.to_owned());
            let slice = self.slice.entry(key).or_insert_with(|| n.pod_cidr.clone());
            if *slice != n.pod_cidr {
                self.violations.push(format!(
                    "{node}: network {} slice {slice} became {}",
                    n.name, n.pod_cidr
                ));
            }
        }
    }
}

/// The cluster's nodes, played against one agent run: each watches its
/// desired state (every state is checked) and reports the networks it has.
struct Nodes {
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl Nodes {
    async fn connect(
        api: &FakeApi,
        addr: SocketAddr,
        stable: &Arc<Mutex<Stable>>,
        latest: &Arc<Mutex<BTreeMap<String, DesiredState>>>,
    ) -> Self {
        let mut tasks = Vec::new();
        for (i, node) in ["gw", "w1", "w2"].into_iter().enumerate() {
            let mut client = node_client(api, addr).await;
            let key = u8::try_from(i + 1).unwrap();
            let (stable, latest) = (stable.clone(), latest.clone());
            tasks.push(tokio::spawn(async move {
                // Like a dataplane: retry while the agent is starting.
                let mut watch = loop {
                    match client
                        .watch_desired(NodeHello {
                            node_name: node.into(),
                            public_key: vec![key; 32],
                            listen_port: 51820,
                            endpoints: vec![format!("127.0.0.{}:51820", i + 1)],
                            ..Default::default()
                        })
                        .await
                    {
                        Ok(w) => break w.into_inner(),
                        Err(s) if s.code() == tonic::Code::Unavailable => {
                            tokio::time::sleep(Duration::from_millis(100)).await;
                        }
                        Err(s) => panic!("{node}: watch refused: {s}"),
                    }
                };
                let mut tick = tokio::time::interval(Duration::from_millis(300));
                let mut have: Vec<String> = Vec::new();
                loop {
                    tokio::select! {
                        msg = watch.message() => match msg {
                            Ok(Some(d)) => {
                                stable.lock().unwrap().check(node, &d);
                                have = d.networks.iter().map(|n| n.name.clone()).collect();
                                latest.lock().unwrap().insert(node.to_owned(), d);
                            }
                            _ => return,
                        },
                        _ = tick.tick() => {
                            let _ = client.report_status(NodeStatus {
                                node_name: node.into(),
                                public_key: vec![key; 32],
                                networks: have.iter().map(|n| NetworkStatus {
                                    name: n.clone(),
                                    ..Default::default()
                                }).collect(),
                                ..Default::default()
                            }).await;
                        }
                    }
                }
            }));
        }
        Self { tasks }
    }
}

impl Drop for Nodes {
    fn drop(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
    }
}

/// Another cluster in the multi-cluster network, recording every view the
/// broker sends it: this cluster must never leave the members once in.
async fn watch_as_other_cluster(
    broker: &TestBroker,
) -> (Arc<Mutex<Vec<Vec<String>>>>, tokio::task::JoinHandle<()>) {
    let js = broker.token("cloud").await;
    let id = identity::join_once(&js).await.unwrap();
    let config =
        tls::broker_client_config(id.pin().unwrap(), Some((&id.cert_pem, &id.key_pem))).unwrap();
    let channel = tls::broker_channel(&id.brokers[0], config).await.unwrap();
    let mut client = BrokerClient::new(channel);
    client
        .request_networks(NetworkRequest {
            networks: vec!["shared".into()],
        })
        .await
        .unwrap();
    let mut views = client
        .watch(WatchRequest::default())
        .await
        .unwrap()
        .into_inner();
    let seen = Arc::new(Mutex::new(Vec::new()));
    let record = seen.clone();
    let task = tokio::spawn(async move {
        let _client = client;
        while let Ok(Some(v)) = views.message().await {
            let members = v
                .networks
                .iter()
                .find(|n| n.name == "shared")
                .map(|n| n.members.clone())
                .unwrap_or_default();
            record.lock().unwrap().push(members);
        }
    });
    (seen, task)
}

/// Members lists the other cluster saw; once `edge` is in, it stays in.
fn edge_left(views: &[Vec<String>]) -> Option<String> {
    let first = views.iter().position(|m| m.contains(&"edge".to_owned()))?;
    views[first..]
        .iter()
        .find(|m| !m.contains(&"edge".to_owned()))
        .map(|m| format!("the other cluster saw members {m:?} after edge had joined: {views:?}"))
}

/// Every node has a state with all of `nets`, each with a VNI.
async fn wait_converged(latest: &Arc<Mutex<BTreeMap<String, DesiredState>>>, nets: &[String]) {
    wait_for("every node with every network", 40, || {
        let l = latest.lock().unwrap();
        (l.len() == 3
            && l.values()
                .all(|d| nets.iter().all(|n| d.networks.iter().any(|x| x.name == *n))))
        .then_some(())
    })
    .await;
}

/// How an agent run ends.
#[derive(Clone, Copy, Debug)]
enum Step {
    /// SIGTERM-like: stop, release the lease, start again.
    Restart,
    /// kill -9: nothing released; the same pod starts again.
    Kill,
    /// A second replica waits; the leader stops and the standby takes over.
    LeaderChange,
    /// Killed right after starting, while its initial lists are still late.
    KillDuringLists,
}

async fn start_leader(api: &FakeApi, pod: &str) -> (Agent, SocketAddr) {
    let mut agent = Agent::start(api, pod, None);
    let addr = agent
        .listening(Duration::from_secs(30))
        .await
        .unwrap_or_else(|| panic!("{pod} never served node sync"));
    (agent, addr)
}

async fn run_sequence(seed: u64) {
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let broker = TestBroker::start().await;
    broker.network("shared", &["edge", "cloud"]).await;
    let api = FakeApi::new();
    seed_nodes(&api).await;
    let nodes_api: kube::Api<k8s_openapi::api::core::v1::Node> = kube::Api::all(api.client());
    let w2: k8s_openapi::api::core::v1::Node = serde_json::from_value(
        json!({"apiVersion": "v1", "kind": "Node", "metadata": {"name": "w2"}}),
    )
    .unwrap();
    nodes_api
        .create(&kube::api::PostParams::default(), &w2)
        .await
        .unwrap();
    let mut nets: Vec<String> = Vec::new();
    for name in ["alpha", "bravo", "charlie", "delta"] {
        create_net(&api, name, json!({"ipRange": "10.9.0.0/16"})).await;
        nets.push(name.to_owned());
    }
    create_net(&api, "shared", json!({"scope": "multiCluster"})).await;
    nets.push("shared".to_owned());

    let stable = Arc::new(Mutex::new(Stable::default()));
    let latest = Arc::new(Mutex::new(BTreeMap::new()));
    let js = broker.token("edge").await;
    let mut agent = Agent::start(&api, "agent-0", Some(js));
    let mut addr = agent.listening(Duration::from_secs(30)).await.unwrap();
    let mut pod = "agent-0".to_owned();
    let mut nodes = Nodes::connect(&api, addr, &stable, &latest).await;
    wait_converged(&latest, &nets).await;
    let (views, other) = watch_as_other_cluster(&broker).await;
    wait_for("the other cluster sees edge", 20, || {
        views
            .lock()
            .unwrap()
            .iter()
            .any(|m| m.contains(&"edge".to_owned()))
            .then_some(())
    })
    .await;

    for round in 0..5 {
        let step = match rng.gen_range(0..4) {
            0 => Step::Restart,
            1 => Step::Kill,
            2 => Step::LeaderChange,
            _ => Step::KillDuringLists,
        };
        // Late initial lists, each kind its own delay: any order.
        for kind in KINDS {
            api.delay_lists(kind, Duration::from_millis(rng.gen_range(0..1500)));
        }
        // Sometimes the Secret cannot be written for a while, and a new
        // network arrives meanwhile: it must wait, the others stay.
        let fail_secrets = rng.gen_bool(0.3);
        eprintln!("seed {seed} round {round}: {step:?}, failing Secret writes: {fail_secrets}");
        match step {
            Step::Restart => {
                agent.stop().await;
                (agent, addr) = start_leader(&api, &pod).await;
            }
            Step::Kill => {
                agent.kill().await;
                (agent, addr) = start_leader(&api, &pod).await;
            }
            Step::LeaderChange => {
                let next = if pod == "agent-0" {
                    "agent-1"
                } else {
                    "agent-0"
                };
                let mut standby = Agent::start(&api, next, None);
                tokio::time::sleep(Duration::from_millis(rng.gen_range(0..500))).await;
                agent.stop().await;
                addr = standby
                    .listening(Duration::from_secs(30))
                    .await
                    .expect("the standby takes over");
                agent = standby;
                next.clone_into(&mut pod);
            }
            Step::KillDuringLists => {
                agent.kill().await;
                let early = Agent::start(&api, &pod, None);
                tokio::time::sleep(Duration::from_millis(rng.gen_range(0..1200))).await;
                early.kill().await;
                (agent, addr) = start_leader(&api, &pod).await;
            }
        }
        drop(nodes);
        latest.lock().unwrap().clear();
        if fail_secrets {
            api.fail_writes(SECRETS, true);
        }
        nodes = Nodes::connect(&api, addr, &stable, &latest).await;
        if rng.gen_bool(0.5) {
            tokio::time::sleep(Duration::from_millis(rng.gen_range(0..800))).await;
            api.drop_watches();
        }
        let new_net = format!("new{round}");
        create_net(&api, &new_net, json!({})).await;
        if fail_secrets {
            tokio::time::sleep(Duration::from_millis(1500)).await;
            let published = latest
                .lock()
                .unwrap()
                .values()
                .any(|d| d.networks.iter().any(|n| n.name == new_net));
            assert!(
                !published,
                "seed {seed}: {new_net} reached a node before its VNI was saved"
            );
            api.fail_writes(SECRETS, false);
        }
        nets.push(new_net);
        wait_converged(&latest, &nets).await;
        let violations = stable.lock().unwrap().violations.clone();
        assert!(violations.is_empty(), "seed {seed}: {violations:#?}");
        if let Some(e) = edge_left(&views.lock().unwrap()) {
            panic!("seed {seed}: {e}");
        }
    }
    drop(nodes);
    agent.stop().await;
    other.abort();
    let s = stable.lock().unwrap();
    assert_eq!(s.vni.len(), nets.len(), "seed {seed}: {:?}", s.vni);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restarts_and_leader_changes_keep_every_allocation_and_membership() {
    init();
    let seed = std::env::var("L2MESH_TEST_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| rand::thread_rng().r#gen::<u64>());
    eprintln!("L2MESH_TEST_SEED={seed}");
    run_sequence(seed).await;
}
