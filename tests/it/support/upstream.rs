//! In-process upstreams: one that records what it receives and answers 200, and one driven by a
//! handler the test supplies (for streaming and slow answers).

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use http::{HeaderMap, Method, Request, Response, Uri, Version};
use http_body_util::combinators::UnsyncBoxBody;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;

pub type BoxError = Box<dyn std::error::Error + Send + Sync>;
pub type UpBody = UnsyncBoxBody<Bytes, BoxError>;
pub type Handler =
    Arc<dyn Fn(Request<Incoming>) -> Pin<Box<dyn Future<Output = Response<UpBody>> + Send>> + Send + Sync>;

#[derive(Debug, Clone)]
pub struct Recorded {
    pub method: Method,
    pub uri: Uri,
    pub version: Version,
    pub headers: HeaderMap,
    pub body: Bytes,
}

pub struct Upstream {
    pub addr: SocketAddr,
    pub requests: Arc<Mutex<Vec<Recorded>>>,
}

pub fn full(body: impl Into<Bytes>) -> UpBody {
    Full::new(body.into())
        .map_err(|e: Infallible| match e {})
        .boxed_unsync()
}

impl Upstream {
    /// Records each request (body read whole) and answers 200 `upstream ok`.
    pub async fn recording() -> Upstream {
        let requests: Arc<Mutex<Vec<Recorded>>> = Arc::default();
        let log = requests.clone();
        let handler: Handler = Arc::new(move |req: Request<Incoming>| {
            let log = log.clone();
            Box::pin(async move {
                let (parts, body) = req.into_parts();
                let body = body.collect().await.map(|c| c.to_bytes()).unwrap_or_default();
                log.lock().unwrap().push(Recorded {
                    method: parts.method,
                    uri: parts.uri,
                    version: parts.version,
                    headers: parts.headers,
                    body,
                });
                Response::new(full("upstream ok"))
            })
        });
        let addr = serve(handler).await;
        Upstream { addr, requests }
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    pub fn count(&self) -> usize {
        self.requests.lock().unwrap().len()
    }

    pub fn last(&self) -> Recorded {
        self.requests
            .lock()
            .unwrap()
            .last()
            .cloned()
            .expect("the upstream received no request")
    }
}

/// Serves `handler` on a fresh port; returns the address.
pub async fn serve(handler: Handler) -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                return;
            };
            let handler = handler.clone();
            tokio::spawn(async move {
                let svc = service_fn(move |req| {
                    let handler = handler.clone();
                    async move { Ok::<_, Infallible>(handler(req).await) }
                });
                let _ = http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), svc)
                    .with_upgrades()
                    .await;
            });
        }
    });
    addr
}

/// An address where nothing listens (bound, then released).
pub async fn closed_port() -> SocketAddr {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    drop(l);
    addr
}

/// Connections an upstream has seen.
#[derive(Debug, Default)]
pub struct ConnCounts {
    pub accepted: std::sync::atomic::AtomicUsize,
    pub open: std::sync::atomic::AtomicUsize,
    /// The most connections open at once.
    pub max_open: std::sync::atomic::AtomicUsize,
}

/// [`serve`], counting connections.
pub async fn serve_counted(handler: Handler) -> (SocketAddr, Arc<ConnCounts>) {
    use std::sync::atomic::Ordering::SeqCst;
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let counts = Arc::new(ConnCounts::default());
    let c = counts.clone();
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            c.accepted.fetch_add(1, SeqCst);
            let open = c.open.fetch_add(1, SeqCst) + 1;
            c.max_open.fetch_max(open, SeqCst);
            let handler = handler.clone();
            let c = c.clone();
            tokio::spawn(async move {
                let svc = service_fn(move |req| {
                    let handler = handler.clone();
                    async move { Ok::<_, Infallible>(handler(req).await) }
                });
                let _ = http1::Builder::new().serve_connection(TokioIo::new(stream), svc).await;
                c.open.fetch_sub(1, SeqCst);
            });
        }
    });
    (addr, counts)
}

/// How a [`RawUpstream`] answers.
#[derive(Debug, Clone, Copy)]
pub enum Raw {
    /// One `200 ok` with a Content-Length per connection, then the connection is closed without
    /// a `Connection: close`. The close reaches the gateway only once it has sent the next request
    /// on that connection: it crossed the request on the wire, which in real life happens now and
    /// then and here every time.
    CloseAfterEachResponse,
    /// Keep-alive `200 ok` with a Content-Length and these extra header lines (each ending in
    /// CRLF). A connection idle when [`RawUpstream::close_idle`] is called closes when its next
    /// request arrives, without answering: the upstream's idle close crossing the request.
    KeepAlive(&'static str),
    /// Closes each connection as soon as a request head arrives, without answering.
    NeverAnswers,
    /// A chunked body under both `Content-Length: 5` and `Transfer-Encoding: chunked`.
    LengthAndChunked,
    /// Answers every request with exactly these bytes, and closes the connection after each
    /// answer when `close` is set.
    Scripted { response: &'static str, close: bool },
}

/// A hand-written HTTP/1.1 upstream on raw TCP, for what a well-behaved server never does.
pub struct RawUpstream {
    pub addr: SocketAddr,
    state: Arc<RawState>,
}

#[derive(Default)]
struct RawState {
    /// Bumped by `close_idle`; a connection idle since an earlier value is doomed.
    epoch: std::sync::atomic::AtomicU64,
    seen: Mutex<RawSeen>,
    changed: tokio::sync::Notify,
}

/// What a [`RawUpstream`] has seen.
#[derive(Debug, Default, Clone)]
pub struct RawSeen {
    /// Connections accepted.
    pub connections: usize,
    /// The numbers of the connections the gateway closed while they were idle.
    pub closed_by_gateway: Vec<usize>,
    /// Request lines (`GET /x HTTP/1.1`) with the number of their connection (1, 2, ...).
    pub requests: Vec<(usize, String)>,
    /// Requests that arrived on a connection after `close_idle` doomed it.
    pub on_doomed: usize,
    /// The request heads, whole.
    pub heads: Vec<String>,
}

pub const RAW_BODY: &str = "hello world, the whole body";

impl RawUpstream {
    pub async fn start(behaviour: Raw) -> RawUpstream {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let state = Arc::new(RawState::default());
        let st = state.clone();
        tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                let n = {
                    let mut seen = st.seen.lock().unwrap();
                    seen.connections += 1;
                    seen.connections
                };
                st.changed.notify_waiters();
                tokio::spawn(raw_connection(stream, n, behaviour, st.clone()));
            }
        });
        RawUpstream { addr, state }
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    pub fn seen(&self) -> RawSeen {
        self.state.seen.lock().unwrap().clone()
    }

    /// Dooms every connection idle now (see [`Raw::KeepAlive`]).
    pub fn close_idle(&self) {
        self.state.epoch.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
    }

    /// Waits (no timeout: wrap it in one) until `cond` holds for what the upstream has seen.
    pub async fn until(&self, cond: impl Fn(&RawSeen) -> bool) {
        loop {
            let changed = self.state.changed.notified();
            tokio::pin!(changed);
            changed.as_mut().enable();
            if cond(&self.seen()) {
                return;
            }
            changed.await;
        }
    }
}

async fn raw_connection(mut stream: tokio::net::TcpStream, n: usize, behaviour: Raw, st: Arc<RawState>) {
    use std::sync::atomic::Ordering::SeqCst;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut buf = Vec::new();
    let mut idle_since = st.epoch.load(SeqCst);
    let mut served = false;
    loop {
        // The request head.
        let head_end = loop {
            if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                break i + 4;
            }
            let mut chunk = [0u8; 4096];
            match stream.read(&mut chunk).await {
                Ok(0) | Err(_) => {
                    if buf.is_empty() {
                        st.seen.lock().unwrap().closed_by_gateway.push(n);
                        st.changed.notify_waiters();
                    }
                    return;
                }
                Ok(k) => buf.extend_from_slice(&chunk[..k]),
            }
        };
        let head = String::from_utf8_lossy(&buf[..head_end]).into_owned();
        buf.drain(..head_end);
        let doomed = st.epoch.load(SeqCst) != idle_since
            || matches!(behaviour, Raw::NeverAnswers)
            || (matches!(behaviour, Raw::CloseAfterEachResponse) && served);
        {
            let mut seen = st.seen.lock().unwrap();
            seen.requests.push((n, head.lines().next().unwrap_or("").to_owned()));
            seen.heads.push(head.clone());
            if doomed && matches!(behaviour, Raw::KeepAlive(_)) {
                seen.on_doomed += 1;
            }
        }
        st.changed.notify_waiters();
        if doomed {
            return;
        }
        // The request body, if it has a length.
        let length = head
            .lines()
            .filter_map(|l| l.split_once(':'))
            .find(|(k, _)| k.trim().eq_ignore_ascii_case("content-length"))
            .and_then(|(_, v)| v.trim().parse::<usize>().ok())
            .unwrap_or(0);
        while buf.len() < length {
            let mut chunk = [0u8; 4096];
            match stream.read(&mut chunk).await {
                Ok(0) | Err(_) => return,
                Ok(k) => buf.extend_from_slice(&chunk[..k]),
            }
        }
        buf.drain(..length);
        // Idle from the moment the response is on its way: a `close_idle` after the client has it
        // dooms this connection.
        idle_since = st.epoch.load(SeqCst);
        let response = match behaviour {
            Raw::CloseAfterEachResponse | Raw::KeepAlive(_) | Raw::NeverAnswers => {
                let extra = if let Raw::KeepAlive(extra) = behaviour {
                    extra
                } else {
                    ""
                };
                format!("HTTP/1.1 200 OK\r\ncontent-length: 2\r\n{extra}\r\nok")
            }
            Raw::LengthAndChunked => {
                let (a, b) = RAW_BODY.split_at(5);
                format!(
                    "HTTP/1.1 200 OK\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n\
                     {:x}\r\n{a}\r\n{:x}\r\n{b}\r\n0\r\n\r\n",
                    a.len(),
                    b.len()
                )
            }
            Raw::Scripted { response, .. } => response.to_owned(),
        };
        if stream.write_all(response.as_bytes()).await.is_err() {
            return;
        }
        if let Raw::Scripted { close: true, .. } = behaviour {
            return;
        }
        served = true;
    }
}
