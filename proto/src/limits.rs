//! Bounds shared by both ends of every API, one constant per fact. A sender
//! that stays inside them is never refused by a receiver for size.

/// Largest gRPC message any l2mesh endpoint sends or accepts: a broker view
/// or admin page, a node's desired state or status. Receivers set their
/// decoding limit to this, senders refuse to build anything larger.
pub const MAX_MESSAGE_BYTES: usize = 16 << 20;

/// Cluster and network names: one DNS label (they become Kubernetes names).
pub const MAX_LABEL_BYTES: usize = 63;

/// Every other name (node, peer, interface, pod, namespace): a DNS subdomain,
/// the longest name Kubernetes gives an object.
pub const MAX_NAME_BYTES: usize = 253;

/// An `ip:port` endpoint: `[` IPv6 with a zone `]:65535` fits in 64 bytes.
pub const MAX_ENDPOINT_BYTES: usize = 64;

/// Any other short text field of a request (addresses, CIDRs, token ids).
pub const MAX_FIELD_BYTES: usize = 128;

/// Gateway nodes one cluster may report to the broker.
pub const MAX_GATEWAYS_PER_CLUSTER: usize = 64;

/// Endpoints one gateway or node may announce.
pub const MAX_ENDPOINTS_PER_GATEWAY: usize = 16;

/// Multi-cluster networks one cluster may ask for.
pub const MAX_NETWORKS_PER_CLUSTER: usize = 1024;

/// Tunnels one link-health report may describe.
pub const MAX_LINKS_PER_REPORT: usize = 1024;

/// Whether `s` is at most `max` bytes; `Err` names the field, the length and
/// the bound, without echoing the (possibly huge) value.
pub fn check_len(field: &str, s: &str, max: usize) -> Result<(), String> {
    if s.len() <= max {
        Ok(())
    } else {
        Err(format!(
            "{field} is {} bytes long; the limit is {max} bytes",
            s.len()
        ))
    }
}

/// The first characters of a value for an error message or a log line, so
/// an oversized value is never copied whole.
#[must_use]
pub fn preview(s: &str) -> String {
    const KEEP: usize = 40;
    if s.len() <= KEEP {
        return s.to_owned();
    }
    let mut end = KEEP;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}... ({} bytes)", &s[..end], s.len())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn check_len_names_field_and_bound_without_the_value() {
        assert!(check_len("node", "gw-1", MAX_NAME_BYTES).is_ok());
        let long = "x".repeat(MAX_NAME_BYTES + 1);
        let err = check_len("node", &long, MAX_NAME_BYTES).unwrap_err();
        assert!(err.contains("node") && err.contains("254") && err.contains("253"));
        assert!(!err.contains(&long));
    }

    #[test]
    fn preview_cuts_long_values_on_a_char_boundary() {
        assert_eq!(preview("short"), "short");
        let p = preview(&"é".repeat(100));
        assert!(p.ends_with("(200 bytes)"), "{p}");
        assert!(p.len() < 60);
    }

    #[test]
    fn the_largest_gateway_set_fits_many_times_in_a_message() {
        // One cluster's report in the view: name, node, key, endpoints, IP.
        let per_gateway = MAX_LABEL_BYTES
            + MAX_NAME_BYTES
            + 32
            + MAX_ENDPOINTS_PER_GATEWAY * (MAX_ENDPOINT_BYTES + 2)
            + 15
            + 16;
        assert!(MAX_GATEWAYS_PER_CLUSTER * per_gateway * 64 < MAX_MESSAGE_BYTES);
    }
}
