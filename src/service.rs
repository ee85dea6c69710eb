//! The one hyper service: request id, dispatch (own endpoints, route table, token check, forward),
//! the access log, and the one function where errors become responses.
//!
//! The pipeline is fixed, so it is written as plain async functions named after their phase rather
//! than a generic middleware stack:
//!
//! ```text
//! handle ─▶ request id ─▶ dispatch ─┬─▶ token / revoke endpoint ─▶ JSON
//!                                   ├─▶ route ─▶ authorize (bearer, validator, scopes) ─▶ forward
//!                                   └─▶ 404
//!        ◀─ error_response (the only place errors become responses) ◀─ access log line
//! ```

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

use bytes::Bytes;
use http::header::{self, HeaderValue};
use http::{HeaderMap, Request, Response, StatusCode, Version};
use http_body_util::{Either, Full};
use hyper::body::Incoming;

use crate::auth::bearer::{BearerError, bearer_token};
use crate::auth::validator::InvalidToken;
use crate::auth::{AuthError, Validator, VerifiedToken};
use crate::clock::SharedClock;
use crate::config::{AuthPolicy, RouteSettings};
use crate::oauth::{OAuthError, OAuthServer};
use crate::proxy::forward::{PoolStats, PooledBody, TunnelSlot};
use crate::proxy::headers::{self, RequestContext, X_REQUEST_ID};
use crate::proxy::{ForwardError, Forwarder, echo};
use crate::routing::{PathError, RouteTable, normalize_path};

/// Responses are either ours (small, whole) or the upstream's (streamed).
pub type ResponseBody = Either<Full<Bytes>, PooledBody>;

/// What the service knows of the connection a request came on.
#[derive(Debug, Clone)]
pub struct ConnInfo {
    pub peer: SocketAddr,
    pub tls: bool,
    /// The peer's IP as a header value, formatted once per connection for X-Forwarded-For.
    pub peer_ip: HeaderValue,
    /// The connection's `max_connections` slot; an upgraded (WebSocket) tunnel keeps it.
    pub slot: Option<Arc<tokio::sync::OwnedSemaphorePermit>>,
}

impl ConnInfo {
    pub fn new(peer: SocketAddr, tls: bool, slot: Option<Arc<tokio::sync::OwnedSemaphorePermit>>) -> Self {
        let peer_ip = HeaderValue::from_str(&peer.ip().to_string()).unwrap_or(HeaderValue::from_static("unknown"));
        ConnInfo {
            peer,
            tls,
            peer_ip,
            slot,
        }
    }
}

/// A request that failed, tagged with whose fault it is; [`error_response`] renders it.
#[derive(Debug)]
pub enum GatewayError {
    /// 400: a path we refuse to interpret.
    BadPath(PathError),
    /// 404: no route.
    NotFound,
    /// 400/401/403 from the token check (RFC 6750 §3).
    Auth(AuthError),
    /// The token and revocation endpoints' errors (RFC 6749 §5.2).
    OAuth(OAuthError),
    /// 502: the upstream refused, reset, or could not be reached (detail for the log only).
    UpstreamUnavailable(String),
    /// 504: no response head within the route's timeout.
    UpstreamTimeout,
    /// 503: every connection to the upstream busy and the route's wait queue full.
    UpstreamQueueFull,
}

impl From<ForwardError> for GatewayError {
    fn from(e: ForwardError) -> Self {
        match e {
            ForwardError::Unavailable(detail) => GatewayError::UpstreamUnavailable(detail),
            ForwardError::Timeout => GatewayError::UpstreamTimeout,
            ForwardError::QueueFull => GatewayError::UpstreamQueueFull,
        }
    }
}

const REALM_CHALLENGE: &str = "Bearer realm=\"tokengate\"";

fn json_error(status: StatusCode, error: &str, description: &str) -> Response<ResponseBody> {
    #[derive(serde::Serialize)]
    struct Body<'a> {
        error: &'a str,
        error_description: &'a str,
    }
    let body = serde_json::to_vec(&Body {
        error,
        error_description: description,
    })
    .unwrap_or_default();
    let mut r = Response::new(Either::Left(Full::new(Bytes::from(body))));
    *r.status_mut() = status;
    r.headers_mut()
        .insert(header::CONTENT_TYPE, HeaderValue::from_static("application/json"));
    r
}

fn no_store(headers: &mut HeaderMap) {
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    headers.insert(header::PRAGMA, HeaderValue::from_static("no-cache"));
}

fn challenge(error: &str, description: &str, scope: Option<&str>) -> HeaderValue {
    let mut v = format!("{REALM_CHALLENGE}, error=\"{error}\", error_description=\"{description}\"");
    if let Some(scope) = scope {
        v.push_str(&format!(", scope=\"{scope}\""));
    }
    HeaderValue::from_str(&v).unwrap_or(HeaderValue::from_static(REALM_CHALLENGE))
}

/// The only place a request error becomes a response. Exhaustive on purpose: a new error kind must
/// be given its status here, not fall into a catch-all 500.
pub fn error_response(e: &GatewayError) -> Response<ResponseBody> {
    match e {
        GatewayError::BadPath(p) => json_error(StatusCode::BAD_REQUEST, "invalid_request", p.describe()),
        GatewayError::NotFound => json_error(StatusCode::NOT_FOUND, "not_found", "no route for this path"),
        GatewayError::Auth(auth) => {
            let (status, error, description, scope) = match auth {
                AuthError::Missing => {
                    let mut r = json_error(StatusCode::UNAUTHORIZED, "unauthorized", "a bearer token is required");
                    r.headers_mut()
                        .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static(REALM_CHALLENGE));
                    return r;
                }
                AuthError::BadRequest(d) => (StatusCode::BAD_REQUEST, "invalid_request", *d, None),
                AuthError::InvalidToken(t) => (StatusCode::UNAUTHORIZED, "invalid_token", t.describe(), None),
                AuthError::InsufficientScope(s) => (
                    StatusCode::FORBIDDEN,
                    "insufficient_scope",
                    "the access token lacks a scope this route requires",
                    Some(s.as_str()),
                ),
            };
            let mut r = json_error(status, error, description);
            r.headers_mut()
                .insert(header::WWW_AUTHENTICATE, challenge(error, description, scope));
            r
        }
        GatewayError::OAuth(o) => {
            let mut r = match o {
                OAuthError::Protocol {
                    code,
                    description,
                    basic_challenge,
                } => {
                    let mut r = json_error(code.status(), code.as_str(), description);
                    if *basic_challenge && code.status() == StatusCode::UNAUTHORIZED {
                        r.headers_mut().insert(
                            header::WWW_AUTHENTICATE,
                            HeaderValue::from_static("Basic realm=\"tokengate\""),
                        );
                    }
                    r
                }
                OAuthError::SlowDown { retry_after_secs } => {
                    let mut r = json_error(
                        StatusCode::TOO_MANY_REQUESTS,
                        "slow_down",
                        "too many failed logins; retry later",
                    );
                    r.headers_mut()
                        .insert(header::RETRY_AFTER, HeaderValue::from(*retry_after_secs));
                    r
                }
                OAuthError::BodyTooLarge => json_error(
                    StatusCode::PAYLOAD_TOO_LARGE,
                    "invalid_request",
                    "the request body is larger than 16 KiB",
                ),
                OAuthError::MethodNotAllowed => {
                    let mut r = json_error(
                        StatusCode::METHOD_NOT_ALLOWED,
                        "invalid_request",
                        "this endpoint accepts POST only",
                    );
                    r.headers_mut().insert(header::ALLOW, HeaderValue::from_static("POST"));
                    r
                }
                OAuthError::Internal(_) => {
                    json_error(StatusCode::INTERNAL_SERVER_ERROR, "server_error", "internal error")
                }
            };
            no_store(r.headers_mut());
            r
        }
        GatewayError::UpstreamUnavailable(_) => {
            json_error(StatusCode::BAD_GATEWAY, "bad_gateway", "the upstream is unavailable")
        }
        GatewayError::UpstreamTimeout => json_error(
            StatusCode::GATEWAY_TIMEOUT,
            "gateway_timeout",
            "the upstream did not answer in time",
        ),
        GatewayError::UpstreamQueueFull => {
            let mut r = json_error(
                StatusCode::SERVICE_UNAVAILABLE,
                "service_unavailable",
                "the upstream is at its connection limit; retry shortly",
            );
            r.headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
            r
        }
    }
}

/// Request ids: the client's if it sent a sane one, else `<process prefix>-<counter>`.
pub struct RequestIds {
    prefix: u32,
    counter: AtomicU64,
}

impl RequestIds {
    pub fn new(prefix: u32) -> Self {
        RequestIds {
            prefix,
            counter: AtomicU64::new(0),
        }
    }

    pub fn for_request(&self, headers: &HeaderMap) -> HeaderValue {
        if let Some(v) = headers.get(&X_REQUEST_ID)
            && is_sane_request_id(v.as_bytes())
        {
            return v.clone();
        }
        let n = self.counter.fetch_add(1, Ordering::Relaxed);
        // `<8 hex digits of the process prefix>-<counter in hex>`, without going through fmt.
        let mut buf = [0u8; 25];
        hex_into(&mut buf[..8], u64::from(self.prefix));
        buf[8] = b'-';
        let digits = (64 - n.leading_zeros()).div_ceil(4).max(1) as usize;
        hex_into(&mut buf[9..9 + digits], n);
        HeaderValue::from_bytes(&buf[..9 + digits]).unwrap_or(HeaderValue::from_static("-"))
    }
}

/// Writes the low `out.len() * 4` bits of `n` as lower-case hex.
fn hex_into(out: &mut [u8], mut n: u64) {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    for slot in out.iter_mut().rev() {
        *slot = HEX[(n & 0xf) as usize];
        n >>= 4;
    }
}

/// 1 to 128 characters of `[A-Za-z0-9._:-]`: safe in a log line and a header.
fn is_sane_request_id(v: &[u8]) -> bool {
    (1..=128).contains(&v.len())
        && v.iter()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b':'))
}

/// One route as the request path needs it.
struct Route {
    settings: RouteSettings,
    /// `None` for the built-in echo upstream.
    forwarder: Option<Forwarder>,
    /// The required scopes, space-delimited, for `insufficient_scope` challenges.
    scope_names: String,
}

pub struct App {
    token_path: String,
    revoke_path: String,
    /// Path (+ host) → index into `routes`.
    table: RouteTable,
    routes: Vec<Route>,
    validator: Arc<Validator>,
    oauth: OAuthServer,
    request_ids: RequestIds,
}

impl App {
    pub(crate) fn new(
        config: &crate::config::Config,
        validator: Arc<Validator>,
        oauth: OAuthServer,
        request_id_prefix: u32,
        clock: SharedClock,
    ) -> anyhow::Result<Self> {
        let table = RouteTable::new(
            config
                .routes
                .iter()
                .map(|r| (r.host.as_deref(), r.path_prefix.as_str())),
        )
        .map_err(|d| anyhow::anyhow!("routes[{}] duplicates routes[{}]", d.index, d.earlier))?;
        let routes = config
            .routes
            .iter()
            .enumerate()
            .map(|(i, r)| {
                let forwarder = Forwarder::new(r, clock.clone())
                    .map_err(|e| e.context(format!("routes[{i}]: cannot set up the upstream client")))?;
                Ok(Route {
                    settings: r.clone(),
                    forwarder,
                    scope_names: config.scopes.render(r.scopes),
                })
            })
            .collect::<anyhow::Result<Vec<_>>>()?;
        Ok(App {
            token_path: config.tokens.token_path.clone(),
            revoke_path: config.tokens.revoke_path.clone(),
            table,
            routes,
            validator,
            oauth,
            request_ids: RequestIds::new(request_id_prefix),
        })
    }

    pub fn oauth(&self) -> &OAuthServer {
        &self.oauth
    }

    pub fn validator(&self) -> &Validator {
        &self.validator
    }

    /// Closes upstream connections idle past their reuse time (the maintenance loop, every second).
    pub fn sweep_upstreams(&self) {
        for forwarder in self.routes.iter().filter_map(|r| r.forwarder.as_ref()) {
            forwarder.sweep();
        }
    }

    /// The upstream connections of the first route with this `path_prefix` (`None`: no such route,
    /// or the echo upstream).
    pub fn upstream_stats(&self, path_prefix: &str) -> Option<PoolStats> {
        self.routes
            .iter()
            .find(|r| r.settings.path_prefix == path_prefix)
            .and_then(|r| r.forwarder.as_ref())
            .map(Forwarder::stats)
    }

    /// Serves one request; never fails (errors are responses), logs one access line.
    pub async fn handle(&self, req: Request<Incoming>, conn: &ConnInfo) -> Response<ResponseBody> {
        let started = Instant::now();
        let request_id = self.request_ids.for_request(req.headers());
        let method = req.method().clone();
        let uri = req.uri().clone();
        let mut route_label: &str = "-";
        let result = self.dispatch(req, conn, &request_id, &mut route_label).await;
        let mut response = match result {
            Ok(r) => r,
            Err(e) => {
                match &e {
                    GatewayError::UpstreamUnavailable(detail) => {
                        tracing::warn!(route = route_label, request_id = request_id.to_str().unwrap_or("-"), detail = %detail, "upstream unavailable")
                    }
                    GatewayError::UpstreamTimeout => {
                        tracing::warn!(
                            route = route_label,
                            request_id = request_id.to_str().unwrap_or("-"),
                            "upstream timed out"
                        )
                    }
                    GatewayError::UpstreamQueueFull => {
                        tracing::warn!(
                            route = route_label,
                            request_id = request_id.to_str().unwrap_or("-"),
                            "upstream connection queue full"
                        )
                    }
                    GatewayError::OAuth(OAuthError::Internal(detail)) => {
                        tracing::error!(
                            route = route_label,
                            request_id = request_id.to_str().unwrap_or("-"),
                            detail,
                            "internal error"
                        )
                    }
                    _ => {}
                }
                error_response(&e)
            }
        };
        response.headers_mut().insert(X_REQUEST_ID.clone(), request_id.clone());
        crate::logging::access(&crate::logging::AccessRecord {
            method: method.as_str(),
            path: uri.path(),
            status: response.status().as_u16(),
            duration_us: started.elapsed().as_micros() as u64,
            route: route_label,
            request_id: request_id.to_str().unwrap_or("-"),
        });
        response
    }

    async fn dispatch<'s>(
        &'s self,
        req: Request<Incoming>,
        conn: &ConnInfo,
        request_id: &HeaderValue,
        route_label: &mut &'s str,
    ) -> Result<Response<ResponseBody>, GatewayError> {
        let path = normalize_path(req.uri().path()).map_err(GatewayError::BadPath)?;
        if path == self.token_path {
            *route_label = "token";
            return self.token_endpoint(req, conn).await;
        }
        if path == self.revoke_path {
            *route_label = "revoke";
            return self.revoke_endpoint(req).await;
        }
        // The Host the client addressed (HTTP/2: :authority), read once for routing and forwarding.
        let host = req.headers().get(header::HOST).cloned().or_else(|| {
            req.uri()
                .authority()
                .and_then(|a| HeaderValue::from_str(a.as_str()).ok())
        });
        let index = self
            .table
            .resolve(host.as_ref().and_then(|h| h.to_str().ok()), &path)
            .ok_or(GatewayError::NotFound)?;
        let route = &self.routes[index];
        *route_label = &route.settings.path_prefix;
        let token = match route.settings.auth {
            AuthPolicy::Required => Some(self.authorize(req.headers(), route)?),
            AuthPolicy::None => None,
        };
        self.forward(req, conn, route, &path, host, token.as_deref(), request_id)
            .await
    }

    /// Bearer → validator (cache) → scope check. Runs on every request to a protected route.
    fn authorize(&self, headers: &HeaderMap, route: &Route) -> Result<Arc<VerifiedToken>, GatewayError> {
        let token = match bearer_token(headers) {
            Ok(Some(t)) => t,
            Ok(None) => return Err(GatewayError::Auth(AuthError::Missing)),
            Err(BearerError::Repeated) => {
                return Err(GatewayError::Auth(AuthError::BadRequest(
                    "more than one Authorization header",
                )));
            }
            Err(BearerError::Malformed) => {
                return Err(GatewayError::Auth(AuthError::BadRequest(
                    "malformed Bearer credentials",
                )));
            }
        };
        let verified = self
            .validator
            .validate(token)
            .map_err(|e: InvalidToken| GatewayError::Auth(AuthError::InvalidToken(e)))?;
        if !verified.scopes.contains_all(route.settings.scopes) {
            return Err(GatewayError::Auth(AuthError::InsufficientScope(
                route.scope_names.clone(),
            )));
        }
        Ok(verified)
    }

    #[allow(clippy::too_many_arguments)]
    async fn forward(
        &self,
        mut req: Request<Incoming>,
        conn: &ConnInfo,
        route: &Route,
        path: &str,
        original_host: Option<HeaderValue>,
        token: Option<&VerifiedToken>,
        request_id: &HeaderValue,
    ) -> Result<Response<ResponseBody>, GatewayError> {
        let forwarder = route.forwarder.as_ref();
        let route = &route.settings;
        let upgrade = req.version() == Version::HTTP_11 && headers::is_upgrade_request(req.headers());
        let client_upgrade = upgrade.then(|| hyper::upgrade::on(&mut req));
        let (mut parts, body) = req.into_parts();
        let forward_path = if route.strip_prefix {
            strip_prefix(path, &route.path_prefix)
        } else {
            path
        };
        let ctx = RequestContext {
            peer_ip: &conn.peer_ip,
            proto: if conn.tls { "https" } else { "http" },
            original_host,
            upstream_host: if route.preserve_host {
                None
            } else {
                forwarder.map(|f| &f.host_header)
            },
            identity: token.map(|t| &t.identity),
            keep_authorization: route.forward_authorization,
            upgrade: upgrade && forwarder.is_some(),
            request_id,
        };
        let headers = headers::upstream_request_headers(std::mem::take(&mut parts.headers), &ctx);
        let query = parts.uri.query();
        let Some(forwarder) = forwarder else {
            return Ok(echo::respond(&parts.method, forward_path, query, &headers).map(Either::Left));
        };
        let uri = forwarder
            .uri(forward_path, query)
            .ok_or(GatewayError::BadPath(PathError::NotOriginForm))?;
        let mut upstream_req = Request::new(body);
        *upstream_req.method_mut() = parts.method;
        *upstream_req.uri_mut() = uri;
        *upstream_req.headers_mut() = headers;
        let mut resp = forwarder.send(upstream_req).await?;
        let switching = resp.status() == StatusCode::SWITCHING_PROTOCOLS;
        if switching {
            match client_upgrade {
                Some(client_side) => {
                    let upstream_side = hyper::upgrade::on(&mut resp);
                    let slot = conn.slot.clone();
                    let upstream_slot = resp.extensions_mut().remove::<TunnelSlot>();
                    tokio::spawn(async move {
                        tunnel(client_side, upstream_side).await;
                        drop((slot, upstream_slot));
                    });
                }
                None => {
                    return Err(GatewayError::UpstreamUnavailable(
                        "101 to a request that asked no upgrade".into(),
                    ));
                }
            }
        }
        headers::clean_response_headers(resp.headers_mut(), switching);
        Ok(resp.map(Either::Right))
    }

    async fn token_endpoint(
        &self,
        req: Request<Incoming>,
        conn: &ConnInfo,
    ) -> Result<Response<ResponseBody>, GatewayError> {
        let (parts, body) = req.into_parts();
        let json = self
            .oauth
            .token(&parts.method, &parts.headers, body, conn.peer.ip())
            .await
            .map_err(GatewayError::OAuth)?;
        let mut r = Response::new(Either::Left(Full::new(json)));
        r.headers_mut()
            .insert(header::CONTENT_TYPE, HeaderValue::from_static("application/json"));
        no_store(r.headers_mut());
        Ok(r)
    }

    async fn revoke_endpoint(&self, req: Request<Incoming>) -> Result<Response<ResponseBody>, GatewayError> {
        let (parts, body) = req.into_parts();
        self.oauth
            .revoke(&parts.method, &parts.headers, body)
            .await
            .map_err(GatewayError::OAuth)?;
        let mut r = Response::new(Either::Left(Full::new(Bytes::new())));
        no_store(r.headers_mut());
        Ok(r)
    }
}

fn strip_prefix<'p>(path: &'p str, prefix: &str) -> &'p str {
    if prefix == "/" {
        return path;
    }
    match path.get(prefix.len()..) {
        Some("") | None => "/",
        Some(rest) => rest,
    }
}

/// Copies bytes both ways between the client's and the upstream's upgraded connections.
async fn tunnel(client: hyper::upgrade::OnUpgrade, upstream: hyper::upgrade::OnUpgrade) {
    let (client, upstream) = match tokio::try_join!(client, upstream) {
        Ok(pair) => pair,
        Err(e) => {
            tracing::debug!(error = %e, "upgrade failed");
            return;
        }
    };
    let mut client = hyper_util::rt::TokioIo::new(client);
    let mut upstream = hyper_util::rt::TokioIo::new(upstream);
    if let Err(e) = tokio::io::copy_bidirectional(&mut client, &mut upstream).await {
        tracing::debug!(error = %e, "upgraded connection ended with an error");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generated_request_ids_are_prefix_dash_counter_in_hex() {
        let ids = RequestIds::new(0xabc);
        let none = HeaderMap::new();
        assert_eq!(ids.for_request(&none), "00000abc-0");
        assert_eq!(ids.for_request(&none), "00000abc-1");
        ids.counter.store(0x1f, Ordering::Relaxed);
        assert_eq!(ids.for_request(&none), "00000abc-1f");
        ids.counter.store(u64::MAX, Ordering::Relaxed);
        assert_eq!(ids.for_request(&none), "00000abc-ffffffffffffffff");
    }

    #[test]
    fn client_request_ids_are_kept_only_when_sane() {
        let ids = RequestIds::new(1);
        let mut h = HeaderMap::new();
        h.insert(&X_REQUEST_ID, HeaderValue::from_static("trace-42.a:b_c"));
        assert_eq!(ids.for_request(&h), "trace-42.a:b_c");
        h.insert(&X_REQUEST_ID, HeaderValue::from_static("has space"));
        assert_eq!(ids.for_request(&h), "00000001-0");
        h.insert(&X_REQUEST_ID, HeaderValue::from_str(&"x".repeat(129)).unwrap());
        assert_eq!(ids.for_request(&h), "00000001-1");
    }

    #[test]
    fn strip_prefix_keeps_an_absolute_path() {
        assert_eq!(strip_prefix("/api/orders/7", "/api/orders"), "/7");
        assert_eq!(strip_prefix("/api/orders", "/api/orders"), "/");
        assert_eq!(strip_prefix("/api/orders/", "/api/orders"), "/");
        assert_eq!(strip_prefix("/x", "/"), "/x");
    }
}
