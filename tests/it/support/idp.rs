//! A stand-in identity provider: signing keys that mint tokens with the jsonwebtoken crate (an
//! implementation independent of the gateway's), and an in-process JWKS server that can be down,
//! publish new keys, and counts its fetches.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use aws_lc_rs::encoding::AsDer;
use aws_lc_rs::rand::SystemRandom;
use aws_lc_rs::signature::{ECDSA_P256_SHA256_FIXED_SIGNING, EcdsaKeyPair, KeyPair};
use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use http::Response;
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use serde_json::{Value, json};

use super::upstream::{Handler, full, serve};

/// A key of the identity provider: its private half for minting, its JWK for publishing.
pub struct IdpKey {
    pub kid: String,
    pub alg: Algorithm,
    encoding: EncodingKey,
    pub jwk: Value,
}

/// The RSAPrivateKey (PKCS#1) inside an RSA PKCS#8 document, which is what jsonwebtoken's
/// aws-lc backend signs with: a short walk over the DER.
fn pkcs1_of(pkcs8: &[u8]) -> Vec<u8> {
    // Returns (content, rest) of the DER element at the start of `b`.
    fn element(b: &[u8]) -> (&[u8], &[u8]) {
        let (len, header) = match b[1] {
            n if n < 0x80 => (n as usize, 2),
            0x81 => (b[2] as usize, 3),
            0x82 => ((b[2] as usize) << 8 | b[3] as usize, 4),
            other => panic!("DER length form {other:#x}"),
        };
        (&b[header..header + len], &b[header + len..])
    }
    let (info, _) = element(pkcs8); // PrivateKeyInfo SEQUENCE
    let (_, rest) = element(info); // version INTEGER
    let (_, rest) = element(rest); // AlgorithmIdentifier SEQUENCE
    let (key, _) = element(rest); // privateKey OCTET STRING
    key.to_vec()
}

impl IdpKey {
    /// An RS256 key (2048 bits).
    pub fn rsa(kid: &str) -> IdpKey {
        let kp = aws_lc_rs::rsa::KeyPair::generate(aws_lc_rs::rsa::KeySize::Rsa2048).unwrap();
        let pkcs8 = kp.as_der().unwrap();
        let public = kp.public_key();
        let jwk = json!({
            "kty": "RSA", "use": "sig", "alg": "RS256", "kid": kid,
            "n": URL_SAFE_NO_PAD.encode(public.modulus().big_endian_without_leading_zero()),
            "e": URL_SAFE_NO_PAD.encode(public.exponent().big_endian_without_leading_zero()),
        });
        IdpKey {
            kid: kid.into(),
            alg: Algorithm::RS256,
            encoding: EncodingKey::from_rsa_der(&pkcs1_of(pkcs8.as_ref())),
            jwk,
        }
    }

    /// An ES256 key; its JWK names no `alg` (the curve decides).
    pub fn ec(kid: &str) -> IdpKey {
        let pkcs8 = EcdsaKeyPair::generate_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, &SystemRandom::new()).unwrap();
        let kp = EcdsaKeyPair::from_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, pkcs8.as_ref()).unwrap();
        let point = kp.public_key().as_ref();
        let jwk = json!({
            "kty": "EC", "crv": "P-256", "kid": kid,
            "x": URL_SAFE_NO_PAD.encode(&point[1..33]),
            "y": URL_SAFE_NO_PAD.encode(&point[33..65]),
        });
        IdpKey {
            kid: kid.into(),
            alg: Algorithm::ES256,
            encoding: EncodingKey::from_ec_der(pkcs8.as_ref()),
            jwk,
        }
    }

    /// A token with this key's alg, `kid` (default: this key's) and `typ`.
    pub fn mint_with(&self, kid: Option<&str>, typ: Option<&str>, claims: &Value) -> String {
        let mut h = Header::new(self.alg);
        h.kid = Some(kid.unwrap_or(&self.kid).to_owned());
        h.typ = typ.map(str::to_owned);
        jsonwebtoken::encode(&h, claims, &self.encoding).unwrap()
    }

    /// A token as Keycloak sends one: `typ: JWT`, this key's kid.
    pub fn mint(&self, claims: &Value) -> String {
        self.mint_with(None, Some("JWT"), claims)
    }

    /// The key's public JWK as the bytes an attacker would use as an HMAC secret.
    pub fn public_jwk_bytes(&self) -> Vec<u8> {
        self.jwk.to_string().into_bytes()
    }
}

#[derive(Default)]
struct JwksState {
    keys: Vec<Value>,
    up: bool,
}

/// Serves `{"keys": [...]}` at `/certs` with `Cache-Control: max-age=300`, or 503 while down.
pub struct JwksServer {
    pub addr: std::net::SocketAddr,
    state: Arc<Mutex<JwksState>>,
    fetches: Arc<AtomicUsize>,
}

impl JwksServer {
    pub async fn start(up: bool, keys: &[&IdpKey]) -> JwksServer {
        let state = Arc::new(Mutex::new(JwksState {
            keys: keys.iter().map(|k| k.jwk.clone()).collect(),
            up,
        }));
        let fetches = Arc::new(AtomicUsize::new(0));
        let (s, f) = (state.clone(), fetches.clone());
        let handler: Handler = Arc::new(move |_req| {
            let (s, f) = (s.clone(), f.clone());
            Box::pin(async move {
                f.fetch_add(1, Ordering::SeqCst);
                let st = s.lock().unwrap();
                if !st.up {
                    let mut r = Response::new(full("down"));
                    *r.status_mut() = http::StatusCode::SERVICE_UNAVAILABLE;
                    return r;
                }
                let body = json!({ "keys": st.keys }).to_string();
                let mut r = Response::new(full(body));
                r.headers_mut()
                    .insert("cache-control", http::HeaderValue::from_static("public, max-age=300"));
                r.headers_mut()
                    .insert("content-type", http::HeaderValue::from_static("application/json"));
                r
            })
        });
        let addr = serve(handler).await;
        JwksServer { addr, state, fetches }
    }

    pub fn url(&self) -> String {
        format!("http://{}/certs", self.addr)
    }

    pub fn set_up(&self, up: bool) {
        self.state.lock().unwrap().up = up;
    }

    pub fn publish(&self, key: &IdpKey) {
        self.state.lock().unwrap().keys.push(key.jwk.clone());
    }

    /// Requests served so far (answered or refused).
    pub fn fetches(&self) -> usize {
        self.fetches.load(Ordering::SeqCst)
    }
}

/// Waits (hang guard: 10 s) until the gateway's resolver for `issuer` satisfies `cond`, woken by
/// each completed fetch.
pub async fn wait_for_issuer(
    app: &tokengate::service::App,
    issuer: &str,
    cond: impl Fn(&tokengate::keys::IssuerStatus) -> bool,
) -> tokengate::keys::IssuerStatus {
    let snap = app.snapshot();
    let resolver = snap
        .validator
        .resolvers()
        .find(|r| r.settings().issuer == issuer)
        .expect("no such issuer")
        .clone();
    let mut rx = resolver.subscribe();
    tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            let status = resolver.status();
            if cond(&status) {
                return status;
            }
            rx.changed().await.unwrap();
        }
    })
    .await
    .unwrap_or_else(|_| {
        panic!(
            "hang guard: issuer {issuer} never reached the state: {:?}",
            resolver.status()
        )
    })
}
