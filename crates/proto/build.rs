//! Generates the gRPC code from the workspace's proto/ with a vendored protoc, so a fresh machine needs none.

use std::path::PathBuf;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let out_dir = PathBuf::from(std::env::var("OUT_DIR")?);
    let mut config = prost_build::Config::new();
    config.protoc_executable(protoc_bin_vendored::protoc_bin_path()?);
    tonic_prost_build::configure()
        .file_descriptor_set_path(out_dir.join("tokenvault_descriptor.bin"))
        // These messages carry a secret (a token, a grant handle, a private key): their Debug
        // is written by hand in src/api.rs and redacts it.
        .skip_debug([
            "tokenvault.v1.GetTokenResponse",
            "tokenvault.v1.ProxyRequest",
            "tokenvault.v1.IssueGrantResponse",
            "tokenvault.v1.RevokeGrantRequest",
            "tokenvault.v1.RotateKeyRequest",
            "tokenvault.v1.ExchangeCodeRequest",
        ])
        .compile_with_config(
            config,
            &["../../proto/tokenvault/v1/tokenvault.proto"],
            &["../../proto"],
        )?;
    println!("cargo:rerun-if-changed=../../proto");
    Ok(())
}
