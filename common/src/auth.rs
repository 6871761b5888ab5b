//! Who is calling: identities from certificates, API keys, roles and tenants.
//!
//! Every Sandfleet process has an identity in its certificate, as a URI SAN of
//! the SPIFFE form `spiffe://sandfleet/<kind>/<name>`:
//! - `coordinator/<name>`: a Raft member; the only identity RaftService accepts;
//! - `agent/<node-id>`: a node agent; AgentService binds the node id to it;
//! - `client/<name>`: an operator or a program; acts as cluster admin
//!   (of the `default` tenant) unless it also sends an API key, which then decides.
//!
//! Public callers may instead (or also) send an API key, `authorization: Bearer
//! sfk_<id>_<secret>`. Only a SHA-256 hash of the secret is replicated; the id
//! half finds the record, so lookup is one map access and the comparison is in
//! constant time.
//!
//! A resolved caller is a [`Caller`]: who ([`Principal`]), which tenant, which
//! [`Role`]. Services put it in the request extensions once, at the edge.

use std::fmt;

use serde::{Deserialize, Serialize};

/// The trust domain in every Sandfleet SPIFFE id.
pub const TRUST_DOMAIN: &str = "sandfleet";
/// The tenant that unauthenticated loopback (`--insecure`) callers and client
/// certificates act in, and that sessions created before tenants existed belong to.
pub const DEFAULT_TENANT: &str = "default";
/// Prefix of every API key.
pub const API_KEY_PREFIX: &str = "sfk_";

/// The kind of a certificate identity.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[cfg_attr(feature = "clap", derive(clap::ValueEnum))]
#[serde(rename_all = "snake_case")]
pub enum IdentityKind {
    /// A coordinator (Raft member).
    Coordinator,
    /// A node agent; the name is its node id.
    Agent,
    /// A client: the CLI, an SDK program, an operator.
    Client,
}

impl IdentityKind {
    /// Every kind, in a stable order.
    pub const ALL: [IdentityKind; 3] = [IdentityKind::Coordinator, IdentityKind::Agent, IdentityKind::Client];

    /// The path segment in the SPIFFE id.
    pub fn as_str(self) -> &'static str {
        match self {
            IdentityKind::Coordinator => "coordinator",
            IdentityKind::Agent => "agent",
            IdentityKind::Client => "client",
        }
    }

    /// Parses a path segment.
    pub fn parse(s: &str) -> Option<Self> {
        IdentityKind::ALL.into_iter().find(|k| k.as_str() == s)
    }
}

impl fmt::Display for IdentityKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A certificate identity: `spiffe://sandfleet/<kind>/<name>`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Identity {
    pub kind: IdentityKind,
    pub name: String,
}

/// A SPIFFE id that is not a Sandfleet identity.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("not a Sandfleet identity (want spiffe://{TRUST_DOMAIN}/coordinator|agent|client/<name>): {0}")]
pub struct IdentityParseError(pub String);

impl Identity {
    pub fn new(kind: IdentityKind, name: impl Into<String>) -> Self {
        Self { kind, name: name.into() }
    }

    /// The URI SAN form.
    pub fn spiffe_id(&self) -> String {
        format!("spiffe://{TRUST_DOMAIN}/{}/{}", self.kind, self.name)
    }

    /// Parses `spiffe://sandfleet/<kind>/<name>`. The name must be a valid
    /// DNS label, as node ids are (see [`crate::ids::validate_dns_label`]).
    pub fn from_spiffe_id(uri: &str) -> Result<Self, IdentityParseError> {
        let err = || IdentityParseError(uri.chars().take(200).collect());
        let rest = uri.strip_prefix("spiffe://").ok_or_else(err)?;
        let rest = rest.strip_prefix(TRUST_DOMAIN).and_then(|r| r.strip_prefix('/')).ok_or_else(err)?;
        let (kind, name) = rest.split_once('/').ok_or_else(err)?;
        let kind = IdentityKind::parse(kind).ok_or_else(err)?;
        crate::ids::validate_dns_label("identity name", name).map_err(|_| err())?;
        Ok(Self::new(kind, name))
    }
}

impl fmt::Display for Identity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.kind, self.name)
    }
}

/// The verified certificate identity of the peer of a connection: `None` on
/// plaintext, or when the peer sent no certificate. Set by the transport
/// ([`crate::tls`]); services read it through [`crate::tls::peer_identity`].
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PeerIdentity(pub Option<Identity>);

/// What a caller may do.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, PartialOrd, Ord)]
#[cfg_attr(feature = "clap", derive(clap::ValueEnum))]
#[serde(rename_all = "snake_case")]
pub enum Role {
    /// Only its own tenant's sessions.
    User,
    /// Everything: every tenant's sessions, nodes, the cluster, tenants, keys.
    Admin,
}

impl Role {
    pub fn as_str(self) -> &'static str {
        match self {
            Role::User => "user",
            Role::Admin => "admin",
        }
    }

    /// Parses `user` or `admin`.
    pub fn parse(s: &str) -> Option<Self> {
        [Role::User, Role::Admin].into_iter().find(|r| r.as_str() == s)
    }
}

impl fmt::Display for Role {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Who a resolved caller is, for audit and error messages. Never a secret.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Principal {
    /// A certificate identity.
    Cert(Identity),
    /// An API key, by its public id.
    ApiKey { key_id: String },
    /// No credential, on an `--insecure` loopback cluster.
    Anonymous,
}

impl fmt::Display for Principal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Principal::Cert(id) => write!(f, "cert:{id}"),
            Principal::ApiKey { key_id } => write!(f, "key:{key_id}"),
            Principal::Anonymous => f.write_str("anonymous"),
        }
    }
}

/// A caller of a public service, resolved once at the edge and stored in the
/// request's extensions.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Caller {
    pub principal: Principal,
    pub tenant: String,
    pub role: Role,
}

impl Caller {
    /// The caller of an `--insecure` loopback cluster that sent no credential.
    pub fn anonymous_admin() -> Self {
        Self { principal: Principal::Anonymous, tenant: DEFAULT_TENANT.to_string(), role: Role::Admin }
    }

    pub fn is_admin(&self) -> bool {
        self.role == Role::Admin
    }

    /// Whether this caller may see and handle a session of `tenant`.
    pub fn may_access_tenant(&self, tenant: &str) -> bool {
        self.is_admin() || self.tenant == tenant
    }

    /// The API key id, when the caller authenticated with a key.
    pub fn key_id(&self) -> Option<&str> {
        match &self.principal {
            Principal::ApiKey { key_id } => Some(key_id),
            _ => None,
        }
    }
}

/// An API key split into its two halves. `Debug` never prints the secret.
#[derive(Clone, PartialEq, Eq)]
pub struct ApiKey {
    /// Public, stored in the clear; names the key in `apikey list` and in audit logs.
    pub id: String,
    /// Secret; only its SHA-256 is stored.
    pub secret: String,
}

impl fmt::Debug for ApiKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ApiKey").field("id", &self.id).finish_non_exhaustive()
    }
}

/// Length of a key id, in lowercase hex characters.
pub const API_KEY_ID_LEN: usize = 16;
/// Length of a key secret, in base64url characters (32 random bytes).
pub const API_KEY_SECRET_LEN: usize = 43;

impl ApiKey {
    /// A fresh random key.
    pub fn generate() -> Self {
        use base64::Engine;
        use rand::Rng;
        let mut rng = rand::rng();
        let id: [u8; API_KEY_ID_LEN / 2] = rng.random();
        let secret: [u8; 32] = rng.random();
        Self { id: hex_lower(&id), secret: base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(secret) }
    }

    /// The full key as handed to a user: `sfk_<id>_<secret>`.
    pub fn expose(&self) -> String {
        format!("{API_KEY_PREFIX}{}_{}", self.id, self.secret)
    }

    /// Parses `sfk_<id>_<secret>`; `None` when the text is not in that form.
    pub fn parse(text: &str) -> Option<Self> {
        let rest = text.strip_prefix(API_KEY_PREFIX)?;
        let (id, secret) = rest.split_at_checked(API_KEY_ID_LEN)?;
        let secret = secret.strip_prefix('_')?;
        let id_ok = id.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b));
        let secret_ok = secret.len() == API_KEY_SECRET_LEN
            && secret.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_');
        (id_ok && secret_ok).then(|| Self { id: id.to_string(), secret: secret.to_string() })
    }

    /// The hash that is stored: hex SHA-256 of the secret.
    pub fn secret_hash(&self) -> String {
        use sha2::Digest;
        hex_lower(&sha2::Sha256::digest(self.secret.as_bytes()))
    }

    /// Whether `stored_hash` is this key's hash, compared in constant time.
    pub fn matches(&self, stored_hash: &str) -> bool {
        let mine = self.secret_hash();
        let (a, b) = (mine.as_bytes(), stored_hash.as_bytes());
        a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
    }
}

fn hex_lower(bytes: &[u8]) -> String {
    hex::encode(bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spiffe_ids_round_trip_and_refuse_foreign_ones() {
        let id = Identity::new(IdentityKind::Agent, "node-a");
        assert_eq!(id.spiffe_id(), "spiffe://sandfleet/agent/node-a");
        assert_eq!(Identity::from_spiffe_id(&id.spiffe_id()).unwrap(), id);
        for bad in [
            "spiffe://other/agent/node-a",
            "spiffe://sandfleet/root/x",
            "spiffe://sandfleet/agent/",
            "spiffe://sandfleet/agent/a/b",
            "spiffe://sandfleetx/agent/a",
            "https://sandfleet/agent/a",
            "spiffe://sandfleet/agent/../x",
        ] {
            assert!(Identity::from_spiffe_id(bad).is_err(), "{bad} parsed");
        }
    }

    #[test]
    fn api_keys_parse_hash_and_match_only_themselves() {
        let k = ApiKey::generate();
        let text = k.expose();
        assert!(text.starts_with("sfk_"));
        let parsed = ApiKey::parse(&text).unwrap();
        assert_eq!(parsed, k);
        assert!(parsed.matches(&k.secret_hash()));
        let other = ApiKey::generate();
        assert!(!other.matches(&k.secret_hash()));
        assert!(!format!("{k:?}").contains(&k.secret), "Debug must not print the secret");
        for bad in ["", "sfk_", "sfk_zz", &text[..text.len() - 1], &text.replace("sfk_", "sfx_"), &format!("{text}x")] {
            assert!(ApiKey::parse(bad).is_none(), "{bad} parsed");
        }
    }

    #[test]
    fn callers_see_their_tenant_and_admins_see_all() {
        let user = Caller { principal: Principal::ApiKey { key_id: "k".into() }, tenant: "a".into(), role: Role::User };
        assert!(user.may_access_tenant("a"));
        assert!(!user.may_access_tenant("b"));
        assert!(Caller::anonymous_admin().may_access_tenant("b"));
    }
}
