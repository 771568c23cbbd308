//! Daemon configuration: a TOML file plus environment overrides, or the built-in dev profile.
//!
//! Owns: [`Config`], the [`Strings`] source abstraction (process environment in production, a
//! map in tests), and [`ConfigError`]. Credentials appear in configuration only as SHA-256
//! hashes; the key passphrase only through an environment variable or a file, never a flag or
//! the TOML file.
//!
//! There is deliberately no `Default` for [`Config`]: every entry point says which profile
//! it wants ([`Config::load`] or [`Config::dev`]).

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use serde::Deserialize;
use sha2::{Digest, Sha256};
use thiserror::Error;

use crate::record::{RecordMeta, SecretKind};
use crate::secret::{ApiCredential, Passphrase};

/// Env var: listen address override.
pub const ENV_LISTEN: &str = "TOKENVAULT_LISTEN";
/// Env var: data directory override.
pub const ENV_DATA_DIR: &str = "TOKENVAULT_DATA_DIR";
/// Env var: key directory override.
pub const ENV_KEY_DIR: &str = "TOKENVAULT_KEY_DIR";
/// Env var: the private key passphrase itself.
pub const ENV_KEY_PASSPHRASE: &str = "TOKENVAULT_KEY_PASSPHRASE";
/// Env var: a file holding the private key passphrase.
pub const ENV_KEY_PASSPHRASE_FILE: &str = "TOKENVAULT_KEY_PASSPHRASE_FILE";
/// Env var: the PKCS#11 token's user PIN (`[keys] backend = "pkcs11"`).
pub const ENV_PKCS11_PIN: &str = "TOKENVAULT_PKCS11_PIN";
/// Env var: a file holding the PKCS#11 token's user PIN.
pub const ENV_PKCS11_PIN_FILE: &str = "TOKENVAULT_PKCS11_PIN_FILE";
/// Env var: the password of the `[store]` database user (instead of `store.password_file`).
pub const ENV_STORE_PASSWORD: &str = "TOKENVAULT_STORE_PASSWORD";

/// Default gRPC port.
pub const DEFAULT_PORT: u16 = 50051;

/// A source of configuration strings (the environment, or a map in tests).
pub trait Strings {
    /// The value of `key`, if set.
    fn get(&self, key: &str) -> Option<String>;
}

/// The process environment.
#[derive(Debug, Clone, Copy)]
pub struct Env;

impl Strings for Env {
    fn get(&self, key: &str) -> Option<String> {
        std::env::var(key).ok()
    }
}

impl Strings for HashMap<String, String> {
    fn get(&self, key: &str) -> Option<String> {
        HashMap::get(self, key).cloned()
    }
}

/// Why configuration could not be loaded.
#[derive(Debug, Error)]
#[non_exhaustive]
pub enum ConfigError {
    /// The config file could not be read.
    #[error("cannot read config file {path}: {source}")]
    Read {
        /// File.
        path: PathBuf,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
    /// The TOML did not parse or has unknown keys.
    #[error("config file {path}: {message}")]
    Parse {
        /// File.
        path: PathBuf,
        /// Parser message.
        message: String,
    },
    /// A value is invalid.
    #[error("{key}: {message}")]
    Invalid {
        /// The offending key.
        key: String,
        /// What is wrong.
        message: String,
    },
}

impl From<crate::provider::ProviderError> for ConfigError {
    fn from(e: crate::provider::ProviderError) -> Self {
        ConfigError::Invalid {
            key: e.key,
            message: e.message,
        }
    }
}

/// Caller roles. Each gRPC service admits exactly one role.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    /// The web tier: `Ingest` only.
    Ingest,
    /// Backend workers: `Broker` only.
    Worker,
    /// Security team: `Admin` only.
    Admin,
}

impl Role {
    /// Lowercase name.
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Ingest => "ingest",
            Role::Worker => "worker",
            Role::Admin => "admin",
        }
    }
}

/// A configured caller: a name for logs, a role, and how it proves itself — the SHA-256 of a
/// bearer credential, or an identity its client certificate asserts (mutual TLS).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CredentialEntry {
    /// Name shown in logs and audit events.
    pub name: String,
    /// Role granted.
    pub role: Role,
    /// SHA-256 of the bearer credential, for bearer callers.
    pub sha256: Option<[u8; 32]>,
    /// SAN DNS name, SAN URI or subject CN of the client certificate, for mTLS callers.
    pub mtls_identity: Option<String>,
    /// What the caller may touch.
    pub policy: CallerPolicy,
}

/// What one caller may touch, beyond its role. Empty lists allow everything.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CallerPolicy {
    /// Providers whose records the caller may read or store.
    pub providers: Vec<String>,
    /// Owner prefixes whose records the caller may read or store.
    pub owner_prefixes: Vec<String>,
    /// Secret kinds the caller may read or store.
    pub kinds: Vec<SecretKind>,
    /// Client addresses the caller may connect from.
    pub allowed_ips: Vec<ipnet::IpNet>,
    /// Token-bucket rate limit: sustained requests per second.
    pub rate_per_second: Option<u32>,
    /// Token-bucket burst size (defaults to the rate).
    pub burst: Option<u32>,
    /// Token-bucket limit per record for this caller: `GetToken`s of one record per second
    /// (burst equal to the rate).
    pub record_rate_per_second: Option<u32>,
    /// May mint and revoke downscoped grants (`Broker.IssueGrant` / `RevokeGrant`).
    pub issue_grants: bool,
}

/// Why a caller's policy refuses a request. The owner is personal data: no message repeats it.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
#[non_exhaustive]
pub enum PolicyDenial {
    /// The record's provider is not among the caller's providers.
    #[error("provider {0} is outside this caller's providers")]
    Provider(String),
    /// The record's kind is not among the caller's kinds.
    #[error("kind {0} is outside this caller's kinds")]
    Kind(SecretKind),
    /// The record's owner does not start with one of the caller's owner prefixes.
    #[error("the record's owner is outside this caller's owner prefixes")]
    RecordOwner,
    /// An owner named in the request does not start with one of the caller's owner prefixes.
    #[error("the owner is outside this caller's owner prefixes")]
    Owner,
    /// The caller may not issue or revoke grants.
    #[error("credential '{0}' may not issue or revoke grants (issue_grants is not set)")]
    IssueGrants(String),
}

impl CallerPolicy {
    /// Why the caller may not touch a record with this metadata, if it may not.
    pub fn check_record(&self, meta: &RecordMeta) -> Result<(), PolicyDenial> {
        if !self.providers.is_empty() && !self.providers.iter().any(|p| p == meta.provider.as_str())
        {
            return Err(PolicyDenial::Provider(meta.provider.to_string()));
        }
        if !self.kinds.is_empty() && !self.kinds.contains(&meta.kind) {
            return Err(PolicyDenial::Kind(meta.kind));
        }
        if !self.allows_owner(meta.owner.as_str()) {
            return Err(PolicyDenial::RecordOwner);
        }
        Ok(())
    }

    /// Whether `owner` starts with one of the caller's owner prefixes (or it has none).
    pub fn allows_owner(&self, owner: &str) -> bool {
        self.owner_prefixes.is_empty()
            || self
                .owner_prefixes
                .iter()
                .any(|p| owner.starts_with(p.as_str()))
    }

    /// Whether a client at `ip` may use this caller's credential.
    pub fn allows_ip(&self, ip: std::net::IpAddr) -> bool {
        let ip = match ip {
            std::net::IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, std::net::IpAddr::V4),
            v4 => v4,
        };
        self.allowed_ips.is_empty() || self.allowed_ips.iter().any(|net| net.contains(&ip))
    }
}

/// TLS on the gRPC listener.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsConfig {
    /// Server certificate chain, PEM.
    pub cert_file: PathBuf,
    /// Server private key, PEM (mode 0600).
    pub key_file: PathBuf,
    /// CA that signs client certificates; enables mutual TLS.
    pub client_ca_file: Option<PathBuf>,
    /// Refuse connections without a valid client certificate.
    pub require_client_cert: bool,
}

impl CredentialEntry {
    /// An entry for `credential`, hashing it.
    pub fn for_credential(name: &str, role: Role, credential: &ApiCredential) -> Self {
        Self {
            name: name.to_string(),
            role,
            sha256: Some(Sha256::digest(credential.expose_secret().as_bytes()).into()),
            mtls_identity: None,
            policy: CallerPolicy::default(),
        }
    }
}

/// What the table of refusals without an authenticated caller allows (`[limits]`;
/// [`crate::vault::refusals`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RefusalLimits {
    /// Failures per second a source may cause before it is throttled.
    pub per_second: u32,
    /// Failures a source may cause at once.
    pub burst: u32,
    /// Sources tracked at once; the least recently refused are dropped first (their counts
    /// go to the summary's "other sources").
    pub sources: usize,
    /// Throttled refusals held back until their retry time at once; past it (or at 0) they
    /// are answered at once.
    pub hold_max: usize,
    /// Longest retry hint (and hold) of a throttled refusal: the hint doubles while a source's
    /// throttled requests arrive before their previous hint has passed.
    pub retry_max: std::time::Duration,
}

/// Request, connection and queue limits (`[limits]`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Largest accepted gRPC request message, in bytes.
    pub max_request_bytes: usize,
    /// Most records in one `PutSealedBatch`.
    pub max_batch: usize,
    /// Refusals without an authenticated caller: each source's budget and the table's size.
    pub refusals: RefusalLimits,
    /// How often refusals without an authenticated caller are summarized into the audit trail.
    pub refusal_summary: std::time::Duration,
    /// Open connections per listener; at the cap the connection idle the longest is closed.
    pub max_connections: usize,
    /// A connection that moves no byte either way for this long is closed.
    pub idle_timeout: std::time::Duration,
    /// Concurrent HTTP/2 streams per connection.
    pub max_concurrent_streams: u32,
    /// HTTP/2 flow-control window of a connection and of each stream: request bytes a client
    /// may send before the daemon reads them, so a connection never buffers more.
    pub http2_window_bytes: u32,
    /// Longest a request waits for a private-key thread before it is refused.
    pub max_queue_wait: std::time::Duration,
    /// Longest predicted wait a request is accepted with once the private-key or store queue
    /// has not drained for 100 ms (sustained overload, not a burst); at most `max_queue_wait`.
    pub overload_queue_wait: std::time::Duration,
    /// Most requests waiting for a private-key thread at once, for a store thread, for a
    /// record read awaited on the executor (PostgreSQL), and most write requests waiting for
    /// the group commit.
    pub max_queued: usize,
    /// A private-key call running this long holds its thread stuck (a PKCS#11 token that
    /// hangs); with every thread stuck, health says NOT_SERVING.
    pub private_key_stuck: std::time::Duration,
}

impl Limits {
    /// Every limit at its default.
    pub fn standard() -> Self {
        Self {
            max_request_bytes: DEFAULT_MAX_REQUEST_BYTES,
            max_batch: DEFAULT_MAX_BATCH,
            refusals: RefusalLimits {
                per_second: 10,
                burst: 100,
                sources: 10_000,
                hold_max: 4096,
                retry_max: std::time::Duration::from_secs(10),
            },
            refusal_summary: std::time::Duration::from_secs(60),
            max_connections: 4096,
            idle_timeout: std::time::Duration::from_secs(30),
            max_concurrent_streams: 128,
            http2_window_bytes: 1 << 20,
            max_queue_wait: std::time::Duration::from_millis(250),
            overload_queue_wait: std::time::Duration::from_millis(2),
            max_queued: 1024,
            private_key_stuck: std::time::Duration::from_secs(30),
        }
    }

    fn from_file(file: &FileLimits) -> Result<Self, ConfigError> {
        let d = Self::standard();
        fn ranged<T: PartialOrd + Copy + std::fmt::Display>(
            key: &str,
            value: Option<T>,
            default: T,
            range: std::ops::RangeInclusive<T>,
        ) -> Result<T, ConfigError> {
            let v = value.unwrap_or(default);
            if range.contains(&v) {
                Ok(v)
            } else {
                Err(invalid(
                    &format!("limits.{key}"),
                    format!("must be {} to {}", range.start(), range.end()),
                ))
            }
        }
        let limits = Self {
            max_request_bytes: file.max_request_bytes.unwrap_or(d.max_request_bytes),
            max_batch: file.max_batch.unwrap_or(d.max_batch),
            refusals: RefusalLimits {
                per_second: ranged(
                    "unauthenticated_per_second",
                    file.unauthenticated_per_second,
                    d.refusals.per_second,
                    1..=1_000_000,
                )?,
                burst: ranged(
                    "unauthenticated_burst",
                    file.unauthenticated_burst,
                    d.refusals.burst,
                    1..=1_000_000,
                )?,
                sources: ranged(
                    "unauthenticated_sources",
                    file.unauthenticated_sources,
                    d.refusals.sources,
                    1..=1_000_000,
                )?,
                hold_max: ranged(
                    "throttled_hold_max",
                    file.throttled_hold_max,
                    d.refusals.hold_max,
                    0..=1_000_000,
                )?,
                retry_max: std::time::Duration::from_secs(ranged(
                    "throttled_retry_max_seconds",
                    file.throttled_retry_max_seconds,
                    d.refusals.retry_max.as_secs(),
                    1..=3600,
                )?),
            },
            refusal_summary: std::time::Duration::from_secs(ranged(
                "refusal_summary_seconds",
                file.refusal_summary_seconds,
                60,
                1..=3600,
            )?),
            max_connections: ranged(
                "max_connections",
                file.max_connections,
                d.max_connections,
                1..=1_000_000,
            )?,
            idle_timeout: std::time::Duration::from_secs(ranged(
                "idle_timeout_seconds",
                file.idle_timeout_seconds,
                30,
                1..=86_400,
            )?),
            http2_window_bytes: ranged(
                "http2_window_bytes",
                file.http2_window_bytes,
                d.http2_window_bytes,
                65_535..=16 << 20,
            )?,
            max_concurrent_streams: ranged(
                "max_concurrent_streams",
                file.max_concurrent_streams,
                d.max_concurrent_streams,
                1..=10_000,
            )?,
            max_queue_wait: std::time::Duration::from_millis(ranged(
                "max_queue_wait_ms",
                file.max_queue_wait_ms,
                250,
                1..=60_000,
            )?),
            // Unset, it follows a lower max_queue_wait_ms down rather than refusing it.
            overload_queue_wait: std::time::Duration::from_millis(ranged(
                "overload_queue_wait_ms",
                file.overload_queue_wait_ms,
                file.max_queue_wait_ms.map_or(2, |max| max.min(2)),
                1..=60_000,
            )?),
            max_queued: ranged("max_queued", file.max_queued, d.max_queued, 1..=1_000_000)?,
            private_key_stuck: std::time::Duration::from_secs(ranged(
                "private_key_stuck_seconds",
                file.private_key_stuck_seconds,
                d.private_key_stuck.as_secs(),
                1..=3600,
            )?),
        };
        if limits.overload_queue_wait > limits.max_queue_wait {
            return Err(invalid(
                "limits.overload_queue_wait_ms",
                format!(
                    "must not exceed max_queue_wait_ms ({})",
                    limits.max_queue_wait.as_millis()
                ),
            ));
        }
        if limits.max_batch == 0 || limits.max_request_bytes < 4096 {
            return Err(invalid(
                "limits",
                "max_batch must be > 0, max_request_bytes >= 4096",
            ));
        }
        Ok(limits)
    }
}

/// Everything the daemon needs to run.
#[derive(Debug, Clone)]
pub struct Config {
    /// gRPC listen address (all services).
    pub listen: SocketAddr,
    /// Optional second address serving only `Ingest`, for the web tier.
    pub ingest_listen: Option<SocketAddr>,
    /// RocksDB directory.
    pub data_dir: PathBuf,
    /// Private key directory.
    pub key_dir: PathBuf,
    /// Passphrase for private key files, if they are encrypted.
    pub passphrase: Option<Passphrase>,
    /// RocksDB block cache size in bytes.
    pub block_cache_bytes: usize,
    /// Which engine holds the records (RocksDB in `data_dir` unless `[store]` names a
    /// database).
    pub store: StoreConfig,
    /// Request limits.
    pub limits: Limits,
    /// API credentials.
    pub credentials: Vec<CredentialEntry>,
    /// TLS (and optionally mutual TLS) on the listener.
    pub tls: Option<TlsConfig>,
    /// Allow plaintext gRPC on a non-loopback address.
    pub insecure_plaintext: bool,
    /// Dev profile: create the keyring on first run.
    pub dev: bool,
    /// Log filter (tracing `EnvFilter` syntax).
    pub log: String,
    /// Key lifecycle policy.
    pub key_policy: KeyPolicy,
    /// The optional DEK cache (off when `None`).
    pub dek_cache: Option<DekCacheConfig>,
    /// Upstream providers for `Broker.Proxy` and token refresh, by name.
    pub providers: std::collections::BTreeMap<String, crate::provider::ProviderPolicy>,
    /// The file this configuration was loaded from (re-read on reload), if any.
    pub source: Option<PathBuf>,
    /// Trusted issuers of provider security events.
    pub security_event_issuers: Vec<crate::security_event::Issuer>,
    /// Lock the daemon's memory into RAM (`mlockall`) where the OS allows it.
    pub lock_memory: bool,
    /// Prometheus metrics HTTP listener (off when `None`; port 0 picks a free port).
    pub metrics_listen: Option<SocketAddr>,
    /// Log line format.
    pub log_format: LogFormat,
    /// On shutdown, how long health reports NOT_SERVING before the listeners close, so load
    /// balancers stop routing new calls first.
    pub shutdown_grace: std::time::Duration,
    /// Audit trail retention and shipping (`[audit]`).
    pub audit: AuditConfig,
    /// Where new key versions are generated and kept (`[keys] backend`).
    pub key_backend: KeyBackend,
    /// The two-person rule (`[admin]`).
    pub admin: AdminPolicy,
    /// Signed webhooks from the outbox (`[webhooks]`, docs/WEBHOOKS.md).
    pub webhooks: crate::webhook::WebhookConfig,
}

/// `[admin]`: how many distinct admin identities must agree to the guarded calls (destroying
/// a key version, cancelling a destruction, deleting an owner's records), and for how long a
/// request waits for them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AdminPolicy {
    /// 1: every admin acts alone (the default); 2 or more: the requester plus others.
    pub approvals_required: u32,
    /// How long a request waits for its approvals, in seconds.
    pub approval_ttl_seconds: i64,
}

impl Default for AdminPolicy {
    fn default() -> Self {
        Self {
            approvals_required: 1,
            approval_ttl_seconds: 3_600,
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileAdmin {
    approvals_required: Option<u32>,
    approval_ttl_minutes: Option<u32>,
}

/// Checks `[admin]`: `approvals_required` 1 to 5, `approval_ttl_minutes` 1 to 10080 (a week).
fn admin_from(file: Option<FileAdmin>) -> Result<AdminPolicy, ConfigError> {
    let Some(f) = file else {
        return Ok(AdminPolicy::default());
    };
    let approvals_required = f.approvals_required.unwrap_or(1);
    if !(1..=5).contains(&approvals_required) {
        return Err(invalid(
            "admin.approvals_required",
            "must be 1 to 5 (distinct admin identities, the requester included)",
        ));
    }
    let minutes = f.approval_ttl_minutes.unwrap_or(60);
    if !(1..=10_080).contains(&minutes) {
        return Err(invalid("admin.approval_ttl_minutes", "must be 1 to 10080"));
    }
    Ok(AdminPolicy {
        approvals_required,
        approval_ttl_seconds: i64::from(minutes) * 60,
    })
}

/// `[keys] backend`: where the private keys of new key versions are generated and kept.
#[derive(Debug, Clone, Default)]
pub enum KeyBackend {
    /// Key files in `key_dir` (or, on a shared database, the store), encrypted with the
    /// passphrase if one is set.
    #[default]
    File,
    /// A PKCS#11 token (`[keys.pkcs11]`): generated there, never leaving it. Versions made
    /// before the move still load from their files until they are destroyed.
    Pkcs11(tokenvault_pkcs11::TokenConfig),
}

/// `[audit]`: how long the trail is kept in the store and where it is shipped.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct AuditConfig {
    /// Events older than this many days are pruned (behind a checkpoint); `None`: kept forever.
    pub retention_days: Option<u32>,
    /// The JSON-lines file every event is shipped to, if any.
    pub sink: Option<SinkConfig>,
}

/// `[audit] sink_file`: a JSON-lines file, rotated by size.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SinkConfig {
    /// The file events are appended to.
    pub file: PathBuf,
    /// Rotate when the file reaches this many bytes.
    pub max_bytes: u64,
    /// Rotated files kept (`FILE.1` newest .. `FILE.N`).
    pub keep_files: u32,
}

/// Longest accepted `[audit] retention_days` (100 years).
pub const MAX_RETENTION_DAYS: u32 = 36_500;

/// Which engine holds the records.
#[derive(Debug, Clone, Default)]
#[non_exhaustive]
pub enum StoreConfig {
    /// The embedded RocksDB in `data_dir` (the default, and the dev profile's).
    #[default]
    Rocks,
    /// A PostgreSQL database (or a PostgreSQL-wire engine) shared by several daemons.
    Postgres(Box<PostgresConfig>),
}

/// `[store]` with a `url`: how to reach the shared database.
#[derive(Clone)]
pub struct PostgresConfig {
    /// Hosts, port, user and database from `store.url` (never a password).
    pub connection: tokio_postgres::Config,
    /// From `store.password_file` or `TOKENVAULT_STORE_PASSWORD`.
    pub password: Option<Passphrase>,
    /// CA certificates the database's TLS certificate must chain to; TLS is required whenever
    /// this is set, and it must be set unless every host is loopback or a Unix socket.
    pub ca_file: Option<PathBuf>,
    /// Most pooled connections of this daemon.
    pub pool_size: usize,
    /// This daemon's name among those sharing the database (its audit chain).
    pub instance: String,
}

impl std::fmt::Debug for PostgresConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PostgresConfig")
            .field("hosts", &self.connection.get_hosts())
            .field("ports", &self.connection.get_ports())
            .field("user", &self.connection.get_user())
            .field("dbname", &self.connection.get_dbname())
            .field("password", &self.password.as_ref().map(|_| "[REDACTED]"))
            .field("ca_file", &self.ca_file)
            .field("pool_size", &self.pool_size)
            .field("instance", &self.instance)
            .finish()
    }
}

/// Default `store.pool_size`.
pub const DEFAULT_STORE_POOL_SIZE: usize = 16;

/// Longest accepted `shutdown_grace_seconds`.
pub const MAX_SHUTDOWN_GRACE_SECONDS: u64 = 300;

/// How log lines are written to stderr.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    /// Human-readable text.
    Pretty,
    /// One JSON object per line (for log shippers).
    Json,
}

/// Env var: log format override (`json` or `pretty`).
pub const ENV_LOG_FORMAT: &str = "TOKENVAULT_LOG_FORMAT";

fn log_format(env: &dyn Strings, file: Option<LogFormat>) -> Result<LogFormat, ConfigError> {
    match env.get(ENV_LOG_FORMAT).as_deref() {
        Some("json") => Ok(LogFormat::Json),
        Some("pretty") => Ok(LogFormat::Pretty),
        Some(_) => Err(invalid(ENV_LOG_FORMAT, "must be json or pretty")),
        None => Ok(file.unwrap_or(LogFormat::Pretty)),
    }
}

/// Bounds of the DEK cache.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DekCacheConfig {
    /// Most data keys held.
    pub max_entries: usize,
    /// Longest a data key is held, in seconds.
    pub ttl_seconds: u64,
}

/// Key lifecycle settings.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KeyPolicy {
    /// How long after a rotation envelopes sealed under the previous (now decrypt-only)
    /// version are still accepted by `Ingest`, in seconds.
    pub ingest_grace_seconds: i64,
    /// Refuse to open anything wrapped under a lower version (0: no minimum).
    pub min_decrypt_version: u32,
    /// Rotate automatically when the active version is this old, in seconds (off if `None`).
    pub auto_rotate_seconds: Option<i64>,
    /// How long a version asked to be destroyed waits (pending destruction, cancellable)
    /// before it is destroyed, in seconds (`destroy_waiting_days`, 1 to 30, default 7).
    pub destroy_waiting_seconds: i64,
}

/// Default waiting period before a scheduled destruction: seven days (AWS KMS's minimum).
pub const DEFAULT_DESTROY_WAITING_DAYS: u32 = 7;

/// Shortest and longest waiting period before a scheduled destruction (`[keys]
/// destroy_waiting_days`), as AWS KMS's pending deletion: long enough to notice a version
/// destroyed by mistake, short enough that a compromised key does not linger.
pub const DESTROY_WAITING_DAYS: std::ops::RangeInclusive<u32> = 1..=30;

/// Default ingest grace period after a rotation: one day.
pub const DEFAULT_INGEST_GRACE_SECONDS: i64 = 86_400;

impl KeyPolicy {
    /// One day of grace, no minimum version, no automatic rotation.
    pub fn standard() -> Self {
        Self {
            ingest_grace_seconds: DEFAULT_INGEST_GRACE_SECONDS,
            min_decrypt_version: 0,
            auto_rotate_seconds: None,
            destroy_waiting_seconds: i64::from(DEFAULT_DESTROY_WAITING_DAYS) * 86_400,
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileConfig {
    listen: Option<String>,
    ingest_listen: Option<String>,
    data_dir: Option<PathBuf>,
    key_dir: Option<PathBuf>,
    passphrase_file: Option<PathBuf>,
    block_cache_mb: Option<usize>,
    #[serde(default)]
    insecure_plaintext: bool,
    lock_memory: Option<bool>,
    shutdown_grace_seconds: Option<u64>,
    metrics_listen: Option<String>,
    log: Option<String>,
    log_format: Option<LogFormat>,
    #[serde(default)]
    limits: FileLimits,
    #[serde(default)]
    keys: FileKeys,
    tls: Option<FileTls>,
    dek_cache: Option<FileDekCache>,
    store: Option<FileStore>,
    #[serde(default)]
    credentials: Vec<FileCredential>,
    #[serde(default)]
    providers: std::collections::BTreeMap<String, crate::provider::FileProvider>,
    #[serde(default)]
    security_event_issuers: Vec<FileIssuer>,
    audit: Option<FileAudit>,
    admin: Option<FileAdmin>,
    webhooks: Option<crate::webhook::FileWebhooks>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileAudit {
    retention_days: Option<u32>,
    sink_file: Option<PathBuf>,
    sink_max_mb: Option<u64>,
    sink_keep_files: Option<u32>,
}

/// Checks `[audit]`; a relative `sink_file` is relative to the config file's directory.
fn audit_from(file: Option<FileAudit>, base: &Path) -> Result<AuditConfig, ConfigError> {
    let Some(f) = file else {
        return Ok(AuditConfig::default());
    };
    if let Some(days) = f.retention_days
        && !(1..=MAX_RETENTION_DAYS).contains(&days)
    {
        return Err(invalid(
            "audit.retention_days",
            format!("must be 1 to {MAX_RETENTION_DAYS} (leave it out to keep the trail forever)"),
        ));
    }
    let sink = match f.sink_file {
        None => {
            if f.sink_max_mb.is_some() || f.sink_keep_files.is_some() {
                return Err(invalid(
                    "audit",
                    "sink_max_mb and sink_keep_files need sink_file",
                ));
            }
            None
        }
        Some(file) => {
            let max_mb = f.sink_max_mb.unwrap_or(100);
            if !(1..=1_048_576).contains(&max_mb) {
                return Err(invalid("audit.sink_max_mb", "must be 1 to 1048576"));
            }
            let keep_files = f.sink_keep_files.unwrap_or(5);
            if !(1..=1000).contains(&keep_files) {
                return Err(invalid("audit.sink_keep_files", "must be 1 to 1000"));
            }
            let file = base.join(file);
            if file.file_name().is_none() {
                return Err(invalid("audit.sink_file", "must name a file"));
            }
            Some(SinkConfig {
                file,
                max_bytes: max_mb << 20,
                keep_files,
            })
        }
    };
    Ok(AuditConfig {
        retention_days: f.retention_days,
        sink,
    })
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileIssuer {
    issuer: String,
    audience: String,
    provider: String,
    public_key_file: Option<PathBuf>,
    jwks_url: Option<String>,
    #[serde(default)]
    jwks_allowed_networks: Vec<String>,
    #[serde(default)]
    jwks_allow_plain_http: bool,
    jwks_ca_file: Option<PathBuf>,
    max_age_seconds: Option<i64>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileLimits {
    max_request_bytes: Option<usize>,
    max_batch: Option<usize>,
    unauthenticated_per_second: Option<u32>,
    unauthenticated_burst: Option<u32>,
    unauthenticated_sources: Option<usize>,
    throttled_hold_max: Option<usize>,
    throttled_retry_max_seconds: Option<u64>,
    refusal_summary_seconds: Option<u64>,
    max_connections: Option<usize>,
    idle_timeout_seconds: Option<u64>,
    max_concurrent_streams: Option<u32>,
    http2_window_bytes: Option<u32>,
    max_queue_wait_ms: Option<u64>,
    overload_queue_wait_ms: Option<u64>,
    max_queued: Option<usize>,
    private_key_stuck_seconds: Option<u64>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileKeys {
    ingest_grace_seconds: Option<i64>,
    min_decrypt_version: Option<u32>,
    auto_rotate_days: Option<u32>,
    destroy_waiting_days: Option<u32>,
    backend: Option<String>,
    pkcs11: Option<FilePkcs11>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct FilePkcs11 {
    module: PathBuf,
    token_label: Option<String>,
    slot: Option<u64>,
    pin_file: Option<PathBuf>,
    max_sessions: Option<usize>,
}

/// Default `[keys.pkcs11] max_sessions`: parallel operations most HSMs take per client.
pub const DEFAULT_PKCS11_SESSIONS: usize = 4;

/// Checks `[keys] backend` and `[keys.pkcs11]`; the PIN comes from `TOKENVAULT_PKCS11_PIN`,
/// `TOKENVAULT_PKCS11_PIN_FILE` or `pin_file` (relative paths: the config file's directory),
/// never from the command line.
fn key_backend_from(
    backend: Option<String>,
    pkcs11: Option<FilePkcs11>,
    env: &dyn Strings,
    base: &Path,
) -> Result<KeyBackend, ConfigError> {
    match (backend.as_deref().unwrap_or("file"), pkcs11) {
        ("file", None) => Ok(KeyBackend::File),
        ("file", Some(_)) => Err(invalid(
            "keys.pkcs11",
            "set [keys] backend = \"pkcs11\" to use the token",
        )),
        ("pkcs11", None) => Err(invalid(
            "keys.pkcs11",
            "required with backend = \"pkcs11\" (module, token_label or slot, pin_file)",
        )),
        ("pkcs11", Some(p)) => {
            let token = match (p.token_label, p.slot) {
                (Some(label), None) if !label.is_empty() && label.len() <= 32 => {
                    tokenvault_pkcs11::TokenSelector::Label(label)
                }
                (Some(_), None) => {
                    return Err(invalid("keys.pkcs11.token_label", "must be 1 to 32 bytes"));
                }
                (None, Some(slot)) => tokenvault_pkcs11::TokenSelector::Slot(slot),
                _ => {
                    return Err(invalid(
                        "keys.pkcs11",
                        "set exactly one of token_label and slot",
                    ));
                }
            };
            let max_sessions = p.max_sessions.unwrap_or(DEFAULT_PKCS11_SESSIONS);
            if !(1..=256).contains(&max_sessions) {
                return Err(invalid("keys.pkcs11.max_sessions", "must be 1 to 256"));
            }
            let pin = match env.get(ENV_PKCS11_PIN) {
                Some(pin) => pin,
                None => {
                    let path = env
                        .get(ENV_PKCS11_PIN_FILE)
                        .map(PathBuf::from)
                        .or(p.pin_file.map(|f| base.join(f)))
                        .ok_or_else(|| {
                            invalid(
                                "keys.pkcs11.pin_file",
                                format!(
                                    "the token's user PIN is required: set pin_file, \
                                     {ENV_PKCS11_PIN} or {ENV_PKCS11_PIN_FILE}"
                                ),
                            )
                        })?;
                    std::fs::read_to_string(&path)
                        .map_err(|source| ConfigError::Read { path, source })?
                }
            };
            let pin = tokenvault_pkcs11::Pin::new(pin);
            Ok(KeyBackend::Pkcs11(tokenvault_pkcs11::TokenConfig {
                module: base.join(p.module),
                token,
                pin,
                max_sessions,
            }))
        }
        (other, _) => Err(invalid(
            "keys.backend",
            format!("{other:?} is not a key backend: \"file\" or \"pkcs11\""),
        )),
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileCredential {
    name: String,
    role: Role,
    sha256: Option<String>,
    mtls_identity: Option<String>,
    #[serde(default)]
    providers: Vec<String>,
    #[serde(default)]
    owner_prefixes: Vec<String>,
    #[serde(default)]
    kinds: Vec<String>,
    #[serde(default)]
    allowed_ips: Vec<String>,
    rate_per_second: Option<u32>,
    burst: Option<u32>,
    record_rate_per_second: Option<u32>,
    #[serde(default)]
    issue_grants: bool,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileStore {
    url: String,
    password_file: Option<PathBuf>,
    ca_file: Option<PathBuf>,
    pool_size: Option<usize>,
    instance: Option<String>,
}

/// A database named on the command line (`tokenvault store copy`), checked as `[store]` is: no
/// password in the URL (it comes from `password_file` or TOKENVAULT_STORE_PASSWORD), TLS with
/// `ca_file` unless the database is on loopback.
pub fn database_from_url(
    url: &str,
    password_file: Option<PathBuf>,
    ca_file: Option<PathBuf>,
    env: &dyn Strings,
) -> Result<PostgresConfig, ConfigError> {
    store_from(
        FileStore {
            url: url.to_string(),
            password_file,
            ca_file,
            pool_size: Some(4),
            instance: Some("store-copy".to_string()),
        },
        Path::new(""),
        env,
    )
}

/// Validates `[store]`: a PostgreSQL URL without a password, TLS unless loopback, a sane pool
/// and an instance name. Messages never echo the URL (it might hold a password).
fn store_from(
    file: FileStore,
    base: &Path,
    env: &dyn Strings,
) -> Result<PostgresConfig, ConfigError> {
    let connection: tokio_postgres::Config = file.url.parse().map_err(|_| {
        invalid(
            "store.url",
            "not a PostgreSQL connection URL (postgres://USER@HOST:PORT/DATABASE)",
        )
    })?;
    if connection.get_password().is_some() {
        return Err(invalid(
            "store.url",
            format!(
                "must not contain a password; put it in store.password_file or {ENV_STORE_PASSWORD}"
            ),
        ));
    }
    if connection.get_hosts().is_empty() {
        return Err(invalid("store.url", "names no host"));
    }
    let loopback = connection.get_hosts().iter().all(|h| match h {
        tokio_postgres::config::Host::Tcp(name) => {
            name == "localhost"
                || name
                    .parse::<std::net::IpAddr>()
                    .is_ok_and(|ip| ip.is_loopback())
        }
        tokio_postgres::config::Host::Unix(_) => true,
    });
    let ca_file = file.ca_file.map(|p| base.join(p));
    if ca_file.is_none() && !loopback {
        return Err(invalid(
            "store.ca_file",
            "required for a database that is not on loopback or a Unix socket: the connection \
             carries tokens' envelopes and the database password, so it must use TLS",
        ));
    }
    let password = match (env.get(ENV_STORE_PASSWORD), file.password_file) {
        (Some(p), _) => Some(Passphrase::new(p)),
        (None, Some(f)) => {
            let path = base.join(f);
            let mut text = std::fs::read_to_string(&path)
                .map_err(|source| ConfigError::Read { path, source })?;
            // A file written by `echo` ends in a newline that is not part of the password.
            if text.ends_with('\n') {
                text.pop();
                if text.ends_with('\r') {
                    text.pop();
                }
            }
            Some(Passphrase::new(text))
        }
        (None, None) => None,
    };
    let pool_size = file.pool_size.unwrap_or(DEFAULT_STORE_POOL_SIZE);
    if !(1..=1000).contains(&pool_size) {
        return Err(invalid("store.pool_size", "must be between 1 and 1000"));
    }
    let instance = file.instance.ok_or_else(|| {
        invalid(
            "store.instance",
            "required with store.url: a name unique to this daemon among those sharing the \
             database (1-64 of A-Z a-z 0-9 . _ -)",
        )
    })?;
    if crate::record::check_instance(&instance).is_err() {
        return Err(invalid(
            "store.instance",
            "must be 1-64 of A-Z a-z 0-9 . _ -",
        ));
    }
    Ok(PostgresConfig {
        connection,
        password,
        ca_file,
        pool_size,
        instance,
    })
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileDekCache {
    #[serde(default)]
    enabled: bool,
    max_entries: Option<usize>,
    ttl_seconds: Option<u64>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileTls {
    cert_file: PathBuf,
    key_file: PathBuf,
    client_ca_file: Option<PathBuf>,
    #[serde(default)]
    require_client_cert: bool,
}

/// Default request size limit: a full batch of maximum-size envelopes does not fit, on
/// purpose; large imports are split into several batches.
pub const DEFAULT_MAX_REQUEST_BYTES: usize = 4 * 1024 * 1024;
/// Default batch size limit.
pub const DEFAULT_MAX_BATCH: usize = 1000;

/// Refuses a provider whose `timeout_ms` is not below `[limits] idle_timeout_seconds`: a proxied
/// call moves no byte on the caller's connection while it waits on its provider, so the idle
/// timeout would cut it first. Also checked when providers are reloaded.
pub fn check_provider_timeouts(
    providers: &std::collections::BTreeMap<String, crate::provider::ProviderPolicy>,
    limits: &Limits,
) -> Result<(), ConfigError> {
    for (name, p) in providers {
        if p.timeout >= limits.idle_timeout {
            return Err(invalid(
                &format!("providers.{name}.timeout_ms"),
                format!(
                    "must be below [limits] idle_timeout_seconds ({} s): the idle timeout would cut a proxied call first",
                    limits.idle_timeout.as_secs()
                ),
            ));
        }
    }
    Ok(())
}

fn invalid(key: &str, message: impl Into<String>) -> ConfigError {
    ConfigError::Invalid {
        key: key.to_string(),
        message: message.into(),
    }
}

fn passphrase_from(
    env: &dyn Strings,
    file: Option<PathBuf>,
) -> Result<Option<Passphrase>, ConfigError> {
    if let Some(p) = env.get(ENV_KEY_PASSPHRASE) {
        return Ok(Some(Passphrase::new(p)));
    }
    let Some(path) = env.get(ENV_KEY_PASSPHRASE_FILE).map(PathBuf::from).or(file) else {
        return Ok(None);
    };
    let text = std::fs::read_to_string(&path).map_err(|source| ConfigError::Read {
        path: path.clone(),
        source,
    })?;
    Ok(Some(Passphrase::new(text)))
}

fn read_file(path: &Path) -> Result<FileConfig, ConfigError> {
    let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
        path: path.to_path_buf(),
        source,
    })?;
    toml::from_str(&text).map_err(|e| ConfigError::Parse {
        path: path.to_path_buf(),
        message: e.to_string(),
    })
}

impl Config {
    /// Loads `path` and applies environment overrides from `env`.
    pub fn load(path: &Path, env: &dyn Strings) -> Result<Self, ConfigError> {
        let file = read_file(path)?;
        let base = path.parent().unwrap_or(Path::new("."));
        let listen = env
            .get(ENV_LISTEN)
            .or(file.listen)
            .unwrap_or_else(|| format!("127.0.0.1:{DEFAULT_PORT}"));
        let listen = listen
            .parse()
            .map_err(|_| invalid("listen", "not an IP:port address"))?;
        let ingest_listen = file
            .ingest_listen
            .map(|a| a.parse())
            .transpose()
            .map_err(|_| invalid("ingest_listen", "not an IP:port address"))?;
        let data_dir = env
            .get(ENV_DATA_DIR)
            .map(PathBuf::from)
            .or(file.data_dir)
            .ok_or_else(|| invalid("data_dir", "required"))?;
        let key_dir = env
            .get(ENV_KEY_DIR)
            .map(PathBuf::from)
            .or(file.key_dir)
            .ok_or_else(|| invalid("key_dir", "required"))?;
        let mut credentials = Vec::new();
        let tls = file.tls.map(|t| TlsConfig {
            cert_file: base.join(t.cert_file),
            key_file: base.join(t.key_file),
            client_ca_file: t.client_ca_file.map(|p| base.join(p)),
            require_client_cert: t.require_client_cert,
        });
        let mtls = tls.as_ref().is_some_and(|t| t.client_ca_file.is_some());
        if tls
            .as_ref()
            .is_some_and(|t| t.require_client_cert && t.client_ca_file.is_none())
        {
            return Err(invalid(
                "tls.require_client_cert",
                "needs tls.client_ca_file",
            ));
        }
        for (i, c) in file.credentials.into_iter().enumerate() {
            let key = format!("credentials[{i}]");
            let sha256 = match c.sha256 {
                Some(h) => {
                    let mut sha256 = [0u8; 32];
                    hex::decode_to_slice(&h, &mut sha256)
                        .map_err(|_| invalid(&format!("{key}.sha256"), "must be 64 hex digits"))?;
                    Some(sha256)
                }
                None => None,
            };
            match (&sha256, &c.mtls_identity) {
                (Some(_), None) => {}
                (None, Some(_)) if mtls => {}
                (None, Some(_)) => {
                    return Err(invalid(&key, "mtls_identity needs tls.client_ca_file"));
                }
                _ => return Err(invalid(&key, "set exactly one of sha256 or mtls_identity")),
            }
            let kinds = c
                .kinds
                .iter()
                .map(|k| SecretKind::parse(k))
                .collect::<Result<_, _>>()
                .map_err(|e| invalid(&format!("{key}.kinds"), e.to_string()))?;
            let allowed_ips = crate::provider::networks(&c.allowed_ips).map_err(|()| {
                invalid(
                    &format!("{key}.allowed_ips"),
                    "each entry must be an IP or CIDR",
                )
            })?;
            if c.record_rate_per_second == Some(0) {
                return Err(invalid(
                    &format!("{key}.record_rate_per_second"),
                    "must be at least 1",
                ));
            }
            if c.rate_per_second == Some(0) {
                return Err(invalid(
                    &format!("{key}.rate_per_second"),
                    "must be at least 1",
                ));
            }
            credentials.push(CredentialEntry {
                name: c.name,
                role: c.role,
                sha256,
                mtls_identity: c.mtls_identity,
                policy: CallerPolicy {
                    providers: c.providers,
                    owner_prefixes: c.owner_prefixes,
                    kinds,
                    allowed_ips,
                    rate_per_second: c.rate_per_second,
                    burst: c.burst,
                    record_rate_per_second: c.record_rate_per_second,
                    issue_grants: c.issue_grants,
                },
            });
        }
        let limits = Limits::from_file(&file.limits)?;
        let shutdown_grace_seconds = file.shutdown_grace_seconds.unwrap_or(0);
        if shutdown_grace_seconds > MAX_SHUTDOWN_GRACE_SECONDS {
            return Err(invalid(
                "shutdown_grace_seconds",
                format!("must be at most {MAX_SHUTDOWN_GRACE_SECONDS}"),
            ));
        }
        let key_backend = key_backend_from(file.keys.backend, file.keys.pkcs11, env, base)?;
        let config = Config {
            shutdown_grace: std::time::Duration::from_secs(shutdown_grace_seconds),
            audit: audit_from(file.audit, base)?,
            key_backend,
            admin: admin_from(file.admin)?,
            webhooks: crate::webhook::parse(file.webhooks.unwrap_or_default(), base)
                .map_err(|e| invalid(&e.key, e.message))?,
            listen,
            ingest_listen,
            data_dir: base.join(data_dir),
            key_dir: base.join(key_dir),
            passphrase: passphrase_from(env, file.passphrase_file.map(|p| base.join(p)))?,
            block_cache_bytes: file.block_cache_mb.unwrap_or(64) << 20,
            store: match file.store {
                Some(f) => StoreConfig::Postgres(Box::new(store_from(f, base, env)?)),
                None => StoreConfig::Rocks,
            },
            limits,
            credentials,
            tls,
            insecure_plaintext: file.insecure_plaintext,
            dev: false,
            log: file.log.unwrap_or_else(|| "info".into()),
            dek_cache: match file.dek_cache {
                Some(c) if c.enabled => {
                    let cache = DekCacheConfig {
                        max_entries: c.max_entries.unwrap_or(10_000),
                        ttl_seconds: c.ttl_seconds.unwrap_or(300),
                    };
                    if cache.max_entries == 0 || cache.ttl_seconds == 0 {
                        return Err(invalid(
                            "dek_cache",
                            "max_entries and ttl_seconds must be > 0",
                        ));
                    }
                    Some(cache)
                }
                _ => None,
            },
            providers: crate::provider::parse_all(file.providers, base)?,
            source: Some(path.to_path_buf()),
            lock_memory: file.lock_memory.unwrap_or(true),
            log_format: log_format(env, file.log_format)?,
            metrics_listen: file
                .metrics_listen
                .map(|a| a.parse())
                .transpose()
                .map_err(|_| invalid("metrics_listen", "not an IP:port address"))?,
            security_event_issuers: file
                .security_event_issuers
                .into_iter()
                .enumerate()
                .map(|(i, f)| {
                    let key = format!("security_event_issuers[{i}]");
                    crate::record::Provider::parse(f.provider.as_str())
                        .map_err(|e| invalid(&format!("{key}.provider"), e.to_string()))?;
                    let keys = match (&f.public_key_file, &f.jwks_url) {
                        (Some(file), None) => crate::security_event::IssuerKeys::Static(
                            crate::security_event::VerifyingKey::from_pem_file(&base.join(file))
                                .map_err(|e| {
                                    invalid(&format!("{key}.public_key_file"), e.to_string())
                                })?,
                        ),
                        (None, Some(url)) => {
                            // The fetch goes through a provider client of its own: that URL's
                            // host only, https unless allowed, no private address unless listed.
                            // An issuer behind a private CA: its roots instead of the
                            // bundled public ones, read now so a bad file stops the start.
                            let ca_file = f.jwks_ca_file.as_ref().map(|p| base.join(p));
                            if let Some(ca) = &ca_file {
                                crate::ca::roots_from_file(ca).map_err(|e| {
                                    invalid(&format!("{key}.jwks_ca_file"), e.to_string())
                                })?;
                            }
                            let policy = crate::provider::jwks_policy(
                                &key,
                                url,
                                &f.jwks_allowed_networks,
                                f.jwks_allow_plain_http,
                                ca_file,
                            )
                            .map_err(ConfigError::from)?;
                            let uri: http::Uri = url
                                .parse()
                                .map_err(|_| invalid(&format!("{key}.jwks_url"), "not a URL"))?;
                            crate::security_event::IssuerKeys::Jwks(std::sync::Arc::new(
                                crate::security_event::Jwks::new(uri, policy),
                            ))
                        }
                        _ => {
                            return Err(invalid(
                                &key,
                                "set exactly one of public_key_file and jwks_url",
                            ));
                        }
                    };
                    Ok(crate::security_event::Issuer {
                        key: keys,
                        issuer: f.issuer,
                        audience: f.audience,
                        provider: f.provider,
                        max_age_seconds: f.max_age_seconds.unwrap_or(300).max(1),
                    })
                })
                .collect::<Result<_, ConfigError>>()?,
            key_policy: KeyPolicy {
                ingest_grace_seconds: file
                    .keys
                    .ingest_grace_seconds
                    .unwrap_or(DEFAULT_INGEST_GRACE_SECONDS)
                    .max(0),
                min_decrypt_version: file.keys.min_decrypt_version.unwrap_or(0),
                auto_rotate_seconds: match file.keys.auto_rotate_days {
                    Some(0) => return Err(invalid("keys.auto_rotate_days", "must be at least 1")),
                    d => d.map(|d| i64::from(d) * 86_400),
                },
                destroy_waiting_seconds: match file
                    .keys
                    .destroy_waiting_days
                    .unwrap_or(DEFAULT_DESTROY_WAITING_DAYS)
                {
                    d if DESTROY_WAITING_DAYS.contains(&d) => i64::from(d) * 86_400,
                    _ => {
                        return Err(invalid(
                            "keys.destroy_waiting_days",
                            "must be 1 to 30 (days a destroyed version stays pending and cancellable)",
                        ));
                    }
                },
            },
        };
        config.check_listen()?;
        check_provider_timeouts(&config.providers, &config.limits)?;
        Ok(config)
    }

    /// The development profile: `./data` and `./keys/dev` under `base`, loopback only,
    /// credentials supplied by the caller, keyring created on first run.
    pub fn dev(
        base: &Path,
        listen: SocketAddr,
        credentials: Vec<CredentialEntry>,
        env: &dyn Strings,
    ) -> Result<Self, ConfigError> {
        if !listen.ip().is_loopback() {
            return Err(invalid(
                "listen",
                "--dev listens on loopback addresses only",
            ));
        }
        Ok(Config {
            listen,
            ingest_listen: None,
            data_dir: base.join("data"),
            key_dir: base.join("keys").join("dev"),
            passphrase: passphrase_from(env, None)?,
            block_cache_bytes: 16 << 20,
            store: StoreConfig::Rocks,
            limits: Limits::standard(),
            credentials,
            tls: None,
            insecure_plaintext: false,
            dev: true,
            log: "info".into(),
            key_policy: KeyPolicy::standard(),
            dek_cache: None,
            providers: std::collections::BTreeMap::new(),
            source: None,
            security_event_issuers: Vec::new(),
            lock_memory: true,
            shutdown_grace: std::time::Duration::ZERO,
            audit: AuditConfig::default(),
            key_backend: KeyBackend::File,
            admin: AdminPolicy::default(),
            webhooks: crate::webhook::WebhookConfig::default(),
            metrics_listen: Some(SocketAddr::new(listen.ip(), 0)),
            log_format: log_format(env, None)?,
        })
    }

    /// Re-reads only the `[providers]` tables of `path` (hot reload; other settings need a
    /// restart).
    pub fn load_providers(
        path: &Path,
    ) -> Result<std::collections::BTreeMap<String, crate::provider::ProviderPolicy>, ConfigError>
    {
        let file = read_file(path)?;
        Ok(crate::provider::parse_all(
            file.providers,
            path.parent().unwrap_or(Path::new(".")),
        )?)
    }

    fn check_listen(&self) -> Result<(), ConfigError> {
        let public = !self.listen.ip().is_loopback()
            || self.ingest_listen.is_some_and(|a| !a.ip().is_loopback());
        if public && self.tls.is_none() && !self.insecure_plaintext {
            return Err(invalid(
                "listen",
                "refusing plaintext gRPC on a non-loopback address; configure [tls], or set \
                 insecure_plaintext = true only behind a TLS-terminating proxy",
            ));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write(dir: &Path, text: &str) -> PathBuf {
        let p = dir.join("tokenvault.toml");
        std::fs::write(&p, text).expect("write");
        p
    }

    #[test]
    fn loads_file_with_env_overrides_and_relative_paths() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let hash = "ab".repeat(32);
        let path = write(
            tmp.path(),
            &format!(
                "data_dir = \"d\"\nkey_dir = \"/abs/k\"\n[limits]\nmax_batch = 10\n\
                 [keys]\ningest_grace_seconds = 60\nmin_decrypt_version = 2\nauto_rotate_days = 90\ndestroy_waiting_days = 12\n\
                 [[credentials]]\nname = \"web\"\nrole = \"ingest\"\nsha256 = \"{hash}\"\n"
            ),
        );
        let mut env = HashMap::new();
        env.insert(ENV_LISTEN.to_string(), "127.0.0.1:6000".to_string());
        env.insert(ENV_KEY_PASSPHRASE.to_string(), "pw".to_string());
        let c = Config::load(&path, &env).expect("loads");
        assert_eq!(c.listen, "127.0.0.1:6000".parse().expect("addr"));
        assert_eq!(c.data_dir, tmp.path().join("d"));
        assert_eq!(c.key_dir, PathBuf::from("/abs/k"));
        assert_eq!(c.limits.max_batch, 10);
        assert_eq!(
            c.key_policy,
            KeyPolicy {
                ingest_grace_seconds: 60,
                min_decrypt_version: 2,
                auto_rotate_seconds: Some(90 * 86_400),
                destroy_waiting_seconds: 12 * 86_400,
            }
        );
        assert_eq!(c.credentials[0].role, Role::Ingest);
        assert_eq!(c.credentials[0].sha256, Some([0xab; 32]));
        assert_eq!(c.passphrase.expect("set").expose_secret(), "pw");
    }

    #[test]
    fn rejects_unknown_keys_bad_hashes_and_public_plaintext() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let env = HashMap::new();
        let p = write(
            tmp.path(),
            "data_dir = \"d\"\nkey_dir = \"k\"\npassword = \"x\"\n",
        );
        assert!(matches!(
            Config::load(&p, &env),
            Err(ConfigError::Parse { .. })
        ));
        let p = write(
            tmp.path(),
            "data_dir = \"d\"\nkey_dir = \"k\"\n[[credentials]]\nname = \"a\"\nrole = \"admin\"\nsha256 = \"xyz\"\n",
        );
        let err = Config::load(&p, &env).expect_err("bad hash");
        assert_eq!(
            err.to_string(),
            "credentials[0].sha256: must be 64 hex digits"
        );
        let p = write(
            tmp.path(),
            "listen = \"0.0.0.0:1\"\ndata_dir = \"d\"\nkey_dir = \"k\"\n",
        );
        assert!(
            Config::load(&p, &env)
                .expect_err("public")
                .to_string()
                .contains("non-loopback")
        );
        let p = write(
            tmp.path(),
            "listen = \"0.0.0.0:1\"\ndata_dir = \"d\"\nkey_dir = \"k\"\ninsecure_plaintext = true\n",
        );
        assert!(Config::load(&p, &env).is_ok());
        let p = write(tmp.path(), "key_dir = \"k\"\n");
        assert_eq!(
            Config::load(&p, &env).expect_err("missing").to_string(),
            "data_dir: required"
        );
    }

    #[test]
    fn reads_the_audit_table() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let p = write(
            tmp.path(),
            "data_dir = \"d\"\nkey_dir = \"k\"\n[audit]\nretention_days = 90\nsink_file = \"log/audit.jsonl\"\nsink_max_mb = 7\nsink_keep_files = 3\n",
        );
        let c = Config::load(&p, &HashMap::new()).expect("loads");
        assert_eq!(
            c.audit,
            AuditConfig {
                retention_days: Some(90),
                sink: Some(SinkConfig {
                    file: tmp.path().join("log/audit.jsonl"),
                    max_bytes: 7 << 20,
                    keep_files: 3,
                }),
            }
        );
        let p = write(tmp.path(), "data_dir = \"d\"\nkey_dir = \"k\"\n");
        let c = Config::load(&p, &HashMap::new()).expect("loads");
        assert_eq!(c.audit, AuditConfig::default(), "kept forever, not shipped");
    }

    /// The README's `[limits]` reference, as written, is every limit at its default: a key
    /// renamed, left out of the README or documented with another default fails here.
    #[test]
    fn the_readme_limits_table_is_the_defaults() {
        let readme =
            std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("../../README.md"))
                .expect("README.md");
        let table: Vec<&str> = readme
            .lines()
            .skip_while(|l| l.trim() != "[limits]")
            .take_while(|l| !l.trim().is_empty())
            .collect();
        assert!(table.len() > 10, "no [limits] table in README.md");
        let tmp = tempfile::tempdir().expect("tempdir");
        let p = write(
            tmp.path(),
            &format!("data_dir = \"d\"\nkey_dir = \"k\"\n{}\n", table.join("\n")),
        );
        let c = Config::load(&p, &HashMap::new()).expect("the README's [limits] loads");
        assert_eq!(c.limits, Limits::standard());
        // Every key of the file format is in it.
        for key in [
            "max_request_bytes",
            "max_batch",
            "unauthenticated_per_second",
            "unauthenticated_burst",
            "unauthenticated_sources",
            "throttled_hold_max",
            "throttled_retry_max_seconds",
            "refusal_summary_seconds",
            "max_connections",
            "idle_timeout_seconds",
            "max_concurrent_streams",
            "http2_window_bytes",
            "max_queue_wait_ms",
            "overload_queue_wait_ms",
            "max_queued",
            "private_key_stuck_seconds",
        ] {
            assert!(
                table.iter().any(|l| l.starts_with(&format!("{key} "))),
                "{key} is not in the README's [limits]"
            );
        }
    }

    #[test]
    fn every_limit_loads_from_the_file_and_defaults_otherwise() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let p = write(tmp.path(), "data_dir = \"d\"\nkey_dir = \"k\"\n");
        let c = Config::load(&p, &HashMap::new()).expect("loads");
        assert_eq!(c.limits, Limits::standard());
        let p = write(
            tmp.path(),
            "data_dir = \"d\"\nkey_dir = \"k\"\n[limits]\nunauthenticated_per_second = 2\n\
             unauthenticated_burst = 3\nunauthenticated_sources = 4\nrefusal_summary_seconds = 5\n\
             max_connections = 6\nidle_timeout_seconds = 7\nmax_concurrent_streams = 8\n\
             max_queue_wait_ms = 9\noverload_queue_wait_ms = 8\nmax_queued = 10\n\
             throttled_hold_max = 11\n\
             throttled_retry_max_seconds = 12\nprivate_key_stuck_seconds = 13\n\
             http2_window_bytes = 65536\n",
        );
        let c = Config::load(&p, &HashMap::new()).expect("loads");
        assert_eq!(
            c.limits,
            Limits {
                refusals: RefusalLimits {
                    per_second: 2,
                    burst: 3,
                    sources: 4,
                    hold_max: 11,
                    retry_max: std::time::Duration::from_secs(12),
                },
                refusal_summary: std::time::Duration::from_secs(5),
                max_connections: 6,
                idle_timeout: std::time::Duration::from_secs(7),
                max_concurrent_streams: 8,
                http2_window_bytes: 65_536,
                max_queue_wait: std::time::Duration::from_millis(9),
                overload_queue_wait: std::time::Duration::from_millis(8),
                max_queued: 10,
                private_key_stuck: std::time::Duration::from_secs(13),
                ..Limits::standard()
            }
        );
        // A max_queue_wait_ms below the overload default brings that default down with it.
        let p = write(
            tmp.path(),
            "data_dir = \"d\"\nkey_dir = \"k\"\n[limits]\nmax_queue_wait_ms = 1\n",
        );
        let c = Config::load(&p, &HashMap::new()).expect("loads");
        assert_eq!(
            (c.limits.max_queue_wait, c.limits.overload_queue_wait),
            (
                std::time::Duration::from_millis(1),
                std::time::Duration::from_millis(1)
            )
        );
    }

    #[test]
    fn rejects_bad_listener_and_key_policy_values() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let env = HashMap::new();
        for (extra, msg) in [
            (
                "ingest_listen = \"nope\"\n",
                "ingest_listen: not an IP:port address",
            ),
            (
                "ingest_listen = \"0.0.0.0:9\"\n",
                "listen: refusing plaintext gRPC",
            ),
            (
                "[keys]\nauto_rotate_days = 0\n",
                "keys.auto_rotate_days: must be at least 1",
            ),
            ("[keys]\nmin_decrypt_version = -1\n", "config file"),
            (
                "[admin]\napprovals_required = 0\n",
                "admin.approvals_required: must be 1 to 5",
            ),
            (
                "[admin]\napprovals_required = 6\n",
                "admin.approvals_required: must be 1 to 5",
            ),
            (
                "[admin]\napproval_ttl_minutes = 10081\n",
                "admin.approval_ttl_minutes: must be 1 to 10080",
            ),
            ("[admin]\napprovals = 2\n", "unknown field `approvals`"),
            (
                "[keys]\ndestroy_waiting_days = 0\n",
                "keys.destroy_waiting_days: must be 1 to 30",
            ),
            (
                "[keys]\ndestroy_waiting_days = 31\n",
                "keys.destroy_waiting_days: must be 1 to 30",
            ),
            (
                "[keys]\nbackend = \"hsm\"\n",
                "keys.backend: \"hsm\" is not a key backend: \"file\" or \"pkcs11\"",
            ),
            (
                "[keys]\nbackend = \"pkcs11\"\n",
                "keys.pkcs11: required with backend = \"pkcs11\"",
            ),
            (
                "[keys.pkcs11]\nmodule = \"m.so\"\nslot = 1\npin_file = \"p\"\n",
                "keys.pkcs11: set [keys] backend = \"pkcs11\" to use the token",
            ),
            (
                "[keys]\nbackend = \"pkcs11\"\n[keys.pkcs11]\nmodule = \"m.so\"\nslot = 1\ntoken_label = \"t\"\npin_file = \"p\"\n",
                "keys.pkcs11: set exactly one of token_label and slot",
            ),
            (
                "[keys]\nbackend = \"pkcs11\"\n[keys.pkcs11]\nmodule = \"m.so\"\ntoken_label = \"\"\npin_file = \"p\"\n",
                "keys.pkcs11.token_label: must be 1 to 32 bytes",
            ),
            (
                "[keys]\nbackend = \"pkcs11\"\n[keys.pkcs11]\nmodule = \"m.so\"\nslot = 1\n",
                "keys.pkcs11.pin_file: the token's user PIN is required",
            ),
            (
                "[keys]\nbackend = \"pkcs11\"\n[keys.pkcs11]\nmodule = \"m.so\"\nslot = 1\npin_file = \"missing-pin\"\n",
                "missing-pin",
            ),
            (
                "[keys]\nbackend = \"pkcs11\"\n[keys.pkcs11]\nmodule = \"m.so\"\nslot = 1\npin = \"1234\"\n",
                "unknown field `pin`",
            ),
            (
                "[keys]\nbackend = \"pkcs11\"\n[keys.pkcs11]\nmodule = \"m.so\"\nslot = 1\nmax_sessions = 0\n",
                "keys.pkcs11.max_sessions: must be 1 to 256",
            ),
            (
                "metrics_listen = \"nope\"\n",
                "metrics_listen: not an IP:port address",
            ),
            ("log_format = \"xml\"\n", "unknown variant `xml`"),
            (
                "shutdown_grace_seconds = 301\n",
                "shutdown_grace_seconds: must be at most 300",
            ),
            ("shutdown_grace_seconds = -1\n", "config file"),
            ("shutdown_grace_seconds = \"5\"\n", "invalid type"),
            (
                "[limits]\nunauthenticated_per_second = 0\n",
                "limits.unauthenticated_per_second: must be 1 to 1000000",
            ),
            (
                "[limits]\nunauthenticated_burst = 1000001\n",
                "limits.unauthenticated_burst: must be 1 to 1000000",
            ),
            (
                "[limits]\nunauthenticated_sources = 0\n",
                "limits.unauthenticated_sources: must be 1 to 1000000",
            ),
            (
                "[limits]\nthrottled_hold_max = 1000001\n",
                "limits.throttled_hold_max: must be 0 to 1000000",
            ),
            ("[limits]\nthrottled_hold_max = -1\n", "config file"),
            (
                "[limits]\nthrottled_retry_max_seconds = 0\n",
                "limits.throttled_retry_max_seconds: must be 1 to 3600",
            ),
            (
                "[limits]\nthrottled_retry_max_seconds = 3601\n",
                "limits.throttled_retry_max_seconds: must be 1 to 3600",
            ),
            (
                "[limits]\nrefusal_summary_seconds = 3601\n",
                "limits.refusal_summary_seconds: must be 1 to 3600",
            ),
            (
                "[limits]\nmax_connections = 0\n",
                "limits.max_connections: must be 1 to 1000000",
            ),
            (
                "[limits]\nidle_timeout_seconds = 0\n",
                "limits.idle_timeout_seconds: must be 1 to 86400",
            ),
            (
                "[limits]\nhttp2_window_bytes = 65534\n",
                "limits.http2_window_bytes: must be 65535 to 16777216",
            ),
            (
                "[limits]\nmax_concurrent_streams = 0\n",
                "limits.max_concurrent_streams: must be 1 to 10000",
            ),
            (
                "[limits]\nmax_queue_wait_ms = 60001\n",
                "limits.max_queue_wait_ms: must be 1 to 60000",
            ),
            (
                "[limits]\noverload_queue_wait_ms = 0\n",
                "limits.overload_queue_wait_ms: must be 1 to 60000",
            ),
            (
                "[limits]\noverload_queue_wait_ms = 251\n",
                "limits.overload_queue_wait_ms: must not exceed max_queue_wait_ms (250)",
            ),
            (
                "[limits]\nmax_queue_wait_ms = 20\noverload_queue_wait_ms = 21\n",
                "limits.overload_queue_wait_ms: must not exceed max_queue_wait_ms (20)",
            ),
            (
                "[limits]\nmax_queued = 0\n",
                "limits.max_queued: must be 1 to 1000000",
            ),
            ("[limits]\nmax_queued = -1\n", "config file"),
            (
                "[limits]\nprivate_key_stuck_seconds = 0\n",
                "limits.private_key_stuck_seconds: must be 1 to 3600",
            ),
            ("[limits]\nidle_timeout_seconds = \"30\"\n", "invalid type"),
            (
                "[limits]\nmax_connection = 5\n",
                "unknown field `max_connection`",
            ),
            (
                "[[security_event_issuers]]\nissuer = \"i\"\naudience = \"a\"\nprovider = \"p\"\npublic_key_file = \"missing.pem\"\n",
                "security_event_issuers[0].public_key_file: reading",
            ),
            (
                "[[security_event_issuers]]\nissuer = \"i\"\naudience = \"a\"\nprovider = \"p\"\npublic_key_file = \"tokenvault.toml\"\n",
                "security_event_issuers[0].public_key_file: ",
            ),
            (
                "[[security_event_issuers]]\nissuer = \"i\"\naudience = \"a\"\nprovider = \"Bad Provider\"\npublic_key_file = \"k.pem\"\n",
                "security_event_issuers[0].provider",
            ),
            (
                "[providers.x]\nbase_url = \"https://a\"\nunknown = 1\n",
                "unknown field `unknown`",
            ),
            (
                "[audit]\nretention_days = 0\n",
                "audit.retention_days: must be 1 to 36500",
            ),
            (
                "[audit]\nretention_days = 36501\n",
                "audit.retention_days: must be 1 to 36500",
            ),
            ("[audit]\nretention_days = -3\n", "config file"),
            ("[audit]\nretention_days = \"30\"\n", "invalid type"),
            (
                "[audit]\nsink_max_mb = 5\n",
                "audit: sink_max_mb and sink_keep_files need sink_file",
            ),
            (
                "[audit]\nsink_file = \"a.jsonl\"\nsink_max_mb = 0\n",
                "audit.sink_max_mb: must be 1 to 1048576",
            ),
            (
                "[audit]\nsink_file = \"a.jsonl\"\nsink_keep_files = 0\n",
                "audit.sink_keep_files: must be 1 to 1000",
            ),
            (
                "[audit]\nsink_file = \"a.jsonl\"\nsink_keep_files = 1001\n",
                "audit.sink_keep_files: must be 1 to 1000",
            ),
            (
                "[audit]\nsink_file = \"..\"\n",
                "audit.sink_file: must name a file",
            ),
            ("[audit]\nretain = 3\n", "unknown field `retain`"),
        ] {
            let p = write(
                tmp.path(),
                &format!("data_dir = \"d\"\nkey_dir = \"k\"\n{extra}"),
            );
            let err = Config::load(&p, &env).expect_err(msg).to_string();
            assert!(err.contains(msg), "{extra:?}: {err}");
        }
    }

    #[test]
    fn log_format_comes_from_env_then_file() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let p = write(
            tmp.path(),
            "data_dir = \"d\"\nkey_dir = \"k\"\nlog_format = \"json\"\n",
        );
        let mut env = HashMap::new();
        assert_eq!(
            Config::load(&p, &env).expect("loads").log_format,
            LogFormat::Json
        );
        env.insert(ENV_LOG_FORMAT.to_string(), "pretty".to_string());
        assert_eq!(
            Config::load(&p, &env).expect("loads").log_format,
            LogFormat::Pretty
        );
        env.insert(ENV_LOG_FORMAT.to_string(), "yaml".to_string());
        assert_eq!(
            Config::load(&p, &env).expect_err("bad env").to_string(),
            "TOKENVAULT_LOG_FORMAT: must be json or pretty"
        );
    }

    /// deploy/tokenvault.toml is a configuration the daemon accepts as shipped.
    #[test]
    fn the_sample_production_config_loads() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../deploy/tokenvault.toml");
        let mut env = HashMap::new();
        env.insert(ENV_KEY_PASSPHRASE.to_string(), "x".to_string());
        let c = Config::load(&path, &env).expect("sample config loads");
        assert_eq!(c.data_dir, PathBuf::from("/var/lib/tokenvault/data"));
        assert!(c.tls.as_ref().is_some_and(|t| t.client_ca_file.is_some()));
        assert_eq!(c.credentials.len(), 3);
        assert_eq!(c.log_format, LogFormat::Json);
        assert!(c.lock_memory && c.metrics_listen.is_some());
        assert!(c.providers["github"].oauth.is_some());
    }

    #[test]
    fn dev_profile_is_loopback_only() {
        let env = HashMap::new();
        let base = Path::new("/tmp/x");
        assert!(Config::dev(base, "0.0.0.0:50051".parse().expect("addr"), vec![], &env).is_err());
        let c = Config::dev(base, "127.0.0.1:0".parse().expect("addr"), vec![], &env).expect("ok");
        assert_eq!(c.data_dir, base.join("data"));
        assert_eq!(c.key_dir, base.join("keys/dev"));
    }
}
