//! The memory store: the registry alone. Fast, and gone with the process: a restart logs everyone
//! out and forgets every revocation (the gateway says so at start).

use std::sync::Arc;

use crate::auth::RevokedSessions;
use crate::crypto::Digest;
use crate::ids::SessionId;
use crate::store::registry::{NoRecorder, Registry};
use crate::store::{
    Committed, NewSession, RevokeReason, RevokedFamily, Rotation, SessionStore, SessionView, StoreError, TokenState,
};

pub struct MemoryStore {
    registry: Registry<NoRecorder>,
}

impl MemoryStore {
    pub fn new(revoked: Arc<RevokedSessions>, reuse_grace_ms: u64) -> Self {
        MemoryStore {
            registry: Registry::new(revoked, NoRecorder, reuse_grace_ms),
        }
    }

    pub fn registry(&self) -> &Registry<NoRecorder> {
        &self.registry
    }
}

impl SessionStore for MemoryStore {
    async fn create(&self, s: NewSession) -> Result<Vec<RevokedFamily>, StoreError> {
        self.registry.create(s).map(|(_, evicted)| evicted)
    }

    async fn inspect(&self, sid: SessionId, token: &Digest) -> Result<Option<(SessionView, TokenState)>, StoreError> {
        Ok(self.registry.inspect(sid, token))
    }

    async fn rotate(&self, r: Rotation) -> Result<Committed, StoreError> {
        self.registry.rotate(r).map(|(_, c)| c)
    }

    async fn revoke_session(
        &self,
        sid: SessionId,
        _reason: RevokeReason,
        _now_ms: u64,
    ) -> Result<Option<RevokedFamily>, StoreError> {
        Ok(self.registry.revoke_session(sid)?.map(|(_, f)| f))
    }

    async fn revoke_sid(&self, sid: SessionId, until_secs: u64) -> Result<(), StoreError> {
        self.registry.revoke_sid(sid, until_secs).map(|_| ())
    }

    async fn sweep(&self, now_ms: u64) {
        self.registry.sweep(now_ms);
    }

    async fn session_count(&self) -> Result<usize, StoreError> {
        Ok(self.registry.session_count())
    }
}
