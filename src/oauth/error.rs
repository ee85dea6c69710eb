//! RFC 6749 §5.2 error responses of the token and revocation endpoints.

use http::StatusCode;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorCode {
    InvalidRequest,
    InvalidClient,
    InvalidGrant,
    UnauthorizedClient,
    UnsupportedGrantType,
    InvalidScope,
}

impl ErrorCode {
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorCode::InvalidRequest => "invalid_request",
            ErrorCode::InvalidClient => "invalid_client",
            ErrorCode::InvalidGrant => "invalid_grant",
            ErrorCode::UnauthorizedClient => "unauthorized_client",
            ErrorCode::UnsupportedGrantType => "unsupported_grant_type",
            ErrorCode::InvalidScope => "invalid_scope",
        }
    }

    /// §5.2: 400, except `invalid_client`, which is 401.
    pub fn status(self) -> StatusCode {
        match self {
            ErrorCode::InvalidClient => StatusCode::UNAUTHORIZED,
            ErrorCode::InvalidRequest
            | ErrorCode::InvalidGrant
            | ErrorCode::UnauthorizedClient
            | ErrorCode::UnsupportedGrantType
            | ErrorCode::InvalidScope => StatusCode::BAD_REQUEST,
        }
    }
}

/// An error of the token or revocation endpoint, as the client will see it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum OAuthError {
    /// A §5.2 error. `basic_challenge`: the client tried HTTP Basic, so a 401 carries
    /// `WWW-Authenticate: Basic`.
    Protocol {
        code: ErrorCode,
        description: String,
        basic_challenge: bool,
    },
    /// Login attempts are being slowed down: 429 with `Retry-After` (seconds).
    SlowDown { retry_after_secs: u64 },
    /// The form body is over the cap: 413.
    BodyTooLarge,
    /// The form body did not arrive within `server.body_timeout`: 408.
    BodyTimeout,
    /// Wrong method: 405 with `Allow: POST`.
    MethodNotAllowed,
    /// The session store cannot take writes now (Redis down, journal back-pressure): 503
    /// `temporarily_unavailable` with `Retry-After`. The detail is for the log only.
    Unavailable(String),
    /// A fault of ours (signing failed, a blocking task died, a disk error): 500. The detail is
    /// for the log only.
    Internal(String),
}

impl OAuthError {
    pub fn new(code: ErrorCode, description: impl Into<String>) -> Self {
        OAuthError::Protocol {
            code,
            description: description.into(),
            basic_challenge: false,
        }
    }
    pub fn invalid_request(description: impl Into<String>) -> Self {
        Self::new(ErrorCode::InvalidRequest, description)
    }
}

/// One body for every refresh-token failure (unknown, expired, revoked, reused, another client's):
/// telling them apart would help an attacker probing stolen tokens.
pub const INVALID_REFRESH_TOKEN: &str = "the refresh token is invalid, expired or revoked";
