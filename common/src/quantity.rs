//! Resource quantities as people write them, in the Kubernetes style.
//!
//! Memory: `268435456`, `256Mi`, `1Gi`, `512M`, `2G`, `64Ki`, `100k`.
//! CPU: `0.5`, `2`, `500m` (millicores).

/// A quantity could not be parsed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid {what} quantity {input:?}: {reason}")]
pub struct QuantityError {
    what: &'static str,
    input: String,
    reason: &'static str,
}

/// Parses a memory quantity into bytes.
pub fn parse_memory(s: &str) -> Result<u64, QuantityError> {
    let err = |reason| QuantityError { what: "memory", input: s.to_string(), reason };
    let s = s.trim();
    let split = s.find(|c: char| !c.is_ascii_digit() && c != '.').unwrap_or(s.len());
    let (num, unit) = s.split_at(split);
    if num.is_empty() {
        return Err(err("expected a number, e.g. 256Mi"));
    }
    let mult: u64 = match unit {
        "" => 1,
        "k" | "K" => 1000,
        "M" => 1000_u64.pow(2),
        "G" => 1000_u64.pow(3),
        "T" => 1000_u64.pow(4),
        "Ki" => 1 << 10,
        "Mi" => 1 << 20,
        "Gi" => 1 << 30,
        "Ti" => 1 << 40,
        _ => return Err(err("unknown unit; use Ki, Mi, Gi, Ti, k, M, G or T")),
    };
    let value: f64 = num.parse().map_err(|_| err("not a number"))?;
    let bytes = value * mult as f64;
    if !bytes.is_finite() || bytes < 0.0 || bytes > u64::MAX as f64 {
        return Err(err("out of range"));
    }
    Ok(bytes.round() as u64)
}

/// Parses a CPU quantity into millicores.
pub fn parse_cpu(s: &str) -> Result<u32, QuantityError> {
    let err = |reason| QuantityError { what: "cpu", input: s.to_string(), reason };
    let s = s.trim();
    let millis = if let Some(m) = s.strip_suffix('m') {
        m.parse::<u32>().map_err(|_| err("expected whole millicores, e.g. 500m"))? as f64
    } else {
        s.parse::<f64>().map_err(|_| err("expected cores, e.g. 0.5, or millicores, e.g. 500m"))? * 1000.0
    };
    if !millis.is_finite() || millis < 0.0 || millis > u32::MAX as f64 {
        return Err(err("out of range"));
    }
    Ok(millis.round() as u32)
}

/// Formats bytes with a binary unit, as `parse_memory` reads it back.
pub fn format_memory(bytes: u64) -> String {
    for (unit, m) in [("Ti", 1u64 << 40), ("Gi", 1 << 30), ("Mi", 1 << 20), ("Ki", 1 << 10)] {
        if bytes >= m && bytes.is_multiple_of(m) {
            return format!("{}{unit}", bytes / m);
        }
    }
    bytes.to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn memory() {
        assert_eq!(parse_memory("256Mi").unwrap(), 256 << 20);
        assert_eq!(parse_memory("1G").unwrap(), 1_000_000_000);
        assert_eq!(parse_memory("1024").unwrap(), 1024);
        assert_eq!(parse_memory("1.5Gi").unwrap(), 3 << 29);
        assert!(parse_memory("12Zi").is_err());
        assert!(parse_memory("Mi").is_err());
        assert_eq!(format_memory(256 << 20), "256Mi");
    }

    #[test]
    fn cpu() {
        assert_eq!(parse_cpu("0.5").unwrap(), 500);
        assert_eq!(parse_cpu("250m").unwrap(), 250);
        assert_eq!(parse_cpu("2").unwrap(), 2000);
        assert!(parse_cpu("x").is_err());
        assert!(parse_cpu("-1").is_err());
    }
}
