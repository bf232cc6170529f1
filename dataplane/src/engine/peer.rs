//! One peer's tunnel: its boringtun `Tunn`, where it is reached and its
//! counters. Each lives behind its own lock, so peers never wait for each other.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::time::Duration;

use boringtun::noise::errors::WireGuardError;
use boringtun::noise::{Tunn, TunnResult};

use super::{Buffers, Output, bump, wg_error_label};
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
