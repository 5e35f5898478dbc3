package e2e

import (
	"context"
	"encoding/json"
	"fmt"
	"math/rand/v2"
	"net/http"
	"net/url"
	"sort"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"
)

// The fleet suite: several replicas of the service on one PostgreSQL
// database and one Redis, as they run in production behind a load
// balancer (HAProxy here). Each test holds the fleet to one guarantee of
// the README: no stale read after an acknowledged write whichever replica
// answers, no oversold stock and no lost update, an Idempotency-Key
// applied once, no acknowledged write lost when a replica dies, no failed
// request during a rolling update, and recovery by itself from a restart
// of PostgreSQL or Redis.

// fleetShutdownDelay is every replica's SHUTDOWN_DELAY: /ready fails this
// long before the listener closes, so HAProxy (checking every 100 ms) takes
// the replica out of rotation first.
const fleetShutdownDelay = time.Second

// requireFleet skips the test unless the suite runs on PostgreSQL: SQLite
// allows one process per database file, so there is no fleet to test.
func requireFleet(t *testing.T) {
	t.Helper()
	if !onPostgres() {
		t.Skip("SKIP: the fleet suite runs several replicas on one database, which needs PostgreSQL; run it with E2E_BACKEND=postgres (make test-faults does)")
	}
}

// fleetConfig describes a fleet for startFleet.
type fleetConfig struct {
	replicas int               // started on slots 0 to replicas-1
	spare    int               // further slots left free, for rolling updates
	haproxy  bool              // put HAProxy in front of every slot
	env      map[string]string // on top of the fleet's defaults
	store    map[string]string // the database; nil: a new one on the suite's server
}

// fleet is a set of replicas sharing one database and one Redis. Slot i
// is a fixed loopback address, HAProxy's server s<i>.
type fleet struct {
	t     *testing.T
	env   map[string]string // every replica's environment but ADDR
	store map[string]string
	redis *redisProc
	slots []string
	reps  []*service // the process serving each slot, nil when free
	cls   []*client  // a client of each slot
	lb    *haproxyProc
	dbr   *client // see dbReader
}

// startFleet starts Redis, the replicas (each ready) and, if asked,
// HAProxy (each replica UP). Replicas run with the defaults that matter
// here: in-process caches and Redis on, SHUTDOWN_DELAY of a second.
func startFleet(t *testing.T, cfg fleetConfig) *fleet {
	t.Helper()
	requireFleet(t)
	if cfg.haproxy {
		requireHAProxy(t)
	}
	nSlots := cfg.replicas + cfg.spare
	ports := fixedPorts(t, nSlots+1)
	f := &fleet{t: t, store: cfg.store}
	if f.store == nil {
		f.store = storeEnv(t)
	}
	f.redis = startRedis(t, ports[nSlots])
	f.env = withStore(f.store, map[string]string{
		"REDIS_URL":        "redis://" + f.redis.Addr + "/0",
		"SHUTDOWN_DELAY":   fleetShutdownDelay.String(),
		"SHUTDOWN_TIMEOUT": "10s",
		// Behind HAProxy every connection comes from its address.
		"MAX_CONNS_PER_IP": "0",
	})
	for k, v := range cfg.env {
		f.env[k] = v
	}
	for i := 0; i < nSlots; i++ {
		f.slots = append(f.slots, "127.0.0.1:"+strconv.Itoa(ports[i]))
	}
	f.reps = make([]*service, nSlots)
	f.cls = make([]*client, nSlots)
	for i := 0; i < cfg.replicas; i++ {
		f.start(i)
	}
	if cfg.haproxy {
		f.lb = startHAProxy(t, f.slots)
		for i := 0; i < cfg.replicas; i++ {
			f.lb.WaitStatus(i, "UP", 10*time.Second)
		}
	}
	return f
}

// start starts a replica on a free slot and waits until it is ready.
func (f *fleet) start(slot int) *service {
	f.t.Helper()
	if f.reps[slot] != nil && !f.reps[slot].Exited() {
		f.t.Fatalf("slot %d (%s) is taken by pid %d", slot, f.slots[slot], f.reps[slot].PID())
	}
	env := withStore(f.env, map[string]string{"ADDR": f.slots[slot]})
	svc, c := startReadyService(f.t, env)
	f.reps[slot], f.cls[slot] = svc, c
	return svc
}

// client returns the client of slot's replica.
func (f *fleet) client(slot int) *client { return f.cls[slot] }

// dbReader returns a client of one more process on the fleet's database
// with both in-process caches off and no Redis, the configuration the
// README gives for replicas without shared caches: every read it answers
// comes from PostgreSQL. The tests whose guarantee is not cache coherence
// read their final state through it, so that what they check is the
// database itself.
func (f *fleet) dbReader() *client {
	f.t.Helper()
	if f.dbr == nil {
		_, f.dbr = startReadyService(f.t, withStore(f.store, map[string]string{"CACHE_MEMORY": "0", "REDIS_URL": ""}))
	}
	return f.dbr
}

// findings collects failed checks made on many goroutines: a count and
// the first few descriptions.
type findings struct {
	mu    sync.Mutex
	n     int
	descs []string
}

func (f *findings) add(format string, args ...any) {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.n++
	if len(f.descs) < 10 {
		f.descs = append(f.descs, fmt.Sprintf(format, args...))
	}
}

func (f *findings) count() int {
	f.mu.Lock()
	defer f.mu.Unlock()
	return f.n
}

// report fails t with what was found, if anything.
func (f *findings) report(t *testing.T, what string) {
	t.Helper()
	f.mu.Lock()
	defer f.mu.Unlock()
	if f.n == 0 {
		return
	}
	t.Errorf("%d %s; the first ones:\n\t%s", f.n, what, strings.Join(f.descs, "\n\t"))
}

// storeMax raises a to v if v is higher.
func storeMax(a *atomic.Int64, v int64) {
	for {
		old := a.Load()
		if v <= old || a.CompareAndSwap(old, v) {
			return
		}
	}
}

// decodeProduct parses a product body.
func decodeProduct(r *response) (product, error) {
	var p product
	if err := json.Unmarshal(r.Body, &p); err != nil || p.ID <= 0 {
		return product{}, fmt.Errorf("not a product: %s (%v)", r, err)
	}
	return p, nil
}

// patchPrice sets id's price with a merge patch.
func patchPrice(ctx context.Context, c *client, id, price int64) (*response, error) {
	return c.do(ctx, http.MethodPatch, "/products/"+strconv.FormatInt(id, 10),
		[]byte(fmt.Sprintf(`{"price_cents":%d}`, price)), http.Header{"Content-Type": {"application/merge-patch+json"}})
}

// adjustStock posts a stock adjustment, with an Idempotency-Key unless key
// is empty.
func adjustStock(ctx context.Context, c *client, id, delta int64, key string) (*response, error) {
	var hdr http.Header
	if key != "" {
		hdr = http.Header{"Idempotency-Key": {key}}
	}
	return c.do(ctx, http.MethodPost, "/products/"+strconv.FormatInt(id, 10)+"/stock/adjustments",
		[]byte(fmt.Sprintf(`{"delta":%d}`, delta)), hdr)
}

// createKeyed posts a create with an Idempotency-Key.
func createKeyed(ctx context.Context, c *client, body []byte, key string) (*response, error) {
	return c.do(ctx, http.MethodPost, "/products", body, http.Header{"Idempotency-Key": {key}})
}

// listCategory returns every product of category, walking the pages.
func listCategory(ctx context.Context, c *client, category string) ([]product, error) {
	return listQuery(ctx, c, "limit=100&category="+url.QueryEscape(category), 100)
}

// localCacheHits scrapes local_cache_requests_total{result="hit"}.
func localCacheHits(t *testing.T, c *client) float64 {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	text, err := scrapeMetrics(ctx, c)
	if err != nil {
		t.Fatalf("scrape %s/metrics: %v", c.base, err)
	}
	v, _ := metricSum(text, "local_cache_requests_total", map[string]string{"result": "hit"})
	return v
}

// freshness checks reads at replicas against the versions acknowledged to
// writers: acked[i] is the highest version of ids[i] any writer was told.
// A read that started after an acknowledgement must return that version or
// a newer one, by id and inside a listing.
type freshness struct {
	f     *fleet
	cat   string
	ids   []int64
	index map[int64]int
	acked []atomic.Int64

	reads  atomic.Int64 // product versions checked
	stale  findings     // a version below the acknowledged one
	failed findings     // an error or a status other than 200
	slow   findings     // a request over budget (when budget > 0)
	budget time.Duration
	maxLat atomic.Int64 // the slowest request, in nanoseconds
}

// took records a request's duration and whether it was over budget.
func (fr *freshness) took(d time.Duration, format string, args ...any) {
	storeMax(&fr.maxLat, int64(d))
	if fr.budget > 0 && d > fr.budget {
		fr.slow.add("%s took %v (budget %v)", fmt.Sprintf(format, args...), d.Round(time.Millisecond), fr.budget)
	}
}

func newFreshness(f *fleet, cat string, ps []product) *freshness {
	fr := &freshness{f: f, cat: cat, index: map[int64]int{}, acked: make([]atomic.Int64, len(ps))}
	for i, p := range ps {
		fr.ids = append(fr.ids, p.ID)
		fr.index[p.ID] = i
		fr.acked[i].Store(p.Version)
	}
	return fr
}

// write patches ids[i] at slot with a new price and records the version
// it was acknowledged at; it returns 0 if the write failed.
func (fr *freshness) write(slot, i int, price int64) int64 {
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	start := time.Now()
	r, err := patchPrice(ctx, fr.f.client(slot), fr.ids[i], price)
	d := time.Since(start)
	if err != nil || r.Status != http.StatusOK {
		fr.failed.add("PATCH /products/%d at replica %d: %v %v", fr.ids[i], slot, r, err)
		return 0
	}
	p, err := decodeProduct(r)
	if err != nil {
		fr.failed.add("PATCH /products/%d at replica %d: %v", fr.ids[i], slot, err)
		return 0
	}
	fr.took(d, "PATCH /products/%d at replica %d", fr.ids[i], slot)
	storeMax(&fr.acked[i], p.Version)
	return p.Version
}

// readID GETs ids[i] at slot and checks it against the versions
// acknowledged before the read started.
func (fr *freshness) readID(slot, i int, what string) {
	want := fr.acked[i].Load()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	start := time.Now()
	p, r, err := getProduct(ctx, fr.f.client(slot), fr.ids[i])
	d := time.Since(start)
	switch {
	case err != nil:
		fr.failed.add("%s: GET /products/%d at replica %d: %v", what, fr.ids[i], slot, err)
		return
	case r.Status != http.StatusOK:
		fr.failed.add("%s: GET /products/%d at replica %d: %s", what, fr.ids[i], slot, r)
		return
	}
	fr.reads.Add(1)
	fr.took(d, "%s: GET /products/%d at replica %d", what, fr.ids[i], slot)
	if p.Version < want {
		fr.stale.add("%s: GET /products/%d at replica %d answered version %d after version %d was acknowledged (request id %s)",
			what, fr.ids[i], slot, p.Version, want, r.Header.Get("X-Request-Id"))
	}
}

// readList lists the category at slot and checks every product in it.
func (fr *freshness) readList(slot int, what string) {
	want := make([]int64, len(fr.ids))
	for i := range fr.ids {
		want[i] = fr.acked[i].Load()
	}
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	start := time.Now()
	ps, err := listCategory(ctx, fr.f.client(slot), fr.cat)
	d := time.Since(start)
	if err != nil {
		fr.failed.add("%s: list at replica %d: %v", what, slot, err)
		return
	}
	fr.took(d, "%s: listing at replica %d", what, slot)
	seen := 0
	for _, p := range ps {
		i, ok := fr.index[p.ID]
		if !ok {
			continue
		}
		seen++
		fr.reads.Add(1)
		if p.Version < want[i] {
			fr.stale.add("%s: GET /products?category=%s at replica %d listed product %d at version %d after version %d was acknowledged",
				what, fr.cat, slot, p.ID, p.Version, want[i])
		}
	}
	if seen != len(fr.ids) {
		fr.failed.add("%s: the listing at replica %d has %d of the %d products", what, slot, seen, len(fr.ids))
	}
}

// warm reads every product and the listing at every running replica
// passes times, so that each replica holds them in memory and in Redis.
func (fr *freshness) warm(passes int, what string) {
	for pass := 0; pass < passes; pass++ {
		for slot, s := range fr.f.reps {
			if s == nil || s.Exited() {
				continue
			}
			for i := range fr.ids {
				fr.readID(slot, i, what)
			}
			fr.readList(slot, what)
		}
	}
}

// writeThenRead writes ids[i] at slot, then reads it by id and in the
// listing at every other running replica.
func (fr *freshness) writeThenRead(slot, i int, price int64, what string) {
	if fr.write(slot, i, price) == 0 {
		return
	}
	for other, s := range fr.f.reps {
		if other == slot || s == nil || s.Exited() {
			continue
		}
		fr.readID(other, i, what)
		fr.readList(other, what)
	}
}

// createProducts creates n products of category, round robin over the
// running replicas.
func createProducts(t *testing.T, f *fleet, prefix, category string, n int, stock int64) []product {
	t.Helper()
	var running []int
	for i, s := range f.reps {
		if s != nil {
			running = append(running, i)
		}
	}
	var ps []product
	for i := 0; i < n; i++ {
		c := f.client(running[i%len(running)])
		ps = append(ps, mustCreate(t, c, fmt.Sprintf("%s-%03d", prefix, i), prefix+" item", int64(1000+i),
			map[string]any{"category": category, "stock": stock}))
	}
	return ps
}

// TestFleetStaleReads writes at one replica and reads at the others: by
// id and in a listing, every read must return the acknowledged version or
// a newer one, though each replica had the products cached in memory and
// in Redis.
func TestFleetStaleReads(t *testing.T) {
	requireFleet(t)
	const (
		nProducts     = 12
		serialWrites  = 300
		concurrentFor = 4 * time.Second
	)
	f := startFleet(t, fleetConfig{replicas: 3})
	start := time.Now()
	ps := createProducts(t, f, "stale", "fleet-stale", nProducts, 10)
	fr := newFreshness(f, "fleet-stale", ps)

	// The products must really be cached, or the test proves nothing.
	var hits0 []float64
	for i := range f.reps {
		hits0 = append(hits0, localCacheHits(t, f.client(i)))
	}
	fr.warm(3, "warm-up")
	for i := range f.reps {
		if h := localCacheHits(t, f.client(i)); h <= hits0[i] {
			t.Fatalf("replica %d: local_cache_requests_total{result=\"hit\"} did not grow over three passes of reads (%v -> %v): its in-process cache is not used", i, hits0[i], h)
		}
	}
	fr.failed.report(t, "failed requests during warm-up")
	if t.Failed() {
		t.FailNow()
	}
	warmReads := fr.reads.Load()

	// Serial: each write, then a read of it at every other replica.
	deadline := time.Now().Add(90 * time.Second)
	writes := 0
	for w := 0; w < serialWrites && time.Now().Before(deadline); w++ {
		fr.writeThenRead(w%3, w%nProducts, int64(5000+w), fmt.Sprintf("serial write %d", w))
		writes++
	}
	serialReads, serialStale := fr.reads.Load()-warmReads, fr.stale.count()

	// Concurrent: one writer per replica, one reader per replica, each
	// read checked against the acknowledgements made before it started.
	stop := make(chan struct{})
	var wg sync.WaitGroup
	var cwrites atomic.Int64
	for slot := 0; slot < 3; slot++ {
		wg.Add(2)
		go func(slot int) {
			defer wg.Done()
			rng := rand.New(rand.NewPCG(uint64(slot), 1))
			for n := 0; n < 20000; n++ {
				select {
				case <-stop:
					return
				default:
				}
				if fr.write(slot, rng.IntN(nProducts), 10000+rng.Int64N(1_000_000)) > 0 {
					cwrites.Add(1)
				}
			}
		}(slot)
		go func(slot int) {
			defer wg.Done()
			rng := rand.New(rand.NewPCG(uint64(slot), 2))
			for n := 0; n < 50000; n++ {
				select {
				case <-stop:
					return
				default:
				}
				if n%5 == 4 {
					fr.readList(slot, "concurrent")
				} else {
					fr.readID(slot, rng.IntN(nProducts), "concurrent")
				}
			}
		}(slot)
	}
	time.Sleep(concurrentFor) // a fixed window of load, not a wait for a condition
	close(stop)
	wg.Wait()

	t.Logf("RESULT replicas=3 products=%d serial writes=%d reads checked=%d stale=%d; concurrent writes=%d reads checked=%d stale=%d; in %v",
		nProducts, writes, serialReads, serialStale, cwrites.Load(), fr.reads.Load()-warmReads-serialReads, fr.stale.count()-serialStale,
		time.Since(start).Round(time.Millisecond))
	fr.failed.report(t, "failed requests")
	fr.stale.report(t, "stale reads (a replica answered an older version than one acknowledged before the read)")
}

// checkEveryReplica fails t unless every running replica answers want's
// stock and version for it.
func checkEveryReplica(t *testing.T, f *fleet, want product) {
	t.Helper()
	for slot, s := range f.reps {
		if s == nil || s.Exited() {
			continue
		}
		p, r, err := getProduct(context.Background(), f.client(slot), want.ID)
		if err != nil || r.Status != http.StatusOK {
			t.Errorf("GET /products/%d at replica %d: %v %v", want.ID, slot, r, err)
			continue
		}
		if p.Stock != want.Stock || p.Version != want.Version {
			t.Errorf("GET /products/%d at replica %d: stock %d version %d, the database has stock %d version %d",
				want.ID, slot, p.Stock, p.Version, want.Stock, want.Version)
		}
	}
}

// TestFleetStockNoOversell drains a product's stock with concurrent
// adjustments at every replica: exactly the stock is sold, never more; and
// a mix of concurrent increments and decrements at two replicas loses none.
func TestFleetStockNoOversell(t *testing.T) {
	requireFleet(t)
	const (
		initial   = 200
		perSlot   = 6 // concurrent clients at each replica
		mixStock  = 100000
		mixWrites = 150 // per client
	)
	f := startFleet(t, fleetConfig{replicas: 3})
	start := time.Now()
	p := mustCreate(t, f.client(0), "oversell-1", "scarce item", 999, map[string]any{"category": "fleet-oversell", "stock": initial})

	var (
		mu        sync.Mutex
		successes int
		refusals  int
		negative  int
		stocks    = map[int64]int{}
		versions  = map[int64]int{}
		bad       findings
	)
	ready := make(chan struct{})
	var wg sync.WaitGroup
	for slot := 0; slot < 3; slot++ {
		for g := 0; g < perSlot; g++ {
			wg.Add(1)
			go func(c *client, slot int) {
				defer wg.Done()
				<-ready
				// Bounded: every client stops at its first refusal, which
				// must come within initial+1 requests.
				for n := 0; n <= initial; n++ {
					ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
					r, err := adjustStock(ctx, c, p.ID, -1, "")
					cancel()
					if err != nil {
						bad.add("replica %d: adjust -1: %v", slot, err)
						return
					}
					switch r.Status {
					case http.StatusOK:
						q, err := decodeProduct(r)
						if err != nil {
							bad.add("replica %d: adjust -1: %v", slot, err)
							return
						}
						mu.Lock()
						successes++
						stocks[q.Stock]++
						versions[q.Version]++
						if q.Stock < 0 {
							negative++
						}
						mu.Unlock()
					case http.StatusConflict:
						if d := checkProblem(r, http.StatusConflict); d != "" || !strings.Contains(string(r.Body), `"/problems/insufficient-stock"`) {
							bad.add("replica %d: refusal is not an insufficient-stock problem: %s %s", slot, d, r)
						}
						mu.Lock()
						refusals++
						mu.Unlock()
						return
					default:
						bad.add("replica %d: adjust -1: %s, want 200 or 409", slot, r)
						return
					}
				}
				bad.add("replica %d: no refusal after %d successful -1 adjustments of a stock of %d", slot, initial+1, initial)
			}(f.client(slot), slot)
		}
	}
	close(ready)
	wg.Wait()
	drainTook := time.Since(start)

	if successes != initial {
		t.Errorf("%d adjustments of -1 succeeded on a stock of %d, want exactly %d (oversold or refused too early)", successes, initial, initial)
	}
	if negative > 0 {
		t.Errorf("%d acknowledged adjustments showed a negative stock", negative)
	}
	// Each success took the stock one lower: every stock from initial-1 to
	// 0 answered once, and every version from 2 to initial+1.
	for s := int64(0); s < initial; s++ {
		if stocks[s] != 1 {
			t.Errorf("stock %d was answered by %d acknowledged adjustments, want 1 (a lost or doubled update)", s, stocks[s])
			break
		}
	}
	for v := int64(2); v <= initial+1; v++ {
		if versions[v] != 1 {
			t.Errorf("version %d was answered by %d acknowledged adjustments, want 1", v, versions[v])
			break
		}
	}
	bad.report(t, "unexpected answers while draining")
	final, r, err := getProduct(context.Background(), f.dbReader(), p.ID)
	if err != nil || r.Status != http.StatusOK {
		t.Fatalf("final GET /products/%d: %v %v", p.ID, r, err)
	}
	if final.Stock != 0 || final.Version != initial+1 {
		t.Errorf("final product %d: stock %d version %d, want stock 0 version %d", p.ID, final.Stock, final.Version, initial+1)
	}
	checkEveryReplica(t, f, final)

	// Mixed: random deltas of both signs at two replicas; the final stock
	// is the initial one plus every acknowledged delta.
	q := mustCreate(t, f.client(1), "oversell-2", "busy item", 999, map[string]any{"category": "fleet-oversell", "stock": mixStock})
	var sum, acked, refused atomic.Int64
	var mixBad findings
	mixStart := time.Now()
	for _, slot := range []int{1, 2} {
		for g := 0; g < perSlot; g++ {
			wg.Add(1)
			go func(c *client, seed uint64) {
				defer wg.Done()
				rng := rand.New(rand.NewPCG(seed, 3))
				for n := 0; n < mixWrites; n++ {
					d := 1 + rng.Int64N(9)
					if rng.IntN(2) == 0 {
						d = -d
					}
					ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
					r, err := adjustStock(ctx, c, q.ID, d, "")
					cancel()
					switch {
					case err != nil:
						// The outcome is unknown, which the sum cannot allow.
						mixBad.add("adjust %+d at %s: %v", d, c.base, err)
					case r.Status == http.StatusOK:
						acked.Add(1)
						sum.Add(d)
					case r.Status == http.StatusConflict:
						refused.Add(1)
					default:
						mixBad.add("adjust %+d at %s: %s", d, c.base, r)
					}
				}
			}(f.client(slot), uint64(slot*100+g))
		}
	}
	wg.Wait()
	mixTook := time.Since(mixStart)
	mixBad.report(t, "unexpected answers in the mixed phase")
	qf, r, err := getProduct(context.Background(), f.dbReader(), q.ID)
	if err != nil || r.Status != http.StatusOK {
		t.Fatalf("final GET /products/%d: %v %v", q.ID, r, err)
	}
	if want := mixStock + sum.Load(); qf.Stock != want {
		t.Errorf("product %d: final stock %d, want %d = %d + the sum of %d acknowledged deltas (%+d): a lost or doubled update",
			q.ID, qf.Stock, want, mixStock, acked.Load(), sum.Load())
	}
	if want := 1 + acked.Load(); qf.Version != want {
		t.Errorf("product %d: final version %d, want %d (1 + acknowledged adjustments)", q.ID, qf.Version, want)
	}
	checkEveryReplica(t, f, qf)
	t.Logf("RESULT drain: stock=%d replicas=3 clients=%d successes=%d refusals=%d negative=%d final stock=%d version=%d in %v; mixed: replicas=2 clients=%d acknowledged=%d refused=%d sum=%+d final stock=%d (want %d) in %v",
		initial, 3*perSlot, successes, refusals, negative, final.Stock, final.Version, drainTook.Round(time.Millisecond),
		2*perSlot, acked.Load(), refused.Load(), sum.Load(), qf.Stock, mixStock+sum.Load(), mixTook.Round(time.Millisecond))
}

// TestFleetIdempotencyAcrossReplicas sends one create with one
// Idempotency-Key to two replicas at the same instant, round after round:
// the product must be created once, and both answers must be the same
// 201 (one of them a replay), as must a later retry at the third replica.
func TestFleetIdempotencyAcrossReplicas(t *testing.T) {
	requireFleet(t)
	const rounds = 150
	f := startFleet(t, fleetConfig{replicas: 3})
	start := time.Now()
	var (
		replays, retried int
		won              = map[int]int{}
		statuses         = map[int]int{}
		bad              findings
	)
	runID := strconv.FormatInt(time.Now().UnixNano(), 36)
	want := map[string]int64{} // sku -> id
	deadline := time.Now().Add(90 * time.Second)
	played := 0
	for round := 0; round < rounds && time.Now().Before(deadline); round++ {
		played++
		slots := [3]int{round % 3, (round + 1) % 3, (round + 2) % 3}
		sku := fmt.Sprintf("idem-%04d", round)
		key := fmt.Sprintf("fleet-%s-%04d", runID, round)
		body := createBody(sku, "idempotent item", int64(100+round), map[string]any{"category": "fleet-idem", "stock": 5})
		var res [2]*response
		var errs [2]error
		ready := make(chan struct{})
		var wg sync.WaitGroup
		for k := 0; k < 2; k++ {
			c := f.client(slots[k])
			req, err := c.newRequest(context.Background(), http.MethodPost, "/products", body, http.Header{"Idempotency-Key": {key}})
			if err != nil {
				t.Fatal(err)
			}
			wg.Add(1)
			go func(k int) {
				defer wg.Done()
				<-ready
				res[k], errs[k] = c.send(req)
			}(k)
		}
		close(ready)
		wg.Wait()
		var ids [2]int64
		var prods [2]product
		ok := true
		for k := 0; k < 2; k++ {
			if errs[k] != nil {
				bad.add("round %d: POST at replica %d: %v", round, slots[k], errs[k])
				ok = false
				continue
			}
			statuses[res[k].Status]++
			if res[k].Status != http.StatusCreated {
				bad.add("round %d: POST at replica %d: %s, want 201 (first or replayed)", round, slots[k], res[k])
				ok = false
				continue
			}
			p, err := decodeProduct(res[k])
			if err != nil {
				bad.add("round %d: POST at replica %d: %v", round, slots[k], err)
				ok = false
				continue
			}
			ids[k], prods[k] = p.ID, p
		}
		if !ok {
			continue
		}
		r0, r1 := res[0].Header.Get("Idempotency-Replayed") == "true", res[1].Header.Get("Idempotency-Replayed") == "true"
		switch {
		case r0 == r1:
			bad.add("round %d: Idempotency-Replayed %v at replica %d and %v at replica %d, want exactly one replay", round, r0, slots[0], r1, slots[1])
		case r0:
			replays++
			won[slots[1]]++
		default:
			replays++
			won[slots[0]]++
		}
		if d := diffProduct(prods[0], prods[1]); d != "" {
			bad.add("round %d: the two answers differ (-replica %d +replica %d):\n%s", round, slots[0], slots[1], d)
		}
		want[sku] = ids[0]

		// A retry later, at the third replica, is a replay too.
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		r, err := createKeyed(ctx, f.client(slots[2]), body, key)
		cancel()
		if err != nil || r.Status != http.StatusCreated || r.Header.Get("Idempotency-Replayed") != "true" {
			bad.add("round %d: retry at replica %d: %v %v, want a 201 replay", round, slots[2], r, err)
			continue
		}
		if p, err := decodeProduct(r); err != nil || p.ID != ids[0] {
			bad.add("round %d: retry at replica %d named product %d, want %d (%v)", round, slots[2], p.ID, ids[0], err)
		}
		retried++
	}

	// The database holds exactly one product per round.
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	all, err := listCategory(ctx, f.dbReader(), "fleet-idem")
	if err != nil {
		t.Fatalf("list: %v", err)
	}
	perSKU := map[string]int{}
	for _, p := range all {
		perSKU[p.SKU]++
		if id, ok := want[p.SKU]; ok && id != p.ID {
			bad.add("sku %s: stored as product %d, the answers named %d", p.SKU, p.ID, id)
		}
	}
	dups := 0
	for sku, n := range perSKU {
		if n != 1 {
			dups++
			bad.add("sku %s: %d products", sku, n)
		}
	}
	if len(perSKU) != played {
		bad.add("%d skus stored after %d rounds, want one per round", len(perSKU), played)
	}
	var wonBy []string
	for _, s := range []int{0, 1, 2} {
		wonBy = append(wonBy, fmt.Sprintf("%d:%d", s, won[s]))
	}
	var codes []string
	for code, n := range statuses {
		codes = append(codes, fmt.Sprintf("%d:%d", code, n))
	}
	sort.Strings(codes)
	t.Logf("RESULT rounds=%d concurrent pairs answered %v; replays=%d (first applied at replica %s) conflicts=%d; later retries replayed=%d; products stored=%d duplicates=%d in %v",
		played, codes, replays, strings.Join(wonBy, " "), statuses[http.StatusConflict], retried, len(all), dups, time.Since(start).Round(time.Millisecond))
	bad.report(t, "idempotency violations")
}
