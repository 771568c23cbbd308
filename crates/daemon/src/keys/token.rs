//! Private keys held in a PKCS#11 token (`[keys] backend = "pkcs11"`): generated there, used
//! there through [`tokenvault_pkcs11::Token`], never read out.
//!
//! Owns: [`TokenKey`] (an [`Unwrapper`] whose RSA-OAEP decryption runs in the token) and the
//! translation of the token's errors into the keyring's. The token object of a key version is
//! the private key whose `CKA_ID` is the version's fingerprint (the registry's key id), labelled
//! `tokenvault v0001`.
//!
//! Must never: hold private key material (there is none to hold), or answer a token that went
//! away with anything but [`KeyOpError::Unavailable`] (UNAVAILABLE at the edge, never a
//! decryption failure, which would read as DATA_LOSS).

use std::sync::{Arc, Mutex, PoisonError};

use tokenvault_pkcs11::{FoundKey, Token, TokenError};

use super::{KeyError, KeyId, KeyOpError, OAEP_LABEL, PublicKey, Unwrapper};
use crate::secret::{DATA_KEY_LEN, DataKey};

/// The label of a version's token objects.
pub fn object_label(version: u32) -> String {
    format!("tokenvault v{version:04}")
}

/// A token error as a keyring error.
pub fn key_error(e: TokenError) -> KeyError {
    match e {
        TokenError::Unavailable(reason) => KeyError::TokenUnavailable(reason),
        e => KeyError::Token(e.to_string()),
    }
}

/// The public key of an RSA modulus and exponent read from the token.
pub fn public_key(modulus: &[u8], exponent: &[u8]) -> Result<PublicKey, KeyError> {
    PublicKey::from_rsa_parts(modulus, exponent)
}

/// A private key in the token, found by its fingerprint.
pub struct TokenKey {
    token: Arc<Token>,
    public: PublicKey,
    /// The object handle, found again if the token forgot it (after a reconnect).
    handle: Mutex<tokenvault_pkcs11::ObjectHandle>,
}

impl std::fmt::Debug for TokenKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TokenKey")
            .field("id", &self.public.id())
            .finish_non_exhaustive()
    }
}

impl TokenKey {
    /// The key with fingerprint `id` in `token`, if the token has it; refused if the token's
    /// key is not the one the fingerprint names.
    pub fn find(token: &Arc<Token>, id: &KeyId) -> Result<Option<Self>, KeyError> {
        let Some(FoundKey {
            handle,
            modulus,
            public_exponent,
        }) = token.find(&id.0).map_err(key_error)?
        else {
            return Ok(None);
        };
        let public = public_key(&modulus, &public_exponent)?;
        if public.id() != *id {
            return Err(KeyError::Token(format!(
                "the token object with id {} holds another key ({})",
                id.to_hex(),
                public.id().to_hex()
            )));
        }
        Ok(Some(Self {
            token: Arc::clone(token),
            public,
            handle: Mutex::new(handle),
        }))
    }

    /// The matching public key.
    pub fn public_key(&self) -> &PublicKey {
        &self.public
    }
}

impl Unwrapper for TokenKey {
    fn key_id(&self) -> KeyId {
        self.public.id()
    }

    fn scheme(&self) -> super::Scheme {
        // A token holds RSA keys only (docs/KEY_CUSTODY.md): X-Wing is not a PKCS#11 mechanism.
        super::Scheme::RsaOaep
    }

    fn unwrap_dek(&self, wrapped: &[u8]) -> Result<DataKey, KeyOpError> {
        let handle = *self.handle.lock().unwrap_or_else(PoisonError::into_inner);
        let plain = match self.token.decrypt_oaep_sha256(handle, wrapped, OAEP_LABEL) {
            // The handle went stale (the token was reconnected): find the key again, once.
            Err(TokenError::NotFound(_)) => {
                let found = match self.token.find(&self.public.id().0) {
                    Ok(Some(found)) => found,
                    Ok(None) => return Err(KeyOpError::Unavailable),
                    Err(_) => return Err(KeyOpError::Unavailable),
                };
                *self.handle.lock().unwrap_or_else(PoisonError::into_inner) = found.handle;
                self.token
                    .decrypt_oaep_sha256(found.handle, wrapped, OAEP_LABEL)
            }
            other => other,
        };
        match plain {
            Ok(plain) if plain.len() == DATA_KEY_LEN => {
                DataKey::from_slice(&plain).ok_or(KeyOpError::Unwrap)
            }
            Ok(_) | Err(TokenError::DecryptionFailed) => Err(KeyOpError::Unwrap),
            Err(_) => Err(KeyOpError::Unavailable),
        }
    }
}
