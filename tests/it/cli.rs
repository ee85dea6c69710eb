//! The command line as a user meets it: exit codes, `TOKENGATE_CONFIG`, help scoped to the commands
//! options belong to, `--version`, `gen-certs` refusing to overwrite, and config errors as
//! `tokengate check` prints them (compound durations, line and column).

use std::path::Path;
use std::process::{Command, Output};
use std::time::Duration;

use crate::support;
use crate::support::process::{Options, Process, Signal, TempDir, plain_config};

fn tokengate() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_tokengate"));
    c.env_remove("TOKENGATE_CONFIG").env_remove("RUST_LOG");
    c
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

fn write(dir: &Path, name: &str, contents: &str) -> std::path::PathBuf {
    let path = dir.join(name);
    std::fs::write(&path, contents).unwrap();
    path
}

fn assert_exit(out: &Output, code: i32, what: &str) {
    assert_eq!(
        out.status.code(),
        Some(code),
        "{what}: stdout:\n{}\nstderr:\n{}",
        text(&out.stdout),
        text(&out.stderr)
    );
}

#[test]
fn a_missing_or_invalid_config_exits_2_for_run_and_check_alike() {
    let dir = TempDir::new("cli-exit");
    let bad = write(dir.path(), "bad.toml", &plain_config("max_connections = \"many\""));
    let cases: [(&str, Vec<&std::ffi::OsStr>); 6] = [
        ("run without --config", vec![]),
        ("`run` without --config", vec!["run".as_ref()]),
        ("check without --config", vec!["check".as_ref()]),
        ("run with an invalid config", vec!["--config".as_ref(), bad.as_os_str()]),
        (
            "`run` with an invalid config",
            vec!["run".as_ref(), "--config".as_ref(), bad.as_os_str()],
        ),
        (
            "check with an invalid config",
            vec!["check".as_ref(), "--config".as_ref(), bad.as_os_str()],
        ),
    ];
    for (what, args) in cases {
        let out = tokengate().args(args).output().unwrap();
        assert_exit(&out, 2, what);
        let stderr = text(&out.stderr);
        assert!(
            stderr.contains("--config FILE (or TOKENGATE_CONFIG) is required")
                || stderr.contains("server.max_connections: invalid type"),
            "{what}: {stderr}"
        );
    }
    // A usage error is a 2 as well (clap's convention).
    let out = tokengate().args(["--no-such-flag"]).output().unwrap();
    assert_exit(&out, 2, "an unknown flag");
}

#[test]
fn a_runtime_failure_exits_1() {
    // The config is valid, but its listen address is taken: nothing wrong with the file.
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let dir = TempDir::new("cli-bind");
    let config = plain_config("").replacen(
        "listen = \"127.0.0.1:0\"",
        &format!("listen = \"{}\"", taken.local_addr().unwrap()),
        1,
    );
    let path = write(dir.path(), "gw.toml", &config);
    let out = tokengate().arg("--config").arg(&path).output().unwrap();
    assert_exit(&out, 1, "listen address in use");
    assert!(
        text(&out.stderr).contains("cannot listen on server.listen"),
        "{}",
        text(&out.stderr)
    );
}

#[test]
fn tokengate_config_names_the_file_for_check_and_run() {
    let dir = TempDir::new("cli-env");
    let path = write(dir.path(), "gw.toml", &plain_config(""));
    let out = tokengate()
        .arg("check")
        .env("TOKENGATE_CONFIG", &path)
        .output()
        .unwrap();
    assert_exit(&out, 0, "check with TOKENGATE_CONFIG");
    assert!(
        text(&out.stdout).contains(": ok; listen http://127.0.0.1:0"),
        "{}",
        text(&out.stdout)
    );

    // `--config` wins over the variable.
    let out = tokengate()
        .args(["check", "--config"])
        .arg(&path)
        .env("TOKENGATE_CONFIG", dir.path().join("absent.toml"))
        .output()
        .unwrap();
    assert_exit(&out, 0, "--config over TOKENGATE_CONFIG");

    // The gateway itself, started with no argument at all.
    let mut gw = Process::spawn_with(
        &plain_config(""),
        Options {
            config_in_env: true,
            ..Options::default()
        },
    );
    let r = gw.connect().get("/echo/hi");
    assert_eq!(r.status, 200, "{}", r.head);
    gw.signal(Signal::Term);
    let status = gw.wait_exit(Duration::from_secs(60)).expect("no exit after SIGTERM");
    assert!(status.success(), "{status:?}: {}", gw.stderr());
}

#[test]
fn help_shows_config_and_log_format_only_where_they_apply() {
    let help = |args: &[&str]| {
        let out = tokengate().args(args).output().unwrap();
        assert_exit(&out, 0, &format!("{args:?}"));
        text(&out.stdout)
    };
    let top = help(&["--help"]);
    assert!(top.contains("tokengate [run] --config FILE"), "{top}");
    assert!(!top.contains("--log-format <"), "{top}");
    let run = help(&["run", "--help"]);
    assert!(
        run.contains("--config <FILE>") && run.contains("--log-format <LOG_FORMAT>"),
        "{run}"
    );
    assert!(run.contains("TOKENGATE_CONFIG"), "{run}");
    let check = help(&["check", "--help"]);
    assert!(
        check.contains("--config <FILE>") && !check.contains("--log-format"),
        "{check}"
    );
    for cmd in ["hash-password", "gen-certs"] {
        let h = help(&[cmd, "--help"]);
        assert!(!h.contains("--config") && !h.contains("--log-format"), "{cmd}: {h}");
    }
    // Options of `run` before another command are an error, not silently ignored.
    let out = tokengate().args(["--config", "x.toml", "check"]).output().unwrap();
    assert_exit(&out, 2, "--config before check");
}

#[test]
fn version_prints_the_crate_version() {
    let out = tokengate().arg("--version").output().unwrap();
    assert_exit(&out, 0, "--version");
    assert_eq!(
        text(&out.stdout).trim(),
        format!("tokengate {}", env!("CARGO_PKG_VERSION"))
    );
}

#[test]
fn gen_certs_refuses_to_overwrite_without_force() {
    let dir = TempDir::new("cli-certs");
    let out = tokengate()
        .args(["gen-certs", "--out"])
        .arg(dir.path())
        .output()
        .unwrap();
    assert_exit(&out, 0, "first gen-certs");
    let ca_key = std::fs::read(dir.path().join("ca-key.pem")).unwrap();

    let out = tokengate()
        .args(["gen-certs", "--out"])
        .arg(dir.path())
        .output()
        .unwrap();
    assert_exit(&out, 1, "second gen-certs without --force");
    let stderr = text(&out.stderr);
    assert!(
        stderr.contains("already holds") && stderr.contains("ca-key.pem"),
        "{stderr}"
    );
    assert!(stderr.contains("--force"), "{stderr}");
    assert_eq!(
        std::fs::read(dir.path().join("ca-key.pem")).unwrap(),
        ca_key,
        "the CA key changed"
    );

    let out = tokengate()
        .args(["gen-certs", "--force", "--out"])
        .arg(dir.path())
        .output()
        .unwrap();
    assert_exit(&out, 0, "gen-certs --force");
    assert_ne!(
        std::fs::read(dir.path().join("ca-key.pem")).unwrap(),
        ca_key,
        "--force did not replace it"
    );
}

#[test]
fn check_accepts_compound_durations_and_places_type_errors() {
    let dir = TempDir::new("cli-check");
    let good = support::config_toml("access_ttl = \"1h30m\"\nreuse_grace = \"1.5s\"", "");
    let path = write(dir.path(), "good.toml", &good);
    let out = tokengate().args(["check", "--config"]).arg(&path).output().unwrap();
    assert_exit(&out, 0, "compound durations");

    let bad = "[server]\nlisten = \"127.0.0.1:0\"\nmax_connections = \"many\"\nworker_threads = true\n\n\
               [tokens]\nissuer = \"x\"\naudience = \"y\"\nsigning = { secret = \"env:NOPE\" }\n";
    let path = write(dir.path(), "bad.toml", bad);
    let out = tokengate().args(["check", "--config"]).arg(&path).output().unwrap();
    assert_exit(&out, 2, "type errors");
    let stderr = text(&out.stderr);
    assert!(stderr.contains("2 errors in config"), "{stderr}");
    assert!(
        stderr.contains("server.max_connections: invalid type: string \"many\", expected i64 (at line 3, column 19)"),
        "{stderr}"
    );
    assert!(
        stderr.contains("server.worker_threads: invalid type: boolean `true`, expected i64 (at line 4, column 18)"),
        "{stderr}"
    );
}
