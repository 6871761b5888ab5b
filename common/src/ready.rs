//! The ready line: one JSON object a Sandfleet process prints on stdout once it
//! serves, so that whatever started it (the test harness, a supervisor script)
//! learns the address it bound without parsing logs.
//!
//! ```text
//! {"ready":"coordinator","id":1,"addr":"127.0.0.1:41234"}
//! {"ready":"coordinator","id":2,"addr":"10.0.0.2:7070","health":"10.0.0.2:7079"}
//! {"ready":"agent","node_id":"n1","addr":"127.0.0.1:41235"}
//! {"ready":"s3","addr":"127.0.0.1:41236"}
//! ```
//!
//! `sandfleet dev` prints a line for people instead, starting with
//! [`DEV_READY_PREFIX`].

use serde::{Deserialize, Serialize};

/// What `sandfleet dev` prints on stdout once it serves, before the
/// `http://<addr>` endpoint of its coordinator.
pub const DEV_READY_PREFIX: &str = "sandfleet dev ready: endpoint ";

/// The ready line of a process, tagged by the `"ready"` member.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "ready", rename_all = "lowercase")]
pub enum ReadyLine {
    /// `sandfleet-coordinator`: its Raft id, the gRPC address it serves on,
    /// and its `--health-listen` address if it has one.
    Coordinator {
        id: u64,
        addr: String,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        health: Option<String>,
        /// Its `--metrics-listen` address, if it has one.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        metrics: Option<String>,
    },
    /// `sandfleet-agent`: its node id, the gRPC address it serves on, and its
    /// `--health-listen` address if it has one.
    Agent {
        node_id: String,
        addr: String,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        health: Option<String>,
        /// Its `--metrics-listen` address, if it has one.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        metrics: Option<String>,
    },
    /// `sandfleet-s3-server` (test support): the address of its S3 endpoint.
    S3 { addr: String },
}

impl ReadyLine {
    /// The line as printed: one JSON object, no newline.
    pub fn to_line(&self) -> String {
        serde_json::to_string(self).expect("a ready line always serializes")
    }

    /// Reads a line of a process's stdout. `None` when the line is not a ready
    /// line at all (not a JSON object with a `"ready"` member); an error when
    /// it claims to be one but is malformed (unknown role, missing field).
    pub fn parse(line: &str) -> Option<Result<Self, serde_json::Error>> {
        let value: serde_json::Value = serde_json::from_str(line.trim()).ok()?;
        value.get("ready")?;
        Some(serde_json::from_value(value))
    }

    /// The `"ready"` tag: `coordinator`, `agent` or `s3`.
    pub fn role(&self) -> &'static str {
        match self {
            ReadyLine::Coordinator { .. } => "coordinator",
            ReadyLine::Agent { .. } => "agent",
            ReadyLine::S3 { .. } => "s3",
        }
    }

    /// The address the process serves on.
    pub fn addr(&self) -> &str {
        match self {
            ReadyLine::Coordinator { addr, .. } | ReadyLine::Agent { addr, .. } | ReadyLine::S3 { addr } => addr,
        }
    }

    /// The metrics listener's address (`--metrics-listen`), if any.
    pub fn metrics(&self) -> Option<&str> {
        match self {
            ReadyLine::Coordinator { metrics, .. } | ReadyLine::Agent { metrics, .. } => metrics.as_deref(),
            ReadyLine::S3 { .. } => None,
        }
    }

    /// The plaintext health listener's address (`--health-listen`), if any.
    pub fn health(&self) -> Option<&str> {
        match self {
            ReadyLine::Coordinator { health, .. } | ReadyLine::Agent { health, .. } => health.as_deref(),
            ReadyLine::S3 { .. } => None,
        }
    }
}

impl std::fmt::Display for ReadyLine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.to_line())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lines_round_trip_with_the_documented_shape() {
        let lines = [
            (
                ReadyLine::Coordinator { id: 1, addr: "127.0.0.1:1".into(), health: None, metrics: None },
                r#"{"ready":"coordinator","id":1,"addr":"127.0.0.1:1"}"#,
            ),
            (
                ReadyLine::Coordinator {
                    id: 2,
                    addr: "10.0.0.1:7070".into(),
                    health: Some("10.0.0.1:7079".into()),
                    metrics: None,
                },
                r#"{"ready":"coordinator","id":2,"addr":"10.0.0.1:7070","health":"10.0.0.1:7079"}"#,
            ),
            (
                ReadyLine::Agent { node_id: "n1".into(), addr: "10.0.0.2:7".into(), health: None, metrics: None },
                r#"{"ready":"agent","node_id":"n1","addr":"10.0.0.2:7"}"#,
            ),
            (ReadyLine::S3 { addr: "127.0.0.1:9".into() }, r#"{"ready":"s3","addr":"127.0.0.1:9"}"#),
        ];
        for (ready, text) in lines {
            assert_eq!(ready.to_line(), text);
            assert_eq!(ReadyLine::parse(text).unwrap().unwrap(), ready);
        }
    }

    #[test]
    fn other_lines_are_not_ready_lines() {
        assert!(ReadyLine::parse("not json, ignored").is_none());
        assert!(ReadyLine::parse(r#"{"level":"info","msg":"ready"}"#).is_none());
        assert!(ReadyLine::parse("[1,2]").is_none());
    }

    #[test]
    fn malformed_ready_lines_are_errors() {
        assert!(ReadyLine::parse(r#"{"ready":"gateway","addr":"x"}"#).unwrap().is_err());
        assert!(ReadyLine::parse(r#"{"ready":"agent","addr":"x"}"#).unwrap().is_err());
        assert!(ReadyLine::parse(r#"{"ready":"coordinator","id":"one","addr":"x"}"#).unwrap().is_err());
    }
}
