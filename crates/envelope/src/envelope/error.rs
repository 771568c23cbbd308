//! Errors of sealing and opening envelopes, split by direction.

use thiserror::Error;

use crate::keys::{KeyId, KeyLookupError, KeyOpError, KeyState, Scheme};

/// Why bytes are not a well-formed envelope. Structural, so reported precisely.
#[derive(Debug, Error, Clone, PartialEq, Eq)]
pub enum FormatError {
    /// Shorter than its fields require.
    #[error("envelope is truncated: {0}")]
    Truncated(&'static str),
    /// Does not start with the `TVE` magic.
    #[error("not a tokenvault envelope (bad magic)")]
    BadMagic,
    /// A format version this build does not know.
    #[error("unknown envelope format version {0}")]
    UnknownVersion(u8),
    /// The wrapped data key length is not that of an RSA 2048-4096 modulus.
    #[error("wrapped data key length {0} is not 256-512 bytes")]
    WrappedKeyLength(usize),
    /// A v2 envelope names a KEM this build does not know.
    #[error("unknown KEM 0x{0:04x} in a version 2 envelope")]
    UnknownKem(u16),
    /// A v2 envelope's encapsulation length is not its KEM's.
    #[error("encapsulation length {len} is not the {expected} bytes of KEM 0x{kem:04x}")]
    EncapsulationLength {
        /// The KEM named in the header.
        kem: u16,
        /// The length in the header.
        len: usize,
        /// That KEM's length.
        expected: usize,
    },
    /// Larger than its version allows ([`super::MAX_ENVELOPE_LEN_V1`], [`super::MAX_ENVELOPE_LEN`]).
    #[error("envelope is {len} bytes, larger than the limit of {max}")]
    TooLarge {
        /// Actual length.
        len: usize,
        /// Limit.
        max: usize,
    },
}

/// Why a secret could not be sealed.
#[derive(Debug, Error, Clone, PartialEq, Eq)]
pub enum EncryptError {
    /// The secret exceeds [`super::MAX_SECRET_LEN`].
    #[error("secret is {len} bytes, larger than the limit of {max}")]
    SecretTooLarge {
        /// Actual length.
        len: usize,
        /// Limit.
        max: usize,
    },
    /// The secret is empty.
    #[error("secret is empty")]
    EmptySecret,
    /// RSA-OAEP wrapping failed.
    #[error("wrapping the data key failed")]
    Wrap,
    /// AES-GCM encryption failed.
    #[error("encrypting the secret failed")]
    Seal,
}

/// Why an envelope could not be opened.
///
/// Every cryptographic failure (OAEP decoding, GCM tag, wrong associated data) is the one
/// [`DecryptError::DecryptionFailed`], so opening is neither a padding nor an AEAD oracle.
#[derive(Debug, Error, Clone, PartialEq, Eq)]
pub enum DecryptError {
    /// The bytes are not a well-formed envelope.
    #[error(transparent)]
    Format(#[from] FormatError),
    /// No key in the keyring has this fingerprint.
    #[error("envelope is sealed under unknown key {0}")]
    UnknownKey(KeyId),
    /// The key exists but may not be used to open envelopes.
    #[error("envelope is sealed under key version {version}, which is {state}")]
    KeyUnavailable {
        /// Key version.
        version: u32,
        /// Its state.
        state: KeyState,
    },
    /// The key version is below the configured minimum decryption version.
    #[error(
        "envelope is sealed under key version {version}, below the minimum decryption version {minimum}"
    )]
    BelowMinimum {
        /// Key version.
        version: u32,
        /// Configured minimum.
        minimum: u32,
    },
    /// The envelope's format (and so its wrapping scheme) is not the one of the key it names:
    /// a v2 envelope naming an RSA key version, or a v1 envelope naming an X-Wing one.
    #[error("the envelope is {envelope} but its key is {key}")]
    SchemeMismatch {
        /// How the envelope says its data key is wrapped.
        envelope: Scheme,
        /// How the named key wraps data keys.
        key: Scheme,
    },
    /// Authentication failed: wrong key, tampered envelope or wrong record identity.
    #[error("decryption failed: the envelope does not authenticate for this record")]
    DecryptionFailed,
    /// The private key is in a PKCS#11 token that cannot be reached now; retrying may work.
    #[error("the private key of this envelope is in a token that is unavailable; retry later")]
    KeyUnreachable,
}

/// Why a data key could not be rewrapped.
#[derive(Debug, Error, Clone, PartialEq, Eq)]
pub enum RewrapError {
    /// The envelope did not open with its current key.
    #[error(transparent)]
    Open(#[from] DecryptError),
    /// Wrapping under the new key failed.
    #[error(transparent)]
    Wrap(#[from] EncryptError),
}

impl From<KeyOpError> for EncryptError {
    fn from(_: KeyOpError) -> Self {
        EncryptError::Wrap
    }
}

impl From<KeyOpError> for DecryptError {
    fn from(e: KeyOpError) -> Self {
        match e {
            KeyOpError::Wrap | KeyOpError::Unwrap => DecryptError::DecryptionFailed,
            KeyOpError::Unavailable => DecryptError::KeyUnreachable,
        }
    }
}

impl From<KeyLookupError> for DecryptError {
    fn from(e: KeyLookupError) -> Self {
        match e {
            KeyLookupError::UnknownKey(id) => DecryptError::UnknownKey(id),
            KeyLookupError::KeyUnavailable { version, state } => {
                DecryptError::KeyUnavailable { version, state }
            }
            KeyLookupError::BelowMinimum { version, minimum } => {
                DecryptError::BelowMinimum { version, minimum }
            }
        }
    }
}
