//! RFC 7662 token introspection: a resource server (a confidential client) asks whether a token
//! is active, and what it grants.
//!
//! Active means usable right now: one of our access tokens that validates (signature, claims, not
//! expired, its session not revoked), or a refresh token that is its session's current one,
//! unexpired, in a session not revoked, whose user and client the current config still has, with a
//! scope a refresh would still grant. Everything else (unknown, expired, revoked, rotated,
//! malformed, another issuer's) is exactly `{"active": false}`: the answer never says which.

use bytes::Bytes;
use http::{HeaderMap, Method};
use http_body::Body;
use serde::Serialize;

use super::endpoint::{OAuthServer, read_form};
use super::error::{ErrorCode, OAuthError};
use crate::ids::parse_refresh_token;
use crate::store::{SessionStore, TokenState};

/// An RFC 7662 §2.2 response. Inactive: only `active`.
#[derive(Debug, Serialize, PartialEq, Eq)]
pub struct Introspection {
    pub active: bool,
    #[serde(flatten, skip_serializing_if = "Option::is_none")]
    pub details: Option<Active>,
}

#[derive(Debug, Serialize, PartialEq, Eq)]
pub struct Active {
    pub scope: String,
    pub client_id: String,
    pub sub: String,
    pub exp: u64,
    pub iat: u64,
    /// `Bearer` for an access token (RFC 6749 §7.1); `refresh_token` for a refresh token, which
    /// has no token type of its own (the RFC 7009 hint name).
    pub token_type: &'static str,
    pub sid: String,
}

impl Introspection {
    pub fn inactive() -> Introspection {
        Introspection {
            active: false,
            details: None,
        }
    }
    fn active(details: Active) -> Introspection {
        Introspection {
            active: true,
            details: Some(details),
        }
    }
}

impl OAuthServer<'_> {
    /// The introspection endpoint: confidential clients only (authenticated as at the token
    /// endpoint; any other gets 401 `invalid_client`).
    pub async fn introspect<B>(
        &self,
        method: &Method,
        headers: &HeaderMap,
        body: B,
    ) -> Result<Introspection, OAuthError>
    where
        B: Body<Data = Bytes>,
        B::Error: std::error::Error + Send + Sync + 'static,
    {
        let form = read_form(method, headers, body, self.snap.config.server.body_timeout).await?;
        let client = self.authenticate(headers, &form)?;
        if client.secret_sha256.is_none() {
            return Err(OAuthError::Protocol {
                code: ErrorCode::InvalidClient,
                description: "only confidential clients may introspect tokens".into(),
                basic_challenge: false,
            });
        }
        let token = form.require("token")?;
        // token_type_hint only orders the look-ups (§2.1).
        if form.get("token_type_hint") == Some("refresh_token") {
            if let Some(active) = self.refresh_token_details(token).await? {
                return Ok(Introspection::active(active));
            }
            return Ok(self
                .access_token_details(token)
                .map_or_else(Introspection::inactive, Introspection::active));
        }
        if let Some(active) = self.access_token_details(token) {
            return Ok(Introspection::active(active));
        }
        Ok(self
            .refresh_token_details(token)
            .await?
            .map_or_else(Introspection::inactive, Introspection::active))
    }

    fn access_token_details(&self, token: &str) -> Option<Active> {
        let t = self.snap.validator.validate_own(token).ok()?;
        Some(Active {
            scope: t.scope().to_owned(),
            client_id: t.client_id.to_string(),
            sub: t.sub.to_string(),
            exp: t.exp,
            iat: t.iat,
            token_type: "Bearer",
            sid: t.identity.session.as_ref()?.to_str().ok()?.to_owned(),
        })
    }

    async fn refresh_token_details(&self, token: &str) -> Result<Option<Active>, OAuthError> {
        let Some((sid, digest)) = parse_refresh_token(token) else {
            return Ok(None);
        };
        let Some((session, state)) = self.state.store.inspect(sid, &digest).await? else {
            return Ok(None);
        };
        let now = self.state.clock.now_millis();
        let TokenState::Current { expires_ms, issued_ms } = state else {
            return Ok(None);
        };
        if session.revoked || now >= expires_ms {
            return Ok(None);
        }
        // What a refresh would grant now: the session's scopes the user and client still have.
        let snap = self.snap;
        let (Some(user), Some(client)) = (snap.users.get(&session.user), snap.clients.get(&session.client)) else {
            return Ok(None);
        };
        let scopes = &snap.config.scopes;
        let granted = scopes
            .parse_lenient(&session.scopes)
            .intersect(user.scopes)
            .intersect(client.scopes);
        if granted.is_empty() {
            return Ok(None);
        }
        Ok(Some(Active {
            scope: scopes.render(granted),
            client_id: session.client.to_string(),
            sub: session.user.to_string(),
            exp: expires_ms / 1000,
            iat: issued_ms / 1000,
            token_type: "refresh_token",
            sid: sid.encode(),
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_inactive_answer_is_exactly_active_false() {
        assert_eq!(
            serde_json::to_string(&Introspection::inactive()).unwrap(),
            r#"{"active":false}"#
        );
    }
}
