//! Upgraded connections (WebSocket tunnels): bytes copied both ways between the client and the
//! upstream once both sides have switched protocols.
//!
//! Every tunnel is registered in [`Tunnels`] for as long as it lives, with the session (`sid`) of
//! the token that opened it, so that
//! - graceful shutdown can wait for tunnels as it waits for requests (up to `shutdown_grace`),
//!   then close the rest ([`Tunnels::wait_closed`], [`Tunnels::close_all`]);
//! - a tunnel whose session is revoked is closed, not left open for as long as the client likes:
//!   [`close_revoked`] looks every half second ([`REVOCATION_CHECK`]).
//!
//! A closed tunnel shuts both sides down (TLS close_notify and FIN to the client), within
//! [`SHUTDOWN_BOUND`]; the connection slots it held are released with it.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use hyper::upgrade::OnUpgrade;
use hyper_util::rt::TokioIo;
use tokio::io::AsyncWriteExt;
use tokio::sync::{Notify, watch};

use crate::ids::SessionId;

/// How often open tunnels are checked against the revoked-session set.
pub const REVOCATION_CHECK: Duration = Duration::from_millis(500);

/// The longest a closed tunnel waits for each side's orderly shutdown.
const SHUTDOWN_BOUND: Duration = Duration::from_secs(1);

/// The open tunnels.
pub struct Tunnels {
    open: Mutex<HashMap<u64, Open>>,
    next_id: AtomicU64,
    /// How many are open, for shutdown to wait on.
    count: watch::Sender<usize>,
}

struct Open {
    sid: Option<SessionId>,
    close: Arc<Notify>,
}

impl Default for Tunnels {
    fn default() -> Self {
        Tunnels {
            open: Mutex::new(HashMap::new()),
            next_id: AtomicU64::new(0),
            count: watch::Sender::new(0),
        }
    }
}

impl Tunnels {
    pub fn new() -> Self {
        Self::default()
    }

    fn lock(&self) -> MutexGuard<'_, HashMap<u64, Open>> {
        // A panic while holding it leaves a map that is still consistent.
        self.open.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    pub fn len(&self) -> usize {
        *self.count.borrow()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Opens a tunnel between two upgrading connections in a task of its own; `sid` is the session
    /// of the token that authorized it (none on a public route); `keep` (connection slots) is held
    /// until the tunnel ends. The tunnel counts as open from this call on.
    pub fn spawn(
        self: &Arc<Self>,
        client: OnUpgrade,
        upstream: OnUpgrade,
        sid: Option<SessionId>,
        keep: impl Send + 'static,
    ) {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let close = Arc::new(Notify::new());
        self.lock().insert(
            id,
            Open {
                sid,
                close: close.clone(),
            },
        );
        self.count.send_modify(|n| *n += 1);
        let registered = Registered {
            tunnels: self.clone(),
            id,
        };
        tokio::spawn(async move {
            run(client, upstream, &close).await;
            drop((registered, keep));
        });
    }

    /// Resolves once no tunnel is open.
    pub async fn wait_closed(&self) {
        let mut count = self.count.subscribe();
        let _ = count.wait_for(|n| *n == 0).await;
    }

    /// Closes every open tunnel; returns how many were asked to.
    pub fn close_all(&self) -> usize {
        self.close_where(|_| true)
    }

    /// Closes the tunnels of sessions `revoked` says are revoked; returns how many.
    pub fn close_sessions(&self, revoked: impl Fn(SessionId) -> bool) -> usize {
        self.close_where(|sid| sid.is_some_and(&revoked))
    }

    fn close_where(&self, close: impl Fn(Option<SessionId>) -> bool) -> usize {
        let open = self.lock();
        let mut n = 0;
        for tunnel in open.values().filter(|t| close(t.sid)) {
            // A stored permit: a tunnel not yet waiting still sees it.
            tunnel.close.notify_one();
            n += 1;
        }
        n
    }
}

/// Unregisters a tunnel when its task ends, however it ends.
struct Registered {
    tunnels: Arc<Tunnels>,
    id: u64,
}

impl Drop for Registered {
    fn drop(&mut self) {
        if self.tunnels.lock().remove(&self.id).is_some() {
            self.tunnels.count.send_modify(|n| *n = n.saturating_sub(1));
        }
    }
}

/// Copies bytes both ways until either side ends or `close` is notified; then shuts both down.
async fn run(client: OnUpgrade, upstream: OnUpgrade, close: &Notify) {
    let upgraded = tokio::select! {
        pair = async { tokio::try_join!(client, upstream) } => pair,
        _ = close.notified() => return,
    };
    let (client, upstream) = match upgraded {
        Ok(pair) => pair,
        Err(e) => {
            tracing::debug!(error = %e, "upgrade failed");
            return;
        }
    };
    let mut client = TokioIo::new(client);
    let mut upstream = TokioIo::new(upstream);
    tokio::select! {
        copied = tokio::io::copy_bidirectional(&mut client, &mut upstream) => {
            if let Err(e) = copied {
                tracing::debug!(error = %e, "upgraded connection ended with an error");
            }
        }
        _ = close.notified() => {
            tracing::debug!("closing an upgraded connection");
            let _ = tokio::time::timeout(SHUTDOWN_BOUND, client.shutdown()).await;
            let _ = tokio::time::timeout(SHUTDOWN_BOUND, upstream.shutdown()).await;
        }
    }
}

/// Closes, every [`REVOCATION_CHECK`], the tunnels whose session `is_revoked` (the revoked-session
/// set, read as the validator reads it); returns when `stop` resolves.
pub async fn close_revoked(
    tunnels: Arc<Tunnels>,
    is_revoked: impl Fn(SessionId) -> bool,
    stop: impl std::future::Future<Output = ()>,
) {
    tokio::pin!(stop);
    let mut tick = tokio::time::interval(REVOCATION_CHECK);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = &mut stop => return,
        }
        if tunnels.is_empty() {
            continue;
        }
        let closed = tunnels.close_sessions(&is_revoked);
        if closed > 0 {
            tracing::info!(closed, "closed upgraded connections of revoked sessions");
        }
    }
}
