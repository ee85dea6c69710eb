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

use bytes::{Buf, BufMut, Bytes, BytesMut};
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::{Method, StatusCode, Version};
use tokio::io::AsyncWriteExt;
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

/// An upstream socket, plain (`Left`) or TLS (`Right`).
pub type Io = tokio_util::either::Either<TcpStream, Box<tokio_rustls::client::TlsStream<TcpStream>>>;

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
    /// The socket failed; `answered`: after part of a response had come.
    Io { error: io::Error, answered: bool },
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
            HeadError::Io { error, answered } => {
                use std::io::ErrorKind::*;
                !answered
                    && matches!(
                        error.kind(),
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
            HeadError::Io { error, .. } => write!(f, "upstream connection failed: {error}"),
            HeadError::Closed { answered: false } => f.write_str("upstream closed the connection before responding"),
            HeadError::Closed { answered: true } => {
                f.write_str("upstream closed the connection in the middle of a response")
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
    /// The request head being written, kept between requests (up to [`KEPT_HEAD_BUFFER`]) so
    /// that writing one allocates nothing.
    out: Vec<u8>,
}

/// The largest request-head buffer kept for the next request.
const KEPT_HEAD_BUFFER: usize = 4 * 1024;

fn invalid(why: impl Into<String>) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, why.into())
}

impl Wire {
    pub fn new(io: Io) -> Wire {
        Wire {
            io,
            buf: BytesMut::new(),
            out: Vec::new(),
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
        // Outside tokio's task budget: once a busy task (an HTTP/2 connection serving many
        // streams) has spent it, tokio answers every readiness poll `Pending` without looking,
        // which would pass a closed connection, or one holding stray bytes, as quiet.
        let look = tokio::task::coop::unconstrained(std::future::poll_fn(|cx| self.poll_fill(cx, usize::MAX)));
        std::pin::pin!(look).poll(&mut cx).is_pending()
    }

    /// Reads what the socket has, at most `limit` bytes.
    fn poll_fill(&mut self, cx: &mut Context<'_>, limit: usize) -> Poll<io::Result<usize>> {
        if self.buf.capacity() - self.buf.len() < 1024 {
            self.buf.reserve(READ_CHUNK);
        }
        let buf = &mut self.buf;
        tokio_util::io::poll_read_buf(Pin::new(&mut self.io), cx, &mut buf.limit(limit))
    }

    /// An empty buffer to write a request head into, for [`Wire::send_head`].
    pub fn head_buf(&mut self) -> &mut Vec<u8> {
        self.out.clear();
        &mut self.out
    }

    /// Writes (and flushes) the head written into [`Wire::head_buf`].
    pub async fn send_head(&mut self) -> io::Result<()> {
        self.io.write_all(&self.out).await?;
        self.io.flush().await?;
        if self.out.capacity() > KEPT_HEAD_BUFFER {
            self.out = Vec::new();
        }
        Ok(())
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
            // Never more than the bound: a head is refused at MAX_HEAD_BYTES, not at whatever one
            // read past it happened to complete.
            let room = MAX_HEAD_BYTES - self.buf.len();
            let n = std::future::poll_fn(|cx| self.poll_fill(cx, room))
                .await
                .map_err(|error| HeadError::Io { error, answered })?;
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
                        let data = take(&mut self.buf, left);
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
            let n = match ready!(self.poll_fill(cx, usize::MAX)) {
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
    out.reserve(name.as_str().len() + value.len() + 4);
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
        if *name == crate::proxy::headers::KEEP_ALIVE {
            let secs = crate::proxy::headers::keep_alive_timeout_of(value);
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
fn framing(
    noted: &Fields,
    status: StatusCode,
    version: Version,
    method: &Method,
) -> Result<(Framing, bool), HeadError> {
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

/// As much of the `left` bytes still due as `buf` holds (`buf` is not empty).
fn take(buf: &mut BytesMut, left: &mut u64) -> Bytes {
    let n = (*left).min(buf.len() as u64);
    *left -= n;
    buf.split_to(n as usize).freeze()
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
            let size = line[..digits].iter().fold(0u64, |n, &d| {
                (n << 4) | u64::from((d as char).to_digit(16).unwrap_or(0))
            });
            let rest = &line[digits..];
            let rest = &rest[rest.iter().take_while(|&&b| b == b' ' || b == b'\t').count()..];
            if !(rest.is_empty() || rest[0] == b';') || rest.contains(&b'\r') {
                return Err(invalid("invalid chunk size line"));
            }
            buf.advance(nl + 1);
            *state = if size == 0 {
                Chunk::Trailers(0)
            } else {
                Chunk::Data(size)
            };
            Ok(Step::Again)
        }
        Chunk::Data(left) => {
            if buf.is_empty() {
                return Ok(Step::NeedMore);
            }
            let data = take(buf, left);
            if *left == 0 {
                *state = Chunk::DataEnd;
            }
            Ok(Step::Data(data))
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

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(raw: &str, method: &Method) -> (Result<Parsed, HeadError>, BytesMut) {
        let mut buf = BytesMut::from(raw);
        let parsed = parse_head(&mut buf, method);
        (parsed, buf)
    }

    fn head(raw: &str) -> (Head, BytesMut) {
        match parse(raw, &Method::GET) {
            (Ok(Parsed::Complete(head)), rest) => (head, rest),
            (other, _) => panic!("not a complete head: {:?}", other.err()),
        }
    }

    fn refused(raw: &str) -> String {
        match parse(raw, &Method::GET).0 {
            Err(HeadError::Invalid(why)) => why,
            Err(e) => panic!("refused, but not as invalid: {e}"),
            Ok(_) => panic!("accepted: {raw:?}"),
        }
    }

    #[test]
    fn a_head_is_split_off_and_its_body_bytes_stay_in_the_buffer() {
        let (h, rest) = head("HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: 5\r\n\r\nhel");
        assert_eq!(h.status, StatusCode::OK);
        assert_eq!(h.framing, Framing::Length(5));
        assert!(h.keep_alive && h.cleaned);
        assert_eq!(h.headers["content-type"], "text/plain");
        assert_eq!(h.headers["content-length"], "5");
        assert_eq!(&rest[..], b"hel");
    }

    #[test]
    fn a_partial_head_leaves_the_buffer_as_it_was() {
        let (parsed, rest) = parse("HTTP/1.1 200 OK\r\nContent-Len", &Method::GET);
        assert!(matches!(parsed, Ok(Parsed::Partial)));
        assert_eq!(&rest[..], b"HTTP/1.1 200 OK\r\nContent-Len");
    }

    #[test]
    fn hop_by_hop_fields_stay_out_of_the_map_and_keep_alive_timeout_is_read() {
        let (h, _) = head(
            "HTTP/1.1 200 OK\r\nConnection: keep-alive\r\nKeep-Alive: timeout=5, max=100\r\n\
             Proxy-Authenticate: Basic\r\nTrailer: x\r\nUpgrade: h2c\r\nContent-Length: 0\r\nX-Kept: 1\r\n\r\n",
        );
        let names: Vec<&str> = h.headers.keys().map(|n| n.as_str()).collect();
        assert_eq!(names, ["content-length", "x-kept"]);
        assert!(h.cleaned);
        assert_eq!(h.keep_alive_secs, Some(5));
    }

    #[test]
    fn a_connection_field_naming_others_is_kept_for_the_caller_to_clean() {
        let (h, _) = head("HTTP/1.1 200 OK\r\nConnection: x-internal\r\nX-Internal: s\r\nContent-Length: 0\r\n\r\n");
        assert!(!h.cleaned);
        assert_eq!(h.headers["connection"], "x-internal");
        let mut headers = h.headers;
        crate::proxy::headers::clean_response_headers(&mut headers, false);
        assert!(headers.get("x-internal").is_none() && headers.get("connection").is_none());
    }

    #[test]
    fn informational_responses_are_consumed_and_101_is_refused() {
        let mut buf = BytesMut::from("HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 204 No Content\r\n\r\n");
        assert!(matches!(parse_head(&mut buf, &Method::GET), Ok(Parsed::Informational)));
        assert!(matches!(
            parse_head(&mut buf, &Method::GET),
            Ok(Parsed::Complete(Head {
                framing: Framing::Empty,
                ..
            }))
        ));
        assert!(buf.is_empty());
        assert!(refused("HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n\r\n").contains("101"));
    }

    #[test]
    fn framing_follows_rfc_9112() {
        let framing = |raw: &str, method: &Method| match parse(raw, method).0 {
            Ok(Parsed::Complete(h)) => (h.framing, h.keep_alive),
            _ => panic!("{raw:?}"),
        };
        let get = &Method::GET;
        // No body for HEAD, 204 and 304, whatever the length says.
        assert_eq!(
            framing("HTTP/1.1 200 OK\r\nContent-Length: 9\r\n\r\n", &Method::HEAD),
            (Framing::Empty, true)
        );
        assert_eq!(
            framing("HTTP/1.1 304 Not Modified\r\nContent-Length: 9\r\n\r\n", get),
            (Framing::Empty, true)
        );
        // A list of one repeated length is that length.
        assert_eq!(
            framing("HTTP/1.1 200 OK\r\nContent-Length: 3, 3\r\n\r\n", get),
            (Framing::Length(3), true)
        );
        // Chunked last: chunked; another coding last: to the close.
        assert_eq!(
            framing("HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip, chunked\r\n\r\n", get),
            (Framing::Chunked, true)
        );
        assert_eq!(
            framing("HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked, gzip\r\n\r\n", get),
            (Framing::Close, false)
        );
        // Neither: to the close, and the connection is not reused.
        assert_eq!(framing("HTTP/1.1 200 OK\r\n\r\n", get), (Framing::Close, false));
        // Connection: close, and HTTP/1.0 unless it asks for keep-alive.
        assert_eq!(
            framing("HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: 0\r\n\r\n", get),
            (Framing::Length(0), false)
        );
        assert_eq!(
            framing("HTTP/1.0 200 OK\r\nContent-Length: 0\r\n\r\n", get),
            (Framing::Length(0), false)
        );
        assert_eq!(
            framing(
                "HTTP/1.0 200 OK\r\nConnection: Keep-Alive\r\nContent-Length: 0\r\n\r\n",
                get
            ),
            (Framing::Length(0), true)
        );
    }

    #[test]
    fn both_a_length_and_chunked_is_chunked_without_the_length_and_not_reused() {
        let (h, _) = head("HTTP/1.1 200 OK\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n");
        assert_eq!((h.framing, h.keep_alive), (Framing::Chunked, false));
        assert!(h.headers.get("content-length").is_none() && h.headers.get("transfer-encoding").is_none());
    }

    #[test]
    fn malformed_heads_are_refused() {
        refused("HTTP/1.1 200 OK\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\n");
        refused("HTTP/1.1 200 OK\r\nContent-Length: 5, 6\r\n\r\n");
        refused("HTTP/1.1 200 OK\r\nContent-Length: +5\r\n\r\n");
        refused("HTTP/1.1 200 OK\r\nContent-Length: 99999999999999999999\r\n\r\n");
        refused("HTTP/1.0 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n");
        refused("SMTP ready\r\n\r\n");
        refused("HTTP/1.1 200 OK\r\nBad Name: x\r\n\r\n");
        let many: String = (0..=MAX_HEADERS).map(|i| format!("X-{i}: v\r\n")).collect();
        refused(&format!("HTTP/1.1 200 OK\r\n{many}\r\n"));
    }

    /// Feeds `wire` to the chunked decoder `step` bytes at a time; the body, or the error.
    fn dechunk(wire: &[u8], step: usize) -> Result<(Vec<u8>, BytesMut), io::Error> {
        let mut buf = BytesMut::new();
        let mut state = Chunk::Size;
        let mut body = Vec::new();
        let mut fed = 0;
        loop {
            match step_chunked(&mut buf, &mut state)? {
                Step::Data(d) => body.extend_from_slice(&d),
                Step::End => return Ok((body, buf)),
                Step::Again => {}
                Step::NeedMore => {
                    if fed == wire.len() {
                        return Err(io::Error::new(io::ErrorKind::UnexpectedEof, "ran out"));
                    }
                    let n = step.min(wire.len() - fed);
                    buf.extend_from_slice(&wire[fed..fed + n]);
                    fed += n;
                }
            }
        }
    }

    #[test]
    fn a_chunked_body_decodes_whole_at_any_split_with_extensions_and_trailers_dropped() {
        let wire = b"5;name=value\r\nhello\r\nA \r\n, chunked!\r\n0\r\nX-Trailer: t\r\nY: u\r\n\r\nNEXT";
        for step in [1, 2, 3, 7, wire.len()] {
            let (body, rest) = dechunk(wire, step).unwrap();
            assert_eq!(body, b"hello, chunked!", "step {step}");
            // Nothing past the end is consumed: it belongs to whatever comes next.
            assert!(b"NEXT".starts_with(&rest), "step {step}: {rest:?}");
        }
    }

    #[test]
    fn malformed_or_oversized_chunking_is_an_error() {
        let bad: [&[u8]; 6] = [
            b"x\r\nhello\r\n0\r\n\r\n",            // not hex
            b"5\r\nhelloXX0\r\n\r\n",              // no CRLF after the data
            b"5\nhello\r\n0\r\n\r\n",              // bare LF
            b"11111111111111111\r\n",              // 17 hex digits
            b"5 x\r\nhello\r\n0\r\n\r\n",          // junk after the size
            b"5\r\nhello\r\n0\r\nX: y\nZ\r\n\r\n", // bare LF in the trailers
        ];
        for wire in bad {
            let e = dechunk(wire, 1).expect_err(&String::from_utf8_lossy(wire));
            assert_eq!(
                e.kind(),
                io::ErrorKind::InvalidData,
                "{:?}",
                String::from_utf8_lossy(wire)
            );
        }
        // A size line or a trailer section that never ends is cut at its bound.
        let long_line = format!("5;{}", "e".repeat(MAX_CHUNK_LINE));
        assert_eq!(
            dechunk(long_line.as_bytes(), 512).unwrap_err().kind(),
            io::ErrorKind::InvalidData
        );
        let long_trailers = format!("0\r\n{}", "X: y\r\n".repeat(MAX_TRAILER_BYTES / 6 + 1));
        assert_eq!(
            dechunk(long_trailers.as_bytes(), 512).unwrap_err().kind(),
            io::ErrorKind::InvalidData
        );
    }

    async fn pair() -> (Wire, TcpStream) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let client = TcpStream::connect(listener.local_addr().unwrap()).await.unwrap();
        let (server, _) = listener.accept().await.unwrap();
        (Wire::new(Io::Left(client)), server)
    }

    async fn readable(wire: &Wire) {
        let tokio_util::either::Either::Left(s) = &wire.io else {
            unreachable!()
        };
        s.readable().await.unwrap();
    }

    #[tokio::test]
    async fn an_idle_connection_is_quiet_until_the_upstream_speaks_or_closes() {
        let (mut wire, mut server) = pair().await;
        assert!(wire.is_quiet());
        server.write_all(b"HTTP/1.1 408 Request Timeout\r\n\r\n").await.unwrap();
        readable(&wire).await;
        assert!(!wire.is_quiet(), "unsolicited bytes");

        let (mut wire, server) = pair().await;
        assert!(wire.is_quiet());
        drop(server);
        readable(&wire).await;
        assert!(!wire.is_quiet(), "closed by the upstream");
    }

    async fn body(wire: &mut Wire, framing: Framing) -> io::Result<Vec<u8>> {
        let mut dec = Decoder::new(framing);
        let mut out = Vec::new();
        while let Some(piece) = std::future::poll_fn(|cx| wire.poll_body(cx, &mut dec)).await {
            out.extend_from_slice(&piece?);
        }
        assert!(dec.is_done());
        Ok(out)
    }

    #[tokio::test]
    async fn a_response_is_read_across_reads_and_leaves_the_connection_drained() {
        let (mut wire, mut server) = pair().await;
        wire.head_buf().extend_from_slice(b"GET / HTTP/1.1\r\nhost: u\r\n\r\n");
        wire.send_head().await.unwrap();
        let mut got = [0u8; 27];
        tokio::io::AsyncReadExt::read_exact(&mut server, &mut got)
            .await
            .unwrap();
        assert_eq!(&got, b"GET / HTTP/1.1\r\nhost: u\r\n\r\n");
        let writer = tokio::spawn(async move {
            for piece in ["HTTP/1.1 200 OK\r\nContent-", "Length: 11\r\n\r\nhello", " world"] {
                server.write_all(piece.as_bytes()).await.unwrap();
                tokio::task::yield_now().await;
            }
            server
        });
        let head = wire.read_head(&Method::GET).await.unwrap();
        assert_eq!(body(&mut wire, head.framing).await.unwrap(), b"hello world");
        assert!(wire.is_drained());
        drop(writer.await.unwrap());
    }

    #[tokio::test]
    async fn a_close_delimited_body_ends_at_the_close_and_a_short_one_is_an_error() {
        let (mut wire, mut server) = pair().await;
        server.write_all(b"HTTP/1.1 200 OK\r\n\r\nuntil the end").await.unwrap();
        drop(server);
        let head = wire.read_head(&Method::GET).await.unwrap();
        assert!(!head.keep_alive);
        assert_eq!(body(&mut wire, head.framing).await.unwrap(), b"until the end");

        let (mut wire, mut server) = pair().await;
        server
            .write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nshort")
            .await
            .unwrap();
        drop(server);
        let head = wire.read_head(&Method::GET).await.unwrap();
        let e = body(&mut wire, head.framing).await.unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::UnexpectedEof);
    }

    #[tokio::test]
    async fn a_close_before_any_byte_is_lost_unanswered_and_one_within_the_head_is_not() {
        let (mut wire, server) = pair().await;
        drop(server);
        let e = wire.read_head(&Method::GET).await.unwrap_err();
        assert!(e.lost_unanswered(), "{e}");

        let (mut wire, mut server) = pair().await;
        server.write_all(b"HTTP/1.1 200 OK\r\nContent-").await.unwrap();
        drop(server);
        let e = wire.read_head(&Method::GET).await.unwrap_err();
        assert!(!e.lost_unanswered(), "{e}");
    }

    #[tokio::test]
    async fn a_head_that_never_ends_is_refused_at_its_bound() {
        let (mut wire, mut server) = pair().await;
        let writer = tokio::spawn(async move {
            let _ = server.write_all(b"HTTP/1.1 200 OK\r\n").await;
            let line = format!("X-Filler: {}\r\n", "f".repeat(1000));
            // More than the bound, never the blank line; stops when the client has gone.
            for _ in 0..(2 * MAX_HEAD_BYTES / line.len()) {
                if server.write_all(line.as_bytes()).await.is_err() {
                    break;
                }
            }
        });
        match wire.read_head(&Method::GET).await {
            Err(HeadError::Invalid(why)) => assert!(why.contains("larger than"), "{why}"),
            other => panic!("{other:?}"),
        }
        assert!(wire.buf.len() <= MAX_HEAD_BYTES);
        drop(wire);
        writer.await.unwrap();
    }

    #[tokio::test]
    async fn a_head_past_the_bound_is_refused_even_when_one_read_would_complete_it() {
        let (mut wire, mut server) = pair().await;
        let line = format!("X-F: {}\r\n", "f".repeat(1993));
        // Just under the bound already read, and the rest of a head past it in the socket.
        let mut pre = BytesMut::from("HTTP/1.1 200 OK\r\n");
        while pre.len() + line.len() < MAX_HEAD_BYTES {
            pre.extend_from_slice(line.as_bytes());
        }
        wire.buf = pre;
        let mut rest = line.repeat(30);
        rest.push_str("Content-Length: 0\r\n\r\n");
        server.write_all(rest.as_bytes()).await.unwrap();
        readable(&wire).await;
        match wire.read_head(&Method::GET).await {
            Err(HeadError::Invalid(why)) => assert!(why.contains("larger than"), "{why}"),
            Ok(h) => panic!("accepted a head of {} fields", h.headers.len()),
            Err(e) => panic!("{e}"),
        }
    }

    #[tokio::test]
    async fn a_reset_after_part_of_a_head_is_not_lost_unanswered() {
        let (mut wire, mut server) = pair().await;
        server.write_all(b"HTTP/1.1 200 OK\r\nContent-").await.unwrap();
        readable(&wire).await;
        // The partial head is read, then the connection is reset (RST, not FIN).
        let reader = tokio::spawn(async move {
            let e = wire.read_head(&Method::GET).await.unwrap_err();
            (e.lost_unanswered(), e.to_string())
        });
        tokio::task::yield_now().await;
        server.set_zero_linger().unwrap();
        drop(server);
        let (lost, why) = reader.await.unwrap();
        assert!(!lost, "{why}");
    }

    #[tokio::test]
    async fn a_closed_connection_is_not_quiet_even_when_the_tasks_budget_is_spent() {
        let (mut wire, server) = pair().await;
        drop(server);
        readable(&wire).await;
        // Spend the task's cooperative budget without yielding.
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
        for i in 0..200 {
            tx.send(i).unwrap();
        }
        while tokio::task::coop::has_budget_remaining() {
            rx.recv().await.unwrap();
        }
        assert!(!wire.is_quiet(), "closed by the upstream, yet quiet");
    }
}
