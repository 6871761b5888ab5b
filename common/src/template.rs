//! Cluster templates: a named, checked session spec, and the one rule for
//! what a session of a template may change.
//!
//! A [`TemplateRecord`] is replicated state (the coordinator's TemplateService
//! writes it through Raft). A session, pool or batch that names it gets its
//! spec from [`TemplateRecord::apply`]: the template's fields are the
//! defaults, and the session may set only the fields in
//! [`TemplateRecord::allowed_overrides`]. Env, labels and node selector merge
//! (the session's value wins for a key it sets); every other field replaces.
//! The merged spec then passes every check of a spec
//! ([`SessionSpec::from_proto`]), so a template cannot widen a limit.
//!
//! The built-in templates ([`Template`]) are templates too: they allow every
//! field and have no image.

use std::collections::BTreeSet;

use sandfleet_proto::v1 as pb;
use serde::{Deserialize, Serialize};

use crate::ids::{self, ValidationError};
use crate::spec::{self, check_reserved_labels, ClusterBounds, ReplicaPatch, Runtime, SessionSpec, Template};

/// The [`pb::SessionSpec`] fields a template may let a session set, by wire name.
pub const OVERRIDABLE: [&str; 13] = [
    "cpu_millis",
    "cpu_request_millis",
    "memory_bytes",
    "pids_limit",
    "env",
    "labels",
    "ttl_seconds",
    "node_selector",
    "idle_timeout_seconds",
    "restart_policy",
    "runtime",
    "disk_bytes",
    "disk_inodes",
];

/// A cluster template as the cluster stores it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TemplateRecord {
    /// A DNS label, not a built-in name.
    pub name: String,
    /// The defaults, checked: `template` is the built-in base, `image` the
    /// normalized image (empty: the runtime's), `template_name` this name.
    pub spec: SessionSpec,
    /// What a session may set ([`OVERRIDABLE`] names).
    pub allowed_overrides: BTreeSet<String>,
    pub created_at_ms: i64,
    pub updated_at_ms: i64,
}

/// True for the names of the built-in templates.
pub fn is_builtin(name: &str) -> bool {
    Template::ALL.iter().any(|t| t.as_str() == name)
}

/// A built-in template for the wire: every field allowed, no image.
pub fn builtin_to_proto(t: Template) -> pb::Template {
    let spec = SessionSpec { template: t, ..SessionSpec::default() };
    pb::Template {
        name: t.to_string(),
        spec: Some(spec.to_proto()),
        image: String::new(),
        allowed_overrides: OVERRIDABLE.iter().map(ToString::to_string).collect(),
        builtin: true,
        ..Default::default()
    }
}

impl TemplateRecord {
    /// Checks a template from the wire (its read-only fields ignored) and
    /// resolves its spec. A built-in name is refused by the caller
    /// (ALREADY_EXISTS), not here.
    pub fn from_proto(t: pb::Template, bounds: &ClusterBounds, now_ms: i64) -> Result<Self, ValidationError> {
        ids::validate_dns_label("name", &t.name)?;
        let wire = t.spec.unwrap_or_default();
        if !wire.image.is_empty() {
            return Err(ValidationError::invalid("spec.image", "a template's image goes in its own `image` field"));
        }
        if !wire.template.is_empty() && !is_builtin(&wire.template) {
            ids::validate_template(&wire.template)?;
            return Err(ValidationError::invalid(
                "spec.template",
                format!("a template starts from a built-in template ({}), not {:?}", Template::names(), wire.template),
            ));
        }
        check_reserved_labels("spec.labels", wire.labels.keys())?;
        let image = match t.image.as_str() {
            "" => String::new(),
            i => spec::normalize_image("image", i)?,
        };
        if !image.is_empty() && wire.runtime == Runtime::Process.as_str() {
            return Err(ValidationError::invalid(
                "spec.runtime",
                "the process runtime cannot run an image: use docker or cri, or leave it empty",
            ));
        }
        let mut allowed = BTreeSet::new();
        for o in t.allowed_overrides {
            if !OVERRIDABLE.contains(&o.as_str()) {
                return Err(ValidationError::invalid(
                    "allowed_overrides",
                    format!(
                        "unknown field {:?}; use any of {}",
                        o.chars().take(64).collect::<String>(),
                        OVERRIDABLE.join(", ")
                    ),
                ));
            }
            allowed.insert(o);
        }
        let mut spec = SessionSpec::from_proto(wire, bounds)?;
        spec.template_name = t.name.clone();
        spec.image = image;
        Ok(TemplateRecord {
            name: t.name,
            spec,
            allowed_overrides: allowed,
            created_at_ms: now_ms,
            updated_at_ms: now_ms,
        })
    }

    /// The template for the wire (the usage counts left for the caller).
    pub fn to_proto(&self) -> pb::Template {
        let mut spec = self.spec.base_proto();
        // Its spec shows its base; the image has its own field.
        spec.image = String::new();
        pb::Template {
            name: self.name.clone(),
            spec: Some(spec),
            image: self.spec.image.clone(),
            allowed_overrides: self.allowed_overrides.iter().cloned().collect(),
            builtin: false,
            created_at_ms: self.created_at_ms,
            updated_at_ms: self.updated_at_ms,
            live_sessions: 0,
            pools: Vec::new(),
        }
    }

    fn allow(&self, field: &'static str) -> Result<(), ValidationError> {
        if self.allowed_overrides.contains(field) {
            return Ok(());
        }
        let allowed = if self.allowed_overrides.is_empty() {
            "nothing".to_string()
        } else {
            self.allowed_overrides.iter().cloned().collect::<Vec<_>>().join(", ")
        };
        Err(ValidationError::invalid(
            field,
            format!("template {} does not let a session set it (it allows {allowed})", self.name),
        ))
    }

    /// The spec of a session of this template that asks for `req`: the
    /// template's fields, with each field `req` sets (non-zero, non-empty)
    /// allowed and applied, then every check of a spec. `req.template` is
    /// not looked at (the caller matched it).
    pub fn apply(&self, req: pb::SessionSpec, bounds: &ClusterBounds) -> Result<SessionSpec, ValidationError> {
        if !req.image.is_empty() {
            return Err(ValidationError::invalid(
                "image",
                format!("is read only: a session of template {} runs its image", self.name),
            ));
        }
        let mut merged = self.spec.base_proto();
        macro_rules! replace {
            ($($f:ident),*) => {$(
                if is_set(&req.$f) && req.$f != merged.$f {
                    self.allow(stringify!($f))?;
                    merged.$f = req.$f;
                }
            )*};
        }
        replace!(
            cpu_millis,
            cpu_request_millis,
            memory_bytes,
            pids_limit,
            ttl_seconds,
            idle_timeout_seconds,
            runtime,
            disk_bytes,
            disk_inodes
        );
        if req.restart_policy.is_some() {
            self.allow("restart_policy")?;
            merged.restart_policy = req.restart_policy;
        }
        macro_rules! merge {
            ($($f:ident),*) => {$(
                if !req.$f.is_empty() {
                    self.allow(stringify!($f))?;
                    merged.$f.extend(req.$f);
                }
            )*};
        }
        merge!(env, labels, node_selector);
        // A smaller CPU limit with the template's request left: the request follows the limit.
        if req.cpu_millis != 0 && req.cpu_request_millis == 0 && merged.cpu_request_millis > merged.cpu_millis {
            merged.cpu_request_millis = merged.cpu_millis;
        }
        let mut spec = SessionSpec::from_proto(merged, bounds)?;
        if !self.spec.image.is_empty() && spec.runtime == Some(Runtime::Process) {
            return Err(ValidationError::invalid(
                "runtime",
                format!(
                    "template {} runs image {}, which the process runtime cannot run: use docker or cri",
                    self.name, self.spec.image
                ),
            ));
        }
        spec.template_name = self.name.clone();
        spec.image = self.spec.image.clone();
        Ok(spec)
    }

    /// Refuses a batch patch that sets what this template does not allow.
    pub fn check_patch(&self, index: usize, patch: &ReplicaPatch) -> Result<(), ValidationError> {
        let in_patch = |e| ValidationError::InPatch { index, source: Box::new(e) };
        if !patch.env.is_empty() {
            self.allow("env").map_err(in_patch)?;
        }
        if !patch.labels.is_empty() {
            self.allow("labels").map_err(in_patch)?;
        }
        Ok(())
    }
}

/// A zero or empty field is not set (proto3: it takes the default).
fn is_set<T: Default + PartialEq>(v: &T) -> bool {
    *v != T::default()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn template(allowed: &[&str]) -> pb::Template {
        pb::Template {
            name: "ml".into(),
            spec: Some(pb::SessionSpec {
                template: "python".into(),
                memory_bytes: 1 << 30,
                env: [("MODE".to_string(), "ml".to_string())].into(),
                labels: [("team".to_string(), "a".to_string())].into(),
                ..Default::default()
            }),
            image: "sandfleet/ml:1".into(),
            allowed_overrides: allowed.iter().map(ToString::to_string).collect(),
            ..Default::default()
        }
    }

    fn code(e: ValidationError) -> tonic::Code {
        tonic::Status::from(e).code()
    }

    #[test]
    fn a_template_is_checked_and_its_image_normalized() {
        let b = ClusterBounds::default();
        let t = TemplateRecord::from_proto(template(&["env"]), &b, 5).unwrap();
        assert_eq!(t.spec.image, "docker.io/sandfleet/ml:1");
        assert_eq!((t.spec.template, t.spec.template_name.as_str()), (Template::Python, "ml"));
        assert_eq!(t.spec.runtimes(), spec::IMAGE_RUNTIMES);
        let wire = t.to_proto();
        assert_eq!(
            (wire.image.as_str(), wire.spec.as_ref().unwrap().template.as_str()),
            (t.spec.image.as_str(), "python")
        );
        // Back from its own wire form, the same template.
        assert_eq!(TemplateRecord::from_proto(wire, &b, 5).unwrap(), t);

        let bad = |f: &dyn Fn(&mut pb::Template)| {
            let mut t = template(&[]);
            f(&mut t);
            TemplateRecord::from_proto(t, &b, 0).unwrap_err()
        };
        let e = bad(&|t| t.image = "Not An Image".into());
        assert_eq!(code(e.clone()), tonic::Code::InvalidArgument);
        assert!(e.to_string().contains("not an OCI image reference"), "{e}");
        assert!(bad(&|t| t.allowed_overrides = vec!["image".into()]).to_string().contains("unknown field \"image\""));
        assert!(bad(&|t| t.spec.as_mut().unwrap().template = "other".into()).to_string().contains("built-in"));
        assert!(bad(&|t| t.spec.as_mut().unwrap().runtime = "process".into()).to_string().contains("process runtime"));
        assert!(bad(&|t| t.spec.as_mut().unwrap().image = "x".into()).to_string().contains("spec.image"));
        assert!(bad(&|t| t.name = "Bad_Name".into()).to_string().contains("name"));
        let e = bad(&|t| t.spec.as_mut().unwrap().memory_bytes = 1);
        assert_eq!(code(e), tonic::Code::OutOfRange);
        let e = bad(&|t| {
            t.spec.as_mut().unwrap().labels.insert("sandfleet.io/pool".into(), "x".into());
        });
        assert!(e.to_string().contains("reserved"), "{e}");
        assert_eq!(code(bad(&|t| t.image = "x".repeat(600))), tonic::Code::OutOfRange);
    }

    #[test]
    fn a_session_sets_only_what_its_template_allows() {
        let b = ClusterBounds::default();
        let t = TemplateRecord::from_proto(template(&["env", "cpu_millis"]), &b, 0).unwrap();
        // Nothing asked: the template's spec.
        let s = t.apply(pb::SessionSpec { template: "ml".into(), ..Default::default() }, &b).unwrap();
        assert_eq!(
            (s.memory_bytes, s.image.as_str(), s.to_proto().template.as_str()),
            (1 << 30, t.spec.image.as_str(), "ml")
        );
        assert_eq!(s.sandbox_proto().template, "python");
        // Env merges; a smaller CPU limit takes the request down with it.
        let s = t
            .apply(
                pb::SessionSpec {
                    env: [("SEED".to_string(), "7".to_string())].into(),
                    cpu_millis: 50,
                    ..Default::default()
                },
                &b,
            )
            .unwrap();
        assert_eq!(s.env.get("MODE").map(String::as_str), Some("ml"));
        assert_eq!(s.env.get("SEED").map(String::as_str), Some("7"));
        assert_eq!((s.cpu_millis, s.cpu_reserved_millis()), (50, 50));
        // Anything else is refused, naming the field and what is allowed.
        let e = t.apply(pb::SessionSpec { memory_bytes: 1 << 31, ..Default::default() }, &b).unwrap_err();
        assert_eq!(code(e.clone()), tonic::Code::InvalidArgument);
        assert!(e.to_string().contains("memory_bytes") && e.to_string().contains("cpu_millis, env"), "{e}");
        let e = t
            .apply(pb::SessionSpec { labels: [("x".to_string(), "y".to_string())].into(), ..Default::default() }, &b)
            .unwrap_err();
        assert!(e.to_string().contains("invalid labels"), "{e}");
        assert!(t.apply(pb::SessionSpec { image: "x".into(), ..Default::default() }, &b).is_err());
        // An allowed field still meets every rule of a spec.
        let e = t.apply(pb::SessionSpec { cpu_millis: 1, ..Default::default() }, &b).unwrap_err();
        assert_eq!(code(e), tonic::Code::OutOfRange);
        // A runtime that cannot run the image.
        let t = TemplateRecord::from_proto(template(&["runtime"]), &b, 0).unwrap();
        let e = t.apply(pb::SessionSpec { runtime: "process".into(), ..Default::default() }, &b).unwrap_err();
        assert!(e.to_string().contains("cannot run"), "{e}");
        let s = t.apply(pb::SessionSpec { runtime: "cri".into(), ..Default::default() }, &b).unwrap();
        assert_eq!(s.runtimes(), [Runtime::Cri]);
        // Patches: env only where env is allowed.
        let patch = ReplicaPatch { env: [("A".to_string(), "1".to_string())].into(), ..Default::default() };
        let e = t.check_patch(3, &patch).unwrap_err();
        assert!(e.to_string().starts_with("patches[3]"), "{e}");
    }

    #[test]
    fn built_ins_allow_everything_and_idempotency_sees_the_template() {
        let wire = builtin_to_proto(Template::Node);
        assert!(wire.builtin && wire.image.is_empty() && wire.allowed_overrides.len() == OVERRIDABLE.len());
        assert!(is_builtin("python") && !is_builtin("ml"));
        let b = ClusterBounds::default();
        let t = TemplateRecord::from_proto(template(&[]), &b, 0).unwrap();
        let a = t.apply(Default::default(), &b).unwrap();
        let plain = SessionSpec::from_proto(a.base_proto(), &b).unwrap();
        assert_eq!(plain.differing_fields(&a), ["template", "image"]);
    }
}
