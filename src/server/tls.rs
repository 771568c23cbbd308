//! TLS and mutual TLS for the gRPC listener, and client-certificate identities.
//!
//! Owns: loading the server certificate, key and client CA from PEM files into tonic's
//! `ServerTlsConfig` (rustls on aws-lc-rs), and [`client_identities`], which reads the names a
//! client certificate asserts (SAN DNS names and URIs, then the subject CN) so `auth` can map
//! them to a configured caller. rustls has already verified the chain against the client CA
//! before a request gets here.
//!
//! Must never: accept a TLS private key file readable by group or others.

use std::os::unix::fs::PermissionsExt as _;
use std::path::Path;

use tonic::transport::{Certificate, Identity, ServerTlsConfig};
use x509_cert::der::Decode as _;
use x509_cert::ext::pkix::SubjectAltName;
use x509_cert::ext::pkix::name::GeneralName;

use crate::config::TlsConfig;

/// The OID of the X.520 commonName attribute (2.5.4.3).
const COMMON_NAME: x509_cert::der::oid::ObjectIdentifier =
    x509_cert::der::oid::ObjectIdentifier::new_unwrap("2.5.4.3");

/// Why the listener's TLS configuration could not be loaded.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum TlsSetupError {
    /// A certificate or key file could not be read.
    #[error("{what} {}: {source}", path.display())]
    Read {
        /// Which file ("TLS certificate", "TLS key", "client CA").
        what: &'static str,
        /// Its path.
        path: std::path::PathBuf,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// The private key file is readable by others.
    #[error("TLS key {} is readable by group or others (mode {mode:o}); chmod 600 it", path.display())]
    KeyPermissions {
        /// Its path.
        path: std::path::PathBuf,
        /// Its permission bits.
        mode: u32,
    },
}

fn read(path: &Path, what: &'static str) -> Result<Vec<u8>, TlsSetupError> {
    std::fs::read(path).map_err(|source| TlsSetupError::Read {
        what,
        path: path.to_path_buf(),
        source,
    })
}

/// Builds the listener's TLS configuration from `tls`.
pub fn server_config(tls: &TlsConfig) -> Result<ServerTlsConfig, TlsSetupError> {
    let mode = std::fs::metadata(&tls.key_file)
        .map_err(|source| TlsSetupError::Read {
            what: "TLS key",
            path: tls.key_file.clone(),
            source,
        })?
        .permissions()
        .mode();
    if mode & 0o077 != 0 {
        return Err(TlsSetupError::KeyPermissions {
            path: tls.key_file.clone(),
            mode: mode & 0o777,
        });
    }
    let cert = read(&tls.cert_file, "TLS certificate")?;
    let key = zeroize::Zeroizing::new(read(&tls.key_file, "TLS key")?);
    let mut config = ServerTlsConfig::new().identity(Identity::from_pem(cert, &*key));
    if let Some(ca) = &tls.client_ca_file {
        config = config
            .client_ca_root(Certificate::from_pem(read(ca, "client CA")?))
            .client_auth_optional(!tls.require_client_cert);
    }
    Ok(config)
}

/// The identities a (chain-verified) client certificate asserts: every SAN DNS name and URI,
/// then the subject's common names.
pub fn client_identities(der: &[u8]) -> Vec<String> {
    let Ok(cert) = x509_cert::Certificate::from_der(der) else {
        return Vec::new();
    };
    let mut ids = Vec::new();
    if let Ok(Some((_, san))) = cert.tbs_certificate.get::<SubjectAltName>() {
        for name in san.0 {
            match name {
                GeneralName::DnsName(n) => ids.push(n.to_string()),
                GeneralName::UniformResourceIdentifier(u) => ids.push(u.to_string()),
                _ => {}
            }
        }
    }
    for rdn in cert.tbs_certificate.subject.0.iter() {
        for atv in rdn.0.iter().filter(|a| a.oid == COMMON_NAME) {
            if let Ok(cn) = std::str::from_utf8(atv.value.value()) {
                ids.push(cn.to_string());
            }
        }
    }
    ids
}
