//! Key material: everything of [`tokenvault_envelope::keys`] (fingerprints, the wrapping
//! traits, public keys), plus what only the daemon has: the private half and the keyring.
//!
//! Architecture invariant: the private half lives only in `private` (behind the `daemon`
//! feature) and is reachable only through [`Unwrapper`]: no function returns private key bytes
//! except the explicit PEM export used to write key files.

pub mod keyring;
mod private;

pub use private::PrivateKey;
pub use tokenvault_envelope::keys::*;
