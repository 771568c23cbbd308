//! Opening arbitrary bytes never panics: as an envelope of any version under an X-Wing and an
//! RSA key, and as the wrapped data key of a v2 envelope (X-Wing decapsulation of a malformed
//! encapsulation, then HPKE's open). Every malformed input is a refusal.
#![no_main]

use std::sync::LazyLock;

use libfuzzer_sys::fuzz_target;
use tokenvault::keys::{PrivateKey, Unwrapper as _};
use tokenvault::record::{RecordMeta, SecretKind};

static KEYS: LazyLock<(PrivateKey, PrivateKey, RecordMeta)> = LazyLock::new(|| {
    let load = |pem: &str| PrivateKey::from_pem(pem, None).expect("fixture key");
    (
        load(include_str!("../../keys/test/fixture-xwing.key.pem")),
        load(include_str!("../../keys/test/fixture-a.key.pem")),
        RecordMeta::parse("github:user-42", "user-42", "github", SecretKind::AccessToken, &[], 0)
            .expect("meta"),
    )
});

fuzz_target!(|data: &[u8]| {
    let (pq, rsa, meta) = &*KEYS;
    let _ = tokenvault::envelope::open(meta, data, pq);
    let _ = tokenvault::envelope::open(meta, data, rsa);
    let _ = pq.unwrap_dek(data);
});
