//! Micro-benchmarks of the request hot path and the token lifecycle, each group answering one
//! question. Run: `cargo bench --bench hot_path`.

// Bench set-up that fails should abort the run loudly.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::hint::black_box;
use std::path::Path;
use std::sync::Arc;
use std::time::Instant;

use criterion::{BatchSize, Criterion, criterion_group, criterion_main};
use http::{HeaderMap, HeaderValue};
use tokengate::auth::bearer::parse_bearer;
use tokengate::auth::{RevokedSessions, Validator};
use tokengate::config::{Config, SigningAlg};
use tokengate::crypto::random_bytes;
use tokengate::ids::{IssueRandom, SessionId, mint_refresh_token, refresh_token_from};
use tokengate::keys::KeySet;
use tokengate::oauth::issuer::Issuer;
use tokengate::proxy::headers::{Identity, RequestContext, upstream_request_headers};
use tokengate::routing::RouteTable;
use tokengate::store::registry::{NoRecorder, Registry};
use tokengate::store::{NewSession, Rotation};
use tokengate::{Clock, ManualClock, SharedClock};

const SECRET: &str = "bench-secret-bench-secret-bench-secret-0123";

/// A config whose tokens are signed with `alg` (a fresh key, or the HS256 secret).
fn config(cache_capacity: u64, alg: SigningAlg) -> Config {
    let signing = match alg {
        SigningAlg::HS256 => format!("{{ secret = \"file:{}\" }}", secret_file().display()),
        other => {
            let path = std::env::temp_dir().join(format!("tokengate-bench-{}.pem", other.name()));
            std::fs::write(&path, tokengate::keys::generate_pem(other).unwrap()).unwrap();
            format!("{{ alg = \"{}\", key = \"file:{}\" }}", other.name(), path.display())
        }
    };
    let toml = format!(
        r#"
[server]
listen = "127.0.0.1:0"
[tokens]
issuer = "https://bench"
audience = "api"
cache_capacity = {cache_capacity}
signing = {signing}
[[clients]]
id = "web"
grants = ["password", "refresh_token"]
scopes = ["orders:read"]
[[routes]]
path_prefix = "/api/orders"
upstream = "echo"
scopes = ["orders:read"]
"#
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

/// Keys, an issuer of tokens as the token endpoint mints them (with their kid), and a validator
/// with a cache of `cache_capacity`.
struct Setup {
    issuer: Issuer,
    validator: Validator,
}

fn setup(cache_capacity: u64, alg: SigningAlg) -> Setup {
    let c = config(cache_capacity, alg);
    let clock: SharedClock = Arc::new(ManualClock::new());
    let keys = Arc::new(KeySet::new(&c.tokens, None, clock.now_millis()).unwrap());
    let validator = Validator::new(
        &c.tokens,
        keys.clone(),
        vec![],
        c.scopes.clone(),
        Arc::new(RevokedSessions::new()),
        clock,
    );
    Setup {
        issuer: Issuer::new(&c.tokens, keys),
        validator,
    }
}

impl Setup {
    fn token(&self, i: u64) -> String {
        self.issuer
            .access_token(
                &format!("user-{i}"),
                "web",
                "orders:read",
                SessionId(i),
                now(),
                &random_bytes::<16>().unwrap(),
            )
            .unwrap()
            .jwt
    }
}

/// An HS256 token minted by another tool sharing the secret: no kid.
fn kidless_hs256_token(i: u64) -> String {
    let mut h = jsonwebtoken::Header::new(jsonwebtoken::Algorithm::HS256);
    h.typ = Some("at+jwt".into());
    let n = now();
    let claims = serde_json::json!({
        "iss": "https://bench", "aud": "api", "sub": format!("user-{i}"), "client_id": "web",
        "scope": "orders:read", "sid": format!("sid-{i}"), "jti": format!("j{i}"), "iat": n, "exp": n + 900,
    });
    jsonwebtoken::encode(&h, &claims, &jsonwebtoken::EncodingKey::from_secret(SECRET.as_bytes())).unwrap()
}

fn bench_bearer(c: &mut Criterion) {
    // How much does extracting the bearer token from the Authorization value cost?
    let value = format!("Bearer {}", setup(10, SigningAlg::HS256).token(1));
    c.bench_function("bearer/parse", |b| b.iter(|| parse_bearer(black_box(value.as_bytes()))));
}

fn bench_validation(c: &mut Criterion) {
    // What does a cached token cost per request, against verifying a signature (per algorithm) and
    // parsing claims on a miss?
    let mut g = c.benchmark_group("validation");
    let hot = setup(100_000, SigningAlg::HS256);
    // The same bytes as round 1's bench token (no kid), so the two runs compare the code alone.
    let t = kidless_hs256_token(1);
    hot.validator.validate(&t).unwrap();
    g.bench_function("cache_hit", |b| {
        b.iter(|| hot.validator.validate(black_box(&t)).unwrap())
    });
    // A token as the gateway mints it now: its kid makes it longer (the cache hashes it all).
    let t = hot.token(1);
    hot.validator.validate(&t).unwrap();
    g.bench_function("cache_hit_with_kid", |b| {
        b.iter(|| hot.validator.validate(black_box(&t)).unwrap())
    });
    for alg in [
        SigningAlg::HS256,
        SigningAlg::EdDSA,
        SigningAlg::ES256,
        SigningAlg::RS256,
    ] {
        // A cache of one entry: every validation verifies.
        let cold = setup(1, alg);
        let tokens: Vec<String> = (0..2_000).map(|i| cold.token(i)).collect();
        let mut i = 0usize;
        g.bench_function(format!("cache_miss_{}", alg.name().to_ascii_lowercase()), |b| {
            b.iter(|| {
                i = (i + 1) % tokens.len();
                cold.validator.validate(black_box(&tokens[i])).unwrap()
            })
        });
    }
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
    let identity = Identity {
        subject: HeaderValue::from_static("ann"),
        client_id: Some(HeaderValue::from_static("web")),
        scope: HeaderValue::from_static("orders:read"),
        session: Some(HeaderValue::from_static("sid")),
        issuer: None,
    };
    let rid = HeaderValue::from_static("0000-1");
    let up = HeaderValue::from_static("127.0.0.1:9000");
    let peer = HeaderValue::from_static("127.0.0.1");
    c.bench_function("headers/prepare_upstream", |b| {
        b.iter_batched(
            || h.clone(),
            |h| {
                let ctx = RequestContext {
                    forwarded_for: &peer,
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
    // What does issuance cost per signing algorithm: a login's token pair (sign the JWT, mint a
    // refresh token and its digest), and a refresh's (the same, plus sealing the response under
    // the presented token for the reuse grace)?
    let mut g = c.benchmark_group("issue");
    for alg in [SigningAlg::HS256, SigningAlg::EdDSA, SigningAlg::ES256] {
        let issuer = setup(10, alg).issuer;
        let name = alg.name().to_ascii_lowercase();
        g.bench_function(format!("{name}/login"), |b| {
            b.iter(|| {
                let at = issuer
                    .access_token(
                        "ann",
                        "web",
                        "orders:read",
                        SessionId(7),
                        1_800_000_000,
                        &random_bytes::<16>().unwrap(),
                    )
                    .unwrap();
                let rt = mint_refresh_token(SessionId(7)).unwrap();
                black_box((at, rt))
            })
        });
        let presented = mint_refresh_token(SessionId(7)).unwrap().token;
        g.bench_function(format!("{name}/refresh"), |b| {
            b.iter(|| {
                // As a rotation does: one draw for the refresh token and the jti.
                let random = IssueRandom::draw().unwrap();
                let rt = refresh_token_from(SessionId(7), &random.refresh);
                let at = issuer
                    .access_token("ann", "web", "orders:read", SessionId(7), 1_800_000_000, &random.jti)
                    .unwrap();
                let body = format!("{{\"access_token\":\"{}\",\"refresh_token\":\"{}\"}}", at.jwt, rt.token);
                black_box(tokengate::crypto::seal(&presented, body.as_bytes()))
            })
        });
    }
    g.finish();
}

const NOW_MS: u64 = 1_800_000_000_000;

fn registry() -> Registry<NoRecorder> {
    Registry::new(Arc::new(RevokedSessions::new()), NoRecorder, 10_000)
}

/// Starts a session; returns its id and first refresh token.
fn session(reg: &Registry<NoRecorder>) -> (SessionId, String) {
    let sid = SessionId::random().unwrap();
    let t = mint_refresh_token(sid).unwrap();
    reg.create(NewSession {
        sid,
        user: "ann".into(),
        client: "web".into(),
        scopes: "orders:read".into(),
        now_ms: NOW_MS,
        session_expires_ms: NOW_MS + 30 * 86_400_000,
        access_exp_secs: NOW_MS / 1000 + 900,
        token: t.digest,
        token_exp_ms: NOW_MS + 86_400_000,
        max_sessions_per_user: usize::MAX,
    })
    .unwrap();
    (sid, t.token)
}

/// One rotation as the refresh grant does it around the signing: mint the successor, seal a
/// response-sized body under the presented token, compare-and-set.
fn rotate(reg: &Registry<NoRecorder>, sid: SessionId, presented: &str) -> String {
    let next = mint_refresh_token(sid).unwrap();
    let body = format!(
        "{{\"refresh_token\":\"{}\",\"access_token\":\"{}\"}}",
        next.token,
        "x".repeat(300)
    );
    let (_, digest) = tokengate::ids::parse_refresh_token(presented).unwrap();
    reg.rotate(Rotation {
        sid,
        presented: digest,
        successor: next.digest,
        successor_exp_ms: NOW_MS + 86_400_000,
        access_exp_secs: NOW_MS / 1000 + 900,
        sealed: tokengate::crypto::seal(presented, body.as_bytes()),
        now_ms: NOW_MS,
    })
    .unwrap();
    next.token
}

fn bench_registry(c: &mut Criterion) {
    // What does one rotation cost in the registry (mint, digest, seal the replay copy, the
    // compare-and-set), alone and with two threads rotating their own sessions at once?
    let mut g = c.benchmark_group("registry_rotate");
    let reg = registry();
    let (sid, mut t) = session(&reg);
    g.bench_function("1_thread", |b| b.iter(|| t = rotate(&reg, sid, &t)));
    let reg = Arc::new(registry());
    g.bench_function("2_threads_contending", |b| {
        b.iter_custom(|iters| {
            let start = Instant::now();
            std::thread::scope(|s| {
                for _ in 0..2 {
                    let reg = reg.clone();
                    s.spawn(move || {
                        let (sid, mut t) = session(&reg);
                        for _ in 0..iters.div_ceil(2) {
                            t = rotate(&reg, sid, &t);
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
        b.iter(|| empty.is_revoked(black_box(SessionId(42)), 1_800_000_000))
    });
    let full = RevokedSessions::new();
    for _ in 0..100_000 {
        full.revoke(SessionId::random().unwrap(), 1_900_000_000);
    }
    let hit = SessionId::random().unwrap();
    full.revoke(hit, 1_900_000_000);
    g.bench_function("100k_entries_miss", |b| {
        b.iter(|| full.is_revoked(black_box(SessionId(42)), 1_800_000_000))
    });
    g.bench_function("100k_entries_hit", |b| {
        b.iter(|| full.is_revoked(black_box(hit), 1_800_000_000))
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
