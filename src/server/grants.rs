//! `Broker.IssueGrant` / `RevokeGrant`, and the use of a grant by `Proxy`.
//!
//! Grants live in the store's metadata under `grant/<sha256 of the handle>`; a use is a
//! read-check-write under one lock, so a grant with N uses serves exactly N calls. Expired
//! grants are deleted when next presented, and by [`sweep_expired`] (at startup and every
//! [`SWEEP_EVERY`]) when they never are.

use std::sync::Arc;

use super::status::ServiceError;
use super::{State, record_id};
use crate::api::v1;
use crate::audit::Draft;
use crate::config::CallerPolicy;
use crate::grant::{self, Grant, GrantError, Subject};
use crate::record::{Owner, Record, RecordId};
use crate::secret::GrantHandle;
use crate::store::StoreError;

fn invalid(message: impl Into<String>) -> ServiceError {
    ServiceError::Grant(GrantError::Invalid(message.into()))
}

fn may_issue(caller: &str, policy: &CallerPolicy) -> Result<(), ServiceError> {
    if policy.issue_grants {
        Ok(())
    } else {
        Err(ServiceError::PolicyDenied(format!(
            "credential '{caller}' may not issue or revoke grants (issue_grants is not set)"
        )))
    }
}

/// Validates and stores a new grant; returns the response with the handle.
pub(super) fn issue(
    s: &State,
    caller: &str,
    policy: &CallerPolicy,
    req: v1::IssueGrantRequest,
    now: i64,
) -> Result<v1::IssueGrantResponse, ServiceError> {
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
    let subject = match (req.id.is_empty(), req.owner.is_empty()) {
        (false, true) => {
            let id = record_id(req.id)?;
            let record = s
                .store
                .get_record(&id)?
                .ok_or_else(|| StoreError::NotFound(id.to_string()))?;
            policy
                .check_record(&record.meta)
                .map_err(ServiceError::PolicyDenied)?;
            draft = draft.record(id.as_str()).owner(record.meta.owner.as_str());
            Subject::Record(id)
        }
        (true, false) => {
            let owner = Owner::parse(req.owner).map_err(|source| ServiceError::Invalid {
                what: "owner".into(),
                source,
            })?;
            if !policy.allows_owner(owner.as_str()) {
                return Err(ServiceError::PolicyDenied(
                    "the owner is outside this caller's owner prefixes".into(),
                ));
            }
            draft = draft.owner(owner.as_str());
            Subject::Owner(owner)
        }
        _ => return Err(invalid("set exactly one of id or owner")),
    };
    let (handle, id) = grant::new_handle();
    let g = Grant {
        subject,
        methods,
        path_prefixes: req.path_prefixes,
        expires_at: now + req.ttl_seconds,
        uses_left: (req.max_uses > 0).then_some(req.max_uses),
        audience: (!req.audience.is_empty()).then_some(req.audience),
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
    // Audited first: a grant that cannot be audited is not issued.
    s.audit.append(&draft, true)?;
    s.store.put_meta(&grant::meta_key(&id), Some(&g.encode()))?;
    Ok(v1::IssueGrantResponse {
        grant: handle.expose_secret().to_string(),
        grant_id: id,
        expires_at: g.expires_at,
    })
}

/// Deletes a grant.
pub(super) fn revoke(
    s: &State,
    caller: &str,
    policy: &CallerPolicy,
    handle_or_id: &str,
) -> Result<(), ServiceError> {
    may_issue(caller, policy)?;
    let id = grant::grant_id(handle_or_id);
    let _guard = s.grants_lock();
    if s.store.get_meta(&grant::meta_key(&id))?.is_none() {
        return Err(StoreError::NotFound(format!("grant {}", grant::short(&id))).into());
    }
    s.audit.append(
        &Draft::new(caller, "RevokeGrant").detail(format!("grant {}", grant::short(&id))),
        true,
    )?;
    s.store.put_meta(&grant::meta_key(&id), None)?;
    Ok(())
}

/// How often expired grants are swept.
pub(super) const SWEEP_EVERY: std::time::Duration = std::time::Duration::from_secs(600);

/// Deletes every grant expired at `now`, a page at a time; returns how many. A grant that is
/// never presented again would otherwise stay in the store for good. Grants that do not decode
/// are left for an operator to look at (they already allow nothing).
pub(super) fn sweep_expired(s: &State, now: i64) -> Result<u64, ServiceError> {
    let mut after: Option<String> = None;
    let mut deleted = 0u64;
    loop {
        let page = s
            .store
            .meta_page(grant::META_PREFIX, after.as_deref(), 1000)?;
        let Some((last, _)) = page.last() else {
            return Ok(deleted);
        };
        after = Some(last.clone());
        let expired: Vec<String> = page
            .into_iter()
            .filter(|(_, v)| Grant::decode(v).is_some_and(|g| g.is_expired_at(now)))
            .map(|(k, _)| k)
            .collect();
        if !expired.is_empty() {
            // Expiry is final, so nothing can revive these between the read and the delete;
            // the lock only keeps the delete out of the middle of a use.
            let _guard = s.grants_lock();
            s.store.delete_meta(&expired)?;
            deleted += expired.len() as u64;
        }
    }
}

/// The record a record grant covers (for a `Proxy` call that names only the grant).
pub(super) fn record_of(s: &State, handle: &GrantHandle) -> Result<RecordId, ServiceError> {
    let id = grant::grant_id(handle.expose_secret());
    match read(s, &id)?.subject {
        Subject::Record(r) => Ok(r),
        Subject::Owner(_) => Err(invalid(
            "id is required with an owner grant: name the record to use",
        )),
    }
}

fn read(s: &State, id: &str) -> Result<Grant, ServiceError> {
    s.store
        .get_meta(&grant::meta_key(id))?
        .as_deref()
        .and_then(Grant::decode)
        .ok_or(ServiceError::Grant(GrantError::Unknown))
}

/// Uses a grant for a `Proxy` call on `record`: checks it covers the record, method and path,
/// runs `then` (the provider checks) and takes one use only if everything passed.
pub(super) fn use_grant<T>(
    s: &State,
    handle: &GrantHandle,
    caller: &str,
    record: &Record,
    method: &str,
    path: &str,
    then: impl FnOnce() -> Result<T, ServiceError>,
) -> Result<T, ServiceError> {
    let id = grant::grant_id(handle.expose_secret());
    let _guard = s.grants_lock();
    let g = read(s, &id)?;
    let now = crate::unix_now();
    let after = match g.authorize(&id, caller, now) {
        Err(e @ GrantError::Expired(_)) => {
            s.store.put_meta(&grant::meta_key(&id), None)?;
            return Err(e.into());
        }
        other => other?,
    };
    g.covers(&id, &record.meta)?;
    g.allows(&id, method, path)?;
    let out = then()?;
    // An unlimited grant is unchanged by a use; a counted one is kept at zero until it expires
    // (the sweep removes it), so its next use is refused as "no uses left".
    if after.uses_left.is_some() {
        s.store
            .put_meta(&grant::meta_key(&id), Some(&after.encode()))?;
    }
    Ok(out)
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
