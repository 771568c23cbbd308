//! Every integration test, as modules of one test binary: one link of the daemon's
//! dependencies (RocksDB, aws-lc) instead of one per file. Tests still drive real daemons over
//! gRPC on loopback, real RocksDB and a real PostgreSQL, and spawn the real binary where a
//! test needs a process. `tests/postgres_restart.rs` stays a binary of its own: it stops the
//! shared PostgreSQL server, which must not happen under the other tests.
//!
//! One module: `cargo test --test it cli::` (or any test name filter).

#[path = "../common/mod.rs"]
mod common;

mod architecture;
mod audit_scale;
mod cli;
mod code_exchange;
mod daemon;
mod dek_cache;
mod envelope_doc;
mod envelope_vectors;
mod failover;
mod http_json;
mod lifecycle;
mod load_balancer;
mod openssl_interop;
mod operations;
mod operations_cli;
mod pkcs11;
mod policy;
mod post_quantum;
mod postgres;
mod proxy;
mod redaction;
mod revocation;
mod rotation_cli;
mod runbook_tls;
mod sdk;
mod sealers;
mod security_events;
mod slow_store;
mod store_copy;
mod tls;
mod webhooks;
mod wycheproof;
