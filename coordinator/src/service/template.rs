//! Cluster templates: `TemplateService` (create, get, list, update, delete).
//!
//! A template is replicated state ([`TemplateRecord`], checked by
//! [`TemplateRecord::from_proto`]); sessions, pools and batches that name it
//! get their spec from [`TemplateRecord::apply`] in
//! [`crate::service::session::validate_spec`]. Writes need an admin; any
//! caller may read. The built-in templates are listed first, are never
//! stored, and cannot be changed or deleted.

use sandfleet_common::auth::{Caller, Role};
use sandfleet_common::ids;
use sandfleet_common::spec::Template;
use sandfleet_common::template::{builtin_to_proto, is_builtin, TemplateRecord};
use sandfleet_proto::v1::{self as pb, template_service_server::TemplateService};
use tonic::{Request, Response, Status};

use crate::core::Core;
use crate::service::auth::{audited, Authenticator};
use crate::service::response_status;
use crate::service::session::cluster_bounds;
use crate::state::{ClusterState, Command, CommandResponse};

fn not_found(name: &str) -> Status {
    Status::not_found(format!("template {name:?} not found"))
}

fn builtin_refused(name: &str, what: &str) -> Status {
    Status::failed_precondition(format!("template {name} is built in: it cannot be {what}"))
}

/// A cluster template for the wire, with what uses it.
fn template_to_proto(st: &ClusterState, t: &TemplateRecord) -> pb::Template {
    let (live, pools) = st.template_users(&t.name);
    pb::Template { live_sessions: live, pools, ..t.to_proto() }
}

/// The TemplateService implementation.
pub struct TemplateApi {
    core: std::sync::Arc<Core>,
    auth: Authenticator,
}

impl TemplateApi {
    pub fn new(core: std::sync::Arc<Core>, auth: Authenticator) -> Self {
        Self { core, auth }
    }

    /// The template of a create or update request, checked.
    fn checked(&self, t: Option<pb::Template>) -> Result<TemplateRecord, Status> {
        let t = t.ok_or_else(|| Status::invalid_argument("invalid template: missing"))?;
        Ok(TemplateRecord::from_proto(t, &cluster_bounds(&self.core.tunables), crate::now_ms())?)
    }

    async fn write(&self, cmd: Command) -> Result<pb::Template, Status> {
        match self.core.propose(cmd).await? {
            CommandResponse::Template(t) => Ok(self.core.state.read(|st| template_to_proto(st, &t))),
            other => Err(response_status(other)),
        }
    }

    async fn create(&self, req: pb::CreateTemplateRequest) -> Result<pb::CreateTemplateResponse, Status> {
        let name = req.template.as_ref().map(|t| t.name.clone()).unwrap_or_default();
        if is_builtin(&name) {
            return Err(Status::already_exists(format!("template {name:?} is built in")));
        }
        let template = self.checked(req.template)?;
        let t = self.write(Command::CreateTemplate { template }).await?;
        tracing::info!(template = %t.name, image = %t.image, "template created");
        Ok(pb::CreateTemplateResponse { template: Some(t) })
    }

    async fn update(&self, req: pb::UpdateTemplateRequest) -> Result<pb::UpdateTemplateResponse, Status> {
        let name = req.template.as_ref().map(|t| t.name.clone()).unwrap_or_default();
        if is_builtin(&name) {
            return Err(builtin_refused(&name, "changed"));
        }
        let template = self.checked(req.template)?;
        let t = self.write(Command::UpdateTemplate { template }).await?;
        tracing::info!(template = %t.name, image = %t.image, "template updated");
        Ok(pb::UpdateTemplateResponse { template: Some(t) })
    }

    async fn delete(&self, req: pb::DeleteTemplateRequest) -> Result<pb::DeleteTemplateResponse, Status> {
        if is_builtin(&req.name) {
            return Err(builtin_refused(&req.name, "deleted"));
        }
        ids::validate_template(&req.name)?;
        match self.core.propose(Command::DeleteTemplate { name: req.name.clone(), force: req.force }).await? {
            CommandResponse::Ok => {
                tracing::info!(template = %req.name, force = req.force, "template deleted");
                Ok(pb::DeleteTemplateResponse {})
            }
            other => Err(response_status(other)),
        }
    }
}

#[tonic::async_trait]
impl TemplateService for TemplateApi {
    #[tracing::instrument(skip_all)]
    async fn create_template(
        &self,
        req: Request<pb::CreateTemplateRequest>,
    ) -> Result<Response<pb::CreateTemplateResponse>, Status> {
        let name = req.get_ref().template.as_ref().map(|t| t.name.clone()).unwrap_or_default();
        audited(
            self.auth.caller(&req),
            req,
            "CreateTemplate",
            Role::Admin,
            |_| format!("template/{name}"),
            |_: Caller, req| async move { self.create(req.into_inner()).await },
        )
        .await
        .map(Response::new)
    }

    #[tracing::instrument(skip_all, fields(template = %req.get_ref().name))]
    async fn get_template(
        &self,
        req: Request<pb::GetTemplateRequest>,
    ) -> Result<Response<pb::GetTemplateResponse>, Status> {
        self.auth.caller(&req)?;
        let name = req.into_inner().name;
        if let Some(t) = Template::ALL.into_iter().find(|t| t.as_str() == name) {
            return Ok(Response::new(pb::GetTemplateResponse { template: Some(builtin_to_proto(t)) }));
        }
        ids::validate_template(&name)?;
        self.core.read_barrier(pb::ReadConsistency::Linearizable as i32).await?;
        let t = self.core.state.read(|st| st.templates.get(&name).map(|t| template_to_proto(st, t)));
        Ok(Response::new(pb::GetTemplateResponse { template: Some(t.ok_or_else(|| not_found(&name))?) }))
    }

    #[tracing::instrument(skip_all)]
    async fn list_templates(
        &self,
        req: Request<pb::ListTemplatesRequest>,
    ) -> Result<Response<pb::ListTemplatesResponse>, Status> {
        self.auth.caller(&req)?;
        self.core.read_barrier(pb::ReadConsistency::Linearizable as i32).await?;
        let mut templates: Vec<pb::Template> = Template::ALL.into_iter().map(builtin_to_proto).collect();
        self.core.state.read(|st| templates.extend(st.templates.values().map(|t| template_to_proto(st, t))));
        Ok(Response::new(pb::ListTemplatesResponse { templates }))
    }

    #[tracing::instrument(skip_all)]
    async fn update_template(
        &self,
        req: Request<pb::UpdateTemplateRequest>,
    ) -> Result<Response<pb::UpdateTemplateResponse>, Status> {
        let name = req.get_ref().template.as_ref().map(|t| t.name.clone()).unwrap_or_default();
        audited(
            self.auth.caller(&req),
            req,
            "UpdateTemplate",
            Role::Admin,
            |_| format!("template/{name}"),
            |_: Caller, req| async move { self.update(req.into_inner()).await },
        )
        .await
        .map(Response::new)
    }

    #[tracing::instrument(skip_all, fields(template = %req.get_ref().name))]
    async fn delete_template(
        &self,
        req: Request<pb::DeleteTemplateRequest>,
    ) -> Result<Response<pb::DeleteTemplateResponse>, Status> {
        let resource = format!("template/{}", req.get_ref().name);
        audited(
            self.auth.caller(&req),
            req,
            "DeleteTemplate",
            Role::Admin,
            |_| resource,
            |_: Caller, req| async move { self.delete(req.into_inner()).await },
        )
        .await
        .map(Response::new)
    }
}
