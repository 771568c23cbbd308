//! The privileged daemon: gRPC services `Ingest`, `Broker` and `Admin` over one store and
//! keyring, plus `grpc.health.v1.Health` and server reflection.
//!
//! Owns: [`Daemon`] (open store + keyring, then serve on a listener until shutdown), the
//! service implementations, authentication ([`auth`]) and the one error → status mapping
//! ([`status`]). Handlers convert proto requests into domain types first (`TryFrom`, failing
//! with `INVALID_ARGUMENT`), then call `envelope`, `keys` and `store`.
//!
//! Architecture invariant: only this module and `cli` touch proto types. RSA and RocksDB work
//! runs on the blocking pool, never on the async executor's threads.

mod admin;
pub mod auth;
mod broker;
mod commit;
mod cpu_pool;
pub mod dek_cache;
mod grants;
#[cfg(fuzzing)]
pub mod ingest;
#[cfg(not(fuzzing))]
mod ingest;
pub mod metrics;
mod records;
mod refresh;
pub mod status;
pub mod tls;

use std::future::Future;
use std::path::Path;
use std::sync::{Arc, RwLock};

use thiserror::Error;
use tokio::net::TcpListener;

use crate::api::v1::admin_server::AdminServer;
use crate::api::v1::broker_server::BrokerServer;
use crate::api::v1::ingest_server::IngestServer;
use crate::audit::{AuditError, Auditor, Draft};
use crate::config::{Config, KeyPolicy, Limits, Role};
use crate::keys::KeyError;
use crate::keys::keyring::{KeyDir, Keyring};
use crate::store::AuditAppend;
use crate::store::{RocksStore, StoreError, TokenStore};
use auth::{Authenticator, RoleGuard};
use status::ServiceError;

/// Why the daemon could not start.
#[derive(Debug, Error)]
#[non_exhaustive]
pub enum StartError {
    /// The store could not be opened.
    #[error("opening the store: {0}")]
    Store(#[from] StoreError),
    /// The keyring could not be loaded or created.
    #[error("loading the keyring: {0}")]
    Keys(#[from] KeyError),
    /// The audit trail could not be opened.
    #[error("opening the audit trail: {0}")]
    Audit(#[from] AuditError),
    /// A listener could not be served.
    #[error("listener: {0}")]
    Listener(String),
    /// The TLS configuration could not be loaded.
    #[error("TLS: {0}")]
    Tls(#[from] tls::TlsSetupError),
    /// A provider's configuration could not be used.
    #[error("providers: {0}")]
    Providers(#[from] crate::proxy::UpstreamSetupError),
    /// The pool of private-key threads or the commit thread could not start.
    #[error("starting the {what} thread(s): {source}")]
    Threads {
        /// Which.
        what: &'static str,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// The gRPC server failed.
    #[error("gRPC server: {0}")]
    Transport(#[from] tonic::transport::Error),
}

/// Shared state of all services.
pub(crate) struct State {
    store: Arc<dyn TokenStore>,
    keyring: RwLock<Arc<Keyring>>,
    limits: Limits,
    key_dir: KeyDir,
    policy: KeyPolicy,
    /// Serializes key lifecycle operations (rotate, retire, destroy, keyring reloads).
    key_ops: std::sync::Mutex<()>,
    /// Set while a rewrap runs; one at a time.
    rewrapping: std::sync::atomic::AtomicBool,
    /// The audit trail.
    audit: Arc<Auditor>,
    /// Unwrapped data keys of recently read records, if enabled.
    dek_cache: Option<dek_cache::DekCache>,
    /// Per caller and record token buckets (bounded: least recently used pairs are dropped).
    record_buckets:
        std::sync::Mutex<lru::LruCache<(String, crate::record::RecordId), auth::Bucket>>,
    /// Upstream clients by provider; replaced wholesale on reload.
    upstreams: RwLock<Arc<crate::proxy::Upstreams>>,
    /// The config file providers are reloaded from, if the daemon has one.
    config_source: Option<std::path::PathBuf>,
    /// One refresh at a time per record.
    single_flight: refresh::SingleFlight,
    /// Trusted issuers of provider security events.
    security_event_issuers: Vec<crate::security_event::Issuer>,
    /// Prometheus metrics.
    metrics: Arc<metrics::Metrics>,
    /// Group commit of ingest writes.
    commit: commit::GroupCommit,
    /// One thread per core for private-key work.
    cpu: cpu_pool::CpuPool,
    /// Cancelled when shutdown begins: long-running work (rewrap, audit streams, background
    /// jobs) stops at its next safe point.
    stopping: tokio_util::sync::CancellationToken,
    /// Every task the daemon starts beyond request handlers; `serve` waits for all of them,
    /// since they may hold the store.
    tasks: tokio_util::task::TaskTracker,
    /// How long health says NOT_SERVING before the listeners close.
    shutdown_grace: std::time::Duration,
}

impl State {
    fn upstreams(&self) -> Arc<crate::proxy::Upstreams> {
        Arc::clone(
            &self
                .upstreams
                .read()
                .unwrap_or_else(std::sync::PoisonError::into_inner),
        )
    }

    /// Re-reads the providers from the config file; on any error the old ones stay.
    async fn reload_providers(&self, caller: &str) -> Result<Vec<String>, ServiceError> {
        let path = self.config_source.clone().ok_or_else(|| {
            ServiceError::Reload("the daemon was started without a config file".into())
        })?;
        let draft = Draft::new(caller, "ReloadProviders");
        let loaded = self
            .tasks
            .spawn_blocking(move || {
                let policies = Config::load_providers(&path)
                    .map_err(|e| ServiceError::Reload(e.to_string()))?;
                crate::proxy::Upstreams::new(policies.values())
                    .map_err(|e| ServiceError::Reload(e.to_string()))
            })
            .await
            .map_err(|_| ServiceError::Task)?;
        match loaded {
            Ok(upstreams) => {
                let names = upstreams.names();
                *self
                    .upstreams
                    .write()
                    .unwrap_or_else(std::sync::PoisonError::into_inner) = Arc::new(upstreams);
                self.audit.append(&draft.detail(names.join(",")), true)?;
                tracing::info!(providers = ?names, "providers reloaded");
                Ok(names)
            }
            Err(e) => {
                self.audit_outcome(draft, &e);
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

    /// Reloads the keyring from the registry and key files after a lifecycle change.
    fn reload_keyring(&self) -> Result<Arc<Keyring>, ServiceError> {
        let ring = Arc::new(
            Keyring::load(self.store.keys()?, &self.key_dir)?
                .with_min_version(self.policy.min_decrypt_version),
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
        write: impl FnOnce(&AuditAppend) -> Result<(T, bool), ServiceError>,
    ) -> Result<T, ServiceError> {
        let result = self.audit.append_with(&draft, write);
        self.audit_if_refused(draft, result)
    }

    /// Passes `result` through, auditing `draft` as refused when it is an error.
    fn audit_if_refused<T>(
        &self,
        draft: Draft,
        result: Result<T, ServiceError>,
    ) -> Result<T, ServiceError> {
        if let Err(e) = &result {
            self.audit_outcome(draft, e);
        }
        result
    }

    /// Records a refusal or failure; the original error is what the caller sees either way.
    fn audit_outcome(&self, draft: Draft, e: &ServiceError) {
        let draft = draft.outcome(format!("{:?}", e.code()));
        if let Err(audit_err) = self.audit.append(&draft, true) {
            tracing::error!(error = %audit_err, "could not audit a refused request");
        }
    }

    /// Takes a token from the caller's bucket for this record, if it has a per-record limit.
    fn record_token(
        &self,
        caller: &str,
        policy: &crate::config::CallerPolicy,
        id: &crate::record::RecordId,
    ) -> Result<(), ServiceError> {
        let Some(rate) = policy.record_rate_per_second else {
            return Ok(());
        };
        let limited = || metrics::Metrics::count(&self.metrics.rate_limited, "record");
        let mut buckets = self
            .record_buckets
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let bucket = buckets.get_or_insert_mut((caller.to_string(), id.clone()), || {
            auth::Bucket::full(rate)
        });
        if bucket.take(rate, rate) {
            Ok(())
        } else {
            limited();
            Err(ServiceError::RecordRateLimited {
                caller: caller.to_string(),
                rate,
                id: id.to_string(),
            })
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

    /// Like [`State::blocking`], for work dominated by a private-key operation: it runs on the
    /// pool of one thread per core, queued behind the work already there.
    async fn cpu_bound<T: Send + 'static>(
        self: &Arc<Self>,
        f: impl FnOnce(&State) -> Result<T, ServiceError> + Send + 'static,
    ) -> Result<T, ServiceError> {
        let state = Arc::clone(self);
        self.cpu
            .run(move || f(&state))
            .await
            .ok_or(ServiceError::Task)?
    }

    /// Runs blocking work (RocksDB, RSA) off the async executor.
    async fn blocking<T: Send + 'static>(
        self: &Arc<Self>,
        f: impl FnOnce(&State) -> Result<T, ServiceError> + Send + 'static,
    ) -> Result<T, ServiceError> {
        let state = Arc::clone(self);
        // Tracked, so `serve` waits for it even when the request that started it was dropped.
        self.tasks
            .spawn_blocking(move || f(&state))
            .await
            .map_err(|_| ServiceError::Task)?
    }
}

/// An opened daemon: store and keyring loaded, ready to serve.
pub struct Daemon {
    state: Arc<State>,
    auth: Arc<Authenticator>,
    tls: Option<tonic::transport::ServerTlsConfig>,
    metrics_listener: Option<TcpListener>,
}

impl std::fmt::Debug for Daemon {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Daemon").finish_non_exhaustive()
    }
}

impl Daemon {
    /// Opens the RocksDB store and the keyring named by `config`. In the dev profile an empty
    /// keyring is initialized with a fresh RSA-2048 key.
    pub fn open(config: &Config) -> Result<Self, StartError> {
        let store = RocksStore::open(&config.data_dir, config.block_cache_bytes)?;
        Self::with_store(Arc::new(store), config)
    }

    /// Like [`Daemon::open`] over any store.
    pub fn with_store(store: Arc<dyn TokenStore>, config: &Config) -> Result<Self, StartError> {
        let dir = KeyDir::new(&config.key_dir, config.passphrase.clone());
        let audit = Arc::new(Auditor::open(Arc::clone(&store), &config.key_dir)?);
        if config.dev && store.keys()?.is_empty() {
            // Recorded like every other key change: registry write and audit event together.
            let draft = Draft::new("dev-profile", "InitKeys").detail("version 1, development");
            let info = audit.append_with(&draft, |a| {
                let key = crate::keys::PrivateKey::generate()?;
                Ok::<_, StartError>((
                    crate::rotation::add_version_audited(
                        &*store,
                        &dir,
                        key,
                        crate::unix_now(),
                        Some(a),
                    )?,
                    true,
                ))
            })?;
            tracing::info!(version = info.version, fingerprint = %info.id, key_dir = %dir.path().display(), "created development keyring");
        }
        let ring = Keyring::load(store.keys()?, &dir)?
            .with_min_version(config.key_policy.min_decrypt_version);
        let (active, _) = ring.active();
        tracing::info!(version = active.version, fingerprint = %active.id, "keyring loaded");
        let upstreams = crate::proxy::Upstreams::new(config.providers.values())?;
        let metrics = Arc::new(metrics::Metrics::default());
        let state = State {
            upstreams: RwLock::new(Arc::new(upstreams)),
            config_source: config.source.clone(),
            single_flight: refresh::SingleFlight::default(),
            security_event_issuers: config.security_event_issuers.clone(),
            metrics: Arc::clone(&metrics),
            cpu: cpu_pool::CpuPool::start(
                std::thread::available_parallelism().map_or(2, std::num::NonZeroUsize::get),
            )
            .map_err(|source| StartError::Threads {
                what: "RSA pool",
                source,
            })?,
            commit: commit::GroupCommit::start(Arc::clone(&store)).map_err(|source| {
                StartError::Threads {
                    what: "group commit",
                    source,
                }
            })?,
            stopping: tokio_util::sync::CancellationToken::new(),
            tasks: tokio_util::task::TaskTracker::new(),
            shutdown_grace: config.shutdown_grace,
            store,
            keyring: RwLock::new(Arc::new(ring)),
            limits: config.limits,
            key_dir: dir,
            policy: config.key_policy,
            key_ops: std::sync::Mutex::new(()),
            rewrapping: std::sync::atomic::AtomicBool::new(false),
            audit,
            record_buckets: std::sync::Mutex::new(lru::LruCache::new(
                std::num::NonZeroUsize::new(100_000).expect("non-zero"),
            )),
            dek_cache: config.dek_cache.map(|c| {
                dek_cache::DekCache::new(
                    std::num::NonZeroUsize::new(c.max_entries)
                        .unwrap_or(std::num::NonZeroUsize::MIN),
                    std::time::Duration::from_secs(c.ttl_seconds),
                )
            }),
        };
        let tls = config.tls.as_ref().map(tls::server_config).transpose()?;
        Ok(Self {
            state: Arc::new(state),
            auth: Arc::new(
                Authenticator::new(config.credentials.clone()).with_metrics(Arc::clone(&metrics)),
            ),
            tls,
            metrics_listener: None,
        })
    }

    /// Also serves Prometheus metrics (`GET /metrics`) on `listener`.
    pub fn with_metrics_listener(mut self, listener: TcpListener) -> Self {
        self.metrics_listener = Some(listener);
        self
    }

    /// Serves all services on `listener` until `shutdown` completes, then drains in-flight
    /// requests and closes the store.
    pub async fn serve(
        self,
        listener: TcpListener,
        shutdown: impl Future<Output = ()> + Send,
    ) -> Result<(), StartError> {
        self.serve_split(listener, None, shutdown).await
    }

    /// Like [`Daemon::serve`], plus an optional second listener that serves only `Ingest` (and
    /// health), for the port exposed to the web tier: Broker and Admin are not reachable on it
    /// at all (`UNIMPLEMENTED`).
    pub async fn serve_split(
        mut self,
        listener: TcpListener,
        ingest_listener: Option<TcpListener>,
        shutdown: impl Future<Output = ()> + Send,
    ) -> Result<(), StartError> {
        let max = self.state.limits.max_request_bytes;
        let guard = |role, service| {
            RoleGuard::new(Arc::clone(&self.auth), role, service)
                .with_audit(Arc::clone(&self.state.audit))
        };
        let ingest = || {
            tonic::service::interceptor::InterceptedService::new(
                IngestServer::new(ingest::IngestService(Arc::clone(&self.state)))
                    .max_decoding_message_size(max),
                guard(Role::Ingest, "Ingest"),
            )
        };
        let broker = BrokerServer::new(broker::BrokerService(Arc::clone(&self.state)))
            .max_decoding_message_size(max);
        let admin = AdminServer::new(admin::AdminService(Arc::clone(&self.state)))
            .max_decoding_message_size(max);

        let (health_reporter, health) = tonic_health::server::health_reporter();
        health_reporter
            .set_serving::<IngestServer<ingest::IngestService>>()
            .await;
        health_reporter
            .set_serving::<BrokerServer<broker::BrokerService>>()
            .await;
        health_reporter
            .set_serving::<AdminServer<admin::AdminService>>()
            .await;
        // Both reflection versions, as grpc-go and grpc-java serve them: grpcurl 1.8 and
        // Python's grpcio-reflection still speak only v1alpha.
        let reflection_builder = || {
            tonic_reflection::server::Builder::configure()
                .register_encoded_file_descriptor_set(crate::api::v1::FILE_DESCRIPTOR_SET)
                .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        };
        let reflection = reflection_builder()
            .build_v1()
            .expect("the embedded descriptor sets are valid");
        let reflection_v1alpha = reflection_builder()
            .build_v1alpha()
            .expect("the embedded descriptor sets are valid");

        // Background tasks hold the state (and so the store): they are told to stop when
        // shutdown begins and awaited before `serve` returns, so the store is closed when it
        // does. A run in progress (a sweep, a refresh, a scrape) finishes; none is aborted
        // mid-way, since aborting a task does not stop the blocking work it started.
        let state = &self.state;
        let stopping = state.stopping.clone();
        state
            .tasks
            .spawn(sweep_grants(Arc::clone(state), stopping.clone()));
        if let Some(period) = state.policy.auto_rotate_seconds {
            state
                .tasks
                .spawn(auto_rotate(Arc::clone(state), period, stopping.clone()));
        }
        state
            .tasks
            .spawn(refresh::background(Arc::clone(state), stopping.clone()));
        #[cfg(unix)]
        state
            .tasks
            .spawn(reload_on_sighup(Arc::clone(state), stopping.clone()));
        if let Some(l) = self.metrics_listener.take() {
            state
                .tasks
                .spawn(metrics::serve(l, Arc::clone(state), stopping.clone()));
        }
        let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);

        let builder = || -> Result<tonic::transport::Server<_>, StartError> {
            let mut b = tonic::transport::Server::builder()
                .layer(metrics::MetricsLayer(Arc::clone(&self.state.metrics)))
                .layer(tower::util::MapResponseLayer::new(
                    oversize_is_resource_exhausted,
                ));
            if let Some(tls) = self.tls.clone() {
                b = b.tls_config(tls)?;
            }
            Ok(b)
        };
        // Without TCP_NODELAY, Nagle's algorithm holds back the trailers of each response
        // until the client ACKs: ~0.5 ms added to every call.
        let incoming = |l: TcpListener| {
            tonic::transport::server::TcpIncoming::from(l).with_nodelay(Some(true))
        };
        let stopped = |mut rx: tokio::sync::watch::Receiver<bool>| async move {
            let _ = rx.wait_for(|s| *s).await;
        };
        let mut reporters = vec![health_reporter];
        let ingest_only = match ingest_listener {
            Some(l) => {
                let (ingest_reporter, ingest_health) = tonic_health::server::health_reporter();
                ingest_reporter
                    .set_serving::<IngestServer<ingest::IngestService>>()
                    .await;
                reporters.push(ingest_reporter);
                let server = builder()?
                    .add_service(ingest_health)
                    .add_service(ingest())
                    .serve_with_incoming_shutdown(incoming(l), stopped(stop_rx.clone()));
                Some(tokio::spawn(server))
            }
            None => None,
        };
        let main = builder()?
            .add_service(health)
            .add_service(reflection)
            .add_service(reflection_v1alpha)
            .add_service(ingest())
            .add_service(tonic::service::interceptor::InterceptedService::new(
                broker,
                guard(Role::Worker, "Broker"),
            ))
            .add_service(tonic::service::interceptor::InterceptedService::new(
                admin,
                guard(Role::Admin, "Admin"),
            ))
            .serve_with_incoming_shutdown(incoming(listener), stopped(stop_rx));
        let grace = state.shutdown_grace;
        let signal = async move {
            shutdown.await;
            // From the moment shutdown begins, health says NOT_SERVING (for the grace period,
            // so load balancers route new calls elsewhere) and long-running work stops.
            for r in &reporters {
                r.set_service_status("", tonic_health::ServingStatus::NotServing)
                    .await;
                r.set_not_serving::<IngestServer<ingest::IngestService>>()
                    .await;
                r.set_not_serving::<BrokerServer<broker::BrokerService>>()
                    .await;
                r.set_not_serving::<AdminServer<admin::AdminService>>()
                    .await;
            }
            stopping.cancel();
            tracing::info!(
                grace_ms = grace.as_millis(),
                "shutting down: health NOT_SERVING"
            );
            tokio::time::sleep(grace).await;
            let _ = stop_tx.send(true);
        };
        let (result, ()) = tokio::join!(main, signal);
        result?;
        if let Some(task) = ingest_only {
            task.await
                .map_err(|_| StartError::Listener("the ingest listener task failed".into()))??;
        }
        self.state.tasks.close();
        self.state.tasks.wait().await;
        drop(self);
        Ok(())
    }

    /// Where the daemon's data lives (for messages).
    pub fn describe(config: &Config) -> String {
        format!(
            "data {} keys {}",
            display(&config.data_dir),
            display(&config.key_dir)
        )
    }
}

fn display(p: &Path) -> String {
    p.display().to_string()
}

/// tonic rejects an oversized request with `OUT_OF_RANGE`; gRPC convention (and our contract)
/// is `RESOURCE_EXHAUSTED`, so the status of exactly that error is rewritten here.
fn oversize_is_resource_exhausted<B>(mut response: http::Response<B>) -> http::Response<B> {
    let headers = response.headers_mut();
    if headers.get("grpc-status").map(http::HeaderValue::as_bytes) != Some(b"11") {
        return response;
    }
    if let Some(status) = tonic::Status::from_header_map(headers)
        && let Some(detail) = status
            .message()
            .strip_prefix("Error, decoded message length too large: ")
    {
        let replacement = tonic::Status::resource_exhausted(format!("request too large: {detail}"));
        if replacement.add_header(headers).is_err() {
            tracing::warn!("could not rewrite an oversize status");
        }
    }
    response
}

/// Rotates when the active key is older than `period` seconds; checks once a minute (more
/// often for periods under a minute, which only tests use).
async fn auto_rotate(state: Arc<State>, period: i64, stop: tokio_util::sync::CancellationToken) {
    let every = u64::try_from(period.clamp(1, 60)).unwrap_or(60);
    periodically(std::time::Duration::from_secs(every), stop, || async {
        let due = state.keyring().active().0.created_at.saturating_add(period) <= crate::unix_now();
        if !due {
            return;
        }
        match state
            .blocking(|s| admin::rotate(s, "auto-rotation", crate::unix_now()))
            .await
        {
            Ok((active, _)) => {
                tracing::info!(version = active.version, fingerprint = %active.id, "automatic rotation")
            }
            Err(e) => tracing::error!(error = %e, "automatic rotation failed"),
        }
    })
    .await;
}

/// Deletes expired grants at startup and every [`grants::SWEEP_EVERY`].
async fn sweep_grants(state: Arc<State>, stop: tokio_util::sync::CancellationToken) {
    periodically(grants::SWEEP_EVERY, stop, || async {
        match state
            .blocking(|s| grants::sweep_expired(s, crate::unix_now()))
            .await
        {
            Ok(0) => {}
            Ok(n) => tracing::info!(deleted = n, "expired grants deleted"),
            Err(e) => tracing::error!(error = %e, "sweeping expired grants failed"),
        }
    })
    .await;
}

/// Runs `job` now and then every `period` until `stop` is cancelled. A run that has started is
/// finished, never cancelled: its blocking work must not outlive `serve`.
async fn periodically<F: Future<Output = ()>>(
    period: std::time::Duration,
    stop: tokio_util::sync::CancellationToken,
    mut job: impl FnMut() -> F,
) {
    let mut tick = tokio::time::interval(period);
    loop {
        tokio::select! {
            _ = tick.tick() => job().await,
            () = stop.cancelled() => return,
        }
    }
}

/// Reloads the providers on every SIGHUP, until shutdown.
#[cfg(unix)]
async fn reload_on_sighup(state: Arc<State>, stop: tokio_util::sync::CancellationToken) {
    let Ok(mut hup) = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()) else {
        tracing::warn!("cannot listen for SIGHUP; use Admin.ReloadProviders");
        return;
    };
    loop {
        tokio::select! {
            got = hup.recv() => {
                if got.is_none() {
                    return;
                }
                // Errors are logged and audited inside.
                let _ = state.reload_providers("SIGHUP").await;
            }
            () = stop.cancelled() => return,
        }
    }
}

/// Locks all current and future memory of the process into RAM (`mlockall`, pages locked as
/// they are touched), so private keys, data keys and tokens are never written to swap.
///
/// Only attempted when the lock cannot hit a limit later: `RLIMIT_MEMLOCK` is unlimited or the
/// process has `CAP_IPC_LOCK`. With a finite limit, `MCL_FUTURE` would turn ordinary growth
/// (RocksDB's block cache, bursts of requests) into allocation failures, so the daemon refuses
/// and the caller warns instead. Returns why memory was not locked.
pub fn lock_memory() -> Result<(), MemoryLockError> {
    use rustix::mm::{MlockAllFlags, mlockall};
    use rustix::process::{Resource, getrlimit};
    if let Some(limit) = getrlimit(Resource::Memlock).current
        && !has_cap_ipc_lock()
    {
        return Err(MemoryLockError::Limited { limit });
    }
    mlockall(MlockAllFlags::CURRENT | MlockAllFlags::FUTURE | MlockAllFlags::ONFAULT)
        .map_err(|e| MemoryLockError::Failed(e.into()))
}

/// Why memory was not locked.
#[derive(Debug, Error)]
#[non_exhaustive]
pub enum MemoryLockError {
    /// A finite limit without the capability to exceed it.
    #[error("RLIMIT_MEMLOCK is {limit} bytes and the process lacks CAP_IPC_LOCK")]
    Limited {
        /// The limit in bytes.
        limit: u64,
    },
    /// The system call failed.
    #[error("mlockall failed: {0}")]
    Failed(std::io::Error),
}

/// Whether the effective capability set holds `CAP_IPC_LOCK` (bit 14).
fn has_cap_ipc_lock() -> bool {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("CapEff:"))
                .and_then(|v| u64::from_str_radix(v.trim(), 16).ok())
        })
        .is_some_and(|caps| caps & (1 << 14) != 0)
}

/// Makes the process non-dumpable and disables core dumps, so private keys and tokens in
/// memory cannot end up in a core file or be read through /proc by another user's debugger.
pub fn harden_process() -> std::io::Result<()> {
    use rustix::process::{DumpableBehavior, Resource, Rlimit, set_dumpable_behavior, setrlimit};
    setrlimit(
        Resource::Core,
        Rlimit {
            current: Some(0),
            maximum: Some(0),
        },
    )?;
    set_dumpable_behavior(DumpableBehavior::NotDumpable)?;
    Ok(())
}

/// The authenticated caller's policy (the interceptor always sets the caller).
fn caller_policy<T>(request: &tonic::Request<T>) -> Arc<crate::config::CallerPolicy> {
    request
        .extensions()
        .get::<auth::Caller>()
        .map_or_else(Default::default, |c| Arc::clone(&c.policy))
}

/// A record id from a request field, or `INVALID_ARGUMENT` saying why not.
fn record_id(raw: String) -> Result<crate::record::RecordId, ServiceError> {
    crate::record::RecordId::parse(raw).map_err(|source| ServiceError::Invalid {
        what: "record id".into(),
        source,
    })
}

/// The authenticated caller's name, for logs.
fn caller_name<T>(request: &tonic::Request<T>) -> String {
    request
        .extensions()
        .get::<auth::Caller>()
        .map_or_else(|| "?".into(), |c| c.name.clone())
}
