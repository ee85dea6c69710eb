//! RFC 6750 §2.1: the bearer token comes from the Authorization header only (never the query or a
//! form body, which end up in logs and caches).

use http::HeaderMap;
use http::header::AUTHORIZATION;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BearerError {
    /// More than one Authorization header: which one would the upstream believe?
    Repeated,
    /// `Bearer` with no token, or a token outside the b64token alphabet.
    Malformed,
}

/// The bearer token of a request, before its last two checks (no space inside, UTF-8): the bytes
/// a cache of accepted tokens can be asked about first. `Ok(None)` when there is no
/// Authorization header or it uses another scheme (RFC 6750 §3.1: then the error response
/// carries no error code). A token the cache holds passed both checks, and a value that fails
/// either is not in it, so the hot path skips them on a hit; [`token_str`] finishes the parse on a
/// miss.
pub fn bearer_bytes(headers: &HeaderMap) -> Result<Option<&[u8]>, BearerError> {
    let mut values = headers.get_all(AUTHORIZATION).iter();
    let Some(value) = values.next() else {
        return Ok(None);
    };
    if values.next().is_some() {
        return Err(BearerError::Repeated);
    }
    split_bearer(value.as_bytes())
}

/// Parses one Authorization value: `Bearer 1*SP token`, the scheme case-insensitive. The token's
/// alphabet (b64token) is checked separately by [`is_b64token`], only for tokens the validator
/// has not already accepted: a cache hit is byte-identical to a token that passed the check.
pub fn parse_bearer(value: &[u8]) -> Result<Option<&str>, BearerError> {
    split_bearer(value)?.map(token_str).transpose()
}

/// The scheme and the spaces around the token: the token bytes, not empty.
fn split_bearer(value: &[u8]) -> Result<Option<&[u8]>, BearerError> {
    const SCHEME: &[u8] = b"bearer";
    if value.len() < SCHEME.len() || !value[..SCHEME.len()].eq_ignore_ascii_case(SCHEME) {
        return Ok(None);
    }
    let rest = &value[SCHEME.len()..];
    if rest.is_empty() {
        return Err(BearerError::Malformed);
    }
    if rest[0] != b' ' {
        // "Bearerx ..." is another scheme.
        return Ok(None);
    }
    let token = trim_spaces(rest);
    if token.is_empty() {
        return Err(BearerError::Malformed);
    }
    Ok(Some(token))
}

/// The token of [`bearer_bytes`] as text: one word, no space inside.
pub fn token_str(token: &[u8]) -> Result<&str, BearerError> {
    if token.contains(&b' ') {
        return Err(BearerError::Malformed);
    }
    // b64token is ASCII, so this cannot fail for a token that will pass; stay panic-free anyway.
    std::str::from_utf8(token).map_err(|_| BearerError::Malformed)
}

fn trim_spaces(mut b: &[u8]) -> &[u8] {
    while let [b' ', rest @ ..] = b {
        b = rest;
    }
    while let [rest @ .., b' '] = b {
        b = rest;
    }
    b
}

/// The b64token alphabet as a table: this runs over every byte of every token on every request.
static B64TOKEN: [bool; 256] = {
    let mut t = [false; 256];
    let mut b = 0;
    while b < 256 {
        let c = b as u8;
        t[b] = c.is_ascii_alphanumeric() || matches!(c, b'-' | b'.' | b'_' | b'~' | b'+' | b'/');
        b += 1;
    }
    t
};

/// `b64token = 1*( ALPHA / DIGIT / "-" / "." / "_" / "~" / "+" / "/" ) *"="`
pub fn is_b64token(t: &[u8]) -> bool {
    let body_end = t.iter().rposition(|&b| b != b'=').map_or(0, |i| i + 1);
    body_end > 0 && t[..body_end].iter().fold(true, |ok, &b| ok & B64TOKEN[b as usize])
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::HeaderValue;

    #[test]
    fn scheme_is_case_insensitive() {
        assert_eq!(parse_bearer(b"Bearer abc.def.ghi"), Ok(Some("abc.def.ghi")));
        assert_eq!(parse_bearer(b"bEaReR   abc"), Ok(Some("abc")));
    }

    #[test]
    fn other_schemes_are_no_token() {
        assert_eq!(parse_bearer(b"Basic dXNlcjpwYXNz"), Ok(None));
        assert_eq!(parse_bearer(b"Bearerx abc"), Ok(None));
        assert_eq!(parse_bearer(b""), Ok(None));
    }

    #[test]
    fn malformed_bearer_values() {
        assert_eq!(parse_bearer(b"Bearer"), Err(BearerError::Malformed));
        assert_eq!(parse_bearer(b"Bearer "), Err(BearerError::Malformed));
        assert_eq!(parse_bearer(b"Bearer a b"), Err(BearerError::Malformed));
        assert_eq!(parse_bearer(b"Bearer abc=="), Ok(Some("abc==")));
    }

    #[test]
    fn b64token_alphabet() {
        assert!(is_b64token(b"abc.DEF-_~+/=="));
        assert!(!is_b64token(b"==="));
        assert!(!is_b64token(b"abc\""));
        assert!(!is_b64token(b"a=b"));
        assert!(!is_b64token(b""));
    }

    proptest::proptest! {
        #[test]
        fn bearer_parsing_never_panics(value in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..200)) {
            if let Ok(Some(t)) = parse_bearer(&value) {
                proptest::prop_assert!(!t.is_empty() && !t.contains(' '));
            }
            let _ = is_b64token(&value);
        }
    }

    proptest::proptest! {
        /// What lets a cache hit skip [`token_str`]: whatever the validator accepts (and so
        /// caches) passes it, so a value it refuses can never be a hit.
        #[test]
        fn a_b64token_always_passes_token_str(value in "[A-Za-z0-9._~+/ =\"-]{0,40}") {
            if is_b64token(value.as_bytes()) {
                proptest::prop_assert_eq!(token_str(value.as_bytes()), Ok(value.as_str()));
            }
        }
    }

    #[test]
    fn two_authorization_headers_are_refused() {
        let mut h = HeaderMap::new();
        h.append(AUTHORIZATION, HeaderValue::from_static("Bearer a"));
        h.append(AUTHORIZATION, HeaderValue::from_static("Bearer b"));
        assert_eq!(bearer_bytes(&h), Err(BearerError::Repeated));
        assert_eq!(bearer_bytes(&HeaderMap::new()), Ok(None));
    }
}
