//! A test OTLP receiver: a real gRPC server of
//! `opentelemetry.proto.collector.trace.v1.TraceService/Export` (the messages
//! of the `opentelemetry-proto` crate) that keeps every span it is sent, with
//! the `service.name` of its resource, so a test can check what the processes
//! of a cluster exported and how their spans join.
//!
//! [`OtlpReceiver::start`] listens on a free port of every interface: set
//! `OTEL_EXPORTER_OTLP_ENDPOINT` to [`OtlpReceiver::endpoint_for`] the address
//! the processes reach the host at (the bridge's gateway when they run in
//! network namespaces; `ClusterBuilder::env` replaces `{host}` with it).

use std::collections::HashSet;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result};
use opentelemetry_proto::tonic::collector::trace::v1::trace_service_server::{TraceService, TraceServiceServer};
use opentelemetry_proto::tonic::collector::trace::v1::{ExportTraceServiceRequest, ExportTraceServiceResponse};
use opentelemetry_proto::tonic::common::v1::any_value::Value;
use parking_lot::Mutex;
use tokio::task::JoinHandle;

/// One span as received.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReceivedSpan {
    /// `service.name` of the resource it came with.
    pub service: String,
    /// 32 lowercase hex digits.
    pub trace_id: String,
    /// 16 lowercase hex digits.
    pub span_id: String,
    /// 16 lowercase hex digits; empty for a root span.
    pub parent_span_id: String,
    /// The span's name.
    pub name: String,
    /// Start, nanoseconds since the Unix epoch.
    pub start_unix_nanos: u64,
    /// End, nanoseconds since the Unix epoch.
    pub end_unix_nanos: u64,
}

#[derive(Clone, Default)]
struct Collector(Arc<Mutex<Vec<ReceivedSpan>>>);

fn service_name(resource: Option<&opentelemetry_proto::tonic::resource::v1::Resource>) -> String {
    resource
        .into_iter()
        .flat_map(|r| r.attributes.iter())
        .find(|kv| kv.key == "service.name")
        .and_then(|kv| kv.value.as_ref()?.value.as_ref())
        .map(|v| match v {
            Value::StringValue(s) => s.clone(),
            other => format!("{other:?}"),
        })
        .unwrap_or_default()
}

#[tonic::async_trait]
impl TraceService for Collector {
    async fn export(
        &self,
        req: tonic::Request<ExportTraceServiceRequest>,
    ) -> Result<tonic::Response<ExportTraceServiceResponse>, tonic::Status> {
        let mut got = Vec::new();
        for rs in req.into_inner().resource_spans {
            let service = service_name(rs.resource.as_ref());
            for span in rs.scope_spans.into_iter().flat_map(|s| s.spans) {
                got.push(ReceivedSpan {
                    service: service.clone(),
                    trace_id: hex::encode(&span.trace_id),
                    span_id: hex::encode(&span.span_id),
                    parent_span_id: hex::encode(&span.parent_span_id),
                    name: span.name,
                    start_unix_nanos: span.start_time_unix_nano,
                    end_unix_nanos: span.end_time_unix_nano,
                });
            }
        }
        self.0.lock().extend(got);
        Ok(tonic::Response::new(ExportTraceServiceResponse { partial_success: None }))
    }
}

/// A running receiver; stops when dropped.
pub struct OtlpReceiver {
    addr: SocketAddr,
    spans: Collector,
    server: JoinHandle<()>,
}

impl Drop for OtlpReceiver {
    fn drop(&mut self) {
        self.server.abort();
    }
}

impl OtlpReceiver {
    /// Starts a receiver on a free port of every interface.
    pub async fn start() -> Result<OtlpReceiver> {
        let listener = tokio::net::TcpListener::bind("0.0.0.0:0").await.context("binding the OTLP receiver")?;
        let addr = listener.local_addr()?;
        let spans = Collector::default();
        let service = TraceServiceServer::new(spans.clone());
        let server = tokio::spawn(async move {
            let incoming = tokio_stream::wrappers::TcpListenerStream::new(listener);
            if let Err(e) = tonic::transport::Server::builder().add_service(service).serve_with_incoming(incoming).await
            {
                tracing::warn!(error = %e, "the test OTLP receiver stopped");
            }
        });
        Ok(OtlpReceiver { addr, spans, server })
    }

    /// The port it listens on.
    pub fn port(&self) -> u16 {
        self.addr.port()
    }

    /// `http://HOST:PORT`, for `OTEL_EXPORTER_OTLP_ENDPOINT` (`HOST` as the
    /// exporting process reaches this host, e.g. `{host}` for a cluster's processes).
    pub fn endpoint_for(&self, host: &str) -> String {
        format!("http://{host}:{}", self.port())
    }

    /// Every span received so far.
    pub fn spans(&self) -> Vec<ReceivedSpan> {
        self.spans.0.lock().clone()
    }

    /// The spans of one trace received so far.
    pub fn trace(&self, trace_id: &str) -> Vec<ReceivedSpan> {
        self.spans.0.lock().iter().filter(|s| s.trace_id == trace_id).cloned().collect()
    }

    /// Waits until the spans of `trace_id` satisfy `done`; returns them, or
    /// (after `timeout`) what arrived, as the error's context.
    pub async fn wait_trace(
        &self,
        trace_id: &str,
        timeout: Duration,
        done: impl Fn(&[ReceivedSpan]) -> bool,
    ) -> Result<Vec<ReceivedSpan>, Vec<ReceivedSpan>> {
        let until = Instant::now() + timeout;
        loop {
            let spans = self.trace(trace_id);
            if done(&spans) {
                return Ok(spans);
            }
            if Instant::now() >= until {
                return Err(spans);
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

/// The spans of a trace whose parent is not in it: its roots, and the spans
/// whose parent was never exported.
pub fn orphans(spans: &[ReceivedSpan]) -> Vec<&ReceivedSpan> {
    let ids: HashSet<&str> = spans.iter().map(|s| s.span_id.as_str()).collect();
    spans.iter().filter(|s| !ids.contains(s.parent_span_id.as_str())).collect()
}

/// A readable tree of a trace's spans (`service name` per line, indented by
/// depth), for assertion messages.
pub fn render(spans: &[ReceivedSpan]) -> String {
    fn walk(spans: &[ReceivedSpan], parent: &str, depth: usize, out: &mut String) {
        let mut children: Vec<&ReceivedSpan> = spans.iter().filter(|s| s.parent_span_id == parent).collect();
        children.sort_by_key(|s| s.start_unix_nanos);
        for s in children {
            out.push_str(&format!("{}{} {} ({})\n", "  ".repeat(depth), s.service, s.name, s.span_id));
            walk(spans, &s.span_id, depth + 1, out);
        }
    }
    let mut out = String::new();
    for root in orphans(spans) {
        out.push_str(&format!(
            "{} {} ({}, parent {:?})\n",
            root.service,
            root.name,
            root.span_id,
            if root.parent_span_id.is_empty() { "none" } else { &root.parent_span_id }
        ));
        walk(spans, &root.span_id, 1, &mut out);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use opentelemetry_proto::tonic::collector::trace::v1::trace_service_client::TraceServiceClient;
    use opentelemetry_proto::tonic::common::v1::{AnyValue, KeyValue};
    use opentelemetry_proto::tonic::resource::v1::Resource;
    use opentelemetry_proto::tonic::trace::v1::{ResourceSpans, ScopeSpans, Span};

    #[tokio::test]
    async fn spans_are_kept_with_their_service() {
        let rx = OtlpReceiver::start().await.unwrap();
        let mut client = TraceServiceClient::connect(rx.endpoint_for("127.0.0.1")).await.unwrap();
        let span = |id: u8, parent: Option<u8>, name: &str| Span {
            trace_id: vec![7; 16],
            span_id: vec![id; 8],
            parent_span_id: parent.map(|p| vec![p; 8]).unwrap_or_default(),
            name: name.into(),
            start_time_unix_nano: u64::from(id),
            end_time_unix_nano: u64::from(id) + 1,
            ..Default::default()
        };
        let resource = Resource {
            attributes: vec![KeyValue {
                key: "service.name".into(),
                value: Some(AnyValue { value: Some(Value::StringValue("svc".into())) }),
                ..Default::default()
            }],
            ..Default::default()
        };
        let req = ExportTraceServiceRequest {
            resource_spans: vec![ResourceSpans {
                resource: Some(resource),
                scope_spans: vec![ScopeSpans {
                    spans: vec![span(1, None, "root"), span(2, Some(1), "child"), span(3, Some(9), "lost")],
                    ..Default::default()
                }],
                ..Default::default()
            }],
        };
        client.export(req).await.unwrap();
        let trace = rx.trace(&"07".repeat(16));
        assert_eq!(trace.len(), 3);
        assert!(trace.iter().all(|s| s.service == "svc"));
        assert_eq!(trace[1].parent_span_id, "01".repeat(8));
        let orphans: Vec<&str> = orphans(&trace).iter().map(|s| s.name.as_str()).collect();
        assert_eq!(orphans, ["root", "lost"]);
        assert!(render(&trace).contains("  svc child"));
    }
}
