//! A topology with its processes and log directory, torn down in order:
//! processes first, then namespaces, then logs (kept when a test panics).

use std::path::{Path, PathBuf};
use std::time::Duration;

use std::net::IpAddr;

use crate::binaries::workspace_binaries;
use crate::netns::Netns;
use crate::plan::TopologySpec;
use crate::process::{ProcId, ProcSpec, Processes};
use crate::topology::Topology;
use crate::{Error, Result};

/// Set to keep the log directory even when the test passes.
pub const KEEP_LOGS_ENV: &str = "L2MESH_E2E_KEEP_LOGS";

/// A directory removed on drop, unless the thread is panicking (a failing
/// test) or `L2MESH_E2E_KEEP_LOGS` is set: then it is kept and its path
/// printed.
#[derive(Debug)]
pub struct LogDir {
    path: PathBuf,
}

impl LogDir {
    /// `$TMPDIR/<prefix>logs`.
    pub fn create(prefix: &str) -> Result<Self> {
        let path = std::env::temp_dir().join(format!("{prefix}logs"));
        std::fs::create_dir_all(&path).map_err(|e| Error::io(&path, e))?;
        Ok(Self { path })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for LogDir {
    fn drop(&mut self) {
        if std::thread::panicking() || std::env::var_os(KEEP_LOGS_ENV).is_some() {
            eprintln!("l2mesh-e2e: logs kept in {}", self.path.display());
        } else {
            let _ = std::fs::remove_dir_all(&self.path);
        }
    }
}

/// What [`Lab::keep`] left running.
#[derive(Debug, Clone)]
pub struct Kept {
    /// `(role, namespace)`.
    pub namespaces: Vec<(String, String)>,
    /// `(name, pid)`.
    pub processes: Vec<(String, u32)>,
    /// The lab directory (state and logs).
    pub dir: PathBuf,
}

/// A running lab. Field order is teardown order.
#[derive(Debug)]
pub struct Lab {
    procs: Processes,
    topology: Topology,
    logs: LogDir,
}

impl Lab {
    /// Builds the topology for `spec` quietly.
    pub fn build(spec: TopologySpec) -> Result<Self> {
        Self::build_with_progress(spec, &mut |_| {})
    }

    /// Builds the topology, reporting each step.
    pub fn build_with_progress(spec: TopologySpec, progress: &mut dyn FnMut(&str)) -> Result<Self> {
        let topology = Topology::build(spec, progress)?;
        let logs = LogDir::create(topology.prefix())?;
        Ok(Self {
            procs: Processes::new(logs.path()),
            topology,
            logs,
        })
    }

    pub fn topology(&self) -> &Topology {
        &self.topology
    }

    pub fn procs(&self) -> &Processes {
        &self.procs
    }

    pub fn log_dir(&self) -> &Path {
        self.logs.path()
    }

    /// Writes `contents` to `relative` under the lab's directory (creating
    /// parents), e.g. an agent's manifest directory; returns the full path.
    pub fn write_file(&self, relative: &str, contents: &str) -> Result<PathBuf> {
        let rel = Path::new(relative);
        if rel.is_absolute() || rel.components().any(|c| c.as_os_str() == "..") {
            return Err(Error::InvalidName {
                name: relative.to_owned(),
                reason: "use a relative path without '..'",
            });
        }
        let path = self.logs.path().join(rel);
        if let Some(parent) = path.parent() {
            std::fs::create_dir_all(parent).map_err(|e| Error::io(parent, e))?;
        }
        std::fs::write(&path, contents).map_err(|e| Error::io(&path, e))?;
        Ok(path)
    }

    /// Leaves everything up (`l2mesh-demo --keep`): processes keep running,
    /// namespaces and the lab directory (their state) stay. Returns the
    /// `(role, namespace)` pairs, the processes and the directory.
    pub fn keep(self) -> Kept {
        let processes = self.procs.detach();
        let dir = self.logs.path.clone();
        std::mem::forget(self.logs);
        Kept {
            namespaces: self.topology.keep(),
            processes,
            dir,
        }
    }

    /// Starts a process (see [`Processes::spawn`]).
    pub fn spawn(&self, spec: ProcSpec) -> Result<ProcId> {
        self.procs.spawn(spec)
    }

    /// Starts workspace binary `binary` (e.g. `l2mesh-broker`, built once per
    /// test process) as a daemon named `name` in `ns`.
    pub fn spawn_bin<I, S>(&self, name: &str, ns: &Netns, binary: &str, args: I) -> Result<ProcId>
    where
        I: IntoIterator<Item = S>,
        S: Into<std::ffi::OsString>,
    {
        let path = workspace_binaries()?.path(binary)?;
        self.procs
            .spawn(ProcSpec::new(name, ns, path).args(args).daemon())
    }

    /// Waits until `from` gets an ICMP echo reply from `addr`.
    pub fn wait_reachable(&self, from: &Netns, addr: IpAddr, timeout: Duration) -> Result<()> {
        self.wait_until(&format!("{} reaches {addr}", from.name()), timeout, || {
            from.ping(addr, 1).unwrap_or(false)
        })
    }

    /// Fails (with every log) if `from` gets a reply from `addr` within one
    /// second: isolation checks.
    pub fn assert_unreachable(&self, from: &Netns, addr: IpAddr) -> Result<()> {
        if from.ping(addr, 1)? {
            return Err(Error::Check(format!(
                "{} unexpectedly reached {addr}\n{}",
                from.name(),
                self.procs.report(crate::process::LOG_TAIL_LINES)
            )));
        }
        Ok(())
    }

    /// See [`Processes::wait_until`].
    pub fn wait_until(
        &self,
        description: &str,
        timeout: Duration,
        condition: impl FnMut() -> bool,
    ) -> Result<()> {
        self.procs.wait_until(description, timeout, condition)
    }
}
