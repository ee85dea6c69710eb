//! `[tokens] signing` and `[[tokens.previous_keys]]`: which algorithm signs our access tokens, with
//! which key, and which retired keys still verify the tokens they signed.
//!
//! ```text
//!   { alg = "HS256" | "HS384" | "HS512", secret = "env:…" | "file:…" }   an HMAC secret (never published)
//!   { alg = "EdDSA" | "ES256" | "RS256", key = "file:PEM" }              a PKCS#8 private key
//! ```
//!
//! The key material is read and parsed here, once, so that `tokengate check` reports an unreadable
//! or mismatched key under its key path; the JWT library never appears in these types.

use super::{Checker, Secret, file::SigningFile};

/// A JWS algorithm (RFC 7518 §3.1; EdDSA from RFC 8037). Which ones may sign our tokens, and which
/// an external issuer may use, is decided where they are configured.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[allow(clippy::upper_case_acronyms)]
pub enum SigningAlg {
    HS256,
    HS384,
    HS512,
    RS256,
    RS384,
    RS512,
    PS256,
    PS384,
    PS512,
    ES256,
    ES384,
    EdDSA,
}

/// Algorithms our own tokens may be signed with.
pub const OWN_ALGS: [SigningAlg; 6] = [
    SigningAlg::HS256,
    SigningAlg::HS384,
    SigningAlg::HS512,
    SigningAlg::EdDSA,
    SigningAlg::ES256,
    SigningAlg::RS256,
];

impl SigningAlg {
    pub const ALL: [SigningAlg; 12] = [
        SigningAlg::HS256,
        SigningAlg::HS384,
        SigningAlg::HS512,
        SigningAlg::RS256,
        SigningAlg::RS384,
        SigningAlg::RS512,
        SigningAlg::PS256,
        SigningAlg::PS384,
        SigningAlg::PS512,
        SigningAlg::ES256,
        SigningAlg::ES384,
        SigningAlg::EdDSA,
    ];

    /// The `alg` header value.
    pub fn name(self) -> &'static str {
        match self {
            SigningAlg::HS256 => "HS256",
            SigningAlg::HS384 => "HS384",
            SigningAlg::HS512 => "HS512",
            SigningAlg::RS256 => "RS256",
            SigningAlg::RS384 => "RS384",
            SigningAlg::RS512 => "RS512",
            SigningAlg::PS256 => "PS256",
            SigningAlg::PS384 => "PS384",
            SigningAlg::PS512 => "PS512",
            SigningAlg::ES256 => "ES256",
            SigningAlg::ES384 => "ES384",
            SigningAlg::EdDSA => "EdDSA",
        }
    }

    pub fn parse(s: &str) -> Option<SigningAlg> {
        SigningAlg::ALL.into_iter().find(|a| a.name() == s)
    }

    /// A shared-secret algorithm: never accepted from an external issuer, never published.
    pub fn is_hmac(self) -> bool {
        matches!(self, SigningAlg::HS256 | SigningAlg::HS384 | SigningAlg::HS512)
    }

    /// RFC 7518 §3.2: an HMAC key must be at least as long as the hash output.
    pub(super) fn min_secret_len(self) -> usize {
        match self {
            SigningAlg::HS384 => 48,
            SigningAlg::HS512 => 64,
            _ => 32,
        }
    }
}

impl std::fmt::Display for SigningAlg {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// One key of ours: the active signing key or a previous one.
#[derive(Debug, Clone)]
pub struct KeySettings {
    pub alg: SigningAlg,
    /// The HMAC secret for HS*, else the PKCS#8 DER of the private key.
    pub material: Secret,
}

fn names(algs: &[SigningAlg]) -> String {
    let names: Vec<&str> = algs.iter().map(|a| a.name()).collect();
    names.join(", ")
}

/// Validates one `{ alg, secret | key }` table found at `key`.
pub(super) fn key_settings(c: &mut Checker<'_>, key: &str, f: &SigningFile) -> Option<KeySettings> {
    let alg = match (f.alg.as_deref(), &f.secret, &f.key) {
        (Some(name), _, _) => match SigningAlg::parse(name).filter(|a| OWN_ALGS.contains(a)) {
            Some(a) => a,
            None => {
                c.fail(
                    format!("{key}.alg"),
                    format!("{name:?} is not supported (one of {})", names(&OWN_ALGS)),
                );
                return None;
            }
        },
        (None, _, None) => SigningAlg::HS256,
        (None, _, Some(_)) => {
            c.fail(
                format!("{key}.alg"),
                "is required with `key` (EdDSA, ES256 or RS256): the algorithm is pinned, never guessed",
            );
            return None;
        }
    };
    match (&f.secret, &f.key) {
        (Some(_), Some(_)) => {
            c.fail(
                key,
                "set `secret` (HS256/384/512) or `key` (EdDSA, ES256, RS256), not both",
            );
            None
        }
        (None, None) => {
            c.fail(
                key,
                "needs `secret` (HS256/384/512) or `key` (a PKCS#8 PEM private key for EdDSA, ES256, RS256)",
            );
            None
        }
        (Some(_), None) if !alg.is_hmac() => {
            c.fail(
                format!("{key}.secret"),
                format!("{alg} signs with a private key: write key = \"file:PEM\" instead"),
            );
            None
        }
        (None, Some(_)) if alg.is_hmac() => {
            c.fail(
                format!("{key}.key"),
                format!("{alg} signs with a shared secret: write secret = \"env:…\" or \"file:…\" instead"),
            );
            None
        }
        (Some(secret), None) => {
            let secret = c.secret(&format!("{key}.secret"), secret)?;
            if secret.len() < alg.min_secret_len() {
                c.fail(
                    format!("{key}.secret"),
                    format!(
                        "is {} bytes; {alg} needs at least {} (RFC 7518 §3.2)",
                        secret.len(),
                        alg.min_secret_len()
                    ),
                );
                return None;
            }
            Some(KeySettings { alg, material: secret })
        }
        (None, Some(pem)) => {
            let pem = c.secret(&format!("{key}.key"), pem)?;
            match crate::keys::pkcs8_from_pem(alg, pem.expose()) {
                Ok(der) => Some(KeySettings {
                    alg,
                    material: Secret::new(der),
                }),
                Err(reason) => {
                    c.fail(format!("{key}.key"), reason);
                    None
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use crate::config::{Config, SigningAlg};

    /// A config in a fresh folder holding `secret` (32 bytes) and `ed.pem` (an Ed25519 key).
    fn load_as(issuer: &str, tokens: &str) -> Result<Config, Vec<String>> {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("secret"), "0123456789abcdef0123456789abcdef").unwrap();
        std::fs::write(
            dir.path().join("ed.pem"),
            crate::keys::generate_pem(SigningAlg::EdDSA).unwrap(),
        )
        .unwrap();
        let text = format!(
            "[server]\nlisten = \"127.0.0.1:0\"\n[tokens]\nissuer = \"{issuer}\"\naudience = \"api\"\n{tokens}\n"
        );
        Config::from_toml(&text, dir.path(), "t.toml").map_err(|e| e.problems.iter().map(|p| p.to_string()).collect())
    }

    fn load(tokens: &str) -> Result<Config, Vec<String>> {
        load_as("https://gw.test", tokens)
    }

    fn fails_with(tokens: &str, expected: &str) {
        let p = load(tokens).expect_err("accepted");
        assert!(p.iter().any(|m| m.starts_with(expected)), "{expected:?} not in {p:?}");
    }

    #[test]
    fn keys_and_secrets_go_with_their_algorithms() {
        let c = load(
            "signing = { alg = \"EdDSA\", key = \"file:ed.pem\" }\nprevious_keys = [{ secret = \"file:secret\" }]",
        )
        .unwrap();
        assert_eq!(c.tokens.signing.alg, SigningAlg::EdDSA);
        assert_eq!(c.tokens.previous_keys[0].alg, SigningAlg::HS256);

        fails_with(
            "signing = { key = \"file:ed.pem\" }",
            "tokens.signing.alg: is required with `key`",
        );
        fails_with(
            "signing = { alg = \"EdDSA\", secret = \"file:secret\" }",
            "tokens.signing.secret: EdDSA signs with a private key",
        );
        fails_with(
            "signing = { alg = \"HS256\", key = \"file:ed.pem\" }",
            "tokens.signing.key: HS256 signs with a shared secret",
        );
        fails_with(
            "signing = { alg = \"ES256\", key = \"file:ed.pem\" }",
            "tokens.signing.key: is not a usable ES256 private key",
        );
        fails_with(
            "signing = { alg = \"PS256\", key = \"file:ed.pem\" }",
            "tokens.signing.alg: \"PS256\" is not supported",
        );
        fails_with(
            "signing = { alg = \"EdDSA\", key = \"file:ed.pem\", secret = \"file:secret\" }",
            "tokens.signing: set `secret`",
        );
        fails_with("signing = { alg = \"EdDSA\" }", "tokens.signing: needs `secret`");
        fails_with(
            "signing = { alg = \"EdDSA\", key = \"file:missing.pem\" }",
            "tokens.signing.key: cannot read",
        );
        fails_with(
            "signing = { alg = \"EdDSA\", key = \"file:secret\" }",
            "tokens.signing.key: holds no PEM private key",
        );
        fails_with(
            "signing = { alg = \"EdDSA\", key = \"file:ed.pem\" }\n\
             previous_keys = [{ secret = \"file:secret\" }, { alg = \"EdDSA\", key = \"file:ed.pem\" }]",
            "tokens.previous_keys[1]: is the same key as tokens.signing",
        );
    }

    #[test]
    fn the_issuer_is_the_public_base_url() {
        let secret = "signing = { secret = \"file:secret\" }";
        assert!(load_as("https://auth.example.com/base", secret).is_ok());
        for bad in ["auth.example.com", "ftp://x", "https://x/?q=1", "https://x/#f", ""] {
            let p = load_as(bad, secret).expect_err(bad);
            assert!(p.iter().any(|m| m.starts_with("tokens.issuer:")), "{bad}: {p:?}");
        }
    }
}
