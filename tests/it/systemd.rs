//! config/tokengate.service: checked by `systemd-analyze verify` (and its offline security score)
//! where the tool is installed; the directives the deployment relies on are there either way.

use std::process::Command;

use crate::support::process::TempDir;
use crate::support::repo;

fn unit() -> String {
    std::fs::read_to_string(repo().join("config/tokengate.service")).unwrap()
}

fn has_systemd_analyze() -> bool {
    Command::new("systemd-analyze")
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success())
}

#[test]
fn the_unit_checks_before_start_and_reload_and_is_hardened() {
    let unit = unit();
    let lines: Vec<&str> = unit.lines().map(str::trim).filter(|l| !l.starts_with('#')).collect();
    for directive in [
        "ExecStartPre=/usr/local/bin/tokengate check",
        "ExecStart=/usr/local/bin/tokengate run",
        "ExecReload=/usr/local/bin/tokengate check",
        "ExecReload=/bin/kill -HUP $MAINPID",
        "Environment=TOKENGATE_CONFIG=/etc/tokengate/tokengate.toml",
        "RestartPreventExitStatus=2",
        "StateDirectory=tokengate",
        "DynamicUser=yes",
        "NoNewPrivileges=yes",
        "ProtectSystem=strict",
        "ProtectHome=yes",
        "PrivateTmp=yes",
        "CapabilityBoundingSet=CAP_NET_BIND_SERVICE",
        "AmbientCapabilities=CAP_NET_BIND_SERVICE",
    ] {
        assert!(lines.contains(&directive), "{directive} is missing from the unit");
    }
    // The reload checks first: a failed check must stop the SIGHUP.
    let check = lines
        .iter()
        .position(|l| *l == "ExecReload=/usr/local/bin/tokengate check");
    let hup = lines.iter().position(|l| *l == "ExecReload=/bin/kill -HUP $MAINPID");
    assert!(check < hup, "ExecReload must run check before kill -HUP");
}

#[test]
fn systemd_analyze_verifies_the_unit() {
    if !has_systemd_analyze() {
        eprintln!("skipped: systemd-analyze is not installed");
        return;
    }
    // The unit as installed, with the binary this test built in place of /usr/local/bin's:
    // verify checks that every Exec* command exists.
    let dir = TempDir::new("systemd");
    let path = dir.path().join("tokengate.service");
    std::fs::write(
        &path,
        unit().replace("/usr/local/bin/tokengate", env!("CARGO_BIN_EXE_tokengate")),
    )
    .unwrap();
    let out = Command::new("systemd-analyze")
        .args(["verify", "--man=no"])
        .arg(&path)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "systemd-analyze verify failed:\n{stderr}");
    // Unknown keys and bad values are only warnings (exit 0): none may name this unit.
    let ours: Vec<&str> = stderr.lines().filter(|l| l.contains("tokengate.service")).collect();
    assert!(ours.is_empty(), "systemd-analyze verify warns:\n{}", ours.join("\n"));

    // The hardening, scored offline (systemd 250 and later; older ones lack --offline).
    let out = Command::new("systemd-analyze")
        .args(["security", "--offline=yes", "--no-pager"])
        .arg(&path)
        .output()
        .unwrap();
    if !out.status.success() {
        eprintln!(
            "skipped the security score: {}",
            String::from_utf8_lossy(&out.stderr).lines().next().unwrap_or("")
        );
        return;
    }
    let text = String::from_utf8_lossy(&out.stdout);
    let score: f64 = text
        .lines()
        .find_map(|l| l.split("Overall exposure level for tokengate.service: ").nth(1))
        .and_then(|rest| rest.split_whitespace().next()?.parse().ok())
        .unwrap_or_else(|| panic!("no exposure level in:\n{text}"));
    // 0 is a fully locked-down unit, 10 an unprotected one; a network daemon that binds ports
    // and reaches upstreams cannot reach 0. This keeps later edits from loosening it unnoticed.
    assert!(score <= 2.0, "exposure level {score} (was 1.4):\n{text}");
}
