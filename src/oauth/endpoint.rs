//! `POST /api/oauth2/token` and `POST /api/oauth2/revoke`: form parsing (RFC 6749 §3.2), client
//! authentication, grant dispatch, RFC 6749 §5.1 responses. Errors are returned as [`OAuthError`]
//! values; `service.rs` turns them into responses.
//!
//! Each request works against one [`Snapshot`] (clients, users, scopes, keys, token settings) and
//! the [`State`] (sessions in the store, the login limiter). Sessions name their user, client and
//! scopes; a refresh re-reads them from the current Snapshot, so a user or client removed from the
//! config can no longer refresh, and a scope taken away is not granted again.

use std::net::IpAddr;

use bytes::Bytes;
use http::header::{AUTHORIZATION, CONTENT_LENGTH, CONTENT_TYPE};
use http::{HeaderMap, Method};
use http_body::Body;
use http_body_util::BodyExt;

use crate::config::{ClientSettings, GrantType, UserSettings};
use crate::crypto::{self, Sealed};
use crate::ids::{IssueRandom, SessionId, mint_refresh_token, parse_refresh_token, refresh_token_from};
use crate::oauth::clients::{Presented, parse_basic};
use crate::oauth::error::{ErrorCode, INVALID_REFRESH_TOKEN, OAuthError};
use crate::oauth::limiter::{Refused, Who};
use crate::oauth::push_json_str;
use crate::oauth::users::VerifyError;
use crate::proxy::body::ClientBodyError;
use crate::scope::ScopeSet;
use crate::snapshot::Snapshot;
use crate::state::State;
use crate::store::{
    Committed, NewSession, RevokeReason, RevokedFamily, Rotation, SessionStore, SessionView, StoreError, TokenState,
};

/// Form bodies beyond this are refused with 413 and not read further.
pub const MAX_FORM_BYTES: usize = 16 * 1024;

/// Tries at minting a session id that is not taken (a 64-bit collision is not expected at all).
const SESSION_ID_ATTEMPTS: usize = 4;

/// The token and revocation endpoints, over one Snapshot and the State (one per request).
pub struct OAuthServer<'a> {
    pub snap: &'a Snapshot,
    pub state: &'a State,
    /// Set when this request's refresh token turned out to be reused (for the grant metric).
    reuse_detected: std::sync::atomic::AtomicBool,
}

/// A parsed form: each parameter at most once (RFC 6749 §3.2), empty values treated as absent
/// (§3.1). Values (passwords, client secrets, refresh tokens) are zeroed when it is dropped.
pub(super) struct Form(Vec<(&'static str, zeroize::Zeroizing<String>)>);

impl Form {
    pub(super) fn get(&self, name: &str) -> Option<&str> {
        self.0
            .iter()
            .find(|(k, _)| *k == name)
            .map(|(_, v)| v.as_str())
            .filter(|v| !v.is_empty())
    }
    pub(super) fn require(&self, name: &str) -> Result<&str, OAuthError> {
        self.get(name)
            .ok_or_else(|| OAuthError::invalid_request(format!("missing parameter {name}")))
    }
}

/// The §5.1 body, with its final newline (part of the body, so a replay within the grace, sealed
/// from these bytes, is byte-identical too). Written by hand: the access token is most of it, and
/// a JSON serializer looks at each of its ~500 bytes for characters to escape, of which a JWT has
/// none.
fn render_token_response(expires_in: u64, access_token: &str, refresh: Option<(&str, u64)>, scope: &str) -> Vec<u8> {
    use std::io::Write;
    let mut out = Vec::with_capacity(access_token.len() + refresh.map_or(0, |r| r.0.len()) + scope.len() + 128);
    out.extend_from_slice(b"{\"access_token\":");
    push_json_str(&mut out, access_token);
    // Writing into a Vec cannot fail.
    let _ = write!(out, ",\"token_type\":\"Bearer\",\"expires_in\":{expires_in}");
    if let Some((token, expires_in)) = refresh {
        out.extend_from_slice(b",\"refresh_token\":");
        push_json_str(&mut out, token);
        let _ = write!(out, ",\"refresh_expires_in\":{expires_in}");
    }
    out.extend_from_slice(b",\"scope\":");
    push_json_str(&mut out, scope);
    out.extend_from_slice(b"}\n");
    out
}

fn invalid_refresh_token() -> OAuthError {
    OAuthError::new(ErrorCode::InvalidGrant, INVALID_REFRESH_TOKEN)
}

/// The system's random generator failed (for `map_err`).
fn no_randomness<E>(_: E) -> OAuthError {
    OAuthError::Internal("no randomness".into())
}

impl From<StoreError> for OAuthError {
    fn from(e: StoreError) -> Self {
        match e {
            StoreError::Unavailable(detail) => OAuthError::Unavailable(detail),
            StoreError::Collision => OAuthError::Internal("session id collision".into()),
            StoreError::Failed(detail) => OAuthError::Internal(detail),
        }
    }
}

fn ms(d: std::time::Duration) -> u64 {
    d.as_millis() as u64
}

impl<'a> OAuthServer<'a> {
    pub fn new(snap: &'a Snapshot, state: &'a State) -> Self {
        OAuthServer {
            snap,
            state,
            reuse_detected: Default::default(),
        }
    }

    /// The token endpoint. `Ok` is the §5.1 JSON body. Counted by grant type and outcome.
    pub async fn token<B>(
        &self,
        method: &Method,
        headers: &HeaderMap,
        body: B,
        peer: IpAddr,
    ) -> Result<Bytes, OAuthError>
    where
        B: Body<Data = Bytes>,
        B::Error: std::error::Error + Send + Sync + 'static,
    {
        let mut grant = "unknown";
        let result = self.token_grant(method, headers, body, peer, &mut grant).await;
        let outcome = match &result {
            Ok(_) => "success",
            Err(_) if self.reuse_detected.load(std::sync::atomic::Ordering::Relaxed) => "reuse_detected",
            Err(OAuthError::Protocol { code, .. }) => code.as_str(),
            Err(OAuthError::SlowDown { .. }) => "rate_limited",
            Err(OAuthError::Unavailable(_)) => "temporarily_unavailable",
            Err(OAuthError::Internal(_)) => "server_error",
            Err(OAuthError::BodyTooLarge | OAuthError::BodyTimeout | OAuthError::MethodNotAllowed) => "invalid_request",
        };
        self.state.metrics.grant(grant, outcome);
        result
    }

    async fn token_grant<B>(
        &self,
        method: &Method,
        headers: &HeaderMap,
        body: B,
        peer: IpAddr,
        grant_label: &mut &'static str,
    ) -> Result<Bytes, OAuthError>
    where
        B: Body<Data = Bytes>,
        B::Error: std::error::Error + Send + Sync + 'static,
    {
        let form = read_form(method, headers, body, self.snap.config.server.body_timeout).await?;
        let client = self.authenticate(headers, &form)?;
        let grant = form.require("grant_type")?;
        let Some(grant) = GrantType::parse(grant) else {
            return Err(OAuthError::new(
                ErrorCode::UnsupportedGrantType,
                "grant_type is not supported",
            ));
        };
        *grant_label = grant.as_str();
        if !client.may_use(grant) {
            return Err(OAuthError::new(
                ErrorCode::UnauthorizedClient,
                "this client may not use this grant type",
            ));
        }
        match grant {
            GrantType::Password => self.password_grant(client, &form, peer).await,
            GrantType::RefreshToken => self.refresh_grant(client, &form).await,
            GrantType::ClientCredentials => self.client_credentials_grant(client, &form),
        }
    }

    /// RFC 7009 revocation. `Ok` means 200 (also for tokens the server does not know).
    pub async fn revoke<B>(&self, method: &Method, headers: &HeaderMap, body: B) -> Result<(), OAuthError>
    where
        B: Body<Data = Bytes>,
        B::Error: std::error::Error + Send + Sync + 'static,
    {
        let form = read_form(method, headers, body, self.snap.config.server.body_timeout).await?;
        let client = self.authenticate(headers, &form)?;
        let token = form.require("token")?;
        // token_type_hint only orders the look-ups (§2.1); both kinds are tried.
        let access_first = form.get("token_type_hint") == Some("access_token");
        if !access_first && self.revoke_refresh_token(token, client).await? {
            return Ok(());
        }
        if let Ok(at) = self.snap.validator.verify_signature_only(token) {
            if *at.client_id != *client.id {
                return Err(not_yours());
            }
            if let Some(sid) = at.sid {
                let now = self.state.clock.now_millis();
                match self.state.store.revoke_session(sid, RevokeReason::Client, now).await? {
                    Some(f) => self.audit_revoked(&f, RevokeReason::Client),
                    // Sessions without a family (client_credentials tokens) are refused by sid.
                    None => self.state.store.revoke_sid(sid, at.exp).await?,
                }
            }
            return Ok(());
        }
        if access_first {
            self.revoke_refresh_token(token, client).await?;
        }
        Ok(())
    }

    /// Revokes the session of a refresh token issued to `client`; `Ok(false)` if it is not a
    /// refresh token this server knows (RFC 7009: still a 200).
    async fn revoke_refresh_token(&self, token: &str, client: &ClientSettings) -> Result<bool, OAuthError> {
        let Some((sid, digest)) = parse_refresh_token(token) else {
            return Ok(false);
        };
        let Some((session, state)) = self.state.store.inspect(sid, &digest).await? else {
            return Ok(false);
        };
        // A token the session never issued (someone who knows a sid and guesses) changes nothing.
        if state == TokenState::Unknown {
            return Ok(false);
        }
        if *session.client != *client.id {
            return Err(not_yours());
        }
        let now = self.state.clock.now_millis();
        if let Some(f) = self.state.store.revoke_session(sid, RevokeReason::Client, now).await? {
            self.audit_revoked(&f, RevokeReason::Client);
        }
        Ok(true)
    }

    pub(super) fn authenticate(&self, headers: &HeaderMap, form: &Form) -> Result<&ClientSettings, OAuthError> {
        let mut auth = headers.get_all(AUTHORIZATION).iter();
        let first = auth.next();
        if auth.next().is_some() {
            return Err(OAuthError::invalid_request("more than one Authorization header"));
        }
        let presented = Presented {
            basic: parse_basic(first.map(|v| v.as_bytes()))?,
            form_id: form.get("client_id"),
            form_secret: form.get("client_secret"),
        };
        self.snap.clients.authenticate(&presented)
    }

    fn requested_scope(&self, form: &Form) -> Result<Option<ScopeSet>, OAuthError> {
        match form.get("scope") {
            None => Ok(None),
            Some(s) => self
                .snap
                .config
                .scopes
                .parse_strict(s)
                .map(Some)
                .map_err(|_| OAuthError::new(ErrorCode::InvalidScope, "the requested scope is unknown")),
        }
    }

    async fn password_grant(&self, client: &ClientSettings, form: &Form, peer: IpAddr) -> Result<Bytes, OAuthError> {
        let username = form.require("username")?;
        let password = form.require("password")?;
        let requested = self.requested_scope(form)?;
        let clock = &self.state.clock;
        let who = Who {
            username,
            known_user: self.snap.users.exists(username),
            client: &client.id,
            ip: peer,
        };
        // Dropped before it is told how the check went (the client went away), the attempt counts
        // as a failure and is audited as abandoned.
        let attempt = self
            .state
            .limiter
            .admit(who, clock.now_millis())
            .await
            .map_err(|refused| match refused {
                Refused::Wait(retry_after_secs) => OAuthError::SlowDown { retry_after_secs },
                Refused::Unavailable(detail) => OAuthError::Unavailable(detail),
            })?;
        let verified = match self.snap.users.verify(username, password).await {
            Ok(v) => v,
            Err(e) => {
                attempt.unchecked().await;
                return Err(match e {
                    VerifyError::Busy => OAuthError::SlowDown { retry_after_secs: 1 },
                    VerifyError::TaskFailed => OAuthError::Internal("password verification failed to run".into()),
                });
            }
        };
        let Some(user) = verified else {
            attempt.failed(clock.now_millis()).await;
            let username = who.loggable_username();
            tracing::info!(target: "tokengate::audit", event = "login_failed", username, client = %client.id, %peer);
            return Err(OAuthError::new(
                ErrorCode::InvalidGrant,
                "the username or password is incorrect",
            ));
        };
        attempt.succeeded().await;
        let allowed = user.scopes.intersect(client.scopes);
        let granted = requested.map_or(allowed, |r| r.intersect(allowed));
        if granted.is_empty() {
            return Err(OAuthError::new(
                ErrorCode::InvalidScope,
                "no requested scope may be granted",
            ));
        }
        // Time is read again: Argon2 took a while.
        let now = clock.now_millis();
        let (sid, refresh_token, refresh_expires_in) = self.start_session(user, client, granted, now).await?;
        tracing::info!(target: "tokengate::audit", event = "login", username, client = %client.id, sid = %sid);
        self.token_response(
            user,
            client,
            granted,
            sid,
            now,
            Some((&refresh_token, refresh_expires_in)),
            &crypto::random_bytes::<16>().map_err(no_randomness)?,
        )
        .map(Bytes::from)
    }

    /// Creates the session of a login; returns its id, its first refresh token and that token's
    /// lifetime in seconds.
    async fn start_session(
        &self,
        user: &UserSettings,
        client: &ClientSettings,
        granted: ScopeSet,
        now: u64,
    ) -> Result<(SessionId, String, u64), OAuthError> {
        let t = &self.snap.config.tokens;
        let session_expires_ms = now + ms(t.session_max_lifetime);
        let token_exp_ms = (now + ms(t.refresh_ttl)).min(session_expires_ms);
        let scopes: std::sync::Arc<str> = self.snap.config.scopes.render(granted).into();
        for _ in 0..SESSION_ID_ATTEMPTS {
            let sid = SessionId::random().map_err(no_randomness)?;
            let minted = mint_refresh_token(sid).map_err(no_randomness)?;
            let created = self
                .state
                .store
                .create(NewSession {
                    sid,
                    user: user.username.as_str().into(),
                    client: client.id.as_str().into(),
                    scopes: scopes.clone(),
                    now_ms: now,
                    session_expires_ms,
                    access_exp_secs: now / 1000 + t.access_ttl.as_secs(),
                    token: minted.digest,
                    token_exp_ms,
                    max_sessions_per_user: t.max_sessions_per_user,
                })
                .await;
            match created {
                Ok(evicted) => {
                    for f in &evicted {
                        self.audit_revoked(f, RevokeReason::SessionLimit);
                    }
                    return Ok((sid, minted.token, (token_exp_ms - now) / 1000));
                }
                Err(StoreError::Collision) => continue,
                Err(e) => return Err(e.into()),
            }
        }
        Err(OAuthError::Internal("could not mint a session id".into()))
    }

    async fn refresh_grant(&self, client: &ClientSettings, form: &Form) -> Result<Bytes, OAuthError> {
        let presented = form.require("refresh_token")?;
        let requested = self.requested_scope(form)?;
        // Every failure gets the same body: telling them apart would help someone probing tokens.
        let Some((sid, digest)) = parse_refresh_token(presented) else {
            return Err(invalid_refresh_token());
        };
        let store = &self.state.store;
        let now = self.state.clock.now_millis();
        let Some((session, state)) = store.inspect(sid, &digest).await? else {
            return Err(invalid_refresh_token());
        };
        // Order matters: another client's presentation must change nothing, not even a revocation.
        if *session.client != *client.id || session.revoked {
            return Err(invalid_refresh_token());
        }
        let expires_ms = match state {
            TokenState::Unknown => return Err(invalid_refresh_token()),
            TokenState::Current { expires_ms, .. } | TokenState::Rotated { expires_ms, .. } if now >= expires_ms => {
                return Err(invalid_refresh_token());
            }
            TokenState::Rotated { at_ms, sealed, .. } => {
                return self.replay_or_revoke(presented, &session, at_ms, sealed, now).await;
            }
            TokenState::Current { expires_ms, .. } => expires_ms,
        };
        debug_assert!(now < expires_ms);

        // The session's user, client and scopes as the current config has them.
        let snap = self.snap;
        let Some(user) = snap.users.get(&session.user) else {
            return Err(invalid_refresh_token());
        };
        let allowed = snap
            .config
            .scopes
            .parse_lenient(&session.scopes)
            .intersect(user.scopes)
            .intersect(client.scopes);
        let scope = match requested {
            Some(r) if !allowed.contains_all(r) => {
                return Err(OAuthError::new(
                    ErrorCode::InvalidScope,
                    "a refresh may narrow the scope, never widen it",
                ));
            }
            Some(r) => r,
            None => allowed,
        };
        if scope.is_empty() {
            return Err(invalid_refresh_token());
        }
        let t = &snap.config.tokens;
        let new_exp_ms = (now + ms(t.refresh_ttl)).min(session.session_expires_ms);
        if new_exp_ms <= now {
            return Err(invalid_refresh_token());
        }
        let random = IssueRandom::draw().map_err(no_randomness)?;
        let minted = refresh_token_from(sid, &random.refresh);
        let body = self.token_response(
            user,
            client,
            scope,
            sid,
            now,
            Some((&minted.token, (new_exp_ms - now) / 1000)),
            &random.jti,
        )?;
        let committed = store
            .rotate(Rotation {
                sid,
                presented: digest,
                successor: minted.digest,
                successor_exp_ms: new_exp_ms,
                access_exp_secs: now / 1000 + t.access_ttl.as_secs(),
                sealed: crypto::seal(presented, &body),
                now_ms: now,
            })
            .await?;
        match committed {
            Committed::Rotated => Ok(Bytes::from(body)),
            Committed::Revoked | Committed::Gone => Err(invalid_refresh_token()),
            // A concurrent request rotated it first: ours was never handed out. Answer as a retry.
            Committed::Lost => match store.inspect(sid, &digest).await? {
                Some((session, TokenState::Rotated { at_ms, sealed, .. })) if !session.revoked => {
                    self.replay_or_revoke(presented, &session, at_ms, sealed, now).await
                }
                _ => Err(invalid_refresh_token()),
            },
        }
    }

    /// A rotated token presented again: within the grace, the response it got the first time;
    /// after it, theft: the whole session is revoked.
    async fn replay_or_revoke(
        &self,
        presented: &str,
        session: &SessionView,
        rotated_at_ms: u64,
        sealed: Option<Sealed>,
        now: u64,
    ) -> Result<Bytes, OAuthError> {
        let grace = ms(self.snap.config.tokens.reuse_grace);
        if now < rotated_at_ms.saturating_add(grace)
            && let Some(body) = sealed.and_then(|s| crypto::open(presented, &s))
        {
            tracing::info!(target: "tokengate::audit", event = "refresh_replayed", client = %session.client, sid = %session.sid);
            return Ok(Bytes::from(body));
        }
        self.reuse_detected.store(true, std::sync::atomic::Ordering::Relaxed);
        if let Some(f) = self
            .state
            .store
            .revoke_session(session.sid, RevokeReason::Reuse, now)
            .await?
        {
            self.audit_revoked(&f, RevokeReason::Reuse);
        }
        Err(invalid_refresh_token())
    }

    fn client_credentials_grant(&self, client: &ClientSettings, form: &Form) -> Result<Bytes, OAuthError> {
        let requested = self.requested_scope(form)?;
        let granted = requested.map_or(client.scopes, |r| r.intersect(client.scopes));
        if granted.is_empty() {
            return Err(OAuthError::new(
                ErrorCode::InvalidScope,
                "no requested scope may be granted",
            ));
        }
        let sid = SessionId::random().map_err(no_randomness)?;
        let now = self.state.clock.now_millis();
        let scope = self.snap.config.scopes.render(granted);
        let jti = crypto::random_bytes::<16>().map_err(no_randomness)?;
        let access = self
            .snap
            .issuer
            .access_token(&client.id, &client.id, &scope, sid, now / 1000, &jti)
            .map_err(|_| OAuthError::Internal("could not sign the access token".into()))?;
        Ok(Bytes::from(self.response(&access.jwt, None, &scope)))
    }

    /// Signs the access token and renders the §5.1 body (with a refresh token when given).
    #[allow(clippy::too_many_arguments)] // private; each is one field of the response or token
    fn token_response(
        &self,
        user: &UserSettings,
        client: &ClientSettings,
        scope: ScopeSet,
        sid: SessionId,
        now_ms: u64,
        refresh: Option<(&str, u64)>,
        jti: &[u8; 16],
    ) -> Result<Vec<u8>, OAuthError> {
        let scope = self.snap.config.scopes.render(scope);
        let access = self
            .snap
            .issuer
            .access_token(&user.username, &client.id, &scope, sid, now_ms / 1000, jti)
            .map_err(|_| OAuthError::Internal("could not sign the access token".into()))?;
        Ok(self.response(&access.jwt, refresh, &scope))
    }

    fn response(&self, access_token: &str, refresh: Option<(&str, u64)>, scope: &str) -> Vec<u8> {
        render_token_response(self.snap.issuer.access_ttl_secs(), access_token, refresh, scope)
    }

    /// The audit record of a session revocation: who, which client, why; never a token.
    fn audit_revoked(&self, f: &RevokedFamily, reason: RevokeReason) {
        if !f.newly {
            return;
        }
        self.state.metrics.revocation(reason.as_str());
        tracing::warn!(
            target: "tokengate::audit",
            event = "session_revoked",
            family = %f.sid,
            subject = %f.user,
            client = %f.client,
            reason = reason.as_str(),
        );
    }
}

fn not_yours() -> OAuthError {
    OAuthError::new(ErrorCode::UnauthorizedClient, "the token was not issued to this client")
}

const KNOWN_PARAMETERS: [&str; 9] = [
    "grant_type",
    "username",
    "password",
    "scope",
    "refresh_token",
    "client_id",
    "client_secret",
    "token",
    "token_type_hint",
];

/// Reads an `application/x-www-form-urlencoded` POST body of at most [`MAX_FORM_BYTES`], all of it
/// within `limit` (a client trickling a byte at a time does not hold a connection for ever).
pub(super) async fn read_form<B>(
    method: &Method,
    headers: &HeaderMap,
    body: B,
    limit: std::time::Duration,
) -> Result<Form, OAuthError>
where
    B: Body<Data = Bytes>,
    B::Error: std::error::Error + Send + Sync + 'static,
{
    if method != Method::POST {
        return Err(OAuthError::MethodNotAllowed);
    }
    let is_form = headers
        .get(CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| {
            v.split(';')
                .next()
                .is_some_and(|t| t.trim().eq_ignore_ascii_case("application/x-www-form-urlencoded"))
        });
    if !is_form {
        return Err(OAuthError::invalid_request(
            "the body must be application/x-www-form-urlencoded",
        ));
    }
    let declared = headers
        .get(CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|n| n > MAX_FORM_BYTES as u64) {
        return Err(OAuthError::BodyTooLarge);
    }
    // A form usually arrives with its request head, so the body is complete at the first look;
    // the timer (a registration in the runtime's wheel, and its removal) is only for a body that
    // is not.
    let mut collect = std::pin::pin!(collect_form(body));
    let bytes = match futures_util::poll!(collect.as_mut()) {
        std::task::Poll::Ready(c) => c,
        std::task::Poll::Pending => tokio::time::timeout(limit, collect)
            .await
            .map_err(|_| OAuthError::BodyTimeout)?,
    }?;
    parse_form(&bytes)
}

/// The whole body, at most [`MAX_FORM_BYTES`]. A body in one frame (nearly every form) is kept as
/// that frame; several are joined into one buffer sized from the body's length when it is known,
/// so a password or refresh token is not left behind in buffers freed while it grows.
/// (http_body_util's `Limited` + `Collected` cost 1 % of a refresh: a `VecDeque` per body, boxed
/// errors and their downcasts.)
async fn collect_form<B>(body: B) -> Result<Bytes, OAuthError>
where
    B: Body<Data = Bytes>,
    B::Error: std::error::Error + Send + Sync + 'static,
{
    let hint = usize::try_from(body.size_hint().lower()).map_or(0, |n| n.min(MAX_FORM_BYTES));
    let mut body = std::pin::pin!(body);
    let mut first = Bytes::new();
    let mut joined: Vec<u8> = Vec::new();
    while let Some(frame) = body.as_mut().frame().await {
        let frame = frame.map_err(|e| {
            let e: &(dyn std::error::Error + 'static) = &e;
            match e.downcast_ref::<ClientBodyError>() {
                Some(ClientBodyError::Timeout(_)) => OAuthError::BodyTimeout,
                _ => OAuthError::invalid_request("the request body could not be read"),
            }
        })?;
        let Ok(data) = frame.into_data() else {
            continue; // trailers
        };
        if first.len() + joined.len() + data.len() > MAX_FORM_BYTES {
            return Err(OAuthError::BodyTooLarge);
        }
        if first.is_empty() && joined.is_empty() {
            first = data;
        } else {
            if !first.is_empty() {
                joined.reserve_exact(hint.max(first.len() + data.len()));
                joined.extend_from_slice(&first);
                first = Bytes::new();
            }
            joined.extend_from_slice(&data);
        }
    }
    Ok(if joined.is_empty() { first } else { Bytes::from(joined) })
}

/// Parses a form body: UTF-8, each known parameter at most once. Only the parameters these
/// endpoints use are kept (RFC 6749 §3.1: unknown ones are ignored), so a body of thousands of
/// invented names costs one pass and no allocations.
fn parse_form(bytes: &[u8]) -> Result<Form, OAuthError> {
    let Ok(text) = std::str::from_utf8(bytes) else {
        return Err(OAuthError::invalid_request("the body is not UTF-8"));
    };
    let mut pairs: Vec<(&'static str, zeroize::Zeroizing<String>)> = Vec::with_capacity(4);
    for piece in text.split('&').filter(|p| !p.is_empty()) {
        // A pair with nothing encoded (no '%', no '+': the usual case) is its own decoding; the
        // test checks it against form_urlencoded, which decodes the others. No early exit in
        // the scan: the compiler compares many bytes per instruction.
        let encoded = piece.bytes().fold(false, |e, b| e | (b == b'%') | (b == b'+'));
        let (k, v) = if encoded {
            match form_urlencoded::parse(piece.as_bytes()).next() {
                Some(pair) => pair,
                None => continue,
            }
        } else {
            let (k, v) = piece.split_once('=').unwrap_or((piece, ""));
            (k.into(), v.into())
        };
        let Some(name) = KNOWN_PARAMETERS.iter().find(|n| **n == k) else {
            continue;
        };
        if pairs.iter().any(|(seen, _)| seen == name) {
            return Err(OAuthError::invalid_request(format!("{name} is repeated")));
        }
        pairs.push((name, zeroize::Zeroizing::new(v.into_owned())));
    }
    Ok(Form(pairs))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn frames(parts: Vec<http_body::Frame<Bytes>>) -> impl Body<Data = Bytes, Error = std::convert::Infallible> {
        http_body_util::StreamBody::new(futures_util::stream::iter(parts.into_iter().map(Ok)))
    }

    #[tokio::test]
    async fn form_bodies_are_joined_across_frames_and_bounded_as_a_whole() {
        let data = |s: &str| http_body::Frame::data(Bytes::copy_from_slice(s.as_bytes()));
        let one = collect_form(frames(vec![data("grant_type=refresh_token")]))
            .await
            .unwrap();
        assert_eq!(one, "grant_type=refresh_token");
        let mut trailers = HeaderMap::new();
        trailers.insert("x-t", "1".parse().unwrap());
        let split = vec![
            data(""),
            data("grant_"),
            data("type=pass"),
            http_body::Frame::trailers(trailers),
            data("word"),
        ];
        assert_eq!(collect_form(frames(split)).await.unwrap(), "grant_type=password");
        // Exactly the bound is read; one byte more in any frame is 413.
        let half = "a".repeat(MAX_FORM_BYTES / 2);
        let full = vec![data(&half), data(&half), data(&"a".repeat(MAX_FORM_BYTES % 2))];
        assert_eq!(collect_form(frames(full)).await.unwrap().len(), MAX_FORM_BYTES);
        let over = vec![data(&half), data(&half), data(&"a".repeat(MAX_FORM_BYTES % 2 + 1))];
        assert!(matches!(
            collect_form(frames(over)).await,
            Err(OAuthError::BodyTooLarge)
        ));
        let over = vec![data(&"a".repeat(MAX_FORM_BYTES + 1))];
        assert!(matches!(
            collect_form(frames(over)).await,
            Err(OAuthError::BodyTooLarge)
        ));
    }

    /// What `parse_form` was before its fast path: form_urlencoded for every pair.
    fn parse_form_reference(bytes: &[u8]) -> Option<Vec<(&'static str, String)>> {
        std::str::from_utf8(bytes).ok()?;
        let mut pairs: Vec<(&'static str, String)> = Vec::new();
        for (k, v) in form_urlencoded::parse(bytes) {
            let Some(name) = KNOWN_PARAMETERS.iter().find(|n| **n == k) else {
                continue;
            };
            if pairs.iter().any(|(seen, _)| seen == name) {
                return None;
            }
            pairs.push((name, v.into_owned()));
        }
        Some(pairs)
    }

    proptest! {
        /// Names (plain and encoded), values of '=', '+', good and broken percent escapes and
        /// non-ASCII, empty pieces, and bad UTF-8.
        #[test]
        fn forms_decode_as_form_urlencoded_does(
            pieces in proptest::collection::vec((
                prop_oneof![
                    Just("grant_type"), Just("scope"), Just("client_id"), Just("grant%5Ftype"),
                    Just("scope+"), Just("sco%70e"), Just(""), Just("x"),
                ],
                proptest::option::of(proptest::collection::vec(prop_oneof![
                    Just("+".to_string()), Just("=".to_string()), Just("%".to_string()), Just("%3D".to_string()),
                    Just("%2".to_string()), Just("%zz".to_string()), Just("%C3%A9".to_string()), Just("%FF".to_string()),
                    "[a-z0-9_.~-]{0,6}", "\\PC{0,3}",
                ], 0..4)),
            ), 0..6),
            bad_utf8 in any::<bool>(),
        ) {
            let parts: Vec<String> = pieces
                .iter()
                .map(|(name, value)| match value {
                    Some(v) => format!("{name}={}", v.concat().replace('&', "")),
                    None => name.to_string(),
                })
                .collect();
            let mut body = parts.join("&").into_bytes();
            if bad_utf8 {
                body.push(0xff);
            }
            let ours = parse_form(&body).ok().map(|f| {
                f.0.iter().map(|(k, v)| (*k, v.to_string())).collect::<Vec<_>>()
            });
            prop_assert_eq!(ours, parse_form_reference(&body));
        }
    }

    #[test]
    fn forms_keep_known_parameters_once() {
        let f = parse_form(b"grant_type=password&x=1&username=a%20b&password=").unwrap();
        assert_eq!(f.get("grant_type"), Some("password"));
        assert_eq!(f.get("username"), Some("a b"));
        assert_eq!(f.get("password"), None, "empty is absent");
        assert_eq!(f.get("x"), None, "unknown parameters are dropped");
        assert!(parse_form(b"scope=a&scope=b").is_err());
        assert!(parse_form(b"\xff").is_err());
    }

    /// The body as a JSON serializer writes it (the hand-written one must match it byte for byte).
    fn serialized(expires_in: u64, access_token: &str, refresh: Option<(&str, u64)>, scope: &str) -> Vec<u8> {
        #[derive(serde::Serialize)]
        struct TokenResponse<'a> {
            access_token: &'a str,
            token_type: &'static str,
            expires_in: u64,
            #[serde(skip_serializing_if = "Option::is_none")]
            refresh_token: Option<&'a str>,
            #[serde(skip_serializing_if = "Option::is_none")]
            refresh_expires_in: Option<u64>,
            scope: &'a str,
        }
        let mut out = serde_json::to_vec(&TokenResponse {
            access_token,
            token_type: "Bearer",
            expires_in,
            refresh_token: refresh.map(|r| r.0),
            refresh_expires_in: refresh.map(|r| r.1),
            scope,
        })
        .unwrap();
        out.push(b'\n');
        out
    }

    #[test]
    fn token_responses_are_the_json_a_serializer_writes() {
        let jwt = "eyJhbGciOiJFZERTQSJ9.eyJzdWIiOiJhIn0.c2ln-_";
        for refresh in [None, Some(("AAAAAAAAAAE-abc_def", 86_400))] {
            let body = render_token_response(900, jwt, refresh, "orders:read orders:write");
            assert_eq!(body, serialized(900, jwt, refresh, "orders:read orders:write"));
            let v: serde_json::Value = serde_json::from_slice(&body).unwrap();
            assert_eq!(v["access_token"], jwt);
            assert_eq!(v["refresh_token"].as_str(), refresh.map(|r| r.0));
        }
    }

    proptest! {
        #[test]
        fn the_form_parser_never_panics(body in proptest::collection::vec(any::<u8>(), 0..512)) {
            let _ = parse_form(&body);
        }

        #[test]
        fn token_responses_escape_what_json_needs(token in "\\PC{0,40}", scope in "[\\x00-\\x7f]{0,20}", e in any::<u64>()) {
            let body = render_token_response(e, &token, Some((&token, e)), &scope);
            prop_assert_eq!(&body, &serialized(e, &token, Some((&token, e)), &scope));
        }

        #[test]
        fn known_parameters_round_trip(value in "[^\\x00]{0,40}") {
            let body: String = form_urlencoded::Serializer::new(String::new())
                .append_pair("username", &value)
                .finish();
            let f = parse_form(body.as_bytes()).unwrap();
            prop_assert_eq!(f.get("username"), Some(value.as_str()).filter(|v| !v.is_empty()));
        }
    }
}
