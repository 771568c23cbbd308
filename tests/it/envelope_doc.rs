//! docs/ENVELOPE.md's Python recipes, run exactly as written: the opening recipe (after the
//! documented OpenSSL commands) on a known-answer vector, and the complete sealer against a
//! real daemon whose `GetToken` must return what was sealed. The interpreter is the one
//! `scripts/pyenv` makes (with `cryptography`), named by TOKENVAULT_TEST_PYTHON.

use crate::common;

use std::io::Write as _;
use std::path::Path;
use std::process::{Command, Stdio};

use common::*;
use tokenvault::api::v1;

fn doc() -> String {
    std::fs::read_to_string(fixture_path("docs/ENVELOPE.md")).expect("docs/ENVELOPE.md")
}

/// The fenced code blocks of `lang` in the document, in order.
fn blocks(text: &str, lang: &str) -> Vec<String> {
    let fence = format!("```{lang}");
    let mut out = Vec::new();
    let mut lines = text.lines();
    while let Some(line) = lines.next() {
        if line.trim_end() == fence {
            let body: Vec<&str> = lines
                .by_ref()
                .take_while(|l| l.trim_end() != "```")
                .collect();
            out.push(body.join("\n") + "\n");
        }
    }
    out
}

fn block_containing(lang: &str, needle: &str) -> String {
    let all = blocks(&doc(), lang);
    let found: Vec<&String> = all.iter().filter(|b| b.contains(needle)).collect();
    assert_eq!(
        found.len(),
        1,
        "one ```{lang} block with {needle:?} in ENVELOPE.md"
    );
    found[0].clone()
}

fn python() -> String {
    let py = std::env::var("TOKENVAULT_TEST_PYTHON").unwrap_or_else(|_| {
        panic!(
            "TOKENVAULT_TEST_PYTHON is not set: run ./scripts/test, or set it to the \
             interpreter `scripts/pyenv` prints"
        )
    });
    let ok = Command::new(&py)
        .args(["-c", "import cryptography"])
        .status()
        .expect("run the test Python");
    assert!(ok.success(), "{py} cannot import cryptography");
    py
}

/// Runs `program` (read by `python -` from stdin) with the test Python in `dir`; `input` is
/// written to `dir/input.bin` first for the program to read. Returns stdout.
fn run_python(dir: &Path, program: &str, input: &[u8]) -> Vec<u8> {
    std::fs::write(dir.join("input.bin"), input).expect("write input");
    let mut child = Command::new(python())
        .arg("-")
        .current_dir(dir)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn python");
    child
        .stdin
        .take()
        .expect("stdin")
        .write_all(program.as_bytes())
        .expect("write program");
    let out = child.wait_with_output().expect("python");
    assert!(
        out.status.success(),
        "python failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    out.stdout
}

fn vector(name: &str, field: &str) -> String {
    let text = std::fs::read_to_string(fixture_path("tests/vectors").join(name)).expect("vector");
    text.lines()
        .find_map(|l| l.strip_prefix(&format!("{field}: ")))
        .expect("field")
        .to_string()
}

#[test]
fn the_documented_opening_recipe_opens_a_vector() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let dir = tmp.path();
    std::fs::write(
        dir.join("env.bin"),
        hex::decode(vector("ok-access-token.txt", "envelope")).expect("hex"),
    )
    .expect("env.bin");
    std::fs::copy(
        fixture_path("keys/test/fixture-a.key.pem"),
        dir.join("private.pem"),
    )
    .expect("private.pem");
    std::fs::write(
        dir.join("record.json"),
        serde_json::json!({
            "id": vector("ok-access-token.txt", "id"),
            "owner": vector("ok-access-token.txt", "owner"),
            "provider": vector("ok-access-token.txt", "provider"),
            "kind": vector("ok-access-token.txt", "kind"),
        })
        .to_string(),
    )
    .expect("record.json");
    let sh = block_containing("sh", "openssl pkeyutl -decrypt");
    let out = Command::new("bash")
        .args(["-euo", "pipefail", "-c", &sh])
        .current_dir(dir)
        .output()
        .expect("bash");
    assert!(
        out.status.success(),
        "the OpenSSL recipe failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let open = block_containing("python", "AESGCM(open(\"dek.bin\"");
    let program = format!("{open}\nimport sys\nsys.stdout.buffer.write(secret)\n");
    assert_eq!(
        run_python(dir, &program, b""),
        hex::decode(vector("ok-access-token.txt", "plaintext")).expect("hex"),
        "the recipe opens the vector to its plaintext"
    );
}

#[test]
fn the_documented_v2_opening_recipe_opens_a_v2_vector() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let dir = tmp.path();
    let name = "v2-ok-access-token.txt";
    std::fs::write(
        dir.join("env.bin"),
        hex::decode(vector(name, "envelope")).expect("hex"),
    )
    .expect("env.bin");
    std::fs::copy(
        fixture_path("keys/test/fixture-xwing.key.pem"),
        dir.join("private.pem"),
    )
    .expect("private.pem");
    std::fs::write(
        dir.join("record.json"),
        serde_json::json!({
            "id": vector(name, "id"),
            "owner": vector(name, "owner"),
            "provider": vector(name, "provider"),
            "kind": vector(name, "kind"),
        })
        .to_string(),
    )
    .expect("record.json");
    let open = block_containing("python", "MLKEM768PrivateKey.from_seed_bytes");
    let program = format!("{open}\nimport sys\nsys.stdout.buffer.write(secret)\n");
    assert_eq!(
        run_python(dir, &program, b""),
        hex::decode(vector(name, "plaintext")).expect("hex"),
        "the v2 recipe opens the vector to its plaintext"
    );
}

#[tokio::test]
async fn the_documented_python_sealer_stores_records_the_daemon_serves() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let d = TestDaemon::start(tmp.path()).await;
    let spki_pem = d.active_spki_pem().await;
    let sealer = block_containing("python", "def seal(");
    // The harness only calls the documented function: the PEM string as PublicKeys returns it.
    let program = format!(
        "{sealer}\nimport json, sys\n\
         a = json.load(open('input.bin'))\n\
         env = seal(a['pem'], a['id'], a['owner'], a['provider'], a['kind'], bytes.fromhex(a['secret']))\n\
         sys.stdout.write(env.hex())\n"
    );
    // Every kind, through the documented SecretKind table; secrets with a trailing newline and
    // with arbitrary bytes are stored as given.
    let cases: [(&str, i32, &[u8]); 5] = [
        ("access_token", 1, b"gho_from_python"),
        ("refresh_token", 2, b"rt-line\n"),
        ("client_secret", 3, b"\x00\xffbinary"),
        ("api_key", 4, b"xoxb-123"),
        (
            "token_bundle",
            5,
            br#"{"access_token":"a","refresh_token":"r"}"#,
        ),
    ];
    let mut ingest = d.ingest(INGEST).await;
    // With the daemon's RSA key (envelope v1), then after it rotated to X-Wing (envelope v2).
    let mut runs = vec![(spki_pem, 1u8)];
    let rotated = d
        .admin(ADMIN)
        .await
        .rotate_key(v1::RotateKeyRequest {
            algorithm: "x-wing".into(),
            ..Default::default()
        })
        .await
        .expect("rotate to x-wing")
        .into_inner()
        .active
        .expect("active");
    runs.push((rotated.spki_pem, 2));
    let all = runs
        .iter()
        .flat_map(|(pem, format)| cases.iter().map(move |case| (pem, *format, *case)));
    for (i, (spki_pem, format, (kind, number, secret))) in all.enumerate() {
        let id = format!("py:{i}");
        let input = serde_json::json!({
            "pem": spki_pem, "id": id, "owner": "user-7", "provider": "github",
            "kind": kind, "secret": hex::encode(secret),
        });
        let out = run_python(tmp.path(), &program, input.to_string().as_bytes());
        let envelope = hex::decode(out).expect("hex envelope");
        assert_eq!(
            envelope[3], format,
            "{kind}: the envelope version of the key"
        );
        ingest
            .put_sealed(v1::PutSealedRequest {
                record: Some(v1::SealedRecord {
                    meta: Some(v1::RecordMeta {
                        id: id.clone(),
                        owner: "user-7".into(),
                        provider: "github".into(),
                        kind: number,
                        scopes: vec![],
                        expires_at: 0,
                    }),
                    envelope,
                }),
                expected_version: 0,
            })
            .await
            .unwrap_or_else(|e| panic!("{kind}: {e:?}"));
        let got = d.get(&id).await.unwrap_or_else(|e| panic!("{kind}: {e:?}"));
        assert_eq!(got.into_inner().secret, secret, "{kind}");
    }
    d.stop().await;
}

/// docs/ENVELOPE.md's export recipe: `tokenvault admin export` of a real daemon's store, the
/// documented Python that picks a record out of it, then the documented OpenSSL and Python
/// opening steps with the daemon's private key give back the stored secret.
#[tokio::test]
async fn an_exported_record_opens_with_the_documented_recipe() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let base = tmp.path().join("vault");
    let work = tmp.path().join("work");
    std::fs::create_dir_all(&work).expect("work dir");
    let d = TestDaemon::start(&base).await;
    d.put(&meta("exp-1", "owner-1"), b"exported-secret").await;
    d.put(&meta("exp-2", "owner-2"), b"other-secret").await;
    d.stop().await;
    let out = Command::new(env!("CARGO_BIN_EXE_tokenvault"))
        .args(["admin", "export", "--from"])
        .arg(format!("rocksdb:{}", base.join("data").display()))
        .arg("--out")
        .arg(work.join("vault.jsonl"))
        .output()
        .expect("tokenvault admin export");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    std::fs::copy(
        base.join("keys/dev/v0001.key.pem"),
        work.join("private.pem"),
    )
    .expect("private.pem");
    let pick = block_containing("python", "wanted = sys.argv[1]");
    run_python(
        &work,
        &format!("import sys\nsys.argv = [\"-\", \"exp-1\"]\n{pick}"),
        b"",
    );
    let sh = block_containing("sh", "openssl pkeyutl -decrypt");
    let ran = Command::new("bash")
        .args(["-euo", "pipefail", "-c", &sh])
        .current_dir(&work)
        .output()
        .expect("bash");
    assert!(
        ran.status.success(),
        "the OpenSSL recipe failed: {}",
        String::from_utf8_lossy(&ran.stderr)
    );
    let open = block_containing("python", "AESGCM(open(\"dek.bin\"");
    let program = format!("{open}\nimport sys\nsys.stdout.buffer.write(secret)\n");
    assert_eq!(run_python(&work, &program, b""), b"exported-secret");
}
