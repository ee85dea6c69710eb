//! Minting access tokens: RFC 9068 JWTs, signed by the active key of the Snapshot's
//! [`KeySet`], whose `kid` they carry. (Refresh tokens are minted in [`crate::ids`].)

use std::sync::Arc;

#[cfg(test)]
use serde::Serialize;

use crate::config::TokenSettings;
use crate::ids::SessionId;
use crate::keys::KeySet;

/// The claims of an RFC 9068 access token, as [`claims_json`] writes them (serde_json is the
/// reference its test compares with).
#[cfg_attr(test, derive(Serialize))]
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

    /// Signs an access token issued at `now_secs`, its jti made of 16 random bytes the caller drew
    /// (a rotation draws them with its refresh token's: [`crate::ids::IssueRandom`]).
    pub fn access_token(
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
        let json = claims_json(&claims);
        let jwt = self.keys.active().sign_jwt(&json).map_err(|_| MintError)?;
        Ok(AccessToken { jwt, exp })
    }
}

/// The claims as compact JSON, byte for byte what serde_json writes for [`AccessClaims`] (the
/// field order is the struct's), without its per-byte escaping of strings that need none.
fn claims_json(c: &AccessClaims<'_>) -> Vec<u8> {
    use crate::oauth::push_json_str;
    use std::io::Write;
    // Each member's separator and name, then its value; exp and iat sit between the strings.
    let before: [(&[u8], &str); 3] = [(b"{\"iss\":", c.iss), (b",\"sub\":", c.sub), (b",\"aud\":", c.aud)];
    let after: [(&[u8], &str); 4] = [
        (b",\"jti\":", c.jti),
        (b",\"client_id\":", c.client_id),
        (b",\"scope\":", c.scope),
        (b",\"sid\":", c.sid),
    ];
    let len = before
        .iter()
        .chain(&after)
        .map(|(k, v)| k.len() + v.len())
        .sum::<usize>();
    let mut out = Vec::with_capacity(len + 64);
    for (key, value) in before {
        out.extend_from_slice(key);
        push_json_str(&mut out, value);
    }
    // Writing into a Vec cannot fail.
    let _ = write!(out, ",\"exp\":{},\"iat\":{}", c.exp, c.iat);
    for (key, value) in after {
        out.extend_from_slice(key);
        push_json_str(&mut out, value);
    }
    out.push(b'}');
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn claims<'a>(strings: &'a [String; 7], exp: u64, iat: u64) -> AccessClaims<'a> {
        AccessClaims {
            iss: &strings[0],
            sub: &strings[1],
            aud: &strings[2],
            exp,
            iat,
            jti: &strings[3],
            client_id: &strings[4],
            scope: &strings[5],
            sid: &strings[6],
        }
    }

    #[test]
    fn claims_are_the_json_serde_writes() {
        let strings = [
            "https://auth.example.com",
            "ann",
            "orders-api",
            "qL0b5mD9aUPmMpmUUfgYxw",
            "web",
            "orders:read orders:write",
            "AAECAwQFBgc",
        ]
        .map(String::from);
        let c = claims(&strings, 1_800_000_900, 1_800_000_000);
        assert_eq!(claims_json(&c), serde_json::to_vec(&c).unwrap());
    }

    proptest! {
        /// Any subject, client or scope (quotes, backslashes, control characters, non-ASCII).
        #[test]
        fn claims_escape_what_json_needs(strings in proptest::array::uniform7("\\PC{0,24}|[\\x00-\\x7f]{0,24}"), exp in any::<u64>(), iat in any::<u64>()) {
            let c = claims(&strings, exp, iat);
            prop_assert_eq!(claims_json(&c), serde_json::to_vec(&c).unwrap());
        }
    }
}
