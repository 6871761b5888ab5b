//! A real containerd with its CRI plugin, for the CRI runtime's tests: its
//! own config, socket and state (nothing of Docker's containerd or of a
//! system one is touched), started by the test and stopped when dropped.
//!
//! - **Network**: a CNI config that gives each pod only `lo`: the
//!   `loopback` plugin plus `static` IPAM as the main plugin, which
//!   configures nothing but reports an address (containerd 1.6 requires one
//!   for `eth0`; `198.51.100.2`, TEST-NET-2, exists nowhere).
//! - **Images**, offline: a pause image (a static C program that reaps
//!   children and exits on SIGTERM, built with gcc and `docker import`) and
//!   the sandbox image (deploy/images/build-sandbox-image), saved from
//!   Docker and imported with `ctr -n k8s.io images import`. The content
//!   store lives in [`ROOT`] and outlasts the instance, so an image is
//!   imported once per content hash.
//! - **One at a time**: an instance holds an exclusive lock on
//!   [`ROOT`]`/lock` for its lifetime (the root's metadata database allows
//!   one daemon), across test processes; a daemon left by a killed test is
//!   stopped by the next one, and every pod sandbox left in the root is
//!   removed at start and at drop.
//! - **This machine's quirks** (see ../shared/CRI-NOTES.md):
//!   `restrict_oom_score_adj` (root lacks CAP_SYS_RESOURCE here),
//!   `netns_mounts_under_state_dir`, a random stream port.

use std::os::unix::process::CommandExt as _;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// The content store and metadata of the test containerd (kept between runs).
pub const ROOT: &str = "/var/lib/sandfleet-test-containerd";
/// Socket, state, runc state and CNI config of the running instance.
pub const STATE: &str = "/run/sandfleet-test-containerd";
/// The pause image the test containerd's CRI uses for pod sandboxes.
pub const PAUSE_IMAGE: &str = "docker.io/sandfleet/pause:1";
/// A second runtime handler of the test containerd (runc under another
/// name), for `--cri-runtime-handler`.
pub const ALT_HANDLER: &str = "sandfleet-test-handler";
/// The CNI plugins' directory (Debian's containernetworking-plugins).
pub const CNI_BIN_DIR: &str = "/usr/lib/cni";

/// The pause program (deploy/images/pause/pause.c), built statically.
const PAUSE_C: &str = include_str!("../../deploy/images/pause/pause.c");

/// What the CRI runtime's tests need that may be missing on a machine,
/// one item each; empty when nothing is.
pub fn missing() -> Vec<String> {
    let mut m = Vec::new();
    for (bin, pkg) in [
        ("/usr/bin/containerd", "containerd"),
        ("/usr/bin/ctr", "containerd"),
        ("/usr/sbin/runc", "runc"),
        ("/usr/lib/cni/loopback", "containernetworking-plugins"),
        ("/usr/lib/cni/static", "containernetworking-plugins"),
        ("/usr/bin/gcc", "gcc"),
    ] {
        if !Path::new(bin).exists() {
            m.push(format!("{bin} (apt-get install {pkg})"));
        }
    }
    m
}

/// A running test containerd. Dropping it removes every pod sandbox and
/// stops the daemon.
pub struct Containerd {
    child: Option<Child>,
    _lock: nix::fcntl::Flock<std::fs::File>,
}

impl Containerd {
    /// The CRI endpoint (`unix://...`).
    pub fn endpoint(&self) -> String {
        format!("unix://{}", Self::socket().display())
    }

    /// The daemon's socket.
    pub fn socket() -> PathBuf {
        Path::new(STATE).join("containerd.sock")
    }

    /// The daemon's log.
    pub fn log() -> PathBuf {
        Path::new(STATE).join("containerd.log")
    }

    /// Starts the daemon (after the lock: one at a time) and imports the
    /// pause image and `images` (Docker tags) that it lacks.
    pub fn start(images: &[&str]) -> Result<Self, String> {
        std::fs::create_dir_all(ROOT).map_err(|e| format!("creating {ROOT}: {e}"))?;
        let lock = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(Path::new(ROOT).join("lock"))
            .map_err(|e| format!("opening the lock: {e}"))?;
        let lock = nix::fcntl::Flock::lock(lock, nix::fcntl::FlockArg::LockExclusive)
            .map_err(|(_, e)| format!("locking {ROOT}/lock: {e}"))?;
        stop_leftover();
        let state = Path::new(STATE);
        let _ = std::fs::create_dir_all(state.join("cni"));
        std::fs::write(state.join("cni/10-isolated.conflist"), CNI_CONFLIST).map_err(|e| format!("CNI config: {e}"))?;
        std::fs::write(state.join("config.toml"), config()).map_err(|e| format!("containerd config: {e}"))?;
        let log = std::fs::File::create(Self::log()).map_err(|e| format!("containerd log: {e}"))?;
        let child = Command::new("containerd")
            .arg("--config")
            .arg(state.join("config.toml"))
            .stdin(Stdio::null())
            .stdout(log.try_clone().map_err(|e| e.to_string())?)
            .stderr(log)
            .process_group(0)
            .spawn()
            .map_err(|e| format!("starting containerd: {e}"))?;
        std::fs::write(state.join("containerd.pid"), child.id().to_string()).map_err(|e| e.to_string())?;
        let mut me = Self { child: Some(child), _lock: lock };
        me.wait_ready()?;
        me.remove_all_pods();
        ensure_image(PAUSE_IMAGE, &pause_image()?)?;
        for image in images {
            ensure_image(&full_name(image), image)?;
        }
        Ok(me)
    }

    fn wait_ready(&mut self) -> Result<(), String> {
        let start = Instant::now();
        loop {
            if let Some(c) = &mut self.child {
                if let Ok(Some(st)) = c.try_wait() {
                    return Err(format!("containerd exited ({st}) at start; see {}", Self::log().display()));
                }
            }
            let out = ctr(&["plugins", "ls"]);
            if out.as_ref().is_ok_and(|o| o.contains("io.containerd.grpc.v1") && o.contains(" cri ")) {
                let cri = out.unwrap_or_default().lines().any(|l| l.contains(" cri ") && l.contains(" ok"));
                if !cri {
                    return Err(format!("containerd's CRI plugin did not load; see {}", Self::log().display()));
                }
                return Ok(());
            }
            if start.elapsed() > Duration::from_secs(30) {
                return Err(format!("containerd did not answer within 30 s; see {}", Self::log().display()));
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Stops and removes every pod sandbox (and with it its containers)
    /// through the CRI, as a kubelet would.
    pub fn remove_all_pods(&self) {
        let endpoint = self.endpoint();
        let run = async move {
            let Ok(mut c) = cri_client(&endpoint).await else { return };
            let Ok(pods) = c.list_pod_sandbox(k8s_cri::v1::ListPodSandboxRequest { filter: None }).await else {
                return;
            };
            for p in pods.into_inner().items {
                let _ = c.stop_pod_sandbox(k8s_cri::v1::StopPodSandboxRequest { pod_sandbox_id: p.id.clone() }).await;
                let _ = c.remove_pod_sandbox(k8s_cri::v1::RemovePodSandboxRequest { pod_sandbox_id: p.id }).await;
            }
        };
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build();
        if let Ok(rt) = rt {
            // On its own thread: the caller may be inside a runtime.
            let _ = std::thread::spawn(move || rt.block_on(run)).join();
        }
    }
}

impl Drop for Containerd {
    fn drop(&mut self) {
        self.remove_all_pods();
        if let Some(mut c) = self.child.take() {
            let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(c.id() as i32), nix::sys::signal::SIGTERM);
            let t = Instant::now();
            while t.elapsed() < Duration::from_secs(10) {
                if let Ok(Some(_)) = c.try_wait() {
                    break;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            let _ = c.kill();
            let _ = c.wait();
        }
        let _ = std::fs::remove_file(Path::new(STATE).join("containerd.pid"));
    }
}

/// A CRI runtime client on a `unix://` endpoint.
pub async fn cri_client(
    endpoint: &str,
) -> Result<k8s_cri::v1::runtime_service_client::RuntimeServiceClient<tonic::transport::Channel>, String> {
    let path = endpoint.strip_prefix("unix://").ok_or("not a unix:// endpoint")?.to_string();
    let channel = sandfleet_common::grpc::unix_channel(path, Duration::from_secs(30))
        .await
        .map_err(|e| format!("connecting to {endpoint}: {e}"))?;
    Ok(k8s_cri::v1::runtime_service_client::RuntimeServiceClient::new(channel))
}

/// Stops a daemon a killed test left running (we hold the lock: nobody uses it).
fn stop_leftover() {
    let pidfile = Path::new(STATE).join("containerd.pid");
    let Some(pid) = std::fs::read_to_string(&pidfile).ok().and_then(|s| s.trim().parse::<i32>().ok()) else {
        return;
    };
    let comm = std::fs::read_to_string(format!("/proc/{pid}/comm")).unwrap_or_default();
    if comm.trim() == "containerd" {
        let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), nix::sys::signal::SIGKILL);
        let t = Instant::now();
        while Path::new(&format!("/proc/{pid}")).exists() && t.elapsed() < Duration::from_secs(10) {
            std::thread::sleep(Duration::from_millis(20));
        }
    }
    let _ = std::fs::remove_file(pidfile);
}

/// `ctr` against the test daemon, in the CRI's namespace.
fn ctr(args: &[&str]) -> Result<String, String> {
    let out = Command::new("ctr")
        .arg("--address")
        .arg(Containerd::socket())
        .args(["--namespace", "k8s.io"])
        .args(args)
        .stdin(Stdio::null())
        .output()
        .map_err(|e| format!("ctr: {e}"))?;
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    } else {
        Err(format!("ctr {}: {}", args.join(" "), String::from_utf8_lossy(&out.stderr).trim()))
    }
}

/// The name containerd gives a Docker tag (`docker.io/` + `library/` for one component).
pub fn full_name(tag: &str) -> String {
    let first = tag.split('/').next().unwrap_or("");
    if tag.contains('/') && (first.contains('.') || first.contains(':') || first == "localhost") {
        tag.to_string()
    } else if tag.contains('/') {
        format!("docker.io/{tag}")
    } else {
        format!("docker.io/library/{tag}")
    }
}

/// Imports Docker's `tag` as `name` unless the daemon has it.
fn ensure_image(name: &str, tag: &str) -> Result<(), String> {
    let have = ctr(&["images", "ls", "-q"])?;
    if have.lines().any(|l| l.trim() == name) {
        return Ok(());
    }
    let save = Command::new("docker")
        .args(["save", tag])
        .stdout(Stdio::piped())
        .stdin(Stdio::null())
        .spawn()
        .map_err(|e| format!("docker save {tag}: {e}"))?;
    let out = Command::new("ctr")
        .arg("--address")
        .arg(Containerd::socket())
        .args(["--namespace", "k8s.io", "images", "import", "-"])
        .stdin(save.stdout.ok_or("docker save: no stdout")?)
        .output()
        .map_err(|e| format!("ctr images import: {e}"))?;
    if !out.status.success() {
        return Err(format!("importing {tag}: {}", String::from_utf8_lossy(&out.stderr).trim()));
    }
    Ok(())
}

/// Builds the pause image in Docker (once per content): returns its tag.
fn pause_image() -> Result<String, String> {
    let tag = "sandfleet/pause:1";
    let ok =
        Command::new("docker").args(["image", "inspect", tag]).stdout(Stdio::null()).stderr(Stdio::null()).status();
    if ok.is_ok_and(|s| s.success()) {
        return Ok(tag.to_string());
    }
    let dir = tempfile::tempdir().map_err(|e| e.to_string())?;
    let src = dir.path().join("pause.c");
    std::fs::write(&src, PAUSE_C).map_err(|e| e.to_string())?;
    let root = dir.path().join("rootfs");
    std::fs::create_dir(&root).map_err(|e| e.to_string())?;
    let cc = Command::new("gcc")
        .args(["-Os", "-static", "-s", "-o"])
        .arg(root.join("pause"))
        .arg(&src)
        .output()
        .map_err(|e| format!("gcc: {e}"))?;
    if !cc.status.success() {
        return Err(format!("building pause: {}", String::from_utf8_lossy(&cc.stderr)));
    }
    let tar = Command::new("tar")
        .arg("-C")
        .arg(&root)
        .args(["-c", "."])
        .stdout(Stdio::piped())
        .spawn()
        .map_err(|e| format!("tar: {e}"))?;
    let imp = Command::new("docker")
        .args(["import", "--change", "ENTRYPOINT [\"/pause\"]", "-", tag])
        .stdin(tar.stdout.ok_or("tar: no stdout")?)
        .output()
        .map_err(|e| format!("docker import: {e}"))?;
    if !imp.status.success() {
        return Err(format!("docker import of pause: {}", String::from_utf8_lossy(&imp.stderr)));
    }
    Ok(tag.to_string())
}

const CNI_CONFLIST: &str = r#"{
  "cniVersion": "1.0.0",
  "name": "sandfleet-isolated",
  "plugins": [
    { "type": "loopback" },
    { "type": "static", "ipam": { "type": "static", "addresses": [ { "address": "198.51.100.2/32" } ] } }
  ]
}
"#;

fn config() -> String {
    format!(
        r#"version = 2
root = "{ROOT}/root"
state = "{STATE}/state"
oom_score = 0

[grpc]
  address = "{STATE}/containerd.sock"

[ttrpc]
  address = ""

[plugins]
  [plugins."io.containerd.internal.v1.opt"]
    path = "{ROOT}/opt"
  [plugins."io.containerd.grpc.v1.cri"]
    sandbox_image = "{PAUSE_IMAGE}"
    stream_server_address = "127.0.0.1"
    stream_server_port = "0"
    disable_apparmor = true
    enable_selinux = false
    restrict_oom_score_adj = true
    netns_mounts_under_state_dir = true
    [plugins."io.containerd.grpc.v1.cri".containerd]
      snapshotter = "overlayfs"
      default_runtime_name = "runc"
      [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc]
        runtime_type = "io.containerd.runc.v2"
        [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc.options]
          BinaryName = "/usr/sbin/runc"
          Root = "{STATE}/runc"
          SystemdCgroup = false
      # A second handler (runc again), for the tests of --cri-runtime-handler:
      # where a node has gVisor or Kata, this is where they would be.
      [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.{ALT_HANDLER}]
        runtime_type = "io.containerd.runc.v2"
        [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.{ALT_HANDLER}.options]
          BinaryName = "/usr/sbin/runc"
          Root = "{STATE}/runc-alt"
          SystemdCgroup = false
    [plugins."io.containerd.grpc.v1.cri".cni]
      bin_dir = "{CNI_BIN_DIR}"
      conf_dir = "{STATE}/cni"
      max_conf_num = 1
"#
    )
}
