//! Validation of identifiers and small strings that cross the API.
//!
//! Every function returns a [`ValidationError`] naming the field and the rule,
//! which servers turn into `INVALID_ARGUMENT`.

use std::collections::HashMap;

use crate::limits;

/// A request field broke a rule. Servers answer `INVALID_ARGUMENT` (or
/// `OUT_OF_RANGE` for limits and ranges) with this text.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ValidationError {
    /// The field is malformed.
    #[error("invalid {field}: {reason}")]
    Invalid {
        /// Which field.
        field: &'static str,
        /// What is wrong.
        reason: String,
    },
    /// The field is over a documented limit.
    #[error("{field} exceeds the limit of {limit}: got {got}")]
    OverLimit {
        /// Which field.
        field: &'static str,
        /// The limit, with its unit.
        limit: String,
        /// The value given.
        got: String,
    },
    /// The field is outside its documented range (below its least or above its most).
    #[error("{field} is out of range: got {got}, allowed {allowed}")]
    OutOfRange {
        /// Which field.
        field: &'static str,
        /// The allowed range, with its unit.
        allowed: String,
        /// The value given.
        got: String,
    },
    /// A batch's patch for one replica makes that replica's spec invalid.
    #[error("patches[{index}]: {source}")]
    InPatch {
        /// Which replica.
        index: usize,
        /// What is wrong with its patched spec.
        source: Box<ValidationError>,
    },
}

impl ValidationError {
    /// A malformed field.
    pub fn invalid(field: &'static str, reason: impl Into<String>) -> Self {
        Self::Invalid { field, reason: reason.into() }
    }

    /// A field outside its range.
    pub fn out_of_range(field: &'static str, allowed: impl ToString, got: impl ToString) -> Self {
        Self::OutOfRange { field, allowed: allowed.to_string(), got: got.to_string() }
    }

    /// A field over its limit.
    pub fn over(field: &'static str, limit: impl ToString, got: impl ToString) -> Self {
        Self::OverLimit { field, limit: limit.to_string(), got: got.to_string() }
    }
}

impl From<ValidationError> for tonic::Status {
    fn from(e: ValidationError) -> Self {
        match e {
            ValidationError::Invalid { .. } => tonic::Status::invalid_argument(e.to_string()),
            ValidationError::OverLimit { .. } | ValidationError::OutOfRange { .. } => {
                tonic::Status::out_of_range(e.to_string())
            }
            ValidationError::InPatch { ref source, .. } => {
                let code = tonic::Status::from((**source).clone()).code();
                tonic::Status::new(code, e.to_string())
            }
        }
    }
}

/// A session id is a lowercase, hyphenated UUID.
pub fn validate_session_id(id: &str) -> Result<(), ValidationError> {
    let ok = id.len() == 36
        && uuid::Uuid::parse_str(id).is_ok()
        && id.bytes().all(|b| b == b'-' || b.is_ascii_digit() || (b'a'..=b'f').contains(&b));
    if ok {
        Ok(())
    } else {
        Err(ValidationError::invalid("session id", format!("{:?} is not a lowercase hyphenated UUID", truncate(id))))
    }
}

/// A new session id.
pub fn new_session_id() -> String {
    uuid::Uuid::now_v7().hyphenated().to_string()
}

/// Node ids and template names are DNS labels: 1-63 of `[a-z0-9-]`, not starting or ending with `-`.
pub fn validate_dns_label(field: &'static str, s: &str) -> Result<(), ValidationError> {
    if s.is_empty() || s.len() > 63 {
        return Err(ValidationError::invalid(field, format!("{:?} must be 1-63 characters", truncate(s))));
    }
    let ok = s.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !s.starts_with('-')
        && !s.ends_with('-');
    if ok {
        Ok(())
    } else {
        Err(ValidationError::invalid(
            field,
            format!("{:?} must be lowercase letters, digits and '-', not starting or ending with '-'", truncate(s)),
        ))
    }
}

/// A node id.
pub fn validate_node_id(s: &str) -> Result<(), ValidationError> {
    validate_dns_label("node id", s)
}

/// A template name.
pub fn validate_template(s: &str) -> Result<(), ValidationError> {
    validate_dns_label("template", s)
}

/// A client request id: 1-128 of `[A-Za-z0-9._:-]`.
pub fn validate_request_id(s: &str) -> Result<(), ValidationError> {
    if s.is_empty() {
        return Err(ValidationError::invalid("request_id", "must not be empty; pass a unique id per logical create"));
    }
    if s.len() > 128 {
        return Err(ValidationError::over("request_id", "128 characters", s.len()));
    }
    if !s.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b':' | b'-')) {
        return Err(ValidationError::invalid("request_id", format!("{:?} may only hold [A-Za-z0-9._:-]", truncate(s))));
    }
    Ok(())
}

fn is_label_char(b: u8) -> bool {
    b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-')
}

/// Longest label key prefix (a DNS subdomain, as in Kubernetes).
pub const MAX_LABEL_PREFIX: usize = 253;
/// Longest label name (the key after its prefix) and label value.
pub const MAX_LABEL_NAME: usize = 63;

/// True for a DNS subdomain: at most 253 characters, dot-separated labels of
/// 1-63 of `[a-z0-9-]`, each starting and ending with a letter or digit.
pub fn is_dns_subdomain(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= MAX_LABEL_PREFIX
        && s.split('.').all(|l| {
            !l.is_empty()
                && l.len() <= 63
                && l.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
                && !l.starts_with('-')
                && !l.ends_with('-')
        })
}

/// One label key: an optional prefix and `/`, then a name. The prefix is a
/// DNS subdomain of at most 253 characters (`topology.kubernetes.io`); the
/// name is 1-63 of `[A-Za-z0-9._-]`. This is Kubernetes' label key syntax
/// (whose names must also start and end with a letter or digit), so every
/// Kubernetes label key is a Sandfleet label key.
pub fn validate_label_key(field: &'static str, k: &str) -> Result<(), ValidationError> {
    let (prefix, name) = match k.split_once('/') {
        Some((p, n)) => (Some(p), n),
        None => (None, k),
    };
    let name_ok = !name.is_empty() && name.len() <= MAX_LABEL_NAME && name.bytes().all(is_label_char);
    if !name_ok || prefix.is_some_and(|p| !is_dns_subdomain(p)) {
        return Err(ValidationError::invalid(
            field,
            format!(
                "key {:?} must be an optional DNS subdomain prefix of at most 253 characters and '/', \
                 then 1-63 of [A-Za-z0-9._-]",
                truncate(k)
            ),
        ));
    }
    Ok(())
}

/// One label value: 0-63 of `[A-Za-z0-9._-]` (every Kubernetes label value fits).
pub fn validate_label_value(field: &'static str, k: &str, v: &str) -> Result<(), ValidationError> {
    if v.len() > MAX_LABEL_NAME || !v.bytes().all(is_label_char) {
        return Err(ValidationError::invalid(field, format!("value of {k:?} must be 0-63 of [A-Za-z0-9._-]")));
    }
    Ok(())
}

/// Labels: at most [`limits::MAX_LABELS`]; keys as [`validate_label_key`]
/// (`team`, `topology.kubernetes.io/zone`), values 0-63 of `[A-Za-z0-9._-]`.
pub fn validate_labels(field: &'static str, labels: &HashMap<String, String>) -> Result<(), ValidationError> {
    if labels.len() > limits::MAX_LABELS {
        return Err(ValidationError::over(field, format!("{} labels", limits::MAX_LABELS), labels.len()));
    }
    for (k, v) in labels {
        validate_label_key(field, k)?;
        validate_label_value(field, k, v)?;
    }
    Ok(())
}

/// The reason of a node's hold: at most [`limits::MAX_HOLD_REASON_BYTES`]
/// bytes, without control characters.
pub fn validate_hold_reason(reason: &str) -> Result<(), ValidationError> {
    if reason.len() > limits::MAX_HOLD_REASON_BYTES {
        return Err(ValidationError::over("reason", format!("{} bytes", limits::MAX_HOLD_REASON_BYTES), reason.len()));
    }
    if reason.chars().any(char::is_control) {
        return Err(ValidationError::invalid("reason", "must not contain control characters"));
    }
    Ok(())
}

/// Environment: at most [`limits::MAX_ENV_ENTRIES`]; keys `[A-Za-z_][A-Za-z0-9_]*`; no NUL in values.
pub fn validate_env<'a, I>(field: &'static str, env: I) -> Result<(), ValidationError>
where
    I: IntoIterator<Item = (&'a String, &'a String)>,
    I::IntoIter: ExactSizeIterator,
{
    let env = env.into_iter();
    if env.len() > limits::MAX_ENV_ENTRIES {
        return Err(ValidationError::over(field, format!("{} variables", limits::MAX_ENV_ENTRIES), env.len()));
    }
    for (k, v) in env {
        let mut bytes = k.bytes();
        let first_ok = matches!(bytes.next(), Some(b) if b.is_ascii_alphabetic() || b == b'_');
        if !first_ok || !bytes.all(|b| b.is_ascii_alphanumeric() || b == b'_') || k.len() > 256 {
            return Err(ValidationError::invalid(
                field,
                format!("key {:?} must match [A-Za-z_][A-Za-z0-9_]*", truncate(k)),
            ));
        }
        if v.len() > limits::MAX_ENV_VALUE_BYTES {
            return Err(ValidationError::over(
                field,
                format!("{} bytes per value", limits::MAX_ENV_VALUE_BYTES),
                v.len(),
            ));
        }
        if v.contains('\0') {
            return Err(ValidationError::invalid(field, format!("value of {k} contains a NUL byte")));
        }
    }
    Ok(())
}

fn truncate(s: &str) -> String {
    s.chars().take(80).collect()
}

/// One initial member, `ID=HOST:PORT`, as `sandfleet cluster init` and
/// `sandfleet-coordinator --initial-members` take it: a non-zero Raft id and
/// a non-empty address (the servers check the address further).
pub fn parse_member(s: &str) -> Result<(u64, String), String> {
    let (id, addr) = s.split_once('=').ok_or_else(|| format!("{s:?} is not ID=HOST:PORT"))?;
    let id: u64 = id.trim().parse().map_err(|_| format!("member id {id:?} is not a positive integer"))?;
    if id == 0 {
        return Err("member ids start at 1".into());
    }
    let addr = addr.trim();
    if addr.is_empty() {
        return Err(format!("member {id} has an empty address"));
    }
    Ok((id, addr.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn session_ids() {
        let id = new_session_id();
        assert!(validate_session_id(&id).is_ok());
        assert!(validate_session_id(&id.to_uppercase()).is_err());
        assert!(validate_session_id("../etc").is_err());
        assert!(validate_session_id("").is_err());
    }

    #[test]
    fn labels_and_templates() {
        assert!(validate_template("python").is_ok());
        assert!(validate_template("Python").is_err());
        assert!(validate_template("-x").is_err());
        assert!(validate_template(&"a".repeat(64)).is_err());
        let mut l = HashMap::new();
        l.insert("team".to_string(), "ml".to_string());
        assert!(validate_labels("labels", &l).is_ok());
        l.insert("bad key".to_string(), "x".to_string());
        assert!(validate_labels("labels", &l).is_err());
    }

    #[test]
    fn label_keys_follow_kubernetes_syntax() {
        let ok = [
            "team",
            "_x.y-z",
            "topology.kubernetes.io/zone",
            "kubernetes.io/hostname",
            "node-role.kubernetes.io/control-plane",
            "a/b",
            "feature.node.kubernetes.io/cpu-cpuid.AVX512F",
        ];
        for k in ok {
            assert_eq!(validate_label_key("labels", k), Ok(()), "{k}");
        }
        let prefix = |last: usize| {
            format!("{}.io", ["a".repeat(63), "b".repeat(63), "c".repeat(63), "d".repeat(last)].join("."))
        };
        assert_eq!(prefix(58).len(), 253);
        assert!(validate_label_key("labels", &format!("{}/zone", prefix(58))).is_ok());
        assert!(validate_label_key("labels", &format!("{}/zone", prefix(59))).is_err(), "prefix over 253");
        assert!(validate_label_key("labels", &format!("{}.io/zone", "a".repeat(64))).is_err(), "DNS label over 63");
        assert!(validate_label_key("labels", &format!("x/{}", "n".repeat(63))).is_ok());
        let bad = [
            "",
            "/zone",                       // empty prefix
            "topology.kubernetes.io/",     // empty name
            "a/b/c",                       // two slashes
            "Topology.kubernetes.io/zone", // upper case in the prefix
            "-x.io/zone",                  // a prefix label starting with '-'
            "x..io/zone",                  // an empty prefix label
            "x_y.io/zone",                 // '_' in the prefix
            "x.io/zo ne",                  // space in the name
            "x.io/zone=a",                 // '=' in the name
        ];
        for k in bad {
            let e = validate_label_key("labels", k).unwrap_err();
            assert!(e.to_string().contains("DNS subdomain prefix"), "{k}: {e}");
        }
        assert!(validate_label_key("labels", &"n".repeat(64)).is_err(), "name over 63");
        assert!(validate_label_key("labels", &format!("x.io/{}", "n".repeat(64))).is_err(), "name over 63");
        // Values: what Kubernetes allows, and Sandfleet's own (which may start with '.', '-' or '_').
        assert!(validate_label_value("labels", "k", "").is_ok());
        assert!(validate_label_value("labels", "k", "eu-west-1a").is_ok());
        assert!(validate_label_value("labels", "k", "-x_").is_ok());
        assert!(validate_label_value("labels", "k", &"v".repeat(63)).is_ok());
        assert!(validate_label_value("labels", "k", &"v".repeat(64)).is_err());
        assert!(validate_label_value("labels", "k", "a/b").is_err());
        let mut l = HashMap::new();
        l.insert("topology.kubernetes.io/zone".to_string(), "a".to_string());
        l.insert("kubernetes.io/arch".to_string(), "amd64".to_string());
        assert!(validate_labels("node_selector", &l).is_ok());
    }

    #[test]
    fn hold_reasons() {
        assert!(validate_hold_reason("kubernetes: NoExecute taint node.kubernetes.io/unreachable").is_ok());
        assert!(validate_hold_reason("").is_ok());
        assert!(validate_hold_reason(&"r".repeat(256)).is_ok());
        assert!(matches!(validate_hold_reason(&"r".repeat(257)), Err(ValidationError::OverLimit { .. })));
        assert!(validate_hold_reason("a\nb").is_err());
    }

    #[test]
    fn request_ids_and_env() {
        assert!(validate_request_id("req-1:a.b_c").is_ok());
        assert!(validate_request_id("").is_err());
        assert!(matches!(validate_request_id(&"a".repeat(129)), Err(ValidationError::OverLimit { .. })));
        let mut env = HashMap::new();
        env.insert("PATH_X".to_string(), "1".to_string());
        assert!(validate_env("env", &env).is_ok());
        env.insert("1BAD".to_string(), "1".to_string());
        assert!(validate_env("env", &env).is_err());
    }
}
