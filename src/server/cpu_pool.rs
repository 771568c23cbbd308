//! A fixed pool of one thread per core for private-key work (`GetToken`, `Proxy`).
//!
//! Jobs wait in a queue rather than as threads: with 64 requests in flight, tokio's blocking
//! pool would run 64 RSA operations on 2 cores at once and spend the difference switching
//! between them. Here each core's thread takes the next job as soon as it is done.

use std::sync::mpsc;
use std::sync::{Arc, Mutex};

type Job = Box<dyn FnOnce() + Send>;

/// The pool; dropping it lets the threads finish the queue and exit.
pub(super) struct CpuPool {
    tx: Mutex<Option<mpsc::Sender<Job>>>,
    threads: Mutex<Vec<std::thread::JoinHandle<()>>>,
}

impl std::fmt::Debug for CpuPool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CpuPool").finish_non_exhaustive()
    }
}

impl CpuPool {
    /// Starts `threads` workers.
    pub(super) fn start(threads: usize) -> std::io::Result<Self> {
        let (tx, rx) = mpsc::channel::<Job>();
        let rx = Arc::new(Mutex::new(rx));
        let handles = (0..threads.max(1))
            .map(|i| {
                let rx = Arc::clone(&rx);
                std::thread::Builder::new()
                    .name(format!("tokenvault-cpu-{i}"))
                    .spawn(move || {
                        loop {
                            let job = {
                                let rx =
                                    rx.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
                                rx.recv()
                            };
                            match job {
                                Ok(job) => job(),
                                Err(_) => return,
                            }
                        }
                    })
            })
            .collect::<std::io::Result<Vec<_>>>()?;
        Ok(Self {
            tx: Mutex::new(Some(tx)),
            threads: Mutex::new(handles),
        })
    }

    /// Runs `f` on the pool and waits for its result; `None` if the pool has stopped or the
    /// job panicked.
    pub(super) async fn run<T: Send + 'static>(
        &self,
        f: impl FnOnce() -> T + Send + 'static,
    ) -> Option<T> {
        let (reply, answer) = tokio::sync::oneshot::channel();
        let job: Job = Box::new(move || {
            let _ = reply.send(f());
        });
        self.tx
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .as_ref()?
            .send(job)
            .ok()?;
        answer.await.ok()
    }
}

impl Drop for CpuPool {
    fn drop(&mut self) {
        drop(
            self.tx
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .take(),
        );
        let me = std::thread::current().id();
        for t in self
            .threads
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .drain(..)
        {
            // A job may hold the last reference to the daemon state, so the pool can be dropped
            // from one of its own threads, which cannot join itself; it exits on its own.
            if t.thread().id() != me {
                let _ = t.join();
            }
        }
    }
}
