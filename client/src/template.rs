//! Cluster templates (TemplateService): named session specs that sessions,
//! pools and batches name in `SessionSpec.template`, with the fields a
//! session may override and the image it runs.
//!
//! Reads, updates and deletes are retried like any idempotent call; a create
//! only when no coordinator was reached (a retried create whose first attempt
//! committed would answer ALREADY_EXISTS).

use tracing::Instrument;

use crate::client::{missing, template_client, with_timeout};
use crate::proto;
use crate::retry::RetryPolicy;
use crate::{Client, Error};

impl Client {
    /// Creates a cluster template (an admin call; `template`'s read-only fields are ignored).
    pub async fn create_template(&self, template: proto::Template) -> Result<proto::Template, Error> {
        let span = tracing::info_span!("create_template", name = %template.name);
        let msg = proto::CreateTemplateRequest { template: Some(template) };
        self.control("create_template", RetryPolicy::ConnectOnly, self.request_timeout(), |ch, t| {
            let msg = msg.clone();
            async move { Ok(template_client(ch).create_template(with_timeout(msg, t)).await?.into_inner()) }
        })
        .instrument(span)
        .await?
        .template
        .ok_or_else(|| missing("template"))
    }

    /// One template (built-in or the cluster's), with what uses it.
    pub async fn get_template(&self, name: &str) -> Result<proto::Template, Error> {
        let msg = proto::GetTemplateRequest { name: name.to_string() };
        self.control("get_template", RetryPolicy::Idempotent, self.request_timeout(), |ch, t| {
            let msg = msg.clone();
            async move { Ok(template_client(ch).get_template(with_timeout(msg, t)).await?.into_inner()) }
        })
        .await?
        .template
        .ok_or_else(|| missing("template"))
    }

    /// The built-in templates, then the cluster's, by name.
    pub async fn list_templates(&self) -> Result<Vec<proto::Template>, Error> {
        self.control("list_templates", RetryPolicy::Idempotent, self.request_timeout(), |ch, t| async move {
            Ok(template_client(ch).list_templates(with_timeout(proto::ListTemplatesRequest {}, t)).await?.into_inner())
        })
        .await
        .map(|r| r.templates)
    }

    /// Replaces a template whole (an admin call); what was made from it keeps its spec.
    pub async fn update_template(&self, template: proto::Template) -> Result<proto::Template, Error> {
        let msg = proto::UpdateTemplateRequest { template: Some(template) };
        self.control("update_template", RetryPolicy::Idempotent, self.request_timeout(), |ch, t| {
            let msg = msg.clone();
            async move { Ok(template_client(ch).update_template(with_timeout(msg, t)).await?.into_inner()) }
        })
        .await?
        .template
        .ok_or_else(|| missing("template"))
    }

    /// Deletes a template (an admin call). In use by live sessions or pools it
    /// is FAILED_PRECONDITION unless `force`.
    pub async fn delete_template(&self, name: &str, force: bool) -> Result<(), Error> {
        let msg = proto::DeleteTemplateRequest { name: name.to_string(), force };
        self.control("delete_template", RetryPolicy::ConnectOnly, self.request_timeout(), |ch, t| {
            let msg = msg.clone();
            async move { Ok(template_client(ch).delete_template(with_timeout(msg, t)).await?.into_inner()) }
        })
        .instrument(tracing::info_span!("delete_template", name, force))
        .await
        .map(|_| ())
    }
}
