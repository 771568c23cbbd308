//! Key lifecycle over the real daemon: rotate, online rewrap, retire, destroy, grace period,
//! minimum decryption version.

use crate::common;

use common::*;
use tokenvault::Sealer;
use tokenvault::api::SealRecord as _;
use tokenvault::api::v1;
use tokenvault::secret::Secret;
use tonic::Code;

async fn keys(d: &TestDaemon) -> Vec<v1::PublicKey> {
    d.admin(ADMIN)
        .await
        .list_keys(v1::ListKeysRequest {})
        .await
        .expect("keys")
        .into_inner()
        .keys
}

async fn per_version(d: &TestDaemon) -> Vec<(u32, u64)> {
    let s = d
        .admin(ADMIN)
        .await
        .stats(v1::StatsRequest {})
        .await
        .expect("stats")
        .into_inner();
    s.records_per_key_version
        .iter()
        .map(|c| (c.key_version, c.records))
        .collect()
}

fn state(keys: &[v1::PublicKey], version: u32) -> v1::KeyState {
    let k = keys
        .iter()
        .find(|k| k.version == version)
        .expect("version listed");
    v1::KeyState::try_from(k.state).expect("known state")
}

#[tokio::test]
async fn rotate_rewrap_retire_destroy() {
    let dir = tempfile::tempdir().expect("tempdir");
    let cfg = config(dir.path());
    let store = tokenvault::store::RocksStore::open(&cfg.data_dir, 8 << 20).expect("store");
    let clock = TestClock::new();
    let d = TestDaemon::start_with_clock(cfg, std::sync::Arc::new(store), &clock).await;
    d.seed("r", 300).await;
    let old_sealer = d.sealer().await;
    let mut admin = d.admin(ADMIN).await;

    let rotated = admin
        .rotate_key(v1::RotateKeyRequest::default())
        .await
        .expect("rotate")
        .into_inner();
    let active = rotated.active.expect("active");
    assert_eq!(active.version, 2);
    assert_eq!(
        rotated.previous.expect("previous").state,
        v1::KeyState::DecryptOnly as i32
    );
    assert_eq!(
        d.sealer().await.public_key().id().to_hex(),
        active.fingerprint,
        "PublicKeys serves v2 at once"
    );
    // Within the grace period an envelope sealed under v1 is still accepted.
    let late = old_sealer
        .seal_record(&meta("late", "o"), &Secret::new(b"late".to_vec()))
        .expect("seal");
    d.ingest(INGEST)
        .await
        .put_sealed(v1::PutSealedRequest {
            record: Some(late),
            expected_version: 0,
        })
        .await
        .expect("grace");
    assert_eq!(per_version(&d).await, vec![(1, 301)]);

    // Retire and destroy are refused while records remain; nothing changes.
    let e = admin
        .retire_key(v1::RetireKeyRequest { version: 1 })
        .await
        .expect_err("records remain");
    assert_eq!(e.code(), Code::FailedPrecondition);
    assert_eq!(
        e.message(),
        "key version 1 still wraps 301 record(s); run Admin.Rewrap first"
    );
    let e = admin
        .destroy_key(v1::DestroyKeyRequest { version: 1 })
        .await
        .expect_err("records remain");
    assert_eq!(e.code(), Code::FailedPrecondition);
    let e = admin
        .retire_key(v1::RetireKeyRequest { version: 2 })
        .await
        .expect_err("active");
    assert_eq!(e.code(), Code::FailedPrecondition);
    assert_eq!(
        e.message(),
        "key version 2 is active; retire needs a decrypt-only key"
    );
    let e = admin
        .retire_key(v1::RetireKeyRequest { version: 9 })
        .await
        .expect_err("unknown");
    assert_eq!(
        (e.code(), e.message()),
        (Code::NotFound, "no key version 9")
    );
    assert_eq!(state(&keys(&d).await, 1), v1::KeyState::DecryptOnly);

    let p = d.rewrap().await;
    assert_eq!(
        (p.target_version, p.total, p.rewrapped, p.failed),
        (2, 301, 301, 0)
    );
    assert_eq!(per_version(&d).await, vec![(2, 301)]);
    let again = d.rewrap().await;
    assert_eq!(
        (again.total, again.rewrapped),
        (0, 0),
        "idempotent: nothing left to do"
    );

    let r = admin
        .retire_key(v1::RetireKeyRequest { version: 1 })
        .await
        .expect("retire")
        .into_inner();
    assert_eq!(r.key.expect("key").state, v1::KeyState::Retired as i32);
    // A retired version is refused at ingest, grace period or not.
    let refused = old_sealer
        .seal_record(&meta("later", "o"), &Secret::new(b"x".to_vec()))
        .expect("seal");
    let e = d
        .ingest(INGEST)
        .await
        .put_sealed(v1::PutSealedRequest {
            record: Some(refused),
            expected_version: 0,
        })
        .await
        .expect_err("retired");
    assert_eq!(e.code(), Code::FailedPrecondition);
    let key_file = dir.path().join("keys/dev/v0001.key.pem");
    assert!(key_file.exists());

    // Destroy waits: pending destruction for the waiting period (7 days by default), opening
    // nothing, cancellable until then.
    let week = 7 * 86_400;
    let asked_at = d.vault.now();
    let pending = admin
        .destroy_key(v1::DestroyKeyRequest { version: 1 })
        .await
        .expect("destroy")
        .into_inner();
    let key = pending.key.expect("key");
    assert_eq!(key.state, v1::KeyState::PendingDestruction as i32);
    assert_eq!(key.destroy_after, asked_at + week);
    assert!(!pending.private_key_erased);
    assert!(key_file.exists(), "kept while pending");
    let e = d
        .ingest(INGEST)
        .await
        .put_sealed(v1::PutSealedRequest {
            record: Some(
                old_sealer
                    .seal_record(&meta("later2", "o"), &Secret::new(b"x".to_vec()))
                    .expect("seal"),
            ),
            expected_version: 0,
        })
        .await
        .expect_err("pending destruction");
    assert_eq!(e.code(), Code::FailedPrecondition);
    assert!(
        e.message().contains("pending-destruction"),
        "{}",
        e.message()
    );
    let cancelled = admin
        .cancel_destroy_key(v1::CancelDestroyKeyRequest { version: 1 })
        .await
        .expect("cancel")
        .into_inner();
    assert_eq!(
        cancelled.key.expect("key").state,
        v1::KeyState::Retired as i32
    );
    let e = admin
        .cancel_destroy_key(v1::CancelDestroyKeyRequest { version: 1 })
        .await
        .expect_err("nothing to cancel");
    assert_eq!(
        (e.code(), e.message()),
        (
            Code::FailedPrecondition,
            "key version 1 is retired; cancel-destroy needs a pending-destruction key"
        )
    );
    let again = admin
        .destroy_key(v1::DestroyKeyRequest { version: 1 })
        .await
        .expect("destroy again")
        .into_inner();
    let due = again.key.expect("key").destroy_after;
    assert!(due >= asked_at + week);
    // Asking once more keeps the date.
    clock.advance(60);
    let same = admin
        .destroy_key(v1::DestroyKeyRequest { version: 1 })
        .await
        .expect("asked twice")
        .into_inner();
    assert_eq!(same.key.expect("key").destroy_after, due);
    clock.advance(due - d.vault.now() - 1);
    assert!(d.destroy_due().await.is_empty(), "one second early");
    assert!(key_file.exists());
    clock.advance(1);
    let e = admin
        .cancel_destroy_key(v1::CancelDestroyKeyRequest { version: 1 })
        .await
        .expect_err("due");
    assert_eq!(e.code(), Code::FailedPrecondition);
    assert!(
        e.message().ends_with("it can no longer be cancelled"),
        "{}",
        e.message()
    );
    let destroyed = d.destroy_due().await;
    assert_eq!(
        destroyed.iter().map(|k| k.version).collect::<Vec<_>>(),
        vec![1]
    );
    assert!(!key_file.exists(), "private key file is gone");
    let events = d
        .audit_events(v1::AuditLogRequest::default())
        .await
        .into_iter()
        .filter(|e| e.action.contains("DestroyKey"))
        .map(|e| (e.caller, e.action, e.outcome))
        .collect::<Vec<_>>();
    assert!(
        events.contains(&(
            "key-destroy-job".to_string(),
            "DestroyKey".to_string(),
            "ok".to_string()
        )),
        "{events:?}"
    );
    assert!(d.destroy_due().await.is_empty(), "nothing left to do");
    let destroyed = admin
        .destroy_key(v1::DestroyKeyRequest { version: 1 })
        .await
        .expect("destroy a destroyed version")
        .into_inner();
    assert!(destroyed.private_key_erased);
    assert!(
        dir.path().join("keys/dev/v0001.pub.pem").exists(),
        "the public half is kept"
    );
    assert_eq!(state(&keys(&d).await, 1), v1::KeyState::Destroyed);
    let e = admin
        .destroy_key(v1::DestroyKeyRequest { version: 2 })
        .await
        .expect_err("active");
    assert_eq!(e.code(), Code::FailedPrecondition);

    // Every record still opens, under v2.
    for i in [0, 150, 299] {
        let r = d.get(format!("r{i}")).await.expect("get").into_inner();
        assert_eq!(r.secret, format!("secret-{i}").as_bytes());
        assert_eq!(r.info.expect("info").key_version, 2);
    }
    d.stop().await;
    // And after a restart, with v1's private key gone for good.
    let d = TestDaemon::start(dir.path()).await;
    assert_eq!(
        d.get("late").await.expect("get").into_inner().secret,
        b"late"
    );
    d.stop().await;
}

#[tokio::test]
async fn rotation_and_rewrap_while_traffic_flows() {
    let dir = tempfile::tempdir().expect("tempdir");
    let d = std::sync::Arc::new(TestDaemon::start(dir.path()).await);
    d.seed("base", 500).await;
    use std::sync::atomic::{AtomicUsize, Ordering};
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    // Calls completed by each side, to wait on traffic instead of on the clock.
    let (writes, reads) = (
        std::sync::Arc::new(AtomicUsize::new(0)),
        std::sync::Arc::new(AtomicUsize::new(0)),
    );
    let writer = {
        let (d, stop, writes) = (d.clone(), stop.clone(), writes.clone());
        tokio::spawn(async move {
            let mut n = 0;
            while !stop.load(Ordering::SeqCst) {
                // A web tier refreshing its public key on every write.
                d.put(&meta(&format!("w{n}"), "o"), format!("w-{n}").as_bytes())
                    .await;
                n += 1;
                writes.fetch_add(1, Ordering::SeqCst);
            }
            n
        })
    };
    let reader = {
        let (d, stop, reads) = (d.clone(), stop.clone(), reads.clone());
        tokio::spawn(async move {
            let mut n = 0usize;
            while !stop.load(Ordering::SeqCst) {
                reads.fetch_add(1, Ordering::SeqCst);
                let i = n % 500;
                let r = d
                    .get(format!("base{i}"))
                    .await
                    .expect("reads never fail")
                    .into_inner();
                assert_eq!(r.secret, format!("secret-{i}").as_bytes());
                n += 1;
            }
            n
        })
    };
    // Until both sides have made some calls (awaited, not slept).
    let flowing = |after: (usize, usize)| {
        let (writes, reads) = (writes.clone(), reads.clone());
        async move {
            while writes.load(Ordering::SeqCst) < after.0 + 10
                || reads.load(Ordering::SeqCst) < after.1 + 10
            {
                tokio::task::yield_now().await;
            }
            (writes.load(Ordering::SeqCst), reads.load(Ordering::SeqCst))
        }
    };
    let before = flowing((0, 0)).await;
    d.admin(ADMIN)
        .await
        .rotate_key(v1::RotateKeyRequest::default())
        .await
        .expect("rotate");
    let p = d.rewrap().await;
    assert_eq!(p.failed, 0);
    // Traffic goes on after the rotation and rewrap, on the new key.
    flowing(before).await;
    stop.store(true, Ordering::SeqCst);
    let (written, read) = (writer.await.expect("writer"), reader.await.expect("reader"));
    assert!(
        written > 0 && read > 0,
        "traffic flowed: {written} writes, {read} reads"
    );
    // Records written under v1 during the rewrap may remain; a second run picks them up.
    d.rewrap().await;
    let versions = per_version(&d).await;
    assert_eq!(versions, vec![(2, 500 + written as u64)], "{versions:?}");
    for n in 0..written {
        assert_eq!(
            d.get(format!("w{n}"))
                .await
                .expect("written record")
                .into_inner()
                .secret,
            format!("w-{n}").as_bytes()
        );
    }
}

#[tokio::test]
async fn ingest_grace_period_ends() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut cfg = config(dir.path());
    cfg.key_policy.ingest_grace_seconds = 30;
    let store = tokenvault::store::RocksStore::open(&cfg.data_dir, 8 << 20).expect("store");
    let clock = TestClock::new();
    let d = TestDaemon::start_with_clock(cfg, std::sync::Arc::new(store), &clock).await;
    let old = d.sealer().await;
    d.admin(ADMIN)
        .await
        .rotate_key(v1::RotateKeyRequest::default())
        .await
        .expect("rotate");
    let put = |id: &str| {
        let rec = old
            .seal_record(&meta(id, "o"), &Secret::new(b"x".to_vec()))
            .expect("seal");
        let d = &d;
        async move {
            d.ingest(INGEST)
                .await
                .put_sealed(v1::PutSealedRequest {
                    record: Some(rec),
                    expected_version: 0,
                })
                .await
        }
    };
    // Accepted under the previous key through the last second of the grace period...
    clock.advance(30);
    put("in-grace").await.expect("within the grace period");
    // ...and refused after it.
    clock.advance(1);
    let e = put("late").await.expect_err("grace over");
    assert_eq!(e.code(), Code::FailedPrecondition);
    assert!(
        e.message()
            .contains("ingest grace period of 30 s has ended"),
        "{}",
        e.message()
    );
    assert_eq!(
        d.get("in-grace").await.expect("stored").into_inner().secret,
        b"x"
    );
    assert_eq!(
        d.get("late").await.expect_err("not stored").code(),
        Code::NotFound
    );
    d.stop().await;
}

#[tokio::test]
async fn minimum_decryption_version_refuses_older_records() {
    let dir = tempfile::tempdir().expect("tempdir");
    let d = TestDaemon::start(dir.path()).await;
    d.seed("old", 1).await;
    d.admin(ADMIN)
        .await
        .rotate_key(v1::RotateKeyRequest::default())
        .await
        .expect("rotate");
    d.seed("new", 1).await;
    let v1_pem = keys(&d)
        .await
        .into_iter()
        .find(|k| k.version == 1)
        .expect("v1")
        .spki_pem;
    d.stop().await;

    let mut cfg = config(dir.path());
    cfg.key_policy.min_decrypt_version = 2;
    let d = TestDaemon::start_with(cfg).await;
    let e = d.get("old0").await.expect_err("below minimum");
    assert_eq!(e.code(), Code::FailedPrecondition);
    assert_eq!(
        e.message(),
        "record old0: envelope is sealed under key version 1, below the minimum decryption version 2"
    );
    assert_eq!(
        d.get("new0").await.expect("v2 record").into_inner().secret,
        b"secret-0"
    );
    let rec = Sealer::from_pem(&v1_pem)
        .expect("pem")
        .seal_record(&meta("y", "o"), &Secret::new(b"y".to_vec()))
        .expect("seal");
    let e = d
        .ingest(INGEST)
        .await
        .put_sealed(v1::PutSealedRequest {
            record: Some(rec),
            expected_version: 0,
        })
        .await
        .expect_err("below minimum");
    assert_eq!(e.code(), Code::FailedPrecondition);
    d.stop().await;
}

#[tokio::test]
async fn one_rewrap_at_a_time() {
    let dir = tempfile::tempdir().expect("tempdir");
    let d = TestDaemon::start(dir.path()).await;
    d.seed("r", 2000).await;
    let mut admin = d.admin(ADMIN).await;
    admin
        .rotate_key(v1::RotateKeyRequest::default())
        .await
        .expect("rotate");
    let mut first = admin
        .rewrap(v1::RewrapRequest {
            max_records_per_second: 1000,
        })
        .await
        .expect("first")
        .into_inner();
    first
        .message()
        .await
        .expect("progress")
        .expect("one report");
    let e = d
        .admin(ADMIN)
        .await
        .rewrap(v1::RewrapRequest::default())
        .await
        .expect_err("busy");
    assert_eq!(
        (e.code(), e.message()),
        (
            Code::FailedPrecondition,
            "a rewrap is already running; wait for it to finish"
        )
    );
    while first.message().await.expect("progress").is_some() {}
    assert_eq!(per_version(&d).await, vec![(2, 2000)]);
    d.stop().await;
}

/// A client that cancels a slow paced rewrap frees the "already running" slot at once (not
/// after the pacing), the run stops where it was, says so in the audit trail, and the next
/// Rewrap resumes and finishes it.
#[tokio::test]
async fn cancelling_a_paced_rewrap_frees_the_slot_and_the_next_run_resumes() {
    let dir = tempfile::tempdir().expect("tempdir");
    let d = TestDaemon::start(dir.path()).await;
    d.seed("r", 200).await;
    let mut admin = d.admin(ADMIN).await;
    admin
        .rotate_key(v1::RotateKeyRequest::default())
        .await
        .expect("rotate");
    // 200 records at 5/s: 40 s if left to run.
    let mut slow = admin
        .rewrap(v1::RewrapRequest {
            max_records_per_second: 5,
        })
        .await
        .expect("slow")
        .into_inner();
    slow.message().await.expect("progress").expect("one report");
    let cancelled_at = std::time::Instant::now();
    drop(slow);
    // Wait on the event (the slot frees), bounded well below the 40 s run.
    let last = loop {
        match d
            .admin(ADMIN)
            .await
            .rewrap(v1::RewrapRequest::default())
            .await
        {
            Ok(stream) => {
                let mut stream = stream.into_inner();
                let mut last = None;
                while let Some(p) = stream.message().await.expect("progress") {
                    last = Some(p);
                }
                break last.expect("reports");
            }
            Err(e) => {
                assert_eq!(e.code(), Code::FailedPrecondition, "{e:?}");
                assert!(
                    cancelled_at.elapsed() < std::time::Duration::from_secs(10),
                    "the slot is still taken {:?} after the cancel",
                    cancelled_at.elapsed()
                );
                tokio::time::sleep(std::time::Duration::from_millis(20)).await;
            }
        }
    };
    assert!(last.done);
    assert!(
        last.rewrapped < 200,
        "the resumed run did not redo the first part"
    );
    assert_eq!(per_version(&d).await, vec![(2, 200)]);
    let kinds: Vec<String> = audit_events(&d, v1::AuditLogRequest::default())
        .await
        .into_iter()
        .map(|e| e.action)
        .collect();
    assert!(kinds.iter().any(|a| a == "RewrapStopped"), "{kinds:?}");
    assert!(kinds.iter().any(|a| a == "RewrapFinished"), "{kinds:?}");
    d.stop().await;
}

async fn audit_events(d: &TestDaemon, req: v1::AuditLogRequest) -> Vec<v1::AuditEvent> {
    d.audit_events(req).await
}

#[tokio::test]
async fn audit_trail_records_who_did_what_and_reveals_tampering() {
    use tokenvault::store::prelude::*;
    let dir = tempfile::tempdir().expect("tempdir");
    let d = TestDaemon::start(dir.path()).await;
    d.put(&meta("acct-7", "alice@example.com"), b"tok").await;
    d.get("acct-7").await.expect("get");
    d.get("missing").await.expect_err("not found");
    d.broker(INGEST)
        .await
        .get_token(v1::GetTokenRequest {
            id: "acct-7".into(),
        })
        .await
        .expect_err("denied");
    d.broker("tv_stolen")
        .await
        .get_token(v1::GetTokenRequest {
            id: "acct-7".into(),
        })
        .await
        .expect_err("unauth");
    let mut admin = d.admin(ADMIN).await;
    admin
        .revoke(v1::RevokeRequest {
            id: "acct-7".into(),
            ..Default::default()
        })
        .await
        .expect("revoke");
    admin
        .delete(v1::DeleteRequest {
            id: "acct-7".into(),
            ..Default::default()
        })
        .await
        .expect("delete");
    admin
        .rotate_key(v1::RotateKeyRequest::default())
        .await
        .expect("rotate");

    let events = audit_events(&d, v1::AuditLogRequest::default()).await;
    let summary: Vec<(String, String, String)> = events
        .iter()
        .map(|e| (e.caller.clone(), e.action.clone(), e.outcome.clone()))
        .collect();
    let expected = [
        // The development keyring's first version, recorded when the daemon created it.
        ("dev-profile", "InitKeys", "ok"),
        // Stored records are on record too, with the same write.
        ("web-tier", "PutSealed", "ok"),
        ("worker-1", "GetToken", "Ok"),
        ("worker-1", "GetToken", "NotFound"),
        ("web-tier", "auth", "PermissionDenied"),
        // The stolen credential's refusal is not here: refusals without a valid credential
        // are counted and summarized per address, never written one by one.
        ("secteam", "Revoke", "ok"),
        ("secteam", "Delete", "ok"),
        ("secteam", "RotateKey", "ok"),
    ];
    let expected: Vec<(String, String, String)> = expected
        .iter()
        .map(|(c, a, o)| {
            (
                c.to_string(),
                a.to_string(),
                if *o == "Ok" {
                    "ok".into()
                } else {
                    o.to_string()
                },
            )
        })
        .collect();
    assert_eq!(summary, expected);
    assert_eq!(
        tokenvault::audit::verify_chain(events.iter().map(|e| (e.seq, e.raw.clone()))),
        Ok(8)
    );
    for e in &events {
        let text = String::from_utf8_lossy(&e.raw);
        assert!(
            !text.contains("acct-7") && !text.contains("alice"),
            "plaintext identifier in {e:?}"
        );
        assert!(
            !text.contains("tok") || text.contains("tokenvault"),
            "secret in audit"
        );
    }
    // Searching by a known id works through its HMAC.
    let about = audit_events(
        &d,
        v1::AuditLogRequest {
            record_id: "acct-7".into(),
            ..Default::default()
        },
    )
    .await;
    assert_eq!(
        about.iter().map(|e| e.action.as_str()).collect::<Vec<_>>(),
        ["PutSealed", "GetToken", "Revoke", "Delete"]
    );
    let by_owner = audit_events(
        &d,
        v1::AuditLogRequest {
            owner: "alice@example.com".into(),
            ..Default::default()
        },
    )
    .await;
    assert_eq!(
        by_owner
            .iter()
            .map(|e| e.action.as_str())
            .collect::<Vec<_>>(),
        ["PutSealed", "GetToken"]
    );
    d.stop().await;

    // Flip one byte of a stored event offline: the chain check names that event.
    {
        let store = tokenvault::store::RocksStore::open(&config(dir.path()).data_dir, 1 << 20)
            .expect("open");
        let (seq, mut raw) = store.audit_events(5, 1).expect("events").remove(0);
        let n = raw.len() / 2;
        raw[n] ^= 0x20;
        store.dangerous_overwrite_audit(seq, &raw).expect("tamper");
    }
    let d = TestDaemon::start(dir.path()).await;
    let events = audit_events(&d, v1::AuditLogRequest::default()).await;
    let err = tokenvault::audit::verify_chain(events.iter().map(|e| (e.seq, e.raw.clone())))
        .expect_err("tampered");
    assert_eq!(err.seq, 5, "{err}");
    d.stop().await;
}

#[tokio::test]
async fn automatic_rotation_when_the_active_key_is_old_enough() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut cfg = config(dir.path());
    cfg.key_policy.auto_rotate_seconds = Some(1);
    let d = TestDaemon::start_with(cfg).await;
    d.seed("r", 3).await;
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(10);
    while keys(&d).await.len() < 2 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "no automatic rotation within 10 s"
        );
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    }
    let ks = keys(&d).await;
    assert_eq!(state(&ks, 2), v1::KeyState::Active);
    assert_eq!(state(&ks, 1), v1::KeyState::DecryptOnly);
    assert_eq!(
        d.get("r1")
            .await
            .expect("old record opens")
            .into_inner()
            .secret,
        b"secret-1"
    );
    let events = audit_events(&d, v1::AuditLogRequest::default()).await;
    assert!(
        events
            .iter()
            .any(|e| e.caller == "auto-rotation" && e.action == "RotateKey")
    );
    d.stop().await;
}

#[tokio::test]
async fn rotate_key_imports_a_provided_key_pair() {
    let dir = tempfile::tempdir().expect("tempdir");
    let d = TestDaemon::start(dir.path()).await;
    d.seed("r", 2).await;
    let read = |n: &str| {
        std::fs::read_to_string(fixture_path(&format!("keys/test/{n}"))).expect("fixture")
    };
    let mut admin = d.admin(ADMIN).await;
    let cases = [
        (
            read("fixture-b.key.pem"),
            read("fixture-a.pub.pem"),
            "invalid key: the public key does not match the private key",
        ),
        (
            "not a key".to_string(),
            String::new(),
            "invalid key: not a PEM file (no -----BEGIN line)",
        ),
        (
            read("fixture-1024.key.pem"),
            String::new(),
            "invalid key: RSA key of 1024 bits refused",
        ),
        (
            read("fixture-a.key.encrypted.pem"),
            String::new(),
            "invalid key: private key is encrypted: Admin.RotateKey takes an unencrypted PKCS#8 \
             or PKCS#1 PEM; `tokenvault admin rotate --import-private FILE \
             --import-passphrase-file PASSFILE` decrypts it locally first",
        ),
        (
            read("fixture-ec.key.pem"),
            String::new(),
            "invalid key: private key uses the EC (id-ecPublicKey) algorithm; tokenvault \
             accepts RSA (2048 to 4096 bits) and X-Wing keys only",
        ),
        (
            read("fixture-b.key.pem"),
            read("fixture-ec.pub.pem"),
            "invalid key: public key uses the EC (id-ecPublicKey) algorithm",
        ),
        (
            read("fixture-b.key.pem")
                .trim_end()
                .trim_end_matches("-----END PRIVATE KEY-----")
                .to_string(),
            String::new(),
            "invalid key: PEM block \"PRIVATE KEY\" has no -----END PRIVATE KEY----- line",
        ),
    ];
    for (private_key_pem, public_key_pem, msg) in cases {
        let e = admin
            .rotate_key(v1::RotateKeyRequest {
                private_key_pem,
                public_key_pem,
                token_key_label: String::new(),
                algorithm: String::new(),
            })
            .await
            .expect_err(msg);
        assert_eq!(e.code(), Code::InvalidArgument, "{msg}");
        assert!(e.message().starts_with(msg), "{} vs {msg}", e.message());
    }
    assert_eq!(keys(&d).await.len(), 1, "refused imports change nothing");

    let r = admin
        .rotate_key(v1::RotateKeyRequest {
            private_key_pem: read("fixture-b.key.pem"),
            public_key_pem: read("fixture-b.pub.pem"),
            token_key_label: String::new(),
            algorithm: String::new(),
        })
        .await
        .expect("import")
        .into_inner();
    let b = tokenvault::keys::PublicKey::from_pem(&read("fixture-b.pub.pem")).expect("pem");
    assert_eq!(r.active.expect("active").fingerprint, b.id().to_hex());
    let again = admin
        .rotate_key(v1::RotateKeyRequest {
            private_key_pem: read("fixture-b.key.pem"),
            public_key_pem: String::new(),
            token_key_label: String::new(),
            algorithm: String::new(),
        })
        .await
        .expect_err("duplicate");
    assert_eq!(again.code(), Code::AlreadyExists);
    assert_eq!(d.rewrap().await.rewrapped, 2);
    assert_eq!(
        d.get("r1").await.expect("get").into_inner().secret,
        b"secret-1"
    );
    d.stop().await;
}

/// `[admin] approvals_required = 2`: destroying, cancelling and deleting an owner wait for a
/// second admin identity; the requester cannot approve itself, a request lapses, one approval
/// acts once; rotation, rewrap and retirement never wait.
#[tokio::test]
async fn the_two_person_rule_holds_destroy_cancel_and_delete_owner() {
    use tokenvault::config::{CredentialEntry, Role};
    use tokenvault::secret::ApiCredential;
    const SECOND: &str = "tv_test_second_admin_credential_0123456789";
    let dir = tempfile::tempdir().expect("tempdir");
    let mut cfg = config(dir.path());
    cfg.admin.approvals_required = 2;
    cfg.credentials.push(CredentialEntry::for_credential(
        "secteam-2",
        Role::Admin,
        &ApiCredential::new(SECOND.into()),
    ));
    let store = tokenvault::store::RocksStore::open(&cfg.data_dir, 8 << 20).expect("store");
    let clock = TestClock::new();
    let d = TestDaemon::start_with_clock(cfg.clone(), std::sync::Arc::new(store), &clock).await;
    d.seed("r", 5).await;
    let mut first = d.admin(ADMIN).await;
    let mut second = d.admin(SECOND).await;

    // Rotation, rewrap and retirement act at once.
    first
        .rotate_key(v1::RotateKeyRequest::default())
        .await
        .expect("rotate");
    assert_eq!(d.rewrap().await.rewrapped, 5);
    first
        .retire_key(v1::RetireKeyRequest { version: 1 })
        .await
        .expect("retire");

    // Destroy is held: nothing changes until a second identity approves.
    let held = first
        .destroy_key(v1::DestroyKeyRequest { version: 1 })
        .await
        .expect("destroy")
        .into_inner();
    let request = held.approval.expect("held");
    assert_eq!(
        (
            request.action.as_str(),
            request.target.as_str(),
            request.required,
            request.approvals.clone()
        ),
        ("DestroyKey", "v1", 2, vec!["secteam".to_string()])
    );
    assert_eq!(request.expires_at, d.vault.now() + 3_600);
    assert_eq!(
        held.key.expect("key").state,
        v1::KeyState::Retired as i32,
        "nothing changed yet"
    );
    assert_eq!(state(&keys(&d).await, 1), v1::KeyState::Retired);
    // The requester cannot approve its own request; a malformed or unknown id is refused.
    let e = first
        .approve(v1::ApproveRequest {
            id: request.id.clone(),
        })
        .await
        .expect_err("self-approval");
    assert_eq!(
        (e.code(), e.message()),
        (
            Code::PermissionDenied,
            format!(
                "secteam already agreed to approval request {}: another admin identity must approve it",
                request.id
            )
            .as_str()
        )
    );
    let e = second
        .approve(v1::ApproveRequest {
            id: "not-an-id".into(),
        })
        .await
        .expect_err("bad id");
    assert_eq!(e.code(), Code::InvalidArgument);
    let e = second
        .approve(v1::ApproveRequest { id: "0".repeat(32) })
        .await
        .expect_err("unknown");
    assert_eq!(e.code(), Code::NotFound);
    // A worker cannot approve.
    let e = d.channel().await.clone();
    let mut worker = v1::admin_client::AdminClient::new(
        tonic::service::interceptor::InterceptedService::new(e, Bearer::new(WORKER)),
    );
    let e = worker
        .approve(v1::ApproveRequest {
            id: request.id.clone(),
        })
        .await
        .expect_err("worker");
    assert_eq!(e.code(), Code::PermissionDenied);
    assert_eq!(state(&keys(&d).await, 1), v1::KeyState::Retired);

    // The second identity approves: the destruction is scheduled, once.
    let approved = second
        .approve(v1::ApproveRequest {
            id: request.id.clone(),
        })
        .await
        .expect("approve")
        .into_inner();
    assert!(approved.executed);
    assert!(
        approved
            .outcome
            .starts_with("v1 is pending destruction until "),
        "{}",
        approved.outcome
    );
    assert_eq!(
        approved.request.expect("request").approvals,
        vec!["secteam".to_string(), "secteam-2".to_string()]
    );
    assert_eq!(state(&keys(&d).await, 1), v1::KeyState::PendingDestruction);
    let e = second
        .approve(v1::ApproveRequest {
            id: request.id.clone(),
        })
        .await
        .expect_err("acted once");
    assert_eq!(e.code(), Code::NotFound);

    // Cancel is held too; an unapproved request lapses.
    let held = second
        .cancel_destroy_key(v1::CancelDestroyKeyRequest { version: 1 })
        .await
        .expect("cancel")
        .into_inner()
        .approval
        .expect("held");
    assert_eq!(held.approvals, vec!["secteam-2".to_string()]);
    let lapsed = held.id.clone();
    clock.advance(3_600);
    let e = first
        .approve(v1::ApproveRequest {
            id: held.id.clone(),
        })
        .await
        .expect_err("expired");
    assert_eq!(e.code(), Code::FailedPrecondition);
    assert!(e.message().contains("expired"), "{}", e.message());
    assert_eq!(state(&keys(&d).await, 1), v1::KeyState::PendingDestruction);

    // DeleteOwner waits for its approval, then deletes.
    let held = first
        .delete_owner(v1::DeleteOwnerRequest {
            owner: "o".into(),
            ..Default::default()
        })
        .await
        .expect("delete owner")
        .into_inner();
    assert_eq!(held.deleted, 0);
    let request = held.approval.expect("held");
    assert_eq!(
        d.get("r1").await.expect("still there").into_inner().secret,
        b"secret-1"
    );
    let approved = second
        .approve(v1::ApproveRequest { id: request.id })
        .await
        .expect("approve")
        .into_inner();
    assert_eq!(approved.outcome, "5 record(s) deleted");
    assert_eq!(
        d.get("r1").await.expect_err("deleted").code(),
        Code::NotFound
    );

    // Changing the minimum decryption version is held too.
    let held = first
        .set_min_decrypt_version(v1::SetMinDecryptVersionRequest { version: 2 })
        .await
        .expect("set min")
        .into_inner();
    assert_eq!(held.minimum, 0, "unchanged until approved");
    let approved = second
        .approve(v1::ApproveRequest {
            id: held.approval.expect("held").id,
        })
        .await
        .expect("approve")
        .into_inner();
    assert_eq!(approved.outcome, "the minimum decryption version is v2");

    // Every request, approval and refusal is in the audit trail.
    let events = d.audit_events(v1::AuditLogRequest::default()).await;
    let count = |action: &str, outcome: &str| {
        events
            .iter()
            .filter(|e| e.action == action && e.outcome == outcome)
            .count()
    };
    assert_eq!(count("RequestApproval", "ok"), 4);
    assert_eq!(count("Approve", "ok"), 3);
    assert!(count("Approve", "PermissionDenied") >= 1);
    assert_eq!(count("Approve", "FailedPrecondition"), 1);

    // A lapsed request is swept from the store (at start, then every ten minutes); one still
    // running is kept. Here: the cancel request above lapsed; a new one has an hour left.
    let running = first
        .delete_owner(v1::DeleteOwnerRequest {
            owner: "nobody".into(),
            ..Default::default()
        })
        .await
        .expect("delete owner")
        .into_inner()
        .approval
        .expect("held");
    d.stop().await;
    let later = TestClock::new();
    later.advance(3_600 + 60);
    let store = tokenvault::store::RocksStore::open(&cfg.data_dir, 8 << 20).expect("store");
    let d = TestDaemon::start_with_clock(cfg, std::sync::Arc::new(store), &later).await;
    let mut second = d.admin(SECOND).await;
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    loop {
        let e = second
            .approve(v1::ApproveRequest { id: lapsed.clone() })
            .await
            .expect_err("lapsed");
        if e.code() == Code::NotFound {
            break;
        }
        assert_eq!(e.code(), Code::FailedPrecondition, "{e:?}");
        assert!(
            std::time::Instant::now() < deadline,
            "the lapsed request was not swept"
        );
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    let approved = second
        .approve(v1::ApproveRequest { id: running.id })
        .await
        .expect("kept")
        .into_inner();
    assert_eq!(approved.outcome, "0 record(s) deleted");
    d.stop().await;
}

/// `Admin.SetMinDecryptVersion`: at run time, kept across a restart, never above the active
/// version, and held by the two-person rule.
#[tokio::test]
async fn the_minimum_decryption_version_is_set_at_run_time_and_kept() {
    let dir = tempfile::tempdir().expect("tempdir");
    let d = TestDaemon::start(dir.path()).await;
    d.seed("r", 3).await;
    let mut admin = d.admin(ADMIN).await;
    admin
        .rotate_key(v1::RotateKeyRequest::default())
        .await
        .expect("rotate");
    let e = admin
        .set_min_decrypt_version(v1::SetMinDecryptVersionRequest { version: 3 })
        .await
        .expect_err("above the active version");
    assert_eq!(e.code(), Code::InvalidArgument);
    assert_eq!(
        e.message(),
        "invalid version: 3 is above the active version 2: every envelope would be refused"
    );
    assert_eq!(
        d.get("r1")
            .await
            .expect("v1 still opens")
            .into_inner()
            .secret,
        b"secret-1"
    );
    let set = admin
        .set_min_decrypt_version(v1::SetMinDecryptVersionRequest { version: 2 })
        .await
        .expect("set")
        .into_inner();
    assert_eq!((set.minimum, set.approval), (2, None));
    let e = d.get("r1").await.expect_err("below the minimum");
    assert_eq!(e.code(), Code::FailedPrecondition);
    assert!(
        e.message()
            .contains("below the minimum decryption version 2"),
        "{}",
        e.message()
    );
    // Kept across a restart.
    d.stop().await;
    let d = TestDaemon::start(dir.path()).await;
    assert_eq!(
        d.get("r1").await.expect_err("still refused").code(),
        Code::FailedPrecondition
    );
    // Lowered again: v1 opens.
    d.admin(ADMIN)
        .await
        .set_min_decrypt_version(v1::SetMinDecryptVersionRequest { version: 0 })
        .await
        .expect("lower");
    assert_eq!(
        d.get("r1").await.expect("opens").into_inner().secret,
        b"secret-1"
    );
    let events = d.audit_events(v1::AuditLogRequest::default()).await;
    assert_eq!(
        events
            .iter()
            .filter(|e| e.action == "SetMinDecryptVersion" && e.outcome == "ok")
            .count(),
        2
    );
    assert_eq!(
        events
            .iter()
            .filter(|e| e.action == "SetMinDecryptVersion" && e.outcome == "InvalidArgument")
            .count(),
        1
    );
    d.stop().await;
}
