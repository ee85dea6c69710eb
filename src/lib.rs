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
use crate::oauth::limiter::LoginLimiter;
use crate::server::Phase;
use crate::service::App;
use crate::snapshot::Snapshot;
use crate::state::State;
use crate::store::Store;

/// A gateway built from a validated config, not yet listening.
pub struct Gateway {
    app: Arc<App>,
}

impl Gateway {
    pub fn new(config: Config, clock: SharedClock) -> anyhow::Result<Gateway> {
        let revoked = Arc::new(RevokedSessions::with_leeway(config.tokens.leeway.as_secs()));
        let store = Store::memory(revoked.clone(), config.tokens.reuse_grace.as_millis() as u64);
        let state = Arc::new(State {
            store,
            revoked: revoked.clone(),
            limiter: LoginLimiter::default(),
            clock: clock.clone(),
        });
        let argon2_concurrency = std::thread::available_parallelism().map_or(2, |n| n.get());
        let snapshot = Snapshot::build(config, 1, None, revoked, clock, argon2_concurrency)?;
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
        let admin = tokio::spawn(server::admin_loop(admin_listener, ready.clone(), phase_rx.clone()));
        let maintenance = tokio::spawn(maintain(self.app.clone(), phase_rx));
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
            background: vec![admin, maintenance],
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
            app.state().sweep();
        }
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
        reload::apply(&self.app, self.tls.as_deref(), &self.slots, config)
    }

    /// Graceful shutdown: /readyz turns 503, the listener closes (new connections are refused),
    /// in-flight requests get up to `shutdown_grace` to finish, then everything left is closed.
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

    /// The second half: waits up to `shutdown_grace` for in-flight requests, then closes the rest.
    pub async fn finish(mut self) -> Drained {
        let drained = match tokio::time::timeout(self.grace, self.alive.recv()).await {
            Ok(_) => Drained::Cleanly,
            Err(_) => Drained::GraceExpired,
        };
        let _ = self.phase.send(Phase::Closing);
        for task in self.background.drain(..) {
            let _ = task.await;
        }
        tracing::info!(?drained, "tokengate stopped");
        drained
    }
}
