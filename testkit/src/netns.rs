//! Network namespaces for a test cluster, so that links between processes can be cut.
//!
//! Every process of a [`Cluster`](crate::Cluster) gets its own network
//! namespace with one interface `eth0` (and `lo`), joined through a veth pair
//! to a per-cluster Linux bridge:
//!
//! ```text
//!  host (the harness, the SDK clients)  10.X.Y.1 on bridge sfb<id>
//!      |-- veth sfv<id>c1 -- netns sf<id>-c1: coordinator 1   10.X.Y.11
//!      |-- veth sfv<id>c2 -- netns sf<id>-c2: coordinator 2   10.X.Y.12
//!      |-- veth sfv<id>a1 -- netns sf<id>-a1: agent n1-...    10.X.Y.101
//! ```
//!
//! `<id>` is the /24's `X` and `Y` in hex, so concurrent clusters (nextest runs
//! many) never share a name or an address. A process is started with
//! `nsenter --net=/var/run/netns/<ns> <binary> ...` (not `ip netns exec`, which
//! remounts `/sys` and hides the cgroup tree the agent needs); nsenter execs, so
//! the child's pid is the binary's.
//!
//! A cut between two processes is a pair of `DROP` rules (`INPUT -s`, `OUTPUT
//! -d`) inside one of the two namespaces: every packet between them passes
//! through it, so one side is enough. Healing deletes exactly those rules.
//! The namespace outlives the process, so a cut survives a kill and a restart.
//!
//! Docker hosts set the iptables `FORWARD` policy to `DROP` and
//! `net.bridge.bridge-nf-call-iptables=1`, which drops bridged traffic between
//! namespaces; the network inserts `FORWARD -i <bridge> -o <bridge> -j ACCEPT`
//! and removes it again.
//!
//! # Cleanup
//! [`Network`] removes its namespaces, veths, bridge and `FORWARD` rule on
//! drop. A harness that dies without dropping (SIGKILL, a nextest timeout)
//! leaves them behind; every new network first removes the leftovers of
//! networks whose owner process is gone ([`cleanup_stale`]). Ownership is
//! recorded in `/run/sandfleet-chaos/net-<id>.owner` (pid and start time),
//! written before anything is created and removed after everything is.

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

use anyhow::{anyhow, bail, Context, Result};

/// Where ownership records and the lock live.
pub const STATE_DIR: &str = "/run/sandfleet-chaos";
/// Environment variable choosing the network of clusters built with
/// [`NetworkChoice::Auto`]: `loopback` or `netns`.
pub const NETWORK_ENV: &str = "SANDFLEET_NETWORK";

/// How a cluster's processes are connected.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NetworkMode {
    /// Everyone on `127.0.0.1`; partitions are not available.
    Loopback,
    /// One network namespace per process on a per-cluster bridge; partitions work.
    Namespaces,
}

impl std::fmt::Display for NetworkMode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            NetworkMode::Loopback => "loopback",
            NetworkMode::Namespaces => "network namespaces",
        })
    }
}

/// The key that names the host (the harness and its SDK clients) in [`Network::cut`].
pub const HOST_KEY: &str = "host";

/// What a [`ClusterBuilder`](crate::ClusterBuilder) asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum NetworkChoice {
    /// Namespaces when this machine can make them (root, `ip`, `nsenter`,
    /// `iptables`), else loopback with a loud warning; with
    /// `SANDFLEET_REQUIRE_FACILITIES=1` a missing facility is an error.
    /// `SANDFLEET_NETWORK=loopback|netns` overrides.
    #[default]
    Auto,
    /// Always loopback (no partitions).
    Loopback,
    /// Namespaces or an error.
    Namespaces,
}

/// The error of a partition call on a cluster without namespaces.
#[derive(Debug, Clone, thiserror::Error)]
#[error("network partitions are unavailable: the cluster runs on loopback ({0})")]
pub struct PartitionsUnavailable(pub String);

/// Why this machine cannot make network namespaces, or `None` when it can.
/// Probed once per process.
pub fn unavailable_reason() -> Option<String> {
    static REASON: OnceLock<Option<String>> = OnceLock::new();
    REASON
        .get_or_init(|| {
            let mut missing = Vec::new();
            if !nix::unistd::geteuid().is_root() {
                missing.push(format!("root (running as uid {})", nix::unistd::geteuid()));
            }
            for tool in ["ip", "nsenter", "iptables"] {
                if find_tool(tool).is_none() {
                    missing.push(format!("`{tool}` (not on PATH nor in /usr/sbin, /sbin, /usr/bin)"));
                }
            }
            (!missing.is_empty()).then(|| missing.join("; "))
        })
        .clone()
}

/// Prints the loopback warning to stderr, once per process.
pub fn warn_loopback(why: &str) {
    static WARNED: OnceLock<()> = OnceLock::new();
    WARNED.get_or_init(|| {
        let line = "!".repeat(78);
        let text = format!(
            "\n{line}\nWARNING: sandfleet harness: NETWORK PARTITIONS ARE UNAVAILABLE.\n\
             Clusters run on 127.0.0.1 and partition faults are skipped: {why}\n\
             Namespaces need root, iproute2 (`ip`), util-linux (`nsenter`) and `iptables`.\n\
             Set SANDFLEET_REQUIRE_FACILITIES=1 to make this an error.\n{line}\n"
        );
        let _ = std::io::stderr().write_all(text.as_bytes());
    });
}

fn find_tool(name: &str) -> Option<PathBuf> {
    let mut dirs: Vec<PathBuf> =
        std::env::var_os("PATH").map(|p| std::env::split_paths(&p).collect()).unwrap_or_default();
    for d in ["/usr/sbin", "/sbin", "/usr/bin", "/bin"] {
        dirs.push(PathBuf::from(d));
    }
    dirs.into_iter().map(|d| d.join(name)).find(|p| {
        use std::os::unix::fs::PermissionsExt;
        std::fs::metadata(p).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
    })
}

fn tool(name: &str) -> PathBuf {
    find_tool(name).unwrap_or_else(|| PathBuf::from(name))
}

/// The path of `nsenter`, for starting processes in a namespace.
pub fn nsenter() -> PathBuf {
    tool("nsenter")
}

/// Runs a command, returning stdout; an error names the command and carries stderr.
fn run(program: &str, args: &[&str]) -> Result<String> {
    let out = Command::new(tool(program))
        .args(args)
        .output()
        .with_context(|| format!("running {program} {}", args.join(" ")))?;
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    } else {
        bail!("`{program} {}` failed ({}): {}", args.join(" "), out.status, String::from_utf8_lossy(&out.stderr).trim())
    }
}

/// [`run`], retried a few times: concurrent harnesses change the host's
/// iptables and `/var/run/netns` at the same moment.
fn run_retry(program: &str, args: &[&str]) -> Result<String> {
    let mut attempt = 0;
    loop {
        attempt += 1;
        match run(program, args) {
            Ok(s) => return Ok(s),
            Err(e) if attempt >= 4 => return Err(e),
            Err(_) => std::thread::sleep(std::time::Duration::from_millis(50 * attempt)),
        }
    }
}

/// `iptables` inside the namespace `ns` (`-w`: wait for the xtables lock).
fn ns_iptables(ns: &str, args: &[&str]) -> Result<String> {
    let net = format!("--net={}", netns_path(ns).display());
    run_retry("nsenter", &[&[net.as_str(), "iptables", "-w"][..], args].concat())
}

/// [`ns_iptables`] without retries (for `-C` checks, whose failure is an answer).
fn ns_iptables_once(ns: &str, args: &[&str]) -> Result<String> {
    let net = format!("--net={}", netns_path(ns).display());
    run("nsenter", &[&[net.as_str(), "iptables", "-w"][..], args].concat())
}

/// The path nsenter takes for the namespace `ns`.
pub fn netns_path(ns: &str) -> PathBuf {
    Path::new("/var/run/netns").join(ns)
}

/// One process's place on the network.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NetHost {
    /// Key in the network (`c1`, `a2`, ...).
    pub key: String,
    /// Namespace name (`sf<id>-c1`).
    pub ns: String,
    /// Host end of the veth pair.
    pub veth: String,
    /// The address of `eth0` in the namespace.
    pub ip: Ipv4Addr,
}

impl NetHost {
    /// `/var/run/netns/<ns>`, for `nsenter --net=`.
    pub fn ns_path(&self) -> PathBuf {
        netns_path(&self.ns)
    }
}

/// A cut link: all traffic between `a` and `b` dropped by rules in `a`'s namespace.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Cut {
    a: String,
    b: String,
}

/// A per-cluster bridge with one namespace per process. See the module docs.
#[derive(Debug)]
pub struct Network {
    x: u8,
    y: u8,
    id: String,
    bridge: String,
    record: PathBuf,
    hosts: Vec<NetHost>,
    cuts: Vec<Cut>,
    forward_rule: bool,
    torn_down: bool,
}

/// Holds `/run/sandfleet-chaos/.lock` while claiming subnets and removing leftovers.
struct StateLock(File);

impl StateLock {
    fn take() -> Result<StateLock> {
        std::fs::create_dir_all(STATE_DIR).with_context(|| format!("creating {STATE_DIR}"))?;
        let f = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(Path::new(STATE_DIR).join(".lock"))
            .with_context(|| format!("opening {STATE_DIR}/.lock"))?;
        f.lock().with_context(|| format!("locking {STATE_DIR}/.lock"))?;
        Ok(StateLock(f))
    }
}

impl Drop for StateLock {
    fn drop(&mut self) {
        let _ = self.0.unlock();
    }
}

fn record_path(id: &str) -> PathBuf {
    Path::new(STATE_DIR).join(format!("net-{id}.owner"))
}

fn proc_start_time(pid: i32) -> Option<u64> {
    crate::host::process(pid).map(|p| p.start_time)
}

/// Whether the owner recorded in `path` still lives. An unreadable record of
/// a live-looking owner counts as alive (it may be half-written).
fn owner_alive(path: &Path) -> bool {
    let Ok(text) = std::fs::read_to_string(path) else {
        return false;
    };
    let mut it = text.split_whitespace();
    let (Some(pid), Some(start)) =
        (it.next().and_then(|s| s.parse::<i32>().ok()), it.next().and_then(|s| s.parse::<u64>().ok()))
    else {
        // Written in one call right after creation; empty only for an instant.
        return std::fs::metadata(path)
            .and_then(|m| m.modified())
            .is_ok_and(|t| t.elapsed().unwrap_or_default() < std::time::Duration::from_secs(10));
    };
    crate::host::is_alive(pid, start)
}

fn hex4(s: &str) -> Option<&str> {
    let id = s.get(..4)?;
    id.bytes().all(|c| c.is_ascii_digit() || (b'a'..=b'f').contains(&c)).then_some(id)
}

/// The id (`d52d`) of one of our namespace names (`sfd52d-c1`).
fn ns_id(name: &str) -> Option<&str> {
    let rest = name.strip_prefix("sf")?;
    let id = hex4(rest)?;
    (rest.as_bytes().get(4) == Some(&b'-')).then_some(id)
}

/// The id (`d52d`) of one of our link names (bridge `sfbd52d`, veth `sfvd52dc1`).
fn link_id(name: &str) -> Option<&str> {
    if let Some(rest) = name.strip_prefix("sfb") {
        return hex4(rest).filter(|_| rest.len() == 4);
    }
    let rest = name.strip_prefix("sfv")?;
    hex4(rest).filter(|_| rest.len() > 5)
}

fn list_netns() -> Vec<String> {
    run("ip", &["netns", "list"])
        .unwrap_or_default()
        .lines()
        .filter_map(|l| l.split_whitespace().next().map(str::to_string))
        .filter(|n| ns_id(n).is_some())
        .collect()
}

fn list_links() -> Vec<String> {
    // "12: sfvd52dc1@if11: <...>"
    run("ip", &["-o", "link", "show"])
        .unwrap_or_default()
        .lines()
        .filter_map(|l| l.split(':').nth(1))
        .map(|n| n.trim().split('@').next().unwrap_or("").to_string())
        .filter(|n| link_id(n).is_some())
        .collect()
}

fn list_forward_rules() -> Vec<String> {
    run("iptables", &["-w", "-S", "FORWARD"])
        .unwrap_or_default()
        .lines()
        .filter(|l| l.starts_with("-A FORWARD -i sfb") && l.contains("-j ACCEPT"))
        .map(str::to_string)
        .collect()
}

/// Removes every namespace, link and FORWARD rule of network `id`; returns what it removed.
fn remove_resources(id: &str, netns: &[String], links: &[String], rules: &[String]) -> Vec<String> {
    let mut removed = Vec::new();
    // Host ends of veths first: that destroys the peers even while some
    // process still holds a namespace open.
    for l in links.iter().filter(|l| link_id(l) == Some(id) && l.starts_with("sfv")) {
        if run("ip", &["link", "del", l]).is_ok() {
            removed.push(format!("veth {l}"));
        }
    }
    for n in netns.iter().filter(|n| ns_id(n) == Some(id)) {
        if run("ip", &["netns", "del", n]).is_ok() {
            removed.push(format!("netns {n}"));
        }
    }
    for l in links.iter().filter(|l| link_id(l) == Some(id) && l.starts_with("sfb")) {
        if run("ip", &["link", "del", l]).is_ok() {
            removed.push(format!("bridge {l}"));
        }
    }
    let bridge = format!("sfb{id}");
    for r in rules.iter().filter(|r| r.contains(&format!("-i {bridge} "))) {
        let mut args: Vec<&str> = vec!["-w"];
        args.extend(r.split_whitespace());
        // "-A FORWARD ..." -> "-D FORWARD ..."
        if let Some(a) = args.iter_mut().find(|a| **a == "-A") {
            *a = "-D";
        }
        if run("iptables", &args).is_ok() {
            removed.push(format!("iptables rule {r:?}"));
        }
    }
    removed
}

/// Removes the leftovers of networks whose owner process is gone (and of
/// resources with our names and no owner record at all). Returns what was
/// removed, one item per line. Safe to run while other harnesses run.
pub fn cleanup_stale() -> Result<Vec<String>> {
    if unavailable_reason().is_some() {
        return Ok(Vec::new());
    }
    let _lock = StateLock::take()?;
    // Resources first, records second: a record is written before its
    // resources, so a resource seen here whose record is missing is an orphan.
    let netns = list_netns();
    let links = list_links();
    let rules = list_forward_rules();
    let mut ids: Vec<String> = netns
        .iter()
        .filter_map(|n| ns_id(n))
        .chain(links.iter().filter_map(|l| link_id(l)))
        .chain(rules.iter().filter_map(|r| r.split_whitespace().skip_while(|w| *w != "-i").nth(1).and_then(link_id)))
        .map(str::to_string)
        .collect();
    if let Ok(dir) = std::fs::read_dir(STATE_DIR) {
        for e in dir.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            if let Some(id) = name.strip_prefix("net-").and_then(|n| n.strip_suffix(".owner")) {
                ids.push(id.to_string());
            }
        }
    }
    ids.sort();
    ids.dedup();
    let mut removed = Vec::new();
    for id in ids {
        let record = record_path(&id);
        if record.exists() && owner_alive(&record) {
            continue;
        }
        let what = remove_resources(&id, &netns, &links, &rules);
        if !what.is_empty() {
            removed.push(format!("network {id} (owner gone): {}", what.join(", ")));
        }
        let _ = std::fs::remove_file(&record);
    }
    Ok(removed)
}

/// Whether `10.x.y.0/24` overlaps an address or route of the host.
fn subnet_in_use(x: u8, y: u8) -> bool {
    let ours = u32::from(Ipv4Addr::new(10, x, y, 0));
    let mut prefixes = Vec::new();
    let addrs = run("ip", &["-4", "-o", "addr", "show"]).unwrap_or_default();
    for l in addrs.lines() {
        let mut w = l.split_whitespace();
        if let Some(cidr) = w.find(|t| *t == "inet").and(w.next()) {
            prefixes.push(cidr.to_string());
        }
    }
    let routes = run("ip", &["-4", "route", "show", "table", "all"]).unwrap_or_default();
    for l in routes.lines() {
        let first = l.split_whitespace().find(|t| t.chars().next().is_some_and(|c| c.is_ascii_digit()));
        if let Some(p) = first {
            prefixes.push(p.to_string());
        }
    }
    prefixes.iter().any(|p| {
        let (addr, len) = p.split_once('/').unwrap_or((p.as_str(), "32"));
        let (Ok(addr), Ok(len)) = (addr.parse::<Ipv4Addr>(), len.parse::<u32>()) else {
            return false;
        };
        if len == 0 {
            return false; // a default route covers everything; it is no conflict
        }
        let len = len.min(32);
        let common = len.min(24);
        let mask = if common == 0 { 0 } else { u32::MAX << (32 - common) };
        (u32::from(addr) & mask) == (ours & mask)
    })
}

impl Network {
    /// Claims a free `10.X.Y.0/24`, removes stale leftovers, creates the
    /// bridge and the FORWARD rule.
    pub fn create() -> Result<Network> {
        if let Some(why) = unavailable_reason() {
            bail!("network namespaces are unavailable: {why}");
        }
        if let Err(e) = cleanup_stale() {
            eprintln!("sandfleet harness: removing stale networks failed: {e:#}");
        }
        let (x, y, record) = {
            use rand::Rng;
            let _lock = StateLock::take()?;
            let mut rng = rand::rng();
            let mut claimed = None;
            for _ in 0..64 {
                let (x, y) = (rng.random_range(160u8..=250), rng.random_range(0u8..=255));
                let id = format!("{x:02x}{y:02x}");
                let record = record_path(&id);
                if record.exists() || subnet_in_use(x, y) {
                    continue;
                }
                let me = std::process::id() as i32;
                let start = proc_start_time(me).ok_or_else(|| anyhow!("cannot read /proc/self/stat"))?;
                let mut f = OpenOptions::new()
                    .write(true)
                    .create_new(true)
                    .open(&record)
                    .with_context(|| format!("creating {}", record.display()))?;
                f.write_all(format!("{me} {start}\n").as_bytes())?;
                claimed = Some((x, y, record));
                break;
            }
            claimed.ok_or_else(|| anyhow!("no free 10.X.Y.0/24 found for a test network"))?
        };
        let id = format!("{x:02x}{y:02x}");
        let mut net = Network {
            x,
            y,
            bridge: format!("sfb{id}"),
            id,
            record,
            hosts: Vec::new(),
            cuts: Vec::new(),
            forward_rule: false,
            torn_down: false,
        };
        // On error `net` is dropped, which removes whatever was made.
        let gw = format!("{}/24", net.gateway());
        run_retry("ip", &["link", "add", &net.bridge, "type", "bridge"])?;
        run_retry("ip", &["addr", "add", &gw, "dev", &net.bridge])?;
        run_retry("ip", &["link", "set", &net.bridge, "up"])?;
        run_retry("iptables", &["-w", "-I", "FORWARD", "-i", &net.bridge, "-o", &net.bridge, "-j", "ACCEPT"])?;
        net.forward_rule = true;
        Ok(net)
    }

    /// The network's id (`X` and `Y` of `10.X.Y.0/24` in hex).
    pub fn id(&self) -> &str {
        &self.id
    }

    /// The bridge's name.
    pub fn bridge(&self) -> &str {
        &self.bridge
    }

    /// The host's address on the bridge (`10.X.Y.1`): where clients come from.
    pub fn gateway(&self) -> Ipv4Addr {
        Ipv4Addr::new(10, self.x, self.y, 1)
    }

    /// The namespace of `key`, if it was added.
    pub fn host(&self, key: &str) -> Option<&NetHost> {
        self.hosts.iter().find(|h| h.key == key)
    }

    /// Every namespace made so far.
    pub fn hosts(&self) -> &[NetHost] {
        &self.hosts
    }

    /// Creates the namespace of `key` (`c<n>` or `a<n>`, `n` in 1..=89 / 1..=150)
    /// with its veth and address, or returns the existing one.
    pub fn add_host(&mut self, key: &str) -> Result<NetHost> {
        if let Some(h) = self.host(key) {
            return Ok(h.clone());
        }
        let n: u16 = key.get(1..).and_then(|n| n.parse().ok()).ok_or_else(|| anyhow!("bad host key {key:?}"))?;
        let last = match key.as_bytes()[0] {
            b'c' if (1..=89).contains(&n) => 10 + n,
            b'a' if (1..=150).contains(&n) => 100 + n,
            _ => bail!("bad host key {key:?}: c1..c89 or a1..a150"),
        };
        let host = NetHost {
            key: key.to_string(),
            ns: format!("sf{}-{key}", self.id),
            veth: format!("sfv{}{key}", self.id),
            ip: Ipv4Addr::new(10, self.x, self.y, last as u8),
        };
        debug_assert!(host.veth.len() <= 15 && host.ns.len() <= 15);
        // Registered before it is made, so teardown removes a half-made one.
        self.hosts.push(host.clone());
        let ns = host.ns.as_str();
        let cidr = format!("{}/24", host.ip);
        let inside = format!("--net={}", host.ns_path().display());
        run_retry("ip", &["netns", "add", ns])?;
        run_retry("ip", &["link", "add", &host.veth, "type", "veth", "peer", "name", "eth0", "netns", ns])?;
        run_retry("ip", &["link", "set", &host.veth, "master", &self.bridge, "up"])?;
        run_retry("nsenter", &[&inside, "ip", "addr", "add", &cidr, "dev", "eth0"])?;
        run_retry("nsenter", &[&inside, "ip", "link", "set", "eth0", "up"])?;
        run_retry("nsenter", &[&inside, "ip", "link", "set", "lo", "up"])?;
        Ok(host)
    }

    fn need(&self, key: &str) -> Result<&NetHost> {
        self.host(key).ok_or_else(|| anyhow!("no namespace {key:?} in network {}", self.id))
    }

    /// The address of `key`; [`HOST_KEY`] is the host (the gateway).
    fn ip_of(&self, key: &str) -> Result<Ipv4Addr> {
        if key == HOST_KEY {
            Ok(self.gateway())
        } else {
            Ok(self.need(key)?.ip)
        }
    }

    fn cut_index(&self, a: &str, b: &str) -> Option<usize> {
        self.cuts.iter().position(|c| (c.a == a && c.b == b) || (c.a == b && c.b == a))
    }

    /// The two rules (without the command) that cut off `ip`.
    fn rules(ip: Ipv4Addr) -> [Vec<String>; 2] {
        let ip = ip.to_string();
        let rule = |chain: &str, dir: &str| -> Vec<String> {
            [chain, dir, ip.as_str(), "-j", "DROP"].iter().map(|s| s.to_string()).collect()
        };
        [rule("INPUT", "-s"), rule("OUTPUT", "-d")]
    }

    /// Drops all traffic between `a` and `b` (both directions). A no-op when
    /// already cut. Either may be [`HOST_KEY`] (the host: the harness's clients).
    pub fn cut(&mut self, a: &str, b: &str) -> Result<()> {
        let (a, b) = if a == HOST_KEY { (b, a) } else { (a, b) };
        if a == b || self.cut_index(a, b).is_some() {
            return Ok(());
        }
        let ns = self.need(a)?.ns.clone();
        let other = self.ip_of(b)?;
        // Recorded first, so a half-applied cut is still undone by heal/teardown.
        self.cuts.push(Cut { a: a.to_string(), b: b.to_string() });
        for rule in Self::rules(other) {
            let mut args = vec!["-I"];
            args.extend(rule.iter().map(String::as_str));
            ns_iptables(&ns, &args)?;
        }
        Ok(())
    }

    /// Undoes [`cut`](Self::cut) between `a` and `b` (either order); a no-op when not cut.
    pub fn restore(&mut self, a: &str, b: &str) -> Result<()> {
        let Some(i) = self.cut_index(a, b) else {
            return Ok(());
        };
        let cut = self.cuts[i].clone();
        let ns = self.need(&cut.a)?.ns.clone();
        let other = self.ip_of(&cut.b)?;
        let mut first_error = None;
        for rule in Self::rules(other) {
            let rule: Vec<&str> = rule.iter().map(String::as_str).collect();
            // Absent (a half-applied cut) is fine; delete every copy otherwise.
            for _ in 0..4 {
                let check = [&["-C"][..], &rule].concat();
                if ns_iptables_once(&ns, &check).is_err() {
                    break;
                }
                if let Err(e) = ns_iptables(&ns, &[&["-D"][..], &rule].concat()) {
                    first_error.get_or_insert(e);
                    break;
                }
            }
        }
        match first_error {
            None => {
                self.cuts.remove(i);
                Ok(())
            }
            Some(e) => Err(e),
        }
    }

    /// Restores every cut link of `key`.
    pub fn heal_host(&mut self, key: &str) -> Result<()> {
        let pairs: Vec<(String, String)> =
            self.cuts.iter().filter(|c| c.a == key || c.b == key).map(|c| (c.a.clone(), c.b.clone())).collect();
        for (a, b) in pairs {
            self.restore(&a, &b)?;
        }
        Ok(())
    }

    /// Restores every cut link.
    pub fn heal_all(&mut self) -> Result<()> {
        let pairs: Vec<(String, String)> = self.cuts.iter().map(|c| (c.a.clone(), c.b.clone())).collect();
        let mut first_error = None;
        for (a, b) in pairs {
            if let Err(e) = self.restore(&a, &b) {
                first_error.get_or_insert(e);
            }
        }
        first_error.map_or(Ok(()), Err)
    }

    /// The cut links, as pairs of keys.
    pub fn cuts(&self) -> Vec<(String, String)> {
        self.cuts.iter().map(|c| (c.a.clone(), c.b.clone())).collect()
    }

    /// Removes the namespaces, veths, bridge, FORWARD rule and ownership
    /// record. Call after the processes are stopped. Idempotent; returns the
    /// failures (also printed).
    pub fn teardown(&mut self) -> Vec<String> {
        if self.torn_down {
            return Vec::new();
        }
        self.torn_down = true;
        let mut errors = Vec::new();
        for h in &self.hosts {
            if let Err(e) = run_retry("ip", &["link", "del", &h.veth]) {
                if list_links().contains(&h.veth) {
                    errors.push(format!("{e:#}"));
                }
            }
            if let Err(e) = run_retry("ip", &["netns", "del", &h.ns]) {
                if list_netns().contains(&h.ns) {
                    errors.push(format!("{e:#}"));
                }
            }
        }
        self.cuts.clear();
        if let Err(e) = run_retry("ip", &["link", "del", &self.bridge]) {
            if list_links().contains(&self.bridge) {
                errors.push(format!("{e:#}"));
            }
        }
        if self.forward_rule {
            let rule = ["FORWARD", "-i", &self.bridge, "-o", &self.bridge, "-j", "ACCEPT"];
            // Delete every copy (a retried insert may have added two).
            for _ in 0..4 {
                if run("iptables", &[&["-w", "-C"][..], &rule].concat()).is_err() {
                    break;
                }
                if let Err(e) = run_retry("iptables", &[&["-w", "-D"][..], &rule].concat()) {
                    errors.push(format!("{e:#}"));
                    break;
                }
            }
            self.forward_rule = false;
        }
        if errors.is_empty() {
            let _ = std::fs::remove_file(&self.record);
        } else {
            // Leave the record: the next harness's cleanup_stale retries once we are gone.
            for e in &errors {
                eprintln!("sandfleet harness: network {} cleanup: {e}", self.id);
            }
        }
        errors
    }
}

impl Drop for Network {
    fn drop(&mut self) {
        self.teardown();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_of_our_names() {
        assert_eq!(link_id("sfbd52d"), Some("d52d"));
        assert_eq!(link_id("sfvd52dc1"), Some("d52d"));
        assert_eq!(link_id("sfvb2c4a12"), Some("b2c4"));
        assert_eq!(ns_id("sfd52d-a3"), Some("d52d"));
        assert_eq!(ns_id("sfb2c4-c1"), Some("b2c4"));
        assert_eq!(link_id("sfb"), None);
        assert_eq!(link_id("sfbd52dx"), None);
        assert_eq!(link_id("docker0"), None);
        assert_eq!(ns_id("sfXYZW-c1"), None);
        assert_eq!(ns_id("sfd52d"), None);
    }
}
