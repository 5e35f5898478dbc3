package main

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"net/http"
	"strconv"
	"sync/atomic"
	"testing"
	"time"

	"github.com/google/go-cmp/cmp"
	"github.com/redis/go-redis/v9"
)

// newCachedService returns a service over a new test store with Redis at r
// in front of it. cfg's Cache and (unless set) RedisTimeout are filled in;
// LocalCacheSize stays 0 unless cfg sets it, so reads reach Redis.
func newCachedService(tb testing.TB, r *redisServer, store productStore, cfg ServiceConfig) *ProductService {
	tb.Helper()
	if cfg.RedisTimeout == 0 {
		// Generous: these tests are about what the cache holds, and a
		// loaded test machine must not turn a hit into a timeout.
		cfg.RedisTimeout = time.Second
	}
	cfg.Cache = newTestRedisCache(tb, r, cfg.RedisTimeout)
	return newTestService(tb, store, cfg)
}

// redisVersions returns the versions Redis holds for product id, one per
// generation that has it. It reads Redis with its own client.
func redisVersions(tb testing.TB, r *redisServer, id int64) []int64 {
	tb.Helper()
	c := redis.NewClient(&redis.Options{Addr: r.Addr, Protocol: 2, DisableIdentity: true})
	defer c.Close()
	keys, err := c.Keys(context.Background(), "productsvc:*:product:"+strconv.FormatInt(id, 10)).Result()
	if err != nil {
		tb.Fatalf("redis KEYS: %v", err)
	}
	var out []int64
	for _, k := range keys {
		v, err := c.HGet(context.Background(), k, "v").Int64()
		if err != nil {
			tb.Fatalf("redis HGET %s v: %v", k, err)
		}
		out = append(out, v)
	}
	return out
}

// getProductVia reads id through svc and decodes it.
func getProductVia(tb testing.TB, svc *ProductService, id int64) (Product, string, error) {
	tb.Helper()
	v, source, err := svc.Get(context.Background(), id)
	if err != nil {
		return Product{}, source, err
	}
	var p Product
	if err := json.Unmarshal(v.JSON, &p); err != nil {
		tb.Fatalf("decoding cached product %s: %v", v.JSON, err)
	}
	if p.Version != v.Version {
		tb.Errorf("cached version %d, JSON version %d: want equal", v.Version, p.Version)
	}
	return p, source, nil
}

func TestProductService_Get_redisHitMiss(t *testing.T) {
	r := startRedis(t)
	store := newTestStore(t)
	svc := newCachedService(t, r, store, ServiceConfig{})
	hits := svc.metrics.cacheRequests.WithLabelValues(cacheHit)
	misses := svc.metrics.cacheRequests.WithLabelValues(cacheMiss)

	// Written straight to SQLite: no cache layer has heard of it.
	p, _, err := store.Create(t.Context(), "", newProduct("HIT-1"), nil)
	if err != nil {
		t.Fatal(err)
	}
	tests := []struct {
		name       string
		wantSource string
		wantHits   float64
		wantMisses float64
	}{
		{name: "first read", wantSource: cacheMiss, wantHits: 0, wantMisses: 1},
		{name: "second read", wantSource: cacheHit, wantHits: 1, wantMisses: 1},
		{name: "third read", wantSource: cacheHit, wantHits: 2, wantMisses: 1},
	}
	for _, tt := range tests {
		got, source, err := getProductVia(t, svc, p.ID)
		if err != nil {
			t.Fatalf("%s: Get(%d) error = %v", tt.name, p.ID, err)
		}
		if source != tt.wantSource {
			t.Errorf("%s: Get(%d) source = %q, want %q", tt.name, p.ID, source, tt.wantSource)
		}
		if diff := cmp.Diff(p, got); diff != "" {
			t.Errorf("%s: Get(%d) (-want +got):\n%s", tt.name, p.ID, diff)
		}
		if h, m := counterValue(t, hits), counterValue(t, misses); h != tt.wantHits || m != tt.wantMisses {
			t.Errorf("%s: cache_requests_total hit, miss = %v, %v, want %v, %v", tt.name, h, m, tt.wantHits, tt.wantMisses)
		}
	}
	if got := redisVersions(t, r, p.ID); !cmp.Equal(got, []int64{1}) {
		t.Errorf("Redis holds versions %v of product %d, want [1]", got, p.ID)
	}

	// A product created through the service is in Redis at once.
	q, _, err := svc.Create(t.Context(), ProductInput{SKU: new("HIT-2"), Name: new("pen"), PriceCents: new(int64(5))}, nil)
	if err != nil {
		t.Fatal(err)
	}
	if _, source, err := getProductVia(t, svc, q.ID); err != nil || source != cacheHit {
		t.Errorf("first Get after Create = %q, %v, want a Redis hit", source, err)
	}
	// Missing products are not cached.
	for range 2 {
		if _, source, err := svc.Get(t.Context(), 424242); !errors.Is(err, ErrNotFound) || source != cacheMiss {
			t.Errorf("Get(missing) = %q, %v, want a miss and ErrNotFound", source, err)
		}
	}
}

// serviceWrites are the write kinds; each changes the product with id and
// returns its new version, or 0 when it deletes it.
var serviceWrites = []struct {
	name  string
	write func(ctx context.Context, svc *ProductService, id int64) (int64, error)
}{
	{"PUT", func(ctx context.Context, svc *ProductService, id int64) (int64, error) {
		p, err := svc.Replace(ctx, id, ProductInput{SKU: new(fmt.Sprintf("W-%d", id)), Name: new("replaced"), PriceCents: new(int64(999))}, nil)
		return p.Version, err
	}},
	{"PATCH", func(ctx context.Context, svc *ProductService, id int64) (int64, error) {
		p, err := svc.Patch(ctx, id, ProductPatch{Name: optional[string]{Set: true, Value: "patched"}}, nil)
		return p.Version, err
	}},
	{"DELETE", func(ctx context.Context, svc *ProductService, id int64) (int64, error) {
		return 0, svc.Delete(ctx, id, nil)
	}},
	{"stock set", func(ctx context.Context, svc *ProductService, id int64) (int64, error) {
		p, err := svc.SetStock(ctx, id, 77, nil)
		return p.Version, err
	}},
	{"stock adjustment", func(ctx context.Context, svc *ProductService, id int64) (int64, error) {
		p, _, err := svc.AdjustStock(ctx, id, 3, nil, nil)
		return p.Version, err
	}},
}

func TestProductService_invalidation(t *testing.T) {
	r := startRedis(t)
	for _, local := range []int{0, 1000} {
		for _, w := range serviceWrites {
			t.Run(fmt.Sprintf("%s/local=%d", w.name, local), func(t *testing.T) {
				store := newTestStore(t)
				svc := newCachedService(t, r, store, ServiceConfig{LocalCacheSize: local})
				p, _, err := store.Create(t.Context(), "", newProduct(fmt.Sprintf("INV-%d", local)), nil)
				if err != nil {
					t.Fatal(err)
				}
				// Cache version 1 in every layer.
				for range 2 {
					if _, _, err := svc.Get(t.Context(), p.ID); err != nil {
						t.Fatal(err)
					}
				}
				if _, source, _ := svc.Get(t.Context(), p.ID); source == cacheMiss {
					t.Fatalf("third Get was a miss, want version 1 cached")
				}
				version, err := w.write(t.Context(), svc, p.ID)
				if err != nil {
					t.Fatalf("%s error = %v", w.name, err)
				}
				for i := range 2 {
					got, source, err := getProductVia(t, svc, p.ID)
					if version == 0 {
						if !errors.Is(err, ErrNotFound) {
							t.Errorf("Get #%d after DELETE = version %d from %q, %v, want ErrNotFound", i, got.Version, source, err)
						}
						continue
					}
					if err != nil || got.Version != version {
						t.Errorf("Get #%d after %s = version %d from %q, %v, want version %d", i, w.name, got.Version, source, err, version)
					}
					// The write updated the caches itself: no database read needed.
					if source == cacheMiss {
						t.Errorf("Get #%d after %s source = %q, want the new version from a cache", i, w.name, source)
					}
				}
			})
		}
	}
}

// gatedStore holds up one Get after it has read the database, so a test can
// commit a write between a read and the cache fill that follows it.
type gatedStore struct {
	productStore
	armed   atomic.Bool
	read    chan Product  // receives what the held Get read
	release chan struct{} // closed to let the held Get return
}

func newGatedStore(s *sqliteStore) *gatedStore {
	return &gatedStore{productStore: s, read: make(chan Product, 1), release: make(chan struct{})}
}

func (g *gatedStore) Get(ctx context.Context, id int64) (Product, error) {
	p, err := g.productStore.Get(ctx, id)
	if g.armed.CompareAndSwap(true, false) {
		g.read <- p
		<-g.release
	}
	return p, err
}

func TestProductService_Get_staleFillLoses(t *testing.T) {
	r := startRedis(t)
	for _, local := range []int{0, 1000} {
		for _, w := range serviceWrites {
			t.Run(fmt.Sprintf("%s/local=%d", w.name, local), func(t *testing.T) {
				gs := newGatedStore(newTestStore(t))
				svc := newCachedService(t, r, gs, ServiceConfig{LocalCacheSize: local})
				p, _, err := gs.productStore.Create(t.Context(), "", newProduct("RACE-1"), nil)
				if err != nil {
					t.Fatal(err)
				}

				// 1. A read misses both caches and reads version 1 from SQLite,
				// then stops before it fills the caches.
				gs.armed.Store(true)
				type result struct {
					p   Product
					err error
				}
				res := make(chan result, 1)
				go func() {
					v, _, err := svc.Get(context.Background(), p.ID)
					var got Product
					if err == nil {
						err = json.Unmarshal(v.JSON, &got)
					}
					res <- result{got, err}
				}()
				select {
				case got := <-gs.read:
					if got.Version != 1 {
						t.Fatalf("held read saw version %d, want 1", got.Version)
					}
				case <-time.After(10 * time.Second):
					t.Fatal("the read did not reach the store within 10s")
				}

				// 2. A write commits and publishes version 2 (or a tombstone).
				version, err := w.write(t.Context(), svc, p.ID)
				if err != nil {
					t.Fatalf("%s error = %v", w.name, err)
				}

				// 3. The stale read now fills the caches with version 1.
				close(gs.release)
				select {
				case got := <-res:
					if got.err != nil || got.p.Version != 1 {
						t.Fatalf("held read = version %d, %v, want version 1 (it read before the write)", got.p.Version, got.err)
					}
				case <-time.After(10 * time.Second):
					t.Fatal("the held read did not finish within 10s")
				}

				// 4. Every later read sees the write.
				for i := range 3 {
					got, source, err := getProductVia(t, svc, p.ID)
					if version == 0 {
						if !errors.Is(err, ErrNotFound) {
							t.Errorf("read #%d after DELETE = version %d from %q, %v, want ErrNotFound", i, got.Version, source, err)
						}
						continue
					}
					if err != nil || got.Version != version {
						t.Errorf("read #%d = version %d from %q, %v, want version %d", i, got.Version, source, err, version)
					}
				}
				for _, v := range redisVersions(t, r, p.ID) {
					if v < 2 {
						t.Errorf("Redis holds version %d of product %d, want none older than 2", v, p.ID)
					}
				}
			})
		}
	}
}

func TestProductService_Get_staleFillAfterFailedPublish(t *testing.T) {
	// A read fetches version 1 from SQLite; Redis hangs while a write
	// commits version 2, so its publish fails and the service forgets every
	// Redis entry; Redis recovers; then the old read fills Redis. The next
	// read must still see version 2.
	r := startRedis(t)
	gs := newGatedStore(newTestStore(t))
	svc := newCachedService(t, r, gs, ServiceConfig{RedisTimeout: 200 * time.Millisecond})
	p, _, err := gs.productStore.Create(t.Context(), "", newProduct("FORGET-1"), nil)
	if err != nil {
		t.Fatal(err)
	}
	gs.armed.Store(true)
	done := make(chan error, 1)
	go func() {
		_, _, err := svc.Get(context.Background(), p.ID)
		done <- err
	}()
	select {
	case <-gs.read:
	case <-time.After(10 * time.Second):
		t.Fatal("the read did not reach the store within 10s")
	}

	r.Pause()
	t.Cleanup(r.Resume)
	q, err := svc.Patch(t.Context(), p.ID, ProductPatch{Name: optional[string]{Set: true, Value: "v2"}}, nil)
	if err != nil {
		t.Fatalf("Patch while Redis hangs error = %v, want nil (the write commits; Redis is best effort)", err)
	}
	r.Resume()
	// Wait until Redis answers again, so the stale fill can land.
	waitFor(t, 10*time.Second, "Redis to answer after SIGCONT", func() bool { return redisPing(r.Addr) == nil })

	close(gs.release)
	select {
	case err := <-done:
		if err != nil {
			t.Fatal(err)
		}
	case <-time.After(10 * time.Second):
		t.Fatal("the held read did not finish within 10s")
	}
	for i := range 3 {
		got, source, err := getProductVia(t, svc, p.ID)
		if err != nil || got.Version != q.Version {
			t.Errorf("read #%d after the write = version %d from %q, %v, want version %d", i, got.Version, source, err, q.Version)
		}
	}
}

func TestProductService_redisRestart(t *testing.T) {
	r := startRedis(t)
	svc := newCachedService(t, r, nil, ServiceConfig{RedisTimeout: 200 * time.Millisecond, BreakerTimeout: 50 * time.Millisecond})
	ts := newTestServer(t, svc)
	p := ts.createProduct(t, "RESTART-1", 100)
	path := fmt.Sprintf("/products/%d", p.ID)
	if _, source, err := svc.Get(t.Context(), p.ID); err != nil || source != cacheHit {
		t.Fatalf("Get before the kill = %q, %v, want a hit", source, err)
	}

	r.Kill()
	for i := range 10 {
		if got := ts.getProduct(t, p.ID); got.Version != 1 {
			t.Errorf("GET #%d with Redis dead = version %d, want 1", i, got.Version)
		}
	}
	// Writes still work, and reads see them.
	if r := ts.write(t, http.MethodPatch, path, `{"name":"written while Redis was dead"}`); r.status != http.StatusOK {
		t.Fatalf("PATCH with Redis dead = %v, want 200", r)
	}
	if got := ts.getProduct(t, p.ID); got.Version != 2 {
		t.Errorf("GET after the PATCH = version %d, want 2", got.Version)
	}
	rd := ts.get(t, "/ready")
	var doc readyBody
	json.Unmarshal(rd.body, &doc)
	if rd.status != http.StatusOK || doc.Status != "degraded" || doc.Checks.Cache.Status != "down" {
		t.Errorf("GET /ready with Redis dead = %v, want 200 degraded with cache down", rd)
	}

	r.Restart()
	waitFor(t, 15*time.Second, "a Redis hit after the restart", func() bool {
		got, source, err := getProductVia(t, svc, p.ID)
		if err != nil || got.Version != 2 {
			t.Fatalf("Get after the restart = version %d, %v, want version 2", got.Version, err)
		}
		return source == cacheHit
	})
	waitFor(t, 15*time.Second, "GET /ready to report the cache ok", func() bool {
		rd := ts.get(t, "/ready")
		var doc readyBody
		json.Unmarshal(rd.body, &doc)
		return rd.status == http.StatusOK && doc.Status == "ok" && doc.Checks.Cache.Status == "ok"
	})
}

func TestProductService_redisPaused(t *testing.T) {
	r := startRedis(t)
	svc := newCachedService(t, r, nil, ServiceConfig{RedisTimeout: 100 * time.Millisecond, BreakerTimeout: 100 * time.Millisecond})
	ts := newTestServer(t, svc)
	p := ts.createProduct(t, "PAUSE-1", 100)
	if _, source, err := svc.Get(t.Context(), p.ID); err != nil || source != cacheHit {
		t.Fatalf("Get before the pause = %q, %v, want a hit", source, err)
	}

	r.Pause()
	t.Cleanup(r.Resume)
	// A hung Redis costs each request at most its timeout: every request
	// here must finish well within 2s (the bound only proves none hangs).
	const bound = 2 * time.Second
	timed := func(what string, f func()) {
		t.Helper()
		start := time.Now()
		f()
		if d := time.Since(start); d > bound {
			t.Errorf("%s took %v with Redis paused, want under %v", what, d, bound)
		}
	}
	for i := range 10 {
		timed(fmt.Sprintf("GET #%d", i), func() {
			if got := ts.getProduct(t, p.ID); got.Version != 1 {
				t.Errorf("GET #%d with Redis paused = version %d, want 1", i, got.Version)
			}
		})
	}
	timed("PATCH", func() {
		if r := ts.write(t, http.MethodPatch, fmt.Sprintf("/products/%d", p.ID), `{"name":"paused"}`); r.status != http.StatusOK {
			t.Errorf("PATCH with Redis paused = %v, want 200", r)
		}
	})
	timed("GET after PATCH", func() {
		if got := ts.getProduct(t, p.ID); got.Version != 2 {
			t.Errorf("GET after PATCH with Redis paused = version %d, want 2", got.Version)
		}
	})
	timed("GET /ready", func() {
		rd := ts.get(t, "/ready")
		var doc readyBody
		json.Unmarshal(rd.body, &doc)
		if rd.status != http.StatusOK || doc.Checks.Cache.Status != "down" {
			t.Errorf("GET /ready with Redis paused = %v, want 200 with cache down", rd)
		}
	})

	r.Resume()
	waitFor(t, 15*time.Second, "a Redis hit after SIGCONT", func() bool {
		got, source, err := getProductVia(t, svc, p.ID)
		if err != nil || got.Version != 2 {
			t.Fatalf("Get after SIGCONT = version %d, %v, want version 2", got.Version, err)
		}
		return source == cacheHit
	})
}

func TestProductService_localCache(t *testing.T) {
	r := startRedis(t)
	store := newTestStore(t)
	svc := newCachedService(t, r, store, ServiceConfig{LocalCacheSize: 1000})
	redisLookups := func() float64 {
		total := 0.0
		for _, res := range []string{cacheHit, cacheMiss, cacheError, cacheSkipped} {
			total += counterValue(t, svc.metrics.cacheRequests.WithLabelValues(res))
		}
		return total
	}

	// Unknown to the caches: one database read fills both layers.
	p, _, err := store.Create(t.Context(), "", newProduct("LOCAL-1"), nil)
	if err != nil {
		t.Fatal(err)
	}
	if _, source, _ := svc.Get(t.Context(), p.ID); source != cacheMiss {
		t.Errorf("first Get source = %q, want %q", source, cacheMiss)
	}
	before := redisLookups()
	for i := range 20 {
		if _, source, err := svc.Get(t.Context(), p.ID); err != nil || source != cacheLocal {
			t.Errorf("Get #%d = %q, %v, want served locally", i, source, err)
		}
	}
	if after := redisLookups(); after != before {
		t.Errorf("Redis lookups went from %v to %v over local hits, want unchanged", before, after)
	}
	if got := redisVersions(t, r, p.ID); !cmp.Equal(got, []int64{1}) {
		t.Errorf("Redis holds versions %v, want [1] (filled alongside the local layer)", got)
	}

	// A write replaces the local entry at once.
	q, err := svc.SetStock(t.Context(), p.ID, 9, nil)
	if err != nil {
		t.Fatal(err)
	}
	got, source, err := getProductVia(t, svc, p.ID)
	if err != nil || source != cacheLocal || got.Version != q.Version || got.Stock != 9 {
		t.Errorf("Get after SetStock = version %d stock %d from %q, %v, want version %d stock 9 served locally",
			got.Version, got.Stock, source, err, q.Version)
	}

	// With Redis gone, the local layer keeps answering.
	r.Kill()
	if _, source, err := svc.Get(t.Context(), p.ID); err != nil || source != cacheLocal {
		t.Errorf("Get with Redis dead = %q, %v, want served locally", source, err)
	}
	// Deletes remove the local entry.
	if err := svc.Delete(t.Context(), p.ID, nil); err != nil {
		t.Fatal(err)
	}
	if _, _, err := svc.Get(t.Context(), p.ID); !errors.Is(err, ErrNotFound) {
		t.Errorf("Get after Delete error = %v, want ErrNotFound", err)
	}
}

func TestProductService_localCacheWithoutRedis(t *testing.T) {
	// One entry per shard, and more products than entries.
	svc := newTestService(t, nil, ServiceConfig{LocalCacheSize: localShards})
	const products = 3 * localShards
	var ids []int64
	for i := range products {
		p, _, err := svc.Create(t.Context(), ProductInput{SKU: new(fmt.Sprintf("L-%d", i)), Name: new("x"), PriceCents: new(int64(i))}, nil)
		if err != nil {
			t.Fatal(err)
		}
		ids = append(ids, p.ID)
	}
	// Every read is right, whatever was evicted; a read right after
	// another of the same product is served locally.
	for i, id := range ids {
		for j := range 2 {
			got, source, err := getProductVia(t, svc, id)
			if err != nil || got.PriceCents != int64(i) {
				t.Errorf("Get(%d) = price %d, %v, want price %d", id, got.PriceCents, err, i)
			}
			if j == 1 && source != cacheLocal {
				t.Errorf("repeated Get(%d) source = %q, want %q", id, source, cacheLocal)
			}
		}
	}
	if n := svc.caches.local.len(); n > localShards {
		t.Errorf("local cache holds %d entries, want at most %d", n, localShards)
	}
}

// TestRedisCache_restartFromOldSnapshot restarts Redis from a snapshot taken
// before the last write: Redis then holds an old version under the current
// generation. The first read on the new connection must not return it.
func TestRedisCache_restartFromOldSnapshot(t *testing.T) {
	r := startRedis(t)
	rc := newTestRedisCache(t, r, time.Second)
	svc := newTestService(t, nil, ServiceConfig{Cache: rc, RedisTimeout: time.Second, LocalCacheSize: 0})
	p, _, err := svc.Create(t.Context(), ProductInput{SKU: new("SNAP-1"), Name: new("pen"), PriceCents: new(int64(100))}, nil)
	if err != nil {
		t.Fatal(err)
	}
	if v, src, err := svc.Get(t.Context(), p.ID); err != nil || src != cacheHit || v.Version != 1 {
		t.Fatalf("Get = version %d from %s, %v; want version 1 from Redis", v.Version, src, err)
	}
	if err := rc.client.Save(t.Context()).Err(); err != nil {
		t.Fatalf("SAVE: %v", err)
	}
	if _, err := svc.Patch(t.Context(), p.ID, ProductPatch{Name: optional[string]{Set: true, Value: "new pen"}}, nil); err != nil {
		t.Fatal(err)
	}
	r.Restart() // kill -9, then start on the same port and dir: loads the old snapshot

	for i := range 5 {
		v, src, err := svc.Get(t.Context(), p.ID)
		if err != nil {
			continue // the dead pooled connection may fail one call
		}
		if v.Version != 2 {
			t.Fatalf("Get %d after Redis restarted from an old snapshot = version %d from %s, want 2", i, v.Version, src)
		}
	}
}

// TestProductService_Get_fillAcrossRedisRestart: a read takes version 1
// from SQLite and stalls; Redis restarts; a write commits version 2 (its put
// goes to the generation of before the restart, which the reconnect then
// forgets); the stalled read fills Redis. A read after the acknowledged
// write must still see version 2: the stalled fill belongs to the old
// generation.
func TestProductService_Get_fillAcrossRedisRestart(t *testing.T) {
	r := startRedis(t)
	rc := newTestRedisCache(t, r, time.Second)
	store := &holdFirstGet{productStore: newTestStore(t), read: make(chan struct{}), release: make(chan struct{})}
	svc := newTestService(t, store, ServiceConfig{Cache: rc, RedisTimeout: time.Second, LocalCacheSize: 0})
	p, _, err := store.productStore.Create(t.Context(), "", Product{SKU: "RS-1", Name: "old", Currency: "USD"}, nil)
	if err != nil {
		t.Fatal(err)
	}
	if err := rc.Ping(t.Context()); err != nil { // a connection, so Redis's run_id is known
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
	<-store.read
	r.Restart()
	out, err := svc.Patch(t.Context(), p.ID, ProductPatch{Name: optional[string]{Set: true, Value: "new"}}, nil)
	if err != nil {
		t.Fatal(err)
	}
	close(store.release)
	<-slow
	for i := range 3 {
		got, src, err := svc.Get(t.Context(), p.ID)
		if err != nil {
			t.Fatal(err)
		}
		if got.Version != out.Version {
			t.Fatalf("read %d after the acknowledged write = version %d from %s, want %d", i, got.Version, src, out.Version)
		}
	}
}

// TestRedisCache_sharedGeneration: two processes share entries; when one
// gives the generation up (a write it could not store), the other stops
// reading it at its next call, learns the position the new generation is
// current at, and a fill it started before the change lands nowhere.
func TestRedisCache_sharedGeneration(t *testing.T) {
	r := startRedis(t)
	c1 := newTestRedisCache(t, r, time.Second)
	c2 := newTestRedisCache(t, r, time.Second)
	ctx := t.Context()
	g1, _, err := c1.SettleGeneration(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if err := c1.Put(ctx, g1, 7, 1, []byte(`{"id":7,"version":1}`)); err != nil {
		t.Fatal(err)
	}
	g2, _, err := c2.SettleGeneration(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if b, err := c2.Get(ctx, g2, 7); err != nil || string(b) != `{"id":7,"version":1}` {
		t.Fatalf("second process Get = %q, %v; want the first one's entry", b, err)
	}

	c1.Forget(42)
	if _, through, err := c1.SettleGeneration(ctx); err != nil || through != 42 {
		t.Fatalf("after Forget(42): SettleGeneration through = %d, %v; want 42", through, err)
	}
	if b, err := c2.Get(ctx, g2, 7); !errors.Is(err, errCacheMiss) {
		t.Fatalf("second process Get after the first gave the generation up = %q, %v; want a miss", b, err)
	}
	if err := c2.Put(ctx, g2, 7, 1, []byte(`{"id":7,"version":1}`)); err != nil { // a fill from before
		t.Fatal(err)
	}
	next, through, err := c2.SettleGeneration(ctx)
	if err != nil || next == g2 || through != 42 {
		t.Fatalf("second process SettleGeneration = generation %d (was %d), through %d, %v; want a new generation through 42", next, g2, through, err)
	}
	if b, err := c2.Get(ctx, next, 7); !errors.Is(err, errCacheMiss) {
		t.Fatalf("Get in the new generation = %q, %v; want a miss (the old fill must not land there)", b, err)
	}
	// Two processes giving up the same generation start one new one.
	c1.Forget(50)
	c2.Forget(60)
	_, t1, _ := c1.SettleGeneration(ctx)
	_, t2, _ := c2.SettleGeneration(ctx)
	if t1 != t2 {
		t.Errorf("after both gave up one generation: through %d and %d, want one new generation", t1, t2)
	}
}
