//! Packet captures with tcpdump inside a namespace, and a small pcap reader
//! to judge what was on the wire (scenario 8: only WireGuard on the WAN).

use std::path::PathBuf;
use std::time::Duration;

use crate::netns::Netns;
use crate::process::{ProcId, ProcSpec, Processes};
use crate::{Error, Result};

/// A running tcpdump writing a pcap file.
#[derive(Debug)]
pub struct Capture {
    id: ProcId,
    file: PathBuf,
}

impl Capture {
    /// Starts `tcpdump` on `dev` in `ns` (a BPF `filter`, may be empty) and
    /// returns once it listens. `name` names its log and pcap file.
    pub fn start(
        procs: &Processes,
        name: &str,
        ns: &Netns,
        dev: &str,
        filter: &str,
    ) -> Result<Self> {
        let file = procs.log_dir().join(format!("{name}.pcap"));
        let mut spec = ProcSpec::new(name, ns, "tcpdump")
            // Stay root so the file can be written; deliver every packet at
            // once rather than in kernel blocks, and write it unbuffered.
            .args([
                "-Z",
                "root",
                "--immediate-mode",
                "-U",
                "-n",
                "-i",
                dev,
                "-w",
            ])
            .arg(&file)
            .daemon();
        if !filter.is_empty() {
            spec = spec.args(filter.split_whitespace());
        }
        let id = procs.spawn(spec)?;
        procs.wait_until(
            &format!("tcpdump on {dev} in {} listening", ns.name()),
            Duration::from_secs(5),
            || procs.log(id).is_ok_and(|l| l.contains("listening on")),
        )?;
        Ok(Self { id, file })
    }

    /// Stops the capture (tcpdump flushes on SIGTERM) and returns the pcap.
    pub fn stop(self, procs: &Processes) -> Result<Pcap> {
        procs.stop(self.id)?;
        let bytes = std::fs::read(&self.file).map_err(|e| Error::io(&self.file, e))?;
        Ok(Pcap { bytes })
    }
}

/// A pcap file's bytes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Pcap {
    pub bytes: Vec<u8>,
}

/// What a captured Ethernet frame carries, as far as the tests care.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FrameKind {
    Arp,
    /// IPv4 UDP with ports and the first payload byte (WireGuard message
    /// types are 1 to 4 followed by three zero bytes).
    Udp4 {
        src_port: u16,
        dst_port: u16,
        first_payload_byte: Option<u8>,
    },
    Icmp4,
    /// Other IPv4 protocol numbers.
    Ip4(u8),
    Ip6,
    /// Other ethertypes.
    Other(u16),
    /// Too short to tell.
    Truncated,
}

impl Pcap {
    /// Whether `marker` occurs anywhere in the capture.
    pub fn contains(&self, marker: &[u8]) -> bool {
        !marker.is_empty() && self.bytes.windows(marker.len()).any(|w| w == marker)
    }

    /// The captured frames, in order. Little- and big-endian pcap files with
    /// Ethernet link type are understood; anything else yields no frames.
    pub fn frames(&self) -> Vec<&[u8]> {
        let b = &self.bytes;
        let Some(magic) = b.get(0..4) else {
            return Vec::new();
        };
        let le = match magic {
            [0xd4, 0xc3, 0xb2, 0xa1] | [0x4d, 0x3c, 0xb2, 0xa1] => true,
            [0xa1, 0xb2, 0xc3, 0xd4] | [0xa1, 0xb2, 0x3c, 0x4d] => false,
            _ => return Vec::new(),
        };
        let u32_at = |at: usize| -> Option<u32> {
            let s: [u8; 4] = b.get(at..at + 4)?.try_into().ok()?;
            Some(if le {
                u32::from_le_bytes(s)
            } else {
                u32::from_be_bytes(s)
            })
        };
        if u32_at(20) != Some(1) {
            return Vec::new();
        }
        let mut frames = Vec::new();
        let mut at = 24;
        while let Some(len) = u32_at(at + 8) {
            let start = at + 16;
            let Some(frame) = usize::try_from(len)
                .ok()
                .and_then(|l| b.get(start..start + l))
            else {
                break;
            };
            frames.push(frame);
            at = start + frame.len();
        }
        frames
    }

    /// Every frame classified.
    pub fn kinds(&self) -> Vec<FrameKind> {
        self.frames().into_iter().map(classify).collect()
    }
}

/// Classifies one Ethernet frame (no VLAN tags expected on our bridges).
pub fn classify(frame: &[u8]) -> FrameKind {
    let Some(&[hi, lo]) = frame.get(12..14) else {
        return FrameKind::Truncated;
    };
    match u16::from_be_bytes([hi, lo]) {
        0x0806 => FrameKind::Arp,
        0x86dd => FrameKind::Ip6,
        0x0800 => {
            let ip = &frame[14..];
            let (Some(&vihl), Some(&proto)) = (ip.first(), ip.get(9)) else {
                return FrameKind::Truncated;
            };
            let ihl = usize::from(vihl & 0x0f) * 4;
            match proto {
                1 => FrameKind::Icmp4,
                17 => {
                    let Some(udp) = ip.get(ihl..ihl + 8) else {
                        return FrameKind::Truncated;
                    };
                    FrameKind::Udp4 {
                        src_port: u16::from_be_bytes([udp[0], udp[1]]),
                        dst_port: u16::from_be_bytes([udp[2], udp[3]]),
                        first_payload_byte: ip.get(ihl + 8).copied(),
                    }
                }
                p => FrameKind::Ip4(p),
            }
        }
        other => FrameKind::Other(other),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pcap_with(frames: &[Vec<u8>]) -> Pcap {
        let mut b = vec![0xd4, 0xc3, 0xb2, 0xa1, 2, 0, 4, 0];
        b.extend([0; 8]);
        b.extend(65535u32.to_le_bytes());
        b.extend(1u32.to_le_bytes());
        for f in frames {
            b.extend([0; 8]);
            let len = u32::try_from(f.len()).unwrap();
            b.extend(len.to_le_bytes());
            b.extend(len.to_le_bytes());
            b.extend(f);
        }
        Pcap { bytes: b }
    }

    fn eth(ethertype: u16, payload: &[u8]) -> Vec<u8> {
        let mut f = vec![0xff; 12];
        f.extend(ethertype.to_be_bytes());
        f.extend(payload);
        f
    }

    #[test]
    fn frames_are_split_and_classified() {
        let mut ip = vec![0x45, 0, 0, 0, 0, 0, 0, 0, 64, 17, 0, 0];
        ip.extend([192, 0, 2, 11, 192, 0, 2, 12]);
        ip.extend(51820u16.to_be_bytes());
        ip.extend(51821u16.to_be_bytes());
        ip.extend([0, 0, 0, 0, 4, 0, 0, 0]);
        let pcap = pcap_with(&[
            eth(0x0806, &[0; 28]),
            eth(0x0800, &ip),
            eth(0x86dd, &[]),
            vec![1],
        ]);
        assert_eq!(
            pcap.kinds(),
            vec![
                FrameKind::Arp,
                FrameKind::Udp4 {
                    src_port: 51820,
                    dst_port: 51821,
                    first_payload_byte: Some(4)
                },
                FrameKind::Ip6,
                FrameKind::Truncated,
            ]
        );
        assert!(pcap.contains(&[192, 0, 2, 11]));
        assert!(!pcap.contains(b"L2MESH"));
    }

    #[test]
    fn garbage_and_truncated_files_yield_what_is_whole() {
        assert!(
            Pcap {
                bytes: b"nonsense".to_vec()
            }
            .frames()
            .is_empty()
        );
        let mut p = pcap_with(&[eth(0x0806, &[0; 28])]);
        p.bytes.truncate(p.bytes.len() - 1);
        assert!(p.frames().is_empty());
    }
}
