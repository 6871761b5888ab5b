//! A real S3-compatible server for tests: [`S3Server`] runs
//! `sandfleet-s3-server` (s3s-fs, objects as files under a directory) as a
//! separate process that a test can kill and start again on the same port,
//! to see how agents behave while S3 is down.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use anyhow::{anyhow, bail, Context, Result};
use sandfleet_common::ready::ReadyLine;
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};

use crate::bins::bin_path;

/// Access key the test server accepts (given to agents as `AWS_ACCESS_KEY_ID`).
pub const ACCESS_KEY: &str = "sandfleet-test";
/// Secret key the test server accepts (given to agents as `AWS_SECRET_ACCESS_KEY`).
pub const SECRET_KEY: &str = "sandfleet-test-secret";
/// The bucket the server creates.
pub const BUCKET: &str = "workspaces";

/// A running (or stopped) test S3 server.
pub struct S3Server {
    root: PathBuf,
    /// `0.0.0.0:PORT`, fixed after the first start so restarts keep the port.
    listen: String,
    port: u16,
    log: PathBuf,
    child: Option<Child>,
}

impl S3Server {
    /// Starts a server storing under `dir/s3` and listening on every
    /// interface (so agents in network namespaces reach it at the bridge's gateway).
    pub async fn start(dir: &Path) -> Result<S3Server> {
        let mut s = S3Server {
            root: dir.join("s3"),
            listen: "0.0.0.0:0".into(),
            port: 0,
            log: dir.join("s3-server.log"),
            child: None,
        };
        s.launch().await?;
        Ok(s)
    }

    async fn launch(&mut self) -> Result<()> {
        let log = std::fs::OpenOptions::new().create(true).append(true).open(&self.log)?;
        let mut child = Command::new(bin_path("sandfleet-s3-server"))
            .args(["--listen", &self.listen, "--root"])
            .arg(&self.root)
            .args(["--bucket", BUCKET])
            .env("SANDFLEET_S3_ACCESS_KEY", ACCESS_KEY)
            .env("SANDFLEET_S3_SECRET_KEY", SECRET_KEY)
            .stdout(Stdio::piped())
            .stderr(log)
            .kill_on_drop(true)
            .spawn()
            .context("starting sandfleet-s3-server")?;
        let stdout = child.stdout.take().ok_or_else(|| anyhow!("no stdout"))?;
        let mut lines = BufReader::new(stdout).lines();
        let line = tokio::time::timeout(Duration::from_secs(20), lines.next_line())
            .await
            .map_err(|_| anyhow!("sandfleet-s3-server did not get ready in 20 s; see {}", self.log.display()))??
            .ok_or_else(|| anyhow!("sandfleet-s3-server exited before it was ready; see {}", self.log.display()))?;
        let ready = match ReadyLine::parse(&line) {
            Some(Ok(ready @ ReadyLine::S3 { .. })) => ready,
            Some(Err(e)) => bail!("bad ready line {line:?}: {e}"),
            _ => bail!("bad ready line {line:?}: expected {{\"ready\":\"s3\",\"addr\":...}}"),
        };
        let addr: std::net::SocketAddr = ready.addr().parse()?;
        self.port = addr.port();
        self.listen = format!("0.0.0.0:{}", self.port);
        self.child = Some(child);
        Ok(())
    }

    /// The port it listens on.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// The endpoint URL on loopback (for clients on the host).
    pub fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// Where the bucket's objects are, as files (`<root>/<bucket>/<key>`).
    pub fn bucket_dir(&self) -> PathBuf {
        self.root.join(BUCKET)
    }

    /// Agent flags for this server, with `{host}` for the address the agents
    /// reach the host at (see [`crate::ClusterBuilder::agent_args`]).
    pub fn agent_args(&self, prefix: &str) -> Vec<String> {
        vec![
            "--workspace-store".into(),
            "s3".into(),
            "--s3-endpoint".into(),
            format!("http://{{host}}:{}", self.port),
            "--s3-bucket".into(),
            BUCKET.into(),
            "--s3-prefix".into(),
            prefix.into(),
            "--s3-path-style".into(),
        ]
    }

    /// The credentials, as the standard AWS environment variables.
    pub fn env() -> Vec<(&'static str, &'static str)> {
        vec![("AWS_ACCESS_KEY_ID", ACCESS_KEY), ("AWS_SECRET_ACCESS_KEY", SECRET_KEY), ("AWS_REGION", "us-east-1")]
    }

    /// SIGKILLs the server (S3 "down"); [`S3Server::restart`] brings it back on the same port.
    pub async fn kill(&mut self) -> Result<()> {
        let Some(mut c) = self.child.take() else { bail!("the S3 server is not running") };
        c.kill().await?;
        Ok(())
    }

    /// Starts it again on the same port, with the same data.
    pub async fn restart(&mut self) -> Result<()> {
        if self.child.is_some() {
            bail!("the S3 server is running");
        }
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        loop {
            match self.launch().await {
                Ok(()) => return Ok(()),
                // The port may linger for a moment after the kill.
                Err(e) if tokio::time::Instant::now() < deadline => {
                    tracing::debug!(error = %e, "S3 server restart failed; retrying");
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
                Err(e) => return Err(e),
            }
        }
    }
}
