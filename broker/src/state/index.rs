//! Indexes kept in step with the records: which cluster a certificate
//! speaks for, and which clusters ask for a network.

use super::State;
use crate::model::Cluster;

impl State {
    /// Build the indexes from the records (after loading them).
    pub(super) fn reindex(&mut self) {
        let clusters: Vec<Cluster> = self.clusters.values().cloned().collect();
        for c in &clusters {
            self.index(c);
        }
    }

    /// Add a cluster's certificates and requests to the indexes.
    pub(super) fn index(&mut self, c: &Cluster) {
        for h in std::iter::once(c.cert_sha256).chain(c.prev_cert_sha256) {
            self.cert_index.insert(h, c.name.clone());
        }
        for net in &c.requested {
            self.requesters
                .entry(net.clone())
                .or_default()
                .insert(c.name.clone());
        }
    }

    /// Remove a cluster's certificates and requests from the indexes.
    pub(super) fn unindex(&mut self, c: &Cluster) {
        for h in std::iter::once(c.cert_sha256).chain(c.prev_cert_sha256) {
            if self.cert_index.get(&h) == Some(&c.name) {
                self.cert_index.remove(&h);
            }
        }
        for net in &c.requested {
            if let Some(set) = self.requesters.get_mut(net) {
                set.remove(&c.name);
                if set.is_empty() {
                    self.requesters.remove(net);
                }
            }
        }
    }

    /// Replace a cluster record, keeping the indexes in step.
    pub(super) fn put_cluster(&mut self, c: Cluster) {
        if let Some(old) = self.clusters.get(&c.name).cloned() {
            self.unindex(&old);
        }
        self.index(&c);
        self.clusters.insert(c.name.clone(), c);
    }

    /// Whether the indexes say what a rebuild from the records would say.
    #[cfg(test)]
    pub(crate) fn indexes_match_records(&self) -> bool {
        let mut fresh = Self {
            clusters: self.clusters.clone(),
            ..Self::default()
        };
        fresh.reindex();
        fresh.cert_index == self.cert_index && fresh.requesters == self.requesters
    }
}
