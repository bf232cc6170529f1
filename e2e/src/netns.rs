//! Network namespaces and the devices inside them, through iproute2.
//!
//! Every namespace is named `l2e-<pid>-<scope>-<role>` so parallel tests and
//! parallel test processes never collide, and a leftover can be traced to the
//! process that made it. Interface names only need to be unique inside their
//! namespace, so they stay short and readable (`wan0`, `lan0`, `br-wan`).

use std::ffi::OsStr;
use std::net::IpAddr;
use std::path::PathBuf;
use std::process::{Command, Output, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};

use ipnet::IpNet;
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;

use crate::registry::{self, NETNS_PREFIX};
use crate::{Error, Result};

/// Where iproute2 keeps named namespaces.
pub const NETNS_DIR: &str = "/run/netns";

static NEXT_SCOPE: AtomicU64 = AtomicU64::new(0);

/// A unique name prefix: one per topology (or per test), so every namespace
/// of one topology shares `l2e-<pid>-<n>-`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NameScope {
    prefix: String,
}

impl NameScope {
    /// A prefix no other scope of any live process uses.
    pub fn new() -> Self {
        let n = NEXT_SCOPE.fetch_add(1, Ordering::Relaxed);
        Self {
            prefix: format!("{NETNS_PREFIX}{}-{n}-", std::process::id()),
        }
    }

    /// `l2e-<pid>-<n>-`: every namespace of this scope starts with it.
    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    /// The namespace name for `role` (lowercase letters, digits and `-`).
    pub fn name(&self, role: &str) -> Result<String> {
        validate_role(role)?;
        Ok(format!("{}{role}", self.prefix))
    }
}

impl Default for NameScope {
    fn default() -> Self {
        Self::new()
    }
}

fn validate_role(role: &str) -> Result<()> {
    let reason = if role.is_empty() {
        "a role must not be empty"
    } else if role.len() > 40 {
        "a role must be at most 40 characters"
    } else if !role
        .bytes()
        .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
    {
        "use lowercase letters, digits and '-' only"
    } else {
        return Ok(());
    };
    Err(Error::InvalidName {
        name: role.to_owned(),
        reason,
    })
}

/// Renders a command for error messages.
pub(crate) fn describe(cmd: &Command) -> String {
    let mut s = cmd.get_program().to_string_lossy().into_owned();
    for a in cmd.get_args() {
        s.push(' ');
        s.push_str(&a.to_string_lossy());
    }
    s
}

/// Runs to completion and returns the output whatever the exit status.
pub(crate) fn output(cmd: &mut Command) -> Result<Output> {
    cmd.stdin(Stdio::null())
        .output()
        .map_err(|source| Error::Spawn {
            command: describe(cmd),
            source,
        })
}

/// Runs to completion; a non-zero exit is an error carrying stderr.
pub(crate) fn run_ok(cmd: &mut Command) -> Result<String> {
    let out = output(cmd)?;
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    } else {
        Err(Error::Command {
            command: describe(cmd),
            status: out.status.to_string(),
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_owned(),
        })
    }
}

/// `ip netns list` in the root namespace.
pub fn list_all() -> Result<String> {
    run_ok(Command::new("ip").args(["netns", "list"]))
}

/// Whether a named namespace exists.
pub fn exists(name: &str) -> bool {
    std::path::Path::new(NETNS_DIR).join(name).exists()
}

/// `ip netns add`, retried a few times on the transient failure of
/// concurrent first use of /run/netns by other processes (iproute2 makes it
/// a shared mount point on demand).
fn add_netns(name: &str) -> Result<()> {
    let mut attempt = 0;
    loop {
        match run_ok(Command::new("ip").args(["netns", "add", name])) {
            Err(Error::Command { stderr, .. })
                if attempt < 3 && (stderr.contains("mount") || stderr.contains("busy")) =>
            {
                attempt += 1;
                std::thread::sleep(std::time::Duration::from_millis(50 * attempt));
            }
            other => return other.map(drop),
        }
    }
}

/// Kills whatever still runs inside, then deletes the namespace. Killing
/// first matters: a namespace with processes outlives its name.
pub(crate) fn delete_by_name(name: &str) -> Result<()> {
    if !exists(name) {
        return Ok(());
    }
    if let Ok(pids) = run_ok(Command::new("ip").args(["netns", "pids", name])) {
        for pid in pids
            .split_whitespace()
            .filter_map(|p| p.parse::<i32>().ok())
        {
            let _ = kill(Pid::from_raw(pid), Signal::SIGKILL);
        }
    }
    run_ok(Command::new("ip").args(["netns", "del", name])).map(drop)
}

/// A network namespace this process created; deleted on drop.
#[derive(Debug)]
pub struct Netns {
    name: String,
    owned: bool,
}

impl Netns {
    /// Creates `l2e-<pid>-<n>-<role>` with its loopback up.
    pub fn create(scope: &NameScope, role: &str) -> Result<Self> {
        let name = scope.name(role)?;
        {
            let mut reg = registry::lock();
            reg.check_open()?;
            add_netns(&name)?;
            reg.netns.insert(name.clone());
        }
        let ns = Self { name, owned: true };
        ns.link_up("lo")?;
        Ok(ns)
    }

    /// The namespace name, as `ip netns` knows it.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// `/run/netns/<name>`, e.g. for `CNI_NETNS`.
    pub fn path(&self) -> PathBuf {
        PathBuf::from(NETNS_DIR).join(&self.name)
    }

    /// A command that runs `program` inside this namespace (`ip netns exec`,
    /// which also gives it this namespace's `/sys`). `ip` execs the program,
    /// so the child's pid is the program's pid.
    pub fn command(&self, program: impl AsRef<OsStr>) -> Command {
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", &self.name]).arg(program);
        cmd
    }

    /// Runs `program args` inside and returns its output, whatever its status.
    pub fn exec<I, S>(&self, program: impl AsRef<OsStr>, args: I) -> Result<Output>
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        output(self.command(program).args(args))
    }

    /// Runs `program args` inside; a non-zero exit is an error with stderr.
    pub fn run<I, S>(&self, program: impl AsRef<OsStr>, args: I) -> Result<String>
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        run_ok(self.command(program).args(args))
    }

    /// `ip -n <name> args...`
    pub fn ip(&self, args: &[&str]) -> Result<String> {
        run_ok(Command::new("ip").args(["-n", &self.name]).args(args))
    }

    /// Sets a device up.
    pub fn link_up(&self, dev: &str) -> Result<()> {
        self.ip(&["link", "set", "dev", dev, "up"]).map(drop)
    }

    /// Creates a bridge (no STP, so ports forward at once) and sets it up.
    pub fn add_bridge(&self, name: &str) -> Result<()> {
        self.ip(&[
            "link",
            "add",
            "name",
            name,
            "type",
            "bridge",
            "stp_state",
            "0",
        ])?;
        self.link_up(name)
    }

    /// A veth pair: `local` here, `peer_name` in `peer`. Both ends start down.
    pub fn add_veth(&self, local: &str, peer: &Netns, peer_name: &str) -> Result<()> {
        self.ip(&[
            "link", "add", "name", local, "type", "veth", "peer", "name", peer_name, "netns",
            &peer.name,
        ])
        .map(drop)
    }

    /// Makes `dev` a port of `bridge`.
    pub fn set_master(&self, dev: &str, bridge: &str) -> Result<()> {
        self.ip(&["link", "set", "dev", dev, "master", bridge])
            .map(drop)
    }

    /// Sets the MTU of a device.
    pub fn set_mtu(&self, dev: &str, mtu: u32) -> Result<()> {
        self.ip(&["link", "set", "dev", dev, "mtu", &mtu.to_string()])
            .map(drop)
    }

    /// Adds an address; IPv6 addresses skip duplicate address detection so
    /// they are usable at once.
    pub fn add_addr(&self, dev: &str, addr: IpNet) -> Result<()> {
        let a = addr.to_string();
        match addr {
            IpNet::V4(_) => self.ip(&["addr", "add", &a, "dev", dev]),
            IpNet::V6(_) => self.ip(&["-6", "addr", "add", &a, "dev", dev, "nodad"]),
        }
        .map(drop)
    }

    /// Adds a route to `dest` (`None`: default route) via a gateway.
    pub fn add_route(&self, dest: Option<IpNet>, via: IpAddr) -> Result<()> {
        let dest = dest.map_or_else(|| "default".to_owned(), |d| d.to_string());
        let family = if via.is_ipv4() { "-4" } else { "-6" };
        self.ip(&[family, "route", "add", &dest, "via", &via.to_string()])
            .map(drop)
    }

    /// Sets a sysctl inside the namespace, e.g. `net.ipv4.ip_forward`.
    pub fn sysctl(&self, key: &str, value: &str) -> Result<()> {
        self.run("sysctl", ["-qw", &format!("{key}={value}")])
            .map(drop)
    }

    /// Names of every link inside the namespace.
    pub fn links(&self) -> Result<Vec<String>> {
        Ok(parse_link_names(&self.ip(&["-o", "link", "show"])?))
    }

    /// One ICMP echo to `addr` with a timeout in whole seconds (min 1):
    /// `Ok(true)` if it was answered.
    pub fn ping(&self, addr: IpAddr, timeout_secs: u32) -> Result<bool> {
        let out = self.exec(
            "ping",
            [
                "-n",
                "-q",
                "-c",
                "1",
                "-W",
                &timeout_secs.max(1).to_string(),
                &addr.to_string(),
            ],
        )?;
        Ok(out.status.success())
    }

    /// Leaves the namespace in place (for `--keep`) and returns its name.
    pub fn keep(mut self) -> String {
        self.owned = false;
        registry::lock().netns.remove(&self.name);
        std::mem::take(&mut self.name)
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        if !self.owned {
            return;
        }
        let mut reg = registry::lock();
        if let Err(e) = delete_by_name(&self.name) {
            eprintln!("l2mesh-e2e: could not delete namespace {}: {e}", self.name);
        }
        reg.netns.remove(&self.name);
    }
}

/// Link names from `ip -o link show` (`3: wan0@if2: <...> ...`).
pub fn parse_link_names(output: &str) -> Vec<String> {
    output
        .lines()
        .filter_map(|line| line.split(": ").nth(1))
        .map(|name| name.split('@').next().unwrap_or(name).trim().to_owned())
        .filter(|n| !n.is_empty())
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scopes_are_unique_and_carry_the_pid() {
        let a = NameScope::new();
        let b = NameScope::new();
        assert_ne!(a.prefix(), b.prefix());
        let name = a.name("c1-gw").unwrap();
        assert!(name.starts_with(&format!("l2e-{}-", std::process::id())));
        assert_eq!(
            registry::owner_pid(&name),
            Some(std::process::id()),
            "{name}"
        );
    }

    #[test]
    fn bad_roles_are_refused_with_a_reason() {
        let s = NameScope::new();
        for bad in ["", "C1", "a b", "x/y", &"a".repeat(41)] {
            let err = s.name(bad).unwrap_err().to_string();
            assert!(err.contains("invalid name"), "{bad:?}: {err}");
        }
    }

    #[test]
    fn link_names_drop_peer_suffix() {
        let out = "1: lo: <LOOPBACK,UP> mtu 65536\n3: wan0@if2: <BROADCAST> mtu 1500\n";
        assert_eq!(parse_link_names(out), vec!["lo", "wan0"]);
    }
}
