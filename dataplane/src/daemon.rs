//! The tokio shell around the engine: one UDP socket, one TAP per network,
//! a timer, and the devices kept in step with the applied state.

use std::collections::HashMap;
use std::io::IoSlice;
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard, RwLock};
use std::time::{Duration, Instant};

use l2mesh_proto::node::{
    ApplyResult, DesiredState, DropCounter, MacEntry, NetworkStatus, NodeStatus, PeerGroup,
    PeerStatus, PortResult, PortStatus,
};
use prost::Message;
use tokio::net::UdpSocket;
use tokio::task::JoinHandle;
use tun_rs::AsyncDevice;

use crate::config::{Config, NetConfig, key_b64};
use crate::engine::{Engine, Output};
use crate::netdev::{self, Netlink};
use crate::port::{PodRef, Port};
use crate::switch::Group;
use crate::{Error, keys};
use crate::{offload, udp};

/// UDP port used when neither the flag nor the desired state sets one.
pub const DEFAULT_LISTEN_PORT: u16 = 51820;
const DESIRED_FILE: &str = "desired.pb";
const TICK: Duration = Duration::from_millis(250);
const SOCKET_BUFFER: usize = 4 << 20;
/// Packets handled per wakeup before the results are sent.
const BATCH: usize = 64;
/// Stop reading and send once this many outputs are queued (a few TSO
/// super-frames' worth), which bounds latency and buffer use.
const MAX_OUTPUTS: usize = 256;

/// Buffers an I/O task keeps across wakeups.
#[derive(Default)]
struct Scratch {
    /// Output buffers already sent, handed back to the engine's pool.
    spent: Vec<Vec<u8>>,
    /// The super-frame being written to a TAP.
    gro: Vec<u8>,
}

nix::ioctl_write_int!(tunsetoffload, b'T', 208);

/// tun-rs also turns on UDP segmentation offload where the kernel has it;
/// we only segment TCP, so keep the kernel from handing us UDP super-frames.
fn tcp_offloads_only(dev: &AsyncDevice) -> Result<(), Error> {
    use std::os::fd::AsRawFd as _;
    const TUN_F_CSUM: u64 = 0x01;
    const TUN_F_TSO4: u64 = 0x02;
    const TUN_F_TSO6: u64 = 0x04;
    // SAFETY: the descriptor is a live TUN/TAP fd owned by `dev`, and
    // TUNSETOFFLOAD takes the flag word by value.
    #[allow(unsafe_code)]
    unsafe { tunsetoffload(dev.as_raw_fd(), TUN_F_CSUM | TUN_F_TSO4 | TUN_F_TSO6) }
        .map_err(std::io::Error::from)?;
    Ok(())
}

struct Tap {
    dev: Arc<AsyncDevice>,
    reader: JoinHandle<()>,
}

/// A running dataplane.
pub struct Daemon {
    engine: Mutex<Engine>,
    udp: RwLock<Arc<UdpSocket>>,
    tasks: Mutex<Vec<JoinHandle<()>>>,
    udp_task: Mutex<Option<JoinHandle<()>>>,
    taps: RwLock<HashMap<u32, Tap>>,
    netlink: Netlink,
    state_dir: PathBuf,
    apply_lock: tokio::sync::Mutex<()>,
}

impl std::fmt::Debug for Daemon {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Daemon")
            .field("state_dir", &self.state_dir)
            .finish_non_exhaustive()
    }
}

fn bind_udp(port: u16) -> Result<UdpSocket, Error> {
    use socket2::{Domain, Protocol, Socket, Type};
    let s = Socket::new(Domain::IPV4, Type::DGRAM, Some(Protocol::UDP))?;
    // Bigger buffers absorb bursts; the kernel caps them at rmem_max.
    let _ = s.set_recv_buffer_size(SOCKET_BUFFER);
    let _ = s.set_send_buffer_size(SOCKET_BUFFER);
    s.set_nonblocking(true)?;
    s.bind(&SocketAddr::V4(SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, port)).into())?;
    let sock = UdpSocket::from_std(s.into())?;
    udp::enable_gro(&sock);
    Ok(sock)
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // A panic while holding the lock leaves plain data behind; keep going.
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

impl Daemon {
    /// Loads the key, binds the socket, restores the last applied state from
    /// `state_dir` (adopting its bridges) and removes stale devices of ours.
    pub async fn start(state_dir: &Path, listen_port: u16) -> Result<Arc<Self>, Error> {
        let secret = keys::load_or_create(state_dir)?;
        let udp = Arc::new(bind_udp(listen_port)?);
        let daemon = Arc::new(Self {
            engine: Mutex::new(Engine::new(secret)),
            udp: RwLock::new(Arc::clone(&udp)),
            tasks: Mutex::new(Vec::new()),
            udp_task: Mutex::new(None),
            taps: RwLock::new(HashMap::new()),
            netlink: Netlink::new()?,
            state_dir: state_dir.to_path_buf(),
            apply_lock: tokio::sync::Mutex::new(()),
        });
        {
            let mut e = lock(&daemon.engine);
            let mut cfg = e.config().clone();
            cfg.listen_port = udp.local_addr()?.port();
            e.apply(cfg);
        }
        daemon.spawn_udp(udp);
        let d = Arc::clone(&daemon);
        lock(&daemon.tasks).push(tokio::spawn(async move { d.timer().await }));
        if let Some(saved) = daemon.load_saved()? {
            match daemon.apply(saved).await {
                Ok(r) => tracing::info!(
                    revision = r.applied_revision,
                    "restored the last applied state"
                ),
                Err(e) => tracing::warn!(error = %e, "could not restore the last applied state"),
            }
        }
        let keep: Vec<u32> = lock(&daemon.engine)
            .config()
            .networks
            .values()
            .map(|n| n.vni)
            .collect();
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
        if let Some(t) = lock(&self.udp_task).take() {
            t.abort();
        }
        let mut taps = self
            .taps
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        for (_, t) in taps.drain() {
            t.reader.abort();
        }
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

    fn spawn_udp(self: &Arc<Self>, sock: Arc<UdpSocket>) {
        let d = Arc::clone(self);
        let task = tokio::spawn(async move {
            let mut buf = vec![0u8; 65_536];
            let mut out = Vec::new();
            let mut scratch = Scratch::default();
            loop {
                if let Err(e) = sock.readable().await {
                    tracing::debug!(error = %e, "udp readiness");
                    continue;
                }
                // Drain what is queued under one engine lock, then send the
                // results: one wakeup and one lock per burst, not per packet.
                {
                    let mut e = lock(&d.engine);
                    e.recycle(&mut scratch.spent);
                    let now = Instant::now();
                    for _ in 0..BATCH {
                        if out.len() >= MAX_OUTPUTS {
                            break;
                        }
                        match udp::try_recv(&sock, &mut buf) {
                            Ok((n, from, seg)) => {
                                for r in udp::gro_segments(n, seg) {
                                    e.handle_datagram(from, &buf[r], now, &mut out);
                                }
                            }
                            Err(err) if err.kind() == std::io::ErrorKind::WouldBlock => break,
                            Err(err) => {
                                tracing::debug!(error = %err, "udp receive");
                                break;
                            }
                        }
                    }
                }
                d.perform(&mut out, &mut scratch).await;
            }
        });
        if let Some(old) = lock(&self.udp_task).replace(task) {
            old.abort();
        }
    }

    async fn timer(self: Arc<Self>) {
        let mut iv = tokio::time::interval(TICK);
        let mut out = Vec::new();
        loop {
            iv.tick().await;
            lock(&self.engine).tick(Instant::now(), &mut out);
            self.perform(&mut out, &mut Scratch::default()).await;
        }
    }

    /// Sends what the engine produced. The non-blocking attempt almost always
    /// succeeds; only a full socket or TAP queue costs an await.
    async fn perform(&self, out: &mut Vec<Output>, scratch: &mut Scratch) {
        if out.is_empty() {
            return;
        }
        let sock = Arc::clone(
            &self
                .udp
                .read()
                .unwrap_or_else(std::sync::PoisonError::into_inner),
        );
        let mut tap: Option<(u32, Option<Arc<AsyncDevice>>)> = None;
        let mut i = 0;
        while i < out.len() {
            match &out[i] {
                Output::Udp { to, .. } => {
                    let to = *to;
                    let run = udp::gso_run(out[i..].iter().map_while(|o| match o {
                        Output::Udp { to, data } => Some((*to, data.len())),
                        Output::Tap { .. } => None,
                    }));
                    let mut sent = false;
                    if run > 1 {
                        let bufs: Vec<&[u8]> = out[i..i + run]
                            .iter()
                            .filter_map(|o| match o {
                                Output::Udp { data, .. } => Some(data.as_slice()),
                                Output::Tap { .. } => None,
                            })
                            .collect();
                        match udp::send_segmented(&sock, to, &bufs).await {
                            Ok(()) => sent = true,
                            // E.g. a path MTU below the segment size: send
                            // them one by one below.
                            Err(e) => tracing::debug!(error = %e, %to, "segmented udp send"),
                        }
                    }
                    if !sent {
                        for o in &out[i..i + run] {
                            if let Output::Udp { data, .. } = o
                                && let Err(e) = sock.send_to(data, to).await
                            {
                                tracing::debug!(error = %e, %to, "udp send");
                            }
                        }
                    }
                    i += run.max(1);
                }
                Output::Tap { vni, .. } => {
                    let vni = *vni;
                    let frames: Vec<&[u8]> = out[i..]
                        .iter()
                        .map_while(|o| match o {
                            Output::Tap { vni: v, frame } if *v == vni => Some(frame.as_slice()),
                            _ => None,
                        })
                        .collect();
                    i += frames.len();
                    if tap.as_ref().is_none_or(|(v, _)| *v != vni) {
                        let dev = self
                            .taps
                            .read()
                            .unwrap_or_else(std::sync::PoisonError::into_inner)
                            .get(&vni)
                            .map(|t| Arc::clone(&t.dev));
                        tap = Some((vni, dev));
                    }
                    let Some((_, Some(dev))) = &tap else { continue };
                    let mut j = 0;
                    while j < frames.len() {
                        // Runs of one TCP flow go up as one super-frame: one
                        // write, one trip through bridge and pod stack.
                        let n = offload::coalesce(&frames[j..], &mut scratch.gro).max(1);
                        let iov = if n > 1 {
                            [IoSlice::new(&scratch.gro), IoSlice::new(&[])]
                        } else {
                            [
                                IoSlice::new(&offload::PLAIN_RX_HDR),
                                IoSlice::new(frames[j]),
                            ]
                        };
                        j += n;
                        let r = match dev.try_send_vectored(&iov) {
                            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                                dev.send_vectored(&iov).await
                            }
                            r => r,
                        };
                        if let Err(e) = r {
                            tracing::debug!(error = %e, vni, "tap write");
                        }
                    }
                }
            }
        }
        scratch.spent.extend(out.drain(..).map(|o| match o {
            Output::Udp { data, .. } => data,
            Output::Tap { frame, .. } => frame,
        }));
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
        let mtu = u16::try_from(n.mtu).unwrap_or(u16::MAX);
        let dev = tun_rs::DeviceBuilder::new()
            .name(name.clone())
            .layer(tun_rs::Layer::L2)
            .mtu(mtu)
            .offload(true)
            .build_async()?;
        tcp_offloads_only(&dev)?;
        let dev = Arc::new(dev);
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
        let d = Arc::clone(self);
        let reader_dev = Arc::clone(&dev);
        let vni = n.vni;
        let reader = tokio::spawn(async move {
            // A TSO super-frame is up to 64 KiB of IP plus Ethernet and the
            // virtio-net header.
            let mut buf = vec![0u8; 65_536 + 1024];
            let mut seg_buf = Vec::with_capacity(65_536);
            let mut out = Vec::new();
            let mut scratch = Scratch::default();
            loop {
                if let Err(e) = reader_dev.readable().await {
                    tracing::warn!(error = %e, vni, "TAP wait failed; stopping its reader");
                    return;
                }
                {
                    let mut e = lock(&d.engine);
                    e.recycle(&mut scratch.spent);
                    let now = Instant::now();
                    for _ in 0..BATCH {
                        if out.len() >= MAX_OUTPUTS {
                            break;
                        }
                        match reader_dev.try_recv(&mut buf) {
                            Ok(len) => {
                                let r = offload::segment(&mut buf[..len], &mut seg_buf, |f| {
                                    e.handle_tap(vni, f, now, &mut out);
                                });
                                if let Err(err) = r {
                                    e.count_drop("bad_offload");
                                    tracing::debug!(error = %err, vni, "TAP frame dropped");
                                }
                            }
                            Err(err) if err.kind() == std::io::ErrorKind::WouldBlock => break,
                            Err(err) => {
                                drop(e);
                                tracing::warn!(error = %err, vni, "TAP read failed; stopping its reader");
                                return;
                            }
                        }
                    }
                }
                d.perform(&mut out, &mut scratch).await;
            }
        });
        let old = self
            .taps
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .insert(n.vni, Tap { dev, reader });
        if let Some(old) = old {
            old.reader.abort();
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
            t.reader.abort();
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

    /// Applies a desired state: validates it, changes only what differs,
    /// and remembers it for the next start.
    pub async fn apply(self: &Arc<Self>, desired: DesiredState) -> Result<ApplyResult, Error> {
        let _guard = self.apply_lock.lock().await;
        let cfg = Config::from_desired(&desired)?;
        let current = lock(&self.engine).config().clone();
        let diff = crate::config::Diff::between(&current, &cfg);
        for n in &diff.networks_removed {
            self.remove_network(n).await?;
        }
        for (old, new) in &diff.networks_changed {
            if old.vni != new.vni {
                self.remove_network(old).await?;
                self.add_network(new).await?;
            } else if old.mtu != new.mtu {
                self.set_network_mtu(new).await?;
            }
        }
        for n in &diff.networks_added {
            self.add_network(n).await?;
        }
        if cfg.listen_port != 0 && cfg.listen_port != current.listen_port {
            let sock = Arc::new(bind_udp(cfg.listen_port)?);
            *self
                .udp
                .write()
                .unwrap_or_else(std::sync::PoisonError::into_inner) = Arc::clone(&sock);
            self.spawn_udp(sock);
        }
        let mut out = Vec::new();
        let diff = {
            let mut engine = lock(&self.engine);
            let diff = engine.apply(cfg);
            engine.initiate_pending_handshakes(&mut out);
            diff
        };
        self.perform(&mut out, &mut Scratch::default()).await;
        self.save(&desired)?;
        let changes = diff.describe();
        if !changes.is_empty() {
            tracing::info!(
                revision = desired.revision,
                ?changes,
                "applied desired state"
            );
        }
        Ok(ApplyResult {
            applied_revision: desired.revision,
            changes,
        })
    }

    fn network(&self, name: &str) -> Result<NetConfig, Error> {
        lock(&self.engine)
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
        let mut e = lock(&self.engine);
        e.set_private_key(secret);
        Ok(e.public_key())
    }

    pub fn public_key(&self) -> [u8; 32] {
        lock(&self.engine).public_key()
    }

    pub fn local_port(&self) -> u16 {
        self.udp
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .local_addr()
            .map(|a| a.port())
            .unwrap_or(0)
    }

    /// Everything `GetStatus` reports.
    pub async fn status(&self) -> Result<NodeStatus, Error> {
        let now = Instant::now();
        let (cfg, peers, drops, pubkey, macs) = {
            let e = lock(&self.engine);
            let cfg = e.config().clone();
            let macs: HashMap<u32, _> = cfg
                .networks
                .values()
                .map(|n| (n.vni, e.macs(n.vni, now)))
                .collect();
            (cfg, e.peers(), e.drops().clone(), e.public_key(), macs)
        };
        let counters = |m: &std::collections::BTreeMap<&'static str, u64>| {
            m.iter()
                .map(|(r, c)| DropCounter {
                    reason: (*r).to_string(),
                    count: *c,
                })
                .collect::<Vec<_>>()
        };
        let mut networks = Vec::new();
        for n in cfg.networks.values() {
            let bridge = netdev::bridge_name(n.vni);
            let ports = self.netlink.ports(&bridge).await?;
            networks.push(NetworkStatus {
                name: n.name.clone(),
                vni: n.vni,
                mtu: n.mtu,
                ports: ports.iter().map(|p| p.ifname.clone()).collect(),
                port_status: ports.into_iter().map(port_status).collect(),
                bridge,
                tap: netdev::tap_name(n.vni),
                macs: macs
                    .get(&n.vni)
                    .map(|v| {
                        v.iter()
                            .map(|(mac, port, age)| MacEntry {
                                mac: mac.clone(),
                                port: port.clone(),
                                age_ms: u64::try_from(age.as_millis()).unwrap_or(u64::MAX),
                            })
                            .collect()
                    })
                    .unwrap_or_default(),
                pod_cidr: n.pod_cidr.clone(),
            });
        }
        Ok(NodeStatus {
            node_name: cfg.node_name.clone(),
            public_key: pubkey.to_vec(),
            listen_port: u32::from(self.local_port()),
            tunnel_ip: cfg.tunnel_ip.map(|i| i.to_string()).unwrap_or_default(),
            applied_revision: cfg.revision,
            peers: peers
                .iter()
                .map(|p| PeerStatus {
                    public_key: p.cfg.key.to_vec(),
                    name: if p.cfg.name.is_empty() {
                        key_b64(&p.cfg.key)
                    } else {
                        p.cfg.name.clone()
                    },
                    group: match p.cfg.group {
                        Group::Local => PeerGroup::Local,
                        Group::Remote => PeerGroup::Remote,
                    }
                    .into(),
                    endpoint: p.endpoint.map(|e| e.to_string()).unwrap_or_default(),
                    last_handshake_age_ms: p
                        .last_handshake
                        .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX)),
                    rx_bytes: p.stats.rx_bytes,
                    tx_bytes: p.stats.tx_bytes,
                    rx_packets: p.stats.rx_packets,
                    tx_packets: p.stats.tx_packets,
                    drops: counters(&p.stats.drops),
                    vnis: p.cfg.vnis.iter().copied().collect(),
                    tunnel_ip: p.cfg.tunnel_ip.to_string(),
                })
                .collect(),
            networks,
            drops: counters(&drops),
        })
    }
}

fn port_status(p: Port) -> PortStatus {
    let (pod_namespace, pod_name) = p.pod.map(|r| (r.namespace, r.name)).unwrap_or_default();
    PortStatus {
        ifname: p.ifname,
        pod_namespace,
        pod_name,
    }
}
