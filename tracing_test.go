package main

import (
	"context"
	"encoding/json"
	"errors"
	"log/slog"
	"net/http"
	"net/http/httptest"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"go.opentelemetry.io/otel"
	sdktrace "go.opentelemetry.io/otel/sdk/trace"
	"go.opentelemetry.io/otel/sdk/trace/tracetest"
)

// tracedServer is a server over real SQLite whose spans go to an in-memory
// exporter and whose logs go to a buffer.
func tracedServer(tb testing.TB) (http.Handler, *ProductService, *tracetest.InMemoryExporter, *syncBuffer) {
	tb.Helper()
	exp := tracetest.NewInMemoryExporter()
	tr := newTracingWith(sdktrace.WithSyncer(exp), func(string) string { return "" }, "test")
	tb.Cleanup(func() { tr.shutdown(context.Background()) })
	store, err := openSQLite(context.Background(), StoreConfig{Path: filepath.Join(tb.TempDir(), "t.db"), Sync: "normal"})
	if err != nil {
		tb.Fatal(err)
	}
	tb.Cleanup(func() { store.Close() })
	logs := &syncBuffer{}
	log := slog.New(traceLogHandler{slog.NewJSONHandler(logs, nil)})
	m := newMetrics(nil)
	svc := NewProductService(store, ServiceConfig{Logger: log, Metrics: m, Tracing: tr, LocalCacheSize: 0}) // every read reaches SQLite
	life := &lifecycle{}
	life.started.Store(true)
	h := newServer(serverDeps{svc: svc, log: log, metrics: m, tokens: newTokenSet([]string{"t"}), life: life, tracing: tr})
	return h, svc, exp, logs
}

func TestTracing_RequestSpanTree(t *testing.T) {
	h, svc, exp, logs := tracedServer(t)
	p, _, err := svc.Create(t.Context(), ProductInput{SKU: new("T-1"), Name: new("traced"), PriceCents: new(int64(5))}, nil)
	if err != nil {
		t.Fatal(err)
	}
	exp.Reset()

	const traceID = "4bf92f3577b34da6a3ce929d0e0e4736"
	req := httptest.NewRequest("GET", "/products/1", nil)
	req.Header.Set("traceparent", "00-"+traceID+"-00f067aa0ba902b7-01")
	rec := httptest.NewRecorder()
	h.ServeHTTP(rec, req)
	if rec.Code != http.StatusOK {
		t.Fatalf("GET /products/%d status = %d, want 200", p.ID, rec.Code)
	}

	spans := exp.GetSpans()
	var server, dbRead *tracetest.SpanStub
	for i := range spans {
		switch spans[i].Name {
		case "GET /products/{id}":
			server = &spans[i]
		case "sqlite get product":
			dbRead = &spans[i]
		}
	}
	if server == nil || dbRead == nil {
		var names []string
		for _, s := range spans {
			names = append(names, s.Name)
		}
		t.Fatalf("spans = %q, want a server span %q and a child %q", names, "GET /products/{id}", "sqlite get product")
	}
	if got := server.SpanContext.TraceID().String(); got != traceID {
		t.Errorf("server span trace id = %s, want %s from traceparent", got, traceID)
	}
	if got := server.Parent.SpanID().String(); got != "00f067aa0ba902b7" {
		t.Errorf("server span parent = %s, want the traceparent's span 00f067aa0ba902b7", got)
	}
	if dbRead.Parent.SpanID() != server.SpanContext.SpanID() {
		t.Errorf("sqlite span parent = %s, want the server span %s", dbRead.Parent.SpanID(), server.SpanContext.SpanID())
	}
	var system string
	for _, a := range dbRead.Attributes {
		if a.Key == "db.system" {
			system = a.Value.AsString()
		}
	}
	if system != "sqlite" {
		t.Errorf("sqlite span db.system = %q, want sqlite", system)
	}

	// The access log line of the traced request carries its ids.
	var line map[string]any
	for l := range strings.Lines(logs.String()) {
		var m map[string]any
		if json.Unmarshal([]byte(l), &m) == nil && m["msg"] == "request" && m["path"] == "/products/1" {
			line = m
		}
	}
	if line == nil {
		t.Fatalf("no access log line for /products/1 in:\n%s", logs.String())
	}
	if line["trace_id"] != traceID || line["span_id"] != server.SpanContext.SpanID().String() {
		t.Errorf("access log trace_id, span_id = %v, %v; want %s, %s", line["trace_id"], line["span_id"], traceID, server.SpanContext.SpanID())
	}
}

func TestTracing_RedisSpanHasCacheHit(t *testing.T) {
	_, svc, exp, _ := tracedServer(t)
	svc.caches.redisEnabled = true
	svc.caches.redis = &mapCache{m: map[int64][]byte{}}
	p, _, err := svc.Create(t.Context(), ProductInput{SKU: new("T-2"), Name: new("traced"), PriceCents: new(int64(5))}, nil)
	if err != nil {
		t.Fatal(err)
	}
	svc.caches.local = newLocalCache(0, 0, time.Minute) // go to Redis every time
	exp.Reset()
	if _, _, err := svc.Get(t.Context(), p.ID); err != nil {
		t.Fatal(err)
	}
	var hit *bool
	for _, s := range exp.GetSpans() {
		if s.Name == "redis get product" {
			for _, a := range s.Attributes {
				if a.Key == "cache.hit" {
					v := a.Value.AsBool()
					hit = &v
				}
			}
		}
	}
	if hit == nil || !*hit {
		t.Errorf("redis get span cache.hit = %v, want true (the create published the product)", hit)
	}
}

// mapCache is an in-memory cache with the Redis cache's version rule. Tests
// that are about Redis itself use a real redis-server.
type mapCache struct {
	mu sync.Mutex
	m  map[int64][]byte
	v  map[int64]int64
}

func (c *mapCache) Get(_ context.Context, _ cacheGen, id int64) ([]byte, error) {
	c.mu.Lock()
	defer c.mu.Unlock()
	if b := c.m[id]; len(b) > 0 {
		return b, nil
	}
	return nil, errCacheMiss
}

func (c *mapCache) Generation() cacheGen { return 0 }

func (c *mapCache) Put(_ context.Context, _ cacheGen, id, version int64, json []byte) error {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.v == nil {
		c.v = map[int64]int64{}
	}
	if c.v[id] >= version {
		return nil
	}
	c.v[id], c.m[id] = version, json
	return nil
}

func (c *mapCache) SettleGeneration(context.Context) (cacheGen, int64, error) { return 0, 0, nil }

func (c *mapCache) Push(context.Context, cacheGen, []cacheItem, int64) error { return nil }

func (c *mapCache) Forget(int64) {
	c.mu.Lock()
	defer c.mu.Unlock()
	clear(c.m)
	clear(c.v)
}

func (c *mapCache) Ping(context.Context) error { return nil }
func (c *mapCache) Close() error               { return nil }

func TestRouteOTelErrors(t *testing.T) {
	var out syncBuffer
	routeOTelErrors(slog.New(slog.NewJSONHandler(&out, nil)))
	otel.Handle(errors.New("traces export: connection refused"))
	otel.Handle(errors.New("traces export: connection refused")) // within the minute: suppressed
	lines := out.logLines()
	if len(lines) != 1 || lines[0]["msg"] != "opentelemetry" || lines[0]["level"] != "WARN" {
		t.Errorf("log after two OpenTelemetry errors:\n%s\nwant one WARN line with msg opentelemetry", &out)
	}
}
