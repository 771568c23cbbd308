//! A fresh database on the throwaway PostgreSQL server that scripts/with-postgres starts (the
//! README's test command runs the suite under it).

use std::path::Path;

use tokenvault::config::{Config, StoreConfig};

/// The server's URL (trust authentication, loopback).
pub fn server_url() -> String {
    std::env::var("TOKENVAULT_TEST_PG_URL").expect(
        "TOKENVAULT_TEST_PG_URL is not set: run the tests with ./scripts/test, which starts a \
         throwaway PostgreSQL (or scripts/with-postgres cargo test)",
    )
}

/// Creates an empty database and returns its URL.
pub async fn database() -> String {
    let url = server_url();
    let (client, conn) = tokio_postgres::connect(&url, tokio_postgres::NoTls)
        .await
        .expect("connect to the test server");
    tokio::spawn(conn);
    let name = format!("tv_{}", hex::encode(rand::random::<[u8; 8]>()));
    client
        .batch_execute(&format!("CREATE DATABASE {name}"))
        .await
        .expect("create database");
    let base = url.rsplit_once('/').expect("URL with a database").0;
    format!("{base}/{name}")
}

/// `base`'s dev config with the records in the database at `url`, as daemon `instance`; the
/// `[store]` table goes through the real config loader.
pub fn config_on(base: &Path, url: &str, instance: &str) -> Config {
    shared(super::config(base), base, url, instance)
}

/// `config` moved onto the database at `url` as daemon `instance`, with the shared passphrase.
pub fn shared(mut config: Config, base: &Path, url: &str, instance: &str) -> Config {
    config.store = store_config(
        base,
        &format!("url = \"{url}\"\ninstance = \"{instance}\"\n"),
    );
    config.passphrase = Some(tokenvault::secret::Passphrase::new(PASSPHRASE.into()));
    config
}

/// The key passphrase every test daemon on a shared store uses.
pub const PASSPHRASE: &str = "correct horse battery staple";

/// A client of the database at `url`, to look at what the daemons stored.
pub async fn client(url: &str) -> tokio_postgres::Client {
    let (client, conn) = tokio_postgres::connect(url, tokio_postgres::NoTls)
        .await
        .expect("connect");
    tokio::spawn(conn);
    client
}

/// Loads a config file whose `[store]` table is `store_toml`; returns its store setting.
pub fn store_config(base: &Path, store_toml: &str) -> StoreConfig {
    load_store(base, store_toml).expect("valid [store]")
}

/// Loads a config file whose `[store]` table is `store_toml`.
pub fn load_store(
    base: &Path,
    store_toml: &str,
) -> Result<StoreConfig, tokenvault::config::ConfigError> {
    let path = base.join(format!(
        "store-{}.toml",
        hex::encode(rand::random::<[u8; 4]>())
    ));
    std::fs::write(
        &path,
        format!("data_dir = \"data\"\nkey_dir = \"keys\"\n[store]\n{store_toml}"),
    )
    .expect("write config");
    Config::load(&path, &std::collections::HashMap::<String, String>::new()).map(|c| c.store)
}

/// Runs `pg_ctl ACTION` on the test server (as the `postgres` user when the tests run as root,
/// since PostgreSQL refuses to run as root). Only a test binary of its own may stop the server:
/// test binaries run one after another, tests within one binary at the same time.
pub fn pg_ctl(action: &str) {
    let var =
        |k: &str| std::env::var(k).unwrap_or_else(|_| panic!("{k} (set by scripts/with-postgres)"));
    let bin = std::path::PathBuf::from(var("TOKENVAULT_TEST_PG_BIN")).join("pg_ctl");
    let data = var("TOKENVAULT_TEST_PG_DATA");
    let log = var("TOKENVAULT_TEST_PG_LOG");
    let root = std::process::Command::new("id")
        .arg("-u")
        .output()
        .is_ok_and(|o| o.stdout.starts_with(b"0\n"));
    let mut cmd = if root {
        let mut c = std::process::Command::new("runuser");
        c.args(["-u", "postgres", "--"]).arg(&bin);
        c
    } else {
        std::process::Command::new(&bin)
    };
    cmd.args([
        "-D", &data, "-l", &log, "-w", "-t", "60", "-m", "fast", action,
    ]);
    let out = cmd.output().expect("run pg_ctl");
    assert!(
        out.status.success(),
        "pg_ctl {action}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}
