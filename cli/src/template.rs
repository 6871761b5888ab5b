//! `sandfleet template create|get|list|update|delete`: cluster templates,
//! named by `session create --template NAME` and `pool create --template NAME`.

use std::time::Duration;

use clap::Subcommand;
use sandfleet::{proto, CreateSession};
use sandfleet_common::template::OVERRIDABLE;

use super::args::{parse_duration, parse_key_value};
use super::exec::apply_resources;
use super::output::{format_cpu, format_memory, or_dash, out, print_json, table, OutputFormat};
use super::{Ctx, ResourceArgs};

/// `sandfleet template ...`.
// Parsed once per process: boxing the arguments would buy nothing.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Subcommand)]
pub enum TemplateCmd {
    /// Create a cluster template (admin): a named spec that sessions, pools
    /// and batches use with --template NAME. Its values are the defaults; a
    /// session may set only the fields given with --allow. --template here
    /// names the built-in template it starts from (default: default).
    Create(TemplateArgs),
    /// Show one template (built-in or the cluster's) and what uses it.
    Get {
        /// Template name.
        name: String,
    },
    /// List the built-in templates and the cluster's.
    #[command(alias = "ls")]
    List,
    /// Replace a cluster template whole (admin); sessions and pools made from
    /// it keep the spec they were made with.
    Update(TemplateArgs),
    /// Delete a cluster template (admin). Refused while live sessions or
    /// pools use it, unless --force (they keep their spec).
    #[command(alias = "rm")]
    Delete {
        /// Template name.
        name: String,
        /// Delete it even while in use.
        #[arg(long)]
        force: bool,
    },
}

/// A template's fields.
#[derive(Debug, Clone, clap::Args)]
pub struct TemplateArgs {
    /// Template name: a DNS label (lowercase letters, digits and '-').
    pub name: String,
    /// OCI image to run instead of the runtime's own, e.g. python:3.12 (docker
    /// and cri runtimes only; sessions go only to nodes that hold it: nodes
    /// never pull). It must hold bwrap, as the runtime's own image does.
    #[arg(long, value_name = "IMAGE")]
    pub image: Option<String>,
    #[command(flatten)]
    pub resources: ResourceArgs,
    /// Environment variable of every session (repeatable).
    #[arg(long = "env", short = 'E', value_parser = parse_key_value, value_name = "KEY=VALUE")]
    pub env: Vec<(String, String)>,
    /// Time to live of its sessions.
    #[arg(long, value_parser = parse_duration, value_name = "DURATION")]
    pub ttl: Option<Duration>,
    /// A field a session may set (repeatable): cpu_millis, cpu_request_millis,
    /// memory_bytes, pids_limit, env, labels, ttl_seconds, node_selector,
    /// idle_timeout_seconds, restart_policy, runtime, disk_bytes, disk_inodes.
    #[arg(long = "allow", value_name = "FIELD", value_parser = clap::builder::PossibleValuesParser::new(OVERRIDABLE))]
    pub allow: Vec<String>,
}

impl TemplateArgs {
    /// The template on the wire.
    pub fn to_proto(&self) -> proto::Template {
        let mut c = apply_resources(CreateSession::new(), &self.resources);
        for (k, v) in &self.env {
            c = c.env(k.clone(), v.clone());
        }
        if let Some(ttl) = self.ttl {
            c = c.ttl(ttl);
        }
        proto::Template {
            name: self.name.clone(),
            spec: Some(c.spec),
            image: self.image.clone().unwrap_or_default(),
            allowed_overrides: self.allow.clone(),
            ..Default::default()
        }
    }
}

/// Dispatches `template` subcommands.
pub async fn run(ctx: &Ctx, cmd: TemplateCmd) -> anyhow::Result<i32> {
    match cmd {
        TemplateCmd::Create(args) => {
            let t = ctx.client.create_template(args.to_proto()).await?;
            print_template(ctx, &t)?;
        }
        TemplateCmd::Get { name } => {
            let t = ctx.client.get_template(&name).await?;
            print_template(ctx, &t)?;
        }
        TemplateCmd::List => {
            let templates = ctx.client.list_templates().await?;
            match ctx.output {
                OutputFormat::Json => print_json(&templates)?,
                OutputFormat::Text => out(&templates_table(&templates))?,
            }
        }
        TemplateCmd::Update(args) => {
            let t = ctx.client.update_template(args.to_proto()).await?;
            print_template(ctx, &t)?;
        }
        TemplateCmd::Delete { name, force } => {
            ctx.client.delete_template(&name, force).await?;
            if ctx.output == OutputFormat::Text {
                out(&format!("deleted template {name}\n"))?;
            } else {
                print_json(&serde_json::json!({ "deleted": name }))?;
            }
        }
    }
    Ok(0)
}

fn print_template(ctx: &Ctx, t: &proto::Template) -> std::io::Result<()> {
    match ctx.output {
        OutputFormat::Json => print_json(t),
        OutputFormat::Text => out(&template_text(t)),
    }
}

fn allowed(t: &proto::Template) -> String {
    if t.builtin {
        "everything".into()
    } else if t.allowed_overrides.is_empty() {
        "nothing".into()
    } else {
        t.allowed_overrides.join(", ")
    }
}

/// A template as a key/value block.
pub fn template_text(t: &proto::Template) -> String {
    let spec = t.spec.clone().unwrap_or_default();
    let kv = |m: &std::collections::HashMap<String, String>| {
        let mut v: Vec<String> = m.iter().map(|(k, v)| format!("{k}={v}")).collect();
        v.sort();
        or_dash(&v.join(",")).to_string()
    };
    let rows = [
        ("name", t.name.clone()),
        ("builtin", t.builtin.to_string()),
        ("base", spec.template.clone()),
        ("image", if t.image.is_empty() { "(the runtime's)".into() } else { t.image.clone() }),
        ("runtime", if spec.runtime.is_empty() { "any".into() } else { spec.runtime.clone() }),
        ("cpu", format_cpu(spec.cpu_millis)),
        ("memory", format_memory(spec.memory_bytes)),
        ("pids", spec.pids_limit.to_string()),
        ("ttl", format!("{}s", spec.ttl_seconds)),
        ("env", kv(&spec.env)),
        ("labels", kv(&spec.labels)),
        ("allows", allowed(t)),
        ("sessions", t.live_sessions.to_string()),
        ("pools", or_dash(&t.pools.join(", ")).to_string()),
    ];
    rows.iter().map(|(k, v)| format!("{:<10}{v}\n", format!("{k}:"))).collect()
}

/// The `template list` table.
pub fn templates_table(templates: &[proto::Template]) -> String {
    let rows: Vec<Vec<String>> = templates
        .iter()
        .map(|t| {
            let spec = t.spec.clone().unwrap_or_default();
            vec![
                t.name.clone(),
                if t.image.is_empty() { "-".into() } else { t.image.clone() },
                if spec.runtime.is_empty() { "any".into() } else { spec.runtime.clone() },
                format_cpu(spec.cpu_millis),
                format_memory(spec.memory_bytes),
                allowed(t),
                if t.builtin { "-".into() } else { t.live_sessions.to_string() },
            ]
        })
        .collect();
    table(&["NAME", "IMAGE", "RUNTIME", "CPU", "MEMORY", "ALLOWS", "SESSIONS"], &rows)
}

#[cfg(test)]
mod tests {
    use clap::Parser;

    use super::*;

    #[derive(Parser)]
    struct Cli {
        #[command(subcommand)]
        cmd: TemplateCmd,
    }

    #[test]
    fn create_takes_the_spec_image_and_overrides() {
        let cli = Cli::try_parse_from([
            "t",
            "create",
            "ml",
            "--image",
            "python:3.12",
            "--runtime",
            "docker",
            "--memory",
            "1Gi",
            "--cpu",
            "2",
            "--env",
            "MODE=ml",
            "--ttl",
            "10m",
            "--allow",
            "env",
            "--allow",
            "cpu_millis",
        ])
        .unwrap();
        let TemplateCmd::Create(args) = cli.cmd else { panic!("not create") };
        let t = args.to_proto();
        let spec = t.spec.clone().unwrap();
        assert_eq!((t.image.as_str(), spec.runtime.as_str(), spec.memory_bytes), ("python:3.12", "docker", 1 << 30));
        assert_eq!((spec.cpu_millis, spec.ttl_seconds), (2000, 600));
        assert_eq!(t.allowed_overrides, ["env", "cpu_millis"]);
        assert!(Cli::try_parse_from(["t", "create", "ml", "--allow", "image"]).is_err());
        let text = template_text(&t);
        assert!(text.contains("allows:   env, cpu_millis\n") && text.contains("image:    python:3.12\n"), "{text}");
        assert!(templates_table(&[t]).contains("python:3.12"));
    }
}
