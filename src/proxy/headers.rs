//! Header hygiene between client and upstream.
//!
//! Requests: hop-by-hop headers go (RFC 9110 §7.6.1, including every header the Connection header
//! names); identity headers are set from the validated token and every copy the client sent is
//! dropped first, on every route, public ones included (GHSA-7x63-xv5r-3p2x); Authorization goes
//! unless the route forwards it; X-Forwarded-For, X-Forwarded-Proto/Host are ours (X-Forwarded-For
//! keeps only the entries trusted proxies vouch for: see [`crate::proxy::forwarded`]); header names
//! with underscores, `Forwarded` and `X-Real-IP` are dropped.
//! The client's map is edited in place: one scan over its names finds what must go (usually just
//! Host and Authorization), only those are removed; the gateway's own headers are then added to
//! the map, or written straight after the request line by the upstream hop's own client.

use http::HeaderMap;
use http::header::{self, HeaderName, HeaderValue};

pub static X_AUTH_SUBJECT: HeaderName = HeaderName::from_static("x-auth-subject");
pub static X_AUTH_CLIENT_ID: HeaderName = HeaderName::from_static("x-auth-client-id");
pub static X_AUTH_SCOPE: HeaderName = HeaderName::from_static("x-auth-scope");
pub static X_AUTH_SESSION: HeaderName = HeaderName::from_static("x-auth-session");
pub static X_AUTH_ISSUER: HeaderName = HeaderName::from_static("x-auth-issuer");
pub static X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");
pub static X_FORWARDED_PROTO: HeaderName = HeaderName::from_static("x-forwarded-proto");
pub static X_FORWARDED_HOST: HeaderName = HeaderName::from_static("x-forwarded-host");
pub static X_REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");
pub(crate) static KEEP_ALIVE: HeaderName = HeaderName::from_static("keep-alive");
#[cfg(test)]
static X_REAL_IP: HeaderName = HeaderName::from_static("x-real-ip");

/// Always hop-by-hop (RFC 9110 §7.6.1, plus the legacy `Proxy-Connection` and `Keep-Alive`).
pub(crate) fn is_hop_by_hop(name: &HeaderName) -> bool {
    hop_by_hop(name.as_str())
}

/// [`is_hop_by_hop`] by the name's (lower-case) spelling.
fn hop_by_hop(name: &str) -> bool {
    matches!(
        name,
        "connection"
            | "keep-alive"
            | "proxy-connection"
            | "te"
            | "trailer"
            | "transfer-encoding"
            | "upgrade"
            | "proxy-authorization"
            | "proxy-authenticate"
    )
}

/// `X-Auth-*`: the gateway's identity namespace; the client never gets to write in it.
/// (The definition [`Strip::drops`] is checked against; it spells these out in its `match`.)
#[cfg(test)]
fn is_identity(name: &HeaderName) -> bool {
    name.as_str().starts_with("x-auth-")
}

/// Headers the client may not send upstream at all: any name with an underscore (CGI, WSGI, PHP
/// and Rack read `X_Auth_Subject` as `X-Auth-Subject`, so it would smuggle an identity; nginx drops
/// them too), and client-address headers other than the X-Forwarded-For the gateway appends to.
#[cfg(test)]
fn is_refused(name: &HeaderName) -> bool {
    name.as_str().contains('_') || name == header::FORWARDED || name == X_REAL_IP
}

/// Header names listed in the Connection header(s), lower-cased. The usual tokens (`keep-alive`,
/// `close`, `upgrade`) name nothing beyond the always-hop-by-hop headers, so they are skipped
/// without building a `HeaderName`: most upstream responses carry `Connection: keep-alive`.
fn connection_named(headers: &HeaderMap) -> Vec<HeaderName> {
    let mut named = Vec::new();
    for value in headers.get_all(header::CONNECTION) {
        let Ok(value) = value.to_str() else { continue };
        for token in value.split(',') {
            let token = token.trim();
            if ["keep-alive", "close", "upgrade"]
                .iter()
                .any(|t| token.eq_ignore_ascii_case(t))
            {
                continue;
            }
            if let Ok(name) = HeaderName::from_bytes(token.as_bytes()) {
                named.push(name);
            }
        }
    }
    named
}

/// Is this an HTTP/1.1 Upgrade request (Connection: upgrade + Upgrade)?
pub fn is_upgrade_request(headers: &HeaderMap) -> bool {
    headers.contains_key(header::UPGRADE)
        && headers.get_all(header::CONNECTION).iter().any(|v| {
            v.to_str()
                .is_ok_and(|v| v.split(',').any(|t| t.trim().eq_ignore_ascii_case("upgrade")))
        })
}

/// Does the route allow every protocol the `Upgrade` header offers? (`websocket` by default; the
/// config never allows `h2c`, whose requests would bypass routing and the token check.)
pub fn upgrade_allowed(headers: &HeaderMap, allowed: &[String]) -> bool {
    let mut any = false;
    for value in headers.get_all(header::UPGRADE) {
        let Ok(value) = value.to_str() else { return false };
        for offer in value.split(',') {
            let name = offer.trim().split('/').next().unwrap_or("").trim();
            if name.is_empty() {
                continue;
            }
            if !allowed.iter().any(|a| a.eq_ignore_ascii_case(name)) {
                return false;
            }
            any = true;
        }
    }
    any
}

/// The identity headers of a validated token, built once when the token is verified.
#[derive(Debug, Clone)]
pub struct Identity {
    /// `X-Auth-Subject`: `sub`.
    pub subject: HeaderValue,
    /// `X-Auth-Client-Id`: `client_id` (or `azp`); absent when the token names no client.
    pub client_id: Option<HeaderValue>,
    /// `X-Auth-Scope`: the granted scopes, space-delimited.
    pub scope: HeaderValue,
    /// `X-Auth-Session`: our session id; absent for another issuer's token (no session here).
    pub session: Option<HeaderValue>,
    /// `X-Auth-Issuer`: set for another issuer's token only, so an upstream can tell whose
    /// namespace the subject is in (ours is the default).
    pub issuer: Option<HeaderValue>,
}

pub struct RequestContext<'a> {
    /// The X-Forwarded-For to send: the client's address, then the trusted proxies after it.
    pub forwarded_for: &'a HeaderValue,
    pub proto: &'static str,
    /// The Host (or :authority) the client addressed.
    pub original_host: Option<HeaderValue>,
    /// Host header for the upstream; `None` keeps the client's.
    pub upstream_host: Option<&'a HeaderValue>,
    /// From the token; `None` on public routes.
    pub identity: Option<&'a Identity>,
    pub keep_authorization: bool,
    /// Keep `Upgrade` and `Connection: upgrade` (a WebSocket handshake).
    pub upgrade: bool,
    pub request_id: &'a HeaderValue,
}

/// The headers to send upstream, made from the client's in place: [`strip_request_headers`], then
/// every field of [`added_request_headers`].
pub fn upstream_request_headers(mut headers: HeaderMap, ctx: &RequestContext<'_>) -> HeaderMap {
    strip_request_headers(&mut headers, ctx);
    headers.reserve(10);
    added_request_headers(ctx, |name, value| {
        headers.append(name.clone(), value.clone());
    });
    headers
}

/// Removes from the client's headers, in place, what must not go upstream and every name the
/// gateway sets itself ([`added_request_headers`]): one scan over the names finds them (usually
/// just Host and Authorization). `Upgrade` stays for an allowed upgrade.
pub fn strip_request_headers(headers: &mut HeaderMap, ctx: &RequestContext<'_>) {
    let strip = Strip::new(headers, ctx);
    let doomed: Vec<HeaderName> = headers.keys().filter(|name| strip.drops(name)).cloned().collect();
    for name in &doomed {
        headers.remove(name);
    }
}

/// Which of a request's fields do not go upstream: [`strip_request_headers`] removes them; the
/// upstream hop's own client skips them as it writes the head.
pub struct Strip<'a> {
    ctx: &'a RequestContext<'a>,
    /// The names the Connection field lists.
    named: Vec<HeaderName>,
}

impl<'a> Strip<'a> {
    pub fn new(headers: &HeaderMap, ctx: &'a RequestContext<'a>) -> Self {
        let named = if headers.contains_key(header::CONNECTION) {
            connection_named(headers)
        } else {
            Vec::new()
        };
        Strip { ctx, named }
    }

    /// One `match` over the name's spelling (it runs for every field of every request): the
    /// same answer as the definition in the tests (`drops_by_definition`), which
    /// compares the name with each header in turn.
    pub fn drops(&self, name: &HeaderName) -> bool {
        let fixed = match name.as_str() {
            // Hop-by-hop, but Upgrade when the route tunnels it.
            "upgrade" => !self.ctx.upgrade,
            // The gateway's own, and the client-address headers it refuses (`is_refused`).
            "host" | "x-forwarded-for" | "x-forwarded-proto" | "x-forwarded-host" | "x-request-id" | "forwarded"
            | "x-real-ip" => true,
            "authorization" => !self.ctx.keep_authorization,
            other => hop_by_hop(other) || other.starts_with("x-auth-") || other.contains('_'),
        };
        fixed || (!self.named.is_empty() && self.named.contains(name))
    }
}

/// The gateway's own request headers, in the order they are sent (Host first, as RFC 9110 §7.2
/// asks of a user agent): Host, X-Forwarded-For/Proto/Host, the identity, X-Request-Id, and
/// `Connection: upgrade` for an allowed upgrade.
pub fn added_request_headers(ctx: &RequestContext<'_>, mut add: impl FnMut(&HeaderName, &HeaderValue)) {
    if let Some(host) = ctx.upstream_host.or(ctx.original_host.as_ref()) {
        add(&header::HOST, host);
    }
    add(&X_FORWARDED_FOR, ctx.forwarded_for);
    add(&X_FORWARDED_PROTO, &HeaderValue::from_static(ctx.proto));
    if let Some(host) = &ctx.original_host {
        add(&X_FORWARDED_HOST, host);
    }
    if let Some(id) = ctx.identity {
        add(&X_AUTH_SUBJECT, &id.subject);
        if let Some(client_id) = &id.client_id {
            add(&X_AUTH_CLIENT_ID, client_id);
        }
        add(&X_AUTH_SCOPE, &id.scope);
        if let Some(sid) = &id.session {
            add(&X_AUTH_SESSION, sid);
        }
        if let Some(iss) = &id.issuer {
            add(&X_AUTH_ISSUER, iss);
        }
    }
    add(&X_REQUEST_ID, ctx.request_id);
    if ctx.upgrade {
        add(&header::CONNECTION, &HeaderValue::from_static("upgrade"));
    }
}

/// Strips hop-by-hop headers from an upstream response in place (kept for a 101 handshake).
/// A response framed by Transfer-Encoding loses its Content-Length too (RFC 9112 §6.3: the
/// encoding wins, and an intermediary removes the length before forwarding): the body is sent on
/// with the client connection's own framing, and a stale length would cut it short.
pub fn clean_response_headers(headers: &mut HeaderMap, switching_protocols: bool) {
    if switching_protocols {
        return;
    }
    let named = if headers.contains_key(header::CONNECTION) {
        connection_named(headers)
    } else {
        Vec::new()
    };
    let mut doomed: Vec<HeaderName> = headers
        .keys()
        .filter(|name| is_hop_by_hop(name) || named.contains(name))
        .cloned()
        .collect();
    if doomed.contains(&header::TRANSFER_ENCODING) {
        doomed.push(header::CONTENT_LENGTH);
    }
    for name in &doomed {
        headers.remove(name);
    }
}

/// The `timeout=N` (seconds) of an upstream's `Keep-Alive` response header: when the upstream
/// will close the connection if idle. The smallest if given more than once; `None` if absent or
/// unreadable.
pub fn keep_alive_timeout(headers: &HeaderMap) -> Option<u64> {
    headers
        .get_all(&KEEP_ALIVE)
        .iter()
        .filter_map(|v| keep_alive_timeout_of(v.as_bytes()))
        .min()
}

/// The `timeout=N` of one `Keep-Alive` value (the smallest if given more than once).
pub(crate) fn keep_alive_timeout_of(value: &[u8]) -> Option<u64> {
    std::str::from_utf8(value)
        .ok()?
        .split(',')
        .filter_map(|param| {
            let (name, value) = param.split_once('=')?;
            if !name.trim().eq_ignore_ascii_case("timeout") {
                return None;
            }
            value.trim().trim_matches('"').parse::<u64>().ok()
        })
        .min()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ctx<'a>(
        identity: Option<&'a Identity>,
        rid: &'a HeaderValue,
        upstream_host: Option<&'a HeaderValue>,
    ) -> RequestContext<'a> {
        RequestContext {
            forwarded_for: Box::leak(Box::new(HeaderValue::from_static("198.51.100.2, 192.0.2.7"))),
            proto: "https",
            original_host: Some(HeaderValue::from_static("gw.example")),
            upstream_host,
            identity,
            keep_authorization: false,
            upgrade: false,
            request_id: rid,
        }
    }

    fn hv(s: &'static str) -> HeaderValue {
        HeaderValue::from_static(s)
    }

    /// [`Strip::drops`] as the module's rules state it, one comparison at a time.
    pub(super) fn drops_by_definition(strip: &Strip<'_>, name: &HeaderName) -> bool {
        (is_hop_by_hop(name) && !(strip.ctx.upgrade && name == header::UPGRADE))
            || is_identity(name)
            || is_refused(name)
            || name == header::HOST
            || name == X_FORWARDED_FOR
            || name == X_FORWARDED_PROTO
            || name == X_FORWARDED_HOST
            || name == X_REQUEST_ID
            || (name == header::AUTHORIZATION && !strip.ctx.keep_authorization)
            || strip.named.contains(name)
    }

    #[test]
    fn drops_answers_as_the_definition_for_every_name_and_route_setting() {
        let names = [
            "connection",
            "keep-alive",
            "proxy-connection",
            "te",
            "trailer",
            "transfer-encoding",
            "upgrade",
            "proxy-authorization",
            "proxy-authenticate",
            "host",
            "x-forwarded-for",
            "x-forwarded-proto",
            "x-forwarded-host",
            "x-request-id",
            "forwarded",
            "x-real-ip",
            "authorization",
            "x-auth-subject",
            "x-auth-",
            "x-auth",
            "x_auth_subject",
            "a_b",
            "x-secret-hop",
            "accept",
            "user-agent",
            "content-length",
            "content-type",
            "cookie",
            "trailers",
            "tee",
            "hosts",
            "x-forwarded-fo",
            "x-request-ids",
            "proxy-connectio",
            "upgrade-insecure-requests",
            "x-auth-scope",
            "www-authenticate",
        ];
        let rid = hv("rid");
        for connection in [None, Some("close"), Some("keep-alive, X-Secret-Hop, upgrade, accept")] {
            let mut h = HeaderMap::new();
            if let Some(c) = connection {
                h.insert(header::CONNECTION, hv(c));
            }
            for (upgrade, keep_authorization) in [(false, false), (true, false), (false, true), (true, true)] {
                let mut c = ctx(None, &rid, None);
                c.upgrade = upgrade;
                c.keep_authorization = keep_authorization;
                let strip = Strip::new(&h, &c);
                for name in names {
                    let name = HeaderName::from_static(name);
                    assert_eq!(
                        strip.drops(&name),
                        drops_by_definition(&strip, &name),
                        "{name} (Connection: {connection:?}, upgrade {upgrade}, keep authorization {keep_authorization})"
                    );
                }
            }
        }
    }

    proptest::proptest! {
        #[test]
        fn drops_answers_as_the_definition_for_any_name(name in "[a-z0-9_-]{1,24}") {
            let rid = hv("rid");
            let c = ctx(None, &rid, None);
            let strip = Strip::new(&HeaderMap::new(), &c);
            let name = HeaderName::from_bytes(name.as_bytes()).unwrap();
            proptest::prop_assert_eq!(strip.drops(&name), drops_by_definition(&strip, &name));
        }
    }

    #[test]
    fn hop_by_hop_and_connection_named_headers_are_removed() {
        let mut h = HeaderMap::new();
        h.insert(header::CONNECTION, hv("keep-alive, X-Secret-Hop"));
        h.insert("x-secret-hop", hv("1"));
        h.insert(header::TE, hv("trailers"));
        h.insert("keep-alive", hv("timeout=5"));
        h.insert(header::UPGRADE, hv("websocket"));
        h.insert("proxy-connection", hv("keep-alive"));
        h.insert("accept", hv("*/*"));
        let rid = hv("rid");
        let out = upstream_request_headers(h, &ctx(None, &rid, None));
        for gone in [
            "connection",
            "x-secret-hop",
            "te",
            "keep-alive",
            "upgrade",
            "proxy-connection",
        ] {
            assert!(!out.contains_key(gone), "{gone} should be gone");
        }
        assert_eq!(out["accept"], "*/*");
    }

    #[test]
    fn spoofed_identity_is_replaced_and_authorization_dropped() {
        let mut h = HeaderMap::new();
        h.append("x-auth-subject", hv("admin"));
        h.append("X-Auth-Subject", hv("root"));
        h.append("x-auth-roles", hv("superuser"));
        h.insert(header::AUTHORIZATION, hv("Bearer abc"));
        let identity = Identity {
            subject: hv("ann"),
            client_id: Some(hv("web")),
            scope: hv("orders:read"),
            session: Some(hv("sid1")),
            issuer: None,
        };
        let rid = hv("rid");
        let out = upstream_request_headers(h.clone(), &ctx(Some(&identity), &rid, None));
        assert_eq!(out.get_all("x-auth-subject").iter().collect::<Vec<_>>(), vec!["ann"]);
        assert_eq!(out["x-auth-session"], "sid1");
        assert!(!out.contains_key("x-auth-roles"));
        assert!(!out.contains_key(header::AUTHORIZATION));

        // A public route: every client copy is gone and none is set.
        let out = upstream_request_headers(h, &ctx(None, &rid, None));
        assert!(!out.keys().any(|k| k.as_str().starts_with("x-auth-")), "{out:?}");
    }

    #[test]
    fn forwarding_headers() {
        let mut h = HeaderMap::new();
        h.append("x-forwarded-for", hv("198.51.100.1"));
        h.append("x-forwarded-for", hv("198.51.100.2"));
        h.insert("x-forwarded-proto", hv("http"));
        h.insert("x-forwarded-host", hv("evil.example"));
        h.insert(header::HOST, hv("gw.example"));
        h.append("x-request-id", hv("spoofed-1"));
        h.append("x-request-id", hv("spoofed-2"));
        let rid = hv("rid-1");
        let up = hv("127.0.0.1:9000");
        let no_host = h.clone();
        let out = upstream_request_headers(h, &ctx(None, &rid, Some(&up)));
        // The client's own entries are replaced by the chain the gateway vouches for.
        assert_eq!(out.get_all("x-forwarded-for").iter().count(), 1);
        assert_eq!(out["x-forwarded-for"], "198.51.100.2, 192.0.2.7");
        assert_eq!(out["x-forwarded-proto"], "https");
        assert_eq!(out["x-forwarded-host"], "gw.example");
        assert_eq!(out[header::HOST], "127.0.0.1:9000");
        assert_eq!(out.get_all("x-request-id").iter().collect::<Vec<_>>(), vec!["rid-1"]);
        assert_eq!(out.get_all(header::HOST).iter().count(), 1);

        // No host to send (none given, none configured): the client's Host and X-Forwarded-Host
        // do not pass either.
        let mut c = ctx(None, &rid, None);
        c.original_host = None;
        let out = upstream_request_headers(no_host, &c);
        assert!(
            !out.contains_key(header::HOST) && !out.contains_key("x-forwarded-host"),
            "{out:?}"
        );
        assert_eq!(out.get_all("x-forwarded-for").iter().count(), 1);
    }

    #[test]
    fn upgrade_requests_keep_their_upgrade_headers() {
        let mut h = HeaderMap::new();
        h.insert(header::CONNECTION, hv("Upgrade"));
        h.insert(header::UPGRADE, hv("websocket"));
        assert!(is_upgrade_request(&h));
        let rid = hv("r");
        let mut c = ctx(None, &rid, None);
        c.upgrade = true;
        let out = upstream_request_headers(h, &c);
        assert_eq!(out[header::UPGRADE], "websocket");
        assert_eq!(out[header::CONNECTION], "upgrade");
    }

    #[test]
    fn only_allowed_upgrades_pass() {
        let allowed = vec!["websocket".to_owned()];
        let with = |v: &'static str| {
            let mut h = HeaderMap::new();
            h.insert(header::UPGRADE, hv(v));
            h
        };
        assert!(upgrade_allowed(&with("websocket"), &allowed));
        assert!(upgrade_allowed(&with("WebSocket"), &allowed));
        assert!(!upgrade_allowed(&with("h2c"), &allowed));
        assert!(
            !upgrade_allowed(&with("websocket, h2c"), &allowed),
            "every offer must be allowed"
        );
        assert!(!upgrade_allowed(&with("TLS/1.0"), &allowed));
        assert!(!upgrade_allowed(&HeaderMap::new(), &allowed));
    }

    #[test]
    fn response_hop_by_hop_headers_are_removed() {
        let mut h = HeaderMap::new();
        h.insert(header::CONNECTION, hv("close, x-internal"));
        h.insert("x-internal", hv("1"));
        h.insert(header::TRANSFER_ENCODING, hv("chunked"));
        h.insert(header::CONTENT_TYPE, hv("text/plain"));
        clean_response_headers(&mut h, false);
        assert_eq!(h.len(), 1);
        assert_eq!(h[header::CONTENT_TYPE], "text/plain");
    }

    #[test]
    fn a_response_with_transfer_encoding_loses_its_content_length() {
        let mut h = HeaderMap::new();
        h.insert(header::CONTENT_LENGTH, hv("5"));
        h.insert(header::TRANSFER_ENCODING, hv("chunked"));
        clean_response_headers(&mut h, false);
        assert!(h.is_empty(), "{h:?}");
        let mut h = HeaderMap::new();
        h.insert(header::CONTENT_LENGTH, hv("5"));
        clean_response_headers(&mut h, false);
        assert_eq!(h[header::CONTENT_LENGTH], "5");
    }

    #[test]
    fn keep_alive_timeout_is_read_from_its_parameters() {
        let ka = |values: &[&'static str]| {
            let mut h = HeaderMap::new();
            for v in values {
                h.append("keep-alive", hv(v));
            }
            keep_alive_timeout(&h)
        };
        assert_eq!(ka(&[]), None);
        assert_eq!(ka(&["timeout=5, max=1000"]), Some(5));
        assert_eq!(ka(&["max=3,Timeout = 2"]), Some(2));
        assert_eq!(ka(&["timeout=\"7\""]), Some(7));
        assert_eq!(ka(&["timeout=5", "timeout=3"]), Some(3));
        assert_eq!(ka(&["timeout=-1", "timeout=x", "timeout"]), None);
    }
}
