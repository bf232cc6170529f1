//! The per-packet paths: a datagram from the underlay or a frame from a TAP
//! in, datagrams and TAP frames out.

use std::net::{Ipv4Addr, SocketAddr};
use std::time::Instant;

use boringtun::noise::errors::WireGuardError;
use boringtun::noise::handshake::parse_handshake_anon;
use boringtun::noise::{Packet, TunnResult};

use super::{BUF_SIZE, Buffers, Engine, Output, State, lock, wg_error_label};
use crate::switch::{DropReason, Forward, PeerId, Port};
use crate::wire;

impl Engine {
    /// A datagram from the underlay socket.
    pub fn handle_datagram(
        &self,
        src: SocketAddr,
        data: &[u8],
        now: Instant,
        bufs: &mut Buffers,
        out: &mut Vec<Output>,
    ) {
        let st = self.read();
        let mut verified = st
            .limiter
            .verify_packet(Some(src.ip()), data, &mut bufs.buf);
        if let (Err(TunnResult::Err(WireGuardError::InvalidMac)), Some(prev)) =
            (&verified, &st.previous)
        {
            // A handshake still addressed to the key from before the rotation.
            verified = prev
                .limiter
                .verify_packet(Some(src.ip()), data, &mut bufs.buf);
        }
        let packet = match verified {
            Ok(p) => p,
            Err(TunnResult::WriteToNetwork(cookie)) => {
                self.count_drop("cookie_sent");
                out.push(Output::Udp {
                    to: src,
                    data: Buffers::pooled(&mut bufs.pool, cookie),
                });
                return;
            }
            Err(TunnResult::Err(WireGuardError::InvalidMac)) => {
                self.count_drop("bad_mac");
                return;
            }
            Err(_) => {
                self.count_drop("invalid_packet");
                return;
            }
        };
        let (id, to_current_key) = match packet {
            Packet::HandshakeInit(p) => {
                let (parsed, to_current_key) =
                    match parse_handshake_anon(&st.secret, &st.public, &p) {
                        Ok(h) => (Ok(h), true),
                        Err(e) => match &st.previous {
                            Some(prev) => {
                                (parse_handshake_anon(&prev.secret, &prev.public, &p), false)
                            }
                            None => (Err(e), false),
                        },
                    };
                match parsed {
                    Ok(h) => match st.by_key.get(&h.peer_static_public).copied() {
                        Some(id) => (id, to_current_key),
                        None => {
                            self.count_drop("unknown_key");
                            return;
                        }
                    },
                    Err(_) => {
                        self.count_drop("bad_handshake");
                        return;
                    }
                }
            }
            Packet::HandshakeResponse(p) => (p.receiver_idx >> 8, false),
            Packet::PacketCookieReply(p) => (p.receiver_idx >> 8, false),
            Packet::PacketData(p) => (p.receiver_idx >> 8, false),
        };
        // Decrypt into a buffer of its own, so that the inner packet can be
        // switched straight from it (no copy) while `bufs` stays free for the
        // outputs. Every path below returns here, so the buffer is kept.
        let mut dec = std::mem::take(&mut bufs.dec);
        if dec.len() < BUF_SIZE {
            dec.resize(BUF_SIZE, 0);
        }
        self.receive(&st, id, to_current_key, src, data, now, &mut dec, bufs, out);
        bufs.dec = dec;
    }

    /// The rest of [`Engine::handle_datagram`] once the peer is known:
    /// decrypt into `dec`, then switch what came out.
    #[allow(clippy::too_many_arguments)]
    fn receive(
        &self,
        st: &State,
        id: PeerId,
        to_current_key: bool,
        src: SocketAddr,
        data: &[u8],
        now: Instant,
        dec: &mut [u8],
        bufs: &mut Buffers,
        out: &mut Vec<Output>,
    ) {
        let Some(cell) = st.peers.get(&id) else {
            self.count_drop("unknown_index");
            return;
        };
        let mut peer = lock(cell);
        if to_current_key {
            // The peer handshakes with our current key: it has learnt it, so
            // its tunnel leaves the previous key (dropping the old sessions,
            // which the peer has dropped too).
            st.move_to_current_key(&mut peer);
        }
        let mut delivered: Option<&[u8]> = None;
        let mut ok = false;
        // A handshake response may answer the probe with the current key.
        let is_response = data.first() == Some(&2);
        if is_response && peer.take_probe_response(src, data, dec, bufs, out) {
            ok = true;
        } else {
            match peer.tunn.decapsulate(Some(src.ip()), data, dec) {
                TunnResult::Done => ok = true,
                TunnResult::Err(e) => peer.drop_packet(wg_error_label(&e)),
                TunnResult::WriteToNetwork(reply) => {
                    ok = true;
                    out.push(Output::Udp {
                        to: src,
                        data: Buffers::pooled(&mut bufs.pool, reply),
                    });
                    // Packets queued while the handshake was in flight.
                    while let TunnResult::WriteToNetwork(p) =
                        peer.tunn.decapsulate(None, &[], &mut bufs.buf)
                    {
                        peer.stats.tx_packets += 1;
                        peer.stats.tx_bytes += p.len() as u64;
                        out.push(Output::Udp {
                            to: src,
                            data: Buffers::pooled(&mut bufs.pool, p),
                        });
                    }
                }
                TunnResult::WriteToTunnelV4(pkt, _) => {
                    ok = true;
                    delivered = Some(pkt);
                }
                TunnResult::WriteToTunnelV6(..) => {
                    ok = true;
                    peer.drop_packet("not_vxlan");
                }
            }
        }
        if !ok {
            return;
        }
        // Authenticated: roam to where it came from.
        peer.endpoint = Some(src);
        peer.stats.rx_packets += 1;
        peer.stats.rx_bytes += data.len() as u64;
        let tunnel_ip = peer.cfg.tunnel_ip;
        drop(peer);
        if let Some(pkt) = delivered {
            self.deliver(st, id, tunnel_ip, pkt, now, bufs, out);
        }
    }

    /// The decrypted inner packet of peer `id`: check it and switch its frame.
    #[allow(clippy::too_many_arguments)]
    fn deliver(
        &self,
        st: &State,
        id: PeerId,
        tunnel_ip: Ipv4Addr,
        pkt: &[u8],
        now: Instant,
        bufs: &mut Buffers,
        out: &mut Vec<Output>,
    ) {
        let reason = match wire::decode(pkt) {
            Ok(d) if d.src == tunnel_ip => {
                let result = lock(&self.switch).from_peer(id, d.vni, d.frame, now);
                self.dispatch(st, Port::Peer(id), d.vni, d.frame, result, bufs, out);
                return;
            }
            Ok(_) => "bad_inner_source",
            Err(wire::DecodeError::Fragment) => match wire::fragment(pkt) {
                // Only fragments from the peer's own address are held.
                Some(f) if f.src == tunnel_ip => {
                    let whole = st.peers.get(&id).and_then(|p| lock(p).reassemble(&f, now));
                    if let Some(whole) = whole {
                        // Fragment fields cleared: this recursion ends here.
                        self.deliver(st, id, tunnel_ip, &whole, now, bufs, out);
                    }
                    return;
                }
                Some(_) => "bad_inner_source",
                None => "bad_vxlan",
            },
            Err(_) => "bad_vxlan",
        };
        if let Some(p) = st.peers.get(&id) {
            lock(p).drop_packet(reason);
        }
    }

    /// A frame read from the TAP of network `vni`.
    pub fn handle_tap(
        &self,
        vni: u32,
        frame: &[u8],
        now: Instant,
        bufs: &mut Buffers,
        out: &mut Vec<Output>,
    ) {
        let st = self.read();
        let result = lock(&self.switch).from_tap(vni, frame, now);
        self.dispatch(&st, Port::Tap, vni, frame, result, bufs, out);
    }

    #[allow(clippy::too_many_arguments)]
    fn dispatch(
        &self,
        st: &State,
        ingress: Port,
        vni: u32,
        frame: &[u8],
        result: Result<Forward, DropReason>,
        bufs: &mut Buffers,
        out: &mut Vec<Output>,
    ) {
        let fwd = match result {
            Ok(f) => f,
            Err(reason) => {
                match ingress {
                    Port::Peer(id) => {
                        if let Some(p) = st.peers.get(&id) {
                            lock(p).drop_packet(reason.as_str());
                        }
                    }
                    Port::Tap => self.count_drop(reason.as_str()),
                }
                return;
            }
        };
        if fwd.suppressed > 0
            && let Port::Peer(id) = ingress
            && let Some(p) = st.peers.get(&id)
        {
            *lock(p)
                .stats
                .drops
                .entry(DropReason::SplitHorizon.as_str())
                .or_default() += u64::from(fwd.suppressed);
        }
        if fwd.to_tap && st.has_network(vni) {
            out.push(Output::Tap {
                vni,
                frame: Buffers::pooled(&mut bufs.pool, frame),
            });
        }
        let Some(src_ip) = st.cfg.tunnel_ip else {
            if !fwd.peers.is_empty() {
                self.count_drop("no_tunnel_ip");
            }
            return;
        };
        for &id in &fwd.peers {
            let Some(cell) = st.peers.get(&id) else {
                continue;
            };
            let mut peer = lock(cell);
            let mut inner = std::mem::take(&mut bufs.inner);
            wire::encode(&mut inner, src_ip, peer.cfg.tunnel_ip, vni, frame);
            peer.encapsulate(&inner, bufs, out);
            bufs.inner = inner;
        }
    }
}
