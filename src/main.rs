//! The `tokengate` command: run / check / hash-password / gen-certs. Raw arguments are parsed
//! first, validated second; any error is printed with its chain of causes and a non-zero exit:
//! 2 for a usage or config problem (nothing was started), 1 for anything else.

use std::io::{IsTerminal, Read};
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use anyhow::Context;
use clap::{Args, Parser, Subcommand, ValueEnum};
use tokengate::config::{Config, ConfigError, LogFormat};
use tokengate::{Gateway, SystemClock};

#[derive(Parser)]
#[command(
    name = "tokengate",
    version,
    about = "A TLS gateway that issues and enforces OAuth 2.0 access tokens",
    override_usage = "tokengate [run] --config FILE [--log-format text|json]\n       tokengate <COMMAND>",
    after_help = "Without a command, runs the gateway: `tokengate --config FILE` is `tokengate run --config FILE`.\n\
                  Exit status: 0 success, 2 a usage or config problem (nothing was started), 1 any other failure.",
    args_conflicts_with_subcommands = true
)]
struct Cli {
    /// `run`'s options, accepted without the command name; listed under `tokengate run --help`.
    #[command(flatten)]
    run: RunArgs,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Args)]
struct RunArgs {
    /// The config file.
    #[arg(long, value_name = "FILE", env = "TOKENGATE_CONFIG", hide = true)]
    config: Option<PathBuf>,
    /// Log format; overrides [log] format.
    #[arg(long, value_enum, hide = true)]
    log_format: Option<LogFormatArg>,
}

#[derive(Args)]
struct RunCommandArgs {
    /// The config file.
    #[arg(long, value_name = "FILE", env = "TOKENGATE_CONFIG")]
    config: Option<PathBuf>,
    /// Log format; overrides [log] format.
    #[arg(long, value_enum)]
    log_format: Option<LogFormatArg>,
}

#[derive(Args)]
struct CheckArgs {
    /// The config file.
    #[arg(long, value_name = "FILE", env = "TOKENGATE_CONFIG")]
    config: Option<PathBuf>,
}

#[derive(Clone, Copy, ValueEnum)]
enum LogFormatArg {
    Text,
    Json,
}

#[derive(Subcommand)]
enum Command {
    /// Run the gateway (the default).
    Run(RunCommandArgs),
    /// Validate a config: print a summary and exit 0, or every error and exit 2.
    Check(CheckArgs),
    /// Read a password from stdin and print its Argon2id PHC string for [[users]].
    HashPassword,
    /// Write a development CA, a localhost certificate, a JWT signing key and secret into DIR.
    GenCerts {
        #[arg(long, value_name = "DIR")]
        out: PathBuf,
        /// Overwrite files already in DIR (by default an existing CA key is never replaced).
        #[arg(long)]
        force: bool,
    },
}

/// A usage or config problem: nothing was started. (clap exits 2 for usage errors too.)
const EXIT_CONFIG: u8 = 2;

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        None => run(cli.run.config, cli.run.log_format),
        Some(Command::Run(args)) => run(args.config, args.log_format),
        Some(Command::Check(args)) => return check(args.config),
        Some(Command::HashPassword) => hash_password(),
        Some(Command::GenCerts { out, force }) => tokengate::certs::generate(&out, force).map(|()| {
            println!("wrote {} to {}", tokengate::certs::FILES.join(", "), out.display());
        }),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            if let Some(config_error) = e.downcast_ref::<ConfigError>() {
                eprintln!("tokengate: {config_error}");
                return ExitCode::from(EXIT_CONFIG);
            }
            if e.downcast_ref::<NoConfig>().is_some() {
                eprintln!("tokengate: {e}");
                return ExitCode::from(EXIT_CONFIG);
            }
            eprintln!("tokengate: {e:#}");
            ExitCode::FAILURE
        }
    }
}

#[derive(Debug, thiserror::Error)]
#[error("--config FILE (or TOKENGATE_CONFIG) is required (try: --config config/tokengate.toml)")]
struct NoConfig;

fn config_path(path: Option<PathBuf>) -> Result<PathBuf, NoConfig> {
    path.ok_or(NoConfig)
}

fn check(path: Option<PathBuf>) -> ExitCode {
    let path = match config_path(path) {
        Ok(p) => p,
        Err(e) => {
            eprintln!("tokengate: {e}");
            return ExitCode::from(EXIT_CONFIG);
        }
    };
    match Config::load(&path) {
        Ok(config) => {
            println!("{}: ok; {}", path.display(), config.summary());
            // The kids, to compare with a relying party's JWKS before a key is retired. Whether a
            // removal would cut live tokens only the running gateway knows (it warns on reload).
            if let Ok(keys) = tokengate::keys::KeySet::new(&config.tokens, None, 0) {
                for (i, k) in keys.iter().enumerate() {
                    let role = if i == 0 { "signs" } else { "verifies (previous)" };
                    println!("  key {} {} {role}", k.alg, k.kid);
                }
            }
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("tokengate: {e}");
            ExitCode::from(EXIT_CONFIG)
        }
    }
}

fn run(path: Option<PathBuf>, log_format: Option<LogFormatArg>) -> anyhow::Result<()> {
    let path = config_path(path)?;
    let config = Config::load(&path)?;
    let format = match log_format {
        Some(LogFormatArg::Text) => LogFormat::Text,
        Some(LogFormatArg::Json) => LogFormat::Json,
        None => config.log.format,
    };
    // The final flush waits at most the shutdown grace for a stdout nobody reads, then gives up:
    // a blocked log must not keep the process from exiting.
    let _log = tokengate::logging::init(format, &config.log.level, config.server.shutdown_grace)
        .context("cannot start the log writer thread")?;
    tokengate::server::open_files::raise_limit(&config);
    // One worker: a current-thread runtime does the same work without the multi-thread
    // scheduler's hand-offs (the main thread is the worker; Argon2 runs on its own threads).
    let mut runtime = match config.server.worker_threads {
        Some(1) => tokio::runtime::Builder::new_current_thread(),
        Some(n) => {
            let mut b = tokio::runtime::Builder::new_multi_thread();
            b.worker_threads(n);
            b
        }
        None => tokio::runtime::Builder::new_multi_thread(),
    };
    let runtime = runtime.enable_all().build().context("cannot start the tokio runtime")?;
    runtime.block_on(async move {
        let gateway = Gateway::new(config, Arc::new(SystemClock))?;
        // Handlers before the listening line: a signal right after it must be handled, not kill.
        let mut signals = Signals::install()?;
        let running = gateway.start().await?;
        while let Signal::Reload = signals.next().await {
            reload(&running, &path);
        }
        tracing::info!("shutdown signal received; draining");
        running.shutdown().await;
        Ok(())
    })
}

/// Re-reads the config file and applies it whole, or changes nothing and logs every problem the
/// way `tokengate check` prints them.
fn reload(running: &tokengate::RunningGateway, path: &std::path::Path) {
    tracing::info!(config = %path.display(), "SIGHUP: reloading the config");
    let config = match Config::load(path) {
        Ok(c) => c,
        Err(e) => {
            for problem in &e.problems {
                tracing::error!(config = %e.source_name, "{problem}");
            }
            tracing::error!(
                config = %e.source_name,
                errors = e.problems.len(),
                "config reload refused; the running config is unchanged"
            );
            running.reload_refused();
            return;
        }
    };
    if let Err(e) = running.reload(config) {
        tracing::error!(error = %format!("{e:#}"), "config reload failed; the running config is unchanged");
    }
}

enum Signal {
    Reload,
    Stop,
}

/// SIGTERM and SIGINT stop the gateway (after draining); SIGHUP reloads its config.
struct Signals {
    term: tokio::signal::unix::Signal,
    int: tokio::signal::unix::Signal,
    hup: tokio::signal::unix::Signal,
}

impl Signals {
    fn install() -> anyhow::Result<Signals> {
        use tokio::signal::unix::{SignalKind, signal};
        Ok(Signals {
            term: signal(SignalKind::terminate()).context("cannot install the SIGTERM handler")?,
            int: signal(SignalKind::interrupt()).context("cannot install the SIGINT handler")?,
            hup: signal(SignalKind::hangup()).context("cannot install the SIGHUP handler")?,
        })
    }

    async fn next(&mut self) -> Signal {
        tokio::select! {
            _ = self.term.recv() => Signal::Stop,
            _ = self.int.recv() => Signal::Stop,
            _ = self.hup.recv() => Signal::Reload,
        }
    }
}

fn hash_password() -> anyhow::Result<()> {
    let password = if std::io::stdin().is_terminal() {
        rpassword::prompt_password("password: ").context("cannot read the password")?
    } else {
        let mut s = String::new();
        std::io::stdin()
            .read_to_string(&mut s)
            .context("cannot read the password from stdin")?;
        s.strip_suffix('\n')
            .map(|s| s.strip_suffix('\r').unwrap_or(s))
            .unwrap_or(&s)
            .to_owned()
    };
    if password.is_empty() {
        anyhow::bail!("the password is empty");
    }
    let phc = tokengate::oauth::users::hash_password(&password).map_err(|e| anyhow::anyhow!("cannot hash: {e}"))?;
    println!("{phc}");
    Ok(())
}
