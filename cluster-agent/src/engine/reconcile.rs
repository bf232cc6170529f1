//! One reconcile: compute from the inputs (the pure core), make the
//! allocations durable, then publish to the nodes, the broker and the status.

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
    nodes: Vec<NodeEntry>,
    outcomes: Vec<desired::NetworkOutcome>,
    plan: desired::ClusterPlan,
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
                    let problems = self.publish(s, round);
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
    /// gateway election and the plan. `None` while the intent is incomplete.
    fn compute(&self, s: &mut State) -> Option<Round> {
        let (Some(nodes), Some(networks)) = (s.nodes.clone(), s.networks.as_ref()) else {
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
        // Only the elected gateway is handed to the plan as one: the plan
        // gives remote tunnels to a single gateway and reports it.
        let before = s.election.active().map(str::to_owned);
        let gateway = s.election.elect(
            &gateway_candidates(&nodes, &s.hellos, &s.live),
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
        let plan = desired::plan(
            &plan_nodes,
            &s.hellos,
            &outcomes,
            self.tunnel_subnet,
            &mut s.allocs,
        );
        // Nodes that left the (complete) list: forget what they said.
        s.live.retain(|node, _| plan.nodes.contains_key(node));
        s.hellos.retain(|node, _| plan.nodes.contains_key(node));
        s.allocs
            .known_nodes
            .retain(|node, _| plan.nodes.contains_key(node));
        s.node_status
            .retain(|node, _| plan.nodes.contains_key(node));
        Some(Round {
            nodes,
            outcomes,
            plan,
            gateway,
        })
    }

    /// Hand a computed round (whose allocations are saved) to the nodes,
    /// the broker and the status.
    fn publish(&self, s: &mut State, round: Round) -> Vec<String> {
        let Round {
            nodes,
            outcomes,
            plan,
            ..
        } = round;
        let mut problems = plan.problems.clone();
        self.metrics
            .desired_recomputes
            .inc_by(plan.nodes.len() as u64);
        // Nodes that left the list: their watch ends (the sender is
        // dropped) and a reconnect is refused.
        s.desired.retain(|node, _| plan.nodes.contains_key(node));
        for (node, mut state) in plan.nodes {
            let tx = s
                .desired
                .entry(node)
                .or_insert_with(|| watch::channel(None).0);
            let same = tx.borrow().as_ref().is_some_and(|cur| {
                state.revision = cur.revision;
                *cur == state
            });
            if !same {
                s.revision += 1;
                state.revision = s.revision;
                tx.send_replace(Some(state));
            }
        }
        self.reports.send_if_modified(|r| {
            let next = Some(BrokerReports {
                gateways: plan.gateways.clone(),
                networks: plan.requested_networks.clone(),
            });
            let changed = *r != next;
            *r = next;
            changed
        });
        let now = now();
        let mut seen = BTreeMap::new();
        let networks = s.networks.clone().unwrap_or_default();
        for (net, o) in networks
            .iter()
            .filter_map(|n| outcomes.iter().find(|o| o.key == n.key()).map(|o| (n, o)))
        {
            // After a restart the status the object carries is the previous
            // one: unchanged conditions keep their times and nothing is
            // written when nothing changed.
            let prev = s
                .statuses
                .get(&o.key)
                .map(|(_, st)| st)
                .or(net.status.as_ref());
            let expected = expected_nodes(&nodes, &s.hellos);
            let mut new = status::network_status(o, &s.node_status, &expected, prev, &now);
            new.observed_generation = net.metadata.generation;
            self.metrics.status_recomputes.inc();
            if prev != Some(&new) {
                self.metrics.status_writes.inc();
                self.sink.write(net, Some(&new));
            }
            seen.insert(o.key.clone(), (net.clone(), new));
        }
        for (key, (net, _)) in &s.statuses {
            if !seen.contains_key(key) {
                self.sink.write(net, None);
            }
        }
        s.statuses = seen;
        problems.extend(
            outcomes
                .iter()
                .filter_map(|o| o.problem.as_ref().map(|p| format!("{}: {p}", o.key))),
        );
        let m = &self.metrics;
        let count = |n: usize| i64::try_from(n).unwrap_or(i64::MAX);
        m.reconciles.inc();
        m.desired_revision
            .set(i64::try_from(s.revision).unwrap_or(i64::MAX));
        m.nodes_known.set(count(nodes.len()));
        m.nodes_with_hello.set(count(s.hellos.len()));
        let active = outcomes.iter().filter(|o| o.active()).count();
        m.networks_active.set(count(active));
        m.networks_inactive.set(count(outcomes.len() - active));
        m.problems.set(count(problems.len()));
        problems
    }
}
