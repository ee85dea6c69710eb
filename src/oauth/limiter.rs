//! Login backoff: after repeated failures for one username, or from one client address, further
//! attempts are answered 429 with `Retry-After` without running Argon2 at all, so neither password
//! guessing nor a CPU-exhaustion flood gets far.
//!
//! Policy: the first `free` failures cost nothing; each failure after that doubles the wait (1 s,
//! 2 s, 4 s … capped at 15 min) before the next attempt is heard. An attempt counts as a failure
//! from the moment it is admitted (so a burst of parallel guesses is counted before Argon2 runs for
//! any of them); a success clears the username's count and gives the address its attempt back.
//! Counters are forgotten once they have been quiet for longer than twice the cap.

use std::hash::{BuildHasher, Hash};
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

/// Past this many tracked keys, new keys are not tracked (the per-address limit still applies):
/// a flood of invented usernames cannot grow the map without bound.
const MAX_TRACKED: usize = 1_000_000;

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

    /// Counts an attempt if `key` may try now (it stays counted as a failure until `undo`), else
    /// the milliseconds to wait. Check and count are one step, so parallel attempts cannot all
    /// pass the check before any of them is counted.
    fn admit(&self, key: K, now_ms: UnixMillis) -> Result<(), u64> {
        if self.map.len() >= MAX_TRACKED && !self.map.contains_key(&key) {
            return Ok(());
        }
        let mut a = self.map.entry(key).or_insert(Attempts {
            failures: 0,
            last_ms: now_ms,
        });
        let wait = (a.last_ms + wait_ms(a.failures, self.free)).saturating_sub(now_ms);
        if wait > 0 {
            return Err(wait);
        }
        a.failures = a.failures.saturating_add(1);
        a.last_ms = now_ms;
        Ok(())
    }

    /// Takes back one counted attempt.
    fn undo(&self, key: &K) {
        self.map.remove_if_mut(key, |_, a| {
            a.failures = a.failures.saturating_sub(1);
            a.failures == 0
        });
    }

    fn forget(&self, key: &K) {
        self.map.remove(key);
    }

    fn sweep(&self, now_ms: UnixMillis) {
        self.map.retain(|_, a| now_ms < a.last_ms + 2 * CAP_MS);
    }
}

/// Usernames are kept as keyed 64-bit hashes: bounded size whatever an attacker types.
type UserKey = u64;

pub struct LoginLimiter {
    users: Counter<UserKey>,
    ips: Counter<IpAddr>,
    hasher: RandomState,
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
            hasher: RandomState::default(),
        }
    }

    fn user_key(&self, username: &str) -> UserKey {
        self.hasher.hash_one(username)
    }

    /// Admits a login attempt, counting it as a failure until [`LoginLimiter::succeeded`]; or
    /// `Err(seconds)` to wait, with nothing counted.
    pub fn admit(&self, username: &str, ip: IpAddr, now_ms: UnixMillis) -> Result<(), u64> {
        let user = self.user_key(username);
        self.users.admit(user, now_ms).map_err(|ms| ms.div_ceil(1000))?;
        if let Err(ms) = self.ips.admit(ip, now_ms) {
            self.users.undo(&user);
            return Err(ms.div_ceil(1000));
        }
        Ok(())
    }

    /// The admitted attempt succeeded: the username starts afresh, the address gets its attempt back.
    pub fn succeeded(&self, username: &str, ip: IpAddr) {
        self.users.forget(&self.user_key(username));
        self.ips.undo(&ip);
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

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn backoff_doubles_after_the_free_failures() {
        let l = LoginLimiter::new(3, 100);
        let a = ip("192.0.2.1");
        for _ in 0..3 {
            assert_eq!(l.admit("ann", a, T0), Ok(()));
        }
        assert_eq!(l.admit("ann", a, T0), Err(1));
        assert_eq!(l.admit("ann", a, T0 + 1_000), Ok(()));
        assert_eq!(l.admit("ann", a, T0 + 1_000), Err(2));
        assert_eq!(l.admit("bob", ip("192.0.2.2"), T0), Ok(()), "others are not slowed");
        l.succeeded("ann", a);
        assert_eq!(
            l.admit("ann", a, T0 + 1_000),
            Ok(()),
            "a success starts the username afresh"
        );
    }

    #[test]
    fn parallel_attempts_are_counted_before_any_finishes() {
        // Admission counts at once: the sixth concurrent attempt waits although none has failed yet.
        let l = LoginLimiter::new(5, 100);
        let a = ip("192.0.2.1");
        let admitted = (0..50).filter(|_| l.admit("ann", a, T0).is_ok()).count();
        assert_eq!(admitted, 5);
    }

    #[test]
    fn one_address_spraying_usernames_is_slowed() {
        let l = LoginLimiter::new(100, 3);
        let a = ip("192.0.2.9");
        for i in 0..3 {
            assert!(l.admit(&format!("user{i}"), a, T0).is_ok());
        }
        assert_eq!(l.admit("someone-else", a, T0), Err(1));
    }

    #[test]
    fn successes_give_the_address_its_attempts_back() {
        let l = LoginLimiter::new(100, 2);
        let a = ip("192.0.2.3");
        for _ in 0..10 {
            assert!(l.admit("ann", a, T0).is_ok());
            l.succeeded("ann", a);
        }
    }

    #[test]
    fn waits_are_capped_and_counters_forgotten() {
        assert_eq!(wait_ms(1_000, 5), CAP_MS);
        let l = LoginLimiter::new(1, 1);
        assert!(l.admit("ann", ip("192.0.2.1"), T0).is_ok());
        l.sweep(T0 + 2 * CAP_MS);
        assert_eq!(l.users.map.len() + l.ips.map.len(), 0);
    }
}
