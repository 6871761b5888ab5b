//! Parsers for command-line values: durations, quantities, `K=V` pairs,
//! session states, `ID:PATH` copy specs, and DNS-label sanitizing.

use std::path::PathBuf;
use std::time::Duration;

use sandfleet::proto;
use sandfleet_common::quantity;

/// `30s`, `1h 30m`, `500ms`; a bare number is seconds.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    if let Ok(secs) = s.parse::<u64>() {
        return Ok(Duration::from_secs(secs));
    }
    humantime::parse_duration(s).map_err(|e| format!("invalid duration {s:?}: {e} (examples: 30s, 5m, 1h)"))
}

/// `256Mi`, `1G`, `1073741824` → bytes.
pub fn parse_memory(s: &str) -> Result<u64, String> {
    quantity::parse_memory(s).map_err(|e| e.to_string())
}

/// `0.5`, `2`, `500m` → millicores.
pub fn parse_cpu(s: &str) -> Result<u32, String> {
    quantity::parse_cpu(s).map_err(|e| e.to_string())
}

/// `KEY=VALUE`; the value may be empty and may contain `=`.
pub fn parse_key_value(s: &str) -> Result<(String, String), String> {
    match s.split_once('=') {
        Some((k, v)) if !k.is_empty() => Ok((k.to_string(), v.to_string())),
        Some(_) => Err(format!("{s:?} has an empty key; expected KEY=VALUE")),
        None => Err(format!("{s:?} is not KEY=VALUE")),
    }
}

/// `running`, `RUNNING` or `SESSION_STATE_RUNNING`.
pub fn parse_state(s: &str) -> Result<proto::SessionState, String> {
    sandfleet::session::parse_state(s)
        .filter(|st| *st != proto::SessionState::Unspecified)
        .ok_or_else(|| format!("unknown state {s:?}; expected pending, running, lost, terminated or failed"))
}

/// One side of `session cp`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CpSpec {
    /// `-`: standard input or output.
    Stdio,
    /// A local path.
    Local(PathBuf),
    /// `ID:PATH` in a session's workspace.
    Remote {
        /// The session id.
        id: String,
        /// The workspace path.
        path: String,
    },
}

/// Parses a copy spec like `scp` does: `ID:PATH` is remote when `ID` is
/// non-empty and has no `/` (so `./a:b` and `/tmp/a:b` stay local); `-` is stdio.
pub fn parse_cp_spec(s: &str) -> Result<CpSpec, String> {
    if s.is_empty() {
        return Err("empty path".into());
    }
    if s == "-" {
        return Ok(CpSpec::Stdio);
    }
    if let Some((id, path)) = s.split_once(':') {
        if !id.is_empty() && !id.contains('/') {
            if path.is_empty() {
                return Err(format!("{s:?} names no path inside the session; expected ID:PATH"));
            }
            return Ok(CpSpec::Remote { id: id.to_string(), path: path.to_string() });
        }
    }
    Ok(CpSpec::Local(PathBuf::from(s)))
}

/// Checks that exactly one side of a copy is remote.
pub fn check_cp_pair(src: &CpSpec, dst: &CpSpec) -> Result<(), String> {
    match (src, dst) {
        (CpSpec::Remote { .. }, CpSpec::Remote { .. }) => {
            Err("both sides are sessions; copy through a local file instead".into())
        }
        (CpSpec::Remote { .. }, _) | (_, CpSpec::Remote { .. }) => Ok(()),
        _ => Err("one side must be a session path, written ID:PATH".into()),
    }
}

/// Turns a host name into a DNS label (`[a-z0-9-]`, 1-63, no leading or
/// trailing `-`); `None` when nothing usable is left.
pub fn sanitize_dns_label(s: &str) -> Option<String> {
    let mut out = String::with_capacity(s.len());
    for c in s.trim().chars() {
        let c = c.to_ascii_lowercase();
        let c = if c.is_ascii_lowercase() || c.is_ascii_digit() { c } else { '-' };
        if c == '-' && (out.is_empty() || out.ends_with('-')) {
            continue;
        }
        out.push(c);
    }
    out.truncate(63);
    let out = out.trim_matches('-').to_string();
    (!out.is_empty()).then_some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn key_values() {
        assert_eq!(parse_key_value("A=1"), Ok(("A".into(), "1".into())));
        assert_eq!(parse_key_value("A="), Ok(("A".into(), String::new())));
        assert_eq!(parse_key_value("URL=a=b"), Ok(("URL".into(), "a=b".into())));
        assert!(parse_key_value("=1").is_err());
        assert!(parse_key_value("A").is_err());
    }

    #[test]
    fn cp_specs() {
        let id = "0190c8f2-0000-7000-8000-000000000001";
        assert_eq!(
            parse_cp_spec(&format!("{id}:out/a.txt")),
            Ok(CpSpec::Remote { id: id.into(), path: "out/a.txt".into() })
        );
        // The path part may itself hold colons.
        assert_eq!(parse_cp_spec("s1:a:b"), Ok(CpSpec::Remote { id: "s1".into(), path: "a:b".into() }));
        // `ID:` with no path is a usage error.
        assert!(parse_cp_spec(&format!("{id}:")).is_err());
        assert!(parse_cp_spec("").is_err());
        assert_eq!(parse_cp_spec("-"), Ok(CpSpec::Stdio));
        assert_eq!(parse_cp_spec("./a:b"), Ok(CpSpec::Local("./a:b".into())));
        assert_eq!(parse_cp_spec("/tmp/x:y"), Ok(CpSpec::Local("/tmp/x:y".into())));
        assert_eq!(parse_cp_spec(":x"), Ok(CpSpec::Local(":x".into())));
        assert_eq!(parse_cp_spec("file.txt"), Ok(CpSpec::Local("file.txt".into())));
        // `..` is passed through: the agent refuses it.
        assert_eq!(parse_cp_spec("s1:../x"), Ok(CpSpec::Remote { id: "s1".into(), path: "../x".into() }));
    }

    #[test]
    fn cp_pairs() {
        let r = CpSpec::Remote { id: "s".into(), path: "p".into() };
        let l = CpSpec::Local("x".into());
        assert!(check_cp_pair(&r, &l).is_ok());
        assert!(check_cp_pair(&CpSpec::Stdio, &r).is_ok());
        assert!(check_cp_pair(&r, &r).is_err());
        assert!(check_cp_pair(&l, &CpSpec::Stdio).is_err());
    }

    #[test]
    fn durations_and_quantities() {
        assert_eq!(parse_duration("30s"), Ok(Duration::from_secs(30)));
        assert_eq!(parse_duration("1h"), Ok(Duration::from_secs(3600)));
        assert_eq!(parse_duration("45"), Ok(Duration::from_secs(45)));
        assert_eq!(parse_duration("250ms"), Ok(Duration::from_millis(250)));
        assert!(parse_duration("soon").is_err());
        assert_eq!(parse_memory("256Mi"), Ok(256 << 20));
        assert!(parse_memory("lots").is_err());
        assert_eq!(parse_cpu("0.5"), Ok(500));
        assert_eq!(parse_cpu("250m"), Ok(250));
        assert!(parse_cpu("x").is_err());
        assert_eq!(parse_state("running"), Ok(proto::SessionState::Running));
        assert!(parse_state("unspecified").is_err());
        assert!(parse_state("nope").is_err());
    }

    #[test]
    fn dns_labels() {
        assert_eq!(sanitize_dns_label("My_Laptop.local").as_deref(), Some("my-laptop-local"));
        assert_eq!(sanitize_dns_label("--a--b--\n").as_deref(), Some("a-b"));
        assert_eq!(sanitize_dns_label("___"), None);
        assert_eq!(sanitize_dns_label(""), None);
        let long = sanitize_dns_label(&"x".repeat(100)).unwrap_or_default();
        assert_eq!(long.len(), 63);
        assert!(sandfleet_common::ids::validate_node_id(&long).is_ok());
    }
}
