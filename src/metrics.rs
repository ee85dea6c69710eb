//! Prometheus metrics (`GET /metrics` on the admin listener, text exposition format 0.0.4).
//!
//! Every label value is bounded by the config, never by traffic: `route` is a route's configured
//! `path_prefix` (`none` when nothing matched, the endpoint's path for the gateway's own), and no
//! user, client, subject, token or raw path is ever a label. Label handles are resolved once (per
//! route when a Snapshot is built, per outcome here), so the request path increments atomics and
//! never formats or hashes a label set.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;

use crate::auth::validator::InvalidToken;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RouteStatus {
    route: String,
    status: u16,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RouteOnly {
    route: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct Outcome {
    outcome: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct CacheResult {
    result: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct Grant {
    grant_type: &'static str,
    outcome: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct Reason {
    reason: &'static str,
}

/// Why the upstream hop failed, as the `kind` label says it.
#[derive(Clone, Copy, Debug, Hash, PartialEq, Eq)]
pub enum UpstreamErrorKind {
    Connect,
    Timeout,
    Reset,
    Protocol,
}

impl UpstreamErrorKind {
    pub const ALL: [UpstreamErrorKind; 4] = [
        UpstreamErrorKind::Connect,
        UpstreamErrorKind::Timeout,
        UpstreamErrorKind::Reset,
        UpstreamErrorKind::Protocol,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            UpstreamErrorKind::Connect => "connect",
            UpstreamErrorKind::Timeout => "timeout",
            UpstreamErrorKind::Reset => "reset",
            UpstreamErrorKind::Protocol => "protocol",
        }
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct UpstreamError {
    route: String,
    kind: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ReloadResult {
    result: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct Version {
    version: &'static str,
}

/// Status codes with a pre-resolved counter per route; any other code resolves its label set when
/// it happens (rare by construction).
const COMMON_STATUSES: [u16; 28] = [
    101, 200, 201, 202, 204, 206, 301, 302, 303, 304, 307, 308, 400, 401, 403, 404, 405, 408, 409, 413, 422, 429, 431,
    499, 500, 502, 503, 504,
];

/// 0.5 ms to 10 s, roughly ×2.5 per bucket.
const DURATION_BUCKETS: [f64; 12] = [
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 10.0,
];

/// Token-check outcomes, in the order of [`TokenOutcome::index`].
const TOKEN_OUTCOMES: [&str; 13] = [
    "valid",
    "missing",
    "malformed",
    "invalid_signature",
    "expired",
    "not_yet_valid",
    "wrong_issuer",
    "wrong_audience",
    "wrong_type",
    "revoked",
    "insufficient_scope",
    "unknown_key",
    "issuer_not_ready",
];

/// What the token check of one request came to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TokenOutcome {
    Valid,
    Missing,
    Invalid(InvalidToken),
    /// Two Authorization headers or a malformed Bearer value.
    BadRequest,
    InsufficientScope,
}

impl TokenOutcome {
    fn index(self) -> usize {
        match self {
            TokenOutcome::Valid => 0,
            TokenOutcome::Missing => 1,
            TokenOutcome::BadRequest | TokenOutcome::Invalid(InvalidToken::Malformed) => 2,
            TokenOutcome::Invalid(InvalidToken::BadSignature | InvalidToken::WrongAlgorithm) => 3,
            TokenOutcome::Invalid(InvalidToken::Expired) => 4,
            TokenOutcome::Invalid(InvalidToken::NotYetValid) => 5,
            TokenOutcome::Invalid(InvalidToken::WrongIssuer | InvalidToken::IssuerNotAccepted) => 6,
            TokenOutcome::Invalid(InvalidToken::WrongAudience) => 7,
            TokenOutcome::Invalid(InvalidToken::WrongType) => 8,
            TokenOutcome::Invalid(InvalidToken::Revoked) => 9,
            TokenOutcome::InsufficientScope => 10,
            TokenOutcome::Invalid(InvalidToken::UnknownKey) => 11,
            TokenOutcome::Invalid(InvalidToken::IssuerNotReady) => 12,
        }
    }
}

/// One route's request metrics, resolved once.
pub struct RouteMetrics {
    label: String,
    statuses: [Counter; COMMON_STATUSES.len()],
    duration: Histogram,
    upstream_errors: [Counter; 4],
    requests: Family<RouteStatus, Counter>,
}

impl RouteMetrics {
    /// Counts a finished request (its status and its duration in seconds).
    pub fn finished(&self, status: u16, seconds: f64) {
        match COMMON_STATUSES.iter().position(|&s| s == status) {
            Some(i) => self.statuses[i].inc(),
            None => self
                .requests
                .get_or_create(&RouteStatus {
                    route: self.label.clone(),
                    status,
                })
                .inc(),
        };
        self.duration.observe(seconds);
    }

    pub fn upstream_error(&self, kind: UpstreamErrorKind) {
        let i = UpstreamErrorKind::ALL.iter().position(|k| *k == kind).unwrap_or(0);
        self.upstream_errors[i].inc();
    }
}

pub struct Metrics {
    registry: Registry,
    requests: Family<RouteStatus, Counter>,
    duration: Family<RouteOnly, Histogram>,
    upstream_errors: Family<UpstreamError, Counter>,
    pub inflight: Gauge,
    pub connections_open: Gauge,
    /// Idle HTTP/1.1 connections holding no HTTP state (see `server.park_idle_after`).
    pub connections_parked: Gauge,
    token_checks: [Counter; TOKEN_OUTCOMES.len()],
    cache: [Counter; 2],
    grants: Family<Grant, Counter>,
    revocations: Family<Reason, Counter>,
    sessions_active: Gauge,
    reloads: Family<ReloadResult, Counter>,
    last_reload_success: Gauge,
    cert_not_after: Gauge,
    pub store_commit_duration: Histogram,
    pub store_batch_size: Histogram,
    store_available: Gauge,
    revocation_lag: Histogram,
    log_dropped: Counter,
    log_dropped_seen: AtomicU64,
    /// Resolved handles of the gateway's own endpoints and of unmatched requests.
    none: Arc<RouteMetrics>,
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics::new()
    }
}

impl Metrics {
    pub fn new() -> Metrics {
        let mut registry = Registry::with_prefix("tokengate");
        let requests = Family::<RouteStatus, Counter>::default();
        registry.register("requests", "Requests answered, by route and status", requests.clone());
        let duration: Family<RouteOnly, Histogram> = Family::new_with_constructor(|| Histogram::new(DURATION_BUCKETS));
        registry.register(
            "request_duration_seconds",
            "From the request head to the end of the response body, by route",
            duration.clone(),
        );
        let inflight = Gauge::default();
        registry.register("inflight_requests", "Requests being served", inflight.clone());
        let connections_open = Gauge::default();
        registry.register("connections_open", "Client connections open", connections_open.clone());
        let connections_parked = Gauge::default();
        registry.register(
            "connections_parked",
            "Idle HTTP/1.1 client connections whose HTTP buffers are released until the client sends again",
            connections_parked.clone(),
        );
        let checks = Family::<Outcome, Counter>::default();
        registry.register(
            "token_checks",
            "Bearer-token checks on protected routes, by outcome",
            checks.clone(),
        );
        let token_checks = TOKEN_OUTCOMES.map(|outcome| checks.get_or_create(&Outcome { outcome }).clone());
        let cache_family = Family::<CacheResult, Counter>::default();
        registry.register(
            "token_cache_requests",
            "Validated-token cache look-ups, by result",
            cache_family.clone(),
        );
        let cache = ["hit", "miss"].map(|result| cache_family.get_or_create(&CacheResult { result }).clone());
        let grants = Family::<Grant, Counter>::default();
        registry.register(
            "grants",
            "Token-endpoint requests, by grant type and outcome",
            grants.clone(),
        );
        // Shown from the start, before the first login.
        for grant_type in ["password", "refresh_token", "client_credentials"] {
            let _ = grants.get_or_create(&Grant {
                grant_type,
                outcome: "success",
            });
        }
        let revocations = Family::<Reason, Counter>::default();
        registry.register("revocations", "Sessions revoked, by reason", revocations.clone());
        for reason in ["revoked_by_client", "refresh_token_reuse", "session_limit"] {
            let _ = revocations.get_or_create(&Reason { reason });
        }
        let sessions_active = Gauge::default();
        registry.register(
            "sessions_active",
            "Sessions (refresh-token families) the store holds",
            sessions_active.clone(),
        );
        let upstream_errors = Family::<UpstreamError, Counter>::default();
        registry.register(
            "upstream_errors",
            "Failed upstream hops, by route and kind",
            upstream_errors.clone(),
        );
        let reloads = Family::<ReloadResult, Counter>::default();
        registry.register("config_reloads", "Config reloads, by result", reloads.clone());
        for result in ["success", "failure"] {
            let _ = reloads.get_or_create(&ReloadResult { result });
        }
        let last_reload_success = Gauge::default();
        registry.register(
            "config_last_reload_success_timestamp_seconds",
            "When the config was last applied (start or reload), seconds since the epoch",
            last_reload_success.clone(),
        );
        let cert_not_after = Gauge::default();
        registry.register(
            "tls_cert_not_after_seconds",
            "The served certificate's notAfter, seconds since the epoch",
            cert_not_after.clone(),
        );
        let build = Family::<Version, Gauge>::default();
        registry.register("build_info", "The running build (value 1)", build.clone());
        build
            .get_or_create(&Version {
                version: env!("CARGO_PKG_VERSION"),
            })
            .set(1);
        let store_commit_duration =
            Histogram::new([0.0001, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.5, 1.0]);
        registry.register(
            "store_commit_duration_seconds",
            "Durable store: one batch's write and fdatasync",
            store_commit_duration.clone(),
        );
        let store_batch_size = Histogram::new([1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0, 1024.0]);
        registry.register(
            "store_batch_size",
            "Durable store: records per batch (per fdatasync)",
            store_batch_size.clone(),
        );
        let store_available = Gauge::default();
        store_available.set(1);
        registry.register(
            "store_available",
            "1 while the session store takes operations, 0 while it is unreachable (Redis down)",
            store_available.clone(),
        );
        let revocation_lag = Histogram::new([0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0, 5.0]);
        registry.register(
            "revocation_propagation_seconds",
            "Redis store: from a revocation's append to the stream (by any instance) to its application here",
            revocation_lag.clone(),
        );
        let log_dropped = Counter::default();
        registry.register(
            "log_dropped_lines",
            "Log lines dropped because stdout did not take them",
            log_dropped.clone(),
        );
        let mut m = Metrics {
            registry,
            requests,
            duration,
            upstream_errors,
            inflight,
            connections_open,
            connections_parked,
            token_checks,
            cache,
            grants,
            revocations,
            sessions_active,
            reloads,
            last_reload_success,
            cert_not_after,
            store_commit_duration,
            store_batch_size,
            store_available,
            revocation_lag,
            log_dropped,
            log_dropped_seen: AtomicU64::new(0),
            none: Arc::new(RouteMetrics::empty()),
        };
        m.none = m.route("none");
        m
    }

    /// The handles of one route label.
    pub fn route(&self, label: &str) -> Arc<RouteMetrics> {
        let statuses = COMMON_STATUSES.map(|status| {
            self.requests
                .get_or_create(&RouteStatus {
                    route: label.to_owned(),
                    status,
                })
                .clone()
        });
        let upstream_errors = UpstreamErrorKind::ALL.map(|kind| {
            self.upstream_errors
                .get_or_create(&UpstreamError {
                    route: label.to_owned(),
                    kind: kind.as_str(),
                })
                .clone()
        });
        Arc::new(RouteMetrics {
            label: label.to_owned(),
            statuses,
            duration: self
                .duration
                .get_or_create(&RouteOnly {
                    route: label.to_owned(),
                })
                .clone(),
            upstream_errors,
            requests: self.requests.clone(),
        })
    }

    /// Requests no route matched.
    pub fn unmatched(&self) -> &Arc<RouteMetrics> {
        &self.none
    }

    pub fn token_check(&self, outcome: TokenOutcome) {
        self.token_checks[outcome.index()].inc();
    }

    pub fn token_cache(&self, hit: bool) {
        self.cache[usize::from(!hit)].inc();
    }

    pub fn grant(&self, grant_type: &'static str, outcome: &'static str) {
        self.grants.get_or_create(&Grant { grant_type, outcome }).inc();
    }

    pub fn revocation(&self, reason: &'static str) {
        self.revocations.get_or_create(&Reason { reason }).inc();
    }

    pub fn reload(&self, success: bool, now_secs: u64) {
        let result = if success { "success" } else { "failure" };
        self.reloads.get_or_create(&ReloadResult { result }).inc();
        if success {
            self.last_reload_success.set(now_secs as i64);
        }
    }

    /// The config in effect since `now_secs` (the start counts as a successful load).
    pub fn config_applied(&self, now_secs: u64) {
        self.last_reload_success.set(now_secs as i64);
    }

    pub fn cert_not_after(&self, secs: Option<i64>) {
        if let Some(s) = secs {
            self.cert_not_after.set(s);
        }
    }

    /// The text exposition, with the values read at scrape time brought up to date first.
    /// The exposition text; `sessions_active` is the store's count when it could say (else the
    /// gauge keeps its last value).
    pub fn render(&self, sessions_active: Option<usize>) -> String {
        if let Some(n) = sessions_active {
            self.sessions_active.set(n as i64);
        }
        let dropped = crate::logging::dropped_lines();
        let seen = self.log_dropped_seen.swap(dropped, Ordering::Relaxed);
        if dropped > seen {
            self.log_dropped.inc_by(dropped - seen);
        }
        let mut out = String::new();
        // Writing into a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        out
    }
}

impl crate::store::StoreObserver for Metrics {
    fn availability_changed(&self, available: bool) {
        self.store_available.set(i64::from(available));
    }

    fn revocation_propagated(&self, lag: std::time::Duration) {
        self.revocation_lag.observe(lag.as_secs_f64());
    }
}

impl RouteMetrics {
    fn empty() -> RouteMetrics {
        RouteMetrics {
            label: String::new(),
            statuses: std::array::from_fn(|_| Counter::default()),
            duration: Histogram::new(DURATION_BUCKETS),
            upstream_errors: std::array::from_fn(|_| Counter::default()),
            requests: Family::default(),
        }
    }
}
