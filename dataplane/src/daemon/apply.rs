//! Applying a desired state all-or-nothing: every step that can fail runs
//! before the engine and the state file change, and the device changes made
//! so far are undone when a later step fails.
//!
//! Order: validate; bind a new UDP port group (cheap, commonly fails when
//! the port is taken); remove only the networks whose VNI a new network
//! takes over (their devices have the same names); create new networks;
//! change MTUs; remove the other networks; save the state file. Only then
//! the new sockets and the engine config take effect, and nothing after
//! that can fail.

use std::sync::Arc;

use l2mesh_proto::node::{ApplyResult, DesiredState};

use super::{Daemon, io};
use crate::Error;
use crate::config::{Config, Diff, NetConfig};
use crate::netdev;

/// A device change made by the apply in progress, and how to undo it.
#[derive(Debug)]
enum Done {
    /// Bridge and TAP of a new network; the bridge is deleted on undo only
    /// if this apply created it (an adopted one may carry pods).
    Created {
        net: NetConfig,
        bridge_existed: bool,
    },
    /// A network whose devices were deleted; undo re-creates them (its pod
    /// ports do not come back).
    Removed(NetConfig),
    /// The MTU a network had before.
    Mtu(NetConfig),
}

impl Daemon {
    /// Applies a desired state: validates it, changes only what differs,
    /// and remembers it for the next start. On error nothing changed (the
    /// error says so, or what is left over if undoing failed too).
    pub async fn apply(self: &Arc<Self>, desired: DesiredState) -> Result<ApplyResult, Error> {
        let _guard = self.apply_lock.lock().await;
        // Timed from when this apply holds the lock: waiting behind another
        // apply is that one's time.
        let started = std::time::Instant::now();
        let result = self.apply_locked(desired).await;
        self.metrics
            .apply_seconds
            .observe(started.elapsed().as_secs_f64());
        result
    }

    /// The daemon's own measurements (`/metrics`).
    pub fn metrics(&self) -> &crate::metrics::DaemonMetrics {
        &self.metrics
    }

    async fn apply_locked(self: &Arc<Self>, desired: DesiredState) -> Result<ApplyResult, Error> {
        let cfg = Config::from_desired(&desired)?;
        cfg.reject_own_key(&self.engine.public_key())?;
        // Devices depend on the networks only; the engine diffs the peers.
        let current = self.engine.config_without_peers();
        let diff = Diff::networks_between(&current, &cfg);

        let new_udp = if cfg.listen_port != 0 && cfg.listen_port != current.listen_port {
            let port = cfg.listen_port;
            Some(
                io::bind_udp_group(port, &self.workers).map_err(|e| Error::Apply {
                    step: format!(
                        "binding UDP port {port} (identity.listen_port; free the port or choose \
                         another)"
                    ),
                    source: Box::new(e),
                    outcome: nothing_changed(),
                })?,
            )
        } else {
            None
        };

        let mut done = Vec::new();
        if let Err((step, e)) = self.change_devices(&diff, &mut done).await {
            return Err(self.undo(done, step, e).await);
        }
        if let Err(e) = self.save(&desired) {
            let step = format!("saving it to {}", self.state_dir.display());
            return Err(self.undo(done, step, e).await);
        }

        if let Some(socks) = new_udp {
            *self
                .udp
                .write()
                .unwrap_or_else(std::sync::PoisonError::into_inner) = Arc::clone(&socks);
            self.spawn_udp(&socks);
        }
        let mut out = Vec::new();
        let mut scratch = io::Scratch::default();
        let diff = self.engine.apply(cfg);
        self.engine
            .initiate_handshakes_for(&diff.peers_added, &mut scratch.bufs, &mut out);
        self.perform(&mut out, &mut scratch, 0).await;
        let changes = diff.describe();
        if !changes.is_empty() {
            tracing::info!(
                revision = desired.revision,
                ?changes,
                "applied desired state"
            );
        }
        Ok(ApplyResult {
            applied_revision: desired.revision,
            changes,
        })
    }

    /// The device steps, each recorded in `done` before it starts so that a
    /// half-done step is undone too. Returns the failed step and its error.
    async fn change_devices(
        self: &Arc<Self>,
        diff: &Diff,
        done: &mut Vec<Done>,
    ) -> Result<(), (String, Error)> {
        let (removed, added) = plan(diff);
        let added_vnis: Vec<u32> = added.iter().map(|n| n.vni).collect();
        let (early, late): (Vec<&NetConfig>, Vec<&NetConfig>) = removed
            .into_iter()
            .partition(|n| added_vnis.contains(&n.vni));
        for n in early {
            self.remove_step(n, done).await?;
        }
        for n in added {
            let bridge_existed = self
                .netlink
                .find(&netdev::bridge_name(n.vni))
                .await
                .map_err(|e| (creating(n), e))?
                .is_some();
            done.push(Done::Created {
                net: n.clone(),
                bridge_existed,
            });
            self.add_network(n).await.map_err(|e| (creating(n), e))?;
        }
        for (old, new) in &diff.networks_changed {
            if old.vni == new.vni && old.mtu != new.mtu {
                done.push(Done::Mtu(old.clone()));
                self.set_network_mtu(new).await.map_err(|e| {
                    (
                        format!("setting MTU {} on network {}", new.mtu, new.name),
                        e,
                    )
                })?;
            }
        }
        for n in late {
            self.remove_step(n, done).await?;
        }
        Ok(())
    }

    async fn remove_step(
        &self,
        n: &NetConfig,
        done: &mut Vec<Done>,
    ) -> Result<(), (String, Error)> {
        done.push(Done::Removed(n.clone()));
        self.remove_network(n).await.map_err(|e| {
            (
                format!("removing the devices of network {} (vni {})", n.name, n.vni),
                e,
            )
        })
    }

    /// Undoes `done` in reverse order and builds the error for the caller.
    async fn undo(self: &Arc<Self>, done: Vec<Done>, step: String, e: Error) -> Error {
        let mut failed = Vec::new();
        for d in done.into_iter().rev() {
            let (what, r) = match &d {
                Done::Created {
                    net,
                    bridge_existed,
                } => (
                    format!("deleting the new devices of network {}", net.name),
                    self.delete_new(net, *bridge_existed).await,
                ),
                Done::Removed(net) => (
                    format!("re-creating network {}", net.name),
                    self.add_network(net).await,
                ),
                Done::Mtu(net) => (
                    format!("restoring MTU {} on network {}", net.mtu, net.name),
                    self.set_network_mtu(net).await,
                ),
            };
            if let Err(err) = r {
                tracing::error!(error = %err, "{what} after a failed apply");
                failed.push(format!("{what}: {err}"));
            }
        }
        let outcome = if failed.is_empty() {
            nothing_changed()
        } else {
            format!(
                "undoing the partial change also failed ({}); restart l2mesh-dataplane to return \
                 to the last applied state",
                failed.join("; ")
            )
        };
        tracing::warn!(%step, error = %e, %outcome, "apply failed");
        Error::Apply {
            step,
            source: Box::new(e),
            outcome,
        }
    }

    /// Deletes what `add_network` made for `net`: its TAP, and its bridge
    /// unless that was there before.
    async fn delete_new(&self, net: &NetConfig, bridge_existed: bool) -> Result<(), Error> {
        let tap = self
            .taps
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .remove(&net.vni);
        if let Some(t) = tap {
            t.abort();
        }
        let mut names = vec![netdev::tap_name(net.vni)];
        if !bridge_existed {
            names.push(netdev::bridge_name(net.vni));
        }
        for name in names {
            if let Some(l) = self.netlink.find(&name).await? {
                self.netlink.delete(l.index).await?;
            }
        }
        Ok(())
    }
}

fn nothing_changed() -> String {
    "nothing was changed and the previous state stays in force; fix the cause and apply again"
        .to_string()
}

fn creating(n: &NetConfig) -> String {
    format!(
        "creating the bridge and TAP of network {} (vni {})",
        n.name, n.vni
    )
}

/// Networks whose devices go away and networks whose devices are made: a
/// VNI change is both.
fn plan(diff: &Diff) -> (Vec<&NetConfig>, Vec<&NetConfig>) {
    let mut removed: Vec<&NetConfig> = diff.networks_removed.iter().collect();
    let mut added: Vec<&NetConfig> = diff.networks_added.iter().collect();
    for (old, new) in &diff.networks_changed {
        if old.vni != new.vni {
            removed.push(old);
            added.push(new);
        }
    }
    (removed, added)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn net(name: &str, vni: u32, mtu: u32) -> NetConfig {
        NetConfig {
            name: name.into(),
            vni,
            mtu,
            pod_cidr: String::new(),
        }
    }

    #[test]
    fn a_vni_change_is_a_removal_and_an_addition_and_mtu_changes_are_neither() {
        let diff = Diff {
            networks_added: vec![net("new", 3, 1390)],
            networks_removed: vec![net("gone", 4, 1390)],
            networks_changed: vec![
                (net("moved", 5, 1390), net("moved", 6, 1390)),
                (net("mtu", 7, 1390), net("mtu", 7, 1300)),
            ],
            ..Diff::default()
        };
        let (removed, added) = plan(&diff);
        let vnis = |v: &[&NetConfig]| v.iter().map(|n| n.vni).collect::<Vec<_>>();
        assert_eq!(vnis(&removed), [4, 5]);
        assert_eq!(vnis(&added), [3, 6]);
    }

    #[test]
    fn the_outcome_says_nothing_changed_and_what_to_do() {
        let e = Error::Apply {
            step: creating(&net("blue", 16, 1390)),
            source: Box::new(Error::Netlink("boom".into())),
            outcome: nothing_changed(),
        };
        let text = e.to_string();
        assert!(text.contains("network blue (vni 16)"), "{text}");
        assert!(text.contains("netlink: boom"), "{text}");
        assert!(text.contains("nothing was changed"), "{text}");
        assert!(text.contains("apply again"), "{text}");
    }
}
