//! CA certificates for rustls: the one way every place that trusts a CA loads it (the
//! database's `store.ca_file`, a provider's `ca_file`, the mutual-TLS `client_ca_file`, the
//! CLI's `--ca-file`), so each refuses the same bad file for the same reasons and a client
//! configuration is built with the same crypto provider and protocol versions everywhere.
//!
//! Owns: reading PEM certificates, the trust store (a CA file, or the bundled Mozilla roots),
//! and the rustls client configuration on aws-lc-rs. Must never: trust the operating system's
//! store implicitly, or accept a file that holds no certificate (an empty trust store would
//! refuse every server, which reads as an outage rather than a configuration error). Callers
//! wrap [`CaError`] with the setting and path they read it from.

use std::path::Path;
use std::sync::Arc;

use rustls::pki_types::CertificateDer;
use rustls::pki_types::pem::PemObject as _;
use thiserror::Error;

/// Why a CA file or PEM cannot be trusted.
#[derive(Debug, Error)]
#[non_exhaustive]
pub enum CaError {
    /// The file could not be read.
    #[error("{0}")]
    Read(#[from] std::io::Error),
    /// A PEM block is malformed.
    #[error("{0}")]
    Pem(String),
    /// No certificate in it.
    #[error("holds no PEM certificate")]
    Empty,
    /// rustls refused a certificate as a trust anchor.
    #[error("{0}")]
    Refused(String),
}

/// The certificates in `pem`, in order; at least one.
pub fn certificates(pem: &[u8]) -> Result<Vec<CertificateDer<'static>>, CaError> {
    let certs = CertificateDer::pem_slice_iter(pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| CaError::Pem(e.to_string()))?;
    if certs.is_empty() {
        return Err(CaError::Empty);
    }
    Ok(certs)
}

/// A trust store of the certificates in `pem`.
pub fn roots_from_pem(pem: &[u8]) -> Result<rustls::RootCertStore, CaError> {
    let mut roots = rustls::RootCertStore::empty();
    for cert in certificates(pem)? {
        roots
            .add(cert)
            .map_err(|e| CaError::Refused(e.to_string()))?;
    }
    Ok(roots)
}

/// A trust store of the certificates in the file at `path`.
pub fn roots_from_file(path: &Path) -> Result<rustls::RootCertStore, CaError> {
    roots_from_pem(&std::fs::read(path)?)
}

/// The bundled Mozilla roots (`webpki-roots`): what a public provider's certificate chains to.
pub fn mozilla_roots() -> rustls::RootCertStore {
    rustls::RootCertStore {
        roots: webpki_roots::TLS_SERVER_ROOTS.to_vec(),
    }
}

/// The certificates in `pem` if given, otherwise [`mozilla_roots`].
pub fn roots_or_mozilla(pem: Option<&[u8]>) -> Result<rustls::RootCertStore, CaError> {
    pem.map_or_else(|| Ok(mozilla_roots()), roots_from_pem)
}

/// The start of every client configuration: rustls on aws-lc-rs with its safe protocol
/// versions, trusting `roots`.
pub fn client_builder(
    roots: rustls::RootCertStore,
) -> Result<
    rustls::ConfigBuilder<rustls::ClientConfig, rustls::client::WantsClientCert>,
    rustls::Error,
> {
    Ok(rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::aws_lc_rs::default_provider(),
    ))
    .with_safe_default_protocol_versions()?
    .with_root_certificates(roots))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bad_ca_files_are_refused_for_what_they_are() {
        assert!(matches!(certificates(b"just text\n"), Err(CaError::Empty)));
        assert_eq!(
            certificates(b"")
                .map(|c| c.len())
                .expect_err("empty")
                .to_string(),
            "holds no PEM certificate"
        );
        let broken = b"-----BEGIN CERTIFICATE-----\n!!!!\n-----END CERTIFICATE-----\n";
        assert!(matches!(certificates(broken), Err(CaError::Pem(_))));
        let missing = roots_from_file(Path::new("/nonexistent/ca.pem")).expect_err("missing");
        assert!(missing.to_string().contains("No such file"), "{missing}");
        // A certificate rustls cannot use as a trust anchor (not DER of a certificate).
        let garbage = b"-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n";
        assert!(matches!(roots_from_pem(garbage), Err(CaError::Refused(_))));
        assert!(!roots_or_mozilla(None).expect("bundled").is_empty());
        assert_eq!(mozilla_roots().len(), webpki_roots::TLS_SERVER_ROOTS.len());
    }

    #[test]
    fn a_ca_file_is_trusted_alone() {
        let ca = rcgen::generate_simple_self_signed(vec!["ca.test".into()]).expect("cert");
        let pem = ca.cert.pem();
        let roots = roots_or_mozilla(Some(pem.as_bytes())).expect("roots");
        assert_eq!(
            roots.len(),
            1,
            "only the file's certificate, not the bundled roots"
        );
        client_builder(roots)
            .expect("builder")
            .with_no_client_auth();
    }
}
