//! `l2mesh-cni` invoked as a real binary, per the CNI spec, in real network
//! namespaces. The plugin runs inside a "node" namespace (like a runtime on a
//! host) and puts veths into "pod" namespaces; a test-local `Dataplane` gRPC
//! server really plugs the host ends into a bridge the test made in the node
//! namespace. The plugin itself runs with an empty `PATH`: it uses netlink,
//! no tools. The harness needs root and `ip`; skips otherwise unless `CI` is set.
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

fn can_run() -> bool {
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
fn ip_path() -> Option<PathBuf> {
    std::env::var("PATH")
        .unwrap_or_default()
        .split(':')
        .map(|d| Path::new(d).join("ip"))
        .find(|p| p.is_file())
}

fn sh(args: &[&str]) {
    let out = Command::new(args[0]).args(&args[1..]).output().unwrap();
    assert!(
        out.status.success(),
        "{args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A network namespace deleted on drop, even when the test panics.
struct Netns(String);

impl Netns {
    fn new(role: &str) -> Self {
        let name = format!(
            "l2cni-{}-{}-{role}",
            std::process::id(),
            COUNTER.fetch_add(1, Ordering::SeqCst)
        );
        sh(&["ip", "netns", "add", &name]);
        sh(&["ip", "-n", &name, "link", "set", "lo", "up"]);
        Self(name)
    }
    fn path(&self) -> String {
        format!("/run/netns/{}", self.0)
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["netns", "del", &self.0]).status();
    }
}

#[derive(Clone)]
struct Net {
    bridge: String,
    mtu: u32,
    pod_cidr: String,
    vni: u32,
}

/// The harness dataplane: attaches ports to a real bridge in the node netns.
#[derive(Clone)]
struct FakeDataplane {
    node: String,
    nets: BTreeMap<String, Net>,
    ports: Arc<Mutex<BTreeMap<String, BTreeSet<String>>>>,
    /// ifname → (pod namespace, pod name) as AttachPort said.
    pods: Pods,
}

type Pods = Arc<Mutex<BTreeMap<String, (String, String)>>>;

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

struct Lab {
    node: Netns,
    dir: tempfile::TempDir,
    socket: PathBuf,
    ports: Arc<Mutex<BTreeMap<String, BTreeSet<String>>>>,
    pods: Pods,
    _shutdown: tokio::sync::oneshot::Sender<()>,
}

const BRIDGE: &str = "br-blue";

async fn lab(mtu: u32) -> Lab {
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

struct Outcome {
    ok: bool,
    json: Value,
}

impl Lab {
    fn conf(&self, ipam: Value) -> Value {
        json!({
            "cniVersion": "1.0.0",
            "name": "blue",
            "type": "l2mesh-cni",
            "dataplaneSocket": self.socket,
            "ipam": ipam,
        })
    }

    fn l2mesh_ipam(&self) -> Value {
        json!({"type": "l2mesh", "subnet": "10.77.0.0/16", "dataDir": self.dir.path().join("ipam")})
    }

    async fn cni(&self, command: &str, pod: &str, ifname: &str, conf: &Value) -> Outcome {
        self.cni_env(command, pod, ifname, conf, &[]).await
    }

    async fn cni_env(
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

    fn host_links(&self) -> String {
        let out = Command::new("ip")
            .args(["-n", &self.node.0, "-o", "link"])
            .output()
            .unwrap();
        String::from_utf8_lossy(&out.stdout).into_owned()
    }
}

fn pod_ip(result: &Value) -> String {
    result["ips"][0]["address"].as_str().unwrap().to_owned()
}

fn ping(from: &Netns, to: &str) -> bool {
    Command::new("ip")
        .args(["netns", "exec", &from.0, "ping", "-c", "1", "-W", "2", to])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn add_check_del_with_l2mesh_ipam_and_pods_talk_over_the_bridge() {
    if !can_run() {
        return;
    }
    let lab = lab(1400).await;
    let (pod1, pod2) = (Netns::new("pod1"), Netns::new("pod2"));
    let mut conf = lab.conf(lab.l2mesh_ipam());
    conf["runtimeConfig"] = json!({"mac": "02:12:34:56:78:9a"});
    // What Multus passes: the pod's identity among keys the plugin ignores.
    let multus_args = "IgnoreUnknown=true;K8S_POD_NAMESPACE=team;K8S_POD_NAME=web-0;\
                       K8S_POD_INFRA_CONTAINER_ID=abc123;K8S_POD_UID=u-1";
    let a = lab
        .cni_env(
            "ADD",
            &pod1.path(),
            "net1",
            &conf,
            &[("CNI_ARGS", multus_args)],
        )
        .await;
    assert!(a.ok, "{}", a.json);
    assert_eq!(a.json["cniVersion"], "1.0.0");
    assert_eq!(a.json["interfaces"][1]["name"], "net1");
    assert_eq!(a.json["interfaces"][1]["mac"], "02:12:34:56:78:9a");
    assert_eq!(
        a.json["interfaces"][1]["mtu"], 1400,
        "MTU comes from the dataplane"
    );
    assert_eq!(a.json["interfaces"][1]["sandbox"], pod1.path());
    assert_eq!(a.json["ips"][0]["interface"], 1);
    let ip1 = pod_ip(&a.json);
    assert!(ip1.starts_with("10.77.1.") && ip1.ends_with("/16"), "{ip1}");

    let b = lab
        .cni("ADD", &pod2.path(), "net1", &lab.conf(lab.l2mesh_ipam()))
        .await;
    assert!(b.ok, "{}", b.json);
    let ip2 = pod_ip(&b.json);
    assert_ne!(ip1, ip2);
    let host1 = a.json["interfaces"][0]["name"].as_str().unwrap().to_owned();
    let host2 = b.json["interfaces"][0]["name"].as_str().unwrap().to_owned();
    assert!(lab.ports.lock().unwrap()["blue"].contains(&host1));
    assert_eq!(
        lab.pods.lock().unwrap()[&host1],
        ("team".to_owned(), "web-0".to_owned()),
        "AttachPort names the pod from CNI_ARGS"
    );
    assert_eq!(
        lab.pods.lock().unwrap()[&host2],
        (String::new(), String::new()),
        "no K8S_POD_* args, no pod"
    );
    assert!(lab.host_links().contains(&format!("master {BRIDGE}")));
    assert!(
        ping(&pod1, ip2.split('/').next().unwrap()),
        "pods on one bridge must reach each other"
    );

    let mut check = conf.clone();
    check["prevResult"] = a.json.clone();
    let c = lab.cni("CHECK", &pod1.path(), "net1", &check).await;
    assert!(c.ok, "{}", c.json);
    // CHECK notices an interface that no longer matches the result.
    sh(&["ip", "-n", &pod1.0, "link", "set", "net1", "mtu", "1300"]);
    let c = lab.cni("CHECK", &pod1.path(), "net1", &check).await;
    assert!(!c.ok);
    assert_eq!(c.json["code"], 101, "{}", c.json);
    assert!(
        c.json["msg"].as_str().unwrap().contains("MTU 1300"),
        "{}",
        c.json
    );
    sh(&["ip", "-n", &pod1.0, "link", "set", "net1", "mtu", "1400"]);
    sh(&["ip", "-n", &pod1.0, "addr", "flush", "dev", "net1"]);
    let c = lab.cni("CHECK", &pod1.path(), "net1", &check).await;
    assert_eq!(c.json["code"], 101, "{}", c.json);
    assert!(
        c.json["msg"].as_str().unwrap().contains("missing"),
        "{}",
        c.json
    );

    let d = lab.cni("DEL", &pod1.path(), "net1", &conf).await;
    assert!(d.ok, "{}", d.json);
    assert!(!lab.host_links().contains(&host1));
    assert!(!lab.ports.lock().unwrap()["blue"].contains(&host1));
    let again = lab.cni("DEL", &pod1.path(), "net1", &conf).await;
    assert!(again.ok, "DEL is idempotent: {}", again.json);
    let c = lab.cni("CHECK", &pod1.path(), "net1", &check).await;
    assert!(!c.ok);
    assert_eq!(c.json["code"], 101, "{}", c.json);

    // The released address is not handed out again right away.
    let pod3 = Netns::new("pod3");
    let e = lab
        .cni("ADD", &pod3.path(), "net1", &lab.conf(lab.l2mesh_ipam()))
        .await;
    assert!(e.ok, "{}", e.json);
    assert_ne!(pod_ip(&e.json), ip1);
    assert_ne!(pod_ip(&e.json), ip2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn static_addresses_from_runtime_config() {
    if !can_run() {
        return;
    }
    let lab = lab(1390).await;
    let (pod1, pod2) = (Netns::new("s1"), Netns::new("s2"));
    let mut conf = lab.conf(lab.l2mesh_ipam());
    conf["runtimeConfig"] = json!({"ips": ["10.77.9.9/16"]});
    let a = lab.cni("ADD", &pod1.path(), "eth7", &conf).await;
    assert!(a.ok, "{}", a.json);
    assert_eq!(pod_ip(&a.json), "10.77.9.9/16");
    let b = lab.cni("ADD", &pod2.path(), "eth7", &conf).await;
    assert!(!b.ok, "the same static address twice must fail");
    assert_eq!(b.json["code"], 100, "{}", b.json);
    assert!(b.json["msg"].as_str().unwrap().contains("in use"));
    assert_eq!(
        lab.host_links().matches("master").count(),
        1,
        "failed ADD leaves nothing behind"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn delegates_ipam_to_host_local() {
    if !can_run() {
        return;
    }
    let host_local = Path::new("/usr/lib/cni/host-local");
    if !host_local.exists() {
        assert!(
            std::env::var_os("CI").is_none(),
            "{} is missing in CI",
            host_local.display()
        );
        eprintln!(
            "skipping: {} is missing (apt install containernetworking-plugins)",
            host_local.display()
        );
        return;
    }
    let lab = lab(1390).await;
    let pod = Netns::new("hl");
    let leases = lab.dir.path().join("host-local");
    let conf = lab.conf(json!({
        "type": "host-local",
        "ranges": [[{"subnet": "10.78.0.0/24"}], [{"subnet": "fd00:78::/64"}]],
        "routes": [{"dst": "10.79.0.0/16"}, {"dst": "fd00:79::/48"}],
        "dataDir": leases,
    }));
    let a = lab.cni("ADD", &pod.path(), "net1", &conf).await;
    assert!(a.ok, "{}", a.json);
    let ip = pod_ip(&a.json);
    assert!(ip.starts_with("10.78.0.") && ip.ends_with("/24"), "{ip}");
    assert_eq!(a.json["ips"][0]["interface"], 1);
    let ip6 = a.json["ips"][1]["address"].as_str().unwrap();
    assert!(
        ip6.starts_with("fd00:78::") && ip6.ends_with("/64"),
        "{ip6}"
    );
    // Both families' addresses and routes are in the pod.
    let show = |args: &[&str]| {
        let out = Command::new("ip")
            .args(["-n", &pod.0])
            .args(args)
            .output()
            .unwrap();
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    let addrs = show(&["addr", "show", "dev", "net1"]);
    assert!(addrs.contains(&ip) && addrs.contains(ip6), "{addrs}");
    let routes = show(&["route"]) + &show(&["-6", "route"]);
    assert!(
        routes.contains("10.79.0.0/16 dev net1") && routes.contains("fd00:79::/48 dev net1"),
        "{routes}"
    );
    let lease = leases.join("blue").join(ip.split('/').next().unwrap());
    assert!(lease.exists(), "host-local wrote its lease");
    let mut check = conf.clone();
    check["prevResult"] = a.json.clone();
    let c = lab.cni("CHECK", &pod.path(), "net1", &check).await;
    assert!(c.ok, "{}", c.json);
    let d = lab.cni("DEL", &pod.path(), "net1", &conf).await;
    assert!(d.ok, "{}", d.json);
    assert!(!lease.exists(), "host-local released its lease");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_configs_and_environments_get_cni_errors() {
    if !can_run() {
        return;
    }
    let lab = lab(1390).await;
    let pod = Netns::new("bad");
    let good = lab.conf(lab.l2mesh_ipam());

    let v = lab
        .cni("VERSION", "", "", &json!({"cniVersion": "1.0.0"}))
        .await;
    assert!(v.ok);
    assert!(
        v.json["supportedVersions"]
            .as_array()
            .unwrap()
            .contains(&json!("1.0.0"))
    );

    let mut no_name = good.clone();
    no_name.as_object_mut().unwrap().remove("name");
    let r = lab.cni("ADD", &pod.path(), "net1", &no_name).await;
    assert!(!r.ok);
    assert_eq!(r.json["code"], 7, "{}", r.json);
    assert!(r.json["msg"].as_str().unwrap().contains("name"));

    let mut unknown = good.clone();
    unknown["name"] = json!("purple");
    let r = lab.cni("ADD", &pod.path(), "net1", &unknown).await;
    assert!(!r.ok);
    assert_eq!(r.json["code"], 7, "{}", r.json);
    assert!(
        r.json["msg"].as_str().unwrap().contains("not known"),
        "{}",
        r.json
    );

    let r = lab
        .cni("ADD", "/run/netns/l2cni-does-not-exist", "net1", &good)
        .await;
    assert!(!r.ok);
    assert_eq!(r.json["code"], 3, "{}", r.json);

    let r = lab.cni("ADD", &pod.path(), "", &good).await;
    assert_eq!(r.json["code"], 4, "{}", r.json);

    let not_netns = lab.dir.path().join("not-a-netns");
    std::fs::write(&not_netns, "").unwrap();
    let r = lab
        .cni("ADD", not_netns.to_str().unwrap(), "net1", &good)
        .await;
    assert_eq!(r.json["code"], 4, "{}", r.json);
    assert!(
        r.json["msg"]
            .as_str()
            .unwrap()
            .contains("not a network namespace"),
        "{}",
        r.json
    );

    let mut no_dp = good.clone();
    no_dp["dataplaneSocket"] = json!(lab.dir.path().join("nope.sock"));
    let r = lab.cni("ADD", &pod.path(), "net1", &no_dp).await;
    assert_eq!(r.json["code"], 11, "{}", r.json);

    let r = lab
        .cni_env("ADD", &pod.path(), "net1", &json!("not an object"), &[])
        .await;
    assert_eq!(r.json["code"], 6, "{}", r.json);

    let mut bad_mac = good.clone();
    bad_mac["runtimeConfig"] = json!({"mac": "zz:00"});
    let r = lab.cni("ADD", &pod.path(), "net1", &bad_mac).await;
    assert_eq!(r.json["code"], 7, "{}", r.json);

    let mut no_prev = good.clone();
    no_prev.as_object_mut().unwrap().remove("prevResult");
    let r = lab.cni("CHECK", &pod.path(), "net1", &no_prev).await;
    assert_eq!(r.json["code"], 7, "{}", r.json);

    assert!(
        !lab.host_links().contains("master"),
        "no failed ADD left an interface behind"
    );
    let pod_links = Command::new("ip")
        .args(["-n", &pod.0, "-o", "link"])
        .output()
        .unwrap();
    assert!(!String::from_utf8_lossy(&pod_links.stdout).contains("net1"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_adds_never_share_an_address() {
    if !can_run() {
        return;
    }
    let lab = lab(1390).await;
    let pods: Vec<Netns> = (0..6).map(|i| Netns::new(&format!("c{i}"))).collect();
    let conf = lab.conf(lab.l2mesh_ipam());
    let paths: Vec<String> = pods.iter().map(Netns::path).collect();
    let results =
        futures::future::join_all(paths.iter().map(|p| lab.cni("ADD", p, "net1", &conf))).await;
    let mut ips = BTreeSet::new();
    for r in &results {
        assert!(r.ok, "{}", r.json);
        assert!(
            ips.insert(pod_ip(&r.json)),
            "address handed out twice: {ips:?}"
        );
    }
    assert_eq!(lab.ports.lock().unwrap()["blue"].len(), 6);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ipv6_l2mesh_ipam_and_static_addresses() {
    if !can_run() {
        return;
    }
    let lab = lab(1390).await;
    let (pod1, pod2) = (Netns::new("v6a"), Netns::new("v6b"));
    let mut conf = lab.conf(json!({
        "type": "l2mesh",
        "subnet": "fd00:77::/48",
        "dataDir": lab.dir.path().join("ipam"),
    }));
    conf["name"] = json!("six");
    let a = lab.cni("ADD", &pod1.path(), "net1", &conf).await;
    assert!(a.ok, "{}", a.json);
    let ip1 = pod_ip(&a.json);
    assert_eq!(
        ip1, "fd00:77:0:1::1/48",
        "first of the node's slice, range prefix"
    );
    let mut fixed = conf.clone();
    fixed["runtimeConfig"] = json!({"ips": ["fd00:77:0:9::9"]});
    let b = lab.cni("ADD", &pod2.path(), "net1", &fixed).await;
    assert!(b.ok, "{}", b.json);
    assert_eq!(pod_ip(&b.json), "fd00:77:0:9::9/48");
    assert!(
        ping(&pod1, "fd00:77:0:9::9"),
        "IPv6 pods on one bridge must reach each other"
    );
    let mut check = conf.clone();
    check["prevResult"] = a.json.clone();
    let c = lab.cni("CHECK", &pod1.path(), "net1", &check).await;
    assert!(c.ok, "{}", c.json);
    // A static address of the other family is refused and leaves nothing.
    let pod3 = Netns::new("v6c");
    let mut wrong = conf.clone();
    wrong["runtimeConfig"] = json!({"ips": ["10.77.0.9/16"]});
    let r = lab.cni("ADD", &pod3.path(), "net1", &wrong).await;
    assert!(!r.ok);
    assert_eq!(r.json["code"], 100, "{}", r.json);
    assert!(
        r.json["msg"].as_str().unwrap().contains("outside"),
        "{}",
        r.json
    );
    let d = lab.cni("DEL", &pod1.path(), "net1", &conf).await;
    assert!(d.ok, "{}", d.json);
    let lease = lab.dir.path().join("ipam/six/fd00:77:0:1::1");
    assert!(!lease.exists(), "DEL released the IPv6 lease");
}
