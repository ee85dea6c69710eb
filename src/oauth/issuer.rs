//! Minting access tokens: RFC 9068 JWTs. (Refresh tokens are minted in [`crate::ids`].)

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use jsonwebtoken::{EncodingKey, Header};
use serde::Serialize;

use crate::config::TokenSettings;
use crate::crypto::random_bytes;
use crate::ids::SessionId;

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
    key: EncodingKey,
    header: Header,
    issuer: String,
    audience: String,
    access_ttl_secs: u64,
}

#[derive(Debug, thiserror::Error)]
#[error("could not mint a token")]
pub struct MintError;

impl Issuer {
    pub fn new(tokens: &TokenSettings) -> Self {
        let mut header = Header::new(tokens.alg.jwt());
        header.typ = Some("at+jwt".to_owned());
        Issuer {
            key: EncodingKey::from_secret(tokens.secret.expose()),
            header,
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
        let jti = URL_SAFE_NO_PAD.encode(random_bytes::<16>().map_err(|_| MintError)?);
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
        let jwt = jsonwebtoken::encode(&self.header, &claims, &self.key).map_err(|_| MintError)?;
        Ok(AccessToken { jwt, exp })
    }
}
