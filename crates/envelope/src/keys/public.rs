//! Public keys of either algorithm a key version may have: RSA (2048-4096 bits; data keys
//! wrapped with RSA-OAEP, envelope v1) or X-Wing (data keys sealed with HPKE, envelope v2).
//! SPKI import/export and wrapping of data keys.
//!
//! Two RSA wrapping backends implement [`Wrapper`]: [`PublicKey`] itself uses `aws-lc-rs` when
//! the `aws-lc` feature is on (the default; about 9x faster than the `rsa` crate), and
//! [`RustCryptoWrapper`] uses the pure-Rust `rsa` crate for web tiers that cannot build C. Both
//! produce interchangeable envelopes. X-Wing has the same two (aws-lc-rs, or the pure-Rust
//! `hpke` crate through [`PublicKey::rust_crypto`]; [`super::xwing`]). Only public-key
//! operations live here.

use rand_core::CryptoRngCore;
use rsa::pkcs1::DecodeRsaPublicKey;
use rsa::pkcs8::{DecodePublicKey, EncodePublicKey, LineEnding};
use rsa::traits::PublicKeyParts;
use rsa::{Oaep, RsaPublicKey};
use sha2::Sha256;

use super::xwing::{self, XWingPublicKey};
use super::{
    Algorithm, KeyError, KeyId, KeyOpError, MAX_RSA_BITS, MIN_RSA_BITS, OAEP_LABEL, Scheme,
    WrappedDek, Wrapper,
};
use crate::secret::DataKey;

/// A public key that wraps data keys: RSA or X-Wing.
#[derive(Clone)]
pub struct PublicKey {
    id: KeyId,
    spki_der: Vec<u8>,
    kind: Kind,
}

#[derive(Clone)]
enum Kind {
    Rsa {
        rsa: RsaPublicKey,
        #[cfg(feature = "aws-lc")]
        aws: std::sync::Arc<aws_lc_rs::rsa::OaepPublicEncryptingKey>,
    },
    XWing(Box<XWingPublicKey>),
}

impl std::fmt::Debug for PublicKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PublicKey")
            .field("id", &self.id)
            .field("algorithm", &self.algorithm())
            .finish()
    }
}

impl PublicKey {
    /// Parses a SubjectPublicKeyInfo DER encoding of an RSA 2048-4096 bit key, or of an X-Wing
    /// key (`id-XWing`, its BIT STRING the draft's 1,216-byte encoding).
    pub fn from_spki_der(der: &[u8]) -> Result<Self, KeyError> {
        if let Ok(spki) = spki::SubjectPublicKeyInfoRef::try_from(der) {
            if spki.algorithm.oid == xwing::ID_XWING {
                let raw = spki
                    .subject_public_key
                    .as_bytes()
                    .ok_or(KeyError::Malformed {
                        what: "X-Wing public key",
                        reason: "its BIT STRING has unused bits".into(),
                    })?;
                let key = XWingPublicKey::from_bytes(raw)?;
                // Re-encoded, so the fingerprint is over the canonical DER.
                return Ok(Self::from_xwing(key));
            }
            require_rsa("public key", spki.algorithm.oid)?;
        }
        let rsa = RsaPublicKey::from_public_key_der(der).map_err(|e| KeyError::Malformed {
            what: "RSA public key",
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
                    what: "RSA public key",
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
            what: "RSA public key",
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
                what: "RSA public key",
                reason: e.to_string(),
            })?
            .into_vec();
        #[cfg(feature = "aws-lc")]
        let aws = aws_lc_rs::rsa::PublicEncryptingKey::from_der(&spki_der)
            .ok()
            .and_then(|k| aws_lc_rs::rsa::OaepPublicEncryptingKey::new(k).ok())
            .map(std::sync::Arc::new)
            .ok_or_else(|| KeyError::Malformed {
                what: "RSA public key",
                reason: "rejected by aws-lc".into(),
            })?;
        Ok(Self {
            id: KeyId::of_spki_der(&spki_der),
            spki_der,
            kind: Kind::Rsa {
                rsa,
                #[cfg(feature = "aws-lc")]
                aws,
            },
        })
    }

    /// The public key of an X-Wing key pair.
    pub fn from_xwing(key: XWingPublicKey) -> Self {
        let spki_der = xwing::spki_der(key.as_bytes());
        Self {
            id: KeyId::of_spki_der(&spki_der),
            spki_der,
            kind: Kind::XWing(Box::new(key)),
        }
    }

    /// The key's algorithm (and, for RSA, its size).
    pub fn algorithm(&self) -> Algorithm {
        match &self.kind {
            Kind::Rsa { rsa, .. } => Algorithm::Rsa(rsa.n().bits()),
            Kind::XWing(_) => Algorithm::XWing,
        }
    }

    /// How this key wraps data keys, and so the envelope version it seals.
    pub fn scheme(&self) -> Scheme {
        self.algorithm().scheme()
    }

    /// The raw public key as its algorithm encodes it outside SPKI: the X-Wing encapsulation
    /// key (1,216 bytes), or for RSA the SubjectPublicKeyInfo DER itself.
    pub fn raw(&self) -> &[u8] {
        match &self.kind {
            Kind::Rsa { .. } => &self.spki_der,
            Kind::XWing(k) => k.as_bytes(),
        }
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

    /// RSA modulus size in bits; `None` for X-Wing.
    pub fn bits(&self) -> Option<usize> {
        match self.algorithm() {
            Algorithm::Rsa(bits) => Some(bits),
            Algorithm::XWing => None,
        }
    }

    /// Size of a wrapped data key in bytes: the modulus size (RSA), or HPKE's enc and the
    /// sealed data key (X-Wing).
    pub fn wrapped_len(&self) -> usize {
        match &self.kind {
            Kind::Rsa { rsa, .. } => rsa.size(),
            Kind::XWing(_) => xwing::XWING_ENC_LEN + xwing::SEALED_DEK_LEN,
        }
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

    fn scheme(&self) -> Scheme {
        PublicKey::scheme(self)
    }

    fn wrap_dek(
        &self,
        dek: &DataKey,
        rng: &mut dyn CryptoRngCore,
    ) -> Result<WrappedDek, KeyOpError> {
        let aws = match &self.kind {
            Kind::Rsa { aws, .. } => aws,
            Kind::XWing(k) => return k.wrap_dek(dek, rng),
        };
        let mut out = vec![0u8; aws.ciphertext_size()];
        let len = aws
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

    fn scheme(&self) -> Scheme {
        PublicKey::scheme(self)
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

    fn scheme(&self) -> Scheme {
        self.0.scheme()
    }

    fn wrap_dek(
        &self,
        dek: &DataKey,
        mut rng: &mut dyn CryptoRngCore,
    ) -> Result<WrappedDek, KeyOpError> {
        let rsa = match &self.0.kind {
            Kind::Rsa { rsa, .. } => rsa,
            Kind::XWing(k) => return k.wrap_dek_hpke(dek, rng),
        };
        let label = std::str::from_utf8(OAEP_LABEL).expect("the OAEP label is ASCII");
        let padding = Oaep::new_with_label::<Sha256, _>(label);
        rsa.encrypt(&mut rng, padding, dek.expose_secret())
            .map(WrappedDek)
            .map_err(|_| KeyOpError::Wrap)
    }
}

/// The algorithm of a registered SubjectPublicKeyInfo and its raw public key (the X-Wing
/// encapsulation key; for RSA the SPKI DER itself), read without building the key (no
/// aws-lc, no ML-KEM decoding): what `PublicKeys` reports for each version. `None` for bytes
/// that are neither.
pub fn spki_algorithm(spki_der: &[u8]) -> Option<(Algorithm, &[u8])> {
    let spki = spki::SubjectPublicKeyInfoRef::try_from(spki_der).ok()?;
    if spki.algorithm.oid == xwing::ID_XWING {
        return Some((Algorithm::XWing, spki.subject_public_key.as_bytes()?));
    }
    let rsa = RsaPublicKey::from_public_key_der(spki_der).ok()?;
    Some((Algorithm::Rsa(rsa.n().bits()), spki_der))
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
        "1.3.6.1.4.1.62253.25722" => "X-Wing".to_string(),
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
