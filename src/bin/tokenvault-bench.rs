//! The `tokenvault-bench` load generator: everything lives in the library's `cli` module.

fn main() -> std::process::ExitCode {
    tokenvault::cli::bench_main()
}
