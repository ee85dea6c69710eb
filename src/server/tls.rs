//! rustls setup, always with the aws-lc-rs provider: the server side (TLS 1.2 and 1.3, ALPN `h2`
//! then `http/1.1`) and the client side the upstream hop (and the tests and load bench) use.

use std::sync::Arc;

use arc_swap::ArcSwap;
use rustls::ServerConfig;
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use tokio_rustls::TlsAcceptor;

use crate::config::{TlsSettings, read_certs};

/// The server's certificate, replaceable while it serves: each new handshake takes the current
/// one; established connections keep the one they were made with.
#[derive(Debug)]
pub struct CertResolver {
    current: ArcSwap<CertifiedKey>,
}

impl CertResolver {
    pub fn new(tls: &TlsSettings) -> anyhow::Result<Arc<CertResolver>> {
        Ok(Arc::new(CertResolver {
            current: ArcSwap::from_pointee(certified_key(tls)?),
        }))
    }

    /// Serves `tls`'s certificate to the next handshakes.
    pub fn replace(&self, tls: &TlsSettings) -> anyhow::Result<()> {
        self.current.store(Arc::new(certified_key(tls)?));
        Ok(())
    }

    /// The current certificate's notAfter, in seconds since the epoch.
    pub fn not_after(&self) -> Option<i64> {
        let cert = self.current.load();
        let leaf = cert.cert.first()?;
        let (_, parsed) = x509_parser::parse_x509_certificate(leaf).ok()?;
        Some(parsed.validity().not_after.timestamp())
    }
}

impl ResolvesServerCert for CertResolver {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.current.load_full())
    }
}

fn certified_key(tls: &TlsSettings) -> anyhow::Result<CertifiedKey> {
    let provider = rustls::crypto::aws_lc_rs::default_provider();
    let key = provider.key_provider.load_private_key(tls.key.clone_key())?;
    let ck = CertifiedKey::new(tls.cert_chain.clone(), key);
    ck.keys_match()?;
    Ok(ck)
}

/// The TLS acceptor of the main listener, resolving its certificate through `resolver`.
pub fn acceptor(resolver: Arc<CertResolver>) -> anyhow::Result<TlsAcceptor> {
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let mut config = ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])?
        .with_no_client_auth()
        .with_cert_resolver(resolver);
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(TlsAcceptor::from(Arc::new(config)))
}

/// A client config trusting `roots`, offering `alpn`.
pub fn client_config(roots: rustls::RootCertStore, alpn: &[&[u8]]) -> anyhow::Result<rustls::ClientConfig> {
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let mut config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .with_root_certificates(roots)
        .with_no_client_auth();
    config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    Ok(config)
}

/// A TLS client for an HTTP/1.1 server named `host` (an upstream, an identity provider's JWKS):
/// trusting `ca_file`, else the system roots (unreadable system certificates are skipped; an empty
/// store fails at connect).
pub fn http1_client(
    host: &str,
    ca_file: Option<&std::path::Path>,
) -> anyhow::Result<(tokio_rustls::TlsConnector, rustls_pki_types::ServerName<'static>)> {
    let roots = match ca_file {
        Some(path) => roots_from_file(path)?,
        None => {
            let mut roots = rustls::RootCertStore::empty();
            for cert in rustls_native_certs::load_native_certs().certs {
                let _ = roots.add(cert);
            }
            roots
        }
    };
    let config = client_config(roots, &[b"http/1.1"])?;
    let name = rustls_pki_types::ServerName::try_from(host.to_owned())?;
    Ok((tokio_rustls::TlsConnector::from(Arc::new(config)), name))
}

/// The certificates of a PEM file as trust anchors.
pub fn roots_from_file(path: &std::path::Path) -> anyhow::Result<rustls::RootCertStore> {
    let mut roots = rustls::RootCertStore::empty();
    for cert in read_certs(path).map_err(anyhow::Error::msg)? {
        roots.add(cert)?;
    }
    Ok(roots)
}
