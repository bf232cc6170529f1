//! Interface operations for the CNI plugin, done with iproute2 (`ip`) and,
//! inside the pod's namespace, `nsenter --net=<path>`: a CNI plugin is a
//! short-lived process and these tools are on every node, and `nsenter`
//! takes the namespace *path* the runtime hands us (not only named ones).

use serde_json::Value;
use std::process::Command;

/// What `ip -j link show` tells about one interface.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct LinkInfo {
    pub mac: String,
    pub mtu: u32,
    pub up: bool,
}

/// Where a command runs: this process's namespace or a pod's.
#[derive(Clone, Copy, Debug)]
pub enum Ns<'a> {
    Host,
    Pod(&'a str),
}

fn command(ns: Ns<'_>) -> Command {
    match ns {
        Ns::Host => Command::new("ip"),
        Ns::Pod(path) => {
            let mut c = Command::new("nsenter");
            c.arg(format!("--net={path}")).arg("ip");
            c
        }
    }
}

fn run(ns: Ns<'_>, args: &[&str]) -> Result<String, String> {
    let mut cmd = command(ns);
    cmd.args(args);
    let out = cmd
        .output()
        .map_err(|e| format!("cannot run `ip {}`: {e}", args.join(" ")))?;
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    } else {
        Err(format!(
            "`ip {}` failed: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

/// Create a veth pair with `ifname` inside the pod and `host` in our own
/// namespace, both with `mtu`, the pod end with `mac` if given.
pub fn create_veth(
    netns: &str,
    ifname: &str,
    host: &str,
    mtu: u32,
    mac: Option<&str>,
) -> Result<(), String> {
    let mtu = mtu.to_string();
    let pid = std::process::id().to_string();
    let mut args = vec!["link", "add", ifname];
    if let Some(mac) = mac {
        args.extend(["address", mac]);
    }
    args.extend([
        "mtu", &mtu, "type", "veth", "peer", "name", host, "mtu", &mtu, "netns", &pid,
    ]);
    run(Ns::Pod(netns), &args).map(drop)
}

/// Interface details, `None` if it does not exist.
pub fn link_info(ns: Ns<'_>, name: &str) -> Option<LinkInfo> {
    let text = run(ns, &["-j", "link", "show", "dev", name]).ok()?;
    let v: Value = serde_json::from_str(&text).ok()?;
    let link = v.as_array()?.first()?;
    Some(LinkInfo {
        mac: link["address"].as_str().unwrap_or_default().to_owned(),
        mtu: u32::try_from(link["mtu"].as_u64().unwrap_or_default()).unwrap_or_default(),
        up: link["flags"]
            .as_array()
            .is_some_and(|f| f.iter().any(|x| x == "UP")),
    })
}

/// IPv4 addresses (`a.b.c.d/len`) on an interface.
pub fn addresses(ns: Ns<'_>, name: &str) -> Result<Vec<String>, String> {
    let text = run(ns, &["-j", "-4", "addr", "show", "dev", name])?;
    let v: Value = serde_json::from_str(&text).map_err(|e| e.to_string())?;
    let mut out = Vec::new();
    for link in v.as_array().into_iter().flatten() {
        for a in link["addr_info"].as_array().into_iter().flatten() {
            if let (Some(ip), Some(len)) = (a["local"].as_str(), a["prefixlen"].as_u64()) {
                out.push(format!("{ip}/{len}"));
            }
        }
    }
    Ok(out)
}

pub fn set_mtu(ns: Ns<'_>, name: &str, mtu: u32) -> Result<(), String> {
    run(ns, &["link", "set", "dev", name, "mtu", &mtu.to_string()]).map(drop)
}

pub fn set_up(ns: Ns<'_>, name: &str) -> Result<(), String> {
    run(ns, &["link", "set", "dev", name, "up"]).map(drop)
}

pub fn add_address(ns: Ns<'_>, name: &str, cidr: &str) -> Result<(), String> {
    run(ns, &["addr", "add", cidr, "dev", name]).map(drop)
}

pub fn add_route(ns: Ns<'_>, name: &str, dst: &str, gw: Option<&str>) -> Result<(), String> {
    let mut args = vec!["route", "add", dst];
    if let Some(gw) = gw {
        args.extend(["via", gw]);
    }
    args.extend(["dev", name]);
    run(ns, &args).map(drop)
}

/// Delete an interface; a missing one is not an error (DEL is idempotent).
pub fn delete(ns: Ns<'_>, name: &str) -> Result<(), String> {
    if link_info(ns, name).is_none() {
        return Ok(());
    }
    run(ns, &["link", "del", "dev", name]).map(drop)
}

/// The host-side name for a pod interface: stable per (container, ifname),
/// at most 15 characters.
#[must_use]
pub fn host_ifname(container_id: &str, ifname: &str) -> String {
    use sha2::{Digest, Sha256};
    let digest = Sha256::digest(format!("{container_id}/{ifname}").as_bytes());
    let mut name = String::from("l2");
    for b in digest.iter().take(6) {
        name.push_str(&format!("{b:02x}"));
    }
    name
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn host_names_are_short_stable_and_distinct() {
        let a = host_ifname("c1", "net1");
        assert_eq!(a, host_ifname("c1", "net1"));
        assert_ne!(a, host_ifname("c1", "net2"));
        assert_ne!(a, host_ifname("c2", "net1"));
        assert!(a.len() <= 15 && a.starts_with("l2"));
    }
}
