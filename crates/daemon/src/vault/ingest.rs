//! Ingest's use cases: write-only storage of sealed envelopes, and the active public key.
//!
//! Validates structure and metadata without any private key: envelope layout, a known key
//! fingerprint in an accepted state, and a wrapped-key length matching that key. It cannot
//! check the AES-GCM binding (that needs the data key); a mis-bound envelope fails later, at
//! `GetToken`, with `DATA_LOSS`, and harms no other record.
//!
//! Must never: open an envelope or touch a private key.

use std::sync::Arc;

use super::{Caller, Vault, VaultError};
use crate::config::{CallerPolicy, KeyPolicy};
use crate::envelope::{EnvelopeRef, MAX_SECRET_LEN};
use crate::keys::keyring::Keyring;
use crate::keys::{KeyInfo, KeyState};
use crate::record::{RecordId, RecordMeta};
use crate::store::{Mutation, RecordWrite, StoreError};

/// One sealed record as a web tier hands it over: validated metadata and the envelope bytes,
/// not yet checked against the keyring.
#[derive(Debug, Clone)]
pub struct SealedRecord {
    /// The record's identity and metadata (validated).
    pub meta: RecordMeta,
    /// The envelope (docs/ENVELOPE.md).
    pub envelope: Vec<u8>,
    /// Replace only this stored version; 0 creates a new record.
    pub expected_version: u64,
}

/// Checks one sealed record against the caller's policy and the keyring at `now`; returns the
/// key version that wraps it. Pure: no I/O, so the fuzzer runs it on arbitrary input.
pub fn check_item(
    ring: &Keyring,
    policy: &KeyPolicy,
    caller: &CallerPolicy,
    now: i64,
    item: &SealedRecord,
) -> Result<u32, VaultError> {
    let meta = &item.meta;
    caller
        .check_record(meta)
        .map_err(VaultError::PolicyDenied)?;
    let env = EnvelopeRef::decode(&item.envelope)?;
    let (info, public) = ring
        .public(&env.key_id)
        .ok_or(VaultError::UnknownKey(env.key_id))?;
    if !info.state.accepts_envelopes() {
        return Err(VaultError::KeyNotAccepted {
            version: info.version,
            state: info.state,
        });
    }
    if info.version < ring.min_version() {
        return Err(VaultError::BelowMinimum {
            version: info.version,
            minimum: ring.min_version(),
        });
    }
    // Web tiers pick up a rotated key at their own pace, within the grace period.
    if info.state == KeyState::DecryptOnly
        && now.saturating_sub(info.updated_at) > policy.ingest_grace_seconds
    {
        return Err(VaultError::GraceEnded {
            version: info.version,
            since: info.updated_at,
            grace_seconds: policy.ingest_grace_seconds,
        });
    }
    // A v2 envelope naming an RSA version (or the reverse) could never be opened: refused at
    // the door rather than stored to fail as DATA_LOSS later.
    if env.scheme != public.scheme() {
        return Err(VaultError::WrongFormat {
            version: info.version,
            envelope: env.scheme,
            key: public.scheme(),
        });
    }
    if env.wrapped_dek.len() != public.wrapped_len() {
        return Err(VaultError::WrappedLength {
            version: info.version,
            expected: public.wrapped_len(),
            actual: env.wrapped_dek.len(),
        });
    }
    // Every sealer meets the documented secret size (docs/ENVELOPE.md), not only ours.
    let secret_len = env.secret_len();
    if !(1..=MAX_SECRET_LEN).contains(&secret_len) {
        return Err(VaultError::SecretLength {
            len: secret_len,
            max: MAX_SECRET_LEN,
        });
    }
    Ok(info.version)
}

impl SealedRecord {
    fn into_write(self, key_version: u32) -> RecordWrite {
        RecordWrite {
            meta: self.meta,
            key_version,
            envelope: self.envelope,
            expected_version: self.expected_version,
        }
    }
}

impl Vault {
    /// Stores one sealed record durably (group commit); returns its new version.
    pub async fn put_sealed(
        self: &Arc<Self>,
        caller: &Caller,
        item: SealedRecord,
    ) -> Result<u64, VaultError> {
        let check =
            |ring: &Keyring| check_item(ring, &self.policy, &caller.policy, self.now(), &item);
        let key_version = match check(&self.keyring()) {
            // Sealed under a version another daemon sharing the store just added.
            Err(VaultError::UnknownKey(_)) if self.reload_for_unknown_key_blocking().await => {
                check(&self.keyring())?
            }
            other => other?,
        };
        let write = item.into_write(key_version);
        let id = write.meta.id.clone();
        let versions = match self
            .put_recovering(caller, vec![write], "PutSealed")
            .await?
        {
            Ok(versions) => versions,
            Err(writes) => {
                self.commit
                    .submit(writes, &caller.name, "PutSealed")
                    .await?
            }
        };
        let version = versions.first().copied().ok_or(VaultError::Task)?;
        tracing::debug!(rpc = "PutSealed", caller = %caller.name, record = %self.log_id(&id), version, "stored");
        Ok(version)
    }

    /// Refuses a batch size outside 1..=`max_batch` (before its items are even decoded, so an
    /// oversized batch is reported as such rather than by its first bad item).
    pub fn check_batch_size(&self, count: usize) -> Result<(), VaultError> {
        let max = self.limits.max_batch;
        if count == 0 {
            return Err(VaultError::EmptyBatch);
        }
        if count > max {
            return Err(VaultError::BatchTooLarge { count, max });
        }
        Ok(())
    }

    /// Stores sealed records atomically: all or none. Returns their new versions in order. An
    /// item's refusal names its index.
    pub async fn put_sealed_batch(
        self: &Arc<Self>,
        caller: &Caller,
        items: Vec<SealedRecord>,
    ) -> Result<Vec<u64>, VaultError> {
        self.check_batch_size(items.len())?;
        let now = self.now();
        let check_all = |ring: &Keyring| {
            items
                .iter()
                .enumerate()
                .map(|(index, item)| {
                    check_item(ring, &self.policy, &caller.policy, now, item)
                        .map_err(|e| e.at_item(index))
                })
                .collect::<Result<Vec<_>, _>>()
        };
        let key_versions = match check_all(&self.keyring()) {
            Err(VaultError::Item { source, .. })
                if matches!(*source, VaultError::UnknownKey(_))
                    && self.reload_for_unknown_key_blocking().await =>
            {
                check_all(&self.keyring())?
            }
            other => other?,
        };
        let writes: Vec<RecordWrite> = items
            .into_iter()
            .zip(key_versions)
            .map(|(item, v)| item.into_write(v))
            .collect();
        let count = writes.len();
        let ids: Vec<RecordId> = writes.iter().map(|w| w.meta.id.clone()).collect();
        let versions = match self
            .put_recovering(caller, writes, "PutSealedBatch")
            .await
            .map_err(|e| at_failing_item(e, &ids))?
        {
            Ok(versions) => versions,
            Err(writes) => self
                .commit
                .submit(writes, &caller.name, "PutSealedBatch")
                .await
                .map_err(|e| at_failing_item(e, &ids))?,
        };
        tracing::debug!(rpc = "PutSealedBatch", caller = %caller.name, records = count, "stored");
        Ok(versions)
    }

    /// Writes `writes` outside the group commit when one of them replaces a record that needs
    /// re-authorization: with the `record.recovered` webhook and their audit events in one
    /// write. Otherwise (no endpoint configured, only creates, or nothing to recover) hands
    /// them back (`Err`) for the group commit, having read nothing or only the replaced
    /// records. Rare by nature: an owner who signed in again.
    async fn put_recovering(
        self: &Arc<Self>,
        caller: &Caller,
        writes: Vec<RecordWrite>,
        action: &'static str,
    ) -> Result<Result<Vec<u64>, Vec<RecordWrite>>, VaultError> {
        if !self.webhooks.enabled() || writes.iter().all(|w| w.expected_version == 0) {
            return Ok(Err(writes));
        }
        let who = caller.name.clone();
        self.blocking(move |v| {
            let events = v.recoveries(&writes)?;
            if events.is_empty() {
                return Ok(Err(writes));
            }
            // One audit event per record this write changes: a write that repeats the one
            // that made the stored version changes nothing and gets none (the store accepts it
            // as such, or refuses the whole write).
            let mut drafts = Vec::with_capacity(writes.len());
            for w in &writes {
                let stored = v.store.get_record(&w.meta.id)?.map_or(0, |r| r.version);
                if stored == w.expected_version {
                    drafts.push(super::commit::stored_draft(
                        &who,
                        action,
                        &w.meta,
                        w.expected_version + 1,
                        w.key_version,
                    ));
                }
            }
            let mut mutations: Vec<Mutation> =
                writes.iter().cloned().map(Mutation::PutRecord).collect();
            mutations.extend(v.outbox(&events));
            let now = v.now();
            v.audit.append_all_with(&drafts, |appends| {
                v.store
                    .apply(&mutations, appends, now)
                    .map(|()| ((), true))
                    .map_err(VaultError::from)
            })?;
            for w in &writes {
                v.forget_deks(Some(&w.meta.id));
            }
            let mut versions = Vec::with_capacity(writes.len());
            for w in &writes {
                let stored = v.store.get_record(&w.meta.id)?.map_or(0, |r| r.version);
                versions.push(stored);
            }
            Ok(Ok(versions))
        })
        .await
    }

    /// [`Vault::reload_for_unknown_key`] off the async executor (it reads the store and
    /// decrypts private keys); false at once when the keys are not shared.
    async fn reload_for_unknown_key_blocking(self: &Arc<Self>) -> bool {
        self.shares_keys()
            && self
                .blocking(|v| Ok(v.reload_for_unknown_key()))
                .await
                .unwrap_or(false)
    }

    /// The active key version, which sealers must use.
    pub fn active_key(&self) -> KeyInfo {
        self.keyring().active().0.clone()
    }

    /// Every key version known to the keyring.
    pub fn keys(&self) -> Vec<KeyInfo> {
        self.keyring().infos().cloned().collect()
    }

    /// The minimum decryption version this daemon applies now.
    pub fn min_version_in_force(&self) -> u32 {
        self.keyring().min_version()
    }
}

/// A batch's store refusal that names a record (a stale or taken version), as the refusal of
/// that record's item, so `metadata.item` and the message say which item it was.
fn at_failing_item(e: VaultError, ids: &[RecordId]) -> VaultError {
    let id = match &e {
        VaultError::Store(
            StoreError::VersionMismatch { id, .. }
            | StoreError::AlreadyExists(id)
            | StoreError::NotFound(id),
        ) => id,
        _ => return e,
    };
    match ids.iter().position(|i| i.as_str() == id) {
        Some(index) => e.at_item(index),
        None => e,
    }
}
