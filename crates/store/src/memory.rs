//! In-memory [`TokenStore`](super::TokenStore) for tests and benches. Same semantics as RocksDB, no durability.

use std::collections::BTreeMap;
use std::sync::Mutex;

#[cfg(any(test, feature = "testing"))]
use super::TestHooks;
use super::{
    AuditAppend, AuditLog, EnvelopeReplace, GRANT_PREFIX, KeyRegistry, Leases, MetaStore, Mutation,
    RecordStore, RecordWrite, StoreError, StoreStats, Transfer, grant_key, plan_replace_envelope,
    plan_writes,
};
use crate::keys::KeyInfo;
use crate::record::{Owner, Record, RecordId};

/// A [`TokenStore`](super::TokenStore) held in process memory.
#[derive(Debug, Default)]
pub struct MemoryStore {
    inner: Mutex<Inner>,
}

#[derive(Debug, Default, Clone)]
struct Inner {
    records: BTreeMap<RecordId, Record>,
    keys: BTreeMap<u32, KeyInfo>,
    meta: BTreeMap<String, Vec<u8>>,
    audit: BTreeMap<u64, Vec<u8>>,
    /// Other daemons' audit chains, brought in by `store copy`.
    chains: BTreeMap<(String, u64), Vec<u8>>,
}

impl MemoryStore {
    /// An empty store.
    pub fn new() -> Self {
        Self::default()
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
        let mut inner = self.lock();
        let changes = super::rules::plan(mutations, now, &mut &*inner, audited)?;
        for (id, c) in changes.records {
            match c.after {
                Some(r) => inner.records.insert(id, r),
                None => inner.records.remove(&id),
            };
        }
        for (key, c) in changes.meta {
            match c.after {
                Some(v) => inner.meta.insert(key, v),
                None => inner.meta.remove(&key),
            };
        }
        for a in audit {
            inner.audit.insert(a.seq, a.bytes.clone());
        }
        Ok(())
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        // A panic while holding the lock cannot leave a half-applied batch: every mutation
        // below is planned first and applied without fallible steps.
        self.inner
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

/// The stored state [`super::rules::plan`] reads, under the store's lock.
impl super::rules::State for &Inner {
    fn record(&mut self, id: &RecordId) -> Result<Option<Record>, StoreError> {
        Ok(self.records.get(id).cloned())
    }

    fn key_state(&mut self, version: u32) -> Result<Option<crate::keys::KeyState>, StoreError> {
        Ok(self.keys.get(&version).map(|k| k.state))
    }

    fn meta(&mut self, key: &str) -> Result<Option<Vec<u8>>, StoreError> {
        Ok(self.meta.get(key).cloned())
    }
}

impl RecordStore for MemoryStore {
    fn put_record_groups(
        &self,
        groups: &[&[RecordWrite]],
        now: i64,
        audit: std::sync::Arc<dyn super::GroupAudit>,
    ) -> Result<Vec<Result<Vec<u64>, StoreError>>, StoreError> {
        let mut inner = self.lock();
        let keys = inner.keys.clone();
        // Planned against the records as the earlier groups leave them.
        let mut staged: BTreeMap<RecordId, Record> = BTreeMap::new();
        let mut accepted: Vec<(usize, Vec<Record>)> = Vec::new();
        let mut outcomes = Vec::with_capacity(groups.len());
        for (index, writes) in groups.iter().enumerate() {
            match plan_writes(
                writes,
                now,
                |id| Ok(staged.get(id).or_else(|| inner.records.get(id)).cloned()),
                |v| Ok(keys.get(&v).map(|k| k.state)),
            ) {
                Ok(planned) => {
                    outcomes.push(Ok(planned.versions));
                    staged.extend(
                        planned
                            .records
                            .iter()
                            .map(|r| (r.meta.id.clone(), r.clone())),
                    );
                    accepted.push((index, planned.records));
                }
                Err(e) => outcomes.push(Err(e)),
            }
        }
        let appends = super::seal_accepted(&*audit, &accepted)?;
        inner.records.extend(staged);
        for a in appends {
            inner.audit.insert(a.seq, a.bytes);
        }
        Ok(outcomes)
    }

    fn get_record(&self, id: &RecordId) -> Result<Option<Record>, StoreError> {
        Ok(self.lock().records.get(id).cloned())
    }

    fn delete_owner(
        &self,
        owner: &Owner,
        expected: Option<&[(RecordId, u64)]>,
        audit: &AuditAppend,
        outbox: &[(String, Vec<u8>)],
    ) -> Result<u64, StoreError> {
        let mut inner = self.lock();
        super::check_owner_records(
            expected,
            inner
                .records
                .values()
                .filter(|r| &r.meta.owner == owner)
                .map(|r| (r.meta.id.clone(), r.version))
                .collect(),
        )?;
        inner.audit.insert(audit.seq, audit.bytes.clone());
        for (key, value) in outbox {
            inner.meta.insert(super::outbox_key(key), value.clone());
        }
        let before = inner.records.len();
        inner.records.retain(|_, r| &r.meta.owner != owner);
        Ok((before - inner.records.len()) as u64)
    }

    fn owner_record_ids(&self, owner: &Owner) -> Result<Vec<RecordId>, StoreError> {
        Ok(self
            .lock()
            .records
            .values()
            .filter(|r| &r.meta.owner == owner)
            .map(|r| r.meta.id.clone())
            .collect())
    }

    fn stats(&self) -> Result<StoreStats, StoreError> {
        Ok(super::count_stats(self.lock().records.values()))
    }

    fn scan_records(
        &self,
        after: Option<&RecordId>,
        limit: usize,
    ) -> Result<Vec<Record>, StoreError> {
        use std::ops::Bound;
        let inner = self.lock();
        let lower = after.map_or(Bound::Unbounded, Bound::Excluded);
        Ok(inner
            .records
            .range((lower, Bound::Unbounded))
            .take(limit)
            .map(|(_, r)| r.clone())
            .collect())
    }

    fn replace_envelopes(
        &self,
        items: &[EnvelopeReplace],
        now: i64,
    ) -> Result<Vec<Result<u64, StoreError>>, StoreError> {
        let mut inner = self.lock();
        Ok(items
            .iter()
            .map(|item| {
                let r = plan_replace_envelope(inner.records.get(&item.id).cloned(), item, now)?;
                let version = r.version;
                inner.records.insert(item.id.clone(), r);
                Ok(version)
            })
            .collect())
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

impl MetaStore for MemoryStore {
    fn get_meta(&self, key: &str) -> Result<Option<Vec<u8>>, StoreError> {
        Ok(self.lock().meta.get(key).cloned())
    }

    fn put_meta(&self, key: &str, value: Option<&[u8]>) -> Result<(), StoreError> {
        let mut inner = self.lock();
        match value {
            Some(v) => inner.meta.insert(key.to_string(), v.to_vec()),
            None => inner.meta.remove(key),
        };
        Ok(())
    }

    fn get_grant(&self, id: &str) -> Result<Option<Vec<u8>>, StoreError> {
        Ok(self.lock().meta.get(&grant_key(id)).cloned())
    }

    fn grant_page(
        &self,
        after: Option<&str>,
        limit: usize,
    ) -> Result<Vec<(String, Vec<u8>)>, StoreError> {
        use std::ops::Bound;
        let from = after.map_or(Bound::Included(GRANT_PREFIX.to_string()), |a| {
            Bound::Excluded(grant_key(a))
        });
        Ok(self
            .lock()
            .meta
            .range((from, Bound::Unbounded))
            .map_while(|(k, v)| Some((k.strip_prefix(GRANT_PREFIX)?.to_string(), v.clone())))
            .take(limit)
            .collect())
    }

    fn outbox_page(
        &self,
        prefix: &str,
        after: Option<&str>,
        limit: usize,
    ) -> Result<Vec<(String, Vec<u8>)>, StoreError> {
        use std::ops::Bound;
        let within = super::outbox_key(prefix);
        let from = after.map_or(Bound::Included(within.clone()), |a| {
            Bound::Excluded(super::outbox_key(a))
        });
        Ok(self
            .lock()
            .meta
            .range((from, Bound::Unbounded))
            .take_while(|(k, _)| k.starts_with(&within))
            .filter_map(|(k, v)| {
                Some((k.strip_prefix(super::OUTBOX_PREFIX)?.to_string(), v.clone()))
            })
            .take(limit)
            .collect())
    }
}

/// The registry writes behind [`KeyRegistry`] (always with an event) and [`TestHooks`]' unaudited
/// seeding (`audit` `None`).
impl MemoryStore {
    /// [`KeyRegistry::put_keys`].
    fn write_keys(
        &self,
        keys: &[KeyInfo],
        audit: Option<&AuditAppend>,
        outbox: &[(String, Vec<u8>)],
    ) -> Result<(), StoreError> {
        let mut inner = self.lock();
        if let Some(a) = audit {
            inner.audit.insert(a.seq, a.bytes.clone());
        }
        for k in keys {
            inner.keys.insert(k.version, k.clone());
        }
        for (key, value) in outbox {
            inner.meta.insert(super::outbox_key(key), value.clone());
        }
        Ok(())
    }

    /// [`KeyRegistry::retire_key`].
    fn write_retired(&self, key: &KeyInfo, audit: Option<&AuditAppend>) -> Result<(), StoreError> {
        let mut inner = self.lock();
        let records = inner
            .records
            .values()
            .filter(|r| r.key_version == key.version)
            .count() as u64;
        if records > 0 {
            return Err(StoreError::KeyInUse {
                version: key.version,
                records,
            });
        }
        if let Some(a) = audit {
            inner.audit.insert(a.seq, a.bytes.clone());
        }
        inner.keys.insert(key.version, key.clone());
        Ok(())
    }
}

impl KeyRegistry for MemoryStore {
    fn keys(&self) -> Result<Vec<KeyInfo>, StoreError> {
        Ok(self.lock().keys.values().cloned().collect())
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

impl AuditLog for MemoryStore {
    fn append_audit(&self, entry: &AuditAppend, _sync: bool) -> Result<(), StoreError> {
        self.lock().audit.insert(entry.seq, entry.bytes.clone());
        Ok(())
    }

    fn audit_events(&self, from_seq: u64, limit: usize) -> Result<Vec<(u64, Vec<u8>)>, StoreError> {
        Ok(self
            .lock()
            .audit
            .range(from_seq..)
            .take(limit)
            .map(|(k, v)| (*k, v.clone()))
            .collect())
    }

    fn last_audit_event(&self) -> Result<Option<(u64, Vec<u8>)>, StoreError> {
        Ok(self
            .lock()
            .audit
            .iter()
            .next_back()
            .map(|(k, v)| (*k, v.clone())))
    }

    fn audit_chains(&self) -> Result<Vec<String>, StoreError> {
        let inner = self.lock();
        let mut names = vec![String::new()];
        names.extend(inner.chains.keys().map(|(c, _)| c.clone()));
        names.dedup();
        Ok(names)
    }

    fn other_chain_events(
        &self,
        chain: &str,
        from_seq: u64,
        limit: usize,
    ) -> Result<Vec<(u64, Vec<u8>)>, StoreError> {
        Ok(self
            .lock()
            .chains
            .range((chain.to_string(), from_seq)..)
            .take_while(|((c, _), _)| c == chain)
            .take(limit)
            .map(|((_, seq), v)| (*seq, v.clone()))
            .collect())
    }

    fn prune_audit(
        &self,
        through: u64,
        meta: &[(String, Vec<u8>)],
        audit: &AuditAppend,
    ) -> Result<(), StoreError> {
        let mut inner = self.lock();
        inner.audit.retain(|seq, _| *seq > through);
        for (k, v) in meta {
            inner.meta.insert(k.clone(), v.clone());
        }
        inner.audit.insert(audit.seq, audit.bytes.clone());
        Ok(())
    }
}

impl Transfer for MemoryStore {
    fn meta_page(
        &self,
        after: Option<&str>,
        limit: usize,
    ) -> Result<Vec<(String, Vec<u8>)>, StoreError> {
        use std::ops::Bound;
        let lower = after.map_or(Bound::Unbounded, |a| Bound::Excluded(a.to_string()));
        Ok(self
            .lock()
            .meta
            .range((lower, Bound::Unbounded))
            .take(limit)
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect())
    }

    fn import(&self, batch: &super::Import) -> Result<(), StoreError> {
        let mut inner = self.lock();
        for r in &batch.records {
            inner.records.insert(r.meta.id.clone(), r.clone());
        }
        for k in &batch.keys {
            inner.keys.insert(k.version, k.clone());
        }
        for (k, v) in &batch.meta {
            inner.meta.insert(k.clone(), v.clone());
        }
        for (chain, seq, bytes) in &batch.audit {
            if chain.is_empty() {
                inner.audit.insert(*seq, bytes.clone());
            } else {
                inner.chains.insert((chain.clone(), *seq), bytes.clone());
            }
        }
        Ok(())
    }
}

/// One process owns the store: every lease is granted.
impl Leases for MemoryStore {}

#[cfg(any(test, feature = "testing"))]
impl TestHooks for MemoryStore {
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
        let mut inner = self.lock();
        let keys = inner.keys.clone();
        let planned = plan_writes(
            writes,
            now,
            |id| Ok(inner.records.get(id).cloned()),
            |v| Ok(keys.get(&v).map(|k| k.state)),
        )?;
        for r in planned.records {
            inner.records.insert(r.meta.id.clone(), r);
        }
        Ok(planned.versions)
    }

    fn dangerous_overwrite_audit(&self, seq: u64, bytes: &[u8]) -> Result<(), StoreError> {
        self.lock().audit.insert(seq, bytes.to_vec());
        Ok(())
    }
}
