//! Forwarding: header hygiene and identity, path normalization, streaming both ways, upstream
//! failures, WebSocket upgrades, HTTP/2 clients in front of HTTP/1.1 upstreams.

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use futures_util::{SinkExt, StreamExt};
use http::{Method, Request, Response};
use http_body_util::{BodyExt, StreamBody};
use hyper::body::Frame;
use hyper_util::rt::TokioIo;
use rustls_pki_types::pem::PemObject;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;

use crate::support::upstream::{self, Handler, UpBody, full};
use crate::support::{self, Client, Proto, Upstream, json, login, str_of};

/// A body fed by a channel, one frame per message.
type FrameStream = futures_util::stream::BoxStream<'static, Result<Frame<Bytes>, Infallible>>;

fn channel_body(rx: mpsc::Receiver<Bytes>) -> StreamBody<FrameStream> {
    StreamBody::new(
        futures_util::stream::unfold(
            rx,
            |mut rx| async move { rx.recv().await.map(|b| (Ok(Frame::data(b)), rx)) },
        )
        .boxed(),
    )
}

/// Guards against a hang (a buffering gateway would deadlock these tests).
async fn within<T>(what: &str, f: impl std::future::Future<Output = T>) -> T {
    tokio::time::timeout(Duration::from_secs(20), f)
        .await
        .unwrap_or_else(|_| panic!("timed out: {what}"))
}

async fn token(gw: &support::TestGateway) -> String {
    str_of(&login(&Client::new(Proto::Http1), gw, None).await, "access_token").to_owned()
}

#[tokio::test]
async fn identity_headers_are_set_from_the_token_and_spoofed_copies_never_arrive() {
    let up = Upstream::recording().await;
    let gw = support::start_with_routes(
        "",
        &[
            ("/api/orders", &up.url(), "scopes = [\"orders:read\"]"),
            ("/public", &up.url(), "auth = \"none\""),
        ],
    )
    .await;
    let c = Client::new(Proto::Http1);
    let t = token(&gw).await;
    let auth = format!("Bearer {t}");
    let spoofed = [
        ("x-auth-subject", "admin"),
        ("X-Auth-Scope", "everything"),
        ("x-auth-session", "s"),
        ("x-auth-client-id", "trusted"),
        ("x-auth-role", "root"),
        ("connection", "x-hop"),
        ("x-hop", "1"),
        ("x-forwarded-proto", "http"),
        ("x-forwarded-for", "198.51.100.9"),
        ("x_auth_subject", "admin"),
        ("X_Auth_Scope", "everything"),
        ("forwarded", "for=198.51.100.66;host=evil.example"),
        ("x-real-ip", "198.51.100.66"),
    ];

    let mut headers = spoofed.to_vec();
    headers.push(("authorization", &auth));
    // Without a body (the gateway's own upstream client writes the head) and with one (hyper's
    // client sends the edited header map): the same headers arrive.
    for body in ["", "a body"] {
        let method = if body.is_empty() { Method::GET } else { Method::POST };
        let r = c
            .request(method, &gw.url("/api/orders/7?x=1"), &headers, Bytes::from(body))
            .await;
        assert_eq!(r.status, 200, "{body:?}");
        let seen = up.last();
        assert_eq!(seen.uri, "/api/orders/7?x=1");
        assert_eq!(seen.body, body);
        for name in [
            "host",
            "x-forwarded-for",
            "x-forwarded-proto",
            "x-forwarded-host",
            "x-request-id",
            "x-auth-scope",
        ] {
            assert_eq!(
                seen.headers.get_all(name).iter().count(),
                1,
                "{body:?}: {name} {:?}",
                seen.headers
            );
        }
        assert_eq!(
            seen.headers.get_all("x-auth-subject").iter().collect::<Vec<_>>(),
            ["ann"]
        );
        assert_eq!(seen.headers["x-auth-client-id"], "web");
        assert_eq!(seen.headers["x-auth-scope"], "orders:read orders:write");
        assert!(!seen.headers["x-auth-session"].is_empty());
        assert_ne!(seen.headers["x-auth-session"], "s");
        assert!(!seen.headers.contains_key("x-auth-role"));
        assert!(
            !seen.headers.keys().any(|k| k.as_str().contains('_')),
            "underscore spellings (CGI reads X_Auth_Subject as X-Auth-Subject) are dropped"
        );
        assert!(!seen.headers.contains_key("forwarded") && !seen.headers.contains_key("x-real-ip"));
        assert!(
            !seen.headers.contains_key("authorization"),
            "the token is not forwarded by default"
        );
        assert!(
            !seen.headers.contains_key("x-hop"),
            "Connection-named headers are hop-by-hop"
        );
        assert_eq!(seen.headers["x-forwarded-proto"], "https");
        // The client is not a trusted proxy: its X-Forwarded-For is not believed, and not passed on.
        assert_eq!(seen.headers["x-forwarded-for"], "127.0.0.1");
        assert_eq!(
            seen.headers["x-forwarded-host"],
            format!("localhost:{}", gw.addr.port())
        );
        assert_eq!(seen.headers["host"], up.addr.to_string());
        assert!(seen.headers.contains_key("x-request-id"));
    }

    // A public route: every spoofed identity header is dropped too.
    assert_eq!(c.get(&gw.url("/public"), &spoofed).await.status, 200);
    let seen = up.last();
    assert!(
        !seen.headers.keys().any(|k| k.as_str().starts_with("x-auth-")),
        "{:?}",
        seen.headers
    );
}

/// The access line of the request with this id, from the captured logs.
fn access_line(request_id: &str) -> String {
    support::logs::captured()
        .lines()
        .find(|l| l.contains("tokengate::access") && l.contains(&format!("request_id=\"{request_id}\"")))
        .unwrap_or_else(|| panic!("no access line for {request_id}"))
        .to_owned()
}

#[tokio::test]
async fn behind_a_trusted_proxy_the_forwarded_client_is_used_for_xff_the_log_and_the_login_limiter() {
    let up = Upstream::recording().await;
    let toml = support::with_server_keys(
        &support::config_toml(
            "",
            &format!(
                "[[routes]]\npath_prefix = \"/pub\"\nupstream = \"{}\"\nauth = \"none\"\n",
                up.url()
            ),
        ),
        // The test client connects from 127.0.0.1: it plays the load balancer.
        "trusted_proxies = [\"127.0.0.0/8\"]",
    );
    let gw = support::start(&toml).await;
    let c = Client::new(Proto::Http1);
    let r = c
        .get(
            &gw.url("/pub/x"),
            &[
                ("x-forwarded-for", "203.0.113.50, 198.51.100.9"),
                ("x-request-id", "behind-lb-1"),
            ],
        )
        .await;
    assert_eq!(r.status, 200);
    // 203.0.113.50 was written by the client itself (198.51.100.9 is not a trusted proxy).
    assert_eq!(up.last().headers["x-forwarded-for"], "198.51.100.9, 127.0.0.1");
    let line = access_line("behind-lb-1");
    assert!(line.contains("client=\"198.51.100.9\""), "{line}");

    // The per-address login limit counts the forwarded client, not the balancer: 20 failures
    // from one client address (each with another username, so the per-user limit stays out of
    // it) slow that address down, and another client behind the same balancer is unaffected.
    let login = |xff: &'static str, user: String| {
        let (c, url) = (c.clone(), gw.url("/api/oauth2/token"));
        async move {
            c.form(
                &url,
                &[
                    ("grant_type", "password"),
                    ("client_id", "web"),
                    ("username", &user),
                    ("password", "wrong"),
                ],
                &[("x-forwarded-for", xff)],
            )
            .await
            .status
        }
    };
    for i in 0..20 {
        assert_eq!(login("198.51.100.9", format!("nobody-{i}")).await, 400);
    }
    assert_eq!(
        login("198.51.100.9", "nobody-20".into()).await,
        429,
        "the address is slowed down"
    );
    assert_eq!(
        login("198.51.100.10", "nobody-21".into()).await,
        400,
        "another client is not"
    );
}

#[tokio::test]
async fn route_options_strip_prefix_preserve_host_and_forward_authorization() {
    let up = Upstream::recording().await;
    let base = format!("{}/v1", up.url());
    let gw = support::start_with_routes(
        "",
        &[
            (
                "/svc",
                &base,
                "auth = \"none\"\nstrip_prefix = true\npreserve_host = true",
            ),
            ("/fwd", &up.url(), "forward_authorization = true"),
        ],
    )
    .await;
    let c = Client::new(Proto::Http1);
    c.get(&gw.url("/svc/items?q=a%20b"), &[]).await;
    let seen = up.last();
    assert_eq!(seen.uri, "/v1/items?q=a%20b");
    assert_eq!(seen.headers["host"], format!("localhost:{}", gw.addr.port()));
    c.get(&gw.url("/svc"), &[]).await;
    assert_eq!(up.last().uri, "/v1/");

    let t = token(&gw).await;
    assert_eq!(c.get_with_token(&gw.url("/fwd/x"), &t).await.status, 200);
    assert_eq!(up.last().headers["authorization"], format!("Bearer {t}"));
}

/// The upstream gets the path the gateway routed on: the normalized spelling when the client's
/// was not (the client's own target is passed on only when normalizing left it unchanged), with
/// the raw query either way.
#[tokio::test]
async fn the_upstream_gets_the_normalized_path_and_the_raw_query() {
    let up = Upstream::recording().await;
    let gw = support::start_with_routes("", &[("/public", &up.url(), "auth = \"none\"")]).await;
    let c = Client::new(Proto::Http1);
    for (sent, arrived) in [
        ("/public/a?q=%2e%2E/x", "/public/a?q=%2e%2E/x"),
        ("/public/./a?q=1", "/public/a?q=1"),
        ("/public//a/b/../c", "/public/a/c"),
        ("/public/%61%7e?x", "/public/a~?x"),
        ("/public/a%3fb", "/public/a%3Fb"),
    ] {
        assert_eq!(c.get(&gw.url(sent), &[]).await.status, 200, "{sent}");
        assert_eq!(up.last().uri, arrived, "{sent}");
    }
}

#[tokio::test]
async fn path_tricks_cannot_reach_a_route_they_do_not_belong_to() {
    let protected = Upstream::recording().await;
    let public = Upstream::recording().await;
    let gw = support::start_with_routes(
        "",
        &[
            ("/api/orders", &protected.url(), "scopes = [\"orders:read\"]"),
            ("/public", &public.url(), "auth = \"none\""),
        ],
    )
    .await;
    let c = Client::new(Proto::Http1);
    // Dot-segments are resolved before routing: this is /api/orders, which needs a token.
    assert_eq!(c.get(&gw.url("/public/../api/orders"), &[]).await.status, 401);
    assert_eq!(c.get(&gw.url("/public/./../api/orders/7"), &[]).await.status, 401);
    // Spellings that servers disagree on are refused.
    for path in [
        "/public/%2e%2e/api/orders",
        "/public/%2E./api/orders",
        "/public%2F..%2Fapi/orders",
        "/public/%2fx",
        "/public/%00",
    ] {
        let r = c.get(&gw.url(path), &[]).await;
        assert_eq!(r.status, 400, "{path}");
        assert_eq!(json(&r.body)["error"], "invalid_request");
    }
    // Prefixes match on segment boundaries only.
    assert_eq!(c.get(&gw.url("/publicx"), &[]).await.status, 404);
    assert_eq!(c.get(&gw.url("/api/ordersx"), &[]).await.status, 404);
    // The normalized spelling is what the upstream gets.
    assert_eq!(c.get(&gw.url("//public//a/./b/%7Euser"), &[]).await.status, 200);
    assert_eq!(public.last().uri, "/public/a/b/~user");
    assert_eq!(protected.count(), 0);
}

#[tokio::test]
async fn a_large_upload_streams_to_the_upstream() {
    let (first_tx, mut first_rx) = mpsc::channel::<Bytes>(1);
    let handler: Handler = Arc::new(move |req: Request<hyper::body::Incoming>| {
        let first_tx = first_tx.clone();
        Box::pin(async move {
            let mut body = req.into_body();
            let mut total = 0usize;
            let mut told = false;
            while let Some(frame) = body.frame().await {
                if let Ok(data) = frame.unwrap().into_data() {
                    total += data.len();
                    if !told {
                        first_tx.send(data).await.unwrap();
                        told = true;
                    }
                }
            }
            Response::new(full(total.to_string()))
        })
    });
    let up = upstream::serve(handler).await;
    let gw = support::start_with_routes("", &[("/upload", &format!("http://{up}"), "auth = \"none\"")]).await;

    // A raw HTTP/2 client whose request body the test feeds chunk by chunk.
    let tcp = TcpStream::connect(gw.addr).await.unwrap();
    let tls = tokio_rustls::TlsConnector::from(Arc::new(support::client::tls_config(&[b"h2"])))
        .connect("localhost".try_into().unwrap(), tcp)
        .await
        .unwrap();
    let (mut send, conn) =
        hyper::client::conn::http2::handshake(hyper_util::rt::TokioExecutor::new(), TokioIo::new(tls))
            .await
            .unwrap();
    tokio::spawn(conn);
    let (body_tx, body_rx) = mpsc::channel::<Bytes>(1);
    let req = Request::builder()
        .method(Method::POST)
        .uri(gw.url("/upload"))
        .body(channel_body(body_rx))
        .unwrap();
    let response = tokio::spawn(send.send_request(req));

    let chunk = Bytes::from(vec![b'x'; 64 * 1024]);
    body_tx.send(chunk.clone()).await.unwrap();
    let first = within("first upload chunk at the upstream", first_rx.recv())
        .await
        .unwrap();
    assert!(
        !first.is_empty(),
        "the upstream saw data before the client sent the rest"
    );
    for _ in 0..15 {
        body_tx.send(chunk.clone()).await.unwrap();
    }
    drop(body_tx);
    let resp = within("upload response", response).await.unwrap().unwrap();
    let total = resp.into_body().collect().await.unwrap().to_bytes();
    assert_eq!(total, (16 * 64 * 1024).to_string());
}

#[tokio::test]
async fn a_large_download_streams_to_the_client() {
    let (more_tx, more_rx) = mpsc::channel::<()>(1);
    let more_rx = Arc::new(tokio::sync::Mutex::new(Some(more_rx)));
    let handler: Handler = Arc::new(move |_req| {
        let more_rx = more_rx.clone();
        Box::pin(async move {
            let mut more = more_rx.lock().await.take().unwrap();
            let (tx, rx) = mpsc::channel::<Bytes>(1);
            tokio::spawn(async move {
                tx.send(Bytes::from_static(b"first chunk;")).await.unwrap();
                more.recv().await;
                for _ in 0..100 {
                    tx.send(Bytes::from(vec![b'y'; 16 * 1024])).await.unwrap();
                }
            });
            Response::new(UpBody::new(channel_body(rx).map_err(|e| match e {})))
        })
    });
    let up = upstream::serve(handler).await;
    let gw = support::start_with_routes("", &[("/download", &format!("http://{up}"), "auth = \"none\"")]).await;

    let tcp = TcpStream::connect(gw.addr).await.unwrap();
    let tls = tokio_rustls::TlsConnector::from(Arc::new(support::client::tls_config(&[b"http/1.1"])))
        .connect("localhost".try_into().unwrap(), tcp)
        .await
        .unwrap();
    let (mut send, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tls)).await.unwrap();
    tokio::spawn(conn);
    let req = Request::builder()
        .uri("/download")
        .header("host", "localhost")
        .body(http_body_util::Empty::<Bytes>::new())
        .unwrap();
    let resp = within("download head", send.send_request(req)).await.unwrap();
    let mut body = resp.into_body();
    let first = within("first download chunk", body.frame())
        .await
        .unwrap()
        .unwrap()
        .into_data()
        .unwrap();
    assert_eq!(
        &first[..],
        b"first chunk;",
        "the client got data before the upstream sent the rest"
    );
    more_tx.send(()).await.unwrap();
    let rest = within("rest of the download", body.collect()).await.unwrap().to_bytes();
    assert_eq!(rest.len(), 100 * 16 * 1024);
}

#[tokio::test]
async fn upstream_down_is_502_and_slow_is_504() {
    let closed = upstream::closed_port().await;
    let never: Handler = Arc::new(|_req| Box::pin(std::future::pending()));
    let slow = upstream::serve(never).await;
    let gw = support::start_with_routes(
        "",
        &[
            ("/down", &format!("http://{closed}"), "auth = \"none\""),
            (
                "/slow",
                &format!("http://{slow}"),
                "auth = \"none\"\ntimeout = \"200ms\"",
            ),
        ],
    )
    .await;
    let c = Client::new(Proto::Http1);
    let r = c.get(&gw.url("/down"), &[]).await;
    assert_eq!(r.status, 502);
    assert_eq!(json(&r.body)["error"], "bad_gateway");
    assert!(
        !r.text().contains(&closed.port().to_string()),
        "upstream details stay in the log"
    );
    let r = c.get(&gw.url("/slow"), &[]).await;
    assert_eq!(r.status, 504);
    assert_eq!(json(&r.body)["error"], "gateway_timeout");
}

#[tokio::test]
async fn an_http2_client_reaches_an_http11_upstream_with_its_body() {
    let up = Upstream::recording().await;
    let gw = support::start_with_routes("", &[("/in", &up.url(), "auth = \"none\"")]).await;
    let r = Client::new(Proto::Http2)
        .request(
            Method::PUT,
            &gw.url("/in/x"),
            &[("content-type", "text/plain")],
            Bytes::from("payload"),
        )
        .await;
    assert_eq!((r.version, r.status), (http::Version::HTTP_2, 200));
    assert_eq!(r.text(), "upstream ok");
    let seen = up.last();
    assert_eq!(
        (seen.version, seen.method, seen.body),
        (http::Version::HTTP_11, Method::PUT, Bytes::from("payload"))
    );
    assert_eq!(seen.headers["host"], up.addr.to_string());
}

#[tokio::test]
async fn the_echo_upstream_shows_what_an_upstream_receives() {
    let gw = support::start_with_routes("", &[("/api/", "echo", "")]).await;
    let c = Client::new(Proto::Http1);
    let t = token(&gw).await;
    let r = c.get_with_token(&gw.url("/api/orders?page=2"), &t).await;
    assert_eq!(r.status, 200);
    let echo = json(&r.body);
    assert_eq!(echo["method"], "GET");
    assert_eq!(echo["path"], "/api/orders");
    assert_eq!(echo["query"], "page=2");
    assert_eq!(echo["headers"]["x-auth-subject"], "ann");
    assert!(echo["headers"].get("authorization").is_none());
}

/// A WebSocket upstream that echoes text messages.
async fn websocket_echo() -> std::net::SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let ws_addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            tokio::spawn(async move {
                let Ok(mut ws) = tokio_tungstenite::accept_async(stream).await else {
                    return;
                };
                while let Some(Ok(msg)) = ws.next().await {
                    if msg.is_text() && ws.send(msg).await.is_err() {
                        return;
                    }
                }
            });
        }
    });
    ws_addr
}

async fn tls_http11(addr: std::net::SocketAddr) -> tokio_rustls::client::TlsStream<TcpStream> {
    let tcp = TcpStream::connect(addr).await.unwrap();
    tokio_rustls::TlsConnector::from(Arc::new(support::client::tls_config(&[b"http/1.1"])))
        .connect("localhost".try_into().unwrap(), tcp)
        .await
        .unwrap()
}

#[tokio::test]
async fn a_websocket_tunnel_keeps_its_connection_slot() {
    let ws_addr = websocket_echo().await;
    let mut toml = support::config_toml(
        "",
        &format!("[[routes]]\npath_prefix = \"/ws\"\nupstream = \"http://{ws_addr}\"\nauth = \"none\"\n"),
    );
    toml = toml.replace(
        "shutdown_grace = \"10s\"",
        "shutdown_grace = \"10s\"\nmax_connections = 1",
    );
    let gw = support::start(&toml).await;
    let req = format!("wss://localhost:{}/ws", gw.addr.port())
        .into_client_request()
        .unwrap();
    let (mut ws, _) = tokio_tungstenite::client_async(req, tls_http11(gw.addr).await)
        .await
        .unwrap();
    // The tunnel holds the only slot: a second connection is not served while it lives...
    let second = tokio::spawn(tls_http11(gw.addr));
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(
        !second.is_finished(),
        "a second connection was served past max_connections"
    );
    // ...and is served once the tunnel closes.
    ws.close(None).await.unwrap();
    drop(ws);
    within("second connection after the tunnel closed", second)
        .await
        .unwrap();
}

#[tokio::test]
async fn a_websocket_tunnel_counts_against_the_routes_max_connections() {
    let ws_addr = websocket_echo().await;
    let mut gw = support::start_with_routes(
        "",
        &[(
            "/ws",
            &format!("http://{ws_addr}"),
            "auth = \"none\"\nmax_connections = 1",
        )],
    )
    .await;
    let app = gw.running().app().clone();
    let open = move || app.upstream_stats("/ws").unwrap().open;
    let req = format!("wss://localhost:{}/ws", gw.addr.port())
        .into_client_request()
        .unwrap();
    let (mut ws, _) = tokio_tungstenite::client_async(req, tls_http11(gw.addr).await)
        .await
        .unwrap();
    ws.send(Message::text("ping")).await.unwrap();
    within("websocket echo", ws.next()).await.unwrap().unwrap();
    // hyper's upstream connection task has handed the socket to the tunnel; the slot went with it.
    assert_eq!(open(), 1, "the tunnel's upstream connection is not counted");
    ws.close(None).await.unwrap();
    drop(ws);
    within("the slot freed when the tunnel closed", async {
        while open() != 0 {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    })
    .await;
}

#[tokio::test]
async fn a_websocket_passes_through_after_the_token_check() {
    let ws_addr = websocket_echo().await;
    let gw = support::start_with_routes("", &[("/ws", &format!("http://{ws_addr}"), "")]).await;
    let t = token(&gw).await;

    let connect = |token: Option<String>| {
        let url = format!("wss://localhost:{}/ws", gw.addr.port());
        let addr = gw.addr;
        async move {
            let tls = tls_http11(addr).await;
            let mut req = url.into_client_request().unwrap();
            if let Some(t) = token {
                req.headers_mut()
                    .insert("authorization", format!("Bearer {t}").parse().unwrap());
            }
            tokio_tungstenite::client_async(req, tls).await
        }
    };
    match connect(None).await {
        Err(tokio_tungstenite::tungstenite::Error::Http(resp)) => assert_eq!(resp.status(), 401),
        other => panic!("an upgrade without a token must be refused: {:?}", other.map(|_| ())),
    }
    let (mut ws, resp) = within("websocket handshake", connect(Some(t))).await.unwrap();
    assert_eq!(resp.status(), 101);
    ws.send(Message::text("hello through the gateway")).await.unwrap();
    let echoed = within("websocket echo", ws.next()).await.unwrap().unwrap();
    assert_eq!(echoed.into_text().unwrap().as_str(), "hello through the gateway");
}

/// Opens a WebSocket through the gateway's `/ws` route with `token`.
async fn open_ws(
    gw: &support::TestGateway,
    token: &str,
) -> tokio_tungstenite::WebSocketStream<tokio_rustls::client::TlsStream<TcpStream>> {
    let mut req = format!("wss://localhost:{}/ws", gw.addr.port())
        .into_client_request()
        .unwrap();
    req.headers_mut()
        .insert("authorization", format!("Bearer {token}").parse().unwrap());
    let (ws, resp) = within(
        "websocket handshake",
        tokio_tungstenite::client_async(req, tls_http11(gw.addr).await),
    )
    .await
    .unwrap();
    assert_eq!(resp.status(), 101);
    ws
}

/// Sends a text message and expects it back.
async fn echo(ws: &mut tokio_tungstenite::WebSocketStream<tokio_rustls::client::TlsStream<TcpStream>>, text: &str) {
    ws.send(Message::text(text)).await.unwrap();
    let back = within("websocket echo", ws.next()).await.unwrap().unwrap();
    assert_eq!(back.into_text().unwrap().as_str(), text);
}

/// Reads until the tunnel ends (close, EOF or an error); panics if it is still open after the
/// hang guard.
async fn assert_ws_ends(ws: &mut tokio_tungstenite::WebSocketStream<tokio_rustls::client::TlsStream<TcpStream>>) {
    within("the tunnel to be closed by the gateway", async {
        loop {
            match ws.next().await {
                None | Some(Err(_)) => return,
                Some(Ok(Message::Close(_))) => return,
                Some(Ok(_)) => continue,
            }
        }
    })
    .await;
}

#[tokio::test]
async fn a_websocket_tunnel_is_closed_when_its_session_is_revoked() {
    let ws_addr = websocket_echo().await;
    let gw = support::start_with_routes("", &[("/ws", &format!("http://{ws_addr}"), "")]).await;
    let c = Client::new(Proto::Http1);
    let revoked = login(&c, &gw, None).await;
    let kept = login(&c, &gw, None).await;
    let mut doomed = open_ws(&gw, str_of(&revoked, "access_token")).await;
    let mut other = open_ws(&gw, str_of(&kept, "access_token")).await;
    echo(&mut doomed, "before").await;

    let r = c
        .form(
            &gw.url("/api/oauth2/revoke"),
            &[("client_id", "web"), ("token", str_of(&revoked, "refresh_token"))],
            &[],
        )
        .await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_ws_ends(&mut doomed).await;
    // Another session's tunnel is untouched.
    echo(&mut other, "still here").await;
}

#[tokio::test]
async fn shutdown_waits_for_an_open_tunnel() {
    let ws_addr = websocket_echo().await;
    let mut gw = support::start_with_routes("", &[("/ws", &format!("http://{ws_addr}"), "auth = \"none\"")]).await;
    let mut ws = open_ws(&gw, "unused").await;
    let mut running = gw.running.take().unwrap();
    running.stop_accepting().await;
    let finish = tokio::spawn(running.finish());
    // The drain has begun; the tunnel is a request still in flight: it keeps working...
    echo(&mut ws, "during the drain").await;
    assert!(!finish.is_finished(), "shutdown finished while a tunnel was open");
    // ...and once it ends, the shutdown is clean.
    ws.close(None).await.unwrap();
    drop(ws);
    assert_eq!(within("shutdown", finish).await.unwrap(), tokengate::Drained::Cleanly);
}

#[tokio::test]
async fn a_tunnel_still_open_when_the_grace_runs_out_is_closed() {
    let ws_addr = websocket_echo().await;
    let toml = support::config_toml(
        "",
        &format!("[[routes]]\npath_prefix = \"/ws\"\nupstream = \"http://{ws_addr}\"\nauth = \"none\"\n"),
    )
    .replace("shutdown_grace = \"10s\"", "shutdown_grace = \"500ms\"");
    let mut gw = support::start(&toml).await;
    let mut ws = open_ws(&gw, "unused").await;
    echo(&mut ws, "hello").await;
    let drained = within("shutdown", gw.running.take().unwrap().shutdown()).await;
    assert_eq!(
        drained,
        tokengate::Drained::GraceExpired,
        "the open tunnel was not waited for"
    );
    assert_ws_ends(&mut ws).await;
}

#[tokio::test]
async fn an_https_upstream_is_reached_through_tls_with_the_routes_ca_file() {
    // An upstream serving TLS with the repo's localhost certificate.
    let certs = support::repo().join("certs");
    let chain: Vec<_> = rustls_pki_types::CertificateDer::pem_file_iter(certs.join("localhost.pem"))
        .unwrap()
        .map(|c| c.unwrap())
        .collect();
    let key = rustls_pki_types::PrivateKeyDer::from_pem_file(certs.join("localhost-key.pem")).unwrap();
    let server = rustls::ServerConfig::builder_with_provider(Arc::new(rustls::crypto::aws_lc_rs::default_provider()))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(chain, key)
        .unwrap();
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(server));
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            let acceptor = acceptor.clone();
            tokio::spawn(async move {
                let Ok(tls) = acceptor.accept(tcp).await else { return };
                let svc = hyper::service::service_fn(|req: Request<hyper::body::Incoming>| async move {
                    let host = req.headers()["host"].to_str().unwrap().to_owned();
                    Ok::<_, Infallible>(Response::new(full(format!("tls upstream saw host {host}"))))
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(tls), svc)
                    .await;
            });
        }
    });
    let gw = support::start_with_routes(
        "",
        &[
            (
                "/secure",
                &format!("https://localhost:{port}"),
                &format!("auth = \"none\"\nca_file = \"{}\"", certs.join("ca.pem").display()),
            ),
            ("/untrusted", &format!("https://localhost:{port}"), "auth = \"none\""),
        ],
    )
    .await;
    let c = Client::new(Proto::Http1);
    let r = c.get(&gw.url("/secure/x"), &[]).await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.text(), format!("tls upstream saw host localhost:{port}"));
    // Without the CA file the system roots do not trust the dev CA: 502, not a silent downgrade.
    assert_eq!(c.get(&gw.url("/untrusted/x"), &[]).await.status, 502);
}

/// How an HPACK header block (RFC 7541 §6) represents each of its fields: the first byte of each
/// representation, classified without decoding names or values.
#[derive(Debug, PartialEq, Clone, Copy)]
enum Field {
    Indexed,
    /// Literal, added to the header table; `literal_name`: the name is spelled out.
    WithIndexing {
        literal_name: bool,
    },
    WithoutIndexing {
        literal_name: bool,
    },
    NeverIndexed {
        literal_name: bool,
    },
}

fn hpack_fields(mut block: &[u8]) -> Vec<Field> {
    // An integer with an N-bit prefix (§5.1), from the front of `block`.
    fn int(block: &mut &[u8], prefix: u8) -> usize {
        let max = (1usize << prefix) - 1;
        let mut v = usize::from(block[0]) & max;
        *block = &block[1..];
        if v == max {
            let mut shift = 0;
            loop {
                let b = block[0];
                *block = &block[1..];
                v += usize::from(b & 0x7f) << shift;
                shift += 7;
                if b & 0x80 == 0 {
                    break;
                }
            }
        }
        v
    }
    fn string(block: &mut &[u8]) {
        let len = int(block, 7);
        *block = &block[len..];
    }
    let mut fields = Vec::new();
    while !block.is_empty() {
        let first = block[0];
        let (prefix, kind): (u8, fn(bool) -> Field) = match first {
            b if b & 0x80 != 0 => {
                int(&mut block, 7);
                fields.push(Field::Indexed);
                continue;
            }
            b if b & 0xc0 == 0x40 => (6, |l| Field::WithIndexing { literal_name: l }),
            b if b & 0xe0 == 0x20 => {
                int(&mut block, 5); // table size update
                continue;
            }
            b if b & 0xf0 == 0x10 => (4, |l| Field::NeverIndexed { literal_name: l }),
            _ => (4, |l| Field::WithoutIndexing { literal_name: l }),
        };
        let literal_name = int(&mut block, prefix) == 0;
        if literal_name {
            string(&mut block);
        }
        string(&mut block);
        fields.push(kind(literal_name));
    }
    fields
}

/// The header blocks of the HEADERS frames in `bytes` (HTTP/2 frames as a client receives them).
fn header_blocks(mut bytes: &[u8]) -> Vec<Vec<u8>> {
    let mut blocks = Vec::new();
    while bytes.len() >= 9 {
        let len = usize::from(bytes[0]) << 16 | usize::from(bytes[1]) << 8 | usize::from(bytes[2]);
        let (kind, flags) = (bytes[3], bytes[4]);
        let payload = &bytes[9..9 + len];
        if kind == 0x1 {
            assert_eq!(flags & 0x4, 0x4, "a response head split into CONTINUATION frames");
            let pad = if flags & 0x8 != 0 {
                usize::from(payload[0]) + 1
            } else {
                0
            };
            let start = if flags & 0x8 != 0 { 1 } else { 0 } + if flags & 0x20 != 0 { 5 } else { 0 };
            blocks.push(payload[start..payload.len() - pad].to_vec());
        }
        bytes = &bytes[9 + len..];
    }
    blocks
}

#[tokio::test]
async fn an_http2_response_sends_its_request_id_outside_the_header_table() {
    // Every response's X-Request-Id is new: indexing it in the connection's HPACK table only
    // evicts entries that would be reused, and h2 then compares each later id with the dead ones.
    let up = Upstream::recording().await;
    let gw = support::start_with_routes("", &[("/in", &up.url(), "auth = \"none\"")]).await;
    let tls = support::client::Tapped::new(support::client::raw_tls(gw.addr, b"h2").await);
    let seen = tls.seen.clone();
    let (mut send, conn) = h2::client::handshake(tls).await.unwrap();
    tokio::spawn(conn);
    let mut ids = Vec::new();
    for _ in 0..3 {
        let req = Request::get(format!("https://localhost:{}/in/x", gw.addr.port()))
            .body(())
            .unwrap();
        let (resp, _) = send.send_request(req, true).unwrap();
        let resp = within("a response", resp).await.unwrap();
        assert_eq!(resp.status(), 200);
        ids.push(resp.headers()["x-request-id"].clone());
        let mut body = resp.into_body();
        while let Some(chunk) = within("the body", body.data()).await {
            chunk.unwrap();
        }
    }
    assert!(ids[0] != ids[1] && ids[1] != ids[2], "{ids:?}");
    let blocks = header_blocks(&seen.lock().unwrap());
    assert_eq!(blocks.len(), 3, "one HEADERS frame per response");
    for (i, block) in blocks.iter().enumerate() {
        let fields = hpack_fields(block);
        // The request id is the one field the gateway marks never-indexed; its name is not in
        // the static table and is never added to the dynamic one, so it is spelled out each time.
        let never = fields
            .iter()
            .filter(|f| **f == Field::NeverIndexed { literal_name: true })
            .count();
        assert_eq!(never, 1, "response {i}: {fields:?}");
    }
}

#[tokio::test]
async fn the_streams_of_one_http2_connection_are_served_at_once() {
    // The upstream answers none of them until all have arrived: served one after another (or
    // one blocking the next), they would never be answered.
    const STREAMS: usize = 8;
    let all_in = Arc::new(tokio::sync::Barrier::new(STREAMS));
    let handler: Handler = Arc::new(move |_req| {
        let all_in = all_in.clone();
        Box::pin(async move {
            all_in.wait().await;
            Response::new(full("together"))
        })
    });
    let up = upstream::serve(handler).await;
    let gw = support::start_with_routes("", &[("/in", &format!("http://{up}"), "auth = \"none\"")]).await;
    let tls = support::client::raw_tls(gw.addr, b"h2").await;
    let (send, conn) = h2::client::handshake(tls).await.unwrap();
    tokio::spawn(conn);
    let mut send = within("the connection", send.ready()).await.unwrap();
    let mut responses = Vec::new();
    for i in 0..STREAMS {
        let req = Request::get(format!("https://localhost:{}/in/{i}", gw.addr.port()))
            .body(())
            .unwrap();
        responses.push(send.send_request(req, true).unwrap().0);
    }
    for resp in responses {
        let resp = within("every stream's response", resp).await.unwrap();
        assert_eq!(resp.status(), 200);
        let mut body = resp.into_body();
        let mut got = Vec::new();
        while let Some(chunk) = within("the body", body.data()).await {
            got.extend_from_slice(&chunk.unwrap());
        }
        assert_eq!(got, b"together");
    }
}
