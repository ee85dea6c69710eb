//! RFC 7662 introspection: confidential clients only; active access and refresh tokens with what
//! they grant; everything else exactly `{"active": false}`.

use std::time::Duration;

use serde_json::Value;
use tokengate::Clock;

use crate::support::{self, Client, Proto, SERVICE_SECRET, USER, json, login, refresh, str_of};

const ORDERS: (&str, &str, &str) = ("/api/orders", "echo", "scopes = [\"orders:read\"]");
const INACTIVE: &[u8] = b"{\"active\":false}\n";

/// Introspects `token` as the confidential client `svc` (HTTP Basic); returns the raw response.
async fn introspect(c: &Client, gw: &support::TestGateway, token: &str, hint: Option<&str>) -> support::Resp {
    let basic = format!(
        "Basic {}",
        base64::Engine::encode(
            &base64::engine::general_purpose::STANDARD,
            format!("svc:{SERVICE_SECRET}")
        )
    );
    let mut form = vec![("token", token)];
    if let Some(h) = hint {
        form.push(("token_type_hint", h));
    }
    let r = c
        .form(&gw.url("/api/oauth2/introspect"), &form, &[("authorization", &basic)])
        .await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.header("cache-control"), "no-store");
    assert_eq!(r.header("content-type"), "application/json");
    r
}

async fn active(c: &Client, gw: &support::TestGateway, token: &str, hint: Option<&str>) -> Value {
    let r = introspect(c, gw, token, hint).await;
    let v = json(&r.body);
    assert_eq!(v["active"], true, "expected active: {}", r.text());
    v
}

async fn assert_inactive(c: &Client, gw: &support::TestGateway, token: &str, why: &str) {
    for hint in [None, Some("refresh_token"), Some("access_token")] {
        let r = introspect(c, gw, token, hint).await;
        assert_eq!(&r.body[..], INACTIVE, "{why} (hint {hint:?}): {}", r.text());
    }
}

#[tokio::test]
async fn only_confidential_clients_may_introspect() {
    let gw = support::start_with_routes("", &[ORDERS]).await;
    let c = Client::new(Proto::Http1);
    let at = str_of(&login(&c, &gw, None).await, "access_token").to_owned();
    let url = gw.url("/api/oauth2/introspect");
    for (form, headers, why) in [
        (vec![("token", at.as_str())], vec![], "no client authentication"),
        (
            vec![("token", at.as_str()), ("client_id", "web")],
            vec![],
            "a public client",
        ),
        (
            vec![("token", at.as_str()), ("client_id", "svc"), ("client_secret", "wrong")],
            vec![],
            "a wrong secret",
        ),
    ] {
        let r = c.form(&url, &form, &headers).await;
        assert_eq!(r.status, 401, "{why}: {}", r.text());
        assert_eq!(json(&r.body)["error"], "invalid_client", "{why}");
    }
    // client_secret_post works as well as Basic.
    let r = c
        .form(
            &url,
            &[
                ("token", at.as_str()),
                ("client_id", "svc"),
                ("client_secret", SERVICE_SECRET),
            ],
            &[],
        )
        .await;
    assert_eq!(json(&r.body)["active"], true, "{}", r.text());
    let r = c.get(&url, &[]).await;
    assert_eq!(r.status, 405);
}

#[tokio::test]
async fn active_access_and_refresh_tokens_say_what_they_grant() {
    let gw = support::start_with_routes("", &[ORDERS]).await;
    let c = Client::new(Proto::Http2);
    let l = login(&c, &gw, Some("orders:read")).await;
    let (at, rt) = (str_of(&l, "access_token"), str_of(&l, "refresh_token"));
    let now = gw.clock.now_secs();

    let a = active(&c, &gw, at, None).await;
    assert_eq!(a["token_type"], "Bearer");
    assert_eq!(a["scope"], "orders:read");
    assert_eq!(a["client_id"], "web");
    assert_eq!(a["sub"], USER);
    assert_eq!(a["iat"], now);
    assert_eq!(a["exp"], now + 900);
    let sid = a["sid"].as_str().unwrap().to_owned();
    assert_eq!(sid.len(), 11);

    for hint in [None, Some("refresh_token"), Some("access_token")] {
        let r = active(&c, &gw, rt, hint).await;
        assert_eq!(r["token_type"], "refresh_token");
        assert_eq!(r["scope"], "orders:read");
        assert_eq!(r["client_id"], "web");
        assert_eq!(r["sub"], USER);
        assert_eq!(r["sid"], sid.as_str());
        assert_eq!(r["iat"], now);
        assert_eq!(r["exp"], now + 86_400);
    }
    // The hint orders the look-ups, never the answer.
    assert_eq!(active(&c, &gw, at, Some("refresh_token")).await["token_type"], "Bearer");

    // After a rotation the new refresh token is active, issued now; the old one is not.
    gw.clock.advance(Duration::from_secs(60));
    let r = refresh(&c, &gw, rt, "web").await;
    let next = json(&r.body);
    let next_rt = str_of(&next, "refresh_token");
    let n = active(&c, &gw, next_rt, None).await;
    assert_eq!(n["iat"], now + 60);
    assert_eq!(n["sid"], sid.as_str());
    assert_inactive(&c, &gw, rt, "a rotated refresh token").await;
}

#[tokio::test]
async fn everything_else_is_exactly_active_false() {
    let gw = support::start_with_routes("", &[ORDERS]).await;
    let c = Client::new(Proto::Http1);
    let l = login(&c, &gw, None).await;
    let (at, rt) = (
        str_of(&l, "access_token").to_owned(),
        str_of(&l, "refresh_token").to_owned(),
    );

    assert_inactive(&c, &gw, "not-a-token", "malformed").await;
    assert_inactive(&c, &gw, "a.b.c", "malformed JWT").await;
    assert_inactive(&c, &gw, &"A".repeat(43), "an unknown refresh token").await;
    let mut forged = rt.clone();
    forged.replace_range(20..24, if &rt[20..24] == "AAAA" { "BBBB" } else { "AAAA" });
    assert_inactive(&c, &gw, &forged, "a refresh token of a real session, guessed").await;
    // Another issuer's token (signed with our secret even): not ours to vouch for.
    let mut h = jsonwebtoken::Header::new(jsonwebtoken::Algorithm::HS256);
    h.typ = Some("at+jwt".into());
    let now = gw.clock.now_secs();
    let claims = serde_json::json!({
        "iss": "https://other.test", "aud": "api", "sub": "x", "client_id": "web", "sid": "AAAAAAAAAAA",
        "iat": now, "exp": now + 600,
    });
    let other = jsonwebtoken::encode(
        &h,
        &claims,
        &jsonwebtoken::EncodingKey::from_secret(&support::jwt_secret()),
    )
    .unwrap();
    assert_inactive(&c, &gw, &other, "another issuer's token").await;

    // Expired access token; the refresh token is still active.
    gw.clock.advance(Duration::from_secs(901));
    assert_inactive(&c, &gw, &at, "an expired access token").await;
    active(&c, &gw, &rt, None).await;

    // Revoked session: a fresh access token and the refresh token are both inactive.
    let l = login(&c, &gw, None).await;
    let (at2, rt2) = (str_of(&l, "access_token"), str_of(&l, "refresh_token"));
    active(&c, &gw, at2, None).await;
    let r = c
        .form(
            &gw.url("/api/oauth2/revoke"),
            &[("token", rt2), ("client_id", "web")],
            &[],
        )
        .await;
    assert_eq!(r.status, 200);
    assert_inactive(&c, &gw, at2, "an access token of a revoked session").await;
    assert_inactive(&c, &gw, rt2, "a refresh token of a revoked session").await;

    // An expired refresh token.
    gw.clock.advance(Duration::from_secs(86_400));
    assert_inactive(&c, &gw, &rt, "an expired refresh token").await;
}
