//! `Admin`: key listing, revocation, irrecoverable deletion and statistics.

use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use prost::Message as _;
use tokio_stream::Stream;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status};

use super::status::ServiceError;
use super::{State, caller_name, record_id};
use crate::api::v1::{self, admin_server::Admin};
use crate::audit::Draft;
use crate::keys::{KeyInfo, PrivateKey};
use crate::record::Owner;
use crate::rotation::{self, RewrapOptions, RewrapProgress};
use crate::store::{Mutation, StoreError};

/// Rotates to a fresh RSA-2048 version; returns the new active and the previous version.
pub(super) fn rotate(
    s: &State,
    caller: &str,
    now: i64,
) -> Result<(KeyInfo, Option<KeyInfo>), ServiceError> {
    rotate_to(s, caller, now, PrivateKey::generate()?)
}

/// Parses a key supplied to `RotateKey` for import, checking the optional public half.
fn imported_key(private_pem: &str, public_pem: &str) -> Result<PrivateKey, ServiceError> {
    let bad = |e: crate::keys::KeyError| ServiceError::BadKey(e.to_string());
    let key = PrivateKey::from_pem(private_pem, None)
        .map_err(|e| bad(e.with_passphrase_hint(crate::keys::passphrase_hint::REMOTE)))?;
    if !public_pem.is_empty() {
        let public = crate::keys::PublicKey::from_pem(public_pem).map_err(bad)?;
        if public.id() != key.public_key().id() {
            return Err(ServiceError::BadKey(
                "the public key does not match the private key".into(),
            ));
        }
    }
    Ok(key)
}

fn rotate_to(
    s: &State,
    caller: &str,
    now: i64,
    key: PrivateKey,
) -> Result<(KeyInfo, Option<KeyInfo>), ServiceError> {
    let _ops = s.key_ops();
    let previous = s.keyring().active().0.version;
    let draft = Draft::new(caller, "RotateKey").detail(format!("new version after v{previous}"));
    let info = s.audited(draft, |a| {
        Ok((
            rotation::add_version_audited(&*s.store, &s.key_dir, key, now, Some(a))?,
            true,
        ))
    })?;
    let ring = s.reload_keyring()?;
    let previous = ring.infos().find(|k| k.version == previous).cloned();
    Ok((info, previous))
}

fn retire(s: &State, caller: &str, version: u32, now: i64) -> Result<KeyInfo, ServiceError> {
    let _ops = s.key_ops();
    let draft = Draft::new(caller, "RetireKey").detail(format!("v{version}"));
    // The store checks that no record uses the version in the same critical section as record
    // writes, which refuse a retired version: nothing can be stranded under it, and a refused
    // retirement changes nothing.
    let info = s.audited(draft, |a| {
        Ok((rotation::retire(&*s.store, version, now, Some(a))?, true))
    })?;
    s.reload_keyring()?;
    Ok(info)
}

fn destroy(
    s: &State,
    caller: &str,
    version: u32,
    now: i64,
) -> Result<(KeyInfo, bool), ServiceError> {
    let _ops = s.key_ops();
    let draft = Draft::new(caller, "DestroyKey").detail(format!("v{version}"));
    let info = s.audited(draft, |a| {
        Ok((
            rotation::destroy(&*s.store, &s.key_dir, version, now, Some(a))?,
            true,
        ))
    })?;
    s.reload_keyring()?;
    Ok((info, !s.key_dir.has_private(version)))
}

fn progress(p: &RewrapProgress) -> v1::RewrapProgress {
    v1::RewrapProgress {
        target_version: p.target_version,
        total: p.total,
        rewrapped: p.rewrapped,
        skipped: p.skipped,
        conflicts: p.conflicts,
        failed: p.failed,
        done: p.done,
        elapsed_seconds: p.elapsed.as_secs_f64(),
    }
}

/// Clears the "rewrap running" flag however the run ends.
struct Running(Arc<State>);

impl Drop for Running {
    fn drop(&mut self) {
        self.0.rewrapping.store(false, Ordering::SeqCst);
    }
}

fn flag(state: &AtomicBool) -> bool {
    state.swap(true, Ordering::SeqCst)
}

/// The `tokenvault.v1.Admin` service.
pub struct AdminService(pub(super) Arc<State>);

#[tonic::async_trait]
impl Admin for AdminService {
    type RewrapStream = Pin<Box<dyn Stream<Item = Result<v1::RewrapProgress, Status>> + Send>>;
    type AuditLogStream = Pin<Box<dyn Stream<Item = Result<v1::AuditEvent, Status>> + Send>>;

    async fn audit_log(
        &self,
        request: Request<v1::AuditLogRequest>,
    ) -> Result<Response<Self::AuditLogStream>, Status> {
        let req = request.into_inner();
        let record = (!req.record_id.is_empty()).then(|| self.0.audit.hmac(&req.record_id));
        let owner = (!req.owner.is_empty()).then(|| self.0.audit.hmac(&req.owner));
        let (tx, rx) = tokio::sync::mpsc::channel(64);
        let state = Arc::clone(&self.0);
        // Tracked and stopped at shutdown: it reads the store page by page.
        self.0.tasks.spawn_blocking(move || {
            let mut next = 1;
            loop {
                if state.stopping.is_cancelled() {
                    let _ = tx.blocking_send(Err(Status::unavailable(
                        "the daemon is shutting down; read the rest after it restarts",
                    )));
                    return;
                }
                let page = match state.store.audit_events(next, 512) {
                    Ok(p) => p,
                    Err(e) => {
                        let _ = tx.blocking_send(Err(Status::from(ServiceError::from(e))));
                        return;
                    }
                };
                let Some(&(last, _)) = page.last() else {
                    return;
                };
                for (seq, raw) in page {
                    let e = match crate::audit::Event::decode(raw.as_slice()) {
                        Ok(e) => e,
                        // Undecodable (tampered) events are passed on raw for the verifier.
                        Err(_) => crate::audit::Event {
                            seq,
                            ..Default::default()
                        },
                    };
                    let in_range = (req.from_time_ms == 0 || e.time_ms >= req.from_time_ms)
                        && (req.to_time_ms == 0 || e.time_ms <= req.to_time_ms);
                    let matches = record.as_ref().is_none_or(|h| *h == e.record_hmac)
                        && owner.as_ref().is_none_or(|h| *h == e.owner_hmac);
                    if !(in_range && matches) {
                        continue;
                    }
                    let event = v1::AuditEvent {
                        seq,
                        time_ms: e.time_ms,
                        caller: e.caller,
                        action: e.action,
                        record_hmac: e.record_hmac,
                        owner_hmac: e.owner_hmac,
                        outcome: e.outcome,
                        detail: e.detail,
                        prev_hash: e.prev_hash,
                        hash: e.hash,
                        raw,
                    };
                    if tx.blocking_send(Ok(event)).is_err() {
                        return;
                    }
                }
                next = last + 1;
            }
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }

    async fn rotate_key(
        &self,
        request: Request<v1::RotateKeyRequest>,
    ) -> Result<Response<v1::RotateKeyResponse>, Status> {
        let caller = caller_name(&request);
        let who = caller.clone();
        let mut req = request.into_inner();
        // The PEM leaves the prost message at once, into memory that is zeroized on drop.
        let private_pem = zeroize::Zeroizing::new(std::mem::take(&mut req.private_key_pem));
        let (active, previous) = self
            .0
            .blocking(move |s| {
                let key = if private_pem.is_empty() {
                    PrivateKey::generate()?
                } else {
                    imported_key(&private_pem, &req.public_key_pem)?
                };
                rotate_to(s, &who, crate::unix_now(), key)
            })
            .await?;
        tracing::info!(rpc = "RotateKey", %caller, version = active.version, fingerprint = %active.id, "rotated");
        Ok(Response::new(v1::RotateKeyResponse {
            active: Some((&active).into()),
            previous: previous.as_ref().map(Into::into),
        }))
    }

    async fn rewrap(
        &self,
        request: Request<v1::RewrapRequest>,
    ) -> Result<Response<Self::RewrapStream>, Status> {
        let caller = caller_name(&request);
        let max = request.into_inner().max_records_per_second;
        if flag(&self.0.rewrapping) {
            return Err(ServiceError::RewrapBusy.into());
        }
        let running = Running(Arc::clone(&self.0));
        let draft = Draft::new(&caller, "Rewrap")
            .detail(format!("to v{}", self.0.keyring().active().0.version));
        // Fail closed: no audit event, no rewrap.
        self.0
            .blocking(move |s| Ok(s.audit.append(&draft, true)?))
            .await?;
        let opts = RewrapOptions {
            max_per_second: (max > 0).then_some(max),
            ..RewrapOptions::full_speed()
        };
        let (tx, rx) = tokio::sync::mpsc::channel(16);
        tracing::info!(rpc = "Rewrap", %caller, "rewrap started");
        self.0.tasks.spawn_blocking(move || {
            let state = Arc::clone(&running.0);
            let ring = state.keyring();
            // A caller that goes away (Ctrl-C, a cancelled stream) stops the run after the
            // page in flight, so the "already running" slot is free again at once; the stored
            // cursor lets the next Rewrap resume where this one stopped.
            let result = rotation::rewrap_all(&*state.store, &ring, opts, crate::unix_now, |p| {
                state
                    .metrics
                    .rewrap_total
                    .set(i64::try_from(p.total).unwrap_or(i64::MAX));
                state
                    .metrics
                    .rewrap_done
                    .set(i64::try_from(p.rewrapped).unwrap_or(i64::MAX));
                // Shutdown stops the run like a caller that went away: it resumes next time.
                if state.stopping.is_cancelled() {
                    return std::ops::ControlFlow::Break(());
                }
                match tx.blocking_send(Ok(progress(p))) {
                    Ok(()) => std::ops::ControlFlow::Continue(()),
                    Err(_) => std::ops::ControlFlow::Break(()),
                }
            });
            match result {
                Ok(p) if !p.done => {
                    tracing::info!(
                        rewrapped = p.rewrapped,
                        "rewrap stopped (the caller went away or the daemon is stopping); the next Rewrap resumes"
                    );
                    let stopped = Draft::new("rewrap", "RewrapStopped").detail(format!(
                        "v{}: {} rewrapped before the caller went away or the daemon stopped",
                        p.target_version, p.rewrapped
                    ));
                    if let Err(e) = state.audit.append(&stopped, true) {
                        tracing::error!(error = %e, "could not audit the stop of a rewrap");
                    }
                }
                Ok(p) => {
                    tracing::info!(
                        rewrapped = p.rewrapped,
                        failed = p.failed,
                        "rewrap finished"
                    );
                    state.forget_deks(None);
                    let done = Draft::new("rewrap", "RewrapFinished").detail(format!(
                        "v{}: {} rewrapped, {} failed",
                        p.target_version, p.rewrapped, p.failed
                    ));
                    if let Err(e) = state.audit.append(&done, true) {
                        tracing::error!(error = %e, "could not audit the end of a rewrap");
                    }
                }
                Err(e) => {
                    let _ = tx.blocking_send(Err(Status::from(ServiceError::from(e))));
                }
            }
            drop(running);
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }

    async fn retire_key(
        &self,
        request: Request<v1::RetireKeyRequest>,
    ) -> Result<Response<v1::RetireKeyResponse>, Status> {
        let caller = caller_name(&request);
        let version = request.into_inner().version;
        let info = self
            .0
            .blocking({
                let who = caller.clone();
                move |s| retire(s, &who, version, crate::unix_now())
            })
            .await?;
        tracing::info!(rpc = "RetireKey", %caller, version, "retired");
        Ok(Response::new(v1::RetireKeyResponse {
            key: Some((&info).into()),
        }))
    }

    async fn destroy_key(
        &self,
        request: Request<v1::DestroyKeyRequest>,
    ) -> Result<Response<v1::DestroyKeyResponse>, Status> {
        let caller = caller_name(&request);
        let version = request.into_inner().version;
        let (info, erased) = self
            .0
            .blocking({
                let who = caller.clone();
                move |s| destroy(s, &who, version, crate::unix_now())
            })
            .await?;
        tracing::info!(rpc = "DestroyKey", %caller, version, erased, "destroyed");
        Ok(Response::new(v1::DestroyKeyResponse {
            key: Some((&info).into()),
            private_key_erased: erased,
        }))
    }

    async fn list_keys(
        &self,
        _request: Request<v1::ListKeysRequest>,
    ) -> Result<Response<v1::ListKeysResponse>, Status> {
        let ring = self.0.keyring();
        Ok(Response::new(v1::ListKeysResponse {
            keys: ring.infos().map(Into::into).collect(),
        }))
    }

    async fn revoke(
        &self,
        request: Request<v1::RevokeRequest>,
    ) -> Result<Response<v1::RevokeResponse>, Status> {
        let caller = caller_name(&request);
        let id = record_id(request.into_inner().id)?;
        let log_id = id.clone();
        let who = caller.clone();
        let record = self
            .0
            .blocking(move |s| {
                let draft = Draft::new(&who, "Revoke").record(id.as_str());
                s.forget_deks(Some(&id));
                s.audited(draft, |a| {
                    Ok((s.store.revoke(&id, crate::unix_now(), Some(a))?, true))
                })
            })
            .await?;
        tracing::info!(rpc = "Revoke", %caller, record = %log_id, "revoked");
        Ok(Response::new(v1::RevokeResponse {
            info: Some((&record).into()),
        }))
    }

    async fn delete(
        &self,
        request: Request<v1::DeleteRequest>,
    ) -> Result<Response<v1::DeleteResponse>, Status> {
        let caller = caller_name(&request);
        let id = record_id(request.into_inner().id)?;
        let log_id = id.clone();
        let who = caller.clone();
        self.0
            .blocking(move |s| {
                let draft = Draft::new(&who, "Delete").record(id.as_str());
                s.forget_deks(Some(&id));
                s.audited(draft, |a| {
                    if s.store.delete_record(&id, Some(a))? {
                        Ok(((), true))
                    } else {
                        Err(StoreError::NotFound(id.to_string()).into())
                    }
                })
            })
            .await?;
        tracing::info!(rpc = "Delete", %caller, record = %log_id, "deleted");
        Ok(Response::new(v1::DeleteResponse {}))
    }

    async fn delete_owner(
        &self,
        request: Request<v1::DeleteOwnerRequest>,
    ) -> Result<Response<v1::DeleteOwnerResponse>, Status> {
        let caller = caller_name(&request);
        let owner =
            Owner::parse(request.into_inner().owner).map_err(|source| ServiceError::Invalid {
                what: "owner".into(),
                source,
            })?;
        let who = caller.clone();
        let deleted = self
            .0
            .blocking(move |s| {
                let draft = Draft::new(&who, "DeleteOwner").owner(owner.as_str());
                s.forget_deks(None);
                s.audited(draft, |a| {
                    Ok((s.store.delete_owner(&owner, Some(a))?, true))
                })
            })
            .await?;
        // The owner is a personal identifier: it is not logged.
        tracing::info!(rpc = "DeleteOwner", %caller, deleted, "deleted owner's records");
        Ok(Response::new(v1::DeleteOwnerResponse { deleted }))
    }

    async fn stats(
        &self,
        _request: Request<v1::StatsRequest>,
    ) -> Result<Response<v1::StatsResponse>, Status> {
        let stats = self.0.blocking(|s| Ok(s.store.stats()?)).await?;
        let cache = self
            .0
            .dek_cache
            .as_ref()
            .map(|c| c.stats())
            .unwrap_or_default();
        Ok(Response::new(v1::StatsResponse {
            records: stats.records,
            revoked: stats.revoked,
            needs_reauth: stats.needs_reauth,
            dek_cache_hits: cache.hits,
            dek_cache_misses: cache.misses,
            dek_cache_entries: cache.entries,
            records_per_key_version: stats
                .per_key_version
                .into_iter()
                .map(|(key_version, records)| v1::KeyVersionCount {
                    key_version,
                    records,
                })
                .collect(),
        }))
    }

    async fn security_event(
        &self,
        request: Request<v1::SecurityEventRequest>,
    ) -> Result<Response<v1::SecurityEventResponse>, Status> {
        let caller = caller_name(&request);
        let token = request.into_inner().token;
        let who = caller.clone();
        let result = self
            .0
            .blocking(move |s| {
                let applied = apply_security_event(s, &who, &token, crate::unix_now());
                s.audit_if_refused(Draft::new(&who, "SecurityEvent"), applied)
            })
            .await;
        match &result {
            Ok(r) => {
                tracing::warn!(rpc = "SecurityEvent", %caller, event = %r.event_type, revoked = r.revoked, deleted = r.deleted, "security event applied")
            }
            Err(e) => {
                tracing::warn!(rpc = "SecurityEvent", %caller, error = %e, "security event refused")
            }
        }
        Ok(Response::new(result?))
    }

    async fn reload_providers(
        &self,
        request: Request<v1::ReloadProvidersRequest>,
    ) -> Result<Response<v1::ReloadProvidersResponse>, Status> {
        let caller = caller_name(&request);
        let providers = self.0.reload_providers(&caller).await?;
        Ok(Response::new(v1::ReloadProvidersResponse { providers }))
    }
}

/// Verifies a security event token and revokes or deletes the subject's records of the
/// issuer's provider. The changes, their audit events and the replay marker are one atomic
/// write: an event is applied whole or not at all, and once (its `jti` is kept).
fn apply_security_event(
    s: &State,
    caller: &str,
    token: &str,
    now: i64,
) -> Result<v1::SecurityEventResponse, ServiceError> {
    use crate::security_event::{self, Action};
    use sha2::Digest as _;
    let event = security_event::verify(token, &s.security_event_issuers, now)?;
    let issuer = &s.security_event_issuers[event.issuer];
    let marker = hex::encode(sha2::Sha256::digest(format!(
        "{}\0{}",
        issuer.issuer, event.jti
    )));
    let owner = Owner::parse(event.owner.clone()).map_err(|source| ServiceError::Invalid {
        what: "security event subject".into(),
        source,
    })?;
    let short_type = event
        .event_type
        .rsplit('/')
        .next()
        .unwrap_or_default()
        .to_string();
    let detail = format!("{short_type} from {} jti {}", issuer.issuer, event.jti);
    // A record deleted between the plan and the write makes the write refuse (NotFound);
    // planning again sees it gone.
    let mut attempts = 0;
    loop {
        attempts += 1;
        let mut drafts = vec![
            Draft::new(caller, "SecurityEvent")
                .owner(owner.as_str())
                .detail(detail.clone()),
        ];
        let mut mutations = Vec::new();
        let (mut revoked, mut deleted) = (0, 0);
        for id in s.store.owner_record_ids(&owner)? {
            let Some(record) = s.store.get_record(&id)? else {
                continue;
            };
            if record.meta.provider.as_str() != issuer.provider {
                continue;
            }
            let draft = |action: &str| {
                Draft::new(caller, action)
                    .record(id.as_str())
                    .owner(owner.as_str())
                    .detail(format!("security event: {detail}"))
            };
            match &event.action {
                Action::Delete => {
                    drafts.push(draft("Delete"));
                    mutations.push(Mutation::DeleteRecord(id));
                    deleted += 1;
                }
                Action::RevokeScopesOutside(kept)
                    if record
                        .meta
                        .scopes
                        .iter()
                        .all(|sc| kept.iter().any(|k| k == sc.as_str())) => {}
                Action::Revoke | Action::RevokeScopesOutside(_) if !record.revoked => {
                    drafts.push(draft("Revoke"));
                    mutations.push(Mutation::Revoke(id));
                    revoked += 1;
                }
                _ => {}
            }
        }
        mutations.push(Mutation::PutReplayMarker {
            key: marker.clone(),
            at: now,
        });
        let written = s.audit.append_all_with(&drafts, |appends| {
            match s.store.apply(&mutations, appends, now) {
                Ok(()) => Ok((true, true)),
                Err(StoreError::NotFound(_)) if attempts < 3 => Ok((false, false)),
                Err(StoreError::AlreadyExists(_)) => {
                    Err(ServiceError::from(StoreError::AlreadyExists(format!(
                        "security event jti {} (already applied)",
                        event.jti
                    ))))
                }
                Err(e) => Err(e.into()),
            }
        })?;
        if !written {
            continue;
        }
        for m in &mutations {
            if let Mutation::Revoke(id) | Mutation::DeleteRecord(id) = m {
                s.forget_deks(Some(id));
            }
        }
        return Ok(v1::SecurityEventResponse {
            event_type: event.event_type,
            revoked,
            deleted,
        });
    }
}
