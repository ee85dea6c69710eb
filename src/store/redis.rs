//! The Redis store: sessions shared by every gateway instance, so a refresh can land on any of
//! them, two tabs can race on two of them, and a logout on one is enforced on all.
//!
//! ```text
//!  instance A ──EVALSHA rotate/create/revoke──▶ Redis ◀──EVALSHA── instance B
//!      ▲                                          │ (revocations: index + stream, one script)
//!      └──── XREAD BLOCK (dedicated connection) ──┴──── XREAD BLOCK ────▶ B's RevokedSessions
//! ```
//!
//! Every operation that decides something is one Lua script (`redis/*.lua`, the key layout is in
//! `prelude.lua`), so two instances racing on one session serialize inside Redis: rotation is a
//! compare-and-set on the current digest exactly like [`Registry::rotate`], and a loser learns what
//! the winner did. The sealed copy of a rotation's response lives in Redis for the reuse grace, so
//! a retry on *another* instance gets the byte-identical response. A multiplexed connection cannot
//! WATCH (redis-rs#565); scripts need no WATCH.
//!
//! Revocations are written to an index (`P revoked`, for a full resync) and appended to a stream
//! (`P revocations`) by the same script. Each instance follows the stream on its own connection
//! and applies entries to its in-memory [`RevokedSessions`], which is what the request path reads:
//! no request waits on Redis. See [`follower`].
//!
//! Time: decisions use the gateway's clock (passed in, as for every store); key TTLs are set
//! relative to it (PEXPIRE of the remaining time), so Redis forgets expired sessions and sealed
//! copies by itself and clock skew between a gateway and Redis cannot shorten a lifetime.
//!
//! Failure: every call is bounded by [`OP_TIMEOUT`]; a failed or timed-out call is
//! [`StoreError::Unavailable`] (503 `temporarily_unavailable` at the endpoints), the store reports
//! itself unavailable (`/readyz`), a WARN says so once and an INFO when it is back. The connection
//! reconnects by itself; nothing needs a restart.
//!
//! Cluster: the keys of one session share the hash tag `{sid}`, so rotation and inspection touch
//! one slot. Login (the per-user index) and revocation (index + stream) touch keys of several
//! slots in one script, which only a single primary runs atomically: use a standalone Redis (with
//! replicas and Sentinel for failover), not Redis Cluster.
//!
//! [`Registry::rotate`]: crate::store::registry::Registry::rotate

mod follower;
#[doc(hidden)]
pub mod testing;

use std::fmt;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, LazyLock, Mutex};
use std::time::Duration;

use arc_swap::ArcSwap;
use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use redis::{Client, FromRedisValue, IntoConnectionInfo, RedisError, RedisResult, Script, ScriptInvocation, Value};
use tokio::sync::watch;

use crate::auth::RevokedSessions;
use crate::config::RedisSettings;
use crate::crypto::{Digest, Sealed};
use crate::ids::SessionId;
use crate::store::registry::MAX_ROTATED_PER_SESSION;
use crate::store::{
    Committed, NewSession, RevokeReason, RevokedFamily, Rotation, SessionStore, SessionView, StoreError, TokenState,
};

pub use follower::FollowerStats;

/// Bound on every Redis call: a hung Redis costs a request this long, then a 503.
pub const OP_TIMEOUT: Duration = Duration::from_secs(1);
/// How long a starting gateway waits for the revoked-session set before giving up.
pub const STARTUP_SYNC_BOUND: Duration = Duration::from_secs(10);
/// Approximate length the revocation stream is trimmed to. An instance that falls further behind
/// (disconnected while this many revocations happened) rebuilds its set from the index instead.
pub const STREAM_MAXLEN: u64 = 10_000;

fn script(body: &str) -> Script {
    Script::new(&format!("{}\n{body}", include_str!("redis/prelude.lua")))
}

static CREATE: LazyLock<Script> = LazyLock::new(|| script(include_str!("redis/create.lua")));
static INSPECT: LazyLock<Script> = LazyLock::new(|| script(include_str!("redis/inspect.lua")));
static ROTATE: LazyLock<Script> = LazyLock::new(|| script(include_str!("redis/rotate.lua")));
static REVOKE: LazyLock<Script> = LazyLock::new(|| script(include_str!("redis/revoke.lua")));
static REVOKE_SID: LazyLock<Script> = LazyLock::new(|| script(include_str!("redis/revoke_sid.lua")));

/// What the store reports as it runs, for metrics: the lead's exporter implements it (a readiness
/// gauge, a propagation-lag histogram); tests and benches record samples with it.
pub trait StoreObserver: Send + Sync {
    /// The store became available (`true`) or unavailable (`false`).
    fn availability_changed(&self, _available: bool) {}
    /// A revocation written by any instance was applied here, `lag` after Redis appended it.
    fn revocation_propagated(&self, _lag: Duration) {}
}

/// The names of tokengate's keys, all under the configured prefix (layout: `redis/prelude.lua`).
#[derive(Debug, Clone)]
pub(crate) struct Keys {
    prefix: String,
}

impl Keys {
    fn session(&self, sid: &str) -> String {
        format!("{}s:{{{sid}}}", self.prefix)
    }
    fn sealed(&self, sid: &str, digest: &Digest) -> String {
        format!("{}c:{{{sid}}}:{}", self.prefix, hex(&digest[..8]))
    }
    fn user(&self, user: &str) -> String {
        format!("{}u:{user}", self.prefix)
    }
    fn sessions(&self) -> String {
        format!("{}sessions", self.prefix)
    }
    fn revoked(&self) -> String {
        format!("{}revoked", self.prefix)
    }
    fn stream(&self) -> String {
        format!("{}revocations", self.prefix)
    }
    /// A login-limiter key (`what` names the counter: a username digest, an address).
    pub(crate) fn login(&self, what: &str) -> String {
        format!("{}l:{what}", self.prefix)
    }
}

fn hex(bytes: &[u8]) -> String {
    use std::fmt::Write;
    bytes.iter().fold(String::with_capacity(bytes.len() * 2), |mut s, b| {
        let _ = write!(s, "{b:02x}");
        s
    })
}

/// Whether Redis answers: the operations' connection and the revocation follower's each report,
/// and the store is available when both do. Transitions are logged once each.
struct Health {
    /// Which store, for the log: the URL (never with credentials: the config refuses them) and
    /// the key prefix.
    label: String,
    ops_down: AtomicBool,
    stream_down: AtomicBool,
    /// What was last reported (and whether anything has been yet), under the lock that orders
    /// transitions.
    reported: Mutex<Option<bool>>,
    /// Metrics, and whatever a test or bench adds (read only on rare events).
    observers: std::sync::RwLock<Vec<Arc<dyn StoreObserver>>>,
}

#[derive(Clone, Copy)]
enum Part {
    Ops,
    Stream,
}

impl Health {
    fn observers(&self) -> std::sync::RwLockReadGuard<'_, Vec<Arc<dyn StoreObserver>>> {
        self.observers.read().unwrap_or_else(|e| e.into_inner())
    }

    fn new(label: String) -> Health {
        Health {
            label,
            ops_down: AtomicBool::new(false),
            // Unavailable until the follower has loaded the revoked set.
            stream_down: AtomicBool::new(true),
            reported: Mutex::new(None),
            observers: std::sync::RwLock::default(),
        }
    }

    fn available(&self) -> bool {
        !self.ops_down.load(Ordering::Acquire) && !self.stream_down.load(Ordering::Acquire)
    }

    fn set(&self, part: Part, up: bool, why: &dyn fmt::Display) {
        let flag = match part {
            Part::Ops => &self.ops_down,
            Part::Stream => &self.stream_down,
        };
        if flag.load(Ordering::Acquire) != up {
            return;
        }
        let Ok(mut reported) = self.reported.lock() else {
            return;
        };
        flag.store(!up, Ordering::Release);
        let available = self.available();
        if *reported == Some(available) {
            return;
        }
        let redis = &self.label;
        match (*reported, available) {
            (None, true) => tracing::info!(redis, "session store: connected to Redis, revoked sessions loaded"),
            (_, true) => tracing::info!(redis, "session store: Redis is available again"),
            (_, false) => tracing::warn!(
                redis,
                error = %why,
                "session store: Redis is unavailable; the token and revoke endpoints answer 503 and \
                 API requests are checked against the revocations known so far"
            ),
        }
        for o in self.observers().iter() {
            o.availability_changed(available);
        }
        *reported = Some(available);
    }
}

/// The connection every operation shares (redis-rs reconnects it by itself), the key names and
/// the health they report to. The login limiter uses it too.
pub(crate) struct Conn {
    /// Replaced whole by [`Conn::renew`]: redis-rs reconnects by itself only after an I/O error,
    /// so a connection attempt that failed otherwise (AUTH refused, LOADING after a restart)
    /// would stay failed for ever.
    manager: ArcSwap<ConnectionManager>,
    client: Client,
    pub(crate) keys: Keys,
    health: Health,
}

fn manager_config() -> ConnectionManagerConfig {
    ConnectionManagerConfig::new()
        .set_connection_timeout(Some(OP_TIMEOUT))
        .set_response_timeout(Some(OP_TIMEOUT))
        // Callers are bounded by OP_TIMEOUT anyway; reconnection is retried on the next call and
        // by the prober every second, so a long retry schedule would only queue callers.
        .set_number_of_retries(1)
        .set_min_delay(Duration::from_millis(50))
        .set_max_delay(Duration::from_millis(500))
}

impl Conn {
    fn manager(&self) -> ConnectionManager {
        ConnectionManager::clone(&self.manager.load())
    }

    /// A fresh connection manager (connects lazily).
    fn renew(&self) -> Result<(), StoreError> {
        let fresh = ConnectionManager::new_lazy_with_config(self.client.clone(), manager_config())
            .map_err(|e| StoreError::Failed(format!("state.redis_url: {e}")))?;
        self.manager.store(Arc::new(fresh));
        Ok(())
    }

    /// Runs a script within [`OP_TIMEOUT`].
    pub(crate) async fn run<T: FromRedisValue>(&self, inv: &ScriptInvocation<'_>) -> Result<T, StoreError> {
        let mut c = self.manager();
        self.bounded(inv.invoke_async(&mut c)).await
    }

    /// Runs a command within [`OP_TIMEOUT`].
    pub(crate) async fn query<T: FromRedisValue>(&self, cmd: &redis::Cmd) -> Result<T, StoreError> {
        let mut c = self.manager();
        self.bounded(cmd.query_async(&mut c)).await
    }

    async fn bounded<T>(&self, call: impl Future<Output = RedisResult<T>>) -> Result<T, StoreError> {
        match tokio::time::timeout(OP_TIMEOUT, call).await {
            Ok(Ok(v)) => {
                self.health.set(Part::Ops, true, &"");
                Ok(v)
            }
            Ok(Err(e)) => Err(self.failed(&e)),
            Err(_) => {
                let e = format!("Redis did not answer within {OP_TIMEOUT:?}");
                self.health.set(Part::Ops, false, &e);
                Err(StoreError::Unavailable(e))
            }
        }
    }

    fn failed(&self, e: &RedisError) -> StoreError {
        match e.kind() {
            // Redis answered, with something this code did not expect: a bug, not an outage.
            redis::ErrorKind::Parse | redis::ErrorKind::UnexpectedReturnType => {
                StoreError::Failed(format!("unexpected reply from Redis: {e}"))
            }
            _ => {
                self.health.set(Part::Ops, false, e);
                StoreError::Unavailable(format!("Redis: {e}"))
            }
        }
    }
}

/// Builds the client: URL, password, TLS (the `ca_file` or the system roots, through rustls with
/// the process's one crypto provider).
fn client(settings: &RedisSettings) -> Result<Client, StoreError> {
    let bad = |e: RedisError| StoreError::Failed(format!("state.redis_url: {e}"));
    let mut info = settings.url.as_str().into_connection_info().map_err(bad)?;
    if let Some(password) = &settings.password {
        let password = std::str::from_utf8(password.expose())
            .map_err(|_| StoreError::Failed("state.password: not UTF-8".into()))?;
        let redis = info.redis_settings().clone().set_password(password);
        info = info.set_redis_settings(redis);
    }
    if !settings.tls {
        return Client::open(info).map_err(bad);
    }
    let root_cert = match &settings.ca_file {
        Some(path) => Some(
            std::fs::read(path).map_err(|e| StoreError::Failed(format!("state.ca_file: {}: {e}", path.display())))?,
        ),
        None => None,
    };
    Client::build_with_tls(
        info,
        redis::TlsCertificates {
            client_tls: None,
            root_cert,
        },
    )
    .map_err(bad)
}

pub struct RedisStore {
    conn: Arc<Conn>,
    revoked: Arc<RevokedSessions>,
    reuse_grace_ms: u64,
    follower: Arc<FollowerStats>,
    synced: watch::Receiver<bool>,
    /// Dropped with the store: its background tasks (follower, prober) end.
    _stop: watch::Sender<()>,
}

impl RedisStore {
    /// Builds the client and starts following revocations (in the background: see
    /// [`RedisStore::synced`]). Connects lazily; fails only on settings it cannot use. Needs a
    /// tokio runtime.
    pub fn new(
        settings: &RedisSettings,
        revoked: Arc<RevokedSessions>,
        reuse_grace_ms: u64,
    ) -> Result<RedisStore, StoreError> {
        let runtime = tokio::runtime::Handle::try_current()
            .map_err(|_| StoreError::Failed("the Redis store needs a tokio runtime".into()))?;
        let client = client(settings)?;
        let manager = ConnectionManager::new_lazy_with_config(client.clone(), manager_config())
            .map_err(|e| StoreError::Failed(format!("state.redis_url: {e}")))?;
        let conn = Arc::new(Conn {
            manager: ArcSwap::from_pointee(manager),
            client: client.clone(),
            keys: Keys {
                prefix: settings.key_prefix.clone(),
            },
            health: Health::new(format!("{} prefix {}", settings.url, settings.key_prefix)),
        });
        let follower = Arc::new(FollowerStats::default());
        let (stop_tx, stop_rx) = watch::channel(());
        let (synced_tx, synced_rx) = watch::channel(false);
        runtime.spawn(follower::follow(
            client,
            conn.clone(),
            revoked.clone(),
            follower.clone(),
            stop_rx.clone(),
            synced_tx,
        ));
        runtime.spawn(follower::probe(conn.clone(), stop_rx));
        Ok(RedisStore {
            conn,
            revoked,
            reuse_grace_ms,
            follower,
            synced: synced_rx,
            _stop: stop_tx,
        })
    }

    /// Waits (at most `bound`) until the revoked-session set has been loaded from Redis once.
    pub async fn synced(&self, bound: Duration) -> Result<(), StoreError> {
        let mut rx = self.synced.clone();
        match tokio::time::timeout(bound, rx.wait_for(|s| *s)).await {
            Ok(Ok(_)) => Ok(()),
            _ => Err(StoreError::Unavailable(format!(
                "could not load the revoked sessions from Redis within {bound:?}{}",
                self.follower
                    .last_error()
                    .map(|e| format!(" (last error: {e})"))
                    .unwrap_or_default()
            ))),
        }
    }

    /// Adds `observer` to those told of availability changes and propagation lags.
    pub fn observe(&self, observer: Arc<dyn StoreObserver>) {
        self.conn
            .health
            .observers
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .push(observer);
    }

    /// The revocation follower's counters.
    pub fn follower(&self) -> &FollowerStats {
        &self.follower
    }

    pub(crate) fn conn(&self) -> &Arc<Conn> {
        &self.conn
    }

    /// Applies a revocation the script reported to this instance's set at once (the follower will
    /// see it again from the stream; applying twice changes nothing).
    fn revoked_here(&self, v: Value) -> Result<RevokedFamily, StoreError> {
        let (sid, user, client, newly, until): (String, String, String, i64, u64) =
            redis::from_redis_value(v).map_err(|e| StoreError::Failed(format!("unexpected reply from Redis: {e}")))?;
        let sid = SessionId::parse(&sid).ok_or_else(|| StoreError::Failed(format!("bad sid in Redis: {sid:?}")))?;
        self.revoked.revoke(sid, until);
        Ok(RevokedFamily {
            sid,
            user: user.into(),
            client: client.into(),
            newly: newly == 1,
        })
    }
}

fn unexpected(what: &str, v: impl fmt::Debug) -> StoreError {
    StoreError::Failed(format!("unexpected reply from Redis to {what}: {v:?}"))
}

/// The inspect script's reply: user, client, scopes, session expiry, revoked, token state,
/// token expiry, rotated at, sealed copy.
type Inspected = (String, String, String, u64, u8, u8, u64, u64, Option<Vec<u8>>);

impl SessionStore for RedisStore {
    async fn create(&self, s: NewSession) -> Result<Vec<RevokedFamily>, StoreError> {
        let keys = &self.conn.keys;
        let sid = s.sid.encode();
        let mut inv = CREATE.key(keys.session(&sid));
        inv.key(keys.user(&s.user))
            .key(keys.sessions())
            .key(keys.revoked())
            .key(keys.stream())
            .arg(&keys.prefix)
            .arg(&sid)
            .arg(&*s.user)
            .arg(&*s.client)
            .arg(&*s.scopes)
            .arg(s.now_ms)
            .arg(s.session_expires_ms)
            .arg(s.access_exp_secs)
            .arg(&s.token[..])
            .arg(s.token_exp_ms)
            .arg(s.max_sessions_per_user)
            .arg(self.reuse_grace_ms)
            .arg(STREAM_MAXLEN);
        let reply: Vec<Value> = self.conn.run(&inv).await?;
        let mut reply = reply.into_iter();
        match reply.next() {
            Some(Value::BulkString(b)) if b == b"ok" => reply.map(|v| self.revoked_here(v)).collect(),
            Some(Value::BulkString(b)) if b == b"collision" => Err(StoreError::Collision),
            other => Err(unexpected("create", other)),
        }
    }

    async fn inspect(&self, sid: SessionId, token: &Digest) -> Result<Option<(SessionView, TokenState)>, StoreError> {
        let keys = &self.conn.keys;
        let encoded = sid.encode();
        let mut inv = INSPECT.key(keys.session(&encoded));
        inv.key(keys.sealed(&encoded, token)).arg(&token[..]).arg(&token[..8]);
        let Some((user, client, scopes, sexp, revoked, state, exp, at, sealed)) =
            self.conn.run::<Option<Inspected>>(&inv).await?
        else {
            return Ok(None);
        };
        let view = SessionView {
            sid,
            user: user.into(),
            client: client.into(),
            scopes: scopes.into(),
            session_expires_ms: sexp,
            revoked: revoked == 1,
        };
        let state = match state {
            1 => TokenState::Current {
                expires_ms: exp,
                issued_ms: at,
            },
            2 => TokenState::Rotated {
                at_ms: at,
                expires_ms: exp,
                sealed: sealed.map(Sealed),
            },
            _ => TokenState::Unknown,
        };
        Ok(Some((view, state)))
    }

    async fn rotate(&self, r: Rotation) -> Result<Committed, StoreError> {
        let keys = &self.conn.keys;
        let sid = r.sid.encode();
        let sealed = r.sealed.as_ref().map_or(&[][..], |s| &s.0[..]);
        let mut inv = ROTATE.key(keys.session(&sid));
        inv.key(keys.sealed(&sid, &r.presented))
            .key(keys.sessions())
            .arg(&r.presented[..])
            .arg(&r.successor[..])
            .arg(r.successor_exp_ms)
            .arg(r.access_exp_secs)
            .arg(sealed)
            .arg(r.now_ms)
            .arg(self.reuse_grace_ms)
            .arg(MAX_ROTATED_PER_SESSION)
            .arg(&sid);
        let status: String = self.conn.run(&inv).await?;
        match status.as_str() {
            "rotated" => Ok(Committed::Rotated),
            "lost" => Ok(Committed::Lost),
            "revoked" => Ok(Committed::Revoked),
            "gone" => Ok(Committed::Gone),
            other => Err(unexpected("rotate", other)),
        }
    }

    async fn revoke_session(
        &self,
        sid: SessionId,
        _reason: RevokeReason,
        now_ms: u64,
    ) -> Result<Option<RevokedFamily>, StoreError> {
        let keys = &self.conn.keys;
        let encoded = sid.encode();
        let mut inv = REVOKE.key(keys.session(&encoded));
        inv.key(keys.revoked())
            .key(keys.stream())
            .arg(&keys.prefix)
            .arg(&encoded)
            .arg(now_ms)
            .arg(self.reuse_grace_ms)
            .arg(STREAM_MAXLEN);
        match self.conn.run::<Value>(&inv).await? {
            Value::Nil => Ok(None),
            v => self.revoked_here(v).map(Some),
        }
    }

    async fn revoke_sid(&self, sid: SessionId, until_secs: u64) -> Result<(), StoreError> {
        let keys = &self.conn.keys;
        let mut inv = REVOKE_SID.key(keys.revoked());
        inv.key(keys.stream())
            .arg(sid.encode())
            .arg(until_secs)
            .arg(STREAM_MAXLEN);
        self.conn.run::<i64>(&inv).await?;
        self.revoked.revoke(sid, until_secs);
        Ok(())
    }

    /// Redis expires session records and sealed copies by itself; what is left is trimming the
    /// two indexes by score. Every instance may do it; it is idempotent.
    async fn sweep(&self, now_ms: u64) {
        let keys = &self.conn.keys;
        // Revocations are kept in the index a day past their end, far beyond any sane leeway.
        let lapsed = (now_ms / 1000).saturating_sub(86_400);
        let mut pipe = redis::pipe();
        pipe.cmd("ZREMRANGEBYSCORE")
            .arg(keys.sessions())
            .arg("-inf")
            .arg(now_ms)
            .ignore()
            .cmd("ZREMRANGEBYSCORE")
            .arg(keys.revoked())
            .arg("-inf")
            .arg(format!("({lapsed}"))
            .ignore();
        let mut c = self.conn.manager();
        if let Err(e) = self.conn.bounded(pipe.query_async::<()>(&mut c)).await {
            tracing::debug!(error = %e, "session store: sweep skipped");
        }
    }

    async fn session_count(&self) -> Result<usize, StoreError> {
        self.conn
            .query(redis::cmd("ZCARD").arg(self.conn.keys.sessions()))
            .await
    }

    fn available(&self) -> bool {
        self.conn.health.available()
    }
}

#[cfg(test)]
mod tests;
