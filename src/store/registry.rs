//! The in-memory session registry: one record per session, the compare-and-set rotation, revocation,
//! the per-user session limit, sweeping. Synchronous and socket-free; time is passed in. The memory
//! store is this registry alone; the durable store is this registry plus a journal, fed through
//! [`Recorder`] while the change is still under its lock, so the journal's order is the order the
//! changes were made in.
//!
//! ```text
//!  login ──▶ session S { user, client, scopes, lifetimes, current = T1 }
//!  refresh T1 ──▶ current = T2, rotated += T1 { at, sealed copy of the response }
//!  T1 again within reuse_grace ──▶ the same response (the caller opens the sealed copy)
//!  T1 again after the grace ──▶ S revoked: T2 refused, S's access tokens refused by sid
//! ```
//!
//! Locking: the session map's guards are held inside one block and never across a call that
//! touches the same map. The per-user index is locked before the session map, never after.

use std::hash::{BuildHasher, Hasher};
use std::sync::Arc;

use dashmap::DashMap;
use dashmap::mapref::entry::Entry;

use crate::auth::RevokedSessions;
use crate::crypto::{Digest, Sealed};
use crate::ids::SessionId;
use crate::store::{Committed, NewSession, RevokedFamily, Rotation, SessionView, StoreError, TokenState};

/// Rotated tokens remembered per session for reuse detection (each until it would have expired).
/// A client refreshing every 15 minutes has 96 within a day's refresh_ttl; past this bound the
/// oldest are forgotten (presenting one is then an unknown token: refused, without revoking).
pub const MAX_ROTATED_PER_SESSION: usize = 256;

/// Session ids are random: their bits are the hash.
#[derive(Clone, Copy, Default)]
pub struct UniformKeyHasher;

pub struct UniformKeyState(u64);

impl Hasher for UniformKeyState {
    fn finish(&self) -> u64 {
        self.0
    }
    fn write(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.0 = self.0.rotate_left(8) ^ u64::from(b);
        }
    }
    fn write_u64(&mut self, v: u64) {
        self.0 = v;
    }
}

impl BuildHasher for UniformKeyHasher {
    type Hasher = UniformKeyState;
    fn build_hasher(&self) -> UniformKeyState {
        UniformKeyState(0)
    }
}

/// A change to the registry, as the durable store journals it. Applying an event twice, or
/// applying events to a state that already reflects some of them (a snapshot taken while writes
/// went on), leaves the same state: replay is idempotent.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    Created {
        sid: SessionId,
        user: Arc<str>,
        client: Arc<str>,
        scopes: Arc<str>,
        created_ms: u64,
        session_expires_ms: u64,
        access_exp_secs: u64,
        token: Digest,
        token_exp_ms: u64,
    },
    Rotated {
        sid: SessionId,
        from: Digest,
        to: Digest,
        to_exp_ms: u64,
        at_ms: u64,
        access_exp_secs: u64,
        sealed: Option<Sealed>,
    },
    /// A session revoked (its record stays, flagged, until it expires); `until_secs` is how long
    /// its access tokens are refused.
    SessionRevoked { sid: SessionId, until_secs: u64 },
    /// Access tokens of a sid refused until `until_secs`, without a session record.
    SidRevoked { sid: SessionId, until_secs: u64 },
}

/// Where the registry reports each change, under the lock that ordered it. Returns a sequence
/// number the caller can wait on (the memory store returns 0 and waits for nothing).
pub trait Recorder: Send + Sync {
    fn record(&self, event: &Event) -> Result<u64, StoreError>;
}

/// Records nothing: the memory store.
pub struct NoRecorder;

impl Recorder for NoRecorder {
    fn record(&self, _: &Event) -> Result<u64, StoreError> {
        Ok(0)
    }
}

/// Shares one `Arc<str>` per distinct name, so a million sessions of a hundred users hold a
/// hundred username strings, not a million.
#[derive(Default)]
pub struct Interner(DashMap<Arc<str>, (), foldhash::fast::RandomState>);

impl Interner {
    pub fn intern(&self, s: &str) -> Arc<str> {
        if let Some(e) = self.0.get(s) {
            return e.key().clone();
        }
        self.0.entry(Arc::from(s)).or_default().key().clone()
    }

    /// Forgets names no session refers to any more.
    fn sweep(&self) {
        self.0.retain(|k, _| Arc::strong_count(k) > 1);
    }
}

/// A token the session rotated.
#[derive(Debug, Clone)]
pub struct RotatedToken {
    /// The first 8 bytes of its digest: enough to recognise it (a forger would have to match 64
    /// bits of a SHA-256 of a secret), a quarter of the memory.
    pub prefix: u64,
    pub at_ms: u64,
    pub expires_ms: u64,
    /// The response that rotated it, sealed under it; dropped once the grace has passed.
    pub sealed: Option<Box<Sealed>>,
}

#[derive(Debug, Clone)]
pub struct Session {
    pub user: Arc<str>,
    pub client: Arc<str>,
    pub scopes: Arc<str>,
    pub created_ms: u64,
    pub session_expires_ms: u64,
    /// Latest `exp` of an access token issued in this session: how long a revocation must last.
    pub access_exp_secs: u64,
    pub current: Digest,
    pub current_expires_ms: u64,
    /// When the current token was issued (the login, or the rotation that minted it).
    pub current_issued_ms: u64,
    /// The tokens this session rotated: a ring of at most [`MAX_ROTATED_PER_SESSION`]. Oldest
    /// first until it is full; from then on each rotation overwrites the oldest entry, at
    /// `rotated_head`. Read it through [`Session::rotated_oldest_first`]. Not a `VecDeque` (8
    /// bytes more per session: 365 against 348 B at a million sessions) and not a `Vec` shifted
    /// by `remove(0)` (a session at the bound moved 8 KiB per rotation: 1.5 % of a rotation's CPU
    /// in the refresh bench); the head index lives in the struct's padding.
    pub(in crate::store) rotated: Vec<RotatedToken>,
    /// Index of the oldest entry of `rotated` once it is full; 0 before.
    pub(in crate::store) rotated_head: u8,
    pub revoked: bool,
}

// The ring's head is a u8.
const _: () = assert!(MAX_ROTATED_PER_SESSION <= 1 << 8);

pub fn prefix_of(d: &Digest) -> u64 {
    let mut p = [0u8; 8];
    p.copy_from_slice(&d[..8]);
    u64::from_le_bytes(p)
}

impl Session {
    fn view(&self, sid: SessionId) -> SessionView {
        SessionView {
            sid,
            user: self.user.clone(),
            client: self.client.clone(),
            scopes: self.scopes.clone(),
            session_expires_ms: self.session_expires_ms,
            revoked: self.revoked,
        }
    }

    fn token_state(&self, token: &Digest) -> TokenState {
        if crate::crypto::digest_eq(&self.current, token) {
            return TokenState::Current {
                expires_ms: self.current_expires_ms,
                issued_ms: self.current_issued_ms,
            };
        }
        let prefix = prefix_of(token);
        let (newer, older) = self.rotated.split_at(self.head());
        match newer
            .iter()
            .rev()
            .chain(older.iter().rev())
            .find(|r| r.prefix == prefix)
        {
            Some(r) => TokenState::Rotated {
                at_ms: r.at_ms,
                expires_ms: r.expires_ms,
                sealed: r.sealed.as_deref().cloned(),
            },
            None => TokenState::Unknown,
        }
    }

    /// Applies a rotation whose `from` is current. Oldest rotated entries beyond the bound go.
    fn rotate(
        &mut self,
        from: &Digest,
        to: Digest,
        to_exp_ms: u64,
        at_ms: u64,
        access_exp_secs: u64,
        sealed: Option<Sealed>,
    ) {
        let entry = RotatedToken {
            prefix: prefix_of(from),
            at_ms,
            expires_ms: self.current_expires_ms,
            sealed: sealed.map(Box::new),
        };
        if self.rotated.len() >= MAX_ROTATED_PER_SESSION {
            let head = self.head();
            self.rotated[head] = entry;
            self.rotated_head = ((head + 1) % MAX_ROTATED_PER_SESSION) as u8;
        } else {
            self.rotated.push(entry);
        }
        self.current = to;
        self.current_expires_ms = to_exp_ms;
        self.current_issued_ms = at_ms;
        self.access_exp_secs = self.access_exp_secs.max(access_exp_secs);
    }

    pub fn live(&self, now_ms: u64) -> bool {
        now_ms < self.current_expires_ms
    }

    fn head(&self) -> usize {
        usize::from(self.rotated_head).min(self.rotated.len())
    }

    /// The rotated tokens, oldest first.
    pub fn rotated_oldest_first(&self) -> impl Iterator<Item = &RotatedToken> {
        let (newer, older) = self.rotated.split_at(self.head());
        older.iter().chain(newer)
    }

    /// Puts the ring back in plain oldest-first order (before removing entries from it).
    fn normalize_rotated(&mut self) {
        let head = self.head();
        self.rotated.rotate_left(head);
        self.rotated_head = 0;
    }
}

pub struct Registry<R: Recorder = NoRecorder> {
    sessions: DashMap<SessionId, Session, UniformKeyHasher>,
    /// Username → that user's sessions, oldest first (for `max_sessions_per_user`). Entries of
    /// sessions that are gone or revoked are pruned lazily.
    by_user: DashMap<Arc<str>, Vec<SessionId>, foldhash::fast::RandomState>,
    revoked: Arc<RevokedSessions>,
    names: Interner,
    recorder: R,
    reuse_grace_ms: u64,
}

impl<R: Recorder> Registry<R> {
    pub fn new(revoked: Arc<RevokedSessions>, recorder: R, reuse_grace_ms: u64) -> Self {
        Registry {
            sessions: DashMap::with_hasher(UniformKeyHasher),
            by_user: DashMap::default(),
            revoked,
            names: Interner::default(),
            recorder,
            reuse_grace_ms,
        }
    }

    pub fn recorder(&self) -> &R {
        &self.recorder
    }

    pub fn revoked(&self) -> &Arc<RevokedSessions> {
        &self.revoked
    }

    /// Creates a session. Returns the sequence number of the last event recorded and the sessions
    /// revoked to keep the user within `max_sessions_per_user`.
    pub fn create(&self, mut s: NewSession) -> Result<(u64, Vec<RevokedFamily>), StoreError> {
        s.user = self.names.intern(&s.user);
        s.client = self.names.intern(&s.client);
        s.scopes = self.names.intern(&s.scopes);
        let mut evicted = Vec::new();
        // The user's index is locked first and held while the session is inserted, so two logins
        // of one user cannot both see room for one more.
        let mut index = self.by_user.entry(s.user.clone()).or_default();
        let mut seq = match self.sessions.entry(s.sid) {
            Entry::Occupied(_) => return Err(StoreError::Collision),
            Entry::Vacant(v) => {
                let event = Event::Created {
                    sid: s.sid,
                    user: s.user.clone(),
                    client: s.client.clone(),
                    scopes: s.scopes.clone(),
                    created_ms: s.now_ms,
                    session_expires_ms: s.session_expires_ms,
                    access_exp_secs: s.access_exp_secs,
                    token: s.token,
                    token_exp_ms: s.token_exp_ms,
                };
                let seq = self.recorder.record(&event)?;
                v.insert(Session {
                    user: s.user,
                    client: s.client,
                    scopes: s.scopes,
                    created_ms: s.now_ms,
                    session_expires_ms: s.session_expires_ms,
                    access_exp_secs: s.access_exp_secs,
                    current: s.token,
                    current_expires_ms: s.token_exp_ms,
                    current_issued_ms: s.now_ms,
                    rotated: Vec::new(),
                    rotated_head: 0,
                    revoked: false,
                });
                seq
            }
        };
        index.push(s.sid);
        let max = s.max_sessions_per_user.max(1);
        if index.len() > max {
            // Only now does it matter which of them are still live: forget the dead ones (expired,
            // revoked, swept), then revoke the oldest beyond the limit.
            let sid = s.sid;
            index.retain(|other| {
                *other == sid || self.sessions.get(other).is_some_and(|f| !f.revoked && f.live(s.now_ms))
            });
        }
        let excess = index.len().saturating_sub(max);
        let oldest: Vec<SessionId> = index.drain(..excess).collect();
        drop(index);
        for sid in oldest {
            if let Some((q, f)) = self.revoke_session(sid)? {
                seq = seq.max(q);
                evicted.push(f);
            }
        }
        Ok((seq, evicted))
    }

    pub fn inspect(&self, sid: SessionId, token: &Digest) -> Option<(SessionView, TokenState)> {
        let s = self.sessions.get(&sid)?;
        Some((s.view(sid), s.token_state(token)))
    }

    /// Compare-and-set rotation; the sequence number is of the recorded event (0 when nothing
    /// changed).
    pub fn rotate(&self, r: Rotation) -> Result<(u64, Committed), StoreError> {
        let Some(mut s) = self.sessions.get_mut(&r.sid) else {
            return Ok((0, Committed::Gone));
        };
        if s.revoked {
            return Ok((0, Committed::Revoked));
        }
        if !crate::crypto::digest_eq(&s.current, &r.presented) {
            return Ok((0, Committed::Lost));
        }
        let event = Event::Rotated {
            sid: r.sid,
            from: r.presented,
            to: r.successor,
            to_exp_ms: r.successor_exp_ms,
            at_ms: r.now_ms,
            access_exp_secs: r.access_exp_secs,
            sealed: r.sealed,
        };
        let seq = self.recorder.record(&event)?;
        let Event::Rotated { sealed, .. } = event else {
            return Ok((seq, Committed::Rotated));
        };
        s.rotate(
            &r.presented,
            r.successor,
            r.successor_exp_ms,
            r.now_ms,
            r.access_exp_secs,
            sealed,
        );
        Ok((seq, Committed::Rotated))
    }

    /// Revokes a session (idempotent). `None` when unknown.
    pub fn revoke_session(&self, sid: SessionId) -> Result<Option<(u64, RevokedFamily)>, StoreError> {
        let Some(mut s) = self.sessions.get_mut(&sid) else {
            return Ok(None);
        };
        let newly = !s.revoked;
        let mut seq = 0;
        if newly {
            seq = self.recorder.record(&Event::SessionRevoked {
                sid,
                until_secs: s.access_exp_secs,
            })?;
            s.revoked = true;
            // Dropping the sealed copies now: a revoked session replays nothing.
            for r in &mut s.rotated {
                r.sealed = None;
            }
        }
        let until = s.access_exp_secs;
        let family = RevokedFamily {
            sid,
            user: s.user.clone(),
            client: s.client.clone(),
            newly,
        };
        drop(s);
        self.revoked.revoke(sid, until);
        Ok(Some((seq, family)))
    }

    pub fn revoke_sid(&self, sid: SessionId, until_secs: u64) -> Result<u64, StoreError> {
        let seq = self.recorder.record(&Event::SidRevoked { sid, until_secs })?;
        self.revoked.revoke(sid, until_secs);
        Ok(seq)
    }

    /// Forgets expired sessions, rotated tokens past their expiry and response copies past the
    /// grace; prunes the per-user index.
    pub fn sweep(&self, now_ms: u64) {
        let grace = self.reuse_grace_ms;
        self.sessions.retain(|_, s| {
            if !s.live(now_ms) {
                return false;
            }
            s.normalize_rotated();
            s.rotated.retain(|r| now_ms < r.expires_ms);
            for r in &mut s.rotated {
                if now_ms >= r.at_ms.saturating_add(grace) {
                    r.sealed = None;
                }
            }
            true
        });
        self.by_user.retain(|_, sids| {
            sids.retain(|sid| self.sessions.get(sid).is_some_and(|s| !s.revoked));
            !sids.is_empty()
        });
        self.names.sweep();
    }

    /// The interner names decoded during recovery go through, so they share storage with the
    /// names of sessions created later.
    pub fn names(&self) -> &Interner {
        &self.names
    }

    pub fn session_count(&self) -> usize {
        self.sessions.len()
    }

    /// Applies a journaled event (recovery). Idempotent, and tolerant of a state that already
    /// reflects later events.
    pub fn apply(&self, event: Event, now_ms: u64) {
        let _ = now_ms;
        match event {
            Event::Created {
                sid,
                user,
                client,
                scopes,
                created_ms,
                session_expires_ms,
                access_exp_secs,
                token,
                token_exp_ms,
            } => {
                // Even if this token has expired by now, later events may have rotated it: the
                // caller sweeps once everything is replayed.
                if let Entry::Vacant(v) = self.sessions.entry(sid) {
                    v.insert(Session {
                        user,
                        client,
                        scopes,
                        created_ms,
                        session_expires_ms,
                        access_exp_secs,
                        current: token,
                        current_expires_ms: token_exp_ms,
                        current_issued_ms: created_ms,
                        rotated: Vec::new(),
                        rotated_head: 0,
                        revoked: false,
                    });
                }
            }
            Event::Rotated {
                sid,
                from,
                to,
                to_exp_ms,
                at_ms,
                access_exp_secs,
                sealed,
            } => {
                if let Some(mut s) = self.sessions.get_mut(&sid)
                    && s.current == from
                {
                    let sealed = sealed.filter(|_| now_ms < at_ms.saturating_add(self.reuse_grace_ms) && !s.revoked);
                    s.rotate(&from, to, to_exp_ms, at_ms, access_exp_secs, sealed);
                }
            }
            Event::SessionRevoked { sid, until_secs } => {
                if let Some(mut s) = self.sessions.get_mut(&sid) {
                    s.revoked = true;
                    for r in &mut s.rotated {
                        r.sealed = None;
                    }
                }
                self.revoked.revoke(sid, until_secs);
            }
            Event::SidRevoked { sid, until_secs } => self.revoked.revoke(sid, until_secs),
        }
    }

    /// Inserts a session as a snapshot holds it (recovery). The per-user index is rebuilt by
    /// [`Registry::rebuild_user_index`] once everything is in.
    pub fn restore(&self, sid: SessionId, mut s: Session) {
        // Within the bound, as `rotate` expects (a snapshot is written oldest first; one from a
        // build with a higher bound, or edited, may hold more): the newest are kept.
        s.normalize_rotated();
        let excess = s.rotated.len().saturating_sub(MAX_ROTATED_PER_SESSION);
        s.rotated.drain(..excess);
        if let Entry::Vacant(v) = self.sessions.entry(sid) {
            v.insert(s);
        }
    }

    /// Rebuilds each user's index, oldest session first, from the sessions (after recovery).
    pub fn rebuild_user_index(&self) {
        let mut by_user: std::collections::HashMap<Arc<str>, Vec<(u64, SessionId)>> = std::collections::HashMap::new();
        for e in self.sessions.iter() {
            if !e.revoked {
                by_user
                    .entry(e.user.clone())
                    .or_default()
                    .push((e.created_ms, *e.key()));
            }
        }
        self.by_user.clear();
        for (user, mut sids) in by_user {
            sids.sort_unstable();
            self.by_user
                .insert(user, sids.into_iter().map(|(_, sid)| sid).collect());
        }
    }

    /// Calls `f` for every session (a consistent view of each one, not of all at once).
    pub fn for_each_session(&self, mut f: impl FnMut(SessionId, &Session)) {
        for e in self.sessions.iter() {
            f(*e.key(), e.value());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Records every event, for checking what a durable store would journal.
    #[derive(Default)]
    struct Log(std::sync::Mutex<Vec<Event>>);

    impl Recorder for Log {
        fn record(&self, e: &Event) -> Result<u64, StoreError> {
            let mut v = self.0.lock().unwrap();
            v.push(e.clone());
            Ok(v.len() as u64)
        }
    }

    const T0: u64 = 1_800_000_000_000;

    fn new_session(sid: u64, user: &str, token: u8, now: u64, max: usize) -> NewSession {
        NewSession {
            sid: SessionId(sid),
            user: user.into(),
            client: "web".into(),
            scopes: "a b".into(),
            now_ms: now,
            session_expires_ms: now + 30 * 86_400_000,
            access_exp_secs: now / 1000 + 900,
            token: [token; 32],
            token_exp_ms: now + 86_400_000,
            max_sessions_per_user: max,
        }
    }

    fn rotation(sid: u64, from: u8, to: u8, now: u64) -> Rotation {
        Rotation {
            sid: SessionId(sid),
            presented: [from; 32],
            successor: [to; 32],
            successor_exp_ms: now + 86_400_000,
            access_exp_secs: now / 1000 + 900,
            sealed: Some(Sealed(vec![from, to])),
            now_ms: now,
        }
    }

    #[test]
    fn replaying_the_journal_rebuilds_the_same_state_even_over_a_later_snapshot() {
        let revoked = Arc::new(RevokedSessions::new());
        let reg = Registry::new(revoked, Log::default(), 10_000);
        reg.create(new_session(1, "ann", 1, T0, 100)).unwrap();
        reg.create(new_session(2, "bob", 2, T0, 100)).unwrap();
        assert_eq!(reg.rotate(rotation(1, 1, 3, T0 + 1)).unwrap().1, Committed::Rotated);
        reg.revoke_session(SessionId(2)).unwrap();
        reg.revoke_sid(SessionId(9), T0 / 1000 + 60).unwrap();
        let events = reg.recorder().0.lock().unwrap().clone();
        assert_eq!(events.len(), 5);

        // Fresh replay, and a replay applied twice (over a state that already has it all).
        let replayed = Registry::new(Arc::new(RevokedSessions::new()), NoRecorder, 10_000);
        for _ in 0..2 {
            for e in &events {
                replayed.apply(e.clone(), T0 + 2);
            }
        }
        let (_, state) = replayed.inspect(SessionId(1), &[3; 32]).unwrap();
        assert!(matches!(state, TokenState::Current { .. }));
        let (_, state) = replayed.inspect(SessionId(1), &[1; 32]).unwrap();
        assert!(matches!(state, TokenState::Rotated { sealed: Some(_), .. }));
        assert!(replayed.inspect(SessionId(2), &[2; 32]).unwrap().0.revoked);
        assert!(replayed.revoked().is_revoked(SessionId(2), T0 / 1000));
        assert!(replayed.revoked().is_revoked(SessionId(9), T0 / 1000));
        assert_eq!(replayed.session_count(), 2);
    }

    #[test]
    fn a_user_past_the_session_limit_loses_the_oldest_session() {
        let reg = Registry::new(Arc::new(RevokedSessions::new()), NoRecorder, 10_000);
        for i in 0..3 {
            let (_, evicted) = reg.create(new_session(i, "ann", i as u8, T0 + i, 3)).unwrap();
            assert!(evicted.is_empty());
        }
        reg.create(new_session(10, "bob", 10, T0, 3)).unwrap();
        let (_, evicted) = reg.create(new_session(3, "ann", 3, T0 + 3, 3)).unwrap();
        assert_eq!(evicted.iter().map(|f| f.sid).collect::<Vec<_>>(), vec![SessionId(0)]);
        assert!(reg.revoked().is_revoked(SessionId(0), T0 / 1000));
        assert!(!reg.revoked().is_revoked(SessionId(1), T0 / 1000));
        // A revoked session no longer counts: one more login evicts session 1, not 0 again.
        let (_, evicted) = reg.create(new_session(4, "ann", 4, T0 + 4, 3)).unwrap();
        assert_eq!(evicted.iter().map(|f| f.sid).collect::<Vec<_>>(), vec![SessionId(1)]);
    }

    #[test]
    fn rotated_tokens_are_bounded_per_session_and_the_newest_are_remembered() {
        let reg = Registry::new(Arc::new(RevokedSessions::new()), NoRecorder, 10_000);
        reg.create(new_session(1, "ann", 0, T0, 100)).unwrap();
        let token = |i: u64| {
            let mut t = [0u8; 32];
            t[..8].copy_from_slice(&i.to_le_bytes());
            t
        };
        let rotations = MAX_ROTATED_PER_SESSION as u64 + 10;
        let rotate = |i: u64| {
            // Rotation i presents token i - 1 at T0 + i.
            let r = Rotation {
                presented: token(i - 1),
                successor: token(i),
                ..rotation(1, 0, 0, T0 + i)
            };
            assert_eq!(reg.rotate(r).unwrap().1, Committed::Rotated);
        };
        for i in 1..=rotations {
            rotate(i);
        }
        let remembered = |reg: &Registry| {
            let mut v = Vec::new();
            reg.for_each_session(|_, s| v = s.rotated_oldest_first().map(|r| (r.prefix, r.at_ms)).collect());
            v
        };
        // The ring wrapped: the 10 oldest are gone, the rest are in order.
        let expected: Vec<(u64, u64)> = (10..rotations).map(|k| (k, T0 + k + 1)).collect();
        assert_eq!(remembered(&reg), expected);
        for k in 0..rotations {
            let state = reg.inspect(SessionId(1), &token(k)).unwrap().1;
            match state {
                TokenState::Rotated { at_ms, .. } => assert!(k >= 10 && at_ms == T0 + k + 1, "token {k}"),
                TokenState::Unknown => assert!(k < 10, "token {k} forgotten"),
                TokenState::Current { .. } => panic!("token {k} is not current"),
            }
        }
        // A sweep drops the expired oldest ones (token k, minted at T0 + k, expires a day later:
        // at T0 + 1 day + 15, tokens up to 15 have) and keeps the order; a later rotation
        // appends after the newest.
        reg.sweep(T0 + 86_400_000 + 15);
        rotate(rotations + 1);
        let expected: Vec<(u64, u64)> = (16..=rotations).map(|k| (k, T0 + k + 1)).collect();
        assert_eq!(remembered(&reg), expected);
    }

    /// A restored session holding more rotated tokens than the bound (a snapshot from elsewhere)
    /// keeps the newest, and rotates as any other.
    #[test]
    fn a_restored_session_over_the_rotated_bound_keeps_the_newest() {
        let reg = Registry::new(Arc::new(RevokedSessions::new()), NoRecorder, 10_000);
        let over = MAX_ROTATED_PER_SESSION as u64 + 44;
        let rotated = (0..over)
            .map(|k| RotatedToken {
                prefix: k,
                at_ms: T0 + k,
                expires_ms: T0 + 86_400_000,
                sealed: None,
            })
            .collect();
        reg.restore(
            SessionId(1),
            Session {
                user: "ann".into(),
                client: "web".into(),
                scopes: "a".into(),
                created_ms: T0,
                session_expires_ms: T0 + 86_400_000,
                access_exp_secs: T0 / 1000 + 900,
                current: [9; 32],
                current_expires_ms: T0 + 86_400_000,
                current_issued_ms: T0 + over,
                rotated,
                rotated_head: 0,
                revoked: false,
            },
        );
        let prefixes = |reg: &Registry| {
            let mut v = Vec::new();
            reg.for_each_session(|_, s| v = s.rotated_oldest_first().map(|r| r.prefix).collect());
            v
        };
        assert_eq!(prefixes(&reg), (44..over).collect::<Vec<_>>());
        let r = Rotation {
            presented: [9; 32],
            ..rotation(1, 0, 10, T0 + over + 1)
        };
        assert_eq!(reg.rotate(r).unwrap().1, Committed::Rotated);
        let mut expected: Vec<u64> = (45..over).collect();
        expected.push(prefix_of(&[9; 32]));
        assert_eq!(prefixes(&reg), expected);
    }

    #[test]
    fn the_rotated_ring_head_costs_no_memory() {
        // The head index sits in the padding after `revoked`: a session is as large as with a
        // plain Vec (see `Session::rotated`; `--scenario memory` measures 348 B per session).
        assert_eq!(std::mem::size_of::<Session>(), 152);
    }
}
