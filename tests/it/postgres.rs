//! Daemons on the PostgreSQL store: real daemons, real gRPC on loopback, a real PostgreSQL
//! server (started by scripts/with-postgres).

use crate::common;

use common::pg;
use common::*;
use tokenvault::api::SealRecord as _;
use tokenvault::api::v1;
use tonic::Code;

#[tokio::test]
async fn a_daemon_on_postgres_serves_and_keeps_everything_across_a_restart() {
    let dir = tempfile::tempdir().expect("tempdir");
    let url = pg::database().await;
    let d = TestDaemon::start_with(pg::config_on(dir.path(), &url, "a")).await;
    d.seed("r", 30).await;
    assert_eq!(
        d.get("r7").await.expect("get").into_inner().secret,
        b"secret-7"
    );
    let revoked = d.revoke("r3").await.expect("revoke").into_inner();
    assert!(revoked.info.expect("info").revoked);
    d.stop().await;
    // Nothing was in RocksDB: the data directory was never created.
    assert!(!dir.path().join("data").exists(), "RocksDB was not used");

    let d = TestDaemon::start_with(pg::config_on(dir.path(), &url, "a")).await;
    assert_eq!(
        d.get("r29").await.expect("get").into_inner().secret,
        b"secret-29"
    );
    assert_eq!(
        d.get("r3").await.expect_err("revoked").code(),
        Code::FailedPrecondition
    );
    let stats = d
        .admin(ADMIN)
        .await
        .stats(v1::StatsRequest::default())
        .await
        .expect("stats")
        .into_inner();
    assert_eq!((stats.records, stats.revoked), (30, 1));
    // The audit trail continued across the restart and verifies.
    let events = d
        .audit_events(v1::AuditLogRequest {
            instance: "a".into(),
            ..Default::default()
        })
        .await;
    let raw: Vec<(u64, Vec<u8>)> = events.iter().map(|e| (e.seq, e.raw.clone())).collect();
    let verified = tokenvault::audit::verify_chain(raw).expect("chain verifies");
    assert_eq!(verified, events.len() as u64);
    assert!(events.iter().any(|e| e.action == "Revoke"));
    assert!(events.iter().filter(|e| e.action == "GetToken").count() >= 3);
    // An instance with no chain yet has no events; a name no instance can have is refused.
    let none = d
        .audit_events(v1::AuditLogRequest {
            instance: "nobody".into(),
            ..Default::default()
        })
        .await;
    assert!(none.is_empty());
    for bad in ["a b", &"x".repeat(65)] {
        let err = d
            .admin(ADMIN)
            .await
            .audit_log(v1::AuditLogRequest {
                instance: bad.to_string(),
                ..Default::default()
            })
            .await
            .expect_err("invalid instance");
        assert_eq!(err.code(), Code::InvalidArgument, "{bad}");
        assert!(
            err.message().contains("invalid instance"),
            "{}",
            err.message()
        );
    }
    d.stop().await;
}

#[tokio::test]
async fn two_daemons_share_records_and_grants_through_one_database() {
    let dir = tempfile::tempdir().expect("tempdir");
    let url = pg::database().await;
    let a = TestDaemon::start_with(pg::config_on(dir.path(), &url, "a")).await;
    let b = TestDaemon::start_with(pg::config_on(dir.path(), &url, "b")).await;
    a.seed("x", 5).await;
    assert_eq!(
        b.get("x4").await.expect("get via b").into_inner().secret,
        b"secret-4"
    );
    // A revoke on one daemon holds on the other (no DEK cache configured here).
    b.revoke("x1").await.expect("revoke via b");
    assert_eq!(
        a.get("x1").await.expect_err("revoked").code(),
        Code::FailedPrecondition
    );
    // Each daemon keeps its own audit chain, and each verifies; either daemon streams both.
    for d in [&a, &b] {
        let events = d.audit_events(v1::AuditLogRequest::default()).await;
        let chains: Vec<&str> = {
            let mut c: Vec<&str> = events.iter().map(|e| e.instance.as_str()).collect();
            c.dedup();
            c
        };
        assert_eq!(chains, ["a", "b"]);
        for chain in chains {
            let raw: Vec<(u64, Vec<u8>)> = events
                .iter()
                .filter(|e| e.instance == chain)
                .map(|e| (e.seq, e.raw.clone()))
                .collect();
            tokenvault::audit::verify_chain(raw).expect("chain verifies");
        }
    }
    // A tampered event is found in its own chain.
    pg::client(&url)
        .await
        .batch_execute("UPDATE tokenvault_audit SET value = value || '\\x00'::bytea WHERE chain = 'b' AND seq = 2")
        .await
        .expect("tamper");
    let events = a.audit_events(v1::AuditLogRequest::default()).await;
    let chain_b: Vec<(u64, Vec<u8>)> = events
        .iter()
        .filter(|e| e.instance == "b")
        .map(|e| (e.seq, e.raw.clone()))
        .collect();
    assert_eq!(
        tokenvault::audit::verify_chain(chain_b)
            .expect_err("tampered")
            .seq,
        2
    );
    a.stop().await;
    b.stop().await;
}

#[tokio::test]
async fn bad_store_settings_are_refused_at_start_with_a_clear_error() {
    let dir = tempfile::tempdir().expect("tempdir");
    let refused = |toml: &str| {
        pg::load_store(dir.path(), toml)
            .expect_err(toml)
            .to_string()
    };
    let e = refused("url = \"postgres://tv:hunter2@127.0.0.1/db\"\ninstance = \"a\"\n");
    assert!(e.contains("store.url: must not contain a password"), "{e}");
    assert!(!e.contains("hunter2"), "the password is not echoed: {e}");
    let e = refused("url = \"not a url\"\ninstance = \"a\"\n");
    assert!(
        e.contains("store.url: not a PostgreSQL connection URL"),
        "{e}"
    );
    let e = refused("url = \"postgres://tv@db.example.com/db\"\ninstance = \"a\"\n");
    assert!(e.contains("store.ca_file: required"), "{e}");
    let e = refused("url = \"postgres://tv@127.0.0.1/db\"\n");
    assert!(e.contains("store.instance: required"), "{e}");
    let e = refused("url = \"postgres://tv@127.0.0.1/db\"\ninstance = \"a b\"\n");
    assert!(e.contains("store.instance: must be"), "{e}");
    let e = refused("url = \"postgres://tv@127.0.0.1/db\"\ninstance = \"a\"\npool_size = 0\n");
    assert!(e.contains("store.pool_size"), "{e}");
    let e = refused("url = \"postgres://tv@127.0.0.1/db\"\ninstance = \"a\"\nbogus = 1\n");
    assert!(e.contains("bogus"), "{e}");
    let e = refused(
        "url = \"postgres://tv@127.0.0.1/db\"\ninstance = \"a\"\npassword_file = \"no-such-file\"\n",
    );
    assert!(
        e.contains("no-such-file") && e.contains("No such file"),
        "{e}"
    );

    // A CA file that is missing or holds no certificate stops the start, naming the file.
    std::fs::write(dir.path().join("not-a-ca.pem"), "just text\n").expect("write");
    for (file, why) in [
        ("missing-ca.pem", "No such file"),
        ("not-a-ca.pem", "holds no PEM certificate"),
    ] {
        let mut config = config(dir.path());
        config.store = pg::store_config(
            dir.path(),
            &format!(
                "url = \"{}\"\ninstance = \"a\"\nca_file = \"{file}\"\n",
                pg::server_url()
            ),
        );
        config.passphrase = Some(tokenvault::secret::Passphrase::new(pg::PASSPHRASE.into()));
        let err = tokio::task::spawn_blocking(move || tokenvault::server::Daemon::open(&config))
            .await
            .expect("join")
            .expect_err("bad CA file");
        let e = err.to_string();
        assert!(
            e.contains("store.ca_file") && e.contains(file) && e.contains(why),
            "{e}"
        );
    }

    // Nothing listens on this port: the start fails with UNAVAILABLE's exit class, quickly.
    let closed = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let port = closed.local_addr().expect("addr").port();
    drop(closed);
    let config = pg::config_on(
        dir.path(),
        &format!("postgres://postgres@127.0.0.1:{port}/postgres"),
        "a",
    );
    let err = tokio::task::spawn_blocking(move || tokenvault::server::Daemon::open(&config))
        .await
        .expect("join")
        .expect_err("unreachable database");
    assert!(
        err.to_string().contains("the database is unavailable"),
        "{err}"
    );

    // A database migrated by a newer tokenvault is refused, and left as it was.
    let url = pg::database().await;
    let d = TestDaemon::start_with(pg::config_on(dir.path(), &url, "a")).await;
    d.stop().await;
    let (client, conn) = tokio_postgres::connect(&url, tokio_postgres::NoTls)
        .await
        .expect("connect");
    tokio::spawn(conn);
    client
        .batch_execute("INSERT INTO tokenvault_schema (version) VALUES (99)")
        .await
        .expect("a newer build's migration");
    let config = pg::config_on(dir.path(), &url, "a");
    let err = tokio::task::spawn_blocking(move || tokenvault::server::Daemon::open(&config))
        .await
        .expect("join")
        .expect_err("newer schema");
    assert!(
        err.to_string()
            .contains("the database schema is at version 99, newer than the 2"),
        "{err}"
    );
    let max: i32 = client
        .query_one("SELECT max(version) FROM tokenvault_schema", &[])
        .await
        .expect("query")
        .get(0);
    assert_eq!(max, 99);
}

/// The key versions a daemon has loaded, as (version, state).
async fn key_states(d: &TestDaemon) -> Vec<(u32, i32)> {
    d.admin(ADMIN)
        .await
        .list_keys(v1::ListKeysRequest::default())
        .await
        .expect("list keys")
        .into_inner()
        .keys
        .into_iter()
        .map(|k| (k.version, k.state))
        .collect()
}

/// Waits (on the daemon's answers, polled) until `d` reports `want`; fails after 10 s.
async fn until_keys(d: &TestDaemon, want: &[(u32, v1::KeyState)]) {
    let want: Vec<(u32, i32)> = want.iter().map(|(v, s)| (*v, *s as i32)).collect();
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(10);
    loop {
        let got = key_states(d).await;
        if got == want {
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "keys {got:?}, want {want:?}"
        );
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
}

#[tokio::test]
async fn daemons_with_their_own_key_dirs_share_one_encrypted_keyring() {
    use v1::KeyState::{Active, DecryptOnly, Destroyed, PendingDestruction, Retired};
    let (dir_a, dir_b) = (
        tempfile::tempdir().expect("a"),
        tempfile::tempdir().expect("b"),
    );
    let url = pg::database().await;
    // a's clock is the test's, so the destruction's waiting period can pass.
    let clock = TestClock::new();
    let cfg_a = pg::config_on(dir_a.path(), &url, "a");
    let store_a = tokenvault::vault::open_store(&cfg_a).expect("store a");
    let a = TestDaemon::start_with_clock(cfg_a, store_a, &clock).await;
    let b = TestDaemon::start_with(pg::config_on(dir_b.path(), &url, "b")).await;
    // The private keys are in the store, encrypted; no key file was written anywhere.
    let db = pg::client(&url).await;
    let stored: Vec<(String, Vec<u8>)> = db
        .query(
            "SELECT key, value FROM tokenvault_meta WHERE key LIKE 'private_key/%' ORDER BY key",
            &[],
        )
        .await
        .expect("query")
        .into_iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect();
    assert_eq!(stored.len(), 1);
    assert!(stored[0].1.starts_with(b"TVK1"), "stored encrypted");
    for d in [dir_a.path(), dir_b.path()] {
        let files: Vec<_> = std::fs::read_dir(d.join("keys"))
            .map(|r| r.filter_map(Result::ok).map(|e| e.file_name()).collect())
            .unwrap_or_default();
        assert!(files.is_empty(), "no key files: {files:?}");
    }
    a.seed("old", 3).await;

    // A rotation on one daemon reaches the other: a web tier sealing with the new key through
    // b is served at once (b reloads on the unknown key), and b follows the registry. The new
    // version is X-Wing: its private key is shared encrypted in the store like an RSA one, and
    // b opens envelope v2 with it.
    a.admin(ADMIN)
        .await
        .rotate_key(v1::RotateKeyRequest {
            algorithm: "x-wing".into(),
            ..Default::default()
        })
        .await
        .expect("rotate on a");
    let x_wing_key: Vec<u8> = db
        .query_one(
            "SELECT value FROM tokenvault_meta WHERE key = 'private_key/v0002'",
            &[],
        )
        .await
        .expect("query")
        .get(0);
    assert!(x_wing_key.starts_with(b"TVK1"), "stored encrypted");
    let fresh = a.sealer().await;
    let rec = fresh
        .seal_record(
            &meta("new", "o"),
            &tokenvault::secret::Secret::new(b"n".to_vec()),
        )
        .expect("seal");
    b.ingest(INGEST)
        .await
        .put_sealed(v1::PutSealedRequest {
            record: Some(rec),
            expected_version: 0,
        })
        .await
        .expect("b accepts the new key");
    assert_eq!(b.get("new").await.expect("get").into_inner().secret, b"n");
    assert_eq!(
        fresh.public_key().algorithm(),
        tokenvault::keys::Algorithm::XWing
    );
    until_keys(&b, &[(1, DecryptOnly), (2, Active)]).await;

    // Rewrap on b, retire and destroy on a: b stops holding version 1 within the poll bound,
    // and the private key is gone from the store.
    assert_eq!(b.rewrap().await.rewrapped, 3);
    let admin = || async { a.admin(ADMIN).await };
    admin()
        .await
        .retire_key(v1::RetireKeyRequest { version: 1 })
        .await
        .expect("retire");
    until_keys(&b, &[(1, Retired), (2, Active)]).await;
    let pending = admin()
        .await
        .destroy_key(v1::DestroyKeyRequest { version: 1 })
        .await
        .expect("destroy")
        .into_inner();
    assert!(
        !pending.private_key_erased,
        "pending for the waiting period"
    );
    until_keys(&b, &[(1, PendingDestruction), (2, Active)]).await;
    clock.advance(7 * 86_400);
    assert_eq!(a.destroy_due().await.len(), 1, "destroyed when due");
    until_keys(&b, &[(1, Destroyed), (2, Active)]).await;
    let left: i64 = db
        .query_one(
            "SELECT count(*) FROM tokenvault_meta WHERE key = 'private_key/v0001'",
            &[],
        )
        .await
        .expect("query")
        .get(0);
    assert_eq!(
        left, 0,
        "the destroyed private key is deleted from the store"
    );
    assert_eq!(
        b.get("old2").await.expect("get").into_inner().secret,
        b"secret-2"
    );
    // An audit query by record id finds the events of both daemons: one HMAC key.
    for d in [&a, &b] {
        let events = d
            .audit_events(v1::AuditLogRequest {
                record_id: "new".into(),
                ..Default::default()
            })
            .await;
        assert!(events.iter().any(|e| e.action == "GetToken"), "{events:?}");
    }
    a.stop().await;
    b.stop().await;
}

#[tokio::test]
async fn a_shared_store_needs_the_right_passphrase() {
    let dir = tempfile::tempdir().expect("tempdir");
    let url = pg::database().await;
    let a = TestDaemon::start_with(pg::config_on(dir.path(), &url, "a")).await;
    a.seed("r", 1).await;
    a.stop().await;
    let open = |config: tokenvault::config::Config| async move {
        tokio::task::spawn_blocking(move || tokenvault::server::Daemon::open(&config))
            .await
            .expect("join")
            .expect_err("refused")
            .to_string()
    };
    // Every row of every table of the vault, as text: a refused start must leave it as it is
    // (no lease, no audit event, no key, nothing).
    let client = pg::client(&url).await;
    let snapshot = || async {
        let tables: Vec<String> = client
            .query(
                "SELECT tablename::text FROM pg_tables WHERE tablename LIKE 'tokenvault%' ORDER BY 1",
                &[],
            )
            .await
            .expect("tables")
            .into_iter()
            .map(|r| r.get(0))
            .collect();
        assert!(tables.len() >= 4, "{tables:?}");
        let mut rows = Vec::new();
        for t in tables {
            let all: String = client
                .query_one(
                    &format!(
                        "SELECT coalesce(string_agg(x::text, '|' ORDER BY x::text), '') FROM {t} x"
                    ),
                    &[],
                )
                .await
                .expect("rows")
                .get(0);
            rows.push((t, all));
        }
        rows
    };
    let before = snapshot().await;
    let mut none = pg::config_on(dir.path(), &url, "b");
    none.passphrase = None;
    let e = open(none).await;
    assert!(
        e.contains("keeps the private keys encrypted with the passphrase"),
        "{e}"
    );
    let mut wrong = pg::config_on(dir.path(), &url, "b");
    wrong.passphrase = Some(tokenvault::secret::Passphrase::new("wrong".into()));
    let e = open(wrong).await;
    assert!(e.contains("does not open with this passphrase"), "{e}");
    assert!(!e.contains(pg::PASSPHRASE) && !e.contains("wrong\""), "{e}");
    // Every other setting that refuses a start, each checked before anything is written.
    let loose_sink = dir.path().join("loose-audit.jsonl");
    std::fs::write(&loose_sink, "").expect("sink file");
    std::fs::set_permissions(
        &loose_sink,
        std::os::unix::fs::PermissionsExt::from_mode(0o644),
    )
    .expect("chmod");
    let mut sink = pg::config_on(dir.path(), &url, "b");
    sink.audit.sink = Some(tokenvault::config::SinkConfig {
        file: loose_sink,
        max_bytes: 1 << 20,
        keep_files: 2,
    });
    let e = open(sink).await;
    assert!(e.contains("chmod 600"), "{e}");
    let mut tls = pg::config_on(dir.path(), &url, "b");
    tls.tls = Some(tokenvault::config::TlsConfig {
        cert_file: dir.path().join("missing-cert.pem"),
        key_file: dir.path().join("missing-key.pem"),
        client_ca_file: None,
        require_client_cert: false,
    });
    let e = open(tls).await;
    assert!(
        e.contains("TLS key") && e.contains("missing-key.pem"),
        "{e}"
    );
    // A port in use: the `serve` command binds its listeners before it opens the vault.
    let taken = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let port = taken.local_addr().expect("addr").port();
    let serve_dir = tempfile::tempdir().expect("serve dir");
    write_daemon_config(serve_dir.path(), &url, "b", &format!("127.0.0.1:{port}"));
    let out = process::run(
        serve_dir.path(),
        &["serve", "--config", "daemon.toml"],
        &[],
        None,
    );
    process::assert_exit(&out, 7, &format!("cannot listen on 127.0.0.1:{port}"));
    // Nothing was written by the refused daemons: not a byte, and no audit chain "b".
    assert!(
        snapshot().await == before,
        "a refused start changed the database"
    );
    let chain_b = || async {
        client
            .query_one(
                "SELECT count(*) FROM tokenvault_audit WHERE chain = 'b'",
                &[],
            )
            .await
            .expect("query")
            .get::<_, i64>(0)
    };
    assert_eq!(chain_b().await, 0);

    // A tampered encrypted row is refused like a wrong passphrase, and nothing is written.
    for key in ["audit_hmac_key", "private_key/v0001"] {
        let original: Vec<u8> = client
            .query_one("SELECT value FROM tokenvault_meta WHERE key = $1", &[&key])
            .await
            .expect("row")
            .get(0);
        let mut tampered = original.clone();
        let at = tampered.len() / 2;
        tampered[at] = if tampered[at] == b'A' { b'B' } else { b'A' };
        let write = |v: Vec<u8>| {
            let client = &client;
            async move {
                client
                    .execute(
                        "UPDATE tokenvault_meta SET value = $2 WHERE key = $1",
                        &[&key, &v],
                    )
                    .await
                    .expect("update")
            }
        };
        write(tampered).await;
        let tampered_state = snapshot().await;
        let e = open(pg::config_on(dir.path(), &url, "b")).await;
        assert!(
            snapshot().await == tampered_state,
            "{key}: a refused start changed the database"
        );
        let expected = match key {
            "audit_hmac_key" => "audit_hmac_key (in the store): does not open with this passphrase",
            _ => {
                "shared store: private key v1: could not decrypt the private key: wrong passphrase or corrupt file"
            }
        };
        assert!(e.contains(expected), "{key}: {e}");
        write(original).await;
    }
    assert_eq!(chain_b().await, 0);
    // Restored, the same daemon starts.
    TestDaemon::start_with(pg::config_on(dir.path(), &url, "b"))
        .await
        .stop()
        .await;
}

/// Starts `tokenvault serve` as its own process on the database at `url` as `instance` (a
/// config file with the test credentials and the shared passphrase); returns it and a channel.
async fn spawn_on(
    dir: &std::path::Path,
    url: &str,
    instance: &str,
) -> (std::process::Child, tonic::transport::Channel) {
    write_daemon_config(dir, url, instance, "127.0.0.1:0");
    let (child, addr, _) = process::spawn_daemon(dir, &["serve", "--config", "daemon.toml"], &[]);
    let channel = tonic::transport::Channel::from_shared(format!("http://{addr}"))
        .expect("uri")
        .connect()
        .await
        .expect("connect");
    (child, channel)
}

/// Writes `dir/daemon.toml` (and `dir/pass`): a daemon on the database at `url` as `instance`,
/// listening on `listen`, with the test credentials and the shared passphrase.
fn write_daemon_config(dir: &std::path::Path, url: &str, instance: &str, listen: &str) {
    use sha2::Digest as _;
    let hash = |c: &str| hex::encode(sha2::Sha256::digest(c.as_bytes()));
    std::fs::write(dir.join("pass"), pg::PASSPHRASE).expect("passphrase file");
    std::fs::write(
        dir.join("daemon.toml"),
        format!(
            "listen = \"{listen}\"\ndata_dir = \"data\"\nkey_dir = \"keys\"\n\
             passphrase_file = \"pass\"\nlock_memory = false\n\
             [store]\nurl = \"{url}\"\ninstance = \"{instance}\"\n\
             [[credentials]]\nname = \"admin\"\nrole = \"admin\"\nsha256 = \"{}\"\n\
             [[credentials]]\nname = \"ingest\"\nrole = \"ingest\"\nsha256 = \"{}\"\n",
            hash(ADMIN),
            hash(INGEST)
        ),
    )
    .expect("config");
}

#[tokio::test]
async fn acknowledged_writes_survive_a_kill_of_the_daemon_under_load() {
    let (dir_a, dir_b) = (
        tempfile::tempdir().expect("a"),
        tempfile::tempdir().expect("b"),
    );
    let url = pg::database().await;
    // b (in-process) makes the shared keyring and afterwards reads what a acknowledged.
    let b = TestDaemon::start_with(pg::config_on(dir_b.path(), &url, "b")).await;
    let sealer = b.sealer().await;
    let (mut child, channel) = spawn_on(dir_a.path(), &url, "a").await;
    let mut writers = tokio::task::JoinSet::new();
    for w in 0..8 {
        let mut ingest = v1::ingest_client::IngestClient::new(
            tonic::service::interceptor::InterceptedService::new(
                channel.clone(),
                Bearer::new(INGEST),
            ),
        );
        let sealer = sealer.clone();
        writers.spawn(async move {
            let mut acked = Vec::new();
            for n in 0.. {
                let id = format!("k{w}-{n}");
                let rec = sealer
                    .seal_record(
                        &meta(&id, "o"),
                        &tokenvault::secret::Secret::new(id.clone().into_bytes()),
                    )
                    .expect("seal");
                let put = ingest
                    .put_sealed(v1::PutSealedRequest {
                        record: Some(rec),
                        expected_version: 0,
                    })
                    .await;
                match put {
                    Ok(_) => acked.push(id),
                    // The daemon is gone: this write and the rest are not acknowledged.
                    Err(_) => return acked,
                }
            }
            acked
        });
    }
    tokio::time::sleep(std::time::Duration::from_millis(500)).await;
    child.kill().expect("SIGKILL");
    child.wait().expect("reap");
    let mut acked = Vec::new();
    while let Some(r) = writers.join_next().await {
        acked.extend(r.expect("join"));
    }
    assert!(acked.len() > 20, "writes were under way: {}", acked.len());
    for id in &acked {
        assert_eq!(
            b.get(id.as_str())
                .await
                .expect("acknowledged, so stored")
                .into_inner()
                .secret,
            id.as_bytes()
        );
    }
    b.stop().await;
}

#[tokio::test]
async fn a_rewrap_whose_daemon_is_killed_is_finished_by_another() {
    let url = pg::database().await;
    let (seed_dir, dir_a, dir_b) = (
        tempfile::tempdir().expect("seed"),
        tempfile::tempdir().expect("a"),
        tempfile::tempdir().expect("b"),
    );
    // 400 records under version 1, then version 2 made active.
    let seed = TestDaemon::start_with(pg::config_on(seed_dir.path(), &url, "seed")).await;
    seed.seed("r", 400).await;
    seed.admin(ADMIN)
        .await
        .rotate_key(v1::RotateKeyRequest::default())
        .await
        .expect("rotate");
    seed.stop().await;

    // Daemon a, its own process, starts a slow rewrap and is killed (-9) mid-run.
    let (mut child, channel) = spawn_on(dir_a.path(), &url, "a").await;
    let mut admin_a = v1::admin_client::AdminClient::new(
        tonic::service::interceptor::InterceptedService::new(channel, Bearer::new(ADMIN)),
    );
    let mut stream = admin_a
        .rewrap(v1::RewrapRequest {
            max_records_per_second: 40,
        })
        .await
        .expect("rewrap on a")
        .into_inner();
    let first = stream.message().await.expect("progress").expect("a report");
    assert!(!first.done && first.rewrapped > 0, "{first:?}");
    child.kill().expect("SIGKILL a");
    child.wait().expect("reap a");

    // Daemon b cannot start a second run while a's lease lasts, then takes the run over and
    // finishes it from the stored cursor.
    let b = TestDaemon::start_with(pg::config_on(dir_b.path(), &url, "b")).await;
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(40);
    let mut refused = 0;
    let last = loop {
        match b
            .admin(ADMIN)
            .await
            .rewrap(v1::RewrapRequest::default())
            .await
        {
            Ok(s) => {
                let mut s = s.into_inner();
                let mut last = None;
                while let Some(p) = s.message().await.expect("progress") {
                    last = Some(p);
                }
                break last.expect("a report");
            }
            Err(e) => {
                assert_eq!(e.code(), Code::FailedPrecondition, "{e:?}");
                assert!(e.message().contains("already running"), "{}", e.message());
                refused += 1;
                assert!(tokio::time::Instant::now() < deadline, "never taken over");
                tokio::time::sleep(std::time::Duration::from_millis(200)).await;
            }
        }
    };
    assert!(refused > 0, "a's lease held b off until it expired");
    assert!(last.done);
    assert!(last.rewrapped < 400, "b resumed, not restarted: {last:?}");
    let stats = b
        .admin(ADMIN)
        .await
        .stats(v1::StatsRequest::default())
        .await
        .expect("stats")
        .into_inner();
    let per_version: Vec<(u32, u64)> = stats
        .records_per_key_version
        .iter()
        .map(|k| (k.key_version, k.records))
        .collect();
    assert_eq!(per_version, vec![(2, 400)], "every record on the new key");
    for i in (0..400).step_by(37) {
        assert_eq!(
            b.get(format!("r{i}"))
                .await
                .expect("opens")
                .into_inner()
                .secret,
            format!("secret-{i}").as_bytes()
        );
    }
    b.stop().await;
}

#[test]
fn offline_key_commands_work_on_the_shared_database() {
    let dir = tempfile::tempdir().expect("tempdir");
    let url = tokio::runtime::Runtime::new()
        .expect("runtime")
        .block_on(pg::database());
    std::fs::write(dir.path().join("pass"), pg::PASSPHRASE).expect("passphrase");
    for n in ["a", "b"] {
        std::fs::write(
            dir.path().join(format!("{n}.toml")),
            format!(
                "data_dir = \"data-{n}\"\nkey_dir = \"keys-{n}\"\npassphrase_file = \"pass\"\n\
                 [store]\nurl = \"{url}\"\ninstance = \"{n}\"\n"
            ),
        )
        .expect("config");
    }
    let run = |args: &[&str]| process::run(dir.path(), args, &[], None);
    let init = run(&["keys", "init", "--config", "a.toml"]);
    assert!(init.status.success(), "{}", process::stderr(&init));
    // The other daemon's config sees the same keyring, and a second init is refused.
    let list = run(&["keys", "list", "--config", "b.toml"]);
    assert!(String::from_utf8_lossy(&list.stdout).starts_with("v1  active"));
    process::assert_exit(
        &run(&["keys", "init", "--config", "b.toml"]),
        6,
        "the keyring already has 1 key version(s)",
    );
    let rotate = run(&["keys", "rotate", "--config", "b.toml"]);
    assert!(rotate.status.success(), "{}", process::stderr(&rotate));
    let list =
        String::from_utf8_lossy(&run(&["keys", "list", "--config", "a.toml"]).stdout).into_owned();
    assert!(
        list.contains("v1  decrypt-only") && list.contains("v2  active"),
        "{list}"
    );
    // Nothing was written to local directories: keys and data are in the database.
    for local in ["data-a", "data-b", "keys-a", "keys-b"] {
        assert!(!dir.path().join(local).exists(), "{local} created");
    }
    // Without the passphrase the commands refuse, naming what is missing.
    std::fs::write(
        dir.path().join("c.toml"),
        format!("data_dir = \"d\"\nkey_dir = \"k\"\n[store]\nurl = \"{url}\"\ninstance = \"c\"\n"),
    )
    .expect("config");
    let refused = run(&["keys", "rotate", "--config", "c.toml"]);
    assert!(!refused.status.success());
    assert!(
        process::stderr(&refused).contains("keeps the private keys encrypted with the passphrase"),
        "{}",
        process::stderr(&refused)
    );
}

#[tokio::test]
async fn an_instance_name_runs_once() {
    let (dir, other) = (
        tempfile::tempdir().expect("a"),
        tempfile::tempdir().expect("b"),
    );
    let url = pg::database().await;
    let a = TestDaemon::start_with(pg::config_on(dir.path(), &url, "a")).await;
    // A second daemon configured with the same name waits out a possibly dead holder's lease,
    // then refuses to start, saying why.
    let config = pg::config_on(other.path(), &url, "a");
    let started = std::time::Instant::now();
    let err = tokio::task::spawn_blocking(move || tokenvault::server::Daemon::open(&config))
        .await
        .expect("join")
        .expect_err("name in use");
    assert!(
        err.to_string().contains("store.instance \"a\" is in use"),
        "{err}"
    );
    assert!(started.elapsed() >= tokenvault::vault::INSTANCE_LEASE);
    // A clean stop frees the name at once: its lease is already expired when it returns.
    a.stop().await;
    let free: bool = pg::client(&url)
        .await
        .query_one(
            "SELECT expires_at < now() FROM tokenvault_leases WHERE name = 'instance/a'",
            &[],
        )
        .await
        .expect("lease row")
        .get(0);
    assert!(free, "released on a clean stop");
    let again = TestDaemon::start_with(pg::config_on(dir.path(), &url, "a")).await;
    again.stop().await;
}

/// The documented `[store]` tables, byte for byte: the README reference's commented block
/// uncommented, and docs/SCALING.md's "Running several daemons" and failover examples, load as the text says
/// (paths moved to a temporary directory, since the files they name must exist).
#[test]
fn the_readme_store_tables_load_as_documented() {
    let readme = std::fs::read_to_string(fixture_path("README.md")).expect("README.md")
        + &std::fs::read_to_string(fixture_path("docs/SCALING.md")).expect("docs/SCALING.md");
    let dir = tempfile::tempdir().expect("tempdir");
    let etc = dir.path().join("etc/");
    std::fs::create_dir_all(&etc).expect("etc");
    std::fs::write(etc.join("db-password"), "s3cret\n").expect("password");
    std::fs::write(etc.join("db-ca.pem"), "").expect("ca");
    let toml_blocks: Vec<String> = {
        let mut out = Vec::new();
        let mut lines = readme.lines();
        while let Some(line) = lines.next() {
            if line.trim() == "```toml" {
                out.push(
                    lines
                        .by_ref()
                        .take_while(|l| l.trim() != "```")
                        .map(|l| l.trim_start().to_string())
                        .collect::<Vec<_>>()
                        .join("\n"),
                );
            }
        }
        out
    };
    // From its `[store]` line to the next table (or, commented out, to the first line that is
    // not a comment).
    let store_table = |block: &str, uncomment: bool| -> String {
        let start = if uncomment { "# [store]" } else { "[store]" };
        block
            .lines()
            .skip_while(|l| !l.starts_with(start))
            .enumerate()
            .take_while(|(i, l)| {
                *i == 0
                    || if uncomment {
                        l.starts_with("# ")
                    } else {
                        !l.starts_with('[')
                    }
            })
            .map(|(_, l)| if uncomment { &l[2..] } else { l })
            .collect::<Vec<_>>()
            .join("\n")
            .replace("/etc/tokenvault/", &etc.display().to_string())
    };
    let reference = toml_blocks
        .iter()
        .find(|b| b.contains("# [store]"))
        .expect("the configuration reference");
    let example = toml_blocks
        .iter()
        .find(|b| b.contains("instance = \"vault-a\"") && b.contains("\n[store]"))
        .expect("the several-daemons example");
    // docs/SCALING.md's table for a primary and its standby: both hosts, the writable one.
    let failover = toml_blocks
        .iter()
        .find(|b| b.contains("target_session_attrs=read-write"))
        .expect("the failover example");
    let failover = store_table(failover, false);
    {
        let table = failover
            .strip_prefix("[store]")
            .expect("starts with [store]");
        let store = pg::load_store(dir.path(), table).expect("loads");
        let tokenvault::config::StoreConfig::Postgres(pg) = store else {
            panic!("not a database store");
        };
        assert_eq!(pg.connection.get_hosts().len(), 2);
        assert_eq!(
            pg.connection.get_target_session_attrs(),
            tokio_postgres::config::TargetSessionAttrs::ReadWrite
        );
    }
    for table in [store_table(reference, true), store_table(example, false)] {
        assert!(table.contains("url = \"postgres://tokenvault@db.internal:5432/tokenvault\""));
        let table = table.strip_prefix("[store]").expect("starts with [store]");
        let store = pg::load_store(dir.path(), table).expect("loads");
        let tokenvault::config::StoreConfig::Postgres(pg) = store else {
            panic!("not a database store");
        };
        assert_eq!(pg.instance, "vault-a");
        assert_eq!(pg.connection.get_dbname(), Some("tokenvault"));
        assert_eq!(
            pg.password.as_ref().map(|p| p.expose_secret().to_string()),
            Some("s3cret".into()),
            "the file's newline is not part of the password"
        );
        assert_eq!(pg.ca_file, Some(etc.join("db-ca.pem")));
    }
}

/// On PostgreSQL a `GetToken` without a grant, of a record whose data key is cached, awaits
/// its record read on the executor, and a record found releasable there is checked and opened
/// there; every other call and outcome takes the store-pool step. Callers get what they get on
/// RocksDB, each refusal is audited once, and a per-record rate limit is charged once per call
/// whichever way the call went.
#[tokio::test]
async fn get_token_on_postgres_releases_refuses_and_audits_each_call_once() {
    use tokenvault::config::{CallerPolicy, CredentialEntry, DekCacheConfig, Role};
    use tokenvault::secret::ApiCredential;
    const ELSEWHERE: &str = "tv_pg_worker_for_other_owners";
    const LIMITED: &str = "tv_pg_worker_one_per_record_second";
    let dir = tempfile::tempdir().expect("tempdir");
    let url = pg::database().await;
    let mut cfg = pg::config_on(dir.path(), &url, "a");
    cfg.dek_cache = Some(DekCacheConfig {
        max_entries: 100,
        ttl_seconds: 3600,
    });
    for (name, cred, policy) in [
        (
            "elsewhere",
            ELSEWHERE,
            CallerPolicy {
                owner_prefixes: vec!["other".into()],
                ..CallerPolicy::default()
            },
        ),
        (
            "limited",
            LIMITED,
            CallerPolicy {
                record_rate_per_second: Some(1),
                ..CallerPolicy::default()
            },
        ),
    ] {
        cfg.credentials.push(CredentialEntry {
            policy,
            ..CredentialEntry::for_credential(name, Role::Worker, &ApiCredential::new(cred.into()))
        });
    }
    let d = TestDaemon::start_with(cfg).await;
    d.seed("r", 3).await;

    // Uncached (the data key unwrapped on a private-key thread), then from the cache.
    for _ in 0..2 {
        assert_eq!(
            d.get("r0").await.expect("get").into_inner().secret,
            b"secret-0"
        );
    }
    assert_eq!(d.stats().await.dek_cache_hits, 1);
    // r2's key cached: the refusals and releases of r2 below are read on the executor.
    d.get("r2").await.expect("get");
    assert_eq!(
        d.get("nope").await.expect_err("missing").code(),
        Code::NotFound
    );
    d.revoke("r1").await.expect("revoke");
    assert_eq!(
        d.get("r1").await.expect_err("revoked").code(),
        Code::FailedPrecondition
    );
    let denied = d
        .broker(ELSEWHERE)
        .await
        .get_token(v1::GetTokenRequest { id: "r2".into() })
        .await
        .expect_err("another owner's record");
    assert_eq!(denied.code(), Code::PermissionDenied);

    let mut limited = d.broker(LIMITED).await;
    let started = std::time::Instant::now();
    let (mut released, mut limited_out) = (0u64, 0u64);
    for _ in 0..4 {
        match limited
            .get_token(v1::GetTokenRequest { id: "r2".into() })
            .await
        {
            Ok(r) => {
                assert_eq!(r.into_inner().secret, b"secret-2");
                released += 1;
            }
            Err(e) => {
                assert_eq!(e.code(), Code::ResourceExhausted, "{}", e.message());
                limited_out += 1;
            }
        }
    }
    // A bucket of one a second, charged once per call: the first call and at most one more per
    // second elapsed.
    let allowed = 1 + started.elapsed().as_secs();
    assert!(
        (1..=allowed).contains(&released) && limited_out >= 1,
        "{released} released, {limited_out} limited, {allowed} allowed"
    );

    let events = d
        .audit_events(v1::AuditLogRequest {
            instance: "a".into(),
            ..Default::default()
        })
        .await;
    let raw: Vec<(u64, Vec<u8>)> = events.iter().map(|e| (e.seq, e.raw.clone())).collect();
    tokenvault::audit::verify_chain(raw).expect("chain verifies");
    let count = |caller: &str, outcome: &str| {
        events
            .iter()
            .filter(|e| e.action == "GetToken" && e.caller == caller && e.outcome == outcome)
            .count() as u64
    };
    assert_eq!(count("worker-1", "ok"), 3);
    assert_eq!(count("worker-1", "NotFound"), 1);
    assert_eq!(count("worker-1", "FailedPrecondition"), 1);
    assert_eq!(count("elsewhere", "PermissionDenied"), 1);
    assert_eq!(count("limited", "ok"), released);
    assert_eq!(count("limited", "ResourceExhausted"), limited_out);
    // Each event names what the store-pool step's would: the owner once the record was read,
    // none for a rate-limit refusal (made before the read there).
    let owner_named = |caller: &str, outcome: &str| {
        events
            .iter()
            .filter(|e| e.action == "GetToken" && e.caller == caller && e.outcome == outcome)
            .map(|e| !e.owner_hmac.is_empty())
            .collect::<Vec<_>>()
    };
    assert_eq!(owner_named("elsewhere", "PermissionDenied"), [true]);
    assert!(owner_named("limited", "ok").iter().all(|named| *named));
    assert!(
        owner_named("limited", "ResourceExhausted")
            .iter()
            .all(|named| !named)
    );
    d.stop().await;
}
