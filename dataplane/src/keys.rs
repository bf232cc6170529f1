//! The node's WireGuard private key: generated on the node, stored in the
//! state directory readable by root only, never sent anywhere.

use std::fs;
use std::io::Write;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use base64::Engine as _;
use boringtun::x25519::StaticSecret;

use crate::Error;

const KEY_FILE: &str = "private.key";

fn key_path(dir: &Path) -> PathBuf {
    dir.join(KEY_FILE)
}

fn key_err(path: &Path, reason: impl Into<String>) -> Error {
    Error::Key {
        path: path.display().to_string(),
        reason: reason.into(),
    }
}

/// Creates the state directory (mode 0700) if needed.
pub fn ensure_dir(dir: &Path) -> Result<(), Error> {
    fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .map_err(|e| Error::State {
            path: dir.display().to_string(),
            reason: format!("cannot create the state directory ({e}); check --state-dir"),
        })
}

/// A fresh random key.
pub fn generate() -> StaticSecret {
    StaticSecret::from(rand::random::<[u8; 32]>())
}

/// Loads the key, or generates and stores one if there is none yet.
pub fn load_or_create(dir: &Path) -> Result<StaticSecret, Error> {
    ensure_dir(dir)?;
    let path = key_path(dir);
    match fs::read_to_string(&path) {
        Ok(text) => {
            let bytes = base64::engine::general_purpose::STANDARD
                .decode(text.trim())
                .map_err(|e| {
                    key_err(
                        &path,
                        format!("not base64 ({e}); remove it to generate a new key"),
                    )
                })?;
            let arr: [u8; 32] = bytes
                .try_into()
                .map_err(|_| key_err(&path, "not 32 bytes; remove it to generate a new key"))?;
            Ok(StaticSecret::from(arr))
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            let secret = generate();
            store(dir, &secret)?;
            Ok(secret)
        }
        Err(e) => Err(key_err(&path, e.to_string())),
    }
}

/// Atomically replaces the stored key (mode 0600).
pub fn store(dir: &Path, secret: &StaticSecret) -> Result<(), Error> {
    ensure_dir(dir)?;
    let path = key_path(dir);
    let tmp = dir.join(format!("{KEY_FILE}.tmp"));
    let mut f = fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&tmp)?;
    fs::set_permissions(&tmp, fs::Permissions::from_mode(0o600))?;
    f.write_all(
        base64::engine::general_purpose::STANDARD
            .encode(secret.to_bytes())
            .as_bytes(),
    )?;
    f.sync_all()?;
    fs::rename(&tmp, &path)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use boringtun::x25519::PublicKey;

    #[test]
    fn key_is_created_once_private_and_reloaded() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path().join("state");
        let a = load_or_create(&d).unwrap();
        let mode = fs::metadata(key_path(&d)).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        let b = load_or_create(&d).unwrap();
        assert_eq!(PublicKey::from(&a), PublicKey::from(&b));
        fs::write(key_path(&d), "garbage!").unwrap();
        let err = load_or_create(&d).err().unwrap().to_string();
        assert!(err.contains("remove it"), "{err}");
    }
}
