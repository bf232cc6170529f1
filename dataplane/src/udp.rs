//! Underlay UDP with segmentation offloads. A run of equal-sized datagrams to
//! one peer (what a TCP super-frame from the TAP turns into) leaves in one
//! `sendmsg` with `UDP_SEGMENT`; with `UDP_GRO` on, the receiver gets such a
//! run back in one `recvmsg`. The wire still carries ordinary datagrams, so
//! peers without offloads (a stock WireGuard) see no difference.

use std::io::{self, IoSlice, IoSliceMut};
use std::net::{SocketAddr, SocketAddrV4};
use std::ops::Range;
use std::os::fd::AsRawFd as _;

use nix::libc;
use nix::sys::socket::{
    ControlMessage, ControlMessageOwned, MsgFlags, SockaddrIn, SockaddrStorage, recvmsg, sendmsg,
    setsockopt, sockopt,
};
use tokio::io::Interest;
use tokio::net::UdpSocket;

/// The kernel accepts at most this many segments per `UDP_SEGMENT` send.
pub const MAX_SEGMENTS: usize = 64;
/// Payload limit of one UDP/IPv4 send (65535 - 20 - 8), with a margin.
pub const MAX_GSO_BYTES: usize = 65_000;

/// How many of `items` (destination, length), from the first, can leave in
/// one segmented send: same destination, every one as long as the first
/// except a shorter last one, within the kernel's limits.
pub fn gso_run(items: impl IntoIterator<Item = (SocketAddr, usize)>) -> usize {
    let mut it = items.into_iter();
    let Some((to, size)) = it.next() else {
        return 0;
    };
    if size == 0 {
        return 1;
    }
    let (mut n, mut total) = (1, size);
    for (t, len) in it {
        if t != to || len > size || n == MAX_SEGMENTS || total + len > MAX_GSO_BYTES || len == 0 {
            break;
        }
        n += 1;
        total += len;
        if len < size {
            break;
        }
    }
    n
}

/// The datagrams inside a coalesced receive of `n` bytes whose segment size
/// the kernel reported as `seg` (0 or absent: one datagram).
pub fn gro_segments(n: usize, seg: usize) -> impl Iterator<Item = Range<usize>> {
    let step = if seg == 0 { n.max(1) } else { seg };
    (0..n).step_by(step).map(move |s| s..(s + step).min(n))
}

/// Asks the kernel to coalesce received runs; harmless where unsupported.
pub fn enable_gro(sock: &UdpSocket) {
    if let Err(e) = setsockopt(sock, sockopt::UdpGroSegment, &true) {
        tracing::debug!(error = %e, "UDP GRO unavailable");
    }
}

fn v4(to: SocketAddr) -> Option<SockaddrIn> {
    match to {
        SocketAddr::V4(a) => Some(SockaddrIn::from(a)),
        SocketAddr::V6(_) => None,
    }
}

/// Sends `bufs` to `to` as one datagram each, all as long as the first
/// (the last may be shorter), in one system call. At most [`MAX_SEGMENTS`];
/// the I/O vector is on the stack, so a send allocates nothing.
pub async fn send_segmented<'a>(
    sock: &UdpSocket,
    to: SocketAddr,
    bufs: impl IntoIterator<Item = &'a [u8]>,
) -> io::Result<()> {
    let Some(addr) = v4(to) else {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "IPv6 endpoint on an IPv4 socket",
        ));
    };
    let mut iov = [IoSlice::new(&[]); MAX_SEGMENTS];
    let mut n = 0;
    for b in bufs {
        let slot = iov.get_mut(n).ok_or_else(|| {
            io::Error::new(
                io::ErrorKind::InvalidInput,
                "more segments than one send takes",
            )
        })?;
        *slot = IoSlice::new(b);
        n += 1;
    }
    let iov = &iov[..n];
    let seg = u16::try_from(iov.first().map_or(0, |b| b.len()))
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "segment too large"))?;
    let fd = sock.as_raw_fd();
    sock.async_io(Interest::WRITABLE, || {
        let cmsg = [ControlMessage::UdpGsoSegments(&seg)];
        sendmsg(fd, iov, &cmsg, MsgFlags::empty(), Some(&addr))
            .map(|_| ())
            .map_err(io::Error::from)
    })
    .await
}

/// One non-blocking receive: bytes, sender and GRO segment size (0 if the
/// kernel did not coalesce).
pub fn try_recv(sock: &UdpSocket, buf: &mut [u8]) -> io::Result<(usize, SocketAddr, usize)> {
    let fd = sock.as_raw_fd();
    sock.try_io(Interest::READABLE, || {
        let mut cmsg = nix::cmsg_space!(i32);
        let mut iov = [IoSliceMut::new(buf)];
        let msg = recvmsg::<SockaddrStorage>(fd, &mut iov, Some(&mut cmsg), MsgFlags::empty())
            .map_err(io::Error::from)?;
        let from = msg
            .address
            .and_then(|a| a.as_sockaddr_in().copied())
            .map(|a| SocketAddr::V4(SocketAddrV4::new(a.ip(), a.port())))
            .ok_or_else(|| io::Error::other("datagram without an IPv4 source"))?;
        let mut seg = 0;
        if let Ok(cmsgs) = msg.cmsgs() {
            for c in cmsgs {
                if let ControlMessageOwned::UdpGroSegments(s) = c {
                    seg = usize::try_from(s).unwrap_or(0);
                }
            }
        }
        Ok((msg.bytes, from, seg))
    })
}

/// Room for one datagram, or for a GRO run of them.
const RECV_BUF: usize = 65_536;
/// Control-message room for the `UDP_GRO` segment size (an `int`).
const CMSG_ROOM: usize = 64;

/// Buffers for receiving up to `n` datagrams (or GRO runs) with one
/// `recvmmsg`: one system call for a burst of small packets, which GRO does
/// not coalesce. The message headers live here too, so a receive allocates
/// nothing.
pub struct RecvBatch {
    bufs: Vec<Vec<u8>>,
    names: Vec<libc::sockaddr_in>,
    /// u64 words keep the control buffers aligned for `cmsghdr`.
    cmsgs: Vec<[u64; CMSG_ROOM / 8]>,
    iovs: Vec<Iovec>,
    hdrs: Vec<MmsgHdr>,
    got: Vec<(SocketAddr, usize, usize)>,
}

/// A `libc::iovec`, which holds a raw pointer and so is not `Send`.
#[derive(Clone, Copy)]
#[repr(transparent)]
struct Iovec(libc::iovec);

/// A `libc::mmsghdr`, which holds raw pointers and so is not `Send`.
#[derive(Clone, Copy)]
#[repr(transparent)]
struct MmsgHdr(libc::mmsghdr);

// SAFETY: the pointers in these headers are only ever set by `recv_batch`,
// right before the system call, to buffers of the `RecvBatch` that holds
// them, and are not read after it; moving them to another thread moves
// nothing they point at to another owner.
#[allow(unsafe_code)]
unsafe impl Send for Iovec {}
// SAFETY: as for `Iovec`.
#[allow(unsafe_code)]
unsafe impl Send for MmsgHdr {}

impl std::fmt::Debug for RecvBatch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RecvBatch")
            .field("slots", &self.bufs.len())
            .field("filled", &self.got.len())
            .finish()
    }
}

impl RecvBatch {
    pub fn new(n: usize) -> Self {
        let n = n.max(1);
        let iov = libc::iovec {
            iov_base: std::ptr::null_mut(),
            iov_len: 0,
        };
        Self {
            bufs: (0..n).map(|_| vec![0u8; RECV_BUF]).collect(),
            names: vec![zero_sockaddr(); n],
            cmsgs: vec![[0u64; CMSG_ROOM / 8]; n],
            iovs: vec![Iovec(iov); n],
            hdrs: vec![MmsgHdr(zero_mmsghdr()); n],
            got: Vec::with_capacity(n),
        }
    }

    /// Datagram `i` of the last receive: sender, bytes, and the GRO segment
    /// size (0: one datagram).
    pub fn get(&self, i: usize) -> (SocketAddr, &[u8], usize) {
        let (from, len, seg) = self.got[i];
        (from, &self.bufs[i][..len], seg)
    }
}

fn zero_sockaddr() -> libc::sockaddr_in {
    libc::sockaddr_in {
        sin_family: 0,
        sin_port: 0,
        sin_addr: libc::in_addr { s_addr: 0 },
        sin_zero: [0; 8],
    }
}

#[allow(unsafe_code)]
fn zero_mmsghdr() -> libc::mmsghdr {
    // SAFETY: mmsghdr is plain data (integers and pointers); all-zero is a
    // valid empty header.
    unsafe { std::mem::zeroed() }
}

/// Receives what is queued, up to the batch size, without blocking; returns
/// how many datagrams (or GRO runs) arrived. `WouldBlock` when none.
pub fn try_recv_batch(sock: &UdpSocket, b: &mut RecvBatch) -> io::Result<usize> {
    let fd = sock.as_raw_fd();
    sock.try_io(Interest::READABLE, || recv_batch(fd, b))
}

#[allow(unsafe_code)]
fn recv_batch(fd: std::os::fd::RawFd, b: &mut RecvBatch) -> io::Result<usize> {
    let n = b.bufs.len();
    // The kernel rewrites lengths and flags, so every header is set afresh;
    // the pointers are taken now, from buffers nothing else borrows.
    for ((((buf, iov), name), cmsg), h) in b
        .bufs
        .iter_mut()
        .zip(&mut b.iovs)
        .zip(&mut b.names)
        .zip(&mut b.cmsgs)
        .zip(&mut b.hdrs)
    {
        iov.0 = libc::iovec {
            iov_base: buf.as_mut_ptr().cast(),
            iov_len: buf.len(),
        };
        let m = &mut h.0.msg_hdr;
        m.msg_name = std::ptr::from_mut(name).cast();
        m.msg_namelen = std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t;
        m.msg_iov = std::ptr::from_mut(&mut iov.0);
        m.msg_iovlen = 1;
        m.msg_control = cmsg.as_mut_ptr().cast();
        m.msg_controllen = CMSG_ROOM as _;
        m.msg_flags = 0;
        h.0.msg_len = 0;
    }
    // SAFETY: every header points into buffers owned by `b`, which outlive
    // the call; the lengths given are those buffers' sizes. `MmsgHdr` is
    // `repr(transparent)`, so its array is an array of `mmsghdr`.
    let r = unsafe {
        libc::recvmmsg(
            fd,
            b.hdrs.as_mut_ptr().cast::<libc::mmsghdr>(),
            n as libc::c_uint,
            libc::MSG_DONTWAIT,
            std::ptr::null_mut(),
        )
    };
    if r < 0 {
        return Err(io::Error::last_os_error());
    }
    let got = usize::try_from(r).unwrap_or(0);
    b.got.clear();
    for (h, name) in b.hdrs[..got].iter().zip(&b.names) {
        let h = &h.0;
        let from = SocketAddr::V4(SocketAddrV4::new(
            u32::from_be(name.sin_addr.s_addr).into(),
            u16::from_be(name.sin_port),
        ));
        let mut seg = 0;
        // SAFETY: the control buffer and its length are the kernel's answer
        // for this header; CMSG_* walk within msg_controllen.
        unsafe {
            let mut c = libc::CMSG_FIRSTHDR(&h.msg_hdr);
            while !c.is_null() {
                if (*c).cmsg_level == libc::SOL_UDP && (*c).cmsg_type == libc::UDP_GRO {
                    let v = std::ptr::read_unaligned(libc::CMSG_DATA(c).cast::<libc::c_int>());
                    seg = usize::try_from(v).unwrap_or(0);
                }
                c = libc::CMSG_NXTHDR(&h.msg_hdr, c);
            }
        }
        b.got.push((from, h.msg_len as usize, seg));
    }
    Ok(got)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn a(port: u16) -> SocketAddr {
        SocketAddr::from(([10, 0, 0, 1], port))
    }

    #[test]
    fn runs_of_equal_datagrams_with_a_shorter_tail() {
        let t = a(1);
        assert_eq!(gso_run([]), 0);
        assert_eq!(gso_run([(t, 1400)]), 1);
        assert_eq!(gso_run([(t, 1400), (t, 1400), (t, 1400)]), 3);
        // A shorter one ends the run and belongs to it.
        assert_eq!(gso_run([(t, 1400), (t, 1400), (t, 7), (t, 1400)]), 3);
        // A longer one does not.
        assert_eq!(gso_run([(t, 1400), (t, 1401)]), 1);
        // Another destination ends it.
        assert_eq!(gso_run([(t, 1400), (t, 1400), (a(2), 1400)]), 2);
        assert_eq!(gso_run([(t, 0), (t, 0)]), 1);
    }

    #[test]
    fn runs_respect_kernel_limits() {
        let t = a(1);
        assert_eq!(gso_run(std::iter::repeat_n((t, 100), 200)), MAX_SEGMENTS);
        assert_eq!(
            gso_run(std::iter::repeat_n((t, 1472), 64)),
            MAX_GSO_BYTES / 1472
        );
    }

    #[test]
    fn coalesced_receives_split_at_the_segment_size() {
        let v: Vec<_> = gro_segments(3000, 1400).collect();
        assert_eq!(v, vec![0..1400, 1400..2800, 2800..3000]);
        let one = |n, seg| {
            gro_segments(n, seg)
                .map(|r| (r.start, r.end))
                .collect::<Vec<_>>()
        };
        assert_eq!(one(1400, 1400), [(0, 1400)]);
        assert_eq!(one(100, 0), [(0, 100)]);
        assert_eq!(gro_segments(0, 0).count(), 0);
    }

    #[tokio::test]
    async fn segmented_send_arrives_as_separate_datagrams() {
        let rx = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let tx = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let to = rx.local_addr().unwrap();
        let bufs: Vec<Vec<u8>> = (0..5u8)
            .map(|i| vec![i; if i == 4 { 33 } else { 1200 }])
            .collect();
        let refs: Vec<&[u8]> = bufs.iter().map(Vec::as_slice).collect();
        match send_segmented(&tx, to, refs.iter().copied()).await {
            Ok(()) => {}
            Err(e) => {
                eprintln!("skipping: UDP GSO not available here: {e}");
                return;
            }
        }
        let mut got = Vec::new();
        let mut buf = vec![0u8; 65_536];
        while got.len() < bufs.len() {
            let (n, _) = rx.recv_from(&mut buf).await.unwrap();
            got.push(buf[..n].to_vec());
        }
        assert_eq!(got, bufs);
    }

    #[tokio::test]
    async fn a_segmented_send_beyond_the_kernel_limit_is_refused() {
        let rx = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let tx = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let one = [0u8; 10];
        let too_many = std::iter::repeat_n(&one[..], MAX_SEGMENTS + 1);
        let err = send_segmented(&tx, rx.local_addr().unwrap(), too_many)
            .await
            .unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::InvalidInput);
    }

    #[tokio::test]
    async fn gro_receive_reports_the_sender() {
        let rx = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        enable_gro(&rx);
        let tx = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        tx.send_to(b"hello", rx.local_addr().unwrap())
            .await
            .unwrap();
        rx.readable().await.unwrap();
        let mut buf = vec![0u8; 65_536];
        let (n, from, seg) = loop {
            match try_recv(&rx, &mut buf) {
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => rx.readable().await.unwrap(),
                r => break r.unwrap(),
            }
        };
        assert_eq!(&buf[..n], b"hello");
        assert_eq!(from, tx.local_addr().unwrap());
        assert_eq!(
            gro_segments(n, seg)
                .map(|r| (r.start, r.end))
                .collect::<Vec<_>>(),
            [(0, 5)]
        );
    }

    #[tokio::test]
    async fn one_batch_receive_returns_several_datagrams_with_their_senders() {
        let rx = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let to = rx.local_addr().unwrap();
        let (t1, t2) = (
            UdpSocket::bind("127.0.0.1:0").await.unwrap(),
            UdpSocket::bind("127.0.0.1:0").await.unwrap(),
        );
        t1.send_to(b"one", to).await.unwrap();
        t2.send_to(b"two!", to).await.unwrap();
        t1.send_to(&[7u8; 1400], to).await.unwrap();
        let mut batch = RecvBatch::new(2);
        let mut got = Vec::new();
        while got.len() < 3 {
            rx.readable().await.unwrap();
            match try_recv_batch(&rx, &mut batch) {
                Ok(n) => {
                    assert!(n <= 2, "never more than the batch holds");
                    for i in 0..n {
                        let (from, data, seg) = batch.get(i);
                        assert_eq!(seg, 0);
                        got.push((from, data.to_vec()));
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                Err(e) => panic!("{e}"),
            }
        }
        let (a1, a2) = (t1.local_addr().unwrap(), t2.local_addr().unwrap());
        assert_eq!(
            got,
            vec![
                (a1, b"one".to_vec()),
                (a2, b"two!".to_vec()),
                (a1, vec![7u8; 1400])
            ]
        );
        assert!(matches!(
            try_recv_batch(&rx, &mut batch),
            Err(e) if e.kind() == io::ErrorKind::WouldBlock
        ));
    }
}
