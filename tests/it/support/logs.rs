//! Captures everything the gateway logs in this test binary, so tests can assert what never
//! appears there (tokens, passwords).

use std::io::Write;
use std::sync::{Mutex, OnceLock};

use tracing_subscriber::fmt::MakeWriter;

static CAPTURED: Mutex<Vec<u8>> = Mutex::new(Vec::new());

struct Capture;

impl Write for Capture {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        CAPTURED.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

struct MakeCapture;

impl<'a> MakeWriter<'a> for MakeCapture {
    type Writer = Capture;
    fn make_writer(&'a self) -> Capture {
        Capture
    }
}

pub fn install() {
    static ONCE: OnceLock<()> = OnceLock::new();
    ONCE.get_or_init(|| {
        let _ = tracing_subscriber::fmt()
            .with_env_filter(tracing_subscriber::EnvFilter::new("tokengate=trace,info"))
            .with_writer(MakeCapture)
            .with_ansi(false)
            .try_init();
    });
}

/// Everything logged so far by every test in this binary.
pub fn captured() -> String {
    String::from_utf8_lossy(&CAPTURED.lock().unwrap()).into_owned()
}
