//! RSA public keys: SPKI import/export and OAEP wrapping of data keys.
//!
//! Two wrapping backends implement [`Wrapper`]: [`PublicKey`] itself uses `aws-lc-rs` when the
//! `aws-lc` feature is on (the default; about 9x faster than the `rsa` crate), and
//! [`RustCryptoWrapper`] uses the pure-Rust `rsa` crate for web tiers that cannot build C. Both
//! produce interchangeable envelopes. Only public-key operations live here.

use rand_core::CryptoRngCore;
use rsa::pkcs1::DecodeRsaPublicKey;
use rsa::pkcs8::{DecodePublicKey, EncodePublicKey, LineEnding};
use rsa::traits::PublicKeyParts;
use rsa::{Oaep, RsaPublicKey};
use sha2::Sha256;

use super::{
    KeyError, KeyId, KeyOpError, MAX_RSA_BITS, MIN_RSA_BITS, OAEP_LABEL, WrappedDek, Wrapper,
};
use crate::secret::DataKey;

/// An RSA public key that wraps data keys.
#[derive(Clone)]
pub struct PublicKey {
    id: KeyId,
    spki_der: Vec<u8>,
    rsa: RsaPublicKey,
    #[cfg(feature = "aws-lc")]
    aws: std::sync::Arc<aws_lc_rs::rsa::OaepPublicEncryptingKey>,
}

impl std::fmt::Debug for PublicKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PublicKey")
            .field("id", &self.id)
            .field("bits", &self.bits())
            .finish()
    }
}

impl PublicKey {
    /// Parses a SubjectPublicKeyInfo DER encoding of an RSA 2048-4096 bit key.
    pub fn from_spki_der(der: &[u8]) -> Result<Self, KeyError> {
        if let Ok(spki) = spki::SubjectPublicKeyInfoRef::try_from(der) {
            require_rsa("public key", spki.algorithm.oid)?;
        }
        let rsa = RsaPublicKey::from_public_key_der(der).map_err(|e| KeyError::Malformed {
            what: "public key",
            reason: e.to_string(),
        })?;
        Self::from_rsa(rsa)
    }

    /// Parses PEM: `PUBLIC KEY` (SPKI, as written by `openssl pkey -pubout`) or
    /// `RSA PUBLIC KEY` (PKCS#1).
    pub fn from_pem(pem: &str) -> Result<Self, KeyError> {
        let label = pem_label(pem)?;
        let rsa = match label.as_str() {
            "PUBLIC KEY" => {
                let (_, doc) = spki::Document::from_pem(pem).map_err(|e| KeyError::Malformed {
                    what: "public key",
                    reason: e.to_string(),
                })?;
                return Self::from_spki_der(doc.as_bytes());
            }
            "RSA PUBLIC KEY" => {
                RsaPublicKey::from_pkcs1_pem(pem).map_err(|e| KeyError::Malformed {
                    what: "public key",
                    reason: e.to_string(),
                })?
            }
            _ => {
                return Err(KeyError::UnexpectedPem {
                    expected: "PUBLIC KEY",
                    found: label,
                });
            }
        };
        Self::from_rsa(rsa)
    }

    /// The RSA public key with big-endian `modulus` and `exponent` (as a PKCS#11 token gives
    /// them: `CKA_MODULUS`, `CKA_PUBLIC_EXPONENT`).
    pub fn from_rsa_parts(modulus: &[u8], exponent: &[u8]) -> Result<Self, KeyError> {
        let rsa = RsaPublicKey::new(
            rsa::BigUint::from_bytes_be(modulus),
            rsa::BigUint::from_bytes_be(exponent),
        )
        .map_err(|e| KeyError::Malformed {
            what: "public key",
            reason: e.to_string(),
        })?;
        Self::from_rsa(rsa)
    }

    #[doc(hidden)]
    pub fn from_rsa(rsa: RsaPublicKey) -> Result<Self, KeyError> {
        let bits = rsa.n().bits();
        if !(MIN_RSA_BITS..=MAX_RSA_BITS).contains(&bits) {
            return Err(KeyError::UnsupportedSize { bits });
        }
        let spki_der = rsa
            .to_public_key_der()
            .map_err(|e| KeyError::Malformed {
                what: "public key",
                reason: e.to_string(),
            })?
            .into_vec();
        #[cfg(feature = "aws-lc")]
        let aws = aws_lc_rs::rsa::PublicEncryptingKey::from_der(&spki_der)
            .ok()
            .and_then(|k| aws_lc_rs::rsa::OaepPublicEncryptingKey::new(k).ok())
            .map(std::sync::Arc::new)
            .ok_or_else(|| KeyError::Malformed {
                what: "public key",
                reason: "rejected by aws-lc".into(),
            })?;
        Ok(Self {
            id: KeyId::of_spki_der(&spki_der),
            spki_der,
            rsa,
            #[cfg(feature = "aws-lc")]
            aws,
        })
    }

    /// Fingerprint of this key.
    pub fn id(&self) -> KeyId {
        self.id
    }

    /// SubjectPublicKeyInfo DER.
    pub fn spki_der(&self) -> &[u8] {
        &self.spki_der
    }

    /// SubjectPublicKeyInfo PEM (`-----BEGIN PUBLIC KEY-----`).
    pub fn to_pem(&self) -> String {
        spki_pem(&self.spki_der)
    }

    /// Modulus size in bits.
    pub fn bits(&self) -> usize {
        self.rsa.n().bits()
    }

    /// Size of a wrapped data key (the modulus size) in bytes.
    pub fn wrapped_len(&self) -> usize {
        self.rsa.size()
    }

    /// The pure-Rust wrapping backend for this key.
    pub fn rust_crypto(&self) -> RustCryptoWrapper<'_> {
        RustCryptoWrapper(self)
    }
}

#[cfg(feature = "aws-lc")]
impl Wrapper for PublicKey {
    fn key_id(&self) -> KeyId {
        self.id
    }

    fn wrap_dek(
        &self,
        dek: &DataKey,
        _rng: &mut dyn CryptoRngCore,
    ) -> Result<WrappedDek, KeyOpError> {
        let mut out = vec![0u8; self.aws.ciphertext_size()];
        let len = self
            .aws
            .encrypt(
                &aws_lc_rs::rsa::OAEP_SHA256_MGF1SHA256,
                dek.expose_secret(),
                &mut out,
                Some(OAEP_LABEL),
            )
            .map_err(|_| KeyOpError::Wrap)?
            .len();
        out.truncate(len);
        Ok(WrappedDek(out))
    }
}

#[cfg(not(feature = "aws-lc"))]
impl Wrapper for PublicKey {
    fn key_id(&self) -> KeyId {
        self.id
    }

    fn wrap_dek(
        &self,
        dek: &DataKey,
        rng: &mut dyn CryptoRngCore,
    ) -> Result<WrappedDek, KeyOpError> {
        self.rust_crypto().wrap_dek(dek, rng)
    }
}

/// Wraps data keys with the pure-Rust `rsa` crate (public-key operations only, which
/// RUSTSEC-2023-0071 does not affect).
#[derive(Debug, Clone, Copy)]
pub struct RustCryptoWrapper<'a>(&'a PublicKey);

impl Wrapper for RustCryptoWrapper<'_> {
    fn key_id(&self) -> KeyId {
        self.0.id
    }

    fn wrap_dek(
        &self,
        dek: &DataKey,
        mut rng: &mut dyn CryptoRngCore,
    ) -> Result<WrappedDek, KeyOpError> {
        let label = std::str::from_utf8(OAEP_LABEL).expect("the OAEP label is ASCII");
        let padding = Oaep::new_with_label::<Sha256, _>(label);
        self.0
            .rsa
            .encrypt(&mut rng, padding, dek.expose_secret())
            .map(WrappedDek)
            .map_err(|_| KeyOpError::Wrap)
    }
}

/// SubjectPublicKeyInfo DER as PEM (`PUBLIC KEY`, LF, 64 columns, as OpenSSL writes it). Pure
/// encoding: callers that already hold the DER need not parse the key again.
pub fn spki_pem(spki_der: &[u8]) -> String {
    pkcs8::der::pem::encode_string("PUBLIC KEY", LineEnding::LF, spki_der)
        .expect("PEM encoding of bytes cannot fail")
}

/// The label of the first PEM block in `pem`, which must have its END line (the decoder
/// would otherwise report a missing END as a bad BEGIN boundary).
#[doc(hidden)]
pub fn pem_label(pem: &str) -> Result<String, KeyError> {
    let mut lines = pem.lines().map(str::trim);
    let label = lines
        .find_map(|l| {
            l.strip_prefix("-----BEGIN ")
                .and_then(|l| l.strip_suffix("-----"))
        })
        .map(str::to_owned)
        .ok_or(KeyError::NotPem)?;
    let end = format!("-----END {label}-----");
    if !lines.any(|l| l == end) {
        return Err(KeyError::PemMissingEnd { label });
    }
    Ok(label)
}

/// Refuses a key whose algorithm is not rsaEncryption, naming the algorithm it has.
#[doc(hidden)]
pub fn require_rsa(what: &'static str, oid: pkcs8::ObjectIdentifier) -> Result<(), KeyError> {
    let algorithm = match oid.to_string().as_str() {
        "1.2.840.113549.1.1.1" => return Ok(()),
        "1.2.840.10045.2.1" => "EC (id-ecPublicKey)".to_string(),
        "1.2.840.113549.1.1.10" => "RSASSA-PSS".to_string(),
        "1.3.101.110" => "X25519".to_string(),
        "1.3.101.111" => "X448".to_string(),
        "1.3.101.112" => "Ed25519".to_string(),
        "1.3.101.113" => "Ed448".to_string(),
        "1.2.840.10040.4.1" => "DSA".to_string(),
        "1.2.840.10046.2.1" => "DH (dhpublicnumber)".to_string(),
        other => format!("OID {other}"),
    };
    Err(KeyError::NotRsa { what, algorithm })
}
