//! Shipping the audit trail out: every event of this daemon's chain as one JSON line in a
//! file, rotated by size, for a SIEM or log collector to pick up.
//!
//! Owns: the shipping cursor (`audit_shipped/<chain>` in the store), the line format and the
//! rotation. Must never: ship anything but what the store holds (HMAC'd identifiers only), or
//! let retention drop an event before it is shipped ([`Shipper::shipped`] bounds the pruning).
//!
//! Delivery guarantee: at least once, in chain order. Events are read from the store (never
//! from memory), written, fsynced, and only then is the cursor advanced in the store; a crash
//! in between ships up to one page again, so consumers deduplicate on (`instance`, `seq`).

use std::io::Write as _;
use std::os::unix::fs::OpenOptionsExt as _;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use base64::Engine as _;
use thiserror::Error;

use super::Event;
use crate::config::SinkConfig;
use crate::store::{StoreError, TokenStore};

/// Events read and written per round.
const PAGE: usize = 1024;

/// Why shipping stopped; the cursor stays at the last event written whole.
#[derive(Debug, Error)]
#[non_exhaustive]
pub enum SinkError {
    /// The store could not be read or the cursor written.
    #[error("audit sink: {0}")]
    Store(#[from] StoreError),
    /// The file could not be written, synced or rotated.
    #[error("audit sink {path}: {message}")]
    File {
        /// The file.
        path: String,
        /// What failed.
        message: String,
    },
}

/// Ships one chain's events to a [`SinkConfig`] file.
pub struct Shipper {
    store: Arc<dyn TokenStore>,
    config: SinkConfig,
    chain: String,
    /// Serializes rounds (the periodic job, and the one before a pruning).
    round: std::sync::Mutex<()>,
}

impl std::fmt::Debug for Shipper {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Shipper")
            .field("file", &self.config.file)
            .finish_non_exhaustive()
    }
}

fn cursor_key(chain: &str) -> String {
    format!("audit_shipped/{chain}")
}

/// One event as a JSON line: the stored fields, hashes in hex and the stored bytes in base64,
/// so the receiver can check the chain itself (docs/ROTATION.md has the hash rule).
pub fn line(chain: &str, seq: u64, raw: &[u8]) -> String {
    let e = Event::from_stored(seq, raw);
    serde_json::json!({
        "instance": chain,
        "seq": seq,
        "time_ms": e.time_ms,
        "caller": e.caller,
        "action": e.action,
        "record_hmac": e.record_hmac,
        "owner_hmac": e.owner_hmac,
        "outcome": e.outcome,
        "detail": e.detail,
        "prev_hash": hex::encode(&e.prev_hash),
        "hash": hex::encode(&e.hash),
        "raw": base64::engine::general_purpose::STANDARD.encode(raw),
    })
    .to_string()
}

impl Shipper {
    /// A shipper of `store`'s own chain; checks now that the file can be opened for appending
    /// (created 0600), so a bad path stops the daemon at startup, not later.
    pub fn open(store: Arc<dyn TokenStore>, config: SinkConfig) -> Result<Self, SinkError> {
        let chain = store.own_chain();
        let shipper = Self {
            store,
            config,
            chain,
            round: std::sync::Mutex::new(()),
        };
        shipper.open_file()?;
        Ok(shipper)
    }

    fn err(&self, path: &Path, e: impl std::fmt::Display) -> SinkError {
        SinkError::File {
            path: path.display().to_string(),
            message: e.to_string(),
        }
    }

    /// Opens the file for appending, created 0600. An existing file that group or others may
    /// read or write is refused: the events name callers, actions and record HMACs, and a
    /// writable copy could be edited before a SIEM reads it.
    fn open_file(&self) -> Result<std::fs::File, SinkError> {
        use std::os::unix::fs::PermissionsExt as _;
        let file = std::fs::OpenOptions::new()
            .append(true)
            .create(true)
            .mode(0o600)
            .open(&self.config.file)
            .map_err(|e| self.err(&self.config.file, e))?;
        let mode = file
            .metadata()
            .map_err(|e| self.err(&self.config.file, e))?
            .permissions()
            .mode();
        if mode & 0o077 != 0 {
            return Err(self.err(
                &self.config.file,
                format!(
                    "is accessible to group or others (mode {:o}); chmod 600 it",
                    mode & 0o777
                ),
            ));
        }
        Ok(file)
    }

    /// The last event shipped (0: none).
    pub fn shipped(&self) -> Result<u64, SinkError> {
        Ok(self
            .store
            .get_meta(&cursor_key(&self.chain))?
            .and_then(|b| <[u8; 8]>::try_from(b.as_slice()).ok())
            .map_or(0, u64::from_be_bytes))
    }

    /// Ships every event after the cursor; returns how many.
    pub fn ship(&self) -> Result<u64, SinkError> {
        let _round = self
            .round
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let mut next = self.shipped()? + 1;
        let mut shipped = 0;
        loop {
            let page = self.store.audit_events(next, PAGE)?;
            let Some(&(last, _)) = page.last() else {
                return Ok(shipped);
            };
            if page[0].0 != next && next > 1 {
                // Pruned before it was shipped (a sink added to a pruned trail): say so once.
                tracing::warn!(
                    from = next,
                    to = page[0].0 - 1,
                    "audit events were pruned before this sink shipped them"
                );
            }
            let mut text = String::with_capacity(page.len() * 400);
            for (seq, raw) in &page {
                text.push_str(&line(&self.chain, *seq, raw));
                text.push('\n');
            }
            self.rotate_if_full()?;
            let mut file = self.open_file()?;
            file.write_all(text.as_bytes())
                .and_then(|()| file.sync_data())
                .map_err(|e| self.err(&self.config.file, e))?;
            self.store
                .put_meta(&cursor_key(&self.chain), Some(&last.to_be_bytes()))?;
            shipped += page.len() as u64;
            next = last + 1;
        }
    }

    /// Rotates when the file has reached `max_bytes`: FILE → FILE.1 → ... → FILE.N, the
    /// oldest dropped.
    fn rotate_if_full(&self) -> Result<(), SinkError> {
        let file = &self.config.file;
        let size = match std::fs::metadata(file) {
            Ok(m) => m.len(),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
            Err(e) => return Err(self.err(file, e)),
        };
        if size < self.config.max_bytes {
            return Ok(());
        }
        let numbered = |n: u32| -> PathBuf {
            let mut name = file.as_os_str().to_owned();
            name.push(format!(".{n}"));
            PathBuf::from(name)
        };
        for n in (1..self.config.keep_files).rev() {
            match std::fs::rename(numbered(n), numbered(n + 1)) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => return Err(self.err(&numbered(n), e)),
            }
        }
        std::fs::rename(file, numbered(1)).map_err(|e| self.err(file, e))?;
        // The renames are durable before anything is written to the new file.
        if let Some(dir) = file.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::File::open(dir)
                .and_then(|d| d.sync_all())
                .map_err(|e| self.err(dir, e))?;
        }
        Ok(())
    }
}
