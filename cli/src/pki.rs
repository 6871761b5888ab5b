//! `sandfleet pki init|issue`: the cluster CA and the certificates of
//! coordinators, agents and clients, written to a directory (no cluster needed).
//!
//! The work is `sandfleet_common::pki`; this module parses the arguments and
//! prints what was written (text, or one JSON object with `--output json`).

use std::path::{Path, PathBuf};

use clap::Subcommand;
use sandfleet_common::auth::IdentityKind;
use sandfleet_common::pki::{self, rfc3339, San};
use serde_json::json;

use super::output::{out, print_json, OutputFormat};

/// `sandfleet pki ...`.
#[derive(Debug, Subcommand)]
pub enum PkiCmd {
    /// Make a cluster CA: DIR/ca.crt (give it to every process as --tls-ca) and
    /// DIR/ca.key (mode 0600; keep it off the cluster's hosts). Valid 10 years.
    Init {
        /// Directory to write to (created, mode 0700, when missing).
        #[arg(long, value_name = "DIR")]
        dir: PathBuf,
        /// Replace an existing CA (every certificate it issued stops being trusted).
        #[arg(long)]
        force: bool,
    },
    /// Issue a certificate with the CA in DIR: writes DIR/NAME.crt and DIR/NAME.key
    /// (mode 0600). Its identity is the URI SAN spiffe://sandfleet/KIND/NAME; its
    /// other SANs are exactly the --san values (the name is not added as a host name).
    Issue {
        /// Directory holding ca.crt and ca.key; the new files go there too.
        #[arg(long, value_name = "DIR")]
        dir: PathBuf,
        /// What the certificate is for: coordinator and agent certificates serve and
        /// call (serverAuth + clientAuth), client certificates only call (clientAuth).
        #[arg(long, value_enum)]
        kind: IdentityKind,
        /// The identity's name: lowercase letters, digits and '-' (an agent's is its node id).
        #[arg(long, value_name = "NAME", value_parser = parse_name)]
        name: String,
        /// A host name or IP address the holder is reached at (repeatable); a
        /// coordinator or agent needs every name and address its peers dial.
        #[arg(long = "san", value_name = "HOST_OR_IP", value_parser = parse_san)]
        sans: Vec<String>,
        /// Days the certificate is valid (1 to 3650).
        #[arg(long, default_value_t = pki::DEFAULT_DAYS, value_parser = clap::value_parser!(u32).range(1..=3650))]
        days: u32,
        /// Replace existing NAME.crt and NAME.key.
        #[arg(long)]
        force: bool,
    },
}

fn parse_name(s: &str) -> Result<String, String> {
    pki::validate_name(s).map_err(|e| e.to_string())?;
    if s == pki::RESERVED_NAME {
        return Err(pki::PkiError::ReservedName.to_string());
    }
    Ok(s.to_string())
}

fn parse_san(s: &str) -> Result<String, String> {
    San::parse(s).map(|_| s.to_string()).map_err(|e| e.to_string())
}

/// Runs `pki init|issue`; the exit code is 0, or the error is returned (exit 1).
pub fn run(cmd: PkiCmd, output: OutputFormat) -> anyhow::Result<i32> {
    match cmd {
        PkiCmd::Init { dir, force } => {
            let files = pki::init_dir(&dir, force)?;
            match output {
                OutputFormat::Json => print_json(&json!({
                    "ca_cert": path_str(&files.cert),
                    "ca_key": path_str(&files.key),
                }))?,
                OutputFormat::Text => out(&format!(
                    "wrote {} (the CA certificate: give it to every process as --tls-ca)\n\
                     wrote {} (the CA key, mode 0600: keep it secret, ideally off the cluster's hosts)\n",
                    files.cert.display(),
                    files.key.display()
                ))?,
            }
        }
        PkiCmd::Issue { dir, kind, name, sans, days, force } => {
            let issued = pki::issue_to_dir(&dir, kind, &name, &sans, days, force)?;
            let sans: Vec<String> = issued.sans.iter().map(San::to_string).collect();
            let not_after = rfc3339(issued.not_after);
            match output {
                OutputFormat::Json => print_json(&json!({
                    "identity": issued.identity.spiffe_id(),
                    "kind": kind.as_str(),
                    "name": &issued.identity.name,
                    "sans": sans,
                    "not_after": not_after,
                    "cert": path_str(&issued.files.cert),
                    "key": path_str(&issued.files.key),
                }))?,
                OutputFormat::Text => {
                    let sans = if sans.is_empty() { "(none)".to_string() } else { sans.join(", ") };
                    out(&format!(
                        "identity  {}\nsans      {sans}\nexpires   {not_after}\nwrote     {}\nwrote     {} (mode 0600)\n",
                        issued.identity.spiffe_id(),
                        issued.files.cert.display(),
                        issued.files.key.display(),
                    ))?
                }
            }
        }
    }
    Ok(0)
}

fn path_str(p: &Path) -> String {
    p.display().to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_and_sans_are_checked_at_parse_time() {
        assert!(parse_name("node-a").is_ok());
        for bad in ["", "Node", "a.b", "ca", "-x"] {
            assert!(parse_name(bad).is_err(), "{bad:?}");
        }
        assert!(parse_san("10.0.0.1").is_ok());
        assert!(parse_san("coord-1.example.com").is_ok());
        assert!(parse_san("spiffe://x").is_err());
    }

    #[test]
    fn pki_subcommands_parse_and_bad_values_are_usage_errors() {
        use clap::Parser;
        let parse =
            |args: &[&str]| crate::Cli::try_parse_from(std::iter::once("sandfleet").chain(args.iter().copied()));
        let cli = parse(&[
            "pki",
            "issue",
            "--dir",
            "d",
            "--kind",
            "agent",
            "--name",
            "node-a",
            "--san",
            "10.0.0.1",
            "--san",
            "h.example",
        ])
        .expect("parses");
        let crate::Command::Pki(PkiCmd::Issue { kind, name, sans, days, force, .. }) = cli.command else { panic!() };
        assert_eq!((kind, name.as_str(), days, force), (IdentityKind::Agent, "node-a", 365, false));
        assert_eq!(sans, ["10.0.0.1", "h.example"]);
        assert!(parse(&["pki", "init", "--dir", "d", "--force"]).is_ok());
        for args in [
            &["pki", "issue", "--dir", "d", "--kind", "root", "--name", "a"][..],
            &["pki", "issue", "--dir", "d", "--kind", "agent", "--name", "A"][..],
            &["pki", "issue", "--dir", "d", "--kind", "agent", "--name", "a", "--days", "0"][..],
            &["pki", "issue", "--dir", "d", "--kind", "agent", "--name", "a", "--days", "3651"][..],
            &["pki", "issue", "--dir", "d", "--kind", "agent", "--name", "a", "--san", "a b"][..],
            &["pki", "issue", "--kind", "agent", "--name", "a"][..],
            &["pki", "init"][..],
        ] {
            let e = parse(args).err().unwrap_or_else(|| panic!("{args:?} should not parse"));
            assert_eq!(e.exit_code(), 2, "{args:?}");
        }
    }
}
