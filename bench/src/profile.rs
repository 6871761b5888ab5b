//! `--profile`: which cargo profile's binaries a benchmark measures.
//!
//! Figures are meant for the release profile, so that is the default:
//! `sandfleet-bench` first builds every binary of the workspace in the
//! requested profile (`cargo build --profile ... --workspace --bins`, in the
//! same target directory it runs from), then, when it is itself a binary of
//! another profile, replaces itself with that profile's `sandfleet-bench`
//! with the same arguments. So whatever `cargo run -p sandfleet-bench` built,
//! the daemons, the CLI and the in-process parts all run the profile named,
//! and RESULTS.md says which one (`Binaries:` line).
//!
//! `SANDFLEET_BIN_DIR` set by hand wins: nothing is built and nothing is
//! re-executed (the caller chose the binaries).

use std::ffi::OsString;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode};

use clap::ValueEnum;

/// A cargo profile the benchmarks can run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Profile {
    /// `cargo build --release`: what the figures in RESULTS.md are for.
    Release,
    /// The test profile (`dev`, output in `debug/`): quick to build, slow to run.
    Debug,
}

impl Profile {
    /// The directory under the target directory that holds its binaries.
    pub fn dir_name(self) -> &'static str {
        match self {
            Profile::Release => "release",
            Profile::Debug => "debug",
        }
    }

    /// The name `cargo build --profile` takes.
    fn cargo_name(self) -> &'static str {
        match self {
            Profile::Release => "release",
            Profile::Debug => "dev",
        }
    }
}

/// Set on the re-executed bench, so it never builds or re-executes twice.
const REEXEC_ENV: &str = "SANDFLEET_BENCH_PROFILE_READY";

/// Builds the binaries of `profile` and re-executes this bench from them when
/// needed. Returns an exit code when the bench must stop here (a failed
/// build); `None` to go on in this process.
pub fn prepare(profile: Profile, build: bool) -> Option<ExitCode> {
    if std::env::var_os(sandfleet_testkit::bins::BIN_DIR_ENV).is_some() || std::env::var_os(REEXEC_ENV).is_some() {
        return None;
    }
    let exe = match std::env::current_exe() {
        Ok(e) => e,
        Err(e) => {
            eprintln!("sandfleet-bench: cannot find its own path: {e}");
            return Some(ExitCode::FAILURE);
        }
    };
    let Some((target, running)) = target_and_profile(&exe) else {
        eprintln!(
            "sandfleet-bench: {} is not in a cargo target directory; set {} to the binaries to measure",
            exe.display(),
            sandfleet_testkit::bins::BIN_DIR_ENV
        );
        return Some(ExitCode::FAILURE);
    };
    if build {
        let workspace = Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap_or(Path::new("."));
        eprintln!(
            "sandfleet-bench: building the {} binaries (cargo build --profile {} --workspace --bins, target {})",
            profile.dir_name(),
            profile.cargo_name(),
            target.display()
        );
        let status = Command::new(std::env::var_os("CARGO").unwrap_or_else(|| OsString::from("cargo")))
            .args(["build", "--profile", profile.cargo_name(), "--workspace", "--bins"])
            .env("CARGO_TARGET_DIR", &target)
            .current_dir(workspace)
            .status();
        match status {
            Ok(s) if s.success() => {}
            Ok(s) => {
                eprintln!("sandfleet-bench: the {} build failed ({s})", profile.dir_name());
                return Some(ExitCode::FAILURE);
            }
            Err(e) => {
                eprintln!("sandfleet-bench: cannot run cargo ({e}); build the binaries yourself and pass --no-build");
                return Some(ExitCode::FAILURE);
            }
        }
    }
    if running == profile.dir_name() {
        return None;
    }
    let other = target.join(profile.dir_name()).join("sandfleet-bench");
    if !other.is_file() {
        eprintln!(
            "sandfleet-bench: {} does not exist; build it (cargo build --profile {} --workspace --bins) or drop --no-build",
            other.display(),
            profile.cargo_name()
        );
        return Some(ExitCode::FAILURE);
    }
    eprintln!("sandfleet-bench: running the {} build: {}", profile.dir_name(), other.display());
    let err = Command::new(&other).args(std::env::args_os().skip(1)).env(REEXEC_ENV, "1").exec();
    eprintln!("sandfleet-bench: cannot execute {}: {err}", other.display());
    Some(ExitCode::FAILURE)
}

/// `<target>/<profile>/sandfleet-bench` → (`<target>`, `<profile>`).
fn target_and_profile(exe: &Path) -> Option<(PathBuf, String)> {
    let dir = exe.parent()?;
    let profile = dir.file_name()?.to_str()?.to_string();
    Some((dir.parent()?.to_path_buf(), profile))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_target_and_profile_come_from_the_bench_path() {
        let (target, profile) = target_and_profile(Path::new("/t/x/release/sandfleet-bench")).unwrap();
        assert_eq!((target.as_path(), profile.as_str()), (Path::new("/t/x"), "release"));
        assert_eq!(Profile::Debug.cargo_name(), "dev");
        assert_eq!(Profile::Debug.dir_name(), "debug");
    }
}
