//! Who is calling a public service, what they may do, and the audit trail.
//!
//! [`Authenticator::caller`] resolves the [`Caller`] of a SessionService,
//! NodeService, ClusterService, TenantService or ApiKeyService call, in this order:
//! 1. an API key, `authorization: Bearer sfk_<id>_<secret>`, checked against
//!    the replicated key records (unknown, wrong, revoked and expired keys all
//!    get the same UNAUTHENTICATED, which never echoes the key);
//! 2. else a `client` certificate ([`PeerIdentity`], put in the request's
//!    extensions by the TLS transport): admin of the `default` tenant; so is a
//!    `coordinator` certificate (a member forwarding a membership change). An
//!    `agent` certificate is not a public caller: PERMISSION_DENIED;
//! 3. else, only on an `--insecure` loopback cluster (no TLS),
//!    [`Caller::anonymous_admin`]; otherwise UNAUTHENTICATED.
//!
//! A key and a client certificate together: the key decides.
//!
//! Role rules: `admin` may call everything; `user` only SessionService and
//! PoolService, on its own tenant's sessions and pools (the services scope
//! that), and the reads of TemplateService. The data
//! plane (ExecService, FileService on agents) is unaffected: its
//! `authorization` header carries a session token, checked by the agent.
//!
//! [`audited`] runs every mutating control-plane call: it
//! resolves the caller, checks the role the call needs, runs the call and
//! writes its one structured event (tracing target `audit`), failures
//! included. The event never holds a secret: a key appears only by its public id.

use std::future::Future;
use std::sync::Arc;

use sandfleet_common::auth::{ApiKey, Caller, IdentityKind, PeerIdentity, Principal, Role, API_KEY_PREFIX};
use tonic::metadata::MetadataMap;
use tonic::{Request, Status};

use crate::core::Core;
use crate::state::KeyRefused;

/// The answer to any refused API key; it does not say why.
pub const KEY_REFUSED: &str = "API key refused: it is unknown, wrong, revoked or expired";
/// The answer to a call without any credential on a cluster that requires one.
pub const NO_CREDENTIAL: &str =
    "no credential: send an API key (authorization: Bearer sfk_...) or a client certificate";

/// Resolves callers of the public services.
#[derive(Clone)]
pub struct Authenticator {
    core: Arc<Core>,
    allow_anonymous: bool,
}

impl Authenticator {
    /// `allow_anonymous`: a call without credentials acts as the admin of the
    /// default tenant (only for plaintext loopback clusters and `sandfleet dev`).
    pub fn new(core: Arc<Core>, allow_anonymous: bool) -> Self {
        Self { core, allow_anonymous }
    }

    /// The caller of `req`, or UNAUTHENTICATED / PERMISSION_DENIED.
    pub fn caller<T>(&self, req: &Request<T>) -> Result<Caller, Status> {
        let peer = req.extensions().get::<PeerIdentity>().cloned().unwrap_or_default();
        self.resolve(req.metadata(), &peer)
    }

    /// The rules of the module docs, on the parts of a request.
    pub fn resolve(&self, md: &MetadataMap, peer: &PeerIdentity) -> Result<Caller, Status> {
        resolve_with(md, peer, self.allow_anonymous, |key| {
            self.core.state.read(|st| st.authenticate_key(key, crate::now_ms()))
        })
    }

    /// The caller of `req`, who must be an admin.
    pub fn admin<T>(&self, req: &Request<T>) -> Result<Caller, Status> {
        let caller = self.caller(req)?;
        require_admin(&caller)?;
        Ok(caller)
    }
}

/// Runs a mutating call and logs its one audit event, failures included.
///
/// `caller` is the caller of `req` as [`Authenticator::caller`] resolved it;
/// it must have role `need` (any caller has [`Role::User`]). Then `body`
/// runs with the caller and the request. The event names `method` and the
/// `resource` the call touched: given the response when the call succeeded,
/// `None` when it failed (so a failed call names what it asked for, computed
/// before the request is consumed).
pub async fn audited<T, R, Fut>(
    caller: Result<Caller, Status>,
    req: Request<T>,
    method: &'static str,
    need: Role,
    resource: impl FnOnce(Option<&R>) -> String,
    body: impl FnOnce(Caller, Request<T>) -> Fut,
) -> Result<R, Status>
where
    Fut: Future<Output = Result<R, Status>>,
{
    let who = AuditWho::of(&req, &caller);
    let allowed = caller.and_then(|c| {
        if need == Role::Admin {
            require_admin(&c)?;
        }
        Ok(c)
    });
    let result = match allowed {
        Ok(caller) => body(caller, req).await,
        Err(e) => Err(e),
    };
    audit(&who, method, &resource(result.as_ref().ok()), &result);
    result
}

/// The rules of the module docs, with the key lookup given (the replicated
/// key records in [`crate::state::ClusterState::authenticate_key`]).
pub fn resolve_with(
    md: &MetadataMap,
    peer: &PeerIdentity,
    allow_anonymous: bool,
    lookup: impl FnOnce(&ApiKey) -> Result<Caller, KeyRefused>,
) -> Result<Caller, Status> {
    if let Some(value) = md.get("authorization") {
        let key = value
            .to_str()
            .ok()
            .and_then(|v| v.strip_prefix("Bearer "))
            .and_then(|k| ApiKey::parse(k.trim()))
            .ok_or_else(|| {
                Status::unauthenticated(format!(
                    "malformed authorization header: send 'Bearer {API_KEY_PREFIX}<id>_<secret>'"
                ))
            })?;
        return lookup(&key).map_err(|why| {
            tracing::debug!(key_id = %key.id, ?why, "API key refused");
            Status::unauthenticated(KEY_REFUSED)
        });
    }
    match &peer.0 {
        // A coordinator certificate is a member forwarding a call (a membership
        // change sent to a follower); a member can propose any command anyway.
        Some(id) if matches!(id.kind, IdentityKind::Client | IdentityKind::Coordinator) => Ok(Caller {
            principal: Principal::Cert(id.clone()),
            tenant: sandfleet_common::auth::DEFAULT_TENANT.to_string(),
            role: Role::Admin,
        }),
        Some(id) => Err(Status::permission_denied(format!(
            "a {} certificate ({id}) cannot call the public API; use a client certificate or an API key",
            id.kind
        ))),
        None if allow_anonymous => Ok(Caller::anonymous_admin()),
        None => Err(Status::unauthenticated(NO_CREDENTIAL)),
    }
}

/// PERMISSION_DENIED unless `caller` is an admin.
pub fn require_admin(caller: &Caller) -> Result<(), Status> {
    if caller.is_admin() {
        Ok(())
    } else {
        Err(Status::permission_denied(format!(
            "this call needs role {}; {} has role {} (tenant {:?})",
            Role::Admin,
            caller.principal,
            caller.role,
            caller.tenant
        )))
    }
}

/// Who to name in an audit event when authentication failed: the key id the
/// caller claimed (public), else the certificate, else nobody. Never a secret.
pub fn claimed_principal<T>(req: &Request<T>) -> String {
    if let Some(v) = req.metadata().get("authorization") {
        return match v.to_str().ok().and_then(|v| v.strip_prefix("Bearer ")).and_then(|k| ApiKey::parse(k.trim())) {
            Some(k) => Principal::ApiKey { key_id: k.id }.to_string(),
            None => "malformed-credential".to_string(),
        };
    }
    match req.extensions().get::<PeerIdentity>().and_then(|p| p.0.clone()) {
        Some(id) => Principal::Cert(id).to_string(),
        None => "unauthenticated".to_string(),
    }
}

/// What an audit event says about who called, resolved before the request is consumed.
#[derive(Debug, Clone)]
struct AuditWho {
    principal: String,
    tenant: String,
}

impl AuditWho {
    /// From the authentication result of `req`.
    fn of<T>(req: &Request<T>, caller: &Result<Caller, Status>) -> Self {
        match caller {
            Ok(c) => AuditWho { principal: c.principal.to_string(), tenant: c.tenant.clone() },
            Err(_) => AuditWho { principal: claimed_principal(req), tenant: String::new() },
        }
    }
}

/// The audit event of a node agent's call that changes replicated state
/// (its own node's hold): the agent acts as `agent/<node>`, bound to its certificate.
pub fn audit_agent<T>(node_id: &str, method: &'static str, resource: &str, result: &Result<T, Status>) {
    let who = AuditWho { principal: format!("agent/{node_id}"), tenant: String::new() };
    audit(&who, method, resource, result);
}

/// The one audit event of a mutating control-plane call.
fn audit<T>(who: &AuditWho, method: &'static str, resource: &str, result: &Result<T, Status>) {
    let code = match result {
        Ok(_) => tonic::Code::Ok,
        Err(s) => s.code(),
    };
    // Resources come from requests: bounded, so a caller cannot flood the log.
    let resource: String = resource.chars().take(200).collect();
    tracing::info!(
        target: "audit",
        principal = %who.principal,
        tenant = %who.tenant,
        method,
        resource = %resource,
        code = ?code,
        "audit"
    );
}

#[cfg(test)]
mod tests {
    use super::*;
    use sandfleet_common::auth::Identity;

    fn md(auth: Option<&str>) -> MetadataMap {
        let mut md = MetadataMap::new();
        if let Some(a) = auth {
            md.insert("authorization", a.parse().unwrap());
        }
        md
    }

    #[test]
    fn claimed_principal_names_the_key_id_never_the_secret() {
        let key = ApiKey::generate();
        let mut req = Request::new(());
        *req.metadata_mut() = md(Some(&format!("Bearer {}", key.expose())));
        let p = claimed_principal(&req);
        assert_eq!(p, format!("key:{}", key.id));
        assert!(!p.contains(&key.secret));
        let mut req = Request::new(());
        *req.metadata_mut() = md(Some("Bearer nonsense"));
        assert_eq!(claimed_principal(&req), "malformed-credential");
        let mut req = Request::new(());
        req.extensions_mut().insert(PeerIdentity(Some(Identity::new(IdentityKind::Agent, "n1"))));
        assert_eq!(claimed_principal(&req), "cert:agent/n1");
        assert_eq!(claimed_principal(&Request::new(())), "unauthenticated");
    }

    fn state_with(key: &ApiKey, tenant: &str, role: Role, expires_at_ms: i64) -> crate::state::ClusterState {
        let mut st = crate::state::ClusterState::default();
        st.api_keys.insert(key.id.clone(), crate::state::fixtures::key_record(key, tenant, role, expires_at_ms));
        st
    }

    #[test]
    fn keys_then_client_certificates_then_anonymous() {
        let key = ApiKey::generate();
        let st = state_with(&key, "a", Role::User, 0);
        let lookup = |k: &ApiKey| st.authenticate_key(k, 10);
        let bearer = format!("Bearer {}", key.expose());
        let client = PeerIdentity(Some(Identity::new(IdentityKind::Client, "ops")));
        let agent = PeerIdentity(Some(Identity::new(IdentityKind::Agent, "n1")));

        // The key decides, even with a client certificate.
        let c = resolve_with(&md(Some(&bearer)), &client, false, lookup).unwrap();
        assert_eq!((c.tenant.as_str(), c.role, c.key_id()), ("a", Role::User, Some(key.id.as_str())));
        // A client certificate alone: admin of the default tenant.
        let c = resolve_with(&md(None), &client, false, lookup).unwrap();
        assert_eq!((c.tenant.as_str(), c.role), ("default", Role::Admin));
        assert_eq!(c.principal.to_string(), "cert:client/ops");
        // An agent certificate is no public caller; a coordinator's is a member forwarding.
        let e = resolve_with(&md(None), &agent, true, lookup).unwrap_err();
        assert_eq!(e.code(), tonic::Code::PermissionDenied);
        let member = PeerIdentity(Some(Identity::new(IdentityKind::Coordinator, "c2")));
        assert_eq!(resolve_with(&md(None), &member, false, lookup).unwrap().role, Role::Admin);
        // Nothing: anonymous admin only when allowed.
        assert_eq!(resolve_with(&md(None), &PeerIdentity(None), true, lookup).unwrap(), Caller::anonymous_admin());
        let e = resolve_with(&md(None), &PeerIdentity(None), false, lookup).unwrap_err();
        assert_eq!((e.code(), e.message()), (tonic::Code::Unauthenticated, NO_CREDENTIAL));

        // Wrong secret, unknown id, malformed: UNAUTHENTICATED, never echoing the key.
        let mut wrong = key.clone();
        wrong.secret = ApiKey::generate().secret;
        let other = ApiKey::generate();
        for bad in [wrong.expose(), other.expose()] {
            let e = resolve_with(&md(Some(&format!("Bearer {bad}"))), &client, true, lookup).unwrap_err();
            assert_eq!((e.code(), e.message()), (tonic::Code::Unauthenticated, KEY_REFUSED));
        }
        for bad in ["Bearer sfk_nope", "Basic abc", "Bearer sf1.token.sig"] {
            let e = resolve_with(&md(Some(bad)), &PeerIdentity(None), true, lookup).unwrap_err();
            assert_eq!(e.code(), tonic::Code::Unauthenticated, "{bad}");
            assert!(!e.message().contains("nope") && !e.message().contains("abc"), "{}", e.message());
        }
    }

    #[tokio::test]
    async fn audited_checks_the_role_before_the_body_and_names_the_resource() {
        let user =
            Caller { principal: Principal::ApiKey { key_id: "k1".into() }, tenant: "a".into(), role: Role::User };
        let named = std::sync::Mutex::new(Vec::new());
        let resource = |r: Option<&u32>| {
            let name = r.map_or("request".to_string(), |n| format!("made/{n}"));
            named.lock().unwrap().push(name.clone());
            name
        };
        let ran = std::sync::atomic::AtomicBool::new(false);
        let body = |_: Caller, req: Request<u32>| {
            ran.store(true, std::sync::atomic::Ordering::SeqCst);
            async move { Ok(req.into_inner() + 1) }
        };
        // A user calling an admin call: refused before the body, named by the request.
        let e = audited(Ok(user.clone()), Request::new(1), "M", Role::Admin, resource, body).await.unwrap_err();
        assert_eq!(e.code(), tonic::Code::PermissionDenied);
        assert!(!ran.load(std::sync::atomic::Ordering::SeqCst), "the body ran for a refused caller");
        // No caller at all: the same.
        let e = audited(Err(Status::unauthenticated(NO_CREDENTIAL)), Request::new(1), "M", Role::User, resource, body)
            .await
            .unwrap_err();
        assert_eq!(e.code(), tonic::Code::Unauthenticated);
        assert!(!ran.load(std::sync::atomic::Ordering::SeqCst));
        // A user call by a user, and an admin call by an admin: the body runs, named by its result.
        assert_eq!(audited(Ok(user), Request::new(1), "M", Role::User, resource, body).await.unwrap(), 2);
        let admin = Caller::anonymous_admin();
        assert_eq!(audited(Ok(admin), Request::new(6), "M", Role::Admin, resource, body).await.unwrap(), 7);
        assert_eq!(*named.lock().unwrap(), ["request", "request", "made/2", "made/7"]);
    }

    #[test]
    fn require_admin_names_the_role_needed() {
        let user =
            Caller { principal: Principal::ApiKey { key_id: "k1".into() }, tenant: "a".into(), role: Role::User };
        let e = require_admin(&user).unwrap_err();
        assert_eq!(e.code(), tonic::Code::PermissionDenied);
        assert!(e.message().contains("needs role admin"), "{}", e.message());
        assert!(require_admin(&Caller::anonymous_admin()).is_ok());
    }
}
