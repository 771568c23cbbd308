//! Known-answer vectors in tests/vectors/: each file is opened through the public API with the
//! fixture keys it names, and must give exactly the expected plaintext or error. Nothing here
//! regenerates a vector (see `write_vectors` in src/envelope/tests.rs).

use std::collections::BTreeMap;
use std::path::Path;

use tokenvault::envelope::{self, DecryptError, EnvelopeRef, FormatError};
use tokenvault::keys::{KeyId, KeyLookupError, PrivateKey, Unwrapper, UnwrapperLookup};
use tokenvault::record::{RecordMeta, SecretKind};

struct Keys(Vec<PrivateKey>);

impl UnwrapperLookup for Keys {
    fn unwrapper(&self, id: &KeyId) -> Result<&dyn Unwrapper, KeyLookupError> {
        self.0
            .iter()
            .find(|k| k.key_id() == *id)
            .map(|k| k as &dyn Unwrapper)
            .ok_or(KeyLookupError::UnknownKey(*id))
    }
}

fn root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

fn load(name: &str) -> BTreeMap<String, String> {
    let text = std::fs::read_to_string(root().join("tests/vectors").join(name)).expect("vector");
    text.lines()
        .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
        .map(|l| {
            let (k, v) = l
                .split_once(": ")
                .unwrap_or_else(|| panic!("{name}: bad line {l:?}"));
            (k.to_string(), v.to_string())
        })
        .collect()
}

fn key(name: &str) -> PrivateKey {
    let pem = std::fs::read_to_string(root().join(format!("keys/test/{name}.key.pem")))
        .expect("fixture key");
    PrivateKey::from_pem(&pem, None).expect("fixture key parses")
}

#[test]
fn all_vectors() {
    let mut names: Vec<String> = std::fs::read_dir(root().join("tests/vectors"))
        .expect("vectors dir")
        .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
        .filter(|n| n.ends_with(".txt"))
        .collect();
    names.sort();
    assert!(
        names.len() >= 28,
        "expected the full vector set, found {names:?}"
    );
    let (mut ok, mut fail) = (0, 0);
    for name in &names {
        let v = load(name);
        let keys = Keys(v["keys"].split(' ').map(key).collect());
        let meta = RecordMeta::parse(
            &v["id"],
            &v["owner"],
            &v["provider"],
            SecretKind::parse(&v["kind"]).expect("kind"),
            &[],
            0,
        )
        .expect("meta");
        let env = hex::decode(&v["envelope"]).expect("hex");
        let result = envelope::open(&meta, &env, &keys);
        match v["expect"].as_str() {
            "ok" => {
                ok += 1;
                let secret = result.unwrap_or_else(|e| panic!("{name}: {e}"));
                assert_eq!(
                    hex::encode(secret.expose_secret()),
                    v["plaintext"],
                    "{name}"
                );
                // The wrapped DEK and nonce are the documented ones.
                let parsed = EnvelopeRef::decode(&env).expect("decodes");
                let dek = keys
                    .unwrapper(&parsed.key_id)
                    .expect("key")
                    .unwrap_dek(parsed.wrapped_dek)
                    .expect("unwrap");
                assert_eq!(hex::encode(dek.expose_secret()), v["dek"], "{name}");
                assert_eq!(hex::encode(parsed.nonce), v["nonce"], "{name}");
                assert_eq!(parsed.key_id, key(&v["sealed_with"]).key_id(), "{name}");
            }
            expected => {
                fail += 1;
                let err = result.expect_err(name);
                let matches = match expected {
                    "decryption_failed" => err == DecryptError::DecryptionFailed,
                    "truncated" => matches!(err, DecryptError::Format(FormatError::Truncated(_))),
                    "unknown_version" => {
                        matches!(err, DecryptError::Format(FormatError::UnknownVersion(_)))
                    }
                    "bad_magic" => err == DecryptError::Format(FormatError::BadMagic),
                    "unknown_key" => matches!(err, DecryptError::UnknownKey(_)),
                    "unknown_kem" => {
                        matches!(err, DecryptError::Format(FormatError::UnknownKem(_)))
                    }
                    "scheme_mismatch" => matches!(err, DecryptError::SchemeMismatch { .. }),
                    other => panic!("{name}: unknown expectation {other}"),
                };
                assert!(matches, "{name}: expected {expected}, got {err:?}");
            }
        }
    }
    assert!(ok >= 5 && fail >= 23, "ok {ok} fail {fail}");
}
