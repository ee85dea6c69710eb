//! Logging: tracing, as text or JSON, level from RUST_LOG (default `info`).
//!
//! Lines are appended to an in-memory buffer and written by a background thread every 100 ms (or
//! as soon as 64 KiB pile up), so the access log costs no syscall on the request path: one write
//! per batch instead of one per request, and a slow stdout never blocks a runtime thread.
//!
//! A stdout nobody reads (a full pipe, a stopped log shipper) must not cost memory or the exit:
//! the buffer holds at most [`BUFFER_CAP`] bytes, a line that does not fit is dropped whole and
//! counted ([`dropped_lines`]), and once stdout takes lines again the writer says how many were
//! lost. The final flush waits for the writer a bounded time, then lets the process exit.
//!
//! The access log (target `tokengate::access`, one line per request) is written by [`access`]
//! straight into the buffer, in the shape tracing-subscriber's formatter gives other events, at a
//! fraction of the cost of a dispatch through the subscriber. Every other event goes through
//! tracing-subscriber's `fmt`.

use std::io::Write;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock, mpsc};
use std::time::Duration;

use tracing_subscriber::EnvFilter;
use tracing_subscriber::fmt::MakeWriter;

use crate::config::LogFormat;

const FLUSH_EVERY: Duration = Duration::from_millis(100);
const FLUSH_AT_BYTES: usize = 64 * 1024;
/// The most bytes of log lines held for a stdout that does not take them: about 25,000 access
/// lines, several seconds of a busy gateway. With the batch the writer is stuck on, logging holds
/// at most twice this.
pub const BUFFER_CAP: usize = 4 * 1024 * 1024;

struct Shared {
    buf: Mutex<Vec<u8>>,
    cap: usize,
    /// Lines dropped because the buffer was full or stdout failed; never reset.
    dropped: AtomicU64,
    stopping: AtomicBool,
    /// The writer thread; only it writes to the sink, so batches stay in order and no request
    /// thread ever blocks on a slow stdout.
    writer: OnceLock<std::thread::Thread>,
}

impl Shared {
    fn new(cap: usize) -> Shared {
        Shared {
            buf: Mutex::new(Vec::new()),
            cap,
            dropped: AtomicU64::new(0),
            stopping: AtomicBool::new(false),
            writer: OnceLock::new(),
        }
    }

    /// Nothing panics while holding the lock, so a poisoned one still holds whole lines.
    fn buf(&self) -> MutexGuard<'_, Vec<u8>> {
        self.buf.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Appends a line, or drops it whole when it does not fit under the cap. Crossing
    /// [`FLUSH_AT_BYTES`] wakes the writer thread early.
    fn append(&self, line: &[u8]) {
        let wake = {
            let mut b = self.buf();
            let len = b.len();
            if line.len() > self.cap - len {
                // Counted under the lock, so the writer's count at a swap matches its batch.
                self.dropped.fetch_add(1, Ordering::Relaxed);
                return;
            }
            if line.len() > b.capacity() - len {
                // Grow by doubling, but never past the cap (Vec's own growth could double past it).
                let want = (len + line.len()).max(b.capacity() * 2).min(self.cap);
                b.reserve_exact(want - len);
            }
            b.extend_from_slice(line);
            len < FLUSH_AT_BYTES && b.len() >= FLUSH_AT_BYTES
        };
        if let Some(t) = self.writer.get().filter(|_| wake) {
            t.unpark();
        }
    }
}

/// The writer thread: every [`FLUSH_EVERY`] (or when woken) takes the buffer and writes it, then
/// reports the lines dropped since the last report. Returns after one last round once stopping.
fn write_loop(shared: &Shared, mut sink: Box<dyn Write + Send>, json: bool) {
    let mut batch = Vec::new();
    let mut reported = 0;
    loop {
        std::thread::park_timeout(FLUSH_EVERY);
        let last = shared.stopping.load(Ordering::Acquire);
        // Lines are dropped only while the buffer is full, so the ones counted by the time of the
        // swap came after every line in the batch: the notice follows the batch.
        let mut dropped = {
            let mut b = shared.buf();
            std::mem::swap(&mut *b, &mut batch);
            shared.dropped.load(Ordering::Relaxed)
        };
        if let Err(lost) = write_whole(&mut *sink, &batch) {
            shared.dropped.fetch_add(lost, Ordering::Relaxed);
            dropped += lost;
        }
        batch.clear();
        if dropped > reported {
            let notice = drop_notice(dropped - reported, json, crate::clock::wall_micros());
            // Not reported if it cannot be written: the next notice then covers these lines too.
            if write_whole(&mut *sink, &notice).is_ok() {
                reported = dropped;
            }
        }
        let _ = sink.flush();
        if last {
            return;
        }
    }
}

/// Writes `bytes`; on an error, the number of lines not (wholly) written.
fn write_whole(sink: &mut dyn Write, mut bytes: &[u8]) -> Result<(), u64> {
    while !bytes.is_empty() {
        match sink.write(bytes) {
            Ok(0) => break,
            Ok(n) => bytes = &bytes[n..],
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(_) => break,
        }
    }
    if bytes.is_empty() {
        return Ok(());
    }
    // Every line ends in '\n', so this counts a line cut short as lost.
    Err(bytes.iter().filter(|&&b| b == b'\n').count() as u64)
}

/// The line saying `n` lines were lost, in the shape of the other WARN lines.
fn drop_notice(n: u64, json: bool, micros: u64) -> Vec<u8> {
    let mut out = Vec::with_capacity(160);
    let mut itoa = itoa::Buffer::new();
    let n = itoa.format(n);
    if json {
        out.extend_from_slice(b"{\"timestamp\":\"");
        write_rfc3339(&mut out, micros);
        out.extend_from_slice(b"\",\"level\":\"WARN\",\"target\":\"tokengate::logging\",\"message\":\"dropped ");
        out.extend_from_slice(n.as_bytes());
        out.extend_from_slice(b" log lines: stdout was blocked or failing\",\"dropped_lines\":");
        out.extend_from_slice(n.as_bytes());
        out.extend_from_slice(b"}\n");
    } else {
        write_rfc3339(&mut out, micros);
        out.extend_from_slice(b"  WARN tokengate::logging: dropped ");
        out.extend_from_slice(n.as_bytes());
        out.extend_from_slice(b" log lines: stdout was blocked or failing\n");
    }
    out
}

/// A `MakeWriter` that appends to the shared buffer.
#[derive(Clone)]
pub struct BufferedWriter(Arc<Shared>);

pub struct BufferedLine<'a>(&'a Shared);

impl Write for BufferedLine<'_> {
    /// tracing-subscriber writes each formatted event with one `write_all`, so one call is one
    /// line: dropped or kept whole.
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

/// Flushes what is buffered when dropped (or on [`LogGuard::finish`]), waiting at most its bound
/// for a stdout that does not take it; keep it alive for the life of the process.
pub struct LogGuard {
    shared: Arc<Shared>,
    /// Disconnects when the writer thread has returned; taken by the first stop.
    writer_done: Option<mpsc::Receiver<()>>,
    flush_within: Duration,
}

impl LogGuard {
    /// Stops the writer once it has written what is buffered. True if it did so within the
    /// bound; false if stdout still did not take it (the writer is then left behind, so the
    /// process can exit).
    pub fn finish(mut self) -> bool {
        self.stop()
    }

    fn stop(&mut self) -> bool {
        let Some(done) = self.writer_done.take() else {
            return false;
        };
        self.shared.stopping.store(true, Ordering::Release);
        if let Some(t) = self.shared.writer.get() {
            t.unpark();
        }
        matches!(
            done.recv_timeout(self.flush_within),
            Err(mpsc::RecvTimeoutError::Disconnected)
        )
    }
}

impl Drop for LogGuard {
    fn drop(&mut self) {
        self.stop();
    }
}

/// The number of log lines dropped since [`init`]: the buffer was full or stdout failed.
pub fn dropped_lines() -> u64 {
    ACCESS_SINK
        .get()
        .map_or(0, |s| s.shared.dropped.load(Ordering::Relaxed))
}

/// Installs the global subscriber, writing to stdout; the final flush waits at most
/// `flush_within` for a stdout that does not take the lines. `level` is the config's `log.level`
/// (RUST_LOG, when set, wins).
pub fn init(format: LogFormat, level: &str, flush_within: Duration) -> std::io::Result<LogGuard> {
    init_to(format, level, Box::new(std::io::stdout()), flush_within)
}

/// Changes the level filter of a running process (config reload). With RUST_LOG set, the
/// environment keeps deciding and this says so.
pub fn set_level(level: &str) -> Result<(), String> {
    if std::env::var_os("RUST_LOG").is_some() {
        return Err("RUST_LOG is set and decides the log level".into());
    }
    let filter = EnvFilter::try_new(level).map_err(|e| e.to_string())?;
    match RELOAD_FILTER.get() {
        Some(reload) => reload(filter),
        None => Err("logging is not initialised".into()),
    }
}

type ReloadFilter = Box<dyn Fn(EnvFilter) -> Result<(), String> + Send + Sync>;

static RELOAD_FILTER: OnceLock<ReloadFilter> = OnceLock::new();

/// Installs the global subscriber, writing to `sink` (the load bench discards its lines but still
/// pays for formatting them).
pub fn init_to(
    format: LogFormat,
    level: &str,
    sink: Box<dyn Write + Send>,
    flush_within: Duration,
) -> std::io::Result<LogGuard> {
    let json = format == LogFormat::Json;
    let (shared, guard) = start(sink, BUFFER_CAP, json, flush_within)?;
    let writer = BufferedWriter(shared.clone());
    let filter = EnvFilter::try_from_default_env()
        .or_else(|_| EnvFilter::try_new(level))
        .unwrap_or_else(|_| EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(writer)
        .with_ansi(false);
    // A second init (only possible in tests and benches) keeps the first subscriber and sink.
    let installed = match format {
        LogFormat::Text => {
            let builder = builder.with_filter_reloading();
            let handle = builder.reload_handle();
            builder
                .try_init()
                .map(|()| -> ReloadFilter { Box::new(move |f| handle.reload(f).map_err(|e| e.to_string())) })
        }
        LogFormat::Json => {
            let builder = builder.json().flatten_event(true).with_filter_reloading();
            let handle = builder.reload_handle();
            builder
                .try_init()
                .map(|()| -> ReloadFilter { Box::new(move |f| handle.reload(f).map_err(|e| e.to_string())) })
        }
    };
    if let Ok(reload) = installed {
        let _ = RELOAD_FILTER.set(reload);
    }
    let _ = ACCESS_SINK.set(AccessSink { shared, json });
    Ok(guard)
}

/// The buffer and its writer thread, without the global subscriber.
fn start(
    sink: Box<dyn Write + Send>,
    cap: usize,
    json: bool,
    flush_within: Duration,
) -> std::io::Result<(Arc<Shared>, LogGuard)> {
    let shared = Arc::new(Shared::new(cap));
    let (done_tx, writer_done) = mpsc::channel::<()>();
    let for_writer = shared.clone();
    let thread = std::thread::Builder::new()
        .name("tokengate-log".into())
        .spawn(move || {
            let _done = done_tx;
            write_loop(&for_writer, sink, json);
        })?;
    let _ = shared.writer.set(thread.thread().clone());
    let guard = LogGuard {
        shared: shared.clone(),
        writer_done: Some(writer_done),
        flush_within,
    };
    Ok((shared, guard))
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
    // One buffer per thread, reused: no allocation per line; and the thread's last timestamp.
    thread_local! {
        static LINE: std::cell::RefCell<(Vec<u8>, Stamp)> =
            std::cell::RefCell::new((Vec::with_capacity(256), Stamp::default()));
    }
    LINE.with(|line| match line.try_borrow_mut() {
        Ok(mut line) => {
            let (line, stamp) = &mut *line;
            line.clear();
            write_access_line(line, r, sink.json, crate::clock::wall_micros(), stamp);
            sink.shared.append(line);
        }
        // Not reentrant; should it ever be, a fresh buffer.
        Err(_) => sink
            .shared
            .append(&access_line(r, sink.json, crate::clock::wall_micros())),
    });
}

/// The line, in the shape tracing-subscriber's text or JSON formatter gives other events.
fn access_line(r: &AccessRecord<'_>, json: bool, micros: u64) -> Vec<u8> {
    let mut out = Vec::with_capacity(256);
    write_access_line(&mut out, r, json, micros, &mut Stamp::default());
    out
}

fn write_access_line(out: &mut Vec<u8>, r: &AccessRecord<'_>, json: bool, micros: u64, stamp: &mut Stamp) {
    if json {
        out.extend_from_slice(b"{\"timestamp\":\"");
        stamp.write(out, micros);
        out.extend_from_slice(b"\",\"level\":\"INFO\",\"target\":\"tokengate::access\"");
    } else {
        stamp.write(out, micros);
        out.extend_from_slice(b"  INFO tokengate::access:");
    }
    // Each field's separator, name and `=` (text) or `":` (JSON) as one static string.
    macro_rules! field {
        ($out:expr, $name:literal) => {
            $out.extend_from_slice(if json {
                concat!(",\"", $name, "\":").as_bytes()
            } else {
                concat!(" ", $name, "=").as_bytes()
            })
        };
    }
    let mut itoa = itoa::Buffer::new();
    field!(out, "method");
    write_quoted(out, r.method);
    field!(out, "path");
    write_quoted(out, r.path);
    field!(out, "status");
    out.extend_from_slice(itoa.format(r.status).as_bytes());
    field!(out, "duration_us");
    out.extend_from_slice(itoa.format(r.duration_us).as_bytes());
    field!(out, "route");
    write_quoted(out, r.route);
    field!(out, "request_id");
    write_quoted(out, r.request_id);
    field!(out, "client");
    write_quoted(out, r.client);
    if let Some(sub) = r.sub {
        field!(out, "sub");
        write_quoted(out, sub);
    }
    if let Some(client_id) = r.client_id {
        field!(out, "client_id");
        write_quoted(out, client_id);
    }
    field!(out, "bytes_in");
    out.extend_from_slice(itoa.format(r.bytes_in).as_bytes());
    field!(out, "bytes_out");
    out.extend_from_slice(itoa.format(r.bytes_out).as_bytes());
    if let Some(us) = r.upstream_us {
        field!(out, "upstream_us");
        out.extend_from_slice(itoa.format(us).as_bytes());
    }
    if let Some(ua) = r.user_agent {
        field!(out, "user_agent");
        write_quoted(out, ua);
    }
    out.extend_from_slice(if json { b"}\n" } else { b"\n" });
}

/// A JSON string literal (also safe and unambiguous in a text line): quotes, backslashes and
/// control characters escaped, so a request path can never forge a log line.
fn write_quoted(out: &mut Vec<u8>, s: &str) {
    let bytes = s.as_bytes();
    out.reserve(bytes.len() + 2);
    out.push(b'"');
    // The usual case, nothing to escape, is decided over the whole value at once: no early exit,
    // so the compiler compares many bytes per instruction (the loop below looks at one at a time).
    let plain = !bytes.iter().fold(false, |escape, &b| {
        escape | (b < 0x20) | (b == 0x7f) | (b == b'"') | (b == b'\\')
    });
    if plain {
        out.extend_from_slice(bytes);
        out.push(b'"');
        return;
    }
    // Runs of bytes that need no escape are copied whole.
    let mut clean = 0;
    for (i, &b) in bytes.iter().enumerate() {
        let escaped: &[u8] = match b {
            b'"' => b"\\\"",
            b'\\' => b"\\\\",
            0x00..=0x1f | 0x7f => b"",
            _ => continue,
        };
        out.extend_from_slice(&bytes[clean..i]);
        clean = i + 1;
        if escaped.is_empty() {
            const HEX: &[u8; 16] = b"0123456789abcdef";
            out.extend_from_slice(&[b'\\', b'u', b'0', b'0', HEX[(b >> 4) as usize], HEX[(b & 0xf) as usize]]);
        } else {
            out.extend_from_slice(escaped);
        }
    }
    out.extend_from_slice(&bytes[clean..]);
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

/// `YYYY-MM-DDTHH:MM:SS.ffffffZ` from microseconds since the epoch.
fn write_rfc3339(out: &mut Vec<u8>, micros: u64) {
    Stamp::default().write(out, micros);
}

/// An RFC 3339 timestamp writer that keeps the date and time of day of its last second
/// (`YYYY-MM-DDTHH:MM:SS.`): lines written within one second format only their microseconds.
#[derive(Default)]
struct Stamp {
    /// The second `prefix` shows, plus one (0: nothing formatted yet).
    second: u64,
    prefix: Vec<u8>,
}

impl Stamp {
    /// `YYYY-MM-DDTHH:MM:SS.ffffffZ` from microseconds since the epoch.
    fn write(&mut self, out: &mut Vec<u8>, micros: u64) {
        let secs = micros / 1_000_000;
        if self.second != secs + 1 {
            self.prefix.clear();
            write_date_time(&mut self.prefix, secs);
            self.second = secs + 1;
        }
        out.extend_from_slice(&self.prefix);
        push_digits(out, micros % 1_000_000, 6);
        out.push(b'Z');
    }
}

/// `YYYY-MM-DDTHH:MM:SS.` from seconds since the epoch (civil-from-days, H. Hinnant).
fn write_date_time(out: &mut Vec<u8>, secs: u64) {
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
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_stamp_reformats_the_date_when_the_second_changes_and_only_then() {
        let mut stamp = Stamp::default();
        let mut out = Vec::new();
        for micros in [
            1_795_777_160_123_456, // 2026-11-27T10:59:20
            1_795_777_160_999_999, // the same second
            1_795_777_161_000_000, // the next
            1_795_777_160_000_001, // back (a clock step): formatted again, not the cached one
            1_795_823_999_999_999, // 23:59:59 the same day
            1_795_824_000_000_000, // midnight
        ] {
            stamp.write(&mut out, micros);
            out.push(b' ');
        }
        assert_eq!(
            String::from_utf8(out).unwrap(),
            "2026-11-27T10:59:20.123456Z 2026-11-27T10:59:20.999999Z 2026-11-27T10:59:21.000000Z \
             2026-11-27T10:59:20.000001Z 2026-11-27T23:59:59.999999Z 2026-11-28T00:00:00.000000Z "
        );
        // The epoch itself, second 0, is formatted (0 in `second` means nothing formatted yet).
        let mut out = Vec::new();
        Stamp::default().write(&mut out, 5);
        assert_eq!(String::from_utf8(out).unwrap(), "1970-01-01T00:00:00.000005Z");
    }

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
        let line = access_line(&r, true, 1_795_777_160_123_456);
        assert_eq!(
            String::from_utf8(line.clone()).unwrap(),
            "{\"timestamp\":\"2026-11-27T10:59:20.123456Z\",\"level\":\"INFO\",\"target\":\"tokengate::access\",\"method\":\"GET\",\"path\":\"/api/\\\"x\\\"\",\"status\":200,\"duration_us\":151,\"route\":\"/api\",\"request_id\":\"abc-1\",\"client\":\"192.0.2.7\",\"sub\":\"ann\",\"client_id\":\"web\",\"bytes_in\":0,\"bytes_out\":12,\"upstream_us\":90,\"user_agent\":\"curl/8\"}\n"
        );
        let json: serde_json::Value = serde_json::from_slice(&line).unwrap();
        assert_eq!(json["path"], "/api/\"x\"");
        assert_eq!(json["status"], 200);
        assert_eq!(json["target"], "tokengate::access");
        assert_eq!(json["timestamp"], "2026-11-27T10:59:20.123456Z");
        assert_eq!(json["bytes_out"], 12);
        assert_eq!(json["sub"], "ann");
    }

    /// A sink whose writes wait until the test opens its gate; each write reports itself on entry
    /// (it may then be blocked) and once its bytes are in `written`.
    #[derive(Clone)]
    struct GatedSink {
        open: Arc<(Mutex<bool>, std::sync::Condvar)>,
        written: Arc<Mutex<Vec<u8>>>,
        calls: mpsc::Sender<()>,
    }

    impl GatedSink {
        fn new() -> (GatedSink, mpsc::Receiver<()>) {
            let (calls, rx) = mpsc::channel();
            let sink = GatedSink {
                open: Arc::default(),
                written: Arc::default(),
                calls,
            };
            (sink, rx)
        }
        fn open(&self) {
            *self.open.0.lock().unwrap() = true;
            self.open.1.notify_all();
        }
        fn text(&self) -> String {
            String::from_utf8(self.written.lock().unwrap().clone()).unwrap()
        }
    }

    impl Write for GatedSink {
        fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
            let _ = self.calls.send(());
            let (open, changed) = &*self.open;
            let mut g = open.lock().unwrap();
            while !*g {
                g = changed.wait(g).unwrap();
            }
            self.written.lock().unwrap().extend_from_slice(bytes);
            let _ = self.calls.send(());
            Ok(bytes.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    /// Opens the gate when dropped, so a failing test does not leave its LogGuard waiting out
    /// the flush bound on a sink that never drains. Declare it after the guard: it drops first.
    struct OpenOnDrop(GatedSink);

    impl Drop for OpenOnDrop {
        fn drop(&mut self) {
            self.0.open();
        }
    }

    /// A hang guard for waits that must end: generous, not a timing assertion.
    const GUARD: Duration = Duration::from_secs(60);

    /// A 100-byte line numbered `i`.
    fn line(i: usize) -> Vec<u8> {
        let mut l = format!("line {i:06} ").into_bytes();
        l.resize(99, b'.');
        l.push(b'\n');
        l
    }

    #[test]
    fn a_blocked_sink_caps_the_buffer_drops_whole_lines_and_reports_them_once_it_drains() {
        const CAP: usize = 1000;
        let (sink, calls) = GatedSink::new();
        let (shared, guard) = start(Box::new(sink.clone()), CAP, false, GUARD).unwrap();
        let _open = OpenOnDrop(sink.clone());
        // The writer takes line 0 and blocks writing it: from here on nothing leaves the buffer.
        shared.append(&line(0));
        calls.recv_timeout(GUARD).expect("the writer never wrote");

        let appended = 10 * CAP / 100;
        for i in 1..=appended {
            shared.append(&line(i));
            let len = shared.buf().len();
            assert!(len <= CAP, "buffer at {len} bytes, over its cap of {CAP}");
            assert_eq!(len % 100, 0, "a partial line in the buffer");
        }
        let kept = CAP / 100;
        assert_eq!(shared.dropped.load(Ordering::Relaxed), (appended - kept) as u64);

        // Unblocked, the writer writes what it holds, then says what it could not.
        sink.open();
        let notice = format!(
            "  WARN tokengate::logging: dropped {} log lines: stdout was blocked or failing\n",
            appended - kept
        );
        while !sink.text().contains(&notice) {
            calls.recv_timeout(GUARD).expect("no drop notice once the sink drained");
        }
        assert!(guard.finish(), "the final flush gave up on a sink that drains");

        let text = sink.text();
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), 1 + kept + 1, "{text}");
        for (i, l) in lines[..=kept].iter().enumerate() {
            assert_eq!(format!("{l}\n").as_bytes(), line(i), "lines in order and whole");
        }
        assert!(lines[kept + 1].starts_with("20") && text.ends_with(&notice), "{text}");
    }

    #[test]
    fn the_final_flush_gives_up_after_its_bound_when_the_sink_never_drains() {
        let (sink, calls) = GatedSink::new();
        let (shared, guard) = start(Box::new(sink.clone()), 1000, false, Duration::from_millis(50)).unwrap();
        shared.append(&line(0));
        calls.recv_timeout(GUARD).expect("the writer never wrote");
        shared.append(&line(1));

        // finish() on a thread of its own, so a flush that waits forever fails this test instead
        // of hanging it.
        let (tx, finished) = mpsc::channel();
        std::thread::spawn(move || {
            let _ = tx.send(guard.finish());
        });
        let flushed = finished.recv_timeout(GUARD).expect("the final flush did not return");
        assert!(!flushed, "reported a flush that cannot have happened");
        sink.open(); // lets the abandoned writer thread end
    }

    #[test]
    fn write_errors_count_the_lines_not_written() {
        struct Fails(usize);
        impl Write for Fails {
            fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
                match self.0 {
                    0 => Err(std::io::ErrorKind::BrokenPipe.into()),
                    n => {
                        let n = n.min(bytes.len());
                        self.0 -= n;
                        Ok(n)
                    }
                }
            }
            fn flush(&mut self) -> std::io::Result<()> {
                Ok(())
            }
        }
        let three = [line(0), line(1), line(2)].concat();
        assert_eq!(write_whole(&mut Fails(300), &three), Ok(()));
        assert_eq!(write_whole(&mut Fails(150), &three), Err(2), "a line cut short is lost");
        assert_eq!(write_whole(&mut Fails(0), &three), Err(3));
    }

    #[test]
    fn drop_notices_in_text_and_json() {
        let text = String::from_utf8(drop_notice(42, false, 1_795_777_160_123_456)).unwrap();
        assert_eq!(
            text,
            "2026-11-27T10:59:20.123456Z  WARN tokengate::logging: dropped 42 log lines: stdout was blocked or failing\n"
        );
        let json: serde_json::Value = serde_json::from_slice(&drop_notice(42, true, 1_795_777_160_123_456)).unwrap();
        assert_eq!(json["level"], "WARN");
        assert_eq!(json["target"], "tokengate::logging");
        assert_eq!(json["dropped_lines"], 42);
        assert_eq!(json["message"], "dropped 42 log lines: stdout was blocked or failing");
    }

    #[test]
    fn quoted_values_cannot_forge_lines() {
        let mut out = Vec::new();
        write_quoted(&mut out, "/a\"b\nINFO fake\\");
        assert_eq!(String::from_utf8(out).unwrap(), r#""/a\"b\u000aINFO fake\\""#);
    }

    proptest::proptest! {
        /// Any value comes out as one JSON string that decodes to itself, with no raw control
        /// byte (so no line break) in it.
        #[test]
        fn quoted_values_are_json_strings_of_themselves(s in "\\PC*|[\\x00-\\x7f]*") {
            let mut out = b"x".to_vec();
            write_quoted(&mut out, &s);
            proptest::prop_assert!(!out.iter().any(|&b| b < 0x20 || b == 0x7f));
            let back: String = serde_json::from_slice(&out[1..]).unwrap();
            proptest::prop_assert_eq!(back, s);
        }
    }
}
