//! Shared harness: a real daemon in-process on 127.0.0.1:0 over a temp RocksDB, and clients.
#![allow(
    dead_code,
    reason = "each test binary uses a different part of the harness"
)]

pub mod faulty;
pub mod pg;
pub mod pki;
pub mod process;
pub mod token;
pub mod upstream;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::Path;

use tokenvault::Sealer;
use tokenvault::api::SealRecord as _;
use tokenvault::api::v1;
use tokenvault::config::{Config, CredentialEntry, Role};
use tokenvault::record::{RecordMeta, SecretKind};
use tokenvault::secret::{ApiCredential, Secret};
use tokenvault::server::Daemon;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::Channel;

pub const INGEST: &str = "tv_test_ingest_credential_0123456789abcdef";
pub const WORKER: &str = "tv_test_worker_credential_0123456789abcdef";
pub const ADMIN: &str = "tv_test_admin_credential_0123456789abcdef";

pub fn credentials() -> Vec<CredentialEntry> {
    vec![
        CredentialEntry::for_credential(
            "web-tier",
            Role::Ingest,
            &ApiCredential::new(INGEST.into()),
        ),
        CredentialEntry::for_credential(
            "worker-1",
            Role::Worker,
            &ApiCredential::new(WORKER.into()),
        ),
        CredentialEntry::for_credential("secteam", Role::Admin, &ApiCredential::new(ADMIN.into())),
    ]
}

/// A clock a test moves by hand: it starts at the real time and advances only when told.
#[derive(Clone, Debug)]
#[allow(dead_code)]
/// A clock tests move: Unix seconds for the vault's time rules and a monotonic reading for its
/// rate limits, advanced together.
pub struct TestClock(
    std::sync::Arc<std::sync::atomic::AtomicI64>,
    std::sync::Arc<std::sync::atomic::AtomicU64>,
);

#[allow(dead_code)]
impl TestClock {
    pub fn new() -> Self {
        Self(
            std::sync::Arc::new(std::sync::atomic::AtomicI64::new(tokenvault::unix_now())),
            std::sync::Arc::new(std::sync::atomic::AtomicU64::new(1_000_000_000_000)),
        )
    }

    pub fn advance(&self, seconds: i64) {
        self.0
            .fetch_add(seconds, std::sync::atomic::Ordering::SeqCst);
        self.1.fetch_add(
            u64::try_from(seconds).expect("forward") * 1_000_000_000,
            std::sync::atomic::Ordering::SeqCst,
        );
    }

    pub fn monotonic(&self) -> tokenvault::vault::Monotonic {
        let nanos = std::sync::Arc::clone(&self.1);
        std::sync::Arc::new(move || {
            std::time::Duration::from_nanos(nanos.load(std::sync::atomic::Ordering::SeqCst))
        })
    }

    pub fn source(&self) -> tokenvault::vault::Clock {
        let now = std::sync::Arc::clone(&self.0);
        std::sync::Arc::new(move || now.load(std::sync::atomic::Ordering::SeqCst))
    }
}

pub fn config(base: &Path) -> Config {
    let mut c = Config::dev(
        base,
        "127.0.0.1:0".parse().expect("addr"),
        credentials(),
        &HashMap::<String, String>::new(),
    )
    .expect("dev config");
    c.limits.max_batch = 1000;
    c
}

pub struct TestDaemon {
    pub addr: SocketAddr,
    /// The daemon's vault, for what a test waits on (e.g. background refresh scans).
    pub vault: std::sync::Arc<tokenvault::vault::Vault>,
    shutdown: Option<oneshot::Sender<()>>,
    handle: Option<JoinHandle<()>>,
}

impl TestDaemon {
    pub async fn start(base: &Path) -> Self {
        Self::start_with(config(base)).await
    }

    pub async fn start_with(config: Config) -> Self {
        Self::start_on(config, "127.0.0.1:0").await
    }

    /// Like [`TestDaemon::start_with`], listening on `bind` (e.g. `[::1]:0`).
    pub async fn start_on(config: Config, bind: &str) -> Self {
        let daemon = tokio::task::spawn_blocking(move || Daemon::open(&config))
            .await
            .expect("join")
            .expect("daemon opens");
        Self::serve(daemon, bind).await
    }

    /// Like [`TestDaemon::start_with`], also serving `/metrics` on a listener of its own, whose
    /// address it returns too.
    #[allow(dead_code)]
    pub async fn start_with_metrics(config: Config) -> (Self, SocketAddr) {
        let metrics = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind metrics");
        let addr = metrics.local_addr().expect("metrics addr");
        let daemon = tokio::task::spawn_blocking(move || Daemon::open(&config))
            .await
            .expect("join")
            .expect("daemon opens")
            .with_metrics_listener(metrics);
        (Self::serve(daemon, "127.0.0.1:0").await, addr)
    }

    /// Like [`TestDaemon::start_with`] over `store`, which the test can read while the daemon
    /// runs.
    #[allow(dead_code)]
    pub async fn start_with_store(
        config: Config,
        store: std::sync::Arc<dyn tokenvault::store::TokenStore>,
    ) -> Self {
        let daemon = Daemon::with_store(store, &config).expect("daemon opens");
        Self::serve(daemon, "127.0.0.1:0").await
    }

    /// Like [`TestDaemon::start_with_store`] with the vault reading time from `clock`, which
    /// the test moves instead of sleeping.
    #[allow(dead_code)]
    pub async fn start_with_clock(
        config: Config,
        store: std::sync::Arc<dyn tokenvault::store::TokenStore>,
        clock: &TestClock,
    ) -> Self {
        let vault = tokenvault::vault::Vault::open(store, &config)
            .expect("vault opens")
            .with_clock(clock.source())
            .with_monotonic(clock.monotonic());
        let daemon = Daemon::with_vault(vault, &config).expect("daemon opens");
        Self::serve(daemon, "127.0.0.1:0").await
    }

    async fn serve(daemon: Daemon, bind: &str) -> Self {
        let listener = tokio::net::TcpListener::bind(bind).await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let vault = std::sync::Arc::clone(daemon.vault());
        let (tx, rx) = oneshot::channel::<()>();
        let handle = tokio::spawn(async move {
            daemon
                .serve(listener, async {
                    let _ = rx.await;
                })
                .await
                .expect("serve");
        });
        Self {
            addr,
            vault,
            shutdown: Some(tx),
            handle: Some(handle),
        }
    }

    /// Begins a graceful stop (as SIGTERM does) without waiting for it.
    pub fn begin_stop(&mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
    }

    /// Runs the vault's destruction of due key versions now (the job runs it every minute):
    /// what it destroyed.
    #[allow(dead_code)]
    pub async fn destroy_due(&self) -> Vec<tokenvault::keys::KeyInfo> {
        let vault = std::sync::Arc::clone(&self.vault);
        tokio::task::spawn_blocking(move || vault.destroy_due_keys())
            .await
            .expect("join")
            .expect("destroy due keys")
    }

    /// Graceful stop; returns once the store is closed.
    pub async fn stop(mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
        if let Some(h) = self.handle.take() {
            h.await.expect("server task");
        }
    }

    pub async fn channel(&self) -> Channel {
        Channel::from_shared(format!("http://{}", self.addr))
            .expect("uri")
            .connect()
            .await
            .expect("connect")
    }

    pub async fn ingest(
        &self,
        cred: &str,
    ) -> v1::ingest_client::IngestClient<InterceptedService<Channel, tokenvault::client::Bearer>>
    {
        v1::ingest_client::IngestClient::new(InterceptedService::new(
            self.channel().await,
            Bearer::new(cred),
        ))
    }

    pub async fn broker(
        &self,
        cred: &str,
    ) -> v1::broker_client::BrokerClient<InterceptedService<Channel, tokenvault::client::Bearer>>
    {
        v1::broker_client::BrokerClient::new(InterceptedService::new(
            self.channel().await,
            Bearer::new(cred),
        ))
    }

    pub async fn admin(
        &self,
        cred: &str,
    ) -> v1::admin_client::AdminClient<InterceptedService<Channel, tokenvault::client::Bearer>>
    {
        v1::admin_client::AdminClient::new(InterceptedService::new(
            self.channel().await,
            Bearer::new(cred),
        ))
    }

    /// The active public key's SPKI PEM, as Ingest.PublicKeys returns it.
    pub async fn active_spki_pem(&self) -> String {
        self.ingest(INGEST)
            .await
            .public_keys(v1::PublicKeysRequest {})
            .await
            .expect("public keys")
            .into_inner()
            .active
            .expect("active key")
            .spki_pem
    }

    /// A sealer for the daemon's active key, fetched over Ingest.PublicKeys.
    pub async fn sealer(&self) -> Sealer {
        Sealer::from_pem(&self.active_spki_pem().await).expect("pem")
    }

    /// `Broker.GetToken` with the worker credential.
    pub async fn get(
        &self,
        id: impl Into<String>,
    ) -> Result<tonic::Response<v1::GetTokenResponse>, tonic::Status> {
        self.broker(WORKER)
            .await
            .get_token(v1::GetTokenRequest { id: id.into() })
            .await
    }

    /// `Admin.Revoke` of one record with the admin credential.
    pub async fn revoke(
        &self,
        id: impl Into<String>,
    ) -> Result<tonic::Response<v1::RevokeResponse>, tonic::Status> {
        self.admin(ADMIN)
            .await
            .revoke(v1::RevokeRequest {
                id: id.into(),
                ..Default::default()
            })
            .await
    }

    /// Seals and stores `n` records `{prefix}{i}` in batches of up to 1000.
    pub async fn seed(&self, prefix: &str, n: usize) {
        seed_over(self.channel().await, prefix, n).await;
    }

    /// Runs `Admin.Rewrap` to completion; returns the last progress report.
    pub async fn rewrap(&self) -> v1::RewrapProgress {
        let mut stream = self
            .admin(ADMIN)
            .await
            .rewrap(v1::RewrapRequest::default())
            .await
            .expect("rewrap")
            .into_inner();
        let mut last = None;
        while let Some(p) = stream.message().await.expect("progress") {
            last = Some(p);
        }
        let last = last.expect("at least one report");
        assert!(last.done);
        last
    }

    /// `Admin.Stats`.
    #[allow(dead_code)]
    pub async fn stats(&self) -> v1::StatsResponse {
        self.admin(ADMIN)
            .await
            .stats(v1::StatsRequest::default())
            .await
            .expect("stats")
            .into_inner()
    }

    /// The audit trail through `Admin.AuditLog`.
    pub async fn audit_events(&self, req: v1::AuditLogRequest) -> Vec<v1::AuditEvent> {
        let mut stream = self
            .admin(ADMIN)
            .await
            .audit_log(req)
            .await
            .expect("audit log")
            .into_inner();
        let mut out = Vec::new();
        while let Some(e) = stream.message().await.expect("event") {
            out.push(e);
        }
        out
    }

    /// Seals `secret` and stores it; returns the version.
    pub async fn put(&self, meta: &RecordMeta, secret: &[u8]) -> u64 {
        let record = self
            .sealer()
            .await
            .seal_record(meta, &Secret::new(secret.to_vec()))
            .expect("seal");
        self.ingest(INGEST)
            .await
            .put_sealed(v1::PutSealedRequest {
                record: Some(record),
                expected_version: 0,
            })
            .await
            .expect("put")
            .into_inner()
            .version
    }
}

impl Drop for TestDaemon {
    fn drop(&mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
    }
}

/// The library's bearer interceptor, as every client uses it; an empty credential sends none.
pub struct Bearer;

impl Bearer {
    #[allow(
        clippy::new_ret_no_self,
        reason = "a test shorthand for the library's Bearer"
    )]
    pub fn new(cred: &str) -> tokenvault::client::Bearer {
        if cred.is_empty() {
            tokenvault::client::Bearer::none()
        } else {
            tokenvault::client::Bearer::new(cred).expect("valid credential")
        }
    }
}

pub fn meta(id: &str, owner: &str) -> RecordMeta {
    RecordMeta::parse(
        id,
        owner,
        "github",
        SecretKind::AccessToken,
        &["repo".into()],
        0,
    )
    .expect("valid")
}

pub fn fixture_path(rel: &str) -> std::path::PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(rel)
}

/// An HTTP/1.1 request to a daemon's HTTP routes: `(status, content type, body)`.
#[allow(dead_code)]
pub async fn http_call(
    addr: SocketAddr,
    method: &str,
    path: &str,
    headers: &[(&str, String)],
    body: Vec<u8>,
) -> (u16, Option<String>, bytes::Bytes) {
    let (status, headers, body) = http_call_with_headers(addr, method, path, headers, body).await;
    let content_type = headers
        .get("content-type")
        .and_then(|v| v.to_str().ok())
        .map(str::to_string);
    (status, content_type, body)
}

/// Like [`http_call`]: `(status, response headers, body)`.
#[allow(dead_code)]
pub async fn http_call_with_headers(
    addr: SocketAddr,
    method: &str,
    path: &str,
    headers: &[(&str, String)],
    body: Vec<u8>,
) -> (u16, http::HeaderMap, bytes::Bytes) {
    use http_body_util::BodyExt as _;
    let client = hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
        .build_http::<http_body_util::Full<bytes::Bytes>>();
    let mut req = http::Request::builder()
        .method(method)
        .uri(format!("http://{addr}{path}"));
    for (name, value) in headers {
        req = req.header(*name, value);
    }
    let response = client
        .request(
            req.body(http_body_util::Full::new(bytes::Bytes::from(body)))
                .expect("request"),
        )
        .await
        .expect("HTTP call");
    let status = response.status().as_u16();
    let headers = response.headers().clone();
    let bytes = response
        .into_body()
        .collect()
        .await
        .expect("body")
        .to_bytes();
    (status, headers, bytes)
}

/// A gRPC health `Watch` of `""` on `channel`, held as a load balancer holds it. Drop it before
/// stopping the daemon: an open watch holds the shutdown for its drain limit.
#[allow(dead_code)]
pub struct HealthWatch(tonic::Streaming<tonic_health::pb::HealthCheckResponse>);

#[allow(dead_code)]
impl HealthWatch {
    pub async fn open(channel: Channel) -> Self {
        let stream = tonic_health::pb::health_client::HealthClient::new(channel)
            .watch(tonic_health::pb::HealthCheckRequest {
                service: String::new(),
            })
            .await
            .expect("health answers whatever the database does")
            .into_inner();
        Self(stream)
    }

    /// Waits until the daemon reports `want`, for at most `within` seconds.
    pub async fn until(
        &mut self,
        want: tonic_health::pb::health_check_response::ServingStatus,
        within: u64,
    ) {
        let stream = &mut self.0;
        tokio::time::timeout(std::time::Duration::from_secs(within), async {
            while let Some(m) = stream.message().await.expect("health stream") {
                if m.status == want as i32 {
                    return;
                }
            }
            panic!("the health stream ended");
        })
        .await
        .unwrap_or_else(|_| panic!("health did not turn {want:?} within {within} s"));
    }
}

/// Seals records `{prefix}{i}` (secret `secret-{i}`, owner `o`) under the active key of the
/// daemon behind `channel` and stores them through Ingest, with the test ingest credential, in
/// batches of up to 1000: a daemon in this process or one spawned as a process.
#[allow(dead_code)]
pub async fn seed_over(channel: Channel, prefix: &str, n: usize) {
    let (mut ingest, sealer) = ingest_over(channel).await;
    let ids: Vec<usize> = (0..n).collect();
    for chunk in ids.chunks(1000) {
        let items = chunk
            .iter()
            .map(|i| v1::PutSealedRequest {
                record: Some(
                    sealer
                        .seal_record(
                            &meta(&format!("{prefix}{i}"), "o"),
                            &Secret::new(format!("secret-{i}").into_bytes()),
                        )
                        .expect("seal"),
                ),
                expected_version: 0,
            })
            .collect();
        ingest
            .put_sealed_batch(v1::PutSealedBatchRequest { items })
            .await
            .expect("batch");
    }
}

/// An ingest client (the test ingest credential) of the daemon behind `channel`, and a sealer
/// for its active key: a daemon in this process or one spawned as a process.
#[allow(dead_code)]
pub async fn ingest_over(
    channel: Channel,
) -> (
    v1::ingest_client::IngestClient<InterceptedService<Channel, tokenvault::client::Bearer>>,
    Sealer,
) {
    let mut ingest =
        v1::ingest_client::IngestClient::new(InterceptedService::new(channel, Bearer::new(INGEST)));
    let pem = ingest
        .public_keys(v1::PublicKeysRequest {})
        .await
        .expect("public keys")
        .into_inner()
        .active
        .expect("active")
        .spki_pem;
    (ingest, Sealer::from_pem(&pem).expect("pem"))
}

/// A TLS channel to the daemon at `addr` whose certificate (for `localhost`) `ca_pem` signed,
/// with a client certificate and key if given (mutual TLS).
#[allow(dead_code)]
pub async fn tls_channel(
    addr: SocketAddr,
    ca_pem: &str,
    client: Option<(String, String)>,
) -> Result<Channel, tonic::transport::Error> {
    use tonic::transport::{Certificate, ClientTlsConfig, Identity};
    let mut tls = ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(ca_pem))
        .domain_name("localhost");
    if let Some((cert, key)) = client {
        tls = tls.identity(Identity::from_pem(cert, key));
    }
    Channel::from_shared(format!("https://{addr}"))
        .expect("uri")
        .tls_config(tls)?
        .connect()
        .await
}

/// gRPC's standard retry pushback of a refusal (`grpc-retry-pushback-ms`), if it has one.
pub fn pushback(e: &tonic::Status) -> Option<String> {
    e.metadata()
        .get("grpc-retry-pushback-ms")
        .and_then(|v| v.to_str().ok())
        .map(str::to_string)
}
