//! l2mesh itself on a [`Lab`]: the real broker, one standalone agent per
//! cluster (on its gateway), one dataplane per node, and pods attached
//! through the real `l2mesh-cni`, the way an operator would set it up.
//!
//! Ports: the agents bind port 0 and the harness reads the address they
//! report. The broker listens on 7443 (a restarted broker must come back
//! where the agents' join strings point) and WireGuard on 51820 on every
//! node (the Nodes manifest names gateway endpoints in advance): each host
//! is its own namespace, so nothing can collide.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use crate::binaries::Binaries;
use crate::cni::CniCall;
use crate::lab::Lab;
use crate::plan::Segment;
use crate::process::{ProcId, ProcSpec};
use crate::{Error, Result};

/// TCP port of the broker, in its own namespace.
pub const BROKER_PORT: u16 = 7443;
/// Client port of the first etcd member of a replicated broker (member `i`
/// uses this + 10 i, its peer port one more), on the broker host's loopback.
pub const ETCD_PORT: u16 = 2379;
const ETCD_MEMBERS: u16 = 3;
/// UDP port of every dataplane.
pub const WG_PORT: u16 = 51820;
/// The multi-cluster network every pod joins.
pub const NETWORK: &str = "blue";
/// Its IPv4 range; pod `i` (1-based) gets `10.200.0.i/16`.
pub const NETWORK_CIDR: &str = "10.200.0.0/16";
/// Pod `i` also gets `fd00:200::i/64`.
pub const POD_V6_PREFIX: [u16; 4] = [0xfd00, 0x200, 0, 0];
/// Interface name of the l2mesh attachment inside pods.
pub const POD_IF: &str = "net1";

/// A pod attached to the network.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PodInfo {
    /// Role, e.g. `c1-n1-p1`.
    pub role: String,
    /// Its node's role.
    pub node: String,
    /// 1-based cluster index.
    pub cluster: usize,
    pub v4: Ipv4Addr,
    pub v6: Ipv6Addr,
}

/// A node's dataplane.
#[derive(Debug, Clone)]
pub struct NodeInfo {
    pub role: String,
    pub cluster: usize,
    pub socket: PathBuf,
    pub proc: ProcId,
}

/// The running mesh. Its processes belong to the lab and die with it.
#[derive(Debug)]
pub struct Mesh {
    broker_bin: PathBuf,
    broker_data: PathBuf,
    pub broker: ProcId,
    /// Where admin commands go: the broker, or every replica (comma-separated).
    pub broker_addr: String,
    /// Every broker process: the one broker, or the replicas on etcd.
    pub replicas: Vec<ProcId>,
    /// The etcd members the replicas share (none for a sled broker).
    pub etcd: Vec<ProcId>,
    /// Agent of cluster `i` at index `i-1`.
    pub agents: Vec<ProcId>,
    pub nodes: Vec<NodeInfo>,
    pub pods: Vec<PodInfo>,
}

/// Waits until the standalone agent of `cluster` (state dir under the lab's
/// log dir) has written its node-sync token and listen address; returns the
/// node-sync dir and the address.
pub fn wait_for_node_sync(
    lab: &Lab,
    cluster: &str,
    what: &str,
    within: Duration,
) -> Result<(PathBuf, String)> {
    let sync_dir = lab
        .log_dir()
        .join(format!("{cluster}/agent/state/node-sync"));
    let addr_file = sync_dir.join("listen-addr");
    let addr = lab.procs().wait_for(what, within, || {
        let a = std::fs::read_to_string(&addr_file).ok()?;
        (sync_dir.join("token").exists() && !a.trim().is_empty()).then(|| a.trim().to_owned())
    })?;
    Ok((sync_dir, addr))
}

fn first_line(s: &str) -> String {
    s.lines().next().unwrap_or_default().trim().to_owned()
}

/// The `listen=ADDR` field of the broker's "broker serving" log line.
pub fn parse_broker_listen(log: &str) -> Option<String> {
    log.lines()
        .filter(|l| l.contains("broker serving"))
        .find_map(|l| l.split_whitespace().find_map(|w| w.strip_prefix("listen=")))
        .map(|a| {
            a.trim_matches(|c: char| !(c.is_ascii_alphanumeric() || c == '.' || c == ':'))
                .to_owned()
        })
}

/// The standalone agent's `Nodes` manifest for a cluster.
pub fn nodes_manifest(plan: &crate::plan::ClusterPlan) -> String {
    let mut y = String::from("apiVersion: l2mesh.io/v1alpha1\nkind: Nodes\nnodes:\n");
    for n in &plan.nodes {
        let seg = if n.is_gateway {
            Segment::Wan
        } else {
            Segment::Lan(plan.index)
        };
        let addr = n
            .host
            .addr_on(seg)
            .map(|a| a.to_string())
            .unwrap_or_default();
        y.push_str(&format!(
            "  - name: {}\n    gateway: {}\n    endpoint: {addr}:{WG_PORT}\n",
            n.host.role, n.is_gateway
        ));
    }
    y
}

/// An `L2Network` manifest of multi-cluster scope for broker network `name`.
pub fn network_manifest(name: &str) -> String {
    format!(
        "apiVersion: l2mesh.io/v1alpha1\nkind: L2Network\nmetadata:\n  name: {name}\n  namespace: default\nspec:\n  scope: multiCluster\n"
    )
}

impl Mesh {
    /// Starts everything and attaches every pod of the topology to
    /// [`NETWORK`]. Waits on conditions, never on the clock.
    pub fn start(lab: &Lab, bins: &Binaries, progress: &mut dyn FnMut(&str)) -> Result<Self> {
        Self::start_with(lab, bins, progress, &|_| true)
    }

    /// Like [`Mesh::start`], attaching only the pods whose role `attach`
    /// accepts (the others stay isolated, e.g. for a second network).
    pub fn start_with(
        lab: &Lab,
        bins: &Binaries,
        progress: &mut dyn FnMut(&str),
        attach: &dyn Fn(&str) -> bool,
    ) -> Result<Self> {
        Self::start_full(lab, bins, progress, attach, 0)
    }

    /// Like [`Mesh::start`] with `replicas` brokers sharing a 3-member etcd
    /// cluster (on the broker host's loopback), all named in the join
    /// strings, so agents fail over between them.
    pub fn start_replicated(
        lab: &Lab,
        bins: &Binaries,
        progress: &mut dyn FnMut(&str),
        replicas: usize,
    ) -> Result<Self> {
        Self::start_full(lab, bins, progress, &|_| true, replicas.max(1))
    }

    /// Starts 3 etcd members in the broker's namespace and waits until
    /// each serves clients; returns them and the `--store` value.
    fn start_etcd(lab: &Lab) -> Result<(Vec<ProcId>, String)> {
        let topo = lab.topology();
        let initial = (0..ETCD_MEMBERS)
            .map(|i| format!("e{i}=http://127.0.0.1:{}", ETCD_PORT + 10 * i + 1))
            .collect::<Vec<_>>()
            .join(",");
        let mut procs = Vec::new();
        for i in 0..ETCD_MEMBERS {
            let client = format!("http://127.0.0.1:{}", ETCD_PORT + 10 * i);
            let peer = format!("http://127.0.0.1:{}", ETCD_PORT + 10 * i + 1);
            procs.push(
                lab.procs().spawn(
                    ProcSpec::new(&format!("etcd-{i}"), topo.broker()?, "etcd")
                        .args(["--name", &format!("e{i}")])
                        .arg("--data-dir")
                        .arg(lab.log_dir().join(format!("etcd-{i}")))
                        .args(["--listen-client-urls", &client])
                        .args(["--advertise-client-urls", &client])
                        .args(["--listen-peer-urls", &peer])
                        .args(["--initial-advertise-peer-urls", &peer])
                        .args(["--initial-cluster", &initial])
                        .args(["--initial-cluster-state", "new"])
                        .args(["--max-txn-ops", "100000"])
                        .args(["--logger", "zap"])
                        .daemon(),
                )?,
            );
        }
        for (i, p) in procs.iter().enumerate() {
            lab.procs().wait_until(
                &format!("etcd member {i} serves clients"),
                Duration::from_secs(30),
                || {
                    lab.procs()
                        .log(*p)
                        .is_ok_and(|l| l.contains("serving client traffic"))
                },
            )?;
        }
        let store = (0..ETCD_MEMBERS)
            .map(|i| format!("127.0.0.1:{}", ETCD_PORT + 10 * i))
            .collect::<Vec<_>>()
            .join(",");
        Ok((procs, format!("etcd://{store}")))
    }

    fn start_full(
        lab: &Lab,
        bins: &Binaries,
        progress: &mut dyn FnMut(&str),
        attach: &dyn Fn(&str) -> bool,
        replicas: usize,
    ) -> Result<Self> {
        let topo = lab.topology();
        let plan = topo.plan().clone();
        let broker_bin = bins.path("l2mesh-broker")?.to_path_buf();
        let broker_data = lab.log_dir().join("broker-data");
        let broker_ip = plan
            .broker
            .addr_on(Segment::Wan)
            .unwrap_or(Ipv4Addr::UNSPECIFIED);

        let (etcd, store) = if replicas == 0 {
            (Vec::new(), None)
        } else {
            progress("etcd: 3 members");
            let (procs, store) = Self::start_etcd(lab)?;
            (procs, Some(store))
        };
        // Every replica advertises them all: join strings name each one.
        let ports: Vec<u16> = (0..replicas.max(1))
            .map(|i| BROKER_PORT + u16::try_from(i).unwrap_or(0))
            .collect();
        let advertise = ports
            .iter()
            .map(|p| format!("{broker_ip}:{p}"))
            .collect::<Vec<_>>()
            .join(",");
        let mut procs = Vec::new();
        let mut addrs = Vec::new();
        for (i, port) in ports.iter().enumerate() {
            let name = if replicas == 0 {
                "broker".to_owned()
            } else {
                format!("broker-{i}")
            };
            progress(&name);
            let mut spec = ProcSpec::new(&name, topo.broker()?, &broker_bin)
                .arg("--data-dir")
                .arg(&broker_data)
                .args(["serve", "--listen", &format!("{broker_ip}:{port}")])
                .args(["--metrics-listen", "127.0.0.1:0"])
                .env("NO_COLOR", "1")
                .daemon();
            if let Some(store) = &store {
                spec = spec.args(["--store", store, "--advertise", &advertise]);
            }
            let proc = lab.procs().spawn(spec)?;
            // One at a time: the first creates the CA the others load.
            let addr = lab.procs().wait_for(
                &format!("{name} is serving"),
                Duration::from_secs(20),
                || {
                    lab.procs()
                        .log(proc)
                        .ok()
                        .and_then(|l| parse_broker_listen(&l))
                },
            )?;
            procs.push(proc);
            addrs.push(addr);
        }
        let mut mesh = Self {
            broker_bin,
            broker_data,
            broker: *procs
                .first()
                .ok_or_else(|| Error::Spec("no broker started".into()))?,
            broker_addr: addrs.join(","),
            replicas: procs,
            etcd,
            agents: Vec::new(),
            nodes: Vec::new(),
            pods: Vec::new(),
        };

        let mut create = vec!["network", "create", NETWORK, "--cidr", NETWORK_CIDR];
        for c in &plan.clusters {
            create.extend(["--allow", c.name.as_str()]);
        }
        progress(&format!(
            "network {NETWORK} ({NETWORK_CIDR}) for every cluster"
        ));
        mesh.admin(lab, &create)?;

        let agent_bin = bins.path("l2mesh-agent")?;
        for c in &plan.clusters {
            progress(&format!("cluster {}: token, agent on its gateway", c.name));
            let join = first_line(&mesh.admin(lab, &["token", "create", "--cluster", &c.name])?);
            let dir = format!("{}/agent", c.name);
            lab.write_file(&format!("{dir}/manifests/nodes.yaml"), &nodes_manifest(c))?;
            lab.write_file(
                &format!("{dir}/manifests/{NETWORK}.yaml"),
                &network_manifest(NETWORK),
            )?;
            let agent_dir = lab.log_dir().join(&dir);
            // The join string holds the token's secret: a file only root
            // reads, never the command line (which `ps` shows to everyone).
            let join_file = lab.write_file(&format!("{dir}/join"), &join)?;
            std::fs::set_permissions(
                &join_file,
                std::os::unix::fs::PermissionsExt::from_mode(0o600),
            )
            .map_err(|e| Error::io(&join_file, e))?;
            let gw = c
                .nodes
                .first()
                .ok_or_else(|| Error::Spec("a cluster without nodes".into()))?;
            let gw_lan = gw
                .host
                .addr_on(Segment::Lan(c.index))
                .unwrap_or(Ipv4Addr::UNSPECIFIED);
            let agent = lab.procs().spawn(
                ProcSpec::new(
                    &format!("{}-agent", c.name),
                    topo.netns(&gw.host.role)?,
                    agent_bin,
                )
                .arg("standalone")
                .arg("--manifests")
                .arg(agent_dir.join("manifests"))
                .arg("--state-dir")
                .arg(agent_dir.join("state"))
                .arg("--join-string-file")
                .arg(&join_file)
                .args(["--node-sync-listen", &format!("{gw_lan}:0")])
                .args(["--metrics-listen", "", "--poll-ms", "200"])
                .env("NO_COLOR", "1")
                .daemon(),
            )?;
            mesh.agents.push(agent);
        }

        let dp_bin = bins.path("l2mesh-dataplane")?;
        for c in &plan.clusters {
            let (sync_dir, agent_addr) = wait_for_node_sync(
                lab,
                &c.name,
                &format!("the agent of {} serves node sync", c.name),
                Duration::from_secs(20),
            )?;
            for n in &c.nodes {
                progress(&format!("dataplane on {}", n.host.role));
                // Every node reports its LAN address, which its own
                // cluster uses; a gateway also reports its WAN address, the
                // one the Nodes manifest gives other clusters.
                let mut segs = vec![Segment::Lan(c.index)];
                if n.is_gateway {
                    segs.push(Segment::Wan);
                }
                let endpoints: Vec<String> = segs
                    .into_iter()
                    .filter_map(|seg| n.host.addr_on(seg))
                    .map(|a| format!("{a}:{WG_PORT}"))
                    .collect();
                let dir = lab.log_dir().join(format!("{}/dp", n.host.role));
                let socket = dir.join("dp.sock");
                let proc = lab.procs().spawn(
                    ProcSpec::new(
                        &format!("{}-dp", n.host.role),
                        topo.netns(&n.host.role)?,
                        dp_bin,
                    )
                    .arg("run")
                    .arg("--socket")
                    .arg(&socket)
                    .arg("--state-dir")
                    .arg(&dir)
                    .args(["--listen-port", &WG_PORT.to_string()])
                    .args(["--metrics-listen", "127.0.0.1:0"])
                    .args(["--agent", &format!("https://{agent_addr}")])
                    .arg("--agent-ca")
                    .arg(sync_dir.join("ca.crt"))
                    .arg("--agent-token-file")
                    .arg(sync_dir.join("token"))
                    .args(["--node-name", &n.host.role])
                    .args(["--endpoint", &endpoints.join(",")])
                    .env("NO_COLOR", "1")
                    .daemon(),
                )?;
                mesh.nodes.push(NodeInfo {
                    role: n.host.role.clone(),
                    cluster: c.index,
                    socket,
                    proc,
                });
            }
        }

        let cni_bin = bins.path("l2mesh-cni")?;
        let mut i: u16 = 0;
        for c in &plan.clusters {
            for n in &c.nodes {
                let node = mesh
                    .nodes
                    .iter()
                    .find(|x| x.role == n.host.role)
                    .cloned()
                    .ok_or_else(|| Error::Spec(format!("no dataplane for {}", n.host.role)))?;
                for p in n.pods.iter().filter(|p| attach(p)) {
                    i += 1;
                    progress(&format!("pod {p} via l2mesh-cni"));
                    let [o1, o2] = i.to_be_bytes();
                    let v4 = Ipv4Addr::new(10, 200, o1, o2);
                    let [a, b, c6, d] = POD_V6_PREFIX;
                    let v6 = Ipv6Addr::new(a, b, c6, d, 0, 0, 0, i);
                    mesh.attach(lab, cni_bin, NETWORK, &node, p, POD_IF, v4, v6)?;
                    mesh.pods.push(PodInfo {
                        role: p.clone(),
                        node: n.host.role.clone(),
                        cluster: c.index,
                        v4,
                        v6,
                    });
                }
            }
        }
        Ok(mesh)
    }

    /// CNI ADD of `pod` (interface `ifname`) on its node to `network`,
    /// retried until the node's dataplane has the network (it arrives from
    /// the agent shortly after start).
    #[allow(clippy::too_many_arguments)]
    pub fn attach(
        &self,
        lab: &Lab,
        cni: &Path,
        network: &str,
        node: &NodeInfo,
        pod: &str,
        ifname: &str,
        v4: Ipv4Addr,
        v6: Ipv6Addr,
    ) -> Result<()> {
        let topo = lab.topology();
        let conf = serde_json::json!({
            "cniVersion": "1.0.0",
            "name": network,
            "type": "l2mesh-cni",
            "dataplaneSocket": node.socket,
            "ipam": {"type": "static", "addresses": [
                {"address": format!("{v4}/16")},
                {"address": format!("{v6}/64")},
            ]},
        })
        .to_string();
        let call = CniCall::add(topo.netns(pod)?, ifname, conf).with_pod("default", pod);
        let node_ns = topo.netns(&node.role)?;
        let mut last = String::new();
        lab.procs()
            .wait_until(
                &format!("l2mesh-cni attaches {pod} to {network}"),
                Duration::from_secs(30),
                || match call.run(node_ns, cni) {
                    Ok(_) => true,
                    Err(e) => {
                        last = e.to_string();
                        false
                    }
                },
            )
            .map_err(|e| Error::Timeout(format!("{e}\nlast CNI error: {last}")))
    }

    /// Runs an admin command of the broker CLI in the broker's namespace.
    pub fn admin(&self, lab: &Lab, args: &[&str]) -> Result<String> {
        let mut all: Vec<std::ffi::OsString> = vec![
            "--data-dir".into(),
            self.broker_data.clone().into_os_string(),
        ];
        all.extend(args.iter().map(Into::into));
        all.extend(["--broker".into(), self.broker_addr.clone().into()]);
        lab.topology().broker()?.run(&self.broker_bin, all)
    }

    /// `l2mesh-dataplane status` of a node.
    pub fn status(&self, lab: &Lab, bins: &Binaries, node: &str) -> Result<String> {
        let n = self
            .nodes
            .iter()
            .find(|n| n.role == node)
            .ok_or_else(|| Error::Spec(format!("no dataplane on {node}")))?;
        let ns = lab.topology().netns(node)?;
        ns.run(
            bins.path("l2mesh-dataplane")?,
            [
                std::ffi::OsStr::new("status"),
                "--socket".as_ref(),
                n.socket.as_os_str(),
            ],
        )
    }

    /// Pings every pod from every other pod (IPv4 or IPv6) in parallel,
    /// retrying each pair until `timeout`. Returns `(from, to, replied)`.
    pub fn ping_matrix(
        &self,
        lab: &Lab,
        v6: bool,
        timeout: Duration,
    ) -> Result<Vec<(String, String, bool)>> {
        let topo = lab.topology();
        let pairs: Vec<(&PodInfo, &PodInfo)> = self
            .pods
            .iter()
            .flat_map(|a| {
                self.pods
                    .iter()
                    .filter(move |b| b.role != a.role)
                    .map(move |b| (a, b))
            })
            .collect();
        std::thread::scope(|s| {
            let handles: Vec<_> = pairs
                .into_iter()
                .map(|(a, b)| {
                    s.spawn(move || -> Result<(String, String, bool)> {
                        let ns = topo.netns(&a.role)?;
                        let addr = if v6 {
                            IpAddr::V6(b.v6)
                        } else {
                            IpAddr::V4(b.v4)
                        };
                        let deadline = Instant::now() + timeout;
                        loop {
                            if ns.ping(addr, 1)? {
                                return Ok((a.role.clone(), b.role.clone(), true));
                            }
                            if Instant::now() >= deadline {
                                return Ok((a.role.clone(), b.role.clone(), false));
                            }
                        }
                    })
                })
                .collect();
            handles
                .into_iter()
                .map(|h| {
                    h.join()
                        .unwrap_or_else(|_| Err(Error::Spec("ping thread panicked".into())))
                })
                .collect()
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::plan::{Plan, TopologySpec};

    #[test]
    fn broker_listen_address_is_read_from_its_log() {
        let log = "x INFO l2mesh_broker: broker serving listen=192.0.2.1:46231 metrics=127.0.0.1:1 advertise=[\"192.0.2.1:46231\"]\n";
        assert_eq!(parse_broker_listen(log).as_deref(), Some("192.0.2.1:46231"));
        assert_eq!(parse_broker_listen("starting\n"), None);
    }

    #[test]
    fn manifests_name_every_node_with_its_endpoint() {
        let plan = Plan::new(TopologySpec::default()).unwrap();
        let y = nodes_manifest(&plan.clusters[1]);
        assert!(y.contains("kind: Nodes"));
        assert!(
            y.contains("- name: c2-gw\n    gateway: true\n    endpoint: 192.0.2.12:51820"),
            "{y}"
        );
        assert!(
            y.contains("- name: c2-n1\n    gateway: false\n    endpoint: 10.2.0.2:51820"),
            "{y}"
        );
        assert!(network_manifest("blue").contains("scope: multiCluster"));
    }
}
