//! `l2mesh-cni install`: puts the plugin into the host's CNI bin directory
//! the way a running host needs it. The container runtime may be executing
//! the old binary at that moment, and opening a busy executable for writing
//! fails ("text file busy"); so the new one is written under a temporary
//! name in the same directory, synced, and renamed over the old one: callers
//! see the old file or the whole new one, never a partial copy.

use std::fs::{self, File, OpenOptions};
use std::io;
use std::os::unix::fs::{OpenOptionsExt as _, PermissionsExt as _};
use std::path::{Path, PathBuf};

/// The file name the plugin is installed under (the `type` in CNI configs).
pub const PLUGIN_NAME: &str = "l2mesh-cni";

/// Why an install failed; the destination is unchanged in every case.
#[derive(Debug, thiserror::Error)]
pub enum InstallError {
    #[error(
        "CNI bin directory {0} does not exist (mount the host's CNI bin dir there, e.g. /opt/cni/bin or /home/kubernetes/bin on GKE)"
    )]
    NoDirectory(PathBuf),
    #[error("cannot read the plugin at {path}: {source}")]
    Source { path: PathBuf, source: io::Error },
    #[error("cannot write {path}: {source}")]
    Write { path: PathBuf, source: io::Error },
}

/// Copies `source` to `dir/name` atomically (temporary name, fsync, rename,
/// fsync of the directory), mode 0755. Returns the installed path.
pub fn install_file(source: &Path, dir: &Path, name: &str) -> Result<PathBuf, InstallError> {
    if !dir.is_dir() {
        return Err(InstallError::NoDirectory(dir.to_path_buf()));
    }
    let target = dir.join(name);
    let tmp = dir.join(format!(".{name}.tmp-{}", std::process::id()));
    let write_err = |path: &Path| {
        let path = path.to_path_buf();
        move |source| InstallError::Write { path, source }
    };
    let mut from = File::open(source).map_err(|e| InstallError::Source {
        path: source.to_path_buf(),
        source: e,
    })?;
    let result = (|| {
        let mut to = OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o755)
            .open(&tmp)
            .map_err(write_err(&tmp))?;
        io::copy(&mut from, &mut to).map_err(write_err(&tmp))?;
        // The mode given at creation is filtered by the umask.
        to.set_permissions(fs::Permissions::from_mode(0o755))
            .map_err(write_err(&tmp))?;
        to.sync_all().map_err(write_err(&tmp))?;
        fs::rename(&tmp, &target).map_err(write_err(&target))?;
        File::open(dir)
            .and_then(|d| d.sync_all())
            .map_err(write_err(dir))
    })();
    if result.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    result.map(|()| target)
}

/// Installs the running executable as [`PLUGIN_NAME`] into `dir`.
pub fn install_self(dir: &Path) -> Result<PathBuf, InstallError> {
    let exe = std::env::current_exe().map_err(|e| InstallError::Source {
        path: PathBuf::from("/proc/self/exe"),
        source: e,
    })?;
    install_file(&exe, dir, PLUGIN_NAME)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn replaces_a_running_binary_without_text_file_busy() {
        let dir = tempfile::tempdir().unwrap();
        // A plugin executing from the target path right now, as when the
        // runtime calls it during a DaemonSet update.
        let running = install_file(Path::new("/bin/sleep"), dir.path(), PLUGIN_NAME).unwrap();
        let mut child = std::process::Command::new(&running)
            .arg("30")
            .spawn()
            .unwrap();
        // Writing into a busy executable in place is what fails:
        let in_place = OpenOptions::new().write(true).open(&running);
        let busy = in_place.err().and_then(|e| e.raw_os_error());
        let new = dir.path().join("new");
        fs::write(&new, b"#!/bin/sh\necho new\n").unwrap();
        let installed = install_file(&new, dir.path(), PLUGIN_NAME);
        child.kill().unwrap();
        child.wait().unwrap();
        assert_eq!(
            busy,
            Some(nix::errno::Errno::ETXTBSY as i32),
            "the in-place write should be refused"
        );
        let installed = installed.unwrap();
        assert_eq!(fs::read(&installed).unwrap(), b"#!/bin/sh\necho new\n");
        let mode = fs::metadata(&installed).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o755);
        let names: Vec<_> = fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        assert!(
            !names.iter().any(|n| n.contains(".tmp-")),
            "no temporary file left: {names:?}"
        );
    }

    #[test]
    fn a_missing_directory_is_named_and_nothing_is_written() {
        let dir = tempfile::tempdir().unwrap();
        let missing = dir.path().join("no-such-dir");
        let err = install_file(Path::new("/bin/sleep"), &missing, PLUGIN_NAME).unwrap_err();
        assert!(matches!(err, InstallError::NoDirectory(_)));
        assert!(err.to_string().contains("no-such-dir"), "{err}");
        assert!(!missing.exists());
    }

    #[test]
    fn an_unreadable_source_leaves_the_old_plugin_in_place() {
        let dir = tempfile::tempdir().unwrap();
        fs::write(dir.path().join(PLUGIN_NAME), b"old").unwrap();
        let err = install_file(&dir.path().join("absent"), dir.path(), PLUGIN_NAME).unwrap_err();
        assert!(matches!(err, InstallError::Source { .. }), "{err}");
        assert_eq!(fs::read(dir.path().join(PLUGIN_NAME)).unwrap(), b"old");
        assert_eq!(fs::read_dir(dir.path()).unwrap().count(), 1);
    }
}
