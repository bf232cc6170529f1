//! Hand-made Ethernet frames sent from inside a namespace, and sockets
//! opened in one: what a hostile pod can put on its interface, and what a
//! node would receive.

use std::net::{Ipv4Addr, UdpSocket};

use super::Netns;

/// The link-local group address of IEEE slow protocols: a bridge hands such
/// frames to the receiving port's own stack instead of forwarding them.
pub const SLOW_PROTOCOLS: [u8; 6] = [0x01, 0x80, 0xc2, 0x00, 0x00, 0x02];
pub const BROADCAST: [u8; 6] = [0xff; 6];

pub fn parse_mac(s: &str) -> [u8; 6] {
    let v: Vec<u8> = s
        .trim()
        .split(':')
        .map(|h| u8::from_str_radix(h, 16).expect("hex"))
        .collect();
    v.try_into().expect("six bytes")
}

/// The MAC address of `ifname` in `ns`.
pub fn mac_of(ns: &Netns, ifname: &str) -> [u8; 6] {
    parse_mac(&ns.exec(&["cat", &format!("/sys/class/net/{ifname}/address")]))
}

fn ethernet(dst: [u8; 6], src: [u8; 6], ethertype: u16, payload: &[u8]) -> Vec<u8> {
    let mut f = Vec::with_capacity(14 + payload.len());
    f.extend_from_slice(&dst);
    f.extend_from_slice(&src);
    f.extend_from_slice(&ethertype.to_be_bytes());
    f.extend_from_slice(payload);
    f
}

/// An ARP request "who has `target`, tell `sender_ip`".
pub fn arp_request(dst: [u8; 6], src: [u8; 6], sender_ip: Ipv4Addr, target: Ipv4Addr) -> Vec<u8> {
    let mut a = vec![0, 1, 8, 0, 6, 4, 0, 1];
    a.extend_from_slice(&src);
    a.extend_from_slice(&sender_ip.octets());
    a.extend_from_slice(&[0; 6]);
    a.extend_from_slice(&target.octets());
    ethernet(dst, src, 0x0806, &a)
}

fn checksum(data: &[u8]) -> u16 {
    let mut sum: u32 = data
        .chunks(2)
        .map(|c| u32::from(u16::from_be_bytes([c[0], *c.get(1).unwrap_or(&0)])))
        .sum();
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

/// A UDP datagram (no UDP checksum, which IPv4 allows) in an IPv4 packet.
pub fn udp4(
    dst: [u8; 6],
    src: [u8; 6],
    from: Ipv4Addr,
    to: Ipv4Addr,
    port: u16,
    payload: &[u8],
) -> Vec<u8> {
    let udp_len = 8 + payload.len();
    let mut ip = vec![0x45, 0, 0, 0, 0, 1, 0x40, 0, 64, 17, 0, 0];
    ip[2..4].copy_from_slice(&((20 + udp_len) as u16).to_be_bytes());
    ip.extend_from_slice(&from.octets());
    ip.extend_from_slice(&to.octets());
    let c = checksum(&ip);
    ip[10..12].copy_from_slice(&c.to_be_bytes());
    ip.extend_from_slice(&40000u16.to_be_bytes());
    ip.extend_from_slice(&port.to_be_bytes());
    ip.extend_from_slice(&(udp_len as u16).to_be_bytes());
    ip.extend_from_slice(&[0, 0]);
    ip.extend_from_slice(payload);
    ethernet(dst, src, 0x0800, &ip)
}

/// Runs `f` on a thread inside `ns` (sockets it opens stay in `ns`).
pub fn in_netns<T: Send + 'static>(ns: &Netns, f: impl FnOnce() -> T + Send + 'static) -> T {
    let path = format!("/run/netns/{}", ns.name);
    std::thread::spawn(move || {
        let file = std::fs::File::open(&path).expect("open netns");
        nix::sched::setns(&file, nix::sched::CloneFlags::CLONE_NEWNET).expect("setns");
        f()
    })
    .join()
    .expect("netns thread")
}

/// Sends raw frames out of `ifname` in `ns`.
pub fn send_frames(ns: &Netns, ifname: &str, frames: Vec<Vec<u8>>) {
    let ifname = ifname.to_string();
    in_netns(ns, move || {
        let index = nix::net::if_::if_nametoindex(ifname.as_str()).expect("interface index");
        #[allow(unsafe_code)]
        // SAFETY: plain socket(2) call; the descriptor is closed below.
        let fd = unsafe { nix::libc::socket(nix::libc::AF_PACKET, nix::libc::SOCK_RAW, 0) };
        assert!(
            fd >= 0,
            "AF_PACKET socket: {}",
            std::io::Error::last_os_error()
        );
        for f in &frames {
            #[allow(unsafe_code)]
            // SAFETY: a zeroed sockaddr_ll is valid; the frame buffer and
            // the address outlive the call, whose lengths match them.
            let sent = unsafe {
                let mut addr: nix::libc::sockaddr_ll = std::mem::zeroed();
                addr.sll_family = nix::libc::AF_PACKET as u16;
                addr.sll_ifindex = index as i32;
                addr.sll_halen = 6;
                addr.sll_addr[..6].copy_from_slice(&f[..6]);
                nix::libc::sendto(
                    fd,
                    f.as_ptr().cast(),
                    f.len(),
                    0,
                    std::ptr::from_ref(&addr).cast(),
                    std::mem::size_of::<nix::libc::sockaddr_ll>() as u32,
                )
            };
            assert!(sent >= 0, "send: {}", std::io::Error::last_os_error());
        }
        #[allow(unsafe_code)]
        // SAFETY: `fd` is the socket opened above, closed once.
        unsafe {
            nix::libc::close(fd);
        }
    });
}

/// A UDP socket bound to 0.0.0.0:0 in `ns`, non-blocking.
pub fn udp_in(ns: &Netns) -> UdpSocket {
    in_netns(ns, || {
        let s = UdpSocket::bind("0.0.0.0:0").expect("bind");
        s.set_nonblocking(true).expect("nonblocking");
        s
    })
}

/// How many datagrams are waiting on `s`.
pub fn received(s: &UdpSocket) -> usize {
    let mut buf = [0u8; 2048];
    let mut n = 0;
    while s.recv_from(&mut buf).is_ok() {
        n += 1;
    }
    n
}
