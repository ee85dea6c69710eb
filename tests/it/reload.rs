//! Live configuration: a new config applied to a running gateway (the SIGHUP path) changes routes,
//! users, clients and the certificate without dropping sessions or connections; an invalid file
//! changes nothing.

use std::time::Duration;

use tokengate::config::Config;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::support::client::raw_tls;
use crate::support::process::{Process, Signal};
use crate::support::{self, Client, Proto, login, refresh, repo, str_of};

fn config(routes: &str) -> Config {
    Config::from_toml(&support::config_toml("", routes), &repo(), "test.toml").unwrap_or_else(|e| panic!("{e}"))
}

const ROUTE_A: &str = "[[routes]]\npath_prefix = \"/a\"\nupstream = \"echo\"\n";
const ROUTE_B: &str = "[[routes]]\npath_prefix = \"/b\"\nupstream = \"echo\"\n";

/// One GET on an open HTTP/1.1 keep-alive connection; returns the status.
async fn get_on(conn: &mut (impl AsyncReadExt + AsyncWriteExt + Unpin), path: &str, token: &str) -> u16 {
    let req = format!("GET {path} HTTP/1.1\r\nHost: localhost\r\nAuthorization: Bearer {token}\r\n\r\n");
    conn.write_all(req.as_bytes()).await.unwrap();
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        assert_eq!(conn.read(&mut byte).await.unwrap(), 1, "the connection closed");
        head.push(byte[0]);
    }
    let head = String::from_utf8(head).unwrap();
    let len: usize = head
        .lines()
        .find_map(|l| {
            l.to_ascii_lowercase()
                .strip_prefix("content-length: ")
                .map(|v| v.trim().parse().unwrap())
        })
        .unwrap();
    let mut body = vec![0u8; len];
    conn.read_exact(&mut body).await.unwrap();
    head.split(' ').nth(1).unwrap().parse().unwrap()
}

#[tokio::test]
async fn a_reload_swaps_routes_and_users_and_keeps_sessions_and_connections() {
    let mut gw = support::start(&support::config_toml("", ROUTE_A)).await;
    let c = Client::new(Proto::Http1);
    let l = login(&c, &gw, None).await;
    let (at, rt) = (
        str_of(&l, "access_token").to_owned(),
        str_of(&l, "refresh_token").to_owned(),
    );
    let mut kept = raw_tls(gw.addr, b"http/1.1").await;
    assert_eq!(get_on(&mut kept, "/a/x", &at).await, 200);
    assert_eq!(c.get_with_token(&gw.url("/b/x"), &at).await.status, 404);

    let before = gw.running().app().snapshot();
    let done = gw.running().reload(config(ROUTE_B)).unwrap();
    assert_eq!(done.generation, before.generation + 1);
    assert!(done.restart_needed.is_empty());

    assert_eq!(
        c.get_with_token(&gw.url("/b/x"), &at).await.status,
        200,
        "the new route answers"
    );
    assert_eq!(
        c.get_with_token(&gw.url("/a/x"), &at).await.status,
        404,
        "the removed route is gone"
    );
    assert_eq!(
        get_on(&mut kept, "/b/y", &at).await,
        200,
        "an open keep-alive connection carries on"
    );
    let r = refresh(&c, &gw, &rt, "web").await;
    assert_eq!(r.status, 200, "sessions survive a reload: {}", r.text());
}

#[tokio::test]
async fn a_user_removed_by_a_reload_can_no_longer_refresh_and_a_new_one_can_log_in() {
    let mut gw = support::start(&support::config_toml("", ROUTE_A)).await;
    let c = Client::new(Proto::Http1);
    let rt = str_of(&login(&c, &gw, None).await, "refresh_token").to_owned();
    let mut next = config(ROUTE_A);
    let mut renamed = next.users[0].clone();
    next.users.clear();
    renamed.username = "carol".into();
    next.users.push(renamed);
    gw.running().reload(next).unwrap();
    assert_eq!(refresh(&c, &gw, &rt, "web").await.status, 400, "ann is gone");
    let r = c
        .form(
            &gw.url("/api/oauth2/token"),
            &[
                ("grant_type", "password"),
                ("client_id", "web"),
                ("username", "carol"),
                ("password", support::PASSWORD),
            ],
            &[],
        )
        .await;
    assert_eq!(r.status, 200, "{}", r.text());
}

#[tokio::test]
async fn unchanged_upstreams_keep_their_pool_and_restart_only_keys_are_named() {
    let mut gw = support::start(&support::config_toml(
        "",
        "[[routes]]\npath_prefix = \"/up\"\nupstream = \"http://127.0.0.1:9\"\n",
    ))
    .await;
    let before = gw.running().app().snapshot();
    let mut next = config("[[routes]]\npath_prefix = \"/moved\"\nupstream = \"http://127.0.0.1:9\"\n");
    next.server.listen = "127.0.0.1:1".parse().unwrap();
    next.admin.listen = "127.0.0.1:2".parse().unwrap();
    let done = gw.running().reload(next).unwrap();
    assert_eq!(done.restart_needed, vec!["server.listen", "admin.listen"]);
    let after = gw.running().app().snapshot();
    assert!(
        std::sync::Arc::ptr_eq(
            before.routes[0].forwarder.as_ref().unwrap(),
            after.routes[0].forwarder.as_ref().unwrap()
        ),
        "same upstream, same pool"
    );
    assert_eq!(
        after.config.server.listen, before.config.server.listen,
        "the running value is kept"
    );
}

#[tokio::test]
async fn a_replaced_certificate_is_served_to_new_connections() {
    let mut gw = support::start(&support::config_toml("", ROUTE_A)).await;
    let dir = std::env::temp_dir().join(format!("tokengate-reload-cert-{}", std::process::id()));
    tokengate::certs::generate(&dir, true).unwrap();
    let text = support::config_toml("", ROUTE_A)
        .replace(
            &repo().join("certs/localhost.pem").display().to_string(),
            &dir.join("localhost.pem").display().to_string(),
        )
        .replace(
            &repo().join("certs/localhost-key.pem").display().to_string(),
            &dir.join("localhost-key.pem").display().to_string(),
        );
    let old_ca_conn = raw_tls(gw.addr, b"http/1.1").await;
    gw.running()
        .reload(Config::from_toml(&text, &repo(), "test.toml").unwrap())
        .unwrap();
    // A new handshake trusting only the new CA succeeds; one trusting only the old CA fails.
    let trust = |ca: std::path::PathBuf| {
        let roots = tokengate::server::tls::roots_from_file(&ca).unwrap();
        tokio_rustls::TlsConnector::from(std::sync::Arc::new(
            tokengate::server::tls::client_config(roots, &[b"http/1.1"]).unwrap(),
        ))
    };
    let connect = |connector: tokio_rustls::TlsConnector| async move {
        let tcp = tokio::net::TcpStream::connect(gw.addr).await.unwrap();
        connector.connect("localhost".try_into().unwrap(), tcp).await
    };
    assert!(
        connect(trust(dir.join("ca.pem"))).await.is_ok(),
        "the new certificate is served"
    );
    assert!(
        connect(trust(repo().join("certs/ca.pem"))).await.is_err(),
        "the old one is not"
    );
    drop(old_ca_conn);
    let _ = std::fs::remove_dir_all(&dir);
}

/// The process: SIGHUP applies a valid file and refuses an invalid one, logging every problem.
#[test]
fn sighup_applies_a_valid_file_and_logs_every_error_of_an_invalid_one() {
    let base = format!(
        "[server]\nlisten = \"127.0.0.1:0\"\n[admin]\nlisten = \"127.0.0.1:0\"\n[tokens]\nissuer = \"https://gw.test\"\n\
         audience = \"api\"\nsigning = {{ alg = \"HS256\", secret = \"file:{}\" }}\n",
        repo().join("certs/dev-jwt-secret").display()
    );
    let route = |p: &str| format!("[[routes]]\npath_prefix = \"{p}\"\nupstream = \"echo\"\nauth = \"none\"\n");
    let mut gw = Process::spawn(&format!("{base}{}", route("/a")));
    let mut conn = gw.connect();
    assert_eq!(conn.get("/b/x").status, 404);

    gw.write_config(&format!("{base}{}{}", route("/a"), route("/b")));
    gw.signal(Signal::Hup);
    assert!(
        gw.wait_for_stdout("config reloaded", Duration::from_secs(30)),
        "{}",
        gw.stdout()
    );
    assert_eq!(
        gw.connect().get("/b/x").status,
        200,
        "the new route answers after SIGHUP"
    );
    assert_eq!(conn.get("/a/x").status, 200, "the open connection carries on");

    gw.write_config(&format!(
        "{base}{}[[routes]]\npath_prefix = \"/c\"\nupstream = \"echo\"\nauth = \"none\"\ntimeout = \"soon\"\n",
        route("/a")
    ));
    gw.signal(Signal::Hup);
    assert!(
        gw.wait_for_stdout("config reload refused", Duration::from_secs(30)),
        "{}",
        gw.stdout()
    );
    let out = gw.stdout();
    assert!(
        out.contains("routes[1].timeout: \\\"soon\\\" is not a duration")
            || out.contains("routes[1].timeout: \"soon\" is not a duration"),
        "{out}"
    );
    assert_eq!(gw.connect().get("/b/x").status, 200, "nothing changed");
    assert_eq!(gw.connect().get("/c/x").status, 404);
    gw.signal(Signal::Term);
    assert!(gw.wait_exit(Duration::from_secs(60)).is_some_and(|s| s.success()));
}

#[tokio::test]
async fn a_cached_token_never_carries_scopes_from_the_previous_config() {
    let routes = "[[routes]]\npath_prefix = \"/w\"\nupstream = \"echo\"\nscopes = [\"orders:write\"]\n\
                  [[routes]]\npath_prefix = \"/r\"\nupstream = \"echo\"\nscopes = [\"orders:read\"]\n";
    let mut gw = support::start(&support::config_toml("", routes)).await;
    let c = Client::new(Proto::Http1);
    let at = str_of(&login(&c, &gw, Some("orders:write")).await, "access_token").to_owned();
    assert_eq!(c.get_with_token(&gw.url("/w/x"), &at).await.status, 200, "now cached");
    assert_eq!(c.get_with_token(&gw.url("/r/x"), &at).await.status, 403);
    // The same scopes named in another order: inside a Snapshot scopes are bits in the order the
    // config names them, so a cache entry carried over would now read as orders:read.
    let reordered = support::config_toml("", routes).replace(
        "scopes = [\"orders:read\", \"orders:write\"]\n\n[[clients]]\nid = \"mobile\"",
        "scopes = [\"orders:write\", \"orders:read\"]\n\n[[clients]]\nid = \"mobile\"",
    );
    assert_ne!(reordered, support::config_toml("", routes), "the scope order changed");
    gw.running()
        .reload(Config::from_toml(&reordered, &repo(), "test.toml").unwrap())
        .unwrap();
    assert_eq!(c.get_with_token(&gw.url("/r/x"), &at).await.status, 403);
    assert_eq!(c.get_with_token(&gw.url("/w/x"), &at).await.status, 200);
}
