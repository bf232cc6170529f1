//! Helpers for root integration tests: uniquely named network namespaces
//! that are always removed, daemons run as real processes inside them, and
//! pods as namespaces with a veth into a node.
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)]

use std::path::PathBuf;
use std::process::{Child, Command, Output, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use l2mesh_dataplane::client;
use l2mesh_proto::node::{
    AttachPortRequest, DesiredState, NetworkSpec, NodeIdentity, NodeStatus, PeerGroup, PeerSpec,
    StatusRequest,
};

pub mod bulk;
pub mod raw;
pub mod udp;

pub const BIN: &str = env!("CARGO_BIN_EXE_l2mesh-dataplane");
static COUNTER: AtomicU32 = AtomicU32::new(0);

fn have(tool: &str) -> bool {
    Command::new("sh")
        .args(["-c", &format!("command -v {tool}")])
        .stdout(Stdio::null())
        .status()
        .map(|s| s.success())
        .unwrap_or(false)
}

/// True when the test can run; otherwise prints why (or panics under CI).
pub fn can_run(tools: &[&str]) -> bool {
    let mut missing: Vec<String> = Vec::new();
    if !nix_is_root() {
        missing.push("root".into());
    }
    for t in tools.iter().chain(["ip"].iter()) {
        if !have(t) {
            missing.push((*t).to_string());
        }
    }
    if missing.is_empty() {
        return true;
    }
    let msg = format!("skipping: needs {}", missing.join(", "));
    if std::env::var_os("CI").is_some() {
        panic!("{msg} (CI is set, so this is a failure)");
    }
    eprintln!("{msg}");
    false
}

fn nix_is_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
        .unwrap_or(false)
}

pub fn run(args: &[&str]) -> Output {
    Command::new(args[0])
        .args(&args[1..])
        .output()
        .expect("spawn")
}

/// Runs a command and panics with its output if it fails.
pub fn sh(args: &[&str]) -> String {
    let out = run(args);
    assert!(
        out.status.success(),
        "{:?} failed: {}{}",
        args,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// A network namespace deleted on drop (with every process inside it).
pub struct Netns {
    pub name: String,
}

impl Netns {
    pub fn new(tag: &str) -> Self {
        let n = COUNTER.fetch_add(1, Ordering::SeqCst);
        let name = format!("l2dp-{}-{n}-{tag}", std::process::id());
        sh(&["ip", "netns", "add", &name]);
        let ns = Self { name };
        ns.exec(&["ip", "link", "set", "lo", "up"]);
        ns.sysctl("net.ipv4.icmp_echo_ignore_broadcasts", "0");
        ns
    }

    pub fn exec(&self, args: &[&str]) -> String {
        let mut v = vec!["ip", "netns", "exec", &self.name];
        v.extend_from_slice(args);
        sh(&v)
    }

    /// Sets a sysctl of this namespace (via /proc, no procps needed).
    pub fn sysctl(&self, key: &str, value: &str) {
        let path = format!("/proc/sys/{}", key.replace('.', "/"));
        self.exec(&["sh", "-c", &format!("echo {value} > {path}")]);
    }

    pub fn try_exec(&self, args: &[&str]) -> Output {
        let mut v = vec!["ip", "netns", "exec", &self.name];
        v.extend_from_slice(args);
        run(&v)
    }

    pub fn spawn(&self, args: &[&str]) -> Proc {
        let child = Command::new("ip")
            .args(["netns", "exec", &self.name])
            .args(args)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn in netns");
        Proc { child }
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        if let Ok(o) = Command::new("ip")
            .args(["netns", "pids", &self.name])
            .output()
        {
            for pid in String::from_utf8_lossy(&o.stdout).split_whitespace() {
                let _ = Command::new("kill").args(["-9", pid]).status();
            }
        }
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .status();
    }
}

/// A child process killed on drop.
pub struct Proc {
    pub child: Child,
}

impl Proc {
    /// Stops the process and returns what it printed.
    pub fn finish(mut self) -> String {
        let _ = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status();
        std::thread::sleep(Duration::from_millis(300));
        let _ = self.child.kill();
        let out = std::mem::replace(&mut self.child, Command::new("true").spawn().expect("true"))
            .wait_with_output()
            .expect("wait");
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        )
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The underlay: one namespace with a bridge that node namespaces plug into.
pub struct Underlay {
    pub ns: Netns,
    count: u32,
}

impl Underlay {
    pub fn new() -> Self {
        let ns = Netns::new("wire");
        ns.sysctl("net.ipv6.conf.all.disable_ipv6", "1");
        ns.sysctl("net.ipv6.conf.default.disable_ipv6", "1");
        ns.exec(&["ip", "link", "add", "br0", "type", "bridge"]);
        ns.exec(&["ip", "link", "set", "br0", "up"]);
        Self { ns, count: 0 }
    }

    /// Plugs `node` in as 10.200.0.N/24 on its `eth0`; returns the address.
    pub fn plug(&mut self, node: &Netns) -> String {
        self.count += 1;
        let hub = format!("u{}", self.count);
        self.ns.exec(&[
            "ip", "link", "add", &hub, "type", "veth", "peer", "name", "eth0", "netns", &node.name,
        ]);
        self.ns
            .exec(&["ip", "link", "set", &hub, "master", "br0", "up"]);
        node.sysctl("net.ipv6.conf.eth0.disable_ipv6", "1");
        let ip = format!("10.200.0.{}", self.count);
        node.exec(&["ip", "addr", "add", &format!("{ip}/24"), "dev", "eth0"]);
        node.exec(&["ip", "link", "set", "eth0", "up"]);
        ip
    }
}

/// A dataplane daemon in its own namespace.
pub struct Node {
    pub ns: Netns,
    pub underlay_ip: String,
    pub socket: PathBuf,
    pub proc: Option<Proc>,
    pub dir: tempfile::TempDir,
    pub port: u16,
    pub public_key: Vec<u8>,
    pub tunnel_ip: String,
    pub extra: Vec<String>,
    /// Run the daemon with `/proc/sys` read-only, as in an unprivileged
    /// Kubernetes container.
    pub ro_proc_sys: bool,
}

impl Node {
    pub async fn start(tag: &str, underlay: &mut Underlay, tunnel_ip: &str) -> Self {
        Self::start_with(tag, underlay, tunnel_ip, |_| Vec::new()).await
    }

    /// Like `start`, with the daemon in a mount namespace where `/proc/sys`
    /// is read-only (no sysctl can be written).
    pub async fn start_ro_proc_sys(tag: &str, underlay: &mut Underlay, tunnel_ip: &str) -> Self {
        let mut node = Self::start(tag, underlay, tunnel_ip).await;
        node.proc.take().map(Proc::finish);
        node.ro_proc_sys = true;
        node.launch().await;
        node
    }

    /// Like `start`, with extra `run` arguments computed from the node's
    /// namespace and directory (before the daemon starts).
    pub async fn start_with(
        tag: &str,
        underlay: &mut Underlay,
        tunnel_ip: &str,
        extra: impl FnOnce(&Node) -> Vec<String>,
    ) -> Self {
        let ns = Netns::new(tag);
        // Only pods speak IPv6; the node itself stays quiet on every link.
        ns.sysctl("net.ipv6.conf.default.disable_ipv6", "1");
        let underlay_ip = underlay.plug(&ns);
        let dir = tempfile::tempdir().unwrap();
        let socket = dir.path().join("dp.sock");
        let mut node = Self {
            ns,
            underlay_ip,
            socket,
            proc: None,
            dir,
            port: 0,
            public_key: vec![],
            tunnel_ip: tunnel_ip.into(),
            extra: Vec::new(),
            ro_proc_sys: false,
        };
        node.extra = extra(&node);
        node.launch().await;
        node
    }

    /// (Re)starts the daemon process and waits until its API answers.
    pub async fn launch(&mut self) {
        let state = self.dir.path().join("state");
        let mut args = Vec::new();
        if self.ro_proc_sys {
            args.extend([
                "unshare",
                "--mount",
                "--propagation",
                "private",
                "sh",
                "-c",
                "mount --bind /proc/sys /proc/sys && mount -o remount,bind,ro /proc/sys && \
                 exec \"$0\" \"$@\"",
            ]);
        }
        args.extend([
            BIN,
            "run",
            "--socket",
            self.socket.to_str().unwrap(),
            "--state-dir",
            state.to_str().unwrap(),
            "--listen-port",
            "0",
        ]);
        args.extend(self.extra.iter().map(String::as_str));
        let proc = self.ns.spawn(&args);
        self.proc = Some(proc);
        let deadline = Instant::now() + Duration::from_secs(15);
        loop {
            if let Ok(mut c) = client::connect(&self.socket).await
                && let Ok(s) = c.get_status(StatusRequest {}).await
            {
                let s = s.into_inner();
                self.port = s.listen_port as u16;
                self.public_key = s.public_key;
                return;
            }
            if Instant::now() > deadline {
                let out = self.proc.take().map(Proc::finish).unwrap_or_default();
                panic!("daemon in {} did not come up: {out}", self.ns.name);
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    pub fn endpoint(&self) -> String {
        format!("{}:{}", self.underlay_ip, self.port)
    }

    pub fn as_peer(&self, group: PeerGroup, vnis: &[u32]) -> PeerSpec {
        PeerSpec {
            public_key: self.public_key.clone(),
            endpoint: self.endpoint(),
            tunnel_ip: self.tunnel_ip.clone(),
            vnis: vnis.to_vec(),
            group: group.into(),
            persistent_keepalive: 0,
            name: self.ns.name.clone(),
        }
    }

    pub async fn apply(&self, networks: &[(&str, u32)], peers: Vec<PeerSpec>) {
        let d = DesiredState {
            revision: 1,
            identity: Some(NodeIdentity {
                node_name: self.ns.name.clone(),
                tunnel_ip: self.tunnel_ip.clone(),
                listen_port: 0,
            }),
            networks: networks
                .iter()
                .map(|(name, vni)| NetworkSpec {
                    name: (*name).into(),
                    vni: *vni,
                    mtu: 0,
                    pod_cidr: String::new(),
                })
                .collect(),
            peers,
        };
        let mut c = client::connect(&self.socket).await.unwrap();
        c.apply(d).await.unwrap();
    }

    pub async fn status(&self) -> NodeStatus {
        let mut c = client::connect(&self.socket).await.unwrap();
        c.get_status(StatusRequest {}).await.unwrap().into_inner()
    }

    /// A pod: a namespace whose eth0 is a veth attached to `network`.
    pub async fn pod(&self, tag: &str, network: &str, addrs: &[&str]) -> Netns {
        let pod = Netns::new(tag);
        let host = format!("v{}", COUNTER.fetch_add(1, Ordering::SeqCst));
        self.ns.exec(&[
            "ip", "link", "add", &host, "type", "veth", "peer", "name", "eth0", "netns", &pod.name,
        ]);
        let mut c = client::connect(&self.socket).await.unwrap();
        let r = c
            .attach_port(AttachPortRequest {
                network: network.into(),
                ifname: host.clone(),
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner();
        pod.exec(&["ip", "link", "set", "eth0", "mtu", &r.mtu.to_string(), "up"]);
        for a in addrs {
            let mut args = vec!["ip", "addr", "add", a, "dev", "eth0"];
            if a.contains(':') {
                args.push("nodad");
            }
            pod.exec(&args);
        }
        pod
    }
}

/// Pings from `pod` until one reply arrives or the deadline passes.
pub fn ping_ok(pod: &Netns, target: &str, within: Duration) -> bool {
    let deadline = Instant::now() + within;
    while Instant::now() < deadline {
        let o = pod.try_exec(&["ping", "-c", "1", "-W", "1", target]);
        if o.status.success() {
            return true;
        }
    }
    false
}

/// Drop counter of a peer (by peer name) for a reason.
pub fn peer_drop(s: &NodeStatus, peer: &str, reason: &str) -> u64 {
    s.peers
        .iter()
        .filter(|p| p.name == peer)
        .flat_map(|p| p.drops.iter())
        .filter(|d| d.reason == reason)
        .map(|d| d.count)
        .sum()
}

/// A TCP listener bound inside `ns` (the socket stays in that namespace
/// after the helper thread that entered it exits).
pub fn listen_in(ns: &Netns, addr: &str) -> std::net::TcpListener {
    let path = format!("/run/netns/{}", ns.name);
    let addr = addr.to_string();
    std::thread::spawn(move || {
        let f = std::fs::File::open(&path).expect("open netns");
        nix::sched::setns(&f, nix::sched::CloneFlags::CLONE_NEWNET).expect("setns");
        std::net::TcpListener::bind(addr).expect("bind in netns")
    })
    .join()
    .expect("listener thread")
}
