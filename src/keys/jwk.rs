//! JSON Web Keys (RFC 7517): the public half of our keys as we publish them, their RFC 7638
//! thumbprints (our `kid`s), and the keys of an issuer's JWKS as we accept them.
//!
//! An issuer's key is used only with the algorithms its own JWK allows: its `alg` if it names one,
//! else the family of its `kty`/`crv` (RSA → RS*/PS*, P-256 → ES256, P-384 → ES384, Ed25519 →
//! EdDSA). Symmetric (`oct`) keys, encryption keys and keys of unknown types are skipped, so an RSA
//! public key can never be used as an HMAC secret, whatever a token's header says.

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use jsonwebtoken::DecodingKey;
use serde_json::{Map, Value};

use super::AlgSet;
use crate::config::SigningAlg;
use crate::crypto::sha256;
use crate::ids::b64url as b64;

/// The public parameters of an asymmetric key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PublicKey {
    /// RFC 8037: an Ed25519 key, `x` the 32-byte public key.
    Ed25519 { x: String },
    /// RFC 7518 §6.2: `crv`, then the affine coordinates.
    Ec { crv: &'static str, x: String, y: String },
    /// RFC 7518 §6.3: modulus and exponent, big-endian without leading zeros.
    Rsa { n: String, e: String },
}

impl PublicKey {
    /// RFC 7638 §3.2: the required members, in lexicographic order, no whitespace; SHA-256;
    /// base64url. (jsonwebtoken 10.3's `Jwk::thumbprint` leaves `crv` unquoted for Ed25519 keys,
    /// Keats/jsonwebtoken#484, so it is computed here.)
    pub fn thumbprint(&self) -> String {
        let canonical = match self {
            PublicKey::Ed25519 { x } => format!(r#"{{"crv":"Ed25519","kty":"OKP","x":"{x}"}}"#),
            PublicKey::Ec { crv, x, y } => format!(r#"{{"crv":"{crv}","kty":"EC","x":"{x}","y":"{y}"}}"#),
            PublicKey::Rsa { n, e } => format!(r#"{{"e":"{e}","kty":"RSA","n":"{n}"}}"#),
        };
        b64(&sha256(canonical.as_bytes()))
    }

    /// The JWK as a JWKS publishes it: public members only, with `kid`, `alg` and `use`.
    pub fn to_jwk(&self, kid: &str, alg: SigningAlg) -> Value {
        let mut m = Map::new();
        match self {
            PublicKey::Ed25519 { x } => {
                m.insert("kty".into(), "OKP".into());
                m.insert("crv".into(), "Ed25519".into());
                m.insert("x".into(), x.as_str().into());
            }
            PublicKey::Ec { crv, x, y } => {
                m.insert("kty".into(), "EC".into());
                m.insert("crv".into(), (*crv).into());
                m.insert("x".into(), x.as_str().into());
                m.insert("y".into(), y.as_str().into());
            }
            PublicKey::Rsa { n, e } => {
                m.insert("kty".into(), "RSA".into());
                m.insert("n".into(), n.as_str().into());
                m.insert("e".into(), e.as_str().into());
            }
        }
        m.insert("kid".into(), kid.into());
        m.insert("alg".into(), alg.name().into());
        m.insert("use".into(), "sig".into());
        Value::Object(m)
    }

    /// The verification key the JWT library uses, made from these public members only (so what
    /// verifies our tokens is exactly what the JWKS publishes).
    pub fn decoding_key(&self) -> Result<DecodingKey, String> {
        match self {
            PublicKey::Ed25519 { x } => DecodingKey::from_ed_components(x),
            PublicKey::Ec { x, y, .. } => DecodingKey::from_ec_components(x, y),
            PublicKey::Rsa { n, e } => DecodingKey::from_rsa_components(n, e),
        }
        .map_err(|e| format!("unusable public key: {e}"))
    }

    /// The algorithms a key of this type can verify, when its JWK names none.
    fn family(&self) -> AlgSet {
        use SigningAlg::*;
        match self {
            PublicKey::Ed25519 { .. } => AlgSet::of(&[EdDSA]),
            PublicKey::Ec { crv: "P-256", .. } => AlgSet::of(&[ES256]),
            PublicKey::Ec { .. } => AlgSet::of(&[ES384]),
            PublicKey::Rsa { .. } => AlgSet::of(&[RS256, RS384, RS512, PS256, PS384, PS512]),
        }
    }

    pub fn ed25519(public: &[u8]) -> PublicKey {
        PublicKey::Ed25519 { x: b64(public) }
    }

    /// From an uncompressed SEC1 point (`04 ‖ x ‖ y`).
    pub fn ec(crv: &'static str, point: &[u8]) -> Option<PublicKey> {
        let coords = point.strip_prefix(&[4u8])?;
        if coords.is_empty() || coords.len() % 2 != 0 {
            return None;
        }
        let (x, y) = coords.split_at(coords.len() / 2);
        Some(PublicKey::Ec {
            crv,
            x: b64(x),
            y: b64(y),
        })
    }

    pub fn rsa(n: &[u8], e: &[u8]) -> PublicKey {
        PublicKey::Rsa { n: b64(n), e: b64(e) }
    }
}

/// The RFC 7638 thumbprint of an HMAC secret (`{"k":…,"kty":"oct"}`): the `kid` of a shared-secret
/// key. It reveals no more than a token signed with the secret already does (both are offline
/// checks of a guess), and an HMAC key is never published.
pub fn oct_thumbprint(secret: &[u8]) -> String {
    b64(&sha256(format!(r#"{{"k":"{}","kty":"oct"}}"#, b64(secret)).as_bytes()))
}

/// One key of an issuer's JWKS, ready to verify.
#[derive(Clone)]
pub struct RemoteKey {
    pub kid: Option<Box<str>>,
    /// The algorithms this key may verify (its JWK's `alg`, or its type's family).
    pub algs: AlgSet,
    pub decoding: DecodingKey,
}

impl std::fmt::Debug for RemoteKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RemoteKey")
            .field("kid", &self.kid)
            .field("algs", &self.algs)
            .finish_non_exhaustive()
    }
}

/// Why a JWK of an issuer's set was not taken (debug logs only).
pub type Skipped = &'static str;

fn member<'a>(jwk: &'a Map<String, Value>, name: &str) -> Result<Option<&'a str>, Skipped> {
    match jwk.get(name) {
        None => Ok(None),
        Some(Value::String(s)) => Ok(Some(s.as_str())),
        Some(_) => Err("a member is not a string"),
    }
}

fn required<'a>(jwk: &'a Map<String, Value>, name: &str) -> Result<&'a str, Skipped> {
    member(jwk, name)?.ok_or("a required member is missing")
}

/// Decoded length of a base64url member, checked against what the curve needs.
fn coordinate(s: &str, len: usize) -> Result<(), Skipped> {
    match URL_SAFE_NO_PAD.decode(s) {
        Ok(b) if b.len() == len => Ok(()),
        _ => Err("a coordinate has the wrong length"),
    }
}

/// Reads one member of a JWKS `keys` array; `Err` says why it is not usable for verification.
pub fn remote_key(value: &Value) -> Result<RemoteKey, Skipped> {
    let Value::Object(jwk) = value else {
        return Err("not a JSON object");
    };
    if member(jwk, "use")?.is_some_and(|u| u != "sig") {
        return Err("not a signature key (use)");
    }
    if let Some(ops) = jwk.get("key_ops")
        && !ops
            .as_array()
            .is_some_and(|ops| ops.iter().any(|o| o.as_str() == Some("verify")))
    {
        return Err("not a verification key (key_ops)");
    }
    let public = match required(jwk, "kty")? {
        "OKP" => {
            if required(jwk, "crv")? != "Ed25519" {
                return Err("an OKP curve other than Ed25519");
            }
            let x = required(jwk, "x")?;
            coordinate(x, 32)?;
            PublicKey::Ed25519 { x: x.to_owned() }
        }
        "EC" => {
            let (crv, len) = match required(jwk, "crv")? {
                "P-256" => ("P-256", 32),
                "P-384" => ("P-384", 48),
                _ => return Err("an EC curve other than P-256 or P-384"),
            };
            let (x, y) = (required(jwk, "x")?, required(jwk, "y")?);
            coordinate(x, len)?;
            coordinate(y, len)?;
            PublicKey::Ec {
                crv,
                x: x.to_owned(),
                y: y.to_owned(),
            }
        }
        "RSA" => PublicKey::Rsa {
            n: required(jwk, "n")?.to_owned(),
            e: required(jwk, "e")?.to_owned(),
        },
        // "oct" above all: a symmetric key from a JWKS would let anyone who read it sign.
        _ => return Err("not an RSA, EC or OKP key"),
    };
    let family = public.family();
    let algs = match member(jwk, "alg")? {
        None => family,
        Some(name) => match SigningAlg::parse(name) {
            Some(alg) if family.contains(alg) => AlgSet::of(&[alg]),
            _ => return Err("its alg does not fit its key type"),
        },
    };
    let decoding = public.decoding_key().map_err(|_| "unusable key material")?;
    Ok(RemoteKey {
        kid: member(jwk, "kid")?.map(Into::into),
        algs,
        decoding,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn thumbprints_match_the_rfc_examples() {
        // RFC 7638 §3.1.
        let rsa = PublicKey::Rsa {
            n: "0vx7agoebGcQSuuPiLJXZptN9nndrQmbXEps2aiAFbWhM78LhWx4cbbfAAtVT86zwu1RK7aPFFxuhDR1L6tSoc_BJECPebWKRXjBZCiFV4n3oknjhMstn64tZ_2W-5JsGY4Hc5n9yBXArwl93lqt7_RN5w6Cf0h4QyQ5v-65YGjQR0_FDW2QvzqY368QQMicAtaSqzs8KJZgnYb9c7d0zgdAZHzu6qMQvRL5hajrn1n91CbOpbISD08qNLyrdkt-bFTWhAI4vMQFh6WeZu0fM4lFd2NcRwr3XPksINHaQ-G_xBniIqbw0Ls1jF44-csFCur-kEgU8awapJzKnqDKgw".into(),
            e: "AQAB".into(),
        };
        assert_eq!(rsa.thumbprint(), "NzbLsXh8uDCcd-6MNwXF4W_7noWXFZAfHkxZsRGC9Xs");
        // RFC 8037 Appendix A.3.
        let ed = PublicKey::Ed25519 {
            x: "11qYAYKxCrfVS_7TyWQHOg7hcvPapiMlrwIaaPcHURo".into(),
        };
        assert_eq!(ed.thumbprint(), "kPrK_qmxVWaYVA9wwBF6Iuo3vVzz7TxHCTwXBygrS4k");
    }

    #[test]
    fn ec_thumbprints_agree_with_jsonwebtoken() {
        let x = URL_SAFE_NO_PAD.encode([7u8; 32]);
        let y = URL_SAFE_NO_PAD.encode([9u8; 32]);
        let ours = PublicKey::Ec {
            crv: "P-256",
            x: x.clone(),
            y: y.clone(),
        };
        let jwk: jsonwebtoken::jwk::Jwk =
            serde_json::from_value(json!({"kty": "EC", "crv": "P-256", "x": x, "y": y})).unwrap();
        assert_eq!(
            ours.thumbprint(),
            jwk.thumbprint(jsonwebtoken::jwk::ThumbprintHash::SHA256)
        );
    }

    #[test]
    fn a_jwk_is_used_only_with_the_algorithms_of_its_type() {
        let x = URL_SAFE_NO_PAD.encode([1u8; 32]);
        let y = URL_SAFE_NO_PAD.encode([2u8; 32]);
        let rsa = json!({"kty": "RSA", "kid": "r", "n": "sXch", "e": "AQAB"});
        let k = remote_key(&rsa).unwrap();
        assert!(k.algs.contains(SigningAlg::RS256) && k.algs.contains(SigningAlg::PS256));
        assert!(!k.algs.contains(SigningAlg::HS256) && !k.algs.contains(SigningAlg::ES256));
        assert_eq!(k.kid.as_deref(), Some("r"));
        let pinned = json!({"kty": "RSA", "alg": "RS384", "n": "sXch", "e": "AQAB"});
        assert_eq!(remote_key(&pinned).unwrap().algs, AlgSet::of(&[SigningAlg::RS384]));
        let ec = json!({"kty": "EC", "crv": "P-256", "x": x, "y": y});
        assert_eq!(remote_key(&ec).unwrap().algs, AlgSet::of(&[SigningAlg::ES256]));

        for (bad, why) in [
            (json!({"kty": "oct", "k": "c2VjcmV0"}), "symmetric"),
            (
                json!({"kty": "RSA", "alg": "HS256", "n": "sXch", "e": "AQAB"}),
                "HMAC alg on RSA",
            ),
            (
                json!({"kty": "EC", "alg": "RS256", "crv": "P-256", "x": x, "y": y}),
                "alg of another family",
            ),
            (
                json!({"kty": "RSA", "use": "enc", "n": "sXch", "e": "AQAB"}),
                "encryption key",
            ),
            (
                json!({"kty": "RSA", "key_ops": ["encrypt"], "n": "sXch", "e": "AQAB"}),
                "key_ops",
            ),
            (
                json!({"kty": "EC", "crv": "P-256", "x": "AA", "y": y}),
                "short coordinate",
            ),
            (json!({"kty": "OKP", "crv": "X25519", "x": x}), "key agreement curve"),
            (json!({"kty": "RSA", "n": 5, "e": "AQAB"}), "non-string member"),
            (json!("RSA"), "not an object"),
        ] {
            assert!(remote_key(&bad).is_err(), "{why}");
        }
    }
}
