package main

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"net/http"
	"strconv"
	"sync"
	"testing"
	"time"

	"github.com/google/go-cmp/cmp"
	"github.com/sony/gobreaker/v2"
)

func TestProductService_Create(t *testing.T) {
	tests := []struct {
		name    string
		in      ProductInput
		wantErr error
	}{
		{name: "valid", in: ProductInput{SKU: new("A-1"), Name: new("pen"), PriceCents: new(int64(150))}},
		{name: "every field", in: ProductInput{SKU: new("A-2"), Name: new("pen"), Description: new("blue\nink"),
			Category: new("office"), PriceCents: new(int64(0)), Currency: new("EUR"), Stock: new(int64(3))}},
		{name: "empty name", in: ProductInput{SKU: new("A-3"), Name: new(""), PriceCents: new(int64(150))}, wantErr: ErrInvalid},
		{name: "no price", in: ProductInput{SKU: new("A-4"), Name: new("pen")}, wantErr: ErrInvalid},
		{name: "bad sku", in: ProductInput{SKU: new("A 5"), Name: new("pen"), PriceCents: new(int64(1))}, wantErr: ErrInvalid},
		{name: "negative stock", in: ProductInput{SKU: new("A-6"), Name: new("pen"), PriceCents: new(int64(1)), Stock: new(int64(-1))}, wantErr: ErrInvalid},
		{name: "duplicate sku", in: ProductInput{SKU: new("TAKEN"), Name: new("pen"), PriceCents: new(int64(1))}, wantErr: ErrConflict},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			forEachStore(t, func(t *testing.T, s productStore) {
				svc := newTestService(t, s, ServiceConfig{})
				if _, _, err := svc.Create(t.Context(), ProductInput{SKU: new("TAKEN"), Name: new("x"), PriceCents: new(int64(1))}, nil); err != nil {
					t.Fatal(err)
				}
				got, _, err := svc.Create(t.Context(), tt.in, nil)
				if !errors.Is(err, tt.wantErr) || (tt.wantErr == nil) != (err == nil) {
					t.Fatalf("Create(%+v) error = %v, want %v", tt.in, err, tt.wantErr)
				}
				var verr *ValidationError
				if errors.Is(tt.wantErr, ErrInvalid) && !errors.As(err, &verr) {
					t.Errorf("Create(%+v) error = %T, want a *ValidationError", tt.in, err)
				}
				if err != nil {
					return
				}
				var want Product
				tt.in.apply(&want, false)
				want.Version = 1
				if diff := cmp.Diff(want, got, ignoreServerFields); diff != "" {
					t.Errorf("Create(%+v) (-want +got):\n%s", tt.in, diff)
				}
				v, _, err := svc.Get(t.Context(), got.ID)
				if err != nil {
					t.Fatal(err)
				}
				var read Product
				if err := json.Unmarshal(v.JSON, &read); err != nil {
					t.Fatal(err)
				}
				if diff := cmp.Diff(got, read); diff != "" {
					t.Errorf("Get after Create (-want +got):\n%s", diff)
				}
			})
		})
	}
}

// dbFaults are the two shapes a database failure takes: the store's own
// *dbFailure, and any error wrapping ErrUnavailable.
var dbFaults = []struct {
	name string
	err  error
}{
	{"dbFailure", &dbFailure{errors.New("disk I/O error")}},
	{"wrapped ErrUnavailable", fmt.Errorf("database is locked: %w", ErrUnavailable)},
}

func TestProductService_readBreaker(t *testing.T) {
	for _, fault := range dbFaults {
		t.Run(fault.name, func(t *testing.T) {
			fs := &failingStore{productStore: newTestStore(t)}
			ts := newTestServer(t, newTestService(t, fs, ServiceConfig{}))
			p := ts.createProduct(t, "BRK-1", 100)
			path := fmt.Sprintf("/products/%d", p.ID)

			fs.failReads(fault.err)
			for i := range dbBreakerFailures {
				r := ts.get(t, path)
				checkProblem(t, r, http.StatusServiceUnavailable, "unavailable", nil)
				if r.header.Get("Retry-After") == "" {
					t.Errorf("failure %d: 503 without Retry-After", i+1)
				}
			}
			if got := ts.svc.readCB.State(); got != gobreaker.StateOpen {
				t.Fatalf("read breaker after %d failures = %v, want open", dbBreakerFailures, got)
			}
			if got := fs.reads.Load(); got != dbBreakerFailures {
				t.Errorf("store reads = %d, want %d", got, dbBreakerFailures)
			}

			// Open: refused at once, without reaching the store, even once
			// the store is healthy again (until the breaker's timeout).
			fs.failReads(nil)
			for _, target := range []string{path, "/products", "/products?sort=name"} {
				r := ts.get(t, target)
				checkProblem(t, r, http.StatusServiceUnavailable, "unavailable", nil)
				if ra, err := strconv.Atoi(r.header.Get("Retry-After")); err != nil || ra < 1 {
					t.Errorf("GET %s: Retry-After = %q, want a positive number of seconds", target, r.header.Get("Retry-After"))
				}
			}
			if got := fs.reads.Load(); got != dbBreakerFailures {
				t.Errorf("store reads = %d while the breaker is open, want still %d", got, dbBreakerFailures)
			}

			// Reads cannot be served: not ready. Writes have their own breaker.
			r := ts.get(t, "/ready")
			var rd readyBody
			json.Unmarshal(r.body, &rd)
			if r.status != http.StatusServiceUnavailable || rd.Status != "unavailable" || rd.Checks.Breaker.Read != "open" || rd.Checks.Breaker.State != "open" {
				t.Errorf("GET /ready with the read breaker open = %v, want 503 unavailable with breaker read open", r)
			}
			if r := ts.write(t, http.MethodPatch, path, `{"name":"still writable"}`); r.status != http.StatusOK {
				t.Errorf("PATCH with only the read breaker open = %v, want 200", r)
			}
		})
	}
}

func TestProductService_writeBreaker(t *testing.T) {
	for _, fault := range dbFaults {
		t.Run(fault.name, func(t *testing.T) {
			fs := &failingStore{productStore: newTestStore(t)}
			ts := newTestServer(t, newTestService(t, fs, ServiceConfig{}))
			p := ts.createProduct(t, "BRK-W", 100, `"stock":5`)
			path := fmt.Sprintf("/products/%d", p.ID)

			fs.writes.Store(0)
			fs.failWrites(fault.err)
			writes := []struct{ method, path, body string }{
				{http.MethodPost, "/products", `{"sku":"BRK-W2","name":"x","price_cents":1}`},
				{http.MethodPut, path, `{"sku":"BRK-W","name":"x","price_cents":1}`},
				{http.MethodPatch, path, `{"name":"x"}`},
				{http.MethodPut, path + "/stock", `{"stock":1}`},
				{http.MethodPost, path + "/stock/adjustments", `{"delta":1}`},
				{http.MethodDelete, path, ``},
			}
			for i := range dbBreakerFailures {
				w := writes[i%len(writes)]
				r := ts.write(t, w.method, w.path, w.body)
				checkProblem(t, r, http.StatusServiceUnavailable, "unavailable", nil)
			}
			if got := ts.svc.writeCB.State(); got != gobreaker.StateOpen {
				t.Fatalf("write breaker after %d failures = %v, want open", dbBreakerFailures, got)
			}
			fs.failWrites(nil)
			for _, w := range writes {
				r := ts.write(t, w.method, w.path, w.body)
				checkProblem(t, r, http.StatusServiceUnavailable, "unavailable", nil)
				if r.header.Get("Retry-After") == "" {
					t.Errorf("%s %s: 503 without Retry-After", w.method, w.path)
				}
			}
			if got := fs.writes.Load(); got != dbBreakerFailures {
				t.Errorf("store writes = %d, want %d (none while open)", got, dbBreakerFailures)
			}
			// Reads still work, and the service is ready but degraded.
			if diff := cmp.Diff(p, ts.getProduct(t, p.ID)); diff != "" {
				t.Errorf("product changed (-want +got):\n%s", diff)
			}
			r := ts.get(t, "/ready")
			var rd readyBody
			json.Unmarshal(r.body, &rd)
			if r.status != http.StatusOK || rd.Status != "degraded" || rd.Checks.Breaker.Write != "open" ||
				rd.Checks.Breaker.Read != "closed" || rd.Checks.Database.Status != "ok" {
				t.Errorf("GET /ready with the write breaker open = %v, want 200 degraded, write open, read closed", r)
			}
		})
	}
}

func TestProductService_breakerRecovers(t *testing.T) {
	fs := &failingStore{productStore: newTestStore(t)}
	svc := newTestService(t, fs, ServiceConfig{BreakerTimeout: 50 * time.Millisecond})
	p, _, err := svc.Create(t.Context(), ProductInput{SKU: new("REC-1"), Name: new("pen"), PriceCents: new(int64(1))}, nil)
	if err != nil {
		t.Fatal(err)
	}
	fs.failReads(&dbFailure{errors.New("disk I/O error")})
	for range dbBreakerFailures {
		svc.Get(t.Context(), p.ID)
	}
	if got := svc.readCB.State(); got != gobreaker.StateOpen {
		t.Fatalf("read breaker = %v, want open", got)
	}
	// Still failing: after the timeout a probe reaches the store, fails,
	// and the breaker opens again.
	before := fs.reads.Load()
	waitFor(t, 5*time.Second, "a half-open probe to reach the store", func() bool {
		svc.Get(t.Context(), p.ID)
		return fs.reads.Load() > before
	})
	if _, _, err := svc.Get(t.Context(), p.ID); !errors.Is(err, ErrUnavailable) {
		t.Errorf("Get after a failed probe error = %v, want ErrUnavailable", err)
	}

	// Healed: the next probe closes the breaker.
	fs.failReads(nil)
	waitFor(t, 5*time.Second, "a read to succeed after the store healed", func() bool {
		_, _, err := svc.Get(t.Context(), p.ID)
		return err == nil
	})
	if got := svc.readCB.State(); got != gobreaker.StateClosed {
		t.Errorf("read breaker after a successful probe = %v, want closed", got)
	}
	if _, err := svc.List(t.Context(), ListFilter{Limit: 10, Sort: "id"}); err != nil {
		t.Errorf("List after recovery error = %v", err)
	}
}

func TestProductService_Probe(t *testing.T) {
	// The background probe closes the breakers with no client request.
	fs := &failingStore{productStore: newTestStore(t)}
	svc := newTestService(t, fs, ServiceConfig{BreakerTimeout: 50 * time.Millisecond})
	fs.failReads(&dbFailure{errors.New("disk I/O error")})
	fs.failWrites(&dbFailure{errors.New("disk full")})
	for i := range dbBreakerFailures {
		svc.Get(t.Context(), 1)
		svc.Create(t.Context(), ProductInput{SKU: new(fmt.Sprintf("PR-%d", i)), Name: new("x"), PriceCents: new(int64(1))}, nil)
	}
	if r, w := svc.readCB.State(), svc.writeCB.State(); r != gobreaker.StateOpen || w != gobreaker.StateOpen {
		t.Fatalf("breakers read, write = %v, %v, want open, open", r, w)
	}
	fs.failReads(nil)
	fs.failWrites(nil)
	ctx, cancel := context.WithCancel(t.Context())
	done := make(chan struct{})
	go func() {
		defer close(done)
		svc.Probe(ctx, 10*time.Millisecond)
	}()
	defer func() {
		cancel()
		<-done
	}()
	waitFor(t, 5*time.Second, "the probe to close both breakers", func() bool {
		return svc.readCB.State() == gobreaker.StateClosed && svc.writeCB.State() == gobreaker.StateClosed
	})
	if got := fs.reads.Load() + fs.writes.Load(); got != 2*dbBreakerFailures {
		t.Errorf("store reads+writes = %d, want %d: the probe uses Ping and ProbeWrite, not client operations", got, 2*dbBreakerFailures)
	}
}

// TestGuard_openBreakerNamesDependency: the error of an open breaker says
// which dependency is failing; the Redis breaker's does not blame the
// database.
func TestGuard_openBreakerNamesDependency(t *testing.T) {
	svc := newTestService(t, nil, ServiceConfig{})
	tests := []struct {
		cb       *gobreaker.CircuitBreaker[struct{}]
		failures int
		want     string
	}{
		{svc.caches.redisCB, redisBreakerFailures, "Redis is failing; circuit breaker redis is open"},
		{svc.readCB, dbBreakerFailures, "database reads are failing; circuit breaker database_read is open"},
		{svc.writeCB, dbBreakerFailures, "database writes are failing; circuit breaker database_write is open"},
	}
	for _, tt := range tests {
		t.Run(tt.cb.Name(), func(t *testing.T) {
			for range tt.failures {
				guard(tt.cb, func() error { return &dbFailure{errors.New("connection refused")} })
			}
			err := guard(tt.cb, func() error { return nil })
			var uerr *UnavailableError
			if !errors.As(err, &uerr) || uerr.Reason != tt.want {
				t.Errorf("guard(%s) with the breaker open = %v, want an *UnavailableError %q", tt.cb.Name(), err, tt.want)
			}
		})
	}
}

func TestProductService_breakerIgnoresClientErrors(t *testing.T) {
	fs := &failingStore{productStore: newTestStore(t)}
	svc := newTestService(t, fs, ServiceConfig{})
	ctx := t.Context()
	p, _, err := svc.Create(ctx, ProductInput{SKU: new("IGN-1"), Name: new("pen"), PriceCents: new(int64(1)), Stock: new(int64(1))}, nil)
	if err != nil {
		t.Fatal(err)
	}
	canceled, cancel := context.WithCancel(context.Background())
	cancel()
	const n = 3 * dbBreakerFailures

	reads := []struct {
		name    string
		setup   func()
		op      func() error
		wantErr error
	}{
		{name: "not found", op: func() error { _, _, err := svc.Get(ctx, p.ID+1000); return err }, wantErr: ErrNotFound},
		{name: "list with canceled context", op: func() error { _, err := svc.List(canceled, ListFilter{Limit: 5, Sort: "id"}); return err }, wantErr: context.Canceled},
		{name: "store reports canceled", setup: func() { fs.failReads(fmt.Errorf("query: %w", context.Canceled)) },
			op: func() error { _, _, err := svc.Get(ctx, p.ID); return err }, wantErr: context.Canceled},
	}
	for _, tt := range reads {
		t.Run(tt.name, func(t *testing.T) {
			if tt.setup != nil {
				tt.setup()
				defer fs.failReads(nil)
			}
			for i := range n {
				if err := tt.op(); !errors.Is(err, tt.wantErr) {
					t.Fatalf("attempt %d error = %v, want %v", i, err, tt.wantErr)
				}
			}
			if got := svc.readCB.State(); got != gobreaker.StateClosed {
				t.Errorf("read breaker after %d × %s = %v, want closed", n, tt.name, got)
			}
		})
	}

	writes := []struct {
		name    string
		op      func(i int) error
		wantErr error
	}{
		{name: "create with canceled context", wantErr: context.Canceled, op: func(i int) error {
			_, _, err := svc.Create(canceled, ProductInput{SKU: new(fmt.Sprintf("C-%d", i)), Name: new("x"), PriceCents: new(int64(1))}, nil)
			return err
		}},
		{name: "duplicate sku", wantErr: ErrConflict, op: func(int) error {
			_, _, err := svc.Create(ctx, ProductInput{SKU: new("IGN-1"), Name: new("x"), PriceCents: new(int64(1))}, nil)
			return err
		}},
		{name: "invalid input", wantErr: ErrInvalid, op: func(int) error {
			_, _, err := svc.Create(ctx, ProductInput{SKU: new("IGN-2")}, nil)
			return err
		}},
		{name: "insufficient stock", wantErr: ErrInsufficientStock, op: func(int) error {
			_, _, err := svc.AdjustStock(ctx, p.ID, -5, nil, nil)
			return err
		}},
		{name: "stale If-Match", wantErr: ErrPrecondition, op: func(int) error {
			_, err := svc.SetStock(ctx, p.ID, 9, &IfMatch{Versions: []int64{99}})
			return err
		}},
		{name: "update of a missing product", wantErr: ErrNotFound, op: func(int) error {
			return svc.Delete(ctx, p.ID+1000, nil)
		}},
	}
	for _, tt := range writes {
		t.Run(tt.name, func(t *testing.T) {
			for i := range n {
				if err := tt.op(i); !errors.Is(err, tt.wantErr) {
					t.Fatalf("attempt %d error = %v, want %v", i, err, tt.wantErr)
				}
			}
			if got := svc.writeCB.State(); got != gobreaker.StateClosed {
				t.Errorf("write breaker after %d × %s = %v, want closed", n, tt.name, got)
			}
		})
	}
	// And the product is as it was.
	v, _, err := svc.Get(ctx, p.ID)
	if err != nil {
		t.Fatal(err)
	}
	if v.Version != 1 {
		t.Errorf("version = %d after only refused writes, want 1", v.Version)
	}
}

func TestProductService_AdjustStock_concurrent(t *testing.T) {
	forEachStore(t, func(t *testing.T, s productStore) {
		svc := newTestService(t, s, ServiceConfig{LocalCacheSize: 100})
		p, _, err := svc.Create(t.Context(), ProductInput{SKU: new("CONC-1"), Name: new("pen"), PriceCents: new(int64(1)), Stock: new(int64(1000))}, nil)
		if err != nil {
			t.Fatal(err)
		}
		const goroutines, perGoroutine = 50, 20
		var wg sync.WaitGroup
		want := p.Stock
		for g := range goroutines {
			for j := range perGoroutine {
				if (g+j)%3 == 0 {
					want--
				} else {
					want++
				}
			}
			wg.Go(func() {
				for j := range perGoroutine {
					delta := int64(1)
					if (g+j)%3 == 0 {
						delta = -1
					}
					if _, _, err := svc.AdjustStock(context.Background(), p.ID, delta, nil, nil); err != nil {
						t.Errorf("goroutine %d: AdjustStock(%d) error = %v", g, delta, err)
						return
					}
				}
			})
		}
		wg.Wait()
		v, _, err := svc.Get(t.Context(), p.ID)
		if err != nil {
			t.Fatal(err)
		}
		var got Product
		if err := json.Unmarshal(v.JSON, &got); err != nil {
			t.Fatal(err)
		}
		if got.Stock != want {
			t.Errorf("stock after %d concurrent ±1 adjustments = %d, want %d", goroutines*perGoroutine, got.Stock, want)
		}
		if wantVersion := int64(1 + goroutines*perGoroutine); got.Version != wantVersion {
			t.Errorf("version = %d, want %d (one per adjustment)", got.Version, wantVersion)
		}
		// The store agrees with the cache.
		stored, err := svc.store.Get(t.Context(), p.ID)
		if err != nil {
			t.Fatal(err)
		}
		if diff := cmp.Diff(stored, got); diff != "" {
			t.Errorf("cached product differs from the stored one (-want +got):\n%s", diff)
		}
	})
}

// holdFirstGet is a store whose first Get reads the product, then waits for
// release before returning it: a read slow enough to straddle a write.
type holdFirstGet struct {
	productStore
	once    sync.Once
	read    chan struct{} // closed once the held Get has read
	release chan struct{}
}

func (h *holdFirstGet) Get(ctx context.Context, id int64) (Product, error) {
	p, err := h.productStore.Get(ctx, id)
	held := false
	h.once.Do(func() { held = true })
	if held {
		close(h.read)
		<-h.release
	}
	return p, err
}

// TestProductService_Get_noSharedReadAcrossWrite shows that a read arriving
// after an acknowledged write does not join a slow read of the same product
// that started before the write (singleflight), which would return the old
// version. The in-process cache is off so the later read needs the store.
func TestProductService_Get_noSharedReadAcrossWrite(t *testing.T) {
	forEachStore(t, func(t *testing.T, s productStore) {
		store := &holdFirstGet{productStore: s, read: make(chan struct{}), release: make(chan struct{})}
		svc := newTestService(t, store, ServiceConfig{LocalCacheSize: 0})
		p, _, err := svc.Create(t.Context(), ProductInput{SKU: new("SF-1"), Name: new("pen"), PriceCents: new(int64(100))}, nil)
		if err != nil {
			t.Fatal(err)
		}
		slow := make(chan int64, 1)
		go func() {
			v, _, err := svc.Get(context.Background(), p.ID)
			if err != nil {
				t.Error(err)
			}
			slow <- v.Version
		}()
		<-store.read // the slow read holds version 1

		if _, err := svc.Patch(t.Context(), p.ID, ProductPatch{PriceCents: optional[int64]{Set: true, Value: 200}}, nil); err != nil {
			t.Fatal(err)
		}
		got := make(chan int64, 1)
		go func() {
			v, _, err := svc.Get(context.Background(), p.ID)
			if err != nil {
				t.Error(err)
			}
			got <- v.Version
		}()
		select {
		case v := <-got:
			if v != 2 {
				t.Errorf("Get after the acknowledged write = version %d, want 2", v)
			}
		case <-time.After(10 * time.Second):
			t.Error("Get after the write waited for the slow read that started before it")
		}
		close(store.release)
		if v := <-slow; v != 1 {
			t.Errorf("slow Get = version %d, want 1 (it read before the write)", v)
		}
	})
}
