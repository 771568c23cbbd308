//! The outbound connector: resolve, vet every address, connect, vet the connected peer again,
//! then TLS.
//!
//! DNS-rebinding safe by construction: names are resolved once here, only vetted addresses are
//! dialled, and the socket's actual peer address is checked before any byte (let alone the
//! credential) is written. Plain http is only ever spoken to a loopback peer.

use std::future::Future;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use http::Uri;
use hyper_util::client::legacy::connect::{Connected, Connection};
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio_rustls::client::TlsStream;

use super::target::{Host, check_addr, classify_host};
use super::{ProviderPolicy, Refusal};

/// Resolves a host name to socket addresses (the system resolver outside tests).
pub type Resolver = Arc<
    dyn Fn(String, u16) -> Pin<Box<dyn Future<Output = io::Result<Vec<SocketAddr>>> + Send>>
        + Send
        + Sync,
>;

/// The system resolver.
pub fn system_resolver() -> Resolver {
    Arc::new(|host, port| {
        Box::pin(async move { Ok(tokio::net::lookup_host((host, port)).await?.collect()) })
    })
}

/// Why a connection was not made.
#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    /// The SSRF guard refused the destination.
    #[error("{0}")]
    Refused(Refusal),
    /// The network failed (DNS, refused, reset, TLS).
    #[error("{0}")]
    Failed(String),
}

/// A connector bound to one provider's policy.
#[derive(Clone)]
pub struct Connector {
    policy: Arc<ProviderPolicy>,
    tls: tokio_rustls::TlsConnector,
    resolver: Resolver,
    connect_timeout: Duration,
}

impl std::fmt::Debug for Connector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Connector")
            .field("provider", &self.policy.name)
            .finish_non_exhaustive()
    }
}

impl Connector {
    /// A connector for `policy` trusting `tls`'s roots.
    pub fn new(
        policy: Arc<ProviderPolicy>,
        tls: Arc<rustls::ClientConfig>,
        resolver: Resolver,
    ) -> Self {
        let connect_timeout = policy.timeout.min(Duration::from_secs(5));
        Self {
            policy,
            tls: tokio_rustls::TlsConnector::from(tls),
            resolver,
            connect_timeout,
        }
    }

    async fn connect(self, uri: Uri) -> Result<TokioIo<Stream>, ConnectError> {
        let https = match uri.scheme_str() {
            Some("https") => true,
            Some("http") if self.policy.allow_plain_http => false,
            _ => return Err(ConnectError::Refused(Refusal("scheme refused".into()))),
        };
        let host = uri
            .host()
            .ok_or_else(|| ConnectError::Refused(Refusal("URL has no host".into())))?;
        let bare = host
            .trim_start_matches('[')
            .trim_end_matches(']')
            .to_string();
        let port = uri.port_u16().unwrap_or(if https { 443 } else { 80 });
        let addrs = match classify_host(host).map_err(ConnectError::Refused)? {
            Host::Ip(ip) => vec![SocketAddr::new(ip, port)],
            Host::Name(_) => (self.resolver)(bare.clone(), port)
                .await
                .map_err(|e| ConnectError::Failed(format!("resolving {bare}: {e}")))?,
        };
        let mut refusal = None;
        let mut last_error = None;
        for addr in addrs {
            if let Err(r) = self.vet(addr.ip(), https) {
                refusal.get_or_insert(r);
                continue;
            }
            match tokio::time::timeout(self.connect_timeout, TcpStream::connect(addr)).await {
                Ok(Ok(tcp)) => {
                    let peer = tcp
                        .peer_addr()
                        .map_err(|e| ConnectError::Failed(e.to_string()))?;
                    self.vet(peer.ip(), https).map_err(ConnectError::Refused)?;
                    // Ignored: a failure only costs latency.
                    let _ = tcp.set_nodelay(true);
                    return self.finish(tcp, &bare, https).await;
                }
                Ok(Err(e)) => last_error = Some(format!("connecting to {addr}: {e}")),
                Err(_) => last_error = Some(format!("connecting to {addr}: timed out")),
            }
        }
        match (last_error, refusal) {
            (Some(e), _) => Err(ConnectError::Failed(e)),
            (None, Some(r)) => Err(ConnectError::Refused(Refusal(format!(
                "{host} resolves only to refused addresses: {}",
                r.0
            )))),
            (None, None) => Err(ConnectError::Failed(format!("{host} has no addresses"))),
        }
    }

    fn vet(&self, ip: IpAddr, https: bool) -> Result<(), Refusal> {
        check_addr(&self.policy, ip)?;
        let loopback = super::target::special_range(ip) == Some("loopback");
        if !https && !loopback {
            return Err(Refusal(format!(
                "plain http is only allowed to a loopback address, not {ip}"
            )));
        }
        Ok(())
    }

    async fn finish(
        &self,
        tcp: TcpStream,
        host: &str,
        https: bool,
    ) -> Result<TokioIo<Stream>, ConnectError> {
        if !https {
            return Ok(TokioIo::new(Stream::Plain(tcp)));
        }
        let name = rustls::pki_types::ServerName::try_from(host.to_string())
            .map_err(|_| ConnectError::Failed(format!("{host} is not a valid TLS server name")))?;
        let tls = self
            .tls
            .connect(name, tcp)
            .await
            .map_err(|e| ConnectError::Failed(format!("TLS with {host}: {e}")))?;
        Ok(TokioIo::new(Stream::Tls(Box::new(tls))))
    }
}

impl tower::Service<Uri> for Connector {
    type Response = TokioIo<Stream>;
    type Error = ConnectError;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, ConnectError>> + Send>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), ConnectError>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, uri: Uri) -> Self::Future {
        Box::pin(self.clone().connect(uri))
    }
}

/// A plaintext (loopback only) or TLS connection.
#[derive(Debug)]
pub enum Stream {
    /// Plain TCP.
    Plain(TcpStream),
    /// TLS over TCP.
    Tls(Box<TlsStream<TcpStream>>),
}

impl Connection for Stream {
    fn connected(&self) -> Connected {
        Connected::new()
    }
}

impl AsyncRead for Stream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_read(cx, buf),
            Stream::Tls(s) => Pin::new(s).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for Stream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_write(cx, buf),
            Stream::Tls(s) => Pin::new(s).poll_write(cx, buf),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_flush(cx),
            Stream::Tls(s) => Pin::new(s).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_shutdown(cx),
            Stream::Tls(s) => Pin::new(s).poll_shutdown(cx),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn connector(policy: ProviderPolicy, answers: Vec<SocketAddr>) -> Connector {
        let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
        let tls = rustls::ClientConfig::builder()
            .with_root_certificates(rustls::RootCertStore::empty())
            .with_no_client_auth();
        let resolver: Resolver = Arc::new(move |_, _| {
            let answers = answers.clone();
            Box::pin(async move { Ok(answers) })
        });
        Connector::new(Arc::new(policy), Arc::new(tls), resolver)
    }

    /// A name whose DNS answer is a metadata or private address is refused before any
    /// connection is attempted; public answers are used even if a private one is mixed in.
    #[tokio::test]
    async fn rebinding_answers_are_refused() {
        let p = ProviderPolicy::for_tests("https://api.example.com");
        let c = connector(
            p.clone(),
            vec!["169.254.169.254:443".parse().expect("addr")],
        );
        let err = c
            .connect("https://api.example.com/".parse().expect("uri"))
            .await
            .expect_err("metadata");
        assert!(
            matches!(&err, ConnectError::Refused(r) if r.0.contains("cloud metadata")),
            "{err}"
        );
        // A listener on loopback: reachable, but refused without allowed_networks.
        let l = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let c = connector(p.clone(), vec![l.local_addr().expect("addr")]);
        let err = c
            .connect("https://api.example.com/".parse().expect("uri"))
            .await
            .expect_err("loopback");
        assert!(matches!(err, ConnectError::Refused(_)), "{err}");
    }

    #[tokio::test]
    async fn plain_http_only_to_loopback() {
        let mut p = ProviderPolicy::for_tests("http://api.example.com");
        p.allow_plain_http = true;
        p.allowed_networks = vec!["10.0.0.0/8".parse().expect("net")];
        let c = connector(p, vec!["10.1.1.1:80".parse().expect("addr")]);
        let err = c
            .connect("http://api.example.com/".parse().expect("uri"))
            .await
            .expect_err("non-loopback http");
        assert!(
            err.to_string().contains("only allowed to a loopback"),
            "{err}"
        );
    }
}
