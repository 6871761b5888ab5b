//! `sandfleet pool create|get|list|update|delete`: warm pools; claims are
//! `sandfleet session create --pool NAME`.

use std::time::Duration;

use clap::Subcommand;
use sandfleet::{proto, CreateSession};

use super::args::{parse_duration, parse_key_value};
use super::exec::apply_resources;
use super::output::{format_cpu, format_memory, out, print_json, table, OutputFormat};
use super::{Ctx, ResourceArgs};

/// `sandfleet pool ...`.
// Parsed once per process: boxing `Create`'s arguments would buy nothing.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Subcommand)]
pub enum PoolCmd {
    /// Create a warm pool: the leader keeps between --buffer-min and
    /// --buffer-max idle sandboxes of this spec, the pool (idle plus claimed)
    /// never below --min nor above --max. Idle sandboxes count against the tenant's quota.
    Create {
        /// Pool name: a DNS label (lowercase letters, digits and '-').
        name: String,
        #[command(flatten)]
        resources: ResourceArgs,
        /// Environment variable of every sandbox (repeatable).
        #[arg(long = "env", short = 'E', value_parser = parse_key_value, value_name = "KEY=VALUE")]
        env: Vec<(String, String)>,
        /// Time to live of a claimed sandbox, from its claim (idle ones do not expire).
        #[arg(long, value_parser = parse_duration, value_name = "DURATION")]
        ttl: Option<Duration>,
        #[command(flatten)]
        bounds: BoundArgs,
    },
    /// Show one pool and its sandboxes by state.
    Get {
        /// Pool name.
        name: String,
    },
    /// List pools.
    #[command(alias = "ls")]
    List,
    /// Change a pool's bounds; bounds not given stay.
    Update {
        /// Pool name.
        name: String,
        #[command(flatten)]
        bounds: BoundArgs,
    },
    /// Delete a pool and end its idle sandboxes (claimed ones stay).
    #[command(alias = "rm")]
    Delete {
        /// Pool name.
        name: String,
    },
}

/// A pool's bounds.
#[derive(Debug, Clone, Default, clap::Args)]
pub struct BoundArgs {
    /// Fewest sandboxes in the pool, idle plus claimed.
    #[arg(long, value_name = "N")]
    pub min: Option<u32>,
    /// Most sandboxes in the pool, idle plus claimed.
    #[arg(long, value_name = "N")]
    pub max: Option<u32>,
    /// Refill when fewer idle sandboxes than this.
    #[arg(long, value_name = "N")]
    pub buffer_min: Option<u32>,
    /// Refill up to this many idle sandboxes; end idle ones above it.
    #[arg(long, value_name = "N")]
    pub buffer_max: Option<u32>,
}

/// Dispatches `pool` subcommands.
pub async fn run(ctx: &Ctx, cmd: PoolCmd) -> anyhow::Result<i32> {
    match cmd {
        PoolCmd::Create { name, resources, env, ttl, bounds } => {
            let mut c = apply_resources(CreateSession::new(), &resources);
            for (k, v) in env {
                c = c.env(k, v);
            }
            if let Some(ttl) = ttl {
                c = c.ttl(ttl);
            }
            let max = bounds.max.unwrap_or(0);
            let pool = proto::Pool {
                name,
                spec: Some(c.spec),
                min: bounds.min.unwrap_or(0),
                max,
                buffer_min: bounds.buffer_min.unwrap_or(0),
                buffer_max: bounds.buffer_max.unwrap_or(0),
                ..Default::default()
            };
            let p = ctx.client.create_pool(pool).await?;
            print_pool(ctx, &p)?;
        }
        PoolCmd::Get { name } => {
            let p = ctx.client.get_pool(&name).await?;
            print_pool(ctx, &p)?;
        }
        PoolCmd::List => {
            let pools = ctx.client.list_pools().await?;
            match ctx.output {
                OutputFormat::Json => print_json(&pools)?,
                OutputFormat::Text => out(&pools_table(&pools))?,
            }
        }
        PoolCmd::Update { name, bounds } => {
            let req = proto::UpdatePoolRequest {
                name,
                min: bounds.min,
                max: bounds.max,
                buffer_min: bounds.buffer_min,
                buffer_max: bounds.buffer_max,
            };
            let p = ctx.client.update_pool(req).await?;
            print_pool(ctx, &p)?;
        }
        PoolCmd::Delete { name } => {
            ctx.client.delete_pool(&name).await?;
            if ctx.output == OutputFormat::Text {
                out(&format!("deleted pool {name}\n"))?;
            } else {
                print_json(&serde_json::json!({ "deleted": name }))?;
            }
        }
    }
    Ok(0)
}

fn print_pool(ctx: &Ctx, p: &proto::Pool) -> std::io::Result<()> {
    match ctx.output {
        OutputFormat::Json => print_json(p),
        OutputFormat::Text => out(&pool_text(p)),
    }
}

/// A pool as a key/value block.
pub fn pool_text(p: &proto::Pool) -> String {
    let spec = p.spec.clone().unwrap_or_default();
    let rows = [
        ("name", p.name.clone()),
        ("tenant", p.tenant.clone()),
        ("template", spec.template.clone()),
        ("cpu", format_cpu(spec.cpu_millis)),
        ("memory", format_memory(spec.memory_bytes)),
        ("bounds", format!("min {} max {}, idle {}..{}", p.min, p.max, p.buffer_min, p.buffer_max)),
        ("idle", p.idle.to_string()),
        ("starting", p.starting.to_string()),
        ("claimed", p.claimed.to_string()),
        ("failed", p.failed.to_string()),
    ];
    rows.iter().map(|(k, v)| format!("{:<10}{v}\n", format!("{k}:"))).collect()
}

/// The `pool list` table.
pub fn pools_table(pools: &[proto::Pool]) -> String {
    let rows: Vec<Vec<String>> = pools
        .iter()
        .map(|p| {
            vec![
                p.name.clone(),
                p.tenant.clone(),
                format!("{}..{}", p.min, p.max),
                format!("{}..{}", p.buffer_min, p.buffer_max),
                p.idle.to_string(),
                p.starting.to_string(),
                p.claimed.to_string(),
                p.failed.to_string(),
            ]
        })
        .collect();
    table(&["NAME", "TENANT", "SIZE", "BUFFER", "IDLE", "STARTING", "CLAIMED", "FAILED"], &rows)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_pool_shows_its_bounds_and_counts() {
        let p = proto::Pool {
            name: "py".into(),
            min: 1,
            max: 9,
            buffer_min: 2,
            buffer_max: 4,
            idle: 3,
            ..Default::default()
        };
        let text = pool_text(&p);
        assert!(text.contains("bounds:   min 1 max 9, idle 2..4\n") && text.contains("idle:     3\n"), "{text}");
        assert!(pools_table(&[p]).contains("1..9"));
    }
}
