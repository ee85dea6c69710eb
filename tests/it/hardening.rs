//! What an unauthenticated client or a sloppy upstream can do to the gateway (issue 8): stalled
//! bodies, upgrades that would open a raw tunnel, abandoned requests, host and target tricks,
//! oversized heads, methods never forwarded, malformed bodies.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;
use tokio::sync::Notify;

use crate::support::client::{h2_client, raw_tls, read_until_closed};
use crate::support::upstream::{self, Handler, full};
use crate::support::{self, Upstream};

const BOUND: Duration = Duration::from_secs(20);

async fn gateway(server_keys: &str, routes: &str) -> support::TestGateway {
    let toml = support::with_server_keys(&support::config_toml("", routes), server_keys);
    support::start(&toml).await
}

/// Sends a hand-written HTTP/1.1 request over TLS and returns everything until the gateway closes.
async fn exchange(gw: &support::TestGateway, request: &str) -> String {
    let mut tls = raw_tls(gw.addr, b"http/1.1").await;
    tls.write_all(request.as_bytes()).await.unwrap();
    read_until_closed(&mut tls, BOUND).await
}

fn status_of(response: &str) -> u16 {
    response
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("not an HTTP response: {response:?}"))
}

/// Waits (with a hang guard) until the captured logs hold a line with every one of `needles`.
async fn logged(needles: &[&str]) -> String {
    tokio::time::timeout(BOUND, async {
        loop {
            if let Some(line) = support::logs::captured()
                .lines()
                .find(|l| needles.iter().all(|n| l.contains(n)))
            {
                return line.to_owned();
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await
    .unwrap_or_else(|_| panic!("no log line with {needles:?}"))
}

#[tokio::test]
async fn a_form_body_that_never_finishes_gets_408_and_its_connection_closes() {
    let gw = gateway("body_timeout = \"200ms\"", "").await;
    for path in ["/api/oauth2/token", "/api/oauth2/revoke"] {
        let r = exchange(
            &gw,
            &format!(
                "POST {path} HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/x-www-form-urlencoded\r\n\
                 Content-Length: 100\r\n\r\ngrant_type=pa"
            ),
        )
        .await;
        assert_eq!(status_of(&r), 408, "{r}");
        assert!(r.to_ascii_lowercase().contains("connection: close"), "{r}");
    }
}

#[tokio::test]
async fn a_form_body_trickled_byte_by_byte_is_bounded_as_a_whole() {
    let gw = gateway("body_timeout = \"300ms\"", "").await;
    let tls = raw_tls(gw.addr, b"http/1.1").await;
    let (mut rx, mut tx) = tokio::io::split(tls);
    tx.write_all(
        b"POST /api/oauth2/token HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/x-www-form-urlencoded\r\n\
          Content-Length: 16000\r\n\r\n",
    )
    .await
    .unwrap();
    // One byte every 50 ms never trips the wait-for-the-next-bytes timeout, and keeps going far
    // longer than the read below waits: only a bound on the whole form answers in time.
    let trickle = tokio::spawn(async move {
        for _ in 0..16_000 {
            if tx.write_all(b"a").await.is_err() {
                return;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    });
    let r = read_until_closed(&mut rx, BOUND).await;
    trickle.abort();
    assert_eq!(status_of(&r), 408, "{r}");
}

#[tokio::test]
async fn a_proxied_body_that_never_finishes_gets_408() {
    let up = Upstream::recording().await;
    let gw = gateway(
        "body_timeout = \"200ms\"",
        &format!(
            "[[routes]]\npath_prefix = \"/up\"\nupstream = \"{}\"\nauth = \"none\"\n",
            up.url()
        ),
    )
    .await;
    let r = exchange(
        &gw,
        "POST /up/x HTTP/1.1\r\nHost: localhost\r\nContent-Length: 100\r\n\r\nonly this",
    )
    .await;
    assert_eq!(status_of(&r), 408, "{r}");
}

#[tokio::test]
async fn an_http2_stream_waiting_for_its_body_is_ended_and_the_connection_can_go_idle() {
    let up = Upstream::recording().await;
    let gw = gateway(
        "body_timeout = \"200ms\"",
        &format!(
            "[[routes]]\npath_prefix = \"/up\"\nupstream = \"{}\"\nauth = \"none\"\n",
            up.url()
        ),
    )
    .await;
    let tls = raw_tls(gw.addr, b"h2").await;
    let (mut send, conn) = h2::client::handshake(tls).await.unwrap();
    let conn = tokio::spawn(conn);
    let req = Request::post(format!("https://localhost:{}/up/x", gw.addr.port()))
        .header("content-length", "100")
        .body(())
        .unwrap();
    let (resp, mut body) = send.send_request(req, false).unwrap();
    body.send_data(Bytes::from_static(b"one byte of 100"), false).unwrap();
    let resp = tokio::time::timeout(BOUND, resp).await.expect("no answer").unwrap();
    assert_eq!(resp.status(), 408);
    drop((send, body, resp));
    // Nothing in flight any more: the idle timeout ends the connection.
    tokio::time::timeout(BOUND, conn)
        .await
        .expect("the idle HTTP/2 connection was not closed")
        .unwrap()
        .ok();
}

/// An upstream that answers every request with `101 Switching Protocols` to h2c and records what
/// arrives on the connection afterwards.
async fn upgrading_upstream() -> (std::net::SocketAddr, Arc<std::sync::Mutex<Vec<u8>>>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let after: Arc<std::sync::Mutex<Vec<u8>>> = Arc::default();
    let seen = after.clone();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = listener.accept().await {
            let seen = seen.clone();
            tokio::spawn(async move {
                let mut buf = vec![0u8; 8192];
                let mut head = Vec::new();
                while !head.windows(4).any(|w| w == b"\r\n\r\n") {
                    match s.read(&mut buf).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => head.extend_from_slice(&buf[..n]),
                    }
                }
                let _ = s
                    .write_all(b"HTTP/1.1 101 Switching Protocols\r\nConnection: Upgrade\r\nUpgrade: h2c\r\n\r\n")
                    .await;
                while let Ok(n) = s.read(&mut buf).await {
                    if n == 0 {
                        return;
                    }
                    seen.lock().unwrap().extend_from_slice(&buf[..n]);
                }
            });
        }
    });
    (addr, after)
}

#[tokio::test]
async fn an_h2c_upgrade_is_never_tunnelled() {
    let (addr, after) = upgrading_upstream().await;
    let gw = gateway(
        "",
        &format!("[[routes]]\npath_prefix = \"/public\"\nupstream = \"http://{addr}\"\nauth = \"none\"\n"),
    )
    .await;
    let mut tls = raw_tls(gw.addr, b"http/1.1").await;
    tls.write_all(
        b"GET /public/x HTTP/1.1\r\nHost: localhost\r\nConnection: Upgrade, HTTP2-Settings\r\nUpgrade: h2c\r\n\
          HTTP2-Settings: AAMAAABkAAQAoAAAAAIAAAAA\r\n\r\n",
    )
    .await
    .unwrap();
    let mut buf = vec![0u8; 4096];
    let n = tokio::time::timeout(BOUND, tls.read(&mut buf)).await.unwrap().unwrap();
    let head = String::from_utf8_lossy(&buf[..n]).into_owned();
    assert_eq!(
        status_of(&head),
        502,
        "the upstream's 101 must not open a tunnel: {head}"
    );
    // Whatever the client sends next never reaches the upstream as raw bytes.
    let _ = tls
        .write_all(b"GET /internal/admin HTTP/1.1\r\nHost: localhost\r\nX-Auth-Subject: admin\r\n\r\n")
        .await;
    let _ = read_until_closed(&mut tls, BOUND).await;
    assert!(after.lock().unwrap().is_empty(), "raw bytes reached the upstream");
}

/// An upstream that tells the test it got a request and never answers.
async fn holding_upstream() -> (std::net::SocketAddr, Arc<Notify>) {
    let arrived = Arc::new(Notify::new());
    let signal = arrived.clone();
    let handler: Handler = Arc::new(move |_req| {
        let signal = signal.clone();
        Box::pin(async move {
            signal.notify_one();
            tokio::time::sleep(Duration::from_secs(3600)).await;
            Response::new(full("too late"))
        })
    });
    (upstream::serve(handler).await, arrived)
}

#[tokio::test]
async fn a_request_the_client_abandons_is_logged_as_499() {
    let (addr, arrived) = holding_upstream().await;
    let gw = gateway(
        "",
        &format!("[[routes]]\npath_prefix = \"/slow\"\nupstream = \"http://{addr}\"\nauth = \"none\"\n"),
    )
    .await;
    // HTTP/1.1: the client closes its connection while the upstream works.
    let mut tls = raw_tls(gw.addr, b"http/1.1").await;
    tls.write_all(
        b"POST /slow/order HTTP/1.1\r\nHost: localhost\r\nX-Request-Id: abandoned-h1\r\nUser-Agent: impatient/1\r\n\
          Content-Length: 5\r\n\r\nhello",
    )
    .await
    .unwrap();
    tokio::time::timeout(BOUND, arrived.notified()).await.unwrap();
    drop(tls);
    let line = logged(&["abandoned-h1", "499"]).await;
    assert!(line.contains("bytes_in=5"), "{line}");
    assert!(line.contains("impatient/1"), "{line}");

    // HTTP/2: the client resets the stream.
    let mut h2 = h2_client(gw.addr).await;
    let req = Request::post(format!("https://localhost:{}/slow/order", gw.addr.port()))
        .header("x-request-id", "abandoned-h2")
        .body(())
        .unwrap();
    let (_resp, mut stream) = h2.send_request(req, true).unwrap();
    tokio::time::timeout(BOUND, arrived.notified()).await.unwrap();
    stream.send_reset(h2::Reason::CANCEL);
    logged(&["abandoned-h2", "499"]).await;
}

#[tokio::test]
async fn the_host_comes_from_the_target_or_authority_and_must_be_one_valid_host() {
    let up = Upstream::recording().await;
    let routes = format!(
        "[[routes]]\npath_prefix = \"/\"\nupstream = \"{u}\"\nauth = \"none\"\n\
         [[routes]]\npath_prefix = \"/\"\nhost = \"admin.example\"\nupstream = \"{u}\"\n",
        u = up.url()
    );
    let gw = gateway("", &routes).await;
    let req = |target: &str, hosts: &str| format!("GET {target} HTTP/1.1\r\n{hosts}Connection: close\r\n\r\n");
    // The public catch-all answers 200; the admin host's route needs a token (401).
    assert_eq!(status_of(&exchange(&gw, &req("/x", "Host: localhost\r\n")).await), 200);
    assert_eq!(
        status_of(&exchange(&gw, &req("/x", "Host: admin.example\r\n")).await),
        401
    );
    assert_eq!(
        status_of(&exchange(&gw, &req("https://admin.example/x", "Host: localhost\r\n")).await),
        401,
        "an absolute-form target is routed by its own authority"
    );
    assert_eq!(
        status_of(&exchange(&gw, &req("/x", "Host: admin.example.\r\n")).await),
        401,
        "a trailing dot names the same host"
    );
    for bad in [
        "",
        "Host: a\r\nHost: b\r\n",
        "Host: a b\r\n",
        "Host: u@admin.example\r\n",
    ] {
        let r = exchange(&gw, &req("/x", bad)).await;
        assert_eq!(status_of(&r), 400, "{bad:?}: {r}");
    }

    // HTTP/2: a Host that differs from :authority is refused.
    let mut h2 = h2_client(gw.addr).await;
    let mismatch = Request::get(format!("https://localhost:{}/x", gw.addr.port()))
        .header("host", "admin.example")
        .body(())
        .unwrap();
    let (resp, _) = h2.send_request(mismatch, true).unwrap();
    assert_eq!(tokio::time::timeout(BOUND, resp).await.unwrap().unwrap().status(), 400);
}

#[tokio::test]
async fn a_head_larger_than_max_header_bytes_gets_431() {
    let up = Upstream::recording().await;
    let gw = gateway(
        "max_header_bytes = 16384",
        &format!(
            "[[routes]]\npath_prefix = \"/up\"\nupstream = \"{}\"\nauth = \"none\"\n",
            up.url()
        ),
    )
    .await;
    let big = "a".repeat(200_000);
    let r = exchange(
        &gw,
        &format!("GET /up/x HTTP/1.1\r\nHost: localhost\r\nX-Big: {big}\r\n\r\n"),
    )
    .await;
    assert_eq!(status_of(&r), 431, "{}", &r[..r.len().min(200)]);
    let fits = exchange(
        &gw,
        &format!(
            "GET /up/x HTTP/1.1\r\nHost: localhost\r\nX-Small: {}\r\nConnection: close\r\n\r\n",
            "a".repeat(8000)
        ),
    )
    .await;
    assert_eq!(status_of(&fits), 200);
    assert_eq!(up.count(), 1, "the oversized request never reached the upstream");

    let mut h2 = h2_client(gw.addr).await;
    let req = Request::get(format!("https://localhost:{}/up/x", gw.addr.port()))
        .header("x-big", "a".repeat(200_000))
        .body(())
        .unwrap();
    let refused = match h2.send_request(req, true) {
        Ok((resp, _)) => match tokio::time::timeout(BOUND, resp).await.unwrap() {
            Ok(r) => r.status() == 431,
            Err(_) => true, // the stream (or connection) was reset
        },
        Err(_) => true,
    };
    assert!(refused, "an oversized HTTP/2 header list was served");
    assert_eq!(up.count(), 1);
}

#[tokio::test]
async fn trace_and_connect_are_never_forwarded() {
    let up = Upstream::recording().await;
    let gw = gateway(
        "",
        &format!(
            "[[routes]]\npath_prefix = \"/\"\nupstream = \"{}\"\nauth = \"none\"\n",
            up.url()
        ),
    )
    .await;
    let r = exchange(&gw, "TRACE /x HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n").await;
    assert_eq!(status_of(&r), 405, "{r}");
    assert!(r.to_ascii_lowercase().contains("allow: get"), "{r}");
    assert_eq!(up.count(), 0);
}

#[tokio::test]
async fn a_malformed_chunked_body_from_the_client_is_its_400_not_a_502() {
    let up = Upstream::recording().await;
    let gw = gateway(
        "",
        &format!(
            "[[routes]]\npath_prefix = \"/up\"\nupstream = \"{}\"\nauth = \"none\"\n",
            up.url()
        ),
    )
    .await;
    let r = exchange(
        &gw,
        "POST /up/x HTTP/1.1\r\nHost: localhost\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\nZZZ\r\n",
    )
    .await;
    assert_eq!(status_of(&r), 400, "{r}");
}

/// The body [`endless_upstream`] promises: far more than the socket buffers between it and a
/// client hold.
const ENDLESS: usize = 64 * 1024 * 1024;

/// An upstream that answers each request with an `ENDLESS`-byte body, written for as long as the
/// gateway takes it; says how each connection's writing ended.
async fn endless_upstream() -> (String, tokio::sync::mpsc::UnboundedReceiver<std::io::Result<()>>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = listener.accept().await {
            let tx = tx.clone();
            tokio::spawn(async move {
                let mut head = Vec::new();
                let mut buf = [0u8; 1024];
                while !head.windows(4).any(|w| w == b"\r\n\r\n") {
                    match s.read(&mut buf).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => head.extend_from_slice(&buf[..n]),
                    }
                }
                let written = async {
                    let head = format!("HTTP/1.1 200 OK\r\nContent-Length: {ENDLESS}\r\n\r\n");
                    s.write_all(head.as_bytes()).await?;
                    let chunk = vec![0u8; 64 * 1024];
                    for _ in 0..ENDLESS / chunk.len() {
                        s.write_all(&chunk).await?;
                    }
                    Ok(())
                }
                .await;
                let _ = tx.send(written);
            });
        }
    });
    (url, rx)
}

/// Waits for [`endless_upstream`]'s connection to end in an error: the gateway dropped it.
async fn upstream_cut(ended: &mut tokio::sync::mpsc::UnboundedReceiver<std::io::Result<()>>) {
    let written = tokio::time::timeout(BOUND, ended.recv())
        .await
        .expect("the upstream is still writing: its connection was kept")
        .unwrap();
    assert!(written.is_err(), "the upstream wrote its whole body");
}

/// Sends a GET over HTTP/2 and waits for the response head.
async fn h2_get(
    send: &mut h2::client::SendRequest<Bytes>,
    gw: &support::TestGateway,
    path: &str,
) -> Response<h2::RecvStream> {
    let req = Request::get(format!("https://localhost:{}{path}", gw.addr.port()))
        .body(())
        .unwrap();
    let (response, _) = send.send_request(req, true).unwrap();
    tokio::time::timeout(BOUND, response).await.unwrap().unwrap()
}

async fn send_timeout_gateway(upstream: &str) -> support::TestGateway {
    gateway(
        "send_timeout = \"200ms\"",
        &format!("[[routes]]\npath_prefix = \"/big\"\nupstream = \"{upstream}\"\nauth = \"none\"\n"),
    )
    .await
}

#[tokio::test]
async fn a_client_that_stops_reading_is_dropped_after_send_timeout_and_its_upstream_connection_with_it() {
    let (url, mut ended) = endless_upstream().await;
    let gw = send_timeout_gateway(&url).await;
    let mut tls = raw_tls(gw.addr, b"http/1.1").await;
    tls.write_all(b"GET /big HTTP/1.1\r\nHost: localhost\r\n\r\n")
        .await
        .unwrap();
    let mut buf = vec![0u8; 16 * 1024];
    let n = tokio::time::timeout(BOUND, tls.read(&mut buf)).await.unwrap().unwrap();
    assert!(
        buf[..n].starts_with(b"HTTP/1.1 200"),
        "{}",
        String::from_utf8_lossy(&buf[..n])
    );
    // The client reads no more. Without the bound the gateway would wait for it for ever, and
    // the upstream's writes with it.
    upstream_cut(&mut ended).await;
    // The client's connection was closed too: what is left for it ends well short of the body.
    let mut total = n;
    while let Ok(Ok(n @ 1..)) = tokio::time::timeout(BOUND, tls.read(&mut buf)).await {
        total += n;
    }
    assert!(total < ENDLESS, "{total} bytes");
}

#[tokio::test]
async fn an_http2_client_that_stops_reading_is_dropped_after_send_timeout_and_its_upstream_connection_with_it() {
    let (url, mut ended) = endless_upstream().await;
    let gw = send_timeout_gateway(&url).await;
    let io = support::client::Tapped::new(raw_tls(gw.addr, b"h2").await);
    let stop = io.stop_reading.clone();
    // Flow control never stops the gateway: only the client's socket does.
    let window = ENDLESS as u32;
    let (mut send, conn) = h2::client::Builder::new()
        .initial_window_size(window)
        .initial_connection_window_size(window)
        .handshake::<_, Bytes>(io)
        .await
        .unwrap();
    let conn = tokio::spawn(conn);
    let response = h2_get(&mut send, &gw, "/big").await;
    assert_eq!(response.status(), 200);
    stop.store(true, std::sync::atomic::Ordering::SeqCst);
    upstream_cut(&mut ended).await;
    conn.abort();
}

#[tokio::test]
async fn an_http2_stream_the_client_grants_no_window_is_reset_after_send_timeout_and_its_upstream_connection_closed() {
    let (url, mut ended) = endless_upstream().await;
    let gw = send_timeout_gateway(&url).await;
    // The client reads its socket (PINGs, SETTINGS, headers) but opens no stream's window, so the
    // gateway cannot send a byte of the body: nothing blocks at the socket.
    let (mut send, conn) = h2::client::Builder::new()
        .initial_window_size(0)
        .handshake::<_, Bytes>(raw_tls(gw.addr, b"h2").await)
        .await
        .unwrap();
    let conn = tokio::spawn(conn);
    let response = h2_get(&mut send, &gw, "/big").await;
    assert_eq!(response.status(), 200);
    upstream_cut(&mut ended).await;
    // The stream was reset; the connection serves on.
    let mut body = response.into_body();
    let got = tokio::time::timeout(BOUND, body.data()).await.unwrap();
    assert!(matches!(got, Some(Err(_))), "{got:?}");
    // (Its head only: this client opens no stream's window.)
    let next = h2_get(&mut send, &gw, "/.well-known/jwks.json").await;
    assert_eq!(next.status(), 200);
    conn.abort();
}
