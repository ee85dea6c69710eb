//! `POST /api/oauth2/token` and `POST /api/oauth2/revoke`: form parsing (RFC 6749 §3.2), client
//! authentication, grant dispatch, RFC 6749 §5.1 responses. Errors are returned as [`OAuthError`]
//! values; `service.rs` turns them into responses.

use std::net::IpAddr;
use std::sync::Arc;

use bytes::Bytes;
use http::header::{AUTHORIZATION, CONTENT_LENGTH, CONTENT_TYPE};
use http::{HeaderMap, Method};
use http_body::Body;
use http_body_util::{BodyExt, LengthLimitError, Limited};
use serde::Serialize;

use crate::auth::{RevokedSessions, Validator};
use crate::clock::SharedClock;
use crate::config::{ClientSettings, Config, GrantType};
use crate::oauth::clients::{ClientRegistry, Presented, parse_basic};
use crate::oauth::error::{ErrorCode, INVALID_REFRESH_TOKEN, OAuthError};
use crate::oauth::issuer::{self, Issuer, sid_from_str, sid_to_string};
use crate::oauth::limiter::{LoginLimiter, Who};
use crate::oauth::password::PasswordPool;
use crate::oauth::registry::{
    Invalid, RefreshError, RefreshRegistry, RegistryLimits, RevokeOutcome, RevokedFamily, Rotated,
};
use crate::oauth::users::{UserStore, VerifyError};
use crate::scope::{ScopeSet, ScopeUniverse};

/// Form bodies beyond this are refused with 413 and not read further.
pub const MAX_FORM_BYTES: usize = 16 * 1024;

pub struct OAuthServer {
    clients: ClientRegistry,
    users: UserStore,
    issuer: Issuer,
    registry: RefreshRegistry,
    limiter: LoginLimiter,
    revoked: Arc<RevokedSessions>,
    validator: Arc<Validator>,
    scopes: ScopeUniverse,
    clock: SharedClock,
}

/// A parsed form: each parameter at most once (RFC 6749 §3.2), empty values treated as absent
/// (§3.1).
struct Form(Vec<(String, String)>);

impl Form {
    fn get(&self, name: &str) -> Option<&str> {
        self.0
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
            .filter(|v| !v.is_empty())
    }
    fn require(&self, name: &str) -> Result<&str, OAuthError> {
        self.get(name)
            .ok_or_else(|| OAuthError::invalid_request(format!("missing parameter {name}")))
    }
}

#[derive(Serialize)]
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

impl OAuthServer {
    pub fn new(
        config: &Config,
        revoked: Arc<RevokedSessions>,
        validator: Arc<Validator>,
        clock: SharedClock,
        passwords: Arc<PasswordPool>,
    ) -> Self {
        let t = &config.tokens;
        let limits = RegistryLimits {
            refresh_ttl: t.refresh_ttl,
            session_max_lifetime: t.session_max_lifetime,
            reuse_grace: t.reuse_grace,
            access_ttl: t.access_ttl,
        };
        OAuthServer {
            clients: ClientRegistry::new(config.clients.clone()),
            users: UserStore::new(config.users.clone(), passwords),
            issuer: Issuer::new(t),
            registry: RefreshRegistry::new(limits, revoked.clone()),
            limiter: LoginLimiter::default(),
            revoked,
            validator,
            scopes: config.scopes.clone(),
            clock,
        }
    }

    pub fn registry(&self) -> &RefreshRegistry {
        &self.registry
    }

    /// Periodic housekeeping: expired refresh state, idle login counters, lapsed revocations.
    pub fn sweep(&self) {
        let now = self.clock.now_millis();
        self.registry.sweep(now);
        self.limiter.sweep(now);
        self.revoked.sweep(now / 1000);
    }

    /// The token endpoint. `Ok` is the §5.1 JSON body.
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
        let form = read_form(method, headers, body).await?;
        let (client_index, client) = self.authenticate(headers, &form)?;
        let grant = form.require("grant_type")?;
        let Some(grant) = GrantType::parse(grant) else {
            return Err(OAuthError::new(
                ErrorCode::UnsupportedGrantType,
                "grant_type is not supported",
            ));
        };
        if !client.may_use(grant) {
            return Err(OAuthError::new(
                ErrorCode::UnauthorizedClient,
                "this client may not use this grant type",
            ));
        }
        match grant {
            GrantType::Password => self.password_grant(client_index, client, &form, peer).await,
            GrantType::RefreshToken => self.refresh_grant(client_index, client, &form),
            GrantType::ClientCredentials => self.client_credentials_grant(client, &form),
        }
    }

    /// RFC 7009 revocation. `Ok` means 200 (also for tokens the server does not know).
    pub async fn revoke<B>(&self, method: &Method, headers: &HeaderMap, body: B) -> Result<(), OAuthError>
    where
        B: Body<Data = Bytes>,
        B::Error: std::error::Error + Send + Sync + 'static,
    {
        let form = read_form(method, headers, body).await?;
        let (client_index, client) = self.authenticate(headers, &form)?;
        let token = form.require("token")?;
        let not_yours = || OAuthError::new(ErrorCode::UnauthorizedClient, "the token was not issued to this client");
        // token_type_hint only orders the look-ups (§2.1); both kinds are tried.
        let access_first = form.get("token_type_hint") == Some("access_token");
        let try_refresh = |s: &Self| match s.registry.revoke_by_token(token, client_index) {
            RevokeOutcome::Unknown => Ok(false),
            RevokeOutcome::NotYours => Err(not_yours()),
            RevokeOutcome::Revoked(family) => {
                if let Some(f) = family {
                    s.audit_revoked(f, "revoked_by_client");
                }
                Ok(true)
            }
        };
        if !access_first && try_refresh(self)? {
            return Ok(());
        }
        if let Ok(at) = self.validator.verify_signature_only(token) {
            if *at.client_id != *client.id {
                return Err(not_yours());
            }
            if let Some(sid) = sid_from_str(&at.sid)
                && self.registry.session_client(sid) == Some(client_index)
                && let Some(f) = self.registry.revoke_family(sid)
            {
                self.audit_revoked(f, "revoked_by_client");
            }
            // Also covers sessions without a family (client_credentials tokens).
            self.revoked.revoke(&at.sid, at.exp);
            return Ok(());
        }
        if access_first {
            try_refresh(self)?;
        }
        Ok(())
    }

    fn authenticate<'a>(&'a self, headers: &HeaderMap, form: &Form) -> Result<(u32, &'a ClientSettings), OAuthError> {
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
        self.clients.authenticate(&presented)
    }

    fn requested_scope(&self, form: &Form) -> Result<Option<ScopeSet>, OAuthError> {
        match form.get("scope") {
            None => Ok(None),
            Some(s) => self
                .scopes
                .parse_strict(s)
                .map(Some)
                .map_err(|_| OAuthError::new(ErrorCode::InvalidScope, "the requested scope is unknown")),
        }
    }

    async fn password_grant(
        &self,
        client_index: u32,
        client: &ClientSettings,
        form: &Form,
        peer: IpAddr,
    ) -> Result<Bytes, OAuthError> {
        let username = form.require("username")?;
        let password = form.require("password")?;
        let requested = self.requested_scope(form)?;
        let now = self.clock.now_millis();
        let who = Who {
            username,
            known_user: self.users.exists(username),
            client: &client.id,
            ip: peer,
        };
        // Dropped before it is told how the check went (the client went away), the attempt counts
        // as a failure and is audited as abandoned.
        let attempt = self
            .limiter
            .admit(who, now)
            .map_err(|retry_after_secs| OAuthError::SlowDown { retry_after_secs })?;
        let verified = match self.users.verify(username, password).await {
            Ok(v) => v,
            Err(e) => {
                attempt.unchecked();
                return Err(match e {
                    VerifyError::Busy => OAuthError::SlowDown { retry_after_secs: 1 },
                    VerifyError::TaskFailed => OAuthError::Internal("password verification failed to run"),
                });
            }
        };
        let Some(user_index) = verified else {
            attempt.failed(self.clock.now_millis());
            let username = who.loggable_username();
            tracing::info!(target: "tokengate::audit", event = "login_failed", username, client = %client.id, %peer);
            return Err(OAuthError::new(
                ErrorCode::InvalidGrant,
                "the username or password is incorrect",
            ));
        };
        attempt.succeeded();
        let user = self
            .users
            .get(user_index)
            .ok_or(OAuthError::Internal("user index out of range"))?;
        let allowed = user.scopes.intersect(client.scopes);
        let granted = requested.map_or(allowed, |r| r.intersect(allowed));
        if granted.is_empty() {
            return Err(OAuthError::new(
                ErrorCode::InvalidScope,
                "no requested scope may be granted",
            ));
        }
        // Time is read again: Argon2 took a while.
        let now = self.clock.now_millis();
        let session = self
            .registry
            .start_session(user_index, client_index, granted, now)
            .map_err(|_| OAuthError::Internal("could not mint a refresh token"))?;
        tracing::info!(target: "tokengate::audit", event = "login", username, client = %client.id, sid = %sid_to_string(session.sid));
        self.token_response(
            &user.username,
            client,
            granted,
            session.sid,
            now,
            Some((&session.refresh_token, session.refresh_expires_in_secs)),
        )
        .map(Bytes::from)
    }

    fn refresh_grant(&self, client_index: u32, client: &ClientSettings, form: &Form) -> Result<Bytes, OAuthError> {
        let presented = form.require("refresh_token")?;
        let requested = self.requested_scope(form)?;
        let now = self.clock.now_millis();
        let outcome = self.registry.rotate(presented, client_index, now, |rotation| {
            let session = rotation.session;
            let scope = match requested {
                Some(r) if !session.scopes.contains_all(r) => {
                    return Err(OAuthError::new(
                        ErrorCode::InvalidScope,
                        "a refresh may narrow the scope, never widen it",
                    ));
                }
                Some(r) => r,
                None => session.scopes,
            };
            let user = self
                .users
                .get(session.user)
                .ok_or(OAuthError::Internal("user index out of range"))?;
            self.token_response(
                &user.username,
                client,
                scope,
                session.sid,
                now,
                Some((rotation.refresh_token, rotation.refresh_expires_in_secs)),
            )
        });
        match outcome {
            Ok(Rotated::Fresh(body)) => Ok(Bytes::from(body)),
            Ok(Rotated::Replayed(body)) => {
                tracing::info!(target: "tokengate::audit", event = "refresh_replayed", client = %client.id);
                Ok(Bytes::from(body))
            }
            Err(RefreshError::Respond(e)) => Err(e),
            Err(RefreshError::Mint(_)) => Err(OAuthError::Internal("could not mint a refresh token")),
            Err(RefreshError::Invalid(why)) => {
                if let Invalid::Reused(Some(family)) = why {
                    self.audit_revoked(family, "refresh_token_reuse");
                }
                Err(OAuthError::new(ErrorCode::InvalidGrant, INVALID_REFRESH_TOKEN))
            }
        }
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
        let sid = u64::from_le_bytes(issuer::random_bytes::<8>().map_err(|_| OAuthError::Internal("no randomness"))?);
        self.token_response(&client.id, client, granted, sid, self.clock.now_millis(), None)
            .map(Bytes::from)
    }

    /// Signs the access token and renders the §5.1 body (with a refresh token when given).
    fn token_response(
        &self,
        subject: &str,
        client: &ClientSettings,
        scope: ScopeSet,
        sid: u64,
        now_ms: u64,
        refresh: Option<(&str, u64)>,
    ) -> Result<Vec<u8>, OAuthError> {
        let scope = self.scopes.render(scope);
        let access = self
            .issuer
            .access_token(subject, &client.id, &scope, &sid_to_string(sid), now_ms / 1000)
            .map_err(|_| OAuthError::Internal("could not sign the access token"))?;
        Ok(self.response(&access.jwt, refresh, &scope))
    }

    fn response(&self, access_token: &str, refresh: Option<(&str, u64)>, scope: &str) -> Vec<u8> {
        let body = TokenResponse {
            access_token,
            token_type: "Bearer",
            expires_in: self.issuer.access_ttl_secs(),
            refresh_token: refresh.map(|r| r.0),
            refresh_expires_in: refresh.map(|r| r.1),
            scope,
        };
        // Serializing plain strings and integers cannot fail.
        serde_json::to_vec(&body).unwrap_or_default()
    }

    /// The audit record of a session revocation: who, which client, why; never a token.
    fn audit_revoked(&self, f: RevokedFamily, reason: &'static str) {
        if !f.newly {
            return;
        }
        let subject = self.users.get(f.user).map_or("?", |u| u.username.as_str());
        let client = self.clients.get(f.client).map_or("?", |c| c.id.as_str());
        tracing::warn!(
            target: "tokengate::audit",
            event = "session_revoked",
            family = %sid_to_string(f.sid),
            subject,
            client,
            reason,
        );
    }
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

/// Reads an `application/x-www-form-urlencoded` POST body of at most [`MAX_FORM_BYTES`].
async fn read_form<B>(method: &Method, headers: &HeaderMap, body: B) -> Result<Form, OAuthError>
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
    let bytes = match Limited::new(body, MAX_FORM_BYTES).collect().await {
        Ok(collected) => collected.to_bytes(),
        Err(e) if e.is::<LengthLimitError>() => return Err(OAuthError::BodyTooLarge),
        Err(_) => {
            return Err(OAuthError::invalid_request("the request body could not be read"));
        }
    };
    if std::str::from_utf8(&bytes).is_err() {
        return Err(OAuthError::invalid_request("the body is not UTF-8"));
    }
    // Only the parameters these endpoints use are kept (RFC 6749 §3.1: unknown ones are ignored),
    // so a body of thousands of invented names costs one pass and no allocations.
    let mut pairs: Vec<(String, String)> = Vec::new();
    for (k, v) in form_urlencoded::parse(&bytes) {
        let Some(name) = KNOWN_PARAMETERS.iter().find(|n| **n == k) else {
            continue;
        };
        if pairs.iter().any(|(seen, _)| seen == name) {
            return Err(OAuthError::invalid_request(format!("{name} is repeated")));
        }
        pairs.push(((*name).to_owned(), v.into_owned()));
    }
    Ok(Form(pairs))
}
