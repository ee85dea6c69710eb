//! A throwaway `redis-server` for tests and benches: its own free port and a fresh folder under
//! the system temp dir (never the system instance), append-only file with `appendfsync always` so
//! a kill loses nothing, killed and removed on drop. Readiness is Redis's own "Ready to accept
//! connections" line, not a sleep.

use std::io::{self, BufRead, BufReader};
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc;
use std::time::Duration;

/// How long a starting redis-server gets to say it is ready.
const READY_BOUND: Duration = Duration::from_secs(30);
const READY: &str = "Ready to accept connections";

/// TLS material for a `rediss://` server.
#[derive(Debug, Clone)]
pub struct Tls {
    pub cert: PathBuf,
    pub key: PathBuf,
    pub ca: PathBuf,
}

pub struct RedisServer {
    child: Option<Child>,
    port: u16,
    dir: PathBuf,
    password: Option<String>,
    tls: Option<Tls>,
}

fn other(msg: String) -> io::Error {
    io::Error::other(msg)
}

impl RedisServer {
    /// A plain server on a free port.
    pub fn start() -> io::Result<RedisServer> {
        Self::start_with(None, None)
    }

    /// A server that requires `password` and/or speaks only TLS.
    pub fn start_with(password: Option<&str>, tls: Option<Tls>) -> io::Result<RedisServer> {
        static N: AtomicU64 = AtomicU64::new(0);
        let dir = std::env::temp_dir().join(format!(
            "tokengate-redis-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir)?;
        let mut server = RedisServer {
            child: None,
            port: 0,
            dir,
            password: password.map(str::to_owned),
            tls,
        };
        // A port found free can be taken before redis binds it: try a few.
        let mut last = None;
        for _ in 0..5 {
            server.port = TcpListener::bind("127.0.0.1:0")?.local_addr()?.port();
            match server.spawn() {
                Ok(()) => return Ok(server),
                Err(e) => last = Some(e),
            }
        }
        Err(last.unwrap_or_else(|| other("redis-server did not start".into())))
    }

    fn spawn(&mut self) -> io::Result<()> {
        let port = self.port.to_string();
        let mut cmd = Command::new("redis-server");
        cmd.args(["--bind", "127.0.0.1", "--daemonize", "no", "--logfile", ""])
            .args(["--appendonly", "yes", "--appendfsync", "always", "--save", ""])
            .arg("--dir")
            .arg(&self.dir);
        match &self.tls {
            None => {
                cmd.args(["--port", &port]);
            }
            Some(t) => {
                cmd.args(["--port", "0", "--tls-port", &port, "--tls-auth-clients", "no"])
                    .arg("--tls-cert-file")
                    .arg(&t.cert)
                    .arg("--tls-key-file")
                    .arg(&t.key)
                    .arg("--tls-ca-cert-file")
                    .arg(&t.ca);
            }
        }
        if let Some(p) = &self.password {
            cmd.args(["--requirepass", p]);
        }
        let mut child = cmd
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .map_err(|e| other(format!("cannot run redis-server (is it installed?): {e}")))?;
        let stdout = child.stdout.take().ok_or_else(|| other("no stdout".into()))?;
        let (tx, rx) = mpsc::channel::<String>();
        std::thread::spawn(move || {
            // Lines go to the test until it stops listening; the rest is drained so the pipe never
            // fills and blocks the server.
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                let _ = tx.send(line);
            }
        });
        let deadline = std::time::Instant::now() + READY_BOUND;
        let mut seen = Vec::new();
        loop {
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            match rx.recv_timeout(left) {
                Ok(line) if line.contains(READY) => break,
                Ok(line) => seen.push(line),
                Err(_) => {
                    let _ = child.kill();
                    let _ = child.wait();
                    return Err(other(format!(
                        "redis-server on port {port} did not become ready:\n{}",
                        seen.join("\n")
                    )));
                }
            }
        }
        self.child = Some(child);
        Ok(())
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// The server's process id while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// `redis://127.0.0.1:PORT/0` (or `rediss://localhost:PORT/0` for TLS).
    pub fn url(&self) -> String {
        match self.tls {
            None => format!("redis://127.0.0.1:{}/0", self.port),
            Some(_) => format!("rediss://localhost:{}/0", self.port),
        }
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Kills the server (SIGKILL, as a crash would). Its data stays in its folder.
    pub fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Starts it again on the same port and folder (the append-only file brings the data back).
    pub fn restart(&mut self) -> io::Result<()> {
        self.stop();
        self.spawn()
    }

    /// SIGSTOP / SIGCONT: a Redis that hangs without closing its connections.
    pub fn pause(&self, paused: bool) -> io::Result<()> {
        let Some(c) = &self.child else {
            return Err(other("not running".into()));
        };
        let status = Command::new("kill")
            .arg(if paused { "-STOP" } else { "-CONT" })
            .arg(c.id().to_string())
            .status()?;
        if status.success() {
            Ok(())
        } else {
            Err(other(format!("kill exited with {status}")))
        }
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        self.stop();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
