//! Key material: everything of [`tokenvault_envelope::keys`] (fingerprints, the wrapping
//! traits, public keys), plus what only the daemon has: the private half and the keyring.
//!
//! Architecture invariant: the private half lives only in `private` (in this crate, which a
//! web tier never links) and is reachable only through [`Unwrapper`]: no function returns
//! private key bytes except the explicit PEM export used to write key files.

pub mod keyring;
mod private;
pub mod token;

pub use private::PrivateKey;
#[cfg(test)]
pub(crate) use private::{hpke_key_schedule_for_tests, xwing_decapsulate_for_tests};
pub use tokenvault_envelope::keys::*;

/// A private key the keyring can use: in process memory (read from a key file or the shared
/// store) or in a PKCS#11 token.
#[derive(Debug)]
pub enum LoadedKey {
    /// In memory.
    Memory(PrivateKey),
    /// In the token.
    Token(token::TokenKey),
}

impl LoadedKey {
    /// The matching public key.
    pub fn public_key(&self) -> &PublicKey {
        match self {
            Self::Memory(k) => k.public_key(),
            Self::Token(k) => k.public_key(),
        }
    }
}

impl Unwrapper for LoadedKey {
    fn key_id(&self) -> KeyId {
        self.public_key().id()
    }

    fn scheme(&self) -> Scheme {
        self.public_key().scheme()
    }

    fn unwrap_dek(&self, wrapped: &[u8]) -> Result<crate::secret::DataKey, KeyOpError> {
        match self {
            Self::Memory(k) => k.unwrap_dek(wrapped),
            Self::Token(k) => k.unwrap_dek(wrapped),
        }
    }
}

/// A key version about to be added: generated in memory or imported (to be written to a key
/// file or the shared store), or generated in the PKCS#11 token (to be named there).
#[derive(Debug)]
pub enum NewKey {
    /// In memory.
    Memory(PrivateKey),
    /// Generated in the token, not yet named.
    Token {
        /// The token's new key pair.
        pair: tokenvault_pkcs11::NewKeyPair,
        /// Its public key.
        public: PublicKey,
    },
}

impl NewKey {
    /// The new key's public key.
    pub fn public_key(&self) -> &PublicKey {
        match self {
            Self::Memory(k) => k.public_key(),
            Self::Token { public, .. } => public,
        }
    }
}

impl From<PrivateKey> for NewKey {
    fn from(key: PrivateKey) -> Self {
        Self::Memory(key)
    }
}

/// Whether this build does its cryptography on aws-lc's FIPS 140-3 validated module (cargo
/// feature `fips`).
pub const FIPS_BUILD: bool = cfg!(feature = "fips");

/// In a FIPS build, that the module runs in FIPS mode (its power-on self tests passed); the
/// daemon does not start otherwise. Always `Ok` in other builds.
pub fn check_fips_mode() -> Result<(), String> {
    #[cfg(feature = "fips")]
    {
        aws_lc_rs::try_fips_mode().map_err(|e| format!("aws-lc is not in FIPS mode: {e}"))
    }
    #[cfg(not(feature = "fips"))]
    {
        Ok(())
    }
}
