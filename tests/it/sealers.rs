//! The Python and Node.js sealers in clients/: their own test suites (pytest, `node --test`)
//! run against a real daemon over HTTP/JSON on TLS with a private CA, once with its RSA key
//! (envelope v1) and once after it rotated to X-Wing (envelope v2); then every record they
//! stored is read back with `tokenvault get` and compared with the vector's plaintext.

use crate::common;

use std::path::Path;

use common::process::{root, run};
use common::*;

/// The `ok-*` vectors: (file stem, plaintext).
fn ok_vectors() -> Vec<(String, Vec<u8>)> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(root().join("tests/vectors")).expect("vectors") {
        let path = entry.expect("entry").path();
        let stem = path
            .file_stem()
            .and_then(|s| s.to_str())
            .unwrap_or_default()
            .to_string();
        if !stem.starts_with("ok-") {
            continue;
        }
        let text = std::fs::read_to_string(&path).expect("vector");
        let plaintext = text
            .lines()
            .find_map(|l| l.strip_prefix("plaintext: "))
            .map(|h| hex::decode(h).expect("hex"))
            .expect("plaintext");
        out.push((stem, plaintext));
    }
    assert!(out.len() >= 3, "the ok vectors are there");
    out
}

/// A daemon serving TLS with a certificate for `localhost` from a private CA, and the CA's
/// PEM file (in `dir`).
async fn tls_daemon(dir: &Path) -> (TestDaemon, std::path::PathBuf) {
    use std::os::unix::fs::PermissionsExt as _;
    let pki = pki::ca("sealer test CA");
    let (cert, key) = pki::leaf(&pki, &["localhost"], "localhost");
    let (cert_file, key_file, ca_file) = (
        dir.join("server.pem"),
        dir.join("server.key"),
        dir.join("ca.pem"),
    );
    std::fs::write(&cert_file, cert).expect("cert");
    std::fs::write(&key_file, key).expect("key");
    std::fs::set_permissions(&key_file, std::fs::Permissions::from_mode(0o600)).expect("mode");
    std::fs::write(&ca_file, &pki.ca_pem).expect("ca");
    let mut c = config(dir);
    c.tls = Some(tokenvault::config::TlsConfig {
        cert_file,
        key_file,
        client_ca_file: None,
        require_client_cert: false,
    });
    (TestDaemon::start_with(c).await, ca_file)
}

/// Which of the two runs: the records' id prefix and the algorithm of the daemon's key.
#[derive(Clone, Copy)]
struct Run {
    prefix: &'static str,
    algorithm: &'static str,
}

/// Runs a sealer's test suite against the TLS daemon at `addr` (its CA in `ca`); every test
/// must pass, none may be skipped.
fn run_suite(
    addr: std::net::SocketAddr,
    ca: &Path,
    run: Run,
    program: &str,
    args: &[&str],
    dir: &Path,
) {
    let url = format!("https://localhost:{}", addr.port());
    process::run_suite(
        program,
        args,
        dir,
        &[
            ("TOKENVAULT_TEST_URL", url.as_ref()),
            ("TOKENVAULT_TEST_CA", ca.as_os_str()),
            ("TOKENVAULT_INGEST_TOKEN", INGEST.as_ref()),
            ("TOKENVAULT_TEST_PREFIX", run.prefix.as_ref()),
            ("TOKENVAULT_TEST_ALGORITHM", run.algorithm.as_ref()),
        ],
    );
}

/// Rotates the TLS daemon (its CA in `ca`) to a fresh X-Wing version (envelope v2 from now on).
async fn rotate_to_x_wing(d: &TestDaemon, ca: &Path) {
    let ca = std::fs::read_to_string(ca).expect("ca");
    let channel = tls_channel(d.addr, &ca, None).await.expect("tls");
    let active = tokenvault::api::v1::admin_client::AdminClient::new(
        tonic::service::interceptor::InterceptedService::new(channel, Bearer::new(ADMIN)),
    )
    .rotate_key(tokenvault::api::v1::RotateKeyRequest {
        algorithm: "x-wing".into(),
        ..Default::default()
    })
    .await
    .expect("rotate to x-wing")
    .into_inner()
    .active
    .expect("active");
    assert_eq!(active.algorithm, "x-wing");
}

/// Reads every record a sealer stored (prefix `py-` or `node-`) with `tokenvault get`, over
/// the daemon's TLS with its CA.
fn read_back(d: &TestDaemon, ca: &Path, prefix: &str) {
    let dir = tempfile::tempdir().expect("tempdir");
    let addr = format!("https://localhost:{}", d.addr.port());
    let ca = ca.display().to_string();
    let get = |id: &str| {
        let out = run(
            dir.path(),
            &["get", id, "--addr", &addr],
            &[
                ("TOKENVAULT_WORKER_TOKEN", WORKER),
                ("TOKENVAULT_CA_FILE", &ca),
            ],
            None,
        );
        assert!(out.status.success(), "get {id}: {}", process::stderr(&out));
        out.stdout
    };
    for (stem, plaintext) in ok_vectors() {
        assert_eq!(get(&format!("{prefix}{stem}")), plaintext, "{prefix}{stem}");
    }
    for i in 0..3 {
        assert_eq!(
            get(&format!("{prefix}batch-{i}")),
            format!("batch-{i}").into_bytes()
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_python_sealer_stores_what_tokenvault_get_reads_back() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (d, ca) = tls_daemon(dir.path()).await;
    let python = std::env::var("TOKENVAULT_TEST_PYTHON").unwrap_or_else(|_| {
        panic!("TOKENVAULT_TEST_PYTHON is not set: run ./scripts/test (scripts/pyenv makes it)")
    });
    let clients = root().join("clients/python");
    let addr = d.addr;
    let pytest = move |ca: std::path::PathBuf, run: Run| {
        let (python, clients) = (python.clone(), clients.clone());
        tokio::task::spawn_blocking(move || {
            // The package's own type check: typed (py.typed) and clean under mypy --strict.
            run_suite(
                addr,
                &ca,
                run,
                &python,
                &["-m", "mypy", "--strict", "tokenvault_sealer"],
                &clients,
            );
            let args = [
                "-m",
                "pytest",
                "-q",
                "-rs",
                "-p",
                "no:cacheprovider",
                "tests",
            ];
            run_suite(addr, &ca, run, &python, &args, &clients);
        })
    };
    let rsa = Run {
        prefix: "py-",
        algorithm: "rsa-2048",
    };
    pytest(ca.clone(), rsa).await.expect("pytest");
    read_back(&d, &ca, rsa.prefix);
    rotate_to_x_wing(&d, &ca).await;
    let pq = Run {
        prefix: "py-v2-",
        algorithm: "x-wing",
    };
    pytest(ca.clone(), pq).await.expect("pytest (x-wing)");
    read_back(&d, &ca, pq.prefix);
    d.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_node_sealer_stores_what_tokenvault_get_reads_back() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (d, ca) = tls_daemon(dir.path()).await;
    let clients = root().join("clients/node");
    let addr = d.addr;
    let rsa = Run {
        prefix: "node-",
        algorithm: "rsa-2048",
    };
    let node = move |ca: std::path::PathBuf, run: Run, install: bool| {
        let clients = clients.clone();
        tokio::task::spawn_blocking(move || {
            if install {
                // The declarations checked by TypeScript (pinned in package-lock.json).
                let ci = ["ci", "--no-audit", "--no-fund", "--loglevel=error"];
                run_suite(addr, &ca, run, "npm", &ci, &clients);
                let tsc = ["node_modules/typescript/bin/tsc", "--noEmit", "-p", "."];
                run_suite(addr, &ca, run, "node", &tsc, &clients);
            }
            let test = ["--test", "test/sealer.test.js"];
            run_suite(addr, &ca, run, "node", &test, &clients);
        })
    };
    node(ca.clone(), rsa, true).await.expect("node --test");
    read_back(&d, &ca, rsa.prefix);
    rotate_to_x_wing(&d, &ca).await;
    let pq = Run {
        prefix: "node-v2-",
        algorithm: "x-wing",
    };
    node(ca.clone(), pq, false)
        .await
        .expect("node --test (x-wing)");
    read_back(&d, &ca, pq.prefix);
    d.stop().await;
}
