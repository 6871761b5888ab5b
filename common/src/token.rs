//! Session-scoped data-plane tokens.
//!
//! The cluster holds one Ed25519 key pair in its replicated state. Coordinators
//! sign a token for a session when they return it; node agents verify tokens
//! with the public key they receive at registration, so an agent can check a
//! token but never mint one.
//!
//! Wire form: `sf1.<base64url(claims json)>.<base64url(signature)>`, sent in the
//! `authorization` metadata as `Bearer <token>`.

use base64::engine::general_purpose::URL_SAFE_NO_PAD as B64;
use base64::Engine;
use ed25519_dalek::{Signature, Signer, SigningKey, Verifier, VerifyingKey};
use serde::{Deserialize, Serialize};

const PREFIX: &str = "sf1";

/// What a token grants: data-plane access to one session on one node.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SessionClaims {
    /// The session id.
    pub sid: String,
    /// The node the session is placed on when the token was made ("" if unplaced).
    pub node: String,
    /// The placement generation when the token was made.
    pub generation: u64,
    /// Expiry, Unix milliseconds.
    pub exp_ms: i64,
    /// The session's tenant. Tokens made before tenants existed have none,
    /// which means [`crate::auth::DEFAULT_TENANT`] (see [`SessionClaims::tenant`]).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub tenant: String,
}

impl SessionClaims {
    /// The tenant the token is for; an empty one is the default tenant.
    pub fn tenant(&self) -> &str {
        if self.tenant.is_empty() {
            crate::auth::DEFAULT_TENANT
        } else {
            &self.tenant
        }
    }
}

/// A token was refused. Agents answer `UNAUTHENTICATED` with this text.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TokenError {
    /// No token was sent.
    #[error("missing session token: send it as 'authorization: Bearer <token>'")]
    Missing,
    /// The token is not in the `sf1.<claims>.<sig>` form.
    #[error("malformed session token")]
    Malformed,
    /// The signature does not verify with the cluster key.
    #[error("session token signature is invalid")]
    BadSignature,
    /// The token has expired.
    #[error("session token expired")]
    Expired,
    /// The token is for another session.
    #[error("session token is not valid for session {0}")]
    WrongSession(String),
    /// A key is malformed.
    #[error("invalid key: {0}")]
    BadKey(String),
}

impl From<TokenError> for tonic::Status {
    fn from(e: TokenError) -> Self {
        tonic::Status::unauthenticated(e.to_string())
    }
}

/// Signs tokens. Held by coordinators only.
#[derive(Clone)]
pub struct TokenSigner {
    key: SigningKey,
}

impl std::fmt::Debug for TokenSigner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TokenSigner").finish_non_exhaustive()
    }
}

impl TokenSigner {
    /// A fresh random key.
    pub fn generate() -> Self {
        let mut seed = [0u8; 32];
        rand::Rng::fill(&mut rand::rng(), &mut seed);
        Self { key: SigningKey::from_bytes(&seed) }
    }

    /// From the 32-byte secret seed.
    pub fn from_seed(seed: &[u8]) -> Result<Self, TokenError> {
        let seed: [u8; 32] = seed.try_into().map_err(|_| TokenError::BadKey("seed must be 32 bytes".into()))?;
        Ok(Self { key: SigningKey::from_bytes(&seed) })
    }

    /// The 32-byte secret seed, for replication in the cluster state.
    pub fn seed(&self) -> [u8; 32] {
        self.key.to_bytes()
    }

    /// The 32-byte public key agents verify with.
    pub fn public_key(&self) -> [u8; 32] {
        self.key.verifying_key().to_bytes()
    }

    /// Signs claims into a token.
    pub fn sign(&self, claims: &SessionClaims) -> String {
        let payload = B64.encode(serde_json::to_vec(claims).expect("claims serialize"));
        let signed = format!("{PREFIX}.{payload}");
        let sig = self.key.sign(signed.as_bytes());
        format!("{signed}.{}", B64.encode(sig.to_bytes()))
    }
}

/// Verifies tokens. Held by node agents.
#[derive(Clone, Debug)]
pub struct TokenVerifier {
    key: VerifyingKey,
}

impl TokenVerifier {
    /// From the 32-byte public key.
    pub fn from_public_key(bytes: &[u8]) -> Result<Self, TokenError> {
        let bytes: [u8; 32] = bytes.try_into().map_err(|_| TokenError::BadKey("public key must be 32 bytes".into()))?;
        let key = VerifyingKey::from_bytes(&bytes).map_err(|e| TokenError::BadKey(e.to_string()))?;
        Ok(Self { key })
    }

    /// Verifies the signature and expiry, and that the token is for `session_id`.
    pub fn verify(&self, token: &str, session_id: &str, now_ms: i64) -> Result<SessionClaims, TokenError> {
        let claims = self.verify_signed(token, now_ms)?;
        if claims.sid != session_id {
            return Err(TokenError::WrongSession(session_id.to_string()));
        }
        Ok(claims)
    }

    /// Verifies the signature and expiry only; the caller checks which
    /// session (and tenant) the claims name.
    pub fn verify_signed(&self, token: &str, now_ms: i64) -> Result<SessionClaims, TokenError> {
        let (signed, sig) = token.rsplit_once('.').ok_or(TokenError::Malformed)?;
        let (prefix, payload) = signed.split_once('.').ok_or(TokenError::Malformed)?;
        if prefix != PREFIX {
            return Err(TokenError::Malformed);
        }
        let sig = B64.decode(sig).map_err(|_| TokenError::Malformed)?;
        let sig = Signature::from_slice(&sig).map_err(|_| TokenError::Malformed)?;
        self.key.verify(signed.as_bytes(), &sig).map_err(|_| TokenError::BadSignature)?;
        let claims: SessionClaims = serde_json::from_slice(&B64.decode(payload).map_err(|_| TokenError::Malformed)?)
            .map_err(|_| TokenError::Malformed)?;
        if claims.exp_ms <= now_ms {
            return Err(TokenError::Expired);
        }
        Ok(claims)
    }
}

/// Reads the bearer token from request metadata.
pub fn bearer_from_metadata(md: &tonic::metadata::MetadataMap) -> Result<&str, TokenError> {
    let v = md.get("authorization").ok_or(TokenError::Missing)?;
    let v = v.to_str().map_err(|_| TokenError::Malformed)?;
    v.strip_prefix("Bearer ").ok_or(TokenError::Malformed)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn claims(exp_ms: i64) -> SessionClaims {
        SessionClaims { sid: "s1".into(), node: "n1".into(), generation: 1, exp_ms, tenant: String::new() }
    }

    #[test]
    fn tokens_carry_the_tenant_and_old_ones_mean_the_default_tenant() {
        let signer = TokenSigner::generate();
        let verifier = TokenVerifier::from_public_key(&signer.public_key()).unwrap();
        let t = signer.sign(&SessionClaims { tenant: "team-a".into(), ..claims(2_000) });
        assert_eq!(verifier.verify(&t, "s1", 1_000).unwrap().tenant(), "team-a");
        // A token signed before tenants existed has no tenant field at all.
        let old = signer.sign(&claims(2_000));
        assert!(!String::from_utf8(B64.decode(old.split('.').nth(1).unwrap()).unwrap()).unwrap().contains("tenant"));
        assert_eq!(verifier.verify(&old, "s1", 1_000).unwrap().tenant(), crate::auth::DEFAULT_TENANT);
        assert_eq!(verifier.verify_signed(&t, 1_000).unwrap().sid, "s1");
    }

    #[test]
    fn round_trip_and_refusals() {
        let signer = TokenSigner::generate();
        let verifier = TokenVerifier::from_public_key(&signer.public_key()).unwrap();
        let t = signer.sign(&claims(2_000));
        assert_eq!(verifier.verify(&t, "s1", 1_000).unwrap(), claims(2_000));
        assert_eq!(verifier.verify(&t, "s1", 3_000), Err(TokenError::Expired));
        assert_eq!(verifier.verify(&t, "s2", 1_000), Err(TokenError::WrongSession("s2".into())));
        assert_eq!(verifier.verify("garbage", "s1", 1_000), Err(TokenError::Malformed));

        // A token signed by another cluster's key fails.
        let other = TokenSigner::generate().sign(&claims(2_000));
        assert_eq!(verifier.verify(&other, "s1", 1_000), Err(TokenError::BadSignature));

        // Tampering with the claims breaks the signature.
        let mut parts: Vec<&str> = t.split('.').collect();
        let forged = B64.encode(serde_json::to_vec(&claims(9_999_999)).unwrap());
        parts[1] = &forged;
        assert_eq!(verifier.verify(&parts.join("."), "s1", 1_000), Err(TokenError::BadSignature));

        // The seed round-trips.
        let again = TokenSigner::from_seed(&signer.seed()).unwrap();
        assert_eq!(again.public_key(), signer.public_key());
    }
}
