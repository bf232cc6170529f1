//! Prometheus metrics of the agent and the small HTTP endpoint serving them
//! (`/metrics`, and `/healthz` for probes).

use prometheus_client::metrics::counter::Counter;
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
        };
        registry.register(
            "desired_recomputes",
            "Node desired states computed (built or patched)",
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
    /// The text exposition format.
    #[must_use]
    pub fn encode(&self) -> String {
        l2mesh_telemetry::encode(&self.registry)
    }
}

/// Serve `/metrics` and `/healthz` on `listener` until the task is dropped.
pub async fn serve(listener: tokio::net::TcpListener, metrics: Metrics) -> std::io::Result<()> {
    axum::serve(listener, l2mesh_telemetry::router(move || metrics.encode())).await
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
    }

    #[tokio::test]
    async fn endpoint_serves_metrics_and_health() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let m = Metrics::default();
        m.nodes_known.set(3);
        let task = tokio::spawn(serve(listener, m));
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
        task.abort();
    }
}
