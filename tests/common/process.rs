//! Running the `tokenvault` binary as a subprocess: the daemon and the client verbs.
#![allow(
    dead_code,
    reason = "each test binary uses a different part of the harness"
)]

use std::io::{BufRead as _, BufReader, Write as _};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};

use tokenvault::api::SealRecord as _;

pub const BIN: &str = env!("CARGO_BIN_EXE_tokenvault");
/// The load generator, a binary of its own.
pub const BENCH: &str = env!("CARGO_BIN_EXE_tokenvault-bench");

pub fn root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

pub fn cmd(cwd: &Path) -> Command {
    cmd_of(BIN, cwd)
}

/// `bin` (one of the package's binaries) in `cwd`, without the test's TOKENVAULT_ variables.
pub fn cmd_of(bin: &str, cwd: &Path) -> Command {
    let mut c = Command::new(bin);
    c.current_dir(cwd);
    for (k, _) in std::env::vars() {
        if k.starts_with("TOKENVAULT_") {
            c.env_remove(k);
        }
    }
    c
}

pub fn run(cwd: &Path, args: &[&str], env: &[(&str, &str)], stdin: Option<&[u8]>) -> Output {
    run_bin(BIN, cwd, args, env, stdin)
}

/// `tokenvault-bench ARGS`, as [`run`] runs `tokenvault`.
pub fn bench(cwd: &Path, args: &[&str], env: &[(&str, &str)]) -> Output {
    run_bin(BENCH, cwd, args, env, None)
}

fn run_bin(
    bin: &str,
    cwd: &Path,
    args: &[&str],
    env: &[(&str, &str)],
    stdin: Option<&[u8]>,
) -> Output {
    let mut c = cmd_of(bin, cwd);
    c.args(args)
        .envs(env.iter().copied())
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = c.spawn().expect("spawn tokenvault");
    if let Some(input) = stdin {
        child
            .stdin
            .take()
            .expect("stdin")
            .write_all(input)
            .expect("write stdin");
    }
    drop(child.stdin.take());
    child.wait_with_output().expect("wait")
}

pub fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

pub fn assert_exit(o: &Output, code: i32, needle: &str) {
    assert_eq!(
        o.status.code(),
        Some(code),
        "stdout {:?} stderr {:?}",
        String::from_utf8_lossy(&o.stdout),
        stderr(o)
    );
    assert!(
        stderr(o).contains(needle),
        "stderr {:?} lacks {needle:?}",
        stderr(o)
    );
}

pub struct Served {
    pub child: Child,
    pub addr: String,
    pub log: PathBuf,
    pub stdout_seen: String,
    pub creds: Vec<(String, String)>,
}

pub fn serve_dev(cwd: &Path) -> Served {
    serve_dev_on(cwd, "127.0.0.1:0")
}

/// `serve --dev` on `listen`; returns once it prints its address.
pub fn serve_dev_on(cwd: &Path, listen: &str) -> Served {
    serve_dev_with(cwd, listen, &[])
}

/// Starts `tokenvault ARGS` in `cwd` with its log in `cwd/daemon.log`; returns once it prints
/// "listening on ADDR", with the child, ADDR and everything it printed until then.
pub fn spawn_daemon(cwd: &Path, args: &[&str], env: &[(&str, &str)]) -> (Child, String, String) {
    let mut command = cmd(cwd);
    command.args(args).envs(env.iter().copied());
    spawn_command(cwd, command)
}

/// Like [`spawn_daemon`] for a prepared command (e.g. `tokenvault` under `prlimit`).
pub fn spawn_command(cwd: &Path, mut command: Command) -> (Child, String, String) {
    let log = cwd.join("daemon.log");
    let mut child = command
        .stdout(Stdio::piped())
        .stderr(std::fs::File::create(&log).expect("log file"))
        .spawn()
        .expect("spawn daemon");
    let mut reader = BufReader::new(child.stdout.take().expect("stdout"));
    let mut seen = String::new();
    let addr = loop {
        let mut line = String::new();
        let n = reader.read_line(&mut line).expect("read stdout");
        assert!(
            n > 0,
            "daemon exited before listening; log: {}",
            std::fs::read_to_string(&log).unwrap_or_default()
        );
        seen.push_str(&line);
        if let Some(a) = line.trim().strip_prefix("listening on ") {
            break a.to_string();
        }
    };
    // Keep draining stdout so the daemon never blocks on a full pipe.
    std::thread::spawn(move || for _ in reader.lines() {});
    (child, addr, seen)
}

/// `serve --dev` on `listen` with extra environment variables.
pub fn serve_dev_with(cwd: &Path, listen: &str, env: &[(&str, &str)]) -> Served {
    let (child, addr, seen) = spawn_daemon(cwd, &["serve", "--dev", "--listen", listen], env);
    assert!(addr.starts_with("127.0.0.1:"), "{addr}");
    let env =
        std::fs::read_to_string(cwd.join("data/dev-credentials.env")).expect("dev credentials");
    let creds = env
        .lines()
        .filter_map(|l| l.strip_prefix("export "))
        .filter_map(|l| l.split_once('='))
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    Served {
        child,
        addr: format!("http://{addr}"),
        log: cwd.join("daemon.log"),
        stdout_seen: seen,
        creds,
    }
}

impl Served {
    pub fn env(&self) -> Vec<(&str, &str)> {
        let mut e: Vec<(&str, &str)> = self
            .creds
            .iter()
            .map(|(k, v)| (k.as_str(), v.as_str()))
            .collect();
        e.push(("TOKENVAULT_ADDR", self.addr.as_str()));
        e
    }

    pub fn cred(&self, name: &str) -> String {
        self.creds
            .iter()
            .find(|(k, _)| k == name)
            .expect("credential")
            .1
            .clone()
    }

    pub fn terminate(mut self) -> (std::process::ExitStatus, String) {
        let pid = self.child.id().to_string();
        let killed = Command::new("kill")
            .args(["-TERM", &pid])
            .status()
            .expect("kill");
        assert!(killed.success());
        let status = self.child.wait().expect("wait");
        (status, std::fs::read_to_string(&self.log).expect("log"))
    }
}

pub fn seal_args<'a>(id: &'a str, owner: &'a str) -> Vec<&'a str> {
    vec![
        "seal",
        "--id",
        id,
        "--owner",
        owner,
        "--provider",
        "github",
        "--kind",
        "access_token",
        "--scope",
        "repo",
    ]
}

pub fn files_under(dir: &Path, out: &mut Vec<PathBuf>) {
    for e in std::fs::read_dir(dir).expect("read_dir") {
        let p = e.expect("entry").path();
        if p.is_dir() {
            files_under(&p, out)
        } else {
            out.push(p)
        }
    }
}

/// `GET /metrics` from the metrics address a dev daemon printed: (content type, body).
#[allow(dead_code)]
pub fn scrape_metrics(stdout: &str) -> (String, String) {
    use std::io::{Read as _, Write as _};
    let addr = stdout
        .lines()
        .find_map(|l| l.strip_prefix("metrics: http://"))
        .and_then(|u| u.strip_suffix("/metrics"))
        .expect("the dev daemon prints its metrics address");
    let mut stream = std::net::TcpStream::connect(addr).expect("connect");
    stream
        .write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        .expect("request");
    let mut response = String::new();
    stream.read_to_string(&mut response).expect("response");
    assert!(response.starts_with("HTTP/1.1 200"), "{response}");
    let (head, body) = response.split_once("\r\n\r\n").expect("HTTP response");
    let content_type = head
        .lines()
        .find_map(|l| l.strip_prefix("content-type: "))
        .expect("content type")
        .to_string();
    (content_type, body.to_string())
}

/// A loopback port that was free a moment ago, for a process that must keep its address
/// across a restart (the OS picks another on each bind to port 0).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .expect("bind")
        .local_addr()
        .expect("addr")
        .port()
}

/// Writes `dir/name` with permissions `mode`; returns its path.
pub fn write(dir: &Path, name: &str, text: &str, mode: u32) -> String {
    use std::os::unix::fs::PermissionsExt as _;
    let path = dir.join(name);
    std::fs::write(&path, text).expect("write");
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(mode)).expect("chmod");
    path.display().to_string()
}

/// SHA-256 of `text`, hex: how a config file names an API credential.
pub fn sha256_hex(text: &str) -> String {
    hex::encode(<sha2::Sha256 as sha2::Digest>::digest(text.as_bytes()))
}

/// Runs a client's own test suite (`program args` in `dir`, with `env` and no Python bytecode
/// left behind): it must pass, and none of its tests may be skipped (pytest's `-rs` and
/// `node --test`'s `# skipped 0` say so).
#[allow(dead_code)]
pub fn run_suite(program: &str, args: &[&str], dir: &Path, env: &[(&str, &std::ffi::OsStr)]) {
    let out = Command::new(program)
        .args(args)
        .current_dir(dir)
        .envs(env.iter().copied())
        .env("PYTHONDONTWRITEBYTECODE", "1")
        .output()
        .unwrap_or_else(|e| {
            panic!("cannot run {program}: {e} (./scripts/test installs Python and Node.js)")
        });
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{program} {args:?} failed:\n{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        !stdout.contains("skipped") || stdout.contains("# skipped 0"),
        "a test was skipped:\n{stdout}"
    );
}

/// Seals and stores `n` records `rec-00000`.. (secret `tok-N`) through Ingest with the
/// active public key, as a web tier would.
/// A channel to the daemon `d` that presents the credential in its variable `cred`.
pub async fn authed(
    d: &Served,
    cred: &str,
) -> tonic::service::interceptor::InterceptedService<
    tonic::transport::Channel,
    tokenvault::client::Bearer,
> {
    let channel = tonic::transport::Channel::from_shared(d.addr.clone())
        .expect("uri")
        .connect()
        .await
        .expect("connect");
    tonic::service::interceptor::InterceptedService::new(channel, super::Bearer::new(&d.cred(cred)))
}

pub fn seed_records(d: &Served, n: usize) {
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    rt.block_on(async {
        let mut ingest = tokenvault::api::v1::ingest_client::IngestClient::new(
            authed(d, "TOKENVAULT_INGEST_TOKEN").await,
        );
        let pem = ingest
            .public_keys(tokenvault::api::v1::PublicKeysRequest {})
            .await
            .expect("keys")
            .into_inner()
            .active
            .expect("active")
            .spki_pem;
        let sealer = tokenvault::Sealer::from_pem(&pem).expect("pem");
        let ids: Vec<usize> = (0..n).collect();
        for chunk in ids.chunks(1000) {
            let items = chunk
                .iter()
                .map(|i| {
                    let meta = tokenvault::record::RecordMeta::parse(
                        &format!("rec-{i:05}"),
                        "o",
                        "github",
                        tokenvault::record::SecretKind::AccessToken,
                        &[],
                        0,
                    )
                    .expect("valid");
                    tokenvault::api::v1::PutSealedRequest {
                        record: Some(
                            sealer
                                .seal_record(
                                    &meta,
                                    &tokenvault::secret::Secret::new(
                                        format!("tok-{i}").into_bytes(),
                                    ),
                                )
                                .expect("seal"),
                        ),
                        expected_version: 0,
                    }
                })
                .collect();
            ingest
                .put_sealed_batch(tokenvault::api::v1::PutSealedBatchRequest { items })
                .await
                .expect("batch");
        }
    });
}
