//! Time, passed in rather than read from the wall inside logic, so tests move it instead of sleeping.
//!
//! Everything that decides on expiry (token validation, refresh rotation, reuse grace, login backoff,
//! sweeping) asks a [`Clock`]. The gateway runs on [`SystemClock`]; tests hand it a [`ManualClock`].

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// Milliseconds since the Unix epoch.
pub type UnixMillis = u64;

pub trait Clock: Send + Sync + 'static {
    /// Milliseconds since the Unix epoch.
    fn now_millis(&self) -> UnixMillis;

    /// Whole seconds since the Unix epoch (JWT `NumericDate`).
    fn now_secs(&self) -> u64 {
        self.now_millis() / 1000
    }
}

pub type SharedClock = Arc<dyn Clock>;

/// The wall clock.
#[derive(Debug, Default, Clone, Copy)]
pub struct SystemClock;

impl Clock for SystemClock {
    fn now_millis(&self) -> UnixMillis {
        // A clock before 1970 is a broken host; treat it as the epoch rather than panic.
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_millis() as u64)
            .unwrap_or(0)
    }
}

/// Microseconds since the Unix epoch from the wall clock, for log timestamps only (never for
/// decisions: those take a [`Clock`]).
pub fn wall_micros() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_micros() as u64)
        .unwrap_or(0)
}

/// A clock that only moves when told to.
#[derive(Debug)]
pub struct ManualClock {
    millis: AtomicU64,
}

impl ManualClock {
    /// Starts at the current wall time, so tokens it stamps look plausible to other tools.
    pub fn new() -> Self {
        Self::at_millis(SystemClock.now_millis())
    }

    pub fn at_millis(millis: UnixMillis) -> Self {
        Self {
            millis: AtomicU64::new(millis),
        }
    }

    pub fn advance(&self, by: Duration) {
        self.millis.fetch_add(by.as_millis() as u64, Ordering::SeqCst);
    }
}

impl Default for ManualClock {
    fn default() -> Self {
        Self::new()
    }
}

impl Clock for ManualClock {
    fn now_millis(&self) -> UnixMillis {
        self.millis.load(Ordering::SeqCst)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn manual_clock_moves_only_when_advanced() {
        let clock = ManualClock::at_millis(1_000);
        assert_eq!(clock.now_millis(), 1_000);
        clock.advance(Duration::from_secs(2));
        assert_eq!(clock.now_millis(), 3_000);
        assert_eq!(clock.now_secs(), 3);
    }
}
