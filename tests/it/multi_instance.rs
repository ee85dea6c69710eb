//! Several instances, one truth: two gateways in-process on one Redis of the test's own (its own
//! port and folder, killed on drop), sharing a manual clock. A token from one refreshes on the
//! other, races across instances agree, a revocation or a detected reuse on one is enforced on
//! the other, an outage is survived and recovered from, and sessions outlive both gateways.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use tokengate::ManualClock;
use tokengate::ids::{SessionId, parse_refresh_token};
use tokengate::store::redis::StoreObserver;
use tokengate::store::redis::testing::RedisServer;
use tokengate::store::{SessionStore, Store};

use crate::support::{self, Client, Proto, Resp, TestGateway, login, refresh, str_of};

/// Bound for conditions expected within milliseconds: a hang guard, not a timing assertion.
const HANG_GUARD: Duration = Duration::from_secs(30);

fn redis() -> RedisServer {
    RedisServer::start().unwrap_or_else(|e| panic!("{e}"))
}

fn prefix() -> String {
    static N: AtomicU64 = AtomicU64::new(0);
    format!("it{}-{}:", std::process::id(), N.fetch_add(1, Ordering::Relaxed))
}

fn toml(redis: &RedisServer, prefix: &str, grace: &str) -> String {
    // Forty TLS handshakes at once on a shared machine with a debug build take longer than the
    // usual test configs' 300 ms.
    support::config_toml(
        &format!("reuse_grace = \"{grace}\""),
        &format!(
            "[[routes]]\npath_prefix = \"/api/orders\"\nupstream = \"echo\"\nscopes = [\"orders:read\"]\n\n\
             [state]\nredis_url = \"{}\"\nkey_prefix = \"{prefix}\"\n",
            redis.url()
        ),
    )
    .replace("handshake_timeout = \"300ms\"", "handshake_timeout = \"20s\"")
    .replace("header_read_timeout = \"300ms\"", "header_read_timeout = \"20s\"")
}

struct Pair {
    a: TestGateway,
    b: TestGateway,
    clock: Arc<ManualClock>,
    toml: String,
    prefix: String,
}

async fn pair(redis: &RedisServer, grace: &str) -> Pair {
    let prefix = prefix();
    let toml = toml(redis, &prefix, grace);
    let clock = Arc::new(ManualClock::new());
    let a = support::start_with_clock(&toml, clock.clone()).await;
    let b = support::start_with_clock(&toml, clock.clone()).await;
    Pair {
        a,
        b,
        clock,
        toml,
        prefix,
    }
}

fn sid(refresh_token: &str) -> SessionId {
    parse_refresh_token(refresh_token).unwrap().0
}

async fn api(c: &Client, gw: &TestGateway, access_token: &str) -> u16 {
    c.get_with_token(&gw.url("/api/orders"), access_token).await.status
}

async fn revoke(c: &Client, gw: &TestGateway, token: &str) -> Resp {
    c.form(
        &gw.url("/api/oauth2/revoke"),
        &[("token", token), ("client_id", "web")],
        &[],
    )
    .await
}

async fn admin(gw: &TestGateway, path: &str) -> (u16, String) {
    use http_body_util::BodyExt;
    let plain = hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
        .build_http::<http_body_util::Empty<bytes::Bytes>>();
    let r = plain
        .get(format!("http://{}{path}", gw.admin_addr).parse().unwrap())
        .await
        .unwrap();
    let status = r.status().as_u16();
    let body = r.into_body().collect().await.unwrap().to_bytes();
    (status, String::from_utf8_lossy(&body).into_owned())
}

/// Polls `cond` (each poll is a request or a memory read) until it holds; panics after the guard.
async fn eventually<F: Future<Output = bool>>(what: &str, mut cond: impl FnMut() -> F) {
    let deadline = Instant::now() + HANG_GUARD;
    while !cond().await {
        assert!(Instant::now() < deadline, "still waiting for: {what}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

fn is_invalid_grant(r: &Resp) -> bool {
    r.status == 400 && support::json(&r.body)["error"] == "invalid_grant"
}

#[tokio::test]
async fn a_token_from_one_instance_refreshes_on_the_other_and_a_retry_there_is_identical() {
    let redis = redis();
    let p = pair(&redis, "10s").await;
    let c = Client::new(Proto::Http1);
    let l = login(&c, &p.a, None).await;
    let rt = str_of(&l, "refresh_token");
    assert_eq!(api(&c, &p.b, str_of(&l, "access_token")).await, 200);

    let first = refresh(&c, &p.b, rt, "web").await;
    assert_eq!(first.status, 200, "{}", first.text());
    p.clock.advance(Duration::from_secs(5));
    // The response was lost; the client retries on whichever instance the balancer picks.
    let on_a = refresh(&c, &p.a, rt, "web").await;
    let on_b = refresh(&c, &p.b, rt, "web").await;
    assert_eq!(on_a.body, first.body, "byte-identical on the other instance");
    assert_eq!(on_b.body, first.body);
    let next = str_of(&support::json(&first.body), "refresh_token").to_owned();
    assert_eq!(
        refresh(&c, &p.a, &next, "web").await.status,
        200,
        "the replayed token is live"
    );
}

async fn forty_concurrent_refreshes(p: &Pair, rt: &str) -> Vec<Resp> {
    let tasks: Vec<_> = (0..40)
        .map(|i| {
            let url = if i % 2 == 0 {
                p.a.url("/api/oauth2/token")
            } else {
                p.b.url("/api/oauth2/token")
            };
            let rt = rt.to_owned();
            tokio::spawn(async move {
                Client::new(Proto::Http1)
                    .form(
                        &url,
                        &[
                            ("grant_type", "refresh_token"),
                            ("client_id", "web"),
                            ("refresh_token", &rt),
                        ],
                        &[],
                    )
                    .await
            })
        })
        .collect();
    let mut out = Vec::new();
    for t in tasks {
        out.push(t.await.unwrap());
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn forty_concurrent_refreshes_over_two_instances_within_the_grace_get_one_response() {
    let redis = redis();
    let p = pair(&redis, "10s").await;
    let c = Client::new(Proto::Http1);
    let rt = str_of(&login(&c, &p.a, None).await, "refresh_token").to_owned();
    let all = forty_concurrent_refreshes(&p, &rt).await;
    assert!(all.iter().all(|r| r.status == 200), "every one succeeds");
    assert!(
        all.windows(2).all(|w| w[0].body == w[1].body),
        "with the one identical body"
    );
    let at = str_of(&support::json(&all[0].body), "access_token").to_owned();
    assert_eq!(api(&c, &p.a, &at).await, 200, "and the session is not revoked");
    assert_eq!(api(&c, &p.b, &at).await, 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn forty_concurrent_refreshes_over_two_instances_without_a_grace_make_one_success_and_a_revoked_session() {
    let redis = redis();
    let p = pair(&redis, "0s").await;
    let c = Client::new(Proto::Http1);
    let rt = str_of(&login(&c, &p.a, None).await, "refresh_token").to_owned();
    let all = forty_concurrent_refreshes(&p, &rt).await;
    let won: Vec<_> = all.iter().filter(|r| r.status == 200).collect();
    assert_eq!(won.len(), 1, "exactly one success");
    assert!(all.iter().filter(|r| r.status != 200).all(is_invalid_grant));
    let winner = support::json(&won[0].body);
    let at = str_of(&winner, "access_token").to_owned();
    for gw in [&p.a, &p.b] {
        eventually("the session's access token refused on both", || {
            api(&c, gw, &at).map(|s| s == 401)
        })
        .await;
    }
    assert!(is_invalid_grant(
        &refresh(&c, &p.b, str_of(&winner, "refresh_token"), "web").await
    ));
}

use futures_util::FutureExt;

#[derive(Default)]
struct Lags(std::sync::Mutex<Vec<Duration>>);

impl StoreObserver for Lags {
    fn revocation_propagated(&self, lag: Duration) {
        self.0.lock().unwrap().push(lag);
    }
}

fn redis_store(gw: &mut TestGateway) -> &tokengate::store::RedisStore {
    match &gw.running().app().state().store {
        Store::Redis(s) => s,
        Store::Memory(_) | Store::Durable(_) => panic!("not the Redis store"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_revocation_on_one_instance_is_enforced_on_the_other() {
    let redis = redis();
    let mut p = pair(&redis, "10s").await;
    let lags = Arc::new(Lags::default());
    redis_store(&mut p.b).observe(lags.clone());
    let c = Client::new(Proto::Http1);
    let l = login(&c, &p.a, None).await;
    let (rt, at) = (str_of(&l, "refresh_token"), str_of(&l, "access_token"));
    assert_eq!(api(&c, &p.b, at).await, 200);

    let b_state = p.b.running().app().state().clone();
    let (sid, now) = (sid(rt), p.clock.now_secs());
    let started = Instant::now();
    assert_eq!(revoke(&c, &p.a, at).await.status, 200);
    let answered = started.elapsed();
    let deadline = Instant::now() + HANG_GUARD;
    while !b_state.revoked.is_revoked(sid, now) {
        assert!(Instant::now() < deadline, "B never learned of the revocation");
        tokio::task::yield_now().await;
    }
    let enforced = started.elapsed();
    assert_eq!(api(&c, &p.b, at).await, 401, "refused on B");
    // Counted just after the set is updated, so read it until it shows.
    eventually("the lag is exported", || {
        admin(&p.b, "/metrics").map(|(_, m)| {
            m.lines()
                .any(|l| l.starts_with("tokengate_revocation_propagation_seconds_count ") && !l.ends_with(" 0"))
        })
    })
    .await;
    println!(
        "revocation A → B: revoke answered after {answered:?}, enforced on B {enforced:?} after the request \
         was sent; stream lag (Redis append → applied on B) {:?}",
        lags.0.lock().unwrap().first()
    );
}

use tokengate::Clock;

#[tokio::test]
async fn reuse_detected_on_one_instance_is_enforced_on_the_other() {
    let redis = redis();
    let p = pair(&redis, "10s").await;
    let c = Client::new(Proto::Http1);
    let rt1 = str_of(&login(&c, &p.a, None).await, "refresh_token").to_owned();
    let r2 = support::json(&refresh(&c, &p.a, &rt1, "web").await.body);
    let at2 = str_of(&r2, "access_token").to_owned();
    assert_eq!(api(&c, &p.a, &at2).await, 200);
    p.clock.advance(Duration::from_secs(11));
    // The old token, after the grace, on the other instance: theft.
    assert!(is_invalid_grant(&refresh(&c, &p.b, &rt1, "web").await));
    eventually("A refuses the session's newest access token", || {
        api(&c, &p.a, &at2).map(|s| s == 401)
    })
    .await;
    assert!(is_invalid_grant(
        &refresh(&c, &p.a, str_of(&r2, "refresh_token"), "web").await
    ));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_down_means_503_at_the_token_endpoint_api_still_served_then_recovery_without_a_restart() {
    let mut redis = redis();
    let p = pair(&redis, "10s").await;
    let c = Client::new(Proto::Http1);
    let l = login(&c, &p.a, None).await;
    let (rt, at) = (
        str_of(&l, "refresh_token").to_owned(),
        str_of(&l, "access_token").to_owned(),
    );
    assert_eq!(admin(&p.a, "/readyz").await.0, 200);

    redis.stop();
    let r = refresh(&c, &p.a, &rt, "web").await;
    assert_eq!(r.status, 503, "{}", r.text());
    assert_eq!(support::json(&r.body)["error"], "temporarily_unavailable");
    assert_eq!(r.header("retry-after"), "1");
    let r = c
        .form(
            &p.b.url("/api/oauth2/token"),
            &[
                ("grant_type", "password"),
                ("client_id", "web"),
                ("username", support::USER),
                ("password", support::PASSWORD),
            ],
            &[],
        )
        .await;
    assert_eq!(r.status, 503, "logins fail closed: {}", r.text());
    assert_eq!(revoke(&c, &p.b, &at).await.status, 503);
    for gw in [&p.a, &p.b] {
        assert_eq!(api(&c, gw, &at).await, 200, "valid, unrevoked tokens are still served");
        eventually("/readyz reports degraded", || {
            admin(gw, "/readyz").map(|(s, body)| s == 503 && body.contains("degraded: session store unavailable"))
        })
        .await;
        assert_eq!(admin(gw, "/healthz").await.0, 200, "alive");
        let (_, metrics) = admin(gw, "/metrics").await;
        assert!(
            metrics.lines().any(|l| l == "tokengate_store_available 0"),
            "the outage is a metric"
        );
    }

    redis.restart().unwrap();
    let deadline = Instant::now() + HANG_GUARD;
    let rotated = loop {
        let r = refresh(&c, &p.a, &rt, "web").await;
        match r.status {
            200 => break r,
            503 => assert!(Instant::now() < deadline, "the token endpoint never recovered"),
            _ => panic!("{}", r.text()),
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    };
    for gw in [&p.a, &p.b] {
        eventually("/readyz ready again", || admin(gw, "/readyz").map(|(s, _)| s == 200)).await;
        let (_, metrics) = admin(gw, "/metrics").await;
        assert!(metrics.lines().any(|l| l == "tokengate_store_available 1"));
    }
    let logs = support::logs::captured();
    let ours = |line: &&str| line.contains(&p.prefix);
    assert!(
        logs.lines()
            .filter(ours)
            .any(|l| l.contains("WARN") && l.contains("Redis is unavailable")),
        "a WARN when it went down"
    );
    assert!(
        logs.lines()
            .filter(ours)
            .any(|l| l.contains("INFO") && l.contains("Redis is available again")),
        "an INFO when it came back"
    );
    let next = support::json(&rotated.body);
    assert_eq!(revoke(&c, &p.b, str_of(&next, "access_token")).await.status, 200);
}

#[tokio::test]
async fn sessions_and_revocations_survive_a_restart_of_both_instances() {
    let redis = redis();
    let mut p = pair(&redis, "10s").await;
    let c = Client::new(Proto::Http1);
    let kept = login(&c, &p.a, None).await;
    let gone = login(&c, &p.b, None).await;
    assert_eq!(revoke(&c, &p.b, str_of(&gone, "access_token")).await.status, 200);
    p.a.running.take().unwrap().shutdown().await;
    p.b.running.take().unwrap().shutdown().await;

    let a = support::start_with_clock(&p.toml, p.clock.clone()).await;
    let b = support::start_with_clock(&p.toml, p.clock.clone()).await;
    assert_eq!(
        api(&c, &b, str_of(&gone, "access_token")).await,
        401,
        "a revocation made before the restart is known from the first request"
    );
    assert_eq!(api(&c, &b, str_of(&kept, "access_token")).await, 200);
    let r = refresh(&c, &a, str_of(&kept, "refresh_token"), "web").await;
    assert_eq!(r.status, 200, "the session lives in Redis: {}", r.text());
    assert!(is_invalid_grant(
        &refresh(&c, &b, str_of(&gone, "refresh_token"), "web").await
    ));
    assert_eq!(
        a.running
            .as_ref()
            .unwrap()
            .app()
            .state()
            .store
            .session_count()
            .await
            .unwrap(),
        2
    );
}

#[tokio::test]
async fn the_login_limiter_counts_guesses_across_instances() {
    let redis = redis();
    let p = pair(&redis, "10s").await;
    let c = Client::new(Proto::Http1);
    let guess = |gw: &TestGateway, password: &'static str| {
        let url = gw.url("/api/oauth2/token");
        let c = &c;
        async move {
            c.form(
                &url,
                &[
                    ("grant_type", "password"),
                    ("client_id", "web"),
                    ("username", support::USER),
                    ("password", password),
                ],
                &[],
            )
            .await
        }
    };
    // Five free failures per username in all, not five per instance.
    for gw in [&p.a, &p.b, &p.a, &p.b, &p.a] {
        assert_eq!(guess(gw, "wrong").await.status, 400);
    }
    let r = guess(&p.b, support::PASSWORD).await;
    assert_eq!(
        r.status,
        429,
        "the sixth try waits, whichever instance it reaches: {}",
        r.text()
    );
    assert_eq!(support::json(&r.body)["error"], "slow_down");
}
