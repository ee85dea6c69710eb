//! Route resolution: normalized path (+ host) → route index. Pure: no sockets, no config types.
//!
//! The path is normalized once ([`normalize_path`]) and that one spelling is used both to pick the
//! route and to build the upstream request, so a route can never be chosen on one spelling and
//! another forwarded (GHSA-7rh7-c77v-6434). Spellings whose meaning differs between servers are
//! refused outright: an encoded slash, an encoded dot-segment, a NUL.
//!
//! Matching is by longest prefix on segment boundaries: `/api/orders` matches `/api/orders` and
//! `/api/orders/7`, never `/api/ordersx`. Routes that name a host are consulted first for requests to
//! that host; routes without a host serve every host.

use std::borrow::Cow;
use std::collections::HashMap;

use foldhash::fast::RandomState;
use http::{HeaderMap, HeaderValue, Uri, Version};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PathError {
    /// Not an origin-form path (does not start with `/`).
    NotOriginForm,
    /// `%` not followed by two hex digits.
    BadPercentEncoding,
    /// `%2F`: servers disagree on whether it separates segments.
    EncodedSlash,
    /// `%2e%2e` and friends: a dot-segment hidden from the first parser that looks.
    EncodedDotSegment,
    /// A NUL byte, raw or encoded.
    Nul,
    /// A backslash, raw or encoded: some servers (IIS, ASP.NET) read it as `/`.
    Backslash,
    /// A dot-segment with `;parameters` (`..;`): Tomcat, Jetty and Spring drop the parameters and
    /// then resolve the dot-segment, after the gateway routed the path.
    DotSegmentWithParameters,
}

impl PathError {
    pub fn describe(self) -> &'static str {
        match self {
            PathError::NotOriginForm => "request target is not an absolute path",
            PathError::BadPercentEncoding => "path has a malformed percent-encoding",
            PathError::EncodedSlash => "path contains an encoded slash",
            PathError::EncodedDotSegment => "path contains an encoded dot-segment",
            PathError::Nul => "path contains a NUL byte",
            PathError::Backslash => "path contains a backslash",
            PathError::DotSegmentWithParameters => "path contains a dot-segment with parameters",
        }
    }
}

fn is_unreserved(b: u8) -> bool {
    b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~')
}

fn hex_val(b: u8) -> Option<u8> {
    match b {
        b'0'..=b'9' => Some(b - b'0'),
        b'a'..=b'f' => Some(b - b'a' + 10),
        b'A'..=b'F' => Some(b - b'A' + 10),
        _ => None,
    }
}

/// Normalizes an origin-form path (no query): percent-encoded unreserved characters decoded, other
/// percent-encodings upper-cased, dot-segments removed (RFC 3986 §5.2.4, §6.2.2), runs of `/`
/// collapsed to one. A trailing `/` is kept. A path already in that form (the usual case) is
/// returned as it is, not copied.
pub fn normalize_path(raw: &str) -> Result<Cow<'_, str>, PathError> {
    let bytes = raw.as_bytes();
    if bytes.first() != Some(&b'/') {
        return Err(PathError::NotOriginForm);
    }
    // Fast path: nothing to decode, no dot-segments, no empty segments.
    if !bytes.iter().any(|&b| matches!(b, b'%' | 0 | b'\\')) && !raw.contains("//") && !raw.contains("/.") {
        return Ok(Cow::Borrowed(raw));
    }

    let mut segments: Vec<String> = Vec::new();
    let mut trailing_slash = false;
    for raw_seg in raw[1..].split('/') {
        let mut seg = String::with_capacity(raw_seg.len());
        let mut decoded_any = false;
        let sb = raw_seg.as_bytes();
        let mut i = 0;
        while i < sb.len() {
            let b = sb[i];
            if b == 0 {
                return Err(PathError::Nul);
            }
            if b == b'\\' {
                return Err(PathError::Backslash);
            }
            if b == b'%' {
                let (Some(h), Some(l)) = (
                    sb.get(i + 1).copied().and_then(hex_val),
                    sb.get(i + 2).copied().and_then(hex_val),
                ) else {
                    return Err(PathError::BadPercentEncoding);
                };
                let v = h << 4 | l;
                match v {
                    0 => return Err(PathError::Nul),
                    b'/' => return Err(PathError::EncodedSlash),
                    b'\\' => return Err(PathError::Backslash),
                    v if is_unreserved(v) => {
                        seg.push(v as char);
                        decoded_any = true;
                    }
                    v => {
                        seg.push('%');
                        seg.push_str(&format!("{v:02X}"));
                    }
                }
                i += 3;
            } else {
                // `raw` is a &str and `b` is not part of a %-escape: copy the whole UTF-8 char.
                let ch_len = utf8_len(b);
                seg.push_str(&raw_seg[i..i + ch_len]);
                i += ch_len;
            }
        }
        trailing_slash = false;
        if let Some((before, _)) = seg.split_once(';')
            && matches!(before, "." | "..")
        {
            return Err(PathError::DotSegmentWithParameters);
        }
        match seg.as_str() {
            "." | ".." if decoded_any => return Err(PathError::EncodedDotSegment),
            "" => trailing_slash = true,
            "." => trailing_slash = true,
            ".." => {
                segments.pop();
                trailing_slash = true;
            }
            _ => segments.push(seg),
        }
    }
    let mut out = String::with_capacity(raw.len());
    for seg in &segments {
        out.push('/');
        out.push_str(seg);
    }
    if out.is_empty() || trailing_slash {
        out.push('/');
    }
    Ok(Cow::Owned(out))
}

fn utf8_len(first: u8) -> usize {
    match first {
        0x00..=0x7F => 1,
        0xC0..=0xDF => 2,
        0xE0..=0xEF => 3,
        _ => 4,
    }
}

/// A route prefix in its canonical form: normalized, without a trailing slash (except `/` itself).
pub fn canonical_prefix(prefix: &str) -> Result<String, PathError> {
    let mut p = normalize_path(prefix)?.into_owned();
    while p.len() > 1 && p.ends_with('/') {
        p.pop();
    }
    Ok(p)
}

type PrefixMap = HashMap<Box<str>, usize, RandomState>;

/// Longest-prefix route lookup. Each lookup costs one hash probe per path segment, whatever the
/// number of routes.
#[derive(Debug, Default)]
pub struct RouteTable {
    by_host: HashMap<Box<str>, PrefixMap, RandomState>,
    any_host: PrefixMap,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DuplicateRoute {
    pub index: usize,
    pub earlier: usize,
}

impl RouteTable {
    /// Builds the table from `(host, canonical prefix)` pairs; the index of each pair is what
    /// [`RouteTable::resolve`] returns. Hosts are matched case-insensitively.
    pub fn new<'a>(routes: impl IntoIterator<Item = (Option<&'a str>, &'a str)>) -> Result<Self, DuplicateRoute> {
        let mut table = RouteTable::default();
        for (index, (host, prefix)) in routes.into_iter().enumerate() {
            let map = match host {
                Some(h) => table.by_host.entry(h.to_ascii_lowercase().into()).or_default(),
                None => &mut table.any_host,
            };
            if let Some(&earlier) = map.get(prefix) {
                return Err(DuplicateRoute { index, earlier });
            }
            map.insert(prefix.into(), index);
        }
        Ok(table)
    }

    /// The route for a normalized path and the request's host (port and case ignored).
    pub fn resolve(&self, host: Option<&str>, path: &str) -> Option<usize> {
        if !self.by_host.is_empty()
            && let Some(host) = host
        {
            let host = strip_port(host);
            // "admin.example." names the same host as "admin.example" (a fully qualified name).
            let host = host.strip_suffix('.').unwrap_or(host);
            let found = if host.bytes().any(|b| b.is_ascii_uppercase()) {
                self.by_host.get(host.to_ascii_lowercase().as_str())
            } else {
                self.by_host.get(host)
            };
            if let Some(map) = found
                && let Some(i) = longest_prefix(map, path)
            {
                return Some(i);
            }
        }
        longest_prefix(&self.any_host, path)
    }
}

/// Why a request's host could not be determined (RFC 9112 §3.2, RFC 9113 §8.3.1): 400.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HostError {
    /// An HTTP/1.1 request without Host, an HTTP/2 request without :authority or Host.
    Missing,
    /// More than one Host header.
    Repeated,
    /// Not `host[:port]` (a space, userinfo, an empty host...).
    Invalid,
    /// HTTP/2 `:authority` and `Host` name different hosts.
    Mismatch,
}

impl HostError {
    pub fn describe(self) -> &'static str {
        match self {
            HostError::Missing => "the request names no host",
            HostError::Repeated => "more than one Host header",
            HostError::Invalid => "the Host header is not a valid host",
            HostError::Mismatch => ":authority and Host name different hosts",
        }
    }
}

fn valid_authority(v: &[u8]) -> bool {
    // Nearly every request names the same host as the one before it on the same thread, and
    // parsing one costs an allocation and ~1k instructions: the last valid value is remembered
    // (a pure function of the bytes, so remembering cannot change an answer).
    thread_local! {
        static LAST_VALID: std::cell::RefCell<Vec<u8>> = const { std::cell::RefCell::new(Vec::new()) };
    }
    if v.is_empty() {
        return false;
    }
    if LAST_VALID.with_borrow(|last| last.as_slice() == v) {
        return true;
    }
    let valid = !v.contains(&b'@') && http::uri::Authority::try_from(v).is_ok_and(|a| !a.host().is_empty());
    if valid && v.len() <= 256 {
        LAST_VALID.with_borrow_mut(|last| {
            last.clear();
            last.extend_from_slice(v);
        });
    }
    valid
}

/// The authority a request addressed, as one value used for routing and forwarding:
/// HTTP/2's `:authority` (a differing Host is refused); for HTTP/1.1 the target's authority when
/// the target is in absolute form (RFC 9112 §3.2.2: the Host header is then ignored), else Host.
/// HTTP/1.1 requires exactly one valid Host either way; HTTP/1.0 may omit it.
pub fn request_authority(version: Version, uri: &Uri, headers: &HeaderMap) -> Result<Option<HeaderValue>, HostError> {
    let mut hosts = headers.get_all(http::header::HOST).iter();
    let host = hosts.next();
    if hosts.next().is_some() {
        return Err(HostError::Repeated);
    }
    if let Some(h) = host
        && !valid_authority(h.as_bytes())
    {
        return Err(HostError::Invalid);
    }
    let target = uri.authority().map(|a| a.as_str());
    if let Some(t) = target
        && !valid_authority(t.as_bytes())
    {
        return Err(HostError::Invalid);
    }
    if version == Version::HTTP_2 {
        return match (target, host) {
            (Some(t), Some(h)) if !t.as_bytes().eq_ignore_ascii_case(h.as_bytes()) => Err(HostError::Mismatch),
            (Some(t), _) => HeaderValue::from_str(t).map(Some).map_err(|_| HostError::Invalid),
            (None, Some(h)) => Ok(Some(h.clone())),
            (None, None) => Err(HostError::Missing),
        };
    }
    if host.is_none() && version >= Version::HTTP_11 {
        return Err(HostError::Missing);
    }
    match target {
        Some(t) => HeaderValue::from_str(t).map(Some).map_err(|_| HostError::Invalid),
        None => Ok(host.cloned()),
    }
}

fn strip_port(host: &str) -> &str {
    if host.starts_with('[') {
        // IPv6 literal: "[::1]:8443"
        return match host.find(']') {
            Some(end) => &host[..=end],
            None => host,
        };
    }
    match host.rfind(':') {
        Some(i) => &host[..i],
        None => host,
    }
}

fn longest_prefix(map: &PrefixMap, path: &str) -> Option<usize> {
    if map.is_empty() {
        return None;
    }
    let mut candidate = path.trim_end_matches('/');
    loop {
        if candidate.is_empty() {
            return map.get("/").copied();
        }
        if let Some(&i) = map.get(candidate) {
            return Some(i);
        }
        match candidate.rfind('/') {
            Some(cut) => candidate = &candidate[..cut],
            None => return map.get("/").copied(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn normalization_removes_dot_segments_and_duplicate_slashes() {
        assert_eq!(normalize_path("/api/orders/../admin").unwrap(), "/api/admin");
        assert_eq!(normalize_path("/api/orders/../../admin").unwrap(), "/admin");
        assert_eq!(normalize_path("/api/./orders").unwrap(), "/api/orders");
        assert_eq!(normalize_path("/api//orders").unwrap(), "/api/orders");
        assert_eq!(normalize_path("//api/orders/").unwrap(), "/api/orders/");
        assert_eq!(normalize_path("/../..").unwrap(), "/");
        assert_eq!(normalize_path("/a/b/..").unwrap(), "/a/");
        assert_eq!(normalize_path("/").unwrap(), "/");
    }

    #[test]
    fn normalization_decodes_unreserved_only() {
        assert_eq!(normalize_path("/api/%6Frders").unwrap(), "/api/orders");
        assert_eq!(normalize_path("/a%20b%7e").unwrap(), "/a%20b~");
        assert_eq!(normalize_path("/a%3fb").unwrap(), "/a%3Fb");
    }

    #[test]
    fn ambiguous_spellings_are_refused() {
        assert_eq!(normalize_path("/api/orders%2F..%2Fadmin"), Err(PathError::EncodedSlash));
        assert_eq!(normalize_path("/api/%2f"), Err(PathError::EncodedSlash));
        assert_eq!(normalize_path("/api/%2e%2e/admin"), Err(PathError::EncodedDotSegment));
        assert_eq!(normalize_path("/api/.%2E/admin"), Err(PathError::EncodedDotSegment));
        assert_eq!(normalize_path("/api/%00"), Err(PathError::Nul));
        assert_eq!(normalize_path("/api/%zz"), Err(PathError::BadPercentEncoding));
        assert_eq!(normalize_path("/api/%4"), Err(PathError::BadPercentEncoding));
        assert_eq!(normalize_path("api"), Err(PathError::NotOriginForm));
        assert_eq!(
            normalize_path("/api/orders/..;/admin"),
            Err(PathError::DotSegmentWithParameters)
        );
        assert_eq!(
            normalize_path("/api/orders/.;x=1/admin"),
            Err(PathError::DotSegmentWithParameters)
        );
        assert_eq!(
            normalize_path("/api/orders/%2e%2e;/admin"),
            Err(PathError::DotSegmentWithParameters)
        );
        assert_eq!(normalize_path("/api/orders/..\\admin"), Err(PathError::Backslash));
        assert_eq!(normalize_path("/api/orders/..%5Cadmin"), Err(PathError::Backslash));
        assert_eq!(normalize_path("/api\\admin"), Err(PathError::Backslash));
        assert_eq!(
            normalize_path("/api/orders;v=1/x").unwrap(),
            "/api/orders;v=1/x",
            "other parameters pass"
        );
        assert_eq!(normalize_path("*"), Err(PathError::NotOriginForm));
    }

    #[test]
    fn non_ascii_paths_survive() {
        assert_eq!(normalize_path("/caf\u{e9}/./x").unwrap(), "/caf\u{e9}/x");
    }

    fn table() -> RouteTable {
        RouteTable::new([
            (None, "/api"),
            (None, "/api/orders"),
            (None, "/"),
            (Some("Admin.Example"), "/api"),
        ])
        .unwrap()
    }

    #[test]
    fn longest_prefix_wins_on_segment_boundaries() {
        let t = table();
        assert_eq!(t.resolve(None, "/api/orders"), Some(1));
        assert_eq!(t.resolve(None, "/api/orders/7"), Some(1));
        assert_eq!(t.resolve(None, "/api/orders/"), Some(1));
        assert_eq!(t.resolve(None, "/api/ordersx"), Some(0));
        assert_eq!(t.resolve(None, "/apix"), Some(2));
        assert_eq!(t.resolve(None, "/"), Some(2));
    }

    #[test]
    fn no_route_without_a_catch_all() {
        let t = RouteTable::new([(None, "/api/orders")]).unwrap();
        assert_eq!(t.resolve(None, "/api/ordersx"), None);
        assert_eq!(t.resolve(None, "/api"), None);
        assert_eq!(t.resolve(None, "/"), None);
    }

    #[test]
    fn host_routes_come_first_and_ignore_port_and_case() {
        let t = table();
        assert_eq!(t.resolve(Some("admin.example:8443"), "/api/x"), Some(3));
        assert_eq!(t.resolve(Some("ADMIN.example"), "/api/orders"), Some(3));
        assert_eq!(t.resolve(Some("admin.example"), "/other"), Some(2));
        assert_eq!(t.resolve(Some("other.example"), "/api/x"), Some(0));
    }

    #[test]
    fn a_trailing_dot_names_the_same_host() {
        let t = table();
        assert_eq!(t.resolve(Some("admin.example."), "/api/x"), Some(3));
        assert_eq!(t.resolve(Some("admin.example.:8443"), "/api/x"), Some(3));
    }

    fn headers(hosts: &[&str]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for v in hosts {
            h.append(http::header::HOST, HeaderValue::from_str(v).unwrap());
        }
        h
    }

    #[test]
    fn the_remembered_valid_host_answers_only_for_the_same_bytes() {
        for _ in 0..2 {
            assert!(valid_authority(b"api.example:8443"));
            // Prefixes, extensions and near misses of the remembered value are judged afresh.
            for bad in [
                &b"api.example:8443@evil"[..],
                b"api.example:8443/x",
                b"api.example:84 43",
                b"",
                b"@",
            ] {
                assert!(!valid_authority(bad), "{:?}", String::from_utf8_lossy(bad));
            }
            assert!(valid_authority(b"api.example:8443"));
            assert!(valid_authority(b"api.example"));
        }
    }

    #[test]
    fn http11_authority_comes_from_an_absolute_target_else_host() {
        let origin: Uri = "/x".parse().unwrap();
        let absolute: Uri = "https://admin.example/x".parse().unwrap();
        let v11 = Version::HTTP_11;
        assert_eq!(
            request_authority(v11, &origin, &headers(&["a.example"]))
                .unwrap()
                .unwrap(),
            "a.example"
        );
        assert_eq!(
            request_authority(v11, &absolute, &headers(&["localhost"]))
                .unwrap()
                .unwrap(),
            "admin.example",
            "RFC 9112 §3.2.2: the target's authority wins"
        );
        assert_eq!(request_authority(v11, &origin, &headers(&[])), Err(HostError::Missing));
        assert_eq!(
            request_authority(v11, &absolute, &headers(&[])),
            Err(HostError::Missing)
        );
        assert_eq!(
            request_authority(v11, &origin, &headers(&["a", "b"])),
            Err(HostError::Repeated)
        );
        assert_eq!(
            request_authority(v11, &origin, &headers(&["a b"])),
            Err(HostError::Invalid)
        );
        assert_eq!(
            request_authority(v11, &origin, &headers(&["u@a"])),
            Err(HostError::Invalid)
        );
        assert_eq!(
            request_authority(v11, &origin, &headers(&[""])),
            Err(HostError::Invalid)
        );
        assert_eq!(request_authority(Version::HTTP_10, &origin, &headers(&[])), Ok(None));
    }

    #[test]
    fn http2_authority_wins_and_a_differing_host_is_refused() {
        let with_authority: Uri = "https://a.example/x".parse().unwrap();
        let without: Uri = "/x".parse().unwrap();
        let v2 = Version::HTTP_2;
        assert_eq!(
            request_authority(v2, &with_authority, &headers(&[])).unwrap().unwrap(),
            "a.example"
        );
        assert_eq!(
            request_authority(v2, &with_authority, &headers(&["A.example"]))
                .unwrap()
                .unwrap(),
            "a.example"
        );
        assert_eq!(
            request_authority(v2, &with_authority, &headers(&["b.example"])),
            Err(HostError::Mismatch)
        );
        assert_eq!(
            request_authority(v2, &without, &headers(&["b.example"]))
                .unwrap()
                .unwrap(),
            "b.example"
        );
        assert_eq!(request_authority(v2, &without, &headers(&[])), Err(HostError::Missing));
    }

    #[test]
    fn duplicate_routes_are_reported() {
        let err = RouteTable::new([(None, "/a"), (Some("h"), "/a"), (None, "/a")]).unwrap_err();
        assert_eq!(err, DuplicateRoute { index: 2, earlier: 0 });
    }

    mod properties {
        use super::super::*;
        use proptest::prelude::*;

        /// Paths made of the characters that matter to normalization.
        fn tricky_path() -> impl Strategy<Value = String> {
            proptest::collection::vec(
                prop_oneof![
                    Just("/"),
                    Just("."),
                    Just(".."),
                    Just("%2e"),
                    Just("%2E"),
                    Just("%2f"),
                    Just("%5c"),
                    Just("%00"),
                    Just("%"),
                    Just("%4"),
                    Just("%41"),
                    Just(";"),
                    Just("a"),
                    Just("\\"),
                    Just("\u{e9}"),
                    Just("~"),
                    Just("%7e"),
                    Just("//"),
                ],
                0..16,
            )
            .prop_map(|parts| format!("/{}", parts.concat()))
        }

        proptest! {
            #[test]
            fn normalization_never_panics_on_any_input(raw in ".*") {
                let _ = normalize_path(&raw);
            }

            #[test]
            fn normalization_is_idempotent(raw in tricky_path()) {
                if let Ok(once) = normalize_path(&raw) {
                    let twice = normalize_path(&once);
                    prop_assert_eq!(twice.as_deref(), Ok(&*once));
                    prop_assert!(once.starts_with('/'));
                    prop_assert!(!once.contains("//"));
                    prop_assert!(!once.split('/').any(|s| s == "." || s == ".."));
                }
            }

            #[test]
            fn host_parsing_never_panics(target in ".{0,40}", hosts in proptest::collection::vec(proptest::collection::vec(any::<u8>(), 0..40), 0..3)) {
                let uri: Uri = target.parse().unwrap_or_else(|_| Uri::from_static("/"));
                let mut h = HeaderMap::new();
                for v in hosts {
                    if let Ok(v) = HeaderValue::from_bytes(&v) {
                        h.append(http::header::HOST, v);
                    }
                }
                for version in [Version::HTTP_10, Version::HTTP_11, Version::HTTP_2] {
                    let _ = request_authority(version, &uri, &h);
                }
            }

            #[test]
            fn route_resolution_never_panics(host in ".{0,30}", path in tricky_path()) {
                let t = RouteTable::new([(None, "/a"), (Some("h.example"), "/")]).unwrap();
                let _ = t.resolve(Some(&host), &path);
            }
        }
    }

    #[test]
    fn canonical_prefixes_have_no_trailing_slash() {
        assert_eq!(canonical_prefix("/api/").unwrap(), "/api");
    }
}
