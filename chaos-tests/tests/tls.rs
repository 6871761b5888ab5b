//! Mutual TLS against the real binaries: who may connect and as what, plain
//! text refused where it must be, and certificates rotated under running execs.
//!
//! Every other end-to-end test runs on mutual TLS too (the testkit's default);
//! `plaintext_loopback_cluster_runs_code` is the one that runs `--insecure`.

#[macro_use]
mod common;

use std::time::{Duration, Instant};

use futures::StreamExt as _;
use nix::sys::signal::Signal;
use sandfleet::proto;
use sandfleet::proto::agent_service_client::AgentServiceClient;
use sandfleet::proto::raft_service_client::RaftServiceClient;
use sandfleet::{ExecEvent, ExecRequest};
use sandfleet_common::auth::IdentityKind;
use sandfleet_testkit::helpers::{create_running, exec_argv, small_session, stdout};
use sandfleet_testkit::host::nonce;
use sandfleet_testkit::{bin_path, Cluster, ClusterBuilder, TestPki, TlsPaths};
use tonic::Code;

use common::{one_node, start, SHORT};

/// A call that failed at the connection, not an answer from the server.
fn is_connection_failure(err: &sandfleet::Error) -> bool {
    matches!(err.code(), Some(Code::Unavailable | Code::Internal | Code::Unknown | Code::Cancelled))
}

fn register(node_id: &str, address: &str) -> proto::RegisterNodeRequest {
    proto::RegisterNodeRequest {
        node_id: node_id.to_string(),
        address: address.to_string(),
        capacity: Some(proto::NodeCapacity { cpu_millis: 1000, memory_bytes: 1 << 30, session_slots: 4 }),
        runtimes: vec!["process".into()],
        ..Default::default()
    }
}

async fn node_ids(cluster: &Cluster) -> Vec<String> {
    cluster.client().await.list_nodes().await.unwrap().into_iter().map(|n| n.id).collect()
}

/// The answer of RegisterNode sent as the holder of `cert`.
async fn register_as(cluster: &Cluster, cert: Option<&TlsPaths>, node_id: &str) -> Result<(), tonic::Status> {
    let addr = cluster.coordinator_addrs()[0].clone();
    let channel = cluster.channel_as(&addr, IdentityKind::Coordinator, cert).expect("a channel");
    let mut req = tonic::Request::new(register(node_id, "127.0.0.1:1"));
    req.set_timeout(Duration::from_secs(10));
    AgentServiceClient::new(channel).register_node(req).await.map(|_| ())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agent_calls_are_bound_to_the_node_id_in_the_certificate() {
    require_facilities!();
    let cluster = one_node().await;
    let pki = cluster.pki().expect("the testkit runs TLS by default");

    // A client certificate used as an agent.
    let st = register_as(&cluster, cluster.client_tls(), &format!("fake-{}", nonce())).await.unwrap_err();
    assert_eq!(st.code(), Code::PermissionDenied, "{st:?}");
    assert!(st.message().contains("client/test-admin"), "{}", st.message());

    // An agent certificate for another node id: registering, heartbeating or
    // watching as that node is refused, and nothing is recorded.
    let mine = format!("mine-{}", nonce());
    let cert = pki.issue(IdentityKind::Agent, &mine, &[]).unwrap();
    let victim = cluster.agents[0].id.clone();
    for other in [format!("other-{}", nonce()), victim.clone()] {
        let st = register_as(&cluster, Some(&cert), &other).await.unwrap_err();
        assert_eq!(st.code(), Code::PermissionDenied, "{other}: {st:?}");
        assert!(st.message().contains(&format!("agent/{mine}")), "{}", st.message());
    }
    let channel = cluster.channel_as(&cluster.coordinator_addrs()[0], IdentityKind::Coordinator, Some(&cert)).unwrap();
    let st = AgentServiceClient::new(channel.clone())
        .heartbeat(proto::HeartbeatRequest { node_id: victim.clone(), ..Default::default() })
        .await
        .unwrap_err();
    assert_eq!(st.code(), Code::PermissionDenied, "{st:?}");
    let st = AgentServiceClient::new(channel)
        .watch_assignments(proto::WatchAssignmentsRequest { node_id: victim.clone(), deltas: true })
        .await
        .unwrap_err();
    assert_eq!(st.code(), Code::PermissionDenied, "{st:?}");
    let nodes = node_ids(&cluster).await;
    assert!(nodes.iter().all(|n| n.starts_with('n')), "a refused registration was recorded: {nodes:?}");

    // No certificate at all (the CA only, as an API-key client would connect).
    let ca_only = TlsPaths { cert: cert.cert.clone(), key: cert.key.clone(), ca: cert.ca.clone() };
    let tls = sandfleet_common::tls::ClientTls::new(ca_only.ca.clone(), None).unwrap();
    let channel = sandfleet_common::grpc::channel(
        &cluster.coordinator_addrs()[0],
        sandfleet_common::grpc::ChannelOptions::CLIENT,
        Some(&tls.dialer(Some(IdentityKind::Coordinator))),
    )
    .unwrap();
    let st = AgentServiceClient::new(channel)
        .register_node(register(&format!("anon-{}", nonce()), "127.0.0.1:1"))
        .await
        .unwrap_err();
    assert_eq!(st.code(), Code::Unauthenticated, "{st:?}");

    // The node's own certificate registers it.
    register_as(&cluster, Some(&cert), &mine).await.expect("registering as the certificate's own node");
    assert!(node_ids(&cluster).await.contains(&mine));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn raft_calls_accept_only_coordinator_certificates() {
    require_facilities!();
    let cluster = start(ClusterBuilder::new().coordinators(1).agents(0)).await;
    let pki = cluster.pki().unwrap();
    let addr = cluster.coordinator_addrs()[0].clone();
    let agent = pki.issue(IdentityKind::Agent, "sneaky", &[]).unwrap();
    for (who, cert) in [("a client", cluster.client_tls().cloned()), ("an agent", Some(agent))] {
        let channel = cluster.channel_as(&addr, IdentityKind::Coordinator, cert.as_ref()).unwrap();
        let mut raft = RaftServiceClient::new(channel);
        let st = raft.member_status(proto::ClusterStatusRequest {}).await.unwrap_err();
        assert_eq!(st.code(), Code::PermissionDenied, "{who}: {st:?}");
        let st = raft.propose(proto::RaftPayload { data: b"{}".to_vec() }).await.unwrap_err();
        assert_eq!(st.code(), Code::PermissionDenied, "{who}: {st:?}");
    }
    // A second coordinator certificate is a member's and may ask.
    let peer = pki.issue(IdentityKind::Coordinator, "c9", &[]).unwrap();
    let channel = cluster.channel_as(&addr, IdentityKind::Coordinator, Some(&peer)).unwrap();
    let member = RaftServiceClient::new(channel).member_status(proto::ClusterStatusRequest {}).await.unwrap();
    assert_eq!(member.into_inner().id, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn foreign_certificates_and_plaintext_are_refused_at_the_connection() {
    require_facilities!();
    let cluster = start(ClusterBuilder::new().coordinators(1).agents(0)).await;
    let addr = cluster.coordinator_addrs()[0].clone();
    let dir = tempfile::tempdir().unwrap();
    let other = TestPki::create(dir.path(), "another CA").unwrap();

    // Our CA, but a client certificate from another CA: the server refuses the handshake.
    let foreign = other.issue(IdentityKind::Client, "test-admin", &[]).unwrap();
    let mixed = TlsPaths { ca: cluster.client_tls().unwrap().ca.clone(), ..foreign.clone() };
    let client = sandfleet::Client::builder([addr.clone()])
        .tls(Some(mixed.sdk_options()))
        .max_retries(0)
        .connect()
        .await
        .unwrap();
    // (With TLS 1.3 the client finishes its side of the handshake before the
    // server has checked its certificate, so the refusal arrives as the
    // connection's end: UNAVAILABLE or UNKNOWN, "transport error".)
    let err = client.list_nodes().await.unwrap_err();
    assert!(is_connection_failure(&err), "{err}");

    // Another CA altogether: the client refuses the server's certificate.
    let client = sandfleet::Client::builder([addr.clone()])
        .tls(Some(foreign.sdk_options()))
        .max_retries(0)
        .connect()
        .await
        .unwrap();
    let err = client.list_nodes().await.unwrap_err();
    assert_eq!(err.code(), Some(Code::Unavailable), "{err}");
    assert!(format!("{err:?}").to_lowercase().contains("certificate"), "{err:?}");

    // Plaintext to the TLS port: the server answers the HTTP/2 preface with
    // a TLS alert, which the client reports as whichever transport failure it
    // noticed first.
    let client = sandfleet::Client::builder([addr.clone()]).max_retries(0).connect().await.unwrap();
    let err = client.list_nodes().await.unwrap_err();
    assert!(is_connection_failure(&err), "{err}");

    // A server that is not a coordinator, as a client expecting one sees it:
    // an agent certificate on the coordinator's address is refused by the SDK.
    // (Here: our own client certificate's CA, but we expect an agent.)
    let channel = cluster.channel(&addr, IdentityKind::Agent).unwrap();
    let st = proto::exec_service_client::ExecServiceClient::new(channel)
        .exec(proto::ExecRequest::default())
        .await
        .unwrap_err();
    assert_eq!(st.code(), Code::Unavailable, "{st:?}");
    assert!(format!("{st:?}").contains("a agent was expected") || format!("{st:?}").contains("expected"), "{st:?}");

    // And the cluster still answers its own client.
    cluster.client().await.list_nodes().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn daemons_refuse_plaintext_off_loopback_and_need_tls_or_insecure() {
    let dir = tempfile::tempdir().unwrap();
    let run = |args: Vec<String>| {
        let out = std::process::Command::new(bin_path("sandfleet-coordinator"))
            .args(args)
            .env("RUST_LOG", "warn")
            .stdin(std::process::Stdio::null())
            .output()
            .expect("running sandfleet-coordinator");
        (out.status, String::from_utf8_lossy(&out.stderr).into_owned())
    };
    let data = dir.path().join("c").display().to_string();
    let base = |listen: &str| -> Vec<String> {
        ["--id", "1", "--listen", listen, "--data-dir", &data].iter().map(|s| s.to_string()).collect()
    };

    let mut args = base("0.0.0.0:0");
    args.push("--insecure".into());
    let (status, stderr) = run(args);
    assert!(!status.success(), "plaintext on 0.0.0.0 started: {stderr}");
    assert!(stderr.contains("--insecure is allowed only on a loopback address"), "{stderr}");

    let (status, stderr) = run(base("127.0.0.1:0"));
    assert!(!status.success(), "started with neither TLS nor --insecure: {stderr}");
    assert!(stderr.contains("--tls-cert") && stderr.contains("--insecure"), "{stderr}");

    let mut args = base("127.0.0.1:0");
    args.extend(["--tls-cert".into(), "/nonexistent.crt".into()]);
    let (status, stderr) = run(args);
    assert!(!status.success());
    assert!(stderr.contains("missing --tls-key, --tls-ca"), "{stderr}");

    // An agent certificate cannot serve as a coordinator.
    let pki = TestPki::create(&dir.path().join("pki"), "ca").unwrap();
    let agent = pki.issue(IdentityKind::Agent, "n1", &["127.0.0.1".into()]).unwrap();
    let mut args = base("127.0.0.1:0");
    args.extend(agent.daemon_args());
    let (status, stderr) = run(args);
    assert!(!status.success());
    assert!(stderr.contains("needs a coordinator certificate"), "{stderr}");
    assert!(!dir.path().join("c").join("raft.rocksdb").exists(), "a refused start must create no store");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn plaintext_loopback_cluster_runs_code() {
    require_facilities!();
    let cluster = start(ClusterBuilder::new().tls(false).coordinators(1).agents(1)).await;
    assert!(cluster.pki().is_none());
    let client = cluster.client().await;
    let s = create_running(&client, small_session("plain")).await.unwrap();
    let out = exec_argv(&client, &s, ["sh", "-c", "echo plain"], SHORT).await.unwrap();
    assert_eq!((out.exit.exit_code, stdout(&out).as_str()), (0, "plain\n"));
}

/// The leaf certificate a fresh handshake with `addr` presents.
async fn presented_cert(paths: &TlsPaths, addr: &str, kind: IdentityKind) -> Vec<u8> {
    let dialer = paths.dialer(kind).unwrap();
    let uri: tonic::codegen::http::Uri = format!("https://{addr}").parse().unwrap();
    let conn = dialer.dial(&uri).await.expect("a TLS handshake");
    conn.get_ref().1.peer_certificates().expect("a server certificate")[0].to_vec()
}

fn der_of(path: &std::path::Path) -> Vec<u8> {
    use rustls::pki_types::pem::PemObject;
    rustls::pki_types::CertificateDer::from_pem_file(path).unwrap().to_vec()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn certificates_rotate_under_running_execs() {
    require_facilities!();
    let cluster = one_node().await;
    let pki = cluster.pki().unwrap();
    let client = cluster.client().await;
    let s = create_running(&client, small_session("rotate")).await.unwrap();
    let coordinator = cluster.coordinator_addrs()[0].clone();
    let me = cluster.client_tls().unwrap().clone();
    let before = presented_cert(&me, &coordinator, IdentityKind::Coordinator).await;

    // An exec that runs through the rotation, on a connection opened before it.
    let mut stream = client
        .exec(&s, ExecRequest::argv(["sh", "-c", "for i in 1 2 3 4 5 6 7 8; do echo $i; sleep 1; done"]).timeout(SHORT))
        .await
        .unwrap();
    let first = tokio::time::timeout(SHORT, stream.next()).await.unwrap().expect("an event").unwrap();
    assert!(matches!(first, ExecEvent::Stdout(_)), "{first:?}");

    // New certificates for every process, written in place; SIGHUP to the
    // coordinator, while the agent finds its files changed on its own.
    let c_ip = coordinator.rsplit_once(':').unwrap().0.to_string();
    let a_addr = s.node_address.clone();
    let a_ip = a_addr.rsplit_once(':').unwrap().0.to_string();
    let c_new = pki.issue(IdentityKind::Coordinator, "c1", &[c_ip, "localhost".into()]).unwrap();
    let a_new = pki.issue(IdentityKind::Agent, &cluster.agents[0].id, &[a_ip, "localhost".into()]).unwrap();
    cluster.proc(sandfleet_testkit::Target::Coordinator(0)).signal(Signal::SIGHUP).unwrap();

    let deadline = Instant::now() + Duration::from_secs(15);
    for (addr, kind, file) in
        [(&coordinator, IdentityKind::Coordinator, &c_new.cert), (&a_addr, IdentityKind::Agent, &a_new.cert)]
    {
        let want = der_of(file);
        assert_ne!(want, before, "the new certificate differs from the old");
        loop {
            if presented_cert(&me, addr, kind).await == want {
                break;
            }
            assert!(Instant::now() < deadline, "{addr} still presents its old certificate");
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
    }

    // The exec that spanned the rotation finished with all its output.
    let mut out = Vec::new();
    let mut exit = None;
    while let Some(ev) = tokio::time::timeout(SHORT, stream.next()).await.unwrap() {
        match ev.expect("the exec stream survives the rotation") {
            ExecEvent::Stdout(b) => out.extend(b),
            ExecEvent::Stderr(_) => {}
            ExecEvent::Exit(e) => exit = Some(e),
        }
    }
    let exit = exit.expect("an exit status");
    assert_eq!(exit.exit_code, 0, "{exit:?}");
    assert!(String::from_utf8_lossy(&out).ends_with("8\n"), "{:?}", String::from_utf8_lossy(&out));

    // The old client's connections and a new client both work.
    let again = exec_argv(&client, &s, ["echo", "after"], SHORT).await.unwrap();
    assert_eq!(stdout(&again), "after\n");
    let fresh = cluster.client().await;
    assert_eq!(fresh.get_session(&s.id).await.unwrap().id, s.id);
    // The session was never lost or moved by the rotation.
    assert_eq!(fresh.get_session(&s.id).await.unwrap().generation, s.generation);
}
