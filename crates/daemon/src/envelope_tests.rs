//! Envelope unit tests and the reproducible generator of tests/vectors/.
//!
//! `tests/it/envelope_vectors.rs` opens the checked-in vectors through the public API. Here, where
//! the injectable RNG is reachable, each positive vector is sealed again from its seed and must
//! come out byte for byte identical: a known-answer test of sealing itself.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use rand::SeedableRng;
use rand_chacha::ChaCha20Rng;

use crate::envelope::*;
use crate::keys::{KeyId, PrivateKey, PublicKey, Unwrapper, Wrapper};
use crate::record::{RecordMeta, SecretKind};
use crate::secret::{DataKey, Secret};
use tokenvault_envelope::envelope::seal_with_rng_for_tests as seal_with_rng;

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../..")
        .join(name)
}

fn private_key(name: &str) -> PrivateKey {
    let pem = std::fs::read_to_string(fixture(&format!("keys/test/{name}.key.pem")))
        .expect("fixture key present");
    PrivateKey::from_pem(&pem, None).expect("fixture key parses")
}

fn meta(id: &str, owner: &str, provider: &str, kind: SecretKind) -> RecordMeta {
    RecordMeta::parse(id, owner, provider, kind, &[], 0).expect("valid meta")
}

/// One positive vector: everything needed to seal it again.
struct Positive {
    name: &'static str,
    key: &'static str,
    seed: u64,
    meta: RecordMeta,
    plaintext: &'static [u8],
}

fn positives() -> Vec<Positive> {
    vec![
        Positive {
            name: "ok-access-token",
            key: "fixture-a",
            seed: 1,
            meta: meta("github:user-42", "user-42", "github", SecretKind::AccessToken),
            plaintext: b"gho_16C7e42F292c6912E7710c838347Ae178B4a",
        },
        Positive {
            name: "ok-token-bundle-unicode-owner",
            key: "fixture-a",
            seed: 2,
            meta: meta("google/acct=7", "j\u{fc}rgen@example.org", "google", SecretKind::TokenBundle),
            plaintext: br#"{"access_token":"ya29.a0AfH6SM","refresh_token":"1//0g-rt","expires_at":1767225600}"#,
        },
        Positive {
            name: "ok-sealed-under-second-key",
            key: "fixture-b",
            seed: 3,
            meta: meta("slack-T01", "team-9", "slack", SecretKind::RefreshToken),
            plaintext: b"xoxe-1-refresh",
        },
        // Envelope v2: the data key sealed with HPKE to an X-Wing key.
        Positive {
            name: "v2-ok-access-token",
            key: "fixture-xwing",
            seed: 21,
            meta: meta("github:user-42", "user-42", "github", SecretKind::AccessToken),
            plaintext: b"gho_16C7e42F292c6912E7710c838347Ae178B4a",
        },
        Positive {
            name: "v2-ok-token-bundle-unicode-owner",
            key: "fixture-xwing-b",
            seed: 22,
            meta: meta("google/acct=7", "j\u{fc}rgen@example.org", "google", SecretKind::TokenBundle),
            plaintext: br#"{"access_token":"ya29.a0AfH6SM","refresh_token":"1//0g-rt","expires_at":1767225600}"#,
        },
    ]
}

/// Every fixture key a vector may name.
const ALL_KEYS: &str = "fixture-a fixture-b fixture-xwing fixture-xwing-b";

fn seal_positive(p: &Positive) -> (Vec<u8>, Vec<u8>, Vec<u8>) {
    let key = private_key(p.key);
    let mut rng = ChaCha20Rng::seed_from_u64(p.seed);
    let envelope = seal_with_rng(
        &p.meta,
        &Secret::new(p.plaintext.to_vec()),
        &key.public_key().rust_crypto(),
        &mut rng,
    )
    .expect("seal");
    // The same seed yields the same DEK and nonce, drawn first.
    let mut rng = ChaCha20Rng::seed_from_u64(p.seed);
    let dek = DataKey::generate(&mut rng);
    let mut nonce = [0u8; 12];
    rand::RngCore::fill_bytes(&mut rng, &mut nonce);
    (envelope, dek.expose_secret().to_vec(), nonce.to_vec())
}

/// The 64 bytes of X-Wing encapsulation randomness (the draft's `eseed`) a v2 positive vector
/// was sealed with: drawn right after the DEK and the nonce. With it, a sealer that can
/// encapsulate deterministically (the Node.js one's tests) reproduces the envelope byte for
/// byte.
fn eseed(p: &Positive) -> Vec<u8> {
    let mut rng = ChaCha20Rng::seed_from_u64(p.seed);
    let mut skip = [0u8; 32 + 12];
    rand::RngCore::fill_bytes(&mut rng, &mut skip);
    let mut out = vec![0u8; 64];
    rand::RngCore::fill_bytes(&mut rng, &mut out);
    out
}

fn read_vector(name: &str) -> BTreeMap<String, String> {
    let text = std::fs::read_to_string(fixture(&format!("tests/vectors/{name}.txt")))
        .expect("vector file present");
    text.lines()
        .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
        .filter_map(|l| l.split_once(": "))
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

#[test]
fn sealing_reproduces_the_checked_in_positive_vectors() {
    for p in positives() {
        let v = read_vector(p.name);
        let (envelope, dek, nonce) = seal_positive(&p);
        assert_eq!(v["envelope"], hex::encode(&envelope), "{}", p.name);
        assert_eq!(v["dek"], hex::encode(dek), "{}", p.name);
        assert_eq!(v["nonce"], hex::encode(nonce), "{}", p.name);
        if p.name.starts_with("v2-") {
            assert_eq!(v["eseed"], hex::encode(eseed(&p)), "{}", p.name);
        }
    }
}

#[test]
#[expect(
    clippy::disallowed_types,
    reason = "decrypting once with the rsa crate proves interop"
)]
fn aws_lc_and_rust_crypto_backends_interoperate() {
    let key = private_key("fixture-a");
    let m = meta("r1", "o1", "github", SecretKind::AccessToken);
    let secret = Secret::new(b"token-value".to_vec());
    // Sealed by the default backend (aws-lc) and by the pure-Rust backend: both open with the
    // aws-lc private key.
    let by_default = seal(&m, &secret, key.public_key()).expect("seal");
    let by_rust = seal(&m, &secret, &key.public_key().rust_crypto()).expect("seal");
    for env in [&by_default, &by_rust] {
        assert_eq!(
            open(&m, env, &key).expect("opens").expose_secret(),
            b"token-value"
        );
    }
    // And the aws-lc-wrapped DEK opens with the rsa crate's OAEP decryption (test-only use of an
    // rsa private-key operation, to prove the two are the same scheme).
    use rsa::pkcs8::DecodePrivateKey;
    let pem = std::fs::read_to_string(fixture("keys/test/fixture-a.key.pem")).expect("key");
    let rsa_key = rsa::RsaPrivateKey::from_pkcs8_pem(&pem).expect("parses");
    let env = EnvelopeRef::decode(&by_default).expect("decodes");
    let padding = rsa::Oaep::new_with_label::<sha2::Sha256, _>("tokenvault/v1/dek");
    let dek = rsa_key
        .decrypt(padding, env.wrapped_dek)
        .expect("rsa crate unwraps");
    let dek = DataKey::from_slice(&dek).expect("32 bytes");
    assert_eq!(
        open_with_dek(&m, &env, &dek)
            .expect("opens")
            .expose_secret(),
        b"token-value"
    );
}

#[test]
fn rewrap_changes_only_the_key_fields() {
    let a = private_key("fixture-a");
    let b = private_key("fixture-b");
    let m = meta("r1", "o1", "github", SecretKind::AccessToken);
    let env = seal(&m, &Secret::new(b"rotate-me".to_vec()), a.public_key()).expect("seal");
    let moved = rewrap(&m, &env, &a, b.public_key()).expect("rewrap");
    let (old, new) = (
        EnvelopeRef::decode(&env).expect("old"),
        EnvelopeRef::decode(&moved).expect("new"),
    );
    assert_eq!(new.key_id, b.public_key().id());
    assert_eq!(
        (new.nonce, new.ciphertext),
        (old.nonce, old.ciphertext),
        "ciphertext untouched"
    );
    assert_ne!(new.wrapped_dek, old.wrapped_dek);
    assert_eq!(
        open(&m, &moved, &b).expect("opens under b").expose_secret(),
        b"rotate-me"
    );
    assert!(matches!(
        open(&m, &moved, &a),
        Err(DecryptError::UnknownKey(_))
    ));
    // A record that does not authenticate is refused, not re-sealed.
    let other = meta("r2", "o1", "github", SecretKind::AccessToken);
    assert_eq!(
        rewrap(&other, &env, &a, b.public_key()),
        Err(RewrapError::Open(DecryptError::DecryptionFailed))
    );
}

#[test]
fn every_identity_field_is_bound() {
    let key = private_key("fixture-a");
    let m = meta("r1", "o1", "github", SecretKind::AccessToken);
    let env = seal(&m, &Secret::new(b"t".to_vec()), key.public_key()).expect("seal");
    for other in [
        meta("r2", "o1", "github", SecretKind::AccessToken),
        meta("r1", "o2", "github", SecretKind::AccessToken),
        meta("r1", "o1", "gitlab", SecretKind::AccessToken),
        meta("r1", "o1", "github", SecretKind::RefreshToken),
    ] {
        assert_eq!(
            open(&other, &env, &key),
            Err(DecryptError::DecryptionFailed)
        );
    }
    // Scopes and expiry are mutable metadata, not identity.
    let mut refreshed = m.clone();
    refreshed.expires_at = Some(42);
    assert!(open(&refreshed, &env, &key).is_ok());
}

#[test]
fn associated_data_is_length_prefixed_and_unambiguous() {
    let a = associated_data(&meta("ab", "c", "p", SecretKind::ApiKey));
    let b = associated_data(&meta("a", "bc", "p", SecretKind::ApiKey));
    assert_ne!(a, b);
    let mut expected = b"TVE\x01".to_vec();
    for f in ["ab", "c", "p", "api_key"] {
        expected.extend_from_slice(&(f.len() as u32).to_be_bytes());
        expected.extend_from_slice(f.as_bytes());
    }
    assert_eq!(a, expected);
}

#[test]
fn crypto_failures_collapse_to_decryption_failed() {
    let key = private_key("fixture-a");
    let m = meta("r1", "o1", "github", SecretKind::AccessToken);
    let env = seal(&m, &Secret::new(b"secret".to_vec()), key.public_key()).expect("seal");
    // Any single bit flip after the fingerprint and length: wrapped DEK (OAEP failure), nonce or
    // ciphertext or tag (GCM failure) — all one error.
    for pos in [
        format::HEADER_LEN,
        format::HEADER_LEN + 100,
        env.len() - 30,
        env.len() - 1,
    ] {
        let mut bad = env.clone();
        bad[pos] ^= 0x01;
        assert_eq!(
            open(&m, &bad, &key),
            Err(DecryptError::DecryptionFailed),
            "byte {pos}"
        );
    }
    // A wrapped DEK of the wrong decrypted length (OAEP of 31 bytes) is the same error.
    let mut rng = rand::rngs::OsRng;
    let wrapped = key
        .public_key()
        .rust_crypto()
        .wrap_dek(&DataKey::generate(&mut rng), &mut rng)
        .expect("wrap");
    assert!(key.unwrap_dek(&wrapped.0).is_ok());
    assert_eq!(
        key.unwrap_dek(&wrapped.0[1..]).map(|_| ()),
        Err(crate::keys::KeyOpError::Unwrap)
    );
}

#[test]
fn sealing_refuses_empty_and_oversized_secrets() {
    let key = private_key("fixture-a");
    let m = meta("r1", "o1", "github", SecretKind::AccessToken);
    assert_eq!(
        seal(&m, &Secret::new(vec![]), key.public_key()),
        Err(EncryptError::EmptySecret)
    );
    let big = Secret::new(vec![b'x'; MAX_SECRET_LEN + 1]);
    assert!(matches!(
        seal(&m, &big, key.public_key()),
        Err(EncryptError::SecretTooLarge { .. })
    ));
    let max = Secret::new(vec![b'x'; MAX_SECRET_LEN]);
    let env = seal(&m, &max, key.public_key()).expect("max size seals");
    assert_eq!(env.len(), MAX_ENVELOPE_LEN_V1 - 256);
    assert_eq!(open(&m, &env, &key).expect("opens"), max);
}

/// Writes tests/vectors/. Run only on purpose, after a deliberate format change:
/// `TOKENVAULT_WRITE_VECTORS=1 cargo test --lib write_vectors -- --ignored`.
#[test]
#[ignore = "writes tests/vectors; run deliberately"]
fn write_vectors() {
    assert_eq!(
        std::env::var("TOKENVAULT_WRITE_VECTORS").as_deref(),
        Ok("1")
    );
    let dir = fixture("tests/vectors");
    let write = |name: &str, comment: &str, fields: &[(&str, String)]| {
        let mut text = format!("# {comment}\n");
        for (k, v) in fields {
            writeln!(text, "{k}: {v}").expect("string write");
        }
        std::fs::write(dir.join(format!("{name}.txt")), text).expect("write vector");
    };
    let base = |p: &Positive, m: &RecordMeta, keys: &str| {
        vec![
            ("keys", keys.to_string()),
            ("id", m.id.to_string()),
            ("owner", m.owner.as_str().to_string()),
            ("provider", m.provider.to_string()),
            ("kind", m.kind.to_string()),
            ("sealed_with", p.key.to_string()),
        ]
    };
    let all = positives();
    for p in &all {
        let (env, dek, nonce) = seal_positive(p);
        let mut f = vec![("expect", "ok".to_string())];
        f.extend(base(p, &p.meta, ALL_KEYS));
        f.extend([
            ("seed", p.seed.to_string()),
            ("plaintext", hex::encode(p.plaintext)),
            ("dek", hex::encode(dek)),
            ("nonce", hex::encode(nonce)),
        ]);
        if p.name.starts_with("v2-") {
            f.push(("eseed", hex::encode(eseed(p))));
        }
        f.push(("envelope", hex::encode(&env)));
        write(p.name, "valid envelope; opens to plaintext", &f);
    }
    let p = &all[0];
    let (env, _, _) = seal_positive(p);
    let mutate = |f: &dyn Fn(&mut Vec<u8>)| {
        let mut e = env.clone();
        f(&mut e);
        e
    };
    let b_id = private_key("fixture-b").public_key().id();
    // (file name, comment, expectation, metadata to open as, keys present, envelope)
    type Case<'a> = (&'a str, &'a str, &'a str, RecordMeta, &'a str, Vec<u8>);
    let cases: Vec<Case<'_>> = vec![
        (
            "fail-flipped-tag",
            "last tag byte flipped",
            "decryption_failed",
            p.meta.clone(),
            "fixture-a",
            mutate(&|e| {
                let n = e.len() - 1;
                e[n] ^= 0x80
            }),
        ),
        (
            "fail-flipped-ciphertext",
            "first ciphertext byte flipped",
            "decryption_failed",
            p.meta.clone(),
            "fixture-a",
            mutate(&|e| {
                let n = e.len() - 16 - 40;
                e[n] ^= 0x01
            }),
        ),
        (
            "fail-flipped-wrapped-dek",
            "a wrapped-DEK byte flipped",
            "decryption_failed",
            p.meta.clone(),
            "fixture-a",
            mutate(&|e| e[format::HEADER_LEN + 7] ^= 0x01),
        ),
        (
            "fail-flipped-nonce",
            "a nonce byte flipped",
            "decryption_failed",
            p.meta.clone(),
            "fixture-a",
            mutate(&|e| e[format::HEADER_LEN + 256] ^= 0x01),
        ),
        (
            "fail-truncated",
            "last 17 bytes cut: shorter than nonce + tag",
            "truncated",
            p.meta.clone(),
            "fixture-a",
            mutate(&|e| {
                let n = e.len() - 40 - 17;
                e.truncate(n)
            }),
        ),
        (
            "fail-truncated-header",
            "cut inside the key fingerprint",
            "truncated",
            p.meta.clone(),
            "fixture-a",
            mutate(&|e| e.truncate(20)),
        ),
        (
            "fail-unknown-version",
            "format version byte set to 0x03",
            "unknown_version",
            p.meta.clone(),
            "fixture-a",
            mutate(&|e| e[3] = 0x03),
        ),
        (
            "fail-bad-magic",
            "magic is not TVE",
            "bad_magic",
            p.meta.clone(),
            "fixture-a",
            mutate(&|e| e[0] = b'X'),
        ),
        (
            "fail-unknown-key",
            "sealed under fixture-a, only fixture-b in the keyring",
            "unknown_key",
            p.meta.clone(),
            "fixture-b",
            env.clone(),
        ),
        (
            "fail-fingerprint-swapped",
            "fingerprint rewritten to fixture-b, DEK still wrapped to a",
            "decryption_failed",
            p.meta.clone(),
            "fixture-a fixture-b",
            mutate(&|e| e[4..36].copy_from_slice(&b_id.0)),
        ),
        (
            "fail-wrong-owner",
            "opened as another owner",
            "decryption_failed",
            meta(
                "github:user-42",
                "user-43",
                "github",
                SecretKind::AccessToken,
            ),
            "fixture-a",
            env.clone(),
        ),
        (
            "fail-wrong-id",
            "opened as another record id",
            "decryption_failed",
            meta(
                "github:user-43",
                "user-42",
                "github",
                SecretKind::AccessToken,
            ),
            "fixture-a",
            env.clone(),
        ),
        (
            "fail-wrong-provider",
            "opened as another provider",
            "decryption_failed",
            meta(
                "github:user-42",
                "user-42",
                "gitlab",
                SecretKind::AccessToken,
            ),
            "fixture-a",
            env.clone(),
        ),
        (
            "fail-wrong-kind",
            "opened as another secret kind",
            "decryption_failed",
            meta(
                "github:user-42",
                "user-42",
                "github",
                SecretKind::RefreshToken,
            ),
            "fixture-a",
            env.clone(),
        ),
    ];
    for (name, comment, expect, m, keys, e) in cases {
        let mut f = vec![("expect", expect.to_string())];
        f.extend(base(p, &m, keys));
        f.push(("envelope", hex::encode(&e)));
        write(name, comment, &f);
    }
    // Envelope v2's failures, from its first positive vector.
    let p2 = all
        .iter()
        .find(|p| p.name == "v2-ok-access-token")
        .expect("the v2 vector");
    let (env2, _, _) = seal_positive(p2);
    let mutate2 = |f: &dyn Fn(&mut Vec<u8>)| {
        let mut e = env2.clone();
        f(&mut e);
        e
    };
    let enc_at = format::HEADER_LEN_V2;
    let sealed_at = enc_at + crate::keys::xwing::XWING_ENC_LEN;
    let xb_id = private_key("fixture-xwing-b").public_key().id();
    let a_id = private_key("fixture-a").public_key().id();
    let xa_id = private_key("fixture-xwing").public_key().id();
    let cases: Vec<Case<'_>> = vec![
        (
            "v2-fail-flipped-enc",
            "a byte of HPKE's enc (the X-Wing encapsulation) flipped",
            "decryption_failed",
            p2.meta.clone(),
            ALL_KEYS,
            mutate2(&|e| e[enc_at + 100] ^= 0x01),
        ),
        (
            "v2-fail-flipped-sealed-dek",
            "a byte of the HPKE-sealed data key flipped",
            "decryption_failed",
            p2.meta.clone(),
            ALL_KEYS,
            mutate2(&|e| e[sealed_at + 3] ^= 0x01),
        ),
        (
            "v2-fail-flipped-ciphertext",
            "first token ciphertext byte flipped",
            "decryption_failed",
            p2.meta.clone(),
            ALL_KEYS,
            mutate2(&|e| {
                let n = e.len() - 16 - 40;
                e[n] ^= 0x01
            }),
        ),
        (
            "v2-fail-fingerprint-swapped",
            "fingerprint rewritten to fixture-xwing-b, data key still sealed to fixture-xwing",
            "decryption_failed",
            p2.meta.clone(),
            ALL_KEYS,
            mutate2(&|e| e[6..38].copy_from_slice(&xb_id.0)),
        ),
        (
            "v2-fail-unknown-kem",
            "KEM id rewritten to 0x0041 (ML-KEM-768, not accepted yet)",
            "unknown_kem",
            p2.meta.clone(),
            ALL_KEYS,
            mutate2(&|e| e[4..6].copy_from_slice(&0x0041u16.to_be_bytes())),
        ),
        (
            "v2-fail-wrong-id",
            "opened as another record id (the associated data)",
            "decryption_failed",
            meta(
                "github:user-43",
                "user-42",
                "github",
                SecretKind::AccessToken,
            ),
            ALL_KEYS,
            env2.clone(),
        ),
        (
            "v2-fail-truncated-enc",
            "cut inside HPKE's enc",
            "truncated",
            p2.meta.clone(),
            ALL_KEYS,
            mutate2(&|e| e.truncate(enc_at + 500)),
        ),
        (
            "v2-fail-names-rsa-key",
            "a v2 envelope whose fingerprint names the RSA key fixture-a",
            "scheme_mismatch",
            p2.meta.clone(),
            ALL_KEYS,
            mutate2(&|e| e[6..38].copy_from_slice(&a_id.0)),
        ),
        (
            "v1-fail-names-x-wing-key",
            "a v1 envelope whose fingerprint names the X-Wing key fixture-xwing",
            "scheme_mismatch",
            p.meta.clone(),
            ALL_KEYS,
            mutate(&|e| e[4..36].copy_from_slice(&xa_id.0)),
        ),
    ];
    for (name, comment, expect, m, keys, e) in cases {
        let mut f = vec![("expect", expect.to_string())];
        let sealer = if name.starts_with("v2") { p2 } else { p };
        f.extend(base(sealer, &m, keys));
        f.push(("envelope", hex::encode(&e)));
        write(name, comment, &f);
    }
    let _ = KeyId::of_spki_der;
    let _ = PublicKey::from_pem;
}
