//! RFC 8414 authorization server metadata, rendered once per Snapshot: what a client library needs
//! to configure itself against this gateway (endpoints, the JWKS, grants, authentication methods,
//! scopes). Every URL is absolute, built from `tokens.issuer`, the gateway's public base URL.

use bytes::Bytes;
use serde::Serialize;

use crate::config::{Config, GrantType, JWKS_PATH};
use crate::scope::ScopeSet;

#[derive(Serialize)]
struct Metadata<'a> {
    issuer: &'a str,
    token_endpoint: String,
    revocation_endpoint: String,
    introspection_endpoint: String,
    jwks_uri: String,
    grant_types_supported: Vec<&'static str>,
    token_endpoint_auth_methods_supported: Vec<&'static str>,
    revocation_endpoint_auth_methods_supported: Vec<&'static str>,
    /// RFC 7662 §2.1: the introspecting party is always a confidential client.
    introspection_endpoint_auth_methods_supported: [&'static str; 2],
    scopes_supported: Vec<&'a str>,
    /// REQUIRED by RFC 8414; empty: there is no authorization endpoint (password, refresh and
    /// client-credentials grants only).
    response_types_supported: [&'static str; 0],
}

fn grant_name(g: GrantType) -> &'static str {
    match g {
        GrantType::Password => "password",
        GrantType::RefreshToken => "refresh_token",
        GrantType::ClientCredentials => "client_credentials",
    }
}

/// The metadata document, newline-terminated.
pub fn metadata(config: &Config) -> Bytes {
    let t = &config.tokens;
    let base = t.issuer.trim_end_matches('/');
    let url = |path: &str| format!("{base}{path}");
    // The grants some client may use, in a fixed order.
    let grants: Vec<&'static str> = [
        GrantType::Password,
        GrantType::RefreshToken,
        GrantType::ClientCredentials,
    ]
    .into_iter()
    .filter(|g| config.clients.iter().any(|c| c.grants.contains(g)))
    .map(grant_name)
    .collect();
    let mut auth_methods = vec!["client_secret_basic", "client_secret_post"];
    if config.clients.iter().any(|c| c.secret_sha256.is_none()) {
        // Public clients identify themselves with client_id alone.
        auth_methods.push("none");
    }
    let all_scopes = config.scopes.render(ScopeSet(u64::MAX));
    let doc = Metadata {
        issuer: &t.issuer,
        token_endpoint: url(&t.token_path),
        revocation_endpoint: url(&t.revoke_path),
        introspection_endpoint: url(&t.introspect_path),
        jwks_uri: url(JWKS_PATH),
        grant_types_supported: grants,
        token_endpoint_auth_methods_supported: auth_methods.clone(),
        revocation_endpoint_auth_methods_supported: auth_methods,
        introspection_endpoint_auth_methods_supported: ["client_secret_basic", "client_secret_post"],
        scopes_supported: all_scopes.split(' ').filter(|s| !s.is_empty()).collect(),
        response_types_supported: [],
    };
    let mut body = serde_json::to_vec_pretty(&doc).unwrap_or_default();
    body.push(b'\n');
    Bytes::from(body)
}
