//! The real daemon over real gRPC on loopback against a real RocksDB in a temp dir.

use crate::common;

use common::*;
use tokenvault::Sealer;
use tokenvault::api::SealRecord as _;
use tokenvault::api::v1;
use tokenvault::envelope::format::HEADER_LEN;
use tokenvault::keys::PublicKey;
use tokenvault::record::{RecordMeta, SecretKind};
use tokenvault::secret::Secret;
use tonic::Code;

async fn stats(d: &TestDaemon) -> v1::StatsResponse {
    d.admin(ADMIN)
        .await
        .stats(v1::StatsRequest {})
        .await
        .expect("stats")
        .into_inner()
}

fn sealed(sealer: &Sealer, meta: &RecordMeta, secret: &[u8]) -> v1::SealedRecord {
    sealer
        .seal_record(meta, &Secret::new(secret.to_vec()))
        .expect("seal")
}

fn put_req(record: v1::SealedRecord) -> v1::PutSealedRequest {
    v1::PutSealedRequest {
        record: Some(record),
        expected_version: 0,
    }
}

#[tokio::test]
async fn seal_store_get_round_trip() {
    let dir = tempfile::tempdir().expect("tempdir");
    let d = TestDaemon::start(dir.path()).await;
    let m = meta("github:user-42", "user-42");
    assert_eq!(d.put(&m, b"gho_roundtrip_token").await, 1);
    let resp = d.get("github:user-42").await.expect("get").into_inner();
    assert_eq!(resp.secret, b"gho_roundtrip_token");
    let info = resp.info.expect("info");
    assert_eq!(
        (info.version, info.key_version, info.revoked),
        (1, 1, false)
    );
    let got = info.meta.expect("meta");
    assert_eq!(
        (got.id.as_str(), got.owner.as_str(), got.scopes),
        ("github:user-42", "user-42", vec!["repo".to_string()])
    );
    // Debug of the response never shows the secret.
    let resp = d.get("github:user-42").await.expect("get");
    assert!(!format!("{resp:?}").contains("gho_roundtrip_token"));

    // Replace with the right version; a stale writer is refused and changes nothing.
    let sealer = d.sealer().await;
    let mut ingest = d.ingest(INGEST).await;
    let replace = v1::PutSealedRequest {
        record: Some(sealed(&sealer, &m, b"gho_second")),
        expected_version: 1,
    };
    let v2 = ingest
        .put_sealed(replace.clone())
        .await
        .expect("replace")
        .into_inner();
    assert_eq!(v2.version, 2);
    // The same request again (a web tier retrying after UNAVAILABLE, not knowing whether its
    // write landed) answers the stored version and writes nothing, not even an audit event.
    let puts = || async {
        d.audit_events(v1::AuditLogRequest::default())
            .await
            .iter()
            .filter(|e| e.action == "PutSealed")
            .count()
    };
    let before = puts().await;
    let retried = ingest
        .put_sealed(replace)
        .await
        .expect("a blind retry of the write that landed succeeds")
        .into_inner();
    assert_eq!(retried.version, 2);
    assert_eq!(puts().await, before);
    let stale = ingest
        .put_sealed(v1::PutSealedRequest {
            record: Some(sealed(&sealer, &m, b"gho_stale")),
            expected_version: 1,
        })
        .await
        .expect_err("stale");
    assert_eq!(stale.code(), Code::Aborted);
    assert_eq!(
        stale.message(),
        "record github:user-42 is at version 2, not the expected 1"
    );
    let exists = ingest
        .put_sealed(put_req(sealed(&sealer, &m, b"gho_x")))
        .await
        .expect_err("exists");
    assert_eq!(exists.code(), Code::AlreadyExists);
    let secret = d.get(m.id.to_string()).await.expect("get");
    assert_eq!(secret.into_inner().secret, b"gho_second");
    d.stop().await;
}

#[tokio::test]
async fn every_role_boundary_holds() {
    let dir = tempfile::tempdir().expect("tempdir");
    let d = TestDaemon::start(dir.path()).await;
    d.put(&meta("rec", "o"), b"secret").await;
    let sealer = d.sealer().await;
    // (credential, may call Ingest, Broker, Admin)
    let cases = [
        (INGEST, [true, false, false]),
        (WORKER, [false, true, false]),
        (ADMIN, [false, false, true]),
    ];
    for (cred, allowed) in cases {
        let ingest = d
            .ingest(cred)
            .await
            .put_sealed(put_req(sealed(
                &sealer,
                &meta(&format!("new-{}", &cred[8..14]), "o"),
                b"s",
            )))
            .await;
        let broker = d
            .broker(cred)
            .await
            .get_token(v1::GetTokenRequest { id: "rec".into() })
            .await;
        let admin = d.admin(cred).await.stats(v1::StatsRequest {}).await;
        for (result, ok) in [
            (ingest.map(|_| ()), allowed[0]),
            (broker.map(|_| ()), allowed[1]),
            (admin.map(|_| ()), allowed[2]),
        ] {
            match (result, ok) {
                (Ok(()), true) => {}
                (Err(s), false) => {
                    assert_eq!(s.code(), Code::PermissionDenied, "{cred}: {s:?}");
                    assert!(!s.message().contains(cred), "credential echoed");
                }
                (r, ok) => panic!("{cred}: expected allowed={ok}, got {r:?}"),
            }
        }
    }
    for cred in ["", "tv_not_a_real_credential"] {
        let e = d
            .broker(cred)
            .await
            .get_token(v1::GetTokenRequest { id: "rec".into() })
            .await
            .expect_err("unauth");
        assert_eq!(e.code(), Code::Unauthenticated);
        let e = d
            .ingest(cred)
            .await
            .public_keys(v1::PublicKeysRequest {})
            .await
            .expect_err("unauth");
        assert_eq!(e.code(), Code::Unauthenticated);
        let e = d
            .admin(cred)
            .await
            .delete(v1::DeleteRequest {
                id: "rec".into(),
                ..Default::default()
            })
            .await
            .expect_err("unauth");
        assert_eq!(e.code(), Code::Unauthenticated);
    }
    // Nothing the refused callers tried changed anything.
    assert_eq!(stats(&d).await.records, 2);
    d.stop().await;
}

#[tokio::test]
async fn malformed_ingest_is_refused_precisely_and_changes_nothing() {
    let dir = tempfile::tempdir().expect("tempdir");
    let d = TestDaemon::start(dir.path()).await;
    d.put(&meta("existing", "o"), b"keep-me").await;
    let sealer = d.sealer().await;
    let good = sealed(&sealer, &meta("new", "o"), b"s");
    let other_key = PublicKey::from_pem(
        &std::fs::read_to_string(fixture_path("keys/test/fixture-b.pub.pem")).expect("pem"),
    )
    .expect("key");
    let foreign = Sealer::new(other_key)
        .seal_record(&meta("new", "o"), &Secret::new(b"s".to_vec()))
        .expect("seal");

    let with_meta = |f: &dyn Fn(&mut v1::RecordMeta)| {
        let mut r = good.clone();
        f(r.meta.as_mut().expect("meta"));
        put_req(r)
    };
    let with_env = |f: &dyn Fn(&mut Vec<u8>)| {
        let mut r = good.clone();
        f(&mut r.envelope);
        put_req(r)
    };
    let cases: Vec<(&str, v1::PutSealedRequest, Code, &str)> = vec![
        (
            "no record",
            v1::PutSealedRequest::default(),
            Code::InvalidArgument,
            "record is required",
        ),
        (
            "no meta",
            put_req(v1::SealedRecord {
                meta: None,
                envelope: good.envelope.clone(),
            }),
            Code::InvalidArgument,
            "record.meta is required",
        ),
        (
            "bad id charset",
            with_meta(&|m| m.id = "has space".into()),
            Code::InvalidArgument,
            "invalid record metadata: record id contains a character outside",
        ),
        (
            "id too long",
            with_meta(&|m| m.id = "a".repeat(129)),
            Code::InvalidArgument,
            "record id is 129 bytes, longer than the limit of 128",
        ),
        (
            "empty owner",
            with_meta(&|m| m.owner = String::new()),
            Code::InvalidArgument,
            "owner must not be empty",
        ),
        (
            "unknown kind",
            with_meta(&|m| m.kind = 99),
            Code::InvalidArgument,
            "kind must be one of",
        ),
        (
            "unspecified kind",
            with_meta(&|m| m.kind = 0),
            Code::InvalidArgument,
            "kind must be one of",
        ),
        (
            "negative expiry",
            with_meta(&|m| m.expires_at = -5),
            Code::InvalidArgument,
            "expires_at",
        ),
        (
            "empty envelope",
            with_env(&|e| e.clear()),
            Code::InvalidArgument,
            "malformed envelope: envelope is truncated",
        ),
        (
            "bad magic",
            with_env(&|e| e[0] = b'Z'),
            Code::InvalidArgument,
            "bad magic",
        ),
        (
            "unknown version",
            with_env(&|e| e[3] = 7),
            Code::InvalidArgument,
            "unknown envelope format version 7",
        ),
        (
            "truncated",
            with_env(&|e| e.truncate(HEADER_LEN + 100)),
            Code::InvalidArgument,
            "truncated",
        ),
        (
            "wrong wrapped length",
            with_env(&|e| {
                // Claim 257 bytes of wrapped key: structurally fine, but not this key's size.
                e[36..38].copy_from_slice(&257u16.to_be_bytes());
            }),
            Code::InvalidArgument,
            "wrapped data key is 257 bytes but key version 1 needs 256",
        ),
        (
            "unknown key",
            put_req(foreign),
            Code::InvalidArgument,
            "sealed under unknown key",
        ),
    ];
    let mut ingest = d.ingest(INGEST).await;
    for (name, req, code, msg) in cases {
        let e = ingest.put_sealed(req).await.expect_err(name);
        assert_eq!(e.code(), code, "{name}: {e:?}");
        assert!(
            e.message().contains(msg),
            "{name}: {:?} lacks {msg:?}",
            e.message()
        );
    }
    assert_eq!(stats(&d).await.records, 1);
    let kept = d.get("existing").await.expect("get");
    assert_eq!(kept.into_inner().secret, b"keep-me");
    d.stop().await;
}

#[tokio::test]
async fn batches_are_atomic_and_bounded() {
    let dir = tempfile::tempdir().expect("tempdir");
    let d = TestDaemon::start(dir.path()).await;
    let sealer = d.sealer().await;
    let mut ingest = d.ingest(INGEST).await;
    let items: Vec<_> = (0..5)
        .map(|i| put_req(sealed(&sealer, &meta(&format!("b{i}"), "o"), b"s")))
        .collect();

    let mut bad = items.clone();
    bad[2]
        .record
        .as_mut()
        .expect("record")
        .envelope
        .truncate(10);
    let e = ingest
        .put_sealed_batch(v1::PutSealedBatchRequest { items: bad })
        .await
        .expect_err("bad item");
    assert_eq!(e.code(), Code::InvalidArgument);
    assert!(
        e.message().starts_with("item 2: malformed envelope"),
        "{}",
        e.message()
    );

    let mut dup = items.clone();
    dup.push(items[0].clone());
    let e = ingest
        .put_sealed_batch(v1::PutSealedBatchRequest { items: dup })
        .await
        .expect_err("dup");
    assert_eq!(e.code(), Code::InvalidArgument);
    assert_eq!(e.message(), "record b0 appears twice in one batch");

    let e = ingest
        .put_sealed_batch(v1::PutSealedBatchRequest { items: vec![] })
        .await
        .expect_err("empty");
    assert_eq!(
        (e.code(), e.message()),
        (Code::InvalidArgument, "batch is empty")
    );

    let one = sealed(&sealer, &meta("x", "o"), b"s");
    let too_many: Vec<_> = (0..1001)
        .map(|i| {
            let mut r = one.clone();
            r.meta.as_mut().expect("meta").id = format!("x{i}");
            put_req(r)
        })
        .collect();
    let e = ingest
        .put_sealed_batch(v1::PutSealedBatchRequest { items: too_many })
        .await
        .expect_err("too many");
    assert_eq!(
        (e.code(), e.message()),
        (
            Code::ResourceExhausted,
            "batch of 1001 records exceeds the limit of 1000"
        )
    );
    // No retry gets past a size limit: standard clients are told not to retry.
    assert_eq!(pushback(&e).as_deref(), Some("-1"));
    assert_eq!(stats(&d).await.records, 0, "no failed batch wrote anything");

    let ok = ingest
        .put_sealed_batch(v1::PutSealedBatchRequest { items })
        .await
        .expect("batch")
        .into_inner();
    assert_eq!(ok.versions, vec![1; 5]);
    assert_eq!(stats(&d).await.records, 5);

    // A stale expected version refuses the batch and names the item (docs/WEB_TIER.md).
    let mut stale: Vec<_> = (0..3)
        .map(|i| {
            let mut r = put_req(sealed(&sealer, &meta(&format!("b{i}"), "o"), b"t"));
            r.expected_version = 1;
            r
        })
        .collect();
    stale[2].expected_version = 7;
    let e = ingest
        .put_sealed_batch(v1::PutSealedBatchRequest { items: stale })
        .await
        .expect_err("stale item");
    assert_eq!(e.code(), Code::Aborted);
    assert!(e.message().starts_with("item 2: "), "{}", e.message());
    {
        use tonic_types::StatusExt as _;
        let info = e.get_details_error_info().expect("ErrorInfo");
        assert_eq!(info.reason, "STALE_VERSION");
        assert_eq!(info.metadata["item"], "2");
        assert_eq!(info.metadata["expected_version"], "7");
        assert_eq!(info.metadata["current_version"], "1");
    }
    // Nothing of the refused batch was written.
    assert_eq!(d.get("b0").await.expect("get").into_inner().secret, b"s");
    d.stop().await;
}

#[tokio::test]
async fn oversized_requests_are_resource_exhausted() {
    let dir = tempfile::tempdir().expect("tempdir");
    let d = TestDaemon::start(dir.path()).await;
    let sealer = d.sealer().await;
    let mut r = sealed(&sealer, &meta("big", "o"), b"s");
    r.envelope = vec![0u8; 5 * 1024 * 1024];
    let e = d
        .ingest(INGEST)
        .await
        .put_sealed(put_req(r))
        .await
        .expect_err("too big");
    assert_eq!(e.code(), Code::ResourceExhausted, "{e:?}");
    assert!(
        e.message().starts_with("request too large"),
        "{}",
        e.message()
    );
    assert_eq!(pushback(&e).as_deref(), Some("-1"));
    // An envelope under the request limit but over the format limit is a format error.
    let mut r = sealed(&sealer, &meta("big", "o"), b"s");
    r.envelope.resize(200 * 1024, 0);
    let e = d
        .ingest(INGEST)
        .await
        .put_sealed(put_req(r))
        .await
        .expect_err("too big envelope");
    assert_eq!(e.code(), Code::InvalidArgument);
    assert!(
        e.message().contains("larger than the limit"),
        "{}",
        e.message()
    );
    assert_eq!(stats(&d).await.records, 0);
    d.stop().await;
}

#[tokio::test]
async fn get_token_refusals() {
    let dir = tempfile::tempdir().expect("tempdir");
    let d = TestDaemon::start(dir.path()).await;
    let mut expired = meta("expired", "o");
    expired.expires_at = Some(1_000_000);
    d.put(&expired, b"old").await;
    d.put(&meta("revoked", "o"), b"r").await;
    d.put(&meta("fine", "o"), b"fine-secret").await;
    d.revoke("revoked").await.expect("revoke");
    // A web tier that binds an envelope to one owner but files it under another: ingest cannot
    // tell, the broker can, and no other record is affected.
    let sealer = d.sealer().await;
    let mut misbound = sealed(&sealer, &meta("misbound", "alice"), b"stolen?");
    misbound.meta.as_mut().expect("meta").owner = "mallory".into();
    d.ingest(INGEST)
        .await
        .put_sealed(put_req(misbound))
        .await
        .expect("ingest accepts structure");

    let mut broker = d.broker(WORKER).await;
    let cases = [
        ("nope", Code::NotFound, "no record with id nope"),
        (
            "bad id!",
            Code::InvalidArgument,
            "invalid record id: record id contains a character outside [A-Za-z0-9._:@/+=-]",
        ),
        (
            "",
            Code::InvalidArgument,
            "invalid record id: record id must not be empty",
        ),
        (
            "revoked",
            Code::FailedPrecondition,
            "record revoked is revoked",
        ),
        (
            "expired",
            Code::FailedPrecondition,
            "record expired expired at 1000000 (Unix seconds)",
        ),
        (
            "misbound",
            Code::DataLoss,
            "record misbound: decryption failed: the envelope does not authenticate for this record",
        ),
    ];
    for (id, code, msg) in cases {
        let e = broker
            .get_token(v1::GetTokenRequest { id: id.into() })
            .await
            .expect_err(id);
        assert_eq!(e.code(), code, "{id}");
        assert_eq!(e.message(), msg, "{id}");
    }
    let ok = broker
        .get_token(v1::GetTokenRequest { id: "fine".into() })
        .await
        .expect("fine");
    assert_eq!(ok.into_inner().secret, b"fine-secret");
    d.stop().await;
}

#[tokio::test]
async fn admin_revoke_delete_owner_stats_and_keys() {
    let dir = tempfile::tempdir().expect("tempdir");
    let d = TestDaemon::start(dir.path()).await;
    for (id, owner) in [
        ("a1", "alice"),
        ("a2", "alice"),
        ("b1", "bob"),
        ("al", "alice2"),
    ] {
        d.put(&meta(id, owner), b"s").await;
    }
    let mut admin = d.admin(ADMIN).await;
    let info = admin
        .revoke(v1::RevokeRequest {
            id: "b1".into(),
            ..Default::default()
        })
        .await
        .expect("revoke")
        .into_inner()
        .info
        .expect("info");
    assert!(info.revoked);
    assert_eq!(info.version, 2);
    let s = stats(&d).await;
    assert_eq!((s.records, s.revoked), (4, 1));
    assert_eq!(
        s.records_per_key_version,
        vec![v1::KeyVersionCount {
            key_version: 1,
            records: 4
        }]
    );

    admin
        .delete(v1::DeleteRequest {
            id: "a1".into(),
            ..Default::default()
        })
        .await
        .expect("delete");
    let e = admin
        .delete(v1::DeleteRequest {
            id: "a1".into(),
            ..Default::default()
        })
        .await
        .expect_err("gone");
    assert_eq!(e.code(), Code::NotFound);
    let e = d.get("a1").await.expect_err("gone");
    assert_eq!(e.code(), Code::NotFound);
    let e = admin
        .revoke(v1::RevokeRequest {
            id: "zz".into(),
            ..Default::default()
        })
        .await
        .expect_err("unknown");
    assert_eq!(e.code(), Code::NotFound);
    let e = admin
        .delete_owner(v1::DeleteOwnerRequest {
            owner: "bad\u{0}owner".into(),
            ..Default::default()
        })
        .await
        .expect_err("bad");
    assert_eq!(e.code(), Code::InvalidArgument);

    let n = admin
        .delete_owner(v1::DeleteOwnerRequest {
            owner: "alice".into(),
            ..Default::default()
        })
        .await
        .expect("owner")
        .into_inner();
    assert_eq!(
        n.deleted, 1,
        "a2 only: a1 already deleted, alice2 is someone else"
    );
    assert_eq!(stats(&d).await.records, 2);

    let keys = admin
        .list_keys(v1::ListKeysRequest {})
        .await
        .expect("keys")
        .into_inner()
        .keys;
    assert_eq!(keys.len(), 1);
    assert_eq!(keys[0].state, v1::KeyState::Active as i32);
    let pk = PublicKey::from_pem(&keys[0].spki_pem).expect("pem");
    assert_eq!(pk.id().to_hex(), keys[0].fingerprint);
    assert_eq!(pk.bits(), Some(2048));
    d.stop().await;
}

#[tokio::test]
async fn restart_and_offline_rotation_keep_every_record_readable() {
    let dir = tempfile::tempdir().expect("tempdir");
    let d = TestDaemon::start(dir.path()).await;
    d.put(&meta("before", "o"), b"sealed-under-v1").await;
    let v1_fp = d.sealer().await.public_key().id();
    d.stop().await;

    // Offline rotation, as `tokenvault keys rotate` does it.
    {
        let cfg = config(dir.path());
        let store = tokenvault::store::RocksStore::open(&cfg.data_dir, 1 << 20).expect("open");
        let kd = tokenvault::keys::keyring::KeyDir::new(&cfg.key_dir, None);
        let key = tokenvault::keys::PrivateKey::generate().expect("gen");
        tokenvault::rotation::add_version(&store, &kd, key, tokenvault::unix_now())
            .expect("rotate");
    }

    let d = TestDaemon::start(dir.path()).await;
    let sealer = d.sealer().await;
    assert_ne!(
        sealer.public_key().id(),
        v1_fp,
        "PublicKeys serves the new version"
    );
    d.put(&meta("after", "o"), b"sealed-under-v2").await;
    let mut broker = d.broker(WORKER).await;
    for (id, secret, kv) in [
        ("before", &b"sealed-under-v1"[..], 1),
        ("after", &b"sealed-under-v2"[..], 2),
    ] {
        let r = broker
            .get_token(v1::GetTokenRequest { id: id.into() })
            .await
            .expect(id)
            .into_inner();
        assert_eq!(r.secret, secret);
        assert_eq!(r.info.expect("info").key_version, kv);
    }
    // Envelopes sealed under the now decrypt-only v1 are still accepted (web tiers catch up).
    let keys = d
        .admin(ADMIN)
        .await
        .list_keys(v1::ListKeysRequest {})
        .await
        .expect("keys")
        .into_inner()
        .keys;
    let old = keys.iter().find(|k| k.version == 1).expect("v1");
    assert_eq!(old.state, v1::KeyState::DecryptOnly as i32);
    let old_sealer = Sealer::from_pem(&old.spki_pem).expect("pem");
    let rec = old_sealer
        .seal_record(&meta("late", "o"), &Secret::new(b"late".to_vec()))
        .expect("seal");
    d.ingest(INGEST)
        .await
        .put_sealed(put_req(rec))
        .await
        .expect("decrypt-only key accepted");
    let s = stats(&d).await;
    assert_eq!(
        s.records_per_key_version,
        vec![
            v1::KeyVersionCount {
                key_version: 1,
                records: 2
            },
            v1::KeyVersionCount {
                key_version: 2,
                records: 1
            }
        ]
    );
    d.stop().await;
}

/// With every private-key thread in a call that does not return (a hung PKCS#11 token) for
/// `private_key_stuck_seconds`, health says NOT_SERVING, and SERVING again once one returns.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_is_not_serving_while_every_private_key_thread_is_stuck() {
    use tonic_health::pb::health_check_response::ServingStatus;
    let dir = tempfile::tempdir().expect("tempdir");
    let mut cfg = config(dir.path());
    cfg.limits.private_key_stuck = std::time::Duration::from_secs(1);
    let d = TestDaemon::start_with(cfg).await;
    let mut health = tonic_health::pb::health_client::HealthClient::new(d.channel().await);
    let mut until = async |want: ServingStatus| {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
        loop {
            let status = health
                .check(tonic_health::pb::HealthCheckRequest {
                    service: "tokenvault.v1.Broker".into(),
                })
                .await
                .expect("health")
                .into_inner()
                .status;
            if status == want as i32 {
                return;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "health never {want:?}"
            );
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        }
    };
    until(ServingStatus::Serving).await;
    let release = d.vault.occupy_private_key_threads();
    until(ServingStatus::NotServing).await;
    drop(release);
    until(ServingStatus::Serving).await;
    d.stop().await;
}

/// A call waiting for a private-key thread that never frees (every thread in a hung PKCS#11
/// call) is refused once it has waited `max_queue_wait_ms`, with a retry hint, instead of
/// waiting for as long as its client does; once a thread returns, calls are served again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_call_waiting_for_a_hung_private_key_thread_is_refused_after_max_queue_wait() {
    use tonic_types::StatusExt as _;
    let dir = tempfile::tempdir().expect("tempdir");
    let mut cfg = config(dir.path());
    cfg.limits.max_queue_wait = std::time::Duration::from_millis(200);
    let d = TestDaemon::start_with(cfg).await;
    d.seed("hung-", 2).await;
    let release = d.vault.occupy_private_key_threads();
    let started = std::time::Instant::now();
    let e = d.get("hung-0").await.expect_err("no thread frees");
    let waited = started.elapsed();
    assert_eq!(e.code(), Code::ResourceExhausted, "{e:?}");
    assert!(
        e.message()
            .starts_with("overloaded: waited 200 ms for a private-key thread (max_queue_wait_ms is 200); retry in "),
        "{}",
        e.message()
    );
    assert!(
        waited >= std::time::Duration::from_millis(200)
            && waited < std::time::Duration::from_secs(5),
        "{waited:?}"
    );
    // The hint is spread around the bound so refused callers do not all come back at once.
    let hint = e
        .get_details_retry_info()
        .and_then(|r| r.retry_delay)
        .expect("RetryInfo");
    assert!(
        (std::time::Duration::from_millis(100)..=std::time::Duration::from_millis(300))
            .contains(&hint),
        "{hint:?}"
    );
    // The same time as gRPC's standard retry pushback.
    assert_eq!(pushback(&e), Some(hint.as_millis().to_string()));
    drop(release);
    // The refused call's job is skipped when a thread reaches it; the next call is served.
    let got = d.get("hung-1").await.expect("served once a thread returns");
    assert!(!got.into_inner().secret.is_empty());
    let metrics = d.vault.metrics().encode(&d.vault);
    assert!(
        metrics.contains(r#"tokenvault_shed_total{outcome="queue_wait"} 1"#),
        "{metrics}"
    );
    d.stop().await;
}

/// A stock gRPC client (Python grpcio) configured with deploy/grpc-service-config.json and no
/// retry code of its own: its call is shed while the private-key threads are held, and it tries
/// again after the daemon's `grpc-retry-pushback-ms`, by then successfully. Without
/// `RESOURCE_EXHAUSTED` in the shipped retry policy the call fails; without the pushback the
/// retry comes after the policy's own backoff (at most 100 ms) instead of the time the daemon
/// asks for.
#[tokio::test(flavor = "multi_thread")]
async fn a_stock_grpc_client_with_the_shipped_service_config_retries_a_shed_call_after_its_pushback()
 {
    use base64::Engine as _;
    use prost::Message as _;
    let dir = tempfile::tempdir().expect("tempdir");
    let mut cfg = config(dir.path());
    // A long bound, so the pushback (half to one and a half times it) stands out from the
    // policy's own backoff (at most 100 ms) and from the client's overheads.
    cfg.limits.max_queue_wait = std::time::Duration::from_millis(1000);
    let d = TestDaemon::start_with(cfg).await;
    d.seed("pushback-", 1).await;
    let shed = |d: &TestDaemon| {
        d.vault
            .metrics()
            .encode(&d.vault)
            .lines()
            .filter(|l| l.starts_with(r#"tokenvault_shed_total{outcome="queue_wait"} "#))
            .map(|l| l.rsplit(' ').next().unwrap_or("").to_string())
            .next()
            .unwrap_or_default()
    };
    let release = d.vault.occupy_private_key_threads();
    let request = base64::engine::general_purpose::STANDARD.encode(
        v1::GetTokenRequest {
            id: "pushback-0".into(),
        }
        .encode_to_vec(),
    );
    let python = std::env::var("TOKENVAULT_TEST_PYTHON").expect(
        "TOKENVAULT_TEST_PYTHON (set by ./scripts/test: the Python environment with grpcio)",
    );
    let client = tokio::process::Command::new(python)
        .arg(process::root().join("tests/lb/retrying_get.py"))
        .arg(d.addr.to_string())
        .arg(process::root().join("deploy/grpc-service-config.json"))
        .arg(request)
        .env("TOKENVAULT_WORKER_TOKEN", WORKER)
        .stdout(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("the Python client starts");
    // Its first attempt finds no private-key thread within 1 s and is shed; only then do the
    // threads come back, well inside the 0.5-1.5 s the pushback asks the client to wait.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    while shed(&d) != "1" {
        assert!(
            std::time::Instant::now() < deadline,
            "the first attempt was never shed"
        );
        tokio::time::sleep(std::time::Duration::from_millis(5)).await;
    }
    drop(release);
    let out = client.wait_with_output().await.expect("the client ends");
    let answer: serde_json::Value =
        serde_json::from_slice(&out.stdout).expect("one JSON line from the client");
    assert_eq!(answer["ok"], serde_json::json!(true), "{answer}");
    assert!(answer["response_bytes"].as_u64() > Some(0), "{answer}");
    // 1 s waiting for a thread, then at least the pushback's 0.5 s before the retry (without
    // the pushback: 1 s and the policy's backoff of at most 0.1 s).
    assert!(answer["elapsed_ms"].as_u64() >= Some(1500), "{answer}");
    // Shed once: the retry came after the pushback, when a thread was free.
    assert_eq!(shed(&d), "1");
    d.stop().await;
}

#[tokio::test]
async fn health_and_reflection_serve_generic_clients() {
    use tokenvault_test_reflection as reflection;
    let dir = tempfile::tempdir().expect("tempdir");
    let d = TestDaemon::start(dir.path()).await;
    let mut health = tonic_health::pb::health_client::HealthClient::new(d.channel().await);
    for service in [
        "",
        "tokenvault.v1.Ingest",
        "tokenvault.v1.Broker",
        "tokenvault.v1.Admin",
    ] {
        let r = health
            .check(tonic_health::pb::HealthCheckRequest {
                service: service.into(),
            })
            .await
            .expect("health")
            .into_inner();
        assert_eq!(
            r.status,
            tonic_health::pb::health_check_response::ServingStatus::Serving as i32,
            "{service}"
        );
    }
    // Clients that speak only grpc.reflection.v1 (grpcurl 1.9+) or only v1alpha (grpcurl 1.8,
    // Python's grpcio-reflection) both list the services.
    for services in [
        reflection::v1::list_services(d.channel().await).await,
        reflection::v1alpha::list_services(d.channel().await).await,
    ] {
        for s in [
            "tokenvault.v1.Ingest",
            "tokenvault.v1.Broker",
            "tokenvault.v1.Admin",
            "grpc.health.v1.Health",
        ] {
            assert!(
                services.iter().any(|x| x == s),
                "{s} missing from {services:?}"
            );
        }
    }
    d.stop().await;
}

/// A reflection client for one protocol version: `v1` or `v1alpha` (the same messages in two
/// packages).
macro_rules! reflection_client {
    ($version:ident) => {
        pub mod $version {
            use tonic_reflection::pb::$version::ServerReflectionRequest;
            use tonic_reflection::pb::$version::server_reflection_client::ServerReflectionClient;
            use tonic_reflection::pb::$version::server_reflection_request::MessageRequest;
            use tonic_reflection::pb::$version::server_reflection_response::MessageResponse;

            pub async fn list_services(channel: tonic::transport::Channel) -> Vec<String> {
                let mut client = ServerReflectionClient::new(channel);
                let req = ServerReflectionRequest {
                    host: String::new(),
                    message_request: Some(MessageRequest::ListServices(String::new())),
                };
                let mut stream = client
                    .server_reflection_info(tokio_stream::iter(vec![req]))
                    .await
                    .expect("reflection")
                    .into_inner();
                let msg = stream
                    .message()
                    .await
                    .expect("message")
                    .expect("one response");
                match msg.message_response {
                    Some(MessageResponse::ListServicesResponse(l)) => {
                        l.service.into_iter().map(|s| s.name).collect()
                    }
                    other => panic!("unexpected reflection response {other:?}"),
                }
            }
        }
    };
}

mod tokenvault_test_reflection {
    reflection_client!(v1);
    reflection_client!(v1alpha);
}

#[tokio::test]
async fn kinds_round_trip_over_the_wire() {
    let dir = tempfile::tempdir().expect("tempdir");
    let d = TestDaemon::start(dir.path()).await;
    for (i, kind) in SecretKind::ALL.into_iter().enumerate() {
        let m = RecordMeta::parse(&format!("k{i}"), "o", "prov", kind, &[], 0).expect("valid");
        d.put(&m, format!("secret-{i}").as_bytes()).await;
        let r = d.get(format!("k{i}")).await.expect("get").into_inner();
        assert_eq!(
            r.info.expect("info").meta.expect("meta").kind,
            v1::SecretKind::from(kind) as i32
        );
        assert_eq!(r.secret, format!("secret-{i}").as_bytes());
    }
    d.stop().await;
}

#[tokio::test]
async fn retired_keys_are_refused_at_ingest_and_at_open() {
    use tokenvault::keys::{KeyState, keyring};
    use tokenvault::store::prelude::*;
    let dir = tempfile::tempdir().expect("tempdir");
    let d = TestDaemon::start(dir.path()).await;
    d.put(&meta("under-v1", "o"), b"v1-secret").await;
    let v1_sealer = d.sealer().await;
    d.stop().await;
    {
        // Rotate, then mark v1 retired, as the key-lifecycle tooling will.
        let cfg = config(dir.path());
        let store = tokenvault::store::RocksStore::open(&cfg.data_dir, 1 << 20).expect("open");
        let kd = keyring::KeyDir::new(&cfg.key_dir, None);
        tokenvault::rotation::add_version(
            &store,
            &kd,
            tokenvault::keys::PrivateKey::generate().expect("gen"),
            7,
        )
        .expect("rotate");
        let mut v1 = store
            .keys()
            .expect("keys")
            .into_iter()
            .find(|k| k.version == 1)
            .expect("v1");
        v1.state = KeyState::Retired;
        store.put_keys_unaudited(&[v1]).expect("retire");
    }
    let d = TestDaemon::start(dir.path()).await;
    let rec = v1_sealer
        .seal_record(&meta("late", "o"), &Secret::new(b"x".to_vec()))
        .expect("seal");
    let e = d
        .ingest(INGEST)
        .await
        .put_sealed(put_req(rec))
        .await
        .expect_err("retired key");
    assert_eq!(e.code(), Code::FailedPrecondition);
    assert!(
        e.message().contains("key version 1, which is retired"),
        "{}",
        e.message()
    );
    let e = d
        .get("under-v1")
        .await
        .expect_err("retired key cannot open");
    assert_eq!(e.code(), Code::FailedPrecondition);
    assert_eq!(
        e.message(),
        "record under-v1: envelope is sealed under key version 1, which is retired"
    );
    assert_eq!(stats(&d).await.records, 1);
    d.stop().await;
}

#[tokio::test]
async fn the_ingest_only_listener_cannot_reach_broker_or_admin() {
    let dir = tempfile::tempdir().expect("tempdir");
    let cfg = config(dir.path());
    let daemon = tokio::task::spawn_blocking(move || tokenvault::server::Daemon::open(&cfg))
        .await
        .expect("join")
        .expect("open");
    let main = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let web = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let web_addr = web.local_addr().expect("addr");
    let (tx, rx) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn(daemon.serve_split(main, Some(web), async {
        let _ = rx.await;
    }));
    let channel = tonic::transport::Channel::from_shared(format!("http://{web_addr}"))
        .expect("uri")
        .connect()
        .await
        .expect("connect");
    let with = |cred: &str| {
        tonic::service::interceptor::InterceptedService::new(channel.clone(), Bearer::new(cred))
    };
    let pem = v1::ingest_client::IngestClient::new(with(INGEST))
        .public_keys(v1::PublicKeysRequest {})
        .await
        .expect("ingest works on the web port")
        .into_inner()
        .active
        .expect("active")
        .spki_pem;
    let rec = Sealer::from_pem(&pem)
        .expect("pem")
        .seal_record(&meta("web", "o"), &Secret::new(b"s".to_vec()))
        .expect("seal");
    v1::ingest_client::IngestClient::new(with(INGEST))
        .put_sealed(put_req(rec))
        .await
        .expect("put on the web port");
    let e = v1::broker_client::BrokerClient::new(with(WORKER))
        .get_token(v1::GetTokenRequest { id: "web".into() })
        .await
        .expect_err("no broker here");
    assert_eq!(e.code(), Code::Unimplemented, "{e:?}");
    let e = v1::admin_client::AdminClient::new(with(ADMIN))
        .stats(v1::StatsRequest {})
        .await
        .expect_err("no admin here");
    assert_eq!(e.code(), Code::Unimplemented, "{e:?}");
    // Nor Broker's HTTP routes: a worker credential reads nothing through the web port.
    for path in ["/v1/records/web:token", "/v1/proxy"] {
        let (status, _, body) = http_call(
            web_addr,
            "POST",
            path,
            &[
                ("authorization", format!("Bearer {WORKER}")),
                ("content-type", "application/json".into()),
            ],
            b"{}".to_vec(),
        )
        .await;
        assert_eq!(status, 404, "{path}: {}", String::from_utf8_lossy(&body));
    }
    let mut health = tonic_health::pb::health_client::HealthClient::new(channel.clone());
    let r = health
        .check(tonic_health::pb::HealthCheckRequest {
            service: "tokenvault.v1.Ingest".into(),
        })
        .await
        .expect("health");
    assert_eq!(
        r.into_inner().status,
        tonic_health::pb::health_check_response::ServingStatus::Serving as i32
    );
    let _ = tx.send(());
    server
        .await
        .expect("join")
        .expect("clean shutdown of both listeners");
}

#[tokio::test]
async fn every_response_carries_a_request_id() {
    let dir = tempfile::tempdir().expect("tempdir");
    let d = TestDaemon::start(dir.path()).await;
    d.put(&meta("r", "o"), b"s").await;
    let mut broker = d.broker(WORKER).await;
    let call = |id: Option<&str>| {
        let mut req = tonic::Request::new(v1::GetTokenRequest { id: "r".into() });
        if let Some(id) = id {
            req.metadata_mut()
                .insert("x-request-id", id.parse().expect("ascii"));
        }
        req
    };
    let given = broker
        .get_token(call(Some("trace-42.a_b")))
        .await
        .expect("get");
    assert_eq!(
        given
            .metadata()
            .get("x-request-id")
            .map(|v| v.to_str().expect("ascii")),
        Some("trace-42.a_b")
    );
    // An implausible id is replaced, and errors carry one too.
    let err = broker.get_token(call(Some("no spaces or ; please"))).await;
    let fresh = err.expect("get");
    let id = fresh
        .metadata()
        .get("x-request-id")
        .expect("id")
        .to_str()
        .expect("ascii");
    assert_eq!(id.len(), 16);
    let refused = broker
        .get_token(tonic::Request::new(v1::GetTokenRequest {
            id: "missing".into(),
        }))
        .await
        .expect_err("not found");
    assert!(refused.metadata().get("x-request-id").is_some());
}

/// Concurrent single puts share durable writes (group commit) without losing their own
/// outcome: distinct ids all land, racing creates of one id have exactly one winner, and
/// everything acknowledged survives a restart.
#[tokio::test]
async fn concurrent_puts_commit_together_with_independent_outcomes() {
    let dir = tempfile::tempdir().expect("tempdir");
    let d = TestDaemon::start(dir.path()).await;
    let sealer = d.sealer().await;
    let mut tasks = tokio::task::JoinSet::new();
    for i in 0..72 {
        let id = if i < 64 {
            format!("gc-{i}")
        } else {
            "gc-race".to_string()
        };
        let record = sealer
            .seal_record(&meta(&id, "o"), &Secret::new(format!("s-{i}").into_bytes()))
            .expect("seal");
        let mut ingest = d.ingest(INGEST).await;
        tasks.spawn(async move {
            ingest
                .put_sealed(v1::PutSealedRequest {
                    record: Some(record),
                    expected_version: 0,
                })
                .await
                .map(|r| r.into_inner().version)
                .map_err(|e| e.code())
        });
    }
    let mut ok = 0;
    let mut exists = 0;
    while let Some(r) = tasks.join_next().await {
        match r.expect("join") {
            Ok(1) => ok += 1,
            Err(Code::AlreadyExists) => exists += 1,
            other => panic!("unexpected outcome {other:?}"),
        }
    }
    assert_eq!((ok, exists), (65, 7));
    d.stop().await;
    let d = TestDaemon::start(dir.path()).await;
    for i in 0..64 {
        let got = d.get(format!("gc-{i}")).await.expect("durable");
        assert_eq!(got.into_inner().secret, format!("s-{i}").into_bytes());
    }
    d.get("gc-race").await.expect("the winner is stored");
}

/// A tester who alters the key fingerprint inside a stored envelope (bytes 4 and 35, the first
/// and last bytes of the 32-byte key id) gets DATA_LOSS naming the record, like any other
/// envelope that does not open for its record, not INTERNAL; the other records still open.
#[tokio::test]
async fn stored_envelope_with_altered_key_fingerprint_is_data_loss() {
    let dir = tempfile::tempdir().expect("tempdir");
    let d = TestDaemon::start(dir.path()).await;
    for id in ["fp-first", "fp-last", "intact"] {
        d.put(&meta(id, "o"), b"secret-bytes").await;
    }
    d.stop().await;
    {
        let cfg = config(dir.path());
        let store = tokenvault::store::RocksStore::open(&cfg.data_dir, 1 << 20).expect("open");
        use tokenvault::store::prelude::*;
        let mut items = Vec::new();
        for (id, byte) in [("fp-first", 4usize), ("fp-last", 35)] {
            let rid = tokenvault::record::RecordId::parse(id).expect("id");
            let rec = store.get_record(&rid).expect("get").expect("present");
            let mut envelope = rec.envelope.clone();
            envelope[byte] ^= 0x01;
            items.push(tokenvault::store::EnvelopeReplace {
                id: rid,
                expected_version: rec.version,
                envelope,
                key_version: rec.key_version,
            });
        }
        for r in store
            .replace_envelopes(&items, tokenvault::unix_now())
            .expect("tamper")
        {
            r.expect("replaced");
        }
    }
    let d = TestDaemon::start(dir.path()).await;
    for id in ["fp-first", "fp-last"] {
        let e = d.get(id).await.expect_err(id);
        assert_eq!(e.code(), Code::DataLoss, "{id}: {}", e.message());
        assert!(
            e.message().starts_with(&format!(
                "record {id}: envelope is sealed under unknown key "
            )),
            "{}",
            e.message()
        );
    }
    let ok = d.get("intact").await.expect("intact").into_inner();
    assert_eq!(ok.secret, b"secret-bytes");
    d.stop().await;
}

/// docs/ENVELOPE.md: a secret is 1 to 65,536 bytes. Ingest reads the secret's length from the
/// ciphertext (length - 16-byte tag) and refuses envelopes from any sealer outside that range,
/// singly and in a batch, storing nothing; the two boundaries are accepted.
#[tokio::test]
async fn ingest_enforces_the_documented_secret_length() {
    let dir = tempfile::tempdir().expect("tempdir");
    let d = TestDaemon::start(dir.path()).await;
    let sealer = d.sealer().await;
    // Another sealer's envelope: a valid header and wrapped key, with a ciphertext of any
    // length (Ingest cannot authenticate it; only its length matters here).
    let with_secret_len = |id: &str, len: usize| {
        let mut r = sealed(&sealer, &meta(id, "o"), b"x");
        r.envelope.truncate(HEADER_LEN + 256 + 12);
        r.envelope.resize(HEADER_LEN + 256 + 12 + len + 16, 0x5a);
        r
    };
    let mut ingest = d.ingest(INGEST).await;
    for len in [0usize, 65_537, 65_792] {
        let e = ingest
            .put_sealed(put_req(with_secret_len("bad", len)))
            .await
            .expect_err("out of range");
        assert_eq!(e.code(), Code::InvalidArgument, "{len}: {e:?}");
        assert_eq!(
            e.message(),
            format!("the sealed secret is {len} bytes; a secret must be 1 to 65536 bytes"),
        );
    }
    let e = ingest
        .put_sealed_batch(v1::PutSealedBatchRequest {
            items: vec![
                put_req(with_secret_len("ok-in-batch", 10)),
                put_req(with_secret_len("bad-in-batch", 0)),
            ],
        })
        .await
        .expect_err("batch with an empty secret");
    assert_eq!(e.code(), Code::InvalidArgument);
    assert!(
        e.message()
            .starts_with("item 1: the sealed secret is 0 bytes"),
        "{}",
        e.message()
    );
    assert_eq!(stats(&d).await.records, 0, "nothing stored");

    // The boundaries, sealed for real, are stored and served byte for byte.
    let max = vec![0x41u8; 65_536];
    d.put(&meta("one-byte", "o"), b"z").await;
    d.put(&meta("max-len", "o"), &max).await;
    assert_eq!(
        d.get("one-byte").await.expect("1").into_inner().secret,
        b"z"
    );
    assert_eq!(
        d.get("max-len").await.expect("max").into_inner().secret,
        max
    );
    d.stop().await;
}

/// From the moment shutdown begins, health answers NOT_SERVING (through the grace period, so
/// load balancers move away first), a long-running rewrap stops at its next page (resumable,
/// audited), and when `serve` returns nothing holds the store any more: it opens at once.
#[tokio::test]
async fn shutdown_reports_not_serving_stops_long_work_and_releases_the_store() {
    use tonic_health::pb::health_check_response::ServingStatus;
    let dir = tempfile::tempdir().expect("tempdir");
    let mut cfg = config(dir.path());
    cfg.shutdown_grace = std::time::Duration::from_secs(2);
    let mut d = TestDaemon::start_with(cfg).await;
    d.seed("r", 300).await;
    let mut admin = d.admin(ADMIN).await;
    admin
        .rotate_key(v1::RotateKeyRequest::default())
        .await
        .expect("rotate");
    // 300 records at 10/s: half a minute if nothing stopped it.
    let mut rewrap = admin
        .rewrap(v1::RewrapRequest {
            max_records_per_second: 10,
        })
        .await
        .expect("rewrap")
        .into_inner();
    rewrap
        .message()
        .await
        .expect("progress")
        .expect("first report");
    let health = tonic_health::pb::health_client::HealthClient::new(d.channel().await);
    let status = |service: &str| {
        let mut health = health.clone();
        let service = service.to_string();
        async move {
            health
                .check(tonic_health::pb::HealthCheckRequest { service })
                .await
                .expect("health")
                .into_inner()
                .status
        }
    };
    assert_eq!(status("").await, ServingStatus::Serving as i32);
    // The same status over HTTP, for load balancers that check with a GET (HAProxy).
    let addr = d.addr;
    let http_health = async |method: &str| {
        let (code, _, body) = http_call(addr, method, "/v1/health", &[], Vec::new()).await;
        let body: serde_json::Value = serde_json::from_slice(&body).expect("JSON");
        (code, body)
    };
    assert_eq!(
        http_health("GET").await,
        (200, serde_json::json!({ "status": "SERVING" }))
    );
    let (code, body) = http_health("POST").await;
    assert_eq!((code, body["code"].as_str()), (405, Some("UNIMPLEMENTED")));
    let started = std::time::Instant::now();
    d.begin_stop();
    // Wait on the event, bounded well inside the grace period.
    while status("").await != ServingStatus::NotServing as i32 {
        assert!(
            started.elapsed() < std::time::Duration::from_secs(2),
            "still SERVING"
        );
        tokio::task::yield_now().await;
    }
    for service in [
        "tokenvault.v1.Ingest",
        "tokenvault.v1.Broker",
        "tokenvault.v1.Admin",
    ] {
        assert_eq!(
            status(service).await,
            ServingStatus::NotServing as i32,
            "{service}"
        );
    }
    assert_eq!(
        http_health("GET").await,
        (503, serde_json::json!({ "status": "NOT_SERVING" }))
    );
    drop(health);
    // The paced rewrap ends long before its 30 s, not done.
    let mut last = None;
    while let Ok(Some(p)) = rewrap.message().await {
        last = Some(p);
    }
    assert!(last.is_none_or(|p| !p.done));
    d.stop().await;
    assert!(started.elapsed() < std::time::Duration::from_secs(20));
    // Nothing holds the store: it opens at once, with some records still to move and the
    // stop in the audit trail.
    let store = tokenvault::store::RocksStore::open(&config(dir.path()).data_dir, 1 << 20)
        .expect("the store is free as soon as serve returns");
    use tokenvault::store::prelude::*;
    let per_version = store.stats().expect("stats").per_key_version;
    assert!(
        per_version.iter().any(|(v, n)| *v == 1 && *n > 0),
        "{per_version:?}"
    );
    let mut actions = Vec::new();
    for (_, raw) in store.audit_events(1, 10_000).expect("events") {
        use prost::Message as _;
        actions.push(
            tokenvault::audit::Event::decode(raw.as_slice())
                .expect("event")
                .action,
        );
    }
    assert!(actions.iter().any(|a| a == "RewrapStopped"), "{actions:?}");
}

/// Reads `conn` until the daemon closes it (EOF or a reset); fails the test if it stays open
/// for 10 s.
async fn closed_by_the_daemon(conn: &mut tokio::net::TcpStream) {
    use tokio::io::AsyncReadExt as _;
    let mut sink = Vec::new();
    let read = tokio::time::timeout(
        std::time::Duration::from_secs(10),
        conn.read_to_end(&mut sink),
    )
    .await;
    assert!(read.is_ok(), "the daemon kept a silent connection open");
}

/// `[limits] max_concurrent_streams` and `http2_window_bytes` are what the daemon announces to
/// an HTTP/2 client: its SETTINGS and the connection's first WINDOW_UPDATE, read off the wire.
#[tokio::test]
async fn http2_streams_and_flow_control_windows_are_the_configured_bounds() {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    let tmp = tempfile::tempdir().expect("tempdir");
    let mut cfg = config(tmp.path());
    cfg.limits.max_concurrent_streams = 7;
    cfg.limits.http2_window_bytes = 300_000;
    let d = TestDaemon::start_with(cfg).await;
    let mut conn = tokio::net::TcpStream::connect(d.addr)
        .await
        .expect("connect");
    // The client preface and an empty SETTINGS frame.
    conn.write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\0\0\0\x04\0\0\0\0\0")
        .await
        .expect("preface");
    let (mut streams, mut stream_window, mut conn_window) = (None, None, None);
    let read = async {
        while conn_window.is_none() || streams.is_none() {
            let mut head = [0u8; 9];
            conn.read_exact(&mut head).await.expect("frame header");
            let len = usize::from(head[0]) << 16 | usize::from(head[1]) << 8 | usize::from(head[2]);
            let mut payload = vec![0u8; len];
            conn.read_exact(&mut payload).await.expect("frame payload");
            let stream = u32::from_be_bytes([head[5], head[6], head[7], head[8]]) & 0x7fff_ffff;
            match (head[3], head[4] & 1, stream) {
                // SETTINGS, not an ACK: six-byte (id, value) pairs.
                (4, 0, 0) => {
                    for p in payload.chunks_exact(6) {
                        let value = u32::from_be_bytes([p[2], p[3], p[4], p[5]]);
                        match u16::from_be_bytes([p[0], p[1]]) {
                            3 => streams = Some(value),
                            4 => stream_window = Some(value),
                            _ => {}
                        }
                    }
                }
                // WINDOW_UPDATE of the connection: over the protocol's initial 65,535.
                (8, _, 0) => {
                    let inc = u32::from_be_bytes([payload[0], payload[1], payload[2], payload[3]]);
                    conn_window = Some(65_535 + (inc & 0x7fff_ffff));
                }
                _ => {}
            }
        }
    };
    tokio::time::timeout(std::time::Duration::from_secs(10), read)
        .await
        .expect("the server's SETTINGS and WINDOW_UPDATE");
    assert_eq!(
        (streams, stream_window, conn_window),
        (Some(7), Some(300_000), Some(300_000))
    );
    drop(conn);
    d.stop().await;
}

#[tokio::test]
async fn silent_and_excess_connections_are_closed_and_new_clients_served() {
    use tokio::io::AsyncWriteExt as _;
    let tmp = tempfile::tempdir().expect("tempdir");
    let mut cfg = config(tmp.path());
    cfg.limits.max_connections = 20;
    cfg.limits.idle_timeout = std::time::Duration::from_secs(1);
    let d = TestDaemon::start_with(cfg).await;
    // Twice the cap of connections that send nothing.
    let mut silent = Vec::new();
    for _ in 0..40 {
        silent.push(
            tokio::net::TcpStream::connect(d.addr)
                .await
                .expect("connect"),
        );
    }
    // A new client is served meanwhile: the cap closed the connections idle the longest.
    let served = tokio::time::timeout(std::time::Duration::from_secs(10), d.get("nothing-here"))
        .await
        .expect("a new client is not locked out");
    assert_eq!(served.expect_err("no such record").code(), Code::NotFound);
    // Every silent connection is closed, by the cap or the idle timeout.
    for conn in &mut silent {
        closed_by_the_daemon(conn).await;
    }
    // An HTTP/1.1 request that declares a body and never sends it is cut too.
    let mut slow = tokio::net::TcpStream::connect(d.addr)
        .await
        .expect("connect");
    slow.write_all(
        format!(
            "POST /v1/records HTTP/1.1\r\nhost: vault\r\ncontent-type: application/json\r\n\
             authorization: Bearer {INGEST}\r\ncontent-length: 100\r\n\r\n{{"
        )
        .as_bytes(),
    )
    .await
    .expect("write");
    closed_by_the_daemon(&mut slow).await;
    // And so is one that stops in the middle of its headers.
    let mut slower = tokio::net::TcpStream::connect(d.addr)
        .await
        .expect("connect");
    slower
        .write_all(b"GET /v1/public-keys HTTP/1.1\r\nhost: va")
        .await
        .expect("write");
    closed_by_the_daemon(&mut slower).await;
    // The daemon still serves.
    d.get("nothing-here").await.expect_err("no such record");
    d.stop().await;
}

/// The metrics listener has the same bounds as the others: connections past `max_connections`
/// or silent longer than `idle_timeout_seconds` are closed, and a scrape is served meanwhile.
#[tokio::test]
async fn the_metrics_listener_closes_silent_and_excess_connections() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let mut cfg = config(tmp.path());
    cfg.limits.max_connections = 3;
    cfg.limits.idle_timeout = std::time::Duration::from_secs(1);
    let (d, metrics) = TestDaemon::start_with_metrics(cfg).await;
    let mut silent = Vec::new();
    for _ in 0..6 {
        silent.push(
            tokio::net::TcpStream::connect(metrics)
                .await
                .expect("connect"),
        );
    }
    for conn in &mut silent {
        closed_by_the_daemon(conn).await;
    }
    let (status, _, body) = http_call(metrics, "GET", "/metrics", &[], Vec::new()).await;
    assert_eq!(status, 200);
    assert!(
        String::from_utf8_lossy(&body).contains("tokenvault_"),
        "a scrape"
    );
    d.stop().await;
}

#[tokio::test]
async fn every_stored_record_has_its_audit_event_in_the_same_write() {
    let dir = tempfile::tempdir().expect("tempdir");
    let d = TestDaemon::start(dir.path()).await;
    let sealer = d.sealer().await;
    let mut ingest = d.ingest(INGEST).await;
    let record = |id: &str, secret: &[u8]| sealed(&sealer, &meta(id, "user-7"), secret);
    // Created, replaced (the web tier's token substitution is on record too), and a batch.
    ingest
        .put_sealed(put_req(record("gh:7", b"gho_first")))
        .await
        .expect("create");
    ingest
        .put_sealed(v1::PutSealedRequest {
            record: Some(record("gh:7", b"gho_second")),
            expected_version: 1,
        })
        .await
        .expect("replace");
    ingest
        .put_sealed_batch(v1::PutSealedBatchRequest {
            items: vec![put_req(record("gh:8", b"a")), put_req(record("gh:9", b"b"))],
        })
        .await
        .expect("batch");
    // Refused writes change nothing, audit trail included.
    let before = d.audit_events(v1::AuditLogRequest::default()).await.len();
    for stale in [0, 1, 5] {
        ingest
            .put_sealed(v1::PutSealedRequest {
                record: Some(record("gh:7", b"gho_third")),
                expected_version: stale,
            })
            .await
            .expect_err("stale");
    }
    ingest
        .put_sealed_batch(v1::PutSealedBatchRequest {
            items: vec![
                put_req(record("gh:10", b"c")),
                put_req(record("gh:8", b"d")),
            ],
        })
        .await
        .expect_err("one item exists: the whole batch is refused");
    let events = d.audit_events(v1::AuditLogRequest::default()).await;
    assert_eq!(events.len(), before, "refused writes added events");

    let of = |id: &str| {
        let d = &d;
        let id = id.to_string();
        async move {
            d.audit_events(v1::AuditLogRequest {
                record_id: id,
                ..Default::default()
            })
            .await
            .into_iter()
            .map(|e| (e.caller, e.action, e.outcome, e.detail))
            .collect::<Vec<_>>()
        }
    };
    let ev = |action: &str, detail: &str| {
        (
            "web-tier".to_string(),
            action.to_string(),
            "ok".to_string(),
            detail.to_string(),
        )
    };
    assert_eq!(
        of("gh:7").await,
        [
            ev("PutSealed", "created: version 1, key version 1"),
            ev("PutSealed", "replaced: version 2, key version 1"),
        ]
    );
    assert_eq!(
        of("gh:8").await,
        [ev("PutSealedBatch", "created: version 1, key version 1")]
    );
    assert_eq!(
        of("gh:9").await,
        [ev("PutSealedBatch", "created: version 1, key version 1")]
    );
    assert!(of("gh:10").await.is_empty());
    let owner = d
        .audit_events(v1::AuditLogRequest {
            owner: "user-7".into(),
            ..Default::default()
        })
        .await;
    assert_eq!(owner.len(), 4);
    assert_eq!(
        tokenvault::audit::verify_chain(events.iter().map(|e| (e.seq, e.raw.clone()))),
        Ok(u64::try_from(events.len()).expect("small"))
    );
    d.stop().await;
}

/// A call that never ends on its own (a health Watch stream, which load balancers hold open)
/// does not keep the daemon from exiting: after the listeners stop, in-flight calls get
/// `idle_timeout_seconds` to finish, then their connections are closed.
#[tokio::test]
async fn a_health_watch_stream_does_not_hold_the_shutdown_forever() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut config = config(dir.path());
    config.limits.idle_timeout = std::time::Duration::from_secs(2);
    let d = TestDaemon::start_with(config).await;
    let mut watch = tonic_health::pb::health_client::HealthClient::new(d.channel().await)
        .watch(tonic_health::pb::HealthCheckRequest {
            service: String::new(),
        })
        .await
        .expect("watch")
        .into_inner();
    let first = watch.message().await.expect("stream").expect("a status");
    assert_eq!(
        first.status,
        tonic_health::pb::health_check_response::ServingStatus::Serving as i32
    );
    // The stream stays open; the daemon stops anyway, within the drain limit (and far less
    // than this test's own bound).
    tokio::time::timeout(std::time::Duration::from_secs(20), d.stop())
        .await
        .expect("the daemon stopped with a watch stream open");
    drop(watch);
}
