//! A cluster that forms by itself, as a Kubernetes StatefulSet runs it.
//!
//! - [`id_from_hostname`]: `--id-from-hostname` takes the member id from the
//!   pod ordinal of a StatefulSet hostname, `<statefulset>-<ordinal>`: id =
//!   ordinal + 1 (Raft ids start at 1).
//! - [`run`]: `--initial-members ID=HOST:PORT,...` lists every initial voter
//!   (in a StatefulSet, the headless Service's DNS names of the pods). The
//!   member with the lowest id initializes the cluster, through the same code
//!   as `sandfleet cluster init` ([`crate::service::cluster::initialize`]),
//!   once every other member answers with its expected id and none belongs to
//!   a cluster yet. The others do nothing: they join when the new leader
//!   reaches them.
//!
//! It is idempotent: a member that already belongs to a cluster (its own log
//! or vote, or any other member's) leaves the membership alone. Restarts,
//! rolling upgrades and a member that comes back with its volume never
//! initialize again; a member that comes back with an *empty* volume is not
//! re-added by this either (see docs/operations.md: remove and add it).

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use sandfleet_common::backoff::Backoff;
use tokio_util::sync::CancellationToken;

use crate::core::Core;
use crate::service::cluster::{initialize, remote_status};

/// The wait between two rounds of probes: from 200 ms up to 5 s (DNS names of
/// pods that do not run yet do not resolve; an answer can take that long).
const RETRY: Backoff = Backoff::new(Duration::from_millis(200), Duration::from_secs(5)).with_floor_percent(50);

/// The member id of a StatefulSet pod: its hostname is `<name>-<ordinal>`
/// (only the first DNS label counts, should the hostname be a FQDN), and the
/// id is the ordinal plus one.
pub fn id_from_hostname(hostname: &str) -> Result<u64, String> {
    let label = hostname.trim().split('.').next().unwrap_or_default();
    let bad = |why: String| {
        format!(
            "cannot take a member id from the hostname {hostname:?}: {why}; --id-from-hostname expects a \
             StatefulSet pod name, <statefulset>-<ordinal> (e.g. sandfleet-coordinator-0 is member 1); \
             give --id elsewhere"
        )
    };
    let (name, ordinal) = label.rsplit_once('-').ok_or_else(|| bad("it has no '-<ordinal>' suffix".into()))?;
    if name.is_empty() {
        return Err(bad("the name before the ordinal is empty".into()));
    }
    if ordinal.is_empty() || !ordinal.bytes().all(|b| b.is_ascii_digit()) {
        return Err(bad(format!("{ordinal:?} after the last '-' is not an ordinal (digits only)")));
    }
    if ordinal.len() > 1 && ordinal.starts_with('0') {
        return Err(bad(format!("the ordinal {ordinal:?} has a leading zero")));
    }
    let ordinal: u64 = ordinal.parse().map_err(|_| bad(format!("the ordinal {ordinal} is too large")))?;
    ordinal.checked_add(1).ok_or_else(|| bad(format!("the ordinal {ordinal} is too large")))
}

/// This machine's hostname (`gethostname`): in a pod, the pod's name.
pub fn hostname() -> Result<String, String> {
    let mut buf = [0u8; 256];
    // SAFETY: the buffer is valid for its length; gethostname writes at most that much.
    let r = unsafe { libc::gethostname(buf.as_mut_ptr().cast(), buf.len()) };
    if r != 0 {
        return Err(format!("gethostname failed: {}", std::io::Error::last_os_error()));
    }
    let end = buf.iter().position(|b| *b == 0).unwrap_or(buf.len());
    String::from_utf8(buf[..end].to_vec()).map_err(|_| "the hostname is not UTF-8".to_string())
}

/// What one round found.
#[derive(Debug, PartialEq, Eq)]
enum Round {
    /// This member initialized the cluster now.
    Initialized,
    /// A cluster exists already; nothing to do.
    LeftAlone(String),
    /// Not yet: the reason.
    Wait(String),
}

/// The automatic `cluster init` of `--initial-members` (see the module docs),
/// until it is done or `shutdown` fires. The member that initializes writes
/// the first admin API key to `admin_key_file`, as `--bootstrap` does.
pub async fn run(
    core: Arc<Core>,
    members: BTreeMap<u64, String>,
    admin_key_file: Option<PathBuf>,
    shutdown: CancellationToken,
) {
    let Some(&initializer) = members.keys().next() else { return };
    if core.id != initializer {
        tracing::info!(initializer, "member {initializer} initializes the cluster once every member answers");
        return;
    }
    let mut attempt = 0u32;
    let mut last_wait = String::new();
    loop {
        match round(&core, &members).await {
            Round::Initialized => break,
            Round::LeftAlone(why) => {
                tracing::info!("not initializing: {why}");
                return;
            }
            Round::Wait(why) => {
                if why != last_wait {
                    tracing::info!(attempt, "waiting to initialize the cluster: {why}");
                    last_wait = why;
                }
            }
        }
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(RETRY.delay(attempt)) => {}
        }
        attempt = attempt.saturating_add(1);
    }
    tracing::info!(members = ?members, "initialized the cluster from --initial-members");
    let Some(path) = admin_key_file else { return };
    // The key is made through the new leader; wait for one however long it takes.
    let wait = core.raft.wait(None);
    let led = tokio::select! {
        _ = shutdown.cancelled() => return,
        led = wait.metrics(|m| m.current_leader.is_some(), "leader elected") => led,
    };
    if led.is_err() {
        return;
    }
    if let Err(e) = crate::write_admin_key(&core, &path).await {
        tracing::error!(
            error = %e,
            "the cluster is initialized, but the first admin key could not be written; \
             create one with a client certificate (sandfleet apikey create --tenant default --role admin)"
        );
    }
}

/// One round: is there a cluster already, does every member answer as
/// itself, and if so initialize.
async fn round(core: &Core, members: &BTreeMap<u64, String>) -> Round {
    match core.raft.is_initialized().await {
        Ok(true) => return Round::LeftAlone("this member already belongs to a cluster".into()),
        Ok(false) => {}
        Err(e) => return Round::Wait(format!("raft: {e}")),
    }
    let others = members.iter().filter(|(id, _)| **id != core.id);
    let answers = futures::future::join_all(
        others.map(|(id, addr)| async move { (*id, addr.as_str(), remote_status(core, addr).await) }),
    )
    .await;
    let mut missing = Vec::new();
    for (id, addr, answer) in answers {
        match answer {
            Ok(status) if status.id != id => {
                missing.push(format!("{addr} answers as member {}, not as member {id}", status.id))
            }
            Ok(status) if status.initialized => {
                return Round::LeftAlone(format!("member {id} at {addr} already belongs to a cluster"))
            }
            Ok(_) => {}
            Err(e) => missing.push(format!("member {id} at {addr} does not answer yet ({})", e.message())),
        }
    }
    if !missing.is_empty() {
        return Round::Wait(missing.join("; "));
    }
    match initialize(core, members).await {
        Ok(()) => Round::Initialized,
        // Initialized, but the first leader is slow: initialized all the same.
        Err(s) if s.code() == tonic::Code::DeadlineExceeded => Round::Initialized,
        Err(s) => Round::Wait(format!("initializing failed: {}", s.message())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_id_is_the_ordinal_plus_one() {
        assert_eq!(id_from_hostname("sandfleet-coordinator-0"), Ok(1));
        assert_eq!(id_from_hostname("sandfleet-coordinator-2"), Ok(3));
        assert_eq!(id_from_hostname("c-10"), Ok(11));
        assert_eq!(
            id_from_hostname("sandfleet-coordinator-1.sandfleet-coordinator.sandfleet.svc.cluster.local"),
            Ok(2)
        );
        assert_eq!(id_from_hostname(" web-7\n"), Ok(8));
    }

    #[test]
    fn hostnames_without_an_ordinal_are_refused_precisely() {
        for (hostname, why) in [
            ("sandfleet", "no '-<ordinal>' suffix"),
            ("", "no '-<ordinal>' suffix"),
            ("-3", "the name before the ordinal is empty"),
            ("coordinator-", "\"\" after the last '-' is not an ordinal"),
            ("coordinator-a", "\"a\" after the last '-' is not an ordinal"),
            ("coordinator-1x", "\"1x\" after the last '-' is not an ordinal"),
            ("coordinator-01", "leading zero"),
            ("coordinator-18446744073709551615", "too large"),
            ("coordinator-99999999999999999999", "too large"),
        ] {
            let err = id_from_hostname(hostname).unwrap_err();
            assert!(err.contains(why), "{hostname:?}: {err}");
            assert!(err.contains("--id-from-hostname expects a StatefulSet pod name"), "{err}");
        }
    }

    #[test]
    fn this_machine_has_a_hostname() {
        assert!(!hostname().unwrap().is_empty());
    }
}
