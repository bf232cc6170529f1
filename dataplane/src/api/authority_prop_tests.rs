//! Property tests of [`AuthorityRewriter`]: arbitrary bytes never panic nor
//! grow its buffers past their bounds, and for valid HTTP/2 with an indexing
//! HPACK encoder the server's decoder sees exactly the client's header
//! lists (authority aside) and every other frame unchanged, however the
//! bytes are split into reads.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use proptest::prelude::*;

use super::*;

const SOCKET_PATH: &str = "/run/l2mesh/dataplane.sock";
const TYPE_DATA: u8 = 0x0;

/// Feeds `input` in reads of the given sizes (cycled), as a socket would.
fn push_in_reads(
    r: &mut AuthorityRewriter,
    input: &[u8],
    reads: &[usize],
    out: &mut Vec<u8>,
) -> Result<(), AuthorityError> {
    let mut rest = input;
    for &n in reads.iter().cycle() {
        if rest.is_empty() {
            break;
        }
        let (now, later) = rest.split_at(n.clamp(1, rest.len()));
        r.push(now, out)?;
        rest = later;
    }
    Ok(())
}

/// Every frame after the preface: (type, flags, stream, payload).
fn parse_frames(mut bytes: &[u8]) -> Vec<(u8, u8, u32, Vec<u8>)> {
    let mut v = Vec::new();
    while !bytes.is_empty() {
        let len = usize::from(bytes[0]) << 16 | usize::from(bytes[1]) << 8 | usize::from(bytes[2]);
        let stream = u32::from_be_bytes([bytes[5], bytes[6], bytes[7], bytes[8]]);
        v.push((bytes[3], bytes[4], stream, bytes[9..9 + len].to_vec()));
        bytes = &bytes[9 + len..];
    }
    v
}

type List = Vec<(Vec<u8>, Vec<u8>)>;
/// DATA frames: stream and payload.
type Bodies = Vec<(u32, Vec<u8>)>;

/// One request of the generated connection.
#[derive(Debug, Clone)]
struct Req {
    authority: &'static str,
    /// Indexes into the metadata name pool and value lengths.
    metadata: Vec<(usize, usize, u8)>,
    /// A dynamic table size update before the block.
    table_size: Option<usize>,
    /// Where the block is cut into HEADERS + CONTINUATION frames.
    cuts: Vec<usize>,
    padded: Option<u8>,
    priority: bool,
    end_stream: bool,
    /// A DATA frame on this stream after the block.
    body: Vec<u8>,
}

fn req() -> impl Strategy<Value = Req> {
    (
        prop::sample::select(vec![SOCKET_PATH, "localhost", "%2Frun%2Fx", "a.b:80", ""]),
        prop::collection::vec((0usize..12, 0usize..400, any::<u8>()), 0..8),
        prop::option::weighted(0.2, 0usize..=HPACK_TABLE_BYTES),
        prop::collection::vec(0usize..600, 0..4),
        prop::option::of(any::<u8>()),
        any::<bool>(),
        any::<bool>(),
        prop::collection::vec(any::<u8>(), 0..300),
    )
        .prop_map(
            |(authority, metadata, table_size, cuts, padded, priority, end_stream, body)| Req {
                authority,
                metadata,
                table_size,
                cuts,
                padded,
                priority,
                end_stream,
                body,
            },
        )
}

fn list_of(r: &Req) -> List {
    let mut l: List = [
        (":method", "POST"),
        (":scheme", "http"),
        (":path", "/l2mesh.node.v1.Dataplane/GetStatus"),
        (":authority", r.authority),
        ("content-type", "application/grpc"),
    ]
    .iter()
    .map(|(n, v)| (n.as_bytes().to_vec(), v.as_bytes().to_vec()))
    .collect();
    for &(name, len, fill) in &r.metadata {
        l.push((
            format!("x-meta-{name}").into_bytes(),
            vec![b'a' + fill % 26; len],
        ));
    }
    l
}

/// The client's bytes, and the lists and DATA frames h2 must see.
fn connection(reqs: &[Req]) -> (Vec<u8>, Vec<List>, Bodies) {
    let mut enc = loona_hpack::Encoder::new();
    let mut input = PREFACE.to_vec();
    encode_frame(0x4, 0, 0, &[], &mut input);
    let mut lists = Vec::new();
    let mut data = Vec::new();
    for (i, r) in reqs.iter().enumerate() {
        let stream = u32::try_from(2 * i + 1).unwrap();
        let mut block = Vec::new();
        if let Some(size) = r.table_size {
            encode_integer(size, 5, 0x20, &mut block);
            enc.set_max_table_size(size);
        }
        let list = list_of(r);
        enc.encode_into(list.iter().map(|(n, v)| (&n[..], &v[..])), &mut block)
            .unwrap();
        let expected = list
            .into_iter()
            .map(|(n, v)| {
                if n == b":authority" && !valid_authority(&v) {
                    (n, LOCAL_AUTHORITY.as_bytes().to_vec())
                } else {
                    (n, v)
                }
            })
            .collect();
        lists.push(expected);
        let mut cuts: Vec<usize> = r.cuts.iter().map(|&c| c.min(block.len())).collect();
        cuts.sort_unstable();
        cuts.push(block.len());
        let mut start = 0;
        for (j, &end) in cuts.iter().enumerate() {
            let last = j + 1 == cuts.len();
            let end_headers = if last { FLAG_END_HEADERS } else { 0 };
            if j == 0 {
                let mut flags = end_headers;
                let mut payload = Vec::new();
                if let Some(pad) = r.padded {
                    flags |= FLAG_PADDED;
                    payload.push(pad);
                }
                if r.priority {
                    flags |= FLAG_PRIORITY;
                    payload.extend_from_slice(&[0, 0, 0, 0, 15]);
                }
                if r.end_stream {
                    flags |= FLAG_END_STREAM;
                }
                payload.extend_from_slice(&block[start..end]);
                payload.extend(std::iter::repeat_n(0, usize::from(r.padded.unwrap_or(0))));
                encode_frame(TYPE_HEADERS, flags, stream, &payload, &mut input);
            } else {
                encode_frame(
                    TYPE_CONTINUATION,
                    end_headers,
                    stream,
                    &block[start..end],
                    &mut input,
                );
            }
            start = end;
        }
        if !r.end_stream {
            encode_frame(TYPE_DATA, FLAG_END_STREAM, stream, &r.body, &mut input);
            data.push((stream, r.body.clone()));
        }
    }
    (input, lists, data)
}

/// What h2 sees: one HPACK decoder (empty table, default size) over the
/// rewritten blocks, and the DATA frames.
fn server_view(out: &[u8]) -> (Vec<List>, Bodies) {
    assert!(out.starts_with(PREFACE));
    let mut dec = loona_hpack::Decoder::new();
    let mut lists = Vec::new();
    let mut data = Vec::new();
    let mut block = Vec::new();
    for (kind, flags, stream, mut payload) in parse_frames(&out[PREFACE.len()..]) {
        assert!(payload.len() <= MAX_FRAME_PAYLOAD);
        if kind == TYPE_HEADERS && flags & FLAG_PRIORITY != 0 {
            payload.drain(..5);
        }
        match kind {
            TYPE_HEADERS | TYPE_CONTINUATION => {
                block.extend_from_slice(&payload);
                if flags & FLAG_END_HEADERS != 0 {
                    lists.push(dec.decode(&block).unwrap());
                    block.clear();
                }
            }
            TYPE_DATA => data.push((stream, payload)),
            _ => {}
        }
    }
    (lists, data)
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(128))]

    #[test]
    fn arbitrary_bytes_never_panic_and_stay_bounded(
        bytes in prop::collection::vec(any::<u8>(), 0..3000),
        kinds in prop::collection::vec(prop::sample::select(vec![0u8, 1, 4, 9]), 0..16),
        reads in prop::collection::vec(1usize..64, 1..8),
    ) {
        // Raw bytes, and frames of the interesting types with random flags
        // and payloads, after a valid preface.
        let mut input = PREFACE.to_vec();
        let mut rest = &bytes[..];
        for kind in kinds {
            let n = rest.len().min(usize::from(rest.first().copied().unwrap_or(0)) * 4);
            let flags = rest.get(1).copied().unwrap_or(0);
            let (payload, tail) = rest.split_at(n);
            encode_frame(kind, flags, 1, payload, &mut input);
            rest = tail;
        }
        input.extend_from_slice(rest);
        let mut r = AuthorityRewriter::new();
        let mut out = Vec::new();
        let _ = push_in_reads(&mut r, &input, &reads, &mut out);
        prop_assert!(r.pending.len() <= MAX_HEADER_BLOCK_BYTES + FRAME_HEADER);
        prop_assert!(r.block.as_ref().is_none_or(|b| b.fragment.len() <= MAX_HEADER_BLOCK_BYTES));
        // Also without the preface (not HTTP/2: passes through as is).
        let mut r = AuthorityRewriter::new();
        let mut out = Vec::new();
        push_in_reads(&mut r, &bytes, &reads, &mut out).unwrap();
        if !bytes.is_empty() && !PREFACE.starts_with(&bytes[..bytes.len().min(PREFACE.len())]) {
            prop_assert_eq!(out, bytes);
        }
    }

    #[test]
    fn hpack_blocks_with_random_references_never_panic(
        blocks in prop::collection::vec(prop::collection::vec(any::<u8>(), 0..200), 1..6),
    ) {
        let mut input = PREFACE.to_vec();
        for (i, b) in blocks.iter().enumerate() {
            let stream = u32::try_from(2 * i + 1).unwrap();
            encode_frame(TYPE_HEADERS, FLAG_END_HEADERS, stream, b, &mut input);
        }
        let mut out = Vec::new();
        let _ = AuthorityRewriter::new().push(&input, &mut out);
    }

    #[test]
    fn the_server_sees_the_clients_headers_and_bodies(
        reqs in prop::collection::vec(req(), 1..24),
        reads in prop::collection::vec(1usize..5000, 1..8),
    ) {
        let (input, lists, data) = connection(&reqs);
        let mut r = AuthorityRewriter::new();
        let mut out = Vec::new();
        push_in_reads(&mut r, &input, &reads, &mut out).unwrap();
        let (seen_lists, seen_data) = server_view(&out);
        prop_assert_eq!(seen_lists, lists);
        prop_assert_eq!(seen_data, data);
        prop_assert!(r.pending.is_empty() && r.block.is_none());
        // Stopping after every header block (as the connection does when
        // it holds enough) gives the same bytes.
        let mut r = AuthorityRewriter::new();
        let mut stepped = Vec::new();
        let mut rest = &input[..];
        while !rest.is_empty() {
            let taken = r.push_some(rest, &mut stepped, 1).unwrap();
            prop_assert!(taken > 0);
            rest = &rest[taken..];
        }
        prop_assert_eq!(stepped, out);
    }
}
