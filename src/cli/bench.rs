//! `tokenvault-bench`, the load generator (a binary of its own, `src/bin/tokenvault-bench.rs`,
//! so the daemon's binary does not carry it): drives a running daemon with a mix of
//! operations and reports throughput and latency percentiles per operation, as a table or
//! JSON. Seeds its own records. Reads the daemon's address and credentials as `tokenvault`
//! does (`--addr` / TOKENVAULT_ADDR and the credential variables).
//!
//! Envelopes are sealed before the timed phase (sealing is the web tier's CPU, not the
//! daemon's), so on a shared machine the figures measure the daemon: `--presealed` of them,
//! sealed on every core before the clock starts. A run that writes more than that seals the
//! rest as it goes, on this machine's CPU and outside each call's timed latency; the report
//! says how many (`sealed.during_run`), since that CPU is then taken from the daemon.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use clap::{Args, Parser};
use rand::Rng as _;

use super::CliError;
use super::client::{Authed, Connection, active_sealer, connect};
use crate::api::SealRecord as _;
use crate::api::v1;
use crate::config::Role;
use crate::record::{RecordMeta, SecretKind};
use crate::sealer::Sealer;
use crate::secret::Secret;

/// Load-test a running tokenvault daemon: a mix of operations, throughput and latency
/// percentiles (ingest, worker and, for rewrap, admin credentials).
#[derive(Debug, Parser)]
#[command(name = "tokenvault-bench", version, long_about = None)]
pub(crate) struct BenchCli {
    #[command(flatten)]
    pub(crate) args: BenchArgs,
}

#[derive(Debug, Args)]
pub(crate) struct BenchArgs {
    /// Weighted mix of operations: get, put (PutSealed), batch (PutSealedBatch), proxy, echo
    /// (Ingest.PublicKeys: gRPC and authentication only, the baseline), http-put (POST
    /// /v1/records over HTTP/1.1 JSON, next to put's gRPC), e.g.
    /// "get=8,put=1,batch=1"; or "rewrap" alone (rotate, then time one Admin.Rewrap).
    #[arg(long, default_value = "get=1")]
    mix: String,
    /// Seconds of load.
    #[arg(long, default_value_t = 10)]
    duration: u64,
    /// Requests in flight.
    #[arg(long, default_value_t = 64)]
    concurrency: usize,
    /// gRPC connections the requests are spread over.
    #[arg(long, default_value_t = 4)]
    connections: usize,
    /// Records seeded for get and proxy.
    #[arg(long, default_value_t = 1000)]
    records: usize,
    /// Records per PutSealedBatch.
    #[arg(long, default_value_t = 500)]
    batch_size: usize,
    /// Records for the write operations sealed before the clock starts (default: 200 batches,
    /// at most 200,000). Size it to what the run writes, so that none is sealed during it
    /// (each takes about 0.7 KB of memory, so at most 10,000,000: 7 GB).
    #[arg(long, value_name = "RECORDS", value_parser = clap::value_parser!(u32).range(0..=MAX_PRESEALED))]
    presealed: Option<u32>,
    /// Bytes of each sealed secret.
    #[arg(long, default_value_t = 40)]
    secret_bytes: usize,
    /// Provider of the seeded records (proxy needs it configured in the daemon).
    #[arg(long, default_value = "bench")]
    provider: String,
    /// Method and path of proxy calls.
    #[arg(long, default_value = "GET /")]
    proxy_request: String,
    /// Skip the warm-up: by default every seeded record is read once with GetToken before the
    /// clock starts, so a daemon with the DEK cache on is measured warm and every run starts
    /// from the same state.
    #[arg(long)]
    no_warmup: bool,
    /// Also report the CPU time the daemon with this process id spent per operation during
    /// the timed window (read from /proc: Linux, same machine). The load generator's own CPU
    /// time is always reported.
    #[arg(long, value_name = "PID")]
    daemon_pid: Option<u32>,
    /// Also attack the daemon during the timed window, to measure what the attack costs the
    /// legitimate mix (compare with a run without it).
    #[arg(long, value_enum)]
    attack: Option<super::attack::Attack>,
    /// Attack requests per second (0: as fast as --attack-concurrency tasks go).
    #[arg(long, default_value_t = 0)]
    attack_rate: u32,
    /// Tasks sending attack requests.
    #[arg(long, default_value_t = 16)]
    attack_concurrency: usize,
    /// Connections held by the idle-connections and slowloris attacks.
    #[arg(long, default_value_t = 2000)]
    attack_connections: usize,
    /// Send the next call at once after a `RESOURCE_EXHAUSTED` instead of waiting the retry
    /// time the daemon's `RetryInfo` gives, as a client that ignores it would.
    #[arg(long)]
    ignore_retry_hints: bool,
    /// Print JSON instead of a table.
    #[arg(long)]
    json: bool,
    #[command(flatten)]
    conn: Connection,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Op {
    Get,
    Put,
    Batch,
    Proxy,
    Echo,
    HttpPut,
}

impl Op {
    fn name(self) -> &'static str {
        match self {
            Op::Get => "get",
            Op::Put => "put",
            Op::Batch => "batch",
            Op::Proxy => "proxy",
            Op::Echo => "echo",
            Op::HttpPut => "http-put",
        }
    }
}

fn parse_mix(mix: &str) -> Result<Vec<(Op, u32)>, CliError> {
    let mut out = Vec::new();
    for part in mix.split(',').filter(|p| !p.is_empty()) {
        let (name, weight) = part.split_once('=').unwrap_or((part, "1"));
        let op = match name.trim() {
            "get" => Op::Get,
            "put" => Op::Put,
            "batch" => Op::Batch,
            "proxy" => Op::Proxy,
            "echo" => Op::Echo,
            "http-put" => Op::HttpPut,
            other => {
                return Err(CliError::Input(format!(
                    "unknown operation {other:?} in --mix (get, put, batch, proxy, echo, http-put, or rewrap alone)"
                )));
            }
        };
        let weight: u32 = weight
            .trim()
            .parse()
            .map_err(|_| CliError::Input(format!("bad weight in --mix: {part:?}")))?;
        if weight > 0 {
            out.push((op, weight));
        }
    }
    if out.is_empty() {
        return Err(CliError::Input(
            "--mix names no operation with a weight > 0".into(),
        ));
    }
    Ok(out)
}

/// Latencies and errors of one operation.
#[derive(Debug, Default)]
struct Samples {
    micros: Vec<u64>,
    errors: u64,
    /// How long each call answered `RESOURCE_EXHAUSTED` took to be refused.
    refused_micros: Vec<u64>,
    /// Records written (batch) or 1 per call.
    items: u64,
}

/// Per-operation results of a run.
#[derive(Debug, serde::Serialize)]
struct Report {
    operation: String,
    count: u64,
    items: u64,
    ops_per_second: f64,
    items_per_second: f64,
    p50_us: u64,
    p90_us: u64,
    p99_us: u64,
    max_us: u64,
    /// Calls that failed, refused ones included.
    errors: u64,
    /// Of those, calls the daemon refused with `RESOURCE_EXHAUSTED` (shed under overload),
    /// and how long the slowest 1% of them took to be refused.
    refused: u64,
    refused_p99_us: u64,
}

fn percentile(sorted: &[u64], p: f64) -> u64 {
    if sorted.is_empty() {
        return 0;
    }
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

fn report(op: &str, mut s: Samples, seconds: f64) -> Report {
    s.micros.sort_unstable();
    s.refused_micros.sort_unstable();
    let count = s.micros.len() as u64;
    Report {
        operation: op.to_string(),
        count,
        items: s.items,
        ops_per_second: count as f64 / seconds,
        items_per_second: s.items as f64 / seconds,
        p50_us: percentile(&s.micros, 50.0),
        p90_us: percentile(&s.micros, 90.0),
        p99_us: percentile(&s.micros, 99.0),
        max_us: s.micros.last().copied().unwrap_or(0),
        errors: s.errors,
        refused: s.refused_micros.len() as u64,
        refused_p99_us: percentile(&s.refused_micros, 99.0),
    }
}

/// How one call ended.
enum Outcome {
    /// Served; the records it read or wrote.
    Served(u64),
    /// Refused with `RESOURCE_EXHAUSTED`, with the daemon's retry time if it gave one.
    Shed(Option<Duration>),
    Failed,
}

impl Outcome {
    fn of<T>(result: Result<T, tonic::Status>, items: u64) -> Self {
        match result {
            Ok(_) => Outcome::Served(items),
            Err(status) if status.code() == tonic::Code::ResourceExhausted => {
                Outcome::Shed(retry_hint(&status))
            }
            Err(_) => Outcome::Failed,
        }
    }
}

/// The retry time of a refusal's `google.rpc.RetryInfo`, if it has one.
fn retry_hint(status: &tonic::Status) -> Option<Duration> {
    use tonic_types::StatusExt as _;
    status.get_details_retry_info().and_then(|r| r.retry_delay)
}

/// Most records `--presealed` seals (about 0.7 KB of memory each).
const MAX_PRESEALED: i64 = 10_000_000;

/// Records to write, each handed out once: pre-sealed ones first, then sealed on demand
/// (which then costs client CPU during the run, and is counted).
struct Pool {
    records: std::sync::Mutex<Vec<v1::SealedRecord>>,
    sealing: Sealing,
    next: std::sync::atomic::AtomicUsize,
    /// Records sealed on demand during the run.
    sealed_late: std::sync::atomic::AtomicU64,
}

impl Pool {
    /// Up to `n` records: what is left of the pre-sealed ones, else `n` sealed now on a
    /// blocking thread (not on a runtime worker, where it would hold up the answers of other
    /// calls in flight).
    async fn take(self: &Arc<Self>, n: usize) -> Result<Vec<v1::SealedRecord>, CliError> {
        let pre = {
            let mut r = self
                .records
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            let at = r.len().saturating_sub(n);
            r.split_off(at)
        };
        if !pre.is_empty() {
            return Ok(pre);
        }
        let pool = Arc::clone(self);
        tokio::task::spawn_blocking(move || {
            use std::sync::atomic::Ordering;
            let first = pool.next.fetch_add(n, Ordering::Relaxed);
            pool.sealed_late.fetch_add(n as u64, Ordering::Relaxed);
            pool.sealing.seal(first..first + n)
        })
        .await
        .map_err(|e| CliError::Internal(format!("sealing task: {e}")))?
    }
}

/// Seals records `{prefix}{i}` of one owner with fresh random secrets.
struct Sealing {
    sealer: Sealer,
    prefix: String,
    provider: String,
    secret_bytes: usize,
}

impl Sealing {
    fn seal(&self, range: std::ops::Range<usize>) -> Result<Vec<v1::SealedRecord>, CliError> {
        range
            .map(|i| {
                let meta = RecordMeta::parse(
                    &format!("{}{i}", self.prefix),
                    "bench-owner",
                    &self.provider,
                    SecretKind::AccessToken,
                    &[],
                    0,
                )
                .map_err(|e| CliError::Input(e.to_string()))?;
                let mut secret = vec![b'x'; self.secret_bytes.max(1)];
                rand::thread_rng().fill(&mut secret[..]);
                for b in &mut secret {
                    *b = b'a' + (*b % 26);
                }
                self.sealer
                    .seal_record(&meta, &Secret::new(secret))
                    .map_err(|e| CliError::Internal(format!("sealing: {e}")))
            })
            .collect()
    }

    /// [`Sealing::seal`] split across the machine's cores.
    fn seal_parallel(
        &self,
        range: std::ops::Range<usize>,
    ) -> Result<Vec<v1::SealedRecord>, CliError> {
        let threads = std::thread::available_parallelism().map_or(1, std::num::NonZeroUsize::get);
        let chunk = range.len().div_ceil(threads).max(1);
        let parts: Vec<Result<Vec<v1::SealedRecord>, CliError>> = std::thread::scope(|s| {
            let handles: Vec<_> = (range.start..range.end)
                .step_by(chunk)
                .map(|from| s.spawn(move || self.seal(from..(from + chunk).min(range.end))))
                .collect();
            handles
                .into_iter()
                .map(|h| {
                    h.join()
                        .map_err(|_| CliError::Internal("a sealing thread panicked".into()))?
                })
                .collect()
        });
        let mut all = Vec::with_capacity(range.len());
        for part in parts {
            all.extend(part?);
        }
        Ok(all)
    }
}

pub(crate) async fn run(args: BenchArgs) -> Result<(), CliError> {
    if args.mix.trim() == "rewrap" {
        return rewrap(&args).await;
    }
    let mix = parse_mix(&args.mix)?;
    // Checked before anything is seeded, so a wrong pid changes nothing.
    CpuUse::now(args.daemon_pid)?;
    let concurrency = args.concurrency.max(1);
    let run_id = format!("{:08x}", rand::random::<u32>());
    let mut ingest = Vec::new();
    let mut workers = Vec::new();
    for _ in 0..args.connections.max(1) {
        ingest.push(connect(&args.conn, Role::Ingest).await?);
        if mix.iter().any(|(op, _)| matches!(op, Op::Get | Op::Proxy)) {
            workers.push(connect(&args.conn, Role::Worker).await?);
        }
    }
    // Seed the records get and proxy read.
    let seeded = format!("bench-{run_id}-r-");
    let records = args.records.max(1);
    let sealer = seed(ingest[0].clone(), &args, &seeded, records).await?;
    // Envelopes for the write operations, sealed before the clock starts.
    let writes: u32 = mix
        .iter()
        .filter(|(op, _)| matches!(op, Op::Put | Op::Batch | Op::HttpPut))
        .map(|(_, w)| *w)
        .sum();
    let pool_size = if writes == 0 {
        0
    } else {
        args.presealed
            .map_or((args.batch_size.max(1) * 200).min(200_000), |n| n as usize)
    };
    let sealing = Sealing {
        sealer,
        prefix: format!("bench-{run_id}-w-"),
        provider: args.provider.clone(),
        secret_bytes: args.secret_bytes,
    };
    let pool = Arc::new(Pool {
        records: std::sync::Mutex::new(sealing.seal_parallel(0..pool_size)?),
        sealing,
        next: std::sync::atomic::AtomicUsize::new(pool_size),
        sealed_late: std::sync::atomic::AtomicU64::new(0),
    });
    let (method, path) = args
        .proxy_request
        .split_once(' ')
        .map(|(m, p)| (m.to_string(), p.to_string()))
        .unwrap_or_else(|| ("GET".into(), "/".into()));
    if !args.no_warmup && !workers.is_empty() {
        warm_up(&workers, &seeded, records, concurrency).await?;
    }
    let http = if mix.iter().any(|(op, _)| *op == Op::HttpPut) {
        Some(HttpIngest::new(&args.conn)?)
    } else {
        None
    };
    let total_weight: u32 = mix.iter().map(|(_, w)| w).sum();
    let cpu_before = CpuUse::now(args.daemon_pid)?;
    let deadline = Instant::now() + Duration::from_secs(args.duration.max(1));
    if args.attack.is_some() {
        // The attacker holds thousands of connections; a shell's soft limit is 1,024.
        let _ = crate::server::conn::raise_nofile_limit();
    }
    let attack = args
        .attack
        .map(|kind| {
            super::attack::start(
                super::attack::Plan {
                    kind,
                    rate: args.attack_rate,
                    concurrency: args.attack_concurrency,
                    connections: args.attack_connections,
                },
                args.conn.addr(),
                deadline,
            )
        })
        .transpose()?;
    let started = Instant::now();
    let mut tasks = tokio::task::JoinSet::new();
    for t in 0..concurrency {
        let ingest = v1::ingest_client::IngestClient::new(ingest[t % ingest.len()].clone());
        let broker = workers
            .get(t % workers.len().max(1))
            .cloned()
            .map(v1::broker_client::BrokerClient::new);
        let (mix, pool, seeded) = (mix.clone(), Arc::clone(&pool), seeded.clone());
        let http = http.clone();
        let (method, path, batch_size) = (method.clone(), path.clone(), args.batch_size.max(1));
        let ignore_hints = args.ignore_retry_hints;
        tasks.spawn(async move {
            let mut ingest: v1::ingest_client::IngestClient<Authed> = ingest;
            let mut broker = broker;
            let mut samples: BTreeMap<Op, Samples> = BTreeMap::new();
            while Instant::now() < deadline {
                let mut pick = rand::thread_rng().gen_range(0..total_weight);
                let op = mix
                    .iter()
                    .find(|(_, w)| {
                        if pick < *w {
                            true
                        } else {
                            pick -= w;
                            false
                        }
                    })
                    .map_or(Op::Get, |(op, _)| *op);
                let id = format!("{seeded}{}", rand::thread_rng().gen_range(0..records));
                // A write's records are taken (and, once the pre-sealed ones are used up,
                // sealed) before its clock starts: the latency is the daemon's.
                let mut records = match op {
                    Op::Put | Op::HttpPut => pool.take(1).await.unwrap_or_default(),
                    Op::Batch => pool.take(batch_size).await.unwrap_or_default(),
                    Op::Get | Op::Proxy | Op::Echo => Vec::new(),
                };
                if records.is_empty() && matches!(op, Op::Put | Op::HttpPut | Op::Batch) {
                    break;
                }
                let t0 = Instant::now();
                let outcome = match (op, broker.as_mut()) {
                    (Op::Get, Some(b)) => {
                        Outcome::of(b.get_token(v1::GetTokenRequest { id }).await, 1)
                    }
                    (Op::Proxy, Some(b)) => Outcome::of(
                        b.proxy(v1::ProxyRequest {
                            id,
                            method: method.clone(),
                            path: path.clone(),
                            headers: vec![],
                            body: vec![],
                            grant: String::new(),
                        })
                        .await,
                        1,
                    ),
                    (Op::Echo, _) => {
                        Outcome::of(ingest.public_keys(v1::PublicKeysRequest {}).await, 1)
                    }
                    (Op::Put, _) => Outcome::of(
                        ingest
                            .put_sealed(v1::PutSealedRequest {
                                record: records.pop(),
                                expected_version: 0,
                            })
                            .await,
                        1,
                    ),
                    (Op::Batch, _) => {
                        let n = records.len() as u64;
                        Outcome::of(ingest.put_sealed_batch(creates(records)).await, n)
                    }
                    (Op::HttpPut, _) => match (http.as_ref(), records.pop()) {
                        (Some(h), Some(record)) if h.put(&record).await => Outcome::Served(1),
                        _ => Outcome::Failed,
                    },
                    (_, None) => Outcome::Failed,
                };
                let took = u64::try_from(t0.elapsed().as_micros()).unwrap_or(u64::MAX);
                let s = samples.entry(op).or_default();
                match outcome {
                    Outcome::Served(items) => {
                        s.micros.push(took);
                        s.items += items;
                    }
                    Outcome::Shed(retry) => {
                        s.errors += 1;
                        s.refused_micros.push(took);
                        // A client that heeds the daemon waits the time it was given.
                        if let Some(wait) = retry.filter(|_| !ignore_hints) {
                            tokio::time::sleep_until(
                                (tokio::time::Instant::now() + wait)
                                    .min(tokio::time::Instant::from_std(deadline)),
                            )
                            .await;
                        }
                    }
                    Outcome::Failed => s.errors += 1,
                }
            }
            samples
        });
    }
    let mut merged: BTreeMap<Op, Samples> = BTreeMap::new();
    while let Some(r) = tasks.join_next().await {
        let samples = r.map_err(|e| CliError::Internal(format!("load task: {e}")))?;
        for (op, s) in samples {
            let m = merged.entry(op).or_default();
            m.micros.extend(s.micros);
            m.refused_micros.extend(s.refused_micros);
            m.errors += s.errors;
            m.items += s.items;
        }
    }
    let seconds = started.elapsed().as_secs_f64();
    let cpu = CpuUse::now(args.daemon_pid)?.since(&cpu_before);
    let reports: Vec<Report> = merged
        .into_iter()
        .map(|(op, s)| report(op.name(), s, seconds))
        .collect();
    let tally = match attack {
        Some(handle) => Some(
            handle
                .await
                .map_err(|e| CliError::Internal(format!("attack task: {e}")))?,
        ),
        None => None,
    };
    let sealed = (writes > 0).then(|| Sealed {
        presealed: pool_size,
        during_run: pool.sealed_late.load(std::sync::atomic::Ordering::Relaxed),
    });
    print_reports(
        &args,
        concurrency,
        seconds,
        &reports,
        Some(&cpu),
        tally.as_ref(),
        sealed,
    )
}

/// How a run's write records were sealed.
#[derive(Debug, Clone, Copy, serde::Serialize)]
struct Sealed {
    /// Before the clock started.
    presealed: usize,
    /// During the timed run, on the load generator's CPU.
    during_run: u64,
}

/// `POST /v1/records` over HTTP/1.1 (keep-alive, pooled), the JSON route a web tier without
/// gRPC uses; plain `http://` only (a bench runs on loopback).
#[derive(Clone)]
struct HttpIngest {
    client: hyper_util::client::legacy::Client<
        hyper_util::client::legacy::connect::HttpConnector,
        http_body_util::Full<bytes::Bytes>,
    >,
    url: String,
    authorization: Arc<zeroize::Zeroizing<String>>,
}

impl HttpIngest {
    fn new(conn: &Connection) -> Result<Self, CliError> {
        let base = conn.addr().trim_end_matches('/');
        if !base.starts_with("http://") {
            return Err(CliError::Input(
                "--mix http-put needs an http:// --addr (the bench's HTTP client has no TLS)"
                    .into(),
            ));
        }
        let credential = super::client::credential(conn, Role::Ingest)?.ok_or_else(|| {
            CliError::Auth("--mix http-put needs a bearer credential for the ingest role".into())
        })?;
        let client =
            hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
                .build_http();
        Ok(Self {
            client,
            url: format!("{base}/v1/records"),
            authorization: Arc::new(zeroize::Zeroizing::new(format!(
                "Bearer {}",
                credential.expose_secret()
            ))),
        })
    }

    async fn put(&self, record: &v1::SealedRecord) -> bool {
        // PutSealed's proto3 JSON, as a web tier written from docs/WEB_TIER.md sends it.
        let Ok(body) = serde_json::to_string(&v1::PutSealedRequest {
            record: Some(record.clone()),
            expected_version: 0,
        }) else {
            return false;
        };
        let Ok(request) = http::Request::post(&self.url)
            .header(http::header::CONTENT_TYPE, "application/json")
            .header(http::header::AUTHORIZATION, self.authorization.as_str())
            .body(http_body_util::Full::new(bytes::Bytes::from(body)))
        else {
            return false;
        };
        match self.client.request(request).await {
            Ok(response) => {
                let ok = response.status() == http::StatusCode::OK;
                // Read the body so the connection goes back to the pool.
                let _ = http_body_util::BodyExt::collect(response.into_body()).await;
                ok
            }
            Err(_) => false,
        }
    }
}

/// CPU seconds (user + system, all threads) of this process and optionally the daemon.
#[derive(Debug, Clone, Copy, serde::Serialize)]
struct CpuUse {
    load_generator_seconds: f64,
    daemon_seconds: Option<f64>,
}

impl CpuUse {
    fn now(daemon: Option<u32>) -> Result<Self, CliError> {
        Ok(Self {
            load_generator_seconds: process_cpu_seconds("self")?,
            daemon_seconds: daemon
                .map(|pid| process_cpu_seconds(&pid.to_string()))
                .transpose()?,
        })
    }

    fn since(&self, before: &Self) -> Self {
        Self {
            load_generator_seconds: self.load_generator_seconds - before.load_generator_seconds,
            daemon_seconds: self
                .daemon_seconds
                .zip(before.daemon_seconds)
                .map(|(now, then)| now - then),
        }
    }
}

/// utime + stime of `/proc/{pid}/stat`, in seconds.
fn process_cpu_seconds(pid: &str) -> Result<f64, CliError> {
    let path = format!("/proc/{pid}/stat");
    let stat = std::fs::read_to_string(&path)
        .map_err(|e| CliError::Precondition(format!("reading {path}: {e}")))?;
    crate::vault::metrics::cpu_ticks(&stat)
        .map(|ticks| ticks as f64 / rustix::param::clock_ticks_per_second() as f64)
        .ok_or_else(|| CliError::Internal(format!("{path} has no CPU times")))
}

fn print_reports(
    args: &BenchArgs,
    concurrency: usize,
    seconds: f64,
    reports: &[Report],
    cpu: Option<&CpuUse>,
    attack: Option<&super::attack::Tally>,
    sealed: Option<Sealed>,
) -> Result<(), CliError> {
    let ops: u64 = reports.iter().map(|r| r.count).sum();
    let per_op = |s: f64| (ops > 0).then(|| s * 1e6 / ops as f64);
    if args.json {
        let out = serde_json::json!({
            "mix": args.mix,
            "concurrency": concurrency,
            "connections": args.connections,
            "seconds": seconds,
            "operations": reports,
            "cpu": cpu.map(|c| serde_json::json!({
                "load_generator_seconds": c.load_generator_seconds,
                "daemon_seconds": c.daemon_seconds,
                "load_generator_us_per_op": per_op(c.load_generator_seconds),
                "daemon_us_per_op": c.daemon_seconds.and_then(per_op),
            })),
            "sealed": sealed,
            "attack": attack.map(|t| serde_json::json!({
                "kind": args.attack.map(|k| format!("{k:?}")),
                "rate": args.attack_rate,
                "tally": t,
            })),
        });
        println!("{out}");
    } else {
        println!(
            "mix {} · concurrency {} · {} connection(s) · {:.1} s",
            args.mix, concurrency, args.connections, seconds
        );
        println!(
            "{:<8} {:>9} {:>11} {:>12} {:>9} {:>9} {:>9} {:>9} {:>7} {:>8} {:>12}",
            "op",
            "calls",
            "calls/s",
            "records/s",
            "p50 µs",
            "p90 µs",
            "p99 µs",
            "max µs",
            "errors",
            "refused",
            "refused p99"
        );
        for r in reports {
            println!(
                "{:<8} {:>9} {:>11.0} {:>12.0} {:>9} {:>9} {:>9} {:>9} {:>7} {:>8} {:>12}",
                r.operation,
                r.count,
                r.ops_per_second,
                r.items_per_second,
                r.p50_us,
                r.p90_us,
                r.p99_us,
                r.max_us,
                r.errors,
                r.refused,
                r.refused_p99_us
            );
        }
        if let Some(c) = cpu {
            let show = |s: Option<f64>| s.map_or("-".to_string(), |us| format!("{us:.1}"));
            println!(
                "cpu µs per operation: load generator {}, daemon {}",
                show(per_op(c.load_generator_seconds)),
                show(c.daemon_seconds.and_then(per_op))
            );
        }
        if let Some(s) = sealed {
            println!(
                "records sealed: {} before the run, {} during it (on this machine's CPU)",
                s.presealed, s.during_run
            );
        }
        if let Some(t) = attack {
            let answers: Vec<String> = t.answers.iter().map(|(k, v)| format!("{k} {v}")).collect();
            println!(
                "attack {:?}: sent {} · answers: {} · closed by the daemon {} · connect failures {}",
                args.attack,
                t.sent,
                if answers.is_empty() {
                    "-".into()
                } else {
                    answers.join(", ")
                },
                t.closed_by_daemon,
                t.connect_failed
            );
        }
    }
    if reports.iter().any(|r| r.errors > 0 && r.count == 0) {
        return Err(CliError::Precondition(
            "an operation failed every time (credentials? provider configured for proxy?)".into(),
        ));
    }
    Ok(())
}

/// A batch creating each of `records`.
fn creates(records: Vec<v1::SealedRecord>) -> v1::PutSealedBatchRequest {
    v1::PutSealedBatchRequest {
        items: records
            .into_iter()
            .map(|r| v1::PutSealedRequest {
                record: Some(r),
                expected_version: 0,
            })
            .collect(),
    }
}

/// Stores `count` records `{prefix}0..` in batches of 1000; returns a sealer for the daemon's
/// active key.
async fn seed(
    ingest: Authed,
    args: &BenchArgs,
    prefix: &str,
    count: usize,
) -> Result<Sealer, CliError> {
    let mut ingest = v1::ingest_client::IngestClient::new(ingest);
    let sealing = Sealing {
        sealer: active_sealer(&mut ingest).await?,
        prefix: prefix.to_string(),
        provider: args.provider.clone(),
        secret_bytes: args.secret_bytes,
    };
    for start in (0..count).step_by(1000) {
        let records = sealing.seal(start..(start + 1000).min(count))?;
        ingest.put_sealed_batch(creates(records)).await?;
    }
    Ok(sealing.sealer)
}

/// Reads every seeded record once, `concurrency` at a time, over all connections.
async fn warm_up(
    workers: &[Authed],
    seeded: &str,
    records: usize,
    concurrency: usize,
) -> Result<(), CliError> {
    let next = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let mut tasks = tokio::task::JoinSet::new();
    for t in 0..concurrency.min(records) {
        let mut broker = v1::broker_client::BrokerClient::new(workers[t % workers.len()].clone());
        let (next, seeded) = (Arc::clone(&next), seeded.to_string());
        tasks.spawn(async move {
            loop {
                let i = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                if i >= records {
                    return Ok::<_, CliError>(());
                }
                let id = format!("{seeded}{i}");
                // A daemon shedding load answers RESOURCE_EXHAUSTED with a retry hint: the
                // warm-up waits as told and reads the record again.
                loop {
                    let got = broker
                        .get_token(v1::GetTokenRequest { id: id.clone() })
                        .await;
                    match got {
                        Err(status) if status.code() == tonic::Code::ResourceExhausted => {
                            let wait = retry_hint(&status).unwrap_or(Duration::from_millis(100));
                            tokio::time::sleep(wait).await;
                        }
                        got => break got.map(drop)?,
                    }
                }
            }
        });
    }
    while let Some(r) = tasks.join_next().await {
        r.map_err(|e| CliError::Internal(format!("warm-up task: {e}")))??;
    }
    Ok(())
}

/// Seeds records, rotates, and times one Admin.Rewrap of all of them.
async fn rewrap(args: &BenchArgs) -> Result<(), CliError> {
    let ingest = connect(&args.conn, Role::Ingest).await?;
    let admin = connect(&args.conn, Role::Admin).await?;
    let prefix = format!("bench-{:08x}-rw-", rand::random::<u32>());
    seed(ingest, args, &prefix, args.records.max(1)).await?;
    let mut admin = v1::admin_client::AdminClient::new(admin);
    admin.rotate_key(v1::RotateKeyRequest::default()).await?;
    let started = Instant::now();
    let mut stream = admin
        .rewrap(v1::RewrapRequest::default())
        .await?
        .into_inner();
    let mut last = None;
    while let Some(p) = stream.message().await? {
        last = Some(p);
    }
    let seconds = started.elapsed().as_secs_f64();
    let last = last.ok_or_else(|| CliError::Internal("rewrap reported nothing".into()))?;
    let report = Report {
        operation: "rewrap".into(),
        count: 1,
        items: last.rewrapped,
        ops_per_second: 1.0 / seconds,
        items_per_second: last.rewrapped as f64 / seconds,
        p50_us: 0,
        p90_us: 0,
        p99_us: 0,
        max_us: u64::try_from(started.elapsed().as_micros()).unwrap_or(u64::MAX),
        errors: last.failed,
        refused: 0,
        refused_p99_us: 0,
    };
    print_reports(args, 1, seconds, &[report], None, None, None)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpu_ticks_are_read_past_a_command_name_with_spaces_and_parentheses() {
        let stat = "4242 (tokenvault (x) y) S 1 4242 4242 0 -1 4194560 5 0 0 0 123 45 0 0 20 0 9";
        assert_eq!(crate::vault::metrics::cpu_ticks(stat), Some(168));
        assert_eq!(crate::vault::metrics::cpu_ticks("4242 (short) S 1 2"), None);
        assert_eq!(crate::vault::metrics::cpu_ticks("no parenthesis"), None);
        let mine = process_cpu_seconds("self").expect("own stat");
        assert!(mine >= 0.0);
        assert!(matches!(
            process_cpu_seconds("999999999"),
            Err(CliError::Precondition(_))
        ));
    }

    #[test]
    fn mixes_and_percentiles() {
        assert_eq!(
            parse_mix("get=8,put=1,batch=0").expect("ok"),
            vec![(Op::Get, 8), (Op::Put, 1)]
        );
        assert!(parse_mix("delete=1").is_err());
        assert!(parse_mix("get=0").is_err());
        let v: Vec<u64> = (1..=100).collect();
        assert_eq!(
            (
                percentile(&v, 50.0),
                percentile(&v, 99.0),
                percentile(&v, 100.0)
            ),
            (50, 99, 100)
        );
        assert_eq!(percentile(&[], 50.0), 0);
    }
}
