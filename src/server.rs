//! Listeners, the accept loop, per-connection timeouts, graceful shutdown, and the admin listener.
//!
//! Each accepted connection takes a slot of `max_connections`; when none is free the accept loop
//! waits, so further connections queue in the kernel's listen backlog (and are refused by the
//! kernel once that is full) instead of being accepted and starved. TLS connections get
//! `handshake_timeout` to finish the handshake, then are served with the protocol ALPN chose.
//!
//! Two more bounds per connection, kept by the gateway's own timer ([`Activity`]) rather than
//! hyper's `header_read_timeout` (which in HTTP/1.1 runs from the moment a connection goes idle, so
//! it would bound the keep-alive wait and the head as one):
//! - `header_read_timeout`: a request head, from its first byte to its last (slowloris), and a new
//!   connection's first request, from the handshake.
//! - `idle_timeout`: a connection with no request in flight and no byte of a new one (HTTP/1.1
//!   keep-alive, HTTP/2 between requests). A request is in flight until its response body has
//!   been sent, so a long download is never idle.
//! - `send_timeout`: a client that takes none of the bytes written to it for this long (its
//!   receive window stays shut) has its connection dropped, whatever is in flight. Without it, a
//!   client that stops reading a large response held that response's upstream connection, its
//!   pool slot and its own connection slot for as long as it stayed connected. Over HTTP/2 the
//!   same bound applies to each stream: a response that has waited `send_timeout` for the client's
//!   flow-control window (the socket still read) has its stream reset ([`StreamWatch`]).
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
use futures_util::future::Either;
use http::{Request, Response, StatusCode};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::server::conn::{http1, http2};
use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Semaphore, mpsc, watch};
use tokio_rustls::TlsAcceptor;

use crate::proxy::body::BodyGuard;
use crate::service::{App, ConnInfo};
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
    pub idle_timeout: Duration,
    /// An idle HTTP/1.1 connection's hyper state is dropped after this long (see [`serve_http1`]).
    pub park_idle_after: Duration,
    /// A connection whose writes have made no progress for this long is dropped.
    pub send_timeout: Duration,
    /// Request head (HTTP/1.1) or header list (HTTP/2) cap: 431 beyond it.
    pub max_header_bytes: usize,
}

impl From<&crate::config::ServerSettings> for ConnSettings {
    fn from(s: &crate::config::ServerSettings) -> Self {
        ConnSettings {
            handshake_timeout: s.handshake_timeout,
            header_read_timeout: s.header_read_timeout,
            idle_timeout: s.idle_timeout,
            park_idle_after: s.park_idle_after,
            send_timeout: s.send_timeout,
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
    // The services take `info` along; the HTTP/1.1 loop keeps a handle of its own (parking).
    let conn_info = info.clone();
    let _open = GaugeGuard::up(&app.state().metrics.connections_open);
    let parked = app.state().metrics.connections_parked.clone();
    // The connection's clock for its head and idle timeouts starts once the handshake is done.
    let activity = Arc::new(Activity::new());
    let stream = Socket {
        tcp: stream,
        activity: activity.clone(),
    };
    // The per-connection service. `$handled` runs the request: over HTTP/2, boxed, since hyper
    // moves each stream's future several times on its way to the executor (`StreamQueue`, which
    // boxes it) and the request's state machine is several KiB, so a pointer moves cheaply; over
    // HTTP/1.1 it is polled in place, unboxed.
    macro_rules! service {
        ($app:ident, $req:ident, $info:ident => $handled:expr, $watch:expr) => {{
            let activity = activity.clone();
            let app = app.clone();
            service_fn(move |mut $req: Request<Incoming>| {
                let $app = app.clone();
                let $info = info.clone();
                // In flight from here until the response body has been sent (or abandoned), and
                // until the request body has been read to its end (or dropped): after an early
                // response hyper still reads the rest of the body, and the connection is not idle.
                let in_flight = InFlight::new(activity.clone());
                if !http_body::Body::is_end_stream($req.body()) {
                    let body = BodyGuard(Arc::new(InFlight::new(activity.clone())));
                    $req.extensions_mut().insert(body);
                }
                async move {
                    let response = $handled;
                    Ok::<_, Infallible>(response.map(|body| ConnBody {
                        body,
                        _in_flight: in_flight,
                        watch: $watch,
                    }))
                }
            })
        }};
    }
    let Some(acceptor) = tls else {
        activity.restart();
        let io = Box::new(Watched::new(stream, activity.clone()));
        let service = service!(app, req, info => app.handle(req, &info).await, None);
        return serve_http1(io, service, &conn_info, activity, settings, phase, parked).await;
    };
    // The TLS stream moves into the boxed hyper connection; in a block of its own, so that the
    // task keeps no room for it while the connection is served.
    let serving = {
        // Boxed: the handshake's state (a TLS connection, 1.2 KiB) is needed only until it ends.
        let handshake = Box::pin(acceptor.accept(stream));
        let stream = match tokio::time::timeout(settings.handshake_timeout, handshake).await {
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
        activity.restart();
        if stream.get_ref().1.alpn_protocol() == Some(b"h2") {
            let service = service!(app, req, info => Box::pin(app.handle(req, &info)).await, StreamWatch::current());
            // Not `Watched`: its reads begin a request head (a PING would), and its park state is
            // HTTP/1.1's; the socket under TLS reports writes for `send_timeout`.
            Either::Left(serve_http2(TokioIo::new(stream), service, activity, settings, phase))
        } else {
            let io = Box::new(Watched::new(stream, activity.clone()));
            let service = service!(app, req, info => app.handle(req, &info).await, None);
            Either::Right(serve_http1(io, service, &conn_info, activity, settings, phase, parked))
        }
    };
    serving.await
}

/// Decrements a gauge when dropped (a connection counted open until its task ends, however).
struct GaugeGuard(prometheus_client::metrics::gauge::Gauge);

impl GaugeGuard {
    /// Counts one up on `gauge` until dropped.
    fn up(gauge: &prometheus_client::metrics::gauge::Gauge) -> Self {
        gauge.inc();
        GaugeGuard(gauge.clone())
    }
}

impl Drop for GaugeGuard {
    fn drop(&mut self) {
        self.0.dec();
    }
}

/// A response body that keeps its request counted as in flight until it has been sent (hyper
/// drops it then, or when the client goes away).
struct ConnBody {
    body: crate::service::ResponseBody,
    _in_flight: InFlight,
    /// HTTP/2: what the stream's watcher sees of this body.
    watch: Option<Arc<StreamWatch>>,
}

impl http_body::Body for ConnBody {
    type Data = Bytes;
    type Error = <crate::service::ResponseBody as http_body::Body>::Error;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<http_body::Frame<Bytes>, Self::Error>>> {
        let this = &mut *self;
        let Some(watch) = &this.watch else {
            return std::pin::Pin::new(&mut this.body).poll_frame(cx);
        };
        watch.polled();
        let polled = std::pin::Pin::new(&mut this.body).poll_frame(cx);
        if let std::task::Poll::Ready(Some(Ok(frame))) = &polled
            && frame.is_data()
        {
            watch.handed.store(true, Ordering::Relaxed);
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.body.size_hint()
    }
}

/// What a connection is doing, for its head and idle timeouts: requests in flight, and whether
/// the first bytes of a new request head have arrived since it last went idle.
struct Activity {
    started: std::time::Instant,
    in_flight: AtomicUsize,
    /// Milliseconds from `started` to when the connection last went idle or, while a head is
    /// being read, to that head's first byte.
    since_ms: AtomicU64,
    /// A request head is being read (or, on a new connection, awaited).
    reading_head: AtomicBool,
    /// Bytes were written to the client and not yet flushed (HTTP/1.1; hyper's write buffer or
    /// TLS records may hold them): the connection cannot be parked.
    write_pending: AtomicBool,
    /// hyper has begun closing the stream (`Connection: close`, a 408): never parked.
    closing: AtomicBool,
    /// 1 + milliseconds from `started` to the write (or flush, or close) that found the client's
    /// receive window shut, until a write makes progress again; 0 while writes make progress.
    write_blocked_ms: AtomicU64,
    /// Set by the timer while requests are in flight, read by an HTTP/2 connection's next poll:
    /// time to look at its streams' bodies ([`StreamWatch`]).
    look_at_streams: AtomicBool,
}

/// A connection's time bounds (see the module's documentation).
#[derive(Debug, Clone, Copy)]
struct Bounds {
    head: Duration,
    idle: Duration,
    /// HTTP/1.1 only.
    park: Option<Duration>,
    send: Duration,
    /// HTTP/2: the connection looks at its streams' bodies whenever the timer wakes.
    streams: bool,
}

impl Bounds {
    fn of(settings: &ConnSettings, park: bool) -> Bounds {
        Bounds {
            head: settings.header_read_timeout,
            idle: settings.idle_timeout,
            park: park.then_some(settings.park_idle_after),
            send: settings.send_timeout,
            streams: !park,
        }
    }
}

/// Which bound applies to a connection now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Waiting {
    /// A request is in flight: the body and upstream timeouts apply, not these.
    Busy,
    /// For a request head to be completed: `header_read_timeout` from `since`.
    Head { since: Duration },
    /// For a new request: `idle_timeout` from `since`.
    Idle { since: Duration },
}

impl Activity {
    fn new() -> Self {
        Activity {
            started: std::time::Instant::now(),
            in_flight: AtomicUsize::new(0),
            since_ms: AtomicU64::new(0),
            reading_head: AtomicBool::new(true),
            write_pending: AtomicBool::new(false),
            closing: AtomicBool::new(false),
            write_blocked_ms: AtomicU64::new(0),
            look_at_streams: AtomicBool::new(false),
        }
    }

    /// A write to the client did (`Ready`) or did not (`Pending`) get through. Costs one relaxed
    /// load while writes get through; the clock is read only when one first blocks.
    fn wrote<T>(&self, polled: &std::task::Poll<T>) {
        let blocked = self.write_blocked_ms.load(Ordering::Relaxed);
        match polled {
            std::task::Poll::Pending if blocked == 0 => {
                self.write_blocked_ms.store(self.now_ms() + 1, Ordering::Relaxed);
            }
            std::task::Poll::Ready(_) if blocked != 0 => self.write_blocked_ms.store(0, Ordering::Relaxed),
            _ => {}
        }
    }

    /// How long writes to the client have been blocked, if they are.
    fn write_blocked_for(&self) -> Option<Duration> {
        match self.write_blocked_ms.load(Ordering::Relaxed) {
            0 => None,
            at => Some(self.started.elapsed().saturating_sub(Duration::from_millis(at - 1))),
        }
    }

    /// With writes to the socket blocked, how long the client has left to take a byte:
    /// `Some(ZERO)` once it has taken none for `send_timeout`.
    fn send_left(&self, send_timeout: Duration) -> Option<Duration> {
        self.write_blocked_for().map(|b| send_timeout.saturating_sub(b))
    }

    /// Resolves once the client has taken no byte for `send_timeout` while writes were blocked.
    async fn send_stalled(&self, send_timeout: Duration) {
        loop {
            match self.send_left(send_timeout) {
                Some(Duration::ZERO) => return,
                left => tokio::time::sleep(left.unwrap_or(send_timeout)).await,
            }
        }
    }

    fn now_ms(&self) -> u64 {
        self.started.elapsed().as_millis() as u64
    }

    /// The first request's head is awaited from now (the handshake has just finished).
    fn restart(&self) {
        self.since_ms.store(self.now_ms(), Ordering::Relaxed);
        self.reading_head.store(true, Ordering::Relaxed);
    }

    /// Bytes arrived from the client: on an idle connection, they begin a new request head.
    fn bytes_read(&self) {
        if self.in_flight.load(Ordering::Relaxed) == 0 && !self.reading_head.load(Ordering::Relaxed) {
            self.since_ms.store(self.now_ms(), Ordering::Relaxed);
            self.reading_head.store(true, Ordering::Relaxed);
        }
    }

    fn waiting(&self) -> Waiting {
        if self.in_flight.load(Ordering::Relaxed) > 0 {
            return Waiting::Busy;
        }
        let since = Duration::from_millis(self.since_ms.load(Ordering::Relaxed));
        if self.reading_head.load(Ordering::Relaxed) {
            Waiting::Head { since }
        } else {
            Waiting::Idle { since }
        }
    }

    /// Resolves when the connection has waited longer than its bound allows; says which bound.
    /// With `park_after`, an idle connection whose writes are flushed resolves as `Park` once it
    /// has been idle that long. Each sleep is at most the shortest bound, so a change of state (a
    /// request ending, a head beginning) is seen in time to keep its own deadline exactly.
    async fn expired(&self, bounds: Bounds) -> Expired {
        let Bounds {
            head: header_read_timeout,
            idle: idle_timeout,
            park,
            send: send_timeout,
            streams: _,
        } = bounds;
        let park_after = park.filter(|p| *p < idle_timeout);
        // Includes park_after and send_timeout: a connection going idle, or its writes blocking,
        // is noticed within it (a busy connection's timer wakes that often; ~1 µs each).
        let look_again = header_read_timeout
            .min(idle_timeout)
            .min(send_timeout)
            .min(park_after.unwrap_or(Duration::MAX));
        loop {
            // Whatever the connection is doing: a client that takes no bytes holds everything
            // that waits to be sent to it (a response's upstream connection, its pool slot).
            let send_left = match self.send_left(send_timeout) {
                Some(Duration::ZERO) => return Expired::Send,
                left => left.unwrap_or(look_again),
            };
            let (since, limit, what) = match self.waiting() {
                Waiting::Busy => {
                    tokio::time::sleep(look_again.min(send_left)).await;
                    if bounds.streams {
                        // Woken here, the task polls the connection again right after.
                        self.look_at_streams.store(true, Ordering::Relaxed);
                        std::future::poll_fn(|cx| {
                            cx.waker().wake_by_ref();
                            std::task::Poll::Ready(())
                        })
                        .await;
                    }
                    continue;
                }
                Waiting::Head { since } => (since, header_read_timeout, Expired::Head),
                Waiting::Idle { since } => match park_after {
                    Some(p) if !self.write_pending.load(Ordering::Relaxed) && !self.closing.load(Ordering::Relaxed) => {
                        (since, p, Expired::Park)
                    }
                    _ => (since, idle_timeout, Expired::Idle),
                },
            };
            let waited = self.started.elapsed().saturating_sub(since);
            if waited >= limit {
                return what;
            }
            tokio::time::sleep((limit - waited).min(look_again).min(send_left)).await;
        }
    }
}

/// Why a connection waited too long.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Expired {
    /// A request head was not finished within `header_read_timeout`: the connection is closed.
    Head,
    /// No new request within `idle_timeout`: the connection is asked to finish (HTTP/2 GOAWAY).
    Idle,
    /// Idle for `park_idle_after`, everything written flushed: the HTTP/1.1 connection's hyper
    /// state can be dropped until the client sends again.
    Park,
    /// The client took no bytes for `send_timeout`: the connection is dropped, with whatever
    /// it has in flight.
    Send,
}

/// Counts a request in flight for as long as it lives.
struct InFlight(Arc<Activity>);

impl InFlight {
    fn new(a: Arc<Activity>) -> Self {
        a.in_flight.fetch_add(1, Ordering::Relaxed);
        a.reading_head.store(false, Ordering::Relaxed);
        InFlight(a)
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        if self.0.in_flight.fetch_sub(1, Ordering::Relaxed) == 1 {
            self.0.since_ms.store(self.0.now_ms(), Ordering::Relaxed);
        }
    }
}

/// The client's side of an HTTP/1.1 connection, reporting each read to the connection's
/// [`Activity`] (one relaxed load per read) so the head timeout starts at a head's first byte.
struct Watched<S> {
    inner: S,
    activity: Arc<Activity>,
    /// Bytes read from `inner` by a hyper connection that was parked before parsing them: read
    /// first by the next one.
    unread: Bytes,
}

impl<S> Watched<S> {
    fn new(inner: S, activity: Arc<Activity>) -> Self {
        Watched {
            inner,
            activity,
            unread: Bytes::new(),
        }
    }
}

impl<S: tokio::io::AsyncRead + Unpin> tokio::io::AsyncRead for Watched<S> {
    fn poll_read(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        if !self.unread.is_empty() {
            let n = self.unread.len().min(buf.remaining());
            buf.put_slice(&self.unread.split_to(n));
            if self.unread.is_empty() {
                // Not a view that keeps the buffer it came from alive.
                self.unread = Bytes::new();
            }
            self.activity.bytes_read();
            return std::task::Poll::Ready(Ok(()));
        }
        let before = buf.filled().len();
        let polled = std::pin::Pin::new(&mut self.inner).poll_read(cx, buf);
        if buf.filled().len() > before {
            self.activity.bytes_read();
        }
        polled
    }
}

impl<S: tokio::io::AsyncWrite + Unpin> tokio::io::AsyncWrite for Watched<S> {
    fn poll_write(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        self.activity.write_pending.store(true, Ordering::Relaxed);
        std::pin::Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_flush(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        let polled = std::pin::Pin::new(&mut self.inner).poll_flush(cx);
        // hyper flushes the stream only once its own buffer is written out.
        if let std::task::Poll::Ready(Ok(())) = polled {
            self.activity.write_pending.store(false, Ordering::Relaxed);
        }
        polled
    }

    fn poll_shutdown(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        self.activity.closing.store(true, Ordering::Relaxed);
        std::pin::Pin::new(&mut self.inner).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> std::task::Poll<std::io::Result<usize>> {
        self.activity.write_pending.store(true, Ordering::Relaxed);
        std::pin::Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
}

/// A client stream an idle HTTP/1.1 connection can be parked on (see [`serve_http1`]).
trait ClientStream: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static {
    /// Something waits to be read without reading the socket (decrypted TLS data, or the end).
    fn readable_now(&self) -> bool;
    /// TLS records wait to be sent.
    fn records_to_send(&self) -> bool;
    fn tcp(&self) -> &TcpStream;
}

impl ClientStream for Socket {
    fn readable_now(&self) -> bool {
        false
    }

    fn records_to_send(&self) -> bool {
        false
    }

    fn tcp(&self) -> &TcpStream {
        &self.tcp
    }
}

/// A client's TCP socket, under TLS or not. Every write tells the connection's [`Activity`]
/// whether the socket took bytes, for `send_timeout` (here, not above TLS: rustls takes plaintext
/// into its buffer while the socket is blocked). And rustls hands its records to the socket as a
/// vectored write, usually of one buffer (one record per response): such a write is made with
/// `send`, not `writev`, whose way through the kernel's file layer cost ~0.5 µs more per response
/// here (perf, side by side with HAProxy, which sends with `send`).
struct Socket {
    tcp: TcpStream,
    activity: Arc<Activity>,
}

impl tokio::io::AsyncRead for Socket {
    fn poll_read(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.tcp).poll_read(cx, buf)
    }
}

impl tokio::io::AsyncWrite for Socket {
    fn poll_write(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        let polled = std::pin::Pin::new(&mut self.tcp).poll_write(cx, buf);
        self.activity.wrote(&polled);
        polled
    }

    fn poll_write_vectored(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> std::task::Poll<std::io::Result<usize>> {
        let mut filled = bufs.iter().filter(|b| !b.is_empty());
        let polled = match (filled.next(), filled.next()) {
            (Some(one), None) => std::pin::Pin::new(&mut self.tcp).poll_write(cx, one),
            _ => std::pin::Pin::new(&mut self.tcp).poll_write_vectored(cx, bufs),
        };
        self.activity.wrote(&polled);
        polled
    }

    fn is_write_vectored(&self) -> bool {
        true
    }

    fn poll_flush(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.tcp).poll_flush(cx)
    }

    fn poll_shutdown(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.tcp).poll_shutdown(cx)
    }
}

impl ClientStream for tokio_rustls::server::TlsStream<Socket> {
    fn readable_now(&self) -> bool {
        // rustls stops asking for records while plaintext waits to be read, or after close_notify.
        !self.get_ref().1.wants_read()
    }

    fn records_to_send(&self) -> bool {
        self.get_ref().1.wants_write()
    }

    fn tcp(&self) -> &TcpStream {
        &self.get_ref().0.tcp
    }
}

/// Serves an HTTP/1.1 connection. Once it has been idle for `park_idle_after` with everything
/// written flushed, it is *parked*: hyper's state for it (an 8 KiB read buffer, an 8 KiB write
/// buffer, the room for a request's future) is dropped and only the stream kept, until the
/// client sends again (a new hyper connection then takes the stream over, with any bytes the old
/// one had read and not parsed), the idle timeout closes it, or shutdown does. The stream is
/// boxed: hyper's state and the task hold a pointer to it, not a copy each.
async fn serve_http1<T, S>(
    mut io: Box<Watched<T>>,
    mut service: S,
    info: &ConnInfo,
    activity: Arc<Activity>,
    settings: &ConnSettings,
    mut phase: watch::Receiver<Phase>,
    parked: prometheus_client::metrics::gauge::Gauge,
) where
    T: ClientStream,
    S: hyper::service::HttpService<Incoming, ResBody = ConnBody> + Send + Unpin,
    S::Future: Send + 'static,
    S::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let bounds = Bounds::of(settings, true);
    loop {
        let conn = Box::pin(
            http1::Builder::new()
                .timer(TokioTimer::new())
                // Not hyper's: it would run from the moment the connection goes idle (see Activity).
                .header_read_timeout(None)
                // The read buffer bounds the request head: a head that does not fit is answered 431.
                .max_buf_size(settings.max_header_bytes)
                .keep_alive(true)
                // One flat buffer per response: over TLS, vectored writes become one record per slice.
                .writev(false)
                .serve_connection(TokioIo::new(io), service)
                .with_upgrades(),
        );
        let Some((conn, returned)) = drive(conn, phase, activity.clone(), bounds).await else {
            return;
        };
        phase = returned;
        // Idle, nothing unflushed, no request in flight: hyper's state holds nothing but buffers
        // and the bytes it read and did not parse, which go back in front of the stream.
        let Some(parts) = std::pin::Pin::into_inner(conn).into_parts() else {
            return;
        };
        io = parts.io.into_inner();
        service = parts.service;
        // A copy: the `Bytes` hyper froze would otherwise keep its whole read buffer (8 KiB).
        io.unread = if parts.read_buf.is_empty() {
            Bytes::new()
        } else {
            Bytes::copy_from_slice(&parts.read_buf)
        };
        // Now, not at the end of this loop's body: `parts` lives on through the wait below, and
        // its read buffer is hyper's whole 8 KiB allocation.
        drop(parts.read_buf);
        // The new hyper connection is polled first (see `drive`), so it reads what is waiting
        // before the next look at the clock could park it again.
        if !io.unread.is_empty() || io.inner.readable_now() {
            continue;
        }
        use tokio::io::AsyncWriteExt;
        // TLS records of rustls's own (none are expected once the handshake is done): sent
        // before parking, or, from a client that does not read them, the connection closed.
        let flushed = !io.inner.records_to_send()
            || matches!(
                tokio::time::timeout(CLOSE_BOUND, io.flush()).await,
                Ok(Ok(())) if !io.inner.records_to_send()
            );
        let woken = flushed && {
            let _parked = GaugeGuard::up(&parked);
            // Nor a copy of the bearer token its last request presented.
            info.last_token.forget();
            tokio::select! {
                r = io.inner.tcp().readable() => r.is_ok(),
                _ = activity.expired(Bounds { park: None, ..bounds }) => false,
                _ = reached(&mut phase, Phase::Draining) => false,
            }
        };
        if !woken {
            // close_notify and FIN, bounded: the client may not be reading.
            let _ = tokio::time::timeout(CLOSE_BOUND, io.shutdown()).await;
            return;
        }
    }
}

/// How long a parked connection's close (or a flush before parking) may take.
const CLOSE_BOUND: Duration = Duration::from_secs(1);

fn serve_http2<I, S>(
    io: I,
    service: S,
    activity: Arc<Activity>,
    settings: &ConnSettings,
    phase: watch::Receiver<Phase>,
) -> impl std::future::Future<Output = ()> + use<I, S>
where
    I: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
    S: hyper::service::HttpService<Incoming, ResBody = ConnBody> + Send,
    S::Future: Send + 'static,
    S::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let queue = StreamQueue::default();
    let conn = Box::pin(H2Conn::new(
        http2::Builder::new(queue.clone())
            .timer(TokioTimer::new())
            // Also detects peers that vanished without closing.
            .keep_alive_interval(Some(Duration::from_secs(30)))
            .keep_alive_timeout(Duration::from_secs(10))
            .max_header_list_size(settings.max_header_bytes.try_into().unwrap_or(u32::MAX))
            .serve_connection(io, service),
        queue,
        activity.clone(),
        settings.send_timeout,
    ));
    // No request in flight for `idle_timeout` (or no first request within
    // `header_read_timeout`): close with GOAWAY.
    let bounds = Bounds::of(settings, false);
    async move {
        drive(conn, phase, activity, bounds).await;
    }
}

/// A stream's future, as hyper hands it to its executor.
type StreamFuture = std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send>>;

/// What an HTTP/2 stream's response body tells its connection, for `send_timeout`: how often it
/// has been polled, and whether its last poll handed hyper a frame of data. hyper polls a body
/// again only once the stream has flow-control window (and buffer room) for more, so a body that
/// handed a frame and is not polled again waits for the client; one polled and pending waits for
/// its upstream, which the route's timeout bounds.
#[derive(Default)]
struct StreamWatch {
    polls: std::sync::atomic::AtomicU32,
    handed: AtomicBool,
}

thread_local! {
    /// The watch of the HTTP/2 stream being polled, until its response body takes a handle.
    static STREAM_WATCH: std::cell::Cell<Option<Arc<StreamWatch>>> = const { std::cell::Cell::new(None) };
}

impl StreamWatch {
    /// The watch of the stream being polled on this thread, if any (HTTP/1.1: none).
    fn current() -> Option<Arc<StreamWatch>> {
        STREAM_WATCH.with(|w| {
            let current = w.take();
            let mine = current.clone();
            w.set(current);
            mine
        })
    }

    /// Only the stream's own task writes: a load and a store, no atomic read-modify-write.
    fn polled(&self) {
        self.polls
            .store(self.polls.load(Ordering::Relaxed).wrapping_add(1), Ordering::Relaxed);
        self.handed.store(false, Ordering::Relaxed);
    }
}

/// A stream's future in its connection's [`H2Conn`], with the watch its response body reports to.
/// A stream whose body has waited for the client for `send_timeout` is dropped by the connection
/// (h2 then resets it with CANCEL), and with it the response and its upstream connection.
struct WatchedStream {
    /// `None` once dropped for waiting too long; the shell then ends at its next poll.
    fut: Option<StreamFuture>,
    watch: Option<Arc<StreamWatch>>,
    /// The body's poll count at the last look, and when (ms of the connection's clock) it was
    /// first seen waiting with that count.
    seen: u32,
    since_ms: u64,
    /// The stream's waker while its body waits for the client: to end the shell once dropped.
    waker: Option<std::task::Waker>,
}

impl WatchedStream {
    fn new(fut: StreamFuture, watched: bool) -> Self {
        WatchedStream {
            fut: Some(fut),
            watch: watched.then(Arc::default),
            seen: u32::MAX,
            since_ms: 0,
            waker: None,
        }
    }

    /// Drops the stream if its body has handed a frame and not been polled since, for
    /// `limit_ms` by the looks taken (every few seconds while streams are in flight).
    fn look(&mut self, now_ms: u64, limit_ms: u64) {
        let Some(watch) = &self.watch else { return };
        let polls = watch.polls.load(Ordering::Relaxed);
        if !watch.handed.load(Ordering::Relaxed) || polls != self.seen {
            (self.seen, self.since_ms) = (polls, now_ms);
            return;
        }
        // Only with the waker of its last poll in hand: the shell must be polled to end, or its
        // connection would count it in flight for ever.
        if now_ms.saturating_sub(self.since_ms) >= limit_ms
            && self.fut.is_some()
            && let Some(waker) = self.waker.take()
        {
            tracing::debug!(why = ?Expired::Send, "resetting an HTTP/2 stream");
            self.fut = None;
            waker.wake();
        }
    }
}

impl std::future::Future for WatchedStream {
    type Output = ();
    fn poll(mut self: std::pin::Pin<&mut Self>, cx: &mut std::task::Context<'_>) -> std::task::Poll<()> {
        let this = &mut *self;
        let Some(fut) = &mut this.fut else {
            return std::task::Poll::Ready(());
        };
        // Lent to the thread while the body may yet be made (it takes a handle of its own).
        let lend = this.watch.as_ref().is_some_and(|w| Arc::strong_count(w) == 1);
        if lend {
            STREAM_WATCH.with(|w| w.set(this.watch.take()));
        }
        let polled = fut.as_mut().poll(cx);
        if lend {
            this.watch = STREAM_WATCH.with(std::cell::Cell::take);
        }
        if polled.is_pending()
            && let Some(watch) = &this.watch
            && watch.handed.load(Ordering::Relaxed)
            && !this.waker.as_ref().is_some_and(|w| w.will_wake(cx.waker()))
        {
            this.waker = Some(cx.waker().clone());
        }
        polled
    }
}

/// hyper's executor for an HTTP/2 connection's streams: instead of a task each, the streams
/// wait here to be polled by their connection's own task ([`H2Conn`]), which is where their
/// requests arrive and their responses leave. A task per stream cost an aligned allocation,
/// a spawn, and two cross-task wake-ups per request.
#[derive(Clone, Default)]
struct StreamQueue(Arc<std::sync::Mutex<Vec<StreamFuture>>>);

impl<F: std::future::Future<Output = ()> + Send + 'static> hyper::rt::Executor<F> for StreamQueue {
    fn execute(&self, fut: F) {
        use futures_util::FutureExt;
        // A panic ends its stream only, as it would end its own task.
        let fut = std::panic::AssertUnwindSafe(fut).catch_unwind().map(|r| {
            if r.is_err() {
                tracing::error!("an HTTP/2 stream's handler panicked; the stream was reset");
            }
        });
        self.0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .push(Box::pin(fut));
    }
}

/// An HTTP/2 connection and its streams, polled together in one task. It ends when the
/// connection has ended and its last stream has finished; dropping it drops the streams (as
/// dropping an HTTP/1.1 connection drops its request). A connection's streams thus share one
/// task: one connection uses at most one core at a time.
struct H2Conn<C> {
    /// `None` once it has ended: dropped then, since h2 fails the streams still open only when
    /// its connection is dropped (a keep-alive timeout ends the connection without resetting
    /// them, and a stream still sending would wait for its peer's window forever).
    conn: Option<std::pin::Pin<Box<C>>>,
    queue: StreamQueue,
    /// The streams, and one future that never completes (see [`H2Conn::new`]).
    streams: futures_util::stream::FuturesUnordered<WatchedStream>,
    ended: Option<Result<(), hyper::Error>>,
    /// Its clock, and when to look at the streams' bodies (see [`StreamWatch`]).
    activity: Arc<Activity>,
    send_timeout: Duration,
}

impl<C> H2Conn<C> {
    fn new(conn: C, queue: StreamQueue, activity: Arc<Activity>, send_timeout: Duration) -> Self {
        let streams = futures_util::stream::FuturesUnordered::new();
        // FuturesUnordered wakes its task again whenever one call has polled every future it
        // holds (so that futures that keep waking cannot starve other tasks). With one stream
        // in flight that was every wake-up: the connection was polled twice for each. A future
        // that never wakes is never polled after its first poll, so this cannot happen.
        streams.push(WatchedStream::new(Box::pin(std::future::pending()), false));
        H2Conn {
            conn: Some(Box::pin(conn)),
            queue,
            streams,
            ended: None,
            activity,
            send_timeout,
        }
    }

    /// Streams in flight.
    fn streams(&self) -> usize {
        self.streams.len() - 1
    }

    /// Polls the streams until none is ready; they register the task's waker.
    fn poll_streams(&mut self, cx: &mut std::task::Context<'_>) {
        use futures_util::StreamExt;
        while let std::task::Poll::Ready(Some(())) = self.streams.poll_next_unpin(cx) {}
    }

    /// Takes in the futures hyper handed to the executor; whether there were any.
    fn adopt(&mut self) -> bool {
        let mut queued = self.queue.0.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        let any = !queued.is_empty();
        for fut in queued.drain(..) {
            self.streams.push(WatchedStream::new(fut, true));
        }
        any
    }

    /// Drops the streams whose bodies have waited for the client for `send_timeout`.
    fn look_at_streams(&mut self) {
        let (now_ms, limit_ms) = (self.activity.now_ms(), self.send_timeout.as_millis() as u64);
        for stream in self.streams.iter_mut() {
            stream.look(now_ms, limit_ms);
        }
    }
}

impl<C: std::future::Future<Output = Result<(), hyper::Error>>> std::future::Future for H2Conn<C> {
    type Output = Result<(), hyper::Error>;
    fn poll(mut self: std::pin::Pin<&mut Self>, cx: &mut std::task::Context<'_>) -> std::task::Poll<Self::Output> {
        let this = &mut *self;
        // The connection's timer asks for a look every few seconds while streams are in flight.
        if this.activity.look_at_streams.load(Ordering::Relaxed) {
            this.activity.look_at_streams.store(false, Ordering::Relaxed);
            this.look_at_streams();
        }
        // Streams first: the responses they finish are then written by the connection's poll.
        this.poll_streams(cx);
        if let Some(conn) = &mut this.conn
            && let std::task::Poll::Ready(r) = conn.as_mut().poll(cx)
        {
            this.ended = Some(r);
            this.conn = None;
        }
        // Streams the connection accepted start now (and whatever a stream's poll hands to the
        // executor: hyper does for an upgrade).
        while this.adopt() {
            this.poll_streams(cx);
        }
        if this.streams() == 0
            && let Some(r) = this.ended.take()
        {
            return std::task::Poll::Ready(r);
        }
        std::task::Poll::Pending
    }
}

/// A hyper server connection that can be asked to finish (HTTP/1.1 and HTTP/2 each have the
/// method, but no common trait).
trait Graceful: std::future::Future<Output = Result<(), hyper::Error>> {
    fn begin_graceful_shutdown(self: std::pin::Pin<&mut Self>);
}

impl<I, S> Graceful for http1::UpgradeableConnection<I, S>
where
    I: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
    S: hyper::service::HttpService<Incoming, ResBody = ConnBody>,
    S::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    fn begin_graceful_shutdown(self: std::pin::Pin<&mut Self>) {
        self.graceful_shutdown();
    }
}

impl<I, S> Graceful for H2Conn<http2::Connection<I, S, StreamQueue>>
where
    I: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
    S: hyper::service::HttpService<Incoming, ResBody = ConnBody> + Send,
    S::Future: Send + 'static,
    S::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    fn begin_graceful_shutdown(mut self: std::pin::Pin<&mut Self>) {
        if let Some(conn) = &mut self.conn {
            conn.as_mut().graceful_shutdown();
        }
    }
}

/// Serves a connection until it ends; when draining starts or it has been idle too long, asks it
/// to finish its in-flight requests; when closing starts, a request head is too slow or the
/// client takes no bytes for `send_timeout` (also while it finishes), drops it. When it has been
/// idle long enough to park, hands the connection back (with `phase`) instead.
async fn drive<C: Graceful>(
    mut conn: std::pin::Pin<Box<C>>,
    mut phase: watch::Receiver<Phase>,
    activity: Arc<Activity>,
    bounds: Bounds,
) -> Option<Parked<C>> {
    let watch = activity.clone();
    let expired = async move { watch.expired(bounds).await };
    tokio::select! {
        // The connection first: bytes it has not read yet must not be taken for idleness.
        biased;
        r = conn.as_mut() => {
            log_conn_end(r);
            return None;
        }
        _ = Gated::new(reached(&mut phase, Phase::Draining)) => {}
        why = Gated::new(expired) => {
            if why == Expired::Park {
                return Some((conn, phase));
            }
            tracing::debug!(?why, "closing the connection");
            // A head half read: nothing is in flight, and hyper would wait for the rest. A
            // client that takes no bytes would not take the end of its responses either.
            if matches!(why, Expired::Head | Expired::Send) {
                return None;
            }
        }
    }
    conn.as_mut().begin_graceful_shutdown();
    tokio::select! {
        r = conn.as_mut() => log_conn_end(r),
        _ = reached(&mut phase, Phase::Closing) => {}
        _ = Gated::new(activity.send_stalled(bounds.send)) => {
            tracing::debug!(why = ?Expired::Send, "closing the connection");
        }
    }
    None
}

/// A future polled only when its own waker has fired (and at the first poll). `drive` polls the
/// shutdown phase and the idle timer next to the connection, and the task is woken for the
/// connection's I/O many times a request: without the gate each wake-up also polled the phase
/// (a lock on the watch channel's waiter list) and the timer.
struct Gated<F> {
    fut: std::pin::Pin<Box<F>>,
    gate: Arc<Gate>,
    waker: std::task::Waker,
}

struct Gate {
    fired: AtomicBool,
    task: futures_util::task::AtomicWaker,
}

impl std::task::Wake for Gate {
    fn wake(self: Arc<Self>) {
        self.wake_by_ref();
    }
    fn wake_by_ref(self: &Arc<Self>) {
        self.fired.store(true, Ordering::Release);
        self.task.wake();
    }
}

impl<F: std::future::Future> Gated<F> {
    fn new(fut: F) -> Self {
        let gate = Arc::new(Gate {
            fired: AtomicBool::new(true),
            task: futures_util::task::AtomicWaker::new(),
        });
        Gated {
            fut: Box::pin(fut),
            waker: std::task::Waker::from(gate.clone()),
            gate,
        }
    }
}

impl<F: std::future::Future> std::future::Future for Gated<F> {
    type Output = F::Output;
    fn poll(mut self: std::pin::Pin<&mut Self>, cx: &mut std::task::Context<'_>) -> std::task::Poll<F::Output> {
        // Registered before the flag is read: a wake between the two is not lost.
        self.gate.task.register(cx.waker());
        if !self.gate.fired.swap(false, Ordering::AcqRel) {
            return std::task::Poll::Pending;
        }
        let this = &mut *self;
        this.fut.as_mut().poll(&mut std::task::Context::from_waker(&this.waker))
    }
}

/// A connection [`drive`] handed back to be parked, with the shutdown phase it was watching.
type Parked<C> = (std::pin::Pin<Box<C>>, watch::Receiver<Phase>);

fn log_conn_end(r: Result<(), hyper::Error>) {
    if let Err(e) = r {
        tracing::debug!(error = %e, "connection ended with an error");
    }
}

/// The admin listener: `GET /healthz` (200 while the process runs) and `GET /readyz` (200 once
/// every listener is bound, 503 once shutdown has begun or while the session store is
/// unavailable) and `GET /metrics`. Plain HTTP/1.1.
pub async fn admin_loop(
    listener: TcpListener,
    app: Arc<App>,
    ready: Arc<AtomicBool>,
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
        let app = app.clone();
        let service = service_fn(move |req: Request<Incoming>| {
            let ready = ready.load(Ordering::Acquire);
            let app = app.clone();
            async move { Ok::<_, Infallible>(admin_response(&req, ready, &app).await) }
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

async fn admin_response(req: &Request<Incoming>, ready: bool, app: &App) -> Response<Full<Bytes>> {
    let state = app.state();
    if (req.method(), req.uri().path()) == (&http::Method::GET, "/metrics") {
        // Redis: one round trip, bounded by the store (1 s); unreachable, the last value stays.
        let sessions = state.store.session_count().await.ok();
        let text = state.metrics.render(sessions);
        let mut r = Response::new(Full::new(Bytes::from(text)));
        r.headers_mut().insert(
            http::header::CONTENT_TYPE,
            http::HeaderValue::from_static("text/plain; version=0.0.4; charset=utf-8"),
        );
        return r;
    }
    let store_available = state.store.available();
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

#[cfg(test)]
mod tests {
    use super::*;

    /// A stand-in for hyper's HTTP/2 connection: hands `streams` to the executor at its first
    /// poll, then ends at once (`ends`) or never; holds `held` until it is dropped.
    struct FakeH2 {
        queue: StreamQueue,
        streams: Vec<StreamFuture>,
        ends: bool,
        polls: Arc<AtomicUsize>,
        _held: Option<tokio::sync::oneshot::Sender<()>>,
    }

    impl std::future::Future for FakeH2 {
        type Output = Result<(), hyper::Error>;
        fn poll(mut self: std::pin::Pin<&mut Self>, _: &mut std::task::Context<'_>) -> std::task::Poll<Self::Output> {
            self.polls.fetch_add(1, Ordering::SeqCst);
            for s in std::mem::take(&mut self.streams) {
                hyper::rt::Executor::execute(&self.queue, s);
            }
            if self.ends {
                std::task::Poll::Ready(Ok(()))
            } else {
                std::task::Poll::Pending
            }
        }
    }

    fn fake_h2(
        streams: Vec<StreamFuture>,
        ends: bool,
        held: Option<tokio::sync::oneshot::Sender<()>>,
    ) -> H2Conn<FakeH2> {
        let queue = StreamQueue::default();
        let conn = FakeH2 {
            queue: queue.clone(),
            streams,
            ends,
            polls: Arc::default(),
            _held: held,
        };
        H2Conn::new(conn, queue, Arc::new(Activity::new()), Duration::from_secs(60))
    }

    /// A waker that counts its wake-ups.
    #[derive(Default)]
    struct CountingWaker(AtomicUsize);

    impl std::task::Wake for CountingWaker {
        fn wake(self: Arc<Self>) {
            self.0.fetch_add(1, Ordering::SeqCst);
        }
    }

    #[tokio::test]
    async fn an_http2_connection_that_ended_is_dropped_so_that_its_streams_can_end() {
        // Like h2, which fails the streams still open when its connection is dropped (not when
        // it ends): the stream waits for the connection to be dropped.
        let (held, dropped) = tokio::sync::oneshot::channel::<()>();
        let stream: StreamFuture = Box::pin(async move {
            let _ = dropped.await;
        });
        let conn = fake_h2(vec![stream], true, Some(held));
        let ended = tokio::time::timeout(Duration::from_secs(20), conn).await;
        assert!(
            matches!(ended, Ok(Ok(()))),
            "the connection ended, and its stream was left waiting"
        );
    }

    #[test]
    fn a_future_a_stream_hands_to_the_executor_is_started_in_the_same_poll() {
        let queue_of_conn: Arc<std::sync::Mutex<Option<StreamQueue>>> = Arc::default();
        let started = Arc::new(AtomicBool::new(false));
        let (q, flag) = (queue_of_conn.clone(), started.clone());
        // A stream that, when polled, hands one more future to the executor (as hyper does for
        // an upgrade) and waits.
        let stream: StreamFuture = Box::pin(async move {
            let queue = q.lock().unwrap().clone().unwrap();
            hyper::rt::Executor::execute(&queue, async move {
                flag.store(true, Ordering::SeqCst);
            });
            std::future::pending::<()>().await
        });
        let mut conn = Box::pin(fake_h2(vec![stream], false, None));
        *queue_of_conn.lock().unwrap() = Some(conn.queue.clone());
        let waker = std::task::Waker::from(Arc::new(CountingWaker::default()));
        let mut cx = std::task::Context::from_waker(&waker);
        assert!(conn.as_mut().poll(&mut cx).is_pending());
        assert!(
            started.load(Ordering::SeqCst),
            "the future a stream handed over waits for another wake-up"
        );
    }

    #[test]
    fn a_stream_woken_alone_costs_its_connection_one_poll() {
        // One stream in flight, waiting to be woken.
        let stream_waker: Arc<std::sync::Mutex<Option<std::task::Waker>>> = Arc::default();
        let w = stream_waker.clone();
        let stream: StreamFuture = Box::pin(std::future::poll_fn(move |cx| {
            *w.lock().unwrap() = Some(cx.waker().clone());
            std::task::Poll::<()>::Pending
        }));
        let mut conn = Box::pin(fake_h2(vec![stream], false, None));
        let wakes = Arc::new(CountingWaker::default());
        let waker = std::task::Waker::from(wakes.clone());
        let mut cx = std::task::Context::from_waker(&waker);
        assert!(conn.as_mut().poll(&mut cx).is_pending());
        let before = wakes.0.load(Ordering::SeqCst);
        // Its wake-up wakes the connection's task once; that poll must not ask for another.
        stream_waker.lock().unwrap().take().unwrap().wake();
        assert_eq!(wakes.0.load(Ordering::SeqCst), before + 1);
        assert!(conn.as_mut().poll(&mut cx).is_pending());
        assert_eq!(
            wakes.0.load(Ordering::SeqCst),
            before + 1,
            "polling the woken stream woke the connection's task again"
        );
        assert_eq!(conn.conn.as_ref().unwrap().polls.load(Ordering::SeqCst), 2);
    }

    /// The size of the future `f` returns, without running it.
    fn future_size<R>(_: impl FnOnce() -> R) -> usize {
        std::mem::size_of::<R>()
    }

    #[test]
    fn a_gated_future_is_polled_only_when_its_own_waker_fired() {
        use std::sync::atomic::AtomicUsize;
        use std::task::{Context, Poll, Waker};
        // Pending until told; counts its polls and keeps the waker it was given.
        struct Probe {
            polls: Arc<AtomicUsize>,
            done: Arc<AtomicBool>,
            waker: Arc<std::sync::Mutex<Option<Waker>>>,
        }
        impl std::future::Future for Probe {
            type Output = ();
            fn poll(self: std::pin::Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
                self.polls.fetch_add(1, Ordering::SeqCst);
                *self.waker.lock().unwrap() = Some(cx.waker().clone());
                if self.done.load(Ordering::SeqCst) {
                    Poll::Ready(())
                } else {
                    Poll::Pending
                }
            }
        }
        let (polls, done, waker) = (
            Arc::new(AtomicUsize::new(0)),
            Arc::new(AtomicBool::new(false)),
            Arc::default(),
        );
        let mut gated = Box::pin(Gated::new(Probe {
            polls: polls.clone(),
            done: done.clone(),
            waker: Arc::clone(&waker),
        }));
        let mut cx = Context::from_waker(Waker::noop());
        assert!(gated.as_mut().poll(&mut cx).is_pending());
        assert_eq!(polls.load(Ordering::SeqCst), 1, "the first poll goes through");
        // The task woken for something else: the inner future is not looked at.
        for _ in 0..5 {
            assert!(gated.as_mut().poll(&mut cx).is_pending());
        }
        assert_eq!(polls.load(Ordering::SeqCst), 1);
        // Its own waker fires: polled again, and finishes.
        done.store(true, Ordering::SeqCst);
        waker.lock().unwrap().take().unwrap().wake();
        assert!(gated.as_mut().poll(&mut cx).is_ready());
        assert_eq!(polls.load(Ordering::SeqCst), 2);
    }

    #[tokio::test]
    async fn bytes_a_parked_connection_had_read_are_read_before_the_stream() {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let (mut client, server) = tokio::io::duplex(64);
        let mut watched = Watched::new(server, Arc::new(Activity::new()));
        watched.unread = Bytes::from_static(b"GET / HT");
        client.write_all(b"TP/1.1\r\n").await.unwrap();
        let mut got = [0u8; 16];
        watched.read_exact(&mut got).await.unwrap();
        assert_eq!(&got, b"GET / HTTP/1.1\r\n");
    }

    #[tokio::test]
    async fn a_vectored_write_reaches_the_socket_whole_with_one_buffer_or_several() {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let client = TcpStream::connect(listener.local_addr().unwrap()).await.unwrap();
        let (mut server, _) = listener.accept().await.unwrap();
        let mut client = Socket {
            tcp: client,
            activity: Arc::new(Activity::new()),
        };
        assert!(tokio::io::AsyncWrite::is_write_vectored(&client));
        let io = std::io::IoSlice::new;
        let mut sent = Vec::new();
        for bufs in [
            &[io(b""), io(b"one"), io(b"")][..],
            &[io(b"two"), io(b" and "), io(b"three")][..],
            &[io(b"four")][..],
        ] {
            let all: Vec<u8> = bufs.iter().flat_map(|b| b.to_vec()).collect();
            sent.extend_from_slice(&all);
            // A vectored write may take part of what it is given, like any write.
            let n = client.write_vectored(bufs).await.unwrap();
            assert!(n > 0);
            client.write_all(&all[n..]).await.unwrap();
        }
        let _ = client.write_vectored(&[io(b"")]).await.unwrap();
        client.shutdown().await.unwrap();
        let mut got = Vec::new();
        server.read_to_end(&mut got).await.unwrap();
        assert_eq!(got, sent);
    }

    /// Writes into a pipe nobody reads until one finds it full.
    /// A client socket, reporting to `activity`, and the client's end.
    async fn socket_pair(activity: &Arc<Activity>) -> (TcpStream, Socket) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let client = TcpStream::connect(listener.local_addr().unwrap()).await.unwrap();
        let (server, _) = listener.accept().await.unwrap();
        let socket = Socket {
            tcp: server,
            activity: activity.clone(),
        };
        (client, socket)
    }

    /// Writes to a socket its client does not read until one finds it full.
    fn fill(socket: &mut Socket) {
        use futures_util::FutureExt;
        use tokio::io::AsyncWriteExt;
        while let Some(written) = socket.write(&[0u8; 16 * 1024]).now_or_never() {
            assert!(written.unwrap() > 0);
        }
    }

    /// Reads what the client has been sent so far.
    fn drain(client: &mut TcpStream) {
        let mut buf = vec![0u8; 64 * 1024];
        while let Ok(n @ 1..) = client.try_read(&mut buf) {
            let _ = n;
        }
    }

    #[tokio::test]
    async fn a_client_that_takes_no_bytes_for_send_timeout_expires_its_connection_busy_or_idle() {
        use tokio::io::AsyncWriteExt;
        let bounds = Bounds {
            head: Duration::from_secs(3600),
            idle: Duration::from_secs(3600),
            park: Some(Duration::from_secs(1800)),
            send: Duration::from_millis(50),
            streams: false,
        };
        const BOUND: Duration = Duration::from_secs(20);
        let activity = Arc::new(Activity::new());
        let (mut client, mut socket) = socket_pair(&activity).await;
        // Writes that get through block nothing.
        socket.write_all(b"HTTP/1.1 200 OK\r\n").await.unwrap();
        assert_eq!(activity.write_blocked_for(), None);
        // A request in flight whose response the client does not take.
        let in_flight = InFlight::new(activity.clone());
        fill(&mut socket);
        assert!(activity.write_blocked_for().is_some());
        assert_eq!(
            tokio::time::timeout(BOUND, activity.expired(bounds)).await.unwrap(),
            Expired::Send
        );
        // The client reads: the next write gets through, and the connection is not blocked.
        drain(&mut client);
        tokio::time::timeout(BOUND, socket.write_all(b"x"))
            .await
            .unwrap()
            .unwrap();
        assert_eq!(activity.write_blocked_for(), None);
        // Nothing in flight, the end of a response not taken: the same bound (the park and idle
        // bounds are an hour off), and during a graceful finish too.
        drop(in_flight);
        fill(&mut socket);
        assert!(matches!(activity.waiting(), Waiting::Idle { .. }));
        assert_eq!(
            tokio::time::timeout(BOUND, activity.expired(bounds)).await.unwrap(),
            Expired::Send
        );
        tokio::time::timeout(BOUND, activity.send_stalled(bounds.send))
            .await
            .unwrap();
    }

    /// Every open connection's task is this future: hyper's state and the TLS stream (1.2 KiB) are
    /// boxed once, not kept in the task as well (it was 8.9 KiB when `serve_http1` and `drive`
    /// were `async fn`s taking them by value, and 9 KiB per idle connection in RSS).
    #[test]
    #[allow(unreachable_code, clippy::diverging_sub_expression)]
    fn a_connection_task_holds_no_copy_of_its_tls_stream_or_hyper_state() {
        let task = future_size(|| {
            serve_connection(
                unimplemented!(),
                unimplemented!(),
                unimplemented!(),
                unimplemented!(),
                unimplemented!(),
                unimplemented!(),
                unimplemented!(),
            )
        });
        // 1.1 KiB today: its own locals, the service and the timers; a second TLS stream would
        // pass 2 KiB.
        assert!(task <= 2048, "serve_connection's future is {task} bytes");
    }
}
