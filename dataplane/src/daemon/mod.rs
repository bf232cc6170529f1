//! The tokio shell around the engine: underlay sockets, one TAP per
//! network, the packet workers ([`io`]), a timer, and the devices kept in
//! step with the applied state.

mod apply;
mod io;
mod status;
mod workers;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard, RwLock};

use l2mesh_proto::node::{DesiredState, PortResult};
use prost::Message;
use tokio::net::UdpSocket;
use tokio::task::JoinHandle;
use tun_rs::AsyncDevice;

use crate::config::NetConfig;
use crate::engine::Engine;
use crate::netdev::{self, Netlink};
use crate::port::PodRef;
use crate::{Error, keys};

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
        let queues = io::open_tap(&name, n.mtu, &self.workers)?;
        let tap = self
            .netlink
            .find(&name)
            .await?
            .ok_or_else(|| Error::Netlink(format!("TAP {name} vanished after creation")))?;
        self.netlink.enslave(tap.index, bridge, n.mtu).await?;
        // The node must not talk into tenant networks (router solicitations,
        // MLD reports from link-local addresses on the bridge or the TAP).
        for dev in [netdev::bridge_name(n.vni), name.clone()] {
            let path = format!("/proc/sys/net/ipv6/conf/{dev}/disable_ipv6");
            if let Err(e) = std::fs::write(&path, "1")
                && e.kind() != std::io::ErrorKind::NotFound
            {
                tracing::warn!(error = %e, device = %dev, "could not disable IPv6");
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

    /// Puts a host interface (a pod veth) into a network's bridge and
    /// records its pod (both names empty: no pod) on the interface.
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
        let link = self
            .netlink
            .find(ifname)
            .await?
            .ok_or_else(|| Error::NoSuchInterface(ifname.to_string()))?;
        let bridge = self
            .netlink
            .find(&netdev::bridge_name(n.vni))
            .await?
            .ok_or_else(|| {
                Error::Netlink(format!(
                    "bridge of network {network} is missing; re-apply the state"
                ))
            })?;
        self.netlink
            .enslave(link.index, bridge.index, n.mtu)
            .await?;
        let alias = pod.as_ref().map(PodRef::to_alias).unwrap_or_default();
        if link.alias.as_deref().unwrap_or_default() != alias {
            self.netlink.set_alias(link.index, &alias).await?;
        }
        Ok(Self::port_result(&n))
    }

    /// Takes a host interface out of a network's bridge.
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
        if link.alias.as_deref().and_then(PodRef::from_alias).is_some() {
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
