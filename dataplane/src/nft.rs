//! The node's own network stack kept out of every tenant network, with one
//! nftables table in the bridge family, written over netlink (no `nft`
//! binary, no library):
//!
//! ```text
//! table bridge l2mesh {
//!   chain input  { type filter hook input priority -200; policy accept; meta iifgroup PORT_GROUP drop; }
//!   chain output { type filter hook output priority -200; policy accept; meta oifgroup PORT_GROUP drop; }
//! }
//! ```
//!
//! Every port of a tenant bridge (the TAP and each attached pod interface)
//! and the bridge itself carry the interface group [`PORT_GROUP`]. The
//! bridge `input` hook sees every frame a bridge hands to the local stack:
//! those passed up to the bridge device (broadcasts, multicasts, frames for
//! its MAC) and the link-local ones (01:80:c2:00:00:0X) passed up to the
//! port device itself. The `output` hook sees every frame the node sends
//! out through a bridge device. Frames switched between ports run neither
//! hook, and with no chain on the bridge `prerouting`/`forward` hooks the
//! kernel skips those hooks entirely: the forwarding path pays nothing.
//! The bridge family is node-wide, so the rules match on the group and
//! leave every other bridge of the node alone.

use std::os::fd::{AsRawFd as _, OwnedFd};

use nix::sys::socket::{
    AddressFamily, MsgFlags, NetlinkAddr, SockFlag, SockProtocol, SockType, recv, sendto,
    setsockopt, socket, sockopt,
};

use crate::Error;

/// Interface group (IFLA_GROUP) of the dataplane's bridges and of every
/// port attached to them ("l2m" and a zero byte).
pub const PORT_GROUP: u32 = 0x6c32_6d00;
/// Name of the table in the bridge family.
pub const TABLE: &str = "l2mesh";

const NFNL_SUBSYS_NFTABLES: u16 = 10;
const NFNL_MSG_BATCH_BEGIN: u16 = 0x10;
const NFNL_MSG_BATCH_END: u16 = 0x11;
const NFT_MSG_NEWTABLE: u16 = 0;
const NFT_MSG_DELTABLE: u16 = 2;
const NFT_MSG_NEWCHAIN: u16 = 3;
const NFT_MSG_NEWRULE: u16 = 6;

const NLM_F_REQUEST: u16 = 0x1;
const NLM_F_ACK: u16 = 0x4;
const NLM_F_CREATE: u16 = 0x400;
const NLM_F_APPEND: u16 = 0x800;
const NLA_F_NESTED: u16 = 0x8000;
const NLMSG_ERROR: u16 = 2;

const NFPROTO_BRIDGE: u8 = 7;
const NF_BR_LOCAL_IN: u32 = 1;
const NF_BR_LOCAL_OUT: u32 = 3;
/// Ahead of any filter a user adds at the default priority 0.
const PRIORITY: i32 = -200;
const NF_DROP: u32 = 0;
const NF_ACCEPT: u32 = 1;

const NFTA_TABLE_NAME: u16 = 1;
const NFTA_CHAIN_TABLE: u16 = 1;
const NFTA_CHAIN_NAME: u16 = 3;
const NFTA_CHAIN_HOOK: u16 = 4;
const NFTA_CHAIN_POLICY: u16 = 5;
const NFTA_CHAIN_TYPE: u16 = 7;
const NFTA_HOOK_HOOKNUM: u16 = 1;
const NFTA_HOOK_PRIORITY: u16 = 2;
const NFTA_RULE_TABLE: u16 = 1;
const NFTA_RULE_CHAIN: u16 = 2;
const NFTA_RULE_EXPRESSIONS: u16 = 4;
const NFTA_LIST_ELEM: u16 = 1;
const NFTA_EXPR_NAME: u16 = 1;
const NFTA_EXPR_DATA: u16 = 2;
const NFTA_META_DREG: u16 = 1;
const NFTA_META_KEY: u16 = 2;
const NFTA_CMP_SREG: u16 = 1;
const NFTA_CMP_OP: u16 = 2;
const NFTA_CMP_DATA: u16 = 3;
const NFTA_DATA_VALUE: u16 = 1;
const NFTA_DATA_VERDICT: u16 = 2;
const NFTA_VERDICT_CODE: u16 = 1;
const NFTA_IMMEDIATE_DREG: u16 = 1;
const NFTA_IMMEDIATE_DATA: u16 = 2;
const NFT_META_IIFGROUP: u32 = 21;
const NFT_META_OIFGROUP: u32 = 22;
const NFT_REG_VERDICT: u32 = 0;
const NFT_REG_1: u32 = 1;
const NFT_CMP_EQ: u32 = 0;

/// Netlink attributes, nested ones included, appended to a buffer.
#[derive(Default)]
struct Attrs(Vec<u8>);

impl Attrs {
    fn raw(&mut self, kind: u16, value: &[u8]) -> &mut Self {
        let len = u16::try_from(4 + value.len()).unwrap_or(u16::MAX);
        self.0.extend_from_slice(&len.to_ne_bytes());
        self.0.extend_from_slice(&kind.to_ne_bytes());
        self.0.extend_from_slice(value);
        while !self.0.len().is_multiple_of(4) {
            self.0.push(0);
        }
        self
    }

    fn str(&mut self, kind: u16, s: &str) -> &mut Self {
        let mut v = s.as_bytes().to_vec();
        v.push(0);
        self.raw(kind, &v)
    }

    /// nftables takes its integers in network byte order.
    fn be32(&mut self, kind: u16, v: u32) -> &mut Self {
        self.raw(kind, &v.to_be_bytes())
    }

    fn nested(&mut self, kind: u16, f: impl FnOnce(&mut Attrs)) -> &mut Self {
        let mut inner = Attrs::default();
        f(&mut inner);
        self.raw(kind | NLA_F_NESTED, &inner.0)
    }
}

/// One netlink message: header, nfgenmsg, attributes.
fn message(
    out: &mut Vec<u8>,
    kind: u16,
    flags: u16,
    seq: u32,
    family: u8,
    res_id: u16,
    attrs: &Attrs,
) {
    let len = u32::try_from(16 + 4 + attrs.0.len()).unwrap_or(u32::MAX);
    out.extend_from_slice(&len.to_ne_bytes());
    out.extend_from_slice(&kind.to_ne_bytes());
    out.extend_from_slice(&flags.to_ne_bytes());
    out.extend_from_slice(&seq.to_ne_bytes());
    out.extend_from_slice(&0u32.to_ne_bytes());
    out.push(family);
    out.push(0);
    out.extend_from_slice(&res_id.to_be_bytes());
    out.extend_from_slice(&attrs.0);
}

fn nft_type(msg: u16) -> u16 {
    (NFNL_SUBSYS_NFTABLES << 8) | msg
}

/// `meta KEY == PORT_GROUP drop`.
fn group_drop_rule(chain: &str, meta_key: u32) -> Attrs {
    let mut a = Attrs::default();
    a.str(NFTA_RULE_TABLE, TABLE)
        .str(NFTA_RULE_CHAIN, chain)
        .nested(NFTA_RULE_EXPRESSIONS, |l| {
            l.nested(NFTA_LIST_ELEM, |e| {
                e.str(NFTA_EXPR_NAME, "meta").nested(NFTA_EXPR_DATA, |d| {
                    d.be32(NFTA_META_DREG, NFT_REG_1)
                        .be32(NFTA_META_KEY, meta_key);
                });
            })
            .nested(NFTA_LIST_ELEM, |e| {
                e.str(NFTA_EXPR_NAME, "cmp").nested(NFTA_EXPR_DATA, |d| {
                    d.be32(NFTA_CMP_SREG, NFT_REG_1)
                        .be32(NFTA_CMP_OP, NFT_CMP_EQ)
                        // The register holds the group as the kernel stores it.
                        .nested(NFTA_CMP_DATA, |v| {
                            v.raw(NFTA_DATA_VALUE, &PORT_GROUP.to_ne_bytes());
                        });
                });
            })
            .nested(NFTA_LIST_ELEM, |e| {
                e.str(NFTA_EXPR_NAME, "immediate")
                    .nested(NFTA_EXPR_DATA, |d| {
                        d.be32(NFTA_IMMEDIATE_DREG, NFT_REG_VERDICT).nested(
                            NFTA_IMMEDIATE_DATA,
                            |v| {
                                v.nested(NFTA_DATA_VERDICT, |c| {
                                    c.be32(NFTA_VERDICT_CODE, NF_DROP);
                                });
                            },
                        );
                    });
            });
        });
    a
}

fn base_chain(name: &str, hook: u32) -> Attrs {
    let mut a = Attrs::default();
    a.str(NFTA_CHAIN_TABLE, TABLE)
        .str(NFTA_CHAIN_NAME, name)
        .nested(NFTA_CHAIN_HOOK, |h| {
            h.be32(NFTA_HOOK_HOOKNUM, hook)
                .raw(NFTA_HOOK_PRIORITY, &PRIORITY.to_be_bytes());
        })
        .be32(NFTA_CHAIN_POLICY, NF_ACCEPT)
        .str(NFTA_CHAIN_TYPE, "filter");
    a
}

/// The batch that replaces the table atomically (create it if missing,
/// delete it, create it afresh with its chains and rules). Messages get
/// sequence numbers from `seq` on; returns the batch and how many of its
/// messages the kernel acknowledges.
fn replace_batch(seq: u32) -> (Vec<u8>, u32) {
    let mut out = Vec::new();
    let mut table = Attrs::default();
    table.str(NFTA_TABLE_NAME, TABLE);
    let req = NLM_F_REQUEST | NLM_F_ACK;
    let msgs: Vec<(u16, u16, Attrs)> = vec![
        (
            nft_type(NFT_MSG_NEWTABLE),
            req | NLM_F_CREATE,
            clone(&table),
        ),
        (nft_type(NFT_MSG_DELTABLE), req, clone(&table)),
        (nft_type(NFT_MSG_NEWTABLE), req | NLM_F_CREATE, table),
        (
            nft_type(NFT_MSG_NEWCHAIN),
            req | NLM_F_CREATE,
            base_chain("input", NF_BR_LOCAL_IN),
        ),
        (
            nft_type(NFT_MSG_NEWCHAIN),
            req | NLM_F_CREATE,
            base_chain("output", NF_BR_LOCAL_OUT),
        ),
        (
            nft_type(NFT_MSG_NEWRULE),
            req | NLM_F_CREATE | NLM_F_APPEND,
            group_drop_rule("input", NFT_META_IIFGROUP),
        ),
        (
            nft_type(NFT_MSG_NEWRULE),
            req | NLM_F_CREATE | NLM_F_APPEND,
            group_drop_rule("output", NFT_META_OIFGROUP),
        ),
    ];
    let count = u32::try_from(msgs.len()).unwrap_or(u32::MAX);
    message(
        &mut out,
        NFNL_MSG_BATCH_BEGIN,
        NLM_F_REQUEST,
        seq,
        0,
        NFNL_SUBSYS_NFTABLES,
        &Attrs::default(),
    );
    for (i, (kind, flags, attrs)) in msgs.iter().enumerate() {
        let s = seq + 1 + u32::try_from(i).unwrap_or(0);
        message(&mut out, *kind, *flags, s, NFPROTO_BRIDGE, 0, attrs);
    }
    message(
        &mut out,
        NFNL_MSG_BATCH_END,
        NLM_F_REQUEST,
        seq + 1 + count,
        0,
        NFNL_SUBSYS_NFTABLES,
        &Attrs::default(),
    );
    (out, count)
}

fn clone(a: &Attrs) -> Attrs {
    Attrs(a.0.clone())
}

/// The acknowledgements and errors in a buffer of netlink replies, as
/// (sequence number, errno; 0 for an acknowledgement).
fn replies(buf: &[u8]) -> Vec<(u32, i32)> {
    let mut v = Vec::new();
    let mut off = 0;
    while off + 16 <= buf.len() {
        let word = |at: usize| {
            let mut b = [0u8; 4];
            b.copy_from_slice(&buf[at..at + 4]);
            b
        };
        let len = u32::from_ne_bytes(word(off)) as usize;
        let kind = u16::from_ne_bytes([buf[off + 4], buf[off + 5]]);
        let seq = u32::from_ne_bytes(word(off + 8));
        if len < 16 || off + len > buf.len() {
            break;
        }
        if kind == NLMSG_ERROR && len >= 20 {
            v.push((seq, -i32::from_ne_bytes(word(off + 16))));
        }
        off += (len + 3) & !3;
    }
    v
}

/// Installs (or replaces) the table in the current network namespace.
pub fn install() -> Result<(), Error> {
    let fail = |what: &str, e: &dyn std::fmt::Display| {
        Error::Isolation(format!(
            "{what}: {e} (the dataplane needs CAP_NET_ADMIN and a kernel with nftables' bridge \
             family, CONFIG_NF_TABLES_BRIDGE)"
        ))
    };
    let fd: OwnedFd = socket(
        AddressFamily::Netlink,
        SockType::Raw,
        SockFlag::SOCK_CLOEXEC,
        SockProtocol::NetlinkNetFilter,
    )
    .map_err(|e| fail("opening a netfilter netlink socket", &e))?;
    setsockopt(
        &fd,
        sockopt::ReceiveTimeout,
        &nix::sys::time::TimeVal::new(5, 0),
    )
    .map_err(|e| fail("setting a receive timeout", &e))?;
    let seq = std::process::id().wrapping_mul(1000);
    let (batch, count) = replace_batch(seq);
    sendto(
        fd.as_raw_fd(),
        &batch,
        &NetlinkAddr::new(0, 0),
        MsgFlags::empty(),
    )
    .map_err(|e| fail("sending the nftables batch", &e))?;
    let mut acked = 0;
    let mut buf = vec![0u8; 16 * 1024];
    while acked < count {
        let n = recv(fd.as_raw_fd(), &mut buf, MsgFlags::empty())
            .map_err(|e| fail("reading the kernel's answer", &e))?;
        for (s, errno) in replies(&buf[..n]) {
            if errno != 0 {
                let step = s.wrapping_sub(seq);
                return Err(fail(
                    &format!("installing nftables table bridge {TABLE} (message {step})"),
                    &std::io::Error::from_raw_os_error(errno),
                ));
            }
            acked += 1;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Walks the top-level messages of a batch: (type, flags, seq, family).
    fn headers(buf: &[u8]) -> Vec<(u16, u16, u32, u8)> {
        let mut v = Vec::new();
        let mut off = 0;
        while off < buf.len() {
            let len = u32::from_ne_bytes(buf[off..off + 4].try_into().unwrap()) as usize;
            let kind = u16::from_ne_bytes(buf[off + 4..off + 6].try_into().unwrap());
            let flags = u16::from_ne_bytes(buf[off + 6..off + 8].try_into().unwrap());
            let seq = u32::from_ne_bytes(buf[off + 8..off + 12].try_into().unwrap());
            v.push((kind, flags, seq, buf[off + 16]));
            assert_eq!(len % 4, 0, "messages stay aligned");
            off += len;
        }
        assert_eq!(off, buf.len());
        v
    }

    #[test]
    fn the_batch_replaces_the_table_atomically_in_the_bridge_family() {
        let (b, count) = replace_batch(100);
        let h = headers(&b);
        assert_eq!(count, 7);
        assert_eq!(h.len(), 9);
        assert_eq!(h[0].0, NFNL_MSG_BATCH_BEGIN);
        assert_eq!(h[8].0, NFNL_MSG_BATCH_END);
        let kinds: Vec<u16> = h[1..8].iter().map(|m| m.0 & 0xff).collect();
        assert_eq!(
            kinds,
            [
                NFT_MSG_NEWTABLE,
                NFT_MSG_DELTABLE,
                NFT_MSG_NEWTABLE,
                NFT_MSG_NEWCHAIN,
                NFT_MSG_NEWCHAIN,
                NFT_MSG_NEWRULE,
                NFT_MSG_NEWRULE
            ]
        );
        for (i, m) in h[1..8].iter().enumerate() {
            assert_eq!(m.0 >> 8, NFNL_SUBSYS_NFTABLES);
            assert_eq!(m.3, NFPROTO_BRIDGE);
            assert_eq!(m.2, 101 + i as u32, "sequence numbers follow each other");
            assert_ne!(m.1 & NLM_F_ACK, 0, "every change is acknowledged");
        }
    }

    #[test]
    fn the_rule_compares_the_group_and_drops() {
        let r = group_drop_rule("input", NFT_META_IIFGROUP).0;
        let find = |needle: &[u8]| r.windows(needle.len()).any(|w| w == needle);
        assert!(find(b"meta\0") && find(b"cmp\0") && find(b"immediate\0"));
        assert!(find(&PORT_GROUP.to_ne_bytes()));
        assert!(find(&NFT_META_IIFGROUP.to_be_bytes()));
    }

    #[test]
    fn errors_and_acks_are_read_from_replies() {
        let mut buf = Vec::new();
        for (seq, err) in [(5u32, 0i32), (6, -1)] {
            buf.extend_from_slice(&36u32.to_ne_bytes());
            buf.extend_from_slice(&NLMSG_ERROR.to_ne_bytes());
            buf.extend_from_slice(&0u16.to_ne_bytes());
            buf.extend_from_slice(&seq.to_ne_bytes());
            buf.extend_from_slice(&0u32.to_ne_bytes());
            buf.extend_from_slice(&err.to_ne_bytes());
            buf.extend_from_slice(&[0u8; 16]);
        }
        assert_eq!(replies(&buf), [(5, 0), (6, 1)]);
    }
}
