//! The shipped image, run for real: `deploy/image/build.sh` builds it once
//! per test process with buildah (vfs storage under the test's directory),
//! and podman runs its binaries as containers inside the lab's namespaces
//! (`--network ns:/run/netns/NAME`, as `hostNetwork` or a pod's own
//! namespace would be), each with exactly the privileges its manifest in
//! `deploy/` declares (see [`privileges`]).
//!
//! podman here: runc (crun fails on hybrid cgroups), vfs storage, and a
//! containers.conf with `default_ulimits = []`; all of it private to the
//! test's directory, so the host's own container storage is never touched.

pub mod mesh;
pub mod privileges;

use std::ffi::OsStr;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::{Mutex, OnceLock, PoisonError};
use std::time::{Duration, Instant};

use crate::binaries::workspace_root;
use crate::netns::describe;
use crate::{Error, Result};

/// The tools the container tests need besides the netns ones.
pub const CONTAINER_TOOLS: [&str; 4] = ["podman", "buildah", "readelf", "ldd"];
/// The OCI runtime podman is told to use.
pub const RUNTIME: &str = "/usr/sbin/runc";
/// Tag of the image the tests build.
pub const TEST_TAG: &str = "localhost/l2mesh:e2e";
/// `release` builds the test image from release binaries (default: dev,
/// whose binaries the test run has built anyway).
pub const PROFILE_ENV: &str = "L2MESH_E2E_IMAGE_PROFILE";

/// podman (and buildah) with storage of their own under one directory.
#[derive(Debug, Clone)]
pub struct Podman {
    dir: PathBuf,
}

impl Podman {
    /// Storage, run root and containers.conf under `dir`.
    pub fn new(dir: &Path) -> Result<Self> {
        std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
        let conf = dir.join("containers.conf");
        std::fs::write(&conf, "[containers]\ndefault_ulimits = []\n")
            .map_err(|e| Error::io(&conf, e))?;
        Ok(Self {
            dir: dir.to_path_buf(),
        })
    }

    fn root(&self) -> PathBuf {
        self.dir.join("storage")
    }

    fn runroot(&self) -> PathBuf {
        self.dir.join("run")
    }

    /// The global flags every podman call gets.
    pub fn global_args(&self) -> Vec<String> {
        vec![
            format!("--root={}", self.root().display()),
            format!("--runroot={}", self.runroot().display()),
            "--storage-driver=vfs".to_owned(),
            format!("--runtime={RUNTIME}"),
            "--events-backend=file".to_owned(),
        ]
    }

    /// `CONTAINERS_CONF` for every podman call.
    pub fn env(&self) -> (String, String) {
        (
            "CONTAINERS_CONF".to_owned(),
            self.dir.join("containers.conf").display().to_string(),
        )
    }

    /// `podman <global flags>`.
    pub fn command(&self) -> Command {
        let mut cmd = Command::new("podman");
        let (k, v) = self.env();
        cmd.args(self.global_args()).env(k, v);
        cmd
    }

    /// Runs `podman <args>` and returns its stdout; a failure carries stderr.
    pub fn run<I, S>(&self, args: I) -> Result<String>
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        let mut cmd = self.command();
        cmd.args(args).stdin(Stdio::null());
        output_of(cmd)
    }

    /// Removes containers by name, running or not; errors are ignored (the
    /// container may already be gone).
    pub fn remove(&self, names: &[String]) {
        if names.is_empty() {
            return;
        }
        let mut cmd = self.command();
        cmd.args(["rm", "--force", "--time=0", "--ignore"])
            .args(names)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        let _ = cmd.status();
    }
}

fn output_of(mut cmd: Command) -> Result<String> {
    let command = describe(&cmd);
    let out = cmd.output().map_err(|source| Error::Spawn {
        command: command.clone(),
        source,
    })?;
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    } else {
        Err(Error::Command {
            command,
            status: out.status.to_string(),
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_owned(),
        })
    }
}

/// The image built by `deploy/image/build.sh`.
#[derive(Debug)]
pub struct BuiltImage {
    pub tag: String,
    pub podman: Podman,
    /// The build context: `rootfs/` is exactly what the image holds.
    pub context: PathBuf,
    /// `dev` or `release`.
    pub profile: String,
    /// How long the build took (cargo included).
    pub took: Duration,
}

impl BuiltImage {
    /// A file of the image, read from the build context.
    pub fn file(&self, path: &str) -> PathBuf {
        self.context
            .join("rootfs")
            .join(path.trim_start_matches('/'))
    }
}

static IMAGE: OnceLock<std::result::Result<BuiltImage, String>> = OnceLock::new();
static BUILD: Mutex<()> = Mutex::new(());

/// The image, built once per test process under `dir` (a test's
/// `CARGO_TARGET_TMPDIR`); later callers share it, or share its error.
pub fn shared_image(dir: &Path) -> Result<&'static BuiltImage> {
    let _one = BUILD.lock().unwrap_or_else(PoisonError::into_inner);
    IMAGE
        .get_or_init(|| build_image(&dir.join("l2mesh-image")).map_err(|e| e.to_string()))
        .as_ref()
        .map_err(|e| Error::Earlier(e.clone()))
}

fn build_image(dir: &Path) -> Result<BuiltImage> {
    let started = Instant::now();
    // Start from empty storage: a run that was killed may have left
    // containers and old images behind.
    if dir.exists() {
        if let Ok(old) = Podman::new(dir) {
            let _ = old.run(["rm", "--all", "--force", "--time=0"]);
        }
        std::fs::remove_dir_all(dir).map_err(|e| Error::io(dir, e))?;
    }
    let podman = Podman::new(dir)?;
    let profile = std::env::var(PROFILE_ENV).unwrap_or_else(|_| "dev".to_owned());
    let context = dir.join("context");
    let script = workspace_root().join("deploy/image/build.sh");
    let mut cmd = Command::new("bash");
    cmd.arg(&script)
        .args(["--tag", TEST_TAG, "--profile", &profile])
        .arg("--root")
        .arg(podman.root())
        .arg("--runroot")
        .arg(podman.runroot())
        .arg("--context-dir")
        .arg(&context)
        .stdin(Stdio::null());
    let out = output_of(cmd).map_err(|e| {
        Error::Check(format!(
            "the image build (deploy/image/build.sh: cargo, then buildah with vfs storage in {}) failed: {e}",
            dir.display()
        ))
    })?;
    eprintln!("{}", out.trim());
    Ok(BuiltImage {
        tag: TEST_TAG.to_owned(),
        podman,
        context,
        profile,
        took: started.elapsed(),
    })
}

/// Names of the containers a test started, removed (forcibly) on drop, even
/// when the test panics: podman's conmon outlives the `podman run` client.
#[derive(Debug)]
pub struct ContainerGuard {
    podman: Podman,
    names: Mutex<Vec<String>>,
}

impl ContainerGuard {
    pub fn new(podman: &Podman) -> Self {
        Self {
            podman: podman.clone(),
            names: Mutex::new(Vec::new()),
        }
    }

    /// Records `name` for removal.
    pub fn track(&self, name: &str) {
        self.names
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .push(name.to_owned());
    }
}

impl Drop for ContainerGuard {
    fn drop(&mut self) {
        let names = std::mem::take(&mut *self.names.lock().unwrap_or_else(PoisonError::into_inner));
        self.podman.remove(&names);
    }
}

/// Whether a file is a static executable: no `NEEDED` libraries and no
/// program interpreter, by `readelf`.
pub fn is_static(path: &Path) -> Result<bool> {
    let mut dynamic = Command::new("readelf");
    dynamic.arg("-d").arg(path);
    let mut headers = Command::new("readelf");
    headers.arg("-lW").arg(path);
    let d = output_of(dynamic)?;
    let h = output_of(headers)?;
    Ok(!d.contains("(NEEDED)") && !h.contains("INTERP"))
}
