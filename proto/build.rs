//! Generates the gRPC code from `proto/sandfleet/v1/sandfleet.proto` into `OUT_DIR`.
//! protoc comes from the `protoc-bin-vendored` crate unless `PROTOC` is set.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    if std::env::var_os("PROTOC").is_none() {
        // SAFETY: build scripts are single-threaded.
        unsafe { std::env::set_var("PROTOC", protoc_bin_vendored::protoc_bin_path()?) };
    }
    println!("cargo:rerun-if-changed=proto");
    tonic_prost_build::configure()
        .build_server(true)
        .build_client(true)
        .compile_protos(&["proto/sandfleet/v1/sandfleet.proto"], &["proto"])?;
    Ok(())
}
