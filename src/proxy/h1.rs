//! The upstream hop's own HTTP/1.1 client, for the common request: no body and no upgrade. The
//! exchange runs in the request's task, on a socket the pool hands it: the request head is written
//! straight from the request's header map, the response head is parsed from the connection's
//! buffer, and the body is read from that socket as the client's connection asks for it.
//!
//! Why not hyper's client here: it drives each connection from a task of its own and hands it every
//! request through a channel, and the request's headers are first copied into a map of their own.
//! Measured under callgrind that was ~25k of the ~56k instructions of a proxied request. Requests
//! with a body (which must be written while the response may already be coming) and upgrades still
//! go through hyper's client, on the same pooled sockets ([`crate::proxy::forward`]).
//!
//! What is read, as RFC 9112 says: a status line and at most [`MAX_HEADERS`] fields within
//! [`MAX_HEAD_BYTES`]; 1xx responses skipped; no body for HEAD, 204 and 304; a chunked body when
//! Transfer-Encoding ends in `chunked` (Content-Length is then removed and the connection is not
//! reused), else Content-Length (several values must agree), else the body runs to the close.
//! Chunk extensions and trailer fields are read and dropped, within bounds. A connection is reused
//! only after its response was read to the end with nothing left over, and only when the upstream
//! keeps it open (HTTP/1.1 without `Connection: close`, or HTTP/1.0 with `keep-alive`).

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll, ready};

use bytes::{Buf, Bytes, BytesMut};
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::{Method, StatusCode, Version};
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::TcpStream;

/// The largest response head read (status line and fields).
pub const MAX_HEAD_BYTES: usize = 64 * 1024;
/// The most fields a response head may have (hyper's client allows as many).
pub const MAX_HEADERS: usize = 100;
/// Bytes asked of the socket at a time.
const READ_CHUNK: usize = 8 * 1024;
/// The longest chunk-size line, extensions included.
const MAX_CHUNK_LINE: usize = 4 * 1024;
/// The most trailer bytes read (and dropped) after a chunked body.
const MAX_TRAILER_BYTES: usize = 16 * 1024;

/// An upstream socket, plain or TLS.
pub enum Io {
    Plain(TcpStream),
    Tls(Box<tokio_rustls::client::TlsStream<TcpStream>>),
}

impl AsyncRead for Io {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Io::Plain(s) => Pin::new(s).poll_read(cx, buf),
            Io::Tls(s) => Pin::new(s.as_mut()).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for Io {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Io::Plain(s) => Pin::new(s).poll_write(cx, buf),
            Io::Tls(s) => Pin::new(s.as_mut()).poll_write(cx, buf),
        }
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Io::Plain(s) => Pin::new(s).poll_write_vectored(cx, bufs),
            Io::Tls(s) => Pin::new(s.as_mut()).poll_write_vectored(cx, bufs),
        }
    }

    fn is_write_vectored(&self) -> bool {
        match self {
            Io::Plain(s) => s.is_write_vectored(),
            Io::Tls(s) => s.is_write_vectored(),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Io::Plain(s) => Pin::new(s).poll_flush(cx),
            Io::Tls(s) => Pin::new(s.as_mut()).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Io::Plain(s) => Pin::new(s).poll_shutdown(cx),
            Io::Tls(s) => Pin::new(s.as_mut()).poll_shutdown(cx),
        }
    }
}

/// How a response body is delimited (RFC 9112 §6.3).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Framing {
    /// No body (HEAD, 204, 304).
    Empty,
    Length(u64),
    Chunked,
    /// Until the upstream closes the connection.
    Close,
}

/// A response head, parsed.
#[derive(Debug)]
pub struct Head {
    pub status: StatusCode,
    pub version: Version,
    pub headers: HeaderMap,
    pub framing: Framing,
    /// The upstream keeps the connection open after this response.
    pub keep_alive: bool,
    /// The `timeout=N` of its Keep-Alive field: when the upstream closes an idle connection.
    pub keep_alive_secs: Option<u64>,
    /// No hop-by-hop field is left in `headers`.
    pub cleaned: bool,
}

/// Why no response head was read.
#[derive(Debug)]
pub enum HeadError {
    /// The socket failed.
    Io(io::Error),
    /// The upstream closed the connection; `answered`: after sending part of a response.
    Closed { answered: bool },
    /// What came is not an HTTP/1.1 response head we accept.
    Invalid(String),
}

impl HeadError {
    /// The connection went away before any byte of a response: the request may not have reached
    /// the upstream at all (an idle connection it closed at that moment).
    pub fn lost_unanswered(&self) -> bool {
        match self {
            HeadError::Closed { answered } => !answered,
            HeadError::Io(e) => {
                use std::io::ErrorKind::*;
                matches!(
                    e.kind(),
                    ConnectionReset | ConnectionAborted | BrokenPipe | UnexpectedEof | NotConnected
                )
            }
            HeadError::Invalid(_) => false,
        }
    }
}

impl std::fmt::Display for HeadError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            HeadError::Io(e) => write!(f, "upstream connection failed: {e}"),
            HeadError::Closed { answered: false } => f.write_str("upstream closed the connection before responding"),
            HeadError::Closed { answered: true } => {
                f.write_str("upstream closed the connection in the middle of the response head")
            }
            HeadError::Invalid(why) => f.write_str(why),
        }
    }
}

/// Where a body read stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Decoder {
    Length(u64),
    Chunked(Chunk),
    Close,
    Done,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Chunk {
    /// Expecting a chunk-size line.
    Size,
    /// Bytes left in the current chunk.
    Data(u64),
    /// Expecting the CRLF after a chunk's data.
    DataEnd,
    /// After the last chunk: trailer bytes read so far, until the empty line.
    Trailers(usize),
}

impl Decoder {
    pub fn new(framing: Framing) -> Decoder {
        match framing {
            Framing::Empty | Framing::Length(0) => Decoder::Done,
            Framing::Length(n) => Decoder::Length(n),
            Framing::Chunked => Decoder::Chunked(Chunk::Size),
            Framing::Close => Decoder::Close,
        }
    }

    pub fn is_done(&self) -> bool {
        *self == Decoder::Done
    }
}

/// One upstream connection as this client holds it: the socket and what was read from it but not
/// used yet.
pub struct Wire {
    io: Io,
    buf: BytesMut,
}

fn invalid(why: impl Into<String>) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, why.into())
}

impl Wire {
    pub fn new(io: Io) -> Wire {
        Wire {
            io,
            buf: BytesMut::new(),
        }
    }

    /// The socket, for hyper's client to take over; only a connection with nothing unread is
    /// handed over.
    pub fn into_io(self) -> Option<Io> {
        self.buf.is_empty().then_some(self.io)
    }

    /// Can this idle connection take a request? A readable socket holds either bytes nobody asked
    /// for or the upstream's close (or an error): none of these is reused. Costs no system call
    /// unless the socket was readable (tokio knows from its last readiness event).
    pub fn is_quiet(&mut self) -> bool {
        if !self.buf.is_empty() {
            return false;
        }
        let mut cx = Context::from_waker(std::task::Waker::noop());
        self.poll_fill(&mut cx).is_pending()
    }

    fn poll_fill(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<usize>> {
        if self.buf.capacity() - self.buf.len() < 1024 {
            self.buf.reserve(READ_CHUNK);
        }
        tokio_util::io::poll_read_buf(Pin::new(&mut self.io), cx, &mut self.buf)
    }

    /// Writes (and flushes) a request head.
    pub async fn send(&mut self, head: &[u8]) -> io::Result<()> {
        self.io.write_all(head).await?;
        self.io.flush().await
    }

    /// Reads the head of the response to a `method` request, skipping 1xx responses.
    pub async fn read_head(&mut self, method: &Method) -> Result<Head, HeadError> {
        let mut answered = false;
        loop {
            if !self.buf.is_empty() {
                answered = true;
                match parse_head(&mut self.buf, method)? {
                    Parsed::Complete(head) => return Ok(head),
                    Parsed::Informational => continue,
                    Parsed::Partial if self.buf.len() >= MAX_HEAD_BYTES => {
                        return Err(HeadError::Invalid(format!(
                            "response head larger than {MAX_HEAD_BYTES} bytes"
                        )));
                    }
                    Parsed::Partial => {}
                }
            }
            let n = std::future::poll_fn(|cx| self.poll_fill(cx)).await.map_err(HeadError::Io)?;
            if n == 0 {
                return Err(HeadError::Closed { answered });
            }
        }
    }

    /// The next piece of a body; `Ready(None)` at its end.
    pub fn poll_body(&mut self, cx: &mut Context<'_>, dec: &mut Decoder) -> Poll<Option<io::Result<Bytes>>> {
        loop {
            match dec {
                Decoder::Done => return Poll::Ready(None),
                Decoder::Length(left) => {
                    if !self.buf.is_empty() {
                        let n = (*left).min(self.buf.len() as u64);
                        *left -= n;
                        let data = self.buf.split_to(n as usize).freeze();
                        if *left == 0 {
                            *dec = Decoder::Done;
                        }
                        return Poll::Ready(Some(Ok(data)));
                    }
                }
                Decoder::Close => {
                    if !self.buf.is_empty() {
                        return Poll::Ready(Some(Ok(self.buf.split().freeze())));
                    }
                }
                Decoder::Chunked(state) => match step_chunked(&mut self.buf, state) {
                    Err(e) => return Poll::Ready(Some(Err(e))),
                    Ok(Step::Data(data)) => return Poll::Ready(Some(Ok(data))),
                    Ok(Step::End) => {
                        *dec = Decoder::Done;
                        return Poll::Ready(None);
                    }
                    Ok(Step::Again) => continue,
                    Ok(Step::NeedMore) => {}
                },
            }
            let n = match ready!(self.poll_fill(cx)) {
                Ok(n) => n,
                Err(e) => return Poll::Ready(Some(Err(e))),
            };
            if n == 0 {
                if *dec == Decoder::Close {
                    *dec = Decoder::Done;
                    return Poll::Ready(None);
                }
                return Poll::Ready(Some(Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "upstream closed the connection before the end of the body",
                ))));
            }
        }
    }

    /// Nothing read beyond the response: the connection can serve another request.
    pub fn is_drained(&self) -> bool {
        self.buf.is_empty()
    }
}

/// Starts the head of a body-less request: `method target HTTP/1.1`.
pub fn encode_request_line(method: &Method, target: &str, out: &mut Vec<u8>) {
    out.extend_from_slice(method.as_str().as_bytes());
    out.push(b' ');
    out.extend_from_slice(target.as_bytes());
    out.extend_from_slice(b" HTTP/1.1\r\n");
}

/// One field line. Header names and values cannot hold CR or LF, so nothing can be smuggled in.
pub fn encode_field(name: &HeaderName, value: &HeaderValue, out: &mut Vec<u8>) {
    out.extend_from_slice(name.as_str().as_bytes());
    out.extend_from_slice(b": ");
    out.extend_from_slice(value.as_bytes());
    out.extend_from_slice(b"\r\n");
}

enum Parsed {
    Partial,
    /// A 1xx response other than 101, consumed.
    Informational,
    Complete(Head),
}

/// What the framing and connection fields of a response head say, gathered in the one pass
/// that builds its header map.
#[derive(Default)]
struct Fields {
    /// Content-Length: `Some(Ok(n))` when every value agrees, `Some(Err(()))` when not.
    length: Option<Result<u64, ()>>,
    /// Transfer-Encoding was present; its last coding is `chunked`.
    encoded: bool,
    chunked: bool,
    close: bool,
    keep_alive: bool,
    /// Connection names fields beyond `close`, `keep-alive` and `upgrade`: the map keeps the
    /// Connection field, for [`crate::proxy::headers::clean_response_headers`] to act on.
    names_others: bool,
    keep_alive_secs: Option<u64>,
}

impl Fields {
    /// Takes note of a field; `false`: it is hop-by-hop and stays out of the map.
    fn note(&mut self, name: &HeaderName, value: &[u8]) -> bool {
        if *name == header::CONTENT_LENGTH {
            let prev = self.length.take();
            self.length = Some(match (prev, content_length(value)) {
                (Some(Err(())), _) | (_, None) => Err(()),
                (Some(Ok(a)), Some(b)) if a != b => Err(()),
                (_, Some(b)) => Ok(b),
            });
            return true;
        }
        if *name == header::TRANSFER_ENCODING {
            self.encoded = true;
            self.chunked = value
                .rsplit(|&b| b == b',')
                .next()
                .is_some_and(|last| last.trim_ascii().eq_ignore_ascii_case(b"chunked"));
            return false;
        }
        if *name == header::CONNECTION {
            for token in value.split(|&b| b == b',').map(<[u8]>::trim_ascii) {
                if token.eq_ignore_ascii_case(b"close") {
                    self.close = true;
                } else if token.eq_ignore_ascii_case(b"keep-alive") {
                    self.keep_alive = true;
                } else if !token.is_empty() && !token.eq_ignore_ascii_case(b"upgrade") {
                    self.names_others = true;
                }
            }
            return self.names_others;
        }
        if name.as_str() == "keep-alive" {
            let secs = HeaderValue::from_bytes(value)
                .ok()
                .and_then(|v| crate::proxy::headers::keep_alive_timeout_of(&v));
            self.keep_alive_secs = match (self.keep_alive_secs, secs) {
                (Some(a), Some(b)) => Some(a.min(b)),
                (a, b) => a.or(b),
            };
            return false;
        }
        !crate::proxy::headers::is_hop_by_hop(name)
    }
}

/// Parses a response head at the start of `buf`; a complete one is taken out of `buf`.
/// Hop-by-hop fields are left out of its map (RFC 9110 §7.6.1), unless Connection names others:
/// then [`Head::cleaned`] is false and the caller cleans the map.
fn parse_head(buf: &mut BytesMut, method: &Method) -> Result<Parsed, HeadError> {
    // Names, and where the values are in `buf`, so that the values can share its bytes once the
    // head is split off. No array is zeroed here: at ~100 fields that cost more than the parse.
    let mut fields = [const { std::mem::MaybeUninit::<httparse::Header<'_>>::uninit() }; MAX_HEADERS];
    let mut resp = httparse::Response::new(&mut []);
    let len = match httparse::ParserConfig::default().parse_response_with_uninit_headers(&mut resp, buf, &mut fields) {
        Ok(httparse::Status::Complete(len)) => len,
        Ok(httparse::Status::Partial) => return Ok(Parsed::Partial),
        Err(e) => return Err(HeadError::Invalid(format!("malformed response head: {e}"))),
    };
    let code = resp.code.unwrap_or(0);
    let status =
        StatusCode::from_u16(code).map_err(|_| HeadError::Invalid(format!("invalid response status {code}")))?;
    if status.is_informational() {
        if status == StatusCode::SWITCHING_PROTOCOLS {
            return Err(HeadError::Invalid("101 to a request that asked no upgrade".into()));
        }
        buf.advance(len);
        return Ok(Parsed::Informational);
    }
    let version = if resp.version == Some(0) {
        Version::HTTP_10
    } else {
        Version::HTTP_11
    };
    let base = buf.as_ptr() as usize;
    let mut noted = Fields::default();
    let mut kept = Vec::with_capacity(resp.headers.len());
    for field in resp.headers.iter() {
        let name = HeaderName::from_bytes(field.name.as_bytes())
            .map_err(|_| HeadError::Invalid("invalid response header name".into()))?;
        if noted.note(&name, field.value) {
            kept.push((name, field.value.as_ptr() as usize - base, field.value.len()));
        }
    }
    let bytes = buf.split_to(len).freeze();
    let mut headers = HeaderMap::with_capacity(kept.len());
    for (name, at, len) in kept {
        let value = HeaderValue::from_maybe_shared(bytes.slice(at..at + len))
            .map_err(|_| HeadError::Invalid(format!("invalid value of response header {name}")))?;
        headers.append(name, value);
    }
    let (framing, reusable) = framing(&noted, status, version, method)?;
    if noted.encoded && noted.length.is_some() {
        // Transfer-Encoding wins, and the Content-Length must not travel on (RFC 9112 §6.3).
        headers.remove(header::CONTENT_LENGTH);
    }
    let keep_alive = reusable
        && framing != Framing::Close
        && match version {
            Version::HTTP_11 => !noted.close,
            _ => noted.keep_alive && !noted.close,
        };
    Ok(Parsed::Complete(Head {
        status,
        version,
        headers,
        framing,
        keep_alive,
        keep_alive_secs: noted.keep_alive_secs,
        cleaned: !noted.names_others,
    }))
}

/// How the body is delimited, and whether the connection may be reused after it.
fn framing(noted: &Fields, status: StatusCode, version: Version, method: &Method) -> Result<(Framing, bool), HeadError> {
    if *method == Method::HEAD || status == StatusCode::NO_CONTENT || status == StatusCode::NOT_MODIFIED {
        return Ok((Framing::Empty, true));
    }
    if noted.encoded {
        if version == Version::HTTP_10 {
            return Err(HeadError::Invalid("Transfer-Encoding in an HTTP/1.0 response".into()));
        }
        // With a Content-Length too, the upstream is confused: its connection is not reused.
        return Ok(if noted.chunked {
            (Framing::Chunked, noted.length.is_none())
        } else {
            (Framing::Close, false)
        });
    }
    match noted.length {
        Some(Ok(n)) => Ok((Framing::Length(n), true)),
        Some(Err(())) => Err(HeadError::Invalid("invalid or conflicting Content-Length".into())),
        None => Ok((Framing::Close, false)),
    }
}

/// A Content-Length value: one number, or a list of the same number.
fn content_length(value: &[u8]) -> Option<u64> {
    let mut length = None;
    for item in value.split(|&b| b == b',') {
        let item = item.trim_ascii();
        if item.is_empty() || item.len() > 19 || !item.iter().all(u8::is_ascii_digit) {
            return None;
        }
        let n = item.iter().fold(0u64, |n, &d| n * 10 + u64::from(d - b'0'));
        match length {
            Some(l) if l != n => return None,
            _ => length = Some(n),
        }
    }
    length
}

enum Step {
    Data(Bytes),
    End,
    /// State changed; look again.
    Again,
    NeedMore,
}

fn line_end(buf: &[u8], limit: usize) -> Option<usize> {
    buf[..buf.len().min(limit)].iter().position(|&b| b == b'\n')
}

fn step_chunked(buf: &mut BytesMut, state: &mut Chunk) -> io::Result<Step> {
    match state {
        Chunk::Size => {
            let Some(nl) = line_end(buf, MAX_CHUNK_LINE) else {
                if buf.len() >= MAX_CHUNK_LINE {
                    return Err(invalid("chunk size line too long"));
                }
                return Ok(Step::NeedMore);
            };
            let line = buf[..nl]
                .strip_suffix(b"\r")
                .ok_or_else(|| invalid("chunk size line without CRLF"))?;
            let digits = line.iter().take_while(|b| b.is_ascii_hexdigit()).count();
            if digits == 0 || digits > 16 {
                return Err(invalid("invalid chunk size"));
            }
            let size = line[..digits]
                .iter()
                .fold(0u64, |n, &d| (n << 4) | u64::from((d as char).to_digit(16).unwrap_or(0)));
            let rest = &line[digits..];
            let rest = &rest[rest.iter().take_while(|&&b| b == b' ' || b == b'\t').count()..];
            if !(rest.is_empty() || rest[0] == b';') || rest.contains(&b'\r') {
                return Err(invalid("invalid chunk size line"));
            }
            buf.advance(nl + 1);
            *state = if size == 0 { Chunk::Trailers(0) } else { Chunk::Data(size) };
            Ok(Step::Again)
        }
        Chunk::Data(left) => {
            if buf.is_empty() {
                return Ok(Step::NeedMore);
            }
            let n = (*left).min(buf.len() as u64);
            *left -= n;
            if *left == 0 {
                *state = Chunk::DataEnd;
            }
            Ok(Step::Data(buf.split_to(n as usize).freeze()))
        }
        Chunk::DataEnd => {
            if buf.len() < 2 {
                return Ok(Step::NeedMore);
            }
            if &buf[..2] != b"\r\n" {
                return Err(invalid("chunk data not followed by CRLF"));
            }
            buf.advance(2);
            *state = Chunk::Size;
            Ok(Step::Again)
        }
        Chunk::Trailers(seen) => {
            let limit = MAX_TRAILER_BYTES - *seen;
            let Some(nl) = line_end(buf, limit) else {
                if buf.len() >= limit {
                    return Err(invalid("chunked trailer section too long"));
                }
                return Ok(Step::NeedMore);
            };
            if !buf[..nl].ends_with(b"\r") {
                return Err(invalid("trailer line without CRLF"));
            }
            let empty = nl == 1;
            buf.advance(nl + 1);
            if empty {
                return Ok(Step::End);
            }
            *seen += nl + 1;
            Ok(Step::Again)
        }
    }
}
