//! The access log: one line per request, however it ends.
//!
//! An [`AccessLog`] is started when a request arrives and travels with it: into the response body
//! ([`ResponseBody`]) once there is a response, so the line is written when the body has been sent
//! (with the bytes that went out), or when the client leaves. A request abandoned before it had a
//! response (the connection closed, an HTTP/2 stream reset) drops its `AccessLog` unanswered,
//! which logs it as 499 (nginx's "client closed request"): the upstream may have run it, and the
//! log must say so.

use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Instant;

use bytes::{Buf, Bytes};
use http::{HeaderValue, Method, Uri};
use http_body::{Body, Frame, SizeHint};

use crate::auth::VerifiedToken;
use crate::metrics::{Metrics, RouteMetrics};
use crate::proxy::body::BodyStats;
use crate::service::InnerBody;

/// nginx's "client closed request".
pub const CLIENT_CLOSED: u16 = 499;

/// The route a request took, for the log.
#[derive(Debug, Clone)]
pub enum RouteLabel {
    Own(&'static str),
    Route(Arc<str>),
}

impl RouteLabel {
    fn as_str(&self) -> &str {
        match self {
            RouteLabel::Own(s) => s,
            RouteLabel::Route(s) => s,
        }
    }
}

pub struct AccessLog {
    started: Instant,
    method: Method,
    uri: Uri,
    client: HeaderValue,
    user_agent: Option<HeaderValue>,
    request_id: HeaderValue,
    pub route: RouteLabel,
    /// 0 until there is a response.
    pub status: u16,
    pub token: Option<Arc<VerifiedToken>>,
    pub body: Option<Arc<BodyStats>>,
    pub upstream_us: Option<u64>,
    bytes_out: u64,
    /// The route's request metrics (unmatched until routing says otherwise).
    pub metrics: Arc<RouteMetrics>,
    inflight: prometheus_client::metrics::gauge::Gauge,
}

impl AccessLog {
    pub fn start(
        method: &Method,
        uri: &Uri,
        headers: &http::HeaderMap,
        peer_ip: &HeaderValue,
        request_id: &HeaderValue,
        metrics: &Metrics,
    ) -> Self {
        metrics.inflight.inc();
        AccessLog {
            started: Instant::now(),
            method: method.clone(),
            uri: uri.clone(),
            client: peer_ip.clone(),
            user_agent: headers.get(http::header::USER_AGENT).cloned(),
            request_id: request_id.clone(),
            route: RouteLabel::Own("-"),
            status: 0,
            token: None,
            body: None,
            upstream_us: None,
            bytes_out: 0,
            metrics: metrics.unmatched().clone(),
            inflight: metrics.inflight.clone(),
        }
    }

    pub fn route(&self) -> &str {
        self.route.as_str()
    }

    pub fn request_id(&self) -> &str {
        self.request_id.to_str().unwrap_or("-")
    }
}

impl Drop for AccessLog {
    fn drop(&mut self) {
        let status = if self.status == 0 { CLIENT_CLOSED } else { self.status };
        let elapsed = self.started.elapsed();
        self.metrics.finished(status, elapsed.as_secs_f64());
        self.inflight.dec();
        crate::logging::access(&crate::logging::AccessRecord {
            method: self.method.as_str(),
            path: self.uri.path(),
            status,
            duration_us: elapsed.as_micros() as u64,
            route: self.route.as_str(),
            request_id: self.request_id(),
            client: self.client.to_str().unwrap_or("-"),
            sub: self.token.as_ref().map(|t| &*t.sub),
            client_id: self.token.as_ref().map(|t| &*t.client_id),
            bytes_in: self.body.as_ref().map_or(0, |b| b.bytes()),
            bytes_out: self.bytes_out,
            upstream_us: self.upstream_us,
            user_agent: self.user_agent.as_ref().and_then(|v| v.to_str().ok()),
        });
    }
}

/// A response body that writes the request's access line once it has been sent (or abandoned).
pub struct ResponseBody {
    inner: InnerBody,
    log: Option<AccessLog>,
}

impl ResponseBody {
    pub fn new(inner: InnerBody, log: AccessLog) -> Self {
        ResponseBody { inner, log: Some(log) }
    }
}

impl Body for ResponseBody {
    type Data = Bytes;
    type Error = Box<dyn std::error::Error + Send + Sync>;

    fn poll_frame(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        let polled = Pin::new(&mut self.inner).poll_frame(cx);
        if let Poll::Ready(Some(Ok(frame))) = &polled
            && let Some(data) = frame.data_ref()
            && let Some(log) = &mut self.log
        {
            log.bytes_out += data.remaining() as u64;
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}
