//! Ingest's validation of a `PutSealedRequest` (metadata, envelope structure, key fingerprint,
//! wrapped-key length) on arbitrary protobuf bytes.
#![no_main]

use std::sync::OnceLock;

use libfuzzer_sys::fuzz_target;
use tokenvault::keys::PrivateKey;
use tokenvault::keys::keyring::Keyring;

fn ring() -> &'static Keyring {
    static RING: OnceLock<Keyring> = OnceLock::new();
    RING.get_or_init(|| {
        let pem = include_str!("../../keys/test/fixture-a.key.pem");
        Keyring::single(PrivateKey::from_pem(pem, None).expect("fixture key"))
    })
}

fuzz_target!(|data: &[u8]| {
    let _ = tokenvault::server::ingest::fuzz_check_item(ring(), data);
});
