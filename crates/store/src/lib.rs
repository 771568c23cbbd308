//! # tokenvault-store
//!
//! Storage of records and the key registry behind the [`TokenStore`] trait. Re-exported by
//! `tokenvault` as `tokenvault::store`.
//!
//! Owns: the traits, their error type, the mutation rules every engine applies, and the
//! engines: [`RocksStore`] (the embedded default), [`PostgresStore`] (shared by several
//! daemons) and [`MemoryStore`] (tests, benches). All pass the same conformance suite
//! ([`conformance`], feature `testing`), as does an engine written outside this crate.
//! Also `store copy` between engines ([`copy`]) and the export file ([`export`]).
//!
//! Must never: decrypt (it holds sealed envelopes and public key metadata only; it depends on
//! the sealing crate, never on private-key code), speak gRPC or HTTP, or write a record change
//! without its audit event ([`StoreError::Unaudited`]).
//!
//! Architecture invariant: no RocksDB type appears in this file or in the trait; only
//! `store/rocks.rs` imports `rocksdb`, so another engine can implement [`TokenStore`].
//! Invariant: an acknowledged write is durable (WAL synced) and a batch is all-or-nothing.
//!
//! Feature `testing`: [`TestHooks`] (unaudited seeding, audit tampering) and [`conformance`],
//! for tests and benches only; the daemon is built without it.

#![forbid(unsafe_code)]

// The sealing crate's modules under the names the daemon crate re-exports them as, so this
// crate's paths (`crate::keys::KeyInfo`) read as they do there.
use tokenvault_envelope::{envelope, keys, record};

pub mod copy;
pub mod export;
mod memory;
pub mod postgres;
pub(crate) mod rocks;
mod rules;
mod schema;

use std::sync::Arc;

use thiserror::Error;

/// The store's traits, brought into scope unnamed (`use tokenvault::store::prelude::*;`), for
/// code that calls an engine's methods on the engine's own type rather than a `dyn TokenStore`.
pub mod prelude {
    #[cfg(any(test, feature = "testing"))]
    pub use super::TestHooks as _;
    pub use super::{
        AuditLog as _, KeyRegistry as _, Leases as _, MetaStore as _, RecordStore as _,
        TokenStore as _, Transfer as _,
    };
}

pub use memory::MemoryStore;
pub use postgres::{PostgresOptions, PostgresStore};
pub use rocks::RocksStore;
pub use schema::{decode_record, encode_record};

use crate::keys::KeyInfo;
use crate::record::{Owner, Record, RecordId, RecordMeta};

/// Why a store operation failed.
///
/// Not `#[non_exhaustive]`: the daemon maps every variant to a status exhaustively, and the
/// workspace's crates are released together, so a new variant fails that build, not a request.
#[derive(Debug, Error, Clone, PartialEq, Eq)]
pub enum StoreError {
    /// No record with this id.
    #[error("no record with id {0}")]
    NotFound(String),
    /// A create found the id taken.
    #[error("record {0} already exists")]
    AlreadyExists(String),
    /// A replace found another version than expected.
    #[error("record {id} is at version {actual}, not the expected {expected}")]
    VersionMismatch {
        /// Record id.
        id: String,
        /// Version the writer expected.
        expected: u64,
        /// Version found (0 if absent).
        actual: u64,
    },
    /// Two writes in one batch name the same id.
    #[error("record {0} appears twice in one batch")]
    DuplicateInBatch(String),
    /// Stored bytes did not decode.
    #[error("stored data is corrupt: {0}")]
    Corrupt(String),
    /// The engine failed (I/O, ...).
    #[error("storage engine: {0}")]
    Engine(String),
    /// The store is held by another process (RocksDB's lock on its directory).
    #[error("the data directory {0} is in use by another tokenvault process")]
    Locked(String),
    /// A record write names a key version the registry marks retired or destroyed.
    #[error("key version {version} is {state}; records cannot be written under it")]
    KeyNotAccepted {
        /// Version.
        version: u32,
        /// Its state in the registry.
        state: keys::KeyState,
    },
    /// A compare-and-swap found another value than expected (e.g. a grant used concurrently).
    #[error("{0} changed concurrently")]
    Conflict(String),
    /// A record change came without its audit event (a caller's defect, refused by every
    /// engine before anything is written).
    #[error("a record change came without its audit event; nothing was written")]
    Unaudited,
    /// The database cannot be reached right now (down, restarting, out of connections); the
    /// same call may succeed later. Nothing was written.
    #[error("the database is unavailable: {0}")]
    Unavailable(String),
    /// The database was migrated by a newer tokenvault than this one.
    #[error(
        "the database schema is at version {found}, newer than the {supported} this tokenvault knows; run the newer tokenvault or restore a matching backup"
    )]
    SchemaTooNew {
        /// Version found in the database.
        found: i32,
        /// Newest version this build knows.
        supported: i32,
    },
    /// A key version cannot be retired while records use it.
    #[error("key version {version} still wraps {records} record(s); run Admin.Rewrap first")]
    KeyInUse {
        /// Version.
        version: u32,
        /// How many records.
        records: u64,
    },
}

/// One change of an atomic, audited write ([`RecordStore::apply`]).
#[derive(Debug, Clone)]
pub enum Mutation {
    /// Creates or replaces a record, version-checked like [`TestHooks::put_records`].
    PutRecord(RecordWrite),
    /// Marks a record revoked (no change if it already is); `NotFound` if absent.
    Revoke(RecordId),
    /// Deletes a record, physically purged after the write; `NotFound` if absent.
    DeleteRecord(RecordId),
    /// Marks a record as needing re-authorization if it is still at `expected_version`.
    MarkNeedsReauth {
        /// Record id.
        id: RecordId,
        /// The version the caller read.
        expected_version: u64,
    },
    /// Stores or replaces a grant (docs/PROXY.md) under its id.
    PutGrant {
        /// The grant id (hex SHA-256 of the handle).
        id: String,
        /// The encoded grant.
        grant: Vec<u8>,
        /// Compare-and-swap: the grant as it was read (`None`: it must not exist yet);
        /// `Conflict` if another writer changed it meanwhile, so a use count holds under
        /// concurrent uses (and across daemons sharing a store).
        expected: Option<Vec<u8>>,
    },
    /// Deletes a grant; nothing if there is none.
    DeleteGrant(String),
    /// Stores, replaces or (with `request: None`) removes a pending admin approval request
    /// (the two-person rule) under its id; compare-and-swap on `expected` (the request as it
    /// was read, `None`: it must not exist yet), `Conflict` if another writer changed it, so
    /// one request is never approved into action twice.
    PutApproval {
        /// The request id (32 hex digits).
        id: String,
        /// The encoded request; `None` removes it.
        request: Option<Vec<u8>>,
        /// Compare-and-swap: the request as it was read.
        expected: Option<Vec<u8>>,
    },
    /// Stores a vault-wide setting an admin changes at run time (`min_decrypt_version`) under
    /// its name; compare-and-swap on `expected` (the value as read, `None`: unset), `Conflict`
    /// if another daemon changed it meanwhile.
    PutSetting {
        /// The setting's name.
        name: String,
        /// Its new value.
        value: Vec<u8>,
        /// Compare-and-swap: the value as it was read.
        expected: Option<Vec<u8>>,
    },
    /// Creates, replaces or (with `value: None`) removes an outbox entry (a webhook delivery,
    /// docs/WEBHOOKS.md) under its key; compare-and-swap on `expected` (the entry as read,
    /// `None`: it must not exist yet), `Conflict` if another writer changed it. Written in the
    /// same atomic write as the change the event reports, so a crash neither loses nor invents
    /// an event; a deliverer that lost its lease cannot overwrite another's outcome.
    PutOutbox {
        /// The entry's key under [`OUTBOX_PREFIX`].
        key: String,
        /// The encoded entry; `None` removes it.
        value: Option<Vec<u8>>,
        /// Compare-and-swap: the entry as it was read.
        expected: Option<Vec<u8>>,
    },
    /// Records that a security event was applied; `AlreadyExists` if it was before, so an
    /// event is applied once.
    PutReplayMarker {
        /// Hex SHA-256 of the issuer and the event's `jti`.
        key: String,
        /// When it was applied, Unix seconds.
        at: i64,
    },
}

/// Metadata key of a grant; the one layout both stores use.
pub(crate) fn grant_key(id: &str) -> String {
    format!("grant/{id}")
}

/// Metadata key of a run-time setting ([`Mutation::PutSetting`]).
pub fn setting_key(name: &str) -> String {
    format!("setting/{name}")
}

/// Metadata key of a pending approval request (the two-person rule).
pub fn approval_key(id: &str) -> String {
    format!("approval/{id}")
}

/// Prefix of every outbox entry's metadata key ([`Mutation::PutOutbox`]).
pub const OUTBOX_PREFIX: &str = "outbox/";

/// Metadata key of an outbox entry.
pub fn outbox_key(key: &str) -> String {
    format!("{OUTBOX_PREFIX}{key}")
}

/// Metadata key of a security-event replay marker.
pub(crate) fn replay_key(key: &str) -> String {
    format!("{REPLAY_PREFIX}{key}")
}

/// Prefix of every replay marker's metadata key.
pub(crate) const REPLAY_PREFIX: &str = "set_jti/";

/// The first 12 hex digits of an id, as logs and messages show grant ids.
pub(crate) fn short_id(id: &str) -> &str {
    id.get(..12).unwrap_or(id)
}

/// Prefix of every grant's metadata key.
pub(crate) const GRANT_PREFIX: &str = "grant/";

/// One record write: create (`expected_version == 0`) or replace the record at that version.
#[derive(Debug, Clone)]
pub struct RecordWrite {
    /// Record metadata.
    pub meta: RecordMeta,
    /// Sealed envelope.
    pub envelope: Vec<u8>,
    /// Key version named by the envelope's fingerprint.
    pub key_version: u32,
    /// 0 to create; otherwise the version being replaced.
    pub expected_version: u64,
}

/// Seals the audit events of what a group commit accepted ([`RecordStore::put_record_groups`]).
pub trait GroupAudit: Send + Sync {
    /// The events of `accepted` (each accepted group's index and the records it writes, in
    /// order), as consecutive audit chain links to write with them. A store that re-runs its
    /// transaction calls it again; only the last call's events may be written.
    fn seal(&self, accepted: &[(usize, &[Record])]) -> Vec<AuditAppend>;
}

/// The events `audit` seals for the groups a commit accepted (none when it accepted none), as
/// every engine's `put_record_groups` writes them.
/// `Unaudited` if records were accepted and `audit` sealed no event for them: a record change
/// without its audit event is never written, whatever the sealer.
pub(crate) fn seal_accepted(
    audit: &dyn GroupAudit,
    accepted: &[(usize, Vec<Record>)],
) -> Result<Vec<AuditAppend>, StoreError> {
    if accepted.iter().all(|(_, r)| r.is_empty()) {
        return Ok(Vec::new());
    }
    let views: Vec<(usize, &[Record])> = accepted.iter().map(|(i, r)| (*i, r.as_slice())).collect();
    let events = audit.seal(&views);
    if events.is_empty() {
        return Err(StoreError::Unaudited);
    }
    Ok(events)
}

/// A record read awaited on an async executor ([`RecordStore::read_record`]).
pub type RecordRead =
    std::pin::Pin<Box<dyn Future<Output = Result<Option<Record>, StoreError>> + Send + 'static>>;

/// One encoded audit event and its position in the hash chain (see `audit`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AuditAppend {
    /// Sequence number, 1 for the first event.
    pub seq: u64,
    /// The encoded event.
    pub bytes: Vec<u8>,
}

/// One rewrapped envelope to store, see [`RecordStore::replace_envelopes`].
#[derive(Debug, Clone)]
pub struct EnvelopeReplace {
    /// Record id.
    pub id: RecordId,
    /// Version the envelope was read at.
    pub expected_version: u64,
    /// The rewrapped envelope.
    pub envelope: Vec<u8>,
    /// Key version that now wraps the data key.
    pub key_version: u32,
}

/// State written as it is by [`Transfer::import`] (`tokenvault store copy`): records keep
/// their versions and times, audit events their chain and sequence number.
#[derive(Debug, Clone, Default)]
pub struct Import {
    /// Records, created or overwritten whole.
    pub records: Vec<Record>,
    /// Key registry entries, created or overwritten.
    pub keys: Vec<KeyInfo>,
    /// Metadata as [`Transfer::meta_page`] lists it (grants and replay markers included).
    pub meta: Vec<(String, Vec<u8>)>,
    /// Audit events: chain name, sequence number, encoded event.
    pub audit: Vec<(String, u64, Vec<u8>)>,
}

impl Import {
    /// Whether there is nothing to write.
    pub fn is_empty(&self) -> bool {
        self.records.is_empty()
            && self.keys.is_empty()
            && self.meta.is_empty()
            && self.audit.is_empty()
    }
}

/// Value of a replay marker in [`Transfer::meta_page`]: when it was applied, Unix seconds,
/// big-endian (RocksDB's and memory's stored form; PostgreSQL's column is converted).
pub(crate) fn replay_value(at: i64) -> [u8; 8] {
    at.to_be_bytes()
}

/// Aggregate counts for `Admin.Stats`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct StoreStats {
    /// Number of records.
    pub records: u64,
    /// Number of revoked records.
    pub revoked: u64,
    /// Number of records whose owner must authorize again.
    pub needs_reauth: u64,
    /// Records per key version, ascending by version.
    pub per_key_version: Vec<(u32, u64)>,
}

/// Records and the key registry. All methods are blocking; async callers run them on a
/// blocking pool.
///
/// The parts, each one cohesive interface: [`RecordStore`], [`MetaStore`], [`KeyRegistry`], [`AuditLog`], [`Leases`], [`Transfer`]. Every engine implements them all; callers hold a `dyn TokenStore`.
pub trait TokenStore: RecordStore + MetaStore + KeyRegistry + AuditLog + Leases + Transfer {}

impl<T: RecordStore + MetaStore + KeyRegistry + AuditLog + Leases + Transfer> TokenStore for T {}

/// Records: create, replace, revoke, delete, read, count and scan them, and the atomic audited write of every state change ([`RecordStore::apply`]). Blocking; async callers run it on a blocking pool.
pub trait RecordStore: Send + Sync + 'static {
    /// Group commit: applies several independent requests (each an atomic group following
    /// [`TestHooks::put_records`]' rules) with one durable write. Groups are planned in order,
    /// each seeing the groups accepted before it, and each gets its own outcome; a refused group
    /// changes nothing. The events `audit` seals for the accepted groups' records are written in
    /// the same atomic write, so no record is created or replaced without its event. The outer
    /// error is an engine failure (nothing written).
    fn put_record_groups(
        &self,
        groups: &[&[RecordWrite]],
        now: i64,
        audit: Arc<dyn GroupAudit>,
    ) -> Result<Vec<Result<Vec<u64>, StoreError>>, StoreError>;

    /// Reads one record.
    fn get_record(&self, id: &RecordId) -> Result<Option<Record>, StoreError>;

    /// Reads one record without blocking the calling thread, for an async caller: `Some` where
    /// the engine answers reads on a task of its own (PostgreSQL, over the network), so the
    /// caller awaits the answer instead of holding a blocking thread for the round trip. `None`
    /// (the default) where a read is best made on a blocking thread with
    /// [`RecordStore::get_record`] (RocksDB: a local lookup that may touch the disk).
    fn read_record(&self, id: &RecordId) -> Option<RecordRead> {
        let _ = id;
        None
    }

    /// Marks a record revoked (idempotent) and returns it. `audit` is written in the same
    /// atomic batch (and only if the record exists).
    fn revoke(&self, id: &RecordId, now: i64, audit: &AuditAppend) -> Result<Record, StoreError> {
        self.apply(
            &[Mutation::Revoke(id.clone())],
            std::slice::from_ref(audit),
            now,
        )?;
        self.get_record(id)?
            .ok_or_else(|| StoreError::NotFound(id.to_string()))
    }

    /// Marks a record as needing re-authorization if it is still at `expected_version`, with
    /// `audit` in the same batch; returns the updated record (`VersionMismatch` otherwise).
    fn mark_needs_reauth(
        &self,
        id: &RecordId,
        expected_version: u64,
        now: i64,
        audit: &AuditAppend,
    ) -> Result<Record, StoreError> {
        self.apply(
            &[Mutation::MarkNeedsReauth {
                id: id.clone(),
                expected_version,
            }],
            std::slice::from_ref(audit),
            now,
        )?;
        self.get_record(id)?
            .ok_or_else(|| StoreError::NotFound(id.to_string()))
    }

    /// Deletes a record with `audit` in the same batch; false if there was none (and then
    /// `audit` is not written).
    fn delete_record(&self, id: &RecordId, audit: &AuditAppend) -> Result<bool, StoreError> {
        match self.apply(
            &[Mutation::DeleteRecord(id.clone())],
            std::slice::from_ref(audit),
            0,
        ) {
            Ok(()) => Ok(true),
            Err(StoreError::NotFound(_)) => Ok(false),
            Err(e) => Err(e),
        }
    }

    /// Deletes every record of `owner`, with `audit` and the `outbox` entries (key under
    /// [`OUTBOX_PREFIX`], value; created or overwritten) in the same batch; returns how many.
    /// With `expected` (each record's id and version, as the caller read them, in any order),
    /// the owner's records must be exactly those, or nothing is written and `Conflict` is
    /// returned: what the caller decided from its read (revocations at providers) then covers
    /// every record deleted.
    fn delete_owner(
        &self,
        owner: &Owner,
        expected: Option<&[(RecordId, u64)]>,
        audit: &AuditAppend,
        outbox: &[(String, Vec<u8>)],
    ) -> Result<u64, StoreError>;

    /// Ids of every record of `owner`.
    fn owner_record_ids(&self, owner: &Owner) -> Result<Vec<RecordId>, StoreError>;

    /// Engine figures worth exporting as metrics (name, value), each its own gauge
    /// `tokenvault_<name>`: the name starts with the engine (`rocksdb_`, `postgres_`) and ends
    /// with its unit (`_bytes`) if it has one. None by default.
    fn engine_stats(&self) -> Vec<(String, u64)> {
        Vec::new()
    }

    /// Counts records.
    fn stats(&self) -> Result<StoreStats, StoreError>;

    /// Records wrapped under key `version` right now. Engines with an index by key version
    /// count from it instead of reading every record (the default counts them all).
    fn records_under_key(&self, version: u32) -> Result<u64, StoreError> {
        Ok(self
            .stats()?
            .per_key_version
            .iter()
            .find(|(v, _)| *v == version)
            .map_or(0, |(_, n)| *n))
    }

    /// Up to `limit` records with ids strictly after `after` (from the start if `None`), in id
    /// order. Used by rewrap to walk the store in resumable pages.
    fn scan_records(
        &self,
        after: Option<&RecordId>,
        limit: usize,
    ) -> Result<Vec<Record>, StoreError>;

    /// Replaces only the envelope and key version of each record still at its expected
    /// version (rewrap), in one durable write; the version and `updated_at` stay as they are
    /// (see `plan_replace_envelope`). Each item gets its own outcome: the record's version, or
    /// `VersionMismatch` / `NotFound` for a record changed or deleted meanwhile, which is left
    /// alone. The outer error is an engine failure (nothing written).
    fn replace_envelopes(
        &self,
        items: &[EnvelopeReplace],
        now: i64,
    ) -> Result<Vec<Result<u64, StoreError>>, StoreError>;

    /// The one audited-write API: applies `mutations` and appends `audit` (consecutive events
    /// of the chain) in one atomic, durable write. Every precondition is checked first, in
    /// order, each mutation seeing the ones before it; if any fails, nothing is written and
    /// its error is returned.
    fn apply(
        &self,
        mutations: &[Mutation],
        audit: &[AuditAppend],
        now: i64,
    ) -> Result<(), StoreError>;
}

/// Small named values beside the records: cursors, salts, grants. Blocking; async callers run it on a blocking pool.
pub trait MetaStore: Send + Sync + 'static {
    /// Reads a small metadata value (e.g. the rewrap cursor).
    fn get_meta(&self, key: &str) -> Result<Option<Vec<u8>>, StoreError>;

    /// Durably writes a metadata value, or deletes it when `value` is `None`.
    fn put_meta(&self, key: &str, value: Option<&[u8]>) -> Result<(), StoreError>;

    /// Writes a metadata value unless the key has one; whether it wrote. Atomic against other
    /// writers of the same store: two daemons sharing a database can both try, one wins. The
    /// default suits stores one process owns (RocksDB's directory lock, memory).
    fn put_meta_if_absent(&self, key: &str, value: &[u8]) -> Result<bool, StoreError> {
        if self.get_meta(key)?.is_some() {
            return Ok(false);
        }
        self.put_meta(key, Some(value))?;
        Ok(true)
    }

    /// Reads a grant by id.
    fn get_grant(&self, id: &str) -> Result<Option<Vec<u8>>, StoreError>;

    /// Up to `limit` grants (id, encoded grant) with ids after `after`, in id order.
    fn grant_page(
        &self,
        after: Option<&str>,
        limit: usize,
    ) -> Result<Vec<(String, Vec<u8>)>, StoreError>;

    /// Up to `limit` outbox entries (key under [`OUTBOX_PREFIX`], value) whose keys start with
    /// `prefix` and sort after `after` (from the first if `None`), in key order.
    fn outbox_page(
        &self,
        prefix: &str,
        after: Option<&str>,
        limit: usize,
    ) -> Result<Vec<(String, Vec<u8>)>, StoreError>;
}

/// The key registry: which key versions exist and in what state. Blocking; async callers run it on a blocking pool.
pub trait KeyRegistry: Send + Sync + 'static {
    /// The key registry, ascending by version.
    fn keys(&self) -> Result<Vec<KeyInfo>, StoreError>;

    /// Inserts or replaces key registry entries atomically, with `audit` and the `outbox`
    /// entries (key under [`OUTBOX_PREFIX`], value; created or overwritten: the webhooks of a
    /// rotation or destruction) in the same batch.
    fn put_keys(
        &self,
        keys: &[KeyInfo],
        audit: &AuditAppend,
        outbox: &[(String, Vec<u8>)],
    ) -> Result<(), StoreError>;

    /// Writes `key` (a version being retired) with `audit`, only if no record is under its
    /// version: `KeyInUse` otherwise. Checked in the same critical section as record writes,
    /// which refuse versions the registry marks retired or destroyed (`KeyNotAccepted`), so no
    /// record can be left under a retired key however writes and the retirement interleave.
    fn retire_key(&self, key: &KeyInfo, audit: &AuditAppend) -> Result<(), StoreError>;
}

/// The audit trail's stored events: appended, read per chain, pruned. Blocking; async callers run it on a blocking pool.
pub trait AuditLog: Send + Sync + 'static {
    /// Appends one audit event. `sync` forces the WAL to disk before returning.
    fn append_audit(&self, entry: &AuditAppend, sync: bool) -> Result<(), StoreError>;

    /// Appends consecutive audit events in one write (the events of reads, written in groups).
    /// The default writes them one by one, in order.
    fn append_audit_batch(&self, entries: &[AuditAppend], sync: bool) -> Result<(), StoreError> {
        entries.iter().try_for_each(|e| self.append_audit(e, sync))
    }

    /// Up to `limit` audit events with sequence numbers from `from_seq`, ascending.
    fn audit_events(&self, from_seq: u64, limit: usize) -> Result<Vec<(u64, Vec<u8>)>, StoreError>;

    /// The audit event with the highest sequence number.
    fn last_audit_event(&self) -> Result<Option<(u64, Vec<u8>)>, StoreError>;

    /// The names of every audit chain in the store, ascending: one per daemon instance sharing
    /// it. A store one daemon owns has one chain, `""`.
    fn audit_chains(&self) -> Result<Vec<String>, StoreError> {
        Ok(vec![String::new()])
    }

    /// Like [`AuditLog::audit_events`] for the chain named `chain` (of any daemon sharing the
    /// store; this daemon's own is what `audit_events` reads).
    fn chain_events(
        &self,
        chain: &str,
        from_seq: u64,
        limit: usize,
    ) -> Result<Vec<(u64, Vec<u8>)>, StoreError> {
        if chain.is_empty() {
            self.audit_events(from_seq, limit)
        } else {
            self.other_chain_events(chain, from_seq, limit)
        }
    }

    /// [`AuditLog::chain_events`] of a chain other than the store's own `""`: in a store one
    /// daemon owns, those `store copy` brought from a shared database. None by default.
    fn other_chain_events(
        &self,
        chain: &str,
        from_seq: u64,
        limit: usize,
    ) -> Result<Vec<(u64, Vec<u8>)>, StoreError> {
        let _ = (chain, from_seq, limit);
        Ok(Vec::new())
    }

    /// The name of this store's own audit chain (the one [`AuditLog::audit_events`] reads), as
    /// [`AuditLog::audit_chains`] lists it: `""` unless the store is shared.
    fn own_chain(&self) -> String {
        String::new()
    }

    /// Audit retention: removes the events of this store's own chain with sequence numbers up
    /// to `through`, writes the `meta` entries (the checkpoint) and appends `audit` (the event
    /// recording the pruning) in one atomic, durable write.
    fn prune_audit(
        &self,
        through: u64,
        meta: &[(String, Vec<u8>)],
        audit: &AuditAppend,
    ) -> Result<(), StoreError>;
}

/// Leases, so daemons sharing a store run a job once at a time. Blocking; async callers run it on a blocking pool.
pub trait Leases: Send + Sync + 'static {
    /// Takes or renews the lease `name` for `owner` until `ttl` from now by the store's clock
    /// (not the daemons'): returns its fencing token (raised each time the lease changes
    /// owner) while `owner` holds it, `None` while another owner's lease is unexpired. How
    /// daemons sharing a store run something once at a time: a token refresh, a rewrap, an
    /// instance name. A store one process owns needs no lease: the default grants every one.
    fn acquire_lease(
        &self,
        name: &str,
        owner: &str,
        ttl: std::time::Duration,
    ) -> Result<Option<u64>, StoreError> {
        let _ = (name, owner, ttl);
        Ok(Some(0))
    }

    /// Gives up `owner`'s lease `name` at once (its fencing token is kept); nothing if another
    /// owner holds it.
    fn release_lease(&self, name: &str, owner: &str) -> Result<(), StoreError> {
        let _ = (name, owner);
        Ok(())
    }
}

/// What `store copy` reads and writes: every piece of state as it is. Blocking; async callers run it on a blocking pool.
pub trait Transfer: Send + Sync + 'static {
    /// Up to `limit` metadata entries with keys after `after`, in key order: every piece of
    /// state that is not a record, a registry entry or an audit event, grants under
    /// [`grant_key`] and replay markers under [`replay_key`] (value: [`replay_value`]), so
    /// `store copy` moves them between engines whatever their tables. The engine's own
    /// bookkeeping (schema version, leases) is not listed.
    fn meta_page(
        &self,
        after: Option<&str>,
        limit: usize,
    ) -> Result<Vec<(String, Vec<u8>)>, StoreError>;

    /// Writes `batch` as it is, in one atomic, durable write: no version check, no new
    /// timestamps, overwriting what is there (so a resumed copy can write a page again). Only
    /// `store copy` calls this, on a store no daemon serves.
    fn import(&self, batch: &Import) -> Result<(), StoreError>;
}

/// Writes that bypass the rules, for tests only (behind the `testing` feature): seeding
/// records without audit events and tampering with a stored event to prove it is detected.
/// Nothing in the daemon can call them.
#[cfg(any(test, feature = "testing"))]
pub trait TestHooks: TokenStore {
    /// Applies `writes` atomically with version checks; returns the new versions in order.
    /// `now` (Unix seconds) stamps created/updated times.
    fn put_records(&self, writes: &[RecordWrite], now: i64) -> Result<Vec<u64>, StoreError>;

    /// [`RecordStore::apply`] without audit events: puts stored state (a record needing
    /// re-authorization, say) in place for a test.
    fn apply_unaudited(&self, mutations: &[Mutation], now: i64) -> Result<(), StoreError>;

    /// [`KeyRegistry::put_keys`] without an audit event: seeds a registry for a test.
    fn put_keys_unaudited(&self, keys: &[KeyInfo]) -> Result<(), StoreError>;

    /// [`KeyRegistry::retire_key`] without an audit event (its refusal while records remain
    /// under the version included).
    fn retire_key_unaudited(&self, key: &KeyInfo) -> Result<(), StoreError>;

    /// Overwrites a stored audit event's bytes. Exists only so tests can prove that tampering
    /// is detected; nothing in the daemon calls it.
    #[doc(hidden)]
    fn dangerous_overwrite_audit(&self, seq: u64, bytes: &[u8]) -> Result<(), StoreError>;
}

impl std::fmt::Debug for dyn TokenStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("TokenStore")
    }
}

/// What [`plan_writes`] decided for a batch.
#[derive(Debug)]
pub(crate) struct Planned {
    /// The records to write, in batch order: every write but the repeated ones.
    pub(crate) records: Vec<Record>,
    /// The version each write of the batch leaves its record at, in batch order.
    pub(crate) versions: Vec<u64>,
}

/// Validates a batch against current versions, shared by every implementation so their
/// semantics cannot drift. `current` returns the stored record for an id.
///
/// A write that repeats the one that made the stored version (same expected version, so the
/// stored one is just after it; byte-identical envelope, which holds a fresh random data key,
/// so no other write has it; same metadata and key version) is accepted without a write: it
/// answers that stored version. So a sealer that retries after UNAVAILABLE, not knowing
/// whether its write landed, gets success rather than a version conflict, and nothing is
/// written twice.
pub(crate) fn plan_writes(
    writes: &[RecordWrite],
    now: i64,
    mut current: impl FnMut(&RecordId) -> Result<Option<Record>, StoreError>,
    mut key_state: impl FnMut(u32) -> Result<Option<keys::KeyState>, StoreError>,
) -> Result<Planned, StoreError> {
    let mut seen = std::collections::HashSet::with_capacity(writes.len());
    let mut out = Planned {
        records: Vec::with_capacity(writes.len()),
        versions: Vec::with_capacity(writes.len()),
    };
    for w in writes {
        if !seen.insert(w.meta.id.clone()) {
            return Err(StoreError::DuplicateInBatch(w.meta.id.to_string()));
        }
        // A version absent from the registry is the caller's business (the daemon checks
        // every envelope against its keyring); a retired or destroyed one is refused here,
        // under the store's write ordering, so a retirement cannot strand a record.
        if let Some(
            state @ (keys::KeyState::Retired
            | keys::KeyState::PendingDestruction
            | keys::KeyState::Destroyed),
        ) = key_state(w.key_version)?
        {
            return Err(StoreError::KeyNotAccepted {
                version: w.key_version,
                state,
            });
        }
        let existing = current(&w.meta.id)?;
        let actual = existing.as_ref().map_or(0, |r| r.version);
        if let Some(stored) = existing.as_ref().filter(|r| is_repeat_of(w, r)) {
            out.versions.push(stored.version);
            continue;
        }
        if let Some(refused) = version_refusal(&w.meta.id, w.expected_version, actual) {
            return Err(refused);
        }
        out.versions.push(actual + 1);
        out.records.push(Record {
            meta: w.meta.clone(),
            envelope: w.envelope.clone(),
            key_version: w.key_version,
            created_at: existing.as_ref().map_or(now, |r| r.created_at),
            updated_at: now,
            revoked: false,
            needs_reauth: false,
            version: actual + 1,
        });
    }
    Ok(out)
}

/// `Conflict` unless the records `found` (id and version, any order) are exactly `expected`
/// ([`RecordStore::delete_owner`]).
pub(crate) fn check_owner_records(
    expected: Option<&[(RecordId, u64)]>,
    mut found: Vec<(RecordId, u64)>,
) -> Result<(), StoreError> {
    let Some(expected) = expected else {
        return Ok(());
    };
    let mut expected = expected.to_vec();
    expected.sort();
    found.sort();
    if expected == found {
        Ok(())
    } else {
        Err(StoreError::Conflict("the owner's records".into()))
    }
}

/// The refusal of a write expecting `expected` (0: create) over a record at `actual` (0:
/// absent), if any: the one version rule, which callers that must not act on a write the
/// store would refuse (a code exchange spends its code first) check ahead of it.
pub fn version_refusal(id: &RecordId, expected: u64, actual: u64) -> Option<StoreError> {
    if actual == expected {
        return None;
    }
    Some(if expected == 0 {
        StoreError::AlreadyExists(id.to_string())
    } else {
        StoreError::VersionMismatch {
            id: id.to_string(),
            expected,
            actual,
        }
    })
}

/// Whether `w` is the very write that made `stored` (see [`plan_writes`]).
fn is_repeat_of(w: &RecordWrite, stored: &Record) -> bool {
    stored.version == w.expected_version + 1
        && stored.envelope == w.envelope
        && stored.key_version == w.key_version
        && stored.meta == w.meta
        && !stored.revoked
        && !stored.needs_reauth
}

/// Applies one change to `current` if it is still at `expected_version`: the version check,
/// timestamp and version bump every single-record update shares.
fn plan_update(
    current: Option<Record>,
    id: &RecordId,
    expected_version: u64,
    now: i64,
    change: impl FnOnce(&mut Record),
) -> Result<Record, StoreError> {
    let mut r = current.ok_or_else(|| StoreError::NotFound(id.to_string()))?;
    if r.version != expected_version {
        return Err(StoreError::VersionMismatch {
            id: id.to_string(),
            expected: expected_version,
            actual: r.version,
        });
    }
    change(&mut r);
    r.updated_at = now;
    r.version += 1;
    Ok(r)
}

/// Applies [`RecordStore::replace_envelopes`] to `current`, shared by every implementation.
///
/// Unlike every other change, a rewrap keeps the record's version and `updated_at`: the secret,
/// its data key and its ciphertext are unchanged (only the wrapping of the data key moved), so
/// a writer's compare-and-swap on the version it read is not refused because of key
/// maintenance, and a migration to another key version (to X-Wing) leaves every record as its
/// owners know it. The version is still checked, so a record written meanwhile is left alone.
/// The DEK cache stays correct: its entries are also checked against the key fingerprint.
pub(crate) fn plan_replace_envelope(
    current: Option<Record>,
    item: &EnvelopeReplace,
    _now: i64,
) -> Result<Record, StoreError> {
    let mut r = current.ok_or_else(|| StoreError::NotFound(item.id.to_string()))?;
    if r.version != item.expected_version {
        return Err(StoreError::VersionMismatch {
            id: item.id.to_string(),
            expected: item.expected_version,
            actual: r.version,
        });
    }
    r.envelope = item.envelope.clone();
    r.key_version = item.key_version;
    Ok(r)
}

/// Applies [`RecordStore::mark_needs_reauth`] to `current`, shared by every implementation.
pub(crate) fn plan_mark_needs_reauth(
    current: Option<Record>,
    id: &RecordId,
    expected_version: u64,
    now: i64,
) -> Result<Record, StoreError> {
    plan_update(current, id, expected_version, now, |r| {
        r.needs_reauth = true
    })
}

/// Decodes a stored record value, as the fuzzer does: never panics, whatever the bytes.
#[cfg(fuzzing)]
pub fn fuzz_decode_record(bytes: &[u8]) -> bool {
    schema::decode_record(bytes).is_ok()
}

/// Counts records for [`RecordStore::stats`], shared by every implementation.
pub(crate) fn count_stats(
    records: impl Iterator<Item = impl std::borrow::Borrow<Record>>,
) -> StoreStats {
    let mut stats = StoreStats::default();
    let mut per_key = std::collections::BTreeMap::<u32, u64>::new();
    for r in records {
        let r = r.borrow();
        stats.records += 1;
        stats.revoked += u64::from(r.revoked);
        stats.needs_reauth += u64::from(r.needs_reauth);
        *per_key.entry(r.key_version).or_default() += 1;
    }
    stats.per_key_version = per_key.into_iter().collect();
    stats
}

#[cfg(any(test, feature = "testing"))]
pub mod conformance;
