//! l2mesh from the image: the broker, one standalone agent per cluster (on
//! its gateway) and one dataplane per node run as podman containers with
//! the privileges of their manifests; every node gets `l2mesh-cni` from the
//! image by the dataplane DaemonSet's own init container, and pods attach
//! through that installed copy, as the kubelet (through Multus) would call it.

use std::collections::BTreeMap;
use std::net::Ipv4Addr;
use std::os::unix::fs::PermissionsExt as _;
use std::path::PathBuf;
use std::time::Duration;

use serde_json::Value;

use super::privileges::{self, Mount, Privileges, VolumeSource};
use super::{BuiltImage, ContainerGuard, Podman};
use crate::binaries::workspace_root;
use crate::cni::CniCall;
use crate::lab::Lab;
use crate::mesh::{
    BROKER_PORT, NETWORK, NETWORK_CIDR, POD_IF, WG_PORT, network_manifest, nodes_manifest,
    wait_for_node_sync,
};
use crate::netns::Netns;
use crate::plan::Segment;
use crate::process::{ProcId, ProcSpec};
use crate::{Error, Result};

/// The uid the image and the broker/agent manifests run as.
pub const NONROOT: u32 = 65532;

/// A workload of `deploy/FILE` by kind and name, as JSON.
pub fn workload(file: &str, kind: &str, name: &str) -> Result<Value> {
    let path = workspace_root().join("deploy").join(file);
    let text = std::fs::read_to_string(&path).map_err(|e| Error::io(&path, e))?;
    for doc in text.split("\n---") {
        let v: Value = serde_yaml::from_str(doc)
            .map_err(|e| Error::Check(format!("{}: {e}", path.display())))?;
        if v["kind"] == kind && v["metadata"]["name"] == name {
            return Ok(v);
        }
    }
    Err(Error::Check(format!(
        "no {kind} {name} in {}",
        path.display()
    )))
}

/// Literal environment values of a container in a workload (those the
/// kubelet would pass unchanged: no `valueFrom`, no `$(VAR)` references).
pub fn literal_env(doc: &Value, container: &str) -> Vec<(String, String)> {
    let pod = &doc["spec"]["template"]["spec"];
    pod["containers"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|c| c["name"] == container)
        .flat_map(|c| c["env"].as_array().into_iter().flatten())
        .filter_map(|e| {
            let v = e["value"].as_str()?;
            (!v.contains("$(")).then(|| {
                (
                    e["name"].as_str().unwrap_or_default().to_owned(),
                    v.to_owned(),
                )
            })
        })
        .collect()
}

/// The `readinessProbe.httpGet` of a container: path and port number
/// (a named port is looked up in the container's ports).
pub fn readiness_http(doc: &Value, container: &str) -> Result<(String, u16)> {
    let pod = &doc["spec"]["template"]["spec"];
    let c = pod["containers"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|c| c["name"] == container)
        .ok_or_else(|| Error::Check(format!("no container {container}")))?;
    let get = &c["readinessProbe"]["httpGet"];
    let path = get["path"]
        .as_str()
        .ok_or_else(|| Error::Check(format!("{container}: no readinessProbe.httpGet")))?;
    let port = match &get["port"] {
        Value::Number(n) => n.as_u64(),
        Value::String(name) => c["ports"]
            .as_array()
            .into_iter()
            .flatten()
            .find(|p| p["name"] == name.as_str())
            .and_then(|p| p["containerPort"].as_u64()),
        _ => None,
    }
    .and_then(|p| u16::try_from(p).ok())
    .ok_or_else(|| Error::Check(format!("{container}: readiness port not found")))?;
    Ok((path.to_owned(), port))
}

/// A node of the container mesh.
#[derive(Debug, Clone)]
pub struct ContainerNode {
    pub role: String,
    pub cluster: usize,
    /// Host directory mounted at the dataplane's /run/l2mesh.
    pub run_dir: PathBuf,
    /// The host's CNI bin dir, filled by the install-cni init container.
    pub cni_bin: PathBuf,
    pub proc: ProcId,
}

/// A pod attached through the installed plugin.
#[derive(Debug, Clone)]
pub struct ContainerPod {
    pub role: String,
    pub node: String,
    pub v4: Ipv4Addr,
}

/// Starts containers of one image and removes them on drop.
#[derive(Debug)]
struct Runner {
    image: String,
    podman: Podman,
    guard: ContainerGuard,
    /// Flags each role's container ran with.
    flags: BTreeMap<String, Vec<String>>,
}

/// The running container mesh; its containers are removed on drop.
#[derive(Debug)]
pub struct ContainerMesh {
    pub broker: ProcId,
    pub agents: Vec<ProcId>,
    pub nodes: Vec<ContainerNode>,
    pub pods: Vec<ContainerPod>,
    broker_container: String,
    runner: Runner,
}

fn dir_for(lab: &Lab, rel: &str, owner: Option<u32>) -> Result<PathBuf> {
    let p = lab.log_dir().join(rel);
    std::fs::create_dir_all(&p).map_err(|e| Error::io(&p, e))?;
    if let Some(uid) = owner {
        nix::unistd::chown(&p, Some(uid.into()), Some(uid.into()))
            .map_err(|e| Error::io(&p, e.into()))?;
    }
    Ok(p)
}

fn container_name(lab: &Lab, role: &str) -> String {
    format!("{}{role}", lab.topology().prefix())
}

impl Runner {
    /// `podman run` of `command` in `ns` as a daemon process of the lab
    /// (its log is the container's output).
    #[allow(clippy::too_many_arguments)]
    fn run_container(
        &mut self,
        lab: &Lab,
        role: &str,
        ns: &Netns,
        p: &Privileges,
        host_dir: &dyn Fn(&Mount) -> Option<PathBuf>,
        env: &[(String, String)],
        args: &[String],
        daemon: bool,
    ) -> Result<ProcId> {
        let name = container_name(lab, role);
        let flags = p.podman_flags(host_dir)?;
        self.flags.insert(role.to_owned(), flags.clone());
        self.guard.track(&name);
        let (ck, cv) = self.podman.env();
        // `ip netns exec` (how the harness enters a namespace) mounts a
        // fresh /sys without the cgroup hierarchies runc needs: podman goes
        // back to this process's mount namespace; `--network` picks the netns.
        let mut spec = ProcSpec::new(role, ns, "nsenter")
            .arg(format!("--mount=/proc/{}/ns/mnt", std::process::id()))
            .args(["--", "podman"])
            .args(self.podman.global_args())
            .args([
                "run".to_owned(),
                "--rm".to_owned(),
                "--pull=never".to_owned(),
                format!("--name={name}"),
                format!("--network=ns:{}", ns.path().display()),
            ])
            .args(flags)
            .args(env.iter().map(|(k, v)| format!("--env={k}={v}")))
            .arg(&self.image)
            .args(p.command.iter().cloned())
            .args(args.iter().cloned())
            .env(ck, cv);
        if daemon {
            spec = spec.daemon();
        }
        lab.procs().spawn(spec)
    }
}

impl ContainerMesh {
    /// `podman run` flags each role's container got from its manifest.
    pub fn flags(&self) -> &BTreeMap<String, Vec<String>> {
        &self.runner.flags
    }

    /// The broker's admin CLI inside its container (`kubectl exec` in a
    /// cluster), with the credential on the broker's volume.
    pub fn admin(&self, args: &[&str]) -> Result<String> {
        let mut all = vec!["exec", self.broker_container.as_str(), "l2mesh-broker"];
        all.extend(args);
        self.runner.podman.run(all)
    }

    /// `podman exec` of a command in the container of `role` (e.g. `c1-gw-dp`).
    pub fn exec(&self, lab: &Lab, role: &str, command: &[&str]) -> Result<String> {
        let name = container_name(lab, role);
        let mut all = vec!["exec", name.as_str()];
        all.extend(command);
        self.runner.podman.run(all)
    }

    /// Starts the whole mesh and attaches every pod of the lab.
    pub fn start(lab: &Lab, image: &BuiltImage, progress: &mut dyn FnMut(&str)) -> Result<Self> {
        let topo = lab.topology();
        let plan = topo.plan().clone();
        let mut runner = Runner {
            image: image.tag.clone(),
            podman: image.podman.clone(),
            guard: ContainerGuard::new(&image.podman),
            flags: BTreeMap::new(),
        };

        // The broker, as deploy/broker.yaml runs it, advertising its WAN address.
        progress("broker container");
        let broker_doc = workload("broker.yaml", "Deployment", "l2mesh-broker")?;
        let broker_p = privileges::of_container(&broker_doc, "broker")?;
        let wan = plan
            .broker
            .addr_on(Segment::Wan)
            .unwrap_or(Ipv4Addr::UNSPECIFIED);
        let broker_data = dir_for(lab, "broker-data", Some(NONROOT))?;
        let args: Vec<String> = broker_p
            .args
            .iter()
            .map(|a| {
                if a.starts_with("--advertise=") {
                    format!("--advertise={wan}:{BROKER_PORT}")
                } else {
                    a.clone()
                }
            })
            .collect();
        let only = |dir: PathBuf| move |_: &Mount| Some(dir.clone());
        let broker_p2 = Privileges {
            args: Vec::new(),
            ..broker_p.clone()
        };
        let broker = runner.run_container(
            lab,
            "broker",
            topo.broker()?,
            &broker_p2,
            &only(broker_data),
            &literal_env(&broker_doc, "broker"),
            &args,
            true,
        )?;
        lab.procs().wait_for(
            "the broker container serves",
            Duration::from_secs(60),
            || {
                lab.procs()
                    .log(broker)
                    .ok()
                    .filter(|l| l.contains("broker serving"))
            },
        )?;
        let mut mesh = Self {
            broker,
            agents: Vec::new(),
            nodes: Vec::new(),
            pods: Vec::new(),
            broker_container: container_name(lab, "broker"),
            runner,
        };

        let mut create = vec!["network", "create", NETWORK, "--cidr", NETWORK_CIDR];
        for c in &plan.clusters {
            create.extend(["--allow", c.name.as_str()]);
        }
        progress("network via `podman exec` into the broker");
        mesh.admin(&create)?;

        // One standalone agent per cluster with the agent Deployment's
        // privileges; its manifests and state are host directories.
        let agent_doc = workload("agent.yaml", "Deployment", "l2mesh-agent")?;
        let agent_base = privileges::of_container(&agent_doc, "agent")?;
        for c in &plan.clusters {
            progress(&format!("cluster {}: token, agent container", c.name));
            let join = mesh.admin(&["token", "create", "--cluster", &c.name])?;
            let join = join.lines().next().unwrap_or_default().trim().to_owned();
            let manifests = dir_for(lab, &format!("{}/agent/manifests", c.name), None)?;
            for (file, text) in [
                ("nodes.yaml", nodes_manifest(c)),
                (
                    &format!("{NETWORK}.yaml") as &str,
                    network_manifest(NETWORK),
                ),
            ] {
                let p = manifests.join(file);
                std::fs::write(&p, text).map_err(|e| Error::io(&p, e))?;
            }
            let state = dir_for(lab, &format!("{}/agent/state", c.name), Some(NONROOT))?;
            let gw = c
                .nodes
                .first()
                .ok_or_else(|| Error::Spec("a cluster without nodes".into()))?;
            let gw_lan = gw
                .host
                .addr_on(Segment::Lan(c.index))
                .unwrap_or(Ipv4Addr::UNSPECIFIED);
            let mut p = agent_base.clone();
            p.command = vec!["l2mesh-agent".into()];
            p.mounts = vec![
                Mount {
                    volume: "manifests".into(),
                    source: VolumeSource::EmptyDir,
                    path: "/etc/l2mesh/manifests".into(),
                    read_only: true,
                },
                Mount {
                    volume: "state".into(),
                    source: VolumeSource::EmptyDir,
                    path: "/var/lib/l2mesh/agent".into(),
                    read_only: false,
                },
            ];
            let (m2, s2) = (manifests.clone(), state.clone());
            let host = move |m: &Mount| {
                Some(if m.volume == "manifests" {
                    m2.clone()
                } else {
                    s2.clone()
                })
            };
            let args = vec![
                "standalone".to_owned(),
                "--manifests=/etc/l2mesh/manifests".to_owned(),
                "--state-dir=/var/lib/l2mesh/agent".to_owned(),
                format!("--join-string={join}"),
                format!("--node-sync-listen={gw_lan}:0"),
                format!(
                    "--metrics-listen=0.0.0.0:{}",
                    readiness_http(&agent_doc, "agent")?.1
                ),
                "--poll-ms=200".to_owned(),
            ];
            let id = mesh.runner.run_container(
                lab,
                &format!("{}-agent", c.name),
                topo.netns(&gw.host.role)?,
                &p,
                &host,
                &[],
                &args,
                true,
            )?;
            mesh.agents.push(id);
        }

        let dp_doc = workload("dataplane.yaml", "DaemonSet", "l2mesh-dataplane")?;
        let dp_p = privileges::of_container(&dp_doc, "dataplane")?;
        let install_p = privileges::of_container(&dp_doc, "install-cni")?;
        let dp_env = literal_env(&dp_doc, "dataplane");
        for c in &plan.clusters {
            let (sync_dir, agent_addr) = wait_for_node_sync(
                lab,
                &c.name,
                &format!("the agent container of {} serves node sync", c.name),
                Duration::from_secs(60),
            )?;
            // What the kubelet makes of the l2mesh-node-sync Secret: files
            // owned by root, mode 0644, read-only.
            let secret = dir_for(lab, &format!("{}/node-sync-secret", c.name), None)?;
            for f in ["ca.crt", "token"] {
                let to = secret.join(f);
                std::fs::copy(sync_dir.join(f), &to).map_err(|e| Error::io(&to, e))?;
                std::fs::set_permissions(&to, std::fs::Permissions::from_mode(0o644))
                    .map_err(|e| Error::io(&to, e))?;
            }
            for n in &c.nodes {
                let role = n.host.role.clone();
                let ns = topo.netns(&role)?;
                let run_dir = dir_for(lab, &format!("{role}/run"), None)?;
                let state = dir_for(lab, &format!("{role}/state"), None)?;
                let cni_bin = dir_for(lab, &format!("{role}/cni-bin"), None)?;

                progress(&format!("{role}: install-cni init container"));
                let cb = cni_bin.clone();
                let id = mesh.runner.run_container(
                    lab,
                    &format!("{role}-install-cni"),
                    ns,
                    &install_p,
                    &move |_| Some(cb.clone()),
                    &literal_env(&dp_doc, "install-cni"),
                    &install_p.args,
                    false,
                )?;
                lab.procs().wait_for(
                    &format!("l2mesh-cni is installed on {role}"),
                    Duration::from_secs(60),
                    || lab.procs().log(id).ok().filter(|l| l.contains("installed")),
                )?;

                progress(&format!("{role}: dataplane container"));
                let mut segs = vec![Segment::Lan(c.index)];
                if n.is_gateway {
                    segs.push(Segment::Wan);
                }
                let endpoints: Vec<String> = segs
                    .into_iter()
                    .filter_map(|seg| n.host.addr_on(seg))
                    .map(|a| format!("{a}:{WG_PORT}"))
                    .collect();
                let (r2, s2, sec2) = (run_dir.clone(), state.clone(), secret.clone());
                let host = move |m: &Mount| match m.volume.as_str() {
                    "run" => Some(r2.clone()),
                    "state" => Some(s2.clone()),
                    "node-sync" => Some(sec2.clone()),
                    _ => None,
                };
                let mut args = dp_p.args.clone();
                args.extend([
                    format!("--listen-port={WG_PORT}"),
                    format!(
                        "--metrics-listen=0.0.0.0:{}",
                        readiness_http(&dp_doc, "dataplane")?.1
                    ),
                    format!("--agent=https://{agent_addr}"),
                    format!("--node-name={role}"),
                    format!("--endpoint={}", endpoints.join(",")),
                ]);
                let p = Privileges {
                    args: Vec::new(),
                    ..dp_p.clone()
                };
                let proc = mesh.runner.run_container(
                    lab,
                    &format!("{role}-dp"),
                    ns,
                    &p,
                    &host,
                    &dp_env,
                    &args,
                    true,
                )?;
                mesh.nodes.push(ContainerNode {
                    role,
                    cluster: c.index,
                    run_dir,
                    cni_bin,
                    proc,
                });
            }
        }

        let mut i: u8 = 0;
        for c in &plan.clusters {
            for n in &c.nodes {
                let node = mesh
                    .nodes
                    .iter()
                    .find(|x| x.role == n.host.role)
                    .cloned()
                    .ok_or_else(|| Error::Spec(format!("no dataplane for {}", n.host.role)))?;
                for pod in &n.pods {
                    i += 1;
                    progress(&format!("pod {pod} via the installed l2mesh-cni"));
                    let v4 = Ipv4Addr::new(10, 200, 0, i);
                    mesh.attach(lab, &node, pod, v4)?;
                    mesh.pods.push(ContainerPod {
                        role: pod.clone(),
                        node: node.role.clone(),
                        v4,
                    });
                }
            }
        }
        Ok(mesh)
    }

    /// CNI ADD through the plugin the init container installed on `node`,
    /// retried until the dataplane has the network.
    fn attach(&self, lab: &Lab, node: &ContainerNode, pod: &str, v4: Ipv4Addr) -> Result<()> {
        let topo = lab.topology();
        let socket = node.run_dir.join("dataplane.sock");
        let conf = serde_json::json!({
            "cniVersion": "1.0.0",
            "name": NETWORK,
            "type": "l2mesh-cni",
            "dataplaneSocket": socket,
            "ipam": {"type": "static", "addresses": [{"address": format!("{v4}/16")}]},
        })
        .to_string();
        let call = CniCall::add(topo.netns(pod)?, POD_IF, conf).with_pod("default", pod);
        let plugin = node.cni_bin.join("l2mesh-cni");
        let node_ns = topo.netns(&node.role)?;
        let mut last = String::new();
        lab.procs()
            .wait_until(
                &format!("the installed l2mesh-cni attaches {pod} to {NETWORK}"),
                Duration::from_secs(60),
                || match call.run(node_ns, &plugin) {
                    Ok(_) => true,
                    Err(e) => {
                        last = e.to_string();
                        false
                    }
                },
            )
            .map_err(|e| Error::Timeout(format!("{e}\nlast CNI error: {last}")))
    }

    /// Every pod pings every other pod within `timeout`; returns the pairs
    /// that never got a reply.
    pub fn unreachable_pairs(&self, lab: &Lab, timeout: Duration) -> Result<Vec<String>> {
        let topo = lab.topology();
        let mut bad = Vec::new();
        let deadline = std::time::Instant::now() + timeout;
        for a in &self.pods {
            for b in self.pods.iter().filter(|b| b.role != a.role) {
                let ns = topo.netns(&a.role)?;
                loop {
                    if ns.ping(b.v4.into(), 1)? {
                        break;
                    }
                    if std::time::Instant::now() >= deadline {
                        bad.push(format!("{} -> {}", a.role, b.role));
                        break;
                    }
                }
            }
        }
        Ok(bad)
    }
}
