//! Daemons behind a real load balancer, restarted one by one: HAProxy (Debian's package,
//! installed if missing) runs deploy/haproxy.cfg as shipped in front of three daemons (real
//! processes, TLS, one PostgreSQL database), while a Python gRPC client configured with
//! deploy/grpc-service-config.json writes and reads through it; each daemon in turn gets
//! SIGTERM, drains, exits and starts again on the same address.

use std::io::{BufRead as _, BufReader, Write as _};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::common;
use base64::Engine as _;
use common::pg;
use common::pki::{ca, leaf};
use common::process::{free_port, root, sha256_hex, spawn_daemon, write};
use common::*;
use prost::Message as _;
use tokenvault::api::SealRecord as _;
use tokenvault::api::v1;

/// A daemon's config: TLS, the shared database, a drain long enough for the balancer's
/// health check (500 ms, one failure) to take it out first.
fn daemon_config(dir: &Path, shared: &Path, port: u16, url: &str, instance: &str) {
    let toml = format!(
        r#"listen = "127.0.0.1:{port}"
data_dir = "data"
key_dir = "keys"
passphrase_file = "{shared}/passphrase"
lock_memory = false
shutdown_grace_seconds = 2

[tls]
cert_file = "{shared}/daemon.pem"
key_file = "{shared}/daemon.key"

[store]
url = "{url}"
instance = "{instance}"

[[credentials]]
name = "web-tier"
role = "ingest"
sha256 = "{ingest}"

[[credentials]]
name = "worker"
role = "worker"
sha256 = "{worker}"
"#,
        shared = shared.display(),
        ingest = sha256_hex(INGEST),
        worker = sha256_hex(WORKER),
    );
    std::fs::create_dir_all(dir).expect("dir");
    write(dir, "tokenvault.toml", &toml, 0o640);
}

/// A child process killed (SIGKILL) when dropped, so a failing test leaves no daemon, balancer
/// or client running.
struct Killed(Child);

impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn start_daemon(dir: &Path) -> Killed {
    Killed(spawn_daemon(dir, &["serve", "--config", "tokenvault.toml"], &[]).0)
}

fn sigterm(child: &Child) {
    let status = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .expect("kill");
    assert!(status.success());
}

/// SIGTERM, and the exit status.
fn terminate(child: &mut Child) -> std::process::ExitStatus {
    sigterm(child);
    child.wait().expect("wait")
}

/// The balancer's view of each server, from its stats socket: (name, status) for backend
/// `daemons`.
fn server_states(socket: &Path) -> Vec<(String, String)> {
    let Ok(mut s) = std::os::unix::net::UnixStream::connect(socket) else {
        return Vec::new();
    };
    s.write_all(b"show stat\n").expect("stats command");
    let mut out = String::new();
    let _ = std::io::Read::read_to_string(&mut s, &mut out);
    // CSV: pxname,svname,...; status is column 18 (0-based 17).
    out.lines()
        .filter(|l| l.starts_with("daemons,"))
        .filter_map(|l| {
            let cols: Vec<&str> = l.split(',').collect();
            let (name, status) = (cols.get(1)?, cols.get(17)?);
            (*name != "BACKEND").then(|| (name.to_string(), status.to_string()))
        })
        .collect()
}

/// Waits until the balancer says server `name` is `want` ("UP", or "DOWN" and its variants).
fn until_server(socket: &Path, name: &str, up: bool, within: Duration, log: &Path) {
    let deadline = Instant::now() + within;
    loop {
        let states = server_states(socket);
        if states
            .iter()
            .any(|(n, s)| n == name && s.starts_with("UP") == up && !s.is_empty())
        {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "server {name} not {} after {within:?}: {states:?}; HAProxy's log: {}",
            if up { "UP" } else { "DOWN" },
            std::fs::read_to_string(log).unwrap_or_default()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Installs HAProxy if it is missing (the test command installs what a test needs).
fn haproxy() -> String {
    let found = Command::new("sh")
        .args(["-c", "command -v haproxy"])
        .output()
        .expect("sh");
    if found.status.success() {
        return String::from_utf8_lossy(&found.stdout).trim().to_string();
    }
    let status = Command::new(root().join("scripts/apt-ensure"))
        .arg("haproxy")
        .status()
        .expect("scripts/apt-ensure");
    assert!(status.success(), "installing haproxy");
    "haproxy".to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn daemons_restarted_one_by_one_behind_haproxy_fail_no_call() {
    let haproxy = tokio::task::spawn_blocking(haproxy).await.expect("join");
    let work = tempfile::tempdir().expect("tempdir");
    let shared = work.path().join("shared");
    std::fs::create_dir_all(&shared).expect("shared");
    let pki = ca("tokenvault load balancer test CA");
    let (cert, key) = leaf(&pki, &["localhost", "127.0.0.1"], "daemon");
    write(&shared, "ca.pem", &pki.ca_pem, 0o644);
    write(&shared, "daemon.pem", &cert, 0o644);
    write(&shared, "daemon.key", &key, 0o600);
    let (lb_cert, lb_key) = leaf(&pki, &["localhost", "127.0.0.1"], "balancer");
    write(
        &shared,
        "balancer.pem",
        &format!("{lb_cert}{lb_key}"),
        0o600,
    );
    write(&shared, "passphrase", pg::PASSPHRASE, 0o600);

    // The keyring and a record to read, made by a first daemon on the database.
    let url = pg::database().await;
    let seed_dir = work.path().join("seed");
    std::fs::create_dir_all(&seed_dir).expect("seed dir");
    let seed = TestDaemon::start_with(pg::config_on(&seed_dir, &url, "seed")).await;
    seed.put(&meta("lb-read", "o"), b"read me").await;
    let sealer = seed.sealer().await;
    seed.stop().await;

    // The writes the client makes, sealed here: the client sends their bytes.
    let mut requests = String::new();
    for i in 0..20_000 {
        let id = format!("lb-{i}");
        let record = sealer
            .seal_record(
                &meta(&id, "o"),
                &tokenvault::secret::Secret::new(format!("secret-{id}").into_bytes()),
            )
            .expect("seal");
        let put = v1::PutSealedRequest {
            record: Some(record),
            expected_version: 0,
        };
        requests.push_str(
            &serde_json::json!({
                "id": id,
                "put": base64::engine::general_purpose::STANDARD.encode(put.encode_to_vec()),
            })
            .to_string(),
        );
        requests.push('\n');
    }
    let requests_file = write(&shared, "requests.jsonl", &requests, 0o600);
    let get = base64::engine::general_purpose::STANDARD.encode(
        v1::GetTokenRequest {
            id: "lb-read".into(),
        }
        .encode_to_vec(),
    );

    // Three daemons, each on an address it keeps across its restart.
    let names = ["a", "b", "c"];
    let ports: Vec<u16> = names.iter().map(|_| free_port()).collect();
    let dirs: Vec<_> = names.iter().map(|n| work.path().join(n)).collect();
    let mut daemons = Vec::new();
    for ((dir, port), name) in dirs.iter().zip(&ports).zip(names) {
        daemon_config(dir, &shared, *port, &url, name);
        daemons.push(start_daemon(dir));
    }

    // HAProxy with deploy/haproxy.cfg as shipped, plus a stats socket to watch it.
    let lb_port = free_port();
    let socket = work.path().join("haproxy.sock");
    let lb_log = work.path().join("haproxy.log");
    let extra = write(
        work.path(),
        "stats.cfg",
        &format!(
            "global\n    stats socket {} mode 600 level user\n",
            socket.display()
        ),
        0o600,
    );
    let _lb = Killed(
        Command::new(&haproxy)
            .args(["-db", "-f"])
            .arg(root().join("deploy/haproxy.cfg"))
            .args(["-f", &extra])
            .env("TOKENVAULT_LB_BIND", format!("127.0.0.1:{lb_port}"))
            .env("TOKENVAULT_LB_CERT", shared.join("balancer.pem"))
            .env("TOKENVAULT_LB_CA", shared.join("ca.pem"))
            .env("TOKENVAULT_DAEMON_A", format!("127.0.0.1:{}", ports[0]))
            .env("TOKENVAULT_DAEMON_B", format!("127.0.0.1:{}", ports[1]))
            .env("TOKENVAULT_DAEMON_C", format!("127.0.0.1:{}", ports[2]))
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&lb_log).expect("log"))
            .spawn()
            .expect("haproxy starts"),
    );
    for name in names {
        until_server(&socket, name, true, Duration::from_secs(30), &lb_log);
    }

    // The client, with the retry policy as shipped.
    let python = std::env::var("TOKENVAULT_TEST_PYTHON").expect(
        "TOKENVAULT_TEST_PYTHON (set by ./scripts/test: the Python environment with grpcio)",
    );
    let mut client = Killed(
        Command::new(python)
            .arg(root().join("tests/lb/grpc_load.py"))
            .arg(format!("127.0.0.1:{lb_port}"))
            .arg(shared.join("ca.pem"))
            .arg(root().join("deploy/grpc-service-config.json"))
            .arg(&requests_file)
            .arg(&get)
            .env("TOKENVAULT_INGEST_TOKEN", INGEST)
            .env("TOKENVAULT_WORKER_TOKEN", WORKER)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .expect("the Python client starts"),
    );
    let mut out = BufReader::new(client.0.stdout.take().expect("stdout"));
    let mut line = String::new();
    out.read_line(&mut line).expect("client output");
    assert_eq!(
        line.trim(),
        "ready",
        "the client writes through the balancer"
    );

    // Each daemon in turn: SIGTERM (health NOT_SERVING at once, listeners closed after the
    // grace period, in-flight calls drained), exit, start again, back in the balancer.
    let started = Instant::now();
    for (i, name) in names.iter().enumerate() {
        tokio::task::block_in_place(|| {
            sigterm(&daemons[i].0);
            // Out of the balancer while it still serves (its grace period)...
            until_server(&socket, name, false, Duration::from_secs(30), &lb_log);
            // ...then drained and gone, started again, and back in.
            let status = daemons[i].0.wait().expect("wait");
            assert!(status.success(), "daemon {name} exits cleanly: {status}");
            daemons[i] = start_daemon(&dirs[i]);
            until_server(&socket, name, true, Duration::from_secs(30), &lb_log);
        });
    }
    let restarts = started.elapsed();

    drop(client.0.stdin.take());
    let mut summary = String::new();
    out.read_line(&mut summary).expect("summary");
    assert!(client.0.wait().expect("client").success());
    let summary: serde_json::Value = serde_json::from_str(&summary).expect("JSON summary");
    let acked: Vec<String> = summary["acked"]
        .as_array()
        .expect("acked")
        .iter()
        .map(|v| v.as_str().expect("id").to_string())
        .collect();
    eprintln!(
        "rolling restart of 3 daemons in {:.1} s: {} writes and {} reads acknowledged, failed: {}",
        restarts.as_secs_f64(),
        acked.len(),
        summary["gets"],
        summary["failed"]
    );
    assert_eq!(summary["failed"], serde_json::json!([]), "no call failed");
    assert!(acked.len() > 100, "writes went on: {}", acked.len());
    assert!(summary["gets"].as_u64().unwrap_or(0) > 100, "reads went on");

    // Every acknowledged write is stored, read back by an in-process daemon on the database.
    let check_dir = work.path().join("check");
    std::fs::create_dir_all(&check_dir).expect("check dir");
    let check = TestDaemon::start_with(pg::config_on(&check_dir, &url, "check")).await;
    for id in &acked {
        assert_eq!(
            check
                .get(id.as_str())
                .await
                .unwrap_or_else(|e| panic!("{id} acknowledged, so stored: {e:?}"))
                .into_inner()
                .secret,
            format!("secret-{id}").as_bytes()
        );
    }
    check.stop().await;
    for d in &mut daemons {
        tokio::task::block_in_place(|| terminate(&mut d.0));
    }
}
