package main

import (
	"context"
	"fmt"
	"log/slog"
	"net/http"
	"time"

	"go.opentelemetry.io/contrib/instrumentation/net/http/otelhttp"
	"go.opentelemetry.io/otel"
	"go.opentelemetry.io/otel/attribute"
	"go.opentelemetry.io/otel/propagation"
	"go.opentelemetry.io/otel/sdk/resource"
	sdktrace "go.opentelemetry.io/otel/sdk/trace"
	"go.opentelemetry.io/otel/trace"
	"go.opentelemetry.io/otel/trace/noop"
)

// tracing is the service's OpenTelemetry set-up. When OTLP export is not
// configured it is a no-op tracer and adds nothing to a request but a few
// nil checks.
type tracing struct {
	provider trace.TracerProvider
	tracer   trace.Tracer
	prop     propagation.TextMapPropagator
	shutdown func(context.Context) error
	enabled  bool
}

const tracerName = "productsvc"

// newTracing exports spans over OTLP/HTTP when OTEL_EXPORTER_OTLP_ENDPOINT
// (or OTEL_EXPORTER_OTLP_TRACES_ENDPOINT) is set. The exporter reads the
// standard OTEL_* variables itself; OTEL_SERVICE_NAME defaults to productsvc.
func newTracing(ctx context.Context, getenv func(string) string, version string) (*tracing, error) {
	if getenv("OTEL_EXPORTER_OTLP_ENDPOINT") == "" && getenv("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT") == "" {
		return noTracing(), nil
	}
	exp, err := newExporter(ctx)
	if err != nil {
		return nil, fmt.Errorf("otlp exporter: %w", err)
	}
	return newTracingWith(sdktrace.WithBatcher(exp), getenv, version), nil
}

func noTracing() *tracing {
	p := noop.NewTracerProvider()
	return &tracing{
		provider: p, tracer: p.Tracer(tracerName),
		prop:     propagation.TraceContext{},
		shutdown: func(context.Context) error { return nil },
	}
}

// newTracingWith builds an SDK tracer provider around a span processor
// (the OTLP batcher, or an in-memory exporter in tests).
func newTracingWith(sp sdktrace.TracerProviderOption, getenv func(string) string, version string) *tracing {
	name := getenv("OTEL_SERVICE_NAME")
	if name == "" {
		name = "productsvc"
	}
	res := resource.NewSchemaless(
		attribute.String("service.name", name),
		attribute.String("service.version", version),
	)
	tp := sdktrace.NewTracerProvider(sp, sdktrace.WithResource(res))
	return &tracing{
		provider: tp, tracer: tp.Tracer(tracerName),
		prop:     propagation.NewCompositeTextMapPropagator(propagation.TraceContext{}, propagation.Baggage{}),
		shutdown: tp.Shutdown,
		enabled:  true,
	}
}

// tracingShutdownTimeout bounds the flush of spans at exit: an unreachable
// collector must not hold the process.
const tracingShutdownTimeout = 5 * time.Second

// close flushes and stops the exporter, giving up after timeout.
func (t *tracing) close(timeout time.Duration) error {
	ctx, cancel := context.WithTimeout(context.Background(), timeout)
	defer cancel()
	return t.shutdown(ctx)
}

// wrap puts the otelhttp server span around h: one span per request, with
// W3C traceparent taken from the request.
func (t *tracing) wrap(h http.Handler) http.Handler {
	if !t.enabled {
		return h
	}
	return otelhttp.NewHandler(h, "http.server",
		otelhttp.WithTracerProvider(t.provider),
		otelhttp.WithPropagators(t.prop),
	)
}

// start begins a child span; with tracing off it returns ctx and a no-op span.
func (t *tracing) start(ctx context.Context, name string, attrs ...attribute.KeyValue) (context.Context, trace.Span) {
	if !t.enabled {
		return ctx, trace.SpanFromContext(ctx)
	}
	return t.tracer.Start(ctx, name, trace.WithAttributes(attrs...))
}

// traceLogHandler adds trace_id and span_id to every log line written in
// the context of a sampled span.
type traceLogHandler struct{ slog.Handler }

func (h traceLogHandler) Handle(ctx context.Context, r slog.Record) error {
	if sc := trace.SpanContextFromContext(ctx); sc.IsValid() {
		r.AddAttrs(slog.String("trace_id", sc.TraceID().String()), slog.String("span_id", sc.SpanID().String()))
	}
	return h.Handler.Handle(ctx, r)
}

func (h traceLogHandler) WithAttrs(as []slog.Attr) slog.Handler {
	return traceLogHandler{h.Handler.WithAttrs(as)}
}

func (h traceLogHandler) WithGroup(name string) slog.Handler {
	return traceLogHandler{h.Handler.WithGroup(name)}
}

// routeOTelErrors sends OpenTelemetry's own errors (a failed export, say) to
// log, rate-limited, instead of its default plain-text logger on stderr.
// Like go-redis's logger, OpenTelemetry's error handler is process-wide
// (otel.SetErrorHandler): there is no per-provider one to set instead.
func routeOTelErrors(log *slog.Logger) {
	l := newLimitedLog(log, "opentelemetry")
	otel.SetErrorHandler(otel.ErrorHandlerFunc(func(err error) { l.Printf(context.Background(), "%v", err) }))
}
