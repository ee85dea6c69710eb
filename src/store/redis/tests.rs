//! The Redis store against a real `redis-server` of the test's own (see [`super::testing`]).

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use super::testing::RedisServer;
use super::*;
use crate::config::Secret;
use crate::oauth::limiter::redis::RedisLimiter;
use crate::oauth::limiter::{Limiter, Refused};
use crate::store::Store;

/// Generous bound for conditions that should hold within milliseconds (a hang guard, not a
/// timing assertion).
const HANG_GUARD: Duration = Duration::from_secs(20);

/// A server of the test's own (a static one would outlive the test binary: statics are never
/// dropped, so its process would never be killed).
fn server() -> RedisServer {
    RedisServer::start().unwrap_or_else(|e| panic!("{e}"))
}

fn fresh_prefix() -> String {
    static N: AtomicU64 = AtomicU64::new(0);
    format!("test{}-{}:", std::process::id(), N.fetch_add(1, Ordering::Relaxed))
}

fn settings(url: &str) -> RedisSettings {
    RedisSettings {
        url: url.to_owned(),
        tls: url.starts_with("rediss://"),
        ca_file: None,
        password: None,
        key_prefix: fresh_prefix(),
    }
}

fn store_on(s: &RedisSettings, revoked: Arc<RevokedSessions>, grace_ms: u64) -> RedisStore {
    RedisStore::new(s, revoked, grace_ms).unwrap()
}

async fn wait_until(what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + HANG_GUARD;
    while !cond() {
        assert!(Instant::now() < deadline, "still waiting for: {what}");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

fn factory(url: String) -> impl Fn(Arc<RevokedSessions>, u64, crate::clock::SharedClock) -> Store + Sync {
    move |revoked, grace, _clock| Store::Redis(store_on(&settings(&url), revoked, grace))
}

#[tokio::test]
async fn the_session_lifecycle_suite_passes_on_redis() {
    let server = server();
    crate::oauth::suite::run(&factory(server.url())).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_refreshes_of_one_token_agree_on_redis() {
    let server = server();
    crate::oauth::suite::concurrent_refreshes_of_one_token_agree(&factory(server.url())).await;
}

#[tokio::test]
async fn the_shared_login_limiter_keeps_the_local_policy() {
    let server = server();
    let url = server.url();
    let stores = std::sync::Mutex::new(Vec::new());
    let limiters = std::sync::Mutex::new(Vec::<RedisLimiter>::new());
    crate::oauth::limiter::scenarios::run(
        |free_user, free_ip| {
            let store = store_on(&settings(&url), Arc::new(RevokedSessions::new()), 0);
            let l = RedisLimiter::with_policy(&store, free_user, free_ip);
            limiters.lock().unwrap().push(l.clone());
            stores.lock().unwrap().push(store);
            Limiter::Redis(l)
        },
        || async {
            let all: Vec<_> = limiters.lock().unwrap().clone();
            wait_until("dropped attempts recorded", || {
                all.iter().all(|l| l.reports_in_flight() == 0)
            })
            .await;
        },
    )
    .await;
}

#[tokio::test]
async fn two_instances_share_login_failures() {
    let server = server();
    let s = settings(&server.url());
    let (a, b) = (
        store_on(&s, Arc::new(RevokedSessions::new()), 0),
        store_on(&s, Arc::new(RevokedSessions::new()), 0),
    );
    let (la, lb) = (
        Limiter::Redis(RedisLimiter::with_policy(&a, 4, 100)),
        Limiter::Redis(RedisLimiter::with_policy(&b, 4, 100)),
    );
    let ip: std::net::IpAddr = "192.0.2.7".parse().unwrap();
    let t0 = crate::oauth::limiter::scenarios::T0;
    for l in [&la, &lb, &la, &lb] {
        l.admit(crate::oauth::limiter::scenarios::who("ann", ip), t0)
            .await
            .unwrap()
            .failed(t0)
            .await;
    }
    assert_eq!(
        lb.admit(crate::oauth::limiter::scenarios::who("ann", ip), t0)
            .await
            .err(),
        Some(Refused::Wait(1)),
        "four failures on two instances count as four"
    );
}

#[tokio::test]
async fn a_revocation_on_one_instance_reaches_the_other() {
    let server = server();
    let s = settings(&server.url());
    let (ra, rb) = (Arc::new(RevokedSessions::new()), Arc::new(RevokedSessions::new()));
    let a = store_on(&s, ra.clone(), 10_000);
    let b = store_on(&s, rb.clone(), 10_000);
    let lags = Arc::new(Lags::default());
    b.observe(lags.clone());
    a.synced(HANG_GUARD).await.unwrap();
    b.synced(HANG_GUARD).await.unwrap();
    let until = 4_000_000_000;
    a.revoke_sid(SessionId(7), until).await.unwrap();
    assert!(ra.is_revoked(SessionId(7), until), "at once where it was written");
    wait_until("B applies A's revocation", || rb.is_revoked(SessionId(7), until)).await;
    assert_eq!(b.follower().applied(), 1);
    assert_eq!(b.follower().resyncs(), 1, "the start only");
    let lag = lags.0.lock().unwrap()[0];
    println!("revocation propagation lag (store to store): {lag:?}");
}

#[derive(Default)]
struct Lags(std::sync::Mutex<Vec<Duration>>, std::sync::Mutex<Vec<bool>>);

impl StoreObserver for Lags {
    fn revocation_propagated(&self, lag: Duration) {
        self.0.lock().unwrap().push(lag);
    }
    fn availability_changed(&self, available: bool) {
        self.1.lock().unwrap().push(available);
    }
}

#[tokio::test]
async fn a_starting_instance_loads_earlier_revocations_from_the_index() {
    let server = server();
    let s = settings(&server.url());
    let a = store_on(&s, Arc::new(RevokedSessions::new()), 0);
    a.revoke_sid(SessionId(1), 4_000_000_000).await.unwrap();
    a.revoke_sid(SessionId(2), 4_000_000_000).await.unwrap();
    let rb = Arc::new(RevokedSessions::new());
    let b = store_on(&s, rb.clone(), 0);
    b.synced(HANG_GUARD).await.unwrap();
    assert!(rb.is_revoked(SessionId(1), 0) && rb.is_revoked(SessionId(2), 0));
    assert_eq!(b.follower().applied(), 0, "from the index, not the stream");
}

/// Kills every connection blocked in XREAD: the followers', not the operations'.
async fn kill_followers(url: &str) {
    let client = redis::Client::open(url).unwrap();
    let mut c = client.get_multiplexed_async_connection().await.unwrap();
    let list: String = redis::cmd("CLIENT").arg("LIST").query_async(&mut c).await.unwrap();
    for line in list.lines().filter(|l| l.contains(" cmd=xread ")) {
        let id = line.split(' ').find_map(|f| f.strip_prefix("id=")).unwrap();
        let _: i64 = redis::cmd("CLIENT")
            .arg("KILL")
            .arg("ID")
            .arg(id)
            .query_async(&mut c)
            .await
            .unwrap();
    }
}

#[tokio::test]
async fn a_follower_resumes_after_a_reconnect_and_resyncs_when_the_stream_was_trimmed() {
    let server = server();
    let s = settings(&server.url());
    let a = store_on(&s, Arc::new(RevokedSessions::new()), 0);
    let rb = Arc::new(RevokedSessions::new());
    let b = store_on(&s, rb.clone(), 0);
    b.synced(HANG_GUARD).await.unwrap();
    let until = 4_000_000_000;

    // Revocations written while B reconnects are still in the stream: B resumes from its last
    // entry and applies them, without a resync.
    a.revoke_sid(SessionId(1), until).await.unwrap();
    wait_until("B applies the first", || rb.is_revoked(SessionId(1), until)).await;
    kill_followers(&server.url()).await;
    a.revoke_sid(SessionId(2), until).await.unwrap();
    wait_until("B applies the second", || rb.is_revoked(SessionId(2), until)).await;
    assert_eq!(b.follower().resyncs(), 1, "resumed, not resynced");

    // A revocation whose stream entry is trimmed away in the same transaction: B, blocked in
    // XREAD, never sees the entry; once reconnected it finds the stream trimmed past its last
    // entry and rebuilds its set from the index.
    let client = redis::Client::open(server.url()).unwrap();
    let mut c = client.get_multiplexed_async_connection().await.unwrap();
    let sid3 = SessionId(3).encode();
    let stream = format!("{}revocations", s.key_prefix);
    let () = redis::pipe()
        .atomic()
        .cmd("ZADD")
        .arg(format!("{}revoked", s.key_prefix))
        .arg(until)
        .arg(&sid3)
        .ignore()
        .cmd("XADD")
        .arg(&stream)
        .arg("*")
        .arg("sid")
        .arg(&sid3)
        .arg("until")
        .arg(until)
        .ignore()
        .cmd("XTRIM")
        .arg(&stream)
        .arg("MAXLEN")
        .arg(0)
        .ignore()
        .query_async(&mut c)
        .await
        .unwrap();
    kill_followers(&server.url()).await;
    wait_until("B resyncs and learns the third", || rb.is_revoked(SessionId(3), until)).await;
    assert_eq!(b.follower().resyncs(), 2);
    assert_eq!(b.follower().applied(), 2, "the third came from the index");
}

fn wrong_password(s: &RedisSettings) -> RedisSettings {
    RedisSettings {
        password: Some(Secret::new(b"not-the-password".to_vec())),
        ..s.clone()
    }
}

#[tokio::test]
async fn redis_down_is_unavailable_then_recovers_without_a_restart() {
    let mut server = RedisServer::start().unwrap();
    let s = settings(&server.url());
    let revoked = Arc::new(RevokedSessions::new());
    let store = store_on(&s, revoked.clone(), 0);
    let seen = Arc::new(Lags::default());
    store.observe(seen.clone());
    store.synced(HANG_GUARD).await.unwrap();
    store.revoke_sid(SessionId(5), 4_000_000_000).await.unwrap();
    assert!(store.available());

    server.stop();
    let e = store.revoke_sid(SessionId(6), 4_000_000_000).await.unwrap_err();
    assert!(matches!(e, StoreError::Unavailable(_)), "{e:?}");
    assert!(!store.available());
    assert!(revoked.is_revoked(SessionId(5), 0), "what was known is still known");

    server.restart().unwrap();
    wait_until("available again", || store.available()).await;
    store.revoke_sid(SessionId(6), 4_000_000_000).await.unwrap();
    assert_eq!(*seen.1.lock().unwrap(), vec![true, false, true], "up, down, up again");
}

#[tokio::test]
async fn a_hung_redis_costs_a_bounded_wait_not_a_hung_request() {
    let server = RedisServer::start().unwrap();
    let s = settings(&server.url());
    let store = store_on(&s, Arc::new(RevokedSessions::new()), 0);
    store.synced(HANG_GUARD).await.unwrap();
    server.pause(true).unwrap();
    let r = tokio::time::timeout(HANG_GUARD, store.revoke_sid(SessionId(1), 1)).await;
    server.pause(false).unwrap();
    assert!(matches!(r, Ok(Err(StoreError::Unavailable(_)))), "{r:?}");
    wait_until("available again", || store.available()).await;
}

#[tokio::test]
async fn a_wrong_password_fails_the_start_with_a_reason() {
    let server = RedisServer::start_with(Some("the-password"), None).unwrap();
    let s = settings(&server.url());
    let store = store_on(&wrong_password(&s), Arc::new(RevokedSessions::new()), 0);
    let e = store.synced(Duration::from_secs(3)).await.unwrap_err().to_string();
    assert!(e.contains("could not load the revoked sessions"), "{e}");
    let good = RedisSettings {
        password: Some(Secret::new(b"the-password".to_vec())),
        ..s
    };
    store_on(&good, Arc::new(RevokedSessions::new()), 0)
        .synced(HANG_GUARD)
        .await
        .unwrap();
}

#[tokio::test]
async fn a_connection_refused_for_another_reason_than_io_is_renewed() {
    let server = RedisServer::start_with(Some("old-password"), None).unwrap();
    let s = settings(&server.url());
    let store = store_on(&wrong_password(&s), Arc::new(RevokedSessions::new()), 0);
    assert!(matches!(
        store.revoke_sid(SessionId(1), 1).await,
        Err(StoreError::Unavailable(_))
    ));
    // The operator fixes the server's side: the store gets there without a restart.
    let client = redis::Client::open(
        redis::IntoConnectionInfo::into_connection_info(server.url().as_str())
            .unwrap()
            .set_redis_settings(redis::RedisConnectionInfo::default().set_password("old-password")),
    )
    .unwrap();
    let mut c = client.get_multiplexed_async_connection().await.unwrap();
    let () = redis::cmd("CONFIG")
        .arg("SET")
        .arg("requirepass")
        .arg("not-the-password")
        .query_async(&mut c)
        .await
        .unwrap();
    store.synced(HANG_GUARD).await.unwrap();
    wait_until("available", || store.available()).await;
    store.revoke_sid(SessionId(1), 1).await.unwrap();
}

#[tokio::test]
async fn rediss_with_a_ca_file() {
    let certs = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("certs");
    let tls = super::testing::Tls {
        cert: certs.join("localhost.pem"),
        key: certs.join("localhost-key.pem"),
        ca: certs.join("ca.pem"),
    };
    let server = RedisServer::start_with(Some("tls-password"), Some(tls)).unwrap();
    let s = RedisSettings {
        ca_file: Some(certs.join("ca.pem")),
        password: Some(Secret::new(b"tls-password".to_vec())),
        ..settings(&server.url())
    };
    let revoked = Arc::new(RevokedSessions::new());
    let store = store_on(&s, revoked.clone(), 0);
    store.synced(HANG_GUARD).await.unwrap();
    store.revoke_sid(SessionId(9), 4_000_000_000).await.unwrap();
    assert!(revoked.is_revoked(SessionId(9), 0));
}

#[test]
fn keys_of_one_session_share_its_hash_tag() {
    let k = Keys { prefix: "tg:".into() };
    let sid = SessionId(42).encode();
    assert_eq!(k.session(&sid), format!("tg:s:{{{sid}}}"));
    assert_eq!(k.sealed(&sid, &[0xab; 32]), format!("tg:c:{{{sid}}}:abababababababab"));
}
