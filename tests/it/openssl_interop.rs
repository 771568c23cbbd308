//! docs/ENVELOPE.md promises that the OpenSSL CLI plus any AES-GCM library opens an envelope,
//! and that any RSA-OAEP implementation can seal one. This runs exactly the documented
//! `openssl pkeyutl` commands in both directions.

use std::path::Path;
use std::process::Command;

use aes_gcm::aead::{Aead, KeyInit, Payload};
use aes_gcm::{Aes256Gcm, Nonce};
use tokenvault::envelope::{self, EnvelopeRef};
use tokenvault::keys::{PrivateKey, PublicKey};
use tokenvault::record::{RecordMeta, SecretKind};

const LABEL_HEX: &str = "746f6b656e7661756c742f76312f64656b";

fn root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

fn oaep_args() -> Vec<String> {
    [
        "-pkeyopt",
        "rsa_padding_mode:oaep",
        "-pkeyopt",
        "rsa_oaep_md:sha256",
        "-pkeyopt",
        "rsa_mgf1_md:sha256",
        "-pkeyopt",
    ]
    .iter()
    .map(|s| s.to_string())
    .chain([format!("rsa_oaep_label:{LABEL_HEX}")])
    .collect()
}

fn vector(name: &str, field: &str) -> String {
    let text = std::fs::read_to_string(root().join("tests/vectors").join(name)).expect("vector");
    text.lines()
        .find_map(|l| l.strip_prefix(&format!("{field}: ")))
        .expect("field")
        .to_string()
}

#[test]
fn openssl_cli_opens_a_vector_envelope() {
    assert_eq!(hex::encode(b"tokenvault/v1/dek"), LABEL_HEX);
    let tmp = tempfile::tempdir().expect("tempdir");
    let env = hex::decode(vector("ok-access-token.txt", "envelope")).expect("hex");
    let parsed = EnvelopeRef::decode(&env).expect("decodes");
    std::fs::write(tmp.path().join("wrapped.bin"), parsed.wrapped_dek).expect("write");
    let out = Command::new("openssl")
        .args(["pkeyutl", "-decrypt", "-inkey"])
        .arg(root().join("keys/test/fixture-a.key.pem"))
        .args(oaep_args())
        .arg("-in")
        .arg(tmp.path().join("wrapped.bin"))
        .output()
        .expect("openssl runs (Debian's openssl package)");
    assert!(
        out.status.success(),
        "openssl: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        hex::encode(&out.stdout),
        vector("ok-access-token.txt", "dek")
    );

    // AES-256-GCM with the documented associated data, built by hand from the spec.
    let mut aad = b"TVE\x01".to_vec();
    for f in ["github:user-42", "user-42", "github", "access_token"] {
        aad.extend_from_slice(&(f.len() as u32).to_be_bytes());
        aad.extend_from_slice(f.as_bytes());
    }
    let cipher = Aes256Gcm::new_from_slice(&out.stdout).expect("32-byte key");
    let plain = cipher
        .decrypt(
            Nonce::from_slice(parsed.nonce),
            Payload {
                msg: parsed.ciphertext,
                aad: &aad,
            },
        )
        .expect("GCM opens");
    assert_eq!(plain, b"gho_16C7e42F292c6912E7710c838347Ae178B4a");
}

#[test]
fn an_envelope_built_with_openssl_opens_in_the_vault() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let dek = [0x5Au8; 32];
    std::fs::write(tmp.path().join("dek.bin"), dek).expect("write");
    let out = Command::new("openssl")
        .args(["pkeyutl", "-encrypt", "-pubin", "-inkey"])
        .arg(root().join("keys/test/fixture-a.pub.pem"))
        .args(oaep_args())
        .arg("-in")
        .arg(tmp.path().join("dek.bin"))
        .output()
        .expect("openssl runs");
    assert!(
        out.status.success(),
        "openssl: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let wrapped = out.stdout;
    assert_eq!(wrapped.len(), 256);

    let meta =
        RecordMeta::parse("ext-1", "owner-x", "slack", SecretKind::ApiKey, &[], 0).expect("valid");
    let nonce = [7u8; 12];
    let cipher = Aes256Gcm::new_from_slice(&dek).expect("key");
    let ct = cipher
        .encrypt(
            Nonce::from_slice(&nonce),
            Payload {
                msg: b"xoxb-from-openssl",
                aad: &envelope::associated_data(&meta),
            },
        )
        .expect("seal");
    let public = PublicKey::from_pem(
        &std::fs::read_to_string(root().join("keys/test/fixture-a.pub.pem")).expect("pem"),
    )
    .expect("key");
    let mut env = b"TVE\x01".to_vec();
    env.extend_from_slice(&public.id().0);
    env.extend_from_slice(&256u16.to_be_bytes());
    env.extend_from_slice(&wrapped);
    env.extend_from_slice(&nonce);
    env.extend_from_slice(&ct);

    let key = PrivateKey::from_pem(
        &std::fs::read_to_string(root().join("keys/test/fixture-a.key.pem")).expect("pem"),
        None,
    )
    .expect("key");
    let secret = envelope::open(&meta, &env, &key).expect("opens");
    assert_eq!(secret.expose_secret(), b"xoxb-from-openssl");
    // The fingerprint is SHA-256 of the SPKI DER, as `openssl pkey -pubin -outform DER | sha256sum` gives.
    let der = Command::new("openssl")
        .args(["pkey", "-pubin", "-outform", "DER", "-in"])
        .arg(root().join("keys/test/fixture-a.pub.pem"))
        .output()
        .expect("openssl");
    use sha2::Digest;
    assert_eq!(sha2::Sha256::digest(&der.stdout).as_slice(), &public.id().0);
}
