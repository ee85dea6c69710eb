//! Our own keys: EdDSA and ES256 tokens that any JWT library verifies from the published JWKS,
//! rotation through `previous_keys`, a removed key refused at once, no private material ever
//! published; and the RFC 8414 metadata that points relying parties at all of it.

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use jsonwebtoken::jwk::JwkSet;
use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use serde_json::Value;
use tokengate::config::{Config, SigningAlg};

use crate::support::{self, Client, KeyFile, Proto, USER, json, login, refresh, repo, str_of};

const ORDERS: &str = "[[routes]]\npath_prefix = \"/api/orders\"\nupstream = \"echo\"\nscopes = [\"orders:read\"]\n";

fn header_of(jwt: &str) -> Value {
    json(&URL_SAFE_NO_PAD.decode(jwt.split('.').next().unwrap()).unwrap())
}

async fn jwks(c: &Client, gw: &support::TestGateway) -> (Value, JwkSet) {
    let r = c.get(&gw.url("/.well-known/jwks.json"), &[]).await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.header("cache-control"), "max-age=300");
    assert_eq!(r.header("content-type"), "application/json");
    assert!(r.body.ends_with(b"\n"));
    let raw = json(&r.body);
    let set: JwkSet = serde_json::from_slice(&r.body).expect("a JWKS jsonwebtoken reads");
    (raw, set)
}

/// Every member of the set is a public asymmetric key: no `d` (or other private member), no `oct`.
fn assert_public_only(raw: &Value) {
    for k in raw["keys"].as_array().unwrap() {
        for private in ["d", "p", "q", "dp", "dq", "qi", "k"] {
            assert!(k.get(private).is_none(), "private member {private} published: {k}");
        }
        assert_ne!(k["kty"], "oct", "a symmetric key published: {k}");
        assert_eq!(k["use"], "sig");
    }
}

/// Verifies `jwt` with the jsonwebtoken crate, from the JWKS alone.
fn verify_with_jwks(set: &JwkSet, jwt: &str, alg: Algorithm) -> Value {
    let kid = header_of(jwt)["kid"]
        .as_str()
        .expect("every token names its key")
        .to_owned();
    let jwk = set.find(&kid).unwrap_or_else(|| panic!("kid {kid} is not in the JWKS"));
    let key = DecodingKey::from_jwk(jwk).unwrap();
    let mut v = Validation::new(alg);
    v.set_audience(&["api"]);
    v.set_issuer(&["https://gw.test"]);
    jsonwebtoken::decode::<Value>(jwt, &key, &v)
        .unwrap_or_else(|e| panic!("jsonwebtoken refused the token: {e}"))
        .claims
}

#[tokio::test]
async fn eddsa_and_es256_tokens_verify_with_jsonwebtoken_from_the_published_jwks() {
    for (alg, jwt_alg) in [
        (SigningAlg::EdDSA, Algorithm::EdDSA),
        (SigningAlg::ES256, Algorithm::ES256),
    ] {
        let key = KeyFile::new(alg);
        let gw = support::start(&support::config_signed_with(&key.table(), "", ORDERS)).await;
        let c = Client::new(Proto::Http1);
        let l = login(&c, &gw, None).await;
        let at = str_of(&l, "access_token");
        let header = header_of(at);
        assert_eq!(header["alg"], alg.name());
        assert_eq!(header["typ"], "at+jwt");

        let (raw, set) = jwks(&c, &gw).await;
        assert_public_only(&raw);
        assert_eq!(set.keys.len(), 1);
        let claims = verify_with_jwks(&set, at, jwt_alg);
        assert_eq!(claims["sub"], USER);
        assert_eq!(claims["client_id"], "web");
        // The kid is the RFC 7638 thumbprint of the published key.
        let jwk = &raw["keys"][0];
        let canonical = match alg {
            SigningAlg::EdDSA => format!(r#"{{"crv":"Ed25519","kty":"OKP","x":{}}}"#, jwk["x"]),
            _ => format!(r#"{{"crv":"P-256","kty":"EC","x":{},"y":{}}}"#, jwk["x"], jwk["y"]),
        };
        let digest = aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, canonical.as_bytes());
        assert_eq!(header["kid"], URL_SAFE_NO_PAD.encode(digest.as_ref()));

        assert_eq!(c.get_with_token(&gw.url("/api/orders"), at).await.status, 200);
    }
}

#[tokio::test]
async fn hmac_keys_are_never_published() {
    let gw = support::start(&support::config_toml("", ORDERS)).await;
    let c = Client::new(Proto::Http2);
    let (raw, _) = jwks(&c, &gw).await;
    assert_eq!(raw, serde_json::json!({"keys": []}), "HS256: an empty set");
    let at = str_of(&login(&c, &gw, None).await, "access_token").to_owned();
    assert!(header_of(&at)["kid"].is_string(), "HS256 tokens name their key too");

    // An EdDSA key with the HS256 secret as a previous key: only the EdDSA key is published.
    let key = KeyFile::new(SigningAlg::EdDSA);
    let extra = format!("previous_keys = [{}]", support::hs256_table());
    let gw = support::start(&support::config_signed_with(&key.table(), &extra, ORDERS)).await;
    let (raw, _) = jwks(&c, &gw).await;
    assert_public_only(&raw);
    assert_eq!(raw["keys"].as_array().unwrap().len(), 1);
    assert_eq!(raw["keys"][0]["kty"], "OKP");
}

fn config(table: &str, previous: &[&KeyFile]) -> Config {
    let extra = if previous.is_empty() {
        String::new()
    } else {
        let tables: Vec<String> = previous.iter().map(|k| k.table()).collect();
        format!("previous_keys = [{}]", tables.join(", "))
    };
    Config::from_toml(
        &support::config_signed_with(table, &extra, ORDERS),
        &repo(),
        "test.toml",
    )
    .unwrap_or_else(|e| panic!("{e}"))
}

#[tokio::test]
async fn rotation_keeps_old_tokens_valid_signs_with_the_new_key_and_a_removed_key_stops_at_once() {
    let (a, b) = (KeyFile::new(SigningAlg::EdDSA), KeyFile::new(SigningAlg::ES256));
    let mut gw = support::start(&support::config_signed_with(&a.table(), "", ORDERS)).await;
    let c = Client::new(Proto::Http1);
    let l = login(&c, &gw, None).await;
    let old_at = str_of(&l, "access_token").to_owned();
    let old_kid = header_of(&old_at)["kid"].as_str().unwrap().to_owned();
    let orders = gw.url("/api/orders");
    assert_eq!(c.get_with_token(&orders, &old_at).await.status, 200);

    // Step 1: B signs, A is a previous key.
    gw.running().reload(config(&b.table(), &[&a])).unwrap();
    assert_eq!(
        c.get_with_token(&orders, &old_at).await.status,
        200,
        "a token of the previous key is still valid"
    );
    let (raw, set) = jwks(&c, &gw).await;
    assert_public_only(&raw);
    let kids: Vec<&str> = raw["keys"]
        .as_array()
        .unwrap()
        .iter()
        .map(|k| k["kid"].as_str().unwrap())
        .collect();
    assert_eq!(kids.len(), 2);
    assert_eq!(kids[1], old_kid, "the previous key stays published");
    let r = refresh(&c, &gw, str_of(&l, "refresh_token"), "web").await;
    assert_eq!(r.status, 200, "{}", r.text());
    let new_at = str_of(&json(&r.body), "access_token").to_owned();
    let header = header_of(&new_at);
    assert_eq!(header["alg"], "ES256");
    assert_eq!(header["kid"], kids[0], "new tokens carry the new key's kid");
    verify_with_jwks(&set, &new_at, Algorithm::ES256);
    verify_with_jwks(&set, &old_at, Algorithm::EdDSA);

    // Step 2: A is removed. Its tokens are refused from the next request on; B's are not.
    gw.running().reload(config(&b.table(), &[])).unwrap();
    let r = c.get_with_token(&orders, &old_at).await;
    assert_eq!(r.status, 401);
    assert!(
        r.header("www-authenticate").contains("signing key is unknown"),
        "{}",
        r.header("www-authenticate")
    );
    assert_eq!(c.get_with_token(&orders, &new_at).await.status, 200);
    let (raw, _) = jwks(&c, &gw).await;
    assert!(
        !raw.to_string().contains(&old_kid),
        "the removed key is no longer published"
    );
    // The running gateway knows A signed tokens within access_ttl, so the reload warned.
    let logs = support::logs::captured();
    assert!(
        logs.lines()
            .any(|l| l.contains("WARN") && l.contains(&old_kid) && l.contains("removed signing key")),
        "no warning about the removal of {old_kid}"
    );
}

#[tokio::test]
async fn a_token_with_a_kid_of_ours_but_another_algorithm_is_refused() {
    // A key is used with its own algorithm only: an HS256 token naming our EdDSA key's kid,
    // "signed" with the published public key as the secret, is refused.
    let key = KeyFile::new(SigningAlg::EdDSA);
    let gw = support::start(&support::config_signed_with(&key.table(), "", ORDERS)).await;
    let c = Client::new(Proto::Http1);
    let (raw, _) = jwks(&c, &gw).await;
    let jwk = &raw["keys"][0];
    let mut h = jsonwebtoken::Header::new(Algorithm::HS256);
    h.typ = Some("at+jwt".into());
    h.kid = jwk["kid"].as_str().map(str::to_owned);
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    let claims = serde_json::json!({
        "iss": "https://gw.test", "aud": "api", "sub": "mallory", "client_id": "web",
        "scope": "orders:read", "sid": "AAAAAAAAAAA", "iat": now, "exp": now + 600,
    });
    for secret in [
        jwk.to_string().into_bytes(),
        URL_SAFE_NO_PAD.decode(jwk["x"].as_str().unwrap()).unwrap(),
    ] {
        let forged = jsonwebtoken::encode(&h, &claims, &jsonwebtoken::EncodingKey::from_secret(&secret)).unwrap();
        let r = c.get_with_token(&gw.url("/api/orders"), &forged).await;
        assert_eq!(r.status, 401);
        assert!(r.header("www-authenticate").contains("algorithm"), "{}", r.text());
    }
}

#[tokio::test]
async fn the_metadata_document_names_every_endpoint_with_absolute_urls() {
    let gw = support::start(&support::config_toml("", ORDERS)).await;
    let c = Client::new(Proto::Http2);
    let r = c.get(&gw.url("/.well-known/oauth-authorization-server"), &[]).await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.header("content-type"), "application/json");
    assert!(r.body.ends_with(b"\n"));
    let m = json(&r.body);
    assert_eq!(m["issuer"], "https://gw.test");
    assert_eq!(m["token_endpoint"], "https://gw.test/api/oauth2/token");
    assert_eq!(m["revocation_endpoint"], "https://gw.test/api/oauth2/revoke");
    assert_eq!(m["introspection_endpoint"], "https://gw.test/api/oauth2/introspect");
    assert_eq!(m["jwks_uri"], "https://gw.test/.well-known/jwks.json");
    assert_eq!(
        m["grant_types_supported"],
        serde_json::json!(["password", "refresh_token", "client_credentials"])
    );
    assert_eq!(
        m["token_endpoint_auth_methods_supported"],
        serde_json::json!(["client_secret_basic", "client_secret_post", "none"])
    );
    assert_eq!(
        m["introspection_endpoint_auth_methods_supported"],
        serde_json::json!(["client_secret_basic", "client_secret_post"])
    );
    assert_eq!(
        m["scopes_supported"],
        serde_json::json!(["orders:read", "orders:write", "reports:read"])
    );
    assert_eq!(m["response_types_supported"], serde_json::json!([]));

    // Read-only documents.
    let r = c.form(&gw.url("/.well-known/jwks.json"), &[("a", "b")], &[]).await;
    assert_eq!(r.status, 405);
    assert_eq!(r.header("allow"), "GET, HEAD");
}
