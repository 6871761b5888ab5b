//! `sandfleet apikey create|list|revoke`: API keys (admin). The whole key is
//! printed once, at creation; only its hash is stored.

use std::time::Duration;

use clap::Subcommand;
use sandfleet::proto;

use super::args::parse_duration;
use super::output::{format_time, out, print_json, table, OutputFormat};
use super::Ctx;

/// `sandfleet apikey ...`.
#[derive(Debug, Subcommand)]
pub enum ApiKeyCmd {
    /// Create a key and print it (the only time it is shown).
    Create {
        /// The key's tenant.
        #[arg(long, value_name = "NAME")]
        tenant: String,
        /// admin: everything; user: only the tenant's own sessions.
        #[arg(long, value_enum)]
        role: sandfleet_common::auth::Role,
        /// Lifetime, e.g. 30d (default: never expires).
        #[arg(long, value_parser = parse_duration, value_name = "DURATION")]
        expires: Option<Duration>,
    },
    /// List keys (ids, never secrets).
    #[command(alias = "ls")]
    List {
        /// Only keys of this tenant.
        #[arg(long, value_name = "NAME")]
        tenant: Option<String>,
    },
    /// Revoke a key: every coordinator refuses it once the revocation is applied.
    Revoke {
        /// Key id (the 16 hex characters after sfk_).
        id: String,
    },
}

fn role_name(role: i32) -> String {
    proto::ApiKeyRole::try_from(role)
        .map(|r| r.as_str_name().trim_start_matches("API_KEY_ROLE_").to_lowercase())
        .unwrap_or_else(|_| "?".into())
}

fn status(k: &proto::ApiKey, now_ms: i64) -> &'static str {
    if k.revoked_at_ms != 0 {
        "revoked"
    } else if k.expires_at_ms != 0 && k.expires_at_ms <= now_ms {
        "expired"
    } else {
        "active"
    }
}

/// Keys as a table.
pub fn keys_table(keys: &[proto::ApiKey], now_ms: i64) -> String {
    let rows: Vec<Vec<String>> = keys
        .iter()
        .map(|k| {
            vec![
                k.id.clone(),
                k.tenant.clone(),
                role_name(k.role),
                status(k, now_ms).to_string(),
                format_time(k.created_at_ms),
                format_time(k.expires_at_ms),
            ]
        })
        .collect();
    table(&["ID", "TENANT", "ROLE", "STATUS", "CREATED", "EXPIRES"], &rows)
}

/// Runs an `apikey` subcommand.
pub async fn run(ctx: &Ctx, cmd: ApiKeyCmd) -> anyhow::Result<i32> {
    let now_ms = sandfleet_common::time::now_ms();
    match cmd {
        ApiKeyCmd::Create { tenant, role, expires } => {
            let role = match role {
                sandfleet_common::auth::Role::Admin => proto::ApiKeyRole::Admin,
                sandfleet_common::auth::Role::User => proto::ApiKeyRole::User,
            };
            let r = ctx.client.create_api_key(&tenant, role, expires).await?;
            match ctx.output {
                OutputFormat::Json => print_json(&r)?,
                OutputFormat::Text => {
                    if let Some(k) = &r.key {
                        eprintln!(
                            "created {} key {} for tenant {}; it is shown only now:",
                            role_name(k.role),
                            k.id,
                            k.tenant
                        );
                    }
                    out(&format!("{}\n", r.secret))?;
                }
            }
        }
        ApiKeyCmd::List { tenant } => {
            let keys = ctx.client.list_api_keys(tenant.as_deref()).await?;
            match ctx.output {
                OutputFormat::Json => print_json(&keys)?,
                OutputFormat::Text => out(&keys_table(&keys, now_ms))?,
            }
        }
        ApiKeyCmd::Revoke { id } => {
            let k = ctx.client.revoke_api_key(&id).await?;
            match ctx.output {
                OutputFormat::Json => print_json(&k)?,
                OutputFormat::Text => out(&keys_table(std::slice::from_ref(&k), now_ms))?,
            }
        }
    }
    Ok(0)
}
