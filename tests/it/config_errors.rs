//! Each class of config error is refused with a message naming the key and the reason, both by the
//! loader and by `tokengate check` (exit 2).

use std::process::Command;

use tokengate::config::Config;

use crate::support::{self, repo};

fn problems(toml: &str) -> String {
    match Config::from_toml(toml, &repo(), "test.toml") {
        Ok(_) => panic!("config was accepted"),
        Err(e) => e.to_string(),
    }
}

fn base() -> String {
    support::config_toml("", "[[routes]]\npath_prefix = \"/api\"\nupstream = \"echo\"\n")
}

#[test]
fn unknown_key() {
    let toml = base().replace("handshake_timeout", "handshake_timeuot");
    assert!(
        problems(&toml).contains("server.handshake_timeuot: unknown field `handshake_timeuot`"),
        "{}",
        problems(&toml)
    );
}

#[test]
fn bad_duration() {
    let toml = base().replace(
        "header_read_timeout = \"300ms\"",
        "header_read_timeout = \"ten seconds\"",
    );
    assert!(problems(&toml).contains("server.header_read_timeout: \"ten seconds\" is not a duration"));
}

#[test]
fn unset_secret_env_var() {
    let toml = base().replace(
        &format!("file:{}", repo().join("certs/dev-jwt-secret").display()),
        "env:TOKENGATE_TEST_NEVER_SET",
    );
    assert!(
        problems(&toml).contains("tokens.signing.secret: environment variable TOKENGATE_TEST_NEVER_SET is not set")
    );
}

#[test]
fn missing_cert_file() {
    let toml = base().replace("localhost.pem", "no-such-cert.pem");
    let p = problems(&toml);
    assert!(
        p.contains("server.tls.cert: ") && p.contains("no-such-cert.pem does not exist"),
        "{p}"
    );
}

#[test]
fn bad_listen_address() {
    let toml = base().replacen("listen = \"127.0.0.1:0\"", "listen = \"127.0.0.1:99999\"", 1);
    assert!(problems(&toml).contains("server.listen: \"127.0.0.1:99999\" is not an IP:port address"));
}

#[test]
fn bad_upstream_url() {
    let toml = base().replace("upstream = \"echo\"", "upstream = \"htp://x\"");
    assert!(problems(&toml).contains("routes[0].upstream: \"htp://x\" is not an http or https URL"));
}

#[test]
fn several_errors_are_reported_together() {
    let toml = base()
        .replace("upstream = \"echo\"", "upstream = \"htp://x\"")
        .replace("\"300ms\"", "\"soon\"");
    let p = problems(&toml);
    // The upstream, and handshake_timeout, header_read_timeout and idle_timeout.
    assert!(p.contains("4 errors in config"), "{p}");
}

fn tokengate() -> Command {
    Command::new(env!("CARGO_BIN_EXE_tokengate"))
}

#[test]
fn check_accepts_the_shipped_configs() {
    for file in ["config/tokengate.toml", "config/example.toml"] {
        let out = tokengate()
            .args(["check", "--config"])
            .arg(repo().join(file))
            .output()
            .unwrap();
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(out.status.success(), "{file}: {}", String::from_utf8_lossy(&out.stderr));
        assert!(stdout.contains(": ok; listen https://127.0.0.1:8443"), "{stdout}");
        // The kid of each key, to compare with what relying parties hold before retiring one.
        assert!(
            stdout
                .lines()
                .any(|l| l.starts_with("  key EdDSA ") && l.ends_with(" signs")),
            "{file}: {stdout}"
        );
    }
}

#[test]
fn check_names_a_misspelt_key_and_exits_2() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("bad.toml");
    std::fs::write(
        &path,
        base().replace(
            "scopes = [\"orders:read\", \"orders:write\"]\n\n[[clients]]\nid = \"mobile\"",
            "scopez = [\"orders:read\"]\n\n[[clients]]\nid = \"mobile\"",
        ),
    )
    .unwrap();
    let out = tokengate().args(["check", "--config"]).arg(&path).output().unwrap();
    assert_eq!(out.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("clients[0].scopez: unknown field `scopez`"), "{stderr}");
}
