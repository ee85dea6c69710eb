//! Fetching an issuer's JWKS: one GET on a fresh connection (hyper's HTTP/1.1 client; rustls with
//! the client config the upstream hop uses, trusting the system roots or the issuer's `ca_file`),
//! bounded in time ([`FETCH_TIMEOUT`], connect to last byte) and size ([`MAX_JWKS_BYTES`]).
//!
//! A fetch is rare (minutes apart, or once per `min_refetch_interval` on an unknown kid), so no
//! connection is kept between fetches: an IdP's load balancer would close it anyway.

use std::future::Future;
use std::pin::Pin;
use std::time::Duration;

use bytes::Bytes;
use http::header::{ACCEPT, CACHE_CONTROL, CONTENT_LENGTH, HOST, USER_AGENT};
use http::{HeaderMap, HeaderValue, Request, StatusCode, Uri};
use http_body_util::{BodyExt, Empty, Limited};
use hyper_util::rt::TokioIo;
use rustls_pki_types::ServerName;
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;

use crate::config::IssuerSettings;

/// The whole fetch, from connect to the last body byte.
pub const FETCH_TIMEOUT: Duration = Duration::from_secs(5);
/// A JWKS is a few kilobytes; a larger answer is not one.
pub const MAX_JWKS_BYTES: usize = 256 * 1024;

/// A JWKS response body and its freshness lifetime as the server stated it.
#[derive(Debug, Clone)]
pub struct Fetched {
    pub body: Bytes,
    /// `Cache-Control: max-age` (`Some(0)` for `no-cache`/`no-store`); the resolver clamps it.
    pub max_age: Option<Duration>,
}

pub type FetchFuture<'a> = Pin<Box<dyn Future<Output = Result<Fetched, String>> + Send + 'a>>;

/// Where a resolver gets its JWKS from: HTTP in the gateway, a script in unit tests.
pub trait Fetch: Send + Sync + 'static {
    /// One attempt; `Err` says why in words (for the log).
    fn fetch(&self) -> FetchFuture<'_>;
}

/// Fetches over HTTP(S) from the issuer's `jwks_uri`.
pub struct HttpFetcher {
    host: String,
    port: u16,
    host_header: HeaderValue,
    path: String,
    tls: Option<(TlsConnector, ServerName<'static>)>,
}

impl HttpFetcher {
    pub fn new(settings: &IssuerSettings) -> anyhow::Result<HttpFetcher> {
        let uri = &settings.jwks_uri;
        let https = uri.scheme_str() == Some("https");
        let authority = uri.authority().ok_or_else(|| anyhow::anyhow!("jwks_uri has no host"))?;
        // `[::1]` in a URL is `::1` to connect() and to the TLS name.
        let host = authority
            .host()
            .trim_start_matches('[')
            .trim_end_matches(']')
            .to_owned();
        let port = authority.port_u16().unwrap_or(if https { 443 } else { 80 });
        let tls = if https {
            Some(crate::server::tls::http1_client(&host, settings.ca_file.as_deref())?)
        } else {
            None
        };
        Ok(HttpFetcher {
            host_header: HeaderValue::from_str(authority.as_str())?,
            host,
            port,
            path: uri.path_and_query().map_or("/", |p| p.as_str()).to_owned(),
            tls,
        })
    }

    async fn fetch_once(&self) -> Result<Fetched, String> {
        let tcp = TcpStream::connect((self.host.as_str(), self.port))
            .await
            .map_err(|e| format!("connect: {e}"))?;
        let _ = tcp.set_nodelay(true);
        match &self.tls {
            Some((connector, name)) => {
                let tls = connector
                    .connect(name.clone(), tcp)
                    .await
                    .map_err(|e| format!("TLS: {e}"))?;
                self.get(TokioIo::new(tls)).await
            }
            None => self.get(TokioIo::new(tcp)).await,
        }
    }

    async fn get<I>(&self, io: I) -> Result<Fetched, String>
    where
        I: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
    {
        let (mut sender, conn) = hyper::client::conn::http1::handshake::<_, Empty<Bytes>>(io)
            .await
            .map_err(|e| format!("HTTP handshake: {e}"))?;
        // The connection task ends with this fetch, however the fetch ends (the timeout drops it).
        let conn = AbortOnDrop(tokio::spawn(async move {
            let _ = conn.await;
        }));
        let uri: Uri = self.path.parse().map_err(|e| format!("jwks_uri path: {e}"))?;
        let req = Request::get(uri)
            .header(HOST, self.host_header.clone())
            .header(ACCEPT, "application/jwk-set+json, application/json")
            .header(USER_AGENT, "tokengate")
            .body(Empty::new())
            .map_err(|e| format!("request: {e}"))?;
        let resp = sender.send_request(req).await.map_err(|e| format!("request: {e}"))?;
        if resp.status() != StatusCode::OK {
            return Err(format!("status {}", resp.status()));
        }
        let declared = resp
            .headers()
            .get(CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<u64>().ok());
        if declared.is_some_and(|n| n > MAX_JWKS_BYTES as u64) {
            return Err(format!("the JWKS is larger than {MAX_JWKS_BYTES} bytes"));
        }
        let max_age = max_age(resp.headers());
        let body = Limited::new(resp.into_body(), MAX_JWKS_BYTES)
            .collect()
            .await
            .map_err(|e| format!("body: {e}"))?
            .to_bytes();
        drop(conn);
        Ok(Fetched { body, max_age })
    }
}

struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

impl Fetch for HttpFetcher {
    fn fetch(&self) -> FetchFuture<'_> {
        Box::pin(async move {
            tokio::time::timeout(FETCH_TIMEOUT, self.fetch_once())
                .await
                .unwrap_or_else(|_| Err(format!("no complete answer within {}s", FETCH_TIMEOUT.as_secs())))
        })
    }
}

/// The freshness lifetime a response states (RFC 9111 §5.2.2): `max-age`, or zero for `no-cache`
/// and `no-store`.
pub fn max_age(headers: &HeaderMap) -> Option<Duration> {
    let mut found = None;
    for value in headers.get_all(CACHE_CONTROL) {
        let Ok(value) = value.to_str() else { continue };
        for directive in value.split(',') {
            let directive = directive.trim();
            let (name, arg) = directive.split_once('=').unwrap_or((directive, ""));
            let name = name.trim();
            if name.eq_ignore_ascii_case("no-store") || name.eq_ignore_ascii_case("no-cache") {
                return Some(Duration::ZERO);
            }
            if name.eq_ignore_ascii_case("max-age")
                && let Ok(secs) = arg.trim().trim_matches('"').parse::<u64>()
            {
                found = Some(Duration::from_secs(secs));
            }
        }
    }
    found
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cc(values: &[&str]) -> Option<Duration> {
        let mut h = HeaderMap::new();
        for v in values {
            h.append(CACHE_CONTROL, HeaderValue::from_str(v).unwrap());
        }
        max_age(&h)
    }

    #[test]
    fn cache_control_max_age() {
        assert_eq!(cc(&[]), None);
        assert_eq!(cc(&["public, max-age=300"]), Some(Duration::from_secs(300)));
        assert_eq!(cc(&["Max-Age=\"60\""]), Some(Duration::from_secs(60)));
        assert_eq!(cc(&["max-age=x"]), None);
        assert_eq!(cc(&["max-age=600", "no-cache"]), Some(Duration::ZERO));
    }
}
