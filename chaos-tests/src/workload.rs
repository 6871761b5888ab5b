//! The workload: workers that create, re-send, get, exec in and delete
//! sessions from their own seeded RNG, recording every call in the
//! linearizability history and the outcome in the [`Ledger`].

use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use sandfleet::{proto, Client, CreateSession, ExecRequest};
use sandfleet_testkit::helpers::state_of;
use sandfleet_testkit::linearizability::{Call, EndedBy, History, Outcome, Ret};

#[derive(Debug, Default)]
pub struct Ledger {
    /// request id -> session id, for every create the cluster acknowledged.
    pub acked: BTreeMap<String, String>,
    /// request ids whose create failed: the session may or may not exist.
    pub ambiguous: BTreeSet<String>,
    /// session ids whose delete the cluster acknowledged.
    pub deleted: BTreeSet<String>,
    /// session ids a delete was sent for (acknowledged or not).
    pub delete_sent: BTreeSet<String>,
    pub violations: Vec<String>,
    pub ops: BTreeMap<&'static str, u64>,
    pub errors: BTreeMap<&'static str, u64>,
}

impl Ledger {
    pub fn op(&mut self, name: &'static str, ok: bool) {
        *self.ops.entry(name).or_default() += 1;
        if !ok {
            *self.errors.entry(name).or_default() += 1;
        }
    }
}

pub type Shared = Arc<Mutex<Ledger>>;

pub const RUN_LABEL: &str = "chaos-run";

/// The CPU each session of the workload asks for (and reserves on its node).
pub const SESSION_CPU_MILLIS: u32 = 100;

/// Millicores an agent offers so that it alone has room for every session the
/// runner keeps alive (each worker's, and the anchors of every node), twice
/// over: the move check requires the sessions of a killed node to run on the
/// survivors, which a host with few cores would otherwise not have room for.
pub fn cpu_for_all(settings: &crate::args::Settings) -> u64 {
    let live = settings.workers * settings.max_live + settings.agents * crate::nemesis::ANCHORS_PER_FAULT;
    (live as u64 * 2).max(16) * u64::from(SESSION_CPU_MILLIS)
}

pub fn spec(request_id: &str, run: &str) -> CreateSession {
    CreateSession::new()
        .request_id(request_id.to_string())
        .memory_bytes(64 << 20)
        .cpu_millis(SESSION_CPU_MILLIS)
        .pids_limit(64)
        .ttl(Duration::from_secs(900))
        .label(RUN_LABEL, run.to_string())
}

/// Anchors are only needed until their fault's move check (at most the move
/// deadline); a short TTL keeps them from filling the nodes over a long run.
pub const ANCHOR_TTL: Duration = Duration::from_secs(90);

/// How a failed call goes into the history: `Failed` only when the server
/// definitely rejected it (so it cannot have taken effect), else `Unknown`.
fn outcome_of(e: &sandfleet::Error) -> Outcome {
    use tonic::Code::*;
    match e.code() {
        Some(
            InvalidArgument | AlreadyExists | FailedPrecondition | PermissionDenied | Unauthenticated | OutOfRange
            | Unimplemented,
        ) => Outcome::Failed,
        _ => Outcome::Unknown,
    }
}

/// Whether the session has ended (TERMINATED or FAILED).
pub fn is_terminal(s: &proto::Session) -> bool {
    matches!(state_of(s), proto::SessionState::Terminated | proto::SessionState::Failed)
}

/// How a create goes into the history: `Created` with the session it
/// answered, `Unknown` for an answer without one, else as [`outcome_of`].
pub fn create_outcome(r: &Result<proto::CreateSessionResponse, sandfleet::Error>) -> Outcome {
    match r {
        Ok(resp) => match &resp.session {
            Some(s) => Outcome::Ok(Ret::Created { session_id: s.id.clone() }),
            None => Outcome::Unknown,
        },
        Err(e) => outcome_of(e),
    }
}

/// How a get or a delete goes into the history: `answered(ended)` with the
/// session it answered, `NotFound` when there is none, else as [`outcome_of`].
fn session_outcome(
    r: &Result<proto::Session, sandfleet::Error>,
    answered: impl FnOnce(Option<EndedBy>) -> Ret,
) -> Outcome {
    match r {
        Ok(s) => Outcome::Ok(answered(ended_of(s))),
        Err(e) if e.code() == Some(tonic::Code::NotFound) => Outcome::Ok(Ret::NotFound),
        Err(e) => outcome_of(e),
    }
}

fn ended_of(s: &proto::Session) -> Option<EndedBy> {
    is_terminal(s).then(|| EndedBy::from_message(&s.message))
}

/// One worker's fixed inputs.
#[derive(Clone)]
pub struct WorkerCtx {
    pub seed: u64,
    pub run: String,
    pub client: Client,
    pub ledger: Shared,
    pub history: History,
    pub stop: Arc<AtomicBool>,
    pub max_live: usize,
    pub faults: bool,
}

pub async fn worker(id: usize, ctx: WorkerCtx) {
    let WorkerCtx { seed, run, client, ledger, history, stop, max_live, faults } = ctx;
    let me = id as u64 + 1;
    let mut rng = StdRng::seed_from_u64(seed ^ (id as u64 + 1).wrapping_mul(0x9E37_79B9_7F4A_7C15));
    let mut live: Vec<String> = Vec::new();
    let mut mine: Vec<(String, String)> = Vec::new();
    let mut n = 0u64;
    while !stop.load(Ordering::Relaxed) {
        n += 1;
        let roll = rng.random_range(0..100);
        if roll < 40 || live.is_empty() {
            if live.len() >= max_live {
                let i = rng.random_range(0..live.len());
                delete(&client, &ledger, &history, me, live.swap_remove(i)).await;
                continue;
            }
            let rid = format!("chaos-{seed}-w{id}-{n}");
            let op = history.invoke(me, Call::Create { request_id: rid.clone() });
            let r = client.create_session_full(spec(&rid, &run)).await;
            history.complete(op, create_outcome(&r));
            match r {
                Ok(resp) => {
                    let mut l = ledger.lock().unwrap();
                    l.op("create", true);
                    match resp.session {
                        Some(s) => {
                            // existing=true on a fresh request id means the SDK retried
                            // after an attempt that committed but whose answer was lost
                            // (a fault): correct, as long as it is this request's session.
                            if s.request_id != rid {
                                l.violations.push(format!(
                                    "create {rid}: answered with session {} of request id {:?}",
                                    s.id, s.request_id
                                ));
                            }
                            if resp.existing {
                                l.op("create-retried-by-sdk", true);
                            }
                            l.acked.insert(rid.clone(), s.id.clone());
                            live.push(s.id.clone());
                            mine.push((rid, s.id));
                        }
                        None => l.violations.push(format!("create {rid}: response without a session")),
                    }
                }
                Err(e) => {
                    let mut l = ledger.lock().unwrap();
                    l.op("create", false);
                    l.ambiguous.insert(rid.clone());
                    eprintln!("worker {id}: create {rid} failed: {e}");
                }
            }
        } else if roll < 50 && !mine.is_empty() {
            // An idempotent retry of an acknowledged create.
            let (rid, sid) = mine[rng.random_range(0..mine.len())].clone();
            let op = history.invoke(me, Call::Create { request_id: rid.clone() });
            let r = client.create_session_full(spec(&rid, &run)).await;
            history.complete(op, create_outcome(&r));
            let mut l = ledger.lock().unwrap();
            l.op("retry-create", r.is_ok());
            if let Ok(resp) = r {
                let got = resp.session.map(|s| s.id).unwrap_or_default();
                if got != sid || !resp.existing {
                    l.violations.push(format!(
                        "retried create {rid}: got session {got:?} existing={} but the first create returned {sid}",
                        resp.existing
                    ));
                }
            }
        } else if roll < 62 && !mine.is_empty() {
            // A linearizable read of one of this worker's sessions, live or deleted.
            let (_, sid) = mine[rng.random_range(0..mine.len())].clone();
            let op = history.invoke(me, Call::Get { session_id: sid.clone() });
            let r = client.get_session(&sid).await;
            history.complete(op, session_outcome(&r, |ended| Ret::Found { ended }));
            let mut l = ledger.lock().unwrap();
            l.op("get", r.is_ok());
            if let Ok(s) = &r {
                if s.id != sid {
                    l.violations.push(format!("get {sid}: answered with session {}", s.id));
                }
            }
        } else if roll < 82 {
            let sid = live[rng.random_range(0..live.len())].clone();
            let token = format!("{}", rng.random_range(0..1_000_000u32));
            let result = async {
                let s = client.wait_running(&sid, Duration::from_secs(30)).await?;
                client
                    .exec_collect(&s, ExecRequest::argv(["echo", token.as_str()]).timeout(Duration::from_secs(20)))
                    .await
            }
            .await;
            let mut l = ledger.lock().unwrap();
            l.op("exec", result.is_ok());
            match result {
                // Under faults a session's copy can be stopped mid-exec (its node was
                // declared down, or the agent fenced itself): the exec dies with SIGKILL.
                Ok(out) if faults && out.exit.signal == 9 => l.op("exec-killed-by-fault", true),
                Ok(out) => {
                    let text = String::from_utf8_lossy(&out.stdout).into_owned();
                    if out.exit.exit_code != 0 || text != format!("{token}\n") {
                        l.violations.push(format!(
                            "exec echo {token} in {sid}: exit {:?}, stdout {text:?}, stderr {:?}",
                            out.exit,
                            String::from_utf8_lossy(&out.stderr)
                        ));
                    }
                }
                Err(e) => eprintln!("worker {id}: exec in {sid} failed: {e}"),
            }
        } else {
            let i = rng.random_range(0..live.len());
            delete(&client, &ledger, &history, me, live.swap_remove(i)).await;
        }
    }
}

pub async fn delete(client: &Client, ledger: &Shared, history: &History, me: u64, sid: String) {
    ledger.lock().unwrap().delete_sent.insert(sid.clone());
    let op = history.invoke(me, Call::Delete { session_id: sid.clone() });
    let r = client.delete_session(&sid).await;
    history.complete(op, session_outcome(&r, |ended| Ret::Deleted { ended }));
    let mut l = ledger.lock().unwrap();
    l.op("delete", r.is_ok());
    match r {
        Ok(_) => {
            l.deleted.insert(sid);
        }
        Err(e) => eprintln!("delete {sid} failed: {e}"),
    }
}
