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
//! as the global one, so a span's context can cross gRPC calls.

use opentelemetry::trace::TracerProvider as _;
use opentelemetry_sdk::trace::SdkTracerProvider;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::EnvFilter;

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

/// [`init`] with an explicit log filter (the CLI logs warnings only).
pub fn init_with(service_name: &'static str, filter: EnvFilter) -> TelemetryGuard {
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let fmt = tracing_subscriber::fmt::layer().with_writer(std::io::stderr).with_ansi(ansi).with_target(true);
    if disabled() {
        let _ = tracing_subscriber::registry().with(filter).with(fmt).try_init();
        return TelemetryGuard {
            provider: None,
            #[cfg(feature = "metrics")]
            meters: None,
        };
    }
    opentelemetry::global::set_text_map_propagator(opentelemetry_sdk::propagation::TraceContextPropagator::new());

    let otlp = std::env::var_os("OTEL_EXPORTER_OTLP_ENDPOINT").is_some_and(|v| !v.is_empty());
    let resource = opentelemetry_sdk::Resource::builder().with_service_name(service_name).build();
    let provider = otlp
        .then(|| {
            let exporter = opentelemetry_otlp::SpanExporter::builder().with_tonic().build().ok()?;
            Some(SdkTracerProvider::builder().with_batch_exporter(exporter).with_resource(resource.clone()).build())
        })
        .flatten();
    let otel = provider.as_ref().map(|p| tracing_opentelemetry::layer().with_tracer(p.tracer(service_name)));
    if let Some(p) = &provider {
        opentelemetry::global::set_tracer_provider(p.clone());
    }

    let _ = tracing_subscriber::registry().with(filter).with(fmt).with(otel).try_init();
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
