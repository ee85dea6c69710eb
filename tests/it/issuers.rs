//! Tokens of an existing identity provider (`[[issuers]]`), against an in-process JWKS server:
//! accepted with their identity; refused when wrong in any way; an issuer whose JWKS is down at
//! start is "not ready" and accepted once it comes up, without a restart; a newly published kid is
//! accepted; a burst of invented kids costs at most one fetch.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde_json::{Value, json};
use tokengate::config::Config;

use crate::support::idp::{IdpKey, JwksServer, wait_for_issuer};
use crate::support::{self, Client, Proto, Upstream, login, repo, str_of};

fn now() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_secs()
}

/// Each test names its own issuer, so what it finds in the shared log is its own.
fn issuer(test: &str) -> String {
    format!("https://idp.test/realms/{test}")
}

/// A Keycloak-shaped access token: `azp` for the client, scopes in `scp` as an array.
fn claims(iss: &str) -> Value {
    json!({
        "iss": iss, "sub": "f3a1c2d4-user", "aud": ["orders-api", "account"], "azp": "billing-app",
        "scp": ["orders:read", "profile"], "iat": now(), "exp": now() + 300, "sid": "AAAAAAAAAAA",
    })
}

fn with(iss: &str, key: &str, value: Value) -> Value {
    let mut c = claims(iss);
    c[key] = value;
    c
}

fn toml(iss: &str, jwks: &JwksServer, up: &Upstream) -> String {
    let rest = format!(
        r#"
[[issuers]]
issuer = "{iss}"
jwks_uri = "{jwks}"
audiences = ["orders-api"]
token_types = ["at+jwt", "JWT"]
scope_claim = "scp"

[[routes]]
path_prefix = "/api/orders"
upstream = "{up}"
scopes = ["orders:read"]

[[routes]]
path_prefix = "/api/own-only"
upstream = "{up}"
issuers = ["self"]

[[routes]]
path_prefix = "/api/idp-only"
upstream = "{up}"
issuers = ["{iss}"]
"#,
        jwks = jwks.url(),
        up = up.url()
    );
    support::config_toml("", &rest)
}

async fn ready(gw: &mut support::TestGateway, iss: &str) {
    wait_for_issuer(gw.running().app(), iss, |s| s.ready).await;
}

#[tokio::test]
async fn an_issuers_token_is_accepted_with_its_identity_and_routes_can_narrow_issuers() {
    let iss = issuer("accepted");
    let key = IdpKey::rsa("rsa-1");
    let jwks = JwksServer::start(true, &[&key]).await;
    let up = Upstream::recording().await;
    let mut gw = support::start(&toml(&iss, &jwks, &up)).await;
    ready(&mut gw, &iss).await;
    let c = Client::new(Proto::Http1);

    let token = key.mint(&claims(&iss));
    let r = c.get_with_token(&gw.url("/api/orders/7"), &token).await;
    assert_eq!(r.status, 200, "{}", r.text());
    let h = up.last().headers;
    assert_eq!(h["x-auth-subject"], "f3a1c2d4-user");
    assert_eq!(h["x-auth-client-id"], "billing-app", "azp is the client");
    assert_eq!(h["x-auth-scope"], "orders:read profile", "scp array, space-joined");
    assert_eq!(h["x-auth-issuer"], iss.as_str());
    assert!(h.get("x-auth-session").is_none(), "no session of ours: {h:?}");
    assert!(h.get("authorization").is_none());

    // Typed at+jwt (RFC 9068) is accepted as well, and client_id wins over azp.
    let mut c2 = claims(&iss);
    c2["client_id"] = json!("orders-cli");
    let r = c
        .get_with_token(&gw.url("/api/orders"), &key.mint_with(None, Some("at+jwt"), &c2))
        .await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(up.last().headers["x-auth-client-id"], "orders-cli");

    // Scopes are checked the same way.
    let r = c
        .get_with_token(
            &gw.url("/api/orders"),
            &key.mint(&with(&iss, "scp", json!("profile email"))),
        )
        .await;
    assert_eq!(r.status, 403, "{}", r.text());

    // routes[].issuers narrows: this token on a self-only route, ours on an idp-only route.
    let r = c.get_with_token(&gw.url("/api/own-only"), &token).await;
    assert_eq!(r.status, 401);
    assert!(
        r.header("www-authenticate").contains("does not accept tokens of"),
        "{}",
        r.text()
    );
    assert_eq!(c.get_with_token(&gw.url("/api/idp-only"), &token).await.status, 200);
    let ours = str_of(&login(&c, &gw, None).await, "access_token").to_owned();
    assert_eq!(c.get_with_token(&gw.url("/api/own-only"), &ours).await.status, 200);
    assert_eq!(c.get_with_token(&gw.url("/api/orders"), &ours).await.status, 200);
    assert_eq!(c.get_with_token(&gw.url("/api/idp-only"), &ours).await.status, 401);
}

#[tokio::test]
async fn wrong_audience_expired_forged_and_alg_confused_tokens_are_refused() {
    let iss = issuer("refused");
    let key = IdpKey::rsa("rsa-1");
    let jwks = JwksServer::start(true, &[&key]).await;
    let up = Upstream::recording().await;
    let mut gw = support::start(&toml(&iss, &jwks, &up)).await;
    ready(&mut gw, &iss).await;
    let c = Client::new(Proto::Http1);
    let url = gw.url("/api/orders");

    // Signed by another key under the published kid.
    let forger = IdpKey::rsa("rsa-1");
    // The public key as an HMAC secret, under the published kid (the classic alg confusion).
    let mut confused = jsonwebtoken::Header::new(jsonwebtoken::Algorithm::HS256);
    confused.kid = Some("rsa-1".into());
    confused.typ = Some("JWT".into());
    let confused = jsonwebtoken::encode(
        &confused,
        &claims(&iss),
        &jsonwebtoken::EncodingKey::from_secret(&key.public_jwk_bytes()),
    )
    .unwrap();
    let cases = [
        (key.mint(&with(&iss, "aud", json!("account"))), "audience"),
        (key.mint(&with(&iss, "exp", json!(now() - 60))), "expired"),
        (key.mint(&with(&iss, "nbf", json!(now() + 3600))), "not valid yet"),
        (forger.mint(&claims(&iss)), "signature"),
        (confused, "algorithm"),
        (key.mint_with(None, Some("id+jwt"), &claims(&iss)), "typ"),
        (
            key.mint(&with(&iss, "iss", json!("https://idp.test/realms/other"))),
            "another issuer",
        ),
    ];
    for (token, why) in cases {
        let r = c.get_with_token(&url, &token).await;
        assert_eq!(r.status, 401, "{why}: {}", r.text());
        assert!(
            r.header("www-authenticate").contains(why),
            "{why}: {}",
            r.header("www-authenticate")
        );
    }
    assert_eq!(up.count(), 0, "nothing refused reached the upstream");
    assert_eq!(c.get_with_token(&url, &key.mint(&claims(&iss))).await.status, 200);
}

#[tokio::test]
async fn an_issuer_down_at_start_is_not_ready_then_accepted_once_its_jwks_answers() {
    let iss = issuer("late");
    let key = IdpKey::rsa("rsa-1");
    let jwks = JwksServer::start(false, &[&key]).await;
    let up = Upstream::recording().await;
    let mut gw = support::start(&toml(&iss, &jwks, &up)).await;
    let c = Client::new(Proto::Http1);

    // The gateway started without the keys (startup did not wait) and says why.
    let status = wait_for_issuer(gw.running().app(), &iss, |s| s.failures >= 1).await;
    assert!(!status.ready);
    let token = key.mint(&claims(&iss));
    let r = c.get_with_token(&gw.url("/api/orders"), &token).await;
    assert_eq!(r.status, 401);
    assert!(r.header("www-authenticate").contains("not loaded yet"), "{}", r.text());
    assert!(
        support::logs::captured()
            .lines()
            .any(|l| l.contains("WARN") && l.contains("issuer not ready") && l.contains(&iss)),
        "a WARN names the issuer that is not ready"
    );
    // Our own traffic is served, and /readyz says ready.
    let ours = str_of(&login(&c, &gw, None).await, "access_token").to_owned();
    assert_eq!(c.get_with_token(&gw.url("/api/orders"), &ours).await.status, 200);
    let admin = admin_get(gw.admin_addr, "/readyz").await;
    assert!(admin.starts_with("HTTP/1.1 200"), "{admin}");

    // The JWKS comes up. Past the retry backoff (the gateway's clock), the next token's own
    // refetch loads the keys: accepted, no restart.
    jwks.set_up(true);
    gw.clock.advance(Duration::from_secs(5));
    let r = c.get_with_token(&gw.url("/api/orders"), &token).await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert!(wait_for_issuer(gw.running().app(), &iss, |s| s.ready).await.ready);
}

#[tokio::test]
async fn the_background_retry_loads_an_issuer_that_comes_up_later() {
    let iss = issuer("background");
    let key = IdpKey::ec("ec-1");
    let jwks = JwksServer::start(false, &[&key]).await;
    let up = Upstream::recording().await;
    let mut gw = support::start(&toml(&iss, &jwks, &up)).await;
    wait_for_issuer(gw.running().app(), &iss, |s| s.failures >= 1).await;
    jwks.set_up(true);
    // The retry is due one second (of the gateway's clock) after the failure; the maintenance
    // loop starts it without any request.
    gw.clock.advance(Duration::from_secs(1));
    let status = wait_for_issuer(gw.running().app(), &iss, |s| s.ready).await;
    assert_eq!(status.keys, 1);
    let fetches = jwks.fetches();
    let c = Client::new(Proto::Http1);
    let r = c.get_with_token(&gw.url("/api/orders"), &key.mint(&claims(&iss))).await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(jwks.fetches(), fetches, "the request fetched nothing");
}

#[tokio::test]
async fn a_newly_published_kid_is_accepted_and_invented_kids_cost_at_most_one_fetch() {
    let iss = issuer("rotation");
    let (k1, k2) = (IdpKey::rsa("2024-01"), IdpKey::ec("2024-02"));
    let jwks = JwksServer::start(true, &[&k1]).await;
    let up = Upstream::recording().await;
    let mut gw = support::start(&toml(&iss, &jwks, &up)).await;
    ready(&mut gw, &iss).await;
    let c = Client::new(Proto::Http2);
    let url = gw.url("/api/orders");

    // The IdP rotates: a token of the new key is accepted on its first presentation.
    jwks.publish(&k2);
    let before = jwks.fetches();
    let r = c.get_with_token(&url, &k2.mint(&claims(&iss))).await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(jwks.fetches(), before + 1, "one refetch brought the new key");

    // 50 tokens with invented kids past the refetch interval: 25 at once (they share one fetch),
    // then 25 one after the other (the interval allows no second one).
    gw.clock.advance(Duration::from_secs(5));
    let before = jwks.fetches();
    let invented = |i: usize| k1.mint_with(Some(&format!("invented-{i}")), Some("JWT"), &claims(&iss));
    let at_once = (0..25).map(|i| {
        let (c, url, token) = (c.clone(), url.clone(), invented(i));
        async move { c.get_with_token(&url, &token).await }
    });
    let mut responses = futures_util::future::join_all(at_once).await;
    for i in 25..50 {
        responses.push(c.get_with_token(&url, &invented(i)).await);
    }
    for r in responses {
        assert_eq!(r.status, 401);
        assert!(r.header("www-authenticate").contains("key is unknown"), "{}", r.text());
    }
    assert!(
        jwks.fetches() <= before + 1,
        "{} fetches for 50 invented kids",
        jwks.fetches() - before
    );
    // The known keys keep working.
    assert_eq!(c.get_with_token(&url, &k1.mint(&claims(&iss))).await.status, 200);
}

#[tokio::test]
async fn a_reload_keeps_the_issuers_keys_but_never_its_validated_tokens() {
    let iss = issuer("reload");
    let key = IdpKey::rsa("rsa-1");
    let jwks = JwksServer::start(true, &[&key]).await;
    let up = Upstream::recording().await;
    let text = toml(&iss, &jwks, &up);
    let mut gw = support::start(&text).await;
    ready(&mut gw, &iss).await;
    let c = Client::new(Proto::Http1);
    let token = key.mint(&claims(&iss));
    assert_eq!(c.get_with_token(&gw.url("/api/orders"), &token).await.status, 200);
    let fetches = jwks.fetches();

    // Same issuer settings, another audience: the keys are kept (no fetch, ready at once), the
    // validated token is not (it is for an audience no longer accepted).
    let changed = text.replace("audiences = [\"orders-api\"]", "audiences = [\"billing-api\"]");
    let config = Config::from_toml(&changed, &repo(), "test.toml").unwrap();
    gw.running().reload(config).unwrap();
    let r = c.get_with_token(&gw.url("/api/orders"), &token).await;
    assert_eq!(r.status, 401, "{}", r.text());
    assert!(r.header("www-authenticate").contains("audience"));
    let ok = key.mint(&with(&iss, "aud", json!("billing-api")));
    assert_eq!(c.get_with_token(&gw.url("/api/orders"), &ok).await.status, 200);
    assert_eq!(jwks.fetches(), fetches, "the reload kept the resolver and its keys");
}

/// One plain HTTP/1.1 GET to the admin listener; the raw response.
async fn admin_get(addr: std::net::SocketAddr, path: &str) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    s.write_all(format!("GET {path} HTTP/1.1\r\nHost: admin\r\nConnection: close\r\n\r\n").as_bytes())
        .await
        .unwrap();
    let mut out = String::new();
    tokio::time::timeout(Duration::from_secs(10), s.read_to_string(&mut out))
        .await
        .expect("hang guard")
        .unwrap();
    out
}
