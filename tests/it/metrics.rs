//! `/metrics` on the admin listener: a real Prometheus text parser reads it, and the counters move
//! by exactly the traffic the test sent.

use std::collections::HashMap;
use std::time::Duration;

use crate::support::upstream::closed_port;
use crate::support::{self, Client, Proto, login, refresh, str_of};

/// Sample name + sorted labels → value.
type Samples = HashMap<String, f64>;

async fn scrape(gw: &support::TestGateway) -> (String, Samples) {
    let url = format!("http://{}/metrics", gw.admin_addr);
    let client = hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
        .build_http::<http_body_util::Empty<bytes::Bytes>>();
    let resp = client.get(url.parse().unwrap()).await.unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(
        resp.headers()["content-type"],
        "text/plain; version=0.0.4; charset=utf-8"
    );
    use http_body_util::BodyExt;
    let body = resp.into_body().collect().await.unwrap().to_bytes();
    let text = String::from_utf8(body.to_vec()).unwrap();
    let lines = text.lines().map(|l| Ok(l.to_owned()));
    let scrape = prometheus_parse::Scrape::parse(lines).expect("the exposition parses");
    let mut samples = Samples::new();
    for s in scrape.samples {
        let mut labels: Vec<String> = s.labels.iter().map(|(k, v)| format!("{k}={v}")).collect();
        labels.sort();
        let value = match s.value {
            prometheus_parse::Value::Counter(v)
            | prometheus_parse::Value::Gauge(v)
            | prometheus_parse::Value::Untyped(v) => v,
            prometheus_parse::Value::Histogram(h) => {
                // The +Inf bucket is the count.
                h.iter().map(|b| b.count).fold(0.0, f64::max)
            }
            prometheus_parse::Value::Summary(_) => continue,
        };
        samples.insert(format!("{}{{{}}}", s.metric, labels.join(",")), value);
    }
    (text, samples)
}

fn get(samples: &Samples, key: &str) -> f64 {
    samples.get(key).copied().unwrap_or(0.0)
}

#[tokio::test]
async fn counters_move_by_exactly_the_traffic_sent() {
    let down = closed_port().await;
    let gw = support::start_with_routes(
        "",
        &[
            ("/api/orders", "echo", "scopes = [\"orders:read\"]"),
            ("/api/reports", "echo", "scopes = [\"reports:read\"]"),
            ("/down", &format!("http://{down}"), "auth = \"none\""),
        ],
    )
    .await;
    let (text, before) = scrape(&gw).await;
    for family in [
        "tokengate_requests_total",
        "tokengate_request_duration_seconds",
        "tokengate_inflight_requests",
        "tokengate_token_checks_total",
        "tokengate_token_cache_requests_total",
        "tokengate_grants_total",
        "tokengate_revocations_total",
        "tokengate_sessions_active",
        "tokengate_upstream_errors_total",
        "tokengate_connections_open",
        "tokengate_connections_parked",
        "tokengate_config_reloads_total",
        "tokengate_config_last_reload_success_timestamp_seconds",
        "tokengate_tls_cert_not_after_seconds",
        "tokengate_build_info",
    ] {
        assert!(
            text.contains(&format!("# TYPE {family}"))
                || text.contains(&format!("# TYPE {}", family.trim_end_matches("_total"))),
            "{family} missing:\n{text}"
        );
    }
    assert!(get(&before, "tokengate_tls_cert_not_after_seconds{}") > 1.7e9);

    let c = Client::new(Proto::Http1);
    let l = login(&c, &gw, None).await; // grants{password,success}
    let (at, rt) = (str_of(&l, "access_token"), str_of(&l, "refresh_token"));
    for _ in 0..3 {
        assert_eq!(c.get_with_token(&gw.url("/api/orders/1"), at).await.status, 200);
    }
    assert_eq!(c.get(&gw.url("/api/orders/1"), &[]).await.status, 401);
    assert_eq!(c.get_with_token(&gw.url("/api/reports/1"), at).await.status, 403);
    assert_eq!(c.get(&gw.url("/nowhere"), &[]).await.status, 404);
    assert_eq!(c.get(&gw.url("/down/x"), &[]).await.status, 502);
    let bad = c
        .form(
            &gw.url("/api/oauth2/token"),
            &[
                ("grant_type", "password"),
                ("client_id", "web"),
                ("username", support::USER),
                ("password", "wrong"),
            ],
            &[],
        )
        .await;
    assert_eq!(bad.status, 400);
    let r = refresh(&c, &gw, rt, "web").await;
    assert_eq!(r.status, 200);
    let revoke = c
        .form(
            &gw.url("/api/oauth2/revoke"),
            &[("client_id", "web"), ("token", at)],
            &[],
        )
        .await;
    assert_eq!(revoke.status, 200);

    let expected: &[(&str, f64)] = &[
        ("tokengate_requests_total{route=/api/orders,status=200}", 3.0),
        ("tokengate_requests_total{route=/api/orders,status=401}", 1.0),
        ("tokengate_requests_total{route=/api/reports,status=403}", 1.0),
        ("tokengate_requests_total{route=none,status=404}", 1.0),
        ("tokengate_requests_total{route=/down,status=502}", 1.0),
        ("tokengate_requests_total{route=/api/oauth2/token,status=200}", 2.0),
        ("tokengate_requests_total{route=/api/oauth2/token,status=400}", 1.0),
        ("tokengate_requests_total{route=/api/oauth2/revoke,status=200}", 1.0),
        ("tokengate_request_duration_seconds{route=/api/orders}", 4.0),
        ("tokengate_token_checks_total{outcome=valid}", 3.0),
        ("tokengate_token_checks_total{outcome=missing}", 1.0),
        ("tokengate_token_checks_total{outcome=insufficient_scope}", 1.0),
        ("tokengate_token_cache_requests_total{result=miss}", 1.0),
        ("tokengate_token_cache_requests_total{result=hit}", 3.0),
        ("tokengate_grants_total{grant_type=password,outcome=success}", 1.0),
        ("tokengate_grants_total{grant_type=password,outcome=invalid_grant}", 1.0),
        ("tokengate_grants_total{grant_type=refresh_token,outcome=success}", 1.0),
        ("tokengate_revocations_total{reason=revoked_by_client}", 1.0),
        ("tokengate_upstream_errors_total{kind=connect,route=/down}", 1.0),
    ];
    // The counters move when each response body has been sent, just after the client has it:
    // wait (with a hang guard) for the last of them, then check every one is exactly right.
    let after = tokio::time::timeout(Duration::from_secs(20), async {
        loop {
            let (_, now) = scrape(&gw).await;
            if expected.iter().all(|(k, v)| get(&now, k) - get(&before, k) >= *v) {
                return now;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await
    .expect("the counters never reached the traffic sent");
    for (key, delta) in expected {
        assert_eq!(get(&after, key) - get(&before, key), *delta, "{key}");
    }
    assert_eq!(get(&after, "tokengate_sessions_active{}"), 1.0);
}
