//! Scopes as bit sets over the scopes the config names.
//!
//! Every scope the gateway can grant or require appears in the config (clients, users, routes), so
//! the set of them is known at load and small. A session then carries a `u64` instead of strings, and
//! "granted = requested ∩ user's ∩ client's" or "route scopes ⊆ token scopes" are one AND each.

use std::collections::HashMap;

/// At most this many distinct scopes may appear in one config.
pub const MAX_SCOPES: usize = 64;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Hash)]
pub struct ScopeSet(pub u64);

impl ScopeSet {
    pub const EMPTY: ScopeSet = ScopeSet(0);

    pub fn is_empty(self) -> bool {
        self.0 == 0
    }
    pub fn intersect(self, other: ScopeSet) -> ScopeSet {
        ScopeSet(self.0 & other.0)
    }
    pub fn contains_all(self, other: ScopeSet) -> bool {
        self.0 & other.0 == other.0
    }
}

/// The scopes of one config, in order of first appearance; a scope's index is its bit.
#[derive(Debug, Clone, Default)]
pub struct ScopeUniverse {
    names: Vec<Box<str>>,
    index: HashMap<Box<str>, u8>,
}

/// RFC 6749 §3.3: `scope-token = 1*( %x21 / %x23-5B / %x5D-7E )`.
pub fn is_scope_token(s: &str) -> bool {
    !s.is_empty()
        && s.bytes()
            .all(|b| b == 0x21 || (0x23..=0x5B).contains(&b) || (0x5D..=0x7E).contains(&b))
}

impl ScopeUniverse {
    /// Adds a scope name; returns false when the universe is full.
    pub fn add(&mut self, name: &str) -> bool {
        if self.index.contains_key(name) {
            return true;
        }
        if self.names.len() >= MAX_SCOPES {
            return false;
        }
        let bit = self.names.len() as u8;
        self.names.push(name.into());
        self.index.insert(name.into(), bit);
        true
    }

    pub fn len(&self) -> usize {
        self.names.len()
    }

    pub fn is_empty(&self) -> bool {
        self.names.is_empty()
    }

    /// The set of the given names; `None` if one of them is not in the universe.
    pub fn set_of<'a>(&self, names: impl IntoIterator<Item = &'a str>) -> Option<ScopeSet> {
        let mut bits = 0u64;
        for name in names {
            bits |= 1u64 << *self.index.get(name)?;
        }
        Some(ScopeSet(bits))
    }

    /// Parses a space-delimited `scope` parameter (RFC 6749 §3.3). `Err` names a scope that is
    /// malformed or unknown to this gateway.
    pub fn parse_strict<'a>(&self, param: &'a str) -> Result<ScopeSet, &'a str> {
        let mut bits = 0u64;
        for name in param.split(' ').filter(|s| !s.is_empty()) {
            match self.index.get(name) {
                Some(bit) => bits |= 1u64 << bit,
                None => return Err(name),
            }
        }
        Ok(ScopeSet(bits))
    }

    /// Parses a token's `scope` claim, ignoring scopes this gateway does not know: they cannot
    /// satisfy any route's requirement.
    pub fn parse_lenient(&self, claim: &str) -> ScopeSet {
        let mut bits = 0u64;
        for name in claim.split(' ') {
            if let Some(bit) = self.index.get(name) {
                bits |= 1u64 << bit;
            }
        }
        ScopeSet(bits)
    }

    /// Space-delimited names of the set, in config order.
    pub fn render(&self, set: ScopeSet) -> String {
        let mut out = String::new();
        for (bit, name) in self.names.iter().enumerate() {
            if set.0 & (1u64 << bit) != 0 {
                if !out.is_empty() {
                    out.push(' ');
                }
                out.push_str(name);
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn universe() -> ScopeUniverse {
        let mut u = ScopeUniverse::default();
        for s in ["orders:read", "orders:write", "reports:read"] {
            assert!(u.add(s));
        }
        u
    }

    #[test]
    fn parse_and_render_round_trip_in_config_order() {
        let u = universe();
        let set = u.parse_strict("reports:read  orders:read").unwrap();
        assert_eq!(u.render(set), "orders:read reports:read");
    }

    #[test]
    fn strict_parse_names_the_unknown_scope_and_lenient_ignores_it() {
        let u = universe();
        assert_eq!(u.parse_strict("orders:read admin"), Err("admin"));
        assert_eq!(u.render(u.parse_lenient("orders:read admin")), "orders:read");
    }

    #[test]
    fn universe_is_bounded() {
        let mut u = ScopeUniverse::default();
        for i in 0..MAX_SCOPES {
            assert!(u.add(&format!("s{i}")));
        }
        assert!(!u.add("one-too-many"));
        assert!(u.add("s0"), "re-adding a known scope is fine");
    }

    #[test]
    fn scope_token_grammar() {
        assert!(is_scope_token("orders:read"));
        assert!(!is_scope_token("a b"));
        assert!(!is_scope_token("quote\"d"));
        assert!(!is_scope_token(""));
    }
}
