//! Keys: ours, which sign and verify our access tokens, and other issuers', fetched from their
//! JWKS.
//!
//! ```text
//!   Config ─▶ KeySet (own.rs) ──▶ Issuer (signs with the active key, kid = RFC 7638 thumbprint)
//!               │            └──▶ Validator (our tokens: key by kid, alg pinned per key)
//!               └──▶ /.well-known/jwks.json (public keys only; an HMAC key is never published)
//!
//!   [[issuers]] ─▶ Resolver (resolver.rs) ──fetch.rs (hyper + rustls)──▶ the issuer's jwks_uri
//!                    keys by kid, refreshed in the background, refetched once on an unknown kid
//! ```
//!
//! A KeySet belongs to one Snapshot, so a reload swaps keys in one step; a Resolver outlives
//! Snapshots whose issuer settings did not change, so a reload does not refetch. Neither knows of
//! requests or sockets beyond the fetch itself.

pub mod fetch;
pub mod jwk;
pub mod own;
pub mod resolver;

use jsonwebtoken::DecodingKey;

use crate::config::SigningAlg;

pub use own::{KeySet, OwnKey, SignError, check_distinct, generate_pem, pkcs8_from_pem};
pub use resolver::{IssuerStatus, Lookup, Resolver};

/// A set of algorithms, one bit each.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct AlgSet(u16);

impl AlgSet {
    fn bit(alg: SigningAlg) -> u16 {
        let i = SigningAlg::ALL.iter().position(|a| *a == alg).unwrap_or(0);
        1 << i
    }

    pub fn of(algs: &[SigningAlg]) -> AlgSet {
        AlgSet(algs.iter().fold(0, |acc, a| acc | AlgSet::bit(*a)))
    }

    pub fn contains(self, alg: SigningAlg) -> bool {
        self.0 & AlgSet::bit(alg) != 0
    }
}

fn jwt_alg(alg: SigningAlg) -> jsonwebtoken::Algorithm {
    use jsonwebtoken::Algorithm as A;
    match alg {
        SigningAlg::HS256 => A::HS256,
        SigningAlg::HS384 => A::HS384,
        SigningAlg::HS512 => A::HS512,
        SigningAlg::RS256 => A::RS256,
        SigningAlg::RS384 => A::RS384,
        SigningAlg::RS512 => A::RS512,
        SigningAlg::PS256 => A::PS256,
        SigningAlg::PS384 => A::PS384,
        SigningAlg::PS512 => A::PS512,
        SigningAlg::ES256 => A::ES256,
        SigningAlg::ES384 => A::ES384,
        SigningAlg::EdDSA => A::EdDSA,
    }
}

/// Checks a JWS signature (base64url `signature` over `message`) with `key` for `alg`. The
/// caller has already pinned `alg` to the key; the library also refuses a key of another family.
pub fn verify_signature(key: &DecodingKey, alg: SigningAlg, message: &[u8], signature: &str) -> bool {
    jsonwebtoken::crypto::verify(signature, message, key, jwt_alg(alg)).unwrap_or(false)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{KeySettings, Secret};

    fn ed25519_pkcs8() -> Vec<u8> {
        aws_lc_rs::signature::Ed25519KeyPair::generate_pkcs8(&aws_lc_rs::rand::SystemRandom::new())
            .unwrap()
            .as_ref()
            .to_vec()
    }

    #[test]
    fn an_rsa_public_key_never_verifies_an_hmac_signature() {
        // The classic confusion: an HS256 token whose "secret" is the issuer's public key.
        let n = base64::Engine::encode(&base64::engine::general_purpose::URL_SAFE_NO_PAD, [0xc5u8; 256]);
        let key = DecodingKey::from_rsa_components(&n, "AQAB").unwrap();
        let message = b"eyJhbGciOiJIUzI1NiJ9.e30";
        let mac = aws_lc_rs::hmac::sign(
            &aws_lc_rs::hmac::Key::new(aws_lc_rs::hmac::HMAC_SHA256, n.as_bytes()),
            message,
        );
        let sig = base64::Engine::encode(&base64::engine::general_purpose::URL_SAFE_NO_PAD, mac.as_ref());
        assert!(!verify_signature(&key, SigningAlg::HS256, message, &sig));
    }

    #[test]
    fn private_keys_must_be_pkcs8_of_the_configured_algorithm() {
        for alg in [SigningAlg::EdDSA, SigningAlg::ES256, SigningAlg::RS256] {
            let pem = generate_pem(alg).unwrap();
            let der = pkcs8_from_pem(alg, pem.as_bytes()).unwrap();
            let key = OwnKey::new(&KeySettings {
                alg,
                material: Secret::new(der),
            })
            .unwrap();
            let jwt = key.sign_jwt(b"{}").unwrap();
            let (message, sig) = jwt.rsplit_once('.').unwrap();
            assert!(key.verifies(message.as_bytes(), sig), "{alg}");
        }
        let ed = generate_pem(SigningAlg::EdDSA).unwrap();
        let e = pkcs8_from_pem(SigningAlg::ES256, ed.as_bytes()).unwrap_err();
        assert!(e.starts_with("is not a usable ES256 private key"), "{e}");
        let sec1 = "-----BEGIN EC PRIVATE KEY-----\nMAA=\n-----END EC PRIVATE KEY-----\n";
        let e = pkcs8_from_pem(SigningAlg::ES256, sec1.as_bytes()).unwrap_err();
        assert!(e.contains("openssl pkcs8 -topk8"), "{e}");
        assert!(pkcs8_from_pem(SigningAlg::EdDSA, b"not pem").is_err());
    }

    #[test]
    fn own_keys_sign_what_their_public_jwk_verifies() {
        let settings = KeySettings {
            alg: SigningAlg::EdDSA,
            material: Secret::new(ed25519_pkcs8()),
        };
        let key = OwnKey::new(&settings).unwrap();
        let jwt = key.sign_jwt(br#"{"sub":"a"}"#).unwrap();
        let (message, sig) = jwt.rsplit_once('.').unwrap();
        assert!(verify_signature(
            &key.decoding,
            SigningAlg::EdDSA,
            message.as_bytes(),
            sig
        ));
        assert!(!verify_signature(&key.decoding, SigningAlg::EdDSA, b"other", sig));
        let header: serde_json::Value = serde_json::from_slice(
            &base64::Engine::decode(
                &base64::engine::general_purpose::URL_SAFE_NO_PAD,
                jwt.split('.').next().unwrap(),
            )
            .unwrap(),
        )
        .unwrap();
        assert_eq!(header["kid"], &*key.kid);
        assert_eq!(header["alg"], "EdDSA");
        assert_eq!(header["typ"], "at+jwt");
    }
}
