//! Private keys in a PKCS#11 token (opencryptoki's soft token, started by
//! scripts/with-softtoken): a real daemon over real gRPC generates its key versions in the
//! token, opens envelopes there, rotates, rewraps, retires and destroys them; a file-key
//! deployment moves into the token and back with rotate + rewrap + destroy; a wrong PIN, a
//! missing module and an unknown token stop the start before anything is written.

use crate::common;

use std::path::{Path, PathBuf};

use common::token::*;
use common::*;
use tokenvault::api::v1;
use tokenvault::config::{Config, KeyBackend};
use tokenvault_pkcs11::{Pin, TokenConfig, TokenSelector};

/// Every private key file under `dir`.
fn private_key_files(dir: &Path) -> Vec<PathBuf> {
    let mut files = Vec::new();
    process::files_under(dir, &mut files);
    files.retain(|f| f.to_string_lossy().ends_with(".key.pem"));
    files
}

async fn rotate(d: &TestDaemon, import: Option<String>) -> u32 {
    d.admin(ADMIN)
        .await
        .rotate_key(v1::RotateKeyRequest {
            private_key_pem: import.unwrap_or_default(),
            public_key_pem: String::new(),
            token_key_label: String::new(),
            algorithm: String::new(),
        })
        .await
        .expect("rotate")
        .into_inner()
        .active
        .expect("active")
        .version
}

/// A daemon with `config` whose clock the test moves.
async fn start(config: Config, clock: &TestClock) -> TestDaemon {
    let store = tokenvault::vault::open_store(&config).expect("store");
    TestDaemon::start_with_clock(config, store, clock).await
}

/// Rewraps everything onto the active version, then retires `version`, asks for its
/// destruction and lets the waiting period pass.
async fn retire_and_destroy(d: &TestDaemon, clock: &TestClock, version: u32) {
    let progress = d.rewrap().await;
    assert_eq!(progress.failed, 0, "{progress:?}");
    let mut admin = d.admin(ADMIN).await;
    admin
        .retire_key(v1::RetireKeyRequest { version })
        .await
        .expect("retire");
    admin
        .destroy_key(v1::DestroyKeyRequest { version })
        .await
        .expect("destroy");
    clock.advance(7 * 86_400);
    assert_eq!(
        d.destroy_due()
            .await
            .iter()
            .map(|k| k.version)
            .collect::<Vec<_>>(),
        vec![version]
    );
}

#[tokio::test]
async fn keys_generated_in_the_token_open_rotate_rewrap_retire_and_destroy() {
    let dir = tempfile::tempdir().expect("tempdir");
    let clock = TestClock::new();
    let d = start(in_token(dir.path()), &clock).await;
    d.seed("r", 20).await;
    assert_eq!(secret(&d, "r3").await, b"secret-3");
    let token = token();
    let v1 = id_bytes(&fingerprint(&d, 1).await);
    assert!(
        token.find(&v1).expect("find").is_some(),
        "v1 is in the token"
    );
    assert!(
        !token.exposes_private_value(&v1).expect("check"),
        "the token refuses CKA_VALUE and the private exponent of v1"
    );

    // A token holds RSA keys only: an X-Wing version is refused and nothing changes.
    let e = d
        .admin(ADMIN)
        .await
        .rotate_key(v1::RotateKeyRequest {
            algorithm: "x-wing".into(),
            ..Default::default()
        })
        .await
        .expect_err("x-wing in a token");
    assert_eq!(e.code(), tonic::Code::FailedPrecondition, "{}", e.message());
    assert!(
        e.message()
            .contains("generates rsa-2048 keys only, not x-wing"),
        "{}",
        e.message()
    );
    assert_eq!(rotate(&d, None).await, 2);
    let v2 = id_bytes(&fingerprint(&d, 2).await);
    assert!(
        token.find(&v2).expect("find").is_some(),
        "v2 is in the token"
    );
    retire_and_destroy(&d, &clock, 1).await;
    assert!(
        token.find(&v1).expect("find").is_none(),
        "v1 destroyed in the token"
    );
    for i in [0, 7, 19] {
        assert_eq!(
            secret(&d, &format!("r{i}")).await,
            format!("secret-{i}").as_bytes()
        );
    }
    // Not one private key anywhere under the data or key directories.
    assert_eq!(private_key_files(dir.path()), Vec::<PathBuf>::new());

    // An existing token key is registered by its label (a key generated here, as an HSM
    // administrator would); an unknown label changes nothing.
    let label = format!("imported-{}", d.vault.now());
    let pair = token.generate_rsa_2048().expect("generate");
    token
        .name(&pair, b"operator-chosen-id", &label)
        .expect("label it");
    let e = d
        .admin(ADMIN)
        .await
        .rotate_key(v1::RotateKeyRequest {
            token_key_label: "no-such-label".into(),
            ..Default::default()
        })
        .await
        .expect_err("unknown label");
    assert_eq!(e.code(), tonic::Code::FailedPrecondition, "{}", e.message());
    assert!(e.message().contains("no-such-label"), "{}", e.message());
    let v3 = d
        .admin(ADMIN)
        .await
        .rotate_key(v1::RotateKeyRequest {
            token_key_label: label.clone(),
            ..Default::default()
        })
        .await
        .expect("import by label")
        .into_inner()
        .active
        .expect("active");
    assert_eq!(v3.version, 3);
    let found = token
        .find(&id_bytes(&v3.fingerprint))
        .expect("find")
        .expect("the imported key now has the fingerprint as its id");
    assert_eq!(found.modulus, pair.modulus);
    d.seed("i", 3).await;
    assert_eq!(secret(&d, "i2").await, b"secret-2");

    // A restart finds v2 in the token by its fingerprint; concurrent reads share the bounded
    // session pool (one session here: the soft token's limit).
    d.stop().await;
    let d = TestDaemon::start_with(in_token(dir.path())).await;
    assert_eq!(secret(&d, "r11").await, b"secret-11");
    let mut reads = tokio::task::JoinSet::new();
    for t in 0..8 {
        let mut broker = d.broker(WORKER).await;
        reads.spawn(async move {
            for i in 0..5 {
                let n = (t * 5 + i) % 20;
                let got = broker
                    .get_token(v1::GetTokenRequest {
                        id: format!("r{n}"),
                    })
                    .await
                    .expect("concurrent get")
                    .into_inner()
                    .secret;
                assert_eq!(got, format!("secret-{n}").as_bytes());
            }
        });
    }
    while let Some(done) = reads.join_next().await {
        done.expect("reader");
    }
    d.stop().await;
    token.destroy(&v2).expect("clean up v2");
    token
        .destroy(&id_bytes(&v3.fingerprint))
        .expect("clean up v3");
}

#[tokio::test]
async fn a_file_key_deployment_moves_into_the_token_and_back() {
    let dir = tempfile::tempdir().expect("tempdir");
    let d = TestDaemon::start(dir.path()).await;
    d.seed("m", 10).await;
    d.stop().await;
    let key_file = |v: u32| dir.path().join(format!("keys/dev/v{v:04}.key.pem"));
    assert!(key_file(1).exists());

    // Into the token: v1 still opens from its file, v2 is generated in the token.
    let clock = TestClock::new();
    let d = start(in_token(dir.path()), &clock).await;
    assert_eq!(secret(&d, "m4").await, b"secret-4");
    assert_eq!(rotate(&d, None).await, 2);
    assert!(!key_file(2).exists(), "v2 has no file");
    let token = token();
    let v2 = id_bytes(&fingerprint(&d, 2).await);
    assert!(token.find(&v2).expect("find").is_some());
    retire_and_destroy(&d, &clock, 1).await;
    assert!(!key_file(1).exists(), "v1's file is erased");
    assert_eq!(private_key_files(dir.path()), Vec::<PathBuf>::new());
    assert_eq!(secret(&d, "m9").await, b"secret-9");

    // And back: an imported key is kept as a file; the token's v2 is destroyed there.
    let imported = tokenvault::keys::PrivateKey::generate()
        .expect("generate")
        .to_pkcs8_pem(None)
        .expect("pem")
        .to_string();
    assert_eq!(rotate(&d, Some(imported)).await, 3);
    assert!(key_file(3).exists());
    retire_and_destroy(&d, &clock, 2).await;
    assert!(
        token.find(&v2).expect("find").is_none(),
        "v2 destroyed in the token"
    );
    assert_eq!(secret(&d, "m0").await, b"secret-0");
    d.stop().await;
}

#[tokio::test]
async fn a_wrong_pin_a_missing_module_or_an_unknown_token_stops_the_start_and_writes_nothing() {
    type Spoil = fn(&mut TokenConfig);
    let cases: [(&str, Spoil, &str); 3] = [
        (
            "wrong PIN",
            |t| t.pin = Pin::new("00009999".into()),
            "[keys.pkcs11]: the PKCS#11 token refused the user PIN",
        ),
        (
            "missing module",
            |t| t.module = PathBuf::from("/nonexistent/libpkcs11.so"),
            "[keys.pkcs11]: PKCS#11 module /nonexistent/libpkcs11.so: no such file",
        ),
        (
            "unknown token",
            |t| t.token = TokenSelector::Label("no-such-token".into()),
            "[keys.pkcs11]: no initialized PKCS#11 token with token label \"no-such-token\"",
        ),
    ];
    for (what, spoil, expected) in cases {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut t = token_config();
        spoil(&mut t);
        let mut c = config(dir.path());
        c.key_backend = KeyBackend::Pkcs11(t);
        let e = tokenvault::server::Daemon::open(&c).expect_err(what);
        let text = e.to_string();
        assert!(text.contains(expected), "{what}: {text}");
        assert!(!text.contains("0000"), "{what}: no PIN in {text}");
        assert_eq!(
            std::fs::read_dir(dir.path()).expect("dir").count(),
            0,
            "{what}: nothing created"
        );
    }
}

#[test]
fn serve_with_a_wrong_pin_exits_6_naming_the_setting_and_a_missing_token_key_is_named() {
    use process::{assert_exit, run};
    let dir = tempfile::tempdir().expect("tempdir");
    let t = token_config();
    std::fs::write(dir.path().join("pin"), "00001111\n").expect("pin file");
    std::fs::write(
        dir.path().join("tokenvault.toml"),
        format!(
            "listen = \"127.0.0.1:0\"\ndata_dir = \"data\"\nkey_dir = \"keys\"\n[keys]\nbackend = \"pkcs11\"\n\
             [keys.pkcs11]\nmodule = \"{}\"\ntoken_label = \"{}\"\npin_file = \"pin\"\n",
            t.module.display(),
            env("TOKENVAULT_TEST_PKCS11_LABEL"),
        ),
    )
    .expect("config");
    let o = run(
        dir.path(),
        &["serve", "--config", "tokenvault.toml"],
        &[],
        None,
    );
    assert_exit(
        &o,
        6,
        "[keys.pkcs11]: the PKCS#11 token refused the user PIN",
    );
    assert!(!process::stderr(&o).contains("0000"), "no PIN");
    assert!(!dir.path().join("data").exists(), "nothing written");

    // The right PIN (from the environment, which wins over pin_file) but a registry naming a
    // version that is in neither the token nor a key file: the start names it.
    let pin = env("TOKENVAULT_TEST_PKCS11_PIN");
    let o = run(
        dir.path(),
        &["keys", "init", "--config", "tokenvault.toml"],
        &[("TOKENVAULT_PKCS11_PIN", &pin)],
        None,
    );
    assert_eq!(o.status.code(), Some(0), "{}", process::stderr(&o));
    assert!(
        private_key_files(dir.path()).is_empty(),
        "keys init made no key file"
    );
    let fingerprint = String::from_utf8_lossy(
        &run(
            dir.path(),
            &["keys", "list", "--config", "tokenvault.toml"],
            &[("TOKENVAULT_PKCS11_PIN", &pin)],
            None,
        )
        .stdout,
    )
    .split_whitespace()
    .find(|w| w.len() == 64)
    .expect("a fingerprint listed")
    .to_string();
    token()
        .destroy(&id_bytes(&fingerprint))
        .expect("remove v1 behind the daemon's back");
    let o = run(
        dir.path(),
        &["serve", "--config", "tokenvault.toml"],
        &[("TOKENVAULT_PKCS11_PIN", &pin)],
        None,
    );
    assert_exit(
        &o,
        6,
        &format!("[keys.pkcs11]: key version 1 ({fingerprint}) is neither in the token nor at "),
    );
}

/// Two daemons on one PostgreSQL database, both pointed at the same token: a version one of
/// them generates in the token opens on the other (found by its fingerprint), and no private
/// key reaches the database.
#[tokio::test]
async fn two_daemons_on_one_database_share_the_token_keys() {
    let url = pg::database().await;
    let (dir_a, dir_b) = (
        tempfile::tempdir().expect("tempdir"),
        tempfile::tempdir().expect("tempdir"),
    );
    let on = |dir: &Path, name: &str| {
        let mut c = pg::config_on(dir, &url, name);
        c.key_backend = KeyBackend::Pkcs11(token_config());
        c
    };
    let a = TestDaemon::start_with(on(dir_a.path(), "a")).await;
    let b = TestDaemon::start_with(on(dir_b.path(), "b")).await;
    a.seed("s", 5).await;
    assert_eq!(
        secret(&b, "s3").await,
        b"secret-3",
        "b opens a's v1 in the token"
    );

    assert_eq!(rotate(&b, None).await, 2);
    b.seed("t", 2).await;
    // a meets an unknown fingerprint, re-reads the registry and finds v2 in the token.
    assert_eq!(secret(&a, "t1").await, b"secret-1");
    let db = pg::client(&url).await;
    let rows: i64 = db
        .query_one(
            "SELECT count(*) FROM tokenvault_meta WHERE key LIKE 'private_key/%'",
            &[],
        )
        .await
        .expect("query")
        .get(0);
    assert_eq!(rows, 0, "no private key in the database");
    let (v1, v2) = (fingerprint(&a, 1).await, fingerprint(&a, 2).await);
    a.stop().await;
    b.stop().await;
    let token = token();
    for v in [v1, v2] {
        token.destroy(&id_bytes(&v)).expect("clean up");
    }
}

/// A daemon process serving many readers at once with a key another process (`keys init`)
/// made in the token. opencryptoki 3.8's soft token crashes when two sessions decrypt with
/// such a key at the same time, which is what `max_sessions = 1` prevents: with 4 this daemon
/// dies of a segfault.
#[test]
fn a_daemon_process_serves_concurrent_reads_with_its_key_in_the_token() {
    use process::{run, spawn_daemon};
    use tokenvault::config::{CredentialEntry, Role};
    use tokenvault::secret::ApiCredential;
    let dir = tempfile::tempdir().expect("tempdir");
    let t = token_config();
    let hash = |name: &str, role: Role, token: &str| {
        let sha = CredentialEntry::for_credential(name, role, &ApiCredential::new(token.into()))
            .sha256
            .expect("hashed");
        let hex: String = sha.iter().map(|b| format!("{b:02x}")).collect();
        format!(
            "[[credentials]]\nname = \"{name}\"\nrole = \"{}\"\nsha256 = \"{hex}\"\n",
            match role {
                Role::Ingest => "ingest",
                Role::Worker => "worker",
                Role::Admin => "admin",
            }
        )
    };
    std::fs::write(dir.path().join("pin"), env("TOKENVAULT_TEST_PKCS11_PIN")).expect("pin");
    std::fs::write(
        dir.path().join("tokenvault.toml"),
        format!(
            "listen = \"127.0.0.1:0\"\ndata_dir = \"data\"\nkey_dir = \"keys\"\n[keys]\n\
             backend = \"pkcs11\"\n[keys.pkcs11]\nmodule = \"{}\"\ntoken_label = \"{}\"\n\
             pin_file = \"pin\"\nmax_sessions = 1\n{}{}",
            t.module.display(),
            env("TOKENVAULT_TEST_PKCS11_LABEL"),
            hash("web", Role::Ingest, INGEST),
            hash("worker", Role::Worker, WORKER),
        ) + &hash("secteam", Role::Admin, ADMIN),
    )
    .expect("config");
    let o = run(
        dir.path(),
        &["keys", "init", "--config", "tokenvault.toml"],
        &[],
        None,
    );
    assert_eq!(o.status.code(), Some(0), "{}", process::stderr(&o));
    let (mut child, addr, _) =
        spawn_daemon(dir.path(), &["serve", "--config", "tokenvault.toml"], &[]);
    let addr = format!("http://{addr}");
    let fingerprint = tokio::runtime::Runtime::new()
        .expect("runtime")
        .block_on(async {
            let connect = || async {
                tonic::transport::Channel::from_shared(addr.clone())
                    .expect("uri")
                    .connect()
                    .await
                    .expect("connect")
            };
            seed_over(connect().await, "p", 20).await;
            let mut readers = tokio::task::JoinSet::new();
            for r in 0..8 {
                let mut broker = v1::broker_client::BrokerClient::new(
                    tonic::service::interceptor::InterceptedService::new(
                        connect().await,
                        Bearer::new(WORKER),
                    ),
                );
                readers.spawn(async move {
                    for i in 0..25 {
                        let n = (r * 7 + i) % 20;
                        let got = broker
                            .get_token(v1::GetTokenRequest {
                                id: format!("p{n}"),
                            })
                            .await
                            .expect("concurrent get")
                            .into_inner()
                            .secret;
                        assert_eq!(got, format!("secret-{n}").as_bytes());
                    }
                });
            }
            while let Some(done) = readers.join_next().await {
                done.expect("reader");
            }
            let keys = v1::admin_client::AdminClient::new(
                tonic::service::interceptor::InterceptedService::new(
                    connect().await,
                    Bearer::new(ADMIN),
                ),
            )
            .list_keys(v1::ListKeysRequest {})
            .await
            .expect("keys")
            .into_inner()
            .keys;
            keys[0].fingerprint.clone()
        });
    assert!(
        child.try_wait().expect("status").is_none(),
        "the daemon is still running"
    );
    child.kill().expect("kill");
    let _ = child.wait();
    token().destroy(&id_bytes(&fingerprint)).expect("clean up");
}
