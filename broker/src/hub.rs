//! Fan-out of view changes to watch streams. One `watch` channel per cluster
//! holds its latest revision and the recent deltas that lead to it, so a
//! slow watcher skips ahead: it merges the deltas it missed into one, or
//! gets a snapshot once they are no longer held.

use l2mesh_proto::broker::ViewDelta;
use prost::Message as _;
use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex, PoisonError};
use tokio::sync::watch;

/// Deltas held per cluster for watchers that fall behind or reconnect.
pub const HISTORY_DELTAS: usize = 32;
/// Bytes of deltas held per cluster: a change larger than this (a whole
/// large network arriving) is not held, and resuming across it costs a
/// snapshot, which is about as large.
pub const HISTORY_BYTES: usize = 32 << 10;

/// One change of a cluster's view: the delta from `delta.base_revision`
/// to `revision`.
#[derive(Debug, PartialEq)]
pub struct Change {
    pub revision: u64,
    pub delta: ViewDelta,
    bytes: usize,
}

/// The latest revision of a cluster's view, the changes that lead to it
/// (oldest first, each starting where the one before ends), and the
/// certificates allowed to receive it (the current one and, after a
/// renewal, the one before).
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Published {
    pub revision: u64,
    pub history: VecDeque<Arc<Change>>,
    pub certs: Vec<[u8; 32]>,
}

impl Published {
    /// Add the change to `revision`: `Some(delta)` from the revision held,
    /// or `None` when there is no delta (a new cluster): the history is
    /// dropped and watchers behind get a snapshot.
    pub fn advance(&mut self, revision: u64, delta: Option<ViewDelta>) {
        match delta {
            Some(delta) if delta.base_revision == self.revision => {
                let bytes = delta.encoded_len();
                if bytes > HISTORY_BYTES {
                    self.history.clear();
                } else {
                    self.history.push_back(Arc::new(Change {
                        revision,
                        delta,
                        bytes,
                    }));
                    let mut held: usize = self.history.iter().map(|c| c.bytes).sum();
                    while self.history.len() > HISTORY_DELTAS || held > HISTORY_BYTES {
                        held -= self.history.pop_front().map_or(0, |c| c.bytes);
                    }
                }
            }
            _ => self.history.clear(),
        }
        self.revision = revision;
    }

    /// One delta from `from` to the latest revision, merged from the held
    /// changes, if they reach back to `from`.
    #[must_use]
    pub fn since(&self, from: u64) -> Option<ViewDelta> {
        let start = self
            .history
            .iter()
            .position(|c| c.delta.base_revision == from)?;
        let mut merged: Option<ViewDelta> = None;
        for c in self.history.iter().skip(start) {
            merged = Some(match merged {
                None => c.delta.clone(),
                Some(m) => l2mesh_proto::view::merge(m, c.delta.clone()),
            });
        }
        merged
    }
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
    /// Update a cluster's channel; watchers wake if revision or
    /// certificates changed.
    pub fn update(&self, name: &str, f: impl FnOnce(&mut Published)) {
        let mut chans = self.chans.lock().unwrap_or_else(PoisonError::into_inner);
        match chans.get(name) {
            Some(tx) => {
                tx.send_if_modified(|cur| {
                    let mut next = cur.clone().unwrap_or_default();
                    f(&mut next);
                    let changed = cur
                        .as_ref()
                        .is_none_or(|c| c.revision != next.revision || c.certs != next.certs);
                    if changed {
                        *cur = Some(next);
                    }
                    changed
                });
            }
            None => {
                let mut p = Published::default();
                f(&mut p);
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
