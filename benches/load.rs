//! End-to-end load: what throughput, latency and CPU per request does the gateway deliver over
//! real TLS on loopback, for the requests that matter (a proxied GET on a cached token, on a
//! distinct token each time, the refresh grant, a login)?
//!
//!     cargo bench --bench load                                   # all scenarios, in-process
//!     cargo bench --bench load -- --scenario refresh --connections 64 --duration 20
//!
//! In-process, the gateway runs on its own runtime (threads named `gw`, `--gw-threads`, default 1)
//! and the load generator and upstream on another, so the gateway's own CPU per request is read
//! from its threads' schedstat. `memory` measures the refresh registry's bytes per live session.
//! The in-process gateway signs with Ed25519 (certs/signing-key.pem; `--signing HS256` for the
//! shared secret), so `refresh` measures rotations with EdDSA signing; `get-distinct` sends HS256
//! tokens, verified by a previous key.
//!
//! Against a running deployment (the real token lifecycle: each connection logs in, calls the API
//! with its access token, and refreshes when the token nears expiry):
//!
//!     cargo bench --bench load -- --target https://gw.example:8443 --ca ca.pem \
//!         --client-id web --username alice --password '...' --path /api/orders

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{Request, Response};
use http_body_util::{BodyExt, Full};
use hyper::client::conn::http1::SendRequest;
use hyper_util::rt::TokioIo;
use rustls_pki_types::ServerName;
use tokio::net::TcpStream;

#[derive(Debug, Clone)]
struct Opts {
    connections: usize,
    duration: Duration,
    scenarios: Vec<String>,
    gw_threads: usize,
    target: Option<String>,
    ca: Option<PathBuf>,
    client_id: String,
    username: String,
    password: String,
    path: String,
    /// The in-process gateway's signing algorithm: EdDSA (default) or HS256.
    signing: String,
}

fn parse_opts() -> Opts {
    let mut o = Opts {
        connections: 32,
        duration: Duration::from_secs(8),
        scenarios: vec![],
        gw_threads: 1,
        target: None,
        ca: None,
        client_id: "web".into(),
        username: "bench".into(),
        password: "bench-password".into(),
        path: "/api/orders".into(),
        signing: "EdDSA".into(),
    };
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        let mut val = || args.next().unwrap_or_else(|| panic!("{a} needs a value"));
        match a.as_str() {
            "--connections" => o.connections = val().parse().expect("--connections N"),
            "--duration" => o.duration = Duration::from_secs(val().parse().expect("--duration SECONDS")),
            "--scenario" => o.scenarios.push(val()),
            "--gw-threads" => o.gw_threads = val().parse().expect("--gw-threads N"),
            "--target" => o.target = Some(val()),
            "--ca" => o.ca = Some(PathBuf::from(val())),
            "--client-id" => o.client_id = val(),
            "--username" => o.username = val(),
            "--password" => o.password = val(),
            "--path" => o.path = val(),
            "--signing" => o.signing = val(),
            "--bench" => {} // passed by `cargo bench`
            "-h" | "--help" => {
                println!(
                    "options: --connections N (32) --duration S (8) --scenario get-cached|get-distinct|refresh|login|memory \
                     (repeatable; default all) --gw-threads N (1) --signing EdDSA|HS256 (EdDSA) | --target URL --ca FILE --client-id ID --username U \
                     --password P --path /api/..."
                );
                std::process::exit(0);
            }
            other => panic!("unknown option {other} (try --help)"),
        }
    }
    if o.scenarios.is_empty() {
        o.scenarios = ["get-cached", "get-distinct", "refresh", "login", "memory"]
            .map(String::from)
            .to_vec();
    }
    o
}

/// On-CPU nanoseconds of this process's threads, split into (gateway threads, all threads).
fn cpu_ns() -> (u64, u64) {
    let (mut gw, mut all) = (0, 0);
    for entry in std::fs::read_dir("/proc/self/task").into_iter().flatten().flatten() {
        let dir = entry.path();
        let Ok(stat) = std::fs::read_to_string(dir.join("schedstat")) else {
            continue;
        };
        let ns: u64 = stat.split_whitespace().next().and_then(|n| n.parse().ok()).unwrap_or(0);
        let comm = std::fs::read_to_string(dir.join("comm")).unwrap_or_default();
        all += ns;
        if comm.starts_with("gw") || comm.starts_with("tokengate-log") {
            gw += ns;
        }
    }
    (gw, all)
}

fn rss_bytes() -> u64 {
    let statm = std::fs::read_to_string("/proc/self/statm").unwrap_or_default();
    let pages: u64 = statm
        .split_whitespace()
        .nth(1)
        .and_then(|p| p.parse().ok())
        .unwrap_or(0);
    pages * 4096
}

#[derive(Clone)]
struct Target {
    addr: SocketAddr,
    host: String,
    authority: String,
    tls: tokio_rustls::TlsConnector,
}

async fn connect(t: &Target) -> SendRequest<Full<Bytes>> {
    let tcp = TcpStream::connect(t.addr).await.expect("connect");
    tcp.set_nodelay(true).unwrap();
    let name = ServerName::try_from(t.host.clone()).expect("server name");
    let tls = t.tls.connect(name, tcp).await.expect("TLS handshake");
    let (send, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tls))
        .await
        .expect("HTTP handshake");
    tokio::spawn(conn);
    send
}

fn get(t: &Target, path: &str, token: &str) -> Request<Full<Bytes>> {
    Request::get(path)
        .header("host", &t.authority)
        .header("authorization", format!("Bearer {token}"))
        .body(Full::new(Bytes::new()))
        .unwrap()
}

fn post_form(t: &Target, path: &str, form: &[(&str, &str)]) -> Request<Full<Bytes>> {
    let body = form_urlencoded::Serializer::new(String::new())
        .extend_pairs(form)
        .finish();
    Request::post(path)
        .header("host", &t.authority)
        .header("content-type", "application/x-www-form-urlencoded")
        .body(Full::new(Bytes::from(body)))
        .unwrap()
}

async fn send(s: &mut SendRequest<Full<Bytes>>, req: Request<Full<Bytes>>) -> Option<Response<Bytes>> {
    s.ready().await.ok()?;
    let resp = s.send_request(req).await.ok()?;
    let (parts, body) = resp.into_parts();
    let body = body.collect().await.ok()?.to_bytes();
    Some(Response::from_parts(parts, body))
}

fn field(body: &[u8], key: &str) -> Option<String> {
    let v: serde_json::Value = serde_json::from_slice(body).ok()?;
    v[key].as_str().map(String::from)
}

#[derive(Default)]
struct Tally {
    latencies_us: Vec<u32>,
    errors: u64,
    refreshes: u64,
}

#[derive(Clone)]
enum Work {
    GetCached(Arc<str>),
    GetDistinct(Arc<Vec<String>>, Arc<AtomicUsize>),
    Refresh,
    Login,
    Lifecycle,
}

#[derive(Clone)]
struct Creds {
    client_id: String,
    username: String,
    password: String,
    path: String,
}

impl From<&Opts> for Creds {
    fn from(o: &Opts) -> Self {
        Creds {
            client_id: o.client_id.clone(),
            username: o.username.clone(),
            password: o.password.clone(),
            path: o.path.clone(),
        }
    }
}

/// Logs in, honouring `429 Retry-After` (the gateway slows parallel logins of one username).
async fn login(t: &Target, s: &mut SendRequest<Full<Bytes>>, c: &Creds) -> Option<(String, String, u64)> {
    for _ in 0..30 {
        let form = [
            ("grant_type", "password"),
            ("client_id", c.client_id.as_str()),
            ("username", c.username.as_str()),
            ("password", c.password.as_str()),
        ];
        let r = send(s, post_form(t, "/api/oauth2/token", &form)).await?;
        if r.status() == 429 {
            let wait = r
                .headers()
                .get("retry-after")
                .and_then(|v| v.to_str().ok()?.parse().ok())
                .unwrap_or(1);
            tokio::time::sleep(Duration::from_secs(wait)).await;
            continue;
        }
        if r.status() != 200 {
            eprintln!("login failed: {} {}", r.status(), String::from_utf8_lossy(r.body()));
            return None;
        }
        let v: serde_json::Value = serde_json::from_slice(r.body()).ok()?;
        return Some((
            v["access_token"].as_str()?.into(),
            v["refresh_token"].as_str()?.into(),
            v["expires_in"].as_u64()?,
        ));
    }
    None
}

async fn connection(t: Target, work: Work, creds: Creds, deadline: Instant) -> Tally {
    let mut tally = Tally::default();
    let mut s = connect(&t).await;
    let mut session = match work {
        Work::Refresh | Work::Lifecycle => login(&t, &mut s, &creds).await,
        _ => None,
    };
    let mut token_expires = Instant::now() + Duration::from_secs(session.as_ref().map_or(0, |x| x.2));
    while Instant::now() < deadline {
        let req = match &work {
            Work::GetCached(tok) => get(&t, &creds.path, tok),
            Work::GetDistinct(toks, i) => get(&t, &creds.path, &toks[i.fetch_add(1, Ordering::Relaxed) % toks.len()]),
            Work::Login => post_form(
                &t,
                "/api/oauth2/token",
                &[
                    ("grant_type", "password"),
                    ("client_id", &creds.client_id),
                    ("username", &creds.username),
                    ("password", &creds.password),
                ],
            ),
            Work::Refresh => match &session {
                Some((_, rt, _)) => post_form(
                    &t,
                    "/api/oauth2/token",
                    &[
                        ("grant_type", "refresh_token"),
                        ("client_id", &creds.client_id),
                        ("refresh_token", rt),
                    ],
                ),
                None => break,
            },
            Work::Lifecycle => match &session {
                Some((_, rt, _)) if Instant::now() + Duration::from_secs(60) >= token_expires => {
                    tally.refreshes += 1;
                    post_form(
                        &t,
                        "/api/oauth2/token",
                        &[
                            ("grant_type", "refresh_token"),
                            ("client_id", &creds.client_id),
                            ("refresh_token", rt),
                        ],
                    )
                }
                Some((at, _, _)) => get(&t, &creds.path, at),
                None => break,
            },
        };
        let started = Instant::now();
        let Some(resp) = send(&mut s, req).await else {
            tally.errors += 1;
            s = connect(&t).await;
            continue;
        };
        tally
            .latencies_us
            .push(started.elapsed().as_micros().min(u32::MAX as u128) as u32);
        if resp.status() != 200 {
            tally.errors += 1;
            continue;
        }
        if matches!(work, Work::Refresh | Work::Lifecycle)
            && let (Some(at), Some(rt)) = (field(resp.body(), "access_token"), field(resp.body(), "refresh_token"))
        {
            token_expires = Instant::now() + Duration::from_secs(900);
            session = Some((at, rt, 900));
        }
    }
    tally
}

fn percentile(sorted: &[u32], p: f64) -> u32 {
    if sorted.is_empty() {
        return 0;
    }
    sorted[((sorted.len() as f64 * p) as usize).min(sorted.len() - 1)]
}

async fn run(name: &str, t: &Target, work: Work, creds: &Creds, o: &Opts, in_process: bool) {
    let start_cpu = cpu_ns();
    let started = Instant::now();
    let deadline = started + o.duration;
    let tasks: Vec<_> = (0..o.connections)
        .map(|i| {
            let mut creds = creds.clone();
            if in_process {
                // One user per connection, as real traffic is: one username's parallel logins are
                // deliberately slowed by the gateway.
                creds.username = format!("{}-{i}", creds.username);
            }
            tokio::spawn(connection(t.clone(), work.clone(), creds, deadline))
        })
        .collect();
    let mut all = Tally::default();
    for task in tasks {
        let tally = task.await.unwrap();
        all.latencies_us.extend(tally.latencies_us);
        all.errors += tally.errors;
        all.refreshes += tally.refreshes;
    }
    let elapsed = started.elapsed().as_secs_f64();
    let end_cpu = cpu_ns();
    let n = all.latencies_us.len().max(1) as f64;
    all.latencies_us.sort_unstable();
    let gw_cpu = if in_process {
        format!("{:.1}", (end_cpu.0 - start_cpu.0) as f64 / 1e3 / n)
    } else {
        "-".into()
    };
    println!(
        "{name:<13} {:>5} {:>10.0} {:>8} {:>8} {:>8} {:>12} {:>12.1} {:>7}{}",
        o.connections,
        n / elapsed,
        percentile(&all.latencies_us, 0.50),
        percentile(&all.latencies_us, 0.99),
        percentile(&all.latencies_us, 0.999),
        gw_cpu,
        (end_cpu.1 - start_cpu.1) as f64 / 1e3 / n,
        all.errors,
        if all.refreshes > 0 {
            format!("  ({} refreshes)", all.refreshes)
        } else {
            String::new()
        },
    );
}

fn header() {
    println!(
        "{:<13} {:>5} {:>10} {:>8} {:>8} {:>8} {:>12} {:>12} {:>7}",
        "scenario", "conns", "req/s", "p50 µs", "p99 µs", "p99.9 µs", "gw CPU µs/req", "proc CPU µs/req", "errors"
    );
}

fn tls_connector(ca: &std::path::Path) -> tokio_rustls::TlsConnector {
    let roots = tokengate::server::tls::roots_from_file(ca).unwrap_or_else(|e| panic!("{}: {e:#}", ca.display()));
    let cfg = tokengate::server::tls::client_config(roots, &[b"http/1.1"]).unwrap();
    tokio_rustls::TlsConnector::from(Arc::new(cfg))
}

fn memory_per_session() {
    use tokengate::auth::RevokedSessions;
    use tokengate::ids::{SessionId, mint_refresh_token};
    use tokengate::store::NewSession;
    use tokengate::store::registry::{NoRecorder, Registry};
    let n = 1_000_000u64;
    let now = 1_800_000_000_000u64;
    let users: Vec<Arc<str>> = (0..1000).map(|i| Arc::from(format!("user{i}"))).collect();
    let (client, scopes): (Arc<str>, Arc<str>) = ("web".into(), "orders:read".into());
    let before = rss_bytes();
    let reg = Registry::new(Arc::new(RevokedSessions::new()), NoRecorder, 10_000);
    for i in 0..n {
        let sid = SessionId::random().unwrap();
        let t = mint_refresh_token(sid).unwrap();
        reg.create(NewSession {
            sid,
            user: users[(i % 1000) as usize].clone(),
            client: client.clone(),
            scopes: scopes.clone(),
            now_ms: now,
            session_expires_ms: now + 30 * 86_400_000,
            access_exp_secs: now / 1000 + 900,
            token: t.digest,
            token_exp_ms: now + 86_400_000,
            max_sessions_per_user: usize::MAX,
        })
        .unwrap();
    }
    let after = rss_bytes();
    println!(
        "memory: {} live sessions in the session registry: {:.0} bytes per session (RSS delta)",
        reg.session_count(),
        (after.saturating_sub(before)) as f64 / n as f64
    );
}

fn main() {
    let o = parse_opts();
    let load_rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .thread_name("load")
        .enable_all()
        .build()
        .unwrap();
    if let Some(url) = o.target.clone() {
        return load_rt.block_on(external(url, o));
    }
    if o.scenarios.iter().any(|s| s == "memory") {
        memory_per_session();
    }
    let scenarios: Vec<String> = o.scenarios.iter().filter(|s| *s != "memory").cloned().collect();
    if scenarios.is_empty() {
        return;
    }

    let repo = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    let upstream = load_rt.block_on(start_upstream());
    let hash = tokengate::oauth::users::hash_password(&o.password).unwrap();
    let secret_path = repo.join("certs/dev-jwt-secret");
    let toml = format!(
        r#"
[server]
listen = "127.0.0.1:0"
tls = {{ cert = "{certs}/localhost.pem", key = "{certs}/localhost-key.pem" }}
[admin]
listen = "127.0.0.1:0"
[tokens]
issuer = "https://localhost"
audience = "api"
{signing}
[[clients]]
id = "web"
grants = ["password", "refresh_token"]
scopes = ["orders:read"]
{users}
[[routes]]
path_prefix = "/api/orders"
upstream = "http://{upstream}"
scopes = ["orders:read"]
"#,
        certs = repo.join("certs").display(),
        signing = signing_keys(&o.signing, &repo, &secret_path),
        users = (0..o.connections)
            .map(|i| format!(
                "[[users]]\nusername = \"{}-{i}\"\npassword_hash = \"{hash}\"\nscopes = [\"orders:read\"]\n",
                o.username
            ))
            .collect::<String>(),
    );
    let config = tokengate::Config::from_toml(&toml, &repo, "load.toml").unwrap_or_else(|e| panic!("{e}"));
    let _log = tokengate::logging::init_to(
        tokengate::config::LogFormat::Text,
        "info",
        Box::new(std::io::sink()),
        Duration::from_secs(5),
    )
    .unwrap();
    let gw_rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(o.gw_threads)
        .thread_name("gw")
        .enable_all()
        .build()
        .unwrap();
    let running = gw_rt.block_on(async {
        tokengate::Gateway::new(config, Arc::new(tokengate::SystemClock))
            .unwrap()
            .start()
            .await
            .unwrap()
    });
    let target = Target {
        addr: running.addr,
        host: "localhost".into(),
        authority: format!("localhost:{}", running.addr.port()),
        tls: tls_connector(&repo.join("certs/ca.pem")),
    };
    let creds = Creds::from(&o);
    println!(
        "in-process gateway ({} worker thread(s), {} signing), TLS 1.3 on loopback, {}s per scenario",
        o.gw_threads,
        o.signing,
        o.duration.as_secs()
    );
    header();
    load_rt.block_on(async {
        for s in &scenarios {
            let work = match s.as_str() {
                "get-cached" => {
                    let mut c = connect(&target).await;
                    let first = Creds {
                        username: format!("{}-0", creds.username),
                        ..creds.clone()
                    };
                    Work::GetCached(login(&target, &mut c, &first).await.expect("login").0.into())
                }
                "get-distinct" => {
                    let secret = std::fs::read_to_string(&secret_path).unwrap();
                    Work::GetDistinct(Arc::new(mint_tokens(secret.trim().as_bytes(), 400_000)), Arc::default())
                }
                "refresh" => Work::Refresh,
                "login" => Work::Login,
                other => panic!("unknown scenario {other}"),
            };
            run(s, &target, work, &creds, &o, true).await;
        }
    });
    gw_rt.block_on(running.shutdown());
}

/// `signing` and `previous_keys` for the in-process gateway. With EdDSA (what `refresh` measures by
/// default) the HS256 dev secret stays a previous key: get-distinct's tokens are HS256 without a
/// kid, minted here, and verified by it.
fn signing_keys(alg: &str, repo: &std::path::Path, secret: &std::path::Path) -> String {
    let hs256 = format!("{{ alg = \"HS256\", secret = \"file:{}\" }}", secret.display());
    match alg {
        "EdDSA" => format!(
            "signing = {{ alg = \"EdDSA\", key = \"file:{}\" }}\nprevious_keys = [{hs256}]",
            repo.join("certs/signing-key.pem").display()
        ),
        "HS256" => format!("signing = {hs256}"),
        other => panic!("--signing {other}: EdDSA or HS256"),
    }
}

fn mint_tokens(secret: &[u8], n: usize) -> Vec<String> {
    let mut h = jsonwebtoken::Header::new(jsonwebtoken::Algorithm::HS256);
    h.typ = Some("at+jwt".into());
    let key = jsonwebtoken::EncodingKey::from_secret(secret);
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    (0..n)
        .map(|i| {
            let claims = serde_json::json!({
                "iss": "https://localhost", "aud": "api", "sub": format!("user-{i}"), "client_id": "web",
                "scope": "orders:read", "sid": format!("sid-{i}"), "jti": format!("{i}"), "iat": now, "exp": now + 900,
            });
            jsonwebtoken::encode(&h, &claims, &key).unwrap()
        })
        .collect()
}

async fn start_upstream() -> SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            let _ = stream.set_nodelay(true);
            tokio::spawn(async move {
                let svc = hyper::service::service_fn(|_req| async {
                    Ok::<_, std::convert::Infallible>(Response::new(Full::new(Bytes::from_static(b"ok"))))
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), svc)
                    .await;
            });
        }
    });
    addr
}

async fn external(url: String, o: Opts) {
    let uri: http::Uri = url.parse().expect("--target must be a URL like https://host:8443");
    let host = uri.host().expect("--target needs a host").to_owned();
    let port = uri.port_u16().unwrap_or(443);
    let addr = tokio::net::lookup_host((host.as_str(), port))
        .await
        .unwrap()
        .next()
        .expect("cannot resolve --target");
    let ca = o.ca.clone().expect("--ca FILE is required with --target");
    let target = Target {
        addr,
        host: host.clone(),
        authority: format!("{host}:{port}"),
        tls: tls_connector(&ca),
    };
    let creds = Creds::from(&o);
    println!(
        "target {url}: each connection logs in, calls {} with its token, refreshes before expiry",
        o.path
    );
    header();
    run("lifecycle", &target, Work::Lifecycle, &creds, &o, false).await;
}
