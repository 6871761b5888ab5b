//! The skip-or-fail gate for tests that need real sandboxes.
//!
//! The process runtime needs root, bubblewrap at `/usr/bin/bwrap` (and user,
//! pid, net and mount namespaces that actually work), a Python at
//! `/usr/bin/python3` for the tests' workloads, and cgroups the agent can
//! create and remove. On a developer machine without them the tests print a
//! loud banner and pass vacuously; with `SANDFLEET_REQUIRE_FACILITIES=1` (CI)
//! a missing facility fails the test instead.

use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::OnceLock;

/// Environment variable that turns a missing facility into a failure.
pub const REQUIRE_ENV: &str = "SANDFLEET_REQUIRE_FACILITIES";

/// The bubblewrap binary the process runtime uses.
pub const BWRAP: &str = "/usr/bin/bwrap";

/// The least bubblewrap sandbox that runs `/usr/bin/true`: every namespace
/// unshared, `/usr` read-only, `/proc` and `/dev`. The facilities check runs
/// it, and the bench compares the exec path with it.
pub const BWRAP_TRUE_ARGS: &[&str] = &[
    "--unshare-all",
    "--die-with-parent",
    "--ro-bind",
    "/usr",
    "/usr",
    "--symlink",
    "usr/bin",
    "/bin",
    "--symlink",
    "usr/lib",
    "/lib",
    "--symlink",
    "usr/lib64",
    "/lib64",
    "--proc",
    "/proc",
    "--dev",
    "/dev",
    "true",
];

/// Checks that this machine can run real sandboxes.
///
/// Returns `true` when everything is there. Otherwise prints
/// `SKIPPED (facility missing): <what>` in a banner to stderr and returns
/// `false`, and the caller returns early — unless `SANDFLEET_REQUIRE_FACILITIES=1`,
/// in which case it panics with the same text.
///
/// ```no_run
/// # async fn t() {
/// if !sandfleet_testkit::require_sandbox_facilities() {
///     return;
/// }
/// # }
/// ```
pub fn require_sandbox_facilities() -> bool {
    let missing = missing_facilities();
    if missing.is_empty() {
        return true;
    }
    skip_or_fail(
        &missing.join("; "),
        &format!(
            "This test needs root, {BWRAP} with working namespaces, /usr/bin/python3 and \
             writable cgroups.\nRun scripts/setup as root to install what is missing."
        ),
    )
}

/// Checks that a Docker engine answers (`docker info`) and that we are root
/// (the docker runtime's sessions own host uids). Same contract as
/// [`require_sandbox_facilities`]: a loud banner and `false`, or a panic under
/// `SANDFLEET_REQUIRE_FACILITIES=1`.
pub fn require_docker() -> bool {
    static MISSING: OnceLock<Option<String>> = OnceLock::new();
    let missing = MISSING.get_or_init(|| {
        if !nix::unistd::geteuid().is_root() {
            return Some(format!("root (running as uid {})", nix::unistd::geteuid()));
        }
        match Command::new("timeout").args(["60", "docker", "info", "--format", "{{.ServerVersion}}"]).output() {
            Ok(o) if o.status.success() => None,
            Ok(o) => Some(format!("a Docker engine (docker info: {})", String::from_utf8_lossy(&o.stderr).trim())),
            Err(e) => Some(format!("the docker CLI ({e})")),
        }
    });
    match missing {
        None => true,
        Some(what) => skip_or_fail(what, "This test needs a running Docker engine and root."),
    }
}

/// Checks that a real Prometheus server can be run: the `prometheus` binary
/// (Debian's `prometheus` package, or `SANDFLEET_PROMETHEUS_BIN`) answers
/// `--version`. Same contract as [`require_sandbox_facilities`]: a loud banner
/// and `false`, or a panic under `SANDFLEET_REQUIRE_FACILITIES=1`.
pub fn require_prometheus() -> bool {
    static MISSING: OnceLock<Option<String>> = OnceLock::new();
    let missing = MISSING.get_or_init(|| {
        let bin = crate::prometheus::prometheus_bin();
        match Command::new(&bin).arg("--version").stdin(Stdio::null()).output() {
            Ok(o) if o.status.success() => None,
            Ok(o) => Some(format!("a working {bin} ({bin} --version: {})", String::from_utf8_lossy(&o.stderr).trim())),
            Err(e) => Some(format!("the Prometheus server ({bin}: {e}; apt-get install prometheus)")),
        }
    });
    match missing {
        None => true,
        Some(what) => skip_or_fail(
            what,
            "This test scrapes the cluster with a real Prometheus server; scripts/setup installs it.",
        ),
    }
}

/// Prints the SKIPPED banner and returns `false`, or panics with it when
/// `SANDFLEET_REQUIRE_FACILITIES=1`.
fn skip_or_fail(what: &str, help: &str) -> bool {
    let line = "=".repeat(78);
    let banner = format!(
        "\n{line}\nSKIPPED (facility missing): {what}\n{help} \
         Set {REQUIRE_ENV}=1 to make this a failure.\n{line}\n"
    );
    if std::env::var(REQUIRE_ENV).is_ok_and(|v| v == "1") {
        panic!("{banner}");
    }
    // Straight to fd 2: `eprintln!` would be captured (and hidden) by the test harness.
    {
        use std::io::Write;
        let _ = std::io::stderr().write_all(banner.as_bytes());
    }
    false
}

/// What is missing for real sandboxes, one human-readable item each; empty
/// when nothing is. Probed once per process.
pub fn missing_facilities() -> Vec<String> {
    static MISSING: OnceLock<Vec<String>> = OnceLock::new();
    MISSING.get_or_init(probe).clone()
}

fn probe() -> Vec<String> {
    let mut missing = Vec::new();
    if !nix::unistd::geteuid().is_root() {
        missing.push(format!("root (running as uid {})", nix::unistd::geteuid()));
    }
    if !is_executable(Path::new(BWRAP)) {
        missing.push(format!("bubblewrap ({BWRAP} not found; apt-get install bubblewrap)"));
    } else if let Err(e) = bwrap_works() {
        missing.push(format!("working bubblewrap namespaces ({e})"));
    }
    if !is_executable(Path::new("/usr/bin/python3")) {
        missing.push("python3 (/usr/bin/python3 not found; apt-get install python3)".to_string());
    }
    if let Err(e) = cgroups_writable() {
        missing.push(format!("writable cgroups ({e})"));
    }
    // Per-session disk quotas (the agents' default): an ext4 filesystem per session on a loop device.
    if !Path::new("/dev/loop-control").exists() {
        missing.push("loop devices for disk quotas (/dev/loop-control not found; modprobe loop)".to_string());
    }
    if !["/usr/sbin/mkfs.ext4", "/sbin/mkfs.ext4"].iter().any(|p| is_executable(Path::new(p))) {
        missing.push("mkfs.ext4 for disk quotas (apt-get install e2fsprogs)".to_string());
    }
    missing
}

fn is_executable(p: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    std::fs::metadata(p).map(|m| m.is_file() && m.permissions().mode() & 0o111 != 0).unwrap_or(false)
}

fn bwrap_works() -> Result<(), String> {
    let out = Command::new(BWRAP)
        .args(BWRAP_TRUE_ARGS)
        .stdin(Stdio::null())
        .output()
        .map_err(|e| format!("cannot run {BWRAP}: {e}"))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "`bwrap --unshare-all ... true` failed with {}: {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

/// Creates and removes a probe cgroup in every hierarchy the agent uses.
fn cgroups_writable() -> Result<(), String> {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let name = format!("sandfleet-probe-{}-{}", std::process::id(), COUNTER.fetch_add(1, Ordering::Relaxed));
    let roots: Vec<&str> = if Path::new("/sys/fs/cgroup/cgroup.controllers").exists() {
        vec!["/sys/fs/cgroup"]
    } else if Path::new("/sys/fs/cgroup/memory").is_dir() {
        vec!["/sys/fs/cgroup/memory", "/sys/fs/cgroup/pids", "/sys/fs/cgroup/cpu"]
    } else {
        return Err("no cgroup v2 root and no v1 memory hierarchy under /sys/fs/cgroup".to_string());
    };
    for root in roots {
        let dir = Path::new(root).join(&name);
        std::fs::create_dir(&dir).map_err(|e| format!("cannot create a cgroup under {root}: {e}"))?;
        std::fs::remove_dir(&dir).map_err(|e| format!("cannot remove the probe cgroup {}: {e}", dir.display()))?;
    }
    Ok(())
}

/// Builds (or finds, by content hash) the sandbox image with this build's
/// `sandfleet-executor` through `deploy/images/build-sandbox-image`, which
/// also tags it `sandfleet/sandbox:latest`, the image every template of
/// `sandfleet-agent --runtime docker` uses by default. Returns its tag, or
/// the error with the command to rerun by hand. Built once per process.
pub fn build_sandbox_image() -> Result<String, String> {
    static TAG: OnceLock<Result<String, String>> = OnceLock::new();
    TAG.get_or_init(|| {
        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/images/build-sandbox-image");
        let executor = crate::bins::bin_path("sandfleet-executor");
        let how = format!("{} --executor {}", script.display(), executor.display());
        let out = Command::new(&script)
            .arg("--executor")
            .arg(&executor)
            .arg("--print-tag")
            .stdin(Stdio::null())
            .output()
            .map_err(|e| format!("cannot run {how}: {e}"))?;
        let tag = String::from_utf8_lossy(&out.stdout).trim().to_string();
        if !out.status.success() || tag.is_empty() {
            return Err(format!(
                "building the sandbox image failed ({how}):\n{}",
                String::from_utf8_lossy(&out.stderr)
            ));
        }
        Ok(tag)
    })
    .clone()
}

/// [`build_sandbox_image`] for tests (call [`require_docker`] first): a
/// failed build fails the test.
pub fn sandbox_image() -> String {
    build_sandbox_image().unwrap_or_else(|e| panic!("{e}"))
}

/// Builds (or finds, by content hash) the daemon image `image` (`coordinator`
/// or `agent`) with this build's binary through
/// `deploy/images/build-daemon-images`, which also tags it
/// `sandfleet/<image>:latest`. Returns its tag, or the error with the command
/// to rerun by hand. Built once per process and image.
pub fn build_daemon_image(image: &str) -> Result<String, String> {
    static TAGS: OnceLock<parking_lot::Mutex<std::collections::HashMap<String, Result<String, String>>>> =
        OnceLock::new();
    let tags = TAGS.get_or_init(Default::default);
    let mut tags = tags.lock();
    if let Some(done) = tags.get(image) {
        return done.clone();
    }
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/images/build-daemon-images");
    let bins = crate::bins::bin_dir();
    let how = format!("{} --only {image} --bin-dir {}", script.display(), bins.display());
    let built = Command::new(&script)
        .args(["--only", image, "--print-tags", "--bin-dir"])
        .arg(&bins)
        .stdin(Stdio::null())
        .output()
        .map_err(|e| format!("cannot run {how}: {e}"))
        .and_then(|out| {
            let tag = String::from_utf8_lossy(&out.stdout).trim().to_string();
            if out.status.success() && !tag.is_empty() {
                Ok(tag)
            } else {
                Err(format!("building the {image} image failed ({how}):\n{}", String::from_utf8_lossy(&out.stderr)))
            }
        });
    tags.insert(image.to_string(), built.clone());
    built
}

/// [`build_daemon_image`] for tests (call [`require_docker`] first): a failed
/// build fails the test.
pub fn daemon_image(image: &str) -> String {
    build_daemon_image(image).unwrap_or_else(|e| panic!("{e}"))
}
