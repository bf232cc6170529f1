//! Several broker replicas on one etcd: each follows etcd's watch from the
//! revision its state was loaded at, applies what the others wrote to its
//! in-memory [`State`], and publishes the views that changed to its own
//! watch streams. A write that loses a race ([`Error::Conflict`]) reloads
//! the state and is applied again (see `Broker::commit`).
//!
//! The replica that makes a change moves the view revision of every
//! cluster it reaches and records it in the cluster's record; the others
//! see the revisions move in the records they follow and derive the same
//! deltas from the two states (`view::follow`), so an agent sees the same
//! revisions whichever replica it is connected to.

use crate::error::{Error, Result};
use crate::server::{Broker, Core, certs_of};
use crate::state::State;
use crate::store::etcd::WatchEvent;
use crate::store::{EtcdStore, Store, apply_changes};
use crate::view;
use std::sync::Arc;
use std::time::Duration;

/// Tries of one batch of writes when other replicas keep writing first.
pub(crate) const MAX_ATTEMPTS: u32 = 20;

/// Longest pause between two attempts to re-open the etcd watch.
const MAX_BACKOFF: Duration = Duration::from_secs(2);

/// Load the state; if views are now built differently from what the
/// stored revisions describe, give every cluster a new revision (and write
/// it, retrying when another replica writes first).
pub(crate) async fn load_and_upgrade(store: &Store) -> Result<State> {
    let mut attempt = 0;
    loop {
        attempt += 1;
        let mut state = store.load().await?;
        if state.upgrade_view_format(view::VIEW_FORMAT) {
            tracing::info!(
                format = view::VIEW_FORMAT,
                "views are built differently from the stored revisions: every cluster gets a new revision"
            );
        }
        let dirty = state.take_dirty();
        match store.persist(&state, &dirty).await {
            Ok(()) => return Ok(state),
            Err(Error::Conflict) if attempt < MAX_ATTEMPTS => {}
            Err(e) => return Err(e),
        }
    }
}

/// Before a write on etcd: if a previous write's outcome is unknown, reload
/// the state (the position would be stale anyway).
pub(crate) async fn catch_up(broker: &Broker, core: &mut Core) -> Result<()> {
    if let Some(etcd) = core.store.etcd()
        && etcd.is_stale()
    {
        let fresh = etcd.load().await?;
        broker.adopt(core, fresh);
    }
    Ok(())
}

impl Broker {
    /// Whether a token lets `cluster` join now. On etcd a refusal is checked
    /// against etcd's latest write first: the token may have been created
    /// on another replica a moment ago, before this one followed it.
    pub(crate) async fn check_token_fresh(
        &self,
        id: &str,
        secret: &str,
        cluster: &str,
        now: i64,
    ) -> Result<()> {
        let first = self.current().check_token(id, secret, cluster, now);
        let Err(denied) = first else { return Ok(()) };
        let mut core = self.core.lock().await;
        let Some(etcd) = core.store.etcd().cloned() else {
            return Err(denied.into());
        };
        if etcd.is_current().await {
            return Err(denied.into());
        }
        let fresh = etcd.load().await?;
        self.adopt(&mut core, fresh);
        Ok(core.state.check_token(id, secret, cluster, now)?)
    }

    /// Make `next` (read from the store: other replicas' writes) the current
    /// state; hand the watch streams the revisions the writer moved (with
    /// their deltas) and the certificates that changed, and close the
    /// streams of removed clusters.
    pub(crate) fn adopt(&self, core: &mut Core, next: State) {
        let old = std::mem::replace(&mut core.state, next);
        let moved = view::follow(&old, &core.state);
        self.committed.set(Arc::new(core.state.clone()));
        for name in old.clusters.keys() {
            if !core.state.clusters.contains_key(name) {
                self.hub.close(name);
                self.forget(name);
            }
        }
        for (name, c) in &core.state.clusters {
            let change = moved.get(name);
            let certs = certs_of(c);
            let same_certs = old.clusters.get(name).map(certs_of).as_ref() == Some(&certs);
            if change.is_none() && same_certs {
                continue;
            }
            self.hub.update(name, |p| {
                if let Some((revision, delta)) = change {
                    p.advance(*revision, delta.clone());
                }
                p.certs = certs;
            });
        }
        self.update_gauges(&core.state);
    }

    /// Follow etcd's watch until the broker shuts down; reconnect (to any
    /// member) with backoff, and probe etcd while writes are refused.
    pub(crate) fn follow(&self, store: EtcdStore) {
        let me = self.clone();
        let mut shutdown = self.hub.shutdown_signal();
        let probe_store = store.clone();
        let mut probe_shutdown = self.hub.shutdown_signal();
        let metrics = std::sync::Arc::clone(&self.metrics);
        tokio::spawn(async move {
            let mut backoff = Duration::from_millis(100);
            loop {
                let started = tokio::time::Instant::now();
                tokio::select! {
                    r = me.follow_once(&store) => {
                        // A watch that ran a while broke by accident: retry soon.
                        if started.elapsed() > Duration::from_secs(10) {
                            backoff = Duration::from_millis(100);
                        }
                        if let Err(e) = r {
                            tracing::warn!(error = %e, retry_in = ?backoff, "etcd watch interrupted");
                        }
                    }
                    _ = shutdown.wait_for(|s| *s) => return,
                }
                tokio::select! {
                    () = tokio::time::sleep(backoff) => {}
                    _ = shutdown.wait_for(|s| *s) => return,
                }
                backoff = (backoff * 2).min(MAX_BACKOFF);
            }
        });
        tokio::spawn(async move {
            loop {
                tokio::select! {
                    () = tokio::time::sleep(Duration::from_millis(500)) => {}
                    _ = probe_shutdown.wait_for(|s| *s) => return,
                }
                if probe_store.is_down() {
                    let _ = probe_store.probe().await;
                }
                metrics
                    .store_writable
                    .set(i64::from(!probe_store.is_down()));
            }
        });
    }

    async fn follow_once(&self, store: &EtcdStore) -> Result<()> {
        let from = {
            let _core = self.core.lock().await;
            store.position().revision
        };
        let mut watch = store.watch(from).await?;
        tracing::info!(member = %watch.member, after_revision = from, "following etcd");
        loop {
            match watch.next().await? {
                WatchEvent::Compacted => {
                    tracing::warn!(
                        "etcd compacted revisions this replica had not seen: reloading the state"
                    );
                    let mut core = self.core.lock().await;
                    let fresh = store.load().await?;
                    self.adopt(&mut core, fresh);
                    return Ok(());
                }
                WatchEvent::Revisions(revs) => {
                    if revs.is_empty() {
                        continue;
                    }
                    let mut core = self.core.lock().await;
                    let at = store.position().revision;
                    let mut changes = Vec::new();
                    for rev in revs.into_iter().filter(|r| r.revision > at) {
                        changes.extend(rev.changes.iter().cloned());
                        store.advance(&rev);
                    }
                    if changes.is_empty() {
                        continue;
                    }
                    match apply_changes(&core.state, changes) {
                        Ok(next) => self.adopt(&mut core, next),
                        Err(e) => {
                            tracing::error!(error = %e, "a record from etcd cannot be read: reloading everything");
                            let fresh = store.load().await?;
                            self.adopt(&mut core, fresh);
                        }
                    }
                }
            }
        }
    }
}
