//! The client's address behind trusted proxies (`server.trusted_proxies`).
//!
//! A request's address chain is its `X-Forwarded-For` entries followed by the TCP peer. Each
//! trusted proxy appends the address it received the request from, so only entries written by a
//! trusted proxy are believable: walking the chain from the right, every trusted address is a
//! proxy, and the first one that is not is the client (RFC 7239 §7.4 practice; nginx's
//! `real_ip_recursive`, Envoy's trusted hops). Everything left of it was written by the client
//! and is dropped. When the peer itself is not trusted, `X-Forwarded-For` is not read at all.
//!
//! Edge cases: an entry that is not an address (`unknown`, an obfuscated name, garbage) ends the
//! walk, and the last trusted address reached is the client (it is the furthest hop known); when
//! every address is trusted, the leftmost is the client. Entries may carry a port (`1.2.3.4:80`,
//! `[2001:db8::1]:443`) or brackets; IPv4-mapped IPv6 addresses count as IPv4.

use std::net::{IpAddr, SocketAddr};

use http::HeaderMap;
use http::header::HeaderValue;
use ipnet::IpNet;

use crate::proxy::headers::X_FORWARDED_FOR;

/// Chains longer than this are not walked further (a header cap, not a real-world limit).
const MAX_HOPS: usize = 64;

/// Address ranges whose `X-Forwarded-For` is believed.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TrustedProxies(Vec<IpNet>);

/// Where a request came from.
#[derive(Debug, Clone)]
pub struct ClientAddr {
    /// The client: the peer, or behind trusted proxies the address they name.
    pub ip: IpAddr,
    /// `ip` as a header value (for the access log).
    pub ip_header: HeaderValue,
    /// The `X-Forwarded-For` for the upstream: the client, the trusted proxies after it, the peer.
    pub forwarded_for: HeaderValue,
}

impl TrustedProxies {
    pub fn new(nets: Vec<IpNet>) -> Self {
        TrustedProxies(nets)
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    pub fn contains(&self, ip: IpAddr) -> bool {
        let ip = ip.to_canonical();
        self.0.iter().any(|net| net.contains(&ip))
    }

    /// The client of a request from `peer` (whose address is `peer_header`, formatted once per
    /// connection) with `headers`.
    pub fn client(&self, peer: IpAddr, peer_header: &HeaderValue, headers: &HeaderMap) -> ClientAddr {
        let peer = peer.to_canonical();
        if !self.contains(peer) || !headers.contains_key(&X_FORWARDED_FOR) {
            return ClientAddr {
                ip: peer,
                ip_header: peer_header.clone(),
                forwarded_for: peer_header.clone(),
            };
        }
        let entries: Vec<&str> = headers
            .get_all(&X_FORWARDED_FOR)
            .iter()
            .flat_map(|v| v.to_str().unwrap_or("").split(','))
            .map(str::trim)
            .collect();
        // The chain right to left: the peer, then the header's entries from its end.
        let mut kept: Vec<IpAddr> = vec![peer];
        for entry in entries.iter().rev().take(MAX_HOPS) {
            let Some(ip) = parse_entry(entry) else { break };
            kept.push(ip);
            if !self.contains(ip) {
                break;
            }
        }
        let ip = kept.last().copied().unwrap_or(peer);
        let text: Vec<String> = kept.iter().rev().map(IpAddr::to_string).collect();
        let forwarded_for = HeaderValue::from_str(&text.join(", ")).unwrap_or_else(|_| peer_header.clone());
        let ip_header = HeaderValue::from_str(&ip.to_string()).unwrap_or_else(|_| peer_header.clone());
        ClientAddr {
            ip,
            ip_header,
            forwarded_for,
        }
    }
}

/// One `X-Forwarded-For` entry as an address: bare, bracketed, or with a port.
fn parse_entry(entry: &str) -> Option<IpAddr> {
    let ip = entry
        .parse::<IpAddr>()
        .ok()
        .or_else(|| entry.parse::<SocketAddr>().ok().map(|s| s.ip()))
        .or_else(|| entry.strip_prefix('[')?.strip_suffix(']')?.parse::<IpAddr>().ok())?;
    Some(ip.to_canonical())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn trusted(nets: &[&str]) -> TrustedProxies {
        TrustedProxies::new(nets.iter().map(|n| n.parse().unwrap()).collect())
    }

    /// (client ip, forwarded X-Forwarded-For) for a request from `peer` with these XFF values.
    fn resolve(t: &TrustedProxies, peer: &str, xff: &[&str]) -> (String, String) {
        let peer: IpAddr = peer.parse().unwrap();
        let mut h = HeaderMap::new();
        for v in xff {
            h.append(&X_FORWARDED_FOR, HeaderValue::from_str(v).unwrap());
        }
        let peer_header = HeaderValue::from_str(&peer.to_string()).unwrap();
        let c = t.client(peer, &peer_header, &h);
        assert_eq!(c.ip_header.to_str().unwrap(), c.ip.to_string());
        (c.ip.to_string(), c.forwarded_for.to_str().unwrap().to_owned())
    }

    #[test]
    fn an_untrusted_peer_is_the_client_and_its_header_is_ignored() {
        let t = trusted(&["10.0.0.0/8"]);
        assert_eq!(
            resolve(&t, "203.0.113.5", &["198.51.100.1, 10.0.0.1"]),
            ("203.0.113.5".into(), "203.0.113.5".into())
        );
        // No trusted proxies at all: the same, whatever the header says.
        let none = TrustedProxies::default();
        assert_eq!(
            resolve(&none, "10.0.0.1", &["198.51.100.1"]),
            ("10.0.0.1".into(), "10.0.0.1".into())
        );
    }

    #[test]
    fn the_rightmost_untrusted_address_behind_several_hops_is_the_client() {
        let t = trusted(&["10.0.0.0/8", "192.168.1.0/24"]);
        // client → CDN edge (untrusted, forged by nobody) → lb 192.168.1.2 → proxy 10.0.0.7 → us
        assert_eq!(
            resolve(&t, "10.0.0.7", &["1.1.1.1, 198.51.100.20", "192.168.1.2"]),
            ("198.51.100.20".into(), "198.51.100.20, 192.168.1.2, 10.0.0.7".into())
        );
        // A client forging entries left of its own address changes nothing.
        assert_eq!(
            resolve(&t, "10.0.0.7", &["10.9.9.9, 203.0.113.66, 198.51.100.20"]),
            ("198.51.100.20".into(), "198.51.100.20, 10.0.0.7".into())
        );
        // No header from a trusted peer: the peer is all there is.
        assert_eq!(resolve(&t, "10.0.0.7", &[]), ("10.0.0.7".into(), "10.0.0.7".into()));
    }

    #[test]
    fn when_every_address_is_trusted_the_leftmost_is_the_client() {
        let t = trusted(&["10.0.0.0/8"]);
        assert_eq!(
            resolve(&t, "10.0.0.1", &["10.1.1.1, 10.2.2.2"]),
            ("10.1.1.1".into(), "10.1.1.1, 10.2.2.2, 10.0.0.1".into())
        );
    }

    #[test]
    fn a_malformed_entry_ends_the_walk_at_the_last_trusted_hop() {
        let t = trusted(&["10.0.0.0/8"]);
        for bad in ["unknown", "_hidden", "not an ip", "", "1.2.3", "[::1"] {
            assert_eq!(
                resolve(&t, "10.0.0.1", &[&format!("198.51.100.1, {bad}, 10.0.0.2")]),
                ("10.0.0.2".into(), "10.0.0.2, 10.0.0.1".into()),
                "{bad:?}"
            );
        }
        // Malformed right at the end: the peer itself is the furthest hop known.
        assert_eq!(
            resolve(&t, "10.0.0.1", &["garbage"]),
            ("10.0.0.1".into(), "10.0.0.1".into())
        );
    }

    #[test]
    fn ipv6_ports_brackets_and_mapped_addresses() {
        let t = trusted(&["2001:db8:1::/48", "10.0.0.0/8"]);
        assert_eq!(
            resolve(&t, "2001:db8:1::5", &["2001:db8:ffff::9"]),
            ("2001:db8:ffff::9".into(), "2001:db8:ffff::9, 2001:db8:1::5".into())
        );
        assert_eq!(
            resolve(&t, "2001:db8:1::5", &["[2001:db8:ffff::9]:4711, [2001:db8:1::6]"]),
            (
                "2001:db8:ffff::9".into(),
                "2001:db8:ffff::9, 2001:db8:1::6, 2001:db8:1::5".into()
            )
        );
        assert_eq!(
            resolve(&t, "2001:db8:1::5", &["198.51.100.7:5555"]),
            ("198.51.100.7".into(), "198.51.100.7, 2001:db8:1::5".into())
        );
        // A dual-stack socket reports an IPv4 peer as ::ffff:a.b.c.d: an IPv4 range still matches.
        assert_eq!(
            resolve(&t, "::ffff:10.0.0.1", &["::ffff:198.51.100.7"]),
            ("198.51.100.7".into(), "198.51.100.7, 10.0.0.1".into())
        );
        // A trusted IPv6 range says nothing about an untrusted IPv6 peer.
        assert_eq!(
            resolve(&t, "2001:db8:2::1", &["198.51.100.7"]),
            ("2001:db8:2::1".into(), "2001:db8:2::1".into())
        );
    }

    #[test]
    fn a_long_chain_of_trusted_looking_entries_is_walked_at_most_max_hops() {
        let t = trusted(&["10.0.0.0/8"]);
        let long = vec!["10.0.0.9"; 1000].join(", ");
        let (client, xff) = resolve(&t, "10.0.0.1", &[&format!("198.51.100.1, {long}")]);
        assert_eq!(client, "10.0.0.9");
        assert_eq!(xff.split(", ").count(), MAX_HOPS + 1);
    }
}
