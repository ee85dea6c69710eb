//! The Snapshot: everything derived from one validated config, immutable, swapped whole on reload.
//!
//! ```text
//!   Config ──build──▶ Snapshot { generation, routes (+ upstream pools), clients, users, scopes,
//!                               keys, issuer (signing), validator (verification + its cache,
//!                               the external issuers' resolvers), discovery metadata }
//! ```
//!
//! Each request loads the current Snapshot once and uses it to the end, so no request ever sees
//! half of two configs. What the gateway learns at run time (sessions, revocations, the login
//! limiter) is not here: it is the [`crate::state::State`], which outlives every Snapshot and
//! refers to config things by name only.

use std::sync::Arc;

use anyhow::Context;
use bytes::Bytes;

use crate::auth::{IssuerMask, Validator};
use crate::config::{Config, RouteSettings};
use crate::keys::{KeySet, Resolver};
use crate::metrics::RouteMetrics;
use crate::oauth::clients::ClientRegistry;
use crate::oauth::issuer::Issuer;
use crate::oauth::users::UserStore;
use crate::proxy::Forwarder;
use crate::routing::RouteTable;
use crate::state::State;

/// One route as the request path needs it.
pub struct Route {
    pub settings: RouteSettings,
    /// The route's `path_prefix`, shared with the access lines and metrics that name it.
    pub label: Arc<str>,
    /// `None` for the built-in echo upstream.
    pub forwarder: Option<Arc<Forwarder>>,
    /// The required scopes, space-delimited, for `insufficient_scope` challenges.
    pub scope_names: String,
    pub metrics: Arc<RouteMetrics>,
    /// The issuers whose tokens the route accepts.
    pub issuers: IssuerMask,
}

pub struct Snapshot {
    /// Counts the configs this process has applied (1 at start).
    pub generation: u64,
    pub config: Config,
    /// Path (+ host) → index into `routes`.
    pub table: RouteTable,
    pub routes: Vec<Route>,
    pub clients: ClientRegistry,
    pub users: UserStore,
    /// Our signing and verification keys (shared by `issuer` and `validator`).
    pub keys: Arc<KeySet>,
    pub issuer: Issuer,
    pub validator: Validator,
    /// Request metrics of the gateway's own endpoints.
    pub token_metrics: Arc<RouteMetrics>,
    pub revoke_metrics: Arc<RouteMetrics>,
    /// The RFC 8414 metadata document.
    pub metadata: Bytes,
}

/// Whether two routes reach their upstream the same way, so the new one can keep the old one's
/// connection pool across a reload.
fn same_upstream(a: &RouteSettings, b: &RouteSettings) -> bool {
    a.upstream == b.upstream
        && a.ca_file == b.ca_file
        && a.connect_timeout == b.connect_timeout
        && a.timeout == b.timeout
}

impl Snapshot {
    /// Closes upstream connections idle past their time (the maintenance loop, every second).
    pub fn sweep_upstreams(&self) {
        for f in self.routes.iter().filter_map(|r| r.forwarder.as_ref()) {
            f.sweep();
        }
    }

    /// Builds a Snapshot; with `previous`, routes whose upstream is reached the same way keep the
    /// previous Snapshot's upstream client (and its pooled connections), and issuers whose keys
    /// are fetched the same way keep their resolver (and its keys). The token cache is always new.
    pub fn build(
        config: Config,
        generation: u64,
        previous: Option<&Snapshot>,
        state: &State,
    ) -> anyhow::Result<Snapshot> {
        let clock = state.clock.clone();
        let table = RouteTable::new(
            config
                .routes
                .iter()
                .map(|r| (r.host.as_deref(), r.path_prefix.as_str())),
        )
        .map_err(|d| anyhow::anyhow!("routes[{}] duplicates routes[{}]", d.index, d.earlier))?;
        let routes = config
            .routes
            .iter()
            .enumerate()
            .map(|(i, r)| {
                let kept = previous.and_then(|p| {
                    p.routes
                        .iter()
                        .find(|old| old.forwarder.is_some() && same_upstream(&old.settings, r))
                        .and_then(|old| old.forwarder.clone())
                });
                let forwarder = match kept {
                    Some(f) => Some(f),
                    None => Forwarder::new(r, clock.clone())
                        .with_context(|| format!("routes[{i}]: cannot set up the upstream client"))?
                        .map(Arc::new),
                };
                Ok(Route {
                    metrics: state.metrics.route(&r.path_prefix),
                    label: r.path_prefix.as_str().into(),
                    settings: r.clone(),
                    forwarder,
                    scope_names: config.scopes.render(r.scopes),
                    issuers: IssuerMask::new(r.issuers.as_deref(), &config.issuers),
                })
            })
            .collect::<anyhow::Result<Vec<_>>>()?;
        let keys =
            KeySet::new(&config.tokens, previous.map(|p| &*p.keys), clock.now_millis()).map_err(anyhow::Error::msg)?;
        let keys = Arc::new(keys);
        let external = config
            .issuers
            .iter()
            .enumerate()
            .map(|(i, settings)| {
                let resolver = match previous.and_then(|p| p.validator.resolver_for(settings)) {
                    Some(kept) => kept,
                    None => Arc::new(
                        Resolver::http(settings.clone(), clock.clone())
                            .with_context(|| format!("issuers[{i}]: cannot set up the JWKS client"))?,
                    ),
                };
                Ok((settings.clone(), resolver))
            })
            .collect::<anyhow::Result<Vec<_>>>()?;
        let validator = Validator::new(
            &config.tokens,
            keys.clone(),
            external,
            config.scopes.clone(),
            state.revoked.clone(),
            clock,
        );
        Ok(Snapshot {
            generation,
            token_metrics: state.metrics.route(&config.tokens.token_path),
            revoke_metrics: state.metrics.route(&config.tokens.revoke_path),
            table,
            routes,
            clients: ClientRegistry::new(config.clients.clone()),
            users: UserStore::new(config.users.clone(), state.passwords.clone()),
            issuer: Issuer::new(&config.tokens, keys.clone()),
            keys,
            validator,
            metadata: crate::oauth::discovery::metadata(&config),
            config,
        })
    }
}
