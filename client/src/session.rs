//! Building session creates, and naming session states.

use std::time::Duration;

use crate::proto;

/// A session create: the idempotency key plus the spec.
///
/// The SDK sends the same `request_id` on every retry of one
/// [`Client::create_session`](crate::Client::create_session) call, so a retried
/// create never makes a second session. Reuse a `CreateSession` (or its
/// `request_id`) yourself to make your own retries idempotent too.
#[derive(Debug, Clone, PartialEq)]
pub struct CreateSession {
    /// Client-chosen idempotency key, 1-128 of `[A-Za-z0-9._:-]`.
    pub request_id: String,
    /// What to run. Zero fields take the server defaults.
    pub spec: proto::SessionSpec,
    /// Claim an idle sandbox of this warm pool instead (the spec stays empty).
    pub pool: Option<String>,
}

impl Default for CreateSession {
    fn default() -> Self {
        Self::new()
    }
}

impl CreateSession {
    /// A create with a fresh random request id (`sdk-<uuid>`) and an all-default spec.
    pub fn new() -> Self {
        Self { request_id: format!("sdk-{}", uuid::Uuid::new_v4()), spec: proto::SessionSpec::default(), pool: None }
    }

    /// Claims an idle sandbox of warm pool `name` (of the caller's tenant):
    /// RUNNING at once, or started cold from the pool's spec when the pool
    /// has none idle (`CreateSessionResponse.claimed` tells which). The
    /// spec must stay empty: a pool's sandboxes run the pool's spec.
    pub fn pool(mut self, name: impl Into<String>) -> Self {
        self.pool = Some(name.into());
        self
    }

    /// Sets the idempotency key.
    pub fn request_id(mut self, id: impl Into<String>) -> Self {
        self.request_id = id.into();
        self
    }

    /// Sets the sandbox template (e.g. `default`, `python`).
    pub fn template(mut self, template: impl Into<String>) -> Self {
        self.spec.template = template.into();
        self
    }

    /// Sets the CPU limit in millicores (1000 = one core).
    pub fn cpu_millis(mut self, millis: u32) -> Self {
        self.spec.cpu_millis = millis;
        self
    }

    /// Sets the CPU the session reserves on its node for placement, in
    /// millicores (a Kubernetes CPU request; at most the CPU limit).
    pub fn cpu_request_millis(mut self, millis: u32) -> Self {
        self.spec.cpu_request_millis = millis;
        self
    }

    /// Sets the memory limit in bytes.
    pub fn memory_bytes(mut self, bytes: u64) -> Self {
        self.spec.memory_bytes = bytes;
        self
    }

    /// Sets the disk quota in bytes (the workspace's filesystem size).
    pub fn disk_bytes(mut self, bytes: u64) -> Self {
        self.spec.disk_bytes = bytes;
        self
    }

    /// Sets the most files, directories and symlinks the session may have.
    pub fn disk_inodes(mut self, inodes: u64) -> Self {
        self.spec.disk_inodes = inodes;
        self
    }

    /// Sets the process/thread limit.
    pub fn pids_limit(mut self, pids: u32) -> Self {
        self.spec.pids_limit = pids;
        self
    }

    /// Sets the time to live (whole seconds, rounded up).
    pub fn ttl(mut self, ttl: Duration) -> Self {
        self.spec.ttl_seconds = ceil_secs(ttl);
        self
    }

    /// Adds a label.
    pub fn label(mut self, key: impl Into<String>, value: impl Into<String>) -> Self {
        self.spec.labels.insert(key.into(), value.into());
        self
    }

    /// Requires a node label (repeatable): only nodes carrying every selected
    /// label can run the session.
    pub fn node_selector(mut self, key: impl Into<String>, value: impl Into<String>) -> Self {
        self.spec.node_selector.insert(key.into(), value.into());
        self
    }

    /// Requires a runtime ("process", "docker" or "cri", see
    /// [`sandfleet_common::spec::Runtime`]); by default any runtime offering
    /// the template will do.
    pub fn runtime(mut self, runtime: impl Into<String>) -> Self {
        self.spec.runtime = runtime.into();
        self
    }

    /// Ends the session after this long without exec or file calls (whole
    /// seconds, rounded up).
    pub fn idle_timeout(mut self, idle: Duration) -> Self {
        self.spec.idle_timeout_seconds = ceil_secs(idle);
        self
    }

    /// How long the session's node may be silent before the session is
    /// declared LOST and placed elsewhere (default: the cluster's node TTL).
    pub fn lost_after(mut self, d: Duration) -> Self {
        self.spec.restart_policy.get_or_insert_with(Default::default).lost_after_ms = d.as_millis() as u64;
        self
    }

    /// How many times the session may be placed again after losing its node
    /// (0: without limit).
    pub fn max_attempts(mut self, n: u32) -> Self {
        self.spec.restart_policy.get_or_insert_with(Default::default).max_attempts = n;
        self
    }

    /// Delay before the first placement after a loss; it doubles per loss, up to 60 s.
    pub fn restart_backoff(mut self, d: Duration) -> Self {
        self.spec.restart_policy.get_or_insert_with(Default::default).backoff_ms = d.as_millis() as u64;
        self
    }

    /// Adds an environment variable given to every exec in the session.
    pub fn env(mut self, key: impl Into<String>, value: impl Into<String>) -> Self {
        self.spec.env.insert(key.into(), value.into());
        self
    }

    /// The wire request.
    /// Runs the checks the server runs on a create (the shared definition in
    /// [`sandfleet_common::spec`]); the error carries the server's status code.
    /// Bounds that depend on the cluster's settings are left to the server.
    pub fn validate(&self) -> Result<(), crate::Error> {
        let check = || -> Result<(), sandfleet_common::ValidationError> {
            sandfleet_common::ids::validate_request_id(&self.request_id)?;
            if let Some(pool) = &self.pool {
                sandfleet_common::ids::validate_dns_label("pool", pool)?;
                if self.spec != proto::SessionSpec::default() {
                    return Err(sandfleet_common::ValidationError::invalid(
                        "spec",
                        "give a spec or a pool, not both (a pool's sandboxes run the pool's spec)",
                    ));
                }
                return Ok(());
            }
            sandfleet_common::spec::SessionSpec::precheck(&self.spec, &Default::default())?;
            Ok(())
        };
        check().map_err(|e| crate::Error::Status(e.into()))
    }

    /// The wire request.
    pub fn into_proto(self) -> proto::CreateSessionRequest {
        proto::CreateSessionRequest {
            request_id: self.request_id,
            spec: self.pool.is_none().then_some(self.spec),
            pool: self.pool.unwrap_or_default(),
        }
    }
}

/// Whole seconds, rounded up (so a 500 ms ttl is 1 s, not "server default").
pub(crate) fn ceil_secs(d: Duration) -> u64 {
    d.as_secs() + u64::from(d.subsec_nanos() > 0)
}

/// The short name of a session state: `PENDING`, `RUNNING`, `LOST`, `TERMINATED`,
/// `FAILED`, `UNSPECIFIED`, or `UNKNOWN` for a value this SDK does not know.
pub fn state_name(state: i32) -> &'static str {
    match proto::SessionState::try_from(state) {
        Ok(s) => s.as_str_name().trim_start_matches("SESSION_STATE_"),
        Err(_) => "UNKNOWN",
    }
}

/// Parses a state name: `running`, `RUNNING` or `SESSION_STATE_RUNNING`.
pub fn parse_state(s: &str) -> Option<proto::SessionState> {
    let upper = s.trim().to_ascii_uppercase();
    let full = if upper.starts_with("SESSION_STATE_") { upper } else { format!("SESSION_STATE_{upper}") };
    proto::SessionState::from_str_name(&full)
}

/// True for states a session never leaves (TERMINATED, FAILED).
pub fn is_terminal(state: i32) -> bool {
    matches!(proto::SessionState::try_from(state), Ok(proto::SessionState::Terminated | proto::SessionState::Failed))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn builder_fills_spec() {
        let c = CreateSession::new()
            .template("python")
            .cpu_millis(500)
            .memory_bytes(256 << 20)
            .pids_limit(64)
            .ttl(Duration::from_millis(1500))
            .label("team", "ml")
            .env("A", "1");
        assert!(c.request_id.starts_with("sdk-"));
        assert_ne!(c.request_id, CreateSession::new().request_id);
        assert_eq!(c.spec.template, "python");
        assert_eq!(c.spec.cpu_millis, 500);
        assert_eq!(c.spec.memory_bytes, 256 << 20);
        assert_eq!(c.spec.pids_limit, 64);
        assert_eq!(c.spec.ttl_seconds, 2);
        assert_eq!(c.spec.labels["team"], "ml");
        assert_eq!(c.spec.env["A"], "1");
        let req = c.request_id("r1").into_proto();
        assert_eq!(req.request_id, "r1");
    }

    #[test]
    fn state_names() {
        assert_eq!(state_name(proto::SessionState::Running as i32), "RUNNING");
        assert_eq!(state_name(99), "UNKNOWN");
        assert_eq!(parse_state("running"), Some(proto::SessionState::Running));
        assert_eq!(parse_state("SESSION_STATE_FAILED"), Some(proto::SessionState::Failed));
        assert_eq!(parse_state("bogus"), None);
        assert!(is_terminal(proto::SessionState::Terminated as i32));
        assert!(!is_terminal(proto::SessionState::Lost as i32));
    }
}
