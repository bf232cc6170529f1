//! `l2mesh-udpflood`: a small-datagram load generator and counter for the
//! dataplane benchmark.
//!
//! iperf3 sends one datagram per system call, so on a small machine its own
//! sender is the limit of a 64-byte test long before any tunnel is: the
//! benchmark could not tell a fast tunnel from a very fast one. This sends
//! with `sendmmsg` (a batch of datagrams per system call) and counts with
//! `recvmmsg`, so what is measured is the path between the two.

use std::net::{SocketAddr, UdpSocket};
use std::os::fd::AsRawFd as _;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use clap::{Parser, Subcommand};
use nix::libc;

/// Send or count small UDP datagrams as fast as the machine allows.
///
/// Run `recv` in the receiving namespace first, then `send` in the sending
/// one; each prints one JSON line (`{"packets":N,"seconds":S}`).
#[derive(Debug, Parser)]
#[command(name = "l2mesh-udpflood", version, about, long_about)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Debug, Subcommand)]
enum Cmd {
    /// Send datagrams of `--size` bytes to `--to` for `--seconds`.
    Send {
        /// Where to send, e.g. 10.9.0.2:5300.
        #[arg(long, env = "L2MESH_UDPFLOOD_TO")]
        to: SocketAddr,
        /// Payload bytes per datagram.
        #[arg(long, env = "L2MESH_UDPFLOOD_SIZE", default_value_t = 64)]
        size: usize,
        /// How long to send.
        #[arg(long, env = "L2MESH_UDPFLOOD_SECONDS", default_value_t = 5.0)]
        seconds: f64,
        /// Datagrams per `sendmmsg` call (1-1024).
        #[arg(long, env = "L2MESH_UDPFLOOD_BATCH", default_value_t = 64)]
        batch: usize,
        /// Datagrams per second to offer (0: as fast as the machine goes).
        /// A rate the path carries without loss leaves the sender's spare
        /// CPU to the path, as RFC 2544's throughput search does.
        #[arg(long, env = "L2MESH_UDPFLOOD_RATE", default_value_t = 0)]
        rate: u64,
    },
    /// Count datagrams arriving at `--bind` until none came for `--idle`
    /// seconds after the first, or `--max-seconds` passed.
    Recv {
        /// Address to listen on, e.g. 0.0.0.0:5300.
        #[arg(long, env = "L2MESH_UDPFLOOD_BIND")]
        bind: SocketAddr,
        /// Seconds of silence, after traffic started, that end the count.
        #[arg(long, env = "L2MESH_UDPFLOOD_IDLE", default_value_t = 1.0)]
        idle: f64,
        /// Give up after this long even if traffic never stops (or starts).
        #[arg(long, env = "L2MESH_UDPFLOOD_MAX_SECONDS", default_value_t = 60.0)]
        max_seconds: f64,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let r = match cli.cmd {
        Cmd::Send {
            to,
            size,
            seconds,
            batch,
            rate,
        } => send(to, size, seconds, batch, rate).map(|(packets, secs, refused)| {
            println!("{{\"packets\":{packets},\"seconds\":{secs:.6},\"refused_calls\":{refused}}}");
        }),
        Cmd::Recv {
            bind,
            idle,
            max_seconds,
        } => UdpSocket::bind(bind)
            .with_context(|| format!("binding {bind}"))
            .and_then(|sock| count(&sock, idle, max_seconds))
            .map(|(packets, secs)| println!("{{\"packets\":{packets},\"seconds\":{secs:.6}}}")),
    };
    match r {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("l2mesh-udpflood: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// How long to wait before sending more, having sent `sent` datagrams
/// `elapsed` into a run paced at `rate` per second (0: no pacing).
fn pace(sent: u64, rate: u64, elapsed: Duration) -> Option<Duration> {
    if rate == 0 {
        return None;
    }
    let due = Duration::from_secs_f64(sent as f64 / rate as f64);
    due.checked_sub(elapsed).filter(|d| !d.is_zero())
}

/// Sends for `seconds` (at `rate` datagrams per second, 0: flat out);
/// returns datagrams sent, seconds taken and the calls the kernel refused
/// (full queues).
fn send(
    to: SocketAddr,
    size: usize,
    seconds: f64,
    batch: usize,
    rate: u64,
) -> anyhow::Result<(u64, f64, u64)> {
    anyhow::ensure!(
        (1..=1024).contains(&batch),
        "--batch {batch} is out of range: use 1 to 1024"
    );
    anyhow::ensure!(
        (1..=65_000).contains(&size),
        "--size {size} is out of range: use 1 to 65000 bytes"
    );
    let run = duration(seconds, "--seconds")?;
    let bind: SocketAddr = if to.is_ipv4() {
        "0.0.0.0:0".parse()?
    } else {
        "[::]:0".parse()?
    };
    let sock = UdpSocket::bind(bind).context("binding the sending socket")?;
    sock.connect(to)
        .with_context(|| format!("no route to {to}: check the address"))?;
    let payload = vec![0x5au8; size];
    let mut iovs = vec![
        libc::iovec {
            iov_base: payload.as_ptr().cast_mut().cast(),
            iov_len: payload.len(),
        };
        batch
    ];
    let mut hdrs = mmsg_headers(&mut iovs);
    let start = Instant::now();
    let mut sent: u64 = 0;
    let mut refused: u64 = 0;
    while start.elapsed() < run {
        if let Some(wait) = pace(sent, rate, start.elapsed()) {
            std::thread::sleep(wait);
        }
        // SAFETY: every header points at `iovs`, which point at `payload`;
        // all outlive the call and are not moved while it runs. The kernel
        // only reads the payload.
        #[allow(unsafe_code)]
        let r = unsafe {
            libc::sendmmsg(
                sock.as_raw_fd(),
                hdrs.as_mut_ptr(),
                batch as libc::c_uint,
                0,
            )
        };
        if r >= 0 {
            sent += u64::try_from(r).unwrap_or(0);
            continue;
        }
        let e = std::io::Error::last_os_error();
        match e.raw_os_error() {
            // A full queue somewhere on the path or an ICMP error from an
            // earlier datagram: the flood goes on, as a real sender's would.
            Some(libc::ENOBUFS | libc::EAGAIN | libc::ECONNREFUSED | libc::EINTR) => {
                refused += 1;
            }
            _ => return Err(e).with_context(|| format!("sending to {to}")),
        }
    }
    Ok((sent, start.elapsed().as_secs_f64(), refused))
}

/// Counts datagrams arriving at `sock`; returns how many and the seconds
/// from the first to the last.
fn count(sock: &UdpSocket, idle: f64, max_seconds: f64) -> anyhow::Result<(u64, f64)> {
    const BATCH: usize = 256;
    const ROOM: usize = 2048;
    let idle = duration(idle, "--idle")?;
    let max = duration(max_seconds, "--max-seconds")?;
    // Short timeouts so the idle and overall limits are checked often.
    sock.set_read_timeout(Some(Duration::from_millis(100)))?;
    let mut bufs = vec![[0u8; ROOM]; BATCH];
    let mut iovs: Vec<libc::iovec> = bufs
        .iter_mut()
        .map(|b| libc::iovec {
            iov_base: b.as_mut_ptr().cast(),
            iov_len: ROOM,
        })
        .collect();
    let mut hdrs = mmsg_headers(&mut iovs);
    let began = Instant::now();
    let mut first: Option<Instant> = None;
    let mut last = Instant::now();
    let mut packets: u64 = 0;
    loop {
        // SAFETY: the headers point at `iovs` and they at `bufs`, all owned
        // here and unmoved during the call; each iovec's length is its
        // buffer's. The kernel writes at most that much into each.
        #[allow(unsafe_code)]
        let r = unsafe {
            libc::recvmmsg(
                sock.as_raw_fd(),
                hdrs.as_mut_ptr(),
                BATCH as libc::c_uint,
                libc::MSG_WAITFORONE,
                std::ptr::null_mut(),
            )
        };
        let now = Instant::now();
        if r > 0 {
            packets += u64::try_from(r).unwrap_or(0);
            first.get_or_insert(now);
            last = now;
        } else if r < 0 {
            let e = std::io::Error::last_os_error();
            if !matches!(
                e.raw_os_error(),
                Some(libc::EAGAIN | libc::EINTR | libc::ECONNREFUSED)
            ) {
                return Err(e).context("receiving");
            }
        }
        let quiet = first.is_some() && now.duration_since(last) >= idle;
        if quiet || now.duration_since(began) >= max {
            break;
        }
    }
    let secs = first.map_or(0.0, |f| last.duration_since(f).as_secs_f64());
    Ok((packets, secs))
}

fn duration(secs: f64, flag: &str) -> anyhow::Result<Duration> {
    Duration::try_from_secs_f64(secs)
        .ok()
        .filter(|d| !d.is_zero())
        .with_context(|| format!("{flag} {secs} is not a positive number of seconds"))
}

/// One `sendmmsg`/`recvmmsg` header per iovec, each pointing at its own;
/// `iovs` must stay where it is while the headers are in use.
fn mmsg_headers(iovs: &mut [libc::iovec]) -> Vec<libc::mmsghdr> {
    iovs.iter_mut()
        .map(|iov| {
            let mut h = zeroed_mmsghdr();
            h.msg_hdr.msg_iov = std::ptr::from_mut(iov);
            h.msg_hdr.msg_iovlen = 1;
            h
        })
        .collect()
}

fn zeroed_mmsghdr() -> libc::mmsghdr {
    // SAFETY: mmsghdr is plain data (integers and pointers); all-zero is a
    // valid empty header.
    #[allow(unsafe_code)]
    unsafe {
        std::mem::zeroed()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_must_be_positive() {
        assert!(duration(0.0, "--seconds").is_err());
        assert!(duration(-1.0, "--seconds").is_err());
        assert!(duration(f64::NAN, "--seconds").is_err());
        assert_eq!(
            duration(1.5, "--seconds").ok(),
            Some(Duration::from_millis(1500))
        );
    }

    #[test]
    fn counts_what_it_is_sent_on_loopback() {
        let rx = UdpSocket::bind("127.0.0.1:0").unwrap();
        let to = rx.local_addr().unwrap();
        let counter = std::thread::spawn(move || count(&rx, 0.3, 5.0));
        let (sent, _, _) = send(to, 64, 0.2, 8, 0).unwrap();
        let (got, _) = counter.join().unwrap().unwrap();
        assert!(sent > 0);
        // Loopback may drop when the counter falls behind, never invent.
        assert!(got > 0 && got <= sent, "got {got} of {sent}");
    }

    #[test]
    fn pacing_holds_the_sender_to_its_rate() {
        assert_eq!(pace(1000, 0, Duration::ZERO), None, "0: flat out");
        assert_eq!(
            pace(1000, 10_000, Duration::from_millis(40)),
            Some(Duration::from_millis(60))
        );
        assert_eq!(pace(1000, 10_000, Duration::from_millis(100)), None);
        assert_eq!(pace(1000, 10_000, Duration::from_millis(150)), None);
    }

    #[test]
    fn a_paced_send_offers_about_its_rate() {
        let rx = UdpSocket::bind("127.0.0.1:0").unwrap();
        let to = rx.local_addr().unwrap();
        let (sent, secs, _) = send(to, 64, 0.3, 10, 2_000).unwrap();
        // 2000/s for 0.3 s: 600, give or take a batch and a descheduled
        // moment at the end; flat out it would be tens of thousands.
        assert!((450..=650).contains(&sent), "sent {sent} in {secs} s");
    }

    #[test]
    fn bad_flags_are_refused_with_their_name() {
        let to: SocketAddr = "127.0.0.1:9".parse().unwrap();
        let e = send(to, 64, 1.0, 0, 0).unwrap_err().to_string();
        assert!(e.contains("--batch"), "{e}");
        let e = send(to, 0, 1.0, 8, 0).unwrap_err().to_string();
        assert!(e.contains("--size"), "{e}");
    }
}
