//! Key lifecycle operations over a store and a key directory: rotate, rewrap, retire, destroy.
//!
//! Owns: [`rewrap_all`] (the resumable, online rewrap of every stored data key to the active
//! key), [`retire`] and [`destroy`] with their preconditions, and [`RotationError`]. Every
//! function takes `now` so tests control time. Nothing here knows gRPC.
//!
//! Rewrap walks the records in id order, a page at a time. For each record under an older key
//! version it unwraps the data key with the old private key, checks it against the ciphertext,
//! wraps it with the active public key and writes back only the envelope's key fields, with a
//! version check so a record updated meanwhile (refresh, revoke, re-ingest) is never
//! overwritten with stale data. After each page the cursor (target version + last id) is stored
//! durably, so a crashed or killed run resumes where it stopped; records already under the
//! target are skipped, so a second run finds nothing to do.

use std::time::{Duration, Instant};

use thiserror::Error;

use super::keyring::{KeyDir, Keyring};
use super::{KeyInfo, KeyState, UnwrapperLookup};
use crate::envelope::{self, RewrapError};
use crate::record::RecordId;
use crate::store::{AuditAppend, EnvelopeReplace, StoreError, TokenStore};

/// Store metadata key of the rewrap cursor.
pub const REWRAP_CURSOR: &str = "rewrap_cursor";

/// Why a lifecycle operation was refused or failed.
#[derive(Debug, Error)]
#[non_exhaustive]
pub enum RotationError {
    /// No such key version.
    #[error("no key version {0}")]
    UnknownVersion(u32),
    /// The operation does not apply to a key in this state.
    #[error("key version {version} is {state}; {action} needs a {needed} key")]
    WrongState {
        /// Version.
        version: u32,
        /// Its state.
        state: KeyState,
        /// What was attempted.
        action: &'static str,
        /// The state it needs.
        needed: &'static str,
    },
    /// Records still use the version.
    #[error("key version {version} still wraps {records} record(s); run Admin.Rewrap first")]
    RecordsRemain {
        /// Version.
        version: u32,
        /// How many records.
        records: u64,
    },
    /// A store failure.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// A key file failure.
    #[error(transparent)]
    Key(#[from] super::KeyError),
}

/// Tuning of a rewrap run.
#[derive(Debug, Clone, Copy)]
pub struct RewrapOptions {
    /// Records read per page (and per durable write).
    pub page: usize,
    /// Worker threads for the RSA work; defaults to the number of cores.
    pub threads: usize,
    /// Upper bound on rewrapped records per second, so production traffic keeps priority.
    pub max_per_second: Option<u32>,
}

impl RewrapOptions {
    /// One page of 512, one thread per core, no rate limit.
    pub fn full_speed() -> Self {
        Self {
            page: 512,
            threads: std::thread::available_parallelism().map_or(2, usize::from),
            max_per_second: None,
        }
    }
}

/// Progress of a rewrap run, reported after every page.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RewrapProgress {
    /// Version records are being moved to.
    pub target_version: u32,
    /// Records under older versions when the run started.
    pub total: u64,
    /// Records rewrapped so far in this run.
    pub rewrapped: u64,
    /// Records found already under the target (or deleted meanwhile).
    pub skipped: u64,
    /// Records that changed concurrently and were re-read.
    pub conflicts: u64,
    /// Records that could not be rewrapped (they do not open); left as they are.
    pub failed: u64,
    /// Whether the run has finished.
    pub done: bool,
    /// Time since the run started.
    pub elapsed: Duration,
}

fn encode_cursor(target: u32, id: &RecordId) -> Vec<u8> {
    let mut v = target.to_be_bytes().to_vec();
    v.extend_from_slice(id.as_str().as_bytes());
    v
}

fn decode_cursor(bytes: &[u8], target: u32) -> Option<RecordId> {
    let (version, id) = bytes.split_first_chunk::<4>()?;
    if u32::from_be_bytes(*version) != target {
        return None;
    }
    RecordId::parse(std::str::from_utf8(id).ok()?).ok()
}

/// Rewraps every record not under the active version of `ring`. Resumes from the stored
/// cursor of an interrupted run with the same target; reports progress after every page.
pub fn rewrap_all(
    store: &dyn TokenStore,
    ring: &Keyring,
    opts: RewrapOptions,
    now: impl Fn() -> i64,
    mut on_progress: impl FnMut(&RewrapProgress),
) -> Result<RewrapProgress, RotationError> {
    let start = Instant::now();
    let (active, public) = ring.active();
    let target = active.version;
    let stats = store.stats()?;
    let mut p = RewrapProgress {
        target_version: target,
        total: stats
            .per_key_version
            .iter()
            .filter(|(v, _)| *v != target)
            .map(|(_, n)| n)
            .sum(),
        ..RewrapProgress::default()
    };
    let mut cursor = store
        .get_meta(REWRAP_CURSOR)?
        .and_then(|c| decode_cursor(&c, target));
    if let Some(c) = &cursor {
        tracing::info!(target_version = target, after = %c, "resuming rewrap");
    }
    let threads = opts.threads.max(1);
    loop {
        let page = store.scan_records(cursor.as_ref(), opts.page.max(1))?;
        let Some(last) = page.last().map(|r| r.meta.id.clone()) else {
            break;
        };
        let mut todo: Vec<_> = page
            .into_iter()
            .filter(|r| r.key_version != target)
            .collect();
        // Retry each conflicting record once after re-reading it; a second conflict means it is
        // being written right now by someone who seals under the active key anyway.
        for attempt in 0..2 {
            let chunk = todo.len().div_ceil(threads).max(1);
            let results: Vec<(usize, Result<Vec<u8>, RewrapError>)> = std::thread::scope(|s| {
                let handles: Vec<_> = todo
                    .chunks(chunk)
                    .enumerate()
                    .map(|(c, recs)| {
                        s.spawn(move || {
                            recs.iter()
                                .enumerate()
                                .map(|(i, r)| {
                                    (
                                        c * chunk + i,
                                        envelope::rewrap(
                                            &r.meta,
                                            &r.envelope,
                                            ring as &dyn UnwrapperLookup,
                                            public,
                                        ),
                                    )
                                })
                                .collect::<Vec<_>>()
                        })
                    })
                    .collect();
                handles
                    .into_iter()
                    .flat_map(|h| h.join().expect("rewrap worker does not panic"))
                    .collect()
            });
            let mut items = Vec::with_capacity(results.len());
            for (i, result) in results {
                match result {
                    Ok(envelope) => items.push(EnvelopeReplace {
                        id: todo[i].meta.id.clone(),
                        expected_version: todo[i].version,
                        envelope,
                        key_version: target,
                    }),
                    Err(e) => {
                        p.failed += 1;
                        tracing::warn!(record = %todo[i].meta.id, error = %e, "record not rewrapped");
                    }
                }
            }
            let outcomes = store.replace_envelopes(&items, now())?;
            let mut retry = Vec::new();
            for (item, outcome) in items.iter().zip(outcomes) {
                match outcome {
                    Ok(_) => p.rewrapped += 1,
                    Err(StoreError::VersionMismatch { .. }) if attempt == 0 => {
                        p.conflicts += 1;
                        if let Some(r) = store.get_record(&item.id)? {
                            if r.key_version != target {
                                retry.push(r);
                            } else {
                                p.skipped += 1;
                            }
                        }
                    }
                    Err(_) => p.skipped += 1,
                }
            }
            todo = retry;
            if todo.is_empty() {
                break;
            }
        }
        store.put_meta(REWRAP_CURSOR, Some(&encode_cursor(target, &last)))?;
        cursor = Some(last);
        p.elapsed = start.elapsed();
        on_progress(&p);
        if let Some(limit) = opts.max_per_second.filter(|l| *l > 0) {
            let due = Duration::from_secs_f64(p.rewrapped as f64 / f64::from(limit));
            if let Some(wait) = due.checked_sub(start.elapsed()) {
                std::thread::sleep(wait);
            }
        }
    }
    store.put_meta(REWRAP_CURSOR, None)?;
    p.done = true;
    p.elapsed = start.elapsed();
    on_progress(&p);
    Ok(p)
}

fn find(store: &dyn TokenStore, version: u32) -> Result<KeyInfo, RotationError> {
    store
        .keys()?
        .into_iter()
        .find(|k| k.version == version)
        .ok_or(RotationError::UnknownVersion(version))
}

/// The registry entry of `version`, which must be in one of the `allowed` states for `action`.
fn find_in(
    store: &dyn TokenStore,
    version: u32,
    allowed: &[KeyState],
    action: &'static str,
    needed: &'static str,
) -> Result<KeyInfo, RotationError> {
    let key = find(store, version)?;
    if allowed.contains(&key.state) {
        Ok(key)
    } else {
        Err(RotationError::WrongState {
            version,
            state: key.state,
            action,
            needed,
        })
    }
}

/// Refuses while any record is still wrapped under `version`.
fn ensure_unused(store: &dyn TokenStore, version: u32) -> Result<(), RotationError> {
    match records_under(store, version)? {
        0 => Ok(()),
        records => Err(RotationError::RecordsRemain { version, records }),
    }
}

/// Records wrapped under `version` right now.
pub fn records_under(store: &dyn TokenStore, version: u32) -> Result<u64, RotationError> {
    Ok(store
        .stats()?
        .per_key_version
        .iter()
        .find(|(v, _)| *v == version)
        .map_or(0, |(_, n)| *n))
}

/// Marks a decrypt-only version retired, writing `audit` in the same batch. Refused while any
/// record still uses it.
pub fn retire(
    store: &dyn TokenStore,
    version: u32,
    now: i64,
    audit: Option<&AuditAppend>,
) -> Result<KeyInfo, RotationError> {
    // Retiring again rewrites the same entry (so the audit event lands with it).
    let mut key = find_in(
        store,
        version,
        &[KeyState::DecryptOnly, KeyState::Retired],
        "retire",
        "decrypt-only",
    )?;
    ensure_unused(store, version)?;
    key.state = KeyState::Retired;
    key.updated_at = now;
    store.put_keys(std::slice::from_ref(&key), audit)?;
    Ok(key)
}

/// Erases the private key file of a retired version and marks it destroyed; only its public
/// fingerprint remains. Returns the updated entry.
pub fn destroy(
    store: &dyn TokenStore,
    dir: &KeyDir,
    version: u32,
    now: i64,
    audit: Option<&AuditAppend>,
) -> Result<KeyInfo, RotationError> {
    // Checked here as well as at retirement: an envelope that slipped in under a retiring key
    // must never lose its only private key.
    ensure_unused(store, version)?;
    let mut key = find_in(
        store,
        version,
        &[KeyState::Retired, KeyState::Destroyed],
        "destroy",
        "retired",
    )?;
    dir.erase(version)?;
    if key.state != KeyState::Destroyed {
        key.state = KeyState::Destroyed;
        key.updated_at = now;
    }
    // Written even when already destroyed, so the audit event lands with the registry entry.
    store.put_keys(std::slice::from_ref(&key), audit)?;
    Ok(key)
}
