//! One reconcile: compute from the inputs (the pure core, incrementally),
//! make the allocations durable, then publish to the nodes, the broker and
//! the status what changed.

use super::{BrokerReports, Shared, State, gateway_candidates, now};
use crate::crd::Scope;
use crate::desired::{self, Hello, NodeEntry};
use crate::status;
use std::collections::BTreeMap;
use std::time::Instant;
use tokio::sync::watch;

/// One reconcile's result before it is published.
#[derive(Debug)]
struct Round {
    gateway: Option<String>,
}

/// The nodes that should apply the networks: those of the list whose
/// dataplane has said hello (now or before a restart). A node without a
/// dataplane has nothing to apply.
fn expected_nodes(nodes: &[NodeEntry], hellos: &BTreeMap<String, Hello>) -> Vec<String> {
    nodes
        .iter()
        .filter(|n| hellos.contains_key(&n.name))
        .map(|n| n.name.clone())
        .collect()
}

impl Shared {
    /// Recompute and, once the allocations the result needs are durable,
    /// publish it. Returns problems worth logging. While a save fails
    /// nothing new is published and [`Shared::unsaved`] says why; calling
    /// again retries the save.
    pub async fn reconcile(&self) -> Vec<String> {
        let started = std::time::Instant::now();
        loop {
            let (allocs, gateway) = {
                let mut guard = self.lock();
                let s = &mut *guard;
                let Some(round) = self.compute(s) else {
                    return Vec::new();
                };
                if s.allocs == s.saved && round.gateway == s.saved_gateway {
                    s.unsaved = None;
                    let problems = self.publish(s);
                    self.metrics
                        .reconcile_seconds
                        .observe(started.elapsed().as_secs_f64());
                    return problems;
                }
                (s.allocs.clone(), round.gateway)
            };
            match self.allocs_store.save(&allocs, gateway.as_deref()).await {
                Ok(()) => {
                    let mut s = self.lock();
                    s.saved = allocs;
                    s.saved_gateway = gateway;
                    // Recompute with the inputs as they are now, then publish.
                }
                Err(e) => {
                    let why = format!(
                        "allocations not saved ({e}): nothing new is published until they are"
                    );
                    self.lock().unsaved = Some(why.clone());
                    self.metrics.save_failures.inc();
                    return vec![why];
                }
            }
        }
    }

    /// The pure part of a reconcile: allocations (in `s.allocs`), the
    /// gateway election, the node states the changes reach (in `s.index`,
    /// marked unpublished) and the statuses they reach (marked stale).
    /// `None` while the intent is incomplete.
    fn compute(&self, s: &mut State) -> Option<Round> {
        let (Some(nodes), Some(networks)) = (s.nodes.as_ref(), s.networks.as_ref()) else {
            return None;
        };
        let mut outcomes =
            desired::resolve_networks(networks, s.view.as_ref(), &s.admissions, &mut s.allocs);
        for o in &mut outcomes {
            o.attach_problem.clone_from(&s.nad_missing);
            if o.scope != Scope::MultiCluster {
                continue;
            }
            if !self.has_broker {
                o.admission = Some((
                    l2mesh_proto::broker::AdmissionState::Unspecified,
                    "this agent runs without a broker (no join string)".into(),
                ));
            }
            o.broker_refusal.clone_from(&s.broker_refusal);
        }
        // Only the elected gateway is handed to the index as one: it gives
        // remote tunnels to a single gateway and reports it.
        let before = s.election.active().map(str::to_owned);
        let gateway = s.election.elect(
            &gateway_candidates(nodes, &s.hellos, &s.live),
            Instant::now(),
        );
        if before.is_some() && before != gateway {
            tracing::warn!(from = ?before, to = ?gateway, "gateway failover");
            self.metrics.gateway_failovers.inc();
        }
        let plan_nodes: Vec<NodeEntry> = nodes
            .iter()
            .map(|n| NodeEntry {
                gateway: n.gateway && gateway.as_deref() == Some(n.name.as_str()),
                ..n.clone()
            })
            .collect();
        let update = s.index.update(
            &plan_nodes,
            &s.hellos,
            &outcomes,
            self.tunnel_subnet,
            &mut s.allocs,
        );
        self.metrics
            .desired_recomputes
            .inc_by(update.recomputed.len() as u64);
        s.unpublished.extend(update.recomputed);
        s.unpublished.extend(update.removed);
        // Nodes that left the (complete) list: forget what they said.
        let states = s.index.states();
        s.live.retain(|node, _| states.contains_key(node));
        s.hellos.retain(|node, _| states.contains_key(node));
        s.allocs
            .known_nodes
            .retain(|node, _| states.contains_key(node));
        let before = s.digests.len();
        s.digests.retain(|node, _| states.contains_key(node));
        s.links.retain(|node, _| states.contains_key(node));
        if s.digests.len() != before {
            s.stale.all = true;
        }
        let expected = expected_nodes(&plan_nodes, &s.hellos);
        if expected != s.expected {
            s.expected = expected;
            s.stale.all = true;
        }
        // Networks whose outcome changed; those gone lose their status at
        // the next publish.
        let outcomes: BTreeMap<String, desired::NetworkOutcome> =
            outcomes.into_iter().map(|o| (o.key.clone(), o)).collect();
        for (key, o) in &outcomes {
            if s.outcomes.get(key) != Some(o) {
                s.stale.keys.insert(key.clone());
            }
        }
        s.outcomes = outcomes;
        Some(Round { gateway })
    }

    /// Publish what the last compute changed (its allocations are saved)
    /// to the nodes, the broker and the status.
    fn publish(&self, s: &mut State) -> Vec<String> {
        // Nodes that left the list: their watch ends (the sender is
        // dropped) and a reconnect is refused.
        let states = s.index.states();
        s.desired.retain(|node, _| states.contains_key(node));
        for node in std::mem::take(&mut s.unpublished) {
            let Some(state) = states.get(&node) else {
                continue;
            };
            let tx = s
                .desired
                .entry(node)
                .or_insert_with(|| watch::channel(None).0);
            let same = tx.borrow().as_ref().is_some_and(|cur| {
                cur.identity == state.identity
                    && cur.networks == state.networks
                    && cur.peers == state.peers
            });
            if !same {
                s.revision += 1;
                let mut state = state.clone();
                state.revision = s.revision;
                tx.send_replace(Some(state));
            }
        }
        let outcomes: Vec<&desired::NetworkOutcome> = s.outcomes.values().collect();
        self.reports.send_if_modified(|r| {
            let next = Some(BrokerReports {
                gateways: s.index.gateways().to_vec(),
                networks: desired::requested_networks(outcomes.iter().copied()),
            });
            let changed = *r != next;
            *r = next;
            changed
        });
        let now = now();
        let stale = std::mem::take(&mut s.stale);
        let mut seen = BTreeMap::new();
        let networks = s.networks.clone().unwrap_or_default();
        for net in &networks {
            let Some(o) = s.outcomes.get(&net.key()) else {
                continue;
            };
            let prev = s.statuses.remove(&o.key);
            let generation_changed = prev
                .as_ref()
                .is_some_and(|(old, _)| old.metadata.generation != net.metadata.generation);
            let prev = match prev {
                Some((_, st)) if !generation_changed && !stale.covers(o) => {
                    seen.insert(o.key.clone(), (net.clone(), st));
                    continue;
                }
                // After a restart the status the object carries is the
                // previous one: unchanged conditions keep their times and
                // nothing is written when nothing changed.
                prev => prev.map(|(_, st)| st).or_else(|| net.status.clone()),
            };
            let mut new = status::network_status(o, &s.digests, &s.expected, prev.as_ref(), &now);
            new.observed_generation = net.metadata.generation;
            self.metrics.status_recomputes.inc();
            self.metrics.set_links(&o.name, new.links.as_ref());
            if prev.as_ref() != Some(&new) {
                self.metrics.status_writes.inc();
                self.sink.write(net, Some(&new));
            }
            seen.insert(o.key.clone(), (net.clone(), new));
        }
        for (key, (net, _)) in &s.statuses {
            if !seen.contains_key(key) {
                self.metrics.set_links(&net.dataplane_name(), None);
                self.sink.write(net, None);
            }
        }
        s.statuses = seen;
        let mut problems = s.index.problems();
        problems.extend(
            s.outcomes
                .values()
                .filter_map(|o| o.problem.as_ref().map(|p| format!("{}: {p}", o.key))),
        );
        let m = &self.metrics;
        let count = |n: usize| i64::try_from(n).unwrap_or(i64::MAX);
        m.reconciles.inc();
        m.desired_revision
            .set(i64::try_from(s.revision).unwrap_or(i64::MAX));
        m.nodes_known
            .set(count(s.nodes.as_ref().map_or(0, Vec::len)));
        m.nodes_with_hello.set(count(s.hellos.len()));
        let active = s.outcomes.values().filter(|o| o.active()).count();
        m.networks_active.set(count(active));
        m.networks_inactive.set(count(s.outcomes.len() - active));
        m.problems.set(count(problems.len()));
        problems
    }
}
