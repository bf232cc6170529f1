//! The figures the benchmark prints: percentiles, sizes, before/after ratios.

use std::time::Duration;

pub fn pct(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    #[allow(
        clippy::cast_possible_truncation,
        clippy::cast_sign_loss,
        clippy::cast_precision_loss
    )]
    let idx = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[idx.min(sorted.len() - 1)]
}

pub fn ms(d: Duration) -> String {
    format!("{:.1} ms", d.as_secs_f64() * 1000.0)
}

pub fn bytes(b: u64) -> String {
    #[allow(clippy::cast_precision_loss)]
    let f = b as f64;
    if b >= 1 << 20 {
        format!("{:.1} MB", f / f64::from(1u32 << 20))
    } else {
        format!("{:.1} KB", f / 1024.0)
    }
}

/// Figures of one kind of change.
#[derive(Clone, Debug, Default)]
pub struct Figures {
    pub affected: usize,
    pub p50: Duration,
    pub p99: Duration,
    pub worst_round: Duration,
    pub bytes_per_change: u64,
}

/// Figures of one run (one layout, one broker).
#[derive(Clone, Debug, Default)]
pub struct Summary {
    pub joins_per_s: f64,
    pub changes: Vec<(&'static str, Figures)>,
    pub rss_watching_kib: u64,
    pub rss_full_kib: u64,
    pub rss_peak_kib: u64,
}

/// Latencies of all rounds of one kind, and the bytes each round sent.
#[derive(Default)]
pub struct Rounds {
    all: Vec<Duration>,
    worst: Vec<Duration>,
    bytes: Vec<u64>,
}

impl Rounds {
    pub fn add(&mut self, (lat, sent): (Vec<Duration>, u64)) {
        self.worst.push(lat.last().copied().unwrap_or_default());
        self.all.extend(lat);
        self.bytes.push(sent);
    }

    pub fn figures(mut self, affected: usize) -> Figures {
        self.all.sort();
        let n = u64::try_from(self.bytes.len().max(1)).unwrap_or(1);
        Figures {
            affected,
            p50: pct(&self.all, 0.5),
            p99: pct(&self.all, 0.99),
            worst_round: self.worst.iter().max().copied().unwrap_or_default(),
            bytes_per_change: self.bytes.iter().sum::<u64>() / n,
        }
    }
}

#[allow(clippy::cast_precision_loss)]
pub fn ratio(before: f64, after: f64) -> String {
    if after <= 0.0 {
        "-".into()
    } else {
        format!("{:.1}x", before / after)
    }
}

pub fn compare(before: &Summary, after: &Summary) {
    println!("  before/after (how many times smaller or faster now):");
    for ((what, b), (_, a)) in before.changes.iter().zip(&after.changes) {
        #[allow(clippy::cast_precision_loss)]
        let sent = ratio(b.bytes_per_change as f64, a.bytes_per_change as f64);
        println!(
            "  {what:<16} p50 {:>8}  p99 {:>8}  sent {:>8}",
            ratio(b.p50.as_secs_f64(), a.p50.as_secs_f64()),
            ratio(b.p99.as_secs_f64(), a.p99.as_secs_f64()),
            sent,
        );
    }
    #[allow(clippy::cast_precision_loss)]
    let rss = ratio(before.rss_full_kib as f64, after.rss_full_kib as f64);
    #[allow(clippy::cast_precision_loss)]
    let peak = ratio(before.rss_peak_kib as f64, after.rss_peak_kib as f64);
    #[allow(clippy::cast_precision_loss)]
    let watching = ratio(
        before.rss_watching_kib as f64,
        after.rss_watching_kib as f64,
    );
    println!("  broker RSS       {rss:>8}  peak {peak:>8}  only watching {watching:>8}");
    println!(
        "  joins/s          {:.0} -> {:.0}",
        before.joins_per_s, after.joins_per_s
    );
}
