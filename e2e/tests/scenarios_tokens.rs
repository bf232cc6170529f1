//! Scenario 7: bad tokens are refused and change nothing. Root
//! only; the workspace binaries are built once per test process.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::Duration;

use l2mesh_e2e::binaries::workspace_binaries;
use l2mesh_e2e::plan::TopologySpec;
use l2mesh_e2e::should_run;

mod common;
use common::*;

/// Scenario 7: reused, expired, revoked, forged and foreign tokens are
/// refused with a clear error and leave the broker's state unchanged.
#[test]
fn scenario_7_bad_tokens_are_refused_and_change_nothing() {
    if !should_run(
        "scenario_7_bad_tokens_are_refused_and_change_nothing",
        &["ip", "ping"],
    ) {
        return;
    }
    let bins = workspace_binaries().unwrap_or_else(|e| panic!("{e}"));
    let (lab, mesh) = mesh_lab(TopologySpec {
        clusters: 2,
        nodes_per_cluster: 1,
        pods_per_node: 0,
    });
    let agent_bin = bins.path("l2mesh-agent").unwrap();
    let host = lab.topology().gateway(2).unwrap();
    let mut attempts = 0;
    // One agent run with a fresh state dir; returns (exit ok, log).
    let mut join = |label: &str, join_string: &str| -> (bool, String) {
        attempts += 1;
        let dir = lab
            .write_file(&format!("joins/{attempts}/manifests/empty.txt"), "")
            .unwrap();
        let base = dir.parent().unwrap().parent().unwrap().to_path_buf();
        let id = lab
            .procs()
            .spawn(
                l2mesh_e2e::ProcSpec::new(&format!("join-{label}"), host, agent_bin)
                    .arg("standalone")
                    .arg("--manifests")
                    .arg(base.join("manifests"))
                    .arg("--state-dir")
                    .arg(base.join("state"))
                    .args(["--join-string", join_string])
                    .args(["--node-sync-listen", "127.0.0.1:0", "--metrics-listen", ""])
                    .env("NO_COLOR", "1"),
            )
            .unwrap();
        let joined = |log: &str| log.contains("joined the broker");
        lab.wait_until(
            &format!("the {label} join attempt ends"),
            Duration::from_secs(20),
            || {
                let log = lab.procs().log(id).unwrap();
                // A CA pin mismatch is retried (the address might be
                // wrong), so its first refusal ends the attempt too.
                matches!(
                    lab.procs().state(id),
                    Ok(l2mesh_e2e::process::ProcState::Exited(_))
                ) || joined(&log)
                    || log.contains("does not match the pin")
            },
        )
        .unwrap();
        let log = lab.procs().log(id).unwrap();
        lab.procs().kill(id).unwrap();
        (joined(&log), log)
    };
    let token = |cluster: &str, extra: &[&str]| {
        let mut args = vec!["token", "create", "--cluster", cluster];
        args.extend(extra);
        mesh.admin(&lab, &args).unwrap().trim().to_owned()
    };

    // A good token works once; it is the one reused below.
    let used = token("c9", &[]);
    let (ok, log) = join("first-use", &used);
    assert!(ok, "a fresh token must work:\n{log}");
    let expired = token("c8", &["--ttl", "1s"]);
    let revoked = token("c7", &[]);
    let list = mesh.admin(&lab, &["token", "list"]).unwrap();
    let revoked_id = rows(&list)
        .iter()
        .find(|l| l.split_whitespace().nth(1) == Some("c7"))
        .and_then(|l| l.split_whitespace().next().map(str::to_owned))
        .unwrap_or_else(|| panic!("no c7 token in:\n{list}"));
    mesh.admin(&lab, &["token", "revoke", &revoked_id]).unwrap();
    let valid = token("c6", &[]);
    let forged = forge(
        &valid,
        "secret",
        "AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA",
    );
    let foreign_pin = forge(
        &valid,
        "ca",
        "sha256:0000000000000000000000000000000000000000000000000000000000000000",
    );
    let started = std::time::Instant::now();
    lab.wait_until("the short token expires", Duration::from_secs(5), || {
        started.elapsed() > Duration::from_millis(1500)
    })
    .unwrap();

    let state = || {
        let clusters = mesh.admin(&lab, &["cluster", "list"]).unwrap();
        let names: Vec<String> = rows(&clusters)
            .iter()
            .filter_map(|l| l.split_whitespace().next().map(str::to_owned))
            .collect();
        (
            names,
            mesh.admin(&lab, &["network", "list"]).unwrap(),
            mesh.admin(&lab, &["token", "list"]).unwrap(),
        )
    };
    let before = state();
    for (label, js) in [
        ("reused", &used),
        ("expired", &expired),
        ("revoked", &revoked),
        ("forged", &forged),
        ("foreign", &foreign_pin),
    ] {
        let (ok, log) = join(label, js);
        assert!(!ok, "the {label} token was accepted:\n{log}");
        let why = log.to_lowercase();
        assert!(
            why.contains("rejected the join") || why.contains("does not match the pin"),
            "the {label} refusal should say why:\n{log}"
        );
    }
    assert_eq!(state(), before, "refused joins changed the broker's state");
}
