//! Envelope encryption of one secret: seal with a public key, open with the private keyring.
//!
//! Owns: the AES-256-GCM layer, the canonical associated data and the [`seal`] / [`open`]
//! operations over the byte format in [`format`](mod@format). Primitives, as in docs/ENVELOPE.md:
//!
//! ```text
//! dek          = random(32)                       -- OS CSPRNG
//! nonce        = random(12)
//! aad          = "TVE" ‖ 0x01 ‖ lp(id) ‖ lp(owner) ‖ lp(provider) ‖ lp(kind)
//!                  where lp(x) = u32_be(len(x)) ‖ x
//! ct ‖ tag     = AES-256-GCM[dek](nonce, secret, aad)          -- NIST SP 800-38D
//! wrapped_dek  = RSAES-OAEP[pk](dek), SHA-256, MGF1-SHA-256,
//!                label "tokenvault/v1/dek"                      -- RFC 8017 §7.1 (v1)
//!              | enc ‖ HPKE.SealBase(pk, info, "", dek)         -- RFC 9180, X-Wing (v2)
//! ```
//!
//! Architecture invariant: `envelope` does no I/O and knows nothing of the store or gRPC. The
//! wrapping key is not in the associated data, so rotation can rewrap the data key without
//! touching the ciphertext.

mod error;
pub mod format;

use aes_gcm::aead::{Aead, KeyInit, Payload};
use aes_gcm::{Aes256Gcm, Nonce};
use rand_core::CryptoRngCore;
use zeroize::Zeroizing;

pub use error::{DecryptError, EncryptError, FormatError, RewrapError};
pub use format::EnvelopeRef;

use crate::keys::{Unwrapper, UnwrapperLookup, Wrapper};
use crate::record::RecordMeta;
use crate::secret::{DataKey, Secret};

/// Largest secret that can be sealed, in bytes.
pub const MAX_SECRET_LEN: usize = 64 * 1024;
/// Largest well-formed v1 envelope (RSA-4096), in bytes.
pub const MAX_ENVELOPE_LEN_V1: usize =
    format::HEADER_LEN + 512 + format::NONCE_LEN + MAX_SECRET_LEN + format::TAG_LEN;
/// Largest well-formed envelope of any version (a v2 envelope under X-Wing), in bytes.
pub const MAX_ENVELOPE_LEN: usize = format::HEADER_LEN_V2
    + crate::keys::xwing::XWING_ENC_LEN
    + crate::keys::xwing::SEALED_DEK_LEN
    + format::NONCE_LEN
    + MAX_SECRET_LEN
    + format::TAG_LEN;

/// The canonical associated data for a record: format version and the record's identity,
/// each length-prefixed so no two distinct identities encode alike.
pub fn associated_data(meta: &RecordMeta) -> Vec<u8> {
    let fields = [
        meta.id.as_str(),
        meta.owner.as_str(),
        meta.provider.as_str(),
        meta.kind.as_str(),
    ];
    let mut aad = Vec::with_capacity(4 + fields.iter().map(|f| 4 + f.len()).sum::<usize>());
    aad.extend_from_slice(format::MAGIC);
    aad.push(format::VERSION_V1);
    for field in fields {
        let len = u32::try_from(field.len()).expect("validated fields are at most 256 bytes");
        aad.extend_from_slice(&len.to_be_bytes());
        aad.extend_from_slice(field.as_bytes());
    }
    aad
}

/// Seals `secret` for the record described by `meta` under `wrapper`'s public key.
pub fn seal(
    meta: &RecordMeta,
    secret: &Secret,
    wrapper: &dyn Wrapper,
) -> Result<Vec<u8>, EncryptError> {
    seal_with_rng(meta, secret, wrapper, &mut rand::rngs::OsRng)
}

/// [`seal`] with the randomness (data key, nonce and, for the pure-Rust backend, the OAEP seed)
/// drawn from `rng`. Only tests may pass anything but the OS CSPRNG: it exists so known-answer
/// vectors can be generated reproducibly.
#[cfg(feature = "testing")]
#[doc(hidden)]
pub fn seal_with_rng_for_tests(
    meta: &RecordMeta,
    secret: &Secret,
    wrapper: &dyn Wrapper,
    rng: &mut dyn CryptoRngCore,
) -> Result<Vec<u8>, EncryptError> {
    seal_with_rng(meta, secret, wrapper, rng)
}

fn seal_with_rng(
    meta: &RecordMeta,
    secret: &Secret,
    wrapper: &dyn Wrapper,
    rng: &mut dyn CryptoRngCore,
) -> Result<Vec<u8>, EncryptError> {
    if secret.is_empty() {
        return Err(EncryptError::EmptySecret);
    }
    if secret.len() > MAX_SECRET_LEN {
        return Err(EncryptError::SecretTooLarge {
            len: secret.len(),
            max: MAX_SECRET_LEN,
        });
    }
    let dek = DataKey::generate(rng);
    let mut nonce = [0u8; format::NONCE_LEN];
    rng.fill_bytes(&mut nonce);
    let aad = associated_data(meta);
    let cipher = Aes256Gcm::new(dek.expose_secret().into());
    let ciphertext = cipher
        .encrypt(
            Nonce::from_slice(&nonce),
            Payload {
                msg: secret.expose_secret(),
                aad: &aad,
            },
        )
        .map_err(|_| EncryptError::Seal)?;
    let wrapped = wrapper.wrap_dek(&dek, rng)?;
    Ok(EnvelopeRef {
        scheme: wrapper.scheme(),
        key_id: wrapper.key_id(),
        wrapped_dek: &wrapped.0,
        nonce: &nonce,
        ciphertext: &ciphertext,
    }
    .encode())
}

/// Opens `envelope` as the record described by `meta`, unwrapping its data key with the
/// matching key from `keys`.
pub fn open(
    meta: &RecordMeta,
    envelope: &[u8],
    keys: &dyn UnwrapperLookup,
) -> Result<Secret, DecryptError> {
    let env = EnvelopeRef::decode(envelope)?;
    let dek = unwrap(&env, keys)?;
    open_with_dek(meta, &env, &dek)
}

/// The data key of `env`, unwrapped by the key it names ([`unwrapper_for`]).
pub fn unwrap(env: &EnvelopeRef<'_>, keys: &dyn UnwrapperLookup) -> Result<DataKey, DecryptError> {
    Ok(unwrapper_for(env, keys)?.unwrap_dek(env.wrapped_dek)?)
}

/// The key `env` names, once its scheme is the envelope's: a v2 envelope naming an RSA key (or
/// the reverse) is refused before any private-key operation. Every opening path goes through
/// here.
pub fn unwrapper_for<'k>(
    env: &EnvelopeRef<'_>,
    keys: &'k dyn UnwrapperLookup,
) -> Result<&'k dyn Unwrapper, DecryptError> {
    let unwrapper = keys.unwrapper(&env.key_id)?;
    if unwrapper.scheme() != env.scheme {
        return Err(DecryptError::SchemeMismatch {
            envelope: env.scheme,
            key: unwrapper.scheme(),
        });
    }
    Ok(unwrapper)
}

/// The AES-GCM half of [`open`], for callers that already hold the data key.
pub fn open_with_dek(
    meta: &RecordMeta,
    env: &EnvelopeRef<'_>,
    dek: &DataKey,
) -> Result<Secret, DecryptError> {
    let aad = associated_data(meta);
    let cipher = Aes256Gcm::new(dek.expose_secret().into());
    let plain = cipher
        .decrypt(
            Nonce::from_slice(env.nonce),
            Payload {
                msg: env.ciphertext,
                aad: &aad,
            },
        )
        .map_err(|_| DecryptError::DecryptionFailed)?;
    Ok(Secret::from(Zeroizing::new(plain)))
}

/// Rewraps the data key of `envelope` (record `meta`) from whichever key in `keys` wrapped it
/// to the key of `to`, in `to`'s format version (so v1 becomes v2 when `to` is an X-Wing key).
/// Only the header and the wrapped data key change: nonce, ciphertext and tag are copied
/// untouched. The data key is first checked against the ciphertext, so a
/// corrupt or mis-bound record is never re-sealed under the new key.
pub fn rewrap(
    meta: &RecordMeta,
    envelope: &[u8],
    keys: &dyn UnwrapperLookup,
    to: &dyn Wrapper,
) -> Result<Vec<u8>, RewrapError> {
    let env = EnvelopeRef::decode(envelope).map_err(DecryptError::from)?;
    let dek = unwrap(&env, keys)?;
    drop(open_with_dek(meta, &env, &dek)?);
    let wrapped = to
        .wrap_dek(&dek, &mut rand::rngs::OsRng)
        .map_err(EncryptError::from)?;
    Ok(EnvelopeRef {
        scheme: to.scheme(),
        key_id: to.key_id(),
        wrapped_dek: &wrapped.0,
        ..env
    }
    .encode())
}
