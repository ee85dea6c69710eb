//! Test harness: a real gateway in-process (port 0, real TLS), a recording upstream, TLS clients
//! that trust certs/ca.pem, and captured logs.

pub mod client;
pub mod idp;
pub mod logs;
pub mod process;
pub mod upstream;

use std::path::PathBuf;
use std::sync::{Arc, OnceLock};

use tokengate::config::Config;
use tokengate::{Gateway, ManualClock, RunningGateway};

pub use client::{Client, Proto, Resp};
pub use upstream::Upstream;

pub fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

pub const USER: &str = "ann";
pub const PASSWORD: &str = "ann-password-1";
pub const SERVICE_SECRET: &str = "svc-secret-0123456789";

/// Argon2id hash of [`PASSWORD`], made once per test binary.
pub fn password_hash() -> &'static str {
    static HASH: OnceLock<String> = OnceLock::new();
    HASH.get_or_init(|| tokengate::oauth::users::hash_password(PASSWORD).expect("hash"))
}

fn sha256_hex(s: &str) -> String {
    let d = aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, s.as_bytes());
    d.as_ref().iter().map(|b| format!("{b:02x}")).collect()
}

/// A gateway config: TLS with the repo's dev certificate, short timeouts, clients `web` (public)
/// and `svc` (confidential), user `ann`; `[tokens]` overrides and routes are appended by the test.
pub fn config_toml(tokens_extra: &str, rest: &str) -> String {
    let certs = repo().join("certs");
    format!(
        r#"
[server]
listen = "127.0.0.1:0"
tls = {{ cert = "{cert}", key = "{key}" }}
handshake_timeout = "300ms"
header_read_timeout = "300ms"
idle_timeout = "300ms"
shutdown_grace = "10s"

[admin]
listen = "127.0.0.1:0"

[tokens]
issuer = "https://gw.test"
audience = "api"
signing = {{ alg = "HS256", secret = "file:{secret}" }}
{tokens_extra}

[[clients]]
id = "web"
grants = ["password", "refresh_token"]
scopes = ["orders:read", "orders:write"]

[[clients]]
id = "mobile"
grants = ["password", "refresh_token"]
scopes = ["orders:read", "orders:write"]

[[clients]]
id = "svc"
secret_sha256 = "{svc}"
grants = ["client_credentials"]
scopes = ["reports:read", "orders:read"]

[[users]]
username = "{USER}"
password_hash = "{hash}"
scopes = ["orders:read", "orders:write"]

{rest}
"#,
        cert = certs.join("localhost.pem").display(),
        key = certs.join("localhost-key.pem").display(),
        secret = certs.join("dev-jwt-secret").display(),
        svc = sha256_hex(SERVICE_SECRET),
        hash = password_hash(),
    )
}

/// Adds `[server]` keys to a config made by [`config_toml`].
pub fn with_server_keys(toml: &str, keys: &str) -> String {
    toml.replacen(
        "shutdown_grace = \"10s\"",
        &format!("shutdown_grace = \"10s\"\n{keys}"),
        1,
    )
}

/// A fresh private key in a temporary PEM file (removed when dropped).
pub struct KeyFile {
    pub alg: tokengate::config::SigningAlg,
    path: tempfile::TempPath,
}

impl KeyFile {
    pub fn new(alg: tokengate::config::SigningAlg) -> KeyFile {
        let mut f = tempfile::Builder::new().suffix(".pem").tempfile().unwrap();
        std::io::Write::write_all(&mut f, tokengate::keys::generate_pem(alg).unwrap().as_bytes()).unwrap();
        KeyFile {
            alg,
            path: f.into_temp_path(),
        }
    }

    /// `{ alg = "…", key = "file:…" }`
    pub fn table(&self) -> String {
        format!("{{ alg = \"{}\", key = \"file:{}\" }}", self.alg, self.path.display())
    }
}

/// The `signing = { … }` line [`config_toml`] writes: HS256 with certs/dev-jwt-secret.
pub fn hs256_table() -> String {
    format!(
        "{{ alg = \"HS256\", secret = \"file:{}\" }}",
        repo().join("certs/dev-jwt-secret").display()
    )
}

/// [`config_toml`] with `signing = <table>` instead of the HS256 secret.
pub fn config_signed_with(table: &str, tokens_extra: &str, rest: &str) -> String {
    let toml = config_toml(tokens_extra, rest);
    let line = format!("signing = {}", hs256_table());
    assert!(toml.contains(&line));
    toml.replacen(&line, &format!("signing = {table}"), 1)
}

/// The JWT signing secret the test configs use.
pub fn jwt_secret() -> Vec<u8> {
    let mut s = std::fs::read(repo().join("certs/dev-jwt-secret")).unwrap();
    while s.last().is_some_and(|b| b.is_ascii_whitespace()) {
        s.pop();
    }
    s
}

pub struct TestGateway {
    pub running: Option<RunningGateway>,
    pub clock: Arc<ManualClock>,
    pub addr: std::net::SocketAddr,
    pub admin_addr: std::net::SocketAddr,
}

impl TestGateway {
    pub fn url(&self, path: &str) -> String {
        format!("https://localhost:{}{path}", self.addr.port())
    }
    pub fn running(&mut self) -> &mut RunningGateway {
        self.running.as_mut().unwrap()
    }
}

/// Starts a gateway from TOML text on port 0 with a manual clock.
pub async fn start(toml: &str) -> TestGateway {
    start_with_clock(toml, Arc::new(ManualClock::new())).await
}

/// Starts a gateway on `clock` (several instances can share one).
pub async fn start_with_clock(toml: &str, clock: Arc<ManualClock>) -> TestGateway {
    logs::install();
    let config = Config::from_toml(toml, &repo(), "test.toml").unwrap_or_else(|e| panic!("{e}"));
    let running = Gateway::new(config, clock.clone()).unwrap().start().await.unwrap();
    TestGateway {
        addr: running.addr,
        admin_addr: running.admin_addr,
        running: Some(running),
        clock,
    }
}

/// A gateway with one route per `(prefix, upstream, extra keys)`.
pub async fn start_with_routes(tokens_extra: &str, routes: &[(&str, &str, &str)]) -> TestGateway {
    let mut rest = String::new();
    for (prefix, upstream, extra) in routes {
        rest.push_str(&format!(
            "[[routes]]\npath_prefix = \"{prefix}\"\nupstream = \"{upstream}\"\n{extra}\n"
        ));
    }
    start(&config_toml(tokens_extra, &rest)).await
}

/// Parses a JSON body.
pub fn json(body: &[u8]) -> serde_json::Value {
    serde_json::from_slice(body).unwrap_or_else(|e| panic!("not JSON ({e}): {}", String::from_utf8_lossy(body)))
}

/// Logs in `ann` through client `web`; returns the token response.
pub async fn login(client: &Client, gw: &TestGateway, scope: Option<&str>) -> serde_json::Value {
    let mut form = vec![
        ("grant_type", "password"),
        ("client_id", "web"),
        ("username", USER),
        ("password", PASSWORD),
    ];
    if let Some(s) = scope {
        form.push(("scope", s));
    }
    let r = client.form(&gw.url("/api/oauth2/token"), &form, &[]).await;
    assert_eq!(r.status, 200, "login failed: {}", r.text());
    json(&r.body)
}

pub async fn refresh(client: &Client, gw: &TestGateway, refresh_token: &str, client_id: &str) -> Resp {
    client
        .form(
            &gw.url("/api/oauth2/token"),
            &[
                ("grant_type", "refresh_token"),
                ("client_id", client_id),
                ("refresh_token", refresh_token),
            ],
            &[],
        )
        .await
}

pub fn str_of<'a>(v: &'a serde_json::Value, key: &str) -> &'a str {
    v[key].as_str().unwrap_or_else(|| panic!("no string {key} in {v}"))
}

/// Nanoseconds of the wall clock: a seed where a test wants an arbitrary moment.
pub fn now_nanos() -> u128 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos())
}
