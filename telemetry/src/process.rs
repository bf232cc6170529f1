//! The standard `process_*` metrics of the running process, read from
//! /proc at each scrape (the names every Prometheus dashboard expects).

use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use std::sync::atomic::AtomicU64;

/// Clock ticks per second in /proc/*/stat: USER_HZ, 100 on every Linux ABI.
const USER_HZ: f64 = 100.0;

/// What /proc says about one process.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ProcessStats {
    pub cpu_seconds: f64,
    pub resident_bytes: u64,
    pub virtual_bytes: u64,
    pub threads: u64,
    pub start_time_seconds: f64,
    pub open_fds: u64,
    pub max_fds: u64,
}

/// utime + stime (seconds) and the start time (seconds after boot) from
/// `/proc/self/stat`; the command name may hold spaces and parentheses,
/// so fields are counted after its closing parenthesis.
pub fn parse_stat(stat: &str) -> Option<(f64, f64)> {
    let rest = &stat[stat.rfind(')')? + 1..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    // rest starts at field 3 (state): utime is field 14, stime 15, starttime 22.
    let field = |n: usize| f.get(n - 3)?.parse::<u64>().ok();
    let cpu = (field(14)? + field(15)?) as f64 / USER_HZ;
    let start = field(22)? as f64 / USER_HZ;
    Some((cpu, start))
}

/// `key: value kB` of /proc/self/status, in bytes (or the bare number).
pub fn status_value(status: &str, key: &str) -> Option<u64> {
    let line = status.lines().find(|l| l.starts_with(key))?;
    let mut words = line[key.len()..].trim_start_matches(':').split_whitespace();
    let n: u64 = words.next()?.parse().ok()?;
    Some(if words.next() == Some("kB") {
        n * 1024
    } else {
        n
    })
}

/// `btime` of /proc/stat: boot time, seconds since the epoch.
pub fn boot_time(stat: &str) -> Option<u64> {
    stat.lines()
        .find_map(|l| l.strip_prefix("btime "))?
        .trim()
        .parse()
        .ok()
}

/// The soft "Max open files" of /proc/self/limits.
pub fn max_open_files(limits: &str) -> Option<u64> {
    limits
        .lines()
        .find(|l| l.starts_with("Max open files"))?
        .split_whitespace()
        .nth(3)?
        .parse()
        .ok()
}

/// This process's stats (zeros for whatever /proc cannot tell).
pub fn current() -> ProcessStats {
    let read = |p: &str| std::fs::read_to_string(p).unwrap_or_default();
    let status = read("/proc/self/status");
    let (cpu, start) = parse_stat(&read("/proc/self/stat")).unwrap_or_default();
    let boot = boot_time(&read("/proc/stat")).unwrap_or_default();
    ProcessStats {
        cpu_seconds: cpu,
        resident_bytes: status_value(&status, "VmRSS").unwrap_or_default(),
        virtual_bytes: status_value(&status, "VmSize").unwrap_or_default(),
        threads: status_value(&status, "Threads").unwrap_or_default(),
        start_time_seconds: boot as f64 + start,
        open_fds: std::fs::read_dir("/proc/self/fd").map_or(0, |d| d.count() as u64),
        max_fds: max_open_files(&read("/proc/self/limits")).unwrap_or_default(),
    }
}

fn gauge(v: u64) -> Gauge {
    let g = Gauge::default();
    g.set(i64::try_from(v).unwrap_or(i64::MAX));
    g
}

/// Registers `process_*` for `s` in `reg` (an unprefixed registry).
pub fn register(reg: &mut Registry, s: &ProcessStats) {
    let cpu = Counter::<f64, AtomicU64>::default();
    cpu.inc_by(s.cpu_seconds);
    reg.register(
        "process_cpu_seconds",
        "Total user and system CPU time spent in seconds",
        cpu,
    );
    reg.register(
        "process_resident_memory_bytes",
        "Resident memory size in bytes",
        gauge(s.resident_bytes),
    );
    reg.register(
        "process_virtual_memory_bytes",
        "Virtual memory size in bytes",
        gauge(s.virtual_bytes),
    );
    reg.register("process_threads", "Number of OS threads", gauge(s.threads));
    reg.register(
        "process_open_fds",
        "Number of open file descriptors",
        gauge(s.open_fds),
    );
    reg.register(
        "process_max_fds",
        "Maximum number of open file descriptors",
        gauge(s.max_fds),
    );
    let start = Gauge::<f64, AtomicU64>::default();
    start.set(s.start_time_seconds);
    reg.register(
        "process_start_time_seconds",
        "Start time of the process since unix epoch in seconds",
        start,
    );
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn stat_fields_are_counted_after_the_command_name() {
        let stat = "1234 (l2mesh (x) y) S 1 1234 1234 0 -1 4194560 100 0 0 0 250 50 0 0 20 0 7 0 12345 1000000 500 18446744073709551615";
        let (cpu, start) = parse_stat(stat).unwrap();
        assert!((cpu - 3.0).abs() < 1e-9, "{cpu}");
        assert!((start - 123.45).abs() < 1e-9, "{start}");
        assert_eq!(parse_stat("garbage"), None);
    }

    #[test]
    fn status_limits_and_boot_time_parse() {
        let status = "Name:\tx\nVmSize:\t  1000 kB\nVmRSS:\t    200 kB\nThreads:\t7\n";
        assert_eq!(status_value(status, "VmRSS"), Some(200 * 1024));
        assert_eq!(status_value(status, "VmSize"), Some(1000 * 1024));
        assert_eq!(status_value(status, "Threads"), Some(7));
        assert_eq!(
            boot_time("cpu 1 2\nbtime 1700000000\n"),
            Some(1_700_000_000)
        );
        let limits = "Limit                     Soft Limit           Hard Limit           Units\nMax open files            1024                 524288               files\n";
        assert_eq!(max_open_files(limits), Some(1024));
    }

    #[test]
    fn the_running_process_has_memory_threads_and_fds() {
        let s = current();
        assert!(
            s.resident_bytes > 0 && s.threads > 0 && s.open_fds > 0,
            "{s:?}"
        );
        assert!(s.start_time_seconds > 1_600_000_000.0, "{s:?}");
    }
}
