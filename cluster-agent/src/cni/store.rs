//! l2mesh IPAM lease store, one directory per network, the host-local layout:
//! a file per leased address holding `container-id\nifname`, a
//! `last_reserved_ip` file for round robin, and a `lock` file held with
//! flock(2) for the whole operation so concurrent CNI calls never collide.

use nix::fcntl::{Flock, FlockArg};
use std::collections::BTreeSet;
use std::fs::{self, File, OpenOptions};
use std::io::Write;
use std::net::IpAddr;
use std::path::{Path, PathBuf};

const LAST: &str = "last_reserved_ip";

/// An open, locked lease directory. The lock is released on drop.
#[derive(Debug)]
pub struct Store {
    dir: PathBuf,
    _lock: Flock<File>,
}

fn io(path: &Path, e: impl std::fmt::Display) -> String {
    format!("{}: {e}", path.display())
}

impl Store {
    /// Open (creating) `<data_dir>/<network>` and take its lock.
    pub fn open(data_dir: &Path, network: &str) -> Result<Self, String> {
        if network.contains('/') || network.starts_with('.') {
            return Err(format!("network name {network:?} cannot name a directory"));
        }
        let dir = data_dir.join(network);
        fs::create_dir_all(&dir).map_err(|e| io(&dir, e))?;
        let lock_path = dir.join("lock");
        let file = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&lock_path)
            .map_err(|e| io(&lock_path, e))?;
        let lock =
            Flock::lock(file, FlockArg::LockExclusive).map_err(|(_, e)| io(&lock_path, e))?;
        Ok(Self { dir, _lock: lock })
    }

    fn leases(&self) -> Result<Vec<(IpAddr, String)>, String> {
        let mut out = Vec::new();
        for entry in fs::read_dir(&self.dir).map_err(|e| io(&self.dir, e))? {
            let entry = entry.map_err(|e| io(&self.dir, e))?;
            let name = entry.file_name();
            let Some(ip) = name.to_str().and_then(|n| n.parse::<IpAddr>().ok()) else {
                continue;
            };
            let owner = fs::read_to_string(entry.path()).unwrap_or_default();
            out.push((ip, owner));
        }
        Ok(out)
    }

    /// Every leased address.
    pub fn used(&self) -> Result<BTreeSet<IpAddr>, String> {
        Ok(self.leases()?.into_iter().map(|(ip, _)| ip).collect())
    }

    /// Addresses leased to one container interface.
    pub fn owned_by(&self, container: &str, ifname: &str) -> Result<Vec<IpAddr>, String> {
        let owner = format!("{container}\n{ifname}");
        Ok(self
            .leases()?
            .into_iter()
            .filter(|(_, o)| o.trim_end() == owner)
            .map(|(ip, _)| ip)
            .collect())
    }

    /// Lease `ip`; false if someone holds it already.
    pub fn reserve(&self, ip: IpAddr, container: &str, ifname: &str) -> Result<bool, String> {
        let path = self.dir.join(ip.to_string());
        match OpenOptions::new().write(true).create_new(true).open(&path) {
            Ok(mut f) => {
                f.write_all(format!("{container}\n{ifname}").as_bytes())
                    .and_then(|()| f.sync_all())
                    .map_err(|e| io(&path, e))?;
                let last = self.dir.join(LAST);
                fs::write(&last, ip.to_string()).map_err(|e| io(&last, e))?;
                Ok(true)
            }
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => Ok(false),
            Err(e) => Err(io(&path, e)),
        }
    }

    /// Drop every lease of one container interface (idempotent).
    pub fn release(&self, container: &str, ifname: &str) -> Result<Vec<IpAddr>, String> {
        let ips = self.owned_by(container, ifname)?;
        for ip in &ips {
            let path = self.dir.join(ip.to_string());
            match fs::remove_file(&path) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => return Err(io(&path, e)),
            }
        }
        Ok(ips)
    }

    /// Drops every lease whose owner is not one of `keep` (container id,
    /// ifname); returns the addresses freed. A lease file without an owner
    /// (a reservation that died halfway) goes too.
    pub fn retain(&self, keep: &[(String, String)]) -> Result<Vec<IpAddr>, String> {
        let mut freed = Vec::new();
        for (ip, owner) in self.leases()? {
            let mut lines = owner.trim_end().splitn(2, '\n');
            let (c, i) = (lines.next().unwrap_or(""), lines.next().unwrap_or(""));
            if keep.iter().any(|(kc, ki)| kc == c && ki == i) {
                continue;
            }
            let path = self.dir.join(ip.to_string());
            match fs::remove_file(&path) {
                Ok(()) => freed.push(ip),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => return Err(io(&path, e)),
            }
        }
        Ok(freed)
    }

    /// The last address handed out, for round robin.
    #[must_use]
    pub fn last(&self) -> Option<IpAddr> {
        fs::read_to_string(self.dir.join(LAST))
            .ok()
            .and_then(|s| s.trim().parse().ok())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn leases_are_exclusive_and_released_per_owner() {
        let dir = tempfile::tempdir().unwrap();
        let ip: IpAddr = "10.0.0.5".parse().unwrap();
        {
            let s = Store::open(dir.path(), "blue").unwrap();
            assert!(s.reserve(ip, "c1", "net1").unwrap());
            assert!(!s.reserve(ip, "c2", "net1").unwrap());
            assert_eq!(s.owned_by("c1", "net1").unwrap(), vec![ip]);
            assert!(s.owned_by("c1", "net2").unwrap().is_empty());
            assert_eq!(s.last(), Some(ip));
        }
        let s = Store::open(dir.path(), "blue").unwrap();
        assert_eq!(s.used().unwrap().len(), 1);
        assert_eq!(s.release("c1", "net1").unwrap(), vec![ip]);
        assert!(s.release("c1", "net1").unwrap().is_empty());
        assert!(s.used().unwrap().is_empty());
        assert!(Store::open(dir.path(), "../x").is_err());
    }

    #[test]
    fn gc_keeps_the_leases_of_valid_attachments_only() {
        let dir = tempfile::tempdir().unwrap();
        let s = Store::open(dir.path(), "blue").unwrap();
        let ip = |i: u8| IpAddr::from([10, 0, 0, i]);
        assert!(s.reserve(ip(1), "live", "net1").unwrap());
        assert!(s.reserve(ip(2), "gone", "net1").unwrap());
        assert!(s.reserve(ip(3), "live", "net2").unwrap());
        fs::write(dir.path().join("blue").join("10.0.0.4"), "").unwrap();
        let keep = vec![("live".to_owned(), "net1".to_owned())];
        let mut freed = s.retain(&keep).unwrap();
        freed.sort();
        assert_eq!(freed, vec![ip(2), ip(3), ip(4)]);
        assert_eq!(
            s.used().unwrap().into_iter().collect::<Vec<_>>(),
            vec![ip(1)]
        );
        assert_eq!(s.last(), Some(ip(3)), "round robin is untouched");
    }
}
