//! mock: no Kubernetes API server can run on these machines. These tests use
//! kube-rs's documented mock-service approach instead: `tower_test::mock::pair`
//! gives a mock `Service` that `kube::Client::new(service, namespace)` wraps,
//! and the test plays the API server on the other end. It checks every request
//! the agent sends (method, path, fieldSelector, resourceVersion, the PATCH
//! body and its content type) and answers with Node objects, HTTP errors and
//! watch events as JSON lines. The mapping from a Node to the agent's hold is
//! a pure function, tested without any of this.

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use http::{Request, Response};
use kube::client::Body;
use serde_json::{json, Value};

use super::*;

type Handle = tower_test::mock::Handle<Request<Body>, Response<Body>>;
type Reply = tower_test::mock::SendResponse<Response<Body>>;

const NAME: &str = "ip-10-0-0-7.eu-west-1.compute.internal";

/// One request as the mock API server received it.
#[derive(Debug)]
struct Seen {
    method: String,
    path: String,
    query: HashMap<String, String>,
    content_type: Option<String>,
    body: Vec<u8>,
}

impl Seen {
    fn q(&self, k: &str) -> Option<&str> {
        self.query.get(k).map(String::as_str)
    }
}

fn mock() -> (kube::Client, Handle) {
    let (service, handle) = tower_test::mock::pair::<Request<Body>, Response<Body>>();
    (kube::Client::new(service, "default"), handle)
}

fn percent_decode(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        match b[i] {
            b'%' if i + 2 < b.len() => {
                out.push(u8::from_str_radix(&s[i + 1..i + 3], 16).expect("a percent escape"));
                i += 3;
            }
            b'+' => {
                out.push(b' ');
                i += 1;
            }
            c => {
                out.push(c);
                i += 1;
            }
        }
    }
    String::from_utf8(out).expect("UTF-8")
}

/// The agent's next request (within 10 s) and the handle to answer it.
async fn next(handle: &mut Handle) -> (Seen, Reply) {
    let (req, reply) = tokio::time::timeout(Duration::from_secs(10), handle.next_request())
        .await
        .expect("the agent sends a request within 10 s")
        .expect("the client is alive");
    let (parts, body) = req.into_parts();
    let query = parts
        .uri
        .query()
        .unwrap_or("")
        .split('&')
        .filter(|p| !p.is_empty())
        .map(|p| {
            let (k, v) = p.split_once('=').unwrap_or((p, ""));
            (percent_decode(k), percent_decode(v))
        })
        .collect();
    let seen = Seen {
        method: parts.method.to_string(),
        path: parts.uri.path().to_string(),
        query,
        content_type: parts.headers.get(http::header::CONTENT_TYPE).map(|v| v.to_str().unwrap().to_string()),
        body: body.collect_bytes().await.expect("the request body").to_vec(),
    };
    (seen, reply)
}

fn respond(reply: Reply, status: u16, body: Vec<u8>) {
    let resp = Response::builder()
        .status(status)
        .header(http::header::CONTENT_TYPE, "application/json")
        .body(Body::from(body))
        .unwrap();
    reply.send_response(resp);
}

fn respond_json(reply: Reply, status: u16, v: &Value) {
    respond(reply, status, serde_json::to_vec(v).unwrap());
}

/// A watch response: one JSON event a line, then the end of the stream.
fn respond_events(reply: Reply, events: &[Value]) {
    let mut body = Vec::new();
    for e in events {
        body.extend(serde_json::to_vec(e).unwrap());
        body.push(b'\n');
    }
    respond(reply, 200, body);
}

fn gone() -> Value {
    json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
           "message": "too old resource version: 10 (42)", "reason": "Expired", "code": 410})
}

/// A Node as the API server sends it.
fn node(rv: &str, unschedulable: bool, taints: &[(&str, &str)]) -> Value {
    let taints: Vec<Value> = taints.iter().map(|(k, e)| json!({"key": k, "effect": e})).collect();
    json!({
        "apiVersion": "v1",
        "kind": "Node",
        "metadata": {
            "name": NAME,
            "resourceVersion": rv,
            "labels": {"topology.kubernetes.io/zone": "eu-west-1a", "kubernetes.io/hostname": "ip-10-0-0-7"},
        },
        "spec": {"unschedulable": unschedulable, "taints": taints},
    })
}

fn typed(v: &Value) -> Node {
    serde_json::from_value(v.clone()).unwrap()
}

fn config() -> KubeNodeConfig {
    KubeNodeConfig { node_name: NAME.into(), ignore_taints: vec!["sandfleet.io/dedicated".into()] }
}

fn fast() -> Timing {
    Timing {
        request: Duration::from_secs(5),
        watch_seconds: 60,
        watch_slack: Duration::from_secs(5),
        retry: Backoff::new(Duration::from_millis(20), Duration::from_millis(100)),
        count_every: Duration::from_millis(10),
        annotate_every: Duration::from_millis(300),
    }
}

fn cordon() -> Option<pb::AgentHold> {
    Some(pb::AgentHold { cordoned: true, drain: false, reason: REASON_CORDONED.into() })
}

fn drain(reason: &str) -> Option<pb::AgentHold> {
    Some(pb::AgentHold { cordoned: true, drain: true, reason: reason.into() })
}

#[test]
fn a_node_maps_to_the_agents_hold() {
    let ignore = config().ignore_taints;
    assert_eq!(desired_hold(&Node::default(), &ignore), None, "no spec: schedulable");
    assert_eq!(desired_hold(&typed(&node("1", false, &[])), &ignore), None);
    assert_eq!(desired_hold(&typed(&node("1", true, &[])), &ignore), cordon(), "kubectl cordon");
    // NoSchedule and PreferNoSchedule taints are Kubernetes' pod placement, not a drain.
    let n = node("1", false, &[("node.kubernetes.io/unschedulable", "NoSchedule"), ("gpu", "PreferNoSchedule")]);
    assert_eq!(desired_hold(&typed(&n), &ignore), None);
    let n = node("1", false, &[("example.com/maintenance", "NoExecute")]);
    assert_eq!(desired_hold(&typed(&n), &ignore), drain("kubernetes: NoExecute taint example.com/maintenance"));
    // A drain wins over a cordon; keys sorted, each once.
    let n = node(
        "1",
        true,
        &[("node.kubernetes.io/unreachable", "NoExecute"), ("b", "NoExecute"), ("b", "NoExecute"), ("a", "NoSchedule")],
    );
    assert_eq!(
        desired_hold(&typed(&n), &ignore),
        drain("kubernetes: NoExecute taint b, node.kubernetes.io/unreachable")
    );
    // An ignored key does not drain; the cordon still counts.
    let n = node("1", true, &[("sandfleet.io/dedicated", "NoExecute")]);
    assert_eq!(desired_hold(&typed(&n), &ignore), cordon());
    assert_eq!(desired_hold(&typed(&n), &[]), drain("kubernetes: NoExecute taint sandfleet.io/dedicated"));
    // A reason never exceeds what the coordinators take.
    let long: Vec<String> = (0..20).map(|i| format!("example.com/maintenance-window-{i:02}")).collect();
    let taints: Vec<(&str, &str)> = long.iter().map(|k| (k.as_str(), "NoExecute")).collect();
    let hold = desired_hold(&typed(&node("1", false, &taints)), &[]).unwrap();
    assert!(hold.drain && hold.reason.len() <= limits::MAX_HOLD_REASON_BYTES, "{}", hold.reason.len());
    assert!(ids::validate_hold_reason(&hold.reason).is_ok());
}

#[test]
fn node_labels_merge_under_the_agents_own_and_misfits_are_skipped() {
    let mut n = node("1", false, &[]);
    n["metadata"]["labels"] = json!({
        "topology.kubernetes.io/zone": "eu-west-1a",
        "kubernetes.io/arch": "amd64",
        "node-role.kubernetes.io/worker": "",
        "team": "from-kubernetes",
        "Bad_Prefix.io/x": "1",
        "example.com/long": "v".repeat(64),
    });
    let (labels, skipped) = node_labels(&typed(&n));
    assert_eq!(labels.len(), 4, "{labels:?}");
    assert_eq!(skipped.len(), 2, "{skipped:?}");
    assert!(skipped.iter().any(|s| s.contains("Bad_Prefix.io/x")), "{skipped:?}");
    assert!(skipped.iter().any(|s| s.contains("example.com/long")), "{skipped:?}");
    let own: HashMap<String, String> =
        [("team", "ml"), ("sandfleet.node", "node-a")].into_iter().map(|(k, v)| (k.into(), v.into())).collect();
    let (merged, left_out) = merge_labels(&own, &labels);
    assert!(left_out.is_empty());
    assert_eq!(merged["team"], "ml", "the agent's --label wins");
    assert_eq!(merged["sandfleet.node"], "node-a");
    assert_eq!(merged["topology.kubernetes.io/zone"], "eu-west-1a");
    assert_eq!(merged["node-role.kubernetes.io/worker"], "");
    assert_eq!(merged.len(), 5);
    let selector: HashMap<String, String> =
        [("topology.kubernetes.io/zone".to_string(), "eu-west-1a".to_string())].into();
    assert!(ids::validate_labels("node_selector", &selector).is_ok(), "a session can select the zone");
    assert!(ids::validate_labels("labels", &merged).is_ok(), "the registration's labels pass the coordinators' check");
    // At most MAX_LABELS: the Node's are cut in key order.
    let many: BTreeMap<String, String> = (0..100).map(|i| (format!("example.com/l{i:03}"), "x".to_string())).collect();
    let (merged, left_out) = merge_labels(&own, &many);
    assert_eq!(merged.len(), limits::MAX_LABELS);
    assert_eq!(left_out.len(), 100 + 2 - limits::MAX_LABELS);
    assert!(merged.contains_key("example.com/l000") && !merged.contains_key("example.com/l099"));
}

#[tokio::test]
async fn a_missing_or_unreadable_config_is_a_precise_error() {
    let err = client(None, None).await.err().expect("no config");
    assert!(err.contains("KUBERNETES_SERVICE_HOST is not set here") && err.contains("KUBECONFIG"), "{err}");
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("nope.yaml");
    let err = client(Some(missing.clone().into_os_string()), None).await.err().expect("a missing kubeconfig");
    assert!(err.starts_with("--kube-node-name: cannot load KUBECONFIG="), "{err}");
    assert!(err.contains(&missing.display().to_string()), "{err}");
    let bad = dir.path().join("bad.yaml");
    std::fs::write(&bad, "this: [is not a kubeconfig").unwrap();
    let err = client(Some(bad.into_os_string()), Some("10.0.0.1".into())).await.err().expect("a bad kubeconfig");
    assert!(err.contains("bad.yaml"), "KUBECONFIG is used before the in-cluster config: {err}");
    // A kubeconfig that loads gives a client (nothing is called yet).
    let good = dir.path().join("good.yaml");
    std::fs::write(
        &good,
        "apiVersion: v1\nkind: Config\ncurrent-context: c\nclusters:\n- name: k\n  cluster:\n    server: https://127.0.0.1:6443\n\
         contexts:\n- name: c\n  context:\n    cluster: k\n    user: u\nusers:\n- name: u\n  user:\n    token: t\n",
    )
    .unwrap();
    assert!(client(Some(good.into_os_string()), None).await.is_ok());
}

#[test]
fn the_session_count_patch_is_a_merge_patch_of_one_annotation() {
    assert_eq!(sessions_patch(3), json!({"metadata": {"annotations": {"sandfleet.io/sessions": "3"}}}));
}

/// The GET the follower sends: checked, then answered with `body`.
async fn serve_get(handle: &mut Handle, body: &Value) {
    let (seen, reply) = next(handle).await;
    assert_eq!(
        (seen.method.as_str(), seen.path.as_str()),
        ("GET", format!("/api/v1/nodes/{NAME}").as_str()),
        "{seen:?}"
    );
    assert_eq!(seen.q("watch"), None, "{seen:?}");
    respond_json(reply, 200, body);
}

/// The WATCH the follower sends: narrowed to its Node, from `rv`. Returns the reply handle.
async fn expect_watch(handle: &mut Handle, rv: &str) -> Reply {
    let (seen, reply) = next(handle).await;
    assert_eq!(
        (seen.method.as_str(), seen.path.as_str()),
        ("GET", "/api/v1/nodes"),
        "a watch, never a get or list: {seen:?}"
    );
    assert_eq!(seen.q("watch"), Some("true"), "{seen:?}");
    assert_eq!(seen.q("fieldSelector"), Some(format!("metadata.name={NAME}").as_str()), "{seen:?}");
    assert_eq!(seen.q("resourceVersion"), Some(rv), "{seen:?}");
    assert_eq!(seen.q("timeoutSeconds"), Some("60"), "{seen:?}");
    reply
}

async fn wait_hold(rx: &mut watch::Receiver<Option<pb::AgentHold>>, want: Option<pb::AgentHold>) {
    let waited = tokio::time::timeout(Duration::from_secs(5), rx.wait_for(|h| *h == want)).await.map(|r| r.is_ok());
    assert_eq!(waited, Ok(true), "the hold never became {want:?}; it is {:?}", *rx.borrow());
}

#[tokio::test]
async fn the_watch_loop_follows_cordon_taint_and_starts_over_after_410_gone() {
    let (client, mut api) = mock();
    let follower = NodeFollower::new(client, &config(), fast());
    let hold = Arc::new(watch::Sender::new(None));
    let mut rx = hold.subscribe();
    let shutdown = CancellationToken::new();
    let task = tokio::spawn({
        let (hold, shutdown) = (hold.clone(), shutdown.clone());
        async move { follower.follow(&hold, shutdown).await }
    });

    // GET, then a WATCH from its resourceVersion; `kubectl cordon` arrives as MODIFIED.
    serve_get(&mut api, &node("10", false, &[])).await;
    let reply = expect_watch(&mut api, "10").await;
    assert_eq!(*rx.borrow_and_update(), None);
    respond_events(reply, &[json!({"type": "MODIFIED", "object": node("11", true, &[])})]);
    wait_hold(&mut rx, cordon()).await;

    // The stream ended: GET again, and watch from there. A NoExecute taint drains.
    serve_get(&mut api, &node("12", true, &[])).await;
    let reply = expect_watch(&mut api, "12").await;
    let tainted = node("13", true, &[("example.com/maintenance", "NoExecute")]);
    respond_events(
        reply,
        &[json!({"type": "ADDED", "object": node("12", true, &[])}), json!({"type": "MODIFIED", "object": tainted})],
    );
    wait_hold(&mut rx, drain("kubernetes: NoExecute taint example.com/maintenance")).await;

    // The watch expires: a 410 Gone ERROR event makes the agent read the Node again.
    serve_get(&mut api, &node("13", true, &[("example.com/maintenance", "NoExecute")])).await;
    let reply = expect_watch(&mut api, "13").await;
    respond_events(reply, &[json!({"type": "ERROR", "object": gone()})]);
    // Taint removed and uncordoned meanwhile: the re-GET lifts the hold.
    serve_get(&mut api, &node("40", false, &[])).await;
    wait_hold(&mut rx, None).await;

    // A WATCH refused with HTTP 410 also starts over with a GET.
    let reply = expect_watch(&mut api, "40").await;
    respond_json(reply, 410, &gone());
    serve_get(&mut api, &node("41", false, &[])).await;

    // A failed GET is retried (with backoff) and changes nothing.
    let reply = expect_watch(&mut api, "41").await;
    respond_json(reply, 500, &json!({"kind": "Status", "status": "Failure", "message": "etcd", "code": 500}));
    let (seen, reply) = next(&mut api).await;
    assert_eq!(seen.path, format!("/api/v1/nodes/{NAME}"));
    respond_json(reply, 503, &json!({"kind": "Status", "status": "Failure", "message": "busy", "code": 503}));
    serve_get(&mut api, &node("42", true, &[])).await;
    wait_hold(&mut rx, cordon()).await;

    // Shutdown ends the loop while a watch is open (its answer never comes).
    let (_seen, _reply) = next(&mut api).await;
    shutdown.cancel();
    tokio::time::timeout(Duration::from_secs(2), task).await.expect("the loop ends on shutdown").unwrap();
}

#[tokio::test]
async fn a_deleted_node_drains_and_an_unanswered_watch_starts_over() {
    let (client, mut api) = mock();
    let mut timing = fast();
    timing.watch_seconds = 1;
    timing.request = Duration::from_millis(500);
    let follower = NodeFollower::new(client, &config(), timing);
    let hold = Arc::new(watch::Sender::new(None));
    let mut rx = hold.subscribe();
    let shutdown = CancellationToken::new();
    let task = tokio::spawn({
        let (hold, shutdown) = (hold.clone(), shutdown.clone());
        async move { follower.follow(&hold, shutdown).await }
    });
    serve_get(&mut api, &node("5", false, &[])).await;
    let (seen, reply) = next(&mut api).await;
    assert_eq!(seen.q("timeoutSeconds"), Some("1"));
    respond_events(reply, &[json!({"type": "DELETED", "object": node("6", false, &[])})]);
    wait_hold(&mut rx, drain(REASON_DELETED)).await;
    serve_get(&mut api, &node("7", false, &[])).await;
    wait_hold(&mut rx, None).await;
    // A WATCH that never answers: after the request deadline the agent gives up on it
    // and, after a backoff, reads the Node again.
    let (_seen, _never_answered) = next(&mut api).await;
    let started = std::time::Instant::now();
    let (seen, reply) = next(&mut api).await;
    assert!(started.elapsed() >= Duration::from_millis(500), "gave up too soon: {:?}", started.elapsed());
    assert_eq!(seen.path, format!("/api/v1/nodes/{NAME}"), "read again: {seen:?}");
    respond_json(reply, 200, &node("8", false, &[]));
    shutdown.cancel();
    tokio::time::timeout(Duration::from_secs(2), task).await.expect("the loop ends on shutdown").unwrap();
}

#[tokio::test]
async fn the_session_count_annotation_is_a_debounced_merge_patch() {
    let (client, mut api) = mock();
    let follower = NodeFollower::new(client, &config(), fast());
    let count = Arc::new(AtomicUsize::new(0));
    let shutdown = CancellationToken::new();
    let task = tokio::spawn(follower.annotate(
        {
            let count = count.clone();
            move || count.load(Ordering::SeqCst)
        },
        shutdown.clone(),
    ));
    let expect_patch = |seen: &Seen, n: usize| {
        assert_eq!((seen.method.as_str(), seen.path.as_str()), ("PATCH", format!("/api/v1/nodes/{NAME}").as_str()));
        assert_eq!(seen.content_type.as_deref(), Some("application/merge-patch+json"), "{seen:?}");
        assert_eq!(seen.q("fieldManager"), Some(FIELD_MANAGER), "{seen:?}");
        let body: Value = serde_json::from_slice(&seen.body).unwrap();
        assert_eq!(body, json!({"metadata": {"annotations": {"sandfleet.io/sessions": n.to_string()}}}));
    };
    // At start, the current count.
    let (seen, reply) = next(&mut api).await;
    // Taken when the test reads the first patch, a moment after the agent sent
    // it and started its 300 ms interval: the bound below leaves that moment out.
    let first = std::time::Instant::now();
    expect_patch(&seen, 0);
    respond_json(reply, 200, &node("1", false, &[]));
    // Changes within the debounce interval are written once, with the latest count.
    count.store(1, Ordering::SeqCst);
    tokio::time::sleep(Duration::from_millis(50)).await;
    count.store(2, Ordering::SeqCst);
    let (seen, reply) = next(&mut api).await;
    // Undebounced, the change would be written about 50 ms in.
    assert!(first.elapsed() >= Duration::from_millis(250), "not debounced: {:?}", first.elapsed());
    expect_patch(&seen, 2);
    // A failed write is tried again.
    respond_json(reply, 500, &json!({"kind": "Status", "status": "Failure", "message": "x", "code": 500}));
    let (seen, reply) = next(&mut api).await;
    expect_patch(&seen, 2);
    respond_json(reply, 200, &node("2", false, &[]));
    // No change, no write.
    let quiet = tokio::time::timeout(Duration::from_millis(700), api.next_request()).await;
    assert!(quiet.is_err(), "a PATCH without a change");
    shutdown.cancel();
    tokio::time::timeout(Duration::from_secs(2), task).await.expect("the loop ends on shutdown").unwrap();
}
