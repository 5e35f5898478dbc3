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
	"os"
	"path/filepath"
	"strconv"
	"sync/atomic"
	"syscall"
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
		_, _, err := s.Create(context.Background(), "", Product{SKU: "S-" + strconv.Itoa(i), Name: "product " + strconv.Itoa(i),
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
					_, _, err := s.Create(context.Background(), "", Product{SKU: "C-" + strconv.FormatInt(i, 10), Name: "bench",
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

// cpuTime returns the CPU time the process has used, user and system.
func cpuTime(tb testing.TB) time.Duration {
	var ru syscall.Rusage
	if err := syscall.Getrusage(syscall.RUSAGE_SELF, &ru); err != nil {
		tb.Fatal(err)
	}
	return time.Duration(ru.Utime.Nano() + ru.Stime.Nano())
}

// BenchmarkServer_Rejected compares the CPU a served request costs with the
// CPU of requests refused by a rate limit (429), load shedding (503) and the
// failed-authentication limit (429), through the whole handler with the
// production log setup (JSON into the buffered writer, over a real file).
// Refusing must cost less than serving: that is what keeps overload from
// getting dearer. cpu-µs/op counts every goroutine of the process.
func BenchmarkServer_Rejected(b *testing.B) {
	s := benchStore(b, 10, "normal")
	logFile, err := os.Create(filepath.Join(b.TempDir(), "log.json"))
	if err != nil {
		b.Fatal(err)
	}
	defer logFile.Close()
	lw := newLogWriter(logFile, 100*time.Millisecond)
	defer lw.Close()
	log := slog.New(flushHandler{slog.NewJSONHandler(lw, nil), lw})
	bs := &blockingStore{productStore: s, entered: make(chan struct{}, 1), release: make(chan struct{})}
	m := newMetrics(nil)
	svc := NewProductService(bs, ServiceConfig{LocalCacheSize: 1000, Metrics: m, Logger: log})
	svc.Get(context.Background(), 1) // cached: the served request is the cheapest kind
	life := &lifecycle{}
	life.started.Store(true)
	tokens := newTokenSet([]string{"t"})
	limiter := newRateLimiter(1e-9, 1, tokens)
	served := newServer(serverDeps{svc: svc, log: log, metrics: m, tokens: tokens, life: life,
		limiter: newRateLimiter(1e9, 1e9, tokens), maxFlight: 1})
	limited := newServer(serverDeps{svc: svc, log: log, metrics: m, tokens: tokens, life: life, limiter: limiter})
	shed := newServer(serverDeps{svc: svc, log: log, metrics: m, tokens: tokens, life: life, maxFlight: 1})
	authOnly := newServer(serverDeps{svc: svc, log: log, metrics: m, tokens: tokens, life: life, limiter: newRateLimiter(0, 0, tokens)})

	// Take shed's one slot with a listing held in the store.
	held := make(chan struct{})
	go func() {
		defer close(held)
		shed.ServeHTTP(httptest.NewRecorder(), httptest.NewRequest("GET", "/products", nil))
	}()
	<-bs.entered
	defer func() { close(bs.release); <-held }()
	limited.ServeHTTP(httptest.NewRecorder(), httptest.NewRequest("GET", "/products/1", nil)) // the burst of 1
	for range authFailureBurst {
		r := httptest.NewRequest("POST", "/products", nil)
		r.Header.Set("Authorization", "Bearer wrong")
		authOnly.ServeHTTP(httptest.NewRecorder(), r)
	}

	cases := []struct {
		name   string
		h      http.Handler
		method string
		path   string
		token  string
		want   int
	}{
		{"served", served, "GET", "/products/1", "", http.StatusOK},
		{"rate_limited", limited, "GET", "/products/1", "", http.StatusTooManyRequests},
		{"shed", shed, "GET", "/products/1", "", http.StatusServiceUnavailable},
		{"auth_limited", authOnly, "POST", "/products", "t-wrong", http.StatusTooManyRequests},
	}
	for _, c := range cases {
		b.Run(c.name, func(b *testing.B) {
			req := httptest.NewRequest(c.method, c.path, nil)
			req.RemoteAddr = "192.0.2.1:1234"
			if c.token != "" {
				req.Header.Set("Authorization", "Bearer "+c.token)
			}
			b.ReportAllocs()
			cpu := cpuTime(b)
			for b.Loop() {
				rec := httptest.NewRecorder()
				c.h.ServeHTTP(rec, req)
				if rec.Code != c.want {
					b.Fatalf("status %d, want %d", rec.Code, c.want)
				}
			}
			b.ReportMetric(float64((cpuTime(b)-cpu).Microseconds())/float64(b.N), "cpu-µs/op")
		})
	}
}
