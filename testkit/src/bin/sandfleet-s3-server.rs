//! `sandfleet-s3-server`: an S3-compatible server on a local directory
//! (s3s-fs, listing by prefix: see `sandfleet_testkit::s3fs`), for the workspace-store tests, the chaos runner and the
//! benchmarks. Test support only: it is not part of a deployment.
//!
//! Prints one JSON ready line (`{"ready":"s3","addr":"127.0.0.1:PORT"}`) once
//! it accepts connections. Requests must be signed with the given key pair.

use std::net::SocketAddr;
use std::path::PathBuf;

use anyhow::{bail, Context};
use clap::Parser;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto::Builder as ConnBuilder;
use s3s::auth::SimpleAuth;
use s3s::service::S3ServiceBuilder;
use sandfleet_common::ready::ReadyLine;

/// An S3-compatible server storing objects under a directory.
#[derive(Debug, Parser)]
#[command(version, about)]
struct Args {
    /// Listen address (port 0 picks a free port).
    #[arg(long, default_value = "127.0.0.1:0")]
    listen: SocketAddr,
    /// Directory that holds the buckets.
    #[arg(long)]
    root: PathBuf,
    /// Bucket to create if missing (repeatable).
    #[arg(long = "bucket")]
    buckets: Vec<String>,
    /// Access key id clients sign with.
    #[arg(long, env = "SANDFLEET_S3_ACCESS_KEY")]
    access_key: String,
    /// Secret key clients sign with.
    #[arg(long, env = "SANDFLEET_S3_SECRET_KEY", hide_env_values = true)]
    secret_key: String,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    std::fs::create_dir_all(&args.root).with_context(|| format!("cannot create {}", args.root.display()))?;
    for b in &args.buckets {
        if b.is_empty() || b.contains('/') || b.starts_with('.') {
            bail!("invalid --bucket {b:?}");
        }
        std::fs::create_dir_all(args.root.join(b))?;
    }
    let fs = sandfleet_testkit::s3fs::PrefixFs::new(&args.root)
        .map_err(|e| anyhow::anyhow!("cannot serve {}: {e}", args.root.display()))?;
    let service = {
        let mut b = S3ServiceBuilder::new(fs);
        b.set_auth(SimpleAuth::from_single(args.access_key.clone(), args.secret_key.clone()));
        b.build()
    };
    let listener = tokio::net::TcpListener::bind(args.listen)
        .await
        .with_context(|| format!("cannot listen on {}", args.listen))?;
    let addr = listener.local_addr()?;
    println!("{}", ReadyLine::S3 { addr: addr.to_string() });
    let http = ConnBuilder::new(TokioExecutor::new());
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    loop {
        let (socket, _) = tokio::select! {
            r = listener.accept() => match r {
                Ok(c) => c,
                Err(e) => {
                    eprintln!("accept failed: {e}");
                    continue;
                }
            },
            _ = term.recv() => return Ok(()),
            _ = tokio::signal::ctrl_c() => return Ok(()),
        };
        let _ = socket.set_nodelay(true);
        let conn = http.serve_connection(TokioIo::new(socket), service.clone()).into_owned();
        tokio::spawn(async move {
            let _ = conn.await;
        });
    }
}
