//! The optional DEK cache: skips the RSA unwrap for records read again soon.
//!
//! Owns: [`DekCache`], an LRU of unwrapped data keys bounded in entries and age, keyed by
//! record id and valid only for the exact record version and key fingerprint it was filled
//! from. Evicted, expired and invalidated keys are zeroized (`DataKey` wipes on drop).
//!
//! Trade-off (docs/THREAT_MODEL.md): with the cache on, up to `max_entries` data keys live in
//! process memory for up to `ttl`; a memory disclosure then reveals those records without the
//! private key. Off by default. Any change to a record's secret or state (revoke, delete,
//! replace) bumps its version, and a rewrap changes its key fingerprint (keeping the version and
//! the data key), so a stale entry can never be used; lifecycle operations also clear the cache.

use std::num::NonZeroUsize;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use lru::LruCache;

use crate::keys::KeyId;
use crate::record::RecordId;
use crate::secret::DataKey;

struct Entry {
    version: u64,
    key_id: KeyId,
    dek: Arc<DataKey>,
    /// When it was filled, Unix seconds by the vault's clock.
    at: i64,
}

/// Counters for `Admin.Stats`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct CacheStats {
    /// Lookups answered from the cache.
    pub hits: u64,
    /// Lookups that needed an RSA unwrap.
    pub misses: u64,
    /// Entries held now.
    pub entries: u64,
}

/// A bounded, expiring cache of unwrapped data keys.
pub struct DekCache {
    inner: Mutex<LruCache<RecordId, Entry>>,
    ttl: Duration,
    hits: AtomicU64,
    misses: AtomicU64,
}

impl std::fmt::Debug for DekCache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DekCache")
            .field("ttl", &self.ttl)
            .finish_non_exhaustive()
    }
}

impl DekCache {
    /// A cache of at most `max_entries` keys, each kept at most `ttl`.
    pub fn new(max_entries: NonZeroUsize, ttl: Duration) -> Self {
        Self {
            inner: Mutex::new(LruCache::new(max_entries)),
            ttl,
            hits: AtomicU64::new(0),
            misses: AtomicU64::new(0),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, LruCache<RecordId, Entry>> {
        self.inner
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// The cached key for this exact record version and wrapping key, if fresh at `now` (Unix
    /// seconds by the vault's clock, which tests move).
    pub fn get(
        &self,
        id: &RecordId,
        version: u64,
        key_id: &KeyId,
        now: i64,
    ) -> Option<Arc<DataKey>> {
        let ttl = i64::try_from(self.ttl.as_secs()).unwrap_or(i64::MAX);
        let mut cache = self.lock();
        let hit = match cache.get(id) {
            Some(e)
                if e.version == version
                    && e.key_id == *key_id
                    && now.saturating_sub(e.at) < ttl =>
            {
                Some(Arc::clone(&e.dek))
            }
            Some(_) => {
                // Stale: drop it now rather than at eviction.
                cache.pop(id);
                None
            }
            None => None,
        };
        let counter = if hit.is_some() {
            &self.hits
        } else {
            &self.misses
        };
        counter.fetch_add(1, Ordering::Relaxed);
        hit
    }

    /// Whether a key of this record is cached (of whichever version, fresh or not), without
    /// counting a hit or a miss or touching its place in the eviction order.
    pub fn holds(&self, id: &RecordId) -> bool {
        self.lock().peek(id).is_some()
    }

    /// Remembers the key that opened this record version at `now`.
    pub fn put(&self, id: RecordId, version: u64, key_id: KeyId, dek: Arc<DataKey>, now: i64) {
        self.lock().put(
            id,
            Entry {
                version,
                key_id,
                dek,
                at: now,
            },
        );
    }

    /// Forgets one record's key.
    pub fn remove(&self, id: &RecordId) {
        self.lock().pop(id);
    }

    /// Forgets every key.
    pub fn clear(&self) {
        self.lock().clear();
    }

    /// Hit and miss counters and the current size.
    pub fn stats(&self) -> CacheStats {
        CacheStats {
            hits: self.hits.load(Ordering::Relaxed),
            misses: self.misses.load(Ordering::Relaxed),
            entries: self.lock().len() as u64,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dek(b: u8) -> Arc<DataKey> {
        Arc::new(DataKey::from_slice(&[b; 32]).expect("32 bytes"))
    }

    #[test]
    fn hits_only_for_the_same_version_and_key_and_within_ttl() {
        let cache = DekCache::new(NonZeroUsize::new(2).expect("2"), Duration::from_secs(2));
        let (a, b, c) = (
            RecordId::parse("a").expect("id"),
            RecordId::parse("b").expect("id"),
            RecordId::parse("c").expect("id"),
        );
        let k1 = KeyId([1; 32]);
        cache.put(a.clone(), 1, k1, dek(7), 100);
        assert_eq!(
            cache.get(&a, 1, &k1, 100).expect("hit").expose_secret(),
            &[7; 32]
        );
        assert!(cache.get(&a, 2, &k1, 100).is_none(), "another version");
        assert!(
            cache.get(&a, 1, &k1, 100).is_none(),
            "a stale entry is dropped"
        );
        cache.put(a.clone(), 1, k1, dek(7), 100);
        assert!(
            cache.get(&a, 1, &KeyId([2; 32]), 100).is_none(),
            "another key"
        );
        cache.put(a.clone(), 1, k1, dek(7), 100);
        cache.put(b.clone(), 1, k1, dek(8), 100);
        cache.put(c.clone(), 1, k1, dek(9), 100);
        assert!(
            cache.get(&a, 1, &k1, 100).is_none(),
            "least recently used evicted at capacity"
        );
        assert!(cache.get(&c, 1, &k1, 101).is_some(), "fresh within its ttl");
        assert!(cache.get(&c, 1, &k1, 102).is_none(), "expired at its ttl");
        cache.put(c.clone(), 1, k1, dek(9), 102);
        cache.remove(&c);
        assert!(cache.get(&c, 1, &k1, 102).is_none());
        let s = cache.stats();
        assert_eq!((s.hits, s.entries), (2, 1));
        cache.clear();
        assert_eq!(cache.stats().entries, 0);
    }
}
