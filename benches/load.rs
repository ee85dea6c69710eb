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
//!
//! Against a running deployment (the real token lifecycle: each connection logs in, calls the API
//! with its access token, and refreshes when the token nears expiry, or every `--refresh-every`
//! seconds), with a progress line each second and the count of logins, refreshes and 429s:
//!
//!     cargo bench --bench load -- --target https://gw.example:8443 --ca ca.pem \
//!         --client-id web --username alice --password '...' --path /api/orders --refresh-every 30
//!
//! There the CPU column is the load generator's own (this process), not the gateway's: measure
//! the gateway on its host.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
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
    /// Target mode: refresh this often (else only when the access token nears expiry).
    refresh_every: Option<Duration>,
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
        refresh_every: None,
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
            "--refresh-every" => {
                o.refresh_every = Some(Duration::from_secs(val().parse().expect("--refresh-every SECONDS")))
            }
            "--bench" => {} // passed by `cargo bench`
            "-h" | "--help" => {
                println!(
                    "options: --connections N (32) --duration S (8) --scenario get-cached|get-distinct|refresh|login|memory \
                     (repeatable; default all) --gw-threads N (1) | --target URL --ca FILE --client-id ID --username U \
                     --password P --path /api/... --refresh-every S (default: 60 s before the token expires, or at 3/4 of a shorter lifetime)"
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

#[derive(Default)]
struct Tally {
    latencies_us: Vec<u32>,
}

/// What every connection has done so far, read by the progress line and the summary.
#[derive(Default)]
struct Counters {
    /// Responses of any kind (each is one latency sample).
    responses: AtomicU64,
    /// API calls answered 200.
    api: AtomicU64,
    logins: AtomicU64,
    refreshes: AtomicU64,
    /// 429 answers (logins of one username are deliberately slowed).
    rate_limited: AtomicU64,
    /// Anything else: other statuses, failed connections.
    errors: AtomicU64,
}

impl Counters {
    fn add(counter: &AtomicU64) {
        counter.fetch_add(1, Ordering::Relaxed);
    }
    fn get(counter: &AtomicU64) -> u64 {
        counter.load(Ordering::Relaxed)
    }
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
async fn login(
    t: &Target,
    s: &mut SendRequest<Full<Bytes>>,
    c: &Creds,
    counters: &Counters,
) -> Option<(String, String, u64)> {
    for _ in 0..30 {
        let form = [
            ("grant_type", "password"),
            ("client_id", c.client_id.as_str()),
            ("username", c.username.as_str()),
            ("password", c.password.as_str()),
        ];
        let r = send(s, post_form(t, "/api/oauth2/token", &form)).await?;
        if r.status() == 429 {
            Counters::add(&counters.rate_limited);
            let wait = r
                .headers()
                .get("retry-after")
                .and_then(|v| v.to_str().ok()?.parse().ok())
                .unwrap_or(1);
            tokio::time::sleep(Duration::from_secs(wait)).await;
            continue;
        }
        if r.status() != 200 {
            Counters::add(&counters.errors);
            eprintln!("login failed: {} {}", r.status(), String::from_utf8_lossy(r.body()));
            return None;
        }
        Counters::add(&counters.logins);
        let v: serde_json::Value = serde_json::from_slice(r.body()).ok()?;
        return Some((
            v["access_token"].as_str()?.into(),
            v["refresh_token"].as_str()?.into(),
            v["expires_in"].as_u64()?,
        ));
    }
    None
}

async fn connection(
    t: Target,
    work: Work,
    creds: Creds,
    deadline: Instant,
    refresh_every: Option<Duration>,
    counters: Arc<Counters>,
) -> Tally {
    let mut tally = Tally::default();
    let mut s = connect(&t).await;
    let mut session = match work {
        Work::Refresh | Work::Lifecycle => login(&t, &mut s, &creds, &counters).await,
        _ => None,
    };
    // When the current access token was issued and when it expires.
    let mut issued = Instant::now();
    let mut token_expires = issued + Duration::from_secs(session.as_ref().map_or(0, |x| x.2));
    while Instant::now() < deadline {
        let mut refreshing = false;
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
                Some((_, rt, _)) => {
                    refreshing = true;
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
                None => break,
            },
            Work::Lifecycle => match &session {
                // Before expiry: a minute before, or a quarter of the lifetime for short tokens.
                Some((_, rt, ttl))
                    if Instant::now() + Duration::from_secs(60.min(ttl / 4)) >= token_expires
                        || refresh_every.is_some_and(|every| issued.elapsed() >= every) =>
                {
                    refreshing = true;
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
            Counters::add(&counters.errors);
            s = connect(&t).await;
            continue;
        };
        tally
            .latencies_us
            .push(started.elapsed().as_micros().min(u32::MAX as u128) as u32);
        Counters::add(&counters.responses);
        match resp.status().as_u16() {
            200 => {}
            429 => {
                Counters::add(&counters.rate_limited);
                continue;
            }
            _ => {
                Counters::add(&counters.errors);
                // A refused refresh (the session was revoked, or has expired): log in again.
                if refreshing && matches!(work, Work::Lifecycle) {
                    session = login(&t, &mut s, &creds, &counters).await;
                    issued = Instant::now();
                    token_expires = issued + Duration::from_secs(session.as_ref().map_or(0, |x| x.2));
                }
                continue;
            }
        }
        match work {
            Work::Login => Counters::add(&counters.logins),
            Work::Refresh | Work::Lifecycle if refreshing => {
                Counters::add(&counters.refreshes);
                let v: Option<serde_json::Value> = serde_json::from_slice(resp.body()).ok();
                let fields = v.as_ref().and_then(|v| {
                    Some((
                        v["access_token"].as_str()?.to_owned(),
                        v["refresh_token"].as_str()?.to_owned(),
                        v["expires_in"].as_u64()?,
                    ))
                });
                if let Some((at, rt, expires_in)) = fields {
                    issued = Instant::now();
                    token_expires = issued + Duration::from_secs(expires_in);
                    session = Some((at, rt, expires_in));
                }
            }
            _ => Counters::add(&counters.api),
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
    let counters = Arc::new(Counters::default());
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
            tokio::spawn(connection(
                t.clone(),
                work.clone(),
                creds,
                deadline,
                o.refresh_every,
                counters.clone(),
            ))
        })
        .collect();
    // Against a deployment a run is long: a line each second says how it goes.
    let progress = (!in_process).then(|| tokio::spawn(progress(counters.clone(), started, o.duration)));
    let mut all = Tally::default();
    for task in tasks {
        let tally = task.await.unwrap();
        all.latencies_us.extend(tally.latencies_us);
    }
    if let Some(p) = progress {
        p.abort();
        let _ = p.await;
    }
    let elapsed = started.elapsed().as_secs_f64();
    let end_cpu = cpu_ns();
    let n = all.latencies_us.len().max(1) as f64;
    all.latencies_us.sort_unstable();
    let own_cpu = (end_cpu.1 - start_cpu.1) as f64 / 1e3 / n;
    let cpu = if in_process {
        format!("{:>13.1} {:>15.1}", (end_cpu.0 - start_cpu.0) as f64 / 1e3 / n, own_cpu)
    } else {
        format!("{own_cpu:>13.1}")
    };
    let errors = Counters::get(&counters.errors);
    println!(
        "{name:<13} {:>5} {:>10.0} {:>8} {:>8} {:>8} {cpu} {errors:>7}",
        o.connections,
        n / elapsed,
        percentile(&all.latencies_us, 0.50),
        percentile(&all.latencies_us, 0.99),
        percentile(&all.latencies_us, 0.999),
    );
    let (logins, refreshes, limited) = (
        Counters::get(&counters.logins),
        Counters::get(&counters.refreshes),
        Counters::get(&counters.rate_limited),
    );
    if !in_process || logins + refreshes + limited > 0 {
        println!(
            "{:<13} API calls {}, logins {logins}, refreshes {refreshes}, 429 {limited}, errors {errors}",
            "",
            Counters::get(&counters.api),
        );
    }
}

/// A line each second: elapsed time, the last second's responses, and the running counts; a
/// progress bar on a terminal (indicatif), plain lines otherwise (a log, a pipe).
async fn progress(counters: Arc<Counters>, started: Instant, duration: Duration) {
    use std::io::IsTerminal;
    let bar = if std::io::stderr().is_terminal() {
        let bar = indicatif::ProgressBar::new(duration.as_secs());
        if let Ok(style) = indicatif::ProgressStyle::with_template("{bar:30} {pos:>4}/{len}s {msg}") {
            bar.set_style(style);
        }
        Some(bar)
    } else {
        None
    };
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    tick.tick().await;
    let mut last = 0;
    loop {
        tick.tick().await;
        let responses = Counters::get(&counters.responses);
        let line = format!(
            "{:>4.0}s {:>8} resp/s  API {}  logins {}  refreshes {}  429 {}  errors {}",
            started.elapsed().as_secs_f64(),
            responses - last,
            Counters::get(&counters.api),
            Counters::get(&counters.logins),
            Counters::get(&counters.refreshes),
            Counters::get(&counters.rate_limited),
            Counters::get(&counters.errors),
        );
        last = responses;
        match &bar {
            Some(bar) => {
                bar.set_position(started.elapsed().as_secs().min(duration.as_secs()));
                bar.set_message(line);
            }
            None => eprintln!("{line}"),
        }
    }
}

fn header(in_process: bool) {
    if in_process {
        println!(
            "{:<13} {:>5} {:>10} {:>8} {:>8} {:>8} {:>13} {:>15} {:>7}",
            "scenario", "conns", "req/s", "p50 µs", "p99 µs", "p99.9 µs", "gw CPU µs/req", "bench CPU µs/req", "errors"
        );
        println!(
            "  (gw CPU: the gateway's threads; bench CPU: the whole process, load generator and upstream included)"
        );
    } else {
        println!(
            "{:<13} {:>5} {:>10} {:>8} {:>8} {:>8} {:>13} {:>7}",
            "scenario", "conns", "req/s", "p50 µs", "p99 µs", "p99.9 µs", "loadgen CPU", "errors"
        );
        println!("  (loadgen CPU: µs per request of this load generator, not of the gateway)");
    }
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
signing = {{ secret = "file:{secret}" }}
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
        secret = secret_path.display(),
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
        "in-process gateway ({} worker thread(s)), TLS 1.3 on loopback, {}s per scenario",
        o.gw_threads,
        o.duration.as_secs()
    );
    header(true);
    load_rt.block_on(async {
        for s in &scenarios {
            let work = match s.as_str() {
                "get-cached" => {
                    let mut c = connect(&target).await;
                    let first = Creds {
                        username: format!("{}-0", creds.username),
                        ..creds.clone()
                    };
                    let counters = Counters::default();
                    Work::GetCached(login(&target, &mut c, &first, &counters).await.expect("login").0.into())
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
    let refresh = match o.refresh_every {
        Some(every) => format!("refreshes every {}s (and before expiry)", every.as_secs()),
        None => "refreshes 60s before its token expires (at 3/4 of a shorter lifetime)".to_owned(),
    };
    println!(
        "target {url}: {} connections for {}s; each logs in, calls {} with its token, {refresh}",
        o.connections,
        o.duration.as_secs(),
        o.path
    );
    header(false);
    run("lifecycle", &target, Work::Lifecycle, &creds, &o, false).await;
}
