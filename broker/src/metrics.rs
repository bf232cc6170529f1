//! Prometheus metrics and the health endpoint on their own HTTP port.

use axum::Router;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use std::sync::Arc;

type Labels = Vec<(String, String)>;

/// The broker's metrics.
#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    /// Join attempts by result (`ok`, `denied`, `rate_limited`, `bad_request`).
    pub joins: Family<Labels, Counter>,
    /// gRPC calls by method and status code.
    pub calls: Family<Labels, Counter>,
    /// Snapshots (whole views) sent on watch streams.
    pub views_sent: Counter,
    /// Deltas sent on watch streams.
    pub deltas_sent: Counter,
    /// Encoded bytes of the watch messages (snapshots and deltas) sent.
    pub watch_bytes_sent: Counter,
    /// Open watch streams.
    pub watchers: Gauge,
    /// Joined clusters.
    pub clusters: Gauge,
    /// Declared networks.
    pub networks: Gauge,
    /// Call latency by method; layered onto the gRPC server.
    pub grpc: l2mesh_telemetry::latency::GrpcLatencyLayer,
    /// Open client connections.
    pub connections: Gauge,
    /// Open connections that have not authenticated (yet).
    pub unauthenticated_connections: Gauge,
    /// Failed `accept` calls (for example out of file descriptors).
    pub accept_errors: Counter,
    /// Connections closed before the gRPC layer, by reason.
    pub connections_refused: Family<Labels, Counter>,
    /// Cluster calls refused by the per-cluster report rate limit.
    pub reports_rate_limited: Counter,
    /// Write batches applied again because another replica wrote first.
    pub store_conflicts: Counter,
    /// 1 while the store takes writes, 0 while etcd does not answer.
    pub store_writable: Gauge,
}

impl Default for Metrics {
    fn default() -> Self {
        let mut registry = Registry::with_prefix("l2mesh_broker");
        let joins = Family::<Labels, Counter>::default();
        let calls = Family::<Labels, Counter>::default();
        let views_sent = Counter::default();
        let deltas_sent = Counter::default();
        let watch_bytes_sent = Counter::default();
        let watchers = Gauge::default();
        let clusters = Gauge::default();
        let networks = Gauge::default();
        let connections = Gauge::default();
        let unauthenticated_connections = Gauge::default();
        let accept_errors = Counter::default();
        let connections_refused = Family::<Labels, Counter>::default();
        let reports_rate_limited = Counter::default();
        let store_conflicts = Counter::default();
        let store_writable = Gauge::default();
        store_writable.set(1);
        registry.register(
            "store_conflicts",
            "Write batches applied again because another broker replica wrote to etcd first",
            store_conflicts.clone(),
        );
        registry.register(
            "store_writable",
            "1 while the store takes writes, 0 while etcd does not answer (writes refused)",
            store_writable.clone(),
        );
        registry.register(
            "connections",
            "Open client connections",
            connections.clone(),
        );
        registry.register(
            "unauthenticated_connections",
            "Open connections that have not authenticated",
            unauthenticated_connections.clone(),
        );
        registry.register(
            "accept_errors",
            "Failed accept calls (out of file descriptors?)",
            accept_errors.clone(),
        );
        registry.register(
            "connections_refused",
            "Connections closed before the gRPC layer, by reason",
            connections_refused.clone(),
        );
        registry.register(
            "reports_rate_limited",
            "Cluster reports refused by the per-cluster rate limit",
            reports_rate_limited.clone(),
        );
        registry.register("joins", "Join attempts by result", joins.clone());
        registry.register("calls", "gRPC calls by method and code", calls.clone());
        registry.register(
            "views_sent",
            "Snapshots (whole views) sent on watch streams",
            views_sent.clone(),
        );
        registry.register(
            "deltas_sent",
            "View deltas sent on watch streams",
            deltas_sent.clone(),
        );
        registry.register(
            "watch_bytes_sent",
            "Encoded bytes of the snapshots and deltas sent on watch streams",
            watch_bytes_sent.clone(),
        );
        registry.register("watchers", "Open watch streams", watchers.clone());
        registry.register("clusters", "Joined clusters", clusters.clone());
        registry.register(
            "networks",
            "Declared multi-cluster networks",
            networks.clone(),
        );
        let grpc = l2mesh_telemetry::latency::GrpcLatencyLayer::register(&mut registry);
        Self {
            registry,
            grpc,
            joins,
            calls,
            views_sent,
            deltas_sent,
            watch_bytes_sent,
            watchers,
            clusters,
            networks,
            connections,
            unauthenticated_connections,
            accept_errors,
            connections_refused,
            reports_rate_limited,
            store_conflicts,
            store_writable,
        }
    }
}

impl Metrics {
    /// Count a join result.
    pub fn join(&self, result: &str) {
        self.joins
            .get_or_create(&vec![("result".to_owned(), result.to_owned())])
            .inc();
    }

    /// Count a call and its outcome.
    pub fn call(&self, method: &str, code: tonic::Code) {
        self.calls
            .get_or_create(&vec![
                ("method".to_owned(), method.to_owned()),
                ("code".to_owned(), format!("{code:?}")),
            ])
            .inc();
    }

    /// Count a connection closed before the gRPC layer.
    pub fn refused(&self, reason: &str) {
        self.connections_refused
            .get_or_create(&vec![("reason".to_owned(), reason.to_owned())])
            .inc();
    }

    /// Text exposition format.
    #[must_use]
    pub fn encode(&self) -> String {
        l2mesh_telemetry::encode(&self.registry)
    }
}

/// `/healthz` and `/metrics`.
pub fn router(metrics: Arc<Metrics>) -> Router {
    l2mesh_telemetry::router(move || metrics.encode())
}
