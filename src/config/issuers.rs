//! `[[issuers]]`: identity providers whose access tokens the gateway enforces next to its own, and
//! `routes[].issuers`, which narrows the issuers a route accepts.
//!
//! ```toml
//! [[issuers]]
//! issuer = "https://idp.example.com/realms/main"        # the exact `iss`
//! jwks_uri = "https://idp.example.com/realms/main/protocol/openid-connect/certs"
//! audiences = ["orders-api"]                            # `aud` must contain one
//! algorithms = ["RS256", "ES256"]                       # asymmetric only (the default)
//! ```

use std::collections::HashSet;
use std::path::PathBuf;
use std::time::Duration;

use super::signing::SigningAlg;
use super::{Checker, file::IssuerFile, read_certs};

/// The name `routes[].issuers` uses for the gateway's own issuer.
pub const SELF_ISSUER: &str = "self";

/// Bit 0 of a route's issuer mask is our own issuer, so at most 63 others.
pub const MAX_ISSUERS: usize = 63;

pub const DEFAULT_MIN_REFETCH_INTERVAL: Duration = Duration::from_secs(5);

/// Where an issuer's tokens carry their scopes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ScopeClaim {
    /// `scope`: RFC 9068 §2.2.3 (a space-separated string; an array is accepted too).
    Scope,
    /// `scp`: Entra ID, Okta (an array, or a space-separated string).
    Scp,
}

impl ScopeClaim {
    pub fn name(self) -> &'static str {
        match self {
            ScopeClaim::Scope => "scope",
            ScopeClaim::Scp => "scp",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IssuerSettings {
    /// The exact `iss` its tokens carry.
    pub issuer: String,
    pub jwks_uri: http::Uri,
    /// Trust anchors for an https `jwks_uri` instead of the system roots.
    pub ca_file: Option<PathBuf>,
    /// `aud` must contain one of these.
    pub audiences: Vec<String>,
    /// The algorithms its tokens may use (asymmetric only).
    pub algorithms: Vec<SigningAlg>,
    /// Accepted `typ` header values, lower-case, without an `application/` prefix.
    pub token_types: Vec<String>,
    pub scope_claim: ScopeClaim,
    /// An unknown `kid` refetches the JWKS at most this often.
    pub min_refetch_interval: Duration,
}

impl IssuerSettings {
    /// Whether the keys fetched for `self` are the keys `other` would fetch, so a reload can keep
    /// the resolver (and its cached keys).
    pub fn same_keys(&self, other: &IssuerSettings) -> bool {
        self.issuer == other.issuer
            && self.jwks_uri == other.jwks_uri
            && self.ca_file == other.ca_file
            && self.min_refetch_interval == other.min_refetch_interval
    }

    /// Keys travel without TLS (a WARN at start says so).
    pub fn plain_http(&self) -> bool {
        self.jwks_uri.scheme_str() == Some("http")
    }
}

fn parse_jwks_uri(raw: &str) -> Result<http::Uri, String> {
    let bad = || format!("{raw:?} is not an http:// or https:// URL");
    let uri: http::Uri = raw.parse().map_err(|_| bad())?;
    if !matches!(uri.scheme_str(), Some("http" | "https")) {
        return Err(bad());
    }
    let authority = uri.authority().ok_or_else(bad)?;
    if authority.as_str().contains('@') {
        return Err(format!("{raw:?} must not carry credentials"));
    }
    if authority.host().is_empty() {
        return Err(bad());
    }
    Ok(uri)
}

/// Validates `[[issuers]]`; `own_issuer` is `tokens.issuer`.
pub(super) fn issuers(c: &mut Checker<'_>, files: &[IssuerFile], own_issuer: &str) -> Vec<IssuerSettings> {
    if files.len() > MAX_ISSUERS {
        c.fail("issuers", format!("at most {MAX_ISSUERS} issuers"));
    }
    let mut seen = HashSet::new();
    let mut out = Vec::new();
    for (i, f) in files.iter().enumerate() {
        let key = format!("issuers[{i}]");
        if f.issuer.trim().is_empty() {
            c.fail(format!("{key}.issuer"), "must not be empty");
        } else if f.issuer == own_issuer {
            c.fail(
                format!("{key}.issuer"),
                "is tokens.issuer: the gateway's own tokens need no [[issuers]] entry",
            );
        } else if f.issuer == SELF_ISSUER {
            c.fail(
                format!("{key}.issuer"),
                "\"self\" names the gateway's own issuer in routes[].issuers",
            );
        } else if !seen.insert(f.issuer.as_str()) {
            c.fail(format!("{key}.issuer"), format!("{:?} is defined twice", f.issuer));
        }
        let jwks_uri = match parse_jwks_uri(&f.jwks_uri) {
            Ok(u) => Some(u),
            Err(reason) => {
                c.fail(format!("{key}.jwks_uri"), reason);
                None
            }
        };
        let ca_file = f.ca_file.as_ref().map(|p| c.path(p));
        if let Some(path) = &ca_file {
            if jwks_uri.as_ref().is_some_and(|u| u.scheme_str() != Some("https")) {
                c.fail(format!("{key}.ca_file"), "only applies to an https:// jwks_uri");
            } else if let Err(reason) = read_certs(path) {
                c.fail(format!("{key}.ca_file"), reason);
            }
        }
        if f.audiences.is_empty() {
            c.fail(format!("{key}.audiences"), "must list at least one audience");
        }
        for (j, a) in f.audiences.iter().enumerate() {
            if a.trim().is_empty() {
                c.fail(format!("{key}.audiences[{j}]"), "must not be empty");
            }
        }
        let algorithms = match &f.algorithms {
            None => vec![SigningAlg::RS256, SigningAlg::ES256],
            Some(list) => {
                if list.is_empty() {
                    c.fail(format!("{key}.algorithms"), "must list at least one algorithm");
                }
                let mut algs = Vec::new();
                for (j, name) in list.iter().enumerate() {
                    match SigningAlg::parse(name) {
                        Some(a) if a.is_hmac() => c.fail(
                            format!("{key}.algorithms[{j}]"),
                            format!(
                                "{name:?} is never accepted from another issuer: its public key would become the HMAC secret"
                            ),
                        ),
                        Some(a) => algs.push(a),
                        None => c.fail(
                            format!("{key}.algorithms[{j}]"),
                            format!("{name:?} is not a JWS algorithm (RS256, RS384, RS512, PS256, PS384, PS512, ES256, ES384, EdDSA)"),
                        ),
                    }
                }
                algs
            }
        };
        let token_types = match &f.token_types {
            None => vec!["at+jwt".to_owned()],
            Some(list) => {
                if list.is_empty() {
                    c.fail(
                        format!("{key}.token_types"),
                        "must list at least one type (e.g. \"at+jwt\")",
                    );
                }
                list.iter().map(|t| normalize_typ(t)).collect()
            }
        };
        for (j, t) in token_types.iter().enumerate() {
            if t.is_empty() || !t.bytes().all(|b| b.is_ascii_graphic()) {
                c.fail(format!("{key}.token_types[{j}]"), "is not a media type");
            }
        }
        let scope_claim = match f.scope_claim.as_deref().unwrap_or("scope") {
            "scope" => ScopeClaim::Scope,
            "scp" => ScopeClaim::Scp,
            other => {
                c.fail(
                    format!("{key}.scope_claim"),
                    format!("{other:?} is not \"scope\" or \"scp\""),
                );
                ScopeClaim::Scope
            }
        };
        let min_refetch_interval = c.duration(
            &format!("{key}.min_refetch_interval"),
            f.min_refetch_interval.as_deref(),
            DEFAULT_MIN_REFETCH_INTERVAL,
        );
        if min_refetch_interval < Duration::from_secs(1) {
            c.fail(
                format!("{key}.min_refetch_interval"),
                "must be at least 1s (every token with an invented kid could otherwise cost a fetch)",
            );
        }
        if let Some(jwks_uri) = jwks_uri {
            out.push(IssuerSettings {
                issuer: f.issuer.clone(),
                jwks_uri,
                ca_file,
                audiences: f.audiences.clone(),
                algorithms,
                token_types,
                scope_claim,
                min_refetch_interval,
            });
        }
    }
    out
}

/// `typ` is compared case-insensitively, and `application/at+jwt` is `at+jwt` (RFC 7515 §4.1.9).
pub fn normalize_typ(typ: &str) -> String {
    let t = typ.trim().to_ascii_lowercase();
    match t.strip_prefix("application/") {
        Some(rest) => rest.to_owned(),
        None => t,
    }
}

/// Validates `routes[i].issuers`: "self" or a configured issuer, each once.
pub(super) fn route_issuers(
    c: &mut Checker<'_>,
    key: &str,
    list: Option<&Vec<String>>,
    issuers: &[IssuerSettings],
) -> Option<Vec<String>> {
    let list = list?;
    if list.is_empty() {
        c.fail(key, "must name at least one issuer (\"self\" or an [[issuers]] issuer)");
    }
    let mut seen = HashSet::new();
    for (j, name) in list.iter().enumerate() {
        if name != SELF_ISSUER && !issuers.iter().any(|i| &i.issuer == name) {
            c.fail(
                format!("{key}[{j}]"),
                format!("{name:?} is neither \"self\" nor the issuer of an [[issuers]] entry"),
            );
        } else if !seen.insert(name.as_str()) {
            c.fail(format!("{key}[{j}]"), format!("{name:?} is listed twice"));
        }
    }
    Some(list.clone())
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use crate::config::{Config, ScopeClaim, SigningAlg};

    fn load(rest: &str) -> Result<Config, Vec<String>> {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("secret"), "0123456789abcdef0123456789abcdef").unwrap();
        let text = format!(
            "[server]\nlisten = \"127.0.0.1:0\"\n[tokens]\nissuer = \"https://gw.test\"\naudience = \"api\"\n\
             signing = {{ secret = \"file:secret\" }}\n{rest}\n"
        );
        Config::from_toml(&text, dir.path(), "t.toml").map_err(|e| e.problems.iter().map(|p| p.to_string()).collect())
    }

    const IDP: &str =
        "[[issuers]]\nissuer = \"https://idp.test\"\njwks_uri = \"https://idp.test/certs\"\naudiences = [\"api\"]\n";

    #[test]
    fn an_issuer_gets_the_documented_defaults() {
        let c = load(IDP).unwrap();
        let i = &c.issuers[0];
        assert_eq!(i.algorithms, vec![SigningAlg::RS256, SigningAlg::ES256]);
        assert_eq!(i.token_types, vec!["at+jwt"]);
        assert_eq!(i.scope_claim, ScopeClaim::Scope);
        assert_eq!(i.min_refetch_interval, Duration::from_secs(5));
        let c = load(&format!(
            "{IDP}token_types = [\"application/AT+JWT\", \"JWT\"]\nscope_claim = \"scp\"\n"
        ))
        .unwrap();
        assert_eq!(c.issuers[0].token_types, vec!["at+jwt", "jwt"]);
    }

    #[test]
    fn issuer_settings_are_checked() {
        let p = load(
            "[[issuers]]\nissuer = \"https://gw.test\"\njwks_uri = \"ftp://x\"\naudiences = []\n\
             algorithms = [\"HS256\", \"RS1\"]\nscope_claim = \"roles\"\nmin_refetch_interval = \"100ms\"\n\
             [[issuers]]\nissuer = \"https://idp.test\"\njwks_uri = \"http://idp.test/certs\"\naudiences = [\"api\"]\n\
             ca_file = \"ca.pem\"\n\
             [[issuers]]\nissuer = \"https://idp.test\"\njwks_uri = \"https://u:p@idp.test/certs\"\naudiences = [\"api\"]\n",
        )
        .unwrap_err();
        for expected in [
            "issuers[0].issuer: is tokens.issuer",
            "issuers[0].jwks_uri: \"ftp://x\" is not an http:// or https:// URL",
            "issuers[0].audiences: must list at least one audience",
            "issuers[0].algorithms[0]: \"HS256\" is never accepted from another issuer",
            "issuers[0].algorithms[1]: \"RS1\" is not a JWS algorithm",
            "issuers[0].scope_claim: \"roles\" is not",
            "issuers[0].min_refetch_interval: must be at least 1s",
            "issuers[1].ca_file: only applies to an https:// jwks_uri",
            "issuers[2].issuer: \"https://idp.test\" is defined twice",
            "issuers[2].jwks_uri: \"https://u:p@idp.test/certs\" must not carry credentials",
        ] {
            assert!(p.iter().any(|m| m.starts_with(expected)), "{expected:?} not in {p:?}");
        }
    }

    #[test]
    fn route_issuers_name_self_or_a_configured_issuer() {
        let route = |issuers: &str, auth: &str| {
            format!(
                "{IDP}[[routes]]\npath_prefix = \"/a\"\nupstream = \"echo\"\nauth = \"{auth}\"\nissuers = {issuers}\n"
            )
        };
        let c = load(&route("[\"self\", \"https://idp.test\"]", "required")).unwrap();
        assert_eq!(c.routes[0].issuers.as_deref().unwrap(), ["self", "https://idp.test"]);
        for (issuers, auth, expected) in [
            (
                "[\"https://other.test\"]",
                "required",
                "routes[0].issuers[0]: \"https://other.test\" is neither",
            ),
            (
                "[\"self\", \"self\"]",
                "required",
                "routes[0].issuers[1]: \"self\" is listed twice",
            ),
            ("[]", "required", "routes[0].issuers: must name at least one issuer"),
            ("[\"self\"]", "none", "routes[0].issuers: a route with auth = \"none\""),
        ] {
            let p = load(&route(issuers, auth)).unwrap_err();
            assert!(p.iter().any(|m| m.starts_with(expected)), "{expected:?} not in {p:?}");
        }
    }
}
