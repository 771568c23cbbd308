//! The embedded RocksDB [`TokenStore`](super::TokenStore): the only module that imports `rocksdb`.
//!
//! Column families: `records` (record id → record), `owners` (owner ‖ 0x00 ‖ id → empty, for
//! `DeleteOwner`), `keys` (version, big-endian → key registry entry), `meta` (schema
//! version, grants, replay markers, the rewrap cursor), `audit` (seq, big-endian → event) and
//! `audit_chains` (other daemons' chains brought in by `store copy`). Every write is a `WriteBatch` with `sync = true`, so an acknowledged write survives
//! a crash and a batch is atomic. Read-check-write sequences (version checks) are serialized by
//! one mutex; reads take no lock.
//!
//! Tuning: no compression (envelopes are ciphertext and do not compress), a bloom filter on
//! `records` for point lookups, and one LRU block cache of configurable size shared by all
//! column families that also holds index and filter blocks, and a 64 MiB budget for all
//! memtables: memory does not grow with the data.

#![expect(
    clippy::disallowed_types,
    reason = "the one module allowed to use RocksDB"
)]

use std::path::Path;
use std::sync::Mutex;

use rocksdb::{
    BlockBasedOptions, BottommostLevelCompaction, Cache, ColumnFamily, ColumnFamilyDescriptor,
    CompactOptions, DB, DBCompressionType, Options, WriteBatch, WriteOptions,
};

#[cfg(any(test, feature = "testing"))]
use super::TestHooks;
use super::schema::{self, SCHEMA_VERSION};
use super::{
    AuditAppend, AuditLog, EnvelopeReplace, GRANT_PREFIX, KeyRegistry, Leases, MetaStore, Mutation,
    RecordStore, RecordWrite, StoreError, StoreStats, Transfer, count_stats, grant_key,
    plan_replace_envelope, plan_writes,
};
use crate::keys::KeyInfo;
use crate::record::{Owner, Record, RecordId};

const CF_RECORDS: &str = "records";
#[cfg(test)]
pub(crate) const CF_RECORDS_FOR_TEST: &str = CF_RECORDS;
const CF_OWNERS: &str = "owners";
const CF_KEYS: &str = "keys";
const CF_META: &str = "meta";
const CF_AUDIT: &str = "audit";
/// Other daemons' audit chains, brought in by `store copy` from a shared database: chain name
/// ‖ 0x00 ‖ seq (big-endian) → event. Names never contain NUL.
const CF_CHAINS: &str = "audit_chains";
/// Records by the key version wrapping their data key: version (big-endian) ‖ record id → empty,
/// so retiring a version counts its records without reading the others.
const CF_BY_KEY: &str = "records_by_key";
#[cfg(test)]
pub(crate) const CF_BY_KEY_FOR_TEST: &str = CF_BY_KEY;
const META_SCHEMA: &[u8] = b"schema_version";
/// Key in [`CF_BY_KEY`] (shorter than any entry's version prefix) set once the index holds every
/// record: a directory written before the index existed gets it built at open.
const BY_KEY_BUILT: &[u8] = b"";
#[cfg(test)]
pub(crate) const BY_KEY_BUILT_FOR_TEST: &[u8] = BY_KEY_BUILT;

/// A [`TokenStore`](super::TokenStore) on an embedded RocksDB in one directory.
pub struct RocksStore {
    pub(crate) db: DB,
    write_lock: Mutex<()>,
}

impl std::fmt::Debug for RocksStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RocksStore")
            .field("path", &self.db.path())
            .finish()
    }
}

fn engine(e: rocksdb::Error) -> StoreError {
    StoreError::Engine(e.into_string())
}

/// Memtable size per column family.
const WRITE_BUFFER_BYTES: usize = 16 << 20;
/// Memtable budget across column families.
const MEMTABLE_BUDGET_BYTES: usize = 64 << 20;

impl RocksStore {
    /// Opens (creating if needed) the store in `path` with a block cache of `cache_bytes`.
    pub fn open(path: &Path, cache_bytes: usize) -> Result<Self, StoreError> {
        let (db_opts, cfs) = Self::options(cache_bytes);
        let db = DB::open_cf_descriptors(&db_opts, path, cfs).map_err(|e| {
            let msg = e.into_string();
            if msg.contains("lock") {
                StoreError::Locked(path.display().to_string())
            } else {
                StoreError::Engine(msg)
            }
        })?;
        let store = Self {
            db,
            write_lock: Mutex::new(()),
        };
        store.check_schema()?;
        store.build_key_index()?;
        Ok(store)
    }

    /// Builds [`CF_BY_KEY`] from the records, once, for a directory written before it existed
    /// (at open, before anything else writes).
    fn build_key_index(&self) -> Result<(), StoreError> {
        if self
            .db
            .get_pinned_cf(self.cf(CF_BY_KEY), BY_KEY_BUILT)
            .map_err(engine)?
            .is_some()
        {
            return Ok(());
        }
        let mut batch = WriteBatch::default();
        for item in self
            .db
            .iterator_cf(self.cf(CF_RECORDS), rocksdb::IteratorMode::Start)
        {
            let (_, v) = item.map_err(engine)?;
            let r = schema::decode_record(&v)?;
            batch.put_cf(
                self.cf(CF_BY_KEY),
                schema::key_version_key(r.key_version, &r.meta.id),
                [],
            );
        }
        batch.put_cf(self.cf(CF_BY_KEY), BY_KEY_BUILT, []);
        self.write(batch)
    }

    /// Opens the store in `path` for reading only, as a RocksDB secondary instance (its own
    /// files in `scratch`), so it works while a daemon holds the directory: the view is one
    /// consistent point in time (whole write batches only) that does not move while it is
    /// read, which is what a backup of a running daemon needs. Writes through it fail.
    pub fn open_snapshot(path: &Path, scratch: &Path) -> Result<Self, StoreError> {
        let (mut db_opts, cfs) = Self::options(8 << 20);
        // A secondary must keep every table file open: the primary may delete compacted ones
        // while they are read.
        db_opts.set_max_open_files(-1);
        db_opts.create_if_missing(false);
        let existing = DB::list_cf(&db_opts, path).map_err(|e| {
            StoreError::Engine(format!(
                "{}: not a tokenvault data directory ({})",
                path.display(),
                e.into_string()
            ))
        })?;
        for required in [CF_RECORDS, CF_OWNERS, CF_KEYS, CF_META, CF_AUDIT] {
            if !existing.iter().any(|c| c == required) {
                return Err(StoreError::Corrupt(format!(
                    "{}: no column family {required}; not a tokenvault data directory",
                    path.display()
                )));
            }
        }
        let cfs = cfs
            .into_iter()
            .filter(|d| existing.iter().any(|c| c == d.name()));
        let db = DB::open_cf_descriptors_as_secondary(&db_opts, path, scratch, cfs)
            .map_err(|e| StoreError::Engine(e.into_string()))?;
        db.try_catch_up_with_primary()
            .map_err(|e| StoreError::Engine(e.into_string()))?;
        let store = Self {
            db,
            write_lock: Mutex::new(()),
        };
        match store
            .db
            .get_cf(store.cf(CF_META), META_SCHEMA)
            .map_err(engine)?
        {
            Some(v) if v.as_slice() == SCHEMA_VERSION.to_be_bytes() => Ok(store),
            other => Err(StoreError::Corrupt(format!(
                "{}: store schema version {other:?} is not {SCHEMA_VERSION}",
                path.display()
            ))),
        }
    }

    /// Database options and column families for a block cache of `cache_bytes`.
    fn options(cache_bytes: usize) -> (Options, Vec<ColumnFamilyDescriptor>) {
        let cache = Cache::new_lru_cache(cache_bytes);
        let cf_opts = |bloom: bool| {
            let mut table = BlockBasedOptions::default();
            table.set_block_cache(&cache);
            // Index and filter blocks live in the (bounded) block cache instead of growing
            // with the data; L0's stay pinned so point lookups never miss them.
            table.set_cache_index_and_filter_blocks(true);
            table.set_pin_l0_filter_and_index_blocks_in_cache(true);
            if bloom {
                table.set_bloom_filter(10.0, false);
            }
            let mut o = Options::default();
            o.set_compression_type(DBCompressionType::None);
            o.set_block_based_table_factory(&table);
            o.set_write_buffer_size(WRITE_BUFFER_BYTES);
            o
        };
        let mut db_opts = cf_opts(false);
        // All memtables together stay under this budget (RocksDB flushes the largest when it is
        // reached), so memory is block cache + this + a little, whatever the data size.
        db_opts.set_db_write_buffer_size(MEMTABLE_BUDGET_BYTES);
        db_opts.create_if_missing(true);
        db_opts.create_missing_column_families(true);
        // Secrets must not linger in old WAL files once their memtable is flushed.
        db_opts.set_wal_ttl_seconds(0);
        db_opts.set_keep_log_file_num(4);
        let cfs = vec![
            ColumnFamilyDescriptor::new(CF_RECORDS, cf_opts(true)),
            ColumnFamilyDescriptor::new(CF_OWNERS, cf_opts(false)),
            ColumnFamilyDescriptor::new(CF_KEYS, cf_opts(false)),
            ColumnFamilyDescriptor::new(CF_META, cf_opts(false)),
            ColumnFamilyDescriptor::new(CF_AUDIT, cf_opts(false)),
            ColumnFamilyDescriptor::new(CF_CHAINS, cf_opts(false)),
            ColumnFamilyDescriptor::new(CF_BY_KEY, cf_opts(false)),
        ];
        (db_opts, cfs)
    }

    fn check_schema(&self) -> Result<(), StoreError> {
        let meta = self.cf(CF_META);
        match self.db.get_cf(meta, META_SCHEMA).map_err(engine)? {
            None => {
                let mut batch = WriteBatch::default();
                batch.put_cf(meta, META_SCHEMA, SCHEMA_VERSION.to_be_bytes());
                self.write(batch)
            }
            Some(v) if v.as_slice() == SCHEMA_VERSION.to_be_bytes() => Ok(()),
            Some(v) => Err(StoreError::Corrupt(format!(
                "store schema version {v:?} is not {SCHEMA_VERSION}; this build cannot read it"
            ))),
        }
    }

    pub(crate) fn cf(&self, name: &str) -> &ColumnFamily {
        self.db
            .cf_handle(name)
            .expect("every column family is created at open")
    }

    /// The foreign audit chains' column family; absent only in a snapshot of a directory
    /// written by an older tokenvault.
    fn chains(&self) -> Option<&ColumnFamily> {
        self.db.cf_handle(CF_CHAINS)
    }

    fn write(&self, batch: WriteBatch) -> Result<(), StoreError> {
        let mut opts = WriteOptions::default();
        opts.set_sync(true);
        self.db.write_opt(batch, &opts).map_err(engine)
    }

    fn add_audit(&self, batch: &mut WriteBatch, audit: Option<&AuditAppend>) {
        if let Some(a) = audit {
            batch.put_cf(self.cf(CF_AUDIT), a.seq.to_be_bytes(), &a.bytes);
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, ()> {
        // The guard protects no data, only the ordering of read-check-write sequences.
        self.write_lock
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// The registry state of key `version`, if it is registered.
    fn key_state(&self, version: u32) -> Result<Option<crate::keys::KeyState>, StoreError> {
        self.db
            .get_pinned_cf(self.cf(CF_KEYS), schema::key_key(version))
            .map_err(engine)?
            .map(|v| schema::decode_key(&v).map(|k| k.state))
            .transpose()
    }

    /// Stages `new` over `previous` (owner and key-version indexes included) in `batch`.
    fn stage_record(&self, batch: &mut WriteBatch, previous: Option<&Record>, new: &Record) {
        if let Some(old) = previous {
            batch.delete_cf(
                self.cf(CF_OWNERS),
                schema::owner_key(&old.meta.owner, &old.meta.id),
            );
            self.unindex_key_version(batch, old);
        }
        batch.put_cf(
            self.cf(CF_BY_KEY),
            schema::key_version_key(new.key_version, &new.meta.id),
            [],
        );
        batch.put_cf(
            self.cf(CF_RECORDS),
            new.meta.id.as_str(),
            schema::encode_record(new),
        );
        batch.put_cf(
            self.cf(CF_OWNERS),
            schema::owner_key(&new.meta.owner, &new.meta.id),
            [],
        );
    }

    /// Records under key `version`, counted from [`CF_BY_KEY`].
    fn count_under_key(&self, version: u32) -> Result<u64, StoreError> {
        let prefix = version.to_be_bytes();
        let mut records = 0u64;
        for item in self.db.prefix_iterator_cf(self.cf(CF_BY_KEY), prefix) {
            let (k, _) = item.map_err(engine)?;
            if !k.starts_with(&prefix) {
                break;
            }
            records += 1;
        }
        Ok(records)
    }

    /// Stages the deletion of `record` (its indexes included) in `batch`.
    fn stage_delete(&self, batch: &mut WriteBatch, record: &Record) {
        let id = &record.meta.id;
        batch.delete_cf(self.cf(CF_RECORDS), id.as_str());
        batch.delete_cf(
            self.cf(CF_OWNERS),
            schema::owner_key(&record.meta.owner, id),
        );
        self.unindex_key_version(batch, record);
    }

    fn unindex_key_version(&self, batch: &mut WriteBatch, record: &Record) {
        batch.delete_cf(
            self.cf(CF_BY_KEY),
            schema::key_version_key(record.key_version, &record.meta.id),
        );
    }

    fn read(&self, id: &RecordId) -> Result<Option<Record>, StoreError> {
        self.db
            .get_pinned_cf(self.cf(CF_RECORDS), id.as_str().as_bytes())
            .map_err(engine)?
            .map(|v| schema::decode_record(&v))
            .transpose()
    }

    /// [`RecordStore::apply`]; `audited` says the write carries audit events (the test hook
    /// [`TestHooks::apply_unaudited`] passes true to bypass the check).
    fn apply_audited(
        &self,
        mutations: &[Mutation],
        audit: &[AuditAppend],
        now: i64,
        audited: bool,
    ) -> Result<(), StoreError> {
        let guard = self.lock();
        let changes = super::rules::plan(
            mutations,
            now,
            &mut Stored {
                store: self,
                key_states: std::collections::HashMap::new(),
            },
            audited,
        )?;
        let mut batch = WriteBatch::default();
        let mut purge = Vec::new();
        for (id, c) in &changes.records {
            match (&c.before, &c.after) {
                (before, Some(after)) => self.stage_record(&mut batch, before.as_ref(), after),
                (Some(before), None) => {
                    self.stage_delete(&mut batch, before);
                    purge.push(id.as_str().as_bytes().to_vec());
                }
                (None, None) => {}
            }
        }
        for (key, c) in &changes.meta {
            match &c.after {
                Some(v) => batch.put_cf(self.cf(CF_META), key, v),
                None => batch.delete_cf(self.cf(CF_META), key),
            }
        }
        for a in audit {
            self.add_audit(&mut batch, Some(a));
        }
        if !batch.is_empty() {
            self.write(batch)?;
        }
        drop(guard);
        if !purge.is_empty() {
            self.purge(&purge)?;
        }
        Ok(())
    }

    /// [`RecordStore::put_record_groups`], and the test hook's unaudited seeding (`audit`
    /// `None`: only [`TestHooks::put_records`] passes it).
    /// Up to `limit` metadata entries under `table` (a key prefix, stripped from the keys
    /// returned) whose rest starts with `prefix` and sorts after `after`, in key order.
    fn meta_under(
        &self,
        table: &str,
        prefix: &str,
        after: Option<&str>,
        limit: usize,
    ) -> Result<Vec<(String, Vec<u8>)>, StoreError> {
        let from = format!("{table}{}", after.unwrap_or(prefix));
        let within = format!("{table}{prefix}");
        let mode = rocksdb::IteratorMode::From(from.as_bytes(), rocksdb::Direction::Forward);
        let mut out = Vec::new();
        for item in self.db.iterator_cf(self.cf(CF_META), mode) {
            let (k, v) = item.map_err(engine)?;
            if !k.starts_with(within.as_bytes()) || out.len() == limit {
                break;
            }
            let rest = &k[table.len()..];
            if after.is_some_and(|a| a.as_bytes() == rest) {
                continue;
            }
            let rest = String::from_utf8(rest.to_vec())
                .map_err(|_| StoreError::Corrupt(format!("a key under {table} is not UTF-8")))?;
            out.push((rest, v.to_vec()));
        }
        Ok(out)
    }

    fn write_groups(
        &self,
        groups: &[&[RecordWrite]],
        now: i64,
        audit: Option<&dyn super::GroupAudit>,
    ) -> Result<Vec<Result<Vec<u64>, StoreError>>, StoreError> {
        let _guard = self.lock();
        // Records accepted earlier in this commit, which later groups must see: where they are
        // in `accepted_groups` (group, position), so no record is copied to be found.
        let mut accepted: std::collections::HashMap<RecordId, (usize, usize)> =
            std::collections::HashMap::new();
        let mut batch = WriteBatch::default();
        let mut outcomes = Vec::with_capacity(groups.len());
        // Key states read once per commit, not once per record (the lock keeps them current).
        let mut key_states: std::collections::HashMap<u32, Option<crate::keys::KeyState>> =
            std::collections::HashMap::new();
        let mut accepted_groups: Vec<(usize, Vec<Record>)> = Vec::new();
        for (index, writes) in groups.iter().enumerate() {
            let mut previous = std::collections::HashMap::new();
            let planned = plan_writes(
                writes,
                now,
                |id| {
                    let r = match accepted.get(id) {
                        Some(&(g, i)) => Some(accepted_groups[g].1[i].clone()),
                        None => self.read(id)?,
                    };
                    if let Some(r) = &r {
                        previous.insert(r.meta.id.clone(), r.clone());
                    }
                    Ok(r)
                },
                |v| match key_states.get(&v) {
                    Some(state) => Ok(*state),
                    None => {
                        let state = self.key_state(v)?;
                        key_states.insert(v, state);
                        Ok(state)
                    }
                },
            );
            let planned = match planned {
                Ok(p) => p,
                Err(e @ (StoreError::Engine(_) | StoreError::Corrupt(_))) => return Err(e),
                Err(e) => {
                    outcomes.push(Err(e));
                    continue;
                }
            };
            for r in &planned.records {
                self.stage_record(&mut batch, previous.get(&r.meta.id), r);
            }
            outcomes.push(Ok(planned.versions));
            let at = accepted_groups.len();
            accepted.extend(
                planned
                    .records
                    .iter()
                    .enumerate()
                    .map(|(i, r)| (r.meta.id.clone(), (at, i))),
            );
            accepted_groups.push((index, planned.records));
        }
        let events = match audit {
            Some(audit) => super::seal_accepted(audit, &accepted_groups)?,
            None => Vec::new(),
        };
        for a in events {
            batch.put_cf(self.cf(CF_AUDIT), a.seq.to_be_bytes(), &a.bytes);
        }
        if !batch.is_empty() {
            self.write(batch)?;
        }
        Ok(outcomes)
    }

    /// Pushes deleted records out of the memtable, WAL and SST files so their envelopes are
    /// physically gone, not just shadowed by a tombstone.
    fn purge(&self, ids: &[Vec<u8>]) -> Result<(), StoreError> {
        // A WAL file is dropped only once every column family with data in it is flushed.
        for cf in [
            CF_RECORDS,
            CF_OWNERS,
            CF_KEYS,
            CF_META,
            CF_AUDIT,
            CF_CHAINS,
            CF_BY_KEY,
            rocksdb::DEFAULT_COLUMN_FAMILY_NAME,
        ] {
            self.db.flush_cf(self.cf(cf)).map_err(engine)?;
        }
        let mut opts = CompactOptions::default();
        opts.set_bottommost_level_compaction(BottommostLevelCompaction::Force);
        let (Some(lo), Some(hi)) = (ids.iter().min(), ids.iter().max()) else {
            return Ok(());
        };
        self.db
            .compact_range_cf_opt(self.cf(CF_RECORDS), Some(lo), Some(hi), &opts);
        Ok(())
    }
}

/// The stored state [`super::rules::plan`] reads, under the write lock; key states read once
/// per write.
struct Stored<'a> {
    store: &'a RocksStore,
    key_states: std::collections::HashMap<u32, Option<crate::keys::KeyState>>,
}

impl super::rules::State for Stored<'_> {
    fn record(&mut self, id: &RecordId) -> Result<Option<Record>, StoreError> {
        self.store.read(id)
    }

    fn key_state(&mut self, version: u32) -> Result<Option<crate::keys::KeyState>, StoreError> {
        if let Some(s) = self.key_states.get(&version) {
            return Ok(*s);
        }
        let s = self.store.key_state(version)?;
        self.key_states.insert(version, s);
        Ok(s)
    }

    fn meta(&mut self, key: &str) -> Result<Option<Vec<u8>>, StoreError> {
        self.store.get_meta(key)
    }
}

impl RecordStore for RocksStore {
    fn put_record_groups(
        &self,
        groups: &[&[RecordWrite]],
        now: i64,
        audit: std::sync::Arc<dyn super::GroupAudit>,
    ) -> Result<Vec<Result<Vec<u64>, StoreError>>, StoreError> {
        self.write_groups(groups, now, Some(&*audit))
    }

    fn get_record(&self, id: &RecordId) -> Result<Option<Record>, StoreError> {
        self.read(id)
    }

    fn delete_owner(
        &self,
        owner: &Owner,
        expected: Option<&[(RecordId, u64)]>,
        audit: &AuditAppend,
        outbox: &[(String, Vec<u8>)],
    ) -> Result<u64, StoreError> {
        let prefix = schema::owner_prefix(owner);
        let ids: Vec<Vec<u8>> = {
            let _guard = self.lock();
            let mut ids = Vec::new();
            for item in self.db.prefix_iterator_cf(self.cf(CF_OWNERS), &prefix) {
                let (k, _) = item.map_err(engine)?;
                if !k.starts_with(&prefix) {
                    break;
                }
                ids.push(k[prefix.len()..].to_vec());
            }
            let mut batch = WriteBatch::default();
            let mut found = Vec::with_capacity(ids.len());
            for id in &ids {
                let record = self
                    .db
                    .get_pinned_cf(self.cf(CF_RECORDS), id)
                    .map_err(engine)?
                    .map(|v| schema::decode_record(&v))
                    .transpose()?;
                match record {
                    Some(r) => {
                        self.stage_delete(&mut batch, &r);
                        found.push((r.meta.id, r.version));
                    }
                    // An index entry without its record: only the entry goes.
                    None => {
                        let mut k = prefix.clone();
                        k.extend_from_slice(id);
                        batch.delete_cf(self.cf(CF_OWNERS), k);
                    }
                }
            }
            super::check_owner_records(expected, found)?;
            for (key, value) in outbox {
                batch.put_cf(self.cf(CF_META), super::outbox_key(key), value);
            }
            self.add_audit(&mut batch, Some(audit));
            self.write(batch)?;
            ids
        };
        self.purge(&ids)?;
        Ok(ids.len() as u64)
    }

    fn owner_record_ids(&self, owner: &Owner) -> Result<Vec<RecordId>, StoreError> {
        let prefix = schema::owner_prefix(owner);
        let mut ids = Vec::new();
        for item in self.db.prefix_iterator_cf(self.cf(CF_OWNERS), &prefix) {
            let (k, _) = item.map_err(engine)?;
            if !k.starts_with(&prefix) {
                break;
            }
            let id = std::str::from_utf8(&k[prefix.len()..])
                .ok()
                .and_then(|s| RecordId::parse(s).ok())
                .ok_or_else(|| StoreError::Corrupt("owner index: bad record id".into()))?;
            ids.push(id);
        }
        Ok(ids)
    }

    fn engine_stats(&self) -> Vec<(String, u64)> {
        let records = self.cf(CF_RECORDS);
        [
            ("rocksdb_estimated_records", "rocksdb.estimate-num-keys"),
            ("rocksdb_live_sst_bytes", "rocksdb.live-sst-files-size"),
            ("rocksdb_memtable_bytes", "rocksdb.cur-size-all-mem-tables"),
            (
                "rocksdb_block_cache_usage_bytes",
                "rocksdb.block-cache-usage",
            ),
            (
                "rocksdb_block_cache_capacity_bytes",
                "rocksdb.block-cache-capacity",
            ),
        ]
        .into_iter()
        .filter_map(|(name, property)| {
            let value = self.db.property_int_value_cf(records, property).ok()??;
            Some((name.to_string(), value))
        })
        .collect()
    }

    fn stats(&self) -> Result<StoreStats, StoreError> {
        // Streamed: one decoded record at a time, whatever the store holds.
        let mut failed = None;
        let records = self
            .db
            .iterator_cf(self.cf(CF_RECORDS), rocksdb::IteratorMode::Start)
            .map_while(|item| {
                match item
                    .map_err(engine)
                    .and_then(|(_, v)| schema::decode_record(&v))
                {
                    Ok(record) => Some(record),
                    Err(e) => {
                        failed = Some(e);
                        None
                    }
                }
            });
        let stats = count_stats(records);
        failed.map_or(Ok(stats), Err)
    }

    fn records_under_key(&self, version: u32) -> Result<u64, StoreError> {
        self.count_under_key(version)
    }

    fn scan_records(
        &self,
        after: Option<&RecordId>,
        limit: usize,
    ) -> Result<Vec<Record>, StoreError> {
        let mode = match after {
            Some(id) => {
                rocksdb::IteratorMode::From(id.as_str().as_bytes(), rocksdb::Direction::Forward)
            }
            None => rocksdb::IteratorMode::Start,
        };
        let mut out = Vec::with_capacity(limit.min(4096));
        for item in self.db.iterator_cf(self.cf(CF_RECORDS), mode) {
            let (k, v) = item.map_err(engine)?;
            if after.is_some_and(|a| a.as_str().as_bytes() == &*k) {
                continue;
            }
            if out.len() == limit {
                break;
            }
            out.push(schema::decode_record(&v)?);
        }
        Ok(out)
    }

    fn replace_envelopes(
        &self,
        items: &[EnvelopeReplace],
        now: i64,
    ) -> Result<Vec<Result<u64, StoreError>>, StoreError> {
        let _guard = self.lock();
        let mut batch = WriteBatch::default();
        let mut outcomes = Vec::with_capacity(items.len());
        for item in items {
            let previous = self.read(&item.id)?;
            let planned = plan_replace_envelope(previous.clone(), item, now);
            outcomes.push(planned.map(|r| {
                self.stage_record(&mut batch, previous.as_ref(), &r);
                r.version
            }));
        }
        self.write(batch)?;
        Ok(outcomes)
    }

    fn apply(
        &self,
        mutations: &[Mutation],
        audit: &[AuditAppend],
        now: i64,
    ) -> Result<(), StoreError> {
        self.apply_audited(mutations, audit, now, !audit.is_empty())
    }
}

impl MetaStore for RocksStore {
    fn get_meta(&self, key: &str) -> Result<Option<Vec<u8>>, StoreError> {
        self.db
            .get_cf(self.cf(CF_META), key.as_bytes())
            .map_err(engine)
    }

    fn put_meta(&self, key: &str, value: Option<&[u8]>) -> Result<(), StoreError> {
        let mut batch = WriteBatch::default();
        match value {
            Some(v) => batch.put_cf(self.cf(CF_META), key.as_bytes(), v),
            None => batch.delete_cf(self.cf(CF_META), key.as_bytes()),
        }
        self.write(batch)
    }

    fn get_grant(&self, id: &str) -> Result<Option<Vec<u8>>, StoreError> {
        self.get_meta(&grant_key(id))
    }

    fn grant_page(
        &self,
        after: Option<&str>,
        limit: usize,
    ) -> Result<Vec<(String, Vec<u8>)>, StoreError> {
        self.meta_under(GRANT_PREFIX, "", after, limit)
    }

    fn outbox_page(
        &self,
        prefix: &str,
        after: Option<&str>,
        limit: usize,
    ) -> Result<Vec<(String, Vec<u8>)>, StoreError> {
        self.meta_under(super::OUTBOX_PREFIX, prefix, after, limit)
    }
}

/// The registry writes behind [`KeyRegistry`] (always with an event) and [`TestHooks`]' unaudited
/// seeding (`audit` `None`).
impl RocksStore {
    /// [`KeyRegistry::put_keys`].
    fn write_keys(
        &self,
        keys: &[KeyInfo],
        audit: Option<&AuditAppend>,
        outbox: &[(String, Vec<u8>)],
    ) -> Result<(), StoreError> {
        let _guard = self.lock();
        let mut batch = WriteBatch::default();
        for k in keys {
            batch.put_cf(
                self.cf(CF_KEYS),
                schema::key_key(k.version),
                schema::encode_key(k),
            );
        }
        for (key, value) in outbox {
            batch.put_cf(self.cf(CF_META), super::outbox_key(key), value);
        }
        self.add_audit(&mut batch, audit);
        self.write(batch)
    }

    /// [`KeyRegistry::retire_key`].
    fn write_retired(&self, key: &KeyInfo, audit: Option<&AuditAppend>) -> Result<(), StoreError> {
        let _guard = self.lock();
        let records = self.count_under_key(key.version)?;
        if records > 0 {
            return Err(StoreError::KeyInUse {
                version: key.version,
                records,
            });
        }
        let mut batch = WriteBatch::default();
        batch.put_cf(
            self.cf(CF_KEYS),
            schema::key_key(key.version),
            schema::encode_key(key),
        );
        self.add_audit(&mut batch, audit);
        self.write(batch)
    }
}

impl KeyRegistry for RocksStore {
    fn keys(&self) -> Result<Vec<KeyInfo>, StoreError> {
        let mut keys = Vec::new();
        for item in self
            .db
            .iterator_cf(self.cf(CF_KEYS), rocksdb::IteratorMode::Start)
        {
            let (_, v) = item.map_err(engine)?;
            keys.push(schema::decode_key(&v)?);
        }
        Ok(keys)
    }

    fn put_keys(
        &self,
        keys: &[KeyInfo],
        audit: &AuditAppend,
        outbox: &[(String, Vec<u8>)],
    ) -> Result<(), StoreError> {
        self.write_keys(keys, Some(audit), outbox)
    }

    fn retire_key(&self, key: &KeyInfo, audit: &AuditAppend) -> Result<(), StoreError> {
        self.write_retired(key, Some(audit))
    }
}

impl AuditLog for RocksStore {
    fn append_audit(&self, entry: &AuditAppend, sync: bool) -> Result<(), StoreError> {
        let mut batch = WriteBatch::default();
        self.add_audit(&mut batch, Some(entry));
        let mut opts = WriteOptions::default();
        opts.set_sync(sync);
        self.db.write_opt(batch, &opts).map_err(engine)
    }

    fn audit_events(&self, from_seq: u64, limit: usize) -> Result<Vec<(u64, Vec<u8>)>, StoreError> {
        let start = from_seq.to_be_bytes();
        let mode = rocksdb::IteratorMode::From(&start, rocksdb::Direction::Forward);
        let mut out = Vec::new();
        for item in self.db.iterator_cf(self.cf(CF_AUDIT), mode).take(limit) {
            let (k, v) = item.map_err(engine)?;
            out.push((audit_seq(&k)?, v.to_vec()));
        }
        Ok(out)
    }

    fn last_audit_event(&self) -> Result<Option<(u64, Vec<u8>)>, StoreError> {
        match self
            .db
            .iterator_cf(self.cf(CF_AUDIT), rocksdb::IteratorMode::End)
            .next()
        {
            None => Ok(None),
            Some(item) => {
                let (k, v) = item.map_err(engine)?;
                Ok(Some((audit_seq(&k)?, v.to_vec())))
            }
        }
    }

    fn audit_chains(&self) -> Result<Vec<String>, StoreError> {
        let mut names = vec![String::new()];
        let Some(cf) = self.chains() else {
            return Ok(names);
        };
        // One seek per chain, not a walk over every event.
        let mut it = self.db.raw_iterator_cf(cf);
        it.seek_to_first();
        while let Some(key) = it.key() {
            let name = key.split(|b| *b == 0).next().unwrap_or_default();
            let name = String::from_utf8(name.to_vec())
                .map_err(|_| StoreError::Corrupt("audit chain name is not UTF-8".into()))?;
            let mut next = name.as_bytes().to_vec();
            next.push(1);
            names.push(name);
            it.seek(&next);
        }
        it.status().map_err(engine)?;
        Ok(names)
    }

    fn other_chain_events(
        &self,
        chain: &str,
        from_seq: u64,
        limit: usize,
    ) -> Result<Vec<(u64, Vec<u8>)>, StoreError> {
        let Some(cf) = self.chains() else {
            return Ok(Vec::new());
        };
        let prefix = chain_prefix(chain);
        let mut start = prefix.clone();
        start.extend_from_slice(&from_seq.to_be_bytes());
        let mode = rocksdb::IteratorMode::From(&start, rocksdb::Direction::Forward);
        let mut out = Vec::new();
        for item in self.db.iterator_cf(cf, mode) {
            let (k, v) = item.map_err(engine)?;
            let Some(seq) = k.strip_prefix(prefix.as_slice()) else {
                break;
            };
            out.push((audit_seq(seq)?, v.to_vec()));
            if out.len() >= limit {
                break;
            }
        }
        Ok(out)
    }

    fn prune_audit(
        &self,
        through: u64,
        meta: &[(String, Vec<u8>)],
        audit: &AuditAppend,
    ) -> Result<(), StoreError> {
        let mut batch = WriteBatch::default();
        // One range tombstone, however many events: the cost does not grow with the trail.
        batch.delete_range_cf(
            self.cf(CF_AUDIT),
            0u64.to_be_bytes(),
            through.saturating_add(1).to_be_bytes(),
        );
        for (k, v) in meta {
            batch.put_cf(self.cf(CF_META), k.as_bytes(), v);
        }
        self.add_audit(&mut batch, Some(audit));
        self.write(batch)
    }
}

impl Transfer for RocksStore {
    fn meta_page(
        &self,
        after: Option<&str>,
        limit: usize,
    ) -> Result<Vec<(String, Vec<u8>)>, StoreError> {
        let mode = match after {
            Some(a) => rocksdb::IteratorMode::From(a.as_bytes(), rocksdb::Direction::Forward),
            None => rocksdb::IteratorMode::Start,
        };
        let mut out = Vec::new();
        for item in self.db.iterator_cf(self.cf(CF_META), mode) {
            let (k, v) = item.map_err(engine)?;
            if after.is_some_and(|a| a.as_bytes() == &*k) || &*k == META_SCHEMA {
                continue;
            }
            let key = String::from_utf8(k.to_vec())
                .map_err(|_| StoreError::Corrupt("metadata key is not UTF-8".into()))?;
            out.push((key, v.to_vec()));
            if out.len() >= limit {
                break;
            }
        }
        Ok(out)
    }

    fn import(&self, batch: &super::Import) -> Result<(), StoreError> {
        let _guard = self.lock();
        let mut wb = WriteBatch::default();
        for r in &batch.records {
            let previous = self.read(&r.meta.id)?;
            self.stage_record(&mut wb, previous.as_ref(), r);
        }
        for k in &batch.keys {
            wb.put_cf(
                self.cf(CF_KEYS),
                schema::key_key(k.version),
                schema::encode_key(k),
            );
        }
        for (k, v) in &batch.meta {
            if k.as_bytes() == META_SCHEMA {
                return Err(StoreError::Corrupt(
                    "an import cannot set the schema version".into(),
                ));
            }
            wb.put_cf(self.cf(CF_META), k.as_bytes(), v);
        }
        for (chain, seq, bytes) in &batch.audit {
            if chain.is_empty() {
                wb.put_cf(self.cf(CF_AUDIT), seq.to_be_bytes(), bytes);
            } else {
                let cf = self.chains().ok_or_else(|| {
                    StoreError::Engine("this store cannot hold other audit chains".into())
                })?;
                let mut key = chain_prefix(chain);
                key.extend_from_slice(&seq.to_be_bytes());
                wb.put_cf(cf, key, bytes);
            }
        }
        self.write(wb)
    }
}

/// The directory lock makes one process the owner: every lease is granted.
impl Leases for RocksStore {}

#[cfg(any(test, feature = "testing"))]
impl TestHooks for RocksStore {
    fn put_keys_unaudited(&self, keys: &[KeyInfo]) -> Result<(), StoreError> {
        self.write_keys(keys, None, &[])
    }

    fn retire_key_unaudited(&self, key: &KeyInfo) -> Result<(), StoreError> {
        self.write_retired(key, None)
    }

    fn apply_unaudited(&self, mutations: &[Mutation], now: i64) -> Result<(), StoreError> {
        self.apply_audited(mutations, &[], now, true)
    }

    fn put_records(&self, writes: &[RecordWrite], now: i64) -> Result<Vec<u64>, StoreError> {
        self.write_groups(&[writes], now, None)?
            .pop()
            .unwrap_or_else(|| Ok(Vec::new()))
    }

    fn dangerous_overwrite_audit(&self, seq: u64, bytes: &[u8]) -> Result<(), StoreError> {
        let mut batch = WriteBatch::default();
        batch.put_cf(self.cf(CF_AUDIT), seq.to_be_bytes(), bytes);
        self.write(batch)
    }
}

/// Key prefix of audit chain `chain` in [`CF_CHAINS`].
fn chain_prefix(chain: &str) -> Vec<u8> {
    let mut key = chain.as_bytes().to_vec();
    key.push(0);
    key
}

fn audit_seq(key: &[u8]) -> Result<u64, StoreError> {
    key.try_into()
        .map(u64::from_be_bytes)
        .map_err(|_| StoreError::Corrupt("audit key is not 8 bytes".into()))
}
