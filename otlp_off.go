//go:build nootlp

package main

import (
	"context"
	"errors"

	sdktrace "go.opentelemetry.io/otel/sdk/trace"
)

// newExporter fails: this binary was built with -tags nootlp.
func newExporter(ctx context.Context) (sdktrace.SpanExporter, error) {
	return nil, errors.New("this binary was built without the OTLP exporter (-tags nootlp)")
}
