//! `sandfleet tenant create|list|get|update|delete`: tenants and their quotas (admin).

use clap::Subcommand;
use sandfleet::proto;

use super::args::{parse_cpu, parse_memory};
use super::output::{format_cpu, format_memory, format_time, out, print_json, table, OutputFormat};
use super::Ctx;

/// `sandfleet tenant ...`.
#[derive(Debug, Subcommand)]
pub enum TenantCmd {
    /// Create a tenant. Limits not given are unlimited.
    Create {
        /// Tenant name: a DNS label (lowercase letters, digits and '-').
        name: String,
        #[command(flatten)]
        quota: QuotaArgs,
    },
    /// List tenants with their use against their quotas.
    #[command(alias = "ls")]
    List,
    /// Show one tenant.
    Get {
        /// Tenant name.
        name: String,
    },
    /// Change a tenant's limits (0 = unlimited); limits not given stay.
    Update {
        /// Tenant name.
        name: String,
        #[command(flatten)]
        quota: QuotaArgs,
    },
    /// Delete a tenant that has no live sessions and no active API keys.
    #[command(alias = "rm")]
    Delete {
        /// Tenant name.
        name: String,
    },
}

/// A tenant's limits.
#[derive(Debug, Clone, Default, clap::Args)]
pub struct QuotaArgs {
    /// Live sessions at most (0 = unlimited).
    #[arg(long, value_name = "N")]
    pub max_sessions: Option<u64>,
    /// CPU reserved by live sessions at most, in cores or millicores, e.g. 8 or 500m (0 = unlimited).
    #[arg(long, value_parser = parse_cpu, value_name = "CORES")]
    pub max_cpu: Option<u32>,
    /// Memory of live sessions at most, e.g. 64Gi (0 = unlimited).
    #[arg(long, value_parser = parse_memory, value_name = "SIZE")]
    pub max_memory: Option<u64>,
}

/// `limit` as a quota cell: `-` when unlimited.
fn limit(v: u64, fmt: impl Fn(u64) -> String) -> String {
    if v == 0 {
        "-".into()
    } else {
        fmt(v)
    }
}

fn cpu(v: u64) -> String {
    u32::try_from(v).map(format_cpu).unwrap_or_else(|_| format!("{v}m"))
}

/// Tenants as a table: each resource as `use/limit`.
pub fn tenants_table(tenants: &[proto::Tenant]) -> String {
    let rows: Vec<Vec<String>> = tenants
        .iter()
        .map(|t| {
            let q = t.quota.unwrap_or_default();
            let u = t.usage.unwrap_or_default();
            vec![
                t.name.clone(),
                format!("{}/{}", u.sessions, limit(q.max_sessions, |v| v.to_string())),
                format!("{}/{}", cpu(u.cpu_millis), limit(q.max_cpu_millis, cpu)),
                format!("{}/{}", format_memory(u.memory_bytes), limit(q.max_memory_bytes, format_memory)),
                format_time(t.created_at_ms),
            ]
        })
        .collect();
    table(&["NAME", "SESSIONS", "CPU", "MEMORY", "CREATED"], &rows)
}

fn print(ctx: &Ctx, tenants: &[proto::Tenant]) -> anyhow::Result<()> {
    match ctx.output {
        OutputFormat::Json if tenants.len() == 1 => print_json(&tenants[0])?,
        OutputFormat::Json => print_json(&tenants)?,
        OutputFormat::Text => out(&tenants_table(tenants))?,
    }
    Ok(())
}

/// Runs a `tenant` subcommand.
pub async fn run(ctx: &Ctx, cmd: TenantCmd) -> anyhow::Result<i32> {
    match cmd {
        TenantCmd::Create { name, quota } => {
            let q = proto::TenantQuota {
                max_sessions: quota.max_sessions.unwrap_or(0),
                max_cpu_millis: quota.max_cpu.map_or(0, u64::from),
                max_memory_bytes: quota.max_memory.unwrap_or(0),
            };
            let t = ctx.client.create_tenant(&name, q).await?;
            print(ctx, &[t])?;
        }
        TenantCmd::List => {
            let tenants = ctx.client.list_tenants().await?;
            match ctx.output {
                OutputFormat::Json => print_json(&tenants)?,
                OutputFormat::Text => out(&tenants_table(&tenants))?,
            }
        }
        TenantCmd::Get { name } => {
            let t = ctx.client.get_tenant(&name).await?;
            print(ctx, &[t])?;
        }
        TenantCmd::Update { name, quota } => {
            if quota.max_sessions.is_none() && quota.max_cpu.is_none() && quota.max_memory.is_none() {
                anyhow::bail!("nothing to update: give --max-sessions, --max-cpu or --max-memory");
            }
            let req = proto::UpdateTenantRequest {
                name,
                max_sessions: quota.max_sessions,
                max_cpu_millis: quota.max_cpu.map(u64::from),
                max_memory_bytes: quota.max_memory,
            };
            let t = ctx.client.update_tenant(req).await?;
            print(ctx, &[t])?;
        }
        TenantCmd::Delete { name } => {
            ctx.client.delete_tenant(&name).await?;
            if ctx.output == OutputFormat::Text {
                eprintln!("tenant {name} deleted");
            } else {
                print_json(&serde_json::json!({ "deleted": name }))?;
            }
        }
    }
    Ok(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_table_shows_use_against_quota() {
        let t = proto::Tenant {
            name: "team-a".into(),
            quota: Some(proto::TenantQuota { max_sessions: 5, max_cpu_millis: 4000, max_memory_bytes: 0 }),
            usage: Some(proto::TenantUsage { sessions: 2, cpu_millis: 500, memory_bytes: 512 << 20 }),
            created_at_ms: 0,
        };
        let text = tenants_table(&[t]);
        let row = text.lines().nth(1).unwrap();
        let cells: Vec<&str> = row.split_whitespace().collect();
        assert_eq!(cells, ["team-a", "2/5", "500m/4", "512Mi/-", "-"]);
    }
}
