//! Identities that state refers to, with one encoding each.
//!
//! A session (a refresh-token family) is a [`SessionId`]: 64 random bits, written as 11 base64url
//! characters wherever it appears as text (the `sid` claim, `X-Auth-Session`, logs, the stores).
//! Users, clients and scopes are referred to by name (username, client id, scope names), never by
//! their position in a config, so that state survives a reordered or reloaded config.
//!
//! A refresh token is `base64url(sid ‖ 24 random bytes)`: 43 characters. The session is read from
//! the token itself, so reuse state lives on the session (one record per session, as Keycloak keeps
//! it) rather than one record per token ever issued (Hydra's 18 GB tables, ory/hydra#1574). Only a
//! SHA-256 digest of a token is ever stored; the random part makes the token unguessable even for
//! someone who knows its session id.

use std::fmt;

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;

use crate::crypto::{Digest, RandomError, random_bytes, sha256};

#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SessionId(pub u64);

impl SessionId {
    pub fn random() -> Result<SessionId, RandomError> {
        Ok(SessionId(u64::from_be_bytes(random_bytes::<8>()?)))
    }

    /// The one text form: base64url of the big-endian bytes, 11 characters.
    pub fn encode(self) -> String {
        b64url(&self.0.to_be_bytes())
    }

    pub fn parse(s: &str) -> Option<SessionId> {
        if s.len() != 11 {
            return None;
        }
        let mut out = [0u8; 8];
        // The engine refuses stray bits in the last character, so one id has one spelling.
        let n = URL_SAFE_NO_PAD.decode_slice(s, &mut out).ok()?;
        (n == 8).then_some(SessionId(u64::from_be_bytes(out)))
    }
}

impl fmt::Display for SessionId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.encode())
    }
}

impl fmt::Debug for SessionId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "SessionId({})", self.encode())
    }
}

/// Length of a refresh token's text.
pub const REFRESH_TOKEN_LEN: usize = 43;

/// A freshly minted refresh token: the text goes to the client once, the digest is what is kept.
pub struct MintedRefreshToken {
    pub token: String,
    pub digest: Digest,
}

/// Appends base64url without padding of `bytes` to `out`, encoded in place (the room for it
/// zero-filled first, which is cheap). For ids and tokens this beats `Engine::encode`, which zeroes
/// a heap buffer through calloc first; for a JWT's claims and signature `encode_string`, whose
/// chunked encoder clears a 1 KiB stack buffer per call. (Encoding 48 bytes at a time through a
/// small stack buffer cost more: the engine's per-call work, seven times for a token's claims.)
pub fn extend_b64url(out: &mut Vec<u8>, bytes: &[u8]) {
    let start = out.len();
    let len = bytes.len() / 3 * 4 + [0, 2, 3][bytes.len() % 3];
    out.resize(start + len, 0);
    if URL_SAFE_NO_PAD.encode_slice(bytes, &mut out[start..]).is_err() {
        // Unreachable (the room is exactly the encoded length); never a panic on a request.
        out.truncate(start);
        out.extend_from_slice(URL_SAFE_NO_PAD.encode(bytes).as_bytes());
    }
}

/// base64url without padding, as a new string (see [`extend_b64url`]).
pub fn b64url(bytes: &[u8]) -> String {
    let mut out = Vec::with_capacity(bytes.len().div_ceil(3) * 4);
    extend_b64url(&mut out, bytes);
    // base64url is ASCII, so the conversion cannot fail.
    String::from_utf8(out).unwrap_or_default()
}

pub fn mint_refresh_token(sid: SessionId) -> Result<MintedRefreshToken, RandomError> {
    Ok(refresh_token_from(sid, &random_bytes::<24>()?))
}

/// The refresh token of session `sid` with the given random part.
pub fn refresh_token_from(sid: SessionId, random: &[u8; 24]) -> MintedRefreshToken {
    let mut raw = [0u8; 32];
    raw[..8].copy_from_slice(&sid.0.to_be_bytes());
    raw[8..].copy_from_slice(random);
    let token = b64url(&raw);
    let digest = sha256(token.as_bytes());
    MintedRefreshToken { token, digest }
}

/// The random parts of one rotation: the new refresh token's 24 bytes and the access token's jti,
/// drawn in one call. aws-lc's generator costs about the same per call for 16 bytes as for 40
/// (each call mixes in RDRAND and re-keys its DRBG), and a rotation used to make two calls, 2 %
/// of its CPU. Nothing is drawn ahead: these bytes serve the issuance that drew them.
pub struct IssueRandom {
    pub refresh: [u8; 24],
    pub jti: [u8; 16],
}

impl IssueRandom {
    pub fn draw() -> Result<IssueRandom, RandomError> {
        let bytes = random_bytes::<40>()?;
        let mut r = IssueRandom {
            refresh: [0; 24],
            jti: [0; 16],
        };
        r.refresh.copy_from_slice(&bytes[..24]);
        r.jti.copy_from_slice(&bytes[24..]);
        Ok(r)
    }
}

/// The session a presented refresh token names, and the token's digest; `None` if it cannot be
/// one of ours (wrong length or alphabet). Whether it is genuine is for the store to say.
pub fn parse_refresh_token(presented: &str) -> Option<(SessionId, Digest)> {
    if presented.len() != REFRESH_TOKEN_LEN {
        return None;
    }
    let mut raw = [0u8; 32];
    let n = URL_SAFE_NO_PAD.decode_slice(presented, &mut raw).ok()?;
    if n != 32 {
        return None;
    }
    let mut sid = [0u8; 8];
    sid.copy_from_slice(&raw[..8]);
    Some((SessionId(u64::from_be_bytes(sid)), sha256(presented.as_bytes())))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn b64url_is_base64url_without_padding_at_every_length() {
        let bytes: Vec<u8> = (0..=60u8).map(|b| b.wrapping_mul(97)).collect();
        for n in 0..=bytes.len() {
            assert_eq!(b64url(&bytes[..n]), URL_SAFE_NO_PAD.encode(&bytes[..n]), "{n} bytes");
        }
    }

    #[test]
    fn extended_b64url_is_base64url_without_padding_at_every_length() {
        let bytes: Vec<u8> = (0..=200u16).map(|b| (b as u8).wrapping_mul(89)).collect();
        for n in 0..=bytes.len() {
            let mut out = b"head.".to_vec();
            extend_b64url(&mut out, &bytes[..n]);
            let expected = format!("head.{}", URL_SAFE_NO_PAD.encode(&bytes[..n]));
            assert_eq!(out, expected.as_bytes(), "{n} bytes");
        }
    }

    #[test]
    fn session_ids_have_one_spelling() {
        for sid in [0, 1, u64::MAX, 0x0123_4567_89ab_cdef] {
            let s = SessionId(sid).encode();
            assert_eq!(s.len(), 11);
            assert_eq!(SessionId::parse(&s), Some(SessionId(sid)));
        }
        assert_eq!(SessionId::parse("not a sid"), None);
        assert_eq!(SessionId::parse("AAAA"), None);
        // "AAAAAAAAAAB" decodes to the same bytes as "AAAAAAAAAAA" with a stray low bit.
        assert_eq!(SessionId::parse("AAAAAAAAAAB"), None);
    }

    #[test]
    fn refresh_tokens_carry_their_session_and_32_bytes() {
        let sid = SessionId(0xfeed_beef_0000_0001);
        let a = mint_refresh_token(sid).unwrap();
        let b = mint_refresh_token(sid).unwrap();
        assert_eq!(a.token.len(), REFRESH_TOKEN_LEN);
        assert_ne!(a.token, b.token);
        assert_eq!(URL_SAFE_NO_PAD.decode(&a.token).unwrap().len(), 32);
        assert_eq!(parse_refresh_token(&a.token), Some((sid, a.digest)));
        assert_eq!(parse_refresh_token("short"), None);
        assert_eq!(parse_refresh_token(&"!".repeat(REFRESH_TOKEN_LEN)), None);
        let r = IssueRandom::draw().unwrap();
        let c = refresh_token_from(sid, &r.refresh);
        assert_eq!(URL_SAFE_NO_PAD.decode(&c.token).unwrap()[8..], r.refresh);
        assert_eq!(parse_refresh_token(&c.token), Some((sid, c.digest)));
        assert_ne!(r.refresh[..16], r.jti, "the two parts are different bytes of the draw");
        let again = IssueRandom::draw().unwrap();
        assert!(again.refresh != r.refresh && again.jti != r.jti, "each draw is fresh");
    }
}
