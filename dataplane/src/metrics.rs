//! Prometheus metrics, rendered from the same status the API reports.

use std::future::Future;
use std::sync::Arc;

use l2mesh_proto::node::NodeStatus;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;

use crate::daemon::Daemon;

type Labels = Vec<(String, String)>;

fn counter_family(reg: &mut Registry, name: &str, help: &str) -> Family<Labels, Counter> {
    let f = Family::<Labels, Counter>::default();
    reg.register(name, help, f.clone());
    f
}

fn gauge_family(reg: &mut Registry, name: &str, help: &str) -> Family<Labels, Gauge> {
    let f = Family::<Labels, Gauge>::default();
    reg.register(name, help, f.clone());
    f
}

fn label(pairs: &[(&str, &str)]) -> Labels {
    pairs
        .iter()
        .map(|(k, v)| ((*k).to_string(), (*v).to_string()))
        .collect()
}

fn clamp(v: u64) -> i64 {
    i64::try_from(v).unwrap_or(i64::MAX)
}

/// What the daemon measures itself over its life, beside the status it
/// reports; clones share the values.
#[derive(Debug, Clone)]
pub struct DaemonMetrics {
    /// Seconds each apply of a desired state took, failed ones included.
    pub apply_seconds: Histogram,
}

impl Default for DaemonMetrics {
    fn default() -> Self {
        Self {
            apply_seconds: l2mesh_telemetry::latency::latency_histogram(),
        }
    }
}

/// The Prometheus text exposition of a node status and the daemon's own
/// measurements.
pub fn render(s: &NodeStatus, own: &DaemonMetrics) -> String {
    let mut reg = Registry::with_prefix("l2mesh_dataplane");
    reg.register(
        "apply_seconds",
        "Time to apply a desired state (validation, devices, state file, tunnels)",
        own.apply_seconds.clone(),
    );
    let rx_bytes = counter_family(
        &mut reg,
        "peer_rx_bytes",
        "Bytes received from a peer (WireGuard datagrams)",
    );
    let tx_bytes = counter_family(
        &mut reg,
        "peer_tx_bytes",
        "Bytes sent to a peer (WireGuard datagrams)",
    );
    let rx_pkts = counter_family(
        &mut reg,
        "peer_rx_packets",
        "Datagrams received from a peer",
    );
    let tx_pkts = counter_family(&mut reg, "peer_tx_packets", "Datagrams sent to a peer");
    let peer_drops = counter_family(
        &mut reg,
        "peer_drops",
        "Packets from or to a peer dropped, by reason",
    );
    let drops = counter_family(
        &mut reg,
        "drops",
        "Packets dropped that no peer can be blamed for, by reason",
    );
    let handshake = gauge_family(
        &mut reg,
        "peer_handshake_age_seconds",
        "Seconds since the last handshake (-1: none yet)",
    );
    let macs = gauge_family(
        &mut reg,
        "network_macs",
        "Learned MAC addresses per network",
    );
    let ports = gauge_family(
        &mut reg,
        "network_ports",
        "Interfaces attached to the network's bridge",
    );
    let revision = Gauge::<i64>::default();
    reg.register(
        "applied_revision",
        "Revision of the applied desired state",
        revision.clone(),
    );
    revision.set(clamp(s.applied_revision));
    for p in &s.peers {
        let l = label(&[("peer", &p.name)]);
        rx_bytes.get_or_create(&l).inc_by(p.rx_bytes);
        tx_bytes.get_or_create(&l).inc_by(p.tx_bytes);
        rx_pkts.get_or_create(&l).inc_by(p.rx_packets);
        tx_pkts.get_or_create(&l).inc_by(p.tx_packets);
        handshake.get_or_create(&l).set(
            p.last_handshake_age_ms
                .map(|ms| clamp(ms / 1000))
                .unwrap_or(-1),
        );
        for d in &p.drops {
            peer_drops
                .get_or_create(&label(&[("peer", &p.name), ("reason", &d.reason)]))
                .inc_by(d.count);
        }
    }
    for d in &s.drops {
        drops
            .get_or_create(&label(&[("reason", &d.reason)]))
            .inc_by(d.count);
    }
    for n in &s.networks {
        let l = label(&[("network", &n.name)]);
        macs.get_or_create(&l).set(clamp(n.macs.len() as u64));
        ports.get_or_create(&l).set(clamp(n.ports.len() as u64));
    }
    l2mesh_telemetry::encode(&reg)
}

/// Serves `GET /metrics` (content negotiated, see `l2mesh_telemetry::negotiate`) and `GET /healthz` until `shutdown` completes.
pub async fn serve(
    listener: tokio::net::TcpListener,
    daemon: Arc<Daemon>,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    use axum::http::{StatusCode, header};
    use axum::routing::get;
    let health = Arc::clone(&daemon);
    let app = axum::Router::new()
        .route(
            "/healthz",
            get(move || {
                let d = Arc::clone(&health);
                async move {
                    match d.status().await {
                        Ok(_) => (StatusCode::OK, "ok\n".to_owned()),
                        Err(e) => (StatusCode::SERVICE_UNAVAILABLE, format!("{e}\n")),
                    }
                }
            }),
        )
        .route(
            "/metrics",
            get(move |headers: axum::http::HeaderMap| {
                let d = Arc::clone(&daemon);
                async move {
                    let accept = headers.get(header::ACCEPT).and_then(|v| v.to_str().ok());
                    match d.status().await {
                        Ok(s) => {
                            let (kind, body) =
                                l2mesh_telemetry::negotiate(accept, render(&s, d.metrics()));
                            (StatusCode::OK, [(header::CONTENT_TYPE, kind)], body)
                        }
                        Err(e) => (
                            StatusCode::INTERNAL_SERVER_ERROR,
                            [(header::CONTENT_TYPE, "text/plain")],
                            e.to_string(),
                        ),
                    }
                }
            }),
        );
    axum::serve(listener, app)
        .with_graceful_shutdown(shutdown)
        .await
}

#[cfg(test)]
mod tests {
    use l2mesh_proto::node::{DropCounter, NetworkStatus, NodeStatus, PeerStatus};

    #[test]
    fn renders_counters_and_gauges() {
        let s = NodeStatus {
            applied_revision: 4,
            peers: vec![PeerStatus {
                name: "b".into(),
                rx_bytes: 10,
                drops: vec![DropCounter {
                    reason: "replay".into(),
                    count: 2,
                }],
                ..Default::default()
            }],
            networks: vec![NetworkStatus {
                name: "blue".into(),
                ports: vec!["v1".into()],
                ..Default::default()
            }],
            drops: vec![DropCounter {
                reason: "unknown_key".into(),
                count: 3,
            }],
            ..Default::default()
        };
        let own = super::DaemonMetrics::default();
        own.apply_seconds.observe(0.003);
        let text = super::render(&s, &own);
        for needle in [
            "l2mesh_dataplane_peer_rx_bytes_total{peer=\"b\"} 10",
            "l2mesh_dataplane_peer_drops_total{peer=\"b\",reason=\"replay\"} 2",
            "l2mesh_dataplane_drops_total{reason=\"unknown_key\"} 3",
            "l2mesh_dataplane_peer_handshake_age_seconds{peer=\"b\"} -1",
            "l2mesh_dataplane_network_ports{network=\"blue\"} 1",
            "l2mesh_dataplane_applied_revision 4",
            "l2mesh_dataplane_apply_seconds_count 1",
            "l2mesh_dataplane_apply_seconds_bucket{le=\"0.004\"} 1",
        ] {
            assert!(text.contains(needle), "missing {needle} in\n{text}");
        }
    }
}
