//! `tokenvault keys`: offline key management on a stopped daemon's store and key directory.

use std::path::PathBuf;

use clap::Subcommand;
use zeroize::Zeroizing;

use super::{CliError, Location};
use crate::config::{Config, Env};
use crate::keys::keyring::KeyDir;
use crate::keys::{KeyInfo, PrivateKey};
use crate::secret::Passphrase;
use crate::store::TokenStore;

/// Env var with the passphrase of a key file being imported.
pub(crate) const ENV_IMPORT_PASSPHRASE: &str = "TOKENVAULT_IMPORT_PASSPHRASE";

/// The names `--algorithm` takes: those of [`crate::keys::Algorithm::GENERATED`].
pub(crate) const ALGORITHMS: [&str; 3] = ["rsa-2048", "rsa-3072", "x-wing"];

fn algorithm(name: Option<&str>) -> Result<Option<crate::keys::Algorithm>, CliError> {
    name.map(|n| {
        crate::keys::Algorithm::parse(n).ok_or_else(|| {
            CliError::Input(format!("--algorithm: one of {}", ALGORITHMS.join(", ")))
        })
    })
    .transpose()
}

/// Reads a private key file to import (`keys import --private`, `admin rotate
/// --import-private`), decrypting it with TOKENVAULT_IMPORT_PASSPHRASE or the passphrase file.
pub(crate) fn read_import_key(
    path: &std::path::Path,
    passphrase_file: Option<&std::path::Path>,
) -> Result<PrivateKey, CliError> {
    let read = |p: &std::path::Path| {
        std::fs::read_to_string(p)
            .map(Zeroizing::new)
            .map_err(|e| CliError::Input(format!("{}: {e}", p.display())))
    };
    let pem = read(path)?;
    let passphrase = match (std::env::var(ENV_IMPORT_PASSPHRASE).ok(), passphrase_file) {
        (Some(p), _) => Some(Passphrase::new(p)),
        (None, Some(f)) => Some(Passphrase::new(read(f)?.to_string())),
        (None, None) => None,
    };
    PrivateKey::from_pem(&pem, passphrase.as_ref()).map_err(|e| {
        e.with_passphrase_hint(crate::keys::passphrase_hint::IMPORT)
            .into()
    })
}

#[derive(Debug, Subcommand)]
pub(crate) enum KeysCommand {
    /// Create key version 1 (a fresh RSA-2048 key unless --algorithm says otherwise) in an
    /// empty keyring.
    Init {
        #[command(flatten)]
        at: Location,
        /// rsa-2048 (the default), rsa-3072, or x-wing (envelope v2: data keys sealed with HPKE
        /// to an X-Wing key, post-quantum; docs/ENVELOPE.md).
        #[arg(long, value_parser = ALGORITHMS)]
        algorithm: Option<String>,
    },
    /// Add a fresh version and make it active; the previous one becomes decrypt-only.
    Rotate {
        #[command(flatten)]
        at: Location,
        /// rsa-2048, rsa-3072 or x-wing. Default: the active version's (X-Wing stays X-Wing; RSA
        /// keeps its size, RSA-2048 in a PKCS#11 token).
        #[arg(long, value_parser = ALGORITHMS)]
        algorithm: Option<String>,
    },
    /// List key versions with state and fingerprint.
    List {
        /// One JSON object per version and line: {"version", "state", "algorithm",
        /// "fingerprint", "created_at", "updated_at"}.
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        at: Location,
    },
    /// Print a version's public key (SPKI PEM) for web tiers; the active one by default.
    ExportPublic {
        #[command(flatten)]
        at: Location,
        /// Key version to export.
        #[arg(long)]
        version: Option<u32>,
    },
    /// Import an RSA private key (PKCS#8, encrypted PKCS#8 or PKCS#1 PEM, e.g. from
    /// `openssl genpkey`) as the new active version.
    Import {
        #[command(flatten)]
        at: Location,
        /// The private key PEM file.
        #[arg(long)]
        private: PathBuf,
        /// File with the passphrase of an encrypted key file (or set
        /// TOKENVAULT_IMPORT_PASSPHRASE).
        #[arg(long)]
        import_passphrase_file: Option<PathBuf>,
    },
    /// Move a key directory's private keys and audit key into the shared database named by
    /// --config, encrypted with its passphrase: the step after `store copy` from a RocksDB
    /// daemon, so daemons on the database open what that daemon sealed.
    Share {
        #[command(flatten)]
        at: Location,
        /// The RocksDB daemon's key directory (its `key_dir`).
        #[arg(long)]
        from_key_dir: PathBuf,
        /// File with the passphrase of that directory's key files, if they are encrypted (or
        /// set TOKENVAULT_IMPORT_PASSPHRASE).
        #[arg(long)]
        import_passphrase_file: Option<PathBuf>,
    },
    /// Write the shared database's private keys and audit key out to a key directory: the
    /// inverse of `share`, the step after `store copy` from the database to RocksDB, so a
    /// RocksDB daemon serves the copy. The key files are encrypted with the database's
    /// passphrase (the RocksDB daemon then needs the same one) unless --unencrypted.
    ExportFiles {
        #[command(flatten)]
        at: Location,
        /// The RocksDB daemon's key directory (its `key_dir`), created if missing.
        #[arg(long)]
        to_key_dir: PathBuf,
        /// Write the private keys unencrypted (0600), for a key directory without a passphrase.
        #[arg(long)]
        unencrypted: bool,
    },
}

fn open(at: &Location) -> Result<(std::sync::Arc<dyn TokenStore>, KeyDir, Config), CliError> {
    let config = match (&at.config, at.dev) {
        (Some(path), _) => Config::load(path, &Env)?,
        (None, true) => {
            let cwd = std::env::current_dir()
                .map_err(|e| CliError::Internal(format!("current directory: {e}")))?;
            Config::dev(&cwd, ([127, 0, 0, 1], 0).into(), vec![], &Env)?
        }
        (None, false) => {
            return Err(CliError::Input(
                "pass --config FILE, or --dev for the development layout".into(),
            ));
        }
    };
    if matches!(config.store, crate::config::StoreConfig::Rocks) {
        std::fs::create_dir_all(&config.data_dir)
            .map_err(|e| CliError::Internal(format!("{}: {e}", config.data_dir.display())))?;
    }
    let store = crate::vault::open_store(&config).map_err(open_error)?;
    let dir = crate::vault::key_dir(&config, &store).map_err(open_error)?;
    Ok((store, dir, config))
}

fn open_error(e: crate::vault::OpenError) -> CliError {
    match e {
        crate::vault::OpenError::Store(s) => CliError::from(s),
        e @ (crate::vault::OpenError::InstanceInUse(_)
        | crate::vault::OpenError::UnfinishedCopy) => CliError::Precondition(e.to_string()),
        other => CliError::Input(other.to_string()),
    }
}

fn describe(k: &KeyInfo) -> String {
    format!(
        "v{}  {:<12}  {}  created {}  {}",
        k.version,
        k.state.as_str(),
        k.id.to_hex(),
        k.created_at,
        algorithm_name(k)
    )
}

/// The version's algorithm (`rsa-2048`, `x-wing`, ...), from its registered public key.
fn algorithm_name(k: &KeyInfo) -> String {
    crate::keys::spki_algorithm(&k.spki_der)
        .map_or_else(|| "unknown".into(), |(a, _)| a.to_string())
}

/// The caller offline key changes are recorded under in the audit trail.
const OFFLINE_CALLER: &str = "keys-cli";

/// Adds a key version offline through the vault's audited key service, the same one the
/// daemon's `RotateKey` uses: the registry change and its audit event are one write, chained
/// after the daemon's events. `init` refuses a keyring that already has versions.
fn add_recorded(
    (store, dir, config): (std::sync::Arc<dyn TokenStore>, KeyDir, Config),
    key: NewVersion,
    init: bool,
    now: i64,
) -> Result<KeyInfo, CliError> {
    // On a shared database, the command appends to this config's audit chain: it holds the
    // instance name meanwhile, so it never runs beside the daemon that owns that chain.
    let shared = !matches!(config.store, crate::config::StoreConfig::Rocks);
    let instance = match &config.store {
        crate::config::StoreConfig::Postgres(pg) => pg.instance.clone(),
        _ => String::new(),
    };
    let owner = format!("{instance}/keys-cli-{}", std::process::id());
    if shared {
        crate::vault::Vault::claim_instance(&*store, &instance, &owner).map_err(open_error)?;
    }
    let result = add_recorded_claimed(&store, &dir, &config, key, init, now);
    if shared {
        let _ = store.release_lease(&crate::vault::instance_lease(&instance), &owner);
    }
    result
}

/// What an offline key change adds: an imported key, or a fresh one of an algorithm (the
/// active version's when not named).
enum NewVersion {
    Imported(PrivateKey),
    Generated(Option<crate::keys::Algorithm>),
}

fn add_recorded_claimed(
    store: &std::sync::Arc<dyn TokenStore>,
    dir: &KeyDir,
    config: &Config,
    key: NewVersion,
    init: bool,
    now: i64,
) -> Result<KeyInfo, CliError> {
    let auditor = crate::vault::auditor(config, store).map_err(open_error)?;
    let keys = crate::rotation::KeyService::new(&**store, dir, &auditor);
    let (action, detail) = match (init, &key) {
        (true, _) => ("InitKeys", "version 1, offline"),
        (false, NewVersion::Imported(_)) => ("RotateKey", "imported key, offline"),
        (false, NewVersion::Generated(_)) => ("RotateKey", "new version, offline"),
    };
    let draft = crate::audit::Draft::new(OFFLINE_CALLER, action).detail(detail);
    Ok(match (init, key) {
        (true, NewVersion::Generated(a)) => {
            keys.init(&draft, a.unwrap_or(crate::keys::Algorithm::Rsa(2048)), now)?
        }
        (true, NewVersion::Imported(_)) => {
            return Err(CliError::Internal("init imports no key".into()));
        }
        (false, NewVersion::Imported(key)) => keys.add_version(&draft, key, now)?,
        (false, NewVersion::Generated(a)) => keys.rotate(&draft, a, now)?,
    })
}

pub(crate) fn run(cmd: KeysCommand) -> Result<(), CliError> {
    let now = crate::unix_now();
    match cmd {
        KeysCommand::Init { at, algorithm: a } => {
            let a = algorithm(a.as_deref())?;
            let info = add_recorded(open(&at)?, NewVersion::Generated(a), true, now)?;
            println!("created {}", describe(&info));
        }
        KeysCommand::Rotate { at, algorithm: a } => {
            let a = algorithm(a.as_deref())?;
            let info = add_recorded(open(&at)?, NewVersion::Generated(a), false, now)?;
            println!("active {}", describe(&info));
        }
        KeysCommand::List { json, at } => {
            let (store, _, _) = open(&at)?;
            let keys = store.keys()?;
            if keys.is_empty() {
                return Err(CliError::NotFound(
                    "no key versions; run `tokenvault keys init`".into(),
                ));
            }
            for k in keys {
                let line = if json {
                    serde_json::json!({
                        "version": k.version,
                        "state": k.state.as_str(),
                        "algorithm": algorithm_name(&k),
                        "fingerprint": k.id.to_hex(),
                        "created_at": k.created_at,
                        "updated_at": k.updated_at,
                    })
                    .to_string()
                } else {
                    describe(&k)
                };
                println!("{line}");
            }
        }
        KeysCommand::ExportPublic { at, version } => {
            let (store, _, _) = open(&at)?;
            let keys = store.keys()?;
            let key = match version {
                Some(v) => keys.iter().find(|k| k.version == v),
                None => keys
                    .iter()
                    .find(|k| k.state == crate::keys::KeyState::Active),
            }
            .ok_or_else(|| match version {
                Some(v) => CliError::NotFound(format!("no key version {v}")),
                None => CliError::NotFound("no active key; run `tokenvault keys init`".into()),
            })?;
            let public = crate::keys::PublicKey::from_spki_der(&key.spki_der)?;
            print!("{}", public.to_pem());
        }
        KeysCommand::Import {
            at,
            private,
            import_passphrase_file,
        } => {
            // Validate before touching the store, so a bad file changes nothing.
            let key = read_import_key(&private, import_passphrase_file.as_deref())?;
            let info = add_recorded(open(&at)?, NewVersion::Imported(key), false, now)?;
            println!("imported as active {}", describe(&info));
        }
        KeysCommand::Share {
            at,
            from_key_dir,
            import_passphrase_file,
        } => share(&at, &from_key_dir, import_passphrase_file.as_deref())?,
        KeysCommand::ExportFiles {
            at,
            to_key_dir,
            unencrypted,
        } => export_files(&at, &to_key_dir, unencrypted)?,
    }
    Ok(())
}

/// `keys export-files`: every private key the registry still holds, read from the database and
/// checked against its registered fingerprint, and the audit key, written to `to`. Everything
/// is read and checked before the first file is written; a key file already in `to` is kept if
/// it holds the same key, and refused otherwise.
fn export_files(at: &Location, to: &std::path::Path, unencrypted: bool) -> Result<(), CliError> {
    let (store, shared, _) = open(at)?;
    let passphrase = shared_passphrase(&shared)?;
    let target = KeyDir::new(to, (!unencrypted).then(|| passphrase.clone()));
    let keys = store.keys()?;
    if keys.is_empty() {
        return Err(CliError::NotFound(
            "the database has no key registry; nothing to export".into(),
        ));
    }
    let mut writing = Vec::new();
    for k in &keys {
        if !shared.has_private(k.version) {
            if k.state.accepts_envelopes() {
                return Err(CliError::NotFound(format!(
                    "the database has no private key for v{}, which records may use",
                    k.version
                )));
            }
            continue;
        }
        let key = shared.read(k.version)?;
        if key.public_key().id() != k.id {
            return Err(CliError::Input(format!(
                "the database's private key v{} is not the registered one (fingerprint {}, registered {})",
                k.version,
                key.public_key().id().to_hex(),
                k.id.to_hex()
            )));
        }
        if target.has_private(k.version) {
            let existing = target.read(k.version)?;
            if existing.public_key().id() != k.id {
                return Err(CliError::Precondition(format!(
                    "{}: key v{} is another key; not overwritten",
                    to.display(),
                    k.version
                )));
            }
            println!("private key v{} already there", k.version);
            continue;
        }
        writing.push((k.version, key));
    }
    let written = crate::audit::export_key_file(&*store, passphrase, to)
        .map_err(|e| CliError::Precondition(e.to_string()))?;
    for (version, key) in &writing {
        target.write(*version, key)?;
        println!(
            "wrote private key v{version}{}",
            if unencrypted { " (unencrypted)" } else { "" }
        );
    }
    println!(
        "{} the audit HMAC key; a RocksDB daemon with key_dir {} can now open every record",
        if written { "wrote" } else { "already had" },
        to.display()
    );
    Ok(())
}

/// The passphrase of a key directory in a shared database; refused for a config whose keys are
/// files already (`share` and `export-files` move keys between the two).
fn shared_passphrase(shared: &KeyDir) -> Result<&Passphrase, CliError> {
    shared
        .is_shared()
        .then(|| shared.passphrase())
        .flatten()
        .ok_or_else(|| {
            CliError::Input(
                "--config must name a daemon on a shared [store] database; its key_dir already \
                 holds the keys"
                    .into(),
            )
        })
}

/// `keys share`: every private key the registry still needs, read from `from` and checked
/// against its registered fingerprint before anything is written, then stored encrypted.
fn share(
    at: &Location,
    from: &std::path::Path,
    passphrase_file: Option<&std::path::Path>,
) -> Result<(), CliError> {
    let (store, shared, _) = open(at)?;
    let passphrase = shared_passphrase(&shared)?;
    let local_passphrase = match (std::env::var(ENV_IMPORT_PASSPHRASE).ok(), passphrase_file) {
        (Some(p), _) => Some(Passphrase::new(p)),
        (None, Some(f)) => Some(Passphrase::new(
            std::fs::read_to_string(f)
                .map_err(|e| CliError::Input(format!("{}: {e}", f.display())))?
                .trim_end_matches(['\r', '\n'])
                .to_string(),
        )),
        (None, None) => None,
    };
    let local = KeyDir::new(from, local_passphrase);
    let keys = store.keys()?;
    if keys.is_empty() {
        return Err(CliError::NotFound(
            "the database has no key registry; run `tokenvault store copy` from the RocksDB \
             daemon first"
                .into(),
        ));
    }
    let mut moving = Vec::new();
    for k in keys
        .iter()
        .filter(|k| k.state != crate::keys::KeyState::Destroyed)
    {
        if shared.has_private(k.version) {
            continue;
        }
        let key = local.read(k.version).map_err(|e| {
            CliError::from(e.with_passphrase_hint(crate::keys::passphrase_hint::IMPORT))
        })?;
        if key.public_key().id() != k.id {
            return Err(CliError::Input(format!(
                "{}: key v{} is not the one the registry holds (fingerprint {}, registered {})",
                from.display(),
                k.version,
                key.public_key().id().to_hex(),
                k.id.to_hex()
            )));
        }
        moving.push((k.version, key));
    }
    for (version, key) in &moving {
        shared.write(*version, key)?;
        println!("shared private key v{version}");
    }
    let stored = crate::audit::share_key_file(&*store, passphrase, from)
        .map_err(|e| CliError::Precondition(e.to_string()))?;
    println!(
        "{} the audit HMAC key; daemons on this database can now open every record",
        if stored { "shared" } else { "already had" }
    );
    Ok(())
}
