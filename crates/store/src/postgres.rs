//! The PostgreSQL [`TokenStore`](super::TokenStore): the engine several daemons share (PostgreSQL, and the engines
//! that speak its wire protocol).
//!
//! Owns: the connection pool (tokio-postgres under deadpool-postgres, on a small runtime of its
//! own), the embedded, versioned schema migrations, and the SQL for every trait method. Values
//! use the same encodings as RocksDB (`schema.rs`), so a copy between engines moves bytes as
//! they are; the columns beside them (owner, key version, version, flags) exist for indexes and
//! conditions only.
//!
//! Guarantees, in PostgreSQL terms: every acknowledged write is a committed transaction
//! (`synchronous_commit` as the server has it: on by default); a batch is one transaction; every
//! replace is version-checked under a row lock (`SELECT ... FOR UPDATE`), so two daemons never
//! lose an update; a group commit is one transaction in which each request is planned against
//! the rows locked for all of them and the requests accepted before it, and written with one
//! statement per table, statements that do not depend on each other sent together: two round
//! trips in all, one for BEGIN and the locks, one for the writes and COMMIT (COMMIT is queued
//! only behind statements known to be sent, so it can never commit part of them). A group of
//! creates only skips the locking read of its ids (the insert refuses one that exists, and the
//! group is then re-run with it; see `Locking`). Record writes
//! take a share lock on the registry rows of the key versions they use and retirement an
//! exclusive one, so no record can land under a retiring key. Serialization failures and
//! deadlocks (SQLSTATE 40001 / 40P01) re-run the whole transaction, a bounded number of times.
//! Record reads of concurrent callers are answered together, one statement per group, each by a
//! statement that started after it was asked (so it sees every write committed before); a
//! caller blocks a thread for its answer (`get_record`) or awaits it (`read_record`).
//! A database that cannot be reached is [`StoreError::Unavailable`], never a panic.
//!
//! Why tokio-postgres + deadpool rather than the blocking `postgres` crate: one runtime serves
//! every pooled connection (the blocking crate starts one per connection), pool waits and
//! connects have timeouts, and the trait's blocking callers (blocking pool, private-key threads,
//! the commit thread, and the odd call from async code) all just wait on a channel, which
//! cannot panic the way a nested `block_on` can.
//!
//! Must never: put a password or any stored bytes into an error message; leave a transaction
//! half applied.

use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Duration;

use deadpool_postgres::{Manager, ManagerConfig, Pool, RecyclingMethod};
use tokio_postgres::error::SqlState;

#[cfg(any(test, feature = "testing"))]
use super::TestHooks;
use super::schema::{decode_key, decode_record, encode_key, encode_record};
use super::{
    AuditAppend, AuditLog, EnvelopeReplace, GRANT_PREFIX, KeyRegistry, Leases, MetaStore, Mutation,
    REPLAY_PREFIX, RecordStore, RecordWrite, StoreError, StoreStats, Transfer, grant_key,
    plan_replace_envelope, plan_writes, replay_key, replay_value,
};
use crate::keys::{KeyInfo, KeyState};
use crate::record::{Owner, Record, RecordId};

/// The newest schema version this build knows. A database at a newer version (migrated by a
/// newer tokenvault) is refused rather than written with an older idea of the schema.
pub const SCHEMA_VERSION: i32 = 2;

/// The migrations, in order: version `i + 1` is `MIGRATIONS[i]`. Each runs in one transaction
/// together with the row that records it, so it is applied whole, and once.
const MIGRATIONS: &[&str] = &[
    r#"
CREATE TABLE tokenvault_records (
    id TEXT COLLATE "C" PRIMARY KEY,
    owner TEXT COLLATE "C" NOT NULL,
    key_version BIGINT NOT NULL,
    version BIGINT NOT NULL,
    revoked BOOLEAN NOT NULL,
    needs_reauth BOOLEAN NOT NULL,
    value BYTEA NOT NULL
);
CREATE INDEX tokenvault_records_owner ON tokenvault_records (owner);
CREATE INDEX tokenvault_records_key_version ON tokenvault_records (key_version);
CREATE TABLE tokenvault_keys (version BIGINT PRIMARY KEY, value BYTEA NOT NULL);
CREATE TABLE tokenvault_meta (key TEXT COLLATE "C" PRIMARY KEY, value BYTEA NOT NULL);
CREATE TABLE tokenvault_grants (id TEXT COLLATE "C" PRIMARY KEY, value BYTEA NOT NULL);
CREATE TABLE tokenvault_replay (key TEXT COLLATE "C" PRIMARY KEY, applied_at BIGINT NOT NULL);
CREATE TABLE tokenvault_audit (
    chain TEXT COLLATE "C" NOT NULL,
    seq BIGINT NOT NULL,
    value BYTEA NOT NULL,
    PRIMARY KEY (chain, seq)
);
"#,
    // 2: leases, so daemons sharing the database run a refresh, a rewrap or an instance name
    // one at a time. Expiry is by the database's clock.
    r#"
CREATE TABLE tokenvault_leases (
    name TEXT COLLATE "C" PRIMARY KEY,
    owner TEXT NOT NULL,
    token BIGINT NOT NULL,
    expires_at TIMESTAMPTZ NOT NULL
);
"#,
];

/// How many times a transaction is re-run after a serialization failure or deadlock.
const MAX_ATTEMPTS: u32 = 8;

/// How to reach the database.
#[derive(Clone)]
pub struct PostgresOptions {
    /// Host, port, user, database, password (set from a file or the environment, never argv).
    pub config: tokio_postgres::Config,
    /// TLS to the database (required unless the host is loopback or a Unix socket).
    pub tls: Option<rustls::ClientConfig>,
    /// Most pooled connections.
    pub pool_size: usize,
    /// How long a call waits for a connection before reporting the database unavailable.
    pub connect_timeout: Duration,
}

impl std::fmt::Debug for PostgresOptions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // tokio_postgres::Config's Debug redacts the password; the TLS config holds no secret.
        f.debug_struct("PostgresOptions")
            .field("config", &self.config)
            .field("tls", &self.tls.is_some())
            .field("pool_size", &self.pool_size)
            .finish()
    }
}

/// A [`TokenStore`](super::TokenStore) in a PostgreSQL database.
pub struct PostgresStore {
    /// Set on a store opened as a snapshot: every read sees the database as it was then.
    snapshot: Option<Snapshot>,
    pool: Pool,
    runtime: tokio::runtime::Runtime,
    /// The audit chain this store appends to and reads.
    chain: String,
    /// Record reads waiting for the next combined read ([`read_batches`]).
    reads: Arc<std::sync::Mutex<ReadQueue>>,
    /// Until when a group commit of creates only locks its ids first anyway (see
    /// [`Locking`]): set when a group that did not lock them failed.
    lock_creates_until: Arc<std::sync::Mutex<Option<std::time::Instant>>>,
}

/// Whether a group commit reads and locks the rows of its ids before planning.
///
/// A group of creates only need not: the plain insert refuses a record that exists (or is being
/// created) with a unique violation, and the transaction is then re-run with the locking read,
/// which plans the duplicate's refusal. That re-run costs the whole group a second transaction,
/// so a caller repeating one duplicate create could make every group run twice: after any failed
/// attempt without locks, groups lock for [`LOCK_CREATES_FOR`], and the most such a caller
/// costs is one extra transaction per period.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Locking {
    Lock,
    CreatesOnly,
}

/// How long groups of creates keep locking after a group that did not lock failed.
const LOCK_CREATES_FOR: Duration = Duration::from_secs(10);

/// Record reads of concurrent callers waiting to be read together, and whether a task is
/// reading (it takes whatever waits once its read is answered).
#[derive(Default)]
struct ReadQueue {
    waiting: Vec<(String, ReadReply)>,
    reading: bool,
    /// Combined reads sent so far (what the tests compare with the reads asked for).
    statements: u64,
}

/// What a combined read answers one caller: the stored value of its record, if any.
type ReadAnswer = Result<Option<Vec<u8>>, StoreError>;

/// Where one caller of a record read is answered: a thread blocked in `get_record`, or a task
/// awaiting `read_record`.
enum ReadReply {
    Thread(std::sync::mpsc::SyncSender<ReadAnswer>),
    Task(tokio::sync::oneshot::Sender<ReadAnswer>),
}

impl ReadReply {
    /// Whether nobody waits for the answer any more (a task whose call was dropped): its read
    /// is left out of the next statement.
    fn gone(&self) -> bool {
        matches!(self, Self::Task(tx) if tx.is_closed())
    }

    /// Answers the caller; one that has gone away meanwhile is skipped.
    fn send(self, answer: ReadAnswer) {
        match self {
            Self::Thread(tx) => {
                let _ = tx.send(answer);
            }
            Self::Task(tx) => {
                let _ = tx.send(answer);
            }
        }
    }
}

/// Most record reads one combined statement answers.
const MAX_READ_BATCH: usize = 256;

/// An exported snapshot (`pg_export_snapshot()`): valid while `holder`'s transaction is open,
/// so every pooled connection can read as of the same instant with `SET TRANSACTION SNAPSHOT`.
struct Snapshot {
    id: String,
    _holder: deadpool_postgres::Client,
}

/// Whether `id` looks like what `pg_export_snapshot()` returns (hex digits and dashes): it is
/// put into SQL text, as `SET TRANSACTION SNAPSHOT` takes no parameter.
fn is_snapshot_id(id: &str) -> bool {
    !id.is_empty() && id.len() <= 64 && id.bytes().all(|b| b.is_ascii_hexdigit() || b == b'-')
}

/// The statement that makes a transaction read the exported snapshot `id`.
fn set_snapshot(id: &str) -> String {
    format!("SET TRANSACTION SNAPSHOT '{id}'")
}

impl std::fmt::Debug for PostgresStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PostgresStore")
            .field("chain", &self.chain)
            .finish_non_exhaustive()
    }
}

/// A failure inside a transaction: final, or worth re-running the transaction for.
enum Fail {
    Retry(String),
    Final(StoreError),
    /// A statement refused because an earlier one in the same transaction had failed (25P02):
    /// that earlier failure is the one to report ([`pipelined`]).
    Aborted(StoreError),
}

/// The outcome of two statements sent together in one transaction. They may reach the server
/// in either order (a statement prepared on first use takes a round trip first), so the
/// failure that counts is the one that is not merely "the transaction is aborted".
fn pipelined<A, B>(a: Result<A, Fail>, b: Result<B, Fail>) -> Result<(A, B), Fail> {
    match (a, b) {
        (Ok(a), Ok(b)) => Ok((a, b)),
        (Err(Fail::Aborted(_)), Err(e)) => Err(e),
        (Err(e), _) | (Ok(_), Err(e)) => Err(e),
    }
}

impl From<StoreError> for Fail {
    fn from(e: StoreError) -> Self {
        Fail::Final(e)
    }
}

impl From<tokio_postgres::Error> for Fail {
    fn from(e: tokio_postgres::Error) -> Self {
        match e.code() {
            Some(c) if *c == SqlState::T_R_SERIALIZATION_FAILURE => Fail::Retry(e.to_string()),
            Some(c) if *c == SqlState::T_R_DEADLOCK_DETECTED => Fail::Retry(e.to_string()),
            Some(c) if *c == SqlState::IN_FAILED_SQL_TRANSACTION => Fail::Aborted(db_error(&e)),
            _ => Fail::Final(db_error(&e)),
        }
    }
}

impl From<deadpool_postgres::PoolError> for Fail {
    fn from(e: deadpool_postgres::PoolError) -> Self {
        use deadpool_postgres::PoolError;
        Fail::Final(match e {
            PoolError::Backend(e) => db_error(&e),
            PoolError::Timeout(_) => {
                StoreError::Unavailable("timed out waiting for a database connection".into())
            }
            other => StoreError::Unavailable(format!("database connection: {other}")),
        })
    }
}

/// Classifies a driver error: no connection (down, restarting, refused) is `Unavailable`,
/// which callers may retry; anything else is an engine error. Messages carry the SQLSTATE and
/// the server's text, never a parameter value.
fn db_error(e: &tokio_postgres::Error) -> StoreError {
    let io = std::error::Error::source(e).is_some_and(|s| s.is::<std::io::Error>());
    let unavailable = e.is_closed()
        || io
        || e.to_string().starts_with("error connecting")
        || e.code().is_some_and(|c| {
            c.code().starts_with("08")
                || *c == SqlState::ADMIN_SHUTDOWN
                || *c == SqlState::CRASH_SHUTDOWN
                || *c == SqlState::CANNOT_CONNECT_NOW
                || *c == SqlState::TOO_MANY_CONNECTIONS
        });
    match e.as_db_error() {
        Some(db) if !unavailable => {
            StoreError::Engine(format!("PostgreSQL {}: {}", db.code().code(), db.message()))
        }
        Some(db) => {
            StoreError::Unavailable(format!("PostgreSQL {}: {}", db.code().code(), db.message()))
        }
        None if unavailable => StoreError::Unavailable(format!("database connection: {e}")),
        None => StoreError::Engine(format!(
            "database client: {e}{}",
            std::error::Error::source(e).map_or(String::new(), |s| format!(": {s}"))
        )),
    }
}

fn version_i64(v: u64) -> i64 {
    i64::try_from(v).unwrap_or(i64::MAX)
}

fn version_u64(v: i64) -> u64 {
    u64::try_from(v).unwrap_or(0)
}

/// A transaction on a pooled connection, begun and ended here rather than by tokio-postgres's
/// `Transaction`: a group commit sends its BEGIN together with its first statements and its
/// COMMIT together with its last ([`Txn::begin_with`], [`Txn::commit_with`]), two round trips
/// fewer inside the group commit's critical section, which `Transaction` cannot express (it
/// takes the connection by `&mut` and waits for BEGIN's answer before handing it out).
struct Txn<'a> {
    client: &'a deadpool_postgres::Client,
    /// What begins it: `BEGIN`, or a snapshot store's read-only transaction importing the
    /// snapshot (one simple query either way).
    begin: &'a str,
    /// Whether the caller sends BEGIN and COMMIT with its own statements
    /// ([`PostgresStore::txn_with`]); otherwise [`PostgresStore::txn`] sends them alone.
    pipelined: bool,
    begun: AtomicBool,
    /// COMMIT was answered: the transaction is over (committed, or rolled back by the server if
    /// a statement had failed).
    ended: AtomicBool,
}

impl std::ops::Deref for Txn<'_> {
    type Target = deadpool_postgres::Client;

    fn deref(&self) -> &Self::Target {
        self.client
    }
}

impl Txn<'_> {
    /// Runs `first` (the transaction's first statements) with BEGIN sent right ahead of it, in
    /// one round trip. `first` must not write: were BEGIN refused, it would have run outside a
    /// transaction (its outcome is then dropped and BEGIN's error returned). Outside a pipelined
    /// transaction BEGIN was already sent, and this just runs `first`.
    async fn begin_with<T>(&self, first: impl Future<Output = Result<T, Fail>>) -> Result<T, Fail> {
        if !self.pipelined || self.begun.load(Ordering::SeqCst) {
            return first.await;
        }
        // `biased`: polled in order, so BEGIN's request is queued before `first`'s.
        let (began, value) = tokio::join!(biased; self.client.batch_execute(self.begin), first);
        began?;
        self.begun.store(true, Ordering::SeqCst);
        value
    }

    /// Sends BEGIN alone.
    async fn begin(&self) -> Result<(), Fail> {
        self.client.batch_execute(self.begin).await?;
        self.begun.store(true, Ordering::SeqCst);
        Ok(())
    }

    /// Runs `last` (the transaction's last statements) with COMMIT sent right behind it, in
    /// one round trip, in a pipelined transaction; otherwise just runs `last`.
    ///
    /// Why this cannot commit half of `last`: every statement of `last` is an already prepared
    /// statement wrapped in `sending.watch` and polled on `last`'s first poll (joined, never
    /// awaited one after another), so its request is queued on that poll or it fails right
    /// there (encoding, a closed connection, sealing its events) and `sending` notes it. `last`
    /// is polled first (`biased`), so when COMMIT's future is polled every statement is either
    /// queued ahead of it or known not to be sent, in which case COMMIT is not sent (nor if
    /// fewer statements were polled than `sending` expects). A queued statement that fails on
    /// the server aborts the transaction, and the server answers the COMMIT behind it with a
    /// rollback.
    async fn commit_with<T>(
        &self,
        sending: &Sending,
        last: impl Future<Output = Result<T, Fail>>,
    ) -> Result<T, Fail> {
        if !self.pipelined {
            return last.await;
        }
        let commit = async {
            if !self.begun.load(Ordering::SeqCst) {
                return Err(Fail::Final(StoreError::Engine(
                    "internal: COMMIT of a transaction that was not begun".into(),
                )));
            }
            if !sending.all_sent() {
                // Not committed: the statement's own error says why, and the transaction is
                // rolled back.
                return Ok(());
            }
            self.client.batch_execute("COMMIT").await?;
            self.ended.store(true, Ordering::SeqCst);
            Ok(())
        };
        let (value, committed) = tokio::join!(biased; last, commit);
        let (value, ()) = pipelined(value, committed)?;
        if !self.ended.load(Ordering::SeqCst) {
            // Only reachable if `last` polled fewer statements than it declared, or swallowed
            // a statement's failure: nothing is committed, and that must not read as success.
            return Err(Fail::Final(StoreError::Engine(
                "internal: a group commit's statements were not all sent; nothing was committed"
                    .into(),
            )));
        }
        Ok(value)
    }
}

/// What [`Txn::commit_with`] knows of the statements of its `last` by the time it would send
/// COMMIT: how many were polled, and whether one failed before its request was sent.
struct Sending {
    /// How many statements `last` runs ([`Sending::watch`] calls).
    expected: usize,
    started: AtomicUsize,
    failed: AtomicBool,
}

impl Sending {
    fn new(expected: usize) -> Self {
        Self {
            expected,
            started: AtomicUsize::new(0),
            failed: AtomicBool::new(false),
        }
    }

    /// Whether every statement was polled and none failed unsent: COMMIT may follow them.
    fn all_sent(&self) -> bool {
        self.started.load(Ordering::SeqCst) == self.expected && !self.failed.load(Ordering::SeqCst)
    }

    /// `statement`, counted on its first poll and noted if it failed there: a prepared
    /// statement's request is queued on that poll, so a failure there means it was never sent.
    /// One that has nothing to write returns `Ok` there and counts as sent.
    async fn watch<T>(&self, statement: impl Future<Output = Result<T, Fail>>) -> Result<T, Fail> {
        let mut statement = std::pin::pin!(statement);
        let mut first = true;
        std::future::poll_fn(|cx| {
            let polled = statement.as_mut().poll(cx);
            if std::mem::take(&mut first) {
                self.started.fetch_add(1, Ordering::SeqCst);
                if matches!(polled, std::task::Poll::Ready(Err(_))) {
                    self.failed.store(true, Ordering::SeqCst);
                }
            }
            polled
        })
        .await
    }
}

/// Writes a metadata value, replacing the one there: `($1 key, $2 value)`.
const UPSERT_META: &str = "INSERT INTO tokenvault_meta (key, value) VALUES ($1, $2)
     ON CONFLICT (key) DO UPDATE SET value = EXCLUDED.value";

impl PostgresStore {
    /// Connects, applies any pending schema migration, and returns the store. The audit trail
    /// is read and appended under chain `chain` (one per daemon instance sharing the database).
    pub fn connect(options: PostgresOptions, chain: &str) -> Result<Self, StoreError> {
        // One thread per four cores, at least one. Each call costs this runtime about 30 µs
        // of client work (measured: cached GetToken, 2 cores), so a thread serves some 30k
        // calls/s, more than four cores' worth of daemon. On 2 cores one thread instead of two
        // was 4-6 % faster on every PostgreSQL path (GetToken cached and uncached, PutSealed):
        // a second worker mostly adds the wake-ups of work stealing between the two.
        let threads = std::thread::available_parallelism()
            .map_or(1, std::num::NonZeroUsize::get)
            .div_ceil(4);
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(threads)
            .thread_name("tokenvault-pg")
            .enable_all()
            .build()
            .map_err(|e| StoreError::Engine(format!("starting the database runtime: {e}")))?;
        let build = |pg: tokio_postgres::Config, size: usize| {
            let manager_config = ManagerConfig {
                // Only `is_closed` on recycling: a connection a database restart broke is
                // closed by then (its connection task ended), and a round trip per checkout
                // would double the cost of a read.
                recycling_method: RecyclingMethod::Fast,
            };
            let manager = match &options.tls {
                Some(tls) => Manager::from_config(
                    pg,
                    tokio_postgres_rustls::MakeRustlsConnect::new(tls.clone()),
                    manager_config,
                ),
                None => Manager::from_config(pg, tokio_postgres::NoTls, manager_config),
            };
            Pool::builder(manager)
                .max_size(size.max(1))
                .runtime(deadpool_postgres::Runtime::Tokio1)
                .wait_timeout(Some(options.connect_timeout))
                .create_timeout(Some(options.connect_timeout))
                .recycle_timeout(Some(options.connect_timeout))
                .build()
                .map_err(|e| StoreError::Engine(format!("database pool: {e}")))
        };
        let mut pg = options.config.clone();
        pg.connect_timeout(options.connect_timeout);
        let pool = build(pg, options.pool_size)?;
        let store = Self {
            snapshot: None,
            pool,
            runtime,
            chain: chain.to_string(),
            reads: Arc::default(),
            lock_creates_until: Arc::default(),
        };
        store.migrate()?;
        Ok(store)
    }

    /// This store, from now on reading the database as of one instant (what `store copy` and
    /// `admin export` read from a live cluster): one connection holds a `REPEATABLE READ READ
    /// ONLY` transaction open and exports its snapshot, and every later call runs in a read-only
    /// transaction importing it, so pages read minutes apart agree with each other. Writes are
    /// refused by the database (read-only transactions). If the holding connection is lost,
    /// reads fail instead of silently seeing a newer state.
    pub fn into_snapshot(mut self) -> Result<Self, StoreError> {
        // The holder keeps one connection for itself; reads need another.
        let size = self.pool.status().max_size.max(2);
        self.pool.resize(size);
        let pool = self.pool.clone();
        let (id, holder) = self.wait(async move {
            let client = pool.get().await.map_err(|e| match Fail::from(e) {
                Fail::Final(e) | Fail::Aborted(e) => e,
                Fail::Retry(m) => StoreError::Unavailable(m),
            })?;
            client
                .batch_execute("BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY")
                .await
                .map_err(|e| db_error(&e))?;
            let id: String = client
                .query_one("SELECT pg_export_snapshot()", &[])
                .await
                .map_err(|e| db_error(&e))?
                .get(0);
            Ok((id, client))
        })?;
        if !is_snapshot_id(&id) {
            return Err(StoreError::Engine(
                "the database returned an unexpected snapshot identifier".into(),
            ));
        }
        self.snapshot = Some(Snapshot {
            id,
            _holder: holder,
        });
        Ok(self)
    }

    /// Queues a record read for the next combined statement, starting the reading task on the
    /// store's runtime if none runs.
    fn queue_read(&self, id: &RecordId, reply: ReadReply) {
        let start = {
            let mut q = unpoisoned(&self.reads);
            q.waiting.push((id.to_string(), reply));
            !std::mem::replace(&mut q.reading, true)
        };
        if start {
            self.runtime
                .spawn(read_batches(self.pool.clone(), Arc::clone(&self.reads)));
        }
    }

    /// Runs `op` on the store's runtime in a fresh transaction, re-running it after a
    /// serialization failure or deadlock, and waits for the outcome on this thread.
    fn txn<T: Send + 'static>(&self, op: impl TxnOp<T>) -> Result<T, StoreError> {
        self.txn_with(false, op)
    }

    /// [`PostgresStore::txn`], or with `pipelined` for an `op` that sends BEGIN with its first
    /// statements ([`Txn::begin_with`]) and COMMIT with its last ([`Txn::commit_with`]).
    fn txn_with<T: Send + 'static>(
        &self,
        pipelined: bool,
        op: impl TxnOp<T>,
    ) -> Result<T, StoreError> {
        let op = Arc::new(op);
        let begin: Arc<str> = match &self.snapshot {
            None => "BEGIN".into(),
            Some(s) => format!(
                "BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY; {}",
                set_snapshot(&s.id)
            )
            .into(),
        };
        self.retrying(move |pool| {
            let (op, begin) = (Arc::clone(&op), Arc::clone(&begin));
            Box::pin(async move {
                let lease = Lease::new(pool.get().await?);
                let Some(client) = lease.client.as_ref() else {
                    return Err(Fail::Final(StoreError::Engine(
                        "internal: a leased connection is missing".into(),
                    )));
                };
                let t = Txn {
                    client,
                    begin: &begin,
                    pipelined,
                    begun: AtomicBool::new(false),
                    ended: AtomicBool::new(false),
                };
                let value = async {
                    if !pipelined {
                        t.begin().await?;
                    }
                    let value = op(&t).await?;
                    if !t.begun.load(Ordering::SeqCst) {
                        return Err(Fail::Final(StoreError::Engine(
                            "internal: a transaction's statements ran before its BEGIN".into(),
                        )));
                    }
                    if !t.ended.load(Ordering::SeqCst) {
                        client.batch_execute("COMMIT").await?;
                        t.ended.store(true, Ordering::SeqCst);
                    }
                    Ok(value)
                }
                .await;
                // A transaction left open is rolled back before the connection goes back to
                // the pool; one whose ROLLBACK fails is not given back at all (the lease
                // closes it, and the server rolls back what it held).
                if t.ended.load(Ordering::SeqCst) || client.batch_execute("ROLLBACK").await.is_ok()
                {
                    lease.release();
                }
                value
            })
        })
    }

    /// Runs one statement (a read, or a write that is a transaction by itself) on a pooled
    /// connection without an explicit transaction (one round trip with the statement cache),
    /// with the same retries as [`PostgresStore::txn`].
    fn read<T, F>(&self, op: F) -> Result<T, StoreError>
    where
        T: Send + 'static,
        F: for<'a> Fn(
                &'a deadpool_postgres::Client,
            ) -> futures_like::BoxFuture<'a, Result<T, Fail>>
            + Send
            + Sync
            + 'static,
    {
        let op = Arc::new(op);
        let snapshot = self.snapshot.as_ref().map(|s| {
            format!(
                "BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY; {}",
                set_snapshot(&s.id)
            )
        });
        self.retrying(move |pool| {
            let op = Arc::clone(&op);
            let snapshot = snapshot.clone();
            Box::pin(async move {
                let client = pool.get().await?;
                let Some(begin) = snapshot else {
                    return op(&client).await;
                };
                // A snapshot store's reads run in a read-only transaction importing it; the
                // connection goes back to the pool with no transaction open either way.
                client.batch_execute(&begin).await?;
                let value = op(&client).await;
                let end = if value.is_ok() { "COMMIT" } else { "ROLLBACK" };
                client.batch_execute(end).await?;
                value
            })
        })
    }

    /// Runs `attempt` on the store's runtime, again after a serialization failure or deadlock
    /// (bounded, with jittered backoff), and waits for the outcome on this thread.
    fn retrying<T, F>(&self, attempt: F) -> Result<T, StoreError>
    where
        T: Send + 'static,
        F: Fn(Pool) -> futures_like::BoxFuture<'static, Result<T, Fail>> + Send + 'static,
    {
        self.wait(retried(self.pool.clone(), attempt))
    }

    /// Runs `fut` on the store's runtime and blocks this thread until it is done. Waiting on a
    /// channel (not `block_on`) works from any thread, async or not.
    fn wait<T: Send + 'static>(
        &self,
        fut: impl Future<Output = Result<T, StoreError>> + Send + 'static,
    ) -> Result<T, StoreError> {
        let (tx, rx) = std::sync::mpsc::sync_channel(1);
        self.runtime.spawn(async move {
            let _ = tx.send(fut.await);
        });
        rx.recv()
            .map_err(|_| StoreError::Engine("the database task stopped".into()))?
    }

    /// Applies the migrations this database lacks; refuses one migrated by a newer build.
    fn migrate(&self) -> Result<(), StoreError> {
        let pool = self.pool.clone();
        self.wait(async move {
            let client = pool.get().await.map_err(|e| match Fail::from(e) {
                Fail::Final(e) | Fail::Aborted(e) => e,
                Fail::Retry(m) => StoreError::Unavailable(m),
            })?;
            // Two daemons starting together may both create the table; one of them then
            // fails on the catalog's unique index and simply reads the winner's table.
            if let Err(e) = client
                .batch_execute(
                    "CREATE TABLE IF NOT EXISTS tokenvault_schema (
                        version INT PRIMARY KEY,
                        applied_at TIMESTAMPTZ NOT NULL DEFAULT now())",
                )
                .await
                && e.code() != Some(&SqlState::UNIQUE_VIOLATION)
            {
                return Err(db_error(&e));
            }
            Ok(())
        })?;
        for (i, sql) in MIGRATIONS.iter().enumerate() {
            let version = i32::try_from(i + 1).unwrap_or(i32::MAX);
            self.txn(move |t| {
                Box::pin(async move {
                    let current: i32 = t
                        .query_one(
                            "SELECT coalesce(max(version), 0) FROM tokenvault_schema",
                            &[],
                        )
                        .await?
                        .get(0);
                    if current > SCHEMA_VERSION {
                        return Err(StoreError::SchemaTooNew {
                            found: current,
                            supported: SCHEMA_VERSION,
                        }
                        .into());
                    }
                    if current >= version {
                        return Ok(());
                    }
                    t.batch_execute(sql).await?;
                    // A concurrent migration of the same version makes this insert (and so
                    // the whole transaction, DDL included) fail; the retry then skips it.
                    match t
                        .execute(
                            "INSERT INTO tokenvault_schema (version) VALUES ($1)",
                            &[&version],
                        )
                        .await
                    {
                        Ok(_) => Ok(()),
                        Err(e) if e.code() == Some(&SqlState::UNIQUE_VIOLATION) => {
                            Err(Fail::Retry("a concurrent migration".into()))
                        }
                        Err(e) => Err(e.into()),
                    }
                })
            })?;
        }
        // Checked again when nothing was pending.
        let found = self.schema_version()?;
        if found > SCHEMA_VERSION {
            return Err(StoreError::SchemaTooNew {
                found,
                supported: SCHEMA_VERSION,
            });
        }
        Ok(())
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
        let mutations = Arc::new(mutations.to_vec());
        let audit = Arc::new(audit.to_vec());
        let chain = self.chain.clone();
        self.txn(move |t| {
            let (mutations, audit, chain) =
                (Arc::clone(&mutations), Arc::clone(&audit), chain.clone());
            Box::pin(async move {
                apply_in(t, &mutations, now, audited).await?;
                insert_audit(t, &chain, &audit).await
            })
        })
    }

    /// The schema version the database is at.
    pub fn schema_version(&self) -> Result<i32, StoreError> {
        self.txn(|t| {
            Box::pin(async move {
                Ok(t.query_one(
                    "SELECT coalesce(max(version), 0) FROM tokenvault_schema",
                    &[],
                )
                .await?
                .get(0))
            })
        })
    }
}

/// A pooled connection that goes back to the pool only once [`Lease::release`]d. Dropped
/// without that (its transaction's ROLLBACK failed, or the task running it was dropped in the
/// middle, say at shutdown), it is taken out of the pool and closed, so no later caller ever
/// runs its statements inside a transaction left open, and the server rolls that one back.
struct Lease {
    client: Option<deadpool_postgres::Client>,
    clean: AtomicBool,
}

impl Lease {
    fn new(client: deadpool_postgres::Client) -> Self {
        Self {
            client: Some(client),
            clean: AtomicBool::new(false),
        }
    }

    fn release(&self) {
        self.clean.store(true, Ordering::SeqCst);
    }
}

impl Drop for Lease {
    fn drop(&mut self) {
        if !self.clean.load(Ordering::SeqCst)
            && let Some(client) = self.client.take()
        {
            drop(deadpool_postgres::Client::take(client));
        }
    }
}

/// What [`PostgresStore::txn`] runs: the transaction's statements, built again for each re-run.
trait TxnOp<T>:
    for<'a> Fn(&'a Txn<'a>) -> futures_like::BoxFuture<'a, Result<T, Fail>> + Send + Sync + 'static
{
}

impl<T, F> TxnOp<T> for F where
    F: for<'a> Fn(&'a Txn<'a>) -> futures_like::BoxFuture<'a, Result<T, Fail>>
        + Send
        + Sync
        + 'static
{
}

/// A boxed future borrowing the transaction (what [`PostgresStore::txn`] closures return).
mod futures_like {
    pub type BoxFuture<'a, T> = std::pin::Pin<Box<dyn Future<Output = T> + Send + 'a>>;
    use std::future::Future;
}

/// Outbox entries (key under `outbox/`, value) as their metadata rows, shared by a
/// transaction's retries.
fn outbox_rows(outbox: &[(String, Vec<u8>)]) -> Arc<Vec<(String, Vec<u8>)>> {
    Arc::new(
        outbox
            .iter()
            .map(|(k, v)| (super::outbox_key(k), v.clone()))
            .collect(),
    )
}

/// Writes [`outbox_rows`] in the transaction (an entry written again is overwritten).
async fn insert_outbox(t: &Txn<'_>, rows: &[(String, Vec<u8>)]) -> Result<(), Fail> {
    for (k, v) in rows {
        t.execute(UPSERT_META, &[k, v]).await?;
    }
    Ok(())
}

/// `attempt`, again after a serialization failure or deadlock (bounded, with jittered backoff).
async fn retried<T, F>(pool: Pool, attempt: F) -> Result<T, StoreError>
where
    F: Fn(Pool) -> futures_like::BoxFuture<'static, Result<T, Fail>>,
{
    let mut n = 0;
    loop {
        n += 1;
        match attempt(pool.clone()).await {
            Ok(v) => return Ok(v),
            Err(Fail::Final(e) | Fail::Aborted(e)) => return Err(e),
            Err(Fail::Retry(why)) if n < MAX_ATTEMPTS => {
                tracing::debug!(attempt = n, %why, "retrying a database transaction");
                let jitter = rand::Rng::gen_range(&mut rand::thread_rng(), 0..10u64);
                tokio::time::sleep(Duration::from_millis((5u64 << n.min(6)) + jitter)).await;
            }
            Err(Fail::Retry(why)) => {
                return Err(StoreError::Unavailable(format!(
                    "the database kept refusing the transaction ({why}); retry"
                )));
            }
        }
    }
}

/// Answers the record reads that wait in `queue`, a group at a time, until none is left.
///
/// Each group is one statement (`WHERE id = ANY($1)`) in one round trip: under load the reads
/// that arrive while one group is read are answered by the next, so the database parses,
/// plans and answers one statement for many reads, and the store's runtime handles one
/// message each way; a read that arrives when none is being read goes at once, alone. Every
/// read of a group is answered by a statement that started after it was queued, so it sees
/// every write committed before it was asked.
async fn read_batches(pool: Pool, queue: Arc<std::sync::Mutex<ReadQueue>>) {
    /// Ends the reading if this task stops half-way (a panic, or the runtime shutting down):
    /// the reads still waiting are refused (their replies dropped), and the next read starts a
    /// new task. A task that ran out of reads has ended it already, under the lock: by the
    /// time this is dropped, a read queued since belongs to the next task.
    struct Reading {
        queue: Arc<std::sync::Mutex<ReadQueue>>,
        ended: std::cell::Cell<bool>,
    }
    impl Drop for Reading {
        fn drop(&mut self) {
            if !self.ended.get() {
                let mut q = unpoisoned(&self.queue);
                q.reading = false;
                q.waiting.clear();
            }
        }
    }
    let reading = Reading {
        queue,
        ended: std::cell::Cell::new(false),
    };
    loop {
        let group = {
            let mut q = unpoisoned(&reading.queue);
            if q.waiting.is_empty() {
                // Ends here, under the lock: a read queued from now on starts a task.
                q.reading = false;
                reading.ended.set(true);
                return;
            }
            let first = q.waiting.len().min(MAX_READ_BATCH);
            let rest = q.waiting.split_off(first);
            let mut group = std::mem::replace(&mut q.waiting, rest);
            group.retain(|(_, reply)| !reply.gone());
            if !group.is_empty() {
                q.statements += 1;
            }
            group
        };
        if group.is_empty() {
            continue;
        }
        let ids: Arc<Vec<String>> = Arc::new(group.iter().map(|(id, _)| id.clone()).collect());
        let read = retried(pool.clone(), move |pool| {
            let ids = Arc::clone(&ids);
            Box::pin(async move {
                let client = pool.get().await?;
                let stmt = client
                    .prepare_cached("SELECT id, value FROM tokenvault_records WHERE id = ANY($1)")
                    .await?;
                let rows = client.query(&stmt, &[&*ids]).await?;
                Ok(rows
                    .into_iter()
                    .map(|row| (row.get::<_, String>(0), row.get::<_, Vec<u8>>(1)))
                    .collect::<std::collections::HashMap<_, _>>())
            })
        })
        .await;
        for (id, reply) in group {
            reply.send(match &read {
                Ok(values) => Ok(values.get(&id).cloned()),
                Err(e) => Err(e.clone()),
            });
        }
    }
}

/// A read whose reading task ended without answering it (a panic, or the runtime shutting
/// down).
fn read_task_stopped() -> StoreError {
    StoreError::Engine("the database task stopped".into())
}

/// `mutex`, locked even if a thread panicked holding it: what these locks guard (a queue of
/// waiting reads, a deadline) stays consistent whatever a holder was doing.
fn unpoisoned<T>(mutex: &std::sync::Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// The records with these ids, locked for update until the transaction ends.
async fn lock_records(
    t: &Txn<'_>,
    ids: &[String],
) -> Result<std::collections::HashMap<String, Record>, Fail> {
    let stmt = t
        .prepare_cached("SELECT id, value FROM tokenvault_records WHERE id = ANY($1) FOR UPDATE")
        .await?;
    let rows = t.query(&stmt, &[&ids]).await?;
    let mut out = std::collections::HashMap::with_capacity(rows.len());
    for row in rows {
        let id: String = row.get(0);
        let value: Vec<u8> = row.get(1);
        out.insert(id, decode_record(&value)?);
    }
    Ok(out)
}

/// The registry states of these key versions, share-locked until the transaction ends: a
/// retirement (which locks the row exclusively) waits for the writer, or the writer sees it.
async fn share_key_states(
    t: &Txn<'_>,
    versions: &[i64],
) -> Result<std::collections::HashMap<u32, KeyState>, Fail> {
    let stmt = t
        .prepare_cached("SELECT value FROM tokenvault_keys WHERE version = ANY($1) FOR SHARE")
        .await?;
    let rows = t.query(&stmt, &[&versions]).await?;
    let mut out = std::collections::HashMap::with_capacity(rows.len());
    for row in rows {
        let value: Vec<u8> = row.get(0);
        let key = decode_key(&value)?;
        out.insert(key.version, key.state);
    }
    Ok(out)
}

/// Plans groups of record writes in order, each seeing the groups accepted before it, against
/// the rows locked for all of them; then writes the final state of every record they touch with
/// two statements, whatever the number of groups. A refused group changes nothing.
///
/// In a pipelined transaction ([`PostgresStore::txn_with`]) this is two round trips in
/// all: BEGIN, the two locks and the preparation of the writes go out together, then the
/// writes, the events and COMMIT.
async fn write_groups(
    t: &Txn<'_>,
    groups: &[Vec<RecordWrite>],
    now: i64,
    audit: Option<(&str, &dyn super::GroupAudit)>,
    locking: Locking,
) -> Result<Vec<Result<Vec<u64>, StoreError>>, Fail> {
    let mut ids: Vec<String> = groups
        .iter()
        .flatten()
        .map(|w| w.meta.id.to_string())
        .collect();
    ids.sort_unstable();
    ids.dedup();
    let mut versions: Vec<i64> = groups
        .iter()
        .flatten()
        .map(|w| i64::from(w.key_version))
        .collect();
    versions.sort_unstable();
    versions.dedup();
    // Sent together (tokio-postgres pipelines requests that are in flight at once): one round
    // trip where BEGIN and the locks took two, inside the group commit's critical section. The
    // writes' statements are prepared here (a cache hit after a connection's first use), so
    // that the writes below each go out on their first poll, which is what lets COMMIT follow
    // them.
    let (states, current, (rows_stmts, events_stmt)) = t
        .begin_with(async {
            let (states, current, rows_stmts, events_stmt) = tokio::join!(
                share_key_states(t, &versions),
                async {
                    match locking {
                        Locking::Lock => lock_records(t, &ids).await,
                        Locking::CreatesOnly => Ok(std::collections::HashMap::new()),
                    }
                },
                RowStatements::prepare(t),
                t.prepare_cached(INSERT_AUDIT)
            );
            let ((states, current), (rows_stmts, events_stmt)) = pipelined(
                pipelined(states, current),
                pipelined(rows_stmts, events_stmt.map_err(Fail::from)),
            )?;
            Ok((states, current, (rows_stmts, events_stmt)))
        })
        .await?;
    let mut current = current;
    let stored: std::collections::HashMap<String, u64> = current
        .iter()
        .map(|(id, r)| (id.clone(), r.version))
        .collect();
    let mut touched = std::collections::BTreeSet::new();
    let mut outcomes = Vec::with_capacity(groups.len());
    let mut accepted: Vec<(usize, Vec<Record>)> = Vec::new();
    for (index, g) in groups.iter().enumerate() {
        match plan_writes(
            g,
            now,
            |id| Ok(current.get(id.as_str()).cloned()),
            |v| Ok(states.get(&v).copied()),
        ) {
            Ok(planned) => {
                outcomes.push(Ok(planned.versions));
                for r in &planned.records {
                    touched.insert(r.meta.id.to_string());
                    current.insert(r.meta.id.to_string(), r.clone());
                }
                if audit.is_some() {
                    accepted.push((index, planned.records));
                }
            }
            Err(e) => outcomes.push(Err(e)),
        }
    }
    let rows: Vec<(Record, Option<u64>)> = touched
        .into_iter()
        .filter_map(|id| {
            let prev = stored.get(&id).copied();
            current.remove(&id).map(|r| (r, prev))
        })
        .collect();
    // The records, the events and COMMIT go out together, in that order (`biased`): the events
    // are sealed while the database inserts the records. A statement that fails aborts the
    // transaction, and the server then answers COMMIT with a rollback.
    let sending = Sending::new(ROW_STATEMENTS + 1);
    let events = sending.watch(async {
        match audit {
            Some((chain, audit)) => {
                let appends = super::seal_accepted(audit, &accepted)?;
                insert_audit_with(t, &events_stmt, chain, &appends).await
            }
            None => Ok(()),
        }
    });
    let last = async {
        let (written, events) =
            tokio::join!(biased; write_rows(t, &rows_stmts, &rows, &sending), events);
        pipelined(written, events).map(|_| ())
    };
    t.commit_with(&sending, last).await?;
    Ok(outcomes)
}

/// The statements [`write_rows`] writes records with.
struct RowStatements {
    create: tokio_postgres::Statement,
    update: tokio_postgres::Statement,
}

/// How many statements [`write_rows`] sends ([`Sending::watch`] calls); a group commit sends
/// one more, its events.
const ROW_STATEMENTS: usize = 2;

impl RowStatements {
    /// Prepared on this connection (cached: a round trip only on a connection's first use).
    async fn prepare(t: &Txn<'_>) -> Result<Self, Fail> {
        let (create, update) = tokio::join!(
            t.prepare_cached(CREATE_RECORDS),
            t.prepare_cached(UPDATE_RECORDS)
        );
        Ok(Self {
            create: create?,
            update: update?,
        })
    }
}

/// Creates records from columns (a plain insert, not `ON CONFLICT DO NOTHING`: a speculative
/// insertion costs the database an extra index probe and WAL record per row; a row another
/// writer created since the lock, the only way one can exist, aborts the statement instead).
const CREATE_RECORDS: &str = "INSERT INTO tokenvault_records
         (id, owner, key_version, version, revoked, needs_reauth, value)
     SELECT * FROM UNNEST($1::text[], $2::text[], $3::bigint[], $4::bigint[],
                          $5::bool[], $6::bool[], $7::bytea[])";

/// Replaces records from columns, each over the version `prev` it was locked at.
const UPDATE_RECORDS: &str = "UPDATE tokenvault_records AS t SET owner = u.owner,
         key_version = u.key_version, version = u.version, revoked = u.revoked,
         needs_reauth = u.needs_reauth, value = u.value
     FROM UNNEST($1::text[], $2::text[], $3::bigint[], $4::bigint[], $5::bool[],
                 $6::bool[], $7::bytea[], $8::bigint[])
         AS u(id, owner, key_version, version, revoked, needs_reauth, value, prev)
     WHERE t.id = u.id COLLATE \"C\" AND t.version = u.prev";

/// Writes records: each `(record, None)` is created, each `(record, Some(v))` replaces the
/// stored version `v` (locked by the caller). If another writer created one of the ids since it
/// was read, the transaction is re-run, and its planning then sees that record.
async fn store_rows(t: &Txn<'_>, rows: &[(Record, Option<u64>)]) -> Result<(), Fail> {
    let statements = RowStatements::prepare(t).await?;
    write_rows(t, &statements, rows, &Sending::new(ROW_STATEMENTS)).await
}

/// [`store_rows`] with its statements prepared: both go out on the first poll
/// ([`ROW_STATEMENTS`] [`Sending::watch`] calls).
async fn write_rows(
    t: &Txn<'_>,
    statements: &RowStatements,
    rows: &[(Record, Option<u64>)],
    sending: &Sending,
) -> Result<(), Fail> {
    #[derive(Default)]
    struct Columns {
        id: Vec<String>,
        owner: Vec<String>,
        key_version: Vec<i64>,
        version: Vec<i64>,
        revoked: Vec<bool>,
        needs_reauth: Vec<bool>,
        value: Vec<Vec<u8>>,
        prev: Vec<i64>,
    }
    let (mut creates, mut updates) = (Columns::default(), Columns::default());
    for (r, prev) in rows {
        let c = if prev.is_some() {
            &mut updates
        } else {
            &mut creates
        };
        c.id.push(r.meta.id.to_string());
        c.owner.push(r.meta.owner.as_str().to_string());
        c.key_version.push(i64::from(r.key_version));
        c.version.push(version_i64(r.version));
        c.revoked.push(r.revoked);
        c.needs_reauth.push(r.needs_reauth);
        c.value.push(encode_record(r));
        c.prev.push(prev.map_or(0, version_i64));
    }
    // The counts below are checked once the answers are in, which in a pipelined commit is
    // after COMMIT: neither can differ without the statement failing (a plain insert inserts
    // every row or fails; the replaced rows are locked by this transaction), so they guard
    // against the impossible, not against a race.
    let create = sending.watch(async {
        if creates.id.is_empty() {
            return Ok(());
        }
        let n = t
            .execute(
                &statements.create,
                &[
                    &creates.id,
                    &creates.owner,
                    &creates.key_version,
                    &creates.version,
                    &creates.revoked,
                    &creates.needs_reauth,
                    &creates.value,
                ],
            )
            .await
            .map_err(|e| match e.code() {
                Some(c) if *c == SqlState::UNIQUE_VIOLATION => {
                    Fail::Retry("a record was created concurrently".into())
                }
                _ => Fail::from(e),
            })?;
        if n != creates.id.len() as u64 {
            return Err(Fail::Retry("a record was created concurrently".into()));
        }
        Ok(())
    });
    let update = sending.watch(async {
        if updates.id.is_empty() {
            return Ok(());
        }
        let n = t
            .execute(
                &statements.update,
                &[
                    &updates.id,
                    &updates.owner,
                    &updates.key_version,
                    &updates.version,
                    &updates.revoked,
                    &updates.needs_reauth,
                    &updates.value,
                    &updates.prev,
                ],
            )
            .await?;
        if n != updates.id.len() as u64 {
            return Err(Fail::Retry("a locked record changed".into()));
        }
        Ok(())
    });
    let (create, update) = tokio::join!(biased; create, update);
    pipelined(create, update).map(|_| ())
}

/// Plans and writes one atomic group (the error of a refused group).
#[cfg(any(test, feature = "testing"))]
async fn write_group(
    t: &Txn<'_>,
    writes: &[RecordWrite],
    now: i64,
) -> Result<Result<Vec<u64>, StoreError>, Fail> {
    Ok(
        write_groups(t, &[writes.to_vec()], now, None, Locking::Lock)
            .await?
            .pop()
            .unwrap_or(Ok(Vec::new())),
    )
}

/// Writes one updated record over the version it was read at.
async fn update_one(t: &Txn<'_>, r: Record, prev: u64) -> Result<(), Fail> {
    store_rows(t, &[(r, Some(prev))]).await
}

/// Appends audit events to a chain in one statement. A place already taken fails it with a
/// unique violation, which the callers read as "not inserted" (a plain insert: `ON CONFLICT DO
/// NOTHING` costs an extra index probe and WAL record per event).
const INSERT_AUDIT: &str = "INSERT INTO tokenvault_audit (chain, seq, value)
     SELECT $1, * FROM UNNEST($2::bigint[], $3::bytea[])";

/// [`INSERT_AUDIT`]'s sequence and value columns.
fn audit_columns(audit: &[AuditAppend]) -> (Vec<i64>, Vec<&[u8]>) {
    (
        audit.iter().map(|a| version_i64(a.seq)).collect(),
        audit.iter().map(|a| a.bytes.as_slice()).collect(),
    )
}

/// Runs [`INSERT_AUDIT`] (`stmt`, prepared on `c`) on `c` (a transaction, or a connection for a
/// statement that is its own transaction): how many events it inserted, 0 if a place was taken.
/// The request goes out on the first poll.
async fn inserted_events(
    c: &impl deadpool_postgres::GenericClient,
    stmt: &tokio_postgres::Statement,
    chain: &str,
    audit: &[AuditAppend],
) -> Result<u64, Fail> {
    let (seqs, values) = audit_columns(audit);
    match c.execute(stmt, &[&chain, &seqs, &values]).await {
        Err(e) if e.code() == Some(&SqlState::UNIQUE_VIOLATION) => Ok(0),
        other => Ok(other?),
    }
}

async fn insert_audit(t: &Txn<'_>, chain: &str, audit: &[AuditAppend]) -> Result<(), Fail> {
    if audit.is_empty() {
        return Ok(());
    }
    let stmt = t.prepare_cached(INSERT_AUDIT).await?;
    insert_audit_with(t, &stmt, chain, audit).await
}

/// [`insert_audit`] with its statement prepared: the request goes out on the first poll.
async fn insert_audit_with(
    t: &Txn<'_>,
    stmt: &tokio_postgres::Statement,
    chain: &str,
    audit: &[AuditAppend],
) -> Result<(), Fail> {
    let (Some(first), Some(last)) = (audit.first(), audit.last()) else {
        return Ok(());
    };
    // One statement for every event (a group commit writes one per record).
    if inserted_events(&**t, stmt, chain, audit).await? != audit.len() as u64 {
        // The chain already holds these places: an earlier write of this daemon committed
        // although its answer was lost (the instance lease keeps any other daemon off this
        // chain). The whole change is refused and nothing is written (the unique violation
        // aborted the transaction); the auditor reads the chain's head back before its next
        // write, so a retry succeeds: UNAVAILABLE, as for the lost answer itself.
        return Err(StoreError::Unavailable(format!(
            "audit events {}..={} are already stored (an earlier write's outcome was not \
             known); retry",
            first.seq, last.seq
        ))
        .into());
    }
    Ok(())
}

async fn upsert_keys(t: &Txn<'_>, keys: &[KeyInfo]) -> Result<(), Fail> {
    for k in keys {
        t.execute(
            "INSERT INTO tokenvault_keys (version, value) VALUES ($1, $2)
             ON CONFLICT (version) DO UPDATE SET value = EXCLUDED.value",
            &[&i64::from(k.version), &encode_key(k)],
        )
        .await?;
    }
    Ok(())
}

impl RecordStore for PostgresStore {
    fn put_record_groups(
        &self,
        groups: &[&[RecordWrite]],
        now: i64,
        audit: Arc<dyn super::GroupAudit>,
    ) -> Result<Vec<Result<Vec<u64>, StoreError>>, StoreError> {
        let groups: Vec<Vec<RecordWrite>> = groups.iter().map(|g| g.to_vec()).collect();
        let creates_only = groups.iter().flatten().all(|w| w.expected_version == 0)
            && unpoisoned(&self.lock_creates_until)
                .is_none_or(|until| std::time::Instant::now() >= until);
        let groups = Arc::new(groups);
        let chain = self.chain.clone();
        let (attempts, until) = (
            Arc::new(AtomicUsize::new(0)),
            Arc::clone(&self.lock_creates_until),
        );
        self.txn_with(true, move |t| {
            let (groups, audit, chain) = (Arc::clone(&groups), Arc::clone(&audit), chain.clone());
            let locking = if creates_only && attempts.fetch_add(1, Ordering::Relaxed) == 0 {
                Locking::CreatesOnly
            } else {
                if creates_only {
                    // The attempt without locks failed: lock, here and for a while.
                    *unpoisoned(&until) = Some(std::time::Instant::now() + LOCK_CREATES_FOR);
                }
                Locking::Lock
            };
            // A re-run transaction plans again and seals again; the last sealing is written.
            Box::pin(async move {
                write_groups(t, &groups, now, Some((&chain, &*audit)), locking).await
            })
        })
    }

    fn get_record(&self, id: &RecordId) -> Result<Option<Record>, StoreError> {
        if self.snapshot.is_none() {
            let (reply, answer) = std::sync::mpsc::sync_channel(1);
            self.queue_read(id, ReadReply::Thread(reply));
            let value = answer.recv().map_err(|_| read_task_stopped())??;
            return value.as_deref().map(decode_record).transpose();
        }
        // A snapshot's reads each import it in a transaction of their own.
        let id = id.to_string();
        self.read(move |c| {
            let id = id.clone();
            Box::pin(async move {
                let stmt = c
                    .prepare_cached("SELECT value FROM tokenvault_records WHERE id = $1")
                    .await?;
                Ok(match c.query_opt(&stmt, &[&id]).await? {
                    Some(row) => Some(decode_record(row.get::<_, &[u8]>(0))?),
                    None => None,
                })
            })
        })
    }

    /// A combined read like [`RecordStore::get_record`]'s, awaited instead of waited for: the
    /// caller's task is woken by the reading task's answer, and no thread waits meanwhile. A
    /// snapshot store reads on a thread ([`RecordStore::get_record`]).
    fn read_record(&self, id: &RecordId) -> Option<super::RecordRead> {
        if self.snapshot.is_some() {
            return None;
        }
        let (reply, answer) = tokio::sync::oneshot::channel();
        self.queue_read(id, ReadReply::Task(reply));
        Some(Box::pin(async move {
            let value = answer.await.map_err(|_| read_task_stopped())??;
            value.as_deref().map(decode_record).transpose()
        }))
    }

    fn delete_owner(
        &self,
        owner: &Owner,
        expected: Option<&[(RecordId, u64)]>,
        audit: &AuditAppend,
        outbox: &[(String, Vec<u8>)],
    ) -> Result<u64, StoreError> {
        let owner = owner.as_str().to_string();
        let expected: Option<Arc<Vec<(RecordId, u64)>>> = expected.map(|e| Arc::new(e.to_vec()));
        let audit = vec![audit.clone()];
        let outbox = outbox_rows(outbox);
        let chain = self.chain.clone();
        self.txn(move |t| {
            let (owner, expected, audit, chain, outbox) = (
                owner.clone(),
                expected.clone(),
                audit.clone(),
                chain.clone(),
                Arc::clone(&outbox),
            );
            Box::pin(async move {
                // What was deleted is compared after the fact: a mismatch returns before the
                // commit, so the transaction rolls back and nothing is deleted.
                let rows = t
                    .query(
                        "DELETE FROM tokenvault_records WHERE owner = $1 RETURNING id, version",
                        &[&owner],
                    )
                    .await?;
                let n = rows.len() as u64;
                if let Some(expected) = &expected {
                    let found = rows
                        .iter()
                        .map(|r| {
                            let id = RecordId::parse(r.get::<_, String>(0)).map_err(|e| {
                                Fail::from(StoreError::Corrupt(format!("record id: {e}")))
                            })?;
                            Ok((id, version_u64(r.get::<_, i64>(1))))
                        })
                        .collect::<Result<Vec<_>, Fail>>()?;
                    super::check_owner_records(Some(expected), found)?;
                }
                insert_outbox(t, &outbox).await?;
                insert_audit(t, &chain, &audit).await?;
                Ok(n)
            })
        })
    }

    fn owner_record_ids(&self, owner: &Owner) -> Result<Vec<RecordId>, StoreError> {
        let owner = owner.as_str().to_string();
        self.txn(move |t| {
            let owner = owner.clone();
            Box::pin(async move {
                let rows = t
                    .query(
                        "SELECT id FROM tokenvault_records WHERE owner = $1 ORDER BY id",
                        &[&owner],
                    )
                    .await?;
                rows.into_iter()
                    .map(|r| {
                        RecordId::parse(r.get::<_, String>(0))
                            .map_err(|e| StoreError::Corrupt(format!("record id: {e}")).into())
                    })
                    .collect()
            })
        })
    }

    fn engine_stats(&self) -> Vec<(String, u64)> {
        let s = self.pool.status();
        vec![
            ("postgres_pool_connections".into(), s.size as u64),
            ("postgres_pool_idle".into(), s.available as u64),
            ("postgres_pool_waiting".into(), s.waiting as u64),
        ]
    }

    fn stats(&self) -> Result<StoreStats, StoreError> {
        self.txn(|t| {
            Box::pin(async move {
                let totals = t
                    .query_one(
                        "SELECT count(*), count(*) FILTER (WHERE revoked),
                                count(*) FILTER (WHERE needs_reauth)
                         FROM tokenvault_records",
                        &[],
                    )
                    .await?;
                let per_key = t
                    .query(
                        "SELECT key_version, count(*) FROM tokenvault_records
                         GROUP BY key_version ORDER BY key_version",
                        &[],
                    )
                    .await?;
                Ok(StoreStats {
                    records: version_u64(totals.get(0)),
                    revoked: version_u64(totals.get(1)),
                    needs_reauth: version_u64(totals.get(2)),
                    per_key_version: per_key
                        .into_iter()
                        .map(|r| {
                            (
                                u32::try_from(r.get::<_, i64>(0)).unwrap_or(u32::MAX),
                                version_u64(r.get(1)),
                            )
                        })
                        .collect(),
                })
            })
        })
    }

    fn records_under_key(&self, version: u32) -> Result<u64, StoreError> {
        self.txn(move |t| {
            Box::pin(async move {
                let records: i64 = t
                    .query_one(
                        "SELECT count(*) FROM tokenvault_records WHERE key_version = $1",
                        &[&i64::from(version)],
                    )
                    .await?
                    .get(0);
                Ok(version_u64(records))
            })
        })
    }

    fn scan_records(
        &self,
        after: Option<&RecordId>,
        limit: usize,
    ) -> Result<Vec<Record>, StoreError> {
        let after = after.map(ToString::to_string);
        let limit = i64::try_from(limit).unwrap_or(i64::MAX);
        self.txn(move |t| {
            let after = after.clone();
            Box::pin(async move {
                let rows = t
                    .query(
                        "SELECT value FROM tokenvault_records
                         WHERE $1::text IS NULL OR id > $1 ORDER BY id LIMIT $2",
                        &[&after, &limit],
                    )
                    .await?;
                rows.into_iter()
                    .map(|r| decode_record(r.get::<_, &[u8]>(0)).map_err(Fail::from))
                    .collect()
            })
        })
    }

    fn replace_envelopes(
        &self,
        items: &[EnvelopeReplace],
        now: i64,
    ) -> Result<Vec<Result<u64, StoreError>>, StoreError> {
        let items = Arc::new(items.to_vec());
        self.txn(move |t| {
            let items = Arc::clone(&items);
            Box::pin(async move {
                let ids: Vec<String> = items.iter().map(|i| i.id.to_string()).collect();
                let current = lock_records(t, &ids).await?;
                let mut out = Vec::with_capacity(items.len());
                for item in items.iter() {
                    match plan_replace_envelope(current.get(item.id.as_str()).cloned(), item, now) {
                        Ok(r) => {
                            let version = r.version;
                            update_one(t, r, item.expected_version).await?;
                            out.push(Ok(version));
                        }
                        Err(e) => out.push(Err(e)),
                    }
                }
                Ok(out)
            })
        })
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

impl MetaStore for PostgresStore {
    fn get_meta(&self, key: &str) -> Result<Option<Vec<u8>>, StoreError> {
        let key = key.to_string();
        self.read(move |c| {
            let key = key.clone();
            Box::pin(async move {
                let stmt = c
                    .prepare_cached("SELECT value FROM tokenvault_meta WHERE key = $1")
                    .await?;
                Ok(c.query_opt(&stmt, &[&key]).await?.map(|r| r.get(0)))
            })
        })
    }

    fn put_meta(&self, key: &str, value: Option<&[u8]>) -> Result<(), StoreError> {
        let key = key.to_string();
        let value = value.map(<[u8]>::to_vec);
        self.txn(move |t| {
            let (key, value) = (key.clone(), value.clone());
            Box::pin(async move {
                match value {
                    Some(v) => t.execute(UPSERT_META, &[&key, &v]).await?,
                    None => {
                        t.execute("DELETE FROM tokenvault_meta WHERE key = $1", &[&key])
                            .await?
                    }
                };
                Ok(())
            })
        })
    }

    fn put_meta_if_absent(&self, key: &str, value: &[u8]) -> Result<bool, StoreError> {
        let (key, value) = (key.to_string(), value.to_vec());
        self.txn(move |t| {
            let (key, value) = (key.clone(), value.clone());
            Box::pin(async move {
                Ok(t.execute(
                    "INSERT INTO tokenvault_meta (key, value) VALUES ($1, $2)
                     ON CONFLICT (key) DO NOTHING",
                    &[&key, &value],
                )
                .await?
                    == 1)
            })
        })
    }

    fn get_grant(&self, id: &str) -> Result<Option<Vec<u8>>, StoreError> {
        let id = id.to_string();
        self.read(move |c| {
            let id = id.clone();
            Box::pin(async move {
                let stmt = c
                    .prepare_cached("SELECT value FROM tokenvault_grants WHERE id = $1")
                    .await?;
                Ok(c.query_opt(&stmt, &[&id]).await?.map(|r| r.get(0)))
            })
        })
    }

    fn grant_page(
        &self,
        after: Option<&str>,
        limit: usize,
    ) -> Result<Vec<(String, Vec<u8>)>, StoreError> {
        let after = after.map(ToString::to_string);
        let limit = i64::try_from(limit).unwrap_or(i64::MAX);
        self.txn(move |t| {
            let after = after.clone();
            Box::pin(async move {
                Ok(t.query(
                    "SELECT id, value FROM tokenvault_grants
                     WHERE $1::text IS NULL OR id > $1 ORDER BY id LIMIT $2",
                    &[&after, &limit],
                )
                .await?
                .into_iter()
                .map(|r| (r.get(0), r.get(1)))
                .collect())
            })
        })
    }

    fn outbox_page(
        &self,
        prefix: &str,
        after: Option<&str>,
        limit: usize,
    ) -> Result<Vec<(String, Vec<u8>)>, StoreError> {
        let from = super::outbox_key(after.unwrap_or(prefix));
        // The first key past every key starting with the prefix: its last byte raised (outbox
        // keys are ASCII, and the prefix always ends in an ASCII byte: "outbox/" at least).
        let mut upper = super::outbox_key(prefix).into_bytes();
        if let Some(last) = upper.last_mut() {
            *last = last.saturating_add(1);
        }
        let upper = String::from_utf8(upper)
            .map_err(|_| StoreError::Engine("an outbox prefix must be ASCII".into()))?;
        let after = after.map(super::outbox_key);
        // One more than asked: the entry `after` itself may be the first row.
        let limit = i64::try_from(limit.saturating_add(1)).unwrap_or(i64::MAX);
        let wanted = usize::try_from(limit).unwrap_or(usize::MAX) - 1;
        self.read(move |c| {
            let (from, upper, after) = (from.clone(), upper.clone(), after.clone());
            Box::pin(async move {
                // The key column is COLLATE "C" (byte order), so the primary key serves the range.
                let stmt = c
                    .prepare_cached(
                        "SELECT key, value FROM tokenvault_meta
                         WHERE key >= $1 AND key < $2 ORDER BY key LIMIT $3",
                    )
                    .await?;
                let rows = c.query(&stmt, &[&from, &upper, &limit]).await?;
                Ok(rows
                    .into_iter()
                    .filter_map(|r| {
                        let key: String = r.get(0);
                        if after.as_ref() == Some(&key) {
                            return None;
                        }
                        Some((
                            key.strip_prefix(super::OUTBOX_PREFIX)?.to_string(),
                            r.get(1),
                        ))
                    })
                    .take(wanted)
                    .collect())
            })
        })
    }
}

/// The registry writes behind [`KeyRegistry`] (always with an event) and [`TestHooks`]' unaudited
/// seeding (`audit` `None`).
impl PostgresStore {
    /// [`KeyRegistry::put_keys`].
    fn write_keys(
        &self,
        keys: &[KeyInfo],
        audit: Option<&AuditAppend>,
        outbox: &[(String, Vec<u8>)],
    ) -> Result<(), StoreError> {
        let keys = keys.to_vec();
        let audit: Vec<AuditAppend> = audit.into_iter().cloned().collect();
        let outbox = outbox_rows(outbox);
        let chain = self.chain.clone();
        self.txn(move |t| {
            let (keys, audit, chain, outbox) = (
                keys.clone(),
                audit.clone(),
                chain.clone(),
                Arc::clone(&outbox),
            );
            Box::pin(async move {
                upsert_keys(t, &keys).await?;
                insert_outbox(t, &outbox).await?;
                insert_audit(t, &chain, &audit).await
            })
        })
    }

    /// [`KeyRegistry::retire_key`].
    fn write_retired(&self, key: &KeyInfo, audit: Option<&AuditAppend>) -> Result<(), StoreError> {
        let key = key.clone();
        let audit: Vec<AuditAppend> = audit.into_iter().cloned().collect();
        let chain = self.chain.clone();
        self.txn(move |t| {
            let (key, audit, chain) = (key.clone(), audit.clone(), chain.clone());
            Box::pin(async move {
                let version = i64::from(key.version);
                // Exclusive: record writes under this version hold a share lock on it, so the
                // count below sees every one of them that committed, and none can follow.
                t.query(
                    "SELECT version FROM tokenvault_keys WHERE version = $1 FOR UPDATE",
                    &[&version],
                )
                .await?;
                let records: i64 = t
                    .query_one(
                        "SELECT count(*) FROM tokenvault_records WHERE key_version = $1",
                        &[&version],
                    )
                    .await?
                    .get(0);
                if records > 0 {
                    return Err(StoreError::KeyInUse {
                        version: key.version,
                        records: version_u64(records),
                    }
                    .into());
                }
                upsert_keys(t, std::slice::from_ref(&key)).await?;
                insert_audit(t, &chain, &audit).await
            })
        })
    }
}

impl KeyRegistry for PostgresStore {
    fn keys(&self) -> Result<Vec<KeyInfo>, StoreError> {
        self.read(|c| {
            Box::pin(async move {
                c.query("SELECT value FROM tokenvault_keys ORDER BY version", &[])
                    .await?
                    .into_iter()
                    .map(|r| decode_key(r.get::<_, &[u8]>(0)).map_err(Fail::from))
                    .collect()
            })
        })
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

impl AuditLog for PostgresStore {
    fn append_audit(&self, entry: &AuditAppend, sync: bool) -> Result<(), StoreError> {
        self.append_audit_batch(std::slice::from_ref(entry), sync)
    }

    fn append_audit_batch(&self, entries: &[AuditAppend], _sync: bool) -> Result<(), StoreError> {
        // Every event is a committed transaction before the call that caused it is answered,
        // events of reads too (`sync` false: they come in groups, one commit per group, so under
        // load a read's share of a commit is small). With an asynchronous commit a crash of the
        // database server could lose events this daemon had already chained onto, and the
        // trail would then show a hole no verifier can tell from a removal.
        // One statement in its own (implicit) transaction: one round trip, where an explicit
        // BEGIN/INSERT/COMMIT takes three.
        let entries = Arc::new(entries.to_vec());
        let chain = self.chain.clone();
        self.read(move |c| {
            let (entries, chain) = (Arc::clone(&entries), chain.clone());
            Box::pin(async move {
                let stmt = c.prepare_cached(INSERT_AUDIT).await?;
                if inserted_events(c, &stmt, &chain, &entries).await? != entries.len() as u64 {
                    return Err(StoreError::Conflict(
                        "audit events (another writer on this chain)".into(),
                    )
                    .into());
                }
                Ok(())
            })
        })
    }

    fn audit_events(&self, from_seq: u64, limit: usize) -> Result<Vec<(u64, Vec<u8>)>, StoreError> {
        chain_page(self, self.chain.clone(), from_seq, limit)
    }

    fn last_audit_event(&self) -> Result<Option<(u64, Vec<u8>)>, StoreError> {
        let chain = self.chain.clone();
        self.txn(move |t| {
            let chain = chain.clone();
            Box::pin(async move {
                Ok(t.query_opt(
                    "SELECT seq, value FROM tokenvault_audit WHERE chain = $1
                     ORDER BY seq DESC LIMIT 1",
                    &[&chain],
                )
                .await?
                .map(|r| (version_u64(r.get(0)), r.get(1))))
            })
        })
    }

    fn audit_chains(&self) -> Result<Vec<String>, StoreError> {
        self.txn(|t| {
            Box::pin(async move {
                Ok(t.query(
                    "SELECT DISTINCT chain FROM tokenvault_audit ORDER BY chain",
                    &[],
                )
                .await?
                .into_iter()
                .map(|r| r.get(0))
                .collect())
            })
        })
    }

    fn chain_events(
        &self,
        chain: &str,
        from_seq: u64,
        limit: usize,
    ) -> Result<Vec<(u64, Vec<u8>)>, StoreError> {
        chain_page(self, chain.to_string(), from_seq, limit)
    }

    fn own_chain(&self) -> String {
        self.chain.clone()
    }

    fn prune_audit(
        &self,
        through: u64,
        meta: &[(String, Vec<u8>)],
        audit: &AuditAppend,
    ) -> Result<(), StoreError> {
        let meta = Arc::new(meta.to_vec());
        let audit = Arc::new(audit.clone());
        let chain = self.chain.clone();
        let through = version_i64(through);
        self.txn(move |t| {
            let (meta, audit, chain) = (Arc::clone(&meta), Arc::clone(&audit), chain.clone());
            Box::pin(async move {
                t.execute(
                    "DELETE FROM tokenvault_audit WHERE chain = $1 AND seq <= $2",
                    &[&chain, &through],
                )
                .await?;
                for (k, v) in meta.iter() {
                    t.execute(UPSERT_META, &[k, v]).await?;
                }
                insert_audit(t, &chain, std::slice::from_ref(&*audit)).await
            })
        })
    }
}

impl Leases for PostgresStore {
    fn acquire_lease(
        &self,
        name: &str,
        owner: &str,
        ttl: Duration,
    ) -> Result<Option<u64>, StoreError> {
        let (name, owner) = (name.to_string(), owner.to_string());
        let ttl_ms = i64::try_from(ttl.as_millis()).unwrap_or(i64::MAX);
        self.txn(move |t| {
            let (name, owner) = (name.clone(), owner.clone());
            Box::pin(async move {
                // Taken when free, expired, or already ours; the token rises on a change of
                // owner, so a holder that stalled past its expiry can be told apart.
                let row = t
                    .query_opt(
                        "INSERT INTO tokenvault_leases AS l (name, owner, token, expires_at)
                         VALUES ($1, $2, 1, now() + $3::bigint * interval '1 millisecond')
                         ON CONFLICT (name) DO UPDATE SET
                             owner = EXCLUDED.owner,
                             token = l.token + CASE WHEN l.owner = EXCLUDED.owner THEN 0 ELSE 1 END,
                             expires_at = EXCLUDED.expires_at
                         WHERE l.expires_at < now() OR l.owner = EXCLUDED.owner
                         RETURNING token",
                        &[&name, &owner, &ttl_ms],
                    )
                    .await?;
                Ok(row.map(|r| version_u64(r.get(0))))
            })
        })
    }

    fn release_lease(&self, name: &str, owner: &str) -> Result<(), StoreError> {
        let (name, owner) = (name.to_string(), owner.to_string());
        self.txn(move |t| {
            let (name, owner) = (name.clone(), owner.clone());
            Box::pin(async move {
                t.execute(
                    "UPDATE tokenvault_leases SET expires_at = now() - interval '1 millisecond'
                     WHERE name = $1 AND owner = $2",
                    &[&name, &owner],
                )
                .await?;
                Ok(())
            })
        })
    }
}

impl Transfer for PostgresStore {
    fn meta_page(
        &self,
        after: Option<&str>,
        limit: usize,
    ) -> Result<Vec<(String, Vec<u8>)>, StoreError> {
        let after = after.unwrap_or_default().to_string();
        let limit = i64::try_from(limit).unwrap_or(i64::MAX);
        self.read(move |c| {
            let after = after.clone();
            Box::pin(async move {
                // Grants and replay markers have tables of their own here; listed under the
                // keys the other engines use, so a copy moves them whatever the engines.
                let rows = c
                    .query(
                        "SELECT key, value, applied_at FROM (
                             SELECT key COLLATE \"C\" AS key, value, NULL::bigint AS applied_at
                                 FROM tokenvault_meta
                             UNION ALL SELECT 'grant/' || id, value, NULL FROM tokenvault_grants
                             UNION ALL SELECT 'set_jti/' || key, NULL, applied_at
                                 FROM tokenvault_replay
                         ) m WHERE key > $1 ORDER BY key LIMIT $2",
                        &[&after, &limit],
                    )
                    .await?;
                Ok(rows
                    .into_iter()
                    .map(|r| {
                        let value = match r.get::<_, Option<i64>>(2) {
                            Some(at) => replay_value(at).to_vec(),
                            None => r.get::<_, Option<Vec<u8>>>(1).unwrap_or_default(),
                        };
                        (r.get(0), value)
                    })
                    .collect())
            })
        })
    }

    fn import(&self, batch: &super::Import) -> Result<(), StoreError> {
        let batch = Arc::new(batch.clone());
        self.txn(move |t| {
            let batch = Arc::clone(&batch);
            Box::pin(async move { import_in(t, &batch).await })
        })
    }
}

#[cfg(any(test, feature = "testing"))]
impl TestHooks for PostgresStore {
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
        let writes = writes.to_vec();
        self.txn(move |t| {
            let writes = writes.clone();
            Box::pin(async move { write_group(t, &writes, now).await })
        })?
    }

    fn dangerous_overwrite_audit(&self, seq: u64, bytes: &[u8]) -> Result<(), StoreError> {
        let chain = self.chain.clone();
        let (seq, bytes) = (version_i64(seq), bytes.to_vec());
        self.txn(move |t| {
            let (chain, bytes) = (chain.clone(), bytes.clone());
            Box::pin(async move {
                t.execute(
                    "INSERT INTO tokenvault_audit (chain, seq, value) VALUES ($1, $2, $3)
                     ON CONFLICT (chain, seq) DO UPDATE SET value = EXCLUDED.value",
                    &[&chain, &seq, &bytes],
                )
                .await?;
                Ok(())
            })
        })
    }
}

/// Writes an import (`store copy`) as it is, overwriting what is there.
async fn import_in(t: &Txn<'_>, batch: &super::Import) -> Result<(), Fail> {
    if !batch.records.is_empty() {
        let mut id = Vec::new();
        let mut owner = Vec::new();
        let mut key_version = Vec::new();
        let mut version = Vec::new();
        let mut revoked = Vec::new();
        let mut needs_reauth = Vec::new();
        let mut value = Vec::new();
        for r in &batch.records {
            id.push(r.meta.id.to_string());
            owner.push(r.meta.owner.as_str().to_string());
            key_version.push(i64::from(r.key_version));
            version.push(version_i64(r.version));
            revoked.push(r.revoked);
            needs_reauth.push(r.needs_reauth);
            value.push(encode_record(r));
        }
        t.execute(
            "INSERT INTO tokenvault_records
                 (id, owner, key_version, version, revoked, needs_reauth, value)
             SELECT * FROM UNNEST($1::text[], $2::text[], $3::bigint[], $4::bigint[],
                                  $5::bool[], $6::bool[], $7::bytea[])
             ON CONFLICT (id) DO UPDATE SET owner = EXCLUDED.owner,
                 key_version = EXCLUDED.key_version, version = EXCLUDED.version,
                 revoked = EXCLUDED.revoked, needs_reauth = EXCLUDED.needs_reauth,
                 value = EXCLUDED.value",
            &[
                &id,
                &owner,
                &key_version,
                &version,
                &revoked,
                &needs_reauth,
                &value,
            ],
        )
        .await?;
    }
    upsert_keys(t, &batch.keys).await?;
    for (key, value) in &batch.meta {
        if let Some(id) = key.strip_prefix(GRANT_PREFIX) {
            t.execute(
                "INSERT INTO tokenvault_grants (id, value) VALUES ($1, $2)
                 ON CONFLICT (id) DO UPDATE SET value = EXCLUDED.value",
                &[&id, value],
            )
            .await?;
        } else if let Some(marker) = key.strip_prefix(REPLAY_PREFIX) {
            let at = <[u8; 8]>::try_from(value.as_slice())
                .map(i64::from_be_bytes)
                .map_err(|_| StoreError::Corrupt(format!("replay marker {key} is not 8 bytes")))?;
            t.execute(
                "INSERT INTO tokenvault_replay (key, applied_at) VALUES ($1, $2)
                 ON CONFLICT (key) DO UPDATE SET applied_at = EXCLUDED.applied_at",
                &[&marker, &at],
            )
            .await?;
        } else {
            t.execute(UPSERT_META, &[key, value]).await?;
        }
    }
    if !batch.audit.is_empty() {
        // One statement for the page's events: a store written since every stored record
        // has its event holds about as many events as records, and a round trip per event
        // made a copy into PostgreSQL ten times slower than one per page (3.1k against 36k
        // records a second, measured with scripts/perf-postgres).
        let (mut chains, mut seqs, mut values) = (Vec::new(), Vec::new(), Vec::new());
        for (chain, seq, bytes) in &batch.audit {
            chains.push(chain.as_str());
            seqs.push(version_i64(*seq));
            values.push(bytes.as_slice());
        }
        t.execute(
            "INSERT INTO tokenvault_audit (chain, seq, value)
             SELECT * FROM UNNEST($1::text[], $2::bigint[], $3::bytea[])
             ON CONFLICT (chain, seq) DO UPDATE SET value = EXCLUDED.value",
            &[&chains, &seqs, &values],
        )
        .await?;
    }
    Ok(())
}

/// Up to `limit` events of `chain` from `from_seq`, ascending.
fn chain_page(
    store: &PostgresStore,
    chain: String,
    from_seq: u64,
    limit: usize,
) -> Result<Vec<(u64, Vec<u8>)>, StoreError> {
    let from = version_i64(from_seq);
    let limit = i64::try_from(limit).unwrap_or(i64::MAX);
    store.txn(move |t| {
        let chain = chain.clone();
        Box::pin(async move {
            Ok(t.query(
                "SELECT seq, value FROM tokenvault_audit
                 WHERE chain = $1 AND seq >= $2 ORDER BY seq LIMIT $3",
                &[&chain, &from, &limit],
            )
            .await?
            .into_iter()
            .map(|r| (version_u64(r.get(0)), r.get(1)))
            .collect())
        })
    })
}

/// [`RecordStore::apply`]'s mutations in the transaction: reads what they name in one query
/// per table (rows locked), plans them with the shared rules (`store::rules`) and writes what
/// changed. A value another writer created since it was read (an absent row is not locked)
/// re-runs the transaction, whose planning then sees it.
async fn apply_in(
    t: &Txn<'_>,
    mutations: &[Mutation],
    now: i64,
    audited: bool,
) -> Result<(), Fail> {
    let reads = super::rules::reads(mutations);
    let mut state = super::rules::Fetched::default();
    if !reads.key_versions.is_empty() {
        let versions: Vec<i64> = reads.key_versions.iter().map(|v| i64::from(*v)).collect();
        state.key_states = share_key_states(t, &versions).await?;
    }
    if !reads.records.is_empty() {
        let ids: Vec<String> = reads.records.iter().map(|i| i.to_string()).collect();
        state.records = lock_records(t, &ids)
            .await?
            .into_values()
            .map(|r| (r.meta.id.clone(), r))
            .collect();
    }
    let grants: Vec<&str> = reads
        .meta
        .iter()
        .filter_map(|k| k.strip_prefix(GRANT_PREFIX))
        .collect();
    if !grants.is_empty() {
        let stmt = t
            .prepare_cached("SELECT id, value FROM tokenvault_grants WHERE id = ANY($1) FOR UPDATE")
            .await?;
        for row in t.query(&stmt, &[&grants]).await? {
            let id: &str = row.get(0);
            state.meta.insert(grant_key(id), row.get(1));
        }
    }
    let markers: Vec<&str> = reads
        .meta
        .iter()
        .filter_map(|k| k.strip_prefix(REPLAY_PREFIX))
        .collect();
    if !markers.is_empty() {
        let stmt = t
            .prepare_cached("SELECT key, applied_at FROM tokenvault_replay WHERE key = ANY($1)")
            .await?;
        for row in t.query(&stmt, &[&markers]).await? {
            let key: &str = row.get(0);
            state
                .meta
                .insert(replay_key(key), replay_value(row.get(1)).to_vec());
        }
    }
    // Other metadata a mutation reads (approval requests): rows of tokenvault_meta, locked
    // like grants so a compare-and-swap holds across daemons.
    let other: Vec<&str> = reads
        .meta
        .iter()
        .map(String::as_str)
        .filter(|k| !k.starts_with(GRANT_PREFIX) && !k.starts_with(REPLAY_PREFIX))
        .collect();
    if !other.is_empty() {
        let stmt = t
            .prepare_cached("SELECT key, value FROM tokenvault_meta WHERE key = ANY($1) FOR UPDATE")
            .await?;
        for row in t.query(&stmt, &[&other]).await? {
            let key: &str = row.get(0);
            state.meta.insert(key.to_string(), row.get(1));
        }
    }
    let changes = super::rules::plan(mutations, now, &mut state, audited)?;
    let mut rows = Vec::new();
    let (mut deleted, mut deleted_versions) = (Vec::new(), Vec::new());
    for (id, c) in changes.records {
        match (c.before, c.after) {
            (before, Some(after)) => rows.push((after, before.map(|b| b.version))),
            (Some(before), None) => {
                deleted.push(id.to_string());
                deleted_versions.push(version_i64(before.version));
            }
            (None, None) => {}
        }
    }
    store_rows(t, &rows).await?;
    if !deleted.is_empty() {
        let n = t
            .execute(
                "DELETE FROM tokenvault_records AS t
                 USING UNNEST($1::text[], $2::bigint[]) AS d(id, version)
                 WHERE t.id = d.id COLLATE \"C\" AND t.version = d.version",
                &[&deleted, &deleted_versions],
            )
            .await?;
        if n != deleted.len() as u64 {
            return Err(Fail::Retry("a locked record changed".into()));
        }
    }
    for (key, c) in changes.meta {
        let n = if let Some(id) = key.strip_prefix(GRANT_PREFIX) {
            compare_and_swap(t, &GRANT_CAS, id, &c.before, &c.after).await?
        } else if let Some(marker) = key.strip_prefix(REPLAY_PREFIX) {
            match &c.after {
                Some(v) => {
                    let at = <[u8; 8]>::try_from(v.as_slice())
                        .map(i64::from_be_bytes)
                        .map_err(|_| StoreError::Corrupt("replay marker value".into()))?;
                    t.execute(
                        "INSERT INTO tokenvault_replay (key, applied_at) VALUES ($1, $2)
                         ON CONFLICT (key) DO NOTHING",
                        &[&marker, &at],
                    )
                    .await?
                }
                None => {
                    t.execute("DELETE FROM tokenvault_replay WHERE key = $1", &[&marker])
                        .await?
                }
            }
        } else {
            // Approval requests and settings: compare-and-swap, as for grants.
            compare_and_swap(t, &META_CAS, &key, &c.before, &c.after).await?
        };
        if n != 1 {
            return Err(Fail::Retry(format!(
                "{} changed concurrently",
                key.split('/').next().unwrap_or("metadata")
            )));
        }
    }
    Ok(())
}

/// The three statements of a compare-and-swap on a key/value table: insert if absent, update
/// from the value read, delete from the value read. Each changes one row or none.
struct CasStatements {
    insert: &'static str,
    update: &'static str,
    delete: &'static str,
}

const GRANT_CAS: CasStatements = CasStatements {
    insert: "INSERT INTO tokenvault_grants (id, value) VALUES ($1, $2) ON CONFLICT (id) DO NOTHING",
    update: "UPDATE tokenvault_grants SET value = $2 WHERE id = $1 AND value = $3",
    delete: "DELETE FROM tokenvault_grants WHERE id = $1 AND value = $2",
};

const META_CAS: CasStatements = CasStatements {
    insert: "INSERT INTO tokenvault_meta (key, value) VALUES ($1, $2) ON CONFLICT (key) DO NOTHING",
    update: "UPDATE tokenvault_meta SET value = $2 WHERE key = $1 AND value = $3",
    delete: "DELETE FROM tokenvault_meta WHERE key = $1 AND value = $2",
};

/// Writes `after` over the row `key` that was `before` when planned: the rows changed (1, or
/// 0 if another writer got there first; 1 when nothing was to change).
async fn compare_and_swap(
    t: &Txn<'_>,
    sql: &CasStatements,
    key: &str,
    before: &Option<Vec<u8>>,
    after: &Option<Vec<u8>>,
) -> Result<u64, Fail> {
    Ok(match (before, after) {
        (None, Some(v)) => t.execute(sql.insert, &[&key, v]).await?,
        (Some(old), Some(v)) => t.execute(sql.update, &[&key, v, old]).await?,
        (Some(old), None) => t.execute(sql.delete, &[&key, old]).await?,
        (None, None) => 1,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A fresh, empty database on the test server (scripts/with-postgres starts one).
    pub(crate) fn fresh() -> (PostgresStore, tokio_postgres::Config) {
        let url = std::env::var("TOKENVAULT_TEST_PG_URL").expect(
            "TOKENVAULT_TEST_PG_URL is not set: run the tests with ./scripts/test, which starts \
             a throwaway PostgreSQL (or scripts/with-postgres cargo test)",
        );
        let admin: tokio_postgres::Config = url.parse().expect("test URL");
        let name = format!("tv_{}", hex::encode(rand::random::<[u8; 8]>()));
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime");
        rt.block_on(async {
            let (client, conn) = admin.connect(tokio_postgres::NoTls).await.expect("connect");
            tokio::spawn(conn);
            client
                .batch_execute(&format!("CREATE DATABASE {name}"))
                .await
                .expect("create database");
        });
        let mut config = admin.clone();
        config.dbname(&name);
        let store = PostgresStore::connect(options(config.clone()), "test").expect("store");
        (store, config)
    }

    fn options(config: tokio_postgres::Config) -> PostgresOptions {
        PostgresOptions {
            config,
            tls: None,
            pool_size: 4,
            connect_timeout: Duration::from_secs(5),
        }
    }

    fn writes(range: std::ops::Range<u32>, expected: u64) -> Vec<RecordWrite> {
        range
            .map(|i| RecordWrite {
                meta: crate::record::RecordMeta::parse(
                    &format!("r{i:04}"),
                    "o",
                    "github",
                    crate::record::SecretKind::AccessToken,
                    &[],
                    0,
                )
                .expect("meta"),
                envelope: vec![(i % 251) as u8; 40],
                key_version: 1,
                expected_version: expected,
            })
            .collect()
    }

    #[test]
    fn a_snapshot_reads_one_instant_while_the_database_changes_and_writes_nothing() {
        use crate::copy;
        let (live, config) = fresh();
        live.put_keys_unaudited(&[KeyInfo {
            version: 1,
            id: crate::keys::KeyId([1; 32]),
            state: KeyState::Active,
            created_at: 1,
            updated_at: 1,
            spki_der: vec![1],
            destroy_after: None,
        }])
        .expect("keys");
        live.put_records(&writes(0..600, 0), 10).expect("records");
        let snap = PostgresStore::connect(options(config), "test")
            .and_then(PostgresStore::into_snapshot)
            .expect("snapshot");
        let then = copy::summarize(&snap).expect("summary");
        assert_eq!(then.records[&1].count, 600);

        // The database changes under a copy between its pages: records replaced on both sides
        // of the copy's cursor, new ones, metadata, an audit event.
        let target = crate::MemoryStore::new();
        let mut changed = false;
        let report = copy::copy(
            &snap,
            &target,
            &copy::CopyOptions {
                source_name: "postgres:test".into(),
                stop_after_pages: None,
            },
            &mut |p| {
                if p.phase == copy::Phase::Records && !changed {
                    changed = true;
                    live.put_records(&writes(0..600, 1), 11).expect("replace");
                    live.put_records(&writes(600..700, 0), 11).expect("more");
                    live.put_meta("late", Some(b"x")).expect("meta");
                    live.append_audit(
                        &AuditAppend {
                            seq: 1,
                            bytes: b"late".to_vec(),
                        },
                        true,
                    )
                    .expect("audit");
                }
            },
        )
        .expect("a copy of a snapshot verifies against it");
        assert!(changed, "the copy never reached its records");
        assert_eq!(report.summary, then, "the copy is the snapshot");
        assert_eq!(copy::summarize(&target).expect("target"), then);
        let now = copy::summarize(&live).expect("live summary");
        assert_eq!(now.records[&1].count, 700);
        assert_ne!(now, then);
        // A snapshot's reads each import it on a thread; none is offered to await (which would
        // read the database as it is now).
        let id = RecordId::parse("r0001").expect("id");
        assert!(snap.read_record(&id).is_none());
        assert_eq!(
            snap.get_record(&id).expect("read").expect("found").version,
            1
        );

        // Nothing can be written through a snapshot.
        assert!(snap.put_meta("x", Some(b"y")).is_err());
        assert!(snap.put_records(&writes(900..901, 0), 12).is_err());
        assert_eq!(live.get_meta("x"), Ok(None));
        assert_eq!(
            live.get_record(&RecordId::parse("r0900").expect("id")),
            Ok(None)
        );

        // Without the transaction that holds it, the snapshot is gone: reads fail rather than
        // see the database as it is now.
        let ended = live
            .txn(|t| {
                Box::pin(async move {
                    // The timeout form waits until the backend has exited.
                    Ok(t.query(
                        "SELECT pg_terminate_backend(pid, 10000) FROM pg_stat_activity
                         WHERE datname = current_database() AND state = 'idle in transaction'",
                        &[],
                    )
                    .await?
                    .iter()
                    .filter(|r| r.get::<_, bool>(0))
                    .count())
                })
            })
            .expect("terminate the holder");
        assert_eq!(ended, 1, "one transaction holds the snapshot");
        assert!(snap.scan_records(None, 10).is_err());
        assert!(snap.keys().is_err());
    }

    /// Seals one event per accepted record from a fixed sequence number.
    struct SealFrom(u64);

    impl super::super::GroupAudit for SealFrom {
        fn seal(&self, accepted: &[(usize, &[Record])]) -> Vec<AuditAppend> {
            accepted
                .iter()
                .flat_map(|(_, records)| records.iter())
                .zip(self.0..)
                .map(|(r, seq)| AuditAppend {
                    seq,
                    bytes: format!("stored {}", r.meta.id).into_bytes(),
                })
                .collect()
        }
    }

    /// The audit inserts are plain inserts: a place in the chain already taken (an earlier
    /// write that committed although its answer was lost) must still refuse the whole write
    /// with the same errors, and leave the stored event and the records as they were.
    #[test]
    fn a_write_whose_audit_places_are_taken_writes_nothing() {
        let (store, _) = fresh();
        let first = AuditAppend {
            seq: 1,
            bytes: b"the first event".to_vec(),
        };
        store.append_audit_batch(&[first], false).expect("first");
        let group = writes(0..2, 0);
        let refused = store.put_record_groups(&[&group], 1, Arc::new(SealFrom(1)));
        assert_eq!(
            refused,
            Err(StoreError::Unavailable(
                "audit events 1..=2 are already stored (an earlier write's outcome was not \
                 known); retry"
                    .into()
            ))
        );
        assert_eq!(store.get_record(&group[0].meta.id), Ok(None));
        assert_eq!(store.get_record(&group[1].meta.id), Ok(None));
        let again = AuditAppend {
            seq: 1,
            bytes: b"another event".to_vec(),
        };
        assert_eq!(
            store.append_audit_batch(&[again], false),
            Err(StoreError::Conflict(
                "audit events (another writer on this chain)".into()
            ))
        );
        assert_eq!(
            store.audit_events(1, 10),
            Ok(vec![(1, b"the first event".to_vec())])
        );
        // The next place is free: the same group is written whole, with its events.
        assert_eq!(
            store.put_record_groups(&[&group], 1, Arc::new(SealFrom(2))),
            Ok(vec![Ok(vec![1, 1])])
        );
        assert_eq!(store.audit_events(1, 10).expect("events").len(), 3);
    }

    /// A record another writer creates while a group commit is planned (committed after the
    /// group read the ids, before its insert) re-runs the transaction, which then refuses the
    /// create as a duplicate: the outcome callers get from any other duplicate, not an engine
    /// error.
    #[test]
    fn a_record_created_meanwhile_by_another_writer_is_refused_as_a_duplicate() {
        let (store, config) = fresh();
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime");
        let connect = || async {
            let (client, conn) = config
                .connect(tokio_postgres::NoTls)
                .await
                .expect("connect");
            tokio::spawn(conn);
            client
        };
        let (other, watcher) = rt.block_on(async { (connect().await, connect().await) });
        let group = writes(7..8, 0);
        let theirs = Record {
            meta: group[0].meta.clone(),
            envelope: b"the other writer's envelope".to_vec(),
            key_version: 1,
            created_at: 1,
            updated_at: 1,
            revoked: false,
            needs_reauth: false,
            version: 1,
        };
        rt.block_on(async {
            other.batch_execute("BEGIN").await.expect("begin");
            other
                .execute(
                    "INSERT INTO tokenvault_records
                         (id, owner, key_version, version, revoked, needs_reauth, value)
                     VALUES ($1, 'o', 1, 1, false, false, $2)",
                    &[&theirs.meta.id.to_string(), &encode_record(&theirs)],
                )
                .await
                .expect("insert, uncommitted");
        });
        let store = Arc::new(store);
        let ours = {
            let (store, group) = (Arc::clone(&store), group.clone());
            std::thread::spawn(move || store.put_record_groups(&[&group], 2, Arc::new(SealFrom(1))))
        };
        // The group's insert waits on the other writer's uncommitted row: only then commit it.
        rt.block_on(async {
            let deadline = std::time::Instant::now() + Duration::from_secs(30);
            loop {
                let waiting: i64 = watcher
                    .query_one(
                        "SELECT count(*) FROM pg_stat_activity
                         WHERE datname = current_database() AND wait_event_type = 'Lock'",
                        &[],
                    )
                    .await
                    .expect("activity")
                    .get(0);
                if waiting > 0 {
                    break;
                }
                assert!(
                    std::time::Instant::now() < deadline,
                    "the group never waited"
                );
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            other.batch_execute("COMMIT").await.expect("commit");
        });
        let outcome = ours.join().expect("no panic");
        assert_eq!(
            outcome,
            Ok(vec![Err(StoreError::AlreadyExists("r0007".into()))])
        );
        let stored = store.get_record(&group[0].meta.id).expect("read");
        assert_eq!(stored.map(|r| r.envelope), Some(theirs.envelope));
        assert_eq!(store.audit_events(1, 10), Ok(vec![]));
    }

    /// A group of creates is written without first locking its ids; one that names a record
    /// that exists fails on insert, is re-run with the locking read, and refuses that create
    /// alone, and groups of creates then lock for a while, so repeating the duplicate costs
    /// one extra transaction per period, not one per group.
    #[test]
    fn a_duplicate_in_a_group_of_creates_is_refused_alone_and_creates_then_lock_for_a_while() {
        let (store, _) = fresh();
        let new = writes(0..2, 0);
        assert_eq!(
            store.put_record_groups(&[&new[..1], &new[1..]], 5, Arc::new(SealFrom(1))),
            Ok(vec![Ok(vec![1]), Ok(vec![1])])
        );
        assert_eq!(
            *unpoisoned(&store.lock_creates_until),
            None,
            "creates that went through leave groups unlocked"
        );
        // r0001 again, with another envelope (the same one would be an idempotent replay).
        let (mut again, fresh_ids) = (writes(1..2, 0), writes(2..4, 0));
        again[0].envelope = vec![9; 40];
        let before = std::time::Instant::now();
        assert_eq!(
            store.put_record_groups(
                &[&fresh_ids[..1], &again, &fresh_ids[1..]],
                6,
                Arc::new(SealFrom(3))
            ),
            Ok(vec![
                Ok(vec![1]),
                Err(StoreError::AlreadyExists("r0001".into())),
                Ok(vec![1])
            ])
        );
        let until = unpoisoned(&store.lock_creates_until).expect("creates lock now");
        assert!(until >= before + LOCK_CREATES_FOR, "{until:?}");
        for i in 0..4 {
            let id = RecordId::parse(format!("r{i:04}")).expect("id");
            assert_eq!(
                store.get_record(&id).expect("read").map(|r| r.version),
                Some(1)
            );
        }
        let events = store.audit_events(1, 10).expect("events");
        assert_eq!(
            events.iter().map(|(seq, _)| *seq).collect::<Vec<_>>(),
            [1, 2, 3, 4],
            "one event per record written, the refused create none"
        );
    }

    /// A pipelined transaction on `store` inserting into a scratch table with two statements
    /// sent with COMMIT: `second` is what the second one binds (an `int4` commits; anything
    /// else fails before its request is sent), and `declared` how many statements
    /// [`Sending`] expects. Returns the outcome and the rows the table then holds, and checks
    /// that no connection of the database was left inside a transaction.
    fn pipelined_inserts(
        second: Box<dyn tokio_postgres::types::ToSql + Send + Sync>,
        declared: usize,
    ) -> (Result<(), StoreError>, i64) {
        let (store, _) = fresh();
        store
            .txn(|t| {
                Box::pin(async move { Ok(t.batch_execute("CREATE TABLE scratch (n int)").await?) })
            })
            .expect("scratch table");
        let second = Arc::new(second);
        let outcome = store.txn_with(true, move |t| {
            let second = Arc::clone(&second);
            Box::pin(async move {
                let insert = t
                    .begin_with(async {
                        Ok(t.prepare_cached("INSERT INTO scratch VALUES ($1)").await?)
                    })
                    .await?;
                let sending = Sending::new(declared);
                let last = async {
                    let (a, b) = tokio::join!(
                        biased;
                        sending.watch(async { Ok(t.execute(&insert, &[&1i32]).await?) }),
                        sending.watch(async { Ok(t.execute(&insert, &[&**second]).await?) })
                    );
                    pipelined(a, b).map(|_| ())
                };
                t.commit_with(&sending, last).await
            })
        });
        let count = |sql: &'static str| {
            store
                .txn(move |t| {
                    Box::pin(async move { Ok(t.query_one(sql, &[]).await?.get::<_, i64>(0)) })
                })
                .expect("count")
        };
        let open = count(
            "SELECT count(*) FROM pg_stat_activity
             WHERE datname = current_database() AND pid <> pg_backend_pid()
               AND state LIKE 'idle in transaction%'",
        );
        assert_eq!(
            open, 0,
            "a connection went back to the pool inside a transaction"
        );
        (outcome, count("SELECT count(*) FROM scratch"))
    }

    /// Reads of many threads at once, blocking ones and awaited ones, are answered by fewer
    /// statements than reads, each with its own record (or none); an awaited read dropped
    /// unanswered (its caller gone) costs the others nothing; a read sees a write that
    /// committed before it was asked.
    #[test]
    fn concurrent_record_reads_are_combined_and_each_gets_its_own_record() {
        let (store, _) = fresh();
        store.put_records(&writes(0..64, 0), 10).expect("records");
        let store = Arc::new(store);
        let reads_per_thread = 300;
        std::thread::scope(|s| {
            for t in 0..16u32 {
                let store = Arc::clone(&store);
                s.spawn(move || {
                    // Odd threads await their reads, as the daemon's executor does.
                    let awaiting = (t % 2 == 1).then(|| {
                        tokio::runtime::Builder::new_current_thread()
                            .build()
                            .expect("runtime")
                    });
                    for n in 0..reads_per_thread {
                        // Ids 64..80 were never written.
                        let i = (t * 7 + n * 13) % 80;
                        let id = RecordId::parse(format!("r{i:04}")).expect("id");
                        let got = match &awaiting {
                            None => store.get_record(&id).expect("read"),
                            Some(rt) => {
                                if n % 10 == 0 {
                                    drop(store.read_record(&id).expect("an awaited read"));
                                }
                                let read = store.read_record(&id).expect("an awaited read");
                                rt.block_on(read).expect("read")
                            }
                        };
                        match got {
                            Some(r) => {
                                assert!(i < 64, "r{i:04} was never written");
                                assert_eq!(r.meta.id, id);
                                assert_eq!(r.envelope, vec![(i % 251) as u8; 40]);
                            }
                            None => assert!(i >= 64, "r{i:04} was written"),
                        }
                    }
                });
            }
        });
        let statements = unpoisoned(&store.reads).statements;
        assert!(
            statements < 16 * u64::from(reads_per_thread),
            "{statements} statements for {} reads",
            16 * reads_per_thread
        );
        let mut replace = writes(5..6, 1);
        replace[0].envelope = vec![7; 40];
        store.put_records(&replace, 11).expect("replace");
        let id = RecordId::parse("r0005").expect("id");
        let read = store.get_record(&id).expect("read").expect("found");
        assert_eq!((read.version, read.envelope), (2, vec![7; 40]));
    }

    /// A read whose caller has gone before its statement is left out of it: reads for nobody
    /// cost the database nothing.
    #[test]
    fn reads_whose_callers_are_gone_are_not_read() {
        let (store, _) = fresh();
        store.put_records(&writes(0..2, 0), 10).expect("records");
        let gone = || {
            let (reply, answer) = tokio::sync::oneshot::channel();
            drop(answer);
            ReadReply::Task(reply)
        };
        {
            let mut q = unpoisoned(&store.reads);
            q.waiting
                .extend((0..3).map(|i| (format!("r{i:04}"), gone())));
            q.reading = true;
        }
        store
            .runtime
            .block_on(read_batches(store.pool.clone(), Arc::clone(&store.reads)));
        let q = unpoisoned(&store.reads);
        assert_eq!((q.statements, q.waiting.len(), q.reading), (0, 0, false));
        drop(q);
        let id = RecordId::parse("r0001").expect("id");
        let read = store
            .runtime
            .block_on(store.read_record(&id).expect("awaited"));
        assert_eq!(read.expect("read").expect("found").meta.id, id);
        assert_eq!(unpoisoned(&store.reads).statements, 1);
    }

    #[test]
    fn a_pipelined_commit_commits_every_statement_sent_with_it() {
        assert_eq!(pipelined_inserts(Box::new(2i32), 2), (Ok(()), 2));
    }

    #[test]
    fn a_pipelined_commit_is_not_sent_after_a_statement_that_could_not_be() {
        // The first insert reached the server; the second failed to encode (a string for an
        // int4), so COMMIT must not follow the first one.
        let (outcome, rows) = pipelined_inserts(Box::new("two"), 2);
        let Err(StoreError::Engine(message)) = outcome else {
            panic!("expected an engine error, got {outcome:?}");
        };
        assert!(message.contains("serializ"), "{message}");
        assert_eq!(rows, 0);
    }

    #[test]
    fn a_pipelined_commit_with_fewer_statements_polled_than_declared_commits_nothing() {
        let (outcome, rows) = pipelined_inserts(Box::new(2i32), 3);
        assert_eq!(
            outcome,
            Err(StoreError::Engine(
                "internal: a group commit's statements were not all sent; nothing was committed"
                    .into()
            ))
        );
        assert_eq!(rows, 0);
    }

    #[test]
    fn conformance() {
        crate::conformance::all(|| Box::new(fresh().0));
    }

    #[test]
    fn leases_have_one_owner_until_they_expire_or_are_released() {
        let (store, _) = fresh();
        let long = Duration::from_secs(60);
        assert_eq!(store.acquire_lease("x", "a", long), Ok(Some(1)));
        // Renewing keeps the token; another owner is refused while it lasts.
        assert_eq!(store.acquire_lease("x", "a", long), Ok(Some(1)));
        assert_eq!(store.acquire_lease("x", "b", long), Ok(None));
        // Another lease name is independent.
        assert_eq!(store.acquire_lease("y", "b", long), Ok(Some(1)));
        // Released: the next owner gets it with a higher fencing token.
        store.release_lease("x", "b").expect("not b's: no effect");
        assert_eq!(store.acquire_lease("x", "b", long), Ok(None));
        store.release_lease("x", "a").expect("release");
        assert_eq!(store.acquire_lease("x", "b", long), Ok(Some(2)));
        // Expired (by the database's clock): taken over.
        assert_eq!(
            store.acquire_lease("z", "a", Duration::from_millis(1)),
            Ok(Some(1))
        );
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        loop {
            match store.acquire_lease("z", "b", long) {
                Ok(Some(token)) => {
                    assert_eq!(token, 2);
                    break;
                }
                Ok(None) => assert!(std::time::Instant::now() < deadline, "never expired"),
                Err(e) => panic!("{e}"),
            }
        }
    }

    #[test]
    fn migrations_are_applied_once_and_a_newer_schema_is_refused() {
        let (store, config) = fresh();
        assert_eq!(store.schema_version(), Ok(SCHEMA_VERSION));
        // A second daemon on the same database finds nothing to do.
        let again = PostgresStore::connect(options(config.clone()), "other").expect("reconnect");
        assert_eq!(again.schema_version(), Ok(SCHEMA_VERSION));
        store
            .txn(|t| {
                Box::pin(async move {
                    t.execute("INSERT INTO tokenvault_schema (version) VALUES (99)", &[])
                        .await?;
                    Ok(())
                })
            })
            .expect("simulate a newer build's migration");
        let err = PostgresStore::connect(options(config), "other").expect_err("newer schema");
        assert_eq!(
            err,
            StoreError::SchemaTooNew {
                found: 99,
                supported: SCHEMA_VERSION
            }
        );
    }
}
