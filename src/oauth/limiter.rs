//! Login backoff: after repeated failures for one username, or from one client address, further
//! attempts are answered 429 with `Retry-After` without running Argon2 at all, so neither password
//! guessing nor a CPU-exhaustion flood gets far.
//!
//! Policy: the first `free` failures cost nothing; each failure after that doubles the wait (1 s,
//! 2 s, 4 s … capped at 15 min) before the next attempt is heard. For a username, attempts still in
//! flight count as failures, so a burst of parallel guesses gets no more Argon2 runs than
//! sequential ones; an address may have at most [`MAX_PENDING_PER_IP`] attempts in flight. A
//! success clears the username's failures. An attempt the client abandons (it closes the
//! connection or resets the stream before the answer) counts as a failure, and is audited: its
//! password check runs to the end all the same, so abandoning must cost a guesser what failing
//! does. Counters are forgotten once quiet for twice the cap.
//!
//! [`Limiter`] is what the token endpoint uses: this process's counters ([`LoginLimiter`], for the
//! memory and durable stores), or counters shared by every instance through Redis
//! ([`redis::RedisLimiter`], same policy), so N instances do not allow N times the guesses.

pub mod redis;

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
    /// Attempts admitted and not finished yet.
    pending: u32,
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
/// Login attempts in flight at once from one address (each costs an Argon2 run).
pub const MAX_PENDING_PER_IP: u32 = 64;

struct Counter<K: Eq + Hash> {
    map: DashMap<K, Attempts, RandomState>,
    free: u32,
    max_pending: u32,
    /// Count attempts in flight as if they had failed (per username: a burst of parallel guesses
    /// gets no more Argon2 runs than sequential ones would).
    pending_as_failures: bool,
}

impl<K: Eq + Hash> Counter<K> {
    fn new(free: u32, max_pending: u32, pending_as_failures: bool) -> Self {
        Counter {
            map: DashMap::default(),
            free,
            max_pending,
            pending_as_failures,
        }
    }

    /// Admits an attempt (now in flight) or says how many milliseconds to wait. Check and count
    /// are one step under the entry's lock.
    fn admit(&self, key: K, now_ms: UnixMillis) -> Result<(), u64> {
        if self.map.len() >= MAX_TRACKED && !self.map.contains_key(&key) {
            return Ok(());
        }
        let mut a = self.map.entry(key).or_insert(Attempts {
            failures: 0,
            pending: 0,
            last_ms: now_ms,
        });
        let wait = (a.last_ms + wait_ms(a.failures, self.free)).saturating_sub(now_ms);
        if wait > 0 {
            return Err(wait);
        }
        let busy = a.pending >= self.max_pending
            || (self.pending_as_failures && a.pending > 0 && a.failures + a.pending >= self.free);
        if busy {
            return Err(BASE_MS);
        }
        a.pending += 1;
        Ok(())
    }

    /// Ends an admitted attempt: `Some(true)` succeeded, `Some(false)` failed, `None` not counted.
    fn finish(&self, key: &K, outcome: Option<bool>, now_ms: UnixMillis) {
        let forget = outcome == Some(true) && self.pending_as_failures;
        self.map.remove_if_mut(key, |_, a| {
            a.pending = a.pending.saturating_sub(1);
            match outcome {
                Some(false) => {
                    a.failures = a.failures.saturating_add(1);
                    a.last_ms = now_ms;
                }
                Some(true) if forget => a.failures = 0,
                _ => {}
            }
            a.pending == 0 && a.failures == 0
        });
    }

    fn sweep(&self, now_ms: UnixMillis) {
        self.map.retain(|_, a| a.pending > 0 || now_ms < a.last_ms + 2 * CAP_MS);
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

/// Who is trying to log in, as far as the audit log may name them.
#[derive(Debug, Clone, Copy)]
pub struct Who<'a> {
    pub username: &'a str,
    /// Whether `username` is a configured user. Unknown ones are never logged: people type
    /// passwords into the username field.
    pub known_user: bool,
    pub client: &'a str,
    pub ip: IpAddr,
}

impl<'a> Who<'a> {
    /// The username as the audit log may show it.
    pub fn loggable_username(&self) -> &'a str {
        if self.known_user {
            self.username
        } else {
            "(unknown user)"
        }
    }
}

/// How an admitted attempt ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Outcome {
    Succeeded,
    Failed,
    /// The gateway could not check the password (its queue was full): nothing is counted.
    Unchecked,
    /// Dropped unsaid: the client went away before the answer. Counted as a failure.
    Abandoned,
}

/// An admitted login attempt. Say how it ended; dropped unsaid, it was abandoned by the client and
/// counts as a failure.
pub struct Attempt<'a> {
    limiter: &'a LoginLimiter,
    who: Who<'a>,
    user: UserKey,
    outcome: Outcome,
    now_ms: UnixMillis,
}

impl Attempt<'_> {
    pub fn succeeded(mut self) {
        self.outcome = Outcome::Succeeded;
    }
    pub fn failed(mut self, now_ms: UnixMillis) {
        self.outcome = Outcome::Failed;
        self.now_ms = now_ms;
    }
    /// The password was not checked (the gateway was too busy): the attempt is not counted.
    pub fn unchecked(mut self) {
        self.outcome = Outcome::Unchecked;
    }
}

impl Drop for Attempt<'_> {
    fn drop(&mut self) {
        let counted = match self.outcome {
            Outcome::Succeeded => Some(true),
            Outcome::Failed => Some(false),
            Outcome::Unchecked => None,
            Outcome::Abandoned => {
                let w = &self.who;
                audit_abandoned(w.loggable_username(), w.client, w.ip);
                // Timed from admission: no clock here, and the check it started ran meanwhile.
                Some(false)
            }
        };
        self.limiter.users.finish(&self.user, counted, self.now_ms);
        self.limiter.ips.finish(&self.who.ip, counted, self.now_ms);
    }
}

impl LoginLimiter {
    pub fn new(free_per_user: u32, free_per_ip: u32) -> Self {
        LoginLimiter {
            users: Counter::new(free_per_user, free_per_user.max(1), true),
            ips: Counter::new(free_per_ip, MAX_PENDING_PER_IP, false),
            hasher: RandomState::default(),
        }
    }

    /// Admits a login attempt, or `Err(seconds)` to wait (nothing counted).
    pub fn admit<'a>(&'a self, who: Who<'a>, now_ms: UnixMillis) -> Result<Attempt<'a>, u64> {
        let user = self.hasher.hash_one(who.username);
        self.users.admit(user, now_ms).map_err(|ms| ms.div_ceil(1000))?;
        if let Err(ms) = self.ips.admit(who.ip, now_ms) {
            self.users.finish(&user, None, now_ms);
            return Err(ms.div_ceil(1000));
        }
        Ok(Attempt {
            limiter: self,
            who,
            user,
            outcome: Outcome::Abandoned,
            now_ms,
        })
    }

    pub fn sweep(&self, now_ms: UnixMillis) {
        self.users.sweep(now_ms);
        self.ips.sweep(now_ms);
    }
}

/// Why a login attempt was not admitted.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Refused {
    /// Too many failures or attempts in flight: retry after this many seconds (429).
    Wait(u64),
    /// The shared counters cannot be reached: logins fail closed (503).
    Unavailable(String),
}

/// The login limiter the token endpoint uses.
pub enum Limiter {
    Local(LoginLimiter),
    Redis(redis::RedisLimiter),
}

impl From<LoginLimiter> for Limiter {
    fn from(l: LoginLimiter) -> Self {
        Limiter::Local(l)
    }
}

/// The audit line of an attempt the client abandoned (`username` already loggable).
fn audit_abandoned(username: &str, client: &str, ip: IpAddr) {
    tracing::info!(
        target: "tokengate::audit",
        event = "login_abandoned",
        username,
        client,
        peer = %ip,
    );
}

/// An admitted login attempt: say how it ended (the shared limiter records it before the answer
/// goes out, so a client cannot race its next guess past its own failure). Dropped unsaid (the
/// client went away), it counts as a failure and is audited as `login_abandoned`.
pub enum LoginAttempt<'a> {
    Local(Attempt<'a>),
    Redis(redis::RedisAttempt),
}

impl LoginAttempt<'_> {
    pub async fn succeeded(self) {
        match self {
            LoginAttempt::Local(a) => a.succeeded(),
            LoginAttempt::Redis(a) => a.finish(Some(true), 0).await,
        }
    }

    pub async fn failed(self, now_ms: UnixMillis) {
        match self {
            LoginAttempt::Local(a) => a.failed(now_ms),
            LoginAttempt::Redis(a) => a.finish(Some(false), now_ms).await,
        }
    }

    /// The password was not checked (the gateway was too busy): the attempt is not counted.
    pub async fn unchecked(self) {
        match self {
            LoginAttempt::Local(a) => a.unchecked(),
            LoginAttempt::Redis(a) => a.finish(None, 0).await,
        }
    }
}

impl Limiter {
    /// Admits a login attempt, or says why not (nothing counted then).
    pub async fn admit<'a>(&'a self, who: Who<'a>, now_ms: UnixMillis) -> Result<LoginAttempt<'a>, Refused> {
        match self {
            Limiter::Local(l) => l.admit(who, now_ms).map(LoginAttempt::Local).map_err(Refused::Wait),
            Limiter::Redis(l) => l.admit(who, now_ms).await.map(LoginAttempt::Redis),
        }
    }

    /// Forgets idle local counters (shared ones expire in Redis by themselves).
    pub fn sweep(&self, now_ms: UnixMillis) {
        match self {
            Limiter::Local(l) => l.sweep(now_ms),
            Limiter::Redis(_) => {}
        }
    }
}

/// The limiter's behaviour, run against each implementation (the local one here, the shared one
/// in the Redis store's tests).
#[cfg(test)]
pub(crate) mod scenarios {
    use super::*;

    pub const T0: u64 = 1_800_000_000_000;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    pub fn who(username: &str, ip: IpAddr) -> Who<'_> {
        Who {
            username,
            known_user: true,
            client: "web",
            ip,
        }
    }

    async fn fail(l: &Limiter, user: &str, addr: IpAddr, now: u64) -> Result<(), Refused> {
        l.admit(who(user, addr), now).await?.failed(now).await;
        Ok(())
    }

    /// Builds a limiter with `free_per_user` and `free_per_ip` failures before backoff; `settle`
    /// waits until the outcomes of dropped attempts have been recorded.
    pub async fn run<S: Future<Output = ()>>(make: impl Fn(u32, u32) -> Limiter, settle: impl Fn() -> S) {
        // Backoff doubles after the free failures; a success starts the username afresh.
        let l = make(3, 100);
        let a = ip("192.0.2.1");
        for _ in 0..3 {
            assert_eq!(fail(&l, "ann", a, T0).await, Ok(()));
        }
        assert!(matches!(l.admit(who("ann", a), T0).await, Err(Refused::Wait(1))));
        assert_eq!(fail(&l, "ann", a, T0 + 1_000).await, Ok(()));
        assert!(matches!(
            l.admit(who("ann", a), T0 + 1_000).await,
            Err(Refused::Wait(2))
        ));
        assert!(
            l.admit(who("bob", ip("192.0.2.2")), T0).await.is_ok(),
            "others are not slowed"
        );
        l.admit(who("ann", a), T0 + 3_000).await.unwrap().succeeded().await;
        for _ in 0..3 {
            assert_eq!(fail(&l, "ann", a, T0 + 3_000).await, Ok(()));
        }

        // Parallel guesses for one username get no more checks than sequential ones.
        let l = make(5, 100);
        let mut admitted = Vec::new();
        for _ in 0..50 {
            if let Ok(at) = l.admit(who("ann", a), T0).await {
                admitted.push(at);
            }
        }
        assert_eq!(admitted.len(), 5);
        for attempt in admitted {
            attempt.succeeded().await;
        }
        assert!(
            l.admit(who("ann", a), T0).await.is_ok(),
            "finished attempts stop counting as in flight"
        );

        // An attempt the client abandons (dropped unsaid) counts as a failure; one the gateway
        // could not check counts as nothing.
        let l = make(1, 100);
        l.admit(who("cat", a), T0).await.unwrap().unchecked().await;
        drop(l.admit(who("cat", a), T0).await.unwrap());
        settle().await;
        assert!(
            matches!(l.admit(who("cat", a), T0).await, Err(Refused::Wait(1))),
            "an abandoned attempt is a failure"
        );

        // One address spraying usernames is slowed.
        let l = make(100, 3);
        let sprayer = ip("192.0.2.9");
        for i in 0..3 {
            assert_eq!(fail(&l, &format!("user{i}"), sprayer, T0).await, Ok(()));
        }
        assert!(matches!(
            l.admit(who("someone-else", sprayer), T0).await,
            Err(Refused::Wait(1))
        ));

        // Many users behind one address log in at once, up to the in-flight bound.
        let l = make(5, 20);
        let nat = ip("192.0.2.3");
        let names: Vec<String> = (0..MAX_PENDING_PER_IP).map(|i| format!("u{i}")).collect();
        let mut inflight = Vec::new();
        for name in &names {
            inflight.push(l.admit(who(name, nat), T0).await.unwrap());
        }
        assert!(
            l.admit(who("one-more", nat), T0).await.is_err(),
            "in-flight attempts per address are bounded"
        );
        for attempt in inflight {
            attempt.succeeded().await;
        }
        assert!(l.admit(who("one-more", nat), T0).await.is_ok());
    }

    #[tokio::test]
    async fn the_local_limiter() {
        run(|u, i| LoginLimiter::new(u, i).into(), || async {}).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const T0: u64 = 1_800_000_000_000;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    fn who(username: &str, ip: IpAddr) -> Who<'_> {
        Who {
            username,
            known_user: true,
            client: "web",
            ip,
        }
    }

    fn fail(l: &LoginLimiter, user: &str, addr: IpAddr, now: u64) -> Result<(), u64> {
        l.admit(who(user, addr), now).map(|a| a.failed(now))
    }

    #[test]
    fn backoff_doubles_after_the_free_failures() {
        let l = LoginLimiter::new(3, 100);
        let a = ip("192.0.2.1");
        for _ in 0..3 {
            assert_eq!(fail(&l, "ann", a, T0), Ok(()));
        }
        assert!(matches!(l.admit(who("ann", a), T0), Err(1)));
        assert_eq!(fail(&l, "ann", a, T0 + 1_000), Ok(()));
        assert!(matches!(l.admit(who("ann", a), T0 + 1_000), Err(2)));
        assert!(
            l.admit(who("bob", ip("192.0.2.2")), T0).is_ok(),
            "others are not slowed"
        );
        // After the wait, a success starts the username afresh.
        l.admit(who("ann", a), T0 + 3_000).unwrap().succeeded();
        for _ in 0..3 {
            assert_eq!(fail(&l, "ann", a, T0 + 3_000), Ok(()));
        }
    }

    #[test]
    fn parallel_guesses_for_one_username_get_no_more_checks_than_sequential_ones() {
        let l = LoginLimiter::new(5, 100);
        let a = ip("192.0.2.1");
        let admitted: Vec<_> = (0..50).filter_map(|_| l.admit(who("ann", a), T0).ok()).collect();
        assert_eq!(admitted.len(), 5);
        for attempt in admitted {
            attempt.succeeded();
        }
        assert!(
            l.admit(who("ann", a), T0).is_ok(),
            "finished attempts stop counting as in flight"
        );
    }

    #[test]
    fn abandoned_attempts_count_as_failures_for_the_username_and_the_address() {
        let l = LoginLimiter::new(3, 4);
        let a = ip("192.0.2.1");
        for _ in 0..3 {
            // Admitted, then dropped without an outcome: the client went away mid-check.
            drop(l.admit(who("ann", a), T0).unwrap());
        }
        assert!(matches!(l.admit(who("ann", a), T0), Err(1)), "the username backs off");
        drop(l.admit(who("bob", a), T0).unwrap());
        assert!(
            matches!(l.admit(who("carol", a), T0), Err(1)),
            "the address backs off after its 4 free failures"
        );
    }

    #[test]
    fn attempts_the_gateway_could_not_check_are_not_counted() {
        let l = LoginLimiter::new(1, 1);
        let a = ip("192.0.2.1");
        for _ in 0..3 {
            l.admit(who("ann", a), T0).unwrap().unchecked();
        }
        assert!(l.admit(who("ann", a), T0).is_ok());
    }

    #[test]
    fn one_address_spraying_usernames_is_slowed() {
        let l = LoginLimiter::new(100, 3);
        let a = ip("192.0.2.9");
        for i in 0..3 {
            assert_eq!(fail(&l, &format!("user{i}"), a, T0), Ok(()));
        }
        assert!(matches!(l.admit(who("someone-else", a), T0), Err(1)));
    }

    #[test]
    fn many_users_behind_one_address_log_in_at_once() {
        let l = LoginLimiter::new(5, 20);
        let a = ip("192.0.2.3");
        let names: Vec<String> = (0..MAX_PENDING_PER_IP).map(|i| format!("u{i}")).collect();
        let inflight: Vec<_> = names.iter().map(|n| l.admit(who(n, a), T0).unwrap()).collect();
        assert!(
            l.admit(who("one-more", a), T0).is_err(),
            "in-flight attempts per address are bounded"
        );
        for attempt in inflight {
            attempt.succeeded();
        }
        assert!(l.admit(who("one-more", a), T0).is_ok());
    }

    #[test]
    fn waits_are_capped_and_counters_forgotten() {
        assert_eq!(wait_ms(1_000, 5), CAP_MS);
        let l = LoginLimiter::new(1, 1);
        fail(&l, "ann", ip("192.0.2.1"), T0).unwrap();
        l.sweep(T0 + 2 * CAP_MS);
        assert_eq!(l.users.map.len() + l.ips.map.len(), 0);
    }
}
