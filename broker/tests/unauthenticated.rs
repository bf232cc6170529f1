//! Unauthenticated clients cannot hold the broker: deadlines, connection
//! caps, no busy loop when file descriptors run out. Loopback only; the
//! "other" clients connect from 127.0.0.2 and up.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use common::{TestBroker, gateway, next_view, request, watch};
use l2mesh_broker::process::BrokerProcess;
use l2mesh_proto::broker as pb;
use std::net::{IpAddr, SocketAddr};
use std::process::Command;
use std::time::{Duration, Instant};
use tokio::io::{AsyncRead, AsyncReadExt as _};
use tokio::net::{TcpSocket, TcpStream};

/// A TCP connection from the loopback address `from`.
async fn connect_from(from: [u8; 4], to: &str) -> TcpStream {
    let socket = TcpSocket::new_v4().unwrap();
    socket.bind(SocketAddr::new(IpAddr::from(from), 0)).unwrap();
    socket.connect(to.parse().unwrap()).await.unwrap()
}

/// TLS to the broker (CA pinned, no client certificate), then silence.
async fn tls_from(
    from: [u8; 4],
    b: &TestBroker,
) -> std::io::Result<tokio_rustls::client::TlsStream<TcpStream>> {
    let cred = b.admin_credential();
    let config =
        l2mesh_proto::pinned::client_config(l2mesh_proto::pinned::sha256(&cred.ca), None).unwrap();
    let tcp = connect_from(from, &b.addr).await;
    let name = rustls::pki_types::ServerName::try_from("l2mesh-broker").unwrap();
    tokio_rustls::TlsConnector::from(config)
        .connect(name, tcp)
        .await
}

/// Whether the server closes `s` within `within` (EOF or an error).
async fn closed_within(s: &mut (impl AsyncRead + Unpin), within: Duration) -> bool {
    let mut buf = [0u8; 256];
    let deadline = Instant::now() + within;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match tokio::time::timeout(left, s.read(&mut buf)).await {
            Err(_) => return false,
            Ok(Ok(0) | Err(_)) => return true,
            Ok(Ok(_)) => {}
        }
    }
}

#[tokio::test]
async fn connections_that_never_authenticate_are_closed_at_the_deadline() {
    let b = TestBroker::start_with(|c| {
        c.conn.handshake_timeout = Duration::from_secs(1);
        c.conn.unauthenticated_timeout = Duration::from_secs(2);
    })
    .await;
    // An authenticated cluster with an open watch, to show that the
    // deadline does not touch it.
    let (_, mut edge) = b.join("edge").await;
    b.network("blue", &[]).await;
    request(&mut edge, &["blue", "red"]).await;
    let mut w = watch(&mut edge, 0).await;
    next_view(&mut w).await;

    let mut silent = connect_from([127, 0, 0, 2], &b.addr).await;
    let mut tls_only = tls_from([127, 0, 0, 3], &b).await.unwrap();
    assert!(
        closed_within(&mut silent, Duration::from_secs(8)).await,
        "a connection that never starts TLS must be closed"
    );
    assert!(
        closed_within(&mut tls_only, Duration::from_secs(8)).await,
        "a connection that finishes TLS but never speaks HTTP/2 must be closed"
    );
    // Joins are unauthenticated calls: a client that keeps its join
    // connection is closed too, but the join itself works.
    let (_, _) = b.join("late").await;

    // The cluster's stream outlived the deadline on the same connection.
    b.network("red", &[]).await;
    let v = next_view(&mut w).await;
    assert_eq!(v.networks.len(), 2, "{v:?}");
    edge.report_gateways(pb::GatewayReport {
        gateways: vec![gateway("gw", 1, "100.64.0.1")],
    })
    .await
    .unwrap();
}

#[tokio::test]
async fn unauthenticated_connections_are_capped_and_the_oldest_make_room() {
    let b = TestBroker::start_with(|c| {
        c.conn.max_unauthenticated = 6;
        c.conn.max_unauthenticated_per_source = 3;
        c.conn.unauthenticated_timeout = Duration::from_secs(60);
    })
    .await;
    let mut held = Vec::new();
    for _ in 0..3 {
        held.push(tls_from([127, 0, 0, 2], &b).await.unwrap());
    }
    // The fourth from the same source is turned away at once.
    let mut extra = connect_from([127, 0, 0, 2], &b.addr).await;
    assert!(closed_within(&mut extra, Duration::from_secs(5)).await);
    for _ in 0..3 {
        held.push(tls_from([127, 0, 0, 3], &b).await.unwrap());
    }
    // All six unauthenticated slots are taken: a newcomer from a third
    // source gets in, and the oldest idle connection makes room.
    let _newcomer = tls_from([127, 0, 0, 4], &b).await.unwrap();
    assert!(closed_within(&mut held[0], Duration::from_secs(5)).await);
    for s in &mut held[1..] {
        assert!(!closed_within(s, Duration::from_millis(50)).await);
    }
    // So idle connections never keep the admin out.
    let tokens = tokio::time::timeout(Duration::from_secs(10), async {
        b.admin()
            .await
            .list_tokens(pb::ListTokensRequest::default())
            .await
    })
    .await
    .expect("the admin must be served")
    .unwrap();
    assert!(tokens.into_inner().tokens.is_empty());
    let body = reqwest_metrics(&b.metrics_addr).await;
    for reason in ["unauthenticated_per_source", "evicted"] {
        assert!(
            body.contains(&format!(
                "l2mesh_broker_connections_refused_total{{reason=\"{reason}\"}}"
            )),
            "{body}"
        );
    }
}

async fn reqwest_metrics(addr: &str) -> String {
    use tokio::io::AsyncWriteExt as _;
    let mut s = TcpStream::connect(addr).await.unwrap();
    s.write_all(b"GET /metrics HTTP/1.0\r\nHost: x\r\n\r\n")
        .await
        .unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).await.unwrap();
    out
}

/// CPU time (user + system, clock ticks) the process has used.
fn cpu_ticks(pid: u32) -> u64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    // Fields after the ")" that closes the command name; utime and stime
    // are fields 14 and 15 of the whole line.
    let rest = &stat[stat.rfind(')').unwrap() + 2..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    f[11].parse::<u64>().unwrap() + f[12].parse::<u64>().unwrap()
}

#[tokio::test]
async fn running_out_of_file_descriptors_neither_spins_nor_locks_out_the_admin() {
    let dir = tempfile::tempdir().unwrap();
    // 160 open files at most, soft and hard: the broker must keep its
    // connections below that on its own.
    let mut cmd = Command::new("prlimit");
    cmd.arg("--nofile=160:160")
        .arg("--")
        .arg(env!("CARGO_BIN_EXE_l2mesh-broker"))
        .arg("--data-dir")
        .arg(dir.path())
        .args([
            "serve",
            "--listen",
            "127.0.0.1:0",
            "--metrics-listen",
            "127.0.0.1:0",
        ])
        .env("L2MESH_LOG", "info");
    let broker = BrokerProcess::spawn(cmd, Duration::from_secs(20)).unwrap();
    let pid = broker.child.id();
    // An attacker opens far more connections than there are descriptors,
    // from several addresses, and says nothing.
    let mut attack = Vec::new();
    for i in 0..300u32 {
        let from = [127, 0, 0, 2 + u8::try_from(i % 10).unwrap()];
        attack.push(connect_from(from, &broker.addr).await);
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    let before = cpu_ticks(pid);
    tokio::time::sleep(Duration::from_secs(2)).await;
    let used = cpu_ticks(pid) - before;
    // A spinning accept loop burns ~200 ticks in 2 s; an idle broker ~0.
    assert!(
        used < 60,
        "the broker used {used} ticks of CPU in 2 s while idle"
    );
    // The admin still gets in from its own address.
    let cred = l2mesh_broker::pki::AdminCredential::load(&dir.path().join("admin.pem")).unwrap();
    let r = tokio::time::timeout(Duration::from_secs(10), async {
        l2mesh_broker::client::admin_client(std::slice::from_ref(&broker.addr), &cred)
            .await
            .unwrap()
            .list_clusters(pb::ListClustersRequest::default())
            .await
    })
    .await
    .expect("the admin must be served while the attack holds its connections");
    assert!(r.unwrap().into_inner().clusters.is_empty());
    drop(attack);
}
