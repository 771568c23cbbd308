//! The tamper-evident audit trail: who did what to which record, and with what outcome.
//!
//! Owns: [`Auditor`] (appends events to the store's hash chain), the audit HMAC key, the event
//! encoding and [`verify_chain`]. Record ids and owners appear only as HMAC-SHA256 under a
//! dedicated audit key (`key_dir/audit.key`, 0600), so the trail holds no personal
//! identifiers; the daemon computes the HMAC of a known id to search (`Admin.AuditLog`).
//!
//! Each event carries the hash of the previous one:
//!
//! ```text
//! hash = SHA-256("tokenvault/v1/audit" ‖ protobuf(event with hash = empty))
//! ```
//!
//! where the event includes `seq` and `prev_hash` (32 zero bytes for event 1). Changing,
//! removing or reordering any stored event breaks the chain at that point.
//!
//! Fail closed: callers append the event before disclosing a secret, or in the same atomic
//! store batch as the change it records; if it cannot be written the action does not happen.
//! Must never: put a secret, a plaintext record id or owner into an event.

use std::io::Write as _;
use std::os::unix::fs::{OpenOptionsExt as _, PermissionsExt as _};
use std::path::Path;
use std::sync::{Arc, Mutex};

use prost::Message;
use rand::RngCore;
use thiserror::Error;
use zeroize::Zeroizing;

use crate::store::{AuditAppend, StoreError, TokenStore};

/// File name of the audit HMAC key inside the key directory.
pub const AUDIT_KEY_FILE: &str = "audit.key";
pub mod sink;

const HASH_DOMAIN: &[u8] = b"tokenvault/v1/audit";

/// One stored audit event (protobuf, private to the trail; exported raw by `Admin.AuditLog`).
#[derive(Clone, PartialEq, Message)]
pub struct Event {
    /// Position in the chain, from 1.
    #[prost(uint64, tag = "1")]
    pub seq: u64,
    /// Unix time in milliseconds.
    #[prost(int64, tag = "2")]
    pub time_ms: i64,
    /// Caller name (credential name from the config), or `-` if unauthenticated.
    #[prost(string, tag = "3")]
    pub caller: String,
    /// What was attempted, e.g. `GetToken`, `Revoke`, `RotateKey`, `auth`.
    #[prost(string, tag = "4")]
    pub action: String,
    /// HMAC-SHA256 (hex) of the record id, if the action named one.
    #[prost(string, tag = "5")]
    pub record_hmac: String,
    /// HMAC-SHA256 (hex) of the owner, if the action named one.
    #[prost(string, tag = "6")]
    pub owner_hmac: String,
    /// `ok`, or the gRPC code name of the refusal.
    #[prost(string, tag = "7")]
    pub outcome: String,
    /// Non-secret detail (key version, counts).
    #[prost(string, tag = "8")]
    pub detail: String,
    /// Hash of the previous event.
    #[prost(bytes = "vec", tag = "9")]
    pub prev_hash: Vec<u8>,
    /// Hash of this event.
    #[prost(bytes = "vec", tag = "10")]
    pub hash: Vec<u8>,
}

impl Event {
    /// Decodes a stored event; one that does not decode (tampered) comes back with only its
    /// sequence number, for the verifier to report from its raw bytes.
    pub fn from_stored(seq: u64, raw: &[u8]) -> Self {
        Event::decode(raw).unwrap_or(Event {
            seq,
            ..Default::default()
        })
    }
}

#[cfg(test)]
fn event_hash(event: &Event) -> [u8; 32] {
    let unhashed = Event {
        hash: Vec::new(),
        ..event.clone()
    };
    domain_hash(&unhashed.encode_to_vec())
}

/// SHA-256 of [`HASH_DOMAIN`] followed by `bytes`: an event's chain hash. On aws-lc, so a FIPS
/// build hashes the chain on its validated module.
fn domain_hash(bytes: &[u8]) -> [u8; 32] {
    let mut h = aws_lc_rs::digest::Context::new(&aws_lc_rs::digest::SHA256);
    h.update(HASH_DOMAIN);
    h.update(bytes);
    let mut out = [0u8; 32];
    out.copy_from_slice(h.finish().as_ref());
    out
}

/// Why the audit trail could not be written or read.
#[derive(Debug, Error)]
#[non_exhaustive]
pub enum AuditError {
    /// The store refused the event.
    #[error("audit trail unavailable: {0}")]
    Store(#[from] StoreError),
    /// The audit key file could not be read or created.
    #[error("audit key {path}: {message}")]
    Key {
        /// File.
        path: String,
        /// What went wrong.
        message: String,
    },
}

/// Where a chain check failed.
#[derive(Debug, Error, Clone, PartialEq, Eq)]
#[error("audit chain broken at event {seq}: {reason}")]
pub struct ChainError {
    /// Sequence number of the first bad event.
    pub seq: u64,
    /// What is wrong with it.
    pub reason: String,
}

/// Checks a run of raw events starting at event 1: consecutive sequence numbers, each hash
/// correct, each linked to its predecessor. Returns the number of events checked.
pub fn verify_chain(events: impl IntoIterator<Item = (u64, Vec<u8>)>) -> Result<u64, ChainError> {
    let mut v = ChainVerifier::new(None);
    for (seq, raw) in events {
        v.push(seq, &raw)?;
    }
    v.finish()
}

/// Where a pruned chain starts: the sequence number and hash of the last event removed by
/// retention ([`Auditor::prune`]). The first kept event links to this hash, and an `AuditPruned`
/// event later in the chain names it, so the checkpoint cannot be moved without breaking the
/// chain.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Checkpoint {
    /// Sequence number of the last pruned event.
    pub seq: u64,
    /// Its hash.
    pub hash: [u8; 32],
}

impl Checkpoint {
    /// The `detail` of the `AuditPruned` event that records this checkpoint.
    pub fn detail(&self) -> String {
        format!(
            "pruned through event {} (hash {})",
            self.seq,
            hex::encode(self.hash)
        )
    }

    /// Stored form (meta `audit_checkpoint/<chain>`): seq big-endian, then the hash.
    pub fn to_bytes(&self) -> Vec<u8> {
        [&self.seq.to_be_bytes()[..], &self.hash[..]].concat()
    }

    /// Parses the stored form.
    pub fn from_bytes(bytes: &[u8]) -> Option<Self> {
        let (seq, hash) = (bytes.get(..8)?, bytes.get(8..)?);
        Some(Self {
            seq: u64::from_be_bytes(seq.try_into().ok()?),
            hash: hash.try_into().ok()?,
        })
    }
}

/// Checks one chain event by event, in constant memory: what `admin audit verify` runs over
/// a stream of any length.
#[derive(Debug)]
pub struct ChainVerifier {
    prev: [u8; 32],
    expected_seq: u64,
    checkpoint: Option<Checkpoint>,
    /// Whether an `AuditPruned` event naming `checkpoint` was seen.
    checkpoint_named: bool,
    checked: u64,
}

impl ChainVerifier {
    /// A verifier for a chain that starts at event 1, or just after `checkpoint` if pruned.
    pub fn new(checkpoint: Option<Checkpoint>) -> Self {
        let (prev, expected_seq) = checkpoint.map_or(([0u8; 32], 1), |c| (c.hash, c.seq + 1));
        Self {
            prev,
            expected_seq,
            checkpoint,
            checkpoint_named: false,
            checked: 0,
        }
    }

    /// Checks the next event.
    pub fn push(&mut self, seq: u64, raw: &[u8]) -> Result<(), ChainError> {
        let fail = |reason: &str| ChainError {
            seq,
            reason: reason.to_string(),
        };
        if seq != self.expected_seq {
            return Err(ChainError {
                seq: self.expected_seq,
                reason: format!("missing; next stored event is {seq}"),
            });
        }
        let event = Event::decode(raw).map_err(|_| fail("undecodable (altered)"))?;
        if event.seq != seq {
            return Err(fail("sequence number altered"));
        }
        if event.prev_hash != self.prev {
            return Err(fail(
                "does not link to the previous event (altered, removed or reordered)",
            ));
        }
        // The hash covers the stored bytes, not a re-encoding of what they decode to: an
        // unknown field added to an event decodes to the same fields but fails here.
        let Some(hashed) = raw
            .strip_suffix(event.hash.as_slice())
            .and_then(|r| r.strip_suffix(&[HASH_FIELD_KEY, 32]))
            .filter(|_| event.hash.len() == 32)
        else {
            return Err(fail("hash mismatch (altered)"));
        };
        if event.hash.as_slice() != domain_hash(hashed).as_slice() {
            return Err(fail("hash mismatch (altered)"));
        }
        if let Some(c) = &self.checkpoint
            && event.action == PRUNED_ACTION
            && event.detail == c.detail()
        {
            self.checkpoint_named = true;
        }
        self.prev.copy_from_slice(&event.hash);
        self.expected_seq += 1;
        self.checked += 1;
        Ok(())
    }

    /// Events checked so far.
    pub fn checked(&self) -> u64 {
        self.checked
    }

    /// Ends the check: the number of events checked. A pruned chain must hold the
    /// `AuditPruned` event that names its checkpoint.
    pub fn finish(self) -> Result<u64, ChainError> {
        if let Some(c) = self.checkpoint
            && !self.checkpoint_named
        {
            return Err(ChainError {
                seq: c.seq + 1,
                reason: format!(
                    "the chain starts after a checkpoint at event {} that no {PRUNED_ACTION} event in the chain names (events removed or checkpoint altered)",
                    c.seq
                ),
            });
        }
        Ok(self.checked)
    }
}

/// Action of the event that records a retention pruning.
pub const PRUNED_ACTION: &str = "AuditPruned";

/// An event to append, before it is placed in the chain.
#[derive(Debug, Clone, Default)]
pub struct Draft {
    caller: String,
    action: String,
    record: Option<String>,
    owner: Option<String>,
    outcome: String,
    detail: String,
}

impl Draft {
    /// An event of `caller` doing `action`, outcome `ok`.
    pub fn new(caller: &str, action: &str) -> Self {
        Self {
            caller: caller.into(),
            action: action.into(),
            outcome: "ok".into(),
            ..Self::default()
        }
    }

    /// The record concerned (stored only as its HMAC).
    pub fn record(mut self, id: &str) -> Self {
        self.record = Some(id.into());
        self
    }

    /// The owner concerned (stored only as its HMAC).
    pub fn owner(mut self, owner: &str) -> Self {
        self.owner = Some(owner.into());
        self
    }

    /// The outcome (`ok` or a status code name).
    pub fn outcome(mut self, outcome: impl Into<String>) -> Self {
        self.outcome = outcome.into();
        self
    }

    /// Non-secret detail.
    pub fn detail(mut self, detail: impl Into<String>) -> Self {
        self.detail = detail.into();
        self
    }
}

#[derive(Clone, Copy)]
struct Head {
    next_seq: u64,
    last_hash: [u8; 32],
}

/// An event of a read waiting for the next group write, and where its caller learns the
/// outcome (told once, by whoever writes the group).
struct Pending {
    draft: Draft,
    waiter: Waiter,
}

/// How a read's caller waits: a thread (on the store pool, woken through `Auditor::written`),
/// or a task (the executor's; woken by its channel, the group written by the [`ReadFlusher`]).
enum Waiter {
    Thread(Arc<std::sync::OnceLock<Result<(), String>>>),
    Task(Option<tokio::sync::oneshot::Sender<Result<(), String>>>),
}

impl Pending {
    fn tell(&mut self, outcome: Result<(), String>) {
        match &mut self.waiter {
            Waiter::Thread(told) => {
                let _ = told.set(outcome);
            }
            Waiter::Task(reply) => {
                if let Some(reply) = reply.take() {
                    let _ = reply.send(outcome);
                }
            }
        }
    }
}

impl Drop for Pending {
    /// A pending event dropped without an outcome (the write carrying it panicked) refuses its
    /// caller instead of leaving it waiting.
    fn drop(&mut self) {
        self.tell(Err(
            "the write carrying this audit event did not finish; the call was refused".into(),
        ));
    }
}

/// How long a read waits for a wake-up before it looks again (a safety net: every write that
/// ends wakes the waiters).
const RECHECK: std::time::Duration = std::time::Duration::from_millis(50);

/// The chain's position and the events of reads waiting to be written.
struct Chain {
    /// Just after the last written event: where the next event is sealed. It only moves
    /// once a write has succeeded, so a failed write never leaves a gap.
    head: Head,
    /// Events of reads waiting for the next group write, in arrival order. They are sealed
    /// by the writer of their group, against the head as it is then.
    queue: Vec<Pending>,
    /// A write failed, and a failed write may have committed all the same (a database
    /// connection lost during COMMIT, a primary killed after its standby applied the commit):
    /// the next writer reads the head back from the store before sealing.
    unsure: bool,
    /// The [`ReadFlusher`]'s thread waits on `Auditor::work` for events to write.
    flusher_idle: bool,
    /// The [`ReadFlusher`] is stopping: its thread writes what is queued and ends.
    closing: bool,
}

/// Appends events to the store's audit chain.
///
/// Events of reads (`append(.., false)`, one per `GetToken`) are written in groups: each caller
/// queues its event under a short lock, then either writes every queued event with one store
/// call (when no write is in progress) or waits to be told its event was written by someone
/// else's, so a store with a round trip per write (PostgreSQL) is not limited to one event per
/// round trip. A change (`append_with` and friends) first writes the queued events, then its
/// own, in order, so the stored chain never has a gap.
///
/// No lock is held across a store write except `writer`, which is the chain's order itself
/// (one write at a time, each sealed after the last written event). The `chain` lock covers
/// only the queue and the head: callers keep queueing while a write is in flight, and a read
/// returns as soon as a group holding its event is written, whoever wrote it.
pub struct Auditor {
    store: Arc<dyn TokenStore>,
    key: Arc<MacKey>,
    chain: Mutex<Chain>,
    /// Held by whoever writes to the store: one group or one change at a time, in chain order.
    writer: Mutex<()>,
    /// Notified (under `chain`) whenever a write ends and `writer` is free again.
    written: std::sync::Condvar,
    /// Wakes the [`ReadFlusher`]'s thread (under `chain`) when events wait and it is idle.
    work: std::sync::Condvar,
}

impl std::fmt::Debug for Auditor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Auditor").finish_non_exhaustive()
    }
}

/// Store metadata key of the shared audit HMAC key (encrypted; see [`shared_key`]).
const SHARED_KEY_META: &str = "audit_hmac_key";
const SHARED_KEY_AAD: &[u8] = b"tokenvault/v1/audit-hmac-key";

/// A key-encryption key from the passphrase: scrypt (N = 2^15, r = 8, p = 1; the cost of the
/// key files' PBES2), so a copy of the database gives no cheap guesses at it.
fn passphrase_kek(
    passphrase: &crate::secret::Passphrase,
    salt: &[u8],
) -> Result<Zeroizing<[u8; 32]>, AuditError> {
    let mut kek = Zeroizing::new([0u8; 32]);
    let params = scrypt::Params::new(15, 8, 1, 32).map_err(|e| AuditError::Key {
        path: SHARED_KEY_META.into(),
        message: e.to_string(),
    })?;
    scrypt::scrypt(
        passphrase.expose_secret().as_bytes(),
        salt,
        &params,
        &mut kek[..],
    )
    .map_err(|e| AuditError::Key {
        path: SHARED_KEY_META.into(),
        message: e.to_string(),
    })?;
    Ok(kek)
}

/// The audit HMAC key of a shared store: read and decrypted, or created (salt 16 bytes, nonce
/// 12, AES-256-GCM) by the first daemon, atomically so two starting together agree; created as
/// `proposed` when given (a key directory's key moved in), otherwise random. Also says whether
/// this call created it.
fn shared_key(
    store: &dyn TokenStore,
    passphrase: &crate::secret::Passphrase,
    proposed: Option<&[u8; 32]>,
) -> Result<(Zeroizing<[u8; 32]>, bool), AuditError> {
    use aes_gcm::aead::{Aead as _, KeyInit as _, Payload};
    let err = |message: &str| AuditError::Key {
        path: format!("{SHARED_KEY_META} (in the store)"),
        message: message.to_string(),
    };
    for _ in 0..2 {
        if let Some(blob) = store.get_meta(SHARED_KEY_META)? {
            return Ok((open_shared_key(&blob, passphrase)?, false));
        }
        let mut key = Zeroizing::new([0u8; 32]);
        match proposed {
            Some(k) => key.copy_from_slice(k),
            None => rand::rngs::OsRng.fill_bytes(&mut key[..]),
        }
        let mut salt = [0u8; 16];
        let mut nonce = [0u8; 12];
        rand::rngs::OsRng.fill_bytes(&mut salt);
        rand::rngs::OsRng.fill_bytes(&mut nonce);
        let kek = passphrase_kek(passphrase, &salt)?;
        let cipher =
            aes_gcm::Aes256Gcm::new_from_slice(&kek[..]).map_err(|_| err("bad key length"))?;
        let sealed = cipher
            .encrypt(
                aes_gcm::Nonce::from_slice(&nonce),
                Payload {
                    msg: &key[..],
                    aad: SHARED_KEY_AAD,
                },
            )
            .map_err(|_| err("could not be encrypted"))?;
        let blob = [&salt[..], &nonce[..], &sealed[..]].concat();
        if store.put_meta_if_absent(SHARED_KEY_META, &blob)? {
            tracing::info!("created the shared audit HMAC key");
            return Ok((key, true));
        }
        // Another daemon created it first: read that one.
    }
    Err(err("could not be created"))
}

/// The audit HMAC key in its stored (encrypted) form, opened with `passphrase`.
fn open_shared_key(
    blob: &[u8],
    passphrase: &crate::secret::Passphrase,
) -> Result<Zeroizing<[u8; 32]>, AuditError> {
    use aes_gcm::aead::{Aead as _, KeyInit as _, Payload};
    let err = |message: &str| AuditError::Key {
        path: format!("{SHARED_KEY_META} (in the store)"),
        message: message.to_string(),
    };
    if blob.len() != 16 + 12 + 32 + 16 {
        return Err(err("has the wrong length"));
    }
    let kek = passphrase_kek(passphrase, &blob[..16])?;
    let cipher = aes_gcm::Aes256Gcm::new_from_slice(&kek[..]).map_err(|_| err("bad key length"))?;
    let plain = Zeroizing::new(
        cipher
            .decrypt(
                aes_gcm::Nonce::from_slice(&blob[16..28]),
                Payload {
                    msg: &blob[28..],
                    aad: SHARED_KEY_AAD,
                },
            )
            .map_err(|_| {
                err("does not open with this passphrase (every daemon sharing the store needs the same one)")
            })?,
    );
    let mut key = Zeroizing::new([0u8; 32]);
    key.copy_from_slice(&plain[..]);
    Ok(key)
}

/// A shared store's audit HMAC key, opened with `passphrase`, if the store has one yet; writes
/// nothing: what a daemon checks before it claims anything in the store (and then opens its
/// trail with, [`Auditor::open_shared_with`], so the passphrase's scrypt runs once per start).
pub struct SharedAuditKey(Option<Zeroizing<[u8; 32]>>);

impl std::fmt::Debug for SharedAuditKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SharedAuditKey").finish_non_exhaustive()
    }
}

/// Checks, writing nothing, that `passphrase` opens a shared store's audit HMAC key, if the
/// store has one yet.
pub fn check_shared_key(
    store: &dyn TokenStore,
    passphrase: &crate::secret::Passphrase,
) -> Result<SharedAuditKey, AuditError> {
    match store.get_meta(SHARED_KEY_META)? {
        Some(blob) => open_shared_key(&blob, passphrase).map(|k| SharedAuditKey(Some(k))),
        None => Ok(SharedAuditKey(None)),
    }
}

/// Moves `key_dir`'s audit HMAC key into a shared store, encrypted with `passphrase`, so the
/// daemons on it write and search the same HMACs as the trail copied from that directory's
/// daemon (`tokenvault keys share`). Whether it was stored: false if the store already had this
/// very key; an error if it has another one, or the directory has none.
pub fn share_key_file(
    store: &dyn TokenStore,
    passphrase: &crate::secret::Passphrase,
    key_dir: &Path,
) -> Result<bool, AuditError> {
    let path = key_dir.join(AUDIT_KEY_FILE);
    let key = read_key_file(&path)?.ok_or_else(|| AuditError::Key {
        path: path.display().to_string(),
        message: "does not exist".into(),
    })?;
    let (stored, created) = shared_key(store, passphrase, Some(&key))?;
    if !created && !bool::from(subtle::ConstantTimeEq::ct_eq(&stored[..], &key[..])) {
        return Err(AuditError::Key {
            path: format!("{SHARED_KEY_META} (in the store)"),
            message: format!(
                "differs from {}: the store's trail was written under another key",
                path.display()
            ),
        });
    }
    Ok(created)
}

/// Reads an audit key file (`None` if there is none), refusing one others can read.
fn read_key_file(path: &Path) -> Result<Option<Zeroizing<[u8; 32]>>, AuditError> {
    let err = |message: String| AuditError::Key {
        path: path.display().to_string(),
        message,
    };
    let mut key = Zeroizing::new([0u8; 32]);
    match std::fs::read(path) {
        Ok(bytes) => {
            let bytes = Zeroizing::new(bytes);
            let mode = std::fs::metadata(path)
                .map_err(|e| err(e.to_string()))?
                .permissions()
                .mode();
            if mode & 0o077 != 0 {
                return Err(err(format!(
                    "readable by group or others (mode {:o}); chmod 600 it",
                    mode & 0o777
                )));
            }
            if bytes.len() != 32 {
                return Err(err("must hold exactly 32 bytes".into()));
            }
            key.copy_from_slice(&bytes);
            Ok(Some(key))
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(err(e.to_string())),
    }
}

fn load_or_create_key(dir: &Path) -> Result<Zeroizing<[u8; 32]>, AuditError> {
    let path = dir.join(AUDIT_KEY_FILE);
    let err = |message: String| AuditError::Key {
        path: path.display().to_string(),
        message,
    };
    if let Some(key) = read_key_file(&path)? {
        return Ok(key);
    }
    let mut key = Zeroizing::new([0u8; 32]);
    rand::rngs::OsRng.fill_bytes(&mut key[..]);
    write_key_file(&path, &key).map_err(err)?;
    tracing::info!(path = %path.display(), "created audit HMAC key");
    Ok(key)
}

/// Creates an audit key file, 0600, synced; refuses to replace an existing one.
fn write_key_file(path: &Path, key: &[u8; 32]) -> Result<(), String> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(|e| e.to_string())?;
    }
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .map_err(|e| e.to_string())?;
    f.write_all(&key[..])
        .and_then(|()| f.sync_all())
        .map_err(|e| e.to_string())
}

/// Writes a shared store's audit HMAC key, opened with `passphrase`, to `key_dir` as its
/// audit key file (0600): the inverse of [`share_key_file`], so a RocksDB daemon serving a copy
/// of the database writes and searches the same HMACs as the trail it copied. Whether it was
/// written: false if the file already holds this very key; an error if it holds another one,
/// or the store has none.
pub fn export_key_file(
    store: &dyn TokenStore,
    passphrase: &crate::secret::Passphrase,
    key_dir: &Path,
) -> Result<bool, AuditError> {
    let blob = store
        .get_meta(SHARED_KEY_META)?
        .ok_or_else(|| AuditError::Key {
            path: format!("{SHARED_KEY_META} (in the store)"),
            message: "does not exist: the store has no shared audit trail".into(),
        })?;
    let key = open_shared_key(&blob, passphrase)?;
    let path = key_dir.join(AUDIT_KEY_FILE);
    match read_key_file(&path)? {
        Some(existing) if bool::from(subtle::ConstantTimeEq::ct_eq(&existing[..], &key[..])) => {
            Ok(false)
        }
        Some(_) => Err(AuditError::Key {
            path: path.display().to_string(),
            message: "holds another audit key; not overwritten".into(),
        }),
        None => {
            write_key_file(&path, &key).map_err(|message| AuditError::Key {
                path: path.display().to_string(),
                message,
            })?;
            Ok(true)
        }
    }
}

impl Auditor {
    /// Opens the trail in `store`, with the HMAC key from `key_dir` (created on first use).
    pub fn open(store: Arc<dyn TokenStore>, key_dir: &Path) -> Result<Self, AuditError> {
        let key = load_or_create_key(key_dir)?;
        Self::with_key(store, key)
    }

    /// Opens the trail of daemons sharing one store: the HMAC key is in the store, encrypted
    /// with `passphrase`, so every daemon writes the same HMAC for the same record id and an
    /// audit query by record id finds its events whichever daemon served it. The first daemon
    /// creates it; a wrong passphrase fails closed.
    pub fn open_shared(
        store: Arc<dyn TokenStore>,
        passphrase: &crate::secret::Passphrase,
    ) -> Result<Self, AuditError> {
        let (key, _) = shared_key(&*store, passphrase, None)?;
        Self::with_key(store, key)
    }

    /// [`Auditor::open_shared`] with the key [`check_shared_key`] opened already (created now if
    /// the store had none then).
    pub fn open_shared_with(
        store: Arc<dyn TokenStore>,
        checked: SharedAuditKey,
        passphrase: &crate::secret::Passphrase,
    ) -> Result<Self, AuditError> {
        match checked.0 {
            Some(key) => Self::with_key(store, key),
            None => Self::open_shared(store, passphrase),
        }
    }

    fn with_key(store: Arc<dyn TokenStore>, key: Zeroizing<[u8; 32]>) -> Result<Self, AuditError> {
        let head = stored_head(store.as_ref())?;
        Ok(Self {
            store,
            key: Arc::new(mac_key(&key)),
            chain: Mutex::new(Chain {
                head,
                queue: Vec::new(),
                unsure: false,
                flusher_idle: false,
                closing: false,
            }),
            writer: Mutex::new(()),
            written: std::sync::Condvar::new(),
            work: std::sync::Condvar::new(),
        })
    }

    /// HMAC-SHA256 (hex) of `value` under the audit key: how ids and owners appear in events.
    pub fn hmac(&self, value: &str) -> String {
        hmac_hex(&self.key, value)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Chain> {
        self.chain
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn writer(&self) -> std::sync::MutexGuard<'_, ()> {
        self.writer
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// The chain lock again, with the head read back from the store if the last write failed
    /// (see [`Chain::unsure`]). The caller holds the writer lock, so nothing else moves the
    /// chain meanwhile. If the store cannot be read either, the head stays: a write sealed
    /// from it is refused by the store if the failed one did commit (its sequence number is
    /// taken), so the chain never forks, and the next writer tries again.
    fn settled<'a>(
        &'a self,
        chain: std::sync::MutexGuard<'a, Chain>,
    ) -> std::sync::MutexGuard<'a, Chain> {
        if !chain.unsure {
            return chain;
        }
        drop(chain);
        let stored = stored_head(self.store.as_ref());
        let mut chain = self.lock();
        if let Ok(head) = stored {
            chain.head = head;
            chain.unsure = false;
        }
        chain
    }

    /// Writes the queued events of reads as one group, sealed from the head. The caller holds
    /// the writer lock and passes the chain lock, which is released during the store write and
    /// returned. Each queued caller is told the outcome; on a failure their events are dropped
    /// (they are refused) and the head stays, so the chain has no gap.
    fn flush<'a>(
        &'a self,
        chain: std::sync::MutexGuard<'a, Chain>,
    ) -> (std::sync::MutexGuard<'a, Chain>, Result<(), StoreError>) {
        if chain.queue.is_empty() {
            return (chain, Ok(()));
        }
        let mut chain = self.settled(chain);
        let batch = std::mem::take(&mut chain.queue);
        let start = chain.head;
        drop(chain);
        let (appends, next) = seal_run(&self.key, start, batch.iter().map(|p| &p.draft));
        let written = self.store.append_audit_batch(&appends, false);
        let mut chain = self.lock();
        match written {
            Ok(()) => chain.head = next,
            Err(_) => chain.unsure = true,
        }
        let outcome = written.as_ref().map(|_| ()).map_err(|e| {
            format!("a group write of audit events failed ({e}); the call was refused")
        });
        for mut pending in batch {
            pending.tell(outcome.clone());
        }
        (chain, written)
    }

    /// Gives up the writer lock and wakes every caller waiting for a write to end (under the
    /// chain lock, so none can miss it between checking and waiting), and the
    /// [`ReadFlusher`]'s thread if events are left for it.
    fn release(&self, writer: std::sync::MutexGuard<'_, ()>, chain: &mut Chain) {
        drop(writer);
        self.written.notify_all();
        self.wake_flusher(chain);
    }

    /// Wakes the [`ReadFlusher`]'s thread if it sleeps while events wait: one wake-up per
    /// sleep, not per event (a wake-up is a system call).
    fn wake_flusher(&self, chain: &mut Chain) {
        if chain.flusher_idle && !chain.queue.is_empty() {
            chain.flusher_idle = false;
            self.work.notify_one();
        }
    }

    /// The [`ReadFlusher`]'s thread: writes the queued events of reads as groups, one group
    /// while the next one queues, until it is stopped with nothing left to write.
    fn flush_reads(&self) {
        let mut chain = self.lock();
        loop {
            if chain.queue.is_empty() {
                if chain.closing {
                    return;
                }
                chain.flusher_idle = true;
                chain = self
                    .work
                    .wait(chain)
                    .unwrap_or_else(std::sync::PoisonError::into_inner);
                chain.flusher_idle = false;
                continue;
            }
            drop(chain);
            // A store that panics refuses the group it was writing (`Pending`'s drop); the
            // thread goes on, or every later read would wait forever.
            let flushed = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                let writer = self.writer();
                let (mut after, _) = self.flush(self.lock());
                self.release(writer, &mut after);
            }));
            if flushed.is_err() {
                tracing::error!("a group write of audit events panicked; its reads were refused");
            }
            chain = self.lock();
        }
    }

    /// Appends `draft` on its own. `sync` forces it to disk first (mutations, refusals); events
    /// of reads are written without fsync (they survive a process crash), in groups.
    pub fn append(&self, draft: &Draft, sync: bool) -> Result<(), AuditError> {
        if sync {
            return self.append_with(draft, |a| {
                self.store.append_audit(a, true)?;
                Ok::<_, AuditError>(((), true))
            });
        }
        let outcome = Arc::new(std::sync::OnceLock::new());
        let mut chain = self.lock();
        chain.queue.push(Pending {
            draft: draft.clone(),
            waiter: Waiter::Thread(Arc::clone(&outcome)),
        });
        loop {
            if let Some(done) = outcome.get() {
                return done.clone().map_err(|m| StoreError::Unavailable(m).into());
            }
            // Nobody is writing: write the queue (this event included) now.
            let writer = match self.writer.try_lock() {
                Ok(w) => w,
                Err(std::sync::TryLockError::Poisoned(p)) => p.into_inner(),
                Err(std::sync::TryLockError::WouldBlock) => {
                    chain = self
                        .written
                        .wait_timeout(chain, RECHECK)
                        .unwrap_or_else(std::sync::PoisonError::into_inner)
                        .0;
                    continue;
                }
            };
            let (after, _) = self.flush(chain);
            chain = after;
            self.release(writer, &mut chain);
        }
    }

    /// Like [`Auditor::append_with`] for several events at once: `write` gets them sealed as
    /// consecutive links of the chain and must store all of them in its one atomic batch.
    pub fn append_all_with<T, E>(
        &self,
        drafts: &[Draft],
        write: impl FnOnce(&[AuditAppend]) -> Result<(T, bool), E>,
    ) -> Result<T, E> {
        let writer = self.writer();
        // Queued events of reads go first; if they cannot be written they are dropped (their
        // callers are refused) and this change is sealed after the last written event.
        let (chain, _) = self.flush(self.lock());
        let chain = self.settled(chain);
        let start = chain.head;
        drop(chain);
        let (appends, next) = seal_run(&self.key, start, drafts.iter());
        // Written without the chain lock: reads keep queueing meanwhile.
        let result = write(&appends);
        let mut chain = self.lock();
        match &result {
            Ok((_, true)) => chain.head = next,
            Ok((_, false)) => {}
            Err(_) => chain.unsure = true,
        }
        self.release(writer, &mut chain);
        result.map(|(value, _)| value)
    }

    /// Runs `write`, which must store the sealed event in the same atomic batch as its change
    /// and report whether it did. The chain advances only if it did; events are serialized.
    pub fn append_with<T, E>(
        &self,
        draft: &Draft,
        write: impl FnOnce(&AuditAppend) -> Result<(T, bool), E>,
    ) -> Result<T, E> {
        self.append_all_with(std::slice::from_ref(draft), |appends| match appends {
            [one] => write(one),
            // One draft gives one event.
            _ => unreachable!("one draft, one event"),
        })
    }

    /// Runs `write`, which decides its events itself: it seals them with the [`ChainSealer`]
    /// it is given and must store them in its one atomic write. The chain moves past them only
    /// if `write` succeeds; events are serialized as with [`Auditor::append_all_with`].
    pub fn append_decided<T, E>(
        &self,
        write: impl FnOnce(Arc<ChainSealer>) -> Result<T, E>,
    ) -> Result<T, E> {
        let writer = self.writer();
        // Queued events of reads go first, in this change's own atomic write (one write, not
        // a group of reads and then the change).
        let mut chain = self.settled(self.lock());
        let reads = std::mem::take(&mut chain.queue);
        let sealer = Arc::new(ChainSealer {
            key: Arc::clone(&self.key),
            start: chain.head,
            reads: reads.iter().map(|p| p.draft.clone()).collect(),
            end: Mutex::new(None),
        });
        drop(chain);
        let result = write(Arc::clone(&sealer));
        let sealed = *sealer
            .end
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let mut chain = self.lock();
        match (&result, sealed) {
            (Ok(_), Some(end)) => {
                chain.head = end;
                for mut pending in reads {
                    pending.tell(Ok(()));
                }
            }
            // Nothing was sealed (the write accepted nothing) or it failed: the reads wait
            // for the next write, first in line.
            _ => {
                chain.unsure |= result.is_err();
                let later = std::mem::replace(&mut chain.queue, reads);
                chain.queue.extend(later);
            }
        }
        self.release(writer, &mut chain);
        result
    }
}

/// Writes the events of reads whose callers wait as tasks, on a thread of its own.
///
/// A read's caller on the executor queues its event and awaits the group write that holds it,
/// instead of holding a store-pool thread for the write (a round trip and, on PostgreSQL, a
/// commit): the thread writes each group while the next one queues, and a change's write takes
/// the queued events first, as for reads waiting on threads. The queue holds one event per
/// call in flight, so it is bounded by what bounds those (`[limits]` and the listeners').
///
/// Dropping it stops the thread once it has written what is queued.
pub struct ReadFlusher {
    audit: Arc<Auditor>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl std::fmt::Debug for ReadFlusher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ReadFlusher").finish_non_exhaustive()
    }
}

impl ReadFlusher {
    /// Starts the thread that writes `audit`'s queued reads.
    pub fn start(audit: Arc<Auditor>) -> std::io::Result<Self> {
        let writes = Arc::clone(&audit);
        let thread = std::thread::Builder::new()
            .name("tokenvault-audit".into())
            .spawn(move || writes.flush_reads())?;
        Ok(Self {
            audit,
            thread: Some(thread),
        })
    }

    /// Queues the event of a read (as `Auditor::append(draft, false)` does) and resolves once
    /// a write holding it succeeded, or with the error that refused it. Only a short lock is
    /// taken here, never across I/O: it may be called on the executor.
    pub fn append(
        &self,
        draft: Draft,
    ) -> impl Future<Output = Result<(), AuditError>> + Send + 'static {
        let (reply, answer) = tokio::sync::oneshot::channel();
        {
            let mut chain = self.audit.lock();
            chain.queue.push(Pending {
                draft,
                waiter: Waiter::Task(Some(reply)),
            });
            self.audit.wake_flusher(&mut chain);
        }
        async move {
            match answer.await {
                Ok(outcome) => outcome.map_err(|m| StoreError::Unavailable(m).into()),
                // Unreachable: a dropped `Pending` tells its waiter first.
                Err(_) => Err(StoreError::Unavailable(
                    "the audit writer stopped; the call was refused".into(),
                )
                .into()),
            }
        }
    }
}

impl Drop for ReadFlusher {
    fn drop(&mut self) {
        {
            let mut chain = self.audit.lock();
            chain.closing = true;
            self.audit.work.notify_one();
        }
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// Where the next event of the store's chain goes: after its last stored event.
fn stored_head(store: &dyn TokenStore) -> Result<Head, StoreError> {
    Ok(match store.last_audit_event()? {
        None => Head {
            next_seq: 1,
            last_hash: [0; 32],
        },
        Some((seq, raw)) => {
            let last = Event::decode(raw.as_slice())
                .map_err(|_| StoreError::Corrupt(format!("audit event {seq} does not decode")))?;
            let mut last_hash = [0u8; 32];
            if last.hash.len() == 32 {
                last_hash.copy_from_slice(&last.hash);
            }
            Head {
                next_seq: seq + 1,
                last_hash,
            }
        }
    })
}

/// The audit HMAC key with its pads computed once. `hmac::Key::new` runs the key schedule
/// (two SHA-256 blocks) that each event's HMAC of its record id would otherwise repeat: in a
/// profile of a PostgreSQL batch commit, sealing its events was a quarter of the store thread's
/// time, inside the commit's serial section, and the HMACs half of that. aws-lc cleanses the
/// context when it is dropped.
type MacKey = aws_lc_rs::hmac::Key;

fn mac_key(key: &[u8; 32]) -> MacKey {
    aws_lc_rs::hmac::Key::new(aws_lc_rs::hmac::HMAC_SHA256, key)
}

/// HMAC-SHA256 (lowercase hex) of `value` under `key`, on aws-lc (the FIPS module in a FIPS
/// build). The hex is written directly: `hex::encode` builds the string a `char` at a time.
fn hmac_hex(key: &MacKey, value: &str) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let tag = aws_lc_rs::hmac::sign(key, value.as_bytes());
    let mut out = String::with_capacity(2 * tag.as_ref().len());
    for b in tag.as_ref() {
        out.push(char::from(DIGITS[usize::from(b >> 4)]));
        out.push(char::from(DIGITS[usize::from(b & 15)]));
    }
    out
}

/// `draft` sealed as the event at `head` under `key`: its bytes and hash.
#[cfg(test)]
fn seal_event(key: &[u8; 32], head: &Head, draft: &Draft) -> (AuditAppend, [u8; 32]) {
    seal_event_with(&mac_key(key), head, draft, None)
}

/// [`seal_event`], with the HMAC of the draft's owner computed already.
fn seal_event_with(
    key: &MacKey,
    head: &Head,
    draft: &Draft,
    owner_hmac: Option<&str>,
) -> (AuditAppend, [u8; 32]) {
    let event = Event {
        seq: head.next_seq,
        time_ms: std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX)),
        caller: draft.caller.clone(),
        action: draft.action.clone(),
        record_hmac: draft
            .record
            .as_deref()
            .map(|r| hmac_hex(key, r))
            .unwrap_or_default(),
        owner_hmac: match (owner_hmac, draft.owner.as_deref()) {
            (Some(h), Some(_)) => h.to_string(),
            (_, Some(o)) => hmac_hex(key, o),
            (_, None) => String::new(),
        },
        outcome: draft.outcome.clone(),
        detail: draft.detail.clone(),
        prev_hash: head.last_hash.to_vec(),
        hash: Vec::new(),
    };
    // The hash covers the encoding without the hash field (proto3 leaves an empty field out),
    // and `hash` is the last field: the stored bytes are that encoding with the field appended,
    // exactly as prost would encode the whole event (tested), for one encoding instead of two.
    let mut bytes = event.encode_to_vec();
    let hash = domain_hash(&bytes);
    bytes.extend_from_slice(&[HASH_FIELD_KEY, 32]);
    bytes.extend_from_slice(&hash);
    (
        AuditAppend {
            seq: event.seq,
            bytes,
        },
        hash,
    )
}

/// `drafts` sealed as consecutive links from `start`: their events, and the head after them.
fn seal_run<'a>(
    key: &MacKey,
    start: Head,
    drafts: impl Iterator<Item = &'a Draft>,
) -> (Vec<AuditAppend>, Head) {
    let mut next = start;
    let mut appends = Vec::with_capacity(drafts.size_hint().0);
    // A batch usually stores many records of one owner: its HMAC is computed once.
    let mut owner: Option<(&str, String)> = None;
    for draft in drafts {
        let owner_hmac = match (draft.owner.as_deref(), &owner) {
            (Some(o), Some((last, h))) if *last == o => Some(h.clone()),
            (Some(o), _) => {
                let h = hmac_hex(key, o);
                owner = Some((o, h.clone()));
                Some(h)
            }
            (None, _) => None,
        };
        let (append, hash) = seal_event_with(key, &next, draft, owner_hmac.as_deref());
        appends.push(append);
        next = Head {
            next_seq: next.next_seq + 1,
            last_hash: hash,
        };
    }
    (appends, next)
}

/// The key byte of `Event.hash` (field 10, length-delimited): `10 << 3 | 2`.
const HASH_FIELD_KEY: u8 = 82;

/// Seals the events of a write that decides them itself, from the place in the chain that
/// [`Auditor::append_decided`] reserved: a group commit knows which requests it accepts (and
/// so which records get an event) only once the store has checked their versions. The events
/// of reads queued when the write began come first, so they are written with it.
pub struct ChainSealer {
    key: Arc<MacKey>,
    start: Head,
    /// Events of reads waiting for a write, sealed ahead of the write's own.
    reads: Vec<Draft>,
    /// Just after the last event of the last `seal` call, once there was one.
    end: Mutex<Option<Head>>,
}

impl std::fmt::Debug for ChainSealer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ChainSealer").finish_non_exhaustive()
    }
}

impl ChainSealer {
    /// The queued reads' events, then `drafts`, as consecutive links from the reserved place.
    /// Each call starts there again (a store that re-runs its transaction seals again); the
    /// chain moves past the last call's events once the write succeeds.
    pub fn seal(&self, drafts: &[Draft]) -> Vec<AuditAppend> {
        let (appends, next) = seal_run(&self.key, self.start, self.reads.iter().chain(drafts));
        *self
            .end
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = Some(next);
        appends
    }
}

/// Metadata key of a chain's retention checkpoint.
pub fn checkpoint_key(chain: &str) -> String {
    format!("audit_checkpoint/{chain}")
}

/// The retention checkpoint of `chain` in `store`, if retention has pruned it.
pub fn checkpoint(store: &dyn TokenStore, chain: &str) -> Result<Option<Checkpoint>, StoreError> {
    match store.get_meta(&checkpoint_key(chain))? {
        None => Ok(None),
        Some(bytes) => Checkpoint::from_bytes(&bytes).map(Some).ok_or_else(|| {
            StoreError::Corrupt(format!(
                "the audit checkpoint of chain {chain:?} does not decode"
            ))
        }),
    }
}

impl Auditor {
    /// Retention: removes this daemon's own events older than `cutoff_ms` (Unix ms), in chain
    /// order, none after `not_after` (the last event a sink has shipped, so retention never
    /// drops an event that was not shipped). The removal, the new checkpoint and an
    /// `AuditPruned` event naming it are one atomic write. Returns how many events went.
    pub fn prune(
        &self,
        caller: &str,
        cutoff_ms: i64,
        not_after: Option<u64>,
    ) -> Result<u64, AuditError> {
        let chain = self.store.own_chain();
        let previous = checkpoint(&*self.store, &chain)?;
        let first = previous.map_or(1, |c| c.seq + 1);
        let mut from = first;
        let mut last: Option<Checkpoint> = None;
        'scan: loop {
            let page = self.store.audit_events(from, 1024)?;
            let Some(&(end, _)) = page.last() else {
                break;
            };
            for (seq, raw) in &page {
                let event = Event::decode(raw.as_slice()).map_err(|_| {
                    StoreError::Corrupt(format!("audit event {seq} does not decode"))
                })?;
                if event.time_ms >= cutoff_ms || not_after.is_some_and(|n| *seq > n) {
                    break 'scan;
                }
                let mut hash = [0u8; 32];
                if event.hash.len() == 32 {
                    hash.copy_from_slice(&event.hash);
                }
                last = Some(Checkpoint { seq: *seq, hash });
            }
            from = end + 1;
        }
        let Some(cp) = last else {
            return Ok(0);
        };
        let draft = Draft::new(caller, PRUNED_ACTION).detail(cp.detail());
        self.append_with(&draft, |a| {
            self.store
                .prune_audit(cp.seq, &[(checkpoint_key(&chain), cp.to_bytes())], a)?;
            Ok::<_, AuditError>(((), true))
        })?;
        Ok(cp.seq + 1 - first)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::MemoryStore;
    use crate::store::prelude::*;

    #[test]
    fn concurrent_reads_are_written_in_groups_without_a_gap() {
        let (store, a, _dir) = auditor();
        let a = Arc::new(a);
        std::thread::scope(|s| {
            for t in 0..8 {
                let a = Arc::clone(&a);
                s.spawn(move || {
                    for i in 0..200 {
                        a.append(
                            &Draft::new(&format!("t{t}"), "GetToken").record(&i.to_string()),
                            false,
                        )
                        .expect("append");
                        if i % 50 == 0 {
                            // A change in between: written after every queued read.
                            a.append(&Draft::new("admin", "Revoke"), true)
                                .expect("append");
                        }
                    }
                });
            }
        });
        let events = store.audit_events(1, 10_000).expect("events");
        assert_eq!(events.len(), 8 * 200 + 8 * 4);
        assert_eq!(verify_chain(events), Ok(8 * 200 + 8 * 4));
    }

    /// A read queued while a group commit holds the write order: written inside the commit's
    /// own write when the commit seals, or by the next write when it seals nothing.
    #[test]
    fn reads_queued_during_a_group_commit_ride_in_it_or_the_next_write() {
        let (store, a, _dir) = auditor();
        let a = Arc::new(a);
        let queued = |a: &Auditor| {
            while a.lock().queue.is_empty() {
                std::thread::yield_now();
            }
        };
        for seals in [true, false] {
            let before = store.audit_events(1, 1000).expect("events").len();
            std::thread::scope(|s| {
                // A write is in flight when the read arrives: it queues and waits.
                let in_flight = a.writer();
                let reader = {
                    let a = Arc::clone(&a);
                    s.spawn(move || a.append(&Draft::new("worker", "GetToken").record("r"), false))
                };
                queued(&a);
                // Ends without waking anyone: the reader waits for the commit below.
                drop(in_flight);
                let writes = a
                    .append_decided(|sealer| {
                        if !seals {
                            // Accepted nothing: no event, no write.
                            return Ok::<_, StoreError>(0);
                        }
                        let appends = sealer.seal(&[Draft::new("web", "PutSealed").record("x")]);
                        store.append_audit_batch(&appends, true)?;
                        Ok(appends.len())
                    })
                    .expect("commit");
                reader.join().expect("reader").expect("the read is written");
                let events = store.audit_events(1, 1000).expect("events");
                if seals {
                    assert_eq!(
                        writes, 2,
                        "the queued read's event rides in the commit's write"
                    );
                    let last: Vec<Event> = events[before..]
                        .iter()
                        .map(|(_, raw)| Event::decode(raw.as_slice()).expect("decode"))
                        .collect();
                    assert_eq!(
                        last.iter().map(|e| e.action.as_str()).collect::<Vec<_>>(),
                        ["GetToken", "PutSealed"],
                        "the read first, then the change"
                    );
                } else {
                    assert_eq!(events.len(), before + 1, "the read, written on its own");
                }
            });
        }
        assert_eq!(verify_store(&store), Ok(3));
    }

    /// A bug that panics inside a group write must not leave the reads it carried waiting
    /// forever: they are refused, and the trail keeps working.
    #[test]
    fn a_read_whose_group_write_panics_is_refused_not_left_waiting() {
        let (store, a, _dir) = auditor();
        let a = Arc::new(a);
        std::thread::scope(|s| {
            let in_flight = a.writer();
            let reader = {
                let a = Arc::clone(&a);
                s.spawn(move || a.append(&Draft::new("worker", "GetToken"), false))
            };
            while a.lock().queue.is_empty() {
                std::thread::yield_now();
            }
            drop(in_flight);
            let commit = {
                let a = Arc::clone(&a);
                s.spawn(move || {
                    a.append_decided(|_sealer| -> Result<(), StoreError> {
                        panic!("a bug in the store")
                    })
                })
            };
            assert!(commit.join().is_err(), "the commit panicked");
            let refused = reader.join().expect("reader").expect_err("refused");
            assert!(refused.to_string().contains("did not finish"), "{refused}");
        });
        a.append(&Draft::new("worker", "GetToken"), false)
            .expect("the next read is written");
        assert_eq!(verify_store(&store), Ok(1));
    }

    /// Reads awaited on the executor are written by the flusher's thread, in order with the
    /// changes and the reads of store threads around them: every event is stored, once, and
    /// the chain has no gap.
    #[test]
    fn reads_awaited_as_tasks_are_written_without_a_gap_among_changes_and_thread_reads() {
        let (store, a, _dir) = auditor();
        let a = Arc::new(a);
        let flusher = Arc::new(ReadFlusher::start(Arc::clone(&a)).expect("start"));
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .build()
            .expect("runtime");
        rt.block_on(async {
            let mut tasks = tokio::task::JoinSet::new();
            for t in 0..8 {
                let flusher = Arc::clone(&flusher);
                tasks.spawn(async move {
                    for i in 0..100 {
                        flusher
                            .append(
                                Draft::new(&format!("task{t}"), "GetToken").record(&i.to_string()),
                            )
                            .await
                            .expect("written");
                    }
                });
            }
            for t in 0..2 {
                let a = Arc::clone(&a);
                tasks.spawn_blocking(move || {
                    for i in 0..100 {
                        a.append(&Draft::new(&format!("thread{t}"), "GetToken"), false)
                            .expect("written");
                        if i % 25 == 0 {
                            a.append(&Draft::new("admin", "Revoke"), true)
                                .expect("written");
                        }
                    }
                });
            }
            while let Some(done) = tasks.join_next().await {
                done.expect("task");
            }
        });
        let events = store.audit_events(1, 10_000).expect("events");
        assert_eq!(events.len(), 8 * 100 + 2 * 100 + 2 * 4);
        assert_eq!(verify_chain(events), Ok(8 * 100 + 2 * 100 + 2 * 4));
    }

    /// Reads that queue while a write holds the order wait in the queue, not in writes of
    /// their own, and are all written once it ends. Stopping the flusher meanwhile does not
    /// lose them: its thread writes what is queued before it ends, and each caller is told.
    #[test]
    fn stopping_the_flusher_writes_the_reads_queued_behind_a_write_first() {
        let (store, a, _dir) = auditor();
        let a = Arc::new(a);
        let flusher = ReadFlusher::start(Arc::clone(&a)).expect("start");
        let in_flight = a.writer();
        let answers: Vec<_> = (0..3)
            .map(|i| flusher.append(Draft::new("worker", "GetToken").record(&i.to_string())))
            .collect();
        assert_eq!(a.lock().queue.len(), 3, "queued behind the write in flight");
        let stopping = std::thread::spawn(move || drop(flusher));
        // The stop has begun (and waits for the thread) before the order is free again.
        while !a.lock().closing {
            std::thread::yield_now();
        }
        // Nothing can be written while the order is held here.
        assert!(store.audit_events(1, 10).expect("events").is_empty());
        drop(in_flight);
        stopping.join().expect("stopped");
        let rt = tokio::runtime::Builder::new_current_thread()
            .build()
            .expect("runtime");
        for answer in answers {
            rt.block_on(answer)
                .expect("written before the thread ended");
        }
        assert_eq!(verify_store(&store), Ok(3));
    }

    /// A read's task is told when the write carrying its event panicked, as a thread is.
    #[test]
    fn a_task_whose_event_is_dropped_unwritten_is_refused_not_left_waiting() {
        let (reply, answer) = tokio::sync::oneshot::channel();
        drop(Pending {
            draft: Draft::new("worker", "GetToken"),
            waiter: Waiter::Task(Some(reply)),
        });
        let told = answer.blocking_recv().expect("told");
        assert!(
            told.expect_err("refused").contains("did not finish"),
            "refused with the reason"
        );
    }

    fn auditor() -> (Arc<MemoryStore>, Auditor, tempfile::TempDir) {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = Arc::new(MemoryStore::new());
        let a = Auditor::open(store.clone(), dir.path()).expect("open");
        (store, a, dir)
    }

    #[test]
    fn chain_verifies_and_every_kind_of_tampering_is_found() {
        let (store, a, dir) = auditor();
        for i in 0..5 {
            a.append(
                &Draft::new("secteam", "Revoke")
                    .record(&format!("rec-{i}"))
                    .owner("alice"),
                true,
            )
            .expect("append");
        }
        let events = store.audit_events(1, 100).expect("events");
        assert_eq!(verify_chain(events.clone()), Ok(5));
        // Events hold HMACs, never the ids or owners.
        for (_, raw) in &events {
            let text = String::from_utf8_lossy(raw);
            assert!(!text.contains("rec-") && !text.contains("alice"));
        }
        let e = Event::decode(events[2].1.as_slice()).expect("decode");
        assert_eq!(e.record_hmac, a.hmac("rec-2"));
        assert_eq!(e.owner_hmac.len(), 64);

        let mut flipped = events.clone();
        let n = flipped[2].1.len() / 2;
        flipped[2].1[n] ^= 0x01;
        assert_eq!(verify_chain(flipped).expect_err("flip").seq, 3);
        let mut removed = events.clone();
        removed.remove(1);
        assert_eq!(verify_chain(removed).expect_err("gap").seq, 2);
        let mut rewritten = events.clone();
        let mut e = Event::decode(rewritten[3].1.as_slice()).expect("decode");
        e.outcome = "denied".into();
        e.hash = event_hash(&e).to_vec();
        rewritten[3].1 = e.encode_to_vec();
        // Recomputing the altered event's own hash does not help: the next link breaks.
        assert_eq!(verify_chain(rewritten).expect_err("relinked").seq, 5);

        // Reopening continues the chain; the key is reused (same HMACs).
        let again = Auditor::open(store.clone(), dir.path()).expect("reopen");
        assert_eq!(again.hmac("rec-2"), a.hmac("rec-2"));
        again
            .append(&Draft::new("x", "GetToken"), false)
            .expect("append");
        assert_eq!(
            verify_chain(store.audit_events(1, 100).expect("events")),
            Ok(6)
        );
        let mode = std::fs::metadata(dir.path().join(AUDIT_KEY_FILE))
            .expect("key")
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
    }

    /// The chain's events in order and its checkpoint, as `admin audit verify` reads them.
    fn verify_store(store: &MemoryStore) -> Result<u64, ChainError> {
        let mut v = ChainVerifier::new(checkpoint(store, "").expect("checkpoint"));
        for (seq, raw) in store.audit_events(0, 100_000).expect("events") {
            v.push(seq, &raw)?;
        }
        v.finish()
    }

    #[test]
    fn retention_prunes_behind_a_checkpoint_the_chain_names() {
        let (store, a, dir) = auditor();
        for i in 0..10 {
            a.append(&Draft::new("w", "GetToken").record(&i.to_string()), true)
                .expect("append");
        }
        let now_ms = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .expect("time")
            .as_millis() as i64;
        // Nothing is older than an hour ago: nothing goes, nothing is written.
        assert_eq!(
            a.prune("retention", now_ms - 3_600_000, None)
                .expect("prune"),
            0
        );
        assert_eq!(store.audit_events(0, 100).expect("events").len(), 10);
        // A sink that has shipped only 4 events holds retention at 4.
        assert_eq!(
            a.prune("retention", now_ms + 1000, Some(4)).expect("prune"),
            4
        );
        let events = store.audit_events(0, 100).expect("events");
        assert_eq!(events.first().map(|e| e.0), Some(5));
        assert_eq!(
            events.last().map(|e| e.0),
            Some(11),
            "the AuditPruned event"
        );
        let pruned = Event::decode(events.last().expect("last").1.as_slice()).expect("decode");
        assert_eq!(pruned.action, PRUNED_ACTION);
        let cp = checkpoint(&*store, "").expect("read").expect("checkpoint");
        assert_eq!(cp.seq, 4);
        assert_eq!(pruned.detail, cp.detail());
        assert_eq!(verify_store(&store), Ok(7));
        // Without its checkpoint the pruned chain does not verify from event 1.
        assert_eq!(
            verify_chain(store.audit_events(0, 100).expect("events"))
                .expect_err("no checkpoint")
                .seq,
            1
        );
        // Everything else, then again: the second pruning names its own checkpoint.
        assert_eq!(a.prune("retention", now_ms + 1000, None).expect("prune"), 7);
        assert_eq!(verify_store(&store), Ok(1));
        // The chain goes on after a reopen.
        let again = Auditor::open(store.clone(), dir.path()).expect("reopen");
        again
            .append(&Draft::new("w", "GetToken"), true)
            .expect("append");
        assert_eq!(verify_store(&store), Ok(2));

        // Moving the checkpoint forward (hiding more events) breaks the check: no AuditPruned
        // event names the forged checkpoint, or the first kept event does not link to it.
        let first = store.audit_events(0, 1).expect("events")[0].clone();
        let forged = Checkpoint {
            seq: first.0,
            hash: Event::decode(first.1.as_slice()).expect("decode").hash[..]
                .try_into()
                .expect("32"),
        };
        let honest = store
            .get_meta(&checkpoint_key(""))
            .expect("meta")
            .expect("cp");
        store
            .put_meta(&checkpoint_key(""), Some(&forged.to_bytes()))
            .expect("forge");
        let mut v = ChainVerifier::new(Some(forged));
        let mut result = Ok(());
        for (seq, raw) in store.audit_events(first.0 + 1, 100).expect("events") {
            result = result.and_then(|()| v.push(seq, &raw));
        }
        let err = result
            .and_then(|()| v.finish().map(|_| ()))
            .expect_err("forged");
        assert!(err.reason.contains("no AuditPruned event"), "{err}");
        store
            .put_meta(&checkpoint_key(""), Some(&honest))
            .expect("restore");
        assert_eq!(verify_store(&store), Ok(2));
        assert!(Checkpoint::from_bytes(&[1, 2, 3]).is_none());
    }

    #[test]
    fn a_bad_audit_key_file_is_refused_and_left_alone() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join(AUDIT_KEY_FILE);
        let store: Arc<dyn TokenStore> = Arc::new(MemoryStore::new());
        for (bytes, mode, msg) in [
            (
                vec![7u8; 32],
                0o644,
                "readable by group or others (mode 644)",
            ),
            (vec![7u8; 31], 0o600, "must hold exactly 32 bytes"),
        ] {
            std::fs::write(&path, &bytes).expect("write");
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(mode)).expect("chmod");
            let err = Auditor::open(Arc::clone(&store), dir.path())
                .expect_err(msg)
                .to_string();
            assert!(err.contains(msg), "{err}");
            assert!(
                !err.contains("0707"),
                "key bytes never in the message: {err}"
            );
            assert_eq!(
                std::fs::read(&path).expect("read"),
                bytes,
                "the file is not replaced"
            );
        }
        assert_eq!(store.audit_events(1, 10).expect("events"), vec![]);
    }

    /// Events name records and owners by HMAC-SHA256 in lowercase hex: the values events
    /// written before the key was cached carry, and what a verifier computes from the key
    /// (expected values from Python's `hmac` module).
    #[test]
    fn record_and_owner_hmacs_are_standard_hmac_sha256_in_lowercase_hex() {
        let key = mac_key(&[7u8; 32]);
        assert_eq!(
            hmac_hex(&key, "gh:1"),
            "ff2fb08edbb63da6d07fb04ca644f711ac040c3524715a5723a3caf5cab0915c"
        );
        assert_eq!(
            hmac_hex(&key, ""),
            "9dac6a74401b46ed9b489d0e19d68d1b13cc6b5090352fdcfa5bd74df4e69d87"
        );
    }

    #[test]
    fn sealed_bytes_are_proto_encoding_and_the_hash_is_the_chain_hash() {
        let key = [7u8; 32];
        let head = Head {
            next_seq: 42,
            last_hash: [9; 32],
        };
        for draft in [
            Draft::new("web-tier", "PutSealed")
                .record("gh:1")
                .owner("user-1")
                .outcome("ok")
                .detail("created: version 1, key version 1"),
            Draft::new("-", "x"),
        ] {
            let (append, hash) = seal_event(&key, &head, &draft);
            let event = Event::decode(append.bytes.as_slice()).expect("decodes");
            assert_eq!(event.encode_to_vec(), append.bytes, "prost's own encoding");
            assert_eq!(event.hash, hash.to_vec());
            assert_eq!(event_hash(&event), hash);
            assert_eq!((event.seq, event.prev_hash), (42, vec![9; 32]));
        }
    }

    #[test]
    fn bytes_added_to_a_stored_event_break_the_chain_even_if_they_decode_the_same() {
        let key = [7u8; 32];
        let first = Head {
            next_seq: 1,
            last_hash: [0; 32],
        };
        let (a, hash) = seal_event(&key, &first, &Draft::new("c", "A"));
        let (b, _) = seal_event(
            &key,
            &Head {
                next_seq: 2,
                last_hash: hash,
            },
            &Draft::new("c", "B"),
        );
        assert_eq!(
            verify_chain([(1, a.bytes.clone()), (2, b.bytes.clone())]),
            Ok(2)
        );
        // Field 15 (varint 1) appended: prost skips it, so the event decodes to the same
        // fields, and a check of a re-encoding would call it intact.
        let mut padded = a.bytes.clone();
        padded.extend_from_slice(&[15 << 3, 1]);
        assert_eq!(
            Event::decode(padded.as_slice()).expect("decodes").hash,
            hash.to_vec()
        );
        let e = verify_chain([(1, padded), (2, b.bytes.clone())]).expect_err("altered");
        assert_eq!((e.seq, e.reason.as_str()), (1, "hash mismatch (altered)"));
        // The same field inserted before the hash.
        let at = a.bytes.len() - 34;
        let mut inserted = a.bytes[..at].to_vec();
        inserted.extend_from_slice(&[15 << 3, 1]);
        inserted.extend_from_slice(&a.bytes[at..]);
        let e = verify_chain([(1, inserted), (2, b.bytes)]).expect_err("altered");
        assert_eq!(e.seq, 1);
    }

    #[test]
    fn append_with_advances_only_when_written() {
        let (store, a, _dir) = auditor();
        let r: Result<u8, ()> = a.append_with(&Draft::new("c", "Delete"), |_| Ok((1, false)));
        assert_eq!(r, Ok(1));
        let r: Result<u8, &str> = a.append_with(&Draft::new("c", "Delete"), |_| Err("engine down"));
        assert_eq!(r, Err("engine down"));
        let r: Result<(), StoreError> = a.append_with(&Draft::new("c", "Delete"), |ap| {
            store.append_audit(ap, true).map(|()| ((), true))
        });
        assert!(r.is_ok());
        a.append(&Draft::new("c", "GetToken"), false)
            .expect("append");
        let events = store.audit_events(1, 10).expect("events");
        assert_eq!(
            events.iter().map(|(s, _)| *s).collect::<Vec<_>>(),
            vec![1, 2]
        );
        assert_eq!(verify_chain(events), Ok(2));
    }

    #[test]
    fn a_write_that_failed_but_committed_is_followed_not_forked() {
        let (store, a, _dir) = auditor();
        // The change and its event commit, but the answer is lost (a connection broken
        // during COMMIT): the caller sees an error.
        let r: Result<(), StoreError> = a.append_with(&Draft::new("c", "Delete"), |ap| {
            store.append_audit(ap, true)?;
            Err(StoreError::Unavailable(
                "connection lost during COMMIT".into(),
            ))
        });
        assert!(r.is_err());
        // The next events follow the stored one instead of reusing its sequence number
        // (which the store refuses, for every later write).
        a.append_with(&Draft::new("c", "Revoke"), |ap| {
            store.append_audit(ap, true).map(|()| ((), true))
        })
        .expect("the next change is written");
        a.append(&Draft::new("c", "GetToken"), false)
            .expect("the next read is written");
        let events = store.audit_events(1, 10).expect("events");
        assert_eq!(
            events.iter().map(|(s, _)| *s).collect::<Vec<_>>(),
            vec![1, 2, 3]
        );
        assert_eq!(verify_chain(events), Ok(3));
    }
}
