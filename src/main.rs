//! The `tokenvault` binary: everything lives in the library's `cli` module.

fn main() -> std::process::ExitCode {
    tokenvault::cli::main()
}
