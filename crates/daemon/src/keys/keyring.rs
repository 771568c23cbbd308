//! The daemon's keyring: every key version with its state, and the private keys it may use.
//!
//! Owns: [`Keyring`] (in-memory, looked up by fingerprint on every open), [`KeyDir`] (the key
//! file directory: `v0001.key.pem`, 0600, and `v0001.pub.pem`, or, for daemons sharing one
//! database, the store through [`SharedKeys`], always encrypted under the passphrase) and the
//! operations that add key versions (`rotation::init`, `rotation::add_version`). The public facts
//! of each version live in the store's key registry; private keys live only in key files (or
//! encrypted in the shared store) and process memory.
//!
//! Invariant: exactly one version is active; adding a version makes it active and demotes the
//! previous active version to decrypt-only in one atomic registry write.

use std::collections::{BTreeMap, HashMap};
use std::io::Write as _;
use std::os::unix::fs::{OpenOptionsExt as _, PermissionsExt as _};
use std::path::{Path, PathBuf};

use super::KeyLookupError;
use super::{
    KeyError, KeyId, KeyInfo, KeyState, LoadedKey, NewKey, PrivateKey, PublicKey, Unwrapper,
    UnwrapperLookup,
};
use crate::secret::Passphrase;

/// Private keys kept in a store several daemons share: one encrypted private key per version
/// (sealed under a key-encryption key derived from the passphrase, [`PrivateKey::seal_with`];
/// versions stored by older releases are passphrase-encrypted PKCS#8 PEM, still read).
/// Implemented over the `TokenStore` (this module does not know the store).
pub trait SharedKeys: Send + Sync + std::fmt::Debug {
    /// The stored bytes of `version`, if any.
    fn get(&self, version: u32) -> Result<Option<Vec<u8>>, KeyError>;
    /// Stores the bytes of `version` unless some are there already (another daemon claimed
    /// the version first); whether they were stored.
    fn claim(&self, version: u32, bytes: &[u8]) -> Result<bool, KeyError>;
    /// Deletes the bytes of `version`; already absent is fine.
    fn erase(&self, version: u32) -> Result<(), KeyError>;
    /// The salt of the key-encryption key: 16 random bytes, created (when `create`) once by the
    /// first daemon that stores a key (atomically, so every daemon derives the same key). A
    /// read never creates it: a start that only loads keys writes nothing.
    fn kek_salt(&self, create: bool) -> Result<Option<Vec<u8>>, KeyError>;
}

/// scrypt cost of the shared store's key-encryption key: N = 2^17, r = 8, p = 1, the cost of
/// the PBES2 key files (`pkcs8`'s default), so a copy of the database gives no cheaper guess
/// at the passphrase than a key file does. Paid once per process, not once per key.
const KEK_LOG_N: u8 = 17;

/// A shared store's private keys and the key-encryption key derived for them (once: the
/// slot is filled by the first read or write and kept, cloned [`KeyDir`]s included).
struct Shared {
    keys: std::sync::Arc<dyn SharedKeys>,
    kek: std::sync::Mutex<Option<std::sync::Arc<zeroize::Zeroizing<[u8; 32]>>>>,
}

impl std::fmt::Debug for Shared {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Shared").finish_non_exhaustive()
    }
}

/// Where the private keys are (a key directory, or the shared store), and the passphrase
/// protecting them; with a PKCS#11 token, new versions are generated in the token and a
/// version's key is looked for there first (by its fingerprint), so versions created before a
/// move to the token still load from their files.
#[derive(Debug, Clone)]
pub struct KeyDir {
    path: PathBuf,
    passphrase: Option<Passphrase>,
    shared: Option<std::sync::Arc<Shared>>,
    token: Option<std::sync::Arc<tokenvault_pkcs11::Token>>,
}

/// A new key ready to write under any version ([`KeyDir::prepare`]): a private key encoded for
/// its key directory (encrypted with the passphrase if there is one) and its public key, or a
/// token key pair to name.
pub struct KeyFile(Prepared);

enum Prepared {
    Bytes {
        private: zeroize::Zeroizing<Vec<u8>>,
        public_pem: String,
    },
    Token {
        pair: tokenvault_pkcs11::NewKeyPair,
        id: KeyId,
    },
}

impl std::fmt::Debug for KeyFile {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KeyFile").finish_non_exhaustive()
    }
}

impl KeyDir {
    /// A key directory at `path`; key files are encrypted with `passphrase` when given.
    pub fn new(path: impl Into<PathBuf>, passphrase: Option<Passphrase>) -> Self {
        Self {
            path: path.into(),
            passphrase,
            shared: None,
            token: None,
        }
    }

    /// The same key directory with new versions generated in `token`.
    pub fn with_token(mut self, token: std::sync::Arc<tokenvault_pkcs11::Token>) -> Self {
        self.token = Some(token);
        self
    }

    /// The PKCS#11 token new versions are generated in, if any.
    pub fn token(&self) -> Option<&std::sync::Arc<tokenvault_pkcs11::Token>> {
        self.token.as_ref()
    }

    /// The key pair labelled `label` in the token, for a new version (refused unless it can
    /// never leave the token).
    pub fn import_from_token(&self, label: &str) -> Result<NewKey, KeyError> {
        let token = self
            .token
            .as_ref()
            .ok_or_else(|| KeyError::Token("no token: set [keys] backend = \"pkcs11\"".into()))?;
        let pair = token
            .find_labelled(label)
            .map_err(super::token::key_error)?;
        let public = super::token::public_key(&pair.modulus, &pair.public_exponent)?;
        Ok(NewKey::Token { pair, public })
    }

    /// The algorithm of a rotation that names none, after an active version of `active`:
    /// X-Wing stays X-Wing; RSA stays RSA of the same size, or RSA-2048 in a PKCS#11 token
    /// (whose generation is fixed at 2048 bits) and for an imported size that is not 2048,
    /// 3072 or 4096 bits.
    pub fn rotation_algorithm(&self, active: super::Algorithm) -> super::Algorithm {
        use super::Algorithm;
        match active {
            Algorithm::XWing => Algorithm::XWing,
            Algorithm::Rsa(bits @ (3072 | 4096)) if self.token.is_none() => Algorithm::Rsa(bits),
            Algorithm::Rsa(_) => Algorithm::Rsa(2048),
        }
    }

    /// A fresh key of `algorithm` for a new version: generated in the token if there is one
    /// (RSA-2048 only: a token holds no X-Wing key, and its RSA generation is fixed at 2048
    /// bits), otherwise in memory (RSA with aws-lc, X-Wing from the OS CSPRNG).
    pub fn generate(&self, algorithm: super::Algorithm) -> Result<NewKey, KeyError> {
        match &self.token {
            Some(_) if algorithm != super::Algorithm::Rsa(2048) => Err(KeyError::Token(format!(
                "[keys] backend = \"pkcs11\" generates rsa-2048 keys only, not {algorithm}: a \
                 PKCS#11 token holds no X-Wing key (docs/KEY_CUSTODY.md)"
            ))),
            Some(token) => {
                let pair = token.generate_rsa_2048().map_err(super::token::key_error)?;
                let public = super::token::public_key(&pair.modulus, &pair.public_exponent)?;
                Ok(NewKey::Token { pair, public })
            }
            None => Ok(NewKey::Memory(PrivateKey::generate_with(algorithm)?)),
        }
    }

    /// Private keys in a shared store, encrypted with `passphrase` (required: a key never
    /// reaches a shared database in the clear). `path` still holds the local files a daemon
    /// keeps (the TLS files, nothing secret about the vault's keys).
    pub fn shared(
        path: impl Into<PathBuf>,
        passphrase: Passphrase,
        keys: std::sync::Arc<dyn SharedKeys>,
    ) -> Self {
        Self {
            path: path.into(),
            passphrase: Some(passphrase),
            shared: Some(std::sync::Arc::new(Shared {
                keys,
                kek: std::sync::Mutex::new(None),
            })),
            token: None,
        }
    }

    /// The shared store's key-encryption key: derived from the passphrase and the store's salt
    /// on first use (scrypt, [`KEK_LOG_N`]), then kept. Callers arriving meanwhile wait for
    /// that one derivation.
    fn kek(
        &self,
        shared: &Shared,
        create: bool,
    ) -> Result<std::sync::Arc<zeroize::Zeroizing<[u8; 32]>>, KeyError> {
        let mut slot = shared
            .kek
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if let Some(kek) = &*slot {
            return Ok(std::sync::Arc::clone(kek));
        }
        let passphrase = self
            .passphrase
            .as_ref()
            .ok_or(KeyError::PassphraseRequired(
                super::passphrase_hint::KEY_DIR,
            ))?;
        let salt = shared.keys.kek_salt(create)?.ok_or_else(|| {
            KeyError::Store(
                "the store holds sealed private keys but not their salt (private_key_kek_salt)"
                    .into(),
            )
        })?;
        let mut kek = zeroize::Zeroizing::new([0u8; 32]);
        let params = scrypt::Params::new(KEK_LOG_N, 8, 1, 32).map_err(|_| KeyError::Generation)?;
        scrypt::scrypt(
            passphrase.expose_secret().as_bytes(),
            &salt,
            &params,
            &mut kek[..],
        )
        .map_err(|_| KeyError::Generation)?;
        let kek = std::sync::Arc::new(kek);
        *slot = Some(std::sync::Arc::clone(&kek));
        Ok(kek)
    }

    /// Whether the private keys are in a shared store.
    pub fn is_shared(&self) -> bool {
        self.shared.is_some()
    }

    /// The passphrase protecting the keys, if any.
    pub fn passphrase(&self) -> Option<&Passphrase> {
        self.passphrase.as_ref()
    }

    /// Where a version's private key is, for messages.
    fn location(&self, version: u32) -> PathBuf {
        match &self.shared {
            Some(_) => PathBuf::from(format!("shared store: private key v{version}")),
            None => self.private_path(version),
        }
    }

    /// The directory.
    pub fn path(&self) -> &Path {
        &self.path
    }

    fn private_path(&self, version: u32) -> PathBuf {
        self.path.join(format!("v{version:04}.key.pem"))
    }

    fn public_path(&self, version: u32) -> PathBuf {
        self.path.join(format!("v{version:04}.pub.pem"))
    }

    /// Writes a version's key files: the private key 0600 (encrypted if a passphrase is set),
    /// the public key 0644. Writes go to a temporary file that is renamed into place.
    pub fn write(&self, version: u32, key: &PrivateKey) -> Result<(), KeyError> {
        let file = self.prepare_memory(key)?;
        self.write_prepared(version, &file)
    }

    /// The slow part of [`KeyDir::write`] (the passphrase's scrypt), which does not depend on
    /// the version: done before the version is chosen, so a rotation holds the audit trail's
    /// write order only for the writes themselves.
    pub fn prepare(&self, key: &NewKey) -> Result<KeyFile, KeyError> {
        match key {
            NewKey::Memory(key) => self.prepare_memory(key),
            NewKey::Token { pair, public } => Ok(KeyFile(Prepared::Token {
                pair: pair.clone(),
                id: public.id(),
            })),
        }
    }

    fn prepare_memory(&self, key: &PrivateKey) -> Result<KeyFile, KeyError> {
        let private = match &self.shared {
            Some(shared) => key.seal_with(&**self.kek(shared, true)?)?,
            None => {
                let pem = key.to_pkcs8_pem(self.passphrase.as_ref())?;
                zeroize::Zeroizing::new(pem.as_bytes().to_vec())
            }
        };
        Ok(KeyFile(Prepared::Bytes {
            private,
            public_pem: key.public_key().to_pem(),
        }))
    }

    /// Writes a key prepared by [`KeyDir::prepare`] as `version`.
    /// A token key pair is named for the version instead (`CKA_ID` its fingerprint,
    /// `CKA_LABEL` `tokenvault v0001`); nothing is written outside the token.
    pub fn write_prepared(&self, version: u32, file: &KeyFile) -> Result<(), KeyError> {
        let (private, public_pem) = match &file.0 {
            Prepared::Bytes {
                private,
                public_pem,
            } => (private, public_pem),
            Prepared::Token { pair, id } => {
                let token = self.token.as_ref().ok_or_else(|| {
                    KeyError::Token("a token key without a configured token".into())
                })?;
                return token
                    .name(pair, &id.0, &super::token::object_label(version))
                    .map_err(super::token::key_error);
            }
        };
        if let Some(shared) = &self.shared {
            return if shared.keys.claim(version, private)? {
                Ok(())
            } else {
                Err(KeyError::VersionTaken(version))
            };
        }
        let io = |path: &Path| {
            let path = path.to_path_buf();
            move |source| KeyError::Io { path, source }
        };
        std::fs::create_dir_all(&self.path).map_err(io(&self.path))?;
        write_atomic(&self.private_path(version), private, 0o600)
            .map_err(io(&self.private_path(version)))?;
        write_atomic(&self.public_path(version), public_pem.as_bytes(), 0o644)
            .map_err(io(&self.public_path(version)))
    }

    /// Whether any private key material of `info` is left: its file, its shared store row or
    /// its token objects (a token that cannot be asked counts as holding it).
    pub fn holds(&self, info: &KeyInfo) -> bool {
        if self.has_private(info.version) {
            return true;
        }
        match &self.token {
            Some(token) => !matches!(token.find(&info.id.0), Ok(None)),
            None => false,
        }
    }

    /// Whether the private key of `version` exists.
    pub fn has_private(&self, version: u32) -> bool {
        match &self.shared {
            Some(shared) => !matches!(shared.keys.get(version), Ok(None)),
            None => self.private_path(version).exists(),
        }
    }

    /// Erases the private key file of `version`: overwritten with zeros and synced, then
    /// unlinked. Already absent is fine. (On copy-on-write or journaling file systems and SSDs
    /// an overwrite cannot guarantee the old blocks are gone; encrypt key files with a
    /// passphrase so their remains are useless.)
    ///
    /// With a token, the token's key pair of `id` is destroyed too (and checked gone).
    pub fn erase(&self, version: u32, id: &KeyId) -> Result<(), KeyError> {
        if let Some(token) = &self.token {
            token.destroy(&id.0).map_err(super::token::key_error)?;
        }
        if let Some(shared) = &self.shared {
            return shared.keys.erase(version);
        }
        let path = self.private_path(version);
        let io = |source| KeyError::Io {
            path: path.clone(),
            source,
        };
        let len = match std::fs::metadata(&path) {
            Ok(m) => m.len(),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
            Err(e) => return Err(io(e)),
        };
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .open(&path)
            .map_err(io)?;
        let zeros = vec![0u8; usize::try_from(len).unwrap_or(0)];
        f.write_all(&zeros)
            .and_then(|()| f.sync_all())
            .map_err(io)?;
        drop(f);
        std::fs::remove_file(&path).map_err(io)?;
        if let Some(dir) = path.parent() {
            std::fs::File::open(dir)
                .and_then(|d| d.sync_all())
                .map_err(io)?;
        }
        Ok(())
    }

    /// The private key of `info`: in the token if the token has the fingerprint, otherwise
    /// read from its file or the shared store ([`KeyDir::read`]).
    pub fn load(&self, info: &KeyInfo) -> Result<LoadedKey, KeyError> {
        if let Some(token) = &self.token
            && let Some(key) = super::token::TokenKey::find(token, &info.id)?
        {
            return Ok(LoadedKey::Token(key));
        }
        if self.token.is_some() && !self.has_private(info.version) {
            return Err(KeyError::Token(format!(
                "key version {} ({}) is neither in the token nor at {}",
                info.version,
                info.id.to_hex(),
                self.location(info.version).display()
            )));
        }
        self.read(info.version).map(LoadedKey::Memory)
    }

    /// Reads a version's private key, refusing files readable by group or others.
    pub fn read(&self, version: u32) -> Result<PrivateKey, KeyError> {
        if let Some(shared) = &self.shared {
            let stored = zeroize::Zeroizing::new(
                shared
                    .keys
                    .get(version)?
                    .ok_or(KeyError::UnknownVersion(version))?,
            );
            if PrivateKey::is_sealed(&stored) {
                return PrivateKey::open_sealed(&stored, &**self.kek(shared, false)?);
            }
            // Stored by an older release: passphrase-encrypted PKCS#8 PEM (scrypt per key).
            let pem = zeroize::Zeroizing::new(String::from_utf8_lossy(&stored).into_owned());
            return PrivateKey::from_pem(&pem, self.passphrase.as_ref())
                .map_err(|e| e.with_passphrase_hint(super::passphrase_hint::KEY_DIR));
        }
        let path = self.private_path(version);
        let io = |source| KeyError::Io {
            path: path.clone(),
            source,
        };
        let mode = std::fs::metadata(&path).map_err(io)?.permissions().mode();
        if mode & 0o077 != 0 {
            return Err(KeyError::InsecurePermissions {
                path,
                mode: mode & 0o777,
            });
        }
        let pem = zeroize::Zeroizing::new(std::fs::read_to_string(&path).map_err(io)?);
        PrivateKey::from_pem(&pem, self.passphrase.as_ref())
            .map_err(|e| e.with_passphrase_hint(super::passphrase_hint::KEY_DIR))
    }
}

fn write_atomic(path: &Path, bytes: &[u8], mode: u32) -> std::io::Result<()> {
    let tmp = path.with_extension("tmp");
    let _ = std::fs::remove_file(&tmp);
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(&tmp)?;
    f.write_all(bytes)?;
    f.sync_all()?;
    std::fs::rename(&tmp, path)?;
    if let Some(dir) = path.parent() {
        std::fs::File::open(dir)?.sync_all()?;
    }
    Ok(())
}

struct Slot {
    info: KeyInfo,
    public: PublicKey,
    /// Shared with the keyring a reload builds, so a reload reads only new versions' keys.
    private: Option<std::sync::Arc<LoadedKey>>,
}

/// Every key version, with private keys for those that may still open envelopes.
pub struct Keyring {
    slots: BTreeMap<u32, Slot>,
    by_id: HashMap<KeyId, u32>,
    active: u32,
    min_version: u32,
}

impl std::fmt::Debug for Keyring {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Keyring")
            .field("versions", &self.slots.keys().collect::<Vec<_>>())
            .field("active", &self.active)
            .finish_non_exhaustive()
    }
}

impl Keyring {
    /// Builds the keyring from registry entries, loading the private key of every active and
    /// decrypt-only version from `dir` and checking it matches the registered fingerprint.
    pub fn load(infos: Vec<KeyInfo>, dir: &KeyDir) -> Result<Self, KeyError> {
        Self::build(infos, dir, None)
    }

    /// Like [`Keyring::load`] after a change to the registry, keeping this keyring's private
    /// keys for the versions it has loaded already (same version, same fingerprint): only a
    /// version it does not hold yet is read and decrypted (a passphrase's scrypt costs a
    /// noticeable fraction of a second per key), so a rotation costs one key's decryption, not
    /// one per live version. The minimum decryption version carries over.
    pub fn reload(&self, infos: Vec<KeyInfo>, dir: &KeyDir) -> Result<Self, KeyError> {
        Ok(Self::build(infos, dir, Some(self))?.with_min_version(self.min_version))
    }

    fn build(
        infos: Vec<KeyInfo>,
        dir: &KeyDir,
        previous: Option<&Keyring>,
    ) -> Result<Self, KeyError> {
        let mut slots = BTreeMap::new();
        let mut by_id = HashMap::new();
        let mut active = None;
        for info in infos {
            let public = PublicKey::from_spki_der(&info.spki_der)?;
            let loaded = previous
                .and_then(|p| p.slots.get(&info.version))
                .filter(|slot| slot.info.id == info.id)
                .and_then(|slot| slot.private.clone());
            let private = match (info.state.accepts_envelopes(), loaded) {
                (false, _) => None,
                (true, Some(key)) => Some(key),
                (true, None) => {
                    let key = dir.load(&info).map_err(|e| match e {
                        // Already names the file, or the token.
                        e @ (KeyError::Io { .. }
                        | KeyError::InsecurePermissions { .. }
                        | KeyError::Token(_)
                        | KeyError::TokenUnavailable(_)) => e,
                        e => KeyError::At {
                            location: dir.location(info.version),
                            error: Box::new(e),
                        },
                    })?;
                    if key.public_key().id() != info.id || public.id() != info.id {
                        return Err(KeyError::Mismatch {
                            path: dir.location(info.version),
                            version: info.version,
                            expected: info.id.to_hex(),
                        });
                    }
                    Some(std::sync::Arc::new(key))
                }
            };
            if info.state == KeyState::Active {
                active = Some(info.version);
            }
            by_id.insert(info.id, info.version);
            slots.insert(
                info.version,
                Slot {
                    info,
                    public,
                    private,
                },
            );
        }
        let active = active.ok_or(KeyError::NoActiveKey)?;
        Ok(Self {
            slots,
            by_id,
            active,
            min_version: 0,
        })
    }

    /// A keyring of one active version holding `key`, with no files or store behind it: for
    /// fuzzing and tests only.
    #[cfg(any(test, fuzzing))]
    pub fn single(key: PrivateKey) -> Self {
        let info = KeyInfo {
            version: 1,
            id: key.public_key().id(),
            state: KeyState::Active,
            created_at: 0,
            updated_at: 0,
            spki_der: key.public_key().spki_der().to_vec(),
            destroy_after: None,
        };
        let public = key.public_key().clone();
        let mut by_id = HashMap::new();
        by_id.insert(info.id, 1);
        let mut slots = BTreeMap::new();
        slots.insert(
            1,
            Slot {
                info,
                public,
                private: Some(std::sync::Arc::new(LoadedKey::Memory(key))),
            },
        );
        Self {
            slots,
            by_id,
            active: 1,
            min_version: 0,
        }
    }

    /// Refuses to open anything wrapped under a version below `min`, even if its key is still
    /// present.
    pub fn with_min_version(mut self, min: u32) -> Self {
        self.min_version = min;
        self
    }

    /// The minimum decryption version (0: none).
    pub fn min_version(&self) -> u32 {
        self.min_version
    }

    /// The active version: the one new envelopes must be sealed under.
    pub fn active(&self) -> (&KeyInfo, &PublicKey) {
        let slot = &self.slots[&self.active];
        (&slot.info, &slot.public)
    }

    /// The registry entry of the key with fingerprint `id`.
    pub fn info(&self, id: &KeyId) -> Option<&KeyInfo> {
        self.by_id.get(id).map(|v| &self.slots[v].info)
    }

    /// The registry entry and public key of the key with fingerprint `id`.
    pub fn public(&self, id: &KeyId) -> Option<(&KeyInfo, &PublicKey)> {
        self.by_id
            .get(id)
            .map(|v| (&self.slots[v].info, &self.slots[v].public))
    }

    /// Every version, ascending.
    pub fn infos(&self) -> impl Iterator<Item = &KeyInfo> {
        self.slots.values().map(|s| &s.info)
    }
}

impl UnwrapperLookup for Keyring {
    fn unwrapper(&self, id: &KeyId) -> Result<&dyn Unwrapper, KeyLookupError> {
        let version = self.by_id.get(id).ok_or(KeyLookupError::UnknownKey(*id))?;
        if *version < self.min_version {
            return Err(KeyLookupError::BelowMinimum {
                version: *version,
                minimum: self.min_version,
            });
        }
        let slot = &self.slots[version];
        match (&slot.private, slot.info.state.accepts_envelopes()) {
            (Some(key), true) => Ok(&**key),
            _ => Err(KeyLookupError::KeyUnavailable {
                version: *version,
                state: slot.info.state,
            }),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::envelope;
    use crate::record::{RecordMeta, SecretKind};
    use crate::rotation::{add_version, init};
    use crate::secret::Secret;
    use crate::store::{MemoryStore, prelude::*};

    #[test]
    fn a_rotation_without_an_algorithm_follows_the_active_version() {
        use crate::keys::Algorithm::{Rsa, XWing};
        let files = KeyDir::new("/nonexistent", None);
        for (active, next) in [
            (XWing, XWing),
            (Rsa(2048), Rsa(2048)),
            (Rsa(3072), Rsa(3072)),
            (Rsa(4096), Rsa(4096)),
            // An imported size that is not generated falls back to the default.
            (Rsa(2560), Rsa(2048)),
        ] {
            assert_eq!(files.rotation_algorithm(active), next, "{active:?}");
        }
    }

    /// A shared store's keys over a real [`crate::vault::StoreKeys`], counting salt reads.
    #[derive(Debug)]
    struct Counting {
        inner: crate::vault::StoreKeys,
        salt_reads: std::sync::atomic::AtomicUsize,
    }

    impl SharedKeys for Counting {
        fn get(&self, version: u32) -> Result<Option<Vec<u8>>, KeyError> {
            self.inner.get(version)
        }
        fn claim(&self, version: u32, bytes: &[u8]) -> Result<bool, KeyError> {
            self.inner.claim(version, bytes)
        }
        fn erase(&self, version: u32) -> Result<(), KeyError> {
            self.inner.erase(version)
        }
        fn kek_salt(&self, create: bool) -> Result<Option<Vec<u8>>, KeyError> {
            self.salt_reads
                .fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            self.inner.kek_salt(create)
        }
    }

    #[test]
    fn shared_keys_are_sealed_under_one_key_encryption_key_derived_once() {
        let store: std::sync::Arc<dyn crate::store::TokenStore> =
            std::sync::Arc::new(MemoryStore::new());
        let keys = std::sync::Arc::new(Counting {
            inner: crate::vault::StoreKeys(std::sync::Arc::clone(&store)),
            salt_reads: 0.into(),
        });
        let pass = || Passphrase::new("correct horse".to_string());
        let a = KeyDir::shared("unused", pass(), keys.clone());
        let k1 = PrivateKey::generate().expect("generate");
        let k2 = PrivateKey::generate().expect("generate");
        a.write(1, &k1).expect("write v1");
        // A clone (what the vault and its jobs hold) shares the derived key.
        a.clone().write(2, &k2).expect("write v2");
        let stored = store
            .get_meta("private_key/v0001")
            .expect("meta")
            .expect("row");
        assert!(PrivateKey::is_sealed(&stored), "sealed, not PEM");
        let plain = k1.to_pkcs8_pem(None).expect("pem");
        assert!(
            !stored
                .windows(16)
                .any(|w| plain.as_bytes().windows(16).any(|p| p == w)),
            "no plaintext in the row"
        );
        for _ in 0..3 {
            assert_eq!(
                a.read(1).expect("v1").public_key().id(),
                k1.public_key().id()
            );
            assert_eq!(
                a.read(2).expect("v2").public_key().id(),
                k2.public_key().id()
            );
        }
        assert_eq!(
            keys.salt_reads.load(std::sync::atomic::Ordering::SeqCst),
            1,
            "the key-encryption key is derived once, not per key or per read"
        );
        // Another daemon with the same passphrase reads them; one with another does not.
        let b = KeyDir::shared("unused", pass(), keys.clone());
        assert_eq!(
            b.read(2).expect("b reads v2").public_key().id(),
            k2.public_key().id()
        );
        let wrong = KeyDir::shared("unused", Passphrase::new("wrong".to_string()), keys.clone());
        assert!(matches!(wrong.read(1), Err(KeyError::WrongPassphrase)));
        // An altered row is refused the same way, and a short one as malformed.
        let mut tampered = stored.clone();
        let last = tampered.len() - 1;
        tampered[last] ^= 1;
        store
            .put_meta("private_key/v0001", Some(&tampered))
            .expect("tamper");
        assert!(matches!(a.read(1), Err(KeyError::WrongPassphrase)));
        store
            .put_meta("private_key/v0001", Some(b"TVK1short"))
            .expect("truncate");
        assert!(matches!(a.read(1), Err(KeyError::Malformed { .. })));
        // A version stored by an older release (passphrase-encrypted PKCS#8 PEM) still reads.
        let old = k1.to_pkcs8_pem(Some(&pass())).expect("pbes2");
        store
            .put_meta("private_key/v0001", Some(old.as_bytes()))
            .expect("old format");
        assert_eq!(
            a.read(1).expect("old v1").public_key().id(),
            k1.public_key().id()
        );
        // Reading never creates the salt: without it, a sealed key is refused, naming it.
        let store2: std::sync::Arc<dyn crate::store::TokenStore> =
            std::sync::Arc::new(MemoryStore::new());
        store2
            .put_meta("private_key/v0001", Some(&stored))
            .expect("row without salt");
        let c = KeyDir::shared(
            "unused",
            pass(),
            std::sync::Arc::new(crate::vault::StoreKeys(std::sync::Arc::clone(&store2))),
        );
        let e = c.read(1).expect_err("no salt");
        assert!(e.to_string().contains("private_key_kek_salt"), "{e}");
        assert_eq!(store2.get_meta("private_key_kek_salt"), Ok(None));
    }

    #[test]
    fn a_reload_reads_only_the_versions_it_has_not_loaded() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let dir = KeyDir::new(tmp.path(), None);
        let store = MemoryStore::new();
        init(&store, &dir, 10).expect("init");
        let ring1 = Keyring::load(store.keys().expect("keys"), &dir)
            .expect("load")
            .with_min_version(1);
        let meta = RecordMeta::parse("r", "o", "p", SecretKind::ApiKey, &[], 0).expect("valid");
        let old =
            envelope::seal(&meta, &Secret::new(b"s1".to_vec()), ring1.active().1).expect("seal");
        // v1's file becomes unreadable: a reload that read it again would fail.
        std::fs::write(tmp.path().join("v0001.key.pem"), b"not a key").expect("spoil v1");
        add_version(&store, &dir, PrivateKey::generate().expect("gen"), 20).expect("rotate");
        let ring2 = ring1
            .reload(store.keys().expect("keys"), &dir)
            .expect("reload reads only v2");
        assert_eq!(ring2.active().0.version, 2);
        assert_eq!(ring2.min_version(), 1);
        assert_eq!(
            envelope::open(&meta, &old, &ring2)
                .expect("v1 still opens from the kept key")
                .expose_secret(),
            b"s1"
        );
        // A fresh load does read every version, and so fails on the spoiled file.
        assert!(Keyring::load(store.keys().expect("keys"), &dir).is_err());
    }

    #[test]
    fn rotation_keeps_old_records_readable_and_seals_under_the_new_key() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let dir = KeyDir::new(tmp.path(), None);
        let store = MemoryStore::new();
        let v1 = init(&store, &dir, 10).expect("init");
        assert!(matches!(
            init(&store, &dir, 11),
            Err(KeyError::AlreadyInitialized(1))
        ));
        let ring1 = Keyring::load(store.keys().expect("keys"), &dir).expect("load");
        let meta = RecordMeta::parse("r", "o", "p", SecretKind::ApiKey, &[], 0).expect("valid");
        let old =
            envelope::seal(&meta, &Secret::new(b"s1".to_vec()), ring1.active().1).expect("seal");

        let v2 =
            add_version(&store, &dir, PrivateKey::generate().expect("gen"), 20).expect("rotate");
        assert_eq!(v2.version, 2);
        let ring = Keyring::load(store.keys().expect("keys"), &dir).expect("load");
        assert_eq!(ring.active().0.version, 2);
        assert_eq!(ring.info(&v1.id).expect("v1").state, KeyState::DecryptOnly);
        assert_eq!(ring.info(&v1.id).expect("v1").updated_at, 20);
        assert_eq!(
            envelope::open(&meta, &old, &ring)
                .expect("old opens")
                .expose_secret(),
            b"s1"
        );
        let mode = std::fs::metadata(tmp.path().join("v0002.key.pem"))
            .expect("file")
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
    }

    #[test]
    fn loading_refuses_readable_key_files_and_mismatched_keys() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let dir = KeyDir::new(tmp.path(), None);
        let store = MemoryStore::new();
        init(&store, &dir, 1).expect("init");
        let path = tmp.path().join("v0001.key.pem");
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).expect("chmod");
        let err = Keyring::load(store.keys().expect("keys"), &dir).expect_err("insecure");
        assert!(
            matches!(err, KeyError::InsecurePermissions { mode: 0o644, .. }),
            "{err}"
        );
        // Replace the file with another key: the fingerprint check catches it.
        std::fs::remove_file(&path).expect("rm");
        let other = KeyDir::new(tmp.path(), None);
        other
            .write(1, &PrivateKey::generate().expect("gen"))
            .expect("write");
        let err = Keyring::load(store.keys().expect("keys"), &dir).expect_err("mismatch");
        assert!(
            matches!(err, KeyError::Mismatch { version: 1, .. }),
            "{err}"
        );
    }

    #[test]
    fn passphrase_protected_key_files() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let pass = Passphrase::new("correct horse".into());
        let dir = KeyDir::new(tmp.path(), Some(pass));
        let store = MemoryStore::new();
        init(&store, &dir, 1).expect("init");
        let pem = std::fs::read_to_string(tmp.path().join("v0001.key.pem")).expect("read");
        assert!(pem.starts_with("-----BEGIN ENCRYPTED PRIVATE KEY-----"));
        assert!(Keyring::load(store.keys().expect("keys"), &dir).is_ok());
        let wrong = KeyDir::new(tmp.path(), Some(Passphrase::new("wrong".into())));
        let err = Keyring::load(store.keys().expect("keys"), &wrong).expect_err("wrong");
        assert!(matches!(err.cause(), KeyError::WrongPassphrase));
        assert!(err.to_string().contains("v0001.key.pem"), "{err}");
        let none = KeyDir::new(tmp.path(), None);
        let err = Keyring::load(store.keys().expect("keys"), &none).expect_err("no passphrase");
        assert!(matches!(err.cause(), KeyError::PassphraseRequired(_)));
        assert_eq!(
            err.to_string(),
            format!(
                "{}: private key is encrypted: set TOKENVAULT_KEY_PASSPHRASE or \
                 TOKENVAULT_KEY_PASSPHRASE_FILE, or passphrase_file in the config",
                tmp.path().join("v0001.key.pem").display()
            )
        );
    }
}
