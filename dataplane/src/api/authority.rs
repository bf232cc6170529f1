//! Any `:authority` reaches the unix-socket API.
//!
//! The HTTP/2 layer under tonic (h2) resets every request whose `:authority`
//! is not a URI authority (`RST_STREAM` with `PROTOCOL_ERROR`), and several
//! gRPC stacks (grpcio, grpc-java, grpc-swift) send the socket path there
//! (`/run/l2mesh/dataplane.sock`, or `%2Frun%2F...`) when they dial a unix
//! socket. On a local socket the authority names nothing, so the bytes from
//! the client pass through [`AuthorityRewriter`] before h2 reads them: it
//! decodes each header block (HPACK), replaces an `:authority` that is not a
//! valid authority with `localhost`, and encodes the block again. Every block
//! is re-encoded without indexing, so h2's HPACK table stays empty and never
//! disagrees with the client's. All other frames pass through unchanged and
//! unbuffered; the bytes to the client are not touched.

use std::fmt;
use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::UnixStream;
use tonic::transport::server::{Connected, UdsConnectInfo};

/// What an invalid `:authority` becomes.
pub const LOCAL_AUTHORITY: &str = "localhost";
/// The largest decoded header list accepted in one block (names, values and
/// 32 bytes per field, as HTTP/2 counts it). gRPC requests carry a few hundred
/// bytes; the bound keeps a block of references to a large table entry from
/// expanding without limit.
pub const MAX_HEADER_LIST_BYTES: usize = 64 * 1024;
/// The largest encoded header block (all its frames) that is buffered.
pub const MAX_HEADER_BLOCK_BYTES: usize = 64 * 1024;
/// Frames written towards h2 stay within the HTTP/2 default frame size,
/// which every peer must accept.
const MAX_FRAME_PAYLOAD: usize = 16_384;
/// The client's HPACK table may not exceed HTTP/2's default, which the server
/// never raises.
const HPACK_TABLE_BYTES: usize = 4096;

const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
const FRAME_HEADER: usize = 9;
const TYPE_HEADERS: u8 = 0x1;
const TYPE_PUSH_PROMISE: u8 = 0x5;
const TYPE_CONTINUATION: u8 = 0x9;
const FLAG_END_STREAM: u8 = 0x1;
const FLAG_END_HEADERS: u8 = 0x4;
const FLAG_PADDED: u8 = 0x8;
const FLAG_PRIORITY: u8 = 0x20;

/// Why a connection was closed by the rewriter.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AuthorityError {
    #[error("HTTP/2 header block over {MAX_HEADER_BLOCK_BYTES} bytes")]
    BlockTooLarge,
    #[error("HTTP/2 header list over {MAX_HEADER_LIST_BYTES} bytes")]
    ListTooLarge,
    #[error("HTTP/2 frame of type {0:#x} inside a header block")]
    Interleaved(u8),
    #[error("malformed HTTP/2 HEADERS frame (padding or priority longer than the frame)")]
    BadHeaders,
    #[error("HPACK decoding failed: {0}")]
    Hpack(String),
    #[error("PUSH_PROMISE from a client")]
    PushPromise,
}

enum State {
    /// Reading the client preface; anything else passes through untouched
    /// (h2 then refuses it).
    Preface,
    /// Not HTTP/2: every byte passes through.
    Opaque,
    /// Waiting for a frame header.
    Frame,
    /// Forwarding this many payload bytes of a frame that is not a header
    /// block.
    Forward(usize),
    /// Buffering this many payload bytes of a HEADERS or CONTINUATION frame.
    Headers {
        kind: u8,
        flags: u8,
        stream: u32,
        len: usize,
    },
}

/// A header block collected over HEADERS and CONTINUATION frames.
struct Block {
    stream: u32,
    end_stream: bool,
    priority: Option<[u8; 5]>,
    fragment: Vec<u8>,
}

/// The sans-IO rewriter of the client-to-server bytes of one connection.
pub struct AuthorityRewriter {
    state: State,
    pending: Vec<u8>,
    block: Option<Block>,
    decoder: loona_hpack::Decoder<'static>,
    rewritten: u64,
}

impl fmt::Debug for AuthorityRewriter {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AuthorityRewriter")
            .field("pending", &self.pending.len())
            .field("in_block", &self.block.is_some())
            .field("rewritten", &self.rewritten)
            .finish()
    }
}

impl Default for AuthorityRewriter {
    fn default() -> Self {
        Self::new()
    }
}

impl AuthorityRewriter {
    pub fn new() -> Self {
        let mut decoder = loona_hpack::Decoder::new();
        decoder.set_max_allowed_table_size(HPACK_TABLE_BYTES);
        Self {
            state: State::Preface,
            pending: Vec::new(),
            block: None,
            decoder,
            rewritten: 0,
        }
    }

    /// How many `:authority` values were replaced so far.
    pub fn rewritten(&self) -> u64 {
        self.rewritten
    }

    /// Takes bytes read from the client and appends what h2 should read to
    /// `out`. Bytes of an incomplete frame header or header frame are kept
    /// until the next call.
    pub fn push(&mut self, input: &[u8], out: &mut Vec<u8>) -> Result<(), AuthorityError> {
        self.push_some(input, out, usize::MAX).map(|_| ())
    }

    /// Like [`push`](Self::push), but stops after the header block that
    /// makes `out` reach `limit` bytes; returns how much of `input` it took.
    /// A block of one-byte references to a large table entry expands a
    /// thousandfold, so a reader that rewrote a whole read at once could be
    /// made to hold megabytes per connection.
    pub fn push_some(
        &mut self,
        mut input: &[u8],
        out: &mut Vec<u8>,
        limit: usize,
    ) -> Result<usize, AuthorityError> {
        let given = input.len();
        loop {
            match self.state {
                State::Opaque => {
                    out.extend_from_slice(input);
                    return Ok(given);
                }
                State::Forward(n) => {
                    let take = n.min(input.len());
                    out.extend_from_slice(&input[..take]);
                    input = &input[take..];
                    self.state = if take == n {
                        State::Frame
                    } else {
                        State::Forward(n - take)
                    };
                    if input.is_empty() {
                        return Ok(given);
                    }
                }
                State::Preface => {
                    let need = PREFACE.len() - self.pending.len();
                    let take = need.min(input.len());
                    self.pending.extend_from_slice(&input[..take]);
                    input = &input[take..];
                    if !PREFACE.starts_with(&self.pending) {
                        out.append(&mut self.pending);
                        self.state = State::Opaque;
                        continue;
                    }
                    if self.pending.len() < PREFACE.len() {
                        return Ok(given);
                    }
                    out.append(&mut self.pending);
                    self.state = State::Frame;
                }
                State::Frame => {
                    let take = (FRAME_HEADER - self.pending.len()).min(input.len());
                    self.pending.extend_from_slice(&input[..take]);
                    input = &input[take..];
                    if self.pending.len() < FRAME_HEADER {
                        return Ok(given);
                    }
                    let h = &self.pending;
                    let len = usize::from(h[0]) << 16 | usize::from(h[1]) << 8 | usize::from(h[2]);
                    let kind = h[3];
                    let flags = h[4];
                    let stream = u32::from_be_bytes([h[5], h[6], h[7], h[8]]) & 0x7fff_ffff;
                    if kind == TYPE_HEADERS || kind == TYPE_CONTINUATION {
                        let buffered = self.block.as_ref().map_or(0, |b| b.fragment.len());
                        if buffered + len > MAX_HEADER_BLOCK_BYTES {
                            return Err(AuthorityError::BlockTooLarge);
                        }
                        self.pending.clear();
                        self.state = State::Headers {
                            kind,
                            flags,
                            stream,
                            len,
                        };
                    } else {
                        if self.block.is_some() {
                            return Err(AuthorityError::Interleaved(kind));
                        }
                        // Its header block would change the client's HPACK
                        // table behind the rewriter's back; only servers
                        // push, and h2 would end the connection anyway.
                        if kind == TYPE_PUSH_PROMISE {
                            return Err(AuthorityError::PushPromise);
                        }
                        out.append(&mut self.pending);
                        self.state = State::Forward(len);
                    }
                }
                State::Headers {
                    kind,
                    flags,
                    stream,
                    len,
                } => {
                    let take = (len - self.pending.len()).min(input.len());
                    self.pending.extend_from_slice(&input[..take]);
                    input = &input[take..];
                    if self.pending.len() < len {
                        return Ok(given);
                    }
                    let payload = std::mem::take(&mut self.pending);
                    self.state = State::Frame;
                    self.header_frame(kind, flags, stream, &payload, out)?;
                    if out.len() >= limit {
                        return Ok(given - input.len());
                    }
                }
            }
        }
    }

    fn header_frame(
        &mut self,
        kind: u8,
        flags: u8,
        stream: u32,
        payload: &[u8],
        out: &mut Vec<u8>,
    ) -> Result<(), AuthorityError> {
        if kind == TYPE_HEADERS {
            if self.block.is_some() {
                return Err(AuthorityError::Interleaved(kind));
            }
            let mut body = payload;
            let mut pad = 0;
            if flags & FLAG_PADDED != 0 {
                let (&p, rest) = body.split_first().ok_or(AuthorityError::BadHeaders)?;
                pad = usize::from(p);
                body = rest;
            }
            let mut priority = None;
            if flags & FLAG_PRIORITY != 0 {
                let (p, rest) = body
                    .split_first_chunk::<5>()
                    .ok_or(AuthorityError::BadHeaders)?;
                priority = Some(*p);
                body = rest;
            }
            let body = body
                .get(
                    ..body
                        .len()
                        .checked_sub(pad)
                        .ok_or(AuthorityError::BadHeaders)?,
                )
                .ok_or(AuthorityError::BadHeaders)?;
            self.block = Some(Block {
                stream,
                end_stream: flags & FLAG_END_STREAM != 0,
                priority,
                fragment: body.to_vec(),
            });
        } else {
            match self.block.as_mut() {
                Some(b) if b.stream == stream => b.fragment.extend_from_slice(payload),
                // Passed on, it would reach h2 ahead of the block it
                // interrupts; a connection error either way.
                Some(_) => return Err(AuthorityError::Interleaved(kind)),
                // A CONTINUATION without its HEADERS: h2 refuses it itself.
                None => {
                    out.extend_from_slice(&frame_header(payload.len(), kind, flags, stream));
                    out.extend_from_slice(payload);
                    return Ok(());
                }
            }
        }
        if flags & FLAG_END_HEADERS == 0 {
            return Ok(());
        }
        let Some(block) = self.block.take() else {
            return Ok(());
        };
        let encoded = self.reencode(&block.fragment)?;
        write_block(&block, &encoded, out);
        Ok(())
    }

    /// Decodes one header block and encodes it again, literally, with a
    /// valid `:authority`.
    fn reencode(&mut self, fragment: &[u8]) -> Result<Vec<u8>, AuthorityError> {
        let mut encoded = Vec::with_capacity(fragment.len() + 64);
        let mut list_bytes = 0usize;
        let mut too_large = false;
        let mut rewritten = 0;
        self.decoder
            .decode_with_cb(fragment, |name, value| {
                list_bytes += name.len() + value.len() + 32;
                if list_bytes > MAX_HEADER_LIST_BYTES {
                    too_large = true;
                    return;
                }
                if too_large {
                    return;
                }
                let value: &[u8] = if &*name == b":authority" && !valid_authority(&value) {
                    rewritten += 1;
                    LOCAL_AUTHORITY.as_bytes()
                } else {
                    &value
                };
                encode_literal(&name, value, &mut encoded);
            })
            .map_err(|e| AuthorityError::Hpack(format!("{e:?}")))?;
        if too_large {
            return Err(AuthorityError::ListTooLarge);
        }
        self.rewritten += rewritten;
        Ok(encoded)
    }
}

fn valid_authority(value: &[u8]) -> bool {
    http::uri::Authority::try_from(value).is_ok()
}

fn frame_header(len: usize, kind: u8, flags: u8, stream: u32) -> [u8; FRAME_HEADER] {
    let l = u32::try_from(len).unwrap_or(u32::MAX).to_be_bytes();
    let s = stream.to_be_bytes();
    [l[1], l[2], l[3], kind, flags, s[0], s[1], s[2], s[3]]
}

/// Writes a block as one HEADERS frame and as many CONTINUATION frames as
/// the default frame size needs.
fn write_block(block: &Block, encoded: &[u8], out: &mut Vec<u8>) {
    let prio_len = if block.priority.is_some() { 5 } else { 0 };
    let first_len = encoded.len().min(MAX_FRAME_PAYLOAD - prio_len);
    let (first, mut rest) = encoded.split_at(first_len);
    let mut flags = 0;
    if block.end_stream {
        flags |= FLAG_END_STREAM;
    }
    if block.priority.is_some() {
        flags |= FLAG_PRIORITY;
    }
    if rest.is_empty() {
        flags |= FLAG_END_HEADERS;
    }
    out.extend_from_slice(&frame_header(
        first.len() + prio_len,
        TYPE_HEADERS,
        flags,
        block.stream,
    ));
    if let Some(p) = block.priority {
        out.extend_from_slice(&p);
    }
    out.extend_from_slice(first);
    while !rest.is_empty() {
        let (chunk, tail) = rest.split_at(rest.len().min(MAX_FRAME_PAYLOAD));
        rest = tail;
        let flags = if rest.is_empty() { FLAG_END_HEADERS } else { 0 };
        out.extend_from_slice(&frame_header(
            chunk.len(),
            TYPE_CONTINUATION,
            flags,
            block.stream,
        ));
        out.extend_from_slice(chunk);
    }
}

/// HPACK integer with an `n`-bit prefix (RFC 7541 section 5.1); `first`
/// holds the representation's bits above the prefix.
fn encode_integer(mut value: usize, n: u8, first: u8, out: &mut Vec<u8>) {
    let max = (1usize << n) - 1;
    if value < max {
        out.push(first | value as u8);
        return;
    }
    out.push(first | max as u8);
    value -= max;
    while value >= 128 {
        out.push((value % 128) as u8 | 0x80);
        value /= 128;
    }
    out.push(value as u8);
}

/// A literal header field without indexing, new name, no Huffman coding.
pub fn encode_literal(name: &[u8], value: &[u8], out: &mut Vec<u8>) {
    out.push(0);
    encode_integer(name.len(), 7, 0, out);
    out.extend_from_slice(name);
    encode_integer(value.len(), 7, 0, out);
    out.extend_from_slice(value);
}

/// One HTTP/2 frame, for tests and clients that speak HTTP/2 by hand.
pub fn encode_frame(kind: u8, flags: u8, stream: u32, payload: &[u8], out: &mut Vec<u8>) {
    out.extend_from_slice(&frame_header(payload.len(), kind, flags, stream));
    out.extend_from_slice(payload);
}

/// What [`LocalConn`] rewrites ahead of h2's reads, at most (plus one
/// header block).
const READY_LIMIT: usize = 64 * 1024;

/// A unix-socket connection whose incoming bytes pass through an
/// [`AuthorityRewriter`].
#[derive(Debug)]
pub struct LocalConn {
    inner: UnixStream,
    rewriter: AuthorityRewriter,
    /// Rewritten bytes for h2, from `ready_pos` on.
    ready: Vec<u8>,
    ready_pos: usize,
    /// Bytes read from the socket, not yet rewritten from `unread` on.
    scratch: Box<[u8]>,
    unread: std::ops::Range<usize>,
}

impl LocalConn {
    pub fn new(inner: UnixStream) -> Self {
        Self {
            inner,
            rewriter: AuthorityRewriter::new(),
            ready: Vec::new(),
            ready_pos: 0,
            scratch: vec![0; 16 * 1024].into_boxed_slice(),
            unread: 0..0,
        }
    }
}

impl Connected for LocalConn {
    type ConnectInfo = UdsConnectInfo;

    fn connect_info(&self) -> Self::ConnectInfo {
        self.inner.connect_info()
    }
}

impl AsyncRead for LocalConn {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        loop {
            if this.ready_pos < this.ready.len() {
                let n = (this.ready.len() - this.ready_pos).min(buf.remaining());
                buf.put_slice(&this.ready[this.ready_pos..this.ready_pos + n]);
                this.ready_pos += n;
                if this.ready_pos == this.ready.len() {
                    this.ready.clear();
                    this.ready_pos = 0;
                }
                return Poll::Ready(Ok(()));
            }
            if !this.unread.is_empty() {
                let taken = this
                    .rewriter
                    .push_some(
                        &this.scratch[this.unread.clone()],
                        &mut this.ready,
                        READY_LIMIT,
                    )
                    .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))?;
                this.unread.start += taken;
                continue;
            }
            let mut rb = ReadBuf::new(&mut this.scratch);
            match Pin::new(&mut this.inner).poll_read(cx, &mut rb) {
                Poll::Pending => return Poll::Pending,
                Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                Poll::Ready(Ok(())) => {
                    let got = rb.filled().len();
                    if got == 0 {
                        return Poll::Ready(Ok(()));
                    }
                    this.unread = 0..got;
                }
            }
        }
    }
}

impl AsyncWrite for LocalConn {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
#[path = "authority_tests.rs"]
mod tests;

#[cfg(test)]
#[path = "authority_prop_tests.rs"]
mod prop_tests;
