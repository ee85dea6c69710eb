//! The TOML file as written, mirrored field by field. Nothing here is interpreted: durations, secrets,
//! addresses and URLs stay strings so that `config.rs` can check them all and report every problem at
//! once, each under its key path. `deny_unknown_fields` everywhere: a misspelt `scopes` must never
//! silently open a route.

use serde::Deserialize;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileConfig {
    pub server: ServerFile,
    #[serde(default)]
    pub admin: AdminFile,
    pub tokens: TokensFile,
    #[serde(default)]
    pub clients: Vec<ClientFile>,
    #[serde(default)]
    pub users: Vec<UserFile>,
    #[serde(default)]
    pub routes: Vec<RouteFile>,
    #[serde(default)]
    pub log: LogFile,
    #[serde(default)]
    pub issuers: Vec<IssuerFile>,
    pub state: Option<StateFile>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StateFile {
    pub path: Option<String>,
    pub redis_url: Option<String>,
    pub ca_file: Option<String>,
    pub password: Option<String>,
    pub key_prefix: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServerFile {
    pub listen: String,
    pub tls: Option<TlsFile>,
    pub handshake_timeout: Option<String>,
    pub header_read_timeout: Option<String>,
    pub idle_timeout: Option<String>,
    pub park_idle_after: Option<String>,
    pub body_timeout: Option<String>,
    pub send_timeout: Option<String>,
    pub max_header_bytes: Option<i64>,
    pub max_connections: Option<i64>,
    pub shutdown_grace: Option<String>,
    pub worker_threads: Option<i64>,
    pub trusted_proxies: Option<Vec<String>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TlsFile {
    pub cert: String,
    pub key: String,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AdminFile {
    pub listen: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TokensFile {
    pub issuer: String,
    pub audience: String,
    pub access_ttl: Option<String>,
    pub refresh_ttl: Option<String>,
    pub session_max_lifetime: Option<String>,
    pub reuse_grace: Option<String>,
    pub leeway: Option<String>,
    pub cache_capacity: Option<i64>,
    pub password_hash_concurrency: Option<i64>,
    pub token_path: Option<String>,
    pub revoke_path: Option<String>,
    pub introspect_path: Option<String>,
    pub max_sessions_per_user: Option<i64>,
    pub signing: SigningFile,
    #[serde(default)]
    pub previous_keys: Vec<SigningFile>,
}

/// `{ alg, secret }` (HMAC) or `{ alg, key }` (a PKCS#8 PEM private key).
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SigningFile {
    pub alg: Option<String>,
    pub secret: Option<String>,
    pub key: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct IssuerFile {
    pub issuer: String,
    pub jwks_uri: String,
    pub ca_file: Option<String>,
    #[serde(default)]
    pub audiences: Vec<String>,
    pub algorithms: Option<Vec<String>>,
    pub token_types: Option<Vec<String>>,
    pub scope_claim: Option<String>,
    pub min_refetch_interval: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClientFile {
    pub id: String,
    pub secret_sha256: Option<String>,
    #[serde(default)]
    pub grants: Vec<String>,
    #[serde(default)]
    pub scopes: Vec<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UserFile {
    pub username: String,
    pub password_hash: String,
    #[serde(default)]
    pub scopes: Vec<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RouteFile {
    pub path_prefix: String,
    pub host: Option<String>,
    pub upstream: String,
    pub auth: Option<String>,
    #[serde(default)]
    pub scopes: Vec<String>,
    #[serde(default)]
    pub strip_prefix: bool,
    #[serde(default)]
    pub forward_authorization: bool,
    #[serde(default)]
    pub preserve_host: bool,
    pub connect_timeout: Option<String>,
    pub timeout: Option<String>,
    pub ca_file: Option<String>,
    pub upgrades: Option<Vec<String>>,
    pub max_connections: Option<i64>,
    pub idle_timeout: Option<String>,
    pub issuers: Option<Vec<String>>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LogFile {
    pub format: Option<String>,
    pub level: Option<String>,
}
