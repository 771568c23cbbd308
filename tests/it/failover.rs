//! The loss of the database primary: a Patroni-managed PostgreSQL primary and synchronous
//! standby (`scripts/patroni-cluster`, real processes on loopback), three daemons on it through
//! a multi-host URL with `target_session_attrs=read-write`, continuous writes and reads, and
//! the primary's host lost (its Patroni and its PostgreSQL killed with SIGKILL).

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use crate::common;
use common::pg;
use common::*;
use tokenvault::api::SealRecord as _;
use tokenvault::api::v1;
use tokenvault::audit::ChainVerifier;
use tonic::Code;

/// A running `scripts/patroni-cluster`: stopped (and its directory removed) when dropped, by
/// closing the script's standard input.
struct Cluster {
    child: std::process::Child,
    dir: PathBuf,
    env: HashMap<String, String>,
}

impl Cluster {
    fn start() -> Self {
        let dir = PathBuf::from(format!(
            "/tmp/tokenvault-patroni.{}",
            hex::encode(rand::random::<[u8; 6]>())
        ));
        let child = std::process::Command::new(process::root().join("scripts/patroni-cluster"))
            .arg(&dir)
            .stdin(std::process::Stdio::piped())
            .spawn()
            .expect("scripts/patroni-cluster starts");
        let mut cluster = Self {
            child,
            dir,
            env: HashMap::new(),
        };
        let env_file = cluster.dir.join("cluster.env");
        // Bootstrapping two nodes (initdb, base backup) takes seconds; the script gives up
        // after 120 s per node and exits, which ends the wait too.
        let deadline = Instant::now() + Duration::from_secs(300);
        while !env_file.exists() {
            if let Some(status) = cluster.child.try_wait().expect("wait") {
                panic!("scripts/patroni-cluster exited before the cluster was up: {status}");
            }
            assert!(Instant::now() < deadline, "no cluster after 300 s");
            std::thread::sleep(Duration::from_millis(100));
        }
        let text = std::fs::read_to_string(&env_file).expect("cluster.env");
        for line in text.lines() {
            let (k, v) = line.split_once('=').expect("NAME=value");
            cluster
                .env
                .insert(k.to_string(), v.trim_matches('\'').to_string());
        }
        cluster
    }

    fn var(&self, name: &str) -> &str {
        self.env
            .get(name)
            .unwrap_or_else(|| panic!("{name} in cluster.env"))
    }

    /// Each node's name and PostgreSQL port.
    fn nodes(&self) -> Vec<(String, u16)> {
        self.var("PATRONI_NODES")
            .split_whitespace()
            .map(|n| {
                let mut parts = n.split(':');
                let name = parts.next().expect("name").to_string();
                let port = parts.next().expect("port").parse().expect("port number");
                (name, port)
            })
            .collect()
    }

    /// The node whose PostgreSQL accepts writes now (`pg_is_in_recovery()` false).
    async fn primary(&self) -> Option<String> {
        for (name, port) in self.nodes() {
            let url = format!("postgres://postgres@127.0.0.1:{port}/postgres");
            let Ok((client, conn)) = tokio_postgres::connect(&url, tokio_postgres::NoTls).await
            else {
                continue;
            };
            tokio::spawn(conn);
            if let Ok(row) = client.query_one("SELECT pg_is_in_recovery()", &[]).await
                && !row.get::<_, bool>(0)
            {
                return Some(name);
            }
        }
        None
    }

    /// Loses node `name`'s host: SIGKILL to its Patroni (so nothing restarts its PostgreSQL)
    /// and to its PostgreSQL server.
    fn lose(&self, name: &str) {
        let patroni = self.var(&format!("PATRONI_{}_PID", name.to_uppercase()));
        let pid_file = self.dir.join(name).join("data/postmaster.pid");
        let postmaster = std::fs::read_to_string(&pid_file)
            .expect("postmaster.pid")
            .lines()
            .next()
            .expect("pid line")
            .to_string();
        let status = std::process::Command::new("kill")
            .args(["-KILL", patroni, &postmaster])
            .status()
            .expect("kill");
        assert!(status.success(), "kill -9 {patroni} {postmaster}");
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        drop(self.child.stdin.take());
        let _ = self.child.wait();
    }
}

/// One writer's or reader's record: acknowledged writes (id, when sent, when answered) and
/// refusals (code, message, when answered).
#[derive(Default)]
struct Seen {
    acked: Vec<(String, Instant, Instant)>,
    refused: Vec<(Code, String, Instant)>,
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_loss_of_the_primary_loses_no_acknowledged_write_and_no_audit_link() {
    let cluster = tokio::task::spawn_blocking(Cluster::start)
        .await
        .expect("join");
    assert_eq!(cluster.primary().await.as_deref(), Some("pg1"));
    let url = cluster.var("PATRONI_URL").to_string();
    assert!(url.contains(",127.0.0.1:") && url.ends_with("target_session_attrs=read-write"));

    let dirs: Vec<_> = (0..3).map(|_| tempfile::tempdir().expect("dir")).collect();
    let mut daemons = Vec::new();
    for (dir, name) in dirs.iter().zip(["a", "b", "c"]) {
        daemons.push(
            TestDaemon::start_with(pg::shared(config(dir.path()), dir.path(), &url, name)).await,
        );
    }
    daemons[0].seed("before", 20).await;
    let sealer = daemons[0].sealer().await;

    // Two writers per daemon, each also reading a record stored before the loss.
    let stop = Arc::new(AtomicBool::new(false));
    let acks = Arc::new(AtomicUsize::new(0));
    let progress = Arc::new(tokio::sync::Notify::new());
    let mut load = tokio::task::JoinSet::new();
    for (d, daemon) in daemons.iter().enumerate() {
        for w in 0..2 {
            let (mut ingest, mut broker) =
                (daemon.ingest(INGEST).await, daemon.broker(WORKER).await);
            let (sealer, stop, acks, progress) = (
                sealer.clone(),
                Arc::clone(&stop),
                Arc::clone(&acks),
                Arc::clone(&progress),
            );
            load.spawn(async move {
                let mut seen = Seen::default();
                for n in 0.. {
                    if stop.load(Ordering::SeqCst) {
                        break;
                    }
                    let id = format!("d{d}w{w}-{n}");
                    let rec = sealer
                        .seal_record(
                            &meta(&id, "o"),
                            &tokenvault::secret::Secret::new(id.clone().into_bytes()),
                        )
                        .expect("seal");
                    let sent = Instant::now();
                    let put = ingest
                        .put_sealed(v1::PutSealedRequest {
                            record: Some(rec),
                            expected_version: 0,
                        })
                        .await;
                    let at = Instant::now();
                    match put {
                        Ok(_) => {
                            seen.acked.push((id, sent, at));
                            acks.fetch_add(1, Ordering::SeqCst);
                            progress.notify_waiters();
                        }
                        Err(e) => seen.refused.push((e.code(), e.message().to_string(), at)),
                    }
                    if let Err(e) = broker
                        .get_token(v1::GetTokenRequest {
                            id: "before3".into(),
                        })
                        .await
                    {
                        seen.refused
                            .push((e.code(), e.message().to_string(), Instant::now()));
                    }
                    // Paced, so the two cores also run the database nodes and Patroni.
                    tokio::time::sleep(Duration::from_millis(5)).await;
                }
                (d, seen)
            });
        }
    }
    let until_acks = async |n: usize, within: Duration| {
        tokio::time::timeout(within, async {
            while acks.load(Ordering::SeqCst) < n {
                // Registered before the check below, so no notification is missed.
                let notified = progress.notified();
                if acks.load(Ordering::SeqCst) >= n {
                    break;
                }
                notified.await;
            }
        })
        .await
        .unwrap_or_else(|_| panic!("fewer than {n} acknowledged writes after {within:?}"));
    };
    until_acks(100, Duration::from_secs(60)).await;

    // Health, as a load balancer watches it: NOT_SERVING while no node takes writes (the
    // daemon's probe of the database needs a writable one with this URL), SERVING again after.
    use tonic_health::pb::health_check_response::ServingStatus;
    let mut health = HealthWatch::open(daemons[2].channel().await).await;
    health.until(ServingStatus::Serving, 10).await;

    let lost_at = Instant::now();
    let before = acks.load(Ordering::SeqCst);
    cluster.lose("pg1");
    health.until(ServingStatus::NotServing, 30).await;
    // Patroni promotes the synchronous standby once the lost leader's key expires (ttl).
    health.until(ServingStatus::Serving, 90).await;
    // The watch would hold the daemon's shutdown for its drain limit.
    drop(health);
    until_acks(before + 150, Duration::from_secs(90)).await;
    assert_eq!(cluster.primary().await.as_deref(), Some("pg2"));
    stop.store(true, Ordering::SeqCst);

    let mut acked = Vec::new();
    let mut answers = Vec::new();
    let mut refusals = Vec::new();
    let mut resumed = [false; 3];
    while let Some(r) = load.join_next().await {
        let (d, seen) = r.expect("join");
        for (code, message, at) in seen.refused {
            // A write whose commit was in flight when the primary died may have committed or
            // not: it is answered UNAVAILABLE, never OK, and never another code.
            assert_eq!(code, Code::Unavailable, "only UNAVAILABLE: {message}");
            refusals.push(at);
        }
        for (id, sent, at) in seen.acked {
            resumed[d] |= sent > lost_at;
            answers.push((sent, at));
            acked.push(id);
        }
    }
    // The outage: from the loss until the first write sent after the first refusal (so after
    // the loss was felt) is acknowledged.
    let felt = refusals
        .iter()
        .filter(|at| **at > lost_at)
        .min()
        .copied()
        .expect("the loss was felt: calls were refused");
    let back = answers
        .iter()
        .filter(|(sent, _)| *sent > felt)
        .map(|(_, at)| *at)
        .min()
        .expect("writes resumed");
    let outage = back - lost_at;
    let refused = refusals.len();
    eprintln!(
        "failover: first acknowledged write {:.2} s after the primary was lost; {} acknowledged, {} refused",
        outage.as_secs_f64(),
        acked.len(),
        refused
    );
    assert_eq!(
        resumed, [true; 3],
        "every daemon writes again, none restarted"
    );

    // Every acknowledged write is stored and opens, through every daemon.
    for (i, id) in acked.iter().enumerate() {
        let d = &daemons[i % 3];
        assert_eq!(
            d.get(id.as_str())
                .await
                .unwrap_or_else(|e| panic!("acknowledged {id}, so stored: {e:?}"))
                .into_inner()
                .secret,
            id.as_bytes()
        );
    }
    // Every daemon's audit chain verifies: nothing chained onto was lost, and no daemon
    // forked its chain after a write whose outcome it did not know.
    let events = daemons[1]
        .audit_events(v1::AuditLogRequest::default())
        .await;
    let mut chains: Vec<(String, ChainVerifier)> = Vec::new();
    for e in &events {
        if chains.last().is_none_or(|(i, _)| *i != e.instance) {
            chains.push((e.instance.clone(), ChainVerifier::new(None)));
        }
        let (instance, verifier) = chains.last_mut().expect("a chain");
        verifier
            .push(e.seq, &e.raw)
            .unwrap_or_else(|err| panic!("chain {instance}: {err}"));
    }
    let verified: Vec<(String, u64)> = chains
        .into_iter()
        .map(|(i, v)| {
            let n = v.finish().unwrap_or_else(|e| panic!("chain {i}: {e}"));
            (i, n)
        })
        .collect();
    assert_eq!(
        verified.iter().map(|(i, _)| i.as_str()).collect::<Vec<_>>(),
        ["a", "b", "c"]
    );
    assert!(verified.iter().all(|(_, n)| *n > 10), "{verified:?}");
    for d in daemons {
        d.stop().await;
    }
    drop(cluster);
}
