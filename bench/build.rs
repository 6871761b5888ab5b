//! Generates the client for the subset of etcd's v3 API the Raft benchmark
//! drives (`proto/etcd_subset.proto`). protoc comes from `protoc-bin-vendored`
//! unless `PROTOC` is set.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    if std::env::var_os("PROTOC").is_none() {
        // SAFETY: build scripts are single-threaded.
        unsafe { std::env::set_var("PROTOC", protoc_bin_vendored::protoc_bin_path()?) };
    }
    println!("cargo:rerun-if-changed=proto");
    tonic_prost_build::configure()
        .build_server(false)
        .build_client(true)
        .compile_protos(&["proto/etcd_subset.proto"], &["proto"])?;
    Ok(())
}
