//! The envelope v1 byte format (docs/ENVELOPE.md), encode and decode. No cryptography here.
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

use super::{FormatError, MAX_ENVELOPE_LEN};
use crate::keys::{KEY_ID_LEN, KeyId};

/// The three magic bytes every envelope starts with.
pub const MAGIC: &[u8; 3] = b"TVE";
/// The only format version this build writes and reads.
pub const VERSION_V1: u8 = 0x01;
/// AES-GCM nonce length.
pub const NONCE_LEN: usize = 12;
/// AES-GCM tag length.
pub const TAG_LEN: usize = 16;
/// Bytes before the wrapped data key.
pub const HEADER_LEN: usize = MAGIC.len() + 1 + KEY_ID_LEN + 2;
const MIN_WRAPPED: usize = 256;
const MAX_WRAPPED: usize = 512;

/// A decoded envelope, borrowing from the encoded bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EnvelopeRef<'a> {
    /// Fingerprint of the wrapping key.
    pub key_id: KeyId,
    /// RSA-OAEP ciphertext of the data key.
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
        if version != VERSION_V1 {
            return Err(FormatError::UnknownVersion(version));
        }
        let rest = &bytes[MAGIC.len() + 1..];
        let (key_id, rest) =
            split::<KEY_ID_LEN>(rest).ok_or(FormatError::Truncated("key fingerprint"))?;
        let (len, rest) = split::<2>(rest).ok_or(FormatError::Truncated("wrapped key length"))?;
        let wrapped_len = usize::from(u16::from_be_bytes(*len));
        if !(MIN_WRAPPED..=MAX_WRAPPED).contains(&wrapped_len) {
            return Err(FormatError::WrappedKeyLength(wrapped_len));
        }
        if rest.len() < wrapped_len {
            return Err(FormatError::Truncated("wrapped key"));
        }
        let (wrapped_dek, rest) = rest.split_at(wrapped_len);
        let (nonce, ciphertext) =
            split::<NONCE_LEN>(rest).ok_or(FormatError::Truncated("nonce"))?;
        if ciphertext.len() < TAG_LEN {
            return Err(FormatError::Truncated("ciphertext and tag"));
        }
        Ok(Self {
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

    /// Encodes the fields into a new envelope.
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(
            HEADER_LEN + self.wrapped_dek.len() + NONCE_LEN + self.ciphertext.len(),
        );
        out.extend_from_slice(MAGIC);
        out.push(VERSION_V1);
        out.extend_from_slice(&self.key_id.0);
        let len =
            u16::try_from(self.wrapped_dek.len()).expect("wrapped keys are at most 512 bytes");
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

    #[test]
    fn every_truncation_is_reported_as_truncated() {
        let bytes = sample();
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
    fn structural_errors_are_precise() {
        let mut bytes = sample();
        bytes[3] = 2;
        assert_eq!(
            EnvelopeRef::decode(&bytes),
            Err(FormatError::UnknownVersion(2))
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
    }
}
