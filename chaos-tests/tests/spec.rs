//! The session spec's one definition, seen from outside: the SDK and the
//! coordinator answer one bad value with one status code, the agent's
//! registration is checked against the same runtime list, and a request id
//! reused with another spec is refused with the fields that differ.

use std::time::Duration;

use sandfleet::proto::session_service_client::SessionServiceClient;
use sandfleet::{proto, CreateSession};
use sandfleet_common::auth::IdentityKind;
use sandfleet_testkit::helpers::{create_running, list_all_sessions, request_id, small_session};
use sandfleet_testkit::host::nonce;
use sandfleet_testkit::{require_sandbox_facilities, Cluster, ClusterBuilder};
use tonic::Code;

async fn one_node() -> Cluster {
    match ClusterBuilder::new().coordinators(1).agents(1).start().await {
        Ok(c) => c,
        Err(e) => panic!("cluster did not start: {e:#}"),
    }
}

/// A create sent as raw gRPC, past the SDK's own checks.
async fn raw_create(
    cluster: &Cluster,
    req: proto::CreateSessionRequest,
) -> Result<proto::CreateSessionResponse, tonic::Status> {
    let endpoint = &cluster.coordinator_addrs()[0];
    let mut api = SessionServiceClient::new(cluster.channel(endpoint, IdentityKind::Coordinator).expect("a channel"));
    let mut req = tonic::Request::new(req);
    req.set_timeout(Duration::from_secs(30));
    api.create_session(req).await.map(tonic::Response::into_inner)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_bad_value_gets_one_code_from_the_sdk_and_the_coordinator_and_creates_nothing() {
    if !require_sandbox_facilities() {
        return;
    }
    let cluster = one_node().await;
    let client = cluster.client().await;
    let tag = nonce();
    let base = || proto::SessionSpec { labels: [("test".to_string(), tag.clone())].into(), ..Default::default() };
    let cases: Vec<(&str, proto::SessionSpec, Code, &str)> = vec![
        (
            "pids over its maximum",
            proto::SessionSpec { pids_limit: 1_000_000, ..base() },
            Code::OutOfRange,
            "pids_limit",
        ),
        ("pids under its minimum", proto::SessionSpec { pids_limit: 2, ..base() }, Code::OutOfRange, "pids_limit"),
        (
            "memory under 16 MiB",
            proto::SessionSpec { memory_bytes: 1 << 20, ..base() },
            Code::OutOfRange,
            "memory_bytes",
        ),
        (
            "cpu over its maximum",
            proto::SessionSpec { cpu_millis: 2_000_000, ..base() },
            Code::OutOfRange,
            "cpu_millis",
        ),
        ("ttl over 7 days", proto::SessionSpec { ttl_seconds: 8 * 86_400, ..base() }, Code::OutOfRange, "ttl_seconds"),
        (
            "a runtime that does not exist",
            proto::SessionSpec { runtime: "kubernetes".into(), ..base() },
            Code::InvalidArgument,
            "process, docker, cri",
        ),
        (
            "an unknown template",
            proto::SessionSpec { template: "ruby".into(), ..base() },
            Code::InvalidArgument,
            "template",
        ),
        (
            "a CPU request above the limit",
            proto::SessionSpec { cpu_millis: 500, cpu_request_millis: 600, ..base() },
            Code::InvalidArgument,
            "cpu_request_millis",
        ),
    ];
    for (what, spec, code, names) in cases {
        let sdk = client
            .create_session(CreateSession { request_id: request_id("bad"), spec: spec.clone(), pool: None })
            .await
            .expect_err(what);
        assert_eq!(sdk.code(), Some(code), "{what}: the SDK said {sdk}");
        assert!(sdk.to_string().contains(names), "{what}: {sdk}");
        let server = raw_create(
            &cluster,
            proto::CreateSessionRequest { request_id: request_id("bad"), spec: Some(spec), ..Default::default() },
        )
        .await
        .expect_err(what);
        assert_eq!(server.code(), code, "{what}: the coordinator said {server:?}");
        assert!(server.message().contains(names), "{what}: {}", server.message());
    }
    let created = list_all_sessions(&client, &[("test", &tag)], &[]).await.unwrap();
    assert!(created.is_empty(), "refused creates created {created:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_id_reused_with_another_spec_is_refused_naming_the_fields() {
    if !require_sandbox_facilities() {
        return;
    }
    let cluster = one_node().await;
    let client = cluster.client().await;
    let tag = nonce();
    let first = small_session("reuse").label("test", tag.clone());
    let s = create_running(&client, first.clone()).await.unwrap();

    // The same request again, as a client's retry: the first session, nothing new.
    let again = client.create_session_full(first.clone()).await.unwrap();
    assert!(again.existing, "a retry is answered with the existing session");
    assert_eq!(again.session.unwrap().id, s.id);
    // Defaults written out are the same spec: an explicit default is not a difference.
    let explicit = first.clone().template("default");
    assert_eq!(client.create_session(explicit).await.unwrap().id, s.id);

    let other = first.clone().cpu_millis(250).label("extra", "1");
    let err = client.create_session(other).await.expect_err("another spec under the same request id");
    assert_eq!(err.code(), Some(Code::AlreadyExists), "{err}");
    let msg = err.to_string();
    for field in ["cpu_millis", "cpu_request_millis", "labels", &s.id] {
        assert!(msg.contains(field), "the error names {field}: {msg}");
    }
    assert!(!msg.contains("memory_bytes"), "only the fields that differ: {msg}");

    let listed = list_all_sessions(&client, &[("test", &tag)], &[]).await.unwrap();
    assert_eq!(listed.iter().map(|s| s.id.as_str()).collect::<Vec<_>>(), vec![s.id.as_str()]);
    let now = client.get_session(&s.id).await.unwrap();
    assert_eq!(now.spec.unwrap().cpu_millis, 500, "the first session is unchanged");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_advertising_an_unknown_runtime_is_refused() {
    if !require_sandbox_facilities() {
        return;
    }
    let cluster = ClusterBuilder::new().coordinators(1).agents(0).start().await.expect("a coordinator");
    let endpoint = cluster.coordinator_addrs()[0].clone();
    // The node's own agent certificate, so that only the runtime is wrong.
    let node_id = format!("k8s-{}", nonce());
    let cert = cluster.pki().map(|pki| pki.issue(IdentityKind::Agent, &node_id, &[]).expect("an agent certificate"));
    let channel = cluster.channel_as(&endpoint, IdentityKind::Coordinator, cert.as_ref()).expect("a channel");
    let mut api = proto::agent_service_client::AgentServiceClient::new(channel);
    let req = proto::RegisterNodeRequest {
        node_id: node_id.clone(),
        address: "127.0.0.1:1".into(),
        capacity: Some(proto::NodeCapacity { cpu_millis: 1000, memory_bytes: 1 << 30, session_slots: 4 }),
        runtimes: vec!["kubernetes".into()],
        ..Default::default()
    };
    // The cluster may still be initialising its signing key; that answer is UNAVAILABLE.
    let mut last = None;
    for _ in 0..50 {
        match api.register_node(req.clone()).await {
            Err(s) if s.code() == Code::Unavailable => tokio::time::sleep(Duration::from_millis(100)).await,
            other => {
                last = Some(other);
                break;
            }
        }
    }
    let status = last.expect("an answer other than UNAVAILABLE").expect_err("an unknown runtime");
    assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
    assert!(status.message().contains("unknown runtime \"kubernetes\""), "{}", status.message());
    let client = cluster.client().await;
    assert!(client.list_nodes().await.unwrap().is_empty(), "nothing was registered");
}
