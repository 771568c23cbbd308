//! X-Wing public keys: sealing data keys with HPKE (RFC 9180) base mode for envelope v2.
//!
//! Owns: [`XWingPublicKey`] and the HPKE suite every v2 envelope uses, written once here so the
//! daemon's opening side (`keys/private.rs` in the daemon crate) cannot drift from it:
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
//! Two implementations, as for RSA, each checking the other (`xwing_tests.rs` in the daemon
//! crate: the aws-lc seal opens with `hpke`'s open, and the `hpke`-sealed vectors open with the
//! daemon's aws-lc open; both give the X-Wing draft's vectors):
//!
//! - The `hpke` crate (pure Rust, RustCrypto's `ml-kem` and `x-wing`): the reference, the
//!   sealer without the `aws-lc` feature (so the no-C web-tier build seals v2) and through
//!   `PublicKey::rust_crypto`, and the one that takes injected randomness for the vectors.
//! - With `aws-lc`, `aws` below: ML-KEM-768 and X25519 on aws-lc-rs (constant-time, assembly),
//!   with X-Wing's combiner and HPKE's key schedule for this one suite written here, since
//!   aws-lc-rs has neither X-Wing nor HPKE (nor ML-KEM key generation from a seed: the daemon
//!   expands X-Wing's seed with RustCrypto once per key load). Why not `hpke` alone: measured
//!   with `cargo bench --bench envelope` on the reference machine, its open took 240 us (it
//!   re-expands the seed on every decapsulation) against 286 us for RSA-2048, and its seal 154
//!   us against 17 us for RSA on aws-lc; on aws-lc an open takes 41 us.
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
/// Length of an X-Wing encapsulation (public) key in bytes: ML-KEM-768's, then X25519's 32.
pub const XWING_PUBLIC_KEY_LEN: usize = 1216;
/// Length of the ML-KEM-768 encapsulation key at the start of an X-Wing one.
#[cfg(feature = "aws-lc")]
const MLKEM_PUBLIC_KEY_LEN: usize = 1184;
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
    #[cfg(feature = "aws-lc")]
    mlkem: std::sync::Arc<aws_lc_rs::kem::EncapsulationKey>,
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
            #[cfg(feature = "aws-lc")]
            mlkem: aws::encapsulation_key(&bytes[..MLKEM_PUBLIC_KEY_LEN])?,
            bytes: bytes.to_vec(),
            key,
        })
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

    #[cfg(feature = "aws-lc")]
    fn wrap_dek(
        &self,
        dek: &DataKey,
        _rng: &mut dyn CryptoRngCore,
    ) -> Result<WrappedDek, KeyOpError> {
        aws::seal(
            &self.mlkem,
            &self.bytes[MLKEM_PUBLIC_KEY_LEN..],
            &hpke_info(KEM_ID_XWING, &self.id),
            dek,
        )
    }

    #[cfg(not(feature = "aws-lc"))]
    fn wrap_dek(
        &self,
        dek: &DataKey,
        rng: &mut dyn CryptoRngCore,
    ) -> Result<WrappedDek, KeyOpError> {
        self.wrap_dek_hpke(dek, rng)
    }
}

impl XWingPublicKey {
    /// Seals `dek` with the `hpke` crate (pure Rust; `rng` gives the encapsulation randomness).
    pub(crate) fn wrap_dek_hpke(
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

/// X-Wing's combiner label, the six ASCII bytes `\.//^\`.
#[doc(hidden)]
pub const XWING_LABEL: &[u8; 6] = br"\.//^\";
/// HPKE's suite id for v2: `HPKE` ‖ KEM X-Wing ‖ KDF HKDF-SHA256 ‖ AEAD AES-256-GCM.
#[doc(hidden)]
pub const HPKE_SUITE: [u8; 10] = [b'H', b'P', b'K', b'E', 0x64, 0x7a, 0x00, 0x01, 0x00, 0x02];

/// X-Wing and HPKE on aws-lc-rs: what both the sealing side here and the daemon's opening side
/// (`tokenvault::keys`, which adds decapsulation with the private key) use.
#[cfg(feature = "aws-lc")]
#[doc(hidden)]
pub mod aws {
    use zeroize::Zeroizing;

    use super::{HPKE_SUITE, SEALED_DEK_LEN, XWING_ENC_LEN, XWING_LABEL};
    use crate::keys::{KeyError, KeyOpError, WrappedDek};
    use crate::secret::DataKey;

    pub(super) fn encapsulation_key(
        mlkem: &[u8],
    ) -> Result<std::sync::Arc<aws_lc_rs::kem::EncapsulationKey>, KeyError> {
        aws_lc_rs::kem::EncapsulationKey::new(&aws_lc_rs::kem::ML_KEM_768, mlkem)
            .map(std::sync::Arc::new)
            .map_err(|_| KeyError::Malformed {
                what: "X-Wing public key",
                reason: "its ML-KEM-768 part was rejected by aws-lc".into(),
            })
    }

    /// X-Wing's combiner: `SHA3-256(ss_M ‖ ss_X ‖ ct_X ‖ pk_X ‖ label)`.
    pub fn combine(ss_m: &[u8], ss_x: &[u8], ct_x: &[u8], pk_x: &[u8]) -> Zeroizing<[u8; 32]> {
        let mut digest = aws_lc_rs::digest::Context::new(&aws_lc_rs::digest::SHA3_256);
        for part in [ss_m, ss_x, ct_x, pk_x, XWING_LABEL] {
            digest.update(part);
        }
        let mut ss = Zeroizing::new([0u8; 32]);
        ss.copy_from_slice(digest.finish().as_ref());
        ss
    }

    /// RFC 9180 §5.1's key schedule in mode_base (no PSK): the AEAD key (`key_len` bytes, at
    /// most 32) and base nonce from the KEM's shared secret and `info`, for `suite`. HKDF-SHA256
    /// with outputs of at most one block, so each Expand is one HMAC.
    pub fn key_schedule(
        suite: [u8; 10],
        key_len: u16,
        shared_secret: &[u8],
        info: &[u8],
    ) -> (Zeroizing<Vec<u8>>, [u8; 12]) {
        use aws_lc_rs::hmac;
        let mac = |key: &[u8], parts: &[&[u8]]| {
            let mut ctx = hmac::Context::with_key(&hmac::Key::new(hmac::HMAC_SHA256, key));
            for part in parts {
                ctx.update(part);
            }
            ctx.sign()
        };
        let extract =
            |salt: &[u8], label: &[u8], ikm: &[u8]| mac(salt, &[b"HPKE-v1", &suite, label, ikm]);
        let expand = |prk: &[u8], label: &[u8], context: &[u8], len: u16| {
            mac(
                prk,
                &[&len.to_be_bytes(), b"HPKE-v1", &suite, label, context, &[1]],
            )
        };
        let mut context = Vec::with_capacity(65);
        context.push(0u8);
        context.extend_from_slice(extract(b"", b"psk_id_hash", b"").as_ref());
        context.extend_from_slice(extract(b"", b"info_hash", info).as_ref());
        let secret = extract(shared_secret, b"secret", b"");
        let key = Zeroizing::new(
            expand(secret.as_ref(), b"key", &context, key_len).as_ref()[..usize::from(key_len)]
                .to_vec(),
        );
        let mut nonce = [0u8; 12];
        nonce.copy_from_slice(&expand(secret.as_ref(), b"base_nonce", &context, 12).as_ref()[..12]);
        (key, nonce)
    }

    /// The AES-256-GCM key of v2's HPKE context for `shared_secret` and `info`, ready to seal or
    /// open its one message (whose nonce is the base nonce).
    pub fn context(
        shared_secret: &[u8],
        info: &[u8],
    ) -> Result<(aws_lc_rs::aead::LessSafeKey, aws_lc_rs::aead::Nonce), KeyOpError> {
        let (key, nonce) = key_schedule(HPKE_SUITE, 32, shared_secret, info);
        let key = aws_lc_rs::aead::UnboundKey::new(&aws_lc_rs::aead::AES_256_GCM, &key)
            .map_err(|_| KeyOpError::Wrap)?;
        Ok((
            aws_lc_rs::aead::LessSafeKey::new(key),
            aws_lc_rs::aead::Nonce::assume_unique_for_key(nonce),
        ))
    }

    /// HPKE's SealBase of `dek` to the X-Wing key (`mlkem`, `pk_x`): `enc ‖ sealed`.
    pub(super) fn seal(
        mlkem: &aws_lc_rs::kem::EncapsulationKey,
        pk_x: &[u8],
        info: &[u8],
        dek: &DataKey,
    ) -> Result<WrappedDek, KeyOpError> {
        use aws_lc_rs::agreement;
        let (ct_m, ss_m) = mlkem.encapsulate().map_err(|_| KeyOpError::Wrap)?;
        let ephemeral = agreement::EphemeralPrivateKey::generate(
            &agreement::X25519,
            &aws_lc_rs::rand::SystemRandom::new(),
        )
        .map_err(|_| KeyOpError::Wrap)?;
        let ct_x = ephemeral
            .compute_public_key()
            .map_err(|_| KeyOpError::Wrap)?;
        let ss = agreement::agree_ephemeral(
            ephemeral,
            agreement::UnparsedPublicKey::new(&agreement::X25519, pk_x),
            KeyOpError::Wrap,
            |ss_x| Ok(combine(ss_m.as_ref(), ss_x, ct_x.as_ref(), pk_x)),
        )?;
        let (key, nonce) = context(ss.as_ref(), info)?;
        let mut out = Vec::with_capacity(XWING_ENC_LEN + SEALED_DEK_LEN);
        out.extend_from_slice(ct_m.as_ref());
        out.extend_from_slice(ct_x.as_ref());
        let mut sealed = dek.expose_secret().to_vec();
        key.seal_in_place_append_tag(nonce, aws_lc_rs::aead::Aad::empty(), &mut sealed)
            .map_err(|_| KeyOpError::Wrap)?;
        out.extend_from_slice(&sealed);
        Ok(WrappedDek(out))
    }
}
