//! Logging: tracing, as text or JSON, level from RUST_LOG (default `info`).
//!
//! Lines are appended to an in-memory buffer and written by a background thread every 100 ms (or
//! as soon as 64 KiB pile up), so the access log costs no syscall on the request path: one write
//! per batch instead of one per request, and a slow stdout never blocks a runtime thread.
//!
//! The access log (target `tokengate::access`, one line per request) is written by [`access`]
//! straight into the buffer, in the shape tracing-subscriber's formatter gives other events, at a
//! fraction of the cost of a dispatch through the subscriber. Every other event goes through
//! tracing-subscriber's `fmt`.

use std::io::Write;
use std::sync::{Arc, Mutex, OnceLock};
use std::thread::JoinHandle;
use std::time::Duration;

use tracing_subscriber::EnvFilter;
use tracing_subscriber::fmt::MakeWriter;

use crate::config::LogFormat;

const FLUSH_EVERY: Duration = Duration::from_millis(100);
const FLUSH_AT_BYTES: usize = 64 * 1024;

struct Shared {
    buf: Mutex<Vec<u8>>,
    sink: Mutex<Box<dyn Write + Send>>,
    stopping: std::sync::atomic::AtomicBool,
    /// The writer thread; only it (and the final flush) writes to the sink, so batches stay in
    /// order and no request thread ever blocks on a slow stdout.
    flusher: OnceLock<std::thread::Thread>,
}

impl Shared {
    /// Appends a line; past [`FLUSH_AT_BYTES`] wakes the writer thread early.
    fn append(&self, bytes: &[u8]) {
        let full = match self.buf.lock() {
            Ok(mut b) => {
                b.extend_from_slice(bytes);
                b.len() >= FLUSH_AT_BYTES
            }
            Err(_) => false,
        };
        if full {
            match self.flusher.get() {
                Some(t) => t.unpark(),
                // No writer thread could be started: write here rather than grow forever.
                None => self.flush_to_sink(),
            }
        }
    }

    fn flush_to_sink(&self) {
        let pending = match self.buf.lock() {
            Ok(mut b) if !b.is_empty() => std::mem::replace(&mut *b, Vec::with_capacity(FLUSH_AT_BYTES)),
            _ => return,
        };
        if let Ok(mut out) = self.sink.lock() {
            let _ = out.write_all(&pending);
            let _ = out.flush();
        }
    }
}

/// A `MakeWriter` that appends to the shared buffer.
#[derive(Clone)]
pub struct BufferedWriter(Arc<Shared>);

pub struct BufferedLine<'a>(&'a Shared);

impl Write for BufferedLine<'_> {
    fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
        self.0.append(bytes);
        Ok(bytes.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl<'a> MakeWriter<'a> for BufferedWriter {
    type Writer = BufferedLine<'a>;
    fn make_writer(&'a self) -> Self::Writer {
        BufferedLine(&self.0)
    }
}

/// Flushes what is buffered when dropped; keep it alive for the life of the process.
pub struct LogGuard {
    shared: Arc<Shared>,
    flusher: Option<JoinHandle<()>>,
}

impl Drop for LogGuard {
    fn drop(&mut self) {
        self.shared.stopping.store(true, std::sync::atomic::Ordering::Relaxed);
        if let Some(t) = self.flusher.take() {
            t.thread().unpark();
            let _ = t.join();
        }
        self.shared.flush_to_sink();
    }
}

/// Installs the global subscriber, writing to stdout.
pub fn init(format: LogFormat) -> LogGuard {
    init_to(format, Box::new(std::io::stdout()))
}

/// Installs the global subscriber, writing to `sink` (the load bench discards its lines but still
/// pays for formatting them).
pub fn init_to(format: LogFormat, sink: Box<dyn Write + Send>) -> LogGuard {
    let shared = Arc::new(Shared {
        buf: Mutex::new(Vec::with_capacity(FLUSH_AT_BYTES)),
        sink: Mutex::new(sink),
        stopping: Default::default(),
        flusher: OnceLock::new(),
    });
    let writer = BufferedWriter(shared.clone());
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(writer)
        .with_ansi(false);
    // A second init (only possible in tests and benches) keeps the first subscriber and sink.
    let _ = match format {
        LogFormat::Text => builder.try_init(),
        LogFormat::Json => builder.json().flatten_event(true).try_init(),
    };
    let _ = ACCESS_SINK.set(AccessSink {
        shared: shared.clone(),
        json: format == LogFormat::Json,
    });
    let flusher_shared = shared.clone();
    let flusher = std::thread::Builder::new()
        .name("tokengate-log".into())
        .spawn(move || {
            while !flusher_shared.stopping.load(std::sync::atomic::Ordering::Relaxed) {
                std::thread::park_timeout(FLUSH_EVERY);
                flusher_shared.flush_to_sink();
            }
        })
        .ok();
    if let Some(t) = &flusher {
        let _ = shared.flusher.set(t.thread().clone());
    }
    LogGuard { shared, flusher }
}

/// Where access lines go once [`init`] has run: straight into the shared buffer.
struct AccessSink {
    shared: Arc<Shared>,
    json: bool,
}

static ACCESS_SINK: OnceLock<AccessSink> = OnceLock::new();

/// One access-log line: one per request, however it ended.
pub struct AccessRecord<'a> {
    pub method: &'a str,
    /// The path without its query.
    pub path: &'a str,
    /// 499 when the client went away before it got a response (as nginx logs it).
    pub status: u16,
    /// From the request head to the end of the response body (or the client leaving).
    pub duration_us: u64,
    pub route: &'a str,
    pub request_id: &'a str,
    /// The client's address.
    pub client: &'a str,
    /// The token's subject and client id, when the request carried a valid one.
    pub sub: Option<&'a str>,
    pub client_id: Option<&'a str>,
    /// Request and response body bytes.
    pub bytes_in: u64,
    pub bytes_out: u64,
    /// From sending to the upstream to its response head, when there was an upstream.
    pub upstream_us: Option<u64>,
    pub user_agent: Option<&'a str>,
}

/// Logs a request. With [`init`]'s subscriber the line is formatted straight into the buffer (no
/// per-request dispatch through tracing's layers); otherwise (tests, embedders with their own
/// subscriber) it is an ordinary tracing event with target `tokengate::access`. RUST_LOG governs
/// both.
pub fn access(r: &AccessRecord<'_>) {
    if !tracing::enabled!(target: "tokengate::access", tracing::Level::INFO) {
        return;
    }
    let Some(sink) = ACCESS_SINK.get() else {
        tracing::info!(
            target: "tokengate::access",
            method = r.method,
            path = r.path,
            status = r.status,
            duration_us = r.duration_us,
            route = r.route,
            request_id = r.request_id,
            client = r.client,
            sub = r.sub,
            client_id = r.client_id,
            bytes_in = r.bytes_in,
            bytes_out = r.bytes_out,
            upstream_us = r.upstream_us,
            user_agent = r.user_agent,
        );
        return;
    };
    sink.shared
        .append(&access_line(r, sink.json, crate::clock::wall_micros()));
}

/// The line, in the shape tracing-subscriber's text or JSON formatter gives other events.
fn access_line(r: &AccessRecord<'_>, json: bool, micros: u64) -> Vec<u8> {
    let mut out = Vec::with_capacity(200);
    if json {
        out.extend_from_slice(b"{\"timestamp\":\"");
        write_rfc3339(&mut out, micros);
        out.extend_from_slice(b"\",\"level\":\"INFO\",\"target\":\"tokengate::access\"");
    } else {
        write_rfc3339(&mut out, micros);
        out.extend_from_slice(b"  INFO tokengate::access:");
    }
    let field = |out: &mut Vec<u8>, name: &str| {
        if json {
            out.extend_from_slice(b",\"");
            out.extend_from_slice(name.as_bytes());
            out.extend_from_slice(b"\":");
        } else {
            out.push(b' ');
            out.extend_from_slice(name.as_bytes());
            out.push(b'=');
        }
    };
    let mut itoa = itoa::Buffer::new();
    field(&mut out, "method");
    write_quoted(&mut out, r.method);
    field(&mut out, "path");
    write_quoted(&mut out, r.path);
    field(&mut out, "status");
    out.extend_from_slice(itoa.format(r.status).as_bytes());
    field(&mut out, "duration_us");
    out.extend_from_slice(itoa.format(r.duration_us).as_bytes());
    field(&mut out, "route");
    write_quoted(&mut out, r.route);
    field(&mut out, "request_id");
    write_quoted(&mut out, r.request_id);
    field(&mut out, "client");
    write_quoted(&mut out, r.client);
    if let Some(sub) = r.sub {
        field(&mut out, "sub");
        write_quoted(&mut out, sub);
    }
    if let Some(client_id) = r.client_id {
        field(&mut out, "client_id");
        write_quoted(&mut out, client_id);
    }
    field(&mut out, "bytes_in");
    out.extend_from_slice(itoa.format(r.bytes_in).as_bytes());
    field(&mut out, "bytes_out");
    out.extend_from_slice(itoa.format(r.bytes_out).as_bytes());
    if let Some(us) = r.upstream_us {
        field(&mut out, "upstream_us");
        out.extend_from_slice(itoa.format(us).as_bytes());
    }
    if let Some(ua) = r.user_agent {
        field(&mut out, "user_agent");
        write_quoted(&mut out, ua);
    }
    out.extend_from_slice(if json { b"}\n" } else { b"\n" });
    out
}

/// A JSON string literal (also safe and unambiguous in a text line): quotes, backslashes and
/// control characters escaped, so a request path can never forge a log line.
fn write_quoted(out: &mut Vec<u8>, s: &str) {
    out.push(b'"');
    for &b in s.as_bytes() {
        match b {
            b'"' => out.extend_from_slice(b"\\\""),
            b'\\' => out.extend_from_slice(b"\\\\"),
            0x00..=0x1f | 0x7f => {
                const HEX: &[u8; 16] = b"0123456789abcdef";
                out.extend_from_slice(b"\\u00");
                out.push(HEX[(b >> 4) as usize]);
                out.push(HEX[(b & 0xf) as usize]);
            }
            _ => out.push(b),
        }
    }
    out.push(b'"');
}

/// `n` as exactly `width` decimal digits (zero-padded; `width` at most 6).
fn push_digits(out: &mut Vec<u8>, mut n: u64, width: usize) {
    let mut buf = [b'0'; 6];
    for slot in buf[..width].iter_mut().rev() {
        *slot = b'0' + (n % 10) as u8;
        n /= 10;
    }
    out.extend_from_slice(&buf[..width]);
}

/// `YYYY-MM-DDTHH:MM:SS.ffffffZ` from microseconds since the epoch (civil-from-days, H. Hinnant).
fn write_rfc3339(out: &mut Vec<u8>, micros: u64) {
    let secs = micros / 1_000_000;
    let days = (secs / 86_400) as i64;
    let sod = secs % 86_400;
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1_460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    push_digits(out, year.max(0) as u64, 4);
    out.push(b'-');
    push_digits(out, month as u64, 2);
    out.push(b'-');
    push_digits(out, day as u64, 2);
    out.push(b'T');
    push_digits(out, sod / 3600, 2);
    out.push(b':');
    push_digits(out, sod % 3600 / 60, 2);
    out.push(b':');
    push_digits(out, sod % 60, 2);
    out.push(b'.');
    push_digits(out, micros % 1_000_000, 6);
    out.push(b'Z');
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rfc3339_timestamps() {
        let mut out = Vec::new();
        write_rfc3339(&mut out, 1_795_777_160_123_456);
        assert_eq!(String::from_utf8(out).unwrap(), "2026-11-27T10:59:20.123456Z");
        let mut out = Vec::new();
        write_rfc3339(&mut out, 951_782_400_000_001); // 2000-02-29
        assert_eq!(String::from_utf8(out).unwrap(), "2000-02-29T00:00:00.000001Z");
    }

    #[test]
    fn access_lines_in_text_and_json() {
        let r = AccessRecord {
            method: "GET",
            path: "/api/\"x\"",
            status: 200,
            duration_us: 151,
            route: "/api",
            request_id: "abc-1",
            client: "192.0.2.7",
            sub: Some("ann"),
            client_id: Some("web"),
            bytes_in: 0,
            bytes_out: 12,
            upstream_us: Some(90),
            user_agent: Some("curl/8"),
        };
        let text = String::from_utf8(access_line(&r, false, 1_795_777_160_123_456)).unwrap();
        assert_eq!(
            text,
            "2026-11-27T10:59:20.123456Z  INFO tokengate::access: method=\"GET\" path=\"/api/\\\"x\\\"\" status=200 duration_us=151 route=\"/api\" request_id=\"abc-1\" client=\"192.0.2.7\" sub=\"ann\" client_id=\"web\" bytes_in=0 bytes_out=12 upstream_us=90 user_agent=\"curl/8\"\n"
        );
        let json: serde_json::Value = serde_json::from_slice(&access_line(&r, true, 1_795_777_160_123_456)).unwrap();
        assert_eq!(json["path"], "/api/\"x\"");
        assert_eq!(json["status"], 200);
        assert_eq!(json["target"], "tokengate::access");
        assert_eq!(json["timestamp"], "2026-11-27T10:59:20.123456Z");
        assert_eq!(json["bytes_out"], 12);
        assert_eq!(json["sub"], "ann");
    }

    #[test]
    fn quoted_values_cannot_forge_lines() {
        let mut out = Vec::new();
        write_quoted(&mut out, "/a\"b\nINFO fake\\");
        assert_eq!(String::from_utf8(out).unwrap(), r#""/a\"b\u000aINFO fake\\""#);
    }
}
