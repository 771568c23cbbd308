//! Broker's use cases: hand a decrypted secret to an authorized worker ([`Vault::get_token`]),
//! or make its upstream call with the credential injected ([`Vault::proxy`]); issue and revoke
//! grants.
//!
//! Every release of a secret is audited before the secret leaves (fail closed: no audit event,
//! no secret). `proxy` validates the outbound request before the record is decrypted, so a
//! refused request never touches the credential.
//!
//! Must never: return a secret to a caller whose policy, grant or limits refused it, or spend
//! a grant use for a call that is not attempted.

use std::sync::Arc;

use super::grants::{IssueGrant, IssuedGrant};
use super::{Caller, Vault, VaultError, grants, records, refresh};
use crate::audit::Draft;
use crate::config::CallerPolicy;
use crate::keys::keyring::Keyring;
use crate::oauth::TokenBundle;
use crate::proxy::{self, CallerRequest, UpstreamResponse};
use crate::record::{Record, RecordId, SecretKind};
use crate::secret::{GrantHandle, Secret};
use crate::store::StoreError;

/// A released secret and the record it belongs to.
#[derive(Debug)]
pub struct Released {
    /// The record as read (refreshed, if its bundle was refreshed on the way).
    pub record: Record,
    /// The secret (a refreshed bundle's, if refreshed).
    pub secret: Secret,
}

/// What a `Proxy` call acts on: a record, a grant, or a record through an owner grant.
#[derive(Debug)]
pub struct ProxyTarget {
    /// The record; required unless the grant covers exactly one record.
    pub id: Option<RecordId>,
    /// The grant presented instead of the caller's own policy.
    pub grant: Option<GrantHandle>,
}

/// The upstream's answer to a proxied call.
#[derive(Debug)]
pub struct Proxied {
    /// Status, headers (hop-by-hop removed, credential redacted) and body.
    pub response: UpstreamResponse,
    /// Whether the token was refreshed to make the call.
    pub refreshed: bool,
}

impl Vault {
    /// Releases a record's secret to `caller`: policy, limits, state and expiry checked; a
    /// refreshable bundle near expiry is refreshed first. Audited before release.
    pub async fn get_token(
        self: &Arc<Self>,
        caller: &Caller,
        id: &RecordId,
    ) -> Result<Released, VaultError> {
        let result = async {
            let (mut record, mut secret, ()) = load(
                self,
                &caller.name,
                &caller.policy,
                id,
                Draft::new(&caller.name, "GetToken"),
                None,
                |_, _, _| Ok(()),
            )
            .await?;
            if let Some((upstream, oauth)) = refresh::oauth_for(self, &record) {
                let bundle = TokenBundle::parse(&secret).map_err(|source| VaultError::Refresh {
                    id: id.to_string(),
                    source,
                })?;
                if bundle.expires_within(self.now(), oauth.refresh_skew_seconds) {
                    let refreshed =
                        refresh::refresh(self, &upstream, &caller.name, &record).await?;
                    record = refreshed.record;
                    secret = refreshed.bundle.to_secret();
                }
            }
            Ok::<_, VaultError>(Released { record, secret })
        }
        .await;
        match &result {
            Ok(_) => {
                tracing::debug!(rpc = "GetToken", caller = %caller.name, record = %self.log_id(id), "released")
            }
            // Shed calls are counted and summarized (`Metrics::shed`), not logged one by one.
            Err(VaultError::Overloaded { .. }) => {}
            Err(e) => {
                tracing::info!(rpc = "GetToken", caller = %caller.name, record = %self.log_id(id), error = %e, "refused")
            }
        }
        result
    }

    /// Makes `call` to the record's provider with its credential injected, refreshing the token
    /// when it is near expiry or the provider rejects it (once). With a grant, the grant decides
    /// which records and requests are allowed; a use is spent when the call is attempted.
    pub async fn proxy(
        self: &Arc<Self>,
        caller: &Caller,
        target: ProxyTarget,
        call: CallerRequest,
    ) -> Result<Proxied, VaultError> {
        let ProxyTarget { id, grant } = target;
        let id = match (id, &grant) {
            (Some(id), _) => id,
            (None, Some(handle)) => {
                let handle = handle.clone();
                self.blocking(move |v| grants::record_of(v, &handle))
                    .await?
            }
            (None, None) => return Err(VaultError::Missing("id")),
        };
        let result = self
            .proxy_call(&caller.name, &caller.policy, &id, call, grant)
            .await;
        match &result {
            Ok(r) => {
                tracing::debug!(rpc = "Proxy", caller = %caller.name, record = %self.log_id(&id), status = r.response.status, refreshed = r.refreshed, "proxied")
            }
            Err(VaultError::Overloaded { .. }) => {}
            Err(e) => {
                tracing::info!(rpc = "Proxy", caller = %caller.name, record = %self.log_id(&id), error = %e, "refused")
            }
        }
        result
    }

    /// Issues a grant on behalf of `caller` (whose policy must allow issuing, and cover the
    /// subject); the grant and its audit event are one write.
    pub async fn issue_grant(
        self: &Arc<Self>,
        caller: &Caller,
        request: IssueGrant,
    ) -> Result<IssuedGrant, VaultError> {
        let who = caller.clone();
        let result = self
            .blocking(move |v| {
                let issued = grants::issue(v, &who.name, &who.policy, request, v.now());
                v.audit_if_refused(Draft::new(&who.name, "IssueGrant"), issued)
            })
            .await;
        match &result {
            Ok(g) => {
                tracing::info!(rpc = "IssueGrant", caller = %caller.name, grant = %crate::grant::short(&g.grant_id), expires_at = g.expires_at, "issued")
            }
            Err(e) => {
                tracing::info!(rpc = "IssueGrant", caller = %caller.name, error = %e, "refused")
            }
        }
        result
    }

    /// Revokes a grant, named by its id or its handle.
    pub async fn revoke_grant(
        self: &Arc<Self>,
        caller: &Caller,
        handle_or_id: GrantHandle,
    ) -> Result<(), VaultError> {
        let who = caller.clone();
        let result = self
            .blocking(move |v| {
                let revoked =
                    grants::revoke(v, &who.name, &who.policy, handle_or_id.expose_secret());
                v.audit_if_refused(Draft::new(&who.name, "RevokeGrant"), revoked)
            })
            .await;
        if let Err(e) = &result {
            tracing::info!(rpc = "RevokeGrant", caller = %caller.name, error = %e, "refused");
        }
        result
    }

    async fn proxy_call(
        self: &Arc<Self>,
        caller: &str,
        policy: &Arc<CallerPolicy>,
        id: &RecordId,
        call: CallerRequest,
        grant: Option<GrantHandle>,
    ) -> Result<Proxied, VaultError> {
        let state = self;
        let draft = Draft::new(caller, "Proxy");
        // With a grant, the grant decides which records; the caller's rate limits still apply.
        let policy = match &grant {
            Some(_) => &grants::grant_policy(policy),
            None => policy,
        };
        let who = caller.to_string();
        let grant_use = grant.map(|handle| grants::GrantUse {
            handle,
            method: call.method.to_ascii_uppercase(),
            path: call.path.clone(),
        });
        let grant_use = grant_use.map(Arc::new);
        let check_use = grant_use.clone();
        // The outbound request is checked against the record's provider before the record is
        // opened, in the same blocking step (and audited if refused).
        let (mut record, secret, (upstream, prepared)) = load(
            state,
            caller,
            policy,
            id,
            draft,
            grant_use,
            move |s, record, draft| {
                let meta = &record.meta;
                let upstream = s
                    .upstreams()
                    .get(meta.provider.as_str())
                    .ok_or_else(|| VaultError::NoProvider(meta.provider.to_string()))?;
                if !matches!(
                    meta.kind,
                    SecretKind::AccessToken | SecretKind::ApiKey | SecretKind::TokenBundle
                ) {
                    return Err(VaultError::NotACredential {
                        id: meta.id.to_string(),
                        kind: meta.kind,
                    });
                }
                let method = call.method.to_ascii_uppercase();
                match &check_use {
                    None => *draft = std::mem::take(draft).detail(method),
                    Some(g) => {
                        *draft = std::mem::take(draft).detail(format!(
                            "{method} grant {}",
                            crate::grant::short(&crate::grant::grant_id(g.handle.expose_secret()))
                        ));
                        g.check(s, &who, record)?;
                    }
                }
                // Moves the request (its body may be megabytes) instead of copying it.
                let prepared = upstream.prepare(call)?;
                Ok((upstream, prepared))
            },
        )
        .await?;
        let refreshable = refresh::oauth_for(state, &record);
        // Whether this call refreshed the token (what the caller is told), and whether it
        // asked for a refresh at all (at most once per call, whoever did it).
        let mut refreshed = false;
        let mut asked = false;
        let mut token = match record.meta.kind {
            SecretKind::TokenBundle => {
                let bundle = TokenBundle::parse(&secret).map_err(|source| VaultError::Refresh {
                    id: id.to_string(),
                    source,
                })?;
                match &refreshable {
                    Some((up, oauth))
                        if bundle.expires_within(state.now(), oauth.refresh_skew_seconds) =>
                    {
                        let r = refresh::refresh(state, up, caller, &record).await?;
                        record = r.record;
                        refreshed = r.by_this_call;
                        asked = true;
                        r.bundle.access()
                    }
                    _ => bundle.access(),
                }
            }
            _ => secret,
        };
        let provider = upstream.policy().name.clone();
        let count = |r: &Result<UpstreamResponse, proxy::ProxyError>| {
            let class = match r {
                Ok(r) => format!("{}xx", r.status / 100),
                Err(e) => proxy_error_kind(e).to_string(),
            };
            state.metrics.upstream(&provider, &class);
        };
        let sent = upstream.send(&prepared, &token).await;
        count(&sent);
        let mut response = sent?;
        // One refresh after the provider rejects the access token.
        if proxy::is_unauthorized(response.status)
            && !asked
            && let Some((up, _)) = &refreshable
        {
            let r = refresh::refresh(state, up, caller, &record).await?;
            refreshed = r.by_this_call;
            token = r.bundle.access();
            let sent = upstream.send(&prepared, &token).await;
            count(&sent);
            response = sent?;
        }
        drop(token);
        Ok(Proxied {
            response,
            refreshed,
        })
    }
}

/// Reads, checks and opens one record for `caller`, auditing `draft` before the secret is
/// released (fail closed: no audit event, no secret). `check` runs after the caller's policy
/// and before the record is opened; its refusal is audited like any other. With a grant, its
/// use is spent only once everything passed, in the same write as the audit event. A
/// refreshable token bundle past its expiry is returned (the caller refreshes it); anything
/// else past expiry is refused.
///
/// The store read, the checks, a cached data key and the audit write run on the blocking
/// pool; only an RSA unwrap takes a private-key thread, so a cached call never queues behind
/// private-key work, and a private-key thread never waits on the store or the audit trail.
/// Where the store answers reads on a task of its own (PostgreSQL), a call without a grant
/// whose data key is cached awaits its read on the executor instead
/// ([`Vault::awaited_read`]), and a record found releasable there is checked and opened there
/// too ([`opened_here`]): such a call takes no store thread at all. Any other outcome of that
/// read takes the store-pool step, which reads again, so refusals are audited, expiry reported
/// and rate limits charged in one place.
async fn load<T: Send + 'static>(
    state: &Arc<Vault>,
    caller: &str,
    policy: &Arc<CallerPolicy>,
    id: &RecordId,
    draft: Draft,
    grant: Option<Arc<grants::GrantUse>>,
    check: impl FnOnce(&Vault, &Record, &mut Draft) -> Result<T, VaultError> + Send + 'static,
) -> Result<(Record, Secret, T), VaultError> {
    let (who, policy, id) = (caller.to_string(), Arc::clone(policy), id.clone());
    let draft = draft.record(id.as_str());
    let awaited = match grant {
        // A grant's use is spent in a store write: on the store pool, with the rest.
        Some(_) => None,
        None => state.awaited_read(&id),
    };
    let loaded = match awaited {
        Some(read) => match read.read().await {
            Ok(Some(record)) if releasable(state, &record, &policy) => {
                opened_here(state, who, &policy, id, draft, record, check).await?
            }
            _ => on_store_pool(state, who, policy, id, draft, grant, check).await?,
        },
        None => on_store_pool(state, who, policy, id, draft, grant, check).await?,
    };
    let Unwrap {
        who,
        id,
        record,
        checked,
        ring,
        draft,
        grant,
    } = match loaded {
        Loaded::Released(released, queued) => return audited(state, queued, *released).await,
        Loaded::Unwrap(u) => *u,
    };
    let opened = state
        .cpu_bound(move |s| {
            let opened = records::open_unwrapping(s, &id, &record, &ring)
                .map_err(|source| open_error(&id, source));
            Ok((record, opened))
        })
        .await?;
    let (record, secret) = match opened {
        (record, Ok(secret)) => (record, secret),
        (_, Err(e)) => return Err(refused(state, draft, e).await),
    };
    let (record, queued) = match grant {
        Some(grant) => {
            state
                .io_bound(move |s| {
                    spend(s, &who, Some(&grant), &record, draft).map(|queued| (record, queued))
                })
                .await?
        }
        None => (record, Some(draft)),
    };
    audited(state, queued, (record, secret, checked)).await
}

/// The first step of [`load`] on the store pool: everything a call with a cached data key
/// needs, in one step (read, checks, open, and a grant's use spent); a refusal is audited.
async fn on_store_pool<T: Send + 'static>(
    state: &Arc<Vault>,
    who: String,
    policy: Arc<CallerPolicy>,
    id: RecordId,
    draft: Draft,
    grant: Option<Arc<grants::GrantUse>>,
    check: impl FnOnce(&Vault, &Record, &mut Draft) -> Result<T, VaultError> + Send + 'static,
) -> Result<Loaded<T>, VaultError> {
    state
        .io_bound(move |s| {
            let mut draft = draft;
            let read = s
                .record_token(&who, &policy, &id)
                .and_then(|()| read_checked(s, &id, &policy, &mut draft, check))
                .and_then(|(record, checked)| {
                    let (cached, ring) = open_cached(s, &id, &record)?;
                    Ok((record, checked, cached, ring))
                });
            match read {
                Err(e) => {
                    audit_refusal(s, draft, &e);
                    Err(e)
                }
                Ok((record, checked, cached, ring)) => Unwrap {
                    who,
                    id,
                    record,
                    checked,
                    ring,
                    draft,
                    grant,
                }
                .loaded(s, cached),
            }
        })
        .await
}

/// The first step of [`load`] on the executor, for a call without a grant whose record was
/// read there and is [`releasable`]: the rate limit, `check` and a cached data key, none of
/// which waits on the store. A refusal is audited on the store pool. A data key under a
/// version this daemon does not know yet is looked up on the store pool too (it may read the
/// registry).
async fn opened_here<T: Send + 'static>(
    state: &Arc<Vault>,
    who: String,
    policy: &CallerPolicy,
    id: RecordId,
    draft: Draft,
    record: Record,
    check: impl FnOnce(&Vault, &Record, &mut Draft) -> Result<T, VaultError>,
) -> Result<Loaded<T>, VaultError> {
    // In the store-pool step's order, so the trail reads the same either way: the rate limit
    // refuses before the record is known (its event names no owner).
    if let Err(e) = state.record_token(&who, policy, &id) {
        return Err(refused(state, draft, e).await);
    }
    let mut draft = draft.owner(record.meta.owner.as_str());
    let checked = match check(state, &record, &mut draft) {
        Ok(checked) => checked,
        Err(e) => return Err(refused(state, draft, e).await),
    };
    let ring = state.keyring();
    let opened = match records::open_cached(state, &id, &record, &ring) {
        Err(crate::envelope::DecryptError::UnknownKey(_)) => {
            let read = (id.clone(), record);
            state
                .io_bound(move |s| {
                    let (id, record) = read;
                    Ok(open_cached(s, &id, &record).map(|opened| (opened, record)))
                })
                .await?
        }
        other => other
            .map(|cached| ((cached, ring), record))
            .map_err(|source| open_error(&id, source)),
    };
    match opened {
        Err(e) => Err(refused(state, draft, e).await),
        // No grant: `loaded` spends nothing, so it writes nothing here on the executor.
        Ok(((cached, ring), record)) => Unwrap {
            who,
            id,
            record,
            checked,
            ring,
            draft,
            grant: None,
        }
        .loaded(state, cached),
    }
}

/// What the first step of [`load`] leaves to do.
enum Loaded<T> {
    /// Opened with a cached data key: the call is done once its audit event, if given back
    /// (no grant was spent), is written.
    Released(Box<(Record, Secret, T)>, Option<Draft>),
    /// The data key must be unwrapped on the private-key pool, then the call audited.
    Unwrap(Box<Unwrap<T>>),
}

/// A record read and checked, waiting for its data key to be unwrapped.
struct Unwrap<T> {
    who: String,
    id: RecordId,
    record: Record,
    checked: T,
    ring: Arc<Keyring>,
    draft: Draft,
    grant: Option<Arc<grants::GrantUse>>,
}

impl<T> Unwrap<T> {
    /// What is left to do for a record read and checked: with its data key `cached`, released
    /// once a grant's use, if any, is spent (a store write, see [`spend`]); else the unwrap.
    fn loaded(self, s: &Vault, cached: Option<Secret>) -> Result<Loaded<T>, VaultError> {
        let Some(secret) = cached else {
            return Ok(Loaded::Unwrap(Box::new(self)));
        };
        let queued = spend(
            s,
            &self.who,
            self.grant.as_deref(),
            &self.record,
            self.draft,
        )?;
        Ok(Loaded::Released(
            Box::new((self.record, secret, self.checked)),
            queued,
        ))
    }
}

/// Spends a use of the grant presented, if any, in the same write as the call's audit event
/// (a store write: on the store pool); without one, gives the event back for [`audited`]. A
/// failure is audited and nothing is released.
fn spend(
    s: &Vault,
    who: &str,
    grant: Option<&grants::GrantUse>,
    record: &Record,
    draft: Draft,
) -> Result<Option<Draft>, VaultError> {
    let Some(grant) = grant else {
        return Ok(Some(draft));
    };
    match grant.spend(s, who, record, &draft) {
        Ok(()) => Ok(None),
        Err(e) => {
            audit_refusal(s, draft, &e);
            Err(e)
        }
    }
}

/// The last step of [`load`]: the secret is handed back only once the release's audit event is
/// written. A queued event is awaited here, on the executor, and written by the audit writer's
/// next group, so no store-pool thread waits out the group write (on PostgreSQL a round trip
/// and a commit). If it cannot be written the call is refused; the trail's own failure is not
/// audited (see [`audit_refusal`]).
async fn audited<R>(state: &Vault, queued: Option<Draft>, released: R) -> Result<R, VaultError> {
    if let Some(draft) = queued {
        state.reads.append(draft).await?;
    }
    Ok(released)
}

/// Audits a refusal of [`load`], unless it is one that is not audited: a shed call (it did
/// nothing, and auditing it would make shedding cost a write), or the audit trail's own failure.
fn audit_refusal(s: &Vault, draft: Draft, e: &VaultError) {
    if !matches!(
        e,
        VaultError::Audit(_) | VaultError::Overloaded { .. } | VaultError::Task
    ) {
        s.audit_outcome(draft, e);
    }
}

/// [`audit_refusal`] on the store pool, giving the error back.
async fn refused(state: &Arc<Vault>, draft: Draft, e: VaultError) -> VaultError {
    state
        .io_bound(move |s| {
            audit_refusal(s, draft, &e);
            Ok(e)
        })
        .await
        .unwrap_or_else(|task| task)
}

/// Reads one record and checks it may be released to the caller.
fn read_checked<T>(
    s: &Vault,
    id: &RecordId,
    policy: &CallerPolicy,
    draft: &mut Draft,
    check: impl FnOnce(&Vault, &Record, &mut Draft) -> Result<T, VaultError>,
) -> Result<(Record, T), VaultError> {
    let record = s
        .store
        .get_record(id)?
        .ok_or_else(|| StoreError::NotFound(id.to_string()))?;
    *draft = std::mem::take(draft).owner(record.meta.owner.as_str());
    usable(&record, policy)?;
    let checked = check(s, &record, draft)?;
    if let Some(expires_at) = expired_at(s, &record) {
        s.report_expired(&record, expires_at);
        return Err(VaultError::Expired {
            id: id.to_string(),
            expires_at,
        });
    }
    Ok((record, checked))
}

/// Whether the caller's policy covers the record and its state allows a release.
fn usable(record: &Record, policy: &CallerPolicy) -> Result<(), VaultError> {
    policy
        .check_record(&record.meta)
        .map_err(VaultError::PolicyDenied)?;
    if record.revoked {
        return Err(VaultError::Revoked(record.meta.id.to_string()));
    }
    if record.needs_reauth {
        return Err(VaultError::NeedsReauth(record.meta.id.to_string()));
    }
    Ok(())
}

/// When the record expired, if it has and cannot be refreshed.
fn expired_at(s: &Vault, record: &Record) -> Option<i64> {
    let refreshable = refresh::oauth_for(s, record).is_some();
    record
        .meta
        .expires_at
        .filter(|_| !refreshable && record.meta.is_expired_at(s.now()))
}

/// Whether [`read_checked`]'s checks before `check` and after it pass (without reporting an
/// expiry): what lets [`load`] go on with a record read on the executor.
fn releasable(s: &Vault, record: &Record, policy: &CallerPolicy) -> bool {
    usable(record, policy).is_ok() && expired_at(s, record).is_none()
}

/// Opens a record with its cached data key if there is one ([`records::open_cached`]), and
/// gives the keyring to unwrap it with otherwise. A version that another daemon sharing the
/// store just added makes it reload the keyring once and look again.
fn open_cached(
    s: &Vault,
    id: &RecordId,
    record: &Record,
) -> Result<(Option<Secret>, Arc<Keyring>), VaultError> {
    let ring = s.keyring();
    let opened = match records::open_cached(s, id, record, &ring) {
        Err(crate::envelope::DecryptError::UnknownKey(_)) if s.reload_for_unknown_key() => {
            let ring = s.keyring();
            records::open_cached(s, id, record, &ring).map(|cached| (cached, ring))
        }
        other => other.map(|cached| (cached, ring)),
    };
    opened.map_err(|source| open_error(id, source))
}

/// A record that could not be opened.
fn open_error(id: &RecordId, source: crate::envelope::DecryptError) -> VaultError {
    VaultError::Open {
        id: id.to_string(),
        source,
    }
}

/// A bounded label for a proxy failure.
fn proxy_error_kind(e: &proxy::ProxyError) -> &'static str {
    use proxy::ProxyError;
    match e {
        ProxyError::Refused(_) => "refused",
        ProxyError::Timeout { .. } => "timeout",
        ProxyError::ResponseTooLarge { .. } => "too_large",
        ProxyError::Busy(_) => "busy",
        ProxyError::Unavailable(_) => "unavailable",
        _ => "error",
    }
}
