//! Micro-benchmarks of the request hot path and the token lifecycle, each group answering one
//! question. Run: `cargo bench --bench hot_path`.

// Bench set-up that fails should abort the run loudly.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::hint::black_box;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use criterion::{BatchSize, Criterion, criterion_group, criterion_main};
use http::{HeaderMap, HeaderValue};
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use tokengate::auth::bearer::parse_bearer;
use tokengate::auth::{RevokedSessions, Validator};
use tokengate::config::Config;
use tokengate::oauth::issuer::{Issuer, mint_refresh_token};
use tokengate::oauth::registry::{RefreshRegistry, RegistryLimits, Rotation};
use tokengate::proxy::headers::{RequestContext, upstream_request_headers};
use tokengate::routing::RouteTable;
use tokengate::scope::ScopeSet;
use tokengate::{Clock, ManualClock, SharedClock};

const SECRET: &str = "bench-secret-bench-secret-bench-secret-0123";

fn config(cache_capacity: u64) -> Config {
    let toml = format!(
        r#"
[server]
listen = "127.0.0.1:0"
[tokens]
issuer = "https://bench"
audience = "api"
cache_capacity = {cache_capacity}
signing = {{ secret = "file:{}" }}
[[clients]]
id = "web"
grants = ["password", "refresh_token"]
scopes = ["orders:read"]
[[routes]]
path_prefix = "/api/orders"
upstream = "echo"
scopes = ["orders:read"]
"#,
        secret_file().display()
    );
    Config::from_toml(&toml, Path::new("."), "bench.toml").unwrap_or_else(|e| panic!("{e}"))
}

fn secret_file() -> std::path::PathBuf {
    let p = std::env::temp_dir().join("tokengate-bench-secret");
    std::fs::write(&p, SECRET).unwrap();
    p
}

fn now() -> u64 {
    ManualClock::new().now_secs()
}

fn token(i: u64) -> String {
    let mut h = Header::new(Algorithm::HS256);
    h.typ = Some("at+jwt".into());
    let n = now();
    let claims = serde_json::json!({
        "iss": "https://bench", "aud": "api", "sub": format!("user-{i}"), "client_id": "web",
        "scope": "orders:read", "sid": format!("sid-{i}"), "jti": format!("j{i}"), "iat": n, "exp": n + 900,
    });
    jsonwebtoken::encode(&h, &claims, &EncodingKey::from_secret(SECRET.as_bytes())).unwrap()
}

fn validator(cache_capacity: u64, revoked: Arc<RevokedSessions>) -> Validator {
    let c = config(cache_capacity);
    let clock: SharedClock = Arc::new(ManualClock::new());
    Validator::new(&c.tokens, c.scopes.clone(), revoked, clock)
}

fn bench_bearer(c: &mut Criterion) {
    // How much does extracting the bearer token from the Authorization value cost?
    let value = format!("Bearer {}", token(1));
    c.bench_function("bearer/parse", |b| b.iter(|| parse_bearer(black_box(value.as_bytes()))));
}

fn bench_validation(c: &mut Criterion) {
    // What does a cached token cost per request, against verifying HS256 and parsing claims?
    let mut g = c.benchmark_group("validation");
    let v = validator(100_000, Arc::new(RevokedSessions::new()));
    let t = token(1);
    v.validate(&t).unwrap();
    g.bench_function("cache_hit", |b| b.iter(|| v.validate(black_box(&t)).unwrap()));
    let tokens: Vec<String> = (0..20_000).map(token).collect();
    let cold = validator(1, Arc::new(RevokedSessions::new()));
    let mut i = 0usize;
    g.bench_function("cache_miss_hs256", |b| {
        b.iter(|| {
            i = (i + 1) % tokens.len();
            cold.validate(black_box(&tokens[i])).unwrap()
        })
    });
    g.finish();
}

fn bench_routes(c: &mut Criterion) {
    // Does route lookup stay flat as the table grows (one hash probe per path segment)?
    let mut g = c.benchmark_group("route_resolution");
    for n in [10usize, 1000] {
        let prefixes: Vec<String> = (0..n).map(|i| format!("/api/service{i}/v1")).collect();
        let table = RouteTable::new(prefixes.iter().map(|p| (None, p.as_str()))).unwrap();
        let path = format!("/api/service{}/v1/orders/42", n / 2);
        g.bench_function(format!("{n}_routes"), |b| {
            b.iter(|| table.resolve(Some("localhost:8443"), black_box(&path)))
        });
    }
    g.finish();
}

fn bench_headers(c: &mut Criterion) {
    // What does header hygiene (hop-by-hop, identity, X-Forwarded-*) cost for a typical request?
    let mut h = HeaderMap::new();
    for (k, v) in [
        ("host", "localhost:8443"),
        ("user-agent", "curl/8.0"),
        ("accept", "*/*"),
        ("authorization", "Bearer abc.def.ghi"),
        ("content-type", "application/json"),
        ("x-custom", "1"),
    ] {
        h.insert(k, HeaderValue::from_static(v));
    }
    let identity = [
        HeaderValue::from_static("ann"),
        HeaderValue::from_static("web"),
        HeaderValue::from_static("orders:read"),
        HeaderValue::from_static("sid"),
    ];
    let rid = HeaderValue::from_static("0000-1");
    let up = HeaderValue::from_static("127.0.0.1:9000");
    let peer = HeaderValue::from_static("127.0.0.1");
    c.bench_function("headers/prepare_upstream", |b| {
        b.iter_batched(
            || h.clone(),
            |h| {
                let ctx = RequestContext {
                    peer_ip: &peer,
                    proto: "https",
                    original_host: Some(HeaderValue::from_static("localhost:8443")),
                    upstream_host: Some(&up),
                    identity: Some(&identity),
                    keep_authorization: false,
                    upgrade: false,
                    request_id: &rid,
                };
                upstream_request_headers(h, &ctx)
            },
            BatchSize::SmallInput,
        )
    });
}

fn bench_issue(c: &mut Criterion) {
    // What does minting a token pair (sign the JWT + a refresh token and its digest) cost?
    let cfg = config(10);
    let issuer = Issuer::new(&cfg.tokens);
    c.bench_function("issue/token_pair", |b| {
        b.iter(|| {
            let at = issuer
                .access_token("ann", "web", "orders:read", "c2lk", 1_800_000_000)
                .unwrap();
            let rt = mint_refresh_token().unwrap();
            black_box((at, rt))
        })
    });
}

fn limits() -> RegistryLimits {
    RegistryLimits {
        refresh_ttl: Duration::from_secs(86_400),
        session_max_lifetime: Duration::from_secs(30 * 86_400),
        reuse_grace: Duration::from_secs(10),
        access_ttl: Duration::from_secs(900),
    }
}

fn respond(r: &Rotation<'_>) -> Result<Vec<u8>, ()> {
    Ok(format!(
        "{{\"refresh_token\":\"{}\",\"access_token\":\"{}\"}}",
        r.refresh_token,
        "x".repeat(300)
    )
    .into_bytes())
}

fn next_token(body: &[u8]) -> String {
    std::str::from_utf8(body).unwrap().split('"').nth(3).unwrap().to_owned()
}

fn bench_registry(c: &mut Criterion) {
    // What does one rotation cost in the registry (digest, two map updates, sealing the replay
    // copy), alone and with two threads rotating their own sessions at once?
    let mut g = c.benchmark_group("registry_rotate");
    let now = 1_800_000_000_000u64;
    let reg = RefreshRegistry::new(limits(), Arc::new(RevokedSessions::new()));
    let mut t = reg.start_session(0, 0, ScopeSet(1), now).unwrap().refresh_token;
    g.bench_function("1_thread", |b| {
        b.iter(|| {
            t = next_token(&reg.rotate(&t, 0, now, respond).unwrap().into_body());
        })
    });
    let reg = Arc::new(RefreshRegistry::new(limits(), Arc::new(RevokedSessions::new())));
    g.bench_function("2_threads_contending", |b| {
        b.iter_custom(|iters| {
            let start = Instant::now();
            std::thread::scope(|s| {
                for _ in 0..2 {
                    let reg = reg.clone();
                    s.spawn(move || {
                        let mut t = reg.start_session(0, 0, ScopeSet(1), now).unwrap().refresh_token;
                        for _ in 0..iters.div_ceil(2) {
                            t = next_token(&reg.rotate(&t, 0, now, respond).unwrap().into_body());
                        }
                    });
                }
            });
            start.elapsed()
        })
    });
    g.finish();
}

fn bench_revoked(c: &mut Criterion) {
    // What does the per-request revoked-session check cost with no revocations and with 100k?
    let mut g = c.benchmark_group("revoked_check");
    let empty = RevokedSessions::new();
    g.bench_function("empty", |b| {
        b.iter(|| empty.is_revoked(black_box("c2lkLWFubg"), 1_800_000_000))
    });
    let full = RevokedSessions::new();
    for i in 0..100_000 {
        full.revoke(&format!("sid-{i}"), 1_900_000_000);
    }
    g.bench_function("100k_entries_miss", |b| {
        b.iter(|| full.is_revoked(black_box("c2lkLWFubg"), 1_800_000_000))
    });
    g.bench_function("100k_entries_hit", |b| {
        b.iter(|| full.is_revoked(black_box("sid-4242"), 1_800_000_000))
    });
    g.finish();
}

criterion_group!(
    benches,
    bench_bearer,
    bench_validation,
    bench_routes,
    bench_headers,
    bench_issue,
    bench_registry,
    bench_revoked
);
criterion_main!(benches);
