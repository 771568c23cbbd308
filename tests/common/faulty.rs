//! A real store with a fault switch: every call goes to the wrapped [`TokenStore`] (a
//! `MemoryStore` or `RocksStore`), except writes that touch a chosen record or any grant, which
//! fail with an engine error while the switch is on. Proves that a failure mid-way through an
//! operation leaves nothing half-written. A second switch makes every write (records, keys,
//! metadata, audit events) wait a set time first, as a slow or distant database does. A third
//! offers record reads to await (`RecordStore::read_record`, as the PostgreSQL store does) and
//! can hold them unanswered.
#![allow(dead_code, reason = "each test binary uses a different part")]

use std::sync::{Arc, Mutex};

use tokenvault::keys::KeyInfo;
use tokenvault::record::{Owner, Record, RecordId};
use tokenvault::store::{
    AuditAppend, AuditLog, EnvelopeReplace, KeyRegistry, Leases, MetaStore, Mutation, RecordStore,
    RecordWrite, StoreError, StoreStats, TestHooks, Transfer,
};

#[derive(Default)]
struct Faults {
    record: Option<RecordId>,
    grants: bool,
}

pub struct FaultyStore {
    inner: Arc<dyn TestHooks>,
    faults: Mutex<Faults>,
    /// How long every write waits before it goes to `inner`.
    delay: Mutex<std::time::Duration>,
    /// Told each time a delayed write starts waiting.
    delayed: tokio::sync::Notify,
    /// Whether reads are offered to await, and whether those wait.
    awaited: tokio::sync::watch::Sender<Awaited>,
    /// Told each time an awaited read starts waiting.
    held: Arc<tokio::sync::Notify>,
}

/// How [`FaultyStore`] answers `RecordStore::read_record`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Awaited {
    /// As the wrapped store does (the embedded engines offer none).
    Off,
    /// Offered, and held until the switch leaves this state.
    Held,
    /// Offered, and answered at once from the wrapped store.
    Answered,
}

impl FaultyStore {
    pub fn new(inner: Arc<dyn TestHooks>) -> Self {
        Self {
            inner,
            faults: Mutex::new(Faults::default()),
            delay: Mutex::new(std::time::Duration::ZERO),
            delayed: tokio::sync::Notify::new(),
            awaited: tokio::sync::watch::Sender::new(Awaited::Off),
            held: Arc::new(tokio::sync::Notify::new()),
        }
    }

    /// How record reads to await are offered and answered from now on.
    pub fn awaited_reads(&self, mode: Awaited) {
        self.awaited.send_replace(mode);
    }

    /// Returns once an awaited read is held (at once if one was since the last call).
    pub async fn an_awaited_read_is_held(&self) {
        self.held.notified().await;
    }

    /// Every write waits `delay` first, from now on (zero: none does).
    pub fn delay_writes(&self, delay: std::time::Duration) {
        *self.delay.lock().expect("delay") = delay;
    }

    /// Returns once a delayed write has started waiting (at once if one did since the last call).
    pub async fn a_write_is_delayed(&self) {
        self.delayed.notified().await;
    }

    /// The write delay, on the calling (store) thread.
    fn pause(&self) {
        let delay = *self.delay.lock().expect("delay");
        if !delay.is_zero() {
            self.delayed.notify_one();
            std::thread::sleep(delay);
        }
    }

    /// Writes that change record `id` fail from now on (`None`: none do).
    pub fn fail_record(&self, id: Option<&str>) {
        self.faults.lock().expect("faults").record =
            id.map(|i| RecordId::parse(i).expect("record id"));
    }

    /// Writes that change a grant fail from now on.
    pub fn fail_grants(&self, on: bool) {
        self.faults.lock().expect("faults").grants = on;
    }

    fn check_record(&self, id: &RecordId) -> Result<(), StoreError> {
        match &self.faults.lock().expect("faults").record {
            Some(bad) if bad == id => Err(StoreError::Engine("injected write failure".into())),
            _ => Ok(()),
        }
    }

    fn check_grants(&self) -> Result<(), StoreError> {
        if self.faults.lock().expect("faults").grants {
            Err(StoreError::Engine("injected write failure".into()))
        } else {
            Ok(())
        }
    }
}

impl RecordStore for FaultyStore {
    fn put_record_groups(
        &self,
        groups: &[&[RecordWrite]],
        now: i64,
        audit: Arc<dyn tokenvault::store::GroupAudit>,
    ) -> Result<Vec<Result<Vec<u64>, StoreError>>, StoreError> {
        self.pause();
        for w in groups.iter().flat_map(|g| g.iter()) {
            self.check_record(&w.meta.id)?;
        }
        self.inner.put_record_groups(groups, now, audit)
    }

    fn get_record(&self, id: &RecordId) -> Result<Option<Record>, StoreError> {
        self.inner.get_record(id)
    }

    fn read_record(&self, id: &RecordId) -> Option<tokenvault::store::RecordRead> {
        if *self.awaited.borrow() == Awaited::Off {
            return self.inner.read_record(id);
        }
        let (inner, id) = (Arc::clone(&self.inner), id.clone());
        let (mut mode, held) = (self.awaited.subscribe(), Arc::clone(&self.held));
        Some(Box::pin(async move {
            if *mode.borrow_and_update() == Awaited::Held {
                held.notify_one();
                let _ = mode.wait_for(|m| *m != Awaited::Held).await;
            }
            inner.get_record(&id)
        }))
    }

    fn delete_owner(
        &self,
        owner: &Owner,
        expected: Option<&[(RecordId, u64)]>,
        audit: &AuditAppend,
        outbox: &[(String, Vec<u8>)],
    ) -> Result<u64, StoreError> {
        self.pause();
        self.inner.delete_owner(owner, expected, audit, outbox)
    }

    fn owner_record_ids(&self, owner: &Owner) -> Result<Vec<RecordId>, StoreError> {
        self.inner.owner_record_ids(owner)
    }

    fn stats(&self) -> Result<StoreStats, StoreError> {
        self.inner.stats()
    }

    fn scan_records(
        &self,
        after: Option<&RecordId>,
        limit: usize,
    ) -> Result<Vec<Record>, StoreError> {
        self.inner.scan_records(after, limit)
    }

    fn replace_envelopes(
        &self,
        items: &[EnvelopeReplace],
        now: i64,
    ) -> Result<Vec<Result<u64, StoreError>>, StoreError> {
        self.pause();
        for i in items {
            self.check_record(&i.id)?;
        }
        self.inner.replace_envelopes(items, now)
    }

    fn apply(
        &self,
        mutations: &[Mutation],
        audit: &[AuditAppend],
        now: i64,
    ) -> Result<(), StoreError> {
        self.pause();
        for m in mutations {
            match m {
                Mutation::PutRecord(w) => self.check_record(&w.meta.id)?,
                Mutation::Revoke(id)
                | Mutation::DeleteRecord(id)
                | Mutation::MarkNeedsReauth { id, .. } => self.check_record(id)?,
                Mutation::PutGrant { .. } | Mutation::DeleteGrant(_) => self.check_grants()?,
                _ => {}
            }
        }
        self.inner.apply(mutations, audit, now)
    }
}

impl MetaStore for FaultyStore {
    fn get_meta(&self, key: &str) -> Result<Option<Vec<u8>>, StoreError> {
        self.inner.get_meta(key)
    }

    fn put_meta(&self, key: &str, value: Option<&[u8]>) -> Result<(), StoreError> {
        self.pause();
        self.inner.put_meta(key, value)
    }

    fn get_grant(&self, id: &str) -> Result<Option<Vec<u8>>, StoreError> {
        self.inner.get_grant(id)
    }

    fn grant_page(
        &self,
        after: Option<&str>,
        limit: usize,
    ) -> Result<Vec<(String, Vec<u8>)>, StoreError> {
        self.inner.grant_page(after, limit)
    }

    fn outbox_page(
        &self,
        prefix: &str,
        after: Option<&str>,
        limit: usize,
    ) -> Result<Vec<(String, Vec<u8>)>, StoreError> {
        self.inner.outbox_page(prefix, after, limit)
    }
}

impl KeyRegistry for FaultyStore {
    fn keys(&self) -> Result<Vec<KeyInfo>, StoreError> {
        self.inner.keys()
    }

    fn put_keys(
        &self,
        keys: &[KeyInfo],
        audit: &AuditAppend,
        outbox: &[(String, Vec<u8>)],
    ) -> Result<(), StoreError> {
        self.pause();
        self.inner.put_keys(keys, audit, outbox)
    }

    fn retire_key(&self, key: &KeyInfo, audit: &AuditAppend) -> Result<(), StoreError> {
        self.pause();
        self.inner.retire_key(key, audit)
    }
}

impl AuditLog for FaultyStore {
    fn append_audit(&self, entry: &AuditAppend, sync: bool) -> Result<(), StoreError> {
        self.pause();
        self.inner.append_audit(entry, sync)
    }

    fn append_audit_batch(&self, entries: &[AuditAppend], sync: bool) -> Result<(), StoreError> {
        self.pause();
        self.inner.append_audit_batch(entries, sync)
    }

    fn audit_events(&self, from_seq: u64, limit: usize) -> Result<Vec<(u64, Vec<u8>)>, StoreError> {
        self.inner.audit_events(from_seq, limit)
    }

    fn last_audit_event(&self) -> Result<Option<(u64, Vec<u8>)>, StoreError> {
        self.inner.last_audit_event()
    }

    fn own_chain(&self) -> String {
        self.inner.own_chain()
    }

    fn prune_audit(
        &self,
        through: u64,
        meta: &[(String, Vec<u8>)],
        audit: &AuditAppend,
    ) -> Result<(), StoreError> {
        self.pause();
        self.inner.prune_audit(through, meta, audit)
    }
}

impl Transfer for FaultyStore {
    fn meta_page(
        &self,
        after: Option<&str>,
        limit: usize,
    ) -> Result<Vec<(String, Vec<u8>)>, StoreError> {
        self.inner.meta_page(after, limit)
    }

    fn import(&self, batch: &tokenvault::store::Import) -> Result<(), StoreError> {
        self.pause();
        self.inner.import(batch)
    }
}

#[cfg(any(test, feature = "testing"))]
impl TestHooks for FaultyStore {
    fn put_keys_unaudited(&self, keys: &[KeyInfo]) -> Result<(), StoreError> {
        self.pause();
        self.inner.put_keys_unaudited(keys)
    }

    fn retire_key_unaudited(&self, key: &KeyInfo) -> Result<(), StoreError> {
        self.pause();
        self.inner.retire_key_unaudited(key)
    }

    fn apply_unaudited(&self, mutations: &[Mutation], now: i64) -> Result<(), StoreError> {
        self.pause();
        self.inner.apply_unaudited(mutations, now)
    }

    fn put_records(&self, writes: &[RecordWrite], now: i64) -> Result<Vec<u64>, StoreError> {
        self.pause();
        for w in writes {
            self.check_record(&w.meta.id)?;
        }
        self.inner.put_records(writes, now)
    }

    fn dangerous_overwrite_audit(&self, seq: u64, bytes: &[u8]) -> Result<(), StoreError> {
        self.inner.dangerous_overwrite_audit(seq, bytes)
    }
}

impl Leases for FaultyStore {
    fn acquire_lease(
        &self,
        name: &str,
        owner: &str,
        ttl: std::time::Duration,
    ) -> Result<Option<u64>, StoreError> {
        self.inner.acquire_lease(name, owner, ttl)
    }

    fn release_lease(&self, name: &str, owner: &str) -> Result<(), StoreError> {
        self.inner.release_lease(name, owner)
    }
}
