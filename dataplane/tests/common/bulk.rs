//! Bulk TCP between two namespaces with every byte checked.

use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::time::Duration;

use super::{Netns, listen_in};

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
