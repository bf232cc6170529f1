//! Long-running pings as processes, and their summaries (scenario 6 counts
//! lost packets across a key rotation).

use std::net::IpAddr;
use std::time::Duration;

use nix::sys::signal::Signal;

use crate::netns::Netns;
use crate::process::{ProcId, ProcSpec, ProcState, Processes};
use crate::{Error, Result};

/// `N packets transmitted, M received` from a ping summary.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PingStats {
    pub transmitted: u32,
    pub received: u32,
}

impl PingStats {
    pub fn lost(&self) -> u32 {
        self.transmitted.saturating_sub(self.received)
    }
}

/// The last summary line of iputils ping output.
pub fn parse_summary(text: &str) -> Option<PingStats> {
    text.lines().rev().find_map(|line| {
        let (tx, rest) = line.split_once(" packets transmitted, ")?;
        let rx = rest.split_once(" received")?.0;
        Some(PingStats {
            transmitted: tx.trim().parse().ok()?,
            received: rx.trim().parse().ok()?,
        })
    })
}

/// A ping running in the background until [`BackgroundPing::finish`].
#[derive(Debug)]
pub struct BackgroundPing {
    id: ProcId,
}

impl BackgroundPing {
    /// Pings `addr` from `ns` every `interval` (at least 2 ms, root only
    /// below 200 ms, which the harness is).
    pub fn start(
        procs: &Processes,
        name: &str,
        ns: &Netns,
        addr: IpAddr,
        interval: Duration,
    ) -> Result<Self> {
        let interval = interval.max(Duration::from_millis(2)).as_secs_f64();
        let id = procs.spawn(
            ProcSpec::new(name, ns, "ping")
                // -O reports each unanswered probe, so a test can wait for loss.
                .args([
                    "-n",
                    "-O",
                    "-i",
                    &format!("{interval:.3}"),
                    &addr.to_string(),
                ])
                .daemon(),
        )?;
        Ok(Self { id })
    }

    /// Its handle, e.g. to read its log while it runs.
    pub fn id(&self) -> ProcId {
        self.id
    }

    /// Stops the ping (SIGINT makes it print its summary) and returns the
    /// counts.
    pub fn finish(self, procs: &Processes) -> Result<PingStats> {
        procs.signal(self.id, Signal::SIGINT)?;
        procs.wait_until("ping printed its summary", Duration::from_secs(5), || {
            matches!(procs.state(self.id), Ok(ProcState::Exited(_)))
        })?;
        let log = procs.log(self.id)?;
        parse_summary(&log).ok_or_else(|| Error::Command {
            command: "ping".to_owned(),
            status: "no summary".to_owned(),
            stderr: crate::process::tail(&log, 5),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn summary_is_parsed_with_and_without_errors() {
        let out = "64 bytes from 10.1.0.1: icmp_seq=1\n\n--- 10.1.0.1 ping statistics ---\n\
                   50 packets transmitted, 48 received, 4% packet loss, time 4900ms\n";
        let s = parse_summary(out).unwrap();
        assert_eq!((s.transmitted, s.received, s.lost()), (50, 48, 2));
        let errs = "3 packets transmitted, 0 received, +3 errors, 100% packet loss, time 2ms\n";
        assert_eq!(parse_summary(errs).unwrap().lost(), 3);
        assert_eq!(parse_summary("nothing"), None);
    }
}
