//! The sans-IO forwarding engine: WireGuard tunnels (one boringtun `Tunn`
//! per peer) around the switch. It consumes datagrams, TAP frames and clock
//! ticks and produces datagrams and TAP frames; the shell does the I/O.

use std::collections::{BTreeMap, HashMap};
use std::net::{Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, Instant};

use boringtun::noise::errors::WireGuardError;
use boringtun::noise::handshake::parse_handshake_anon;
use boringtun::noise::rate_limiter::RateLimiter;
use boringtun::noise::{Packet, Tunn, TunnResult};
use boringtun::x25519::{PublicKey, StaticSecret};

use crate::config::{Config, Diff, PeerConfig};
use crate::switch::{DropReason, Forward, PeerId, Port, Switch};
use crate::wire;

/// Handshakes per second above which the cookie mechanism kicks in.
const HANDSHAKE_RATE_LIMIT: u64 = 100;
/// boringtun needs room for the largest datagram plus its overhead.
const BUF_SIZE: usize = 65_536 + 256;
/// Peer indices are 24 bits: boringtun shifts them left by 8.
const MAX_PEER_ID: u32 = 0x00ff_ffff;

/// Something the shell must do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Output {
    Udp { to: SocketAddr, data: Vec<u8> },
    Tap { vni: u32, frame: Vec<u8> },
}

/// Traffic and drop counters of one peer.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PeerStats {
    pub rx_bytes: u64,
    pub tx_bytes: u64,
    pub rx_packets: u64,
    pub tx_packets: u64,
    pub drops: BTreeMap<&'static str, u64>,
}

struct Peer {
    cfg: PeerConfig,
    tunn: Tunn,
    endpoint: Option<SocketAddr>,
    stats: PeerStats,
    /// The tunnel still runs on the node key from before the last rotation
    /// (its sessions are alive; see [`PreviousKey`]).
    on_previous_key: bool,
    /// Send a handshake initiation on the next tick instead of waiting for
    /// traffic: a peer that rotated its key moves to it only when we handshake.
    handshake_now: bool,
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

/// How long tunnels may stay on the previous key after a rotation: long
/// enough for the new key to reach every peer through the control plane.
const PREVIOUS_KEY_GRACE: Duration = Duration::from_secs(60);

impl std::fmt::Debug for Peer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Peer")
            .field("cfg", &self.cfg)
            .field("endpoint", &self.endpoint)
            .finish_non_exhaustive()
    }
}

/// A peer as shown in status.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeerView {
    pub cfg: PeerConfig,
    pub endpoint: Option<SocketAddr>,
    pub last_handshake: Option<Duration>,
    pub stats: PeerStats,
}

/// The node's tunnels and switch.
pub struct Engine {
    secret: StaticSecret,
    public: PublicKey,
    limiter: Arc<RateLimiter>,
    cfg: Config,
    peers: HashMap<PeerId, Peer>,
    by_key: HashMap<[u8; 32], PeerId>,
    next_id: PeerId,
    switch: Switch,
    drops: BTreeMap<&'static str, u64>,
    last_limiter_reset: Option<Instant>,
    previous: Option<PreviousKey>,
    buf: Vec<u8>,
    inner: Vec<u8>,
    pool: Vec<Vec<u8>>,
}

impl std::fmt::Debug for Engine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Engine")
            .field("public", &crate::config::key_b64(self.public.as_bytes()))
            .field("peers", &self.peers)
            .finish_non_exhaustive()
    }
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

/// Buffers kept for reuse; enough for a few full batches in flight.
const POOL_MAX: usize = 4096;

/// A copy of `data` in a recycled buffer: no allocation once warmed up.
fn pooled(pool: &mut Vec<Vec<u8>>, data: &[u8]) -> Vec<u8> {
    let mut v = pool.pop().unwrap_or_default();
    v.clear();
    v.extend_from_slice(data);
    v
}

fn bump(map: &mut BTreeMap<&'static str, u64>, reason: &'static str) {
    *map.entry(reason).or_default() += 1;
}

impl Engine {
    pub fn new(secret: StaticSecret) -> Self {
        let public = PublicKey::from(&secret);
        Self {
            limiter: Arc::new(RateLimiter::new(&public, HANDSHAKE_RATE_LIMIT)),
            secret,
            public,
            cfg: Config::default(),
            peers: HashMap::new(),
            by_key: HashMap::new(),
            next_id: 1,
            switch: Switch::default(),
            drops: BTreeMap::new(),
            last_limiter_reset: None,
            previous: None,
            buf: vec![0; BUF_SIZE],
            inner: Vec::with_capacity(BUF_SIZE),
            pool: Vec::new(),
        }
    }

    pub fn public_key(&self) -> [u8; 32] {
        *self.public.as_bytes()
    }

    pub fn config(&self) -> &Config {
        &self.cfg
    }

    /// Takes back the buffers of outputs the shell has sent, so that the
    /// next outputs reuse them instead of allocating.
    pub fn recycle(&mut self, spent: &mut Vec<Vec<u8>>) {
        let room = POOL_MAX.saturating_sub(self.pool.len());
        let n = spent.len().min(room);
        self.pool.extend(spent.drain(..n));
        spent.clear();
    }

    /// Counts a node-wide drop the shell detected (e.g. a TAP frame it could
    /// not segment).
    pub fn count_drop(&mut self, reason: &'static str) {
        bump(&mut self.drops, reason);
    }

    /// Node-wide drop counters (packets not attributable to a peer).
    pub fn drops(&self) -> &BTreeMap<&'static str, u64> {
        &self.drops
    }

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

    /// Makes `cfg` the current state, touching only what differs. Peers that
    /// did not change keep their sessions.
    pub fn apply(&mut self, cfg: Config) -> Diff {
        let diff = Diff::between(&self.cfg, &cfg);
        for n in &diff.networks_removed {
            self.switch.remove_network(n.vni);
        }
        for (old, new) in &diff.networks_changed {
            if old.vni != new.vni {
                self.switch.remove_network(old.vni);
            }
        }
        for n in cfg.networks.values() {
            self.switch.set_network(n.vni, n.mtu);
        }
        // A peer that rotated its key shows up as removed + added with the same
        // tunnel IP. Keep the address it was last heard from: the configured
        // endpoint may be one this node cannot reach (a gateway's WAN address).
        let mut last_heard: HashMap<Ipv4Addr, SocketAddr> = HashMap::new();
        for p in &diff.peers_removed {
            if let Some(id) = self.by_key.remove(&p.key) {
                if let Some(endpoint) = self.peers.remove(&id).and_then(|peer| peer.endpoint) {
                    last_heard.insert(p.tunnel_ip, endpoint);
                }
                self.switch.remove_peer(id);
            }
        }
        for p in &diff.peers_added {
            if p.key == self.public_key() {
                continue;
            }
            let id = self.alloc_id();
            let tunn = self.new_tunn(id, p);
            self.switch.set_peer(id, p.group, p.vnis.clone());
            self.by_key.insert(p.key, id);
            let endpoint = last_heard.get(&p.tunnel_ip).copied().or(p.endpoint);
            self.peers.insert(
                id,
                Peer {
                    cfg: p.clone(),
                    tunn,
                    endpoint,
                    stats: PeerStats::default(),
                    on_previous_key: false,
                    handshake_now: endpoint.is_some(),
                },
            );
        }
        for (old, new) in &diff.peers_changed {
            let Some(id) = self.by_key.get(&new.key).copied() else {
                continue;
            };
            let fresh = (old.keepalive != new.keepalive).then(|| self.new_tunn(id, new));
            if let Some(peer) = self.peers.get_mut(&id) {
                if let Some(t) = fresh {
                    // boringtun cannot change keepalive in place.
                    peer.tunn = t;
                    peer.on_previous_key = false;
                }
                if old.endpoint != new.endpoint && new.endpoint.is_some() {
                    peer.endpoint = new.endpoint;
                }
                peer.cfg = new.clone();
            }
            self.switch.set_peer(id, new.group, new.vnis.clone());
        }
        let port = if cfg.listen_port == 0 {
            self.cfg.listen_port
        } else {
            cfg.listen_port
        };
        self.cfg = Config {
            listen_port: port,
            ..cfg
        };
        diff
    }

    /// Replaces the node key; every peer re-handshakes with the new one.
    /// Rotate the node key. Existing tunnels keep their sessions (on the
    /// previous key) so traffic flows on; each moves to the new key when its
    /// peer handshakes with the new key, and all do after the grace period.
    /// New tunnels use the new key at once.
    pub fn set_private_key(&mut self, secret: StaticSecret) {
        let public = PublicKey::from(&secret);
        // A second rotation within the grace period retires the oldest key now.
        self.retire_previous_key();
        let limiter = Arc::new(RateLimiter::new(&public, HANDSHAKE_RATE_LIMIT));
        let old_limiter = std::mem::replace(&mut self.limiter, limiter);
        let old_secret = std::mem::replace(&mut self.secret, secret);
        let old_public = std::mem::replace(&mut self.public, public);
        for peer in self.peers.values_mut() {
            peer.on_previous_key = true;
        }
        self.previous = Some(PreviousKey {
            secret: old_secret,
            public: old_public,
            limiter: old_limiter,
            retire_at: None,
        });
    }

    /// Move every tunnel still on the previous key to the current one.
    fn retire_previous_key(&mut self) {
        if self.previous.take().is_none() {
            return;
        }
        for peer in self.peers.values_mut().filter(|p| p.on_previous_key) {
            peer.tunn.set_static_private(
                self.secret.clone(),
                self.public,
                Some(Arc::clone(&self.limiter)),
            );
            peer.on_previous_key = false;
        }
    }

    fn has_network(&self, vni: u32) -> bool {
        self.cfg.networks.values().any(|n| n.vni == vni)
    }

    /// A datagram from the underlay socket.
    pub fn handle_datagram(
        &mut self,
        src: SocketAddr,
        data: &[u8],
        now: Instant,
        out: &mut Vec<Output>,
    ) {
        let mut verified = self
            .limiter
            .verify_packet(Some(src.ip()), data, &mut self.buf);
        if let (Err(TunnResult::Err(WireGuardError::InvalidMac)), Some(prev)) =
            (&verified, &self.previous)
        {
            // A handshake still addressed to the key from before the rotation.
            verified = prev
                .limiter
                .verify_packet(Some(src.ip()), data, &mut self.buf);
        }
        let packet = match verified {
            Ok(p) => p,
            Err(TunnResult::WriteToNetwork(cookie)) => {
                bump(&mut self.drops, "cookie_sent");
                out.push(Output::Udp {
                    to: src,
                    data: pooled(&mut self.pool, cookie),
                });
                return;
            }
            Err(TunnResult::Err(e)) => {
                bump(
                    &mut self.drops,
                    if matches!(e, WireGuardError::InvalidMac) {
                        "bad_mac"
                    } else {
                        "invalid_packet"
                    },
                );
                return;
            }
            Err(_) => {
                bump(&mut self.drops, "invalid_packet");
                return;
            }
        };
        let id = match packet {
            Packet::HandshakeInit(p) => {
                let (parsed, to_current_key) =
                    match parse_handshake_anon(&self.secret, &self.public, &p) {
                        Ok(h) => (Ok(h), true),
                        Err(e) => match &self.previous {
                            Some(prev) => {
                                (parse_handshake_anon(&prev.secret, &prev.public, &p), false)
                            }
                            None => (Err(e), false),
                        },
                    };
                match parsed {
                    Ok(h) => match self.by_key.get(&h.peer_static_public).copied() {
                        Some(id) => {
                            if to_current_key {
                                self.move_to_current_key(id);
                            }
                            id
                        }
                        None => {
                            bump(&mut self.drops, "unknown_key");
                            return;
                        }
                    },
                    Err(_) => {
                        bump(&mut self.drops, "bad_handshake");
                        return;
                    }
                }
            }
            Packet::HandshakeResponse(p) => p.receiver_idx >> 8,
            Packet::PacketCookieReply(p) => p.receiver_idx >> 8,
            Packet::PacketData(p) => p.receiver_idx >> 8,
        };
        let Some(peer) = self.peers.get_mut(&id) else {
            bump(&mut self.drops, "unknown_index");
            return;
        };
        let mut delivered: Option<Vec<u8>> = None;
        let mut ok = false;
        match peer.tunn.decapsulate(Some(src.ip()), data, &mut self.buf) {
            TunnResult::Done => ok = true,
            TunnResult::Err(e) => bump(&mut peer.stats.drops, wg_error_label(&e)),
            TunnResult::WriteToNetwork(reply) => {
                ok = true;
                out.push(Output::Udp {
                    to: src,
                    data: pooled(&mut self.pool, reply),
                });
                // Packets queued while the handshake was in flight.
                while let TunnResult::WriteToNetwork(p) =
                    peer.tunn.decapsulate(None, &[], &mut self.buf)
                {
                    peer.stats.tx_packets += 1;
                    peer.stats.tx_bytes += p.len() as u64;
                    out.push(Output::Udp {
                        to: src,
                        data: pooled(&mut self.pool, p),
                    });
                }
            }
            TunnResult::WriteToTunnelV4(pkt, _) => {
                ok = true;
                delivered = Some(pooled(&mut self.pool, pkt));
            }
            TunnResult::WriteToTunnelV6(..) => {
                ok = true;
                bump(&mut peer.stats.drops, "not_vxlan");
            }
        }
        if !ok {
            return;
        }
        // Authenticated: roam to where it came from.
        peer.endpoint = Some(src);
        peer.stats.rx_packets += 1;
        peer.stats.rx_bytes += data.len() as u64;
        let Some(pkt) = delivered else { return };
        let tunnel_ip = peer.cfg.tunnel_ip;
        self.deliver(id, tunnel_ip, &pkt, now, out);
        if self.pool.len() < POOL_MAX {
            self.pool.push(pkt);
        }
    }

    /// The peer handshakes with our current key: it has learnt it, so its
    /// tunnel leaves the previous key (dropping the old sessions, which the
    /// peer has dropped too).
    fn move_to_current_key(&mut self, id: PeerId) {
        if let Some(peer) = self.peers.get_mut(&id).filter(|p| p.on_previous_key) {
            peer.tunn.set_static_private(
                self.secret.clone(),
                self.public,
                Some(Arc::clone(&self.limiter)),
            );
            peer.on_previous_key = false;
        }
    }

    /// The decrypted inner packet of peer `id`: check it and switch its frame.
    fn deliver(
        &mut self,
        id: PeerId,
        tunnel_ip: Ipv4Addr,
        pkt: &[u8],
        now: Instant,
        out: &mut Vec<Output>,
    ) {
        let reason = match wire::decode(pkt) {
            Ok(d) if d.src == tunnel_ip => {
                let result = self.switch.from_peer(id, d.vni, d.frame, now);
                self.dispatch(Port::Peer(id), d.vni, d.frame, result, now, out);
                return;
            }
            Ok(_) => "bad_inner_source",
            Err(_) => "bad_vxlan",
        };
        if let Some(p) = self.peers.get_mut(&id) {
            bump(&mut p.stats.drops, reason);
        }
    }

    /// A frame read from the TAP of network `vni`.
    pub fn handle_tap(&mut self, vni: u32, frame: &[u8], now: Instant, out: &mut Vec<Output>) {
        let result = self.switch.from_tap(vni, frame, now);
        self.dispatch(Port::Tap, vni, frame, result, now, out);
    }

    fn dispatch(
        &mut self,
        ingress: Port,
        vni: u32,
        frame: &[u8],
        result: Result<Forward, DropReason>,
        _now: Instant,
        out: &mut Vec<Output>,
    ) {
        let fwd = match result {
            Ok(f) => f,
            Err(reason) => {
                match ingress {
                    Port::Peer(id) => {
                        if let Some(p) = self.peers.get_mut(&id) {
                            bump(&mut p.stats.drops, reason.as_str());
                        }
                    }
                    Port::Tap => bump(&mut self.drops, reason.as_str()),
                }
                return;
            }
        };
        if fwd.suppressed > 0
            && let Port::Peer(id) = ingress
            && let Some(p) = self.peers.get_mut(&id)
        {
            *p.stats
                .drops
                .entry(DropReason::SplitHorizon.as_str())
                .or_default() += u64::from(fwd.suppressed);
        }
        if fwd.to_tap && self.has_network(vni) {
            out.push(Output::Tap {
                vni,
                frame: pooled(&mut self.pool, frame),
            });
        }
        let Some(src_ip) = self.cfg.tunnel_ip else {
            if !fwd.peers.is_empty() {
                bump(&mut self.drops, "no_tunnel_ip");
            }
            return;
        };
        for id in fwd.peers {
            let Some(peer) = self.peers.get_mut(&id) else {
                continue;
            };
            wire::encode(&mut self.inner, src_ip, peer.cfg.tunnel_ip, vni, frame);
            match peer.tunn.encapsulate(&self.inner, &mut self.buf) {
                TunnResult::WriteToNetwork(p) => match peer.endpoint {
                    Some(to) => {
                        peer.stats.tx_packets += 1;
                        peer.stats.tx_bytes += p.len() as u64;
                        out.push(Output::Udp {
                            to,
                            data: pooled(&mut self.pool, p),
                        });
                    }
                    None => bump(&mut peer.stats.drops, "no_endpoint"),
                },
                TunnResult::Err(e) => bump(&mut peer.stats.drops, wg_error_label(&e)),
                // Queued until the handshake completes.
                _ => {}
            }
        }
    }

    /// Drives timers: handshakes, keepalives, rekeying, session expiry and
    /// MAC aging. Call it a few times per second.
    pub fn tick(&mut self, now: Instant, out: &mut Vec<Output>) {
        if self
            .last_limiter_reset
            .is_none_or(|t| now.saturating_duration_since(t) >= Duration::from_secs(1))
        {
            self.limiter.reset_count();
            if let Some(prev) = &self.previous {
                prev.limiter.reset_count();
            }
            self.last_limiter_reset = Some(now);
            self.switch.expire(now);
        }
        if let Some(prev) = &mut self.previous {
            let retire_at = *prev.retire_at.get_or_insert(now + PREVIOUS_KEY_GRACE);
            if now >= retire_at || self.peers.values().all(|p| !p.on_previous_key) {
                self.retire_previous_key();
            }
        }
        self.initiate_pending_handshakes(out);
        for peer in self.peers.values_mut() {
            match peer.tunn.update_timers(&mut self.buf) {
                TunnResult::WriteToNetwork(p) => {
                    if let Some(to) = peer.endpoint {
                        peer.stats.tx_packets += 1;
                        peer.stats.tx_bytes += p.len() as u64;
                        out.push(Output::Udp {
                            to,
                            data: pooled(&mut self.pool, p),
                        });
                    }
                }
                TunnResult::Err(WireGuardError::ConnectionExpired) | TunnResult::Done => {}
                TunnResult::Err(e) => bump(&mut peer.stats.drops, wg_error_label(&e)),
                _ => {}
            }
        }
    }

    /// Handshake initiations for peers added since the last call (also done
    /// on every tick); call right after [`Engine::apply`] to save a tick.
    pub fn initiate_pending_handshakes(&mut self, out: &mut Vec<Output>) {
        for peer in self.peers.values_mut() {
            if std::mem::take(&mut peer.handshake_now)
                && let (Some(to), TunnResult::WriteToNetwork(p)) = (
                    peer.endpoint,
                    peer.tunn.format_handshake_initiation(&mut self.buf, false),
                )
            {
                peer.stats.tx_packets += 1;
                peer.stats.tx_bytes += p.len() as u64;
                out.push(Output::Udp {
                    to,
                    data: pooled(&mut self.pool, p),
                });
            }
        }
    }

    /// All peers, sorted by key.
    pub fn peers(&self) -> Vec<PeerView> {
        let mut v: Vec<PeerView> = self
            .peers
            .values()
            .map(|p| PeerView {
                cfg: p.cfg.clone(),
                endpoint: p.endpoint,
                last_handshake: p.tunn.time_since_last_handshake(),
                stats: p.stats.clone(),
            })
            .collect();
        v.sort_by_key(|p| p.cfg.key);
        v
    }

    /// The MAC table of a network with ports named "tap" or by peer label.
    pub fn macs(&self, vni: u32, now: Instant) -> Vec<(String, String, Duration)> {
        self.switch
            .macs(vni, now)
            .into_iter()
            .map(|m| {
                let port = match m.port {
                    Port::Tap => "tap".to_string(),
                    Port::Peer(id) => self
                        .peers
                        .get(&id)
                        .map(|p| p.cfg.label())
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

    /// The tunnel address of this node, if configured.
    pub fn tunnel_ip(&self) -> Option<Ipv4Addr> {
        self.cfg.tunnel_ip
    }
}

#[cfg(test)]
#[path = "engine_tests.rs"]
mod tests;
