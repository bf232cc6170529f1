//! Which pod a bridge port belongs to, and what the port was like before it
//! was attached. The dataplane keeps no port table: both are written into
//! the host interface's alias (IFLA_IFALIAS) when it is attached, so a
//! restarted daemon reads them back from the kernel:
//! `l2mesh-pod:NAMESPACE/NAME;was=MTU,GROUP,NOARP,ADDR_GEN_MODE,NOMULTICAST` (the pod
//! part empty when there is none).

use crate::Error;

/// Marks aliases we wrote, so foreign aliases are never taken for a pod.
const ALIAS_PREFIX: &str = "l2mesh-pod:";
/// Separates the pod from the settings the port had before its attach.
const WAS: &str = ";was=";
/// Longest Kubernetes object name (a DNS subdomain).
use l2mesh_proto::limits::MAX_NAME_BYTES as MAX_NAME;

/// The settings of an interface that attaching it changes, so that a
/// detach puts them back.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct PortSettings {
    pub mtu: u32,
    /// Interface group (IFLA_GROUP).
    pub group: u32,
    pub noarp: bool,
    /// IFLA_INET6_ADDR_GEN_MODE (0: EUI-64, the kernel's default).
    pub addr_gen_mode: u8,
    /// IFF_MULTICAST is off.
    pub nomulticast: bool,
}

impl PortSettings {
    fn encode(&self) -> String {
        format!(
            "{},{},{},{},{}",
            self.mtu,
            self.group,
            u8::from(self.noarp),
            self.addr_gen_mode,
            u8::from(self.nomulticast)
        )
    }

    fn decode(s: &str) -> Option<Self> {
        let mut it = s.split(',');
        let mut next = || it.next();
        let mtu = next()?.parse().ok()?;
        let group = next()?.parse().ok()?;
        let flag = |s: &str| match s {
            "0" => Some(false),
            "1" => Some(true),
            _ => None,
        };
        let noarp = flag(next()?)?;
        let addr_gen_mode = next()?.parse().ok()?;
        let nomulticast = flag(next()?)?;
        if next().is_some() {
            return None;
        }
        Some(Self {
            mtu,
            group,
            noarp,
            addr_gen_mode,
            nomulticast,
        })
    }
}

/// The alias written on an attached port: its pod (if any) and the
/// settings it had before.
pub fn port_alias(pod: Option<&PodRef>, before: &PortSettings) -> String {
    let pod = pod
        .map(|p| format!("{}/{}", p.namespace, p.name))
        .unwrap_or_default();
    format!("{ALIAS_PREFIX}{pod}{WAS}{}", before.encode())
}

/// The settings a port had before its attach, if the alias is one of ours
/// and carries them.
pub fn settings_before(alias: &str) -> Option<PortSettings> {
    let rest = alias.strip_prefix(ALIAS_PREFIX)?;
    let (_, was) = rest.split_once(WAS)?;
    PortSettings::decode(was)
}

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
        let rest = alias.strip_prefix(ALIAS_PREFIX)?;
        let pod = rest.split_once(WAS).map_or(rest, |(pod, _)| pod);
        let (namespace, name) = pod.split_once('/')?;
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
    fn the_alias_carries_the_pod_and_the_settings_before_the_attach() {
        let before = PortSettings {
            mtu: 1500,
            group: 7,
            noarp: false,
            addr_gen_mode: 0,
            nomulticast: true,
        };
        let p = PodRef::from_request("team-a", "web-0").unwrap().unwrap();
        let a = port_alias(Some(&p), &before);
        assert!(a.len() < 256, "fits IFALIASZ");
        assert_eq!(PodRef::from_alias(&a), Some(p));
        assert_eq!(settings_before(&a), Some(before));
        let none = port_alias(None, &before);
        assert_eq!(PodRef::from_alias(&none), None);
        assert_eq!(settings_before(&none), Some(before));
        assert_eq!(settings_before("l2mesh-pod:ns/p"), None, "an older alias");
        assert_eq!(settings_before("l2mesh-pod:ns/p;was=1500,0,2,0,0"), None);
        assert_eq!(settings_before("l2mesh-pod:ns/p;was=1500,0,1,0"), None);
        assert_eq!(settings_before("l2mesh-pod:ns/p;was=1500,0,1,0,0,9"), None);
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
