//! Zeroizing newtypes for every secret the vault touches.
//!
//! Owns: [`DataKey`], [`Secret`], [`ApiCredential`] and [`Passphrase`]. Each is wiped from memory
//! when dropped and prints as `[REDACTED]` through `Debug`; none implements `Display`, `Clone`
//! into a non-zeroizing type, or serde. Code that needs the bytes calls `expose_secret()`, which
//! keeps every place a secret is read greppable.
//!
//! Must never: derive `Debug`, implement `Display`, or hand out an owned non-zeroizing copy.

use std::fmt;

use rand::{CryptoRng, RngCore};
use zeroize::{Zeroize, ZeroizeOnDrop, Zeroizing};

/// Length in bytes of an AES-256-GCM data key.
pub const DATA_KEY_LEN: usize = 32;

/// A per-record AES-256-GCM data encryption key (DEK).
#[derive(Zeroize, ZeroizeOnDrop)]
pub struct DataKey(Box<[u8; DATA_KEY_LEN]>);

impl DataKey {
    /// Draws a fresh key from `rng` (the OS CSPRNG outside tests).
    pub fn generate(rng: &mut (impl RngCore + CryptoRng + ?Sized)) -> Self {
        let mut key = Box::new([0u8; DATA_KEY_LEN]);
        rng.fill_bytes(&mut key[..]);
        Self(key)
    }

    /// Copies a key from `bytes`, which must be exactly [`DATA_KEY_LEN`] long.
    ///
    /// The caller remains responsible for clearing `bytes`.
    pub fn from_slice(bytes: &[u8]) -> Option<Self> {
        let mut key = Box::new([0u8; DATA_KEY_LEN]);
        if bytes.len() != DATA_KEY_LEN {
            return None;
        }
        key.copy_from_slice(bytes);
        Some(Self(key))
    }

    /// The raw key bytes.
    pub fn expose_secret(&self) -> &[u8; DATA_KEY_LEN] {
        &self.0
    }
}

impl fmt::Debug for DataKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("DataKey([REDACTED])")
    }
}

/// A plaintext secret: an access token, refresh token, client secret, API key or token bundle.
/// Compared in constant time (for equal lengths), so a comparison never tells how much of a
/// guess was right.
#[derive(Clone, Zeroize, ZeroizeOnDrop)]
pub struct Secret(Vec<u8>);

impl PartialEq for Secret {
    fn eq(&self, other: &Self) -> bool {
        use subtle::ConstantTimeEq as _;
        bool::from(self.0.ct_eq(&other.0))
    }
}

impl Eq for Secret {}

impl Secret {
    /// Wraps `bytes`; they are wiped when the `Secret` is dropped.
    pub fn new(bytes: Vec<u8>) -> Self {
        Self(bytes)
    }

    /// The plaintext bytes.
    pub fn expose_secret(&self) -> &[u8] {
        &self.0
    }

    /// Length of the plaintext in bytes (not secret).
    pub fn len(&self) -> usize {
        self.0.len()
    }

    /// Whether the plaintext is empty.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

impl From<Zeroizing<Vec<u8>>> for Secret {
    fn from(mut bytes: Zeroizing<Vec<u8>>) -> Self {
        Self(std::mem::take(&mut *bytes))
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret([REDACTED])")
    }
}

/// A bearer credential for the gRPC API (`authorization: Bearer …`).
#[derive(Clone, Zeroize, ZeroizeOnDrop)]
pub struct ApiCredential(String);

impl ApiCredential {
    /// Wraps a credential string.
    pub fn new(value: String) -> Self {
        Self(value)
    }

    /// Generates a fresh credential with 256 bits of entropy, `tv_` prefixed and hex encoded.
    pub fn generate(rng: &mut (impl RngCore + CryptoRng)) -> Self {
        let mut raw = Zeroizing::new([0u8; 32]);
        rng.fill_bytes(&mut raw[..]);
        Self(format!("tv_{}", hex::encode(&raw[..])))
    }

    /// The credential text.
    pub fn expose_secret(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for ApiCredential {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("ApiCredential([REDACTED])")
    }
}

/// A grant handle (`tvg_…`, docs/PROXY.md): whoever presents it may use the grant. Zeroized on
/// drop, redacted in `Debug`; only its SHA-256 (the grant id) is stored or logged. Compared in
/// constant time, like [`Secret`].
#[derive(Clone)]
pub struct GrantHandle(Zeroizing<String>);

impl PartialEq for GrantHandle {
    fn eq(&self, other: &Self) -> bool {
        use subtle::ConstantTimeEq as _;
        bool::from(self.0.as_bytes().ct_eq(other.0.as_bytes()))
    }
}

impl Eq for GrantHandle {}

impl GrantHandle {
    /// Wraps a handle as received or generated.
    pub fn new(value: String) -> Self {
        Self(Zeroizing::new(value))
    }

    /// The handle text.
    pub fn expose_secret(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for GrantHandle {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("GrantHandle([REDACTED])")
    }
}

/// A passphrase protecting private key files.
#[derive(Clone, Zeroize, ZeroizeOnDrop)]
pub struct Passphrase(String);

impl Passphrase {
    /// Wraps a passphrase; a trailing newline (as left by `echo` into a file) is removed.
    pub fn new(mut value: String) -> Self {
        while value.ends_with('\n') || value.ends_with('\r') {
            value.pop();
        }
        Self(value)
    }

    /// The passphrase text.
    pub fn expose_secret(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Passphrase {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Passphrase([REDACTED])")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn secrets_and_grant_handles_compare_by_value() {
        let s = |b: &[u8]| Secret::new(b.to_vec());
        assert_eq!(s(b"gho_abc"), s(b"gho_abc"));
        assert_ne!(s(b"gho_abc"), s(b"gho_abd"));
        assert_ne!(s(b"gho_abc"), s(b"gho_ab"));
        assert_ne!(s(b""), s(b"x"));
        let g = |t: &str| GrantHandle::new(t.to_string());
        assert_eq!(g("tvg_1"), g("tvg_1"));
        assert_ne!(g("tvg_1"), g("tvg_2"));
        assert_ne!(g("tvg_1"), g("tvg_12"));
    }

    #[test]
    fn debug_output_of_every_secret_type_is_redacted() {
        let mut rng = rand::rngs::OsRng;
        let dek = DataKey::from_slice(&[0x41; 32]).expect("32 bytes");
        let secret = Secret::new(b"gho_supersecrettoken".to_vec());
        let cred = ApiCredential::new("tv_credentialvalue".into());
        let pass = Passphrase::new("hunter2-passphrase\n".into());
        let generated = ApiCredential::generate(&mut rng);
        for (debug, secret_text) in [
            (format!("{dek:?}"), "AAAA".to_string()),
            (format!("{dek:?}"), "65".to_string()),
            (format!("{secret:?}"), "supersecret".to_string()),
            (format!("{cred:?}"), "credentialvalue".to_string()),
            (format!("{pass:?}"), "hunter2".to_string()),
            (
                format!("{generated:?}"),
                generated.expose_secret()[3..].to_string(),
            ),
        ] {
            assert!(debug.contains("[REDACTED]"), "{debug}");
            assert!(!debug.contains(&secret_text), "{debug} leaks {secret_text}");
        }
        assert_eq!(pass.expose_secret(), "hunter2-passphrase");
    }

    #[test]
    fn data_key_requires_exact_length() {
        assert!(DataKey::from_slice(&[0u8; 31]).is_none());
        assert!(DataKey::from_slice(&[0u8; 33]).is_none());
        assert_eq!(
            DataKey::from_slice(&[7u8; 32]).expect("32").expose_secret(),
            &[7u8; 32]
        );
    }

    #[test]
    fn generated_credentials_are_distinct_and_long() {
        let mut rng = rand::rngs::OsRng;
        let a = ApiCredential::generate(&mut rng);
        let b = ApiCredential::generate(&mut rng);
        assert_ne!(a.expose_secret(), b.expose_secret());
        assert_eq!(a.expose_secret().len(), 3 + 64);
    }
}
