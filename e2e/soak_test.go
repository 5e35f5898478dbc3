package e2e

import (
	"context"
	"encoding/json"
	"fmt"
	"math/rand/v2"
	"net/http"
	"strconv"
	"sync"
	"sync/atomic"
	"testing"
	"time"
)

// soakStats counts one run of soak load.
type soakStats struct {
	mu        sync.Mutex
	ok, bad   int
	dropped   int // ticks that found every worker busy
	byKind    map[string]int
	failDescs []string
	lat       latencies
}

func (s *soakStats) fail(format string, args ...any) {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.bad++
	if len(s.failDescs) < 20 {
		s.failDescs = append(s.failDescs, fmt.Sprintf(format, args...))
	}
}

// runSoakLoad sends rate requests per second for d: 80% GET by id, 10%
// list, 10% writes. A ticker paces a bounded worker pool; when every
// worker is busy the request is dropped and counted, not queued.
func runSoakLoad(c *client, ids []int64, d time.Duration, rate, workers int, seed uint64) *soakStats {
	st := &soakStats{byKind: map[string]int{}}
	jobs := make(chan uint64, workers)
	var wg sync.WaitGroup
	var createSeq atomic.Int64
	for w := 0; w < workers; w++ {
		wg.Add(1)
		go func(w int) {
			defer wg.Done()
			for j := range jobs {
				soakRequest(c, ids, st, rand.New(rand.NewPCG(seed, j)), &createSeq, seed)
			}
		}(w)
	}
	start := time.Now()
	tick := time.NewTicker(10 * time.Millisecond)
	defer tick.Stop()
	var sent uint64
	maxTicks := int(d/(10*time.Millisecond)) + 10
	for i := 0; i < maxTicks; i++ {
		<-tick.C
		el := time.Since(start)
		if el >= d {
			break
		}
		due := uint64(el.Seconds() * float64(rate))
		for ; sent < due; sent++ {
			select {
			case jobs <- sent:
			default:
				st.mu.Lock()
				st.dropped++
				st.mu.Unlock()
			}
		}
	}
	close(jobs)
	wg.Wait()
	return st
}

func soakRequest(c *client, ids []int64, st *soakStats, rng *rand.Rand, createSeq *atomic.Int64, seed uint64) {
	id := ids[rng.IntN(len(ids))]
	idPath := "/products/" + strconv.FormatInt(id, 10)
	var kind, method, path string
	var body []byte
	var hdr http.Header
	want := http.StatusOK
	switch n := rng.IntN(100); {
	case n < 80:
		kind, method, path = "get", http.MethodGet, idPath
	case n < 90:
		kind, method = "list", http.MethodGet
		path = []string{"/products?limit=20", "/products?limit=10&sort=-price_cents", "/products?category=soak&limit=5", "/products?in_stock=true&limit=10&sort=name"}[rng.IntN(4)]
	case n < 95:
		kind, method, path = "patch", http.MethodPatch, idPath
		body = []byte(fmt.Sprintf(`{"price_cents":%d}`, rng.IntN(1_000_000)))
		hdr = http.Header{"Content-Type": {"application/merge-patch+json"}}
	case n < 99:
		kind, method, path = "adjust", http.MethodPost, idPath+"/stock/adjustments"
		body = []byte(`{"delta":1}`)
	default:
		kind, method, path = "create", http.MethodPost, "/products"
		k := createSeq.Add(1)
		body = createBody(fmt.Sprintf("soak-%d-%06d", seed, k), "soak new", int64(k), map[string]any{"category": "soak"})
		want = http.StatusCreated
	}
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	start := time.Now()
	r, err := c.do(ctx, method, path, body, hdr)
	st.lat.add(time.Since(start))
	switch {
	case err != nil:
		st.fail("%s %s: %v", method, path, err)
	case r.Status != want:
		st.fail("%s %s: %s, want %d", method, path, r, want)
	case !json.Valid(r.Body):
		st.fail("%s %s: body is not JSON: %q", method, path, r.Body)
	default:
		st.mu.Lock()
		st.ok++
		st.byKind[kind]++
		st.mu.Unlock()
	}
}

// goroutines scrapes go_goroutines from /metrics.
func goroutines(t testing.TB, c *client) int {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	text, err := scrapeMetrics(ctx, c)
	if err != nil {
		t.Fatalf("scrape /metrics: %v", err)
	}
	v, ok := metricSum(text, "go_goroutines", nil)
	if !ok {
		t.Fatalf("/metrics has no go_goroutines sample (the Go collector is not registered)")
	}
	return int(v)
}

func TestSoak(t *testing.T) {
	d := envDuration(t, "E2E_SOAK_DURATION", 60*time.Second)
	const (
		rate    = 300
		workers = 48
		warmup  = 5 * time.Second
	)
	svc, c := startReadyService(t, nil)
	var ids []int64
	for i := 0; i < 200; i++ {
		ids = append(ids, mustCreate(t, c, fmt.Sprintf("soak-seed-%03d", i), fmt.Sprintf("soak item %d", i), int64(100+i),
			map[string]any{"category": "soak", "stock": 10, "description": "steady state"}).ID)
	}
	loadClient := newClient(svc.BaseURL, testToken)
	defer loadClient.Close()

	warm := runSoakLoad(loadClient, ids, warmup, rate, workers, 1)
	if warm.bad > 0 {
		t.Errorf("warm-up: %d failed requests, first: %v", warm.bad, warm.failDescs)
	}

	// Baseline once the goroutine count has settled after the warm-up. The
	// load client's idle keep-alive connections are closed first (here and
	// after the load) so that connection goroutines do not count.
	loadClient.Close()
	var g0 int
	prev := -1
	pollUntil(5*time.Second, 250*time.Millisecond, func() bool {
		g0 = goroutines(t, c)
		same := g0 == prev
		prev = g0
		return same
	})
	rss0, err := svc.RSS()
	if err != nil {
		t.Fatalf("read RSS: %v", err)
	}

	st := runSoakLoad(loadClient, ids, d, rate, workers, 2)
	total := st.ok + st.bad
	achieved := float64(total) / d.Seconds()
	_, p50, p99, mx := st.lat.summary()

	loadClient.Close()
	rssLimit := max(rss0+25<<20, rss0+rss0/2)
	gLimit := g0 + 10
	var rss1 int64
	var g1 int
	settleStart := time.Now()
	settled := pollUntil(10*time.Second, 250*time.Millisecond, func() bool {
		g1 = goroutines(t, c)
		rss1, err = svc.RSS()
		return err == nil && g1 <= gLimit && rss1 <= rssLimit
	})
	settle := time.Since(settleStart)

	success := 100.0
	if total > 0 {
		success = 100 * float64(st.ok) / float64(total)
	}
	t.Logf("RESULT soak %v at %d req/s target: sent=%d (dropped at the pool: %d) achieved=%.1f req/s success=%.3f%% (%d ok, %d failed) by kind=%v latency p50=%v p99=%v max=%v",
		d, rate, total, st.dropped, achieved, success, st.ok, st.bad, st.byKind,
		p50.Round(100*time.Microsecond), p99.Round(100*time.Microsecond), mx.Round(time.Millisecond))
	t.Logf("RESULT RSS before=%.1f MiB after=%.1f MiB (limit %.1f MiB); goroutines before=%d after=%d (limit %d); settled in %v",
		float64(rss0)/(1<<20), float64(rss1)/(1<<20), float64(rssLimit)/(1<<20), g0, g1, gLimit, settle.Round(time.Millisecond))

	for _, f := range st.failDescs {
		t.Errorf("failed request: %s", f)
	}
	if st.bad > 0 {
		t.Errorf("%d of %d requests failed, want 100%% success", st.bad, total)
	}
	if achieved < 0.9*rate {
		t.Errorf("achieved %.1f req/s, want at least 90%% of %d (the load generator or the service could not keep up; %d dropped)", achieved, rate, st.dropped)
	}
	if !settled {
		if rss1 > rssLimit {
			t.Errorf("RSS after soak %d bytes > limit %d (baseline %d + max(25 MiB, 50%%))", rss1, rssLimit, rss0)
		}
		if g1 > gLimit {
			t.Errorf("goroutines after soak %d > baseline %d + 10", g1, g0)
		}
	}
}
