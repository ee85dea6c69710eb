//! The authorization server: the token endpoint (login, refresh with rotation, client credentials),
//! RFC 7009 revocation, RFC 7662 introspection and RFC 8414 metadata. Protocol logic lives in the
//! submodules, which know nothing of sockets; `endpoint.rs` is the thin HTTP layer over them.

pub mod clients;
pub mod discovery;
pub mod endpoint;
pub mod error;
pub mod introspect;
pub mod issuer;
pub mod limiter;
pub mod password;
pub mod users;

pub use endpoint::OAuthServer;
pub use error::{ErrorCode, OAuthError};

#[cfg(test)]
pub(crate) mod suite;
