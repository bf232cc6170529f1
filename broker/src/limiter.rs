//! Rate limit for failed joins, per source address: after `limit` failures
//! within a window, further joins from that address are refused until the
//! window ends. Pure: the caller passes the time.

use std::collections::HashMap;
use std::net::IpAddr;

/// Failed-join bookkeeping.
#[derive(Debug)]
pub struct JoinLimiter {
    limit: u32,
    window_secs: i64,
    failures: HashMap<IpAddr, (i64, u32)>,
}

impl JoinLimiter {
    /// `limit` failures per `window_secs`; `limit == 0` disables the limit.
    #[must_use]
    pub fn new(limit: u32, window_secs: i64) -> Self {
        Self {
            limit,
            window_secs,
            failures: HashMap::new(),
        }
    }

    /// `Err(seconds to wait)` if `ip` must not try now.
    pub fn check(&mut self, ip: IpAddr, now: i64) -> Result<(), i64> {
        if self.limit == 0 {
            return Ok(());
        }
        match self.failures.get(&ip) {
            Some(&(start, count)) if now < start + self.window_secs && count >= self.limit => {
                Err(start + self.window_secs - now)
            }
            _ => Ok(()),
        }
    }

    /// Count a failure from `ip`.
    pub fn failed(&mut self, ip: IpAddr, now: i64) {
        let window = self.window_secs;
        // Forget stale entries so a flood of addresses cannot grow the map forever.
        if self.failures.len() > 100_000 {
            self.failures.retain(|_, (start, _)| now < *start + window);
        }
        let entry = self.failures.entry(ip).or_insert((now, 0));
        if now >= entry.0 + window {
            *entry = (now, 0);
        }
        entry.1 += 1;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn blocks_after_limit_until_window_ends() {
        let ip: IpAddr = "192.0.2.7".parse().unwrap();
        let other: IpAddr = "192.0.2.8".parse().unwrap();
        let mut l = JoinLimiter::new(3, 60);
        for t in 0..3 {
            assert!(l.check(ip, t).is_ok());
            l.failed(ip, t);
        }
        assert_eq!(l.check(ip, 10), Err(50));
        assert!(l.check(other, 10).is_ok());
        assert!(l.check(ip, 60).is_ok());
        l.failed(ip, 61);
        assert!(l.check(ip, 62).is_ok());
    }

    #[test]
    fn zero_disables() {
        let ip: IpAddr = "192.0.2.7".parse().unwrap();
        let mut l = JoinLimiter::new(0, 60);
        for t in 0..100 {
            l.failed(ip, t);
        }
        assert!(l.check(ip, 100).is_ok());
    }
}
