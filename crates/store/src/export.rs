//! `tokenvault admin export` / `import`: a store's records and key registry as JSON lines,
//! readable without tokenvault, and loaded into another vault.
//!
//! Owns: the export format (docs/ENVELOPE.md, "Exporting records") and its checks. Built on
//! `store copy` (one mechanism): the same reads of the source (a RocksDB source is a
//! consistent snapshot even while a daemon runs), the same atomic [`Transfer::import`](super::Transfer::import) write
//! and the same per-key-version record digests ([`copy::Digest32`]), which the export's last
//! line carries and the import checks twice (over the file, then over what it wrote).
//!
//! Must never: export a private key (not even an encrypted one), a grant, an audit event or
//! a plaintext; decrypt anything; write to the source. An import writes nothing until the
//! whole file has been read and checked, and refuses a record id the target already has.

use std::collections::BTreeMap;
use std::io::{BufRead, Read as _, Write};

use base64::Engine as _;
use serde_json::{Value, json};
use sha2::{Digest as _, Sha256};
use thiserror::Error;

use super::copy::{Digest32, Running};
use super::schema::encode_record;
use super::{Import, StoreError, TokenStore};
use crate::keys::{KeyId, KeyInfo, KeyState};
use crate::record::{Record, RecordId, RecordMeta, SecretKind};

/// `format` of an export's first line.
pub const FORMAT: &str = "tokenvault-export";
/// `version` of the format this build writes and reads.
pub const VERSION: u64 = 1;
/// Records per store read and per atomic import write.
const PAGE: usize = 256;
/// Longest line an import reads (a record with a 64 KiB secret and full metadata is ~100 KiB).
const MAX_LINE: usize = 1 << 20;

/// Why an export or import stopped.
#[derive(Debug, Error)]
pub enum ExportError {
    /// The store failed.
    #[error("{0}")]
    Store(#[from] StoreError),
    /// The file could not be read or written.
    #[error("{path}: {message}")]
    File {
        /// The file.
        path: String,
        /// What failed.
        message: String,
    },
    /// The file is not a well-formed export (line number from 1, and what is wrong; never a
    /// value from the line).
    #[error("line {line}: {message}")]
    Malformed {
        /// Line number.
        line: u64,
        /// What is wrong.
        message: String,
    },
    /// The export's key registry does not agree with the target's.
    #[error("key version {version}: {message}")]
    KeyMismatch {
        /// Version.
        version: u32,
        /// What differs.
        message: String,
    },
    /// The target already holds a record of the export.
    #[error("the target already holds record {0}; import into a vault without these records")]
    Exists(String),
    /// The target holds an unfinished `store copy`.
    #[error("the target holds an unfinished `tokenvault store copy`; finish it first")]
    UnfinishedCopy,
}

/// What an export or import reports.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExportSummary {
    /// Key registry entries.
    pub keys: u64,
    /// Records per key version: count and SHA-256 (as `store copy` prints them).
    pub records: BTreeMap<u32, Digest32>,
}

impl ExportSummary {
    /// Records in all.
    pub fn record_count(&self) -> u64 {
        self.records.values().map(|d| d.count).sum()
    }
}

fn key_json(k: &KeyInfo) -> Value {
    json!({
        "type": "key",
        "version": k.version,
        "fingerprint": k.id.to_hex(),
        "state": k.state.as_str(),
        "created_at": k.created_at,
        "updated_at": k.updated_at,
        "spki_pem": crate::keys::spki_pem(&k.spki_der),
        "destroy_after": k.destroy_after,
    })
}

fn record_json(r: &Record) -> Value {
    json!({
        "type": "record",
        "id": r.meta.id.as_str(),
        "owner": r.meta.owner.as_str(),
        "provider": r.meta.provider.as_str(),
        "kind": r.meta.kind.as_str(),
        "scopes": r.meta.scopes.iter().map(|s| s.as_str()).collect::<Vec<_>>(),
        "expires_at": r.meta.expires_at.unwrap_or(0),
        "created_at": r.created_at,
        "updated_at": r.updated_at,
        "version": r.version,
        "key_version": r.key_version,
        "revoked": r.revoked,
        "needs_reauth": r.needs_reauth,
        "envelope": base64::engine::general_purpose::STANDARD.encode(&r.envelope),
    })
}

fn digests_json(records: &BTreeMap<u32, Digest32>) -> Value {
    Value::Object(
        records
            .iter()
            .map(|(v, d)| {
                (
                    v.to_string(),
                    json!({ "count": d.count, "sha256": hex::encode(d.sha256) }),
                )
            })
            .collect(),
    )
}

/// Writes lines and hashes them for the trailer.
struct Lines<'a, W: Write> {
    out: &'a mut W,
    hash: Sha256,
    path: &'a str,
}

impl<W: Write> Lines<'_, W> {
    fn put(&mut self, value: &Value) -> Result<(), ExportError> {
        let mut line = value.to_string();
        line.push('\n');
        self.hash.update(line.as_bytes());
        self.out
            .write_all(line.as_bytes())
            .map_err(|e| ExportError::File {
                path: self.path.to_string(),
                message: e.to_string(),
            })
    }
}

/// Writes `store`'s key registry and every record to `out` as JSON lines; `progress` gets the
/// records written so far. `source` names the store in the header (no password).
pub fn export(
    store: &dyn TokenStore,
    source: &str,
    out: &mut impl Write,
    path: &str,
    now: i64,
    progress: &mut dyn FnMut(u64),
) -> Result<ExportSummary, ExportError> {
    if super::copy::unfinished(store)? {
        return Err(ExportError::UnfinishedCopy);
    }
    let mut lines = Lines {
        out,
        hash: Sha256::new(),
        path,
    };
    lines.put(&json!({
        "format": FORMAT,
        "version": VERSION,
        "source": source,
        "exported_at": now,
    }))?;
    let keys = store.keys()?;
    for k in &keys {
        lines.put(&key_json(k))?;
    }
    let mut digests: BTreeMap<u32, Running> = BTreeMap::new();
    let mut after: Option<RecordId> = None;
    let mut done = 0;
    loop {
        let page = store.scan_records(after.as_ref(), PAGE)?;
        let Some(last) = page.last() else { break };
        after = Some(last.meta.id.clone());
        for r in &page {
            digests
                .entry(r.key_version)
                .or_default()
                .add(&[&encode_record(r)]);
            lines.put(&record_json(r))?;
        }
        done += page.len() as u64;
        progress(done);
    }
    let records: BTreeMap<u32, Digest32> =
        digests.into_iter().map(|(v, r)| (v, r.finish())).collect();
    let file_sha256 = hex::encode(lines.hash.clone().finalize());
    lines.put(&json!({
        "type": "end",
        "keys": keys.len(),
        "records": digests_json(&records),
        "sha256": file_sha256,
    }))?;
    lines.out.flush().map_err(|e| ExportError::File {
        path: path.to_string(),
        message: e.to_string(),
    })?;
    Ok(ExportSummary {
        keys: keys.len() as u64,
        records,
    })
}

fn malformed(line: u64, message: impl Into<String>) -> ExportError {
    ExportError::Malformed {
        line,
        message: message.into(),
    }
}

/// A field of a JSON object line, with the line number in the error.
struct Fields<'a> {
    line: u64,
    value: &'a Value,
}

impl Fields<'_> {
    fn get(&self, name: &str) -> Result<&Value, ExportError> {
        self.value
            .get(name)
            .ok_or_else(|| malformed(self.line, format!("missing field {name:?}")))
    }

    fn str(&self, name: &str) -> Result<&str, ExportError> {
        self.get(name)?
            .as_str()
            .ok_or_else(|| malformed(self.line, format!("{name:?} must be a string")))
    }

    fn u64(&self, name: &str) -> Result<u64, ExportError> {
        self.get(name)?.as_u64().ok_or_else(|| {
            malformed(
                self.line,
                format!("{name:?} must be a non-negative integer"),
            )
        })
    }

    fn i64(&self, name: &str) -> Result<i64, ExportError> {
        self.get(name)?
            .as_i64()
            .ok_or_else(|| malformed(self.line, format!("{name:?} must be an integer")))
    }

    fn bool(&self, name: &str) -> Result<bool, ExportError> {
        self.get(name)?
            .as_bool()
            .ok_or_else(|| malformed(self.line, format!("{name:?} must be true or false")))
    }

    fn u32(&self, name: &str) -> Result<u32, ExportError> {
        u32::try_from(self.u64(name)?)
            .map_err(|_| malformed(self.line, format!("{name:?} is out of range")))
    }
}

fn parse_key(f: &Fields<'_>) -> Result<KeyInfo, ExportError> {
    let version = f.u32("version")?;
    let pem = f.str("spki_pem")?;
    let public = crate::keys::PublicKey::from_pem(pem)
        .map_err(|e| malformed(f.line, format!("spki_pem: {e}")))?;
    let id = public.id();
    let named = KeyId::from_hex(f.str("fingerprint")?)
        .ok_or_else(|| malformed(f.line, "fingerprint must be 64 hex digits"))?;
    if id != named {
        return Err(malformed(
            f.line,
            "fingerprint is not the SHA-256 of spki_pem",
        ));
    }
    let state = match f.str("state")? {
        "active" => KeyState::Active,
        "decrypt-only" => KeyState::DecryptOnly,
        "retired" => KeyState::Retired,
        "pending-destruction" => KeyState::PendingDestruction,
        "destroyed" => KeyState::Destroyed,
        _ => return Err(malformed(f.line, "state is not a key state")),
    };
    Ok(KeyInfo {
        version,
        id,
        state,
        created_at: f.i64("created_at")?,
        updated_at: f.i64("updated_at")?,
        spki_der: public.spki_der().to_vec(),
        // Absent in exports of earlier releases; null when not pending.
        destroy_after: match f.value.get("destroy_after") {
            None | Some(Value::Null) => None,
            Some(_) => Some(f.i64("destroy_after")?),
        },
    })
}

fn parse_record(f: &Fields<'_>) -> Result<Record, ExportError> {
    let kind = SecretKind::parse(f.str("kind")?).map_err(|e| malformed(f.line, e.to_string()))?;
    let scopes = f
        .get("scopes")?
        .as_array()
        .ok_or_else(|| malformed(f.line, "\"scopes\" must be an array"))?
        .iter()
        .map(|s| {
            s.as_str()
                .map(str::to_string)
                .ok_or_else(|| malformed(f.line, "\"scopes\" must hold strings"))
        })
        .collect::<Result<Vec<_>, _>>()?;
    let meta = RecordMeta::parse(
        f.str("id")?,
        f.str("owner")?,
        f.str("provider")?,
        kind,
        &scopes,
        f.i64("expires_at")?,
    )
    .map_err(|e| malformed(f.line, e.to_string()))?;
    let envelope = base64::engine::general_purpose::STANDARD
        .decode(f.str("envelope")?)
        .map_err(|_| malformed(f.line, "\"envelope\" is not base64"))?;
    let version = f.u64("version")?;
    if version == 0 {
        return Err(malformed(f.line, "\"version\" must be at least 1"));
    }
    Ok(Record {
        meta,
        envelope,
        key_version: f.u32("key_version")?,
        created_at: f.i64("created_at")?,
        updated_at: f.i64("updated_at")?,
        revoked: f.bool("revoked")?,
        needs_reauth: f.bool("needs_reauth")?,
        version,
    })
}

/// Reads an export line by line: `on_record` gets each record (checked against its key);
/// returns the registry and the summary the trailer states, once the whole file matched it.
fn read_export(
    input: &mut impl BufRead,
    on_record: &mut dyn FnMut(Record) -> Result<(), ExportError>,
) -> Result<(Vec<KeyInfo>, ExportSummary), ExportError> {
    let mut line_no = 0u64;
    let mut hash = Sha256::new();
    let mut keys: Vec<KeyInfo> = Vec::new();
    let mut digests: BTreeMap<u32, Running> = BTreeMap::new();
    let mut ids_seen_last: Option<RecordId> = None;
    let mut buf = Vec::new();
    loop {
        buf.clear();
        let n = (&mut *input)
            .take(MAX_LINE as u64 + 1)
            .read_until(b'\n', &mut buf)
            .map_err(|e| malformed(line_no + 1, format!("unreadable: {e}")))?;
        if n == 0 {
            return Err(malformed(
                line_no + 1,
                "the file ends without its \"end\" line (truncated)",
            ));
        }
        line_no += 1;
        if buf.len() > MAX_LINE || buf.last() != Some(&b'\n') {
            return Err(malformed(
                line_no,
                "longer than 1 MiB or not ended by a newline (truncated?)",
            ));
        }
        let value: Value = serde_json::from_slice(&buf)
            .map_err(|e| malformed(line_no, format!("not JSON (column {})", e.column())))?;
        let f = Fields {
            line: line_no,
            value: &value,
        };
        if line_no == 1 {
            if f.str("format")? != FORMAT {
                return Err(malformed(1, "not a tokenvault export"));
            }
            let version = f.u64("version")?;
            if version != VERSION {
                return Err(malformed(
                    1,
                    format!("export format version {version}; this tokenvault reads {VERSION}"),
                ));
            }
            hash.update(&buf);
            continue;
        }
        match f.str("type")? {
            "key" => {
                if !digests.is_empty() {
                    return Err(malformed(line_no, "a key line after the records"));
                }
                let k = parse_key(&f)?;
                if keys.iter().any(|o| o.version == k.version) {
                    return Err(malformed(line_no, "key version listed twice"));
                }
                keys.push(k);
            }
            "record" => {
                let r = parse_record(&f)?;
                if ids_seen_last
                    .as_ref()
                    .is_some_and(|last| *last >= r.meta.id)
                {
                    return Err(malformed(
                        line_no,
                        "records out of id order (or listed twice)",
                    ));
                }
                let Some(key) = keys.iter().find(|k| k.version == r.key_version) else {
                    return Err(malformed(
                        line_no,
                        format!("key_version {} is not in the export's keys", r.key_version),
                    ));
                };
                // The envelope names its key by fingerprint: it must be the registry's.
                let parsed = crate::envelope::EnvelopeRef::decode(&r.envelope)
                    .map_err(|e| malformed(line_no, format!("envelope: {e}")))?;
                if parsed.key_id != key.id {
                    return Err(malformed(
                        line_no,
                        "the envelope is sealed under another key than its key_version",
                    ));
                }
                digests
                    .entry(r.key_version)
                    .or_default()
                    .add(&[&encode_record(&r)]);
                ids_seen_last = Some(r.meta.id.clone());
                on_record(r)?;
            }
            "end" => {
                let stated_sha = f.str("sha256")?;
                if hex::encode(hash.clone().finalize()) != stated_sha {
                    return Err(malformed(
                        line_no,
                        "the file's SHA-256 differs from the one it states (altered)",
                    ));
                }
                if f.u64("keys")? != keys.len() as u64 {
                    return Err(malformed(line_no, "\"keys\" differs from the key lines"));
                }
                let records: BTreeMap<u32, Digest32> =
                    digests.into_iter().map(|(v, r)| (v, r.finish())).collect();
                if *f.get("records")? != digests_json(&records) {
                    return Err(malformed(
                        line_no,
                        "\"records\" differs from the record lines (altered)",
                    ));
                }
                let mut rest = Vec::new();
                input
                    .read_to_end(&mut rest)
                    .map_err(|e| malformed(line_no + 1, format!("unreadable: {e}")))?;
                if !rest.is_empty() {
                    return Err(malformed(line_no + 1, "data after the \"end\" line"));
                }
                let summary = ExportSummary {
                    keys: keys.len() as u64,
                    records,
                };
                return Ok((keys, summary));
            }
            _ => return Err(malformed(line_no, "\"type\" must be key, record or end")),
        }
        hash.update(&buf);
    }
}

/// Checks an export's registry against `target`'s: each version the target has must be the
/// same key; a target with no registry gets the export's.
fn check_keys(target: &dyn TokenStore, keys: &[KeyInfo]) -> Result<Vec<KeyInfo>, ExportError> {
    let theirs = target.keys()?;
    if theirs.is_empty() {
        return Ok(keys.to_vec());
    }
    for k in keys {
        match theirs.iter().find(|t| t.version == k.version) {
            Some(t) if t.id == k.id => {}
            Some(_) => {
                return Err(ExportError::KeyMismatch {
                    version: k.version,
                    message: "the target's key registry holds another key under this version"
                        .into(),
                });
            }
            None => {
                return Err(ExportError::KeyMismatch {
                    version: k.version,
                    message: "the target's key registry lacks it; import into a vault with the same registry, or an empty one".into(),
                });
            }
        }
    }
    Ok(Vec::new())
}

/// Loads an export into `target`: reads and checks the whole file first (format, order, keys,
/// every envelope's key, the stated digests, no id the target has), then writes the records
/// page by page with [`Transfer::import`](super::Transfer::import), as `store copy` does, and checks the digests of
/// what it wrote. `open` reopens the file for the second pass.
pub fn import(
    target: &dyn TokenStore,
    open: &mut dyn FnMut() -> Result<Box<dyn BufRead>, ExportError>,
    progress: &mut dyn FnMut(u64),
) -> Result<ExportSummary, ExportError> {
    if super::copy::unfinished(target)? {
        return Err(ExportError::UnfinishedCopy);
    }
    // Pass 1: the whole file, nothing written.
    let (keys, summary) = read_export(&mut open()?, &mut |r| {
        if target.get_record(&r.meta.id)?.is_some() {
            return Err(ExportError::Exists(r.meta.id.to_string()));
        }
        Ok(())
    })?;
    let new_keys = check_keys(target, &keys)?;
    if !new_keys.is_empty() {
        target.import(&Import {
            keys: new_keys,
            ..Import::default()
        })?;
    }
    // Pass 2: the same file again, written in pages; each page is read back at once into
    // the digests (constant memory, whatever the file's size).
    let mut page = Vec::with_capacity(PAGE);
    let mut written: BTreeMap<u32, Running> = BTreeMap::new();
    let mut done = 0;
    let mut flush = |page: &mut Vec<Record>| -> Result<(), ExportError> {
        if page.is_empty() {
            return Ok(());
        }
        let records = std::mem::take(page);
        let ids: Vec<RecordId> = records.iter().map(|r| r.meta.id.clone()).collect();
        done += records.len() as u64;
        target.import(&Import {
            records,
            ..Import::default()
        })?;
        for id in &ids {
            let r = target
                .get_record(id)?
                .ok_or_else(|| StoreError::NotFound(id.to_string()))?;
            written
                .entry(r.key_version)
                .or_default()
                .add(&[&encode_record(&r)]);
        }
        progress(done);
        Ok(())
    };
    let (_, again) = read_export(&mut open()?, &mut |r| {
        page.push(r);
        if page.len() == PAGE {
            flush(&mut page)?;
        }
        Ok(())
    })?;
    flush(&mut page)?;
    if again != summary {
        return Err(malformed(0, "the file changed between its two reads"));
    }
    // What the target holds now is what the file said.
    let written: BTreeMap<u32, Digest32> =
        written.into_iter().map(|(v, r)| (v, r.finish())).collect();
    if written != summary.records {
        return Err(
            StoreError::Corrupt("the imported records read back differently".into()).into(),
        );
    }
    Ok(summary)
}
