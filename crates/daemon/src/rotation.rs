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

use std::ops::ControlFlow;
use std::time::{Duration, Instant};

use thiserror::Error;

use crate::envelope::{self, RewrapError};
use crate::keys::keyring::{KeyDir, Keyring};
use crate::keys::{KeyError, KeyInfo, KeyState, UnwrapperLookup, Wrapper};
use crate::keys::{NewKey, PublicKey};
use crate::record::{Record, RecordId};
#[cfg(any(test, feature = "testing"))]
use crate::store::TestHooks;
use crate::store::{AuditAppend, EnvelopeReplace, StoreError, TokenStore};

/// Store metadata key of the rewrap cursor.
pub const REWRAP_CURSOR: &str = "rewrap_cursor";

/// Why a lifecycle operation was refused or failed.
#[derive(Debug, Error)]
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
    Key(#[from] KeyError),
    /// The destruction is due: it can no longer be cancelled.
    #[error(
        "key version {version} is due for destruction since {}; it can no longer be cancelled",
        crate::rfc3339(*due)
    )]
    DestructionDue {
        /// Version.
        version: u32,
        /// When it became due, Unix seconds.
        due: i64,
    },
    /// The destruction is scheduled for later.
    #[error(
        "key version {version} is pending destruction until {}",
        crate::rfc3339(*due)
    )]
    NotDue {
        /// Version.
        version: u32,
        /// When it becomes due, Unix seconds.
        due: i64,
    },
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

/// How long one paced page may take at most: pages under a rate limit hold this much of the
/// rate, so the figure holds over any one-second window (within 1/20) instead of arriving in
/// bursts of a whole page followed by a long pause.
const PACED_SLICE_PER_SECOND: u32 = 20;

/// Records per page under a rate limit of `limit` records/s.
fn paced_page(page: usize, limit: u32) -> usize {
    page.min(usize::try_from(limit / PACED_SLICE_PER_SECOND).unwrap_or(usize::MAX))
        .max(1)
}

/// Rewraps every record not under the active version of `ring`. Resumes from the stored
/// cursor of an interrupted run with the same target; reports progress after every page.
/// `on_progress` returning `Break` stops the run after that page (cursor stored, so the next
/// run resumes there); the returned progress then has `done == false`.
pub fn rewrap_all(
    store: &dyn TokenStore,
    ring: &Keyring,
    opts: RewrapOptions,
    now: impl Fn() -> i64,
    mut on_progress: impl FnMut(&RewrapProgress) -> ControlFlow<()>,
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
    let cursor = store
        .get_meta(REWRAP_CURSOR)?
        .and_then(|c| decode_cursor(&c, target));
    if let Some(c) = &cursor {
        tracing::info!(target_version = target, after = %c, "resuming rewrap");
    }
    let limit = opts.max_per_second.filter(|l| *l > 0);
    let page = match limit {
        Some(l) => paced_page(opts.page.max(1), l),
        None => opts.page.max(1),
    };
    let threads = opts.threads.max(1);
    // Pacing: the earliest time the next page may be written. A stall (the store, or a busy
    // machine) is never made up with a burst: the schedule restarts from now.
    let mut next_write = Instant::now();
    let mut stopped = false;
    // Two stages, so the cores never wait for the store: a reader thread scans the next page
    // and does its RSA work while this thread writes the previous one, stores the cursor and
    // reports progress. The bounded channel keeps the reader at most one page ahead (and
    // behind the rate limit).
    std::thread::scope(|s| {
        let (tx, rx) = std::sync::mpsc::sync_channel::<Result<Page, StoreError>>(1);
        let from = cursor.clone();
        s.spawn(move || {
            let mut cursor = from;
            loop {
                let records = match store.scan_records(cursor.as_ref(), page) {
                    Ok(records) => records,
                    Err(e) => {
                        let _ = tx.send(Err(e));
                        return;
                    }
                };
                let Some(last) = records.last().map(|r| r.meta.id.clone()) else {
                    return;
                };
                let todo: Vec<Record> = records
                    .into_iter()
                    .filter(|r| r.key_version != target)
                    .collect();
                let wrapped = rewrap_records(&todo, ring, public, threads);
                cursor = Some(last.clone());
                if tx
                    .send(Ok(Page {
                        todo,
                        wrapped,
                        last,
                    }))
                    .is_err()
                {
                    return; // the writer stopped on an error
                }
            }
        });
        for next in rx {
            let Page {
                todo,
                wrapped,
                last,
            } = next?;
            if let Some(l) = limit {
                let wait = next_write.saturating_duration_since(Instant::now());
                if !wait.is_zero() {
                    std::thread::sleep(wait);
                }
                next_write = Instant::now().max(next_write)
                    + Duration::from_secs_f64(todo.len() as f64 / f64::from(l));
            }
            let items = replacements(&todo, wrapped, target, &mut p);
            let outcomes = store.replace_envelopes(&items, now())?;
            // Retry each conflicting record once after re-reading it; a second conflict means
            // it is being written right now by someone who seals under the active key anyway.
            let mut retry = Vec::new();
            for (item, outcome) in items.iter().zip(outcomes) {
                match outcome {
                    Ok(_) => p.rewrapped += 1,
                    Err(StoreError::VersionMismatch { .. }) => {
                        p.conflicts += 1;
                        match store.get_record(&item.id)? {
                            Some(r) if r.key_version != target => retry.push(r),
                            _ => p.skipped += 1,
                        }
                    }
                    Err(_) => p.skipped += 1,
                }
            }
            if !retry.is_empty() {
                let wrapped = rewrap_records(&retry, ring, public, 1);
                let items = replacements(&retry, wrapped, target, &mut p);
                for outcome in store.replace_envelopes(&items, now())? {
                    match outcome {
                        Ok(_) => p.rewrapped += 1,
                        Err(_) => p.skipped += 1,
                    }
                }
            }
            store.put_meta(REWRAP_CURSOR, Some(&encode_cursor(target, &last)))?;
            p.elapsed = start.elapsed();
            if on_progress(&p).is_break() {
                // Dropping the receiver makes the reader stop at its next send.
                stopped = true;
                break;
            }
        }
        Ok::<_, RotationError>(())
    })?;
    if stopped {
        p.elapsed = start.elapsed();
        return Ok(p);
    }
    store.put_meta(REWRAP_CURSOR, None)?;
    p.done = true;
    p.elapsed = start.elapsed();
    // The run is over: a caller that went away now changes nothing.
    let _ = on_progress(&p);
    Ok(p)
}

/// One scanned page: the records to move, their new envelopes (in the same order) and the
/// last id scanned, which becomes the cursor once the page is written.
struct Page {
    todo: Vec<Record>,
    wrapped: Vec<Result<Vec<u8>, RewrapError>>,
    last: RecordId,
}

/// Rewraps `records` on `threads` threads, each taking the next record as it finishes (a
/// preempted thread does not leave the others idle at the end of the page); results are in
/// the order of `records`.
fn rewrap_records(
    records: &[Record],
    ring: &Keyring,
    to: &dyn Wrapper,
    threads: usize,
) -> Vec<Result<Vec<u8>, RewrapError>> {
    let next = std::sync::atomic::AtomicUsize::new(0);
    let work = || {
        let mut done = Vec::new();
        loop {
            let i = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            let Some(r) = records.get(i) else {
                return done;
            };
            let keys = ring as &dyn UnwrapperLookup;
            done.push((i, envelope::rewrap(&r.meta, &r.envelope, keys, to)));
        }
    };
    let mut results: Vec<_> = std::thread::scope(|s| {
        let helpers: Vec<_> = (1..threads.min(records.len()))
            .map(|_| s.spawn(work))
            .collect();
        let mut all = work();
        for h in helpers {
            all.extend(h.join().expect("rewrap worker does not panic"));
        }
        all
    });
    results.sort_unstable_by_key(|(i, _)| *i);
    results.into_iter().map(|(_, r)| r).collect()
}

/// The store writes for a page's successful rewraps; failures are counted and logged.
fn replacements(
    todo: &[Record],
    wrapped: Vec<Result<Vec<u8>, RewrapError>>,
    target: u32,
    p: &mut RewrapProgress,
) -> Vec<EnvelopeReplace> {
    let mut items = Vec::with_capacity(todo.len());
    for (r, result) in todo.iter().zip(wrapped) {
        match result {
            Ok(envelope) => items.push(EnvelopeReplace {
                id: r.meta.id.clone(),
                expected_version: r.version,
                envelope,
                key_version: target,
            }),
            Err(e) => {
                p.failed += 1;
                tracing::warn!(record = %r.meta.id, error = %e, "record not rewrapped");
            }
        }
    }
    items
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
    Ok(store.records_under_key(version)?)
}

/// Marks a decrypt-only version retired, writing `audit` in the same batch. Refused while any
/// record still uses it.
pub fn retire(
    store: &dyn TokenStore,
    version: u32,
    now: i64,
    audit: &AuditAppend,
) -> Result<KeyInfo, RotationError> {
    // Retiring again rewrites the same entry (so the audit event lands with it).
    let mut key = find_in(
        store,
        version,
        &[KeyState::DecryptOnly, KeyState::Retired],
        "retire",
        "decrypt-only",
    )?;
    key.state = KeyState::Retired;
    key.updated_at = now;
    // Atomic with record writes: none can land under the version once it is retired.
    store.retire_key(&key, audit).map_err(|e| match e {
        StoreError::KeyInUse { version, records } => {
            RotationError::RecordsRemain { version, records }
        }
        other => other.into(),
    })?;
    Ok(key)
}

/// What asking to destroy a version did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Destroy {
    /// Scheduled (or already scheduled): pending destruction until `destroy_after`.
    Scheduled(KeyInfo),
    /// Destroyed already; its private key erased again if any of it was left.
    Destroyed(KeyInfo),
}

/// The registry entry of `version` if destroying it may be asked for: retired, pending
/// destruction, or destroyed already.
fn find_destroyable(store: &dyn TokenStore, version: u32) -> Result<KeyInfo, RotationError> {
    find_in(
        store,
        version,
        &[
            KeyState::Retired,
            KeyState::PendingDestruction,
            KeyState::Destroyed,
        ],
        "destroy",
        "retired",
    )
}

/// Schedules the destruction of a retired version at `due`, with `audit` in the same write:
/// it is pending destruction from now on (it opens nothing, as when retired) and the due run
/// ([`destroy_due`]) destroys it. Asked again while pending, the same entry is written again
/// with its date unchanged (so the audit event lands with it); asked for a destroyed version,
/// the entry is written again and nothing else changes. Refused while records still use it:
/// checked here as at retirement, so an envelope that slipped in under a retiring key never
/// loses its only private key.
pub fn schedule_destroy(
    store: &dyn TokenStore,
    version: u32,
    now: i64,
    due: i64,
    audit: &AuditAppend,
) -> Result<KeyInfo, RotationError> {
    let mut key = find_destroyable(store, version)?;
    if key.state == KeyState::Retired {
        ensure_unused(store, version)?;
        key.state = KeyState::PendingDestruction;
        key.destroy_after = Some(due);
        key.updated_at = now;
    }
    store.put_keys(std::slice::from_ref(&key), audit, &[])?;
    Ok(key)
}

/// Returns a version pending destruction to retired, with `audit` in the same write; refused
/// once its destruction is due (the due run may be destroying it on another daemon).
pub fn cancel_destroy(
    store: &dyn TokenStore,
    version: u32,
    now: i64,
    audit: &AuditAppend,
) -> Result<KeyInfo, RotationError> {
    let mut key = find_in(
        store,
        version,
        &[KeyState::PendingDestruction],
        "cancel-destroy",
        "pending-destruction",
    )?;
    let due = key.destroy_after.unwrap_or(i64::MIN);
    if now >= due {
        return Err(RotationError::DestructionDue { version, due });
    }
    key.state = KeyState::Retired;
    key.destroy_after = None;
    key.updated_at = now;
    store.put_keys(std::slice::from_ref(&key), audit, &[])?;
    Ok(key)
}

/// Destroys a version whose destruction is due (or destroyed already): the registry first,
/// with `audit` in the same write, then the private key is erased (file, shared store row,
/// token objects). In that order a crash or a failed erase leaves an audited destruction
/// whose key material is still to be erased (the due run erases it again), never an erased key
/// whose destruction is not on record. Refused before the due time.
pub fn destroy_due(
    store: &dyn TokenStore,
    dir: &KeyDir,
    version: u32,
    now: i64,
    audit: &AuditAppend,
) -> Result<KeyInfo, RotationError> {
    let key = write_destroyed(store, version, now, audit, None)?;
    dir.erase(version, &key.id)?;
    Ok(key)
}

/// The registry write of [`destroy_due`], with the `key.destroyed` webhook if `events` makes
/// one (only when the version goes from pending to destroyed, not when an erase is repeated).
fn write_destroyed(
    store: &dyn TokenStore,
    version: u32,
    now: i64,
    audit: &AuditAppend,
    events: Option<&KeyEvents<'_>>,
) -> Result<KeyInfo, RotationError> {
    let mut key = find_in(
        store,
        version,
        &[KeyState::PendingDestruction, KeyState::Destroyed],
        "destroy",
        "pending-destruction",
    )?;
    let mut outbox = Vec::new();
    if key.state == KeyState::PendingDestruction {
        let due = key.destroy_after.unwrap_or(i64::MAX);
        if now < due {
            return Err(RotationError::NotDue { version, due });
        }
        ensure_unused(store, version)?;
        key.state = KeyState::Destroyed;
        key.destroy_after = None;
        key.updated_at = now;
        if let Some(events) = events {
            outbox = events(crate::webhook::EventType::KeyDestroyed, &key);
        }
    }
    // Written even when already destroyed, so the audit event lands with the registry entry.
    store.put_keys(std::slice::from_ref(&key), audit, &outbox)?;
    Ok(key)
}

/// The active version's algorithm (RSA-2048 for a registry without one), which a rotation that
/// names no algorithm follows ([`KeyDir::rotation_algorithm`]).
pub fn active_algorithm(keys: &[KeyInfo]) -> crate::keys::Algorithm {
    keys.iter()
        .find(|k| k.state == KeyState::Active)
        .and_then(|k| crate::keys::spki_algorithm(&k.spki_der))
        .map_or(crate::keys::Algorithm::Rsa(2048), |(a, _)| a)
}

fn store_err(e: StoreError) -> KeyError {
    KeyError::Store(e.to_string())
}

/// Creates key version 1 with a fresh RSA-2048 key, without an audit event (tests and benches
/// seed keyrings with it; the daemon and `tokenvault keys` go through [`KeyService`]). Refuses
/// if the registry has any version.
#[cfg(any(test, feature = "testing"))]
pub fn init(store: &dyn TestHooks, dir: &KeyDir, now: i64) -> Result<KeyInfo, KeyError> {
    let existing = store.keys().map_err(store_err)?;
    if !existing.is_empty() {
        return Err(KeyError::AlreadyInitialized(existing.len()));
    }
    add_version(
        store,
        dir,
        dir.generate(crate::keys::Algorithm::Rsa(2048))?,
        now,
    )
}

/// Adds `key` as the next version and makes it active; the previously active version becomes
/// decrypt-only. The key file is written before the registry, so a crash in between leaves
/// at most an unused file, never a registered version without its key.
#[cfg(any(test, feature = "testing"))]
pub fn add_version(
    store: &dyn TestHooks,
    dir: &KeyDir,
    key: impl Into<NewKey>,
    now: i64,
) -> Result<KeyInfo, KeyError> {
    let key = key.into();
    let file = dir.prepare(&key)?;
    let (info, writes) = next_version(store, dir, key.public_key(), &file, now)?;
    store.put_keys_unaudited(&writes).map_err(store_err)?;
    Ok(info)
}

/// [`add_version`] of a key [`KeyDir::prepare`]d as `file`, writing `audit` in the same atomic
/// registry write.
pub fn add_version_audited(
    store: &dyn TokenStore,
    dir: &KeyDir,
    key: &PublicKey,
    file: &crate::keys::keyring::KeyFile,
    now: i64,
    audit: &AuditAppend,
    events: Option<&KeyEvents<'_>>,
) -> Result<KeyInfo, KeyError> {
    let (info, writes) = next_version(store, dir, key, file, now)?;
    let outbox = events.map_or_else(Vec::new, |e| {
        e(crate::webhook::EventType::KeyRotated, &info)
    });
    store.put_keys(&writes, audit, &outbox).map_err(store_err)?;
    Ok(info)
}

/// Makes the outbox entries (webhooks) of a key change: a rotation or a destruction.
pub type KeyEvents<'a> = dyn Fn(crate::webhook::EventType, &KeyInfo) -> Vec<(String, Vec<u8>)> + 'a;

/// The next version of the registry for `key` (its key file written as `file`) and the
/// registry entries to write: it, active, and the previously active ones, decrypt-only.
fn next_version(
    store: &dyn TokenStore,
    dir: &KeyDir,
    key: &PublicKey,
    file: &crate::keys::keyring::KeyFile,
    now: i64,
) -> Result<(KeyInfo, Vec<KeyInfo>), KeyError> {
    let existing = store.keys().map_err(store_err)?;
    let id = key.id();
    if let Some(dup) = existing.iter().find(|k| k.id == id) {
        return Err(KeyError::Duplicate(dup.version));
    }
    let mut version = existing.iter().map(|k| k.version).max().unwrap_or(0) + 1;
    // In a shared store, a private key without its registry entry is what a daemon that died
    // between the two writes leaves behind; its version number is skipped, never reused.
    while dir.is_shared() && dir.has_private(version) {
        version += 1;
    }
    dir.write_prepared(version, file)?;
    let info = KeyInfo {
        version,
        id,
        state: KeyState::Active,
        created_at: now,
        updated_at: now,
        spki_der: key.spki_der().to_vec(),
        destroy_after: None,
    };
    let mut writes: Vec<KeyInfo> = existing
        .into_iter()
        .filter(|k| k.state == KeyState::Active)
        .map(|mut k| {
            k.state = KeyState::DecryptOnly;
            k.updated_at = now;
            k
        })
        .collect();
    writes.push(info.clone());
    Ok((info, writes))
}

/// The audited key service: every key lifecycle change (a new version, retirement,
/// destruction) is written in one atomic store write together with its audit event, chained
/// after every other event of the trail. The daemon's `RotateKey` / `RetireKey` /
/// `DestroyKey`, its automatic rotation, the dev profile's first key and the offline
/// `tokenvault keys` commands all go through it, so no key change escapes the audit trail.
pub struct KeyService<'a> {
    store: &'a dyn TokenStore,
    dir: &'a KeyDir,
    audit: &'a crate::audit::Auditor,
    /// The webhooks of rotations and destructions, when the daemon sends any.
    events: Option<Box<KeyEvents<'a>>>,
}

impl std::fmt::Debug for KeyService<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KeyService").finish_non_exhaustive()
    }
}

impl<'a> KeyService<'a> {
    /// The service over a store, its key directory and its audit trail.
    pub fn new(
        store: &'a dyn TokenStore,
        dir: &'a KeyDir,
        audit: &'a crate::audit::Auditor,
    ) -> Self {
        Self {
            store,
            dir,
            audit,
            events: None,
        }
    }

    /// The same service, writing `events`' outbox entries (the `key.rotated` and
    /// `key.destroyed` webhooks) in the registry write of a rotation or a destruction.
    #[must_use]
    pub fn with_events(self, events: Box<KeyEvents<'a>>) -> Self {
        Self {
            events: Some(events),
            ..self
        }
    }

    /// Runs `change`, which writes `draft`'s sealed event in its one registry write.
    fn recorded(
        &self,
        draft: &crate::audit::Draft,
        change: impl FnOnce(&AuditAppend) -> Result<KeyInfo, RotationError>,
    ) -> Result<KeyInfo, RotationError> {
        self.audit.append_with(draft, |a| Ok((change(a)?, true)))
    }

    /// Adds `key` as the new active version ([`add_version`]), with `draft` in the same write.
    pub fn add_version(
        &self,
        draft: &crate::audit::Draft,
        key: impl Into<NewKey>,
        now: i64,
    ) -> Result<KeyInfo, RotationError> {
        let key = key.into();
        // The passphrase's scrypt runs before the audited write, not inside it.
        let file = self.dir.prepare(&key)?;
        self.recorded(draft, |a| {
            Ok(add_version_audited(
                self.store,
                self.dir,
                key.public_key(),
                &file,
                now,
                a,
                self.events.as_deref(),
            )?)
        })
    }

    /// Creates version 1 with a fresh key of `algorithm`; refuses a registry that has any
    /// version, and then changes nothing.
    pub fn init(
        &self,
        draft: &crate::audit::Draft,
        algorithm: crate::keys::Algorithm,
        now: i64,
    ) -> Result<KeyInfo, RotationError> {
        let existing = self.store.keys()?;
        if !existing.is_empty() {
            return Err(KeyError::AlreadyInitialized(existing.len()).into());
        }
        self.add_version(draft, self.dir.generate(algorithm)?, now)
    }

    /// Adds a fresh key as the new active version: of `algorithm`, or following the active
    /// version's ([`KeyDir::rotation_algorithm`]: a store moved to X-Wing stays there when
    /// rotated without naming one).
    pub fn rotate(
        &self,
        draft: &crate::audit::Draft,
        algorithm: Option<crate::keys::Algorithm>,
        now: i64,
    ) -> Result<KeyInfo, RotationError> {
        let algorithm = match algorithm {
            Some(a) => a,
            None => self
                .dir
                .rotation_algorithm(active_algorithm(&self.store.keys()?)),
        };
        self.add_version(draft, self.dir.generate(algorithm)?, now)
    }

    /// Retires a decrypt-only version ([`retire`]), with `draft` in the same write.
    pub fn retire(
        &self,
        draft: &crate::audit::Draft,
        version: u32,
        now: i64,
    ) -> Result<KeyInfo, RotationError> {
        self.recorded(draft, |a| retire(self.store, version, now, a))
    }

    /// Asks for the destruction of `version` ([`schedule_destroy`]): a retired version becomes
    /// pending destruction until `now + waiting_seconds`; a destroyed one has its private key
    /// erased again if any of it is left. `draft` goes in the same write.
    pub fn destroy(
        &self,
        draft: &crate::audit::Draft,
        version: u32,
        now: i64,
        waiting_seconds: i64,
    ) -> Result<Destroy, RotationError> {
        let key = self.recorded(draft, |a| {
            schedule_destroy(
                self.store,
                version,
                now,
                now.saturating_add(waiting_seconds),
                a,
            )
        })?;
        if key.state == KeyState::Destroyed {
            self.dir.erase(version, &key.id)?;
            return Ok(Destroy::Destroyed(key));
        }
        Ok(Destroy::Scheduled(key))
    }

    /// Cancels a pending destruction ([`cancel_destroy`]), with `draft` in the same write.
    pub fn cancel_destroy(
        &self,
        draft: &crate::audit::Draft,
        version: u32,
        now: i64,
    ) -> Result<KeyInfo, RotationError> {
        self.recorded(draft, |a| cancel_destroy(self.store, version, now, a))
    }

    /// Destroys a version whose destruction is due ([`destroy_due`]), with `draft` in the same
    /// write. The audited registry write goes first, and the chain advances with it even if
    /// the erase fails, since the event is stored.
    pub fn destroy_due(
        &self,
        draft: &crate::audit::Draft,
        version: u32,
        now: i64,
    ) -> Result<KeyInfo, RotationError> {
        let key = self.recorded(draft, |a| {
            write_destroyed(self.store, version, now, a, self.events.as_deref())
        })?;
        self.dir.erase(version, &key.id)?;
        Ok(key)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::keys::PrivateKey;
    use crate::record::{RecordMeta, SecretKind};
    use crate::secret::Secret;
    use crate::store::prelude::*;
    use crate::store::{MemoryStore, RecordWrite};

    /// A store with `n` records `r00`.. sealed under version 1, then version 2 made active.
    fn rotated(n: usize) -> (MemoryStore, Keyring, tempfile::TempDir) {
        let tmp = tempfile::tempdir().expect("tempdir");
        let dir = KeyDir::new(tmp.path(), None);
        let store = MemoryStore::new();
        init(&store, &dir, 10).expect("init");
        let ring1 = Keyring::load(store.keys().expect("keys"), &dir).expect("load");
        let writes: Vec<RecordWrite> = (0..n)
            .map(|i| {
                let meta =
                    RecordMeta::parse(&format!("r{i:02}"), "o", "p", SecretKind::ApiKey, &[], 0)
                        .expect("valid");
                let secret = Secret::new(format!("secret-{i}").into_bytes());
                let envelope = envelope::seal(&meta, &secret, ring1.active().1).expect("seal");
                RecordWrite {
                    meta,
                    envelope,
                    key_version: 1,
                    expected_version: 0,
                }
            })
            .collect();
        store.put_records(&writes, 10).expect("put");
        add_version(&store, &dir, PrivateKey::generate().expect("gen"), 20).expect("rotate");
        let ring = Keyring::load(store.keys().expect("keys"), &dir).expect("load");
        (store, ring, tmp)
    }

    fn opts(page: usize, threads: usize) -> RewrapOptions {
        RewrapOptions {
            page,
            threads,
            max_per_second: None,
        }
    }

    #[test]
    fn rewraps_every_page_and_leaves_a_record_that_does_not_open() {
        let (store, ring, _tmp) = rotated(11);
        // Bind r05's envelope to another record: it no longer opens, so it must be counted as
        // failed and left exactly as it was while every other record moves.
        let r04 = store
            .get_record(&RecordId::parse("r04").expect("id"))
            .expect("get")
            .expect("r04");
        let r05 = store
            .get_record(&RecordId::parse("r05").expect("id"))
            .expect("get")
            .expect("r05");
        store
            .put_records(
                &[RecordWrite {
                    meta: r05.meta.clone(),
                    envelope: r04.envelope.clone(),
                    key_version: 1,
                    expected_version: r05.version,
                }],
                15,
            )
            .expect("corrupt r05");
        let mut reports = Vec::new();
        let p = rewrap_all(
            &store,
            &ring,
            opts(3, 2),
            || 30,
            |p| {
                reports.push(p.clone());
                ControlFlow::Continue(())
            },
        )
        .expect("rewrap");
        assert_eq!((p.total, p.rewrapped, p.failed, p.skipped), (11, 10, 1, 0));
        assert!(p.done);
        // One report per page of 3 (11 records: 4 pages), then the final one.
        assert_eq!(reports.len(), 5);
        assert_eq!(
            reports.iter().map(|r| r.rewrapped).collect::<Vec<_>>(),
            vec![3, 5, 8, 10, 10]
        );
        for r in store.scan_records(None, 100).expect("scan") {
            if r.meta.id.as_str() == "r05" {
                assert_eq!((r.key_version, &r.envelope), (1, &r04.envelope));
                continue;
            }
            assert_eq!(r.key_version, 2, "{}", r.meta.id);
            let i: usize = r.meta.id.as_str()[1..].parse().expect("index");
            let opened = envelope::open(&r.meta, &r.envelope, &ring).expect("opens");
            assert_eq!(opened.expose_secret(), format!("secret-{i}").as_bytes());
        }
        assert_eq!(store.get_meta(REWRAP_CURSOR).expect("meta"), None);
        // A second run finds nothing left to move but the record that does not open.
        let again = rewrap_all(
            &store,
            &ring,
            opts(3, 2),
            || 40,
            |_| ControlFlow::Continue(()),
        )
        .expect("rewrap");
        assert_eq!((again.total, again.rewrapped, again.failed), (1, 0, 1));
    }

    #[test]
    fn the_rate_limit_holds_with_the_reader_a_page_ahead() {
        let (store, ring, _tmp) = rotated(12);
        let limited = RewrapOptions {
            page: 2,
            threads: 2,
            max_per_second: Some(40),
        };
        let started = Instant::now();
        let mut seen = Vec::new();
        let p = rewrap_all(
            &store,
            &ring,
            limited,
            || 30,
            |p| {
                seen.push((p.rewrapped, started.elapsed()));
                ControlFlow::Continue(())
            },
        )
        .expect("rewrap");
        assert_eq!(p.rewrapped, 12);
        // However far ahead the reader computes, no page is written before its time: the
        // k-th report (2k records written) comes no earlier than 2(k-1)/40 s, the sleep
        // after the previous page.
        for (rewrapped, at) in &seen {
            let floor = Duration::from_secs_f64(rewrapped.saturating_sub(2) as f64 / 40.0);
            assert!(*at >= floor, "{rewrapped} written after {at:?}");
        }
        assert!(started.elapsed() >= Duration::from_millis(250));
    }

    /// `admin rewrap --max-per-second 200`: the rate holds over every one-second window of
    /// the run (within 10%), instead of a whole page at once and then a pause.
    #[test]
    fn a_paced_rewrap_holds_its_rate_over_any_one_second_window() {
        let (store, ring, _tmp) = rotated(500);
        let limit = 200u32;
        let paced = RewrapOptions {
            page: 512,
            threads: 2,
            max_per_second: Some(limit),
        };
        let started = Instant::now();
        let mut seen = vec![(0u64, Duration::ZERO)];
        let p = rewrap_all(
            &store,
            &ring,
            paced,
            || 30,
            |p| {
                seen.push((p.rewrapped, started.elapsed()));
                ControlFlow::Continue(())
            },
        )
        .expect("rewrap");
        assert_eq!(p.rewrapped, 500);
        // Records written by time t: the last report at or before t.
        let written_by = |t: Duration| {
            seen.iter()
                .take_while(|(_, at)| *at <= t)
                .last()
                .map_or(0, |(n, _)| *n)
        };
        let end = seen.last().expect("reports").1;
        assert!(
            end >= Duration::from_millis(2400),
            "500 records at 200/s took {end:?}"
        );
        let (low, high) = (f64::from(limit) * 0.9, f64::from(limit) * 1.1);
        let mut t = Duration::ZERO;
        while t + Duration::from_secs(1) <= end {
            let n = (written_by(t + Duration::from_secs(1)) - written_by(t)) as f64;
            assert!(
                (low..=high).contains(&n),
                "{n} records in the second after {t:?}; reports {seen:?}"
            );
            t += Duration::from_millis(10);
        }
    }

    /// A caller that goes away stops the run after the page in flight, even in the middle of a
    /// slow paced run; the cursor stays, so the next run resumes and finishes.
    #[test]
    fn a_break_from_progress_stops_the_run_and_leaves_it_resumable() {
        let (store, ring, _tmp) = rotated(40);
        let slow = RewrapOptions {
            page: 512,
            threads: 1,
            max_per_second: Some(4),
        };
        let started = Instant::now();
        let p = rewrap_all(
            &store,
            &ring,
            slow,
            || 30,
            |p| {
                if p.rewrapped >= 2 {
                    ControlFlow::Break(())
                } else {
                    ControlFlow::Continue(())
                }
            },
        )
        .expect("stopped");
        assert!(!p.done);
        assert_eq!(p.rewrapped, 2);
        // Well before the 10 s the whole paced run would take.
        assert!(
            started.elapsed() < Duration::from_secs(5),
            "{:?}",
            started.elapsed()
        );
        assert!(store.get_meta(REWRAP_CURSOR).expect("meta").is_some());
        let rest = rewrap_all(
            &store,
            &ring,
            opts(512, 2),
            || 40,
            |_| ControlFlow::Continue(()),
        )
        .expect("resumed");
        assert!(rest.done);
        assert_eq!(rest.rewrapped, 38);
    }

    #[test]
    fn resumes_after_the_stored_cursor() {
        let (store, ring, _tmp) = rotated(6);
        // A run that stopped after writing r02 left this cursor.
        let cursor = encode_cursor(2, &RecordId::parse("r02").expect("id"));
        store
            .put_meta(REWRAP_CURSOR, Some(&cursor))
            .expect("cursor");
        let p = rewrap_all(
            &store,
            &ring,
            opts(2, 3),
            || 30,
            |_| ControlFlow::Continue(()),
        )
        .expect("rewrap");
        assert_eq!(p.rewrapped, 3);
        let versions: Vec<u32> = store
            .scan_records(None, 100)
            .expect("scan")
            .iter()
            .map(|r| r.key_version)
            .collect();
        assert_eq!(versions, vec![1, 1, 1, 2, 2, 2]);
        // A cursor for another target version is ignored: the next run starts from the top.
        let stale = encode_cursor(7, &RecordId::parse("r04").expect("id"));
        store.put_meta(REWRAP_CURSOR, Some(&stale)).expect("cursor");
        let p = rewrap_all(
            &store,
            &ring,
            opts(4, 1),
            || 40,
            |_| ControlFlow::Continue(()),
        )
        .expect("rewrap");
        assert_eq!(p.rewrapped, 3);
    }
}

#[cfg(test)]
mod destruction_tests {
    use super::*;
    use crate::store::MemoryStore;
    use std::sync::Arc;

    const WEEK: i64 = 7 * 86_400;

    #[test]
    fn destruction_waits_is_cancellable_and_happens_only_when_due() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let dir = KeyDir::new(tmp.path(), None);
        let memory = MemoryStore::new();
        init(&memory, &dir, 10).expect("init");
        add_version(
            &memory,
            &dir,
            crate::keys::PrivateKey::generate().expect("gen"),
            20,
        )
        .expect("rotate");
        let store: Arc<dyn TokenStore> = Arc::new(memory);
        let audit = crate::audit::Auditor::open(Arc::clone(&store), tmp.path()).expect("audit");
        let keys = KeyService::new(&*store, &dir, &audit);
        let draft = |action| crate::audit::Draft::new("secteam", action);
        let file = tmp.path().join("v0001.key.pem");

        // Only a retired version may be scheduled.
        let e = keys
            .destroy(&draft("DestroyKey"), 1, 100, WEEK)
            .expect_err("decrypt-only");
        assert_eq!(
            e.to_string(),
            "key version 1 is decrypt-only; destroy needs a retired key"
        );
        keys.retire(&draft("RetireKey"), 1, 100).expect("retire");
        let Destroy::Scheduled(k) = keys
            .destroy(&draft("DestroyKey"), 1, 100, WEEK)
            .expect("schedule")
        else {
            panic!("scheduled, not destroyed");
        };
        assert_eq!(
            (k.state, k.destroy_after),
            (KeyState::PendingDestruction, Some(100 + WEEK))
        );
        // It opens nothing while pending, naming the state.
        let ring = Keyring::load(store.keys().expect("keys"), &dir).expect("load");
        assert!(matches!(
            ring.unwrapper(&k.id),
            Err(crate::keys::KeyLookupError::KeyUnavailable {
                version: 1,
                state: KeyState::PendingDestruction
            })
        ));
        // Asked again later: the date stands.
        let Destroy::Scheduled(again) = keys
            .destroy(&draft("DestroyKey"), 1, 5_000, WEEK)
            .expect("again")
        else {
            panic!("still pending");
        };
        assert_eq!(again.destroy_after, Some(100 + WEEK));
        // Not before the date.
        let e = keys
            .destroy_due(&draft("DestroyKey"), 1, 100 + WEEK - 1)
            .expect_err("early");
        assert!(
            matches!(e, RotationError::NotDue { version: 1, due } if due == 100 + WEEK),
            "{e}"
        );
        assert_eq!(
            e.to_string(),
            "key version 1 is pending destruction until 1970-01-08T00:01:40Z"
        );
        assert!(file.exists());
        // Cancelled: retired again, and the next request starts a new wait.
        let k = keys
            .cancel_destroy(&draft("CancelDestroyKey"), 1, 200)
            .expect("cancel");
        assert_eq!((k.state, k.destroy_after), (KeyState::Retired, None));
        assert!(matches!(
            keys.cancel_destroy(&draft("CancelDestroyKey"), 1, 201),
            Err(RotationError::WrongState { .. })
        ));
        keys.destroy(&draft("DestroyKey"), 1, 300, WEEK)
            .expect("schedule again");
        // Once due it can no longer be cancelled; the due run destroys it.
        assert!(matches!(
            keys.cancel_destroy(&draft("CancelDestroyKey"), 1, 300 + WEEK),
            Err(RotationError::DestructionDue { version: 1, .. })
        ));
        let k = keys
            .destroy_due(&draft("DestroyKey"), 1, 300 + WEEK)
            .expect("due");
        assert_eq!((k.state, k.destroy_after), (KeyState::Destroyed, None));
        assert!(!file.exists(), "private key erased");
        assert_eq!(store.keys().expect("keys")[0].state, KeyState::Destroyed);
        // Asking to destroy a destroyed version erases again and changes nothing else.
        assert!(matches!(
            keys.destroy(&draft("DestroyKey"), 1, 400 + WEEK, WEEK),
            Ok(Destroy::Destroyed(_))
        ));
        // The active version can be neither scheduled nor destroyed.
        assert!(matches!(
            keys.destroy(&draft("DestroyKey"), 2, 500, WEEK),
            Err(RotationError::WrongState { .. })
        ));
        assert!(matches!(
            keys.destroy_due(&draft("DestroyKey"), 2, 500 + WEEK),
            Err(RotationError::WrongState { .. })
        ));
    }
}
