//! A fixed pool of one thread per core for private-key work (`GetToken`, `Proxy`), and the
//! same kind of pool, with more threads, for those calls' store and audit steps.
//!
//! Jobs wait in a queue rather than as threads: with 64 requests in flight, tokio's blocking
//! pool would run 64 RSA operations on 2 cores at once and spend the difference switching
//! between them. Here each core's thread takes the next job as soon as it is done.
//!
//! Under a backlog, a thread hands its finished results back a few at a time instead of one by
//! one. Each hand-back wakes an executor thread, which on a machine whose cores are all busy
//! with RSA means preempting one of them; grouping the wake-ups measured +10% uncached
//! `GetToken` throughput on 2 cores (docs/PERFORMANCE.md). A result is held back only while
//! at least `threads` more jobs are queued behind it, i.e. when the caller's wait is already
//! several jobs long, and for at most [`MAX_HELD`] jobs; with no backlog every result is
//! handed back at once.
//!
//! Two bounds decide whether a job is taken on. A burst that arrives at an idle pool may wait
//! up to `max_queue_wait_ms`: it drains, and refusing it would only make its callers retry.
//! A queue that has not drained for [`STANDING_AFTER`] is not a burst but a standing queue
//! (more callers than the threads serve), where a longer queue adds only latency, never
//! throughput: there a job is taken on only if its predicted wait is within
//! `overload_queue_wait_ms`, so accepted calls stay fast and the rest are refused at once. This
//! is the server-queue form of CoDel (RFC 8289: its 100 ms interval; its target is
//! `overload_queue_wait_ms`), as Facebook describes it for its RPC servers ("Fail at Scale",
//! ACM Queue 13(8), 2015). The shorter bound stays while calls are refused and for a while after
//! the queue last stood (twice `max_queue_wait_ms`, at least a second, so longer than any retry
//! time a refusal gives): refused callers come back when their retry time has passed, and
//! taking them on as a burst would rebuild the queue each time.
//!
//! A caller waits for a thread at most `max_queue_wait_ms`, whether or not the threads ever
//! finish (a hung PKCS#11 token): then it is refused, and its job is skipped when reached.

use std::sync::atomic::{AtomicU8, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use super::metrics::Metrics;

/// The hand-back of a finished job's result.
type Done = Box<dyn FnOnce() + Send>;
type Job = Box<dyn FnOnce() -> Done + Send>;

/// Most results a thread holds back before handing them all back.
const MAX_HELD: usize = 8;

/// A job's turn: waiting for a thread, taken by one, or given up on by its caller.
const WAITING: u8 = 0;
const TAKEN: u8 = 1;
const GAVE_UP: u8 = 2;

/// A queue that has not drained for this long is standing (CoDel's interval, RFC 8289 4.3).
const STANDING_AFTER: Duration = Duration::from_millis(100);

struct Queue {
    /// Every thread waits on the channel itself: a job wakes only the thread that takes it.
    /// (With one `Mutex<mpsc::Receiver>` each job also woke the next thread in line for the
    /// lock, which took it and went back to sleep in `recv`: a context switch per job.)
    rx: crossbeam_channel::Receiver<Job>,
    /// Jobs sent and not yet taken by a thread.
    waiting: AtomicUsize,
    /// Moving average of a job's run time, in nanoseconds: with `waiting`, what a new job
    /// would wait.
    average_ns: AtomicU64,
    /// What each thread's running job started at: milliseconds since `epoch`, plus one (0:
    /// idle). Read by [`CpuPool::stuck`].
    running: Box<[AtomicU64]>,
    /// When the queue was last seen empty, in milliseconds since `epoch`.
    drained_ms: AtomicU64,
    /// When the queue was last seen standing, in milliseconds since `epoch` plus one (0: never).
    stood_ms: AtomicU64,
    /// How long the shorter bound stays after the queue last stood.
    remember_ms: u64,
    epoch: Instant,
}

impl Queue {
    fn now_ms(&self) -> u64 {
        u64::try_from(self.epoch.elapsed().as_millis()).unwrap_or(u64::MAX - 1)
    }

    /// Whether the queue has not drained for [`STANDING_AFTER`], or did not within the last
    /// `remember_ms`.
    fn standing(&self, now_ms: u64) -> bool {
        let since = now_ms.saturating_sub(self.drained_ms.load(Ordering::Relaxed));
        if u128::from(since) > STANDING_AFTER.as_millis() {
            self.stood_ms.store(now_ms + 1, Ordering::Relaxed);
            return true;
        }
        match self.stood_ms.load(Ordering::Relaxed) {
            0 => false,
            stood => now_ms.saturating_sub(stood - 1) < self.remember_ms,
        }
    }
}

/// How much work the pool takes on (`[limits] max_queued`, `max_queue_wait_ms`,
/// `overload_queue_wait_ms`).
#[derive(Debug, Clone, Copy)]
pub(super) struct Bound {
    /// Most jobs waiting at once.
    pub max_queued: usize,
    /// Longest a job may wait for a thread.
    pub max_wait: Duration,
    /// Longest predicted wait a job is taken on with while the queue is standing; at most
    /// `max_wait`.
    pub standing_wait: Duration,
}

/// Why a job did not run.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum Refused {
    /// The pool has stopped, or the job panicked.
    Failed,
    /// Refused at once: the queue is full, or the wait it predicts exceeds the bound.
    Full {
        /// Jobs waiting when it was refused.
        queued: usize,
        /// The wait predicted for it.
        predicted: Duration,
        /// Whether the queue was standing, so the shorter bound applied.
        standing: bool,
    },
    /// It waited longer than the bound for a thread (the prediction was wrong).
    Late(Duration),
}

/// What a pool is for: names its threads and the outcomes of the work it sheds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Kind {
    /// Private-key work: one thread per core (`tokenvault-cpu-N`).
    PrivateKey,
    /// The store reads, checks and audit writes of `GetToken` and `Proxy` (`tokenvault-io-N`).
    Io,
}

impl Kind {
    fn thread_name(self, i: usize) -> String {
        match self {
            Kind::PrivateKey => format!("tokenvault-cpu-{i}"),
            Kind::Io => format!("tokenvault-io-{i}"),
        }
    }

    /// The `tokenvault_shed_total` outcomes: queue full, waited too long, caller gone.
    fn shed(self) -> [&'static str; 3] {
        match self {
            Kind::PrivateKey => ["queue_full", "queue_wait", "caller_gone"],
            Kind::Io => ["io_queue_full", "io_queue_wait", "io_caller_gone"],
        }
    }
}

/// The pool; dropping it lets the threads finish the queue and exit.
pub(super) struct CpuPool {
    kind: Kind,
    tx: Mutex<Option<crossbeam_channel::Sender<Job>>>,
    queue: Arc<Queue>,
    threads: Mutex<Vec<std::thread::JoinHandle<()>>>,
    count: usize,
    bound: Bound,
    metrics: Arc<Metrics>,
}

impl std::fmt::Debug for CpuPool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CpuPool").finish_non_exhaustive()
    }
}

impl CpuPool {
    /// Starts `threads` workers that take on at most `bound`'s work.
    pub(super) fn start(
        kind: Kind,
        threads: usize,
        bound: Bound,
        metrics: Arc<Metrics>,
    ) -> std::io::Result<Self> {
        let (tx, rx) = crossbeam_channel::unbounded::<Job>();
        let threads = threads.max(1);
        let queue = Arc::new(Queue {
            rx,
            waiting: AtomicUsize::new(0),
            average_ns: AtomicU64::new(0),
            running: (0..threads).map(|_| AtomicU64::new(0)).collect(),
            drained_ms: AtomicU64::new(0),
            stood_ms: AtomicU64::new(0),
            remember_ms: u64::try_from(bound.max_wait.saturating_mul(2).as_millis())
                .unwrap_or(u64::MAX)
                .max(1000),
            epoch: Instant::now(),
        });
        let handles = (0..threads)
            .map(|i| {
                let queue = Arc::clone(&queue);
                std::thread::Builder::new()
                    .name(kind.thread_name(i))
                    .spawn(move || work(&queue, threads, i))
            })
            .collect::<std::io::Result<Vec<_>>>()?;
        Ok(Self {
            kind,
            tx: Mutex::new(Some(tx)),
            queue,
            threads: Mutex::new(handles),
            count: threads,
            bound,
            metrics,
        })
    }

    /// Its threads.
    pub(super) fn threads(&self) -> usize {
        self.count
    }

    /// Threads whose current job has run for `at_least` or longer: a private-key call that
    /// does not return (a PKCS#11 token that hangs) holds its thread for good.
    pub(super) fn stuck(&self, at_least: Duration) -> usize {
        let now = self.queue.now_ms();
        let limit = u64::try_from(at_least.as_millis()).unwrap_or(u64::MAX);
        self.queue
            .running
            .iter()
            .map(|r| r.load(Ordering::Relaxed))
            .filter(|&started| started != 0 && now.saturating_sub(started - 1) >= limit)
            .count()
    }

    /// The wait a job sent now would have before a thread takes it.
    fn predicted_wait(&self, queued: usize) -> Duration {
        let average = self.queue.average_ns.load(Ordering::Relaxed);
        let queued = u64::try_from(queued).unwrap_or(u64::MAX);
        let threads = u64::try_from(self.count).unwrap_or(1).max(1);
        Duration::from_nanos(queued.saturating_mul(average) / threads)
    }

    /// Runs `f` on the pool and waits for its result. Refused at once when the queue is full
    /// or the wait it predicts (jobs queued × their average run time ÷ threads) exceeds the
    /// bound (the shorter one while the queue is standing); refused once it has waited
    /// `max_wait` for a thread, and then skipped when reached; dropped unrun if its caller has
    /// gone by the time a thread takes it.
    pub(super) async fn run<T: Send + 'static>(
        &self,
        f: impl FnOnce() -> T + Send + 'static,
    ) -> Result<T, Refused> {
        let queued = self.queue.waiting.load(Ordering::Relaxed);
        let now = self.queue.now_ms();
        if queued == 0 {
            self.queue.drained_ms.store(now, Ordering::Relaxed);
        }
        let standing = self.queue.standing(now);
        let predicted = self.predicted_wait(queued);
        let bound = if standing {
            self.bound.standing_wait.min(self.bound.max_wait)
        } else {
            self.bound.max_wait
        };
        if queued >= self.bound.max_queued || predicted > bound {
            // Refusing is overload too: the shorter bound stays while calls are refused.
            self.queue.stood_ms.store(now + 1, Ordering::Relaxed);
            self.metrics.shed(self.kind.shed()[0]);
            return Err(Refused::Full {
                queued,
                predicted,
                standing,
            });
        }
        let (reply, mut answer) = tokio::sync::oneshot::channel();
        let (enqueued, max_wait) = (Instant::now(), self.bound.max_wait);
        let (queue, metrics) = (Arc::clone(&self.queue), Arc::clone(&self.metrics));
        let [_, late, gone] = self.kind.shed();
        // Whether a thread took the job or its caller stopped waiting for one, whichever came
        // first: the other then knows.
        let turn = Arc::new(AtomicU8::new(WAITING));
        let taken = Arc::clone(&turn);
        let job: Job = Box::new(move || {
            let waited = enqueued.elapsed();
            if taken
                .compare_exchange(WAITING, TAKEN, Ordering::AcqRel, Ordering::Acquire)
                .is_err()
            {
                // Refused already, and counted then.
                return Box::new(|| {});
            }
            if reply.is_closed() {
                // The caller went away (its deadline passed, its connection closed): its
                // private-key work would be for nobody.
                metrics.shed(gone);
                return Box::new(|| {});
            }
            if waited > max_wait {
                metrics.shed(late);
                return Box::new(move || {
                    let _ = reply.send(Err(Refused::Late(waited)));
                });
            }
            let started = Instant::now();
            let out = f();
            let took = u64::try_from(started.elapsed().as_nanos()).unwrap_or(u64::MAX);
            // An exponential moving average over about 16 jobs: follows a change of load
            // within milliseconds, smooths one slow job out.
            let _ = queue
                .average_ns
                .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |avg| {
                    Some(if avg == 0 {
                        took
                    } else {
                        avg - avg / 16 + took / 16
                    })
                });
            Box::new(move || {
                let _ = reply.send(Ok(out));
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
                return Err(Refused::Failed);
            }
        }
        tokio::select! {
            biased;
            result = &mut answer => return result.unwrap_or(Err(Refused::Failed)),
            () = tokio::time::sleep(max_wait) => {}
        }
        if turn
            .compare_exchange(WAITING, GAVE_UP, Ordering::AcqRel, Ordering::Acquire)
            .is_ok()
        {
            self.metrics.shed(late);
            return Err(Refused::Late(max_wait));
        }
        // A thread has it: its result comes however long it runs.
        answer.await.unwrap_or(Err(Refused::Failed))
    }
}

/// One pool thread (the `index`th): runs jobs until the pool is dropped and its queue drained.
fn work(queue: &Queue, threads: usize, index: usize) {
    let mut held: Vec<Done> = Vec::new();
    let hand_back = |held: &mut Vec<Done>| held.drain(..).for_each(|done| done());
    loop {
        let next = if held.is_empty() {
            queue.rx.recv().map_err(|_| true)
        } else {
            // Never wait while holding results: the callers a later job waits for may be the
            // ones held here.
            queue
                .rx
                .try_recv()
                .map_err(|e| e == crossbeam_channel::TryRecvError::Disconnected)
        };
        match next {
            Ok(job) => {
                if queue.waiting.fetch_sub(1, Ordering::SeqCst) == 1 {
                    queue.drained_ms.store(queue.now_ms(), Ordering::Relaxed);
                }
                let running = &queue.running[index];
                running.store(queue.now_ms() + 1, Ordering::Relaxed);
                // A panicking job drops its reply (the caller gets `None`); the thread lives on.
                let ran = std::panic::catch_unwind(std::panic::AssertUnwindSafe(job));
                running.store(0, Ordering::Relaxed);
                if let Ok(done) = ran {
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
    use std::sync::mpsc;

    fn unbounded() -> Bound {
        Bound {
            max_queued: usize::MAX,
            max_wait: Duration::from_secs(3600),
            standing_wait: Duration::from_secs(3600),
        }
    }

    fn pool(threads: usize) -> CpuPool {
        CpuPool::start(Kind::PrivateKey, threads, unbounded(), Arc::default()).expect("pool")
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_thread_whose_job_does_not_return_is_counted_stuck_until_it_does() {
        let pool = Arc::new(pool(2));
        assert_eq!(pool.stuck(Duration::ZERO), 0, "idle threads are not stuck");
        let (release, hung) = hold_a_thread(&pool).await;
        tokio::time::sleep(Duration::from_millis(30)).await;
        assert_eq!(pool.stuck(Duration::from_millis(20)), 1);
        assert_eq!(pool.stuck(Duration::from_secs(60)), 0, "not that long");
        // The other thread still serves, and is not counted.
        assert_eq!(pool.run(|| 7).await, Ok(7));
        assert_eq!(pool.stuck(Duration::from_millis(20)), 1);
        release.send(()).expect("release");
        assert_eq!(hung.await.expect("task"), Ok(true));
        assert_eq!(pool.stuck(Duration::ZERO), 0);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn every_caller_gets_its_own_result_under_a_backlog() {
        let pool = Arc::new(pool(2));
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
                    .await
                    .ok();
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
        let pool = Arc::new(pool(2));
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
                        .await
                        .ok();
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
        let pool = pool(2);
        // With results held back, a lone caller would wait forever for a job that never
        // comes: the timeout turns that into a failure instead of a hang.
        for i in 0..50 {
            let got = tokio::time::timeout(Duration::from_secs(5), pool.run(move || i))
                .await
                .expect("answered without more work arriving");
            assert_eq!(got, Ok(i));
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_panicking_job_fails_alone_and_the_pool_lives_on() {
        let pool = pool(1);
        let panicked = pool.run(|| -> u8 { panic!("job failed") }).await;
        assert_eq!(panicked, Err(Refused::Failed));
        // The single thread survived the panic and still serves.
        assert_eq!(pool.run(|| 7u8).await, Ok(7));
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_stopped_pool_answers_none() {
        let pool = pool(1);
        drop(pool.tx.lock().expect("lock").take());
        assert_eq!(pool.run(|| 1u8).await, Err(Refused::Failed));
        assert_eq!(pool.queue.waiting.load(Ordering::SeqCst), 0);
    }

    /// Runs a job that holds one pool thread until the sender is used (or dropped).
    async fn hold_a_thread(
        pool: &Arc<CpuPool>,
    ) -> (
        mpsc::Sender<()>,
        tokio::task::JoinHandle<Result<bool, Refused>>,
    ) {
        let (release, hold) = mpsc::channel::<()>();
        let (started_tx, started) = tokio::sync::oneshot::channel::<()>();
        let holder = {
            let pool = Arc::clone(pool);
            tokio::spawn(async move {
                pool.run(move || {
                    let _ = started_tx.send(());
                    hold.recv().is_ok()
                })
                .await
            })
        };
        started.await.expect("the holder runs");
        (release, holder)
    }

    /// With the pool's one thread held, queues `n` jobs, waits `after`, and returns what a
    /// further job got; then lets the thread go and checks the queued jobs all ran.
    async fn refused_behind(pool: &Arc<CpuPool>, n: usize, after: Duration) -> Result<u8, Refused> {
        let (release, holder) = hold_a_thread(pool).await;
        let mut queued = Vec::new();
        for i in 1..=n {
            let p = Arc::clone(pool);
            queued.push(tokio::spawn(async move { p.run(|| 5u8).await }));
            while pool.queue.waiting.load(Ordering::SeqCst) < i {
                tokio::task::yield_now().await;
            }
        }
        tokio::time::sleep(after).await;
        let further = pool.run(|| 9u8).await;
        release.send(()).expect("release");
        assert_eq!(holder.await.expect("task"), Ok(true));
        for q in queued {
            assert_eq!(q.await.expect("task"), Ok(5));
        }
        further
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn overload_is_refused_at_once_and_what_was_accepted_runs() {
        let metrics = Arc::new(Metrics::default());
        let pool = Arc::new(
            CpuPool::start(
                Kind::PrivateKey,
                1,
                Bound {
                    max_queued: 4,
                    max_wait: Duration::from_secs(60),
                    standing_wait: Duration::from_secs(60),
                },
                Arc::clone(&metrics),
            )
            .expect("pool"),
        );
        // One job holds the only thread until released; four more fill the queue.
        let (release, holder) = hold_a_thread(&pool).await;
        let mut queued = Vec::new();
        for i in 0..4u8 {
            let pool = Arc::clone(&pool);
            queued.push(tokio::spawn(async move { pool.run(move || i).await }));
        }
        while pool.queue.waiting.load(Ordering::SeqCst) < 4 {
            tokio::task::yield_now().await;
        }
        let refused = pool.run(|| 9u8).await;
        assert!(
            matches!(refused, Err(Refused::Full { queued: 4, .. })),
            "{refused:?}"
        );
        release.send(()).expect("release");
        assert_eq!(holder.await.expect("task"), Ok(true));
        for (i, q) in queued.into_iter().enumerate() {
            assert_eq!(q.await.expect("task"), Ok(u8::try_from(i).expect("small")));
        }
        let text = metrics.encode_for_test();
        assert!(
            text.contains(r#"tokenvault_shed_total{outcome="queue_full"} 1"#),
            "{text}"
        );
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_job_that_waited_too_long_or_lost_its_caller_does_not_run() {
        let metrics = Arc::new(Metrics::default());
        let pool = Arc::new(
            CpuPool::start(
                Kind::PrivateKey,
                1,
                Bound {
                    max_queued: 100,
                    max_wait: Duration::from_millis(50),
                    standing_wait: Duration::from_millis(50),
                },
                Arc::clone(&metrics),
            )
            .expect("pool"),
        );
        let ran = Arc::new(AtomicUsize::new(0));
        let (release, holder) = hold_a_thread(&pool).await;
        // Nothing has run yet, so nothing predicts a wait: both are accepted.
        let late = {
            let (pool, ran) = (Arc::clone(&pool), Arc::clone(&ran));
            tokio::spawn(async move { pool.run(move || ran.fetch_add(1, Ordering::SeqCst)).await })
        };
        let gone = {
            let (pool, ran) = (Arc::clone(&pool), Arc::clone(&ran));
            tokio::spawn(async move { pool.run(move || ran.fetch_add(1, Ordering::SeqCst)).await })
        };
        while pool.queue.waiting.load(Ordering::SeqCst) < 2 {
            tokio::task::yield_now().await;
        }
        gone.abort();
        let _ = gone.await;
        // Refused at the bound while the thread is still held: a hung thread does not keep its
        // callers waiting.
        let started = Instant::now();
        assert!(
            matches!(late.await.expect("task"), Err(Refused::Late(w)) if w >= Duration::from_millis(50))
        );
        assert!(started.elapsed() < Duration::from_secs(5));
        release.send(()).expect("release");
        assert_eq!(holder.await.expect("task"), Ok(true));
        // The thread reaches both jobs and runs neither.
        let deadline = Instant::now() + Duration::from_secs(5);
        let text = loop {
            let text = metrics.encode_for_test();
            if text.contains(r#"tokenvault_shed_total{outcome="caller_gone"} 1"#) {
                break text;
            }
            assert!(Instant::now() < deadline, "{text}");
            tokio::time::sleep(Duration::from_millis(5)).await;
        };
        while pool.queue.waiting.load(Ordering::SeqCst) > 0 {
            tokio::task::yield_now().await;
        }
        assert_eq!(pool.run(|| 1).await, Ok(1));
        assert_eq!(ran.load(Ordering::SeqCst), 0);
        assert!(
            text.contains(r#"tokenvault_shed_total{outcome="queue_wait"} 1"#),
            "{text}"
        );
        assert!(
            text.contains(r#"tokenvault_shed_total{outcome="caller_gone"} 1"#),
            "{text}"
        );
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_standing_queue_takes_on_only_the_shorter_wait_and_keeps_it_while_refusing() {
        let pool = Arc::new(
            CpuPool::start(
                Kind::PrivateKey,
                1,
                Bound {
                    max_queued: 100,
                    max_wait: Duration::from_secs(30),
                    standing_wait: Duration::from_millis(1),
                },
                Arc::default(),
            )
            .expect("pool"),
        );
        // Jobs of about 2 ms: two waiting predict about 4 ms.
        for _ in 0..20 {
            let slow = pool.run(|| std::thread::sleep(Duration::from_millis(2)));
            assert_eq!(slow.await, Ok(()));
        }
        // A burst at a queue that just drained waits within max_wait: both are taken on, and
        // once it has not drained for longer than STANDING_AFTER it is a standing queue, with
        // the shorter bound.
        let refused = refused_behind(&pool, 2, STANDING_AFTER + Duration::from_millis(20)).await;
        assert!(
            matches!(
                refused,
                Err(Refused::Full {
                    queued: 2,
                    standing: true,
                    ..
                })
            ),
            "{refused:?}"
        );
        // Drained, but it refused a moment ago: the callers it refused are coming back, and
        // the shorter bound still applies to them (a burst would take the second one on).
        let refused = refused_behind(&pool, 1, Duration::ZERO).await;
        assert!(
            matches!(
                refused,
                Err(Refused::Full {
                    queued: 1,
                    standing: true,
                    ..
                })
            ),
            "{refused:?}"
        );
    }
}
