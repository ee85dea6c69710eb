//! The one hyper service: request id, dispatch (own endpoints, route table, token check, forward),
//! the access log, and the one function where errors become responses ([`error::error_response`]).
//!
//! The pipeline is fixed, so it is written as plain async functions named after their phase rather
//! than a generic middleware stack:
//!
//! ```text
//! handle ─▶ snapshot, request id, access log, body timeout ─▶ dispatch
//!   dispatch ─▶ method, path, host ─┬─▶ token / revoke / introspect endpoint, JWKS, metadata ─▶ JSON
//!                                   ├─▶ route ─▶ authorize (bearer, validator, issuer, scopes) ─▶ forward
//!                                   └─▶ 404
//!        ◀─ error_response ◀─ the access line is written when the response body ends (or the
//!           client leaves: 499)
//! ```

pub mod access;
pub mod error;
mod request_id;

use std::net::SocketAddr;
use std::sync::Arc;

use arc_swap::ArcSwap;
use bytes::Bytes;
use http::header::{self, HeaderValue};
use http::{HeaderMap, Method, Request, Response, StatusCode, Version};
use http_body_util::{Either, Full};
use hyper::body::Incoming;
use tokio::time::Instant;

use crate::auth::bearer::{BearerError, bearer_bytes, token_str};
use crate::auth::validator::InvalidToken;
use crate::auth::{AuthError, LastToken, VerifiedToken};
use crate::config::{AuthPolicy, JWKS_PATH, METADATA_PATH};
use crate::metrics::{Metrics, TokenOutcome, UpstreamErrorKind};
use crate::oauth::{OAuthError, OAuthServer};
use crate::proxy::body::{BodyFault, BodyGuard, ClientBody};
use crate::proxy::forward::{PooledBody, TunnelSlot};
use crate::proxy::forwarded::ClientAddr;
use crate::proxy::headers::{self, RequestContext, X_REQUEST_ID};
use crate::proxy::tunnel::Tunnels;
use crate::proxy::{ForwardError, echo};
use crate::routing::{PathError, normalize_path, request_authority};
use crate::snapshot::{Route, Snapshot};
use crate::state::State;

pub use access::ResponseBody;
use access::{AccessLog, RouteLabel};
pub use error::{GatewayError, error_response};
use error::{json_body, no_store};
pub use request_id::RequestIds;

/// Responses before logging: ours (small, whole) or the upstream's (streamed).
pub type InnerBody = Either<Full<Bytes>, PooledBody>;

/// The request as the service passes it on: the client's body behind the body timeout.
pub type ClientRequest = Request<ClientBody>;

/// What the service knows of the connection a request came on.
#[derive(Debug, Clone)]
pub struct ConnInfo {
    pub peer: SocketAddr,
    pub tls: bool,
    /// The peer's IP as a header value, formatted once per connection (X-Forwarded-For, the log).
    pub peer_ip: HeaderValue,
    /// The connection's `max_connections` slot; an upgraded (WebSocket) tunnel keeps it.
    pub slot: Option<Arc<tokio::sync::OwnedSemaphorePermit>>,
    /// The bearer token its last request presented (the validator's shortcut for the next).
    pub last_token: LastToken,
}

impl ConnInfo {
    pub fn new(peer: SocketAddr, tls: bool, slot: Option<Arc<tokio::sync::OwnedSemaphorePermit>>) -> Self {
        // A dual-stack listener reports IPv4 clients as ::ffff:a.b.c.d; they are IPv4 clients.
        let peer_ip =
            HeaderValue::from_str(&peer.ip().to_canonical().to_string()).unwrap_or(HeaderValue::from_static("unknown"));
        ConnInfo {
            peer,
            tls,
            peer_ip,
            slot,
            last_token: LastToken::default(),
        }
    }
}

pub struct App {
    snapshot: ArcSwap<Snapshot>,
    state: Arc<State>,
    request_ids: RequestIds,
    /// Open WebSocket (upgraded) tunnels: shutdown waits for them, revocation closes them.
    tunnels: Arc<Tunnels>,
}

impl App {
    pub(crate) fn new(snapshot: Snapshot, state: Arc<State>, request_id_prefix: u32) -> Self {
        App {
            snapshot: ArcSwap::from_pointee(snapshot),
            state,
            request_ids: RequestIds::new(request_id_prefix),
            tunnels: Arc::new(Tunnels::new()),
        }
    }

    pub fn tunnels(&self) -> &Arc<Tunnels> {
        &self.tunnels
    }

    /// The current Snapshot. A request loads it once and keeps it to its end.
    pub fn snapshot(&self) -> Arc<Snapshot> {
        self.snapshot.load_full()
    }

    /// Makes `snapshot` the one new requests see, in one step; requests in flight finish with
    /// the Snapshot they loaded.
    pub fn install(&self, snapshot: Snapshot) {
        self.snapshot.store(Arc::new(snapshot));
    }

    pub fn state(&self) -> &Arc<State> {
        &self.state
    }

    /// A route's upstream pool counts (the first route with that prefix); for tests and metrics.
    pub fn upstream_stats(&self, path_prefix: &str) -> Option<crate::proxy::forward::PoolStats> {
        self.snapshot()
            .routes
            .iter()
            .find(|r| r.settings.path_prefix == path_prefix)
            .and_then(|r| r.forwarder.as_ref())
            .map(|f| f.stats())
    }

    /// The authorization server over one Snapshot and the State.
    pub fn oauth<'a>(&'a self, snap: &'a Snapshot) -> OAuthServer<'a> {
        OAuthServer::new(snap, &self.state)
    }

    /// Serves one request; never fails (errors are responses). Its access line is written when
    /// the response has been sent, or when the client leaves first.
    pub async fn handle(&self, mut req: Request<Incoming>, conn: &ConnInfo) -> Response<ResponseBody> {
        let snap = self.snapshot.load_full();
        let request_id = self.request_ids.for_request(req.headers());
        let client = snap
            .config
            .server
            .trusted_proxies
            .client(conn.peer.ip(), &conn.peer_ip, req.headers());
        let mut log = AccessLog::start(
            req.method(),
            req.uri(),
            req.headers(),
            &client.ip_header,
            &request_id,
            &self.state.metrics,
        );
        let version = req.version();
        // The request travels whole, its body wrapped (each `into_parts`/`from_parts` would move
        // its head, ~300 bytes, once more).
        let guard = req.extensions_mut().remove::<BodyGuard>();
        let req = req.map(|body| ClientBody::new(body, snap.config.server.body_timeout, guard));
        log.body = req.body().stats().cloned();
        let mut response = match self.dispatch(&snap, req, conn, &client, &request_id, &mut log).await {
            Ok(r) => r,
            Err(e) => {
                log_error(&e, &log);
                let mut r = error_response(&e);
                // A 408 leaves a body half read: the connection cannot carry another request.
                if r.status() == StatusCode::REQUEST_TIMEOUT && version <= Version::HTTP_11 {
                    r.headers_mut()
                        .insert(header::CONNECTION, HeaderValue::from_static("close"));
                }
                r
            }
        };
        // Marked sensitive: HTTP/2's HPACK then sends it as a literal and keeps it out of the
        // connection's header table. A generated id is new in every response (a client's own
        // is echoed back), so an indexed copy is hardly ever reused; indexing it would only
        // evict useful entries and, since h2 chains entries of one name, make every later
        // response compare its id against ~50 dead ones.
        let mut request_id = request_id;
        request_id.set_sensitive(true);
        response.headers_mut().insert(X_REQUEST_ID.clone(), request_id);
        log.status = response.status().as_u16();
        response.map(|b| ResponseBody::new(b, log))
    }

    async fn dispatch(
        &self,
        snap: &Snapshot,
        req: ClientRequest,
        conn: &ConnInfo,
        client: &ClientAddr,
        request_id: &HeaderValue,
        log: &mut AccessLog,
    ) -> Result<Response<InnerBody>, GatewayError> {
        // TRACE would echo credentials back (XST); CONNECT would open a raw tunnel.
        if req.method() == Method::TRACE || req.method() == Method::CONNECT {
            return Err(GatewayError::MethodNotAllowed);
        }
        // A clone of the target (no copy of its bytes) lends the path, so that `req` can move on.
        let uri = req.uri().clone();
        let path = normalize_path(uri.path()).map_err(GatewayError::BadPath)?;
        let tokens = &snap.config.tokens;
        // The endpoints' futures are boxed: each is KiBs, and every request's future (which
        // hyper keeps per HTTP/1.1 connection) would otherwise be as large as the largest.
        if path == tokens.token_path {
            log.route = RouteLabel::Own("token");
            log.metrics = snap.token_metrics.clone();
            return Box::pin(self.token_endpoint(snap, req, client)).await;
        }
        if path == tokens.revoke_path {
            log.route = RouteLabel::Own("revoke");
            log.metrics = snap.revoke_metrics.clone();
            return Box::pin(self.revoke_endpoint(snap, req)).await;
        }
        if path == tokens.introspect_path {
            log.route = RouteLabel::Own("introspect");
            return Box::pin(self.introspect_endpoint(snap, req)).await;
        }
        if path == JWKS_PATH {
            log.route = RouteLabel::Own("jwks");
            return published(req.method(), snap.keys.jwks());
        }
        if path == METADATA_PATH {
            log.route = RouteLabel::Own("metadata");
            return published(req.method(), &snap.metadata);
        }
        // The host the client addressed, read once for routing and forwarding.
        let host = request_authority(req.version(), req.uri(), req.headers()).map_err(GatewayError::BadHost)?;
        let index = snap
            .table
            .resolve(host.as_ref().and_then(|h| h.to_str().ok()), &path)
            .ok_or(GatewayError::NotFound)?;
        let route = &snap.routes[index];
        log.route = RouteLabel::Route(route.label.clone());
        log.metrics = route.metrics.clone();
        let token = match route.settings.auth {
            AuthPolicy::Required => {
                let t = authorize(snap, &self.state.metrics, req.headers(), route, &conn.last_token).await?;
                log.token = Some(t.clone());
                Some(t)
            }
            AuthPolicy::None => None,
        };
        self.forward(req, conn, client, route, &path, host, token.as_deref(), request_id, log)
            .await
    }

    #[allow(clippy::too_many_arguments)]
    async fn forward(
        &self,
        mut req: ClientRequest,
        conn: &ConnInfo,
        client: &ClientAddr,
        route: &Route,
        path: &str,
        original_host: Option<HeaderValue>,
        token: Option<&VerifiedToken>,
        request_id: &HeaderValue,
        log: &mut AccessLog,
    ) -> Result<Response<InnerBody>, GatewayError> {
        let forwarder = route.forwarder.as_ref();
        let settings = &route.settings;
        // Only the protocols the route allows are tunnelled (websocket by default, h2c never): an
        // Upgrade the route does not allow is removed like any hop-by-hop header, and a 101 to it
        // is refused below.
        let upgrade = req.version() == Version::HTTP_11
            && forwarder.is_some()
            && headers::is_upgrade_request(req.headers())
            && headers::upgrade_allowed(req.headers(), &settings.upgrades);
        let client_upgrade = upgrade.then(|| hyper::upgrade::on(&mut req));
        let body_stats = req.body().stats().cloned();
        let forward_path = if settings.strip_prefix {
            strip_prefix(path, &settings.path_prefix)
        } else {
            path
        };
        let ctx = RequestContext {
            forwarded_for: &client.forwarded_for,
            proto: if conn.tls { "https" } else { "http" },
            original_host,
            upstream_host: if settings.preserve_host {
                None
            } else {
                forwarder.map(|f| &f.host_header)
            },
            identity: token.map(|t| &t.identity),
            keep_authorization: settings.forward_authorization,
            upgrade,
            request_id,
        };
        let Some(forwarder) = forwarder else {
            let (mut parts, _body) = req.into_parts();
            let headers = headers::upstream_request_headers(std::mem::take(&mut parts.headers), &ctx);
            return Ok(echo::respond(&parts.method, forward_path, parts.uri.query(), &headers).map(Either::Left));
        };
        // The client's request becomes the upstream's, in place: its method, and its headers as
        // they came (the forwarder strips them and adds the gateway's own, `ctx`, as its client
        // needs); the upstream's target; HTTP/1.1; none of the server's extensions.
        let uri = forwarder
            .uri(forward_path, req.uri())
            .ok_or(GatewayError::BadPath(PathError::NotOriginForm))?;
        *req.uri_mut() = uri;
        *req.version_mut() = Version::HTTP_11;
        req.extensions_mut().clear();
        // tokio's clock, which the forwarder's deadline is on.
        let sent = Instant::now();
        let result = forwarder.send(req, &ctx, sent).await;
        log.upstream_us = Some(sent.elapsed().as_micros() as u64);
        let mut resp = match result {
            Ok(r) => r,
            // The upstream hop failed because the client's body did: the client's fault.
            Err(e) => {
                return Err(match body_stats.and_then(|s| s.fault()) {
                    Some(BodyFault::Timeout) => GatewayError::BodyTimeout,
                    Some(BodyFault::Unreadable) => GatewayError::BadBody,
                    None => {
                        let kind = match &e {
                            ForwardError::Connect(_) => Some(UpstreamErrorKind::Connect),
                            ForwardError::Reset(_) => Some(UpstreamErrorKind::Reset),
                            ForwardError::Protocol(_) => Some(UpstreamErrorKind::Protocol),
                            ForwardError::Timeout => Some(UpstreamErrorKind::Timeout),
                            ForwardError::QueueFull => None,
                        };
                        if let Some(kind) = kind {
                            route.metrics.upstream_error(kind);
                        }
                        e.into()
                    }
                });
            }
        };
        let switching = resp.status() == StatusCode::SWITCHING_PROTOCOLS;
        if switching {
            match client_upgrade {
                Some(client_side) => {
                    let upstream_side = hyper::upgrade::on(&mut resp);
                    // The tunnel keeps both the client connection's slot and its upstream
                    // connection's slot for as long as it lives, and is closed when the token's
                    // session is revoked.
                    let slots = (conn.slot.clone(), resp.extensions_mut().remove::<TunnelSlot>());
                    let sid = token.and_then(|t| t.sid);
                    self.tunnels.spawn(client_side, upstream_side, sid, slots);
                }
                None => {
                    return Err(GatewayError::UpstreamUnavailable(
                        "101 to a request that asked no (allowed) upgrade".into(),
                    ));
                }
            }
        }
        if !resp.body().headers_cleaned() {
            headers::clean_response_headers(resp.headers_mut(), switching);
        }
        Ok(resp.map(Either::Right))
    }

    async fn token_endpoint(
        &self,
        snap: &Snapshot,
        req: ClientRequest,
        client: &ClientAddr,
    ) -> Result<Response<InnerBody>, GatewayError> {
        let (parts, body) = req.into_parts();
        let json = self
            .oauth(snap)
            .token(&parts.method, &parts.headers, body, client.ip)
            .await
            .map_err(GatewayError::OAuth)?;
        let mut r = Response::new(Either::Left(Full::new(json)));
        r.headers_mut()
            .insert(header::CONTENT_TYPE, HeaderValue::from_static("application/json"));
        no_store(r.headers_mut());
        Ok(r)
    }

    async fn introspect_endpoint(
        &self,
        snap: &Snapshot,
        req: ClientRequest,
    ) -> Result<Response<InnerBody>, GatewayError> {
        let (parts, body) = req.into_parts();
        let answer = self
            .oauth(snap)
            .introspect(&parts.method, &parts.headers, body)
            .await
            .map_err(GatewayError::OAuth)?;
        let mut r = Response::new(Either::Left(json_body(&answer)));
        r.headers_mut()
            .insert(header::CONTENT_TYPE, HeaderValue::from_static("application/json"));
        no_store(r.headers_mut());
        Ok(r)
    }

    async fn revoke_endpoint(&self, snap: &Snapshot, req: ClientRequest) -> Result<Response<InnerBody>, GatewayError> {
        let (parts, body) = req.into_parts();
        self.oauth(snap)
            .revoke(&parts.method, &parts.headers, body)
            .await
            .map_err(GatewayError::OAuth)?;
        // RFC 7009 allows an empty body; some client libraries fail on one that is not JSON.
        let mut r = Response::new(Either::Left(json_body(&serde_json::Map::new())));
        r.headers_mut()
            .insert(header::CONTENT_TYPE, HeaderValue::from_static("application/json"));
        no_store(r.headers_mut());
        Ok(r)
    }
}

/// Errors worth a log line of their own (beyond the access line).
fn log_error(e: &GatewayError, log: &AccessLog) {
    let (route, request_id) = (log.route(), log.request_id());
    match e {
        GatewayError::UpstreamUnavailable(detail) => {
            tracing::warn!(route, request_id, detail = %detail, "upstream unavailable")
        }
        GatewayError::UpstreamTimeout => tracing::warn!(route, request_id, "upstream timed out"),
        GatewayError::UpstreamQueueFull => tracing::warn!(route, request_id, "upstream connection queue full"),
        GatewayError::OAuth(OAuthError::Internal(detail)) => {
            tracing::error!(route, request_id, detail = %detail, "internal error")
        }
        GatewayError::OAuth(OAuthError::Unavailable(detail)) => {
            tracing::warn!(route, request_id, detail = %detail, "session store unavailable")
        }
        _ => {}
    }
}

/// A document the gateway publishes (the JWKS, the RFC 8414 metadata): GET or HEAD, cacheable
/// for five minutes (relying parties refetch a JWKS on that schedule, so a new key must be
/// published at least that long before it signs).
fn published(method: &Method, body: &Bytes) -> Result<Response<InnerBody>, GatewayError> {
    if method != Method::GET && method != Method::HEAD {
        return Err(GatewayError::ReadOnly);
    }
    let mut r = Response::new(Either::Left(Full::new(body.clone())));
    r.headers_mut()
        .insert(header::CONTENT_TYPE, HeaderValue::from_static("application/json"));
    r.headers_mut()
        .insert(header::CACHE_CONTROL, HeaderValue::from_static("max-age=300"));
    Ok(r)
}

/// Bearer → validator (cache; one JWKS refetch for another issuer's unknown key) → the route's
/// issuers → scope check, counted. Runs on every request to a protected route.
async fn authorize(
    snap: &Snapshot,
    metrics: &Metrics,
    headers: &HeaderMap,
    route: &Route,
    last: &LastToken,
) -> Result<Arc<VerifiedToken>, GatewayError> {
    let result = check_token(snap, metrics, headers, route, last).await;
    metrics.token_check(match &result {
        Ok(_) => TokenOutcome::Valid,
        Err(GatewayError::Auth(AuthError::Missing)) => TokenOutcome::Missing,
        Err(GatewayError::Auth(AuthError::InvalidToken(t))) => TokenOutcome::Invalid(*t),
        Err(GatewayError::Auth(AuthError::InsufficientScope(_))) => TokenOutcome::InsufficientScope,
        Err(_) => TokenOutcome::BadRequest,
    });
    result
}

async fn check_token(
    snap: &Snapshot,
    metrics: &Metrics,
    headers: &HeaderMap,
    route: &Route,
    last: &LastToken,
) -> Result<Arc<VerifiedToken>, GatewayError> {
    let malformed = || GatewayError::Auth(AuthError::BadRequest("malformed Bearer credentials"));
    let token = match bearer_bytes(headers) {
        Ok(Some(t)) => t,
        Ok(None) => return Err(GatewayError::Auth(AuthError::Missing)),
        Err(BearerError::Repeated) => {
            return Err(GatewayError::Auth(AuthError::BadRequest(
                "more than one Authorization header",
            )));
        }
        Err(BearerError::Malformed) => return Err(malformed()),
    };
    // The cache first (the connection's last token, then the shared cache), by the raw bytes: a
    // hit passed every check of the token's syntax.
    let (verified, cache_hit) = match snap.validator.cached_remembered(last, token) {
        Some(hit) => (hit, true),
        None => {
            let text = token_str(token).map_err(|_| malformed())?;
            // A miss: not asked of the cache again.
            let verified = snap.validator.fetching_uncached(text).await;
            if let Ok(v) = &verified {
                snap.validator.remember(last, token, v);
            }
            (verified, false)
        }
    };
    metrics.token_cache(cache_hit);
    let verified = verified.map_err(|e: InvalidToken| GatewayError::Auth(AuthError::InvalidToken(e)))?;
    if !route.issuers.accepts(verified.issuer) {
        return Err(GatewayError::Auth(AuthError::InvalidToken(
            InvalidToken::IssuerNotAccepted,
        )));
    }
    if !verified.scopes.contains_all(route.settings.scopes) {
        return Err(GatewayError::Auth(AuthError::InsufficientScope(
            route.scope_names.clone(),
        )));
    }
    Ok(verified)
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn strip_prefix_keeps_an_absolute_path() {
        assert_eq!(strip_prefix("/api/orders/7", "/api/orders"), "/7");
        assert_eq!(strip_prefix("/api/orders", "/api/orders"), "/");
        assert_eq!(strip_prefix("/api/orders/", "/api/orders"), "/");
        assert_eq!(strip_prefix("/x", "/"), "/x");
    }
}
