//! The authorization server: the token endpoint (login, refresh with rotation, client credentials),
//! RFC 7009 revocation, RFC 7662 introspection and RFC 8414 metadata. Protocol logic lives in the
//! submodules, which know nothing of sockets; `endpoint.rs` is the thin HTTP layer over them.

pub mod clients;
pub mod discovery;
pub mod endpoint;
pub mod error;
pub mod introspect;
pub mod issuer;
pub mod limiter;
pub mod password;
pub mod users;

pub use endpoint::OAuthServer;
pub use error::{ErrorCode, OAuthError};

#[cfg(test)]
pub(crate) mod suite;

/// `s` as a JSON string. Strings with nothing to escape (tokens, scope names) are copied as they
/// are; anything else goes through serde_json.
pub(crate) fn push_json_str(out: &mut Vec<u8>, s: &str) {
    // No early exit: the compiler turns the fold into vector compares (an `all` looked at one
    // byte at a time, ~8 instructions per byte of a 500-byte token).
    let plain = !s
        .bytes()
        .fold(false, |escape, b| escape | (b < 0x20) | (b == b'"') | (b == b'\\'));
    if plain {
        out.push(b'"');
        out.extend_from_slice(s.as_bytes());
        out.push(b'"');
    } else {
        // Serializing a string into a Vec cannot fail.
        let _ = serde_json::to_writer(&mut *out, s);
    }
}
