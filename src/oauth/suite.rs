//! The session-lifecycle suite, run against every store: login, rotation, the idempotent retry,
//! reuse detection, revocation, expiry, client binding, stable identities across configs. It calls
//! the authorization server directly (no socket), with a manual clock.

use std::sync::{Arc, OnceLock};
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderMap, HeaderValue, Method};
use http_body_util::Full;

use crate::auth::RevokedSessions;
use crate::clock::{ManualClock, SharedClock};
use crate::config::Config;
use crate::ids::{SessionId, parse_refresh_token};
use crate::oauth::limiter::LoginLimiter;
use crate::oauth::{OAuthError, OAuthServer};
use crate::snapshot::Snapshot;
use crate::state::State;
use crate::store::{SessionStore, Store};

/// Builds a store for a test: the revoked set it must keep, the reuse grace in milliseconds, the
/// clock. A closure, so a store can be connected to a test's own server (each store it builds must
/// start empty).
pub type StoreFactory<'a> = &'a (dyn Fn(Arc<RevokedSessions>, u64, SharedClock) -> Store + Sync);

pub const PASSWORD: &str = "suite-password";

fn password_hash() -> &'static str {
    static HASH: OnceLock<String> = OnceLock::new();
    HASH.get_or_init(|| crate::oauth::users::hash_password(PASSWORD).unwrap())
}

/// A folder holding the signing secret, written once per test process. One folder for every
/// process, not one each left behind: the secret is written under a name of the process's own and
/// renamed into place, so a test reading it (in this process or another) never sees half of it.
fn secret_dir() -> std::path::PathBuf {
    static DIR: OnceLock<std::path::PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        let dir = std::env::temp_dir().join("tokengate-suite-secret");
        std::fs::create_dir_all(&dir).unwrap();
        let partial = dir.join(format!("secret.{}", std::process::id()));
        std::fs::write(&partial, "0123456789abcdef0123456789abcdef").unwrap();
        std::fs::rename(&partial, dir.join("secret")).unwrap();
        dir
    })
    .clone()
}

/// A config with users ann and bob and clients web and mobile; `users_reversed` writes the users
/// in the opposite order (a session must not care).
pub fn config(grace: &str, users_reversed: bool, extra_tokens: &str) -> Config {
    let ann = format!(
        "[[users]]\nusername = \"ann\"\npassword_hash = \"{}\"\nscopes = [\"orders:read\", \"orders:write\"]\n",
        password_hash()
    );
    let bob = format!(
        "[[users]]\nusername = \"bob\"\npassword_hash = \"{}\"\nscopes = [\"orders:write\"]\n",
        password_hash()
    );
    let users = if users_reversed {
        format!("{bob}{ann}")
    } else {
        format!("{ann}{bob}")
    };
    let text = format!(
        r#"
[server]
listen = "127.0.0.1:0"
[tokens]
issuer = "https://suite.test"
audience = "api"
reuse_grace = "{grace}"
refresh_ttl = "1d"
session_max_lifetime = "2d"
signing = {{ secret = "file:secret" }}
{extra_tokens}
[[clients]]
id = "web"
grants = ["password", "refresh_token"]
scopes = ["orders:read", "orders:write"]
[[clients]]
id = "mobile"
grants = ["password", "refresh_token"]
scopes = ["orders:read", "orders:write"]
{users}
"#
    );
    Config::from_toml(&text, &secret_dir(), "suite.toml").unwrap_or_else(|e| panic!("{e}"))
}

pub struct Harness {
    pub snap: Snapshot,
    pub state: State,
    pub clock: Arc<ManualClock>,
}

impl Harness {
    pub fn new(make: StoreFactory<'_>, config: Config) -> Harness {
        let clock = Arc::new(ManualClock::new());
        let shared: SharedClock = clock.clone();
        let revoked = Arc::new(RevokedSessions::with_leeway(config.tokens.leeway.as_secs()));
        let store = make(
            revoked.clone(),
            config.tokens.reuse_grace.as_millis() as u64,
            shared.clone(),
        );
        let state = State {
            store,
            revoked,
            limiter: LoginLimiter::default().into(),
            passwords: Arc::new(crate::oauth::password::PasswordPool::new(2).unwrap()),
            metrics: Arc::default(),
            clock: shared,
        };
        let snap = Snapshot::build(config, 1, None, &state).unwrap();
        Harness { snap, state, clock }
    }

    pub fn with_snapshot(&mut self, config: Config) {
        let generation = self.snap.generation + 1;
        self.snap = Snapshot::build(config, generation, Some(&self.snap), &self.state).unwrap();
    }

    fn server(&self) -> OAuthServer<'_> {
        OAuthServer::new(&self.snap, &self.state)
    }

    async fn post(&self, path_is_token: bool, form: &[(&str, &str)]) -> Result<Bytes, OAuthError> {
        let body: String = form_urlencoded::Serializer::new(String::new())
            .extend_pairs(form)
            .finish();
        let mut headers = HeaderMap::new();
        headers.insert(
            http::header::CONTENT_TYPE,
            HeaderValue::from_static("application/x-www-form-urlencoded"),
        );
        let body = Full::new(Bytes::from(body));
        let peer = std::net::IpAddr::from([192, 0, 2, 1]);
        if path_is_token {
            self.server().token(&Method::POST, &headers, body, peer).await
        } else {
            self.server()
                .revoke(&Method::POST, &headers, body)
                .await
                .map(|()| Bytes::new())
        }
    }

    pub async fn login(&self, user: &str, client: &str) -> serde_json::Value {
        let r = self
            .post(
                true,
                &[
                    ("grant_type", "password"),
                    ("client_id", client),
                    ("username", user),
                    ("password", PASSWORD),
                ],
            )
            .await
            .unwrap_or_else(|e| panic!("login failed: {e:?}"));
        serde_json::from_slice(&r).unwrap()
    }

    pub async fn refresh(&self, token: &str, client: &str) -> Result<Bytes, OAuthError> {
        self.post(
            true,
            &[
                ("grant_type", "refresh_token"),
                ("client_id", client),
                ("refresh_token", token),
            ],
        )
        .await
    }

    pub async fn refresh_scope(&self, token: &str, scope: &str) -> Result<Bytes, OAuthError> {
        self.post(
            true,
            &[
                ("grant_type", "refresh_token"),
                ("client_id", "web"),
                ("refresh_token", token),
                ("scope", scope),
            ],
        )
        .await
    }

    pub async fn revoke(&self, token: &str, client: &str) -> Result<(), OAuthError> {
        self.post(false, &[("token", token), ("client_id", client)])
            .await
            .map(|_| ())
    }

    pub fn is_revoked(&self, sid: SessionId) -> bool {
        self.state.revoked.is_revoked(sid, self.clock.now_secs())
    }
}

use crate::clock::Clock;

pub fn field(body: &[u8], key: &str) -> String {
    let v: serde_json::Value = serde_json::from_slice(body).unwrap();
    v[key].as_str().unwrap_or_else(|| panic!("no {key} in {v}")).to_owned()
}

pub fn sid_of(refresh_token: &str) -> SessionId {
    parse_refresh_token(refresh_token).unwrap().0
}

fn claims(jwt: &str) -> serde_json::Value {
    use base64::Engine;
    let part = jwt.split('.').nth(1).unwrap();
    serde_json::from_slice(&base64::engine::general_purpose::URL_SAFE_NO_PAD.decode(part).unwrap()).unwrap()
}

fn is_invalid_grant(r: &Result<Bytes, OAuthError>) -> bool {
    matches!(
        r,
        Err(OAuthError::Protocol {
            code: crate::oauth::ErrorCode::InvalidGrant,
            ..
        })
    )
}

/// Runs every lifecycle test against the store `make` builds.
pub async fn run(make: StoreFactory<'_>) {
    rotation_issues_a_new_pair_and_retires_the_old(make).await;
    retry_within_grace_gets_the_identical_response(make).await;
    reuse_after_grace_revokes_the_whole_session(make).await;
    zero_grace_means_any_reuse_revokes(make).await;
    another_clients_presentation_changes_nothing(make).await;
    a_forged_token_naming_a_real_session_changes_nothing(make).await;
    refresh_tokens_expire_after_a_day_and_sessions_at_their_cap(make).await;
    a_refused_widening_changes_nothing(make).await;
    revocation_checks_the_client_and_ends_the_session(make).await;
    sessions_name_their_user_so_a_reordered_config_changes_nothing(make).await;
    a_user_removed_from_the_config_can_no_longer_refresh(make).await;
    the_session_limit_revokes_the_oldest(make).await;
    sweep_forgets_expired_sessions_and_sealed_copies(make).await;
}

async fn rotation_issues_a_new_pair_and_retires_the_old(make: StoreFactory<'_>) {
    let h = Harness::new(make, config("10s", false, ""));
    let l = h.login("ann", "web").await;
    let rt = l["refresh_token"].as_str().unwrap();
    h.clock.advance(Duration::from_secs(1));
    let r = h.refresh(rt, "web").await.unwrap();
    let rt2 = field(&r, "refresh_token");
    assert_ne!(rt2, rt);
    assert_eq!(sid_of(&rt2), sid_of(rt), "one session");
    assert_eq!(claims(&field(&r, "access_token"))["sub"], "ann");
    h.clock.advance(Duration::from_secs(1));
    assert!(h.refresh(&rt2, "web").await.is_ok());
}

async fn retry_within_grace_gets_the_identical_response(make: StoreFactory<'_>) {
    let h = Harness::new(make, config("10s", false, ""));
    let l = h.login("ann", "web").await;
    let rt = l["refresh_token"].as_str().unwrap();
    let first = h.refresh(rt, "web").await.unwrap();
    h.clock.advance(Duration::from_secs(9));
    let again = h.refresh(rt, "web").await.unwrap();
    assert_eq!(first, again, "byte-identical");
    assert!(!h.is_revoked(sid_of(rt)));
    // The token in the replayed response is the live one.
    assert!(h.refresh(&field(&first, "refresh_token"), "web").await.is_ok());
}

async fn reuse_after_grace_revokes_the_whole_session(make: StoreFactory<'_>) {
    let h = Harness::new(make, config("10s", false, ""));
    let rt1 = h.login("ann", "web").await["refresh_token"]
        .as_str()
        .unwrap()
        .to_owned();
    let rt2 = field(&h.refresh(&rt1, "web").await.unwrap(), "refresh_token");
    h.clock.advance(Duration::from_secs(1));
    let r3 = h.refresh(&rt2, "web").await.unwrap();
    let rt3 = field(&r3, "refresh_token");
    let last_exp = claims(&field(&r3, "access_token"))["exp"].as_u64().unwrap();
    h.clock.advance(Duration::from_secs(11));
    assert!(is_invalid_grant(&h.refresh(&rt1, "web").await), "reuse is refused");
    let sid = sid_of(&rt1);
    assert!(h.is_revoked(sid), "the session's access tokens are refused at once");
    assert!(
        is_invalid_grant(&h.refresh(&rt3, "web").await),
        "the newest token is dead too"
    );
    assert!(
        h.state.revoked.is_revoked(sid, last_exp),
        "until the last access token expires"
    );
    assert!(!h.state.revoked.is_revoked(sid, last_exp + 1));
}

async fn zero_grace_means_any_reuse_revokes(make: StoreFactory<'_>) {
    let h = Harness::new(make, config("0s", false, ""));
    let rt1 = h.login("ann", "web").await["refresh_token"]
        .as_str()
        .unwrap()
        .to_owned();
    let rt2 = field(&h.refresh(&rt1, "web").await.unwrap(), "refresh_token");
    assert!(is_invalid_grant(&h.refresh(&rt1, "web").await));
    assert!(is_invalid_grant(&h.refresh(&rt2, "web").await));
    assert!(h.is_revoked(sid_of(&rt1)));
}

async fn another_clients_presentation_changes_nothing(make: StoreFactory<'_>) {
    let h = Harness::new(make, config("10s", false, ""));
    let rt = h.login("ann", "web").await["refresh_token"]
        .as_str()
        .unwrap()
        .to_owned();
    assert!(is_invalid_grant(&h.refresh(&rt, "mobile").await));
    assert!(!h.is_revoked(sid_of(&rt)));
    assert!(h.refresh(&rt, "web").await.is_ok());
}

async fn a_forged_token_naming_a_real_session_changes_nothing(make: StoreFactory<'_>) {
    let h = Harness::new(make, config("10s", false, ""));
    let rt = h.login("ann", "web").await["refresh_token"]
        .as_str()
        .unwrap()
        .to_owned();
    // Someone who knows the session id (it is in every access token) but not the token.
    let forged = crate::ids::mint_refresh_token(sid_of(&rt)).unwrap().token;
    assert!(is_invalid_grant(&h.refresh(&forged, "web").await));
    h.revoke(&forged, "web").await.unwrap();
    assert!(!h.is_revoked(sid_of(&rt)));
    assert!(h.refresh(&rt, "web").await.is_ok());
}

async fn refresh_tokens_expire_after_a_day_and_sessions_at_their_cap(make: StoreFactory<'_>) {
    let h = Harness::new(make, config("10s", false, ""));
    let rt = h.login("ann", "web").await["refresh_token"]
        .as_str()
        .unwrap()
        .to_owned();
    h.clock.advance(Duration::from_secs(86_400));
    assert!(is_invalid_grant(&h.refresh(&rt, "web").await), "expired after a day");

    // Refreshing every 23 hours keeps a session only until session_max_lifetime (2 days).
    let mut rt = h.login("ann", "web").await["refresh_token"]
        .as_str()
        .unwrap()
        .to_owned();
    h.clock.advance(Duration::from_secs(23 * 3600));
    let r = h.refresh(&rt, "web").await.unwrap();
    rt = field(&r, "refresh_token");
    h.clock.advance(Duration::from_secs(23 * 3600));
    let r = h.refresh(&rt, "web").await.unwrap();
    let v: serde_json::Value = serde_json::from_slice(&r).unwrap();
    assert_eq!(v["refresh_expires_in"], 2 * 3600, "cut short by the session cap");
    h.clock.advance(Duration::from_secs(2 * 3600));
    assert!(is_invalid_grant(&h.refresh(&field(&r, "refresh_token"), "web").await));
}

async fn a_refused_widening_changes_nothing(make: StoreFactory<'_>) {
    let h = Harness::new(make, config("10s", false, ""));
    let rt = h.login("bob", "web").await["refresh_token"]
        .as_str()
        .unwrap()
        .to_owned();
    assert!(matches!(
        h.refresh_scope(&rt, "orders:read").await,
        Err(OAuthError::Protocol {
            code: crate::oauth::ErrorCode::InvalidScope,
            ..
        })
    ));
    let r = h.refresh_scope(&rt, "orders:write").await.unwrap();
    assert_eq!(field(&r, "scope"), "orders:write");
}

async fn revocation_checks_the_client_and_ends_the_session(make: StoreFactory<'_>) {
    let h = Harness::new(make, config("10s", false, ""));
    let rt = h.login("ann", "web").await["refresh_token"]
        .as_str()
        .unwrap()
        .to_owned();
    assert!(matches!(
        h.revoke(&rt, "mobile").await,
        Err(OAuthError::Protocol {
            code: crate::oauth::ErrorCode::UnauthorizedClient,
            ..
        })
    ));
    assert!(
        h.refresh(&rt, "web").await.is_ok(),
        "another client's revocation changed nothing"
    );
    let l = h.login("ann", "web").await;
    let (rt, at) = (
        l["refresh_token"].as_str().unwrap(),
        l["access_token"].as_str().unwrap(),
    );
    h.revoke(at, "web").await.unwrap();
    assert!(h.is_revoked(sid_of(rt)));
    assert!(
        is_invalid_grant(&h.refresh(rt, "web").await),
        "revoking the access token ends the session"
    );
    h.revoke("not-a-token", "web").await.unwrap();
}

async fn sessions_name_their_user_so_a_reordered_config_changes_nothing(make: StoreFactory<'_>) {
    let mut h = Harness::new(make, config("10s", false, ""));
    let rt = h.login("ann", "web").await["refresh_token"]
        .as_str()
        .unwrap()
        .to_owned();
    h.with_snapshot(config("10s", true, ""));
    let r = h.refresh(&rt, "web").await.unwrap();
    assert_eq!(claims(&field(&r, "access_token"))["sub"], "ann");
    assert_eq!(field(&r, "scope"), "orders:read orders:write");
}

async fn a_user_removed_from_the_config_can_no_longer_refresh(make: StoreFactory<'_>) {
    let mut h = Harness::new(make, config("10s", false, ""));
    let rt = h.login("ann", "web").await["refresh_token"]
        .as_str()
        .unwrap()
        .to_owned();
    let mut without_ann = config("10s", false, "");
    without_ann.users.retain(|u| u.username != "ann");
    h.with_snapshot(without_ann);
    assert!(is_invalid_grant(&h.refresh(&rt, "web").await));
}

async fn the_session_limit_revokes_the_oldest(make: StoreFactory<'_>) {
    let h = Harness::new(make, config("10s", false, "max_sessions_per_user = 2"));
    let first = h.login("ann", "web").await["refresh_token"]
        .as_str()
        .unwrap()
        .to_owned();
    h.clock.advance(Duration::from_millis(5));
    let second = h.login("ann", "web").await["refresh_token"]
        .as_str()
        .unwrap()
        .to_owned();
    h.clock.advance(Duration::from_millis(5));
    let third = h.login("ann", "web").await["refresh_token"]
        .as_str()
        .unwrap()
        .to_owned();
    assert!(h.is_revoked(sid_of(&first)));
    assert!(is_invalid_grant(&h.refresh(&first, "web").await));
    assert!(h.refresh(&second, "web").await.is_ok());
    assert!(h.refresh(&third, "web").await.is_ok());
    assert_eq!(
        h.state.store.session_count().await.unwrap(),
        3,
        "the revoked one is kept, flagged, until it expires"
    );
}

async fn sweep_forgets_expired_sessions_and_sealed_copies(make: StoreFactory<'_>) {
    let h = Harness::new(make, config("10s", false, ""));
    let rt = h.login("ann", "web").await["refresh_token"]
        .as_str()
        .unwrap()
        .to_owned();
    h.refresh(&rt, "web").await.unwrap();
    h.clock.advance(Duration::from_secs(11));
    h.state.sweep().await;
    assert_eq!(h.state.store.session_count().await.unwrap(), 1);
    h.clock.advance(Duration::from_secs(86_400));
    h.state.sweep().await;
    assert_eq!(h.state.store.session_count().await.unwrap(), 0);
}

/// Many concurrent refreshes of one token all get the one identical response.
pub async fn concurrent_refreshes_of_one_token_agree(make: StoreFactory<'_>) {
    let h = Arc::new(Harness::new(make, config("10s", false, "")));
    let rt = h.login("ann", "web").await["refresh_token"]
        .as_str()
        .unwrap()
        .to_owned();
    let tasks: Vec<_> = (0..16)
        .map(|_| {
            let h = h.clone();
            let rt = rt.clone();
            tokio::spawn(async move { h.refresh(&rt, "web").await.unwrap() })
        })
        .collect();
    let mut bodies = Vec::new();
    for t in tasks {
        bodies.push(t.await.unwrap());
    }
    assert!(bodies.windows(2).all(|w| w[0] == w[1]));
    assert!(!h.is_revoked(sid_of(&rt)));
}

fn memory(revoked: Arc<RevokedSessions>, grace_ms: u64, _clock: SharedClock) -> Store {
    Store::memory(revoked, grace_ms)
}

thread_local! {
    /// The folders [`durable`] made on this thread: a test's, since each runs on a thread of its own.
    static DURABLE_DIRS: std::cell::RefCell<Vec<std::path::PathBuf>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// Removes the folders [`durable`] made for this test (left behind when it fails, to be looked at).
fn remove_durable_dirs() {
    for dir in DURABLE_DIRS.take() {
        let _ = std::fs::remove_dir_all(dir);
    }
}

/// A durable store in a fresh folder.
pub fn durable(revoked: Arc<RevokedSessions>, grace_ms: u64, clock: SharedClock) -> Store {
    static N: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
    let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let dir = std::env::temp_dir().join(format!("tokengate-suite-durable-{}-{n}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    DURABLE_DIRS.with_borrow_mut(|dirs| dirs.push(dir.clone()));
    let opened = crate::store::DurableStore::open(&dir, revoked, grace_ms, clock, Default::default()).unwrap();
    Store::Durable(opened.store)
}

#[tokio::test]
async fn memory_store() {
    run(&memory).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn memory_store_concurrent_refreshes() {
    concurrent_refreshes_of_one_token_agree(&memory).await;
}

#[tokio::test]
async fn durable_store() {
    run(&durable).await;
    remove_durable_dirs();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn durable_store_concurrent_refreshes() {
    concurrent_refreshes_of_one_token_agree(&durable).await;
    remove_durable_dirs();
}
