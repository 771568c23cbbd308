//! Admin's use cases: the key lifecycle (rotate, retire, destroy, rewrap), revocation and
//! irrecoverable deletion, provider security events, statistics and the audit query.
//!
//! Every change goes through one audited write (the change and its audit event in one atomic
//! store write); a refusal is audited on its own and changes nothing. Key changes go through
//! [`crate::rotation::KeyService`], the same service the offline `tokenvault keys` commands use.
//!
//! Must never: leave the keyring or the DEK cache out of step with the store after a change.

use std::sync::Arc;
use std::sync::atomic::Ordering;

use zeroize::Zeroizing;

use super::approvals::{Decision, Guarded};
use super::{Caller, Vault, VaultError};
use crate::audit::Draft;
use crate::keys::{KeyInfo, KeyState, NewKey, PrivateKey};
use crate::record::{Owner, Record, RecordId};
use crate::rotation::Destroy;
use crate::rotation::{self, KeyService, RewrapOptions, RewrapProgress};
use crate::store::{Mutation, StoreError, StoreStats};
use crate::webhook::{Event, EventType};

/// A key supplied for import by `RotateKey`.
#[derive(Debug)]
pub enum KeyImport {
    /// A private key PEM.
    Pem {
        /// The private key PEM (PKCS#8 or PKCS#1, unencrypted).
        private_pem: Zeroizing<String>,
        /// Optionally, the public key PEM it must match.
        public_pem: Option<String>,
    },
    /// The key pair with this label in the daemon's PKCS#11 token.
    TokenLabel(String),
}

/// The outcome of a rotation.
#[derive(Debug, Clone)]
pub struct Rotated {
    /// The new active version.
    pub active: KeyInfo,
    /// The version it replaced (now decrypt-only), if there was one.
    pub previous: Option<KeyInfo>,
}

/// The outcome of an applied security event.
#[derive(Debug, Clone)]
pub struct SecurityEventOutcome {
    /// The event type URI.
    pub event_type: String,
    /// Records revoked.
    pub revoked: u64,
    /// Records deleted.
    pub deleted: u64,
}

/// Counts over the store and the DEK cache.
#[derive(Debug, Clone, Default)]
pub struct VaultStats {
    /// Records by state and key version.
    pub store: StoreStats,
    /// DEK cache counters (zero when the cache is off).
    pub cache: super::dek_cache::CacheStats,
}

/// Which audit events to read; empty fields match everything.
#[derive(Debug, Clone, Default)]
pub struct AuditFilter {
    /// Only events about this record id.
    pub record_id: Option<String>,
    /// Only events about this owner.
    pub owner: Option<String>,
    /// Only events at or after this time (Unix ms).
    pub from_time_ms: Option<i64>,
    /// Only events at or before this time (Unix ms).
    pub to_time_ms: Option<i64>,
    /// Only this daemon instance's chain; `None`: every chain in the store.
    pub instance: Option<String>,
}

/// One stored audit event: decoded (default fields if it does not decode, for the verifier)
/// and its raw stored bytes.
#[derive(Debug, Clone)]
pub struct AuditEntry {
    /// The chain (daemon instance) holding it.
    pub chain: String,
    /// Sequence number within its chain.
    pub seq: u64,
    /// The event.
    pub event: crate::audit::Event,
    /// The stored bytes, which the hash chain covers.
    pub raw: Vec<u8>,
    /// On the first event kept after retention pruned the chain: the checkpoint it links to.
    pub checkpoint: Option<crate::audit::Checkpoint>,
}

/// The lease that makes a rewrap one run at a time across daemons sharing a store.
const REWRAP_LEASE_NAME: &str = "rewrap";
/// The lease of the run that destroys due key versions: one daemon of a cluster at a time.
const DESTROY_LEASE_NAME: &str = "key-destroy";
/// How long a destroy run may hold its lease before another daemon may take over.
const DESTROY_LEASE: std::time::Duration = std::time::Duration::from_secs(60);
/// The audit trail's caller of destructions the due run performs.
pub const DESTROY_JOB: &str = "key-destroy-job";
/// How long a rewrap lease lasts unrenewed: how soon another daemon can take over the run of a
/// daemon that died. Renewed with every progress report (several a second).
pub(super) const REWRAP_LEASE: std::time::Duration = std::time::Duration::from_secs(10);

/// Clears the "rewrap running" flag however the run ends.
struct Running(Arc<Vault>);

impl Drop for Running {
    fn drop(&mut self) {
        self.0.rewrapping.store(false, Ordering::SeqCst);
    }
}

impl Vault {
    fn key_service(&self) -> KeyService<'_> {
        KeyService::new(&*self.store, &self.key_dir, &self.audit).with_events(Box::new(
            |kind, key| self.outbox_rows(&[Event::about_key(kind, key)]),
        ))
    }

    /// Rotates to a fresh version (of `algorithm`, or of the active version's), or to an
    /// imported key.
    pub async fn rotate(
        self: &Arc<Self>,
        caller: &Caller,
        import: Option<KeyImport>,
        algorithm: Option<crate::keys::Algorithm>,
    ) -> Result<Rotated, VaultError> {
        let who = caller.name.clone();
        if import.is_some() && algorithm.is_some() {
            return Err(VaultError::Argument {
                what: "algorithm",
                why: "it names the algorithm of a generated key; an imported key (or a token's) \
                      is what it is"
                    .into(),
            });
        }
        let rotated = self
            .blocking(move |v| {
                let key = match import {
                    None => v
                        .key_dir
                        .generate(algorithm.unwrap_or_else(|| v.active_algorithm()))?,
                    Some(KeyImport::Pem {
                        private_pem,
                        public_pem,
                    }) => imported_key(&private_pem, public_pem.as_deref())?.into(),
                    Some(KeyImport::TokenLabel(label)) => v.key_dir.import_from_token(&label)?,
                };
                v.rotate_to(&who, key)
            })
            .await?;
        tracing::info!(rpc = "RotateKey", caller = %caller.name, version = rotated.active.version, fingerprint = %rotated.active.id, "rotated");
        Ok(rotated)
    }

    /// Rotates to a fresh key following the active version's algorithm (automatic rotation;
    /// blocking).
    pub(super) fn rotate_now(&self, caller: &str) -> Result<Rotated, VaultError> {
        self.rotate_to(caller, self.key_dir.generate(self.active_algorithm())?)
    }

    /// What a rotation that names no algorithm generates, after the active version
    /// ([`crate::keys::keyring::KeyDir::rotation_algorithm`]).
    fn active_algorithm(&self) -> crate::keys::Algorithm {
        self.key_dir
            .rotation_algorithm(self.keyring().active().1.algorithm())
    }

    fn rotate_to(&self, caller: &str, key: NewKey) -> Result<Rotated, VaultError> {
        let _ops = self.key_ops();
        let previous = self.keyring().active().0.version;
        let draft =
            Draft::new(caller, "RotateKey").detail(format!("new version after v{previous}"));
        let added = self.key_service().add_version(&draft, key, self.now());
        let active = self.audit_if_refused(draft, added.map_err(VaultError::from))?;
        let ring = self.reload_keyring()?;
        let previous = ring.infos().find(|k| k.version == previous).cloned();
        Ok(Rotated { active, previous })
    }

    /// Retires a decrypt-only version no record uses any more.
    pub async fn retire_key(
        self: &Arc<Self>,
        caller: &Caller,
        version: u32,
    ) -> Result<KeyInfo, VaultError> {
        let who = caller.name.clone();
        let info = self
            .blocking(move |v| {
                let _ops = v.key_ops();
                let draft = Draft::new(&who, "RetireKey").detail(format!("v{version}"));
                // The store checks that no record uses the version in the same critical section
                // as record writes, which refuse a retired version: nothing can be stranded
                // under it, and a refused retirement changes nothing.
                let retired = v.key_service().retire(&draft, version, v.now());
                let info = v.audit_if_refused(draft, retired.map_err(VaultError::from))?;
                v.reload_keyring()?;
                Ok(info)
            })
            .await?;
        tracing::info!(rpc = "RetireKey", caller = %caller.name, version, "retired");
        Ok(info)
    }

    /// Asks for the destruction of a retired version: it is pending destruction (opens
    /// nothing, cancellable) until `[keys] destroy_waiting_days` have passed, then the due run
    /// ([`Vault::destroy_due_keys`]) destroys it. Returns the entry and whether no private key
    /// of the version is left (false while pending; for a version destroyed already, its key
    /// material is erased again first).
    ///
    /// Under the two-person rule the call only stores an approval request.
    pub async fn destroy_key(
        self: &Arc<Self>,
        caller: &Caller,
        version: u32,
    ) -> Result<Decision<(KeyInfo, bool)>, VaultError> {
        self.guarded(
            caller,
            Guarded::DestroyKey { version },
            self.destroy_key_now(caller, version),
        )
        .await
    }

    /// Runs `act` (a future, so not started yet) unless the two-person rule holds `action`, in
    /// which case only the approval request is stored and returned.
    async fn guarded<T>(
        self: &Arc<Self>,
        caller: &Caller,
        action: Guarded,
        act: impl Future<Output = Result<T, VaultError>>,
    ) -> Result<Decision<T>, VaultError> {
        let who = caller.name.clone();
        match self.blocking(move |v| v.hold(&who, action)).await? {
            Some(held) => Ok(Decision::Held(held)),
            None => Ok(Decision::Done(act.await?)),
        }
    }

    /// [`Vault::destroy_key`] without the two-person rule (once approved).
    pub(super) async fn destroy_key_now(
        self: &Arc<Self>,
        caller: &Caller,
        version: u32,
    ) -> Result<(KeyInfo, bool), VaultError> {
        let who = caller.name.clone();
        let (info, erased) = self
            .blocking(move |v| {
                let _ops = v.key_ops();
                let waiting = v.policy.destroy_waiting_seconds;
                let draft = Draft::new(&who, "DestroyKey")
                    .detail(format!("v{version}, after {} day(s)", waiting / 86_400));
                let asked = v.key_service().destroy(&draft, version, v.now(), waiting);
                let asked = v.audit_if_refused(draft, asked.map_err(VaultError::from))?;
                v.reload_keyring()?;
                Ok(match asked {
                    Destroy::Scheduled(info) => (info, false),
                    Destroy::Destroyed(info) => {
                        let erased = !v.key_dir.holds(&info);
                        (info, erased)
                    }
                })
            })
            .await?;
        tracing::info!(rpc = "DestroyKey", caller = %caller.name, version, state = %info.state, destroy_after = info.destroy_after.unwrap_or(0), "destruction asked");
        Ok((info, erased))
    }

    /// Cancels a pending destruction: the version is retired again. Refused once it is due.
    /// Under the two-person rule the call only stores an approval request.
    pub async fn cancel_destroy_key(
        self: &Arc<Self>,
        caller: &Caller,
        version: u32,
    ) -> Result<Decision<KeyInfo>, VaultError> {
        self.guarded(
            caller,
            Guarded::CancelDestroyKey { version },
            self.cancel_destroy_key_now(caller, version),
        )
        .await
    }

    /// [`Vault::cancel_destroy_key`] without the two-person rule (once approved).
    pub(super) async fn cancel_destroy_key_now(
        self: &Arc<Self>,
        caller: &Caller,
        version: u32,
    ) -> Result<KeyInfo, VaultError> {
        let who = caller.name.clone();
        let info = self
            .blocking(move |v| {
                let _ops = v.key_ops();
                let draft = Draft::new(&who, "CancelDestroyKey").detail(format!("v{version}"));
                let cancelled = v.key_service().cancel_destroy(&draft, version, v.now());
                let info = v.audit_if_refused(draft, cancelled.map_err(VaultError::from))?;
                v.reload_keyring()?;
                Ok(info)
            })
            .await?;
        tracing::info!(rpc = "CancelDestroyKey", caller = %caller.name, version, "destruction cancelled");
        Ok(info)
    }

    /// Destroys every version whose destruction is due, each audited (caller
    /// [`DESTROY_JOB`]), and erases again what a failed erase left of destroyed versions. On a
    /// shared store one daemon at a time does it (the `key-destroy` lease); the others return
    /// nothing. Blocking; the periodic job runs it every minute.
    pub fn destroy_due_keys(&self) -> Result<Vec<KeyInfo>, VaultError> {
        let now = self.now();
        let keys = self.store.keys()?;
        let due: Vec<&KeyInfo> = keys
            .iter()
            .filter(|k| {
                k.state == KeyState::PendingDestruction && k.destroy_after.is_some_and(|d| d <= now)
            })
            .collect();
        let left: Vec<&KeyInfo> = keys
            .iter()
            .filter(|k| k.state == KeyState::Destroyed && self.key_dir.holds(k))
            .collect();
        if due.is_empty() && left.is_empty() {
            return Ok(Vec::new());
        }
        if self
            .store
            .acquire_lease(DESTROY_LEASE_NAME, &self.instance_id, DESTROY_LEASE)?
            .is_none()
        {
            return Ok(Vec::new());
        }
        let result = (|| {
            let _ops = self.key_ops();
            let mut destroyed = Vec::new();
            for k in due {
                let draft = Draft::new(DESTROY_JOB, "DestroyKey").detail(format!(
                    "v{}, due {}",
                    k.version,
                    crate::rfc3339(k.destroy_after.unwrap_or(now))
                ));
                let done = self.key_service().destroy_due(&draft, k.version, now);
                destroyed.push(self.audit_if_refused(draft, done.map_err(VaultError::from))?);
            }
            for k in left {
                self.key_dir.erase(k.version, &k.id)?;
            }
            if !destroyed.is_empty() {
                self.reload_keyring()?;
            }
            Ok(destroyed)
        })();
        if let Err(e) = self
            .store
            .release_lease(DESTROY_LEASE_NAME, &self.instance_id)
        {
            tracing::warn!(error = %e, "releasing the key-destroy lease failed");
        }
        result
    }

    /// Starts a rewrap of every stored data key to the active version, one run at a time;
    /// progress arrives on the returned channel. A receiver that goes away stops the run after
    /// the page in flight (the next run resumes); so does shutdown.
    pub async fn rewrap(
        self: &Arc<Self>,
        caller: &Caller,
        max_per_second: Option<u32>,
    ) -> Result<tokio::sync::mpsc::Receiver<Result<RewrapProgress, VaultError>>, VaultError> {
        if self.rewrapping.swap(true, Ordering::SeqCst) {
            return Err(VaultError::RewrapBusy);
        }
        let running = Running(Arc::clone(self));
        // One run across every daemon sharing the store; a run whose daemon died is taken over
        // once its lease expires, and resumes from the stored cursor.
        let held = self
            .blocking(|v| {
                Ok(v.store
                    .acquire_lease(REWRAP_LEASE_NAME, &v.instance_id, REWRAP_LEASE)?)
            })
            .await?;
        if held.is_none() {
            return Err(VaultError::RewrapBusy);
        }
        let draft = Draft::new(&caller.name, "Rewrap")
            .detail(format!("to v{}", self.keyring().active().0.version));
        // Fail closed: no audit event, no rewrap.
        self.blocking(move |v| Ok(v.audit.append(&draft, true)?))
            .await?;
        let opts = RewrapOptions {
            max_per_second,
            ..RewrapOptions::full_speed()
        };
        let (tx, rx) = tokio::sync::mpsc::channel(16);
        tracing::info!(rpc = "Rewrap", caller = %caller.name, "rewrap started");
        self.tasks.spawn_blocking(move || {
            let v = Arc::clone(&running.0);
            let ring = v.keyring();
            let clock = Arc::clone(&v.clock);
            let result = rotation::rewrap_all(&*v.store, &ring, opts, move || clock(), |p| {
                v.metrics
                    .rewrap_total
                    .set(i64::try_from(p.total).unwrap_or(i64::MAX));
                v.metrics
                    .rewrap_done
                    .set(i64::try_from(p.rewrapped).unwrap_or(i64::MAX));
                // Shutdown stops the run like a caller that went away: it resumes next time.
                if v.stopping.is_cancelled() {
                    return std::ops::ControlFlow::Break(());
                }
                // Renewed with every report; a run that lost its lease (stalled past it while
                // another daemon took over) stops. Its late writes are harmless: each is
                // version-checked and rewraps to the same key.
                match v
                    .store
                    .acquire_lease(REWRAP_LEASE_NAME, &v.instance_id, REWRAP_LEASE)
                {
                    Ok(Some(_)) => {}
                    Ok(None) => {
                        tracing::warn!("the rewrap lease passed to another daemon; stopping");
                        return std::ops::ControlFlow::Break(());
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, "renewing the rewrap lease failed; stopping");
                        return std::ops::ControlFlow::Break(());
                    }
                }
                match tx.blocking_send(Ok(p.clone())) {
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
                    if let Err(e) = v.audit.append(&stopped, true) {
                        tracing::error!(error = %e, "could not audit the stop of a rewrap");
                    }
                }
                Ok(p) => {
                    tracing::info!(
                        rewrapped = p.rewrapped,
                        failed = p.failed,
                        "rewrap finished"
                    );
                    v.forget_deks(None);
                    let done = Draft::new("rewrap", "RewrapFinished").detail(format!(
                        "v{}: {} rewrapped, {} failed",
                        p.target_version, p.rewrapped, p.failed
                    ));
                    if let Err(e) = v.audit.append(&done, true) {
                        tracing::error!(error = %e, "could not audit the end of a rewrap");
                    }
                }
                Err(e) => {
                    let _ = tx.blocking_send(Err(VaultError::from(e)));
                }
            }
            if let Err(e) = v.store.release_lease(REWRAP_LEASE_NAME, &v.instance_id) {
                tracing::warn!(error = %e, "releasing the rewrap lease failed; it expires");
            }
            drop(running);
        });
        Ok(rx)
    }

    /// Marks a record revoked: it is never released again.
    pub async fn revoke(
        self: &Arc<Self>,
        caller: &Caller,
        id: RecordId,
        revoke_at_provider: Option<bool>,
    ) -> Result<Record, VaultError> {
        let (who, log_id) = (caller.name.clone(), id.clone());
        let record = self
            .blocking(move |v| {
                let draft = Draft::new(&who, "Revoke").record(id.as_str());
                v.forget_deks(Some(&id));
                v.audited(draft, |a| {
                    let before = v
                        .store
                        .get_record(&id)?
                        .ok_or_else(|| StoreError::NotFound(id.to_string()))?;
                    let mut mutations = vec![Mutation::Revoke(id.clone())];
                    if !before.revoked {
                        mutations.extend(
                            v.outbox(&[Event::about(
                                EventType::Revoked,
                                &before,
                                before.version + 1,
                            )
                            .with("reason", "admin")]),
                        );
                        mutations.extend(v.revocations(
                            std::slice::from_ref(&before),
                            "revoke",
                            revoke_at_provider,
                        )?);
                    }
                    v.store
                        .apply(&mutations, std::slice::from_ref(a), v.now())?;
                    let after = v
                        .store
                        .get_record(&id)?
                        .ok_or_else(|| StoreError::NotFound(id.to_string()))?;
                    Ok((after, true))
                })
            })
            .await?;
        tracing::info!(rpc = "Revoke", caller = %caller.name, record = %self.log_id(&log_id), "revoked");
        Ok(record)
    }

    /// Deletes a record irrecoverably (docs/THREAT_MODEL.md says what that means).
    pub async fn delete(
        self: &Arc<Self>,
        caller: &Caller,
        id: RecordId,
        revoke_at_provider: Option<bool>,
    ) -> Result<(), VaultError> {
        let (who, log_id) = (caller.name.clone(), id.clone());
        self.blocking(move |v| {
            let draft = Draft::new(&who, "Delete").record(id.as_str());
            v.forget_deks(Some(&id));
            v.audited(draft, |a| {
                let before = v
                    .store
                    .get_record(&id)?
                    .ok_or_else(|| StoreError::NotFound(id.to_string()))?;
                let mut mutations = vec![Mutation::DeleteRecord(id.clone())];
                mutations.extend(
                    v.outbox(&[Event::about(EventType::Deleted, &before, before.version)
                        .with("reason", "admin")]),
                );
                // A revoked record's grant was withdrawn when it was revoked (if asked).
                if !before.revoked {
                    mutations.extend(v.revocations(
                        std::slice::from_ref(&before),
                        "delete",
                        revoke_at_provider,
                    )?);
                }
                v.store.apply(&mutations, std::slice::from_ref(a), 0)?;
                Ok(((), true))
            })
        })
        .await?;
        tracing::info!(rpc = "Delete", caller = %caller.name, record = %self.log_id(&log_id), "deleted");
        Ok(())
    }

    /// Deletes every record of an owner; returns how many.
    ///
    /// Under the two-person rule the call only stores an approval request.
    pub async fn delete_owner(
        self: &Arc<Self>,
        caller: &Caller,
        owner: Owner,
        revoke_at_provider: Option<bool>,
    ) -> Result<Decision<u64>, VaultError> {
        let action = Guarded::DeleteOwner {
            owner: owner.as_str().to_string(),
            revoke_at_provider,
        };
        self.guarded(
            caller,
            action,
            self.delete_owner_now(caller, owner, revoke_at_provider),
        )
        .await
    }

    /// `Admin.SetMinDecryptVersion`: refuses to open anything wrapped under a version below
    /// `version` from now on, on every daemon of the store (each re-reads it with the
    /// registry), until changed again; the configuration's `min_decrypt_version` still applies
    /// if it is higher. Refused above the active version (every envelope would be refused).
    /// Returns the minimum in force. Under the two-person rule the call only stores an approval
    /// request.
    pub async fn set_min_decrypt_version(
        self: &Arc<Self>,
        caller: &Caller,
        version: u32,
    ) -> Result<Decision<u32>, VaultError> {
        self.guarded(
            caller,
            Guarded::SetMinDecryptVersion { version },
            self.set_min_decrypt_version_now(caller, version),
        )
        .await
    }

    /// [`Vault::set_min_decrypt_version`] without the two-person rule (once approved).
    pub(super) async fn set_min_decrypt_version_now(
        self: &Arc<Self>,
        caller: &Caller,
        version: u32,
    ) -> Result<u32, VaultError> {
        let who = caller.name.clone();
        let minimum = self
            .blocking(move |v| {
                let _ops = v.key_ops();
                let draft = Draft::new(&who, "SetMinDecryptVersion").detail(format!("v{version}"));
                let active = v.keyring().active().0.version;
                if version > active {
                    return v.audit_if_refused(
                        draft,
                        Err(VaultError::Argument {
                            what: "version",
                            why: format!(
                                "{version} is above the active version {active}: every envelope would be refused"
                            ),
                        }),
                    );
                }
                let name = super::MIN_DECRYPT_SETTING;
                let read = v.store.get_meta(&crate::store::setting_key(name))?;
                let put = Mutation::PutSetting {
                    name: name.into(),
                    value: version.to_be_bytes().to_vec(),
                    expected: read,
                };
                let now = v.now();
                v.audited(draft, |a| {
                    v.store.apply(&[put], std::slice::from_ref(a), now)?;
                    Ok(((), true))
                })?;
                Ok(v.reload_keyring()?.min_version())
            })
            .await?;
        tracing::info!(rpc = "SetMinDecryptVersion", caller = %caller.name, version, minimum, "minimum decryption version set");
        Ok(minimum)
    }

    /// [`Vault::delete_owner`] without the two-person rule (once approved).
    pub(super) async fn delete_owner_now(
        self: &Arc<Self>,
        caller: &Caller,
        owner: Owner,
        revoke_at_provider: Option<bool>,
    ) -> Result<u64, VaultError> {
        let who = caller.name.clone();
        let deleted = self
            .blocking(move |v| {
                let draft = Draft::new(&who, "DeleteOwner").owner(owner.as_str());
                v.forget_deks(None);
                let mut attempts = 0;
                let deleted = loop {
                    attempts += 1;
                    let deleted = delete_owner_once(v, &owner, revoke_at_provider, &draft);
                    match deleted {
                        // A record of the owner was created or changed between the read
                        // and the deletion: read again, so its grant is withdrawn too.
                        Err(VaultError::Store(StoreError::Conflict(_)))
                            if attempts < DELETE_OWNER_ATTEMPTS => {}
                        other => break other,
                    }
                };
                v.audit_if_refused(draft, deleted)
            })
            .await?;
        // The owner is a personal identifier: it is not logged.
        tracing::info!(rpc = "DeleteOwner", caller = %caller.name, deleted, "deleted owner's records");
        Ok(deleted)
    }

    /// Counts over the store and the DEK cache.
    pub async fn stats(self: &Arc<Self>) -> Result<VaultStats, VaultError> {
        let store = self.blocking(|v| Ok(v.store.stats()?)).await?;
        let cache = self
            .dek_cache
            .as_ref()
            .map(|c| c.stats())
            .unwrap_or_default();
        Ok(VaultStats { store, cache })
    }

    /// Verifies and applies a provider's security event token (RFC 8417) sent by an
    /// authenticated caller (`Admin.SecurityEvent`): a refusal is audited and logged.
    pub async fn security_event(
        self: &Arc<Self>,
        caller: &Caller,
        token: String,
    ) -> Result<SecurityEventOutcome, VaultError> {
        let result = self.apply_set(caller, token, true).await;
        if let Err(e) = &result {
            tracing::warn!(rpc = "SecurityEvent", caller = %caller.name, error = %e, "security event refused");
        }
        result
    }

    /// Like [`Vault::security_event`] for a push (RFC 8935), which no credential
    /// authorizes: an applied event is audited with its change, but a refused one is neither
    /// audited nor logged here (the adapter counts it as an unauthenticated refusal).
    pub async fn security_event_push(
        self: &Arc<Self>,
        token: String,
    ) -> Result<SecurityEventOutcome, VaultError> {
        self.apply_set(&Caller::internal("security-event-push"), token, false)
            .await
    }

    async fn apply_set(
        self: &Arc<Self>,
        caller: &Caller,
        token: String,
        audit_refusal: bool,
    ) -> Result<SecurityEventOutcome, VaultError> {
        // A token naming a key this vault has not fetched from its issuer's JWKS: fetch it
        // first (rate-limited); verification below then finds the key or refuses the token.
        if let Some(index) =
            crate::security_event::jwks_to_fetch(&token, &self.security_event_issuers)
        {
            let issuer = self.security_event_issuers[index].issuer.clone();
            self.jwks.refresh(index, &issuer, self.now()).await;
        }
        let who = caller.name.clone();
        let result = self
            .blocking(move |v| {
                let applied = apply_security_event(v, &who, &token, v.now());
                if audit_refusal {
                    v.audit_if_refused(Draft::new(&who, "SecurityEvent"), applied)
                } else {
                    applied
                }
            })
            .await;
        if let Ok(r) = &result {
            tracing::warn!(rpc = "SecurityEvent", caller = %caller.name, event = %r.event_type, revoked = r.revoked, deleted = r.deleted, "security event applied");
        }
        result
    }

    /// Audits the refusal of a configured caller by an adapter's guard (its role, address or
    /// rate limit), on the blocking pool; a failure to audit is logged (the refusal stands).
    pub async fn audit_refusal(self: &Arc<Self>, caller: &str, service: &str, outcome: &str) {
        let draft = Draft::new(caller, "auth").outcome(outcome).detail(service);
        let written = self
            .blocking(move |v| Ok(v.audit.append(&draft, false)?))
            .await;
        if let Err(e) = written {
            tracing::error!(error = %e, "could not audit a refused call");
        }
    }

    /// Writes what [`super::refusals::Refusals`] counted since the last summary as audit
    /// events, all in one store write: one event per source for the sources refused most (the
    /// rest added up into one), caller `-`, action `unauthenticated-refusals`. One log line
    /// says how many. Nothing is written when nothing was refused.
    pub(super) fn write_refusal_summary(&self) -> Result<(), VaultError> {
        let summary = self.refusals.take_summary();
        if summary.is_empty() {
            return Ok(());
        }
        let seconds = self.limits.refusal_summary.as_secs();
        let drafts: Vec<Draft> = summary
            .top
            .iter()
            .chain(&summary.rest)
            .map(|s| {
                Draft::new("-", "unauthenticated-refusals")
                    .outcome("summary")
                    .detail(format!(
                        "source {} in {seconds}s: {}",
                        s.source,
                        s.counts_text()
                    ))
            })
            .collect();
        self.audit.append_all_with(&drafts, |appends| {
            self.store.append_audit_batch(appends, true)?;
            Ok::<_, VaultError>(((), true))
        })?;
        tracing::warn!(
            refused = summary.total(),
            sources = summary.top.len() + usize::from(summary.rest.is_some()),
            top_source = %summary.top.first().map_or("-", |t| t.source.as_str()),
            seconds,
            "requests refused without an authenticated caller (summary; the audit trail has one event per source)"
        );
        Ok(())
    }

    /// Ships new audit events to the sink, if one is configured; how many.
    pub(super) fn ship_audit(&self) -> Result<u64, VaultError> {
        match &self.shipper {
            Some(s) => Ok(s.ship()?),
            None => Ok(0),
        }
    }

    /// Applies `[audit] retention_days` now (after shipping what is new, since retention never
    /// removes an event the sink has not shipped); how many events were removed.
    pub(super) fn prune_audit_as(&self, caller: &str) -> Result<u64, VaultError> {
        let days = self.retention_days.ok_or(VaultError::RetentionOff)?;
        self.ship_audit()?;
        let not_after = self.shipper.as_ref().map(|s| s.shipped()).transpose()?;
        let cutoff_ms = self
            .now()
            .saturating_sub(i64::from(days) * 86_400)
            .saturating_mul(1000);
        Ok(self.audit.prune(caller, cutoff_ms, not_after)?)
    }

    /// The periodic retention run.
    pub(super) fn prune_audit_now(&self) -> Result<u64, VaultError> {
        self.prune_audit_as("retention")
    }

    /// `Admin.PruneAudit`: retention now, by an administrator.
    pub async fn prune_audit(self: &Arc<Self>, caller: &Caller) -> Result<u64, VaultError> {
        let who = caller.name.clone();
        let pruned = self
            .blocking(move |v| {
                let result = v.prune_audit_as(&who);
                v.audit_if_refused(Draft::new(&who, "PruneAudit"), result)
            })
            .await?;
        tracing::info!(rpc = "PruneAudit", caller = %caller.name, pruned, "audit retention applied");
        Ok(pruned)
    }

    /// Streams the audit events matching `filter`, oldest first, a page at a time from the
    /// store. Stops at shutdown with [`VaultError::ShuttingDown`].
    pub fn audit_log(
        self: &Arc<Self>,
        filter: AuditFilter,
    ) -> tokio::sync::mpsc::Receiver<Result<AuditEntry, VaultError>> {
        let record = filter.record_id.as_deref().map(|r| self.audit.hmac(r));
        let owner = filter.owner.as_deref().map(|o| self.audit.hmac(o));
        let (tx, rx) = tokio::sync::mpsc::channel(64);
        let v = Arc::clone(self);
        // Tracked and stopped at shutdown: it reads the store page by page.
        self.tasks.spawn_blocking(move || {
            let chains = match &filter.instance {
                Some(one) => Ok(vec![one.clone()]),
                None => v.store.audit_chains(),
            };
            let chains = match chains {
                Ok(c) => c,
                Err(e) => {
                    let _ = tx.blocking_send(Err(VaultError::from(e)));
                    return;
                }
            };
            for chain in chains {
                let checkpoint = match crate::audit::checkpoint(&*v.store, &chain) {
                    Ok(c) => c,
                    Err(e) => {
                        let _ = tx.blocking_send(Err(VaultError::from(e)));
                        return;
                    }
                };
                let mut next = 1;
                loop {
                    if v.stopping.is_cancelled() {
                        let _ = tx.blocking_send(Err(VaultError::ShuttingDown));
                        return;
                    }
                    let page = match v.store.chain_events(&chain, next, 512) {
                        Ok(p) => p,
                        Err(e) => {
                            let _ = tx.blocking_send(Err(VaultError::from(e)));
                            return;
                        }
                    };
                    let Some(&(last, _)) = page.last() else {
                        break;
                    };
                    for (seq, raw) in page {
                        let event = crate::audit::Event::from_stored(seq, &raw);
                        let in_range = filter.from_time_ms.is_none_or(|t| event.time_ms >= t)
                            && filter.to_time_ms.is_none_or(|t| event.time_ms <= t);
                        let matches = record.as_ref().is_none_or(|h| *h == event.record_hmac)
                            && owner.as_ref().is_none_or(|h| *h == event.owner_hmac);
                        if !(in_range && matches) {
                            continue;
                        }
                        let entry = AuditEntry {
                            chain: chain.clone(),
                            seq,
                            event,
                            raw,
                            checkpoint: checkpoint.filter(|c| c.seq + 1 == seq),
                        };
                        if tx.blocking_send(Ok(entry)).is_err() {
                            return;
                        }
                    }
                    next = last + 1;
                }
            }
        });
        rx
    }
}

/// Parses a key supplied to `RotateKey` for import, checking the optional public half.
fn imported_key(private_pem: &str, public_pem: Option<&str>) -> Result<PrivateKey, VaultError> {
    let bad = |e: crate::keys::KeyError| VaultError::BadKey(e.to_string());
    let key = PrivateKey::from_pem(private_pem, None)
        .map_err(|e| bad(e.with_passphrase_hint(crate::keys::passphrase_hint::REMOTE)))?;
    if let Some(public_pem) = public_pem {
        let public = crate::keys::PublicKey::from_pem(public_pem).map_err(bad)?;
        if public.id() != key.public_key().id() {
            return Err(VaultError::BadKey(
                "the public key does not match the private key".into(),
            ));
        }
    }
    Ok(key)
}

/// Verifies a security event token and revokes or deletes the subject's records of the
/// issuer's provider. The changes, their audit events and the replay marker are one atomic
/// write: an event is applied whole or not at all, and once (its `jti` is kept).
fn apply_security_event(
    s: &Vault,
    caller: &str,
    token: &str,
    now: i64,
) -> Result<SecurityEventOutcome, VaultError> {
    use crate::security_event;
    use sha2::Digest as _;
    let event = security_event::verify(token, &s.security_event_issuers, now)?;
    let issuer = &s.security_event_issuers[event.issuer];
    let marker = hex::encode(sha2::Sha256::digest(format!(
        "{}\0{}",
        issuer.issuer, event.jti
    )));
    let owner = Owner::parse(event.owner.clone()).map_err(|source| VaultError::Invalid {
        what: "security event subject".into(),
        source,
    })?;
    let short_type = event
        .event_type
        .rsplit('/')
        .next()
        .unwrap_or_default()
        .to_string();
    let applied = apply_owner_action(
        s,
        &OwnerAction {
            caller,
            action: "SecurityEvent",
            reason: "security_event",
            detail: format!("{short_type} from {} jti {}", issuer.issuer, event.jti),
            provider: &issuer.provider,
            owner: &owner,
            what: &event.action,
            marker: &marker,
            replayed: format!("security event jti {} (already applied)", event.jti),
        },
        now,
    )?;
    Ok(SecurityEventOutcome {
        event_type: event.event_type,
        ..applied
    })
}

/// A provider's word that an owner's grant is gone, verified by the caller: a security event,
/// or an unlink callback.
pub(super) struct OwnerAction<'a> {
    /// Who (the audit events' caller).
    pub(super) caller: &'a str,
    /// The audit action of the whole (`SecurityEvent`, `UnlinkCallback`).
    pub(super) action: &'a str,
    /// The webhook events' `reason`.
    pub(super) reason: &'a str,
    /// The audit detail.
    pub(super) detail: String,
    /// Only this provider's records are affected.
    pub(super) provider: &'a str,
    /// Whose.
    pub(super) owner: &'a Owner,
    /// What to do with them.
    pub(super) what: &'a crate::security_event::Action,
    /// The replay marker written with the change (a second one is refused).
    pub(super) marker: &'a str,
    /// The refusal's message when the marker exists.
    pub(super) replayed: String,
}

/// Revokes or deletes `a.owner`'s records of `a.provider` in one write with their audit events,
/// webhook events and the replay marker; `AlreadyExists` (nothing written) for a replay.
pub(super) fn apply_owner_action(
    s: &Vault,
    a: &OwnerAction<'_>,
    now: i64,
) -> Result<SecurityEventOutcome, VaultError> {
    use crate::security_event::Action;
    let (caller, owner) = (a.caller, a.owner);
    // A record deleted between the plan and the write makes the write refuse (NotFound);
    // planning again sees it gone.
    let mut attempts = 0;
    loop {
        attempts += 1;
        let mut drafts = vec![
            Draft::new(caller, a.action)
                .owner(owner.as_str())
                .detail(a.detail.clone()),
        ];
        let mut mutations = Vec::new();
        let mut events = Vec::new();
        let (mut revoked, mut deleted) = (0, 0);
        for id in s.store.owner_record_ids(owner)? {
            let Some(record) = s.store.get_record(&id)? else {
                continue;
            };
            if record.meta.provider.as_str() != a.provider {
                continue;
            }
            let draft = |action: &str| {
                Draft::new(caller, action)
                    .record(id.as_str())
                    .owner(owner.as_str())
                    .detail(format!("{}: {}", a.reason.replace('_', " "), a.detail))
            };
            match a.what {
                Action::Delete => {
                    drafts.push(draft("Delete"));
                    mutations.push(Mutation::DeleteRecord(id));
                    events.push(
                        Event::about(EventType::Deleted, &record, record.version)
                            .with("reason", a.reason),
                    );
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
                    events.push(
                        Event::about(EventType::Revoked, &record, record.version + 1)
                            .with("reason", a.reason),
                    );
                    revoked += 1;
                }
                _ => {}
            }
        }
        mutations.push(Mutation::PutReplayMarker {
            key: a.marker.to_string(),
            at: now,
        });
        mutations.extend(s.outbox(&events));
        let written = s.audit.append_all_with(&drafts, |appends| {
            match s.store.apply(&mutations, appends, now) {
                Ok(()) => Ok((true, true)),
                Err(StoreError::NotFound(_)) if attempts < 3 => Ok((false, false)),
                Err(StoreError::AlreadyExists(_)) => Err(VaultError::from(
                    StoreError::AlreadyExists(a.replayed.clone()),
                )),
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
        return Ok(SecurityEventOutcome {
            event_type: String::new(),
            revoked,
            deleted,
        });
    }
}

/// Reads and deletes tried before `DeleteOwner` gives up on an owner whose records keep
/// changing (`ABORTED`, retryable).
const DELETE_OWNER_ATTEMPTS: u32 = 5;

/// One try of `DeleteOwner`: the owner's records read, their grants' revocations (unless
/// `revoke_at_provider` is false) and the `owner.deleted` event prepared, then the deletion
/// of exactly the records read with its audit event and outbox entries, or `Conflict` if
/// they changed meanwhile (nothing written).
fn delete_owner_once(
    v: &Vault,
    owner: &Owner,
    revoke_at_provider: Option<bool>,
    draft: &Draft,
) -> Result<u64, VaultError> {
    let mut event = Event {
        kind: EventType::OwnerDeleted,
        record: None,
        provider: None,
        data: serde_json::Map::new(),
    };
    event.data.insert("owner".into(), owner.as_str().into());
    let mut rows = v.outbox_rows(&[event]);
    let mut read = Vec::new();
    // The grants of the records deleted here, withdrawn at providers that can (others are
    // skipped).
    if revoke_at_provider != Some(false) {
        let mut records = Vec::new();
        for id in v.store.owner_record_ids(owner)? {
            if let Some(r) = v.store.get_record(&id)? {
                read.push((r.meta.id.clone(), r.version));
                if !r.revoked {
                    records.push(r);
                }
            }
        }
        rows.extend(v.revocation_rows(&records, "delete_owner", revoke_at_provider, false)?);
    }
    let expected = (revoke_at_provider != Some(false)).then_some(read.as_slice());
    v.audit.append_with(draft, |a| {
        Ok((v.store.delete_owner(owner, expected, a, &rows)?, true))
    })
}
