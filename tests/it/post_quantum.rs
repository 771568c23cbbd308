//! Moving a store to post-quantum sealing on a running daemon: `admin emergency-rotate
//! --algorithm x-wing` (rotate, rewrap, retire, destroy, verify) turns every v1 envelope into a
//! v2 one, and each record keeps its id, version and token ciphertext byte for byte. Then
//! PublicKeys names X-Wing, new records are sealed v2, rotation stays on X-Wing, and an
//! envelope of the wrong format is refused at the door.

use crate::common;

use std::collections::BTreeMap;
use std::path::Path;

use base64::Engine as _;
use common::process::*;
use tokenvault::api::v1;
use tonic::Code;

/// id -> (version, key version, envelope), from `admin export` (which reads the RocksDB
/// directory as a snapshot while the daemon runs).
fn exported(cwd: &Path, name: &str) -> BTreeMap<String, (u64, u64, Vec<u8>)> {
    let out = cwd.join(name);
    let from = format!("rocksdb:{}", cwd.join("data").display());
    let o = run(
        cwd,
        &[
            "admin",
            "export",
            "--from",
            &from,
            "--out",
            &out.to_string_lossy(),
        ],
        &[],
        None,
    );
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    std::fs::read_to_string(&out)
        .expect("export")
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).expect("json line"))
        .filter(|v| v["type"] == "record")
        .map(|v| {
            let envelope = base64::engine::general_purpose::STANDARD
                .decode(v["envelope"].as_str().expect("envelope"))
                .expect("base64");
            (
                v["id"].as_str().expect("id").to_string(),
                (
                    v["version"].as_u64().expect("version"),
                    v["key_version"].as_u64().expect("key version"),
                    envelope,
                ),
            )
        })
        .collect()
}

/// The nonce, token ciphertext and tag: what follows the wrapped data key (v1: after the
/// 38-byte header and the 256-byte RSA-2048 ciphertext; v2: after the 40-byte header, the
/// 1,120-byte enc and the 48-byte sealed data key).
fn token_part(envelope: &[u8]) -> &[u8] {
    match envelope[3] {
        1 => &envelope[38 + 256..],
        2 => &envelope[40 + 1120 + 48..],
        v => panic!("unknown version {v}"),
    }
}

#[test]
fn a_store_moves_to_x_wing_online_keeping_every_record_and_ciphertext() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let cwd = tmp.path();
    let d = serve_dev(cwd);
    seed_records(&d, 300);
    let env = d.env();
    // One record replaced once, so versions are not all 1.
    let o = run(
        cwd,
        &[
            "seal",
            "--id",
            "rec-00007",
            "--owner",
            "o",
            "--provider",
            "github",
            "--kind",
            "access_token",
            "--expected-version",
            "1",
        ],
        &env,
        Some(b"tok-7-again"),
    );
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    let before = exported(cwd, "before.jsonl");
    assert_eq!(before.len(), 300);
    assert!(before.values().all(|(_, kv, e)| *kv == 1 && e[3] == 1));
    assert_eq!(before["rec-00007"].0, 2);

    let o = run(
        cwd,
        &[
            "admin",
            "emergency-rotate",
            "--algorithm",
            "x-wing",
            "--quiet",
        ],
        &env,
        None,
    );
    let out = String::from_utf8_lossy(&o.stdout).into_owned();
    assert_eq!(o.status.code(), Some(0), "{out}{}", stderr(&o));
    assert!(out.contains("1/4 rotated: v2  active"), "{out}");
    assert!(
        out.contains("VERIFIED: all 300 record(s) are wrapped under v2 (x-wing, envelope v2)"),
        "{out}"
    );

    let after = exported(cwd, "after.jsonl");
    // The export (an RSA registry entry and an X-Wing one, v2 envelopes) loads into an empty
    // store: its key lines and every envelope's fingerprint check out.
    let into = format!("rocksdb:{}", cwd.join("imported").display());
    let o = run(
        cwd,
        &[
            "admin",
            "import",
            "--in",
            &cwd.join("after.jsonl").to_string_lossy(),
            "--to",
            &into,
        ],
        &[],
        None,
    );
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    assert_eq!(
        after.keys().collect::<Vec<_>>(),
        before.keys().collect::<Vec<_>>()
    );
    for (id, (version, _, old)) in &before {
        let (v, kv, new) = &after[id];
        assert_eq!(
            (v, kv),
            (version, &2),
            "{id}: same version, now key version 2"
        );
        assert_eq!(&new[..6], b"TVE\x02\x64\x7a", "{id}: envelope v2, X-Wing");
        assert_eq!(
            token_part(new),
            token_part(old),
            "{id}: ciphertext byte for byte"
        );
    }
    for (id, secret) in [
        ("rec-00000", "tok-0"),
        ("rec-00007", "tok-7-again"),
        ("rec-00299", "tok-299"),
    ] {
        let o = run(cwd, &["get", id], &env, None);
        assert_eq!(String::from_utf8_lossy(&o.stdout), secret, "{}", stderr(&o));
    }

    let rt = tokio::runtime::Runtime::new().expect("runtime");
    rt.block_on(async {
        let mut ingest =
            v1::ingest_client::IngestClient::new(authed(&d, "TOKENVAULT_INGEST_TOKEN").await);
        let active = ingest
            .public_keys(v1::PublicKeysRequest {})
            .await
            .expect("keys")
            .into_inner()
            .active
            .expect("active");
        assert_eq!(active.algorithm, "x-wing");
        assert_eq!(active.public_key.len(), 1216);
        let public = tokenvault::keys::PublicKey::from_pem(&active.spki_pem).expect("spki");
        assert_eq!(public.raw(), active.public_key.as_slice());
        assert_eq!(public.id().to_hex(), active.fingerprint);

        // A v1 envelope naming the X-Wing version: refused at the door, nothing stored.
        let rsa = tokenvault::Sealer::from_pem(
            &std::fs::read_to_string(root().join("keys/test/fixture-a.pub.pem")).expect("pem"),
        )
        .expect("rsa");
        let meta = tokenvault::record::RecordMeta::parse(
            "pq-wrong",
            "o",
            "github",
            tokenvault::record::SecretKind::AccessToken,
            &[],
            0,
        )
        .expect("meta");
        let mut envelope = rsa
            .seal(&meta, &tokenvault::secret::Secret::new(b"t".to_vec()))
            .expect("seal");
        envelope[4..36].copy_from_slice(&public.id().0);
        let e = ingest
            .put_sealed(v1::PutSealedRequest {
                record: Some(v1::SealedRecord {
                    meta: Some(v1::RecordMeta {
                        id: "pq-wrong".into(),
                        owner: "o".into(),
                        provider: "github".into(),
                        kind: v1::SecretKind::AccessToken as i32,
                        ..Default::default()
                    }),
                    envelope,
                }),
                expected_version: 0,
            })
            .await
            .expect_err("wrong format");
        assert_eq!(e.code(), Code::InvalidArgument);
        assert!(
            e.message().starts_with(
                "the envelope is RSA-OAEP (envelope v1) but key version 2 is HPKE X-Wing (envelope v2)"
            ),
            "{}",
            e.message()
        );

        // RotateKey's algorithm: an unknown name, and a name beside an imported key, are
        // refused and change nothing.
        let mut admin =
            v1::admin_client::AdminClient::new(authed(&d, "TOKENVAULT_ADMIN_TOKEN").await);
        let pem = std::fs::read_to_string(root().join("keys/test/fixture-b.key.pem")).expect("pem");
        for (request, message) in [
            (
                v1::RotateKeyRequest {
                    algorithm: "rsa-1024".into(),
                    ..Default::default()
                },
                "invalid algorithm: not an algorithm a key is generated with; one of rsa-2048, rsa-3072, x-wing",
            ),
            (
                v1::RotateKeyRequest {
                    algorithm: "x-wing".into(),
                    private_key_pem: pem,
                    ..Default::default()
                },
                "invalid algorithm: it names the algorithm of a generated key",
            ),
        ] {
            let e = admin.rotate_key(request).await.expect_err(message);
            assert_eq!(e.code(), Code::InvalidArgument);
            assert!(e.message().starts_with(message), "{}", e.message());
        }
        let keys = admin
            .list_keys(v1::ListKeysRequest {})
            .await
            .expect("keys")
            .into_inner()
            .keys;
        assert_eq!(keys.len(), 2, "refused rotations add no version");
    });

    // New records are sealed v2 by the CLI (which seals with what PublicKeys returns).
    let o = run(
        cwd,
        &[
            "seal",
            "--id",
            "pq-new",
            "--owner",
            "o",
            "--provider",
            "github",
            "--kind",
            "access_token",
        ],
        &env,
        Some(b"gho_sealed_after_the_move"),
    );
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    assert_eq!(
        run(cwd, &["get", "pq-new"], &env, None).stdout,
        b"gho_sealed_after_the_move"
    );
    assert_eq!(exported(cwd, "new.jsonl")["pq-new"].2[3], 2);
    // A rotation that names no algorithm keeps the active one's.
    let o = run(cwd, &["admin", "rotate"], &env, None);
    let out = String::from_utf8_lossy(&o.stdout).into_owned();
    assert!(
        out.starts_with("active    v3  active") && out.contains("x-wing"),
        "{out}{}",
        stderr(&o)
    );
    // An unknown algorithm is refused by the CLI before any call.
    assert_exit(
        &run(
            cwd,
            &["admin", "rotate", "--algorithm", "ml-kem-768"],
            &env,
            None,
        ),
        2,
        "invalid value 'ml-kem-768'",
    );
    let o = run(cwd, &["admin", "audit", "verify"], &env, None);
    assert!(
        String::from_utf8_lossy(&o.stdout).starts_with("audit chain intact:"),
        "{}",
        stderr(&o)
    );
    d.terminate();
}

/// A stored v2 envelope that does not open for its record is `DATA_LOSS` naming the record,
/// whatever was changed (HPKE's enc, the sealed data key, the token ciphertext, the fingerprint,
/// the KEM id, or the record it is filed under), and no other record is affected.
#[tokio::test]
async fn every_tampering_of_a_stored_v2_envelope_is_data_loss_for_that_record_only() {
    use tokenvault::store::prelude::*;
    let dir = tempfile::tempdir().expect("tempdir");
    let d = common::TestDaemon::start(dir.path()).await;
    let rsa_fingerprint = d
        .admin(common::ADMIN)
        .await
        .list_keys(v1::ListKeysRequest {})
        .await
        .expect("keys")
        .into_inner()
        .keys[0]
        .fingerprint
        .clone();
    d.admin(common::ADMIN)
        .await
        .rotate_key(v1::RotateKeyRequest {
            algorithm: "x-wing".into(),
            ..Default::default()
        })
        .await
        .expect("rotate to x-wing");
    let ids = [
        "enc",
        "sealed-dek",
        "ciphertext",
        "fingerprint",
        "kem",
        "moved",
        "intact",
    ];
    for id in ids {
        d.put(&common::meta(id, "o"), format!("secret-{id}").as_bytes())
            .await;
    }
    d.stop().await;
    {
        let store =
            tokenvault::store::RocksStore::open(&common::config(dir.path()).data_dir, 1 << 20)
                .expect("open");
        let get = |id: &str| {
            store
                .get_record(&tokenvault::record::RecordId::parse(id).expect("id"))
                .expect("get")
                .expect("present")
        };
        let rsa = hex::decode(&rsa_fingerprint).expect("hex");
        let mut items = Vec::new();
        for id in ids {
            let rec = get(id);
            assert_eq!(&rec.envelope[..4], b"TVE\x02", "{id} was sealed v2");
            let mut envelope = rec.envelope.clone();
            let len = envelope.len();
            match id {
                "enc" => envelope[40 + 500] ^= 0x01,
                "sealed-dek" => envelope[40 + 1120 + 7] ^= 0x01,
                "ciphertext" => envelope[len - 20] ^= 0x01,
                "fingerprint" => envelope[6..38].copy_from_slice(&rsa),
                "kem" => envelope[4..6].copy_from_slice(&0x0041u16.to_be_bytes()),
                "moved" => envelope = get("intact").envelope,
                _ => continue,
            }
            items.push(tokenvault::store::EnvelopeReplace {
                id: rec.meta.id.clone(),
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
    let d = common::TestDaemon::start(dir.path()).await;
    for (id, message) in [
        ("enc", "decryption failed"),
        ("sealed-dek", "decryption failed"),
        ("ciphertext", "decryption failed"),
        (
            "fingerprint",
            "the envelope is HPKE X-Wing (envelope v2) but its key is RSA-OAEP (envelope v1)",
        ),
        ("kem", "unknown KEM 0x0041 in a version 2 envelope"),
        ("moved", "decryption failed"),
    ] {
        let e = d.get(id).await.expect_err(id);
        assert_eq!(e.code(), Code::DataLoss, "{id}: {}", e.message());
        assert!(
            e.message().starts_with(&format!("record {id}: {message}")),
            "{id}: {}",
            e.message()
        );
    }
    let ok = d.get("intact").await.expect("intact").into_inner();
    assert_eq!(ok.secret, b"secret-intact");
    d.stop().await;
}

/// `tokenvault keys` offline: init and rotate take `--algorithm`, a rotation without one keeps
/// the active version's, `keys list` names each version's algorithm, an X-Wing key file imports
/// and exports like an RSA one (PKCS#8 0600, SPKI with id-XWing), and a daemon started on the
/// result seals and opens envelope v2.
#[test]
fn offline_key_commands_take_an_algorithm() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let cwd = tmp.path();
    let out = |o: &std::process::Output| String::from_utf8_lossy(&o.stdout).into_owned();
    let o = run(
        cwd,
        &["keys", "init", "--dev", "--algorithm", "x-wing"],
        &[],
        None,
    );
    assert!(
        out(&o).starts_with("created v1") && out(&o).trim_end().ends_with("x-wing"),
        "{}{}",
        out(&o),
        stderr(&o)
    );
    let pem = out(&run(cwd, &["keys", "export-public", "--dev"], &[], None));
    let public = tokenvault::keys::PublicKey::from_pem(&pem).expect("spki");
    assert_eq!(public.algorithm(), tokenvault::keys::Algorithm::XWing);
    assert_eq!(public.raw().len(), 1216);
    use std::os::unix::fs::PermissionsExt as _;
    let file = cwd.join("keys/dev/v0001.key.pem");
    assert_eq!(
        std::fs::metadata(&file).expect("key").permissions().mode() & 0o777,
        0o600
    );
    let private = std::fs::read_to_string(&file).expect("key file");
    assert!(
        private.starts_with("-----BEGIN ENCRYPTED PRIVATE KEY-----")
            || private.starts_with("-----BEGIN PRIVATE KEY-----")
    );
    let o = run(cwd, &["keys", "rotate", "--dev"], &[], None);
    assert!(
        out(&o).starts_with("active v2") && out(&o).trim_end().ends_with("x-wing"),
        "{}",
        out(&o)
    );
    let o = run(
        cwd,
        &["keys", "rotate", "--dev", "--algorithm", "rsa-3072"],
        &[],
        None,
    );
    assert!(out(&o).trim_end().ends_with("rsa-3072"), "{}", out(&o));
    assert_exit(
        &run(
            cwd,
            &["keys", "rotate", "--dev", "--algorithm", "rsa-1024"],
            &[],
            None,
        ),
        2,
        "invalid value 'rsa-1024'",
    );
    let fixture = root().join("keys/test/fixture-xwing.key.pem");
    let o = run(
        cwd,
        &[
            "keys",
            "import",
            "--dev",
            "--private",
            &fixture.to_string_lossy(),
        ],
        &[],
        None,
    );
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    let list = out(&run(cwd, &["keys", "list", "--dev", "--json"], &[], None));
    let algorithms: Vec<String> = list
        .lines()
        .map(|l| {
            serde_json::from_str::<serde_json::Value>(l).expect("json")["algorithm"]
                .as_str()
                .expect("algorithm")
                .to_string()
        })
        .collect();
    assert_eq!(
        algorithms,
        ["x-wing", "x-wing", "rsa-3072", "x-wing"],
        "{list}"
    );
    // The daemon on this keyring: the imported X-Wing version is active, and a record sealed
    // by the CLI with what PublicKeys returns is envelope v2 and reads back.
    let d = serve_dev(cwd);
    let env = d.env();
    let o = run(
        cwd,
        &[
            "seal",
            "--id",
            "pq-offline",
            "--owner",
            "o",
            "--provider",
            "github",
            "--kind",
            "api_key",
        ],
        &env,
        Some(b"sk_live_after_import"),
    );
    assert!(
        format!("{}{}", out(&o), stderr(&o)).contains(
            &tokenvault::keys::PublicKey::from_pem(
                &std::fs::read_to_string(root().join("keys/test/fixture-xwing.pub.pem"))
                    .expect("pem")
            )
            .expect("spki")
            .id()
            .to_hex()
        ),
        "sealed under the imported key: {}{}",
        out(&o),
        stderr(&o)
    );
    assert_eq!(
        run(cwd, &["get", "pq-offline"], &env, None).stdout,
        b"sk_live_after_import"
    );
    d.terminate();
}
