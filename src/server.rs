//! Listeners, the accept loop, per-connection timeouts, graceful shutdown, and the admin listener.
//!
//! Each accepted connection takes a slot of `max_connections`; when none is free the accept loop
//! waits, so further connections queue in the kernel's listen backlog (and are refused by the
//! kernel once that is full) instead of being accepted and starved. TLS connections get
//! `handshake_timeout` to finish the handshake, then are served with the protocol ALPN chose.
//! HTTP/1.1 connections get `header_read_timeout` for each request head (slowloris).
//!
//! Shutdown has two phases: *draining* (stop accepting, tell connections to finish their in-flight
//! requests and close: GOAWAY on HTTP/2, `Connection: close` on HTTP/1.1) and, after
//! `shutdown_grace`, *closing* (drop whatever is left).

pub mod open_files;
pub mod tls;

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::server::conn::{http1, http2};
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Semaphore, mpsc, watch};
use tokio_rustls::TlsAcceptor;

use crate::service::{App, ConnInfo};
use crate::state::State;
use crate::store::SessionStore;

/// Where the process is in its life; connection tasks watch it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Phase {
    Running,
    Draining,
    Closing,
}

/// Resolves once the phase has reached `at_least` (or the sender is gone).
pub async fn reached(rx: &mut watch::Receiver<Phase>, at_least: Phase) {
    let _ = rx.wait_for(|p| *p >= at_least).await;
}

/// The `max_connections` slots: a semaphore whose size a config reload can change.
pub struct Slots {
    semaphore: Arc<Semaphore>,
    capacity: std::sync::Mutex<usize>,
}

impl Slots {
    pub fn new(capacity: usize) -> Arc<Slots> {
        Arc::new(Slots {
            semaphore: Arc::new(Semaphore::new(capacity)),
            capacity: std::sync::Mutex::new(capacity),
        })
    }

    /// Grows at once; shrinks as connections close (slots in use are never taken back).
    pub fn resize(&self, capacity: usize) {
        let Ok(mut current) = self.capacity.lock() else { return };
        if capacity > *current {
            self.semaphore.add_permits(capacity - *current);
        } else if capacity < *current {
            let excess = *current - capacity;
            let forgotten = self.semaphore.forget_permits(excess);
            if forgotten < excess {
                let semaphore = self.semaphore.clone();
                let rest = (excess - forgotten) as u32;
                tokio::spawn(async move {
                    if let Ok(p) = semaphore.acquire_many_owned(rest).await {
                        p.forget();
                    }
                });
            }
        }
        *current = capacity;
    }
}

#[derive(Debug, Clone)]
pub struct ConnSettings {
    pub handshake_timeout: Duration,
    pub header_read_timeout: Duration,
    /// Request head (HTTP/1.1) or header list (HTTP/2) cap: 431 beyond it.
    pub max_header_bytes: usize,
}

impl From<&crate::config::ServerSettings> for ConnSettings {
    fn from(s: &crate::config::ServerSettings) -> Self {
        ConnSettings {
            handshake_timeout: s.handshake_timeout,
            header_read_timeout: s.header_read_timeout,
            max_header_bytes: s.max_header_bytes,
        }
    }
}

/// Accepts until draining starts. `_alive` is held by every connection task, so the receiver side
/// learns when the last one has finished.
pub async fn accept_loop(
    listener: TcpListener,
    app: Arc<App>,
    tls: Option<TlsAcceptor>,
    slots: Arc<Slots>,
    mut phase: watch::Receiver<Phase>,
    alive: mpsc::Sender<()>,
) {
    loop {
        let permit = tokio::select! {
            p = slots.semaphore.clone().acquire_owned() => match p { Ok(p) => p, Err(_) => return },
            _ = reached(&mut phase, Phase::Draining) => return,
        };
        let (stream, peer) = tokio::select! {
            r = listener.accept() => match r {
                Ok(pair) => pair,
                Err(e) => {
                    // EMFILE and friends: back off briefly instead of spinning.
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            _ = reached(&mut phase, Phase::Draining) => return,
        };
        let _ = stream.set_nodelay(true);
        // Each connection takes the settings of the config current when it was accepted.
        let settings = ConnSettings::from(&app.snapshot().config.server);
        let app = app.clone();
        let tls = tls.clone();
        let phase = phase.clone();
        let alive = alive.clone();
        tokio::spawn(async move {
            // The slot is shared with any WebSocket tunnel the connection turns into, so tunnels
            // count against max_connections for as long as they live.
            serve_connection(stream, peer, Arc::new(permit), app, tls, &settings, phase).await;
            drop(alive);
        });
    }
}

async fn serve_connection(
    stream: TcpStream,
    peer: SocketAddr,
    slot: Arc<tokio::sync::OwnedSemaphorePermit>,
    app: Arc<App>,
    tls: Option<TlsAcceptor>,
    settings: &ConnSettings,
    phase: watch::Receiver<Phase>,
) {
    let info = Arc::new(ConnInfo::new(peer, tls.is_some(), Some(slot)));
    // The per-connection service; `$activity` counts requests in flight for HTTP/2's idle timeout.
    macro_rules! service {
        ($activity:expr) => {{
            let activity: Option<Arc<Activity>> = $activity;
            service_fn(move |req: Request<Incoming>| {
                let app = app.clone();
                let info = info.clone();
                let in_flight = activity.clone().map(InFlight::new);
                async move {
                    let response = app.handle(req, &info).await;
                    drop(in_flight);
                    Ok::<_, Infallible>(response)
                }
            })
        }};
    }
    let Some(acceptor) = tls else {
        return serve_http1(TokioIo::new(stream), service!(None), settings, phase).await;
    };
    let stream = match tokio::time::timeout(settings.handshake_timeout, acceptor.accept(stream)).await {
        Ok(Ok(s)) => s,
        Ok(Err(e)) => {
            tracing::debug!(%peer, error = %e, "TLS handshake failed");
            return;
        }
        Err(_) => {
            tracing::debug!(%peer, "TLS handshake timed out");
            return;
        }
    };
    let h2 = stream.get_ref().1.alpn_protocol() == Some(b"h2");
    if h2 {
        let activity = Arc::new(Activity::new());
        let service = service!(Some(activity.clone()));
        serve_http2(TokioIo::new(stream), service, activity, settings, phase).await
    } else {
        serve_http1(TokioIo::new(stream), service!(None), settings, phase).await
    }
}

/// What an HTTP/2 connection is doing, for its idle timeout (HTTP/1.1's comes from hyper's
/// header-read timeout, which also runs while a keep-alive connection waits for its next request).
struct Activity {
    started: std::time::Instant,
    in_flight: AtomicUsize,
    /// Milliseconds from `started` to the last request's start or end.
    last_ms: AtomicU64,
}

impl Activity {
    fn new() -> Self {
        Activity {
            started: std::time::Instant::now(),
            in_flight: AtomicUsize::new(0),
            last_ms: AtomicU64::new(0),
        }
    }
    fn touch(&self) {
        self.last_ms
            .store(self.started.elapsed().as_millis() as u64, Ordering::Relaxed);
    }
    /// How long the connection has had no request in flight (zero while one is).
    fn idle_for(&self) -> Duration {
        if self.in_flight.load(Ordering::Relaxed) > 0 {
            return Duration::ZERO;
        }
        let last = Duration::from_millis(self.last_ms.load(Ordering::Relaxed));
        self.started.elapsed().saturating_sub(last)
    }
}

/// Counts a request in flight for as long as it lives.
struct InFlight(Arc<Activity>);

impl InFlight {
    fn new(a: Arc<Activity>) -> Self {
        a.in_flight.fetch_add(1, Ordering::Relaxed);
        a.touch();
        InFlight(a)
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.touch();
        self.0.in_flight.fetch_sub(1, Ordering::Relaxed);
    }
}

async fn serve_http1<I, S>(io: I, service: S, settings: &ConnSettings, phase: watch::Receiver<Phase>)
where
    I: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
    S: hyper::service::HttpService<Incoming, ResBody = crate::service::ResponseBody> + Send,
    S::Future: Send + 'static,
    S::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let conn = http1::Builder::new()
        .timer(TokioTimer::new())
        .header_read_timeout(settings.header_read_timeout)
        // The read buffer bounds the request head: a head that does not fit is answered 431.
        .max_buf_size(settings.max_header_bytes)
        .keep_alive(true)
        // One flat buffer per response: over TLS, vectored writes become one record per slice.
        .writev(false)
        .serve_connection(io, service)
        .with_upgrades();
    drive(conn, phase, std::future::pending()).await
}

async fn serve_http2<I, S>(
    io: I,
    service: S,
    activity: Arc<Activity>,
    settings: &ConnSettings,
    phase: watch::Receiver<Phase>,
) where
    I: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
    S: hyper::service::HttpService<Incoming, ResBody = crate::service::ResponseBody> + Send,
    S::Future: Send + 'static,
    S::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let conn = http2::Builder::new(TokioExecutor::new())
        .timer(TokioTimer::new())
        // Also detects peers that vanished without closing.
        .keep_alive_interval(Some(Duration::from_secs(30)))
        .keep_alive_timeout(Duration::from_secs(10))
        .max_header_list_size(settings.max_header_bytes.try_into().unwrap_or(u32::MAX))
        .serve_connection(io, service);
    let idle_timeout = settings.header_read_timeout;
    // No request in flight for `idle_timeout`: close (GOAWAY), as HTTP/1.1 connections do.
    let idle = async move {
        loop {
            let idle_for = activity.idle_for();
            if idle_for >= idle_timeout {
                return;
            }
            tokio::time::sleep(idle_timeout - idle_for).await;
        }
    };
    drive(conn, phase, idle).await
}

/// A hyper server connection that can be asked to finish (HTTP/1.1 and HTTP/2 each have the
/// method, but no common trait).
trait Graceful: std::future::Future<Output = Result<(), hyper::Error>> {
    fn begin_graceful_shutdown(self: std::pin::Pin<&mut Self>);
}

impl<I, S> Graceful for http1::UpgradeableConnection<I, S>
where
    I: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
    S: hyper::service::HttpService<Incoming, ResBody = crate::service::ResponseBody>,
    S::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    fn begin_graceful_shutdown(self: std::pin::Pin<&mut Self>) {
        self.graceful_shutdown();
    }
}

impl<I, S> Graceful for http2::Connection<I, S, TokioExecutor>
where
    I: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
    S: hyper::service::HttpService<Incoming, ResBody = crate::service::ResponseBody> + Send,
    S::Future: Send + 'static,
    S::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    fn begin_graceful_shutdown(self: std::pin::Pin<&mut Self>) {
        self.graceful_shutdown();
    }
}

/// Serves a connection until it ends; when draining starts or `idle` resolves, asks it to finish
/// its in-flight requests; when closing starts, drops it.
async fn drive(conn: impl Graceful, mut phase: watch::Receiver<Phase>, idle: impl std::future::Future<Output = ()>) {
    tokio::pin!(conn);
    tokio::select! {
        r = conn.as_mut() => return log_conn_end(r),
        _ = reached(&mut phase, Phase::Draining) => {}
        _ = idle => {}
    }
    conn.as_mut().begin_graceful_shutdown();
    tokio::select! {
        r = conn.as_mut() => log_conn_end(r),
        _ = reached(&mut phase, Phase::Closing) => {}
    }
}

fn log_conn_end(r: Result<(), hyper::Error>) {
    if let Err(e) = r {
        tracing::debug!(error = %e, "connection ended with an error");
    }
}

/// The admin listener: `GET /healthz` (200 while the process runs) and `GET /readyz` (200 once
/// every listener is bound, 503 once shutdown has begun or while the session store is
/// unavailable). Plain HTTP/1.1.
pub async fn admin_loop(
    listener: TcpListener,
    ready: Arc<AtomicBool>,
    state: Arc<State>,
    mut phase: watch::Receiver<Phase>,
) {
    loop {
        let stream = tokio::select! {
            r = listener.accept() => match r {
                Ok((s, _)) => s,
                Err(_) => {
                    // EMFILE and friends: back off briefly instead of spinning.
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            _ = reached(&mut phase, Phase::Closing) => return,
        };
        let ready = ready.clone();
        let state = state.clone();
        let service = service_fn(move |req: Request<Incoming>| {
            let ready = ready.load(Ordering::Acquire);
            let store_available = state.store.available();
            async move { Ok::<_, Infallible>(admin_response(&req, ready, store_available)) }
        });
        let mut phase = phase.clone();
        tokio::spawn(async move {
            let conn = http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(Duration::from_secs(10))
                .serve_connection(TokioIo::new(stream), service);
            tokio::select! {
                _ = conn => {}
                _ = reached(&mut phase, Phase::Closing) => {}
            }
        });
    }
}

fn admin_response(req: &Request<Incoming>, ready: bool, store_available: bool) -> Response<Full<Bytes>> {
    let (status, body) = match (req.method(), req.uri().path()) {
        (&http::Method::GET, "/healthz") => (StatusCode::OK, "ok\n"),
        (&http::Method::GET, "/readyz") if !ready => (StatusCode::SERVICE_UNAVAILABLE, "not ready\n"),
        (&http::Method::GET, "/readyz") if !store_available => {
            (StatusCode::SERVICE_UNAVAILABLE, "degraded: session store unavailable\n")
        }
        (&http::Method::GET, "/readyz") => (StatusCode::OK, "ready\n"),
        _ => (StatusCode::NOT_FOUND, "not found\n"),
    };
    let mut r = Response::new(Full::new(Bytes::from_static(body.as_bytes())));
    *r.status_mut() = status;
    r
}
