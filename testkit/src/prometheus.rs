//! A real Prometheus server (the `prometheus` binary, Debian's package) for the
//! end-to-end tests of the daemons' metrics.
//!
//! [`Prometheus::start`] runs it as a child process on a free loopback port,
//! with its own storage in a temporary directory and a generated configuration
//! that scrapes the given targets every second (and evaluates the given rule
//! files every second). The test then asks it through its HTTP API, as a
//! dashboard would: [`Prometheus::query`] (`/api/v1/query`) and
//! [`Prometheus::wait_until`]. Dropping it kills the server and removes its
//! directory (kept, with its log printed, when the thread is panicking).
//!
//! ```no_run
//! # async fn t() -> Result<(), sandfleet_testkit::prometheus::PrometheusError> {
//! use sandfleet_testkit::prometheus::{Prometheus, PrometheusConfig};
//! let config = PrometheusConfig::new().job("sandfleet-coordinator", ["10.1.2.11:9464"]);
//! let prom = Prometheus::start(config).await?;
//! let up = prom.query("up").await?;
//! # Ok(()) }
//! ```
//!
//! HTTP is a plain HTTP/1.0 GET over a tokio `TcpStream`: everything here is
//! on loopback or the cluster's bridge, and one request per connection keeps
//! it small. [`http_get`] is public for the daemons' `/healthz` and `/readyz`.
//!
//! The binary is `prometheus` on the `PATH`, or `SANDFLEET_PROMETHEUS_BIN`;
//! [`crate::require_prometheus`] is the skip-or-fail gate for tests.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use tempfile::TempDir;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// Environment variable naming the `prometheus` binary (default: `prometheus` on the `PATH`).
pub const PROMETHEUS_BIN_ENV: &str = "SANDFLEET_PROMETHEUS_BIN";

/// How long the server may take to answer `/-/ready`.
pub const READY_TIMEOUT: Duration = Duration::from_secs(30);

/// How long one HTTP request may take.
const HTTP_TIMEOUT: Duration = Duration::from_secs(10);

/// The label set and value of one sample of an instant query's result.
pub type Sample = (BTreeMap<String, String>, f64);

/// What can go wrong with the test Prometheus.
#[derive(Debug, thiserror::Error)]
pub enum PrometheusError {
    /// The binary could not be started.
    #[error("cannot start {bin}: {source}")]
    Spawn { bin: String, source: std::io::Error },
    /// Preparing its directory, configuration or log failed.
    #[error("{what}: {source}")]
    Io { what: String, source: std::io::Error },
    /// It exited or did not answer `/-/ready` in time.
    #[error("prometheus did not become ready: {reason}\n--- prometheus log ---\n{log}")]
    NotReady { reason: String, log: String },
    /// An HTTP request failed or got a malformed answer.
    #[error("GET http://{addr}{path}: {detail}")]
    Http { addr: String, path: String, detail: String },
    /// The API refused a query or answered something unexpected.
    #[error("query {expr:?}: {detail}")]
    Query { expr: String, detail: String },
    /// [`Prometheus::wait_until`] ran out of time.
    #[error("{expr:?} did not satisfy the condition within {timeout:?}; last result: {last}")]
    Timeout { expr: String, timeout: Duration, last: String },
}

/// The `prometheus` binary to run: `SANDFLEET_PROMETHEUS_BIN`, else `prometheus` (on the `PATH`).
pub fn prometheus_bin() -> String {
    std::env::var(PROMETHEUS_BIN_ENV).ok().filter(|b| !b.is_empty()).unwrap_or_else(|| "prometheus".to_string())
}

/// What the generated configuration holds.
#[derive(Debug, Clone)]
pub struct PrometheusConfig {
    /// Scrape jobs: the job name and its `host:port` targets (path `/metrics`).
    pub jobs: Vec<(String, Vec<String>)>,
    /// Rule files to load (evaluated every `scrape_interval`).
    pub rule_files: Vec<PathBuf>,
    /// The scrape and evaluation interval (default 1 s).
    pub scrape_interval: Duration,
}

impl Default for PrometheusConfig {
    fn default() -> Self {
        Self::new()
    }
}

impl PrometheusConfig {
    /// No jobs, no rules, a 1 s interval.
    pub fn new() -> Self {
        PrometheusConfig { jobs: Vec::new(), rule_files: Vec::new(), scrape_interval: Duration::from_secs(1) }
    }

    /// Adds the scrape job `name` over `targets` (`host:port`).
    pub fn job<I, S>(mut self, name: impl Into<String>, targets: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        self.jobs.push((name.into(), targets.into_iter().map(Into::into).collect()));
        self
    }

    /// Loads the rule file at `path` (alerting or recording rules).
    pub fn rule_file(mut self, path: impl Into<PathBuf>) -> Self {
        self.rule_files.push(path.into());
        self
    }

    /// The configuration as Prometheus reads it (YAML; JSON strings are valid YAML scalars).
    pub fn to_yaml(&self) -> String {
        let q = |s: &str| serde_json::Value::String(s.to_string()).to_string();
        let interval = format!("{}ms", self.scrape_interval.as_millis().max(1));
        let mut y = String::new();
        let _ = writeln!(y, "global:\n  scrape_interval: {interval}\n  scrape_timeout: {interval}");
        let _ = writeln!(y, "  evaluation_interval: {interval}");
        if !self.rule_files.is_empty() {
            y.push_str("rule_files:\n");
            for f in &self.rule_files {
                let _ = writeln!(y, "  - {}", q(&f.display().to_string()));
            }
        }
        y.push_str("scrape_configs:\n");
        for (name, targets) in &self.jobs {
            let targets: Vec<String> = targets.iter().map(|t| q(t)).collect();
            let _ = writeln!(
                y,
                "  - job_name: {}\n    metrics_path: /metrics\n    static_configs:\n      - targets: [{}]",
                q(name),
                targets.join(", ")
            );
        }
        y
    }
}

/// A running Prometheus server, killed on drop.
pub struct Prometheus {
    addr: SocketAddr,
    child: Child,
    dir: TempDir,
    log_path: PathBuf,
}

impl std::fmt::Debug for Prometheus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Prometheus").field("addr", &self.addr).field("dir", &self.dir.path()).finish()
    }
}

impl Prometheus {
    /// Writes the configuration, starts the server on a free loopback port
    /// and waits until `/-/ready` answers 200 (a port taken in between is
    /// retried on another).
    pub async fn start(config: PrometheusConfig) -> Result<Self, PrometheusError> {
        let io = |what: String| move |source: std::io::Error| PrometheusError::Io { what, source };
        let base = std::env::var_os("SANDFLEET_TEST_TMPDIR").map(PathBuf::from).unwrap_or_else(std::env::temp_dir);
        let mut dir = tempfile::Builder::new()
            .prefix("sandfleet-prometheus-")
            .tempdir_in(&base)
            .map_err(io(format!("a temporary directory in {}", base.display())))?;
        let config_path = dir.path().join("prometheus.yml");
        std::fs::write(&config_path, config.to_yaml()).map_err(io(format!("writing {}", config_path.display())))?;
        let log_path = dir.path().join("prometheus.log");
        let mut last = String::new();
        for _ in 0..3 {
            let port = std::net::TcpListener::bind("127.0.0.1:0")
                .and_then(|l| l.local_addr())
                .map_err(io("finding a free loopback port".into()))?
                .port();
            let addr = SocketAddr::from(([127, 0, 0, 1], port));
            let log = std::fs::File::create(&log_path).map_err(io(format!("creating {}", log_path.display())))?;
            let bin = prometheus_bin();
            let mut child = Command::new(&bin)
                .arg(format!("--config.file={}", config_path.display()))
                .arg(format!("--storage.tsdb.path={}", dir.path().join("data").display()))
                .arg(format!("--web.listen-address={addr}"))
                .arg("--storage.tsdb.retention.time=1d")
                .arg("--log.level=info")
                .stdin(Stdio::null())
                .stdout(log.try_clone().map_err(io("the log file".into()))?)
                .stderr(log)
                .spawn()
                .map_err(|source| PrometheusError::Spawn { bin, source })?;
            match wait_ready(&mut child, addr, READY_TIMEOUT).await {
                Ok(()) => return Ok(Prometheus { addr, child, dir, log_path }),
                Err(reason) => {
                    let exited = child.try_wait().ok().flatten().is_some();
                    let _ = child.kill();
                    let _ = child.wait();
                    let log = std::fs::read_to_string(&log_path).unwrap_or_default();
                    // Only a lost race for the port is retried.
                    if !exited || !log.contains("address already in use") {
                        dir.disable_cleanup(true);
                        return Err(PrometheusError::NotReady {
                            reason: format!("{reason} (directory kept: {})", dir.path().display()),
                            log,
                        });
                    }
                    last = reason;
                }
            }
        }
        Err(PrometheusError::NotReady { reason: last, log: std::fs::read_to_string(&log_path).unwrap_or_default() })
    }

    /// Its HTTP address (`127.0.0.1:port`).
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Its directory (configuration, storage, log).
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// Its log so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log_path).unwrap_or_default()
    }

    /// An instant query (`/api/v1/query`) at the present: one sample per
    /// series of a vector result, one without labels for a scalar, none for
    /// an empty result.
    pub async fn query(&self, expr: &str) -> Result<Vec<Sample>, PrometheusError> {
        let path = format!("/api/v1/query?query={}", url_encode(expr));
        let (code, body) = http_get(&self.addr.to_string(), &path).await?;
        let err = |detail: String| PrometheusError::Query { expr: expr.to_string(), detail };
        let json: serde_json::Value =
            serde_json::from_str(&body).map_err(|e| err(format!("HTTP {code}, not JSON ({e}): {body}")))?;
        if json["status"] != "success" {
            return Err(err(format!("HTTP {code}: {} {}", json["errorType"], json["error"])));
        }
        let data = &json["data"];
        let value = |v: &serde_json::Value| -> Result<f64, PrometheusError> {
            let text = v.get(1).and_then(|s| s.as_str()).ok_or_else(|| err(format!("a malformed sample: {v}")))?;
            text.parse::<f64>().map_err(|e| err(format!("a malformed value {text:?}: {e}")))
        };
        match data["resultType"].as_str() {
            Some("vector") => data["result"]
                .as_array()
                .ok_or_else(|| err(format!("no result array: {data}")))?
                .iter()
                .map(|r| {
                    let labels = r["metric"]
                        .as_object()
                        .map(|m| {
                            m.iter().map(|(k, v)| (k.clone(), v.as_str().unwrap_or_default().to_string())).collect()
                        })
                        .unwrap_or_default();
                    Ok((labels, value(&r["value"])?))
                })
                .collect(),
            Some("scalar") => Ok(vec![(BTreeMap::new(), value(&data["result"])?)]),
            other => Err(err(format!("an unexpected result type {other:?}: {data}"))),
        }
    }

    /// The single value of `expr` (e.g. a `sum(...)`), `None` for an empty result.
    pub async fn query_value(&self, expr: &str) -> Result<Option<f64>, PrometheusError> {
        let samples = self.query(expr).await?;
        match samples.as_slice() {
            [] => Ok(None),
            [(_, v)] => Ok(Some(*v)),
            more => Err(PrometheusError::Query {
                expr: expr.to_string(),
                detail: format!("{} series where one was expected: {more:?}", more.len()),
            }),
        }
    }

    /// Queries `expr` every 500 ms until `predicate` holds for its result,
    /// and returns that result; a [`PrometheusError::Timeout`] with the last
    /// result (or error) after `timeout`.
    pub async fn wait_until<F>(
        &self,
        expr: &str,
        predicate: F,
        timeout: Duration,
    ) -> Result<Vec<Sample>, PrometheusError>
    where
        F: Fn(&[Sample]) -> bool,
    {
        let deadline = Instant::now() + timeout;
        loop {
            let last = match self.query(expr).await {
                Ok(samples) if predicate(&samples) => return Ok(samples),
                Ok(samples) => format!("{samples:?}"),
                Err(e) => e.to_string(),
            };
            if Instant::now() >= deadline {
                return Err(PrometheusError::Timeout { expr: expr.to_string(), timeout, last });
            }
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
    }
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if std::thread::panicking() {
            self.dir.disable_cleanup(true);
            let log = self.log();
            let tail: Vec<&str> = log.lines().rev().take(40).collect::<Vec<_>>().into_iter().rev().collect();
            let text = format!(
                "\n--- prometheus at {} (directory kept: {}) log tail ---\n{}\n",
                self.addr,
                self.dir.path().display(),
                tail.join("\n")
            );
            use std::io::Write;
            let _ = std::io::stderr().write_all(text.as_bytes());
        }
    }
}

/// Polls `/-/ready` of the server at `addr` until it answers 200; the reason
/// why not after `timeout` or once the process exited.
async fn wait_ready(child: &mut Child, addr: SocketAddr, timeout: Duration) -> Result<(), String> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Ok(Some(status)) = child.try_wait() {
            return Err(format!("it exited with {status}"));
        }
        let last = match http_get(&addr.to_string(), "/-/ready").await {
            Ok((200, _)) => return Ok(()),
            Ok((code, body)) => format!("/-/ready answered {code}: {}", body.trim()),
            Err(e) => e.to_string(),
        };
        if Instant::now() >= deadline {
            return Err(format!("not ready within {timeout:?}; last: {last}"));
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Percent-encodes everything but RFC 3986's unreserved characters.
pub fn url_encode(s: &str) -> String {
    let mut out = String::with_capacity(s.len() * 3);
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'~') {
            out.push(b as char);
        } else {
            let _ = write!(out, "%{b:02X}");
        }
    }
    out
}

/// `GET path` (with its query string) on the plaintext HTTP server at
/// `addr` (`host:port`), one HTTP/1.0 request per connection: the status
/// code and the body, within 10 s.
pub async fn http_get(addr: &str, path: &str) -> Result<(u16, String), PrometheusError> {
    let fail = |detail: String| PrometheusError::Http { addr: addr.to_string(), path: path.to_string(), detail };
    let exchange = async {
        let mut stream = tokio::net::TcpStream::connect(addr).await.map_err(|e| fail(format!("connect: {e}")))?;
        let request = format!("GET {path} HTTP/1.0\r\nHost: {addr}\r\nAccept: */*\r\nConnection: close\r\n\r\n");
        stream.write_all(request.as_bytes()).await.map_err(|e| fail(format!("write: {e}")))?;
        let mut raw = Vec::new();
        stream.read_to_end(&mut raw).await.map_err(|e| fail(format!("read: {e}")))?;
        Ok::<_, PrometheusError>(raw)
    };
    let raw = tokio::time::timeout(HTTP_TIMEOUT, exchange)
        .await
        .map_err(|_| fail(format!("no answer within {HTTP_TIMEOUT:?}")))??;
    let split = raw.windows(4).position(|w| w == b"\r\n\r\n").ok_or_else(|| fail("no end of headers".into()))?;
    let head = String::from_utf8_lossy(&raw[..split]).to_string();
    let body = &raw[split + 4..];
    let code = head
        .lines()
        .next()
        .and_then(|status| status.split_whitespace().nth(1))
        .and_then(|c| c.parse::<u16>().ok())
        .ok_or_else(|| fail(format!("a malformed status line: {head:?}")))?;
    let chunked = head.lines().any(|l| {
        l.split_once(':').is_some_and(|(k, v)| {
            k.trim().eq_ignore_ascii_case("transfer-encoding") && v.trim().eq_ignore_ascii_case("chunked")
        })
    });
    let body =
        if chunked { dechunk(body).ok_or_else(|| fail("a malformed chunked body".into()))? } else { body.to_vec() };
    Ok((code, String::from_utf8_lossy(&body).to_string()))
}

/// Decodes a chunked body (which a server may send despite HTTP/1.0).
fn dechunk(mut body: &[u8]) -> Option<Vec<u8>> {
    let mut out = Vec::new();
    loop {
        let line_end = body.windows(2).position(|w| w == b"\r\n")?;
        let size_text = std::str::from_utf8(&body[..line_end]).ok()?;
        let size = usize::from_str_radix(size_text.split(';').next()?.trim(), 16).ok()?;
        body = &body[line_end + 2..];
        if size == 0 {
            return Some(out);
        }
        out.extend_from_slice(body.get(..size)?);
        body = body.get(size + 2..)?;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn queries_are_percent_encoded() {
        assert_eq!(url_encode("sum(up{job=\"a b\"}) == 1"), "sum%28up%7Bjob%3D%22a%20b%22%7D%29%20%3D%3D%201");
        assert_eq!(url_encode("a_b-c.d~"), "a_b-c.d~");
    }

    #[test]
    fn chunked_bodies_are_decoded() {
        assert_eq!(dechunk(b"5\r\nhello\r\n6;x=y\r\n world\r\n0\r\n\r\n").unwrap(), b"hello world");
        assert!(dechunk(b"5\r\nhel").is_none());
    }

    #[test]
    fn the_configuration_scrapes_every_job_and_loads_the_rules() {
        let yaml = PrometheusConfig::new()
            .job("sandfleet-coordinator", ["10.0.0.11:9464", "10.0.0.12:9464"])
            .job("sandfleet-agent", ["10.0.0.101:9464"])
            .rule_file("/x/alerts.yml")
            .to_yaml();
        assert!(yaml.contains("scrape_interval: 1000ms"), "{yaml}");
        assert!(yaml.contains("evaluation_interval: 1000ms"), "{yaml}");
        assert!(yaml.contains("  - \"/x/alerts.yml\""), "{yaml}");
        assert!(yaml.contains("job_name: \"sandfleet-coordinator\""), "{yaml}");
        assert!(yaml.contains("targets: [\"10.0.0.11:9464\", \"10.0.0.12:9464\"]"), "{yaml}");
        assert!(yaml.contains("targets: [\"10.0.0.101:9464\"]"), "{yaml}");
    }
}
