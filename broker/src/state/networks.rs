//! Networks and membership: VNI allocation, the ACL, per-cluster slices.

use super::{
    Admission, DEFAULT_MTU, Key, MAX_ALLOWED, State, VNI_MAX, VNI_MIN, slice_count, validate_name,
};
use crate::error::{Error, Result};
use crate::model::Network;
use ipnet::IpNet;
use std::collections::{BTreeMap, BTreeSet};

impl State {
    // ------------------------------------------------------------ networks

    /// Declare a multi-cluster network. `vni == 0` allocates one.
    #[allow(clippy::too_many_arguments)]
    pub fn create_network(
        &mut self,
        name: &str,
        vni: u32,
        mtu: u32,
        cidr: &str,
        allowed: Vec<String>,
        allow_all: bool,
        now: i64,
    ) -> Result<(Network, BTreeSet<String>)> {
        validate_name("network", name)?;
        if self.networks.contains_key(name) {
            return Err(Error::AlreadyExists(format!(
                "network {name:?} exists: delete it first or pick another name"
            )));
        }
        let mtu = if mtu == 0 { DEFAULT_MTU } else { mtu };
        if !(576..=9000).contains(&mtu) {
            return Err(Error::InvalidArgument(format!(
                "MTU {mtu} is out of range: use 576..=9000 (default {DEFAULT_MTU})"
            )));
        }
        let cidr = if cidr.trim().is_empty() {
            None
        } else {
            let net: IpNet = cidr.trim().parse().map_err(|_| {
                Error::InvalidArgument(format!("cidr {cidr:?} is not a network like 10.10.0.0/16"))
            })?;
            if net.prefix_len() > net.max_prefix_len() - 4 {
                return Err(Error::InvalidArgument(format!(
                    "cidr {cidr} is too small to split between clusters: use at least a /{}",
                    net.max_prefix_len() - 4
                )));
            }
            Some(net.trunc())
        };
        if allowed.len() > MAX_ALLOWED {
            return Err(Error::InvalidArgument(format!(
                "at most {MAX_ALLOWED} allowed clusters"
            )));
        }
        for c in &allowed {
            validate_name("cluster", c)?;
        }
        if allowed.is_empty() && !allow_all {
            return Err(Error::InvalidArgument(
                "say which clusters may join: --allow CLUSTER (repeatable) or --allow-all".into(),
            ));
        }
        let vni = if vni == 0 {
            self.free_vni()?
        } else {
            self.check_vni(vni)?
        };
        let network = Network {
            name: name.to_owned(),
            vni,
            mtu,
            cidr,
            allowed: allowed.into_iter().collect(),
            allow_all,
            created_unix: now,
            slots: BTreeMap::new(),
        };
        self.networks.insert(name.to_owned(), network);
        self.meta.next_vni = if vni >= VNI_MAX { VNI_MIN } else { vni + 1 };
        self.touch(Key::Meta);
        self.touch(Key::Network(name.to_owned()));
        let _ = self.reconcile_slots(name);
        let affected = self.requesters_of(&BTreeSet::from([name.to_owned()]));
        let network = self
            .networks
            .get(name)
            .cloned()
            .ok_or_else(|| Error::NotFound(format!("network {name:?} vanished")))?;
        Ok((network, affected))
    }

    pub(super) fn check_vni(&self, vni: u32) -> Result<u32> {
        if !(VNI_MIN..=VNI_MAX).contains(&vni) {
            return Err(Error::InvalidArgument(format!(
                "VNI {vni} is outside {VNI_MIN}..={VNI_MAX} (1..=4095 belong to cluster-local networks): pick another or use auto"
            )));
        }
        if let Some(other) = self.networks.values().find(|n| n.vni == vni) {
            return Err(Error::AlreadyExists(format!(
                "VNI {vni} is in use by network {:?}: pick another or use auto",
                other.name
            )));
        }
        Ok(vni)
    }

    pub(super) fn free_vni(&self) -> Result<u32> {
        let used: BTreeSet<u32> = self.networks.values().map(|n| n.vni).collect();
        let start = self.meta.next_vni.clamp(VNI_MIN, VNI_MAX);
        (start..=VNI_MAX)
            .chain(VNI_MIN..start)
            .find(|v| !used.contains(v))
            .ok_or_else(|| Error::Exhausted("every VNI is in use".into()))
    }

    /// Delete a network. Returns it and the clusters whose view changes.
    pub fn delete_network(&mut self, name: &str) -> Result<(Network, BTreeSet<String>)> {
        let network = self.networks.remove(name).ok_or_else(|| {
            Error::NotFound(format!("no network named {name:?}: see `network list`"))
        })?;
        self.touch(Key::Network(name.to_owned()));
        let affected = self.requesters_of(&BTreeSet::from([name.to_owned()]));
        Ok((network, affected))
    }

    // ------------------------------------------------------------ membership

    /// Clusters that ask for any of `networks`.
    #[must_use]
    pub fn requesters_of(&self, networks: &BTreeSet<String>) -> BTreeSet<String> {
        networks
            .iter()
            .filter_map(|n| self.requesters.get(n))
            .flat_map(|set| set.iter().cloned())
            .collect()
    }

    pub(super) fn allowed(network: &Network, cluster: &str) -> bool {
        network.allow_all || network.allowed.contains(cluster)
    }

    /// Give members without a slice the lowest free one; take slices back
    /// from clusters that left. Returns whether the membership changed.
    pub(super) fn reconcile_slots(&mut self, net: &str) -> bool {
        let Some(network) = self.networks.get(net) else {
            return false;
        };
        let wanting: BTreeSet<String> = self
            .requesters
            .get(net)
            .into_iter()
            .flat_map(|set| set.iter())
            .filter(|c| Self::allowed(network, c))
            .cloned()
            .collect();
        let capacity = network.cidr.as_ref().map_or(u32::MAX, slice_count);
        let mut slots = network.slots.clone();
        slots.retain(|c, _| wanting.contains(c));
        let mut used: BTreeSet<u32> = slots.values().copied().collect();
        for c in &wanting {
            if slots.contains_key(c) {
                continue;
            }
            let Some(free) = (0..capacity).find(|i| !used.contains(i)) else {
                break;
            };
            used.insert(free);
            slots.insert(c.clone(), free);
        }
        if slots == network.slots {
            return false;
        }
        if let Some(n) = self.networks.get_mut(net) {
            n.slots = slots;
        }
        self.touch(Key::Network(net.to_owned()));
        true
    }

    /// Whether `cluster` is admitted to `net`, and why not.
    #[must_use]
    pub fn admission(&self, cluster: &str, net: &str) -> Admission {
        // A cluster learns nothing about networks it may not join: "does
        // not exist" and "exists but not for you" get the same answer.
        let Some(network) = self.networks.get(net).filter(|n| Self::allowed(n, cluster)) else {
            return Admission::Unknown(format!(
                "no multi-cluster network {net:?} that cluster {cluster:?} may join: ask the broker admin to create it or to allow this cluster"
            ));
        };
        if !network.slots.contains_key(cluster) {
            return Admission::Denied(format!(
                "network {net:?} has no free slice of its cidr left for another cluster"
            ));
        }
        Admission::Admitted
    }

    /// Admitted members of a network, sorted.
    #[must_use]
    pub fn members(&self, net: &str) -> Vec<String> {
        self.networks
            .get(net)
            .map(|n| n.slots.keys().cloned().collect())
            .unwrap_or_default()
    }

    /// Admitted networks of a cluster, sorted.
    #[must_use]
    pub fn networks_of(&self, cluster: &str) -> Vec<String> {
        self.clusters
            .get(cluster)
            .map(|c| {
                c.requested
                    .iter()
                    .filter(|n| self.admission(cluster, n) == Admission::Admitted)
                    .cloned()
                    .collect()
            })
            .unwrap_or_default()
    }
}
