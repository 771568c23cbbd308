//! Generates the gRPC code from the workspace's proto/ with a vendored protoc, so a fresh machine
//! needs none, and the proto3 JSON mapping (pbjson) of the messages the HTTP/JSON routes speak.

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
    // proto3 JSON (serde) for the messages the HTTP/JSON routes and their clients exchange. A message that carries a token, a grant handle or a private key
    // (GetTokenResponse, ProxyRequest, ...) gets no Serialize, so it cannot be written out as
    // JSON by mistake. Every field is written, defaults included, as the routes always have.
    let descriptors = std::fs::read(out_dir.join("tokenvault_descriptor.bin"))?;
    pbjson_build::Builder::new()
        .register_descriptors(&descriptors)?
        .emit_fields()
        .build(&[
            ".tokenvault.v1.SecretKind",
            ".tokenvault.v1.KeyState",
            ".tokenvault.v1.RecordMeta",
            ".tokenvault.v1.SealedRecord",
            ".tokenvault.v1.PutSealedRequest",
            ".tokenvault.v1.PutSealedResponse",
            ".tokenvault.v1.PutSealedBatchRequest",
            ".tokenvault.v1.PutSealedBatchResponse",
            ".tokenvault.v1.PublicKeysRequest",
            ".tokenvault.v1.PublicKey",
            ".tokenvault.v1.PublicKeysResponse",
            ".tokenvault.v1.ExchangeCodeRequest",
            ".tokenvault.v1.ExchangeCodeResponse",
            // Broker over HTTP: what a worker gets back. `GetTokenResponse` (the token) and
            // `ProxyRequest` (a grant handle) stay without serde; the routes write and read
            // those two by hand.
            ".tokenvault.v1.RecordInfo",
            ".tokenvault.v1.HttpHeader",
            ".tokenvault.v1.ProxyResponse",
        ])?;
    println!("cargo:rerun-if-changed=../../proto");
    Ok(())
}
