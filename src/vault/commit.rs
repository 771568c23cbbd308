//! Group commit for `Ingest`: concurrent `PutSealed` / `PutSealedBatch` requests share one
//! durable (fsync'd) RocksDB write.
//!
//! One committer thread takes every request queued while the previous write was syncing (up to
//! [`MAX_GROUPS`]) and hands them to [`TokenStore::put_record_groups`]: each request keeps its
//! own atomicity and outcome, and is acknowledged only after the write that contains it is on
//! disk. Under load a sync is shared by many callers; alone, a caller pays one sync as before.

use std::sync::Arc;
use std::sync::mpsc;

use crate::store::{RecordWrite, StoreError, TokenStore};

/// Most requests in one commit.
pub const MAX_GROUPS: usize = 1024;

struct Pending {
    writes: Vec<RecordWrite>,
    reply: tokio::sync::oneshot::Sender<Result<Vec<u64>, StoreError>>,
}

/// The committer thread and its queue.
pub(super) struct GroupCommit {
    tx: Option<mpsc::Sender<Pending>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl std::fmt::Debug for GroupCommit {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GroupCommit").finish_non_exhaustive()
    }
}

impl GroupCommit {
    /// Starts the committer over `store`.
    pub(super) fn start(store: Arc<dyn TokenStore>) -> std::io::Result<Self> {
        let (tx, rx) = mpsc::channel::<Pending>();
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
                    match store.put_record_groups(&groups, crate::unix_now()) {
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
        })
    }

    /// Queues one atomic request and waits until it is durable (or refused).
    pub(super) async fn submit(&self, writes: Vec<RecordWrite>) -> Result<Vec<u64>, StoreError> {
        let (reply, answer) = tokio::sync::oneshot::channel();
        let gone = || StoreError::Engine("the commit thread has stopped".into());
        self.tx
            .as_ref()
            .ok_or_else(gone)?
            .send(Pending { writes, reply })
            .map_err(|_| gone())?;
        answer.await.map_err(|_| gone())?
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
