//! The State: what the gateway learns at run time and keeps across config reloads (and, with a
//! durable store, across restarts): sessions and their revocations (the store), the revoked-session
//! set the request path consults, the login limiter. It refers to users, clients and scopes by name
//! only, never by their position in a [`crate::snapshot::Snapshot`].

use std::sync::Arc;

use crate::auth::RevokedSessions;
use crate::clock::SharedClock;
use crate::metrics::Metrics;
use crate::oauth::limiter::Limiter;
use crate::oauth::password::PasswordPool;
use crate::store::{SessionStore, Store};

pub struct State {
    pub store: Store,
    /// Shared with the store (which writes it) and every Snapshot's validator (which reads it).
    pub revoked: Arc<RevokedSessions>,
    pub limiter: Limiter,
    /// The Argon2 threads login checks run on (their memory outlives every Snapshot).
    pub passwords: Arc<PasswordPool>,
    pub metrics: Arc<Metrics>,
    pub clock: SharedClock,
}

impl State {
    /// Periodic housekeeping: expired sessions, idle login counters, lapsed revocations.
    pub async fn sweep(&self) {
        let now = self.clock.now_millis();
        self.store.sweep(now).await;
        self.limiter.sweep(now);
        self.revoked.sweep(now / 1000);
    }
}
