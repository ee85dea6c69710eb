//! `tokengate gen-certs`: a development CA, a localhost certificate signed by it, an Ed25519 JWT
//! signing key and an HMAC secret. For development and tests only: the CA's key sits next to it.

use std::fs::OpenOptions;
use std::io::Write;
use std::path::Path;

use anyhow::Context;
use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use rcgen::{
    BasicConstraints, CertificateParams, CertifiedIssuer, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    KeyPair, KeyUsagePurpose,
};

/// The files [`generate`] writes.
pub const FILES: [&str; 6] = [
    "ca.pem",
    "ca-key.pem",
    "localhost.pem",
    "localhost-key.pem",
    "signing-key.pem",
    "dev-jwt-secret",
];

/// Writes [`FILES`] into `dir`: the CA, the localhost certificate and key, an Ed25519 signing key
/// (PKCS#8 PEM, for `tokens.signing = { alg = "EdDSA", key = "file:…" }`) and an HMAC secret.
/// Without `force`, refuses to overwrite any of them (a CA key replaced by mistake invalidates
/// every certificate it signed; a signing key, every token it signed).
pub fn generate(dir: &Path, force: bool) -> anyhow::Result<()> {
    std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    if !force {
        let existing: Vec<&str> = FILES.iter().copied().filter(|f| dir.join(f).exists()).collect();
        if !existing.is_empty() {
            anyhow::bail!(
                "{} already holds {}; pass --force to overwrite",
                dir.display(),
                existing.join(", ")
            );
        }
    }

    let mut ca_params = CertificateParams::new(Vec::<String>::new())?;
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca_params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, "tokengate development CA (not for production)");
    ca_params.distinguished_name = dn;
    let ca_key = KeyPair::generate()?;
    let ca_key_pem = ca_key.serialize_pem();
    let ca = CertifiedIssuer::self_signed(ca_params, ca_key)?;

    let mut leaf_params =
        CertificateParams::new(vec!["localhost".to_owned(), "127.0.0.1".to_owned(), "::1".to_owned()])?;
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, "localhost");
    leaf_params.distinguished_name = dn;
    leaf_params.is_ca = IsCa::NoCa;
    leaf_params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    leaf_params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    leaf_params.use_authority_key_identifier_extension = true;
    let leaf_key = KeyPair::generate()?;
    let leaf = leaf_params.signed_by(&leaf_key, &ca)?;

    let signing_key = crate::keys::generate_pem(crate::config::SigningAlg::EdDSA).map_err(anyhow::Error::msg)?;
    let secret =
        URL_SAFE_NO_PAD.encode(crate::crypto::random_bytes::<48>().map_err(|_| anyhow::anyhow!("no randomness"))?);

    write(dir, "ca.pem", ca.pem().as_bytes(), false)?;
    write(dir, "ca-key.pem", ca_key_pem.as_bytes(), true)?;
    write(dir, "localhost.pem", leaf.pem().as_bytes(), false)?;
    write(dir, "localhost-key.pem", leaf_key.serialize_pem().as_bytes(), true)?;
    write(dir, "signing-key.pem", signing_key.as_bytes(), true)?;
    write(dir, "dev-jwt-secret", format!("{secret}\n").as_bytes(), true)?;
    Ok(())
}

fn write(dir: &Path, name: &str, contents: &[u8], private: bool) -> anyhow::Result<()> {
    let path = dir.join(name);
    let mut opts = OpenOptions::new();
    opts.write(true).create(true).truncate(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        opts.mode(if private { 0o600 } else { 0o644 });
    }
    #[cfg(not(unix))]
    let _ = private;
    let mut f = opts
        .open(&path)
        .with_context(|| format!("cannot write {}", path.display()))?;
    f.write_all(contents)
        .with_context(|| format!("cannot write {}", path.display()))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gen_certs_writes_an_ed25519_signing_key_and_never_overwrites_without_force() {
        let dir = tempfile::tempdir().unwrap();
        generate(dir.path(), false).unwrap();
        let pem = std::fs::read(dir.path().join("signing-key.pem")).unwrap();
        assert!(crate::keys::pkcs8_from_pem(crate::config::SigningAlg::EdDSA, &pem).is_ok());
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(dir.path().join("signing-key.pem"))
                .unwrap()
                .permissions()
                .mode();
            assert_eq!(mode & 0o777, 0o600);
        }
        let e = generate(dir.path(), false).unwrap_err().to_string();
        assert!(e.contains("signing-key.pem") && e.contains("--force"), "{e}");
        assert_eq!(std::fs::read(dir.path().join("signing-key.pem")).unwrap(), pem);
        generate(dir.path(), true).unwrap();
        assert_ne!(std::fs::read(dir.path().join("signing-key.pem")).unwrap(), pem);
    }
}
