//! `tokenvault store copy`: RocksDB -> PostgreSQL -> RocksDB with a daemon serving the result,
//! the backup of a running daemon's RocksDB, and refused copies that change nothing. Real
//! daemons, the real binary, a real PostgreSQL (scripts/with-postgres).

use crate::common;

use std::path::Path;

use common::process::{assert_exit, run};
use common::*;
use tokenvault::api::SealRecord as _;
use tokenvault::api::v1;
use tonic::Code;

/// Copies a key directory tree (private keys stay 0600: `fs::copy` keeps the mode).
fn copy_keys(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).expect("key dir");
    for entry in std::fs::read_dir(from).expect("read keys") {
        let entry = entry.expect("entry");
        let target = to.join(entry.file_name());
        if entry.file_type().expect("type").is_dir() {
            copy_keys(&entry.path(), &target);
        } else {
            std::fs::copy(entry.path(), target).expect("copy key file");
        }
    }
}

fn copy(cwd: &Path, from: &str, to: &str) -> std::process::Output {
    run(
        cwd,
        &["store", "copy", "--from", from, "--to", to],
        &[],
        None,
    )
}

fn stdout(o: &std::process::Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

/// Every audit chain the daemon holds, each verified; returns the events of chain `""` (a
/// RocksDB daemon's own).
async fn verified_trail(d: &TestDaemon) -> Vec<(u64, Vec<u8>)> {
    let mut chains: std::collections::BTreeMap<String, Vec<(u64, Vec<u8>)>> = Default::default();
    for e in d.audit_events(v1::AuditLogRequest::default()).await {
        chains
            .entry(e.instance.clone())
            .or_default()
            .push((e.seq, e.raw.clone()));
    }
    for (name, events) in &chains {
        tokenvault::audit::verify_chain(events.clone())
            .unwrap_or_else(|e| panic!("chain {name:?}: {e}"));
    }
    chains.remove("").unwrap_or_default()
}

#[tokio::test]
async fn a_store_copied_to_postgres_and_back_serves_the_same_records() {
    let (a, c) = (
        tempfile::tempdir().expect("a"),
        tempfile::tempdir().expect("c"),
    );
    // The source: records under two key versions, one revoked, a grant, an audit trail.
    let d = TestDaemon::start(a.path()).await;
    d.seed("r", 300).await;
    d.admin(ADMIN)
        .await
        .rotate_key(v1::RotateKeyRequest::default())
        .await
        .expect("rotate");
    d.seed("s", 40).await;
    d.revoke("r3").await.expect("revoke");
    let before = d.stats().await;
    assert_eq!(before.records_per_key_version.len(), 2);
    let trail = verified_trail(&d).await;
    d.stop().await;

    let url = pg::database().await;
    let rocks_a = format!("rocksdb:{}", a.path().join("data").display());
    let out = copy(a.path(), &rocks_a, &url);
    assert_exit(&out, 0, "");
    let report = stdout(&out);
    assert!(report.contains("records under key v1"), "{report}");
    assert!(report.contains("records under key v2"), "{report}");
    assert!(report.contains("verified"), "{report}");
    // Copying into the now filled database again is refused and changes nothing.
    let again = copy(a.path(), &rocks_a, &url);
    assert_exit(&again, 6, "not empty");

    // The database serves too, once the RocksDB daemon's keys are shared into it (checked
    // against the registry first: the wrong directory is refused and nothing is written).
    let key_dir = config(a.path()).key_dir;
    std::fs::write(a.path().join("pass"), pg::PASSPHRASE).expect("passphrase");
    let database_config = |name: &str, url: &str| {
        std::fs::write(
            a.path().join(name),
            format!(
                "data_dir = \"pgdata\"\nkey_dir = \"pgkeys\"\npassphrase_file = \"pass\"\n\
                 [store]\nurl = \"{url}\"\ninstance = \"p\"\n"
            ),
        )
        .expect("config");
    };
    database_config("pg.toml", &url);
    let share_with = |at: &[&str], from: &Path| {
        let mut args = vec!["keys", "share"];
        args.extend_from_slice(at);
        args.extend(["--from-key-dir", from.to_str().expect("utf-8")]);
        run(a.path(), &args, &[], None)
    };
    let share = |from: &Path| share_with(&["--config", "pg.toml"], from);
    // Not a shared database: nothing to share into.
    assert_exit(
        &share_with(&["--dev"], &key_dir),
        5,
        "must name a daemon on a shared [store] database",
    );
    // An empty database has no registry to check the files against.
    let empty = pg::database().await;
    database_config("empty.toml", &empty);
    assert_exit(
        &share_with(&["--config", "empty.toml"], &key_dir),
        3,
        "no key registry",
    );
    assert_eq!(
        pg::client(&empty)
            .await
            .query_one("SELECT count(*) FROM tokenvault_meta", &[])
            .await
            .expect("count")
            .get::<_, i64>(0),
        0,
        "nothing written"
    );
    let stranger = tempfile::tempdir().expect("stranger");
    {
        let other = TestDaemon::start(stranger.path()).await;
        other.stop().await;
    }
    assert_exit(
        &share(&config(stranger.path()).key_dir),
        5,
        "is not the one the registry holds",
    );
    let shared = share(&key_dir);
    assert_exit(&shared, 0, "");
    assert!(stdout(&shared).contains("shared private key v1"));
    assert!(stdout(&shared).contains("shared private key v2"));
    assert!(stdout(&shared).contains("shared the audit HMAC key"));
    let on_pg = TestDaemon::start_with(pg::config_on(c.path(), &url, "p")).await;
    assert_eq!(
        on_pg.get("r8").await.expect("get").into_inner().secret,
        b"secret-8"
    );
    // Same audit key: a search by record id finds the events the RocksDB daemon wrote.
    let found = on_pg
        .audit_events(v1::AuditLogRequest {
            record_id: "r3".into(),
            instance: String::new(),
            ..Default::default()
        })
        .await;
    assert!(found.iter().any(|e| e.action == "Revoke"), "{found:?}");
    on_pg.stop().await;

    let rocks_c = format!("rocksdb:{}", c.path().join("data").display());
    let out = copy(c.path(), &url, &rocks_c);
    assert_exit(&out, 0, "");
    // The records, registry and the RocksDB daemon's chain have the same counts and
    // checksums both ways (the database gained the shared keys and daemon p's chain since).
    let lines = |s: &str| {
        s.lines()
            .filter(|l| l.contains("sha256") && !l.contains("metadata") && !l.contains("\"p\""))
            .map(str::to_string)
            .collect::<Vec<_>>()
    };
    assert_eq!(lines(&stdout(&out)), lines(&report));
    assert!(stdout(&out).contains("audit events, chain \"p\""));

    // A daemon on the copy of the copy, with the keys written out of the database (the
    // inverse of `keys share`), serves everything. By default the files are encrypted with
    // the database's passphrase; --unencrypted suits this daemon's directory, which has none.
    let export = |to: &Path, unencrypted: bool| {
        let mut args = vec![
            "keys",
            "export-files",
            "--config",
            "pg.toml",
            "--to-key-dir",
        ];
        args.push(to.to_str().expect("utf-8"));
        if unencrypted {
            args.push("--unencrypted");
        }
        run(a.path(), &args, &[], None)
    };
    // A config whose keys are files already has nothing to export, and writes nothing.
    let refused_dir = tempfile::tempdir().expect("refused");
    let refused = run(
        a.path(),
        &[
            "keys",
            "export-files",
            "--dev",
            "--to-key-dir",
            refused_dir.path().to_str().expect("utf-8"),
        ],
        &[],
        None,
    );
    assert_exit(
        &refused,
        5,
        "must name a daemon on a shared [store] database",
    );
    assert_eq!(
        std::fs::read_dir(refused_dir.path()).expect("list").count(),
        0
    );
    let sealed_dir = tempfile::tempdir().expect("sealed keys");
    let sealed = export(sealed_dir.path(), false);
    assert_exit(&sealed, 0, "");
    let pem = std::fs::read_to_string(sealed_dir.path().join("v0002.key.pem")).expect("v2 file");
    assert!(pem.contains("ENCRYPTED PRIVATE KEY"), "{pem}");
    use std::os::unix::fs::PermissionsExt as _;
    for file in ["v0001.key.pem", "audit.key"] {
        let mode = std::fs::metadata(sealed_dir.path().join(file))
            .expect("written")
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600, "{file}");
    }
    let c_keys = config(c.path()).key_dir;
    let exported = export(&c_keys, true);
    assert_exit(&exported, 0, "");
    assert!(stdout(&exported).contains("wrote private key v1 (unencrypted)"));
    assert!(stdout(&exported).contains("wrote the audit HMAC key"));
    // Again: nothing to write, nothing overwritten.
    let again = export(&c_keys, true);
    assert_exit(&again, 0, "");
    assert!(stdout(&again).contains("private key v2 already there"));
    assert!(stdout(&again).contains("already had the audit HMAC key"));
    // A directory holding another daemon's audit key is refused, and nothing is written.
    let other_keys = config(stranger.path()).key_dir;
    let files_before: Vec<_> = std::fs::read_dir(&other_keys)
        .expect("list")
        .map(|e| e.expect("entry").file_name())
        .collect();
    assert_exit(&export(&other_keys, true), 6, "not overwritten");
    let files_after: Vec<_> = std::fs::read_dir(&other_keys)
        .expect("list")
        .map(|e| e.expect("entry").file_name())
        .collect();
    assert_eq!(files_before, files_after);
    let d = TestDaemon::start(c.path()).await;
    assert_eq!(
        d.get("r7").await.expect("get").into_inner().secret,
        b"secret-7"
    );
    assert_eq!(
        d.get("s39").await.expect("get").into_inner().secret,
        b"secret-39"
    );
    assert_eq!(
        d.get("r3").await.expect_err("revoked").code(),
        Code::FailedPrecondition
    );
    let after = d.stats().await;
    assert_eq!(after.records, before.records);
    assert_eq!(after.revoked, before.revoked);
    assert_eq!(
        after.records_per_key_version,
        before.records_per_key_version
    );
    // The trail came along event for event, and continues verifiably.
    let copied = verified_trail(&d).await;
    assert!(copied.len() > trail.len(), "the gets above were audited");
    assert_eq!(copied[..trail.len()], trail[..]);
    d.stop().await;
}

#[tokio::test]
async fn a_running_daemons_rocksdb_is_backed_up_as_a_consistent_snapshot() {
    let (a, b) = (
        tempfile::tempdir().expect("a"),
        tempfile::tempdir().expect("b"),
    );
    let d = TestDaemon::start(a.path()).await;
    d.seed("pre", 200).await;
    // Writes continue while the backup runs.
    let sealer = d.sealer().await;
    let mut ingest = d.ingest(INGEST).await;
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let writing = {
        let stop = std::sync::Arc::clone(&stop);
        tokio::spawn(async move {
            let mut n = 0u32;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                let id = format!("live{n}");
                let rec = sealer
                    .seal_record(
                        &meta(&id, "o"),
                        &tokenvault::secret::Secret::new(id.clone().into_bytes()),
                    )
                    .expect("seal");
                ingest
                    .put_sealed(v1::PutSealedRequest {
                        record: Some(rec),
                        expected_version: 0,
                    })
                    .await
                    .expect("put");
                n += 1;
            }
            n
        })
    };
    let from = format!("rocksdb:{}", a.path().join("data").display());
    let to = format!("rocksdb:{}", b.path().join("data").display());
    let cwd = a.path().to_path_buf();
    let out = tokio::task::spawn_blocking(move || copy(&cwd, &from, &to))
        .await
        .expect("join");
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let written = writing.await.expect("writer");
    assert_exit(&out, 0, "");
    assert!(written > 0, "writes ran during the backup");

    // The backup opens in a daemon of its own while the source keeps running.
    copy_keys(&a.path().join("keys"), &b.path().join("keys"));
    let backup = TestDaemon::start(b.path()).await;
    for i in [0, 99, 199] {
        assert_eq!(
            backup
                .get(format!("pre{i}").as_str())
                .await
                .expect("acknowledged before the backup")
                .into_inner()
                .secret,
            format!("secret-{i}").as_bytes()
        );
    }
    let n = backup.stats().await.records;
    assert!((200..=200 + u64::from(written)).contains(&n), "{n}");
    // A consistent point in time: the live writes it holds are a prefix of those made.
    for i in 0..(n - 200) {
        let id = format!("live{i}");
        assert_eq!(
            backup
                .get(id.as_str())
                .await
                .expect("in the snapshot")
                .into_inner()
                .secret,
            id.as_bytes()
        );
    }
    verified_trail(&backup).await;
    backup.stop().await;
    d.stop().await;
}

#[tokio::test]
async fn refused_copies_say_why_and_change_nothing() {
    let a = tempfile::tempdir().expect("a");
    let d = TestDaemon::start(a.path()).await;
    d.seed("r", 5).await;
    d.stop().await;
    let src = format!("rocksdb:{}", a.path().join("data").display());
    let fresh = |name: &str| format!("rocksdb:{}", a.path().join(name).display());

    let cases: Vec<(Vec<String>, i32, &str)> = vec![
        (
            vec![src.clone(), "mysql://u@127.0.0.1/db".into()],
            5,
            "must be rocksdb:PATH or postgres://",
        ),
        (vec![src.clone(), "rocksdb:".into()], 5, "needs a directory"),
        (
            vec![fresh("nonexistent"), fresh("t1")],
            5,
            "No such file or directory",
        ),
        (vec![src.clone(), src.clone()], 5, "the same store"),
        (
            vec![
                src.clone(),
                "postgres://u:hunter2-secret@127.0.0.1:9/db".into(),
            ],
            5,
            "must not contain a password",
        ),
        // Nothing listens on port 9 (discard): the database is unavailable.
        (
            vec![src.clone(), "postgres://u@127.0.0.1:9/db".into()],
            7,
            "unavailable",
        ),
        (
            vec![src.clone(), "postgres://u@db.example.com/db".into()],
            5,
            "ca_file",
        ),
    ];
    for (args, code, needle) in cases {
        let out = copy(a.path(), &args[0], &args[1]);
        assert_exit(&out, code, needle);
        assert!(
            !process::stderr(&out).contains("hunter2"),
            "password echoed"
        );
    }
    assert!(!a.path().join("t1").exists(), "nothing was created");

    // A target holding anything is refused, and left as it was.
    let t = tempfile::tempdir().expect("t");
    let d = TestDaemon::start(t.path()).await;
    d.seed("other", 3).await;
    d.stop().await;
    let target = format!("rocksdb:{}", t.path().join("data").display());
    assert_exit(&copy(a.path(), &src, &target), 6, "not empty");
    let d = TestDaemon::start(t.path()).await;
    assert_eq!(d.stats().await.records, 3);
    assert_eq!(
        d.get("r1").await.expect_err("not copied").code(),
        Code::NotFound
    );
    d.stop().await;
}

#[tokio::test]
async fn a_daemon_refuses_a_store_holding_an_unfinished_copy() {
    let dir = tempfile::tempdir().expect("dir");
    let config = config(dir.path());
    {
        let store = tokenvault::store::RocksStore::open(&config.data_dir, 8 << 20).expect("open");
        tokenvault::store::MetaStore::put_meta(
            &store,
            tokenvault::store::copy::COPY_STATE,
            Some(b"source=00\nphase=records\nafter=\n"),
        )
        .expect("meta");
    }
    let err = tokenvault::server::Daemon::open(&config).expect_err("refused");
    assert!(err.to_string().contains("unfinished"), "{err}");
    // `serve` says the same with exit 6 (failed precondition).
    let out = run(
        dir.path(),
        &["serve", "--dev", "--listen", "127.0.0.1:0"],
        &[],
        None,
    );
    assert_exit(&out, 6, "unfinished `tokenvault store copy`");
}

/// `admin export` / `import` on PostgreSQL: a RocksDB vault's export imported into an empty
/// database, exported from it again: the same keys and records, line for line.
#[tokio::test]
async fn an_export_goes_into_postgresql_and_comes_out_the_same() {
    let a = tempfile::tempdir().expect("a");
    let d = TestDaemon::start(a.path()).await;
    d.seed("r", 120).await;
    d.revoke("r7").await.expect("revoke");
    d.stop().await;
    let first = a.path().join("first.jsonl");
    let second = a.path().join("second.jsonl");
    let rocks = format!("rocksdb:{}", a.path().join("data").display());
    let export = |from: &str, out: &Path| {
        run(
            a.path(),
            &[
                "admin",
                "export",
                "--from",
                from,
                "--out",
                out.to_str().expect("utf-8"),
            ],
            &[],
            None,
        )
    };
    assert_exit(&export(&rocks, &first), 0, "");
    let url = pg::database().await;
    let import = || {
        run(
            a.path(),
            &[
                "admin",
                "import",
                "--in",
                first.to_str().expect("utf-8"),
                "--to",
                &url,
            ],
            &[],
            None,
        )
    };
    let out = import();
    assert_exit(&out, 0, "");
    assert!(
        stdout(&out).contains("imported into postgres://"),
        "{}",
        stdout(&out)
    );
    assert_exit(&import(), 6, "already holds record r0");
    assert_exit(&export(&url, &second), 0, "");
    // Everything but the header (which names the source and the time) and the file digest
    // over it is the same: keys, records, and the per-key-version record digests.
    let body = |p: &Path| -> Vec<String> {
        std::fs::read_to_string(p)
            .expect("export")
            .lines()
            .skip(1)
            .map(str::to_string)
            .collect()
    };
    let (one, two) = (body(&first), body(&second));
    assert_eq!(one.len(), 1 + 120 + 1, "a key, the records, the end");
    assert_eq!(one[..one.len() - 1], two[..two.len() - 1]);
    let end =
        |l: &str| serde_json::from_str::<serde_json::Value>(l).expect("end")["records"].clone();
    assert_eq!(end(&one[one.len() - 1]), end(&two[two.len() - 1]));
    assert!(
        one.iter()
            .any(|l| l.contains("\"id\":\"r7\"") && l.contains("\"revoked\":true"))
    );
}
