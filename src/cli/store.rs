//! `tokenvault store`: whole-store operations run beside (or instead of) a daemon.

use std::os::unix::fs::OpenOptionsExt as _;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use clap::{Args, Subcommand};
use indicatif::{ProgressBar, ProgressStyle};

use super::CliError;
use crate::store::TokenStore;
use crate::store::copy::{self, CopyError, CopyOptions, Phase, Progress};

#[derive(Debug, Subcommand)]
pub(crate) enum StoreCommand {
    /// Copy a store's whole state (key registry, records, grants, audit chains) as it is into
    /// an empty store, then verify it; resumable. Also the backup of a running daemon's
    /// RocksDB directory.
    Copy(CopyArgs),
}

#[derive(Debug, Args)]
pub(crate) struct CopyArgs {
    /// Source: rocksdb:PATH or postgres://USER@HOST:PORT/DATABASE, read as one consistent
    /// snapshot even while daemons run on it.
    #[arg(long)]
    from: String,
    /// Target, empty or holding an interrupted copy from the same source: rocksdb:PATH or
    /// postgres://USER@HOST:PORT/DATABASE.
    #[arg(long)]
    to: String,
    /// File with the source database's password (or set TOKENVAULT_STORE_PASSWORD).
    #[arg(long)]
    from_password_file: Option<PathBuf>,
    /// File with the target database's password (or set TOKENVAULT_STORE_PASSWORD).
    #[arg(long)]
    to_password_file: Option<PathBuf>,
    /// CA certificates of the source database's TLS certificate (required off loopback).
    #[arg(long)]
    from_ca_file: Option<PathBuf>,
    /// CA certificates of the target database's TLS certificate (required off loopback).
    #[arg(long)]
    to_ca_file: Option<PathBuf>,
}

#[derive(Debug, Args)]
pub(crate) struct ExportArgs {
    /// The store: rocksdb:PATH or postgres://USER@HOST:PORT/DATABASE, read as one consistent
    /// snapshot even while daemons run on it.
    #[arg(long)]
    from: String,
    /// The export file to create (refused if it exists); written 0600.
    #[arg(long)]
    out: PathBuf,
    /// File with the database's password (or set TOKENVAULT_STORE_PASSWORD).
    #[arg(long)]
    from_password_file: Option<PathBuf>,
    /// CA certificates of the database's TLS certificate (required off loopback).
    #[arg(long)]
    from_ca_file: Option<PathBuf>,
}

#[derive(Debug, Args)]
pub(crate) struct ImportArgs {
    /// The export file.
    #[arg(long = "in")]
    input: PathBuf,
    /// The store to load it into (no daemon running on a RocksDB directory): rocksdb:PATH or
    /// postgres://USER@HOST:PORT/DATABASE.
    #[arg(long)]
    to: String,
    /// File with the database's password (or set TOKENVAULT_STORE_PASSWORD).
    #[arg(long)]
    to_password_file: Option<PathBuf>,
    /// CA certificates of the database's TLS certificate (required off loopback).
    #[arg(long)]
    to_ca_file: Option<PathBuf>,
}

fn progress_bar(template: &str) -> ProgressBar {
    let bar = if std::io::IsTerminal::is_terminal(&std::io::stderr()) {
        ProgressBar::new_spinner()
    } else {
        ProgressBar::hidden()
    };
    bar.set_style(ProgressStyle::with_template(template).expect("static template"));
    bar
}

fn export_error(e: crate::store::export::ExportError, file: &Path) -> CliError {
    use crate::store::export::ExportError;
    match e {
        ExportError::Store(s) => CliError::from(s),
        e @ ExportError::File { .. } => CliError::Input(e.to_string()),
        e @ ExportError::Malformed { .. } => CliError::Input(format!("{}: {e}", file.display())),
        e @ (ExportError::KeyMismatch { .. }
        | ExportError::Exists(_)
        | ExportError::UnfinishedCopy) => CliError::Precondition(e.to_string()),
    }
}

fn print_summary(verb: &str, s: &crate::store::export::ExportSummary) {
    println!(
        "{verb} {} record(s) and {} key version(s)",
        s.record_count(),
        s.keys
    );
    for (v, d) in &s.records {
        println!(
            "  {:<28} {:>10}  sha256 {}",
            format!("records under key v{v}"),
            d.count,
            hex::encode(d.sha256)
        );
    }
}

pub(crate) fn export(args: &ExportArgs) -> Result<(), CliError> {
    let from = open(
        "--from",
        &args.from,
        args.from_password_file.clone(),
        args.from_ca_file.clone(),
        true,
    )?;
    let file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&args.out)
        .map_err(|e| CliError::Input(format!("--out {}: {e}", args.out.display())))?;
    let mut out = std::io::BufWriter::new(file);
    let bar = progress_bar("export {pos} records  {per_sec}");
    let result = crate::store::export::export(
        &*from.store,
        &from.name,
        &mut out,
        &args.out.display().to_string(),
        crate::unix_now(),
        &mut |n| bar.set_position(n),
    )
    .and_then(|s| {
        let file = out
            .into_inner()
            .map_err(|e| crate::store::export::ExportError::File {
                path: args.out.display().to_string(),
                message: e.to_string(),
            })?;
        file.sync_all()
            .map_err(|e| crate::store::export::ExportError::File {
                path: args.out.display().to_string(),
                message: e.to_string(),
            })?;
        Ok(s)
    });
    bar.finish_and_clear();
    match result {
        Ok(s) => {
            print_summary(
                &format!("exported {} to {}:", from.name, args.out.display()),
                &s,
            );
            Ok(())
        }
        Err(e) => {
            // A partial export must not pass for a whole one.
            let _ = std::fs::remove_file(&args.out);
            Err(export_error(e, &args.out))
        }
    }
}

pub(crate) fn import(args: &ImportArgs) -> Result<(), CliError> {
    let path = args.input.clone();
    std::fs::metadata(&path)
        .map_err(|e| CliError::Input(format!("--in {}: {e}", path.display())))?;
    let to = open(
        "--to",
        &args.to,
        args.to_password_file.clone(),
        args.to_ca_file.clone(),
        false,
    )?;
    let bar = progress_bar("import {pos} records  {per_sec}");
    let mut reopen = || -> Result<Box<dyn std::io::BufRead>, crate::store::export::ExportError> {
        let f =
            std::fs::File::open(&path).map_err(|e| crate::store::export::ExportError::File {
                path: path.display().to_string(),
                message: e.to_string(),
            })?;
        Ok(Box::new(std::io::BufReader::new(f)))
    };
    let result =
        crate::store::export::import(&*to.store, &mut reopen, &mut |n| bar.set_position(n));
    bar.finish_and_clear();
    let s = result.map_err(|e| export_error(e, &path))?;
    print_summary(&format!("imported into {}:", to.name), &s);
    Ok(())
}

/// An opened side of a copy, and the name an interrupted copy is resumed under.
struct Side {
    store: Arc<dyn TokenStore>,
    name: String,
    /// A RocksDB snapshot's scratch directory, removed when the copy ends.
    _scratch: Option<tempfile::TempDir>,
}

pub(crate) fn run(cmd: StoreCommand) -> Result<(), CliError> {
    match cmd {
        StoreCommand::Copy(args) => copy_stores(&args),
    }
}

fn copy_stores(args: &CopyArgs) -> Result<(), CliError> {
    let from = open(
        "--from",
        &args.from,
        args.from_password_file.clone(),
        args.from_ca_file.clone(),
        true,
    )?;
    let to = open(
        "--to",
        &args.to,
        args.to_password_file.clone(),
        args.to_ca_file.clone(),
        false,
    )?;
    if from.name == to.name {
        return Err(CliError::Input(
            "--from and --to name the same store".into(),
        ));
    }
    let bar = if std::io::IsTerminal::is_terminal(&std::io::stderr()) {
        ProgressBar::new(0)
    } else {
        ProgressBar::hidden()
    };
    let mut shown = None;
    let mut on_progress = |p: &Progress| {
        if shown != Some(p.phase) {
            shown = Some(p.phase);
            let template = match p.total {
                Some(_) => "{msg:8} [{bar:40}] {pos}/{len}  {per_sec}  ETA {eta}",
                None => "{msg:8} {pos}  {per_sec}",
            };
            bar.set_style(
                ProgressStyle::with_template(template)
                    .expect("static template")
                    .progress_chars("=> "),
            );
            bar.set_message(phase_name(p.phase));
            bar.set_length(p.total.unwrap_or(0));
        }
        bar.set_position(p.done);
    };
    let options = CopyOptions {
        source_name: from.name.clone(),
        stop_after_pages: None,
    };
    let report = copy::copy(&*from.store, &*to.store, &options, &mut on_progress)
        .map_err(|e| copy_error(e, &to.name));
    bar.finish_and_clear();
    let report = report?;
    let s = &report.summary;
    println!(
        "copied {} to {}{}",
        from.name,
        to.name,
        if report.resumed {
            " (resumed an interrupted copy)"
        } else {
            ""
        }
    );
    let line = |what: String, d: &copy::Digest32| {
        println!(
            "  {what:<28} {:>10}  sha256 {}",
            d.count,
            hex::encode(d.sha256)
        );
    };
    if let Some(d) = &s.registry {
        line("key versions".into(), d);
    }
    for (v, d) in &s.records {
        line(format!("records under key v{v}"), d);
    }
    if let Some(d) = &s.meta {
        line("metadata entries".into(), d);
    }
    for (c, d) in &s.audit {
        line(format!("audit events, chain {c:?}"), d);
    }
    println!("verified: the target holds exactly what was read from the source");
    Ok(())
}

fn phase_name(p: Phase) -> &'static str {
    match p {
        Phase::Keys => "keys",
        Phase::Meta => "metadata",
        Phase::Records => "records",
        Phase::Audit => "audit",
        Phase::Verify => "verify",
    }
}

fn copy_error(e: CopyError, target: &str) -> CliError {
    match e {
        CopyError::Source(s) => {
            let c = CliError::from(s);
            c.with_prefix("reading the source")
        }
        CopyError::Target(s) => CliError::from(s).with_prefix("writing the target"),
        e @ (CopyError::TargetNotEmpty
        | CopyError::OtherCopy(_)
        | CopyError::SourceIncomplete
        | CopyError::BadCursor) => CliError::Precondition(format!("{target}: {e}")),
        e @ (CopyError::Mismatch(_) | CopyError::Interrupted(_)) => {
            CliError::Internal(e.to_string())
        }
    }
}

/// Opens `spec`: the source as a snapshot (never written), the target for writing.
fn open(
    flag: &str,
    spec: &str,
    password_file: Option<PathBuf>,
    ca_file: Option<PathBuf>,
    source: bool,
) -> Result<Side, CliError> {
    let input = |m: String| CliError::Input(format!("{flag}: {m}"));
    if let Some(path) = spec.strip_prefix("rocksdb:") {
        if password_file.is_some() || ca_file.is_some() {
            return Err(input(
                "a password or CA file applies to a database, not to rocksdb:PATH".into(),
            ));
        }
        if path.is_empty() {
            return Err(input(
                "rocksdb: needs a directory, e.g. rocksdb:/var/lib/tokenvault".into(),
            ));
        }
        let path = Path::new(path);
        if source {
            let canonical = path
                .canonicalize()
                .map_err(|e| input(format!("{}: {e}", path.display())))?;
            let scratch = tempfile::Builder::new()
                .prefix("tokenvault-copy-")
                .tempdir()
                .map_err(|e| CliError::Internal(format!("a scratch directory: {e}")))?;
            let store = crate::store::RocksStore::open_snapshot(&canonical, scratch.path())
                .map_err(|e| CliError::from(e).with_prefix(flag))?;
            return Ok(Side {
                store: Arc::new(store),
                name: format!("rocksdb:{}", canonical.display()),
                _scratch: Some(scratch),
            });
        }
        std::fs::create_dir_all(path).map_err(|e| input(format!("{}: {e}", path.display())))?;
        let canonical = path
            .canonicalize()
            .map_err(|e| input(format!("{}: {e}", path.display())))?;
        let store = crate::store::RocksStore::open(&canonical, 64 << 20)
            .map_err(|e| CliError::from(e).with_prefix(flag))?;
        return Ok(Side {
            store: Arc::new(store),
            name: format!("rocksdb:{}", canonical.display()),
            _scratch: None,
        });
    }
    if spec.starts_with("postgres://") || spec.starts_with("postgresql://") {
        let pg =
            crate::config::database_from_url(spec, password_file, ca_file, &crate::config::Env)
                .map_err(|e| input(e.to_string()))?;
        let name = database_name(&pg);
        let store = crate::vault::open_postgres(&pg).map_err(|e| match e {
            crate::vault::OpenError::Store(s) => CliError::from(s).with_prefix(flag),
            other => input(other.to_string()),
        })?;
        // A live cluster's source is read as of one instant, as a RocksDB source is.
        let store = if source {
            store
                .into_snapshot()
                .map_err(|e| CliError::from(e).with_prefix(flag))?
        } else {
            store
        };
        return Ok(Side {
            store: Arc::new(store),
            name,
            _scratch: None,
        });
    }
    Err(input(
        "must be rocksdb:PATH or postgres://USER@HOST:PORT/DATABASE".into(),
    ))
}

/// The database's address without any secret, naming it in messages and the copy cursor.
fn database_name(pg: &crate::config::PostgresConfig) -> String {
    let c = &pg.connection;
    let host = c
        .get_hosts()
        .iter()
        .map(|h| match h {
            tokio_postgres::config::Host::Tcp(name) => name.clone(),
            tokio_postgres::config::Host::Unix(path) => path.display().to_string(),
        })
        .collect::<Vec<_>>()
        .join(",");
    let port = c
        .get_ports()
        .iter()
        .map(u16::to_string)
        .collect::<Vec<_>>()
        .join(",");
    format!(
        "postgres://{}@{host}:{port}/{}",
        c.get_user().unwrap_or_default(),
        c.get_dbname().unwrap_or_default()
    )
}
