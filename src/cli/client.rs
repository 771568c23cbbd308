//! Client commands (`seal`, `get`, `revoke`, `delete`) that talk to a running daemon over gRPC.

use std::io::{IsTerminal as _, Read as _, Write as _};
use std::path::PathBuf;

use clap::Args;
use tonic::metadata::MetadataValue;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::Channel;
use zeroize::Zeroizing;

use super::CliError;
use super::serve::credential_env;
use crate::api::v1;
use crate::config::Role;
use crate::record::{RecordMeta, SecretKind};
use crate::sealer::Sealer;
use crate::secret::{ApiCredential, Secret};

#[derive(Debug, Args)]
pub(crate) struct Connection {
    /// Daemon address.
    #[arg(
        long,
        env = "TOKENVAULT_ADDR",
        default_value = "http://127.0.0.1:50051"
    )]
    addr: String,
    /// File holding the API credential (otherwise read from TOKENVAULT_<ROLE>_TOKEN, then
    /// TOKENVAULT_TOKEN).
    #[arg(long)]
    credential_file: Option<PathBuf>,
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
    /// Read the secret from this file instead of stdin.
    #[arg(long)]
    secret_file: Option<PathBuf>,
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
    #[command(flatten)]
    conn: Connection,
}

impl Connection {
    /// The daemon address.
    pub(crate) fn addr(&self) -> &str {
        &self.addr
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
}

pub(crate) type Authed = InterceptedService<Channel, Bearer>;

#[derive(Clone)]
pub(crate) struct Bearer(MetadataValue<tonic::metadata::Ascii>);

impl tonic::service::Interceptor for Bearer {
    fn call(&mut self, mut req: tonic::Request<()>) -> Result<tonic::Request<()>, tonic::Status> {
        req.metadata_mut().insert("authorization", self.0.clone());
        Ok(req)
    }
}

fn credential(conn: &Connection, role: Role) -> Result<ApiCredential, CliError> {
    if let Some(path) = &conn.credential_file {
        let text = Zeroizing::new(
            std::fs::read_to_string(path)
                .map_err(|e| CliError::Input(format!("{}: {e}", path.display())))?,
        );
        return Ok(ApiCredential::new(text.trim().to_string()));
    }
    std::env::var(credential_env(role))
        .or_else(|_| std::env::var("TOKENVAULT_TOKEN"))
        .map(ApiCredential::new)
        .map_err(|_| {
            CliError::Auth(format!(
                "no credential: set {} (or TOKENVAULT_TOKEN) or pass --credential-file",
                credential_env(role)
            ))
        })
}

pub(crate) async fn connect(conn: &Connection, role: Role) -> Result<Authed, CliError> {
    let cred = credential(conn, role)?;
    let mut value: MetadataValue<_> =
        format!("Bearer {}", cred.expose_secret())
            .parse()
            .map_err(|_| {
                CliError::Input("the credential contains characters not allowed in a header".into())
            })?;
    // Sensitive values are never added to HPACK tables.
    value.set_sensitive(true);
    let channel = Channel::from_shared(conn.addr.clone())
        .map_err(|e| CliError::Input(format!("bad --addr {}: {e}", conn.addr)))?
        .connect()
        .await
        .map_err(|e| {
            CliError::Unavailable(format!("cannot reach the daemon at {}: {e}", conn.addr))
        })?;
    Ok(InterceptedService::new(channel, Bearer(value)))
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

fn read_secret(file: Option<&PathBuf>) -> Result<Secret, CliError> {
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
    // A secret typed or echoed in ends with a newline that is not part of it.
    while bytes.last().is_some_and(|b| *b == b'\n' || *b == b'\r') {
        bytes.pop();
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
    let secret = read_secret(args.secret_file.as_ref())?;
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
                SecretKind::try_from(meta.kind).map_or("?", |k| k.as_str()),
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
            conn,
        } => {
            let mut client =
                v1::broker_client::BrokerClient::new(connect(&conn, Role::Worker).await?);
            let r = client
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
            let handle = Zeroizing::new(r.grant);
            eprintln!("grant_id={} expires_at={}", r.grant_id, r.expires_at);
            println!("{}", handle.as_str());
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
        })
        .await?;
    println!("deleted {}", args.id);
    Ok(())
}
