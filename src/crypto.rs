//! Small cryptographic utilities shared by the authorization server, the stores and the CLI:
//! randomness from the OS, SHA-256 digests of secrets, and the sealing of a rotation's response
//! for the reuse grace.

use aws_lc_rs::aead::{AES_256_GCM, Aad, LessSafeKey, Nonce, UnboundKey};
use aws_lc_rs::digest;

/// A SHA-256 digest (of a refresh token, a client secret).
pub type Digest = [u8; 32];

/// The OS random generator failed (nothing sensible can be minted without it).
#[derive(Debug, Clone, Copy, thiserror::Error)]
#[error("the operating system's random generator failed")]
pub struct RandomError;

/// Fills an array from the operating system's generator. Not pooled: a per-thread pool of drawn
/// bytes was measured at 1 % of a refresh, but it would keep the next tokens' randomness in memory
/// and bypass aws-lc's per-call RDRAND mixing and fork detection.
pub fn random_bytes<const N: usize>() -> Result<[u8; N], RandomError> {
    let mut buf = [0u8; N];
    aws_lc_rs::rand::fill(&mut buf).map_err(|_| RandomError)?;
    Ok(buf)
}

/// Whether two digests are equal, in time that does not depend on where they differ: the words'
/// differences are folded together and the result compared once (subtle's byte-wise comparison
/// hides each of the 32 bytes from the optimizer separately, a visible share of a refresh).
pub fn digest_eq(a: &Digest, b: &Digest) -> bool {
    use subtle::ConstantTimeEq;
    let mut diff = 0u64;
    for (x, y) in a.chunks_exact(8).zip(b.chunks_exact(8)) {
        let word = |c: &[u8]| u64::from_le_bytes(c.try_into().unwrap_or_default());
        diff |= word(x) ^ word(y);
    }
    diff.ct_eq(&0).into()
}

pub fn sha256(bytes: &[u8]) -> Digest {
    let d = digest::digest(&digest::SHA256, bytes);
    let mut out = [0u8; 32];
    out.copy_from_slice(d.as_ref());
    out
}

/// AES-256-GCM ciphertext and tag of a token response, kept for the reuse grace so that a retry
/// gets the byte-identical response. The key is derived from the refresh token the response
/// answered, so the copy is useless to anyone without that token (a heap dump, a reader of the
/// state folder, an operator of the Redis store).
#[derive(Clone, PartialEq, Eq)]
pub struct Sealed(pub Vec<u8>);

impl std::fmt::Debug for Sealed {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Sealed(<{} bytes>)", self.0.len())
    }
}

fn sealing_key(token: &str) -> Option<LessSafeKey> {
    const DOMAIN: &[u8] = b"tokengate/replay-seal/v1\0";
    // SHA-256(DOMAIN ‖ token). A refresh token fits the stack buffer, hashed in one call: a
    // streaming digest context costs an allocation and ~1.5k instructions more per rotation.
    let mut buf = [0u8; 128];
    let key = if let Some(joined) = buf.get_mut(..DOMAIN.len() + token.len()) {
        joined[..DOMAIN.len()].copy_from_slice(DOMAIN);
        joined[DOMAIN.len()..].copy_from_slice(token.as_bytes());
        let key = sha256(joined);
        // Presented refresh tokens are zeroed once used (README, "Secrets in memory").
        zeroize::Zeroize::zeroize(&mut buf);
        key
    } else {
        let mut ctx = digest::Context::new(&digest::SHA256);
        ctx.update(DOMAIN);
        ctx.update(token.as_bytes());
        let mut out = [0u8; 32];
        out.copy_from_slice(ctx.finish().as_ref());
        out
    };
    UnboundKey::new(&AES_256_GCM, &key).ok().map(LessSafeKey::new)
}

/// Seals `body` under a key derived from `token`. Each key seals exactly one message (it comes from
/// a single-use token), so a fixed nonce is safe.
pub fn seal(token: &str, body: &[u8]) -> Option<Sealed> {
    let key = sealing_key(token)?;
    // Room for the tag: growing the Vec for it reallocated and copied the whole body.
    let mut buf = Vec::with_capacity(body.len() + AES_256_GCM.tag_len());
    buf.extend_from_slice(body);
    key.seal_in_place_append_tag(Nonce::assume_unique_for_key([0; 12]), Aad::empty(), &mut buf)
        .ok()?;
    Some(Sealed(buf))
}

/// Opens a copy sealed by [`seal`]; `None` unless `token` is the one it was sealed with.
pub fn open(token: &str, sealed: &Sealed) -> Option<Vec<u8>> {
    let key = sealing_key(token)?;
    let mut buf = sealed.0.clone();
    let len = key
        .open_in_place(Nonce::assume_unique_for_key([0; 12]), Aad::empty(), &mut buf)
        .ok()?
        .len();
    buf.truncate(len);
    Some(buf)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn digests_are_equal_only_when_every_byte_is() {
        let a = sha256(b"token");
        assert!(digest_eq(&a, &a.clone()));
        for i in 0..32 {
            for bit in [0x01, 0x80] {
                let mut b = a;
                b[i] ^= bit;
                assert!(!digest_eq(&a, &b), "byte {i} differs");
            }
        }
    }

    #[test]
    fn sealed_copies_open_only_with_the_token_they_were_sealed_with() {
        let sealed = seal("token-a", b"body").unwrap();
        assert!(!sealed.0.windows(4).any(|w| w == b"body"));
        assert_eq!(open("token-a", &sealed).as_deref(), Some(&b"body"[..]));
        assert_eq!(open("token-b", &sealed), None);
        // Tokens longer than the one-call buffer take the streaming path to the same key.
        let long = "t".repeat(200);
        let sealed = seal(&long, b"body").unwrap();
        assert_eq!(open(&long, &sealed).as_deref(), Some(&b"body"[..]));
        assert_eq!(open(&long[..199], &sealed), None);
    }

    /// The key is SHA-256 of the domain and the token, however it is computed: copies sealed by
    /// an earlier version (still in a store within the grace after an upgrade) must open.
    #[test]
    fn sealing_keys_are_the_documented_derivation() {
        for token in [
            "AAAAAAAAAAE-abc_defghijklmnopqrstuvwxyz01234".to_string(),
            "t".repeat(200),
        ] {
            let mut ctx = digest::Context::new(&digest::SHA256);
            ctx.update(b"tokengate/replay-seal/v1\0");
            ctx.update(token.as_bytes());
            let key = LessSafeKey::new(UnboundKey::new(&AES_256_GCM, ctx.finish().as_ref()).unwrap());
            let mut sealed = b"body".to_vec();
            key.seal_in_place_append_tag(Nonce::assume_unique_for_key([0; 12]), Aad::empty(), &mut sealed)
                .unwrap();
            assert_eq!(open(&token, &Sealed(sealed)).as_deref(), Some(&b"body"[..]));
        }
    }
}
