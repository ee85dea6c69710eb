//! End-to-end load: what throughput, latency and CPU per request does the gateway deliver over
//! real TLS on loopback, for the requests that matter (a proxied GET on a cached token, on a
//! distinct token each time, the refresh grant, a login)? And with the Redis store: what does a
//! rotation cost when every instance shares it (`refresh-redis`, same run as `refresh` on the
//! memory store), and how long does a revocation on one instance take to be enforced on another
//! (`revocation-lag`)?
//!
//!     cargo bench --bench load                                   # all scenarios, in-process
//!     cargo bench --bench load -- --scenario refresh --connections 64 --duration 20
//!     cargo bench --bench load -- --scenario refresh --scenario refresh-redis \
//!         --scenario refresh-redis-everysec --scenario revocation-lag
//!
//! In-process, the gateway runs on its own runtime (threads named `gw`, `--gw-threads`, default 1)
//! and the load generator and upstream on another, so the gateway's own CPU per request is read
//! from its threads' schedstat. `memory` measures the refresh registry's bytes per live session.
//! The Redis scenarios start a throwaway `redis-server` (free port, temporary folder, AOF with
//! `appendfsync always`, as the tests do; `refresh-redis-everysec` switches it to `everysec`); its
//! CPU is reported apart, since it is another process.
//!
//! `refresh-durable` runs the refresh load against a second gateway whose sessions live in the
//! durable store (a fresh folder), and prints fsyncs per second and rotations per fsync;
//! `durable-1m` journals a million sessions and times a restart from the log and from a snapshot,
//! with the bytes on disk per live session.
//!
//! Two memory scenarios, run only when named (each reads this process's RSS, so run it alone):
//!
//!     cargo bench --bench load -- --scenario login-rss   # 1,000 logins: ok, wrong, cancelled
//!     cargo bench --bench load -- --scenario soak        # 60 s of mixed traffic (--duration S)
//!
//!     cargo bench --bench load -- --scenario idle-conns  # RSS per idle connection (--idle N)
//!
//! `idle-conns` starts the real binary (a child process, so only the gateway's memory is read) once
//! per protocol, opens N connections (2,000 unless `--idle N`) over HTTP/1.1, or over HTTP/2, each
//! making one proxied, token-checked request and then staying open and idle, and prints the
//! child's RSS before and after, and the difference per connection. HTTP/1.1 connections are
//! opened 200 at a time, each batch waited for until it is parked (`server.park_idle_after`).
//!
//! `login-rss` prints RSS before, at its peak and after 1,000 logins (a third succeed, a third give
//! a wrong password, a third are cancelled by the client 1-400 ms after sending) and whether RSS
//! after them stays within 128 MiB. `soak` runs proxied GETs, refreshes, logins, and requests the
//! client cancels, prints RSS every second, and ends with whether RSS stayed flat over the second
//! half.
//!
//! The in-process gateway signs with Ed25519 (certs/signing-key.pem; `--signing HS256` for the
//! shared secret), so `refresh` measures rotations with EdDSA signing; `get-distinct` sends HS256
//! tokens, verified by a previous key.
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

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{Request, Response};
use http_body_util::{BodyExt, Full};
use hyper::client::conn::http1::SendRequest;
use hyper_util::rt::TokioIo;
use rustls_pki_types::ServerName;
use tokio::net::{TcpSocket, TcpStream};
use tokio::task::JoinHandle;

#[derive(Debug, Clone)]
struct Opts {
    connections: usize,
    duration: Duration,
    /// Whether `--duration` was given (the soak's own default is 60 s).
    duration_set: bool,
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
    /// The in-process gateway's signing algorithm: EdDSA (default) or HS256.
    signing: String,
    /// Connections the `idle-conns` scenario holds open, per protocol.
    idle: usize,
}

fn parse_opts() -> Opts {
    let mut o = Opts {
        connections: 32,
        duration: Duration::from_secs(8),
        duration_set: false,
        scenarios: vec![],
        gw_threads: 1,
        target: None,
        ca: None,
        client_id: "web".into(),
        username: "bench".into(),
        password: "bench-password".into(),
        path: "/api/orders".into(),
        refresh_every: None,
        signing: "EdDSA".into(),
        idle: 2000,
    };
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        let mut val = || args.next().unwrap_or_else(|| panic!("{a} needs a value"));
        match a.as_str() {
            "--connections" => o.connections = val().parse().expect("--connections N"),
            "--duration" => {
                o.duration = Duration::from_secs(val().parse().expect("--duration SECONDS"));
                o.duration_set = true;
            }
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
            "--signing" => o.signing = val(),
            "--idle" => o.idle = val().parse().expect("--idle N"),
            "--bench" => {} // passed by `cargo bench`
            "-h" | "--help" => {
                println!(
                    "options: --connections N (32) --duration S (8) --scenario get-cached|get-distinct|refresh|refresh-durable|\
                     refresh-redis|refresh-redis-everysec|login|revocation-lag|memory|durable-1m \
                     (repeatable; default all of these) | login-rss | soak (60 s unless --duration) | idle-conns (--idle N, 2000) --gw-threads N (1) --signing EdDSA|HS256 (EdDSA) \
                     | --target URL --ca FILE --client-id ID --username U --password P --path /api/... \
                     --refresh-every S (default: 60 s before the token expires, or at 3/4 of a shorter lifetime)"
                );
                std::process::exit(0);
            }
            other => panic!("unknown option {other} (try --help)"),
        }
    }
    if o.scenarios.is_empty() {
        o.scenarios = [
            "get-cached",
            "get-distinct",
            "refresh",
            "refresh-durable",
            "refresh-redis",
            "refresh-redis-everysec",
            "login",
            "revocation-lag",
            "memory",
            "durable-1m",
        ]
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
    connect_from(t, None).await.expect("connect").0
}

/// A connection from `from` (a loopback address other than 127.0.0.1 makes the gateway see another
/// client address, so its per-address login limit does not slow a benchmark that is one machine).
/// Aborting the returned task closes the connection, as a client that goes away does.
async fn connect_from(t: &Target, from: Option<IpAddr>) -> Option<(SendRequest<Full<Bytes>>, JoinHandle<()>)> {
    let tcp = match from {
        None => TcpStream::connect(t.addr).await.ok()?,
        Some(ip) => {
            let socket = TcpSocket::new_v4().ok()?;
            socket.bind(SocketAddr::new(ip, 0)).ok()?;
            socket.connect(t.addr).await.ok()?
        }
    };
    tcp.set_nodelay(true).ok()?;
    let name = ServerName::try_from(t.host.clone()).ok()?;
    let tls = t.tls.connect(name, tcp).await.ok()?;
    let (send, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tls)).await.ok()?;
    let task = tokio::spawn(async move {
        let _ = conn.await;
    });
    Some((send, task))
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

fn field(body: &[u8], key: &str) -> Option<String> {
    let v: serde_json::Value = serde_json::from_slice(body).ok()?;
    v[key].as_str().map(String::from)
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
                // Only the fields the next request needs, borrowed from the body (a
                // serde_json::Value would build a map of every field on each refresh).
                #[derive(serde::Deserialize)]
                struct Granted<'a> {
                    #[serde(borrow)]
                    access_token: std::borrow::Cow<'a, str>,
                    #[serde(borrow)]
                    refresh_token: std::borrow::Cow<'a, str>,
                    expires_in: u64,
                }
                let fields = serde_json::from_slice::<Granted>(resp.body())
                    .ok()
                    .map(|g| (g.access_token.into_owned(), g.refresh_token.into_owned(), g.expires_in));
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
        "{name:<22} {:>5} {:>10.0} {:>8} {:>8} {:>8} {cpu} {errors:>7}",
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
            "{:<22} {:>5} {:>10} {:>8} {:>8} {:>8} {:>13} {:>15} {:>7}",
            "scenario", "conns", "req/s", "p50 µs", "p99 µs", "p99.9 µs", "gw CPU µs/req", "bench CPU µs/req", "errors"
        );
        println!(
            "  (gw CPU: the gateway's threads; bench CPU: the whole process, load generator and upstream included)"
        );
    } else {
        println!(
            "{:<22} {:>5} {:>10} {:>8} {:>8} {:>8} {:>13} {:>7}",
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

/// One million live sessions in the durable store: disk bytes per session once compacted, and how
/// long a restart takes to load them (from the snapshot; and from the log alone, before it).
fn durable_million() {
    use tokengate::auth::RevokedSessions;
    use tokengate::ids::{SessionId, mint_refresh_token};
    use tokengate::store::{DurableStore, NewSession};
    let n = 1_000_000u64;
    let clock: tokengate::SharedClock = Arc::new(tokengate::SystemClock);
    let now = clock.now_millis();
    let dir = std::env::temp_dir().join(format!("tokengate-durable-1m-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let open = || {
        let started = Instant::now();
        let opened = DurableStore::open(
            &dir,
            Arc::new(RevokedSessions::new()),
            10_000,
            clock.clone(),
            Default::default(),
        )
        .unwrap();
        (opened, started.elapsed())
    };
    let disk = || -> u64 {
        std::fs::read_dir(&dir)
            .unwrap()
            .map(|e| e.unwrap().metadata().unwrap().len())
            .sum()
    };
    let users: Vec<Arc<str>> = (0..1000).map(|i| Arc::from(format!("user{i}"))).collect();
    let (opened, _) = open();
    let started = Instant::now();
    for i in 0..n {
        let sid = SessionId::random().unwrap();
        let t = mint_refresh_token(sid).unwrap();
        opened
            .store
            .registry()
            .create(NewSession {
                sid,
                user: users[(i % 1000) as usize].clone(),
                client: "web".into(),
                scopes: "orders:read".into(),
                now_ms: now,
                session_expires_ms: now + 30 * 86_400_000,
                access_exp_secs: now / 1000 + 900,
                token: t.digest,
                token_exp_ms: now + 86_400_000,
                max_sessions_per_user: usize::MAX,
            })
            .unwrap();
    }
    println!(
        "durable-1m: {n} sessions journaled in {:.2}s",
        started.elapsed().as_secs_f64()
    );
    drop(opened);
    let log_bytes = disk();
    let (opened, from_log) = open();
    assert_eq!(opened.sessions as u64, n);
    println!(
        "durable-1m: restart from the log alone: {:.2}s ({:.0} bytes on disk per session)",
        from_log.as_secs_f64(),
        log_bytes as f64 / n as f64
    );
    let stats = opened.store.compact().unwrap();
    drop(opened);
    let (opened, from_snapshot) = open();
    assert_eq!(opened.sessions as u64, n);
    println!(
        "durable-1m: restart from the snapshot: {:.2}s ({:.0} bytes on disk per live session; snapshot {} bytes)",
        from_snapshot.as_secs_f64(),
        disk() as f64 / n as f64,
        stats.snapshot_bytes
    );
    drop(opened);
    let _ = std::fs::remove_dir_all(&dir);
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
    if o.scenarios.iter().any(|s| s == "durable-1m") {
        durable_million();
    }
    let scenarios: Vec<String> = o
        .scenarios
        .iter()
        .filter(|s| *s != "memory" && *s != "durable-1m")
        .cloned()
        .collect();
    if scenarios.is_empty() {
        return;
    }

    let repo = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    let upstream = load_rt.block_on(start_upstream());
    let hash = tokengate::oauth::users::hash_password(&o.password).unwrap();
    let secret_path = repo.join("certs/dev-jwt-secret");
    let toml = gateway_toml(
        &repo,
        &o,
        &hash,
        upstream,
        &signing_keys(&o.signing, &repo, &secret_path),
    );
    let config_with = |extra: &str| -> tokengate::Config {
        tokengate::Config::from_toml(&format!("{toml}\n{extra}\n"), &repo, "load.toml")
            .unwrap_or_else(|e| panic!("{e}"))
    };
    let config = config_with("");
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
        "in-process gateway ({} worker thread(s), {} Argon2 thread(s), {} signing), TLS 1.3 on loopback",
        o.gw_threads,
        running.password_pool().stats().threads,
        o.signing,
    );
    let mut table = false;
    let mut redis_side: Option<RedisSide> = None;
    let mut redis_target: Option<Target> = None;
    let wants_redis = scenarios
        .iter()
        .any(|s| s.starts_with("refresh-redis") || s == "revocation-lag");
    if wants_redis {
        redis_side = RedisSide::start();
    }
    load_rt.block_on(async {
        for s in &scenarios {
            match s.as_str() {
                "login-rss" => {
                    login_rss(&target, &running, &o).await;
                    continue;
                }
                "soak" => {
                    soak(&target, &running, &o).await;
                    continue;
                }
                "idle-conns" => {
                    idle_connections(&toml, &repo, &creds, &o).await;
                    continue;
                }
                _ if !table => {
                    println!("{}s per scenario", o.duration.as_secs());
                    header(true);
                    table = true;
                }
                _ => {}
            }
            if s == "refresh-redis" || s == "refresh-redis-everysec" {
                let Some(side) = redis_side.as_mut() else { continue };
                if redis_target.is_none() {
                    redis_target = Some(side.gateway(gw_rt.handle(), &toml, &repo, "bench:").await);
                }
                // The same server, its fsync policy switched at run time.
                let fsync = if s == "refresh-redis" { "always" } else { "everysec" };
                let client = redis::Client::open(side.server.url()).unwrap();
                let mut c = client.get_multiplexed_async_connection().await.unwrap();
                let () = redis::cmd("CONFIG")
                    .arg("SET")
                    .arg("appendfsync")
                    .arg(fsync)
                    .query_async(&mut c)
                    .await
                    .unwrap();
                let pid = side.server.pid().unwrap();
                let before = process_cpu_us(pid);
                let started = Instant::now();
                run(s, redis_target.as_ref().unwrap(), Work::Refresh, &creds, &o, true).await;
                let redis_cpu = process_cpu_us(pid) - before;
                println!(
                    "  (redis-server CPU during {s}: {:.0} ms over {:.1} s)",
                    redis_cpu as f64 / 1e3,
                    started.elapsed().as_secs_f64()
                );
                continue;
            }
            if s == "revocation-lag" {
                let Some(side) = redis_side.as_mut() else { continue };
                let a = side.gateway(gw_rt.handle(), &toml, &repo, "lag:").await;
                side.gateway(gw_rt.handle(), &toml, &repo, "lag:").await;
                let b = side.gateways.last().unwrap();
                let lags = Arc::new(StreamLags::default());
                if let tokengate::store::Store::Redis(st) = &b.app().state().store {
                    st.observe(lags.clone());
                }
                revocation_lag(&a, b, &lags, 200).await;
                continue;
            }
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
                "refresh-durable" => {
                    // The same refresh load against a second gateway whose sessions live in the
                    // durable store (a fresh folder): what acknowledged-means-durable costs.
                    let dir = std::env::temp_dir().join(format!("tokengate-load-state-{}", std::process::id()));
                    let _ = std::fs::remove_dir_all(&dir);
                    let config = config_with(&format!("[state]\npath = \"{}\"\n", dir.display()));
                    // Started on the gateway's runtime, awaited from this one.
                    let durable = start_on(gw_rt.handle(), config).await;
                    let t = Target {
                        addr: durable.addr,
                        authority: format!("localhost:{}", durable.addr.port()),
                        ..target.clone()
                    };
                    let journal = |r: &tokengate::RunningGateway| match &r.app().state().store {
                        tokengate::store::Store::Durable(d) => d.journal().map(|j| j.stats()),
                        _ => None,
                    };
                    let before = journal(&durable).unwrap_or_default();
                    let started = Instant::now();
                    run(s, &t, Work::Refresh, &creds, &o, true).await;
                    let after = journal(&durable).unwrap_or_default();
                    let secs = started.elapsed().as_secs_f64();
                    let commits = after.commits - before.commits;
                    let records = after.appended_records - before.appended_records;
                    println!(
                        "{:<13} journal: {records} records, {commits} fsyncs ({:.0}/s), {:.1} records per fsync",
                        "",
                        commits as f64 / secs,
                        records as f64 / commits.max(1) as f64
                    );
                    gw_rt.spawn(durable.shutdown()).await.unwrap();
                    let _ = std::fs::remove_dir_all(&dir);
                    continue;
                }
                "login" => Work::Login,
                other => panic!("unknown scenario {other}"),
            };
            run(s, &target, work, &creds, &o, true).await;
        }
    });
    gw_rt.block_on(running.shutdown());
    if let Some(side) = redis_side {
        for g in side.gateways {
            gw_rt.block_on(g.shutdown());
        }
    }
}

/// Starts a gateway on the gateway runtime `gw`, awaited from the caller's.
async fn start_on(gw: &tokio::runtime::Handle, config: tokengate::Config) -> tokengate::RunningGateway {
    gw.spawn(async {
        tokengate::Gateway::new(config, Arc::new(tokengate::SystemClock))
            .unwrap()
            .start()
            .await
            .unwrap()
    })
    .await
    .unwrap()
}

/// The in-process gateways' config; `[state]` is appended for the Redis ones.
fn gateway_toml(repo: &std::path::Path, o: &Opts, hash: &str, upstream: SocketAddr, signing: &str) -> String {
    format!(
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
[[clients]]
id = "svc"
secret_sha256 = "{svc}"
grants = ["client_credentials"]
scopes = ["orders:read"]
{users}
[[routes]]
path_prefix = "/api/orders"
upstream = "http://{upstream}"
scopes = ["orders:read"]
"#,
        certs = repo.join("certs").display(),
        svc = tokengate::crypto::sha256(SVC_SECRET.as_bytes())
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect::<String>(),
        users = (0..o.connections.max(LOGIN_RSS_USERS))
            .map(|i| format!(
                "[[users]]\nusername = \"{}-{i}\"\npassword_hash = \"{hash}\"\nscopes = [\"orders:read\"]\n",
                o.username
            ))
            .collect::<String>(),
    )
}

const SVC_SECRET: &str = "bench-svc-secret-0123456789";

/// On-CPU microseconds of another process (utime + stime, in clock ticks of 10 ms).
fn process_cpu_us(pid: u32) -> u64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // Fields after the command name (which may hold spaces) start after the last ')'.
    let rest = stat.rsplit_once(')').map_or("", |(_, r)| r);
    let f: Vec<u64> = rest.split_whitespace().map(|x| x.parse().unwrap_or(0)).collect();
    (f.get(11).copied().unwrap_or(0) + f.get(12).copied().unwrap_or(0)) * 10_000
}

/// A throwaway Redis and the gateways started on it (on the gateway runtime).
struct RedisSide {
    server: tokengate::store::redis::testing::RedisServer,
    gateways: Vec<tokengate::RunningGateway>,
}

impl RedisSide {
    fn start() -> Option<RedisSide> {
        match tokengate::store::redis::testing::RedisServer::start() {
            Ok(server) => Some(RedisSide {
                server,
                gateways: Vec::new(),
            }),
            Err(e) => {
                println!("(Redis scenarios skipped: {e})");
                None
            }
        }
    }

    /// Starts a gateway with the Redis store under `prefix`.
    async fn gateway(
        &mut self,
        gw: &tokio::runtime::Handle,
        base_toml: &str,
        repo: &std::path::Path,
        prefix: &str,
    ) -> Target {
        let toml = format!(
            "{base_toml}\n[state]\nredis_url = \"{}\"\nkey_prefix = \"{prefix}\"\n",
            self.server.url()
        );
        let config = tokengate::Config::from_toml(&toml, repo, "load.toml").unwrap_or_else(|e| panic!("{e}"));
        let running = start_on(gw, config).await;
        let target = Target {
            addr: running.addr,
            host: "localhost".into(),
            authority: format!("localhost:{}", running.addr.port()),
            tls: tls_connector(&repo.join("certs/ca.pem")),
        };
        self.gateways.push(running);
        target
    }
}

/// Samples of the stream lag (Redis append → applied on the other instance).
#[derive(Default)]
struct StreamLags(std::sync::Mutex<Vec<Duration>>);

impl tokengate::store::redis::StoreObserver for StreamLags {
    fn revocation_propagated(&self, lag: Duration) {
        self.0.lock().unwrap().push(lag);
    }
}

fn pcts(mut v: Vec<Duration>) -> String {
    v.sort_unstable();
    let at = |p: f64| {
        v.get(((v.len() as f64 * p) as usize).min(v.len().saturating_sub(1)))
            .copied()
            .unwrap_or_default()
    };
    format!(
        "p50 {:>8.3} ms  p99 {:>8.3} ms  max {:>8.3} ms",
        at(0.5).as_secs_f64() * 1e3,
        at(0.99).as_secs_f64() * 1e3,
        v.last().copied().unwrap_or_default().as_secs_f64() * 1e3
    )
}

/// Revokes `n` client-credentials tokens on A, one at a time, and watches B's in-memory revoked
/// set (what B's request path reads) until each is there.
async fn revocation_lag(a: &Target, b: &tokengate::RunningGateway, lags: &StreamLags, n: usize) {
    use base64::Engine;
    let mut s = connect(a).await;
    let revoked = b.app().state().revoked.clone();
    let (mut sent_to_seen, mut answered_to_seen) = (Vec::new(), Vec::new());
    for _ in 0..n {
        let form = [
            ("grant_type", "client_credentials"),
            ("client_id", "svc"),
            ("client_secret", SVC_SECRET),
        ];
        let r = send(&mut s, post_form(a, "/api/oauth2/token", &form))
            .await
            .expect("token");
        let at = field(r.body(), "access_token").expect("access_token");
        let claims: serde_json::Value = serde_json::from_slice(
            &base64::engine::general_purpose::URL_SAFE_NO_PAD
                .decode(at.split('.').nth(1).unwrap())
                .unwrap(),
        )
        .unwrap();
        let sid = tokengate::ids::SessionId::parse(claims["sid"].as_str().unwrap()).unwrap();
        let now = claims["iat"].as_u64().unwrap();
        let form = [
            ("token", at.as_str()),
            ("client_id", "svc"),
            ("client_secret", SVC_SECRET),
        ];
        let sent = Instant::now();
        let r = send(&mut s, post_form(a, "/api/oauth2/revoke", &form))
            .await
            .expect("revoke");
        assert_eq!(r.status(), 200);
        let answered = Instant::now();
        let deadline = answered + Duration::from_secs(10);
        while !revoked.is_revoked(sid, now) {
            assert!(Instant::now() < deadline, "B never saw a revocation");
            tokio::task::yield_now().await;
        }
        let seen = Instant::now();
        sent_to_seen.push(seen - sent);
        answered_to_seen.push(seen.saturating_duration_since(answered));
    }
    println!("revocation-lag: {n} revocations on A, each awaited in B's revoked set (what B's requests read)");
    println!("  revoke sent to A → enforced on B:        {}", pcts(sent_to_seen));
    println!("  A's answer → enforced on B:              {}", pcts(answered_to_seen));
    println!(
        "  stream lag (Redis append → applied on B): {}",
        pcts(lags.0.lock().unwrap().clone())
    );
}

/// Users the `login-rss` scenario spreads its logins over: each gets 4 of the 1,000, so none
/// reaches the 5 failures after which the gateway slows a username down.
const LOGIN_RSS_USERS: usize = 250;
const LOGIN_RSS_LOGINS: usize = 1_000;
/// The bound the gateway is meant to hold after any mix of logins (issue 8).
const LOGIN_RSS_TARGET: u64 = 128 << 20;

fn mib(bytes: u64) -> f64 {
    bytes as f64 / (1 << 20) as f64
}

/// A client address for the `n`th connection: 127.1.x.y, so that the gateway's per-address login
/// limit (20 failures from one address) sees many clients, as it would in production.
fn client_ip(n: usize) -> IpAddr {
    let n = n % 65_000 + 1;
    IpAddr::V4(Ipv4Addr::new(127, 1, (n >> 8) as u8, n as u8))
}

/// Samples RSS every 5 ms on its own thread; `stop` returns the highest seen.
struct PeakRss {
    peak: Arc<AtomicU64>,
    done: Arc<AtomicBool>,
    thread: std::thread::JoinHandle<()>,
}

impl PeakRss {
    fn start() -> PeakRss {
        let peak = Arc::new(AtomicU64::new(rss_bytes()));
        let done = Arc::new(AtomicBool::new(false));
        let (p, d) = (peak.clone(), done.clone());
        let thread = std::thread::spawn(move || {
            while !d.load(Ordering::Relaxed) {
                p.fetch_max(rss_bytes(), Ordering::Relaxed);
                std::thread::sleep(Duration::from_millis(5));
            }
        });
        PeakRss { peak, done, thread }
    }
    fn stop(self) -> u64 {
        self.done.store(true, Ordering::Relaxed);
        self.thread.join().unwrap();
        self.peak.load(Ordering::Relaxed).max(rss_bytes())
    }
}

/// Waits until the gateway's Argon2 pool has nothing running or queued.
async fn pool_idle(running: &tokengate::RunningGateway) {
    loop {
        let s = running.password_pool().stats();
        if s.running == 0 && s.queued == 0 {
            return;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

#[derive(Default)]
struct LoginTally {
    ok: AtomicU64,
    wrong: AtomicU64,
    cancelled: AtomicU64,
    busy: AtomicU64,
    other: AtomicU64,
}

/// One login from its own connection and client address. `cancel_after`: the client goes away
/// that long after sending (the request is then mid-flight: queued for or in its password check).
async fn one_login(
    t: &Target,
    n: usize,
    username: &str,
    password: &str,
    cancel_after: Option<Duration>,
    tally: &LoginTally,
) {
    let Some((mut send, conn)) = connect_from(t, Some(client_ip(n))).await else {
        tally.other.fetch_add(1, Ordering::Relaxed);
        return;
    };
    let form = [
        ("grant_type", "password"),
        ("client_id", "web"),
        ("username", username),
        ("password", password),
    ];
    let req = post_form(t, "/api/oauth2/token", &form);
    let counter = match cancel_after {
        Some(after) => match tokio::time::timeout(after, send_request(&mut send, req)).await {
            Err(_) => &tally.cancelled,
            Ok(status) => login_counter(status, tally),
        },
        None => login_counter(send_request(&mut send, req).await, tally),
    };
    counter.fetch_add(1, Ordering::Relaxed);
    conn.abort();
}

async fn send_request(s: &mut SendRequest<Full<Bytes>>, req: Request<Full<Bytes>>) -> Option<u16> {
    send(s, req).await.map(|r| r.status().as_u16())
}

fn login_counter(status: Option<u16>, tally: &LoginTally) -> &AtomicU64 {
    match status {
        Some(200) => &tally.ok,
        Some(400) => &tally.wrong,
        Some(429) => &tally.busy,
        _ => &tally.other,
    }
}

/// Issue 8's memory bound: RSS after 1,000 logins of any mix stays within 128 MiB.
async fn login_rss(t: &Target, running: &tokengate::RunningGateway, o: &Opts) {
    pool_idle(running).await;
    let before = rss_bytes();
    let peak = PeakRss::start();
    let started = Instant::now();
    let next = Arc::new(AtomicUsize::new(0));
    let tally = Arc::new(LoginTally::default());
    let workers: Vec<_> = (0..o.connections)
        .map(|_| {
            let (t, o, next, tally) = (t.clone(), o.clone(), next.clone(), tally.clone());
            tokio::spawn(async move {
                loop {
                    let i = next.fetch_add(1, Ordering::Relaxed);
                    if i >= LOGIN_RSS_LOGINS {
                        return;
                    }
                    let username = format!("{}-{}", o.username, i % LOGIN_RSS_USERS);
                    // Cancelled 1-400 ms after sending: queued for its check at the gateway, or in it.
                    let (password, cancel) = match i % 3 {
                        0 => (o.password.as_str(), None),
                        1 => ("a-wrong-password", None),
                        _ => (
                            o.password.as_str(),
                            Some(Duration::from_millis(1 + (i * 37 % 400) as u64)),
                        ),
                    };
                    one_login(&t, i, &username, password, cancel, &tally).await;
                }
            })
        })
        .collect();
    for w in workers {
        w.await.unwrap();
    }
    let elapsed = started.elapsed();
    pool_idle(running).await;
    let peak = peak.stop();
    let after = rss_bytes();
    let s = running.password_pool().stats();
    println!(
        "login-rss: {LOGIN_RSS_LOGINS} logins over {} connections in {:.1} s: {} ok, {} wrong password, {} cancelled \
         by the client, {} answered 429, {} other",
        o.connections,
        elapsed.as_secs_f64(),
        tally.ok.load(Ordering::Relaxed),
        tally.wrong.load(Ordering::Relaxed),
        tally.cancelled.load(Ordering::Relaxed),
        tally.busy.load(Ordering::Relaxed),
        tally.other.load(Ordering::Relaxed),
    );
    println!(
        "login-rss: Argon2 pool: {} threads, {} checks run, {} skipped (client gone), peak {} at once, {} block \
         allocations",
        s.threads, s.run, s.skipped, s.peak_running, s.block_allocations
    );
    println!(
        "login-rss: RSS before {:.1} MiB, peak {:.1} MiB, after {:.1} MiB; target after <= {} MiB: {}",
        mib(before),
        mib(peak),
        mib(after),
        LOGIN_RSS_TARGET >> 20,
        if after <= LOGIN_RSS_TARGET {
            "holds"
        } else {
            "DOES NOT HOLD"
        }
    );
}

/// One soak client: its own user and address; proxied GETs with its access token, a refresh every
/// 2 s, a new login every 10 s, and, every second, a login and every half second a GET that it
/// cancels right after sending (each on a connection of its own, from a fresh address).
async fn soak_client(t: Target, o: Opts, w: usize, deadline: Instant, tally: Arc<SoakTally>, fresh: Arc<AtomicUsize>) {
    let creds = Creds {
        username: format!("{}-{}", o.username, w % LOGIN_RSS_USERS),
        ..Creds::from(&o)
    };
    let home = Some(IpAddr::V4(Ipv4Addr::new(127, 2, 0, (w % 250 + 1) as u8)));
    let Some((mut s, mut conn)) = connect_from(&t, home).await else {
        return;
    };
    let Some((mut access, mut refresh, _)) = login(&t, &mut s, &creds, &Counters::default()).await else {
        return;
    };
    let (mut next_refresh, mut next_login) = (Instant::now(), Instant::now() + Duration::from_secs(10));
    let (mut next_cancelled_login, mut next_cancelled_get) = (Instant::now(), Instant::now());
    while Instant::now() < deadline {
        let now = Instant::now();
        if now >= next_cancelled_login {
            next_cancelled_login = now + Duration::from_secs(1);
            // An unknown username from a fresh address: neither backs off, each costs a check.
            let n = fresh.fetch_add(1, Ordering::Relaxed);
            let ghost = format!("ghost-{n}");
            let quiet = LoginTally::default();
            one_login(&t, n, &ghost, "whatever", Some(Duration::from_millis(1)), &quiet).await;
            tally.cancelled.fetch_add(1, Ordering::Relaxed);
            continue;
        }
        if now >= next_cancelled_get {
            next_cancelled_get = now + Duration::from_millis(500);
            if let Some((mut c, task)) = connect_from(&t, home).await {
                let _ =
                    tokio::time::timeout(Duration::from_micros(200), send(&mut c, get(&t, &creds.path, &access))).await;
                task.abort();
            }
            tally.cancelled.fetch_add(1, Ordering::Relaxed);
            continue;
        }
        let req = if now >= next_login {
            next_login = now + Duration::from_secs(10);
            tally.logins.fetch_add(1, Ordering::Relaxed);
            let form = [
                ("grant_type", "password"),
                ("client_id", creds.client_id.as_str()),
                ("username", creds.username.as_str()),
                ("password", creds.password.as_str()),
            ];
            post_form(&t, "/api/oauth2/token", &form)
        } else if now >= next_refresh {
            next_refresh = now + Duration::from_secs(2);
            tally.refreshes.fetch_add(1, Ordering::Relaxed);
            let form = [
                ("grant_type", "refresh_token"),
                ("client_id", creds.client_id.as_str()),
                ("refresh_token", refresh.as_str()),
            ];
            post_form(&t, "/api/oauth2/token", &form)
        } else {
            tally.gets.fetch_add(1, Ordering::Relaxed);
            get(&t, &creds.path, &access)
        };
        let Some(resp) = send(&mut s, req).await else {
            tally.errors.fetch_add(1, Ordering::Relaxed);
            conn.abort();
            let Some(fresh_conn) = connect_from(&t, home).await else {
                return;
            };
            (s, conn) = fresh_conn;
            continue;
        };
        if resp.status() != 200 {
            // 429 on a login is the gateway's backoff doing its job, not a failure.
            if resp.status() != 429 {
                tally.errors.fetch_add(1, Ordering::Relaxed);
            }
            continue;
        }
        if let (Some(at), Some(rt)) = (field(resp.body(), "access_token"), field(resp.body(), "refresh_token")) {
            (access, refresh) = (at, rt);
        }
    }
    conn.abort();
}

#[derive(Default)]
struct SoakTally {
    gets: AtomicU64,
    refreshes: AtomicU64,
    logins: AtomicU64,
    cancelled: AtomicU64,
    errors: AtomicU64,
}

/// Issue 8's soak: mixed traffic for 60 s (or `--duration`), RSS printed every second, then
/// whether it stayed flat: the second half's samples (at most the last 30) within 10 % of their
/// median.
async fn soak(t: &Target, running: &tokengate::RunningGateway, o: &Opts) {
    let duration = if o.duration_set {
        o.duration
    } else {
        Duration::from_secs(60)
    };
    let started = Instant::now();
    let deadline = started + duration;
    let tally = Arc::new(SoakTally::default());
    let fresh = Arc::new(AtomicUsize::new(0));
    println!(
        "soak: {} clients for {} s: proxied GETs, a refresh every 2 s and a login every 10 s each, \
         a cancelled login every 1 s and a cancelled GET every 0.5 s each",
        o.connections,
        duration.as_secs()
    );
    let clients: Vec<_> = (0..o.connections)
        .map(|w| {
            tokio::spawn(soak_client(
                t.clone(),
                o.clone(),
                w,
                deadline,
                tally.clone(),
                fresh.clone(),
            ))
        })
        .collect();
    let mut samples = Vec::new();
    let mut tick = tokio::time::interval_at(
        tokio::time::Instant::now() + Duration::from_secs(1),
        Duration::from_secs(1),
    );
    let mut last_gets = 0;
    while Instant::now() < deadline {
        tick.tick().await;
        let rss = rss_bytes();
        samples.push(rss);
        let gets = tally.gets.load(Ordering::Relaxed);
        let pool = running.password_pool().stats();
        println!(
            "soak: t={:>3}s RSS {:>6.1} MiB  GETs/s {:>6}  logins {} refreshes {} cancelled {} errors {}  Argon2 run {} \
             skipped {}",
            samples.len(),
            mib(rss),
            gets - last_gets,
            tally.logins.load(Ordering::Relaxed),
            tally.refreshes.load(Ordering::Relaxed),
            tally.cancelled.load(Ordering::Relaxed),
            tally.errors.load(Ordering::Relaxed),
            pool.run,
            pool.skipped,
        );
        last_gets = gets;
    }
    for c in clients {
        c.await.unwrap();
    }
    let window = &samples[samples.len() - (samples.len() / 2).clamp(1, 30)..];
    let mut sorted = window.to_vec();
    sorted.sort_unstable();
    let median = sorted[sorted.len() / 2];
    let (lo, hi) = (sorted[0], sorted[sorted.len() - 1]);
    let flat = hi as f64 <= median as f64 * 1.10 && lo as f64 >= median as f64 * 0.90;
    println!(
        "soak: RSS {}: the last {} s within {:.1}-{:.1} MiB, median {:.1} MiB (flat = all within 10 % of the median)",
        if flat { "stayed flat" } else { "DID NOT stay flat" },
        window.len(),
        mib(lo),
        mib(hi),
        mib(median),
    );
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

/// The real binary as a child process, on `toml`, for as long as this lives.
struct Child {
    child: std::process::Child,
    dir: PathBuf,
    addr: SocketAddr,
    admin: SocketAddr,
}

impl Child {
    /// Starts `target/…/tokengate` and waits for its `tokengate listening` line.
    fn start(toml: &str) -> Child {
        use std::io::BufRead;
        let dir = std::env::temp_dir().join(format!("tokengate-load-child-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let config = dir.join("tokengate.toml");
        std::fs::write(&config, toml).unwrap();
        let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_tokengate"))
            .arg("--config")
            .arg(&config)
            .env_remove("RUST_LOG")
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::inherit())
            .spawn()
            .expect("cannot start the tokengate binary");
        let mut lines = std::io::BufReader::new(child.stdout.take().unwrap());
        let mut line = String::new();
        let (addr, admin) = loop {
            line.clear();
            if lines.read_line(&mut line).unwrap_or(0) == 0 {
                panic!("tokengate exited before listening");
            }
            if line.contains("tokengate listening") {
                let field = |name: &str| -> SocketAddr {
                    line.split_whitespace()
                        .find_map(|f| f.strip_prefix(name))
                        .unwrap_or_else(|| panic!("no {name} in the listening line"))
                        .trim_matches('"')
                        .parse()
                        .unwrap()
                };
                break (field("addr="), field("admin_addr="));
            }
        };
        // Drained, so a full pipe never blocks the gateway's log writer.
        std::thread::spawn(move || std::io::copy(&mut lines, &mut std::io::sink()));
        Child {
            child,
            dir,
            addr,
            admin,
        }
    }

    /// A gauge or counter from the child's `/metrics`.
    async fn metric(&self, name: &str) -> f64 {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let mut s = TcpStream::connect(self.admin).await.unwrap();
        s.write_all(b"GET /metrics HTTP/1.1\r\nHost: admin\r\nConnection: close\r\n\r\n")
            .await
            .unwrap();
        let mut text = String::new();
        s.read_to_string(&mut text).await.unwrap();
        text.lines()
            .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.trim().parse().ok())
            .unwrap_or_else(|| panic!("no {name} in /metrics"))
    }

    fn rss_bytes(&self) -> u64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.child.id())).unwrap_or_default();
        status
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
            .unwrap_or(0)
            * 1024
    }
}

impl Drop for Child {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// One connection over `alpn` that made one proxied, token-checked request and is kept open; the
/// returned task owns it (aborted, it closes).
async fn idle_connection(t: &Target, cfg: &Arc<rustls::ClientConfig>, alpn: &[u8], token: &str) -> JoinHandle<()> {
    let tcp = TcpStream::connect(t.addr).await.expect("connect");
    tcp.set_nodelay(true).unwrap();
    let name = ServerName::try_from(t.host.clone()).unwrap();
    let tls = tokio_rustls::TlsConnector::from(cfg.clone())
        .connect(name, tcp)
        .await
        .expect("TLS");
    assert_eq!(tls.get_ref().1.alpn_protocol(), Some(alpn), "ALPN");
    let io = TokioIo::new(tls);
    let mut req = get(t, "/api/orders", token);
    // The one request, then a task that keeps the sender (dropping it would end the connection)
    // and drives the connection.
    macro_rules! warm_and_hold {
        ($handshake:expr) => {{
            let (mut send, conn) = $handshake.await.expect("handshake");
            let conn = tokio::spawn(async move {
                let _ = conn.await;
            });
            send.ready().await.unwrap();
            let resp = send.send_request(req).await.expect("request");
            let status = resp.status();
            resp.into_body().collect().await.unwrap();
            let held = tokio::spawn(async move {
                let _keep = send;
                let _ = conn.await;
            });
            (status, held)
        }};
    }
    let (status, task) = if alpn == b"h2" {
        req.headers_mut().remove("host");
        *req.uri_mut() = format!("https://{}/api/orders", t.authority).parse().unwrap();
        warm_and_hold!(hyper::client::conn::http2::handshake(
            hyper_util::rt::TokioExecutor::new(),
            io
        ))
    } else {
        warm_and_hold!(hyper::client::conn::http1::handshake(io))
    };
    assert_eq!(status, 200, "the warm-up request of an idle connection");
    task
}

/// Connections `idle-conns` opens at a time.
const IDLE_BATCH: usize = 200;

/// `idle-conns`: the gateway's RSS per idle keep-alive TLS connection, HTTP/1.1 and HTTP/2, each
/// protocol in a fresh gateway process (memory freed by one would otherwise be reused by the other).
async fn idle_connections(toml: &str, repo: &std::path::Path, creds: &Creds, o: &Opts) {
    let roots = tokengate::server::tls::roots_from_file(&repo.join("certs/ca.pem")).unwrap();
    println!(
        "idle connections: {} per protocol, each after one proxied request, TLS 1.3 (RSS of the tokengate process)",
        o.idle
    );
    println!(
        "{:<9} {:>12} {:>12} {:>16}",
        "protocol", "RSS before", "RSS after", "per connection"
    );
    // Opening 10,000 connections takes longer than the default idle_timeout (60s).
    let toml = toml.replacen("[server]\n", "[server]\nidle_timeout = \"10m\"\n", 1);
    for (label, alpn) in [("HTTP/1.1", &b"http/1.1"[..]), ("HTTP/2", &b"h2"[..])] {
        let child = Child::start(&toml);
        let t = Target {
            addr: child.addr,
            host: "localhost".into(),
            authority: format!("localhost:{}", child.addr.port()),
            tls: tls_connector(&repo.join("certs/ca.pem")),
        };
        let mut c = connect(&t).await;
        let user = Creds {
            username: format!("{}-0", creds.username),
            ..creds.clone()
        };
        let (token, _, _) = login(&t, &mut c, &user, &Counters::default()).await.expect("login");
        drop(c);
        let cfg = Arc::new(tokengate::server::tls::client_config(roots.clone(), &[alpn]).unwrap());
        // A first batch warms what a connection's first use allocates once per process (pools,
        // caches, per-thread buffers); the figure is the second batch's.
        let mut held = Vec::with_capacity(o.idle + 50);
        for _ in 0..50 {
            held.push(idle_connection(&t, &cfg, alpn, &token).await);
        }
        let http1 = alpn != b"h2";
        // HTTP/1.1 connections idle for `server.park_idle_after` (1 s) release their HTTP state
        // (until the client sends again): opened in batches, each let park before the next, as
        // connections that go idle over time do (what one frees, the next batch reuses).
        let until_parked = |n: usize| {
            let child = &child;
            async move {
                let bound = Instant::now() + Duration::from_secs(60);
                loop {
                    let parked = child.metric("tokengate_connections_parked").await;
                    if parked >= n as f64 {
                        break;
                    }
                    let open = child.metric("tokengate_connections_open").await;
                    assert!(
                        Instant::now() < bound,
                        "{parked} of {n} connections parked after 60 s ({open} open)"
                    );
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            }
        };
        if http1 {
            until_parked(held.len()).await;
        }
        let before = child.rss_bytes();
        for _ in 0..o.idle.div_ceil(IDLE_BATCH) {
            for _ in 0..IDLE_BATCH.min(o.idle + 50 - held.len()) {
                held.push(idle_connection(&t, &cfg, alpn, &token).await);
            }
            if http1 {
                until_parked(held.len()).await;
            }
        }
        let after = child.rss_bytes();
        println!(
            "{label:<9} {:>8.1} MiB {:>8.1} MiB {:>11.1} KiB",
            mib(before),
            mib(after),
            after.saturating_sub(before) as f64 / 1024.0 / o.idle as f64
        );
        for h in held {
            h.abort();
        }
    }
}
