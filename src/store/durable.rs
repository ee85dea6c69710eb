//! The durable store: the in-memory registry, with every change journaled to a folder on disk
//! before it is acknowledged.
//!
//! ```text
//!  request ──▶ registry change (memory, under its lock) ──▶ journal.append (same lock)
//!          ◀── response only after journal.durable(seq): the batch holding it was fdatasync'ed
//!  restart ──▶ newest snapshot + the records after it, replayed into an empty registry
//!  every 30 s, once the log outgrows the last snapshot ──▶ compaction: a new snapshot of live
//!             sessions only (expired ones, and replay copies past the grace, leave here)
//! ```
//!
//! Reads never touch the disk: the maps stay in memory, and so does the revoked-session set the
//! request path consults. Acknowledged means durable: a login, a rotation, a revocation or a
//! reuse revocation is on disk before its response is sent; a replayed response (a retry within
//! the grace) waits until the rotation it replays is. The sealed copy of a rotation's response is
//! part of the record, so a client whose response was lost when the gateway died gets the
//! byte-identical response after the restart.

pub mod codec;

use std::io::BufWriter;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use crate::auth::RevokedSessions;
use crate::clock::SharedClock;
use crate::crypto::Digest;
use crate::ids::SessionId;
use crate::store::journal::{CompactStats, Journal, JournalError, JournalOptions, Recovered, Replay, Seq};
use crate::store::registry::{Event, Recorder, Registry};
use crate::store::{
    Committed, NewSession, RevokeReason, RevokedFamily, Rotation, SessionStore, SessionView, StoreError, TokenState,
};
use codec::{Restored, SnapshotWriter, decode_event, decode_snapshot, encode_event};

/// How long an acknowledgement may wait for the disk before the request is answered 503.
pub const DURABLE_WAIT: Duration = Duration::from_secs(10);

/// Appends each registry event to the journal, under the registry's lock.
pub struct JournalRecorder {
    journal: OnceLock<Journal>,
}

impl JournalRecorder {
    fn journal(&self) -> Result<&Journal, StoreError> {
        self.journal
            .get()
            .ok_or_else(|| StoreError::Failed("the journal is not open".into()))
    }
}

fn store_error(e: JournalError) -> StoreError {
    match e {
        JournalError::Backpressure { .. } | JournalError::Stalled { .. } => StoreError::Unavailable(e.to_string()),
        other => StoreError::Failed(other.to_string()),
    }
}

impl Recorder for JournalRecorder {
    fn record(&self, event: &Event) -> Result<u64, StoreError> {
        let mut buf = Vec::with_capacity(160);
        encode_event(event, &mut buf);
        self.journal()?.append(&buf).map(|s| s.0).map_err(store_error)
    }
}

pub struct DurableStore {
    registry: Registry<JournalRecorder>,
    clock: SharedClock,
    reuse_grace_ms: u64,
    /// Journal bytes appended when the last snapshot was written, and that snapshot's size:
    /// compaction runs once the log since then has outgrown the snapshot (and 8 MiB).
    compacted_at_bytes: AtomicU64,
    snapshot_bytes: AtomicU64,
    compacting: AtomicBool,
}

/// What opening the store found, for the startup log.
pub struct Opened {
    pub store: DurableStore,
    pub recovered: Recovered,
    pub sessions: usize,
    pub revoked: usize,
}

impl DurableStore {
    /// Opens (creating) the state folder, takes its lock, and replays it. Blocking IO: call it
    /// before serving.
    pub fn open(
        dir: &Path,
        revoked: Arc<RevokedSessions>,
        reuse_grace_ms: u64,
        clock: SharedClock,
        options: JournalOptions,
    ) -> Result<Opened, JournalError> {
        let registry = Registry::new(
            revoked,
            JournalRecorder {
                journal: OnceLock::new(),
            },
            reuse_grace_ms,
        );
        let now = clock.now_millis();
        let (journal, recovered) = Journal::open(dir, options, |item| -> Result<(), codec::DecodeError> {
            match item {
                Replay::Snapshot { payload, .. } => {
                    decode_snapshot(payload, registry.names(), |restored| match restored {
                        // Sessions expired by now are restored too: a record after the snapshot may have
                        // rotated them before they expired. Everything expired is swept at the end.
                        Restored::Session(sid, s) => registry.restore(sid, s),
                        Restored::Revoked(sid, until) => registry.revoked().revoke(sid, until),
                    })
                }
                Replay::Record { payload, .. } => {
                    registry.apply(decode_event(payload, registry.names())?, now);
                    Ok(())
                }
            }
        })?;
        registry.sweep(now);
        registry.rebuild_user_index();
        let snapshot_bytes = recovered.snapshot.as_ref().map_or(0, |s| s.bytes);
        let appended = journal.stats().appended_bytes;
        if registry.recorder().journal.set(journal).is_err() {
            return Err(JournalError::Closed);
        }
        let sessions = registry.session_count();
        let revoked = registry.revoked().len();
        Ok(Opened {
            store: DurableStore {
                registry,
                clock,
                reuse_grace_ms,
                compacted_at_bytes: AtomicU64::new(appended),
                snapshot_bytes: AtomicU64::new(snapshot_bytes),
                compacting: AtomicBool::new(false),
            },
            recovered,
            sessions,
            revoked,
        })
    }

    pub fn journal(&self) -> Option<&Journal> {
        self.registry.recorder().journal.get()
    }

    pub fn dir(&self) -> Option<PathBuf> {
        self.journal().map(|j| j.dir().to_path_buf())
    }

    /// Waits until `seq` is on disk (bounded by [`DURABLE_WAIT`]).
    async fn durable(&self, seq: u64) -> Result<(), StoreError> {
        if seq == 0 {
            return Ok(());
        }
        let journal = self.registry.recorder().journal()?;
        match tokio::time::timeout(DURABLE_WAIT, journal.durable(Seq(seq))).await {
            Ok(r) => r.map_err(store_error),
            Err(_) => Err(StoreError::Unavailable(format!(
                "the state folder did not confirm a write within {DURABLE_WAIT:?}"
            ))),
        }
    }

    /// Waits until everything appended so far is on disk.
    async fn settled(&self) -> Result<(), StoreError> {
        let head = self.registry.recorder().journal()?.head();
        self.durable(head.0).await
    }

    /// Whether the log has outgrown the last snapshot enough to be worth compacting.
    pub fn wants_compaction(&self) -> bool {
        let Some(j) = self.journal() else { return false };
        let since = j
            .stats()
            .appended_bytes
            .saturating_sub(self.compacted_at_bytes.load(Ordering::Relaxed));
        since > (8 << 20).max(self.snapshot_bytes.load(Ordering::Relaxed))
    }

    /// Writes a snapshot of the live sessions and revocations and drops the log it covers.
    /// Blocking IO: run it on a blocking thread.
    pub fn compact(&self) -> Result<CompactStats, JournalError> {
        if self.compacting.swap(true, Ordering::AcqRel) {
            return Err(JournalError::Stalled {
                what: "finish the previous compaction",
                waited: Duration::ZERO,
            });
        }
        let journal = self.registry.recorder().journal().map_err(|_| JournalError::Closed);
        let result = journal.and_then(|journal| {
            let before = journal.stats().appended_bytes;
            let now = self.clock.now_millis();
            let grace = self.reuse_grace_ms;
            let stats = journal.compact(|out| {
                let mut w = SnapshotWriter::new(BufWriter::with_capacity(1 << 20, out))?;
                let mut result = Ok(());
                self.registry.for_each_session(|sid, s| {
                    if result.is_ok() && s.live(now) {
                        result = w.session(sid, s, |r| now < r.at_ms.saturating_add(grace));
                    }
                });
                result?;
                let mut result = Ok(());
                let leeway = self.registry.revoked().leeway_secs();
                self.registry.revoked().for_each(|sid, until| {
                    if result.is_ok() && now / 1000 <= until.saturating_add(leeway) {
                        result = w.revoked(sid, until);
                    }
                });
                result?;
                w.finish().map(drop)
            })?;
            self.compacted_at_bytes.store(before, Ordering::Relaxed);
            self.snapshot_bytes.store(stats.snapshot_bytes, Ordering::Relaxed);
            Ok(stats)
        });
        self.compacting.store(false, Ordering::Release);
        result
    }

    pub fn registry(&self) -> &Registry<JournalRecorder> {
        &self.registry
    }
}

impl SessionStore for DurableStore {
    async fn create(&self, s: NewSession) -> Result<Vec<RevokedFamily>, StoreError> {
        let (seq, evicted) = self.registry.create(s)?;
        self.durable(seq).await?;
        Ok(evicted)
    }

    async fn inspect(&self, sid: SessionId, token: &Digest) -> Result<Option<(SessionView, TokenState)>, StoreError> {
        let found = self.registry.inspect(sid, token);
        // A retry is answered with the rotation's response: only once that rotation is durable.
        if let Some((_, TokenState::Rotated { .. })) = &found {
            self.settled().await?;
        }
        Ok(found)
    }

    async fn rotate(&self, r: Rotation) -> Result<Committed, StoreError> {
        let (seq, committed) = self.registry.rotate(r)?;
        self.durable(seq).await?;
        Ok(committed)
    }

    async fn revoke_session(
        &self,
        sid: SessionId,
        _reason: RevokeReason,
        _now_ms: u64,
    ) -> Result<Option<RevokedFamily>, StoreError> {
        match self.registry.revoke_session(sid)? {
            None => Ok(None),
            Some((seq, family)) => {
                // Already revoked (seq 0): that revocation may still be on its way to disk.
                if seq == 0 {
                    self.settled().await?;
                } else {
                    self.durable(seq).await?;
                }
                Ok(Some(family))
            }
        }
    }

    async fn revoke_sid(&self, sid: SessionId, until_secs: u64) -> Result<(), StoreError> {
        let seq = self.registry.revoke_sid(sid, until_secs)?;
        self.durable(seq).await
    }

    async fn sweep(&self, now_ms: u64) {
        self.registry.sweep(now_ms);
    }

    async fn session_count(&self) -> Result<usize, StoreError> {
        Ok(self.registry.session_count())
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use proptest::prelude::*;

    use super::*;
    use crate::clock::{Clock, ManualClock};
    use crate::crypto::Sealed;

    /// A comparable picture of a registry: every session's fields, and the revoked set.
    #[derive(Debug, PartialEq, Eq)]
    struct Picture {
        sessions: BTreeMap<u64, String>,
        revoked: BTreeMap<u64, u64>,
    }

    fn picture(store: &DurableStore, now: u64, grace: u64) -> Picture {
        let mut sessions = BTreeMap::new();
        store.registry.for_each_session(|sid, s| {
            if !s.live(now) {
                return;
            }
            let rotated: Vec<String> = s
                .rotated_oldest_first()
                .map(|r| {
                    let sealed = r.sealed.as_ref().filter(|_| now < r.at_ms + grace).map(|b| b.0.clone());
                    format!("{:x}/{}/{}/{:?}", r.prefix, r.at_ms, r.expires_ms, sealed)
                })
                .collect();
            sessions.insert(
                sid.0,
                format!(
                    "{} {} {} {} {} {} {:?} {} {} {} {:?}",
                    s.user,
                    s.client,
                    s.scopes,
                    s.created_ms,
                    s.session_expires_ms,
                    s.access_exp_secs,
                    s.current,
                    s.current_expires_ms,
                    s.current_issued_ms,
                    s.revoked,
                    rotated
                ),
            );
        });
        let mut revoked = BTreeMap::new();
        store.registry.revoked().for_each(|sid, until| {
            if now / 1000 <= until {
                revoked.insert(sid.0, until);
            }
        });
        Picture { sessions, revoked }
    }

    #[derive(Debug, Clone)]
    enum Op {
        Login(u8),
        Rotate(u8, bool),
        Revoke(u8),
        RevokeSid(u8),
        Advance(u32),
        Compact,
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            3 => (0u8..4).prop_map(Op::Login),
            5 => (any::<u8>(), any::<bool>()).prop_map(|(i, stale)| Op::Rotate(i, stale)),
            1 => any::<u8>().prop_map(Op::Revoke),
            1 => any::<u8>().prop_map(Op::RevokeSid),
            2 => (0u32..40_000_000).prop_map(Op::Advance),
            1 => Just(Op::Compact),
        ]
    }

    fn open(dir: &Path, clock: &Arc<ManualClock>, grace: u64) -> DurableStore {
        DurableStore::open(
            dir,
            Arc::new(RevokedSessions::new()),
            grace,
            clock.clone(),
            JournalOptions::default(),
        )
        .unwrap()
        .store
    }

    fn digest(n: u64) -> Digest {
        let mut d = [0u8; 32];
        d[..8].copy_from_slice(&n.to_le_bytes());
        d[8] = 0xee;
        d
    }

    /// A login of "ann" at `now` with refresh token `token`, valid until `token_exp_ms`.
    fn ann(sid: SessionId, token: Digest, now: u64, token_exp_ms: u64) -> NewSession {
        NewSession {
            sid,
            user: "ann".into(),
            client: "web".into(),
            scopes: "a".into(),
            now_ms: now,
            session_expires_ms: now + 2 * 86_400_000,
            access_exp_secs: now / 1000 + 900,
            token,
            token_exp_ms,
            max_sessions_per_user: 100,
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(48))]

        /// Snapshot + replay rebuilds exactly the state it came from (expired sessions aside).
        #[test]
        fn reopening_rebuilds_the_state_it_came_from(ops in proptest::collection::vec(op(), 1..60)) {
            let dir = tempfile::tempdir().unwrap();
            let clock = Arc::new(ManualClock::at_millis(1_800_000_000_000));
            let grace = 10_000;
            let store = open(dir.path(), &clock, grace);
            let mut sids: Vec<(SessionId, Digest)> = Vec::new();
            let mut next = 1u64;
            for op in ops {
                let now = clock.now_millis();
                match op {
                    Op::Login(user) => {
                        next += 1;
                        let sid = SessionId(next.wrapping_mul(0x9e37_79b9_7f4a_7c15));
                        let token = digest(next);
                        store.registry.create(NewSession {
                            sid,
                            user: format!("user{user}").into(),
                            client: "web".into(),
                            scopes: "a b".into(),
                            now_ms: now,
                            session_expires_ms: now + 2 * 86_400_000,
                            access_exp_secs: now / 1000 + 900,
                            token,
                            token_exp_ms: now + 86_400_000,
                            max_sessions_per_user: 3,
                        }).unwrap();
                        sids.push((sid, token));
                    }
                    Op::Rotate(i, stale) if !sids.is_empty() => {
                        let k = i as usize % sids.len();
                        let (sid, current) = sids[k];
                        next += 1;
                        let successor = digest(next);
                        let presented = if stale { digest(next + 1_000_000) } else { current };
                        let (_, c) = store.registry.rotate(Rotation {
                            sid,
                            presented,
                            successor,
                            successor_exp_ms: now + 86_400_000,
                            access_exp_secs: now / 1000 + 900,
                            sealed: Some(Sealed(vec![k as u8; 40])),
                            now_ms: now,
                        }).unwrap();
                        if c == Committed::Rotated {
                            sids[k].1 = successor;
                        }
                    }
                    Op::Revoke(i) if !sids.is_empty() => {
                        store.registry.revoke_session(sids[i as usize % sids.len()].0).unwrap();
                    }
                    Op::RevokeSid(i) => {
                        store.registry.revoke_sid(SessionId(u64::from(i)), now / 1000 + 60).unwrap();
                    }
                    Op::Advance(ms) => {
                        clock.advance(Duration::from_millis(u64::from(ms)));
                        store.registry.sweep(clock.now_millis());
                    }
                    Op::Compact => {
                        store.compact().unwrap();
                    }
                    _ => {}
                }
            }
            let now = clock.now_millis();
            let before = picture(&store, now, grace);
            drop(store);
            let reopened = open(dir.path(), &clock, grace);
            prop_assert_eq!(picture(&reopened, now, grace), before);
        }
    }

    /// A session whose ring of rotated tokens wrapped (more rotations than it remembers) comes
    /// back from a snapshot plus journal with the same tokens, in the same order.
    #[test]
    fn a_session_past_the_rotated_bound_survives_a_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let clock = Arc::new(ManualClock::at_millis(1_800_000_000_000));
        let grace = 10_000;
        let store = open(dir.path(), &clock, grace);
        let sid = SessionId(7);
        let now = clock.now_millis();
        store
            .registry
            .create(ann(sid, digest(0), now, now + 86_400_000))
            .unwrap();
        let rotations = crate::store::registry::MAX_ROTATED_PER_SESSION as u64 + 40;
        for i in 1..=rotations {
            if i == rotations - 5 {
                store.compact().unwrap(); // the snapshot holds a wrapped ring; the journal the rest
            }
            clock.advance(Duration::from_millis(1));
            let now = clock.now_millis();
            let (_, c) = store
                .registry
                .rotate(Rotation {
                    sid,
                    presented: digest(i - 1),
                    successor: digest(i),
                    successor_exp_ms: now + 86_400_000,
                    access_exp_secs: now / 1000 + 900,
                    sealed: Some(Sealed(vec![i as u8; 40])),
                    now_ms: now,
                })
                .unwrap();
            assert_eq!(c, Committed::Rotated);
        }
        let now = clock.now_millis();
        let before = picture(&store, now, grace);
        drop(store);
        let reopened = open(dir.path(), &clock, grace);
        assert_eq!(picture(&reopened, now, grace), before);
        let mut prefixes = Vec::new();
        reopened
            .registry
            .for_each_session(|_, s| prefixes = s.rotated_oldest_first().map(|r| r.prefix).collect());
        let oldest = rotations - crate::store::registry::MAX_ROTATED_PER_SESSION as u64;
        let expected: Vec<u64> = (oldest..rotations)
            .map(|k| crate::store::registry::prefix_of(&digest(k)))
            .collect();
        assert_eq!(prefixes, expected);
    }

    #[test]
    fn compaction_keeps_exactly_the_live_sessions() {
        let dir = tempfile::tempdir().unwrap();
        let clock = Arc::new(ManualClock::at_millis(1_800_000_000_000));
        let store = open(dir.path(), &clock, 10_000);
        let now = clock.now_millis();
        for i in 0..10u64 {
            let token_exp_ms = if i < 4 { now + 1_000 } else { now + 86_400_000 };
            store
                .registry
                .create(ann(SessionId(i + 1), digest(i), now, token_exp_ms))
                .unwrap();
        }
        clock.advance(Duration::from_secs(2));
        let stats = store.compact().unwrap();
        assert!(stats.segments_removed >= 1, "{stats:?}");
        drop(store);
        let reopened = open(dir.path(), &clock, 10_000);
        assert_eq!(
            reopened.registry.session_count(),
            6,
            "the 4 expired sessions left at the snapshot"
        );
        let files: Vec<_> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        assert_eq!(files.iter().filter(|f| f.ends_with(".snap")).count(), 1, "{files:?}");
    }
}
