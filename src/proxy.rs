//! Forwarding to upstreams: header hygiene, the client's address behind trusted proxies, the
//! pooled client, upgraded tunnels, the built-in echo upstream.

pub mod body;
pub mod echo;
pub mod forward;
pub mod forwarded;
pub mod h1;
pub mod headers;
pub mod tunnel;

pub use forward::{ForwardError, Forwarder};
