//! Configuration: `TOML text → file structs (config/file.rs, serde) → validated Config`.
//!
//! ```text
//!   tokengate.toml ──serde (deny_unknown_fields)──▶ FileConfig ──validate()──▶ Config
//!                         first structural error          every semantic error, each
//!                         with its key path                named by key path and reason
//! ```
//!
//! Validation happens once, at load; the rest of the gateway trusts `Config`. Relative paths resolve
//! against the config file's folder, so the config works from any working directory. Secrets are
//! written as `env:NAME` or `file:PATH` and never echoed back in an error.

mod file;
mod issuers;
mod signing;

use std::collections::HashSet;
use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};

use crate::oauth::password::StoredHash;
use crate::proxy::forwarded::TrustedProxies;
use crate::routing::{self, RouteTable};
use crate::scope::{self, ScopeSet, ScopeUniverse};

pub use file::FileConfig;
pub use issuers::{IssuerSettings, MAX_ISSUERS, SELF_ISSUER, ScopeClaim, normalize_typ};
pub use signing::{KeySettings, OWN_ALGS, SigningAlg};

/// One problem found in a config: the key path and the reason.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    pub key: String,
    pub reason: String,
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.key, self.reason)
    }
}

/// Every problem found in a config. Loading fails as a whole: nothing half-applies.
#[derive(Debug, Clone)]
pub struct ConfigError {
    pub source_name: String,
    pub problems: Vec<Problem>,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let n = self.problems.len();
        write!(
            f,
            "{}: {n} error{} in config",
            self.source_name,
            if n == 1 { "" } else { "s" }
        )?;
        for p in &self.problems {
            write!(f, "\n  {p}")?;
        }
        Ok(())
    }
}

impl std::error::Error for ConfigError {}

/// A secret's bytes: zeroed when dropped (secrecy), never printed by Debug.
#[derive(Clone)]
pub struct Secret(secrecy::SecretSlice<u8>);

impl Secret {
    /// Takes the bytes and zeroes `bytes`' whole buffer, spare capacity included.
    pub fn new(mut bytes: Vec<u8>) -> Self {
        use zeroize::Zeroize;
        // An exact-size copy: `into_boxed_slice` on a Vec with spare capacity would reallocate
        // and leave the old buffer behind unzeroed.
        let secret = Secret(secrecy::SecretSlice::from(bytes.as_slice().to_vec()));
        bytes.zeroize();
        secret
    }
    pub fn expose(&self) -> &[u8] {
        use secrecy::ExposeSecret;
        self.0.expose_secret()
    }
    pub fn len(&self) -> usize {
        self.expose().len()
    }
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Secret(<{} bytes>)", self.len())
    }
}

#[derive(Debug)]
pub struct Config {
    /// The folder relative paths were resolved against.
    pub base_dir: PathBuf,
    pub server: ServerSettings,
    pub admin: AdminSettings,
    pub tokens: TokenSettings,
    pub clients: Vec<ClientSettings>,
    pub users: Vec<UserSettings>,
    pub routes: Vec<RouteSettings>,
    pub log: LogSettings,
    pub state: StateSettings,
    /// Every scope named anywhere in the config.
    pub scopes: ScopeUniverse,
    /// Identity providers whose access tokens are accepted next to ours.
    pub issuers: Vec<IssuerSettings>,
}

/// Where sessions and revocations live (`[state]`). Restart only.
#[derive(Debug, Clone)]
pub enum StateSettings {
    /// No `[state]`: in process memory, gone with the process.
    Memory,
    /// `path`: the embedded durable store in this folder.
    Durable { path: PathBuf },
    /// `redis_url`: shared by every instance through Redis.
    Redis(RedisSettings),
}

#[derive(Debug, Clone)]
pub struct RedisSettings {
    /// `redis://host:port/db` or `rediss://…`, without credentials.
    pub url: String,
    pub tls: bool,
    /// Trust anchors for `rediss://` (else the system roots).
    pub ca_file: Option<PathBuf>,
    pub password: Option<Secret>,
    /// Prefix of every key tokengate writes (default `tokengate:`).
    pub key_prefix: String,
}

impl StateSettings {
    /// Whether two settings name the same store (a reload cannot move state).
    pub fn same_store(&self, other: &StateSettings) -> bool {
        match (self, other) {
            (StateSettings::Memory, StateSettings::Memory) => true,
            (StateSettings::Durable { path: a }, StateSettings::Durable { path: b }) => a == b,
            (StateSettings::Redis(a), StateSettings::Redis(b)) => {
                a.url == b.url
                    && a.ca_file == b.ca_file
                    && a.key_prefix == b.key_prefix
                    && a.password.as_ref().map(Secret::expose) == b.password.as_ref().map(Secret::expose)
            }
            _ => false,
        }
    }
}

#[derive(Debug)]
pub struct ServerSettings {
    pub listen: SocketAddr,
    pub tls: Option<TlsSettings>,
    pub handshake_timeout: Duration,
    /// A request head, from its first byte to its last; a new connection's first request, from
    /// the handshake.
    pub header_read_timeout: Duration,
    /// A connection with no request in flight and no byte of a new one (HTTP/1.1 keep-alive,
    /// HTTP/2 between requests) is closed after this long.
    pub idle_timeout: Duration,
    /// An HTTP/1.1 keep-alive connection with nothing in flight for this long releases its HTTP
    /// state (hyper's read and write buffers, the request's room) until the client sends again.
    pub park_idle_after: Duration,
    /// The longest wait for the next bytes of a request body (nginx `client_body_timeout`).
    pub body_timeout: Duration,
    /// A client that takes none of the bytes written to it for this long has its connection
    /// dropped (nginx `send_timeout`).
    pub send_timeout: Duration,
    /// Cap on a request head (HTTP/1.1) or header list (HTTP/2): 431 beyond it.
    pub max_header_bytes: usize,
    pub max_connections: usize,
    pub shutdown_grace: Duration,
    /// `None`: one per core.
    pub worker_threads: Option<usize>,
    /// Peers whose `X-Forwarded-For` names the client (load balancers in front of the gateway).
    pub trusted_proxies: TrustedProxies,
}

pub struct TlsSettings {
    pub cert_path: PathBuf,
    pub key_path: PathBuf,
    pub cert_chain: Vec<CertificateDer<'static>>,
    pub key: PrivateKeyDer<'static>,
}

impl fmt::Debug for TlsSettings {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TlsSettings")
            .field("cert_path", &self.cert_path)
            .field("key_path", &self.key_path)
            .finish_non_exhaustive()
    }
}

#[derive(Debug)]
pub struct AdminSettings {
    pub listen: SocketAddr,
}

#[derive(Debug)]
pub struct TokenSettings {
    pub issuer: String,
    pub audience: String,
    pub access_ttl: Duration,
    pub refresh_ttl: Duration,
    pub session_max_lifetime: Duration,
    pub reuse_grace: Duration,
    pub leeway: Duration,
    pub cache_capacity: u64,
    /// Threads checking passwords (Argon2) at once; each keeps its Argon2 memory (19 MiB with
    /// default parameters).
    pub password_hash_concurrency: usize,
    pub token_path: String,
    pub revoke_path: String,
    /// RFC 7662 token introspection.
    pub introspect_path: String,
    /// Live sessions one user may hold; a login beyond it revokes the oldest.
    pub max_sessions_per_user: usize,
    /// The key that signs new access tokens.
    pub signing: KeySettings,
    /// Retired keys: they verify the tokens they signed (and are published), never sign.
    pub previous_keys: Vec<KeySettings>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum GrantType {
    Password,
    RefreshToken,
    ClientCredentials,
}

impl GrantType {
    pub fn as_str(self) -> &'static str {
        match self {
            GrantType::Password => "password",
            GrantType::RefreshToken => "refresh_token",
            GrantType::ClientCredentials => "client_credentials",
        }
    }

    pub fn parse(s: &str) -> Option<GrantType> {
        match s {
            "password" => Some(GrantType::Password),
            "refresh_token" => Some(GrantType::RefreshToken),
            "client_credentials" => Some(GrantType::ClientCredentials),
            _ => None,
        }
    }
}

#[derive(Debug, Clone)]
pub struct ClientSettings {
    pub id: String,
    /// SHA-256 of the client secret; `None` for a public client.
    pub secret_sha256: Option<[u8; 32]>,
    pub grants: Vec<GrantType>,
    pub scopes: ScopeSet,
}

#[derive(Debug, Clone)]
pub struct UserSettings {
    pub username: String,
    /// Argon2id PHC string.
    pub password_hash: String,
    pub scopes: ScopeSet,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AuthPolicy {
    Required,
    None,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Upstream {
    /// The built-in upstream that answers with what it received.
    Echo,
    Http {
        /// `http` or `https`.
        https: bool,
        /// `host[:port]` as written.
        authority: String,
        /// Path prefix of the upstream URL without a trailing slash ("" for none).
        base_path: String,
    },
}

#[derive(Debug, Clone)]
pub struct RouteSettings {
    /// Canonical prefix (normalized, no trailing slash except `/`).
    pub path_prefix: String,
    pub host: Option<String>,
    pub upstream: Upstream,
    pub auth: AuthPolicy,
    pub scopes: ScopeSet,
    pub strip_prefix: bool,
    pub forward_authorization: bool,
    pub preserve_host: bool,
    pub connect_timeout: Duration,
    pub timeout: Duration,
    /// Extra trust anchors for an https upstream (else the system roots).
    pub ca_file: Option<PathBuf>,
    /// Protocols an `Upgrade` request may switch to (lower-case); `h2c` never.
    pub upgrades: Vec<String>,
    /// Connections to the upstream that may exist at once (idle or busy); as many requests again
    /// may wait for one.
    pub max_connections: usize,
    /// An idle upstream connection is not reused after this long (nor past the upstream's own
    /// `Keep-Alive: timeout`), and is closed.
    pub idle_timeout: Duration,
    /// The issuers whose tokens the route accepts (`"self"` is ours); `None`: all of them.
    pub issuers: Option<Vec<String>>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogFormat {
    Text,
    Json,
}

#[derive(Debug, Clone)]
pub struct LogSettings {
    pub format: LogFormat,
    /// A tracing filter directive ("info", "warn,tokengate::access=off"); RUST_LOG wins when set.
    pub level: String,
}

/// hyper's HTTP/1.1 read buffer cannot be smaller than 8 KiB.
pub const MIN_HEADER_BYTES: usize = 8 * 1024;
pub const MAX_HEADER_BYTES: usize = 1024 * 1024;

pub const DEFAULT_TOKEN_PATH: &str = "/api/oauth2/token";
pub const DEFAULT_REVOKE_PATH: &str = "/api/oauth2/revoke";
/// How long a client connection may wait for its next request: nginx's keepalive_timeout is
/// 75s, browsers keep an idle connection about 60s-300s.
pub const DEFAULT_IDLE_TIMEOUT: Duration = Duration::from_secs(60);
pub const DEFAULT_INTROSPECT_PATH: &str = "/api/oauth2/introspect";
/// RFC 8414 §3 metadata and the JWKS its `jwks_uri` names: served by the gateway, never routed.
pub const METADATA_PATH: &str = "/.well-known/oauth-authorization-server";
pub const JWKS_PATH: &str = "/.well-known/jwks.json";
pub const DEFAULT_UPSTREAM_MAX_CONNECTIONS: usize = 256;
const MAX_UPSTREAM_CONNECTIONS: usize = 1_000_000;
/// Below the 5 s that common application servers (uvicorn, gunicorn, Node) keep an idle
/// connection, so the gateway stops reusing one before the upstream closes it.
pub const DEFAULT_UPSTREAM_IDLE_TIMEOUT: Duration = Duration::from_secs(4);
/// Past this, `tokens.password_hash_concurrency` is a typo, not a machine.
pub const MAX_PASSWORD_HASH_CONCURRENCY: usize = 1024;

/// The longest duration a key accepts: past 10 years a value is a typo, and later arithmetic stays
/// far from overflow.
const MAX_DURATION: Duration = Duration::from_secs(10 * 365 * 86_400);

/// Parses a duration: a number and a unit, or several ("250ms", "90s", "15m", "1h30m", "1.5s",
/// "2d"), by humantime's rules, at most 10 years, in whole milliseconds.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let d = humantime::parse_duration(s.trim()).map_err(|e| {
        format!("{s:?} is not a duration ({e}; e.g. \"250ms\", \"90s\", \"15m\", \"1h30m\", \"1.5s\", \"2d\")")
    })?;
    // humantime's "M" is a month: "5M" meant as minutes would silently be 152 days.
    if s.contains('M') {
        return Err(format!(
            "{s:?}: \"M\" means months; write days (\"30d\"), or \"m\" for minutes"
        ));
    }
    if d > MAX_DURATION {
        return Err(format!("{s:?} is too long (at most 3650d)"));
    }
    // Every clock and deadline in the gateway counts milliseconds.
    if d.subsec_nanos() % 1_000_000 != 0 {
        return Err(format!("{s:?} is finer than a millisecond"));
    }
    Ok(d)
}

impl Config {
    /// Reads and validates a config file.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let source_name = path.display().to_string();
        let text = std::fs::read_to_string(path).map_err(|e| ConfigError {
            source_name: source_name.clone(),
            problems: vec![Problem {
                key: "(file)".into(),
                reason: format!("cannot read: {e}"),
            }],
        })?;
        let base_dir = path.parent().map(Path::to_path_buf).unwrap_or_default();
        let base_dir = if base_dir.as_os_str().is_empty() {
            PathBuf::from(".")
        } else {
            base_dir
        };
        Config::from_toml(&text, &base_dir, &source_name)
    }

    /// Parses and validates TOML text; relative paths resolve against `base_dir`.
    pub fn from_toml(text: &str, base_dir: &Path, source_name: &str) -> Result<Config, ConfigError> {
        let fail = |problems| ConfigError {
            source_name: source_name.to_owned(),
            problems,
        };
        let file = read_file(text).map_err(fail)?;
        validate(file, base_dir).map_err(fail)
    }

    /// A short human summary for `tokengate check`.
    pub fn summary(&self) -> String {
        let scheme = if self.server.tls.is_some() { "https" } else { "http" };
        format!(
            "listen {scheme}://{} (admin http://{}); {} route{}, {} client{}, {} user{}",
            self.server.listen,
            self.admin.listen,
            self.routes.len(),
            plural(self.routes.len()),
            self.clients.len(),
            plural(self.clients.len()),
            self.users.len(),
            plural(self.users.len()),
        )
    }
}

fn plural(n: usize) -> &'static str {
    if n == 1 { "" } else { "s" }
}

/// Parses the TOML text into the file structs, with every syntax error, or every structural error
/// (an unknown key, a value of the wrong type) serde's derive lets through one by one: after each,
/// the offending key is removed and the document read again. A required key cannot be removed, so
/// the search stops at one that is missing or mistyped. Problems come in the file's order, each
/// with its line and column.
fn read_file(text: &str) -> Result<FileConfig, Vec<Problem>> {
    /// More rounds than any real file has problems; a bound, not a budget.
    const MAX_ROUNDS: usize = 100;
    let (root, syntax) = toml::de::DeTable::parse_recoverable(text);
    if !syntax.is_empty() {
        let mut syntax = syntax;
        syntax.sort_by_key(|e| e.span().map_or(usize::MAX, |s| s.start));
        return Err(syntax
            .iter()
            .map(|e| Problem {
                key: "(syntax)".into(),
                reason: located(text, e),
            })
            .collect());
    }
    let span = root.span();
    let mut root = toml::de::DeValue::Table(root.into_inner());
    let mut found: Vec<(usize, Problem)> = Vec::new();
    let mut removed: Vec<String> = Vec::new();
    for _ in 0..MAX_ROUNDS {
        let toml::de::DeValue::Table(table) = &root else { break };
        let de = toml::de::Deserializer::from(toml::Spanned::new(span.clone(), table.clone()));
        let e = match serde_path_to_error::deserialize::<_, FileConfig>(de) {
            Ok(file) if found.is_empty() => return Ok(file),
            Ok(_) => break,
            Err(e) => e,
        };
        let path = e.path().to_string();
        // A required key removed by an earlier round: the real problem is already reported.
        let missing = e
            .inner()
            .message()
            .strip_prefix("missing field `")
            .and_then(|m| m.strip_suffix('`'));
        if let Some(field) = missing {
            let full = if path == "." {
                field.to_owned()
            } else {
                format!("{path}.{field}")
            };
            if removed.contains(&full) {
                break;
            }
        }
        found.push((
            e.inner().span().map_or(usize::MAX, |s| s.start),
            Problem {
                key: if path == "." { "(top level)".to_owned() } else { path },
                reason: located(text, e.inner()),
            },
        ));
        match remove_key(&mut root, e.path()) {
            Some(key) => removed.push(key),
            None => break,
        }
    }
    found.sort_by_key(|(at, _)| *at);
    Err(found.into_iter().map(|(_, p)| p).collect())
}

/// Removes the innermost table key on `path` (an array element is never removed alone: the
/// indexes after it would shift); returns that key's path, `None` if there is none to remove.
fn remove_key(root: &mut toml::de::DeValue<'_>, path: &serde_path_to_error::Path) -> Option<String> {
    use serde_path_to_error::Segment;
    let segments: Vec<&Segment> = path.iter().collect();
    let last_key = segments.iter().rposition(|s| matches!(s, Segment::Map { .. }))?;
    let mut at = root;
    for segment in &segments[..last_key] {
        at = match (segment, at) {
            (Segment::Map { key }, toml::de::DeValue::Table(t)) => t.get_mut(key.as_str())?.get_mut(),
            (Segment::Seq { index }, toml::de::DeValue::Array(a)) => a.get_mut(*index)?.get_mut(),
            _ => return None,
        };
    }
    let (Segment::Map { key }, toml::de::DeValue::Table(t)) = (segments[last_key], at) else {
        return None;
    };
    t.remove(key.as_str())?;
    let mut removed = String::new();
    for (i, segment) in segments[..=last_key].iter().enumerate() {
        match segment {
            Segment::Map { key } if i == 0 => removed.push_str(key),
            Segment::Map { key } => {
                removed.push('.');
                removed.push_str(key);
            }
            Segment::Seq { index } => removed.push_str(&format!("[{index}]")),
            _ => removed.push('?'),
        }
    }
    Some(removed)
}

/// toml's message, on one line, with where in the text it points (line and column from 1).
fn located(text: &str, e: &toml::de::Error) -> String {
    let msg = e.message().trim().replace('\n', " ");
    match e.span() {
        Some(span) => {
            let (line, column) = line_column(text, span.start);
            format!("{msg} (at line {line}, column {column})")
        }
        None => msg,
    }
}

/// 1-based line and column (in characters) of byte offset `at`.
fn line_column(text: &str, at: usize) -> (usize, usize) {
    let before = text.get(..at.min(text.len())).unwrap_or(text);
    let line = before.matches('\n').count() + 1;
    let column = before.rsplit('\n').next().map_or(0, |l| l.chars().count()) + 1;
    (line, column)
}

/// Collects problems while validating, so that one run reports them all.
struct Checker<'a> {
    base_dir: &'a Path,
    problems: Vec<Problem>,
}

impl Checker<'_> {
    fn fail(&mut self, key: impl Into<String>, reason: impl Into<String>) {
        self.problems.push(Problem {
            key: key.into(),
            reason: reason.into(),
        });
    }

    fn duration(&mut self, key: &str, value: Option<&str>, default: Duration) -> Duration {
        match value.map(parse_duration) {
            None => default,
            Some(Ok(d)) => d,
            Some(Err(reason)) => {
                self.fail(key, reason);
                default
            }
        }
    }

    fn addr(&mut self, key: &str, value: &str) -> Option<SocketAddr> {
        match value.parse::<SocketAddr>() {
            Ok(a) => Some(a),
            Err(_) => {
                self.fail(
                    key,
                    format!("{value:?} is not an IP:port address (e.g. \"127.0.0.1:8443\" or \"[::1]:8443\")"),
                );
                None
            }
        }
    }

    fn path(&self, value: &str) -> PathBuf {
        let p = Path::new(value);
        if p.is_absolute() {
            p.to_path_buf()
        } else {
            self.base_dir.join(p)
        }
    }

    fn positive(&mut self, key: &str, value: Option<i64>, default: u64) -> u64 {
        match value {
            None => default,
            Some(v) if v >= 1 => v as u64,
            Some(v) => {
                self.fail(key, format!("{v} must be at least 1"));
                default
            }
        }
    }

    fn secret(&mut self, key: &str, value: &str) -> Option<Secret> {
        if let Some(name) = value.strip_prefix("env:") {
            match std::env::var_os(name) {
                Some(v) if !v.is_empty() => Some(Secret::new(v.into_encoded_bytes())),
                _ => {
                    self.fail(key, format!("environment variable {name} is not set"));
                    None
                }
            }
        } else if let Some(rel) = value.strip_prefix("file:") {
            let path = self.path(rel);
            match std::fs::read(&path) {
                Ok(mut bytes) => {
                    // Editors add a final newline; it is not part of the secret.
                    while bytes.last().is_some_and(|b| b.is_ascii_whitespace()) {
                        bytes.pop();
                    }
                    Some(Secret::new(bytes))
                }
                Err(e) => {
                    self.fail(key, format!("cannot read secret file {}: {e}", path.display()));
                    None
                }
            }
        } else {
            // Never echo the value: it may be a secret pasted in by mistake.
            self.fail(
                key,
                "must be \"env:NAME\" or \"file:PATH\" (secrets are never written inline)",
            );
            None
        }
    }

    fn scopes(&mut self, key: &str, names: &[String], universe: &ScopeUniverse) -> ScopeSet {
        for (i, name) in names.iter().enumerate() {
            if !scope::is_scope_token(name) {
                self.fail(
                    format!("{key}[{i}]"),
                    format!("{name:?} is not a valid scope (RFC 6749 §3.3)"),
                );
            }
        }
        universe.set_of(names.iter().map(String::as_str)).unwrap_or_default()
    }
}

fn validate(file: FileConfig, base_dir: &Path) -> Result<Config, Vec<Problem>> {
    let mut c = Checker {
        base_dir,
        problems: Vec::new(),
    };

    // [server]
    let s = &file.server;
    let listen = c.addr("server.listen", &s.listen);
    let tls = s.tls.as_ref().and_then(|t| load_tls(&mut c, t));
    let handshake_timeout = c.duration(
        "server.handshake_timeout",
        s.handshake_timeout.as_deref(),
        Duration::from_secs(10),
    );
    let header_read_timeout = c.duration(
        "server.header_read_timeout",
        s.header_read_timeout.as_deref(),
        Duration::from_secs(10),
    );
    let idle_timeout = c.duration("server.idle_timeout", s.idle_timeout.as_deref(), DEFAULT_IDLE_TIMEOUT);
    let park_idle_after = c.duration(
        "server.park_idle_after",
        s.park_idle_after.as_deref(),
        Duration::from_secs(1),
    );
    let body_timeout = c.duration(
        "server.body_timeout",
        s.body_timeout.as_deref(),
        Duration::from_secs(30),
    );
    let send_timeout = c.duration(
        "server.send_timeout",
        s.send_timeout.as_deref(),
        Duration::from_secs(60),
    );
    let max_header_bytes = c.positive("server.max_header_bytes", s.max_header_bytes, 32 * 1024) as usize;
    if !(MIN_HEADER_BYTES..=MAX_HEADER_BYTES).contains(&max_header_bytes) {
        c.fail(
            "server.max_header_bytes",
            format!("{max_header_bytes} must be between {MIN_HEADER_BYTES} and {MAX_HEADER_BYTES}"),
        );
    }
    for (key, d) in [
        ("server.handshake_timeout", handshake_timeout),
        ("server.header_read_timeout", header_read_timeout),
        ("server.idle_timeout", idle_timeout),
        ("server.park_idle_after", park_idle_after),
        ("server.body_timeout", body_timeout),
        ("server.send_timeout", send_timeout),
    ] {
        if d.is_zero() {
            c.fail(key, "must be more than 0s");
        }
    }
    let max_connections = c.positive("server.max_connections", s.max_connections, 10_000) as usize;
    let shutdown_grace = c.duration(
        "server.shutdown_grace",
        s.shutdown_grace.as_deref(),
        Duration::from_secs(30),
    );
    let worker_threads = s
        .worker_threads
        .map(|_| c.positive("server.worker_threads", s.worker_threads, 1) as usize);
    let trusted_proxies = trusted_proxies(&mut c, s.trusted_proxies.as_deref().unwrap_or_default());

    // [admin]
    let admin_listen = c.addr("admin.listen", file.admin.listen.as_deref().unwrap_or("127.0.0.1:9901"));

    // [tokens]
    let t = &file.tokens;
    if let Err(reason) = check_issuer_url(&t.issuer) {
        c.fail("tokens.issuer", reason);
    }
    if t.audience.trim().is_empty() {
        c.fail("tokens.audience", "must not be empty");
    }
    let access_ttl = c.duration("tokens.access_ttl", t.access_ttl.as_deref(), Duration::from_secs(900));
    let refresh_ttl = c.duration(
        "tokens.refresh_ttl",
        t.refresh_ttl.as_deref(),
        Duration::from_secs(86_400),
    );
    let session_max_lifetime = c.duration(
        "tokens.session_max_lifetime",
        t.session_max_lifetime.as_deref(),
        Duration::from_secs(30 * 86_400),
    );
    let reuse_grace = c.duration("tokens.reuse_grace", t.reuse_grace.as_deref(), Duration::from_secs(10));
    let leeway = c.duration("tokens.leeway", t.leeway.as_deref(), Duration::ZERO);
    for (key, d) in [
        ("tokens.access_ttl", access_ttl),
        ("tokens.refresh_ttl", refresh_ttl),
        ("tokens.session_max_lifetime", session_max_lifetime),
    ] {
        if d < Duration::from_secs(1) {
            c.fail(key, "must be at least 1s");
        }
    }
    if leeway > Duration::from_secs(300) {
        c.fail("tokens.leeway", "must be at most 5m (it extends every token's life)");
    }
    if reuse_grace >= refresh_ttl {
        c.fail("tokens.reuse_grace", "must be shorter than tokens.refresh_ttl");
    }
    let cache_capacity = c.positive("tokens.cache_capacity", t.cache_capacity, 100_000);
    let max_sessions_per_user = c.positive("tokens.max_sessions_per_user", t.max_sessions_per_user, 100) as usize;
    let cores = std::thread::available_parallelism().map_or(2, |n| n.get());
    let password_hash_concurrency = c.positive(
        "tokens.password_hash_concurrency",
        t.password_hash_concurrency,
        cores as u64,
    ) as usize;
    if password_hash_concurrency > MAX_PASSWORD_HASH_CONCURRENCY {
        c.fail(
            "tokens.password_hash_concurrency",
            format!(
                "{password_hash_concurrency} must be at most {MAX_PASSWORD_HASH_CONCURRENCY} \
                 (each thread keeps up to 64 MiB of Argon2 memory)"
            ),
        );
    }
    let token_path = own_path(&mut c, "tokens.token_path", t.token_path.as_deref(), DEFAULT_TOKEN_PATH);
    let revoke_path = own_path(
        &mut c,
        "tokens.revoke_path",
        t.revoke_path.as_deref(),
        DEFAULT_REVOKE_PATH,
    );
    if token_path == revoke_path {
        c.fail("tokens.revoke_path", "must differ from tokens.token_path");
    }
    let introspect_path = own_path(
        &mut c,
        "tokens.introspect_path",
        t.introspect_path.as_deref(),
        DEFAULT_INTROSPECT_PATH,
    );
    if introspect_path == token_path || introspect_path == revoke_path {
        c.fail(
            "tokens.introspect_path",
            "must differ from tokens.token_path and tokens.revoke_path",
        );
    }
    let signing = signing::key_settings(&mut c, "tokens.signing", &t.signing);
    let previous_keys: Vec<KeySettings> = t
        .previous_keys
        .iter()
        .enumerate()
        .filter_map(|(i, k)| signing::key_settings(&mut c, &format!("tokens.previous_keys[{i}]"), k))
        .collect();
    // Only when every entry parsed, so the index is the file's.
    if let Some(active) = &signing
        && previous_keys.len() == t.previous_keys.len()
        && let Err((i, reason)) = crate::keys::check_distinct(active, &previous_keys)
    {
        c.fail(format!("tokens.previous_keys[{i}]"), reason);
    }
    let issuers = issuers::issuers(&mut c, &file.issuers, &t.issuer);

    // The scope universe: every scope named anywhere.
    let mut universe = ScopeUniverse::default();
    let all_scope_names = file
        .clients
        .iter()
        .flat_map(|x| &x.scopes)
        .chain(file.users.iter().flat_map(|x| &x.scopes))
        .chain(file.routes.iter().flat_map(|x| &x.scopes));
    for name in all_scope_names {
        if !universe.add(name) {
            c.fail(
                "(scopes)",
                format!("more than {} distinct scopes in one config", scope::MAX_SCOPES),
            );
            break;
        }
    }

    // [[clients]]
    let mut clients = Vec::new();
    let mut seen = HashSet::new();
    for (i, f) in file.clients.iter().enumerate() {
        let key = format!("clients[{i}]");
        if let Err(reason) = check_name(&f.id, true) {
            c.fail(format!("{key}.id"), reason);
        } else if !seen.insert(f.id.as_str()) {
            c.fail(format!("{key}.id"), format!("{:?} is defined twice", f.id));
        }
        let secret_sha256 = f.secret_sha256.as_deref().and_then(|h| match decode_hex32(h) {
            Some(d) => Some(d),
            None => {
                c.fail(
                    format!("{key}.secret_sha256"),
                    "must be 64 hex digits (the SHA-256 of the client secret)",
                );
                None
            }
        });
        let mut grants = Vec::new();
        for (j, g) in f.grants.iter().enumerate() {
            match GrantType::parse(g) {
                Some(g) => grants.push(g),
                None => c.fail(
                    format!("{key}.grants[{j}]"),
                    format!("{g:?} is not a grant type (password, refresh_token, client_credentials)"),
                ),
            }
        }
        if grants.is_empty() {
            c.fail(format!("{key}.grants"), "must list at least one grant type");
        }
        if grants.contains(&GrantType::ClientCredentials) && f.secret_sha256.is_none() {
            c.fail(
                format!("{key}.grants"),
                "client_credentials needs a confidential client (set secret_sha256)",
            );
        }
        let scopes = c.scopes(&format!("{key}.scopes"), &f.scopes, &universe);
        clients.push(ClientSettings {
            id: f.id.clone(),
            secret_sha256,
            grants,
            scopes,
        });
    }

    // [[users]]
    let mut users = Vec::new();
    let mut seen = HashSet::new();
    for (i, f) in file.users.iter().enumerate() {
        let key = format!("users[{i}]");
        if let Err(reason) = check_name(&f.username, false) {
            c.fail(format!("{key}.username"), reason);
        } else if !seen.insert(f.username.as_str()) {
            c.fail(format!("{key}.username"), format!("{:?} is defined twice", f.username));
        }
        // The same decoding the Argon2 pool does: a hash accepted here is one it can check, within
        // its memory cap.
        if let Err(e) = StoredHash::parse(&f.password_hash) {
            c.fail(format!("{key}.password_hash"), e.to_string());
        }
        let scopes = c.scopes(&format!("{key}.scopes"), &f.scopes, &universe);
        users.push(UserSettings {
            username: f.username.clone(),
            password_hash: f.password_hash.clone(),
            scopes,
        });
    }

    // [[routes]]
    let mut routes = Vec::new();
    for (i, f) in file.routes.iter().enumerate() {
        let key = format!("routes[{i}]");
        let path_prefix = match routing::canonical_prefix(&f.path_prefix) {
            Ok(p) => p,
            Err(e) => {
                c.fail(
                    format!("{key}.path_prefix"),
                    format!("{:?}: {}", f.path_prefix, e.describe()),
                );
                continue;
            }
        };
        for (own, own_key) in [
            (token_path.as_str(), "tokens.token_path"),
            (revoke_path.as_str(), "tokens.revoke_path"),
            (introspect_path.as_str(), "tokens.introspect_path"),
            (METADATA_PATH, "metadata path (RFC 8414)"),
            (JWKS_PATH, "JWKS path"),
        ] {
            if path_prefix == own {
                c.fail(
                    format!("{key}.path_prefix"),
                    format!("{path_prefix:?} is the gateway's own {own_key}"),
                );
            }
        }
        // A fully qualified name's trailing dot names the same host (requests are normalised alike).
        let host = f
            .host
            .as_ref()
            .map(|h| h.strip_suffix('.').unwrap_or(h).to_ascii_lowercase());
        if let Some(h) = &host
            && (h.is_empty() || h.contains(['/', ' ', ':']))
        {
            c.fail(
                format!("{key}.host"),
                format!("{h:?} is not a host name (no port, no scheme)"),
            );
        }
        let upstream = match parse_upstream(&f.upstream) {
            Ok(u) => u,
            Err(reason) => {
                c.fail(format!("{key}.upstream"), reason);
                Upstream::Echo
            }
        };
        let auth = match f.auth.as_deref().unwrap_or("required") {
            "required" => AuthPolicy::Required,
            "none" => AuthPolicy::None,
            other => {
                c.fail(
                    format!("{key}.auth"),
                    format!("{other:?} is not \"required\" or \"none\""),
                );
                AuthPolicy::Required
            }
        };
        if auth == AuthPolicy::None && !f.scopes.is_empty() {
            c.fail(
                format!("{key}.scopes"),
                "a route with auth = \"none\" cannot require scopes",
            );
        }
        if auth == AuthPolicy::None && f.issuers.is_some() {
            c.fail(
                format!("{key}.issuers"),
                "a route with auth = \"none\" accepts no tokens to narrow",
            );
        }
        let route_issuers = issuers::route_issuers(&mut c, &format!("{key}.issuers"), f.issuers.as_ref(), &issuers);
        let scopes = c.scopes(&format!("{key}.scopes"), &f.scopes, &universe);
        let connect_timeout = c.duration(
            &format!("{key}.connect_timeout"),
            f.connect_timeout.as_deref(),
            Duration::from_secs(5),
        );
        let timeout = c.duration(&format!("{key}.timeout"), f.timeout.as_deref(), Duration::from_secs(30));
        let ca_file = f.ca_file.as_ref().map(|p| c.path(p));
        if let Some(path) = &ca_file {
            if !matches!(upstream, Upstream::Http { https: true, .. }) {
                c.fail(format!("{key}.ca_file"), "only applies to an https:// upstream");
            } else if let Err(reason) = read_certs(path) {
                c.fail(format!("{key}.ca_file"), reason);
            }
        }
        let upgrades = match &f.upgrades {
            None => vec!["websocket".to_owned()],
            Some(list) => {
                for (j, u) in list.iter().enumerate() {
                    if u.eq_ignore_ascii_case("h2c") {
                        c.fail(
                            format!("{key}.upgrades[{j}]"),
                            "\"h2c\" is never tunnelled: the requests on it would bypass routing and the token check",
                        );
                    } else if u.is_empty()
                        || !u
                            .bytes()
                            .all(|b| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~/".contains(&b))
                    {
                        c.fail(format!("{key}.upgrades[{j}]"), format!("{u:?} is not a protocol name"));
                    }
                }
                list.iter().map(|u| u.to_ascii_lowercase()).collect()
            }
        };
        let max_connections = c.positive(
            &format!("{key}.max_connections"),
            f.max_connections,
            DEFAULT_UPSTREAM_MAX_CONNECTIONS as u64,
        ) as usize;
        if max_connections > MAX_UPSTREAM_CONNECTIONS {
            c.fail(
                format!("{key}.max_connections"),
                format!("{max_connections} is more than {MAX_UPSTREAM_CONNECTIONS} (no open-file limit allows it)"),
            );
        }
        let idle_timeout = c.duration(
            &format!("{key}.idle_timeout"),
            f.idle_timeout.as_deref(),
            DEFAULT_UPSTREAM_IDLE_TIMEOUT,
        );
        if upstream == Upstream::Echo {
            for (name, set) in [
                ("max_connections", f.max_connections.is_some()),
                ("idle_timeout", f.idle_timeout.is_some()),
            ] {
                if set {
                    c.fail(
                        format!("{key}.{name}"),
                        "only applies to an http:// or https:// upstream",
                    );
                }
            }
        }
        routes.push(RouteSettings {
            path_prefix,
            host,
            upstream,
            auth,
            scopes,
            strip_prefix: f.strip_prefix,
            forward_authorization: f.forward_authorization,
            preserve_host: f.preserve_host,
            connect_timeout,
            timeout,
            ca_file,
            upgrades,
            max_connections,
            idle_timeout,
            issuers: route_issuers,
        });
    }
    if let Err(dup) = RouteTable::new(routes.iter().map(|r| (r.host.as_deref(), r.path_prefix.as_str()))) {
        c.fail(
            format!("routes[{}].path_prefix", dup.index),
            format!("same host and prefix as routes[{}]", dup.earlier),
        );
    }

    let format = match file.log.format.as_deref().unwrap_or("text") {
        "text" => LogFormat::Text,
        "json" => LogFormat::Json,
        other => {
            c.fail("log.format", format!("{other:?} is not \"text\" or \"json\""));
            LogFormat::Text
        }
    };

    let state = match &file.state {
        None => StateSettings::Memory,
        Some(st) => check_state(&mut c, st),
    };

    let level = file.log.level.clone().unwrap_or_else(|| "info".to_owned());
    if let Err(e) = tracing_subscriber::EnvFilter::try_new(&level) {
        c.fail("log.level", format!("{level:?} is not a log filter ({e})"));
    }

    if !c.problems.is_empty() {
        return Err(c.problems);
    }
    // Every fallible value above recorded a problem when it was `None`.
    let (Some(listen), Some(admin_listen), Some(signing)) = (listen, admin_listen, signing) else {
        return Err(vec![Problem {
            key: "(internal)".into(),
            reason: "validation incomplete".into(),
        }]);
    };
    if s.tls.is_some() && tls.is_none() {
        return Err(vec![Problem {
            key: "server.tls".into(),
            reason: "could not be loaded".into(),
        }]);
    }
    Ok(Config {
        base_dir: base_dir.to_path_buf(),
        server: ServerSettings {
            listen,
            tls,
            handshake_timeout,
            header_read_timeout,
            idle_timeout,
            park_idle_after,
            body_timeout,
            send_timeout,
            max_header_bytes,
            max_connections,
            shutdown_grace,
            worker_threads,
            trusted_proxies,
        },
        admin: AdminSettings { listen: admin_listen },
        tokens: TokenSettings {
            issuer: t.issuer.clone(),
            audience: t.audience.clone(),
            access_ttl,
            refresh_ttl,
            session_max_lifetime,
            reuse_grace,
            leeway,
            cache_capacity,
            password_hash_concurrency,
            token_path,
            revoke_path,
            introspect_path,
            max_sessions_per_user,
            signing,
            previous_keys,
        },
        clients,
        users,
        routes,
        log: LogSettings { format, level },
        state,
        scopes: universe,
        issuers,
    })
}

fn check_state(c: &mut Checker<'_>, st: &file::StateFile) -> StateSettings {
    match (&st.path, &st.redis_url) {
        (Some(_), Some(_)) => {
            c.fail(
                "state",
                "set either path (embedded store) or redis_url (shared store), not both",
            );
            StateSettings::Memory
        }
        (None, None) => {
            c.fail("state", "needs path (embedded store) or redis_url (shared store)");
            StateSettings::Memory
        }
        (Some(path), None) => {
            for (key, set) in [
                ("state.ca_file", st.ca_file.is_some()),
                ("state.password", st.password.is_some()),
                ("state.key_prefix", st.key_prefix.is_some()),
            ] {
                if set {
                    c.fail(key, "only applies with state.redis_url");
                }
            }
            if path.trim().is_empty() {
                c.fail("state.path", "must not be empty");
            }
            StateSettings::Durable { path: c.path(path) }
        }
        (None, Some(url)) => {
            let tls = match url.split_once("://").map(|(scheme, _)| scheme) {
                Some("redis") => false,
                Some("rediss") => true,
                _ => {
                    c.fail("state.redis_url", format!("{url:?} is not a redis:// or rediss:// URL"));
                    false
                }
            };
            if let Some((_, rest)) = url.split_once("://")
                && rest.split('/').next().is_some_and(|authority| authority.contains('@'))
            {
                // Never echo it: the part before @ is a password.
                c.fail(
                    "state.redis_url",
                    "must not carry credentials (use state.password = \"env:NAME\" or \"file:PATH\")",
                );
            }
            let ca_file = st.ca_file.as_ref().map(|p| c.path(p));
            if let Some(path) = &ca_file {
                if !tls {
                    c.fail("state.ca_file", "only applies to a rediss:// URL");
                } else if let Err(reason) = read_certs(path) {
                    c.fail("state.ca_file", reason);
                }
            }
            let password = st.password.as_deref().and_then(|p| c.secret("state.password", p));
            let key_prefix = st.key_prefix.clone().unwrap_or_else(|| "tokengate:".to_owned());
            if key_prefix.is_empty() || key_prefix.chars().any(|ch| ch.is_whitespace() || ch.is_control()) {
                c.fail(
                    "state.key_prefix",
                    "must be non-empty, without spaces or control characters",
                );
            }
            StateSettings::Redis(RedisSettings {
                url: url.clone(),
                tls,
                ca_file,
                password,
                key_prefix,
            })
        }
    }
}

/// A username or client id travels to upstreams in `X-Auth-*` headers and into logs: printable, no
/// surrounding whitespace (`" alice"` and `"alice"` would be one identity to an upstream that trims
/// headers), no control characters (`"nl\nbob"` could log in but never pass the gateway).
fn check_name(name: &str, ascii_only: bool) -> Result<(), &'static str> {
    if name.is_empty() {
        return Err("must not be empty");
    }
    if name.len() > 256 {
        return Err("must be at most 256 bytes");
    }
    if name.chars().any(char::is_control) {
        return Err("must not contain control characters");
    }
    if name.trim() != name {
        return Err("must not begin or end with whitespace");
    }
    if ascii_only && !name.is_ascii() {
        return Err("must be printable ASCII");
    }
    Ok(())
}

/// `server.trusted_proxies`: CIDR ranges ("10.0.0.0/8", "2001:db8::/32") or single addresses.
fn trusted_proxies(c: &mut Checker<'_>, list: &[String]) -> TrustedProxies {
    let mut nets = Vec::new();
    for (i, raw) in list.iter().enumerate() {
        let key = format!("server.trusted_proxies[{i}]");
        let net = raw
            .parse::<ipnet::IpNet>()
            .ok()
            .or_else(|| raw.parse::<std::net::IpAddr>().ok().map(ipnet::IpNet::from));
        match net {
            Some(net) if net.prefix_len() == 0 => c.fail(
                key,
                format!("{raw:?} trusts every address: any client could name its own; list your proxies' ranges"),
            ),
            Some(net) => nets.push(net.trunc()),
            None => c.fail(
                key,
                format!(
                    "{raw:?} is not an IP range or address (e.g. \"10.0.0.0/8\", \"2001:db8::/32\", \"192.0.2.7\")"
                ),
            ),
        }
    }
    TrustedProxies::new(nets)
}

/// `tokens.issuer` is the public base URL of the gateway (RFC 8414 §2: https, no query or
/// fragment); discovery builds every endpoint URL from it.
fn check_issuer_url(raw: &str) -> Result<(), String> {
    if raw.trim().is_empty() {
        return Err("must not be empty".into());
    }
    let bad = || format!("{raw:?} is not an http:// or https:// URL (the gateway's public base URL)");
    let uri: http::Uri = raw.parse().map_err(|_| bad())?;
    if !matches!(uri.scheme_str(), Some("http" | "https")) || uri.authority().is_none_or(|a| a.host().is_empty()) {
        return Err(bad());
    }
    if uri.query().is_some() || raw.contains('#') {
        return Err(format!("{raw:?} must have no query or fragment (RFC 8414 §2)"));
    }
    Ok(())
}

fn own_path(c: &mut Checker<'_>, key: &str, value: Option<&str>, default: &str) -> String {
    let raw = value.unwrap_or(default);
    match routing::canonical_prefix(raw) {
        Ok(p) if p == raw => p,
        _ => {
            c.fail(
                key,
                format!("{raw:?} must be a normalized absolute path without a trailing slash"),
            );
            default.to_owned()
        }
    }
}

fn parse_upstream(raw: &str) -> Result<Upstream, String> {
    if raw == "echo" {
        return Ok(Upstream::Echo);
    }
    let not_url = || format!("{raw:?} is not an http or https URL (or \"echo\")");
    let uri: http::Uri = raw.parse().map_err(|_| not_url())?;
    let https = match uri.scheme_str() {
        Some("http") => false,
        Some("https") => true,
        _ => return Err(not_url()),
    };
    let authority = uri.authority().ok_or_else(not_url)?;
    if authority.as_str().contains('@') {
        return Err(format!("{raw:?} must not carry credentials"));
    }
    if authority.host().is_empty() {
        return Err(not_url());
    }
    if uri.query().is_some() {
        return Err(format!("{raw:?} must not have a query"));
    }
    let base_path = uri.path().trim_end_matches('/').to_owned();
    Ok(Upstream::Http {
        https,
        authority: authority.as_str().to_owned(),
        base_path,
    })
}

fn decode_hex32(s: &str) -> Option<[u8; 32]> {
    let b = s.as_bytes();
    if b.len() != 64 {
        return None;
    }
    let mut out = [0u8; 32];
    for (i, pair) in b.chunks(2).enumerate() {
        let hi = (pair[0] as char).to_digit(16)?;
        let lo = (pair[1] as char).to_digit(16)?;
        out[i] = (hi << 4 | lo) as u8;
    }
    Some(out)
}

/// Reads PEM certificates; `Err` says why in words.
pub fn read_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, String> {
    if !path.exists() {
        return Err(format!("{} does not exist", path.display()));
    }
    let certs: Result<Vec<_>, _> = CertificateDer::pem_file_iter(path)
        .map_err(|e| format!("cannot read {}: {e}", path.display()))?
        .collect();
    match certs {
        Ok(c) if !c.is_empty() => Ok(c),
        Ok(_) => Err(format!("{} holds no PEM certificate", path.display())),
        Err(e) => Err(format!("{} is not valid PEM: {e}", path.display())),
    }
}

fn load_tls(c: &mut Checker<'_>, t: &file::TlsFile) -> Option<TlsSettings> {
    let cert_path = c.path(&t.cert);
    let key_path = c.path(&t.key);
    let certs = match read_certs(&cert_path) {
        Ok(certs) => Some(certs),
        Err(reason) => {
            c.fail("server.tls.cert", reason);
            None
        }
    };
    let key = if !key_path.exists() {
        c.fail("server.tls.key", format!("{} does not exist", key_path.display()));
        None
    } else {
        match PrivateKeyDer::from_pem_file(&key_path) {
            Ok(k) => Some(k),
            Err(e) => {
                c.fail(
                    "server.tls.key",
                    format!("{} holds no usable PEM private key: {e}", key_path.display()),
                );
                None
            }
        }
    };
    let (cert_chain, key) = (certs?, key?);
    // Catch a cert/key mismatch at load rather than at the first handshake.
    let provider = rustls::crypto::aws_lc_rs::default_provider();
    match provider.key_provider.load_private_key(key.clone_key()) {
        Ok(signing) => {
            let ck = rustls::sign::CertifiedKey::new(cert_chain.clone(), signing);
            if let Err(e) = ck.keys_match() {
                c.fail("server.tls.key", format!("does not match server.tls.cert: {e}"));
                return None;
            }
        }
        Err(e) => {
            c.fail("server.tls.key", format!("unsupported private key: {e}"));
            return None;
        }
    }
    Some(TlsSettings {
        cert_path,
        key_path,
        cert_chain,
        key,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    pub(crate) const MINIMAL: &str = r#"
[server]
listen = "127.0.0.1:0"
[tokens]
issuer = "https://issuer.test"
audience = "api"
signing = { secret = "env:TOKENGATE_TEST_SECRET_FOR_UNIT_TESTS" }
"#;

    fn load(extra: &str) -> Result<Config, ConfigError> {
        // A file secret: setting env vars is `unsafe` in edition 2024 and racy across tests.
        // Removed on return: the secret is read while loading.
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("secret"), "0123456789abcdef0123456789abcdef\n").unwrap();
        let text = MINIMAL.replace("env:TOKENGATE_TEST_SECRET_FOR_UNIT_TESTS", "file:secret");
        Config::from_toml(&format!("{text}\n{extra}"), dir.path(), "test.toml")
    }

    /// Like [`load`], with `keys` added to `[server]`.
    fn load_server(keys: &str) -> Result<Config, ConfigError> {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("secret"), "0123456789abcdef0123456789abcdef\n").unwrap();
        let text = MINIMAL
            .replace("env:TOKENGATE_TEST_SECRET_FOR_UNIT_TESTS", "file:secret")
            .replace("listen = \"127.0.0.1:0\"", &format!("listen = \"127.0.0.1:0\"\n{keys}"));
        Config::from_toml(&text, dir.path(), "test.toml")
    }

    fn problems(extra: &str) -> Vec<String> {
        load(extra)
            .unwrap_err()
            .problems
            .iter()
            .map(ToString::to_string)
            .collect()
    }

    #[test]
    fn durations_parse_with_units() {
        assert_eq!(parse_duration("900s").unwrap(), Duration::from_secs(900));
        assert_eq!(parse_duration("15m").unwrap(), Duration::from_secs(900));
        assert_eq!(parse_duration("1d").unwrap(), Duration::from_secs(86_400));
        assert_eq!(parse_duration("250ms").unwrap(), Duration::from_millis(250));
        assert!(parse_duration("15").unwrap_err().contains("is not a duration"));
        assert!(parse_duration("m").is_err());
        assert!(parse_duration("99999999999999999999d").is_err());
    }

    #[test]
    fn compound_and_fractional_durations_parse() {
        assert_eq!(parse_duration("1h30m").unwrap(), Duration::from_secs(5400));
        assert_eq!(parse_duration("1h 30m").unwrap(), Duration::from_secs(5400));
        assert_eq!(parse_duration("1.5s").unwrap(), Duration::from_millis(1500));
        assert_eq!(parse_duration("1.5h").unwrap(), Duration::from_secs(5400));
        assert_eq!(parse_duration("2m30s").unwrap(), Duration::from_secs(150));
        assert_eq!(parse_duration("3650d").unwrap(), Duration::from_secs(3650 * 86_400));
        let too_long = parse_duration("3651d").unwrap_err();
        assert!(too_long.contains("too long (at most 3650d)"), "{too_long}");
        assert!(parse_duration("11y").unwrap_err().contains("too long"));
        assert!(
            parse_duration("1.5ms")
                .unwrap_err()
                .contains("finer than a millisecond")
        );
        assert!(parse_duration("5M").unwrap_err().contains("months"));
        let c = load("[[routes]]\npath_prefix = \"/a\"\nupstream = \"echo\"\ntimeout = \"1m30s\"\n").unwrap();
        assert_eq!(c.routes[0].timeout, Duration::from_secs(90));
    }

    #[test]
    fn type_errors_are_all_reported_with_line_and_column() {
        let p = problems(
            "[[routes]]\npath_prefix = \"/a\"\nupstream = \"echo\"\nmax_connections = \"ten\"\n\
             [[routes]]\npath_prefix = \"/b\"\nupstream = 7\nscopez = []\n\
             [log]\nformat = true\n",
        );
        // MINIMAL and the newline `load` adds take 8 lines: the extra text starts on line 9.
        assert_eq!(
            p,
            [
                "routes[0].max_connections: invalid type: string \"ten\", expected i64 (at line 12, column 19)",
                "routes[1].upstream: invalid type: integer `7`, expected a string (at line 15, column 12)",
                "routes[1].scopez: unknown field `scopez`, expected one of `path_prefix`, `host`, `upstream`, `auth`, `scopes`, `strip_prefix`, `forward_authorization`, `preserve_host`, `connect_timeout`, `timeout`, `ca_file`, `upgrades`, `max_connections`, `idle_timeout`, `issuers` (at line 16, column 1)",
                "log.format: invalid type: boolean `true`, expected a string (at line 18, column 10)",
            ],
            "{p:#?}"
        );
    }

    #[test]
    fn a_missing_required_key_ends_the_search_without_inventing_errors() {
        let p = problems("[[routes]]\npath_prefix = 5\nupstream = \"echo\"\n");
        assert_eq!(p.len(), 1, "{p:?}");
        assert!(
            p[0].starts_with("routes[0].path_prefix: invalid type: integer `5`"),
            "{p:?}"
        );
    }

    #[test]
    fn every_syntax_error_is_reported_with_its_line() {
        let p = problems("[[routes]]\npath_prefix = \"/a\nupstream = = 1\n");
        assert!(!p.is_empty() && p.iter().all(|m| m.starts_with("(syntax): ")), "{p:?}");
        assert!(p.len() >= 2, "{p:?}");
        assert!(p[0].contains("(at line 10, column 18)"), "{p:?}");
        assert!(p[1].contains("(at line 11, column"), "{p:?}");
    }

    #[test]
    fn minimal_config_gets_the_documented_defaults() {
        let c = load("").unwrap();
        assert_eq!(c.tokens.access_ttl, Duration::from_secs(900));
        assert_eq!(c.server.header_read_timeout, Duration::from_secs(10));
        assert_eq!(c.server.idle_timeout, Duration::from_secs(60));
        assert_eq!(c.tokens.refresh_ttl, Duration::from_secs(86_400));
        assert_eq!(c.tokens.reuse_grace, Duration::from_secs(10));
        assert_eq!(c.tokens.token_path, "/api/oauth2/token");
        let cores = std::thread::available_parallelism().unwrap().get();
        assert_eq!(c.tokens.password_hash_concurrency, cores);
        assert_eq!(c.admin.listen, "127.0.0.1:9901".parse().unwrap());
        assert_eq!(c.tokens.signing.material.expose(), b"0123456789abcdef0123456789abcdef");
        assert_eq!(c.tokens.signing.alg, SigningAlg::HS256);
        assert_eq!(c.tokens.introspect_path, "/api/oauth2/introspect");
    }

    #[test]
    fn unknown_key_is_named_with_its_path() {
        let p = problems("[[routes]]\npath_prefix = \"/a\"\nupstream = \"echo\"\nscopez = [\"x\"]\n");
        assert_eq!(p.len(), 1, "{p:?}");
        assert!(
            p[0].starts_with("routes[0].scopez: unknown field `scopez`, expected one of"),
            "{p:?}"
        );
    }

    #[test]
    fn every_semantic_error_is_reported_at_once() {
        let p = problems(
            "[[routes]]\npath_prefix = \"/a\"\nupstream = \"htp://x\"\n\
             [[routes]]\npath_prefix = \"/b\"\nupstream = \"echo\"\ntimeout = \"five minutes\"\n",
        );
        assert!(
            p.contains(&r#"routes[0].upstream: "htp://x" is not an http or https URL (or "echo")"#.to_owned()),
            "{p:?}"
        );
        assert!(
            p.iter()
                .any(|m| m.starts_with("routes[1].timeout: \"five minutes\" is not a duration")),
            "{p:?}"
        );
    }

    #[test]
    fn literal_secrets_are_refused_without_echoing_them() {
        let text = MINIMAL.replace("env:TOKENGATE_TEST_SECRET_FOR_UNIT_TESTS", "hunter2-literal");
        let err = Config::from_toml(&text, Path::new("."), "t.toml").unwrap_err();
        let msg = err.to_string();
        assert!(
            msg.contains("tokens.signing.secret: must be \"env:NAME\" or \"file:PATH\""),
            "{msg}"
        );
        assert!(!msg.contains("hunter2"), "{msg}");
    }

    #[test]
    fn short_hmac_secret_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("secret"), "short").unwrap();
        let text = MINIMAL.replace("env:TOKENGATE_TEST_SECRET_FOR_UNIT_TESTS", "file:secret");
        let msg = Config::from_toml(&text, dir.path(), "t.toml").unwrap_err().to_string();
        assert!(
            msg.contains("tokens.signing.secret: is 5 bytes; HS256 needs at least 32"),
            "{msg}"
        );
    }

    #[test]
    fn route_prefix_rules() {
        let p = problems(
            "[[routes]]\npath_prefix = \"/api/oauth2/token\"\nupstream = \"echo\"\n\
             [[routes]]\npath_prefix = \"/x\"\nupstream = \"echo\"\n\
             [[routes]]\npath_prefix = \"/x/\"\nupstream = \"echo\"\n\
             [[routes]]\npath_prefix = \"/y\"\nupstream = \"echo\"\nauth = \"none\"\nscopes = [\"a\"]\n",
        );
        assert!(
            p.iter()
                .any(|m| m.starts_with("routes[0].path_prefix: \"/api/oauth2/token\" is the gateway's own")),
            "{p:?}"
        );
        assert!(
            p.contains(&"routes[2].path_prefix: same host and prefix as routes[1]".to_owned()),
            "{p:?}"
        );
        assert!(
            p.iter()
                .any(|m| m.starts_with("routes[3].scopes: a route with auth = \"none\"")),
            "{p:?}"
        );
    }

    #[test]
    fn upstream_urls() {
        assert_eq!(
            parse_upstream("http://127.0.0.1:9000/v1/").unwrap(),
            Upstream::Http {
                https: false,
                authority: "127.0.0.1:9000".into(),
                base_path: "/v1".into()
            }
        );
        assert!(parse_upstream("https://example.com").is_ok());
        assert!(parse_upstream("ftp://example.com").is_err());
        assert!(parse_upstream("http://u:p@example.com").is_err());
        assert!(parse_upstream("http://example.com/?q=1").is_err());
        assert!(parse_upstream("/relative").is_err());
    }

    #[test]
    fn password_hash_concurrency_is_a_sane_positive_count() {
        assert_eq!(
            load("password_hash_concurrency = 3\n")
                .unwrap()
                .tokens
                .password_hash_concurrency,
            3
        );
        assert_eq!(
            problems("password_hash_concurrency = 0\n"),
            ["tokens.password_hash_concurrency: 0 must be at least 1"]
        );
        assert_eq!(
            problems("password_hash_concurrency = 5000\n"),
            [
                "tokens.password_hash_concurrency: 5000 must be at most 1024 (each thread keeps up to 64 MiB of Argon2 memory)"
            ]
        );
    }

    #[test]
    fn password_hashes_needing_more_than_64_mib_or_an_unknown_version_are_refused() {
        let hash = |params: &str| {
            format!(
                "[[users]]\nusername = \"u\"\npassword_hash = \"$argon2id${params}$dG9rZW5nYXRlLXNhbHQ$rmGuE1mECPfb07S9RZc0mRN2WZvA1aBXcN5OSG3DOIc\"\n"
            )
        };
        assert_eq!(
            problems(&hash("v=19$m=131072,t=1,p=1")),
            ["users[0].password_hash: needs 128 MiB of memory per check (m=131072); at most 64 MiB is accepted"]
        );
        assert_eq!(
            problems(&hash("v=20$m=19456,t=2,p=1")),
            ["users[0].password_hash: has version 20; Argon2 versions are 16 and 19 (see `tokengate hash-password`)"]
        );
        assert!(load(&hash("v=19$m=65536,t=1,p=1")).is_ok(), "64 MiB is accepted");
    }

    #[test]
    fn clients_and_users_are_checked() {
        let p = problems(
            "[[clients]]\nid = \"svc\"\ngrants = [\"client_credentials\", \"implicit\"]\n\
             [[clients]]\nid = \"svc\"\ngrants = [\"password\"]\nsecret_sha256 = \"abc\"\n\
             [[users]]\nusername = \"u\"\npassword_hash = \"plaintext\"\n",
        );
        assert!(
            p.contains(
                &"clients[0].grants[1]: \"implicit\" is not a grant type (password, refresh_token, client_credentials)"
                    .to_owned()
            ),
            "{p:?}"
        );
        assert!(
            p.iter()
                .any(|m| m.starts_with("clients[0].grants: client_credentials needs a confidential client")),
            "{p:?}"
        );
        assert!(
            p.contains(&"clients[1].id: \"svc\" is defined twice".to_owned()),
            "{p:?}"
        );
        assert!(
            p.iter()
                .any(|m| m.starts_with("clients[1].secret_sha256: must be 64 hex digits")),
            "{p:?}"
        );
        assert!(
            p.iter()
                .any(|m| m.starts_with("users[0].password_hash: is not a PHC string")),
            "{p:?}"
        );
    }

    #[test]
    fn names_with_surrounding_whitespace_or_control_characters_are_refused() {
        let hash =
            "$argon2id$v=19$m=19456,t=2,p=1$dG9rZW5nYXRlLWR1bW15LXNhbHQ$rmGuE1mECPfb07S9RZc0mRN2WZvA1aBXcN5OSG3DOIc";
        let p = problems(&format!(
            "[[clients]]\nid = \" web\"\ngrants = [\"password\"]\n\
             [[users]]\nusername = \" alice\"\npassword_hash = \"{hash}\"\n\
             [[users]]\nusername = \"nl\\nbob\"\npassword_hash = \"{hash}\"\n\
             [[users]]\nusername = \"tab\\tbob\"\npassword_hash = \"{hash}\"\n\
             [[users]]\nusername = \"Jos\u{e9}\"\npassword_hash = \"{hash}\"\n"
        ));
        assert!(
            p.contains(&"clients[0].id: must not begin or end with whitespace".to_owned()),
            "{p:?}"
        );
        assert!(
            p.contains(&"users[0].username: must not begin or end with whitespace".to_owned()),
            "{p:?}"
        );
        assert!(
            p.contains(&"users[1].username: must not contain control characters".to_owned()),
            "{p:?}"
        );
        assert!(
            p.contains(&"users[2].username: must not contain control characters".to_owned()),
            "{p:?}"
        );
        assert!(
            !p.iter().any(|m| m.starts_with("users[3]")),
            "non-ASCII usernames are fine: {p:?}"
        );
    }

    #[test]
    fn h2c_is_never_an_allowed_upgrade() {
        let p =
            problems("[[routes]]\npath_prefix = \"/a\"\nupstream = \"echo\"\nupgrades = [\"websocket\", \"H2C\"]\n");
        assert!(
            p.iter()
                .any(|m| m.starts_with("routes[0].upgrades[1]: \"h2c\" is never tunnelled")),
            "{p:?}"
        );
        let c = load("[[routes]]\npath_prefix = \"/a\"\nupstream = \"echo\"\n").unwrap();
        assert_eq!(c.routes[0].upgrades, vec!["websocket"]);
    }

    #[test]
    fn upstream_pool_keys_have_defaults_and_are_checked() {
        let c = load("[[routes]]\npath_prefix = \"/a\"\nupstream = \"http://127.0.0.1:9\"\n").unwrap();
        assert_eq!(c.routes[0].max_connections, 256);
        assert_eq!(c.routes[0].idle_timeout, Duration::from_secs(4));
        let c = load(
            "[[routes]]\npath_prefix = \"/a\"\nupstream = \"http://127.0.0.1:9\"\n\
             max_connections = 2\nidle_timeout = \"0s\"\n",
        )
        .unwrap();
        assert_eq!(c.routes[0].max_connections, 2);
        assert_eq!(c.routes[0].idle_timeout, Duration::ZERO);

        let p = problems(
            "[[routes]]\npath_prefix = \"/a\"\nupstream = \"http://127.0.0.1:9\"\n\
             max_connections = 0\nidle_timeout = \"4\"\n\
             [[routes]]\npath_prefix = \"/b\"\nupstream = \"http://127.0.0.1:9\"\nmax_connections = 2000000\n\
             [[routes]]\npath_prefix = \"/c\"\nupstream = \"echo\"\nmax_connections = 5\nidle_timeout = \"1s\"\n",
        );
        assert!(
            p.contains(&"routes[0].max_connections: 0 must be at least 1".to_owned()),
            "{p:?}"
        );
        assert!(
            p.iter()
                .any(|m| m.starts_with("routes[0].idle_timeout: \"4\" is not a duration")),
            "{p:?}"
        );
        assert!(
            p.iter()
                .any(|m| m.starts_with("routes[1].max_connections: 2000000 is more than 1000000")),
            "{p:?}"
        );
        for key in ["max_connections", "idle_timeout"] {
            assert!(
                p.contains(&format!(
                    "routes[2].{key}: only applies to an http:// or https:// upstream"
                )),
                "{p:?}"
            );
        }
    }

    #[test]
    fn state_is_one_store_and_never_an_inline_secret() {
        assert!(matches!(load("").unwrap().state, StateSettings::Memory));
        let c = load("[state]\npath = \"sessions\"\n").unwrap();
        assert!(
            matches!(&c.state, StateSettings::Durable { path } if path.ends_with("sessions") && path.is_absolute() == c.base_dir.is_absolute())
        );
        let c = load("[state]\nredis_url = \"redis://127.0.0.1:6379/2\"\n").unwrap();
        assert!(matches!(&c.state, StateSettings::Redis(r) if r.key_prefix == "tokengate:" && !r.tls));
        let p = problems("[state]\npath = \"x\"\nredis_url = \"redis://h\"\n");
        assert!(p.iter().any(|m| m.starts_with("state: set either path")), "{p:?}");
        let p = problems("[state]\nredis_url = \"redis://user:hunter2@h:6379\"\n");
        assert!(
            p.iter()
                .any(|m| m.starts_with("state.redis_url: must not carry credentials")),
            "{p:?}"
        );
        assert!(!p.iter().any(|m| m.contains("hunter2")), "{p:?}");
        let p = problems("[state]\nredis_url = \"http://h\"\nca_file = \"x.pem\"\n");
        assert!(
            p.iter()
                .any(|m| m.starts_with("state.redis_url: \"http://h\" is not a redis")),
            "{p:?}"
        );
        assert!(
            p.iter()
                .any(|m| m.starts_with("state.ca_file: only applies to a rediss")),
            "{p:?}"
        );
        let p = problems("[state]\npath = \"x\"\nkey_prefix = \"p:\"\n");
        assert!(
            p.contains(&"state.key_prefix: only applies with state.redis_url".to_owned()),
            "{p:?}"
        );
    }

    #[test]
    fn trusted_proxies_are_ranges_or_addresses() {
        let c = load_server("trusted_proxies = [\"10.0.0.0/8\", \"192.0.2.7\", \"2001:db8::/32\"]").unwrap();
        let t = &c.server.trusted_proxies;
        for ip in ["10.1.2.3", "192.0.2.7", "2001:db8::5", "::ffff:10.0.0.1"] {
            assert!(t.contains(ip.parse().unwrap()), "{ip}");
        }
        for ip in ["11.0.0.1", "192.0.2.8", "2001:db9::1"] {
            assert!(!t.contains(ip.parse().unwrap()), "{ip}");
        }
        assert!(load("").unwrap().server.trusted_proxies.is_empty(), "none by default");

        let p: Vec<String> = load_server("trusted_proxies = [\"10.0.0.0/33\", \"0.0.0.0/0\", \"lb.internal\"]")
            .unwrap_err()
            .problems
            .iter()
            .map(ToString::to_string)
            .collect();
        assert!(
            p.iter()
                .any(|m| m.starts_with("server.trusted_proxies[0]: \"10.0.0.0/33\" is not an IP range")),
            "{p:?}"
        );
        assert!(
            p.iter()
                .any(|m| m.starts_with("server.trusted_proxies[1]: \"0.0.0.0/0\" trusts every address")),
            "{p:?}"
        );
        assert!(
            p.iter()
                .any(|m| m.starts_with("server.trusted_proxies[2]: \"lb.internal\" is not")),
            "{p:?}"
        );
    }

    #[test]
    fn bad_listen_address_is_named() {
        let text = MINIMAL.replace("127.0.0.1:0", "localhost:http");
        let err = Config::from_toml(&text, Path::new("."), "t.toml").unwrap_err();
        assert!(err.problems.iter().any(|p| p.key == "server.listen"), "{err}");
    }
}
