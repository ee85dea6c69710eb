//! The token endpoint and revocation: login, rotation with idempotent retry and reuse detection,
//! expiry, scopes, client binding, RFC 6749 §5.2 errors, RFC 7009.

use std::collections::HashSet;
use std::time::Duration;

use base64::Engine;
use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
use bytes::Bytes;
use http::Method;

use crate::support::{self, Client, PASSWORD, Proto, SERVICE_SECRET, USER, json, login, refresh, str_of};

const ORDERS: (&str, &str, &str) = ("/api/orders", "echo", "scopes = [\"orders:read\"]");

fn jwt_part(jwt: &str, i: usize) -> serde_json::Value {
    let part = jwt.split('.').nth(i).unwrap();
    json(&URL_SAFE_NO_PAD.decode(part).unwrap())
}

#[tokio::test]
async fn login_returns_an_rfc6749_response_with_an_rfc9068_access_token() {
    let gw = support::start_with_routes("", &[ORDERS]).await;
    let c = Client::new(Proto::Http2);
    let r = c
        .form(
            &gw.url("/api/oauth2/token"),
            &[
                ("grant_type", "password"),
                ("client_id", "web"),
                ("username", USER),
                ("password", PASSWORD),
                ("scope", "orders:read"),
            ],
            &[],
        )
        .await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.header("cache-control"), "no-store");
    assert_eq!(r.header("pragma"), "no-cache");
    assert_eq!(r.header("content-type"), "application/json");
    let body = json(&r.body);
    assert_eq!(body["token_type"], "Bearer");
    assert_eq!(body["expires_in"], 900);
    assert_eq!(body["refresh_expires_in"], 86400);
    assert_eq!(body["scope"], "orders:read");
    let refresh_token = str_of(&body, "refresh_token");
    assert_eq!(URL_SAFE_NO_PAD.decode(refresh_token).unwrap().len(), 32);

    let jwt = str_of(&body, "access_token");
    let header = jwt_part(jwt, 0);
    assert_eq!(
        (header["typ"].as_str(), header["alg"].as_str()),
        (Some("at+jwt"), Some("HS256"))
    );
    let claims = jwt_part(jwt, 1);
    assert_eq!(claims["iss"], "https://gw.test");
    assert_eq!(claims["aud"], "api");
    assert_eq!(claims["sub"], USER);
    assert_eq!(claims["client_id"], "web");
    assert_eq!(claims["scope"], "orders:read");
    assert_eq!(claims["exp"].as_u64().unwrap(), claims["iat"].as_u64().unwrap() + 900);
    assert!(claims["jti"].as_str().is_some_and(|j| !j.is_empty()));
    assert!(claims["sid"].as_str().is_some_and(|s| !s.is_empty()));
}

#[tokio::test]
async fn granted_scope_is_requested_intersect_user_intersect_client() {
    let gw = support::start_with_routes("", &[ORDERS]).await;
    let c = Client::new(Proto::Http1);
    assert_eq!(
        login(&c, &gw, None).await["scope"],
        "orders:read orders:write",
        "absent: all allowed"
    );
    // svc's reports:read is known but neither ann's nor web's.
    let r = c
        .form(
            &gw.url("/api/oauth2/token"),
            &[
                ("grant_type", "password"),
                ("client_id", "web"),
                ("username", USER),
                ("password", PASSWORD),
                ("scope", "reports:read"),
            ],
            &[],
        )
        .await;
    assert_eq!(
        (r.status, json(&r.body)["error"].as_str()),
        (400, Some("invalid_scope"))
    );
}

/// The seed flow: login → refresh → the pair changes → the old refresh token replayed after the
/// grace → invalid_grant → the newest refresh token of the family is dead too, and so is the
/// session's access token at the gateway.
#[tokio::test]
async fn replay_after_the_grace_revokes_the_whole_family() {
    let gw = support::start_with_routes("", &[ORDERS]).await;
    let c = Client::new(Proto::Http1);
    let first = login(&c, &gw, None).await;
    let old_refresh = str_of(&first, "refresh_token");

    let r = refresh(&c, &gw, old_refresh, "web").await;
    assert_eq!(r.status, 200, "{}", r.text());
    let second = json(&r.body);
    assert_ne!(str_of(&second, "refresh_token"), old_refresh);
    assert_ne!(str_of(&second, "access_token"), str_of(&first, "access_token"));
    let newest_access = str_of(&second, "access_token");
    assert_eq!(
        c.get_with_token(&gw.url("/api/orders"), newest_access).await.status,
        200
    );

    gw.clock.advance(Duration::from_secs(11));
    let r = refresh(&c, &gw, old_refresh, "web").await;
    assert_eq!(r.status, 400);
    assert_eq!(json(&r.body)["error"], "invalid_grant");

    let r = refresh(&c, &gw, str_of(&second, "refresh_token"), "web").await;
    assert_eq!(
        (r.status, json(&r.body)["error"].as_str()),
        (400, Some("invalid_grant")),
        "newest token is dead too"
    );
    let r = c.get_with_token(&gw.url("/api/orders"), newest_access).await;
    assert_eq!(r.status, 401, "the session's access token is refused at once");
    assert!(r.header("www-authenticate").contains("error=\"invalid_token\""));

    let logs = support::logs::captured();
    assert!(
        logs.contains("session_revoked") && logs.contains("refresh_token_reuse"),
        "audit event logged"
    );
}

/// `n` refreshes of one token, all in flight at once over one HTTP/2 connection.
async fn concurrent_refreshes(c: &Client, gw: &support::TestGateway, token: &str, n: usize) -> Vec<support::Resp> {
    let tasks: Vec<_> = (0..n)
        .map(|_| {
            let (c, url, token) = (c.clone(), gw.url("/api/oauth2/token"), token.to_owned());
            tokio::spawn(async move {
                c.form(
                    &url,
                    &[
                        ("grant_type", "refresh_token"),
                        ("client_id", "web"),
                        ("refresh_token", &token),
                    ],
                    &[],
                )
                .await
            })
        })
        .collect();
    let mut out = Vec::with_capacity(n);
    for t in tasks {
        out.push(t.await.unwrap());
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn fifty_concurrent_refreshes_within_the_grace_get_the_same_response() {
    let gw = support::start_with_routes("", &[ORDERS]).await;
    let c = Client::new(Proto::Http2);
    let token = str_of(&login(&c, &gw, None).await, "refresh_token").to_owned();
    let responses = concurrent_refreshes(&c, &gw, &token, 50).await;
    let mut bodies = HashSet::new();
    for r in responses {
        assert_eq!(r.status, 200, "{}", r.text());
        bodies.insert(r.body);
    }
    assert_eq!(bodies.len(), 1, "every retry got the byte-identical first response");
    let body: Bytes = bodies.into_iter().next().unwrap();
    let next = str_of(&json(&body), "refresh_token").to_owned();
    assert_eq!(refresh(&c, &gw, &next, "web").await.status, 200, "the family is alive");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn with_zero_grace_exactly_one_of_fifty_concurrent_refreshes_succeeds_and_the_family_dies() {
    let gw = support::start_with_routes("reuse_grace = \"0s\"", &[ORDERS]).await;
    let c = Client::new(Proto::Http2);
    let token = str_of(&login(&c, &gw, None).await, "refresh_token").to_owned();
    let responses = concurrent_refreshes(&c, &gw, &token, 50).await;
    let mut winners = Vec::new();
    for r in responses {
        match r.status {
            200 => winners.push(json(&r.body)),
            400 => assert_eq!(json(&r.body)["error"], "invalid_grant"),
            s => panic!("unexpected {s}: {}", r.text()),
        }
    }
    assert_eq!(winners.len(), 1);
    let r = refresh(&c, &gw, str_of(&winners[0], "refresh_token"), "web").await;
    assert_eq!(r.status, 400, "the reuse revoked the family, winner included");
}

#[tokio::test]
async fn refresh_tokens_expire_after_a_day_and_sessions_at_their_absolute_cap() {
    let gw = support::start_with_routes("session_max_lifetime = \"2d\"", &[ORDERS]).await;
    let c = Client::new(Proto::Http1);
    let day_old = str_of(&login(&c, &gw, None).await, "refresh_token").to_owned();
    gw.clock.advance(Duration::from_secs(86_399));
    let fresh = str_of(&login(&c, &gw, None).await, "refresh_token").to_owned();
    gw.clock.advance(Duration::from_secs(1));
    let r = refresh(&c, &gw, &day_old, "web").await;
    assert_eq!(
        (r.status, json(&r.body)["error"].as_str()),
        (400, Some("invalid_grant")),
        "1 day: expired"
    );

    // Refreshing every 23 hours keeps `fresh`'s session alive only until its 2-day cap.
    let mut token = fresh;
    gw.clock.advance(Duration::from_secs(23 * 3600 - 1));
    let r = refresh(&c, &gw, &token, "web").await;
    assert_eq!(r.status, 200, "{}", r.text());
    let body = json(&r.body);
    assert_eq!(body["refresh_expires_in"], 86_400);
    token = str_of(&body, "refresh_token").to_owned();

    gw.clock.advance(Duration::from_secs(23 * 3600));
    let r = refresh(&c, &gw, &token, "web").await;
    assert_eq!(r.status, 200, "{}", r.text());
    let body = json(&r.body);
    assert_eq!(body["refresh_expires_in"], 2 * 3600, "cut short by the session cap");
    token = str_of(&body, "refresh_token").to_owned();

    gw.clock.advance(Duration::from_secs(2 * 3600));
    let r = refresh(&c, &gw, &token, "web").await;
    assert_eq!(
        (r.status, json(&r.body)["error"].as_str()),
        (400, Some("invalid_grant")),
        "the session cap ends it"
    );
}

#[tokio::test]
async fn a_refresh_may_narrow_the_scope_but_never_widen_it() {
    let gw = support::start_with_routes("", &[ORDERS]).await;
    let c = Client::new(Proto::Http1);
    let t = str_of(&login(&c, &gw, Some("orders:read")).await, "refresh_token").to_owned();
    let widen = c
        .form(
            &gw.url("/api/oauth2/token"),
            &[
                ("grant_type", "refresh_token"),
                ("client_id", "web"),
                ("refresh_token", &t),
                ("scope", "orders:read orders:write"),
            ],
            &[],
        )
        .await;
    assert_eq!(
        (widen.status, json(&widen.body)["error"].as_str()),
        (400, Some("invalid_scope"))
    );

    let t = str_of(&login(&c, &gw, None).await, "refresh_token").to_owned();
    let narrow = c
        .form(
            &gw.url("/api/oauth2/token"),
            &[
                ("grant_type", "refresh_token"),
                ("client_id", "web"),
                ("refresh_token", &t),
                ("scope", "orders:write"),
            ],
            &[],
        )
        .await;
    assert_eq!(narrow.status, 200, "{}", narrow.text());
    let body = json(&narrow.body);
    assert_eq!(body["scope"], "orders:write");
    assert_eq!(jwt_part(str_of(&body, "access_token"), 1)["scope"], "orders:write");
    // The refresh token keeps the original grant: the next refresh may ask for all of it again.
    let again = refresh(&c, &gw, str_of(&body, "refresh_token"), "web").await;
    assert_eq!(json(&again.body)["scope"], "orders:read orders:write");
}

#[tokio::test]
async fn a_refresh_token_used_by_another_client_is_refused_and_changes_nothing() {
    let gw = support::start_with_routes("", &[ORDERS]).await;
    let c = Client::new(Proto::Http1);
    let t = str_of(&login(&c, &gw, None).await, "refresh_token").to_owned();
    let r = refresh(&c, &gw, &t, "mobile").await;
    assert_eq!(
        (r.status, json(&r.body)["error"].as_str()),
        (400, Some("invalid_grant"))
    );
    assert_eq!(
        refresh(&c, &gw, &t, "web").await.status,
        200,
        "its own client can still use it"
    );
}

#[tokio::test]
async fn unknown_expired_revoked_and_reused_tokens_get_the_same_body() {
    let gw = support::start_with_routes("reuse_grace = \"0s\"", &[ORDERS]).await;
    let c = Client::new(Proto::Http1);
    let unknown = refresh(&c, &gw, "bm90LWEtcmVhbC10b2tlbi1ub3QtYS1yZWFsLXRva2Vu", "web").await;
    let t = str_of(&login(&c, &gw, None).await, "refresh_token").to_owned();
    refresh(&c, &gw, &t, "web").await;
    let reused = refresh(&c, &gw, &t, "web").await;
    let revoked = refresh(&c, &gw, &t, "web").await;
    let t2 = str_of(&login(&c, &gw, None).await, "refresh_token").to_owned();
    gw.clock.advance(Duration::from_secs(86_401));
    let expired = refresh(&c, &gw, &t2, "web").await;
    for r in [&unknown, &reused, &revoked, &expired] {
        assert_eq!(r.status, 400);
        assert_eq!(r.body, unknown.body);
    }
}

#[tokio::test]
async fn client_credentials_issue_an_access_token_only() {
    let gw = support::start_with_routes("", &[ORDERS]).await;
    let c = Client::new(Proto::Http1);
    let basic = format!("Basic {}", STANDARD.encode(format!("svc:{SERVICE_SECRET}")));
    let r = c
        .form(
            &gw.url("/api/oauth2/token"),
            &[("grant_type", "client_credentials"), ("scope", "reports:read")],
            &[("authorization", &basic)],
        )
        .await;
    assert_eq!(r.status, 200, "{}", r.text());
    let body = json(&r.body);
    assert!(body.get("refresh_token").is_none());
    assert_eq!(body["scope"], "reports:read");
    let claims = jwt_part(str_of(&body, "access_token"), 1);
    assert_eq!(
        (claims["sub"].as_str(), claims["client_id"].as_str()),
        (Some("svc"), Some("svc"))
    );
    // client_secret_post works too.
    let r = c
        .form(
            &gw.url("/api/oauth2/token"),
            &[
                ("grant_type", "client_credentials"),
                ("client_id", "svc"),
                ("client_secret", SERVICE_SECRET),
            ],
            &[],
        )
        .await;
    assert_eq!(r.status, 200, "{}", r.text());
}

async fn error_of(r: support::Resp) -> (u16, String) {
    assert_eq!(r.header("cache-control"), "no-store");
    let body = json(&r.body);
    assert!(body["error_description"].is_string(), "{body}");
    (r.status, body["error"].as_str().unwrap().to_owned())
}

#[tokio::test]
async fn every_rfc6749_error_code_with_its_status() {
    let gw = support::start_with_routes("", &[ORDERS]).await;
    let c = Client::new(Proto::Http1);
    let url = gw.url("/api/oauth2/token");
    type Case<'a> = (Vec<(&'a str, &'a str)>, u16, &'a str);
    let cases: Vec<Case> = vec![
        (vec![("client_id", "web")], 400, "invalid_request"),
        (
            vec![("grant_type", "password"), ("client_id", "nobody")],
            401,
            "invalid_client",
        ),
        (
            vec![
                ("grant_type", "password"),
                ("client_id", "web"),
                ("username", USER),
                ("password", "wrong"),
            ],
            400,
            "invalid_grant",
        ),
        (
            vec![("grant_type", "client_credentials"), ("client_id", "web")],
            400,
            "unauthorized_client",
        ),
        (
            vec![("grant_type", "authorization_code"), ("client_id", "web")],
            400,
            "unsupported_grant_type",
        ),
        (
            vec![
                ("grant_type", "password"),
                ("client_id", "web"),
                ("username", USER),
                ("password", PASSWORD),
                ("scope", "admin"),
            ],
            400,
            "invalid_scope",
        ),
    ];
    for (form, status, code) in cases {
        let r = c.form(&url, &form, &[]).await;
        assert_eq!(error_of(r).await, (status, code.to_owned()), "{form:?}");
    }
    // A wrong secret over Basic gets a Basic challenge.
    let basic = format!("Basic {}", STANDARD.encode("svc:wrong"));
    let r = c
        .form(
            &url,
            &[("grant_type", "client_credentials")],
            &[("authorization", &basic)],
        )
        .await;
    assert_eq!(r.header("www-authenticate"), "Basic realm=\"tokengate\"");
    assert_eq!(error_of(r).await, (401, "invalid_client".to_owned()));
}

#[tokio::test]
async fn malformed_and_oversized_requests() {
    let gw = support::start_with_routes("", &[ORDERS]).await;
    let c = Client::new(Proto::Http1);
    let url = gw.url("/api/oauth2/token");

    let r = c
        .request(
            Method::POST,
            &url,
            &[("content-type", "application/json")],
            Bytes::from("{\"grant_type\":\"password\"}"),
        )
        .await;
    assert_eq!(error_of(r).await, (400, "invalid_request".to_owned()));

    let r = c
        .request(
            Method::POST,
            &url,
            &[("content-type", "application/x-www-form-urlencoded")],
            Bytes::from("grant_type=password&grant_type=refresh_token&client_id=web"),
        )
        .await;
    let (status, code) = (r.status, json(&r.body));
    assert_eq!((status, code["error"].as_str()), (400, Some("invalid_request")));
    assert!(
        code["error_description"]
            .as_str()
            .unwrap()
            .contains("grant_type is repeated")
    );

    // Parameters the endpoint does not use are ignored (RFC 6749 §3.1), repeated or not.
    let body = format!("x=1&x=2&grant_type=password&client_id=web&username={USER}&password={PASSWORD}&utm=a");
    let r = c
        .request(
            Method::POST,
            &url,
            &[("content-type", "application/x-www-form-urlencoded")],
            Bytes::from(body),
        )
        .await;
    assert_eq!(r.status, 200, "{}", r.text());

    let big = format!("grant_type=password&client_id=web&username={}", "a".repeat(20_000));
    let r = c
        .request(
            Method::POST,
            &url,
            &[("content-type", "application/x-www-form-urlencoded")],
            Bytes::from(big),
        )
        .await;
    assert_eq!(r.status, 413);

    let r = c.get(&url, &[]).await;
    assert_eq!(r.status, 405);
    assert_eq!(r.header("allow"), "POST");

    let r = c
        .request(
            Method::POST,
            &url,
            &[("content-type", "application/x-www-form-urlencoded")],
            Bytes::from_static(b"\xff\xfe=%zz&&=="),
        )
        .await;
    assert_eq!(r.status, 400);
}

#[tokio::test]
async fn repeated_login_failures_back_off_without_checking_the_password() {
    let gw = support::start_with_routes("", &[ORDERS]).await;
    let c = Client::new(Proto::Http1);
    let url = gw.url("/api/oauth2/token");
    let attempt = |password: &'static str| {
        let (c, url) = (c.clone(), url.clone());
        async move {
            c.form(
                &url,
                &[
                    ("grant_type", "password"),
                    ("client_id", "web"),
                    ("username", USER),
                    ("password", password),
                ],
                &[],
            )
            .await
        }
    };
    for _ in 0..5 {
        assert_eq!(attempt("wrong").await.status, 400);
    }
    let r = attempt(PASSWORD).await;
    assert_eq!(r.status, 429, "even the right password waits");
    assert_eq!(r.header("retry-after"), "1");
    gw.clock.advance(Duration::from_secs(1));
    assert_eq!(
        attempt(PASSWORD).await.status,
        200,
        "after the wait the right password works"
    );
}

/// A user whose hash takes about a second to check (Argon2id m=8 MiB, t=160): while it runs, the
/// gateway's single Argon2 thread is busy, so logins sent meanwhile stay queued. The second is
/// the margin for the few milliseconds this test needs between seeing a job queued and the
/// gateway seeing its client go.
const SLOW_USER: &str = "slowpoke";
const SLOW_PASSWORD: &str = "slowpoke-password-2718";
const SLOW_HASH: &str =
    "$argon2id$v=19$m=8192,t=160,p=1$c2xvd3Bva2Utc2FsdC0wMQ$Q5HXnKro1zcflNYcxtxtwmVq17Sca5LSpP8ltWuAslM";

/// Starts a login over its own HTTP/1.1 TLS connection and returns the connection, to be dropped
/// by the caller (the client going away mid-check).
async fn start_login(
    gw: &support::TestGateway,
    client_id: &str,
    username: &str,
    password: &str,
) -> tokio_rustls::client::TlsStream<tokio::net::TcpStream> {
    let body: String = form_urlencoded::Serializer::new(String::new())
        .extend_pairs([
            ("grant_type", "password"),
            ("client_id", client_id),
            ("username", username),
            ("password", password),
        ])
        .finish();
    let tcp = tokio::net::TcpStream::connect(gw.addr).await.unwrap();
    let connector = tokio_rustls::TlsConnector::from(std::sync::Arc::new(support::client::tls_config(&[b"http/1.1"])));
    let mut tls = connector.connect("localhost".try_into().unwrap(), tcp).await.unwrap();
    let head = format!(
        "POST /api/oauth2/token HTTP/1.1\r\nHost: localhost\r\n\
         Content-Type: application/x-www-form-urlencoded\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    );
    tokio::io::AsyncWriteExt::write_all(&mut tls, head.as_bytes())
        .await
        .unwrap();
    tls
}

/// Waits until `cond` holds (a hang guard, not a timing assertion).
async fn wait_until(what: &str, mut cond: impl FnMut() -> bool) {
    let waited = tokio::time::timeout(Duration::from_secs(30), async {
        while !cond() {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    })
    .await;
    assert!(waited.is_ok(), "gave up waiting until {what}");
}

fn abandoned_lines(logs: &str, needle: &str) -> Vec<String> {
    logs.lines()
        .filter(|l| l.contains("login_abandoned") && l.contains(needle))
        .map(String::from)
        .collect()
}

/// Issue 8: logins abandoned by the client while their password is being checked are failures
/// (5 of them and the username backs off), each is audited, none frees the Argon2 thread early,
/// and the queued ones are never checked at all.
#[tokio::test]
async fn logins_abandoned_mid_check_count_as_failures_and_hold_the_argon2_bound() {
    let gw = support::start(&support::config_toml(
        "password_hash_concurrency = 1",
        &format!(
            "[[users]]\nusername = \"{SLOW_USER}\"\npassword_hash = \"{SLOW_HASH}\"\nscopes = [\"orders:read\"]\n"
        ),
    ))
    .await;
    let typed_in_username = "hunter2-typed-into-the-username-field";

    // The first login takes the only Argon2 thread for about a second...
    let mut conns = vec![start_login(&gw, "web", SLOW_USER, SLOW_PASSWORD).await];
    let pool = |gw: &support::TestGateway| gw.running.as_ref().unwrap().password_pool().stats();
    wait_until("the first check runs", || pool(&gw).running == 1).await;
    // ...so these wait in the queue: four more for the same user, one for an unknown username.
    for _ in 0..4 {
        conns.push(start_login(&gw, "web", SLOW_USER, SLOW_PASSWORD).await);
    }
    conns.push(start_login(&gw, "mobile", typed_in_username, SLOW_PASSWORD).await);
    wait_until("five logins are queued", || pool(&gw).queued == 5).await;
    let s = pool(&gw);
    assert_eq!(
        (s.running, s.run),
        (1, 0),
        "nothing finished before the clients left: {s:?}"
    );

    // Every client goes away.
    drop(conns);
    wait_until("six abandoned logins are audited", || {
        let logs = support::logs::captured();
        abandoned_lines(&logs, &format!("username=\"{SLOW_USER}\"")).len() == 5
            && abandoned_lines(&logs, "client=\"mobile\"").len() == 1
    })
    .await;

    // Five abandoned attempts are five failures: the next login for the user waits.
    let r = Client::new(Proto::Http1)
        .form(
            &gw.url("/api/oauth2/token"),
            &[
                ("grant_type", "password"),
                ("client_id", "web"),
                ("username", SLOW_USER),
                ("password", SLOW_PASSWORD),
            ],
            &[],
        )
        .await;
    assert_eq!(r.status, 429, "{}", r.text());
    assert_eq!(r.header("retry-after"), "1");

    // The running check ended in its slot; the queued ones, whose clients had gone, never ran.
    wait_until("the pool has dealt with every job", || {
        let s = pool(&gw);
        s.run + s.skipped == 6
    })
    .await;
    let s = pool(&gw);
    assert_eq!((s.run, s.skipped, s.peak_running), (1, 5, 1), "{s:?}");

    let logs = support::logs::captured();
    let line = &abandoned_lines(&logs, "client=\"mobile\"")[0];
    assert!(
        line.contains("username=\"(unknown user)\"") && line.contains("peer=127.0.0.1"),
        "{line}"
    );
    assert!(abandoned_lines(&logs, SLOW_USER)[0].contains("client=\"web\""));
    assert!(
        !logs.contains(typed_in_username),
        "an unknown username reached the logs"
    );
    assert!(!logs.contains(SLOW_PASSWORD), "a password reached the logs");
}

#[tokio::test]
async fn revocation_by_refresh_token_by_access_token_and_of_unknown_tokens() {
    let gw = support::start_with_routes("", &[ORDERS]).await;
    let c = Client::new(Proto::Http1);
    let revoke = |token: String, client: &'static str| {
        let (c, url) = (c.clone(), gw.url("/api/oauth2/revoke"));
        async move { c.form(&url, &[("token", &token), ("client_id", client)], &[]).await }
    };

    // By refresh token: the family dies, so does its access token.
    let s = login(&c, &gw, None).await;
    assert_eq!(revoke(str_of(&s, "refresh_token").to_owned(), "web").await.status, 200);
    assert_eq!(refresh(&c, &gw, str_of(&s, "refresh_token"), "web").await.status, 400);
    assert_eq!(
        c.get_with_token(&gw.url("/api/orders"), str_of(&s, "access_token"))
            .await
            .status,
        401
    );

    // By access token: same.
    let s = login(&c, &gw, None).await;
    assert_eq!(
        c.get_with_token(&gw.url("/api/orders"), str_of(&s, "access_token"))
            .await
            .status,
        200
    );
    let r = revoke(str_of(&s, "access_token").to_owned(), "web").await;
    assert_eq!(r.status, 200);
    assert_eq!(r.header("cache-control"), "no-store");
    assert_eq!(
        c.get_with_token(&gw.url("/api/orders"), str_of(&s, "access_token"))
            .await
            .status,
        401
    );
    assert_eq!(refresh(&c, &gw, str_of(&s, "refresh_token"), "web").await.status, 400);

    // Unknown tokens: 200, nothing happens.
    assert_eq!(revoke("no-such-token".into(), "web").await.status, 200);
    // Another client's token: refused, and the session lives on.
    let s = login(&c, &gw, None).await;
    assert_eq!(
        revoke(str_of(&s, "refresh_token").to_owned(), "mobile").await.status,
        400
    );
    assert_eq!(refresh(&c, &gw, str_of(&s, "refresh_token"), "web").await.status, 200);
}

#[tokio::test]
async fn tokens_and_passwords_never_reach_the_logs() {
    let gw = support::start_with_routes("reuse_grace = \"0s\"", &[ORDERS]).await;
    let c = Client::new(Proto::Http1);
    let s = login(&c, &gw, None).await;
    let r2 = json(&refresh(&c, &gw, str_of(&s, "refresh_token"), "web").await.body);
    refresh(&c, &gw, str_of(&s, "refresh_token"), "web").await; // reuse: audit event
    c.get_with_token(&gw.url("/api/orders?access_token=x"), str_of(&r2, "access_token"))
        .await;
    let secret_password = "pw-that-must-not-be-logged-3141";
    c.form(
        &gw.url("/api/oauth2/token"),
        &[
            ("grant_type", "password"),
            ("client_id", "web"),
            ("username", USER),
            ("password", secret_password),
        ],
        &[],
    )
    .await;

    let logs = support::logs::captured();
    assert!(logs.contains("tokengate::access"), "the access log is captured");
    for secret in [
        str_of(&s, "access_token"),
        str_of(&s, "refresh_token"),
        str_of(&r2, "access_token"),
        str_of(&r2, "refresh_token"),
        PASSWORD,
        secret_password,
    ] {
        assert!(!logs.contains(secret), "a secret reached the logs");
    }
}

#[tokio::test]
async fn every_json_body_ends_with_a_newline_and_a_replay_is_byte_identical() {
    let gw = support::start_with_routes("", &[ORDERS]).await;
    let c = Client::new(Proto::Http1);
    let token_url = gw.url("/api/oauth2/token");
    let ends_with_newline = |what: &str, r: &support::Resp| {
        assert_eq!(r.header("content-type"), "application/json", "{what}");
        assert_eq!(r.body.last(), Some(&b'\n'), "{what}: {:?}", r.text());
        json(&r.body);
    };
    let form = [
        ("grant_type", "password"),
        ("client_id", "web"),
        ("username", USER),
        ("password", PASSWORD),
    ];
    let login = c.form(&token_url, &form, &[]).await;
    assert_eq!(login.status, 200);
    ends_with_newline("password grant", &login);
    let first = json(&login.body);

    let rotated = refresh(&c, &gw, str_of(&first, "refresh_token"), "web").await;
    assert_eq!(rotated.status, 200);
    ends_with_newline("refresh grant", &rotated);
    let replayed = refresh(&c, &gw, str_of(&first, "refresh_token"), "web").await;
    assert_eq!(replayed.status, 200);
    assert_eq!(
        replayed.body, rotated.body,
        "the replay within the grace is the first response, byte for byte"
    );

    let basic = format!("Basic {}", STANDARD.encode(format!("svc:{SERVICE_SECRET}")));
    let r = c
        .form(
            &token_url,
            &[("grant_type", "client_credentials")],
            &[("authorization", &basic)],
        )
        .await;
    assert_eq!(r.status, 200);
    ends_with_newline("client_credentials grant", &r);

    let r = c
        .form(&token_url, &[("grant_type", "password"), ("client_id", "web")], &[])
        .await;
    assert_eq!(r.status, 400);
    ends_with_newline("an error", &r);

    let r = c
        .form(
            &gw.url("/api/oauth2/revoke"),
            &[("client_id", "web"), ("token", str_of(&first, "access_token"))],
            &[],
        )
        .await;
    assert_eq!((r.status, r.text().as_str()), (200, "{}\n"));
    ends_with_newline("revoke", &r);

    let fresh = json(&c.form(&token_url, &form, &[]).await.body);
    let r = c
        .get_with_token(&gw.url("/api/orders"), str_of(&fresh, "access_token"))
        .await;
    assert_eq!(r.status, 200);
    ends_with_newline("the echo upstream", &r);
}
