//! Final join errors end the real `l2mesh-agent` with a clear message and a
//! non-zero status; an unreachable broker is retried. Against a real broker
//! (the l2mesh-broker library, in-process on 127.0.0.1 port 0).
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use l2mesh_proto::join::JoinString;
use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};
use support::broker::TestBroker;
use support::standalone_agent::{Agent, agent_command};

fn spawn_agent(dir: &Path, js: &JoinString) -> Agent {
    let manifests = dir.join("manifests");
    std::fs::create_dir_all(&manifests).unwrap();
    let child = agent_command(&manifests, &dir.join("state"))
        .env("L2MESH_JOIN_STRING", js.encode())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    Agent(child)
}

/// Wait for the agent to exit (it must, within `secs`), with its stderr.
async fn exits(mut agent: Agent, secs: u64) -> Output {
    let deadline = Instant::now() + Duration::from_secs(secs);
    loop {
        if agent.0.try_wait().unwrap().is_some() {
            let child = std::mem::replace(&mut agent.0, Command::new("true").spawn().unwrap());
            return child.wait_with_output().unwrap();
        }
        assert!(
            Instant::now() < deadline,
            "the agent still runs after {secs} s: a final error is being retried"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

async fn assert_final(dir: &Path, js: &JoinString, expect: &[&str]) {
    let out = exits(spawn_agent(dir, js), 20).await;
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "non-zero exit; stderr:\n{stderr}");
    let last = stderr
        .lines()
        .rfind(|l| l.starts_with("l2mesh-agent:"))
        .unwrap_or_else(|| panic!("a final error line; stderr:\n{stderr}"));
    for e in expect {
        assert!(last.contains(e), "{e:?} in {last:?}");
    }
    assert!(
        !dir.join("state/identity.json").exists(),
        "nothing stored after a failed join"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_join_string_for_another_broker_ca_is_final() {
    let broker = TestBroker::start().await;
    let mut js = broker.token("edge").await;
    js.ca = JoinString::format_pin(&[7; 32]);
    let dir = tempfile::tempdir().unwrap();
    assert_final(
        dir.path(),
        &js,
        &["does not match the pin", "get a fresh join string"],
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn used_unknown_and_expired_tokens_are_final() {
    let broker = TestBroker::start().await;

    let used = broker.token("edge").await;
    l2mesh_broker::client::join(&used).await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    assert_final(dir.path(), &used, &["rejected", "no uses left"]).await;

    let mut unknown = broker.token("edge").await;
    unknown.id = "no-such-token".into();
    let dir = tempfile::tempdir().unwrap();
    assert_final(
        dir.path(),
        &unknown,
        &["rejected", "is unknown or its secret does not match"],
    )
    .await;

    let expired = broker.token_ttl("edge", 1).await;
    tokio::time::sleep(Duration::from_millis(2100)).await;
    let dir = tempfile::tempdir().unwrap();
    assert_final(dir.path(), &expired, &["rejected", "expired"]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unreachable_broker_is_retried() {
    // A join string for an address where nothing listens.
    let addr = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap()
    };
    let js = JoinString {
        brokers: vec![addr.to_string()],
        ca: JoinString::format_pin(&[7; 32]),
        id: "t".into(),
        secret: "s".into(),
        cluster: "edge".into(),
    };
    let dir = tempfile::tempdir().unwrap();
    let mut agent = spawn_agent(dir.path(), &js);
    tokio::time::sleep(Duration::from_secs(4)).await;
    assert!(
        agent.0.try_wait().unwrap().is_none(),
        "an unreachable broker is retried, not fatal"
    );
    let _ = agent.0.kill();
    let out = std::mem::replace(&mut agent.0, Command::new("true").spawn().unwrap())
        .wait_with_output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("will retry"), "{stderr}");
}
