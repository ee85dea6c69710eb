//! Minting credentials: RFC 9068 access tokens (JWT) and opaque refresh tokens.

use aws_lc_rs::digest;
use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use jsonwebtoken::{EncodingKey, Header};
use serde::Serialize;

use crate::config::TokenSettings;

/// A refresh token's registry key: SHA-256 of the token text. The token itself is never stored.
pub type TokenDigest = [u8; 32];

pub fn digest_of(token: &str) -> TokenDigest {
    let d = digest::digest(&digest::SHA256, token.as_bytes());
    let mut out = [0u8; 32];
    out.copy_from_slice(d.as_ref());
    out
}

/// Fills `buf` from the operating system's generator.
pub fn random_bytes<const N: usize>() -> Result<[u8; N], aws_lc_rs::error::Unspecified> {
    let mut buf = [0u8; N];
    aws_lc_rs::rand::fill(&mut buf)?;
    Ok(buf)
}

/// A fresh refresh token: 32 random bytes, base64url (43 characters).
pub fn mint_refresh_token() -> Result<(String, TokenDigest), aws_lc_rs::error::Unspecified> {
    let token = URL_SAFE_NO_PAD.encode(random_bytes::<32>()?);
    let digest = digest_of(&token);
    Ok((token, digest))
}

/// Session ids are 64-bit, written as 11 base64url characters in `sid`.
pub fn sid_to_string(sid: u64) -> String {
    URL_SAFE_NO_PAD.encode(sid.to_be_bytes())
}

pub fn sid_from_str(s: &str) -> Option<u64> {
    let bytes = URL_SAFE_NO_PAD.decode(s).ok()?;
    Some(u64::from_be_bytes(bytes.try_into().ok()?))
}

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
        sid: &str,
        now_secs: u64,
    ) -> Result<AccessToken, MintError> {
        let jti = URL_SAFE_NO_PAD.encode(random_bytes::<16>().map_err(|_| MintError)?);
        let exp = now_secs + self.access_ttl_secs;
        let claims = AccessClaims {
            iss: &self.issuer,
            sub,
            aud: &self.audience,
            exp,
            iat: now_secs,
            jti: &jti,
            client_id,
            scope,
            sid,
        };
        let jwt = jsonwebtoken::encode(&self.header, &claims, &self.key).map_err(|_| MintError)?;
        Ok(AccessToken { jwt, exp })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refresh_tokens_are_32_random_bytes_in_base64url() {
        let (a, da) = mint_refresh_token().unwrap();
        let (b, _) = mint_refresh_token().unwrap();
        assert_eq!(a.len(), 43);
        assert_ne!(a, b);
        assert_eq!(URL_SAFE_NO_PAD.decode(&a).unwrap().len(), 32);
        assert_eq!(da, digest_of(&a));
    }

    #[test]
    fn sid_round_trips() {
        for sid in [0, 1, u64::MAX, 0x0123_4567_89ab_cdef] {
            assert_eq!(sid_from_str(&sid_to_string(sid)), Some(sid));
        }
        assert_eq!(sid_from_str("not a sid"), None);
        assert_eq!(sid_from_str("AAAA"), None);
    }
}
