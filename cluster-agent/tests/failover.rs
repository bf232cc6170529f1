//! Standby gateway failover with the real `l2mesh-agent` binary: two
//! gateway nodes played by node-sync clients, a test-local broker.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use l2mesh_proto::node::{DesiredState, NodeStatus, PeerGroup};
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};
use support::standalone_agent::*;

/// A node that says hello and then reports its status every 200 ms while
/// `reporting` is set; dropping it closes its watch.
struct FakeNode {
    watch: tonic::Streaming<DesiredState>,
    reporting: Arc<std::sync::atomic::AtomicBool>,
    task: tokio::task::JoinHandle<()>,
}

impl FakeNode {
    async fn start(state: &Path, name: &'static str, key: u8) -> Self {
        let mut client = node_client(state, None).await;
        let watch = client
            .watch_desired(hello(name, key))
            .await
            .unwrap()
            .into_inner();
        let reporting = Arc::new(std::sync::atomic::AtomicBool::new(true));
        let on = reporting.clone();
        let task = tokio::spawn(async move {
            loop {
                if on.load(std::sync::atomic::Ordering::Relaxed) {
                    let _ = client
                        .report_status(NodeStatus {
                            node_name: name.into(),
                            public_key: vec![key; 32],
                            ..NodeStatus::default()
                        })
                        .await;
                }
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        });
        Self {
            watch,
            reporting,
            task,
        }
    }

    fn set_reporting(&self, on: bool) {
        self.reporting
            .store(on, std::sync::atomic::Ordering::Relaxed);
    }
}

impl Drop for FakeNode {
    fn drop(&mut self) {
        self.task.abort();
    }
}

fn remote_peers(d: &DesiredState) -> usize {
    d.peers
        .iter()
        .filter(|p| p.group() == PeerGroup::Remote)
        .count()
}

/// The newest desired state: `last`, or whatever came after it.
async fn latest(
    stream: &mut tonic::Streaming<DesiredState>,
    mut last: DesiredState,
) -> DesiredState {
    while let Ok(Ok(Some(d))) =
        tokio::time::timeout(Duration::from_millis(300), stream.message()).await
    {
        last = d;
    }
    last
}

const TWO_GATEWAYS: &str = "apiVersion: l2mesh.io/v1alpha1\nkind: Nodes\nnodes:\n  - {name: gw-a, gateway: true}\n  - {name: gw-b, gateway: true}\n";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_standby_gateway_takes_over_from_a_dead_one_and_keeps_the_role() {
    let (join, seen) = start_broker("good-secret").await;
    let dir = tempfile::tempdir().unwrap();
    let manifests = dir.path().join("manifests");
    let state = dir.path().join("state");
    std::fs::create_dir_all(&manifests).unwrap();
    std::fs::write(manifests.join("nodes.yaml"), TWO_GATEWAYS).unwrap();
    std::fs::write(manifests.join("networks.yaml"), NETS).unwrap();
    let env = [("L2MESH_GATEWAY_TIMEOUT_SECS", "3")];
    let agent = spawn_agent_env(&manifests, &state, Some(&join), &env);
    let last_reported = || {
        seen.lock()
            .unwrap()
            .gateways
            .last()
            .and_then(|r| r.gateways.first().map(|g| g.node.clone()))
    };

    let mut a = FakeNode::start(&state, "gw-a", 1).await;
    next_matching(&mut a.watch, "gw-a active", |d| remote_peers(d) > 0).await;
    let mut b = FakeNode::start(&state, "gw-b", 2).await;
    let d = next_matching(&mut b.watch, "gw-b's first state", |d| has_net(d, "shared")).await;
    assert_eq!(remote_peers(&d), 0, "one active gateway per cluster");
    wait_for("gw-a reported to the broker", || {
        (last_reported().as_deref() == Some("gw-a")).then_some(())
    })
    .await;

    // gw-a goes silent with its watch still open: after the timeout (3 s)
    // gw-b carries the remote tunnels and is the one the broker hears of.
    a.set_reporting(false);
    let silent = Instant::now();
    let d = next_matching(&mut b.watch, "gw-b takes over", |d| remote_peers(d) > 0).await;
    let took = silent.elapsed();
    assert!(
        took >= Duration::from_secs(2) && took < Duration::from_secs(8),
        "took {took:?} for a 3 s timeout"
    );
    next_matching(&mut a.watch, "gw-a stands down", |d| remote_peers(d) == 0).await;
    wait_for("gw-b reported to the broker", || {
        (last_reported().as_deref() == Some("gw-b")).then_some(())
    })
    .await;

    // gw-a is back: no hand back.
    a.set_reporting(true);
    tokio::time::sleep(Duration::from_secs(4)).await;
    let d = latest(&mut b.watch, d).await;
    assert!(remote_peers(&d) > 0, "gw-b keeps the role");
    assert_eq!(last_reported().as_deref(), Some("gw-b"));

    // The agent restarts and gw-a happens to reconnect first: the role
    // stays with gw-b, which the agent stored.
    drop((agent, a, b));
    let _agent = spawn_agent_env(&manifests, &state, None, &env);
    let mut a = FakeNode::start(&state, "gw-a", 1).await;
    let da = next_matching(&mut a.watch, "gw-a's state after the restart", |d| {
        has_net(d, "shared")
    })
    .await;
    let mut b = FakeNode::start(&state, "gw-b", 2).await;
    next_matching(&mut b.watch, "gw-b active after the restart", |d| {
        remote_peers(d) > 0
    })
    .await;
    let da = latest(&mut a.watch, da).await;
    assert_eq!(remote_peers(&da), 0, "gw-a did not get the role");

    // gw-b's dataplane dies (watch closed): gw-a takes over at once, well
    // before the silence timeout.
    drop(b);
    let closed = Instant::now();
    next_matching(&mut a.watch, "gw-a takes over again", |d| {
        remote_peers(d) > 0
    })
    .await;
    assert!(
        closed.elapsed() < Duration::from_secs(2),
        "a closed stream is noticed at once, took {:?}",
        closed.elapsed()
    );
}
