//! Behaviour every [`TokenStore`] must have, run against each implementation.

#[cfg(feature = "daemon")]
use super::rocks::CF_RECORDS_FOR_TEST;
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

fn rid(id: &str) -> RecordId {
    RecordId::parse(id).expect("valid")
}

pub(crate) fn create_read_replace(store: &dyn TokenStore) {
    assert_eq!(store.put_records(&[write("a", "o1", 0)], 100), Ok(vec![1]));
    let r = store.get_record(&rid("a")).expect("get").expect("present");
    assert_eq!(
        (r.version, r.created_at, r.updated_at, r.revoked),
        (1, 100, 100, false)
    );
    assert_eq!(r.envelope, b"envelope-of-a");
    // Create over an existing id, and a stale replace, both refuse and change nothing.
    assert_eq!(
        store.put_records(&[write("a", "o1", 0)], 101),
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
    // The owner moved with the replace: deleting the old owner leaves it alone.
    assert_eq!(
        store.delete_owner(&Owner::parse("o1").expect("valid"), None),
        Ok(0)
    );
    assert_eq!(
        store.delete_owner(&Owner::parse("o2").expect("valid"), None),
        Ok(1)
    );
    assert_eq!(store.get_record(&rid("a")), Ok(None));
}

pub(crate) fn batches_are_atomic(store: &dyn TokenStore) {
    store
        .put_records(&[write("existing", "o", 0)], 1)
        .expect("seed");
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

pub(crate) fn revoke_delete_and_stats(store: &dyn TokenStore) {
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
    let r = store.revoke(&rid("r1"), 5, None).expect("revoke");
    assert!(r.revoked);
    assert_eq!(r.version, 2);
    assert_eq!(
        store
            .revoke(&rid("r1"), 6, None)
            .expect("idempotent")
            .version,
        2
    );
    assert_eq!(
        store.revoke(&rid("nope"), 6, None),
        Err(StoreError::NotFound("nope".into()))
    );
    // Needs-reauth is version checked, counted, and cleared by the next write.
    assert!(matches!(
        store.mark_needs_reauth(&rid("r2"), 7, 5, None),
        Err(StoreError::VersionMismatch { .. })
    ));
    let marked = store
        .mark_needs_reauth(&rid("r2"), 1, 5, None)
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
    assert_eq!(store.delete_record(&rid("r3"), None), Ok(true));
    assert_eq!(store.delete_record(&rid("r3"), None), Ok(false));
    // An owner that is a prefix of another must not take the other's records.
    store
        .put_records(&[write("r4", "alice2", 0)], 1)
        .expect("seed");
    let alice = Owner::parse("alice").expect("valid");
    let mut ids = store.owner_record_ids(&alice).expect("ids");
    ids.sort_by(|a, b| a.as_str().cmp(b.as_str()));
    assert_eq!(ids, vec![rid("r1"), rid("r2")]);
    assert_eq!(
        store.delete_owner(&Owner::parse("alice").expect("valid"), None),
        Ok(2)
    );
    assert_eq!(store.get_record(&rid("r1")), Ok(None));
    assert!(store.get_record(&rid("r4")).expect("get").is_some());
}

pub(crate) fn key_registry(store: &dyn TokenStore) {
    assert_eq!(store.keys(), Ok(vec![]));
    let key = |version: u32, state| KeyInfo {
        version,
        id: KeyId([version as u8; 32]),
        state,
        created_at: 10,
        updated_at: 11,
        spki_der: vec![1, 2, 3],
    };
    store
        .put_keys(
            &[key(2, KeyState::Active), key(1, KeyState::DecryptOnly)],
            None,
        )
        .expect("put");
    store
        .put_keys(&[key(1, KeyState::Retired)], None)
        .expect("update");
    assert_eq!(
        store.keys(),
        Ok(vec![key(1, KeyState::Retired), key(2, KeyState::Active)])
    );
}

pub(crate) fn scan_replace_and_meta(store: &dyn TokenStore) {
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
            Ok(2),
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
        (&b"rewrapped"[..], 2, 2, 9)
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

    // Prefix pages: only keys under the prefix, in order, resumable after the last key.
    for key in ["g/1", "g/2", "g/3", "g0", "f/9", "h"] {
        store.put_meta(key, Some(key.as_bytes())).expect("put");
    }
    let keys = |page: Vec<(String, Vec<u8>)>| -> Vec<String> {
        page.into_iter()
            .map(|(k, v)| {
                assert_eq!(k.as_bytes(), v.as_slice());
                k
            })
            .collect()
    };
    assert_eq!(
        keys(store.meta_page("g/", None, 2).expect("page")),
        ["g/1", "g/2"]
    );
    assert_eq!(
        keys(store.meta_page("g/", Some("g/2"), 2).expect("page")),
        ["g/3"]
    );
    assert_eq!(
        keys(store.meta_page("g/", Some("g/3"), 2).expect("page")),
        Vec::<String>::new()
    );
    assert_eq!(
        keys(store.meta_page("x/", None, 10).expect("page")),
        Vec::<String>::new()
    );
    store
        .delete_meta(&["g/1".to_string(), "g/3".to_string(), "absent".to_string()])
        .expect("delete");
    assert_eq!(
        keys(store.meta_page("g/", None, 10).expect("page")),
        ["g/2"]
    );
    assert_eq!(
        store.get_meta("g0"),
        Ok(Some(b"g0".to_vec())),
        "outside the prefix: kept"
    );
}

/// Group commit: independent outcomes, later groups see earlier ones, refusals change nothing.
pub(crate) fn group_commit(store: &dyn TokenStore) {
    store
        .put_records(&[write("taken", "o", 0)], 1)
        .expect("seed");
    let a = [write("g1", "o", 0), write("g2", "o", 0)];
    let refused = [write("g3", "o", 0), write("taken", "o", 0)];
    let replace_g1 = [write("g1", "o2", 1)];
    let stale = [write("g1", "o", 1)];
    let outcomes = store
        .put_record_groups(&[&a, &refused, &replace_g1, &stale], 2)
        .expect("commit");
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

pub(crate) fn all(make: impl Fn() -> Box<dyn TokenStore>) {
    group_commit(&*make());
    scan_replace_and_meta(&*make());
    create_read_replace(&*make());
    batches_are_atomic(&*make());
    revoke_delete_and_stats(&*make());
    key_registry(&*make());
}

#[test]
fn memory_store_conforms() {
    all(|| Box::new(MemoryStore::new()));
}

#[cfg(feature = "daemon")]
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

#[cfg(feature = "daemon")]
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
    assert!(store.delete_record(&rid("gone"), None).expect("delete"));
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
