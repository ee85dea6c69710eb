//! Applying a new config to a running gateway (SIGHUP).
//!
//! ```text
//!   tokengate.toml ──Config::load (parse + validate whole)──▶ Config ──▶ Snapshot::build
//!       invalid: nothing changes, every problem logged          │  (unchanged upstreams keep
//!                                                               │   their pools)
//!                       certificate, log level, max_connections ┴──▶ swapped in one step
//! ```
//!
//! Live: routes and upstreams, clients and secrets, users and password hashes, scopes, token
//! settings and keys, the TLS certificate (new handshakes), the log level, connection limits and
//! timeouts (new connections). Restart only: the listen addresses, `worker_threads`, TLS on or
//! off, the admin listener, the log format, the `[state]` store; a reload that changes them applies everything else,
//! keeps their running values, and names them.

use crate::config::Config;
use crate::server::Slots;
use crate::server::tls::CertResolver;
use crate::service::App;
use crate::snapshot::Snapshot;

/// What a reload did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reloaded {
    pub generation: u64,
    /// Keys whose new values need a restart; their running values were kept.
    pub restart_needed: Vec<&'static str>,
}

/// Keys only a restart applies that differ between `running` and `new`; `new` gets the running
/// values for them, so the Snapshot says what is in effect.
pub fn keep_restart_only(running: &Config, new: &mut Config) -> Vec<&'static str> {
    let mut changed = Vec::new();
    if running.server.listen != new.server.listen {
        changed.push("server.listen");
        new.server.listen = running.server.listen;
    }
    if running.server.worker_threads != new.server.worker_threads {
        changed.push("server.worker_threads");
        new.server.worker_threads = running.server.worker_threads;
    }
    if running.server.tls.is_some() != new.server.tls.is_some() {
        changed.push("server.tls");
    }
    if running.admin.listen != new.admin.listen {
        changed.push("admin.listen");
        new.admin.listen = running.admin.listen;
    }
    if !running.state.same_store(&new.state) {
        changed.push("state");
        new.state = running.state.clone();
    }
    if running.tokens.password_hash_concurrency != new.tokens.password_hash_concurrency {
        changed.push("tokens.password_hash_concurrency");
        new.tokens.password_hash_concurrency = running.tokens.password_hash_concurrency;
    }
    if running.log.format != new.log.format {
        changed.push("log.format");
        new.log.format = running.log.format;
    }
    changed
}

pub fn apply(app: &App, tls: Option<&CertResolver>, slots: &Slots, mut config: Config) -> anyhow::Result<Reloaded> {
    let running = app.snapshot();
    let restart_needed = keep_restart_only(&running.config, &mut config);
    let generation = running.generation + 1;
    let snapshot = Snapshot::build(config, generation, Some(&running), app.state())?;
    // Everything that can fail is done before anything is swapped.
    if let (Some(resolver), Some(new_tls)) = (tls, &snapshot.config.server.tls) {
        resolver.replace(new_tls)?;
    }
    // Only the running process knows when a key last signed: say so when a removal cuts tokens.
    let tokens = &snapshot.config.tokens;
    let live_ms = (tokens.access_ttl + tokens.leeway).as_millis() as u64;
    for (kid, alg) in snapshot
        .keys
        .cut_from(&running.keys, app.state().clock.now_millis(), live_ms)
    {
        tracing::warn!(
            kid,
            alg = alg.name(),
            "config reload: a removed signing key may have signed access tokens that have not expired yet; they are refused from now on (keep a retired key in tokens.previous_keys for access_ttl + leeway)"
        );
    }
    let level = snapshot.config.log.level.clone();
    let max_connections = snapshot.config.server.max_connections;
    app.install(snapshot);
    slots.resize(max_connections);
    if let Err(why) = crate::logging::set_level(&level) {
        tracing::info!(level = %level, why, "log.level not applied");
    }
    for key in &restart_needed {
        tracing::warn!(
            key,
            "config reload: this key changed but needs a restart; the running value is kept"
        );
    }
    tracing::info!(generation, "config reloaded");
    Ok(Reloaded {
        generation,
        restart_needed,
    })
}
