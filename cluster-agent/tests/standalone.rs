//! Standalone mode end to end: the real `l2mesh-agent` binary against a
//! test-local `Broker` gRPC server (TLS with a CA the join string pins) and
//! node-sync clients that speak as node dataplanes. Loopback only, port 0.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use l2mesh_proto::node::{NodeStatus, PeerGroup};
use std::time::Duration;
use support::standalone_agent::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn standalone_agent_joins_serves_nodes_writes_status_and_restarts_without_token() {
    let (join, seen) = start_broker("good-secret").await;
    let dir = tempfile::tempdir().unwrap();
    let manifests = dir.path().join("manifests");
    let state = dir.path().join("state");
    std::fs::create_dir_all(&manifests).unwrap();
    std::fs::write(manifests.join("nodes.yaml"), NODES).unwrap();
    std::fs::write(manifests.join("networks.yaml"), NETS).unwrap();

    let agent = spawn_agent(&manifests, &state, Some(&join));
    let mut gw = node_client(&state, None).await;
    let mut gw_watch = gw.watch_desired(hello("gw", 1)).await.unwrap().into_inner();
    let d = next_matching(
        &mut gw_watch,
        "gw with both networks and the remote gateway",
        |d| {
            has_net(d, "blue")
                && has_net(d, "shared")
                && d.peers.iter().any(|p| p.group() == PeerGroup::Remote)
        },
    )
    .await;
    let id = d.identity.clone().unwrap();
    assert_eq!(id.node_name, "gw");
    assert!(id.tunnel_ip.starts_with("100.64.7."), "{id:?}");
    assert!(!has_net(&d, "secret"), "a denied network is not installed");
    let shared = d.networks.iter().find(|n| n.name == "shared").unwrap();
    assert_eq!((shared.vni, shared.mtu), (4100, 1380));
    assert!(shared.pod_cidr.starts_with("10.50."), "{shared:?}");
    let remote = d.peers.iter().find(|p| p.name == "cloud/gw").unwrap();
    assert_eq!(remote.vnis, vec![4100]);

    // A second node appears: the gateway gets it as a local peer.
    let mut w1 = node_client(&state, None).await;
    let mut w1_watch = w1.watch_desired(hello("w1", 2)).await.unwrap().into_inner();
    let dw = next_matching(&mut w1_watch, "w1 state with gw", |d| !d.peers.is_empty()).await;
    assert!(
        dw.peers.iter().all(|p| p.group() == PeerGroup::Local),
        "workers never get remote peers"
    );
    assert_eq!(
        dw.peers[0].endpoint, "127.0.0.1:51820",
        "the Nodes endpoint wins"
    );
    let d = next_matching(&mut gw_watch, "gw with w1", |d| {
        d.peers.iter().any(|p| p.name == "w1")
    })
    .await;
    let local = d.peers.iter().find(|p| p.name == "w1").unwrap();
    assert_eq!(local.endpoint, "127.0.0.2:51820");
    assert!(d.revision > 0);
    let ack = w1
        .report_status(NodeStatus {
            node_name: "w1".into(),
            applied_revision: dw.revision,
            ..NodeStatus::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert!(ack.revision >= dw.revision);

    // Authentication and membership.
    let mut bad = node_client(&state, Some("wrong-token")).await;
    let e = bad.watch_desired(hello("gw", 1)).await.unwrap_err();
    assert_eq!(e.code(), tonic::Code::Unauthenticated);
    let mut bad_endpoint = hello("w1", 2);
    bad_endpoint.endpoints = vec!["not-an-address".into()];
    let e = w1.watch_desired(bad_endpoint).await.unwrap_err();
    assert_eq!(e.code(), tonic::Code::InvalidArgument);
    let e = w1.watch_desired(hello("stranger", 3)).await.unwrap_err();
    assert_eq!(e.code(), tonic::Code::PermissionDenied);
    assert!(e.message().contains("Nodes manifest"));
    // Oversized strings are refused by the shared limits, never echoed.
    let e = w1
        .watch_desired(hello(&"n".repeat(100_000), 3))
        .await
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::InvalidArgument);
    assert!(e.message().contains("limit is 253") && e.message().len() < 200);
    let mut long_endpoint = hello("w1", 2);
    long_endpoint.endpoints = vec![format!("{}:1", "1".repeat(100))];
    let e = w1.watch_desired(long_endpoint).await.unwrap_err();
    assert!(e.message().contains("limit is 64"), "{}", e.message());

    // The broker saw the gateway over mTLS, and the denial reaches the status file.
    wait_for("gateway report", || {
        let s = seen.lock().unwrap();
        s.gateways
            .iter()
            .any(|g| {
                g.gateways
                    .iter()
                    .any(|x| x.node == "gw" && x.public_key == vec![1; 32])
            })
            .then_some(())
    })
    .await;
    assert!(
        seen.lock().unwrap().mtls_reports > 0,
        "reports must use the cluster certificate"
    );
    let secret = wait_for("denied status", || {
        std::fs::read_to_string(status_file(&state, "secret"))
            .ok()
            .filter(|t| t.contains("Denied"))
    })
    .await;
    assert!(
        secret.contains("cluster edge is not allowed on network secret"),
        "{secret}"
    );
    let blue = wait_for("blue status", || {
        std::fs::read_to_string(status_file(&state, "blue")).ok()
    })
    .await;
    assert!(
        blue.contains("vni: 1") && blue.contains("LocalScope"),
        "{blue}"
    );

    // Intent changes are picked up; a broken manifest changes nothing.
    std::fs::write(manifests.join("broken.yaml"), "kind: [").unwrap();
    tokio::time::sleep(Duration::from_millis(400)).await;
    std::fs::remove_file(manifests.join("broken.yaml")).unwrap();
    std::fs::write(
        manifests.join("networks.yaml"),
        NETS.replace("name: blue", "name: green"),
    )
    .unwrap();
    let d = next_matching(&mut gw_watch, "blue replaced by green", |d| {
        has_net(d, "green") && !has_net(d, "blue")
    })
    .await;
    assert_eq!(
        d.networks.iter().find(|n| n.name == "green").unwrap().vni,
        2,
        "released VNIs are not reused at once"
    );
    wait_for("blue status removed", || {
        (!status_file(&state, "blue").exists()).then_some(())
    })
    .await;

    // Restart: no token needed, same identity, same node-sync CA.
    drop(agent);
    let ca_before = std::fs::read_to_string(state.join("node-sync/ca.crt")).unwrap();
    let _agent = spawn_agent(&manifests, &state, None);
    let mut gw = node_client(&state, None).await;
    let mut gw_watch = gw.watch_desired(hello("gw", 1)).await.unwrap().into_inner();
    let d2 = next_matching(&mut gw_watch, "state after restart", |d| {
        has_net(d, "shared")
    })
    .await;
    assert_eq!(
        d2.identity.unwrap().tunnel_ip,
        id.tunnel_ip,
        "tunnel IPs survive restarts"
    );
    assert!(d2.revision > d.revision, "revisions grow across restarts");
    assert_eq!(
        std::fs::read_to_string(state.join("node-sync/ca.crt")).unwrap(),
        ca_before
    );
    assert_eq!(seen.lock().unwrap().joins, 1, "the token is used once");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rejected_token_is_a_clear_error_and_changes_nothing() {
    let (join, seen) = start_broker("another-secret-than-expected").await;
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("nodes.yaml"), NODES).unwrap();
    let state = dir.path().join("state");
    let out = agent_command(dir.path(), &state)
        .args(["--join-string", &join])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("rejected the join") && err.contains("token create"),
        "{err}"
    );
    assert!(!state.join("identity.json").exists());
    assert_eq!(seen.lock().unwrap().joins, 0);

    let out = agent_command(dir.path(), &state)
        .args(["--join-string", "garbage"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("l2mesh1."));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_a_broker_local_networks_work_and_multi_cluster_ones_wait() {
    let dir = tempfile::tempdir().unwrap();
    let manifests = dir.path().join("manifests");
    let state = dir.path().join("state");
    std::fs::create_dir_all(&manifests).unwrap();
    std::fs::write(manifests.join("all.yaml"), format!("{NODES}---\n{NETS}")).unwrap();
    let _agent = spawn_brokerless_agent(&manifests, &state);
    let mut w1 = node_client(&state, None).await;
    let mut watch = w1.watch_desired(hello("w1", 2)).await.unwrap().into_inner();
    let d = next_matching(&mut watch, "local network", |d| has_net(d, "blue")).await;
    assert!(!has_net(&d, "shared"));
    assert!(d.identity.unwrap().tunnel_ip.starts_with("100.127.0."));
    let shared = wait_for("pending status", || {
        std::fs::read_to_string(status_file(&state, "shared"))
            .ok()
            .filter(|t| t.contains("without a broker"))
    })
    .await;
    assert!(shared.contains("Pending"), "{shared}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_stops_the_agent_even_with_nodes_watching() {
    let dir = tempfile::tempdir().unwrap();
    let manifests = dir.path().join("manifests");
    let state = dir.path().join("state");
    std::fs::create_dir_all(&manifests).unwrap();
    std::fs::write(manifests.join("all.yaml"), format!("{NODES}---\n{NETS}")).unwrap();
    let mut agent = spawn_brokerless_agent(&manifests, &state);
    let mut w1 = node_client(&state, None).await;
    let mut watch = w1.watch_desired(hello("w1", 2)).await.unwrap().into_inner();
    next_matching(&mut watch, "local network", |d| has_net(d, "blue")).await;
    let pid = nix::unistd::Pid::from_raw(i32::try_from(agent.0.id()).unwrap());
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM).unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    let status = loop {
        if let Some(s) = agent.0.try_wait().unwrap() {
            break s;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the agent still runs 5 s after SIGTERM with a node watching"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert!(status.success(), "{status:?}");
    // The node sees its watch end and reconnects elsewhere.
    let ended = tokio::time::timeout(Duration::from_secs(5), async {
        while let Ok(Some(_)) = watch.message().await {}
    })
    .await;
    assert!(ended.is_ok(), "the watch ends with the agent");
}
