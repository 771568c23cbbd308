//! # tokenvault-envelope
//!
//! What a web tier needs to seal OAuth tokens for tokenvault, and nothing that can open them:
//! the at-rest envelope format (docs/ENVELOPE.md), the [`Sealer`] over the vault's RSA
//! **public** key, public keys and their fingerprints, record identities and the zeroizing
//! secret types. It has no gRPC, no async runtime, no store and no private-key code; the
//! daemon crate (`tokenvault`) builds on it and re-exports every module under the same path.
//!
//! - [`secret`]: zeroizing, redacted newtypes for every secret.
//! - [`record`]: validated record identity and metadata.
//! - [`envelope`]: the at-rest format, seal, and open given an [`keys::Unwrapper`].
//! - [`keys`]: fingerprints, the [`keys::Wrapper`] / [`keys::Unwrapper`] traits, RSA-OAEP
//!   wrapping with a public key.
//! - [`sealer`]: the web tier's entry point.
//!
//! Cargo feature `aws-lc` wraps data keys with aws-lc-rs; without it the pure-Rust `rsa` crate
//! does (public-key operations only).

#![forbid(unsafe_code)]
#![deny(rustdoc::broken_intra_doc_links)]

pub mod envelope;
pub mod keys;
pub mod record;
pub mod sealer;
pub mod secret;

pub use sealer::Sealer;
