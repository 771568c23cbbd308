//! The vault's application core: every use case, callable without any transport.
//!
//! Owns: [`Vault`], whose methods are the use cases (put sealed records, get a token, proxy a
//! call, issue and revoke grants, revoke, delete, rotate, rewrap, retire, destroy, audit query,
//! security events, stats), each taking a typed [`Caller`] and domain types and returning a
//! [`VaultError`]; and the components it alone owns: the keyring, the record-open path with the
//! DEK cache ([`records`]), the audit trail, grants ([`grants`]), token refresh ([`refresh`]),
//! upstreams, per-record limits, group commit ([`commit`]), the private-key thread pool
//! ([`cpu_pool`]) and the periodic jobs ([`jobs`]).
//!
//! Adapters (`server` for gRPC, the CLI) convert their wire types into the domain types here,
//! call one method, and convert the result back; the error mapping lives with them.
//!
//! Must never: name tonic, a generated proto type or any transport (enforced by
//! `tests/it/architecture.rs`); run RSA or store work on the async executor's threads; release a
//! secret before its audit event is written; change anything on a refused request.

mod admin;
pub mod approvals;
mod broker;
pub(crate) mod commit;
pub(crate) mod cpu_pool;
pub mod dek_cache;
mod error;
mod exchange;
mod grants;
pub mod ingest;
mod jobs;
mod jwks;
pub mod limits;
pub mod listing;
pub mod metrics;
mod records;
mod refresh;
pub mod refusals;
mod revocations;
mod store_keys;
mod unlink;
pub use unlink::{UnlinkCall, UnlinkRefused};
mod webhooks;
pub use webhooks::DeliveryPage;

use std::future::Future;
use std::sync::{Arc, RwLock};

use thiserror::Error;

pub use admin::{AuditEntry, AuditFilter, KeyImport, Rotated, SecurityEventOutcome, VaultStats};
pub use broker::{Proxied, ProxyTarget, Released};
pub use error::{ErrorKind, StaleVersion, VaultError};
pub use exchange::{CodeExchange, Exchanged};
pub use grants::{GrantSubject, IssueGrant, IssuedGrant};
pub use ingest::SealedRecord;
pub use store_keys::StoreKeys;

use crate::audit::{AuditError, Auditor, Draft};
use crate::config::{CallerPolicy, Config, KeyPolicy, Limits};
use crate::keys::KeyError;
use crate::keys::keyring::{KeyDir, Keyring};
use crate::store::AuditAppend;
use crate::store::{StoreError, TokenStore};

/// Who is asking: the authenticated credential's name and what it may touch. Adapters build it
/// from their own authentication; the vault never sees a credential.
#[derive(Debug, Clone)]
pub struct Caller {
    /// Credential name from the configuration (audit trail, logs).
    pub name: String,
    /// What it may touch.
    pub policy: Arc<CallerPolicy>,
}

impl Caller {
    /// A caller with `policy`.
    pub fn new(name: impl Into<String>, policy: Arc<CallerPolicy>) -> Self {
        Self {
            name: name.into(),
            policy,
        }
    }

    /// An internal caller (jobs, signals) with the default policy.
    pub fn internal(name: &str) -> Self {
        Self::new(name, Arc::default())
    }
}

/// Why the vault could not be opened.
#[derive(Debug, Error)]
#[non_exhaustive]
pub enum OpenError {
    /// The store could not be read.
    #[error("opening the store: {0}")]
    Store(#[from] StoreError),
    /// The keyring could not be loaded or created.
    #[error("loading the keyring: {0}")]
    Keys(#[from] KeyError),
    /// The audit trail could not be opened.
    #[error("opening the audit trail: {0}")]
    Audit(#[from] AuditError),
    /// The audit sink file could not be opened.
    #[error("opening the audit sink: {0}")]
    Sink(#[from] crate::audit::sink::SinkError),
    /// A key lifecycle change (the dev profile's first key) failed.
    #[error("creating the first key: {0}")]
    Rotation(#[from] crate::rotation::RotationError),
    /// A provider's configuration could not be used.
    #[error("providers: {0}")]
    Providers(#[from] crate::proxy::UpstreamSetupError),
    /// The store is the target of a `store copy` that has not finished (or did not verify).
    #[error(
        "the store holds an unfinished `tokenvault store copy` (store_copy/state): run the same copy again to finish it, or delete this target"
    )]
    UnfinishedCopy,
    /// Another live daemon runs with this instance name on the shared store.
    #[error(
        "store.instance {0:?} is in use by another running daemon on this database; give each daemon its own instance name"
    )]
    InstanceInUse(String),
    /// A shared store keeps the private keys, always encrypted: a passphrase is required.
    #[error(
        "a [store] database shared by several daemons keeps the private keys encrypted with the passphrase: set passphrase_file or TOKENVAULT_KEY_PASSPHRASE (the same on every daemon)"
    )]
    SharedKeysNeedPassphrase,
    /// The database's CA file could not be used.
    #[error("store.ca_file {}: {message}", path.display())]
    StoreCa {
        /// The file.
        path: std::path::PathBuf,
        /// Why.
        message: String,
    },
    /// The pool of private-key threads, the commit thread or the audit writer could not start.
    #[error("starting the {what} thread(s): {source}")]
    Threads {
        /// Which.
        what: &'static str,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
}

/// Opens the store `config` names: RocksDB in `data_dir`, or the `[store]` database (schema
/// migrations applied, TLS as configured).
pub fn open_store(config: &Config) -> Result<Arc<dyn TokenStore>, OpenError> {
    let store = open_engine(config)?;
    if crate::store::copy::unfinished(&*store)? {
        return Err(OpenError::UnfinishedCopy);
    }
    Ok(store)
}

fn open_engine(config: &Config) -> Result<Arc<dyn TokenStore>, OpenError> {
    match &config.store {
        crate::config::StoreConfig::Rocks => Ok(Arc::new(crate::store::RocksStore::open(
            &config.data_dir,
            config.block_cache_bytes,
        )?)),
        crate::config::StoreConfig::Postgres(pg) => Ok(Arc::new(open_postgres(pg)?)),
    }
}

/// Connects to the `[store]` database (schema migrations applied, TLS as configured).
pub fn open_postgres(
    pg: &crate::config::PostgresConfig,
) -> Result<crate::store::PostgresStore, OpenError> {
    let mut connection = pg.connection.clone();
    if let Some(p) = &pg.password {
        connection.password(p.expose_secret());
    }
    let tls = match &pg.ca_file {
        Some(path) => {
            connection.ssl_mode(tokio_postgres::config::SslMode::Require);
            Some(database_tls(path)?)
        }
        None => {
            connection.ssl_mode(tokio_postgres::config::SslMode::Disable);
            None
        }
    };
    let options = crate::store::PostgresOptions {
        config: connection,
        tls,
        pool_size: pg.pool_size,
        connect_timeout: std::time::Duration::from_secs(10),
    };
    Ok(crate::store::PostgresStore::connect(options, &pg.instance)?)
}

/// How long a daemon's claim on its instance name lasts unrenewed (renewed every third of it).
pub const INSTANCE_LEASE: std::time::Duration = std::time::Duration::from_secs(10);

/// The name of the lease that claims instance name `name` in a shared store.
pub fn instance_lease(name: &str) -> String {
    format!("instance/{name}")
}

/// Threads of the store pool: twice the cores on RocksDB (its reads and unsynced audit writes
/// rarely wait), and at least the connection pool's size on PostgreSQL (each store call waits
/// a round trip, so fewer threads would leave connections idle).
fn io_threads(config: &Config, cores: usize) -> usize {
    match &config.store {
        crate::config::StoreConfig::Postgres(pg) => (2 * cores).max(pg.pool_size),
        _ => 2 * cores,
    }
}

/// A record read awaited on the executor, counted among [`Vault::awaited_read`]'s bound until
/// it is answered or dropped (a caller that went away).
struct AwaitedRead<'a> {
    read: crate::store::RecordRead,
    slot: Slot<'a>,
}

impl AwaitedRead<'_> {
    /// The record, read; the place in the bound is given back once it is.
    async fn read(self) -> Result<Option<crate::record::Record>, StoreError> {
        let Self { read, slot } = self;
        let record = read.await;
        drop(slot);
        record
    }
}

/// One place among [`Vault::awaited_read`]'s bound, given back when dropped.
struct Slot<'a>(&'a std::sync::atomic::AtomicUsize);

impl Drop for Slot<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, std::sync::atomic::Ordering::SeqCst);
    }
}

/// The run-time setting `Admin.SetMinDecryptVersion` writes.
pub(crate) const MIN_DECRYPT_SETTING: &str = "min_decrypt_version";

/// The minimum decryption version stored by `Admin.SetMinDecryptVersion` (0: none).
fn stored_min_version(store: &dyn TokenStore) -> Result<u32, StoreError> {
    Ok(store
        .get_meta(&crate::store::setting_key(MIN_DECRYPT_SETTING))?
        .and_then(|b| <[u8; 4]>::try_from(b.as_slice()).ok())
        .map_or(0, u32::from_be_bytes))
}

/// The daemon's instance name in a shared store (`""` on RocksDB).
fn instance_name(config: &Config) -> &str {
    match &config.store {
        crate::config::StoreConfig::Postgres(pg) => &pg.instance,
        _ => "",
    }
}

/// Where `config`'s private keys are: files in `key_dir`, or, on a database several daemons
/// share, the store itself, encrypted with the passphrase (which is then required); with
/// `[keys] backend = "pkcs11"`, new versions in the token, which is opened (and logged in to)
/// here: a wrong PIN, a missing module or no such token stop the start.
pub fn key_dir(config: &Config, store: &Arc<dyn TokenStore>) -> Result<KeyDir, OpenError> {
    let dir = files_or_store(config, store)?;
    match &config.key_backend {
        crate::config::KeyBackend::File => Ok(dir),
        crate::config::KeyBackend::Pkcs11(token) => {
            let token = tokenvault_pkcs11::Token::open(token.clone())
                .map_err(crate::keys::token::key_error)?;
            Ok(dir.with_token(token))
        }
    }
}

/// Opens and logs in to `config`'s PKCS#11 token, if it has one, and lets it go: for a start
/// to fail on the token before anything else is opened.
pub fn check_token(config: &Config) -> Result<(), OpenError> {
    if let crate::config::KeyBackend::Pkcs11(token) = &config.key_backend {
        tokenvault_pkcs11::Token::open(token.clone()).map_err(crate::keys::token::key_error)?;
    }
    Ok(())
}

/// The key files or the shared store's keys of `config`, before any token.
fn files_or_store(config: &Config, store: &Arc<dyn TokenStore>) -> Result<KeyDir, OpenError> {
    match &config.store {
        crate::config::StoreConfig::Postgres(_) => {
            let passphrase = config
                .passphrase
                .clone()
                .ok_or(OpenError::SharedKeysNeedPassphrase)?;
            Ok(KeyDir::shared(
                &config.key_dir,
                passphrase,
                Arc::new(StoreKeys(Arc::clone(store))),
            ))
        }
        _ => Ok(KeyDir::new(&config.key_dir, config.passphrase.clone())),
    }
}

/// The audit trail of `config` over `store`: its HMAC key in `key_dir`, or, on a shared
/// database, in the store (encrypted with the passphrase, the same for every daemon).
pub fn auditor(config: &Config, store: &Arc<dyn TokenStore>) -> Result<Auditor, OpenError> {
    match &config.store {
        crate::config::StoreConfig::Postgres(_) => {
            let passphrase = config
                .passphrase
                .as_ref()
                .ok_or(OpenError::SharedKeysNeedPassphrase)?;
            Ok(Auditor::open_shared(Arc::clone(store), passphrase)?)
        }
        _ => Ok(Auditor::open(Arc::clone(store), &config.key_dir)?),
    }
}

/// A TLS client configuration trusting only the CA certificates in `path` (rustls on
/// aws-lc-rs; the server name is checked against the URL's host).
fn database_tls(path: &std::path::Path) -> Result<rustls::ClientConfig, OpenError> {
    let fail = |e: &dyn std::fmt::Display| OpenError::StoreCa {
        path: path.to_path_buf(),
        message: e.to_string(),
    };
    let roots = crate::ca::roots_from_file(path).map_err(|e| fail(&e))?;
    Ok(crate::ca::client_builder(roots)
        .map_err(|e| fail(&e))?
        .with_no_client_auth())
}

/// The source of "now" (Unix seconds) for every time-based rule of the vault: grant expiry,
/// record expiry, the ingest grace period, automatic rotation. Tests inject their own to move
/// time instead of sleeping.
pub type Clock = Arc<dyn Fn() -> i64 + Send + Sync>;

pub use limits::Monotonic;

/// The application core. One per daemon; shared by every adapter through an `Arc`.
pub struct Vault {
    store: Arc<dyn TokenStore>,
    keyring: RwLock<Arc<Keyring>>,
    limits: Limits,
    key_dir: KeyDir,
    policy: KeyPolicy,
    /// The two-person rule.
    approvals: crate::config::AdminPolicy,
    /// Serializes key lifecycle operations (rotate, retire, destroy, keyring reloads).
    key_ops: std::sync::Mutex<()>,
    /// Set while a rewrap runs; one at a time.
    rewrapping: std::sync::atomic::AtomicBool,
    audit: Arc<Auditor>,
    /// Writes the audit events of reads whose callers await them on the executor.
    reads: crate::audit::ReadFlusher,
    /// Ships the trail to `[audit] sink_file`, if configured.
    shipper: Option<Arc<crate::audit::sink::Shipper>>,
    /// `[audit] retention_days`.
    retention_days: Option<u32>,
    /// Unwrapped data keys of recently read records, if enabled.
    dek_cache: Option<dek_cache::DekCache>,
    /// Per caller and record token buckets.
    record_limits: limits::RecordLimits,
    /// Refusals without an authenticated caller: counted and summarized, never written one
    /// by one.
    refusals: Arc<refusals::Refusals>,
    /// Upstream clients by provider; replaced wholesale on reload.
    upstreams: RwLock<Arc<crate::proxy::Upstreams>>,
    /// The config file providers are reloaded from, if the daemon has one.
    config_source: Option<std::path::PathBuf>,
    /// One refresh at a time per record.
    single_flight: refresh::SingleFlight,
    /// Trusted issuers of provider security events.
    security_event_issuers: Vec<crate::security_event::Issuer>,
    /// The JWKS fetchers of issuers that publish one, by issuer index, and when each last
    /// fetched.
    jwks: jwks::JwksFetchers,
    metrics: Arc<metrics::Metrics>,
    /// `[webhooks]`: the endpoints the outbox delivers to.
    webhooks: webhooks::Webhooks,
    /// Providers' unlink-callback admin keys, decrypted and kept a minute.
    unlink_keys: unlink::AdminKeys,
    /// Whether the store answered the last probe ([`Vault::store_reachable`]).
    store_reachable: tokio::sync::watch::Sender<bool>,
    /// Whether a private-key thread is free of a call that does not return
    /// ([`Vault::private_keys_available`]).
    private_keys_available: tokio::sync::watch::Sender<bool>,
    /// Background refresh scans completed ([`Vault::background_scans`]).
    background_scans: tokio::sync::watch::Sender<u64>,
    /// The store reads, checks and audit writes of `GetToken` and `Proxy`: a fixed pool with a
    /// bounded queue, like the private-key pool's, instead of tokio's blocking pool (one
    /// thread per call in flight, and an unbounded queue).
    io: cpu_pool::CpuPool,
    /// Record reads of `GetToken` and `Proxy` awaited on the executor ([`Vault::awaited_read`]);
    /// at most `[limits] max_queued` at once.
    awaited_reads: std::sync::atomic::AtomicUsize,
    /// Group commit of ingest writes.
    commit: commit::GroupCommit,
    /// One thread per core for private-key work.
    cpu: cpu_pool::CpuPool,
    /// Cancelled when shutdown begins: long-running work (rewrap, audit streams, background
    /// jobs) stops at its next safe point.
    stopping: tokio_util::sync::CancellationToken,
    /// Every task the vault starts beyond request handlers; [`Vault::stopped`] waits for all of
    /// them, since they may hold the store.
    tasks: tokio_util::task::TaskTracker,
    clock: Clock,
    monotonic: Monotonic,
    /// This process's identity as a lease owner (random per start).
    instance_id: String,
    /// When the last check of the registry for an unknown key started, and whether it changed
    /// the keyring; its lock makes the check single flight ([`Vault::reload_for_unknown_key`]).
    last_unknown_reload: std::sync::Mutex<Option<(std::time::Instant, bool)>>,
}

impl std::fmt::Debug for Vault {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Vault").finish_non_exhaustive()
    }
}

impl Vault {
    /// Opens the vault over `store` with the keys, providers and limits of `config`. In the dev
    /// profile an empty keyring is initialized with a fresh RSA-2048 key.
    ///
    /// A start that is refused writes nothing to a shared store: every check that can refuse
    /// (the passphrase, the private keys, providers, the audit sink) runs before the instance
    /// name is claimed, and a failure after the claim gives the claim back.
    pub fn open(store: Arc<dyn TokenStore>, config: &Config) -> Result<Self, OpenError> {
        let dir = key_dir(config, &store)?;
        let instance_id = format!(
            "{}/{}",
            instance_name(config),
            hex::encode(rand::random::<[u8; 8]>())
        );
        // Opened before anything is written, and kept for the trail below (one scrypt).
        let shared_audit_key = match (&config.store, &config.passphrase) {
            (crate::config::StoreConfig::Postgres(_), Some(passphrase)) => Some((
                crate::audit::check_shared_key(&*store, passphrase)?,
                passphrase,
            )),
            _ => None,
        };
        // Loaded before anything is written when there are keys already (the usual start);
        // loaded again only after the dev profile created the first one.
        let stored_keys = store.keys()?;
        let ring = if stored_keys.is_empty() {
            None
        } else {
            Some(Keyring::load(stored_keys, &dir)?)
        };
        let upstreams = crate::proxy::Upstreams::new(config.providers.values())?;
        let jwks = jwks::JwksFetchers::new(&config.security_event_issuers)?;
        let webhooks = webhooks::Webhooks::new(&config.webhooks)?;
        let shipper = config
            .audit
            .sink
            .clone()
            .map(|c| crate::audit::sink::Shipper::open(Arc::clone(&store), c).map(Arc::new))
            .transpose()?;
        if dir.is_shared() {
            Self::claim_instance(&*store, instance_name(config), &instance_id)?;
        }
        let claimed = || {
            let audit = Arc::new(match shared_audit_key {
                Some((checked, passphrase)) => {
                    Auditor::open_shared_with(Arc::clone(&store), checked, passphrase)?
                }
                None => auditor(config, &store)?,
            });
            let ring = match ring {
                Some(ring) => ring,
                None => {
                    if config.dev {
                        let keys = crate::rotation::KeyService::new(&*store, &dir, &audit);
                        let info = keys.init(
                            &Draft::new("dev-profile", "InitKeys").detail("version 1, development"),
                            crate::keys::Algorithm::Rsa(2048),
                            crate::unix_now(),
                        )?;
                        tracing::info!(version = info.version, fingerprint = %info.id, key_dir = %dir.path().display(), "created development keyring");
                    }
                    Keyring::load(store.keys()?, &dir)?
                }
            };
            Ok::<_, OpenError>((audit, ring))
        };
        let (audit, ring) = match claimed() {
            Ok(opened) => opened,
            Err(e) => {
                if dir.is_shared() {
                    let name = instance_lease(instance_name(config));
                    if let Err(release) = store.release_lease(&name, &instance_id) {
                        tracing::warn!(error = %release, "could not give back the instance name after a refused start");
                    }
                }
                return Err(e);
            }
        };
        let ring = ring.with_min_version(
            config
                .key_policy
                .min_decrypt_version
                .max(stored_min_version(&*store)?),
        );
        let (active, _) = ring.active();
        tracing::info!(version = active.version, fingerprint = %active.id, "keyring loaded");
        let metrics = Arc::new(metrics::Metrics::default());
        // The private-key pool and the store pool: the same bounds, their own threads.
        let pool = |kind, threads, what| {
            cpu_pool::CpuPool::start(
                kind,
                threads,
                cpu_pool::Bound {
                    max_queued: config.limits.max_queued,
                    max_wait: config.limits.max_queue_wait,
                    standing_wait: config.limits.overload_queue_wait,
                },
                Arc::clone(&metrics),
            )
            .map_err(|source| OpenError::Threads { what, source })
        };
        let cores = std::thread::available_parallelism().map_or(2, std::num::NonZeroUsize::get);
        Ok(Self {
            refusals: Arc::new(refusals::Refusals::new(
                config.limits.refusals,
                Arc::clone(&metrics),
            )),
            upstreams: RwLock::new(Arc::new(upstreams)),
            config_source: config.source.clone(),
            single_flight: refresh::SingleFlight::default(),
            security_event_issuers: config.security_event_issuers.clone(),
            jwks,
            webhooks,
            unlink_keys: unlink::AdminKeys::default(),
            metrics: Arc::clone(&metrics),
            cpu: pool(cpu_pool::Kind::PrivateKey, cores, "RSA pool")?,
            commit: commit::GroupCommit::start(
                Arc::clone(&store),
                Arc::clone(&audit),
                config.limits.max_queued,
                Arc::clone(&metrics),
            )
            .map_err(|source| OpenError::Threads {
                what: "group commit",
                source,
            })?,
            stopping: tokio_util::sync::CancellationToken::new(),
            tasks: tokio_util::task::TaskTracker::new(),
            store,
            keyring: RwLock::new(Arc::new(ring)),
            limits: config.limits,
            key_dir: dir,
            policy: config.key_policy,
            approvals: config.admin,
            key_ops: std::sync::Mutex::new(()),
            rewrapping: std::sync::atomic::AtomicBool::new(false),
            shipper,
            retention_days: config.audit.retention_days,
            reads: crate::audit::ReadFlusher::start(Arc::clone(&audit)).map_err(|source| {
                OpenError::Threads {
                    what: "audit writer",
                    source,
                }
            })?,
            audit,
            record_limits: limits::RecordLimits::default(),
            dek_cache: config.dek_cache.map(|c| {
                dek_cache::DekCache::new(
                    std::num::NonZeroUsize::new(c.max_entries)
                        .unwrap_or(std::num::NonZeroUsize::MIN),
                    std::time::Duration::from_secs(c.ttl_seconds),
                )
            }),
            clock: Arc::new(crate::unix_now),
            monotonic: limits::system_monotonic(),
            store_reachable: tokio::sync::watch::Sender::new(true),
            private_keys_available: tokio::sync::watch::Sender::new(true),
            background_scans: tokio::sync::watch::Sender::new(0),
            io: pool(cpu_pool::Kind::Io, io_threads(config, cores), "store pool")?,
            awaited_reads: std::sync::atomic::AtomicUsize::new(0),
            last_unknown_reload: std::sync::Mutex::new(None),
            instance_id,
        })
    }

    /// Claims this daemon's instance name in a shared store, so two daemons configured with the
    /// same name (which would fork one audit chain) cannot run at once. A lease left by an
    /// instance that died expires within [`INSTANCE_LEASE`]; the start waits that long for it.
    pub fn claim_instance(
        store: &dyn TokenStore,
        name: &str,
        owner: &str,
    ) -> Result<(), OpenError> {
        let lease = instance_lease(name);
        let deadline =
            std::time::Instant::now() + INSTANCE_LEASE + std::time::Duration::from_secs(1);
        let mut logged = false;
        loop {
            if store
                .acquire_lease(&lease, owner, INSTANCE_LEASE)?
                .is_some()
            {
                return Ok(());
            }
            if std::time::Instant::now() > deadline {
                return Err(OpenError::InstanceInUse(name.to_string()));
            }
            if !logged {
                tracing::warn!(
                    instance = name,
                    "instance name held by another daemon (or one that just died); waiting for its lease to expire"
                );
                logged = true;
            }
            std::thread::sleep(std::time::Duration::from_millis(250));
        }
    }

    /// Replaces the clock (tests move time with it instead of sleeping).
    pub fn with_clock(mut self, clock: Clock) -> Self {
        self.clock = clock;
        self
    }

    /// Now, in Unix seconds, by the vault's clock.
    pub fn now(&self) -> i64 {
        (self.clock)()
    }

    /// Replaces the monotonic clock rate limits and refusal windows run on (tests move time
    /// with it instead of sleeping). A daemon's authenticator takes the vault's.
    pub fn with_monotonic(mut self, monotonic: Monotonic) -> Self {
        self.monotonic = monotonic;
        self
    }

    /// The monotonic clock rate limits run on.
    pub fn monotonic(&self) -> &Monotonic {
        &self.monotonic
    }

    /// Now by the monotonic clock.
    pub fn monotonic_now(&self) -> std::time::Duration {
        (self.monotonic)()
    }

    /// The metrics every component counts into (adapters add their own, e.g. per RPC).
    pub fn metrics(&self) -> &Arc<metrics::Metrics> {
        &self.metrics
    }

    /// The audit trail (adapters audit refused authentication with it).
    pub fn audit(&self) -> &Arc<Auditor> {
        &self.audit
    }

    /// How a record id appears in the log: the keyed hash the audit trail uses for it, since
    /// ids embed owners (`github:user-42`). An operator correlates log lines with audit events
    /// by it, and [`crate::audit::Auditor::hmac`] computes it for an id they know.
    pub fn log_id(&self, id: &crate::record::RecordId) -> String {
        self.audit.hmac(id.as_str())
    }

    /// Refusals without an authenticated caller (the adapters count theirs here).
    pub fn refusals(&self) -> &Arc<refusals::Refusals> {
        &self.refusals
    }

    /// The configured request limits.
    pub fn limits(&self) -> &Limits {
        &self.limits
    }

    /// Starts the periodic jobs: grant sweep, automatic rotation, background refresh, reload
    /// on SIGHUP. They stop when [`Vault::begin_shutdown`] is called.
    pub fn start_jobs(self: &Arc<Self>) {
        jobs::start(self);
    }

    /// Runs `task` as one of the vault's own: [`Vault::stopped`] waits for it.
    pub fn spawn<F>(&self, task: F)
    where
        F: Future<Output = ()> + Send + 'static,
    {
        self.tasks.spawn(task);
    }

    /// A token cancelled when shutdown begins.
    pub fn stopping(&self) -> tokio_util::sync::CancellationToken {
        self.stopping.clone()
    }

    /// Whether the store is reachable, as the daemon's health reports it: a daemon on a shared
    /// database probes it every second ([`jobs`]) and turns false while it does not answer,
    /// so a load balancer that follows the health service routes calls to the other daemons.
    /// Always true on RocksDB (the store is in the process).
    pub fn store_reachable(&self) -> tokio::sync::watch::Receiver<bool> {
        self.store_reachable.subscribe()
    }

    /// Whether at least one private-key thread is not held by a call running longer than
    /// `[limits] private_key_stuck_seconds` (a PKCS#11 token that stopped answering), as the
    /// daemon's health reports it: false turns health NOT_SERVING, so a load balancer routes
    /// calls to daemons that can open envelopes. Checked every second ([`jobs`]).
    pub fn private_keys_available(&self) -> tokio::sync::watch::Receiver<bool> {
        self.private_keys_available.subscribe()
    }

    /// Occupies every private-key thread with a call that returns only once the returned
    /// sender is dropped: what a PKCS#11 token that stops answering does. Tests only.
    #[cfg(any(test, feature = "testing"))]
    pub fn occupy_private_key_threads(self: &Arc<Self>) -> std::sync::mpsc::Sender<()> {
        let (tx, rx) = std::sync::mpsc::channel::<()>();
        let rx = Arc::new(std::sync::Mutex::new(rx));
        for _ in 0..self.cpu.threads() {
            let (rx, vault) = (Arc::clone(&rx), Arc::clone(self));
            tokio::spawn(async move {
                // One thread waits in `recv`, the others on its lock: all are held.
                let _ = vault
                    .cpu
                    .run(move || {
                        let _ = rx
                            .lock()
                            .unwrap_or_else(std::sync::PoisonError::into_inner)
                            .recv();
                    })
                    .await;
            });
        }
        tx
    }

    /// Counts the private-key threads stuck in a call, and updates
    /// [`Vault::private_keys_available`]; a change is logged once.
    fn check_private_key_threads(&self) {
        let stuck = self.cpu.stuck(self.limits.private_key_stuck);
        self.metrics
            .private_key_stuck
            .set(i64::try_from(stuck).unwrap_or(i64::MAX));
        let available = stuck < self.cpu.threads();
        let changed = self.private_keys_available.send_if_modified(|a| {
            let changed = *a != available;
            *a = available;
            changed
        });
        if changed && !available {
            tracing::error!(
                threads = stuck,
                seconds = self.limits.private_key_stuck.as_secs(),
                "every private-key thread is in a call that has not returned (a hung key token?): health NOT_SERVING until one returns"
            );
        } else if changed {
            tracing::info!("a private-key thread is free again: health SERVING");
        }
    }

    /// How many provider scans the background refresher has completed (each provider's scan
    /// and the refreshes it started), so a caller can wait for the next one instead of
    /// sleeping through an interval.
    pub fn background_scans(&self) -> tokio::sync::watch::Receiver<u64> {
        self.background_scans.subscribe()
    }

    /// Counts a completed background refresh scan.
    pub(super) fn background_scan_done(&self) {
        self.background_scans.send_modify(|n| *n += 1);
    }

    /// Records the outcome of a store probe; a change is logged once.
    fn probed_store(&self, result: &Result<(), VaultError>) {
        let reachable = !matches!(result, Err(VaultError::Store(StoreError::Unavailable(_))));
        let changed = self.store_reachable.send_if_modified(|r| {
            let changed = *r != reachable;
            *r = reachable;
            changed
        });
        match (changed, result) {
            (true, Err(e)) if !reachable => {
                tracing::error!(error = %e, "the database does not answer: health NOT_SERVING until it does");
            }
            (true, _) => tracing::info!("the database answers again: health SERVING"),
            _ => {}
        }
    }

    /// Tells every job and long-running stream (rewrap, audit log) to stop at its next safe
    /// point. Work already under way finishes; none is aborted mid-way, since aborting a task
    /// does not stop the blocking work it started.
    pub fn begin_shutdown(&self) {
        self.stopping.cancel();
    }

    /// Waits until every task the vault started has finished (call after
    /// [`Vault::begin_shutdown`]); the store is then free once the vault is dropped.
    pub async fn stopped(&self) {
        self.tasks.close();
        self.tasks.wait().await;
        if self.shares_keys() {
            // A clean stop frees the instance name at once for a restart.
            let (store, owner) = (Arc::clone(&self.store), self.instance_id.clone());
            let name = self.instance_lease();
            let released =
                tokio::task::spawn_blocking(move || store.release_lease(&name, &owner)).await;
            if !matches!(released, Ok(Ok(()))) {
                tracing::warn!("could not release the instance lease; it expires on its own");
            }
        }
    }

    fn upstreams(&self) -> Arc<crate::proxy::Upstreams> {
        Arc::clone(
            &self
                .upstreams
                .read()
                .unwrap_or_else(std::sync::PoisonError::into_inner),
        )
    }

    /// Re-reads the providers from the config file; on any error the old ones stay. Returns the
    /// provider names now configured.
    pub async fn reload_providers(&self, caller: &Caller) -> Result<Vec<String>, VaultError> {
        let path = self.config_source.clone().ok_or_else(|| {
            VaultError::Reload("the daemon was started without a config file".into())
        })?;
        let draft = Draft::new(&caller.name, "ReloadProviders");
        let limits = self.limits;
        let loaded = self
            .tasks
            .spawn_blocking(move || {
                let policies =
                    Config::load_providers(&path).map_err(|e| VaultError::Reload(e.to_string()))?;
                crate::config::check_provider_timeouts(&policies, &limits)
                    .map_err(|e| VaultError::Reload(e.to_string()))?;
                crate::proxy::Upstreams::new(policies.values())
                    .map_err(|e| VaultError::Reload(e.to_string()))
            })
            .await
            .map_err(|_| VaultError::Task)?;
        match loaded {
            Ok(upstreams) => {
                let names = upstreams.names();
                *self
                    .upstreams
                    .write()
                    .unwrap_or_else(std::sync::PoisonError::into_inner) = Arc::new(upstreams);
                let audit = Arc::clone(&self.audit);
                let draft = draft.detail(names.join(","));
                self.tasks
                    .spawn_blocking(move || audit.append(&draft, true))
                    .await
                    .map_err(|_| VaultError::Task)??;
                tracing::info!(providers = ?names, "providers reloaded");
                Ok(names)
            }
            Err(e) => {
                let audit = Arc::clone(&self.audit);
                let draft = draft.outcome(e.kind().name());
                let written = self
                    .tasks
                    .spawn_blocking(move || audit.append(&draft, true))
                    .await;
                if !matches!(written, Ok(Ok(()))) {
                    tracing::error!("could not audit a failed provider reload");
                }
                tracing::error!(error = %e, "provider reload failed");
                Err(e)
            }
        }
    }

    fn keyring(&self) -> Arc<Keyring> {
        Arc::clone(
            &self
                .keyring
                .read()
                .unwrap_or_else(std::sync::PoisonError::into_inner),
        )
    }

    /// The lease holding this daemon's instance name.
    fn instance_lease(&self) -> String {
        instance_lease(self.instance_id.split('/').next().unwrap_or_default())
    }

    /// Whether the private keys (and so the registry) are shared with other daemons.
    fn shares_keys(&self) -> bool {
        self.key_dir.is_shared()
    }

    /// Reloads the keyring if the registry in the store differs from the loaded one: another
    /// daemon sharing the store rotated, retired or destroyed a version. Returns whether it did.
    fn sync_keyring(&self) -> Result<bool, VaultError> {
        let stored = self.store.keys()?;
        let loaded: Vec<crate::keys::KeyInfo> = self.keyring().infos().cloned().collect();
        if stored == loaded && self.min_decrypt_version()? == self.keyring().min_version() {
            return Ok(false);
        }
        let _ops = self.key_ops();
        self.reload_keyring()?;
        tracing::info!("key registry changed in the shared store; keyring reloaded");
        Ok(true)
    }

    /// After meeting an envelope under a key this daemon does not know: if the keys are shared,
    /// checks the registry for a version another daemon just added and loads it. Returns
    /// whether the keyring changed (the caller looks again).
    ///
    /// Single flight: one check runs at a time and every caller waits for an answer instead of
    /// being refused. A check that started after a caller arrived read the registry after
    /// that caller met the unknown key, so its answer is that caller's too; only a caller that
    /// arrived while an older check ran needs the next one. So however many requests meet a
    /// new version at once, the registry is read about twice and the new key decrypted once,
    /// and a stream of envelopes under a key no daemon has costs one registry read at a time.
    fn reload_for_unknown_key(&self) -> bool {
        if !self.shares_keys() {
            return false;
        }
        let arrived = std::time::Instant::now();
        let mut last = self
            .last_unknown_reload
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if let Some((started, changed)) = *last
            && started > arrived
        {
            return changed;
        }
        let started = std::time::Instant::now();
        let changed = match self.sync_keyring() {
            Ok(changed) => changed,
            Err(e) => {
                tracing::warn!(error = %e, "reloading the keyring for an unknown key failed");
                false
            }
        };
        *last = Some((started, changed));
        changed
    }

    /// The minimum decryption version in force: the configuration's or the one
    /// `Admin.SetMinDecryptVersion` stored, whichever is higher.
    fn min_decrypt_version(&self) -> Result<u32, VaultError> {
        Ok(self
            .policy
            .min_decrypt_version
            .max(stored_min_version(&*self.store)?))
    }

    /// Reloads the keyring from the registry and key files after a lifecycle change.
    fn reload_keyring(&self) -> Result<Arc<Keyring>, VaultError> {
        // Only versions this keyring does not hold yet are read and decrypted.
        let ring = Arc::new(
            self.keyring()
                .reload(self.store.keys()?, &self.key_dir)?
                .with_min_version(self.min_decrypt_version()?),
        );
        *self
            .keyring
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = Arc::clone(&ring);
        self.forget_deks(None);
        Ok(ring)
    }

    /// Runs a change that writes its audit event in the same atomic batch (`write` gets the
    /// sealed event and reports whether it stored it). A refused change is audited on its own.
    fn audited<T>(
        &self,
        draft: Draft,
        write: impl FnOnce(&AuditAppend) -> Result<(T, bool), VaultError>,
    ) -> Result<T, VaultError> {
        let result = self.audit.append_with(&draft, write);
        self.audit_if_refused(draft, result)
    }

    /// Passes `result` through, auditing `draft` as refused when it is an error.
    fn audit_if_refused<T>(
        &self,
        draft: Draft,
        result: Result<T, VaultError>,
    ) -> Result<T, VaultError> {
        if let Err(e) = &result {
            self.audit_outcome(draft, e);
        }
        result
    }

    /// Records a refusal or failure; the original error is what the caller sees either way.
    fn audit_outcome(&self, draft: Draft, e: &VaultError) {
        let draft = draft.outcome(e.kind().name());
        if let Err(audit_err) = self.audit.append(&draft, true) {
            tracing::error!(error = %audit_err, "could not audit a refused request");
        }
    }

    /// Forgets cached data keys: one record's, or all of them.
    fn forget_deks(&self, id: Option<&crate::record::RecordId>) {
        if let Some(cache) = &self.dek_cache {
            match id {
                Some(id) => cache.remove(id),
                None => cache.clear(),
            }
        }
    }

    /// Holds the key-operations lock.
    fn key_ops(&self) -> std::sync::MutexGuard<'_, ()> {
        self.key_ops
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Like [`Vault::blocking`], for work dominated by a private-key operation: it runs on the
    /// pool of one thread per core, queued behind the work already there.
    async fn cpu_bound<T: Send + 'static>(
        self: &Arc<Self>,
        f: impl FnOnce(&Vault) -> Result<T, VaultError> + Send + 'static,
    ) -> Result<T, VaultError> {
        self.pooled(&self.cpu, "a private-key thread", f).await
    }

    /// Like [`Vault::blocking`], for the store and audit steps of `GetToken` and `Proxy`: on
    /// the store pool, bounded and shed like the private-key pool.
    async fn io_bound<T: Send + 'static>(
        self: &Arc<Self>,
        f: impl FnOnce(&Vault) -> Result<T, VaultError> + Send + 'static,
    ) -> Result<T, VaultError> {
        self.pooled(&self.io, "a store thread", f).await
    }

    /// A read of record `id` to await on the executor, for a call the DEK cache can likely
    /// answer, where the store answers reads on a task of its own (PostgreSQL): the call then
    /// holds no store thread for the round trip. `None` where the store reads on a thread
    /// (RocksDB), or while `[limits] max_queued` such reads are in flight (the call then takes
    /// the store pool, whose bounded queue sheds overload, so load past the bound is refused
    /// there rather than queued here), or when no key of the record is cached.
    ///
    /// Why not for a call that needs the private key: sent on from here, such calls reach the
    /// private-key pool in bursts (one read statement answers many at once) and keep its queue
    /// standing, which sheds them; measured at 64 in flight on PostgreSQL, 10-25 % fewer were
    /// served than through the store pool, whose step paces them.
    fn awaited_read(&self, id: &crate::record::RecordId) -> Option<AwaitedRead<'_>> {
        use std::sync::atomic::Ordering;
        if !self.dek_cache.as_ref().is_some_and(|c| c.holds(id)) {
            return None;
        }
        let in_flight = &self.awaited_reads;
        if in_flight.fetch_add(1, Ordering::SeqCst) >= self.limits.max_queued {
            in_flight.fetch_sub(1, Ordering::SeqCst);
            return None;
        }
        let slot = Slot(in_flight);
        let read = self.store.read_record(id)?;
        Some(AwaitedRead { read, slot })
    }

    async fn pooled<T: Send + 'static>(
        self: &Arc<Self>,
        pool: &cpu_pool::CpuPool,
        thread: &str,
        f: impl FnOnce(&Vault) -> Result<T, VaultError> + Send + 'static,
    ) -> Result<T, VaultError> {
        let vault = Arc::clone(self);
        let max_wait = self.limits.max_queue_wait;
        // Refused together, told the same time, the callers would come back together and be
        // refused together again: the hint is spread over half to one and a half times the
        // bound, so their retries spread out too. Drawn only for a refusal.
        let retry_ms = || {
            let base = u64::try_from(max_wait.as_millis())
                .unwrap_or(u64::MAX / 2)
                .max(2);
            base / 2 + rand::Rng::gen_range(&mut rand::thread_rng(), 0..=base)
        };
        match pool.run(move || f(&vault)).await {
            Ok(result) => result,
            Err(cpu_pool::Refused::Failed) => Err(VaultError::Task),
            Err(cpu_pool::Refused::Full {
                queued,
                predicted,
                standing,
            }) => Err(VaultError::Overloaded {
                reason: if standing {
                    format!(
                        "{queued} requests wait for {thread} (about {} ms) and the queue has not \
                         drained for 100 ms (overload_queue_wait_ms is {})",
                        predicted.as_millis(),
                        self.limits.overload_queue_wait.as_millis()
                    )
                } else {
                    format!(
                        "{queued} requests wait for {thread} (about {} ms; max_queue_wait_ms is {})",
                        predicted.as_millis(),
                        max_wait.as_millis()
                    )
                },
                retry_ms: retry_ms(),
            }),
            Err(cpu_pool::Refused::Late(waited)) => Err(VaultError::Overloaded {
                reason: format!(
                    "waited {} ms for {thread} (max_queue_wait_ms is {})",
                    waited.as_millis(),
                    max_wait.as_millis()
                ),
                retry_ms: retry_ms(),
            }),
        }
    }

    /// Appends `draft` durably on the blocking pool, for use-case code running on the executor;
    /// a failure to audit is logged (`what` says what was being audited).
    async fn audit_off_executor(self: &Arc<Self>, draft: Draft, what: &'static str) {
        let written = self
            .blocking(move |v| Ok(v.audit.append(&draft, true)?))
            .await;
        if let Err(e) = written {
            tracing::error!(error = %e, "could not audit {what}");
        }
    }

    /// Runs blocking work (store, RSA) off the async executor.
    async fn blocking<T: Send + 'static>(
        self: &Arc<Self>,
        f: impl FnOnce(&Vault) -> Result<T, VaultError> + Send + 'static,
    ) -> Result<T, VaultError> {
        let vault = Arc::clone(self);
        // Tracked, so shutdown waits for it even when the request that started it was dropped.
        self.tasks
            .spawn_blocking(move || f(&vault))
            .await
            .map_err(|_| VaultError::Task)?
    }
}
