//! `Broker.IssueGrant` / `RevokeGrant`, and the use of a grant by `Proxy`.
//!
//! Grants live in the store under the SHA-256 of their handle; every issue, revocation and use
//! is written together with its audit event. A use is a compare-and-swap on the stored grant,
//! so a grant with N uses serves at most N calls however they interleave. Expired grants are
//! deleted when next presented, and by [`sweep_expired`] (at startup and every
//! [`SWEEP_EVERY`]) when they never are.

use std::sync::Arc;

use super::{Vault, VaultError};
use crate::audit::Draft;
use crate::config::{CallerPolicy, PolicyDenial};
use crate::grant::{self, Grant, GrantError, Subject};
use crate::record::{Owner, Record, RecordId};
use crate::secret::GrantHandle;
use crate::store::{Mutation, StoreError};

/// What a grant covers.
#[derive(Debug, Clone)]
pub enum GrantSubject {
    /// One record.
    Record(RecordId),
    /// Every record of an owner the issuer may touch.
    Owner(Owner),
}

/// A request to issue a grant.
#[derive(Debug, Clone)]
pub struct IssueGrant {
    /// What it covers.
    pub subject: GrantSubject,
    /// Allowed HTTP methods (any case); empty allows every method.
    pub methods: Vec<String>,
    /// Allowed path prefixes; empty allows every path.
    pub path_prefixes: Vec<String>,
    /// Lifetime in seconds (1..=[`crate::grant::MAX_TTL_SECONDS`]).
    pub ttl_seconds: i64,
    /// Most uses; 0 is unlimited.
    pub max_uses: u32,
    /// The only caller that may use it; `None` for any caller allowed to proxy.
    pub audience: Option<String>,
}

/// An issued grant.
#[derive(Debug)]
pub struct IssuedGrant {
    /// The handle (a bearer secret for `Proxy`).
    pub handle: GrantHandle,
    /// The public id of the grant (hash of the handle).
    pub grant_id: String,
    /// Expiry, Unix seconds.
    pub expires_at: i64,
}

fn invalid(message: impl Into<String>) -> VaultError {
    VaultError::Grant(GrantError::Invalid(message.into()))
}

fn may_issue(caller: &str, policy: &CallerPolicy) -> Result<(), VaultError> {
    if policy.issue_grants {
        Ok(())
    } else {
        Err(PolicyDenial::IssueGrants(caller.to_string()).into())
    }
}

/// Validates and stores a new grant; returns the response with the handle.
pub(super) fn issue(
    s: &Vault,
    caller: &str,
    policy: &CallerPolicy,
    req: IssueGrant,
    now: i64,
) -> Result<IssuedGrant, VaultError> {
    may_issue(caller, policy)?;
    if !(1..=grant::MAX_TTL_SECONDS).contains(&req.ttl_seconds) {
        return Err(invalid(format!(
            "ttl_seconds must be between 1 and {}",
            grant::MAX_TTL_SECONDS
        )));
    }
    let methods = req
        .methods
        .iter()
        .map(|m| {
            let m = m.to_ascii_uppercase();
            http::Method::from_bytes(m.as_bytes())
                .map(|_| m.clone())
                .map_err(|_| invalid(format!("invalid method {m:?}")))
        })
        .collect::<Result<Vec<_>, _>>()?;
    if let Some(p) = req
        .path_prefixes
        .iter()
        .find(|p| !p.starts_with('/') || p.contains(".."))
    {
        return Err(invalid(format!(
            "path prefix {p:?} must start with '/' and contain no '..'"
        )));
    }
    let mut draft = Draft::new(caller, "IssueGrant");
    let subject = match req.subject {
        GrantSubject::Record(id) => {
            let record = s
                .store
                .get_record(&id)?
                .ok_or_else(|| StoreError::NotFound(id.to_string()))?;
            policy
                .check_record(&record.meta)
                .map_err(VaultError::PolicyDenied)?;
            draft = draft.record(id.as_str()).owner(record.meta.owner.as_str());
            Subject::Record(id)
        }
        GrantSubject::Owner(owner) => {
            if !policy.allows_owner(owner.as_str()) {
                return Err(PolicyDenial::Owner.into());
            }
            draft = draft.owner(owner.as_str());
            Subject::Owner(owner)
        }
    };
    let (handle, id) = grant::new_handle();
    let g = Grant {
        subject,
        methods,
        path_prefixes: req.path_prefixes,
        expires_at: now + req.ttl_seconds,
        uses_left: (req.max_uses > 0).then_some(req.max_uses),
        audience: req.audience,
        issuer: caller.to_string(),
        providers: policy.providers.clone(),
        kinds: policy
            .kinds
            .iter()
            .map(|k| k.as_str().to_string())
            .collect(),
    };
    let draft = draft.detail(format!(
        "grant {} ttl {}s uses {}",
        grant::short(&id),
        req.ttl_seconds,
        req.max_uses
    ));
    // The grant and its audit event are one write: no grant without its event.
    let put = Mutation::PutGrant {
        id: id.clone(),
        grant: g.encode(),
        expected: None,
    };
    s.audited(draft, |a| {
        s.store.apply(&[put], std::slice::from_ref(a), now)?;
        Ok(((), true))
    })?;
    Ok(IssuedGrant {
        handle,
        grant_id: id,
        expires_at: g.expires_at,
    })
}

/// Deletes a grant, with its audit event in the same write.
pub(super) fn revoke(
    s: &Vault,
    caller: &str,
    policy: &CallerPolicy,
    handle_or_id: &str,
) -> Result<(), VaultError> {
    may_issue(caller, policy)?;
    let id = grant::grant_id(handle_or_id);
    if s.store.get_grant(&id)?.is_none() {
        return Err(VaultError::NoSuch(format!(
            "no grant {}: never issued, already revoked, or expired",
            grant::short(&id)
        )));
    }
    let draft = Draft::new(caller, "RevokeGrant").detail(format!("grant {}", grant::short(&id)));
    s.audited(draft, |a| {
        s.store.apply(
            &[Mutation::DeleteGrant(id.clone())],
            std::slice::from_ref(a),
            s.now(),
        )?;
        Ok(((), true))
    })
}

/// How often expired grants are swept.
pub(super) const SWEEP_EVERY: std::time::Duration = std::time::Duration::from_secs(600);

/// Deletes every grant expired at `now`, a page at a time; returns how many. A grant that is
/// never presented again would otherwise stay in the store for good. Grants that do not decode
/// are left for an operator to look at (they already allow nothing). Expiry is final, so a
/// concurrent use cannot revive one (its compare-and-swap finds it gone).
pub(super) fn sweep_expired(s: &Vault, now: i64) -> Result<u64, VaultError> {
    let mut after: Option<String> = None;
    let mut deleted = 0u64;
    loop {
        let page = s.store.grant_page(after.as_deref(), 1000)?;
        let Some((last, _)) = page.last() else {
            return Ok(deleted);
        };
        after = Some(last.clone());
        let expired: Vec<Mutation> = page
            .into_iter()
            .filter(|(_, v)| Grant::decode(v).is_some_and(|g| g.is_expired_at(now)))
            .map(|(id, _)| Mutation::DeleteGrant(id))
            .collect();
        if !expired.is_empty() {
            s.store.apply(&expired, &[], now)?;
            deleted += expired.len() as u64;
        }
    }
}

/// The record a record grant covers (for a `Proxy` call that names only the grant).
pub(super) fn record_of(s: &Vault, handle: &GrantHandle) -> Result<RecordId, VaultError> {
    let id = grant::grant_id(handle.expose_secret());
    match read(s, &id)?.1.subject {
        Subject::Record(r) => Ok(r),
        Subject::Owner(_) => Err(invalid(
            "id is required with an owner grant: name the record to use",
        )),
    }
}

/// The stored grant (its bytes, for a compare-and-swap, and decoded).
fn read(s: &Vault, id: &str) -> Result<(Vec<u8>, Grant), VaultError> {
    let bytes = s
        .store
        .get_grant(id)?
        .ok_or(VaultError::Grant(GrantError::Unknown))?;
    let grant = Grant::decode(&bytes).ok_or(VaultError::Grant(GrantError::Unknown))?;
    Ok((bytes, grant))
}

/// One `Proxy` call made with a grant.
#[derive(Debug)]
pub(super) struct GrantUse {
    /// The handle presented.
    pub(super) handle: GrantHandle,
    /// The request's method, upper case.
    pub(super) method: String,
    /// The request's path.
    pub(super) path: String,
}

impl GrantUse {
    /// Checks the grant allows this call on `record` (caller, expiry, uses, record, method,
    /// path) without taking a use, so a refused call, or one that fails later, spends nothing.
    /// An expired grant is deleted on the spot.
    pub(super) fn check(&self, s: &Vault, caller: &str, record: &Record) -> Result<(), VaultError> {
        let id = grant::grant_id(self.handle.expose_secret());
        let (_, g) = read(s, &id)?;
        self.authorize(s, &id, &g, caller, record).map(|_| ())
    }

    fn authorize(
        &self,
        s: &Vault,
        id: &str,
        g: &Grant,
        caller: &str,
        record: &Record,
    ) -> Result<Grant, VaultError> {
        let now = s.now();
        let after = match g.authorize(id, caller, now) {
            Err(e @ GrantError::Expired(_)) => {
                s.store
                    .apply(&[Mutation::DeleteGrant(id.to_string())], &[], now)?;
                return Err(e.into());
            }
            other => other?,
        };
        g.covers(id, &record.meta)?;
        g.allows(id, &self.method, &self.path)?;
        Ok(after)
    }

    /// Takes one use, in the same write as the call's audit event `draft`: the use is spent
    /// once the call is about to be attempted (docs/PROXY.md), and a grant with N uses serves
    /// at most N calls, however many run at once (compare-and-swap, retried on a lost race).
    pub(super) fn spend(
        &self,
        s: &Vault,
        caller: &str,
        record: &Record,
        draft: &Draft,
    ) -> Result<(), VaultError> {
        let id = grant::grant_id(self.handle.expose_secret());
        for _ in 0..16 {
            let (bytes, g) = read(s, &id)?;
            let after = self.authorize(s, &id, &g, caller, record)?;
            if after.uses_left.is_none() {
                // Unlimited: a use changes nothing but the audit trail.
                s.audit.append(draft, false)?;
                return Ok(());
            }
            let put = Mutation::PutGrant {
                id: id.clone(),
                grant: after.encode(),
                expected: Some(bytes),
            };
            let spent = s.audit.append_with(draft, |a| {
                match s.store.apply(&[put], std::slice::from_ref(a), s.now()) {
                    Ok(()) => Ok((true, true)),
                    Err(StoreError::Conflict(_)) => Ok((false, false)),
                    Err(e) => Err(VaultError::from(e)),
                }
            })?;
            if spent {
                return Ok(());
            }
        }
        Err(StoreError::Conflict(format!("grant {}", grant::short(&id))).into())
    }
}

/// The caller policy to apply to a grant-based call: the grant decides which records, the
/// caller's own rate limits still apply.
pub(super) fn grant_policy(policy: &CallerPolicy) -> Arc<CallerPolicy> {
    Arc::new(CallerPolicy {
        providers: vec![],
        owner_prefixes: vec![],
        kinds: vec![],
        ..policy.clone()
    })
}
