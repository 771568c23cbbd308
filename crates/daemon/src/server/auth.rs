//! Caller authentication and role checks for every gRPC service.
//!
//! Owns: [`Authenticator`] (configured credential hashes, constant-time comparison, per-caller
//! token buckets, denial-burst alerts), [`RoleGuard`], which admits exactly one role per
//! service, and [`Guarded`], the tower service that puts a guard in front of a gRPC service.
//! `UNAUTHENTICATED` without a valid credential, `PERMISSION_DENIED` for a valid credential of
//! the wrong role or from an address outside its allowlist, `RESOURCE_EXHAUSTED` past its rate
//! limit, or (with a retry hint) when an address keeps failing to authenticate.
//!
//! Refusals of an authenticated caller are audited one by one, on the blocking pool, before
//! the refusal is answered. Refusals without one (no credential, a wrong one) are only counted
//! ([`crate::vault::refusals`]): no store write, no fsync, no log line of their own.
//!
//! Must never: log or echo a presented credential, compare credentials in variable time, or do
//! I/O on the async executor.

use std::collections::HashMap;
use std::convert::Infallible;
use std::future::Future;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;
use tonic::Status;
use tonic::server::NamedService;
use tonic::transport::server::{TcpConnectInfo, TlsConnectInfo};

use crate::config::{CallerPolicy, CredentialEntry, Role};
use crate::vault::Vault;
use crate::vault::limits::Bucket;
use crate::vault::refusals::{RefusalReason, Source, Verdict};

/// The authenticated caller, attached to each request's extensions.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Caller {
    /// Credential name from the configuration.
    pub name: String,
    /// Its role.
    pub role: Role,
    /// What it may touch.
    pub policy: Arc<CallerPolicy>,
}

/// Refusals of one caller within [`DENIAL_WINDOW`] that raise a denial-burst alert.
pub const DENIAL_ALERT_THRESHOLD: usize = 10;
/// Window over which refusals are counted.
pub const DENIAL_WINDOW: Duration = Duration::from_secs(60);

/// Checks bearer credentials against configured SHA-256 hashes.
#[derive(Debug)]
pub struct Authenticator {
    entries: Vec<(CredentialEntry, Arc<CallerPolicy>)>,
    buckets: Mutex<HashMap<String, Bucket>>,
    /// Refusals per configured caller in the current window (bounded by the configuration:
    /// only authenticated callers are tracked here).
    denials: Mutex<HashMap<String, (Duration, usize)>>,
    metrics: Arc<crate::vault::metrics::Metrics>,
    /// The time rate limits and the denial window run on (the vault's, in a daemon).
    monotonic: MonotonicClock,
}

/// [`crate::vault::Monotonic`], shown in `Debug` by name.
struct MonotonicClock(crate::vault::Monotonic);

impl std::fmt::Debug for MonotonicClock {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("MonotonicClock")
    }
}

impl Authenticator {
    /// An authenticator for `entries`.
    pub fn new(entries: Vec<CredentialEntry>) -> Self {
        Self {
            entries: entries
                .into_iter()
                .map(|e| {
                    let policy = Arc::new(e.policy.clone());
                    (e, policy)
                })
                .collect(),
            buckets: Mutex::new(HashMap::new()),
            denials: Mutex::new(HashMap::new()),
            metrics: Arc::default(),
            monotonic: MonotonicClock(crate::vault::limits::system_monotonic()),
        }
    }

    /// Runs rate limits and the denial window on `monotonic` (the vault's clock).
    pub fn with_monotonic(mut self, monotonic: crate::vault::Monotonic) -> Self {
        self.monotonic = MonotonicClock(monotonic);
        self
    }

    /// Counts refusals in `metrics`.
    pub fn with_metrics(mut self, metrics: Arc<crate::vault::metrics::Metrics>) -> Self {
        self.metrics = metrics;
        self
    }

    /// Takes one token from the caller's bucket; false when its rate limit is exhausted.
    fn take_token(&self, caller: &Caller) -> bool {
        let Some(rate) = caller.policy.rate_per_second else {
            return true;
        };
        let burst = caller.policy.burst.unwrap_or(rate);
        let now = (self.monotonic.0)();
        let mut buckets = self
            .buckets
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        buckets
            .entry(caller.name.clone())
            .or_insert_with(|| Bucket::full(burst, now))
            .take(rate, burst, now)
    }

    /// Counts a refusal; raises a structured alert when a caller is refused again and again,
    /// which is what a stolen credential probing its limits looks like.
    fn note_denial(&self, caller: &str) {
        let mut denials = self
            .denials
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let now = (self.monotonic.0)();
        let (start, count) = denials.entry(caller.to_string()).or_insert((now, 0));
        // A fixed window: O(1) per refusal, whatever the rate.
        if now.saturating_sub(*start) >= DENIAL_WINDOW {
            *start = now;
            *count = 0;
        }
        *count += 1;
        if *count == DENIAL_ALERT_THRESHOLD {
            let count = *count;
            drop(denials);
            self.metrics.denial_bursts.inc();
            tracing::warn!(alert = "denial_burst", %caller, denials = count, window_seconds = DENIAL_WINDOW.as_secs(), "caller refused repeatedly; credential may be stolen");
        }
    }

    /// The caller whose credential is `presented`, if any. Every entry is compared, in constant
    /// time, so timing reveals neither which entry matched nor how much of a hash did.
    pub fn authenticate(&self, presented: &str) -> Option<Caller> {
        let digest: [u8; 32] = Sha256::digest(presented.as_bytes()).into();
        let mut found = None;
        for (e, policy) in &self.entries {
            let Some(hash) = &e.sha256 else { continue };
            if bool::from(hash.ct_eq(&digest)) {
                found = Some(Caller {
                    name: e.name.clone(),
                    role: e.role,
                    policy: Arc::clone(policy),
                });
            }
        }
        found
    }
}

impl Authenticator {
    /// The caller configured for the first of the identities a verified client certificate
    /// asserts (in [`super::tls::client_identities`]' order: SAN names before the CN) that
    /// names one.
    pub fn authenticate_identities(&self, identities: &[String]) -> Option<Caller> {
        identities.iter().find_map(|id| {
            self.entries
                .iter()
                .find(|(e, _)| e.mtls_identity.as_ref() == Some(id))
                .map(|(e, policy)| Caller {
                    name: e.name.clone(),
                    role: e.role,
                    policy: Arc::clone(policy),
                })
        })
    }
}

/// Admits only callers of one role to one service.
#[derive(Debug, Clone)]
pub struct RoleGuard {
    auth: Arc<Authenticator>,
    role: Role,
    service: &'static str,
    /// Audits refusals of configured callers and counts the others; without it (unit tests)
    /// refusals are only answered.
    vault: Option<Arc<Vault>>,
    /// Audits of refusals in flight at once: a flood of refusals of one (stolen) credential
    /// waits here, not in the blocking pool.
    audits: Arc<tokio::sync::Semaphore>,
}

/// Audits of authenticated refusals written at once.
const REFUSAL_AUDITS: usize = 16;

/// A refused request's answer, and how long to hold it back (a throttled address).
#[derive(Debug)]
pub struct Refusal {
    status: Status,
    hold: Option<(Duration, Arc<Vault>)>,
}

impl Refusal {
    /// The status, once the hold (if any) has passed. Call it after dropping the request's
    /// body: a body kept while the answer is held would let a throttled client pin up to the
    /// connection's flow-control window of memory for the whole retry time.
    pub async fn answer(self) -> Status {
        if let Some((wait, vault)) = self.hold {
            vault.refusals().hold(wait).await;
        }
        self.status
    }
}

/// Why a request was refused, and whether a configured caller made it.
#[derive(Debug)]
enum Refused {
    /// No configured caller: counted, not audited.
    Anonymous(RefusalReason, Status),
    /// A configured caller refused for its role, address or rate: audited.
    Caller(String, Status),
}

impl RoleGuard {
    /// Guards `service` for `role`.
    pub fn new(auth: Arc<Authenticator>, role: Role, service: &'static str) -> Self {
        Self {
            auth,
            role,
            service,
            vault: None,
            audits: Arc::new(tokio::sync::Semaphore::new(REFUSAL_AUDITS)),
        }
    }

    /// Records every refusal of a configured caller in `vault`'s audit trail, and counts the
    /// others in its [`crate::vault::refusals::Refusals`], which also throttles the addresses that keep failing.
    pub fn with_vault(mut self, vault: Arc<Vault>) -> Self {
        self.vault = Some(vault);
        self
    }

    /// Admits the request with these headers and connection extensions, or refuses it.
    /// Audits a refused configured caller (on the blocking pool) before answering. A throttled
    /// refusal comes back with how long to hold it ([`Refusal::answer`]): the caller drops the
    /// request's body first, so a held refusal keeps none of what the client sent.
    pub async fn admit(
        &self,
        headers: &http::HeaderMap,
        extensions: &http::Extensions,
    ) -> Result<Caller, Refusal> {
        match self.check(headers, extensions) {
            Ok(caller) => Ok(caller),
            Err(Refused::Anonymous(reason, status)) => {
                let (status, hold) = self.refuse_anonymous(extensions, reason, status);
                Err(Refusal {
                    status,
                    hold: hold.zip(self.vault.clone()),
                })
            }
            Err(Refused::Caller(name, status)) => Err(Refusal {
                status: self.refuse_caller(&name, status).await,
                hold: None,
            }),
        }
    }

    fn count_code(&self, status: &Status) {
        let code = super::status::code_name(status.code()).to_string();
        self.auth
            .metrics
            .auth_denials
            .get_or_create(&crate::vault::metrics::CodeLabel { code })
            .inc();
    }

    /// Counts the refusal; past its address's budget, answers `RESOURCE_EXHAUSTED` with a
    /// `google.rpc.RetryInfo` instead, and says how long to hold that answer back.
    fn refuse_anonymous(
        &self,
        extensions: &http::Extensions,
        reason: RefusalReason,
        status: Status,
    ) -> (Status, Option<Duration>) {
        let verdict = self.vault.as_ref().map_or(Verdict::Refuse, |v| {
            v.refusals()
                .refuse(Source::of(remote_ip(extensions)), reason, v.monotonic_now())
        });
        let (status, hold) = match verdict {
            Verdict::Refuse => (status, None),
            Verdict::Throttle(wait) => (throttled(wait), Some(wait)),
        };
        self.count_code(&status);
        (status, hold)
    }

    async fn refuse_caller(&self, caller: &str, status: Status) -> Status {
        self.auth.note_denial(caller);
        self.count_code(&status);
        if status.code() == tonic::Code::ResourceExhausted {
            crate::vault::metrics::Metrics::count(&self.auth.metrics.rate_limited, "caller");
        }
        if let Some(vault) = &self.vault {
            // Waits here, not in the blocking pool, when many refusals are audited at once.
            let _permit = self.audits.acquire().await;
            vault
                .audit_refusal(caller, self.service, &format!("{:?}", status.code()))
                .await;
        }
        status
    }

    fn check(
        &self,
        headers: &http::HeaderMap,
        extensions: &http::Extensions,
    ) -> Result<Caller, Refused> {
        let anonymous = |reason, message: &'static str| {
            Refused::Anonymous(reason, Status::unauthenticated(message))
        };
        let Some(header) = headers.get(http::header::AUTHORIZATION) else {
            // No bearer credential: a verified client certificate may identify the caller.
            let identities = extensions
                .get::<TlsConnectInfo<TcpConnectInfo>>()
                .and_then(TlsConnectInfo::peer_certs)
                .and_then(|chain| chain.first().map(|c| super::tls::client_identities(c)))
                .unwrap_or_default();
            let caller = match self.auth.authenticate_identities(&identities) {
                Some(c) => c,
                None if identities.is_empty() => {
                    return Err(anonymous(
                        RefusalReason::MissingCredential,
                        "missing credential: send `authorization: Bearer <credential>` or a client certificate",
                    ));
                }
                None => {
                    return Err(anonymous(
                        RefusalReason::UnknownCertificate,
                        "client certificate identity is not a configured caller",
                    ));
                }
            };
            return self.admit_caller(extensions, caller);
        };
        let presented = header
            .to_str()
            .ok()
            .and_then(|h| {
                h.strip_prefix("Bearer ")
                    .or_else(|| h.strip_prefix("bearer "))
            })
            .ok_or_else(|| {
                anonymous(
                    RefusalReason::MalformedCredential,
                    "malformed authorization header: expected `Bearer <credential>`",
                )
            })?;
        let Some(caller) = self.auth.authenticate(presented.trim()) else {
            return Err(anonymous(
                RefusalReason::InvalidCredential,
                "invalid credential",
            ));
        };
        self.admit_caller(extensions, caller)
    }

    fn admit_caller(
        &self,
        extensions: &http::Extensions,
        caller: Caller,
    ) -> Result<Caller, Refused> {
        if caller.role != self.role {
            tracing::warn!(service = self.service, caller = %caller.name, role = caller.role.as_str(), "permission denied");
            let status = Status::permission_denied(format!(
                "credential '{}' has role {}; {} requires role {}",
                caller.name,
                caller.role.as_str(),
                self.service,
                self.role.as_str()
            ));
            return Err(Refused::Caller(caller.name, status));
        }
        if let Some(ip) = remote_ip(extensions) {
            if !caller.policy.allows_ip(ip) {
                tracing::warn!(service = self.service, caller = %caller.name, %ip, "client address not allowed");
                let status = Status::permission_denied(format!(
                    "client address {ip} is not allowed for credential '{}'",
                    caller.name
                ));
                return Err(Refused::Caller(caller.name, status));
            }
        } else if !caller.policy.allowed_ips.is_empty() {
            let status =
                Status::permission_denied("client address unknown; credential has an IP allowlist");
            return Err(Refused::Caller(caller.name, status));
        }
        if !self.auth.take_token(&caller) {
            let status = super::status::exhausted(
                format!(
                    "credential '{}' exceeded its rate limit of {} requests/s",
                    caller.name,
                    caller.policy.rate_per_second.unwrap_or(0)
                ),
                None,
            );
            return Err(Refused::Caller(caller.name, status));
        }
        Ok(caller)
    }
}

/// The peer address of the connection a request came on (plaintext or TLS), as tonic records
/// it in the request's extensions.
pub fn remote_ip(extensions: &http::Extensions) -> Option<std::net::IpAddr> {
    extensions
        .get::<TcpConnectInfo>()
        .and_then(TcpConnectInfo::remote_addr)
        .or_else(|| {
            extensions
                .get::<TlsConnectInfo<TcpConnectInfo>>()
                .and_then(|i| i.get_ref().remote_addr())
        })
        .map(|a| a.ip())
}

/// `RESOURCE_EXHAUSTED` for an address that spent its budget of failures, with a
/// `google.rpc.RetryInfo` saying when to try again (HTTP: `Retry-After`).
pub fn throttled(wait: Duration) -> Status {
    super::status::exhausted(
        format!(
            "too many refused requests from this address; retry in {} ms",
            wait.as_millis()
        ),
        Some(wait),
    )
}

/// A gRPC service behind a [`RoleGuard`]: the request reaches it only with its [`Caller`] in
/// its extensions. Unlike tonic's synchronous interceptors, the guard may wait (for the
/// audit of a refusal) without blocking an executor thread.
#[derive(Debug, Clone)]
pub struct Guarded<S> {
    inner: S,
    guard: RoleGuard,
}

impl<S> Guarded<S> {
    /// `inner` behind `guard`.
    pub fn new(inner: S, guard: RoleGuard) -> Self {
        Self { inner, guard }
    }
}

impl<S: NamedService> NamedService for Guarded<S> {
    const NAME: &'static str = S::NAME;
}

impl<S> tower::Service<http::Request<tonic::body::Body>> for Guarded<S>
where
    S: tower::Service<
            http::Request<tonic::body::Body>,
            Response = http::Response<tonic::body::Body>,
            Error = Infallible,
        > + Clone
        + Send
        + 'static,
    S::Future: Send + 'static,
{
    type Response = http::Response<tonic::body::Body>;
    type Error = Infallible;
    type Future =
        std::pin::Pin<Box<dyn Future<Output = Result<Self::Response, Infallible>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut request: http::Request<tonic::body::Body>) -> Self::Future {
        // The service that was polled ready serves this request; the clone waits for the next.
        let clone = self.inner.clone();
        let mut inner = std::mem::replace(&mut self.inner, clone);
        let guard = self.guard.clone();
        Box::pin(async move {
            match guard.admit(request.headers(), request.extensions()).await {
                Ok(caller) => {
                    request.extensions_mut().insert(caller);
                    inner.call(request).await
                }
                Err(refusal) => {
                    drop(request);
                    Ok(refusal.answer().await.into_http())
                }
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::secret::ApiCredential;

    fn guard(role: Role) -> (RoleGuard, ApiCredential, ApiCredential) {
        let ingest = ApiCredential::new("tv_ingest_cred".into());
        let admin = ApiCredential::new("tv_admin_cred".into());
        let auth = Authenticator::new(vec![
            CredentialEntry::for_credential("web", Role::Ingest, &ingest),
            CredentialEntry::for_credential("sec", Role::Admin, &admin),
        ]);
        (RoleGuard::new(Arc::new(auth), role, "Admin"), ingest, admin)
    }

    fn call(g: &mut RoleGuard, header: Option<&str>) -> Result<Caller, Status> {
        let mut headers = http::HeaderMap::new();
        if let Some(h) = header {
            headers.insert("authorization", h.parse().expect("ascii"));
        }
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime")
            .block_on(async {
                match g.admit(&headers, &http::Extensions::new()).await {
                    Ok(caller) => Ok(caller),
                    Err(refusal) => Err(refusal.answer().await),
                }
            })
    }

    #[test]
    fn roles_and_credentials() {
        let (mut g, ingest, admin) = guard(Role::Admin);
        let ok =
            call(&mut g, Some(&format!("Bearer {}", admin.expose_secret()))).expect("admin ok");
        assert_eq!((ok.name.as_str(), ok.role), ("sec", Role::Admin));
        let denied = call(&mut g, Some(&format!("Bearer {}", ingest.expose_secret())))
            .expect_err("wrong role");
        assert_eq!(denied.code(), tonic::Code::PermissionDenied);
        assert!(!denied.message().contains(ingest.expose_secret()));
        for header in [None, Some("Basic abc"), Some("Bearer tv_wrong")] {
            let e = call(&mut g, header).expect_err("unauthenticated");
            assert_eq!(e.code(), tonic::Code::Unauthenticated, "{header:?}");
        }
    }
}
