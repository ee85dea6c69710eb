//! Token enforcement on protected routes: every RFC 6750 outcome, and a cache that can neither
//! outlive a token, nor defeat a revocation, nor skip a scope check.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use jsonwebtoken::{Algorithm, EncodingKey, Header};
use serde_json::{Value, json};

use crate::support::{self, Client, Proto, Upstream, login, str_of};

fn now() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_secs()
}

fn claims() -> Value {
    json!({
        "iss": "https://gw.test", "aud": "api", "sub": "carol", "client_id": "web",
        "scope": "orders:read", "sid": "c2lkLWNhcm9s", "jti": "j1",
        "iat": now(), "exp": now() + 600,
    })
}

fn mint_with(header: Header, claims: &Value, secret: &[u8]) -> String {
    jsonwebtoken::encode(&header, claims, &EncodingKey::from_secret(secret)).unwrap()
}

fn at_header() -> Header {
    let mut h = Header::new(Algorithm::HS256);
    h.typ = Some("at+jwt".into());
    h
}

fn mint(claims: &Value) -> String {
    mint_with(at_header(), claims, &support::jwt_secret())
}

fn with(key: &str, value: Value) -> Value {
    let mut c = claims();
    c[key] = value;
    c
}

async fn gateway(up: &Upstream) -> support::TestGateway {
    support::start_with_routes(
        "",
        &[
            ("/api/orders", &up.url(), "scopes = [\"orders:read\"]"),
            ("/api/write", &up.url(), "scopes = [\"orders:write\"]"),
        ],
    )
    .await
}

#[tokio::test]
async fn every_outcome_of_the_token_check() {
    let up = Upstream::recording().await;
    let gw = gateway(&up).await;
    let c = Client::new(Proto::Http1);
    let url = gw.url("/api/orders");

    // No token (or another scheme): a bare challenge.
    for headers in [vec![], vec![("authorization", "Basic YTpi")]] {
        let r = c.get(&url, &headers).await;
        assert_eq!(r.status, 401);
        assert_eq!(r.header("www-authenticate"), "Bearer realm=\"tokengate\"");
    }

    let invalid = |token: String, why: &'static str| (token, why);
    let mut hs512 = Header::new(Algorithm::HS512);
    hs512.typ = Some("at+jwt".into());
    let mut plain_jwt = Header::new(Algorithm::HS256);
    plain_jwt.typ = Some("JWT".into());
    let cases = vec![
        invalid("not-a-jwt".into(), "malformed"),
        invalid("a.b.c".into(), "malformed"),
        invalid("abc\"def".into(), "malformed"),
        invalid(
            mint_with(at_header(), &claims(), b"another-secret-another-secret-!!"),
            "signature",
        ),
        invalid(mint(&with("iss", json!("https://evil.test"))), "issuer"),
        invalid(mint(&with("aud", json!("other-api"))), "audience"),
        invalid(mint_with(plain_jwt, &claims(), &support::jwt_secret()), "typ"),
        invalid(mint_with(hs512, &claims(), &support::jwt_secret()), "algorithm"),
        invalid(mint(&with("exp", json!(now() - 10))), "expired"),
        invalid(mint(&with("nbf", json!(now() + 3600))), "not valid yet"),
        invalid(
            format!("{}.{}.", "eyJhbGciOiJub25lIiwidHlwIjoiYXQrand0In0", "e30"),
            "malformed",
        ),
    ];
    for (token, why) in cases {
        let r = c.get_with_token(&url, &token).await;
        assert_eq!(r.status, 401, "{why}: {token} {}", r.text());
        let challenge = r.header("www-authenticate");
        assert!(
            challenge.starts_with("Bearer realm=\"tokengate\", error=\"invalid_token\""),
            "{why}: {challenge}"
        );
        assert!(
            support::json(&r.body)["error_description"]
                .as_str()
                .unwrap()
                .contains(why),
            "{why}: {}",
            r.text()
        );
    }

    // Missing scope: 403 naming the scope.
    let r = c.get_with_token(&gw.url("/api/write"), &mint(&claims())).await;
    assert_eq!(r.status, 403);
    assert_eq!(
        r.header("www-authenticate"),
        "Bearer realm=\"tokengate\", error=\"insufficient_scope\", error_description=\"the access token lacks a scope this route requires\", scope=\"orders:write\""
    );

    // Two Authorization headers, or a malformed Bearer value: 400.
    let t = format!("Bearer {}", mint(&claims()));
    let r = c.get(&url, &[("authorization", &t), ("authorization", &t)]).await;
    assert_eq!(r.status, 400);
    assert!(r.header("www-authenticate").contains("error=\"invalid_request\""));
    let r = c.get(&url, &[("authorization", "Bearer two words")]).await;
    assert_eq!(r.status, 400);

    assert_eq!(up.count(), 0, "nothing refused reached the upstream");
    let r = c.get_with_token(&url, &mint(&claims())).await;
    assert_eq!(r.status, 200);
    assert_eq!(up.last().headers["x-auth-subject"], "carol");
}

#[tokio::test]
async fn a_cached_token_whose_session_is_revoked_is_refused_on_its_next_request() {
    let up = Upstream::recording().await;
    let gw = gateway(&up).await;
    // Over one connection each (the client keeps it): the requests after the first are answered
    // by the connection's remembered token, which must see the revocation too.
    for proto in [Proto::Http1, Proto::Http2] {
        let c = Client::new(proto);
        let s = login(&c, &gw, None).await;
        let access = str_of(&s, "access_token");
        for _ in 0..3 {
            assert_eq!(c.get_with_token(&gw.url("/api/orders"), access).await.status, 200);
        }
        let r = c
            .form(
                &gw.url("/api/oauth2/revoke"),
                &[("token", str_of(&s, "refresh_token")), ("client_id", "web")],
                &[],
            )
            .await;
        assert_eq!(r.status, 200);
        let r = c.get_with_token(&gw.url("/api/orders"), access).await;
        assert_eq!(r.status, 401, "{proto:?}");
        assert!(r.text().contains("revoked"));
    }
}

#[tokio::test]
async fn a_cached_token_is_refused_once_it_expires() {
    let up = Upstream::recording().await;
    let gw = gateway(&up).await;
    let c = Client::new(Proto::Http1);
    let s = login(&c, &gw, None).await;
    let access = str_of(&s, "access_token");
    assert_eq!(c.get_with_token(&gw.url("/api/orders"), access).await.status, 200);
    gw.clock.advance(Duration::from_secs(899));
    assert_eq!(c.get_with_token(&gw.url("/api/orders"), access).await.status, 200);
    gw.clock.advance(Duration::from_secs(2));
    let r = c.get_with_token(&gw.url("/api/orders"), access).await;
    assert_eq!(r.status, 401);
    assert!(
        r.header("www-authenticate").contains("expired"),
        "a client can tell it should refresh"
    );
}

/// One connection carrying several users' tokens (a proxy in front of the gateway does this):
/// each request is answered for its own token, never the connection's previous one. Same-length
/// tokens, so the remembered one is overwritten in place.
#[tokio::test]
async fn tokens_taking_turns_on_one_connection_each_get_their_own_identity() {
    let up = Upstream::recording().await;
    let gw = gateway(&up).await;
    let c = Client::new(Proto::Http1);
    let carol = mint(&claims());
    let dave = mint(&with("sub", json!("dave!")));
    assert_eq!(carol.len(), dave.len());
    let last = if carol.ends_with('x') { "y" } else { "x" };
    let forged = format!("{}{last}", &carol[..carol.len() - 1]);
    for round in 0..3 {
        for (token, sub) in [(&carol, "carol"), (&dave, "dave!"), (&carol, "carol")] {
            assert_eq!(c.get_with_token(&gw.url("/api/orders"), token).await.status, 200);
            assert_eq!(up.last().headers["x-auth-subject"], sub, "round {round}");
        }
        // A token that differs from the remembered one in its last byte is checked afresh.
        assert_eq!(c.get_with_token(&gw.url("/api/orders"), &forged).await.status, 401);
    }
}

#[tokio::test]
async fn a_cache_hit_never_skips_the_scope_check() {
    let up = Upstream::recording().await;
    let gw = gateway(&up).await;
    let c = Client::new(Proto::Http1);
    let token = mint(&claims()); // orders:read only
    for _ in 0..2 {
        assert_eq!(c.get_with_token(&gw.url("/api/orders"), &token).await.status, 200);
        assert_eq!(c.get_with_token(&gw.url("/api/write"), &token).await.status, 403);
    }
}
