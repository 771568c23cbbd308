//! A token that logs the daemon out behind its back (as a token reset does): the next call
//! that needs the key answers UNAVAILABLE, and the daemon opens a new session and logs in
//! again without a restart. A binary of its own: logging out is per process, and would log out
//! every other token test running beside it.

mod common;

use common::token::*;
use common::*;

/// The token logs the daemon out (as a token reset does): the next call that needs the key
/// answers UNAVAILABLE, and the one after it succeeds, the daemon having opened a new session
/// and logged in again, without a restart.
#[tokio::test]
async fn a_token_that_logs_the_daemon_out_answers_unavailable_then_recovers() {
    let dir = tempfile::tempdir().expect("tempdir");
    let d = TestDaemon::start_with(in_token(dir.path())).await;
    d.seed("u", 3).await;
    assert_eq!(secret(&d, "u1").await, b"secret-1");

    // Another session of this process logs out: login state is per process and token, so
    // every session of the daemon is logged out with it.
    let ctx = cryptoki::context::Pkcs11::new(token_config().module).expect("module");
    let _ = ctx.initialize(cryptoki::context::CInitializeArgs::new(
        cryptoki::context::CInitializeFlags::OS_LOCKING_OK,
    ));
    let slot = ctx.get_slots_with_token().expect("slots")[0];
    let session = ctx.open_ro_session(slot).expect("session");
    session.logout().expect("log the process out");
    drop(session);
    // Never finalized: that would pull the module from under the daemon.
    std::mem::forget(ctx);

    let e = d.get("u1").await.expect_err("logged out");
    assert_eq!(e.code(), tonic::Code::Unavailable, "{}", e.message());
    assert_eq!(secret(&d, "u1").await, b"secret-1", "recovered");
    assert_eq!(secret(&d, "u2").await, b"secret-2");
    let v1 = fingerprint(&d, 1).await;
    d.stop().await;
    token().destroy(&id_bytes(&v1)).expect("clean up");
}
