//! Bulk TCP between two namespaces with every byte checked, and the
//! two-node setup the bulk tests share.

use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::Arc;
use std::time::Duration;

use l2mesh_proto::node::PeerGroup;

use super::{Netns, Node, Underlay, can_run, listen_in, ping_ok};

/// VNI of the network "blue" that [`TwoNodePods`] sets up.
pub const BLUE: u32 = 100;

/// Which addresses the pods of [`TwoNodePods`] get.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum PodAddrs {
    /// 10.1.0.1/24 on `a1`, 10.1.0.11/24 on `b1`.
    Ipv4,
    /// Those and fd00:1::1/64 on `a1`, fd00:1::11/64 on `b1`.
    DualStack,
}

/// Two daemons (nodes `a` and `b`, tunnel IPs 100.64.0.1 and 100.64.0.2) on
/// one underlay, peers of each other in the local group on network "blue",
/// with one pod on each (`a1` and `b1`) that can already ping the other.
/// Everything is torn down on drop (pods, then daemons and their
/// namespaces, then the underlay); the pods are `Arc`s so blocking tasks can
/// use them.
pub struct TwoNodePods {
    pub a1: Arc<Netns>,
    pub b1: Arc<Netns>,
    pub a: Node,
    pub b: Node,
    pub wire: Underlay,
}

impl TwoNodePods {
    /// Sets it all up, each daemon run with `daemon_args` as extra `run`
    /// arguments; `None` when this host cannot run the test (`can_run` has
    /// said why, or panicked under CI).
    pub async fn start(daemon_args: &[&str], addrs: PodAddrs) -> Option<Self> {
        if !can_run(&["ping"]) {
            return None;
        }
        let args =
            |_: &Node| -> Vec<String> { daemon_args.iter().map(|s| (*s).to_string()).collect() };
        let mut wire = Underlay::new();
        let a = Node::start_with("a", &mut wire, "100.64.0.1", args).await;
        let b = Node::start_with("b", &mut wire, "100.64.0.2", args).await;
        let nets = &[("blue", BLUE)];
        a.apply(nets, vec![b.as_peer(PeerGroup::Local, &[BLUE])])
            .await;
        b.apply(nets, vec![a.as_peer(PeerGroup::Local, &[BLUE])])
            .await;
        let dual = addrs == PodAddrs::DualStack;
        let (a1_addrs, b1_addrs): (&[&str], &[&str]) = if dual {
            (
                &["10.1.0.1/24", "fd00:1::1/64"],
                &["10.1.0.11/24", "fd00:1::11/64"],
            )
        } else {
            (&["10.1.0.1/24"], &["10.1.0.11/24"])
        };
        let a1 = a.pod("a1", "blue", a1_addrs).await;
        let b1 = b.pod("b1", "blue", b1_addrs).await;
        assert!(ping_ok(&a1, "10.1.0.11", Duration::from_secs(15)));
        if dual {
            assert!(ping_ok(&a1, "fd00:1::11", Duration::from_secs(10)));
        }
        Some(Self {
            a1: Arc::new(a1),
            b1: Arc::new(b1),
            a,
            b,
            wire,
        })
    }

    /// Fails the test if either node counted a frame its TAP offload path
    /// could not handle.
    pub async fn assert_no_bad_offload(&self) {
        for n in [&self.a, &self.b] {
            assert_no_bad_offload(n).await;
        }
    }
}

/// Fails the test if `node` counted a frame its TAP offload path could not
/// handle (drop reason `bad_offload`).
pub async fn assert_no_bad_offload(node: &Node) {
    let s = node.status().await;
    let bad: u64 = s
        .drops
        .iter()
        .filter(|d| d.reason == "bad_offload")
        .map(|d| d.count)
        .sum();
    assert_eq!(
        bad, 0,
        "frames the TAP offload path of {} could not handle",
        node.ns.name
    );
}

pub fn pattern(i: usize) -> u8 {
    // Not periodic at any power of two, so shifted or repeated segments show.
    (i % 251) as u8 ^ (i / 65_521) as u8
}

/// Connects from inside `ns` (the socket stays in that namespace).
pub fn connect_in(ns: &Netns, to: SocketAddr) -> TcpStream {
    let path = format!("/run/netns/{}", ns.name);
    std::thread::spawn(move || {
        let f = std::fs::File::open(&path).expect("open netns");
        nix::sched::setns(&f, nix::sched::CloneFlags::CLONE_NEWNET).expect("setns");
        TcpStream::connect_timeout(&to, Duration::from_secs(10)).expect("connect in netns")
    })
    .join()
    .expect("connect thread")
}

pub fn send_all(mut s: TcpStream, len: usize) {
    // A path that loses or corrupts segments must fail the test, not hang it.
    s.set_write_timeout(Some(Duration::from_secs(30))).unwrap();
    let mut buf = vec![0u8; 256 * 1024];
    let mut off = 0;
    while off < len {
        let n = buf.len().min(len - off);
        for (i, b) in buf[..n].iter_mut().enumerate() {
            *b = pattern(off + i);
        }
        s.write_all(&buf[..n]).unwrap();
        off += n;
    }
    s.shutdown(Shutdown::Write).unwrap();
}

/// Reads until EOF and returns the first offset that differs, if any.
pub fn check_all(mut s: TcpStream, len: usize) -> Result<(), String> {
    s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    let mut buf = vec![0u8; 256 * 1024];
    let mut off = 0;
    loop {
        let n = s
            .read(&mut buf)
            .map_err(|e| format!("read at {off}: {e}"))?;
        if n == 0 {
            break;
        }
        if let Some(i) = buf[..n]
            .iter()
            .enumerate()
            .position(|(i, b)| *b != pattern(off + i))
        {
            return Err(format!("byte {} differs", off + i));
        }
        off += n;
    }
    if off == len {
        Ok(())
    } else {
        Err(format!("got {off} bytes of {len}"))
    }
}

/// Streams `len` bytes from `from` to `to` and back the other way at once,
/// checking every byte.
pub fn both_ways(from: &Netns, to: &Netns, addr: &str, len: usize) {
    let listener: TcpListener = listen_in(to, addr);
    let dst = listener.local_addr().unwrap();
    let server = std::thread::spawn(move || {
        let (s, _) = listener.accept().unwrap();
        let w = s.try_clone().unwrap();
        let sender = std::thread::spawn(move || send_all(w, len));
        let r = check_all(s, len);
        sender.join().unwrap();
        r
    });
    let c = connect_in(from, dst);
    let w = c.try_clone().unwrap();
    let sender = std::thread::spawn(move || send_all(w, len));
    let back = check_all(c, len);
    sender.join().unwrap();
    let forth = server.join().unwrap();
    assert_eq!(forth, Ok(()), "{addr}: client to server");
    assert_eq!(back, Ok(()), "{addr}: server to client");
}
