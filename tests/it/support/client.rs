//! TLS clients that trust certs/ca.pem, speaking HTTP/1.1 or HTTP/2 as ALPN decides.

use bytes::Bytes;
use http::{HeaderMap, Method, Request, Version};
use http_body_util::{BodyExt, Full};
use hyper_rustls::HttpsConnector;
use hyper_util::client::legacy::Client as Legacy;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;

use super::repo;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Proto {
    Http1,
    Http2,
}

/// A client config trusting certs/ca.pem, offering `alpn`.
pub fn tls_config(alpn: &[&[u8]]) -> rustls::ClientConfig {
    let roots = tokengate::server::tls::roots_from_file(&repo().join("certs/ca.pem")).unwrap();
    tokengate::server::tls::client_config(roots, alpn).unwrap()
}

#[derive(Clone)]
pub struct Client {
    inner: Legacy<HttpsConnector<HttpConnector>, Full<Bytes>>,
}

#[derive(Debug)]
pub struct Resp {
    pub status: u16,
    pub version: Version,
    pub headers: HeaderMap,
    pub body: Bytes,
}

impl Resp {
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }
    pub fn header(&self, name: &str) -> &str {
        self.headers
            .get(name)
            .map(|v| v.to_str().unwrap())
            .unwrap_or_else(|| panic!("no {name} header in {:?}", self.headers))
    }
}

impl Client {
    pub fn new(proto: Proto) -> Client {
        // hyper-rustls sets ALPN itself from the enabled protocols.
        let builder = hyper_rustls::HttpsConnectorBuilder::new()
            .with_tls_config(tls_config(&[]))
            .https_only();
        let connector = match proto {
            Proto::Http1 => builder.enable_http1().build(),
            Proto::Http2 => builder.enable_http2().build(),
        };
        let mut b = Legacy::builder(TokioExecutor::new());
        if proto == Proto::Http2 {
            b.http2_only(true);
        }
        Client {
            inner: b.build(connector),
        }
    }

    pub async fn request(&self, method: Method, url: &str, headers: &[(&str, &str)], body: Bytes) -> Resp {
        let mut req = Request::builder().method(method).uri(url);
        for (k, v) in headers {
            req = req.header(*k, *v);
        }
        let resp = self
            .inner
            .request(req.body(Full::new(body)).unwrap())
            .await
            .expect("request failed");
        let status = resp.status().as_u16();
        let version = resp.version();
        let headers = resp.headers().clone();
        let body = resp.into_body().collect().await.unwrap().to_bytes();
        Resp {
            status,
            version,
            headers,
            body,
        }
    }

    pub async fn get(&self, url: &str, headers: &[(&str, &str)]) -> Resp {
        self.request(Method::GET, url, headers, Bytes::new()).await
    }

    /// `GET` with `Authorization: Bearer <token>`.
    pub async fn get_with_token(&self, url: &str, token: &str) -> Resp {
        let auth = format!("Bearer {token}");
        self.get(url, &[("authorization", &auth)]).await
    }

    /// `POST` of an `application/x-www-form-urlencoded` body.
    pub async fn form(&self, url: &str, form: &[(&str, &str)], headers: &[(&str, &str)]) -> Resp {
        let body: String = form_urlencoded::Serializer::new(String::new())
            .extend_pairs(form)
            .finish();
        let mut hs = vec![("content-type", "application/x-www-form-urlencoded")];
        hs.extend_from_slice(headers);
        self.request(Method::POST, url, &hs, Bytes::from(body)).await
    }
}

/// A raw TLS connection to the gateway offering exactly `alpn` (for hand-written requests).
pub async fn raw_tls(
    addr: std::net::SocketAddr,
    alpn: &[u8],
) -> tokio_rustls::client::TlsStream<tokio::net::TcpStream> {
    let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    tokio_rustls::TlsConnector::from(std::sync::Arc::new(tls_config(&[alpn])))
        .connect("localhost".try_into().unwrap(), tcp)
        .await
        .unwrap()
}

/// Everything the peer sends until it closes the connection (or `bound` passes: a hang guard).
pub async fn read_until_closed(stream: &mut (impl tokio::io::AsyncRead + Unpin), bound: std::time::Duration) -> String {
    use tokio::io::AsyncReadExt;
    let mut out = Vec::new();
    let mut buf = [0u8; 4096];
    let read = tokio::time::timeout(bound, async {
        loop {
            match stream.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(n) => out.extend_from_slice(&buf[..n]),
            }
        }
    })
    .await;
    assert!(
        read.is_ok(),
        "the gateway did not close the connection; got so far: {}",
        String::from_utf8_lossy(&out)
    );
    String::from_utf8_lossy(&out).into_owned()
}

/// An HTTP/2 client connection (the `h2` crate: frames as the test writes them).
pub async fn h2_client(addr: std::net::SocketAddr) -> h2::client::SendRequest<Bytes> {
    let tls = raw_tls(addr, b"h2").await;
    let (send, conn) = h2::client::handshake(tls).await.unwrap();
    tokio::spawn(async move {
        let _ = conn.await;
    });
    send
}

/// A client stream that keeps a copy of every byte read through it, and whose reads stop (never
/// ready again) once `stop_reading` is set: a client that no longer takes what it is sent.
pub struct Tapped<S> {
    inner: S,
    pub seen: std::sync::Arc<std::sync::Mutex<Vec<u8>>>,
    pub stop_reading: std::sync::Arc<std::sync::atomic::AtomicBool>,
}

impl<S> Tapped<S> {
    pub fn new(inner: S) -> Self {
        Tapped {
            inner,
            seen: Default::default(),
            stop_reading: Default::default(),
        }
    }
}

impl<S: tokio::io::AsyncRead + Unpin> tokio::io::AsyncRead for Tapped<S> {
    fn poll_read(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        if self.stop_reading.load(std::sync::atomic::Ordering::SeqCst) {
            return std::task::Poll::Pending;
        }
        let before = buf.filled().len();
        let r = std::pin::Pin::new(&mut self.inner).poll_read(cx, buf);
        let new = buf.filled()[before..].to_vec();
        self.seen.lock().unwrap().extend_from_slice(&new);
        r
    }
}

impl<S: tokio::io::AsyncWrite + Unpin> tokio::io::AsyncWrite for Tapped<S> {
    fn poll_write(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        std::pin::Pin::new(&mut self.inner).poll_write(cx, buf)
    }
    fn poll_flush(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.inner).poll_flush(cx)
    }
    fn poll_shutdown(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}
