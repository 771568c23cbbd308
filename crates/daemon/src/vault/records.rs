//! The one way the daemon opens a stored record: through the DEK cache when it is enabled,
//! with the RSA unwrap timed in the metrics, split so that only the unwrap needs the
//! private-key pool. `Broker` (for callers) and the refresher (for
//! itself) both use it, so neither depends on the other for it.
//!
//! Must never: check a caller's policy (callers do that first) or write to the store.

use std::sync::Arc;

use super::Vault;
use crate::envelope::{self, DecryptError, EnvelopeRef};
use crate::keys::keyring::Keyring;
use crate::record::{Record, RecordId};
use crate::secret::Secret;

/// Opens a record, through the DEK cache when it is enabled. The key lookup runs on every
/// call, so a destroyed key or the minimum decryption version applies to cached keys too.
pub(super) fn open(
    s: &Vault,
    id: &RecordId,
    record: &Record,
    ring: &Keyring,
) -> Result<Secret, DecryptError> {
    match open_cached(s, id, record, ring)? {
        Some(secret) => Ok(secret),
        None => open_unwrapping(s, id, record, ring),
    }
}

/// The cheap part of [`open`]: the record opened with its cached data key, or `None` if it
/// must be unwrapped with the private key ([`open_unwrapping`], the only part that belongs on
/// the private-key pool). Checks the envelope's key as [`open`] does.
pub(super) fn open_cached(
    s: &Vault,
    id: &RecordId,
    record: &Record,
    ring: &Keyring,
) -> Result<Option<Secret>, DecryptError> {
    let env = EnvelopeRef::decode(&record.envelope)?;
    envelope::unwrapper_for(&env, ring)?;
    let cache = s.dek_cache.as_ref();
    match cache.and_then(|c| c.get(id, record.version, &env.key_id, s.now())) {
        Some(dek) => envelope::open_with_dek(&record.meta, &env, &dek).map(Some),
        None => Ok(None),
    }
}

/// Opens a record by unwrapping its data key with the private key (timed in the metrics), and
/// caches the key once it has opened the record.
pub(super) fn open_unwrapping(
    s: &Vault,
    id: &RecordId,
    record: &Record,
    ring: &Keyring,
) -> Result<Secret, DecryptError> {
    let env = EnvelopeRef::decode(&record.envelope)?;
    let unwrapper = envelope::unwrapper_for(&env, ring)?;
    let started = std::time::Instant::now();
    let dek = Arc::new(unwrapper.unwrap_dek(env.wrapped_dek)?);
    s.metrics
        .rsa_unwrap
        .observe(started.elapsed().as_secs_f64());
    let secret = envelope::open_with_dek(&record.meta, &env, &dek)?;
    // Cached only once it has opened the record, so a bad key is never reused.
    if let Some(cache) = s.dek_cache.as_ref() {
        cache.put(id.clone(), record.version, env.key_id, dek, s.now());
    }
    Ok(secret)
}
