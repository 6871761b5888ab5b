//! Per-session disk quotas: every session writes to a filesystem of its own.
//!
//! # The choice
//! A session's `disk_bytes` and `disk_inodes` must be enforced by the kernel,
//! at the write, whatever writes (the sandboxed program, the agent's file API,
//! a workspace restore). Project quotas (XFS `pquota`, ext4 `prjquota`) would
//! do it on the agent's own filesystem, but they need that filesystem made and
//! mounted with them and a kernel built with quota support; the hosts
//! Sandfleet runs on first (this one among them: no `CONFIG_XFS_QUOTA`, no
//! `CONFIG_QFMT_V2`) have neither. So each session gets an ext4 filesystem of
//! exactly its quota, in a sparse image file, mounted through a loop device
//! at its workspace: ext4 answers a write past the size, and a file past the
//! inode count, with ENOSPC. The image is sparse, so the host's disk holds
//! only what was written, never more than the quota; the `discard` mount
//! option gives blocks the session frees back to the host.
//!
//! # Cost, and the pool
//! Measured on a 2-core VM: `mkfs.ext4` of a 1 GiB image about 15 ms, loop
//! device and mount 5-10 ms. To keep that off a session's create, [`Disks`]
//! keeps a few filesystems of the default size made and mounted under
//! `<dir>/pool/`; a create of that size takes one with a rename and a
//! `mount --move` (well under a millisecond). A session of another size
//! has its filesystem made at create. A background task refills the pool.
//!
//! # On disk
//! `<dir>/<name>.img` is the image of the session (or docker box) `name`,
//! `<dir>/pool-*.img` the pool's; the pool's filesystems are mounted under
//! `<dir>/pool/`. The kernel refuses to move a mount whose parent mount is
//! shared (systemd makes `/` shared), so that directory is a private bind
//! mount of itself.
//!
//! # Restarts
//! Mounts outlive the agent. A session's mount that is gone (the host
//! rebooted) is mounted again from its image at the next prepare; an image
//! whose session is gone is removed ([`Disks::retain`]); the pool is made
//! anew at start.

use std::collections::HashSet;
use std::fs;
use std::io;
use std::os::unix::fs::{MetadataExt as _, OpenOptionsExt as _, PermissionsExt as _};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Weak};

use parking_lot::Mutex;
use sandfleet_common::limits;
use sandfleet_common::spec::default_disk_inodes;
use tokio::sync::Notify;
use tracing::{debug, info, warn};

use super::RuntimeError;

/// Names the pool's images in the disks dir (`pool-<instance>-<n>.img`).
const POOL_PREFIX: &str = "pool-";

/// Names images of ended sessions that are being removed.
const GONE_PREFIX: &str = "gone-";

/// How long after a take the pool starts making a replacement.
const REFILL_DELAY: std::time::Duration = std::time::Duration::from_millis(100);

/// Default number of filesystems of the default size kept ready.
pub const DEFAULT_POOL: usize = 2;

/// How a runtime gives sessions their disk.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DiskQuota {
    /// An ext4 filesystem of the session's quota per session (the default).
    Loop {
        /// Filesystems of the default size kept made and mounted.
        pool: usize,
    },
    /// No quota: workspaces are plain directories on the agent's filesystem,
    /// and one session can fill it. For hosts without loop devices.
    Off,
}

impl Default for DiskQuota {
    fn default() -> Self {
        DiskQuota::Loop { pool: DEFAULT_POOL }
    }
}

/// How much of its quota a session uses, as the kernel counts it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DiskUsage {
    /// Bytes in use, the filesystem's own metadata included.
    pub used_bytes: u64,
    /// The filesystem's usable size.
    pub limit_bytes: u64,
    /// Inodes in use.
    pub used_inodes: u64,
    /// Inodes in all.
    pub limit_inodes: u64,
}

/// One pool filesystem: its image and where it is mounted.
struct Ready {
    image: PathBuf,
    mount: PathBuf,
}

struct Inner {
    dir: PathBuf,
    pool_dir: PathBuf,
    pool_target: usize,
    pool: Mutex<Vec<Ready>>,
    refill: Notify,
    /// Names this instance's pool entries (`<prefix>-<n>`).
    prefix: String,
    seq: std::sync::atomic::AtomicU64,
    task: Mutex<Option<tokio::task::JoinHandle<()>>>,
}

impl Drop for Inner {
    /// The pool's filesystems go with the runtime; sessions' stay (they
    /// outlive the agent).
    fn drop(&mut self) {
        if let Some(t) = self.task.get_mut().take() {
            t.abort();
        }
        for r in self.pool.get_mut().drain(..) {
            let _ = unmount(&r.mount);
            let _ = fs::remove_file(&r.image);
            let _ = fs::remove_dir(&r.mount);
        }
    }
}

/// Unmounts (lazily) every mount at or below `dir`, deepest first. For
/// tearing a runtime down entirely (tests, decommissioning).
pub fn unmount_all_under(dir: &Path) {
    let n = sandfleet_common::mounts::unmount_all_under(dir);
    if n > 0 {
        debug!(dir = %dir.display(), mounts = n, "unmounted");
    }
}

/// The session filesystems of one runtime. Cheap to clone; `None` inside
/// when quotas are off.
#[derive(Clone)]
pub struct Disks {
    inner: Option<Arc<Inner>>,
}

impl std::fmt::Debug for Disks {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.inner {
            Some(i) => f.debug_struct("Disks").field("dir", &i.dir).field("pool", &i.pool_target).finish(),
            None => f.write_str("Disks(off)"),
        }
    }
}

fn io_ctx(what: impl std::fmt::Display, e: io::Error) -> RuntimeError {
    super::fsutil::io_ctx(what, e)
}

/// Whether `path` is the root of a mount of another filesystem than its
/// parent's (a session's own filesystem; not a bind mount of the same one).
fn is_mountpoint(path: &Path) -> io::Result<bool> {
    let m = fs::symlink_metadata(path)?;
    let parent = path.parent().unwrap_or(Path::new("/"));
    let p = fs::metadata(parent)?;
    Ok(m.dev() != p.dev() || m.ino() == p.ino())
}

/// How urgently a filesystem is made: for a create waiting on it, or ahead
/// of time for the pool (at the lowest CPU priority, so that the pool never
/// slows the sessions it is there to speed up).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Urgency {
    Now,
    Ahead,
}

/// Runs a host tool, turning a failure into an error with its stderr.
fn run(urgency: Urgency, cmd: &str, args: &[&std::ffi::OsStr]) -> io::Result<()> {
    let mut c = match urgency {
        Urgency::Now => std::process::Command::new(cmd),
        Urgency::Ahead => {
            let mut c = std::process::Command::new("nice");
            c.args(["-n", "19", cmd]);
            c
        }
    };
    let out = c.args(args).stdin(std::process::Stdio::null()).output()?;
    if out.status.success() {
        Ok(())
    } else {
        Err(io::Error::other(format!("{cmd} failed ({}): {}", out.status, String::from_utf8_lossy(&out.stderr).trim())))
    }
}

/// Makes a sparse image of `bytes` with an ext4 filesystem of `inodes`
/// inodes. Nothing is left behind on failure.
fn make_image(urgency: Urgency, image: &Path, bytes: u64, inodes: u64) -> io::Result<()> {
    let res = (|| {
        let f = fs::OpenOptions::new().write(true).create_new(true).mode(0o600).open(image)?;
        f.set_len(bytes)?;
        drop(f);
        // Lazy inode table and journal init: the image is sparse, so what was
        // never written reads as zeros already. No reserved blocks, 4 KiB blocks.
        let n = inodes.to_string();
        run(
            urgency,
            "mkfs.ext4",
            &["-q", "-F", "-b", "4096", "-m", "0", "-N", &n, "-E", "lazy_itable_init=1,lazy_journal_init=1,nodiscard"]
                .map(std::ffi::OsStr::new)
                .into_iter()
                .chain([image.as_os_str()])
                .collect::<Vec<_>>(),
        )
    })();
    if res.is_err() {
        let _ = fs::remove_file(image);
    }
    res
}

/// Mounts an image at `at` (no devices, no setuid; freed blocks go back to the host).
fn mount_image(urgency: Urgency, image: &Path, at: &Path) -> io::Result<()> {
    run(
        urgency,
        "mount",
        &[
            std::ffi::OsStr::new("-t"),
            "ext4".as_ref(),
            "-o".as_ref(),
            "loop,discard,nodev,nosuid,noatime,noinit_itable".as_ref(),
            image.as_os_str(),
            at.as_os_str(),
        ],
    )
}

fn unmount(at: &Path) -> io::Result<()> {
    // A lazy unmount: a docker container may still hold a bind of it until it
    // is removed; the loop device goes when the last user does (autoclear).
    nix::mount::umount2(at, nix::mount::MntFlags::MNT_DETACH).map_err(io::Error::from)
}

/// Removes mkfs's `lost+found` (e2fsck makes it again should it need it).
fn remove_lost_found(at: &Path) -> io::Result<()> {
    match fs::remove_dir(at.join("lost+found")) {
        Err(e) if e.kind() != io::ErrorKind::NotFound => Err(e),
        _ => Ok(()),
    }
}

/// Gives the filesystem root at `at` to the session uid, mode 0700, without
/// the `lost+found` directory (the session sees an empty workspace).
fn hand_over(at: &Path, uid: u32) -> io::Result<()> {
    remove_lost_found(at)?;
    std::os::unix::fs::lchown(at, Some(uid), Some(uid))?;
    fs::set_permissions(at, fs::Permissions::from_mode(0o700))
}

impl Disks {
    /// No quotas.
    pub fn off() -> Self {
        Self { inner: None }
    }

    /// Sets up `dir` (created if missing) for session filesystems: checks the
    /// host can make them, clears a pool left by an earlier agent, and starts
    /// filling the pool.
    pub async fn new(mode: &DiskQuota, dir: &Path) -> Result<Self, RuntimeError> {
        let DiskQuota::Loop { pool } = *mode else {
            // Sessions that have filesystems of their own need them mounted,
            // unmounted and removed: an agent without quotas cannot serve them.
            let held = session_images(dir);
            if !held.is_empty() {
                return Err(RuntimeError::Unavailable(format!(
                    "{} session(s) on this node have filesystems of their own ({} in {}); run the agent with --disk-quota loop until they have ended",
                    held.len(),
                    held.iter().take(3).cloned().collect::<Vec<_>>().join(", "),
                    dir.display()
                )));
            }
            return Ok(Self::off());
        };
        if !Path::new("/dev/loop-control").exists() {
            return Err(RuntimeError::Unavailable(
                "disk quotas need loop devices and /dev/loop-control is missing (load the loop module, or run the agent with --disk-quota off to give up per-session disk limits)".into(),
            ));
        }
        let dir = dir.to_path_buf();
        let pool_dir = dir.join("pool");
        let setup = {
            let (dir, pool_dir) = (dir.clone(), pool_dir.clone());
            tokio::task::spawn_blocking(move || -> Result<(), RuntimeError> {
                fs::create_dir_all(&pool_dir).map_err(|e| io_ctx(format!("creating {}", pool_dir.display()), e))?;
                fs::set_permissions(&dir, fs::Permissions::from_mode(0o700))
                    .map_err(|e| io_ctx(format!("chmod {}", dir.display()), e))?;
                clear_pool(&dir, &pool_dir)?;
                // A bind mount of the same filesystem has the same st_dev: ask mountinfo.
                if !sandfleet_common::mounts::mounts_under(&pool_dir).contains(&pool_dir) {
                    use nix::mount::{mount, MsFlags};
                    mount(Some(&pool_dir), &pool_dir, None::<&str>, MsFlags::MS_BIND, None::<&str>)
                        .map_err(|e| io_ctx("bind-mounting the disk pool dir", e.into()))?;
                }
                nix::mount::mount(None::<&str>, &pool_dir, None::<&str>, nix::mount::MsFlags::MS_PRIVATE, None::<&str>)
                    .map_err(|e| io_ctx("making the disk pool dir private", e.into()))?;
                // Prove the host can make and mount one (mkfs.ext4 present, loop devices free).
                let probe_img = pool_dir.join("probe.img");
                let probe = pool_dir.join("probe");
                let _ = fs::remove_file(&probe_img);
                fs::create_dir_all(&probe).map_err(|e| io_ctx("creating the probe mount point", e))?;
                let res = make_image(Urgency::Now, &probe_img, limits::MIN_DISK_BYTES, limits::MIN_DISK_INODES)
                    .and_then(|()| mount_image(Urgency::Now, &probe_img, &probe))
                    .and_then(|()| unmount(&probe));
                let _ = fs::remove_file(&probe_img);
                let _ = fs::remove_dir(&probe);
                res.map_err(|e| {
                    RuntimeError::Unavailable(format!(
                        "cannot make a session filesystem (mkfs.ext4 from e2fsprogs, and loop devices, are needed; --disk-quota off gives up per-session disk limits): {e}"
                    ))
                })
            })
        };
        setup.await.map_err(|e| RuntimeError::Internal(format!("disk setup task: {e}")))??;
        let inner = Arc::new(Inner {
            dir,
            pool_dir,
            pool_target: pool,
            pool: Mutex::new(Vec::new()),
            refill: Notify::new(),
            prefix: format!("{:08x}", rand::random::<u32>()),
            seq: std::sync::atomic::AtomicU64::new(0),
            task: Mutex::new(None),
        });
        if pool > 0 {
            let task = tokio::spawn(refill_loop(Arc::downgrade(&inner)));
            *inner.task.lock() = Some(task);
        }
        info!(dir = %inner.dir.display(), pool, "per-session filesystems ready");
        Ok(Self { inner: Some(inner) })
    }

    /// Stops refilling the pool and removes its filesystems (a clean
    /// shutdown; sessions' filesystems stay).
    pub async fn release_pool(&self) {
        let Some(inner) = self.inner.clone() else { return };
        let task = inner.task.lock().take();
        if let Some(t) = task {
            t.abort();
            let _ = t.await;
        }
        let ready: Vec<Ready> = inner.pool.lock().drain(..).collect();
        let pool_dir = inner.pool_dir.clone();
        let _ = tokio::task::spawn_blocking(move || {
            for r in ready {
                let _ = unmount(&r.mount);
                let _ = fs::remove_file(&r.image);
                let _ = fs::remove_dir(&r.mount);
            }
            // The pool dir's own bind mount too: a stopped agent leaves only its
            // sessions' filesystems mounted (the next start binds it again).
            if sandfleet_common::mounts::mounts_under(&pool_dir) == [pool_dir.clone()] {
                let _ = unmount(&pool_dir);
            }
        })
        .await;
    }

    /// Whether sessions get quotas.
    pub fn enabled(&self) -> bool {
        self.inner.is_some()
    }

    fn image(inner: &Inner, name: &str) -> PathBuf {
        inner.dir.join(format!("{name}.img"))
    }

    /// Gives the session `name` its filesystem of `bytes` and `inodes`,
    /// mounted at the existing directory `at` and owned by `uid` (mode 0700).
    /// Idempotent: a mounted disk is kept, and an image whose mount is gone is
    /// mounted again with its data. A no-op when quotas are off.
    pub async fn attach(&self, name: &str, at: &Path, bytes: u64, inodes: u64, uid: u32) -> Result<(), RuntimeError> {
        let Some(inner) = self.inner.clone() else { return Ok(()) };
        let (name, at) = (name.to_string(), at.to_path_buf());
        let started = std::time::Instant::now();
        let how = tokio::task::spawn_blocking(move || -> Result<&'static str, RuntimeError> {
            let ctx = |what: &str, e: io::Error| io_ctx(format!("{what} for {}", at.display()), e);
            if is_mountpoint(&at).map_err(|e| ctx("checking the mount", e))? {
                return Ok("mounted already");
            }
            let image = Self::image(&inner, &name);
            if image.exists() {
                mount_image(Urgency::Now, &image, &at).map_err(|e| ctx("mounting the session's image", e))?;
                return Ok("image mounted again");
            }
            let default = bytes == limits::DEFAULT_DISK_BYTES && inodes == default_disk_inodes(bytes);
            let ready = if default { inner.pool.lock().pop() } else { None };
            let how = match ready {
                Some(r) => {
                    if let Err(e) = fs::rename(&r.image, &image) {
                        discard(&r.mount, &r.image);
                        return Err(ctx("taking a pool image", e));
                    }
                    let moved = nix::mount::mount(
                        Some(&r.mount),
                        &at,
                        None::<&str>,
                        nix::mount::MsFlags::MS_MOVE,
                        None::<&str>,
                    );
                    if let Err(e) = moved {
                        discard(&r.mount, &image);
                        return Err(ctx("moving a pool filesystem", e.into()));
                    }
                    let _ = fs::remove_dir(&r.mount);
                    "from the pool"
                }
                None => {
                    make_image(Urgency::Now, &image, bytes, inodes)
                        .map_err(|e| ctx("making the session's filesystem", e))?;
                    if let Err(e) = mount_image(Urgency::Now, &image, &at) {
                        let _ = fs::remove_file(&image);
                        return Err(ctx("mounting the session's filesystem", e));
                    }
                    "made"
                }
            };
            if let Err(e) = hand_over(&at, uid) {
                let _ = unmount(&at);
                let _ = fs::remove_file(&image);
                return Err(ctx("handing the filesystem to the session", e));
            }
            if how == "from the pool" {
                // After the work above: the refill's mkfs and mount never race this create.
                inner.refill.notify_one();
            }
            Ok(how)
        })
        .await
        .map_err(|e| RuntimeError::Internal(format!("disk attach task: {e}")))??;
        debug!(how, bytes, inodes, elapsed_us = started.elapsed().as_micros() as u64, "session filesystem attached");
        Ok(())
    }

    /// Mounts the session's existing filesystem at `at` again when its mount is
    /// gone (a host reboot); never makes one. `Ok(true)` when the session has
    /// its filesystem mounted at `at` afterwards, `Ok(false)` when it has none
    /// (a session from before quotas, or one whose image is lost). Idempotent.
    pub async fn remount(&self, name: &str, at: &Path) -> Result<bool, RuntimeError> {
        let Some(inner) = self.inner.clone() else { return Ok(has_own_filesystem(at)) };
        let (name, at) = (name.to_string(), at.to_path_buf());
        tokio::task::spawn_blocking(move || -> Result<bool, RuntimeError> {
            if is_mountpoint(&at).map_err(|e| io_ctx(format!("checking the mount at {}", at.display()), e))? {
                return Ok(true);
            }
            let image = Self::image(&inner, &name);
            if !image.exists() {
                return Ok(false);
            }
            mount_image(Urgency::Now, &image, &at)
                .map_err(|e| io_ctx(format!("mounting the session's image again at {}", at.display()), e))?;
            info!(at = %at.display(), "mounted a session's filesystem again (its mount was gone)");
            Ok(true)
        })
        .await
        .map_err(|e| RuntimeError::Internal(format!("disk remount task: {e}")))?
    }

    /// Unmounts the session's filesystem from `at` (if mounted) and removes its
    /// image. Idempotent.
    pub async fn detach(&self, name: &str, at: &Path) -> Result<(), RuntimeError> {
        let Some(inner) = self.inner.clone() else { return Ok(()) };
        let (name, at) = (name.to_string(), at.to_path_buf());
        tokio::task::spawn_blocking(move || -> Result<(), RuntimeError> {
            match is_mountpoint(&at) {
                Ok(true) => unmount(&at).map_err(|e| io_ctx(format!("unmounting {}", at.display()), e))?,
                Ok(false) => {}
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(e) => return Err(io_ctx(format!("checking the mount at {}", at.display()), e)),
            }
            // Renamed at once (a session of the same name made next must not
            // find it), removed in the background: freeing a large file's
            // blocks takes a while, and nothing waits for it.
            let image = Self::image(&inner, &name);
            let gone = inner.dir.join(format!("{GONE_PREFIX}{name}-{:08x}.img", rand::random::<u32>()));
            match fs::rename(&image, &gone) {
                Ok(()) => {
                    std::thread::spawn(move || {
                        if let Err(e) = fs::remove_file(&gone) {
                            warn!(image = %gone.display(), error = %e, "could not remove a session's disk image");
                        }
                    });
                    Ok(())
                }
                Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
                Err(e) => Err(io_ctx(format!("removing {}", image.display()), e)),
            }
        })
        .await
        .map_err(|e| RuntimeError::Internal(format!("disk detach task: {e}")))?
    }

    /// The use of the filesystem mounted at `at`; [`RuntimeError::NoQuota`]
    /// when quotas are off or the session has no filesystem of its own.
    pub fn usage(&self, at: &Path) -> Result<DiskUsage, RuntimeError> {
        if self.inner.is_none() {
            return Err(RuntimeError::NoQuota("this node runs without disk quotas (--disk-quota off)".into()));
        }
        if !is_mountpoint(at).map_err(|e| io_ctx(format!("checking the mount at {}", at.display()), e))? {
            return Err(RuntimeError::NoQuota(
                "this session has no filesystem of its own (it was created before disk quotas)".into(),
            ));
        }
        let s = nix::sys::statvfs::statvfs(at).map_err(|e| io_ctx("statvfs", e.into()))?;
        let frsize = s.fragment_size() as u64;
        Ok(DiskUsage {
            used_bytes: (s.blocks() as u64).saturating_sub(s.blocks_free() as u64) * frsize,
            limit_bytes: s.blocks() as u64 * frsize,
            used_inodes: (s.files() as u64).saturating_sub(s.files_free() as u64),
            limit_inodes: s.files() as u64,
        })
    }

    /// Removes the images of sessions not in `keep` (left by a crash between
    /// an unmount and the image's removal).
    pub fn retain(&self, keep: &HashSet<String>) {
        let Some(inner) = &self.inner else { return };
        let Ok(rd) = fs::read_dir(&inner.dir) else { return };
        for e in rd.flatten() {
            let name = e.file_name();
            let Some(stem) = name.to_str().and_then(|n| n.strip_suffix(".img")) else { continue };
            if !keep.contains(stem) && !stem.starts_with(POOL_PREFIX) {
                info!(image = %e.path().display(), "removing the disk image of a session that is gone");
                let _ = fs::remove_file(e.path());
            }
        }
    }
}

/// Unmounts a pool filesystem that could not be taken, and removes it.
fn discard(mount: &Path, image: &Path) {
    let _ = unmount(mount);
    let _ = fs::remove_file(image);
    let _ = fs::remove_dir(mount);
}

/// Whether `at` is the root of a filesystem of its own (a session's disk).
pub fn has_own_filesystem(at: &Path) -> bool {
    is_mountpoint(at).unwrap_or(false)
}

/// The session images in `dir` (not the pool's, not those being removed).
fn session_images(dir: &Path) -> Vec<String> {
    let Ok(rd) = fs::read_dir(dir) else { return Vec::new() };
    rd.flatten()
        .filter_map(|e| e.file_name().to_str().and_then(|n| n.strip_suffix(".img")).map(str::to_string))
        .filter(|n| !n.starts_with(POOL_PREFIX) && !n.starts_with(GONE_PREFIX))
        .collect()
}

/// Unmounts and removes everything in the pool dir, and the pool's images (a
/// previous agent's pool).
fn clear_pool(dir: &Path, pool_dir: &Path) -> Result<(), RuntimeError> {
    for e in fs::read_dir(dir).map_err(|e| io_ctx("reading the disks dir", e))?.flatten() {
        if e.file_name().to_string_lossy().starts_with(POOL_PREFIX) {
            let _ = fs::remove_file(e.path());
        }
    }
    for e in fs::read_dir(pool_dir).map_err(|e| io_ctx("reading the disk pool dir", e))?.flatten() {
        let p = e.path();
        if p.is_dir() {
            if is_mountpoint(&p).unwrap_or(false) {
                let _ = unmount(&p);
            }
            let _ = fs::remove_dir(&p);
        } else {
            let _ = fs::remove_file(&p);
        }
    }
    Ok(())
}

/// Keeps the pool at its target; ends when the [`Disks`] is dropped.
async fn refill_loop(inner: Weak<Inner>) {
    loop {
        let Some(i) = inner.upgrade() else { return };
        if i.pool.lock().len() >= i.pool_target {
            // Woken by a take; the 1 s tick also ends this loop once the disks are dropped.
            if tokio::time::timeout(std::time::Duration::from_secs(1), i.refill.notified()).await.is_ok() {
                // A burst of creates is not slowed by mkfs and mount (the
                // kernel serializes mounts): refill once it has passed.
                drop(i);
                tokio::time::sleep(REFILL_DELAY).await;
            }
            continue;
        }
        let n = i.seq.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let name = format!("{}-{n}", i.prefix);
        // The image beside the sessions' (a rename across the pool dir's bind
        // mount would be EXDEV); the mount point in the private pool dir.
        let (image, mount) = (i.dir.join(format!("{POOL_PREFIX}{name}.img")), i.pool_dir.join(name));
        drop(i);
        let made = {
            let (image, mount) = (image.clone(), mount.clone());
            tokio::task::spawn_blocking(move || -> io::Result<()> {
                fs::create_dir(&mount)?;
                let bytes = limits::DEFAULT_DISK_BYTES;
                make_image(Urgency::Ahead, &image, bytes, default_disk_inodes(bytes))?;
                if let Err(e) = mount_image(Urgency::Ahead, &image, &mount) {
                    let _ = fs::remove_file(&image);
                    let _ = fs::remove_dir(&mount);
                    return Err(e);
                }
                // What a take would do first, done ahead.
                remove_lost_found(&mount)
            })
            .await
        };
        match made {
            Ok(Ok(())) => match inner.upgrade() {
                Some(i) => i.pool.lock().push(Ready { image, mount }),
                None => {
                    let _ = unmount(&mount);
                    let _ = fs::remove_file(&image);
                    return;
                }
            },
            Ok(Err(e)) => {
                warn!(error = %e, "could not make a pool filesystem; retrying in 5 s");
                tokio::time::sleep(std::time::Duration::from_secs(5)).await;
            }
            Err(_) => return,
        }
    }
}
