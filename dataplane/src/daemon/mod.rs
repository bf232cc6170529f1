//! The tokio shell around the engine: underlay sockets, one TAP per
//! network, the packet workers ([`io`]), a timer, and the devices kept in
//! step with the applied state.

mod apply;
mod io;
mod status;
mod workers;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, RwLock};

use l2mesh_proto::node::{DesiredState, PortResult};
use prost::Message;
use tokio::net::UdpSocket;
use tokio::task::JoinHandle;
use tun_rs::AsyncDevice;

use crate::config::NetConfig;
use crate::engine::Engine;
use crate::netdev::{self, Netlink};
use crate::port::{PodRef, port_alias, settings_before};
use crate::{Error, keys, nft};

/// UDP port used when neither the flag nor the desired state sets one.
pub const DEFAULT_LISTEN_PORT: u16 = 51820;
const DESIRED_FILE: &str = "desired.pb";
/// Upper bound on packet workers when the count follows the cores.
const MAX_WORKERS: usize = 16;

/// A network's TAP: one queue and one reader per worker.
struct Tap {
    queues: Vec<Arc<AsyncDevice>>,
    readers: Vec<JoinHandle<()>>,
}

impl Tap {
    fn abort(&self) {
        for r in &self.readers {
            r.abort();
        }
    }
}

/// A running dataplane.
pub struct Daemon {
    engine: Engine,
    /// The underlay port: one socket per worker (a `SO_REUSEPORT` group).
    udp: RwLock<Arc<Vec<Arc<UdpSocket>>>>,
    workers: workers::Workers,
    tasks: Mutex<Vec<JoinHandle<()>>>,
    udp_tasks: Mutex<Vec<JoinHandle<()>>>,
    taps: RwLock<HashMap<u32, Tap>>,
    netlink: Netlink,
    state_dir: PathBuf,
    apply_lock: tokio::sync::Mutex<()>,
    metrics: crate::metrics::DaemonMetrics,
    /// Attach interfaces of any kind, not only veths and TAPs.
    attach_any_kind: AtomicBool,
}

impl std::fmt::Debug for Daemon {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Daemon")
            .field("state_dir", &self.state_dir)
            .field("workers", &self.workers.len())
            .finish_non_exhaustive()
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // A panic while holding the lock leaves plain data behind; keep going.
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// Packet workers for `requested` (0: one per core).
pub fn worker_count(requested: usize, cores: usize) -> usize {
    if requested > 0 {
        requested
    } else {
        cores.clamp(1, MAX_WORKERS)
    }
}

impl Daemon {
    /// Loads the key, binds the socket, restores the last applied state from
    /// `state_dir` (adopting its bridges) and removes stale devices of ours.
    /// `workers` packet workers (0: one per core), each with scheduler slice
    /// `worker_slice` if given.
    pub async fn start(
        state_dir: &Path,
        listen_port: u16,
        workers: usize,
        worker_slice: Option<std::time::Duration>,
    ) -> Result<Arc<Self>, Error> {
        let secret = keys::load_or_create(state_dir)?;
        // Before any tenant device exists: the node's stack never sees a
        // tenant frame, not even for a moment after a restart.
        nft::install()?;
        let cores = std::thread::available_parallelism().map_or(1, std::num::NonZero::get);
        let workers = worker_count(workers, cores);
        let workers = workers::Workers::start(workers, worker_slice)?;
        let udp = io::bind_udp_group(listen_port, &workers)?;
        let daemon = Arc::new(Self {
            engine: Engine::new(secret),
            udp: RwLock::new(Arc::clone(&udp)),
            workers,
            tasks: Mutex::new(Vec::new()),
            udp_tasks: Mutex::new(Vec::new()),
            taps: RwLock::new(HashMap::new()),
            netlink: Netlink::new()?,
            state_dir: state_dir.to_path_buf(),
            apply_lock: tokio::sync::Mutex::new(()),
            metrics: crate::metrics::DaemonMetrics::default(),
            attach_any_kind: AtomicBool::new(false),
        });
        {
            let mut cfg = daemon.engine.config();
            cfg.listen_port = daemon.local_port();
            daemon.engine.apply(cfg);
        }
        daemon.spawn_udp(&udp);
        let d = Arc::clone(&daemon);
        lock(&daemon.tasks).push(tokio::spawn(async move { d.timer().await }));
        let mut keep: Vec<u32> = Vec::new();
        if let Some(mut saved) = daemon.load_saved()? {
            for name in drop_peers_with_key(&mut saved, &daemon.engine.public_key()) {
                tracing::warn!(
                    peer = %name,
                    "the saved state lists this node's own key as a peer (written before such \
                     states were refused, or the key file was replaced); restoring without it"
                );
            }
            let saved_vnis: Vec<u32> = saved.networks.iter().map(|n| n.vni).collect();
            match daemon.apply(saved).await {
                Ok(r) => tracing::info!(
                    revision = r.applied_revision,
                    "restored the last applied state"
                ),
                Err(e) => {
                    // The saved networks' bridges stay: the pods on them keep
                    // talking to each other until the agent applies a state.
                    keep = saved_vnis;
                    tracing::warn!(
                        error = %e,
                        "could not restore the last applied state; its bridges are kept until \
                         the next apply"
                    );
                }
            }
        }
        keep.extend(daemon.engine.config().networks.values().map(|n| n.vni));
        for name in daemon.netlink.remove_stale(&keep).await? {
            tracing::info!(device = %name, "removed stale device");
        }
        Ok(daemon)
    }

    /// Stops the I/O tasks and closes the TAPs. Bridges stay so that pods
    /// keep their ports across a restart.
    pub fn stop(&self) {
        for t in lock(&self.tasks).drain(..) {
            t.abort();
        }
        for t in lock(&self.udp_tasks).drain(..) {
            t.abort();
        }
        let mut taps = self
            .taps
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        for (_, t) in taps.drain() {
            t.abort();
        }
        drop(taps);
        self.workers.shutdown();
    }

    fn load_saved(&self) -> Result<Option<DesiredState>, Error> {
        let path = self.state_dir.join(DESIRED_FILE);
        match std::fs::read(&path) {
            Ok(b) => DesiredState::decode(b.as_slice())
                .map(Some)
                .map_err(|e| Error::State {
                    path: path.display().to_string(),
                    reason: format!("{e}; remove it to start empty"),
                }),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(e.into()),
        }
    }

    fn save(&self, d: &DesiredState) -> Result<(), Error> {
        use std::io::Write as _;
        use std::os::unix::fs::OpenOptionsExt as _;
        let tmp = self.state_dir.join(format!("{DESIRED_FILE}.tmp"));
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(&tmp)?;
        f.write_all(&d.encode_to_vec())?;
        f.sync_all()?;
        std::fs::rename(&tmp, self.state_dir.join(DESIRED_FILE))?;
        Ok(())
    }

    async fn add_network(self: &Arc<Self>, n: &NetConfig) -> Result<(), Error> {
        let bridge = self
            .netlink
            .ensure_bridge(&netdev::bridge_name(n.vni), n.mtu)
            .await?;
        let name = netdev::tap_name(n.vni);
        if let Some(stale) = self.netlink.find(&name).await? {
            self.netlink.delete(stale.index).await?;
        }
        // The TAP is made down and isolated before it comes up, so the
        // node's stack never gets to send on it (no IPv6 link-local, no
        // router solicitation, no MLD report).
        let queues = io::open_tap(&name, n.mtu, &self.workers)?;
        let tap = self
            .netlink
            .find(&name)
            .await?
            .ok_or_else(|| Error::Netlink(format!("TAP {name} vanished after creation")))?;
        self.netlink.isolate(tap.index).await?;
        self.netlink.enslave(tap.index, bridge, n.mtu).await?;
        // Ports adopted from an earlier run get the same treatment.
        for port in self.netlink.links().await? {
            if port.controller == Some(bridge) && port.index != tap.index {
                self.netlink.isolate(port.index).await?;
            }
        }
        let readers = self.spawn_tap_readers(n.vni, &queues);
        let old = self
            .taps
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .insert(n.vni, Tap { queues, readers });
        if let Some(old) = old {
            old.abort();
        }
        Ok(())
    }

    async fn remove_network(&self, n: &NetConfig) -> Result<(), Error> {
        let tap = self
            .taps
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .remove(&n.vni);
        if let Some(t) = tap {
            t.abort();
        }
        for name in [netdev::tap_name(n.vni), netdev::bridge_name(n.vni)] {
            if let Some(l) = self.netlink.find(&name).await? {
                self.netlink.delete(l.index).await?;
            }
        }
        Ok(())
    }

    /// Sets the MTU on the bridge's ports (TAP, pod veths) and the bridge.
    /// The pod ends of the veths are the pods' business.
    async fn set_network_mtu(&self, n: &NetConfig) -> Result<(), Error> {
        let links = self.netlink.links().await?;
        let bridge_name = netdev::bridge_name(n.vni);
        let Some(bridge) = links.iter().find(|l| l.name == bridge_name) else {
            return Ok(());
        };
        for l in links.iter().filter(|l| l.controller == Some(bridge.index)) {
            self.netlink.set_mtu_up(l.index, n.mtu).await?;
        }
        self.netlink.set_mtu_up(bridge.index, n.mtu).await
    }

    fn network(&self, name: &str) -> Result<NetConfig, Error> {
        self.engine
            .config()
            .networks
            .get(name)
            .cloned()
            .ok_or_else(|| Error::NoSuchNetwork(name.to_string()))
    }

    fn port_result(n: &NetConfig) -> PortResult {
        PortResult {
            bridge: netdev::bridge_name(n.vni),
            mtu: n.mtu,
            pod_cidr: n.pod_cidr.clone(),
            vni: n.vni,
        }
    }

    /// Attaches interfaces of any kind (not only veths and TAPs), e.g. a
    /// physical NIC meant for a tenant network.
    pub fn set_attach_any_kind(&self, allow: bool) {
        self.attach_any_kind.store(allow, Ordering::Relaxed);
    }

    /// Puts a host interface (a pod veth) into a network's bridge and
    /// records its pod (both names empty: no pod) and its former settings
    /// on the interface. Interfaces of the node itself are refused.
    pub async fn attach(
        &self,
        network: &str,
        ifname: &str,
        pod_namespace: &str,
        pod_name: &str,
    ) -> Result<PortResult, Error> {
        let pod = PodRef::from_request(pod_namespace, pod_name)?;
        let n = self.network(network)?;
        if netdev::owned_vni(ifname).is_some() {
            return Err(Error::OwnedInterface(ifname.to_string()));
        }
        let links = self.netlink.links().await?;
        let link = links
            .iter()
            .find(|l| l.name == ifname)
            .cloned()
            .ok_or_else(|| Error::NoSuchInterface(ifname.to_string()))?;
        let bridge = links
            .iter()
            .find(|l| l.name == netdev::bridge_name(n.vni))
            .cloned()
            .ok_or_else(|| {
                Error::Netlink(format!(
                    "bridge of network {network} is missing; re-apply the state"
                ))
            })?;
        let node = NodeFacts {
            default_route_links: self.netlink.default_route_links().await?,
            addresses: self.netlink.addresses(link.index).await?,
            controller_name: link
                .controller
                .and_then(|c| links.iter().find(|l| l.index == c).map(|l| l.name.clone())),
        };
        if let Some(reason) =
            attach_refusal(&link, &node, self.attach_any_kind.load(Ordering::Relaxed))
        {
            return Err(Error::RefusedInterface {
                ifname: ifname.to_string(),
                reason,
            });
        }
        // What the port was like before its first attach; a re-attach (to
        // this or another network) keeps the first record.
        let before = link
            .alias
            .as_deref()
            .and_then(settings_before)
            .unwrap_or(link.settings);
        let alias = port_alias(pod.as_ref(), &before);
        if link.alias.as_deref() != Some(alias.as_str()) {
            self.netlink.set_alias(link.index, &alias).await?;
        }
        // Down first, so that nothing the stack had pending on the
        // interface (a report for a group it leaves) gets out.
        if link.up && link.controller != Some(bridge.index) {
            self.netlink.set_down(link.index).await?;
        }
        self.netlink.isolate(link.index).await?;
        self.netlink
            .enslave(link.index, bridge.index, n.mtu)
            .await?;
        Ok(Self::port_result(&n))
    }

    /// Takes a host interface out of a network's bridge and puts back the
    /// settings it had before its attach (MTU, group, ARP, IPv6 address
    /// generation).
    pub async fn detach(&self, network: &str, ifname: &str) -> Result<PortResult, Error> {
        let n = self.network(network)?;
        let bridge_name = netdev::bridge_name(n.vni);
        let link = self
            .netlink
            .find(ifname)
            .await?
            .ok_or_else(|| Error::NoSuchInterface(ifname.to_string()))?;
        let bridge = self.netlink.find(&bridge_name).await?;
        if bridge.is_none() || link.controller != bridge.map(|b| b.index) {
            return Err(Error::NotAttached {
                ifname: ifname.to_string(),
                network: network.to_string(),
                bridge: bridge_name,
            });
        }
        self.netlink.release(link.index).await?;
        if let Some(before) = link.alias.as_deref().and_then(settings_before) {
            self.netlink.restore(link.index, &before).await?;
        }
        if link.alias.as_deref().and_then(PodRef::from_alias).is_some()
            || link.alias.as_deref().and_then(settings_before).is_some()
        {
            self.netlink.set_alias(link.index, "").await?;
        }
        Ok(Self::port_result(&n))
    }

    /// Generates and stores a new node key; returns the public key.
    pub fn rotate_key(&self) -> Result<[u8; 32], Error> {
        let secret = keys::generate();
        keys::store(&self.state_dir, &secret)?;
        self.engine.set_private_key(secret);
        Ok(self.engine.public_key())
    }

    pub fn public_key(&self) -> [u8; 32] {
        self.engine.public_key()
    }

    pub fn local_port(&self) -> u16 {
        self.udp
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .first()
            .and_then(|s| s.local_addr().ok())
            .map(|a| a.port())
            .unwrap_or(0)
    }
}

/// What the node knows about an interface that an attach asks for.
#[derive(Debug, Default)]
struct NodeFacts {
    /// Interfaces a default route leaves by.
    default_route_links: Vec<u32>,
    /// The interface's addresses.
    addresses: Vec<std::net::IpAddr>,
    /// The device the interface is already a port of, if any.
    controller_name: Option<String>,
}

/// Why an interface must not become a tenant port, if it must not: the
/// loopback, an interface carrying the node's own traffic (a default
/// route, an address other than link-local: the underlay NIC), a port of a
/// device that is not ours, and (unless `any_kind`) anything but a veth or
/// a TAP, the interfaces that pods get.
fn attach_refusal(link: &netdev::Link, node: &NodeFacts, any_kind: bool) -> Option<String> {
    if link.loopback {
        return Some("it is the loopback interface".to_string());
    }
    if node.default_route_links.contains(&link.index) {
        return Some(
            "the node's default route leaves by it; attaching it would put the node's own \
             network into a tenant network"
                .to_string(),
        );
    }
    if let Some(ip) = node.addresses.iter().find(|a| !netdev::is_link_local(a)) {
        return Some(format!(
            "it has address {ip}: it carries the node's own traffic (the underlay?); attach \
             only interfaces made for pods"
        ));
    }
    if let Some(master) = &node.controller_name
        && netdev::owned_vni(master).is_none()
    {
        return Some(format!(
            "it is a port of {master}; take it out of {master} first"
        ));
    }
    let kind = link.kind.as_deref().unwrap_or("physical");
    if !any_kind && !matches!(kind, "veth" | "tun") {
        return Some(format!(
            "it is a {kind} interface; only veth and TAP interfaces made for pods are attached \
             (start l2mesh-dataplane with --attach-any-interface to allow others)"
        ));
    }
    None
}

/// Removes from `state` every peer whose key is `own` and returns their
/// names. A live apply refuses such a state; a saved one is repaired
/// instead, so that a restart does not lose everything else in it.
fn drop_peers_with_key(state: &mut DesiredState, own: &[u8; 32]) -> Vec<String> {
    let mut dropped = Vec::new();
    state.peers.retain(|p| {
        let is_own = p.public_key.as_slice() == own.as_slice();
        if is_own {
            dropped.push(if p.name.is_empty() {
                "(unnamed)".to_string()
            } else {
                p.name.clone()
            });
        }
        !is_own
    });
    dropped
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn workers_follow_the_cores_unless_set() {
        assert_eq!(worker_count(0, 2), 2);
        assert_eq!(worker_count(0, 0), 1);
        assert_eq!(worker_count(0, 64), MAX_WORKERS);
        assert_eq!(worker_count(3, 2), 3);
        assert_eq!(worker_count(1, 8), 1);
    }

    #[test]
    fn node_interfaces_are_refused_and_pod_interfaces_attached() {
        let veth = netdev::Link {
            index: 7,
            name: "l2abc".into(),
            kind: Some("veth".into()),
            ..netdev::Link::default()
        };
        let ok = NodeFacts::default();
        assert_eq!(attach_refusal(&veth, &ok, false), None);
        let tap = netdev::Link {
            kind: Some("tun".into()),
            ..veth.clone()
        };
        assert_eq!(attach_refusal(&tap, &ok, false), None);
        let ll = NodeFacts {
            addresses: vec!["fe80::1".parse().unwrap()],
            ..NodeFacts::default()
        };
        assert_eq!(attach_refusal(&veth, &ll, false), None, "link-local only");
        let lo = netdev::Link {
            loopback: true,
            kind: None,
            ..veth.clone()
        };
        let refusal = |l: &netdev::Link, f: &NodeFacts, any: bool| {
            attach_refusal(l, f, any).unwrap_or_default()
        };
        assert!(refusal(&lo, &ok, true).contains("loopback"));
        let default = NodeFacts {
            default_route_links: vec![7],
            ..NodeFacts::default()
        };
        assert!(refusal(&veth, &default, true).contains("default route"));
        let underlay = NodeFacts {
            addresses: vec!["192.0.2.10".parse().unwrap()],
            ..NodeFacts::default()
        };
        assert!(refusal(&veth, &underlay, true).contains("192.0.2.10"));
        let nic = netdev::Link {
            kind: None,
            ..veth.clone()
        };
        assert!(refusal(&nic, &ok, false).contains("physical"));
        assert_eq!(attach_refusal(&nic, &ok, true), None, "allowed explicitly");
        let dummy = netdev::Link {
            kind: Some("dummy".into()),
            ..veth.clone()
        };
        assert!(refusal(&dummy, &ok, false).contains("--attach-any-interface"));
        let enslaved = NodeFacts {
            controller_name: Some("cni0".into()),
            ..NodeFacts::default()
        };
        assert!(refusal(&veth, &enslaved, false).contains("cni0"));
        let ours = NodeFacts {
            controller_name: Some(netdev::bridge_name(5)),
            ..NodeFacts::default()
        };
        assert_eq!(
            attach_refusal(&veth, &ours, false),
            None,
            "moving between networks"
        );
    }

    #[test]
    fn a_saved_state_loses_only_peers_with_the_nodes_own_key() {
        use l2mesh_proto::node::PeerSpec;
        let peer = |key: u8, name: &str| PeerSpec {
            public_key: vec![key; 32],
            name: name.to_string(),
            ..PeerSpec::default()
        };
        let mut state = DesiredState {
            revision: 7,
            peers: vec![peer(1, "self"), peer(2, "b"), peer(1, ""), peer(3, "c")],
            ..DesiredState::default()
        };
        let dropped = drop_peers_with_key(&mut state, &[1; 32]);
        assert_eq!(dropped, vec!["self".to_string(), "(unnamed)".to_string()]);
        let left: Vec<&str> = state.peers.iter().map(|p| p.name.as_str()).collect();
        assert_eq!(left, vec!["b", "c"]);
        assert_eq!(state.revision, 7);
        assert!(drop_peers_with_key(&mut state, &[1; 32]).is_empty());
    }
}
