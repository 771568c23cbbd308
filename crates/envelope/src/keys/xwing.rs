//! X-Wing public keys: sealing data keys with HPKE (RFC 9180) base mode for envelope v2.
//!
//! Owns: [`XWingPublicKey`] and the HPKE suite every v2 envelope uses, written once here so the
//! daemon's opening side (`tokenvault::keys::xwing`) cannot drift from it:
//!
//! ```text
//! suite        = KEM X-Wing (0x647A, draft-connolly-cfrg-xwing-kem), KDF HKDF-SHA256 (0x0001),
//!                AEAD AES-256-GCM (0x0002), mode_base
//! info         = "tokenvault/v2/dek" ‖ u16be(kem id) ‖ key fingerprint (32 bytes)
//! enc, sealed  = HPKE.SealBase(pkR, info, aad = "", pt = dek)   -- sealed: 32 + 16 bytes
//! fingerprint  = SHA-256(SubjectPublicKeyInfo DER), as for RSA: algorithm id-XWing
//!                (1.3.6.1.4.1.62253.25722, no parameters), BIT STRING = the draft's 1,216-byte
//!                encapsulation key
//! ```
//!
//! Why the `hpke` crate rather than X-Wing built from aws-lc-rs: aws-lc-rs has ML-KEM-768 and
//! X25519 but no X-Wing, no ML-KEM key generation from a seed (X-Wing's private key is a 32-byte
//! seed) and no SHAKE, so the combiner, the key expansion and HPKE's key schedule would all be
//! hand-written; `hpke` implements them in pure Rust, so the web tier's no-C build seals v2 too.
//!
//! Must never: hold or reach a decapsulation (private) key; that half lives in the daemon crate.

use hpke::{Deserializable, Serializable};
use rand_core::CryptoRngCore;

use super::{KeyError, KeyId, KeyOpError, Scheme, WrappedDek, Wrapper};
use crate::secret::DataKey;

/// The HPKE KEM X-Wing, as this crate's HPKE implementation names it.
pub type XWingKem = hpke::kem::XWing;
/// The HPKE KDF of envelope v2.
pub type Kdf = hpke::kdf::HkdfSha256;
/// The HPKE AEAD of envelope v2 (sealing the 32-byte data key).
pub type Aead = hpke::aead::AesGcm256;

/// The X-Wing draft's object identifier, for SubjectPublicKeyInfo and PKCS#8.
pub const ID_XWING: spki::ObjectIdentifier =
    spki::ObjectIdentifier::new_unwrap("1.3.6.1.4.1.62253.25722");

/// The SubjectPublicKeyInfo DER of an X-Wing encapsulation key: a fixed 24-byte prefix (the
/// SEQUENCE headers, `id-XWing` and the BIT STRING header), then the key.
pub fn spki_der(raw: &[u8]) -> Vec<u8> {
    use spki::der::Encode as _;
    spki::SubjectPublicKeyInfoRef {
        algorithm: spki::AlgorithmIdentifierRef {
            oid: ID_XWING,
            parameters: None,
        },
        subject_public_key: spki::der::asn1::BitStringRef::from_bytes(raw)
            .expect("a 1,216-byte BIT STRING encodes"),
    }
    .to_der()
    .expect("a 1,216-byte key encodes")
}

/// HPKE KEM identifier of X-Wing (draft-ietf-hpke-pq: MLKEM768-X25519).
pub const KEM_ID_XWING: u16 = 0x647A;
/// Length of an X-Wing encapsulation (public) key in bytes.
pub const XWING_PUBLIC_KEY_LEN: usize = 1216;
/// Length of an X-Wing encapsulation (HPKE `enc`) in bytes.
pub const XWING_ENC_LEN: usize = 1120;
/// Length of the HPKE ciphertext of a data key: 32 bytes and a 16-byte tag.
pub const SEALED_DEK_LEN: usize = 32 + 16;
/// Prefix of the HPKE `info` of every v2 envelope (domain separation, and the format version).
pub const HPKE_INFO_LABEL: &[u8] = b"tokenvault/v2/dek";

/// The HPKE `info` for a data key sealed to key `id` with KEM `kem_id`.
pub fn hpke_info(kem_id: u16, id: &KeyId) -> Vec<u8> {
    let mut info = Vec::with_capacity(HPKE_INFO_LABEL.len() + 2 + id.0.len());
    info.extend_from_slice(HPKE_INFO_LABEL);
    info.extend_from_slice(&kem_id.to_be_bytes());
    info.extend_from_slice(&id.0);
    info
}

/// An X-Wing encapsulation key that seals data keys for envelope v2.
#[derive(Clone)]
pub struct XWingPublicKey {
    /// SHA-256 of the SubjectPublicKeyInfo DER (see [`spki_der`]).
    id: KeyId,
    bytes: Vec<u8>,
    key: <XWingKem as hpke::Kem>::PublicKey,
}

impl std::fmt::Debug for XWingPublicKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("XWingPublicKey")
            .field("id", &self.id)
            .finish()
    }
}

impl XWingPublicKey {
    /// Parses the draft's encoding of an encapsulation key (1,216 bytes: the ML-KEM-768
    /// encapsulation key, then the X25519 public key); refuses any other length and an ML-KEM
    /// key that fails FIPS 203's modulus check.
    pub fn from_bytes(bytes: &[u8]) -> Result<Self, KeyError> {
        if bytes.len() != XWING_PUBLIC_KEY_LEN {
            return Err(KeyError::Malformed {
                what: "X-Wing public key",
                reason: format!(
                    "{} bytes; an X-Wing encapsulation key is {XWING_PUBLIC_KEY_LEN}",
                    bytes.len()
                ),
            });
        }
        let key = <XWingKem as hpke::Kem>::PublicKey::from_bytes(bytes).map_err(|_| {
            KeyError::Malformed {
                what: "X-Wing public key",
                reason: "its ML-KEM-768 part is not a valid encapsulation key".into(),
            }
        })?;
        Ok(Self {
            id: KeyId::of_spki_der(&spki_der(bytes)),
            bytes: bytes.to_vec(),
            key,
        })
    }

    #[doc(hidden)]
    pub fn from_hpke(key: <XWingKem as hpke::Kem>::PublicKey) -> Self {
        let bytes = key.to_bytes().to_vec();
        Self {
            id: KeyId::of_spki_der(&spki_der(&bytes)),
            bytes,
            key,
        }
    }

    /// Fingerprint of this key: SHA-256 of its SubjectPublicKeyInfo DER.
    pub fn id(&self) -> KeyId {
        self.id
    }

    /// The draft's encoding (1,216 bytes).
    pub fn as_bytes(&self) -> &[u8] {
        &self.bytes
    }
}

impl Wrapper for XWingPublicKey {
    fn key_id(&self) -> KeyId {
        self.id
    }

    fn scheme(&self) -> Scheme {
        Scheme::Hpke(KEM_ID_XWING)
    }

    fn wrap_dek(
        &self,
        dek: &DataKey,
        rng: &mut dyn CryptoRngCore,
    ) -> Result<WrappedDek, KeyOpError> {
        let info = hpke_info(KEM_ID_XWING, &self.id);
        let (enc, sealed) = hpke::single_shot_seal_with_rng::<Aead, Kdf, XWingKem>(
            &hpke::OpModeS::Base,
            &self.key,
            &info,
            dek.expose_secret(),
            b"",
            &mut Rng06(rng),
        )
        .map_err(|_| KeyOpError::Wrap)?;
        let mut out = enc.to_bytes().to_vec();
        out.extend_from_slice(&sealed);
        Ok(WrappedDek(out))
    }
}

/// The crate's RNG (rand_core 0.6) as the RNG `hpke` takes (rand_core 0.10). Only tests pass
/// anything but the OS CSPRNG (see `envelope::seal_with_rng_for_tests`).
pub(crate) struct Rng06<'a>(pub(crate) &'a mut dyn CryptoRngCore);

impl hpke::rand_core::TryRng for Rng06<'_> {
    type Error = std::convert::Infallible;

    fn try_next_u32(&mut self) -> Result<u32, Self::Error> {
        Ok(self.0.next_u32())
    }

    fn try_next_u64(&mut self) -> Result<u64, Self::Error> {
        Ok(self.0.next_u64())
    }

    fn try_fill_bytes(&mut self, dst: &mut [u8]) -> Result<(), Self::Error> {
        self.0.fill_bytes(dst);
        Ok(())
    }
}

impl hpke::rand_core::TryCryptoRng for Rng06<'_> {}
