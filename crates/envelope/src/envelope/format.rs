//! The envelope byte formats (docs/ENVELOPE.md), encode and decode. No cryptography here.
//!
//! Version 1 (RSA-OAEP):
//!
//! ```text
//! offset  size  field
//! 0       3     magic "TVE" (0x54 0x56 0x45)
//! 3       1     format version, 0x01
//! 4       32    key fingerprint: SHA-256(SPKI DER of the wrapping public key)
//! 36      2     n = wrapped data key length, big-endian, 256..=512
//! 38      n     wrapped data key: RSA-OAEP(SHA-256, MGF1-SHA-256, label "tokenvault/v1/dek")
//! 38+n    12    AES-256-GCM nonce
//! 50+n    rest  AES-256-GCM ciphertext ‖ 16-byte tag
//! ```
//!
//! Version 2 (HPKE): the data key and token ciphertext are v1's, byte for byte, so rewrap moves
//! a record between the versions without touching its ciphertext.
//!
//! ```text
//! offset  size  field
//! 0       3     magic "TVE"
//! 3       1     format version, 0x02
//! 4       2     HPKE KEM id, big-endian: 0x647A (X-Wing)
//! 6       32    key fingerprint: SHA-256 of the recipient's encapsulation key
//! 38      2     n = length of HPKE's enc, big-endian: the KEM's (1120 for X-Wing)
//! 40      n     enc
//! 40+n    48    sealed data key: HPKE ciphertext of the 32-byte data key ‖ 16-byte tag
//! 88+n    12    AES-256-GCM nonce
//! 100+n   rest  AES-256-GCM ciphertext ‖ 16-byte tag
//! ```

use super::{FormatError, MAX_ENVELOPE_LEN, MAX_ENVELOPE_LEN_V1};
use crate::keys::xwing::{KEM_ID_XWING, SEALED_DEK_LEN, XWING_ENC_LEN};
use crate::keys::{KEY_ID_LEN, KeyId, Scheme};

/// The three magic bytes every envelope starts with.
pub const MAGIC: &[u8; 3] = b"TVE";
/// Format version 1: the data key wrapped with RSA-OAEP. It is also the version byte of every
/// envelope's associated data (v2 keeps v1's token ciphertext as it is).
pub const VERSION_V1: u8 = 0x01;
/// Format version 2: the data key sealed with HPKE.
pub const VERSION_V2: u8 = 0x02;
/// AES-GCM nonce length.
pub const NONCE_LEN: usize = 12;
/// AES-GCM tag length.
pub const TAG_LEN: usize = 16;
/// Bytes before the wrapped data key (v1).
pub const HEADER_LEN: usize = MAGIC.len() + 1 + KEY_ID_LEN + 2;
/// Bytes before HPKE's enc (v2).
pub const HEADER_LEN_V2: usize = MAGIC.len() + 1 + 2 + KEY_ID_LEN + 2;

/// The length of HPKE's enc for a KEM this build knows.
pub fn enc_len(kem: u16) -> Option<usize> {
    match kem {
        KEM_ID_XWING => Some(XWING_ENC_LEN),
        _ => None,
    }
}
const MIN_WRAPPED: usize = 256;
const MAX_WRAPPED: usize = 512;

/// A decoded envelope, borrowing from the encoded bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EnvelopeRef<'a> {
    /// How the data key is wrapped, and so the format version.
    pub scheme: Scheme,
    /// Fingerprint of the wrapping key.
    pub key_id: KeyId,
    /// The wrapped data key: RSA-OAEP ciphertext (v1), or HPKE's enc followed by the sealed
    /// data key (v2).
    pub wrapped_dek: &'a [u8],
    /// AES-GCM nonce.
    pub nonce: &'a [u8; NONCE_LEN],
    /// AES-GCM ciphertext followed by the tag.
    pub ciphertext: &'a [u8],
}

impl<'a> EnvelopeRef<'a> {
    /// Decodes and checks structure only; authenticity is checked by opening.
    pub fn decode(bytes: &'a [u8]) -> Result<Self, FormatError> {
        if bytes.len() > MAX_ENVELOPE_LEN {
            return Err(FormatError::TooLarge {
                len: bytes.len(),
                max: MAX_ENVELOPE_LEN,
            });
        }
        if bytes.len() < MAGIC.len() {
            return Err(FormatError::Truncated("magic"));
        }
        if &bytes[..MAGIC.len()] != MAGIC {
            return Err(FormatError::BadMagic);
        }
        let version = *bytes
            .get(MAGIC.len())
            .ok_or(FormatError::Truncated("version"))?;
        let rest = &bytes[MAGIC.len() + 1..];
        let (scheme, rest) = match version {
            VERSION_V1 if bytes.len() > MAX_ENVELOPE_LEN_V1 => {
                return Err(FormatError::TooLarge {
                    len: bytes.len(),
                    max: MAX_ENVELOPE_LEN_V1,
                });
            }
            VERSION_V1 => (Scheme::RsaOaep, rest),
            VERSION_V2 => {
                let (kem, rest) = split::<2>(rest).ok_or(FormatError::Truncated("KEM id"))?;
                let kem = u16::from_be_bytes(*kem);
                enc_len(kem).ok_or(FormatError::UnknownKem(kem))?;
                (Scheme::Hpke(kem), rest)
            }
            _ => return Err(FormatError::UnknownVersion(version)),
        };
        let (key_id, rest) =
            split::<KEY_ID_LEN>(rest).ok_or(FormatError::Truncated("key fingerprint"))?;
        let (wrapped_dek, rest) = match scheme {
            Scheme::RsaOaep => {
                let (len, rest) =
                    split::<2>(rest).ok_or(FormatError::Truncated("wrapped key length"))?;
                let wrapped_len = usize::from(u16::from_be_bytes(*len));
                if !(MIN_WRAPPED..=MAX_WRAPPED).contains(&wrapped_len) {
                    return Err(FormatError::WrappedKeyLength(wrapped_len));
                }
                if rest.len() < wrapped_len {
                    return Err(FormatError::Truncated("wrapped key"));
                }
                rest.split_at(wrapped_len)
            }
            Scheme::Hpke(kem) => {
                let (len, rest) =
                    split::<2>(rest).ok_or(FormatError::Truncated("encapsulation length"))?;
                let len = usize::from(u16::from_be_bytes(*len));
                let expected = enc_len(kem).ok_or(FormatError::UnknownKem(kem))?;
                if len != expected {
                    return Err(FormatError::EncapsulationLength { kem, len, expected });
                }
                if rest.len() < len {
                    return Err(FormatError::Truncated("encapsulation"));
                }
                if rest.len() < len + SEALED_DEK_LEN {
                    return Err(FormatError::Truncated("sealed data key"));
                }
                rest.split_at(len + SEALED_DEK_LEN)
            }
        };
        let (nonce, ciphertext) =
            split::<NONCE_LEN>(rest).ok_or(FormatError::Truncated("nonce"))?;
        if ciphertext.len() < TAG_LEN {
            return Err(FormatError::Truncated("ciphertext and tag"));
        }
        Ok(Self {
            scheme,
            key_id: KeyId(*key_id),
            wrapped_dek,
            nonce,
            ciphertext,
        })
    }

    /// Length of the sealed secret: the ciphertext length less the tag (AES-GCM adds nothing
    /// else), so the daemon can enforce the secret's size without opening the envelope.
    pub fn secret_len(&self) -> usize {
        self.ciphertext.len().saturating_sub(TAG_LEN)
    }

    /// Encodes the fields into a new envelope, in the format version of its scheme.
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(
            HEADER_LEN_V2 + self.wrapped_dek.len() + NONCE_LEN + self.ciphertext.len(),
        );
        out.extend_from_slice(MAGIC);
        out.push(self.scheme.format_version());
        // The length field is v1's wrapped key, or v2's enc (the sealed data key after it has
        // a fixed length).
        let len = match self.scheme {
            Scheme::RsaOaep => self.wrapped_dek.len(),
            Scheme::Hpke(kem) => {
                out.extend_from_slice(&kem.to_be_bytes());
                self.wrapped_dek.len().saturating_sub(SEALED_DEK_LEN)
            }
        };
        out.extend_from_slice(&self.key_id.0);
        let len = u16::try_from(len).expect("wrapped keys and encapsulations are below 64 KiB");
        out.extend_from_slice(&len.to_be_bytes());
        out.extend_from_slice(self.wrapped_dek);
        out.extend_from_slice(self.nonce);
        out.extend_from_slice(self.ciphertext);
        out
    }
}

fn split<const N: usize>(bytes: &[u8]) -> Option<(&[u8; N], &[u8])> {
    let (head, tail) = bytes.split_first_chunk::<N>()?;
    Some((head, tail))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Vec<u8> {
        let wrapped = [0xAA; 256];
        let nonce = [0x11; NONCE_LEN];
        let ct = [0x22; 20];
        EnvelopeRef {
            scheme: Scheme::RsaOaep,
            key_id: KeyId([7; 32]),
            wrapped_dek: &wrapped,
            nonce: &nonce,
            ciphertext: &ct,
        }
        .encode()
    }

    #[test]
    fn encode_decode_round_trip_and_layout() {
        let bytes = sample();
        assert_eq!(&bytes[..4], b"TVE\x01");
        assert_eq!(&bytes[36..38], &[0x01, 0x00]);
        assert_eq!(bytes.len(), HEADER_LEN + 256 + 12 + 20);
        let env = EnvelopeRef::decode(&bytes).expect("valid");
        assert_eq!(env.key_id, KeyId([7; 32]));
        assert_eq!(env.wrapped_dek, &[0xAA; 256][..]);
        assert_eq!(env.nonce, &[0x11; 12]);
        assert_eq!(env.ciphertext, &[0x22; 20][..]);
        assert_eq!(env.secret_len(), 4);
        assert_eq!(env.encode(), bytes);
    }

    /// Every cut of `bytes` short of a whole tag (the samples' secrets are 4 bytes) is
    /// reported as truncated.
    fn assert_every_cut_is_truncated(bytes: &[u8]) {
        let tag_start = bytes.len() - 20 + 16;
        for cut in 0..tag_start {
            let err = EnvelopeRef::decode(&bytes[..cut]).expect_err("truncated must fail");
            assert!(
                matches!(err, FormatError::Truncated(_)),
                "cut {cut}: {err:?}"
            );
        }
    }

    #[test]
    fn every_truncation_is_reported_as_truncated() {
        assert_every_cut_is_truncated(&sample());
    }

    #[test]
    fn structural_errors_are_precise() {
        let mut bytes = sample();
        bytes[3] = 3;
        assert_eq!(
            EnvelopeRef::decode(&bytes),
            Err(FormatError::UnknownVersion(3))
        );
        let mut bytes = sample();
        bytes[0] = b'X';
        assert_eq!(EnvelopeRef::decode(&bytes), Err(FormatError::BadMagic));
        let mut bytes = sample();
        bytes[36..38].copy_from_slice(&100u16.to_be_bytes());
        assert_eq!(
            EnvelopeRef::decode(&bytes),
            Err(FormatError::WrappedKeyLength(100))
        );
        let big = vec![0u8; MAX_ENVELOPE_LEN + 1];
        assert!(matches!(
            EnvelopeRef::decode(&big),
            Err(FormatError::TooLarge { .. })
        ));
        let mut big_v1 = sample();
        big_v1.resize(MAX_ENVELOPE_LEN_V1 + 1, 0);
        assert_eq!(
            EnvelopeRef::decode(&big_v1),
            Err(FormatError::TooLarge {
                len: MAX_ENVELOPE_LEN_V1 + 1,
                max: MAX_ENVELOPE_LEN_V1
            })
        );
    }

    fn sample_v2() -> Vec<u8> {
        let wrapped = [0xAA; XWING_ENC_LEN + SEALED_DEK_LEN];
        let nonce = [0x11; NONCE_LEN];
        let ct = [0x22; 20];
        EnvelopeRef {
            scheme: Scheme::Hpke(KEM_ID_XWING),
            key_id: KeyId([7; 32]),
            wrapped_dek: &wrapped,
            nonce: &nonce,
            ciphertext: &ct,
        }
        .encode()
    }

    #[test]
    fn v2_layout_round_trips_and_keeps_the_token_ciphertext_where_the_spec_says() {
        let bytes = sample_v2();
        assert_eq!(&bytes[..6], b"TVE\x02\x64\x7a");
        assert_eq!(&bytes[6..38], &[7; 32]);
        assert_eq!(&bytes[38..40], &1120u16.to_be_bytes());
        assert_eq!(bytes.len(), 40 + 1120 + 48 + 12 + 20);
        assert_eq!(&bytes[88 + 1120..100 + 1120], &[0x11; 12]);
        let env = EnvelopeRef::decode(&bytes).expect("valid");
        assert_eq!(env.scheme, Scheme::Hpke(KEM_ID_XWING));
        assert_eq!(env.wrapped_dek.len(), 1120 + 48);
        assert_eq!(env.secret_len(), 4);
        assert_eq!(env.encode(), bytes);
    }

    #[test]
    fn v2_truncations_and_structural_errors_are_precise() {
        let bytes = sample_v2();
        assert_every_cut_is_truncated(&bytes);
        let mut unknown = bytes.clone();
        unknown[4..6].copy_from_slice(&0x0041u16.to_be_bytes());
        assert_eq!(
            EnvelopeRef::decode(&unknown),
            Err(FormatError::UnknownKem(0x0041))
        );
        let mut short = bytes.clone();
        short[38..40].copy_from_slice(&1088u16.to_be_bytes());
        assert_eq!(
            EnvelopeRef::decode(&short),
            Err(FormatError::EncapsulationLength {
                kem: KEM_ID_XWING,
                len: 1088,
                expected: 1120
            })
        );
        let big = vec![0u8; MAX_ENVELOPE_LEN + 1];
        assert!(matches!(
            EnvelopeRef::decode(&big),
            Err(FormatError::TooLarge { .. })
        ));
    }
}
