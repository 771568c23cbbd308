//! Daemons on the PostgreSQL store: real daemons, real gRPC on loopback, a real PostgreSQL
//! server (started by scripts/with-postgres).

mod common;

use common::pg;
use common::*;
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
    let revoked = d
        .admin(ADMIN)
        .await
        .revoke(v1::RevokeRequest { id: "r3".into() })
        .await
        .expect("revoke")
        .into_inner();
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
    let events = d.audit_events(v1::AuditLogRequest::default()).await;
    let raw: Vec<(u64, Vec<u8>)> = events.iter().map(|e| (e.seq, e.raw.clone())).collect();
    let verified = tokenvault::audit::verify_chain(raw).expect("chain verifies");
    assert_eq!(verified, events.len() as u64);
    assert!(events.iter().any(|e| e.action == "Revoke"));
    assert!(events.iter().filter(|e| e.action == "GetToken").count() >= 3);
    d.stop().await;
}

#[tokio::test]
async fn two_daemons_share_records_and_grants_through_one_database() {
    let dir = tempfile::tempdir().expect("tempdir");
    let url = pg::database().await;
    let a = TestDaemon::start_with(pg::config_on(dir.path(), &url, "a")).await;
    // Until the keyring lives in the store, both daemons read the same key directory.
    let b = TestDaemon::start_with(pg::config_on(dir.path(), &url, "b")).await;
    a.seed("x", 5).await;
    assert_eq!(
        b.get("x4").await.expect("get via b").into_inner().secret,
        b"secret-4"
    );
    // A revoke on one daemon holds on the other (no DEK cache configured here).
    b.admin(ADMIN)
        .await
        .revoke(v1::RevokeRequest { id: "x1".into() })
        .await
        .expect("revoke via b");
    assert_eq!(
        a.get("x1").await.expect_err("revoked").code(),
        Code::FailedPrecondition
    );
    // Each daemon keeps its own audit chain, and each verifies.
    for d in [&a, &b] {
        let events = d.audit_events(v1::AuditLogRequest::default()).await;
        let raw: Vec<(u64, Vec<u8>)> = events.iter().map(|e| (e.seq, e.raw.clone())).collect();
        assert!(!events.is_empty());
        tokenvault::audit::verify_chain(raw).expect("chain verifies");
    }
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
            .contains("the database schema is at version 99, newer than the 1"),
        "{err}"
    );
    let max: i32 = client
        .query_one("SELECT max(version) FROM tokenvault_schema", &[])
        .await
        .expect("query")
        .get(0);
    assert_eq!(max, 99);
}
