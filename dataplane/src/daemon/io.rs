//! The packet workers: readers of the underlay sockets and of the TAP
//! queues, the timer, and the sending of what the engine produced.
//!
//! One worker per core: the underlay port is a `SO_REUSEPORT` group of one
//! socket per worker (the kernel keeps each peer's datagrams on one socket,
//! so a flow is never reordered) and every TAP is multi-queue with one queue
//! per worker (the kernel keeps each flow on one queue). Workers share the
//! engine, whose locks are per peer; each brings its own buffers.

use std::io::IoSlice;
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::net::UdpSocket;
use tokio::runtime::Handle;
use tokio::task::JoinHandle;
use tun_rs::AsyncDevice;

use super::Daemon;
use super::workers::Workers;
use crate::engine::{Buffers, Output};
use crate::{Error, offload, udp};

const TICK: Duration = Duration::from_millis(250);
const SOCKET_BUFFER: usize = 4 << 20;
/// TAP reads (frames or TSO super-frames) per wakeup before the worker
/// yields to its other tasks.
const TAP_READS: usize = 64;
/// `recvmmsg` calls per wakeup before the worker yields.
const UDP_READS: usize = 8;
/// Send once this many outputs are ready (one full GSO send), then let the
/// worker's other direction run: a packet waits for at most a send's worth
/// of others, not for a whole burst of the busy direction.
const FLUSH_AT: usize = 64;
/// Datagrams per `recvmmsg`.
const RECV_BATCH: usize = 16;
/// TAP frames handed to one `write_tap`: as many as one coalesced UDP
/// super-frame holds (a TCP one holds fewer, 64 KiB of MTU-sized frames).
const TAP_RUN: usize = 64;

/// Buffers an I/O task keeps across wakeups.
#[derive(Default)]
pub(super) struct Scratch {
    /// The engine's scratch space and output buffer pool of this worker.
    pub(super) bufs: Buffers,
    /// Output buffers already sent, handed back to the pool.
    spent: Vec<Vec<u8>>,
    /// The super-frame being written to a TAP.
    gro: Vec<u8>,
}

impl Scratch {
    fn recycle(&mut self) {
        self.bufs.recycle(&mut self.spent);
    }
}

nix::ioctl_write_int!(tunsetoffload, b'T', 208);

/// Checksum offload, TSO and, where the kernel has it (6.2 and later), UDP
/// segmentation offload: a pod's TCP stream and the UDP runs the host veth's
/// GRO forwarding joins arrive as super-frames that `offload::segment` cuts.
fn set_offloads(dev: &AsyncDevice) -> Result<(), Error> {
    use std::os::fd::AsRawFd as _;
    const TUN_F_CSUM: u64 = 0x01;
    const TUN_F_TSO4: u64 = 0x02;
    const TUN_F_TSO6: u64 = 0x04;
    const TUN_F_USO4: u64 = 0x20;
    const TUN_F_USO6: u64 = 0x40;
    let tcp = TUN_F_CSUM | TUN_F_TSO4 | TUN_F_TSO6;
    let set = |flags: u64| {
        // SAFETY: the descriptor is a live TUN/TAP fd owned by `dev`, and
        // TUNSETOFFLOAD takes the flag word by value.
        #[allow(unsafe_code)]
        unsafe {
            tunsetoffload(dev.as_raw_fd(), flags)
        }
    };
    if set(tcp | TUN_F_USO4 | TUN_F_USO6).is_err() {
        // An older kernel refuses flags it does not know.
        set(tcp).map_err(std::io::Error::from)?;
    }
    Ok(())
}

/// TAP queues per worker. More queues than workers let unrelated flows wait
/// in separate rings: a worker takes turns between its queues, so a ping
/// does not queue behind a bulk flow's backlog (fair queueing by flow hash,
/// done by the kernel's queue selection).
const QUEUES_PER_WORKER: usize = 4;

/// Opens TAP `name` multi-queue with [`QUEUES_PER_WORKER`] queues per
/// worker, virtio-net headers and offloads; queue `i` is registered with
/// worker `i % workers`'s reactor.
pub(super) fn open_tap(
    name: &str,
    mtu: u32,
    workers: &Workers,
) -> Result<Vec<Arc<AsyncDevice>>, Error> {
    // The kernel allows at most 256 queues per TAP (MAX_TAP_QUEUES).
    let queues = (workers.len() * QUEUES_PER_WORKER).clamp(1, 256);
    let mtu = u16::try_from(mtu).unwrap_or(u16::MAX);
    let first = {
        let _rt = workers.handle(0).enter();
        tun_rs::DeviceBuilder::new()
            .name(name.to_string())
            .layer(tun_rs::Layer::L2)
            // Down until the caller has kept the node's stack off it.
            .enable(false)
            .mtu(mtu)
            .offload(true)
            .multi_queue(queues > 1)
            .build_async()?
    };
    set_offloads(&first)?;
    let mut v = Vec::with_capacity(queues);
    for i in 1..queues {
        let q = {
            let _rt = workers.handle(i % workers.len()).enter();
            first.try_clone()?
        };
        set_offloads(&q)?;
        v.push(Arc::new(q));
    }
    v.insert(0, Arc::new(first));
    Ok(v)
}

fn bind_udp(port: u16, reuse: bool, worker: &Handle) -> Result<UdpSocket, Error> {
    use socket2::{Domain, Protocol, Socket, Type};
    let s = Socket::new(Domain::IPV4, Type::DGRAM, Some(Protocol::UDP))?;
    // Bigger buffers absorb bursts; the kernel caps them at rmem_max.
    let _ = s.set_recv_buffer_size(SOCKET_BUFFER);
    let _ = s.set_send_buffer_size(SOCKET_BUFFER);
    if reuse {
        s.set_reuse_port(true)?;
    }
    s.set_nonblocking(true)?;
    s.bind(&SocketAddr::V4(SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, port)).into())?;
    let sock = {
        let _rt = worker.enter();
        UdpSocket::from_std(s.into())?
    };
    udp::enable_gro(&sock);
    Ok(sock)
}

/// One socket per worker, all on one UDP port (port 0: one the kernel
/// picks); socket `i` is registered with worker `i`'s reactor.
pub(super) fn bind_udp_group(
    port: u16,
    workers: &Workers,
) -> Result<Arc<Vec<Arc<UdpSocket>>>, Error> {
    let n = workers.len();
    let first = bind_udp(port, n > 1, workers.handle(0))?;
    let port = first.local_addr()?.port();
    let mut v = vec![Arc::new(first)];
    for i in 1..n {
        v.push(Arc::new(bind_udp(port, true, workers.handle(i))?));
    }
    Ok(Arc::new(v))
}

impl Daemon {
    /// Starts one reader per socket of the group, replacing earlier ones.
    pub(super) fn spawn_udp(self: &Arc<Self>, socks: &[Arc<UdpSocket>]) {
        let tasks: Vec<JoinHandle<()>> = socks
            .iter()
            .enumerate()
            .map(|(worker, sock)| {
                let d = Arc::clone(self);
                let sock = Arc::clone(sock);
                self.workers
                    .handle(worker)
                    .spawn(async move { d.udp_worker(worker, sock).await })
            })
            .collect();
        for old in std::mem::replace(&mut *super::lock(&self.udp_tasks), tasks) {
            old.abort();
        }
    }

    async fn udp_worker(self: Arc<Self>, worker: usize, sock: Arc<UdpSocket>) {
        let mut batch = udp::RecvBatch::new(RECV_BATCH);
        let mut out = Vec::new();
        let mut scratch = Scratch::default();
        loop {
            if let Err(e) = sock.readable().await {
                tracing::debug!(error = %e, "udp readiness");
                continue;
            }
            // Drain what is queued, a batch per system call; what was read
            // goes out whenever a send's worth is ready, before more is
            // processed, and the worker's other tasks get their turn then
            // (bounded delay, fairness between directions).
            scratch.recycle();
            let mut drained = false;
            // As in `tap_worker`: one clock read per wakeup and per await.
            let mut now = Instant::now();
            for _ in 0..UDP_READS {
                match udp::try_recv_batch(&sock, &mut batch) {
                    Ok(n) => {
                        for i in 0..n {
                            let (from, data, seg) = batch.get(i);
                            for r in udp::gro_segments(data.len(), seg) {
                                self.engine.handle_datagram(
                                    from,
                                    &data[r],
                                    now,
                                    &mut scratch.bufs,
                                    &mut out,
                                );
                            }
                            if out.len() >= FLUSH_AT {
                                self.perform(&mut out, &mut scratch, worker).await;
                                scratch.recycle();
                                tokio::task::yield_now().await;
                                now = Instant::now();
                            }
                        }
                        if n < RECV_BATCH {
                            drained = true;
                            break;
                        }
                    }
                    Err(err) if err.kind() == std::io::ErrorKind::WouldBlock => {
                        drained = true;
                        break;
                    }
                    Err(err) => {
                        tracing::debug!(error = %err, "udp receive");
                        break;
                    }
                }
            }
            self.perform(&mut out, &mut scratch, worker).await;
            if !drained {
                tokio::task::yield_now().await;
            }
        }
    }

    /// Starts one reader per queue of the TAP of network `vni`, on the
    /// worker the queue is registered with.
    pub(super) fn spawn_tap_readers(
        self: &Arc<Self>,
        vni: u32,
        queues: &[Arc<AsyncDevice>],
    ) -> Vec<JoinHandle<()>> {
        queues
            .iter()
            .enumerate()
            .map(|(i, q)| {
                let d = Arc::clone(self);
                let q = Arc::clone(q);
                let worker = i % self.workers.len();
                self.workers
                    .handle(worker)
                    .spawn(async move { d.tap_worker(worker, vni, q).await })
            })
            .collect()
    }

    async fn tap_worker(self: Arc<Self>, worker: usize, vni: u32, dev: Arc<AsyncDevice>) {
        // A TSO super-frame is up to 64 KiB of IP plus Ethernet and the
        // virtio-net header.
        let mut buf = vec![0u8; 65_536 + 1024];
        let mut seg_buf = Vec::with_capacity(65_536);
        let mut out = Vec::new();
        let mut scratch = Scratch::default();
        loop {
            if let Err(e) = dev.readable().await {
                tracing::warn!(error = %e, vni, "TAP wait failed; stopping its reader");
                return;
            }
            scratch.recycle();
            let mut drained = false;
            // One clock read per wakeup, not per frame: the engine uses it
            // for MAC learning and aging (seconds), and a wakeup's reads
            // take microseconds. It is read again after every await.
            let mut now = Instant::now();
            for _ in 0..TAP_READS {
                match read_frame(&dev, &mut buf) {
                    Ok(len) => {
                        let bufs = &mut scratch.bufs;
                        let r = offload::segment(&mut buf[..len], &mut seg_buf, |f| {
                            self.engine.handle_tap(vni, f, now, bufs, &mut out);
                        });
                        if let Err(err) = r {
                            self.engine.count_drop("bad_offload");
                            tracing::debug!(error = %err, vni, "TAP frame dropped");
                        }
                        if out.len() >= FLUSH_AT {
                            self.perform(&mut out, &mut scratch, worker).await;
                            scratch.recycle();
                            tokio::task::yield_now().await;
                            now = Instant::now();
                        }
                    }
                    Err(err) if err.kind() == std::io::ErrorKind::WouldBlock => {
                        drained = true;
                        break;
                    }
                    Err(err) => {
                        tracing::warn!(error = %err, vni, "TAP read failed; stopping its reader");
                        return;
                    }
                }
            }
            self.perform(&mut out, &mut scratch, worker).await;
            if !drained {
                tokio::task::yield_now().await;
            }
        }
    }

    pub(super) async fn timer(self: Arc<Self>) {
        let mut iv = tokio::time::interval(TICK);
        let mut out = Vec::new();
        let mut scratch = Scratch::default();
        loop {
            iv.tick().await;
            scratch.recycle();
            self.engine
                .tick(Instant::now(), &mut scratch.bufs, &mut out);
            self.perform(&mut out, &mut scratch, 0).await;
        }
    }

    /// Sends what the engine produced, through this worker's socket and TAP
    /// queues. The non-blocking attempt almost always succeeds; only a full
    /// socket or TAP queue costs an await.
    pub(super) async fn perform(
        &self,
        out: &mut Vec<Output>,
        scratch: &mut Scratch,
        worker: usize,
    ) {
        if out.is_empty() {
            return;
        }
        let socks = Arc::clone(
            &self
                .udp
                .read()
                .unwrap_or_else(std::sync::PoisonError::into_inner),
        );
        let Some(sock) = socks.get(worker % socks.len().max(1)) else {
            out.clear();
            return;
        };
        let mut i = 0;
        while i < out.len() {
            match &out[i] {
                Output::Udp { to, .. } => {
                    let to = *to;
                    let run = udp::gso_run(out[i..].iter().map_while(|o| match o {
                        Output::Udp { to, data } => Some((*to, data.len())),
                        Output::Tap { .. } => None,
                    }));
                    let mut sent = false;
                    if run > 1 {
                        let bufs = out[i..i + run].iter().filter_map(|o| match o {
                            Output::Udp { data, .. } => Some(data.as_slice()),
                            Output::Tap { .. } => None,
                        });
                        match udp::send_segmented(sock, to, bufs).await {
                            Ok(()) => sent = true,
                            // E.g. a path MTU below the segment size: send
                            // them one by one below.
                            Err(e) => tracing::debug!(error = %e, %to, "segmented udp send"),
                        }
                    }
                    if !sent {
                        for o in &out[i..i + run] {
                            if let Output::Udp { data, .. } = o
                                && let Err(e) = sock.send_to(data, to).await
                            {
                                tracing::debug!(error = %e, %to, "udp send");
                            }
                        }
                    }
                    i += run.max(1);
                }
                Output::Tap { vni, .. } => {
                    let vni = *vni;
                    // A run of this network's frames, on the stack: a
                    // coalesced write takes at most `TAP_RUN` of them anyway.
                    let mut frames: [&[u8]; TAP_RUN] = [&[]; TAP_RUN];
                    let mut n = 0;
                    for o in out[i..].iter().take(TAP_RUN) {
                        match o {
                            Output::Tap { vni: v, frame } if *v == vni => {
                                frames[n] = frame;
                                n += 1;
                            }
                            _ => break,
                        }
                    }
                    let frames = &frames[..n];
                    i += n.max(1);
                    self.write_tap(vni, frames, &mut scratch.gro).await;
                }
            }
        }
        scratch.spent.extend(out.drain(..).map(|o| match o {
            Output::Udp { data, .. } => data,
            Output::Tap { frame, .. } => frame,
        }));
    }
}

/// One frame (or super-frame) from a TAP queue, without blocking. A plain
/// `read(2)` while frames are queued: tun-rs's `try_recv` builds and polls a
/// readiness future on every call, a visible share of the per-frame CPU of
/// small frames. Only when the queue looks empty does `try_recv` run, which
/// clears tokio's readiness (or returns a frame that just arrived), so the
/// next `readable().await` sleeps until there is more.
fn read_frame(dev: &AsyncDevice, buf: &mut [u8]) -> std::io::Result<usize> {
    use std::os::fd::{AsRawFd as _, BorrowedFd};
    // SAFETY: the descriptor belongs to `dev`, which is borrowed for longer
    // than `fd` lives.
    #[allow(unsafe_code)]
    let fd = unsafe { BorrowedFd::borrow_raw(dev.as_raw_fd()) };
    match nix::unistd::read(fd, buf) {
        Ok(n) => Ok(n),
        Err(nix::errno::Errno::EAGAIN | nix::errno::Errno::EINTR) => dev.try_recv(buf),
        Err(e) => Err(e.into()),
    }
}

impl Daemon {
    /// The queue of TAP `vni` that a frame of flow hash `hash` goes to. Only
    /// that queue is taken from the table, not a copy of the whole list per
    /// send.
    fn tap_queue(&self, vni: u32, hash: u32) -> Option<Arc<AsyncDevice>> {
        let taps = self
            .taps
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let queues = &taps.get(&vni)?.queues;
        queues.get(hash as usize % queues.len().max(1)).cloned()
    }

    /// Writes frames of one network to its TAP, runs of one TCP or UDP flow
    /// as one super-frame: one write, one trip through bridge and pod stack.
    /// Each run goes to the queue of its flow hash, which is where the
    /// kernel then puts the flow's packets in the other direction.
    async fn write_tap(&self, vni: u32, frames: &[&[u8]], gro: &mut Vec<u8>) {
        let mut j = 0;
        while j < frames.len() {
            let Some(dev) = self.tap_queue(vni, offload::flow_hash(frames[j])) else {
                return;
            };
            let n = offload::coalesce(&frames[j..], gro).max(1);
            let iov = if n > 1 {
                [IoSlice::new(gro), IoSlice::new(&[])]
            } else {
                [
                    IoSlice::new(&offload::PLAIN_RX_HDR),
                    IoSlice::new(frames[j]),
                ]
            };
            j += n;
            let r = match dev.try_send_vectored(&iov) {
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                    dev.send_vectored(&iov).await
                }
                r => r,
            };
            if let Err(e) = r {
                tracing::debug!(error = %e, vni, "tap write");
            }
        }
    }
}
