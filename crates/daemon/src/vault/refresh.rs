//! Keeps token bundles fresh: the refresh of one record (single-flight, version-checked
//! write), and the optional background refresher.
//!
//! Guarantees: concurrent callers of one record wait for a single refresh and then use its
//! result; a refreshed bundle is written only over the version it was refreshed from, so two
//! daemons (or a crash) never overwrite a newer refresh token with an older one; if the
//! provider omits a new refresh token the old one is kept; `invalid_grant` marks the record as
//! needing re-authorization instead of retrying forever.
//!
//! Known limit: a daemon that crashes after the provider answered but before the write lands
//! loses that answer; with rotating refresh tokens the stored (now spent) one then fails with
//! `invalid_grant` and the record is marked for re-authorization rather than looping.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use http::HeaderValue;

use super::Vault;
use super::VaultError;
use crate::audit::Draft;
use crate::envelope;
use crate::oauth::{self, OAuthError, TokenBundle};
use crate::provider::OAuthConfig;
use crate::proxy::Upstream;
use crate::record::{Record, RecordId, Scope, SecretKind};
use crate::secret::Secret;
use crate::store::{Mutation, RecordWrite, StoreError};
use crate::webhook::{Event, EventType};

/// Per-record locks so that one refresh runs at a time per record in this daemon.
#[derive(Debug, Default)]
pub(super) struct SingleFlight {
    locks: Mutex<HashMap<RecordId, Arc<tokio::sync::Mutex<()>>>>,
}

impl SingleFlight {
    fn lock_for(&self, id: &RecordId) -> Arc<tokio::sync::Mutex<()>> {
        let mut locks = self
            .locks
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        Arc::clone(locks.entry(id.clone()).or_default())
    }

    /// Drops the entry once nobody else holds or waits for it.
    fn release(&self, id: &RecordId, lock: Arc<tokio::sync::Mutex<()>>) {
        let mut locks = self
            .locks
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        // Two references: the map's and ours.
        if Arc::strong_count(&lock) == 2 {
            locks.remove(id);
        }
    }
}

/// Reads and opens a record without any caller policy (internal use by the refresher).
pub(super) fn read_open(s: &Vault, id: &RecordId) -> Result<(Record, Secret), VaultError> {
    let record = s
        .store
        .get_record(id)?
        .ok_or_else(|| StoreError::NotFound(id.to_string()))?;
    // The same open as GetToken: through the DEK cache, counted in the RSA metric.
    let secret =
        super::records::open(s, id, &record, &s.keyring()).map_err(|source| VaultError::Open {
            id: id.to_string(),
            source,
        })?;
    Ok((record, secret))
}

fn usable(record: &Record) -> Result<(), VaultError> {
    if record.revoked {
        return Err(VaultError::Revoked(record.meta.id.to_string()));
    }
    if record.needs_reauth {
        return Err(VaultError::NeedsReauth(record.meta.id.to_string()));
    }
    Ok(())
}

fn bundle_of(record: &Record, secret: &Secret) -> Result<TokenBundle, VaultError> {
    TokenBundle::parse(secret).map_err(|source| VaultError::Refresh {
        id: record.meta.id.to_string(),
        source,
    })
}

/// What [`refresh`] gives the call that asked for it.
pub(super) struct Refreshed {
    /// The record to use, as stored now.
    pub(super) record: Record,
    /// Its bundle.
    pub(super) bundle: TokenBundle,
    /// Whether this call refreshed it (false: another call or daemon had, and this one uses
    /// what it stored).
    pub(super) by_this_call: bool,
}

/// Refreshes `seen` (a token bundle record as the caller read it) unless someone else already
/// did; returns the record and bundle to use.
pub(super) async fn refresh(
    state: &Arc<Vault>,
    upstream: &Upstream,
    caller: &str,
    seen: &Record,
) -> Result<Refreshed, VaultError> {
    let id = seen.meta.id.clone();
    let lock = state.single_flight.lock_for(&id);
    let result = {
        let _guard = lock.lock().await;
        // One refresh per record in this daemon (the lock), and across the daemons sharing
        // the store (the lease): a rotating refresh token is presented once.
        match refresh_lease(state, &id).await {
            Ok(lease) => {
                let r = refresh_locked(state, upstream, caller, seen).await;
                lease.release(state).await;
                r
            }
            Err(e) => Err(e),
        }
    };
    state.single_flight.release(&id, lock);
    result
}

/// How long a refresh lease lasts: a daemon that dies mid-refresh holds the record up this
/// long at most; a live one finishes far sooner (the token endpoint has its own deadline).
pub(super) const REFRESH_LEASE: std::time::Duration = std::time::Duration::from_secs(30);

/// A held refresh lease.
struct RefreshLease(String);

impl RefreshLease {
    async fn release(self, state: &Arc<Vault>) {
        let name = self.0;
        if let Err(e) = state
            .blocking(move |s| Ok(s.store.release_lease(&name, &s.instance_id)?))
            .await
        {
            // It expires on its own.
            tracing::warn!(error = %e, "releasing a refresh lease failed");
        }
    }
}

/// Takes the record's refresh lease, waiting while another daemon holds it (its refresh then
/// shows as a new record version, which the caller uses instead of refreshing again).
async fn refresh_lease(state: &Arc<Vault>, id: &RecordId) -> Result<RefreshLease, VaultError> {
    let name = format!("refresh/{id}");
    let deadline = std::time::Instant::now() + REFRESH_LEASE + std::time::Duration::from_secs(5);
    loop {
        let n = name.clone();
        let held = state
            .blocking(move |s| Ok(s.store.acquire_lease(&n, &s.instance_id, REFRESH_LEASE)?))
            .await?;
        if held.is_some() {
            return Ok(RefreshLease(name));
        }
        if std::time::Instant::now() > deadline {
            return Err(StoreError::Unavailable(format!(
                "another daemon has been refreshing record {id} for too long"
            ))
            .into());
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
}

async fn refresh_locked(
    state: &Arc<Vault>,
    upstream: &Upstream,
    caller: &str,
    seen: &Record,
) -> Result<Refreshed, VaultError> {
    let oauth = upstream
        .policy()
        .oauth
        .clone()
        .ok_or_else(|| VaultError::NoRefresh(seen.meta.provider.to_string()))?;
    let id = seen.meta.id.clone();
    let (current, secret) = {
        let id = id.clone();
        state.blocking(move |s| read_open(s, &id)).await?
    };
    usable(&current)?;
    let bundle = bundle_of(&current, &secret)?;
    if current.version != seen.version {
        // Refreshed (or re-authorized) meanwhile: use what is stored now.
        return Ok(Refreshed {
            record: current,
            bundle,
            by_this_call: false,
        });
    }
    let Some(refresh_token) = bundle.refresh_token.clone() else {
        // No refresh possible: once the access token has expired, the record is dead.
        if let Some(at) = bundle.expires_at.filter(|at| *at <= state.now()) {
            let record = current.clone();
            let _ = state
                .blocking(move |s| {
                    s.report_expired(&record, at);
                    Ok(())
                })
                .await;
        }
        return Err(VaultError::Refresh {
            id: id.to_string(),
            source: OAuthError::NoRefreshToken,
        });
    };
    let client_secret = client_secret(state, &oauth).await?;
    let request =
        oauth::refresh_request(&oauth, &refresh_token, &client_secret).map_err(|source| {
            VaultError::Refresh {
                id: id.to_string(),
                source,
            }
        })?;
    drop(client_secret);
    let response = post_token_request(upstream, &oauth, request).await;
    let response = match response {
        Ok(r) => r,
        Err(e) => {
            audit_refresh_off_executor(state, caller, &current, format!("failed: {e}")).await;
            return Err(VaultError::Proxy(e));
        }
    };
    let now = state.now();
    match oauth::parse_token_response(response.status, &response.body) {
        Ok(answer) => {
            let fresh = bundle.refreshed(answer, now);
            let caller = caller.to_string();
            state
                .blocking(move |s| store_refreshed(s, &caller, &current, fresh, now))
                .await
        }
        Err(OAuthError::InvalidGrant) => {
            let caller = caller.to_string();
            let outcome = state
                .blocking(move |s| mark_reauth(s, &caller, &current, now))
                .await?;
            match outcome {
                // Another daemon refreshed with the same (now spent) token first.
                Some((record, bundle)) => Ok(Refreshed {
                    record,
                    bundle,
                    by_this_call: false,
                }),
                None => Err(VaultError::NeedsReauth(id.to_string())),
            }
        }
        Err(source) => {
            audit_refresh_off_executor(state, caller, &current, format!("failed: {source}")).await;
            Err(VaultError::Refresh {
                id: id.to_string(),
                source,
            })
        }
    }
}

/// The provider's client secret, from its sealed `client_secret` record.
pub(super) async fn client_secret(
    state: &Arc<Vault>,
    oauth: &OAuthConfig,
) -> Result<Secret, VaultError> {
    let cs = oauth.client_secret_record.clone();
    state
        .blocking(move |s| {
            let (record, secret) = read_open(s, &cs)?;
            if record.meta.kind != SecretKind::ClientSecret || record.revoked {
                return Err(VaultError::ClientSecret(cs.to_string()));
            }
            Ok(secret)
        })
        .await
}

/// Sends a token endpoint request through the provider's client (its outbound policy and SSRF
/// guard), the `Authorization` header marked sensitive; the request is dropped (zeroized) as
/// soon as it is sent.
pub(super) async fn post_token_request(
    upstream: &Upstream,
    oauth: &OAuthConfig,
    request: oauth::RefreshRequest,
) -> Result<crate::proxy::UpstreamResponse, crate::proxy::ProxyError> {
    let auth = request.authorization.as_ref().and_then(|a| {
        let mut v = HeaderValue::from_str(a).ok()?;
        v.set_sensitive(true);
        Some(v)
    });
    let response = upstream
        .post_form(
            &oauth.token_endpoint,
            auth,
            Bytes::copy_from_slice(&request.body),
        )
        .await;
    drop(request);
    response
}

fn refresh_draft(caller: &str, record: &Record, outcome: &str) -> Draft {
    Draft::new(caller, "Refresh")
        .record(record.meta.id.as_str())
        .owner(record.meta.owner.as_str())
        .outcome(outcome)
}

/// Audits a refresh that changed nothing (failed, or lost to a newer version). A failure is
/// also a `record.refresh_failed` webhook, written with its audit event.
fn audit_refresh(state: &Vault, caller: &str, record: &Record, outcome: &str) {
    let kind = outcome.split(':').next().unwrap_or(outcome);
    super::metrics::Metrics::count(&state.metrics.refreshes, kind);
    let draft = refresh_draft(caller, record, outcome);
    let outbox = if kind == "failed" {
        state.outbox(&[
            Event::about(EventType::RefreshFailed, record, record.version).with(
                "reason",
                outcome.strip_prefix("failed: ").unwrap_or(outcome),
            ),
        ])
    } else {
        Vec::new()
    };
    let written = if outbox.is_empty() {
        state.audit.append(&draft, true).map_err(VaultError::from)
    } else {
        state.audit.append_with(&draft, |a| {
            state
                .store
                .apply(&outbox, std::slice::from_ref(a), state.now())
                .map(|()| ((), true))
                .map_err(VaultError::from)
        })
    };
    if let Err(e) = written {
        tracing::error!(error = %e, "could not audit a refresh");
    }
}

/// [`audit_refresh`] on the blocking pool, for the refresh's steps that run on the executor.
async fn audit_refresh_off_executor(
    state: &Arc<Vault>,
    caller: &str,
    record: &Record,
    outcome: String,
) {
    let (caller, record) = (caller.to_string(), record.clone());
    let _ = state
        .blocking(move |s| {
            audit_refresh(s, &caller, &record, &outcome);
            Ok(())
        })
        .await;
}

/// Seals the refreshed bundle under the active key and writes it over `seen`'s version. If
/// the record changed meanwhile, the stored version wins and is returned instead.
fn store_refreshed(
    s: &Vault,
    caller: &str,
    seen: &Record,
    fresh: TokenBundle,
    now: i64,
) -> Result<Refreshed, VaultError> {
    let mut meta = seen.meta.clone();
    let write = bundle_write(s, &mut meta, &fresh, seen.version)?;
    // The new bundle and its audit event are one durable write.
    let draft = refresh_draft(caller, seen, "refreshed");
    let written = s.audit.append_with(&draft, |a| {
        match s
            .store
            .apply(&[Mutation::PutRecord(write)], std::slice::from_ref(a), now)
        {
            Ok(()) => Ok((Ok(()), true)),
            Err(e @ (StoreError::VersionMismatch { .. } | StoreError::NotFound(_))) => {
                Ok((Err(e), false))
            }
            Err(e) => Err(VaultError::from(e)),
        }
    })?;
    match written {
        Ok(()) => {
            super::metrics::Metrics::count(&s.metrics.refreshes, "refreshed");
            tracing::info!(record = %s.log_id(&seen.meta.id), "token refreshed");
            s.forget_deks(Some(&seen.meta.id));
            let (record, _) = read_open(s, &seen.meta.id)?;
            Ok(Refreshed {
                record,
                bundle: fresh,
                by_this_call: true,
            })
        }
        Err(StoreError::VersionMismatch { .. } | StoreError::NotFound(_)) => {
            audit_refresh(s, caller, seen, "conflict: a newer version was kept");
            let (record, secret) = read_open(s, &seen.meta.id)?;
            usable(&record)?;
            let bundle = bundle_of(&record, &secret)?;
            Ok(Refreshed {
                record,
                bundle,
                by_this_call: false,
            })
        }
        Err(e) => Err(e.into()),
    }
}

/// The write of `bundle` over `meta` at `expected_version`: the bundle's expiry and (when the
/// metadata can hold them) scopes go into `meta`, and it is sealed under the active key.
pub(super) fn bundle_write(
    s: &Vault,
    meta: &mut crate::record::RecordMeta,
    bundle: &TokenBundle,
    expected_version: u64,
) -> Result<RecordWrite, VaultError> {
    meta.expires_at = bundle.expires_at;
    // Scopes the record metadata cannot hold (odd characters) stay only in the bundle.
    if let Ok(scopes) = bundle
        .scopes
        .iter()
        .map(|x| Scope::parse(x.as_str()))
        .collect::<Result<Vec<_>, _>>()
        && !scopes.is_empty()
    {
        meta.scopes = scopes;
    }
    let ring = s.keyring();
    let (active, public) = ring.active();
    Ok(RecordWrite {
        meta: meta.clone(),
        envelope: envelope::seal(meta, &bundle.to_secret(), public)?,
        key_version: active.version,
        expected_version,
    })
}

/// Marks `seen` as needing re-authorization, unless it changed meanwhile (then returns the
/// newer record to use).
fn mark_reauth(
    s: &Vault,
    caller: &str,
    seen: &Record,
    now: i64,
) -> Result<Option<(Record, TokenBundle)>, VaultError> {
    let draft = refresh_draft(caller, seen, "invalid_grant: needs re-authorization");
    let mut mutations = vec![Mutation::MarkNeedsReauth {
        id: seen.meta.id.clone(),
        expected_version: seen.version,
    }];
    mutations.extend(
        s.outbox(
            &[Event::about(EventType::NeedsReauth, seen, seen.version + 1)
                .with("reason", "invalid_grant")],
        ),
    );
    let marked = s.audited(draft, |audit| {
        match s.store.apply(&mutations, std::slice::from_ref(audit), now) {
            Ok(()) => Ok((true, true)),
            Err(StoreError::VersionMismatch { .. }) => Ok((false, false)),
            Err(e) => Err(e.into()),
        }
    })?;
    if marked {
        super::metrics::Metrics::count(&s.metrics.refreshes, "invalid_grant");
        tracing::warn!(record = %s.log_id(&seen.meta.id), "refresh token rejected (invalid_grant); record needs re-authorization");
        s.forget_deks(Some(&seen.meta.id));
        return Ok(None);
    }
    let (record, secret) = read_open(s, &seen.meta.id)?;
    usable(&record)?;
    Ok(Some((record.clone(), bundle_of(&record, &secret)?)))
}

/// The refresh settings of a record's provider, if its bundles are refreshable.
pub(super) fn oauth_for(state: &Vault, record: &Record) -> Option<(Arc<Upstream>, OAuthConfig)> {
    if record.meta.kind != SecretKind::TokenBundle {
        return None;
    }
    let upstream = state.upstreams().get(record.meta.provider.as_str())?;
    let oauth = upstream.policy().oauth.clone()?;
    Some((upstream, oauth))
}

/// Renews bundles of providers with `background_refresh` that expire within their skew plus
/// one interval. Runs until `stop` is cancelled; refreshes already under way then finish (an
/// aborted one could lose a rotated refresh token), none is started.
pub(super) async fn background(state: Arc<Vault>, stop: tokio_util::sync::CancellationToken) {
    let mut tick = tokio::time::interval(std::time::Duration::from_secs(1));
    let mut next_scan: HashMap<String, std::time::Instant> = HashMap::new();
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            () = stop.cancelled() => return,
        }
        let upstreams = state.upstreams();
        let due: Vec<Arc<Upstream>> = upstreams
            .all()
            .filter(|u| {
                u.policy()
                    .oauth
                    .as_ref()
                    .is_some_and(|o| o.background.is_some())
                    && next_scan
                        .get(&u.policy().name)
                        .is_none_or(|t| *t <= std::time::Instant::now())
            })
            .cloned()
            .collect();
        for upstream in due {
            let Some(oauth) = upstream.policy().oauth.clone() else {
                continue;
            };
            let Some(bg) = oauth.background else {
                continue;
            };
            next_scan.insert(
                upstream.policy().name.clone(),
                std::time::Instant::now() + std::time::Duration::from_secs(bg.interval_seconds),
            );
            let horizon = state.now()
                + oauth.refresh_skew_seconds
                + i64::try_from(bg.interval_seconds).unwrap_or(i64::MAX / 4);
            let provider = upstream.policy().name.clone();
            let candidates = match state
                .blocking(move |s| due_records(s, &provider, horizon))
                .await
            {
                Ok(c) => c,
                Err(e) => {
                    tracing::error!(error = %e, "background refresh scan failed");
                    continue;
                }
            };
            let slots = Arc::new(tokio::sync::Semaphore::new(bg.concurrency));
            let mut tasks = tokio::task::JoinSet::new();
            for record in candidates {
                let (state, upstream, slots, stop) = (
                    Arc::clone(&state),
                    Arc::clone(&upstream),
                    Arc::clone(&slots),
                    stop.clone(),
                );
                tasks.spawn(async move {
                    let Ok(_slot) = slots.acquire_owned().await else {
                        return;
                    };
                    if stop.is_cancelled() {
                        return;
                    }
                    // Jitter spreads a cohort of tokens issued together.
                    let jitter = rand::Rng::gen_range(&mut rand::thread_rng(), 0..250u64);
                    tokio::time::sleep(std::time::Duration::from_millis(jitter)).await;
                    if let Err(e) = refresh(&state, &upstream, "background-refresh", &record).await
                    {
                        tracing::warn!(record = %state.log_id(&record.meta.id), error = %e, "background refresh failed");
                    }
                });
            }
            while tasks.join_next().await.is_some() {}
            state.background_scan_done();
        }
    }
}

/// Bundles of `provider` expiring before `horizon` that can be refreshed.
fn due_records(s: &Vault, provider: &str, horizon: i64) -> Result<Vec<Record>, VaultError> {
    let mut out = Vec::new();
    let mut after: Option<RecordId> = None;
    loop {
        let page = s.store.scan_records(after.as_ref(), 512)?;
        let Some(last) = page.last() else {
            return Ok(out);
        };
        after = Some(last.meta.id.clone());
        out.extend(page.into_iter().filter(|r| {
            r.meta.kind == SecretKind::TokenBundle
                && r.meta.provider.as_str() == provider
                && !r.revoked
                && !r.needs_reauth
                && r.meta.expires_at.is_some_and(|at| at <= horizon)
        }));
    }
}
