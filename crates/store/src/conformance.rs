//! Behaviour every [`TokenStore`] must have: the one suite each implementation runs (this
//! crate's `MemoryStore` and `RocksStore`, and any other engine). Public behind the `testing`
//! feature, so a store written elsewhere runs the very same checks:
//!
//! ```ignore
//! tokenvault::store::conformance::all(|| Box::new(MyStore::fresh()));
//! ```
//!
//! Each check takes an empty store.

use super::*;
use crate::keys::{KeyId, KeyState};
use crate::record::SecretKind;

fn write(id: &str, owner: &str, expected: u64) -> RecordWrite {
    RecordWrite {
        meta: RecordMeta::parse(id, owner, "github", SecretKind::AccessToken, &[], 0)
            .expect("valid"),
        envelope: format!("envelope-of-{id}").into_bytes(),
        key_version: 1,
        expected_version: expected,
    }
}

/// An audit event for a record change whose event the check does not look at: sequence
/// numbers far above any a check writes itself, each used once per process.
fn event() -> AuditAppend {
    static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1 << 40);
    let seq = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    AuditAppend {
        seq,
        bytes: format!("event {seq}").into_bytes(),
    }
}

fn rid(id: &str) -> RecordId {
    RecordId::parse(id).expect("valid")
}

/// Create, read, version-checked replace, owner index.
pub fn create_read_replace(store: &dyn TestHooks) {
    assert_eq!(store.put_records(&[write("a", "o1", 0)], 100), Ok(vec![1]));
    let r = store.get_record(&rid("a")).expect("get").expect("present");
    assert_eq!(
        (r.version, r.created_at, r.updated_at, r.revoked),
        (1, 100, 100, false)
    );
    assert_eq!(r.envelope, b"envelope-of-a");
    // The very same write again (a sealer's blind retry) answers the stored version and
    // writes nothing.
    assert_eq!(store.put_records(&[write("a", "o1", 0)], 101), Ok(vec![1]));
    assert_eq!(store.get_record(&rid("a")).expect("get"), Some(r.clone()));
    // Another create over an existing id (other envelope, or other metadata), and a stale
    // replace, refuse and change nothing.
    let mut other = write("a", "o1", 0);
    other.envelope = b"another".to_vec();
    assert_eq!(
        store.put_records(&[other], 101),
        Err(StoreError::AlreadyExists("a".into()))
    );
    assert_eq!(
        store.put_records(&[write("a", "o-other", 0)], 101),
        Err(StoreError::AlreadyExists("a".into()))
    );
    assert_eq!(
        store.put_records(&[write("a", "o1", 7)], 101),
        Err(StoreError::VersionMismatch {
            id: "a".into(),
            expected: 7,
            actual: 1
        })
    );
    assert_eq!(
        store.put_records(&[write("zz", "o1", 3)], 101),
        Err(StoreError::VersionMismatch {
            id: "zz".into(),
            expected: 3,
            actual: 0
        })
    );
    assert_eq!(store.get_record(&rid("a")).expect("get"), Some(r.clone()));
    let mut w = write("a", "o2", 1);
    w.envelope = b"new".to_vec();
    assert_eq!(store.put_records(&[w], 102), Ok(vec![2]));
    let r2 = store.get_record(&rid("a")).expect("get").expect("present");
    assert_eq!((r2.version, r2.created_at, r2.updated_at), (2, 100, 102));
    assert_eq!(r2.envelope, b"new");
    // Once replaced, repeating the create is refused; repeating the replace is not.
    assert_eq!(
        store.put_records(&[write("a", "o1", 0)], 103),
        Err(StoreError::AlreadyExists("a".into()))
    );
    let mut again = write("a", "o2", 1);
    again.envelope = b"new".to_vec();
    assert_eq!(store.put_records(&[again.clone()], 103), Ok(vec![2]));
    assert_eq!(
        store.put_record_groups(&[&[again.clone()]], 103, Recorder::after(store)),
        Ok(vec![Ok(vec![2])])
    );
    assert_eq!(store.get_record(&rid("a")).expect("get"), Some(r2.clone()));
    // Not after the record changed since (here: revoked).
    store
        .apply(&[Mutation::Revoke(rid("a"))], &[event()], 104)
        .expect("revoke");
    assert!(matches!(
        store.put_records(&[again], 105),
        Err(StoreError::VersionMismatch { actual: 3, .. })
    ));
    // The owner moved with the replace: deleting the old owner leaves it alone.
    assert_eq!(
        store.delete_owner(&Owner::parse("o1").expect("valid"), None, &event(), &[]),
        Ok(0)
    );
    assert_eq!(
        store.delete_owner(&Owner::parse("o2").expect("valid"), None, &event(), &[]),
        Ok(1)
    );
    assert_eq!(store.get_record(&rid("a")), Ok(None));
}

/// Record batches are all or nothing.
pub fn batches_are_atomic(store: &dyn TestHooks) {
    let mut seed = write("existing", "o", 0);
    seed.envelope = b"the seed's own envelope".to_vec();
    store.put_records(&[seed], 1).expect("seed");
    let bad = [
        write("n1", "o", 0),
        write("n2", "o", 0),
        write("existing", "o", 0),
    ];
    assert_eq!(
        store.put_records(&bad, 2),
        Err(StoreError::AlreadyExists("existing".into()))
    );
    let dup = [write("n1", "o", 0), write("n1", "o", 0)];
    assert_eq!(
        store.put_records(&dup, 2),
        Err(StoreError::DuplicateInBatch("n1".into()))
    );
    assert_eq!(store.get_record(&rid("n1")), Ok(None));
    assert_eq!(store.get_record(&rid("n2")), Ok(None));
    let good = [
        write("n1", "o", 0),
        write("n2", "o", 0),
        write("existing", "o", 1),
    ];
    assert_eq!(store.put_records(&good, 3), Ok(vec![1, 1, 2]));
    assert_eq!(store.stats().expect("stats").records, 3);
}

/// Revoke, delete, delete by owner, counts.
pub fn revoke_delete_and_stats(store: &dyn TestHooks) {
    store
        .put_records(
            &[
                write("r1", "alice", 0),
                write("r2", "alice", 0),
                write("r3", "bob", 0),
            ],
            1,
        )
        .expect("seed");
    let r = store.revoke(&rid("r1"), 5, &event()).expect("revoke");
    assert!(r.revoked);
    assert_eq!(r.version, 2);
    assert_eq!(
        store
            .revoke(&rid("r1"), 6, &event())
            .expect("idempotent")
            .version,
        2
    );
    assert_eq!(
        store.revoke(&rid("nope"), 6, &event()),
        Err(StoreError::NotFound("nope".into()))
    );
    // Needs-reauth is version checked, counted, and cleared by the next write.
    assert!(matches!(
        store.mark_needs_reauth(&rid("r2"), 7, 5, &event()),
        Err(StoreError::VersionMismatch { .. })
    ));
    let marked = store
        .mark_needs_reauth(&rid("r2"), 1, 5, &event())
        .expect("mark");
    assert!(marked.needs_reauth && marked.version == 2);
    assert_eq!(store.get_record(&rid("r2")).expect("get"), Some(marked));
    assert_eq!(
        store.stats(),
        Ok(StoreStats {
            records: 3,
            revoked: 1,
            needs_reauth: 1,
            per_key_version: vec![(1, 3)]
        })
    );
    let rewritten = store
        .put_records(&[write("r2", "alice", 2)], 6)
        .expect("re-authorized");
    assert_eq!(rewritten, vec![3]);
    assert!(
        !store
            .get_record(&rid("r2"))
            .expect("get")
            .expect("r2")
            .needs_reauth
    );
    assert_eq!(store.delete_record(&rid("r3"), &event()), Ok(true));
    assert_eq!(store.delete_record(&rid("r3"), &event()), Ok(false));
    // An owner that is a prefix of another must not take the other's records.
    store
        .put_records(&[write("r4", "alice2", 0)], 1)
        .expect("seed");
    let alice = Owner::parse("alice").expect("valid");
    let mut ids = store.owner_record_ids(&alice).expect("ids");
    ids.sort_by(|a, b| a.as_str().cmp(b.as_str()));
    assert_eq!(ids, vec![rid("r1"), rid("r2")]);
    // With the records the caller read: any other set (one missing, another version, one more)
    // is a conflict that writes nothing, neither the deletion nor its event nor its outbox.
    let version = |id| {
        store
            .get_record(&rid(id))
            .expect("get")
            .expect("kept")
            .version
    };
    let (v1, v2) = (version("r1"), version("r2"));
    let trail = store.audit_events(1, 10_000).expect("events");
    for read in [
        vec![(rid("r1"), v1)],
        vec![(rid("r1"), v1), (rid("r2"), v2 + 1)],
        vec![(rid("r1"), v1), (rid("r2"), v2), (rid("r9"), 1)],
    ] {
        assert!(
            matches!(
                store.delete_owner(
                    &alice,
                    Some(&read),
                    &event(),
                    &[("p/d/1".into(), b"x".to_vec())]
                ),
                Err(StoreError::Conflict(_))
            ),
            "{read:?}"
        );
    }
    assert_eq!(store.audit_events(1, 10_000).expect("events"), trail);
    assert_eq!(store.outbox_page("p/d/", None, 10).expect("outbox"), vec![]);
    assert_eq!(store.owner_record_ids(&alice).expect("ids").len(), 2);
    // In any order.
    assert_eq!(
        store.delete_owner(
            &alice,
            Some(&[(rid("r2"), v2), (rid("r1"), v1)]),
            &event(),
            &[]
        ),
        Ok(2)
    );
    assert_eq!(store.get_record(&rid("r1")), Ok(None));
    assert!(store.get_record(&rid("r4")).expect("get").is_some());
}

/// The key registry.
pub fn key_registry(store: &dyn TestHooks) {
    assert_eq!(store.keys(), Ok(vec![]));
    let key = |version: u32, state| KeyInfo {
        version,
        id: KeyId([version as u8; 32]),
        state,
        created_at: 10,
        updated_at: 11,
        spki_der: vec![1, 2, 3],
        destroy_after: None,
    };
    store
        .put_keys(
            &[key(2, KeyState::Active), key(1, KeyState::DecryptOnly)],
            &event(),
            &[],
        )
        .expect("put");
    store
        .put_keys(&[key(1, KeyState::Retired)], &event(), &[])
        .expect("update");
    assert_eq!(
        store.keys(),
        Ok(vec![key(1, KeyState::Retired), key(2, KeyState::Active)])
    );
}

/// Paged scans, envelope replacement (rewrap), small metadata values.
pub fn scan_replace_and_meta(store: &dyn TestHooks) {
    let ids = ["c", "a", "e", "b", "d"];
    let writes: Vec<_> = ids.iter().map(|id| write(id, "o", 0)).collect();
    store.put_records(&writes, 1).expect("seed");
    let page = |after: Option<&str>, n| -> Vec<String> {
        let after = after.map(rid);
        store
            .scan_records(after.as_ref(), n)
            .expect("scan")
            .into_iter()
            .map(|r| r.meta.id.to_string())
            .collect()
    };
    assert_eq!(page(None, 2), ["a", "b"]);
    assert_eq!(page(Some("b"), 2), ["c", "d"]);
    assert_eq!(page(Some("d"), 10), ["e"]);
    assert_eq!(
        page(Some("bb"), 1),
        ["c"],
        "a cursor need not be an existing id"
    );
    assert!(page(Some("e"), 10).is_empty());

    let item = |id: &str, expected, env: &[u8], kv| EnvelopeReplace {
        id: rid(id),
        expected_version: expected,
        envelope: env.to_vec(),
        key_version: kv,
    };
    let before_rewrap = store.get_record(&rid("a")).expect("get").expect("present");
    let outcomes = store
        .replace_envelopes(
            &[
                item("a", 1, b"rewrapped", 2),
                item("b", 7, b"stale", 2),
                item("zz", 1, b"x", 2),
            ],
            9,
        )
        .expect("engine ok");
    assert_eq!(
        outcomes,
        vec![
            Ok(1),
            Err(StoreError::VersionMismatch {
                id: "b".into(),
                expected: 7,
                actual: 1
            }),
            Err(StoreError::NotFound("zz".into())),
        ]
    );
    let r = store.get_record(&rid("a")).expect("get").expect("present");
    assert_eq!(
        (
            r.envelope.as_slice(),
            r.key_version,
            r.version,
            r.updated_at
        ),
        (&b"rewrapped"[..], 2, 1, before_rewrap.updated_at),
        "a rewrap keeps the version and the update time: only the wrapping moved"
    );
    let b = store.get_record(&rid("b")).expect("get").expect("present");
    assert_eq!(
        (b.envelope.as_slice(), b.version),
        (&b"envelope-of-b"[..], 1),
        "a mismatch is left alone"
    );
    assert_eq!(store.get_record(&rid("zz")), Ok(None));

    assert_eq!(store.get_meta("cursor"), Ok(None));
    store.put_meta("cursor", Some(b"abc")).expect("put");
    assert_eq!(store.get_meta("cursor"), Ok(Some(b"abc".to_vec())));
    store.put_meta("cursor", None).expect("delete");
    assert_eq!(store.get_meta("cursor"), Ok(None));
}

/// Approval requests: created once, changed and removed only from the value read, with their
/// audit event in the same write.
pub fn approvals(store: &dyn TestHooks) {
    let put = |request: Option<&[u8]>, expected: Option<&[u8]>| Mutation::PutApproval {
        id: "req".into(),
        request: request.map(<[u8]>::to_vec),
        expected: expected.map(<[u8]>::to_vec),
    };
    let key = approval_key("req");
    store
        .apply(&[put(Some(b"one"), None)], &[event()], 1)
        .expect("create");
    assert_eq!(store.get_meta(&key), Ok(Some(b"one".to_vec())));
    let before = store.audit_events(0, 100).expect("events").len();
    for (request, expected) in [
        (Some(&b"again"[..]), None),
        (Some(&b"two"[..]), Some(&b"stale"[..])),
        (None, Some(&b"stale"[..])),
    ] {
        let refused = store.apply(&[put(request, expected)], &[event()], 2);
        assert!(
            matches!(refused, Err(StoreError::Conflict(_))),
            "{refused:?}"
        );
    }
    assert_eq!(
        store.audit_events(0, 100).expect("events").len(),
        before,
        "a refused change writes no event"
    );
    store
        .apply(&[put(Some(b"two"), Some(b"one"))], &[event()], 2)
        .expect("swap");
    store
        .apply(&[put(None, Some(b"two"))], &[event()], 3)
        .expect("remove");
    assert_eq!(store.get_meta(&key), Ok(None));
    assert!(
        matches!(
            store.apply(&[put(None, Some(b"two"))], &[event()], 4),
            Err(StoreError::Conflict(_))
        ),
        "removed once"
    );
    // Settings: the same compare-and-swap, never removed.
    let set = |value: &[u8], expected: Option<&[u8]>| Mutation::PutSetting {
        name: "min".into(),
        value: value.to_vec(),
        expected: expected.map(<[u8]>::to_vec),
    };
    store.apply(&[set(b"2", None)], &[event()], 5).expect("set");
    assert!(matches!(
        store.apply(&[set(b"3", None)], &[event()], 6),
        Err(StoreError::Conflict(_))
    ));
    store
        .apply(&[set(b"3", Some(b"2"))], &[event()], 6)
        .expect("change");
    assert_eq!(store.get_meta(&setting_key("min")), Ok(Some(b"3".to_vec())));
}

/// Grants: compare-and-swap puts, idempotent deletes, pages in id order.
pub fn grants(store: &dyn TestHooks) {
    let put = |id: &str, grant: &[u8], expected: Option<&[u8]>| Mutation::PutGrant {
        id: id.into(),
        grant: grant.to_vec(),
        expected: expected.map(<[u8]>::to_vec),
    };
    for id in ["a1", "a2", "a3"] {
        store
            .apply(&[put(id, id.as_bytes(), None)], &[], 1)
            .expect("create");
    }
    // A create over an existing grant, or a swap from a value it no longer has, refuses.
    assert!(matches!(
        store.apply(&[put("a1", b"x", None)], &[], 1),
        Err(StoreError::Conflict(_))
    ));
    assert!(matches!(
        store.apply(&[put("a1", b"x", Some(b"stale"))], &[], 1),
        Err(StoreError::Conflict(_))
    ));
    assert_eq!(store.get_grant("a1"), Ok(Some(b"a1".to_vec())));
    store
        .apply(&[put("a1", b"a1-used", Some(b"a1"))], &[], 2)
        .expect("swap");
    assert_eq!(store.get_grant("a1"), Ok(Some(b"a1-used".to_vec())));
    // Other metadata is not a grant.
    store.put_meta("rewrap_cursor", Some(b"c")).expect("meta");
    let ids = |page: Vec<(String, Vec<u8>)>| page.into_iter().map(|(k, _)| k).collect::<Vec<_>>();
    assert_eq!(ids(store.grant_page(None, 2).expect("page")), ["a1", "a2"]);
    assert_eq!(ids(store.grant_page(Some("a2"), 2).expect("page")), ["a3"]);
    assert!(store.grant_page(Some("a3"), 2).expect("page").is_empty());
    store
        .apply(
            &[
                Mutation::DeleteGrant("a1".into()),
                Mutation::DeleteGrant("a3".into()),
                Mutation::DeleteGrant("absent".into()),
            ],
            &[],
            3,
        )
        .expect("delete");
    assert_eq!(ids(store.grant_page(None, 10).expect("page")), ["a2"]);
    assert_eq!(store.get_grant("a1"), Ok(None));
    assert_eq!(store.get_meta("rewrap_cursor"), Ok(Some(b"c".to_vec())));
}

/// `apply`: all or nothing with its audit events; each mutation sees the ones before it.
pub fn apply_is_atomic_and_audited(store: &dyn TestHooks) {
    store
        .put_records(&[write("r1", "o", 0), write("r2", "o", 0)], 1)
        .expect("put");
    let audit = |seq: u64| AuditAppend {
        seq,
        bytes: format!("event-{seq}").into_bytes(),
    };
    let marker = |key: &str| Mutation::PutReplayMarker {
        key: key.into(),
        at: 5,
    };
    store
        .apply(
            &[
                Mutation::Revoke(rid("r1")),
                Mutation::DeleteRecord(rid("r2")),
                marker("event-a"),
            ],
            &[audit(1), audit(2), audit(3)],
            5,
        )
        .expect("apply");
    let r1 = store.get_record(&rid("r1")).expect("get").expect("r1");
    assert_eq!((r1.revoked, r1.version, r1.updated_at), (true, 2, 5));
    assert_eq!(store.get_record(&rid("r2")), Ok(None));
    assert_eq!(
        store
            .audit_events(1, 10)
            .expect("events")
            .into_iter()
            .map(|(seq, _)| seq)
            .collect::<Vec<_>>(),
        [1, 2, 3]
    );
    // A replayed marker, a missing record or a stale version refuses the whole batch: the
    // changes before it and the audit events are not written.
    store.put_records(&[write("r3", "o", 0)], 6).expect("put");
    for (bad, expect_err) in [
        (marker("event-a"), "AlreadyExists"),
        (Mutation::Revoke(rid("gone")), "NotFound"),
        (Mutation::PutRecord(write("r3", "o", 7)), "VersionMismatch"),
    ] {
        let err = store
            .apply(
                &[
                    Mutation::Revoke(rid("r3")),
                    Mutation::PutGrant {
                        id: "g".into(),
                        grant: b"g".to_vec(),
                        expected: None,
                    },
                    bad,
                ],
                &[audit(4)],
                7,
            )
            .expect_err("refused");
        assert!(format!("{err:?}").starts_with(expect_err), "{err:?}");
        let r3 = store.get_record(&rid("r3")).expect("get").expect("r3");
        assert_eq!((r3.revoked, r3.version), (false, 1));
        assert_eq!(store.get_grant("g"), Ok(None));
        assert_eq!(store.audit_events(4, 10), Ok(vec![]));
    }
    // A record written and then revoked in one batch.
    store
        .apply(
            &[
                Mutation::PutRecord(write("r4", "o", 0)),
                Mutation::Revoke(rid("r4")),
            ],
            &[audit(4)],
            8,
        )
        .expect("apply");
    let r4 = store.get_record(&rid("r4")).expect("get").expect("r4");
    assert_eq!((r4.revoked, r4.version), (true, 2));
}

/// A registry entry of `version` in `state` (fingerprint and SPKI made of the version byte).
fn key(version: u32, state: KeyState) -> KeyInfo {
    KeyInfo {
        version,
        id: KeyId([version as u8; 32]),
        spki_der: vec![version as u8],
        state,
        created_at: 1,
        updated_at: 1,
        destroy_after: None,
    }
}

/// Retiring a key version is refused while records use it, and record writes are refused
/// under a retired or destroyed version: no interleaving strands a record.
pub fn retire_is_atomic_with_record_writes(store: &dyn TestHooks) {
    store
        .put_keys(
            &[key(1, KeyState::DecryptOnly), key(2, KeyState::Active)],
            &event(),
            &[],
        )
        .expect("keys");
    store.put_records(&[write("v1", "o", 0)], 1).expect("put");
    assert_eq!(
        store.retire_key(&key(1, KeyState::Retired), &event()),
        Err(StoreError::KeyInUse {
            version: 1,
            records: 1
        })
    );
    assert_eq!(store.keys().expect("keys")[0].state, KeyState::DecryptOnly);
    store.delete_record(&rid("v1"), &event()).expect("delete");
    store
        .retire_key(
            &key(1, KeyState::Retired),
            &AuditAppend {
                seq: 1,
                bytes: b"retired".to_vec(),
            },
        )
        .expect("retire");
    assert_eq!(store.keys().expect("keys")[0].state, KeyState::Retired);
    assert_eq!(store.audit_events(1, 1).expect("events").len(), 1);
    // Now no write may land under v1, singly, in a group or through apply.
    let refused = StoreError::KeyNotAccepted {
        version: 1,
        state: KeyState::Retired,
    };
    assert_eq!(
        store.put_records(&[write("late", "o", 0)], 2),
        Err(refused.clone())
    );
    assert_eq!(
        store.put_record_groups(&[&[write("late", "o", 0)]], 2, Recorder::after(store)),
        Ok(vec![Err(refused.clone())])
    );
    assert_eq!(
        store.apply(&[Mutation::PutRecord(write("late", "o", 0))], &[], 2),
        Err(refused)
    );
    let mut v2 = write("late", "o", 0);
    v2.key_version = 2;
    store
        .put_records(&[v2], 2)
        .expect("active version accepted");
}

/// A [`GroupAudit`] that seals one event per accepted record, `group:id:version` as its bytes,
/// from the sequence number after the store's last event.
struct Recorder {
    first: u64,
}

impl Recorder {
    fn after(store: &dyn TestHooks) -> Arc<Self> {
        let last = store
            .last_audit_event()
            .expect("last event")
            .map_or(0, |(s, _)| s);
        Arc::new(Self { first: last + 1 })
    }
}

impl GroupAudit for Recorder {
    fn seal(&self, accepted: &[(usize, &[Record])]) -> Vec<AuditAppend> {
        accepted
            .iter()
            .flat_map(|(g, records)| records.iter().map(move |r| (*g, r)))
            .zip(self.first..)
            .map(|((g, r), seq)| AuditAppend {
                seq,
                bytes: format!("{g}:{}:{}", r.meta.id, r.version).into_bytes(),
            })
            .collect()
    }
}

/// Group commit: independent outcomes, later groups see earlier ones, refusals change nothing,
/// and exactly the accepted records get their audit events, in the same write.
pub fn group_commit(store: &dyn TestHooks) {
    let mut seed = write("taken", "o", 0);
    seed.envelope = b"the seed's own envelope".to_vec();
    store.put_records(&[seed], 1).expect("seed");
    let a = [write("g1", "o", 0), write("g2", "o", 0)];
    let refused = [write("g3", "o", 0), write("taken", "o", 0)];
    let replace_g1 = [write("g1", "o2", 1)];
    let stale = [write("g1", "o", 1)];
    let recorder = Recorder::after(store);
    let first = recorder.first;
    let outcomes = store
        .put_record_groups(&[&a, &refused, &replace_g1, &stale], 2, recorder)
        .expect("commit");
    let events: Vec<(u64, String)> = store
        .audit_events(first, 100)
        .expect("events")
        .into_iter()
        .map(|(seq, b)| (seq, String::from_utf8(b).expect("utf-8")))
        .collect();
    assert_eq!(
        events,
        vec![
            (first, "0:g1:1".to_string()),
            (first + 1, "0:g2:1".to_string()),
            (first + 2, "2:g1:2".to_string()),
        ]
    );
    // A commit that accepts nothing writes no event.
    let outcomes_none = store
        .put_record_groups(&[&stale], 3, Recorder::after(store))
        .expect("commit");
    assert!(outcomes_none[0].is_err());
    assert_eq!(store.audit_events(first + 3, 10).expect("events"), vec![]);
    assert_eq!(outcomes[0], Ok(vec![1, 1]));
    assert_eq!(outcomes[1], Err(StoreError::AlreadyExists("taken".into())));
    assert_eq!(outcomes[2], Ok(vec![2]));
    assert!(matches!(
        outcomes[3],
        Err(StoreError::VersionMismatch { actual: 2, .. })
    ));
    // The refused group wrote nothing, not even its valid item.
    assert_eq!(store.get_record(&rid("g3")), Ok(None));
    let g1 = store.get_record(&rid("g1")).expect("get").expect("g1");
    assert_eq!((g1.version, g1.meta.owner.as_str()), (2, "o2"));
    // The owner index follows the replace.
    assert_eq!(
        store
            .owner_record_ids(&Owner::parse("o2").expect("owner"))
            .expect("ids"),
        vec![rid("g1")]
    );
}

/// What `store copy` relies on: metadata listed in key order across pages (grants and replay
/// markers under their shared keys), and an import written as it is, over what is there.
pub fn import_and_listing(store: &dyn TestHooks) {
    store
        .apply(
            &[
                Mutation::PutGrant {
                    id: "g1".into(),
                    grant: b"grant-1".to_vec(),
                    expected: None,
                },
                Mutation::PutReplayMarker {
                    key: "m1".into(),
                    at: 77,
                },
            ],
            &[],
            1,
        )
        .expect("apply");
    store.put_meta("cursor", Some(b"c")).expect("meta");
    let expected = vec![
        ("cursor".to_string(), b"c".to_vec()),
        (grant_key("g1"), b"grant-1".to_vec()),
        (replay_key("m1"), replay_value(77).to_vec()),
    ];
    assert_eq!(store.meta_page(None, 10), Ok(expected.clone()));
    let mut paged = Vec::new();
    let mut after: Option<String> = None;
    loop {
        let page = store.meta_page(after.as_deref(), 1).expect("page");
        let Some(last) = page.last() else { break };
        after = Some(last.0.clone());
        paged.extend(page);
    }
    assert_eq!(paged, expected);

    let record = |owner: &str| Record {
        meta: RecordMeta::parse("imp", owner, "github", SecretKind::AccessToken, &[], 0)
            .expect("valid"),
        envelope: b"imported-envelope".to_vec(),
        key_version: 3,
        created_at: 5,
        updated_at: 9,
        revoked: true,
        needs_reauth: true,
        version: 7,
    };
    let key = KeyInfo {
        version: 3,
        id: KeyId([3; 32]),
        state: KeyState::DecryptOnly,
        created_at: 1,
        updated_at: 2,
        spki_der: vec![3],
        destroy_after: None,
    };
    let batch = Import {
        records: vec![record("o1")],
        keys: vec![key.clone()],
        meta: vec![
            (grant_key("g2"), b"grant-2".to_vec()),
            (replay_key("m2"), replay_value(88).to_vec()),
            ("other".into(), b"v".to_vec()),
        ],
        audit: vec![
            ("zz-copied".into(), 1, b"e1".to_vec()),
            ("zz-copied".into(), 2, b"e2".to_vec()),
        ],
    };
    store.import(&batch).expect("import");
    // Written again (a resumed copy), with the owner changed: no duplicate, index follows.
    let mut again = batch.clone();
    again.records = vec![record("o2")];
    store.import(&again).expect("import again");
    assert_eq!(store.get_record(&rid("imp")), Ok(Some(record("o2"))));
    let owner = |o: &str| Owner::parse(o).expect("owner");
    assert_eq!(store.owner_record_ids(&owner("o1")), Ok(vec![]));
    assert_eq!(store.owner_record_ids(&owner("o2")), Ok(vec![rid("imp")]));
    assert_eq!(store.keys(), Ok(vec![key]));
    assert_eq!(store.get_grant("g2"), Ok(Some(b"grant-2".to_vec())));
    assert_eq!(store.get_meta("other"), Ok(Some(b"v".to_vec())));
    // The imported replay marker refuses the event a second time.
    assert!(matches!(
        store.apply(
            &[Mutation::PutReplayMarker {
                key: "m2".into(),
                at: 99
            }],
            &[],
            1
        ),
        Err(StoreError::AlreadyExists(_))
    ));
    assert!(
        store
            .audit_chains()
            .expect("chains")
            .contains(&"zz-copied".to_string())
    );
    assert_eq!(
        store.chain_events("zz-copied", 2, 10),
        Ok(vec![(2, b"e2".to_vec())])
    );
    assert_eq!(store.meta_page(None, 10).expect("page").len(), 6);
}

/// Audit retention: the events of the store's own chain up to a point go, the checkpoint and
/// the event recording it are written in the same write, later events stay.
pub fn audit_pruning(store: &dyn TestHooks) {
    let event = |seq: u64| AuditAppend {
        seq,
        bytes: format!("event-{seq}").into_bytes(),
    };
    for seq in 1..=5 {
        store.append_audit(&event(seq), true).expect("append");
    }
    store
        .prune_audit(
            3,
            &[("audit_checkpoint/x".into(), b"cp".to_vec())],
            &event(6),
        )
        .expect("prune");
    let kept: Vec<u64> = store
        .audit_events(0, 100)
        .expect("events")
        .into_iter()
        .map(|(seq, _)| seq)
        .collect();
    assert_eq!(kept, [4, 5, 6]);
    assert_eq!(
        store.get_meta("audit_checkpoint/x").expect("meta"),
        Some(b"cp".to_vec())
    );
    assert_eq!(
        store.last_audit_event().expect("last"),
        Some((6, b"event-6".to_vec()))
    );
    assert!(
        store
            .audit_chains()
            .expect("chains")
            .contains(&store.own_chain())
    );
    // Appending goes on after the pruned part.
    store.append_audit(&event(7), true).expect("append");
    assert_eq!(store.audit_events(5, 10).expect("events").len(), 3);
}

/// Retiring a version counts exactly the records wrapped under it, however they came (put,
/// import) and went (rewrap, delete, delete of an owner): an engine that indexes records by key
/// version keeps the index in step with every write.
pub fn retire_counts_records_under_the_version(store: &dyn TestHooks) {
    store
        .put_keys(
            &[key(1, KeyState::DecryptOnly), key(2, KeyState::Active)],
            &event(),
            &[],
        )
        .expect("keys");
    let mut other = write("other", "p", 0);
    other.key_version = 2;
    store
        .put_records(
            &[
                write("a", "o", 0),
                write("b", "o", 0),
                write("c", "q", 0),
                other,
            ],
            1,
        )
        .expect("put");
    let in_use = |records: u64| {
        assert_eq!(store.records_under_key(1), Ok(records));
        assert_eq!(
            store.retire_key(&key(1, KeyState::Retired), &event()),
            Err(StoreError::KeyInUse {
                version: 1,
                records
            })
        );
    };
    in_use(3);
    // A replace under the same version is still one record.
    store
        .put_records(&[write("a", "o", 1)], 2)
        .expect("replace");
    in_use(3);
    let rewrapped = store
        .replace_envelopes(
            &[EnvelopeReplace {
                id: rid("a"),
                expected_version: 2,
                envelope: b"rewrapped".to_vec(),
                key_version: 2,
            }],
            3,
        )
        .expect("rewrap");
    assert_eq!(rewrapped, vec![Ok(2)]);
    in_use(2);
    store
        .apply(&[Mutation::DeleteRecord(rid("b"))], &[event()], 4)
        .expect("delete");
    in_use(1);
    store
        .delete_owner(&Owner::parse("q").expect("owner"), None, &event(), &[])
        .expect("delete owner");
    store
        .retire_key(&key(1, KeyState::Retired), &event())
        .expect("no record left under version 1");
    assert_eq!(store.records_under_key(1), Ok(0));
    assert_eq!(store.records_under_key(2), Ok(2));
    // Version 2 still counts its own two.
    assert_eq!(
        store.retire_key(&key(2, KeyState::Retired), &event()),
        Err(StoreError::KeyInUse {
            version: 2,
            records: 2
        })
    );
}

/// How many kinds of [`Mutation`] there are; [`one_of_each_kind`] makes one of each.
const MUTATION_KINDS: usize = 10;

/// Whether a mutation changes a record, so that it needs its audit event in the same write.
/// Exhaustive: a new kind of mutation does not compile until it is classified here, added to
/// [`one_of_each_kind`] and counted in [`MUTATION_KINDS`].
fn changes_a_record(m: &Mutation) -> bool {
    match m {
        Mutation::PutRecord(_)
        | Mutation::Revoke(_)
        | Mutation::DeleteRecord(_)
        | Mutation::MarkNeedsReauth { .. } => true,
        // Grant upkeep (an expired grant swept on sight) and replay markers: state beside the
        // records, audited by their callers where it matters, never a change to a token.
        // Approval requests are admin state beside the records, audited by their callers.
        Mutation::PutGrant { .. }
        | Mutation::DeleteGrant(_)
        | Mutation::PutReplayMarker { .. }
        | Mutation::PutApproval { .. }
        | Mutation::PutSetting { .. } => false,
        // An outbox entry reports a change; it goes with that change's write, or (a delivery's
        // outcome) is the deliverer's bookkeeping.
        Mutation::PutOutbox { .. } => false,
    }
}

/// One mutation of each kind, each one that applies to a store holding record `r` at version 1
/// and no grant `g`.
fn one_of_each_kind() -> Vec<Mutation> {
    vec![
        Mutation::PutRecord(write("r", "o", 1)),
        Mutation::Revoke(rid("r")),
        Mutation::DeleteRecord(rid("r")),
        Mutation::MarkNeedsReauth {
            id: rid("r"),
            expected_version: 1,
        },
        Mutation::PutGrant {
            id: "g".into(),
            grant: b"grant".to_vec(),
            expected: None,
        },
        Mutation::DeleteGrant("g".into()),
        Mutation::PutReplayMarker {
            key: "event".into(),
            at: 1,
        },
        Mutation::PutApproval {
            id: "a".into(),
            request: Some(b"request".to_vec()),
            expected: None,
        },
        Mutation::PutSetting {
            name: "s".into(),
            value: b"1".to_vec(),
            expected: None,
        },
        Mutation::PutOutbox {
            key: "p/e/1".into(),
            value: Some(b"entry".to_vec()),
            expected: None,
        },
    ]
}

/// The outbox: entries created once, changed and removed only from the value read, written
/// with the change they report (a refused change writes none), listed by prefix in key order,
/// and written with an owner's deletion.
pub fn outbox(store: &dyn TestHooks) {
    let put = |key: &str, value: Option<&[u8]>, expected: Option<&[u8]>| Mutation::PutOutbox {
        key: key.into(),
        value: value.map(<[u8]>::to_vec),
        expected: expected.map(<[u8]>::to_vec),
    };
    for key in ["p/a/2", "p/a/1", "p/b/1", "d/a/1"] {
        store
            .apply(&[put(key, Some(key.as_bytes()), None)], &[], 1)
            .expect("create");
    }
    let keys = |prefix: &str, after: Option<&str>, limit: usize| -> Vec<String> {
        store
            .outbox_page(prefix, after, limit)
            .expect("page")
            .into_iter()
            .map(|(k, v)| {
                assert_eq!(k.as_bytes(), v.as_slice());
                k
            })
            .collect()
    };
    assert_eq!(keys("p/", None, 10), ["p/a/1", "p/a/2", "p/b/1"]);
    assert_eq!(keys("p/a/", None, 10), ["p/a/1", "p/a/2"]);
    assert_eq!(keys("p/", Some("p/a/1"), 1), ["p/a/2"]);
    assert_eq!(keys("p/", Some("p/b/1"), 10), Vec::<String>::new());
    assert_eq!(keys("", None, 10), ["d/a/1", "p/a/1", "p/a/2", "p/b/1"]);
    // Other metadata beside the outbox is not listed.
    store.put_meta("outbox", Some(b"x")).expect("meta");
    store.put_meta("outboy/1", Some(b"x")).expect("meta");
    assert_eq!(keys("", None, 10).len(), 4);
    // Compare-and-swap: a stale or repeated write is refused and changes nothing.
    for refused in [
        put("p/a/1", Some(b"again"), None),
        put("p/a/1", Some(b"new"), Some(b"stale")),
        put("p/a/1", None, Some(b"stale")),
    ] {
        assert!(matches!(
            store.apply(&[refused], &[], 2),
            Err(StoreError::Conflict(_))
        ));
    }
    // Moved from pending to done in one write.
    store
        .apply(
            &[
                put("p/a/1", None, Some(b"p/a/1")),
                put("d/a/2", Some(b"d/a/2"), None),
            ],
            &[],
            2,
        )
        .expect("move");
    assert_eq!(keys("p/", None, 10), ["p/a/2", "p/b/1"]);
    assert_eq!(keys("d/", None, 10), ["d/a/1", "d/a/2"]);
    // An entry goes only with the change it reports.
    let trail = store.audit_events(1, 100).expect("events");
    assert!(matches!(
        store.apply(
            &[
                put("p/c/1", Some(b"p/c/1"), None),
                Mutation::Revoke(rid("absent"))
            ],
            &[event()],
            3,
        ),
        Err(StoreError::NotFound(_))
    ));
    assert_eq!(keys("p/c/", None, 10), Vec::<String>::new());
    assert_eq!(store.audit_events(1, 100).expect("events"), trail);
    store
        .put_records(&[write("x", "gone", 0)], 3)
        .expect("seed");
    store
        .delete_owner(
            &Owner::parse("gone").expect("owner"),
            None,
            &event(),
            &[("p/o/1".into(), b"p/o/1".to_vec())],
        )
        .expect("delete owner");
    assert_eq!(keys("p/o/", None, 10), ["p/o/1"]);
    assert_eq!(store.get_record(&rid("x")), Ok(None));
    // And with a key registry change (a rotation's webhook).
    store
        .put_keys(
            &[key(7, KeyState::Active)],
            &event(),
            &[("p/k/1".into(), b"p/k/1".to_vec())],
        )
        .expect("put keys");
    assert_eq!(keys("p/k/", None, 10), ["p/k/1"]);
}

/// Audit by construction: every kind of record change is refused (`Unaudited`, nothing
/// written) without an audit event in the same write, and written with its event when it has
/// one; a group commit whose sealer seals nothing for accepted records writes nothing.
pub fn every_record_change_needs_its_audit_event(store: &dyn TestHooks) {
    let kinds = one_of_each_kind();
    let distinct: std::collections::HashSet<_> = kinds.iter().map(std::mem::discriminant).collect();
    assert_eq!(distinct.len(), MUTATION_KINDS, "one mutation of each kind");
    store.put_records(&[write("r", "o", 0)], 1).expect("seed");
    let seeded = store.get_record(&rid("r")).expect("read");
    for (seq, m) in (1..).zip(&kinds) {
        let trail = store.audit_events(1, 100).expect("events");
        let without = store.apply(std::slice::from_ref(m), &[], 2);
        if changes_a_record(m) {
            assert_eq!(without, Err(StoreError::Unaudited), "{m:?}");
            assert_eq!(store.get_record(&rid("r")).expect("read"), seeded, "{m:?}");
            assert_eq!(store.audit_events(1, 100).expect("events"), trail, "{m:?}");
            let event = AuditAppend {
                seq,
                bytes: format!("event {seq}").into_bytes(),
            };
            store
                .apply(std::slice::from_ref(m), std::slice::from_ref(&event), 2)
                .unwrap_or_else(|e| panic!("{m:?} with its event: {e}"));
            assert_eq!(
                store.audit_events(seq, 1).expect("events"),
                vec![(seq, event.bytes.clone())],
                "{m:?}"
            );
            assert_ne!(store.get_record(&rid("r")).expect("read"), seeded, "{m:?}");
            // Back to the seeded record for the next kind.
            store
                .apply_unaudited(&[Mutation::DeleteRecord(rid("r"))], 3)
                .ok();
            store.put_records(&[write("r", "o", 0)], 1).expect("seed");
        } else {
            assert_eq!(without, Ok(()), "{m:?}");
        }
    }
    /// Seals nothing, whatever it is given.
    struct Silent;
    impl GroupAudit for Silent {
        fn seal(&self, _: &[(usize, &[Record])]) -> Vec<AuditAppend> {
            Vec::new()
        }
    }
    let trail = store.audit_events(1, 100).expect("events");
    let w = [write("unaudited", "o", 0)];
    assert_eq!(
        store.put_record_groups(&[&w], 4, Arc::new(Silent)),
        Err(StoreError::Unaudited)
    );
    assert_eq!(store.get_record(&rid("unaudited")), Ok(None));
    assert_eq!(store.audit_events(1, 100).expect("events"), trail);
}

/// Runs every check, each on a fresh store from `make`.
pub fn all(make: impl Fn() -> Box<dyn TestHooks>) {
    every_record_change_needs_its_audit_event(&*make());
    audit_pruning(&*make());
    grants(&*make());
    approvals(&*make());
    outbox(&*make());
    apply_is_atomic_and_audited(&*make());
    retire_is_atomic_with_record_writes(&*make());
    retire_counts_records_under_the_version(&*make());
    group_commit(&*make());
    scan_replace_and_meta(&*make());
    create_read_replace(&*make());
    batches_are_atomic(&*make());
    revoke_delete_and_stats(&*make());
    key_registry(&*make());
    import_and_listing(&*make());
}

#[cfg(test)]
mod tests {
    use super::super::rocks::CF_RECORDS_FOR_TEST;
    use super::*;

    #[test]
    fn memory_store_conforms() {
        all(|| Box::new(MemoryStore::new()));
    }

    #[test]
    fn rocks_store_conforms_and_persists() {
        let dirs = std::cell::RefCell::new(Vec::new());
        all(|| {
            let dir = tempfile::tempdir().expect("tempdir");
            let store = RocksStore::open(dir.path(), 8 << 20).expect("open");
            dirs.borrow_mut().push(dir);
            Box::new(store)
        });
        // Reopen: acknowledged writes and the registry survive; a second opener is refused clearly.
        let dir = tempfile::tempdir().expect("tempdir");
        {
            let store = RocksStore::open(dir.path(), 8 << 20).expect("open");
            store
                .put_records(&[write("persist", "o", 0)], 1)
                .expect("put");
            let err = RocksStore::open(dir.path(), 8 << 20).expect_err("locked");
            assert!(
                err.to_string()
                    .contains("in use by another tokenvault process"),
                "{err}"
            );
        }
        let store = RocksStore::open(dir.path(), 8 << 20).expect("reopen");
        assert_eq!(
            store
                .get_record(&rid("persist"))
                .expect("get")
                .expect("present")
                .version,
            1
        );
    }

    #[test]
    fn rocks_delete_removes_the_envelope_from_disk() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = RocksStore::open(dir.path(), 8 << 20).expect("open");
        let mut w = write("gone", "o", 0);
        w.envelope = b"UNIQUE-ENVELOPE-MARKER-1234567890".to_vec();
        store
            .put_records(&[w, write("kept", "o", 0)], 1)
            .expect("put");
        // Push it into SST files first, the hard case.
        store
            .db
            .flush_cf(store.cf(CF_RECORDS_FOR_TEST))
            .expect("flush");
        assert!(store.delete_record(&rid("gone"), &event()).expect("delete"));
        drop(store);
        let marker = b"UNIQUE-ENVELOPE-MARKER";
        for entry in std::fs::read_dir(dir.path()).expect("list") {
            let path = entry.expect("entry").path();
            let bytes = std::fs::read(&path).expect("read");
            assert!(
                !bytes.windows(marker.len()).any(|w| w == marker),
                "deleted envelope still in {}",
                path.display()
            );
        }
    }

    #[test]
    fn rocks_builds_the_key_version_index_of_an_older_directory() {
        use super::super::rocks::{BY_KEY_BUILT_FOR_TEST, CF_BY_KEY_FOR_TEST};
        let dir = tempfile::tempdir().expect("tempdir");
        {
            let store = RocksStore::open(dir.path(), 8 << 20).expect("open");
            store
                .put_keys(&[key(1, KeyState::Active)], &event(), &[])
                .expect("keys");
            store
                .put_records(&[write("a", "o", 0), write("b", "o", 0)], 1)
                .expect("put");
            // As a directory written before the index existed: no entries, no marker.
            let index = store.cf(CF_BY_KEY_FOR_TEST);
            for id in ["a", "b"] {
                store
                    .db
                    .delete_cf(index, schema::key_version_key(1, &rid(id)))
                    .expect("drop entry");
            }
            store
                .db
                .delete_cf(index, BY_KEY_BUILT_FOR_TEST)
                .expect("drop marker");
        }
        let store = RocksStore::open(dir.path(), 8 << 20).expect("reopen");
        assert_eq!(
            store.retire_key(&key(1, KeyState::Retired), &event()),
            Err(StoreError::KeyInUse {
                version: 1,
                records: 2
            })
        );
    }
}
