//! The open-file limit: every client connection and every upstream connection is a file
//! descriptor, and the usual soft limit (1024) is far below what the configured bounds allow. At
//! startup the soft limit is raised to the hard limit, and a limit still below what the config
//! can use is reported, so that "Too many open files" is foreseen in the log rather than met as
//! failed accepts and 502s.

use crate::config::{Config, Upstream};

/// Descriptors beyond client and upstream connections: stdio, the listeners, the runtime's epoll
/// and wake-up descriptors, DNS look-ups, files read at run time.
pub const MARGIN: u64 = 64;

/// Descriptors the gateway may hold at once: `server.max_connections` client connections, each
/// route's `max_connections` upstream connections, and [`MARGIN`].
pub fn descriptors_needed(client_connections: usize, upstream_connections: impl IntoIterator<Item = usize>) -> u64 {
    upstream_connections
        .into_iter()
        .fold(client_connections as u64, |sum, n| sum.saturating_add(n as u64))
        .saturating_add(MARGIN)
}

/// [`descriptors_needed`] for a config; echo routes open no upstream connection.
pub fn needed_for(config: &Config) -> u64 {
    descriptors_needed(
        config.server.max_connections,
        config
            .routes
            .iter()
            .filter(|r| matches!(r.upstream, Upstream::Http { .. }))
            .map(|r| r.max_connections),
    )
}

/// Raises the soft RLIMIT_NOFILE to the hard limit and warns when the result is below what the
/// config needs. Failure to read or raise the limit is logged, never fatal.
pub fn raise_limit(config: &Config) {
    let needed = needed_for(config);
    let before = match rlimit::Resource::NOFILE.get() {
        Ok((soft, _hard)) => soft,
        Err(e) => {
            tracing::warn!(error = %e, "cannot read the open-file limit (RLIMIT_NOFILE)");
            return;
        }
    };
    let limit = match rlimit::increase_nofile_limit(u64::MAX) {
        Ok(limit) => limit,
        Err(e) => {
            tracing::warn!(error = %e, soft_limit = before, "cannot raise the open-file limit (RLIMIT_NOFILE)");
            before
        }
    };
    if limit != before {
        tracing::info!(from = before, to = limit, "raised the open-file limit (RLIMIT_NOFILE)");
    }
    if needed > limit {
        tracing::warn!(
            needed,
            limit,
            "the open-file limit is below server.max_connections + the routes' max_connections + {MARGIN}: \
             past it, accepts and upstream connects fail with \"Too many open files\"; raise the hard \
             limit (ulimit -Hn, LimitNOFILE=) or lower the connection caps"
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn needed_is_clients_plus_every_upstream_cap_plus_the_margin() {
        assert_eq!(descriptors_needed(10_000, []), 10_000 + MARGIN);
        assert_eq!(descriptors_needed(10_000, [256, 256, 8]), 10_520 + MARGIN);
        assert_eq!(descriptors_needed(usize::MAX, [usize::MAX]), u64::MAX);
    }
}
