//! In-memory [`TokenStore`] for tests and benches. Same semantics as RocksDB, no durability.

use std::collections::BTreeMap;
use std::sync::Mutex;

use super::{RecordWrite, StoreError, StoreStats, TokenStore, plan_writes};
use crate::keys::KeyInfo;
use crate::record::{Owner, Record, RecordId};

/// A [`TokenStore`] held in process memory.
#[derive(Debug, Default)]
pub struct MemoryStore {
    inner: Mutex<Inner>,
}

#[derive(Debug, Default)]
struct Inner {
    records: BTreeMap<RecordId, Record>,
    keys: BTreeMap<u32, KeyInfo>,
}

impl MemoryStore {
    /// An empty store.
    pub fn new() -> Self {
        Self::default()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        // A panic while holding the lock cannot leave a half-applied batch: every mutation
        // below is planned first and applied without fallible steps.
        self.inner
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

impl TokenStore for MemoryStore {
    fn put_records(&self, writes: &[RecordWrite], now: i64) -> Result<Vec<u64>, StoreError> {
        let mut inner = self.lock();
        let planned = plan_writes(writes, now, |id| Ok(inner.records.get(id).cloned()))?;
        let versions = planned.iter().map(|r| r.version).collect();
        for r in planned {
            inner.records.insert(r.meta.id.clone(), r);
        }
        Ok(versions)
    }

    fn get_record(&self, id: &RecordId) -> Result<Option<Record>, StoreError> {
        Ok(self.lock().records.get(id).cloned())
    }

    fn revoke(&self, id: &RecordId, now: i64) -> Result<Record, StoreError> {
        let mut inner = self.lock();
        let r = inner
            .records
            .get_mut(id)
            .ok_or_else(|| StoreError::NotFound(id.to_string()))?;
        if !r.revoked {
            r.revoked = true;
            r.updated_at = now;
            r.version += 1;
        }
        Ok(r.clone())
    }

    fn delete_record(&self, id: &RecordId) -> Result<bool, StoreError> {
        Ok(self.lock().records.remove(id).is_some())
    }

    fn delete_owner(&self, owner: &Owner) -> Result<u64, StoreError> {
        let mut inner = self.lock();
        let before = inner.records.len();
        inner.records.retain(|_, r| &r.meta.owner != owner);
        Ok((before - inner.records.len()) as u64)
    }

    fn stats(&self) -> Result<StoreStats, StoreError> {
        Ok(super::count_stats(self.lock().records.values()))
    }

    fn keys(&self) -> Result<Vec<KeyInfo>, StoreError> {
        Ok(self.lock().keys.values().cloned().collect())
    }

    fn put_keys(&self, keys: &[KeyInfo]) -> Result<(), StoreError> {
        let mut inner = self.lock();
        for k in keys {
            inner.keys.insert(k.version, k.clone());
        }
        Ok(())
    }
}
