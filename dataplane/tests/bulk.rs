//! Root integration test of the offload paths: bulk TCP between pods on two
//! nodes goes through TSO super-frames read from the TAP, segmentation, UDP
//! GSO/GRO and coalesced TAP writes. Every byte is checked, both ways, over
//! IPv4 and IPv6, and MTU-sized pings with DF must pass.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::time::Duration;

use common::{Netns, Node, Underlay, can_run, listen_in, ping_ok};
use l2mesh_proto::node::PeerGroup;

const BLUE: u32 = 100;
const LEN: usize = 24 << 20;

fn pattern(i: usize) -> u8 {
    // Not periodic at any power of two, so shifted or repeated segments show.
    (i % 251) as u8 ^ (i / 65_521) as u8
}

/// Connects from inside `ns` (the socket stays in that namespace).
fn connect_in(ns: &Netns, to: SocketAddr) -> TcpStream {
    let path = format!("/run/netns/{}", ns.name);
    std::thread::spawn(move || {
        let f = std::fs::File::open(&path).expect("open netns");
        nix::sched::setns(&f, nix::sched::CloneFlags::CLONE_NEWNET).expect("setns");
        TcpStream::connect_timeout(&to, Duration::from_secs(10)).expect("connect in netns")
    })
    .join()
    .expect("connect thread")
}

fn send_all(mut s: TcpStream) {
    let mut buf = vec![0u8; 256 * 1024];
    let mut off = 0;
    while off < LEN {
        let n = buf.len().min(LEN - off);
        for (i, b) in buf[..n].iter_mut().enumerate() {
            *b = pattern(off + i);
        }
        s.write_all(&buf[..n]).unwrap();
        off += n;
    }
    s.shutdown(Shutdown::Write).unwrap();
}

/// Reads until EOF and returns the first offset that differs, if any.
fn check_all(mut s: TcpStream) -> Result<(), String> {
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
    if off == LEN {
        Ok(())
    } else {
        Err(format!("got {off} bytes of {LEN}"))
    }
}

/// Streams LEN bytes from `from` to `to` and back the other way at once.
fn both_ways(from: &Netns, to: &Netns, addr: &str) {
    let listener: TcpListener = listen_in(to, addr);
    let dst = listener.local_addr().unwrap();
    let server = std::thread::spawn(move || {
        let (s, _) = listener.accept().unwrap();
        let w = s.try_clone().unwrap();
        let sender = std::thread::spawn(move || send_all(w));
        let r = check_all(s);
        sender.join().unwrap();
        r
    });
    let c = connect_in(from, dst);
    let w = c.try_clone().unwrap();
    let sender = std::thread::spawn(move || send_all(w));
    let back = check_all(c);
    sender.join().unwrap();
    let forth = server.join().unwrap();
    assert_eq!(forth, Ok(()), "{addr}: client to server");
    assert_eq!(back, Ok(()), "{addr}: server to client");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bulk_tcp_both_ways_over_offloads_is_intact() {
    if !can_run(&["ping"]) {
        return;
    }
    let mut wire = Underlay::new();
    let a = Node::start("a", &mut wire, "100.64.0.1").await;
    let b = Node::start("b", &mut wire, "100.64.0.2").await;
    let nets = &[("blue", BLUE)];
    a.apply(nets, vec![b.as_peer(PeerGroup::Local, &[BLUE])])
        .await;
    b.apply(nets, vec![a.as_peer(PeerGroup::Local, &[BLUE])])
        .await;
    let a1 = a.pod("a1", "blue", &["10.1.0.1/24", "fd00:1::1/64"]).await;
    let b1 = b
        .pod("b1", "blue", &["10.1.0.11/24", "fd00:1::11/64"])
        .await;
    assert!(ping_ok(&a1, "10.1.0.11", Duration::from_secs(15)));
    assert!(ping_ok(&a1, "fd00:1::11", Duration::from_secs(10)));

    // A frame of exactly the network MTU (1390) with DF set crosses.
    let o = a1.try_exec(&[
        "ping",
        "-c",
        "2",
        "-W",
        "2",
        "-M",
        "do",
        "-s",
        "1362",
        "10.1.0.11",
    ]);
    assert!(o.status.success(), "MTU-sized ping: {o:?}");
    let o = a1.try_exec(&[
        "ping",
        "-c",
        "2",
        "-W",
        "2",
        "-M",
        "do",
        "-s",
        "1342",
        "fd00:1::11",
    ]);
    assert!(o.status.success(), "MTU-sized IPv6 ping: {o:?}");

    let (a1, b1) = (std::sync::Arc::new(a1), std::sync::Arc::new(b1));
    let (x, y) = (a1.clone(), b1.clone());
    tokio::task::spawn_blocking(move || both_ways(&x, &y, "10.1.0.11:0"))
        .await
        .unwrap();
    let (x, y) = (a1.clone(), b1.clone());
    tokio::task::spawn_blocking(move || both_ways(&x, &y, "[fd00:1::11]:0"))
        .await
        .unwrap();

    for n in [&a, &b] {
        let s = n.status().await;
        let bad: u64 = s
            .drops
            .iter()
            .filter(|d| d.reason == "bad_offload")
            .map(|d| d.count)
            .sum();
        assert_eq!(bad, 0, "frames the TAP offload path could not handle");
    }
}
