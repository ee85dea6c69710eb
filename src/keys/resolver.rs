//! An external issuer's keys, fetched from its `jwks_uri` and kept fresh.
//!
//! ```text
//!   start ─▶ not ready ──fetch ok──▶ ready (keys by kid) ──every ¾ of the lifetime──▶ refetch
//!             ▲   │ fail: retry in 1 s, 2 s, 4 s … 60 s        │ fail: keep the keys (stale) and
//!             │   ▼                                            │ retry with the same backoff
//!             └── (keys older than 24 h are dropped) ◀─────────┘
//! ```
//!
//! Nothing here blocks: requests read the keys through an `ArcSwap`; fetches run in their own
//! task (a request that stops waiting does not cancel one), and at most one runs at a time.
//! Background fetches are started by [`Resolver::poll`] (the maintenance loop, every second). A
//! token whose key is missing asks for one refetch ([`Resolver::refetch`]): it joins a fetch in
//! flight, or starts one if the last such refetch is at least `min_refetch_interval` old, the
//! issuer is not backing off, and its kid was not just found missing; so a burst of tokens with
//! invented kids costs at most one fetch per interval. Every decision reads the gateway's
//! [`crate::clock::Clock`], so tests move time instead of waiting for it.
//!
//! The lifetime of a key set is the response's `Cache-Control: max-age`, clamped to
//! [`MIN_LIFETIME`, `MAX_LIFETIME`] ([`DEFAULT_LIFETIME`] without one). An issuer that removes a
//! key from its JWKS has it removed here at the next refresh; tokens it signed that the validator
//! already cached stay accepted until their `exp`, as with any JWKS-caching verifier.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use arc_swap::ArcSwapOption;
use serde_json::Value;
use tokio::sync::watch;

use super::fetch::{FETCH_TIMEOUT, Fetch, Fetched, HttpFetcher};
use super::jwk::{RemoteKey, remote_key};
use crate::clock::SharedClock;
use crate::config::{IssuerSettings, SigningAlg};

pub const MIN_LIFETIME: Duration = Duration::from_secs(60);
pub const MAX_LIFETIME: Duration = Duration::from_secs(3600);
pub const DEFAULT_LIFETIME: Duration = Duration::from_secs(600);
/// Keys are used this long after their last successful fetch while refreshes fail.
pub const MAX_STALE: Duration = Duration::from_secs(24 * 3600);
pub const FIRST_RETRY: Duration = Duration::from_secs(1);
pub const MAX_RETRY: Duration = Duration::from_secs(60);
/// Keys kept from one JWKS (a set is a handful; more is not a JWKS we want to scan per token).
pub const MAX_KEYS: usize = 100;
/// Kids remembered as missing (each for `min_refetch_interval`).
const MAX_UNKNOWN_KIDS: usize = 4096;
/// A fetch failure is logged at WARN at most this often (more often at DEBUG).
const WARN_EVERY_MS: u64 = 60_000;

fn ms(d: Duration) -> u64 {
    d.as_millis() as u64
}

/// One successful fetch.
struct Loaded {
    keys: Vec<Arc<RemoteKey>>,
    fetched_ms: u64,
}

#[derive(Default)]
struct Control {
    in_flight: bool,
    consecutive_failures: u32,
    /// When the background may fetch next (a refresh before expiry, or the next retry).
    next_attempt_ms: u64,
    /// The last refetch asked for by a token (the `min_refetch_interval` limit).
    last_forced_ms: Option<u64>,
    /// kid → until when it is known to be missing.
    unknown_kids: HashMap<Box<str>, u64>,
    last_warn_ms: Option<u64>,
}

/// What a resolver has for a token's key.
pub enum Lookup {
    Found(Arc<RemoteKey>),
    /// No keys loaded (yet, or any more).
    NotReady,
    /// Keys are loaded, none is this token's.
    Unknown,
}

/// An issuer's readiness and fetch counters (for /metrics, logs and tests).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IssuerStatus {
    pub issuer: String,
    /// Keys are loaded and younger than [`MAX_STALE`]: its tokens can be verified.
    pub ready: bool,
    pub keys: usize,
    /// Fetches completed (successful or not), and failed.
    pub fetches: u64,
    pub failures: u64,
    pub consecutive_failures: u32,
    pub fetched_at_ms: Option<u64>,
}

pub struct Resolver {
    settings: IssuerSettings,
    fetcher: Box<dyn Fetch>,
    clock: SharedClock,
    keys: ArcSwapOption<Loaded>,
    control: Mutex<Control>,
    /// Counts completed fetches; waiters watch it.
    done: watch::Sender<u64>,
    fetches: AtomicU64,
    failures: AtomicU64,
}

impl Resolver {
    /// A resolver fetching over HTTP(S). No fetch starts until [`Resolver::poll`].
    pub fn http(settings: IssuerSettings, clock: SharedClock) -> anyhow::Result<Resolver> {
        let fetcher = HttpFetcher::new(&settings)?;
        if settings.plain_http() {
            tracing::warn!(
                issuer = %settings.issuer,
                jwks_uri = %settings.jwks_uri,
                "the issuer's keys are fetched without TLS (http://): anyone on that network path can substitute them"
            );
        }
        Ok(Resolver::new(settings, Box::new(fetcher), clock))
    }

    pub fn new(settings: IssuerSettings, fetcher: Box<dyn Fetch>, clock: SharedClock) -> Resolver {
        Resolver {
            settings,
            fetcher,
            clock,
            keys: ArcSwapOption::empty(),
            control: Mutex::new(Control::default()),
            done: watch::channel(0).0,
            fetches: AtomicU64::new(0),
            failures: AtomicU64::new(0),
        }
    }

    pub fn settings(&self) -> &IssuerSettings {
        &self.settings
    }

    fn control(&self) -> MutexGuard<'_, Control> {
        // A panic while holding it cannot leave it inconsistent in a way that matters here.
        self.control.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn loaded(&self, now_ms: u64) -> Option<Arc<Loaded>> {
        self.keys
            .load_full()
            .filter(|l| now_ms < l.fetched_ms.saturating_add(ms(MAX_STALE)))
    }

    pub fn is_ready(&self) -> bool {
        self.loaded(self.clock.now_millis()).is_some()
    }

    /// The key for a token's `kid` (without one: the only key for `alg`).
    pub fn lookup(&self, kid: Option<&str>, alg: SigningAlg) -> Lookup {
        let Some(loaded) = self.loaded(self.clock.now_millis()) else {
            return Lookup::NotReady;
        };
        let found = match kid {
            Some(kid) => loaded.keys.iter().find(|k| k.kid.as_deref() == Some(kid)),
            None => {
                let mut fitting = loaded.keys.iter().filter(|k| k.algs.contains(alg));
                match (fitting.next(), fitting.next()) {
                    (Some(k), None) => Some(k),
                    _ => None,
                }
            }
        };
        match found {
            Some(k) => Lookup::Found(k.clone()),
            None => Lookup::Unknown,
        }
    }

    /// Starts a background fetch if one is due (first load, refresh before expiry, retry).
    pub fn poll(self: &Arc<Self>) {
        let now = self.clock.now_millis();
        let mut c = self.control();
        if c.in_flight || now < c.next_attempt_ms {
            return;
        }
        c.in_flight = true;
        drop(c);
        self.spawn_fetch();
    }

    /// A token's key is missing (`kid`; `None` for a token without one): returns a future that
    /// resolves when a fetch that may bring it has completed, or `None` if no fetch may be made for
    /// it now. The future never outlives [`FETCH_TIMEOUT`] by much.
    pub fn refetch(self: &Arc<Self>, kid: Option<&str>) -> Option<impl Future<Output = ()> + use<>> {
        let now = self.clock.now_millis();
        let mut rx = self.done.subscribe();
        let mut c = self.control();
        if !c.in_flight {
            let kid_missing = c.unknown_kids.get(kid.unwrap_or("")).is_some_and(|&until| now < until);
            let limited = c
                .last_forced_ms
                .is_some_and(|t| now < t.saturating_add(ms(self.settings.min_refetch_interval)));
            let backing_off = c.consecutive_failures > 0 && now < c.next_attempt_ms;
            if kid_missing || limited || backing_off {
                return None;
            }
            c.last_forced_ms = Some(now);
            c.in_flight = true;
            drop(c);
            self.spawn_fetch();
        }
        Some(async move {
            let _ = tokio::time::timeout(FETCH_TIMEOUT + Duration::from_secs(1), rx.changed()).await;
        })
    }

    /// A kid still missing after a refetch: no further refetch for it within the interval.
    pub fn remember_unknown(&self, kid: Option<&str>) {
        let now = self.clock.now_millis();
        let until = now.saturating_add(ms(self.settings.min_refetch_interval));
        let mut c = self.control();
        if c.unknown_kids.len() >= MAX_UNKNOWN_KIDS {
            c.unknown_kids.retain(|_, u| now < *u);
        }
        if c.unknown_kids.len() < MAX_UNKNOWN_KIDS {
            c.unknown_kids.insert(kid.unwrap_or("").into(), until);
        }
    }

    /// Fetch completions so far; `changed()` on the receiver wakes at the next one.
    pub fn subscribe(&self) -> watch::Receiver<u64> {
        self.done.subscribe()
    }

    pub fn status(&self) -> IssuerStatus {
        let loaded = self.keys.load_full();
        IssuerStatus {
            issuer: self.settings.issuer.clone(),
            ready: self.is_ready(),
            keys: loaded.as_ref().map_or(0, |l| l.keys.len()),
            fetches: self.fetches.load(Ordering::Relaxed),
            failures: self.failures.load(Ordering::Relaxed),
            consecutive_failures: self.control().consecutive_failures,
            fetched_at_ms: loaded.map(|l| l.fetched_ms),
        }
    }

    /// Runs one fetch in its own task; `in_flight` is already set. Without a runtime (a tool, a
    /// bench) nothing is fetched.
    fn spawn_fetch(self: &Arc<Self>) {
        let guard = InFlight(Some(self.clone()));
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            return; // the guard clears in_flight
        };
        runtime.spawn(async move {
            let result = match &guard.0 {
                Some(me) => me.fetcher.fetch().await,
                None => return,
            };
            guard.complete(result);
        });
    }

    fn complete(&self, result: Result<Fetched, String>) {
        let now = self.clock.now_millis();
        let was_ready = self.loaded(now).is_some();
        self.fetches.fetch_add(1, Ordering::Relaxed);
        let parsed = result.and_then(|f| parse_jwks(&f.body).map(|keys| (keys, f.max_age)));
        let mut c = self.control();
        c.in_flight = false;
        match parsed {
            Ok((keys, max_age)) => {
                let lifetime = max_age.unwrap_or(DEFAULT_LIFETIME).clamp(MIN_LIFETIME, MAX_LIFETIME);
                let count = keys.len();
                self.keys.store(Some(Arc::new(Loaded { keys, fetched_ms: now })));
                c.consecutive_failures = 0;
                c.last_warn_ms = None;
                // Refresh at three quarters of the lifetime, so the keys never run out while the
                // issuer answers.
                c.next_attempt_ms = now.saturating_add(ms(lifetime) * 3 / 4);
                // A kid found missing before may have just been published.
                c.unknown_kids.clear();
                drop(c);
                if was_ready {
                    tracing::debug!(issuer = %self.settings.issuer, keys = count, "issuer keys refreshed");
                } else {
                    tracing::info!(issuer = %self.settings.issuer, keys = count, lifetime_s = lifetime.as_secs(), "issuer keys loaded: its tokens are accepted");
                }
            }
            Err(why) => {
                self.failures.fetch_add(1, Ordering::Relaxed);
                c.consecutive_failures = c.consecutive_failures.saturating_add(1);
                let shift = (c.consecutive_failures - 1).min(16);
                let retry = FIRST_RETRY.saturating_mul(1 << shift).min(MAX_RETRY);
                c.next_attempt_ms = now.saturating_add(ms(retry));
                let warn = c.last_warn_ms.is_none_or(|t| now >= t.saturating_add(WARN_EVERY_MS));
                if warn {
                    c.last_warn_ms = Some(now);
                }
                let failures = c.consecutive_failures;
                drop(c);
                let (issuer, uri) = (&self.settings.issuer, &self.settings.jwks_uri);
                let retry_s = retry.as_secs();
                match (warn, was_ready) {
                    (true, false) => tracing::warn!(
                        issuer = %issuer, jwks_uri = %uri, error = %why, failures, retry_s,
                        "issuer not ready: its keys could not be fetched, so its tokens are refused (401)"
                    ),
                    (true, true) => tracing::warn!(
                        issuer = %issuer, jwks_uri = %uri, error = %why, failures, retry_s,
                        "issuer keys could not be refreshed: the keys fetched before stay in use (up to 24h)"
                    ),
                    (false, _) => tracing::debug!(issuer = %issuer, error = %why, failures, "JWKS fetch failed"),
                }
            }
        }
        self.done.send_modify(|n| *n += 1);
    }
}

/// Clears `in_flight` (and wakes waiters) if a fetch task ends without completing: the runtime
/// shut down under it, or it could not be spawned.
struct InFlight(Option<Arc<Resolver>>);

impl InFlight {
    fn complete(mut self, result: Result<Fetched, String>) {
        if let Some(r) = self.0.take() {
            r.complete(result);
        }
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        if let Some(r) = self.0.take() {
            r.control().in_flight = false;
            r.done.send_modify(|n| *n += 1);
        }
    }
}

/// The usable signature keys of a JWKS document; `Err` when there are none.
fn parse_jwks(body: &[u8]) -> Result<Vec<Arc<RemoteKey>>, String> {
    let doc: Value = serde_json::from_slice(body).map_err(|e| format!("not JSON: {e}"))?;
    let Some(Value::Array(members)) = doc.get("keys") else {
        return Err("not a JWKS (no \"keys\" array)".into());
    };
    let mut keys: Vec<Arc<RemoteKey>> = Vec::new();
    let mut skipped = 0usize;
    for m in members {
        match remote_key(m) {
            // The first key of a kid wins: a set that repeats one is ambiguous, not an upgrade.
            Ok(k) if k.kid.is_some() && keys.iter().any(|seen| seen.kid == k.kid) => skipped += 1,
            Ok(k) if keys.len() < MAX_KEYS => keys.push(Arc::new(k)),
            Ok(_) => skipped += 1,
            Err(why) => {
                skipped += 1;
                tracing::debug!(why, "JWKS member skipped");
            }
        }
    }
    if keys.is_empty() {
        return Err(format!("the JWKS holds no usable signature key ({skipped} skipped)"));
    }
    Ok(keys)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::clock::{Clock, ManualClock};
    use crate::config::ScopeClaim;
    use std::sync::atomic::AtomicUsize;

    /// Answers from a script: each fetch takes the next answer (the last one repeats).
    struct Scripted {
        answers: Mutex<Vec<Result<Fetched, String>>>,
        calls: Arc<AtomicUsize>,
        gate: Option<Arc<tokio::sync::Semaphore>>,
    }

    impl Fetch for Scripted {
        fn fetch(&self) -> super::super::fetch::FetchFuture<'_> {
            Box::pin(async move {
                if let Some(g) = &self.gate {
                    let _ = g.acquire().await.map(|p| p.forget());
                }
                self.calls.fetch_add(1, Ordering::SeqCst);
                let mut a = self.answers.lock().unwrap();
                if a.len() > 1 { a.remove(0) } else { a[0].clone() }
            })
        }
    }

    fn jwks(kids: &[&str], max_age: Option<u64>) -> Result<Fetched, String> {
        let x = base64::Engine::encode(&base64::engine::general_purpose::URL_SAFE_NO_PAD, [3u8; 32]);
        let keys: Vec<Value> = kids
            .iter()
            .map(|k| serde_json::json!({"kty": "OKP", "crv": "Ed25519", "x": x, "kid": k}))
            .collect();
        Ok(Fetched {
            body: serde_json::to_vec(&serde_json::json!({ "keys": keys })).unwrap().into(),
            max_age: max_age.map(Duration::from_secs),
        })
    }

    fn settings() -> IssuerSettings {
        IssuerSettings {
            issuer: "https://idp.test".into(),
            jwks_uri: "https://idp.test/jwks".parse().unwrap(),
            ca_file: None,
            audiences: vec!["api".into()],
            algorithms: vec![SigningAlg::EdDSA],
            token_types: vec!["at+jwt".into()],
            scope_claim: ScopeClaim::Scope,
            min_refetch_interval: Duration::from_secs(5),
        }
    }

    fn resolver(
        answers: Vec<Result<Fetched, String>>,
        gate: Option<Arc<tokio::sync::Semaphore>>,
    ) -> (Arc<Resolver>, Arc<ManualClock>, Arc<AtomicUsize>) {
        let clock = Arc::new(ManualClock::new());
        let calls = Arc::new(AtomicUsize::new(0));
        let fetcher = Scripted {
            answers: Mutex::new(answers),
            calls: calls.clone(),
            gate,
        };
        (
            Arc::new(Resolver::new(settings(), Box::new(fetcher), clock.clone())),
            clock,
            calls,
        )
    }

    /// Polls and waits for the fetch it starts (if any) to complete.
    async fn poll_and_wait(r: &Arc<Resolver>) {
        let mut rx = r.subscribe();
        let before = *rx.borrow_and_update();
        r.poll();
        if r.control().in_flight || *rx.borrow() != before {
            tokio::time::timeout(Duration::from_secs(10), rx.wait_for(|n| *n != before))
                .await
                .expect("hang guard")
                .unwrap();
        }
    }

    fn found(r: &Resolver, kid: &str) -> bool {
        matches!(r.lookup(Some(kid), SigningAlg::EdDSA), Lookup::Found(_))
    }

    #[tokio::test]
    async fn failed_fetches_back_off_from_one_second_to_a_minute() {
        let (r, clock, calls) = resolver(vec![Err("down".into())], None);
        let mut expected_gaps = vec![];
        for n in 0..9u32 {
            poll_and_wait(&r).await;
            assert_eq!(calls.load(Ordering::SeqCst), n as usize + 1);
            expected_gaps.push((1u64 << n).min(60));
            let gap = r.control().next_attempt_ms - clock.now_millis();
            assert_eq!(gap, expected_gaps[n as usize] * 1000, "after failure {}", n + 1);
            // Just before the retry is due, polling fetches nothing.
            clock.advance(Duration::from_millis(gap - 1));
            r.poll();
            assert!(!r.control().in_flight);
            clock.advance(Duration::from_millis(1));
        }
        assert!(!r.is_ready());
        assert_eq!(r.status().consecutive_failures, 9);
    }

    #[tokio::test]
    async fn lifetime_comes_from_max_age_clamped_and_keys_are_refreshed_before_it_ends() {
        for (max_age, lifetime) in [(None, 600), (Some(5), 60), (Some(300), 300), (Some(86_400), 3600)] {
            let (r, clock, _) = resolver(vec![jwks(&["a"], max_age)], None);
            poll_and_wait(&r).await;
            assert!(r.is_ready());
            assert_eq!(
                r.control().next_attempt_ms - clock.now_millis(),
                lifetime * 1000 * 3 / 4,
                "max-age {max_age:?}"
            );
        }
    }

    #[tokio::test]
    async fn stale_keys_are_kept_while_refreshes_fail_for_up_to_a_day() {
        let (r, clock, _) = resolver(vec![jwks(&["a"], Some(60)), Err("down".into())], None);
        poll_and_wait(&r).await;
        assert!(found(&r, "a"));
        let start = clock.now_millis();
        // Keep failing refreshes until just before the day is out: the key stays usable.
        while clock.now_millis() < start + ms(MAX_STALE) - 60_000 {
            clock.advance(Duration::from_secs(60));
            poll_and_wait(&r).await;
            assert!(found(&r, "a"), "at +{}s", (clock.now_millis() - start) / 1000);
        }
        clock.advance(Duration::from_secs(60));
        assert!(matches!(r.lookup(Some("a"), SigningAlg::EdDSA), Lookup::NotReady));
        assert!(!r.status().ready);
    }

    #[tokio::test]
    async fn an_unknown_kid_refetches_once_per_interval_and_joins_a_fetch_in_flight() {
        let (r, clock, calls) = resolver(vec![jwks(&["a"], None), jwks(&["a", "b"], None)], None);
        poll_and_wait(&r).await;
        assert_eq!(calls.load(Ordering::SeqCst), 1);
        // The first unknown kid refetches, and that fetch brings "b".
        assert!(matches!(r.lookup(Some("b"), SigningAlg::EdDSA), Lookup::Unknown));
        r.refetch(Some("b")).expect("a refetch").await;
        assert_eq!(calls.load(Ordering::SeqCst), 2);
        assert!(found(&r, "b"));
        // Within the interval, other kids get no fetch at all.
        for i in 0..50 {
            assert!(r.refetch(Some(&format!("x{i}"))).is_none());
        }
        assert_eq!(calls.load(Ordering::SeqCst), 2);
        clock.advance(Duration::from_secs(5));
        r.refetch(Some("x0")).expect("the interval has passed").await;
        assert_eq!(calls.load(Ordering::SeqCst), 3);
        clock.advance(Duration::from_secs(4));
        r.remember_unknown(Some("x0"));
        clock.advance(Duration::from_secs(2));
        assert!(r.refetch(Some("x0")).is_none(), "remembered as missing");
        r.refetch(Some("y"))
            .expect("another kid, the interval has passed")
            .await;
        assert_eq!(calls.load(Ordering::SeqCst), 4);
    }

    #[tokio::test]
    async fn concurrent_refetches_share_one_fetch() {
        let gate = Arc::new(tokio::sync::Semaphore::new(0));
        let (r, _clock, calls) = resolver(vec![jwks(&["a"], None)], Some(gate.clone()));
        let waits: Vec<_> = (0..20)
            .map(|i| r.refetch(Some(&format!("k{i}"))).expect("joins or starts the fetch"))
            .collect();
        gate.add_permits(100);
        for w in waits {
            tokio::time::timeout(Duration::from_secs(10), w)
                .await
                .expect("hang guard");
        }
        assert_eq!(calls.load(Ordering::SeqCst), 1);
        assert!(r.is_ready());
    }

    #[test]
    fn a_fetch_task_that_dies_does_not_leave_a_fetch_in_flight() {
        let gate = Arc::new(tokio::sync::Semaphore::new(0));
        let (r, _clock, _) = resolver(vec![jwks(&["a"], None)], Some(gate));
        let runtime = tokio::runtime::Builder::new_current_thread().build().unwrap();
        runtime.block_on(async {
            r.poll();
            tokio::task::yield_now().await; // the task starts and waits on the gate
        });
        assert!(r.control().in_flight);
        drop(runtime); // the task is dropped mid-fetch
        assert!(!r.control().in_flight, "a later poll or refetch can fetch again");
        // Without a runtime nothing is spawned, and nothing stays marked in flight either.
        r.poll();
        assert!(!r.control().in_flight);
    }

    #[tokio::test]
    async fn a_jwks_without_usable_keys_is_a_failed_fetch() {
        let (r, _, _) = resolver(
            vec![Ok(Fetched {
                body: br#"{"keys":[{"kty":"oct","k":"c2VjcmV0"}]}"#.to_vec().into(),
                max_age: None,
            })],
            None,
        );
        poll_and_wait(&r).await;
        assert!(!r.is_ready());
        assert_eq!(r.status().failures, 1);
    }
}
