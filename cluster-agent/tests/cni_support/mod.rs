//! The harness of the CNI tests: network namespaces deleted on drop, a
//! test-local `Dataplane` gRPC server that really plugs host ends into a
//! bridge in the "node" namespace, and a runner for the real `l2mesh-cni`.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use l2mesh_proto::node::dataplane_server::{Dataplane, DataplaneServer};
use l2mesh_proto::node::{
    ApplyResult, AttachPortRequest, DesiredState, DetachPortRequest, NetworkStatus, NodeStatus,
    PortResult, PortStatus, RotateKeyRequest, RotateKeyResult, StatusRequest,
};
use serde_json::{Value, json};
use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use tonic::{Request, Response, Status};

static COUNTER: AtomicUsize = AtomicUsize::new(0);

pub fn can_run() -> bool {
    let root = nix::unistd::geteuid().is_root();
    let tools = ip_path().is_some();
    if root && tools {
        return true;
    }
    let why = if root {
        "ip (iproute2) is missing"
    } else {
        "not root"
    };
    assert!(
        std::env::var_os("CI").is_none(),
        "CNI namespace tests cannot run in CI: {why}"
    );
    eprintln!("skipping CNI namespace test: {why}");
    false
}

/// Absolute path of `ip`, so the plugin's own `PATH` can be empty.
pub fn ip_path() -> Option<PathBuf> {
    std::env::var("PATH")
        .unwrap_or_default()
        .split(':')
        .map(|d| Path::new(d).join("ip"))
        .find(|p| p.is_file())
}

pub fn sh(args: &[&str]) {
    let out = Command::new(args[0]).args(&args[1..]).output().unwrap();
    assert!(
        out.status.success(),
        "{args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A network namespace deleted on drop, even when the test panics.
pub struct Netns(pub String);

impl Netns {
    pub fn new(role: &str) -> Self {
        let name = format!(
            "l2cni-{}-{}-{role}",
            std::process::id(),
            COUNTER.fetch_add(1, Ordering::SeqCst)
        );
        sh(&["ip", "netns", "add", &name]);
        sh(&["ip", "-n", &name, "link", "set", "lo", "up"]);
        Self(name)
    }
    pub fn path(&self) -> String {
        format!("/run/netns/{}", self.0)
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["netns", "del", &self.0]).status();
    }
}

#[derive(Clone)]
pub struct Net {
    pub bridge: String,
    pub mtu: u32,
    pub pod_cidr: String,
    pub vni: u32,
}

/// The harness dataplane: attaches ports to a real bridge in the node netns.
#[derive(Clone)]
pub struct FakeDataplane {
    pub node: String,
    pub nets: BTreeMap<String, Net>,
    pub ports: Arc<Mutex<BTreeMap<String, BTreeSet<String>>>>,
    /// ifname → (pod namespace, pod name) as AttachPort said.
    pub pods: Pods,
}

pub type Pods = Arc<Mutex<BTreeMap<String, (String, String)>>>;

#[tonic::async_trait]
impl Dataplane for FakeDataplane {
    async fn apply(&self, _: Request<DesiredState>) -> Result<Response<ApplyResult>, Status> {
        Err(Status::unimplemented("harness"))
    }
    async fn get_status(&self, _: Request<StatusRequest>) -> Result<Response<NodeStatus>, Status> {
        let ports = self.ports.lock().unwrap();
        let pods = self.pods.lock().unwrap();
        Ok(Response::new(NodeStatus {
            node_name: self.node.clone(),
            networks: self
                .nets
                .iter()
                .map(|(name, n)| NetworkStatus {
                    name: name.clone(),
                    vni: n.vni,
                    mtu: n.mtu,
                    bridge: n.bridge.clone(),
                    ports: ports.get(name).into_iter().flatten().cloned().collect(),
                    port_status: ports
                        .get(name)
                        .into_iter()
                        .flatten()
                        .map(|p| {
                            let (ns, pod) = pods.get(p).cloned().unwrap_or_default();
                            PortStatus {
                                ifname: p.clone(),
                                pod_namespace: ns,
                                pod_name: pod,
                            }
                        })
                        .collect(),
                    pod_cidr: n.pod_cidr.clone(),
                    ..NetworkStatus::default()
                })
                .collect(),
            ..NodeStatus::default()
        }))
    }
    async fn attach_port(
        &self,
        req: Request<AttachPortRequest>,
    ) -> Result<Response<PortResult>, Status> {
        let req = req.into_inner();
        let net = self
            .nets
            .get(&req.network)
            .ok_or_else(|| Status::not_found(format!("no network {}", req.network)))?;
        let out = Command::new("ip")
            .args([
                "-n",
                &self.node,
                "link",
                "set",
                "dev",
                &req.ifname,
                "master",
                &net.bridge,
            ])
            .output()
            .map_err(|e| Status::internal(e.to_string()))?;
        if !out.status.success() {
            return Err(Status::invalid_argument(
                String::from_utf8_lossy(&out.stderr).to_string(),
            ));
        }
        self.pods.lock().unwrap().insert(
            req.ifname.clone(),
            (req.pod_namespace.clone(), req.pod_name.clone()),
        );
        self.ports
            .lock()
            .unwrap()
            .entry(req.network.clone())
            .or_default()
            .insert(req.ifname);
        Ok(Response::new(PortResult {
            bridge: net.bridge.clone(),
            mtu: net.mtu,
            pod_cidr: net.pod_cidr.clone(),
            vni: net.vni,
        }))
    }
    async fn detach_port(
        &self,
        req: Request<DetachPortRequest>,
    ) -> Result<Response<PortResult>, Status> {
        let req = req.into_inner();
        if let Some(set) = self.ports.lock().unwrap().get_mut(&req.network) {
            set.remove(&req.ifname);
        }
        Ok(Response::new(PortResult::default()))
    }
    async fn rotate_key(
        &self,
        _: Request<RotateKeyRequest>,
    ) -> Result<Response<RotateKeyResult>, Status> {
        Err(Status::unimplemented("harness"))
    }
}

pub struct Lab {
    pub node: Netns,
    pub dir: tempfile::TempDir,
    pub socket: PathBuf,
    pub ports: Arc<Mutex<BTreeMap<String, BTreeSet<String>>>>,
    pub pods: Pods,
    _shutdown: tokio::sync::oneshot::Sender<()>,
}

pub const BRIDGE: &str = "br-blue";

pub async fn lab(mtu: u32) -> Lab {
    let node = Netns::new("node");
    sh(&["ip", "-n", &node.0, "link", "add", BRIDGE, "type", "bridge"]);
    sh(&[
        "ip",
        "-n",
        &node.0,
        "link",
        "set",
        BRIDGE,
        "mtu",
        &mtu.to_string(),
        "up",
    ]);
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("dataplane.sock");
    let ports = Arc::new(Mutex::new(BTreeMap::new()));
    let pods: Pods = Arc::default();
    let dp = FakeDataplane {
        node: node.0.clone(),
        nets: [
            (
                "blue".to_owned(),
                Net {
                    bridge: BRIDGE.into(),
                    mtu,
                    pod_cidr: "10.77.1.0/24".into(),
                    vni: 5,
                },
            ),
            (
                "six".to_owned(),
                Net {
                    bridge: BRIDGE.into(),
                    mtu,
                    pod_cidr: "fd00:77:0:1::/64".into(),
                    vni: 6,
                },
            ),
        ]
        .into(),
        ports: ports.clone(),
        pods: pods.clone(),
    };
    let listener = tokio::net::UnixListener::bind(&socket).unwrap();
    let (tx, rx) = tokio::sync::oneshot::channel::<()>();
    tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(DataplaneServer::new(dp))
            .serve_with_incoming_shutdown(
                tokio_stream::wrappers::UnixListenerStream::new(listener),
                async {
                    let _ = rx.await;
                },
            ),
    );
    Lab {
        node,
        dir,
        socket,
        ports,
        pods,
        _shutdown: tx,
    }
}

pub struct Outcome {
    pub ok: bool,
    pub json: Value,
}

impl Lab {
    pub fn conf(&self, ipam: Value) -> Value {
        json!({
            "cniVersion": "1.0.0",
            "name": "blue",
            "type": "l2mesh-cni",
            "dataplaneSocket": self.socket,
            "ipam": ipam,
        })
    }

    pub fn l2mesh_ipam(&self) -> Value {
        json!({"type": "l2mesh", "subnet": "10.77.0.0/16", "dataDir": self.dir.path().join("ipam")})
    }

    pub async fn cni(&self, command: &str, pod: &str, ifname: &str, conf: &Value) -> Outcome {
        self.cni_env(command, pod, ifname, conf, &[]).await
    }

    pub async fn cni_env(
        &self,
        command: &str,
        netns: &str,
        ifname: &str,
        conf: &Value,
        extra: &[(&str, &str)],
    ) -> Outcome {
        let mut cmd = tokio::process::Command::new(ip_path().unwrap());
        cmd.args([
            "netns",
            "exec",
            &self.node.0,
            env!("CARGO_BIN_EXE_l2mesh-cni"),
        ])
        .env_clear()
        // No tools for the plugin: everything it does must be netlink.
        .env("PATH", "/nonexistent/l2mesh-cni-test")
        .env("CNI_COMMAND", command)
        .env(
            "CNI_CONTAINERID",
            format!(
                "ctr-{}-{ifname}",
                netns.rsplit('/').next().unwrap_or_default()
            ),
        )
        .env("CNI_NETNS", netns)
        .env("CNI_IFNAME", ifname)
        .env("CNI_PATH", "/usr/lib/cni:/opt/cni/bin")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
        for (k, v) in extra {
            cmd.env(k, v);
        }
        let mut child = cmd.spawn().unwrap();
        {
            use tokio::io::AsyncWriteExt as _;
            let mut stdin = child.stdin.take().unwrap();
            stdin.write_all(conf.to_string().as_bytes()).await.unwrap();
        }
        let out = child.wait_with_output().await.unwrap();
        let text = String::from_utf8_lossy(&out.stdout);
        let json = if text.trim().is_empty() {
            Value::Null
        } else {
            serde_json::from_str(&text).unwrap_or_else(|e| {
                panic!(
                    "stdout is not JSON ({e}): {text}\nstderr: {}",
                    String::from_utf8_lossy(&out.stderr)
                )
            })
        };
        Outcome {
            ok: out.status.success(),
            json,
        }
    }

    pub fn host_links(&self) -> String {
        let out = Command::new("ip")
            .args(["-n", &self.node.0, "-o", "link"])
            .output()
            .unwrap();
        String::from_utf8_lossy(&out.stdout).into_owned()
    }
}

pub fn pod_ip(result: &Value) -> String {
    result["ips"][0]["address"].as_str().unwrap().to_owned()
}

pub fn ping(from: &Netns, to: &str) -> bool {
    Command::new("ip")
        .args(["netns", "exec", &from.0, "ping", "-c", "1", "-W", "2", to])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}
