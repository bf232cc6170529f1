//! Content negotiation for `/metrics`: OpenMetrics 1.0 for scrapers that
//! ask for it (Prometheus does), the Prometheus text format 0.0.4 for
//! everyone else (`promtool check metrics`, curl, older agents). The
//! registries render OpenMetrics; [`to_prometheus_text`] converts.

/// Content type of OpenMetrics text.
pub const OPENMETRICS_CONTENT_TYPE: &str =
    "application/openmetrics-text; version=1.0.0; charset=utf-8";
/// Content type of the Prometheus text format.
pub const PROMETHEUS_CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

/// Whether an `Accept` header asks for OpenMetrics.
#[must_use]
pub fn wants_openmetrics(accept: Option<&str>) -> bool {
    accept.is_some_and(|a| {
        a.split(',').any(|part| {
            let mut params = part.split(';').map(str::trim);
            let media = params.next().unwrap_or_default();
            let refused = params.any(|p| p.replace(' ', "") == "q=0");
            media.eq_ignore_ascii_case("application/openmetrics-text") && !refused
        })
    })
}

/// The response for `accept`: content type and body, from OpenMetrics text.
#[must_use]
pub fn negotiate(accept: Option<&str>, openmetrics: String) -> (&'static str, String) {
    if wants_openmetrics(accept) {
        (OPENMETRICS_CONTENT_TYPE, openmetrics)
    } else {
        (PROMETHEUS_CONTENT_TYPE, to_prometheus_text(&openmetrics))
    }
}

/// OpenMetrics text as Prometheus text 0.0.4: metadata names the sample
/// name (`x_total` for counters, `x_info` for info metrics, which become
/// gauges), `# UNIT` lines, exemplars and the `# EOF` marker go.
#[must_use]
pub fn to_prometheus_text(openmetrics: &str) -> String {
    let mut out = String::with_capacity(openmetrics.len());
    let mut kinds = std::collections::HashMap::new();
    // Types first: a HELP line comes before its TYPE line.
    for line in openmetrics.lines() {
        if let Some(rest) = line.strip_prefix("# TYPE ")
            && let Some((name, kind)) = rest.split_once(' ')
        {
            kinds.insert(name.to_owned(), kind.trim().to_owned());
        }
    }
    let rename = |name: &str| -> (String, Option<&'static str>) {
        match kinds.get(name).map(String::as_str) {
            Some("counter") => (format!("{name}_total"), None),
            Some("info") => (format!("{name}_info"), Some("gauge")),
            Some("stateset" | "gaugehistogram" | "unknown") => (name.to_owned(), Some("untyped")),
            _ => (name.to_owned(), None),
        }
    };
    for line in openmetrics.lines() {
        if line == "# EOF" || line.starts_with("# UNIT ") {
            continue;
        }
        if let Some(rest) = line.strip_prefix("# HELP ") {
            let (name, help) = rest.split_once(' ').unwrap_or((rest, ""));
            out.push_str(&format!("# HELP {} {help}\n", rename(name).0));
        } else if let Some(rest) = line.strip_prefix("# TYPE ") {
            let (name, kind) = rest.split_once(' ').unwrap_or((rest, "untyped"));
            let (sample, new_kind) = rename(name);
            out.push_str(&format!(
                "# TYPE {sample} {}\n",
                new_kind.unwrap_or(kind.trim())
            ));
        } else if line.starts_with('#') {
            out.push_str(line);
            out.push('\n');
        } else {
            // Drop an exemplar (` # {...} value`).
            let sample = line.split(" # ").next().unwrap_or(line);
            out.push_str(sample);
            out.push('\n');
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accept_headers_choose_the_format() {
        let prometheus = "application/openmetrics-text;version=1.0.0;q=0.5,text/plain;version=0.0.4;q=0.4,*/*;q=0.1";
        assert!(wants_openmetrics(Some(prometheus)));
        assert!(!wants_openmetrics(Some("text/plain")));
        assert!(!wants_openmetrics(Some("*/*")));
        assert!(!wants_openmetrics(None));
        assert!(!wants_openmetrics(Some(
            "application/openmetrics-text; q=0"
        )));
    }

    #[test]
    fn openmetrics_becomes_prometheus_text() {
        let om = "# HELP l2_joins Join attempts.\n# TYPE l2_joins counter\nl2_joins_total{result=\"ok\"} 3 # {trace_id=\"x\"} 1\n# HELP l2_build Build.\n# TYPE l2_build info\nl2_build_info{version=\"0.1.0\"} 1\n# HELP l2_up Up.\n# TYPE l2_up gauge\n# UNIT l2_up seconds\nl2_up 1\n# EOF\n";
        let text = to_prometheus_text(om);
        assert_eq!(
            text,
            "# HELP l2_joins_total Join attempts.\n# TYPE l2_joins_total counter\nl2_joins_total{result=\"ok\"} 3\n# HELP l2_build_info Build.\n# TYPE l2_build_info gauge\nl2_build_info{version=\"0.1.0\"} 1\n# HELP l2_up Up.\n# TYPE l2_up gauge\nl2_up 1\n"
        );
        let (kind, body) = negotiate(None, om.to_owned());
        assert_eq!(kind, PROMETHEUS_CONTENT_TYPE);
        assert!(!body.contains("# EOF"));
        let (kind, body) = negotiate(Some("application/openmetrics-text"), om.to_owned());
        assert_eq!((kind, body.as_str()), (OPENMETRICS_CONTENT_TYPE, om));
    }
}
