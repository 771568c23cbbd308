//! The keyring's [`SharedKeys`] over a store: how daemons sharing a database share private
//! keys. Lives on the daemon's side of the store crate's boundary because the store never sees
//! private-key code (it holds these PEMs as opaque, passphrase-encrypted metadata values).

use std::sync::Arc;

use crate::keys::KeyError;
use crate::keys::keyring::SharedKeys;
use crate::store::{StoreError, TokenStore};

/// Private keys kept in the store (daemons sharing a database): one passphrase-encrypted PKCS#8
/// PEM per version, in metadata. The keyring never sees the store; it sees [`SharedKeys`].
#[derive(Debug, Clone)]
pub struct StoreKeys(pub Arc<dyn TokenStore>);

fn private_key_meta(version: u32) -> String {
    format!("private_key/v{version:04}")
}

impl SharedKeys for StoreKeys {
    fn get(&self, version: u32) -> Result<Option<Vec<u8>>, KeyError> {
        self.0
            .get_meta(&private_key_meta(version))
            .map_err(|e| KeyError::Store(e.to_string()))
    }

    fn claim(&self, version: u32, pem: &[u8]) -> Result<bool, KeyError> {
        self.0
            .put_meta_if_absent(&private_key_meta(version), pem)
            .map_err(|e| KeyError::Store(e.to_string()))
    }

    fn erase(&self, version: u32) -> Result<(), KeyError> {
        self.0
            .put_meta(&private_key_meta(version), None)
            .map_err(|e| KeyError::Store(e.to_string()))
    }

    fn kek_salt(&self, create: bool) -> Result<Option<Vec<u8>>, KeyError> {
        let store = |e: StoreError| KeyError::Store(e.to_string());
        let stored = self.0.get_meta(KEK_SALT_META).map_err(store)?;
        if stored.is_some() || !create {
            return Ok(stored);
        }
        let mut salt = [0u8; 16];
        rand::RngCore::fill_bytes(&mut rand::rngs::OsRng, &mut salt);
        // Two daemons creating it at once: the first one's is kept, and both read it.
        self.0
            .put_meta_if_absent(KEK_SALT_META, &salt)
            .map_err(store)?;
        self.0.get_meta(KEK_SALT_META).map_err(store)
    }
}

/// Store metadata key of the salt of the shared private keys' key-encryption key.
const KEK_SALT_META: &str = "private_key_kek_salt";
