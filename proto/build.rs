//! Generates the gRPC code from `proto/sandfleet/v1/sandfleet.proto` into `OUT_DIR`,
//! and with the `serde` feature the messages' serde impls (pbjson) beside it.
//! protoc comes from the `protoc-bin-vendored` crate unless `PROTOC` is set.

use std::path::PathBuf;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    if std::env::var_os("PROTOC").is_none() {
        // SAFETY: build scripts are single-threaded.
        unsafe { std::env::set_var("PROTOC", protoc_bin_vendored::protoc_bin_path()?) };
    }
    println!("cargo:rerun-if-changed=proto");
    let descriptors = PathBuf::from(std::env::var_os("OUT_DIR").ok_or("OUT_DIR is not set")?).join("descriptors.bin");
    tonic_prost_build::configure()
        .build_server(true)
        .build_client(true)
        .file_descriptor_set_path(&descriptors)
        .compile_protos(&["proto/sandfleet/v1/sandfleet.proto"], &["proto"])?;
    #[cfg(feature = "serde")]
    json_impls(&descriptors)?;
    Ok(())
}

/// Writes `OUT_DIR/sandfleet.v1.serde.rs`: the proto3 JSON mapping with the
/// proto's own field names (`created_at_ms`, not `createdAtMs`) and every field
/// present even at its default value, so a JSON reader sees the whole message.
#[cfg(feature = "serde")]
fn json_impls(descriptors: &std::path::Path) -> Result<(), Box<dyn std::error::Error>> {
    pbjson_build::Builder::new()
        .register_descriptors(&std::fs::read(descriptors)?)?
        .preserve_proto_field_names()
        .emit_fields()
        .build(&[".sandfleet.v1"])?;
    Ok(())
}
