//! Access-token validation: signature with the configured algorithm (never the token's), `typ`,
//! iss, aud, exp and nbf against the [`Clock`] with `tokens.leeway`, then the revoked-session set.
//!
//! Validated tokens are cached (moka, successes only, bounded). An entry's lifetime ends at its
//! token's `exp`, and a hit is still checked against the clock and the revoked-session set, so the
//! cache can neither outlive a token nor defeat a revocation (Oathkeeper #1082). The cached value
//! holds the token's granted scopes, and every request checks its route's scopes against them, so a
//! cache hit never skips the scope check (Oathkeeper #743).

use std::sync::Arc;
use std::time::Duration;

use foldhash::fast::RandomState;
use http::HeaderValue;
use jsonwebtoken::errors::ErrorKind;
use jsonwebtoken::{DecodingKey, Validation};
use moka::sync::Cache;
use serde::Deserialize;

use crate::auth::RevokedSessions;
use crate::clock::SharedClock;
use crate::config::TokenSettings;
use crate::ids::SessionId;
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
        }
    }
}

/// What a validated access token says, ready for the request path.
#[derive(Debug)]
pub struct VerifiedToken {
    pub sub: Box<str>,
    /// `None` when the `sid` claim is not one of our session ids (a token minted elsewhere with our
    /// key): no session of ours can be revoked under it.
    pub sid: Option<SessionId>,
    pub client_id: Box<str>,
    pub exp: u64,
    pub nbf: u64,
    /// Granted scopes this gateway knows of.
    pub scopes: ScopeSet,
    /// `X-Auth-Subject`, `X-Auth-Client-Id`, `X-Auth-Scope`, `X-Auth-Session`, built once.
    pub identity: [HeaderValue; 4],
    cache_ttl: Duration,
}

#[derive(Deserialize)]
struct Claims {
    sub: String,
    exp: u64,
    #[serde(default)]
    nbf: Option<u64>,
    client_id: String,
    #[serde(default)]
    scope: String,
    sid: String,
}

struct UntilExp;

impl moka::Expiry<Box<str>, Arc<VerifiedToken>> for UntilExp {
    fn expire_after_create(
        &self,
        _key: &Box<str>,
        value: &Arc<VerifiedToken>,
        _created_at: std::time::Instant,
    ) -> Option<Duration> {
        Some(value.cache_ttl)
    }
}

pub struct Validator {
    key: DecodingKey,
    validation: Validation,
    leeway: u64,
    scopes: ScopeUniverse,
    revoked: Arc<RevokedSessions>,
    clock: SharedClock,
    cache: Cache<Box<str>, Arc<VerifiedToken>, RandomState>,
}

impl Validator {
    pub fn new(
        tokens: &TokenSettings,
        scopes: ScopeUniverse,
        revoked: Arc<RevokedSessions>,
        clock: SharedClock,
    ) -> Self {
        let mut validation = Validation::new(tokens.alg.jwt());
        // exp and nbf are checked here against the Clock, not the wall clock inside jsonwebtoken.
        validation.validate_exp = false;
        validation.validate_nbf = false;
        validation.leeway = 0;
        validation.set_issuer(&[&tokens.issuer]);
        validation.set_audience(&[&tokens.audience]);
        validation.set_required_spec_claims(&["exp", "iss", "aud", "sub"]);
        let cache = Cache::builder()
            .max_capacity(tokens.cache_capacity)
            .expire_after(UntilExp)
            .build_with_hasher(RandomState::default());
        Validator {
            key: DecodingKey::from_secret(tokens.secret.expose()),
            validation,
            leeway: tokens.leeway.as_secs(),
            scopes,
            revoked,
            clock,
            cache,
        }
    }

    /// Validates a bearer token, from the cache when it can.
    pub fn validate(&self, token: &str) -> Result<Arc<VerifiedToken>, InvalidToken> {
        self.validate_counted(token).0
    }

    /// [`Validator::validate`], also saying whether the cache answered.
    pub fn validate_counted(&self, token: &str) -> (Result<Arc<VerifiedToken>, InvalidToken>, bool) {
        match self.cached(token) {
            Some(result) => (result, true),
            None => (self.validate_uncached(token), false),
        }
    }

    /// A cache hit, still checked against the clock and the revoked-session set; `None` on a miss.
    fn cached(&self, token: &str) -> Option<Result<Arc<VerifiedToken>, InvalidToken>> {
        let hit = self.cache.get(token)?;
        Some(self.still_valid(&hit, self.clock.now_secs()).map(|()| hit))
    }

    /// Verifies a token the cache does not hold, and caches it if it is valid. The b64token
    /// alphabet (RFC 6750 §2.1) is checked here, not on every request: a cache hit is
    /// byte-identical to a token that passed.
    fn validate_uncached(&self, token: &str) -> Result<Arc<VerifiedToken>, InvalidToken> {
        if !crate::auth::bearer::is_b64token(token.as_bytes()) {
            return Err(InvalidToken::Malformed);
        }
        let now = self.clock.now_secs();
        let verified = Arc::new(self.verify(token, now)?);
        self.cache.insert(token.into(), verified.clone());
        Ok(verified)
    }

    /// Checks signature and claims, ignoring exp and the revoked set; used by RFC 7009 revocation,
    /// which must accept an expired access token.
    pub fn verify_signature_only(&self, token: &str) -> Result<VerifiedToken, InvalidToken> {
        self.decode(token, self.clock.now_secs())
    }

    fn verify(&self, token: &str, now: u64) -> Result<VerifiedToken, InvalidToken> {
        let v = self.decode(token, now)?;
        self.still_valid(&v, now)?;
        Ok(v)
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

    fn decode(&self, token: &str, now: u64) -> Result<VerifiedToken, InvalidToken> {
        let data = jsonwebtoken::decode::<Claims>(token, &self.key, &self.validation).map_err(|e| match e.kind() {
            ErrorKind::InvalidSignature => InvalidToken::BadSignature,
            ErrorKind::InvalidAlgorithm | ErrorKind::MissingAlgorithm => InvalidToken::WrongAlgorithm,
            ErrorKind::InvalidIssuer => InvalidToken::WrongIssuer,
            ErrorKind::InvalidAudience => InvalidToken::WrongAudience,
            _ => InvalidToken::Malformed,
        })?;
        // RFC 9068 §4: reject tokens whose typ is not at+jwt (an ID token is not an access token).
        match data.header.typ.as_deref() {
            Some(t) if t.eq_ignore_ascii_case("at+jwt") || t.eq_ignore_ascii_case("application/at+jwt") => {}
            _ => return Err(InvalidToken::WrongType),
        }
        let c = data.claims;
        let sid = SessionId::parse(&c.sid);
        let header = |s: &str| HeaderValue::from_str(s).map_err(|_| InvalidToken::Malformed);
        let identity = [
            header(&c.sub)?,
            header(&c.client_id)?,
            header(&c.scope)?,
            header(&c.sid)?,
        ];
        let cache_ttl = Duration::from_secs(c.exp.saturating_add(self.leeway).saturating_sub(now).max(1));
        Ok(VerifiedToken {
            scopes: self.scopes.parse_lenient(&c.scope),
            sub: c.sub.into(),
            sid,
            client_id: c.client_id.into(),
            exp: c.exp,
            nbf: c.nbf.unwrap_or(0),
            identity,
            cache_ttl,
        })
    }

    /// moka does its housekeeping only during calls; the sweeper calls this.
    pub fn run_pending_tasks(&self) {
        self.cache.run_pending_tasks();
    }
}
