//! After ADD the pod announces its addresses from inside its namespace: a
//! gratuitous ARP (an ARP announcement, RFC 5227) per IPv4 address and an
//! unsolicited neighbour advertisement with the override flag (RFC 4861
//! 7.2.6) per IPv6 address. Neighbours that still hold the address with the
//! MAC of an earlier pod (one re-created with the same static address)
//! update their entry at once instead of after their neighbour cache times
//! out.

use std::fs::File;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::time::Duration;

use nix::sched::CloneFlags;
use nix::sys::socket::{
    AddressFamily, LinkAddr, MsgFlags, SockFlag, SockType, SockaddrLike, sendto, socket,
};

const ETH_P_ARP: u16 = 0x0806;
const ETH_P_IPV6: u16 = 0x86dd;
const BROADCAST: [u8; 6] = [0xff; 6];
/// ff02::1, all nodes, and its multicast MAC.
const ALL_NODES: Ipv6Addr = Ipv6Addr::new(0xff02, 0, 0, 0, 0, 0, 0, 1);
const ALL_NODES_MAC: [u8; 6] = [0x33, 0x33, 0, 0, 0, 1];
/// Each announcement goes out this many times, this far apart: one lost
/// frame (a peer tunnel still handshaking) does not lose the update.
const REPEAT: usize = 3;
const GAP: Duration = Duration::from_millis(50);

fn ethernet(dst: [u8; 6], src: [u8; 6], ethertype: u16, payload: &[u8]) -> Vec<u8> {
    let mut f = Vec::with_capacity(14 + payload.len());
    f.extend_from_slice(&dst);
    f.extend_from_slice(&src);
    f.extend_from_slice(&ethertype.to_be_bytes());
    f.extend_from_slice(payload);
    f
}

/// A broadcast ARP request whose sender and target are both `ip`.
pub fn gratuitous_arp(mac: [u8; 6], ip: Ipv4Addr) -> Vec<u8> {
    let mut a = vec![0, 1, 8, 0, 6, 4, 0, 1];
    a.extend_from_slice(&mac);
    a.extend_from_slice(&ip.octets());
    a.extend_from_slice(&[0; 6]);
    a.extend_from_slice(&ip.octets());
    ethernet(BROADCAST, mac, ETH_P_ARP, &a)
}

fn fold(mut sum: u32) -> u16 {
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !u16::try_from(sum).unwrap_or(u16::MAX)
}

fn sum16(data: &[u8]) -> u32 {
    data.chunks(2)
        .map(|c| u32::from(u16::from_be_bytes([c[0], c.get(1).copied().unwrap_or(0)])))
        .sum()
}

/// An unsolicited neighbour advertisement for `ip` to all nodes, override
/// flag set, with `mac` as the target link-layer address.
pub fn unsolicited_na(mac: [u8; 6], ip: Ipv6Addr) -> Vec<u8> {
    let mut icmp = vec![136, 0, 0, 0, 0x20, 0, 0, 0];
    icmp.extend_from_slice(&ip.octets());
    icmp.extend_from_slice(&[2, 1]);
    icmp.extend_from_slice(&mac);
    let len = u16::try_from(icmp.len()).unwrap_or(u16::MAX);
    let mut pseudo = Vec::with_capacity(40 + icmp.len());
    pseudo.extend_from_slice(&ip.octets());
    pseudo.extend_from_slice(&ALL_NODES.octets());
    pseudo.extend_from_slice(&u32::from(len).to_be_bytes());
    pseudo.extend_from_slice(&[0, 0, 0, 58]);
    pseudo.extend_from_slice(&icmp);
    let c = fold(sum16(&pseudo));
    icmp[2..4].copy_from_slice(&c.to_be_bytes());
    let mut ip6 = vec![0x60, 0, 0, 0];
    ip6.extend_from_slice(&len.to_be_bytes());
    ip6.extend_from_slice(&[58, 255]);
    ip6.extend_from_slice(&ip.octets());
    ip6.extend_from_slice(&ALL_NODES.octets());
    ip6.extend_from_slice(&icmp);
    ethernet(ALL_NODES_MAC, mac, ETH_P_IPV6, &ip6)
}

/// The frames that announce `ips` (link-local IPv6 addresses are left to
/// the pod's own stack).
pub fn frames(mac: [u8; 6], ips: &[IpAddr]) -> Vec<Vec<u8>> {
    ips.iter()
        .filter_map(|ip| match ip {
            IpAddr::V4(v4) => Some(gratuitous_arp(mac, *v4)),
            IpAddr::V6(v6) if !v6.is_unicast_link_local() => Some(unsolicited_na(mac, *v6)),
            IpAddr::V6(_) => None,
        })
        .collect()
}

/// Sends `frames` out of `ifname` inside the namespace `ns`, [`REPEAT`]
/// times; on a thread of its own that enters `ns` and then ends.
pub fn send(ns: &File, ifname: &str, frames: Vec<Vec<u8>>) -> Result<(), String> {
    if frames.is_empty() {
        return Ok(());
    }
    let ns = ns
        .try_clone()
        .map_err(|e| format!("cannot duplicate the namespace handle: {e}"))?;
    let ifname = ifname.to_owned();
    std::thread::spawn(move || -> Result<(), String> {
        nix::sched::setns(&ns, CloneFlags::CLONE_NEWNET)
            .map_err(|e| format!("cannot enter the pod's namespace: {e}"))?;
        let index = nix::net::if_::if_nametoindex(ifname.as_str())
            .map_err(|e| format!("interface {ifname}: {e}"))?;
        let fd = socket(
            AddressFamily::Packet,
            SockType::Raw,
            SockFlag::SOCK_CLOEXEC,
            None,
        )
        .map_err(|e| format!("cannot open a packet socket in the pod: {e}"))?;
        let raw = nix::libc::sockaddr_ll {
            sll_family: u16::try_from(nix::libc::AF_PACKET).unwrap_or_default(),
            sll_protocol: 0,
            sll_ifindex: i32::try_from(index).unwrap_or_default(),
            sll_hatype: 0,
            sll_pkttype: 0,
            sll_halen: 6,
            sll_addr: [0; 8],
        };
        let len = u32::try_from(std::mem::size_of::<nix::libc::sockaddr_ll>()).unwrap_or(0);
        #[allow(unsafe_code)]
        // SAFETY: `raw` is a fully initialised sockaddr_ll of `len` bytes
        // that lives across the call.
        let addr = unsafe { LinkAddr::from_raw(std::ptr::from_ref(&raw).cast(), Some(len)) }
            .ok_or("cannot build the link-layer address")?;
        for round in 0..REPEAT {
            if round > 0 {
                std::thread::sleep(GAP);
            }
            for f in &frames {
                sendto(
                    std::os::fd::AsRawFd::as_raw_fd(&fd),
                    f,
                    &addr,
                    MsgFlags::empty(),
                )
                .map_err(|e| format!("sending an announcement on {ifname}: {e}"))?;
            }
        }
        Ok(())
    })
    .join()
    .map_err(|_| "the announcing thread died".to_owned())?
}

#[cfg(test)]
mod tests {
    use super::*;

    const MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 0x07];

    #[test]
    fn a_gratuitous_arp_names_the_address_as_sender_and_target() {
        let f = gratuitous_arp(MAC, Ipv4Addr::new(10, 1, 0, 7));
        assert_eq!(f.len(), 42);
        assert_eq!(&f[..6], &BROADCAST);
        assert_eq!(&f[6..12], &MAC);
        assert_eq!(&f[12..14], &[8, 6]);
        assert_eq!(&f[20..22], &[0, 1], "a request");
        assert_eq!(&f[22..28], &MAC);
        assert_eq!(&f[28..32], &[10, 1, 0, 7]);
        assert_eq!(&f[38..42], &[10, 1, 0, 7]);
    }

    #[test]
    fn an_unsolicited_na_overrides_and_has_a_valid_checksum() {
        let ip: Ipv6Addr = "fd00:1::7".parse().unwrap();
        let f = unsolicited_na(MAC, ip);
        assert_eq!(&f[..6], &ALL_NODES_MAC);
        assert_eq!(&f[12..14], &[0x86, 0xdd]);
        let ip6 = &f[14..];
        assert_eq!(ip6[6], 58);
        assert_eq!(ip6[7], 255, "hop limit 255 or receivers drop it");
        let icmp = &ip6[40..];
        assert_eq!(icmp[0], 136);
        assert_eq!(icmp[4], 0x20, "override, not solicited, not router");
        assert_eq!(&icmp[8..24], &ip.octets());
        assert_eq!(&icmp[24..26], &[2, 1], "target link-layer address option");
        assert_eq!(&icmp[26..32], &MAC);
        // The checksum over pseudo-header and message comes out as zero.
        let mut pseudo = Vec::new();
        pseudo.extend_from_slice(&ip6[8..40]);
        pseudo.extend_from_slice(&(icmp.len() as u32).to_be_bytes());
        pseudo.extend_from_slice(&[0, 0, 0, 58]);
        pseudo.extend_from_slice(icmp);
        assert_eq!(fold(sum16(&pseudo)), 0);
    }

    #[test]
    fn link_local_addresses_are_not_announced() {
        let ips: Vec<IpAddr> = ["10.1.0.7", "fe80::7", "fd00::7"]
            .iter()
            .map(|s| s.parse().unwrap())
            .collect();
        let f = frames(MAC, &ips);
        assert_eq!(f.len(), 2);
    }
}
