//! Our own keys: the one that signs, the previous ones that still verify, and the JWKS that
//! publishes the public half of the asymmetric ones.
//!
//! Signing uses aws-lc-rs key pairs parsed once, with the JWS header (`alg`, `kid`, `typ`)
//! encoded once per key: `jsonwebtoken::encode` would parse the PKCS#8 document again for every
//! token (for RSA that includes the key check, far more than the signature itself). Verification
//! goes through the JWT library with a key built from the published JWK, so what verifies our
//! tokens is exactly what a relying party reads from the JWKS.

use std::collections::HashMap;

use aws_lc_rs::hmac;
use aws_lc_rs::rand::SystemRandom;
use aws_lc_rs::rsa::KeyPair as RsaKeyPair;
use aws_lc_rs::signature::{ECDSA_P256_SHA256_FIXED_SIGNING, EcdsaKeyPair, Ed25519KeyPair, KeyPair, RSA_PKCS1_SHA256};
use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use bytes::Bytes;
use jsonwebtoken::DecodingKey;
use rustls_pki_types::PrivateKeyDer;
use rustls_pki_types::pem::PemObject;

use super::jwk::{PublicKey, oct_thumbprint};
use crate::config::{KeySettings, SigningAlg, TokenSettings};

/// The private half, parsed once.
enum Signer {
    Hmac(Box<hmac::Key>),
    Ed25519(Ed25519KeyPair),
    Es256(EcdsaKeyPair),
    Rs256(RsaKeyPair),
}

#[derive(Debug, Clone, Copy, thiserror::Error)]
#[error("signing failed")]
pub struct SignError;

impl Signer {
    /// Parses key material for `alg`; for an asymmetric algorithm, also its public half.
    fn new(alg: SigningAlg, material: &[u8]) -> Result<(Signer, Option<PublicKey>), String> {
        let wrong = |e: aws_lc_rs::error::KeyRejected| format!("is not a usable {alg} private key ({e})");
        Ok(match alg {
            SigningAlg::HS256 => (
                Signer::Hmac(Box::new(hmac::Key::new(hmac::HMAC_SHA256, material))),
                None,
            ),
            SigningAlg::HS384 => (
                Signer::Hmac(Box::new(hmac::Key::new(hmac::HMAC_SHA384, material))),
                None,
            ),
            SigningAlg::HS512 => (
                Signer::Hmac(Box::new(hmac::Key::new(hmac::HMAC_SHA512, material))),
                None,
            ),
            SigningAlg::EdDSA => {
                let kp = Ed25519KeyPair::from_pkcs8(material).map_err(wrong)?;
                let public = PublicKey::ed25519(kp.public_key().as_ref());
                (Signer::Ed25519(kp), Some(public))
            }
            SigningAlg::ES256 => {
                let kp = EcdsaKeyPair::from_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, material).map_err(wrong)?;
                let public = PublicKey::ec("P-256", kp.public_key().as_ref())
                    .ok_or_else(|| format!("is not a usable {alg} private key (its public point)"))?;
                (Signer::Es256(kp), Some(public))
            }
            SigningAlg::RS256 => {
                let kp = RsaKeyPair::from_pkcs8(material).map_err(wrong)?;
                let pk = kp.public_key();
                let public = PublicKey::rsa(
                    pk.modulus().big_endian_without_leading_zero(),
                    pk.exponent().big_endian_without_leading_zero(),
                );
                (Signer::Rs256(kp), Some(public))
            }
            other => return Err(format!("{other} cannot sign the gateway's tokens")),
        })
    }

    fn sign(&self, message: &[u8]) -> Result<Vec<u8>, SignError> {
        match self {
            Signer::Hmac(k) => Ok(hmac::sign(k, message).as_ref().to_vec()),
            // try_sign: `sign` panics on a failure inside aws-lc; a request must get a 500 instead.
            Signer::Ed25519(kp) => kp.try_sign(message).map(|s| s.as_ref().to_vec()).map_err(|_| SignError),
            Signer::Es256(kp) => kp
                .sign(&SystemRandom::new(), message)
                .map(|s| s.as_ref().to_vec())
                .map_err(|_| SignError),
            Signer::Rs256(kp) => {
                let mut sig = vec![0u8; kp.public_modulus_len()];
                kp.sign(&RSA_PKCS1_SHA256, &SystemRandom::new(), message, &mut sig)
                    .map_err(|_| SignError)?;
                Ok(sig)
            }
        }
    }
}

/// A new private key for `alg` (EdDSA, ES256 or RS256 with 2048 bits), as PKCS#8 PEM: for
/// `gen-certs`, tests and benches.
pub fn generate_pem(alg: SigningAlg) -> Result<String, String> {
    use aws_lc_rs::encoding::AsDer;
    let rng = SystemRandom::new();
    let failed = |_| format!("cannot generate an {alg} key");
    let der: Vec<u8> = match alg {
        SigningAlg::EdDSA => Ed25519KeyPair::generate_pkcs8(&rng).map_err(failed)?.as_ref().to_vec(),
        SigningAlg::ES256 => EcdsaKeyPair::generate_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, &rng)
            .map_err(failed)?
            .as_ref()
            .to_vec(),
        SigningAlg::RS256 => RsaKeyPair::generate(aws_lc_rs::rsa::KeySize::Rsa2048)
            .and_then(|k| k.as_der())
            .map_err(failed)?
            .as_ref()
            .to_vec(),
        other => return Err(format!("{other} has no private key to generate")),
    };
    let b64 = base64::engine::general_purpose::STANDARD.encode(der);
    let mut pem = String::from("-----BEGIN PRIVATE KEY-----\n");
    for line in b64.as_bytes().chunks(64) {
        pem.push_str(&String::from_utf8_lossy(line));
        pem.push('\n');
    }
    pem.push_str("-----END PRIVATE KEY-----\n");
    Ok(pem)
}

/// A PEM private key as the PKCS#8 DER document `alg` needs; `Err` says why in words.
pub fn pkcs8_from_pem(alg: SigningAlg, pem: &[u8]) -> Result<Vec<u8>, String> {
    let der = match PrivateKeyDer::from_pem_slice(pem) {
        Ok(PrivateKeyDer::Pkcs8(k)) => k.secret_pkcs8_der().to_vec(),
        Ok(PrivateKeyDer::Pkcs1(_)) => {
            return Err("is a PKCS#1 RSA key (BEGIN RSA PRIVATE KEY); convert it to PKCS#8: \
                        openssl pkcs8 -topk8 -nocrypt -in OLD -out NEW"
                .into());
        }
        Ok(PrivateKeyDer::Sec1(_)) => {
            return Err("is a SEC1 EC key (BEGIN EC PRIVATE KEY); convert it to PKCS#8: \
                        openssl pkcs8 -topk8 -nocrypt -in OLD -out NEW"
                .into());
        }
        Ok(_) => return Err("holds an unsupported private key format (use PKCS#8: BEGIN PRIVATE KEY)".into()),
        Err(e) => return Err(format!("holds no PEM private key ({e})")),
    };
    Signer::new(alg, &der)?;
    Ok(der)
}

/// One of our keys.
pub struct OwnKey {
    /// The RFC 7638 thumbprint of the key: every token it signs names it.
    pub kid: Box<str>,
    pub alg: SigningAlg,
    signer: Signer,
    /// The library's verification key, from the public JWK (HMAC: the secret).
    pub(super) decoding: DecodingKey,
    /// `None` for an HMAC key, which is never published.
    public: Option<PublicKey>,
    /// base64url of `{"alg":…,"kid":…,"typ":"at+jwt"}`.
    header_b64: String,
}

impl OwnKey {
    pub fn new(settings: &KeySettings) -> Result<OwnKey, String> {
        let alg = settings.alg;
        let material = settings.material.expose();
        let (signer, public) = Signer::new(alg, material)?;
        let (kid, decoding) = match &public {
            Some(p) => (p.thumbprint(), p.decoding_key()?),
            None => (oct_thumbprint(material), DecodingKey::from_secret(material)),
        };
        let header = serde_json::json!({"alg": alg.name(), "kid": kid, "typ": "at+jwt"});
        let header_b64 = URL_SAFE_NO_PAD.encode(header.to_string());
        Ok(OwnKey {
            kid: kid.into(),
            alg,
            signer,
            decoding,
            public,
            header_b64,
        })
    }

    /// A compact JWS of `claims` (a JSON object), signed by this key.
    pub fn sign_jwt(&self, claims: &[u8]) -> Result<String, SignError> {
        let mut jwt = Vec::with_capacity(self.header_b64.len() + claims.len() * 4 / 3 + 360);
        jwt.extend_from_slice(self.header_b64.as_bytes());
        jwt.push(b'.');
        crate::ids::extend_b64url(&mut jwt, claims);
        let signature = self.signer.sign(&jwt)?;
        jwt.push(b'.');
        crate::ids::extend_b64url(&mut jwt, &signature);
        // ASCII throughout (a base64url header, claims and signature): never an error.
        String::from_utf8(jwt).map_err(|_| SignError)
    }

    /// Whether `signature` (base64url) signs `message` under this key, with its own algorithm.
    pub fn verifies(&self, message: &[u8], signature: &str) -> bool {
        super::verify_signature(&self.decoding, self.alg, message, signature)
    }

    pub fn is_published(&self) -> bool {
        self.public.is_some()
    }
}

/// The keys of one Snapshot: the active signing key first, then the previous ones.
pub struct KeySet {
    keys: Vec<OwnKey>,
    by_kid: HashMap<Box<str>, usize>,
    /// Per key: until when (ms) this process knows it may have signed tokens; `None` for the
    /// active key (it signs now).
    signed_until_ms: Vec<Option<u64>>,
    jwks: Bytes,
}

impl KeySet {
    /// Builds the set from the config. With `previous` (a reload), a key that was active there and
    /// is a previous key here stopped signing `now_ms`; one that was previous keeps its time. A
    /// previous key this process never saw sign (at start, or newly listed) may have signed until
    /// now, as far as anyone here knows.
    pub fn new(tokens: &TokenSettings, previous: Option<&KeySet>, now_ms: u64) -> Result<KeySet, String> {
        let mut keys = vec![OwnKey::new(&tokens.signing).map_err(|e| format!("tokens.signing: {e}"))?];
        for (i, k) in tokens.previous_keys.iter().enumerate() {
            keys.push(OwnKey::new(k).map_err(|e| format!("tokens.previous_keys[{i}]: {e}"))?);
        }
        let mut by_kid = HashMap::new();
        for (i, k) in keys.iter().enumerate() {
            if by_kid.insert(k.kid.clone(), i).is_some() {
                return Err(format!("key {} is configured twice", k.kid));
            }
        }
        let signed_until_ms = keys
            .iter()
            .enumerate()
            .map(|(i, k)| {
                if i == 0 {
                    return None;
                }
                let known = previous.and_then(|p| p.by_kid.get(&k.kid).map(|&j| p.signed_until_ms[j]));
                Some(match known {
                    Some(Some(t)) => t,
                    Some(None) | None => now_ms,
                })
            })
            .collect();
        let published: Vec<serde_json::Value> = keys
            .iter()
            .filter_map(|k| k.public.as_ref().map(|p| p.to_jwk(&k.kid, k.alg)))
            .collect();
        let mut jwks = serde_json::to_vec(&serde_json::json!({ "keys": published }))
            .map_err(|e| format!("cannot render the JWKS: {e}"))?;
        jwks.push(b'\n');
        Ok(KeySet {
            keys,
            by_kid,
            signed_until_ms,
            jwks: Bytes::from(jwks),
        })
    }

    /// The key that signs new tokens.
    pub fn active(&self) -> &OwnKey {
        &self.keys[0]
    }

    pub fn get(&self, kid: &str) -> Option<&OwnKey> {
        self.by_kid.get(kid).map(|&i| &self.keys[i])
    }

    /// Keys a token without `kid` may have been signed by (tokens minted before keys had ids, or
    /// by a tool that shares an HMAC secret): those of the header's algorithm, the active first.
    pub fn without_kid(&self, alg: SigningAlg) -> impl Iterator<Item = &OwnKey> {
        self.keys.iter().filter(move |k| k.alg == alg)
    }

    pub fn iter(&self) -> impl Iterator<Item = &OwnKey> {
        self.keys.iter()
    }

    /// The JWKS document (RFC 7517 §5): public keys only, newline-terminated.
    pub fn jwks(&self) -> &Bytes {
        &self.jwks
    }

    /// Keys of `old` missing from `self` that may have signed tokens still inside their lifetime
    /// (`live_ms`: access_ttl + leeway): removing them refuses those tokens at once.
    pub fn cut_from<'a>(&self, old: &'a KeySet, now_ms: u64, live_ms: u64) -> Vec<(&'a str, SigningAlg)> {
        old.keys
            .iter()
            .zip(&old.signed_until_ms)
            .filter(|(k, _)| !self.by_kid.contains_key(&k.kid))
            .filter(|(_, until)| until.is_none_or(|t| now_ms < t.saturating_add(live_ms)))
            .map(|(k, _)| (&*k.kid, k.alg))
            .collect()
    }
}

/// The kids of the active and previous keys must differ (the same key listed twice is a mistake
/// that would hide which entry verifies).
/// `Err` names the index of the first repeated previous key.
pub fn check_distinct(active: &KeySettings, previous: &[KeySettings]) -> Result<(), (usize, String)> {
    let mut seen: Vec<Box<str>> = OwnKey::new(active).map(|k| vec![k.kid]).unwrap_or_default();
    for (i, k) in previous.iter().enumerate() {
        let Ok(key) = OwnKey::new(k) else { continue };
        if seen.contains(&key.kid) {
            return Err((i, "is the same key as tokens.signing or an earlier previous key".into()));
        }
        seen.push(key.kid);
    }
    Ok(())
}
