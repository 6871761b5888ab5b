//! The agent's Kubernetes Node, when it runs as a DaemonSet pod and is started
//! with `--kube-node-name NAME` (NAME from the downward API's `spec.nodeName`).
//!
//! - At start the agent reads (GET) its Node: the Node's labels become node
//!   labels (under the agent's own `--label`s, which win), so a session's
//!   `--node-selector topology.kubernetes.io/zone=a` works; what the Node asks
//!   of placement goes with the registration.
//! - Then it follows the Node with a WATCH from that resourceVersion, narrowed
//!   by `fieldSelector=metadata.name=NAME` (the RBAC grants get, watch and
//!   patch on nodes, never list: kube-runtime's watcher would LIST). On 410
//!   Gone, a closed or silent stream, or an error, it reads the Node again and
//!   watches from there, with backoff. Every request has a deadline; the loop
//!   ends with the agent's shutdown token.
//! - [`desired_hold`] maps the Node to the agent's hold on its Sandfleet node:
//!   a NoExecute taint drains it (its sessions move elsewhere, as `sandfleet
//!   node drain` moves them), `spec.unschedulable` (`kubectl cordon`) cordons
//!   it, neither lifts the agent's hold. The control loop sends the hold to the
//!   coordinators (AgentService.SetNodeSchedulable); an operator's own cordon
//!   or drain is a separate hold that the agent never lifts.
//! - It writes the annotation `sandfleet.io/sessions: "<count>"` (a JSON merge
//!   PATCH) when its running session count changes, at most once per
//!   [`Timing::annotate_every`].

use std::collections::{BTreeMap, HashMap};
use std::ffi::OsString;
use std::time::Duration;

use futures::StreamExt;
use k8s_openapi::api::core::v1::Node;
use kube::api::{Api, Patch, PatchParams, WatchEvent, WatchParams};
use kube::ResourceExt;
use sandfleet_common::backoff::Backoff;
use sandfleet_common::{ids, limits};
use sandfleet_proto::v1 as pb;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

/// The Node annotation that holds the node's running session count.
pub const SESSIONS_ANNOTATION: &str = "sandfleet.io/sessions";
/// The field manager of the agent's PATCHes (server-side bookkeeping of who wrote a field).
pub const FIELD_MANAGER: &str = "sandfleet-agent";
/// The hold's reason for a cordoned Node.
pub const REASON_CORDONED: &str = "kubernetes: node cordoned";
/// The hold's reason for a deleted Node (its sessions move elsewhere).
pub const REASON_DELETED: &str = "kubernetes: node deleted";
/// The in-cluster service account token the in-cluster config reads.
const SERVICE_ACCOUNT_TOKEN: &str = "/var/run/secrets/kubernetes.io/serviceaccount/token";

/// What `--kube-node-name` and `--kube-ignore-taint` configure.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KubeNodeConfig {
    /// The Kubernetes Node this agent runs on (`spec.nodeName`).
    pub node_name: String,
    /// NoExecute taint keys that do not drain the node (a taint that keeps
    /// other pods off nodes dedicated to Sandfleet, which the DaemonSet tolerates).
    pub ignore_taints: Vec<String>,
}

/// Deadlines and pauses of the Node follower.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Timing {
    /// Deadline of a GET or PATCH, and of a WATCH's response headers.
    pub request: Duration,
    /// How long the API server keeps one WATCH open (`timeoutSeconds`).
    pub watch_seconds: u32,
    /// A WATCH silent for `watch_seconds` plus this long is taken as broken.
    pub watch_slack: Duration,
    /// Retries after a failure: this backoff (jittered).
    pub retry: Backoff,
    /// How often the running session count is looked at.
    pub count_every: Duration,
    /// The annotation is written at most once per this long.
    pub annotate_every: Duration,
}

impl Default for Timing {
    fn default() -> Self {
        Timing {
            request: Duration::from_secs(10),
            watch_seconds: 290,
            watch_slack: Duration::from_secs(30),
            retry: Backoff::new(Duration::from_millis(500), Duration::from_secs(30)).with_floor_percent(50),
            count_every: Duration::from_secs(1),
            annotate_every: Duration::from_secs(5),
        }
    }
}

/// A Kubernetes API failure, as the agent reports it.
#[derive(Debug, thiserror::Error)]
pub enum KubeError {
    #[error("{what} of Node {node:?} did not answer within {after:?}")]
    Timeout { what: &'static str, node: String, after: Duration },
    #[error("{what} of Node {node:?} failed: {source}")]
    Api {
        what: &'static str,
        node: String,
        #[source]
        source: kube::Error,
    },
}

impl KubeError {
    /// The API server's status code, when it answered with one.
    pub fn code(&self) -> Option<u16> {
        match self {
            KubeError::Api { source: kube::Error::Api(s), .. } => Some(s.code),
            _ => None,
        }
    }
}

/// A client for the Kubernetes API: from `KUBECONFIG` when it is set, else
/// the in-cluster config of the pod's service account. `kubeconfig` and
/// `service_host` are the values of `KUBECONFIG` and `KUBERNETES_SERVICE_HOST`.
/// A config that is missing or does not load is an error that says which and why.
pub async fn client(kubeconfig: Option<OsString>, service_host: Option<OsString>) -> Result<kube::Client, String> {
    let config = match (kubeconfig, service_host) {
        (Some(paths), _) => {
            let cannot = |e: &dyn std::fmt::Display| {
                format!("--kube-node-name: cannot load KUBECONFIG={}: {e}", paths.to_string_lossy())
            };
            // A list of files, as kubectl reads it: the first to set a value wins.
            let mut merged: Option<kube::config::Kubeconfig> = None;
            for path in std::env::split_paths(&paths).filter(|p| !p.as_os_str().is_empty()) {
                let one = kube::config::Kubeconfig::read_from(&path)
                    .map_err(|e| cannot(&format!("{}: {e}", path.display())))?;
                merged = Some(match merged {
                    None => one,
                    Some(m) => m.merge(one).map_err(|e| cannot(&e))?,
                });
            }
            let kubeconfig = merged.ok_or_else(|| cannot(&"no file named"))?;
            kube::Config::from_custom_kubeconfig(kubeconfig, &kube::config::KubeConfigOptions::default())
                .await
                .map_err(|e| cannot(&e))?
        }
        (None, Some(_)) => {
            let config = kube::Config::incluster().map_err(|e| {
                format!("--kube-node-name: cannot load the in-cluster config of the pod's service account: {e}")
            })?;
            std::fs::metadata(SERVICE_ACCOUNT_TOKEN).map_err(|e| {
                format!(
                    "--kube-node-name: cannot read the service account token {SERVICE_ACCOUNT_TOKEN}: {e} \
                     (is automountServiceAccountToken off?)"
                )
            })?;
            config
        }
        (None, None) => {
            return Err("--kube-node-name needs the Kubernetes API: run the agent in a pod with a service account \
                        (KUBERNETES_SERVICE_HOST is not set here) or set KUBECONFIG"
                .into())
        }
    };
    kube::Client::try_from(config).map_err(|e| format!("--kube-node-name: cannot make a Kubernetes client: {e}"))
}

/// The Node's labels that are valid node labels; the others, each with why,
/// to be logged and skipped (never fatal).
pub fn node_labels(node: &Node) -> (BTreeMap<String, String>, Vec<String>) {
    let mut ok = BTreeMap::new();
    let mut skipped = Vec::new();
    for (k, v) in node.labels() {
        match ids::validate_label_key("labels", k).and_then(|()| ids::validate_label_value("labels", k, v)) {
            Ok(()) => {
                ok.insert(k.clone(), v.clone());
            }
            Err(e) => skipped.push(e.to_string()),
        }
    }
    (ok, skipped)
}

/// The node's labels: the agent's own (`--label`, and `sandfleet.node`),
/// then the Kubernetes Node's under them (the agent's win on the same key),
/// in key order while fewer than [`limits::MAX_LABELS`]. Returns the labels
/// and the Node's labels left out for the limit.
pub fn merge_labels(
    own: &HashMap<String, String>,
    from_node: &BTreeMap<String, String>,
) -> (HashMap<String, String>, Vec<String>) {
    let mut labels = own.clone();
    let mut left_out = Vec::new();
    for (k, v) in from_node {
        if labels.contains_key(k) {
            continue;
        }
        if labels.len() >= limits::MAX_LABELS {
            left_out.push(k.clone());
            continue;
        }
        labels.insert(k.clone(), v.clone());
    }
    (labels, left_out)
}

/// What the Node asks of Sandfleet placement on this node: a drain for a
/// NoExecute taint (whose key is not ignored), a cordon for
/// `spec.unschedulable` (`kubectl cordon`), else nothing. The reason names
/// the taints or the cordon, at most [`limits::MAX_HOLD_REASON_BYTES`].
pub fn desired_hold(node: &Node, ignore_taints: &[String]) -> Option<pb::AgentHold> {
    let spec = node.spec.as_ref();
    let mut keys: Vec<&str> = spec
        .and_then(|s| s.taints.as_ref())
        .into_iter()
        .flatten()
        .filter(|t| t.effect == "NoExecute" && !ignore_taints.contains(&t.key))
        .map(|t| t.key.as_str())
        .collect();
    keys.sort_unstable();
    keys.dedup();
    if !keys.is_empty() {
        let reason = format!("kubernetes: NoExecute taint {}", keys.join(", "));
        return Some(pb::AgentHold { cordoned: true, drain: true, reason: clip(reason) });
    }
    if spec.and_then(|s| s.unschedulable).unwrap_or(false) {
        return Some(pb::AgentHold { cordoned: true, drain: false, reason: REASON_CORDONED.into() });
    }
    None
}

/// `s` cut to the longest hold reason, on a character boundary.
fn clip(mut s: String) -> String {
    if s.len() > limits::MAX_HOLD_REASON_BYTES {
        let mut end = limits::MAX_HOLD_REASON_BYTES;
        while !s.is_char_boundary(end) {
            end -= 1;
        }
        s.truncate(end);
    }
    s
}

/// The JSON merge patch that sets the session count annotation.
pub fn sessions_patch(count: usize) -> serde_json::Value {
    serde_json::json!({ "metadata": { "annotations": { SESSIONS_ANNOTATION: count.to_string() } } })
}

/// The agent's view of its Node through the API server.
#[derive(Clone)]
pub struct NodeFollower {
    api: Api<Node>,
    name: String,
    ignore_taints: Vec<String>,
    timing: Timing,
}

impl NodeFollower {
    pub fn new(client: kube::Client, config: &KubeNodeConfig, timing: Timing) -> Self {
        NodeFollower {
            api: Api::all(client),
            name: config.node_name.clone(),
            ignore_taints: config.ignore_taints.clone(),
            timing,
        }
    }

    /// The Node's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// What `node` asks of placement (see [`desired_hold`]).
    pub fn hold_of(&self, node: &Node) -> Option<pb::AgentHold> {
        desired_hold(node, &self.ignore_taints)
    }

    /// GET the Node, within the request deadline.
    pub async fn get(&self) -> Result<Node, KubeError> {
        let node = self.name.clone();
        match tokio::time::timeout(self.timing.request, self.api.get(&self.name)).await {
            Ok(Ok(n)) => Ok(n),
            Ok(Err(source)) => Err(KubeError::Api { what: "GET", node, source }),
            Err(_) => Err(KubeError::Timeout { what: "GET", node, after: self.timing.request }),
        }
    }

    /// Reads the Node at start, retrying with backoff for at most `patience`;
    /// `None` when the shutdown token fired first.
    pub async fn get_at_start(
        &self,
        patience: Duration,
        shutdown: &CancellationToken,
    ) -> Option<Result<Node, KubeError>> {
        let deadline = tokio::time::Instant::now() + patience;
        let mut attempt = 0;
        loop {
            let result = tokio::select! {
                _ = shutdown.cancelled() => return None,
                r = self.get() => r,
            };
            match result {
                Ok(n) => return Some(Ok(n)),
                Err(e) if tokio::time::Instant::now() >= deadline => return Some(Err(e)),
                Err(e) => {
                    let wait = self.timing.retry.delay(attempt);
                    attempt += 1;
                    tracing::warn!(error = %e, retry_in = ?wait, "cannot read this agent's Kubernetes Node yet; retrying");
                    tokio::select! {
                        _ = shutdown.cancelled() => return None,
                        _ = tokio::time::sleep(wait) => {}
                    }
                }
            }
        }
    }

    /// Sets the session count annotation (a JSON merge PATCH), within the request deadline.
    pub async fn annotate_sessions(&self, count: usize) -> Result<(), KubeError> {
        let params = PatchParams { field_manager: Some(FIELD_MANAGER.into()), ..Default::default() };
        let patch = Patch::Merge(sessions_patch(count));
        let node = self.name.clone();
        match tokio::time::timeout(self.timing.request, self.api.patch(&self.name, &params, &patch)).await {
            Ok(Ok(_)) => Ok(()),
            Ok(Err(source)) => Err(KubeError::Api { what: "PATCH", node, source }),
            Err(_) => Err(KubeError::Timeout { what: "PATCH", node, after: self.timing.request }),
        }
    }

    /// Follows the Node until `shutdown`: GET, then WATCH from its
    /// resourceVersion; each version of the Node sets `hold` to what it asks
    /// (see [`desired_hold`]; a deleted Node drains the node). A 410 Gone, a
    /// stream that ends, stays silent past its timeout, or fails, starts over
    /// with a GET: at once after a 410 or a normal end, after a backoff otherwise.
    pub async fn follow(self, hold: &watch::Sender<Option<pb::AgentHold>>, shutdown: CancellationToken) {
        let mut failures = 0u32;
        loop {
            let started = tokio::time::Instant::now();
            let outcome = tokio::select! {
                _ = shutdown.cancelled() => return,
                o = self.follow_once(hold) => o,
            };
            let wait = match outcome {
                // A watch that ends at once again and again gets a short pause.
                Restart::Now if started.elapsed() < Duration::from_secs(1) => self.timing.retry.delay(0),
                Restart::Now => {
                    failures = 0;
                    Duration::ZERO
                }
                Restart::After(e) => {
                    let wait = self.timing.retry.delay(failures);
                    failures = failures.saturating_add(1);
                    tracing::warn!(error = %e, retry_in = ?wait, "following this agent's Kubernetes Node failed; retrying");
                    wait
                }
            };
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tokio::time::sleep(wait) => {}
            }
        }
    }

    /// One GET and the WATCH after it, until the watch must start over.
    async fn follow_once(&self, hold: &watch::Sender<Option<pb::AgentHold>>) -> Restart {
        let node = match self.get().await {
            Ok(n) => n,
            Err(e) => return Restart::After(e.to_string()),
        };
        self.set(hold, self.hold_of(&node));
        let mut version = node.resource_version().unwrap_or_default();
        let params =
            WatchParams::default().fields(&format!("metadata.name={}", self.name)).timeout(self.timing.watch_seconds);
        let stream = match tokio::time::timeout(self.timing.request, self.api.watch(&params, &version)).await {
            Err(_) => return Restart::After(format!("WATCH did not answer within {:?}", self.timing.request)),
            Ok(Err(kube::Error::Api(s))) if s.code == 410 => {
                tracing::info!(%version, "the Node's resourceVersion is too old to watch from (410 Gone); reading it again");
                return Restart::Now;
            }
            Ok(Err(e)) => return Restart::After(format!("WATCH failed: {e}")),
            Ok(Ok(s)) => s,
        };
        let mut stream = std::pin::pin!(stream);
        let silence = Duration::from_secs(self.timing.watch_seconds.into()) + self.timing.watch_slack;
        loop {
            let event = match tokio::time::timeout(silence, stream.next()).await {
                Err(_) => return Restart::After(format!("the WATCH was silent for {silence:?}")),
                Ok(None) => {
                    tracing::debug!(%version, "the Node's watch ended; reading it again");
                    return Restart::Now;
                }
                Ok(Some(Err(e))) => return Restart::After(format!("the WATCH broke: {e}")),
                Ok(Some(Ok(event))) => event,
            };
            match event {
                WatchEvent::Added(n) | WatchEvent::Modified(n) => {
                    version = n.resource_version().unwrap_or(version);
                    self.set(hold, self.hold_of(&n));
                }
                WatchEvent::Deleted(n) => {
                    version = n.resource_version().unwrap_or(version);
                    tracing::warn!(node = %self.name, "this agent's Kubernetes Node was deleted; draining");
                    self.set(hold, Some(pb::AgentHold { cordoned: true, drain: true, reason: REASON_DELETED.into() }));
                }
                WatchEvent::Bookmark(b) => version = b.metadata.resource_version,
                WatchEvent::Error(s) if s.code == 410 => {
                    tracing::info!(%version, "the Node's watch expired (410 Gone); reading it again");
                    return Restart::Now;
                }
                WatchEvent::Error(s) => return Restart::After(format!("the WATCH sent an error: {s}")),
            }
        }
    }

    /// Publishes `want` when it differs from the current hold.
    fn set(&self, hold: &watch::Sender<Option<pb::AgentHold>>, want: Option<pb::AgentHold>) {
        hold.send_if_modified(|current| {
            if *current == want {
                return false;
            }
            tracing::info!(
                node = %self.name,
                cordoned = want.as_ref().is_some_and(|h| h.cordoned),
                drain = want.as_ref().is_some_and(|h| h.drain),
                reason = want.as_ref().map_or("", |h| h.reason.as_str()),
                "the Kubernetes Node changes what this node takes"
            );
            *current = want;
            true
        });
    }

    /// Writes the session count annotation whenever `count()` changes, at
    /// most once per [`Timing::annotate_every`], until `shutdown` (a failed
    /// write is tried again at the next change or interval).
    pub async fn annotate(self, count: impl Fn() -> usize + Send, shutdown: CancellationToken) {
        let mut written: Option<usize> = None;
        let mut last_try: Option<tokio::time::Instant> = None;
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tokio::time::sleep(self.timing.count_every) => {}
            }
            let n = count();
            if written == Some(n) || last_try.is_some_and(|t| t.elapsed() < self.timing.annotate_every) {
                continue;
            }
            last_try = Some(tokio::time::Instant::now());
            let result = tokio::select! {
                _ = shutdown.cancelled() => return,
                r = self.annotate_sessions(n) => r,
            };
            match result {
                Ok(()) => {
                    tracing::debug!(sessions = n, "wrote the session count on the Kubernetes Node");
                    written = Some(n);
                }
                Err(e) => tracing::warn!(error = %e, "cannot write the session count on the Kubernetes Node"),
            }
        }
    }
}

/// How a watch ended.
enum Restart {
    /// Read the Node again at once (410 Gone, or the watch's normal end).
    Now,
    /// Read it again after a backoff; the text says what failed.
    After(String),
}

#[cfg(test)]
mod tests;
