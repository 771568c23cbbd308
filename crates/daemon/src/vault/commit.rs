//! Group commit for `Ingest`: concurrent `PutSealed` / `PutSealedBatch` requests share one
//! durable (fsync'd) RocksDB write.
//!
//! One committer thread takes every request queued while the previous write was syncing (up to
//! [`MAX_GROUPS`]) and hands them to [`RecordStore::put_record_groups`]: each request keeps its
//! own atomicity and outcome, and is acknowledged only after the write that contains it is on
//! disk. Under load a sync is shared by many callers; alone, a caller pays one sync as before.
//! Every record an accepted request creates or replaces gets its audit event (caller, created
//! or replaced, version, key version) in that same write.

use std::sync::Arc;
use std::sync::mpsc;

use crate::audit::{Auditor, ChainSealer, Draft};
use crate::record::Record;
use crate::store::{AuditAppend, GroupAudit, RecordWrite, StoreError, TokenStore};

/// Most requests in one commit.
pub const MAX_GROUPS: usize = 1024;

struct Pending {
    writes: Vec<RecordWrite>,
    /// Who asked, and how (`PutSealed`, `PutSealedBatch`): the audit events' caller and action.
    caller: String,
    action: &'static str,
    reply: tokio::sync::oneshot::Sender<Result<Vec<u64>, StoreError>>,
}

/// The audit events of the requests a commit accepts: one per record.
struct Events {
    sealer: Arc<ChainSealer>,
    callers: Vec<(String, &'static str)>,
}

impl GroupAudit for Events {
    fn seal(&self, accepted: &[(usize, &[Record])]) -> Vec<AuditAppend> {
        let drafts: Vec<Draft> = accepted
            .iter()
            .flat_map(|(group, records)| {
                let (caller, action) = &self.callers[*group];
                records
                    .iter()
                    .map(move |r| stored_draft(caller, action, &r.meta, r.version, r.key_version))
            })
            .collect();
        self.sealer.seal(&drafts)
    }
}

/// The audit event of a record an ingest request created or replaced (at `version`, under
/// `key_version`), whichever write path stored it.
pub(super) fn stored_draft(
    caller: &str,
    action: &str,
    meta: &crate::record::RecordMeta,
    version: u64,
    key_version: u32,
) -> Draft {
    let change = if version == 1 { "created" } else { "replaced" };
    Draft::new(caller, action)
        .record(meta.id.as_str())
        .owner(meta.owner.as_str())
        .outcome("ok")
        .detail(format!(
            "{change}: version {version}, key version {key_version}"
        ))
}

/// The committer thread and its queue.
pub(super) struct GroupCommit {
    tx: Option<mpsc::Sender<Pending>>,
    thread: Option<std::thread::JoinHandle<()>>,
    /// Requests queued or being written; at most `max_pending`, beyond which a request is
    /// refused at once rather than queued.
    pending: Arc<std::sync::atomic::AtomicUsize>,
    max_pending: usize,
    metrics: Arc<super::metrics::Metrics>,
}

impl std::fmt::Debug for GroupCommit {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GroupCommit").finish_non_exhaustive()
    }
}

impl GroupCommit {
    /// Starts the committer over `store`, auditing into `audit`, with at most `max_pending`
    /// requests waiting.
    pub(super) fn start(
        store: Arc<dyn TokenStore>,
        audit: Arc<Auditor>,
        max_pending: usize,
        metrics: Arc<super::metrics::Metrics>,
    ) -> std::io::Result<Self> {
        let (tx, rx) = mpsc::channel::<Pending>();
        let pending_count = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let done = Arc::clone(&pending_count);
        let thread = std::thread::Builder::new()
            .name("tokenvault-commit".into())
            .spawn(move || {
                while let Ok(first) = rx.recv() {
                    let mut pending = vec![first];
                    while pending.len() < MAX_GROUPS {
                        match rx.try_recv() {
                            Ok(p) => pending.push(p),
                            Err(_) => break,
                        }
                    }
                    let groups: Vec<&[RecordWrite]> =
                        pending.iter().map(|p| p.writes.as_slice()).collect();
                    let callers: Vec<(String, &'static str)> = pending
                        .iter()
                        .map(|p| (p.caller.clone(), p.action))
                        .collect();
                    let written = audit.append_decided(|sealer| {
                        store.put_record_groups(
                            &groups,
                            crate::unix_now(),
                            Arc::new(Events { sealer, callers }),
                        )
                    });
                    done.fetch_sub(pending.len(), std::sync::atomic::Ordering::SeqCst);
                    match written {
                        Ok(outcomes) => {
                            for (p, outcome) in pending.into_iter().zip(outcomes) {
                                // The caller may have gone away; its write stands.
                                let _ = p.reply.send(outcome);
                            }
                        }
                        Err(e) => {
                            for p in pending {
                                let _ = p.reply.send(Err(e.clone()));
                            }
                        }
                    }
                }
            })?;
        Ok(Self {
            tx: Some(tx),
            thread: Some(thread),
            pending: pending_count,
            max_pending: max_pending.max(1),
            metrics,
        })
    }

    /// Queues one atomic request of `caller`'s `action` and waits until it is durable, with
    /// its audit events (or refused).
    pub(super) async fn submit(
        &self,
        writes: Vec<RecordWrite>,
        caller: &str,
        action: &'static str,
    ) -> Result<Vec<u64>, super::VaultError> {
        use std::sync::atomic::Ordering;
        let queued = self.pending.fetch_add(1, Ordering::SeqCst);
        if queued >= self.max_pending {
            self.pending.fetch_sub(1, Ordering::SeqCst);
            self.metrics.shed("commit_queue_full");
            return Err(super::VaultError::Overloaded {
                reason: format!(
                    "{queued} write requests wait for the store (max_queued is {})",
                    self.max_pending
                ),
                // About one group commit.
                retry_ms: 50,
            });
        }
        let (reply, answer) = tokio::sync::oneshot::channel();
        let gone = || StoreError::Engine("the commit thread has stopped".into());
        let sent = self.tx.as_ref().ok_or_else(gone).and_then(|tx| {
            tx.send(Pending {
                writes,
                caller: caller.to_string(),
                action,
                reply,
            })
            .map_err(|_| gone())
        });
        if let Err(e) = sent {
            self.pending.fetch_sub(1, Ordering::SeqCst);
            return Err(e.into());
        }
        Ok(answer.await.map_err(|_| gone())??)
    }
}

impl Drop for GroupCommit {
    /// Closes the queue and waits for the thread, so the store is released when the daemon
    /// state is.
    fn drop(&mut self) {
        drop(self.tx.take());
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}
