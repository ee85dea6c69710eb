//! Following the revocation stream, so every instance refuses a revoked session's access tokens
//! from its own memory: the request path never waits on Redis.
//!
//! ```text
//!  start ─▶ resync: last id L of the stream, then every entry of the revoked index
//!        ─▶ XREAD BLOCK from L, apply each entry, L = its id ─┐ (loop)
//!  error ─▶ store reported unavailable, back off, reconnect ─▶ entries after L still in the
//!           stream? resume from L : resync
//! ```
//!
//! One script writes the index and the stream, so reading L before the index cannot miss a
//! revocation: one at or before L is in the index, one after L comes through XREAD. Pub/sub would
//! be at-most-once; a stream lets a reconnecting instance resume where it stopped, and when it was
//! trimmed past that point (its first entry is after L), the index rebuilds the set.
//!
//! XREAD BLOCK holds its connection, so it gets its own; the operations' connection is checked
//! every second by [`probe`] (a PING), which also reconnects it before a request needs it.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use redis::aio::MultiplexedConnection;
use redis::streams::{StreamId, StreamRangeReply, StreamReadReply};
use redis::{AsyncConnectionConfig, Client, FromRedisValue, Value};
use tokio::sync::watch;

use super::{Conn, OP_TIMEOUT, Part};
use crate::auth::RevokedSessions;
use crate::clock::wall_micros;
use crate::ids::SessionId;

/// How long one XREAD waits for entries before it is sent again.
const BLOCK: Duration = Duration::from_secs(1);
/// Entries applied per XREAD.
const BATCH: usize = 512;
const MIN_BACKOFF: Duration = Duration::from_millis(100);
const MAX_BACKOFF: Duration = Duration::from_secs(2);

/// The follower's counters.
#[derive(Debug, Default)]
pub struct FollowerStats {
    applied: AtomicU64,
    resyncs: AtomicU64,
    last_error: Mutex<Option<String>>,
}

impl FollowerStats {
    /// Stream entries applied.
    pub fn applied(&self) -> u64 {
        self.applied.load(Ordering::Relaxed)
    }
    /// Full reloads of the revoked set from the index (at start, and after the stream was trimmed
    /// past the last entry seen).
    pub fn resyncs(&self) -> u64 {
        self.resyncs.load(Ordering::Relaxed)
    }
    pub fn last_error(&self) -> Option<String> {
        self.last_error.lock().ok().and_then(|e| e.clone())
    }
}

/// A stream entry id.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub(super) struct EntryId(u64, u64);

impl EntryId {
    const ZERO: EntryId = EntryId(0, 0);

    pub(super) fn parse(s: &str) -> Option<EntryId> {
        let (ms, seq) = s.split_once('-')?;
        Some(EntryId(ms.parse().ok()?, seq.parse().ok()?))
    }
}

impl std::fmt::Display for EntryId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}-{}", self.0, self.1)
    }
}

/// Where the follower is; kept across reconnects.
struct Follower {
    conn: Arc<Conn>,
    revoked: Arc<RevokedSessions>,
    stats: Arc<FollowerStats>,
    /// The last entry applied (or the stream's end when the set was last rebuilt).
    last: Option<EntryId>,
}

pub(super) async fn follow(
    client: Client,
    conn: Arc<Conn>,
    revoked: Arc<RevokedSessions>,
    stats: Arc<FollowerStats>,
    mut stop: watch::Receiver<()>,
    synced: watch::Sender<bool>,
) {
    let mut f = Follower {
        conn,
        revoked,
        stats,
        last: None,
    };
    let mut backoff = MIN_BACKOFF;
    loop {
        let error = tokio::select! {
            e = f.run(&client, &synced, &mut backoff) => e,
            _ = stop.changed() => return,
        };
        if let Ok(mut last) = f.stats.last_error.lock() {
            *last = Some(error.clone());
        }
        f.conn.health.set(Part::Stream, false, &error);
        tokio::select! {
            _ = tokio::time::sleep(backoff) => {}
            _ = stop.changed() => return,
        }
        backoff = (backoff * 2).min(MAX_BACKOFF);
    }
}

/// Checks the operations' connection every second (and so reconnects it after an outage before a
/// request finds it broken). Two failed checks in a row and the connection manager is replaced:
/// redis-rs retries by itself only after I/O errors.
pub(super) async fn probe(conn: Arc<Conn>, mut stop: watch::Receiver<()>) {
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut failed = 0u32;
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = stop.changed() => return,
        }
        match conn.query::<String>(&redis::cmd("PING")).await {
            Ok(_) => failed = 0,
            Err(_) => failed += 1,
        }
        if failed >= 2 {
            failed = 0;
            if let Err(e) = conn.renew() {
                tracing::warn!(error = %e, "session store: cannot renew the Redis connection");
            }
        }
    }
}

/// Runs `cmd` on the follower's connection within `bound`.
async fn bounded<T: FromRedisValue>(
    c: &mut MultiplexedConnection,
    cmd: &redis::Cmd,
    bound: Duration,
) -> Result<T, String> {
    match tokio::time::timeout(bound, cmd.query_async(c)).await {
        Ok(Ok(v)) => Ok(v),
        Ok(Err(e)) => Err(format!("Redis: {e}")),
        Err(_) => Err(format!("Redis did not answer within {bound:?}")),
    }
}

impl Follower {
    /// Connects, catches up and follows until something fails; returns what did.
    async fn run(&mut self, client: &Client, synced: &watch::Sender<bool>, backoff: &mut Duration) -> String {
        // No response timeout on the connection: every call here carries its own bound.
        let config = AsyncConnectionConfig::new()
            .set_connection_timeout(Some(OP_TIMEOUT))
            .set_response_timeout(None);
        let mut c = match tokio::time::timeout(
            OP_TIMEOUT * 2,
            client.get_multiplexed_async_connection_with_config(&config),
        )
        .await
        {
            Ok(Ok(c)) => c,
            Ok(Err(e)) => return format!("cannot connect to Redis: {e}"),
            Err(_) => return format!("cannot connect to Redis within {:?}", OP_TIMEOUT * 2),
        };
        if let Err(e) = self.catch_up(&mut c).await {
            return e;
        }
        synced.send_replace(true);
        self.conn.health.set(Part::Stream, true, &"");
        *backoff = MIN_BACKOFF;
        let stream = self.conn.keys.stream();
        loop {
            let last = self.last.unwrap_or(EntryId::ZERO);
            let mut read = redis::cmd("XREAD");
            read.arg("COUNT")
                .arg(BATCH)
                .arg("BLOCK")
                .arg(BLOCK.as_millis() as u64)
                .arg("STREAMS")
                .arg(&stream)
                .arg(last.to_string());
            let reply: Option<StreamReadReply> = match bounded(&mut c, &read, BLOCK + OP_TIMEOUT).await {
                Ok(r) => r,
                Err(e) => return e,
            };
            for entry in reply.into_iter().flat_map(|r| r.keys).flat_map(|k| k.ids) {
                self.apply(&entry);
            }
        }
    }

    /// Resumes from the last entry if the stream still holds everything after it, else rebuilds
    /// the set from the index.
    async fn catch_up(&mut self, c: &mut MultiplexedConnection) -> Result<(), String> {
        let gap = match self.last {
            None => true,
            Some(last) => self.missed_since(c, last).await?,
        };
        if gap { self.resync(c).await } else { Ok(()) }
    }

    /// Whether entries after `last` may have been trimmed or deleted.
    async fn missed_since(&self, c: &mut MultiplexedConnection, last: EntryId) -> Result<bool, String> {
        let stream = self.conn.keys.stream();
        let exists: bool = bounded(c, redis::cmd("EXISTS").arg(&stream), OP_TIMEOUT).await?;
        if !exists {
            // Deleted, or Redis lost its data: whatever was there is gone.
            return Ok(last != EntryId::ZERO);
        }
        let info: Value = bounded(c, redis::cmd("XINFO").arg("STREAM").arg(&stream), OP_TIMEOUT).await?;
        let field = |name: &str| -> Option<Value> {
            let pairs: Vec<(Value, Value)> = match info.clone() {
                Value::Map(m) => m,
                Value::Array(a) => {
                    let mut it = a.into_iter();
                    std::iter::from_fn(|| Some((it.next()?, it.next()?))).collect()
                }
                _ => return None,
            };
            pairs
                .into_iter()
                .find(|(k, _)| String::from_redis_value(k.clone()).is_ok_and(|k| k == name))
                .map(|(_, v)| v)
        };
        let id_of = |v: Value| String::from_redis_value(v).ok().and_then(|s| EntryId::parse(&s));
        // Trimming removes the oldest entries only: if the first entry left is not after `last`,
        // nothing after `last` is gone.
        match field("first-entry") {
            Some(Value::Array(entry)) => {
                let first = entry
                    .into_iter()
                    .next()
                    .and_then(id_of)
                    .ok_or("unreadable first-entry")?;
                Ok(first > last)
            }
            // Empty: entries were added after `last` and trimmed away, or none were.
            _ => {
                let generated = field("last-generated-id")
                    .and_then(id_of)
                    .ok_or("unreadable last-generated-id")?;
                Ok(generated > last)
            }
        }
    }

    /// Rebuilds the revoked set: the stream's last id first, then the whole index (ZSCAN returns
    /// every member present for the whole scan at least once).
    async fn resync(&mut self, c: &mut MultiplexedConnection) -> Result<(), String> {
        let keys = &self.conn.keys;
        let top: StreamRangeReply = bounded(
            c,
            redis::cmd("XREVRANGE")
                .arg(keys.stream())
                .arg("+")
                .arg("-")
                .arg("COUNT")
                .arg(1),
            OP_TIMEOUT,
        )
        .await?;
        let top = match top.ids.first() {
            Some(e) => EntryId::parse(&e.id).ok_or_else(|| format!("unreadable stream id {:?}", e.id))?,
            None => EntryId::ZERO,
        };
        let index = keys.revoked();
        let mut cursor = "0".to_owned();
        loop {
            let (next, flat): (String, Vec<String>) = bounded(
                c,
                redis::cmd("ZSCAN").arg(&index).arg(&cursor).arg("COUNT").arg(1000),
                OP_TIMEOUT,
            )
            .await?;
            for pair in flat.chunks_exact(2) {
                match (SessionId::parse(&pair[0]), pair[1].parse::<f64>()) {
                    (Some(sid), Ok(until)) => self.revoked.revoke(sid, until as u64),
                    _ => tracing::warn!(entry = ?pair, "session store: ignored an unreadable revocation in Redis"),
                }
            }
            if next == "0" {
                break;
            }
            cursor = next;
        }
        self.last = Some(top);
        self.stats.resyncs.fetch_add(1, Ordering::Relaxed);
        Ok(())
    }

    fn apply(&mut self, entry: &StreamId) {
        if let Some(id) = EntryId::parse(&entry.id) {
            self.last = Some(id);
        }
        let sid = entry.get::<String>("sid").and_then(|s| SessionId::parse(&s));
        let until = entry.get::<u64>("until");
        let (Some(sid), Some(until)) = (sid, until) else {
            tracing::warn!(id = %entry.id, "session store: ignored an unreadable revocation entry");
            return;
        };
        self.revoked.revoke(sid, until);
        self.stats.applied.fetch_add(1, Ordering::Relaxed);
        if let Some(t) = entry.get::<u64>("t") {
            let lag = Duration::from_micros(wall_micros().saturating_sub(t));
            for o in self.conn.health.observers().iter() {
                o.revocation_propagated(lag);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn entry_ids_order_by_time_then_sequence() {
        let a = EntryId::parse("1700000000000-0").unwrap();
        let b = EntryId::parse("1700000000000-7").unwrap();
        let c = EntryId::parse("1700000000001-0").unwrap();
        assert!(EntryId::ZERO < a && a < b && b < c);
        assert_eq!(b.to_string(), "1700000000000-7");
        assert_eq!(EntryId::parse("x-1"), None);
        assert_eq!(EntryId::parse("17"), None);
    }
}
