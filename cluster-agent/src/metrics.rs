//! Prometheus metrics of the agent and the small HTTP endpoint serving them
//! (`/metrics`, `/healthz` for probes, and `/links`: every tunnel as the
//! nodes last reported it, JSON, what `l2mesh-agent status` shows).

use crate::crd::LinkSummary;
use crate::status::LinkRow;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;
use std::sync::Arc;

/// The agent's metrics; clones share the values.
#[derive(Clone, Debug)]
pub struct Metrics {
    registry: Arc<Registry>,
    pub reconciles: Counter,
    /// Seconds one recomputation of the desired state took.
    pub reconcile_seconds: Histogram,
    pub desired_revision: Gauge,
    pub nodes_known: Gauge,
    pub nodes_with_hello: Gauge,
    pub networks_active: Gauge,
    pub networks_inactive: Gauge,
    pub problems: Gauge,
    pub broker_connected: Gauge,
    pub broker_views: Counter,
    pub gateway_failovers: Counter,
    pub save_failures: Counter,
    /// Node desired states computed (built or patched).
    pub desired_recomputes: Counter,
    /// L2Network statuses computed.
    pub status_recomputes: Counter,
    /// L2Network statuses handed to the status writer (changed ones only).
    pub status_writes: Counter,
    /// Tunnels carrying each network, by `network` and `state` (up, down).
    pub network_links: Family<Vec<(String, String)>, Gauge>,
}

impl Default for Metrics {
    fn default() -> Self {
        let mut registry = Registry::with_prefix("l2mesh_agent");
        let m = Self {
            registry: Arc::new(Registry::default()),
            reconciles: Counter::default(),
            reconcile_seconds: l2mesh_telemetry::latency::latency_histogram(),
            desired_revision: Gauge::default(),
            nodes_known: Gauge::default(),
            nodes_with_hello: Gauge::default(),
            networks_active: Gauge::default(),
            networks_inactive: Gauge::default(),
            problems: Gauge::default(),
            broker_connected: Gauge::default(),
            broker_views: Counter::default(),
            gateway_failovers: Counter::default(),
            save_failures: Counter::default(),
            desired_recomputes: Counter::default(),
            status_recomputes: Counter::default(),
            status_writes: Counter::default(),
            network_links: Family::default(),
        };
        registry.register(
            "network_links",
            "Tunnels carrying each network, by state (up: a handshake in the last 3 minutes)",
            m.network_links.clone(),
        );
        registry.register(
            "desired_recomputes",
            "Node desired states computed (built or patched); each input recomputes only the nodes it affects",
            m.desired_recomputes.clone(),
        );
        registry.register(
            "status_recomputes",
            "L2Network statuses computed",
            m.status_recomputes.clone(),
        );
        registry.register(
            "status_writes",
            "L2Network statuses written because their content changed",
            m.status_writes.clone(),
        );
        registry.register(
            "allocation_save_failures",
            "Failed saves of the allocations (nothing new is published until one succeeds)",
            m.save_failures.clone(),
        );
        registry.register(
            "gateway_failovers",
            "Times the remote tunnels moved to a standby gateway",
            m.gateway_failovers.clone(),
        );
        registry.register(
            "reconciles",
            "Recomputations of the desired state",
            m.reconciles.clone(),
        );
        registry.register(
            "reconcile_seconds",
            "Time one recomputation of the desired state took",
            m.reconcile_seconds.clone(),
        );
        registry.register(
            "desired_revision",
            "Latest desired-state revision handed to a node",
            m.desired_revision.clone(),
        );
        registry.register(
            "nodes_known",
            "Nodes in the cluster's node list",
            m.nodes_known.clone(),
        );
        registry.register(
            "nodes_with_hello",
            "Nodes whose dataplane has said hello",
            m.nodes_with_hello.clone(),
        );
        registry.register(
            "networks_active",
            "L2Networks configured on the nodes",
            m.networks_active.clone(),
        );
        registry.register(
            "networks_inactive",
            "L2Networks not active (invalid, pending or denied)",
            m.networks_inactive.clone(),
        );
        registry.register(
            "problems",
            "Problems found by the last reconcile",
            m.problems.clone(),
        );
        registry.register(
            "broker_connected",
            "1 while the broker session is up",
            m.broker_connected.clone(),
        );
        registry.register(
            "broker_views",
            "Cluster views received from the broker",
            m.broker_views.clone(),
        );
        Self {
            registry: Arc::new(registry),
            ..m
        }
    }
}

impl Metrics {
    /// Set a network's link counts; `None` removes its series.
    pub fn set_links(&self, network: &str, links: Option<&LinkSummary>) {
        for (state, value) in [("up", links.map(|l| l.up)), ("down", links.map(|l| l.down))] {
            let labels = vec![
                ("network".to_owned(), network.to_owned()),
                ("state".to_owned(), state.to_owned()),
            ];
            match value {
                Some(v) => {
                    self.network_links.get_or_create(&labels).set(i64::from(v));
                }
                None => {
                    self.network_links.remove(&labels);
                }
            }
        }
    }

    /// The text exposition format.
    #[must_use]
    pub fn encode(&self) -> String {
        l2mesh_telemetry::encode(&self.registry)
    }
}

/// Where `/links` gets the link table from.
pub type LinkTable = std::sync::Arc<dyn Fn() -> Vec<LinkRow> + Send + Sync>;

/// Serve `/metrics`, `/healthz` and `/links` on `listener` until the task
/// is dropped.
pub async fn serve(
    listener: tokio::net::TcpListener,
    metrics: Metrics,
    links: LinkTable,
) -> std::io::Result<()> {
    let router = l2mesh_telemetry::router(move || metrics.encode()).route(
        "/links",
        axum::routing::get(move || {
            let body = serde_json::to_string(&links()).unwrap_or_else(|_| "[]".into());
            async move { ([(http::header::CONTENT_TYPE, "application/json")], body) }
        }),
    );
    axum::serve(listener, router).await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn metrics_are_encoded_with_prefix() {
        let m = Metrics::default();
        m.reconciles.inc();
        m.reconcile_seconds.observe(0.002);
        m.broker_connected.set(1);
        let text = m.encode();
        assert!(text.contains("l2mesh_agent_reconciles_total 1"), "{text}");
        assert!(
            text.contains("l2mesh_agent_reconcile_seconds_count 1"),
            "{text}"
        );
        assert!(text.contains("l2mesh_agent_broker_connected 1"), "{text}");
        m.set_links(
            "blue",
            Some(&LinkSummary {
                up: 3,
                down: 1,
                down_links: vec![],
            }),
        );
        let text = m.encode();
        assert!(
            text.contains(r#"l2mesh_agent_network_links{network="blue",state="down"} 1"#),
            "{text}"
        );
        m.set_links("blue", None);
        assert!(!m.encode().contains(r#"network="blue""#));
    }

    #[tokio::test]
    async fn endpoint_serves_metrics_and_health() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let m = Metrics::default();
        m.nodes_known.set(3);
        let rows = vec![LinkRow {
            node: "n1".into(),
            peer: "n2".into(),
            up: true,
            ..LinkRow::default()
        }];
        let task = tokio::spawn(serve(listener, m, Arc::new(move || rows.clone())));
        let get = |path: &'static str| async move {
            use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
            let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
            s.write_all(
                format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").as_bytes(),
            )
            .await
            .unwrap();
            let mut body = String::new();
            s.read_to_string(&mut body).await.unwrap();
            body
        };
        assert!(get("/metrics").await.contains("l2mesh_agent_nodes_known 3"));
        assert!(get("/healthz").await.contains("ok"));
        assert!(get("/links").await.contains(r#""peer":"n2""#));
        task.abort();
    }
}
