//! Connections before the gRPC layer: the accept loop, the TLS handshake,
//! and the bounds that keep unauthenticated clients from holding the broker.
//!
//! Every connection is counted against a total and a per-source cap from
//! `accept` on, and is *unauthenticated* until a call on it identifies the
//! admin or a cluster. Unauthenticated connections have their own (smaller)
//! caps, so the rest of the total stays free for authenticated clients, and
//! a deadline: a client that has not authenticated within it is cut off,
//! whatever it did (nothing, half a TLS handshake, TLS without HTTP/2, only
//! joins). When all unauthenticated slots are taken, a new connection
//! evicts the oldest unauthenticated one instead of being refused: idle
//! connections cannot keep the admin or a reconnecting cluster out, only a
//! flood faster than a TLS handshake could. Accept errors (EMFILE when file
//! descriptors run out) back off instead of spinning.

use crate::metrics::Metrics;
use std::collections::HashMap;
use std::future::Future as _;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::task::{Context, Poll};
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::TlsAcceptor;
use tokio_rustls::server::TlsStream;
use tonic::transport::server::Connected;

/// File descriptors kept free for everything that is not a client
/// connection: the store, the metrics endpoint, a handshake in flight.
pub const FD_RESERVE: u64 = 64;

/// The bounds on connections. Defaults are the flags' defaults.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ConnLimits {
    /// All connections (clamped below the file-descriptor limit at start).
    pub max_total: usize,
    /// All connections from one source address.
    pub max_per_source: usize,
    /// Connections not (yet) authenticated.
    pub max_unauthenticated: usize,
    /// Connections not (yet) authenticated from one source address.
    pub max_unauthenticated_per_source: usize,
    /// Time to finish the TLS handshake.
    pub handshake_timeout: Duration,
    /// Time from accept to the first authenticated call; then the
    /// connection is closed. Joins are done well within it.
    pub unauthenticated_timeout: Duration,
}

impl Default for ConnLimits {
    fn default() -> Self {
        Self {
            max_total: 4096,
            max_per_source: 256,
            max_unauthenticated: 256,
            max_unauthenticated_per_source: 16,
            handshake_timeout: Duration::from_secs(10),
            unauthenticated_timeout: Duration::from_secs(30),
        }
    }
}

impl ConnLimits {
    /// The limits with `max_total` lowered to fit `fd_limit` open files
    /// (minus [`FD_RESERVE`]) and the unauthenticated caps kept below the
    /// total, so that some room always stays for authenticated clients.
    #[must_use]
    pub fn fitted(&self, fd_limit: u64) -> Self {
        let budget = usize::try_from(fd_limit.saturating_sub(FD_RESERVE)).unwrap_or(usize::MAX);
        let max_total = self.max_total.min(budget).max(4);
        let max_unauthenticated = self.max_unauthenticated.min(max_total / 2).max(1);
        Self {
            max_total,
            max_per_source: self.max_per_source.min(max_total).max(1),
            max_unauthenticated,
            max_unauthenticated_per_source: self
                .max_unauthenticated_per_source
                .min(max_unauthenticated)
                .max(1),
            ..self.clone()
        }
    }
}

/// Why a connection was turned away at accept.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Refusal {
    Total,
    PerSource,
    Unauthenticated,
    UnauthenticatedPerSource,
}

impl Refusal {
    /// Metric label.
    #[must_use]
    pub fn label(self) -> &'static str {
        match self {
            Self::Total => "total",
            Self::PerSource => "per_source",
            Self::Unauthenticated => "unauthenticated",
            Self::UnauthenticatedPerSource => "unauthenticated_per_source",
        }
    }
}

/// Connection counts. Pure bookkeeping; the caller holds the lock.
#[derive(Debug, Default)]
pub struct ConnCounts {
    total: usize,
    unauthenticated: usize,
    per_source: HashMap<IpAddr, (usize, usize)>,
}

impl ConnCounts {
    /// Count a new (unauthenticated) connection from `ip`, or say which cap
    /// refuses it.
    pub fn admit(&mut self, limits: &ConnLimits, ip: IpAddr) -> Result<(), Refusal> {
        let (all, unauth) = self.per_source.get(&ip).copied().unwrap_or((0, 0));
        if self.total >= limits.max_total {
            return Err(Refusal::Total);
        }
        if all >= limits.max_per_source {
            return Err(Refusal::PerSource);
        }
        if unauth >= limits.max_unauthenticated_per_source {
            return Err(Refusal::UnauthenticatedPerSource);
        }
        if self.unauthenticated >= limits.max_unauthenticated {
            return Err(Refusal::Unauthenticated);
        }
        self.total += 1;
        self.unauthenticated += 1;
        self.per_source.insert(ip, (all + 1, unauth + 1));
        Ok(())
    }

    /// A connection from `ip` authenticated: it leaves the unauthenticated caps.
    pub fn authenticated(&mut self, ip: IpAddr) {
        self.unauthenticated = self.unauthenticated.saturating_sub(1);
        if let Some(e) = self.per_source.get_mut(&ip) {
            e.1 = e.1.saturating_sub(1);
        }
    }

    /// A connection from `ip` closed; `still_unauthenticated` if it never
    /// left the unauthenticated counts (by authenticating or eviction).
    pub fn release(&mut self, ip: IpAddr, still_unauthenticated: bool) {
        let was_authenticated = !still_unauthenticated;
        self.total = self.total.saturating_sub(1);
        if !was_authenticated {
            self.unauthenticated = self.unauthenticated.saturating_sub(1);
        }
        if let Some(e) = self.per_source.get_mut(&ip) {
            e.0 = e.0.saturating_sub(1);
            if !was_authenticated {
                e.1 = e.1.saturating_sub(1);
            }
            if e.0 == 0 {
                self.per_source.remove(&ip);
            }
        }
    }

    /// (all, unauthenticated) connections now.
    #[must_use]
    pub fn open(&self) -> (usize, usize) {
        (self.total, self.unauthenticated)
    }
}

/// The shared counts and limits.
#[derive(Debug)]
pub struct Tracker {
    limits: ConnLimits,
    counts: Mutex<ConnCounts>,
    /// Unauthenticated connections, oldest first (entries of connections
    /// that authenticated or closed are skipped when met).
    queue: Mutex<std::collections::VecDeque<std::sync::Weak<ConnHandle>>>,
    metrics: Arc<Metrics>,
}

impl Tracker {
    #[must_use]
    pub fn new(limits: ConnLimits, metrics: Arc<Metrics>) -> Arc<Self> {
        Arc::new(Self {
            limits,
            counts: Mutex::default(),
            queue: Mutex::default(),
            metrics,
        })
    }

    fn counts(&self) -> std::sync::MutexGuard<'_, ConnCounts> {
        self.counts.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn gauges(&self, counts: &ConnCounts) {
        let (all, unauth) = counts.open();
        self.metrics
            .connections
            .set(i64::try_from(all).unwrap_or(i64::MAX));
        self.metrics
            .unauthenticated_connections
            .set(i64::try_from(unauth).unwrap_or(i64::MAX));
    }

    fn admit(self: &Arc<Self>, ip: IpAddr) -> Result<Arc<ConnHandle>, Refusal> {
        let mut queue = self.queue.lock().unwrap_or_else(PoisonError::into_inner);
        // Handles are dropped only while `counts` is not locked: the last
        // reference's drop locks it.
        loop {
            {
                let mut counts = self.counts();
                match counts.admit(&self.limits, ip) {
                    Ok(()) => {
                        self.gauges(&counts);
                        break;
                    }
                    Err(Refusal::Unauthenticated) => {}
                    Err(other) => return Err(other),
                }
            }
            // Evict the oldest connection that is still unauthenticated.
            let victim = std::iter::from_fn(|| queue.pop_front())
                .filter_map(|w| w.upgrade())
                .find(|h| h.leave_unauthenticated(STATE_EVICTED))
                .ok_or(Refusal::Unauthenticated)?;
            self.counts().authenticated(victim.ip);
            victim.waker.wake();
            self.metrics.refused("evicted");
            drop(victim);
        }
        let handle = Arc::new(ConnHandle {
            ip,
            state: AtomicU8::new(STATE_UNAUTHENTICATED),
            waker: futures::task::AtomicWaker::new(),
            tracker: Arc::clone(self),
        });
        // Forget entries of connections that are gone, so the queue stays
        // about as long as the unauthenticated count.
        if queue.len() > 2 * self.limits.max_unauthenticated {
            queue.retain(|w| w.strong_count() > 0);
        }
        queue.push_back(Arc::downgrade(&handle));
        Ok(handle)
    }
}

const STATE_UNAUTHENTICATED: u8 = 0;
const STATE_AUTHENTICATED: u8 = 1;
const STATE_EVICTED: u8 = 2;

/// One connection's place in the counts; released when the last reference
/// (the stream or a request still in flight) goes.
#[derive(Debug)]
pub struct ConnHandle {
    ip: IpAddr,
    state: AtomicU8,
    /// Wakes the connection's reader when it is evicted.
    waker: futures::task::AtomicWaker,
    tracker: Arc<Tracker>,
}

impl ConnHandle {
    /// The connection carried an authenticated call: no deadline any more.
    pub fn authenticate(&self) {
        if self.leave_unauthenticated(STATE_AUTHENTICATED) {
            let mut counts = self.tracker.counts();
            counts.authenticated(self.ip);
            self.tracker.gauges(&counts);
        }
    }

    /// Move from unauthenticated to `to`; false if it already left.
    fn leave_unauthenticated(&self, to: u8) -> bool {
        self.state
            .compare_exchange(
                STATE_UNAUTHENTICATED,
                to,
                Ordering::AcqRel,
                Ordering::Acquire,
            )
            .is_ok()
    }

    fn state(&self) -> u8 {
        self.state.load(Ordering::Acquire)
    }
}

impl Drop for ConnHandle {
    fn drop(&mut self) {
        let mut counts = self.tracker.counts();
        counts.release(self.ip, self.state() == STATE_UNAUTHENTICATED);
        self.tracker.gauges(&counts);
    }
}

/// What a request learns about its connection (tonic puts it, wrapped in
/// `TlsConnectInfo`, into the request extensions).
#[derive(Clone, Debug)]
pub struct ConnInfo {
    pub remote: SocketAddr,
    pub handle: Arc<ConnHandle>,
}

/// A TCP stream that fails its reads once the unauthenticated deadline has
/// passed, which makes TLS or HTTP/2 close the connection.
#[derive(Debug)]
pub struct Guarded {
    inner: TcpStream,
    info: ConnInfo,
    deadline: Option<Pin<Box<tokio::time::Sleep>>>,
}

impl Guarded {
    fn expired(&mut self, cx: &mut Context<'_>) -> bool {
        match self.info.handle.state() {
            STATE_AUTHENTICATED => {
                self.deadline = None;
                return false;
            }
            STATE_EVICTED => return true,
            _ => {}
        }
        self.info.handle.waker.register(cx.waker());
        if self.info.handle.state() == STATE_EVICTED {
            return true;
        }
        self.deadline
            .as_mut()
            .is_some_and(|d| d.as_mut().poll(cx).is_ready())
    }
}

fn timed_out() -> io::Error {
    io::Error::new(
        io::ErrorKind::TimedOut,
        "the client did not authenticate in time (or was evicted by a newer one)",
    )
}

impl AsyncRead for Guarded {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        if self.expired(cx) {
            return Poll::Ready(Err(timed_out()));
        }
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl AsyncWrite for Guarded {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
}

impl Connected for Guarded {
    type ConnectInfo = ConnInfo;

    fn connect_info(&self) -> ConnInfo {
        self.info.clone()
    }
}

/// The connection a request came on, and the client certificate chain.
pub type RequestConn = tonic::transport::server::TlsConnectInfo<ConnInfo>;

/// Delay before the next `accept` after `failures` consecutive errors:
/// 10 ms doubling up to 1 s, so running out of file descriptors costs a
/// few wake-ups per second instead of a busy loop.
#[must_use]
pub fn accept_backoff(failures: u32) -> Duration {
    let ms = 10u64.saturating_mul(1u64 << failures.min(7));
    Duration::from_millis(ms.min(1000))
}

/// Errors that concern one connection, not the listener: retry at once.
fn per_connection(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::ConnectionAborted
            | io::ErrorKind::ConnectionReset
            | io::ErrorKind::ConnectionRefused
            | io::ErrorKind::Interrupted
    )
}

/// Accept, admit, and handshake connections until `stop` turns true or the
/// server stops taking them; handshaken streams go to `out`.
pub async fn accept_loop(
    listener: TcpListener,
    acceptor: TlsAcceptor,
    tracker: Arc<Tracker>,
    out: tokio::sync::mpsc::Sender<io::Result<TlsStream<Guarded>>>,
    mut stop: tokio::sync::watch::Receiver<bool>,
) {
    let mut failures = 0u32;
    loop {
        let accepted = tokio::select! {
            r = listener.accept() => r,
            _ = stop.wait_for(|s| *s) => return,
            () = out.closed() => return,
        };
        let (tcp, peer) = match accepted {
            Ok(a) => {
                failures = 0;
                a
            }
            Err(e) if per_connection(&e) => continue,
            Err(e) => {
                let wait = accept_backoff(failures);
                failures = failures.saturating_add(1);
                tracker.metrics.accept_errors.inc();
                if failures == 1 || failures.is_power_of_two() {
                    tracing::warn!(error = %e, retry_in = ?wait, failures, "accept failed (out of file descriptors?)");
                }
                tokio::select! {
                    () = tokio::time::sleep(wait) => {}
                    _ = stop.wait_for(|s| *s) => return,
                }
                continue;
            }
        };
        let ip = peer.ip().to_canonical();
        let handle = match tracker.admit(ip) {
            Ok(h) => h,
            Err(why) => {
                tracker.metrics.refused(why.label());
                tracing::debug!(peer = %peer, cap = why.label(), "connection refused: too many open");
                drop(tcp);
                continue;
            }
        };
        if let Err(e) = tcp.set_nodelay(true) {
            tracing::debug!(error = %e, "cannot set TCP_NODELAY");
        }
        let limits = &tracker.limits;
        let guarded = Guarded {
            inner: tcp,
            info: ConnInfo {
                remote: peer,
                handle,
            },
            deadline: Some(Box::pin(tokio::time::sleep(limits.unauthenticated_timeout))),
        };
        let acceptor = acceptor.clone();
        let out = out.clone();
        let handshake_timeout = limits.handshake_timeout;
        let metrics = Arc::clone(&tracker.metrics);
        tokio::spawn(async move {
            match tokio::time::timeout(handshake_timeout, acceptor.accept(guarded)).await {
                Ok(Ok(tls)) => {
                    let _ = out.send(Ok(tls)).await;
                }
                Ok(Err(e)) => {
                    metrics.refused("handshake_failed");
                    tracing::debug!(peer = %peer, error = %e, "TLS handshake failed");
                }
                Err(_) => {
                    metrics.refused("handshake_timeout");
                    tracing::debug!(peer = %peer, "TLS handshake timed out");
                }
            }
        });
    }
}

/// Raise the soft limit on open files to the hard limit; returns the soft
/// limit in force afterwards.
pub fn raise_fd_limit() -> u64 {
    use nix::sys::resource::{Resource, getrlimit, setrlimit};
    match getrlimit(Resource::RLIMIT_NOFILE) {
        Ok((soft, hard)) => {
            if soft < hard {
                match setrlimit(Resource::RLIMIT_NOFILE, hard, hard) {
                    Ok(()) => return hard,
                    Err(e) => {
                        tracing::warn!(soft, hard, error = %e, "cannot raise the open-file limit");
                    }
                }
            }
            soft
        }
        Err(e) => {
            tracing::warn!(error = %e, "cannot read the open-file limit");
            1024
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn caps_apply_per_source_and_in_total() {
        let limits = ConnLimits {
            max_total: 5,
            max_per_source: 3,
            max_unauthenticated: 4,
            max_unauthenticated_per_source: 2,
            ..ConnLimits::default()
        };
        let mut c = ConnCounts::default();
        let (a, b, d) = (ip("192.0.2.1"), ip("192.0.2.2"), ip("192.0.2.3"));
        assert_eq!(c.admit(&limits, a), Ok(()));
        assert_eq!(c.admit(&limits, a), Ok(()));
        assert_eq!(c.admit(&limits, a), Err(Refusal::UnauthenticatedPerSource));
        // Authenticating frees the unauthenticated slot but not the source's.
        c.authenticated(a);
        assert_eq!(c.admit(&limits, a), Ok(()));
        assert_eq!(c.admit(&limits, a), Err(Refusal::PerSource));
        assert_eq!(c.admit(&limits, b), Ok(()));
        assert_eq!(c.admit(&limits, b), Ok(()));
        // 4 unauthenticated now (a: 2, b: 2)... and 5 in total.
        assert_eq!(c.admit(&limits, d), Err(Refusal::Total));
        c.release(a, false);
        assert_eq!(c.admit(&limits, d), Err(Refusal::Unauthenticated));
        c.release(b, true);
        assert_eq!(c.admit(&limits, d), Ok(()));
        for who in [a, a, b, d] {
            c.release(who, true);
        }
        assert_eq!(c.open(), (0, 0));
        assert!(c.per_source.is_empty());
    }

    #[test]
    fn limits_fit_under_the_file_descriptor_limit() {
        let l = ConnLimits::default().fitted(1024);
        assert_eq!(l.max_total, 1024 - FD_RESERVE as usize);
        assert!(l.max_unauthenticated <= l.max_total / 2);
        let tiny = ConnLimits::default().fitted(100);
        assert_eq!(tiny.max_total, 36);
        assert_eq!(tiny.max_unauthenticated, 18);
        assert_eq!(tiny.max_unauthenticated_per_source, 16);
        let roomy = ConnLimits::default().fitted(1 << 20);
        assert_eq!(roomy, ConnLimits::default());
    }

    #[test]
    fn accept_backoff_grows_to_a_second() {
        assert_eq!(accept_backoff(0), Duration::from_millis(10));
        assert_eq!(accept_backoff(1), Duration::from_millis(20));
        assert_eq!(accept_backoff(6), Duration::from_millis(640));
        assert_eq!(accept_backoff(7), Duration::from_secs(1));
        assert_eq!(accept_backoff(1000), Duration::from_secs(1));
    }
}
