//! The process shell: ALPN, timeouts, graceful shutdown, the admin listener.

use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::support::{self, Client, Proto, json};

/// Reads until the peer closes; panics if it has not closed within `bound` (a hang guard, not a
/// timing assertion: the gateway's own timeouts are far shorter).
async fn assert_closed_by_peer(stream: &mut (impl AsyncReadExt + Unpin), bound: Duration) {
    let mut buf = [0u8; 1024];
    let closed = tokio::time::timeout(bound, async {
        loop {
            match stream.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(_) => continue,
            }
        }
    })
    .await;
    assert!(closed.is_ok(), "the gateway did not close the connection");
}

#[tokio::test]
async fn alpn_selects_h2_or_http11_and_unrouted_paths_get_a_json_404() {
    let gw = support::start_with_routes("", &[]).await;
    for (proto, version) in [
        (Proto::Http2, http::Version::HTTP_2),
        (Proto::Http1, http::Version::HTTP_11),
    ] {
        let r = Client::new(proto).get(&gw.url("/anything"), &[]).await;
        assert_eq!(r.version, version);
        assert_eq!(r.status, 404);
        assert_eq!(r.header("content-type"), "application/json");
        assert_eq!(json(&r.body)["error"], "not_found");
        assert!(!r.header("x-request-id").is_empty());
    }
}

#[tokio::test]
async fn request_id_is_kept_when_sane_and_replaced_when_not() {
    let gw = support::start_with_routes("", &[]).await;
    let c = Client::new(Proto::Http1);
    let r = c.get(&gw.url("/x"), &[("x-request-id", "abc-123.req")]).await;
    assert_eq!(r.header("x-request-id"), "abc-123.req");
    let r = c.get(&gw.url("/x"), &[("x-request-id", "bad id with spaces")]).await;
    assert_ne!(r.header("x-request-id"), "bad id with spaces");
}

#[tokio::test]
async fn a_silent_tcp_client_is_disconnected_after_the_handshake_timeout() {
    let gw = support::start_with_routes("", &[]).await;
    let mut tcp = TcpStream::connect(gw.addr).await.unwrap();
    assert_closed_by_peer(&mut tcp, Duration::from_secs(20)).await;
}

#[tokio::test]
async fn half_a_request_head_is_disconnected_after_the_header_read_timeout() {
    let gw = support::start_with_routes("", &[]).await;
    let tcp = TcpStream::connect(gw.addr).await.unwrap();
    let connector = tokio_rustls::TlsConnector::from(std::sync::Arc::new(support::client::tls_config(&[b"http/1.1"])));
    let mut tls = connector.connect("localhost".try_into().unwrap(), tcp).await.unwrap();
    tls.write_all(b"GET /slow HTTP/1.1\r\nHost: localhost\r\nX-Slow: ")
        .await
        .unwrap();
    assert_closed_by_peer(&mut tls, Duration::from_secs(20)).await;
}

/// A TLS HTTP/1.1 connection to the gateway.
async fn tls_http11(addr: std::net::SocketAddr) -> tokio_rustls::client::TlsStream<TcpStream> {
    let tcp = TcpStream::connect(addr).await.unwrap();
    let connector = tokio_rustls::TlsConnector::from(std::sync::Arc::new(support::client::tls_config(&[b"http/1.1"])));
    connector.connect("localhost".try_into().unwrap(), tcp).await.unwrap()
}

/// Sends one GET on a keep-alive connection and reads its whole response (the gateway's 404s
/// carry a Content-Length).
async fn keep_alive_get(tls: &mut (impl AsyncReadExt + AsyncWriteExt + Unpin)) -> u16 {
    tls.write_all(b"GET /nothing-here HTTP/1.1\r\nHost: localhost\r\n\r\n")
        .await
        .unwrap();
    read_response(tls).await
}

/// Reads one whole response (with a Content-Length); its status.
async fn read_response(tls: &mut (impl AsyncReadExt + Unpin)) -> u16 {
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    let within = tokio::time::timeout(Duration::from_secs(20), async {
        loop {
            let n = tls.read(&mut buf).await.unwrap();
            assert!(n > 0, "closed mid-response: {}", String::from_utf8_lossy(&got));
            got.extend_from_slice(&buf[..n]);
            let text = String::from_utf8_lossy(&got);
            if let Some(end) = text.find("\r\n\r\n") {
                let length: usize = text[..end]
                    .lines()
                    .find_map(|l| {
                        l.to_ascii_lowercase()
                            .strip_prefix("content-length:")
                            .map(|v| v.trim().parse().unwrap())
                    })
                    .unwrap();
                if got.len() >= end + 4 + length {
                    return text[9..12].parse().unwrap();
                }
            }
        }
    });
    within.await.expect("no response")
}

/// A config whose header_read_timeout and idle_timeout are `head` and `idle`.
fn timeouts(head: &str, idle: &str) -> String {
    support::config_toml("", "")
        .replace(
            "header_read_timeout = \"300ms\"",
            &format!("header_read_timeout = \"{head}\""),
        )
        .replace("idle_timeout = \"300ms\"", &format!("idle_timeout = \"{idle}\""))
}

#[tokio::test]
async fn an_idle_keep_alive_connection_is_closed_after_idle_timeout_not_header_read_timeout() {
    // header_read_timeout far beyond the hang guard: only idle_timeout can close the connection.
    let gw = support::start(&timeouts("10m", "300ms")).await;
    let mut tls = tls_http11(gw.addr).await;
    assert_eq!(keep_alive_get(&mut tls).await, 404);
    assert_closed_by_peer(&mut tls, Duration::from_secs(20)).await;
}

/// `timeouts` with `server.park_idle_after`.
fn parking(head: &str, idle: &str, park: &str) -> String {
    timeouts(head, idle).replace(
        &format!("idle_timeout = \"{idle}\""),
        &format!("idle_timeout = \"{idle}\"\npark_idle_after = \"{park}\""),
    )
}

/// Waits (hang guard: 20 s) until the gateway counts `n` parked connections.
async fn until_parked(gw: &mut support::TestGateway, n: i64) {
    let parked = gw.running().app().state().metrics.connections_parked.clone();
    let reached = tokio::time::timeout(Duration::from_secs(20), async {
        while parked.get() != n {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    })
    .await;
    assert!(reached.is_ok(), "parked connections: {}, expected {n}", parked.get());
}

/// A gateway on `toml` and one HTTP/1.1 connection that made a request and is now parked.
async fn parked_connection(toml: &str) -> (support::TestGateway, tokio_rustls::client::TlsStream<TcpStream>) {
    let mut gw = support::start(toml).await;
    let mut tls = tls_http11(gw.addr).await;
    assert_eq!(keep_alive_get(&mut tls).await, 404);
    until_parked(&mut gw, 1).await;
    (gw, tls)
}

#[tokio::test]
async fn a_parked_http11_connection_keeps_none_of_hypers_buffers() {
    const NAME: &str = "server::a_parked_http11_connection_keeps_none_of_hypers_buffers";
    // The allocation count is the whole process's: the measurement runs in a copy of this test
    // binary running this test alone.
    if std::env::var_os("TOKENGATE_TEST_ALONE").is_none() {
        let out = std::process::Command::new(std::env::current_exe().unwrap())
            .args(["--exact", NAME, "--test-threads=1", "--nocapture"])
            .env("TOKENGATE_TEST_ALONE", "1")
            .output()
            .unwrap();
        let said = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(out.status.success() && said.contains("1 passed"), "{said}");
        return;
    }
    // Plain HTTP: a client's TCP stream allocates next to nothing, so what the count shows is
    // the gateway's.
    let toml = parking("10m", "10m", "50ms");
    let toml: String = toml
        .lines()
        .filter(|l| !l.starts_with("tls = "))
        .collect::<Vec<_>>()
        .join("\n");
    let mut gw = support::start(&toml).await;
    // A first connection pays what the first use allocates once (pools, caches).
    let mut first = TcpStream::connect(gw.addr).await.unwrap();
    assert_eq!(keep_alive_get(&mut first).await, 404);
    until_parked(&mut gw, 1).await;
    const N: usize = 50;
    let region = stats_alloc::Region::new(crate::ALLOC);
    let mut held = Vec::new();
    for _ in 0..N {
        let mut tcp = TcpStream::connect(gw.addr).await.unwrap();
        assert_eq!(keep_alive_get(&mut tcp).await, 404);
        held.push(tcp);
    }
    until_parked(&mut gw, N as i64 + 1).await;
    let c = region.change();
    // (stats_alloc counts a reallocation's growth or shrinking in these two already.)
    let kept = c.bytes_allocated as isize - c.bytes_deallocated as isize;
    let per_connection = kept / N as isize;
    println!("a parked connection (and its client's TCP stream) keeps {per_connection} bytes");
    // What stays: the task, the socket, the connection's bookkeeping, about 2-3 KiB. hyper's read
    // buffer alone is 8 KiB: kept, it shows.
    assert!(
        per_connection < 6 * 1024,
        "a parked connection keeps {per_connection} bytes of heap"
    );
}

#[tokio::test]
async fn an_idle_http11_connection_is_parked_and_then_serves_its_next_request() {
    let (mut gw, mut tls) = parked_connection(&parking("10m", "10m", "50ms")).await;
    // The same connection, taken over by a new hyper connection when the client sends again.
    assert_eq!(keep_alive_get(&mut tls).await, 404);
    assert_eq!(keep_alive_get(&mut tls).await, 404);
    // And parked again once idle.
    until_parked(&mut gw, 1).await;
    assert_eq!(keep_alive_get(&mut tls).await, 404);
}

#[tokio::test]
async fn a_connection_whose_request_body_is_unfinished_is_not_parked_after_an_early_response() {
    // The upstream answers at once and reads the body afterwards.
    let handler: support::upstream::Handler = std::sync::Arc::new(|req| {
        Box::pin(async move {
            tokio::spawn(http_body_util::BodyExt::collect(req.into_body()));
            http::Response::new(support::upstream::full("early"))
        })
    });
    let up = support::upstream::serve(handler).await;
    let toml = parking("10m", "10m", "50ms").replace(
        "[[users]]",
        &format!("[[routes]]\npath_prefix = \"/early\"\nupstream = \"http://{up}\"\nauth = \"none\"\n\n[[users]]"),
    );
    let mut gw = support::start(&toml).await;
    let mut tls = tls_http11(gw.addr).await;
    // The body's second half is a request to the same route: were it parsed as a request, its
    // 200 would come before the 404 of the GET sent after the body.
    let rest = b"GET /early/smuggled HTTP/1.1\r\nHost: localhost\r\n\r\n";
    let head = format!(
        "POST /early/x HTTP/1.1\r\nHost: localhost\r\nContent-Length: {}\r\n\r\nhalf",
        4 + rest.len()
    );
    tls.write_all(head.as_bytes()).await.unwrap();
    assert_eq!(read_response(&mut tls).await, 200);
    // The client pauses mid-body for many times park_idle_after: hyper is still reading the
    // body, so the connection is not idle.
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(gw.running().app().state().metrics.connections_parked.get(), 0);
    tls.write_all(rest).await.unwrap();
    assert_eq!(
        keep_alive_get(&mut tls).await,
        404,
        "part of a body was taken for a request"
    );
    // Once the body has ended the connection is idle, and parked.
    until_parked(&mut gw, 1).await;
}

#[tokio::test]
async fn a_parked_connection_is_closed_after_the_idle_timeout() {
    let (mut gw, mut tls) = parked_connection(&parking("10m", "1s", "50ms")).await;
    assert_closed_by_peer(&mut tls, Duration::from_secs(20)).await;
    until_parked(&mut gw, 0).await;
}

#[tokio::test]
async fn shutdown_closes_parked_connections_at_once() {
    let (mut gw, mut tls) = parked_connection(&parking("10m", "10m", "50ms")).await;
    let mut running = gw.running.take().unwrap();
    running.stop_accepting().await;
    // Long before the 10 minutes of idle_timeout (the bound is a hang guard).
    assert_closed_by_peer(&mut tls, Duration::from_secs(20)).await;
    assert_eq!(running.finish().await, tokengate::Drained::Cleanly);
}

#[tokio::test]
async fn a_slow_request_head_on_a_kept_alive_connection_is_bounded_by_header_read_timeout() {
    // idle_timeout far beyond the hang guard: only header_read_timeout can close the connection.
    let gw = support::start(&timeouts("300ms", "10m")).await;
    let mut tls = tls_http11(gw.addr).await;
    assert_eq!(keep_alive_get(&mut tls).await, 404);
    // Idle for several header_read_timeouts: the keep-alive wait is not a request head...
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert_eq!(keep_alive_get(&mut tls).await, 404, "the idle connection was closed");
    // ...but a head that has begun must be finished within header_read_timeout.
    tls.write_all(b"GET /slow HTTP/1.1\r\nHost: localhost\r\nX-Slow: ")
        .await
        .unwrap();
    assert_closed_by_peer(&mut tls, Duration::from_secs(20)).await;

    // A new connection's first request is bounded the same way.
    let mut silent = tls_http11(gw.addr).await;
    assert_closed_by_peer(&mut silent, Duration::from_secs(20)).await;
}

#[tokio::test]
async fn health_and_readiness() {
    let mut gw = support::start_with_routes("", &[]).await;
    let admin = format!("http://{}", gw.admin_addr);
    let plain = hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
        .build_http::<http_body_util::Empty<bytes::Bytes>>();
    let status = |path: &str| {
        let uri: http::Uri = format!("{admin}{path}").parse().unwrap();
        let plain = plain.clone();
        async move { plain.get(uri).await.map(|r| r.status().as_u16()) }
    };
    assert_eq!(status("/healthz").await.unwrap(), 200);
    assert_eq!(status("/readyz").await.unwrap(), 200);
    gw.running().stop_accepting().await;
    assert_eq!(
        status("/readyz").await.unwrap(),
        503,
        "not ready once shutdown has begun"
    );
    assert_eq!(status("/healthz").await.unwrap(), 200, "still alive while draining");
}

#[tokio::test]
async fn graceful_shutdown_finishes_in_flight_requests_and_refuses_new_connections() {
    // An upstream that answers only when told to.
    let (arrived_tx, mut arrived_rx) = tokio::sync::mpsc::channel::<()>(1);
    let release = std::sync::Arc::new(tokio::sync::Notify::new());
    let release2 = release.clone();
    let handler: support::upstream::Handler = std::sync::Arc::new(move |_req| {
        let arrived = arrived_tx.clone();
        let release = release2.clone();
        Box::pin(async move {
            arrived.send(()).await.unwrap();
            release.notified().await;
            http::Response::new(support::upstream::full("finished"))
        })
    });
    let up = support::upstream::serve(handler).await;
    let mut gw = support::start_with_routes(
        "",
        &[("/slow", &format!("http://{up}"), "auth = \"none\"\ntimeout = \"60s\"")],
    )
    .await;

    let client = Client::new(Proto::Http1);
    let url = gw.url("/slow");
    let in_flight = tokio::spawn(async move { client.get(&url, &[]).await });
    arrived_rx.recv().await.unwrap();

    let mut running = gw.running.take().unwrap();
    running.stop_accepting().await;
    let refused = TcpStream::connect(gw.addr).await;
    assert!(refused.is_err(), "new connections are refused once draining");

    release.notify_one();
    let r = in_flight.await.unwrap();
    assert_eq!((r.status, r.text().as_str()), (200, "finished"));
    assert_eq!(running.finish().await, tokengate::Drained::Cleanly);
}

#[tokio::test]
async fn without_tls_the_listener_speaks_plain_http11() {
    let toml = support::config_toml(
        "",
        "[[routes]]\npath_prefix = \"/pub\"\nupstream = \"echo\"\nauth = \"none\"\n",
    );
    let start = toml.find("tls = {").unwrap();
    let end = start + toml[start..].find('\n').unwrap();
    let plain_toml = format!("{}{}", &toml[..start], &toml[end..]);
    let gw = support::start(&plain_toml).await;
    let plain = hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
        .build_http::<http_body_util::Empty<bytes::Bytes>>();
    let resp = plain
        .get(format!("http://{}/pub/x", gw.addr).parse().unwrap())
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let body = http_body_util::BodyExt::collect(resp.into_body())
        .await
        .unwrap()
        .to_bytes();
    assert_eq!(json(&body)["headers"]["x-forwarded-proto"], "http");
}

#[tokio::test]
async fn an_idle_http2_connection_is_closed_after_the_idle_timeout() {
    let gw = support::start_with_routes("", &[]).await;
    let tcp = TcpStream::connect(gw.addr).await.unwrap();
    let connector = tokio_rustls::TlsConnector::from(std::sync::Arc::new(support::client::tls_config(&[b"h2"])));
    let tls = connector.connect("localhost".try_into().unwrap(), tcp).await.unwrap();
    let (mut send, conn) =
        hyper::client::conn::http2::handshake(hyper_util::rt::TokioExecutor::new(), hyper_util::rt::TokioIo::new(tls))
            .await
            .unwrap();
    let conn = tokio::spawn(conn);
    let req = http::Request::get(gw.url("/x"))
        .body(http_body_util::Empty::<bytes::Bytes>::new())
        .unwrap();
    assert_eq!(send.send_request(req).await.unwrap().status(), 404);
    // Now idle: the gateway sends GOAWAY and the connection ends.
    let ended = tokio::time::timeout(Duration::from_secs(20), conn).await;
    assert!(ended.is_ok(), "the idle HTTP/2 connection was not closed");
}

#[tokio::test]
async fn parallel_wrong_passwords_are_counted_before_any_is_checked() {
    let gw = support::start_with_routes("", &[]).await;
    let c = Client::new(Proto::Http2);
    let tasks: Vec<_> = (0..20)
        .map(|_| {
            let (c, url) = (c.clone(), gw.url("/api/oauth2/token"));
            tokio::spawn(async move {
                c.form(
                    &url,
                    &[
                        ("grant_type", "password"),
                        ("client_id", "web"),
                        ("username", support::USER),
                        ("password", "guess"),
                    ],
                    &[],
                )
                .await
                .status
            })
        })
        .collect();
    let mut checked = 0;
    for t in tasks {
        match t.await.unwrap() {
            400 => checked += 1,
            429 => {}
            s => panic!("unexpected {s}"),
        }
    }
    assert!(checked <= 5, "{checked} guesses reached Argon2; the limit is 5");
}
