//! Locating the Sandfleet binaries the harness starts.

use std::path::{Path, PathBuf};

/// Environment variable naming the directory that holds the binaries.
pub const BIN_DIR_ENV: &str = "SANDFLEET_BIN_DIR";

/// The directory the binaries are looked up in.
///
/// `SANDFLEET_BIN_DIR` when set; otherwise derived from the running
/// executable: a test runs as `<target>/debug/deps/<name>-<hash>` and a tool
/// (the chaos runner, the bench) as `<target>/debug/<name>`, and in both cases
/// the binaries sit in `<target>/debug/`.
pub fn bin_dir() -> PathBuf {
    if let Some(dir) = std::env::var_os(BIN_DIR_ENV) {
        return PathBuf::from(dir);
    }
    let exe = std::env::current_exe().expect("cannot find the path of the running executable");
    let mut dir = exe.parent().expect("the running executable has no parent directory").to_path_buf();
    if matches!(dir.file_name().and_then(|n| n.to_str()), Some("deps" | "examples")) {
        dir.pop();
    }
    dir
}

/// The path of the Sandfleet binary `name` (e.g. `sandfleet-coordinator`,
/// `sandfleet-agent`, `sandfleet`).
///
/// # Panics
/// When the binary does not exist, with a message saying how to build it.
/// Cargo builds the binaries of *other* workspace packages only when asked, so
/// `cargo test -p sandfleet-chaos` alone does not produce them.
pub fn bin_path(name: &str) -> PathBuf {
    bin_path_in(&bin_dir(), name)
}

/// The path of the binary `name` in `dir`, with the same check as [`bin_path`].
pub fn bin_path_in(dir: &Path, name: &str) -> PathBuf {
    let path = dir.join(name);
    if !path.is_file() {
        panic!(
            "Sandfleet binary {name:?} not found at {}.\n\
             Build every binary first with `cargo build --workspace --bins` \
             (same profile and CARGO_TARGET_DIR as the tests), or point {BIN_DIR_ENV} \
             at the directory that holds them. `scripts/test` does this for you.",
            path.display()
        );
    }
    path
}
