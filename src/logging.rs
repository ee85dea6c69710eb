//! Logging: tracing, as text or JSON, level from RUST_LOG (default `info`).
//!
//! Lines are appended to an in-memory buffer and written by a background thread every 100 ms (or
//! sooner when 64 KiB pile up), so the access log costs no syscall on the request path: one write
//! per batch instead of one per request.

use std::io::Write;
use std::sync::{Arc, Mutex};
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
}

impl Shared {
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
        let full = match self.0.buf.lock() {
            Ok(mut b) => {
                b.extend_from_slice(bytes);
                b.len() >= FLUSH_AT_BYTES
            }
            Err(_) => false,
        };
        if full {
            self.0.flush_to_sink();
        }
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
    });
    let writer = BufferedWriter(shared.clone());
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(writer)
        .with_ansi(false);
    // A second init (only possible in tests) keeps the first subscriber.
    let _ = match format {
        LogFormat::Text => builder.try_init(),
        LogFormat::Json => builder.json().flatten_event(true).try_init(),
    };
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
    LogGuard { shared, flusher }
}
