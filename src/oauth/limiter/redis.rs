//! The login limiter's counters in Redis, shared by every instance: the same policy as
//! [`LoginLimiter`](super::LoginLimiter) (free failures, doubling backoff, attempts in flight
//! counted as failures per username, bounds per address), checked and counted in one script
//! (`admit.lua`) and ended in another (`finish.lua`).
//!
//! Differences forced by the network: an attempt in flight is a lease (an instance that dies
//! mid-login cannot leave a username blocked for ever); an attempt's end is recorded before its
//! answer goes out, or, when it is dropped unsaid (the client left: a failure, audited as
//! `login_abandoned`), by a task spawned from `Drop`. Redis unreachable: logins fail closed
//! (503), since admitting them unlimited would hand password guessing the outage.

use std::net::IpAddr;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, LazyLock};

use redis::Script;

use super::{BASE_MS, CAP_MS, FREE_PER_IP, FREE_PER_USER, MAX_PENDING_PER_IP, Refused, Who};
use crate::clock::UnixMillis;
use crate::crypto::{random_bytes, sha256};
use crate::store::RedisStore;
use crate::store::redis::Conn;

/// How long an admitted attempt counts as in flight at most (an Argon2 check takes well under a
/// second; one outliving this stops counting, and its outcome is not recorded).
pub const LEASE_MS: u64 = 30_000;
/// Outcomes of dropped attempts being recorded at once; past this, further ones are not (their
/// leases lapse instead) and are counted in [`RedisLimiter::reports_skipped`].
pub const MAX_REPORTS_IN_FLIGHT: usize = 4_096;

static ADMIT: LazyLock<Script> = LazyLock::new(|| Script::new(include_str!("admit.lua")));
static FINISH: LazyLock<Script> = LazyLock::new(|| Script::new(include_str!("finish.lua")));

struct Inner {
    conn: Arc<Conn>,
    free_per_user: u32,
    free_per_ip: u32,
    /// Attempt ids: this instance's random tag and a counter.
    instance: String,
    next: AtomicU64,
    reports_in_flight: AtomicUsize,
    reports_skipped: AtomicU64,
}

/// Cloning shares the counters' connection and in-flight reports.
#[derive(Clone)]
pub struct RedisLimiter {
    inner: Arc<Inner>,
}

impl RedisLimiter {
    /// The limiter over `store`'s connection, with the default policy.
    pub fn new(store: &RedisStore) -> Self {
        Self::with_policy(store, FREE_PER_USER, FREE_PER_IP)
    }

    pub fn with_policy(store: &RedisStore, free_per_user: u32, free_per_ip: u32) -> Self {
        let tag = random_bytes::<6>().map_or(0, |b| b.iter().fold(0u64, |a, &b| (a << 8) | u64::from(b)));
        RedisLimiter {
            inner: Arc::new(Inner {
                conn: store.conn().clone(),
                free_per_user,
                free_per_ip,
                instance: format!("{tag:012x}"),
                next: AtomicU64::new(0),
                reports_in_flight: AtomicUsize::new(0),
                reports_skipped: AtomicU64::new(0),
            }),
        }
    }

    /// Admits a login attempt, or says how long to wait; `Unavailable` when Redis cannot say.
    pub async fn admit(&self, who: Who<'_>, now_ms: UnixMillis) -> Result<RedisAttempt, Refused> {
        let (username, ip) = (who.username, who.ip);
        let inner = &self.inner;
        let keys = &inner.conn.keys;
        // Usernames are keyed by a digest: bounded key size, and what people type into the
        // username field (sometimes a password) never lands in Redis.
        let mut input = b"tokengate/login-user/v1\0".to_vec();
        input.extend_from_slice(username.as_bytes());
        let user: String = sha256(&input)[..16].iter().map(|b| format!("{b:02x}")).collect();
        let user = keys.login(&format!("u:{user}"));
        let addr = keys.login(&format!("a:{ip}"));
        let mut attempt = RedisAttempt {
            inner: inner.clone(),
            keys: [format!("{user}:p"), format!("{addr}:p"), user, addr],
            id: format!("{}-{}", inner.instance, inner.next.fetch_add(1, Ordering::Relaxed)),
            who: Audit {
                username: who.loggable_username().to_owned(),
                client: who.client.to_owned(),
                ip,
            },
            // Dropped unsaid, the client abandoned it: a failure.
            outcome: Some(false),
            now_ms,
            done: false,
        };
        let [user_pending, addr_pending, user, addr] = &attempt.keys;
        let mut inv = ADMIT.key(user);
        inv.key(user_pending)
            .key(addr)
            .key(addr_pending)
            .arg(now_ms)
            .arg(&attempt.id)
            .arg(LEASE_MS)
            .arg(inner.free_per_user)
            .arg(inner.free_per_user.max(1))
            .arg(inner.free_per_ip)
            .arg(MAX_PENDING_PER_IP)
            .arg(BASE_MS)
            .arg(CAP_MS);
        let admitted = inner.conn.run::<u64>(&inv).await;
        drop(inv);
        match admitted {
            Ok(0) => Ok(attempt),
            // Not admitted: nothing was counted, so there is nothing to end.
            Ok(wait) => {
                attempt.done = true;
                Err(Refused::Wait(wait.div_ceil(1000)))
            }
            Err(e) => {
                attempt.done = true;
                Err(Refused::Unavailable(e.to_string()))
            }
        }
    }

    /// Outcomes of dropped attempts not yet recorded.
    pub fn reports_in_flight(&self) -> usize {
        self.inner.reports_in_flight.load(Ordering::Acquire)
    }

    /// Outcomes not recorded because [`MAX_REPORTS_IN_FLIGHT`] were already under way.
    pub fn reports_skipped(&self) -> u64 {
        self.inner.reports_skipped.load(Ordering::Relaxed)
    }
}

/// An admitted attempt (see [`super::LoginAttempt`]).
pub struct RedisAttempt {
    inner: Arc<Inner>,
    /// User in flight, address in flight, user counter, address counter.
    keys: [String; 4],
    id: String,
    who: Audit,
    outcome: Option<bool>,
    now_ms: UnixMillis,
    /// Recorded (or nothing to record).
    done: bool,
}

/// Who an abandoned attempt was, for its audit line.
struct Audit {
    /// Already "(unknown user)" for a name that is not a configured user.
    username: String,
    client: String,
    ip: IpAddr,
}

async fn report(inner: &Inner, keys: &[String; 4], id: &str, outcome: Option<bool>, now_ms: UnixMillis) {
    let [user_pending, addr_pending, user, addr] = keys;
    let mut inv = FINISH.key(user);
    inv.key(user_pending)
        .key(addr)
        .key(addr_pending)
        .arg(id)
        .arg(match outcome {
            Some(true) => "s",
            Some(false) => "f",
            None => "a",
        })
        .arg(now_ms)
        .arg(2 * CAP_MS);
    if let Err(e) = inner.conn.run::<i64>(&inv).await {
        tracing::debug!(error = %e, "login limiter: an attempt's outcome was not recorded");
    }
}

impl RedisAttempt {
    /// Records how the attempt ended (`now_ms` for a failure; a success keeps the admission time).
    pub(super) async fn finish(mut self, outcome: Option<bool>, now_ms: UnixMillis) {
        self.outcome = outcome;
        if outcome == Some(false) {
            self.now_ms = now_ms;
        }
        report(&self.inner, &self.keys, &self.id, self.outcome, self.now_ms).await;
        // Cancelled before this line, `Drop` records it again; finish.lua ignores the second.
        self.done = true;
    }
}

/// Counts a report in flight for as long as its task lives.
struct InFlight(Arc<Inner>);

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.reports_in_flight.fetch_sub(1, Ordering::AcqRel);
    }
}

impl Drop for RedisAttempt {
    fn drop(&mut self) {
        if self.done {
            return;
        }
        let w = &self.who;
        super::audit_abandoned(&w.username, &w.client, w.ip);
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            return;
        };
        let inner = self.inner.clone();
        if inner.reports_in_flight.fetch_add(1, Ordering::AcqRel) >= MAX_REPORTS_IN_FLIGHT {
            inner.reports_in_flight.fetch_sub(1, Ordering::AcqRel);
            inner.reports_skipped.fetch_add(1, Ordering::Relaxed);
            return;
        }
        let guard = InFlight(inner);
        let keys = std::mem::take(&mut self.keys);
        let id = std::mem::take(&mut self.id);
        let (outcome, now_ms) = (self.outcome, self.now_ms);
        runtime.spawn(async move {
            report(&guard.0, &keys, &id, outcome, now_ms).await;
            drop(guard);
        });
    }
}
