//! The sans-IO forwarding engine: WireGuard tunnels (one boringtun `Tunn`
//! per peer) around the switch. It consumes datagrams, TAP frames and clock
//! ticks and produces datagrams and TAP frames; the shell does the I/O.
//!
//! The engine is `Sync` so that the shell can run one worker per core on it.
//! Its state is split where unrelated traffic must not serialise: the node
//! state (keys, config, peer table) is read-mostly behind a `RwLock`, each
//! peer's tunnel has its own `Mutex`, the switch has one held only for a MAC
//! lookup, and every worker brings its own scratch [`Buffers`]. Lock order:
//! node state, then switch or a peer, never a peer while holding the switch.
//! Nothing here blocks on I/O or spawns anything.

mod datapath;
mod peer;

use std::collections::{BTreeMap, HashMap};
use std::net::{Ipv4Addr, SocketAddr};
use std::sync::{Arc, Mutex, MutexGuard, RwLock, RwLockReadGuard, RwLockWriteGuard};
use std::time::{Duration, Instant};

use boringtun::noise::Tunn;
use boringtun::noise::errors::WireGuardError;
use boringtun::noise::rate_limiter::RateLimiter;
use boringtun::x25519::{PublicKey, StaticSecret};

use crate::config::{Config, Diff, PeerConfig};
use crate::switch::{FastMap, PeerId, Port, Switch};

use peer::Peer;
pub use peer::{PeerStats, PeerView};

/// Handshakes per second above which the cookie mechanism kicks in.
const HANDSHAKE_RATE_LIMIT: u64 = 100;
/// boringtun needs room for the largest datagram plus its overhead.
const BUF_SIZE: usize = 65_536 + 256;
/// Peer indices are 24 bits: boringtun shifts them left by 8.
const MAX_PEER_ID: u32 = 0x00ff_ffff;
/// Buffers a worker keeps for reuse; enough for a few full batches in flight.
const POOL_MAX: usize = 4096;
/// How long tunnels may stay on the previous key after a rotation: long
/// enough for the new key to reach every peer through the control plane.
const PREVIOUS_KEY_GRACE: Duration = Duration::from_secs(60);
/// While a tunnel is on the previous key and sends, how often it tries a
/// handshake with the current key (see `Peer::probe`).
const PROBE_INTERVAL: Duration = Duration::from_secs(1);

/// What an apply did, beside comparing the states: the measure of its cost.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ApplyWork {
    /// boringtun tunnels made (new peers, a changed keepalive).
    pub tunnels_created: usize,
    pub tunnels_removed: usize,
    /// Peers changed in place (endpoint, VNIs, group, name).
    pub peers_updated: usize,
    /// MAC table entries looked at to forget MACs behind peers that left a
    /// VNI or were removed.
    pub mac_entries_scanned: usize,
}

/// Something the shell must do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Output {
    Udp { to: SocketAddr, data: Vec<u8> },
    Tap { vni: u32, frame: Vec<u8> },
}

/// Scratch space of one worker: boringtun's output buffers, the inner packet
/// being built, and a pool of output buffers so that a warmed-up worker does
/// not allocate per packet.
pub struct Buffers {
    buf: Vec<u8>,
    /// Where received datagrams are decrypted; sized on first use, as only
    /// the underlay readers need it.
    dec: Vec<u8>,
    inner: Vec<u8>,
    pool: Vec<Vec<u8>>,
}

impl Default for Buffers {
    fn default() -> Self {
        Self {
            buf: vec![0; BUF_SIZE],
            dec: Vec::new(),
            inner: Vec::with_capacity(BUF_SIZE),
            pool: Vec::new(),
        }
    }
}

impl std::fmt::Debug for Buffers {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Buffers")
            .field("pooled", &self.pool.len())
            .finish_non_exhaustive()
    }
}

impl Buffers {
    /// Takes back the buffers of outputs the shell has sent, so that the
    /// next outputs reuse them instead of allocating.
    pub fn recycle(&mut self, spent: &mut Vec<Vec<u8>>) {
        let room = POOL_MAX.saturating_sub(self.pool.len());
        let n = spent.len().min(room);
        self.pool.extend(spent.drain(..n));
        spent.clear();
    }

    /// A copy of `data` in a recycled buffer.
    fn pooled(pool: &mut Vec<Vec<u8>>, data: &[u8]) -> Vec<u8> {
        let mut v = pool.pop().unwrap_or_default();
        v.clear();
        v.extend_from_slice(data);
        v
    }
}

/// The node key before a rotation. Make-before-break: tunnels keep their
/// sessions on it until their peer, having learnt the new key, handshakes with
/// it, or until [`PREVIOUS_KEY_GRACE`] has passed.
struct PreviousKey {
    secret: StaticSecret,
    public: PublicKey,
    limiter: Arc<RateLimiter>,
    /// Set on the first tick after the rotation (the engine has no clock).
    retire_at: Option<Instant>,
}

/// Node-wide state: read on every packet, written by control operations.
struct State {
    secret: StaticSecret,
    public: PublicKey,
    limiter: Arc<RateLimiter>,
    cfg: Config,
    peers: FastMap<PeerId, Mutex<Peer>>,
    by_key: HashMap<[u8; 32], PeerId>,
    next_id: PeerId,
    last_limiter_reset: Option<Instant>,
    previous: Option<PreviousKey>,
}

/// The node's tunnels and switch.
pub struct Engine {
    state: RwLock<State>,
    /// Held for a whole apply (see [`Engine::apply_counted`]).
    apply_lock: Mutex<()>,
    switch: Mutex<Switch>,
    drops: Mutex<BTreeMap<&'static str, u64>>,
}

impl std::fmt::Debug for Engine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Engine")
            .field("public", &crate::config::key_b64(&self.public_key()))
            .finish_non_exhaustive()
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // A panic while holding the lock leaves plain data behind; keep going.
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

fn wg_error_label(e: &WireGuardError) -> &'static str {
    match e {
        WireGuardError::DuplicateCounter | WireGuardError::InvalidCounter => "replay",
        WireGuardError::InvalidAeadTag => "decrypt_failed",
        WireGuardError::NoCurrentSession => "no_session",
        WireGuardError::InvalidMac => "bad_mac",
        WireGuardError::UnderLoad => "under_load",
        WireGuardError::WrongTai64nTimestamp | WireGuardError::InvalidTai64nTimestamp => {
            "replayed_handshake"
        }
        _ => "wireguard_error",
    }
}

fn bump(map: &mut BTreeMap<&'static str, u64>, reason: &'static str) {
    *map.entry(reason).or_default() += 1;
}

impl State {
    fn new_tunn(&self, id: PeerId, cfg: &PeerConfig) -> Tunn {
        Tunn::new(
            self.secret.clone(),
            PublicKey::from(cfg.key),
            None,
            cfg.keepalive,
            id,
            Some(Arc::clone(&self.limiter)),
        )
    }

    fn alloc_id(&mut self) -> PeerId {
        loop {
            let id = self.next_id;
            self.next_id = if id >= MAX_PEER_ID { 1 } else { id + 1 };
            if !self.peers.contains_key(&id) {
                return id;
            }
        }
    }

    fn has_network(&self, vni: u32) -> bool {
        self.cfg.networks.values().any(|n| n.vni == vni)
    }

    /// Move one tunnel still on the previous key to the current one.
    fn move_to_current_key(&self, peer: &mut Peer) {
        peer.probe = None;
        if peer.on_previous_key {
            peer.tunn.set_static_private(
                self.secret.clone(),
                self.public,
                Some(Arc::clone(&self.limiter)),
            );
            peer.on_previous_key = false;
        }
    }

    /// Move every tunnel still on the previous key to the current one.
    fn retire_previous_key(&mut self) {
        if self.previous.take().is_none() {
            return;
        }
        for cell in self.peers.values() {
            self.move_to_current_key(&mut lock(cell));
        }
    }
}

impl Engine {
    pub fn new(secret: StaticSecret) -> Self {
        let public = PublicKey::from(&secret);
        Self {
            state: RwLock::new(State {
                limiter: Arc::new(RateLimiter::new(&public, HANDSHAKE_RATE_LIMIT)),
                secret,
                public,
                cfg: Config::default(),
                peers: FastMap::default(),
                by_key: HashMap::new(),
                next_id: 1,
                last_limiter_reset: None,
                previous: None,
            }),
            apply_lock: Mutex::new(()),
            switch: Mutex::new(Switch::default()),
            drops: Mutex::new(BTreeMap::new()),
        }
    }

    fn read(&self) -> RwLockReadGuard<'_, State> {
        self.state
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn write(&self) -> RwLockWriteGuard<'_, State> {
        self.state
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    pub fn public_key(&self) -> [u8; 32] {
        *self.read().public.as_bytes()
    }

    /// The applied configuration.
    pub fn config(&self) -> Config {
        self.read().cfg.clone()
    }

    /// The tunnel address of this node, if configured.
    pub fn tunnel_ip(&self) -> Option<Ipv4Addr> {
        self.read().cfg.tunnel_ip
    }

    /// Counts a node-wide drop the shell detected (e.g. a TAP frame it could
    /// not segment).
    pub fn count_drop(&self, reason: &'static str) {
        bump(&mut lock(&self.drops), reason);
    }

    /// Node-wide drop counters (packets not attributable to a peer).
    pub fn drops(&self) -> BTreeMap<&'static str, u64> {
        lock(&self.drops).clone()
    }

    /// Makes `cfg` the current state, touching only what differs. Peers that
    /// did not change keep their sessions.
    pub fn apply(&self, cfg: Config) -> Diff {
        self.apply_counted(cfg).0
    }

    /// [`Engine::apply`], also saying how much work it did: everything but
    /// the diff itself (a comparison of the two states) is proportional to
    /// what changed.
    pub fn apply_counted(&self, cfg: Config) -> (Diff, ApplyWork) {
        // Applies run one at a time, and only an apply changes `cfg`: the
        // diff (linear in the states' size) is made under the read lock,
        // so packets are held up only by the changes themselves.
        let _one_at_a_time = lock(&self.apply_lock);
        let diff = Diff::between(&self.read().cfg, &cfg);
        let mut st = self.write();
        let mut switch = lock(&self.switch);
        let mut work = ApplyWork::default();
        for n in &diff.networks_removed {
            switch.remove_network(n.vni);
        }
        for (old, new) in &diff.networks_changed {
            if old.vni != new.vni {
                switch.remove_network(old.vni);
            }
        }
        for n in diff
            .networks_added
            .iter()
            .chain(diff.networks_changed.iter().map(|(_, new)| new))
        {
            switch.set_network(n.vni, n.mtu);
        }
        // A peer that rotated its key shows up as removed + added with the same
        // tunnel IP. Keep the address it was last heard from: the configured
        // endpoint may be one this node cannot reach (a gateway's WAN address).
        let mut last_heard: HashMap<Ipv4Addr, SocketAddr> = HashMap::new();
        for p in &diff.peers_removed {
            if let Some(id) = st.by_key.remove(&p.key) {
                let gone = st.peers.remove(&id).map(|c| {
                    c.into_inner()
                        .unwrap_or_else(std::sync::PoisonError::into_inner)
                });
                if let Some(endpoint) = gone.and_then(|peer| peer.endpoint) {
                    last_heard.insert(p.tunnel_ip, endpoint);
                }
                work.mac_entries_scanned += switch.remove_peer(id);
                work.tunnels_removed += 1;
            }
        }
        let me = *st.public.as_bytes();
        for p in &diff.peers_added {
            if p.key == me {
                continue;
            }
            let id = st.alloc_id();
            let tunn = st.new_tunn(id, p);
            work.tunnels_created += 1;
            work.mac_entries_scanned += switch.set_peer(id, p.group, p.vnis.clone());
            st.by_key.insert(p.key, id);
            let endpoint = last_heard.get(&p.tunnel_ip).copied().or(p.endpoint);
            st.peers
                .insert(id, Mutex::new(Peer::new(p.clone(), tunn, endpoint)));
        }
        for (old, new) in &diff.peers_changed {
            let Some(id) = st.by_key.get(&new.key).copied() else {
                continue;
            };
            let fresh = (old.keepalive != new.keepalive).then(|| st.new_tunn(id, new));
            if let Some(cell) = st.peers.get(&id) {
                let mut peer = lock(cell);
                if let Some(t) = fresh {
                    // boringtun cannot change keepalive in place.
                    peer.tunn = t;
                    peer.on_previous_key = false;
                    work.tunnels_created += 1;
                }
                if old.endpoint != new.endpoint && new.endpoint.is_some() {
                    peer.endpoint = new.endpoint;
                }
                peer.cfg = new.clone();
                work.peers_updated += 1;
            }
            work.mac_entries_scanned += switch.set_peer(id, new.group, new.vnis.clone());
        }
        let port = if cfg.listen_port == 0 {
            st.cfg.listen_port
        } else {
            cfg.listen_port
        };
        let old = std::mem::replace(
            &mut st.cfg,
            Config {
                listen_port: port,
                ..cfg
            },
        );
        drop(switch);
        drop(st);
        // Freed outside the locks: it is as large as the whole state.
        drop(old);
        (diff, work)
    }

    /// Handshake initiations for the peers an apply added (what the next
    /// tick would send), touching no other peer.
    pub fn initiate_handshakes_for(
        &self,
        added: &[PeerConfig],
        bufs: &mut Buffers,
        out: &mut Vec<Output>,
    ) {
        let st = self.read();
        for p in added {
            if let Some(cell) = st.by_key.get(&p.key).and_then(|id| st.peers.get(id)) {
                lock(cell).initiate_if_pending(bufs, out);
            }
        }
    }

    /// The applied configuration without its peers: what the device steps
    /// of an apply compare against (cheap whatever the number of peers).
    pub fn config_without_peers(&self) -> Config {
        let st = self.read();
        Config {
            revision: st.cfg.revision,
            node_name: st.cfg.node_name.clone(),
            tunnel_ip: st.cfg.tunnel_ip,
            listen_port: st.cfg.listen_port,
            networks: st.cfg.networks.clone(),
            peers: BTreeMap::new(),
        }
    }

    /// Rotate the node key. Existing tunnels keep their sessions (on the
    /// previous key) so traffic flows on; each moves to the new key when its
    /// peer handshakes with the new key, and all do after the grace period.
    /// New tunnels use the new key at once.
    pub fn set_private_key(&self, secret: StaticSecret) {
        let mut st = self.write();
        let public = PublicKey::from(&secret);
        // A second rotation within the grace period retires the oldest key now.
        st.retire_previous_key();
        let limiter = Arc::new(RateLimiter::new(&public, HANDSHAKE_RATE_LIMIT));
        let old_limiter = std::mem::replace(&mut st.limiter, limiter);
        let old_secret = std::mem::replace(&mut st.secret, secret);
        let old_public = std::mem::replace(&mut st.public, public);
        for cell in st.peers.values() {
            lock(cell).start_rotation();
        }
        st.previous = Some(PreviousKey {
            secret: old_secret,
            public: old_public,
            limiter: old_limiter,
            retire_at: None,
        });
    }

    /// Drives timers: handshakes, keepalives, rekeying, session expiry and
    /// MAC aging. Call it a few times per second.
    pub fn tick(&self, now: Instant, bufs: &mut Buffers, out: &mut Vec<Output>) {
        {
            let mut st = self.write();
            if st
                .last_limiter_reset
                .is_none_or(|t| now.saturating_duration_since(t) >= Duration::from_secs(1))
            {
                st.limiter.reset_count();
                if let Some(prev) = &st.previous {
                    prev.limiter.reset_count();
                }
                st.last_limiter_reset = Some(now);
                lock(&self.switch).expire(now);
            }
            if let Some(prev) = &mut st.previous {
                let retire_at = *prev.retire_at.get_or_insert(now + PREVIOUS_KEY_GRACE);
                if now >= retire_at || st.peers.values().all(|p| !lock(p).on_previous_key) {
                    st.retire_previous_key();
                }
            }
        }
        self.initiate_pending_handshakes(bufs, out);
        let st = self.read();
        for (&id, cell) in st.peers.iter() {
            let mut peer = lock(cell);
            peer.update_timers(bufs, out);
            peer.probe_current_key(id, &st.secret, &st.limiter, now, bufs, out);
            peer.expire_fragments(now);
        }
    }

    /// Handshake initiations for peers added since the last call (also done
    /// on every tick); call right after [`Engine::apply`] to save a tick.
    pub fn initiate_pending_handshakes(&self, bufs: &mut Buffers, out: &mut Vec<Output>) {
        let st = self.read();
        for cell in st.peers.values() {
            lock(cell).initiate_if_pending(bufs, out);
        }
    }

    /// All peers, sorted by key.
    pub fn peers(&self) -> Vec<PeerView> {
        let st = self.read();
        let mut v: Vec<PeerView> = st.peers.values().map(|p| lock(p).view()).collect();
        v.sort_by_key(|p| p.cfg.key);
        v
    }

    /// The MAC table of a network with ports named "tap" or by peer label.
    pub fn macs(&self, vni: u32, now: Instant) -> Vec<(String, String, Duration)> {
        let st = self.read();
        let table = lock(&self.switch).macs(vni, now);
        table
            .into_iter()
            .map(|m| {
                let port = match m.port {
                    Port::Tap => "tap".to_string(),
                    Port::Peer(id) => st
                        .peers
                        .get(&id)
                        .map(|p| lock(p).cfg.label())
                        .unwrap_or_default(),
                };
                let mac = m
                    .mac
                    .iter()
                    .map(|b| format!("{b:02x}"))
                    .collect::<Vec<_>>()
                    .join(":");
                (mac, port, m.age)
            })
            .collect()
    }
}

#[cfg(test)]
mod apply_cost_tests;
#[cfg(test)]
mod concurrency_tests;
#[cfg(test)]
mod cost_tests;
#[cfg(test)]
mod stock_peer_tests;
#[cfg(test)]
mod tests;
