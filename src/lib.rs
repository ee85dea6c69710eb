//! tokengate: a TLS reverse proxy that checks an OAuth 2.0 access token (a JWT) on every request
//! and is itself the authorization server that issues those tokens.
//!
//! A connection is accepted ([`server`]), TLS is terminated with rustls and the protocol chosen by
//! ALPN, and each request goes through the one service ([`service::App`]): request id, path
//! normalization and route lookup ([`routing`]), then either the gateway's own token and revocation
//! endpoints ([`oauth`]) or, for a protected route, the bearer token check ([`auth`]: a moka cache
//! of validated tokens, consulted together with the revoked-session set) and the upstream hop
//! ([`proxy`]: header hygiene, identity headers, a pooled streaming client). Because issuer and
//! enforcer share one process, a revoked or stolen session is refused on the very next request.
//! Signing and verification keys, ours and those fetched from other issuers' JWKS, are [`keys`].
//!
//! Configuration is read once, validated whole ([`config`]), and shared as one `Arc`. Time comes
//! from a [`clock::Clock`], so tests move it instead of sleeping.

pub mod auth;
pub mod certs;
pub mod clock;
pub mod config;
pub mod crypto;
pub mod ids;
pub mod keys;
pub mod logging;
pub mod metrics;
pub mod oauth;
pub mod proxy;
pub mod reload;
pub mod routing;
pub mod scope;
pub mod server;
pub mod service;
pub mod snapshot;
pub mod state;
pub mod store;

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use anyhow::Context;
use tokio::net::TcpListener;
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;

pub use clock::{Clock, ManualClock, SharedClock, SystemClock};
pub use config::Config;

use crate::auth::RevokedSessions;
use crate::oauth::limiter::redis::RedisLimiter;
use crate::oauth::limiter::{Limiter, LoginLimiter};
use crate::oauth::password::PasswordPool;
use crate::server::Phase;
use crate::service::App;
use crate::snapshot::Snapshot;
use crate::state::State;
use crate::store::{RedisStore, Store};

/// A gateway built from a validated config, not yet listening.
pub struct Gateway {
    app: Arc<App>,
}

impl Gateway {
    pub fn new(config: Config, clock: SharedClock) -> anyhow::Result<Gateway> {
        let revoked = Arc::new(RevokedSessions::with_leeway(config.tokens.leeway.as_secs()));
        let metrics = Arc::new(metrics::Metrics::new());
        metrics.config_applied(clock.now_secs());
        let grace_ms = config.tokens.reuse_grace.as_millis() as u64;
        let (store, limiter) = match &config.state {
            config::StateSettings::Memory => {
                tracing::warn!(
                    "no [state] in the config: sessions are kept in memory and will not survive a restart \
                     (every refresh token and every revocation is forgotten)"
                );
                (Store::memory(revoked.clone(), grace_ms), LoginLimiter::default().into())
            }
            config::StateSettings::Durable { path } => {
                let observed = metrics.clone();
                let options = store::journal::JournalOptions {
                    observer: Some(Arc::new(move |records, took| {
                        observed.store_batch_size.observe(records as f64);
                        observed.store_commit_duration.observe(took.as_secs_f64());
                    })),
                    ..Default::default()
                };
                let opened = store::DurableStore::open(path, revoked.clone(), grace_ms, clock.clone(), options)
                    .with_context(|| format!("state.path: cannot open the session store in {}", path.display()))?;
                for warning in opened.recovered.warnings() {
                    tracing::warn!(state = %path.display(), "{warning}");
                }
                tracing::info!(
                    state = %path.display(),
                    sessions = opened.sessions,
                    revoked = opened.revoked,
                    records_replayed = opened.recovered.records,
                    snapshot = opened.recovered.snapshot.as_ref().map_or(0, |s| s.seq.0),
                    "session store opened"
                );
                (Store::Durable(opened.store), LoginLimiter::default().into())
            }
            config::StateSettings::Redis(settings) => {
                let store = RedisStore::new(settings, revoked.clone(), grace_ms)?;
                let limiter = Limiter::Redis(RedisLimiter::new(&store));
                (Store::Redis(store), limiter)
            }
        };
        store.observe(metrics.clone());
        let passwords = Arc::new(
            PasswordPool::new(config.tokens.password_hash_concurrency)
                .context("cannot start the password-hashing threads")?,
        );
        let state = Arc::new(State {
            store,
            revoked: revoked.clone(),
            limiter,
            passwords,
            metrics,
            clock: clock.clone(),
        });
        let snapshot = Snapshot::build(config, 1, None, &state)?;
        let prefix = u32::from_le_bytes(crypto::random_bytes::<4>()?);
        let app = Arc::new(App::new(snapshot, state, prefix));
        Ok(Gateway { app })
    }

    /// The service, usable without a socket.
    pub fn app(&self) -> &Arc<App> {
        &self.app
    }

    /// Binds the listeners and starts serving.
    pub async fn start(self) -> anyhow::Result<RunningGateway> {
        // Serving API requests without the revoked-session set would accept revoked sessions.
        self.app.state().store.ready().await.context("state")?;
        let snapshot = self.app.snapshot();
        let server = &snapshot.config.server;
        let resolver = server
            .tls
            .as_ref()
            .map(server::tls::CertResolver::new)
            .transpose()
            .context("server.tls")?;
        let tls = resolver
            .clone()
            .map(server::tls::acceptor)
            .transpose()
            .context("server.tls")?;
        let listener = TcpListener::bind(server.listen)
            .await
            .with_context(|| format!("cannot listen on server.listen {}", server.listen))?;
        let admin_listener = TcpListener::bind(snapshot.config.admin.listen)
            .await
            .with_context(|| format!("cannot listen on admin.listen {}", snapshot.config.admin.listen))?;
        let addr = listener.local_addr()?;
        let admin_addr = admin_listener.local_addr()?;

        let (phase_tx, phase_rx) = watch::channel(Phase::Running);
        let (alive_tx, alive_rx) = mpsc::channel::<()>(1);
        let ready = Arc::new(AtomicBool::new(false));
        let slots = server::Slots::new(server.max_connections);
        let accept = tokio::spawn(server::accept_loop(
            listener,
            self.app.clone(),
            tls,
            slots.clone(),
            phase_rx.clone(),
            alive_tx,
        ));
        let admin = tokio::spawn(server::admin_loop(
            admin_listener,
            self.app.clone(),
            ready.clone(),
            phase_rx.clone(),
        ));
        if let Some(r) = &resolver {
            self.app.state().metrics.cert_not_after(r.not_after());
        }
        let maintenance = tokio::spawn(maintain(self.app.clone(), phase_rx.clone()));
        let tunnel_revocations = {
            let (state, mut phase) = (self.app.state().clone(), phase_rx);
            tokio::spawn(proxy::tunnel::close_revoked(
                self.app.tunnels().clone(),
                move |sid| state.revoked.is_revoked(sid, state.clock.now_secs()),
                async move { server::reached(&mut phase, Phase::Closing).await },
            ))
        };
        ready.store(true, Ordering::Release);
        let scheme = if server.tls.is_some() { "https" } else { "http" };
        tracing::info!(%addr, %admin_addr, scheme, "tokengate listening");
        Ok(RunningGateway {
            addr,
            admin_addr,
            app: self.app,
            tls: resolver,
            slots,
            phase: phase_tx,
            ready,
            alive: alive_rx,
            grace: server.shutdown_grace,
            accept: Some(accept),
            background: vec![admin, maintenance, tunnel_revocations],
        })
    }
}

/// Housekeeping: moka's pending tasks, the close of idle upstream connections past their reuse
/// time and the external issuers' due JWKS fetches every second (the first tick is at once, so
/// their keys start loading as the gateway starts, without delaying it); sweeps of expired refresh
/// state, login counters and revoked sessions every 30 seconds.
async fn maintain(app: Arc<App>, mut phase: watch::Receiver<Phase>) {
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    let mut n: u64 = 0;
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = server::reached(&mut phase, Phase::Closing) => return,
        }
        let snapshot = app.snapshot();
        snapshot.validator.run_pending_tasks();
        snapshot.validator.poll_issuers();
        snapshot.sweep_upstreams();
        drop(snapshot);
        n += 1;
        if n.is_multiple_of(30) {
            app.state().sweep().await;
            compact_if_due(&app).await;
        }
    }
}

/// Writes a new snapshot of the durable store once its log has outgrown the last one (on a
/// blocking thread: it is disk work).
async fn compact_if_due(app: &Arc<App>) {
    let Store::Durable(store) = &app.state().store else {
        return;
    };
    if !store.wants_compaction() {
        return;
    }
    let app = app.clone();
    let done = tokio::task::spawn_blocking(move || match &app.state().store {
        Store::Durable(store) => Some(store.compact()),
        _ => None,
    })
    .await;
    match done {
        Ok(Some(Ok(stats))) => tracing::info!(
            snapshot_bytes = stats.snapshot_bytes,
            segments_removed = stats.segments_removed,
            "session store compacted"
        ),
        Ok(Some(Err(e))) => tracing::warn!(error = %e, "session store compaction failed; the log keeps growing"),
        Ok(None) | Err(_) => {}
    }
}

/// A gateway that is serving.
pub struct RunningGateway {
    /// The main listener's address (port 0 in the config gets a real port here).
    pub addr: SocketAddr,
    pub admin_addr: SocketAddr,
    app: Arc<App>,
    tls: Option<Arc<server::tls::CertResolver>>,
    slots: Arc<server::Slots>,
    phase: watch::Sender<Phase>,
    ready: Arc<AtomicBool>,
    alive: mpsc::Receiver<()>,
    grace: Duration,
    accept: Option<JoinHandle<()>>,
    background: Vec<JoinHandle<()>>,
}

/// How a shutdown went.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Drained {
    /// Every in-flight request finished within the grace.
    Cleanly,
    /// The grace ran out and remaining connections were closed.
    GraceExpired,
}

impl RunningGateway {
    pub fn app(&self) -> &Arc<App> {
        &self.app
    }

    /// Applies a new, validated config without dropping anyone: the Snapshot (routes, clients,
    /// users, scopes, keys, token settings) is swapped in one step, new handshakes get the new
    /// certificate, the log level and `max_connections` follow. Sessions, connections and
    /// unchanged upstream pools are kept. Keys only a restart applies keep their running values
    /// and are named in the result. On error nothing has changed.
    pub fn reload(&self, config: Config) -> anyhow::Result<reload::Reloaded> {
        let state = self.app.state();
        let result = reload::apply(&self.app, self.tls.as_deref(), &self.slots, config);
        state.metrics.reload(result.is_ok(), state.clock.now_secs());
        if let (Ok(_), Some(r)) = (&result, &self.tls) {
            state.metrics.cert_not_after(r.not_after());
        }
        result
    }

    /// Counts a reload refused before it reached [`RunningGateway::reload`] (an invalid file).
    pub fn reload_refused(&self) {
        let state = self.app.state();
        state.metrics.reload(false, state.clock.now_secs());
    }

    /// The Argon2 pool that checks login passwords (its counters: tests and metrics).
    pub fn password_pool(&self) -> &PasswordPool {
        &self.app.state().passwords
    }

    /// Graceful shutdown: /readyz turns 503, the listener closes (new connections are refused),
    /// in-flight requests and open WebSocket tunnels get up to `shutdown_grace` to finish, then
    /// everything left is closed.
    pub async fn shutdown(mut self) -> Drained {
        self.stop_accepting().await;
        self.finish().await
    }

    /// The first half of [`RunningGateway::shutdown`]: returns once the listener is closed and
    /// every connection has been asked to finish.
    pub async fn stop_accepting(&mut self) {
        self.ready.store(false, Ordering::Release);
        let _ = self.phase.send(Phase::Draining);
        if let Some(accept) = self.accept.take() {
            let _ = accept.await;
        }
    }

    /// The second half: waits up to `shutdown_grace` for in-flight requests and open tunnels,
    /// then closes the rest.
    pub async fn finish(mut self) -> Drained {
        let tunnels = self.app.tunnels().clone();
        // Connections first: a request finishing during the drain may still open a tunnel.
        let everything = async {
            self.alive.recv().await;
            tunnels.wait_closed().await;
        };
        let drained = match tokio::time::timeout(self.grace, everything).await {
            Ok(()) => Drained::Cleanly,
            Err(_) => Drained::GraceExpired,
        };
        let _ = self.phase.send(Phase::Closing);
        let cut = tunnels.close_all();
        if cut > 0 {
            tracing::info!(tunnels = cut, "shutdown grace over: closing upgraded connections");
            // Each shuts its sides down within a bounded time; let them, before the process ends.
            let _ = tokio::time::timeout(Duration::from_secs(3), tunnels.wait_closed()).await;
        }
        for task in self.background.drain(..) {
            let _ = task.await;
        }
        tracing::info!(?drained, "tokengate stopped");
        drained
    }
}
