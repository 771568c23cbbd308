//! tokenvault's PKCS#11 adapter: RSA private keys generated inside a token (an HSM, a cloud
//! HSM, or a software token in tests) and used there, never read out.
//!
//! Owns: [`Token`] (the loaded module, the chosen token, the user login and a pool of
//! sessions, reconnected after the token goes away) and the four things the vault asks of a
//! token: generate an RSA-2048 key pair, name it, decrypt with RSA-OAEP (SHA-256, MGF1-SHA-256,
//! a label) and destroy it. Keys are found by `CKA_ID`, which the vault sets to the key's
//! fingerprint, so the registry's fingerprint names the token object.
//!
//! Must never: ask for a private key's value (`CKA_VALUE`, its primes or exponent), create a
//! key that is extractable or not sensitive, share one session between threads (a session is
//! used by one caller at a time: checked out of the pool and returned), or put the PIN or a
//! decrypted data key in an error, a log line or `Debug` output.
//!
//! This crate knows nothing of envelopes or the keyring: it takes and returns bytes.

use std::path::PathBuf;
use std::sync::{Arc, Mutex, PoisonError};

use cryptoki::context::{CInitializeArgs, CInitializeFlags, Pkcs11};
use cryptoki::error::{Error as CkError, RvError};
use cryptoki::mechanism::rsa::{PkcsMgfType, PkcsOaepParams, PkcsOaepSource};
use cryptoki::mechanism::{Mechanism, MechanismType};
/// A token object handle (valid in this process).
pub use cryptoki::object::ObjectHandle;
use cryptoki::object::{Attribute, AttributeType, KeyType, ObjectClass};
use cryptoki::session::{Session, UserType};
use cryptoki::slot::Slot;
use cryptoki::types::AuthPin;
use zeroize::Zeroizing;

/// Which token of the module holds the keys.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TokenSelector {
    /// The token with this label (`CKA_LABEL` of the token, trailing blanks ignored).
    Label(String),
    /// The token in this slot id.
    Slot(u64),
}

impl std::fmt::Display for TokenSelector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Label(l) => write!(f, "token label {l:?}"),
            Self::Slot(s) => write!(f, "slot {s}"),
        }
    }
}

/// The token's user PIN. Zeroized on drop; `Debug` prints nothing of it.
#[derive(Clone)]
pub struct Pin(Zeroizing<String>);

impl Pin {
    /// Wraps a PIN (a trailing newline, as a PIN file has, is dropped).
    pub fn new(pin: String) -> Self {
        let mut pin = Zeroizing::new(pin);
        while pin.ends_with('\n') || pin.ends_with('\r') {
            pin.pop();
        }
        Self(pin)
    }

    fn auth(&self) -> AuthPin {
        AuthPin::new(self.0.as_str().into())
    }
}

impl std::fmt::Debug for Pin {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Pin(redacted)")
    }
}

/// Where the keys are: a module, a token in it, and the PIN to log in.
#[derive(Debug, Clone)]
pub struct TokenConfig {
    /// The PKCS#11 module (shared library) to load.
    pub module: PathBuf,
    /// Which token.
    pub token: TokenSelector,
    /// The user PIN.
    pub pin: Pin,
    /// Most sessions open at once (at least 1): calls beyond it wait for a session. A token's
    /// own limit on parallel operations goes here; opencryptoki's soft token needs 1 (its 3.8
    /// release crashes when two sessions use one key object at once).
    pub max_sessions: usize,
}

/// What went wrong with the token. Messages name the setting to fix where there is one and
/// never hold the PIN.
#[derive(Debug, thiserror::Error)]
pub enum TokenError {
    /// The module could not be loaded or initialised.
    #[error("PKCS#11 module {path}: {reason}")]
    Module {
        /// The module path.
        path: PathBuf,
        /// Why.
        reason: String,
    },
    /// No token matched the selector.
    #[error("no initialized PKCS#11 token with {selector} (tokens present: {present})")]
    NoToken {
        /// What was asked for.
        selector: TokenSelector,
        /// What there is, for the message.
        present: String,
    },
    /// The token refused the user PIN.
    #[error("the PKCS#11 token refused the user PIN ({0})")]
    Login(String),
    /// The token is not reachable now (removed, its daemon stopped, its sessions gone): worth
    /// retrying, and the next call reconnects.
    #[error("the PKCS#11 token is unavailable: {0}")]
    Unavailable(String),
    /// The decryption failed: wrong key, altered bytes or wrong label (one error).
    #[error("decryption failed")]
    DecryptionFailed,
    /// The token has no key with this id.
    #[error("the PKCS#11 token has no private key with id {0}")]
    NotFound(String),
    /// The token answered something else.
    #[error("the PKCS#11 token refused {operation}: {reason}")]
    Refused {
        /// What was asked.
        operation: &'static str,
        /// The token's answer.
        reason: String,
    },
}

/// Return values that mean the token, its daemon or our sessions went away: the session pool
/// is dropped and the next call opens new sessions (and logs in again).
fn is_gone(rv: RvError) -> bool {
    matches!(
        rv,
        RvError::DeviceRemoved
            | RvError::DeviceError
            | RvError::DeviceMemory
            | RvError::SessionHandleInvalid
            | RvError::SessionClosed
            | RvError::TokenNotPresent
            | RvError::TokenNotRecognized
            | RvError::CryptokiNotInitialized
            | RvError::UserNotLoggedIn
            | RvError::GeneralError
            | RvError::SlotIdInvalid
    )
}

fn classify(operation: &'static str, e: CkError) -> TokenError {
    match e {
        CkError::Pkcs11(rv, _) if is_gone(rv) => {
            TokenError::Unavailable(format!("{operation}: {rv}"))
        }
        e => TokenError::Refused {
            operation,
            reason: e.to_string(),
        },
    }
}

/// A key pair just generated in the token (or found there by label), not yet named.
#[derive(Debug, Clone)]
pub struct NewKeyPair {
    private: ObjectHandle,
    public: Option<ObjectHandle>,
    /// Found by its label (an existing key): naming it keeps its label.
    pub imported: bool,
    /// The RSA modulus, big-endian.
    pub modulus: Vec<u8>,
    /// The RSA public exponent, big-endian.
    pub public_exponent: Vec<u8>,
}

/// A private key found in the token by id.
#[derive(Debug, Clone)]
pub struct FoundKey {
    /// Its handle in this process (valid until the module is re-initialised).
    pub handle: ObjectHandle,
    /// The RSA modulus, big-endian.
    pub modulus: Vec<u8>,
    /// The RSA public exponent, big-endian.
    pub public_exponent: Vec<u8>,
}

/// A token with a logged-in session pool.
pub struct Token {
    config: TokenConfig,
    ctx: Pkcs11,
    slot: Slot,
    /// The sessions: idle ones, each logged in (login state is per application and token, so
    /// every session of the process shares one login), checked out for one call at a time,
    /// and how many are open; at most `max_sessions`.
    pool: Mutex<Pool>,
    /// Signalled when a session is returned or closed.
    freed: std::sync::Condvar,
}

struct Pool {
    idle: Vec<Session>,
    open: usize,
    /// Bumped when the pool is dropped after the token went away, so a session checked out
    /// before is closed on return instead of pooled.
    epoch: u64,
}

impl std::fmt::Debug for Token {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Token")
            .field("module", &self.config.module)
            .field("token", &self.config.token)
            .finish_non_exhaustive()
    }
}

impl Token {
    /// Loads the module, finds the token and logs in. A missing module, a token that is not
    /// there and a wrong PIN are each their own error.
    pub fn open(config: TokenConfig) -> Result<Arc<Self>, TokenError> {
        let module_err = |reason: String| TokenError::Module {
            path: config.module.clone(),
            reason,
        };
        if !config.module.is_file() {
            return Err(module_err("no such file".into()));
        }
        let ctx = context(&config.module).map_err(module_err)?;
        let slot = find_slot(&ctx, &config)?;
        let token = Self {
            config,
            ctx,
            slot,
            pool: Mutex::new(Pool {
                idle: Vec::new(),
                open: 1,
                epoch: 0,
            }),
            freed: std::sync::Condvar::new(),
        };
        let session = token.new_session().map_err(|e| match e {
            TokenError::Unavailable(reason) => TokenError::Module {
                path: token.config.module.clone(),
                reason,
            },
            e => e,
        })?;
        token.give_back(Some(session), 0);
        Ok(Arc::new(token))
    }

    fn pool(&self) -> std::sync::MutexGuard<'_, Pool> {
        self.pool.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// A new read-write session, logged in.
    fn new_session(&self) -> Result<Session, TokenError> {
        let session = self
            .ctx
            .open_rw_session(self.slot)
            .map_err(|e| classify("C_OpenSession", e))?;
        match session.login(UserType::User, Some(&self.config.pin.auth())) {
            Ok(()) => {
                self.logged_in(true)?;
                Ok(session)
            }
            // Login state is per process and token: another session (of this token, or of
            // another `Token` over the same one) logged in. Only with the same PIN is that a
            // login for us too.
            Err(CkError::Pkcs11(RvError::UserAlreadyLoggedIn, _)) => {
                self.logged_in(false)?;
                Ok(session)
            }
            Err(CkError::Pkcs11(
                rv @ (RvError::PinIncorrect
                | RvError::PinInvalid
                | RvError::PinLenRange
                | RvError::PinExpired
                | RvError::PinLocked),
                _,
            )) => Err(TokenError::Login(rv.to_string())),
            Err(e) => Err(classify("C_Login", e)),
        }
    }

    /// Records the PIN this process logged in to the token with (`fresh`), or checks that
    /// ours is that PIN.
    fn logged_in(&self, fresh: bool) -> Result<(), TokenError> {
        static LOGINS: Mutex<Vec<(PathBuf, u64, Pin)>> = Mutex::new(Vec::new());
        let mut logins = LOGINS.lock().unwrap_or_else(PoisonError::into_inner);
        let at = |(path, slot, _): &&(PathBuf, u64, Pin)| {
            *path == self.config.module && *slot == self.slot.id()
        };
        match logins.iter().find(at) {
            Some((_, _, pin)) if fresh || *pin.0 == *self.config.pin.0 => {}
            Some(_) => {
                return Err(TokenError::Login(
                    "not the PIN this process is logged in with".into(),
                ));
            }
            None => {}
        }
        if fresh {
            logins.retain(|l| !at(&l));
            logins.push((
                self.config.module.clone(),
                self.slot.id(),
                self.config.pin.clone(),
            ));
        }
        Ok(())
    }

    /// Returns a session checked out at `epoch` to the pool (closed instead if the pool was
    /// dropped meanwhile), or, with `None`, counts one that could not be opened or was closed.
    fn give_back(&self, session: Option<Session>, epoch: u64) {
        let mut pool = self.pool();
        match session {
            Some(s) if epoch == pool.epoch => pool.idle.push(s),
            stale => {
                pool.open = pool.open.saturating_sub(1);
                drop(pool);
                drop(stale);
            }
        }
        self.freed.notify_one();
    }

    /// Runs `op` on a session of its own: an idle one, a new one while fewer than
    /// `max_sessions` are open, or the next one returned. If the token went away, the pool is
    /// dropped (the next call opens fresh sessions) and the answer is
    /// [`TokenError::Unavailable`].
    fn with_session<T>(
        &self,
        op: impl FnOnce(&Session) -> Result<T, TokenError>,
    ) -> Result<T, TokenError> {
        let max = self.config.max_sessions.max(1);
        let mut pool = self.pool();
        let (pooled, epoch) = loop {
            if let Some(s) = pool.idle.pop() {
                break (Some(s), pool.epoch);
            }
            if pool.open < max {
                pool.open += 1;
                break (None, pool.epoch);
            }
            pool = self
                .freed
                .wait(pool)
                .unwrap_or_else(PoisonError::into_inner);
        };
        drop(pool);
        let session = match pooled {
            Some(s) => s,
            None => match self.new_session() {
                Ok(s) => s,
                Err(e) => {
                    self.give_back(None, epoch);
                    return Err(e);
                }
            },
        };
        let result = match op(&session) {
            // A refusal from a session that is no longer logged in (the token was reset, or
            // logged this process out) is the token going away, not the answer to the call.
            Err(e) if !matches!(e, TokenError::Unavailable(_)) && !user_session(&session) => Err(
                TokenError::Unavailable("the token logged this process out".into()),
            ),
            other => other,
        };
        if let Err(TokenError::Unavailable(_)) = &result {
            let stale = {
                let mut pool = self.pool();
                pool.epoch += 1;
                let stale = std::mem::take(&mut pool.idle);
                pool.open = pool.open.saturating_sub(stale.len());
                stale
            };
            drop(stale);
            self.freed.notify_all();
            self.give_back(None, epoch);
            drop(session);
        } else {
            self.give_back(Some(session), epoch);
        }
        result
    }

    /// Generates an RSA-2048 key pair in the token: the private key sensitive, never
    /// extractable, able to decrypt and nothing else; both halves token objects.
    pub fn generate_rsa_2048(&self) -> Result<NewKeyPair, TokenError> {
        self.with_session(|s| {
            let public_template = [
                Attribute::Token(true),
                Attribute::Private(false),
                Attribute::ModulusBits(2048.into()),
                Attribute::PublicExponent(vec![1, 0, 1]),
                Attribute::Encrypt(true),
                Attribute::Verify(false),
                Attribute::Wrap(false),
            ];
            let private_template = [
                Attribute::Token(true),
                Attribute::Private(true),
                Attribute::Sensitive(true),
                Attribute::Extractable(false),
                Attribute::Decrypt(true),
                Attribute::Sign(false),
                Attribute::SignRecover(false),
                Attribute::Unwrap(false),
                Attribute::Derive(false),
            ];
            let (public, private) = s
                .generate_key_pair(
                    &Mechanism::RsaPkcsKeyPairGen,
                    &public_template,
                    &private_template,
                )
                .map_err(|e| classify("C_GenerateKeyPair", e))?;
            let (modulus, public_exponent) = rsa_public(s, public)?;
            Ok(NewKeyPair {
                private,
                public: Some(public),
                imported: false,
                modulus,
                public_exponent,
            })
        })
    }

    /// The RSA key pair whose private half is labelled `label`, to register as a new version:
    /// refused unless that private key is sensitive, has never been extractable and may
    /// decrypt (a key that was ever readable out of the token gains nothing from being used
    /// there).
    pub fn find_labelled(&self, label: &str) -> Result<NewKeyPair, TokenError> {
        let with_label = |class| {
            [
                Attribute::Class(class),
                Attribute::KeyType(KeyType::RSA),
                Attribute::Label(label.as_bytes().to_vec()),
            ]
        };
        self.with_session(|s| {
            let found = s
                .find_objects(&with_label(ObjectClass::PRIVATE_KEY))
                .map_err(|e| classify("C_FindObjects", e))?;
            let private = match found.as_slice() {
                [] => return Err(TokenError::NotFound(format!("label {label:?}"))),
                [one] => *one,
                many => {
                    return Err(TokenError::Refused {
                        operation: "import",
                        reason: format!("{} private keys are labelled {label:?}", many.len()),
                    });
                }
            };
            let flags = s
                .get_attributes(
                    private,
                    &[
                        AttributeType::Sensitive,
                        AttributeType::NeverExtractable,
                        AttributeType::Decrypt,
                    ],
                )
                .map_err(|e| classify("C_GetAttributeValue", e))?;
            let held = flags.iter().all(|a| {
                matches!(
                    a,
                    Attribute::Sensitive(true)
                        | Attribute::NeverExtractable(true)
                        | Attribute::Decrypt(true)
                )
            }) && flags.len() == 3;
            if !held {
                return Err(TokenError::Refused {
                    operation: "import",
                    reason: format!(
                        "the private key labelled {label:?} must be sensitive, never extractable and able to decrypt"
                    ),
                });
            }
            let public = s
                .find_objects(&with_label(ObjectClass::PUBLIC_KEY))
                .map_err(|e| classify("C_FindObjects", e))?
                .first()
                .copied();
            let (modulus, public_exponent) = rsa_public(s, private)?;
            Ok(NewKeyPair {
                private,
                public,
                imported: true,
                modulus,
                public_exponent,
            })
        })
    }

    /// Names a key pair: `CKA_ID` (how [`Token::find`] finds it) and, unless it was found by
    /// its label ([`Token::find_labelled`]), `CKA_LABEL`.
    pub fn name(&self, pair: &NewKeyPair, id: &[u8], label: &str) -> Result<(), TokenError> {
        let mut attributes = vec![Attribute::Id(id.to_vec())];
        if !pair.imported {
            attributes.push(Attribute::Label(label.as_bytes().to_vec()));
        }
        self.with_session(|s| {
            for object in std::iter::once(pair.private).chain(pair.public) {
                s.update_attributes(object, &attributes)
                    .map_err(|e| classify("C_SetAttributeValue", e))?;
            }
            Ok(())
        })
    }

    /// The RSA private key with `CKA_ID` = `id`, if the token has one.
    pub fn find(&self, id: &[u8]) -> Result<Option<FoundKey>, TokenError> {
        self.with_session(|s| {
            let found = s
                .find_objects(&[
                    Attribute::Class(ObjectClass::PRIVATE_KEY),
                    Attribute::KeyType(KeyType::RSA),
                    Attribute::Id(id.to_vec()),
                ])
                .map_err(|e| classify("C_FindObjects", e))?;
            let handle = match found.as_slice() {
                // Private objects are invisible to a session that is not logged in: none found
                // then says nothing about the key.
                [] if !user_session(s) => {
                    return Err(TokenError::Unavailable(
                        "the token logged this process out".into(),
                    ));
                }
                [] => return Ok(None),
                [one] => *one,
                many => {
                    return Err(TokenError::Refused {
                        operation: "C_FindObjects",
                        reason: format!("{} private keys share the id {}", many.len(), hex(id)),
                    });
                }
            };
            let (modulus, public_exponent) = rsa_public(s, handle)?;
            Ok(Some(FoundKey {
                handle,
                modulus,
                public_exponent,
            }))
        })
    }

    /// Every object with `CKA_ID` = `id` (the key pair's two halves).
    fn objects(s: &Session, id: &[u8]) -> Result<Vec<ObjectHandle>, TokenError> {
        s.find_objects(&[Attribute::Id(id.to_vec())])
            .map_err(|e| classify("C_FindObjects", e))
    }

    /// Decrypts `ciphertext` with RSA-OAEP (SHA-256, MGF1-SHA-256, `label` as the source data)
    /// under the private key `handle`. Every decoding failure is the one
    /// [`TokenError::DecryptionFailed`]; an unreachable token is
    /// [`TokenError::Unavailable`]. The plaintext is zeroized on drop.
    pub fn decrypt_oaep_sha256(
        &self,
        handle: ObjectHandle,
        ciphertext: &[u8],
        label: &[u8],
    ) -> Result<Zeroizing<Vec<u8>>, TokenError> {
        let mechanism = Mechanism::RsaPkcsOaep(PkcsOaepParams::new(
            MechanismType::SHA256,
            PkcsMgfType::MGF1_SHA256,
            PkcsOaepSource::data_specified(label),
        ));
        self.with_session(|s| match s.decrypt(&mechanism, handle, ciphertext) {
            Ok(plain) => Ok(Zeroizing::new(plain)),
            Err(CkError::Pkcs11(rv, _)) if is_gone(rv) => {
                Err(TokenError::Unavailable(format!("C_Decrypt: {rv}")))
            }
            Err(CkError::Pkcs11(RvError::KeyHandleInvalid | RvError::ObjectHandleInvalid, _)) => {
                Err(TokenError::NotFound(format!("handle {handle}")))
            }
            // OAEP decoding (opencryptoki answers CKR_FUNCTION_FAILED), length and data errors:
            // all one answer, so the token is no padding oracle through us.
            Err(_) => Err(TokenError::DecryptionFailed),
        })
    }

    /// Destroys both halves of the key pair with `CKA_ID` = `id` and checks the token no
    /// longer has any object with that id. Already gone is fine.
    pub fn destroy(&self, id: &[u8]) -> Result<(), TokenError> {
        self.with_session(|s| {
            // Logged out, the private half would be invisible and "nothing left" a lie.
            if !user_session(s) {
                return Err(TokenError::Unavailable(
                    "the token logged this process out".into(),
                ));
            }
            for object in Self::objects(s, id)? {
                s.destroy_object(object)
                    .map_err(|e| classify("C_DestroyObject", e))?;
            }
            let left = Self::objects(s, id)?;
            if left.is_empty() {
                Ok(())
            } else {
                Err(TokenError::Refused {
                    operation: "C_DestroyObject",
                    reason: format!("{} objects with id {} remain", left.len(), hex(id)),
                })
            }
        })
    }

    /// Whether the token hands out any secret part of the private key with `CKA_ID` = `id`
    /// (`CKA_VALUE`, `CKA_PRIVATE_EXPONENT`, `CKA_PRIME_1`): a custody check for operators and
    /// tests, `false` for a key generated by [`Token::generate_rsa_2048`].
    pub fn exposes_private_value(&self, id: &[u8]) -> Result<bool, TokenError> {
        let found = self
            .find(id)?
            .ok_or_else(|| TokenError::NotFound(hex(id)))?;
        self.with_session(|s| {
            for attribute in [
                AttributeType::Value,
                AttributeType::PrivateExponent,
                AttributeType::Prime1,
            ] {
                match s.get_attributes(found.handle, &[attribute]) {
                    // Sensitive attributes are refused (CKR_ATTRIBUTE_SENSITIVE) or left out.
                    Ok(values) if values.is_empty() => {}
                    Ok(_) => return Ok(true),
                    Err(CkError::Pkcs11(rv, _)) if is_gone(rv) => {
                        return Err(TokenError::Unavailable(format!(
                            "C_GetAttributeValue: {rv}"
                        )));
                    }
                    Err(_) => {}
                }
            }
            Ok(false)
        })
    }
}

/// The process's one context for `module`, loaded and initialised on first use and kept for
/// the process's life: a module is initialised once per process, and `cryptoki` finalises it
/// when a context is dropped, which would pull it from under every other [`Token`] over the
/// same module (a second daemon in a test process, a token reopened with another PIN).
fn context(module: &std::path::Path) -> Result<Pkcs11, String> {
    static CONTEXTS: Mutex<Vec<(PathBuf, Pkcs11)>> = Mutex::new(Vec::new());
    let mut contexts = CONTEXTS.lock().unwrap_or_else(PoisonError::into_inner);
    if let Some((_, ctx)) = contexts.iter().find(|(path, _)| path == module) {
        return Ok(ctx.clone());
    }
    let ctx = Pkcs11::new(module).map_err(|e| e.to_string())?;
    match ctx.initialize(CInitializeArgs::new(CInitializeFlags::OS_LOCKING_OK)) {
        Ok(()) | Err(CkError::Pkcs11(RvError::CryptokiAlreadyInitialized, _)) => {}
        Err(e) => return Err(format!("C_Initialize: {e}")),
    }
    contexts.push((module.to_path_buf(), ctx.clone()));
    Ok(ctx)
}

/// Whether `s` is logged in as the user (so private objects are visible and usable).
fn user_session(s: &Session) -> bool {
    use cryptoki::session::SessionState;
    matches!(
        s.get_session_info().map(|i| i.session_state()),
        Ok(SessionState::RoUser | SessionState::RwUser)
    )
}

/// The modulus and public exponent of an RSA key object (public or private half: both are
/// public attributes).
fn rsa_public(s: &Session, object: ObjectHandle) -> Result<(Vec<u8>, Vec<u8>), TokenError> {
    let attrs = s
        .get_attributes(
            object,
            &[AttributeType::Modulus, AttributeType::PublicExponent],
        )
        .map_err(|e| classify("C_GetAttributeValue", e))?;
    let (mut modulus, mut exponent) = (None, None);
    for a in attrs {
        match a {
            Attribute::Modulus(m) => modulus = Some(m),
            Attribute::PublicExponent(e) => exponent = Some(e),
            _ => {}
        }
    }
    match (modulus, exponent) {
        (Some(m), Some(e)) => Ok((m, e)),
        _ => Err(TokenError::Refused {
            operation: "C_GetAttributeValue",
            reason: "no RSA modulus and public exponent".into(),
        }),
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// The slot of the configured token.
fn find_slot(ctx: &Pkcs11, config: &TokenConfig) -> Result<Slot, TokenError> {
    let slots = ctx.get_slots_with_token().map_err(|e| TokenError::Module {
        path: config.module.clone(),
        reason: format!("C_GetSlotList: {e}"),
    })?;
    let mut present = Vec::new();
    for slot in slots {
        let Some((label, initialized)) = token_label(ctx, &config.module, slot) else {
            continue;
        };
        let matches = match &config.token {
            TokenSelector::Label(want) => *want == label,
            TokenSelector::Slot(id) => *id == slot.id(),
        };
        if matches && initialized {
            return Ok(slot);
        }
        present.push(format!("slot {} {:?}", slot.id(), label));
    }
    Err(TokenError::NoToken {
        selector: config.token.clone(),
        present: if present.is_empty() {
            "none".into()
        } else {
            present.join(", ")
        },
    })
}

/// The label of the token in `slot` and whether it is initialised: from `cryptoki`'s
/// `get_token_info`, or, where that fails, from C_GetTokenInfo called directly.
///
/// Why the direct call: `cryptoki` also parses the token's clock (`utcTime`) and
/// fails the whole call when that is not `YYYYMMDDhhmmss00`, and opencryptoki (3.8, Debian
/// bookworm) answers `hh:mm:ss`; so no token of it could be chosen by label. This is the one
/// unsafe call of the workspace: the module is the one `cryptoki` loaded and initialised
/// (dlopen of the same path returns the same handle), and C_GetTokenInfo only fills the
/// fixed-size struct it is given.
fn token_label(ctx: &Pkcs11, module: &std::path::Path, slot: Slot) -> Option<(String, bool)> {
    match ctx.get_token_info(slot) {
        Ok(info) => Some((
            info.label().trim_end_matches([' ', '\0']).to_string(),
            info.token_initialized(),
        )),
        Err(_) => raw_token_label(module, slot.id()),
    }
}

#[allow(unsafe_code)]
fn raw_token_label(module: &std::path::Path, slot: u64) -> Option<(String, bool)> {
    // SAFETY: loading a PKCS#11 module runs its initialisers; it is the module `cryptoki`
    // already loaded from the same path, so nothing runs twice.
    let lib = unsafe { cryptoki_sys::Pkcs11::new(module) }.ok()?;
    // SAFETY: CK_TOKEN_INFO is plain data (byte arrays and integers): all zeroes is valid.
    let mut info: cryptoki_sys::CK_TOKEN_INFO = unsafe { std::mem::zeroed() };
    // SAFETY: the module is initialised (by `Token::open`); `info` is a valid, writable
    // CK_TOKEN_INFO for the call's duration.
    let get_token_info = lib.C_GetTokenInfo.as_ref().ok()?;
    let rv = unsafe { get_token_info(slot, &mut info) };
    if rv != cryptoki_sys::CKR_OK {
        return None;
    }
    let label = String::from_utf8_lossy(&info.label)
        .trim_end_matches([' ', '\0'])
        .to_string();
    Some((label, info.flags & cryptoki_sys::CKF_TOKEN_INITIALIZED != 0))
}
