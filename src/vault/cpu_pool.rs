//! A fixed pool of one thread per core for private-key work (`GetToken`, `Proxy`).
//!
//! Jobs wait in a queue rather than as threads: with 64 requests in flight, tokio's blocking
//! pool would run 64 RSA operations on 2 cores at once and spend the difference switching
//! between them. Here each core's thread takes the next job as soon as it is done.
//!
//! Under a backlog, a thread hands its finished results back a few at a time instead of one by
//! one. Each hand-back wakes an executor thread, which on a machine whose cores are all busy
//! with RSA means preempting one of them; grouping the wake-ups measured +10% uncached
//! `GetToken` throughput on 2 cores (README, Performance). A result is held back only while
//! at least `threads` more jobs are queued behind it, i.e. when the caller's wait is already
//! several jobs long, and for at most [`MAX_HELD`] jobs; with no backlog every result is
//! handed back at once.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};

/// The hand-back of a finished job's result.
type Done = Box<dyn FnOnce() + Send>;
type Job = Box<dyn FnOnce() -> Done + Send>;

/// Most results a thread holds back before handing them all back.
const MAX_HELD: usize = 8;

struct Queue {
    rx: Mutex<mpsc::Receiver<Job>>,
    /// Jobs sent and not yet taken by a thread.
    waiting: AtomicUsize,
}

/// The pool; dropping it lets the threads finish the queue and exit.
pub(super) struct CpuPool {
    tx: Mutex<Option<mpsc::Sender<Job>>>,
    queue: Arc<Queue>,
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
        let threads = threads.max(1);
        let queue = Arc::new(Queue {
            rx: Mutex::new(rx),
            waiting: AtomicUsize::new(0),
        });
        let handles = (0..threads)
            .map(|i| {
                let queue = Arc::clone(&queue);
                std::thread::Builder::new()
                    .name(format!("tokenvault-cpu-{i}"))
                    .spawn(move || work(&queue, threads))
            })
            .collect::<std::io::Result<Vec<_>>>()?;
        Ok(Self {
            tx: Mutex::new(Some(tx)),
            queue,
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
            let out = f();
            Box::new(move || {
                let _ = reply.send(out);
            })
        });
        {
            let tx = self
                .tx
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            self.queue.waiting.fetch_add(1, Ordering::SeqCst);
            if tx
                .as_ref()
                .map(|tx| tx.send(job))
                .is_none_or(|r| r.is_err())
            {
                self.queue.waiting.fetch_sub(1, Ordering::SeqCst);
                return None;
            }
        }
        answer.await.ok()
    }
}

/// One pool thread: runs jobs until the pool is dropped and its queue drained.
fn work(queue: &Queue, threads: usize) {
    let mut held: Vec<Done> = Vec::new();
    let hand_back = |held: &mut Vec<Done>| held.drain(..).for_each(|done| done());
    loop {
        let next = if held.is_empty() {
            queue
                .rx
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .recv()
                .map_err(|_| true)
        } else {
            // Never wait for the lock while holding results: its holder is blocked in `recv`
            // on an empty queue, and the callers it waits for may be the ones held here.
            match queue.rx.try_lock() {
                Ok(rx) => rx
                    .try_recv()
                    .map_err(|e| e == mpsc::TryRecvError::Disconnected),
                Err(_) => Err(false),
            }
        };
        match next {
            Ok(job) => {
                queue.waiting.fetch_sub(1, Ordering::SeqCst);
                // A panicking job drops its reply (the caller gets `None`); the thread lives on.
                if let Ok(done) = std::panic::catch_unwind(std::panic::AssertUnwindSafe(job)) {
                    held.push(done);
                }
                if held.len() >= MAX_HELD || queue.waiting.load(Ordering::SeqCst) < threads {
                    hand_back(&mut held);
                }
            }
            Err(closed) => {
                hand_back(&mut held);
                if closed {
                    return;
                }
            }
        }
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

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn every_caller_gets_its_own_result_under_a_backlog() {
        let pool = Arc::new(CpuPool::start(2).expect("pool"));
        // 200 jobs queued at once: results are held back and handed back in groups, and
        // every caller must still get its own answer.
        let mut calls = tokio::task::JoinSet::new();
        for i in 0..200u64 {
            let pool = Arc::clone(&pool);
            calls.spawn(async move {
                let got = pool
                    .run(move || {
                        std::thread::sleep(Duration::from_micros(200));
                        i * 3
                    })
                    .await;
                (i, got)
            });
        }
        let mut answered = 0;
        while let Some(r) = calls.join_next().await {
            let (i, got) = r.expect("task");
            assert_eq!(got, Some(i * 3));
            answered += 1;
        }
        assert_eq!(answered, 200);
        assert_eq!(pool.queue.waiting.load(Ordering::SeqCst), 0);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn callers_that_wait_for_each_answer_never_stall() {
        // A closed loop, like workers over gRPC: each caller sends its next job only after its
        // last answer. Results held back while the queue drains must still reach them.
        let pool = Arc::new(CpuPool::start(2).expect("pool"));
        let mut callers = tokio::task::JoinSet::new();
        for c in 0..8u32 {
            let pool = Arc::clone(&pool);
            callers.spawn(async move {
                for i in 0..300u32 {
                    let got = pool
                        .run(move || {
                            std::thread::sleep(Duration::from_micros(20));
                            c * 1000 + i
                        })
                        .await;
                    assert_eq!(got, Some(c * 1000 + i));
                }
            });
        }
        tokio::time::timeout(Duration::from_secs(60), async {
            while let Some(r) = callers.join_next().await {
                r.expect("caller");
            }
        })
        .await
        .expect("no caller stalled");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_lone_job_is_answered_without_waiting_for_more_work() {
        let pool = CpuPool::start(2).expect("pool");
        // With results held back, a lone caller would wait forever for a job that never
        // comes: the timeout turns that into a failure instead of a hang.
        for i in 0..50 {
            let got = tokio::time::timeout(Duration::from_secs(5), pool.run(move || i))
                .await
                .expect("answered without more work arriving");
            assert_eq!(got, Some(i));
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_panicking_job_fails_alone_and_the_pool_lives_on() {
        let pool = CpuPool::start(1).expect("pool");
        let panicked = pool.run(|| -> u8 { panic!("job failed") }).await;
        assert_eq!(panicked, None);
        // The single thread survived the panic and still serves.
        assert_eq!(pool.run(|| 7u8).await, Some(7));
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_stopped_pool_answers_none() {
        let pool = CpuPool::start(1).expect("pool");
        drop(pool.tx.lock().expect("lock").take());
        assert_eq!(pool.run(|| 1u8).await, None);
        assert_eq!(pool.queue.waiting.load(Ordering::SeqCst), 0);
    }
}
