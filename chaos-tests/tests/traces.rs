//! Traces that cross processes: one `sandfleet run` on the docker runtime
//! (so the executor runs, inside the session's container) is one trace that
//! joins the spans of the CLI, the coordinator, the agent and the executor,
//! each span's parent in the trace, exported to a test OTLP receiver.
//!
//! How these tests run and what they need: see `common/mod.rs`.

#[macro_use]
mod common;

use std::time::Duration;

use sandfleet_testkit::otlp::{orphans, render, OtlpReceiver, ReceivedSpan};
use sandfleet_testkit::ClusterBuilder;

use common::{show, start};

/// The spans one `sandfleet run` must yield: (service, span name).
const EXPECTED: &[(&str, &str)] = &[
    ("sandfleet-cli", "run"),
    ("sandfleet-cli", "create_session"),
    ("sandfleet-cli", "exec"),
    ("sandfleet-cli", "delete_session"),
    ("sandfleet-coordinator", "create_session"),
    ("sandfleet-coordinator", "raft.commit"),
    ("sandfleet-coordinator", "placement"),
    ("sandfleet-coordinator", "delete_session"),
    ("sandfleet-agent", "session.start"),
    ("sandfleet-agent", "sandbox.prepare"),
    ("sandfleet-agent", "workspace.restore"),
    ("sandfleet-agent", "exec"),
    ("sandfleet-executor", "executor.exec"),
];

fn missing(spans: &[ReceivedSpan]) -> Vec<(&'static str, &'static str)> {
    EXPECTED
        .iter()
        .copied()
        .filter(|(service, name)| !spans.iter().any(|s| s.service == *service && s.name == *name))
        .collect()
}

fn parent_of<'a>(spans: &'a [ReceivedSpan], s: &ReceivedSpan) -> Option<&'a ReceivedSpan> {
    spans.iter().find(|p| p.span_id == s.parent_span_id)
}

/// The one span of `service` named `name`, or the first of several.
fn find<'a>(spans: &'a [ReceivedSpan], service: &str, name: &str) -> &'a ReceivedSpan {
    spans.iter().find(|s| s.service == service && s.name == name).expect("checked present")
}

/// Whether `s` descends from a span of `service` named `name`.
fn descends_from(spans: &[ReceivedSpan], s: &ReceivedSpan, service: &str, name: &str) -> bool {
    let mut cur = parent_of(spans, s);
    while let Some(p) = cur {
        if p.service == service && p.name == name {
            return true;
        }
        cur = parent_of(spans, p);
    }
    false
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn one_run_is_one_trace_across_the_cli_coordinator_agent_and_executor() {
    require_facilities!();
    if !sandfleet_testkit::require_docker() {
        return;
    }
    traced_run(1, false).await;
}

/// Through a follower: the create is forwarded to the leader (the forward
/// carries the context) and the leader loop places the session later, from
/// the traceparent kept in the session record.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn through_a_follower_the_forward_and_the_leaders_placement_join_the_trace() {
    require_facilities!();
    if !sandfleet_testkit::require_docker() {
        return;
    }
    let spans = traced_run(3, true).await;
    let tree = render(&spans);
    let placements = spans.iter().filter(|s| s.service == "sandfleet-coordinator" && s.name == "placement").count();
    assert!(placements >= 2, "the follower's placement try and the leader loop's placement: {tree}");
    assert!(
        spans.iter().any(|s| s.service == "sandfleet-coordinator"
            && s.name == "grpc"
            && parent_of(&spans, s).is_some_and(|p| p.name == "raft.commit")),
        "the leader's span of the forwarded proposal is a child of the follower's raft.commit: {tree}"
    );
}

/// One `sandfleet run --verbose` against a cluster of `coordinators` (through
/// a follower when `via_follower`) whose processes all export to a test
/// receiver; checks the trace and returns its spans.
async fn traced_run(coordinators: usize, via_follower: bool) -> Vec<ReceivedSpan> {
    let image = sandfleet_testkit::facilities::sandbox_image();
    let otlp = OtlpReceiver::start().await.expect("the OTLP receiver starts");
    let cluster = start(
        ClusterBuilder::new()
            .coordinators(coordinators)
            .agents(1)
            .agent_args(["--runtime", "docker", "--template-image", &format!("default={image}")])
            // Every daemon exports to the receiver, as it reaches the host.
            .env("OTEL_EXPORTER_OTLP_ENDPOINT", otlp.endpoint_for("{host}"))
            .env("OTEL_BSP_SCHEDULE_DELAY", "200"),
    )
    .await;

    let endpoint = if via_follower {
        let status = cluster.client().await.cluster_status().await.expect("cluster status");
        let follower = status.members.iter().find(|m| m.id != status.leader_id && m.id != 0).expect("a follower");
        follower.address.clone()
    } else {
        cluster.endpoint()
    };
    let mut cmd = tokio::process::Command::new(sandfleet_testkit::bin_path("sandfleet"));
    cmd.args(["--endpoint", &endpoint, "--verbose", "run", "--timeout", "30s", "--", "sh", "-c", "echo traced"])
        .envs(cluster.cli_env())
        .env_remove("SANDFLEET_API_KEY")
        .env_remove("RUST_LOG")
        .env("OTEL_EXPORTER_OTLP_ENDPOINT", otlp.endpoint_for("127.0.0.1"))
        .stdin(std::process::Stdio::null())
        .kill_on_drop(true);
    let out = tokio::time::timeout(Duration::from_secs(120), cmd.output())
        .await
        .expect("sandfleet run finishes within 120 s")
        .expect("sandfleet runs");
    assert_eq!(out.status.code(), Some(0), "{}", show(&out));
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "traced", "{}", show(&out));
    let stderr = String::from_utf8_lossy(&out.stderr);
    let trace_id = stderr
        .lines()
        .find_map(|l| l.strip_prefix("trace id: "))
        .map(str::trim)
        .unwrap_or_else(|| panic!("--verbose prints the trace id: {}", show(&out)))
        .to_string();
    assert!(
        trace_id.len() == 32 && trace_id.bytes().all(|b| b.is_ascii_hexdigit() && !b.is_ascii_uppercase()),
        "a W3C trace id: {trace_id:?}"
    );

    // Complete: every expected span arrived, and every span's parent is in the
    // trace but the CLI's root (a parent still open would show as an orphan).
    let done = |spans: &[ReceivedSpan]| missing(spans).is_empty() && orphans(spans).len() == 1;
    let spans = match otlp.wait_trace(&trace_id, Duration::from_secs(30), done).await {
        Ok(spans) => spans,
        Err(spans) => panic!(
            "trace {trace_id} is incomplete after 30 s: missing {:?}; spans whose parent is not in the trace: {:?}\n{}\n\
             every service seen: {:?}",
            missing(&spans),
            orphans(&spans).iter().map(|s| (&s.service, &s.name, &s.parent_span_id)).collect::<Vec<_>>(),
            render(&spans),
            otlp.spans().iter().map(|s| s.service.clone()).collect::<std::collections::BTreeSet<_>>(),
        ),
    };
    let tree = render(&spans);

    // The one root is the CLI's `run`, with no parent at all.
    let roots = orphans(&spans);
    assert_eq!(roots.len(), 1, "{tree}");
    assert_eq!((roots[0].service.as_str(), roots[0].name.as_str()), ("sandfleet-cli", "run"), "{tree}");
    assert!(roots[0].parent_span_id.is_empty(), "{tree}");

    // Correct parents across each process boundary.
    let coordinator_create = find(&spans, "sandfleet-coordinator", "create_session");
    assert!(descends_from(&spans, coordinator_create, "sandfleet-cli", "create_session"), "{tree}");
    for name in ["raft.commit", "placement"] {
        let s = find(&spans, "sandfleet-coordinator", name);
        assert!(descends_from(&spans, s, "sandfleet-coordinator", "create_session"), "{name}: {tree}");
    }
    // The agent's start is in the create's trace through the Assignment.
    let start = find(&spans, "sandfleet-agent", "session.start");
    assert_eq!(parent_of(&spans, start).map(|p| p.service.as_str()), Some("sandfleet-coordinator"), "{tree}");
    for name in ["sandbox.prepare", "workspace.restore"] {
        let s = find(&spans, "sandfleet-agent", name);
        assert_eq!(parent_of(&spans, s).map(|p| p.span_id.as_str()), Some(start.span_id.as_str()), "{name}: {tree}");
    }
    // The exec: the CLI's call -> the agent's exec -> the executor's span inside the container.
    let executor = find(&spans, "sandfleet-executor", "executor.exec");
    let parent = parent_of(&spans, executor).expect("the executor span has its parent");
    assert_eq!((parent.service.as_str(), parent.name.as_str()), ("sandfleet-agent", "exec"), "{tree}");
    assert!(descends_from(&spans, parent, "sandfleet-cli", "exec"), "{tree}");
    assert!(
        parent.start_unix_nanos <= executor.start_unix_nanos && executor.end_unix_nanos <= parent.end_unix_nanos,
        "the executor's span lies within the agent's exec span: {parent:?} {executor:?}"
    );
    let delete = find(&spans, "sandfleet-coordinator", "delete_session");
    assert!(descends_from(&spans, delete, "sandfleet-cli", "delete_session"), "{tree}");
    spans
}
