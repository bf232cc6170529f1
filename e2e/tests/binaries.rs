//! The binary locator: one `cargo build --workspace --bins` per test
//! process, shared by parallel callers, and every product binary runs.
//! Needs no root.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::process::Command;

use l2mesh_e2e::binaries::{PRODUCT_BINARIES, workspace_binaries};

#[test]
fn workspace_binaries_are_built_once_and_every_product_binary_runs() {
    let (a, b) = std::thread::scope(|s| {
        let first = s.spawn(workspace_binaries);
        let second = s.spawn(workspace_binaries);
        (first.join().unwrap(), second.join().unwrap())
    });
    let (a, b) = (a.unwrap_or_else(|e| panic!("{e}")), b.unwrap());
    assert!(std::ptr::eq(a, b), "both callers must share the one build");
    for name in PRODUCT_BINARIES.iter().chain(&["l2mesh-demo"]) {
        let path = a.path(name).unwrap();
        assert!(path.is_file(), "{name}: {} is not a file", path.display());
        let out = Command::new(path).arg("--help").output().unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        if *name == "l2mesh-cni" {
            // A CNI plugin takes CNI_* variables, not flags: it must only run.
            assert!(out.status.code().is_some(), "{name} crashed: {stderr}");
        } else {
            assert!(out.status.success(), "{name} --help failed: {stderr}");
        }
    }
}
