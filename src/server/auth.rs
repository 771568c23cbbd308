//! Caller authentication and role checks for every gRPC service.
//!
//! Owns: [`Authenticator`] (configured credential hashes, constant-time comparison, per-caller
//! token buckets, denial-burst alerts) and [`RoleGuard`], the tonic interceptor that admits
//! exactly one role per service. `UNAUTHENTICATED` without a valid credential,
//! `PERMISSION_DENIED` for a valid credential of the wrong role or from an address outside its
//! allowlist, `RESOURCE_EXHAUSTED` past its rate limit.
//!
//! Must never: log or echo a presented credential, or compare credentials in variable time.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;
use tonic::service::Interceptor;
use tonic::{Request, Status};

use crate::config::{CallerPolicy, CredentialEntry, Role};
use crate::vault::limits::Bucket;

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
    denials: Mutex<HashMap<String, Vec<Instant>>>,
    metrics: Arc<crate::vault::metrics::Metrics>,
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
        }
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
        let mut buckets = self
            .buckets
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        buckets
            .entry(caller.name.clone())
            .or_insert_with(|| Bucket::full(burst))
            .take(rate, burst)
    }

    /// Counts a refusal; raises a structured alert when a caller is refused again and again,
    /// which is what a stolen credential probing its limits looks like.
    fn note_denial(&self, caller: &str) {
        let mut denials = self
            .denials
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let now = Instant::now();
        let recent = denials.entry(caller.to_string()).or_default();
        recent.retain(|t| now.duration_since(*t) < DENIAL_WINDOW);
        recent.push(now);
        if recent.len() == DENIAL_ALERT_THRESHOLD {
            self.metrics.denial_bursts.inc();
            tracing::warn!(alert = "denial_burst", %caller, denials = recent.len(), window_seconds = DENIAL_WINDOW.as_secs(), "caller refused repeatedly; credential may be stolen");
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
    /// The caller configured for one of the identities a verified client certificate asserts.
    pub fn authenticate_identities(&self, identities: &[String]) -> Option<Caller> {
        self.entries
            .iter()
            .find(|(e, _)| {
                e.mtls_identity
                    .as_ref()
                    .is_some_and(|m| identities.contains(m))
            })
            .map(|(e, policy)| Caller {
                name: e.name.clone(),
                role: e.role,
                policy: Arc::clone(policy),
            })
    }
}

/// Interceptor admitting only callers of one role to one service.
#[derive(Debug, Clone)]
pub struct RoleGuard {
    auth: Arc<Authenticator>,
    role: Role,
    service: &'static str,
    audit: Option<Arc<crate::audit::Auditor>>,
}

impl RoleGuard {
    /// Guards `service` for `role`.
    pub fn new(auth: Arc<Authenticator>, role: Role, service: &'static str) -> Self {
        Self {
            auth,
            role,
            service,
            audit: None,
        }
    }
}

impl RoleGuard {
    /// Records every refused call in `audit`.
    pub fn with_audit(mut self, audit: Arc<crate::audit::Auditor>) -> Self {
        self.audit = Some(audit);
        self
    }

    fn refused(&self, caller: &str, status: Status) -> Status {
        self.auth.note_denial(caller);
        let code = super::status::code_name(status.code()).to_string();
        self.auth
            .metrics
            .auth_denials
            .get_or_create(&crate::vault::metrics::CodeLabel { code })
            .inc();
        if status.code() == tonic::Code::ResourceExhausted {
            crate::vault::metrics::Metrics::count(&self.auth.metrics.rate_limited, "caller");
        }
        if let Some(audit) = &self.audit {
            let draft = crate::audit::Draft::new(caller, "auth")
                .outcome(format!("{:?}", status.code()))
                .detail(self.service);
            if let Err(e) = audit.append(&draft, false) {
                tracing::error!(error = %e, "could not audit an authentication failure");
            }
        }
        status
    }
}

impl Interceptor for RoleGuard {
    fn call(&mut self, request: Request<()>) -> Result<Request<()>, Status> {
        self.check(request)
            .map_err(|(caller, status)| self.refused(&caller, status))
    }
}

impl RoleGuard {
    fn check(&self, request: Request<()>) -> Result<Request<()>, (String, Status)> {
        let anonymous = |status| ("-".to_string(), status);
        let Some(header) = request.metadata().get("authorization") else {
            // No bearer credential: a verified client certificate may identify the caller.
            let identities = request
                .peer_certs()
                .and_then(|chain| chain.first().map(|c| super::tls::client_identities(c)))
                .unwrap_or_default();
            let caller = match self.auth.authenticate_identities(&identities) {
                Some(c) => c,
                None if identities.is_empty() => {
                    return Err(anonymous(Status::unauthenticated(
                        "missing credential: send `authorization: Bearer <credential>` or a client certificate",
                    )));
                }
                None => {
                    return Err(anonymous(Status::unauthenticated(
                        "client certificate identity is not a configured caller",
                    )));
                }
            };
            return self.admit(request, caller);
        };
        let presented = header
            .to_str()
            .ok()
            .and_then(|h| {
                h.strip_prefix("Bearer ")
                    .or_else(|| h.strip_prefix("bearer "))
            })
            .ok_or_else(|| {
                anonymous(Status::unauthenticated(
                    "malformed authorization header: expected `Bearer <credential>`",
                ))
            })?;
        let Some(caller) = self.auth.authenticate(presented.trim()) else {
            tracing::warn!(
                service = self.service,
                "authentication failed: unknown credential"
            );
            return Err(anonymous(Status::unauthenticated("invalid credential")));
        };
        self.admit(request, caller)
    }

    fn admit(
        &self,
        mut request: Request<()>,
        caller: Caller,
    ) -> Result<Request<()>, (String, Status)> {
        if caller.role != self.role {
            tracing::warn!(service = self.service, caller = %caller.name, role = caller.role.as_str(), "permission denied");
            let status = Status::permission_denied(format!(
                "credential '{}' has role {}; {} requires role {}",
                caller.name,
                caller.role.as_str(),
                self.service,
                self.role.as_str()
            ));
            return Err((caller.name, status));
        }
        if let Some(ip) = request.remote_addr().map(|a| a.ip()) {
            if !caller.policy.allows_ip(ip) {
                tracing::warn!(service = self.service, caller = %caller.name, %ip, "client address not allowed");
                let status = Status::permission_denied(format!(
                    "client address {ip} is not allowed for credential '{}'",
                    caller.name
                ));
                return Err((caller.name, status));
            }
        } else if !caller.policy.allowed_ips.is_empty() {
            let status =
                Status::permission_denied("client address unknown; credential has an IP allowlist");
            return Err((caller.name, status));
        }
        if !self.auth.take_token(&caller) {
            let status = Status::resource_exhausted(format!(
                "credential '{}' exceeded its rate limit of {} requests/s",
                caller.name,
                caller.policy.rate_per_second.unwrap_or(0)
            ));
            return Err((caller.name, status));
        }
        request.extensions_mut().insert(caller);
        Ok(request)
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
        let mut req = Request::new(());
        if let Some(h) = header {
            req.metadata_mut()
                .insert("authorization", h.parse().expect("ascii"));
        }
        g.call(req)
            .map(|r| r.extensions().get::<Caller>().cloned().expect("caller set"))
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
