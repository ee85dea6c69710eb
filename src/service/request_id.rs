//! Request ids: the client's `X-Request-Id` if it sent a sane one, else `<process prefix>-<counter>`.

use std::sync::atomic::{AtomicU64, Ordering};

use http::{HeaderMap, HeaderValue};

use crate::proxy::headers::X_REQUEST_ID;

pub struct RequestIds {
    prefix: u32,
    counter: AtomicU64,
}

impl RequestIds {
    pub fn new(prefix: u32) -> Self {
        RequestIds {
            prefix,
            counter: AtomicU64::new(0),
        }
    }

    pub fn for_request(&self, headers: &HeaderMap) -> HeaderValue {
        if let Some(v) = headers.get(&X_REQUEST_ID)
            && is_sane_request_id(v.as_bytes())
            && !looks_generated(v.as_bytes())
        {
            return v.clone();
        }
        let n = self.counter.fetch_add(1, Ordering::Relaxed);
        // `<8 hex digits of the process prefix>-<counter in hex>`, without going through fmt.
        let mut buf = [0u8; 25];
        hex_into(&mut buf[..8], u64::from(self.prefix));
        buf[8] = b'-';
        let digits = (64 - n.leading_zeros()).div_ceil(4).max(1) as usize;
        hex_into(&mut buf[9..9 + digits], n);
        HeaderValue::from_bytes(&buf[..9 + digits]).unwrap_or(HeaderValue::from_static("-"))
    }
}

/// Writes the low `out.len() * 4` bits of `n` as lower-case hex.
fn hex_into(out: &mut [u8], mut n: u64) {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    for slot in out.iter_mut().rev() {
        *slot = HEX[(n & 0xf) as usize];
        n >>= 4;
    }
}

/// 1 to 128 characters of `[A-Za-z0-9._:-]`: safe in a log line and a header.
fn is_sane_request_id(v: &[u8]) -> bool {
    (1..=128).contains(&v.len())
        && v.iter()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b':'))
}

/// The shape of an id this gateway generates: a client's copy of one could collide with ours in
/// the logs, so it is replaced.
fn looks_generated(v: &[u8]) -> bool {
    let hex = |b: &[u8]| b.iter().all(|c| matches!(c, b'0'..=b'9' | b'a'..=b'f'));
    v.len() >= 10 && v.len() <= 25 && v[8] == b'-' && hex(&v[..8]) && hex(&v[9..])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generated_request_ids_are_prefix_dash_counter_in_hex() {
        let ids = RequestIds::new(0xabc);
        let none = HeaderMap::new();
        assert_eq!(ids.for_request(&none), "00000abc-0");
        assert_eq!(ids.for_request(&none), "00000abc-1");
        ids.counter.store(0x1f, Ordering::Relaxed);
        assert_eq!(ids.for_request(&none), "00000abc-1f");
        ids.counter.store(u64::MAX, Ordering::Relaxed);
        assert_eq!(ids.for_request(&none), "00000abc-ffffffffffffffff");
    }

    #[test]
    fn client_request_ids_are_kept_only_when_sane_and_not_shaped_like_ours() {
        let ids = RequestIds::new(1);
        let mut h = HeaderMap::new();
        h.insert(&X_REQUEST_ID, HeaderValue::from_static("trace-42.a:b_c"));
        assert_eq!(ids.for_request(&h), "trace-42.a:b_c");
        h.insert(&X_REQUEST_ID, HeaderValue::from_static("has space"));
        assert_eq!(ids.for_request(&h), "00000001-0");
        h.insert(&X_REQUEST_ID, HeaderValue::from_str(&"x".repeat(129)).unwrap());
        assert_eq!(ids.for_request(&h), "00000001-1");
        // A copy of a generated id (ours or another instance's) could collide in the logs.
        h.insert(&X_REQUEST_ID, HeaderValue::from_static("00000001-5"));
        assert_eq!(ids.for_request(&h), "00000001-2");
        h.insert(&X_REQUEST_ID, HeaderValue::from_static("deadbeef-0"));
        assert_eq!(ids.for_request(&h), "00000001-3");
        h.insert(&X_REQUEST_ID, HeaderValue::from_static("DEADBEEF-0"));
        assert_eq!(ids.for_request(&h), "DEADBEEF-0", "not our shape (upper case)");
    }
}
