//! The durable store through real crashes: the binary as a child process, killed with SIGKILL
//! under load, restarted on the same state folder. Acknowledged means durable: every refresh
//! whose response was received still works afterwards, a refresh whose response was lost can be
//! retried within the grace, revocations stay in force, reuse is still detected; one process per
//! folder; a torn tail is cut with a warning, damage before it is refused by name.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use crate::support::process::{Http1, Options, Process};
use crate::support::{self, repo};

const TOKEN: &str = "/api/oauth2/token";
const REVOKE: &str = "/api/oauth2/revoke";

fn config(grace: &str) -> String {
    format!(
        r#"
[server]
listen = "127.0.0.1:0"
[admin]
listen = "127.0.0.1:0"
[tokens]
issuer = "https://gw.test"
audience = "api"
reuse_grace = "{grace}"
signing = {{ alg = "HS256", secret = "file:{secret}" }}
[state]
path = "state"
[[clients]]
id = "web"
grants = ["password", "refresh_token"]
scopes = ["orders:read"]
[[users]]
username = "{user}"
password_hash = "{hash}"
scopes = ["orders:read"]
[[routes]]
path_prefix = "/api/orders"
upstream = "echo"
"#,
        secret = repo().join("certs/dev-jwt-secret").display(),
        user = support::USER,
        hash = support::password_hash(),
    )
}

fn field(body: &[u8], key: &str) -> String {
    let v = support::json(body);
    v[key].as_str().unwrap_or_else(|| panic!("no {key} in {v}")).to_owned()
}

/// Logs in; returns (access token, refresh token).
fn login(c: &mut Http1) -> (String, String) {
    let r = c
        .post_form(
            TOKEN,
            &[
                ("grant_type", "password"),
                ("client_id", "web"),
                ("username", support::USER),
                ("password", support::PASSWORD),
            ],
        )
        .unwrap();
    assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
    (field(&r.body, "access_token"), field(&r.body, "refresh_token"))
}

fn refresh(c: &mut Http1, token: &str) -> std::io::Result<crate::support::process::Response> {
    c.post_form(
        TOKEN,
        &[
            ("grant_type", "refresh_token"),
            ("client_id", "web"),
            ("refresh_token", token),
        ],
    )
}

fn restart(first: &Process, grace: &str) -> Process {
    Process::spawn_with(
        &config(grace),
        Options {
            dir: Some(first.dir().to_owned()),
            ..Default::default()
        },
    )
}

/// What one client knew when the gateway died.
#[derive(Debug, Default, Clone)]
struct ClientView {
    /// The last refresh token whose response it received.
    acked: String,
    /// A refresh token it had sent without receiving the response.
    in_flight: Option<String>,
}

#[test]
fn acknowledged_refreshes_and_revocations_survive_a_kill_9_under_load() {
    let mut gw = Process::spawn(&config("60s"));
    let mut c = gw.connect();
    // Two sessions logged out before the crash: their access tokens must stay refused.
    let revoked: Vec<(String, String)> = (0..2).map(|_| login(&mut c)).collect();
    for (at, _) in &revoked {
        let r = c.post_form(REVOKE, &[("client_id", "web"), ("token", at)]).unwrap();
        assert_eq!(r.status, 200);
        assert_eq!(c.get_with_token("/api/orders", at).unwrap().status, 401);
    }

    // Eight clients refresh as fast as they can; the gateway is killed at an arbitrary moment.
    let views: Vec<Arc<Mutex<ClientView>>> = (0..8)
        .map(|_| {
            let (_, rt) = login(&mut c);
            Arc::new(Mutex::new(ClientView {
                acked: rt,
                in_flight: None,
            }))
        })
        .collect();
    let refreshed = Arc::new(AtomicUsize::new(0));
    let dead = Arc::new(AtomicBool::new(false));
    // An arbitrary moment: somewhere between 40 and 400 acknowledged refreshes.
    let kill_after = 40 + (std::process::id() as usize * 7919 + support::now_nanos() as usize) % 360;
    std::thread::scope(|s| {
        for view in &views {
            let (view, refreshed, dead) = (view.clone(), refreshed.clone(), dead.clone());
            let addr = gw.addr;
            s.spawn(move || {
                let mut c = Http1::connect(addr);
                while !dead.load(Ordering::Relaxed) {
                    let token = view.lock().unwrap().acked.clone();
                    view.lock().unwrap().in_flight = Some(token.clone());
                    match refresh(&mut c, &token) {
                        Ok(r) if r.status == 200 => {
                            let mut v = view.lock().unwrap();
                            v.acked = field(&r.body, "refresh_token");
                            v.in_flight = None;
                            refreshed.fetch_add(1, Ordering::Relaxed);
                        }
                        Ok(r) => panic!("refresh refused before the crash: {}", String::from_utf8_lossy(&r.body)),
                        Err(_) => return, // the gateway died: this request's fate is unknown
                    }
                }
            });
        }
        while refreshed.load(Ordering::Relaxed) < kill_after {
            std::thread::yield_now();
        }
        gw.kill();
        dead.store(true, Ordering::Relaxed);
    });
    let before_restart = refreshed.load(Ordering::Relaxed);

    let gw2 = restart(&gw, "60s");
    let mut c = gw2.connect();
    let mut retried = 0;
    for view in &views {
        let view = view.lock().unwrap().clone();
        let live = match &view.in_flight {
            // Its response was lost: the retry within the grace succeeds, either as the
            // rotation itself (never committed) or as the identical replay of a committed one.
            Some(token) => {
                retried += 1;
                let r = refresh(&mut c, token).unwrap();
                assert_eq!(
                    r.status,
                    200,
                    "a retry within the grace after the crash: {}",
                    String::from_utf8_lossy(&r.body)
                );
                field(&r.body, "refresh_token")
            }
            None => view.acked.clone(),
        };
        let r = refresh(&mut c, &live).unwrap();
        assert_eq!(
            r.status,
            200,
            "an acknowledged refresh token after the crash: {}",
            String::from_utf8_lossy(&r.body)
        );
    }
    for (at, rt) in &revoked {
        assert_eq!(
            c.get_with_token("/api/orders", at).unwrap().status,
            401,
            "logged out before the crash"
        );
        assert_eq!(refresh(&mut c, rt).unwrap().status, 400);
    }
    println!("killed after {before_restart} acknowledged refreshes; {retried} refreshes were in flight");

    // One process per folder: a second gateway on it exits at once, naming the folder.
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_tokengate"))
        .arg("--config")
        .arg(gw2.dir().join("tokengate.toml"))
        .current_dir(gw2.dir())
        .output()
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("in use by another tokengate process"), "{stderr}");
    assert!(
        stderr.contains(&gw2.dir().join("state").display().to_string()),
        "{stderr}"
    );
    drop(gw2);
}

#[test]
fn reuse_of_a_token_rotated_before_a_kill_is_still_detected() {
    let mut gw = Process::spawn(&config("0s"));
    let mut c = gw.connect();
    let (_, first) = login(&mut c);
    let r = refresh(&mut c, &first).unwrap();
    assert_eq!(r.status, 200);
    let (access, second) = (field(&r.body, "access_token"), field(&r.body, "refresh_token"));
    gw.kill();

    let gw2 = restart(&gw, "0s");
    let mut c = gw2.connect();
    assert_eq!(
        refresh(&mut c, &first).unwrap().status,
        400,
        "reuse of the rotated token"
    );
    assert_eq!(
        refresh(&mut c, &second).unwrap().status,
        400,
        "the whole session is revoked"
    );
    assert_eq!(c.get_with_token("/api/orders", &access).unwrap().status, 401);
}

fn segments(dir: &std::path::Path) -> Vec<std::path::PathBuf> {
    let mut v: Vec<_> = std::fs::read_dir(dir.join("state"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "log"))
        .collect();
    v.sort();
    v
}

#[test]
fn a_torn_tail_is_cut_with_a_warning_and_damage_before_it_is_refused_by_name() {
    let mut gw = Process::spawn(&config("10s"));
    let mut c = gw.connect();
    let (_, token) = login(&mut c);
    gw.kill();
    let last = segments(gw.dir()).pop().unwrap();
    let len = std::fs::metadata(&last).unwrap().len();

    // Half a record at the end, as a crash mid-write leaves it.
    let mut bytes = std::fs::read(&last).unwrap();
    bytes.extend_from_slice(&[0x5a, 0, 0, 0, 1, 2, 3, 4, 5, 6, 7]);
    std::fs::write(&last, &bytes).unwrap();
    let mut gw2 = restart(&gw, "10s");
    let warned = format!(
        "{}: cut a torn or corrupt tail of 11 bytes at byte offset {len}",
        last.display()
    );
    assert!(
        gw2.wait_for_stdout(&warned, Duration::from_secs(30)),
        "{}",
        gw2.stdout()
    );
    let mut c = gw2.connect();
    assert_eq!(
        refresh(&mut c, &token).unwrap().status,
        200,
        "the acknowledged session survived"
    );
    gw2.kill();

    // A flipped byte inside an earlier record, with valid records after it: refused, by name.
    let mut bytes = std::fs::read(&last).unwrap();
    bytes[40] ^= 0xff;
    std::fs::write(&last, &bytes).unwrap();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_tokengate"))
        .arg("--config")
        .arg(gw.dir().join("tokengate.toml"))
        .current_dir(gw.dir())
        .output()
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains(&last.display().to_string()) && stderr.contains("corrupt"),
        "{stderr}"
    );
}
