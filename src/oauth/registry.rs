//! The refresh-token registry: sessions (refresh-token families), rotation, idempotent retry,
//! reuse detection, revocation, sweeping. Synchronous and socket-free; time is passed in.
//!
//! ```text
//!  login ──▶ family F { user, client, scopes, session cap } + token T1 (Active)
//!  refresh T1 ──▶ T2 (Active), T1 → Rotated { at, sealed copy of the response }
//!  T1 again, same client, within reuse_grace ──▶ the same response, byte for byte
//!  T1 again after the grace ──▶ F revoked: T2.. refused, F's access tokens refused by sid
//! ```
//!
//! Only SHA-256 digests of refresh tokens are keys here. The copy of a response kept for the grace
//! (it holds the next refresh token) is sealed with AES-256-GCM under a key derived from the
//! *presented* token, so a heap dump without that token cannot open it; it is dropped once the
//! grace has passed.
//!
//! Locking: DashMap guards are held only inside one statement or one small block, never across a
//! call that touches the same map (a second access to the same shard from the holder deadlocks).

use std::hash::{BuildHasher, Hasher};
use std::sync::Arc;
use std::time::Duration;

use aws_lc_rs::aead::{AES_256_GCM, Aad, LessSafeKey, Nonce, UnboundKey};
use aws_lc_rs::digest;
use dashmap::DashMap;
use dashmap::mapref::entry::Entry;

use crate::auth::RevokedSessions;
use crate::clock::UnixMillis;
use crate::oauth::issuer::{self, MintError, TokenDigest, digest_of, sid_to_string};
use crate::scope::ScopeSet;

/// Keys here are SHA-256 digests and random session ids: already uniform, so their first eight
/// bytes are the hash. (Attackers can present any token, but cannot choose its digest.)
#[derive(Clone, Copy, Default)]
pub struct UniformKeyHasher;

pub struct UniformKeyState(u64);

impl Hasher for UniformKeyState {
    fn finish(&self) -> u64 {
        self.0
    }
    fn write(&mut self, bytes: &[u8]) {
        if bytes.len() >= 8 {
            let mut first = [0u8; 8];
            first.copy_from_slice(&bytes[..8]);
            self.0 = u64::from_le_bytes(first);
        } else {
            for &b in bytes {
                self.0 = self.0.rotate_left(8) ^ u64::from(b);
            }
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

#[derive(Debug, Clone, Copy)]
pub struct RegistryLimits {
    pub refresh_ttl: Duration,
    pub session_max_lifetime: Duration,
    pub reuse_grace: Duration,
    pub access_ttl: Duration,
}

struct TokenRecord {
    family: u64,
    expires_at_ms: UnixMillis,
    state: TokenState,
}

enum TokenState {
    Active,
    Rotated {
        at_ms: UnixMillis,
        replay: Option<Box<Sealed>>,
    },
}

/// AES-256-GCM ciphertext and tag of a token response.
#[derive(Clone)]
struct Sealed(Vec<u8>);

#[derive(Debug, Clone, Copy)]
struct Family {
    user: u32,
    client: u32,
    scopes: ScopeSet,
    session_expires_ms: UnixMillis,
    /// Latest `exp` of an access token issued in this session: how long a revocation must last.
    access_exp_secs: u64,
    /// Latest expiry of a refresh token of this family: when the family can be forgotten.
    refresh_exp_ms: UnixMillis,
    revoked: bool,
}

/// What a rotation (or a login) hands to the response builder.
#[derive(Debug, Clone, Copy)]
pub struct SessionView {
    pub sid: u64,
    pub user: u32,
    pub client: u32,
    /// Scopes granted at login; a refresh may narrow but never widen them.
    pub scopes: ScopeSet,
}

pub struct Rotation<'a> {
    pub session: SessionView,
    pub refresh_token: &'a str,
    pub refresh_expires_in_secs: u64,
}

pub struct NewSession {
    pub sid: u64,
    pub refresh_token: String,
    pub refresh_expires_in_secs: u64,
}

/// A family just revoked, for the audit log.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RevokedFamily {
    pub sid: u64,
    pub user: u32,
    pub client: u32,
    /// False when the family had already been revoked.
    pub newly: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Invalid {
    Unknown,
    Expired,
    Revoked,
    /// The token belongs to another client; nothing changes.
    WrongClient,
    /// Reused after the grace: the family is now revoked.
    Reused(Option<RevokedFamily>),
}

#[derive(Debug)]
pub enum RefreshError<E> {
    Invalid(Invalid),
    /// The response builder refused (e.g. a widened scope); nothing changed.
    Respond(E),
    Mint(MintError),
}

#[derive(Debug, PartialEq, Eq)]
pub enum Rotated {
    /// A new pair; the body is the response to send.
    Fresh(Vec<u8>),
    /// A retry within the grace: the first use's response, byte for byte.
    Replayed(Vec<u8>),
}

impl Rotated {
    pub fn into_body(self) -> Vec<u8> {
        match self {
            Rotated::Fresh(b) | Rotated::Replayed(b) => b,
        }
    }
}

pub enum RevokeOutcome {
    /// Not a refresh token this registry knows (RFC 7009: still a 200).
    Unknown,
    /// Issued to another client; refused, nothing changes.
    NotYours,
    Revoked(Option<RevokedFamily>),
}

enum Snapshot {
    Active,
    Rotated { at_ms: UnixMillis, replay: Option<Sealed> },
}

pub struct RefreshRegistry {
    tokens: DashMap<TokenDigest, TokenRecord, UniformKeyHasher>,
    families: DashMap<u64, Family, UniformKeyHasher>,
    limits: RegistryLimits,
    revoked: Arc<RevokedSessions>,
}

fn ms(d: Duration) -> u64 {
    d.as_millis() as u64
}

impl RefreshRegistry {
    pub fn new(limits: RegistryLimits, revoked: Arc<RevokedSessions>) -> Self {
        RefreshRegistry {
            tokens: DashMap::with_hasher(UniformKeyHasher),
            families: DashMap::with_hasher(UniformKeyHasher),
            limits,
            revoked,
        }
    }

    /// Starts a session at login: a new family and its first refresh token.
    pub fn start_session(
        &self,
        user: u32,
        client: u32,
        scopes: ScopeSet,
        now_ms: UnixMillis,
    ) -> Result<NewSession, MintError> {
        let session_expires_ms = now_ms + ms(self.limits.session_max_lifetime);
        let refresh_exp_ms = (now_ms + ms(self.limits.refresh_ttl)).min(session_expires_ms);
        let family = Family {
            user,
            client,
            scopes,
            session_expires_ms,
            access_exp_secs: now_ms / 1000 + self.limits.access_ttl.as_secs(),
            refresh_exp_ms,
            revoked: false,
        };
        let sid = loop {
            let id = u64::from_le_bytes(issuer::random_bytes::<8>().map_err(|_| MintError)?);
            if let Entry::Vacant(v) = self.families.entry(id) {
                v.insert(family);
                break id;
            }
        };
        let (refresh_token, digest) = issuer::mint_refresh_token().map_err(|_| MintError)?;
        self.tokens.insert(
            digest,
            TokenRecord {
                family: sid,
                expires_at_ms: refresh_exp_ms,
                state: TokenState::Active,
            },
        );
        Ok(NewSession {
            sid,
            refresh_token,
            refresh_expires_in_secs: (refresh_exp_ms - now_ms) / 1000,
        })
    }

    /// Rotates a refresh token presented by `client`. `respond` builds the response body for the
    /// new pair; it runs before anything changes, so its refusal leaves the registry untouched.
    pub fn rotate<E>(
        &self,
        presented: &str,
        client: u32,
        now_ms: UnixMillis,
        respond: impl FnOnce(&Rotation<'_>) -> Result<Vec<u8>, E>,
    ) -> Result<Rotated, RefreshError<E>> {
        let digest = digest_of(presented);
        let (family_id, expires_at_ms, snapshot) =
            self.inspect(&digest).ok_or(RefreshError::Invalid(Invalid::Unknown))?;
        let family = self.family(family_id).ok_or(RefreshError::Invalid(Invalid::Unknown))?;
        // Order matters: another client's presentation must change nothing, not even a revocation.
        if family.client != client {
            return Err(RefreshError::Invalid(Invalid::WrongClient));
        }
        if family.revoked {
            return Err(RefreshError::Invalid(Invalid::Revoked));
        }
        if now_ms >= expires_at_ms {
            return Err(RefreshError::Invalid(Invalid::Expired));
        }
        if let Snapshot::Rotated { at_ms, replay } = snapshot {
            return self.replay_or_revoke(presented, family_id, at_ms, replay, now_ms);
        }

        let new_exp_ms = (now_ms + ms(self.limits.refresh_ttl)).min(family.session_expires_ms);
        if new_exp_ms <= now_ms {
            return Err(RefreshError::Invalid(Invalid::Expired));
        }
        let (new_token, new_digest) = issuer::mint_refresh_token().map_err(|_| RefreshError::Mint(MintError))?;
        let view = SessionView {
            sid: family_id,
            user: family.user,
            client: family.client,
            scopes: family.scopes,
        };
        let body = respond(&Rotation {
            session: view,
            refresh_token: &new_token,
            refresh_expires_in_secs: (new_exp_ms - now_ms) / 1000,
        })
        .map_err(RefreshError::Respond)?;

        // The successor exists before anyone can learn of it from a replay.
        self.tokens.insert(
            new_digest,
            TokenRecord {
                family: family_id,
                expires_at_ms: new_exp_ms,
                state: TokenState::Active,
            },
        );
        // The family learns of the new access token before the old refresh token is marked
        // rotated: once a replay can hand the response out, a revocation covers that token.
        let live = match self.families.get_mut(&family_id) {
            Some(mut f) if !f.revoked => {
                let access_exp = now_ms / 1000 + self.limits.access_ttl.as_secs();
                f.access_exp_secs = f.access_exp_secs.max(access_exp);
                f.refresh_exp_ms = f.refresh_exp_ms.max(new_exp_ms);
                true
            }
            _ => false,
        };
        if !live {
            self.tokens.remove(&new_digest);
            return Err(RefreshError::Invalid(Invalid::Revoked));
        }
        let sealed = seal(presented, &body);
        let won = match self.tokens.get_mut(&digest) {
            Some(mut record) if matches!(record.state, TokenState::Active) => {
                record.state = TokenState::Rotated {
                    at_ms: now_ms,
                    replay: sealed.map(Box::new),
                };
                true
            }
            _ => false,
        };
        if !won {
            // A concurrent request rotated it first: ours was never handed out.
            self.tokens.remove(&new_digest);
            return match self.inspect(&digest) {
                Some((_, _, Snapshot::Rotated { at_ms, replay })) => {
                    self.replay_or_revoke(presented, family_id, at_ms, replay, now_ms)
                }
                _ => Err(RefreshError::Invalid(Invalid::Unknown)),
            };
        }
        Ok(Rotated::Fresh(body))
    }

    fn replay_or_revoke<E>(
        &self,
        presented: &str,
        family_id: u64,
        rotated_at_ms: UnixMillis,
        replay: Option<Sealed>,
        now_ms: UnixMillis,
    ) -> Result<Rotated, RefreshError<E>> {
        if now_ms < rotated_at_ms + ms(self.limits.reuse_grace)
            && let Some(body) = replay.and_then(|s| open(presented, s))
        {
            return Ok(Rotated::Replayed(body));
        }
        Err(RefreshError::Invalid(Invalid::Reused(self.revoke_family(family_id))))
    }

    fn inspect(&self, digest: &TokenDigest) -> Option<(u64, UnixMillis, Snapshot)> {
        let r = self.tokens.get(digest)?;
        let snapshot = match &r.state {
            TokenState::Active => Snapshot::Active,
            TokenState::Rotated { at_ms, replay } => Snapshot::Rotated {
                at_ms: *at_ms,
                replay: replay.as_deref().cloned(),
            },
        };
        Some((r.family, r.expires_at_ms, snapshot))
    }

    fn family(&self, id: u64) -> Option<Family> {
        self.families.get(&id).map(|f| *f)
    }

    /// Revokes a session: all its refresh tokens stop working at once, and its access tokens are
    /// refused by sid until the last of them would have expired.
    pub fn revoke_family(&self, sid: u64) -> Option<RevokedFamily> {
        let (f, newly) = {
            let mut f = self.families.get_mut(&sid)?;
            let newly = !f.revoked;
            f.revoked = true;
            (*f, newly)
        };
        self.revoked.revoke(&sid_to_string(sid), f.access_exp_secs);
        Some(RevokedFamily {
            sid,
            user: f.user,
            client: f.client,
            newly,
        })
    }

    /// RFC 7009 revocation by refresh token.
    pub fn revoke_by_token(&self, presented: &str, client: u32) -> RevokeOutcome {
        let Some((family_id, _, _)) = self.inspect(&digest_of(presented)) else {
            return RevokeOutcome::Unknown;
        };
        match self.family(family_id) {
            None => RevokeOutcome::Unknown,
            Some(f) if f.client != client => RevokeOutcome::NotYours,
            Some(_) => RevokeOutcome::Revoked(self.revoke_family(family_id)),
        }
    }

    /// The client a session belongs to, if the session is known.
    pub fn session_client(&self, sid: u64) -> Option<u32> {
        self.family(sid).map(|f| f.client)
    }

    /// Forgets expired tokens and families, and response copies past the grace.
    pub fn sweep(&self, now_ms: UnixMillis) {
        let grace = ms(self.limits.reuse_grace);
        self.tokens.retain(|_, r| {
            if now_ms >= r.expires_at_ms {
                return false;
            }
            if let TokenState::Rotated { at_ms, replay } = &mut r.state
                && now_ms >= *at_ms + grace
            {
                *replay = None;
            }
            true
        });
        self.families.retain(|_, f| now_ms < f.refresh_exp_ms);
    }

    pub fn token_count(&self) -> usize {
        self.tokens.len()
    }

    pub fn session_count(&self) -> usize {
        self.families.len()
    }
}

fn sealing_key(token: &str) -> Option<LessSafeKey> {
    let mut ctx = digest::Context::new(&digest::SHA256);
    ctx.update(b"tokengate/replay-seal/v1\0");
    ctx.update(token.as_bytes());
    let key = ctx.finish();
    UnboundKey::new(&AES_256_GCM, key.as_ref()).ok().map(LessSafeKey::new)
}

/// Each key seals exactly one message (it is derived from a single-use token), so a fixed nonce
/// is safe.
fn seal(token: &str, body: &[u8]) -> Option<Sealed> {
    let key = sealing_key(token)?;
    let mut buf = body.to_vec();
    key.seal_in_place_append_tag(Nonce::assume_unique_for_key([0; 12]), Aad::empty(), &mut buf)
        .ok()?;
    Some(Sealed(buf))
}

fn open(token: &str, sealed: Sealed) -> Option<Vec<u8>> {
    let key = sealing_key(token)?;
    let mut buf = sealed.0;
    let len = key
        .open_in_place(Nonce::assume_unique_for_key([0; 12]), Aad::empty(), &mut buf)
        .ok()?
        .len();
    buf.truncate(len);
    Some(buf)
}

#[cfg(test)]
mod tests {
    use super::*;

    const T0: u64 = 1_800_000_000_000;
    const SEC: u64 = 1_000;

    fn limits(grace_secs: u64) -> RegistryLimits {
        RegistryLimits {
            refresh_ttl: Duration::from_secs(86_400),
            session_max_lifetime: Duration::from_secs(30 * 86_400),
            reuse_grace: Duration::from_secs(grace_secs),
            access_ttl: Duration::from_secs(900),
        }
    }

    fn registry(grace_secs: u64) -> (RefreshRegistry, Arc<RevokedSessions>) {
        let revoked = Arc::new(RevokedSessions::new());
        (RefreshRegistry::new(limits(grace_secs), revoked.clone()), revoked)
    }

    /// A response body that names the new refresh token, as the real one does.
    fn respond(r: &Rotation<'_>) -> Result<Vec<u8>, ()> {
        Ok(format!("{{\"refresh_token\":\"{}\"}}", r.refresh_token).into_bytes())
    }

    fn new_token(body: &[u8]) -> String {
        let s = std::str::from_utf8(body).unwrap();
        s.split('"').nth(3).unwrap().to_owned()
    }

    #[test]
    fn rotation_issues_a_new_token_and_retires_the_old() {
        let (reg, _) = registry(10);
        let s = reg.start_session(0, 0, ScopeSet(1), T0).unwrap();
        assert_eq!(s.refresh_expires_in_secs, 86_400);
        let Rotated::Fresh(body) = reg.rotate(&s.refresh_token, 0, T0 + SEC, respond).unwrap() else {
            panic!("expected a fresh pair")
        };
        let t2 = new_token(&body);
        assert_ne!(t2, s.refresh_token);
        assert!(matches!(
            reg.rotate(&t2, 0, T0 + 2 * SEC, respond),
            Ok(Rotated::Fresh(_))
        ));
    }

    #[test]
    fn retry_within_grace_gets_the_identical_response() {
        let (reg, revoked) = registry(10);
        let s = reg.start_session(0, 0, ScopeSet(1), T0).unwrap();
        let first = reg.rotate(&s.refresh_token, 0, T0, respond).unwrap().into_body();
        let again = reg.rotate(&s.refresh_token, 0, T0 + 9 * SEC, respond).unwrap();
        assert_eq!(again, Rotated::Replayed(first.clone()));
        assert!(revoked.is_empty());
        // And the token from the replayed response is the live one.
        assert!(matches!(
            reg.rotate(&new_token(&first), 0, T0 + 9 * SEC, respond),
            Ok(Rotated::Fresh(_))
        ));
    }

    #[test]
    fn reuse_after_grace_revokes_the_whole_family() {
        let (reg, revoked) = registry(10);
        let s = reg.start_session(7, 0, ScopeSet(1), T0).unwrap();
        let t2 = new_token(&reg.rotate(&s.refresh_token, 0, T0, respond).unwrap().into_body());
        let t3 = new_token(&reg.rotate(&t2, 0, T0 + SEC, respond).unwrap().into_body());
        let err = reg.rotate(&s.refresh_token, 0, T0 + 11 * SEC, respond).unwrap_err();
        let RefreshError::Invalid(Invalid::Reused(Some(fam))) = err else {
            panic!("{err:?}")
        };
        assert_eq!((fam.sid, fam.user, fam.newly), (s.sid, 7, true));
        // The newest token of the family is dead too, and the session's access tokens are refused.
        assert!(matches!(
            reg.rotate(&t3, 0, T0 + 12 * SEC, respond),
            Err(RefreshError::Invalid(Invalid::Revoked))
        ));
        assert!(revoked.is_revoked(&sid_to_string(s.sid), (T0 + 12 * SEC) / 1000));
        assert!(
            revoked.is_revoked(&sid_to_string(s.sid), (T0 + SEC) / 1000 + 900),
            "until the last access token expires"
        );
        assert!(!revoked.is_revoked(&sid_to_string(s.sid), (T0 + SEC) / 1000 + 901));
    }

    #[test]
    fn zero_grace_means_any_reuse_revokes() {
        let (reg, _) = registry(0);
        let s = reg.start_session(0, 0, ScopeSet(1), T0).unwrap();
        let t2 = new_token(&reg.rotate(&s.refresh_token, 0, T0, respond).unwrap().into_body());
        assert!(matches!(
            reg.rotate(&s.refresh_token, 0, T0, respond),
            Err(RefreshError::Invalid(Invalid::Reused(Some(_))))
        ));
        assert!(matches!(
            reg.rotate(&t2, 0, T0, respond),
            Err(RefreshError::Invalid(Invalid::Revoked))
        ));
    }

    #[test]
    fn another_clients_presentation_changes_nothing() {
        let (reg, revoked) = registry(10);
        let s = reg.start_session(0, 0, ScopeSet(1), T0).unwrap();
        assert!(matches!(
            reg.rotate(&s.refresh_token, 1, T0, respond),
            Err(RefreshError::Invalid(Invalid::WrongClient))
        ));
        assert!(revoked.is_empty());
        assert!(matches!(
            reg.rotate(&s.refresh_token, 0, T0, respond),
            Ok(Rotated::Fresh(_))
        ));
    }

    #[test]
    fn refresh_tokens_expire_after_a_day_and_sessions_at_their_cap() {
        let (reg, _) = registry(10);
        let s = reg.start_session(0, 0, ScopeSet(1), T0).unwrap();
        assert!(matches!(
            reg.rotate(&s.refresh_token, 0, T0 + 86_400 * SEC, respond),
            Err(RefreshError::Invalid(Invalid::Expired))
        ));

        // Refreshing every 23 hours keeps a session alive only until session_max_lifetime (30d).
        let s = reg.start_session(0, 0, ScopeSet(1), T0).unwrap();
        let mut token = s.refresh_token;
        let mut now = T0;
        let mut last_expires_in = u64::MAX;
        loop {
            now += 23 * 3600 * SEC;
            match reg.rotate(&token, 0, now, |r| {
                last_expires_in = r.refresh_expires_in_secs;
                respond(r)
            }) {
                Ok(r) => token = new_token(&r.into_body()),
                Err(RefreshError::Invalid(Invalid::Expired)) => break,
                Err(e) => panic!("{e:?}"),
            }
        }
        assert!(now > T0 + 30 * 86_400 * SEC - 23 * 3600 * SEC, "lived until the cap");
        assert!(now <= T0 + 30 * 86_400 * SEC + 23 * 3600 * SEC);
        assert!(
            last_expires_in < 86_400,
            "the last token was cut short by the session cap"
        );
    }

    #[test]
    fn a_refused_response_changes_nothing() {
        let (reg, _) = registry(10);
        let s = reg.start_session(0, 0, ScopeSet(1), T0).unwrap();
        assert!(matches!(
            reg.rotate(&s.refresh_token, 0, T0, |_| Err::<Vec<u8>, _>("wider")),
            Err(RefreshError::Respond("wider"))
        ));
        assert_eq!(reg.token_count(), 1);
        assert!(matches!(
            reg.rotate(&s.refresh_token, 0, T0, respond),
            Ok(Rotated::Fresh(_))
        ));
    }

    #[test]
    fn revoke_by_token_checks_the_client() {
        let (reg, revoked) = registry(10);
        let s = reg.start_session(0, 3, ScopeSet(1), T0).unwrap();
        assert!(matches!(
            reg.revoke_by_token(&s.refresh_token, 4),
            RevokeOutcome::NotYours
        ));
        assert!(matches!(reg.revoke_by_token("nope", 3), RevokeOutcome::Unknown));
        assert!(matches!(
            reg.revoke_by_token(&s.refresh_token, 3),
            RevokeOutcome::Revoked(Some(_))
        ));
        assert!(revoked.is_revoked(&sid_to_string(s.sid), T0 / 1000));
        assert!(matches!(
            reg.rotate(&s.refresh_token, 3, T0, respond),
            Err(RefreshError::Invalid(Invalid::Revoked))
        ));
    }

    #[test]
    fn sweep_forgets_expired_state_and_sealed_copies() {
        let (reg, _) = registry(10);
        let s = reg.start_session(0, 0, ScopeSet(1), T0).unwrap();
        reg.rotate(&s.refresh_token, 0, T0, respond).unwrap();
        reg.sweep(T0 + 11 * SEC);
        assert_eq!(reg.token_count(), 2, "the rotated record stays to detect reuse");
        // Past the grace the copy is gone, so a retry is reuse.
        assert!(matches!(
            reg.rotate(&s.refresh_token, 0, T0 + 5 * SEC, respond),
            Err(RefreshError::Invalid(Invalid::Reused(_)))
        ));
        reg.sweep(T0 + 86_401 * SEC);
        assert_eq!((reg.token_count(), reg.session_count()), (0, 0));
    }

    #[test]
    fn sealed_copies_open_only_with_the_presented_token() {
        let sealed = seal("token-a", b"body").unwrap();
        assert!(!sealed.0.windows(4).any(|w| w == b"body"));
        assert_eq!(open("token-a", sealed.clone()).as_deref(), Some(&b"body"[..]));
        assert_eq!(open("token-b", sealed), None);
    }

    #[test]
    fn concurrent_rotations_of_one_token_agree() {
        let (reg, revoked) = registry(10);
        let reg = Arc::new(reg);
        let s = reg.start_session(0, 0, ScopeSet(1), T0).unwrap();
        let bodies: Vec<Vec<u8>> = std::thread::scope(|scope| {
            let handles: Vec<_> = (0..16)
                .map(|_| {
                    let reg = reg.clone();
                    let token = s.refresh_token.clone();
                    scope.spawn(move || reg.rotate(&token, 0, T0, respond).unwrap().into_body())
                })
                .collect();
            handles.into_iter().map(|h| h.join().unwrap()).collect()
        });
        assert!(bodies.windows(2).all(|w| w[0] == w[1]));
        assert!(revoked.is_empty());
        assert_eq!(reg.token_count(), 2, "exactly one successor was kept");
    }
}
