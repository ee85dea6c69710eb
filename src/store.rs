//! Where sessions live: the seam between the authorization server's protocol logic and storage.
//!
//! ```text
//!   oauth (grants, rotation, reuse, revocation) ──▶ SessionStore ─┬─ MemoryStore   (process memory)
//!                                                                 ├─ DurableStore  (memory + journal on disk)
//!                                                                 └─ RedisStore    (shared by every instance)
//!   validator (every request) ──▶ RevokedSessions (always in memory: the hot path makes no I/O)
//! ```
//!
//! A store keeps one record per session (refresh-token family): who (username, client id, scope
//! names — never positions in a config), its lifetimes, the digest of its current refresh token,
//! and the tokens it rotated (a 64-bit digest prefix each, for reuse detection, plus for the reuse
//! grace the sealed copy of the response that rotated them). Rotation is a compare-and-set on the
//! current digest; whoever loses the race learns what the winner did and replays or revokes.
//! Every store also keeps the shared [`RevokedSessions`] set up to date. A store's operations
//! return only once their effect is as durable as the store promises (the durable store: on disk).

pub mod durable;
pub mod journal;
pub mod memory;
pub mod redis;
pub mod registry;

use std::sync::Arc;

use crate::auth::RevokedSessions;
use crate::crypto::{Digest, Sealed};
use crate::ids::SessionId;

pub use durable::DurableStore;
pub use memory::MemoryStore;
pub use redis::{RedisStore, StoreObserver};

/// A session about to be created at login.
#[derive(Debug, Clone)]
pub struct NewSession {
    pub sid: SessionId,
    pub user: Arc<str>,
    pub client: Arc<str>,
    /// Granted scope names, space-delimited.
    pub scopes: Arc<str>,
    pub now_ms: u64,
    pub session_expires_ms: u64,
    pub access_exp_secs: u64,
    pub token: Digest,
    pub token_exp_ms: u64,
    /// Beyond this many live sessions for the user, the oldest is revoked.
    pub max_sessions_per_user: usize,
}

/// What a store knows of a session.
#[derive(Debug, Clone)]
pub struct SessionView {
    pub sid: SessionId,
    pub user: Arc<str>,
    pub client: Arc<str>,
    pub scopes: Arc<str>,
    pub session_expires_ms: u64,
    pub revoked: bool,
}

/// What a presented refresh token is to its session.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TokenState {
    /// The session's live refresh token, issued at `issued_ms` (login or its last rotation).
    Current { expires_ms: u64, issued_ms: u64 },
    /// A token the session already rotated; `sealed` is the response that rotated it, while the
    /// reuse grace lasts.
    Rotated {
        at_ms: u64,
        expires_ms: u64,
        sealed: Option<Sealed>,
    },
    /// Not a token of this session.
    Unknown,
}

/// A rotation to commit: `presented` must still be the session's current token.
#[derive(Debug, Clone)]
pub struct Rotation {
    pub sid: SessionId,
    pub presented: Digest,
    pub successor: Digest,
    pub successor_exp_ms: u64,
    /// `exp` of the access token issued with the successor.
    pub access_exp_secs: u64,
    /// The response, sealed under the presented token, for a retry within the grace.
    pub sealed: Option<Sealed>,
    pub now_ms: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Committed {
    /// The successor is now the session's current token.
    Rotated,
    /// The presented token is no longer current: someone else rotated it first.
    Lost,
    /// The session was revoked meanwhile.
    Revoked,
    /// The session no longer exists (expired and swept).
    Gone,
}

/// Why a session was revoked (audit lines, metrics).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RevokeReason {
    /// RFC 7009 revocation by the client (logout).
    Client,
    /// A rotated refresh token was used again after the grace.
    Reuse,
    /// The user went past `max_sessions_per_user`; the oldest session made room.
    SessionLimit,
}

impl RevokeReason {
    pub fn as_str(self) -> &'static str {
        match self {
            RevokeReason::Client => "revoked_by_client",
            RevokeReason::Reuse => "refresh_token_reuse",
            RevokeReason::SessionLimit => "session_limit",
        }
    }
}

/// A session just revoked, for the audit log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RevokedFamily {
    pub sid: SessionId,
    pub user: Arc<str>,
    pub client: Arc<str>,
    /// False when it had already been revoked.
    pub newly: bool,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum StoreError {
    /// The session id is taken (a 64-bit collision: mint another).
    #[error("session id collision")]
    Collision,
    /// The store cannot take writes now (Redis down, journal back-pressure): 503, retry later.
    #[error("the session store is unavailable: {0}")]
    Unavailable(String),
    /// The store failed and will not recover by itself (a disk error): 500.
    #[error("the session store failed: {0}")]
    Failed(String),
}

/// The operations the authorization server needs from a store. Each returns once its effect is
/// as durable as the store promises.
pub trait SessionStore: Send + Sync {
    /// Creates a session; returns the sessions revoked to respect `max_sessions_per_user`.
    fn create(&self, s: NewSession) -> impl Future<Output = Result<Vec<RevokedFamily>, StoreError>> + Send;

    /// The session and what `token` (a refresh-token digest) is to it.
    fn inspect(
        &self,
        sid: SessionId,
        token: &Digest,
    ) -> impl Future<Output = Result<Option<(SessionView, TokenState)>, StoreError>> + Send;

    /// Compare-and-set rotation.
    fn rotate(&self, r: Rotation) -> impl Future<Output = Result<Committed, StoreError>> + Send;

    /// Revokes a session: its refresh tokens stop working and its access tokens are refused by sid
    /// until the last of them would have expired. `None` if the store does not know it.
    fn revoke_session(
        &self,
        sid: SessionId,
        reason: RevokeReason,
        now_ms: u64,
    ) -> impl Future<Output = Result<Option<RevokedFamily>, StoreError>> + Send;

    /// Refuses access tokens of `sid` until `until_secs` without a session record (tokens of the
    /// client-credentials grant have a sid but no refresh-token family).
    fn revoke_sid(&self, sid: SessionId, until_secs: u64) -> impl Future<Output = Result<(), StoreError>> + Send;

    /// Forgets expired state (and response copies past the grace). Async because a shared store
    /// sweeps its indexes over the network.
    fn sweep(&self, now_ms: u64) -> impl Future<Output = ()> + Send;

    /// Sessions the store holds (revoked ones included, until they expire and are swept).
    fn session_count(&self) -> impl Future<Output = Result<usize, StoreError>> + Send;

    /// Whether the store can take operations now (false while Redis is unreachable); read by
    /// `/readyz`. Never blocks.
    fn available(&self) -> bool {
        true
    }
}

/// The configured store.
pub enum Store {
    Memory(MemoryStore),
    Durable(DurableStore),
    Redis(RedisStore),
}

impl Store {
    pub fn memory(revoked: Arc<RevokedSessions>, reuse_grace_ms: u64) -> Store {
        Store::Memory(MemoryStore::new(revoked, reuse_grace_ms))
    }

    pub fn kind(&self) -> &'static str {
        match self {
            Store::Memory(_) => "memory",
            Store::Durable(_) => "durable",
            Store::Redis(_) => "redis",
        }
    }

    /// Reports availability changes and revocation propagation lags to `observer` (metrics). Only
    /// the Redis store has either; the others report nothing.
    pub fn observe(&self, observer: Arc<dyn StoreObserver>) {
        match self {
            Store::Memory(_) | Store::Durable(_) => {}
            Store::Redis(s) => s.observe(observer),
        }
    }

    /// Waits until the store may serve: the Redis store has loaded the revoked-session set (an
    /// instance that started without it would accept revoked sessions' access tokens).
    pub async fn ready(&self) -> Result<(), StoreError> {
        match self {
            Store::Memory(_) | Store::Durable(_) => Ok(()),
            Store::Redis(s) => s.synced(redis::STARTUP_SYNC_BOUND).await,
        }
    }
}

macro_rules! dispatch {
    ($self:ident, $s:ident => $e:expr) => {
        match $self {
            Store::Memory($s) => $e,
            Store::Durable($s) => $e,
            Store::Redis($s) => $e,
        }
    };
}

impl SessionStore for Store {
    async fn create(&self, s: NewSession) -> Result<Vec<RevokedFamily>, StoreError> {
        dispatch!(self, st => st.create(s).await)
    }
    async fn inspect(&self, sid: SessionId, token: &Digest) -> Result<Option<(SessionView, TokenState)>, StoreError> {
        dispatch!(self, st => st.inspect(sid, token).await)
    }
    async fn rotate(&self, r: Rotation) -> Result<Committed, StoreError> {
        dispatch!(self, st => st.rotate(r).await)
    }
    async fn revoke_session(
        &self,
        sid: SessionId,
        reason: RevokeReason,
        now_ms: u64,
    ) -> Result<Option<RevokedFamily>, StoreError> {
        dispatch!(self, st => st.revoke_session(sid, reason, now_ms).await)
    }
    async fn revoke_sid(&self, sid: SessionId, until_secs: u64) -> Result<(), StoreError> {
        dispatch!(self, st => st.revoke_sid(sid, until_secs).await)
    }
    async fn sweep(&self, now_ms: u64) {
        dispatch!(self, st => st.sweep(now_ms).await)
    }
    async fn session_count(&self) -> Result<usize, StoreError> {
        dispatch!(self, st => st.session_count().await)
    }
    fn available(&self) -> bool {
        dispatch!(self, st => st.available())
    }
}
