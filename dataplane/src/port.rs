//! Which pod a bridge port belongs to. The dataplane keeps no port table:
//! the pod is written into the host interface's alias (IFLA_IFALIAS) when it
//! is attached, so a restarted daemon reads it back from the kernel.

use crate::Error;

/// Marks aliases we wrote, so foreign aliases are never taken for a pod.
const ALIAS_PREFIX: &str = "l2mesh-pod:";
/// Longest Kubernetes object name (a DNS subdomain).
use l2mesh_proto::limits::MAX_NAME_BYTES as MAX_NAME;

/// A pod by namespace and name.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PodRef {
    pub namespace: String,
    pub name: String,
}

/// An interface attached to a network's bridge, with its pod if known.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Port {
    pub ifname: String,
    pub pod: Option<PodRef>,
}

fn valid_name(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= MAX_NAME
        && s.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'.')
}

impl PodRef {
    /// The pod of an attach request: both fields empty means none; one
    /// without the other, or a name Kubernetes would not accept, is an error.
    pub fn from_request(namespace: &str, name: &str) -> Result<Option<Self>, Error> {
        match (namespace.is_empty(), name.is_empty()) {
            (true, true) => return Ok(None),
            (false, true) | (true, false) => {
                return Err(Error::InvalidPod(format!(
                    "pod_namespace {namespace:?} and pod_name {name:?}: give both or neither"
                )));
            }
            (false, false) => {}
        }
        for (what, v) in [("pod_namespace", namespace), ("pod_name", name)] {
            if !valid_name(v) {
                return Err(Error::InvalidPod(format!(
                    "{what} {v:?} is not a Kubernetes name (lowercase letters, digits, '-' and '.', \
                     at most {MAX_NAME} characters)"
                )));
            }
        }
        Ok(Some(Self {
            namespace: namespace.to_string(),
            name: name.to_string(),
        }))
    }

    pub fn to_alias(&self) -> String {
        format!("{ALIAS_PREFIX}{}/{}", self.namespace, self.name)
    }

    /// The pod an alias names, if it is one of ours and well formed.
    pub fn from_alias(alias: &str) -> Option<Self> {
        let (namespace, name) = alias.strip_prefix(ALIAS_PREFIX)?.split_once('/')?;
        Self::from_request(namespace, name).ok().flatten()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn alias_round_trips() {
        let p = PodRef::from_request("team-a", "web-0.x").unwrap().unwrap();
        assert_eq!(p.to_alias(), "l2mesh-pod:team-a/web-0.x");
        assert_eq!(PodRef::from_alias(&p.to_alias()), Some(p));
    }

    #[test]
    fn no_pod_is_fine_half_a_pod_is_not() {
        assert_eq!(PodRef::from_request("", "").unwrap(), None);
        let e = PodRef::from_request("ns", "").unwrap_err().to_string();
        assert!(e.contains("both or neither"), "{e}");
        assert!(PodRef::from_request("", "p").is_err());
    }

    #[test]
    fn names_kubernetes_would_refuse_are_rejected() {
        for (ns, name) in [
            ("NS", "p"),
            ("ns", "a/b"),
            ("ns", "a b"),
            ("ns", &"x".repeat(254)),
        ] {
            let e = PodRef::from_request(ns, name).unwrap_err().to_string();
            assert!(e.contains("not a Kubernetes name"), "{ns}/{name}: {e}");
        }
    }

    #[test]
    fn foreign_or_broken_aliases_are_not_pods() {
        for a in [
            "",
            "uplink to rack 3",
            "l2mesh-pod:",
            "l2mesh-pod:ns",
            "l2mesh-pod:/p",
            "l2mesh-pod:ns/",
        ] {
            assert_eq!(PodRef::from_alias(a), None, "{a}");
        }
    }
}
