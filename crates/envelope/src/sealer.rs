//! The web tier's entry point: seal secrets with a public key, never open them.
//!
//! Owns: [`Sealer`]. It holds only a [`PublicKey`] and its version; it cannot reach private-key
//! code (which is compiled only with the `daemon` feature). It knows no wire types: the gRPC
//! packaging (`Sealer::seal_record`) is the adapter's, in `api`.

use crate::envelope::{self, EncryptError};
use crate::keys::{KeyError, PublicKey, Wrapper};
use crate::record::RecordMeta;
use crate::secret::Secret;

/// Which RSA implementation wraps data keys.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    /// aws-lc-rs (default when the `aws-lc` feature is on).
    Default,
    /// The pure-Rust `rsa` crate.
    RustCrypto,
}

/// Seals secrets for the vault with the active public key.
///
/// ```
/// use tokenvault_envelope::record::{RecordMeta, SecretKind};
/// use tokenvault_envelope::secret::Secret;
/// use tokenvault_envelope::Sealer;
///
/// // In production the PEM comes from `Ingest.PublicKeys` or `tokenvault keys export-public`.
/// let pem = include_str!("../../../keys/test/fixture-a.pub.pem");
/// let sealer = Sealer::from_pem(pem)?;
/// let meta = RecordMeta::parse("github:user-42", "user-42", "github", SecretKind::AccessToken, &[], 0)?;
/// let envelope = sealer.seal(&meta, &Secret::new(b"gho_example".to_vec()))?;
/// assert_eq!(&envelope[..4], b"TVE\x01");
/// assert_eq!(&envelope[4..36], &sealer.public_key().id().0);
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
#[derive(Debug, Clone)]
pub struct Sealer {
    key: PublicKey,
    backend: Backend,
}

impl Sealer {
    /// A sealer for `key` using the default backend.
    pub fn new(key: PublicKey) -> Self {
        Self {
            key,
            backend: Backend::Default,
        }
    }

    /// A sealer for an SPKI PEM public key (e.g. from `Ingest.PublicKeys` or
    /// `tokenvault keys export-public`).
    pub fn from_pem(pem: &str) -> Result<Self, KeyError> {
        PublicKey::from_pem(pem).map(Self::new)
    }

    /// Selects the wrapping backend.
    pub fn with_backend(mut self, backend: Backend) -> Self {
        self.backend = backend;
        self
    }

    /// The public key this sealer wraps data keys under.
    pub fn public_key(&self) -> &PublicKey {
        &self.key
    }

    /// Seals `secret` for the record `meta`; returns the envelope bytes.
    pub fn seal(&self, meta: &RecordMeta, secret: &Secret) -> Result<Vec<u8>, EncryptError> {
        let rust;
        let wrapper: &dyn Wrapper = match self.backend {
            Backend::Default => &self.key,
            Backend::RustCrypto => {
                rust = self.key.rust_crypto();
                &rust
            }
        };
        envelope::seal(meta, secret, wrapper)
    }
}
