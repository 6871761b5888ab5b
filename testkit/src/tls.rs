//! A cluster PKI per test cluster: a CA and one certificate per process, made
//! with the product's own PKI code (`sandfleet_common::pki`, what `sandfleet
//! pki` runs), so every end-to-end test and chaos run speaks mutual TLS.
//!
//! Each process gets `<dir>/pki/<name>.crt|.key`, with its SPIFFE identity
//! (`coordinator/c1`, `agent/<node id>`, `client/<name>`) and its address as
//! an IP SAN (the namespace address, or 127.0.0.1).

use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{Context, Result};
use sandfleet_common::auth::IdentityKind;
use sandfleet_common::pki::CertificateAuthority;
use sandfleet_common::tls::{ClientTls, TlsDialer};

/// Days the test certificates are valid.
const DAYS: u32 = 30;

/// The three files of one identity.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsPaths {
    pub cert: PathBuf,
    pub key: PathBuf,
    pub ca: PathBuf,
}

impl TlsPaths {
    /// The daemon flags: `--tls-cert C --tls-key K --tls-ca CA`.
    pub fn daemon_args(&self) -> Vec<String> {
        vec![
            "--tls-cert".into(),
            self.cert.display().to_string(),
            "--tls-key".into(),
            self.key.display().to_string(),
            "--tls-ca".into(),
            self.ca.display().to_string(),
        ]
    }

    /// The CLI's environment: `SANDFLEET_TLS_CA`, `_CERT`, `_KEY`.
    pub fn client_env(&self) -> Vec<(String, String)> {
        vec![
            (sandfleet::ENV_TLS_CA.into(), self.ca.display().to_string()),
            (sandfleet::ENV_TLS_CERT.into(), self.cert.display().to_string()),
            (sandfleet::ENV_TLS_KEY.into(), self.key.display().to_string()),
        ]
    }

    /// The SDK's options.
    pub fn sdk_options(&self) -> sandfleet::TlsOptions {
        sandfleet::TlsOptions { ca: self.ca.clone(), cert_and_key: Some((self.cert.clone(), self.key.clone())) }
    }

    /// A dialer for raw tonic clients, expecting servers of `kind`.
    pub fn dialer(&self, kind: IdentityKind) -> Result<TlsDialer> {
        let tls: Arc<ClientTls> = ClientTls::new(self.ca.clone(), Some((self.cert.clone(), self.key.clone())))
            .with_context(|| format!("loading {}", self.cert.display()))?;
        Ok(tls.dialer(Some(kind)))
    }
}

/// A CA in a directory, issuing certificates into it.
pub struct TestPki {
    dir: PathBuf,
    ca: CertificateAuthority,
    ca_path: PathBuf,
}

impl std::fmt::Debug for TestPki {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TestPki").field("dir", &self.dir).finish_non_exhaustive()
    }
}

impl TestPki {
    /// A new CA in `dir` (created), named `name`.
    pub fn create(dir: &Path, name: &str) -> Result<Self> {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        let ca = CertificateAuthority::generate(name).context("generating a test CA")?;
        let ca_path = dir.join("ca.crt");
        std::fs::write(&ca_path, ca.cert_pem()).with_context(|| format!("writing {}", ca_path.display()))?;
        Ok(Self { dir: dir.to_path_buf(), ca, ca_path })
    }

    /// The CA certificate's path.
    pub fn ca_path(&self) -> &Path {
        &self.ca_path
    }

    /// Issues `kind/name` with `sans` (IP addresses or DNS names) and writes
    /// `<kind>-<name>.crt|.key`; an existing pair is replaced.
    pub fn issue(&self, kind: IdentityKind, name: &str, sans: &[String]) -> Result<TlsPaths> {
        let issued = self.ca.issue(kind, name, sans, DAYS).with_context(|| format!("issuing {kind}/{name}"))?;
        let cert = self.dir.join(format!("{kind}-{name}.crt"));
        let key = self.dir.join(format!("{kind}-{name}.key"));
        std::fs::write(&cert, &issued.cert_pem).with_context(|| format!("writing {}", cert.display()))?;
        std::fs::write(&key, &issued.key_pem).with_context(|| format!("writing {}", key.display()))?;
        {
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o600))?;
        }
        Ok(TlsPaths { cert, key, ca: self.ca_path.clone() })
    }
}
