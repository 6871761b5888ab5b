//! A linearizability checker for the session API's create / get / delete
//! history, used by the chaos runner.
//!
//! # What it checks
//!
//! The chaos runner records every `CreateSession`, `GetSession` and
//! `DeleteSession` call it makes (who made it, when it was sent, when and how
//! it finished) in a [`History`]. [`History::check`] then decides whether that
//! history is *linearizable*: whether every operation can be given a single
//! instant between its invocation and its response such that, taken in that
//! order, the responses are the ones a single, sequential session store would
//! have given. A stale read, a lost acknowledged create, a delete that is
//! undone, or an idempotent retry that answers with another session all make
//! the history non-linearizable.
//!
//! Only linearizable reads belong in the history: a `GetSession` with
//! `READ_CONSISTENCY_STALE` may legitimately lag, and must not be recorded.
//!
//! # Model
//!
//! The history is split by *key*, the request id of the session an operation
//! is about (P-compositionality: a history is linearizable iff each key's
//! sub-history is, because sessions are independent objects). A create is
//! keyed by its request id; a get or delete names a session id, which is keyed
//! by the request id whose acknowledged create returned that session id. A
//! session id that no acknowledged create returned gets a key of its own, on
//! which only `NOT_FOUND` is legal (see [`History::operations`] for the exact
//! key strings). A session id returned for two different request ids is itself
//! a violation.
//!
//! Each key is a small state machine ([`SessionModel`], [`KeyState`]):
//!
//! | call -> answer                | legal in                     | next state                |
//! |-------------------------------|------------------------------|---------------------------|
//! | create -> `Created(sid)`      | `NotCreated`                 | `Live(sid)`               |
//! |                               | `Live(sid)`, `Ended(sid, _)` | unchanged (retry)         |
//! | get -> `NotFound`             | `NotCreated`                 | unchanged                 |
//! | get -> live                   | `Live(sid)`                  | unchanged                 |
//! | get -> ended by client        | `Ended(sid, Client)`         | unchanged                 |
//! | get -> ended spontaneously    | `Live(sid)`                  | `Ended(sid, Spontaneous)` |
//! |                               | `Ended(sid, Spontaneous)`    | unchanged                 |
//! | delete -> `NotFound`          | `NotCreated`                 | unchanged                 |
//! | delete -> ended by client     | `Live(sid)`                  | `Ended(sid, Client)`      |
//! |                               | `Ended(sid, Client)`         | unchanged                 |
//! | delete -> ended spontaneously | `Live(sid)`                  | `Ended(sid, Spontaneous)` |
//! |                               | `Ended(sid, Spontaneous)`    | unchanged                 |
//!
//! A spontaneous end (TTL expiry, failure) needs no client operation, so it is
//! taken at the moment a get or delete first observes it: "live" is the more
//! permissive state, and nothing is lost by ending the session as late as
//! possible. A delete of a session that already ended answers with the
//! session as it is, so its answer says how the session ended; that is why
//! [`Ret::Deleted`] carries an [`EndedBy`] like [`Ret::Found`] does.
//!
//! An operation that finished with an *unknown* outcome (timeout, or
//! `UNAVAILABLE` after the request may have been sent) may have taken effect at
//! any instant after its invocation, or never: its response time is treated as
//! +infinity, and it may be linearized with any answer the model allows, or
//! left out. A create whose answer was lost does not reveal the session id, so
//! the model keeps the id unbound (`Live { id: None }`) until a later operation
//! names it. Operations that failed *definitely* (the server rejected them, or
//! they never left the client) are dropped before checking.
//!
//! # Algorithm
//!
//! The search is the Wing & Gong algorithm with Lowe's memoization, as in
//! Porcupine (anishathalye/porcupine) and Knossos. For one key, the
//! invocations and responses are put in a doubly linked list ordered by time
//! (an invocation sorts before a response at the same instant, so touching
//! operations count as concurrent; unknown responses go last). The search walks
//! the list: at an invocation it tries to linearize that operation next (the
//! model must accept it) and, if so, removes the operation from the list and
//! starts again from the front; at a response of an operation not yet
//! linearized it backtracks, undoing the last choice. Reaching the response of
//! an unknown-outcome operation means every definite operation is linearized:
//! success. Every configuration reached, (set of linearized operations as a
//! bitset, model state), is remembered, and a configuration seen before is not
//! explored again. An unknown-outcome operation is not linearized where it
//! would leave the state unchanged (that is the same as leaving it out, and it
//! stays available for later), so that unknown reads and repeated retries do
//! not multiply the configurations. This keeps the search small on the
//! histories that occur in practice; the worst case remains exponential in the
//! number of operations concurrent on one key.
//!
//! The search is bounded: each key may take at most
//! [`CheckConfig::max_steps_per_key`] steps. A key that runs out is reported
//! as [`CheckResult::Unknown`], never as a pass. A key found illegal is
//! reported with its operations and the longest linearizable prefix the
//! search found ([`CheckResult::Illegal`]).
//!
//! The core ([`Model`], [`Operation`], [`check_operations`]) is generic; the
//! session API is one [`Model`] of it.
//!
//! # Recording
//!
//! ```
//! use sandfleet_testkit::linearizability::{Call, CheckResult, History, Outcome, Ret};
//!
//! let history = History::new(); // Clone it into every task.
//! let op = history.invoke(1, Call::Create { request_id: "r1".into() });
//! // ... send the request, await the answer ...
//! history.complete(op, Outcome::Ok(Ret::Created { session_id: "s1".into() }));
//! let op = history.invoke(2, Call::Get { session_id: "s1".into() });
//! history.complete(op, Outcome::Ok(Ret::Found { ended: None }));
//! assert_eq!(history.check(), CheckResult::Ok);
//! ```

use parking_lot::Mutex;
use std::collections::{BTreeMap, HashMap, HashSet};
use std::fmt::{self, Debug, Write as _};
use std::hash::Hash;
use std::sync::Arc;
use std::time::{Duration, Instant};

// ---------------------------------------------------------------------------
// Generic core
// ---------------------------------------------------------------------------

/// A sequential specification: the object's state, and which (input, output)
/// pairs each state allows.
pub trait Model {
    /// The state of one key. Compared and hashed to memoize the search.
    type State: Clone + Eq + Hash + Debug;
    /// What an operation asks for.
    type Input: Debug;
    /// What an operation answered.
    type Output: Debug;

    /// The state before any operation.
    fn init(&self) -> Self::State;

    /// The state after `input` takes effect in `state` and answers `output`,
    /// or `None` if the specification does not allow that answer in that state.
    ///
    /// `output` is `None` when the outcome is unknown: then the step must
    /// return the state after the operation took effect with some answer the
    /// specification allows (or `None` if it cannot take effect at all). The
    /// model must be deterministic, and when several answers are possible it
    /// must return a state that allows everything the others allow. The
    /// checker itself covers the possibility that the operation never took
    /// effect, and does not linearize an unknown-outcome operation at a point
    /// where its step returns the state unchanged (it stays pending instead).
    fn step(&self, state: &Self::State, input: &Self::Input, output: Option<&Self::Output>) -> Option<Self::State>;
}

/// One operation of a history, as the checker sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Operation<I, O> {
    /// The independent object the operation is about. Operations of
    /// different keys are checked separately.
    pub key: String,
    /// The client (process, task) that made the call; for explanations only.
    pub client: u64,
    /// What was asked.
    pub input: I,
    /// When the call was invoked, from the history's origin.
    pub call: Duration,
    /// How it finished.
    pub completion: Completion<O>,
}

/// How an [`Operation`] finished.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Completion<O> {
    /// It answered `output` at `at` (from the history's origin). A time
    /// before the call is treated as the call time.
    Returned {
        /// When the answer arrived.
        at: Duration,
        /// The answer.
        output: O,
    },
    /// It definitely did not take effect; the checker ignores it.
    Failed,
    /// It may have taken effect at any time after its call, or never.
    Unknown,
}

impl<O> Completion<O> {
    /// The answer, if there is a definite one.
    fn output(&self) -> Option<&O> {
        match self {
            Completion::Returned { output, .. } => Some(output),
            Completion::Failed | Completion::Unknown => None,
        }
    }
}

/// Limits of the search.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CheckConfig {
    /// The most search steps spent on one key before giving up on it with
    /// [`CheckResult::Unknown`]. A step is one visit of an invocation or a
    /// response in the search.
    pub max_steps_per_key: u64,
}

impl CheckConfig {
    /// The default of [`CheckConfig::max_steps_per_key`].
    pub const DEFAULT_MAX_STEPS_PER_KEY: u64 = 5_000_000;
}

impl Default for CheckConfig {
    fn default() -> Self {
        Self { max_steps_per_key: Self::DEFAULT_MAX_STEPS_PER_KEY }
    }
}

/// The verdict on a history.
#[derive(Debug, Clone, PartialEq, Eq)]
#[must_use]
pub enum CheckResult {
    /// Every key's sub-history is linearizable.
    Ok,
    /// `key`'s sub-history is not linearizable (the first such key in key
    /// order; other keys may be illegal too).
    Illegal {
        /// The key.
        key: String,
        /// Human-readable: the key's operations with their times and answers,
        /// and the longest linearizable prefix the search found.
        explanation: String,
    },
    /// No key was found illegal, but the search gave up on these keys after
    /// `max_steps_per_key` steps each: the history was *not* shown linearizable.
    Unknown {
        /// The keys whose search ran out of steps.
        keys: Vec<String>,
        /// The step budget per key that was exhausted.
        max_steps_per_key: u64,
    },
}

impl CheckResult {
    /// True only for [`CheckResult::Ok`].
    pub fn is_ok(&self) -> bool {
        matches!(self, CheckResult::Ok)
    }

    /// True for [`CheckResult::Illegal`].
    pub fn is_illegal(&self) -> bool {
        matches!(self, CheckResult::Illegal { .. })
    }
}

impl fmt::Display for CheckResult {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            CheckResult::Ok => write!(f, "linearizable"),
            CheckResult::Illegal { key, explanation } => {
                write!(f, "not linearizable ({key}):\n{explanation}")
            }
            CheckResult::Unknown { keys, max_steps_per_key } => write!(
                f,
                "unknown: the search gave up after {max_steps_per_key} steps on {} key(s): {}",
                keys.len(),
                keys.join(", ")
            ),
        }
    }
}

/// Checks `ops` against `model` with the default [`CheckConfig`].
pub fn check_operations<M: Model>(model: &M, ops: &[Operation<M::Input, M::Output>]) -> CheckResult {
    check_operations_with(model, ops, &CheckConfig::default())
}

/// Checks `ops` against `model`: partitions them by [`Operation::key`], drops
/// the [`Completion::Failed`] ones, and searches each key for a linearization.
///
/// Keys are checked in ascending order; the first illegal key is reported.
/// In explanations, `#n` is the operation's index in `ops`.
pub fn check_operations_with<M: Model>(
    model: &M,
    ops: &[Operation<M::Input, M::Output>],
    config: &CheckConfig,
) -> CheckResult {
    let mut partitions: BTreeMap<&str, Vec<usize>> = BTreeMap::new();
    for (index, op) in ops.iter().enumerate() {
        if !matches!(op.completion, Completion::Failed) {
            partitions.entry(op.key.as_str()).or_default().push(index);
        }
    }
    let mut out_of_budget = Vec::new();
    for (key, indices) in partitions {
        let part: Vec<&Operation<M::Input, M::Output>> = indices.iter().map(|&i| &ops[i]).collect();
        match search(model, &part, config.max_steps_per_key) {
            Search::Linearizable => {}
            Search::OutOfBudget => out_of_budget.push(key.to_owned()),
            Search::Illegal { longest } => {
                return CheckResult::Illegal {
                    key: key.to_owned(),
                    explanation: explain(model, key, &indices, &part, &longest),
                };
            }
        }
    }
    if out_of_budget.is_empty() {
        CheckResult::Ok
    } else {
        CheckResult::Unknown { keys: out_of_budget, max_steps_per_key: config.max_steps_per_key }
    }
}

/// What the search of one key concluded.
enum Search {
    Linearizable,
    /// No linearization; `longest` is the longest linearizable prefix found,
    /// as indices into the key's operations, in linearization order.
    Illegal {
        longest: Vec<usize>,
    },
    OutOfBudget,
}

/// A fixed-size set of operation indices.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
struct Bitset(Vec<u64>);

impl Bitset {
    fn new(len: usize) -> Self {
        Bitset(vec![0; len.div_ceil(64)])
    }

    fn insert(&mut self, i: usize) {
        self.0[i / 64] |= 1 << (i % 64);
    }

    fn remove(&mut self, i: usize) {
        self.0[i / 64] &= !(1 << (i % 64));
    }
}

/// One node of the search list.
#[derive(Debug, Clone, Copy)]
enum Entry {
    /// The invocation of operation `op`; `ret` is the node of its response.
    Call { op: usize, ret: usize },
    /// The response of an operation; `definite` is false for an unknown
    /// outcome (response time +infinity).
    Return { definite: bool },
}

/// The invocations and responses of one key, in time order, as a doubly
/// linked list from which operations can be lifted out and put back
/// (in last-out, first-in order).
struct EntryList {
    /// `entries[n]` for node `n < head`.
    entries: Vec<Entry>,
    /// Predecessor of each node (the head's is unused).
    prev: Vec<usize>,
    /// Successor of each node; index `head` is the list head.
    next: Vec<Option<usize>>,
    head: usize,
}

impl EntryList {
    fn new<I, O>(ops: &[&Operation<I, O>]) -> Self {
        // Sort key: (response at +infinity, time, is a response, op).
        // Invocations sort before responses at the same instant.
        let mut events: Vec<(bool, Duration, bool, usize)> = Vec::with_capacity(ops.len() * 2);
        for (i, op) in ops.iter().enumerate() {
            events.push((false, op.call, false, i));
            match &op.completion {
                Completion::Returned { at, .. } => events.push((false, (*at).max(op.call), true, i)),
                Completion::Failed | Completion::Unknown => {
                    events.push((true, Duration::ZERO, true, i));
                }
            }
        }
        events.sort_unstable();

        let mut return_node = vec![0; ops.len()];
        for (node, &(_, _, is_return, op)) in events.iter().enumerate() {
            if is_return {
                return_node[op] = node;
            }
        }
        let entries = events
            .iter()
            .map(|&(infinite, _, is_return, op)| {
                if is_return {
                    Entry::Return { definite: !infinite }
                } else {
                    Entry::Call { op, ret: return_node[op] }
                }
            })
            .collect();

        // Nodes 0..len in order, then the head.
        let len = events.len();
        let head = len;
        let prev = (0..=len).map(|node| node.checked_sub(1).unwrap_or(head)).collect();
        let next = (1..=len).map(|after| (after < len).then_some(after)).chain([(len > 0).then_some(0)]).collect();
        EntryList { entries, prev, next, head }
    }

    fn first(&self) -> Option<usize> {
        self.next[self.head]
    }

    fn unlink(&mut self, node: usize) {
        let (before, after) = (self.prev[node], self.next[node]);
        self.next[before] = after;
        if let Some(after) = after {
            self.prev[after] = before;
        }
    }

    fn relink(&mut self, node: usize) {
        let (before, after) = (self.prev[node], self.next[node]);
        self.next[before] = Some(node);
        if let Some(after) = after {
            self.prev[after] = node;
        }
    }

    /// Removes the operation whose invocation is `call` (and its response).
    fn lift(&mut self, call: usize, ret: usize) {
        self.unlink(call);
        self.unlink(ret);
    }

    /// Undoes the most recent [`EntryList::lift`], which must be of `call`.
    fn unlift(&mut self, call: usize, ret: usize) {
        self.relink(ret);
        self.relink(call);
    }
}

/// A linearized operation on the search stack.
struct Choice<S> {
    /// Its invocation node.
    call: usize,
    /// Its response node.
    ret: usize,
    /// Its index among the key's operations.
    op: usize,
    /// The state before it.
    before: S,
}

/// The Wing & Gong / Lowe search over one key's operations.
fn search<M: Model>(model: &M, ops: &[&Operation<M::Input, M::Output>], budget: u64) -> Search {
    let mut list = EntryList::new(ops);
    let mut state = model.init();
    let mut linearized = Bitset::new(ops.len());
    let mut seen: HashSet<(Bitset, M::State)> = HashSet::new();
    let mut stack: Vec<Choice<M::State>> = Vec::new();
    let mut longest: Vec<usize> = Vec::new();
    let mut steps: u64 = 0;
    let mut cursor = list.first();

    while let Some(node) = cursor {
        if steps >= budget {
            return Search::OutOfBudget;
        }
        steps += 1;
        match list.entries[node] {
            Entry::Call { op, ret } => {
                let operation = ops[op];
                let output = operation.completion.output();
                let accepted = model
                    .step(&state, &operation.input, output)
                    // An unknown-outcome operation that would change nothing
                    // here is as good as left out, and leaving it pending
                    // keeps it available for later.
                    .filter(|next_state| output.is_some() || *next_state != state)
                    .and_then(|next_state| {
                        linearized.insert(op);
                        if seen.insert((linearized.clone(), next_state.clone())) {
                            Some(next_state)
                        } else {
                            linearized.remove(op);
                            None
                        }
                    });
                match accepted {
                    Some(next_state) => {
                        let before = std::mem::replace(&mut state, next_state);
                        stack.push(Choice { call: node, ret, op, before });
                        list.lift(node, ret);
                        if stack.len() > longest.len() {
                            longest = stack.iter().map(|c| c.op).collect();
                        }
                        cursor = list.first();
                    }
                    None => cursor = list.next[node],
                }
            }
            // Every operation before an unknown-outcome response is
            // linearized; the unknown ones still pending can be left out.
            Entry::Return { definite: false } => return Search::Linearizable,
            // An operation returned without being linearized: backtrack.
            Entry::Return { definite: true } => {
                let Some(choice) = stack.pop() else {
                    return Search::Illegal { longest };
                };
                linearized.remove(choice.op);
                state = choice.before;
                list.unlift(choice.call, choice.ret);
                cursor = list.next[choice.call];
            }
        }
    }
    Search::Linearizable
}

/// Seconds since the history's origin, to the microsecond.
fn seconds(t: Duration) -> String {
    format!("{:.6}s", t.as_secs_f64())
}

/// One line describing an operation: `#n client c [call, return] input -> output`.
fn describe<I: Debug, O: Debug>(number: usize, op: &Operation<I, O>) -> String {
    let (until, answer) = match &op.completion {
        Completion::Returned { at, output } => (seconds(*at), format!("{output:?}")),
        Completion::Failed => ("failed".to_owned(), "(did not take effect)".to_owned()),
        Completion::Unknown => ("?".to_owned(), "unknown (may or may not have taken effect)".to_owned()),
    };
    format!("#{number} client {} [{}, {until}] {:?} -> {answer}", op.client, seconds(op.call), op.input)
}

/// The explanation of an illegal key: its operations, and the longest
/// linearizable prefix found with the state after each step.
fn explain<M: Model>(
    model: &M,
    key: &str,
    numbers: &[usize],
    ops: &[&Operation<M::Input, M::Output>],
    longest: &[usize],
) -> String {
    // `write!` to a String cannot fail; the results are ignored.
    let mut out = String::new();
    let mut by_call: Vec<usize> = (0..ops.len()).collect();
    by_call.sort_by_key(|&i| (ops[i].call, i));
    let _ = writeln!(
        out,
        "{key}: no linearization of its {} operation(s) exists. \
         Operations by invocation ([call, return] since the history began):",
        ops.len()
    );
    for &i in &by_call {
        let _ = writeln!(out, "  {}", describe(numbers[i], ops[i]));
    }

    let _ = writeln!(
        out,
        "Longest linearizable prefix found ({} of {} operations), with the state after each:",
        longest.len(),
        ops.len()
    );
    let mut state = model.init();
    let _ = writeln!(out, "  initial state: {state:?}");
    for &i in longest {
        let op = ops[i];
        let Some(next) = model.step(&state, &op.input, op.completion.output()) else {
            let _ = writeln!(out, "  (the model rejects the next step on replay: it is not deterministic)");
            return out;
        };
        state = next;
        let _ = writeln!(out, "  {} => {state:?}", describe(numbers[i], op));
    }
    if longest.is_empty() {
        let _ = writeln!(out, "  (none: no operation can come first)");
    }

    // The first response the search could not get past from this prefix.
    let mut in_prefix = vec![false; ops.len()];
    for &i in longest {
        in_prefix[i] = true;
    }
    let blocking = (0..ops.len())
        .filter(|&i| !in_prefix[i])
        .filter_map(|i| match &ops[i].completion {
            Completion::Returned { at, .. } => Some(((*at).max(ops[i].call), i)),
            Completion::Failed | Completion::Unknown => None,
        })
        .min();
    if let Some((at, i)) = blocking {
        let _ = writeln!(
            out,
            "No extension of that prefix linearizes #{} before it returned at {} \
             (state {state:?}).",
            numbers[i],
            seconds(at)
        );
    }
    out
}

// ---------------------------------------------------------------------------
// The session API model
// ---------------------------------------------------------------------------

/// A call of the session API.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Call {
    /// `CreateSession` with this idempotency key.
    Create {
        /// The client-chosen request id.
        request_id: String,
    },
    /// `GetSession` (linearizable read) of this session.
    Get {
        /// The session id.
        session_id: String,
    },
    /// `DeleteSession` of this session.
    Delete {
        /// The session id.
        session_id: String,
    },
}

/// How an ended session (`TERMINATED` or `FAILED`) came to end.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum EndedBy {
    /// A client deleted it: its message says [`EndedBy::CLIENT_DELETE_MESSAGE`].
    Client,
    /// It ended without a client operation: TTL expiry or failure.
    Spontaneous,
}

impl EndedBy {
    /// What the coordinator writes in the message of a session a client deleted.
    pub const CLIENT_DELETE_MESSAGE: &'static str = "deleted by client";

    /// Classifies an ended session by its `message`.
    pub fn from_message(message: &str) -> Self {
        if message.contains(Self::CLIENT_DELETE_MESSAGE) {
            EndedBy::Client
        } else {
            EndedBy::Spontaneous
        }
    }
}

/// A definite answer of the session API.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Ret {
    /// `CreateSession` answered with this session (new or, on a retry, existing).
    Created {
        /// The server-assigned session id.
        session_id: String,
    },
    /// `GetSession` answered with the session: `ended: None` for a live phase
    /// (PENDING, RUNNING, LOST), else how it ended (TERMINATED, FAILED).
    Found {
        /// How it ended, if it did.
        ended: Option<EndedBy>,
    },
    /// `GetSession` or `DeleteSession` answered `NOT_FOUND`.
    NotFound,
    /// `DeleteSession` answered with the session: `ended` is how the answered
    /// session ended ([`EndedBy::Client`] if this or an earlier delete ended
    /// it, [`EndedBy::Spontaneous`] if it had already expired or failed), or
    /// `None` if the answer showed it still live, which is always illegal.
    Deleted {
        /// How the answered session ended, if it did.
        ended: Option<EndedBy>,
    },
}

/// How a recorded call finished.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// A definite answer.
    Ok(Ret),
    /// A definite failure known not to have taken effect: the server rejected
    /// the request (e.g. `INVALID_ARGUMENT`), or it was never sent.
    Failed,
    /// It may or may not have taken effect (timeout, `UNAVAILABLE` mid-flight,
    /// connection lost after sending).
    Unknown,
}

/// The state of one key (request id) in [`SessionModel`].
///
/// A session id is `None` while only creates with unknown outcomes have
/// created the session: the first operation that names the id binds it.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum KeyState {
    /// No create of this request id has taken effect.
    NotCreated,
    /// The session exists in a live phase.
    Live {
        /// Its id, once known.
        id: Option<String>,
    },
    /// The session has ended; its record stays readable.
    Ended {
        /// Its id, once known.
        id: Option<String>,
        /// How it ended.
        by: EndedBy,
    },
}

/// The sequential specification of one request id's session; see the
/// [module documentation](self) for the transition table.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SessionModel;

impl KeyState {
    /// The session's id, if it exists and its id is known.
    fn session_id(&self) -> Option<&String> {
        match self {
            KeyState::NotCreated => None,
            KeyState::Live { id } | KeyState::Ended { id, .. } => id.as_ref(),
        }
    }
}

impl Model for SessionModel {
    type State = KeyState;
    type Input = Call;
    type Output = Ret;

    fn init(&self) -> KeyState {
        KeyState::NotCreated
    }

    fn step(&self, state: &KeyState, call: &Call, ret: Option<&Ret>) -> Option<KeyState> {
        use KeyState::{Ended, Live, NotCreated};

        // The session id the operation names (a create's answer, a get's or
        // delete's argument) must be the session's, once that is known; the
        // first operation to name it binds it.
        let named = match (call, ret) {
            (Call::Create { .. }, Some(Ret::Created { session_id })) => Some(session_id),
            (Call::Create { .. }, _) => None,
            (Call::Get { session_id } | Call::Delete { session_id }, _) => Some(session_id),
        };
        let id = match (state.session_id(), named) {
            (Some(known), Some(named)) if known != named => return None,
            (known, named) => named.or(known).cloned(),
        };

        match (call, ret) {
            // An unknown create: afterwards the session exists (its id is not
            // known); a retry changes nothing.
            (Call::Create { .. }, None) => Some(match state {
                NotCreated => Live { id: None },
                other => other.clone(),
            }),
            (Call::Create { .. }, Some(Ret::Created { .. })) => Some(match state {
                NotCreated | Live { .. } => Live { id },
                Ended { by, .. } => Ended { id, by: *by },
            }),
            (Call::Get { .. } | Call::Delete { .. }, Some(Ret::NotFound)) => {
                (*state == NotCreated).then_some(NotCreated)
            }
            // A read with an unknown answer changes nothing. ("Live" allows
            // everything a spontaneous end would, so it need not happen here.)
            (Call::Get { .. }, None) => Some(state.clone()),
            (Call::Get { .. }, Some(Ret::Found { ended })) => match (state, ended) {
                (Live { .. }, None) => Some(Live { id }),
                (Live { .. }, Some(EndedBy::Spontaneous)) => Some(Ended { id, by: EndedBy::Spontaneous }),
                (Ended { by, .. }, Some(seen)) if by == seen => Some(Ended { id, by: *by }),
                _ => None,
            },
            // A delete with an unknown answer, if it took effect: it ends a
            // live session (leaving it out covers "it had expired first").
            (Call::Delete { .. }, None) => Some(match state {
                NotCreated => NotCreated,
                Live { .. } => Ended { id, by: EndedBy::Client },
                Ended { by, .. } => Ended { id, by: *by },
            }),
            (Call::Delete { .. }, Some(Ret::Deleted { ended: Some(seen) })) => match state {
                // `Spontaneous`: it expired or failed just before the delete.
                Live { .. } => Some(Ended { id, by: *seen }),
                Ended { by, .. } if by == seen => Some(Ended { id, by: *by }),
                _ => None,
            },
            // A live session in a delete's answer, or an answer of the wrong
            // kind for the call.
            (Call::Delete { .. }, Some(Ret::Deleted { ended: None }))
            | (Call::Create { .. }, Some(Ret::Found { .. } | Ret::NotFound | Ret::Deleted { .. }))
            | (Call::Get { .. }, Some(Ret::Created { .. } | Ret::Deleted { .. }))
            | (Call::Delete { .. }, Some(Ret::Created { .. } | Ret::Found { .. })) => None,
        }
    }
}

// ---------------------------------------------------------------------------
// The recorder
// ---------------------------------------------------------------------------

/// The handle of a call recorded by [`History::invoke`], to pass to
/// [`History::complete`] once. It is deliberately not `Clone`, so a call
/// cannot be completed twice.
#[derive(Debug, PartialEq, Eq, Hash)]
pub struct OpId(usize);

impl OpId {
    /// The operation's number: `#n` in explanations.
    pub fn index(&self) -> usize {
        self.0
    }
}

/// One recorded call.
#[derive(Debug, Clone)]
struct Recorded {
    client: u64,
    call: Call,
    invoked: Duration,
    /// When and how it finished; `None` while in flight (checked as unknown).
    completion: Option<(Duration, Outcome)>,
}

#[derive(Debug)]
struct Shared {
    origin: Instant,
    ops: Mutex<Vec<Recorded>>,
}

/// A concurrent history of session API calls.
///
/// Cloning is cheap and every clone records into the same history, so each
/// task of the chaos runner can hold one; it is `Send + Sync`. Times are
/// taken from one [`Instant`] origin: call [`History::invoke`] just before
/// sending a request and [`History::complete`] as soon as its answer (or
/// error) is in hand, so that the recorded interval contains the real one.
#[derive(Debug, Clone)]
pub struct History {
    shared: Arc<Shared>,
}

impl Default for History {
    fn default() -> Self {
        Self::new()
    }
}

impl History {
    /// An empty history whose clock starts now.
    pub fn new() -> Self {
        History { shared: Arc::new(Shared { origin: Instant::now(), ops: Mutex::new(Vec::new()) }) }
    }

    /// The recorded calls. A panic elsewhere while the lock was held cannot
    /// leave them inconsistent (each change is one push or one assignment),
    /// so a poisoned lock is used as is.
    fn ops(&self) -> parking_lot::MutexGuard<'_, Vec<Recorded>> {
        self.shared.ops.lock()
    }

    /// Records that `client` is about to make `call`; returns the handle to
    /// complete it with.
    pub fn invoke(&self, client: u64, call: Call) -> OpId {
        let invoked = self.shared.origin.elapsed();
        let mut ops = self.ops();
        ops.push(Recorded { client, call, invoked, completion: None });
        OpId(ops.len() - 1)
    }

    /// Records how the call `op` finished. An `op` of another history, if it
    /// names no call of this one or one already completed, is ignored.
    pub fn complete(&self, op: OpId, outcome: Outcome) {
        let at = self.shared.origin.elapsed();
        if let Some(recorded) = self.ops().get_mut(op.0) {
            if recorded.completion.is_none() {
                recorded.completion = Some((at, outcome));
            }
        }
    }

    /// The number of calls recorded (completed or not).
    pub fn len(&self) -> usize {
        self.ops().len()
    }

    /// True if no call has been recorded.
    pub fn is_empty(&self) -> bool {
        self.ops().is_empty()
    }

    /// The recorded calls as keyed [`Operation`]s, in [`OpId`] order (so
    /// `#n` in explanations is [`OpId::index`]). Calls never completed have
    /// [`Completion::Unknown`]. Keys are `request <request id>`, or
    /// `session <session id>` for a session id that no acknowledged create
    /// returned.
    pub fn operations(&self) -> Vec<Operation<Call, Ret>> {
        to_operations(&self.ops())
    }

    /// Checks the history with the default [`CheckConfig`].
    pub fn check(&self) -> CheckResult {
        self.check_with(&CheckConfig::default())
    }

    /// Checks the history: whether every request id's calls are linearizable
    /// with respect to [`SessionModel`], and whether no session id was
    /// returned for two request ids. Calls never completed count as unknown.
    pub fn check_with(&self, config: &CheckConfig) -> CheckResult {
        let records = self.ops().clone();
        check_records(&records, config)
    }
}

fn request_key(request_id: &str) -> String {
    format!("request {request_id}")
}

fn session_key(session_id: &str) -> String {
    format!("session {session_id}")
}

/// The session id of an acknowledged create: `(request id, session id)`.
fn acknowledged_create(r: &Recorded) -> Option<(&str, &str)> {
    match (&r.call, &r.completion) {
        (Call::Create { request_id }, Some((_, Outcome::Ok(Ret::Created { session_id })))) => {
            Some((request_id, session_id))
        }
        _ => None,
    }
}

/// Session id -> (request id, first create that returned it). Later creates
/// returning the same id for another request id are not recorded here.
fn session_owners(records: &[Recorded]) -> HashMap<&str, (&str, usize)> {
    let mut owners: HashMap<&str, (&str, usize)> = HashMap::new();
    for (index, r) in records.iter().enumerate() {
        if let Some((request_id, session_id)) = acknowledged_create(r) {
            owners.entry(session_id).or_insert((request_id, index));
        }
    }
    owners
}

/// `r` as an [`Operation`] of `key`; never completed counts as unknown.
fn to_operation(r: &Recorded, key: String) -> Operation<Call, Ret> {
    let completion = match &r.completion {
        Some((at, Outcome::Ok(ret))) => Completion::Returned { at: *at, output: ret.clone() },
        Some((_, Outcome::Failed)) => Completion::Failed,
        Some((_, Outcome::Unknown)) | None => Completion::Unknown,
    };
    Operation { key, client: r.client, input: r.call.clone(), call: r.invoked, completion }
}

fn to_operations(records: &[Recorded]) -> Vec<Operation<Call, Ret>> {
    let owners = session_owners(records);
    records
        .iter()
        .map(|r| {
            let key = match &r.call {
                Call::Create { request_id } => request_key(request_id),
                Call::Get { session_id } | Call::Delete { session_id } => match owners.get(session_id.as_str()) {
                    Some((request_id, _)) => request_key(request_id),
                    None => session_key(session_id),
                },
            };
            to_operation(r, key)
        })
        .collect()
}

fn check_records(records: &[Recorded], config: &CheckConfig) -> CheckResult {
    // Each request id must have its own session: a session id returned for
    // two request ids breaks the partition (and the API).
    let owners = session_owners(records);
    for (index, r) in records.iter().enumerate() {
        if let Some((request_id, session_id)) = acknowledged_create(r) {
            if let Some(&(first_request, first)) = owners.get(session_id) {
                if first_request != request_id {
                    let key = session_key(session_id);
                    let first_op = to_operation(&records[first], key.clone());
                    let this_op = to_operation(r, key.clone());
                    let explanation = format!(
                        "session id {session_id} was returned for two request ids:\n  {}\n  {}\n",
                        describe(first, &first_op),
                        describe(index, &this_op)
                    );
                    return CheckResult::Illegal { key, explanation };
                }
            }
        }
    }
    check_operations_with(&SessionModel, &to_operations(records), config)
}

// ---------------------------------------------------------------------------
// Tests
// ---------------------------------------------------------------------------

#[cfg(test)]
mod tests {
    use super::*;

    // ----- building histories with explicit times (milliseconds) -----

    fn create(request_id: &str) -> Call {
        Call::Create { request_id: request_id.into() }
    }
    fn get(session_id: &str) -> Call {
        Call::Get { session_id: session_id.into() }
    }
    fn delete(session_id: &str) -> Call {
        Call::Delete { session_id: session_id.into() }
    }
    fn created(session_id: &str) -> Outcome {
        Outcome::Ok(Ret::Created { session_id: session_id.into() })
    }
    fn live() -> Outcome {
        Outcome::Ok(Ret::Found { ended: None })
    }
    fn ended(by: EndedBy) -> Outcome {
        Outcome::Ok(Ret::Found { ended: Some(by) })
    }
    fn not_found() -> Outcome {
        Outcome::Ok(Ret::NotFound)
    }
    fn deleted(by: EndedBy) -> Outcome {
        Outcome::Ok(Ret::Deleted { ended: Some(by) })
    }

    #[derive(Default)]
    struct Script(Vec<Recorded>);

    impl Script {
        /// A call by `client` from `from` to `to` ms that finished with `outcome`.
        fn op(mut self, client: u64, call: Call, from: u64, to: u64, outcome: Outcome) -> Self {
            self.0.push(Recorded {
                client,
                call,
                invoked: Duration::from_millis(from),
                completion: Some((Duration::from_millis(to), outcome)),
            });
            self
        }

        /// A call that never completed.
        fn pending(mut self, client: u64, call: Call, from: u64) -> Self {
            self.0.push(Recorded { client, call, invoked: Duration::from_millis(from), completion: None });
            self
        }

        fn check(&self) -> CheckResult {
            check_records(&self.0, &CheckConfig::default())
        }

        fn check_with_budget(&self, max_steps_per_key: u64) -> CheckResult {
            check_records(&self.0, &CheckConfig { max_steps_per_key })
        }
    }

    #[track_caller]
    fn assert_ok(result: CheckResult) {
        assert_eq!(result, CheckResult::Ok, "expected linearizable, got: {result}");
    }

    #[track_caller]
    fn assert_illegal(result: CheckResult, expected_key: &str) -> String {
        match result {
            CheckResult::Illegal { key, explanation } => {
                assert_eq!(key, expected_key, "{explanation}");
                explanation
            }
            other => panic!("expected illegal {expected_key}, got: {other}"),
        }
    }

    // ----- hand-written histories -----

    #[test]
    fn sequential_legal_history() {
        let script = Script::default()
            .op(1, get("s1"), 0, 1, not_found())
            .op(1, create("r1"), 2, 3, created("s1"))
            .op(1, get("s1"), 4, 5, live())
            .op(1, create("r1"), 6, 7, created("s1"))
            .op(1, delete("s1"), 8, 9, deleted(EndedBy::Client))
            .op(1, get("s1"), 10, 11, ended(EndedBy::Client))
            .op(1, delete("s1"), 12, 13, deleted(EndedBy::Client))
            .op(1, create("r1"), 14, 15, created("s1"))
            .op(1, delete("nope"), 16, 17, not_found())
            .op(1, create("r2"), 18, 19, created("s2"))
            .op(1, get("s2"), 20, 21, live());
        assert_ok(script.check());
    }

    #[test]
    fn empty_history_is_linearizable() {
        assert_ok(History::new().check());
        assert!(History::new().is_empty());
    }

    #[test]
    fn concurrent_overlapping_legal_histories() {
        // A get overlapping the create may miss it; one overlapping the
        // delete may see it live or ended; concurrent creates of one request
        // id both answer the one session.
        let script = Script::default()
            .op(1, create("r1"), 0, 10, created("s1"))
            .op(2, create("r1"), 1, 12, created("s1"))
            .op(3, get("s1"), 2, 5, not_found())
            .op(4, get("s1"), 3, 11, live())
            .op(1, delete("s1"), 20, 30, deleted(EndedBy::Client))
            .op(2, get("s1"), 21, 29, live())
            .op(3, get("s1"), 22, 25, ended(EndedBy::Client))
            .op(4, delete("s1"), 23, 35, deleted(EndedBy::Client))
            .op(2, get("s1"), 31, 40, ended(EndedBy::Client));
        assert_ok(script.check());

        // Reads that overlap one another and the writes, in both orders.
        let script = Script::default()
            .op(1, create("r1"), 0, 100, created("s1"))
            .op(2, get("s1"), 10, 90, live())
            .op(3, get("s1"), 20, 80, not_found())
            .op(4, delete("s1"), 30, 70, deleted(EndedBy::Client))
            .op(5, get("s1"), 40, 60, ended(EndedBy::Client))
            .op(6, get("s1"), 50, 55, ended(EndedBy::Client));
        assert_ok(script.check());
    }

    #[test]
    fn stale_read_is_illegal() {
        // Client 1's create was acknowledged before client 2 asked.
        let script = Script::default().op(1, create("r1"), 0, 1, created("s1")).op(2, get("s1"), 2, 3, not_found());
        let explanation = assert_illegal(script.check(), "request r1");
        assert!(explanation.contains("#1 client 2"), "{explanation}");
        assert!(explanation.contains("NotFound"), "{explanation}");
    }

    #[test]
    fn live_read_after_completed_delete_is_illegal() {
        let script = Script::default()
            .op(1, create("r1"), 0, 1, created("s1"))
            .op(1, delete("s1"), 2, 3, deleted(EndedBy::Client))
            .op(2, get("s1"), 4, 5, live());
        assert_illegal(script.check(), "request r1");
    }

    #[test]
    fn lost_acknowledged_create_is_illegal() {
        // Seen live, then gone.
        let script = Script::default()
            .op(1, create("r1"), 0, 1, created("s1"))
            .op(2, get("s1"), 2, 3, live())
            .op(3, get("s1"), 4, 5, not_found())
            .op(4, get("s1"), 6, 7, live());
        let explanation = assert_illegal(script.check(), "request r1");
        assert!(explanation.contains("(2 of 4 operations)"), "{explanation}");
        assert!(explanation.contains("No extension of that prefix linearizes #2"), "{explanation}");

        // A delete that says it never existed.
        let script = Script::default().op(1, create("r1"), 0, 1, created("s1")).op(2, delete("s1"), 2, 3, not_found());
        assert_illegal(script.check(), "request r1");
    }

    #[test]
    fn create_retry_with_different_session_id_is_illegal() {
        let script =
            Script::default().op(1, create("r1"), 0, 1, created("s1")).op(1, create("r1"), 2, 3, created("s2"));
        assert_illegal(script.check(), "request r1");

        // Concurrent retries cannot disagree either.
        let script =
            Script::default().op(1, create("r1"), 0, 10, created("s1")).op(2, create("r1"), 1, 9, created("s2"));
        assert_illegal(script.check(), "request r1");

        // Nor after the session was deleted.
        let script = Script::default()
            .op(1, create("r1"), 0, 1, created("s1"))
            .op(1, delete("s1"), 2, 3, deleted(EndedBy::Client))
            .op(1, create("r1"), 4, 5, created("s2"));
        assert_illegal(script.check(), "request r1");
    }

    #[test]
    fn unknown_create_that_later_appears_is_ok() {
        // The get sees the session before any create of r1 was acknowledged:
        // only the unknown create can explain it.
        let script = Script::default().op(1, create("r1"), 0, 1, Outcome::Unknown).op(2, get("s1"), 2, 3, live()).op(
            1,
            create("r1"),
            4,
            5,
            created("s1"),
        );
        assert_ok(script.check());

        // The same with a create that never completed, seen ended later.
        let script = Script::default()
            .pending(1, create("r1"), 0)
            .op(2, delete("s1"), 2, 3, deleted(EndedBy::Client))
            .op(3, create("r1"), 4, 5, created("s1"))
            .op(3, get("s1"), 6, 7, ended(EndedBy::Client));
        assert_ok(script.check());

        // Without the unknown create, the early get is a violation.
        let script = Script::default().op(2, get("s1"), 2, 3, live()).op(1, create("r1"), 4, 5, created("s1"));
        assert_illegal(script.check(), "request r1");
    }

    #[test]
    fn unknown_create_that_never_appears_is_ok() {
        let script = Script::default().op(1, create("r1"), 0, 1, Outcome::Unknown).pending(2, create("r2"), 0);
        assert_ok(script.check());

        // Not there at the first get; the retry then creates it.
        let script = Script::default()
            .op(1, create("r1"), 0, 1, Outcome::Unknown)
            .op(2, get("s1"), 2, 3, not_found())
            .op(1, create("r1"), 4, 5, created("s1"))
            .op(2, get("s1"), 6, 7, live());
        assert_ok(script.check());
    }

    #[test]
    fn unknown_create_binds_one_session_id() {
        // Through the generic core with hand-made keys: the session an
        // unknown create made cannot be s1 for one reader and s2 for another.
        let op = |client, input, from, to, output: Option<Ret>| Operation {
            key: "k".to_owned(),
            client,
            input,
            call: Duration::from_millis(from),
            completion: match output {
                Some(output) => Completion::Returned { at: Duration::from_millis(to), output },
                None => Completion::Unknown,
            },
        };
        let found = || Some(Ret::Found { ended: None });
        let mut ops =
            vec![op(1, create("r1"), 0, 1, None), op(2, get("s1"), 2, 3, found()), op(3, get("s1"), 4, 5, found())];
        assert_ok(check_operations(&SessionModel, &ops));
        ops.push(op(3, get("s2"), 6, 7, found()));
        assert_illegal(check_operations(&SessionModel, &ops), "k");
    }

    #[test]
    fn unknown_delete_invoked_before_create_may_take_effect_after_it() {
        let script = Script::default()
            .op(1, delete("s1"), 0, 1, Outcome::Unknown)
            .op(2, create("r1"), 10, 11, created("s1"))
            .op(2, get("s1"), 12, 13, ended(EndedBy::Client));
        assert_ok(script.check());
    }

    #[test]
    fn spontaneous_end_is_ok() {
        let script = Script::default()
            .op(1, create("r1"), 0, 1, created("s1"))
            .op(1, get("s1"), 2, 3, live())
            .op(2, get("s1"), 4, 5, ended(EndedBy::Spontaneous))
            .op(1, delete("s1"), 6, 7, deleted(EndedBy::Spontaneous))
            .op(2, get("s1"), 8, 9, ended(EndedBy::Spontaneous))
            .op(2, create("r1"), 10, 11, created("s1"));
        assert_ok(script.check());

        // Expired just before the delete, which answers with the expiry.
        let script = Script::default()
            .op(1, create("r2"), 0, 1, created("s2"))
            .op(1, delete("s2"), 2, 3, deleted(EndedBy::Spontaneous))
            .op(1, get("s2"), 4, 5, ended(EndedBy::Spontaneous));
        assert_ok(script.check());
    }

    #[test]
    fn live_after_spontaneous_end_is_illegal() {
        let script = Script::default()
            .op(1, create("r1"), 0, 1, created("s1"))
            .op(1, get("s1"), 2, 3, ended(EndedBy::Spontaneous))
            .op(2, get("s1"), 4, 5, live());
        assert_illegal(script.check(), "request r1");

        // A delete cannot relabel an expired session as deleted by the client.
        let script = Script::default()
            .op(1, create("r1"), 0, 1, created("s1"))
            .op(1, get("s1"), 2, 3, ended(EndedBy::Spontaneous))
            .op(2, delete("s1"), 4, 5, deleted(EndedBy::Client));
        assert_illegal(script.check(), "request r1");
    }

    #[test]
    fn client_end_without_delete_is_illegal() {
        let script =
            Script::default().op(1, create("r1"), 0, 1, created("s1")).op(2, get("s1"), 2, 3, ended(EndedBy::Client));
        assert_illegal(script.check(), "request r1");

        // A delete that failed definitely does not explain it either...
        let script = Script::default()
            .op(1, create("r1"), 0, 1, created("s1"))
            .op(3, delete("s1"), 1, 2, Outcome::Failed)
            .op(2, get("s1"), 2, 3, ended(EndedBy::Client));
        assert_illegal(script.check(), "request r1");

        // ...but one with an unknown outcome does.
        let script = Script::default()
            .op(1, create("r1"), 0, 1, created("s1"))
            .op(3, delete("s1"), 1, 2, Outcome::Unknown)
            .op(2, get("s1"), 2, 3, ended(EndedBy::Client));
        assert_ok(script.check());
    }

    #[test]
    fn delete_answering_live_session_is_illegal() {
        let script = Script::default().op(1, create("r1"), 0, 1, created("s1")).op(
            1,
            delete("s1"),
            2,
            3,
            Outcome::Ok(Ret::Deleted { ended: None }),
        );
        assert_illegal(script.check(), "request r1");
    }

    #[test]
    fn unknown_session_id_has_its_own_key() {
        let script = Script::default().op(1, get("ghost"), 0, 1, not_found()).op(1, delete("ghost"), 2, 3, not_found());
        assert_ok(script.check());

        let script = Script::default().op(1, get("ghost"), 0, 1, live());
        assert_illegal(script.check(), "session ghost");
    }

    #[test]
    fn session_id_returned_for_two_request_ids_is_illegal() {
        let script =
            Script::default().op(1, create("r1"), 0, 1, created("s1")).op(2, create("r2"), 2, 3, created("s1"));
        let explanation = assert_illegal(script.check(), "session s1");
        assert!(explanation.contains("\n  #0 client 1") && explanation.contains("\n  #1 client 2"), "{explanation}");
    }

    #[test]
    fn failed_operations_are_ignored() {
        let script = Script::default()
            .op(1, create("r1"), 0, 1, Outcome::Failed)
            .op(1, get("s1"), 2, 3, not_found())
            .op(1, create("r1"), 4, 5, created("s1"))
            .op(2, delete("s1"), 6, 7, Outcome::Failed)
            .op(2, get("s1"), 8, 9, live());
        assert_ok(script.check());
    }

    #[test]
    fn wrong_kind_of_answer_is_illegal() {
        let script = Script::default().op(1, get("s1"), 0, 1, created("s1"));
        assert_illegal(script.check(), "session s1");
    }

    #[test]
    fn exhausted_budget_is_unknown() {
        // Legal, but needs more than a handful of steps.
        let mut script = Script::default().op(1, create("r1"), 0, 100, created("s1"));
        for client in 2..16 {
            script = script.op(client, get("s1"), client, 100 - client, live());
        }
        assert_eq!(
            script.check_with_budget(5),
            CheckResult::Unknown { keys: vec!["request r1".to_owned()], max_steps_per_key: 5 }
        );
        assert_ok(script.check());

        // Illegal on another key wins over unknown.
        let script = script.op(1, create("r2"), 200, 201, created("s2")).op(1, get("s2"), 202, 203, not_found());
        assert_illegal(script.check_with_budget(5), "request r2");
    }

    #[test]
    fn memoization_bounds_the_search_of_an_illegal_history() {
        // 14 concurrent reads and then a stale one: without memoization the
        // search would try every order of the reads (14! of them) before
        // concluding; with it, every subset at most once.
        let mut script = Script::default().op(1, create("r1"), 0, 1000, created("s1"));
        for client in 2..16 {
            script = script.op(client, get("s1"), client, 1000 - client, live());
        }
        let script = script.op(1, get("s1"), 2000, 2001, not_found());
        assert_illegal(script.check_with_budget(1_000_000), "request r1");
    }

    #[test]
    fn generic_core_checks_a_register() {
        /// A read/write register: `Some(v)` writes v, `None` reads.
        struct Register;
        impl Model for Register {
            type State = u32;
            type Input = Option<u32>;
            type Output = u32;
            fn init(&self) -> u32 {
                0
            }
            fn step(&self, state: &u32, input: &Option<u32>, output: Option<&u32>) -> Option<u32> {
                match (input, output) {
                    (Some(v), _) => Some(*v),
                    (None, Some(read)) => (read == state).then_some(*state),
                    (None, None) => Some(*state),
                }
            }
        }
        let op = |client, input, from, to, output| Operation {
            key: "x".to_owned(),
            client,
            input,
            call: Duration::from_millis(from),
            completion: Completion::Returned { at: Duration::from_millis(to), output },
        };
        let mut ops = vec![op(1, Some(1), 0, 10, 0), op(2, None, 1, 2, 0), op(3, None, 3, 4, 1), op(2, None, 5, 6, 1)];
        assert_ok(check_operations(&Register, &ops));
        // A read of the old value after a read of the new one.
        ops.push(op(3, None, 7, 8, 0));
        assert_illegal(check_operations(&Register, &ops), "x");
    }

    #[test]
    fn history_records_concurrent_threads() {
        let history = History::new();
        let server = Arc::new(Mutex::new(SimServer::default()));
        let threads: Vec<_> = (0..8u64)
            .map(|client| {
                let history = history.clone();
                let server = Arc::clone(&server);
                std::thread::spawn(move || {
                    let mut rng = XorShift::new(client);
                    for n in 0..150u64 {
                        let request_id = format!("r{}", rng.below(20));
                        let session_id = format!("s-{request_id}");
                        let call = match n % 3 {
                            0 => Call::Create { request_id },
                            1 => Call::Get { session_id },
                            _ => Call::Delete { session_id },
                        };
                        let op = history.invoke(client, call.clone());
                        let ret = server.lock().apply(&call);
                        history.complete(op, Outcome::Ok(ret));
                    }
                })
            })
            .collect();
        for thread in threads {
            thread.join().expect("recording thread panicked");
        }
        assert_eq!(history.len(), 8 * 150);
        assert_ok(history.check());

        // A call never completed counts as unknown: legal either way.
        let op = history.invoke(99, delete("s-r0"));
        assert_eq!(op.index(), 8 * 150);
        assert_ok(history.check());
        assert_eq!(history.operations()[op.index()].completion, Completion::Unknown);
    }

    // ----- a simulated linearizable service -----

    /// xorshift64: a tiny deterministic PRNG.
    struct XorShift(u64);

    impl XorShift {
        fn new(seed: u64) -> Self {
            XorShift(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1)
        }

        fn next(&mut self) -> u64 {
            let mut x = self.0;
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            self.0 = x;
            x
        }

        fn below(&mut self, n: u64) -> u64 {
            self.next() % n
        }

        fn percent(&mut self, p: u64) -> bool {
            self.below(100) < p
        }

        fn pick<'a>(&mut self, items: &'a [String]) -> Option<&'a String> {
            if items.is_empty() {
                None
            } else {
                items.get(self.below(items.len() as u64) as usize)
            }
        }
    }

    /// A sequential session store: the "linearizable register" the
    /// simulated clients talk to (each call takes effect atomically).
    #[derive(Default)]
    struct SimServer {
        by_request: BTreeMap<String, String>,
        /// Session id -> how it ended (`None`: live).
        sessions: BTreeMap<String, Option<EndedBy>>,
        next_id: u64,
    }

    impl SimServer {
        fn apply(&mut self, call: &Call) -> Ret {
            match call {
                Call::Create { request_id } => {
                    if let Some(session_id) = self.by_request.get(request_id) {
                        return Ret::Created { session_id: session_id.clone() };
                    }
                    self.next_id += 1;
                    let session_id = format!("s{}", self.next_id);
                    self.by_request.insert(request_id.clone(), session_id.clone());
                    self.sessions.insert(session_id.clone(), None);
                    Ret::Created { session_id }
                }
                Call::Get { session_id } => match self.sessions.get(session_id) {
                    Some(ended) => Ret::Found { ended: *ended },
                    None => Ret::NotFound,
                },
                Call::Delete { session_id } => match self.sessions.get_mut(session_id) {
                    Some(ended) => {
                        let by = *ended.get_or_insert(EndedBy::Client);
                        Ret::Deleted { ended: Some(by) }
                    }
                    None => Ret::NotFound,
                },
            }
        }

        /// A TTL expiry of some live session.
        fn expire_one(&mut self, rng: &mut XorShift) {
            let live: Vec<String> =
                self.sessions.iter().filter(|(_, e)| e.is_none()).map(|(id, _)| id.clone()).collect();
            if let Some(id) = rng.pick(&live) {
                self.sessions.insert(id.clone(), Some(EndedBy::Spontaneous));
            }
        }
    }

    #[derive(Clone, Copy, PartialEq, Eq)]
    enum Fate {
        Answered,
        /// Took effect, but the answer was lost.
        LostAfterEffect,
        /// Never took effect, and the client cannot tell.
        LostBeforeEffect,
    }

    #[derive(Clone, Copy)]
    enum Phase {
        /// The next call is invoked at the client's time.
        Idle,
        /// The call in flight takes effect at the client's time.
        Sent,
        /// Its answer (or loss) arrives at the client's time.
        Applied,
    }

    struct SimClient {
        at: u64,
        phase: Phase,
        record: usize,
        fate: Fate,
        answer: Option<Ret>,
    }

    /// A history of `clients` clients making `total` calls on a linearizable
    /// store with random latencies (in microseconds), lost answers, failed
    /// calls, TTL expiries and calls cut off by the end of the run.
    ///
    /// With `request_ids_max: Some(n)`, all creates use one of `n` request ids, so
    /// that many clients work on the same few keys at once.
    fn simulate(seed: u64, clients: usize, total: usize, request_ids_max: Option<usize>) -> Vec<Recorded> {
        let mut rng = XorShift::new(seed);
        let mut server = SimServer::default();
        let mut records: Vec<Recorded> = Vec::new();
        let mut request_ids: Vec<String> = Vec::new();
        let mut known_sessions: Vec<String> = Vec::new();
        let mut sim: Vec<SimClient> = (0..clients)
            .map(|_| SimClient { at: rng.below(50), phase: Phase::Idle, record: 0, fate: Fate::Answered, answer: None })
            .collect();

        while records.len() < total {
            let Some(c) = (0..clients).min_by_key(|&c| (sim[c].at, c)) else {
                break;
            };
            let client = &mut sim[c];
            let now = client.at;
            match client.phase {
                Phase::Idle => {
                    let roll = rng.below(100);
                    let call = if roll < 30 {
                        let fresh = match request_ids_max {
                            Some(max) => request_ids.len() < max,
                            None => !rng.percent(25),
                        };
                        match rng.pick(&request_ids) {
                            Some(old) if !fresh => create(old),
                            _ => {
                                let request_id = format!("r{}", request_ids.len());
                                request_ids.push(request_id.clone());
                                create(&request_id)
                            }
                        }
                    } else {
                        let session_id = match rng.pick(&known_sessions) {
                            Some(id) if !rng.percent(5) => id.clone(),
                            _ => format!("bogus{}", rng.below(1000)),
                        };
                        if roll < 75 {
                            get(&session_id)
                        } else {
                            delete(&session_id)
                        }
                    };
                    records.push(Recorded {
                        client: c as u64,
                        call,
                        invoked: Duration::from_micros(now),
                        completion: None,
                    });
                    client.record = records.len() - 1;
                    if rng.percent(4) {
                        // Rejected or never sent: no effect, known failure.
                        let done = now + 1 + rng.below(50);
                        records[client.record].completion = Some((Duration::from_micros(done), Outcome::Failed));
                        client.at = done + rng.below(100);
                    } else {
                        client.fate = match rng.below(100) {
                            0..=3 => Fate::LostAfterEffect,
                            4..=6 => Fate::LostBeforeEffect,
                            _ => Fate::Answered,
                        };
                        client.phase = Phase::Sent;
                        client.at = now + 1 + rng.below(400);
                    }
                }
                Phase::Sent => {
                    client.answer = match client.fate {
                        Fate::LostBeforeEffect => None,
                        Fate::Answered | Fate::LostAfterEffect => Some(server.apply(&records[client.record].call)),
                    };
                    if rng.percent(3) {
                        server.expire_one(&mut rng);
                    }
                    client.phase = Phase::Applied;
                    client.at = now + 1 + rng.below(400);
                }
                Phase::Applied => {
                    let outcome = match (client.fate, client.answer.take()) {
                        (Fate::Answered, Some(ret)) => {
                            if let Ret::Created { session_id } = &ret {
                                if !known_sessions.contains(session_id) {
                                    known_sessions.push(session_id.clone());
                                }
                            }
                            Outcome::Ok(ret)
                        }
                        _ => Outcome::Unknown,
                    };
                    records[client.record].completion = Some((Duration::from_micros(now), outcome));
                    client.phase = Phase::Idle;
                    client.at = now + rng.below(100);
                }
            }
        }
        records
    }

    /// Turns one get that came after an acknowledged create of its session
    /// into a `NOT_FOUND` (a stale read); returns the key it belongs to.
    fn corrupt_one_read(records: &mut [Recorded]) -> String {
        let mut acknowledged: BTreeMap<&str, (Duration, &str)> = BTreeMap::new();
        for r in records.iter() {
            if let (Some((at, _)), Some((request_id, session_id))) = (&r.completion, acknowledged_create(r)) {
                let earliest = acknowledged.entry(session_id).or_insert((*at, request_id));
                earliest.0 = earliest.0.min(*at);
            }
        }
        let candidates: Vec<(usize, String)> = records
            .iter()
            .enumerate()
            .filter_map(|(i, r)| match (&r.call, &r.completion) {
                (Call::Get { session_id }, Some((_, Outcome::Ok(Ret::Found { .. })))) => {
                    let &(acked_at, request_id) = acknowledged.get(session_id.as_str())?;
                    (acked_at < r.invoked).then(|| (i, request_key(request_id)))
                }
                _ => None,
            })
            .collect();
        assert!(!candidates.is_empty(), "the simulation produced no read to corrupt");
        let (index, key) = candidates[candidates.len() / 2].clone();
        if let Some((_, outcome)) = &mut records[index].completion {
            *outcome = Outcome::Ok(Ret::NotFound);
        }
        key
    }

    #[test]
    fn randomized_linearizable_history_is_ok_and_corrupted_read_is_illegal() {
        // Many keys with a few clients each, and a few keys that 12 clients
        // share (so hundreds of operations per key, many of them concurrent).
        let runs = (1..=6).map(|seed| (seed, 16, 3000, None)).chain((7..=8).map(|seed| (seed, 12, 1500, Some(3))));
        for (seed, clients, total, request_ids_max) in runs {
            let mut records = simulate(seed, clients, total, request_ids_max);
            let unknown =
                records.iter().filter(|r| !matches!(r.completion, Some((_, Outcome::Ok(_) | Outcome::Failed)))).count();
            let mut per_key: BTreeMap<String, usize> = BTreeMap::new();
            for op in to_operations(&records) {
                *per_key.entry(op.key).or_default() += 1;
            }
            let busiest = per_key.values().copied().max().unwrap_or(0);
            assert!(
                unknown > 0 && per_key.len() > 50 && busiest > 20,
                "seed {seed}: too tame a history ({unknown} unknown, {} keys, busiest {busiest})",
                per_key.len()
            );
            let result = check_records(&records, &CheckConfig::default());
            assert_eq!(result, CheckResult::Ok, "seed {seed}: {result}");

            let key = corrupt_one_read(&mut records);
            let result = check_records(&records, &CheckConfig::default());
            assert_illegal(result, &key);
        }
    }
}
