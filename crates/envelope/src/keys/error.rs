//! Errors of loading, validating and storing keys.

use std::path::PathBuf;

use thiserror::Error;

/// Why a key could not be loaded, validated or written. Messages never contain key material.
#[derive(Debug, Error)]
pub enum KeyError {
    /// The text is not PEM, or holds an unexpected PEM label.
    #[error("not a {expected} PEM file (found {found})")]
    UnexpectedPem {
        /// What was expected, e.g. "PUBLIC KEY".
        expected: &'static str,
        /// What was found.
        found: String,
    },
    /// The text has no PEM block at all.
    #[error("not a PEM file (no -----BEGIN line)")]
    NotPem,
    /// The DER inside the PEM did not decode as a key of its algorithm.
    #[error("not a valid {what}: {reason}")]
    Malformed {
        /// "RSA public key", "X-Wing private key", ...
        what: &'static str,
        /// Decoder message (never includes key bytes).
        reason: String,
    },
    /// The key is RSA but of an unsupported size.
    #[error("RSA key of {bits} bits refused: tokenvault accepts RSA 2048 to 4096 bits")]
    UnsupportedSize {
        /// Modulus size in bits.
        bits: usize,
    },
    /// The private key is passphrase-protected and no passphrase was supplied; the text says
    /// how to supply one where the key was read (see [`KeyError::with_passphrase_hint`]).
    #[error("private key is encrypted: {0}")]
    PassphraseRequired(&'static str),
    /// The PEM block has no matching END line.
    #[error("PEM block {label:?} has no -----END {label}----- line")]
    PemMissingEnd {
        /// The label of the BEGIN line.
        label: String,
    },
    /// The key is not an RSA key.
    #[error(
        "{what} uses the {algorithm} algorithm; tokenvault accepts RSA (2048 to 4096 bits) and X-Wing keys only"
    )]
    NotRsa {
        /// "public key" or "private key".
        what: &'static str,
        /// The key's own algorithm, by name where known, else its OID.
        algorithm: String,
    },
    /// A key read for a version failed; names where it was read from (a key file, or the
    /// shared store's row), so an operator knows which one to look at.
    #[error("{}: {error}", location.display())]
    At {
        /// The key file, or `shared store: private key vN`.
        location: PathBuf,
        /// What was wrong with it.
        error: Box<KeyError>,
    },
    /// The passphrase did not decrypt the private key.
    #[error("could not decrypt the private key: wrong passphrase or corrupt file")]
    WrongPassphrase,
    /// The private key does not match the registered public key.
    #[error(
        "private key file {path} does not match key version {version} (fingerprint {expected})"
    )]
    Mismatch {
        /// File that was read.
        path: PathBuf,
        /// Version in the registry.
        version: u32,
        /// Fingerprint in the registry.
        expected: String,
    },
    /// A key file is readable by group or others.
    #[error("private key file {path} is readable by group or others (mode {mode:o}); chmod 600 it")]
    InsecurePermissions {
        /// The file.
        path: PathBuf,
        /// Its permission bits.
        mode: u32,
    },
    /// Reading or writing a key file failed.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// Underlying error.
        #[source]
        source: std::io::Error,
    },
    /// The keyring has no active version.
    #[error("the keyring has no active key version: run `tokenvault keys init`")]
    NoActiveKey,
    /// `keys init` on a keyring that already has versions.
    #[error("the keyring already has {0} key version(s); use `tokenvault keys rotate`")]
    AlreadyInitialized(usize),
    /// A key version that does not exist.
    #[error("no key version {0}")]
    UnknownVersion(u32),
    /// Another daemon sharing the store added this key version first.
    #[error("key version {0} was just added by another daemon; retry")]
    VersionTaken(u32),
    /// The imported key is already in the keyring.
    #[error("that key is already key version {0}")]
    Duplicate(u32),
    /// Key generation failed in the crypto library.
    #[error("RSA key generation failed")]
    Generation,
    /// Persisting the key registry failed.
    #[error("key registry: {0}")]
    Store(String),
    /// The PKCS#11 token refused or could not be set up (`[keys.pkcs11]`): a wrong PIN, a
    /// missing module, no such token, a key it does not have.
    #[error("[keys.pkcs11]: {0}")]
    Token(String),
    /// The FIPS build refuses X-Wing keys: their private-key operation (HPKE, the `hpke` crate)
    /// would run outside aws-lc's validated module.
    #[error(
        "the FIPS build refuses X-Wing keys: HPKE with X-Wing runs outside aws-lc's FIPS 140-3 \
         module (docs/KEY_CUSTODY.md); use rsa-2048 or rsa-3072"
    )]
    NotInFipsBuild,
    /// The PKCS#11 token is unreachable now (removed, its daemon stopped); retrying may work.
    #[error("the PKCS#11 token is unavailable: {0}")]
    TokenUnavailable(String),
}

/// How to supply a passphrase, by where the key is being read.
pub mod passphrase_hint {
    /// No context: the bare fact.
    pub const NONE: &str = "no passphrase was supplied";
    /// The daemon's key directory.
    pub const KEY_DIR: &str = "set TOKENVAULT_KEY_PASSPHRASE or TOKENVAULT_KEY_PASSPHRASE_FILE, or passphrase_file in the config";
    /// `keys import --private` and `admin rotate --import-private`.
    pub const IMPORT: &str =
        "give its passphrase with --import-passphrase-file FILE or TOKENVAULT_IMPORT_PASSPHRASE";
    /// `Admin.RotateKey` over the network.
    pub const REMOTE: &str = "Admin.RotateKey takes an unencrypted PKCS#8 or PKCS#1 PEM; `tokenvault admin rotate --import-private FILE --import-passphrase-file PASSFILE` decrypts it locally first";
}

impl KeyError {
    /// Replaces the passphrase hint of a [`KeyError::PassphraseRequired`]; other errors pass
    /// through unchanged.
    pub fn with_passphrase_hint(self, hint: &'static str) -> Self {
        match self {
            KeyError::PassphraseRequired(_) => KeyError::PassphraseRequired(hint),
            KeyError::At { location, error } => KeyError::At {
                location,
                error: Box::new(error.with_passphrase_hint(hint)),
            },
            other => other,
        }
    }

    /// The error itself, without where it happened ([`KeyError::At`]).
    pub fn cause(&self) -> &KeyError {
        match self {
            KeyError::At { error, .. } => error.cause(),
            other => other,
        }
    }
}

/// A key operation failed. Every RSA-OAEP failure is the one [`KeyOpError::Unwrap`], so an
/// opener is no padding oracle; `envelope` maps these into its own errors.
#[derive(Debug, Error, Clone, Copy, PartialEq, Eq)]
pub enum KeyOpError {
    /// RSA-OAEP wrapping failed.
    #[error("wrapping the data key failed")]
    Wrap,
    /// RSA-OAEP unwrapping failed (wrong key, altered bytes, wrong label: one error).
    #[error("unwrapping the data key failed")]
    Unwrap,
    /// The private key is in a token that cannot be reached now: nothing was decided about
    /// the ciphertext, and retrying may work.
    #[error("the private key's token is unavailable")]
    Unavailable,
}

/// Why no key can unwrap a data key sealed under a fingerprint.
#[derive(Debug, Error, Clone, PartialEq, Eq)]
pub enum KeyLookupError {
    /// No key has this fingerprint.
    #[error("no key with fingerprint {0}")]
    UnknownKey(super::KeyId),
    /// The key exists but may not be used to open envelopes.
    #[error("key version {version} is {state}")]
    KeyUnavailable {
        /// Key version.
        version: u32,
        /// Its state.
        state: super::KeyState,
    },
    /// The key version is below the configured minimum decryption version.
    #[error("key version {version} is below the minimum decryption version {minimum}")]
    BelowMinimum {
        /// Key version.
        version: u32,
        /// Configured minimum.
        minimum: u32,
    },
}
