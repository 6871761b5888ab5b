//! The test Prometheus of `sandfleet_testkit::prometheus` against a real
//! Prometheus server (Debian's `prometheus`): it scrapes a tiny exporter that
//! this test serves, and the test reads the samples back through the HTTP API.
//! Skipped (loudly) without the binary, a failure under CI.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use sandfleet_testkit::prometheus::{http_get, Prometheus, PrometheusConfig, PrometheusError};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// Serves Prometheus text on every request: a gauge, and a counter that grows
/// by one per scrape. Returns its address.
async fn exporter() -> (String, Arc<AtomicU64>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    let scrapes = Arc::new(AtomicU64::new(0));
    let count = scrapes.clone();
    tokio::spawn(async move {
        loop {
            let Ok((mut conn, _)) = listener.accept().await else { return };
            let n = count.fetch_add(1, Ordering::SeqCst) + 1;
            tokio::spawn(async move {
                let mut buf = [0u8; 4096];
                let _ = conn.read(&mut buf).await;
                let body = format!(
                    "# TYPE sandfleet_test_gauge gauge\nsandfleet_test_gauge{{state=\"ready\"}} 42\n\
                     # TYPE sandfleet_test_scrapes_total counter\nsandfleet_test_scrapes_total {n}\n"
                );
                let resp = format!(
                    "HTTP/1.1 200 OK\r\nContent-Type: text/plain; version=0.0.4\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                    body.len()
                );
                let _ = conn.write_all(resp.as_bytes()).await;
            });
        }
    });
    (addr, scrapes)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_real_prometheus_scrapes_every_second_and_answers_queries() {
    if !sandfleet_testkit::require_prometheus() {
        return;
    }
    let (target, scrapes) = exporter().await;
    let prom = Prometheus::start(PrometheusConfig::new().job("exporter", [target.clone()]))
        .await
        .unwrap_or_else(|e| panic!("{e}"));

    let up = prom
        .wait_until(r#"up{job="exporter"}"#, |s| s.len() == 1 && s[0].1 == 1.0, Duration::from_secs(20))
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(up[0].0.get("instance"), Some(&target), "{up:?}");
    let gauge = prom.query("sandfleet_test_gauge").await.unwrap();
    assert_eq!(gauge.len(), 1, "{gauge:?}");
    assert_eq!(gauge[0].1, 42.0);
    assert_eq!(gauge[0].0.get("state").map(String::as_str), Some("ready"));
    assert_eq!(gauge[0].0.get("__name__").map(String::as_str), Some("sandfleet_test_gauge"));
    assert_eq!(prom.query_value("sum(sandfleet_test_gauge) * 2").await.unwrap(), Some(84.0));
    assert_eq!(prom.query_value("scalar(sandfleet_test_gauge)").await.unwrap(), Some(42.0), "a scalar result");
    assert_eq!(prom.query_value("sandfleet_test_gauge{state=\"gone\"}").await.unwrap(), None);

    // Every second: five more scrapes come within a few seconds.
    let seen = scrapes.load(Ordering::SeqCst);
    prom.wait_until(
        "sandfleet_test_scrapes_total",
        |s| s.first().is_some_and(|(_, v)| *v >= (seen + 5) as f64),
        Duration::from_secs(15),
    )
    .await
    .unwrap_or_else(|e| panic!("{e}"));

    // A malformed query is the API's error; a condition never met times out with the last result.
    let bad = prom.query("sum(").await.unwrap_err();
    assert!(matches!(bad, PrometheusError::Query { .. }), "{bad}");
    let never = prom.wait_until("sandfleet_test_gauge", |_| false, Duration::from_secs(1)).await.unwrap_err();
    assert!(matches!(&never, PrometheusError::Timeout { last, .. } if last.contains("42")), "{never}");

    // The server answers until dropped, then is gone.
    let addr = prom.addr().to_string();
    assert_eq!(http_get(&addr, "/-/healthy").await.unwrap().0, 200);
    let dir = prom.dir().to_path_buf();
    drop(prom);
    assert!(http_get(&addr, "/-/healthy").await.is_err(), "stopped on drop");
    assert!(!dir.exists(), "its directory is removed");
}
