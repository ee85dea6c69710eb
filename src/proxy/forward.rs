//! The upstream hop: a pooled keep-alive HTTP/1.1 client per route (https through rustls with the
//! system roots, or the route's CA file), the route's connect timeout and response-head timeout.
//! Bodies stream both ways: the client's `Incoming` body is the upstream request's body and the
//! upstream's `Incoming` body is the client response's body, so nothing is buffered whole.

use std::sync::Arc;
use std::time::Duration;

use http::uri::{Authority, PathAndQuery, Scheme};
use http::{HeaderValue, Request, Response, Uri};
use hyper::body::Incoming;
use hyper_rustls::HttpsConnector;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::{TokioExecutor, TokioTimer};

use crate::config::{RouteSettings, Upstream, read_certs};

/// Why the upstream hop failed. Details are for the log only, never the response.
#[derive(Debug)]
pub enum ForwardError {
    /// Refused, reset, unreachable, connect timeout, TLS failure: 502.
    Unavailable(String),
    /// No response head within the route's timeout: 504.
    Timeout,
}

pub struct Forwarder {
    client: Client<HttpsConnector<HttpConnector>, Incoming>,
    scheme: Scheme,
    authority: Authority,
    base_path: String,
    /// Host header for the upstream (its own authority).
    pub host_header: HeaderValue,
    timeout: Duration,
}

impl Forwarder {
    /// `Ok(None)` for the built-in echo upstream.
    pub fn new(route: &RouteSettings) -> anyhow::Result<Option<Self>> {
        let Upstream::Http {
            https,
            authority,
            base_path,
        } = &route.upstream
        else {
            return Ok(None);
        };
        let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
        let mut roots = rustls::RootCertStore::empty();
        match &route.ca_file {
            Some(path) => {
                for cert in read_certs(path).map_err(anyhow::Error::msg)? {
                    roots.add(cert)?;
                }
            }
            None if *https => {
                // Unreadable system certificates are skipped; an empty store fails at connect.
                for cert in rustls_native_certs::load_native_certs().certs {
                    let _ = roots.add(cert);
                }
            }
            None => {}
        }
        let tls = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()?
            .with_root_certificates(roots)
            .with_no_client_auth();
        let mut http = HttpConnector::new();
        http.enforce_http(false);
        http.set_nodelay(true);
        http.set_connect_timeout(Some(route.connect_timeout));
        let connector = hyper_rustls::HttpsConnectorBuilder::new()
            .with_tls_config(tls)
            .https_or_http()
            .enable_http1()
            .wrap_connector(http);
        let client = Client::builder(TokioExecutor::new())
            .pool_timer(TokioTimer::new())
            .pool_idle_timeout(Duration::from_secs(60))
            .set_host(false)
            .build(connector);
        Ok(Some(Forwarder {
            client,
            scheme: if *https { Scheme::HTTPS } else { Scheme::HTTP },
            authority: authority.parse()?,
            base_path: base_path.clone(),
            host_header: HeaderValue::from_str(authority)?,
            timeout: route.timeout,
        }))
    }

    /// The upstream URI for an (already normalized, prefix-stripped) path and the raw query.
    pub fn uri(&self, path: &str, query: Option<&str>) -> Option<Uri> {
        let mut pq = String::with_capacity(self.base_path.len() + path.len() + query.map_or(0, |q| q.len() + 1));
        pq.push_str(&self.base_path);
        pq.push_str(path);
        if let Some(q) = query {
            pq.push('?');
            pq.push_str(q);
        }
        let pq = PathAndQuery::try_from(pq).ok()?;
        Uri::builder()
            .scheme(self.scheme.clone())
            .authority(self.authority.clone())
            .path_and_query(pq)
            .build()
            .ok()
    }

    pub async fn send(&self, req: Request<Incoming>) -> Result<Response<Incoming>, ForwardError> {
        match tokio::time::timeout(self.timeout, self.client.request(req)).await {
            Err(_) => Err(ForwardError::Timeout),
            Ok(Err(e)) => Err(ForwardError::Unavailable(error_chain(&e))),
            Ok(Ok(resp)) => Ok(resp),
        }
    }
}

fn error_chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut out = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        out.push_str(": ");
        out.push_str(&s.to_string());
        source = s.source();
    }
    out
}
