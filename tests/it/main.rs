//! Integration tests: the real gateway in-process over real TLS, bound to port 0, in front of real
//! in-process upstreams; and the built binary as a child process where only a process shows the
//! behaviour (signals, exit codes, RSS, a blocked stdout). One binary; each file is a module.

// Test code: an unexpected Err should fail the test loudly, helpers included.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

/// Counts the bytes allocated and freed (for tests of what the gateway keeps; see
/// `server::a_parked_http11_connection_keeps_none_of_hypers_buffers`).
#[global_allocator]
pub static ALLOC: &stats_alloc::StatsAlloc<std::alloc::System> = &stats_alloc::INSTRUMENTED_SYSTEM;

mod cli;
mod config_errors;
mod crash;
mod enforcement;
mod forwarding;
mod hardening;
mod introspection;
mod issuers;
mod keys;
mod metrics;
mod multi_instance;
mod process;
mod reload;
mod server;
mod systemd;
mod token_endpoint;
mod upstream_pool;
