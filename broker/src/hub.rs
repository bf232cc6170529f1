//! Fan-out of views to watch streams. One `watch` channel per cluster holds
//! the latest published view, so a slow watcher skips to the newest
//! snapshot instead of queueing old ones.

use l2mesh_proto::broker::ClusterView;
use std::collections::HashMap;
use std::sync::{Arc, Mutex, PoisonError};
use tokio::sync::watch;

/// The latest view of a cluster and the certificates allowed to receive it
/// (the current one and, after a renewal, the one before).
#[derive(Clone, Debug, PartialEq)]
pub struct Published {
    pub view: Arc<ClusterView>,
    pub certs: Vec<[u8; 32]>,
}

/// `None` in a channel means the cluster was removed.
pub type Slot = Option<Published>;

/// Per-cluster channels plus the shutdown signal.
#[derive(Debug)]
pub struct Hub {
    chans: Mutex<HashMap<String, watch::Sender<Slot>>>,
    connected: Mutex<HashMap<String, usize>>,
    shutdown: watch::Sender<bool>,
}

impl Default for Hub {
    fn default() -> Self {
        Self {
            chans: Mutex::default(),
            connected: Mutex::default(),
            shutdown: watch::channel(false).0,
        }
    }
}

impl Hub {
    /// Publish a view; watchers wake only if revision or certificate changed.
    pub fn publish(&self, name: &str, p: Published) {
        let mut chans = self.chans.lock().unwrap_or_else(PoisonError::into_inner);
        match chans.get(name) {
            Some(tx) => {
                tx.send_if_modified(|cur| {
                    let changed = cur
                        .as_ref()
                        .is_none_or(|c| c.view.revision != p.view.revision || c.certs != p.certs);
                    if changed {
                        *cur = Some(p);
                    }
                    changed
                });
            }
            None => {
                chans.insert(name.to_owned(), watch::channel(Some(p)).0);
            }
        }
    }

    /// The cluster is gone: wake its watchers with `None` and forget it.
    pub fn close(&self, name: &str) {
        let mut chans = self.chans.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(tx) = chans.remove(name) {
            tx.send_replace(None);
        }
    }

    /// Subscribe to a cluster's channel (it must have been published).
    pub fn subscribe(&self, name: &str) -> Option<watch::Receiver<Slot>> {
        let chans = self.chans.lock().unwrap_or_else(PoisonError::into_inner);
        chans.get(name).map(watch::Sender::subscribe)
    }

    /// Signal every watch stream to end (graceful shutdown).
    pub fn shut_down(&self) {
        self.shutdown.send_replace(true);
    }

    /// Receiver of the shutdown signal.
    pub fn shutdown_signal(&self) -> watch::Receiver<bool> {
        self.shutdown.subscribe()
    }

    /// Count an open watch stream of `name` until the guard drops.
    pub fn connect(self: &Arc<Self>, name: &str) -> ConnGuard {
        *self
            .connected
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .entry(name.to_owned())
            .or_default() += 1;
        ConnGuard {
            hub: Arc::clone(self),
            name: name.to_owned(),
        }
    }

    /// Open watch streams of `name`.
    pub fn streams_of(&self, name: &str) -> usize {
        self.connected
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .get(name)
            .copied()
            .unwrap_or(0)
    }

    /// Whether `name` has an open watch stream.
    pub fn is_connected(&self, name: &str) -> bool {
        self.connected
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .get(name)
            .is_some_and(|n| *n > 0)
    }

    /// Number of open watch streams.
    pub fn watchers(&self) -> usize {
        self.connected
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .values()
            .sum()
    }
}

/// Decrements the connection count on drop.
#[derive(Debug)]
pub struct ConnGuard {
    hub: Arc<Hub>,
    name: String,
}

impl Drop for ConnGuard {
    fn drop(&mut self) {
        let mut map = self
            .hub
            .connected
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        if let Some(n) = map.get_mut(&self.name) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                map.remove(&self.name);
            }
        }
    }
}
