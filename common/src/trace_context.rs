//! W3C trace context across processes: the one definition of how a span's
//! OpenTelemetry context travels.
//!
//! - Clients put the current `tracing` span's context into a call's metadata as
//!   `traceparent` (and `tracestate`): [`Propagate`] is a tonic interceptor,
//!   [`inject`] the helper for a request built by hand.
//! - Servers give each request's span the caller's span as its remote parent
//!   ([`server_span`], the daemons' `trace_fn`).
//! - A context is stored as a `traceparent` string where a message or a Raft
//!   entry carries it onward ([`current_traceparent`], [`set_parent`],
//!   [`add_link`]): the create command and the session record keep the
//!   creating request's, the agent's `Assignment` and the executor's exec
//!   request carry one.
//! - A process that cannot export (the executor, in a container without
//!   network) measures its spans as [`MeasuredSpan`]s and hands them back;
//!   [`crate::telemetry::relay`] exports them under that process's service name.
//!
//! Input from the wire is never an error: a malformed, all-zero or over-long
//! `traceparent` (more than [`MAX_TRACEPARENT_LEN`] bytes) counts as absent, and
//! an over-long `tracestate` is dropped.
//!
//! Cost: until [`crate::telemetry`] exports spans (`OTEL_EXPORTER_OTLP_ENDPOINT`
//! set), every function here returns at once after one relaxed atomic load:
//! nothing is parsed, injected or stored.

use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use opentelemetry::propagation::{Extractor, Injector, TextMapPropagator};
use opentelemetry::trace::{SpanContext, SpanId, TraceContextExt as _, TraceFlags, TraceId, TraceState};
use opentelemetry::Context;
use opentelemetry_sdk::propagation::TraceContextPropagator;
use serde::{Deserialize, Serialize};
use tonic::codegen::http;
use tonic::metadata::{Ascii, MetadataKey, MetadataMap, MetadataValue};
use tracing_opentelemetry::OpenTelemetrySpanExt as _;

/// The metadata key of the W3C trace parent.
pub const TRACEPARENT: &str = "traceparent";
/// The metadata key of the W3C trace state.
pub const TRACESTATE: &str = "tracestate";
/// The longest `traceparent` accepted (version 00 is 55 bytes; later versions
/// may append fields).
pub const MAX_TRACEPARENT_LEN: usize = 128;
/// The longest `tracestate` accepted (the 512 bytes W3C asks every vendor to pass on).
pub const MAX_TRACESTATE_LEN: usize = 512;
/// The most spans another process may hand back for one operation.
pub const MAX_MEASURED_SPANS: usize = 8;
/// The longest name of a measured span.
pub const MAX_SPAN_NAME_LEN: usize = 64;

/// Whether this process exports spans; set by [`crate::telemetry`].
static ENABLED: AtomicBool = AtomicBool::new(false);

/// Turns propagation on (the process exports spans) or off.
pub(crate) fn set_enabled(on: bool) {
    ENABLED.store(on, Ordering::Relaxed);
}

/// Whether this process exports spans, so contexts are worth propagating.
pub fn enabled() -> bool {
    ENABLED.load(Ordering::Relaxed)
}

struct MetadataInjector<'a>(&'a mut MetadataMap);

impl Injector for MetadataInjector<'_> {
    fn set(&mut self, key: &str, value: String) {
        if let (Ok(k), Ok(v)) = (MetadataKey::<Ascii>::from_bytes(key.as_bytes()), MetadataValue::try_from(value)) {
            self.0.insert(k, v);
        }
    }
}

/// Reads `traceparent` and `tracestate` from headers, each within its bound.
struct BoundedHeaders<'a>(&'a http::HeaderMap);

impl Extractor for BoundedHeaders<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        let max = match key {
            TRACEPARENT => MAX_TRACEPARENT_LEN,
            TRACESTATE => MAX_TRACESTATE_LEN,
            _ => return None,
        };
        self.0.get(key).filter(|v| v.len() <= max).and_then(|v| v.to_str().ok())
    }

    fn keys(&self) -> Vec<&str> {
        vec![TRACEPARENT, TRACESTATE]
    }
}

/// A `traceparent` string alone.
struct One<'a>(&'a str);

impl Extractor for One<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        (key == TRACEPARENT).then_some(self.0)
    }

    fn keys(&self) -> Vec<&str> {
        vec![TRACEPARENT]
    }
}

/// The current `tracing` span's OpenTelemetry span context, when valid.
fn current_span_context() -> Option<Context> {
    if !enabled() {
        return None;
    }
    let cx = tracing::Span::current().context();
    cx.span().span_context().is_valid().then_some(cx)
}

/// Puts the current span's context into `metadata` (`traceparent`,
/// `tracestate`); does nothing without a valid one.
pub fn inject(metadata: &mut MetadataMap) {
    if let Some(cx) = current_span_context() {
        TraceContextPropagator::new().inject_context(&cx, &mut MetadataInjector(metadata));
    }
}

/// A tonic interceptor that [`inject`]s the current span's context into every call.
#[derive(Debug, Clone, Copy, Default)]
pub struct Propagate;

impl tonic::service::Interceptor for Propagate {
    fn call(&mut self, mut req: tonic::Request<()>) -> Result<tonic::Request<()>, tonic::Status> {
        inject(req.metadata_mut());
        Ok(req)
    }
}

/// The remote parent in a request's headers; `None` when absent or malformed.
pub fn extract(headers: &http::HeaderMap) -> Option<Context> {
    if !enabled() || !headers.contains_key(TRACEPARENT) {
        return None;
    }
    let cx = TraceContextPropagator::new().extract(&BoundedHeaders(headers));
    cx.span().span_context().is_valid().then_some(cx)
}

/// The span of one incoming gRPC request (`grpc`, with its path), whose parent
/// is the caller's span when the request carries a valid `traceparent`. The
/// daemons' `Server::trace_fn`.
pub fn server_span<B>(req: &http::Request<B>) -> tracing::Span {
    let span = tracing::info_span!("grpc", path = %req.uri().path());
    if let Some(cx) = extract(req.headers()) {
        let _ = span.set_parent(cx);
    }
    span
}

/// Parses a `traceparent`; `None` when malformed, all-zero or over-long.
pub fn parse_traceparent(s: &str) -> Option<SpanContext> {
    if s.is_empty() || s.len() > MAX_TRACEPARENT_LEN {
        return None;
    }
    let cx = TraceContextPropagator::new().extract(&One(s));
    let sc = cx.span().span_context().clone();
    sc.is_valid().then_some(sc)
}

/// The `traceparent` of a span context (version 00); empty when it is not valid.
pub fn format_traceparent(sc: &SpanContext) -> String {
    if !sc.is_valid() {
        return String::new();
    }
    format!("00-{}-{}-{:02x}", sc.trace_id(), sc.span_id(), sc.trace_flags().to_u8())
}

/// The current span's `traceparent`, to store in a message or a Raft entry;
/// empty when propagation is off or there is no valid span context (so
/// nothing is stored).
pub fn current_traceparent() -> String {
    current_span_context().map(|cx| format_traceparent(cx.span().span_context())).unwrap_or_default()
}

/// Makes the stored `traceparent` the parent of `span` (which must not have
/// been entered yet). A malformed or empty one changes nothing.
pub fn set_parent(span: &tracing::Span, traceparent: &str) {
    if !enabled() {
        return;
    }
    if let Some(sc) = parse_traceparent(traceparent) {
        let _ = span.set_parent(Context::new().with_remote_span_context(sc));
    }
}

/// Links `span` to the stored `traceparent` (for work on behalf of several
/// traces, or done long after the request). A malformed or empty one changes nothing.
pub fn add_link(span: &tracing::Span, traceparent: &str) {
    if !enabled() {
        return;
    }
    if let Some(sc) = parse_traceparent(traceparent) {
        span.add_link(sc);
    }
}

/// The trace id of the current span, as 32 lowercase hex digits; `None`
/// without a valid span context.
pub fn current_trace_id() -> Option<String> {
    current_span_context().map(|cx| cx.span().span_context().trace_id().to_string())
}

/// A span measured by a process that cannot export it, in the trace of the
/// `traceparent` it was given; sent back to the process that exports it
/// ([`crate::telemetry::relay`]). The parent is always the span of that
/// `traceparent`: the relaying process takes the trace id and parent from
/// what it sent, never from here.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MeasuredSpan {
    /// Span name, at most [`MAX_SPAN_NAME_LEN`] bytes.
    pub name: String,
    /// The span's id, 16 hex digits.
    pub span_id: String,
    /// Start, nanoseconds since the Unix epoch.
    pub start_unix_nanos: u64,
    /// End, nanoseconds since the Unix epoch.
    pub end_unix_nanos: u64,
    /// Attributes (a few; names and values are bounded by the relay).
    #[serde(default)]
    pub attributes: Vec<(String, String)>,
}

/// A [`MeasuredSpan`] being timed, from [`MeasuredSpan::start`].
#[derive(Debug)]
pub struct Measuring {
    name: &'static str,
    span_id: SpanId,
    start: SystemTime,
}

fn unix_nanos(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH).map_or(0, |d| u64::try_from(d.as_nanos()).unwrap_or(u64::MAX))
}

impl MeasuredSpan {
    /// Starts timing a span in the trace of `traceparent`; `None` when there is
    /// no valid one (then nothing is measured).
    pub fn start(name: &'static str, traceparent: &str) -> Option<Measuring> {
        parse_traceparent(traceparent)?;
        let span_id = loop {
            let id = SpanId::from_bytes(rand::random::<[u8; 8]>());
            if id != SpanId::INVALID {
                break id;
            }
        };
        Some(Measuring { name, span_id, start: SystemTime::now() })
    }

    /// When it started.
    pub fn start_time(&self) -> SystemTime {
        UNIX_EPOCH + Duration::from_nanos(self.start_unix_nanos)
    }

    /// When it ended.
    pub fn end_time(&self) -> SystemTime {
        UNIX_EPOCH + Duration::from_nanos(self.end_unix_nanos)
    }
}

impl Measuring {
    /// Ends the span now, with `attributes`.
    pub fn finish(self, attributes: Vec<(String, String)>) -> MeasuredSpan {
        MeasuredSpan {
            name: self.name.to_string(),
            span_id: self.span_id.to_string(),
            start_unix_nanos: unix_nanos(self.start),
            end_unix_nanos: unix_nanos(SystemTime::now()),
            attributes,
        }
    }
}

/// The parent of relayed spans: the context a `traceparent` names, with
/// `tracestate` dropped.
pub(crate) fn relay_parent(traceparent: &str) -> Option<(TraceId, SpanId, TraceFlags)> {
    parse_traceparent(traceparent).map(|sc| (sc.trace_id(), sc.span_id(), sc.trace_flags()))
}

/// A span context for a relayed span.
pub(crate) fn relayed_context(trace_id: TraceId, span_id: SpanId, flags: TraceFlags) -> SpanContext {
    SpanContext::new(trace_id, span_id, flags, false, TraceState::default())
}

#[cfg(test)]
mod tests {
    use super::*;
    use opentelemetry::trace::TracerProvider as _;
    use tracing_subscriber::layer::SubscriberExt as _;

    /// A subscriber with the OpenTelemetry layer (no exporter), and propagation on.
    fn otel_subscriber() -> impl tracing::Subscriber + Send + Sync {
        set_enabled(true);
        let provider = opentelemetry_sdk::trace::SdkTracerProvider::builder().build();
        tracing_subscriber::registry().with(tracing_opentelemetry::layer().with_tracer(provider.tracer("test")))
    }

    fn headers_of(metadata: MetadataMap) -> http::HeaderMap {
        metadata.into_headers()
    }

    #[test]
    fn a_context_crosses_a_call_and_a_stored_traceparent() {
        tracing::subscriber::with_default(otel_subscriber(), || {
            let client = tracing::info_span!("client");
            let _e = client.enter();
            let sent = client.context().span().span_context().clone();
            assert!(sent.is_valid());

            let mut md = MetadataMap::new();
            inject(&mut md);
            let tp = md.get(TRACEPARENT).expect("traceparent injected").to_str().unwrap().to_string();
            assert_eq!(tp, format!("00-{}-{}-01", sent.trace_id(), sent.span_id()));
            assert_eq!(current_traceparent(), tp);
            assert_eq!(current_trace_id(), Some(sent.trace_id().to_string()));

            // The server side: its request span is a child of the client's span.
            let req = {
                let mut r = http::Request::new(());
                *r.headers_mut() = headers_of(md);
                r
            };
            let server = server_span(&req);
            let got = server.context().span().span_context().clone();
            assert_eq!(got.trace_id(), sent.trace_id());
            assert_ne!(got.span_id(), sent.span_id());

            // Stored and read back, as the Raft entry and the Assignment carry it.
            let stored = format_traceparent(&got);
            let later = tracing::info_span!("later");
            set_parent(&later, &stored);
            assert_eq!(later.context().span().span_context().trace_id(), sent.trace_id());
            let parsed = parse_traceparent(&stored).unwrap();
            assert_eq!((parsed.trace_id(), parsed.span_id()), (got.trace_id(), got.span_id()));
        });
    }

    #[test]
    fn malformed_or_oversized_input_is_absent() {
        tracing::subscriber::with_default(otel_subscriber(), || {
            let long = format!("00-{}-{}-01{}", "a".repeat(32), "b".repeat(16), "-x".repeat(100));
            for bad in [
                "",
                "garbage",
                "00-00000000000000000000000000000000-0000000000000000-01",
                "00-0af7651916cd43dd8448eb211c80319c-0000000000000000-01",
                "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331",
                "ff-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
                "00-0AF7651916CD43DD8448EB211C80319C-B7AD6B7169203331-01",
                long.as_str(),
            ] {
                assert!(parse_traceparent(bad).is_none(), "{bad:?} parsed");
                let mut h = http::HeaderMap::new();
                if let Ok(v) = http::HeaderValue::from_str(bad) {
                    h.insert(TRACEPARENT, v);
                }
                assert!(extract(&h).is_none(), "{bad:?} extracted");
                // The request still gets its span, as a root.
                let mut r = http::Request::new(());
                *r.headers_mut() = h;
                let s = server_span(&r);
                assert!(s.context().span().span_context().is_valid());
                let orphan = tracing::info_span!("orphan");
                set_parent(&orphan, bad);
                assert!(orphan.context().span().span_context().is_valid());
            }
            let good = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01";
            assert!(parse_traceparent(good).is_some());
            // An over-long tracestate is dropped, the parent kept.
            let mut h = http::HeaderMap::new();
            h.insert(TRACEPARENT, http::HeaderValue::from_static(good));
            h.insert(TRACESTATE, http::HeaderValue::from_str(&format!("k={}", "v".repeat(600))).unwrap());
            let cx = extract(&h).expect("the parent stays");
            assert!(cx.span().span_context().trace_state().header().is_empty());
        });
    }

    #[test]
    fn nothing_is_propagated_without_a_span_context() {
        tracing::subscriber::with_default(otel_subscriber(), || {
            // No current span: nothing injected, nothing to store.
            let mut md = MetadataMap::new();
            inject(&mut md);
            assert!(md.get(TRACEPARENT).is_none());
            assert_eq!(current_traceparent(), "");
            assert!(MeasuredSpan::start("x", "").is_none());
        });
    }

    #[test]
    fn measured_spans_keep_their_times() {
        let m = MeasuredSpan::start("executor.exec", "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01")
            .expect("a valid parent");
        let s = m.finish(vec![("exit_code".into(), "0".into())]);
        assert_eq!(s.name, "executor.exec");
        assert_eq!(s.span_id.len(), 16);
        assert!(s.start_unix_nanos > 0 && s.start_unix_nanos <= s.end_unix_nanos);
        assert!(s.start_time() <= s.end_time());
        let json = serde_json::to_string(&s).unwrap();
        assert_eq!(serde_json::from_str::<MeasuredSpan>(&json).unwrap(), s);
    }
}
