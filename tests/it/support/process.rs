//! The real `tokengate` binary as a child process, for what only a process shows: exit codes,
//! signals, RSS, a stdout nobody reads, a crash and a restart.
//!
//! [`Process::spawn`] writes the config into a fresh folder, starts the binary, reads its stdout
//! up to the `tokengate listening` line and takes the bound addresses from it (configs bind port
//! 0). Stdout is then either drained into a buffer the test can search ([`Process::stdout`],
//! [`Process::wait_for_stdout`]) or held unread so the pipe fills ([`Options::hold_stdout`]).
//! Stderr is always drained. Every wait is bounded; a `Process` that is dropped (a failing test
//! included) kills its child with SIGKILL and removes its folder.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdout, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, mpsc};
use std::time::{Duration, Instant};

/// How long a child gets to print its `tokengate listening` line (a debug build on a busy machine).
pub const STARTUP_BOUND: Duration = Duration::from_secs(60);

/// The line [`Process::spawn`] waits for, and whose `addr` / `admin_addr` fields it reads.
const LISTENING: &str = "tokengate listening";

/// A fresh folder under the system temp dir, removed (with its contents) on drop.
pub struct TempDir(PathBuf);

impl TempDir {
    pub fn new(label: &str) -> TempDir {
        static N: AtomicU64 = AtomicU64::new(0);
        let path = std::env::temp_dir().join(format!(
            "tokengate-it-{label}-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ));
        let _ = std::fs::remove_dir_all(&path);
        std::fs::create_dir_all(&path).unwrap_or_else(|e| panic!("cannot create {}: {e}", path.display()));
        TempDir(path)
    }

    pub fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Bytes a reader thread appends to, with a condvar so a test can wait for a pattern.
#[derive(Default)]
struct Captured {
    bytes: Mutex<Vec<u8>>,
    grew: Condvar,
}

impl Captured {
    fn push(&self, chunk: &[u8]) {
        self.bytes.lock().unwrap().extend_from_slice(chunk);
        self.grew.notify_all();
    }

    fn text(&self) -> String {
        String::from_utf8_lossy(&self.bytes.lock().unwrap()).into_owned()
    }

    /// Waits until `needle` has appeared; false if `bound` passed first.
    fn wait_for(&self, needle: &str, bound: Duration) -> bool {
        let needle = needle.as_bytes();
        if needle.is_empty() {
            return true;
        }
        let deadline = Instant::now() + bound;
        let mut bytes = self.bytes.lock().unwrap();
        // Only what arrived since the last look is searched (plus an overlap for a needle that
        // straddles two chunks): megabytes of output stay linear.
        let mut from = 0;
        loop {
            if bytes[from..].windows(needle.len()).any(|w| w == needle) {
                return true;
            }
            from = bytes.len().saturating_sub(needle.len().saturating_sub(1));
            let now = Instant::now();
            if now >= deadline {
                return false;
            }
            bytes = self.grew.wait_timeout(bytes, deadline - now).unwrap().0;
        }
    }

    /// Reads `from` to its end in a thread of its own.
    fn drain(self: &Arc<Self>, mut from: impl Read + Send + 'static) {
        let sink = self.clone();
        std::thread::spawn(move || {
            let mut chunk = vec![0; 64 * 1024];
            while let Ok(n @ 1..) = from.read(&mut chunk) {
                sink.push(&chunk[..n]);
            }
        });
    }
}

/// A signal to send with [`Process::signal`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[allow(dead_code)] // Hup and Kill: for reload and crash tests
pub enum Signal {
    Term,
    Int,
    Hup,
    Kill,
}

impl Signal {
    fn name(self) -> &'static str {
        match self {
            Signal::Term => "TERM",
            Signal::Int => "INT",
            Signal::Hup => "HUP",
            Signal::Kill => "KILL",
        }
    }
}

/// How to start the child.
#[derive(Default)]
pub struct Options {
    /// Stop reading stdout after the `tokengate listening` line, so the pipe fills once the
    /// gateway has written about 64 KiB; [`Process::drain_stdout`] starts reading again.
    pub hold_stdout: bool,
    /// Arguments after `--config FILE` (e.g. `["--log-format", "json"]`).
    pub args: Vec<String>,
    /// Environment for the child on top of this process's (RUST_LOG is removed unless set here).
    pub env: Vec<(String, String)>,
    /// Name the config file in `TOKENGATE_CONFIG` instead of with `--config` (as a container would).
    pub config_in_env: bool,
    /// Where the config is written (and the child runs); a fresh [`TempDir`] when `None`. Pass the
    /// same folder to a second spawn to restart on the first one's files.
    pub dir: Option<PathBuf>,
}

/// A running `tokengate` child.
pub struct Process {
    child: Child,
    exited: Option<ExitStatus>,
    /// The main listener's bound address, from the `tokengate listening` line.
    pub addr: SocketAddr,
    /// The admin listener's bound address.
    pub admin_addr: SocketAddr,
    dir: PathBuf,
    _temp: Option<TempDir>,
    stdout: Arc<Captured>,
    held: Option<BufReader<ChildStdout>>,
    stderr: Arc<Captured>,
}

impl Process {
    /// Starts the gateway on `config` (TOML text) with stdout drained.
    pub fn spawn(config: &str) -> Process {
        Process::spawn_with(config, Options::default())
    }

    /// Starts the gateway on `config`; panics (with the child's output) if it does not print its
    /// `tokengate listening` line within [`STARTUP_BOUND`].
    pub fn spawn_with(config: &str, options: Options) -> Process {
        let (temp, dir) = match options.dir {
            Some(dir) => (None, dir),
            None => {
                let t = TempDir::new("gw");
                let dir = t.path().to_owned();
                (Some(t), dir)
            }
        };
        let config_path = dir.join("tokengate.toml");
        std::fs::write(&config_path, config).unwrap();
        let mut command = Command::new(env!("CARGO_BIN_EXE_tokengate"));
        if options.config_in_env {
            command.env("TOKENGATE_CONFIG", &config_path);
        } else {
            command.arg("--config").arg(&config_path);
        }
        command
            .args(&options.args)
            .current_dir(&dir)
            .env_remove("RUST_LOG")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        for (k, v) in &options.env {
            command.env(k, v);
        }
        let mut child = command.spawn().expect("cannot start the tokengate binary");
        let stdout = Arc::new(Captured::default());
        let stderr = Arc::new(Captured::default());
        stderr.drain(child.stderr.take().unwrap());

        // Read stdout in a thread until the listening line, so a child that never prints it
        // cannot hang the test: the thread hands back the addresses and the reader.
        let mut reader = BufReader::new(child.stdout.take().unwrap());
        let (tx, rx) = mpsc::channel();
        let seen = stdout.clone();
        std::thread::spawn(move || {
            let mut line = Vec::new();
            loop {
                line.clear();
                match reader.read_until(b'\n', &mut line) {
                    Ok(1..) => {}
                    _ => return, // EOF or error: the sender drops and the spawn reports it
                }
                seen.push(&line);
                let text = String::from_utf8_lossy(&line);
                if text.contains(LISTENING) {
                    let addrs = (field(&text, "addr"), field(&text, "admin_addr"));
                    let _ = tx.send((addrs, reader));
                    return;
                }
            }
        });
        let mut process = Process {
            child,
            exited: None,
            addr: SocketAddr::from(([0, 0, 0, 0], 0)),
            admin_addr: SocketAddr::from(([0, 0, 0, 0], 0)),
            dir,
            _temp: temp,
            stdout,
            held: None,
            stderr,
        };
        let ((addr, admin_addr), reader) = match rx.recv_timeout(STARTUP_BOUND) {
            Ok(got) => got,
            Err(e) => {
                let status = process.kill();
                panic!(
                    "tokengate did not print {LISTENING:?} ({e}; exit {status:?})\nstdout:\n{}\nstderr:\n{}",
                    tail(&process.stdout()),
                    tail(&process.stderr())
                );
            }
        };
        let parse = |name: &str, v: Option<String>| -> SocketAddr {
            v.and_then(|s| s.parse().ok())
                .unwrap_or_else(|| panic!("no {name} in the listening line: {}", tail(&process.stdout())))
        };
        let (addr, admin_addr) = (parse("addr", addr), parse("admin_addr", admin_addr));
        process.addr = addr;
        process.admin_addr = admin_addr;
        if options.hold_stdout {
            process.held = Some(reader);
        } else {
            // What the BufReader already holds goes first, then the rest of the pipe.
            process.stdout.push(reader.buffer());
            let rest = reader.into_inner();
            process.stdout.drain(rest);
        }
        process
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// The folder holding `tokengate.toml` (the child's working directory).
    #[allow(dead_code)] // for restart tests: pass it as the next spawn's `Options::dir`
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Replaces the config file (for a reload test); the child is not signalled.
    #[allow(dead_code)] // for reload tests
    pub fn write_config(&self, config: &str) {
        std::fs::write(self.dir.join("tokengate.toml"), config).unwrap();
    }

    /// Starts reading a held stdout (see [`Options::hold_stdout`]); a no-op when already draining.
    pub fn drain_stdout(&mut self) {
        if let Some(reader) = self.held.take() {
            self.stdout.push(reader.buffer());
            self.stdout.drain(reader.into_inner());
        }
    }

    /// Everything read from stdout so far (held: only up to the listening line).
    pub fn stdout(&self) -> String {
        self.stdout.text()
    }

    pub fn stderr(&self) -> String {
        self.stderr.text()
    }

    /// Waits until stdout contains `needle`; false if `bound` passed first.
    pub fn wait_for_stdout(&self, needle: &str, bound: Duration) -> bool {
        self.stdout.wait_for(needle, bound)
    }

    /// Resident set size from /proc/PID/status, in bytes.
    pub fn rss_bytes(&self) -> u64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.pid())).unwrap();
        let kib: u64 = status
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .unwrap_or_else(|| panic!("no VmRSS in /proc/{}/status", self.pid()));
        kib * 1024
    }

    /// Sends `signal` with kill(1). Panics if the child has already been reaped (its pid may
    /// belong to another process by now).
    pub fn signal(&mut self, signal: Signal) {
        assert!(self.exited.is_none(), "the child has already exited: {:?}", self.exited);
        let status = Command::new("kill")
            .args(["-s", signal.name(), &self.pid().to_string()])
            .status()
            .expect("cannot run kill");
        assert!(status.success(), "kill -s {} {} failed", signal.name(), self.pid());
    }

    /// Waits up to `bound` for the child to exit; `None` if it is still running.
    pub fn wait_exit(&mut self, bound: Duration) -> Option<ExitStatus> {
        let deadline = Instant::now() + bound;
        loop {
            if let Some(status) = self.try_exit() {
                return Some(status);
            }
            if Instant::now() >= deadline {
                return None;
            }
            // No pidfd in std: poll, briefly. This bounds a wait; it does not time a readiness.
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// The exit status if the child has exited.
    pub fn try_exit(&mut self) -> Option<ExitStatus> {
        if self.exited.is_none() {
            self.exited = self.child.try_wait().unwrap();
        }
        self.exited
    }

    /// SIGKILL and reap; the exit status.
    pub fn kill(&mut self) -> ExitStatus {
        if let Some(status) = self.exited {
            return status;
        }
        let _ = self.child.kill();
        let status = self.child.wait().unwrap();
        self.exited = Some(status);
        status
    }

    /// A plain-HTTP/1.1 keep-alive connection to the main listener.
    pub fn connect(&self) -> Http1 {
        Http1::connect(self.addr)
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        self.kill();
    }
}

/// The end of `text`, at most ~4 KiB with each line cut to 300 characters: enough of a child's
/// output for a failure message that stays readable.
pub fn tail(text: &str) -> String {
    let mut lines: Vec<String> = Vec::new();
    let mut size = 0;
    for line in text.lines().rev() {
        let cut: String = line.chars().take(300).collect();
        size += cut.len() + 1;
        if size > 4096 {
            lines.push("[…]".into());
            break;
        }
        lines.push(if cut.len() < line.len() { cut + "…" } else { cut });
    }
    lines.reverse();
    lines.join("\n")
}

/// `name=value` (text format) or `"name":"value"` (JSON format) from a log line.
fn field(line: &str, name: &str) -> Option<String> {
    let text = format!(" {name}=");
    let json = format!("\"{name}\":\"");
    if let Some(i) = line.find(&text) {
        let rest = &line[i + text.len()..];
        let end = rest.find([' ', '\n']).unwrap_or(rest.len());
        return Some(rest[..end].trim_matches('"').to_owned());
    }
    let i = line.find(&json)?;
    let rest = &line[i + json.len()..];
    Some(rest[..rest.find('"')?].to_owned())
}

/// A minimal blocking HTTP/1.1 client on one keep-alive connection (the child serves plain HTTP
/// in these tests; responses must carry Content-Length).
pub struct Http1 {
    stream: BufReader<TcpStream>,
}

/// A response from [`Http1`].
#[derive(Debug)]
pub struct Response {
    pub status: u16,
    pub head: String,
    pub body: Vec<u8>,
}

impl Http1 {
    pub fn connect(addr: SocketAddr) -> Http1 {
        let stream = TcpStream::connect(addr).unwrap_or_else(|e| panic!("cannot connect to {addr}: {e}"));
        // A hang guard, not a timing: a wedged gateway fails the test instead of hanging it.
        stream.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
        stream.set_write_timeout(Some(Duration::from_secs(60))).unwrap();
        Http1 {
            stream: BufReader::new(stream),
        }
    }

    /// `GET path` with `Host: localhost`; the whole response.
    pub fn get(&mut self, path: &str) -> Response {
        self.send("GET", path, &[], b"").unwrap()
    }

    /// `GET path` with a bearer token.
    #[allow(dead_code)] // crash tests
    pub fn get_with_token(&mut self, path: &str, token: &str) -> std::io::Result<Response> {
        self.send("GET", path, &[("authorization", &format!("Bearer {token}"))], b"")
    }

    /// `POST path` of a form; errors (the gateway died) are returned, not panics.
    #[allow(dead_code)] // crash tests
    pub fn post_form(&mut self, path: &str, form: &[(&str, &str)]) -> std::io::Result<Response> {
        let body: String = form_urlencoded::Serializer::new(String::new())
            .extend_pairs(form)
            .finish();
        self.send(
            "POST",
            path,
            &[("content-type", "application/x-www-form-urlencoded")],
            body.as_bytes(),
        )
    }

    /// One request and its whole response.
    pub fn send(
        &mut self,
        method: &str,
        path: &str,
        headers: &[(&str, &str)],
        body: &[u8],
    ) -> std::io::Result<Response> {
        let mut request = format!(
            "{method} {path} HTTP/1.1\r\nhost: localhost\r\ncontent-length: {}\r\n",
            body.len()
        );
        for (k, v) in headers {
            request.push_str(&format!("{k}: {v}\r\n"));
        }
        request.push_str("\r\n");
        let mut bytes = request.into_bytes();
        bytes.extend_from_slice(body);
        self.stream.get_mut().write_all(&bytes)?;
        let mut head = String::new();
        loop {
            let n = self.stream.read_line(&mut head)?;
            if n == 0 {
                return Err(std::io::Error::new(
                    std::io::ErrorKind::UnexpectedEof,
                    format!("connection closed mid-response: {head:?}"),
                ));
            }
            if head.ends_with("\r\n\r\n") {
                break;
            }
        }
        let status = head
            .split(' ')
            .nth(1)
            .and_then(|s| s.parse().ok())
            .unwrap_or_else(|| panic!("not an HTTP response: {head:?}"));
        let length: usize = head
            .lines()
            .find_map(|l| {
                let (k, v) = l.split_once(':')?;
                k.eq_ignore_ascii_case("content-length")
                    .then(|| v.trim().parse().ok())?
            })
            .unwrap_or_else(|| panic!("no Content-Length: {head:?}"));
        let mut body = vec![0; length];
        self.stream.read_exact(&mut body)?;
        Ok(Response { status, head, body })
    }
}

/// A plain-HTTP config on port 0 with one public echo route; `shutdown_grace` (2s) also bounds
/// the final log flush.
pub fn plain_config(server_extra: &str) -> String {
    format!(
        r#"
[server]
listen = "127.0.0.1:0"
shutdown_grace = "2s"
{server_extra}

[admin]
listen = "127.0.0.1:0"

[tokens]
issuer = "https://gw.test"
audience = "api"
signing = {{ alg = "HS256", secret = "file:{secret}" }}

[[routes]]
path_prefix = "/echo"
upstream = "echo"
auth = "none"
"#,
        secret = super::repo().join("certs/dev-jwt-secret").display()
    )
}
