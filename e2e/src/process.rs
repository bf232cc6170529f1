//! Real binaries inside namespaces: per-process log files, restart, stop,
//! and [`Processes::wait_until`], whose timeout error carries every
//! process's state and log tail.

use std::ffi::OsString;
use std::fmt::Write as _;
use std::fs::OpenOptions;
use std::io::Write as _;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Stdio};
use std::sync::{Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use nix::sys::signal::{Signal, killpg};
use nix::unistd::Pid;

use crate::netns::{Netns, describe};
use crate::registry;
use crate::{Error, Result};

/// Lines of each log shown in a failure message.
pub const LOG_TAIL_LINES: usize = 40;
/// How long [`Processes::stop`] waits after SIGTERM before SIGKILL.
pub const STOP_GRACE: Duration = Duration::from_secs(3);

/// What to run, and where.
#[derive(Debug, Clone)]
pub struct ProcSpec {
    /// Short unique name (`broker`, `c1-agent`); also the log file's name.
    pub name: String,
    /// The namespace to run in.
    pub netns: String,
    pub program: PathBuf,
    pub args: Vec<OsString>,
    pub env: Vec<(OsString, OsString)>,
    /// A daemon must keep running: [`Processes::wait_until`] fails at once,
    /// with the logs, when it exits instead of waiting for the timeout.
    pub daemon: bool,
}

impl ProcSpec {
    /// `program` in `netns`, no arguments, the harness's environment.
    pub fn new(name: &str, netns: &Netns, program: impl Into<PathBuf>) -> Self {
        Self {
            name: name.to_owned(),
            netns: netns.name().to_owned(),
            program: program.into(),
            args: Vec::new(),
            env: Vec::new(),
            daemon: false,
        }
    }

    /// Marks it a daemon (see [`ProcSpec::daemon`]).
    pub fn daemon(mut self) -> Self {
        self.daemon = true;
        self
    }

    /// Adds one argument.
    pub fn arg(mut self, arg: impl Into<OsString>) -> Self {
        self.args.push(arg.into());
        self
    }

    /// Adds arguments.
    pub fn args<I, S>(mut self, args: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: Into<OsString>,
    {
        self.args.extend(args.into_iter().map(Into::into));
        self
    }

    /// Sets an environment variable.
    pub fn env(mut self, key: impl Into<OsString>, value: impl Into<OsString>) -> Self {
        self.env.push((key.into(), value.into()));
        self
    }
}

/// Handle of a process in a [`Processes`] group.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct ProcId(usize);

/// State of a process, for reports.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ProcState {
    Running { pid: u32 },
    Exited(String),
    Stopped,
}

impl std::fmt::Display for ProcState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ProcState::Running { pid } => write!(f, "running (pid {pid})"),
            ProcState::Exited(status) => write!(f, "EXITED ({status})"),
            ProcState::Stopped => f.write_str("stopped by the test"),
        }
    }
}

#[derive(Debug)]
struct Proc {
    spec: ProcSpec,
    log: PathBuf,
    child: Option<Child>,
    exited: Option<String>,
    starts: u32,
    /// The test asked it to end (e.g. SIGINT to a ping): its exit is not
    /// a daemon dying.
    ending: bool,
}

impl Proc {
    fn state(&mut self) -> ProcState {
        if let Some(child) = &mut self.child {
            match child.try_wait() {
                Ok(None) => return ProcState::Running { pid: child.id() },
                Ok(Some(status)) => self.exited = Some(status.to_string()),
                Err(e) => self.exited = Some(format!("unknown: {e}")),
            }
            let pid = child.id();
            self.child = None;
            unregister(pid);
        }
        match &self.exited {
            Some(status) => ProcState::Exited(status.clone()),
            None => ProcState::Stopped,
        }
    }
}

fn pgid_of(pid: u32) -> Pid {
    Pid::from_raw(i32::try_from(pid).unwrap_or(i32::MAX))
}

fn unregister(pid: u32) {
    registry::lock()
        .process_groups
        .remove(&pgid_of(pid).as_raw());
}

/// A group of processes sharing a log directory. Dropping it stops them all
/// (SIGKILL to each process group: teardown must be quick and sure).
#[derive(Debug)]
pub struct Processes {
    log_dir: PathBuf,
    procs: Mutex<Vec<Proc>>,
}

impl Processes {
    /// Logs go to `<log_dir>/<name>.log`.
    pub fn new(log_dir: impl Into<PathBuf>) -> Self {
        Self {
            log_dir: log_dir.into(),
            procs: Mutex::new(Vec::new()),
        }
    }

    fn lock(&self) -> MutexGuard<'_, Vec<Proc>> {
        self.procs.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Where the logs are.
    pub fn log_dir(&self) -> &Path {
        &self.log_dir
    }

    /// Starts `spec` in its own process group, stdout and stderr appended to
    /// its log file.
    pub fn spawn(&self, spec: ProcSpec) -> Result<ProcId> {
        if spec.name.is_empty() || spec.name.contains('/') {
            return Err(Error::InvalidName {
                name: spec.name,
                reason: "a process name must be non-empty and contain no '/'",
            });
        }
        let mut procs = self.lock();
        if procs.iter().any(|p| p.spec.name == spec.name) {
            return Err(Error::InvalidName {
                name: spec.name,
                reason: "a process with this name already exists; names must be unique",
            });
        }
        let log = self.log_dir.join(format!("{}.log", spec.name));
        let mut proc = Proc {
            spec,
            log,
            child: None,
            exited: None,
            starts: 0,
            ending: false,
        };
        start(&mut proc)?;
        procs.push(proc);
        Ok(ProcId(procs.len() - 1))
    }

    fn with<T>(&self, id: ProcId, f: impl FnOnce(&mut Proc) -> Result<T>) -> Result<T> {
        let mut procs = self.lock();
        let proc = procs.get_mut(id.0).ok_or(Error::UnknownProcess(id.0))?;
        f(proc)
    }

    /// SIGKILL, as a crash would: no chance to clean up.
    pub fn kill(&self, id: ProcId) -> Result<()> {
        self.with(id, |p| {
            signal_and_reap(p, Signal::SIGKILL, Duration::from_secs(5));
            Ok(())
        })
    }

    /// Leaves every process running (for `l2mesh-demo --keep`): they are
    /// forgotten here and in the registry. Returns their names and pids.
    pub fn detach(&self) -> Vec<(String, u32)> {
        let mut procs = self.lock();
        let mut out = Vec::new();
        for p in procs.iter_mut() {
            if let Some(child) = p.child.take() {
                unregister(child.id());
                out.push((p.spec.name.clone(), child.id()));
            }
        }
        procs.clear();
        out
    }

    /// Sends `signal` to the process's group and returns at once.
    pub fn signal(&self, id: ProcId, signal: Signal) -> Result<()> {
        self.with(id, |p| {
            if let Some(child) = &p.child {
                p.ending = true;
                let _ = killpg(pgid_of(child.id()), signal);
            }
            Ok(())
        })
    }

    /// SIGTERM, then SIGKILL after [`STOP_GRACE`].
    pub fn stop(&self, id: ProcId) -> Result<()> {
        self.with(id, |p| {
            if !signal_and_reap(p, Signal::SIGTERM, STOP_GRACE) {
                signal_and_reap(p, Signal::SIGKILL, Duration::from_secs(5));
            }
            Ok(())
        })
    }

    /// Starts a process again with the same spec (killing it first if it
    /// still runs); its log continues after a marker line.
    pub fn restart(&self, id: ProcId) -> Result<()> {
        self.with(id, |p| {
            signal_and_reap(p, Signal::SIGKILL, Duration::from_secs(5));
            start(p)
        })
    }

    /// The process's state now.
    pub fn state(&self, id: ProcId) -> Result<ProcState> {
        self.with(id, |p| Ok(p.state()))
    }

    /// The whole log so far.
    pub fn log(&self, id: ProcId) -> Result<String> {
        self.with(id, |p| read_log(&p.log))
    }

    /// Every process's state and the last `lines` of its log.
    pub fn report(&self, lines: usize) -> String {
        let mut procs = self.lock();
        if procs.is_empty() {
            return "(no processes were started)\n".to_owned();
        }
        let mut out = String::new();
        for p in procs.iter_mut() {
            let state = p.state();
            let _ = writeln!(
                out,
                "--- {} in {}: {state}; log {} (last {lines} lines):",
                p.spec.name,
                p.spec.netns,
                p.log.display()
            );
            let text = read_log(&p.log).unwrap_or_else(|e| format!("(unreadable: {e})"));
            out.push_str(&tail(&text, lines));
            if !out.ends_with('\n') {
                out.push('\n');
            }
        }
        out
    }

    /// The first daemon that has exited on its own, as `name (status)`.
    fn dead_daemon(&self) -> Option<String> {
        self.lock()
            .iter_mut()
            .find_map(|p| match (p.spec.daemon && !p.ending, p.state()) {
                (true, ProcState::Exited(status)) => Some(format!("{} ({status})", p.spec.name)),
                _ => None,
            })
    }

    /// Polls `condition` until it holds (backing off from 10 ms to 200 ms).
    /// On timeout the error names `description` and carries every process's
    /// state and log tail; if a daemon exits meanwhile it fails at once.
    pub fn wait_until(
        &self,
        description: &str,
        timeout: Duration,
        mut condition: impl FnMut() -> bool,
    ) -> Result<()> {
        self.wait_for(description, timeout, || condition().then_some(()))
    }

    /// Like [`Self::wait_until`], for a condition that yields a value.
    pub fn wait_for<T>(
        &self,
        description: &str,
        timeout: Duration,
        mut condition: impl FnMut() -> Option<T>,
    ) -> Result<T> {
        let start = Instant::now();
        let mut pause = Duration::from_millis(10);
        loop {
            if let Some(v) = condition() {
                return Ok(v);
            }
            if let Some(dead) = self.dead_daemon() {
                return Err(Error::ProcessDied(format!(
                    "{dead} exited while waiting for: {description}\n{}",
                    self.report(LOG_TAIL_LINES)
                )));
            }
            let elapsed = start.elapsed();
            if elapsed >= timeout {
                return Err(Error::Timeout(format!(
                    "timed out after {:.1}s waiting for: {description}\n{}",
                    elapsed.as_secs_f64(),
                    self.report(LOG_TAIL_LINES)
                )));
            }
            std::thread::sleep(pause.min(timeout.saturating_sub(elapsed)));
            pause = (pause * 2).min(Duration::from_millis(200));
        }
    }
}

impl Drop for Processes {
    fn drop(&mut self) {
        for p in self.lock().iter_mut() {
            signal_and_reap(p, Signal::SIGKILL, Duration::from_secs(5));
        }
    }
}

fn read_log(path: &Path) -> Result<String> {
    match std::fs::read(path) {
        Ok(bytes) => Ok(String::from_utf8_lossy(&bytes).into_owned()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(String::new()),
        Err(e) => Err(Error::io(path, e)),
    }
}

/// The last `lines` lines of `text`.
pub fn tail(text: &str, lines: usize) -> String {
    let all: Vec<&str> = text.lines().collect();
    let mut out = all[all.len().saturating_sub(lines)..].join("\n");
    if out.is_empty() {
        out.push_str("(empty log)");
    }
    out.push('\n');
    out
}

fn start(p: &mut Proc) -> Result<()> {
    if let Some(parent) = p.log.parent() {
        std::fs::create_dir_all(parent).map_err(|e| Error::io(parent, e))?;
    }
    let mut log = OpenOptions::new()
        .create(true)
        .append(true)
        .open(&p.log)
        .map_err(|e| Error::io(&p.log, e))?;
    p.starts += 1;
    let mut cmd = std::process::Command::new("ip");
    cmd.args(["netns", "exec", &p.spec.netns])
        .arg(&p.spec.program)
        .args(&p.spec.args)
        .envs(p.spec.env.iter().map(|(k, v)| (k, v)))
        .stdin(Stdio::null())
        .process_group(0);
    let _ = writeln!(
        log,
        "=== l2mesh-e2e: start #{} in {}: {}",
        p.starts,
        p.spec.netns,
        describe(&cmd)
    );
    let err_log = log.try_clone().map_err(|e| Error::io(&p.log, e))?;
    cmd.stdout(Stdio::from(log)).stderr(Stdio::from(err_log));
    // Registered under the registry lock so a signal-time cleanup sees it.
    let mut reg = registry::lock();
    reg.check_open()?;
    let child = cmd.spawn().map_err(|source| Error::Spawn {
        command: describe(&cmd),
        source,
    })?;
    reg.process_groups.insert(pgid_of(child.id()).as_raw());
    p.child = Some(child);
    p.exited = None;
    p.ending = false;
    Ok(())
}

/// Signals the process group and waits up to `wait` for the leader to exit.
/// Returns whether it is gone.
fn signal_and_reap(p: &mut Proc, signal: Signal, wait: Duration) -> bool {
    let Some(child) = &mut p.child else {
        return true;
    };
    let pid = child.id();
    let _ = killpg(pgid_of(pid), signal);
    let deadline = Instant::now() + wait;
    loop {
        match child.try_wait() {
            Ok(Some(_)) | Err(_) => break,
            Ok(None) if Instant::now() >= deadline => return false,
            Ok(None) => std::thread::sleep(Duration::from_millis(10)),
        }
    }
    // Stragglers of the group (children of the leader) go too.
    let _ = killpg(pgid_of(pid), Signal::SIGKILL);
    p.child = None;
    p.exited = None;
    unregister(pid);
    append_marker(&p.log, &format!("stopped by the harness ({signal})"));
    true
}

fn append_marker(path: &Path, what: &str) {
    if let Ok(mut f) = OpenOptions::new().append(true).open(path) {
        let _ = writeln!(f, "=== l2mesh-e2e: {what}");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tail_keeps_the_last_lines() {
        assert_eq!(tail("a\nb\nc\n", 2), "b\nc\n");
        assert_eq!(tail("a\nb", 5), "a\nb\n");
        assert_eq!(tail("", 3), "(empty log)\n");
    }

    #[test]
    fn states_read_well_in_reports() {
        assert_eq!(ProcState::Running { pid: 7 }.to_string(), "running (pid 7)");
        assert!(
            ProcState::Exited("exit status: 1".into())
                .to_string()
                .contains("EXITED")
        );
    }

    #[test]
    fn wait_until_without_processes_times_out_with_the_description() {
        let procs = Processes::new(std::env::temp_dir().join("l2e-unit-never-used"));
        let err = procs
            .wait_until("the impossible", Duration::from_millis(30), || false)
            .unwrap_err()
            .to_string();
        assert!(err.contains("waiting for: the impossible"), "{err}");
        assert!(err.contains("no processes"), "{err}");
        let mut n = 0;
        procs
            .wait_until("third poll", Duration::from_secs(5), || {
                n += 1;
                n == 3
            })
            .unwrap();
    }
}
