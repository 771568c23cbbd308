//! # tokenvault
//!
//! An encrypted vault for OAuth tokens built on asymmetric envelope encryption.
//!
//! The web tier seals each token with the vault's RSA **public** key ([`Sealer`]): a fresh
//! AES-256-GCM data key per token, wrapped with RSA-OAEP-SHA256, bound to the record's identity.
//! It can store sealed envelopes through the daemon's write-only `Ingest` service but can never
//! read one back. The privileged daemon (`tokenvault serve`, feature `daemon`) holds the
//! private keys, stores envelopes in RocksDB and hands decrypted tokens to authorized workers.
//!
//! This crate is the command line (`tokenvault`: `serve`, `admin`, `keys`, `store`, and the load
//! generator `tokenvault-bench`); the rest is re-exported from the workspace's crates under
//! the same paths (see docs/ARCHITECTURE.md): [`secret`], [`record`], [`envelope`], [`sealer`]
//! and the public half of [`keys`] are the crate `tokenvault-envelope`'s, [`web`] is the crate
//! `tokenvault-web`, [`api`] and [`client`] the crate `tokenvault-proto`'s, [`store`] the crate
//! `tokenvault-store`, and the daemon's modules (with feature `daemon`) the crate
//! `tokenvault-daemon`'s:
//! - [`secret`]: zeroizing, redacted newtypes for every secret.
//! - [`record`]: validated record identity and metadata.
//! - [`envelope`]: the at-rest format (docs/ENVELOPE.md), seal and open.
//! - [`keys`]: fingerprints, RSA-OAEP wrap/unwrap, the keyring.
//! - [`rotation`]: the key lifecycle over a store: rewrap, retire, destroy (feature `daemon`).
//! - [`sealer`]: the web tier's library entry point (public keys only); [`web`]: its OAuth
//!   callback (state, nonce, PKCE S256).
//! - [`store`]: the `TokenStore` traits and the engines: RocksDB, PostgreSQL, memory
//!   (feature `daemon`).
//! - [`api`]: generated gRPC types (`tokenvault.v1`); [`client`]: the bearer interceptor.
//! - [`vault`]: the application core, every use case without a transport (feature `daemon`).
//! - [`config`], [`server`], [`cli`]: the daemon's configuration, its gRPC adapters and the
//!   command line (feature `daemon`).
//! - [`provider`], [`proxy`], [`oauth`]: upstream calls with the credential injected, and
//!   token refresh (feature `daemon`).
//!
//! Cargo features: `aws-lc` (default) seals with aws-lc-rs; without it sealing uses the
//! pure-Rust `rsa` crate (public-key operations only). `daemon` (default) adds everything that
//! touches private keys or RocksDB; a web tier depends on tokenvault with
//! `default-features = false` and cannot link the private-key code at all.

#![forbid(unsafe_code)]
#![deny(missing_docs)]
#![deny(rustdoc::broken_intra_doc_links)]

#[cfg(feature = "daemon")]
pub mod cli;

#[cfg(feature = "daemon")]
pub use tokenvault_daemon::{
    audit, ca, config, grant, keys, oauth, provider, proxy, rotation, security_event, server,
    store, unix_now, vault,
};
#[cfg(not(feature = "daemon"))]
pub use tokenvault_envelope::keys;
pub use tokenvault_envelope::{Sealer, envelope, record, sealer, secret};
pub use tokenvault_proto as api;
pub use tokenvault_proto::client;
pub use tokenvault_web as web;

/// docs/WEB_TIER.md's Rust block (written against `tokenvault::web`) runs as a doc test.
#[cfg(doctest)]
#[doc = include_str!("../docs/WEB_TIER.md")]
struct WebTierDoc;
