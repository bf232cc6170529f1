//! What every l2mesh binary sets up the same way: its version (with the
//! commit), logs on stderr filtered by an environment variable, how a failed
//! run is reported, and the HTTP endpoint with Prometheus `/metrics` (content
//! negotiated, with `process_*` and `l2mesh_build_info`) and `/healthz`.

pub mod exposition;
pub mod latency;
pub mod process;

pub use exposition::{OPENMETRICS_CONTENT_TYPE, PROMETHEUS_CONTENT_TYPE, negotiate};

use std::error::Error;
use std::process::ExitCode;

use axum::Router;
use axum::http::{HeaderMap, header};
use axum::routing::get;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::info::Info;
use prometheus_client::registry::Registry;
use tracing_subscriber::EnvFilter;

/// The git commit the binaries were built from ("unknown" outside git).
pub const COMMIT: &str = env!("L2MESH_COMMIT");
/// `--version` of every l2mesh binary: `0.1.0 (commit 1a2b3c4d5e6f)`.
pub const VERSION: &str = concat!(
    env!("CARGO_PKG_VERSION"),
    " (commit ",
    env!("L2MESH_COMMIT"),
    ")"
);

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct BuildLabels {
    version: String,
    commit: String,
}

/// Logs to stderr (stdout may be a protocol, as for the CNI plugin), with
/// the filter from `env_var` (`RUST_LOG` syntax) or else `default_filter`;
/// colours only when stderr is a terminal.
pub fn init_logs(env_var: &str, default_filter: &str) {
    tracing_subscriber::fmt()
        .with_env_filter(filter(env_var, default_filter))
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
}

fn filter(env_var: &str, default_filter: &str) -> EnvFilter {
    EnvFilter::try_from_env(env_var).unwrap_or_else(|_| EnvFilter::new(default_filter))
}

/// An error and its causes on one line, `what: why: root cause`, each text
/// once: many errors already put their source into their own message
/// (`"connecting: {source}"`), and printing the chain as well would repeat
/// it ("refused (os error 111): refused (os error 111)").
#[must_use]
pub fn error_chain(err: &(dyn Error + 'static)) -> String {
    let mut text = err.to_string();
    let mut source = err.source();
    while let Some(cause) = source {
        let cause_text = cause.to_string();
        if !cause_text.is_empty() && !text.contains(&cause_text) {
            text.push_str(": ");
            text.push_str(&cause_text);
        }
        source = cause.source();
    }
    text
}

/// The exit code of a run; a failure is printed as `program: error` with
/// its chain of causes, each once ([`error_chain`]). Takes `anyhow::Error`
/// as well as boxed errors.
pub fn exit_code<E>(program: &str, result: Result<(), E>) -> ExitCode
where
    E: AsRef<dyn Error + Send + Sync + 'static>,
{
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("{program}: {}", error_chain(e.as_ref()));
            ExitCode::FAILURE
        }
    }
}

/// The OpenMetrics text of a registry, followed by this process's
/// `process_*` metrics and `l2mesh_build_info{version,commit}` (empty if
/// encoding fails, which only a broken metric type can cause).
#[must_use]
pub fn encode(registry: &Registry) -> String {
    let mut standard = Registry::default();
    process::register(&mut standard, &process::current());
    standard.register(
        "l2mesh_build",
        "Version and commit of this l2mesh binary",
        Info::new(BuildLabels {
            version: env!("CARGO_PKG_VERSION").to_owned(),
            commit: COMMIT.to_owned(),
        }),
    );
    let mut out = String::new();
    let mut extra = String::new();
    if prometheus_client::encoding::text::encode(&mut out, registry).is_err()
        || prometheus_client::encoding::text::encode(&mut extra, &standard).is_err()
    {
        return String::new();
    }
    // One `# EOF`, at the end.
    if let Some(body) = out.strip_suffix("# EOF\n") {
        out.truncate(body.len());
    }
    out.push_str(&extra);
    out
}

/// `/healthz` ("ok") and `/metrics` (what `render` returns, OpenMetrics
/// text, sent as such to scrapers that accept it and as Prometheus text
/// 0.0.4 otherwise: see [`negotiate`]).
pub fn router<F>(render: F) -> Router
where
    F: Fn() -> String + Clone + Send + Sync + 'static,
{
    Router::new()
        .route("/healthz", get(|| async { "ok\n" }))
        .route(
            "/metrics",
            get(move |headers: HeaderMap| {
                let text = render();
                async move {
                    let accept = headers.get(header::ACCEPT).and_then(|v| v.to_str().ok());
                    let (kind, body) = negotiate(accept, text);
                    ([(header::CONTENT_TYPE, kind)], body)
                }
            }),
        )
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;
    use prometheus_client::metrics::counter::Counter;

    #[test]
    fn encode_renders_the_registry() {
        let mut reg = Registry::with_prefix("l2mesh_test");
        let c = Counter::<u64>::default();
        reg.register("things", "Things seen", c.clone());
        c.inc();
        let text = encode(&reg);
        assert!(text.contains("l2mesh_test_things_total 1"), "{text}");
        assert!(text.ends_with("# EOF\n"), "{text}");
    }

    #[test]
    fn the_default_filter_applies_when_the_variable_is_unset() {
        let f = filter("L2MESH_TELEMETRY_TEST_UNSET_VARIABLE", "warn");
        assert_eq!(f.to_string(), "warn");
    }

    type Boxed = Box<dyn Error + Send + Sync>;

    #[test]
    fn exit_codes_follow_the_result() {
        assert_eq!(exit_code::<Boxed>("x", Ok(())), ExitCode::SUCCESS);
        assert_eq!(
            exit_code::<Boxed>("x", Err("broken".into())),
            ExitCode::FAILURE
        );
    }

    /// An error that embeds its source in its own message, as
    /// `#[error("connecting: {0}")]` with `#[source]` does.
    #[derive(Debug)]
    struct Wrapping(std::io::Error);

    impl std::fmt::Display for Wrapping {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            write!(f, "transport error: {}", self.0)
        }
    }

    impl Error for Wrapping {
        fn source(&self) -> Option<&(dyn Error + 'static)> {
            Some(&self.0)
        }
    }

    #[derive(Debug)]
    struct Context(&'static str, Wrapping);

    impl std::fmt::Display for Context {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.write_str(self.0)
        }
    }

    impl Error for Context {
        fn source(&self) -> Option<&(dyn Error + 'static)> {
            Some(&self.1)
        }
    }

    #[test]
    fn a_cause_already_in_the_message_is_printed_once() {
        let refused = std::io::Error::from_raw_os_error(111);
        let once = refused.to_string();
        let err = Context("connecting to /run/x.sock", Wrapping(refused));
        let text = error_chain(&err);
        assert_eq!(
            text,
            format!("connecting to /run/x.sock: transport error: {once}")
        );
        assert_eq!(text.matches(&once).count(), 1, "{text}");
    }

    async fn get(app: Router, path: &str) -> (u16, String, String) {
        get_accepting(app, path, "application/openmetrics-text; version=1.0.0").await
    }

    async fn get_accepting(app: Router, path: &str, accept: &str) -> (u16, String, String) {
        use tower::ServiceExt as _;
        let req = axum::http::Request::get(path)
            .header(header::ACCEPT, accept)
            .body(axum::body::Body::empty())
            .unwrap();
        let resp = app.oneshot(req).await.unwrap();
        let kind = resp
            .headers()
            .get(header::CONTENT_TYPE)
            .map(|v| v.to_str().unwrap().to_string())
            .unwrap_or_default();
        let status = resp.status().as_u16();
        let body = axum::body::to_bytes(resp.into_body(), 1 << 20)
            .await
            .unwrap();
        (status, kind, String::from_utf8(body.to_vec()).unwrap())
    }

    #[tokio::test]
    async fn the_router_serves_fresh_metrics_and_health() {
        let c = Counter::<u64>::default();
        let seen = c.clone();
        let app = router(move || format!("l2mesh_test_seen_total {}\n# EOF\n", seen.get()));
        c.inc();
        let (status, kind, body) = get(app.clone(), "/metrics").await;
        assert_eq!((status, kind.as_str()), (200, OPENMETRICS_CONTENT_TYPE));
        assert_eq!(body, "l2mesh_test_seen_total 1\n# EOF\n");
        c.inc();
        let (_, _, body) = get(app.clone(), "/metrics").await;
        assert!(body.contains("total 2"), "rendered per request: {body}");
        let (status, _, body) = get(app.clone(), "/healthz").await;
        assert_eq!((status, body.as_str()), (200, "ok\n"));
        let (_, kind, body) = get_accepting(app.clone(), "/metrics", "*/*").await;
        assert_eq!(kind, PROMETHEUS_CONTENT_TYPE);
        assert_eq!(body, "l2mesh_test_seen_total 2\n");
        assert_eq!(get(app, "/nope").await.0, 404);
    }

    #[test]
    fn encode_adds_process_metrics_and_build_info_before_one_eof() {
        let reg = Registry::with_prefix("l2mesh_test");
        let text = encode(&reg);
        assert_eq!(text.matches("# EOF").count(), 1, "{text}");
        assert!(text.ends_with("# EOF\n"), "{text}");
        assert!(text.contains("process_resident_memory_bytes "), "{text}");
        assert!(text.contains("process_cpu_seconds_total "), "{text}");
        assert!(
            text.contains(&format!(
                "l2mesh_build_info{{version=\"{}\",commit=\"{COMMIT}\"}} 1",
                env!("CARGO_PKG_VERSION")
            )),
            "{text}"
        );
    }

    #[test]
    fn the_version_names_the_commit() {
        assert!(VERSION.starts_with(env!("CARGO_PKG_VERSION")), "{VERSION}");
        assert!(VERSION.contains(COMMIT) && !COMMIT.is_empty(), "{VERSION}");
    }
}
