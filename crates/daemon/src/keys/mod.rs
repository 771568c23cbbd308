//! Key material: everything of [`tokenvault_envelope::keys`] (fingerprints, the wrapping
//! traits, public keys), plus what only the daemon has: the private half and the keyring.
//!
//! Architecture invariant: the private half lives only in `private` (in this crate, which a
//! web tier never links) and is reachable only through [`Unwrapper`]: no function returns
//! private key bytes except the explicit PEM export used to write key files.

pub mod keyring;
mod private;

pub use private::PrivateKey;
pub use tokenvault_envelope::keys::*;

/// Whether this build does its cryptography on aws-lc's FIPS 140-3 validated module (cargo
/// feature `fips`).
pub const FIPS_BUILD: bool = cfg!(feature = "fips");

/// In a FIPS build, that the module runs in FIPS mode (its power-on self tests passed); the
/// daemon does not start otherwise. Always `Ok` in other builds.
pub fn check_fips_mode() -> Result<(), String> {
    #[cfg(feature = "fips")]
    {
        aws_lc_rs::try_fips_mode().map_err(|e| format!("aws-lc is not in FIPS mode: {e}"))
    }
    #[cfg(not(feature = "fips"))]
    {
        Ok(())
    }
}
