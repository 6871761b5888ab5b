//! The encoding of Raft log entries and of the messages coordinators send
//! each other: one version byte, then the body.
//!
//! | first byte | body |
//! |---|---|
//! | `0x01` | MessagePack with field names (`rmp_serde::to_vec_named`) |
//! | `{`, `[`, `"`, `n`, whitespace | JSON: what every member wrote before the version byte existed |
//!
//! Writers always write the newest version; readers read every version, so
//! logs written before (and messages from a member that still writes JSON)
//! load unchanged. Field names keep the format self-describing, so the
//! `#[serde(default)]` fields that let old records load keep working, at a
//! fraction of JSON's size and encoding cost.

use serde::de::DeserializeOwned;
use serde::Serialize;

/// The version byte of MessagePack with field names.
pub const V1_MSGPACK: u8 = 0x01;

/// Encoding or decoding failed.
#[derive(Debug, thiserror::Error)]
pub enum CodecError {
    #[error("encoding: {0}")]
    Encode(#[from] rmp_serde::encode::Error),
    #[error("decoding MessagePack: {0}")]
    Decode(#[from] rmp_serde::decode::Error),
    #[error("decoding JSON: {0}")]
    Json(#[from] serde_json::Error),
    #[error("unknown encoding version byte {0:#04x}")]
    UnknownVersion(u8),
    #[error("empty payload")]
    Empty,
}

/// The two encodings a peer may speak.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    /// The newest version ([`V1_MSGPACK`]).
    Binary,
    /// JSON: what members before the version byte speak.
    Json,
}

impl Format {
    /// The format `bytes` are in (an empty payload counts as JSON, the old default).
    pub fn of(bytes: &[u8]) -> Self {
        if bytes.first() == Some(&V1_MSGPACK) {
            Format::Binary
        } else {
            Format::Json
        }
    }

    /// Encodes `v` in this format.
    pub fn encode<T: Serialize + ?Sized>(self, v: &T) -> Result<Vec<u8>, CodecError> {
        match self {
            Format::Binary => encode(v),
            Format::Json => Ok(serde_json::to_vec(v)?),
        }
    }
}

/// Encodes `v` in the newest version.
pub fn encode<T: Serialize + ?Sized>(v: &T) -> Result<Vec<u8>, CodecError> {
    let mut out = Vec::with_capacity(128);
    out.push(V1_MSGPACK);
    rmp_serde::encode::write_named(&mut out, v)?;
    Ok(out)
}

/// Decodes any version.
pub fn decode<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, CodecError> {
    match bytes.first() {
        None => Err(CodecError::Empty),
        Some(&V1_MSGPACK) => Ok(rmp_serde::from_slice(&bytes[1..])?),
        Some(b'{' | b'[' | b'"' | b'n' | b't' | b'f' | b' ' | b'\t' | b'\r' | b'\n' | b'-' | b'0'..=b'9') => {
            Ok(serde_json::from_slice(bytes)?)
        }
        Some(&other) => Err(CodecError::UnknownVersion(other)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::raft::TypeConfig;
    use crate::state::{
        fixtures::spec, ApiKeyRecord, Command, CommandResponse, DrainRecord, HoldBy, NodePhase, NodeRecord,
        PendingReason, Placement, Report, Resources, SessionPhase, SessionRecord, TenantRecord,
    };
    use openraft::{CommittedLeaderId, Entry, EntryPayload, LogId, Membership};
    use sandfleet_common::auth::{Role, DEFAULT_TENANT};

    fn session(reason: PendingReason) -> SessionRecord {
        SessionRecord {
            id: "s1".into(),
            spec: spec(250),
            phase: SessionPhase::Lost,
            node_id: Some("n1".into()),
            generation: 3,
            request_id: "r1".into(),
            created_at_ms: 1,
            expires_at_ms: 100,
            updated_at_ms: 2,
            pending_reason: reason,
            message: "m".into(),
            restarts: 1,
            not_before_ms: 7,
            moved_from: Some("n0".into()),
            renewed_at_ms: 5,
            tenant: DEFAULT_TENANT.into(),
            traceparent: "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01".into(),
            pool: String::new(),
            claimed_at_ms: 0,
        }
    }

    fn node() -> NodeRecord {
        NodeRecord {
            images: Default::default(),
            id: "n1".into(),
            address: "127.0.0.1:1".into(),
            capacity: Resources { cpu_millis: 2000, memory_bytes: 1 << 30, slots: 10 },
            labels: [("zone".to_string(), "a".to_string())].into(),
            runtimes: vec![sandfleet_common::spec::Runtime::Process, sandfleet_common::spec::Runtime::Docker],
            phase: NodePhase::Ready,
            registered_at_ms: 3,
            drain: None,
            operator_hold: None,
            agent_hold: None,
        }
    }

    /// One of every kind of command, with the fields that carry the most shape.
    fn commands() -> Vec<Command> {
        let reasons = [
            PendingReason::None,
            PendingReason::Paused,
            PendingReason::NodeLost { node: "n1".into(), backoff_ms: 250 },
            PendingReason::FilledUp { node: "n1".into() },
            PendingReason::NoLabels { nodes: 2, runtimes: "process".into(), labels: "a=b".into() },
            PendingReason::NoRoom(Default::default()),
            PendingReason::Other("an old free-text reason".into()),
        ];
        let mut cmds: Vec<Command> = reasons
            .iter()
            .cloned()
            .map(|r| Command::CreateSession { session: session(r), key_id: Some("k".into()) })
            .collect();
        cmds.extend([
            Command::InitCluster { signing_seed: vec![0, 1, 255, 7] },
            Command::TerminateSessions { ids: vec!["a".into()], message: "bye".into(), now_ms: 1, tenant: None },
            Command::RenewSession { id: "a".into(), expires_at_ms: 9, now_ms: 1, tenant: Some("t".into()) },
            Command::RegisterNode { node: node() },
            Command::NodeDown { node_id: "n1".into(), now_ms: 4, keep: vec!["x".into()] },
            Command::NodeUp { node_id: "n1".into(), now_ms: 5 },
            Command::CordonNode {
                node_id: "n1".into(),
                cordoned: true,
                by: HoldBy::Agent,
                reason: "disk".into(),
                now_ms: 6,
            },
            Command::PlaceSessions {
                placements: vec![Placement { id: "a".into(), node_id: "n1".into(), expected_generation: 2 }],
                now_ms: 7,
            },
            Command::SetPendingReasons {
                reasons: reasons.iter().map(|r| ("a".to_string(), r.clone())).collect(),
                now_ms: 8,
            },
            Command::ReportSessions {
                node_id: "n1".into(),
                reports: vec![Report {
                    id: "a".into(),
                    generation: 2,
                    phase: SessionPhase::Running,
                    message: String::new(),
                }],
                now_ms: 9,
            },
            Command::SessionsLost { node_id: "n1".into(), ids: vec!["a".into()], now_ms: 10 },
            Command::DrainNode {
                node_id: "n1".into(),
                drain: DrainRecord { started_at_ms: 1, deadline_ms: 2, max_parallel: 3 },
                by: HoldBy::Operator,
                reason: String::new(),
            },
            Command::MoveSessions { node_id: "n1".into(), ids: vec!["a".into()], now_ms: 11 },
            Command::SetSchedulerPaused { paused: true },
            Command::CreateTenant {
                tenant: TenantRecord { name: "t".into(), quota: Default::default(), created_at_ms: 1 },
            },
            Command::DeleteTenant { name: "t".into(), now_ms: 12 },
            Command::CreateApiKey {
                key: ApiKeyRecord {
                    id: "0123456789abcdef".into(),
                    tenant: "t".into(),
                    role: Role::Admin,
                    secret_hash: "h".into(),
                    created_at_ms: 1,
                    expires_at_ms: 0,
                    revoked_at_ms: 0,
                },
            },
            Command::RevokeApiKey { id: "0123456789abcdef".into(), now_ms: 13 },
        ]);
        cmds
    }

    #[test]
    fn every_command_round_trips_and_is_smaller_than_json() {
        for cmd in commands() {
            let bin = encode(&cmd).unwrap();
            assert_eq!(bin[0], V1_MSGPACK);
            let back: Command = decode(&bin).unwrap();
            assert_eq!(format!("{back:?}"), format!("{cmd:?}"));
            assert!(bin.len() <= serde_json::to_vec(&cmd).unwrap().len(), "{cmd:?}");
        }
        let batch = Command::Batch { commands: commands() };
        let back: Command = decode(&encode(&batch).unwrap()).unwrap();
        assert_eq!(format!("{back:?}"), format!("{batch:?}"));
        let responses = CommandResponse::Batch(vec![
            CommandResponse::Ok,
            CommandResponse::Existing(session(PendingReason::None)),
            CommandResponse::KeyRefused,
            CommandResponse::Rejected("no".into()),
        ]);
        let back: CommandResponse = decode(&encode(&responses).unwrap()).unwrap();
        assert_eq!(back, responses);
    }

    #[test]
    fn log_entries_written_as_json_before_still_load() {
        let entries: Vec<Entry<TypeConfig>> = vec![
            Entry { log_id: LogId::new(CommittedLeaderId::new(2, 1), 5), payload: EntryPayload::Blank },
            Entry {
                log_id: LogId::new(CommittedLeaderId::new(2, 1), 6),
                payload: EntryPayload::Normal(Command::Batch { commands: commands() }),
            },
            Entry {
                log_id: LogId::new(CommittedLeaderId::new(2, 1), 7),
                payload: EntryPayload::Membership(Membership::new(
                    vec![[1u64, 2, 3].into_iter().collect()],
                    [(1u64, crate::raft::Member { addr: "a:1".into() })]
                        .into_iter()
                        .collect::<std::collections::BTreeMap<_, _>>(),
                )),
            },
        ];
        for e in &entries {
            let old = serde_json::to_vec(e).unwrap();
            let from_old: Entry<TypeConfig> = decode(&old).unwrap();
            let from_new: Entry<TypeConfig> = decode(&encode(e).unwrap()).unwrap();
            assert_eq!(format!("{from_old:?}"), format!("{e:?}"));
            assert_eq!(format!("{from_new:?}"), format!("{e:?}"));
        }
    }

    #[test]
    fn garbage_is_an_error_not_a_panic() {
        assert!(matches!(decode::<Command>(&[]), Err(CodecError::Empty)));
        assert!(matches!(decode::<Command>(&[0x7f, 1, 2]), Err(CodecError::UnknownVersion(0x7f))));
        assert!(matches!(decode::<Command>(&[V1_MSGPACK, 0xc1]), Err(CodecError::Decode(_))));
        assert!(matches!(decode::<Command>(b"{\"nope\":1}"), Err(CodecError::Json(_))));
    }
}
