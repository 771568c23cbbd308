//! docs/ARCHITECTURE.md's invariants, checked on the source text so a change that breaks one
//! fails the build's tests: no import cycle between modules (top-level, and among the parts of
//! `server/*` and `vault/*`), the envelope does no I/O and sees no wire or store types, proto
//! types stop at the adapters, the vault never names a transport and the adapters reach the
//! store only through it, only `store/rocks.rs` names RocksDB, only `keys/private.rs` names a
//! private-key type, and the core modules never name tonic. Test code (`#[cfg(test)] mod
//! tests`) is left out: tests may reach across.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

/// The daemon crate's sources (`tokenvault-daemon`: keys, vault, server, audit, ...), which
/// the root crate re-exports under the same module names.
fn src() -> PathBuf {
    workspace_crate("daemon").join("src")
}

/// The root crate's own sources: the command line (`cli/`), the binaries and the re-exports.
fn cli_src() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("src")
}

/// The sealing crate's sources: the modules the daemon crate re-exports under the same names
/// (`envelope`, `keys`, `record`, `sealer`, `secret`), scanned with the daemon's.
fn sealing_src() -> PathBuf {
    workspace_crate("envelope").join("src")
}

/// The directory of the workspace crate `crates/{name}`.
fn workspace_crate(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("crates")
        .join(name)
}

/// Every `.rs` file under `dir`, relative to `root`.
fn files(root: &Path, dir: &Path, out: &mut Vec<PathBuf>) {
    for e in std::fs::read_dir(dir).expect("read_dir") {
        let p = e.expect("entry").path();
        if p.is_dir() {
            files(root, &p, out);
        } else if p.extension().is_some_and(|x| x == "rs") {
            out.push(p.strip_prefix(root).expect("under root").to_path_buf());
        }
    }
}

/// The code of a file of the daemon crate (`rel` to `src/`).
fn code(rel: &Path) -> String {
    code_at(&src(), rel)
}

/// The file's code without comments and without its unit-test module.
fn code_at(root: &Path, rel: &Path) -> String {
    let text = std::fs::read_to_string(root.join(rel)).expect("read");
    if rel.file_name().is_some_and(|n| {
        n == "tests.rs"
            || n == "conformance.rs"
            || n == "envelope_tests.rs"
            || n == "xwing_tests.rs"
    }) {
        return String::new();
    }
    let mut out = String::new();
    let mut lines = text.lines().peekable();
    while let Some(line) = lines.next() {
        let t = line.trim_start();
        if t == "#[cfg(test)]"
            && lines
                .peek()
                .is_some_and(|n| n.trim_start().starts_with("mod tests"))
        {
            break;
        }
        if t.starts_with("//") {
            continue;
        }
        out.push_str(line);
        out.push('\n');
    }
    out
}

/// The top-level module a file belongs to (`keys/private.rs` -> `keys`).
fn top(rel: &Path) -> String {
    let first = rel.components().next().expect("component");
    first
        .as_os_str()
        .to_string_lossy()
        .trim_end_matches(".rs")
        .to_string()
}

/// Names referenced as `{prefix}name` or inside `{prefix}{a, b::c}`.
fn referenced(code: &str, prefix: &str) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    let mut rest = code;
    while let Some(i) = rest.find(prefix) {
        rest = &rest[i + prefix.len()..];
        if let Some(group) = rest.strip_prefix('{') {
            let end = group.find('}').unwrap_or(group.len());
            for item in group[..end].split(',') {
                let name: String = item
                    .trim()
                    .chars()
                    .take_while(|c| c.is_alphanumeric() || *c == '_')
                    .collect();
                if !name.is_empty() {
                    out.insert(name);
                }
            }
        } else {
            let name: String = rest
                .chars()
                .take_while(|c| c.is_alphanumeric() || *c == '_')
                .collect();
            out.insert(name);
        }
    }
    out
}

fn cycle(graph: &BTreeMap<String, BTreeSet<String>>) -> Option<Vec<String>> {
    fn visit(
        n: &str,
        graph: &BTreeMap<String, BTreeSet<String>>,
        path: &mut Vec<String>,
        done: &mut BTreeSet<String>,
    ) -> Option<Vec<String>> {
        if let Some(i) = path.iter().position(|p| p == n) {
            let mut c = path[i..].to_vec();
            c.push(n.to_string());
            return Some(c);
        }
        if done.contains(n) {
            return None;
        }
        path.push(n.to_string());
        for m in graph.get(n).into_iter().flatten() {
            if let Some(c) = visit(m, graph, path, done) {
                return Some(c);
            }
        }
        path.pop();
        done.insert(n.to_string());
        None
    }
    let mut done = BTreeSet::new();
    graph
        .keys()
        .find_map(|n| visit(n, graph, &mut Vec::new(), &mut done))
}

/// The proto crate's sources (`tokenvault::api`, its `lib.rs`, and `tokenvault::client`).
fn proto_src() -> PathBuf {
    workspace_crate("proto").join("src")
}

/// The store crate's sources (`tokenvault::store`).
fn store_src() -> PathBuf {
    workspace_crate("store").join("src")
}

/// Every file of the daemon crate, the root (CLI) crate, the sealing crate, the proto crate and
/// the store crate, with
/// its code; paths are relative to each crate's `src/`, under the module name the daemon crate
/// re-exports it as (the proto crate's `lib.rs` is `api.rs`; the store crate's files are under
/// `store/`, its `lib.rs` as `store/mod.rs`; the sealing crate's own `lib.rs` is left out: the
/// daemon's stands for the crate root).
fn all_files() -> Vec<(PathBuf, String)> {
    let mut out = Vec::new();
    for root in [src(), cli_src(), sealing_src(), proto_src(), store_src()] {
        let mut rels = Vec::new();
        files(&root, &root, &mut rels);
        rels.sort();
        for r in rels {
            let c = code_at(&root, &r);
            if root == store_src() {
                let r = if r == Path::new("lib.rs") {
                    PathBuf::from("mod.rs")
                } else {
                    r
                };
                out.push((Path::new("store").join(r), c));
                continue;
            }
            if r == Path::new("lib.rs") {
                if root == sealing_src() {
                    continue;
                }
                if root == proto_src() {
                    out.push((PathBuf::from("api.rs"), c));
                    continue;
                }
            }
            out.push((r, c));
        }
    }
    out
}

#[test]
fn no_import_cycle_between_modules() {
    let files = all_files();
    let modules: BTreeSet<String> = files
        .iter()
        .map(|(r, _)| top(r))
        .filter(|m| m != "lib" && m != "main")
        .collect();
    let mut graph: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for (rel, code) in &files {
        let from = top(rel);
        if !modules.contains(&from) {
            continue;
        }
        for to in referenced(code, "crate::") {
            if to != from && modules.contains(&to) {
                graph.entry(from.clone()).or_default().insert(to);
            }
        }
    }
    assert!(
        graph.get("server").is_some_and(|d| d.contains("store")),
        "the scan sees edges: {graph:?}"
    );
    assert_eq!(cycle(&graph), None, "module graph: {graph:#?}");

    // The parts of the daemon's adapters and of the vault among themselves (`dir/*.rs`
    // files, by `super::name`).
    for (dir, edge) in [
        ("server", ("admin", "status")),
        ("vault", ("broker", "refresh")),
    ] {
        let parts = parts_graph(&files, dir);
        assert!(
            parts.get(edge.0).is_some_and(|d| d.contains(edge.1)),
            "the scan sees {dir}'s edges: {parts:?}"
        );
        assert_eq!(cycle(&parts), None, "{dir} parts: {parts:#?}");
    }
}

/// The `super::` references between the files directly under `dir` (its `mod.rs` excluded).
fn parts_graph(files: &[(PathBuf, String)], dir: &str) -> BTreeMap<String, BTreeSet<String>> {
    let direct = |r: &Path| r.starts_with(dir) && r.components().count() == 2;
    let stem = |r: &Path| r.file_stem().expect("stem").to_string_lossy().into_owned();
    let parts: BTreeSet<String> = files
        .iter()
        .filter(|(r, _)| direct(r))
        .map(|(r, _)| stem(r))
        .filter(|n| n != "mod")
        .collect();
    let mut graph: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for (rel, code) in files {
        let from = stem(rel);
        if !direct(rel) || from == "mod" {
            continue;
        }
        for to in referenced(code, "super::") {
            if to != from && parts.contains(&to) {
                graph.entry(from.clone()).or_default().insert(to);
            }
        }
    }
    graph
}

#[test]
fn the_vault_never_names_a_transport() {
    // The application core is callable without tonic: a GetToken or PutSealed goes adapter ->
    // vault -> store and back, never from the vault into an adapter.
    assert!(
        !mentioning("impl Vault").is_empty(),
        "the scan sees the vault"
    );
    for needle in [
        "tonic",
        "prost",
        "crate::api",
        "crate::server",
        "crate::cli",
        "axum",
        "hyper::",
    ] {
        let hits: Vec<String> = mentioning(needle)
            .into_iter()
            .filter(|f| f.starts_with("vault"))
            .collect();
        assert!(hits.is_empty(), "the vault mentions {needle}: {hits:?}");
    }
}

#[test]
fn adapters_reach_the_store_only_through_the_vault() {
    // The gRPC handlers hold a `Vault`, never a store: every mutation goes through the vault's
    // audited writes.
    for f in [
        "server/ingest.rs",
        "server/broker.rs",
        "server/admin.rs",
        "server/auth.rs",
    ] {
        let code = code(Path::new(f));
        assert!(code.contains("Arc<Vault>"), "{f} is a vault adapter");
        for needle in [
            "crate::store",
            "TokenStore",
            "0.store",
            "crate::audit",
            "Auditor",
        ] {
            assert!(!code.contains(needle), "{f} names {needle}");
        }
    }
}

/// Files (relative to src/) whose code mentions `needle`.
/// Files whose code names `needle` as a word of its own: "tonic" is not found in "monotonic".
fn mentioning(needle: &str) -> Vec<String> {
    let word = |c: char| c.is_alphanumeric() || c == '_';
    all_files()
        .into_iter()
        .filter(|(_, c)| {
            c.match_indices(needle)
                .any(|(at, _)| !needle.starts_with(word) || !c[..at].ends_with(word))
        })
        .map(|(r, _)| r.display().to_string())
        .collect()
}

#[test]
fn the_envelope_does_no_io_and_sees_no_wire_or_store_types() {
    assert!(
        all_files()
            .iter()
            .any(|(r, c)| r.starts_with("envelope") && c.contains("fn seal")),
        "the scan sees the envelope"
    );
    for needle in [
        "std::fs",
        "std::net",
        "tokio",
        "crate::store",
        "crate::api",
        "tonic",
        "prost",
        "crate::server",
    ] {
        let hits: Vec<String> = mentioning(needle)
            .into_iter()
            .filter(|f| f.starts_with("envelope"))
            .collect();
        assert!(hits.is_empty(), "envelope mentions {needle}: {hits:?}");
    }
}

/// The web tier's crates (`tokenvault-envelope`, what a Rust web tier links to seal, and
/// `tokenvault-web`, its OAuth callback) have no gRPC, no async runtime, no store and no private
/// key, in their manifests and in their code; aws-lc-rs only as an option.
#[test]
fn the_sealing_crate_has_no_transport_runtime_store_or_private_key() {
    for (krate, a_dependency) in [("envelope", "rsa"), ("web", "sha2")] {
        let root = workspace_crate(krate);
        let deps = dependencies_table(&root);
        let names = dependency_names(&deps);
        assert!(
            names.contains(&a_dependency),
            "the scan sees {krate}'s dependencies: {names:?}"
        );
        for name in &names {
            assert!(
                ![
                    "tonic",
                    "prost",
                    "tokio",
                    "rocksdb",
                    "hyper",
                    "h2",
                    "tower",
                    "axum",
                    "tokenvault",
                ]
                .iter()
                .any(|banned| name.starts_with(banned)),
                "the {krate} crate depends on {name}"
            );
        }
        if let Some(aws_lc) = deps.lines().find(|l| l.starts_with("aws-lc-rs")) {
            assert!(aws_lc.contains("optional = true"), "{aws_lc}");
        }

        let src = root.join("src");
        let mut rels = Vec::new();
        files(&src, &src, &mut rels);
        assert!(!rels.is_empty(), "the scan sees the {krate} crate");
        for rel in rels {
            let code = code_at(&src, &rel);
            for needle in [
                "std::fs",
                "TcpStream",
                "UdpSocket",
                "tokio",
                "tonic",
                "prost",
                "rocksdb",
                "PrivateDecryptingKey",
                "RsaPrivateKey",
                "PrivateKeyInfo",
            ] {
                assert!(
                    !code.contains(needle),
                    "{krate}: {} names {needle}",
                    rel.display()
                );
            }
        }
    }
    let envelope =
        std::fs::read_to_string(workspace_crate("envelope").join("Cargo.toml")).expect("read");
    assert!(
        envelope.contains("aws-lc-rs = { version = \"1.19.0\", optional = true }"),
        "aws-lc-rs stays an option of the sealing crate"
    );
}

/// The `[dependencies]` table of the manifest in `dir`, as text.
fn dependencies_table(dir: &Path) -> String {
    let manifest = std::fs::read_to_string(dir.join("Cargo.toml")).expect("read");
    manifest
        .split("[dependencies]")
        .nth(1)
        .expect("a [dependencies] table")
        .split("\n[")
        .next()
        .unwrap_or_default()
        .to_string()
}

/// The crate names a `[dependencies]` table lists.
fn dependency_names(deps: &str) -> Vec<&str> {
    deps.lines()
        .filter_map(|l| l.split_once('=').map(|(n, _)| n.trim()))
        .collect()
}

/// The store crate holds sealed envelopes and public key metadata: it depends on the sealing
/// crate and its engines' drivers, never on the daemon crate, the gRPC contract, a server
/// framework or aws-lc (no private-key code can reach it: `only_keys_private_names_a_private_key_type`
/// scans its files too). Its test hooks exist only behind its `testing` feature, which the
/// daemon turns on only through its own `testing` feature, never by default.
#[test]
fn the_store_crate_sees_no_transport_private_key_or_daemon() {
    let deps = dependencies_table(&workspace_crate("store"));
    let names = dependency_names(&deps);
    for engine in ["rocksdb", "tokio-postgres", "tokenvault-envelope"] {
        assert!(
            names.contains(&engine),
            "the scan sees the store's dependencies: {names:?}"
        );
    }
    for name in &names {
        assert!(
            ![
                "tonic",
                "axum",
                "hyper",
                "h2",
                "tower",
                "aws-lc-rs",
                "tokenvault-proto",
                "tokenvault-web",
            ]
            .iter()
            .any(|banned| name.starts_with(banned))
                && *name != "tokenvault",
            "the store crate depends on {name}"
        );
    }

    let store_manifest =
        std::fs::read_to_string(workspace_crate("store").join("Cargo.toml")).expect("read");
    assert!(
        store_manifest.contains("\ndefault = []\n"),
        "the store's test hooks are not a default feature"
    );
    // The daemon crate depends on the store without its hooks; its own testing feature (and
    // the root crate's, which the tests and benches turn on) is the only way to them.
    let daemon = workspace_crate("daemon");
    let store_dep = dependencies_table(&daemon)
        .lines()
        .find(|l| l.starts_with("tokenvault-store"))
        .expect("the daemon depends on the store crate")
        .to_string();
    assert!(
        !store_dep.contains("testing"),
        "the daemon's build turns on the store's test hooks: {store_dep}"
    );
    let daemon_manifest = std::fs::read_to_string(daemon.join("Cargo.toml")).expect("read");
    assert!(
        daemon_manifest.contains("\ndefault = []\n"),
        "daemon defaults"
    );
    assert!(
        daemon_manifest.contains("\ntesting = [\"tokenvault-store/testing\"]\n"),
        "the store's hooks come only with the daemon's testing feature"
    );
    let root = std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("Cargo.toml"))
        .expect("read");
    let default = root
        .lines()
        .find(|l| l.starts_with("default = "))
        .expect("the root crate's default features");
    assert!(!default.contains("testing"), "{default}");
    assert!(
        root.contains("\ntesting = [\"tokenvault-daemon?/testing\"]\n"),
        "the root crate reaches the hooks only through its own testing feature"
    );

    // Each hook is declared behind the feature.
    let lib = std::fs::read_to_string(store_src().join("lib.rs")).expect("read");
    let hooks = lib
        .find("pub trait TestHooks")
        .expect("the scan sees TestHooks");
    assert!(
        lib[..hooks]
            .trim_end()
            .rsplit('\n')
            .take(12)
            .any(|l| l.trim() == "#[cfg(any(test, feature = \"testing\"))]"),
        "TestHooks is behind the testing feature"
    );
}

/// The daemon crate is a library the command line drives: it parses no arguments and prints
/// nothing for a terminal (its output is the tracing log and the audit trail), and it cannot
/// reach the CLI (the root crate depends on it, never the other way).
#[test]
fn the_daemon_crate_has_no_command_line() {
    let deps = dependencies_table(&workspace_crate("daemon"));
    let names = dependency_names(&deps);
    assert!(
        names.contains(&"tokenvault-store") && names.contains(&"tonic"),
        "the scan sees the daemon's dependencies: {names:?}"
    );
    for name in &names {
        assert!(
            !["clap", "indicatif"].iter().any(|b| name.starts_with(b)) && *name != "tokenvault",
            "the daemon crate depends on {name}"
        );
    }
    let root = src();
    let mut rels = Vec::new();
    files(&root, &root, &mut rels);
    assert!(
        rels.iter().any(|r| r == Path::new("vault/mod.rs")),
        "the scan sees the daemon crate"
    );
    for rel in rels {
        let code = code_at(&root, &rel);
        for needle in [
            "println!",
            "eprintln!",
            "print!(",
            "clap",
            "crate::cli",
            "std::io::stdout",
        ] {
            assert!(!code.contains(needle), "{} names {needle}", rel.display());
        }
    }
}

#[test]
fn the_mutation_rules_do_no_io_and_name_no_engine() {
    let rules = all_files()
        .into_iter()
        .find(|(r, _)| r == Path::new("store/rules.rs"))
        .expect("the scan sees store/rules.rs");
    for needle in [
        "std::fs",
        "std::net",
        "tokio",
        "rocksdb",
        "RocksStore",
        "PostgresStore",
        "MemoryStore",
        "postgres::",
        "memory::",
    ] {
        assert!(
            !rules.1.contains(needle),
            "store/rules.rs mentions {needle}"
        );
    }
}

#[test]
fn wire_types_stop_at_the_adapters() {
    for f in mentioning("crate::api") {
        assert!(
            f == "api.rs" || f.starts_with("server") || f.starts_with("cli"),
            "{f} names the generated gRPC types"
        );
    }
    for needle in ["tonic", "prost"] {
        for f in mentioning(needle) {
            let core = [
                "envelope",
                "keys",
                "store",
                "record",
                "secret",
                "sealer",
                "rotation",
                "audit",
                "grant",
                "provider",
                "proxy",
                "oauth",
                "security_event",
                "config",
                "vault",
            ];
            assert!(
                !core.iter().any(|m| f.starts_with(m))
                    || (needle == "prost"
                        && (f == "audit/mod.rs"
                            || f == "grant.rs"
                            || f.starts_with("store/schema"))),
                "{f} names {needle}"
            );
        }
    }
}

#[test]
fn only_the_rocks_store_names_rocksdb() {
    // The crate, not the word (metric names say "rocksdb").
    for needle in ["rocksdb::", "use rocksdb", "librocksdb"] {
        for f in mentioning(needle) {
            assert_eq!(f, "store/rocks.rs", "{f} names {needle}");
        }
    }
    assert!(
        !mentioning("rocksdb::").is_empty(),
        "the scan sees store/rocks.rs"
    );
}

#[test]
fn only_keys_private_names_a_private_key_type() {
    assert!(
        !mentioning("PrivateDecryptingKey").is_empty(),
        "the scan sees keys/private.rs"
    );
    for needle in [
        "RsaPrivateKey",
        "PrivateDecryptingKey",
        "OaepPrivateDecryptingKey",
        "PrivateKeyInfo",
        "EncryptedPrivateKeyInfo",
        "RsaKeyPair",
        "EcdsaKeyPair",
        // X-Wing's decapsulation key, as the hpke crate names it, and its halves on aws-lc-rs
        // and RustCrypto's ml-kem.
        "Kem>::PrivateKey",
        "DecapsulationKey",
        "agreement::PrivateKey",
    ] {
        for f in mentioning(needle) {
            assert_eq!(f, "keys/private.rs", "{f} names {needle}");
        }
    }
}

/// The private-key pool does only private-key work: its one user is the unwrap of a record's
/// data key (`GetToken`, `Proxy`), and that closure does nothing else (no store read, no audit
/// append), so an RSA thread never waits on I/O and a cached call never waits for an RSA
/// thread.
#[test]
fn the_private_key_pool_only_unwraps() {
    let users: Vec<(String, String)> = all_files()
        .into_iter()
        .filter(|(_, c)| c.contains(".cpu_bound("))
        .map(|(r, c)| (r.display().to_string(), c))
        .collect();
    assert_eq!(
        users.iter().map(|(f, _)| f.as_str()).collect::<Vec<_>>(),
        ["vault/broker.rs"],
        "who runs work on the private-key pool"
    );
    let code = &users[0].1;
    assert_eq!(code.matches(".cpu_bound(").count(), 1, "one use");
    let at = code.find(".cpu_bound(").expect("found");
    // The closure, up to the `.await` that ends the call.
    let closure = &code[at..at + code[at..].find(".await").expect("awaited")];
    assert!(closure.contains("records::open_unwrapping("), "{closure}");
    for io in ["store", "audit", "blocking", "keyring()", "reload"] {
        assert!(
            !closure.contains(io),
            "the private-key closure touches {io}: {closure}"
        );
    }
}

#[test]
fn only_the_pkcs11_adapter_may_use_unsafe_code() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let mut crates: Vec<PathBuf> = std::fs::read_dir(root.join("crates"))
        .expect("crates")
        .map(|e| e.expect("entry").path())
        .collect();
    crates.push(root.to_path_buf());
    assert!(crates.len() >= 7, "{crates:?}");
    for dir in crates {
        let manifest = std::fs::read_to_string(dir.join("Cargo.toml")).expect("manifest");
        let pkcs11 = dir.ends_with("crates/pkcs11");
        let expected = if pkcs11 {
            "unsafe_code = \"deny\""
        } else {
            "unsafe_code = \"forbid\""
        };
        assert!(manifest.contains(expected), "{}: {expected}", dir.display());
        let mut rs = Vec::new();
        files(&dir, &dir.join("src"), &mut rs);
        for rel in rs {
            let text = std::fs::read_to_string(dir.join(&rel)).expect("read");
            let allows = text.matches("#[allow(unsafe_code)]").count();
            let blocks = text.matches("unsafe {").count();
            if pkcs11 && rel == Path::new("src/lib.rs") {
                assert_eq!(allows, 1, "one allowed function in {}", rel.display());
                let allowed = text
                    .split("#[allow(unsafe_code)]")
                    .nth(1)
                    .expect("after the allow");
                assert!(
                    allowed.trim_start().starts_with("fn raw_token_label("),
                    "the allow is on raw_token_label"
                );
                assert_eq!(
                    blocks,
                    text.split("#[allow(unsafe_code)]")
                        .nth(1)
                        .expect("after")
                        .matches("unsafe {")
                        .count(),
                    "every unsafe block is inside raw_token_label (the file's last function)"
                );
            } else {
                assert_eq!(
                    (allows, blocks),
                    (0, 0),
                    "{}: no unsafe code",
                    dir.join(&rel).display()
                );
            }
        }
    }
}
