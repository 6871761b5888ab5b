//! Process-wide tracing and metrics setup.
//!
//! Log level comes from `RUST_LOG` (default `info`). When
//! `OTEL_EXPORTER_OTLP_ENDPOINT` is set, spans (and, with feature `metrics`,
//! metrics) are also exported over OTLP/gRPC with the given service name; the
//! returned guard flushes them on drop, so binaries keep it alive until the
//! very end of `main`. With feature `metrics` the process also gets the meter
//! provider whose Prometheus reader `--metrics-listen` serves
//! ([`crate::metrics`]).
//!
//! `SANDFLEET_TELEMETRY=off` ([`TELEMETRY_ENV`]) leaves out everything but
//! the logs: no OTLP export, no meter provider, no propagator.
//!
//! The W3C trace-context propagator (`traceparent`, `tracestate`) is installed
//! as the global one, and [`crate::trace_context`] carries a span's context
//! across gRPC calls, Raft entries and the executor's socket; it does nothing
//! while no spans are exported.
//!
//! [`relay`] exports spans that another process measured and cannot export
//! itself: the executor runs inside a container without network, so the
//! agent re-emits the executor's spans, under a resource whose `service.name`
//! is the executor's. That needs a second span pipeline (the SDK's
//! `SdkTracerProvider` has one resource, and its tracer picks its own span
//! ids and times), so it lives here, next to the first, with the same OTLP
//! exporter settings, made on first use and flushed with the guard.

use std::borrow::Cow;

use opentelemetry::trace::{SpanId, SpanKind, Status, TracerProvider as _};
use opentelemetry::{InstrumentationScope, KeyValue};
use opentelemetry_sdk::trace::{BatchSpanProcessor, SdkTracerProvider, SpanData, SpanProcessor as _};
use parking_lot::Mutex;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::EnvFilter;
use tracing_subscriber::Layer as _;

/// Flushes and shuts down span and metric export when dropped.
#[must_use = "dropping the guard stops span export"]
pub struct TelemetryGuard {
    provider: Option<SdkTracerProvider>,
    #[cfg(feature = "metrics")]
    meters: Option<opentelemetry_sdk::metrics::SdkMeterProvider>,
}

impl TelemetryGuard {
    /// Whether spans are exported over OTLP.
    pub fn exports_spans(&self) -> bool {
        self.provider.is_some()
    }
}

impl Drop for TelemetryGuard {
    fn drop(&mut self) {
        if let Some(p) = self.provider.take() {
            let _ = p.shutdown();
        }
        for (_, relay) in RELAYS.lock().drain(..) {
            let _ = relay.shutdown();
        }
        #[cfg(feature = "metrics")]
        if let Some(m) = self.meters.take() {
            let _ = m.shutdown();
        }
    }
}

/// Installs the global subscriber (and, with feature `metrics`, the global
/// meter provider). Safe to call more than once (later calls only return a
/// guard); logs go to stderr.
pub fn init(service_name: &'static str) -> TelemetryGuard {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    init_with(service_name, filter)
}

/// The environment variable that turns metrics and trace propagation off
/// (`off`): logs only. For measuring what they cost (`sandfleet-bench
/// telemetry`), and as an escape hatch; `/metrics` then serves nothing.
pub const TELEMETRY_ENV: &str = "SANDFLEET_TELEMETRY";

/// Whether [`TELEMETRY_ENV`] is `off`.
pub fn disabled() -> bool {
    std::env::var(TELEMETRY_ENV).is_ok_and(|v| v.eq_ignore_ascii_case("off"))
}

/// [`init`] with an explicit log filter; spans are exported (when
/// `OTEL_EXPORTER_OTLP_ENDPOINT` is set) as far as that filter enables them.
pub fn init_with(service_name: &'static str, filter: EnvFilter) -> TelemetryGuard {
    install(service_name, filter, None)
}

/// [`init_with`], with the spans exported chosen by `traces` instead of the
/// log filter: the CLI logs warnings only, yet exports its info spans.
pub fn init_with_traces(service_name: &'static str, filter: EnvFilter, traces: EnvFilter) -> TelemetryGuard {
    install(service_name, filter, Some(traces))
}

fn install(service_name: &'static str, filter: EnvFilter, traces: Option<EnvFilter>) -> TelemetryGuard {
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    if disabled() {
        let _ = tracing_subscriber::registry().with(fmt_layer(ansi).with_filter(filter)).try_init();
        return TelemetryGuard {
            provider: None,
            #[cfg(feature = "metrics")]
            meters: None,
        };
    }
    opentelemetry::global::set_text_map_propagator(opentelemetry_sdk::propagation::TraceContextPropagator::new());

    let otlp = otlp_configured();
    let resource = opentelemetry_sdk::Resource::builder().with_service_name(service_name).build();
    let provider = otlp
        .then(|| {
            let exporter = opentelemetry_otlp::SpanExporter::builder().with_tonic().build().ok()?;
            Some(SdkTracerProvider::builder().with_batch_exporter(exporter).with_resource(resource.clone()).build())
        })
        .flatten();
    let tracer = provider.as_ref().map(|p| p.tracer(service_name));
    if let Some(p) = &provider {
        opentelemetry::global::set_tracer_provider(p.clone());
    }
    crate::trace_context::set_enabled(provider.is_some());

    match (traces, tracer) {
        // The log filter decides for both layers.
        (None, tracer) => {
            let otel = tracer.map(|t| tracing_opentelemetry::layer().with_tracer(t));
            let _ = tracing_subscriber::registry().with(filter).with(fmt_layer(ansi)).with(otel).try_init();
        }
        (Some(traces), Some(tracer)) => {
            let _ = tracing_subscriber::registry()
                .with(fmt_layer(ansi).with_filter(filter))
                .with(tracing_opentelemetry::layer().with_tracer(tracer).with_filter(traces))
                .try_init();
        }
        (Some(_), None) => {
            let _ = tracing_subscriber::registry().with(fmt_layer(ansi).with_filter(filter)).try_init();
        }
    }
    #[cfg(feature = "metrics")]
    let meters = crate::metrics::install(resource, otlp);
    #[cfg(not(feature = "metrics"))]
    let _ = resource;
    TelemetryGuard {
        provider,
        #[cfg(feature = "metrics")]
        meters,
    }
}

/// The log lines on stderr.
fn fmt_layer<S>(ansi: bool) -> impl tracing_subscriber::Layer<S> + Send + Sync
where
    S: tracing::Subscriber + for<'a> tracing_subscriber::registry::LookupSpan<'a>,
{
    tracing_subscriber::fmt::layer().with_writer(std::io::stderr).with_ansi(ansi).with_target(true)
}

fn otlp_configured() -> bool {
    std::env::var_os("OTEL_EXPORTER_OTLP_ENDPOINT").is_some_and(|v| !v.is_empty())
}

/// The span pipelines of [`relay`], one per service name.
static RELAYS: Mutex<Vec<(&'static str, BatchSpanProcessor)>> = Mutex::new(Vec::new());

/// Exports `spans`, measured by the process `service_name` (e.g.
/// `sandfleet-executor`) in the trace of `traceparent` (what this process sent
/// it): each becomes a child of that span, with its own span id, start and end.
/// Only while this process exports spans; at most
/// [`MAX_MEASURED_SPANS`](crate::trace_context::MAX_MEASURED_SPANS), names and
/// attributes bounded; a span with a malformed id or times is skipped (they come
/// from a process that untrusted code shares).
pub fn relay(service_name: &'static str, traceparent: &str, spans: &[crate::trace_context::MeasuredSpan]) {
    use crate::trace_context::{relay_parent, relayed_context, MAX_MEASURED_SPANS, MAX_SPAN_NAME_LEN};
    const MAX_ATTRIBUTES: usize = 8;
    const MAX_ATTRIBUTE_LEN: usize = 256;
    if spans.is_empty() || !crate::trace_context::enabled() {
        return;
    }
    let Some((trace_id, parent, flags)) = relay_parent(traceparent) else { return };
    let bounded = |s: &str, max: usize| s.chars().take(max).collect::<String>();
    let data: Vec<SpanData> = spans
        .iter()
        .take(MAX_MEASURED_SPANS)
        .filter_map(|m| {
            let span_id = SpanId::from_hex(&m.span_id).ok().filter(|id| *id != SpanId::INVALID && *id != parent)?;
            if m.end_unix_nanos < m.start_unix_nanos || m.start_unix_nanos == 0 {
                return None;
            }
            Some(SpanData {
                span_context: relayed_context(trace_id, span_id, flags),
                parent_span_id: parent,
                parent_span_is_remote: true,
                span_kind: SpanKind::Internal,
                name: Cow::Owned(bounded(&m.name, MAX_SPAN_NAME_LEN)),
                start_time: m.start_time(),
                end_time: m.end_time(),
                attributes: m
                    .attributes
                    .iter()
                    .take(MAX_ATTRIBUTES)
                    .map(|(k, v)| KeyValue::new(bounded(k, MAX_SPAN_NAME_LEN), bounded(v, MAX_ATTRIBUTE_LEN)))
                    .collect(),
                dropped_attributes_count: 0,
                events: Default::default(),
                links: Default::default(),
                status: Status::Unset,
                instrumentation_scope: InstrumentationScope::builder(service_name).build(),
            })
        })
        .collect();
    if data.is_empty() {
        return;
    }
    let mut relays = RELAYS.lock();
    if !relays.iter().any(|(name, _)| *name == service_name) {
        let Ok(exporter) = opentelemetry_otlp::SpanExporter::builder().with_tonic().build() else { return };
        let mut processor = BatchSpanProcessor::builder(exporter).build();
        processor.set_resource(&opentelemetry_sdk::Resource::builder().with_service_name(service_name).build());
        relays.push((service_name, processor));
    }
    if let Some((_, processor)) = relays.iter().find(|(name, _)| *name == service_name) {
        for span in data {
            processor.on_end(span);
        }
    }
}
