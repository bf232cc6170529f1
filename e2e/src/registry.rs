//! Process-wide record of every namespace and process group this process
//! made, so a signal handler (the demo's Ctrl-C) can tear everything down
//! even while the owning values are in the middle of something.
//!
//! Namespaces are created and deleted while holding the registry lock, so a
//! cleanup that takes the lock sees a complete picture: nothing can exist
//! that is not recorded.

use std::collections::BTreeSet;
use std::sync::{Mutex, MutexGuard, PoisonError};

use nix::sys::signal::{Signal, killpg};
use nix::unistd::Pid;

use crate::netns;

/// Prefix of every namespace the harness creates: `l2e-<pid>-<n>-<role>`.
pub const NETNS_PREFIX: &str = "l2e-";

#[derive(Debug, Default)]
pub(crate) struct Registry {
    pub(crate) netns: BTreeSet<String>,
    pub(crate) process_groups: BTreeSet<i32>,
    /// Set by [`cleanup_all`]: nothing new may be created afterwards, or a
    /// thread racing the signal handler could leave something behind.
    pub(crate) closed: bool,
}

impl Registry {
    /// Refuses new namespaces and processes once [`cleanup_all`] ran.
    pub(crate) fn check_open(&self) -> crate::Result<()> {
        if self.closed {
            Err(crate::Error::ShuttingDown)
        } else {
            Ok(())
        }
    }
}

static REGISTRY: Mutex<Registry> = Mutex::new(Registry {
    netns: BTreeSet::new(),
    process_groups: BTreeSet::new(),
    closed: false,
});

/// The lock survives a panicking holder: teardown must still work then.
pub(crate) fn lock() -> MutexGuard<'static, Registry> {
    REGISTRY.lock().unwrap_or_else(PoisonError::into_inner)
}

/// What [`cleanup_all`] or [`sweep_stale`] removed.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct CleanupReport {
    pub killed_process_groups: usize,
    pub deleted_netns: Vec<String>,
    pub deleted_dirs: Vec<String>,
    pub failures: Vec<String>,
}

/// Kills every process group and deletes every namespace this process made
/// and has not torn down yet. For signal handlers: the values that own them
/// are left behind, and their own teardown later finds nothing to do.
/// Afterwards the harness refuses to create anything in this process.
pub fn cleanup_all() -> CleanupReport {
    let mut reg = lock();
    reg.closed = true;
    let mut report = CleanupReport::default();
    for pgid in std::mem::take(&mut reg.process_groups) {
        if killpg(Pid::from_raw(pgid), Signal::SIGKILL).is_ok() {
            report.killed_process_groups += 1;
        }
    }
    for name in std::mem::take(&mut reg.netns) {
        match netns::delete_by_name(&name) {
            Ok(()) => report.deleted_netns.push(name),
            Err(e) => report.failures.push(e.to_string()),
        }
    }
    report
}

/// Whether [`cleanup_all`] ran (an interrupt is tearing everything down).
pub fn is_closed() -> bool {
    lock().closed
}

/// The pid in a harness namespace name `l2e-<pid>-...`, if it is one.
pub fn owner_pid(netns_name: &str) -> Option<u32> {
    let rest = netns_name.strip_prefix(NETNS_PREFIX)?;
    let (pid, tail) = rest.split_once('-')?;
    if tail.is_empty() || pid.is_empty() || !pid.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    pid.parse().ok()
}

/// Names from `ip netns list` output (`name` or `name (id: 3)` per line).
pub fn parse_netns_list(output: &str) -> Vec<String> {
    output
        .lines()
        .filter_map(|line| line.split_whitespace().next())
        .map(str::to_owned)
        .collect()
}

/// Harness namespaces whose owning process is gone: left behind by a test
/// that was SIGKILLed, or by `l2mesh-demo --keep`. Pure: `alive` decides.
pub fn stale_names(names: &[String], alive: impl Fn(u32) -> bool) -> Vec<String> {
    names
        .iter()
        .filter(|n| owner_pid(n).is_some_and(|pid| !alive(pid)))
        .cloned()
        .collect()
}

fn pid_alive(pid: u32) -> bool {
    std::path::Path::new(&format!("/proc/{pid}")).exists()
}

/// Deletes every harness namespace (and the processes in it) whose owning
/// process has exited. Namespaces of live harness processes are untouched.
pub fn sweep_stale() -> crate::Result<CleanupReport> {
    let names = parse_netns_list(&netns::list_all()?);
    let mut report = CleanupReport::default();
    let _reg = lock();
    for name in stale_names(&names, pid_alive) {
        match netns::delete_by_name(&name) {
            Ok(()) => report.deleted_netns.push(name),
            Err(e) => report.failures.push(e.to_string()),
        }
    }
    // Lab directories (`$TMPDIR/l2e-<pid>-<n>-logs`) of dead owners, which
    // `--keep` leaves for the processes it kept.
    let tmp = std::env::temp_dir();
    if let Ok(entries) = std::fs::read_dir(&tmp) {
        let dirs: Vec<String> = entries
            .flatten()
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .filter(|n| n.ends_with("-logs"))
            .collect();
        for dir in stale_names(&dirs, pid_alive) {
            if std::fs::remove_dir_all(tmp.join(&dir)).is_ok() {
                report.deleted_dirs.push(dir);
            }
        }
    }
    Ok(report)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn owner_pid_parses_harness_names_only() {
        assert_eq!(owner_pid("l2e-1234-0-c1-gw"), Some(1234));
        assert_eq!(owner_pid("l2e-1234-7-sw"), Some(1234));
        assert_eq!(owner_pid("l2e-x12-0-sw"), None);
        assert_eq!(owner_pid("l2e-1234"), None);
        assert_eq!(owner_pid("l2e-1234-"), None);
        assert_eq!(owner_pid("dp-1234-0"), None);
        assert_eq!(owner_pid("l2e--0-sw"), None);
    }

    #[test]
    fn netns_list_parsing_handles_ids() {
        let out = "l2e-1-0-sw (id: 3)\nother\n\nl2e-2-0-broker\n";
        assert_eq!(
            parse_netns_list(out),
            vec!["l2e-1-0-sw", "other", "l2e-2-0-broker"]
        );
    }

    #[test]
    fn only_dead_owners_are_stale() {
        let names: Vec<String> = ["l2e-10-0-sw", "l2e-11-0-sw", "foreign", "l2e-10-1-c1-gw"]
            .iter()
            .map(|s| s.to_string())
            .collect();
        let stale = stale_names(&names, |pid| pid == 11);
        assert_eq!(stale, vec!["l2e-10-0-sw", "l2e-10-1-c1-gw"]);
    }
}
