//! Latency histograms: one bucket layout for every l2mesh duration (0.5 ms
//! to about 16 s, doubling), and a tower layer that times each gRPC call by
//! method (`/package.Service/Method`) until its response headers, so a
//! streaming call counts the time to its first answer.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Instant;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

/// A histogram with the project's latency buckets, in seconds.
#[must_use]
pub fn latency_histogram() -> Histogram {
    Histogram::new(exponential_buckets(0.0005, 2.0, 16))
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct MethodLabels {
    method: String,
}

type Durations = Family<MethodLabels, Histogram, fn() -> Histogram>;

/// `<prefix>_grpc_server_handling_seconds{method}`: register once, then
/// `.layer()` it onto a tonic server.
#[derive(Debug, Clone)]
pub struct GrpcLatencyLayer {
    durations: Arc<Durations>,
}

impl GrpcLatencyLayer {
    /// Registers the histogram family in `registry` (name
    /// `grpc_server_handling_seconds` under the registry's prefix).
    pub fn register(registry: &mut Registry) -> Self {
        let durations: Durations = Family::new_with_constructor(latency_histogram);
        registry.register(
            "grpc_server_handling_seconds",
            "Time from a gRPC request to its response headers, by method",
            durations.clone(),
        );
        Self {
            durations: Arc::new(durations),
        }
    }

    /// Records one call (for callers outside tower).
    pub fn observe(&self, method: &str, seconds: f64) {
        self.durations
            .get_or_create(&MethodLabels {
                method: method.to_owned(),
            })
            .observe(seconds);
    }
}

impl<S> tower::Layer<S> for GrpcLatencyLayer {
    type Service = GrpcLatency<S>;

    fn layer(&self, inner: S) -> Self::Service {
        GrpcLatency {
            inner,
            layer: self.clone(),
        }
    }
}

/// The service [`GrpcLatencyLayer`] wraps around a server.
#[derive(Debug, Clone)]
pub struct GrpcLatency<S> {
    inner: S,
    layer: GrpcLatencyLayer,
}

impl<S, B> tower::Service<http::Request<B>> for GrpcLatency<S>
where
    S: tower::Service<http::Request<B>>,
    S::Future: Send + 'static,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = Pin<Box<dyn Future<Output = Result<S::Response, S::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: http::Request<B>) -> Self::Future {
        let method = req.uri().path().to_owned();
        let layer = self.layer.clone();
        let started = Instant::now();
        let fut = self.inner.call(req);
        Box::pin(async move {
            let r = fut.await;
            layer.observe(&method, started.elapsed().as_secs_f64());
            r
        })
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use tower::{Layer as _, ServiceExt as _};

    #[tokio::test]
    async fn each_call_is_timed_under_its_method() {
        let mut reg = Registry::with_prefix("l2mesh_test");
        let layer = GrpcLatencyLayer::register(&mut reg);
        let svc = layer.layer(tower::service_fn(|_req: http::Request<()>| async {
            Ok::<_, std::convert::Infallible>("done")
        }));
        let req = http::Request::get("/l2mesh.broker.Broker/Join")
            .body(())
            .unwrap();
        assert_eq!(svc.clone().oneshot(req).await.unwrap(), "done");
        let text = crate::encode(&reg);
        assert!(
            text.contains("# TYPE l2mesh_test_grpc_server_handling_seconds histogram"),
            "{text}"
        );
        assert!(
            text.contains(
                "l2mesh_test_grpc_server_handling_seconds_count{method=\"/l2mesh.broker.Broker/Join\"} 1"
            ),
            "{text}"
        );
        assert!(text.contains("le=\"0.0005\""), "{text}");
    }
}
