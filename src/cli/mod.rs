//! The `tokenvault` command line: parse, dispatch, and map errors to exit codes once.
//!
//! Owns: the clap definitions, [`run`] and [`CliError`] with its exit codes. Subcommands live in
//! `serve`, `keys` and `client`. Secrets are never taken from argv: the secret to seal comes
//! from stdin or a file, credentials and passphrases from environment variables or files.
//!
//! Exit codes: 0 success, 1 internal or I/O error, 2 usage error, 3 not found, 4
//! unauthenticated or permission denied (a TLS certificate refused by either side included), 5
//! invalid input, 6 failed precondition or conflict (revoked, expired, exists, stale version,
//! locked data directory), 7 daemon unavailable, 8 a limit was hit (RESOURCE_EXHAUSTED: rate
//! limit, concurrency, or a size cap; the message says which; a rate limit is worth retrying
//! after a pause).

mod admin;
mod attack;
mod bench;
mod client;
mod keys;
mod serve;
mod store;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Args, Parser, Subcommand};
use thiserror::Error;

/// What `--version` prints: a FIPS build says so.
#[cfg(feature = "fips")]
const VERSION: &str = concat!(
    env!("CARGO_PKG_VERSION"),
    " (FIPS: cryptography on the aws-lc FIPS 140-3 module)"
);
#[cfg(not(feature = "fips"))]
const VERSION: &str = env!("CARGO_PKG_VERSION");

/// Command-line interface of the tokenvault daemon and its clients.
#[derive(Debug, Parser)]
#[command(name = "tokenvault", version = VERSION, about = "An encrypted vault for OAuth tokens", long_about = None)]
pub struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run the daemon (gRPC services Ingest, Broker, Admin).
    Serve(serve::ServeArgs),
    /// Manage key versions offline (the daemon must be stopped).
    #[command(subcommand)]
    Keys(keys::KeysCommand),
    /// Seal a secret with the vault's public key and store it (web tier; ingest credential).
    Seal(client::SealArgs),
    /// Fetch and decrypt a secret (worker credential); the secret goes to stdout.
    Get(client::GetArgs),
    /// Call the record's provider through the daemon, which injects the credential (worker
    /// credential). The response body goes to stdout, the status line to stderr.
    Proxy(client::ProxyArgs),
    /// Mint or revoke downscoped Proxy grants (worker credential with `issue_grants`).
    #[command(subcommand)]
    Grant(client::GrantCommand),
    /// Revoke a record so it is never handed out again (admin credential).
    Revoke(client::IdArgs),
    /// Irrecoverably delete a record (admin credential).
    Delete(client::IdArgs),
    /// Key lifecycle on the running daemon: rotate, rewrap, retire, destroy (admin credential).
    #[command(subcommand)]
    Admin(admin::AdminCommand),
    /// Whole-store operations: copy between engines, back up a running daemon's RocksDB.
    #[command(subcommand)]
    Store(store::StoreCommand),
    /// Print a shell completion script (e.g. `tokenvault completions bash >
    /// /etc/bash_completion.d/tokenvault`).
    Completions {
        /// The shell.
        shell: clap_complete::Shell,
    },
    /// Print the manual page (roff), e.g. `tokenvault man > /usr/share/man/man1/tokenvault.1`.
    Man,
}

/// Where the daemon's data lives, for commands that open it directly.
#[derive(Debug, Args)]
pub(crate) struct Location {
    /// Config file of the daemon whose store and keys to use.
    #[arg(long, short = 'c', env = "TOKENVAULT_CONFIG", conflicts_with = "dev")]
    config: Option<PathBuf>,
    /// Use the development layout (./data and ./keys/dev under the working directory).
    #[arg(long)]
    dev: bool,
}

/// Why a command failed; each variant has an exit code.
#[derive(Debug, Error)]
#[non_exhaustive]
pub enum CliError {
    /// Bad input: file, key or argument.
    #[error("{0}")]
    Input(String),
    /// Something does not exist.
    #[error("{0}")]
    NotFound(String),
    /// The operation conflicts with current state.
    #[error("{0}")]
    Precondition(String),
    /// Credentials missing or refused.
    #[error("{0}")]
    Auth(String),
    /// The daemon could not be reached.
    #[error("{0}")]
    Unavailable(String),
    /// A limit was hit (RESOURCE_EXHAUSTED): rate, concurrency or size.
    #[error("{0}")]
    Limited(String),
    /// Anything else.
    #[error("{0}")]
    Internal(String),
}

impl CliError {
    /// The same error, its message prefixed with `context: `.
    pub(crate) fn with_prefix(self, context: &str) -> Self {
        let p = |m: String| format!("{context}: {m}");
        match self {
            CliError::Input(m) => CliError::Input(p(m)),
            CliError::NotFound(m) => CliError::NotFound(p(m)),
            CliError::Precondition(m) => CliError::Precondition(p(m)),
            CliError::Auth(m) => CliError::Auth(p(m)),
            CliError::Unavailable(m) => CliError::Unavailable(p(m)),
            CliError::Limited(m) => CliError::Limited(p(m)),
            CliError::Internal(m) => CliError::Internal(p(m)),
        }
    }

    /// The process exit code.
    pub fn exit_code(&self) -> u8 {
        match self {
            CliError::Internal(_) => 1,
            CliError::NotFound(_) => 3,
            CliError::Auth(_) => 4,
            CliError::Input(_) => 5,
            CliError::Precondition(_) => 6,
            CliError::Unavailable(_) => 7,
            CliError::Limited(_) => 8,
        }
    }
}

/// An error and its causes on one line (tonic's transport errors say little at the top).
pub(crate) fn describe_error(e: &(dyn std::error::Error + 'static)) -> String {
    let mut text = e.to_string();
    let mut next = e.source();
    while let Some(cause) = next {
        let t = cause.to_string();
        if !text.contains(&t) {
            text.push_str(": ");
            text.push_str(&t);
        }
        next = cause.source();
    }
    text
}

/// The TLS refusal inside a transport error, if that is what failed: the daemon's certificate
/// not accepted here, or ours refused there (an alert). Both are exit 4, with the fix named.
pub(crate) fn tls_refusal(e: &(dyn std::error::Error + 'static)) -> Option<CliError> {
    let mut next = Some(e);
    while let Some(err) = next {
        // io::Error::source skips the error it wraps, so look inside it explicitly.
        let inner = err
            .downcast_ref::<std::io::Error>()
            .and_then(|io| io.get_ref())
            .map(|i| i as &(dyn std::error::Error + 'static));
        for candidate in [Some(err), inner].into_iter().flatten() {
            match candidate.downcast_ref::<rustls::Error>() {
                Some(rustls::Error::InvalidCertificate(why)) => {
                    return Some(CliError::Auth(format!(
                        "the daemon's TLS certificate was not accepted ({why:?}); check \
                         --ca-file (the CA that signed it), --server-name and its validity dates"
                    )));
                }
                Some(rustls::Error::AlertReceived(alert)) => {
                    return Some(CliError::Auth(format!(
                        "the daemon refused the TLS connection (alert {alert:?}); check that \
                         --client-cert is valid, unexpired and signed by the daemon's \
                         client_ca_file"
                    )));
                }
                Some(other) => {
                    return Some(CliError::Unavailable(format!("TLS failed: {other}")));
                }
                None => {}
            }
        }
        next = err.source();
    }
    None
}

/// The current version an `ABORTED` for a stale `expected_version` carries (its
/// `google.rpc.ErrorInfo`), read from the structured detail, never from the message.
pub(crate) fn stale_version(s: &tonic::Status) -> Option<u64> {
    use tonic_types::StatusExt as _;
    let info = s.get_details_error_info()?;
    (info.reason == crate::server::status::STALE_VERSION)
        .then(|| info.metadata.get("current_version")?.parse().ok())
        .flatten()
}

impl From<tonic::Status> for CliError {
    fn from(s: tonic::Status) -> Self {
        use tonic::Code;
        // With TLS 1.3 a refused client certificate surfaces at the first call, not at connect.
        if let Some(tls) = tls_refusal(&s) {
            return tls;
        }
        // A transport failure's cause is in its source chain, not in its message.
        let mut msg = match std::error::Error::source(&s) {
            Some(cause) => format!("{:?}: {}: {}", s.code(), s.message(), describe_error(cause)),
            None => format!("{:?}: {}", s.code(), s.message()),
        };
        if let Some(current) = stale_version(&s) {
            msg.push_str(&format!(
                " (current version {current}; pass --expected-version {current} to replace it)"
            ));
        }
        match s.code() {
            Code::NotFound => CliError::NotFound(msg),
            Code::Unauthenticated | Code::PermissionDenied => CliError::Auth(msg),
            Code::ResourceExhausted => CliError::Limited(msg),
            Code::InvalidArgument | Code::OutOfRange => CliError::Input(msg),
            Code::FailedPrecondition | Code::AlreadyExists | Code::Aborted => {
                CliError::Precondition(msg)
            }
            // Transport failures (connection reset, daemon killed) reach clients as Unknown or
            // Cancelled: the daemon itself never answers with those codes.
            Code::Unavailable | Code::DeadlineExceeded | Code::Unknown | Code::Cancelled => {
                CliError::Unavailable(msg)
            }
            _ => CliError::Internal(msg),
        }
    }
}

impl From<crate::keys::KeyError> for CliError {
    fn from(e: crate::keys::KeyError) -> Self {
        use crate::keys::KeyError;
        match e.cause() {
            KeyError::At { .. } => CliError::Internal(e.to_string()),
            KeyError::AlreadyInitialized(_)
            | KeyError::Duplicate(_)
            | KeyError::NoActiveKey
            | KeyError::VersionTaken(_) => CliError::Precondition(e.to_string()),
            KeyError::UnknownVersion(_) => CliError::NotFound(e.to_string()),
            // A wrong PIN, a missing module, no such token: the configuration to fix.
            KeyError::Token(_) | KeyError::NotInFipsBuild => CliError::Precondition(e.to_string()),
            KeyError::TokenUnavailable(_) => CliError::Unavailable(e.to_string()),
            KeyError::Io { .. } | KeyError::Generation | KeyError::Store(_) => {
                CliError::Internal(e.to_string())
            }
            KeyError::UnexpectedPem { .. }
            | KeyError::NotPem
            | KeyError::Malformed { .. }
            | KeyError::UnsupportedSize { .. }
            | KeyError::PassphraseRequired(_)
            | KeyError::PemMissingEnd { .. }
            | KeyError::NotRsa { .. }
            | KeyError::WrongPassphrase
            | KeyError::Mismatch { .. }
            | KeyError::InsecurePermissions { .. } => CliError::Input(e.to_string()),
        }
    }
}

impl From<crate::store::StoreError> for CliError {
    fn from(e: crate::store::StoreError) -> Self {
        use crate::store::StoreError;
        match e {
            StoreError::Locked(_) => CliError::Precondition(format!("{e}; stop the daemon first")),
            StoreError::NotFound(_) => CliError::NotFound(e.to_string()),
            StoreError::AlreadyExists(_)
            | StoreError::VersionMismatch { .. }
            | StoreError::Conflict(_)
            | StoreError::KeyNotAccepted { .. }
            | StoreError::KeyInUse { .. } => CliError::Precondition(e.to_string()),
            StoreError::DuplicateInBatch(_) => CliError::Input(e.to_string()),
            StoreError::Unavailable(_) => CliError::Unavailable(e.to_string()),
            StoreError::SchemaTooNew { .. } => CliError::Precondition(e.to_string()),
            StoreError::Corrupt(_) | StoreError::Engine(_) | StoreError::Unaudited => {
                CliError::Internal(e.to_string())
            }
        }
    }
}

impl From<crate::rotation::RotationError> for CliError {
    fn from(e: crate::rotation::RotationError) -> Self {
        use crate::rotation::RotationError;
        match e {
            RotationError::Key(k) => k.into(),
            RotationError::Store(s) => s.into(),
            RotationError::UnknownVersion(_) => CliError::NotFound(e.to_string()),
            RotationError::WrongState { .. }
            | RotationError::RecordsRemain { .. }
            | RotationError::DestructionDue { .. }
            | RotationError::NotDue { .. } => CliError::Precondition(e.to_string()),
        }
    }
}

impl From<crate::config::ConfigError> for CliError {
    fn from(e: crate::config::ConfigError) -> Self {
        CliError::Input(e.to_string())
    }
}

/// Parses `std::env::args`, runs the command and returns the exit code.
pub fn main() -> ExitCode {
    let cli = Cli::parse();
    exit_with(|| run(cli))
}

/// The `tokenvault-bench` load generator, a binary of its own so that the daemon's binary does
/// not carry it: parses `std::env::args`, runs it and returns the exit code (the same codes as
/// `tokenvault`'s).
pub fn bench_main() -> ExitCode {
    let cli = bench::BenchCli::parse();
    exit_with(|| runtime()?.block_on(bench::run(cli.args)))
}

/// Runs `command` and turns its outcome into the exit code, the error on stderr.
fn exit_with(command: impl FnOnce() -> Result<(), CliError> + std::panic::UnwindSafe) -> ExitCode {
    // A reader that goes away early (`tokenvault ... | head -1`) makes `println!` fail with
    // EPIPE, which it reports by panicking. End quietly instead, with the status a shell gives
    // a process killed by SIGPIPE, as other command-line tools do; every other panic is
    // reported as before.
    let default_hook = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        if !is_broken_pipe(info.payload()) {
            default_hook(info);
        }
    }));
    match std::panic::catch_unwind(command) {
        Ok(Ok(())) => ExitCode::SUCCESS,
        Ok(Err(e)) => {
            eprintln!("error: {e}");
            ExitCode::from(e.exit_code())
        }
        Err(payload) if is_broken_pipe(payload.as_ref()) => ExitCode::from(141),
        Err(payload) => std::panic::resume_unwind(payload),
    }
}

/// The async runtime of a command that needs one.
fn runtime() -> Result<tokio::runtime::Runtime, CliError> {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .map_err(|e| CliError::Internal(format!("starting the async runtime: {e}")))
}

/// Whether a panic is `print!`'s report of a closed standard output.
fn is_broken_pipe(payload: &(dyn std::any::Any + Send)) -> bool {
    let message = payload
        .downcast_ref::<String>()
        .map(String::as_str)
        .or_else(|| payload.downcast_ref::<&str>().copied())
        .unwrap_or_default();
    message.starts_with("failed printing to std") && message.contains("Broken pipe")
}

/// Runs a parsed command.
pub fn run(cli: Cli) -> Result<(), CliError> {
    match cli.command {
        Command::Serve(args) => serve::run(args, runtime()?),
        Command::Keys(cmd) => keys::run(cmd),
        Command::Seal(args) => runtime()?.block_on(client::seal(args)),
        Command::Get(args) => runtime()?.block_on(client::get(args)),
        Command::Proxy(args) => runtime()?.block_on(client::proxy(args)),
        Command::Grant(cmd) => runtime()?.block_on(client::grant(cmd)),
        Command::Revoke(args) => runtime()?.block_on(client::revoke(args)),
        Command::Delete(args) => runtime()?.block_on(client::delete(args)),
        // Export and import open the store directly (like `store copy`), outside a runtime.
        Command::Admin(admin::AdminCommand::Export(args)) => store::export(&args),
        Command::Admin(admin::AdminCommand::Import(args)) => store::import(&args),
        Command::Admin(cmd) => runtime()?.block_on(admin::run(cmd)),
        Command::Store(cmd) => store::run(cmd),
        // Both are rendered in memory, then printed with `print!`, so a reader that goes away
        // ends the output like every other command's (exit 141), not with a panic.
        Command::Completions { shell } => {
            let mut command = <Cli as clap::CommandFactory>::command();
            let mut script = Vec::new();
            clap_complete::generate(shell, &mut command, "tokenvault", &mut script);
            print!("{}", String::from_utf8_lossy(&script));
            Ok(())
        }
        Command::Man => {
            let mut page = Vec::new();
            clap_mangen::Man::new(<Cli as clap::CommandFactory>::command())
                .render(&mut page)
                .map_err(|e| CliError::Internal(format!("rendering the manual page: {e}")))?;
            print!("{}", String::from_utf8_lossy(&page));
            Ok(())
        }
    }
}
