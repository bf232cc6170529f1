//! Locates the workspace binaries, building them once per process.
//!
//! `cargo build --workspace --bins` runs at most once per process (a
//! `OnceLock`: parallel tests wait for the one build). Paths come from
//! cargo's JSON messages, so `CARGO_TARGET_DIR` and any other target-dir
//! configuration are respected. `L2MESH_E2E_BIN_DIR` skips the build and
//! takes the binaries from that directory instead.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::OnceLock;

use crate::{Error, Result};

/// The product binaries the scenarios run.
pub const PRODUCT_BINARIES: [&str; 4] = [
    "l2mesh-broker",
    "l2mesh-agent",
    "l2mesh-cni",
    "l2mesh-dataplane",
];

/// Environment variable naming a directory of prebuilt binaries.
pub const BIN_DIR_ENV: &str = "L2MESH_E2E_BIN_DIR";

/// Which cargo profile to build.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Profile {
    Dev,
    Release,
}

impl Profile {
    /// The profile the running executable was built with, judged by the
    /// directory it sits in (`target/release/...`).
    pub fn of_current_exe() -> Self {
        let release = std::env::current_exe().ok().is_some_and(|exe| {
            exe.ancestors()
                .any(|d| d.file_name().is_some_and(|n| n == "release"))
        });
        if release { Self::Release } else { Self::Dev }
    }
}

/// Built binaries by name.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Binaries {
    paths: BTreeMap<String, PathBuf>,
}

impl Binaries {
    /// Path of binary `name`.
    pub fn path(&self, name: &str) -> Result<&Path> {
        self.paths
            .get(name)
            .map(PathBuf::as_path)
            .ok_or_else(|| Error::BinaryNotFound {
                name: name.to_owned(),
                hint: format!(
                    "the build produced {}; is `{name}` a [[bin]] of a workspace member?",
                    self.paths.keys().cloned().collect::<Vec<_>>().join(", ")
                ),
            })
    }

    /// All binaries found.
    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.paths.keys().map(String::as_str)
    }

    /// Binaries from a directory, without building.
    pub fn from_dir(dir: &Path) -> Result<Self> {
        let read = std::fs::read_dir(dir).map_err(|e| Error::io(dir, e))?;
        let mut paths = BTreeMap::new();
        for entry in read.flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            if name.starts_with("l2mesh-") && entry.path().is_file() {
                paths.insert(name, entry.path());
            }
        }
        Ok(Self { paths })
    }
}

/// The workspace root, from this crate's manifest directory.
pub fn workspace_root() -> PathBuf {
    let manifest = std::env::var_os("CARGO_MANIFEST_DIR")
        .map(PathBuf::from)
        .filter(|d| d.join("Cargo.toml").exists())
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")));
    manifest.parent().map(Path::to_path_buf).unwrap_or(manifest)
}

fn cargo() -> PathBuf {
    std::env::var_os("CARGO")
        .or_else(|| option_env!("CARGO").map(Into::into))
        .map_or_else(|| PathBuf::from("cargo"), PathBuf::from)
}

/// Builds every binary of the workspace with `profile` (`cargo build
/// --workspace --bins`) and returns where they are.
pub fn build(profile: Profile) -> Result<Binaries> {
    build_with(profile, false)
}

/// Like [`build`]; with `show_progress` cargo's progress goes to our
/// stderr (for the demo: a first release build takes minutes).
pub fn build_with(profile: Profile, show_progress: bool) -> Result<Binaries> {
    let root = workspace_root();
    let mut cmd = Command::new(cargo());
    cmd.arg("build")
        .arg("--manifest-path")
        .arg(root.join("Cargo.toml"))
        .args([
            "--workspace",
            "--bins",
            "--message-format=json-render-diagnostics",
        ])
        .stdin(Stdio::null());
    if profile == Profile::Release {
        cmd.arg("--release");
    }
    if show_progress {
        cmd.stderr(Stdio::inherit());
    }
    let command = crate::netns::describe(&cmd);
    let out = cmd.output().map_err(|source| Error::Spawn {
        command: command.clone(),
        source,
    })?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    if !out.status.success() {
        let stderr = String::from_utf8_lossy(&out.stderr);
        let detail = if show_progress {
            "(see cargo's output above)\n".to_owned()
        } else {
            crate::process::tail(&stderr, 60)
        };
        return Err(Error::Build(format!(
            "`{command}` exited with {}:\n{detail}",
            out.status
        )));
    }
    Ok(Binaries {
        paths: parse_cargo_messages(&stdout),
    })
}

/// The workspace binaries for tests: built once per process (dev profile),
/// or taken from `L2MESH_E2E_BIN_DIR`. Every caller after the first gets the
/// same answer, failures included.
pub fn workspace_binaries() -> Result<&'static Binaries> {
    static BUILT: OnceLock<std::result::Result<Binaries, String>> = OnceLock::new();
    BUILT
        .get_or_init(|| {
            match std::env::var_os(BIN_DIR_ENV) {
                Some(dir) => Binaries::from_dir(Path::new(&dir)),
                None => build(Profile::Dev),
            }
            .map_err(|e| e.to_string())
        })
        .as_ref()
        .map_err(|e| Error::Earlier(e.clone()))
}

/// Where the demo takes its binaries from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DemoBinaries {
    /// `L2MESH_E2E_BIN_DIR` names a directory of prebuilt binaries.
    FromEnv(PathBuf),
    /// The demo runs from a checkout: `cargo build` there.
    Build(PathBuf),
    /// No checkout (a demo binary copied elsewhere): the binaries beside it.
    BesideDemo(PathBuf),
}

impl DemoBinaries {
    /// `L2MESH_E2E_BIN_DIR`, else the checkout the demo was built from if
    /// it is still there, else the demo's own directory.
    pub fn choose() -> Self {
        if let Some(dir) = std::env::var_os(BIN_DIR_ENV) {
            return Self::FromEnv(PathBuf::from(dir));
        }
        let root = workspace_root();
        if root.join("Cargo.toml").is_file() {
            return Self::Build(root);
        }
        let beside = std::env::current_exe()
            .ok()
            .and_then(|e| e.parent().map(Path::to_path_buf))
            .unwrap_or_default();
        Self::BesideDemo(beside)
    }

    /// What the demo says it does in its first step.
    pub fn describe(&self) -> String {
        match self {
            Self::FromEnv(dir) => format!(
                "using the prebuilt binaries in {} ({BIN_DIR_ENV})",
                dir.display()
            ),
            Self::Build(root) => format!(
                "building the l2mesh binaries in {} (cargo build --workspace --bins; set \
                 {BIN_DIR_ENV} to use prebuilt ones)",
                root.display()
            ),
            Self::BesideDemo(dir) => format!(
                "using the binaries beside l2mesh-demo in {} (no checkout to build; set \
                 {BIN_DIR_ENV} to use others)",
                dir.display()
            ),
        }
    }

    /// The binaries: built (with the demo's own profile) or found.
    pub fn get(&self) -> Result<Binaries> {
        match self {
            Self::FromEnv(dir) | Self::BesideDemo(dir) => Binaries::from_dir(dir),
            Self::Build(_) => build_with(Profile::of_current_exe(), true),
        }
    }
}

/// Executables of bin targets in cargo's JSON messages.
pub fn parse_cargo_messages(stdout: &str) -> BTreeMap<String, PathBuf> {
    let mut paths = BTreeMap::new();
    for line in stdout.lines() {
        let Ok(msg) = serde_json::from_str::<serde_json::Value>(line) else {
            continue;
        };
        if msg["reason"] != "compiler-artifact" {
            continue;
        }
        let is_bin = msg["target"]["kind"]
            .as_array()
            .is_some_and(|kinds| kinds.iter().any(|k| k == "bin"));
        if let (true, Some(name), Some(exe)) = (
            is_bin,
            msg["target"]["name"].as_str(),
            msg["executable"].as_str(),
        ) {
            paths.insert(name.to_owned(), PathBuf::from(exe));
        }
    }
    paths
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cargo_messages_yield_bin_executables_only() {
        let out = r#"{"reason":"compiler-artifact","target":{"kind":["lib"],"name":"l2mesh_proto"},"executable":null}
{"reason":"compiler-artifact","target":{"kind":["bin"],"name":"l2mesh-broker"},"executable":"/t/debug/l2mesh-broker"}
not json
{"reason":"build-finished","success":true}"#;
        let paths = parse_cargo_messages(out);
        assert_eq!(paths.len(), 1);
        assert_eq!(
            paths["l2mesh-broker"],
            PathBuf::from("/t/debug/l2mesh-broker")
        );
        let bins = Binaries { paths };
        let err = bins.path("l2mesh-agent").unwrap_err().to_string();
        assert!(err.contains("l2mesh-broker"), "{err}");
    }

    #[test]
    fn the_demo_says_where_its_binaries_come_from() {
        let env = DemoBinaries::FromEnv("/opt/l2mesh".into()).describe();
        assert!(
            env.contains("/opt/l2mesh") && env.contains(BIN_DIR_ENV),
            "{env}"
        );
        assert!(!env.contains("building"), "{env}");
        let build = DemoBinaries::Build("/src/l2mesh".into()).describe();
        assert!(
            build.starts_with("building") && build.contains(BIN_DIR_ENV),
            "{build}"
        );
        let beside = DemoBinaries::BesideDemo("/usr/local/bin".into()).describe();
        assert!(beside.contains("/usr/local/bin") && !beside.starts_with("building"));
    }

    #[test]
    fn workspace_root_holds_the_workspace_manifest() {
        let root = workspace_root();
        let manifest = std::fs::read_to_string(root.join("Cargo.toml")).unwrap();
        assert!(manifest.contains("[workspace]"));
    }
}
