//! The software PKCS#11 token the tests use (opencryptoki's soft token, started by
//! scripts/with-softtoken): its configuration, a handle on it, and a version's token object.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::sync::Arc;

use tokenvault::api::v1;
use tokenvault::config::{Config, KeyBackend};
use tokenvault_pkcs11::{Pin, Token, TokenConfig, TokenSelector};

use super::{ADMIN, TestDaemon, config};

pub fn env(name: &str) -> String {
    std::env::var(name).unwrap_or_else(|_| {
        panic!("{name} is not set: run the tests with ./scripts/test, which starts a software PKCS#11 token (scripts/with-softtoken)")
    })
}

pub fn token_config() -> TokenConfig {
    TokenConfig {
        module: PathBuf::from(env("TOKENVAULT_TEST_PKCS11_MODULE")),
        token: TokenSelector::Label(env("TOKENVAULT_TEST_PKCS11_LABEL")),
        pin: Pin::new(env("TOKENVAULT_TEST_PKCS11_PIN")),
        // opencryptoki 3.8's soft token crashes when two sessions use one key at once.
        max_sessions: 1,
    }
}

pub fn in_token(base: &Path) -> Config {
    let mut c = config(base);
    c.key_backend = KeyBackend::Pkcs11(token_config());
    c
}

pub fn token() -> Arc<Token> {
    Token::open(token_config()).expect("token")
}

pub fn id_bytes(fingerprint: &str) -> Vec<u8> {
    (0..fingerprint.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&fingerprint[i..i + 2], 16).expect("hex"))
        .collect()
}

pub async fn fingerprint(d: &TestDaemon, version: u32) -> String {
    d.admin(ADMIN)
        .await
        .list_keys(v1::ListKeysRequest {})
        .await
        .expect("keys")
        .into_inner()
        .keys
        .into_iter()
        .find(|k| k.version == version)
        .expect("version listed")
        .fingerprint
}

/// The secret `Broker.GetToken` returns for `id`.
pub async fn secret(d: &TestDaemon, id: &str) -> Vec<u8> {
    d.get(id).await.expect("get").into_inner().secret.to_vec()
}
