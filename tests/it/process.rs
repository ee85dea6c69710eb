//! The binary as a child process: what a stdout nobody reads does to memory, to the log and to
//! SIGTERM.

use std::time::Duration;

use crate::support::process::{Options, Process, Signal, plain_config, tail};

/// A path long enough that its access line is ~8 KiB: a few thousand requests overflow both the
/// 64 KiB pipe and the gateway's log buffer.
fn long_path() -> String {
    format!("/echo/{}", "a".repeat(8 * 1024))
}

/// Sends `requests` GETs of [`long_path`] over 4 keep-alive connections; every one must be 200.
fn flood(gw: &Process, requests: usize) {
    let path = long_path();
    std::thread::scope(|s| {
        for i in 0..4 {
            let path = &path;
            s.spawn(move || {
                let mut conn = gw.connect();
                for _ in (i..requests).step_by(4) {
                    let r = conn.get(path);
                    assert_eq!(r.status, 200, "{}", r.head);
                }
            });
        }
    });
}

/// The hang guard for exits: far beyond the 2 s grace and the log flush's 2 s bound.
const EXIT_BOUND: Duration = Duration::from_secs(60);

#[test]
fn a_stdout_nobody_reads_keeps_memory_bounded_and_sigterm_still_exits() {
    let mut gw = Process::spawn_with(
        &plain_config(""),
        Options {
            hold_stdout: true,
            ..Options::default()
        },
    );
    let before = gw.rss_bytes();
    // 64 MiB of access lines into a pipe nobody reads: a buffer without a cap would hold them all.
    flood(&gw, 8 * 1024);
    let after = gw.rss_bytes();
    let grown = after.saturating_sub(before);
    assert!(
        grown < 32 << 20,
        "RSS grew by {} MiB ({} → {} MiB) while stdout was blocked",
        grown >> 20,
        before >> 20,
        after >> 20
    );

    gw.signal(Signal::Term);
    let status = gw.wait_exit(EXIT_BOUND);
    assert!(
        status.is_some(),
        "tokengate did not exit within {EXIT_BOUND:?} of SIGTERM with its stdout blocked"
    );
    assert!(
        status.unwrap().success(),
        "exit status {status:?}; stderr:\n{}",
        gw.stderr()
    );
}

#[test]
fn dropped_log_lines_are_counted_and_reported_once_stdout_drains() {
    let mut gw = Process::spawn_with(
        &plain_config(""),
        Options {
            hold_stdout: true,
            ..Options::default()
        },
    );
    // 16 MiB of access lines: more than the pipe, the writer's batch in flight and the buffer.
    let requests = 2 * 1024;
    flood(&gw, requests);
    gw.drain_stdout();
    assert!(
        gw.wait_for_stdout("WARN tokengate::logging: dropped ", EXIT_BOUND),
        "no drop notice once stdout was read again; stdout:\n{}",
        tail(&gw.stdout())
    );

    gw.signal(Signal::Term);
    let status = gw.wait_exit(EXIT_BOUND).expect("no exit after SIGTERM");
    assert!(status.success(), "exit status {status:?}; stderr:\n{}", gw.stderr());
    // Every request is either an access line on stdout or counted in a notice: none lost unsaid.
    let stdout = gw.stdout();
    assert!(
        stdout.contains("tokengate stopped"),
        "no final lines:\n{}",
        tail(&stdout)
    );
    let written = stdout.lines().filter(|l| l.contains(" tokengate::access: ")).count();
    let dropped: usize = stdout
        .lines()
        .filter_map(|l| {
            l.split_once("WARN tokengate::logging: dropped ")?
                .1
                .split(' ')
                .next()?
                .parse::<usize>()
                .ok()
        })
        .sum();
    assert!(dropped > 0, "no lines dropped:\n{}", tail(&stdout));
    assert_eq!(written + dropped, requests, "access lines written + dropped");
    // Whole lines only: each starts with its timestamp, and no access line lost part of its path.
    let path = format!("path=\"{}\"", long_path());
    for line in stdout.lines() {
        assert!(
            line.starts_with("20") && line.as_bytes().get(10) == Some(&b'T'),
            "a cut line: {line:.200}"
        );
        if line.contains(" tokengate::access: ") {
            assert!(line.contains(&path), "a cut access line: {line:.200}");
        }
    }
}

#[test]
fn sigint_drains_and_exits_0_with_every_line_written() {
    let mut gw = Process::spawn(&plain_config(""));
    let r = gw.connect().get("/echo/hi");
    assert_eq!(r.status, 200, "{}", r.head);
    assert!(String::from_utf8_lossy(&r.body).contains("/echo/hi"));

    gw.signal(Signal::Int);
    let status = gw.wait_exit(EXIT_BOUND).expect("no exit after SIGINT");
    assert!(status.success(), "exit status {status:?}; stderr:\n{}", gw.stderr());
    assert!(
        gw.wait_for_stdout("tokengate stopped", EXIT_BOUND),
        "no final line:\n{}",
        tail(&gw.stdout())
    );
    let stdout = gw.stdout();
    assert!(stdout.contains(r#"path="/echo/hi""#), "{}", tail(&stdout));
    assert!(!stdout.contains("dropped"), "{}", tail(&stdout));
}
