//! # tokenvault-daemon
//!
//! The privileged daemon's library: everything that holds or uses a private key, serves gRPC
//! and HTTP, and runs the periodic jobs. The command line (`tokenvault serve`, `admin`, `keys`,
//! `store`) is the crate `tokenvault`, which re-exports these modules under the same paths
//! (`tokenvault::vault`, `tokenvault::server`, ...).
//!
//! Modules (see docs/ARCHITECTURE.md):
//! - [`keys`]: the sealing crate's public half, plus [`keys::PrivateKey`] and the keyring.
//! - [`rotation`]: the key lifecycle over a store: rewrap, retire, destroy.
//! - [`audit`]: the tamper-evident audit trail and its shipping.
//! - [`vault`]: the application core, every use case without a transport.
//! - [`config`], [`server`]: the daemon's configuration and its gRPC and HTTP/JSON adapters.
//! - [`provider`], [`proxy`], [`oauth`], [`grant`], [`security_event`]: upstream calls with the
//!   credential injected, token refresh, grants and provider security events.
//! - [`ca`]: the one place a CA file or the bundled roots become a rustls trust store.
//!
//! Must never: parse command-line arguments or print for a terminal (the CLI's), or reach a
//! test hook of the store outside its `testing` feature.

#![forbid(unsafe_code)]
#![deny(missing_docs)]
#![deny(rustdoc::broken_intra_doc_links)]

pub mod audit;
pub mod ca;
pub mod config;
pub mod grant;
pub mod keys;
pub mod oauth;
pub mod provider;
pub mod proxy;
pub mod rotation;
pub mod security_event;
pub mod server;
pub mod vault;
pub mod webhook;

pub use tokenvault_envelope::{Sealer, envelope, record, sealer, secret};
pub use tokenvault_proto as api;
pub use tokenvault_proto::client;
pub use tokenvault_store as store;

#[cfg(test)]
mod envelope_tests;
#[cfg(test)]
mod xwing_tests;

/// Unix seconds as an RFC 3339 UTC time (`2026-12-11T10:40:52Z`), for messages and output.
pub fn rfc3339(secs: i64) -> String {
    time::OffsetDateTime::from_unix_timestamp(secs)
        .ok()
        .and_then(|t| {
            t.format(&time::format_description::well_known::Rfc3339)
                .ok()
        })
        .unwrap_or_else(|| format!("@{secs}"))
}

/// The current time as Unix seconds.
pub fn unix_now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX))
}
