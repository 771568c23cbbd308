//! Key material and the operations on it that need no private key: fingerprints, DEK wrapping.
//!
//! Owns: [`KeyId`] (the SHA-256 fingerprint of a public key's SPKI DER), [`KeyState`],
//! [`KeyInfo`], the [`Wrapper`] / [`Unwrapper`] traits and the RSA-OAEP wrapping. The daemon
//! crate (`tokenvault::keys`) adds the private half and the keyring.
//!
//! RSA-OAEP as used here is RSAES-OAEP from RFC 8017 §7.1 with SHA-256, MGF1-SHA-256 and the
//! label [`OAEP_LABEL`]:
//!
//! ```text
//! wrapped_dek = RSAES-OAEP-ENCRYPT[pk, SHA-256, MGF1-SHA-256, L = "tokenvault/v1/dek"](dek)
//! ```
//!
//! Architecture invariant: this crate holds no private key; the private half lives only in
//! the daemon crate and is reachable only through [`Unwrapper`].

mod error;
mod public;
pub mod xwing;

use std::fmt;

use rand_core::CryptoRngCore;
use sha2::{Digest, Sha256};

pub use error::{KeyError, KeyLookupError, KeyOpError, passphrase_hint};
pub use public::{PublicKey, RustCryptoWrapper, spki_algorithm, spki_pem};
#[doc(hidden)]
pub use public::{pem_label, require_rsa};
pub use xwing::XWingPublicKey;

use crate::secret::DataKey;

/// The OAEP label every wrapped data key is bound to (domain separation from any other use of
/// the same RSA key).
pub const OAEP_LABEL: &[u8] = b"tokenvault/v1/dek";

/// Smallest accepted RSA modulus, in bits.
pub const MIN_RSA_BITS: usize = 2048;
/// Largest accepted RSA modulus, in bits.
pub const MAX_RSA_BITS: usize = 4096;

/// Length of a key fingerprint in bytes.
pub const KEY_ID_LEN: usize = 32;

/// A key's fingerprint: SHA-256 over the DER of its SubjectPublicKeyInfo.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct KeyId(pub [u8; KEY_ID_LEN]);

impl KeyId {
    /// Fingerprint of a SubjectPublicKeyInfo DER encoding.
    pub fn of_spki_der(spki_der: &[u8]) -> Self {
        Self(Sha256::digest(spki_der).into())
    }

    /// Lowercase hex, as shown in CLI output and the API.
    pub fn to_hex(&self) -> String {
        hex::encode(self.0)
    }

    /// Parses 64 hex digits.
    pub fn from_hex(text: &str) -> Option<Self> {
        let mut out = [0u8; KEY_ID_LEN];
        hex::decode_to_slice(text, &mut out).ok()?;
        Some(Self(out))
    }
}

impl fmt::Debug for KeyId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "KeyId({})", self.to_hex())
    }
}

impl fmt::Display for KeyId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.to_hex())
    }
}

/// Lifecycle state of a key version: active → decrypt-only → retired → pending destruction →
/// destroyed (a pending destruction can be cancelled back to retired until it is due).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KeyState {
    /// Seals new records; exactly one version is active.
    Active,
    /// Opens existing records; envelopes sealed under it are still accepted.
    DecryptOnly,
    /// No record uses it; envelopes sealed under it are refused.
    Retired,
    /// Retired and scheduled for destruction at [`KeyInfo::destroy_after`]; opens nothing.
    PendingDestruction,
    /// Private key erased; only the fingerprint remains.
    Destroyed,
}

impl KeyState {
    /// Lowercase name used in CLI output and storage.
    pub fn as_str(self) -> &'static str {
        match self {
            KeyState::Active => "active",
            KeyState::DecryptOnly => "decrypt-only",
            KeyState::Retired => "retired",
            KeyState::PendingDestruction => "pending-destruction",
            KeyState::Destroyed => "destroyed",
        }
    }

    /// Whether envelopes sealed under a key in this state may be ingested and opened.
    pub fn accepts_envelopes(self) -> bool {
        matches!(self, KeyState::Active | KeyState::DecryptOnly)
    }
}

impl fmt::Display for KeyState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Public facts about one key version, as kept in the store's key registry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyInfo {
    /// Version number, 1 for the first key.
    pub version: u32,
    /// Fingerprint of the public key.
    pub id: KeyId,
    /// Lifecycle state.
    pub state: KeyState,
    /// Creation time, Unix seconds.
    pub created_at: i64,
    /// Time of the last state change, Unix seconds.
    pub updated_at: i64,
    /// The public key, SubjectPublicKeyInfo DER.
    pub spki_der: Vec<u8>,
    /// When a [`KeyState::PendingDestruction`] version is due to be destroyed, Unix seconds
    /// (`None` in every other state).
    pub destroy_after: Option<i64>,
}

/// A key version's algorithm: what `keys init|rotate --algorithm` names.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Algorithm {
    /// RSA with this modulus size in bits (2048 to 4096); data keys wrapped with RSA-OAEP.
    Rsa(usize),
    /// X-Wing (ML-KEM-768 + X25519); data keys sealed with HPKE.
    XWing,
}

impl Algorithm {
    /// The algorithms a new key version may be generated with, by their names.
    pub const GENERATED: [(&'static str, Algorithm); 3] = [
        ("rsa-2048", Algorithm::Rsa(2048)),
        ("rsa-3072", Algorithm::Rsa(3072)),
        ("x-wing", Algorithm::XWing),
    ];

    /// Parses a name of [`Algorithm::GENERATED`].
    pub fn parse(name: &str) -> Option<Self> {
        Self::GENERATED
            .iter()
            .find(|(n, _)| *n == name)
            .map(|(_, a)| *a)
    }

    /// How keys of this algorithm wrap data keys.
    pub fn scheme(self) -> Scheme {
        match self {
            Algorithm::Rsa(_) => Scheme::RsaOaep,
            Algorithm::XWing => Scheme::Hpke(xwing::KEM_ID_XWING),
        }
    }
}

impl fmt::Display for Algorithm {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Algorithm::Rsa(bits) => write!(f, "rsa-{bits}"),
            Algorithm::XWing => f.write_str("x-wing"),
        }
    }
}

/// How an envelope's data key is wrapped, which is also its format version: RSA-OAEP in
/// envelope v1, HPKE with a named KEM in envelope v2.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Scheme {
    /// RSAES-OAEP (envelope v1).
    RsaOaep,
    /// HPKE base mode with this KEM id (envelope v2), e.g. [`xwing::KEM_ID_XWING`].
    Hpke(u16),
}

impl Scheme {
    /// The envelope format version this scheme is written in.
    pub fn format_version(self) -> u8 {
        match self {
            Scheme::RsaOaep => 1,
            Scheme::Hpke(_) => 2,
        }
    }
}

impl fmt::Display for Scheme {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Scheme::RsaOaep => f.write_str("RSA-OAEP (envelope v1)"),
            Scheme::Hpke(xwing::KEM_ID_XWING) => f.write_str("HPKE X-Wing (envelope v2)"),
            Scheme::Hpke(other) => write!(f, "HPKE KEM 0x{other:04x} (envelope v2)"),
        }
    }
}

/// A data key wrapped under one public key: the RSA-OAEP ciphertext (v1), or HPKE's `enc`
/// followed by the sealed data key (v2).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WrappedDek(pub Vec<u8>);

/// Wraps data keys under one public key.
pub trait Wrapper: Send + Sync {
    /// Fingerprint of the wrapping key, written into the envelope.
    fn key_id(&self) -> KeyId;

    /// How this key wraps data keys (and so the envelope version it seals). No default: a
    /// wrapper that named the wrong scheme would write an envelope no key can open.
    fn scheme(&self) -> Scheme;

    /// Wraps `dek` under this key (RSA-OAEP, or HPKE for v2). Backends that draw their
    /// randomness from their own CSPRNG ignore `rng`.
    fn wrap_dek(
        &self,
        dek: &DataKey,
        rng: &mut dyn CryptoRngCore,
    ) -> Result<WrappedDek, KeyOpError>;
}

/// Unwraps data keys with one private key.
pub trait Unwrapper: Send + Sync {
    /// Fingerprint of the matching public key.
    fn key_id(&self) -> KeyId;

    /// How this key's data keys are wrapped; an envelope of another scheme is refused before
    /// any private-key operation. No default, so no key can claim the wrong one by omission.
    fn scheme(&self) -> Scheme;

    /// Decrypts a wrapped data key. Every cryptographic failure is the single
    /// [`KeyOpError::Unwrap`], so callers cannot be used as a padding oracle.
    fn unwrap_dek(&self, wrapped: &[u8]) -> Result<DataKey, KeyOpError>;
}

/// Finds the unwrapper for a key fingerprint named in an envelope.
pub trait UnwrapperLookup {
    /// The unwrapper for `id`, or why there is none.
    fn unwrapper(&self, id: &KeyId) -> Result<&dyn Unwrapper, KeyLookupError>;
}

impl<U: Unwrapper> UnwrapperLookup for U {
    fn unwrapper(&self, id: &KeyId) -> Result<&dyn Unwrapper, KeyLookupError> {
        if self.key_id() == *id {
            Ok(self)
        } else {
            Err(KeyLookupError::UnknownKey(*id))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn key_id_hex_round_trips() {
        let id = KeyId::of_spki_der(b"not really spki");
        assert_eq!(KeyId::from_hex(&id.to_hex()), Some(id));
        assert_eq!(KeyId::from_hex("zz"), None);
        // SHA-256("abc") known answer.
        assert_eq!(
            KeyId::of_spki_der(b"abc").to_hex(),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
    }
}
