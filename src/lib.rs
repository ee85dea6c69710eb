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
//!
//! Configuration is read once, validated whole ([`config`]), and shared as one `Arc`. Time comes
//! from a [`clock::Clock`], so tests move it instead of sleeping.

pub mod auth;
pub mod certs;
pub mod clock;
pub mod config;
pub mod logging;
pub mod oauth;
pub mod proxy;
pub mod routing;
pub mod scope;
pub mod server;
pub mod service;

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use anyhow::Context;
use tokio::net::TcpListener;
use tokio::sync::{Semaphore, mpsc, watch};
use tokio::task::JoinHandle;

pub use clock::{Clock, ManualClock, SharedClock, SystemClock};
pub use config::Config;

use crate::auth::{RevokedSessions, Validator};
use crate::oauth::OAuthServer;
use crate::oauth::password::PasswordPool;
use crate::server::{ConnSettings, Phase};
use crate::service::App;

/// A gateway built from a validated config, not yet listening.
pub struct Gateway {
    config: Config,
    app: Arc<App>,
    passwords: Arc<PasswordPool>,
}

impl Gateway {
    pub fn new(config: Config, clock: SharedClock) -> anyhow::Result<Gateway> {
        let revoked = Arc::new(RevokedSessions::with_leeway(config.tokens.leeway.as_secs()));
        let validator = Arc::new(Validator::new(
            &config.tokens,
            config.scopes.clone(),
            revoked.clone(),
            clock.clone(),
        ));
        let passwords = Arc::new(
            PasswordPool::new(config.tokens.password_hash_concurrency)
                .context("cannot start the password-hashing threads")?,
        );
        let oauth = OAuthServer::new(
            &config,
            revoked.clone(),
            validator.clone(),
            clock.clone(),
            passwords.clone(),
        );
        let prefix = u32::from_le_bytes(
            oauth::issuer::random_bytes::<4>().map_err(|_| anyhow::anyhow!("the OS random generator failed"))?,
        );
        let app = Arc::new(App::new(&config, validator, oauth, prefix)?);
        Ok(Gateway { config, app, passwords })
    }

    /// The service, usable without a socket.
    pub fn app(&self) -> &Arc<App> {
        &self.app
    }

    /// Binds the listeners and starts serving.
    pub async fn start(self) -> anyhow::Result<RunningGateway> {
        let server = &self.config.server;
        let tls = server
            .tls
            .as_ref()
            .map(server::tls::acceptor)
            .transpose()
            .context("server.tls")?;
        let listener = TcpListener::bind(server.listen)
            .await
            .with_context(|| format!("cannot listen on server.listen {}", server.listen))?;
        let admin_listener = TcpListener::bind(self.config.admin.listen)
            .await
            .with_context(|| format!("cannot listen on admin.listen {}", self.config.admin.listen))?;
        let addr = listener.local_addr()?;
        let admin_addr = admin_listener.local_addr()?;

        let (phase_tx, phase_rx) = watch::channel(Phase::Running);
        let (alive_tx, alive_rx) = mpsc::channel::<()>(1);
        let ready = Arc::new(AtomicBool::new(false));
        let settings = ConnSettings {
            handshake_timeout: server.handshake_timeout,
            header_read_timeout: server.header_read_timeout,
        };
        let accept = tokio::spawn(server::accept_loop(
            listener,
            self.app.clone(),
            tls,
            settings,
            Arc::new(Semaphore::new(server.max_connections)),
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
            passwords: self.passwords,
            phase: phase_tx,
            ready,
            alive: alive_rx,
            grace: server.shutdown_grace,
            accept: Some(accept),
            background: vec![admin, maintenance],
        })
    }
}

/// Housekeeping: moka's pending tasks every second; sweeps of expired refresh state, login
/// counters and revoked sessions every 30 seconds.
async fn maintain(app: Arc<App>, mut phase: watch::Receiver<Phase>) {
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    let mut n: u64 = 0;
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = server::reached(&mut phase, Phase::Closing) => return,
        }
        app.validator().run_pending_tasks();
        n += 1;
        if n % 30 == 0 {
            app.oauth().sweep();
        }
    }
}

/// A gateway that is serving.
pub struct RunningGateway {
    /// The main listener's address (port 0 in the config gets a real port here).
    pub addr: SocketAddr,
    pub admin_addr: SocketAddr,
    app: Arc<App>,
    passwords: Arc<PasswordPool>,
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

    /// The Argon2 pool that checks login passwords (its counters: tests and metrics).
    pub fn password_pool(&self) -> &PasswordPool {
        &self.passwords
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
