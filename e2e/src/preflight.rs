//! Whether root/netns tests can run here; skip with a reason, or fail
//! loudly when `CI` is set.

use std::path::Path;

/// Tools the topology self-tests need.
pub const NETNS_TOOLS: [&str; 3] = ["ip", "ping", "sysctl"];

/// Whether `CI` is set (non-empty and not `0`/`false`).
pub fn in_ci() -> bool {
    std::env::var("CI").is_ok_and(|v| !v.is_empty() && v != "0" && v != "false")
}

fn on_path(tool: &str) -> bool {
    std::env::var_os("PATH")
        .is_some_and(|path| std::env::split_paths(&path).any(|dir| is_executable(&dir.join(tool))))
}

fn is_executable(p: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    p.metadata()
        .is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
}

/// What is missing to run root/netns tests with `tools`, one reason each.
pub fn missing(tools: &[&str]) -> Vec<String> {
    let mut reasons = Vec::new();
    let euid = nix::unistd::geteuid();
    if !euid.is_root() {
        reasons.push(format!(
            "not root (euid {euid}); run as root to create network namespaces"
        ));
    }
    for tool in tools {
        if !on_path(tool) {
            reasons.push(format!(
                "`{tool}` is not on PATH (see .ci/run for the packages)"
            ));
        }
    }
    reasons
}

/// `true` if the test can run. Otherwise prints why it is skipped and
/// returns `false`, or panics with the reason when `CI` is set.
///
/// ```no_run
/// if !l2mesh_e2e::should_run("my_test", &["ip", "ping"]) {
///     return;
/// }
/// ```
pub fn should_run(test: &str, tools: &[&str]) -> bool {
    match decide(test, &missing(tools), in_ci()) {
        Decision::Run => true,
        Decision::Skip(why) => {
            eprintln!("{why}");
            false
        }
        Decision::Fail(why) => panic!("{why}"),
    }
}

/// What to do with a test, given what is missing.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    Run,
    /// Skip, with the line to print.
    Skip(String),
    /// Fail (under CI), with the panic message.
    Fail(String),
}

/// Pure core of [`should_run`].
pub fn decide(test: &str, missing: &[String], ci: bool) -> Decision {
    if missing.is_empty() {
        return Decision::Run;
    }
    let why = missing.join("; ");
    if ci {
        Decision::Fail(format!("{test} cannot run and CI is set: {why}"))
    } else {
        Decision::Skip(format!("SKIPPED {test}: {why}"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn missing_tools_are_named() {
        let reasons = missing(&["surely-not-a-tool-l2e"]);
        assert!(reasons.iter().any(|r| r.contains("surely-not-a-tool-l2e")));
        assert!(on_path("sh"));
    }

    #[test]
    fn missing_requirements_skip_locally_and_fail_under_ci() {
        let missing = vec!["not root (euid 1000)".to_owned()];
        assert_eq!(decide("t", &[], true), Decision::Run);
        let Decision::Skip(line) = decide("t", &missing, false) else {
            panic!("should skip");
        };
        assert!(line.contains("SKIPPED t: not root"), "{line}");
        let Decision::Fail(msg) = decide("t", &missing, true) else {
            panic!("should fail under CI");
        };
        assert!(
            msg.contains("CI is set") && msg.contains("not root"),
            "{msg}"
        );
    }
}
