package main

// Microbenchmarks of the hot paths. Run with
//
//	go test -run '^$' -bench . -benchmem
//
// They report figures; no test asserts a timing.

import (
	"context"
	"fmt"
	"io"
	"log/slog"
	"net/http"
	"net/http/httptest"
	"path/filepath"
	"strconv"
	"sync/atomic"
	"testing"
	"time"

	sdktrace "go.opentelemetry.io/otel/sdk/trace"
	"go.opentelemetry.io/otel/sdk/trace/tracetest"
)

var benchBody = []byte(`{"sku":"BENCH-1","name":"Fountain pen","description":"Steel nib, blue ink, a product description of ordinary length.","category":"pens","price_cents":2450,"currency":"USD","stock":10}`)

func BenchmarkDecodeValidate(b *testing.B) {
	b.ReportAllocs()
	for b.Loop() {
		var in ProductInput
		if err := decodeStrict(benchBody, &in); err != nil {
			b.Fatal(err)
		}
		if len(in.Valid()) != 0 {
			b.Fatal("invalid")
		}
	}
}

func BenchmarkEncodeProduct(b *testing.B) {
	p := Product{ID: 42, SKU: "BENCH-1", Name: "Fountain pen", Description: "Steel nib, blue ink", Category: "pens",
		PriceCents: 2450, Currency: "USD", Stock: 10, Version: 3, CreatedAt: time.Now(), UpdatedAt: time.Now()}
	buf := make([]byte, 0, 512)
	b.ReportAllocs()
	for b.Loop() {
		buf = appendProduct(buf[:0], &p)
	}
}

// benchStore is a store in a temp dir with n products.
func benchStore(b *testing.B, n int, sync string) *sqliteStore {
	b.Helper()
	s, err := openSQLite(context.Background(), StoreConfig{Path: filepath.Join(b.TempDir(), "b.db"), Sync: sync})
	if err != nil {
		b.Fatal(err)
	}
	b.Cleanup(func() { s.Close() })
	for i := range n {
		_, err := s.Create(context.Background(), Product{SKU: "S-" + strconv.Itoa(i), Name: "product " + strconv.Itoa(i),
			Category: "cat-" + strconv.Itoa(i%20), PriceCents: int64(i * 7 % 10000), Currency: "USD"}, nil)
		if err != nil {
			b.Fatal(err)
		}
	}
	return s
}

func BenchmarkStore_Get(b *testing.B) {
	s := benchStore(b, 1000, "normal")
	b.ReportAllocs()
	b.ResetTimer()
	b.RunParallel(func(pb *testing.PB) {
		i := int64(0)
		for pb.Next() {
			i++
			if _, err := s.Get(context.Background(), i%1000+1); err != nil {
				b.Fatal(err)
			}
		}
	})
}

func BenchmarkStore_List(b *testing.B) {
	s := benchStore(b, 1000, "normal")
	cat := "cat-3"
	f := ListFilter{Limit: 20, Category: &cat, Sort: "price_cents", Desc: true}
	b.ReportAllocs()
	for b.Loop() {
		if _, err := s.List(context.Background(), f); err != nil {
			b.Fatal(err)
		}
	}
}

// BenchmarkStore_Create measures durable creates from 32 concurrent
// writers: group commit shares one fsync between the writes of a group.
func BenchmarkStore_Create(b *testing.B) {
	for _, sync := range []string{"full", "normal"} {
		b.Run("sync="+sync, func(b *testing.B) {
			s := benchStore(b, 0, sync)
			var n atomic.Int64
			b.ReportAllocs()
			b.SetParallelism(16) // 32 writers on 2 cores
			b.ResetTimer()
			b.RunParallel(func(pb *testing.PB) {
				for pb.Next() {
					i := n.Add(1)
					_, err := s.Create(context.Background(), Product{SKU: "C-" + strconv.FormatInt(i, 10), Name: "bench",
						PriceCents: 1, Currency: "USD"}, nil)
					if err != nil {
						b.Fatal(err)
					}
				}
			})
		})
	}
}

func BenchmarkService_GetCached(b *testing.B) {
	s := benchStore(b, 1000, "normal")
	svc := NewProductService(s, ServiceConfig{LocalCacheSize: 10000})
	for id := int64(1); id <= 1000; id++ {
		svc.Get(context.Background(), id)
	}
	b.ReportAllocs()
	b.ResetTimer()
	b.RunParallel(func(pb *testing.PB) {
		i := int64(0)
		for pb.Next() {
			i++
			if _, src, err := svc.Get(context.Background(), i%1000+1); err != nil || src != cacheLocal {
				b.Fatalf("Get = %s, %v; want a local hit", src, err)
			}
		}
	})
}

// BenchmarkServer_GetProduct is a whole GET /products/{id} through the
// handler and its middleware, with tracing absent, configured off (the
// default: no OTEL_* variables) and on (in-memory exporter).
func BenchmarkServer_GetProduct(b *testing.B) {
	s := benchStore(b, 100, "normal")
	for _, mode := range []string{"none", "off", "on"} {
		b.Run("tracing="+mode, func(b *testing.B) {
			var tr *tracing
			switch mode {
			case "off":
				tr = noTracing()
			case "on":
				tr = newTracingWith(sdktrace.WithSyncer(tracetest.NewInMemoryExporter()), func(string) string { return "" }, "bench")
			}
			m := newMetrics(nil)
			log := slog.New(slog.NewJSONHandler(io.Discard, nil))
			svc := NewProductService(s, ServiceConfig{LocalCacheSize: 1000, Metrics: m, Tracing: tr, Logger: log})
			life := &lifecycle{}
			life.started.Store(true)
			h := newServer(serverDeps{svc: svc, log: log, metrics: m, tokens: newTokenSet([]string{"t"}), life: life, tracing: tr})
			reqs := make([]*http.Request, 100)
			for i := range reqs {
				reqs[i] = httptest.NewRequest("GET", fmt.Sprintf("/products/%d", i+1), nil)
			}
			b.ReportAllocs()
			i := 0
			for b.Loop() {
				rec := httptest.NewRecorder()
				h.ServeHTTP(rec, reqs[i%len(reqs)])
				if rec.Code != http.StatusOK {
					b.Fatalf("status %d", rec.Code)
				}
				i++
			}
		})
	}
}
