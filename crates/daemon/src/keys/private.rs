//! Private keys: the only module that holds private key material.
//!
//! Owns: [`PrivateKey`], RSA or X-Wing. It imports PKCS#8 (plain or passphrase-encrypted) and,
//! for RSA, PKCS#1 PEM. An RSA key is validated with the `rsa` crate and every RSA private-key
//! operation runs on `aws-lc-rs` (constant-time; the `rsa` crate's private operations carry
//! RUSTSEC-2023-0071). An X-Wing key is the draft's 32-byte seed (PKCS#8 with `id-XWing`, the
//! seed as the OCTET STRING). It opens v2 envelopes through [`XWingOpener`]: the seed is expanded
//! once at load (SHAKE256, ML-KEM-768 key generation), and each decapsulation then runs on
//! aws-lc-rs (ML-KEM-768, X25519, SHA3-256), followed by HPKE's key schedule and AES-256-GCM.
//!
//! Must never: perform a private-key operation with the `rsa` crate, return private key bytes
//! other than through [`PrivateKey::to_pkcs8_pem`] (used only to write 0600 key files) or
//! encrypted by [`PrivateKey::seal_with`] (a shared store's keys), or put
//! key material in an error, a log line or `Debug` output.

#![expect(
    clippy::disallowed_types,
    reason = "the one module allowed to parse keys with the rsa crate"
)]

use aws_lc_rs::encoding::AsDer;
use aws_lc_rs::rsa::{
    KeySize, OAEP_SHA256_MGF1SHA256, OaepPrivateDecryptingKey, PrivateDecryptingKey,
};
use pkcs8::{EncryptedPrivateKeyInfo, LineEnding, PrivateKeyInfo, SecretDocument};
use rsa::pkcs1::DecodeRsaPrivateKey;
use rsa::pkcs8::{DecodePrivateKey, EncodePrivateKey};
use zeroize::Zeroizing;

use super::xwing::{self, XWingPublicKey};
use super::{
    Algorithm, KeyError, KeyId, KeyOpError, OAEP_LABEL, PublicKey, Scheme, Unwrapper,
    passphrase_hint, pem_label,
};
use crate::secret::{DATA_KEY_LEN, DataKey, Passphrase};

/// First bytes of a private key sealed under a key-encryption key ([`PrivateKey::seal_with`]).
const SEALED_MAGIC: &[u8; 4] = b"TVK1";
/// Associated data of a sealed private key: binds the bytes to their purpose. (Not to a key
/// version: a key loaded for a version is checked against the registry's fingerprint.)
const SEALED_AAD: &[u8] = b"tokenvault/v1/shared-private-key";

/// A private key that unwraps data keys: RSA (envelope v1) or X-Wing (envelope v2).
pub struct PrivateKey {
    public: PublicKey,
    inner: Inner,
    pkcs8_der: Zeroizing<Vec<u8>>,
}

enum Inner {
    Rsa(OaepPrivateDecryptingKey),
    /// Boxed: the expanded keys are large, and a key is moved around the keyring.
    XWing(Box<XWingOpener>),
}

impl std::fmt::Debug for PrivateKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PrivateKey")
            .field("id", &self.public.id())
            .finish_non_exhaustive()
    }
}

impl PrivateKey {
    /// Generates a fresh RSA-2048 key with aws-lc-rs.
    pub fn generate() -> Result<Self, KeyError> {
        Self::generate_with(Algorithm::Rsa(2048))
    }

    /// Generates a fresh key of `algorithm`: RSA-2048, -3072 or -4096 with aws-lc-rs, or an
    /// X-Wing seed from the OS CSPRNG.
    pub fn generate_with(algorithm: Algorithm) -> Result<Self, KeyError> {
        let size = match algorithm {
            Algorithm::Rsa(2048) => KeySize::Rsa2048,
            Algorithm::Rsa(3072) => KeySize::Rsa3072,
            Algorithm::Rsa(4096) => KeySize::Rsa4096,
            Algorithm::Rsa(bits) => return Err(KeyError::UnsupportedSize { bits }),
            Algorithm::XWing if cfg!(feature = "fips") => return Err(KeyError::NotInFipsBuild),
            Algorithm::XWing => {
                use pkcs8::der::Encode as _;
                use rand::RngCore as _;
                let mut seed = Zeroizing::new([0u8; 32]);
                rand::rngs::OsRng.fill_bytes(seed.as_mut());
                let der = PrivateKeyInfo {
                    algorithm: pkcs8::AlgorithmIdentifierRef {
                        oid: xwing::ID_XWING,
                        parameters: None,
                    },
                    private_key: seed.as_ref(),
                    public_key: None,
                }
                .to_der()
                .map_err(|_| KeyError::Generation)?;
                return Self::from_pkcs8_der(Zeroizing::new(der));
            }
        };
        let key = PrivateDecryptingKey::generate(size).map_err(|_| KeyError::Generation)?;
        let der = Zeroizing::new(
            key.as_der()
                .map_err(|_| KeyError::Generation)?
                .as_ref()
                .to_vec(),
        );
        Self::from_pkcs8_der(der)
    }

    /// Parses PEM: `PRIVATE KEY` (PKCS#8, as written by `openssl genpkey`),
    /// `ENCRYPTED PRIVATE KEY` (PKCS#8 PBES2, needs `passphrase`) or `RSA PRIVATE KEY` (PKCS#1).
    pub fn from_pem(pem: &str, passphrase: Option<&Passphrase>) -> Result<Self, KeyError> {
        let label = pem_label(pem)?;
        let malformed = |e: &dyn std::fmt::Display| KeyError::Malformed {
            what: "private key",
            reason: e.to_string(),
        };
        let der: Zeroizing<Vec<u8>> = match label.as_str() {
            "PRIVATE KEY" => {
                let (_, doc) = SecretDocument::from_pem(pem).map_err(|e| malformed(&e))?;
                doc.to_bytes()
            }
            "ENCRYPTED PRIVATE KEY" => {
                let pass = passphrase.ok_or(KeyError::PassphraseRequired(passphrase_hint::NONE))?;
                let (_, doc) = pkcs8::Document::from_pem(pem).map_err(|e| malformed(&e))?;
                let info =
                    EncryptedPrivateKeyInfo::try_from(doc.as_bytes()).map_err(|e| malformed(&e))?;
                info.decrypt(pass.expose_secret())
                    .map_err(|_| KeyError::WrongPassphrase)?
                    .to_bytes()
            }
            "RSA PRIVATE KEY" => {
                let key = rsa::RsaPrivateKey::from_pkcs1_pem(pem).map_err(|e| malformed(&e))?;
                key.to_pkcs8_der().map_err(|e| malformed(&e))?.to_bytes()
            }
            _ => {
                return Err(KeyError::UnexpectedPem {
                    expected: "PRIVATE KEY",
                    found: label,
                });
            }
        };
        Self::from_pkcs8_der(der)
    }

    fn from_pkcs8_der(der: Zeroizing<Vec<u8>>) -> Result<Self, KeyError> {
        let malformed = |e: &dyn std::fmt::Display| KeyError::Malformed {
            what: "RSA private key",
            reason: e.to_string(),
        };
        // Name a non-RSA key's own algorithm: the rsa crate's error quotes the RSA OID it
        // expected, which reads as if the key were RSA.
        if let Ok(info) = PrivateKeyInfo::try_from(der.as_slice()) {
            if info.algorithm.oid == xwing::ID_XWING {
                if cfg!(feature = "fips") {
                    return Err(KeyError::NotInFipsBuild);
                }
                let seed: &[u8; 32] =
                    info.private_key
                        .try_into()
                        .map_err(|_| KeyError::Malformed {
                            what: "X-Wing private key",
                            reason: format!(
                                "{} bytes; an X-Wing private key is a 32-byte seed",
                                info.private_key.len()
                            ),
                        })?;
                // Any 32 bytes are a private key (the seed); the one expansion gives both halves.
                let (opener, public) =
                    XWingOpener::new(seed).map_err(|_| malformed(&"rejected by aws-lc"))?;
                let public = PublicKey::from_xwing(XWingPublicKey::from_bytes(&public)?);
                return Ok(Self {
                    public,
                    inner: Inner::XWing(Box::new(opener)),
                    pkcs8_der: der,
                });
            }
            super::require_rsa("private key", info.algorithm.oid)?;
        }
        // The rsa crate validates structure and consistency (no private-key operation), then
        // aws-lc takes over for all arithmetic.
        let rsa_key = rsa::RsaPrivateKey::from_pkcs8_der(&der).map_err(|e| malformed(&e))?;
        rsa_key.validate().map_err(|e| malformed(&e))?;
        let public = PublicKey::from_rsa(rsa_key.to_public_key())?;
        let oaep = PrivateDecryptingKey::from_pkcs8(&der)
            .ok()
            .and_then(|k| OaepPrivateDecryptingKey::new(k).ok())
            .ok_or_else(|| malformed(&"rejected by aws-lc"))?;
        Ok(Self {
            public,
            inner: Inner::Rsa(oaep),
            pkcs8_der: der,
        })
    }

    /// The matching public key.
    pub fn public_key(&self) -> &PublicKey {
        &self.public
    }

    /// This key's PKCS#8 DER sealed with AES-256-GCM under `kek` (how a shared store keeps
    /// private keys: the key-encryption key is derived from the passphrase once per process,
    /// so loading a version another daemon added costs no scrypt): `TVK1`, a 12-byte random
    /// nonce, then the ciphertext and its 16-byte tag, with [`SEALED_AAD`] as associated data.
    pub fn seal_with(&self, kek: &[u8; 32]) -> Result<Zeroizing<Vec<u8>>, KeyError> {
        use aes_gcm::aead::{Aead as _, KeyInit as _, Payload};
        use rand::RngCore as _;
        let cipher = aes_gcm::Aes256Gcm::new_from_slice(kek).map_err(|_| KeyError::Generation)?;
        let mut nonce = [0u8; 12];
        rand::rngs::OsRng.fill_bytes(&mut nonce);
        let sealed = cipher
            .encrypt(
                aes_gcm::Nonce::from_slice(&nonce),
                Payload {
                    msg: &self.pkcs8_der,
                    aad: SEALED_AAD,
                },
            )
            .map_err(|_| KeyError::Generation)?;
        Ok(Zeroizing::new(
            [&SEALED_MAGIC[..], &nonce, &sealed].concat(),
        ))
    }

    /// Whether `bytes` are in the form [`PrivateKey::seal_with`] writes (otherwise PEM).
    pub fn is_sealed(bytes: &[u8]) -> bool {
        bytes.starts_with(SEALED_MAGIC)
    }

    /// Opens what [`PrivateKey::seal_with`] wrote. A wrong key-encryption key (so a wrong
    /// passphrase) and altered bytes are both [`KeyError::WrongPassphrase`]: GCM cannot tell
    /// them apart.
    pub fn open_sealed(bytes: &[u8], kek: &[u8; 32]) -> Result<Self, KeyError> {
        use aes_gcm::aead::{Aead as _, KeyInit as _, Payload};
        let body = bytes
            .strip_prefix(SEALED_MAGIC)
            .filter(|b| b.len() > 12 + 16)
            .ok_or(KeyError::Malformed {
                what: "private key",
                reason: "not a sealed private key (too short)".into(),
            })?;
        let (nonce, sealed) = body.split_at(12);
        let cipher =
            aes_gcm::Aes256Gcm::new_from_slice(kek).map_err(|_| KeyError::WrongPassphrase)?;
        let der = Zeroizing::new(
            cipher
                .decrypt(
                    aes_gcm::Nonce::from_slice(nonce),
                    Payload {
                        msg: sealed,
                        aad: SEALED_AAD,
                    },
                )
                .map_err(|_| KeyError::WrongPassphrase)?,
        );
        Self::from_pkcs8_der(der)
    }

    /// PKCS#8 PEM, encrypted (PBES2: scrypt + AES-256-CBC) when `passphrase` is given.
    ///
    /// Used only to write key files; the result is zeroized on drop.
    pub fn to_pkcs8_pem(
        &self,
        passphrase: Option<&Passphrase>,
    ) -> Result<Zeroizing<String>, KeyError> {
        let fail = |e: &dyn std::fmt::Display| KeyError::Malformed {
            what: "private key",
            reason: e.to_string(),
        };
        let pem = match passphrase {
            None => {
                let doc =
                    SecretDocument::try_from(self.pkcs8_der.as_slice()).map_err(|e| fail(&e))?;
                doc.to_pem("PRIVATE KEY", LineEnding::LF)
                    .map_err(|e| fail(&e))?
            }
            Some(pass) => {
                let info =
                    PrivateKeyInfo::try_from(self.pkcs8_der.as_slice()).map_err(|e| fail(&e))?;
                let doc = info
                    .encrypt(rand::rngs::OsRng, pass.expose_secret())
                    .map_err(|e| fail(&e))?;
                doc.to_pem("ENCRYPTED PRIVATE KEY", LineEnding::LF)
                    .map_err(|e| fail(&e))?
            }
        };
        Ok(pem)
    }
}

impl Unwrapper for PrivateKey {
    fn key_id(&self) -> KeyId {
        self.public.id()
    }

    fn scheme(&self) -> Scheme {
        self.public.scheme()
    }

    fn unwrap_dek(&self, wrapped: &[u8]) -> Result<DataKey, KeyOpError> {
        let oaep = match &self.inner {
            Inner::Rsa(oaep) => oaep,
            Inner::XWing(opener) => return opener.open(self.public.id(), wrapped),
        };
        if wrapped.len() != oaep.key_size_bytes() {
            return Err(KeyOpError::Unwrap);
        }
        let mut out = Zeroizing::new(vec![0u8; oaep.min_output_size()]);
        let plain = oaep
            .decrypt(&OAEP_SHA256_MGF1SHA256, wrapped, &mut out, Some(OAEP_LABEL))
            .map_err(|_| KeyOpError::Unwrap)?;
        if plain.len() != DATA_KEY_LEN {
            return Err(KeyOpError::Unwrap);
        }
        // Clear intermediates: `out` is zeroized on drop after the copy.
        DataKey::from_slice(plain).ok_or(KeyOpError::Unwrap)
    }
}

/// X-Wing's decapsulation (draft-connolly-cfrg-xwing-kem) and HPKE's base-mode open (RFC 9180
/// §5.1) of a v2 data key, with the expanded keys kept.
///
/// Why not `hpke`'s own open, which the sealing side uses: its X-Wing expands the seed again on
/// every decapsulation (SHAKE256, ML-KEM-768 key generation, an X25519 base-point
/// multiplication) and does the rest in portable Rust; measured with `cargo bench --bench
/// envelope` (open/x-wing), that made a v2 open only about 1.2x cheaper than an RSA-2048 one.
/// The draft allows keeping the expanded keys; with them, and ML-KEM-768 and X25519 on aws-lc-rs
/// (constant-time, assembly), the private-key work is a fraction of RSA's. What is hand-written
/// here (in `tokenvault_envelope::keys::xwing::aws`, shared with sealing) is X-Wing's combiner
/// and HPKE's key schedule for one suite, a handful of hashes, checked against the X-Wing
/// draft's vectors and against `hpke`'s own open (`xwing_tests.rs`).
struct XWingOpener {
    mlkem: aws_lc_rs::kem::DecapsulationKey,
    x25519: aws_lc_rs::agreement::PrivateKey,
    /// X25519 public key of the seed's X25519 half: part of the combiner's input.
    pk_x: [u8; 32],
}

impl XWingOpener {
    /// Expands the seed as the draft's key generation does: SHAKE256(seed, 96) gives
    /// ML-KEM-768's 64-byte seed (d ‖ z) and X25519's private key. Also returns the key pair's
    /// encapsulation key as the draft encodes it (ML-KEM-768's, then X25519's).
    fn new(seed: &[u8; 32]) -> Result<(Self, Vec<u8>), aws_lc_rs::error::Unspecified> {
        use shake::{ExtendableOutput as _, Update as _, XofReader as _};
        let mut expanded = Zeroizing::new([0u8; 96]);
        let mut shake = shake::Shake256::default();
        shake.update(seed);
        shake.finalize_xof().read(expanded.as_mut());
        let mut mlkem_seed = Zeroizing::new([0u8; 64]);
        mlkem_seed.copy_from_slice(&expanded[..64]);
        // ml-kem takes the seed by value; its copy is not ours to wipe (THREAT_MODEL.md, "What
        // is not zeroized").
        let dk = ml_kem::DecapsulationKey::<ml_kem::MlKem768>::from_seed((*mlkem_seed).into());
        #[expect(
            deprecated,
            reason = "aws-lc-rs takes an ML-KEM decapsulation key only in FIPS 203's expanded form"
        )]
        let expanded_dk =
            Zeroizing::new(ml_kem::ExpandedKeyEncoding::to_expanded_bytes(&dk).to_vec());
        let mlkem =
            aws_lc_rs::kem::DecapsulationKey::new(&aws_lc_rs::kem::ML_KEM_768, &expanded_dk)
                .map_err(|_| aws_lc_rs::error::Unspecified)?;
        let x25519 = aws_lc_rs::agreement::PrivateKey::from_private_key(
            &aws_lc_rs::agreement::X25519,
            &expanded[64..],
        )
        .map_err(|_| aws_lc_rs::error::Unspecified)?;
        let pk_x: [u8; 32] = x25519
            .compute_public_key()?
            .as_ref()
            .try_into()
            .map_err(|_| aws_lc_rs::error::Unspecified)?;
        let mut public = ml_kem::KeyExport::to_bytes(dk.encapsulation_key()).to_vec();
        public.extend_from_slice(&pk_x);
        Ok((
            Self {
                mlkem,
                x25519,
                pk_x,
            },
            public,
        ))
    }

    /// X-Wing's shared secret for `enc` (ML-KEM-768 ciphertext ‖ X25519 ciphertext):
    /// `SHA3-256(ss_M ‖ ss_X ‖ ct_X ‖ pk_X ‖ label)`. An X25519 half that gives an all-zero
    /// secret (a low-order point, which no honest sealer sends) is refused by aws-lc.
    fn decapsulate(&self, enc: &[u8]) -> Result<Zeroizing<[u8; 32]>, KeyOpError> {
        if enc.len() != xwing::XWING_ENC_LEN {
            return Err(KeyOpError::Unwrap);
        }
        let (ct_m, ct_x) = enc.split_at(1088);
        let ss_m = self
            .mlkem
            .decapsulate(aws_lc_rs::kem::Ciphertext::from(ct_m))
            .map_err(|_| KeyOpError::Unwrap)?;
        let peer =
            aws_lc_rs::agreement::UnparsedPublicKey::new(&aws_lc_rs::agreement::X25519, ct_x);
        aws_lc_rs::agreement::agree(&self.x25519, peer, KeyOpError::Unwrap, |ss_x| {
            Ok(xwing::aws::combine(ss_m.as_ref(), ss_x, ct_x, &self.pk_x))
        })
    }

    /// HPKE's open of a v2 data key (`enc ‖ sealed`, see `tokenvault_envelope::keys::xwing`).
    /// Any 1,120 bytes decapsulate (ML-KEM's implicit rejection), so a forged enc yields a wrong
    /// key and fails the tag like any other tampering: one [`KeyOpError::Unwrap`] for every
    /// failure.
    fn open(&self, id: KeyId, wrapped: &[u8]) -> Result<DataKey, KeyOpError> {
        if wrapped.len() != xwing::XWING_ENC_LEN + xwing::SEALED_DEK_LEN {
            return Err(KeyOpError::Unwrap);
        }
        let (enc, sealed) = wrapped.split_at(xwing::XWING_ENC_LEN);
        let ss = self.decapsulate(enc)?;
        let (key, nonce) =
            xwing::aws::context(ss.as_ref(), &xwing::hpke_info(xwing::KEM_ID_XWING, &id))
                .map_err(|_| KeyOpError::Unwrap)?;
        // The first and only message of the context: its nonce is the base nonce.
        let mut buffer = Zeroizing::new(sealed.to_vec());
        let plain = key
            .open_in_place(nonce, aws_lc_rs::aead::Aad::empty(), &mut buffer)
            .map_err(|_| KeyOpError::Unwrap)?;
        DataKey::from_slice(plain).ok_or(KeyOpError::Unwrap)
    }
}

/// For this crate's tests: X-Wing's shared secret of `enc` under the private key `seed`,
/// through [`XWingOpener`] (the draft's vectors check it).
#[cfg(test)]
pub(crate) fn xwing_decapsulate_for_tests(
    seed: &[u8; 32],
    enc: &[u8],
) -> Result<[u8; 32], KeyOpError> {
    let (opener, _) = XWingOpener::new(seed).map_err(|_| KeyOpError::Unwrap)?;
    Ok(*opener.decapsulate(enc)?)
}

/// For this crate's tests: RFC 9180's key schedule as [`XWingOpener`] runs it, for another
/// suite id (RFC 9180 A.1.1 has no X-Wing vector).
#[cfg(test)]
pub(crate) fn hpke_key_schedule_for_tests(
    suite: [u8; 10],
    key_len: u16,
    shared_secret: &[u8],
    info: &[u8],
) -> (Vec<u8>, [u8; 12]) {
    let (key, nonce) = xwing::aws::key_schedule(suite, key_len, shared_secret, info);
    (key.to_vec(), nonce)
}
