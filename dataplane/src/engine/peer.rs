//! One peer's tunnel: its boringtun `Tunn`, where it is reached and its
//! counters. Each lives behind its own lock, so peers never wait for each other.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use boringtun::noise::errors::WireGuardError;
use boringtun::noise::rate_limiter::RateLimiter;
use boringtun::noise::{Tunn, TunnResult};
use boringtun::x25519::{PublicKey, StaticSecret};

use super::{Buffers, Output, PROBE_INTERVAL, PeerId, bump, wg_error_label};
use crate::config::PeerConfig;
use crate::reassembly::Reassembly;

/// Traffic and drop counters of one peer.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PeerStats {
    pub rx_bytes: u64,
    pub tx_bytes: u64,
    pub rx_packets: u64,
    pub tx_packets: u64,
    pub drops: BTreeMap<&'static str, u64>,
}

/// A peer as shown in status.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeerView {
    pub cfg: PeerConfig,
    pub endpoint: Option<SocketAddr>,
    pub last_handshake: Option<Duration>,
    pub stats: PeerStats,
}

pub(super) struct Peer {
    pub(super) cfg: PeerConfig,
    pub(super) tunn: Tunn,
    pub(super) endpoint: Option<SocketAddr>,
    pub(super) stats: PeerStats,
    /// The tunnel still runs on the node key from before the last rotation
    /// (its sessions are alive; see `PreviousKey`).
    pub(super) on_previous_key: bool,
    /// Send a handshake initiation on the next tick instead of waiting for
    /// traffic: a peer that rotated its key moves to it only when we handshake.
    pub(super) handshake_now: bool,
    /// Inner IPv4 packets that arrived fragmented, being joined.
    pub(super) reassembly: Reassembly,
    /// While the tunnel is on the previous key: a tunnel on the current key
    /// that handshakes beside it. A peer that answers it has the new key
    /// (a stock peer reconfigured by hand never handshakes first); its
    /// session then replaces the old one.
    pub(super) probe: Option<Tunn>,
    /// When the last probe initiation left.
    pub(super) probe_sent: Option<Instant>,
    /// `tx_packets` when the last probe left (or at the rotation): probes
    /// go out only while we send.
    pub(super) probe_tx_mark: u64,
}

impl Peer {
    pub(super) fn new(cfg: PeerConfig, tunn: Tunn, endpoint: Option<SocketAddr>) -> Self {
        Self {
            cfg,
            tunn,
            endpoint,
            stats: PeerStats::default(),
            on_previous_key: false,
            handshake_now: endpoint.is_some(),
            reassembly: Reassembly::default(),
            probe: None,
            probe_sent: None,
            probe_tx_mark: 0,
        }
    }

    pub(super) fn view(&self) -> PeerView {
        PeerView {
            cfg: self.cfg.clone(),
            endpoint: self.endpoint,
            last_handshake: self.tunn.time_since_last_handshake(),
            stats: self.stats.clone(),
        }
    }

    pub(super) fn drop_packet(&mut self, reason: &'static str) {
        bump(&mut self.stats.drops, reason);
    }

    /// Adds a fragment of an inner packet; the whole packet once complete.
    pub(super) fn reassemble(
        &mut self,
        fragment: &crate::wire::Fragment<'_>,
        now: std::time::Instant,
    ) -> Option<Vec<u8>> {
        self.reassembly.insert(fragment, now, &mut self.stats.drops)
    }

    pub(super) fn expire_fragments(&mut self, now: std::time::Instant) {
        self.reassembly.expire(now, &mut self.stats.drops);
    }

    /// Encrypts `inner` (a complete inner IPv4 packet) for this peer.
    pub(super) fn encapsulate(&mut self, inner: &[u8], bufs: &mut Buffers, out: &mut Vec<Output>) {
        match self.tunn.encapsulate(inner, &mut bufs.buf) {
            TunnResult::WriteToNetwork(p) => match self.endpoint {
                Some(to) => {
                    self.stats.tx_packets += 1;
                    self.stats.tx_bytes += p.len() as u64;
                    out.push(Output::Udp {
                        to,
                        data: Buffers::pooled(&mut bufs.pool, p),
                    });
                }
                None => self.drop_packet("no_endpoint"),
            },
            TunnResult::Err(e) => self.drop_packet(wg_error_label(&e)),
            // Queued until the handshake completes.
            _ => {}
        }
    }

    pub(super) fn update_timers(&mut self, bufs: &mut Buffers, out: &mut Vec<Output>) {
        match self.tunn.update_timers(&mut bufs.buf) {
            TunnResult::WriteToNetwork(p) => {
                if let Some(to) = self.endpoint {
                    self.stats.tx_packets += 1;
                    self.stats.tx_bytes += p.len() as u64;
                    out.push(Output::Udp {
                        to,
                        data: Buffers::pooled(&mut bufs.pool, p),
                    });
                }
            }
            TunnResult::Err(WireGuardError::ConnectionExpired) | TunnResult::Done => {}
            TunnResult::Err(e) => self.drop_packet(wg_error_label(&e)),
            _ => {}
        }
    }

    /// The node key rotated: the tunnel stays on the previous key, and
    /// probes with the current one start with the next packet sent.
    pub(super) fn start_rotation(&mut self) {
        self.on_previous_key = true;
        self.probe = None;
        self.probe_sent = None;
        self.probe_tx_mark = self.stats.tx_packets;
    }

    /// On the previous key and sending: a handshake initiation with the
    /// current key, at most one per [`PROBE_INTERVAL`].
    #[allow(clippy::too_many_arguments)]
    pub(super) fn probe_current_key(
        &mut self,
        id: PeerId,
        secret: &StaticSecret,
        limiter: &Arc<RateLimiter>,
        now: Instant,
        bufs: &mut Buffers,
        out: &mut Vec<Output>,
    ) {
        let Some(to) = self.endpoint else {
            return;
        };
        if !self.on_previous_key
            || self.stats.tx_packets == self.probe_tx_mark
            || self
                .probe_sent
                .is_some_and(|t| now.saturating_duration_since(t) < PROBE_INTERVAL)
        {
            return;
        }
        let (key, keepalive) = (PublicKey::from(self.cfg.key), self.cfg.keepalive);
        let probe = self.probe.get_or_insert_with(|| {
            Tunn::new(
                secret.clone(),
                key,
                None,
                keepalive,
                id,
                Some(Arc::clone(limiter)),
            )
        });
        if let TunnResult::WriteToNetwork(p) =
            probe.format_handshake_initiation(&mut bufs.buf, true)
        {
            self.stats.tx_packets += 1;
            self.stats.tx_bytes += p.len() as u64;
            out.push(Output::Udp {
                to,
                data: Buffers::pooled(&mut bufs.pool, p),
            });
        }
        self.probe_sent = Some(now);
        self.probe_tx_mark = self.stats.tx_packets;
    }

    /// A handshake response for the probe: the peer has the current key, so
    /// the probe's fresh session becomes the tunnel. False when the
    /// response is not the probe's.
    pub(super) fn take_probe_response(
        &mut self,
        src: SocketAddr,
        data: &[u8],
        dec: &mut [u8],
        bufs: &mut Buffers,
        out: &mut Vec<Output>,
    ) -> bool {
        let Some(probe) = self.probe.as_mut() else {
            return false;
        };
        let reply = match probe.decapsulate(Some(src.ip()), data, dec) {
            TunnResult::WriteToNetwork(reply) => Some(reply),
            TunnResult::Done => None,
            _ => return false,
        };
        // Under load the limiter answers a response with a cookie reply,
        // which is WriteToNetwork too, and the probe has no session: the
        // tunnel stays as it is and handles the response itself.
        if probe.time_since_last_handshake().is_none() {
            return false;
        }
        if let Some(keepalive) = reply {
            self.stats.tx_packets += 1;
            self.stats.tx_bytes += keepalive.len() as u64;
            out.push(Output::Udp {
                to: src,
                data: Buffers::pooled(&mut bufs.pool, keepalive),
            });
        }
        if let Some(probe) = self.probe.take() {
            self.tunn = probe;
            self.on_previous_key = false;
            tracing::debug!(peer = %self.cfg.label(), "peer answered with the new key; tunnel moved");
        }
        true
    }

    pub(super) fn initiate_if_pending(&mut self, bufs: &mut Buffers, out: &mut Vec<Output>) {
        if std::mem::take(&mut self.handshake_now)
            && let (Some(to), TunnResult::WriteToNetwork(p)) = (
                self.endpoint,
                self.tunn.format_handshake_initiation(&mut bufs.buf, false),
            )
        {
            self.stats.tx_packets += 1;
            self.stats.tx_bytes += p.len() as u64;
            out.push(Output::Udp {
                to,
                data: Buffers::pooled(&mut bufs.pool, p),
            });
        }
    }
}

impl std::fmt::Debug for Peer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Peer")
            .field("cfg", &self.cfg)
            .field("endpoint", &self.endpoint)
            .finish_non_exhaustive()
    }
}
