//! End-to-end tests of disk and inode quotas against the real binaries: the
//! kernel stops a session's writes at its quota, `sandfleet session get` shows
//! the use, a sparse file is not written out into the workspace store, and an
//! out-of-range quota creates nothing.
//!
//! How these tests run and what they need: see `common/mod.rs`.

#[macro_use]
mod common;

use std::path::Path;

use sandfleet_testkit::helpers::{create_running, describe, exec_argv, request_id, small_session, stderr, stdout};
use tonic::Code;

use common::{cli, one_node, show, SHORT};

/// Bytes allocated on disk below `dir`.
fn allocated(dir: &Path) -> u64 {
    use std::os::unix::fs::MetadataExt as _;
    let mut n = 0;
    for e in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        let Ok(m) = e.metadata() else { continue };
        n += m.blocks() * 512;
        if m.is_dir() {
            n += allocated(&e.path());
        }
    }
    n
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_session_writes_no_more_than_its_disk_quota() {
    require_facilities!();
    let cluster = one_node().await;
    let client = cluster.client().await;

    // Out of range: refused by the server with the field named, and nothing is created.
    let rid = request_id("disk-range");
    let tiny = small_session("x").request_id(rid.clone()).disk_bytes(1 << 20).into_proto();
    let mut raw = sandfleet::proto::session_service_client::SessionServiceClient::new(
        cluster.channel(&cluster.endpoint(), sandfleet_common::auth::IdentityKind::Coordinator).unwrap(),
    );
    let err = raw.create_session(tiny).await.expect_err("a 1 MiB disk is refused");
    assert_eq!(err.code(), Code::OutOfRange, "{err}");
    assert!(err.message().contains("disk_bytes"), "{err}");
    let listed = client.list_sessions(Default::default()).await.unwrap();
    assert!(listed.sessions.iter().all(|s| s.request_id != rid), "a refused create created a session");

    let s = create_running(&client, small_session("disk").disk_bytes(64 << 20).disk_inodes(2048)).await.unwrap();
    assert_eq!(s.spec.as_ref().map(|p| (p.disk_bytes, p.disk_inodes)), Some((64 << 20, 2048)));

    // The kernel stops the write at the quota.
    let out = exec_argv(&client, &s, ["dd", "if=/dev/zero", "of=big", "bs=1M", "count=100"], SHORT).await.unwrap();
    assert_ne!(out.exit.exit_code, 0, "{}", describe(&out));
    assert!(stderr(&out).contains("No space left on device"), "{}", describe(&out));
    let u = client.disk_usage(&s).await.unwrap();
    assert!(u.used_bytes > 40 << 20 && u.used_bytes <= u.limit_bytes && u.limit_bytes <= 64 << 20, "{u:?}");
    assert!(u.limit_inodes >= 2048, "{u:?}");

    // `sandfleet session get` shows the spec and the use.
    let got = cli(&cluster, &["--endpoint", &cluster.endpoint(), "session", "get", &s.id], None).await;
    let text = String::from_utf8_lossy(&got.stdout);
    assert!(got.status.success(), "{}", show(&got));
    assert!(text.contains("disk:     64Mi (2048 inodes)"), "{text}");
    assert!(text.lines().any(|l| l.starts_with("disk use:") && l.contains("inodes")), "{text}");

    // A 1 TiB sparse file is not written out into the store: the sync refuses it.
    let out = exec_argv(&client, &s, ["sh", "-c", "rm big && truncate -s 1T sparse && echo ok"], SHORT).await.unwrap();
    assert_eq!(stdout(&out), "ok\n", "{}", describe(&out));
    let store = cluster.dir().join("workspace-store");
    let before = allocated(&store);
    let err = client.sync_workspace(&s).await.expect_err("a workspace over its quota is not synced");
    let sandfleet::Error::Status(st) = &err else { panic!("not a status: {err}") };
    assert_eq!(st.code(), Code::ResourceExhausted, "{st}");
    assert!(st.message().contains("disk quota"), "{st}");
    assert!(allocated(&store) < before + (1 << 20), "the store grew from {before} to {}", allocated(&store));

    // The session goes on once the file is gone, and so does its sync.
    let out = exec_argv(&client, &s, ["rm", "sparse"], SHORT).await.unwrap();
    assert_eq!(out.exit.exit_code, 0, "{}", describe(&out));
    client.sync_workspace(&s).await.unwrap();
    client.delete_session(&s.id).await.unwrap();
}
