//! `sandfleet pki init|issue` through the real binary: the files, their modes,
//! the identity in each certificate, no overwrite without `--force`, and bad
//! input refused with a clear message and nothing written.
//!
//! Needs only the `sandfleet` binary (`cargo build --workspace --bins`); no
//! cluster, no sandbox facilities.

mod common;

use std::collections::BTreeMap;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use rustls_pki_types::pem::PemObject;
use rustls_pki_types::CertificateDer;
use sandfleet_common::auth::{Identity, IdentityKind};
use sandfleet_common::x509::identity_of_der;
use sandfleet_testkit::bin_path;

use common::show;

fn sandfleet(args: &[&str]) -> Output {
    Command::new(bin_path("sandfleet"))
        .args(args)
        .stdin(Stdio::null())
        .env_remove("RUST_LOG")
        .output()
        .unwrap_or_else(|e| panic!("running sandfleet {args:?}: {e}"))
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

fn mode(path: &Path) -> u32 {
    std::fs::metadata(path).unwrap_or_else(|e| panic!("{}: {e}", path.display())).permissions().mode() & 0o7777
}

/// Every file in `dir` with its contents: to show that nothing changed.
fn snapshot(dir: &Path) -> BTreeMap<String, Vec<u8>> {
    std::fs::read_dir(dir)
        .unwrap()
        .map(|e| {
            let e = e.unwrap();
            (e.file_name().to_string_lossy().into_owned(), std::fs::read(e.path()).unwrap())
        })
        .collect()
}

fn identity_in(cert: &Path) -> Identity {
    let der = CertificateDer::from_pem_file(cert).unwrap_or_else(|e| panic!("{}: {e}", cert.display()));
    identity_of_der(&der).unwrap_or_else(|e| panic!("{}: {e}", cert.display()))
}

fn dir_arg(dir: &Path) -> &str {
    dir.to_str().expect("a UTF-8 temporary path")
}

#[test]
fn pki_init_and_issue_write_the_files_with_their_modes_and_identities() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("pki");
    let d = dir_arg(&dir);

    let out = sandfleet(&["pki", "init", "--dir", d]);
    assert_eq!(out.status.code(), Some(0), "{}", show(&out));
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains(&dir.join("ca.crt").display().to_string()), "{}", show(&out));
    assert!(text.contains(&dir.join("ca.key").display().to_string()), "{}", show(&out));
    assert_eq!(mode(&dir), 0o700, "the directory that holds the CA key");
    assert_eq!(mode(&dir.join("ca.crt")), 0o644);
    assert_eq!(mode(&dir.join("ca.key")), 0o600);
    let ca_pem = std::fs::read_to_string(dir.join("ca.crt")).unwrap();
    assert!(ca_pem.starts_with("-----BEGIN CERTIFICATE-----"), "{ca_pem}");

    for (kind, name) in
        [(IdentityKind::Coordinator, "c1"), (IdentityKind::Agent, "node-a"), (IdentityKind::Client, "ops")]
    {
        let out = sandfleet(&[
            "--output",
            "json",
            "pki",
            "issue",
            "--dir",
            d,
            "--kind",
            kind.as_str(),
            "--name",
            name,
            "--san",
            "127.0.0.1",
            "--san",
            "host-1.example.com",
            "--days",
            "30",
        ]);
        assert_eq!(out.status.code(), Some(0), "{kind}: {}", show(&out));
        let v: serde_json::Value =
            serde_json::from_slice(&out.stdout).unwrap_or_else(|e| panic!("not JSON ({e}): {}", show(&out)));
        let spiffe = format!("spiffe://sandfleet/{kind}/{name}");
        assert_eq!(v["identity"], serde_json::json!(spiffe), "{v}");
        assert_eq!(v["sans"], serde_json::json!(["127.0.0.1", "host-1.example.com"]), "{v}");
        let cert = dir.join(format!("{name}.crt"));
        let key = dir.join(format!("{name}.key"));
        assert_eq!(v["cert"], serde_json::json!(cert.display().to_string()), "{v}");
        assert_eq!(v["key"], serde_json::json!(key.display().to_string()), "{v}");
        // Expiry: 30 days from now (to the minute; the test may cross a second boundary).
        let not_after = humantime::parse_rfc3339(v["not_after"].as_str().expect("not_after")).expect("RFC 3339");
        let want = SystemTime::now() + Duration::from_secs(30 * 86_400);
        let diff = want.duration_since(not_after).unwrap_or_else(|e| e.duration());
        assert!(diff < Duration::from_secs(60), "not_after {v} is not 30 days from now");
        assert!(not_after > UNIX_EPOCH);

        assert_eq!(mode(&cert), 0o644, "{kind}");
        assert_eq!(mode(&key), 0o600, "{kind}");
        assert!(std::fs::read_to_string(&key).unwrap().starts_with("-----BEGIN PRIVATE KEY-----"));
        assert_eq!(identity_in(&cert), Identity::new(kind, name), "{kind}");
    }

    // Text output names the identity, the expiry and the files.
    let out = sandfleet(&["pki", "issue", "--dir", d, "--kind", "agent", "--name", "node-b"]);
    assert_eq!(out.status.code(), Some(0), "{}", show(&out));
    let text = String::from_utf8_lossy(&out.stdout);
    for want in ["spiffe://sandfleet/agent/node-b", "expires", "node-b.crt", "node-b.key"] {
        assert!(text.contains(want), "{want} missing: {}", show(&out));
    }
    let mut names: Vec<String> = snapshot(&dir).into_keys().collect();
    names.sort();
    assert_eq!(
        names,
        [
            "c1.crt",
            "c1.key",
            "ca.crt",
            "ca.key",
            "node-a.crt",
            "node-a.key",
            "node-b.crt",
            "node-b.key",
            "ops.crt",
            "ops.key"
        ],
        "nothing else (no temporary files)"
    );
}

#[test]
fn pki_never_overwrites_without_force() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let d = dir_arg(dir);
    let out = sandfleet(&["pki", "init", "--dir", d]);
    assert_eq!(out.status.code(), Some(0), "{}", show(&out));
    let out = sandfleet(&["pki", "issue", "--dir", d, "--kind", "agent", "--name", "node-a"]);
    assert_eq!(out.status.code(), Some(0), "{}", show(&out));
    let before = snapshot(dir);

    let out = sandfleet(&["pki", "init", "--dir", d]);
    assert_eq!(out.status.code(), Some(1), "{}", show(&out));
    assert!(stderr(&out).contains("already exists") && stderr(&out).contains("--force"), "{}", show(&out));
    assert!(stderr(&out).contains("ca.key") || stderr(&out).contains("ca.crt"), "{}", show(&out));
    assert_eq!(snapshot(dir), before, "init without --force changed files");

    let out = sandfleet(&["pki", "issue", "--dir", d, "--kind", "agent", "--name", "node-a"]);
    assert_eq!(out.status.code(), Some(1), "{}", show(&out));
    assert!(stderr(&out).contains("node-a.key") && stderr(&out).contains("--force"), "{}", show(&out));
    assert_eq!(snapshot(dir), before, "issue without --force changed files");

    // With --force: replaced, same modes, the same identity.
    let out = sandfleet(&["pki", "issue", "--dir", d, "--kind", "agent", "--name", "node-a", "--force"]);
    assert_eq!(out.status.code(), Some(0), "{}", show(&out));
    let after = snapshot(dir);
    assert_ne!(after["node-a.crt"], before["node-a.crt"]);
    assert_ne!(after["node-a.key"], before["node-a.key"]);
    assert_eq!(after["ca.crt"], before["ca.crt"]);
    assert_eq!(mode(&dir.join("node-a.key")), 0o600);
    assert_eq!(mode(&dir.join("node-a.crt")), 0o644);
    assert_eq!(identity_in(&dir.join("node-a.crt")), Identity::new(IdentityKind::Agent, "node-a"));

    let out = sandfleet(&["pki", "init", "--dir", d, "--force"]);
    assert_eq!(out.status.code(), Some(0), "{}", show(&out));
    let new_ca = snapshot(dir);
    assert_ne!(new_ca["ca.crt"], after["ca.crt"]);
    assert_ne!(new_ca["ca.key"], after["ca.key"]);
    assert_eq!(mode(&dir.join("ca.key")), 0o600);
    assert_eq!(new_ca.len(), after.len(), "no temporary files left");
}

#[test]
fn pki_refuses_bad_input_with_a_clear_message_and_writes_nothing() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let d = dir_arg(dir);

    // No CA yet.
    let out = sandfleet(&["pki", "issue", "--dir", d, "--kind", "client", "--name", "ops"]);
    assert_eq!(out.status.code(), Some(1), "{}", show(&out));
    assert!(stderr(&out).contains("ca.crt") && stderr(&out).contains("pki init"), "{}", show(&out));
    assert!(snapshot(dir).is_empty(), "nothing written");

    let out = sandfleet(&["pki", "init", "--dir", d]);
    assert_eq!(out.status.code(), Some(0), "{}", show(&out));
    let before = snapshot(dir);

    let base = ["pki", "issue", "--dir", d];
    for (extra, want) in [
        (&["--kind", "root", "--name", "a"][..], "root"),
        (&["--kind", "agent", "--name", "Node_A"][..], "Node_A"),
        (&["--kind", "agent", "--name", "a.b"][..], "a.b"),
        (&["--kind", "agent", "--name", "ca"][..], "reserved"),
        (&["--kind", "agent", "--name", "a", "--days", "0"][..], "0"),
        (&["--kind", "agent", "--name", "a", "--days", "3651"][..], "3651"),
        (&["--kind", "agent", "--name", "a", "--days", "soon"][..], "soon"),
        (&["--kind", "agent", "--name", "a", "--san", "*.example.com"][..], "*.example.com"),
        (&["--kind", "agent", "--name", "a", "--san", "spiffe://sandfleet/agent/b"][..], "spiffe://"),
    ] {
        let args: Vec<&str> = base.iter().chain(extra).copied().collect();
        let out = sandfleet(&args);
        assert_eq!(out.status.code(), Some(2), "{args:?}: a usage error: {}", show(&out));
        assert!(stderr(&out).contains(want), "{args:?}: the message names {want:?}: {}", show(&out));
        assert_eq!(snapshot(dir), before, "{args:?} wrote something");
    }

    // A CA key that is not the certificate's: refused, nothing written.
    let other = tempfile::tempdir().unwrap();
    let out = sandfleet(&["pki", "init", "--dir", dir_arg(other.path())]);
    assert_eq!(out.status.code(), Some(0), "{}", show(&out));
    std::fs::copy(other.path().join("ca.key"), dir.join("ca.key")).unwrap();
    let before = snapshot(dir);
    let out = sandfleet(&["pki", "issue", "--dir", d, "--kind", "client", "--name", "ops"]);
    assert_eq!(out.status.code(), Some(1), "{}", show(&out));
    assert!(stderr(&out).contains("does not belong to the CA certificate"), "{}", show(&out));
    assert_eq!(snapshot(dir), before);
}
