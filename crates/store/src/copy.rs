//! `tokenvault store copy`: a store's whole state moved to another store, any engine to any
//! engine, as it is.
//!
//! Owns: the copy loop, its resumable cursor and the verification that follows it. What moves:
//! the key registry (public keys and states), every metadata entry (grants, replay markers,
//! the rewrap cursor, and on a shared database the passphrase-encrypted private keys and
//! audit key), every record with its version and times, and every audit chain event by event.
//!
//! Must never: decrypt anything (envelopes and key blobs are bytes here; no private key is
//! needed), write to the source, or let a daemon serve a half-copied target. Each page is one
//! atomic import together with the cursor ([`COPY_STATE`]) saying where the copy is; a target
//! holding that cursor is refused by `serve`, and the next `store copy` with the same source
//! resumes from it. The cursor is removed only once both stores' summaries (counts and a
//! SHA-256 per key version, over the metadata and over each audit chain) are equal.

use std::collections::BTreeMap;

use sha2::{Digest, Sha256};
use thiserror::Error;

use super::schema::{encode_key, encode_record};
use super::{Import, StoreError, TokenStore};
use crate::record::RecordId;

/// Metadata key of an unfinished copy's cursor in the target.
pub const COPY_STATE: &str = "store_copy/state";

/// Items per page (one atomic import each): envelopes are at most 64 KiB, so a page stays
/// within a few MiB.
const PAGE: usize = 256;

/// Which part of the store a copy is in, in the order they are copied.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Phase {
    /// Key registry entries.
    Keys,
    /// Metadata, grants and replay markers.
    Meta,
    /// Records.
    Records,
    /// Audit events, chain by chain.
    Audit,
    /// Everything is copied; the summaries are compared.
    Verify,
}

impl Phase {
    fn name(self) -> &'static str {
        match self {
            Phase::Keys => "keys",
            Phase::Meta => "meta",
            Phase::Records => "records",
            Phase::Audit => "audit",
            Phase::Verify => "verify",
        }
    }

    fn parse(s: &str) -> Option<Self> {
        [
            Phase::Keys,
            Phase::Meta,
            Phase::Records,
            Phase::Audit,
            Phase::Verify,
        ]
        .into_iter()
        .find(|p| p.name() == s)
    }
}

/// Where a copy is: the source it reads, the phase, and the last item written in it.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Cursor {
    source: String,
    phase: Phase,
    /// Last metadata key or record id written; for audit, `chain ‖ 0x00 ‖ seq` (decimal).
    after: String,
}

impl Cursor {
    fn encode(&self) -> Vec<u8> {
        format!(
            "source={}\nphase={}\nafter={}\n",
            hex::encode(&self.source),
            self.phase.name(),
            hex::encode(&self.after)
        )
        .into_bytes()
    }

    fn decode(bytes: &[u8]) -> Option<Self> {
        let text = std::str::from_utf8(bytes).ok()?;
        let mut fields = BTreeMap::new();
        for line in text.lines() {
            let (k, v) = line.split_once('=')?;
            fields.insert(k, v);
        }
        let unhex = |k: &str| {
            hex::decode(fields.get(k)?)
                .ok()
                .and_then(|b| String::from_utf8(b).ok())
        };
        Some(Self {
            source: unhex("source")?,
            phase: Phase::parse(fields.get("phase")?)?,
            after: unhex("after")?,
        })
    }
}

/// How far a copy got, for a progress display.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Progress {
    /// The phase being copied.
    pub phase: Phase,
    /// Items of this phase written so far in this run.
    pub done: u64,
    /// Items of this phase in the source, when cheap to know (records).
    pub total: Option<u64>,
}

/// Count and SHA-256 of one part of a store.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Digest32 {
    /// Items.
    pub count: u64,
    /// SHA-256 over the items in order (each length-prefixed).
    pub sha256: [u8; 32],
}

/// What a copy compares between source and target once it has written everything.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Summary {
    /// The key registry.
    pub registry: Option<Digest32>,
    /// Records per key version.
    pub records: BTreeMap<u32, Digest32>,
    /// Metadata entries (the copy's own cursor excluded).
    pub meta: Option<Digest32>,
    /// Events per audit chain (chains without events are left out).
    pub audit: BTreeMap<String, Digest32>,
}

/// What a finished copy reports.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Report {
    /// The summary both stores have.
    pub summary: Summary,
    /// Whether this run continued an interrupted copy.
    pub resumed: bool,
}

/// Why a copy stopped.
#[derive(Debug, Error)]
pub enum CopyError {
    /// The source failed.
    #[error("reading the source: {0}")]
    Source(#[source] StoreError),
    /// The target failed.
    #[error("writing the target: {0}")]
    Target(#[source] StoreError),
    /// The target holds data and no unfinished copy from this source.
    #[error(
        "the target is not empty; copy into a new directory or an empty database (an interrupted copy resumes only from the same source)"
    )]
    TargetNotEmpty,
    /// The target holds an unfinished copy from another source.
    #[error(
        "the target holds an unfinished copy from {0}; finish that one, or start over in an empty target"
    )]
    OtherCopy(String),
    /// The source is itself an unfinished copy.
    #[error("the source holds an unfinished copy (store_copy/state); finish that copy first")]
    SourceIncomplete,
    /// The target's cursor did not decode.
    #[error(
        "the target's copy cursor (store_copy/state) is corrupt; start over in an empty target"
    )]
    BadCursor,
    /// After the copy the two stores differ (the source changed while it was read, or a
    /// write was lost): the target keeps its cursor, so no daemon serves it.
    #[error(
        "the copy does not match the source: {0}; if daemons were writing to the source, stop them and copy again into an empty target"
    )]
    Mismatch(String),
    /// Stopped on purpose after a number of pages (tests of resumption).
    #[error("stopped after {0} page(s) as asked")]
    Interrupted(u64),
}

/// Options of a copy.
#[derive(Debug, Clone, Default)]
pub struct CopyOptions {
    /// Names the source (no password), so an interrupted copy resumes only from it.
    pub source_name: String,
    /// Stop after this many pages, leaving the copy resumable (tests).
    pub stop_after_pages: Option<u64>,
}

/// Whether `store` holds an unfinished copy (and must not be served).
pub fn unfinished(store: &dyn TokenStore) -> Result<bool, StoreError> {
    Ok(store.get_meta(COPY_STATE)?.is_some())
}

/// Copies everything in `from` to `to` (empty, or holding an interrupted copy from the same
/// source), then verifies; `progress` is told after each page.
pub fn copy(
    from: &dyn TokenStore,
    to: &dyn TokenStore,
    options: &CopyOptions,
    progress: &mut dyn FnMut(&Progress),
) -> Result<Report, CopyError> {
    let src = CopyError::Source;
    let dst = CopyError::Target;
    if unfinished(from).map_err(src)? {
        return Err(CopyError::SourceIncomplete);
    }
    let (mut cursor, resumed) = match to.get_meta(COPY_STATE).map_err(dst)? {
        Some(bytes) => {
            let c = Cursor::decode(&bytes).ok_or(CopyError::BadCursor)?;
            if c.source != options.source_name {
                return Err(CopyError::OtherCopy(c.source));
            }
            (c, true)
        }
        None => {
            if !is_empty(to).map_err(dst)? {
                return Err(CopyError::TargetNotEmpty);
            }
            (
                Cursor {
                    source: options.source_name.clone(),
                    phase: Phase::Keys,
                    after: String::new(),
                },
                false,
            )
        }
    };
    let mut pages = 0u64;
    // Each page goes to the target with the cursor after it, atomically.
    let mut write = |mut batch: Import, cursor: &Cursor| -> Result<(), CopyError> {
        if let Some(limit) = options.stop_after_pages
            && pages >= limit
        {
            return Err(CopyError::Interrupted(pages));
        }
        batch.meta.push((COPY_STATE.to_string(), cursor.encode()));
        to.import(&batch).map_err(CopyError::Target)?;
        pages += 1;
        Ok(())
    };

    if cursor.phase == Phase::Keys {
        let keys = from.keys().map_err(src)?;
        let n = keys.len() as u64;
        cursor.phase = Phase::Meta;
        cursor.after.clear();
        write(
            Import {
                keys,
                ..Import::default()
            },
            &cursor,
        )?;
        progress(&Progress {
            phase: Phase::Keys,
            done: n,
            total: Some(n),
        });
    }
    if cursor.phase == Phase::Meta {
        let mut done = 0;
        loop {
            let after = (!cursor.after.is_empty()).then_some(cursor.after.as_str());
            let page: Vec<_> = from
                .meta_page(after, PAGE)
                .map_err(src)?
                .into_iter()
                .collect();
            let Some((last, _)) = page.last() else { break };
            cursor.after = last.clone();
            done += page.len() as u64;
            write(
                Import {
                    meta: page.into_iter().filter(|(k, _)| k != COPY_STATE).collect(),
                    ..Import::default()
                },
                &cursor,
            )?;
            progress(&Progress {
                phase: Phase::Meta,
                done,
                total: None,
            });
        }
        cursor.phase = Phase::Records;
        cursor.after.clear();
    }
    if cursor.phase == Phase::Records {
        let total = Some(from.stats().map_err(src)?.records);
        let mut done = 0;
        loop {
            let after = match cursor.after.as_str() {
                "" => None,
                id => Some(RecordId::parse(id).map_err(|_| CopyError::BadCursor)?),
            };
            let page = from.scan_records(after.as_ref(), PAGE).map_err(src)?;
            let Some(last) = page.last() else { break };
            cursor.after = last.meta.id.to_string();
            done += page.len() as u64;
            write(
                Import {
                    records: page,
                    ..Import::default()
                },
                &cursor,
            )?;
            progress(&Progress {
                phase: Phase::Records,
                done,
                total,
            });
        }
        cursor.phase = Phase::Audit;
        cursor.after.clear();
    }
    if cursor.phase == Phase::Audit {
        let (start_chain, start_seq) = match cursor.after.split_once('\0') {
            Some((chain, seq)) => (
                chain.to_string(),
                seq.parse::<u64>().map_err(|_| CopyError::BadCursor)? + 1,
            ),
            None => (String::new(), 0),
        };
        let mut done = 0;
        let started = !cursor.after.is_empty();
        for chain in from.audit_chains().map_err(src)? {
            if started && chain < start_chain {
                continue;
            }
            let mut next = if started && chain == start_chain {
                start_seq
            } else {
                0
            };
            loop {
                let page = from.chain_events(&chain, next, PAGE).map_err(src)?;
                let Some((last, _)) = page.last() else { break };
                next = last + 1;
                cursor.after = format!("{chain}\0{last}");
                done += page.len() as u64;
                write(
                    Import {
                        audit: page
                            .into_iter()
                            .map(|(seq, bytes)| (chain.clone(), seq, bytes))
                            .collect(),
                        ..Import::default()
                    },
                    &cursor,
                )?;
                progress(&Progress {
                    phase: Phase::Audit,
                    done,
                    total: None,
                });
            }
        }
        cursor.phase = Phase::Verify;
        cursor.after.clear();
        write(Import::default(), &cursor)?;
    }

    progress(&Progress {
        phase: Phase::Verify,
        done: 0,
        total: None,
    });
    let source = summarize(from).map_err(src)?;
    let target = summarize(to).map_err(dst)?;
    if source != target {
        return Err(CopyError::Mismatch(differences(&source, &target)));
    }
    to.put_meta(COPY_STATE, None).map_err(dst)?;
    Ok(Report {
        summary: source,
        resumed,
    })
}

/// Whether a store holds nothing a copy could overwrite.
fn is_empty(store: &dyn TokenStore) -> Result<bool, StoreError> {
    if !store.keys()?.is_empty()
        || !store.scan_records(None, 1)?.is_empty()
        || !store.meta_page(None, 1)?.is_empty()
    {
        return Ok(false);
    }
    for chain in store.audit_chains()? {
        if !store.chain_events(&chain, 0, 1)?.is_empty() {
            return Ok(false);
        }
    }
    Ok(true)
}

/// A running count and hash.
#[derive(Default)]
pub(crate) struct Running {
    count: u64,
    hash: Sha256,
}

impl Running {
    pub(crate) fn add(&mut self, parts: &[&[u8]]) {
        self.count += 1;
        for p in parts {
            self.hash.update((p.len() as u64).to_be_bytes());
            self.hash.update(p);
        }
    }

    pub(crate) fn finish(self) -> Digest32 {
        Digest32 {
            count: self.count,
            sha256: self.hash.finalize().into(),
        }
    }
}

/// Counts and hashes everything `store copy` moves, in the engines' common order.
pub fn summarize(store: &dyn TokenStore) -> Result<Summary, StoreError> {
    let mut registry = Running::default();
    for k in store.keys()? {
        registry.add(&[&encode_key(&k)]);
    }
    let mut meta = Running::default();
    let mut after: Option<String> = None;
    loop {
        let page = store.meta_page(after.as_deref(), PAGE)?;
        let Some((last, _)) = page.last() else { break };
        after = Some(last.clone());
        for (k, v) in page.iter().filter(|(k, _)| k != COPY_STATE) {
            meta.add(&[k.as_bytes(), v]);
        }
    }
    let mut records: BTreeMap<u32, Running> = BTreeMap::new();
    let mut after: Option<RecordId> = None;
    loop {
        let page = store.scan_records(after.as_ref(), PAGE)?;
        let Some(last) = page.last() else { break };
        after = Some(last.meta.id.clone());
        for r in &page {
            records
                .entry(r.key_version)
                .or_default()
                .add(&[&encode_record(r)]);
        }
    }
    let mut audit = BTreeMap::new();
    for chain in store.audit_chains()? {
        let mut events = Running::default();
        let mut next = 0;
        loop {
            let page = store.chain_events(&chain, next, PAGE)?;
            let Some((last, _)) = page.last() else { break };
            next = last + 1;
            for (seq, bytes) in &page {
                events.add(&[&seq.to_be_bytes(), bytes]);
            }
        }
        if events.count > 0 {
            audit.insert(chain, events.finish());
        }
    }
    let some = |r: Running| (r.count > 0).then(|| r.finish());
    Ok(Summary {
        registry: some(registry),
        records: records.into_iter().map(|(v, r)| (v, r.finish())).collect(),
        meta: some(meta),
        audit,
    })
}

/// What differs between two summaries, in words.
fn differences(source: &Summary, target: &Summary) -> String {
    let mut out = Vec::new();
    let count = |d: Option<&Digest32>| d.map_or(0, |d| d.count);
    if source.registry != target.registry {
        out.push("the key registry".to_string());
    }
    let versions: std::collections::BTreeSet<_> =
        source.records.keys().chain(target.records.keys()).collect();
    for v in versions {
        let (s, t) = (source.records.get(v), target.records.get(v));
        if s != t {
            out.push(format!(
                "records under key v{v} ({} in the source, {} in the target)",
                count(s),
                count(t)
            ));
        }
    }
    if source.meta != target.meta {
        out.push(format!(
            "metadata ({} entries in the source, {} in the target)",
            count(source.meta.as_ref()),
            count(target.meta.as_ref())
        ));
    }
    let chains: std::collections::BTreeSet<_> =
        source.audit.keys().chain(target.audit.keys()).collect();
    for c in chains {
        let (s, t) = (source.audit.get(c), target.audit.get(c));
        if s != t {
            out.push(format!(
                "audit chain {c:?} ({} events in the source, {} in the target)",
                count(s),
                count(t)
            ));
        }
    }
    out.join("; ")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::keys::{KeyId, KeyInfo, KeyState};
    use crate::prelude::*;
    use crate::record::{RecordMeta, SecretKind};
    use crate::{AuditAppend, MemoryStore, Mutation, RecordWrite};

    fn filled() -> MemoryStore {
        let store = MemoryStore::new();
        store
            .put_keys_unaudited(&[KeyInfo {
                version: 1,
                id: KeyId([1; 32]),
                state: KeyState::Active,
                created_at: 1,
                updated_at: 1,
                spki_der: vec![1],
                destroy_after: None,
            }])
            .expect("keys");
        let writes: Vec<_> = (0..700)
            .map(|i| RecordWrite {
                meta: RecordMeta::parse(
                    &format!("r{i:04}"),
                    "o",
                    "github",
                    SecretKind::AccessToken,
                    &[],
                    0,
                )
                .expect("meta"),
                envelope: vec![i as u8; 40],
                key_version: 1,
                expected_version: 0,
            })
            .collect();
        store.put_records(&writes, 10).expect("records");
        store
            .apply(
                &[Mutation::PutGrant {
                    id: "g".into(),
                    grant: b"grant".to_vec(),
                    expected: None,
                }],
                &[AuditAppend {
                    seq: 1,
                    bytes: b"event-1".to_vec(),
                }],
                1,
            )
            .expect("grant");
        store
            .import(&Import {
                audit: (1..=300)
                    .map(|s| ("other".to_string(), s, vec![s as u8]))
                    .collect(),
                ..Import::default()
            })
            .expect("other chain");
        store
    }

    fn options() -> CopyOptions {
        CopyOptions {
            source_name: "memory:a".into(),
            stop_after_pages: None,
        }
    }

    #[test]
    fn a_copy_is_equal_to_its_source_and_servable() {
        let (from, to) = (filled(), MemoryStore::new());
        let mut seen = Vec::new();
        let report = copy(&from, &to, &options(), &mut |p| seen.push(p.clone())).expect("copy");
        assert!(!report.resumed);
        assert_eq!(report.summary, summarize(&to).expect("summary"));
        assert_eq!(report.summary.records[&1].count, 700);
        assert_eq!(report.summary.audit["other"].count, 300);
        assert_eq!(report.summary.audit[""].count, 1);
        assert!(!unfinished(&to).expect("state"));
        assert!(seen.contains(&Progress {
            phase: Phase::Records,
            done: 700,
            total: Some(700)
        }));
        // A second copy into the same target is refused: it is not empty.
        assert!(matches!(
            copy(&from, &to, &options(), &mut |_| {}),
            Err(CopyError::TargetNotEmpty)
        ));
    }

    #[test]
    fn an_interrupted_copy_is_unservable_and_resumes_from_its_source_only() {
        let (from, to) = (filled(), MemoryStore::new());
        for stop in [1, 2, 3] {
            let interrupted = CopyOptions {
                stop_after_pages: Some(stop),
                ..options()
            };
            assert!(matches!(
                copy(&from, &to, &interrupted, &mut |_| {}),
                Err(CopyError::Interrupted(_))
            ));
            assert!(unfinished(&to).expect("state"));
        }
        let elsewhere = CopyOptions {
            source_name: "memory:b".into(),
            ..options()
        };
        assert!(matches!(
            copy(&from, &to, &elsewhere, &mut |_| {}),
            Err(CopyError::OtherCopy(s)) if s == "memory:a"
        ));
        // Copying from the unfinished target is refused too.
        assert!(matches!(
            copy(&to, &MemoryStore::new(), &options(), &mut |_| {}),
            Err(CopyError::SourceIncomplete)
        ));
        let report = copy(&from, &to, &options(), &mut |_| {}).expect("resume");
        assert!(report.resumed);
        assert_eq!(summarize(&from), summarize(&to));
        assert!(!unfinished(&to).expect("state"));
    }

    #[test]
    fn a_difference_found_after_the_copy_keeps_the_target_unservable() {
        let (from, to) = (filled(), MemoryStore::new());
        // The source changes between the pages and the verification: stop before the last
        // page, change the source's audit chain, resume.
        let first = CopyOptions {
            stop_after_pages: Some(4),
            ..options()
        };
        assert!(copy(&from, &to, &first, &mut |_| {}).is_err());
        from.put_meta("zzz-late", Some(b"late")).expect("late");
        from.put_meta("a-late", Some(b"late")).expect("late");
        let err = copy(&from, &to, &options(), &mut |_| {}).expect_err("mismatch");
        assert!(
            matches!(&err, CopyError::Mismatch(m) if m.contains("metadata")),
            "{err}"
        );
        assert!(unfinished(&to).expect("state"));
    }

    #[test]
    fn cursors_round_trip_and_garbage_is_refused() {
        let c = Cursor {
            source: "postgres://u@h/db".into(),
            phase: Phase::Audit,
            after: "chain\u{0}12".into(),
        };
        assert_eq!(Cursor::decode(&c.encode()), Some(c));
        assert_eq!(Cursor::decode(b"phase=nope\n"), None);
        let to = MemoryStore::new();
        to.put_meta(COPY_STATE, Some(b"garbage")).expect("meta");
        assert!(matches!(
            copy(&filled(), &to, &options(), &mut |_| {}),
            Err(CopyError::BadCursor)
        ));
    }
}
