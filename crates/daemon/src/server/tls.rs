//! TLS and mutual TLS for the listeners, and client-certificate identities.
//!
//! Owns: loading the server certificate, key and client CA from PEM files into a rustls
//! `ServerConfig` (aws-lc-rs) that offers both `h2` (gRPC) and `http/1.1` (the HTTP/JSON
//! routes) by ALPN, the accept loop that runs handshakes off the accepting task
//! ([`incoming`]), and [`client_identities`], which reads the names a client certificate
//! asserts (SAN DNS names and URIs, then the subject CN) so `auth` can map them to a
//! configured caller. rustls has already verified the chain against the client CA before a
//! request gets here. Hand-written rather than tonic's `ServerTlsConfig` because tonic's
//! offers `h2` only, which an HTTP/1.1 client's handshake fails against.
//!
//! Must never: accept a TLS private key file readable by group or others.

use std::os::unix::fs::PermissionsExt as _;
use std::path::Path;

use std::sync::Arc;

use rustls::pki_types::PrivateKeyDer;
use rustls::pki_types::pem::PemObject as _;
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
    /// A file holds no usable certificate or key.
    #[error("{what} {}: {message}", path.display())]
    Invalid {
        /// Which file.
        what: &'static str,
        /// Its path.
        path: std::path::PathBuf,
        /// Why.
        message: String,
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

/// Builds the listeners' TLS configuration from `tls`: TLS 1.2 and 1.3 on aws-lc-rs, ALPN
/// `h2` then `http/1.1`, and client certificates checked against `client_ca_file` (required
/// with `require_client_cert`, optional otherwise).
pub fn server_config(tls: &TlsConfig) -> Result<Arc<rustls::ServerConfig>, TlsSetupError> {
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
    let invalid = |what, path: &Path| {
        let path = path.to_path_buf();
        move |message: String| TlsSetupError::Invalid {
            what,
            path,
            message,
        }
    };
    let chain = crate::ca::certificates(&read(&tls.cert_file, "TLS certificate")?)
        .map_err(|e| invalid("TLS certificate", &tls.cert_file)(e.to_string()))?;
    let key_pem = zeroize::Zeroizing::new(read(&tls.key_file, "TLS key")?);
    let key = PrivateKeyDer::from_pem_slice(&key_pem)
        .map_err(|e| invalid("TLS key", &tls.key_file)(e.to_string()))?;
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let builder = rustls::ServerConfig::builder_with_provider(Arc::clone(&provider))
        .with_safe_default_protocol_versions()
        .map_err(|e| invalid("TLS certificate", &tls.cert_file)(e.to_string()))?;
    let builder = match &tls.client_ca_file {
        Some(ca) => {
            let roots = crate::ca::roots_from_pem(&read(ca, "client CA")?)
                .map_err(|e| invalid("client CA", ca)(e.to_string()))?;
            let verifier =
                rustls::server::WebPkiClientVerifier::builder_with_provider(roots.into(), provider);
            let verifier = if tls.require_client_cert {
                verifier
            } else {
                verifier.allow_unauthenticated()
            };
            builder.with_client_cert_verifier(
                verifier
                    .build()
                    .map_err(|e| invalid("client CA", ca)(e.to_string()))?,
            )
        }
        None => builder.with_no_client_auth(),
    };
    let mut config = builder
        .with_single_cert(chain, key)
        .map_err(|e| invalid("TLS key", &tls.key_file)(e.to_string()))?;
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(Arc::new(config))
}

/// How long a client has to finish its TLS handshake.
const HANDSHAKE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

/// Accepts the next connection on `listener`, waiting out accept errors (out of file
/// descriptors, EMFILE / ENFILE, and the like) with a backoff from 10 ms to 1 s instead of
/// retrying at once, which would spin a core while the condition lasts. Every accept loop of
/// the daemon (gRPC with and without TLS, /metrics) goes through it.
pub(super) async fn accept(
    listener: &tokio::net::TcpListener,
    what: &str,
) -> tokio::net::TcpStream {
    let mut backoff = std::time::Duration::from_millis(10);
    loop {
        match listener.accept().await {
            Ok((tcp, _)) => return tcp,
            Err(e) => {
                tracing::warn!(listener = what, error = %e, backoff_ms = backoff.as_millis(), "accepting a connection failed; backing off");
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(std::time::Duration::from_secs(1));
            }
        }
    }
}

/// The plaintext connections accepted on `listener` (loopback, or behind a TLS proxy), with
/// TCP_NODELAY and [`accept`]'s backoff; tonic's own `TcpIncoming` retries a failed accept at
/// once. The loop ends, closing the listener, when the returned stream is dropped.
pub fn plain_incoming(
    listener: tokio::net::TcpListener,
    conns: Arc<super::conn::Connections>,
) -> tokio_stream::wrappers::ReceiverStream<
    Result<super::conn::Bounded<tokio::net::TcpStream>, std::io::Error>,
> {
    let (tx, rx) = tokio::sync::mpsc::channel(64);
    tokio::spawn(async move {
        loop {
            let tcp = tokio::select! {
                () = tx.closed() => return,
                tcp = accept(&listener, "grpc") => tcp,
            };
            // Without TCP_NODELAY, Nagle's algorithm holds back the trailers of each response
            // until the client ACKs: ~0.5 ms added to every call.
            let _ = tcp.set_nodelay(true);
            if tx.send(Ok(conns.admit(tcp))).await.is_err() {
                return;
            }
        }
    });
    tokio_stream::wrappers::ReceiverStream::new(rx)
}

/// The TLS connections accepted on `listener`: each handshake runs in a task of its own (a
/// slow or silent client holds up nobody), failed ones are dropped with a debug line. Accept
/// errors back off ([`accept`]). The loop ends, closing the listener, when the returned
/// stream is dropped.
pub fn incoming(
    listener: tokio::net::TcpListener,
    config: Arc<rustls::ServerConfig>,
    conns: Arc<super::conn::Connections>,
) -> tokio_stream::wrappers::ReceiverStream<
    Result<
        tokio_rustls::server::TlsStream<super::conn::Bounded<tokio::net::TcpStream>>,
        std::io::Error,
    >,
> {
    let (tx, rx) = tokio::sync::mpsc::channel(64);
    let acceptor = tokio_rustls::TlsAcceptor::from(config);
    tokio::spawn(async move {
        loop {
            let tcp = tokio::select! {
                () = tx.closed() => return,
                tcp = accept(&listener, "grpc-tls") => tcp,
            };
            // Without TCP_NODELAY, Nagle's algorithm holds back small responses.
            let _ = tcp.set_nodelay(true);
            // Counted from the accept, so connections still in their handshake count against
            // the cap too.
            let tcp = conns.admit(tcp);
            let (acceptor, tx) = (acceptor.clone(), tx.clone());
            tokio::spawn(async move {
                match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await {
                    Ok(Ok(stream)) => {
                        let _ = tx.send(Ok(stream)).await;
                    }
                    Ok(Err(e)) => tracing::debug!(error = %e, "TLS handshake failed"),
                    Err(_) => tracing::debug!("TLS handshake timed out"),
                }
            });
        }
    });
    tokio_stream::wrappers::ReceiverStream::new(rx)
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
