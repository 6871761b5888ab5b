//! The one implementation of "run a command and stream its output", shared
//! by every runtime backend.
//!
//! A backend prepares a [`tokio::process::Command`] (the bwrap wrapper, or a
//! `docker exec`, with whatever `pre_exec` hook it needs) and hands it to
//! [`run`] (or [`spawn`] then [`supervise`]) together with a `kill_tree`
//! callback that kills every process the command started. This module owns
//! the semantics the API promises and nothing backend-specific:
//!
//! - stdout and stderr are read concurrently and forwarded as they are read,
//!   in chunks of at most [`OUTPUT_CHUNK_BYTES`];
//! - stdin is written, then closed;
//! - past `timeout` the command and its tree are killed, the exit reports
//!   `timed_out`, exit code 137 and signal 9;
//! - past `output_cap` bytes (stdout and stderr together) forwarding stops,
//!   the tree is killed and the exit reports `output_truncated`;
//! - if the receiver of the output goes away, the tree is killed;
//! - exit codes 129..=192 (the shell / bwrap convention for "killed by
//!   signal N") are reported with `signal = code - 128`.
//! - [`note_limits`] adds what the session's limits did (OOM kills, refused
//!   forks), and names the signal of a command killed with no limit hit.
//!
//! [`command_argv`] and [`plan_command`] turn an API command into an argv and
//! enforce the argv limits of the API and of the kernel.
//!
//! The exec types of the [`crate::runtime::Runtime`] interface ([`ExecSpec`],
//! [`Command`], [`ExecEvent`], [`ExitInfo`]) are defined here; this module
//! depends on no runtime ([`ExecError`] converts into `RuntimeError`).

use std::collections::BTreeMap;
use std::process::ExitStatus;
use std::time::Duration;

use bytes::Bytes;
use sandfleet_common::limits::{self, MAX_ARGV, MAX_ARGV_BYTES, MAX_CODE_BYTES, OUTPUT_CHUNK_BYTES};
use sandfleet_common::{ids, ValidationError};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::process::{Child, ChildStderr, ChildStdout};
use tokio::sync::mpsc;
use tokio::time::Instant;
use tracing::{debug, instrument, warn};

use crate::workspace::{FsError, Workspace};

/// An exec request that breaks a rule of the API or of the kernel.
#[derive(Debug, thiserror::Error)]
pub enum ExecError {
    /// The command is malformed or over an argv or code limit; the text says which.
    #[error("{0}")]
    InvalidArgument(String),
    /// A field of the request is malformed or over its documented limit
    /// (INVALID_ARGUMENT or OUT_OF_RANGE, as everywhere in the API).
    #[error(transparent)]
    Validation(#[from] ValidationError),
    /// Checking the workdir against the workspace failed.
    #[error(transparent)]
    Workspace(#[from] FsError),
}

/// What to run.
#[derive(Debug, Clone)]
pub enum Command {
    /// A plain argv; argv[0] is looked up on the sandbox PATH.
    Argv(Vec<String>),
    /// Source code for an interpreter.
    Code {
        /// Which interpreter.
        language: Language,
        /// The source text.
        code: String,
    },
}

/// The interpreter of [`Command::Code`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Language {
    /// `python3 -c CODE`
    Python,
    /// `node -e CODE`
    Node,
    /// `bash -c CODE`
    Bash,
}

/// One command run.
#[derive(Debug, Clone)]
pub struct ExecSpec {
    /// What to run.
    pub command: Command,
    /// Extra environment for this exec (wins over the session's).
    pub env: BTreeMap<String, String>,
    /// Written to stdin, which is then closed.
    pub stdin: Vec<u8>,
    /// Working directory relative to the workspace root; "" is the root.
    pub workdir: String,
    /// Wall-clock limit; zero means the default (30 s).
    pub timeout: Duration,
    /// Output cap (stdout and stderr together) in bytes; zero means the default (16 MiB).
    pub output_cap: u64,
}

/// Output of a running command, in the order it was read.
#[derive(Debug, Clone)]
pub enum ExecEvent {
    /// A piece of stdout (at most `OUTPUT_CHUNK_BYTES`).
    Stdout(bytes::Bytes),
    /// A piece of stderr (at most `OUTPUT_CHUNK_BYTES`).
    Stderr(bytes::Bytes),
}

/// How a command ended.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ExitInfo {
    /// The exit code; 128+N when killed by signal N.
    pub exit_code: i32,
    /// The signal that ended the command, or 0.
    pub signal: i32,
    /// Wall-clock duration.
    pub duration: Duration,
    /// The timeout expired and the tree was killed.
    pub timed_out: bool,
    /// The kernel OOM killer ended a process of the session during the exec.
    pub oom_killed: bool,
    /// Output went past the cap and the command was killed.
    pub output_truncated: bool,
    /// Why the command did not end on its own, naming the limit hit.
    pub message: String,
}

/// The kernel's limit on one argv or environment string, including its NUL
/// (`MAX_ARG_STRLEN`, 32 pages).
pub const MAX_ARG_STRLEN: usize = 32 * 4096;

/// How long output is still drained after the command exited, before
/// processes that keep the pipes open are killed.
const EXIT_DRAIN_GRACE: Duration = Duration::from_millis(500);
/// How long output is drained after the tree was killed.
const KILL_DRAIN_GRACE: Duration = Duration::from_secs(2);

/// Validates a command and returns its argv: `Argv` as given, `Code` as
/// `python3 -c CODE`, `node -e CODE` or `bash -c CODE`.
///
/// Errors name the limit that was hit. A code larger than one kernel argv
/// string ([`MAX_ARG_STRLEN`]) is refused here; [`plan_command`] accepts it by
/// passing the code as a file instead.
pub fn command_argv(cmd: &Command) -> Result<Vec<String>, ExecError> {
    let argv = match cmd {
        Command::Argv(argv) => argv.clone(),
        Command::Code { language, code } => {
            check_code(code)?;
            let (bin, flag) = interpreter(*language);
            vec![bin.to_string(), flag.to_string(), code.clone()]
        }
    };
    check_argv(&argv)?;
    Ok(argv)
}

/// An argv plus, for code too large for one argv string, the code to make
/// available read-only at the path the argv names.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CommandPlan {
    /// What to execute.
    pub argv: Vec<String>,
    /// The code file content, when `argv` runs a file at `code_path`.
    pub code_file: Option<Vec<u8>>,
}

/// Like [`command_argv`], but code larger than [`MAX_ARG_STRLEN`] (up to
/// [`MAX_CODE_BYTES`]) becomes `python3 CODE_PATH` / `node CODE_PATH` /
/// `bash CODE_PATH`, with the code returned in [`CommandPlan::code_file`] for
/// the backend to place at `code_path`.
pub fn plan_command(cmd: &Command, code_path: &str) -> Result<CommandPlan, ExecError> {
    if let Command::Code { language, code } = cmd {
        check_code(code)?;
        if code.len() >= MAX_ARG_STRLEN {
            let (bin, _) = interpreter(*language);
            let argv = vec![bin.to_string(), code_path.to_string()];
            check_argv(&argv)?;
            return Ok(CommandPlan { argv, code_file: Some(code.as_bytes().to_vec()) });
        }
    }
    Ok(CommandPlan { argv: command_argv(cmd)?, code_file: None })
}

fn interpreter(language: Language) -> (&'static str, &'static str) {
    match language {
        Language::Python => ("python3", "-c"),
        Language::Node => ("node", "-e"),
        Language::Bash => ("bash", "-c"),
    }
}

fn check_code(code: &str) -> Result<(), ExecError> {
    if code.len() > MAX_CODE_BYTES {
        return Err(ExecError::InvalidArgument(format!(
            "code exceeds the limit of {MAX_CODE_BYTES} bytes (MAX_CODE_BYTES): got {}",
            code.len()
        )));
    }
    if code.contains('\0') {
        return Err(ExecError::InvalidArgument("code contains a NUL byte".to_string()));
    }
    Ok(())
}

fn check_argv(argv: &[String]) -> Result<(), ExecError> {
    if argv.is_empty() {
        return Err(ExecError::InvalidArgument("argv is empty; give at least the program name".to_string()));
    }
    if argv[0].is_empty() {
        return Err(ExecError::InvalidArgument("argv[0] is empty".to_string()));
    }
    if argv.len() > MAX_ARGV {
        return Err(ExecError::InvalidArgument(format!(
            "argv exceeds the limit of {MAX_ARGV} arguments (MAX_ARGV): got {}",
            argv.len()
        )));
    }
    let total: usize = argv.iter().map(|a| a.len()).sum();
    // Code is counted by MAX_CODE_BYTES, not by the argv budget.
    let code_len = if argv.len() == 3 && matches!(argv[1].as_str(), "-c" | "-e") { argv[2].len() } else { 0 };
    if total - code_len > MAX_ARGV_BYTES {
        return Err(ExecError::InvalidArgument(format!(
            "argv exceeds the limit of {MAX_ARGV_BYTES} bytes in all (MAX_ARGV_BYTES): got {total}"
        )));
    }
    for (i, a) in argv.iter().enumerate() {
        if a.contains('\0') {
            return Err(ExecError::InvalidArgument(format!("argv[{i}] contains a NUL byte")));
        }
        if a.len() >= MAX_ARG_STRLEN {
            return Err(ExecError::InvalidArgument(format!(
                "argv[{i}] exceeds the kernel limit of {} bytes per argument (MAX_ARG_STRLEN): got {}",
                MAX_ARG_STRLEN - 1,
                a.len()
            )));
        }
    }
    Ok(())
}

/// An exec request checked against every limit of the API, ready to run.
#[derive(Debug, Clone)]
pub struct ValidatedExec {
    /// What to execute (and the code file, for large code).
    pub plan: CommandPlan,
    /// The wall-clock limit (the default filled in).
    pub timeout: Duration,
    /// The output cap (the default filled in).
    pub output_cap: u64,
    /// The working directory, relative to the workspace root, normalised.
    pub workdir: std::path::PathBuf,
}

/// Validates an exec request the same way for every backend: the timeout,
/// stdin size, the exec env, the command (argv and code limits) and the
/// workdir's lexical rules, in that order. This is the one place the data
/// plane checks an exec request: the agent's ExecService only turns the wire
/// request into an [`ExecSpec`], and the runtime it calls checks it here.
/// Limits answer OUT_OF_RANGE and malformed fields INVALID_ARGUMENT, with the
/// proto's field names. `code_path` is where large code is placed inside the
/// sandbox. Whether the workdir exists is checked by the caller against the
/// workspace ([`check_workdir`]).
pub fn validate(spec: &ExecSpec, code_path: &str) -> Result<ValidatedExec, ExecError> {
    let timeout = if spec.timeout.is_zero() { limits::DEFAULT_EXEC_TIMEOUT } else { spec.timeout };
    if timeout > limits::MAX_EXEC_TIMEOUT {
        return Err(ValidationError::over(
            "timeout_ms",
            format!("{} ms", limits::MAX_EXEC_TIMEOUT.as_millis()),
            timeout.as_millis(),
        )
        .into());
    }
    if spec.stdin.len() > limits::MAX_STDIN_BYTES {
        return Err(
            ValidationError::over("stdin", format!("{} bytes", limits::MAX_STDIN_BYTES), spec.stdin.len()).into()
        );
    }
    ids::validate_env("env", &spec.env)?;
    let plan = plan_command(&spec.command, code_path)?;
    let output_cap = if spec.output_cap == 0 { limits::DEFAULT_OUTPUT_CAP_BYTES } else { spec.output_cap };
    let workdir = Workspace::check_path(&spec.workdir).map_err(|e| match e {
        FsError::InvalidPath(m) => ExecError::InvalidArgument(format!("workdir: {m}")),
        other => ExecError::Workspace(other),
    })?;
    Ok(ValidatedExec { plan, timeout, output_cap, workdir })
}

/// Checks that `workdir` is a directory inside the workspace (not reached
/// through an escaping symlink).
pub async fn check_workdir(ws: &Workspace, workdir: &str) -> Result<(), ExecError> {
    match ws.is_dir(workdir).await {
        Ok(true) => Ok(()),
        Ok(false) => {
            Err(ExecError::InvalidArgument(format!("workdir {workdir:?} is not a directory in the workspace")))
        }
        Err(FsError::Escape(_)) => {
            Err(ExecError::InvalidArgument(format!("workdir {workdir:?} leads outside the workspace")))
        }
        Err(e) => Err(e.into()),
    }
}

/// Adds what the session's limits did to a finished exec: `oom_kills` OOM
/// kills (sets `oom_killed`) and `refused_forks` forks refused at the pids
/// limit, each with a message naming the limit. A command that a signal ended
/// without any limit of the exec being hit gets a message naming the signal
/// (see [`signal_message`]): every exec that did not end on its own has one.
pub fn note_limits(info: &mut ExitInfo, oom_kills: u64, memory_bytes: u64, refused_forks: u64, pids_limit: u32) {
    // The timeout, the output cap and a caller that went away set their message in `supervise`.
    let limit_hit = info.timed_out || info.output_truncated || !info.message.is_empty();
    if oom_kills > 0 {
        info.oom_killed = true;
        let msg = format!(
            "out of memory: the kernel OOM killer ended a process because the session reached its memory limit of {} bytes ({}, memory_bytes)",
            memory_bytes,
            sandfleet_common::quantity::format_memory(memory_bytes)
        );
        info.message = if info.message.is_empty() { msg } else { format!("{}; {msg}", info.message) };
    } else if info.signal != 0 && !limit_hit {
        info.message = signal_message(info.signal);
    }
    if refused_forks > 0 {
        let msg =
            format!("{refused_forks} fork(s) refused: the session reached its pids limit of {pids_limit} (pids_limit)");
        info.message = if info.message.is_empty() { msg } else { format!("{}; {msg}", info.message) };
    }
}

/// Why a command ended by signal `signal` did not end on its own, when no
/// limit of the exec sent the signal: a crash (SIGSEGV and the like), or a
/// signal sent from outside the command (or by the command to itself, which
/// the agent cannot tell apart).
pub fn signal_message(signal: i32) -> String {
    use nix::sys::signal::Signal;
    let name = Signal::try_from(signal).map(Signal::as_str).unwrap_or("unknown signal");
    match Signal::try_from(signal) {
        Ok(Signal::SIGSEGV | Signal::SIGBUS | Signal::SIGILL | Signal::SIGFPE | Signal::SIGABRT | Signal::SIGSYS) => {
            format!("killed by signal {signal} ({name}), raised by the command itself (a crash or an abort)")
        }
        _ => format!(
            "killed by signal {signal} ({name}) from outside the command: no limit of the exec (timeout, output cap, \
             memory) sent it, but another process (or the command itself)"
        ),
    }
}

/// Spawns `cmd` with piped stdin/stdout/stderr and `kill_on_drop`.
pub fn spawn(mut cmd: tokio::process::Command) -> std::io::Result<Child> {
    cmd.stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true);
    cmd.spawn()
}

/// Spawns `cmd` and supervises it: see [`supervise`].
pub async fn run(
    cmd: tokio::process::Command,
    stdin: Vec<u8>,
    timeout: Duration,
    output_cap: u64,
    out: mpsc::Sender<ExecEvent>,
    kill_tree: impl Fn() + Send,
) -> Result<ExitInfo, std::io::Error> {
    let started = Instant::now();
    let child = spawn(cmd)?;
    supervise(child, started, stdin, timeout, output_cap, out, kill_tree).await
}

/// Why the tree was killed before the command ended on its own.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum KillReason {
    Timeout,
    OutputCap,
    CallerGone,
    Lingering,
}

/// Supervises a spawned child until it and its output are done: writes
/// `stdin` then closes it, forwards output to `out`, enforces `timeout` and
/// `output_cap`, and calls `kill_tree` (after SIGKILL to the child itself)
/// whenever the command must die. `started` is when the spawn began, for
/// the reported duration.
#[instrument(skip_all, fields(pid = child.id()))]
pub async fn supervise(
    mut child: Child,
    started: Instant,
    stdin: Vec<u8>,
    timeout: Duration,
    output_cap: u64,
    out: mpsc::Sender<ExecEvent>,
    kill_tree: impl Fn() + Send,
) -> Result<ExitInfo, std::io::Error> {
    let deadline = started + timeout;
    let mut stdout: Option<ChildStdout> = child.stdout.take();
    let mut stderr: Option<ChildStderr> = child.stderr.take();
    let mut stdin_pipe = child.stdin.take();
    if stdin.is_empty() {
        stdin_pipe = None;
    }
    let stdin_task = async move {
        if let Some(mut w) = stdin_pipe {
            // EPIPE when the command does not read its stdin is fine.
            let _ = w.write_all(&stdin).await;
            let _ = w.shutdown().await;
        }
    };
    tokio::pin!(stdin_task);
    let mut stdin_done = false;

    let mut buf_out = vec![0u8; OUTPUT_CHUNK_BYTES];
    let mut buf_err = vec![0u8; OUTPUT_CHUNK_BYTES];
    let mut forwarded: u64 = 0;
    let mut truncated = false;
    let mut status: Option<ExitStatus> = None;
    let mut ended_at: Option<Instant> = None;
    let mut killed: Option<KillReason> = None;
    // After exit or kill, output is drained until this instant at the latest.
    let mut drain_until: Option<Instant> = None;

    let kill =
        |child: &mut Child, why: KillReason, killed: &mut Option<KillReason>, drain_until: &mut Option<Instant>| {
            if killed.is_none() {
                *killed = Some(why);
            }
            let _ = child.start_kill();
            kill_tree();
            *drain_until = Some(Instant::now() + KILL_DRAIN_GRACE);
        };

    loop {
        if status.is_some() && stdout.is_none() && stderr.is_none() {
            break;
        }
        let wake_at = drain_until.unwrap_or(deadline);
        tokio::select! {
            r = read_some(&mut stdout, &mut buf_out), if stdout.is_some() => match r {
                Ok(0) | Err(_) => stdout = None,
                Ok(n) => {
                    let data = Bytes::copy_from_slice(&buf_out[..n]);
                    if let Some(why) = forward(&out, ExecEvent::Stdout, data, output_cap, &mut forwarded, &mut truncated, deadline).await {
                        kill(&mut child, why, &mut killed, &mut drain_until);
                    }
                }
            },
            r = read_some(&mut stderr, &mut buf_err), if stderr.is_some() => match r {
                Ok(0) | Err(_) => stderr = None,
                Ok(n) => {
                    let data = Bytes::copy_from_slice(&buf_err[..n]);
                    if let Some(why) = forward(&out, ExecEvent::Stderr, data, output_cap, &mut forwarded, &mut truncated, deadline).await {
                        kill(&mut child, why, &mut killed, &mut drain_until);
                    }
                }
            },
            st = child.wait(), if status.is_none() => {
                let st = st?;
                ended_at = Some(Instant::now());
                status = Some(st);
                if drain_until.is_none() {
                    drain_until = Some(Instant::now() + EXIT_DRAIN_GRACE);
                }
            },
            () = &mut stdin_task, if !stdin_done => stdin_done = true,
            () = out.closed(), if killed.is_none() => {
                debug!("output receiver went away; killing the command");
                kill(&mut child, KillReason::CallerGone, &mut killed, &mut drain_until);
            },
            () = tokio::time::sleep_until(wake_at) => {
                if killed.is_some() {
                    // Killed, and the grace to drain is over: give up on the pipes.
                    stdout = None;
                    stderr = None;
                    if status.is_none() {
                        // The direct child ignores SIGKILL only if it is stuck in the kernel; wait for it.
                        match tokio::time::timeout(KILL_DRAIN_GRACE, child.wait()).await {
                            Ok(st) => { status = Some(st?); ended_at = Some(Instant::now()); }
                            Err(_) => {
                                warn!("command did not exit after SIGKILL");
                                break;
                            }
                        }
                    }
                } else if status.is_some() {
                    // Exited, but something it started still holds the pipes open.
                    debug!("command exited but its pipes are still open; killing the rest of its tree");
                    kill(&mut child, KillReason::Lingering, &mut killed, &mut drain_until);
                } else {
                    debug!(?timeout, "timeout expired; killing the command");
                    kill(&mut child, KillReason::Timeout, &mut killed, &mut drain_until);
                }
            },
        }
    }
    let duration = ended_at.unwrap_or_else(Instant::now).saturating_duration_since(started);
    let mut info = ExitInfo { duration, output_truncated: truncated, ..ExitInfo::default() };
    if let Some(st) = status {
        let (code, signal) = map_status(st);
        info.exit_code = code;
        info.signal = signal;
    } else {
        info.exit_code = 137;
        info.signal = libc::SIGKILL;
    }
    match killed {
        Some(KillReason::Timeout) => {
            info.timed_out = true;
            info.exit_code = 137;
            info.signal = libc::SIGKILL;
            info.message = format!("timed out after {} (timeout_ms limit)", format_secs(timeout));
        }
        Some(KillReason::OutputCap) => {
            info.message = format!("output exceeded the limit of {output_cap} bytes");
        }
        Some(KillReason::CallerGone) => {
            info.message = "cancelled: the caller stopped reading the output".to_string();
        }
        Some(KillReason::Lingering) | None => {}
    }
    Ok(info)
}

async fn read_some<R: tokio::io::AsyncRead + Unpin>(r: &mut Option<R>, buf: &mut [u8]) -> std::io::Result<usize> {
    match r {
        Some(r) => r.read(buf).await,
        None => std::future::pending().await,
    }
}

/// Forwards one chunk within the cap; returns why the tree must be killed, if it must.
async fn forward(
    out: &mpsc::Sender<ExecEvent>,
    make: fn(Bytes) -> ExecEvent,
    mut data: Bytes,
    cap: u64,
    forwarded: &mut u64,
    truncated: &mut bool,
    deadline: Instant,
) -> Option<KillReason> {
    if *truncated {
        return None;
    }
    let room = cap.saturating_sub(*forwarded);
    let over = data.len() as u64 > room;
    if over {
        data.truncate(room as usize);
    }
    if !data.is_empty() {
        *forwarded += data.len() as u64;
        // A slow reader must not stretch the command past its timeout.
        match tokio::time::timeout_at(deadline, out.send(make(data))).await {
            Ok(Ok(())) => {}
            Ok(Err(_)) => return Some(KillReason::CallerGone),
            Err(_) => return Some(KillReason::Timeout),
        }
    }
    if over {
        *truncated = true;
        return Some(KillReason::OutputCap);
    }
    None
}

/// Maps a wait status to (exit code, signal): 128+N for signal N, and the
/// 129..=192 convention of shells and bwrap back to the signal.
pub fn map_status(st: ExitStatus) -> (i32, i32) {
    use std::os::unix::process::ExitStatusExt as _;
    if let Some(code) = st.code() {
        let signal = if (129..=192).contains(&code) { code - 128 } else { 0 };
        (code, signal)
    } else if let Some(sig) = st.signal() {
        (128 + sig, sig)
    } else {
        (-1, 0)
    }
}

fn format_secs(d: Duration) -> String {
    let ms = d.as_millis();
    if ms.is_multiple_of(1000) {
        format!("{}s", ms / 1000)
    } else {
        let n = format!("{:.3}", d.as_secs_f64());
        format!("{}s", n.trim_end_matches('0'))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sh(script: &str) -> tokio::process::Command {
        let mut c = tokio::process::Command::new("/bin/sh");
        c.arg("-c").arg(script);
        c
    }

    async fn collect(mut rx: mpsc::Receiver<ExecEvent>) -> (Vec<u8>, Vec<u8>) {
        let (mut o, mut e) = (Vec::new(), Vec::new());
        while let Some(ev) = rx.recv().await {
            match ev {
                ExecEvent::Stdout(b) => o.extend_from_slice(&b),
                ExecEvent::Stderr(b) => e.extend_from_slice(&b),
            }
        }
        (o, e)
    }

    #[test]
    fn argv_forms_and_limits() {
        let a = command_argv(&Command::Code { language: Language::Python, code: "print(1)".into() }).unwrap();
        assert_eq!(a, vec!["python3", "-c", "print(1)"]);
        let a = command_argv(&Command::Code { language: Language::Node, code: "1".into() }).unwrap();
        assert_eq!(a[..2], ["node", "-e"]);
        let a = command_argv(&Command::Code { language: Language::Bash, code: "1".into() }).unwrap();
        assert_eq!(a[..2], ["bash", "-c"]);
        assert!(command_argv(&Command::Argv(vec![])).is_err());
        let e = command_argv(&Command::Argv(vec!["a\0b".into()])).unwrap_err().to_string();
        assert!(e.contains("NUL"), "{e}");
        let e = command_argv(&Command::Argv(vec!["x".into(); MAX_ARGV + 1])).unwrap_err().to_string();
        assert!(e.contains("MAX_ARGV"), "{e}");
        let e = command_argv(&Command::Argv(vec!["x".repeat(100_000); 3])).unwrap_err().to_string();
        assert!(e.contains("MAX_ARGV_BYTES"), "{e}");
        let e = command_argv(&Command::Code { language: Language::Bash, code: "x".repeat(MAX_CODE_BYTES + 1) })
            .unwrap_err()
            .to_string();
        assert!(e.contains("MAX_CODE_BYTES"), "{e}");
        let big = Command::Code { language: Language::Python, code: "#".repeat(200_000) };
        assert!(command_argv(&big).unwrap_err().to_string().contains("MAX_ARG_STRLEN"));
        let p = plan_command(&big, "/run/code").unwrap();
        assert_eq!(p.argv, vec!["python3", "/run/code"]);
        assert_eq!(p.code_file.unwrap().len(), 200_000);
        let p = plan_command(&Command::Argv(vec!["true".into()]), "/run/code").unwrap();
        assert_eq!(p, CommandPlan { argv: vec!["true".into()], code_file: None });
    }

    /// The codes and texts the data plane answers for an exec over a limit
    /// (chaos-tests' bad_input checks them end to end).
    #[test]
    fn validate_names_the_field_with_the_api_codes() {
        let ok = ExecSpec {
            command: Command::Argv(vec!["true".into()]),
            env: BTreeMap::new(),
            stdin: Vec::new(),
            workdir: String::new(),
            timeout: Duration::ZERO,
            output_cap: 0,
        };
        let v = validate(&ok, "/run/code").unwrap();
        assert_eq!((v.timeout, v.output_cap), (limits::DEFAULT_EXEC_TIMEOUT, limits::DEFAULT_OUTPUT_CAP_BYTES));
        let status = |spec: ExecSpec| tonic::Status::from(validate(&spec, "/run/code").unwrap_err());

        let s = status(ExecSpec { timeout: limits::MAX_EXEC_TIMEOUT + Duration::from_millis(1), ..ok.clone() });
        assert_eq!(s.code(), tonic::Code::OutOfRange);
        assert_eq!(s.message(), "timeout_ms exceeds the limit of 3600000 ms: got 3600001");
        let s = status(ExecSpec { stdin: vec![0; limits::MAX_STDIN_BYTES + 1], ..ok.clone() });
        assert_eq!(s.code(), tonic::Code::OutOfRange);
        assert_eq!(s.message(), "stdin exceeds the limit of 1048576 bytes: got 1048577");
        let s = status(ExecSpec { env: [("1X".to_string(), "v".to_string())].into(), ..ok.clone() });
        assert_eq!(s.code(), tonic::Code::InvalidArgument);
        assert!(s.message().starts_with("invalid env: key \"1X\""), "{}", s.message());
        let many = (0..=limits::MAX_ENV_ENTRIES).map(|i| (format!("K{i}"), String::new())).collect();
        assert_eq!(status(ExecSpec { env: many, ..ok.clone() }).code(), tonic::Code::OutOfRange);
        let s = status(ExecSpec { command: Command::Argv(vec![]), ..ok.clone() });
        assert_eq!(s.code(), tonic::Code::InvalidArgument);
        assert_eq!(s.message(), "argv is empty; give at least the program name");
        let s = status(ExecSpec { workdir: "../x".into(), ..ok.clone() });
        assert_eq!(s.code(), tonic::Code::InvalidArgument);
        assert!(s.message().starts_with("workdir: "), "{}", s.message());
        // The first rule broken is the one named: the timeout before stdin before the command.
        let s = status(ExecSpec {
            command: Command::Argv(vec![]),
            stdin: vec![0; limits::MAX_STDIN_BYTES + 1],
            timeout: Duration::from_secs(7200),
            ..ok.clone()
        });
        assert!(s.message().starts_with("timeout_ms"), "{}", s.message());
        // Code too large for one kernel argument is accepted: it runs as a file.
        let big = ExecSpec { command: Command::Code { language: Language::Python, code: "#".repeat(200_000) }, ..ok };
        assert_eq!(validate(&big, "/run/code").unwrap().plan.argv, ["python3", "/run/code"]);
    }

    #[test]
    fn status_mapping() {
        use std::os::unix::process::ExitStatusExt as _;
        assert_eq!(map_status(ExitStatus::from_raw(0)), (0, 0));
        assert_eq!(map_status(ExitStatus::from_raw(3 << 8)), (3, 0));
        assert_eq!(map_status(ExitStatus::from_raw(137 << 8)), (137, 9));
        assert_eq!(map_status(ExitStatus::from_raw(9)), (137, 9));
        assert_eq!(format_secs(Duration::from_millis(500)), "0.5s");
        assert_eq!(format_secs(Duration::from_secs(2)), "2s");
    }

    #[test]
    fn a_signal_that_no_limit_sent_gets_a_message() {
        let killed = ExitInfo { exit_code: 137, signal: 9, ..ExitInfo::default() };
        let mut info = killed.clone();
        note_limits(&mut info, 0, 1 << 28, 0, 64);
        assert_eq!(
            info.message,
            "killed by signal 9 (SIGKILL) from outside the command: no limit of the exec (timeout, output cap, \
             memory) sent it, but another process (or the command itself)"
        );
        assert!(!info.oom_killed && !info.timed_out);
        let mut info = ExitInfo { exit_code: 139, signal: 11, ..ExitInfo::default() };
        note_limits(&mut info, 0, 1 << 28, 2, 64);
        assert_eq!(
            info.message,
            "killed by signal 11 (SIGSEGV), raised by the command itself (a crash or an abort); \
             2 fork(s) refused: the session reached its pids limit of 64 (pids_limit)"
        );
        // The OOM killer's SIGKILL is named as the memory limit, not as a signal from outside.
        let mut info = killed.clone();
        note_limits(&mut info, 1, 64 << 20, 0, 64);
        assert!(info.oom_killed);
        assert!(info.message.starts_with("out of memory:") && !info.message.contains("outside"), "{}", info.message);
        // The timeout's and the output cap's messages stand alone.
        let mut info = ExitInfo { timed_out: true, message: "timed out after 1s (timeout_ms limit)".into(), ..killed };
        note_limits(&mut info, 0, 1 << 28, 0, 64);
        assert_eq!(info.message, "timed out after 1s (timeout_ms limit)");
        // A command that ended on its own has none.
        let mut info = ExitInfo { exit_code: 3, ..ExitInfo::default() };
        note_limits(&mut info, 0, 1 << 28, 0, 64);
        assert_eq!(info.message, "");
    }

    #[tokio::test]
    async fn streams_output_and_stdin() {
        let (tx, rx) = mpsc::channel(16);
        let h = tokio::spawn(collect(rx));
        let info = run(sh("cat; echo err >&2; exit 3"), b"hello".to_vec(), Duration::from_secs(10), 1 << 20, tx, || {})
            .await
            .unwrap();
        let (o, e) = h.await.unwrap();
        assert_eq!(o, b"hello");
        assert_eq!(e, b"err\n");
        assert_eq!(info.exit_code, 3);
        assert!(!info.timed_out && !info.output_truncated && info.message.is_empty());
    }

    #[tokio::test]
    async fn timeout_kills() {
        let (tx, rx) = mpsc::channel(16);
        let h = tokio::spawn(collect(rx));
        let t = std::time::Instant::now();
        let info = run(sh("exec sleep 30"), vec![], Duration::from_millis(300), 1 << 20, tx, || {}).await.unwrap();
        h.await.unwrap();
        assert!(t.elapsed() < Duration::from_secs(5));
        assert!(info.timed_out);
        assert_eq!((info.exit_code, info.signal), (137, 9));
        assert_eq!(info.message, "timed out after 0.3s (timeout_ms limit)");
    }

    #[tokio::test]
    async fn output_cap_truncates() {
        let (tx, rx) = mpsc::channel(16);
        let h = tokio::spawn(collect(rx));
        let info = run(sh("exec yes"), vec![], Duration::from_secs(20), 100_000, tx, || {}).await.unwrap();
        let (o, _) = h.await.unwrap();
        assert_eq!(o.len(), 100_000);
        assert!(info.output_truncated);
        assert_eq!(info.message, "output exceeded the limit of 100000 bytes");
    }

    #[tokio::test]
    async fn caller_gone_kills() {
        let (tx, rx) = mpsc::channel(1);
        drop(rx);
        let t = std::time::Instant::now();
        let info = run(sh("exec sleep 30"), vec![], Duration::from_secs(20), 1 << 20, tx, || {}).await.unwrap();
        assert!(t.elapsed() < Duration::from_secs(5));
        assert!(info.message.contains("cancelled"), "{info:?}");
    }

    #[tokio::test]
    async fn lingering_child_is_killed() {
        let (tx, rx) = mpsc::channel(16);
        let h = tokio::spawn(collect(rx));
        let killed = std::sync::atomic::AtomicBool::new(false);
        let t = std::time::Instant::now();
        let info = run(sh("sleep 5 & echo done"), vec![], Duration::from_secs(20), 1 << 20, tx, || {
            killed.store(true, std::sync::atomic::Ordering::SeqCst)
        })
        .await
        .unwrap();
        let (o, _) = h.await.unwrap();
        assert_eq!(o, b"done\n");
        assert_eq!(info.exit_code, 0);
        assert!(!info.timed_out);
        assert!(killed.load(std::sync::atomic::Ordering::SeqCst));
        assert!(t.elapsed() < Duration::from_secs(10));
    }
}
