//! SessionService: the public control plane for sessions.
//!
//! Every call resolves its caller first ([`Authenticator`]). Sessions belong
//! to the creating caller's tenant; a user sees and handles only its own
//! tenant's sessions, and another tenant's session answers NOT_FOUND with the
//! very text of a missing one. Request ids are scoped per tenant. Creates,
//! deletes and renewals log one audit event each.

use std::collections::BTreeMap;
use std::pin::Pin;
use std::sync::Arc;

use base64::engine::general_purpose::URL_SAFE_NO_PAD as B64;
use base64::Engine;
use futures::Stream;
use sandfleet_common::spec::ClusterBounds;
use sandfleet_common::{ids, limits, ValidationError};
use sandfleet_proto::v1::{self as pb, session_service_server::SessionService};
use tokio::sync::broadcast::error::RecvError;
use tokio_util::sync::CancellationToken;
use tonic::{Request, Response, Status};

use sandfleet_common::auth::{Caller, Role};

use crate::core::{phase_to_proto, Core, Tunables};
use crate::metrics::CountRequest as _;
use crate::scheduler::Unplaceable;
use crate::service::auth::{audited, Authenticator};
use crate::service::response_status;
use crate::state::{request_key, Command, CommandResponse, PendingReason, SessionPhase, SessionRecord, SpecRecord};

/// The SessionService implementation.
pub struct SessionApi {
    pub(crate) core: Arc<Core>,
    shutdown: CancellationToken,
    auth: Authenticator,
}

impl SessionApi {
    pub fn new(core: Arc<Core>, shutdown: CancellationToken, auth: Authenticator) -> Self {
        Self { core, shutdown, auth }
    }
}

/// What a missing session, and another tenant's, answers.
fn not_found(id: &str) -> Status {
    Status::not_found(format!("session {id} not found"))
}

/// The tenant a write is scoped to: `None` for admins (every tenant).
pub(crate) fn scope(caller: &Caller) -> Option<String> {
    (!caller.is_admin()).then(|| caller.tenant.clone())
}

/// The bounds of a spec that come from the cluster's settings.
pub fn cluster_bounds(tunables: &Tunables) -> ClusterBounds {
    ClusterBounds { min_lost_after_ms: tunables.min_lost_after().as_millis() as u64 }
}

/// Checks a client's spec and fills in its defaults, with the cluster's own
/// bounds: the one definition in [`sandfleet_common::spec`], through the
/// cluster template it names ([`TemplateRecord::apply`]) if any. Changes
/// nothing. A template this member does not know yet is looked up again
/// after a read barrier, so one created a moment ago on the leader is found.
pub async fn validate_spec(core: &Core, spec: Option<pb::SessionSpec>) -> Result<SpecRecord, Status> {
    let bounds = cluster_bounds(&core.tunables);
    let spec = spec.unwrap_or_default();
    if spec.template.is_empty() || sandfleet_common::template::is_builtin(&spec.template) {
        return Ok(SpecRecord::from_proto(spec, &bounds)?);
    }
    ids::validate_template(&spec.template)?;
    let lookup = || core.state.read(|st| st.templates.get(&spec.template).cloned());
    let template = match lookup() {
        Some(t) => t,
        None => {
            core.read_barrier(pb::ReadConsistency::Linearizable as i32).await?;
            lookup().ok_or_else(|| {
                ValidationError::invalid(
                    "template",
                    format!(
                        "unknown template {:?}; use a built-in one ({}) or a cluster template (TemplateService, \
                         `sandfleet template list`)",
                        spec.template,
                        sandfleet_common::spec::Template::names()
                    ),
                )
            })?
        }
    };
    Ok(template.apply(spec, &bounds)?)
}

/// The answer to a create whose request id names an existing session: that
/// session when the spec is the same, ALREADY_EXISTS naming the fields that
/// differ otherwise (the idempotency-key rule of payment APIs).
fn existing_answer(existing: &SessionRecord, request_id: &str, spec: &SpecRecord) -> Result<(), Status> {
    let differ = existing.spec.differing_fields(spec);
    if differ.is_empty() {
        Ok(())
    } else {
        Err(Status::already_exists(format!(
            "request_id {request_id:?} was already used to create session {} with a different spec \
             (differing fields: {}); retry with the same spec, or use a new request_id for a new session",
            existing.id,
            differ.join(", ")
        )))
    }
}

/// Which tenant a listing covers, from the caller and the tenant it names:
/// users see their own tenant only (naming another lists nothing: `true`);
/// admins every tenant (`None`), or the one they name.
pub(crate) fn list_scope(caller: &Caller, named: &str) -> Result<(Option<String>, bool), Status> {
    if !named.is_empty() {
        ids::validate_dns_label("tenant", named)?;
    }
    let tenant = match (caller.is_admin(), named) {
        (true, "") => None,
        (true, t) => Some(t.to_string()),
        (false, _) => Some(caller.tenant.clone()),
    };
    let empty = !caller.is_admin() && !named.is_empty() && named != caller.tenant;
    Ok((tenant, empty))
}

fn state_matches(s: &SessionRecord, states: &[i32]) -> bool {
    states.is_empty() || states.contains(&(phase_to_proto(s.phase) as i32))
}

impl SessionApi {
    async fn create(
        &self,
        caller: &Caller,
        req: pb::CreateSessionRequest,
    ) -> Result<pb::CreateSessionResponse, Status> {
        ids::validate_request_id(&req.request_id)?;
        if !req.pool.is_empty() {
            return self.claim(caller, req).await;
        }
        let spec = validate_spec(&self.core, req.spec).await?;
        sandfleet_common::spec::check_reserved_labels("labels", spec.labels.keys())?;
        self.create_spec(caller, &req.request_id, spec, String::new()).await
    }

    /// Creates a session of `spec` (checked) under `request_id`, with `message`.
    pub(crate) async fn create_spec(
        &self,
        caller: &Caller,
        request_id: &str,
        spec: SpecRecord,
        message: String,
    ) -> Result<pb::CreateSessionResponse, Status> {
        let rkey = request_key(&caller.tenant, request_id);

        // A request id this member has already seen answers at once.
        if let Some(existing) =
            self.core.state.read(|st| st.request_ids.get(&rkey).and_then(|id| st.sessions.get(id).cloned()))
        {
            existing_answer(&existing, request_id, &spec)?;
            return Ok(pb::CreateSessionResponse {
                session: Some(self.core.to_proto(&existing, true)),
                existing: true,
                claimed: false,
            });
        }

        // Place now when this member leads and a node fits; otherwise the
        // session is stored unplaced and the leader loop places it.
        // The node's resources stay reserved until the create is applied, so
        // concurrent creates see each other's placements.
        let (placement, paused) = tracing::info_span!("placement").in_scope(|| self.core.place_and_reserve(&spec));
        let mut _reservation = None;
        let (node_id, pending_reason) = match placement {
            Err(Unplaceable::Never(why)) => return Err(Status::resource_exhausted(why.to_string())),
            _ if paused => (None, PendingReason::Paused),
            Ok((node, held)) if self.core.is_leader() => {
                _reservation = Some(held);
                (Some(node), PendingReason::Starting)
            }
            Ok(_) => (None, PendingReason::AwaitingLeader),
            Err(Unplaceable::Wait(why)) => (None, why),
        };
        let now = crate::now_ms();
        let record = SessionRecord {
            id: ids::new_session_id(),
            generation: u64::from(node_id.is_some()),
            node_id,
            phase: SessionPhase::Pending,
            request_id: request_id.to_string(),
            created_at_ms: now,
            expires_at_ms: now + (spec.ttl_seconds as i64) * 1000,
            updated_at_ms: now,
            pending_reason,
            message,
            spec: spec.clone(),
            restarts: 0,
            not_before_ms: 0,
            moved_from: None,
            renewed_at_ms: 0,
            tenant: caller.tenant.clone(),
            // This create's span: the leader's placement and the agent's start join its trace.
            traceparent: sandfleet_common::trace_context::current_traceparent(),
            pool: String::new(),
            claimed_at_ms: 0,
        };
        let key_id = caller.key_id().map(str::to_string);
        let resp = self.core.propose(Command::CreateSession { session: record, key_id }).await?;
        self.core.wake.notify_one();
        match resp {
            CommandResponse::Session(s) => {
                if s.node_id.is_some() {
                    // Placed by the create itself (this member leads and a node fit).
                    crate::metrics::metrics().placements.add(1, &[]);
                }
                tracing::info!(session = %s.id, node = ?s.node_id, tenant = %s.tenant, "session created");
                Ok(pb::CreateSessionResponse {
                    session: Some(self.core.to_proto(&s, true)),
                    existing: false,
                    claimed: false,
                })
            }
            CommandResponse::Existing(s) => {
                // Another create with this request id committed first.
                existing_answer(&s, request_id, &spec)?;
                Ok(pb::CreateSessionResponse {
                    session: Some(self.core.to_proto(&s, true)),
                    existing: true,
                    claimed: false,
                })
            }
            other => Err(response_status(other)),
        }
    }

    async fn delete(
        &self,
        caller: &Caller,
        req: pb::DeleteSessionRequest,
    ) -> Result<pb::DeleteSessionResponse, Status> {
        ids::validate_session_id(&req.id)?;
        let resp = self
            .core
            .propose(Command::TerminateSessions {
                ids: vec![req.id.clone()],
                message: "deleted by client".into(),
                now_ms: crate::now_ms(),
                tenant: scope(caller),
            })
            .await?;
        self.core.wake.notify_one();
        match resp {
            CommandResponse::Sessions(mut v) if !v.is_empty() => {
                let s = v.remove(0);
                tracing::info!(session = %s.id, "session deleted");
                Ok(pb::DeleteSessionResponse { session: Some(self.core.to_proto(&s, false)) })
            }
            other => Err(response_status(other)),
        }
    }

    async fn renew(&self, caller: &Caller, req: pb::RenewSessionRequest) -> Result<pb::RenewSessionResponse, Status> {
        ids::validate_session_id(&req.id)?;
        if req.ttl_seconds > limits::MAX_TTL_SECONDS {
            return Err(ValidationError::over(
                "ttl_seconds",
                format!("{} seconds", limits::MAX_TTL_SECONDS),
                req.ttl_seconds,
            )
            .into());
        }
        let ttl = if req.ttl_seconds == 0 {
            self.core
                .state
                .read(|st| {
                    st.sessions.get(&req.id).filter(|s| caller.may_access_tenant(&s.tenant)).map(|s| s.spec.ttl_seconds)
                })
                .ok_or_else(|| not_found(&req.id))?
        } else {
            req.ttl_seconds
        };
        let now = crate::now_ms();
        let resp = self
            .core
            .propose(Command::RenewSession {
                id: req.id,
                expires_at_ms: now + ttl as i64 * 1000,
                now_ms: now,
                tenant: scope(caller),
            })
            .await?;
        match resp {
            CommandResponse::Session(s) => Ok(pb::RenewSessionResponse { session: Some(self.core.to_proto(&s, true)) }),
            other => Err(response_status(other)),
        }
    }
}

#[tonic::async_trait]
impl SessionService for SessionApi {
    #[tracing::instrument(skip_all, fields(request_id = %req.get_ref().request_id))]
    async fn create_session(
        &self,
        req: Request<pb::CreateSessionRequest>,
    ) -> Result<Response<pb::CreateSessionResponse>, Status> {
        let rid = req.get_ref().request_id.clone();
        let resource = |r: Option<&pb::CreateSessionResponse>| match r {
            Some(r) => format!("session/{}", r.session.as_ref().map_or("", |s| s.id.as_str())),
            None => format!("request/{rid}"),
        };
        audited(self.auth.caller(&req), req, "CreateSession", Role::User, resource, |caller, req| async move {
            self.create(&caller, req.into_inner()).await
        })
        .await
        .counted("create")
        .map(Response::new)
    }

    #[tracing::instrument(skip_all, fields(session = %req.get_ref().id))]
    async fn get_session(
        &self,
        req: Request<pb::GetSessionRequest>,
    ) -> Result<Response<pb::GetSessionResponse>, Status> {
        let caller = self.auth.caller(&req)?;
        let req = req.into_inner();
        ids::validate_session_id(&req.id)?;
        self.core.read_barrier(req.consistency).await?;
        let s = self
            .core
            .state
            .read(|st| st.sessions.get(&req.id).cloned())
            .filter(|s| caller.may_access_tenant(&s.tenant))
            .ok_or_else(|| not_found(&req.id))?;
        Ok(Response::new(pb::GetSessionResponse { session: Some(self.core.to_proto(&s, true)) }))
    }

    #[tracing::instrument(skip_all)]
    async fn list_sessions(
        &self,
        req: Request<pb::ListSessionsRequest>,
    ) -> Result<Response<pb::ListSessionsResponse>, Status> {
        let caller = self.auth.caller(&req)?;
        let req = req.into_inner();
        let (tenant, empty) = list_scope(&caller, &req.tenant)?;
        let page_size = match req.page_size {
            0 => limits::DEFAULT_PAGE_SIZE,
            n if n > limits::MAX_PAGE_SIZE => {
                return Err(ValidationError::over("page_size", limits::MAX_PAGE_SIZE, n).into());
            }
            n => n,
        } as usize;
        ids::validate_labels("label_selector", &req.label_selector)?;
        for s in &req.states {
            if pb::SessionState::try_from(*s).is_err() {
                return Err(Status::invalid_argument(format!("invalid states: unknown state value {s}")));
            }
        }
        let after = if req.page_token.is_empty() {
            None
        } else {
            let raw = B64.decode(&req.page_token).map_err(|_| Status::invalid_argument("invalid page_token"))?;
            let id = String::from_utf8(raw).map_err(|_| Status::invalid_argument("invalid page_token"))?;
            ids::validate_session_id(&id).map_err(|_| Status::invalid_argument("invalid page_token"))?;
            Some(id)
        };
        self.core.read_barrier(req.consistency).await?;
        let selector: BTreeMap<_, _> = req.label_selector.into_iter().collect();
        let (page, more) = self.core.state.read(|st| {
            let range = match &after {
                Some(a) => st.sessions.range::<String, _>((std::ops::Bound::Excluded(a), std::ops::Bound::Unbounded)),
                None => st.sessions.range::<String, _>(..),
            };
            let mut it = range
                .map(|(_, s)| s)
                .filter(|_| !empty)
                .filter(|s| tenant.as_ref().is_none_or(|t| *t == s.tenant))
                .filter(|s| state_matches(s, &req.states))
                .filter(|s| selector.iter().all(|(k, v)| s.spec.labels.get(k) == Some(v)));
            let page: Vec<SessionRecord> = it.by_ref().take(page_size).cloned().collect();
            (page, it.next().is_some())
        });
        let next_page_token = match (more, page.last()) {
            (true, Some(last)) => B64.encode(last.id.as_bytes()),
            _ => String::new(),
        };
        let sessions = page.iter().map(|s| self.core.to_proto(s, false)).collect();
        Ok(Response::new(pb::ListSessionsResponse { sessions, next_page_token }))
    }

    #[tracing::instrument(skip_all, fields(session = %req.get_ref().id))]
    async fn delete_session(
        &self,
        req: Request<pb::DeleteSessionRequest>,
    ) -> Result<Response<pb::DeleteSessionResponse>, Status> {
        let resource = format!("session/{}", req.get_ref().id);
        audited(
            self.auth.caller(&req),
            req,
            "DeleteSession",
            Role::User,
            |_| resource,
            |caller, req| async move { self.delete(&caller, req.into_inner()).await },
        )
        .await
        .counted("delete")
        .map(Response::new)
    }

    #[tracing::instrument(skip_all, fields(session = %req.get_ref().id))]
    async fn renew_session(
        &self,
        req: Request<pb::RenewSessionRequest>,
    ) -> Result<Response<pb::RenewSessionResponse>, Status> {
        let resource = format!("session/{}", req.get_ref().id);
        audited(
            self.auth.caller(&req),
            req,
            "RenewSession",
            Role::User,
            |_| resource,
            |caller, req| async move { self.renew(&caller, req.into_inner()).await },
        )
        .await
        .counted("renew")
        .map(Response::new)
    }

    #[tracing::instrument(skip_all, fields(request_id = %req.get_ref().request_id, count = req.get_ref().count))]
    async fn create_sessions(
        &self,
        req: Request<pb::CreateSessionsRequest>,
    ) -> Result<Response<pb::CreateSessionsResponse>, Status> {
        let rid = req.get_ref().request_id.clone();
        let resource = |r: Option<&pb::CreateSessionsResponse>| match r {
            Some(r) => format!("batch/{}", r.batch.as_ref().map_or("", |b| b.id.as_str())),
            None => format!("request/{rid}"),
        };
        audited(self.auth.caller(&req), req, "CreateSessions", Role::User, resource, |caller, req| async move {
            self.batch_create(&caller, req.into_inner()).await
        })
        .await
        .counted("create_batch")
        .map(Response::new)
    }

    #[tracing::instrument(skip_all, fields(batch = %req.get_ref().id))]
    async fn get_batch(&self, req: Request<pb::GetBatchRequest>) -> Result<Response<pb::GetBatchResponse>, Status> {
        let caller = self.auth.caller(&req)?;
        self.batch_get(&caller, req.into_inner()).await.map(Response::new)
    }

    #[tracing::instrument(skip_all)]
    async fn list_batches(
        &self,
        req: Request<pb::ListBatchesRequest>,
    ) -> Result<Response<pb::ListBatchesResponse>, Status> {
        let caller = self.auth.caller(&req)?;
        self.batch_list(&caller, req.into_inner()).await.map(Response::new)
    }

    #[tracing::instrument(skip_all, fields(batch = %req.get_ref().id))]
    async fn delete_batch(
        &self,
        req: Request<pb::DeleteBatchRequest>,
    ) -> Result<Response<pb::DeleteBatchResponse>, Status> {
        let resource = format!("batch/{}", req.get_ref().id);
        audited(
            self.auth.caller(&req),
            req,
            "DeleteBatch",
            Role::User,
            |_| resource,
            |caller, req| async move { self.batch_delete(&caller, req.into_inner()).await },
        )
        .await
        .counted("delete_batch")
        .map(Response::new)
    }

    type WatchSessionStream = Pin<Box<dyn Stream<Item = Result<pb::SessionEvent, Status>> + Send>>;

    #[tracing::instrument(skip_all, fields(session = %req.get_ref().id))]
    async fn watch_session(
        &self,
        req: Request<pb::WatchSessionRequest>,
    ) -> Result<Response<Self::WatchSessionStream>, Status> {
        let caller = self.auth.caller(&req)?;
        let id = req.into_inner().id;
        ids::validate_session_id(&id)?;
        // Subscribe before reading, so no change between the two is missed.
        let mut events = self.core.state.session_events.subscribe();
        self.core.read_barrier(pb::ReadConsistency::Linearizable as i32).await?;
        let first = self
            .core
            .state
            .read(|st| st.sessions.get(&id).cloned())
            .filter(|s| caller.may_access_tenant(&s.tenant))
            .ok_or_else(|| not_found(&id))?;
        let core = self.core.clone();
        let shutdown = self.shutdown.clone();
        let (tx, rx) = tokio::sync::mpsc::channel(16);
        tokio::spawn(async move {
            let mut last = first.clone();
            if tx.send(Ok(pb::SessionEvent { session: Some(core.to_proto(&first, false)) })).await.is_err() {
                return;
            }
            while !last.phase.is_terminal() {
                let next = tokio::select! {
                    _ = shutdown.cancelled() => {
                        let _ = tx.send(Err(Status::unavailable("coordinator is shutting down; watch again"))).await;
                        return;
                    }
                    _ = tx.closed() => return,
                    ev = events.recv() => match ev {
                        Ok(s) if s.id == id => s,
                        Ok(_) => continue,
                        // Missed events: re-read the current state.
                        Err(RecvError::Lagged(_)) => match core.state.read(|st| st.sessions.get(&id).cloned()) {
                            Some(s) => s,
                            None => return,
                        },
                        Err(RecvError::Closed) => return,
                    },
                };
                if next.updated_at_ms < last.updated_at_ms || next == last {
                    continue;
                }
                last = next.clone();
                if tx.send(Ok(pb::SessionEvent { session: Some(core.to_proto(&next, false)) })).await.is_err() {
                    return;
                }
            }
        });
        Ok(Response::new(Box::pin(tokio_stream::wrappers::ReceiverStream::new(rx))))
    }
}
