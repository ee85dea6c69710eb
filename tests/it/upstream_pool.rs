//! The upstream connection pool: the per-route connection cap and its wait queue, idle timeouts
//! (the route's and the upstream's `Keep-Alive`), the retry of a body-less idempotent request
//! whose reused connection died, and response framing the upstream got wrong.

use std::sync::Arc;
use std::sync::atomic::Ordering::SeqCst;
use std::time::Duration;

use bytes::Bytes;
use futures_util::StreamExt;
use futures_util::stream::FuturesUnordered;
use http::{Method, Request};
use http_body_util::StreamBody;
use hyper::body::Frame;
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;
use tokio::sync::{mpsc, watch};

use crate::support::upstream::{self, Handler, RAW_BODY, Raw, RawUpstream, UpBody, full};
use crate::support::{self, Client, Proto, json};

/// Guards against a hang: what the test waits for must happen well within this.
async fn within<T>(what: &str, f: impl std::future::Future<Output = T>) -> T {
    tokio::time::timeout(Duration::from_secs(20), f)
        .await
        .unwrap_or_else(|_| panic!("timed out: {what}"))
}

/// Polls the route's pool until `cond` holds (there is no event to wait on from outside).
async fn pool_until(
    gw: &mut support::TestGateway,
    prefix: &str,
    what: &str,
    cond: impl Fn(tokengate::proxy::forward::PoolStats) -> bool,
) {
    let app = gw.running().app().clone();
    within(what, async {
        loop {
            if cond(app.upstream_stats(prefix).expect("an http route")) {
                return;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    })
    .await
}

/// An upstream that tells `arrived` of each request and answers once `release` turns true.
fn held_upstream(arrived: mpsc::UnboundedSender<()>, release: watch::Receiver<bool>) -> Handler {
    Arc::new(move |_req| {
        let arrived = arrived.clone();
        let mut release = release.clone();
        Box::pin(async move {
            arrived.send(()).unwrap();
            let _ = release.wait_for(|r| *r).await;
            hyper::Response::new(full("released"))
        })
    })
}

#[tokio::test]
async fn past_max_connections_requests_wait_and_past_the_queue_get_503() {
    let (arrived_tx, mut arrived) = mpsc::unbounded_channel();
    let (release, release_rx) = watch::channel(false);
    let (up, counts) = upstream::serve_counted(held_upstream(arrived_tx, release_rx)).await;
    let mut gw = support::start_with_routes(
        "",
        &[("/held", &format!("http://{up}"), "auth = \"none\"\nmax_connections = 2")],
    )
    .await;
    let c = Client::new(Proto::Http1);
    let url = gw.url("/held");
    let get = || {
        let (c, url) = (c.clone(), url.clone());
        tokio::spawn(async move { c.get(&url, &[]).await })
    };

    let first = [get(), get()];
    within("two requests at the upstream", async {
        arrived.recv().await;
        arrived.recv().await;
    })
    .await;
    // Two more wait for a connection; of three sent, the one that finds the queue full is
    // answered at once, the others stay queued while the upstream holds both connections.
    let mut queued: FuturesUnordered<_> = [get(), get(), get()].into_iter().collect();
    let refused = within("a request past the queue", queued.next())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(refused.status, 503, "{}", refused.text());
    assert_eq!(refused.header("retry-after"), "1");
    assert_eq!(json(&refused.body)["error"], "service_unavailable");
    pool_until(&mut gw, "/held", "two requests queued", |s| {
        s.open == 2 && s.waiting == 2
    })
    .await;
    assert!(arrived.try_recv().is_err(), "a queued request reached the upstream");

    release.send(true).unwrap();
    for r in first {
        assert_eq!(within("a held request", r).await.unwrap().status, 200);
    }
    while let Some(r) = within("a queued request", queued.next()).await {
        assert_eq!(r.unwrap().status, 200);
    }
    assert_eq!(
        counts.max_open.load(SeqCst),
        2,
        "the upstream saw more than 2 connections at once"
    );
    assert!(support::logs::captured().contains("upstream connection queue full"));
}

#[tokio::test]
async fn a_cancelled_queued_request_leaves_the_queue() {
    let (arrived_tx, mut arrived) = mpsc::unbounded_channel();
    let (release, release_rx) = watch::channel(false);
    let (up, _) = upstream::serve_counted(held_upstream(arrived_tx, release_rx)).await;
    let mut gw = support::start_with_routes(
        "",
        &[("/one", &format!("http://{up}"), "auth = \"none\"\nmax_connections = 1")],
    )
    .await;
    let c = Client::new(Proto::Http1);
    let url = gw.url("/one");
    let get = || {
        let (c, url) = (c.clone(), url.clone());
        tokio::spawn(async move { c.get(&url, &[]).await })
    };
    let holder = get();
    within("a request at the upstream", arrived.recv()).await;

    // A request on a connection of its own waits in the queue (its bound is 1)...
    let addr = gw.addr;
    let abandoned = tokio::spawn(async move {
        let tls = tls_http11(addr).await;
        let (mut send, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tls)).await.unwrap();
        tokio::spawn(conn);
        let req = Request::get("/one")
            .header("host", "localhost")
            .body(http_body_util::Empty::<Bytes>::new())
            .unwrap();
        send.send_request(req).await
    });
    pool_until(&mut gw, "/one", "a request queued", |s| s.waiting == 1).await;
    // ...and its client goes away: the gateway drops the request, and its place in the queue.
    abandoned.abort();
    pool_until(&mut gw, "/one", "the abandoned request out of the queue", |s| {
        s.waiting == 0
    })
    .await;

    // The queue still holds one: the next request waits, the one after is refused.
    let waiting = get();
    pool_until(&mut gw, "/one", "a request queued again", |s| s.waiting == 1).await;
    assert_eq!(within("refused", get()).await.unwrap().status, 503);
    release.send(true).unwrap();
    assert_eq!(within("the holder", holder).await.unwrap().status, 200);
    assert_eq!(within("the waiting request", waiting).await.unwrap().status, 200);
}

#[tokio::test]
async fn a_queued_request_still_obeys_the_routes_timeout() {
    // The upstream answers at once and trickles the rest of the body (a byte every 50 ms, so the
    // body never stalls long enough to be cut) until released: its connection stays busy, so only
    // the queue's own deadline can end the wait.
    let (arrived_tx, mut arrived) = mpsc::unbounded_channel();
    let (release, release_rx) = watch::channel(false);
    let handler: Handler = Arc::new(move |_req| {
        arrived_tx.send(()).unwrap();
        let release = release_rx.clone();
        Box::pin(async move {
            let rest = futures_util::stream::unfold(Some(release), |release| async move {
                let mut release = release?;
                let released = tokio::select! {
                    r = release.wait_for(|r| *r) => r.is_ok(),
                    () = tokio::time::sleep(Duration::from_millis(50)) => false,
                };
                let piece = Ok::<_, upstream::BoxError>(Frame::data(Bytes::from(if released { "rest" } else { "." })));
                Some((piece, (!released).then_some(release)))
            });
            hyper::Response::new(UpBody::new(StreamBody::new(rest)))
        })
    });
    let up = upstream::serve(handler).await;
    let mut gw = support::start_with_routes(
        "",
        &[(
            "/slow",
            &format!("http://{up}"),
            "auth = \"none\"\nmax_connections = 1\ntimeout = \"300ms\"",
        )],
    )
    .await;
    let c = Client::new(Proto::Http1);
    let url = gw.url("/slow");
    let holder = {
        let (c, url) = (c.clone(), url.clone());
        tokio::spawn(async move { c.get(&url, &[]).await })
    };
    within("a request at the upstream", arrived.recv()).await;
    let r = within("the queued request", c.get(&url, &[])).await;
    assert_eq!(r.status, 504, "{}", r.text());
    pool_until(&mut gw, "/slow", "the queue empty", |s| s.waiting == 0).await;
    release.send(true).unwrap();
    let holder = within("the holder", holder).await.unwrap();
    assert_eq!(holder.status, 200);
    assert!(holder.text().ends_with(".rest"), "{}", holder.text());
}

async fn tls_http11(addr: std::net::SocketAddr) -> tokio_rustls::client::TlsStream<TcpStream> {
    let tcp = TcpStream::connect(addr).await.unwrap();
    tokio_rustls::TlsConnector::from(Arc::new(support::client::tls_config(&[b"http/1.1"])))
        .connect("localhost".try_into().unwrap(), tcp)
        .await
        .unwrap()
}

#[tokio::test]
async fn an_upstream_that_closes_after_every_response_gives_no_502() {
    let up = RawUpstream::start(Raw::CloseAfterEachResponse).await;
    let gw = support::start_with_routes("", &[("/closing", &up.url(), "auth = \"none\"")]).await;
    let c = Client::new(Proto::Http1);
    for i in 0..100 {
        let r = c.get(&gw.url("/closing"), &[]).await;
        assert_eq!(r.status, 200, "request {i}: {}", r.text());
    }
    // Every request after the first went to the connection its predecessor left (closed), and
    // was sent again on a new one.
    let seen = up.seen();
    assert_eq!((seen.requests.len(), seen.connections), (199, 100));
}

#[tokio::test]
async fn connections_idle_past_idle_timeout_are_not_reused_and_are_closed() {
    let up = RawUpstream::start(Raw::KeepAlive("")).await;
    let gw = support::start_with_routes("", &[("/idle", &up.url(), "auth = \"none\"\nidle_timeout = \"2s\"")]).await;
    let c = Client::new(Proto::Http1);
    assert_eq!(c.get(&gw.url("/idle"), &[]).await.status, 200);
    // Within the idle timeout the connection is reused.
    gw.clock.advance(Duration::from_secs(1));
    assert_eq!(c.get(&gw.url("/idle"), &[]).await.status, 200);
    assert_eq!(up.seen().connections, 1);

    // Past it, the upstream's own idle close (say at 3 s) races the next request: the gateway must
    // not pick that connection. Here the upstream closes it the moment a request arrives on it.
    gw.clock.advance(Duration::from_secs(3));
    up.close_idle();
    assert_eq!(c.get(&gw.url("/idle"), &[]).await.status, 200);
    let r = c
        .request(Method::POST, &gw.url("/idle"), &[], Bytes::from("payload"))
        .await;
    assert_eq!(r.status, 200, "{}", r.text());
    let seen = up.seen();
    assert_eq!(
        seen.on_doomed, 0,
        "a connection idle past idle_timeout was reused: {seen:?}"
    );
    assert_eq!(seen.connections, 2);

    // And an idle connection past it is closed by the gateway's maintenance, without waiting for
    // another request.
    assert!(!seen.closed_by_gateway.contains(&2));
    gw.clock.advance(Duration::from_secs(3));
    within(
        "the idle connection closed by the gateway",
        up.until(|s| s.closed_by_gateway.contains(&2)),
    )
    .await;
}

#[tokio::test]
async fn shutdown_closes_idle_upstream_connections() {
    let up = RawUpstream::start(Raw::KeepAlive("")).await;
    let mut gw = support::start_with_routes("", &[("/idle", &up.url(), "auth = \"none\"")]).await;
    assert_eq!(Client::new(Proto::Http1).get(&gw.url("/idle"), &[]).await.status, 200);
    assert_eq!(gw.running.take().unwrap().shutdown().await, tokengate::Drained::Cleanly);
    within(
        "the idle connection closed once the gateway is gone",
        up.until(|s| s.closed_by_gateway.contains(&1)),
    )
    .await;
}

#[tokio::test]
async fn the_upstreams_keep_alive_timeout_is_honoured() {
    let up = RawUpstream::start(Raw::KeepAlive("Keep-Alive: timeout=3, max=100\r\n")).await;
    let short = RawUpstream::start(Raw::KeepAlive("Keep-Alive: timeout=1\r\n")).await;
    let gw = support::start_with_routes(
        "",
        &[
            ("/ka", &up.url(), "auth = \"none\"\nidle_timeout = \"10s\""),
            ("/short", &short.url(), "auth = \"none\""),
        ],
    )
    .await;
    let c = Client::new(Proto::Http1);
    // timeout=3: reused for 2 s (a second's margin), then not.
    assert_eq!(c.get(&gw.url("/ka"), &[]).await.status, 200);
    gw.clock.advance(Duration::from_millis(1_900));
    assert_eq!(c.get(&gw.url("/ka"), &[]).await.status, 200);
    assert_eq!(up.seen().connections, 1, "reused within the upstream's timeout");
    gw.clock.advance(Duration::from_secs(2));
    assert_eq!(c.get(&gw.url("/ka"), &[]).await.status, 200);
    assert_eq!(up.seen().connections, 2, "not reused past timeout=3 less the margin");

    // timeout=1 leaves no safe time at all: never reused.
    for _ in 0..3 {
        assert_eq!(c.get(&gw.url("/short"), &[]).await.status, 200);
    }
    assert_eq!(short.seen().connections, 3);
}

#[tokio::test]
async fn a_get_whose_reused_connection_dies_is_retried_once_and_a_post_is_not() {
    let up = RawUpstream::start(Raw::KeepAlive("")).await;
    let gw = support::start_with_routes("", &[("/racy", &up.url(), "auth = \"none\"\nidle_timeout = \"60s\"")]).await;
    let c = Client::new(Proto::Http1);

    // A GET on a connection the upstream has just closed: sent again on a new connection.
    assert_eq!(c.get(&gw.url("/racy/a"), &[]).await.status, 200);
    up.close_idle();
    let r = c.get(&gw.url("/racy/b"), &[]).await;
    assert_eq!(r.status, 200, "{}", r.text());
    let seen = up.seen();
    assert_eq!(seen.on_doomed, 1);
    assert_eq!(
        seen.requests
            .iter()
            .filter(|(_, line)| line.starts_with("GET /racy/b "))
            .count(),
        2,
        "{seen:?}"
    );

    // A POST with a body in the same place: not sent again (the upstream may have acted on it).
    up.close_idle();
    let r = c
        .request(Method::POST, &gw.url("/racy/c"), &[], Bytes::from("payload"))
        .await;
    assert_eq!(r.status, 502, "{}", r.text());
    let seen = up.seen();
    assert_eq!(
        seen.requests
            .iter()
            .filter(|(_, line)| line.starts_with("POST /racy/c "))
            .count(),
        1,
        "{seen:?}"
    );

    // Nor is a GET that fails on a new connection: only a reused one can have gone stale.
    let dead = RawUpstream::start(Raw::NeverAnswers).await;
    let gw = support::start_with_routes("", &[("/dead", &dead.url(), "auth = \"none\"")]).await;
    assert_eq!(c.get(&gw.url("/dead"), &[]).await.status, 502);
    assert_eq!(dead.seen().requests.len(), 1, "{:?}", dead.seen());
}

#[tokio::test]
async fn a_response_with_content_length_and_chunked_arrives_whole() {
    let up = RawUpstream::start(Raw::LengthAndChunked).await;
    let gw = support::start_with_routes("", &[("/both", &up.url(), "auth = \"none\"")]).await;
    for proto in [Proto::Http1, Proto::Http2] {
        let r = Client::new(proto).get(&gw.url("/both"), &[]).await;
        assert_eq!(r.status, 200);
        assert_eq!(r.text(), RAW_BODY, "{proto:?}");
        assert!(!r.headers.contains_key("content-length"), "{proto:?}: {:?}", r.headers);
    }
}

// The gateway's own HTTP/1.1 client (body-less requests): what it reads from an upstream.

#[tokio::test]
async fn an_upstream_response_reaches_the_client_without_its_hop_by_hop_fields() {
    // The always-hop-by-hop fields (left out as the head is parsed), and fields the Connection
    // field names (removed afterwards).
    let plain = RawUpstream::start(Raw::Scripted {
        response: "HTTP/1.1 200 OK\r\nConnection: keep-alive\r\nKeep-Alive: timeout=30\r\n\
                   Proxy-Authenticate: Basic\r\nTrailer: x-t\r\nUpgrade: h2c\r\nX-Kept: yes\r\n\
                   Content-Length: 2\r\n\r\nok",
        close: false,
    })
    .await;
    let named = RawUpstream::start(Raw::Scripted {
        response: "HTTP/1.1 200 OK\r\nConnection: keep-alive, x-internal\r\nX-Internal: secret\r\n\
                   X-Kept: yes\r\nContent-Length: 2\r\n\r\nok",
        close: false,
    })
    .await;
    let gw = support::start_with_routes(
        "",
        &[
            ("/plain", &plain.url(), "auth = \"none\""),
            ("/named", &named.url(), "auth = \"none\""),
        ],
    )
    .await;
    for proto in [Proto::Http1, Proto::Http2] {
        for path in ["/plain", "/named"] {
            let r = Client::new(proto).get(&gw.url(path), &[]).await;
            assert_eq!((r.status, r.text().as_str()), (200, "ok"), "{proto:?} {path}");
            assert_eq!(r.header("x-kept"), "yes");
            for name in ["x-internal", "keep-alive", "proxy-authenticate", "trailer", "upgrade"] {
                assert!(
                    !r.headers.contains_key(name),
                    "{proto:?} {path}: {name} reached the client: {:?}",
                    r.headers
                );
            }
            assert!(
                r.headers.get("connection").is_none_or(|v| v == "keep-alive"),
                "{proto:?} {path}: {:?}",
                r.headers
            );
        }
    }
}

#[tokio::test]
async fn informational_responses_are_skipped_and_a_chunked_body_arrives_whole_on_a_reused_connection() {
    let up = RawUpstream::start(Raw::Scripted {
        response: "HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 103 Early Hints\r\nLink: </a.css>\r\n\r\n\
                   HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n\
                   6;ext=1\r\nhello,\r\n7\r\n chunks\r\n0\r\nX-Trailer: t\r\n\r\n",
        close: false,
    })
    .await;
    let gw = support::start_with_routes("", &[("/chunked", &up.url(), "auth = \"none\"")]).await;
    let c = Client::new(Proto::Http1);
    for i in 0..3 {
        let r = c.get(&gw.url("/chunked"), &[]).await;
        assert_eq!((r.status, r.text().as_str()), (200, "hello, chunks"), "request {i}");
    }
    assert_eq!(
        up.seen().connections,
        1,
        "a chunked response read to its end leaves a reusable connection"
    );
}

#[tokio::test]
async fn a_body_delimited_by_the_close_arrives_whole_and_its_connection_is_not_reused() {
    let up = RawUpstream::start(Raw::Scripted {
        response: "HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\n\r\nall of it, until the close",
        close: true,
    })
    .await;
    let gw = support::start_with_routes("", &[("/eof", &up.url(), "auth = \"none\"")]).await;
    let c = Client::new(Proto::Http1);
    for i in 0..2 {
        let r = c.get(&gw.url("/eof"), &[]).await;
        assert_eq!(
            (r.status, r.text().as_str()),
            (200, "all of it, until the close"),
            "request {i}"
        );
    }
    let seen = up.seen();
    assert_eq!((seen.connections, seen.requests.len()), (2, 2), "{seen:?}");
}

#[tokio::test]
async fn malformed_upstream_responses_are_502() {
    let oversized: &'static str = Box::leak(
        // 80 KiB in 40 fields: past the head's byte bound, within its field count.
        format!(
            "HTTP/1.1 200 OK\r\n{}\r\nok",
            format!("X-Filler: {}\r\n", "f".repeat(2048)).repeat(40)
        )
        .into_boxed_str(),
    );
    let scripts = [
        "HTTP/1.1 200 OK\r\nContent-Length: 2\r\nContent-Length: 3\r\n\r\nok",
        "HTTP/1.1 200 OK\r\nContent-Length: 2, 3\r\n\r\nok",
        "HTTP/1.1 200 OK\r\nContent-Length: -2\r\n\r\nok",
        "HTTP/1.0 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nok\r\n0\r\n\r\n",
        "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: upgrade\r\n\r\n",
        "HTTP/1.1 2000 OK\r\nContent-Length: 2\r\n\r\nok",
        "not http at all\r\n\r\n",
        oversized,
    ];
    for script in scripts {
        let up = RawUpstream::start(Raw::Scripted {
            response: script,
            close: false,
        })
        .await;
        let gw = support::start_with_routes("", &[("/bad", &up.url(), "auth = \"none\"")]).await;
        // Without a body (the gateway's own client) and with one (hyper's client): the same answer.
        let c = Client::new(Proto::Http1);
        let r = within("the answer", c.get(&gw.url("/bad"), &[])).await;
        assert_eq!(r.status, 502, "GET {:?}", &script[..script.len().min(60)]);
        // (hyper's client bounds a head less tightly: up to about twice 64 KiB.)
        if script != oversized {
            let r = within(
                "the answer",
                c.request(Method::POST, &gw.url("/bad"), &[], Bytes::from("x")),
            )
            .await;
            assert_eq!(r.status, 502, "POST {:?}", &script[..script.len().min(60)]);
        }
    }
}

#[tokio::test]
async fn a_connection_of_the_gateways_client_is_handed_to_hypers_client_for_a_body() {
    let up = RawUpstream::start(Raw::KeepAlive("")).await;
    let gw = support::start_with_routes("", &[("/mixed", &up.url(), "auth = \"none\"\nmax_connections = 1")]).await;
    let c = Client::new(Proto::Http1);
    assert_eq!(c.get(&gw.url("/mixed"), &[]).await.status, 200);
    let r = c
        .request(Method::POST, &gw.url("/mixed"), &[], Bytes::from("payload"))
        .await;
    assert_eq!((r.status, r.text().as_str()), (200, "ok"));
    assert_eq!(c.get(&gw.url("/mixed"), &[]).await.status, 200);
    let seen = up.seen();
    let lines: Vec<&str> = seen.requests.iter().map(|(_, l)| l.as_str()).collect();
    assert_eq!(
        lines,
        ["GET /mixed HTTP/1.1", "POST /mixed HTTP/1.1", "GET /mixed HTTP/1.1"]
    );
    assert_eq!(seen.connections, 1, "one connection served all three: {seen:?}");
}

#[tokio::test]
async fn bytes_beyond_a_response_are_never_read_as_the_next_one() {
    let up = RawUpstream::start(Raw::Scripted {
        response: "HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nokHTTP/1.1 200 OK\r\nContent-Length: 6\r\n\r\nforged",
        close: false,
    })
    .await;
    let gw = support::start_with_routes("", &[("/extra", &up.url(), "auth = \"none\"")]).await;
    let c = Client::new(Proto::Http1);
    for i in 0..2 {
        let r = c.get(&gw.url("/extra"), &[]).await;
        assert_eq!((r.status, r.text().as_str()), (200, "ok"), "request {i}");
    }
    assert_eq!(up.seen().connections, 2, "a connection with unread bytes was reused");
}

#[tokio::test]
async fn a_get_retried_after_a_hyper_connection_died_is_sent_once_with_one_of_each_header() {
    let up = RawUpstream::start(Raw::KeepAlive("")).await;
    let gw = support::start_with_routes("", &[("/mixed", &up.url(), "auth = \"none\"\nidle_timeout = \"60s\"")]).await;
    let c = Client::new(Proto::Http1);
    // A POST leaves an idle connection driven by hyper's client.
    let r = c
        .request(Method::POST, &gw.url("/mixed/a"), &[], Bytes::from("payload"))
        .await;
    assert_eq!(r.status, 200);
    // A GET takes it, the upstream closes it unanswered: the GET is sent again on a new connection.
    up.close_idle();
    let r = c.get(&gw.url("/mixed/b"), &[("x-auth-subject", "spoof")]).await;
    assert_eq!(r.status, 200, "{}", r.text());
    let seen = up.seen();
    assert_eq!(seen.connections, 2, "{seen:?}");
    let last = seen.heads.last().unwrap().to_ascii_lowercase();
    for name in ["host:", "x-forwarded-for:", "x-forwarded-proto:", "x-request-id:"] {
        assert_eq!(
            last.lines().filter(|l| l.starts_with(name)).count(),
            1,
            "{name} in {last}"
        );
    }
    assert!(!last.contains("x-auth-subject"), "{last}");
}

#[tokio::test]
async fn an_upstream_body_that_stalls_is_cut_after_the_routes_timeout_and_its_connection_closed() {
    let stalls = |response| Raw::Scripted { response, close: false };
    // Ten bytes promised, two sent, then nothing: the upstream waits for a next request.
    let up = RawUpstream::start(stalls("HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nab")).await;
    let gw = support::start_with_routes("", &[("/stall", &up.url(), "auth = \"none\"\ntimeout = \"300ms\"")]).await;
    // Without a body (the gateway's own client) and with one (hyper's).
    for (method, body) in [("GET", ""), ("POST", "x")] {
        let mut tls = support::client::raw_tls(gw.addr, b"http/1.1").await;
        let req = format!(
            "{method} /stall HTTP/1.1\r\nhost: localhost\r\ncontent-length: {}\r\n\r\n{body}",
            body.len()
        );
        tokio::io::AsyncWriteExt::write_all(&mut tls, req.as_bytes())
            .await
            .unwrap();
        let got = support::client::read_until_closed(&mut tls, Duration::from_secs(10)).await;
        assert!(got.starts_with("HTTP/1.1 200"), "{method}: {got}");
        assert!(
            got.ends_with("\r\n\r\nab"),
            "{method}: the two bytes, then the close: {got}"
        );
    }
    // Both upstream connections were closed by the gateway, not kept for reuse.
    within(
        "the stalled connections closed",
        up.until(|s| s.closed_by_gateway.len() == 2),
    )
    .await;
}

#[tokio::test]
async fn a_head_response_has_no_body_whatever_its_length_says_and_its_connection_is_reused() {
    let up = RawUpstream::start(Raw::Scripted {
        response: "HTTP/1.1 200 OK\r\nContent-Length: 5\r\nContent-Type: text/plain\r\n\r\n",
        close: false,
    })
    .await;
    let gw = support::start_with_routes("", &[("/head", &up.url(), "auth = \"none\"")]).await;
    let c = Client::new(Proto::Http1);
    for i in 0..3 {
        let r = within("the HEAD", c.request(Method::HEAD, &gw.url("/head"), &[], Bytes::new())).await;
        assert_eq!((r.status, r.body.len()), (200, 0), "request {i}");
        assert_eq!(r.header("content-length"), "5", "request {i}");
    }
    let seen = up.seen();
    assert_eq!((seen.connections, seen.requests.len()), (1, 3), "{seen:?}");
}

#[tokio::test]
async fn a_client_that_leaves_mid_body_takes_its_upstream_connection_with_it() {
    // Ten bytes promised, two sent; the route's timeout (30 s by default) never comes into it.
    let up = RawUpstream::start(Raw::Scripted {
        response: "HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nab",
        close: false,
    })
    .await;
    let mut gw = support::start_with_routes("", &[("/left", &up.url(), "auth = \"none\"")]).await;
    let mut tls = support::client::raw_tls(gw.addr, b"http/1.1").await;
    tokio::io::AsyncWriteExt::write_all(&mut tls, b"GET /left HTTP/1.1\r\nhost: localhost\r\n\r\n")
        .await
        .unwrap();
    let mut got = Vec::new();
    while !got.ends_with(b"\r\n\r\nab") {
        let mut buf = [0u8; 1024];
        let n = within("the response so far", tokio::io::AsyncReadExt::read(&mut tls, &mut buf))
            .await
            .unwrap();
        assert!(n > 0, "closed early: {}", String::from_utf8_lossy(&got));
        got.extend_from_slice(&buf[..n]);
    }
    drop(tls);
    within(
        "the upstream connection closed",
        up.until(|s| s.closed_by_gateway == [1]),
    )
    .await;
    pool_until(&mut gw, "/left", "its slot free", |s| s.open == 0).await;
}
