//! systemd's service notification protocol (sd_notify(3)): `READY=1` once the listeners are
//! bound, `STOPPING=1` when shutdown begins, and `WATCHDOG=1` at half the `WatchdogSec=`
//! interval while the runtime and its blocking pool still answer.
//!
//! Hand-written: the protocol is one datagram of `KEY=VALUE` lines to the Unix socket named by
//! `$NOTIFY_SOCKET` (a path, or `@name` in the abstract namespace); a crate would add a
//! dependency (and, for most, `unsafe` libc calls) for these few lines. Without
//! `$NOTIFY_SOCKET` (not started by systemd with `Type=notify`) every call does nothing.

use std::time::Duration;

/// Sends `state` to systemd, if it is listening. Failures are logged, never fatal: the daemon
/// serves whether or not its supervisor hears it.
pub fn notify(state: &str) {
    let Some(socket) = std::env::var_os("NOTIFY_SOCKET") else {
        return;
    };
    if let Err(e) = send(&socket, state) {
        tracing::warn!(error = %e, state, "sd_notify failed");
    }
}

fn send(socket: &std::ffi::OsStr, state: &str) -> std::io::Result<()> {
    use std::os::unix::ffi::OsStrExt as _;
    let sock = std::os::unix::net::UnixDatagram::unbound()?;
    let bytes = socket.as_bytes();
    match bytes.strip_prefix(b"@") {
        Some(name) => {
            use std::os::linux::net::SocketAddrExt as _;
            let addr = std::os::unix::net::SocketAddr::from_abstract_name(name)?;
            sock.send_to_addr(state.as_bytes(), &addr)?;
        }
        None => {
            sock.send_to(state.as_bytes(), std::path::Path::new(socket))?;
        }
    }
    Ok(())
}

/// The watchdog interval systemd asked for (`$WATCHDOG_USEC`, for this process if
/// `$WATCHDOG_PID` names one), if any.
pub fn watchdog_interval() -> Option<Duration> {
    let usec: u64 = std::env::var("WATCHDOG_USEC").ok()?.parse().ok()?;
    if let Ok(pid) = std::env::var("WATCHDOG_PID")
        && pid.parse::<u32>().ok() != Some(std::process::id())
    {
        return None;
    }
    (usec > 0).then(|| Duration::from_micros(usec))
}

/// Pings the watchdog at half its interval until `stop`. Each ping first runs a no-op on the
/// blocking pool, where every store and RSA call runs: a daemon whose pool is wedged stops
/// pinging and systemd restarts it.
pub async fn watchdog(interval: Duration, stop: tokio_util::sync::CancellationToken) {
    let mut tick = tokio::time::interval(interval / 2);
    loop {
        tokio::select! {
            _ = tick.tick() => {
                if tokio::task::spawn_blocking(|| ()).await.is_ok() {
                    notify("WATCHDOG=1");
                }
            }
            () = stop.cancelled() => return,
        }
    }
}
