//! OAuth clients and their authentication (RFC 6749 §2.3.1): HTTP Basic or client_secret_post for
//! confidential clients, client_id alone for public ones. Secrets are kept as SHA-256 digests and
//! compared in constant time.

use std::collections::HashMap;

use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use zeroize::Zeroizing;

use crate::config::{ClientSettings, GrantType};
use crate::crypto::sha256;
use crate::oauth::error::{ErrorCode, OAuthError};

/// Credentials as presented, before they are checked.
#[derive(Debug, Default)]
pub struct Presented<'a> {
    /// From `Authorization: Basic`: the client id and the secret (zeroed when dropped).
    pub basic: Option<(String, Zeroizing<String>)>,
    /// `client_id` and `client_secret` form parameters.
    pub form_id: Option<&'a str>,
    pub form_secret: Option<&'a str>,
}

/// Parses `Authorization: Basic` per RFC 6749 §2.3.1 (both parts form-urlencoded first).
/// `Ok(None)`: no Basic header. `Err`: a Basic header that cannot be read.
pub fn parse_basic(value: Option<&[u8]>) -> Result<Option<(String, Zeroizing<String>)>, OAuthError> {
    let Some(value) = value else { return Ok(None) };
    if value.len() < 6 || !value[..6].eq_ignore_ascii_case(b"basic ") {
        return Ok(None);
    }
    let bad = || OAuthError::Protocol {
        code: ErrorCode::InvalidClient,
        description: "malformed Basic credentials".into(),
        basic_challenge: true,
    };
    // Every copy of the secret is zeroed when dropped.
    let decoded = Zeroizing::new(STANDARD.decode(value[6..].trim_ascii()).map_err(|_| bad())?);
    let text = std::str::from_utf8(&decoded).map_err(|_| bad())?;
    let (id, secret) = text.split_once(':').ok_or_else(bad)?;
    let unescape = |s: &str| form_unescape(s).ok_or_else(bad);
    Ok(Some((unescape(id)?, Zeroizing::new(unescape(secret)?))))
}

/// Undoes `application/x-www-form-urlencoded` encoding of one value (`+` is a space, `%XX` a
/// byte); `None` for a malformed escape or a result that is not UTF-8.
fn form_unescape(s: &str) -> Option<String> {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        match b[i] {
            b'+' => out.push(b' '),
            b'%' => {
                let hex = s.get(i + 1..i + 3)?;
                out.push(u8::from_str_radix(hex, 16).ok()?);
                i += 2;
            }
            c => out.push(c),
        }
        i += 1;
    }
    String::from_utf8(out).ok()
}

pub struct ClientRegistry {
    by_id: HashMap<String, ClientSettings>,
}

impl ClientRegistry {
    pub fn new(clients: Vec<ClientSettings>) -> Self {
        let by_id = clients.into_iter().map(|c| (c.id.clone(), c)).collect();
        ClientRegistry { by_id }
    }

    pub fn get(&self, id: &str) -> Option<&ClientSettings> {
        self.by_id.get(id)
    }

    /// Authenticates the client of a token or revocation request.
    pub fn authenticate(&self, p: &Presented<'_>) -> Result<&ClientSettings, OAuthError> {
        let used_basic = p.basic.is_some();
        let fail = |description: &str| OAuthError::Protocol {
            code: ErrorCode::InvalidClient,
            description: description.into(),
            basic_challenge: used_basic,
        };
        let (id, secret) = match (&p.basic, p.form_id, p.form_secret) {
            (Some(_), _, Some(_)) => {
                return Err(OAuthError::invalid_request(
                    "use one client authentication method, not two",
                ));
            }
            (Some((bid, _)), Some(fid), None) if bid != fid => {
                return Err(OAuthError::invalid_request(
                    "client_id differs from the Basic credentials",
                ));
            }
            (Some((bid, bsecret)), _, None) => (bid.as_str(), Some(bsecret.as_str())),
            (None, Some(fid), secret) => (fid, secret),
            (None, None, _) => return Err(fail("client authentication is required")),
        };
        let Some(client) = self.by_id.get(id) else {
            return Err(fail("unknown client or bad credentials"));
        };
        match (&client.secret_sha256, secret) {
            (Some(expected), Some(secret)) => {
                if !crate::crypto::digest_eq(&sha256(secret.as_bytes()), expected) {
                    return Err(fail("unknown client or bad credentials"));
                }
            }
            (Some(_), None) => return Err(fail("this client must authenticate with its secret")),
            // A public client has no secret; presenting one is a misconfigured client.
            (None, Some(s)) if !s.is_empty() => {
                return Err(fail("unknown client or bad credentials"));
            }
            (None, _) => {}
        }
        Ok(client)
    }
}

impl ClientSettings {
    pub fn may_use(&self, grant: GrantType) -> bool {
        self.grants.contains(&grant)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::scope::ScopeSet;

    fn registry() -> ClientRegistry {
        ClientRegistry::new(vec![
            ClientSettings {
                id: "web".into(),
                secret_sha256: None,
                grants: vec![GrantType::Password],
                scopes: ScopeSet(1),
            },
            ClientSettings {
                id: "svc".into(),
                secret_sha256: Some(sha256(b"s3cret")),
                grants: vec![GrantType::ClientCredentials],
                scopes: ScopeSet(1),
            },
        ])
    }

    fn code(e: OAuthError) -> (ErrorCode, bool) {
        match e {
            OAuthError::Protocol {
                code, basic_challenge, ..
            } => (code, basic_challenge),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn public_and_confidential_clients() {
        let r = registry();
        let p = Presented {
            form_id: Some("web"),
            ..Default::default()
        };
        assert_eq!(r.authenticate(&p).unwrap().id, "web");
        let p = Presented {
            form_id: Some("svc"),
            form_secret: Some("s3cret"),
            ..Default::default()
        };
        assert_eq!(r.authenticate(&p).unwrap().id, "svc");
        let p = Presented {
            basic: Some(("svc".into(), String::from("s3cret").into())),
            ..Default::default()
        };
        assert_eq!(r.authenticate(&p).unwrap().id, "svc");
    }

    #[test]
    fn failures() {
        let r = registry();
        let p = Presented {
            basic: Some(("svc".into(), String::from("wrong").into())),
            ..Default::default()
        };
        assert_eq!(code(r.authenticate(&p).unwrap_err()), (ErrorCode::InvalidClient, true));
        let p = Presented {
            form_id: Some("svc"),
            ..Default::default()
        };
        assert_eq!(code(r.authenticate(&p).unwrap_err()), (ErrorCode::InvalidClient, false));
        let p = Presented {
            form_id: Some("nobody"),
            ..Default::default()
        };
        assert_eq!(code(r.authenticate(&p).unwrap_err()), (ErrorCode::InvalidClient, false));
        let p = Presented::default();
        assert_eq!(code(r.authenticate(&p).unwrap_err()), (ErrorCode::InvalidClient, false));
        let p = Presented {
            basic: Some(("svc".into(), String::from("s3cret").into())),
            form_secret: Some("s3cret"),
            ..Default::default()
        };
        assert_eq!(
            code(r.authenticate(&p).unwrap_err()),
            (ErrorCode::InvalidRequest, false)
        );
    }

    proptest::proptest! {
        #[test]
        fn basic_credentials_parsing_never_panics(value in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..200)) {
            let _ = parse_basic(Some(&value));
            let mut prefixed = b"Basic ".to_vec();
            prefixed.extend_from_slice(&value);
            let _ = parse_basic(Some(&prefixed));
        }

        #[test]
        fn basic_credentials_round_trip(id in "[ -~]{1,20}", secret in "[ -~]{0,20}") {
            let enc = |s: &str| form_urlencoded::byte_serialize(s.as_bytes()).collect::<String>();
            let v = format!("Basic {}", STANDARD.encode(format!("{}:{}", enc(&id), enc(&secret))));
            proptest::prop_assert_eq!(parse_basic(Some(v.as_bytes())).unwrap(), Some((id, secret.into())));
        }
    }

    #[test]
    fn basic_header_parsing() {
        let v = format!("Basic {}", STANDARD.encode("my%20id:p%3Ass"));
        assert_eq!(
            parse_basic(Some(v.as_bytes())).unwrap(),
            Some(("my id".into(), String::from("p:ss").into()))
        );
        assert_eq!(parse_basic(Some(b"Bearer x")).unwrap(), None);
        let raw_amp = format!("Basic {}", STANDARD.encode("svc:a&b=c+d"));
        assert_eq!(
            parse_basic(Some(raw_amp.as_bytes())).unwrap(),
            Some(("svc".into(), String::from("a&b=c d").into()))
        );
        let bad_escape = format!("Basic {}", STANDARD.encode("svc:%zz"));
        assert!(parse_basic(Some(bad_escape.as_bytes())).is_err());
        assert!(parse_basic(Some(b"Basic !!!")).is_err());
        let no_colon = format!("Basic {}", STANDARD.encode("nocolon"));
        assert!(parse_basic(Some(no_colon.as_bytes())).is_err());
    }
}
