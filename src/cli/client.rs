//! Client commands (`seal`, `get`, `revoke`, `delete`) that talk to a running daemon over gRPC.

use std::io::{IsTerminal as _, Read as _, Write as _};
use std::path::PathBuf;

use clap::Args;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Identity};
use zeroize::Zeroizing;

use super::CliError;
use super::serve::credential_env;
use crate::api::SealRecord as _;
use crate::api::v1;
use crate::client::Bearer;
use crate::config::Role;
use crate::record::{RecordMeta, SecretKind};
use crate::sealer::Sealer;
use crate::secret::{ApiCredential, Secret};

#[derive(Debug, Args)]
pub(crate) struct Connection {
    /// Daemon address: http://HOST:PORT (loopback, or behind a TLS-terminating proxy) or
    /// https://HOST:PORT (TLS).
    #[arg(
        long,
        env = "TOKENVAULT_ADDR",
        default_value = "http://127.0.0.1:50051"
    )]
    addr: String,
    /// File holding the API credential (otherwise read from TOKENVAULT_<ROLE>_TOKEN, then
    /// TOKENVAULT_TOKEN). Not needed when --client-cert identifies the caller.
    #[arg(long)]
    credential_file: Option<PathBuf>,
    /// PEM file of the CA that signed the daemon's TLS certificate (https:// only; default: the
    /// bundled Mozilla roots).
    #[arg(long, env = "TOKENVAULT_CA_FILE")]
    ca_file: Option<PathBuf>,
    /// PEM client certificate for mutual TLS (https:// only); a daemon whose credential has
    /// `mtls_identity` authenticates the caller by it, with no bearer credential.
    #[arg(long, env = "TOKENVAULT_CLIENT_CERT", requires = "client_key")]
    client_cert: Option<PathBuf>,
    /// PEM private key of --client-cert; must not be readable by group or others.
    #[arg(long, env = "TOKENVAULT_CLIENT_KEY", requires = "client_cert")]
    client_key: Option<PathBuf>,
    /// The name to verify the daemon's certificate against, when it differs from the host in
    /// --addr (e.g. connecting by IP address to a certificate issued for a DNS name).
    #[arg(long, env = "TOKENVAULT_SERVER_NAME")]
    server_name: Option<String>,
}

#[derive(Debug, Args)]
pub(crate) struct SealArgs {
    /// Record id: 1-128 bytes of [A-Za-z0-9._:@/+=-].
    #[arg(long)]
    id: String,
    /// Owner (user or tenant id) of the secret.
    #[arg(long)]
    owner: String,
    /// Provider name, e.g. github.
    #[arg(long)]
    provider: String,
    /// Kind of secret.
    #[arg(long, value_parser = ["access_token", "refresh_token", "client_secret", "api_key", "token_bundle"])]
    kind: String,
    /// Granted scope (repeatable).
    #[arg(long = "scope")]
    scopes: Vec<String>,
    /// Expiry as Unix seconds (0: never).
    #[arg(long, default_value_t = 0)]
    expires_at: i64,
    /// Read the secret from this file instead of stdin. The secret is stored byte for byte.
    #[arg(long)]
    secret_file: Option<PathBuf>,
    /// Remove one trailing line ending (LF or CR LF) from the secret, for `echo TOKEN | tokenvault
    /// seal`; without it a trailing newline is part of the secret.
    #[arg(long)]
    trim_newline: bool,
    /// Seal with this SPKI PEM public key instead of fetching the active one from the daemon.
    #[arg(long)]
    public_key: Option<PathBuf>,
    /// Replace the record currently at this version (0: create a new record).
    #[arg(long, default_value_t = 0)]
    expected_version: u64,
    #[command(flatten)]
    conn: Connection,
}

#[derive(Debug, Args)]
pub(crate) struct GetArgs {
    /// Record id.
    id: String,
    /// Print the record's metadata to stderr.
    #[arg(long)]
    info: bool,
    #[command(flatten)]
    conn: Connection,
}

#[derive(Debug, Args)]
pub(crate) struct ProxyArgs {
    /// Record id whose credential the daemon injects.
    id: String,
    /// HTTP method.
    method: String,
    /// Path and query relative to the provider's base URL, e.g. /user/repos?per_page=5.
    path: String,
    /// Request header "Name: value" (repeatable).
    #[arg(long = "header", short = 'H')]
    headers: Vec<String>,
    /// Request body from this file ("-" for stdin).
    #[arg(long)]
    body_file: Option<PathBuf>,
    /// Exit with code 6 when the upstream answers 4xx or 5xx.
    #[arg(long)]
    fail: bool,
    /// Use a grant handle from `tokenvault grant issue` (read from this file) instead of the
    /// caller's own access; ID may then be "-" for a record grant.
    #[arg(long)]
    grant_file: Option<PathBuf>,
    #[command(flatten)]
    conn: Connection,
}

#[derive(Debug, clap::Subcommand)]
pub(crate) enum GrantCommand {
    /// Mint a grant; the handle goes to stdout, its id and expiry to stderr.
    Issue {
        /// The one record the grant covers.
        #[arg(long, conflicts_with = "owner", required_unless_present = "owner")]
        id: Option<String>,
        /// Or: every record of this owner.
        #[arg(long)]
        owner: Option<String>,
        /// Allowed HTTP method (repeatable; default: the provider's).
        #[arg(long = "method")]
        methods: Vec<String>,
        /// Allowed path prefix (repeatable; default: the provider's).
        #[arg(long = "path-prefix")]
        path_prefixes: Vec<String>,
        /// Lifetime in seconds (at most 86400).
        #[arg(long, default_value_t = 300)]
        ttl: i64,
        /// Most uses (0: unlimited within the lifetime).
        #[arg(long, default_value_t = 0)]
        max_uses: u32,
        /// Only this caller (credential name) may use it.
        #[arg(long)]
        audience: Option<String>,
        /// Print {"grant", "grant_id", "expires_at"} as one JSON object on stdout.
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        conn: Connection,
    },
    /// End a grant early.
    Revoke {
        /// The grant id (or the handle).
        grant_id: String,
        #[command(flatten)]
        conn: Connection,
    },
}

#[derive(Debug, Args)]
pub(crate) struct IdArgs {
    /// Record id.
    id: String,
    /// Also withdraw the grant at the provider ([providers.NAME.revocation], through the
    /// outbox; docs/WEBHOOKS.md).
    #[arg(long, conflicts_with = "no_revoke_at_provider")]
    revoke_at_provider: bool,
    /// Do not, even if the provider's by_default says so.
    #[arg(long)]
    no_revoke_at_provider: bool,
    #[command(flatten)]
    conn: Connection,
}

impl IdArgs {
    /// The request's `revoke_at_provider`: unset unless a flag says.
    fn at_provider(&self) -> Option<bool> {
        match (self.revoke_at_provider, self.no_revoke_at_provider) {
            (true, _) => Some(true),
            (_, true) => Some(false),
            _ => None,
        }
    }
}

impl Connection {
    /// The daemon address.
    pub(crate) fn addr(&self) -> &str {
        &self.addr
    }

    fn is_https(&self) -> bool {
        self.addr
            .parse::<http::Uri>()
            .is_ok_and(|u| u.scheme_str() == Some("https"))
    }

    /// Whether traffic to the daemon is protected: TLS, or a loopback address.
    pub(crate) fn is_confidential(&self) -> bool {
        let Ok(uri) = self.addr.parse::<http::Uri>() else {
            return false;
        };
        uri.scheme_str() == Some("https")
            || matches!(uri.host(), Some("localhost"))
            || uri
                .host()
                .map(|h| h.trim_start_matches('[').trim_end_matches(']'))
                .and_then(|h| h.parse::<std::net::IpAddr>().ok())
                .is_some_and(|ip| ip.is_loopback())
    }

    /// The TLS settings for an https:// address; refuses TLS options with a plaintext one.
    fn tls(&self) -> Result<Option<TlsFiles>, CliError> {
        if !self.is_https() {
            if self.ca_file.is_some() || self.client_cert.is_some() || self.server_name.is_some() {
                return Err(CliError::Input(format!(
                    "--ca-file, --client-cert and --server-name need an https:// address, not {}",
                    self.addr
                )));
            }
            return Ok(None);
        }
        let read = |p: &PathBuf, what: &str| {
            std::fs::read(p)
                .map(Zeroizing::new)
                .map_err(|e| CliError::Input(format!("{what} {}: {e}", p.display())))
        };
        let identity = match (&self.client_cert, &self.client_key) {
            (Some(cert), Some(key)) => {
                check_key_file_mode(key)?;
                Some((read(cert, "--client-cert")?, read(key, "--client-key")?))
            }
            _ => None,
        };
        Ok(Some(TlsFiles {
            ca_pem: match &self.ca_file {
                Some(ca) => Some(read(ca, "--ca-file")?),
                None => None,
            },
            identity,
            server_name: self.server_name.clone(),
        }))
    }
}

/// PEM bytes read from a file; zeroized on drop (a client key is among them).
type Pem = Zeroizing<Vec<u8>>;

/// What `--ca-file`, `--client-cert`/`--client-key` and `--server-name` hold.
struct TlsFiles {
    ca_pem: Option<Pem>,
    /// Certificate chain and private key.
    identity: Option<(Pem, Pem)>,
    server_name: Option<String>,
}

impl TlsFiles {
    fn tonic(&self) -> ClientTlsConfig {
        let mut tls = ClientTlsConfig::new();
        tls = match &self.ca_pem {
            Some(ca) => tls.ca_certificate(Certificate::from_pem(&**ca)),
            None => tls.trust_anchors(webpki_roots::TLS_SERVER_ROOTS.iter().cloned()),
        };
        if let Some((cert, key)) = &self.identity {
            tls = tls.identity(Identity::from_pem(&**cert, &**key));
        }
        if let Some(name) = &self.server_name {
            tls = tls.domain_name(name.clone());
        }
        tls
    }

    /// With TLS 1.3 the daemon judges a client certificate after the handshake has completed
    /// on this side, so tonic reports a refusal only as "connection closed". This makes one TLS
    /// connection of its own first and reads until the daemon speaks (its HTTP/2 settings) or
    /// refuses with an alert, which is then reported as what it is (exit 4).
    async fn probe_client_certificate(&self, uri: &http::Uri) -> Result<(), CliError> {
        use rustls::pki_types::pem::PemObject as _;
        use rustls::pki_types::{PrivateKeyDer, ServerName};
        use tokio::io::AsyncReadExt as _;
        let Some((cert, key)) = &self.identity else {
            return Ok(());
        };
        let input = |what: &str, e: &dyn std::fmt::Display| {
            CliError::Input(format!("{what} is not usable: {e}"))
        };
        let roots = crate::ca::roots_or_mozilla(self.ca_pem.as_deref().map(|p| &p[..]))
            .map_err(|e| input("--ca-file", &e))?;
        let chain = crate::ca::certificates(cert).map_err(|e| input("--client-cert", &e))?;
        let key = PrivateKeyDer::from_pem_slice(key).map_err(|e| input("--client-key", &e))?;
        let mut config = crate::ca::client_builder(roots)
            .map_err(|e| CliError::Internal(e.to_string()))?
            .with_client_auth_cert(chain, key)
            .map_err(|e| {
                CliError::Input(format!(
                    "the TLS settings are not usable (do --client-cert and --client-key belong \
                 together?): {e}"
                ))
            })?;
        config.alpn_protocols = vec![b"h2".to_vec()];
        let host = uri
            .host()
            .unwrap_or_default()
            .trim_start_matches('[')
            .trim_end_matches(']')
            .to_string();
        let port = uri.port_u16().unwrap_or(443);
        let name = ServerName::try_from(self.server_name.clone().unwrap_or_else(|| host.clone()))
            .map_err(|e| input("--server-name", &e))?;
        let unavailable = |e: &dyn std::fmt::Display| {
            CliError::Unavailable(format!("cannot reach the daemon at {host}:{port}: {e}"))
        };
        let tcp = tokio::net::TcpStream::connect((host.as_str(), port))
            .await
            .map_err(|e| unavailable(&e))?;
        let mut tls = tokio_rustls::TlsConnector::from(std::sync::Arc::new(config))
            .connect(name, tcp)
            .await
            .map_err(|e| super::tls_refusal(&e).unwrap_or_else(|| unavailable(&e)))?;
        let mut first = [0u8; 1];
        match tokio::time::timeout(std::time::Duration::from_secs(5), tls.read(&mut first)).await {
            Ok(Err(e)) => Err(super::tls_refusal(&e).unwrap_or_else(|| unavailable(&e))),
            Ok(Ok(0)) => Err(CliError::Auth(
                "the daemon closed the TLS connection right after the handshake: it did not \
                 accept --client-cert"
                    .into(),
            )),
            // The daemon spoke, or stayed silent: the certificate was not refused.
            Ok(Ok(_)) | Err(_) => Ok(()),
        }
    }
}

/// A client key readable by others is refused, as the daemon refuses its own key files.
fn check_key_file_mode(path: &std::path::Path) -> Result<(), CliError> {
    use std::os::unix::fs::PermissionsExt as _;
    let mode = std::fs::metadata(path)
        .map_err(|e| CliError::Input(format!("--client-key {}: {e}", path.display())))?
        .permissions()
        .mode();
    if mode & 0o077 != 0 {
        return Err(CliError::Input(format!(
            "client key file {} is readable by group or others (mode {:o}); chmod 600 it",
            path.display(),
            mode & 0o777
        )));
    }
    Ok(())
}

pub(crate) type Authed = InterceptedService<Channel, Bearer>;

pub(crate) fn credential(conn: &Connection, role: Role) -> Result<Option<ApiCredential>, CliError> {
    if let Some(path) = &conn.credential_file {
        let text = Zeroizing::new(
            std::fs::read_to_string(path)
                .map_err(|e| CliError::Input(format!("{}: {e}", path.display())))?,
        );
        return Ok(Some(ApiCredential::new(text.trim().to_string())));
    }
    match std::env::var(credential_env(role)).or_else(|_| std::env::var("TOKENVAULT_TOKEN")) {
        Ok(c) => Ok(Some(ApiCredential::new(c))),
        // The client certificate is the credential.
        Err(_) if conn.client_cert.is_some() => Ok(None),
        Err(_) => Err(CliError::Auth(format!(
            "no credential: set {} (or TOKENVAULT_TOKEN), pass --credential-file, or use \
             --client-cert with a daemon that maps it to a credential",
            credential_env(role)
        ))),
    }
}

pub(crate) async fn connect(conn: &Connection, role: Role) -> Result<Authed, CliError> {
    let bearer = match credential(conn, role)? {
        Some(cred) => {
            Bearer::new(cred.expose_secret()).map_err(|e| CliError::Input(e.to_string()))?
        }
        None => Bearer::none(),
    };
    let mut endpoint = Channel::from_shared(conn.addr.clone())
        .map_err(|e| CliError::Input(format!("bad --addr {}: {e}", conn.addr)))?;
    if let Some(files) = conn.tls()? {
        files.probe_client_certificate(endpoint.uri()).await?;
        endpoint = endpoint.tls_config(files.tonic()).map_err(|e| {
            CliError::Input(format!(
                "the TLS settings are not usable (do --client-cert and --client-key belong \
                 together?): {}",
                super::describe_error(&e)
            ))
        })?;
    }
    let channel = endpoint.connect().await.map_err(|e| {
        super::tls_refusal(&e).unwrap_or_else(|| {
            CliError::Unavailable(format!(
                "cannot reach the daemon at {}: {}",
                conn.addr,
                super::describe_error(&e)
            ))
        })
    })?;
    Ok(InterceptedService::new(channel, bearer))
}

/// A sealer for the daemon's active key, as the web tier would fetch it.
pub(crate) async fn active_sealer(
    client: &mut v1::ingest_client::IngestClient<Authed>,
) -> Result<Sealer, CliError> {
    let active = client
        .public_keys(v1::PublicKeysRequest {})
        .await?
        .into_inner()
        .active
        .ok_or_else(|| CliError::Internal("the daemon returned no active key".into()))?;
    Ok(Sealer::from_pem(&active.spki_pem)?)
}

fn read_secret(file: Option<&PathBuf>, trim_newline: bool) -> Result<Secret, CliError> {
    let mut bytes = Zeroizing::new(Vec::new());
    match file {
        Some(path) => {
            let mut f = std::fs::File::open(path)
                .map_err(|e| CliError::Input(format!("{}: {e}", path.display())))?;
            f.read_to_end(&mut bytes)
        }
        None => std::io::stdin().read_to_end(&mut bytes),
    }
    .map_err(|e| CliError::Input(format!("reading the secret: {e}")))?;
    // Only on request, and only one line ending: a secret is otherwise stored as given.
    if trim_newline && bytes.last() == Some(&b'\n') {
        bytes.pop();
        if bytes.last() == Some(&b'\r') {
            bytes.pop();
        }
    }
    if bytes.is_empty() {
        return Err(CliError::Input(
            "the secret is empty (give it on stdin or with --secret-file)".into(),
        ));
    }
    Ok(Secret::from(bytes))
}

pub(crate) async fn seal(args: SealArgs) -> Result<(), CliError> {
    let kind = SecretKind::parse(&args.kind).map_err(|e| CliError::Input(e.to_string()))?;
    let meta = RecordMeta::parse(
        &args.id,
        &args.owner,
        &args.provider,
        kind,
        &args.scopes,
        args.expires_at,
    )
    .map_err(|e| CliError::Input(format!("invalid record: {e}")))?;
    let secret = read_secret(args.secret_file.as_ref(), args.trim_newline)?;
    let mut client = v1::ingest_client::IngestClient::new(connect(&args.conn, Role::Ingest).await?);
    let sealer = match &args.public_key {
        Some(path) => {
            let pem = std::fs::read_to_string(path)
                .map_err(|e| CliError::Input(format!("{}: {e}", path.display())))?;
            Sealer::from_pem(&pem)?
        }
        None => active_sealer(&mut client).await?,
    };
    let record = sealer
        .seal_record(&meta, &secret)
        .map_err(|e| CliError::Input(e.to_string()))?;
    let resp = client
        .put_sealed(v1::PutSealedRequest {
            record: Some(record),
            expected_version: args.expected_version,
        })
        .await?
        .into_inner();
    println!(
        "stored {} version {} (sealed under key {})",
        meta.id,
        resp.version,
        sealer.public_key().id()
    );
    Ok(())
}

pub(crate) async fn get(args: GetArgs) -> Result<(), CliError> {
    let mut client = v1::broker_client::BrokerClient::new(connect(&args.conn, Role::Worker).await?);
    let mut resp = client
        .get_token(v1::GetTokenRequest { id: args.id })
        .await?
        .into_inner();
    let secret = Secret::new(std::mem::take(&mut resp.secret));
    if let (true, Some(info)) = (args.info, &resp.info) {
        {
            let meta = info.meta.clone().unwrap_or_default();
            eprintln!(
                "id={} provider={} kind={} version={} key_version={} expires_at={} scopes={}",
                meta.id,
                meta.provider,
                crate::api::secret_kind(meta.kind).map_or("?", |k| k.as_str()),
                info.version,
                info.key_version,
                meta.expires_at,
                meta.scopes.join(" ")
            );
        }
    }
    let mut out = std::io::stdout().lock();
    out.write_all(secret.expose_secret())
        .and_then(|()| {
            if out.is_terminal() {
                out.write_all(b"\n")
            } else {
                Ok(())
            }
        })
        .and_then(|()| out.flush())
        .map_err(|e| CliError::Internal(format!("writing to stdout: {e}")))
}

pub(crate) async fn proxy(args: ProxyArgs) -> Result<(), CliError> {
    let headers = args
        .headers
        .iter()
        .map(|h| {
            let (name, value) = h
                .split_once(':')
                .ok_or_else(|| CliError::Input(format!("header {h:?} is not \"Name: value\"")))?;
            Ok(v1::HttpHeader {
                name: name.trim().to_string(),
                value: value.trim().as_bytes().to_vec(),
            })
        })
        .collect::<Result<Vec<_>, CliError>>()?;
    let body = match &args.body_file {
        None => Vec::new(),
        Some(p) if p.as_os_str() == "-" => {
            let mut buf = Vec::new();
            std::io::stdin()
                .read_to_end(&mut buf)
                .map_err(|e| CliError::Input(format!("reading stdin: {e}")))?;
            buf
        }
        Some(p) => std::fs::read(p)
            .map_err(|e| CliError::Input(format!("reading {}: {e}", p.display())))?,
    };
    let grant = match &args.grant_file {
        Some(p) => Zeroizing::new(
            std::fs::read_to_string(p)
                .map_err(|e| CliError::Input(format!("reading {}: {e}", p.display())))?,
        )
        .trim()
        .to_string(),
        None => String::new(),
    };
    let mut client = v1::broker_client::BrokerClient::new(connect(&args.conn, Role::Worker).await?);
    let resp = client
        .proxy(v1::ProxyRequest {
            grant,
            id: if args.id == "-" {
                String::new()
            } else {
                args.id
            },
            method: args.method,
            path: args.path,
            headers,
            body,
        })
        .await?
        .into_inner();
    eprintln!(
        "HTTP {}{}",
        resp.status,
        if resp.refreshed {
            " (token refreshed)"
        } else {
            ""
        }
    );
    let mut out = std::io::stdout().lock();
    out.write_all(&resp.body)
        .and_then(|()| out.flush())
        .map_err(|e| CliError::Internal(format!("writing to stdout: {e}")))?;
    if args.fail && resp.status >= 400 {
        return Err(CliError::Precondition(format!(
            "upstream answered HTTP {}",
            resp.status
        )));
    }
    Ok(())
}

pub(crate) async fn grant(cmd: GrantCommand) -> Result<(), CliError> {
    match cmd {
        GrantCommand::Issue {
            id,
            owner,
            methods,
            path_prefixes,
            ttl,
            max_uses,
            audience,
            json,
            conn,
        } => {
            let mut client =
                v1::broker_client::BrokerClient::new(connect(&conn, Role::Worker).await?);
            let mut r = client
                .issue_grant(v1::IssueGrantRequest {
                    id: id.unwrap_or_default(),
                    owner: owner.unwrap_or_default(),
                    methods,
                    path_prefixes,
                    ttl_seconds: ttl,
                    max_uses,
                    audience: audience.unwrap_or_default(),
                })
                .await?
                .into_inner();
            let handle = crate::secret::GrantHandle::new(std::mem::take(&mut r.grant));
            if json {
                // Built in zeroizing memory (a JSON library would copy the handle into a plain
                // String); the handle's characters need no JSON escaping, checked here.
                if !handle
                    .expose_secret()
                    .bytes()
                    .all(|b| b.is_ascii_graphic() && b != b'"' && b != b'\\')
                {
                    return Err(CliError::Internal(
                        "the daemon returned a grant handle with unexpected characters".into(),
                    ));
                }
                let line = Zeroizing::new(format!(
                    "{{\"grant\":\"{}\",\"grant_id\":{},\"expires_at\":{}}}",
                    handle.expose_secret(),
                    serde_json::Value::from(r.grant_id.clone()),
                    r.expires_at
                ));
                println!("{}", line.as_str());
                return Ok(());
            }
            eprintln!("grant_id={} expires_at={}", r.grant_id, r.expires_at);
            // The one place a handle is printed: the caller asked for it.
            println!("{}", handle.expose_secret());
        }
        GrantCommand::Revoke { grant_id, conn } => {
            let mut client =
                v1::broker_client::BrokerClient::new(connect(&conn, Role::Worker).await?);
            client
                .revoke_grant(v1::RevokeGrantRequest {
                    grant_id: grant_id.clone(),
                })
                .await?;
            println!(
                "revoked grant {}",
                crate::grant::short(&crate::grant::grant_id(&grant_id))
            );
        }
    }
    Ok(())
}

pub(crate) async fn revoke(args: IdArgs) -> Result<(), CliError> {
    let mut client = v1::admin_client::AdminClient::new(connect(&args.conn, Role::Admin).await?);
    let info = client
        .revoke(v1::RevokeRequest {
            id: args.id.clone(),
            revoke_at_provider: args.at_provider(),
        })
        .await?
        .into_inner();
    println!(
        "revoked {} (version {})",
        args.id,
        info.info.map_or(0, |i| i.version)
    );
    Ok(())
}

pub(crate) async fn delete(args: IdArgs) -> Result<(), CliError> {
    let mut client = v1::admin_client::AdminClient::new(connect(&args.conn, Role::Admin).await?);
    client
        .delete(v1::DeleteRequest {
            id: args.id.clone(),
            revoke_at_provider: args.at_provider(),
        })
        .await?;
    println!("deleted {}", args.id);
    Ok(())
}
