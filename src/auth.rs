//! Token enforcement on the request path: bearer extraction (RFC 6750), JWT validation with a cache
//! of validated tokens, and the revoked-session set that both the validator and the authorization
//! server share.

pub mod bearer;
pub mod revocation;
pub mod validator;

pub use revocation::RevokedSessions;
pub use validator::{AuthError, IssuerMask, LastToken, Validator, VerifiedToken};
