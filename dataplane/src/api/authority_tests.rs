#![allow(clippy::unwrap_used, clippy::expect_used)]

use super::*;

const SOCKET_PATH: &str = "/run/l2mesh/dataplane.sock";

fn headers_block(authority: &str) -> Vec<u8> {
    let mut b = Vec::new();
    for (n, v) in [
        (":method", "POST"),
        (":scheme", "http"),
        (":path", "/l2mesh.node.v1.Dataplane/GetStatus"),
        (":authority", authority),
        ("content-type", "application/grpc"),
        ("te", "trailers"),
    ] {
        encode_literal(n.as_bytes(), v.as_bytes(), &mut b);
    }
    b
}

/// Splits what the rewriter produced into frames (type, flags, stream,
/// payload).
fn frames(mut bytes: &[u8]) -> Vec<(u8, u8, u32, Vec<u8>)> {
    let mut v = Vec::new();
    while !bytes.is_empty() {
        let len = usize::from(bytes[0]) << 16 | usize::from(bytes[1]) << 8 | usize::from(bytes[2]);
        let stream = u32::from_be_bytes([bytes[5], bytes[6], bytes[7], bytes[8]]);
        v.push((bytes[3], bytes[4], stream, bytes[9..9 + len].to_vec()));
        bytes = &bytes[9 + len..];
    }
    v
}

/// The header lists h2 would see, decoded with one HPACK decoder.
fn decoded_blocks(out: &[u8]) -> Vec<Vec<(String, String)>> {
    let mut dec = loona_hpack::Decoder::new();
    let mut lists = Vec::new();
    let mut block = Vec::new();
    for (kind, flags, _, mut payload) in frames(&out[PREFACE.len()..]) {
        if kind == TYPE_HEADERS {
            assert_eq!(flags & FLAG_PADDED, 0);
            if flags & FLAG_PRIORITY != 0 {
                payload.drain(..5);
            }
        }
        if kind == TYPE_HEADERS || kind == TYPE_CONTINUATION {
            block.extend_from_slice(&payload);
            if flags & FLAG_END_HEADERS != 0 {
                let list = dec.decode(&block).unwrap();
                lists.push(
                    list.into_iter()
                        .map(|(n, v)| {
                            (String::from_utf8(n).unwrap(), String::from_utf8(v).unwrap())
                        })
                        .collect(),
                );
                block.clear();
            }
        }
    }
    lists
}

fn authority_of(list: &[(String, String)]) -> &str {
    &list.iter().find(|(n, _)| n == ":authority").unwrap().1
}

fn rewrite_all(input: &[u8]) -> (Vec<u8>, AuthorityRewriter) {
    let mut r = AuthorityRewriter::new();
    let mut out = Vec::new();
    r.push(input, &mut out).unwrap();
    (out, r)
}

fn client_bytes(blocks: &[(u8, Vec<u8>)]) -> Vec<u8> {
    let mut input = PREFACE.to_vec();
    encode_frame(0x4, 0, 0, &[], &mut input); // SETTINGS
    for (flags, block) in blocks {
        encode_frame(TYPE_HEADERS, *flags, 1, block, &mut input);
    }
    input
}

#[test]
fn a_socket_path_authority_becomes_localhost() {
    let input = client_bytes(&[(FLAG_END_HEADERS, headers_block(SOCKET_PATH))]);
    let (out, r) = rewrite_all(&input);
    let lists = decoded_blocks(&out);
    assert_eq!(authority_of(&lists[0]), LOCAL_AUTHORITY);
    assert_eq!(lists[0].len(), 6, "every other field is kept: {lists:?}");
    assert_eq!(r.rewritten(), 1);
    // Preface and SETTINGS pass through unchanged.
    assert_eq!(&out[..PREFACE.len() + 9], &input[..PREFACE.len() + 9]);
}

#[test]
fn valid_and_percent_encoded_authorities() {
    for (given, seen) in [
        ("localhost", "localhost"),
        ("l2mesh-agent:443", "l2mesh-agent:443"),
        ("%2Frun%2Fl2mesh%2Fdataplane.sock", LOCAL_AUTHORITY),
        ("unix:/run/l2mesh/dataplane.sock", LOCAL_AUTHORITY),
        ("", LOCAL_AUTHORITY),
    ] {
        let (out, _) = rewrite_all(&client_bytes(&[(FLAG_END_HEADERS, headers_block(given))]));
        assert_eq!(authority_of(&decoded_blocks(&out)[0]), seen, "{given:?}");
    }
}

#[test]
fn huffman_and_indexed_fields_from_the_hpack_examples() {
    // RFC 7541 C.4.1 and C.4.2: Huffman-coded literals, static and dynamic
    // table references across two blocks of one connection.
    let first = [
        0x82, 0x86, 0x84, 0x41, 0x8c, 0xf1, 0xe3, 0xc2, 0xe5, 0xf2, 0x3a, 0x6b, 0xa0, 0xab, 0x90,
        0xf4, 0xff,
    ];
    let second = [
        0x82, 0x86, 0x84, 0xbe, 0x58, 0x86, 0xa8, 0xeb, 0x10, 0x64, 0x9c, 0xbf,
    ];
    let input = client_bytes(&[
        (FLAG_END_HEADERS, first.to_vec()),
        (FLAG_END_HEADERS, second.to_vec()),
    ]);
    let (out, _) = rewrite_all(&input);
    let lists = decoded_blocks(&out);
    assert_eq!(authority_of(&lists[0]), "www.example.com");
    assert_eq!(authority_of(&lists[1]), "www.example.com");
    assert!(lists[1].contains(&("cache-control".into(), "no-cache".into())));
}

#[test]
fn a_dynamic_table_entry_with_a_path_is_rewritten_every_time() {
    // The first block puts `:authority: PATH` into the dynamic table
    // (literal with incremental indexing), the second refers to it (index 62).
    let mut a = vec![0x83]; // :method POST
    a.push(0x41); // :authority (static name 1), indexed value follows
    encode_integer(SOCKET_PATH.len(), 7, 0, &mut a);
    a.extend_from_slice(SOCKET_PATH.as_bytes());
    let b = vec![0x83, 0xbe];
    let (out, r) = rewrite_all(&client_bytes(&[
        (FLAG_END_HEADERS, a),
        (FLAG_END_HEADERS | FLAG_END_STREAM, b),
    ]));
    let lists = decoded_blocks(&out);
    assert_eq!(authority_of(&lists[0]), LOCAL_AUTHORITY);
    assert_eq!(authority_of(&lists[1]), LOCAL_AUTHORITY);
    assert_eq!(r.rewritten(), 2);
    let f = frames(&out[PREFACE.len()..]);
    assert_eq!(f[2].1 & FLAG_END_STREAM, FLAG_END_STREAM);
}

#[test]
fn padding_priority_and_continuation_frames() {
    let block = headers_block(SOCKET_PATH);
    let (head, tail) = block.split_at(10);
    let mut payload = vec![3]; // pad length
    payload.extend_from_slice(&[0, 0, 0, 0, 16]); // priority
    payload.extend_from_slice(head);
    payload.extend_from_slice(&[0, 0, 0]);
    let mut input = PREFACE.to_vec();
    encode_frame(
        TYPE_HEADERS,
        FLAG_PADDED | FLAG_PRIORITY | FLAG_END_STREAM,
        1,
        &payload,
        &mut input,
    );
    encode_frame(TYPE_CONTINUATION, FLAG_END_HEADERS, 1, tail, &mut input);
    encode_frame(0x0, 0x1, 3, b"data passes", &mut input);
    let (out, _) = rewrite_all(&input);
    let f = frames(&out[PREFACE.len()..]);
    assert_eq!(f[0].0, TYPE_HEADERS);
    assert_eq!(f[0].1, FLAG_PRIORITY | FLAG_END_STREAM | FLAG_END_HEADERS);
    assert_eq!(&f[0].3[..5], &[0, 0, 0, 0, 16]);
    assert_eq!(f[1], (0x0, 0x1, 3, b"data passes".to_vec()));
    assert_eq!(authority_of(&decoded_blocks(&out)[0]), LOCAL_AUTHORITY);
}

#[test]
fn byte_by_byte_input_gives_the_same_bytes() {
    let mut input = client_bytes(&[(FLAG_END_HEADERS, headers_block(SOCKET_PATH))]);
    encode_frame(0x0, 0, 1, &[7; 300], &mut input);
    let (whole, _) = rewrite_all(&input);
    let mut r = AuthorityRewriter::new();
    let mut out = Vec::new();
    for b in &input {
        r.push(std::slice::from_ref(b), &mut out).unwrap();
    }
    assert_eq!(out, whole);
}

#[test]
fn large_blocks_are_split_into_default_sized_frames() {
    let mut block = headers_block(SOCKET_PATH);
    for i in 0..4 {
        encode_literal(format!("x-big-{i}").as_bytes(), &[b'v'; 9000], &mut block);
    }
    let mut input = PREFACE.to_vec();
    let (a, b) = block.split_at(block.len() / 2);
    encode_frame(TYPE_HEADERS, 0, 1, a, &mut input);
    encode_frame(TYPE_CONTINUATION, FLAG_END_HEADERS, 1, b, &mut input);
    let (out, _) = rewrite_all(&input);
    let f = frames(&out[PREFACE.len()..]);
    assert!(f.len() >= 3);
    assert!(f.iter().all(|fr| fr.3.len() <= MAX_FRAME_PAYLOAD));
    assert_eq!(f.last().unwrap().1, FLAG_END_HEADERS);
    assert_eq!(decoded_blocks(&out)[0].len(), 10);
}

#[test]
fn hostile_input_is_bounded() {
    // A block larger than the buffer bound is refused before it is read.
    let mut input = PREFACE.to_vec();
    input.extend_from_slice(&frame_header(
        MAX_HEADER_BLOCK_BYTES + 1,
        TYPE_HEADERS,
        0,
        1,
    ));
    let mut out = Vec::new();
    assert_eq!(
        AuthorityRewriter::new().push(&input, &mut out),
        Err(AuthorityError::BlockTooLarge)
    );
    // A small block that expands past the list bound through the dynamic
    // table: one 4000-byte entry, then many one-byte references to it.
    let mut block = Vec::new();
    block.push(0x40);
    encode_integer(5, 7, 0, &mut block);
    block.extend_from_slice(b"x-big");
    encode_integer(4000, 7, 0, &mut block);
    block.extend_from_slice(&[b'v'; 4000]);
    block.extend(std::iter::repeat_n(0xbe, 100)); // index 62: the entry
    let input = client_bytes(&[(FLAG_END_HEADERS, block)]);
    assert_eq!(
        AuthorityRewriter::new().push(&input, &mut Vec::new()),
        Err(AuthorityError::ListTooLarge)
    );
    // A DATA frame inside a header block is a protocol error.
    let mut input = PREFACE.to_vec();
    encode_frame(TYPE_HEADERS, 0, 1, &headers_block("x"), &mut input);
    encode_frame(0x0, 0, 1, b"", &mut input);
    assert_eq!(
        AuthorityRewriter::new().push(&input, &mut Vec::new()),
        Err(AuthorityError::Interleaved(0))
    );
    // A client never pushes: its PUSH_PROMISE carries a header block
    // that would desynchronise the HPACK tables.
    let mut input = PREFACE.to_vec();
    let mut promise = vec![0, 0, 0, 2];
    promise.extend_from_slice(&headers_block("x"));
    encode_frame(0x5, FLAG_END_HEADERS, 1, &promise, &mut input);
    assert_eq!(
        AuthorityRewriter::new().push(&input, &mut Vec::new()),
        Err(AuthorityError::PushPromise)
    );
    // So is a CONTINUATION of another stream.
    let mut input = PREFACE.to_vec();
    encode_frame(TYPE_HEADERS, 0, 1, &headers_block("x"), &mut input);
    encode_frame(TYPE_CONTINUATION, FLAG_END_HEADERS, 3, b"", &mut input);
    assert_eq!(
        AuthorityRewriter::new().push(&input, &mut Vec::new()),
        Err(AuthorityError::Interleaved(TYPE_CONTINUATION))
    );
}

#[test]
fn not_http2_passes_through() {
    let input = b"GET / HTTP/1.1\r\nHost: x\r\n\r\n";
    let (out, _) = rewrite_all(input);
    assert_eq!(out, input);
}

#[tokio::test]
async fn expanding_blocks_are_rewritten_as_h2_reads_them() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    // One 4000-byte table entry, then 200 small blocks of 15 references to
    // it: 5 KB that expand to 12 MB. The connection holds a bounded amount
    // of rewritten bytes however much one read from the socket expands.
    let mut entry = vec![0x40];
    encode_integer(5, 7, 0, &mut entry);
    entry.extend_from_slice(b"x-big");
    encode_integer(4000, 7, 0, &mut entry);
    entry.extend_from_slice(&[b'v'; 4000]);
    let mut input = client_bytes(&[(FLAG_END_HEADERS, entry)]);
    for _ in 0..200 {
        encode_frame(TYPE_HEADERS, FLAG_END_HEADERS, 1, &[0xbe; 15], &mut input);
    }
    let (mut client, server) = tokio::net::UnixStream::pair().unwrap();
    client.write_all(&input).await.unwrap();
    client.shutdown().await.unwrap();
    let mut conn = LocalConn::new(server);
    let mut buf = vec![0; 4096];
    let mut total = 0;
    loop {
        let n = conn.read(&mut buf).await.unwrap();
        if n == 0 {
            break;
        }
        total += n;
        assert!(
            conn.ready.capacity() <= 64 * 1024 + 2 * MAX_HEADER_LIST_BYTES,
            "{} bytes held",
            conn.ready.capacity()
        );
    }
    assert!(total > 200 * 15 * 4000, "everything came through: {total}");
}
