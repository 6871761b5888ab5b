//! End-to-end tests of bad input: each gets its precise gRPC code, and
//! nothing changes.
//!
//! How these tests run and what they need: see `common/mod.rs`.

#[macro_use]
mod common;

use std::time::Duration;

use sandfleet::{proto, CreateSession, ExecRequest};
use sandfleet_common::auth::IdentityKind;
use sandfleet_testkit::helpers::{
    create_running, describe, exec_argv, expect_code, expect_one_of, list_all_sessions, raw, request_id, small_session,
    state_of, stdout,
};
use sandfleet_testkit::host::nonce;
use sandfleet_testkit::ClusterBuilder;
use tonic::Code;

use common::{one_node, start, RemoveOnDrop, SHORT};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_and_malformed_session_ids() {
    require_facilities!();
    let cluster = one_node().await;
    let client = cluster.client().await;
    let unknown = uuid::Uuid::new_v4().hyphenated().to_string();
    expect_code("get unknown id", client.get_session(&unknown).await, Code::NotFound);
    expect_code("delete unknown id", client.delete_session(&unknown).await, Code::NotFound);
    expect_code(
        "renew unknown id",
        client.renew_session(&unknown, Some(Duration::from_secs(60))).await,
        Code::NotFound,
    );
    for bad in ["not-a-uuid", "../../etc/passwd", "", &unknown.to_uppercase()] {
        expect_code(&format!("get {bad:?}"), client.get_session(bad).await, Code::InvalidArgument);
    }
    expect_code("delete malformed id", client.delete_session("x/../y").await, Code::InvalidArgument);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_template_and_request_id_create_nothing() {
    require_facilities!();
    let cluster = one_node().await;
    let client = cluster.client().await;
    let tag = nonce();
    let err = expect_code(
        "template Bad_Template",
        client
            .create_session(
                CreateSession::new().request_id(request_id("tpl")).template("Bad_Template").label("test", tag.clone()),
            )
            .await,
        Code::InvalidArgument,
    );
    assert!(err.to_string().contains("template"), "the error names the field: {err}");
    expect_code(
        "request id with a space",
        client.create_session(CreateSession::new().request_id("has space").label("test", tag.clone())).await,
        Code::InvalidArgument,
    );
    // Label keys follow Kubernetes' syntax: an optional DNS-subdomain prefix and one '/'.
    for bad in ["a/b/c", "Not_A_Domain/x", "/x", "x/"] {
        expect_code(
            &format!("label key {bad:?}"),
            client
                .create_session(
                    CreateSession::new().request_id(request_id("lbl")).label(bad, "v").label("test", tag.clone()),
                )
                .await,
            Code::InvalidArgument,
        );
    }
    let listed = list_all_sessions(&client, &[("test", &tag)], &[]).await.unwrap();
    assert!(listed.is_empty(), "rejected creates must create nothing: {listed:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn workspace_paths_and_symlinks_cannot_escape() {
    require_facilities!();
    let cluster = one_node().await;
    let client = cluster.client().await;
    let s = create_running(&client, small_session("paths")).await.unwrap();
    let host_passwd = std::fs::read("/etc/passwd").unwrap();

    for p in ["../etc/passwd", "a/../../etc/passwd", "..", "/etc/passwd"] {
        expect_code(&format!("read {p:?}"), client.read_file_bytes(&s, p).await, Code::InvalidArgument);
    }
    expect_code("write ../evil", client.write_file_bytes(&s, "../evil", b"x".to_vec()).await, Code::InvalidArgument);
    expect_code("list ..", client.list_files(&s, "..").await, Code::InvalidArgument);
    expect_code("remove ../x", client.remove_file(&s, "../x", false).await, Code::InvalidArgument);
    // The agent itself refuses them (not only the SDK).
    let node = &cluster.channel(&s.node_address, IdentityKind::Agent).unwrap();
    raw::expect_status(
        "raw read ../etc/passwd",
        raw::read_file(node, &s.id, Some(&s.token), "../etc/passwd").await,
        Code::InvalidArgument,
    );
    raw::expect_status(
        "raw write a/../../x",
        raw::write_file(node, &s.id, Some(&s.token), "a/../../x", vec![b"x".to_vec()]).await,
        Code::InvalidArgument,
    );
    raw::expect_status("raw list /", raw::list_files(node, &s.id, Some(&s.token), "/").await, Code::InvalidArgument);

    // Symlinks planted by code in the sandbox point at the host's / and /etc/passwd.
    let out = exec_argv(&client, &s, ["sh", "-c", "ln -s /etc/passwd leak && ln -s / root"], SHORT).await.unwrap();
    assert_eq!(out.exit.exit_code, 0, "{}", describe(&out));
    for p in ["leak", "root/etc/passwd", "./root/etc/passwd"] {
        let r = client.read_file_bytes(&s, p).await;
        if let Ok(bytes) = &r {
            assert_ne!(bytes, &host_passwd, "read_file({p:?}) returned the host's /etc/passwd");
        }
        expect_code(&format!("read through symlink {p:?}"), r, Code::InvalidArgument);
    }
    expect_code("list through symlink", client.list_files(&s, "root").await, Code::InvalidArgument);
    expect_code("list through symlink subdir", client.list_files(&s, "root/etc").await, Code::InvalidArgument);

    let victim = std::env::temp_dir().join(format!("sandfleet-victim-{}", nonce()));
    std::fs::write(&victim, b"keep me").unwrap();
    let _cleanup = RemoveOnDrop(victim.clone());
    let via_link = format!("root{}", victim.display());
    expect_code("remove through symlink", client.remove_file(&s, &via_link, false).await, Code::InvalidArgument);
    assert_eq!(std::fs::read(&victim).unwrap(), b"keep me", "a host file was changed through a symlink");
    let planted = std::env::temp_dir().join(format!("sandfleet-planted-{}", nonce()));
    let _cleanup2 = RemoveOnDrop(planted.clone());
    let via_link = format!("root{}", planted.display());
    expect_code(
        "write through symlink",
        client.write_file_bytes(&s, &via_link, b"x".to_vec()).await,
        Code::InvalidArgument,
    );
    assert!(!planted.exists(), "a host file was created through a symlink");
    // Inside the workspace, the links themselves are harmless and can be removed.
    client.remove_file(&s, "leak", false).await.expect("removing a symlink removes the link");
    assert!(std::fs::read("/etc/passwd").unwrap() == host_passwd, "the host's /etc/passwd changed");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unfittable_sessions_are_resource_exhausted_and_create_nothing() {
    require_facilities!();
    let cluster = one_node().await;
    let client = cluster.client().await;
    let tag = nonce();
    let nodes = client.list_nodes().await.unwrap();
    let max_mem = nodes.iter().filter_map(|n| n.capacity.as_ref()).map(|c| c.memory_bytes).max().unwrap();
    let max_cpu = nodes.iter().filter_map(|n| n.capacity.as_ref()).map(|c| c.cpu_millis).max().unwrap();

    // Within the documented limits (64 GiB, 64 cores), but larger than any node.
    let too_much_mem = max_mem + (1 << 30);
    if too_much_mem <= 64 << 30 {
        expect_code(
            "memory larger than every node",
            client
                .create_session(
                    CreateSession::new()
                        .request_id(request_id("huge"))
                        .memory_bytes(too_much_mem)
                        .label("test", tag.clone()),
                )
                .await,
            Code::ResourceExhausted,
        );
    } else {
        eprintln!("note: node memory {max_mem} is too large to test RESOURCE_EXHAUSTED on memory");
    }
    let too_much_cpu = max_cpu + 1000;
    if too_much_cpu <= 64_000 {
        expect_code(
            "cpu larger than every node",
            client
                .create_session(
                    CreateSession::new()
                        .request_id(request_id("hugecpu"))
                        .cpu_millis(too_much_cpu)
                        .label("test", tag.clone()),
                )
                .await,
            Code::ResourceExhausted,
        );
    }
    // 1 TiB: no node can ever fit it.
    expect_code(
        "memory 1Ti",
        client
            .create_session(
                CreateSession::new().request_id(request_id("1ti")).memory_bytes(1 << 40).label("test", tag.clone()),
            )
            .await,
        Code::ResourceExhausted,
    );

    let listed = list_all_sessions(&client, &[("test", &tag)], &[]).await.unwrap();
    assert!(listed.is_empty(), "refused creates must create nothing: {listed:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn over_limit_requests_name_the_limit() {
    require_facilities!();
    let cluster = one_node().await;
    let client = cluster.client().await;
    let tag = nonce();

    let mut spec = CreateSession::new().request_id(request_id("labels")).label("test", tag.clone());
    for i in 0..2000 {
        spec = spec.label(format!("k{i}"), "v");
    }
    let err =
        expect_one_of("2000 labels", client.create_session(spec).await, &[Code::OutOfRange, Code::InvalidArgument]);
    let msg = err.to_string();
    assert!(msg.contains("64") && msg.contains("label"), "the error names the 64-label limit: {msg}");
    let listed = list_all_sessions(&client, &[("test", &tag)], &[]).await.unwrap();
    assert!(listed.is_empty(), "refused creates must create nothing: {listed:?}");

    let s = create_running(&client, small_session("limits")).await.unwrap();
    let big_arg = "a".repeat(300 * 1024);
    let err = expect_one_of(
        "argv over 256 KiB",
        client.exec_collect(&s, ExecRequest::argv(["echo", big_arg.as_str()])).await,
        &[Code::OutOfRange, Code::InvalidArgument],
    );
    let msg = err.to_string().to_lowercase();
    assert!(msg.contains("argv") && msg.contains("limit"), "the error names the argv limit: {msg}");

    let big_code = format!("#{}\nprint(1)", "x".repeat(1024 * 1024 + 16));
    let err = expect_one_of(
        "code over 1 MiB",
        client.exec_collect(&s, ExecRequest::code(proto::Language::Python, big_code)).await,
        &[Code::OutOfRange, Code::InvalidArgument],
    );
    assert!(err.to_string().to_lowercase().contains("limit"), "the error names the limit: {err}");

    let err = expect_one_of(
        "stdin over 1 MiB",
        client.exec_collect(&s, ExecRequest::argv(["cat"]).stdin(vec![b'x'; (1 << 20) + 1])).await,
        &[Code::OutOfRange, Code::InvalidArgument],
    );
    assert!(err.to_string().to_lowercase().contains("stdin"), "the error names stdin: {err}");
    // Code over one kernel argument (128 KiB) but within its 1 MiB limit runs: the agent passes it as a file.
    let code = format!("#{}\nprint('big')", "x".repeat(200 * 1024));
    let out = client
        .exec_collect(&s, ExecRequest::code(proto::Language::Python, code).timeout(SHORT))
        .await
        .expect("code under its 1 MiB limit runs");
    assert_eq!(stdout(&out), "big\n", "{}", describe(&out));

    // A write chunk over 1 MiB, sent raw (the SDK always chunks at 1 MiB).
    let st = raw::expect_one_of(
        "write chunk over 1 MiB",
        raw::write_file(
            &cluster.channel(&s.node_address, IdentityKind::Agent).unwrap(),
            &s.id,
            Some(&s.token),
            "big.bin",
            vec![vec![b'x'; (1 << 20) + 1]],
        )
        .await,
        &[Code::OutOfRange, Code::InvalidArgument],
    );
    assert!(st.message().to_lowercase().contains("limit"), "the error names the limit: {}", st.message());
    raw::expect_status(
        "the refused upload left no file",
        raw::read_file(
            &cluster.channel(&s.node_address, IdentityKind::Agent).unwrap(),
            &s.id,
            Some(&s.token),
            "big.bin",
        )
        .await,
        Code::NotFound,
    );

    // The session is unharmed.
    let out = exec_argv(&client, &s, ["echo", "fine"], SHORT).await.unwrap();
    assert_eq!(stdout(&out), "fine\n", "{}", describe(&out));
}

fn tamper(token: &str) -> String {
    let mut chars: Vec<char> = token.chars().collect();
    let mid = chars.len() / 2;
    let i = (mid..chars.len()).chain(0..mid).find(|i| chars[*i].is_ascii_alphanumeric()).expect("token has letters");
    chars[i] = if chars[i] == 'A' { 'B' } else { 'A' };
    chars.into_iter().collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wrong_tokens_are_unauthenticated() {
    require_facilities!();
    let cluster = one_node().await;
    let client = cluster.client().await;
    let a = create_running(&client, small_session("tok-a")).await.unwrap();
    let b = create_running(&client, small_session("tok-b")).await.unwrap();
    let out = exec_argv(&client, &b, ["sh", "-c", "printf \"b's secret\" > secret.txt"], SHORT).await.unwrap();
    assert_eq!(out.exit.exit_code, 0, "{}", describe(&out));
    let node = &cluster.channel(&b.node_address, IdentityKind::Agent).unwrap();

    // Straight to the agent: the SDK would fetch a fresh token and retry.
    let tampered = tamper(&b.token);
    assert_ne!(tampered, b.token);
    let cases: [(&str, Option<&str>); 4] = [
        ("a tampered token", Some(tampered.as_str())),
        ("an empty token", Some("")),
        ("no authorization header", None),
        ("another session's token", Some(a.token.as_str())),
    ];
    for (what, token) in cases {
        raw::expect_status(
            &format!("exec with {what}"),
            raw::exec(node, &b.id, token, &["true"]).await,
            Code::Unauthenticated,
        );
        let r = raw::read_file(node, &b.id, token, "secret.txt").await;
        if let Ok(bytes) = &r {
            assert_ne!(bytes.as_slice(), b"b's secret", "read with {what} returned the file");
        }
        raw::expect_status(&format!("read with {what}"), r, Code::Unauthenticated);
        raw::expect_status(
            &format!("write with {what}"),
            raw::write_file(node, &b.id, token, "planted.txt", vec![b"x".to_vec()]).await,
            Code::Unauthenticated,
        );
        raw::expect_status(
            &format!("list with {what}"),
            raw::list_files(node, &b.id, token, "").await,
            Code::Unauthenticated,
        );
    }
    // A valid token of one session does not open another (checked above), and opens its own.
    let out = raw::exec(node, &a.id, Some(&a.token), &["true"]).await.expect("exec with the right token");
    assert!(
        matches!(out.last().and_then(|m| m.event.as_ref()), Some(proto::exec_response::Event::Exit(e)) if e.exit_code == 0),
        "{out:?}"
    );
    raw::expect_status(
        "read a missing file with the right token",
        raw::read_file(node, &b.id, Some(&b.token), "planted.txt").await,
        Code::NotFound,
    );
    assert_eq!(raw::read_file(node, &b.id, Some(&b.token), "secret.txt").await.unwrap(), b"b's secret".to_vec());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn session_waits_pending_while_the_node_is_full() {
    require_facilities!();
    let cluster = start(ClusterBuilder::new().agent_args(["--cpu", "2", "--slots", "2"])).await;
    let client = cluster.client().await;
    let spec = |p: &str| {
        CreateSession::new()
            .request_id(request_id(p))
            .cpu_millis(1000)
            .memory_bytes(128 << 20)
            .ttl(Duration::from_secs(600))
    };
    let first = create_running(&client, spec("full-1")).await.unwrap();
    let _second = create_running(&client, spec("full-2")).await.unwrap();

    // Fits the node's capacity, but not what is free now: it waits, it is not refused.
    let third = client.create_session(spec("full-3")).await.expect("a create that only has to wait is accepted");
    tokio::time::sleep(Duration::from_secs(3)).await;
    let now = client.get_session(&third.id).await.unwrap();
    assert_eq!(state_of(&now), proto::SessionState::Pending, "{now:?}");
    assert!(!now.pending_reason.is_empty(), "a PENDING session says what it waits for: {now:?}");
    assert!(now.node_id.is_empty(), "{now:?}");

    client.delete_session(&first.id).await.unwrap();
    let running = client.wait_running(&third.id, Duration::from_secs(60)).await;
    assert!(running.is_ok(), "the pending session must start once capacity frees up: {running:?}");
}
