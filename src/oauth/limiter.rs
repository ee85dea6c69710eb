//! Login backoff: after repeated failures for one username, or from one client address, further
//! attempts are answered 429 with `Retry-After` without running Argon2 at all, so neither password
//! guessing nor a CPU-exhaustion flood gets far.
//!
//! Policy: the first `free` failures cost nothing; each failure after that doubles the wait (1 s,
//! 2 s, 4 s … capped at 15 min) before the next attempt is heard. A success for a username clears
//! its count. Counters are forgotten once they have been quiet for longer than the cap.

use std::hash::Hash;
use std::net::IpAddr;

use dashmap::DashMap;
use foldhash::fast::RandomState;

use crate::clock::UnixMillis;

/// Failures allowed per username before backoff.
pub const FREE_PER_USER: u32 = 5;
/// Failures allowed per client address (shared by everyone behind one NAT) before backoff.
pub const FREE_PER_IP: u32 = 20;
const BASE_MS: u64 = 1_000;
const CAP_MS: u64 = 15 * 60 * 1_000;

#[derive(Debug, Clone, Copy)]
struct Attempts {
    failures: u32,
    last_ms: UnixMillis,
}

fn wait_ms(failures: u32, free: u32) -> u64 {
    if failures < free {
        return 0;
    }
    let doublings = (failures - free).min(20);
    (BASE_MS << doublings).min(CAP_MS)
}

struct Counter<K: Eq + Hash> {
    map: DashMap<K, Attempts, RandomState>,
    free: u32,
}

impl<K: Eq + Hash> Counter<K> {
    fn new(free: u32) -> Self {
        Counter {
            map: DashMap::default(),
            free,
        }
    }

    /// Milliseconds until `key` may try again (0: now).
    fn retry_in(&self, key: &K, now_ms: UnixMillis) -> u64 {
        self.map
            .get(key)
            .map(|a| (a.last_ms + wait_ms(a.failures, self.free)).saturating_sub(now_ms))
            .unwrap_or(0)
    }

    fn fail(&self, key: K, now_ms: UnixMillis) {
        let mut a = self.map.entry(key).or_insert(Attempts {
            failures: 0,
            last_ms: now_ms,
        });
        a.failures = a.failures.saturating_add(1);
        a.last_ms = now_ms;
    }

    fn sweep(&self, now_ms: UnixMillis) {
        self.map.retain(|_, a| now_ms < a.last_ms + 2 * CAP_MS);
    }
}

pub struct LoginLimiter {
    users: Counter<Box<str>>,
    ips: Counter<IpAddr>,
}

impl Default for LoginLimiter {
    fn default() -> Self {
        Self::new(FREE_PER_USER, FREE_PER_IP)
    }
}

impl LoginLimiter {
    pub fn new(free_per_user: u32, free_per_ip: u32) -> Self {
        LoginLimiter {
            users: Counter::new(free_per_user),
            ips: Counter::new(free_per_ip),
        }
    }

    /// `Some(seconds)` to wait before this login may be attempted.
    pub fn check(&self, username: &str, ip: IpAddr, now_ms: UnixMillis) -> Option<u64> {
        let user_key: Box<str> = username.into();
        let wait = self
            .users
            .retry_in(&user_key, now_ms)
            .max(self.ips.retry_in(&ip, now_ms));
        (wait > 0).then(|| wait.div_ceil(1000))
    }

    pub fn record_failure(&self, username: &str, ip: IpAddr, now_ms: UnixMillis) {
        self.users.fail(username.into(), now_ms);
        self.ips.fail(ip, now_ms);
    }

    pub fn record_success(&self, username: &str) {
        self.users.map.remove(username);
    }

    pub fn sweep(&self, now_ms: UnixMillis) {
        self.users.sweep(now_ms);
        self.ips.sweep(now_ms);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const T0: u64 = 1_800_000_000_000;

    #[test]
    fn backoff_doubles_after_the_free_failures() {
        let l = LoginLimiter::new(3, 100);
        let ip: IpAddr = "192.0.2.1".parse().unwrap();
        for _ in 0..2 {
            l.record_failure("ann", ip, T0);
            assert_eq!(l.check("ann", ip, T0), None);
        }
        l.record_failure("ann", ip, T0);
        assert_eq!(l.check("ann", ip, T0), Some(1));
        assert_eq!(l.check("ann", ip, T0 + 1_000), None);
        l.record_failure("ann", ip, T0 + 1_000);
        assert_eq!(l.check("ann", ip, T0 + 1_000), Some(2));
        assert_eq!(
            l.check("bob", "192.0.2.2".parse().unwrap(), T0),
            None,
            "others are not slowed"
        );
        l.record_success("ann");
        assert_eq!(l.check("ann", ip, T0 + 1_000), None);
    }

    #[test]
    fn one_address_spraying_usernames_is_slowed() {
        let l = LoginLimiter::new(100, 3);
        let ip: IpAddr = "192.0.2.9".parse().unwrap();
        for i in 0..3 {
            l.record_failure(&format!("user{i}"), ip, T0);
        }
        assert_eq!(l.check("someone-else", ip, T0), Some(1));
    }

    #[test]
    fn waits_are_capped_and_counters_forgotten() {
        assert_eq!(wait_ms(1_000, 5), CAP_MS);
        let l = LoginLimiter::new(1, 1);
        let ip: IpAddr = "192.0.2.1".parse().unwrap();
        l.record_failure("ann", ip, T0);
        l.sweep(T0 + 2 * CAP_MS);
        assert_eq!(l.users.map.len() + l.ips.map.len(), 0);
    }
}
