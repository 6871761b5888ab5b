//! Reading the Sandfleet identity out of a peer's X.509 certificate.
//!
//! A Sandfleet certificate carries its identity as exactly one URI SAN of the
//! form `spiffe://sandfleet/<kind>/<name>` (see [`crate::auth`]). The TLS
//! servers call [`identity_of_der`] on the verified peer certificate; the
//! chain itself is checked by rustls before, this only reads the name.
//!
//! This module only parses (with `x509-parser`); it generates nothing, so it is
//! not behind the `pki` feature that brings in `rcgen`.

use x509_parser::extensions::GeneralName;

use crate::auth::{Identity, IdentityParseError, TRUST_DOMAIN};

/// Why a certificate does not name one Sandfleet identity.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CertIdentityError {
    /// The bytes are not one DER X.509 certificate.
    #[error("not a DER X.509 certificate: {0}")]
    Parse(String),
    /// The subjectAltName extension is malformed or present more than once.
    #[error("the certificate's subjectAltName extension is invalid: {0}")]
    BadSan(String),
    /// No `spiffe://sandfleet/...` URI SAN.
    #[error("the certificate has no Sandfleet identity (a URI SAN spiffe://{TRUST_DOMAIN}/<kind>/<name>)")]
    NoIdentity,
    /// More than one `spiffe://sandfleet/...` URI SAN: ambiguous, so refused.
    #[error("the certificate has {} Sandfleet identities, want exactly one: {}", .0.len(), .0.join(", "))]
    SeveralIdentities(Vec<String>),
    /// A `spiffe://sandfleet/...` URI SAN that is not a valid identity.
    #[error(transparent)]
    Invalid(#[from] IdentityParseError),
}

/// The prefix of every URI SAN this module looks at; other URIs (another
/// trust domain, any other scheme) are ignored.
fn identity_prefix() -> String {
    format!("spiffe://{TRUST_DOMAIN}/")
}

/// The Sandfleet identity of a DER certificate: its one `spiffe://sandfleet/...`
/// URI SAN, parsed with [`Identity::from_spiffe_id`].
///
/// Refuses a certificate with none, with several (even if equal), or with one
/// that does not parse (unknown kind, a name that is not a DNS label). It does
/// not check signatures, validity dates or key usages: that is the TLS
/// verifier's job, which must run first.
pub fn identity_of_der(der: &[u8]) -> Result<Identity, CertIdentityError> {
    let (rest, cert) = x509_parser::parse_x509_certificate(der).map_err(|e| CertIdentityError::Parse(e.to_string()))?;
    if !rest.is_empty() {
        return Err(CertIdentityError::Parse(format!("{} bytes after the certificate", rest.len())));
    }
    let san = cert.subject_alternative_name().map_err(|e| CertIdentityError::BadSan(e.to_string()))?;
    let prefix = identity_prefix();
    let uris: Vec<&str> = san
        .iter()
        .flat_map(|ext| ext.value.general_names.iter())
        .filter_map(|name| match name {
            GeneralName::URI(uri) if uri.starts_with(&prefix) => Some(*uri),
            _ => None,
        })
        .collect();
    match uris.as_slice() {
        [] => Err(CertIdentityError::NoIdentity),
        [uri] => Ok(Identity::from_spiffe_id(uri)?),
        several => {
            Err(CertIdentityError::SeveralIdentities(several.iter().map(|u| u.chars().take(200).collect()).collect()))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::auth::IdentityKind;
    use rcgen::{CertificateParams, KeyPair, SanType};

    /// A self-signed certificate with these URI SANs (and a DNS SAN).
    fn cert_with_uris(uris: &[&str]) -> Vec<u8> {
        let mut params = CertificateParams::new(vec!["host.example.com".to_string()]).unwrap();
        for uri in uris {
            params.subject_alt_names.push(SanType::URI((*uri).try_into().unwrap()));
        }
        let key = KeyPair::generate().unwrap();
        params.self_signed(&key).unwrap().der().to_vec()
    }

    #[test]
    fn finds_the_one_sandfleet_identity_and_ignores_other_uris() {
        let der =
            cert_with_uris(&["https://example.com/x", "spiffe://other/agent/a", "spiffe://sandfleet/agent/node-a"]);
        assert_eq!(identity_of_der(&der).unwrap(), Identity::new(IdentityKind::Agent, "node-a"));
        let der = cert_with_uris(&["spiffe://sandfleet/coordinator/c1"]);
        assert_eq!(identity_of_der(&der).unwrap(), Identity::new(IdentityKind::Coordinator, "c1"));
    }

    #[test]
    fn refuses_none_several_and_malformed_identities() {
        assert_eq!(identity_of_der(&cert_with_uris(&[])), Err(CertIdentityError::NoIdentity));
        assert_eq!(
            identity_of_der(&cert_with_uris(&["spiffe://sandfleetx/agent/a"])),
            Err(CertIdentityError::NoIdentity)
        );
        let e = identity_of_der(&cert_with_uris(&["spiffe://sandfleet/agent/a", "spiffe://sandfleet/client/b"]))
            .unwrap_err();
        assert!(matches!(e, CertIdentityError::SeveralIdentities(ref v) if v.len() == 2), "{e}");
        assert!(e.to_string().contains("client/b"), "{e}");
        // Even two equal ones are refused.
        let same = identity_of_der(&cert_with_uris(&["spiffe://sandfleet/agent/a", "spiffe://sandfleet/agent/a"]));
        assert!(matches!(same, Err(CertIdentityError::SeveralIdentities(_))), "{same:?}");
        for bad in ["spiffe://sandfleet/root/a", "spiffe://sandfleet/agent/A", "spiffe://sandfleet/agent/a/b"] {
            let e = identity_of_der(&cert_with_uris(&[bad])).unwrap_err();
            assert!(matches!(e, CertIdentityError::Invalid(_)), "{bad}: {e}");
        }
    }

    #[test]
    fn refuses_bytes_that_are_not_one_certificate() {
        assert!(matches!(identity_of_der(b""), Err(CertIdentityError::Parse(_))));
        assert!(matches!(identity_of_der(b"not a certificate"), Err(CertIdentityError::Parse(_))));
        let mut der = cert_with_uris(&["spiffe://sandfleet/agent/a"]);
        der.push(0);
        assert!(matches!(identity_of_der(&der), Err(CertIdentityError::Parse(_))));
    }
}
