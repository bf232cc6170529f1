//! Rate limits. Pure: the caller passes the time.
//!
//! - [`JoinLimiter`]: failed joins, counted per source address and per token
//!   id. Once either is over the limit, joins from that address or for that
//!   token are answered "rate limited" unless their token is valid: a valid
//!   join is never locked out by someone else's failures (one bad client
//!   behind a NAT must not stop every cluster's onboarding).
//! - [`ReportLimiter`]: a token bucket per cluster for its reports.

use std::collections::HashMap;
use std::hash::Hash;
use std::net::IpAddr;

/// Entries kept per map before stale ones are dropped (and, while still
/// full, new keys are not counted), so a flood of addresses or made-up
/// token ids cannot grow memory without bound.
const MAX_TRACKED: usize = 100_000;

#[derive(Debug)]
struct Window<K> {
    failures: HashMap<K, (i64, u32)>,
}

impl<K: Eq + Hash> Window<K> {
    fn blocked(&self, key: &K, limit: u32, window: i64, now: i64) -> Option<i64> {
        match self.failures.get(key) {
            Some(&(start, count)) if now < start + window && count >= limit => {
                Some(start + window - now)
            }
            _ => None,
        }
    }

    fn fail(&mut self, key: K, window: i64, now: i64) {
        if self.failures.len() >= MAX_TRACKED {
            self.failures.retain(|_, (start, _)| now < *start + window);
            if self.failures.len() >= MAX_TRACKED && !self.failures.contains_key(&key) {
                return;
            }
        }
        let entry = self.failures.entry(key).or_insert((now, 0));
        if now >= entry.0 + window {
            *entry = (now, 0);
        }
        entry.1 = entry.1.saturating_add(1);
    }
}

/// Failed-join bookkeeping.
#[derive(Debug)]
pub struct JoinLimiter {
    limit: u32,
    window_secs: i64,
    by_source: Window<IpAddr>,
    by_token: Window<String>,
}

impl JoinLimiter {
    /// `limit` failures per `window_secs`, per source and per token id;
    /// `limit == 0` disables the limit.
    #[must_use]
    pub fn new(limit: u32, window_secs: i64) -> Self {
        Self {
            limit,
            window_secs,
            by_source: Window {
                failures: HashMap::new(),
            },
            by_token: Window {
                failures: HashMap::new(),
            },
        }
    }

    /// `Err(seconds to wait)` if joins from `ip` or for `token_id` are over
    /// the limit; the caller still lets a valid token through.
    pub fn check(&self, ip: IpAddr, token_id: &str, now: i64) -> Result<(), i64> {
        if self.limit == 0 {
            return Ok(());
        }
        let (limit, window) = (self.limit, self.window_secs);
        let source = self.by_source.blocked(&ip, limit, window, now);
        let token = self
            .by_token
            .blocked(&token_id.to_owned(), limit, window, now);
        match source.max(token) {
            Some(wait) => Err(wait),
            None => Ok(()),
        }
    }

    /// Count a failed join from `ip` for `token_id`.
    pub fn failed(&mut self, ip: IpAddr, token_id: &str, now: i64) {
        if self.limit == 0 {
            return;
        }
        self.by_source.fail(ip, self.window_secs, now);
        self.by_token
            .fail(token_id.to_owned(), self.window_secs, now);
    }
}

/// A token bucket per key: `burst` calls at once, refilled at `per_minute`.
#[derive(Debug)]
pub struct ReportLimiter {
    per_minute: u32,
    burst: u32,
    buckets: HashMap<String, (f64, f64)>,
}

impl ReportLimiter {
    /// `per_minute == 0` disables the limit.
    #[must_use]
    pub fn new(per_minute: u32, burst: u32) -> Self {
        Self {
            per_minute,
            burst: burst.max(1),
            buckets: HashMap::new(),
        }
    }

    /// Take one call for `key` at `now` (seconds, fractional); `Err(seconds
    /// until the next call is allowed)` if the bucket is empty.
    pub fn take(&mut self, key: &str, now: f64) -> Result<(), f64> {
        if self.per_minute == 0 {
            return Ok(());
        }
        let rate = f64::from(self.per_minute) / 60.0;
        let burst = f64::from(self.burst);
        let entry = self.buckets.entry(key.to_owned()).or_insert((burst, now));
        let (tokens, last) = *entry;
        let tokens = (tokens + (now - last).max(0.0) * rate).min(burst);
        if tokens >= 1.0 {
            *entry = (tokens - 1.0, now);
            Ok(())
        } else {
            *entry = (tokens, now);
            Err((1.0 - tokens) / rate)
        }
    }

    /// Forget a key (its cluster was removed).
    pub fn forget(&mut self, key: &str) {
        self.buckets.remove(key);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn blocks_a_source_after_limit_until_window_ends() {
        let ip: IpAddr = "192.0.2.7".parse().unwrap();
        let other: IpAddr = "192.0.2.8".parse().unwrap();
        let mut l = JoinLimiter::new(3, 60);
        for t in 0..3 {
            assert!(l.check(ip, &format!("tok-{t}"), t).is_ok());
            l.failed(ip, &format!("tok-{t}"), t);
        }
        assert_eq!(l.check(ip, "tok-new", 10), Err(50));
        assert!(l.check(other, "tok-new", 10).is_ok());
        assert!(l.check(ip, "tok-new", 60).is_ok());
        l.failed(ip, "tok-x", 61);
        assert!(l.check(ip, "tok-new", 62).is_ok());
    }

    #[test]
    fn blocks_a_token_id_from_every_source() {
        let mut l = JoinLimiter::new(2, 60);
        for i in 1..=2u8 {
            l.failed(IpAddr::from([192, 0, 2, i]), "tok-a", 0);
        }
        assert_eq!(
            l.check(IpAddr::from([198, 51, 100, 1]), "tok-a", 1),
            Err(59)
        );
        assert!(l.check(IpAddr::from([198, 51, 100, 1]), "tok-b", 1).is_ok());
    }

    #[test]
    fn zero_disables() {
        let ip: IpAddr = "192.0.2.7".parse().unwrap();
        let mut l = JoinLimiter::new(0, 60);
        for t in 0..100 {
            l.failed(ip, "t", t);
        }
        assert!(l.check(ip, "t", 100).is_ok());
    }

    #[test]
    fn report_bucket_allows_a_burst_then_the_rate() {
        let mut l = ReportLimiter::new(60, 3);
        for _ in 0..3 {
            assert!(l.take("edge", 0.0).is_ok());
        }
        let wait = l.take("edge", 0.0).unwrap_err();
        assert!((wait - 1.0).abs() < 1e-9, "{wait}");
        assert!(l.take("other", 0.0).is_ok());
        assert!(l.take("edge", 1.0).is_ok());
        assert!(l.take("edge", 1.0).is_err());
        // A long pause refills to the burst, not beyond.
        for _ in 0..3 {
            assert!(l.take("edge", 100.0).is_ok());
        }
        assert!(l.take("edge", 100.0).is_err());
        assert!(ReportLimiter::new(0, 1).take("x", 0.0).is_ok());
    }
}
