//! Operating the daemon for months: records listed by state (and the stale-version detail a
//! web tier re-authorizes with), the audit trail shipped to a JSON-lines file, pruned by
//! retention behind a checkpoint and still verifiable. Real daemons over real gRPC on
//! loopback, on RocksDB.

use crate::common;

use std::sync::Arc;

use common::*;
use tokenvault::api::SealRecord as _;
use tokenvault::api::v1;
use tokenvault::record::{RecordId, RecordMeta, SecretKind};
use tokenvault::store::{Mutation, RocksStore, TokenStore, prelude::*};

fn meta_of(id: &str, owner: &str, provider: &str, kind: SecretKind, expires_at: i64) -> RecordMeta {
    RecordMeta::parse(id, owner, provider, kind, &["repo".into()], expires_at).expect("valid")
}

async fn list(
    d: &TestDaemon,
    cred: &str,
    req: v1::ListRecordsRequest,
) -> Result<v1::ListRecordsResponse, tonic::Status> {
    d.admin(cred)
        .await
        .list_records(req)
        .await
        .map(tonic::Response::into_inner)
}

/// Every id a filter lists, following the pages.
async fn all_ids(d: &TestDaemon, mut req: v1::ListRecordsRequest) -> Vec<String> {
    let mut ids = Vec::new();
    loop {
        let page = list(d, ADMIN, req.clone()).await.expect("list");
        ids.extend(
            page.records
                .iter()
                .map(|r| r.meta.clone().expect("meta").id),
        );
        if page.next_page_token.is_empty() {
            return ids;
        }
        req.page_token = page.next_page_token;
    }
}

#[tokio::test]
async fn records_are_listed_by_state_and_filters_and_bad_requests_are_refused() {
    let dir = tempfile::tempdir().expect("tempdir");
    let config = config(dir.path());
    let store = Arc::new(RocksStore::open(&dir.path().join("data"), 8 << 20).expect("store"));
    let d = TestDaemon::start_with_store(config, Arc::clone(&store) as Arc<dyn TokenStore>).await;
    let now = tokenvault::unix_now();
    for i in 0..12 {
        let provider = if i % 3 == 0 { "google" } else { "github" };
        let kind = if i % 4 == 0 {
            SecretKind::RefreshToken
        } else {
            SecretKind::AccessToken
        };
        let expires = if i == 5 { now - 10 } else { 0 };
        d.put(
            &meta_of(
                &format!("rec-{i:02}"),
                &format!("owner-{}", i % 2),
                provider,
                kind,
                expires,
            ),
            format!("secret-token-{i}").as_bytes(),
        )
        .await;
    }
    // Two records whose refresh token the provider rejected; one revoked.
    for id in ["rec-03", "rec-08"] {
        let id = RecordId::parse(id).expect("id");
        store
            .apply_unaudited(
                &[Mutation::MarkNeedsReauth {
                    id,
                    expected_version: 1,
                }],
                now,
            )
            .expect("needs reauth");
    }
    d.revoke("rec-07").await.expect("revoke");

    let by_state = |state: v1::RecordState| v1::ListRecordsRequest {
        state: state as i32,
        ..Default::default()
    };
    assert_eq!(
        all_ids(&d, by_state(v1::RecordState::NeedsReauth)).await,
        ["rec-03", "rec-08"]
    );
    assert_eq!(
        all_ids(&d, by_state(v1::RecordState::Revoked)).await,
        ["rec-07"]
    );
    assert_eq!(
        all_ids(&d, by_state(v1::RecordState::Expired)).await,
        ["rec-05"]
    );
    assert_eq!(
        all_ids(&d, by_state(v1::RecordState::Usable)).await.len(),
        8
    );
    assert_eq!(
        all_ids(
            &d,
            v1::ListRecordsRequest {
                provider: "google".into(),
                kind: v1::SecretKind::RefreshToken as i32,
                ..Default::default()
            }
        )
        .await,
        ["rec-00"]
    );
    assert_eq!(
        all_ids(
            &d,
            v1::ListRecordsRequest {
                owner: "owner-1".into(),
                state: v1::RecordState::NeedsReauth as i32,
                ..Default::default()
            }
        )
        .await,
        ["rec-03"]
    );
    assert_eq!(
        all_ids(
            &d,
            v1::ListRecordsRequest {
                key_version: 2,
                ..Default::default()
            }
        )
        .await,
        Vec::<String>::new()
    );
    // Pages of 5 cover every record once, in id order.
    let paged = all_ids(
        &d,
        v1::ListRecordsRequest {
            page_size: 5,
            key_version: 1,
            ..Default::default()
        },
    )
    .await;
    assert_eq!(
        paged,
        (0..12).map(|i| format!("rec-{i:02}")).collect::<Vec<_>>()
    );
    // Metadata only: what a record lists carries no secret.
    let page = list(&d, ADMIN, v1::ListRecordsRequest::default())
        .await
        .expect("list");
    let rec = &page.records[3];
    assert!(rec.needs_reauth && rec.version == 2 && rec.key_version == 1);
    let bytes = prost::Message::encode_to_vec(&page);
    assert!(!String::from_utf8_lossy(&bytes).contains("secret-token"));

    // Refused: each with its status and message; nothing changed.
    let first = list(
        &d,
        ADMIN,
        v1::ListRecordsRequest {
            page_size: 2,
            ..Default::default()
        },
    )
    .await
    .expect("page");
    let stats_before = d.stats().await;
    for (req, code, needle) in [
        (
            v1::ListRecordsRequest {
                page_size: 1001,
                ..Default::default()
            },
            tonic::Code::InvalidArgument,
            "page_size: 1001 is more than the maximum of 1000",
        ),
        (
            v1::ListRecordsRequest {
                page_token: "not a token".into(),
                ..Default::default()
            },
            tonic::Code::InvalidArgument,
            "invalid page_token",
        ),
        (
            v1::ListRecordsRequest {
                page_token: "x".repeat(600),
                ..Default::default()
            },
            tonic::Code::InvalidArgument,
            "invalid page_token",
        ),
        (
            // A token of another filter.
            v1::ListRecordsRequest {
                provider: "github".into(),
                page_token: first.next_page_token.clone(),
                ..Default::default()
            },
            tonic::Code::InvalidArgument,
            "with these filters",
        ),
        (
            v1::ListRecordsRequest {
                provider: "Not A Provider".into(),
                ..Default::default()
            },
            tonic::Code::InvalidArgument,
            "invalid provider",
        ),
        (
            v1::ListRecordsRequest {
                owner: "x".repeat(300),
                ..Default::default()
            },
            tonic::Code::InvalidArgument,
            "invalid owner",
        ),
        (
            v1::ListRecordsRequest {
                kind: 42,
                ..Default::default()
            },
            tonic::Code::InvalidArgument,
            "invalid kind",
        ),
        (
            v1::ListRecordsRequest {
                state: 9,
                ..Default::default()
            },
            tonic::Code::InvalidArgument,
            "9 is not a RecordState",
        ),
    ] {
        let e = list(&d, ADMIN, req).await.expect_err(needle);
        assert_eq!(e.code(), code, "{needle}: {e:?}");
        assert!(e.message().contains(needle), "{needle}: {}", e.message());
    }
    for cred in [WORKER, INGEST, "tv_wrong_credential_0123456789abcdef01"] {
        let e = list(&d, cred, v1::ListRecordsRequest::default())
            .await
            .expect_err("not an admin");
        assert!(
            matches!(
                e.code(),
                tonic::Code::PermissionDenied | tonic::Code::Unauthenticated
            ),
            "{e:?}"
        );
    }
    assert_eq!(d.stats().await, stats_before);
    // Listing is audited (the owner as its HMAC, never in the clear).
    let events = d.audit_events(v1::AuditLogRequest::default()).await;
    let listed: Vec<_> = events
        .iter()
        .filter(|e| e.action == "ListRecords")
        .collect();
    assert!(
        listed
            .iter()
            .any(|e| e.detail.contains("state=needs_reauth"))
    );
    assert!(listed.iter().all(|e| !e.detail.contains("owner-")));

    // A stale expected version: ABORTED with the current version as a structured detail.
    let sealed = d
        .sealer()
        .await
        .seal_record(
            &meta_of("rec-03", "owner-1", "github", SecretKind::AccessToken, 0),
            &tokenvault::secret::Secret::new(b"new-token".to_vec()),
        )
        .expect("seal");
    let e = d
        .ingest(INGEST)
        .await
        .put_sealed(v1::PutSealedRequest {
            record: Some(sealed.clone()),
            expected_version: 1,
        })
        .await
        .expect_err("stale");
    assert_eq!(e.code(), tonic::Code::Aborted);
    {
        use tonic_types::StatusExt as _;
        let info = e.get_details_error_info().expect("ErrorInfo");
        assert_eq!(
            (info.reason.as_str(), info.domain.as_str()),
            ("STALE_VERSION", "tokenvault.v1")
        );
        assert_eq!(info.metadata["current_version"], "2");
        assert_eq!(info.metadata["expected_version"], "1");
    }
    // Re-authorization with the version the detail named clears the flag.
    d.ingest(INGEST)
        .await
        .put_sealed(v1::PutSealedRequest {
            record: Some(sealed),
            expected_version: 2,
        })
        .await
        .expect("replace");
    assert_eq!(
        all_ids(&d, by_state(v1::RecordState::NeedsReauth)).await,
        ["rec-08"]
    );
    d.stop().await;
}

/// The lines of the sink file (and its rotated siblings), oldest first.
fn shipped_lines(file: &std::path::Path, keep: u32) -> Vec<serde_json::Value> {
    let mut lines = Vec::new();
    for n in (0..=keep).rev() {
        let path = if n == 0 {
            file.to_path_buf()
        } else {
            std::path::PathBuf::from(format!("{}.{n}", file.display()))
        };
        if let Ok(text) = std::fs::read_to_string(&path) {
            lines.extend(
                text.lines()
                    .map(|l| serde_json::from_str::<serde_json::Value>(l).expect("JSON line")),
            );
        }
    }
    lines
}

/// Waits (on the shipper's one-second rounds) until the sink holds event `seq`.
async fn wait_shipped(file: &std::path::Path, keep: u32, seq: u64) -> Vec<serde_json::Value> {
    for _ in 0..200 {
        let lines = shipped_lines(file, keep);
        if lines.iter().any(|l| l["seq"] == seq) {
            return lines;
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    panic!("event {seq} was not shipped within 10 s");
}

#[tokio::test]
async fn the_audit_trail_is_shipped_pruned_behind_a_checkpoint_and_verified() {
    let dir = tempfile::tempdir().expect("tempdir");
    let sink = dir.path().join("audit.jsonl");
    let mut config = config(dir.path());
    config.audit = tokenvault::config::AuditConfig {
        retention_days: Some(30),
        sink: Some(tokenvault::config::SinkConfig {
            file: sink.clone(),
            // Small, so the test sees rotation (checked before each round's write).
            max_bytes: 256,
            keep_files: 50,
        }),
    };
    let store: Arc<dyn TokenStore> =
        Arc::new(RocksStore::open(&dir.path().join("data"), 8 << 20).expect("store"));
    let clock = TestClock::new();
    let d = TestDaemon::start_with_clock(config.clone(), Arc::clone(&store), &clock).await;
    d.seed("rec-", 20).await;
    let seeded = d.audit_events(v1::AuditLogRequest::default()).await;
    wait_shipped(&sink, 50, seeded.last().expect("events").seq).await;
    for i in 0..20 {
        d.get(format!("rec-{i}")).await.expect("get");
    }
    let head = d.audit_events(v1::AuditLogRequest::default()).await;
    let last = head.last().expect("events").seq;
    let lines = wait_shipped(&sink, 50, last).await;
    // Every event once, in order (the file was rotated on the way), HMACs only.
    let seqs: Vec<u64> = lines
        .iter()
        .map(|l| l["seq"].as_u64().expect("seq"))
        .collect();
    assert_eq!(seqs, (1..=last).collect::<Vec<_>>());
    assert!(
        std::path::Path::new(&format!("{}.1", sink.display())).exists(),
        "rotated: {:?}",
        std::fs::read_dir(dir.path())
            .expect("dir")
            .map(|e| e.expect("entry").file_name())
            .collect::<Vec<_>>()
    );
    let text: String = lines.iter().map(ToString::to_string).collect();
    assert!(
        !text.contains("rec-1") && !text.contains("secret-"),
        "no ids, no secrets"
    );
    assert_eq!(lines[0]["hash"].as_str().map(str::len), Some(64));
    let mode = std::os::unix::fs::PermissionsExt::mode(
        &std::fs::metadata(&sink).expect("sink").permissions(),
    );
    assert_eq!(mode & 0o777, 0o600);

    // Nothing is past retention yet.
    let mut admin = d.admin(ADMIN).await;
    let r = admin
        .prune_audit(v1::PruneAuditRequest {})
        .await
        .expect("prune")
        .into_inner();
    assert_eq!(r.pruned, 0);
    // 31 days later, every event so far is past it.
    clock.advance(31 * 86_400);
    let r = admin
        .prune_audit(v1::PruneAuditRequest {})
        .await
        .expect("prune")
        .into_inner();
    assert!(r.pruned >= last, "{} < {last}", r.pruned);
    let kept = d.audit_events(v1::AuditLogRequest::default()).await;
    let first = kept.first().expect("kept events");
    assert_eq!(first.checkpoint_seq, first.seq - 1);
    assert_eq!(first.prev_hash, first.checkpoint_hash);
    assert!(kept.iter().any(|e| e.action == "AuditPruned"));
    // The kept chain verifies from its checkpoint, event by event.
    let mut v = tokenvault::audit::ChainVerifier::new(Some(tokenvault::audit::Checkpoint {
        seq: first.checkpoint_seq,
        hash: first
            .checkpoint_hash
            .as_slice()
            .try_into()
            .expect("32 bytes"),
    }));
    for e in &kept {
        v.push(e.seq, &e.raw).expect("links");
    }
    assert!(v.finish().is_ok());
    // The pruned events are still in the sink (shipped before they were pruned).
    let lines = wait_shipped(&sink, 50, kept.last().expect("last").seq).await;
    assert!(lines.iter().any(|l| l["seq"] == 1));

    // A daemon without retention refuses PruneAudit; a worker may not call it.
    let e = d
        .admin(WORKER)
        .await
        .prune_audit(v1::PruneAuditRequest {})
        .await
        .expect_err("worker");
    assert_eq!(e.code(), tonic::Code::PermissionDenied);
    d.stop().await;
    let mut no_retention = config.clone();
    no_retention.audit = Default::default();
    let d = TestDaemon::start_with_store(no_retention, Arc::clone(&store)).await;
    let before = d.audit_events(v1::AuditLogRequest::default()).await.len();
    let e = d
        .admin(ADMIN)
        .await
        .prune_audit(v1::PruneAuditRequest {})
        .await
        .expect_err("no retention");
    assert_eq!(e.code(), tonic::Code::FailedPrecondition);
    assert!(
        e.message().contains("no [audit] retention_days"),
        "{}",
        e.message()
    );
    let after = d.audit_events(v1::AuditLogRequest::default()).await;
    // Only the refusal itself was added.
    assert_eq!(after.len(), before + 1);
    d.stop().await;

    // A sink file that cannot be created stops the daemon at startup, naming it.
    let mut bad = config;
    bad.audit.sink = Some(tokenvault::config::SinkConfig {
        file: dir.path().join("no-such-dir/audit.jsonl"),
        max_bytes: 1 << 20,
        keep_files: 1,
    });
    let e = tokenvault::vault::Vault::open(Arc::clone(&store), &bad)
        .expect_err("bad sink")
        .to_string();
    assert!(e.contains("no-such-dir/audit.jsonl"), "{e}");
    // So does an existing one that others may read: its events could leak or be edited.
    let loose = dir.path().join("loose.jsonl");
    std::fs::write(&loose, "").expect("write");
    std::fs::set_permissions(&loose, std::os::unix::fs::PermissionsExt::from_mode(0o644))
        .expect("chmod");
    bad.audit.sink = Some(tokenvault::config::SinkConfig {
        file: loose.clone(),
        max_bytes: 1 << 20,
        keep_files: 1,
    });
    let e = tokenvault::vault::Vault::open(Arc::clone(&store), &bad)
        .expect_err("loose sink")
        .to_string();
    assert!(
        e.contains("loose.jsonl") && e.contains("mode 644") && e.contains("chmod 600"),
        "{e}"
    );
}
