//! Bounds on the connections of one listener: how many may be open, and how long one may move
//! no byte.
//!
//! Owns: [`Connections`] (the open connections of a listener, each with the time it last read
//! or wrote a byte), [`Bounded`] (a connection's I/O, which fails once the connection is
//! closed from here) and the reaper task that closes connections idle longer than
//! `[limits] idle_timeout_seconds`. At `[limits] max_connections`, admitting a new connection
//! closes the one idle the longest, so a client holding many silent connections cannot lock
//! out new ones, and the daemon never runs out of descriptors on one listener.
//!
//! "Idle" counts bytes in both directions at the TCP (or TLS) level, below HTTP: a connection
//! whose client dribbles a header or a body a byte at a time is bounded by HTTP/1.1's header
//! read timeout and by its total read and write activity, a silent one by the idle timeout.
//! A call that neither sends nor receives a byte for that long (a proxied upstream call slower
//! than the idle timeout) is cut too: the idle timeout must exceed every provider's
//! `timeout_ms` (`config::check_provider_timeouts`, at start and on a provider reload).
//!
//! Must never: hold its lock across I/O, or scan its table per byte (only on admission at the
//! cap and once per reaper tick).

use std::collections::HashMap;
use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio_util::sync::{CancellationToken, WaitForCancellationFutureOwned};

/// One open connection.
#[derive(Debug)]
struct Slot {
    /// When it last moved a byte, in milliseconds since the table's epoch.
    last: AtomicU64,
    close: CancellationToken,
}

/// The open connections of one listener.
#[derive(Debug)]
pub struct Connections {
    what: &'static str,
    max: usize,
    idle: Duration,
    epoch: Instant,
    next: AtomicU64,
    open: Mutex<HashMap<u64, Arc<Slot>>>,
    metrics: Arc<crate::vault::metrics::Metrics>,
}

impl Connections {
    /// A table for the listener `what`.
    pub fn new(
        what: &'static str,
        max: usize,
        idle: Duration,
        metrics: Arc<crate::vault::metrics::Metrics>,
    ) -> Arc<Self> {
        Arc::new(Self {
            what,
            max: max.max(1),
            idle,
            epoch: Instant::now(),
            next: AtomicU64::new(0),
            open: Mutex::new(HashMap::new()),
            metrics,
        })
    }

    fn now_ms(&self) -> u64 {
        u64::try_from(self.epoch.elapsed().as_millis()).unwrap_or(u64::MAX)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<u64, Arc<Slot>>> {
        self.open
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Open connections.
    pub fn len(&self) -> usize {
        self.lock().len()
    }

    /// Whether none is open.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Registers a newly accepted connection; at the cap, closes the one idle the longest
    /// first.
    pub fn admit<IO>(self: &Arc<Self>, io: IO) -> Bounded<IO> {
        let slot = Arc::new(Slot {
            last: AtomicU64::new(self.now_ms()),
            close: CancellationToken::new(),
        });
        let id = self.next.fetch_add(1, Ordering::Relaxed);
        let evicted = {
            let mut open = self.lock();
            let evicted = if open.len() >= self.max {
                open.iter()
                    .min_by_key(|(_, s)| s.last.load(Ordering::Relaxed))
                    .map(|(id, _)| *id)
                    .and_then(|oldest| open.remove(&oldest))
            } else {
                None
            };
            open.insert(id, Arc::clone(&slot));
            evicted
        };
        if let Some(old) = evicted {
            old.close.cancel();
            crate::vault::metrics::Metrics::count(&self.metrics.connections_closed, "cap");
            tracing::debug!(
                listener = self.what,
                "connection cap reached; closed the connection idle the longest"
            );
        }
        Bounded {
            closed: Box::pin(slot.close.clone().cancelled_owned()),
            io,
            registration: Registration {
                table: Arc::clone(self),
                id,
                slot,
            },
        }
    }

    /// Closes the connections idle longer than the idle timeout, every tenth of it (at least
    /// every second), until `stop`.
    pub async fn reap(self: Arc<Self>, stop: CancellationToken) {
        let every = (self.idle / 10).clamp(Duration::from_millis(50), Duration::from_secs(1));
        let mut tick = tokio::time::interval(every);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let idle_ms = u64::try_from(self.idle.as_millis()).unwrap_or(u64::MAX);
        loop {
            tokio::select! {
                _ = tick.tick() => {}
                () = stop.cancelled() => return,
            }
            let now = self.now_ms();
            let idle: Vec<Arc<Slot>> = {
                let mut open = self.lock();
                let ids: Vec<u64> = open
                    .iter()
                    .filter(|(_, s)| now.saturating_sub(s.last.load(Ordering::Relaxed)) >= idle_ms)
                    .map(|(id, _)| *id)
                    .collect();
                ids.iter().filter_map(|id| open.remove(id)).collect()
            };
            for slot in &idle {
                slot.close.cancel();
                crate::vault::metrics::Metrics::count(&self.metrics.connections_closed, "idle");
            }
        }
    }
}

/// A connection's place in its table; removed when the connection is dropped.
#[derive(Debug)]
struct Registration {
    table: Arc<Connections>,
    id: u64,
    slot: Arc<Slot>,
}

impl Registration {
    fn touch(&self) {
        self.slot.last.store(self.table.now_ms(), Ordering::Relaxed);
    }
}

impl Drop for Registration {
    fn drop(&mut self) {
        self.table.lock().remove(&self.id);
    }
}

/// A connection's I/O, counted in its listener's table: every byte read or written marks it
/// active, and once the table closes it (idle, or the cap) reads and writes fail, which makes
/// the HTTP server drop it.
pub struct Bounded<IO> {
    io: IO,
    registration: Registration,
    closed: Pin<Box<WaitForCancellationFutureOwned>>,
}

impl<IO> std::fmt::Debug for Bounded<IO> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Bounded").finish_non_exhaustive()
    }
}

impl<IO> Bounded<IO> {
    /// The connection itself.
    pub fn get_ref(&self) -> &IO {
        &self.io
    }

    fn check_open(&mut self, cx: &mut Context<'_>) -> io::Result<()> {
        if self.closed.as_mut().poll(cx).is_ready() {
            return Err(io::Error::new(
                io::ErrorKind::ConnectionAborted,
                "connection closed: idle too long, or the listener's connection cap was reached",
            ));
        }
        Ok(())
    }
}

impl<IO: AsyncRead + Unpin> AsyncRead for Bounded<IO> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        this.check_open(cx)?;
        let before = buf.filled().len();
        let polled = Pin::new(&mut this.io).poll_read(cx, buf);
        if matches!(polled, Poll::Ready(Ok(()))) && buf.filled().len() > before {
            this.registration.touch();
        }
        polled
    }
}

impl<IO: AsyncWrite + Unpin> AsyncWrite for Bounded<IO> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        this.check_open(cx)?;
        let polled = Pin::new(&mut this.io).poll_write(cx, buf);
        if matches!(polled, Poll::Ready(Ok(n)) if n > 0) {
            this.registration.touch();
        }
        polled
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        this.check_open(cx)?;
        let polled = Pin::new(&mut this.io).poll_write_vectored(cx, bufs);
        if matches!(polled, Poll::Ready(Ok(n)) if n > 0) {
            this.registration.touch();
        }
        polled
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_shutdown(cx)
    }
}

impl<IO: tonic::transport::server::Connected> tonic::transport::server::Connected for Bounded<IO> {
    type ConnectInfo = IO::ConnectInfo;

    fn connect_info(&self) -> Self::ConnectInfo {
        self.io.connect_info()
    }
}

/// Raises the soft limit on open files to the hard limit, so the connection caps, not the
/// descriptor limit, decide when connections are refused (a shell or a unit without
/// `LimitNOFILE` starts the daemon at 1,024). Returns the limit in force.
pub fn raise_nofile_limit() -> io::Result<Option<u64>> {
    use rustix::process::{Resource, Rlimit, getrlimit, setrlimit};
    let limit = getrlimit(Resource::Nofile);
    if limit.current == limit.maximum {
        return Ok(limit.current);
    }
    setrlimit(
        Resource::Nofile,
        Rlimit {
            current: limit.maximum,
            maximum: limit.maximum,
        },
    )?;
    Ok(limit.maximum)
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

    #[tokio::test]
    async fn the_cap_closes_the_connection_idle_the_longest() {
        let table = Connections::new("test", 2, Duration::from_secs(60), Arc::default());
        let (a, mut a_peer) = tokio::io::duplex(64);
        let (b, mut b_peer) = tokio::io::duplex(64);
        let (c, _c_peer) = tokio::io::duplex(64);
        let mut a = table.admit(a);
        tokio::time::sleep(Duration::from_millis(5)).await;
        let mut b = table.admit(b);
        // `a` becomes the most recently active.
        tokio::time::sleep(Duration::from_millis(5)).await;
        a_peer.write_all(b"x").await.expect("write");
        let mut byte = [0u8; 1];
        a.read_exact(&mut byte).await.expect("read");
        let _c = table.admit(c);
        assert_eq!(table.len(), 2);
        let e = b.read(&mut byte).await.expect_err("b was closed");
        assert_eq!(e.kind(), io::ErrorKind::ConnectionAborted);
        b_peer
            .write_all(b"y")
            .await
            .expect("the peer's side is still open");
        a_peer.write_all(b"z").await.expect("write");
        a.read_exact(&mut byte).await.expect("a is still open");
        drop(a);
        assert_eq!(table.len(), 1);
    }

    #[tokio::test]
    async fn the_reaper_closes_idle_connections_only() {
        let table = Connections::new("test", 10, Duration::from_millis(300), Arc::default());
        let stop = CancellationToken::new();
        let reaper = tokio::spawn(Arc::clone(&table).reap(stop.clone()));
        let (idle, _idle_peer) = tokio::io::duplex(64);
        let (busy, mut busy_peer) = tokio::io::duplex(64);
        let mut idle = table.admit(idle);
        let mut busy = table.admit(busy);
        let mut byte = [0u8; 1];
        // The idle one fails once closed; the busy one keeps moving bytes meanwhile.
        let closed = tokio::spawn(async move { idle.read(&mut [0u8; 1]).await });
        let mut rounds = 0;
        while !closed.is_finished() {
            busy_peer.write_all(b"x").await.expect("write");
            busy.read_exact(&mut byte)
                .await
                .expect("the busy connection stays open");
            tokio::time::sleep(Duration::from_millis(20)).await;
            rounds += 1;
            assert!(rounds < 500, "the idle connection was never closed");
        }
        let e = closed.await.expect("task").expect_err("closed");
        assert_eq!(e.kind(), io::ErrorKind::ConnectionAborted);
        assert_eq!(table.len(), 1);
        stop.cancel();
        reaper.await.expect("reaper");
    }
}
