//! The StatefulSet rehearsal: the coordinator image (deploy/images/build-daemon-images)
//! run as a Kubernetes StatefulSet would run it, without an API server.
//!
//! Three containers with the hostnames `sandfleet-coordinator-0..2` on a
//! private Docker network, each reachable under the DNS names the headless
//! Service `sandfleet-coordinator` in namespace `sandfleet` gives its pod
//! (network aliases), each with an empty volume of its own (the PVC), mutual
//! TLS with certificates for those names, and a plaintext health listener (the
//! probes' port). They start a few seconds apart, so the first ones find
//! names that do not resolve yet. They must form a cluster by themselves,
//! survive a rolling restart (`docker restart`, one at a time, the next only
//! once the restarted one reports SERVING, as a StatefulSet rolls), and take
//! writes after.
//!
//! Needs a Docker engine and root; without them the test prints a SKIPPED
//! banner, unless `SANDFLEET_REQUIRE_FACILITIES=1` (CI).

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use sandfleet::{proto, Client};
use sandfleet_common::auth::IdentityKind;
use sandfleet_testkit::facilities::daemon_image;
use sandfleet_testkit::health::{self, ServingStatus, SERVER};
use sandfleet_testkit::{require_docker, TestPki};

const MEMBERS: usize = 3;
/// The StatefulSet, its headless Service and its namespace, as in the manifests.
const STATEFULSET: &str = "sandfleet-coordinator";
const SERVICE: &str = "sandfleet-coordinator";
const NAMESPACE: &str = "sandfleet";
const GRPC_PORT: u16 = 7070;
const HEALTH_PORT: u16 = 7071;
/// The coordinator image's user.
const COORDINATOR_UID: u32 = 10001;
const FORM_BOUND: Duration = Duration::from_secs(90);
/// A restarted member reports SERVING (it has a leader and has caught up) within this.
const CATCH_UP_BOUND: Duration = Duration::from_secs(60);
/// A write is acknowledged within this at every step.
const WRITE_BOUND: Duration = Duration::from_secs(15);

/// The pod's DNS name under the headless Service.
fn pod_dns(i: usize) -> String {
    format!("{STATEFULSET}-{i}.{SERVICE}.{NAMESPACE}.svc")
}

/// Runs `docker args...`; its stdout, or an error with its stderr.
fn docker(args: &[&str]) -> Result<String> {
    let out = std::process::Command::new("timeout")
        .arg("120")
        .arg("docker")
        .args(args)
        .stdin(std::process::Stdio::null())
        .output()
        .with_context(|| format!("running docker {args:?}"))?;
    if !out.status.success() {
        bail!("docker {args:?} failed ({}): {}", out.status, String::from_utf8_lossy(&out.stderr).trim());
    }
    Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

/// Everything the rehearsal creates in Docker; removed when dropped (logs printed on failure).
struct Rehearsal {
    suffix: String,
    network: String,
    image: String,
    tls_dir: PathBuf,
    /// Per member: container name, volume, published gRPC and health ports.
    members: Vec<Member>,
    _tmp: tempfile::TempDir,
    pki: TestPki,
}

struct Member {
    container: String,
    volume: String,
    grpc: u16,
    health: u16,
}

impl Rehearsal {
    fn new(image: String) -> Result<Self> {
        let suffix: String = uuid::Uuid::new_v4().simple().to_string()[..8].to_string();
        let tmp = tempfile::Builder::new().prefix("sandfleet-sts-").tempdir()?;
        let tls_dir = tmp.path().join("tls");
        let pki = TestPki::create(&tls_dir, "sandfleet statefulset rehearsal CA")?;
        let network = format!("sandfleet-sts-{suffix}");
        let members = (0..MEMBERS)
            .map(|i| Member {
                container: format!("sandfleet-sts-{suffix}-{i}"),
                volume: format!("sandfleet-sts-{suffix}-data-{i}"),
                grpc: free_port(),
                health: free_port(),
            })
            .collect();
        // Made before anything exists in Docker: dropping it removes whatever was created.
        let r = Rehearsal { suffix, network, image, tls_dir, members, _tmp: tmp, pki };
        docker(&["network", "create", "--label", &r.label(), &r.network])?;
        for m in &r.members {
            docker(&["volume", "create", "--label", &r.label(), &m.volume])?;
        }
        Ok(r)
    }

    fn label(&self) -> String {
        format!("sandfleet.test=statefulset-{}", self.suffix)
    }

    /// The member's certificate: its SPIFFE identity, its pod DNS names, and
    /// 127.0.0.1 (the test reaches it through a published port). Readable by
    /// the image's user, as a Secret mounted with fsGroup would be.
    fn issue(&self, i: usize) -> Result<()> {
        let sans = vec![pod_dns(i), format!("{STATEFULSET}-{i}.{SERVICE}"), "127.0.0.1".into(), "localhost".into()];
        let paths = self.pki.issue(IdentityKind::Coordinator, &format!("{STATEFULSET}-{i}"), &sans)?;
        for p in [&paths.cert, &paths.key, &paths.ca] {
            std::os::unix::fs::chown(p, Some(COORDINATOR_UID), Some(COORDINATOR_UID))?;
        }
        Ok(())
    }

    /// `docker run` of member `i`, as the StatefulSet's pod template would run it.
    fn run(&self, i: usize) -> Result<()> {
        let m = &self.members[i];
        let initial: Vec<String> = (0..MEMBERS).map(|j| format!("{}={}:{GRPC_PORT}", j + 1, pod_dns(j))).collect();
        let name = format!("{STATEFULSET}-{i}");
        let cert = format!("/etc/sandfleet/tls/coordinator-{name}.crt");
        let key = format!("/etc/sandfleet/tls/coordinator-{name}.key");
        let publish_grpc = format!("127.0.0.1:{}:{GRPC_PORT}", m.grpc);
        let publish_health = format!("127.0.0.1:{}:{HEALTH_PORT}", m.health);
        let tls_mount = format!("{}:/etc/sandfleet/tls:ro", self.tls_dir.display());
        let data_mount = format!("{}:/var/lib/sandfleet", m.volume);
        let (alias_fqdn, alias_short) = (pod_dns(i), format!("{name}.{SERVICE}"));
        let label = self.label();
        let listen = format!("0.0.0.0:{GRPC_PORT}");
        let health_listen = format!("0.0.0.0:{HEALTH_PORT}");
        let members = initial.join(",");
        let args: Vec<&str> = vec![
            "run",
            "-d",
            "--name",
            &m.container,
            "--hostname",
            &name,
            "--label",
            &label,
            "--network",
            &self.network,
            "--network-alias",
            &alias_fqdn,
            "--network-alias",
            &alias_short,
            "-p",
            &publish_grpc,
            "-p",
            &publish_health,
            "-v",
            &data_mount,
            "-v",
            &tls_mount,
            "--stop-timeout",
            "20",
            &self.image,
            "--id-from-hostname",
            "--initial-members",
            &members,
            "--listen",
            &listen,
            "--health-listen",
            &health_listen,
            "--data-dir",
            "/var/lib/sandfleet/data",
            "--admin-key-file",
            "/var/lib/sandfleet/admin.key",
            "--tls-cert",
            &cert,
            "--tls-key",
            &key,
            "--tls-ca",
            "/etc/sandfleet/tls/ca.crt",
        ];
        docker(&args)?;
        Ok(())
    }

    fn health_addr(&self, i: usize) -> String {
        format!("127.0.0.1:{}", self.members[i].health)
    }

    /// An SDK client for every member's published port, as cluster admin (a client certificate).
    async fn client(&self) -> Result<Client> {
        let admin = self.pki.issue(IdentityKind::Client, "rehearsal-admin", &[])?;
        let endpoints: Vec<String> = self.members.iter().map(|m| format!("127.0.0.1:{}", m.grpc)).collect();
        Ok(sandfleet::Client::builder(endpoints).tls(Some(admin.sdk_options())).connect().await?)
    }

    fn logs(&self) -> String {
        let mut out = String::new();
        for m in &self.members {
            let logs = std::process::Command::new("docker")
                .args(["logs", "--tail", "60", &m.container])
                .output()
                .map(|o| format!("{}{}", String::from_utf8_lossy(&o.stdout), String::from_utf8_lossy(&o.stderr)))
                .unwrap_or_else(|e| format!("(docker logs failed: {e})"));
            out.push_str(&format!("----- {} -----\n{logs}\n", m.container));
        }
        out
    }
}

impl Drop for Rehearsal {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!("\n===== statefulset rehearsal failed; container logs follow =====\n{}", self.logs());
        }
        for m in &self.members {
            let _ = docker(&["rm", "-f", "-v", &m.container]);
        }
        for m in &self.members {
            let _ = docker(&["volume", "rm", "-f", &m.volume]);
        }
        let _ = docker(&["network", "rm", &self.network]);
    }
}

/// Creates tenant `name` (a Raft write), retrying until acknowledged within
/// [`WRITE_BOUND`]; a retry that finds it created already counts.
async fn write(client: &Client, name: &str) -> Duration {
    let start = Instant::now();
    loop {
        match client.create_tenant(name, proto::TenantQuota::default()).await {
            Ok(_) => return start.elapsed(),
            Err(e) if e.code() == Some(tonic::Code::AlreadyExists) => return start.elapsed(),
            Err(e) => {
                assert!(start.elapsed() < WRITE_BOUND, "write {name} not acknowledged within {WRITE_BOUND:?}: {e}");
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        }
    }
}

/// id -> (address, voter), once a leader is known and every member is listed.
async fn wait_members(client: &Client, within: Duration) -> (u64, BTreeMap<u64, (String, bool)>) {
    let deadline = Instant::now() + within;
    loop {
        let last = match client.cluster_status().await {
            Ok(s)
                if s.leader_id != 0
                    && s.members.len() == MEMBERS
                    && s.members.iter().all(|m| m.role != "unreachable") =>
            {
                return (s.leader_id, s.members.iter().map(|m| (m.id, (m.address.clone(), m.voter))).collect())
            }
            Ok(s) => format!("{s:?}"),
            Err(e) => e.to_string(),
        };
        assert!(Instant::now() < deadline, "no formed cluster within {within:?}: {last}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

async fn wait_health(addr: &str, want: ServingStatus, within: Duration) -> Duration {
    health::wait_for(addr, SERVER, want, within).await.unwrap_or_else(|e| panic!("{e:#}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn statefulset_rehearsal_forms_by_itself_and_survives_a_rolling_restart() {
    if !require_docker() {
        return;
    }
    let image = daemon_image("coordinator");
    let r = Rehearsal::new(image.clone()).unwrap();
    for i in 0..MEMBERS {
        r.issue(i).unwrap();
    }
    // Pods start a little apart, as a StatefulSet with parallel pod management starts them.
    let started = Instant::now();
    for i in 0..MEMBERS {
        r.run(i).unwrap();
        if i + 1 < MEMBERS {
            tokio::time::sleep(Duration::from_secs(2)).await;
        }
    }
    for i in 0..MEMBERS {
        wait_health(&r.health_addr(i), ServingStatus::Serving, FORM_BOUND).await;
    }
    let formed_after = started.elapsed();
    let client = r.client().await.unwrap();
    let (leader, formed) = wait_members(&client, FORM_BOUND).await;
    let expected: BTreeMap<u64, (String, bool)> =
        (0..MEMBERS).map(|i| (i as u64 + 1, (format!("{}:{GRPC_PORT}", pod_dns(i)), true))).collect();
    assert_eq!(formed, expected, "ids from the hostnames, addresses from the Service's DNS names");
    // The initializer (ordinal 0) wrote the first admin key into its volume.
    let key = docker(&["exec", &r.members[0].container, "cat", "/var/lib/sandfleet/admin.key"]).unwrap();
    assert!(key.starts_with("sfk_"), "an admin key in member 0's volume");
    // It runs as the image's non-root user.
    let uid = docker(&["exec", &r.members[0].container, "id", "-u"]).unwrap();
    assert_eq!(uid, COORDINATOR_UID.to_string());
    let mut written = BTreeSet::new();
    let name = format!("sts-{}-formed", r.suffix);
    write(&client, &name).await;
    written.insert(name);
    eprintln!("formed in {formed_after:?} (leader {leader}) from {image}");

    // Rolling restart, highest ordinal first; the next only once the last is SERVING again.
    for i in (0..MEMBERS).rev() {
        let t = Instant::now();
        docker(&["restart", "-t", "20", &r.members[i].container]).unwrap();
        let serving = wait_health(&r.health_addr(i), ServingStatus::Serving, CATCH_UP_BOUND).await;
        let (leader, now) = wait_members(&client, CATCH_UP_BOUND).await;
        assert_eq!(now, expected, "membership unchanged after restarting member {}", i + 1);
        let name = format!("sts-{}-after-{i}", r.suffix);
        let took = write(&client, &name).await;
        written.insert(name);
        eprintln!(
            "restarted {} in {:?}: SERVING {serving:?} after the restart returned, leader {leader}, write took {took:?}",
            r.members[i].container,
            t.elapsed()
        );
    }

    // Writes after the roll, and nothing written before is lost.
    let name = format!("sts-{}-end", r.suffix);
    write(&client, &name).await;
    written.insert(name);
    let tenants: BTreeSet<String> = client.list_tenants().await.unwrap().into_iter().map(|t| t.name).collect();
    assert!(written.is_subset(&tenants), "written {written:?}, listed {tenants:?}");
    // One admin key: the restarts created no other.
    let keys = client.list_api_keys(None).await.unwrap();
    assert_eq!(keys.len(), 1, "{keys:?}");
    assert_eq!(docker(&["exec", &r.members[0].container, "cat", "/var/lib/sandfleet/admin.key"]).unwrap(), key);
    // Every member ready again (a follower is not ready for the moment its
    // leader restarts, until it hears from the leader again).
    for i in 0..MEMBERS {
        wait_health(&r.health_addr(i), ServingStatus::Serving, CATCH_UP_BOUND).await;
    }
    // Clean stops: every container exits 0 on SIGTERM.
    for m in &r.members {
        docker(&["stop", "-t", "20", &m.container]).unwrap();
        let code = docker(&["inspect", "--format", "{{.State.ExitCode}}", &m.container]).unwrap();
        assert_eq!(code, "0", "{} exited with {code}", m.container);
    }
}
