//! The admin CLI of the real binary against a real broker process.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use l2mesh_proto::join::JoinString;
use std::process::{Command, Output};

fn cli(dir: &std::path::Path, addr: &str, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_l2mesh-broker"))
        .arg("--data-dir")
        .arg(dir)
        .args(args)
        .env("L2MESH_BROKER", addr)
        .env_remove("L2MESH_ADMIN_CREDENTIAL")
        .output()
        .unwrap()
}

fn ok(o: &Output) -> String {
    assert!(
        o.status.success(),
        "failed: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    String::from_utf8(o.stdout.clone()).unwrap()
}

#[test]
fn admin_cli_round_trip() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let p = common::start(dir);
    let a = p.addr.as_str();

    let join = ok(&cli(
        dir,
        a,
        &["token", "create", "--cluster", "edge-1", "--ttl", "10m"],
    ));
    let parsed = JoinString::parse(join.trim()).unwrap();
    assert_eq!(parsed.cluster, "edge-1");
    assert_eq!(parsed.brokers, vec![a.to_owned()]);

    let list = ok(&cli(dir, a, &["token", "list", "-o", "json"]));
    let v: serde_json::Value = serde_json::from_str(&list).unwrap();
    assert_eq!(v[0]["cluster"], "edge-1");
    assert!(
        !list.contains(&parsed.secret),
        "token list must not show secrets"
    );
    let table = ok(&cli(dir, a, &["token", "list"]));
    assert!(table.starts_with("ID"), "{table}");

    let net = ok(&cli(
        dir,
        a,
        &[
            "network",
            "create",
            "blue",
            "--allow",
            "edge-1",
            "--cidr",
            "10.1.0.0/16",
            "-o",
            "json",
        ],
    ));
    let v: serde_json::Value = serde_json::from_str(&net).unwrap();
    assert_eq!(v["vni"], 4096);
    let bad = cli(
        dir,
        a,
        &["network", "create", "red", "--vni", "12", "--allow-all"],
    );
    assert!(!bad.status.success());
    assert!(String::from_utf8_lossy(&bad.stderr).contains("4096"));
    let bad = cli(dir, a, &["network", "create", "red"]);
    assert!(!bad.status.success(), "an ACL is required");

    ok(&cli(dir, a, &["token", "revoke", &parsed.id]));
    let list = ok(&cli(dir, a, &["token", "list", "-o", "json"]));
    let v: serde_json::Value = serde_json::from_str(&list).unwrap();
    assert_eq!(v[0]["revoked"], true);

    let clusters = ok(&cli(dir, a, &["cluster", "list", "-o", "json"]));
    assert_eq!(clusters.trim(), "[]");
    let gone = cli(dir, a, &["cluster", "remove", "nobody"]);
    assert!(String::from_utf8_lossy(&gone.stderr).contains("no cluster named"));
    ok(&cli(dir, a, &["network", "delete", "blue"]));

    let wrong = cli(&dir.join("nonexistent"), a, &["network", "list"]);
    assert!(!wrong.status.success());
    let msg = String::from_utf8_lossy(&wrong.stderr);
    assert!(msg.contains("admin credential"), "{msg}");
    drop(p);
}
