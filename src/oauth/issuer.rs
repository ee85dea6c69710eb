//! Minting access tokens: RFC 9068 JWTs, signed by the active key of the Snapshot's
//! [`KeySet`], whose `kid` they carry. (Refresh tokens are minted in [`crate::ids`].)

use std::sync::Arc;

use serde::Serialize;

use crate::config::TokenSettings;
use crate::crypto::random_bytes;
use crate::ids::SessionId;
use crate::keys::KeySet;

/// The claims of an RFC 9068 access token.
#[derive(Serialize)]
struct AccessClaims<'a> {
    iss: &'a str,
    sub: &'a str,
    aud: &'a str,
    exp: u64,
    iat: u64,
    jti: &'a str,
    client_id: &'a str,
    scope: &'a str,
    sid: &'a str,
}

pub struct AccessToken {
    pub jwt: String,
    pub exp: u64,
}

pub struct Issuer {
    keys: Arc<KeySet>,
    issuer: String,
    audience: String,
    access_ttl_secs: u64,
}

#[derive(Debug, thiserror::Error)]
#[error("could not mint a token")]
pub struct MintError;

impl Issuer {
    pub fn new(tokens: &TokenSettings, keys: Arc<KeySet>) -> Self {
        Issuer {
            keys,
            issuer: tokens.issuer.clone(),
            audience: tokens.audience.clone(),
            access_ttl_secs: tokens.access_ttl.as_secs(),
        }
    }

    pub fn access_ttl_secs(&self) -> u64 {
        self.access_ttl_secs
    }

    /// Signs an access token issued at `now_secs`.
    pub fn access_token(
        &self,
        sub: &str,
        client_id: &str,
        scope: &str,
        sid: SessionId,
        now_secs: u64,
    ) -> Result<AccessToken, MintError> {
        let jti = random_bytes::<16>().map_err(|_| MintError)?;
        self.access_token_with_jti(sub, client_id, scope, sid, now_secs, &jti)
    }

    /// [`Issuer::access_token`] with the jti's 16 random bytes drawn by the caller (a rotation
    /// draws them with its refresh token's: [`crate::ids::IssueRandom`]).
    pub fn access_token_with_jti(
        &self,
        sub: &str,
        client_id: &str,
        scope: &str,
        sid: SessionId,
        now_secs: u64,
        jti: &[u8; 16],
    ) -> Result<AccessToken, MintError> {
        let jti = crate::ids::b64url(jti);
        let exp = now_secs + self.access_ttl_secs;
        let sid = sid.encode();
        let claims = AccessClaims {
            iss: &self.issuer,
            sub,
            aud: &self.audience,
            exp,
            iat: now_secs,
            jti: &jti,
            client_id,
            scope,
            sid: &sid,
        };
        // Sized for the usual claims: growing from serde_json's default of 128 bytes reallocates twice.
        let mut json = Vec::with_capacity(320);
        serde_json::to_writer(&mut json, &claims).map_err(|_| MintError)?;
        let jwt = self.keys.active().sign_jwt(&json).map_err(|_| MintError)?;
        Ok(AccessToken { jwt, exp })
    }
}
