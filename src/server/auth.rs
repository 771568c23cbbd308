//! Caller authentication and role checks for every gRPC service.
//!
//! Owns: [`Authenticator`] (configured credential hashes, constant-time comparison) and
//! [`RoleGuard`], the tonic interceptor that admits exactly one role per service.
//! `UNAUTHENTICATED` without a valid credential, `PERMISSION_DENIED` for a valid credential of
//! the wrong role.
//!
//! Must never: log or echo a presented credential, or compare credentials in variable time.

use std::sync::Arc;

use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;
use tonic::service::Interceptor;
use tonic::{Request, Status};

use crate::config::{CredentialEntry, Role};

/// The authenticated caller, attached to each request's extensions.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Caller {
    /// Credential name from the configuration.
    pub name: String,
    /// Its role.
    pub role: Role,
}

/// Checks bearer credentials against configured SHA-256 hashes.
#[derive(Debug)]
pub struct Authenticator {
    entries: Vec<CredentialEntry>,
}

impl Authenticator {
    /// An authenticator for `entries`.
    pub fn new(entries: Vec<CredentialEntry>) -> Self {
        Self { entries }
    }

    /// The caller whose credential is `presented`, if any. Every entry is compared, in constant
    /// time, so timing reveals neither which entry matched nor how much of a hash did.
    pub fn authenticate(&self, presented: &str) -> Option<Caller> {
        let digest: [u8; 32] = Sha256::digest(presented.as_bytes()).into();
        let mut found = None;
        for e in &self.entries {
            let Some(hash) = &e.sha256 else { continue };
            if bool::from(hash.ct_eq(&digest)) {
                found = Some(Caller {
                    name: e.name.clone(),
                    role: e.role,
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
            .find(|e| {
                e.mtls_identity
                    .as_ref()
                    .is_some_and(|m| identities.contains(m))
            })
            .map(|e| Caller {
                name: e.name.clone(),
                role: e.role,
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
        assert_eq!(
            ok,
            Caller {
                name: "sec".into(),
                role: Role::Admin
            }
        );
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
