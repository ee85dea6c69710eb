//! Access-token validation, for our own tokens and those of every configured `[[issuers]]`.
//!
//! ```text
//!   token ─▶ cache hit? ─▶ exp, nbf (Clock + leeway), revoked sid ─▶ ok
//!      └─ miss ─▶ header, claims ─▶ iss ─┬─ ours:     typ at+jwt; key by kid (KeySet); alg = the key's
//!                                        └─ an issuer: its typs; key by kid (Resolver); alg ∈ its
//!                                                      algorithms ∩ the key's JWK
//!                 ─▶ signature (jsonwebtoken) ─▶ aud ─▶ exp, nbf, revoked ─▶ cached until exp
//! ```
//!
//! The key is chosen by the token's `iss` and `kid` and the algorithm by the key, never by the
//! token: a header can only name an algorithm the key already has, so alg confusion (an RSA public
//! key used as an HMAC secret, `none`) cannot be expressed. A token of an issuer whose keys are not
//! loaded, or whose kid is unknown, may trigger one refetch of that issuer's JWKS
//! ([`Validator::validate_fetching`]); everything else is synchronous.
//!
//! Validated tokens are cached (moka, successes only, bounded). An entry's lifetime ends at its
//! token's `exp`, and a hit is still checked against the clock and the revoked-session set, so the
//! cache can neither outlive a token nor defeat a revocation (Oathkeeper #1082). The cached value
//! holds the token's granted scopes, and every request checks its route's scopes against them, so a
//! cache hit never skips the scope check (Oathkeeper #743). The cache belongs to one Snapshot: a
//! reload starts a new one, so no identity validated under an old config (or key) carries over.
//! Our revoked-session set applies to our own tokens only: another issuer's tokens have no session
//! here.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use foldhash::fast::RandomState;
use http::HeaderValue;
use moka::sync::Cache;
use serde::Deserialize;
use serde::de::IgnoredAny;

use crate::auth::RevokedSessions;
use crate::clock::SharedClock;
use crate::config::{IssuerSettings, ScopeClaim, SigningAlg, TokenSettings, normalize_typ};
use crate::ids::SessionId;
use crate::keys::{AlgSet, KeySet, Lookup, Resolver, verify_signature};
use crate::proxy::headers::Identity;
use crate::scope::{ScopeSet, ScopeUniverse};

/// Why a request's token was not accepted. Each maps to one RFC 6750 §3 response.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AuthError {
    /// No bearer token: 401 with a bare `Bearer realm` challenge.
    Missing,
    /// Two Authorization headers or a malformed Bearer value: 400 `invalid_request`.
    BadRequest(&'static str),
    /// 401 `invalid_token`, with a short reason.
    InvalidToken(InvalidToken),
    /// 403 `insufficient_scope`; the route's scopes, space-delimited.
    InsufficientScope(String),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum InvalidToken {
    Malformed,
    BadSignature,
    WrongAlgorithm,
    WrongType,
    WrongIssuer,
    WrongAudience,
    Expired,
    NotYetValid,
    Revoked,
    /// No key of its issuer has the token's kid (or, without a kid, no single key fits).
    UnknownKey,
    /// Its issuer's keys are not loaded (yet, or any more).
    IssuerNotReady,
    /// A valid token of an issuer the route does not accept (`routes[].issuers`).
    IssuerNotAccepted,
}

impl InvalidToken {
    /// The `error_description`: short, and never an echo of the token.
    pub fn describe(self) -> &'static str {
        match self {
            InvalidToken::Malformed => "the access token is malformed",
            InvalidToken::BadSignature => "the access token signature is invalid",
            InvalidToken::WrongAlgorithm => "the access token algorithm is not accepted",
            InvalidToken::WrongType => "the token is not an access token (typ must be at+jwt)",
            InvalidToken::WrongIssuer => "the access token was issued by another issuer",
            InvalidToken::WrongAudience => "the access token is for another audience",
            InvalidToken::Expired => "the access token expired",
            InvalidToken::NotYetValid => "the access token is not valid yet",
            InvalidToken::Revoked => "the access token was revoked",
            InvalidToken::UnknownKey => "the access token signing key is unknown",
            InvalidToken::IssuerNotReady => "the keys of the access token issuer are not loaded yet",
            InvalidToken::IssuerNotAccepted => "this route does not accept tokens of the access token issuer",
        }
    }
}

/// Our own issuer's index; `[[issuers]]` entry `i` is `i + 1`.
pub const SELF: u8 = 0;

/// The issuers a route accepts: bit 0 is ours, bit `i + 1` is `[[issuers]]` entry `i`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct IssuerMask(u64);

impl IssuerMask {
    pub const ALL: IssuerMask = IssuerMask(u64::MAX);

    /// From `routes[].issuers` (`"self"` or an issuer); `None` accepts them all.
    pub fn new(names: Option<&[String]>, issuers: &[IssuerSettings]) -> IssuerMask {
        let Some(names) = names else {
            return IssuerMask::ALL;
        };
        IssuerMask(names.iter().fold(0, |mask, name| {
            if name == crate::config::SELF_ISSUER {
                mask | 1
            } else {
                issuers
                    .iter()
                    .position(|i| &i.issuer == name)
                    .map_or(mask, |i| mask | 1 << (i + 1))
            }
        }))
    }

    pub fn accepts(self, issuer: u8) -> bool {
        self.0 & (1u64 << issuer) != 0
    }
}

/// What a validated access token says, ready for the request path.
#[derive(Debug)]
pub struct VerifiedToken {
    pub sub: Box<str>,
    /// Our session; `None` for another issuer's token, and when the `sid` claim is not one of our
    /// session ids (a token minted elsewhere with our key): no session of ours is revoked under it.
    pub sid: Option<SessionId>,
    /// `client_id` (another issuer's token: or `azp`); empty when the token names none.
    pub client_id: Box<str>,
    pub exp: u64,
    pub nbf: u64,
    /// `iat`, 0 when absent.
    pub iat: u64,
    /// [`SELF`], or the index + 1 of the `[[issuers]]` entry that issued it.
    pub issuer: u8,
    /// Granted scopes this gateway knows of.
    pub scopes: ScopeSet,
    /// `X-Auth-*` headers, built once.
    pub identity: Identity,
    cache_ttl: Duration,
}

impl VerifiedToken {
    /// The scope claim as the token carries it, space-delimited.
    pub fn scope(&self) -> &str {
        self.identity.scope.to_str().unwrap_or("")
    }
}

#[derive(Deserialize)]
struct JoseHeader {
    alg: String,
    kid: Option<String>,
    typ: Option<String>,
    /// RFC 7515 §4.1.11: we understand no extension, so a token that makes one critical is refused.
    crit: Option<IgnoredAny>,
}

/// A string or an array of strings (`aud`, and `scope`/`scp` as IdPs write them).
#[derive(Deserialize)]
#[serde(untagged)]
enum OneOrMany {
    One(String),
    Many(Vec<String>),
}

impl OneOrMany {
    fn contains(&self, s: &str) -> bool {
        match self {
            OneOrMany::One(v) => v == s,
            OneOrMany::Many(vs) => vs.iter().any(|v| v == s),
        }
    }
    fn joined(&self) -> String {
        match self {
            OneOrMany::One(v) => v.clone(),
            OneOrMany::Many(vs) => vs.join(" "),
        }
    }
}

/// RFC 7519 §2 NumericDate: seconds, possibly with a fraction.
#[derive(Deserialize)]
#[serde(untagged)]
enum NumericDate {
    Int(u64),
    Float(f64),
}

impl NumericDate {
    fn secs(&self) -> Option<u64> {
        match *self {
            NumericDate::Int(n) => Some(n),
            NumericDate::Float(f) if f.is_finite() && f >= 0.0 => Some(f as u64),
            NumericDate::Float(_) => None,
        }
    }
}

#[derive(Deserialize)]
struct Claims {
    iss: Option<String>,
    sub: Option<String>,
    aud: Option<OneOrMany>,
    exp: Option<NumericDate>,
    nbf: Option<NumericDate>,
    iat: Option<NumericDate>,
    client_id: Option<String>,
    azp: Option<String>,
    scope: Option<OneOrMany>,
    scp: Option<OneOrMany>,
    sid: Option<String>,
}

/// The token the last request of a connection presented, and what it validated to: see
/// [`Validator::cached_remembered`]. One per client connection.
#[derive(Default)]
pub struct LastToken(Mutex<Option<Remembered>>);

impl LastToken {
    /// Forgets the token (a connection going idle for long keeps no copy of it).
    pub fn forget(&self) {
        if let Ok(mut last) = self.0.try_lock() {
            *last = None;
        }
    }
}

/// Shows nothing of the token.
impl std::fmt::Debug for LastToken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("LastToken")
    }
}

/// A copy remembers nothing (it is a shortcut, not state).
impl Clone for LastToken {
    fn clone(&self) -> Self {
        LastToken::default()
    }
}

struct Remembered {
    validator: u64,
    token: Box<[u8]>,
    verified: Arc<VerifiedToken>,
}

/// Whether two tokens are the same, in time that depends on their length only: one connection may
/// carry several clients' tokens (a proxy in front of the gateway), and an early exit at the first
/// differing byte would let one of them time its guesses against another's remembered token. No
/// branch on the bytes, so the compiler compares many at a time (`subtle`'s byte-at-a-time
/// comparison would cost more than the shared cache this shortcut avoids).
fn same_bytes(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |diff, (x, y)| diff | (x ^ y)) == 0
}

fn remember(last: &mut Option<Remembered>, validator: u64, token: &[u8], verified: &Arc<VerifiedToken>) {
    match last {
        // A token of the same length (the next one of the same client, usually) takes the old
        // one's allocation.
        Some(r) if r.token.len() == token.len() => {
            r.token.copy_from_slice(token);
            r.validator = validator;
            r.verified = verified.clone();
        }
        _ => {
            *last = Some(Remembered {
                validator,
                token: token.into(),
                verified: verified.clone(),
            })
        }
    }
}

struct UntilExp;

impl moka::Expiry<Box<[u8]>, Arc<VerifiedToken>> for UntilExp {
    fn expire_after_create(
        &self,
        _key: &Box<[u8]>,
        value: &Arc<VerifiedToken>,
        _created_at: std::time::Instant,
    ) -> Option<Duration> {
        Some(value.cache_ttl)
    }
}

/// An `[[issuers]]` entry as the validator applies it.
struct External {
    settings: IssuerSettings,
    algs: AlgSet,
    resolver: Arc<Resolver>,
    /// `X-Auth-Issuer`.
    header: HeaderValue,
}

/// Why a token that is not in the cache was not validated.
enum Failure {
    Invalid(InvalidToken),
    /// The key may come with a refetch of `[[issuers]]` entry `issuer`'s JWKS.
    NeedKeys {
        issuer: usize,
        kid: Option<Box<str>>,
        ready: bool,
    },
}

impl From<InvalidToken> for Failure {
    fn from(e: InvalidToken) -> Self {
        Failure::Invalid(e)
    }
}

impl Failure {
    fn final_error(self) -> InvalidToken {
        match self {
            Failure::Invalid(e) => e,
            Failure::NeedKeys { ready: true, .. } => InvalidToken::UnknownKey,
            Failure::NeedKeys { ready: false, .. } => InvalidToken::IssuerNotReady,
        }
    }
}

/// One part of a compact JWS, base64url-decoded and parsed.
fn json_part<T: serde::de::DeserializeOwned>(part: &str) -> Result<T, InvalidToken> {
    let bytes = URL_SAFE_NO_PAD.decode(part).map_err(|_| InvalidToken::Malformed)?;
    serde_json::from_slice(&bytes).map_err(|_| InvalidToken::Malformed)
}

fn header_value(s: &str) -> Result<HeaderValue, InvalidToken> {
    HeaderValue::from_str(s).map_err(|_| InvalidToken::Malformed)
}

pub struct Validator {
    /// Unique per validator (so per Snapshot): what a connection's [`LastToken`] is tied to.
    id: u64,
    issuer: Box<str>,
    audience: Box<str>,
    keys: Arc<KeySet>,
    external: Vec<External>,
    leeway: u64,
    scopes: ScopeUniverse,
    revoked: Arc<RevokedSessions>,
    clock: SharedClock,
    cache: Cache<Box<[u8]>, Arc<VerifiedToken>, RandomState>,
}

impl Validator {
    /// `external` pairs each `[[issuers]]` entry with its resolver, in config order.
    pub fn new(
        tokens: &TokenSettings,
        keys: Arc<KeySet>,
        external: Vec<(IssuerSettings, Arc<Resolver>)>,
        scopes: ScopeUniverse,
        revoked: Arc<RevokedSessions>,
        clock: SharedClock,
    ) -> Self {
        let cache = Cache::builder()
            .max_capacity(tokens.cache_capacity)
            .expire_after(UntilExp)
            .build_with_hasher(RandomState::default());
        let external = external
            .into_iter()
            .map(|(settings, resolver)| External {
                algs: AlgSet::of(&settings.algorithms),
                header: HeaderValue::from_str(&settings.issuer).unwrap_or(HeaderValue::from_static("external")),
                settings,
                resolver,
            })
            .collect();
        static IDS: AtomicU64 = AtomicU64::new(0);
        Validator {
            id: IDS.fetch_add(1, Ordering::Relaxed),
            issuer: tokens.issuer.as_str().into(),
            audience: tokens.audience.as_str().into(),
            keys,
            external,
            leeway: tokens.leeway.as_secs(),
            scopes,
            revoked,
            clock,
            cache,
        }
    }

    /// Validates a bearer token, from the cache when it can; never fetches keys.
    pub fn validate(&self, token: &str) -> Result<Arc<VerifiedToken>, InvalidToken> {
        self.validate_counted(token).0
    }

    /// [`Validator::validate`], also saying whether the cache answered.
    pub fn validate_counted(&self, token: &str) -> (Result<Arc<VerifiedToken>, InvalidToken>, bool) {
        match self.cached(token.as_bytes()) {
            Some(result) => (result, true),
            None => (self.validate_uncached(token).map_err(Failure::final_error), false),
        }
    }

    /// [`Validator::validate`], and when the token's issuer has no key for it yet, one refetch of
    /// that issuer's JWKS (shared with every other token waiting for it, and rate-limited) before
    /// the answer. A cache hit or one of our tokens never waits.
    pub async fn validate_fetching(&self, token: &str) -> Result<Arc<VerifiedToken>, InvalidToken> {
        match self.cached(token.as_bytes()) {
            Some(result) => result,
            None => self.fetching_uncached(token).await,
        }
    }

    /// [`Validator::validate_fetching`] after a cache miss (the caller asked the cache already).
    pub async fn fetching_uncached(&self, token: &str) -> Result<Arc<VerifiedToken>, InvalidToken> {
        let (issuer, kid, ready) = match self.validate_uncached(token) {
            Err(Failure::NeedKeys { issuer, kid, ready }) => (issuer, kid, ready),
            other => return other.map_err(Failure::final_error),
        };
        let resolver = &self.external[issuer].resolver;
        let Some(fetched) = resolver.refetch(kid.as_deref()) else {
            return Err(Failure::NeedKeys { issuer, kid, ready }.final_error());
        };
        fetched.await;
        match self.validate_uncached(token) {
            Err(Failure::NeedKeys { kid, ready, .. }) => {
                resolver.remember_unknown(kid.as_deref());
                Err(Failure::NeedKeys { issuer, kid, ready }.final_error())
            }
            other => other.map_err(Failure::final_error),
        }
    }

    /// One of our own tokens (introspection): valid now, not revoked. Another issuer's token is
    /// `WrongIssuer`.
    pub fn validate_own(&self, token: &str) -> Result<Arc<VerifiedToken>, InvalidToken> {
        if let Some(result) = self.cached(token.as_bytes()) {
            return result.and_then(|t| {
                if t.issuer == SELF {
                    Ok(t)
                } else {
                    Err(InvalidToken::WrongIssuer)
                }
            });
        }
        if !crate::auth::bearer::is_b64token(token.as_bytes()) {
            return Err(InvalidToken::Malformed);
        }
        let now = self.clock.now_secs();
        let v = self.decode_own(token, now)?;
        self.still_valid(&v, now)?;
        Ok(Arc::new(v))
    }

    /// [`Validator::cached`], asking first the token the connection presented last: a client
    /// sends the same token on request after request, and this answers it without the shared
    /// cache's hashing and bookkeeping. The answer is the cache's (checked against the clock and
    /// the revoked-session set on every use, like a hit); a connection's token is remembered
    /// only by the validator that accepted it, so a reload starts afresh. Never waits: when two
    /// requests of one HTTP/2 connection meet here, the second asks the cache.
    pub fn cached_remembered(
        &self,
        last: &LastToken,
        token: &[u8],
    ) -> Option<Result<Arc<VerifiedToken>, InvalidToken>> {
        let Ok(mut last) = last.0.try_lock() else {
            return self.cached(token);
        };
        if let Some(r) = last.as_ref()
            && r.validator == self.id
            && same_bytes(&r.token, token)
        {
            let verified = r.verified.clone();
            return Some(self.still_valid(&verified, self.clock.now_secs()).map(|()| verified));
        }
        let result = self.cached(token)?;
        if let Ok(verified) = &result {
            remember(&mut last, self.id, token, verified);
        }
        Some(result)
    }

    /// Remembers a token this validator has just accepted as the connection's last.
    pub fn remember(&self, last: &LastToken, token: &[u8], verified: &Arc<VerifiedToken>) {
        if let Ok(mut last) = last.0.try_lock() {
            remember(&mut last, self.id, token, verified);
        }
    }

    /// A cache hit, still checked against the clock and the revoked-session set; `None` on a miss.
    /// Asked with the raw bytes of the credentials ([`crate::auth::bearer::bearer_bytes`]): the
    /// cache holds only tokens that passed the b64token check, so a hit needs no other.
    fn cached(&self, token: &[u8]) -> Option<Result<Arc<VerifiedToken>, InvalidToken>> {
        let hit = self.cache.get(token)?;
        Some(self.still_valid(&hit, self.clock.now_secs()).map(|()| hit))
    }

    /// Verifies a token the cache does not hold, and caches it if it is valid. The b64token
    /// alphabet (RFC 6750 §2.1) is checked here, not on every request: a cache hit is
    /// byte-identical to a token that passed.
    fn validate_uncached(&self, token: &str) -> Result<Arc<VerifiedToken>, Failure> {
        if !crate::auth::bearer::is_b64token(token.as_bytes()) {
            return Err(InvalidToken::Malformed.into());
        }
        let now = self.clock.now_secs();
        let verified = self.decode(token, now)?;
        self.still_valid(&verified, now)?;
        let verified = Arc::new(verified);
        self.cache.insert(token.as_bytes().into(), verified.clone());
        Ok(verified)
    }

    /// Checks signature and claims of one of our tokens, ignoring exp and the revoked set; used by
    /// RFC 7009 revocation, which must accept an expired access token.
    pub fn verify_signature_only(&self, token: &str) -> Result<VerifiedToken, InvalidToken> {
        self.decode_own(token, self.clock.now_secs())
    }

    fn decode_own(&self, token: &str, now: u64) -> Result<VerifiedToken, InvalidToken> {
        match self.decode(token, now) {
            Ok(v) if v.issuer == SELF => Ok(v),
            Ok(_) | Err(Failure::NeedKeys { .. }) => Err(InvalidToken::WrongIssuer),
            Err(Failure::Invalid(e)) => Err(e),
        }
    }

    fn still_valid(&self, v: &VerifiedToken, now: u64) -> Result<(), InvalidToken> {
        if now > v.exp.saturating_add(self.leeway) {
            return Err(InvalidToken::Expired);
        }
        if now.saturating_add(self.leeway) < v.nbf {
            return Err(InvalidToken::NotYetValid);
        }
        if v.sid.is_some_and(|sid| self.revoked.is_revoked(sid, now)) {
            return Err(InvalidToken::Revoked);
        }
        Ok(())
    }

    /// Signature and claims, for whichever issuer the token names.
    fn decode(&self, token: &str, now: u64) -> Result<VerifiedToken, Failure> {
        let mut parts = token.split('.');
        let (Some(h), Some(p), Some(signature), None) = (parts.next(), parts.next(), parts.next(), parts.next()) else {
            return Err(InvalidToken::Malformed.into());
        };
        let header: JoseHeader = json_part(h)?;
        let claims: Claims = json_part(p)?;
        let iss = claims.iss.as_deref().ok_or(InvalidToken::Malformed)?;
        if header.crit.is_some() {
            return Err(InvalidToken::Malformed.into());
        }
        let alg = SigningAlg::parse(&header.alg).ok_or(InvalidToken::WrongAlgorithm)?;
        let message = &token.as_bytes()[..h.len() + 1 + p.len()];
        if iss == &*self.issuer {
            self.verify_own(&header, alg, message, signature)?;
            return self.own_claims(claims, now).map_err(Failure::Invalid);
        }
        let Some(index) = self.external.iter().position(|e| e.settings.issuer == iss) else {
            return Err(InvalidToken::WrongIssuer.into());
        };
        let ext = &self.external[index];
        let typ = header.typ.as_deref().map_or_else(|| "jwt".to_owned(), normalize_typ);
        if !ext.settings.token_types.contains(&typ) {
            return Err(InvalidToken::WrongType.into());
        }
        if !ext.algs.contains(alg) {
            return Err(InvalidToken::WrongAlgorithm.into());
        }
        let key = match ext.resolver.lookup(header.kid.as_deref(), alg) {
            Lookup::Found(key) => key,
            Lookup::NotReady | Lookup::Unknown => {
                return Err(Failure::NeedKeys {
                    issuer: index,
                    kid: header.kid.map(Into::into),
                    ready: ext.resolver.is_ready(),
                });
            }
        };
        if !key.algs.contains(alg) {
            return Err(InvalidToken::WrongAlgorithm.into());
        }
        if !verify_signature(&key.decoding, alg, message, signature) {
            return Err(InvalidToken::BadSignature.into());
        }
        self.external_claims(ext, index, claims, now).map_err(Failure::Invalid)
    }

    /// Our tokens: `typ` at+jwt (RFC 9068 §4: an ID token is not an access token), the key named
    /// by `kid` with its own algorithm.
    fn verify_own(
        &self,
        header: &JoseHeader,
        alg: SigningAlg,
        message: &[u8],
        signature: &str,
    ) -> Result<(), InvalidToken> {
        if header.typ.as_deref().map(normalize_typ).as_deref() != Some("at+jwt") {
            return Err(InvalidToken::WrongType);
        }
        match header.kid.as_deref() {
            Some(kid) => {
                let key = self.keys.get(kid).ok_or(InvalidToken::UnknownKey)?;
                if key.alg != alg {
                    return Err(InvalidToken::WrongAlgorithm);
                }
                if !key.verifies(message, signature) {
                    return Err(InvalidToken::BadSignature);
                }
            }
            // Tokens minted before keys had ids, or by a tool sharing an HMAC secret: the keys of
            // the header's algorithm, each with its own.
            None => {
                let mut candidates = self.keys.without_kid(alg).peekable();
                if candidates.peek().is_none() {
                    return Err(InvalidToken::WrongAlgorithm);
                }
                if !candidates.any(|k| k.verifies(message, signature)) {
                    return Err(InvalidToken::BadSignature);
                }
            }
        }
        Ok(())
    }

    fn own_claims(&self, c: Claims, now: u64) -> Result<VerifiedToken, InvalidToken> {
        if !c.aud.as_ref().is_some_and(|a| a.contains(&self.audience)) {
            return Err(InvalidToken::WrongAudience);
        }
        let (Some(sub), Some(client_id), Some(sid)) = (c.sub, c.client_id, c.sid) else {
            return Err(InvalidToken::Malformed);
        };
        let scope = c.scope.map(|s| s.joined()).unwrap_or_default();
        let identity = Identity {
            subject: header_value(&sub)?,
            client_id: Some(header_value(&client_id)?),
            scope: header_value(&scope)?,
            session: Some(header_value(&sid)?),
            issuer: None,
        };
        self.verified(
            sub,
            SessionId::parse(&sid),
            client_id,
            &c.exp,
            &c.nbf,
            &c.iat,
            SELF,
            &scope,
            identity,
            now,
        )
    }

    fn external_claims(
        &self,
        ext: &External,
        index: usize,
        c: Claims,
        now: u64,
    ) -> Result<VerifiedToken, InvalidToken> {
        if !c
            .aud
            .as_ref()
            .is_some_and(|a| ext.settings.audiences.iter().any(|want| a.contains(want)))
        {
            return Err(InvalidToken::WrongAudience);
        }
        let sub = c.sub.ok_or(InvalidToken::Malformed)?;
        let client_id = c.client_id.or(c.azp);
        let scope = match ext.settings.scope_claim {
            ScopeClaim::Scope => c.scope,
            ScopeClaim::Scp => c.scp,
        }
        .map(|s| s.joined())
        .unwrap_or_default();
        let identity = Identity {
            subject: header_value(&sub)?,
            client_id: client_id.as_deref().map(header_value).transpose()?,
            scope: header_value(&scope)?,
            session: None,
            issuer: Some(ext.header.clone()),
        };
        let issuer = u8::try_from(index + 1).map_err(|_| InvalidToken::WrongIssuer)?;
        let client_id = client_id.unwrap_or_default();
        self.verified(
            sub, None, client_id, &c.exp, &c.nbf, &c.iat, issuer, &scope, identity, now,
        )
    }

    #[allow(clippy::too_many_arguments)]
    fn verified(
        &self,
        sub: String,
        sid: Option<SessionId>,
        client_id: String,
        exp: &Option<NumericDate>,
        nbf: &Option<NumericDate>,
        iat: &Option<NumericDate>,
        issuer: u8,
        scope: &str,
        identity: Identity,
        now: u64,
    ) -> Result<VerifiedToken, InvalidToken> {
        let exp = exp
            .as_ref()
            .and_then(NumericDate::secs)
            .ok_or(InvalidToken::Malformed)?;
        let date = |d: &Option<NumericDate>| match d {
            None => Ok(0),
            Some(d) => d.secs().ok_or(InvalidToken::Malformed),
        };
        let cache_ttl = Duration::from_secs(exp.saturating_add(self.leeway).saturating_sub(now).max(1));
        Ok(VerifiedToken {
            scopes: self.scopes.parse_lenient(scope),
            sub: sub.into(),
            sid,
            client_id: client_id.into(),
            exp,
            nbf: date(nbf)?,
            iat: date(iat)?,
            issuer,
            identity,
            cache_ttl,
        })
    }

    /// Starts the background JWKS fetches that are due (the maintenance loop, every second).
    pub fn poll_issuers(&self) {
        for e in &self.external {
            e.resolver.poll();
        }
    }

    /// The resolver of each `[[issuers]]` entry, in config order.
    pub fn resolvers(&self) -> impl Iterator<Item = &Arc<Resolver>> {
        self.external.iter().map(|e| &e.resolver)
    }

    /// A resolver a new Snapshot may keep: same issuer, fetching the same keys the same way.
    pub fn resolver_for(&self, settings: &IssuerSettings) -> Option<Arc<Resolver>> {
        self.external
            .iter()
            .find(|e| e.resolver.settings().same_keys(settings))
            .map(|e| e.resolver.clone())
    }

    /// Readiness and fetch counters of every `[[issuers]]` entry (for metrics).
    pub fn issuer_status(&self) -> Vec<crate::keys::IssuerStatus> {
        self.external.iter().map(|e| e.resolver.status()).collect()
    }

    /// moka does its housekeeping only during calls; the sweeper calls this.
    pub fn run_pending_tasks(&self) {
        self.cache.run_pending_tasks();
    }
}

#[cfg(test)]
mod tests {
    use super::same_bytes;

    #[test]
    fn same_bytes_is_equality() {
        let t = b"eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiJhbm4ifQ.c2lnbmF0dXJl";
        assert!(same_bytes(t, t));
        assert!(same_bytes(b"", b""));
        for i in 0..t.len() {
            let mut other = t.to_vec();
            other[i] ^= 1;
            assert!(!same_bytes(t, &other), "differs at {i}");
        }
        assert!(!same_bytes(t, &t[..t.len() - 1]), "a prefix is not the token");
        assert!(!same_bytes(&t[..1], t));
    }
}
