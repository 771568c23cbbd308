//! The rules of [`RecordStore::apply`](super::RecordStore::apply), written once for every
//! engine: what each [`Mutation`] requires of the stored state (version checks, the grant
//! compare-and-swap, one replay marker per event, no record under a retired key) and what it
//! leaves. An engine reads what [`reads`] names (under its own lock or row locks), runs [`plan`]
//! over that state and writes the [`Changes`], each as a before/after pair, with the audit
//! events in one atomic write.
//!
//! Owns no I/O and no engine type: it must never read or write a store itself, so the three
//! engines cannot drift apart in what they accept.

use std::collections::HashMap;

use super::{
    Mutation, StoreError, grant_key, plan_mark_needs_reauth, plan_writes, replay_key, replay_value,
    short_id,
};
use crate::keys::KeyState;
use crate::record::{Record, RecordId};

/// What [`plan`] may read for a list of mutations: an engine that fetches state up front (one
/// query per table) fetches exactly these.
// Read up front only by the database engines, which the web-tier build leaves out.
#[derive(Debug, Default)]
pub(crate) struct Reads {
    /// Records, by id, each once.
    pub(crate) records: Vec<RecordId>,
    /// Metadata keys (grants under [`grant_key`], replay markers under [`replay_key`]).
    pub(crate) meta: Vec<String>,
    /// Key versions whose registry state a record write checks.
    pub(crate) key_versions: Vec<u32>,
}

/// The state of `mutations`' [`Reads`] as [`plan`] needs it.
pub(crate) trait State {
    /// The stored record `id`.
    fn record(&mut self, id: &RecordId) -> Result<Option<Record>, StoreError>;
    /// The registry state of key `version` (`None`: not registered).
    fn key_state(&mut self, version: u32) -> Result<Option<KeyState>, StoreError>;
    /// The stored metadata value under `key`.
    fn meta(&mut self, key: &str) -> Result<Option<Vec<u8>>, StoreError>;
}

/// One stored value as the write found it and as it leaves it (`None`: absent).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Change<T> {
    /// As stored before the write: what an engine checks or locks, and unindexes.
    pub(crate) before: Option<T>,
    /// As the write leaves it.
    pub(crate) after: Option<T>,
}

/// Everything a list of mutations changes, in the order each value was first touched; values
/// left as they were are not listed.
#[derive(Debug, Default)]
pub(crate) struct Changes {
    /// Records by id.
    pub(crate) records: Vec<(RecordId, Change<Record>)>,
    /// Metadata values by key.
    pub(crate) meta: Vec<(String, Change<Vec<u8>>)>,
}

/// The [`Reads`] of `mutations`.
// Read up front only by the database engines, which the web-tier build leaves out.
pub(crate) fn reads(mutations: &[Mutation]) -> Reads {
    let mut r = Reads::default();
    for m in mutations {
        match m {
            Mutation::PutRecord(w) => {
                r.records.push(w.meta.id.clone());
                r.key_versions.push(w.key_version);
            }
            Mutation::Revoke(id)
            | Mutation::DeleteRecord(id)
            | Mutation::MarkNeedsReauth { id, .. } => r.records.push(id.clone()),
            Mutation::PutGrant { id, .. } | Mutation::DeleteGrant(id) => {
                r.meta.push(grant_key(id));
            }
            Mutation::PutReplayMarker { key, .. } => r.meta.push(replay_key(key)),
            Mutation::PutApproval { id, .. } => r.meta.push(crate::approval_key(id)),
            Mutation::PutSetting { name, .. } => r.meta.push(crate::setting_key(name)),
            Mutation::PutOutbox { key, .. } => r.meta.push(crate::outbox_key(key)),
        }
    }
    r.records.sort_unstable();
    r.records.dedup();
    r.meta.sort_unstable();
    r.meta.dedup();
    r.key_versions.sort_unstable();
    r.key_versions.dedup();
    r
}

/// Values as the mutations planned so far leave them, over the stored state.
struct Overlay<'s> {
    state: &'s mut dyn State,
    records: Vec<(RecordId, Change<Record>)>,
    record_at: HashMap<RecordId, usize>,
    meta: Vec<(String, Change<Vec<u8>>)>,
    meta_at: HashMap<String, usize>,
}

impl Overlay<'_> {
    fn record(&mut self, id: &RecordId) -> Result<&mut Change<Record>, StoreError> {
        let i = match self.record_at.get(id) {
            Some(&i) => i,
            None => {
                let stored = self.state.record(id)?;
                self.records.push((
                    id.clone(),
                    Change {
                        before: stored.clone(),
                        after: stored,
                    },
                ));
                self.record_at.insert(id.clone(), self.records.len() - 1);
                self.records.len() - 1
            }
        };
        Ok(&mut self.records[i].1)
    }

    fn meta(&mut self, key: String) -> Result<&mut Change<Vec<u8>>, StoreError> {
        let i = match self.meta_at.get(&key) {
            Some(&i) => i,
            None => {
                let stored = self.state.meta(&key)?;
                self.meta.push((
                    key.clone(),
                    Change {
                        before: stored.clone(),
                        after: stored,
                    },
                ));
                self.meta_at.insert(key, self.meta.len() - 1);
                self.meta.len() - 1
            }
        };
        Ok(&mut self.meta[i].1)
    }
}

/// Plans `mutations` in order, each seeing the ones before it, over `state`: the changes to
/// write, or the first mutation's refusal (then nothing may be written). `now` (Unix seconds)
/// stamps the records changed. `audited` says whether audit events go in the same write:
/// without them a record change is refused (`Unaudited`), so no engine can write one.
pub(crate) fn plan(
    mutations: &[Mutation],
    now: i64,
    state: &mut dyn State,
    audited: bool,
) -> Result<Changes, StoreError> {
    let mut o = Overlay {
        state,
        records: Vec::new(),
        record_at: HashMap::new(),
        meta: Vec::new(),
        meta_at: HashMap::new(),
    };
    for m in mutations {
        match m {
            Mutation::PutRecord(w) => {
                let current = o.record(&w.meta.id)?.after.clone();
                let planned = plan_writes(
                    std::slice::from_ref(w),
                    now,
                    |_| Ok(current.clone()),
                    |v| o.state.key_state(v),
                )?;
                // A repeat of the write that made the stored version plans nothing.
                if let Some(r) = planned.records.into_iter().next() {
                    o.record(&w.meta.id)?.after = Some(r);
                }
            }
            Mutation::Revoke(id) => {
                let c = o.record(id)?;
                let r = c
                    .after
                    .as_mut()
                    .ok_or_else(|| StoreError::NotFound(id.to_string()))?;
                if !r.revoked {
                    r.revoked = true;
                    r.updated_at = now;
                    r.version += 1;
                }
            }
            Mutation::MarkNeedsReauth {
                id,
                expected_version,
            } => {
                let c = o.record(id)?;
                c.after = Some(plan_mark_needs_reauth(
                    c.after.take(),
                    id,
                    *expected_version,
                    now,
                )?);
            }
            Mutation::DeleteRecord(id) => {
                let c = o.record(id)?;
                if c.after.take().is_none() {
                    return Err(StoreError::NotFound(id.to_string()));
                }
            }
            Mutation::PutGrant {
                id,
                grant,
                expected,
            } => {
                let c = o.meta(grant_key(id))?;
                if c.after != *expected {
                    return Err(StoreError::Conflict(format!("grant {}", short_id(id))));
                }
                c.after = Some(grant.clone());
            }
            Mutation::DeleteGrant(id) => o.meta(grant_key(id))?.after = None,
            Mutation::PutApproval {
                id,
                request,
                expected,
            } => {
                let c = o.meta(crate::approval_key(id))?;
                if c.after != *expected {
                    return Err(StoreError::Conflict(format!(
                        "approval request {}",
                        short_id(id)
                    )));
                }
                c.after = request.clone();
            }
            Mutation::PutSetting {
                name,
                value,
                expected,
            } => {
                let c = o.meta(crate::setting_key(name))?;
                if c.after != *expected {
                    return Err(StoreError::Conflict(format!("setting {name}")));
                }
                c.after = Some(value.clone());
            }
            Mutation::PutOutbox {
                key,
                value,
                expected,
            } => {
                let c = o.meta(crate::outbox_key(key))?;
                if c.after != *expected {
                    return Err(StoreError::Conflict(format!("outbox entry {key}")));
                }
                c.after = value.clone();
            }
            Mutation::PutReplayMarker { key, at } => {
                let c = o.meta(replay_key(key))?;
                if c.after.is_some() {
                    return Err(StoreError::AlreadyExists(format!("replay marker {key}")));
                }
                c.after = Some(replay_value(*at).to_vec());
            }
        }
    }
    let mut changes = Changes {
        records: o.records,
        meta: o.meta,
    };
    changes.records.retain(|(_, c)| c.before != c.after);
    changes.meta.retain(|(_, c)| c.before != c.after);
    if !audited && !changes.records.is_empty() {
        return Err(StoreError::Unaudited);
    }
    Ok(changes)
}

/// A [`State`] fetched up front (an engine that reads [`reads`] in a few queries): what was not
/// fetched reads as absent, which is what the fetch found.
// Read up front only by the database engines, which the web-tier build leaves out.
#[derive(Debug, Default)]
pub(crate) struct Fetched {
    /// Records found, by id.
    pub(crate) records: HashMap<RecordId, Record>,
    /// Registry states found, by version.
    pub(crate) key_states: HashMap<u32, KeyState>,
    /// Metadata values found, by key.
    pub(crate) meta: HashMap<String, Vec<u8>>,
}

impl State for Fetched {
    fn record(&mut self, id: &RecordId) -> Result<Option<Record>, StoreError> {
        Ok(self.records.get(id).cloned())
    }

    fn key_state(&mut self, version: u32) -> Result<Option<KeyState>, StoreError> {
        Ok(self.key_states.get(&version).copied())
    }

    fn meta(&mut self, key: &str) -> Result<Option<Vec<u8>>, StoreError> {
        Ok(self.meta.get(key).cloned())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::RecordWrite;
    use crate::record::{RecordMeta, SecretKind};

    fn write(id: &str, expected: u64) -> RecordWrite {
        RecordWrite {
            meta: RecordMeta::parse(id, "o", "github", SecretKind::AccessToken, &[], 0)
                .expect("valid"),
            envelope: id.as_bytes().to_vec(),
            key_version: 1,
            expected_version: expected,
        }
    }

    fn rid(id: &str) -> RecordId {
        RecordId::parse(id).expect("valid")
    }

    fn active() -> Fetched {
        Fetched {
            key_states: [(1, KeyState::Active)].into(),
            ..Fetched::default()
        }
    }

    #[test]
    fn each_mutation_sees_the_ones_before_it_and_only_final_values_are_listed() {
        let mut state = active();
        let changes = plan(
            &[
                Mutation::PutRecord(write("a", 0)),
                Mutation::Revoke(rid("a")),
                Mutation::PutRecord(write("b", 0)),
                Mutation::DeleteRecord(rid("b")),
                Mutation::PutReplayMarker {
                    key: "k".into(),
                    at: 5,
                },
            ],
            9,
            &mut state,
            true,
        )
        .expect("plan");
        // "b" was created and deleted: nothing to write for it.
        assert_eq!(changes.records.len(), 1);
        let (id, c) = &changes.records[0];
        assert_eq!(id.as_str(), "a");
        assert_eq!(c.before, None);
        let a = c.after.as_ref().expect("created");
        assert!(a.revoked);
        assert_eq!(a.version, 2);
        assert_eq!(changes.meta.len(), 1);
        // A second marker for the same event in the same write is refused like a stored one.
        let again = Mutation::PutReplayMarker {
            key: "k".into(),
            at: 6,
        };
        let first = Mutation::PutReplayMarker {
            key: "k".into(),
            at: 5,
        };
        assert!(matches!(
            plan(&[first, again], 9, &mut active(), true),
            Err(StoreError::AlreadyExists(_))
        ));
    }

    #[test]
    fn a_record_change_without_audit_events_is_refused_and_other_changes_are_not() {
        let put = Mutation::PutRecord(write("a", 0));
        assert_eq!(
            plan(std::slice::from_ref(&put), 9, &mut active(), false).map(|_| ()),
            Err(StoreError::Unaudited)
        );
        assert!(plan(&[put], 9, &mut active(), true).is_ok());
        // Grant upkeep (an expired grant swept) is not a record change.
        assert!(
            plan(
                &[Mutation::DeleteGrant("g".into())],
                9,
                &mut active(),
                false
            )
            .is_ok()
        );
    }

    #[test]
    fn the_reads_name_everything_the_plan_reads() {
        let mutations = [
            Mutation::PutRecord(write("a", 0)),
            Mutation::MarkNeedsReauth {
                id: rid("b"),
                expected_version: 1,
            },
            Mutation::DeleteGrant("g".into()),
            Mutation::Revoke(rid("a")),
        ];
        let r = reads(&mutations);
        assert_eq!(r.records, vec![rid("a"), rid("b")]);
        assert_eq!(r.meta, vec![grant_key("g")]);
        assert_eq!(r.key_versions, vec![1]);
    }
}
