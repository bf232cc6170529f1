//! deploy/ validated for real: `deploy/validate.py` renders both charts with
//! Helm's own engine (helm-python-sdk: lint, values.schema.json, templates)
//! and checks every plain manifest and every rendering against the
//! Kubernetes 1.28-1.32 API schemas (kubernetes-validate, strict), plus the
//! project's rules (standard labels, release-derived names, the charts'
//! privileges equal to the plain manifests' that the container test runs).
//! The Python environment comes from `.ci/run` (`L2MESH_VALIDATE_PYTHON`);
//! without it the test is skipped, or fails under CI.

use std::path::PathBuf;
use std::process::Command;

use l2mesh_e2e::binaries::workspace_root;
use l2mesh_e2e::preflight::{Decision, decide, in_ci};

/// The Python that has helm-python-sdk and kubernetes-validate.
const PYTHON_ENV: &str = "L2MESH_VALIDATE_PYTHON";

fn python() -> PathBuf {
    std::env::var_os(PYTHON_ENV)
        .map(PathBuf::from)
        .unwrap_or_else(|| workspace_root().join("target/validate-venv/bin/python"))
}

#[test]
fn manifests_and_charts_validate_against_kubernetes_schemas() {
    let python = python();
    let ready = Command::new(&python)
        .args(["-c", "import helm_python, kubernetes_validate"])
        .output()
        .is_ok_and(|o| o.status.success());
    let missing = if ready {
        Vec::new()
    } else {
        vec![format!(
            "{} cannot import helm_python and kubernetes_validate (`.ci/run` makes that venv; or set {PYTHON_ENV})",
            python.display()
        )]
    };
    match decide("manifests_and_charts_validate", &missing, in_ci()) {
        Decision::Run => {}
        Decision::Skip(why) => {
            eprintln!("{why}");
            return;
        }
        Decision::Fail(why) => panic!("{why}"),
    }
    let out = Command::new(&python)
        .arg(workspace_root().join("deploy/validate.py"))
        .output()
        .unwrap_or_else(|e| panic!("cannot run {}: {e}", python.display()));
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "deploy/validate.py failed:\n{text}");
    assert!(text.contains(" passed, 0 failed"), "{text}");
}

/// The license Cargo.toml declares is the one the repository ships, and no
/// crate points at a placeholder repository.
#[test]
fn the_declared_license_ships_and_no_placeholder_repository_remains() {
    let root = workspace_root();
    let license = std::fs::read_to_string(root.join("LICENSE")).expect("LICENSE at the root");
    assert!(
        license.contains("Apache License") && license.contains("Version 2.0, January 2004"),
        "LICENSE is not the Apache-2.0 text"
    );
    let manifest = std::fs::read_to_string(root.join("Cargo.toml")).unwrap();
    assert!(manifest.contains("license = \"Apache-2.0\""));
    for member in [
        "",
        "proto/",
        "broker/",
        "cluster-agent/",
        "dataplane/",
        "e2e/",
        "telemetry/",
    ] {
        let text = std::fs::read_to_string(root.join(format!("{member}Cargo.toml"))).unwrap();
        assert!(
            !text.contains("example.invalid"),
            "{member}Cargo.toml names a placeholder repository"
        );
    }
}
