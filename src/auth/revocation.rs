//! The revoked-session set: session ids (`sid`) whose access tokens the gateway refuses.
//!
//! Written by the authorization server (family revocation on refresh-token reuse, RFC 7009 revoke)
//! and read by the validator on every request, cache hit or miss. An entry lives only until the
//! longest-lived access token of its session would have expired anyway; after that the token's own
//! `exp` refuses it, so the set stays as small as the number of recently revoked sessions.

use std::sync::atomic::{AtomicUsize, Ordering};

use dashmap::DashMap;

use crate::ids::SessionId;
use crate::store::registry::UniformKeyHasher;

#[derive(Default)]
pub struct RevokedSessions {
    /// sid → `exp` of the session's last access token.
    until: DashMap<SessionId, u64, UniformKeyHasher>,
    /// Entry count, read without touching the shards: the common case is an empty set.
    len: AtomicUsize,
    /// The validator accepts a token until `exp + leeway`, so an entry must last as long.
    leeway_secs: u64,
}

impl RevokedSessions {
    pub fn new() -> Self {
        Self::default()
    }

    /// A set for a validator that tolerates `leeway_secs` of clock skew.
    pub fn with_leeway(leeway_secs: u64) -> Self {
        RevokedSessions {
            leeway_secs,
            ..Self::default()
        }
    }

    /// Refuses `sid`'s access tokens until `until_secs` (extends an existing entry, never shortens).
    pub fn revoke(&self, sid: SessionId, until_secs: u64) {
        let mut inserted = false;
        self.until
            .entry(sid)
            .and_modify(|u| *u = (*u).max(until_secs))
            .or_insert_with(|| {
                inserted = true;
                until_secs
            });
        if inserted {
            self.len.fetch_add(1, Ordering::Relaxed);
        }
    }

    pub fn is_revoked(&self, sid: SessionId, now_secs: u64) -> bool {
        if self.len.load(Ordering::Relaxed) == 0 {
            return false;
        }
        self.until
            .get(&sid)
            .is_some_and(|u| now_secs <= u.saturating_add(self.leeway_secs))
    }

    /// Drops entries whose tokens have all expired.
    pub fn sweep(&self, now_secs: u64) {
        let mut removed = 0;
        self.until.retain(|_, until| {
            let keep = now_secs <= until.saturating_add(self.leeway_secs);
            removed += usize::from(!keep);
            keep
        });
        self.len.fetch_sub(removed, Ordering::Relaxed);
    }

    pub fn len(&self) -> usize {
        self.len.load(Ordering::Relaxed)
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    pub fn leeway_secs(&self) -> u64 {
        self.leeway_secs
    }

    /// Every entry, for a durable store's snapshot.
    pub fn for_each(&self, mut f: impl FnMut(SessionId, u64)) {
        for e in self.until.iter() {
            f(*e.key(), *e.value());
        }
    }
}

impl std::fmt::Debug for RevokedSessions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "RevokedSessions({} entries)", self.len())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const S1: SessionId = SessionId(1);
    const S2: SessionId = SessionId(2);

    #[test]
    fn revoked_until_its_tokens_expire() {
        let set = RevokedSessions::new();
        assert!(!set.is_revoked(S1, 100));
        set.revoke(S1, 200);
        assert!(set.is_revoked(S1, 100));
        assert!(set.is_revoked(S1, 200));
        assert!(!set.is_revoked(S2, 100));
        set.sweep(150);
        assert_eq!(set.len(), 1, "not yet expired");
        set.sweep(201);
        assert!(set.is_empty());
        assert!(!set.is_revoked(S1, 201));
    }

    #[test]
    fn entries_outlast_the_validators_leeway() {
        let set = RevokedSessions::with_leeway(30);
        set.revoke(S1, 100);
        set.sweep(129);
        assert!(set.is_revoked(S1, 130), "a token is still accepted until exp + leeway");
        assert!(!set.is_revoked(S1, 131));
    }

    #[test]
    fn revoking_again_extends_never_shortens() {
        let set = RevokedSessions::new();
        set.revoke(S1, 300);
        set.revoke(S1, 200);
        assert!(set.is_revoked(S1, 250));
        assert_eq!(set.len(), 1);
    }
}
