//! The cluster PKI that ships with Sandfleet: a CA and the certificates it issues
//! (feature `pki`, which brings in `rcgen`; the SDK does not need it).
//!
//! - [`CertificateAuthority`]: an ECDSA P-256 CA, valid 10 years, `CA:TRUE` with
//!   path length 0 (it signs leaves only), key usages keyCertSign and cRLSign.
//! - [`CertificateAuthority::issue`]: a leaf for one [`Identity`]. Its SANs are
//!   exactly the URI SAN `spiffe://sandfleet/<kind>/<name>` plus the `sans`
//!   given (each a DNS name or an IP address); the name itself is *not* added
//!   as a DNS SAN, so a server certificate must list every host name and
//!   address clients dial. Extended key usage: serverAuth and clientAuth for
//!   coordinators and agents (they serve and they call), clientAuth only for
//!   clients. ECDSA P-256 key, random 128-bit serial, `CA:FALSE`, valid from one
//!   hour ago (clock skew) for `days` days (1..=3650), never past the CA's expiry.
//! - [`init_dir`] and [`issue_to_dir`]: the files `sandfleet pki init|issue`
//!   write, `ca.crt`/`NAME.crt` mode 0644 and `ca.key`/`NAME.key` mode 0600.
//!   A key file has mode 0600 from its creation on. An existing file is never
//!   replaced unless `force`; then new files are written to temporary files in
//!   the same directory and renamed over the old ones. A failed write removes
//!   what it wrote.
//!
//! Reading the identity back out of a certificate is [`crate::x509`], which does
//! not need this feature.

use std::fs::{File, OpenOptions, Permissions};
use std::io::Write;
use std::net::IpAddr;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose, SanType, SerialNumber, PKCS_ECDSA_P256_SHA256,
};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::CertificateDer;

use crate::auth::{Identity, IdentityKind};

/// Validity of a CA made by [`CertificateAuthority::generate`], in days (10 years).
pub const CA_DAYS: u32 = 3650;
/// Default validity of an issued certificate, in days.
pub const DEFAULT_DAYS: u32 = 365;
/// Longest validity of an issued certificate, in days.
pub const MAX_DAYS: u32 = 3650;
/// File name of the CA certificate in a PKI directory.
pub const CA_CERT_FILE: &str = "ca.crt";
/// File name of the CA private key in a PKI directory.
pub const CA_KEY_FILE: &str = "ca.key";
/// Common name of the CA [`init_dir`] makes.
pub const DEFAULT_CA_NAME: &str = "Sandfleet cluster CA";
/// The name no issued certificate may have: its files would be the CA's.
pub const RESERVED_NAME: &str = "ca";
/// Mode of certificate files.
pub const CERT_MODE: u32 = 0o644;
/// Mode of private key files.
pub const KEY_MODE: u32 = 0o600;
/// How far back `notBefore` is set, so that a peer whose clock is a little behind accepts a fresh certificate.
const BACKDATE: Duration = Duration::from_secs(3600);
const DAY: Duration = Duration::from_secs(86_400);

/// What went wrong making or writing certificates.
#[derive(Debug, thiserror::Error)]
pub enum PkiError {
    /// The identity name is not a DNS label.
    #[error("invalid certificate name {name:?}: {reason}")]
    InvalidName { name: String, reason: String },
    /// The name `ca`, whose files would be the CA's own.
    #[error("the name {RESERVED_NAME:?} is reserved: its files would be the CA's {CA_CERT_FILE} and {CA_KEY_FILE}")]
    ReservedName,
    /// A `--san` that is neither an IP address nor a DNS name.
    #[error("invalid subject alternative name {san:?}: {reason}")]
    InvalidSan { san: String, reason: String },
    /// A validity outside 1..=3650 days.
    #[error("validity of {days} days is out of range: allowed 1..={MAX_DAYS}")]
    Days { days: u32 },
    /// The certificate would be valid after its CA is not.
    #[error(
        "a certificate valid for {days} days would outlive the CA, which expires at {}; \
         issue it for fewer days or make a new CA",
        rfc3339(*ca_not_after)
    )]
    OutlivesCa { days: u32, ca_not_after: SystemTime },
    /// The CA certificate PEM does not hold exactly one usable certificate.
    #[error("bad CA certificate: {0}")]
    BadCaCert(String),
    /// The CA key PEM is not a private key rcgen can sign with.
    #[error("bad CA private key: {0}")]
    BadCaKey(String),
    /// The CA key is not the key of the CA certificate.
    #[error("the CA private key does not belong to the CA certificate")]
    KeyMismatch,
    /// rcgen refused the parameters (not expected with validated input).
    #[error("cannot generate the certificate: {0}")]
    Generate(#[from] rcgen::Error),
    /// A file that would be written exists and `force` was not given.
    #[error("{} already exists; pass --force to overwrite it", path.display())]
    Exists { path: PathBuf },
    /// A path that would be written exists and is not a regular file (not even `force` replaces it).
    #[error("{} exists and is not a regular file; not replacing it", path.display())]
    NotAFile { path: PathBuf },
    /// The CA files of a directory cannot be read.
    #[error("cannot read the CA from {}: {source} (make one with `sandfleet pki init --dir {}`)", path.display(), dir.display())]
    MissingCa { path: PathBuf, dir: PathBuf, source: std::io::Error },
    /// Any other I/O error, with the path and what was being done.
    #[error("{op} {}: {source}", path.display())]
    Io { op: &'static str, path: PathBuf, source: std::io::Error },
}

fn io_err<'a>(op: &'static str, path: &'a Path) -> impl FnOnce(std::io::Error) -> PkiError + 'a {
    move |source| PkiError::Io { op, path: path.to_path_buf(), source }
}

/// A subject alternative name given with `--san`.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum San {
    /// A host name.
    Dns(String),
    /// An IPv4 or IPv6 address.
    Ip(IpAddr),
}

impl std::fmt::Display for San {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            San::Dns(name) => f.write_str(name),
            San::Ip(ip) => write!(f, "{ip}"),
        }
    }
}

impl San {
    /// Parses one `--san`: an IP address if it parses as one, else a DNS name
    /// (1-253 characters; labels of 1-63 letters, digits and `-`, not starting or
    /// ending with `-`; the last label not all digits). No wildcards, no URIs.
    pub fn parse(s: &str) -> Result<San, PkiError> {
        let bad =
            |reason: &str| PkiError::InvalidSan { san: s.chars().take(200).collect(), reason: reason.to_string() };
        if let Ok(ip) = s.parse::<IpAddr>() {
            return Ok(San::Ip(ip));
        }
        if s.is_empty() {
            return Err(bad("empty; want a DNS name or an IP address"));
        }
        if s.len() > 253 {
            return Err(bad("a DNS name is at most 253 characters"));
        }
        let labels: Vec<&str> = s.split('.').collect();
        for label in &labels {
            if label.is_empty() || label.len() > 63 {
                return Err(bad("not an IP address, and not a DNS name: every label must be 1-63 characters"));
            }
            if !label.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-') {
                return Err(bad(
                    "not an IP address, and not a DNS name: only letters, digits, '-' and '.' (no wildcards, no URIs)",
                ));
            }
            if label.starts_with('-') || label.ends_with('-') {
                return Err(bad("not a DNS name: a label must not start or end with '-'"));
            }
        }
        if labels.last().is_some_and(|l| l.bytes().all(|b| b.is_ascii_digit())) {
            return Err(bad("not an IP address, and a DNS name's last label must not be all digits"));
        }
        Ok(San::Dns(s.to_string()))
    }

    fn to_rcgen(&self) -> Result<SanType, PkiError> {
        Ok(match self {
            San::Dns(name) => SanType::DnsName(name.as_str().try_into()?),
            San::Ip(ip) => SanType::IpAddress(*ip),
        })
    }
}

/// Checks an identity name: a DNS label (1-63 of `[a-z0-9-]`, not starting or
/// ending with `-`), the rule [`Identity::from_spiffe_id`] applies, so every
/// certificate issued here can be read back.
pub fn validate_name(name: &str) -> Result<(), PkiError> {
    crate::ids::validate_dns_label("certificate name", name).map_err(|e| PkiError::InvalidName {
        name: name.chars().take(200).collect(),
        reason: match e {
            crate::ValidationError::Invalid { reason, .. } => reason,
            other => other.to_string(),
        },
    })
}

/// Checks a validity in days: 1..=[`MAX_DAYS`].
pub fn validate_days(days: u32) -> Result<(), PkiError> {
    if (1..=MAX_DAYS).contains(&days) {
        Ok(())
    } else {
        Err(PkiError::Days { days })
    }
}

/// A certificate and its private key, both PEM. `Debug` does not print the key.
#[derive(Clone)]
pub struct IssuedCert {
    /// The certificate, PEM.
    pub cert_pem: String,
    /// Its private key, PKCS#8 PEM. A secret.
    pub key_pem: String,
    /// The identity in its URI SAN.
    pub identity: Identity,
    /// The extra SANs, as given.
    pub sans: Vec<San>,
    /// End of its validity (`notAfter`), to the second.
    pub not_after: SystemTime,
}

impl std::fmt::Debug for IssuedCert {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("IssuedCert")
            .field("identity", &self.identity)
            .field("sans", &self.sans)
            .field("not_after", &self.not_after)
            .finish_non_exhaustive()
    }
}

/// A certificate authority: its certificate and signing key. `Debug` does not print the key.
pub struct CertificateAuthority {
    cert_pem: String,
    issuer: Issuer<'static, KeyPair>,
    not_after: SystemTime,
}

impl std::fmt::Debug for CertificateAuthority {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CertificateAuthority").field("not_after", &self.not_after).finish_non_exhaustive()
    }
}

impl CertificateAuthority {
    /// A new CA: fresh ECDSA P-256 key, self-signed, `CN=<common_name>, O=Sandfleet`,
    /// valid [`CA_DAYS`] days.
    pub fn generate(common_name: &str) -> Result<Self, PkiError> {
        let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256)?;
        let mut params = CertificateParams::default();
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CommonName, common_name);
        dn.push(DnType::OrganizationName, "Sandfleet");
        params.distinguished_name = dn;
        params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        params.serial_number = Some(random_serial());
        let (not_before, not_after) = validity(CA_DAYS);
        params.not_before = not_before.into();
        params.not_after = not_after.into();
        let cert = params.self_signed(&key)?;
        Ok(Self { cert_pem: cert.pem(), issuer: Issuer::new(params, key), not_after })
    }

    /// Loads a CA from its certificate and private key (PEM). The certificate
    /// must be one CA certificate (`CA:TRUE`) and the key its key.
    pub fn from_pem(cert_pem: &str, key_pem: &str) -> Result<Self, PkiError> {
        let certs = CertificateDer::pem_slice_iter(cert_pem.as_bytes())
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| PkiError::BadCaCert(format!("not PEM: {e}")))?;
        let der = match certs.as_slice() {
            [one] => one,
            [] => return Err(PkiError::BadCaCert("no CERTIFICATE block".into())),
            more => return Err(PkiError::BadCaCert(format!("{} CERTIFICATE blocks, want one", more.len()))),
        };
        let (_, x509) =
            x509_parser::parse_x509_certificate(der).map_err(|e| PkiError::BadCaCert(format!("not X.509: {e}")))?;
        if !x509.is_ca() {
            return Err(PkiError::BadCaCert("not a CA certificate (basicConstraints CA:TRUE missing)".into()));
        }
        let not_after = UNIX_EPOCH + Duration::from_secs(x509.validity().not_after.timestamp().max(0) as u64);
        let key = KeyPair::from_pem(key_pem).map_err(|e| PkiError::BadCaKey(e.to_string()))?;
        if *x509.public_key().subject_public_key.data != *key.public_key_raw() {
            return Err(PkiError::KeyMismatch);
        }
        let issuer = Issuer::from_ca_cert_der(der, key).map_err(|e| PkiError::BadCaCert(e.to_string()))?;
        Ok(Self { cert_pem: cert_pem.to_string(), issuer, not_after })
    }

    /// The CA certificate, PEM: what every process trusts (`--tls-ca`).
    pub fn cert_pem(&self) -> &str {
        &self.cert_pem
    }

    /// The CA private key, PKCS#8 PEM. A secret.
    pub fn key_pem(&self) -> String {
        self.issuer.key().serialize_pem()
    }

    /// When the CA certificate expires.
    pub fn not_after(&self) -> SystemTime {
        self.not_after
    }

    /// Issues a certificate for `kind`/`name` with the extra `sans` (DNS names
    /// or IP addresses), valid `days` days; see the module doc for its contents.
    pub fn issue(&self, kind: IdentityKind, name: &str, sans: &[String], days: u32) -> Result<IssuedCert, PkiError> {
        validate_name(name)?;
        validate_days(days)?;
        let mut parsed: Vec<San> = Vec::with_capacity(sans.len());
        for s in sans {
            let san = San::parse(s)?;
            if !parsed.contains(&san) {
                parsed.push(san);
            }
        }
        let (not_before, not_after) = validity(days);
        if not_after > self.not_after {
            return Err(PkiError::OutlivesCa { days, ca_not_after: self.not_after });
        }
        let identity = Identity::new(kind, name);

        let mut params = CertificateParams::default();
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CommonName, name);
        dn.push(DnType::OrganizationName, "Sandfleet");
        dn.push(DnType::OrganizationalUnitName, kind.as_str());
        params.distinguished_name = dn;
        params.subject_alt_names = std::iter::once(Ok(SanType::URI(identity.spiffe_id().try_into()?)))
            .chain(parsed.iter().map(San::to_rcgen))
            .collect::<Result<_, PkiError>>()?;
        params.is_ca = IsCa::ExplicitNoCa;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = match kind {
            IdentityKind::Coordinator | IdentityKind::Agent => {
                vec![ExtendedKeyUsagePurpose::ServerAuth, ExtendedKeyUsagePurpose::ClientAuth]
            }
            IdentityKind::Client => vec![ExtendedKeyUsagePurpose::ClientAuth],
        };
        params.use_authority_key_identifier_extension = true;
        params.serial_number = Some(random_serial());
        params.not_before = not_before.into();
        params.not_after = not_after.into();

        let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256)?;
        let cert = params.signed_by(&key, &self.issuer)?;
        Ok(IssuedCert { cert_pem: cert.pem(), key_pem: key.serialize_pem(), identity, sans: parsed, not_after })
    }
}

/// `notBefore` (an hour ago) and `notAfter` (`days` from now), to the second.
fn validity(days: u32) -> (SystemTime, SystemTime) {
    let now =
        UNIX_EPOCH + Duration::from_secs(SystemTime::now().duration_since(UNIX_EPOCH).unwrap_or_default().as_secs());
    (now - BACKDATE, now + DAY * days)
}

/// 16 random bytes, positive and never zero.
fn random_serial() -> SerialNumber {
    let mut bytes: [u8; 16] = rand::random();
    bytes[0] = (bytes[0] & 0x7f) | 0x40;
    SerialNumber::from_slice(&bytes)
}

/// A time as `2026-11-30T10:00:00Z`.
pub fn rfc3339(t: SystemTime) -> String {
    let odt = ::time::OffsetDateTime::from(t);
    let f = ::time::format_description::well_known::Rfc3339;
    odt.format(&f).unwrap_or_else(|_| format!("{odt}"))
}

/// Paths of a certificate and its key, as written.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CertFiles {
    /// The certificate (mode 0644).
    pub cert: PathBuf,
    /// The private key (mode 0600).
    pub key: PathBuf,
}

/// What [`issue_to_dir`] wrote and issued.
#[derive(Debug, Clone)]
pub struct IssuedFiles {
    pub files: CertFiles,
    pub identity: Identity,
    pub sans: Vec<San>,
    pub not_after: SystemTime,
}

/// Makes a new CA in `dir` (created, mode 0700, when missing): `ca.crt` (0644)
/// and `ca.key` (0600). Without `force`, refuses when either exists, before
/// writing anything.
pub fn init_dir(dir: &Path, force: bool) -> Result<CertFiles, PkiError> {
    let files = CertFiles { cert: dir.join(CA_CERT_FILE), key: dir.join(CA_KEY_FILE) };
    check_targets(&[&files.key, &files.cert], force)?;
    let ca = CertificateAuthority::generate(DEFAULT_CA_NAME)?;
    if !dir.exists() {
        std::fs::DirBuilder::new().recursive(true).mode(0o700).create(dir).map_err(io_err("creating", dir))?;
    }
    write_files(
        &[
            FileSpec { path: &files.key, contents: ca.key_pem().as_bytes(), mode: KEY_MODE },
            FileSpec { path: &files.cert, contents: ca.cert_pem().as_bytes(), mode: CERT_MODE },
        ],
        force,
    )?;
    Ok(files)
}

/// Issues a certificate with the CA in `dir` (`ca.crt`, `ca.key`) and writes
/// `NAME.crt` (0644) and `NAME.key` (0600) there. Without `force`, refuses
/// when either exists, before writing anything.
pub fn issue_to_dir(
    dir: &Path,
    kind: IdentityKind,
    name: &str,
    sans: &[String],
    days: u32,
    force: bool,
) -> Result<IssuedFiles, PkiError> {
    validate_name(name)?;
    if name == RESERVED_NAME {
        return Err(PkiError::ReservedName);
    }
    validate_days(days)?;
    for s in sans {
        San::parse(s)?;
    }
    let files = CertFiles { cert: dir.join(format!("{name}.crt")), key: dir.join(format!("{name}.key")) };
    check_targets(&[&files.key, &files.cert], force)?;
    let read = |file: &str| {
        let path = dir.join(file);
        std::fs::read_to_string(&path).map_err(|source| PkiError::MissingCa { path, dir: dir.to_path_buf(), source })
    };
    let ca = CertificateAuthority::from_pem(&read(CA_CERT_FILE)?, &read(CA_KEY_FILE)?)?;
    let issued = ca.issue(kind, name, sans, days)?;
    write_files(
        &[
            FileSpec { path: &files.key, contents: issued.key_pem.as_bytes(), mode: KEY_MODE },
            FileSpec { path: &files.cert, contents: issued.cert_pem.as_bytes(), mode: CERT_MODE },
        ],
        force,
    )?;
    Ok(IssuedFiles { files, identity: issued.identity, sans: issued.sans, not_after: issued.not_after })
}

/// Refuses, before anything is written, targets that exist (unless `force`) or
/// that are not regular files (even with `force`).
fn check_targets(paths: &[&Path], force: bool) -> Result<(), PkiError> {
    for path in paths {
        match std::fs::symlink_metadata(path) {
            Ok(meta) if !meta.file_type().is_file() => return Err(PkiError::NotAFile { path: path.to_path_buf() }),
            Ok(_) if !force => return Err(PkiError::Exists { path: path.to_path_buf() }),
            Ok(_) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(io_err("checking", path)(e)),
        }
    }
    Ok(())
}

struct FileSpec<'a> {
    path: &'a Path,
    contents: &'a [u8],
    mode: u32,
}

/// Writes every file or none. Without `force` each is created with `O_EXCL`
/// and its final mode (so a key is never readable by others, and an existing
/// file is never touched); with `force` each goes to a temporary file in its
/// directory first, and the temporaries are renamed over the targets once all
/// are written. On an error, the files written so far are removed.
fn write_files(files: &[FileSpec<'_>], force: bool) -> Result<(), PkiError> {
    let mut written: Vec<PathBuf> = Vec::with_capacity(files.len());
    let cleanup = |written: &[PathBuf]| {
        for path in written {
            let _ = std::fs::remove_file(path);
        }
    };
    for spec in files {
        let target = if force { temp_path(spec.path) } else { spec.path.to_path_buf() };
        match create_and_write(&target, spec.contents, spec.mode) {
            Ok(()) => written.push(target),
            Err(e) => {
                cleanup(&written);
                return Err(e);
            }
        }
    }
    if force {
        for (i, (spec, temp)) in files.iter().zip(&written).enumerate() {
            if let Err(e) = std::fs::rename(temp, spec.path) {
                // The targets before `i` are already replaced; only the temporaries left can be undone.
                cleanup(&written[i..]);
                return Err(io_err("replacing", spec.path)(e));
            }
        }
    }
    for spec in files {
        sync_parent(spec.path);
    }
    Ok(())
}

/// Creates `path` (it must not exist) with `mode`, writes and fsyncs it; on an
/// error after creating it, removes it.
fn create_and_write(path: &Path, contents: &[u8], mode: u32) -> Result<(), PkiError> {
    let mut file: File = OpenOptions::new().write(true).create_new(true).mode(mode).open(path).map_err(|e| {
        if e.kind() == std::io::ErrorKind::AlreadyExists {
            PkiError::Exists { path: path.to_path_buf() }
        } else {
            io_err("creating", path)(e)
        }
    })?;
    let result = (|| {
        // The umask may have narrowed the mode; set it exactly (never wider than asked).
        file.set_permissions(Permissions::from_mode(mode))?;
        file.write_all(contents)?;
        file.sync_all()
    })();
    result.map_err(|e| {
        let _ = std::fs::remove_file(path);
        io_err("writing", path)(e)
    })
}

/// `.<name>.tmp-<random>` beside `path`.
fn temp_path(path: &Path) -> PathBuf {
    let name = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    let suffix: u64 = rand::random();
    path.with_file_name(format!(".{name}.tmp-{suffix:016x}"))
}

/// Best effort: makes the directory entries durable.
fn sync_parent(path: &Path) {
    if let Some(dir) = path.parent() {
        let dir = if dir.as_os_str().is_empty() { Path::new(".") } else { dir };
        if let Ok(d) = File::open(dir) {
            let _ = d.sync_all();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::x509::identity_of_der;
    use x509_parser::extensions::GeneralName;

    fn der_of(pem: &str) -> CertificateDer<'static> {
        CertificateDer::from_pem_slice(pem.as_bytes()).expect("one PEM certificate")
    }

    fn mode_of(path: &Path) -> u32 {
        std::fs::metadata(path).unwrap().permissions().mode() & 0o7777
    }

    #[test]
    fn ca_is_a_ca_and_round_trips_through_pem() {
        let ca = CertificateAuthority::generate("test CA").unwrap();
        let der = der_of(ca.cert_pem());
        let (_, x) = x509_parser::parse_x509_certificate(&der).unwrap();
        assert!(x.is_ca());
        let bc = x.basic_constraints().unwrap().unwrap().value;
        assert_eq!(bc.path_len_constraint, Some(0));
        let ku = x.key_usage().unwrap().unwrap().value;
        assert!(ku.key_cert_sign() && ku.crl_sign());
        let days = (x.validity().not_after.timestamp() - x.validity().not_before.timestamp()) / 86_400;
        assert_eq!(days, 3650, "10 years (plus the hour of backdating)");
        assert!(x.subject().to_string().contains("CN=test CA"), "{}", x.subject());

        let again = CertificateAuthority::from_pem(ca.cert_pem(), &ca.key_pem()).unwrap();
        assert_eq!(again.key_pem(), ca.key_pem());
        assert_eq!(again.not_after(), ca.not_after());
        // A leaf from the reloaded CA verifies against the original certificate.
        let leaf = again.issue(IdentityKind::Client, "ops", &[], 1).unwrap();
        verify(&leaf.cert_pem, ca.cert_pem(), webpki::KeyUsage::client_auth()).unwrap();
    }

    #[test]
    fn from_pem_refuses_mismatched_or_non_ca_input() {
        let a = CertificateAuthority::generate("a").unwrap();
        let b = CertificateAuthority::generate("b").unwrap();
        assert!(matches!(CertificateAuthority::from_pem(a.cert_pem(), &b.key_pem()), Err(PkiError::KeyMismatch)));
        let leaf = a.issue(IdentityKind::Agent, "node-a", &[], 1).unwrap();
        let e = CertificateAuthority::from_pem(&leaf.cert_pem, &leaf.key_pem).unwrap_err();
        assert!(matches!(e, PkiError::BadCaCert(ref m) if m.contains("not a CA")), "{e}");
        let two = format!("{}{}", a.cert_pem(), b.cert_pem());
        assert!(matches!(CertificateAuthority::from_pem(&two, &a.key_pem()), Err(PkiError::BadCaCert(_))));
        assert!(matches!(CertificateAuthority::from_pem("", &a.key_pem()), Err(PkiError::BadCaCert(_))));
        assert!(matches!(CertificateAuthority::from_pem(a.cert_pem(), "junk"), Err(PkiError::BadCaKey(_))));
    }

    /// Verifies `leaf` against the CA the way rustls' WebPKI verifiers do.
    fn verify(leaf_pem: &str, ca_pem: &str, usage: webpki::KeyUsage) -> Result<(), webpki::Error> {
        let ca_der = der_of(ca_pem);
        let anchor = webpki::anchor_from_trusted_cert(&ca_der)?;
        let leaf_der = der_of(leaf_pem);
        let ee = webpki::EndEntityCert::try_from(&leaf_der)?;
        ee.verify_for_usage(
            webpki::ALL_VERIFICATION_ALGS,
            &[anchor],
            &[],
            rustls_pki_types::UnixTime::now(),
            usage,
            None,
            None,
        )
        .map(|_| ())
    }

    #[test]
    fn issued_certs_carry_identity_sans_and_usages() {
        let ca = CertificateAuthority::generate("test CA").unwrap();
        let sans =
            ["10.0.0.7".to_string(), "coord-1.example.com".to_string(), "::1".to_string(), "10.0.0.7".to_string()];
        for kind in IdentityKind::ALL {
            let issued = ca.issue(kind, "node-a", &sans, 30).unwrap();
            let der = der_of(&issued.cert_pem);
            assert_eq!(identity_of_der(&der).unwrap(), Identity::new(kind, "node-a"));
            assert_eq!(issued.identity, Identity::new(kind, "node-a"));
            assert_eq!(issued.sans.len(), 3, "duplicates dropped: {:?}", issued.sans);

            let (_, x) = x509_parser::parse_x509_certificate(&der).unwrap();
            let names: Vec<String> = x
                .subject_alternative_name()
                .unwrap()
                .unwrap()
                .value
                .general_names
                .iter()
                .map(|n| match n {
                    GeneralName::URI(u) => format!("uri:{u}"),
                    GeneralName::DNSName(d) => format!("dns:{d}"),
                    GeneralName::IPAddress(b) => format!("ip:{b:?}"),
                    other => format!("{other:?}"),
                })
                .collect();
            assert_eq!(
                names,
                [
                    format!("uri:spiffe://sandfleet/{kind}/node-a"),
                    "ip:[10, 0, 0, 7]".to_string(),
                    "dns:coord-1.example.com".to_string(),
                    format!("ip:{:?}", std::net::Ipv6Addr::LOCALHOST.octets()),
                ],
                "exactly the URI SAN and the given SANs, no DNS SAN for the name"
            );
            assert!(!x.is_ca());
            let eku = x.extended_key_usage().unwrap().unwrap().value;
            assert!(eku.client_auth);
            assert_eq!(eku.server_auth, kind != IdentityKind::Client, "{kind}");
            let days = (x.validity().not_after.timestamp() - x.validity().not_before.timestamp()) / 86_400;
            assert_eq!(days, 30);
            assert_eq!(
                x.validity().not_after.timestamp(),
                issued.not_after.duration_since(UNIX_EPOCH).unwrap().as_secs() as i64
            );
            assert!(x.public_key().algorithm.algorithm.to_id_string() == "1.2.840.10045.2.1", "EC key");
            assert!(issued.key_pem.starts_with("-----BEGIN PRIVATE KEY-----"));
            assert!(!format!("{issued:?}").contains("PRIVATE"), "Debug must not print the key");

            verify(&issued.cert_pem, ca.cert_pem(), webpki::KeyUsage::client_auth()).unwrap();
            // The DNS and IP SANs are what a TLS client matches the dialled host against.
            let ee = webpki::EndEntityCert::try_from(&der).unwrap();
            for host in ["coord-1.example.com", "10.0.0.7", "::1"] {
                let server_name = rustls_pki_types::ServerName::try_from(host).unwrap();
                ee.verify_is_valid_for_subject_name(&server_name).unwrap_or_else(|e| panic!("{host}: {e}"));
            }
            for host in ["node-a", "10.0.0.8", "example.com"] {
                let server_name = rustls_pki_types::ServerName::try_from(host).unwrap();
                assert!(ee.verify_is_valid_for_subject_name(&server_name).is_err(), "{host} matched");
            }
            let server = verify(&issued.cert_pem, ca.cert_pem(), webpki::KeyUsage::server_auth());
            assert_eq!(server.is_ok(), kind != IdentityKind::Client, "{kind}: {server:?}");
            // x509-parser's own signature check agrees.
            let ca_der = der_of(ca.cert_pem());
            let (_, cax) = x509_parser::parse_x509_certificate(&ca_der).unwrap();
            x.verify_signature(Some(cax.public_key())).unwrap();
        }
    }

    #[test]
    fn serials_are_random() {
        let ca = CertificateAuthority::generate("test CA").unwrap();
        let a = ca.issue(IdentityKind::Client, "a", &[], 1).unwrap();
        let b = ca.issue(IdentityKind::Client, "a", &[], 1).unwrap();
        let serial = |pem: &str| {
            let der = der_of(pem);
            let (_, x) = x509_parser::parse_x509_certificate(&der).unwrap();
            x.raw_serial().to_vec()
        };
        assert_ne!(serial(&a.cert_pem), serial(&b.cert_pem));
        assert_eq!(serial(&a.cert_pem).len(), 16);
    }

    #[test]
    fn a_cert_from_another_ca_does_not_verify() {
        let ca = CertificateAuthority::generate("ours").unwrap();
        let other = CertificateAuthority::generate("theirs").unwrap();
        let leaf = other.issue(IdentityKind::Coordinator, "c1", &["127.0.0.1".into()], 1).unwrap();
        assert!(verify(&leaf.cert_pem, ca.cert_pem(), webpki::KeyUsage::server_auth()).is_err());
        assert!(verify(&leaf.cert_pem, ca.cert_pem(), webpki::KeyUsage::client_auth()).is_err());
        let ca_der = der_of(ca.cert_pem());
        let (_, cax) = x509_parser::parse_x509_certificate(&ca_der).unwrap();
        let der = der_of(&leaf.cert_pem);
        let (_, x) = x509_parser::parse_x509_certificate(&der).unwrap();
        assert!(x.verify_signature(Some(cax.public_key())).is_err());
    }

    #[test]
    fn bad_names_sans_and_days_are_refused() {
        let ca = CertificateAuthority::generate("test CA").unwrap();
        for name in ["", "Node-A", "-a", "a-", "a.b", "a/b", "../x", &"x".repeat(64)] {
            let e = ca.issue(IdentityKind::Agent, name, &[], 1).unwrap_err();
            assert!(matches!(e, PkiError::InvalidName { .. }), "{name:?}: {e}");
        }
        for san in ["", "spiffe://sandfleet/agent/x", "*.example.com", "a..b", "-a.com", "1.2.3", "a_b", "host:80"] {
            let e = ca.issue(IdentityKind::Agent, "a", &[san.to_string()], 1).unwrap_err();
            assert!(matches!(e, PkiError::InvalidSan { .. }), "{san:?}: {e}");
        }
        for days in [0, 3651, u32::MAX] {
            let e = ca.issue(IdentityKind::Agent, "a", &[], days).unwrap_err();
            assert!(matches!(e, PkiError::Days { .. }), "{days}: {e}");
            assert!(e.to_string().contains("1..=3650"), "{e}");
        }
        assert!(ca.issue(IdentityKind::Agent, "a", &[], 3650).is_ok(), "the CA was just made: 3650 days fit");
        assert_eq!(San::parse("Coord-1.Example.com").unwrap(), San::Dns("Coord-1.Example.com".into()));
        assert_eq!(San::parse("fe80::1").unwrap(), San::Ip("fe80::1".parse().unwrap()));
    }

    #[test]
    fn a_leaf_may_not_outlive_its_ca() {
        // A CA whose certificate expires in 10 days.
        let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).unwrap();
        let mut params = CertificateParams::default();
        params.distinguished_name.push(DnType::CommonName, "short");
        params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign];
        // Plus an hour, so a second ticking between here and `issue` does not matter.
        let (nb, na) = validity(10);
        params.not_before = nb.into();
        params.not_after = (na + BACKDATE).into();
        let cert = params.self_signed(&key).unwrap();
        let ca = CertificateAuthority::from_pem(&cert.pem(), &key.serialize_pem()).unwrap();
        assert!(ca.issue(IdentityKind::Client, "a", &[], 10).is_ok());
        let e = ca.issue(IdentityKind::Client, "a", &[], 11).unwrap_err();
        assert!(matches!(e, PkiError::OutlivesCa { days: 11, .. }), "{e}");
        assert!(e.to_string().contains("outlive the CA"), "{e}");
    }

    #[test]
    fn dir_files_have_their_modes_and_are_not_overwritten_without_force() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("pki");
        let ca_files = init_dir(&dir, false).unwrap();
        assert_eq!(mode_of(&dir), 0o700);
        assert_eq!(mode_of(&ca_files.cert), 0o644);
        assert_eq!(mode_of(&ca_files.key), 0o600);
        let ca_cert = std::fs::read_to_string(&ca_files.cert).unwrap();

        let e = init_dir(&dir, false).unwrap_err();
        assert!(matches!(e, PkiError::Exists { .. }), "{e}");
        assert!(e.to_string().contains("ca.key") && e.to_string().contains("--force"), "{e}");
        assert_eq!(std::fs::read_to_string(&ca_files.cert).unwrap(), ca_cert, "unchanged");

        let issued = issue_to_dir(&dir, IdentityKind::Agent, "node-a", &["127.0.0.1".into()], 7, false).unwrap();
        assert_eq!(issued.files.cert, dir.join("node-a.crt"));
        assert_eq!(mode_of(&issued.files.cert), 0o644);
        assert_eq!(mode_of(&issued.files.key), 0o600);
        let cert_pem = std::fs::read_to_string(&issued.files.cert).unwrap();
        assert_eq!(identity_of_der(&der_of(&cert_pem)).unwrap(), Identity::new(IdentityKind::Agent, "node-a"));
        verify(&cert_pem, &ca_cert, webpki::KeyUsage::server_auth()).unwrap();

        let e = issue_to_dir(&dir, IdentityKind::Agent, "node-a", &[], 7, false).unwrap_err();
        assert!(e.to_string().contains("node-a.key") && e.to_string().contains("--force"), "{e}");
        assert_eq!(std::fs::read_to_string(&issued.files.cert).unwrap(), cert_pem, "unchanged");

        let again = issue_to_dir(&dir, IdentityKind::Agent, "node-a", &[], 7, true).unwrap();
        assert_ne!(std::fs::read_to_string(&again.files.cert).unwrap(), cert_pem, "replaced");
        assert_eq!(mode_of(&again.files.key), 0o600);
        assert_eq!(mode_of(&again.files.cert), 0o644);

        // --force on the CA replaces it; nothing temporary is left behind.
        init_dir(&dir, true).unwrap();
        assert_ne!(std::fs::read_to_string(&ca_files.cert).unwrap(), ca_cert);
        assert_eq!(mode_of(&ca_files.key), 0o600);
        let mut names: Vec<String> =
            std::fs::read_dir(&dir).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().into_owned()).collect();
        names.sort();
        assert_eq!(names, ["ca.crt", "ca.key", "node-a.crt", "node-a.key"]);
    }

    #[test]
    fn bad_input_to_the_dir_helpers_writes_nothing() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path();
        // No CA yet.
        let e = issue_to_dir(dir, IdentityKind::Client, "ops", &[], 1, false).unwrap_err();
        assert!(matches!(e, PkiError::MissingCa { .. }) && e.to_string().contains("pki init"), "{e}");
        init_dir(dir, false).unwrap();
        let before = std::fs::read_dir(dir).unwrap().count();
        for (name, sans, days) in
            [("Bad", vec![], 1), ("ca", vec![], 1), ("ok", vec!["bad san".to_string()], 1), ("ok", vec![], 0)]
        {
            let e = issue_to_dir(dir, IdentityKind::Client, name, &sans, days, false).unwrap_err();
            assert!(!matches!(e, PkiError::Io { .. }), "{e}");
            assert_eq!(std::fs::read_dir(dir).unwrap().count(), before, "{name}: nothing written");
        }
        // A target that is a directory is refused even with --force.
        std::fs::create_dir(dir.join("x.crt")).unwrap();
        let e = issue_to_dir(dir, IdentityKind::Client, "x", &[], 1, true).unwrap_err();
        assert!(matches!(e, PkiError::NotAFile { .. }), "{e}");
        assert!(!dir.join("x.key").exists());
        // A mismatched CA key is refused.
        let other = CertificateAuthority::generate("other").unwrap();
        std::fs::write(dir.join("ca.key"), other.key_pem()).unwrap();
        let e = issue_to_dir(dir, IdentityKind::Client, "y", &[], 1, false).unwrap_err();
        assert!(matches!(e, PkiError::KeyMismatch), "{e}");
        assert!(!dir.join("y.key").exists());
    }

    #[test]
    fn a_failed_write_removes_what_it_wrote() {
        let tmp = tempfile::tempdir().unwrap();
        let first = tmp.path().join("first.key");
        let second = tmp.path().join("missing-dir").join("second.crt");
        for force in [false, true] {
            let e = write_files(
                &[
                    FileSpec { path: &first, contents: b"k", mode: KEY_MODE },
                    FileSpec { path: &second, contents: b"c", mode: CERT_MODE },
                ],
                force,
            )
            .unwrap_err();
            assert!(matches!(e, PkiError::Io { .. }), "{e}");
            assert_eq!(std::fs::read_dir(tmp.path()).unwrap().count(), 0, "force={force}: nothing left");
        }
    }
}
