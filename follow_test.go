package main

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"sync"
	"sync/atomic"
	"testing"
	"time"
)

// The follower is PostgreSQL's alone: SQLite has one process, whose own
// writes are all the writes. Each "replica" below is a service over a
// store of its own (its own pool), as separate processes are.

// replicaPair returns two services over one PostgreSQL database, with
// in-process caches and, when r is not nil, one shared Redis.
func replicaPair(t *testing.T, r *redisServer) (a, b *ProductService) {
	t.Helper()
	url := newTestDatabase(t)
	open := func() *ProductService {
		cfg := ServiceConfig{LocalCacheSize: 1000, RedisTimeout: time.Second}
		if r != nil {
			cfg.Cache = newTestRedisCache(t, r, time.Second)
		}
		return newTestService(t, openTestPostgres(t, url), cfg)
	}
	return open(), open()
}

func patchName(t *testing.T, svc *ProductService, id int64, name string) Product {
	t.Helper()
	p, err := svc.Patch(t.Context(), id, ProductPatch{Name: optional[string]{Set: true, Value: name}}, nil)
	if err != nil {
		t.Fatalf("Patch(%d) error = %v", id, err)
	}
	return p
}

// followingService is newTestService with a way to stop the follower
// before the test ends (a replica going away).
func followingService(t *testing.T, store productStore, cfg ServiceConfig) (*ProductService, func()) {
	t.Helper()
	svc := NewProductService(store, cfg)
	stop := sync.OnceFunc(runFollower(svc))
	t.Cleanup(func() { stop(); svc.Close() })
	return svc, stop
}

// runFollower runs svc's follower until the returned function is called.
func runFollower(svc *ProductService) func() {
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan struct{})
	go func() { defer close(done); svc.Follow(ctx) }()
	return func() { cancel(); <-done }
}

// TestFollower_readsAcrossReplicas: replica B has a product cached in
// memory (and in Redis); replica A writes it; B's next read, from memory,
// Redis or the database, is the acknowledged version, and so is a cached
// listing that contains it.
func TestFollower_readsAcrossReplicas(t *testing.T) {
	for _, withRedis := range []bool{false, true} {
		t.Run(fmt.Sprintf("redis=%v", withRedis), func(t *testing.T) {
			var r *redisServer
			if withRedis {
				r = startRedis(t)
			}
			a, b := replicaPair(t, r)
			p, _, err := a.Create(t.Context(), ProductInput{SKU: new("FOL-1"), Name: new("v1"), PriceCents: new(int64(100)), Category: new("fol")}, nil)
			if err != nil {
				t.Fatal(err)
			}
			const key = "category=fol"
			filter := ListFilter{Category: new("fol"), Limit: 20, Sort: "id"}
			for range 3 { // cached at B: memory, Redis and the page cache
				if _, _, err := b.Get(t.Context(), p.ID); err != nil {
					t.Fatal(err)
				}
				if _, err := b.ListJSON(t.Context(), key, filter); err != nil {
					t.Fatal(err)
				}
			}
			if _, src, _ := b.Get(t.Context(), p.ID); src != cacheLocal {
				t.Fatalf("B's third read came from %q, want %q: the test needs it cached", src, cacheLocal)
			}
			for i := range 50 {
				w := patchName(t, a, p.ID, fmt.Sprintf("v%d", i+2))
				got, src, err := getProductVia(t, b, p.ID)
				if err != nil || got.Version != w.Version || got.Name != w.Name {
					t.Fatalf("write %d: B read version %d %q from %s (%v) after A acknowledged version %d %q", i, got.Version, got.Name, src, err, w.Version, w.Name)
				}
				page, err := b.ListJSON(t.Context(), key, filter)
				if err != nil {
					t.Fatal(err)
				}
				if want := fmt.Sprintf(`"version":%d`, w.Version); !bytes.Contains(page, []byte(want)) {
					t.Fatalf("write %d: B's listing %s lacks %s", i, page, want)
				}
			}
			if n := counterValue(t, b.metrics.changesApplied); n < 50 {
				t.Errorf("B applied %v change-log events, want at least 50", n)
			}
		})
	}
}

// flakyPush is a Redis cache whose Put and Push fail while failing is set:
// a replica that cannot update Redis.
type flakyPush struct {
	*redisCache
	failing atomic.Bool
}

var errInjected = errors.New("injected redis failure")

func (c *flakyPush) Put(ctx context.Context, gen cacheGen, id, version int64, json []byte) error {
	if c.failing.Load() {
		return errInjected
	}
	return c.redisCache.Put(ctx, gen, id, version, json)
}

func (c *flakyPush) Push(ctx context.Context, gen cacheGen, items []cacheItem, through int64) error {
	if c.failing.Load() {
		return errInjected
	}
	return c.redisCache.Push(ctx, gen, items, through)
}

func (c *flakyPush) Forget(int64) {} // as if Redis could not be told either

// TestFollower_redisBehind: neither replica can bring Redis up to date
// after A's write (and the generation cannot be changed), so Redis keeps
// the old version. B must not answer from it; once pushes work again, B
// pushes what it missed and reads from Redis again.
func TestFollower_redisBehind(t *testing.T) {
	r := startRedis(t)
	url := newTestDatabase(t)
	ca := &flakyPush{redisCache: newTestRedisCache(t, r, time.Second)}
	cb := &flakyPush{redisCache: newTestRedisCache(t, r, time.Second)}
	a := newTestService(t, openTestPostgres(t, url), ServiceConfig{Cache: ca, RedisTimeout: time.Second, LocalCacheSize: 0})
	b := newTestService(t, openTestPostgres(t, url), ServiceConfig{Cache: cb, RedisTimeout: time.Second, LocalCacheSize: 0})
	p, _, err := a.Create(t.Context(), ProductInput{SKU: new("FOL-R"), Name: new("v1"), PriceCents: new(int64(100))}, nil)
	if err != nil {
		t.Fatal(err)
	}
	waitFor(t, 10*time.Second, "B to read version 1 from Redis", func() bool {
		v, src, err := b.Get(t.Context(), p.ID)
		return err == nil && src == cacheHit && v.Version == 1
	})

	ca.failing.Store(true)
	cb.failing.Store(true)
	w := patchName(t, a, p.ID, "v2")
	for i := range 5 {
		got, src, err := getProductVia(t, b, p.ID)
		if err != nil || got.Version != w.Version {
			t.Fatalf("read %d while Redis holds version 1: B read version %d from %s (%v), want %d", i, got.Version, src, err, w.Version)
		}
		if src == cacheHit {
			t.Fatalf("read %d: B answered from Redis, which misses an applied event", i)
		}
	}
	if vs := redisVersions(t, r, p.ID); len(vs) != 1 || vs[0] != 1 {
		t.Fatalf("Redis holds versions %v, want [1] (the test needs it behind)", vs)
	}

	cb.failing.Store(false)
	waitFor(t, 10*time.Second, "B to push the missed event and read from Redis again", func() bool {
		v, src, err := b.Get(t.Context(), p.ID)
		return err == nil && src == cacheHit && v.Version == w.Version
	})
}

// TestFollower_adoptsAfterCrash: a write commits but its replica dies
// before Redis hears of it (written to the store directly here). A replica
// started afterwards adopts the shared generation only after pushing the
// events after its known position: it never serves the old version.
func TestFollower_adoptsAfterCrash(t *testing.T) {
	r := startRedis(t)
	url := newTestDatabase(t)
	a, stopA := followingService(t, openTestPostgres(t, url), ServiceConfig{Cache: newTestRedisCache(t, r, time.Second), RedisTimeout: time.Second})
	p, _, err := a.Create(t.Context(), ProductInput{SKU: new("FOL-C"), Name: new("v1"), PriceCents: new(int64(100))}, nil)
	if err != nil {
		t.Fatal(err)
	}
	waitFor(t, 10*time.Second, "A to read version 1 from Redis", func() bool {
		_, src, err := a.Get(t.Context(), p.ID)
		return err == nil && (src == cacheHit || src == cacheLocal)
	})
	// The "crashed" replica: its commit never reached Redis. A stops first,
	// so no running follower pushes the event.
	stopA()
	crashed := openTestPostgres(t, url)
	w, _, err := crashed.Update(t.Context(), "", p.ID, ProductUpdate{Patch: ProductPatch{Name: optional[string]{Set: true, Value: "v2"}}})
	if err != nil {
		t.Fatal(err)
	}
	if vs := redisVersions(t, r, p.ID); len(vs) == 0 || vs[0] != 1 {
		t.Fatalf("Redis holds versions %v, want [1] (the test needs it behind)", vs)
	}
	c := newTestService(t, openTestPostgres(t, url), ServiceConfig{Cache: newTestRedisCache(t, r, time.Second), RedisTimeout: time.Second})
	waitFor(t, 10*time.Second, "the new replica to trust Redis", func() bool {
		c.follow.fence(t.Context()) // a round
		return c.caches.redisTrusted(c.caches.redis.Generation())
	})
	for i := range 3 {
		got, src, err := getProductVia(t, c, p.ID)
		if err != nil || got.Version != w.Version {
			t.Fatalf("read %d at a new replica: version %d from %s (%v), want %d", i, got.Version, src, err, w.Version)
		}
	}
}

// TestFollower_notified: with the periodic look turned off, B still learns
// A's writes without reading anything: A's NOTIFY wakes B's follower.
func TestFollower_notified(t *testing.T) {
	url := newTestDatabase(t)
	b := NewProductService(openTestPostgres(t, url), ServiceConfig{LocalCacheSize: 100})
	b.follow.interval = time.Hour
	t.Cleanup(runFollower(b))
	if _, _, err := b.Get(t.Context(), 1); !errors.Is(err, ErrNotFound) { // B's first round
		t.Fatalf("Get(1) error = %v, want ErrNotFound", err)
	}
	a := newTestService(t, openTestPostgres(t, url), ServiceConfig{LocalCacheSize: 100})
	for i := range 3 {
		if _, _, err := a.Create(t.Context(), ProductInput{SKU: new(fmt.Sprintf("FOL-N%d", i)), Name: new("n"), PriceCents: new(int64(1))}, nil); err != nil {
			t.Fatal(err)
		}
	}
	log := b.store.(sharedLog)
	if err := log.Sequence(t.Context()); err != nil {
		t.Fatal(err)
	}
	head, _, err := log.Changes(t.Context(), 0, 1)
	if err != nil || head < 3 {
		t.Fatalf("Changes head = %d, %v; want at least 3", head, err)
	}
	waitFor(t, 30*time.Second, "B's follower to apply A's writes on notification", func() bool {
		return b.caches.position() >= head
	})
}

// TestFollower_fenceShared: concurrent reads share head queries.
func TestFollower_fenceShared(t *testing.T) {
	a, _ := replicaPair(t, nil)
	p, _, err := a.Create(t.Context(), ProductInput{SKU: new("FOL-F"), Name: new("f"), PriceCents: new(int64(1))}, nil)
	if err != nil {
		t.Fatal(err)
	}
	before := counterValue(t, a.metrics.fenceRounds)
	const readers, reads = 16, 50
	errs := make(chan error, readers)
	for range readers {
		go func() {
			for range reads {
				if _, _, err := a.Get(context.Background(), p.ID); err != nil {
					errs <- err
					return
				}
			}
			errs <- nil
		}()
	}
	for range readers {
		if err := <-errs; err != nil {
			t.Fatal(err)
		}
	}
	rounds := counterValue(t, a.metrics.fenceRounds) - before
	t.Logf("%d reads, %v fence rounds", readers*reads, rounds)
	if rounds >= readers*reads {
		t.Errorf("%v fence rounds for %d reads: want fewer (shared)", rounds, readers*reads)
	}
}

// boundedReplica returns a service over store whose follower reads batch
// events a query and makes at most passes queries a round (and as many to
// bring Redis up to date), with no periodic look: it runs a round only when
// a read needs one.
func boundedReplica(t *testing.T, store productStore, cfg ServiceConfig, batch, passes int) *ProductService {
	t.Helper()
	svc := NewProductService(store, cfg)
	svc.follow.interval = time.Hour
	svc.follow.batch, svc.follow.passes = batch, passes
	stop := runFollower(svc)
	t.Cleanup(func() { stop(); svc.Close() })
	return svc
}

// rename writes a new name for product id straight to store: another
// replica's write, which notifies nobody.
func rename(t *testing.T, store productStore, id int64, name string) Product {
	t.Helper()
	p, _, err := store.Update(t.Context(), "", id, ProductUpdate{Patch: ProductPatch{Name: optional[string]{Set: true, Value: name}}})
	if err != nil {
		t.Fatalf("Update(%d) error = %v", id, err)
	}
	return p
}

func createIn(t *testing.T, store productStore, sku string) Product {
	t.Helper()
	p, _, err := store.Create(t.Context(), "", Product{SKU: sku, Name: "v1", Currency: "USD"}, nil)
	if err != nil {
		t.Fatalf("Create(%s) error = %v", sku, err)
	}
	return p
}

// TestFollower_backlogLongerThanRound: more events wait than one round
// applies (a replica that was paused while others wrote). B has the
// product cached in memory; until B has applied the log up to the head,
// its reads must not come from that cache.
func TestFollower_backlogLongerThanRound(t *testing.T) {
	url := newTestDatabase(t)
	w := openTestPostgres(t, url)
	b := boundedReplica(t, openTestPostgres(t, url), ServiceConfig{LocalCacheSize: 100}, 2, 2)
	p := createIn(t, w, "BL-1")
	if err := w.Sequence(t.Context()); err != nil {
		t.Fatal(err)
	}
	waitFor(t, 10*time.Second, "B to cache the product in memory", func() bool {
		_, src, err := b.Get(t.Context(), p.ID)
		return err == nil && src == cacheLocal
	})

	var last Product
	for i := range 5 { // 5 events; a round of B applies 2 queries of 2
		last = rename(t, w, p.ID, fmt.Sprintf("v%d", i+2))
	}
	if err := w.Sequence(t.Context()); err != nil {
		t.Fatal(err)
	}
	for i := range 3 {
		got, src, err := getProductVia(t, b, p.ID)
		if err != nil || got.Version != last.Version {
			t.Fatalf("read %d with a backlog longer than a round: version %d from %s (%v), want %d", i, got.Version, src, err, last.Version)
		}
	}
	waitFor(t, 10*time.Second, "B to catch up and answer from memory again", func() bool {
		v, src, err := b.Get(t.Context(), p.ID)
		return err == nil && src == cacheLocal && v.Version == last.Version
	})
}

// TestFollower_repushLongerThanBound: Redis missed more events than B
// pushes again in one go. B must not trust Redis before it has pushed
// them all: the product whose event comes last stays old in Redis until
// then.
func TestFollower_repushLongerThanBound(t *testing.T) {
	r := startRedis(t)
	url := newTestDatabase(t)
	w := openTestPostgres(t, url)
	cb := &flakyPush{redisCache: newTestRedisCache(t, r, time.Second)}
	b := boundedReplica(t, openTestPostgres(t, url), ServiceConfig{Cache: cb, RedisTimeout: time.Second}, 2, 2)
	p := createIn(t, w, "RP-1")
	if err := w.Sequence(t.Context()); err != nil {
		t.Fatal(err)
	}
	waitFor(t, 10*time.Second, "B to read version 1 from Redis", func() bool {
		v, src, err := b.Get(t.Context(), p.ID)
		return err == nil && src == cacheHit && v.Version == 1
	})

	// Redis misses 7 events; B applies them in memory, a round at a time.
	cb.failing.Store(true)
	q := createIn(t, w, "RP-2")
	for i := range 5 {
		rename(t, w, q.ID, fmt.Sprintf("q%d", i))
	}
	w2 := rename(t, w, p.ID, "v2")
	if err := w.Sequence(t.Context()); err != nil {
		t.Fatal(err)
	}
	head, _, err := w.Head(t.Context())
	if err != nil {
		t.Fatal(err)
	}
	waitFor(t, 10*time.Second, "B to apply the events Redis missed", func() bool {
		b.follow.fence(t.Context())
		return b.caches.position() >= head
	})
	if vs := redisVersions(t, r, p.ID); len(vs) != 1 || vs[0] != 1 {
		t.Fatalf("Redis holds versions %v, want [1] (the test needs it behind)", vs)
	}

	// Redis works again. The next round pushes what it missed: more than
	// B pushes in one round.
	cb.failing.Store(false)
	createIn(t, w, "RP-3")
	if err := w.Sequence(t.Context()); err != nil {
		t.Fatal(err)
	}
	got, src, err := getProductVia(t, b, p.ID)
	if err != nil || got.Version != w2.Version {
		t.Fatalf("read while Redis lacks events: version %d from %s (%v), want %d", got.Version, src, err, w2.Version)
	}
	waitFor(t, 10*time.Second, "B to push the rest and read from Redis again", func() bool {
		b.follow.kick()
		v, src, err := b.Get(t.Context(), p.ID)
		return err == nil && src == cacheHit && v.Version == w2.Version
	})
}

// TestFollower_repushUnnumberedBatch: Redis lacks more events without a
// seq (their writer died before numbering them) than B reads in one
// query. B's first round must number them and push them all before it
// trusts Redis, which holds the old version of the product written last.
func TestFollower_repushUnnumberedBatch(t *testing.T) {
	r := startRedis(t)
	url := newTestDatabase(t)
	a, stopA := followingService(t, openTestPostgres(t, url), ServiceConfig{Cache: newTestRedisCache(t, r, time.Second), RedisTimeout: time.Second})
	p, _, err := a.Create(t.Context(), ProductInput{SKU: new("UN-1"), Name: new("v1"), PriceCents: new(int64(100))}, nil)
	if err != nil {
		t.Fatal(err)
	}
	stopA()
	w := openTestPostgres(t, url)
	if err := w.Sequence(t.Context()); err != nil {
		t.Fatal(err)
	}
	q := createIn(t, w, "UN-2")
	rename(t, w, q.ID, "q2")
	w2 := rename(t, w, p.ID, "v2") // three events without a seq; B reads 2 a query
	if vs := redisVersions(t, r, p.ID); len(vs) != 1 || vs[0] != 1 {
		t.Fatalf("Redis holds versions %v, want [1] (the test needs it behind)", vs)
	}

	// Rounds run here, one at a time, so that no later round numbers the
	// events before the first one's Redis update is checked.
	rc := newTestRedisCache(t, r, time.Second)
	b := NewProductService(openTestPostgres(t, url), ServiceConfig{Cache: rc, RedisTimeout: time.Second})
	t.Cleanup(func() { b.Close() })
	b.follow.batch, b.follow.passes = 2, 4
	if _, err := b.follow.round(t.Context()); err != nil {
		t.Fatalf("B's first round: %v", err)
	}
	gen := b.caches.redis.Generation()
	if !b.caches.redisTrusted(gen) {
		t.Fatalf("after its first round B does not trust Redis: it could not push the events without a seq")
	}
	js, err := rc.Get(t.Context(), gen, p.ID)
	if v, _ := versionOf(js); err != nil || v != w2.Version {
		t.Fatalf("B trusts Redis, which holds version %d of product %d (%v), want %d", v, p.ID, err, w2.Version)
	}
}
