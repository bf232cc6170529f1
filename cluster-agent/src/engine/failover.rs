//! Which gateway node carries the cluster's remote tunnels. Pure: times are
//! passed in.
//!
//! Only one gateway may be active (two would loop frames between the
//! clusters). A gateway's dataplane counts as alive while its node-sync
//! watch is open and it reported within the timeout (dataplanes report every
//! 5 s). The active gateway keeps the role while alive; when it dies the
//! first live standby by name takes over.
//!
//! No hand-back: a returning gateway stays standby until the active one
//! dies. Every switch changes the gateway the other clusters tunnel to (a
//! broker round trip and fresh handshakes, so a short outage), and a
//! gateway that just came back is the one most likely to go away again:
//! handing back would double the outages and let a flapping node flap the
//! whole cluster's remote traffic. Stickiness is the hysteresis, and it
//! survives restarts: the engine stores the active gateway with the
//! allocations and resumes the election from it.

use std::time::{Duration, Instant};

/// Default time without a report after which a gateway counts as dead.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(10);

/// What the agent knows about one node's dataplane.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Liveness {
    /// Open node-sync watches of this node.
    pub streams: u32,
    /// Last hello or status report since the agent started.
    pub last_heard: Option<Instant>,
}

/// The election; keep one per agent and call [`Election::elect`] on every reconcile.
#[derive(Clone, Debug)]
pub struct Election {
    active: Option<String>,
    started: Instant,
    timeout: Duration,
}

impl Default for Election {
    fn default() -> Self {
        Self::new(Instant::now(), DEFAULT_TIMEOUT)
    }
}

impl Election {
    #[must_use]
    pub fn new(started: Instant, timeout: Duration) -> Self {
        Self {
            active: None,
            started,
            timeout,
        }
    }

    /// Carry on from before a restart: `active` held the role and keeps it
    /// while alive (a restarted agent must not move the remote tunnels).
    #[must_use]
    pub fn resume(mut self, active: Option<String>) -> Self {
        self.active = active;
        self
    }

    /// The gateway holding the role after the last election.
    #[must_use]
    pub fn active(&self) -> Option<&str> {
        self.active.as_deref()
    }

    /// Whether a node's dataplane counts as alive. Right after the agent
    /// starts nobody has reconnected yet: for one timeout, a node not heard
    /// from since is given the benefit of the doubt.
    #[must_use]
    pub fn alive(&self, l: Liveness, now: Instant) -> bool {
        match l.last_heard {
            Some(t) => l.streams > 0 && now.saturating_duration_since(t) <= self.timeout,
            None => now.saturating_duration_since(self.started) <= self.timeout,
        }
    }

    /// Elect among `candidates` (gateway nodes that have said hello, in any
    /// order); returns the active gateway, `None` only without candidates.
    pub fn elect(&mut self, candidates: &[(&str, Liveness)], now: Instant) -> Option<String> {
        let mut sorted: Vec<(&str, Liveness)> = candidates.to_vec();
        sorted.sort_by(|a, b| a.0.cmp(b.0));
        let current = self
            .active
            .as_deref()
            .and_then(|a| sorted.iter().find(|(n, _)| *n == a));
        let next = match current {
            Some((name, l)) if self.alive(*l, now) => Some(*name),
            _ => sorted
                .iter()
                .find(|(_, l)| self.alive(*l, now))
                // Nobody alive: a dead gateway is as good as another; keep
                // the current one rather than move the role for nothing.
                .or(current)
                .or(sorted.first())
                .map(|(n, _)| *n),
        };
        self.active = next.map(str::to_owned);
        self.active.clone()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const T: Duration = DEFAULT_TIMEOUT;

    fn up(at: Instant) -> Liveness {
        Liveness {
            streams: 1,
            last_heard: Some(at),
        }
    }

    fn down(at: Instant) -> Liveness {
        Liveness {
            streams: 0,
            last_heard: Some(at),
        }
    }

    fn secs(t0: Instant, s: u64) -> Instant {
        t0 + Duration::from_secs(s)
    }

    #[test]
    fn the_first_live_gateway_by_name_is_elected() {
        let t0 = Instant::now();
        let mut e = Election::new(t0, T);
        let now = secs(t0, 30);
        assert_eq!(e.elect(&[], now), None);
        assert_eq!(
            e.elect(&[("gw-b", up(now)), ("gw-a", up(now))], now)
                .as_deref(),
            Some("gw-a")
        );
        assert_eq!(e.active(), Some("gw-a"));
    }

    #[test]
    fn a_closed_stream_hands_the_role_to_a_live_standby_at_once() {
        let t0 = Instant::now();
        let mut e = Election::new(t0, T);
        let t = secs(t0, 20);
        e.elect(&[("gw-a", up(t)), ("gw-b", up(t))], t);
        let t1 = secs(t0, 21);
        assert_eq!(
            e.elect(&[("gw-a", down(t)), ("gw-b", up(t1))], t1)
                .as_deref(),
            Some("gw-b")
        );
    }

    #[test]
    fn a_silent_gateway_is_dead_after_the_timeout_and_not_before() {
        let t0 = Instant::now();
        let mut e = Election::new(t0, T);
        let heard = secs(t0, 20);
        e.elect(&[("gw-a", up(heard)), ("gw-b", up(heard))], heard);
        // gw-a's stream stays open but it stops reporting; gw-b keeps reporting.
        let at = |s| secs(heard, s);
        let cands = |now| [("gw-a", up(heard)), ("gw-b", up(now))];
        assert_eq!(e.elect(&cands(at(10)), at(10)).as_deref(), Some("gw-a"));
        assert_eq!(e.elect(&cands(at(11)), at(11)).as_deref(), Some("gw-b"));
    }

    #[test]
    fn no_hand_back_when_the_old_gateway_returns() {
        let t0 = Instant::now();
        let mut e = Election::new(t0, T);
        let t = secs(t0, 20);
        e.elect(&[("gw-a", down(t)), ("gw-b", up(t))], t);
        assert_eq!(e.active(), Some("gw-b"));
        // gw-a is back and healthy: gw-b keeps the role...
        for s in 21..60 {
            let now = secs(t0, s);
            assert_eq!(
                e.elect(&[("gw-a", up(now)), ("gw-b", up(now))], now)
                    .as_deref(),
                Some("gw-b")
            );
        }
        // ...until gw-b dies.
        let now = secs(t0, 61);
        assert_eq!(
            e.elect(&[("gw-a", up(now)), ("gw-b", down(now))], now)
                .as_deref(),
            Some("gw-a")
        );
    }

    #[test]
    fn with_nobody_alive_the_role_stays_put() {
        let t0 = Instant::now();
        let mut e = Election::new(t0, T);
        let t = secs(t0, 20);
        e.elect(&[("gw-a", down(t)), ("gw-b", up(t))], t);
        let later = secs(t0, 100);
        assert_eq!(
            e.elect(&[("gw-a", down(t)), ("gw-b", down(t))], later)
                .as_deref(),
            Some("gw-b")
        );
    }

    #[test]
    fn a_gateway_that_left_the_list_is_replaced_even_if_all_are_dead() {
        let t0 = Instant::now();
        let mut e = Election::new(t0, T);
        let t = secs(t0, 20);
        e.elect(&[("gw-a", up(t))], t);
        let later = secs(t0, 100);
        assert_eq!(
            e.elect(&[("gw-c", down(t)), ("gw-b", down(t))], later)
                .as_deref(),
            Some("gw-b")
        );
    }

    #[test]
    fn a_restarted_agent_keeps_the_gateway_it_had() {
        let t0 = Instant::now();
        let mut e = Election::new(t0, T).resume(Some("gw-b".into()));
        let unknown = Liveness::default();
        let now = secs(t0, 1);
        assert_eq!(
            e.elect(&[("gw-a", unknown), ("gw-b", unknown)], now)
                .as_deref(),
            Some("gw-b")
        );
        assert_eq!(
            e.elect(&[("gw-a", up(now)), ("gw-b", unknown)], now)
                .as_deref(),
            Some("gw-b"),
            "gw-a reconnecting first does not take the role"
        );
        let now = secs(t0, 12);
        assert_eq!(
            e.elect(&[("gw-a", up(now)), ("gw-b", unknown)], now)
                .as_deref(),
            Some("gw-a"),
            "unless gw-b never comes back"
        );
    }

    #[test]
    fn after_an_agent_restart_nodes_get_one_timeout_to_reconnect() {
        let t0 = Instant::now();
        let mut e = Election::new(t0, T);
        let unknown = Liveness::default();
        // Nobody reconnected yet: the usual preference holds.
        let now = secs(t0, 1);
        assert_eq!(
            e.elect(&[("gw-a", unknown), ("gw-b", up(now))], now)
                .as_deref(),
            Some("gw-a")
        );
        // gw-a never came back: gw-b takes over after the grace.
        let now = secs(t0, 11);
        assert_eq!(
            e.elect(&[("gw-a", unknown), ("gw-b", up(now))], now)
                .as_deref(),
            Some("gw-b")
        );
    }
}
