//! Test certificates made with rcgen: a CA and leaves it signs.
#![allow(dead_code, reason = "each test binary uses a different part")]

use rcgen::{BasicConstraints, CertificateParams, CertifiedIssuer, DnType, IsCa, KeyPair};

pub struct Pki {
    pub ca_pem: String,
    pub issuer: CertifiedIssuer<'static, KeyPair>,
}

pub fn ca(name: &str) -> Pki {
    let mut params = CertificateParams::new(Vec::<String>::new()).expect("params");
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.distinguished_name.push(DnType::CommonName, name);
    let issuer =
        CertifiedIssuer::self_signed(params, KeyPair::generate().expect("key")).expect("ca");
    Pki {
        ca_pem: issuer.pem(),
        issuer,
    }
}

/// (certificate PEM, key PEM) for `sans`, signed by `pki`.
pub fn leaf(pki: &Pki, sans: &[&str], cn: &str) -> (String, String) {
    let mut params = CertificateParams::new(sans.iter().map(|s| s.to_string()).collect::<Vec<_>>())
        .expect("params");
    params.distinguished_name.push(DnType::CommonName, cn);
    let key = KeyPair::generate().expect("key");
    let cert = params.signed_by(&key, &pki.issuer).expect("sign");
    (cert.pem(), key.serialize_pem())
}

/// Like [`leaf`], but valid only in 2020: expired now.
pub fn expired_leaf(pki: &Pki, sans: &[&str], cn: &str) -> (String, String) {
    let mut params = CertificateParams::new(sans.iter().map(|s| s.to_string()).collect::<Vec<_>>())
        .expect("params");
    params.distinguished_name.push(DnType::CommonName, cn);
    params.not_before = rcgen::date_time_ymd(2020, 1, 1);
    params.not_after = rcgen::date_time_ymd(2020, 12, 31);
    let key = KeyPair::generate().expect("key");
    let cert = params.signed_by(&key, &pki.issuer).expect("sign");
    (cert.pem(), key.serialize_pem())
}

/// What the server at `addr` does with a TLS client presenting `client` (certificate and key
/// PEM) and trusting `ca_pem`: `Ok(())` if it completes the handshake and speaks (HTTP/2
/// settings), or the alert it refused the connection with. With TLS 1.3 a refused client
/// certificate shows only after the handshake, so this reads until the server says something.
pub async fn tls_verdict(
    addr: std::net::SocketAddr,
    ca_pem: &str,
    client: Option<(String, String)>,
    server_name: &str,
) -> Result<(), rustls::AlertDescription> {
    use rustls::pki_types::pem::PemObject as _;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    let mut roots = rustls::RootCertStore::empty();
    for c in CertificateDer::pem_slice_iter(ca_pem.as_bytes()) {
        roots.add(c.expect("ca pem")).expect("ca");
    }
    let builder = rustls::ClientConfig::builder_with_provider(std::sync::Arc::new(
        rustls::crypto::aws_lc_rs::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .expect("versions")
    .with_root_certificates(roots);
    let mut config = match client {
        Some((cert, key)) => builder
            .with_client_auth_cert(
                CertificateDer::pem_slice_iter(cert.as_bytes())
                    .collect::<Result<Vec<_>, _>>()
                    .expect("cert"),
                PrivateKeyDer::from_pem_slice(key.as_bytes()).expect("key"),
            )
            .expect("client auth"),
        None => builder.with_no_client_auth(),
    };
    config.alpn_protocols = vec![b"h2".to_vec()];
    let tcp = tokio::net::TcpStream::connect(addr).await.expect("tcp");
    let name = ServerName::try_from(server_name.to_string()).expect("name");
    let alert = |e: std::io::Error| -> rustls::AlertDescription {
        match e.get_ref().and_then(|i| i.downcast_ref::<rustls::Error>()) {
            Some(rustls::Error::AlertReceived(a)) => *a,
            _ => panic!("not refused with a TLS alert: {e}"),
        }
    };
    let mut tls = tokio_rustls::TlsConnector::from(std::sync::Arc::new(config))
        .connect(name, tcp)
        .await
        .map_err(alert)?;
    // The listeners also speak HTTP/1.1, so the server waits for the client's first bytes
    // before it answers: send the HTTP/2 connection preface, as a gRPC client does.
    if let Err(e) = tls.write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n").await {
        return Err(alert(e));
    }
    let mut first = [0u8; 1];
    match tokio::time::timeout(std::time::Duration::from_secs(10), tls.read(&mut first)).await {
        Ok(Ok(n)) if n > 0 => Ok(()),
        Ok(Ok(_)) => panic!("the server closed the connection without a word"),
        Ok(Err(e)) => Err(alert(e)),
        Err(_) => panic!("the server neither spoke nor refused within 10 s"),
    }
}
