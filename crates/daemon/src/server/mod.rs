//! The privileged daemon: gRPC services `Ingest`, `Broker` and `Admin` over one store and
//! keyring, plus `grpc.health.v1.Health` and server reflection.
//!
//! Owns: [`Daemon`] (open the store and the [`Vault`], then serve on listeners until shutdown),
//! the gRPC adapters (`ingest`, `broker`, `admin`), authentication ([`auth`]), TLS ([`tls`]),
//! the metrics endpoint ([`metrics`]) and the one error → status mapping ([`status`]). Each
//! handler converts the proto request into domain types (`TryFrom`, failing with
//! `INVALID_ARGUMENT`), makes one vault call and converts the result back.
//!
//! Must never: hold use-case logic (it belongs to the vault), or reach the store directly.

mod admin;
pub mod auth;
mod broker;
pub mod conn;
pub mod http_json;
#[cfg(fuzzing)]
pub mod ingest;
#[cfg(not(fuzzing))]
mod ingest;
pub mod metrics;
pub mod notify;
pub mod status;
pub mod tls;

use std::future::Future;
use std::path::Path;
use std::sync::Arc;

use thiserror::Error;
use tokio::net::TcpListener;

use crate::api::v1::admin_server::AdminServer;
use crate::api::v1::broker_server::BrokerServer;
use crate::api::v1::ingest_server::IngestServer;
use crate::config::{Config, Role};
use crate::store::{StoreError, TokenStore};
use crate::vault::{Caller, Vault, VaultError};
use auth::{Authenticator, RoleGuard};

/// Why the daemon could not start.
#[derive(Debug, Error)]
#[non_exhaustive]
pub enum StartError {
    /// The store could not be opened.
    #[error("opening the store: {0}")]
    Store(#[from] StoreError),
    /// The vault could not be opened (keyring, audit trail, providers, threads).
    #[error(transparent)]
    Vault(#[from] crate::vault::OpenError),
    /// A listener could not be served.
    #[error("listener: {0}")]
    Listener(String),
    /// The TLS configuration could not be loaded.
    #[error("TLS: {0}")]
    Tls(#[from] tls::TlsSetupError),
    /// The gRPC server failed.
    #[error("gRPC server: {0}")]
    Transport(#[from] tonic::transport::Error),
}

/// An opened daemon: store and keyring loaded, ready to serve.
pub struct Daemon {
    vault: Arc<Vault>,
    shutdown_grace: std::time::Duration,
    auth: Arc<Authenticator>,
    tls: Option<Arc<rustls::ServerConfig>>,
    metrics_listener: Option<TcpListener>,
}

impl Daemon {
    /// The vault this daemon serves (what tests and embedders observe it through).
    pub fn vault(&self) -> &Arc<Vault> {
        &self.vault
    }
}

impl std::fmt::Debug for Daemon {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Daemon").finish_non_exhaustive()
    }
}

impl Daemon {
    /// Opens the store (RocksDB, or the `[store]` database) and the keyring named by `config`. In the dev profile an empty
    /// keyring is initialized with a fresh RSA-2048 key.
    pub fn open(config: &Config) -> Result<Self, StartError> {
        // The token first: a wrong PIN, a missing module or no such token stop the start
        // before the store is opened or created.
        crate::vault::check_token(config)?;
        Self::with_store(crate::vault::open_store(config)?, config)
    }

    /// Like [`Daemon::open`] over any store.
    pub fn with_store(store: Arc<dyn TokenStore>, config: &Config) -> Result<Self, StartError> {
        // Loaded before the vault opens: a start refused for a TLS file writes nothing to a
        // shared store (no instance claim, no audit event).
        let tls = config.tls.as_ref().map(tls::server_config).transpose()?;
        Ok(Self::serving(Vault::open(store, config)?, config, tls))
    }

    /// Serves an opened vault (tests give it their own clock) with `config`'s credentials,
    /// TLS and grace period.
    pub fn with_vault(vault: Vault, config: &Config) -> Result<Self, StartError> {
        let tls = config.tls.as_ref().map(tls::server_config).transpose()?;
        Ok(Self::serving(vault, config, tls))
    }

    fn serving(vault: Vault, config: &Config, tls: Option<Arc<rustls::ServerConfig>>) -> Self {
        let auth = Authenticator::new(config.credentials.clone())
            .with_metrics(Arc::clone(vault.metrics()))
            .with_monotonic(Arc::clone(vault.monotonic()));
        Self {
            vault: Arc::new(vault),
            shutdown_grace: config.shutdown_grace,
            auth: Arc::new(auth),
            tls,
            metrics_listener: None,
        }
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
        let limits = *self.vault.limits();
        let max = limits.max_request_bytes;
        let guard = |role, service| {
            RoleGuard::new(Arc::clone(&self.auth), role, service)
                .with_vault(Arc::clone(&self.vault))
        };
        // What health says for "", for the HTTP health route (GET /v1/health).
        let (serving_tx, serving) = tokio::sync::watch::channel(true);
        // The main listener also serves Broker's HTTP routes; the ingest-only one never does.
        let http_routes = |broker: bool| {
            tonic::service::Routes::from(http_json::router(
                Arc::clone(&self.vault),
                guard(Role::Ingest, "Ingest"),
                broker.then(|| guard(Role::Worker, "Broker")),
                max,
                serving.clone(),
            ))
        };
        let ingest = || {
            auth::Guarded::new(
                IngestServer::new(ingest::IngestService(Arc::clone(&self.vault)))
                    .max_decoding_message_size(max),
                guard(Role::Ingest, "Ingest"),
            )
        };
        let broker = BrokerServer::new(broker::BrokerService(Arc::clone(&self.vault)))
            .max_decoding_message_size(max);
        let admin = AdminServer::new(admin::AdminService(Arc::clone(&self.vault)))
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

        // Background jobs hold the vault (and so the store): they are told to stop when
        // shutdown begins and awaited before `serve` returns, so the store is closed when it
        // does.
        let vault = Arc::clone(&self.vault);
        vault.start_jobs();
        if let Some(l) = self.metrics_listener.take() {
            // The same bounds as every other listener: at most `max_connections`, the one idle
            // the longest closed at the cap, and none silent longer than `idle_timeout`.
            let conns = conn::Connections::new(
                "metrics",
                limits.max_connections,
                limits.idle_timeout,
                Arc::clone(self.vault.metrics()),
            );
            vault.spawn(Arc::clone(&conns).reap(vault.stopping()));
            vault.spawn(metrics::serve(
                l,
                Arc::clone(&vault),
                vault.stopping(),
                conns,
            ));
        }
        let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);

        let builder = || -> Result<tonic::transport::Server<_>, StartError> {
            // HTTP/1.1 as well as HTTP/2: the HTTP/JSON routes serve web tiers without gRPC.
            Ok(tonic::transport::Server::builder()
                .accept_http1(true)
                .max_concurrent_streams(limits.max_concurrent_streams)
                // What one connection may have sent and the daemon not yet read: with
                // `max_connections`, the bound on request bytes buffered in memory.
                .initial_connection_window_size(limits.http2_window_bytes)
                .initial_stream_window_size(limits.http2_window_bytes)
                .layer(metrics::MetricsLayer(Arc::clone(self.vault.metrics())))
                .layer(tower::util::MapResponseLayer::new(
                    oversize_is_resource_exhausted,
                )))
        };
        let stopped = |mut rx: tokio::sync::watch::Receiver<bool>| async move {
            let _ = rx.wait_for(|s| *s).await;
        };
        // Serves a router on a listener, in TLS (our acceptor: ALPN h2 and http/1.1) or in
        // plaintext. A macro because the two incoming streams have different types.
        let tls = self.tls.clone();
        let connections = |what| {
            let conns = conn::Connections::new(
                what,
                limits.max_connections,
                limits.idle_timeout,
                Arc::clone(self.vault.metrics()),
            );
            vault.spawn(Arc::clone(&conns).reap(vault.stopping()));
            conns
        };
        // Once the listeners stop, in-flight calls get `idle_timeout_seconds` to finish; then
        // the connections still open are closed. Without the bound, a call that never ends on
        // its own (a health Watch stream, which load balancers hold open) would keep the
        // daemon from ever exiting.
        let drain_limit = limits.idle_timeout;
        let bounded = |serving: std::pin::Pin<
            Box<dyn Future<Output = Result<(), tonic::transport::Error>> + Send>,
        >,
                       mut stop: tokio::sync::watch::Receiver<bool>,
                       what: &'static str| async move {
            let drained = async {
                let _ = stop.wait_for(|s| *s).await;
                tokio::time::sleep(drain_limit).await;
            };
            tokio::select! {
                served = serving => served,
                () = drained => {
                    tracing::warn!(
                        listener = what,
                        seconds = drain_limit.as_secs(),
                        "calls still open after draining (a stream that does not end, such as a health Watch): closing their connections"
                    );
                    Ok(())
                }
            }
        };
        macro_rules! serve_on {
            ($router:expr, $listener:expr, $what:expr, $stop:expr) => {{
                let router = $router;
                let conns = connections($what);
                let drain_stop = stop_rx.clone();
                let serving: std::pin::Pin<
                    Box<dyn Future<Output = Result<(), tonic::transport::Error>> + Send>,
                > = match &tls {
                    Some(config) => Box::pin(router.serve_with_incoming_shutdown(
                        tls::incoming($listener, Arc::clone(config), conns),
                        $stop,
                    )),
                    None => Box::pin(router.serve_with_incoming_shutdown(
                        tls::plain_incoming($listener, conns),
                        $stop,
                    )),
                };
                bounded(serving, drain_stop, $what)
            }};
        }
        use tonic::server::NamedService;
        const INGEST: &str = <IngestServer<ingest::IngestService> as NamedService>::NAME;
        // Each listener's health reporter, with the services it serves.
        let mut reporters = vec![(
            health_reporter,
            vec![
                INGEST,
                <BrokerServer<broker::BrokerService> as NamedService>::NAME,
                <AdminServer<admin::AdminService> as NamedService>::NAME,
            ],
        )];
        let ingest_only = match ingest_listener {
            Some(l) => {
                let (ingest_reporter, ingest_health) = tonic_health::server::health_reporter();
                ingest_reporter
                    .set_serving::<IngestServer<ingest::IngestService>>()
                    .await;
                reporters.push((ingest_reporter, vec![INGEST]));
                let server = serve_on!(
                    builder()?
                        .add_routes(http_routes(false))
                        .add_service(ingest_health)
                        .add_service(ingest()),
                    l,
                    "ingest",
                    stopped(stop_rx.clone())
                );
                Some(tokio::spawn(server))
            }
            None => None,
        };
        let main = builder()?
            .add_routes(http_routes(true))
            .add_service(health)
            .add_service(reflection)
            .add_service(reflection_v1alpha)
            .add_service(ingest())
            .add_service(auth::Guarded::new(broker, guard(Role::Worker, "Broker")))
            .add_service(auth::Guarded::new(admin, guard(Role::Admin, "Admin")));
        let main = serve_on!(main, listener, "grpc", stopped(stop_rx));
        let grace = self.shutdown_grace;
        let stopping = Arc::clone(&vault);
        // Health follows the database and the private-key threads: NOT_SERVING while the
        // database does not answer or every private-key thread is stuck in a call (a hung
        // PKCS#11 token), so a load balancer routes calls to daemons that can serve them. The
        // flag (under the lock the shutdown takes too) keeps a late change from undoing the
        // shutdown's NOT_SERVING.
        let shutting_down = Arc::new(tokio::sync::Mutex::new(false));
        let serving_tx = Arc::new(serving_tx);
        let follow_store = {
            let (reporters, shutting_down) = (reporters.clone(), Arc::clone(&shutting_down));
            let serving_tx = Arc::clone(&serving_tx);
            let mut reachable = vault.store_reachable();
            let mut keys = vault.private_keys_available();
            tokio::spawn(async move {
                loop {
                    let changed = tokio::select! {
                        c = reachable.changed() => c,
                        c = keys.changed() => c,
                    };
                    if changed.is_err() {
                        return;
                    }
                    let up = *reachable.borrow_and_update() && *keys.borrow_and_update();
                    let down = shutting_down.lock().await;
                    if *down {
                        return;
                    }
                    let status = if up {
                        tonic_health::ServingStatus::Serving
                    } else {
                        tonic_health::ServingStatus::NotServing
                    };
                    serving_tx.send_replace(up);
                    for (r, services) in &reporters {
                        r.set_service_status("", status).await;
                        for service in services {
                            r.set_service_status(*service, status).await;
                        }
                    }
                }
            })
        };
        let signal = async move {
            shutdown.await;
            *shutting_down.lock().await = true;
            follow_store.abort();
            serving_tx.send_replace(false);
            // From the moment shutdown begins, health says NOT_SERVING (for the grace period,
            // so load balancers route new calls elsewhere) and long-running work stops.
            for (r, services) in &reporters {
                r.set_service_status("", tonic_health::ServingStatus::NotServing)
                    .await;
                for service in services {
                    r.set_service_status(*service, tonic_health::ServingStatus::NotServing)
                        .await;
                }
            }
            stopping.begin_shutdown();
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
        vault.stopped().await;
        drop(vault);
        drop(self);
        Ok(())
    }

    /// Where the daemon's data lives (for messages; never a password).
    pub fn describe(config: &Config) -> String {
        match &config.store {
            crate::config::StoreConfig::Postgres(pg) => format!(
                "store postgres {:?}:{:?}/{} as instance {} keys {}",
                pg.connection.get_hosts(),
                pg.connection.get_ports(),
                pg.connection.get_dbname().unwrap_or("-"),
                pg.instance,
                display(&config.key_dir)
            ),
            _ => format!(
                "data {} keys {}",
                display(&config.data_dir),
                display(&config.key_dir)
            ),
        }
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
        let replacement = status::exhausted(format!("request too large: {detail}"), None);
        if replacement.add_header(headers).is_err() {
            tracing::warn!("could not rewrite an oversize status");
        }
    }
    response
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

/// The authenticated caller that [`auth::Guarded`] put into the request. A request without
/// one is refused (fail closed): it can only reach a handler through a route that was wired
/// without its guard.
fn caller<T>(request: &tonic::Request<T>) -> Result<Caller, tonic::Status> {
    request
        .extensions()
        .get::<auth::Caller>()
        .map(|c| Caller::new(c.name.clone(), Arc::clone(&c.policy)))
        .ok_or_else(|| {
            tracing::error!("a request reached a handler without an authenticated caller");
            tonic::Status::internal("the request has no authenticated caller")
        })
}

/// A record id from a request field, or `INVALID_ARGUMENT` saying why not.
fn record_id(raw: String) -> Result<crate::record::RecordId, VaultError> {
    crate::record::RecordId::parse(raw).map_err(|source| VaultError::Invalid {
        what: "record id".into(),
        source,
    })
}
