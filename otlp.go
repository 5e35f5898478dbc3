//go:build !nootlp

package main

import (
	"context"

	"go.opentelemetry.io/otel/exporters/otlp/otlptrace/otlptracehttp"
	sdktrace "go.opentelemetry.io/otel/sdk/trace"
)

// newExporter returns the OTLP/HTTP span exporter, configured by the
// standard OTEL_EXPORTER_OTLP_* variables. It brings in most of the
// binary's size (its protobuf and gRPC-gateway types, about 11 MB); build
// with -tags nootlp for a binary without it.
func newExporter(ctx context.Context) (sdktrace.SpanExporter, error) {
	return otlptracehttp.New(ctx)
}
