//! `tokenvault-bench --attack KIND`: hostile load sent next to the legitimate mix, so one run
//! measures what an attacker costs legitimate callers (docs/PERFORMANCE.md, "Under attack").
//!
//! Owns: the attack kinds (credential floods, security event pushes, idle and slow
//! connections) and their tally. Plaintext `http://` daemons only: an attack is a loopback
//! measurement.
//!
//! Must never: send traffic anywhere but the daemon under test, or run past the bench's
//! deadline.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

use super::CliError;
use crate::api::v1;

/// What the attacker sends.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub(crate) enum Attack {
    /// `Broker.GetToken` with a bearer credential no caller has.
    WrongCredential,
    /// `Broker.GetToken` with no credential at all.
    NoCredential,
    /// `Broker.GetToken` with a wrong credential and a 1 MiB request body, one connection per
    /// task: what a throttled refusal that kept its body would pin.
    LargeBodies,
    /// `POST /v1/security-events` with bodies that are not a SET.
    SetGarbage,
    /// `POST /v1/security-events` with well-formed SETs of an unknown issuer and a bad
    /// signature.
    SetForged,
    /// Opens `--attack-connections` TCP connections and sends nothing.
    IdleConnections,
    /// Opens `--attack-connections` connections and sends an HTTP/1.1 request header one byte
    /// a second.
    Slowloris,
}

/// How the attacker behaves.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Plan {
    pub kind: Attack,
    /// Requests per second over all tasks; 0 for as fast as they go.
    pub rate: u32,
    /// Tasks sending requests (credential and SET floods).
    pub concurrency: usize,
    /// Connections held (idle, slowloris).
    pub connections: usize,
}

/// What the attacker saw.
#[derive(Debug, Default, serde::Serialize)]
pub(crate) struct Tally {
    /// Requests sent (floods) or connections opened (idle, slowloris).
    pub sent: u64,
    /// Answers by gRPC code name or HTTP status.
    pub answers: std::collections::BTreeMap<String, u64>,
    /// Connections the daemon closed before the run ended.
    pub closed_by_daemon: u64,
    /// Connections that could not be opened.
    pub connect_failed: u64,
}

#[derive(Default)]
struct Counts {
    sent: AtomicU64,
    closed: AtomicU64,
    connect_failed: AtomicU64,
    answers: std::sync::Mutex<std::collections::BTreeMap<String, u64>>,
}

impl Counts {
    fn answer(&self, what: String) {
        *self
            .answers
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .entry(what)
            .or_default() += 1;
    }
}

/// Starts the attack against `addr` (`http://HOST:PORT`) until `deadline`; the handle yields
/// the tally.
pub(crate) fn start(
    plan: Plan,
    addr: &str,
    deadline: Instant,
) -> Result<tokio::task::JoinHandle<Tally>, CliError> {
    let host = addr
        .strip_prefix("http://")
        .ok_or_else(|| {
            CliError::Input("--attack needs an http:// --addr (a loopback measurement)".into())
        })?
        .trim_end_matches('/')
        .to_string();
    let counts = Arc::new(Counts::default());
    let base = format!("http://{host}");
    Ok(tokio::spawn(async move {
        let mut tasks = tokio::task::JoinSet::new();
        match plan.kind {
            Attack::WrongCredential
            | Attack::NoCredential
            | Attack::LargeBodies
            | Attack::SetGarbage
            | Attack::SetForged => {
                let tasks_n = plan.concurrency.max(1);
                let per_task = (plan.rate > 0)
                    .then(|| Duration::from_secs_f64(tasks_n as f64 / f64::from(plan.rate)));
                for t in 0..tasks_n {
                    let (counts, base) = (Arc::clone(&counts), base.clone());
                    tasks.spawn(flood(plan.kind, base, t, per_task, deadline, counts));
                }
            }
            Attack::IdleConnections | Attack::Slowloris => {
                let host: Arc<str> = host.into();
                for _ in 0..plan.connections.max(1) {
                    let (counts, host) = (Arc::clone(&counts), Arc::clone(&host));
                    tasks.spawn(hold(plan.kind == Attack::Slowloris, host, deadline, counts));
                }
            }
        }
        while tasks.join_next().await.is_some() {}
        Tally {
            sent: counts.sent.load(Ordering::Relaxed),
            answers: std::mem::take(
                &mut *counts
                    .answers
                    .lock()
                    .unwrap_or_else(std::sync::PoisonError::into_inner),
            ),
            closed_by_daemon: counts.closed.load(Ordering::Relaxed),
            connect_failed: counts.connect_failed.load(Ordering::Relaxed),
        }
    }))
}

/// A well-formed SET (RS256 header, claims of an issuer the daemon does not know) with a
/// signature of random bytes.
fn forged_set(n: u64) -> String {
    use base64::Engine as _;
    let b64 = |v: &[u8]| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(v);
    let header = b64(br#"{"alg":"RS256","typ":"secevent+jwt","kid":"attacker"}"#);
    let claims = b64(serde_json::json!({
        "iss": "https://attacker.invalid", "aud": "tokenvault", "jti": format!("forged-{n}"),
        "iat": crate::unix_now(),
        "events": {"https://schemas.openid.net/secevent/risc/event-type/tokens-revoked":
            {"subject": {"format": "email", "email": "victim@example.com"}}},
    })
    .to_string()
    .as_bytes());
    let signature: [u8; 256] = std::array::from_fn(|_| rand::random());
    format!("{header}.{claims}.{}", b64(&signature))
}

async fn flood(
    kind: Attack,
    base: String,
    task: usize,
    every: Option<Duration>,
    deadline: Instant,
    counts: Arc<Counts>,
) {
    let mut tick = every.map(|d| {
        let mut i = tokio::time::interval(d);
        i.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        i
    });
    let http = hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
        .build_http::<http_body_util::Full<bytes::Bytes>>();
    let broker = match kind {
        Attack::WrongCredential | Attack::NoCredential | Attack::LargeBodies => {
            match tonic::transport::Endpoint::from_shared(base.clone()) {
                Ok(e) => match e.connect().await {
                    Ok(channel) => Some(v1::broker_client::BrokerClient::new(channel)),
                    Err(_) => {
                        counts.connect_failed.fetch_add(1, Ordering::Relaxed);
                        return;
                    }
                },
                Err(_) => return,
            }
        }
        _ => None,
    };
    let mut n = 0u64;
    while Instant::now() < deadline {
        if let Some(t) = tick.as_mut() {
            t.tick().await;
        }
        n += 1;
        counts.sent.fetch_add(1, Ordering::Relaxed);
        match (kind, broker.clone()) {
            (Attack::WrongCredential | Attack::NoCredential | Attack::LargeBodies, Some(mut b)) => {
                let id = if kind == Attack::LargeBodies {
                    "x".repeat(1 << 20)
                } else {
                    "x".into()
                };
                let mut req = tonic::Request::new(v1::GetTokenRequest { id });
                if kind != Attack::NoCredential
                    && let Ok(v) = format!("Bearer tv_attacker_{task}_{n}").parse()
                {
                    req.metadata_mut().insert("authorization", v);
                }
                let code = match b.get_token(req).await {
                    Ok(_) => "OK".to_string(),
                    Err(s) => crate::server::status::code_name(s.code()).to_string(),
                };
                counts.answer(code);
            }
            _ => {
                let body = if kind == Attack::SetForged {
                    forged_set(n)
                } else {
                    format!("garbage-{task}-{n}")
                };
                let req = http::Request::post(format!("{base}/v1/security-events"))
                    .header(http::header::CONTENT_TYPE, "application/secevent+jwt")
                    .body(http_body_util::Full::new(bytes::Bytes::from(body)));
                let Ok(req) = req else { return };
                match http.request(req).await {
                    Ok(r) => counts.answer(r.status().as_u16().to_string()),
                    Err(_) => counts.answer("connection error".into()),
                }
            }
        }
    }
}

/// Holds one connection until the deadline (sending a header byte a second for slowloris);
/// counts it as closed if the daemon closes it first.
async fn hold(slow: bool, host: Arc<str>, deadline: Instant, counts: Arc<Counts>) {
    let Ok(mut conn) = tokio::net::TcpStream::connect(&*host).await else {
        counts.connect_failed.fetch_add(1, Ordering::Relaxed);
        return;
    };
    counts.sent.fetch_add(1, Ordering::Relaxed);
    let header = b"POST /v1/records HTTP/1.1\r\nhost: vault\r\ncontent-length: 100\r\n";
    let mut at = 0;
    let mut buf = [0u8; 512];
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return;
        }
        let wait = if slow {
            left.min(Duration::from_secs(1))
        } else {
            left
        };
        tokio::select! {
            read = conn.read(&mut buf) => {
                if matches!(read, Ok(0) | Err(_)) {
                    counts.closed.fetch_add(1, Ordering::Relaxed);
                    return;
                }
            }
            () = tokio::time::sleep(wait) => {
                if slow && at < header.len() {
                    if conn.write_all(&header[at..=at]).await.is_err() {
                        counts.closed.fetch_add(1, Ordering::Relaxed);
                        return;
                    }
                    at += 1;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_forged_set_is_a_well_formed_jwt_of_an_unknown_issuer() {
        use base64::Engine as _;
        let set = forged_set(7);
        let parts: Vec<&str> = set.split('.').collect();
        assert_eq!(parts.len(), 3);
        let claims: serde_json::Value = serde_json::from_slice(
            &base64::engine::general_purpose::URL_SAFE_NO_PAD
                .decode(parts[1])
                .expect("base64url"),
        )
        .expect("json");
        assert_eq!(claims["iss"], "https://attacker.invalid");
        assert_eq!(claims["jti"], "forged-7");
    }
}
