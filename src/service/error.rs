//! Request errors and the one function where they become responses.

use bytes::Bytes;
use http::header::{self, HeaderValue};
use http::{HeaderMap, Response, StatusCode};
use http_body_util::{Either, Full};

use crate::auth::AuthError;
use crate::oauth::OAuthError;
use crate::proxy::ForwardError;
use crate::routing::{HostError, PathError};
use crate::service::InnerBody;

/// A request that failed, tagged with whose fault it is; [`error_response`] renders it.
#[derive(Debug)]
pub enum GatewayError {
    /// 400: a path we refuse to interpret.
    BadPath(PathError),
    /// 400: no host, two hosts, or an invalid one.
    BadHost(HostError),
    /// 405: a method the gateway never forwards (TRACE, CONNECT).
    MethodNotAllowed,
    /// 405: a method other than GET or HEAD on a document the gateway publishes (JWKS, metadata).
    ReadOnly,
    /// 408: the request body stalled for `server.body_timeout`.
    BodyTimeout,
    /// 400: the request body could not be read (malformed chunked encoding).
    BadBody,
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

/// Methods a proxied route accepts (for the `Allow` header of a 405).
const ALLOWED_METHODS: &str = "GET, HEAD, POST, PUT, PATCH, DELETE, OPTIONS";

impl From<ForwardError> for GatewayError {
    fn from(e: ForwardError) -> Self {
        match e {
            ForwardError::Connect(detail) | ForwardError::Reset(detail) | ForwardError::Protocol(detail) => {
                GatewayError::UpstreamUnavailable(detail)
            }
            ForwardError::Timeout => GatewayError::UpstreamTimeout,
            ForwardError::QueueFull => GatewayError::UpstreamQueueFull,
        }
    }
}

const REALM_CHALLENGE: &str = "Bearer realm=\"tokengate\"";

/// A small JSON body (our own responses), with a final newline so curl output ends cleanly.
pub fn json_body<T: serde::Serialize>(value: &T) -> Full<Bytes> {
    let mut body = serde_json::to_vec(value).unwrap_or_default();
    body.push(b'\n');
    Full::new(Bytes::from(body))
}

pub fn json_error(status: StatusCode, error: &str, description: &str) -> Response<InnerBody> {
    #[derive(serde::Serialize)]
    struct Body<'a> {
        error: &'a str,
        error_description: &'a str,
    }
    let body = json_body(&Body {
        error,
        error_description: description,
    });
    let mut r = Response::new(Either::Left(body));
    *r.status_mut() = status;
    r.headers_mut()
        .insert(header::CONTENT_TYPE, HeaderValue::from_static("application/json"));
    r
}

pub fn no_store(headers: &mut HeaderMap) {
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
pub fn error_response(e: &GatewayError) -> Response<InnerBody> {
    match e {
        GatewayError::BadPath(p) => json_error(StatusCode::BAD_REQUEST, "invalid_request", p.describe()),
        GatewayError::BadHost(h) => json_error(StatusCode::BAD_REQUEST, "invalid_request", h.describe()),
        GatewayError::MethodNotAllowed => {
            let mut r = json_error(
                StatusCode::METHOD_NOT_ALLOWED,
                "method_not_allowed",
                "the gateway does not forward this method",
            );
            r.headers_mut()
                .insert(header::ALLOW, HeaderValue::from_static(ALLOWED_METHODS));
            r
        }
        GatewayError::ReadOnly => {
            let mut r = json_error(
                StatusCode::METHOD_NOT_ALLOWED,
                "method_not_allowed",
                "this document is read with GET",
            );
            r.headers_mut()
                .insert(header::ALLOW, HeaderValue::from_static("GET, HEAD"));
            r
        }
        GatewayError::BodyTimeout => request_timeout(),
        GatewayError::BadBody => json_error(
            StatusCode::BAD_REQUEST,
            "invalid_request",
            "the request body could not be read",
        ),
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
                OAuthError::BodyTimeout => request_timeout(),
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
                OAuthError::Unavailable(_) => {
                    let mut r = json_error(
                        StatusCode::SERVICE_UNAVAILABLE,
                        "temporarily_unavailable",
                        "the session store is unavailable; retry later",
                    );
                    r.headers_mut()
                        .insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
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
        GatewayError::UpstreamTimeout => json_error(
            StatusCode::GATEWAY_TIMEOUT,
            "gateway_timeout",
            "the upstream did not answer in time",
        ),
    }
}

fn request_timeout() -> Response<InnerBody> {
    json_error(
        StatusCode::REQUEST_TIMEOUT,
        "request_timeout",
        "the request body did not arrive in time",
    )
}
