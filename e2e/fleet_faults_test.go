package e2e

import (
	"context"
	"fmt"
	"maps"
	"math/rand/v2"
	"net/http"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"productsvc/internal/pgtest"
)

// The fleet under faults: a replica killed, replicas replaced one by one,
// PostgreSQL and Redis stopped and restarted under load.

// fleetLedger records what clients were told about their writes: keyed
// creates of new products, and keyed +1 adjustments of counter products.
// Every write carries an Idempotency-Key, so one whose outcome is unknown
// can be sent again later with the same key and body (resolve): it is then
// applied exactly once, whatever happened the first time.
type fleetLedger struct {
	prefix   string // sku prefix and category of the creates
	runID    string // makes the Idempotency-Keys unique to the run
	seq      atomic.Int64
	mu       sync.Mutex
	creates  map[string]*ledgerWrite // by sku
	adjusts  []*ledgerWrite
	counters map[int64]product // as created
	ctrIDs   []int64
}

// ledgerWrite is one write and what its client knows of it.
type ledgerWrite struct {
	path, key string
	body      []byte
	id        int64 // the product adjusted; for a create, set once acknowledged
	state     outcome
	ack       product // when state == outAcked
}

func newFleetLedger(prefix string, counters []product) *fleetLedger {
	l := &fleetLedger{
		prefix:   prefix,
		runID:    strconv.FormatInt(time.Now().UnixNano(), 36),
		creates:  map[string]*ledgerWrite{},
		counters: map[int64]product{},
	}
	for _, p := range counters {
		l.counters[p.ID] = p
		l.ctrIDs = append(l.ctrIDs, p.ID)
	}
	return l
}

// classify maps an answer to a write to what the client knows: a 2xx is
// acknowledged; a transport error or a 5xx (the service's 503, or HAProxy's
// 502/503/504) leaves the outcome unknown — on PostgreSQL a commit whose
// reply was lost may have applied; any other status is a definite refusal.
func classify(r *response, err error) outcome {
	switch {
	case err != nil:
		return outUnknown
	case r.Status >= 200 && r.Status < 300:
		return outAcked
	case r.Status >= 500:
		return outUnknown
	default:
		return outFailed
	}
}

// send sends w through c and records the outcome.
func (l *fleetLedger) send(c *client, w *ledgerWrite) (*response, error, outcome) {
	ctx, cancel := context.WithTimeout(context.Background(), 15*time.Second)
	defer cancel()
	r, err := c.do(ctx, http.MethodPost, w.path, w.body, http.Header{"Idempotency-Key": {w.key}})
	o := classify(r, err)
	var p product
	if o == outAcked {
		var derr error
		if p, derr = decodeProduct(r); derr != nil || (w.id != 0 && p.ID != w.id) {
			o = outUnknown
		}
	}
	l.mu.Lock()
	defer l.mu.Unlock()
	w.state = o
	if o == outAcked {
		w.ack, w.id = p, p.ID
	}
	return r, err, o
}

// create sends one keyed create through c.
func (l *fleetLedger) create(c *client) (*response, error, outcome) {
	sku := fmt.Sprintf("%s-%06d", l.prefix, l.seq.Add(1))
	w := &ledgerWrite{path: "/products", key: l.runID + "-" + sku,
		body: createBody(sku, "fleet item", 1234, map[string]any{"category": l.prefix, "stock": 3})}
	l.mu.Lock()
	l.creates[sku] = w
	l.mu.Unlock()
	return l.send(c, w)
}

// adjust sends one keyed +1 adjustment of a random counter through c.
func (l *fleetLedger) adjust(c *client, rng *rand.Rand) (*response, error, outcome) {
	id := l.ctrIDs[rng.IntN(len(l.ctrIDs))]
	w := &ledgerWrite{path: "/products/" + strconv.FormatInt(id, 10) + "/stock/adjustments",
		key: fmt.Sprintf("%s-adj-%06d", l.runID, l.seq.Add(1)), body: []byte(`{"delta":1}`), id: id}
	l.mu.Lock()
	l.adjusts = append(l.adjusts, w)
	l.mu.Unlock()
	return l.send(c, w)
}

// unknown returns the writes whose outcome is unknown.
func (l *fleetLedger) unknown() []*ledgerWrite {
	l.mu.Lock()
	defer l.mu.Unlock()
	var out []*ledgerWrite
	for _, w := range l.creates {
		if w.state == outUnknown {
			out = append(out, w)
		}
	}
	for _, w := range l.adjusts {
		if w.state == outUnknown {
			out = append(out, w)
		}
	}
	return out
}

// resolve sends every write whose outcome is unknown again through c,
// with its key and body, as a client retrying after an error would. The
// answer must be the write's success, first or replayed; resolve returns
// how many it resolved and a description of each that it could not.
func (l *fleetLedger) resolve(c *client) (resolved int, problems []string) {
	for _, w := range l.unknown() {
		r, err, o := l.send(c, w)
		if o != outAcked {
			problems = append(problems, fmt.Sprintf("retry of POST %s with Idempotency-Key %s: %v %v", w.path, w.key, r, err))
			continue
		}
		resolved++
	}
	return resolved, problems
}

// counts returns the writes by outcome.
func (l *fleetLedger) counts() (acked, unknown, failed int) {
	l.mu.Lock()
	defer l.mu.Unlock()
	for _, ws := range [][]*ledgerWrite{l.adjusts, slices.Collect(maps.Values(l.creates))} {
		for _, w := range ws {
			switch w.state {
			case outAcked:
				acked++
			case outUnknown:
				unknown++
			case outFailed:
				failed++
			}
		}
	}
	return acked, unknown, failed
}

// check reads every write the ledger knows of through c and returns how
// many products it checked and what does not match: an acknowledged
// create missing or older than acknowledged; a counter whose stock is
// below its acknowledged adjustments, or above those plus the ones whose
// outcome is unknown (exact once resolve has run), or whose version is
// below an acknowledged one; a product nobody asked for.
func (l *fleetLedger) check(c *client) (checked int, problems []string) {
	l.mu.Lock()
	defer l.mu.Unlock()
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	for sku, w := range l.creates {
		if w.state != outAcked {
			continue
		}
		p, r, err := getProduct(ctx, c, w.ack.ID)
		switch {
		case err != nil:
			problems = append(problems, fmt.Sprintf("GET /products/%d: %v", w.ack.ID, err))
		case r.Status != http.StatusOK:
			problems = append(problems, fmt.Sprintf("acknowledged create of %s (product %d) is gone: %s", sku, w.ack.ID, r))
		case p.SKU != sku || p.Version < w.ack.Version:
			problems = append(problems, fmt.Sprintf("acknowledged create of %s (product %d, version %d) reads as sku %s version %d", sku, w.ack.ID, w.ack.Version, p.SKU, p.Version))
		}
		checked++
	}
	type tally struct{ acked, unknown, version int64 }
	tallies := map[int64]*tally{}
	for id, p := range l.counters {
		tallies[id] = &tally{version: p.Version}
	}
	for _, w := range l.adjusts {
		switch tl := tallies[w.id]; w.state {
		case outAcked:
			tl.acked++
			tl.version = max(tl.version, w.ack.Version)
		case outUnknown:
			tl.unknown++
		}
	}
	for id, tl := range tallies {
		initial := l.counters[id].Stock
		p, r, err := getProduct(ctx, c, id)
		switch {
		case err != nil:
			problems = append(problems, fmt.Sprintf("GET /products/%d: %v", id, err))
		case r.Status != http.StatusOK:
			problems = append(problems, fmt.Sprintf("counter %d: %s", id, r))
		case p.Stock < initial+tl.acked || p.Stock > initial+tl.acked+tl.unknown:
			problems = append(problems, fmt.Sprintf("counter %d: stock %d, want %d to %d (initial %d + %d acknowledged + up to %d unknown)",
				id, p.Stock, initial+tl.acked, initial+tl.acked+tl.unknown, initial, tl.acked, tl.unknown))
		case p.Version < tl.version:
			problems = append(problems, fmt.Sprintf("counter %d: version %d, below the acknowledged %d", id, p.Version, tl.version))
		}
		checked++
	}
	all, err := listCategory(ctx, c, l.prefix)
	if err != nil {
		return checked, append(problems, err.Error())
	}
	for _, p := range all {
		if w, ok := l.creates[p.SKU]; !ok || w.state == outFailed {
			problems = append(problems, fmt.Sprintf("product %d sku %s exists, but no create of it was sent or it was refused", p.ID, p.SKU))
		}
	}
	return checked, problems
}

// TestFleetKillReplicaUnderLoad kills one of three replicas with -9 while
// writes flow through HAProxy: every acknowledged write must be in the
// database afterwards and read back at least as new at every surviving
// replica, and no write may apply twice, not even one the client sent
// again with its key after the kill left its outcome unknown.
func TestFleetKillReplicaUnderLoad(t *testing.T) {
	requireFleet(t)
	const (
		writers = 8
		before  = 1500 * time.Millisecond // of load before the kill
		after   = 1500 * time.Millisecond // and after it
		victim  = 1
	)
	f := startFleet(t, fleetConfig{replicas: 3, haproxy: true})
	lb := newClient(f.lb.URL, testToken)
	t.Cleanup(lb.Close)
	led := newFleetLedger("fleet-kill", createProducts(t, f, "kill-ctr", "fleet-kill-ctr", 8, 0))

	var unexpected findings
	stop := make(chan struct{})
	var wg sync.WaitGroup
	for w := 0; w < writers; w++ {
		wg.Add(1)
		go func(w int) {
			defer wg.Done()
			rng := rand.New(rand.NewPCG(uint64(w), 4))
			for n := 0; n < 5000; n++ {
				select {
				case <-stop:
					return
				default:
				}
				var r *response
				var o outcome
				if n%2 == 0 {
					r, _, o = led.create(lb)
				} else {
					r, _, o = led.adjust(lb, rng)
				}
				if o == outFailed {
					unexpected.add("%s", r)
				}
			}
		}(w)
	}
	time.Sleep(before) // a fixed window of load, not a wait for a condition
	f.reps[victim].Kill()
	downAfter := f.lb.WaitStatus(victim, "DOWN", 5*time.Second)
	time.Sleep(after)
	close(stop)
	wg.Wait()
	retries, redispatches := f.lb.Totals()

	unexpected.report(t, "writes refused with a 4xx")
	acked, unknown, _ := led.counts()
	if acked == 0 {
		t.Fatal("no write was acknowledged")
	}
	// A client retries what failed, with the same key: each such write is
	// then applied once, so the counters' stock must come out exact.
	resolved, rproblems := led.resolve(f.client(0))
	for _, p := range rproblems {
		t.Errorf("%s", p)
	}
	checked, problems := led.check(f.dbReader())
	for i, p := range problems {
		if i == 10 {
			t.Errorf("... and %d more", len(problems)-10)
			break
		}
		t.Errorf("lost or doubled write (database): %s", p)
	}
	// Through the surviving replicas too: whichever answers, nothing may
	// read older than acknowledged.
	var survivorChecked, survivorStale int
	for _, slot := range []int{0, 2} {
		n, stale := led.check(f.client(slot))
		survivorChecked += n
		survivorStale += len(stale)
		for i, p := range stale {
			if i == 5 {
				break
			}
			t.Errorf("surviving replica %d: %s", slot, p)
		}
	}
	t.Logf("RESULT writes acknowledged=%d unknown outcome=%d (in flight at the killed replica; %d applied once by the client's keyed retry) refused=%d; HAProxy retries=%d redispatches=%d; replica %d killed after %v, DOWN in HAProxy after %v; checked in the database=%d lost=%d; through the surviving replicas checked=%d stale=%d",
		acked, unknown, resolved, unexpected.count(), retries, redispatches, victim, before, downAfter.Round(time.Millisecond),
		checked, len(problems), survivorChecked, survivorStale)
}

// TestFleetRollingUpdate replaces each of three replicas behind HAProxy,
// one at a time, under a steady load of reads and writes: not one request
// may fail.
func TestFleetRollingUpdate(t *testing.T) {
	requireFleet(t)
	const (
		readers    = 3
		writers    = 2
		readEvery  = 4 * time.Millisecond
		writeEvery = 10 * time.Millisecond
		settle     = 500 * time.Millisecond // of load between steps
	)
	f := startFleet(t, fleetConfig{replicas: 3, spare: 1, haproxy: true})
	lb := newClient(f.lb.URL, testToken)
	t.Cleanup(lb.Close)
	seeded := createProducts(t, f, "roll", "fleet-roll-seed", 20, 0)
	led := newFleetLedger("fleet-roll", seeded)

	var reads, writes, patches atomic.Int64
	var failed findings
	stop := make(chan struct{})
	var wg sync.WaitGroup
	loop := func(every time.Duration, seed uint64, op func(rng *rand.Rand)) {
		defer wg.Done()
		rng := rand.New(rand.NewPCG(seed, 5))
		tick := time.NewTicker(every)
		defer tick.Stop()
		for n := 0; n < int(2*time.Minute/every); n++ {
			select {
			case <-stop:
				return
			case <-tick.C:
			}
			op(rng)
		}
	}
	for g := 0; g < readers; g++ {
		wg.Add(1)
		go loop(readEvery, uint64(g), func(rng *rand.Rand) {
			ctx, cancel := context.WithTimeout(context.Background(), 15*time.Second)
			defer cancel()
			path := "/products/" + strconv.FormatInt(seeded[rng.IntN(len(seeded))].ID, 10)
			if rng.IntN(5) == 0 {
				path = "/products?limit=50&category=fleet-roll-seed"
			}
			r, err := lb.do(ctx, http.MethodGet, path, nil, nil)
			reads.Add(1)
			if err != nil || r.Status != http.StatusOK {
				failed.add("%s GET %s: %v %v", time.Now().Format("15:04:05.000"), path, r, err)
			}
		})
	}
	for g := 0; g < writers; g++ {
		wg.Add(1)
		go loop(writeEvery, uint64(100+g), func(rng *rand.Rand) {
			var r *response
			var err error
			var o outcome
			switch rng.IntN(3) {
			case 0:
				r, err, o = led.create(lb)
			case 1:
				r, err, o = led.adjust(lb, rng)
			default:
				// Without a key: HAProxy never retries it, so only the
				// drain keeps it from failing.
				ctx, cancel := context.WithTimeout(context.Background(), 15*time.Second)
				r, err = patchPrice(ctx, lb, seeded[rng.IntN(len(seeded))].ID, 1+rng.Int64N(1_000_000))
				cancel()
				o = classify(r, err)
				patches.Add(1)
			}
			writes.Add(1)
			if o != outAcked {
				failed.add("%s write: %v %v", time.Now().Format("15:04:05.000"), r, err)
			}
		})
	}
	stopLoad := func() {
		select {
		case <-stop:
		default:
			close(stop)
		}
		wg.Wait()
	}
	defer stopLoad()

	time.Sleep(settle) // a fixed window of load, not a wait for a condition
	start := time.Now()
	free := 3
	var steps []string
	for _, old := range []int{0, 1, 2} {
		stepStart := time.Now()
		f.start(free)
		ready := time.Since(stepStart)
		up := f.lb.WaitStatus(free, "UP", 10*time.Second)
		termAt := time.Now()
		if err := f.reps[old].Signal(syscall.SIGTERM); err != nil {
			t.Fatalf("SIGTERM replica %d: %v", old, err)
		}
		code, ok := f.reps[old].Wait(fleetShutdownDelay + 15*time.Second)
		if !ok {
			t.Fatalf("replica %d (pid %d) did not exit within %v of SIGTERM", old, f.reps[old].PID(), fleetShutdownDelay+15*time.Second)
		}
		exited := time.Since(termAt)
		if code != 0 {
			t.Errorf("replica %d exited with status %d after SIGTERM, want 0", old, code)
		}
		f.lb.WaitStatus(old, "DOWN", 5*time.Second)
		steps = append(steps, fmt.Sprintf("slot %d->%d ready %v UP %v exit %v", old, free,
			ready.Round(time.Millisecond), up.Round(time.Millisecond), exited.Round(time.Millisecond)))
		free = old
		time.Sleep(settle) // a fixed window of load, not a wait for a condition
	}
	took := time.Since(start)
	stopLoad()
	retries, redispatches := f.lb.Totals()

	failed.report(t, "failed requests during the rolling update (transport errors, 5xx or refusals)")
	checked, problems := led.check(f.dbReader())
	for i, p := range problems {
		if i == 10 {
			break
		}
		t.Errorf("lost write (database): %s", p)
	}
	stale := 0
	for slot, s := range f.reps {
		if s == nil || s.Exited() {
			continue
		}
		_, ps := led.check(f.client(slot))
		stale += len(ps)
		for i, p := range ps {
			if i == 5 {
				break
			}
			t.Errorf("new replica on slot %d: %s", slot, p)
		}
	}
	acked, _, _ := led.counts()
	t.Logf("RESULT requests=%d (reads %d, writes %d: %d keyed acknowledged, %d unkeyed PATCHes) failed=%d; 3 replicas replaced in %v (%s); HAProxy retries=%d redispatches=%d; keyed writes checked in the database=%d lost=%d, at the new replicas stale=%d",
		reads.Load()+writes.Load(), reads.Load(), writes.Load(), acked, patches.Load(), failed.count(), took.Round(time.Millisecond),
		strings.Join(steps, "; "), retries, redispatches, checked, len(problems), stale)
}

// TestFleetPostgresRestart stops PostgreSQL under two replicas' load, once
// with a fast shutdown and once with an immediate one (a crash): while it
// is down every request is answered at once, with a 503 and Retry-After
// (or, where the service can vouch for it, a read from a cache), and no
// write is acknowledged; once it is back the fleet recovers by itself, no
// acknowledged write is lost and no read is older than one acknowledged
// before it. It runs on a server of its own, so no other test sees the
// outage.
func TestFleetPostgresRestart(t *testing.T) {
	requireFleet(t)
	const (
		dbTimeout = time.Second
		budget    = 2 * dbTimeout // for any answer while the database is away
		down      = 3 * time.Second
		recover   = 30 * time.Second
		workers   = 3 // per replica
		every     = 10 * time.Millisecond
	)
	pg, err := pgtest.Start()
	if err != nil {
		t.Fatalf("start a PostgreSQL server for this test: %v", err)
	}
	t.Cleanup(pg.Stop) // after the replicas are killed: cleanups run last-in first-out
	_, dbURL, err := pg.CreateDatabase(context.Background())
	if err != nil {
		t.Fatalf("create database: %v", err)
	}
	store := map[string]string{"DATABASE_URL": dbURL, "DB_PATH": filepath.Join(t.TempDir(), "unused.db")}
	f := startFleet(t, fleetConfig{replicas: 2, store: store, env: map[string]string{"DB_TIMEOUT": dbTimeout.String()}})
	seeded := createProducts(t, f, "pg", "fleet-pg-seed", 20, 0)
	led := newFleetLedger("fleet-pg", seeded)
	// The test's own probes write here, outside the ledger.
	probe := mustCreate(t, f.client(0), "pg-probe", "probe", 1, map[string]any{"category": "fleet-pg-probe"})
	for slot := range 2 { // cached, so that some reads can be answered during the outage
		for _, p := range seeded {
			if _, r, err := getProduct(context.Background(), f.client(slot), p.ID); err != nil || r.Status != http.StatusOK {
				t.Fatalf("warm-up GET /products/%d: %v %v", p.ID, r, err)
			}
		}
	}

	// The phase a request starts and ends in decides what it may answer.
	// Up (the fleet recovered) at both ends: it must succeed. Down
	// (PostgreSQL stopped, not yet restarted) at both ends: a read may be
	// answered from a cache, anything else is a quick 503 with
	// Retry-After, and a write can never be acknowledged. In between
	// (stopping, recovering): either, quickly.
	const (
		phUp = iota
		phStopping
		phDown
		phRecovering
	)
	var phase atomic.Int64 // phase%4 is one of the above
	// Reads are checked against the versions acknowledged before them, as
	// in TestFleetStaleReads, across the outages.
	ackedVersion := make([]atomic.Int64, len(seeded))
	index := map[int64]int{}
	for i, p := range seeded {
		index[p.ID] = i
		ackedVersion[i].Store(p.Version)
	}
	var stale findings
	var (
		mu        sync.Mutex
		byPhase   = map[string]map[string]int{} // "up", "down", "between" -> answer -> count
		maxAway   time.Duration
		failed    findings // a failure while up
		badOutage findings // a wrong answer while PostgreSQL was away
	)
	record := func(ph0 int64, write bool, what string, start time.Time, r *response, err error) {
		d := time.Since(start)
		ph1 := phase.Load()
		name := "between"
		switch {
		case ph0 == ph1 && ph0%4 == phUp:
			name = "up"
		case ph0 == ph1 && ph0%4 == phDown:
			name = "down"
		}
		answer := "error"
		if err == nil {
			answer = strconv.Itoa(r.Status)
		}
		mu.Lock()
		if byPhase[name] == nil {
			byPhase[name] = map[string]int{}
		}
		byPhase[name][answer]++
		if name != "up" {
			maxAway = max(maxAway, d)
		}
		mu.Unlock()
		switch {
		case name == "up":
			if err != nil || r.Status >= 300 {
				failed.add("%s %s (database up): %v %v", time.Now().Format("15:04:05.000"), what, r, err)
			}
		case err != nil:
			badOutage.add("%s (database %s): %v after %v", what, name, err, d.Round(time.Millisecond))
		case r.Status < 300:
			if write && name == "down" {
				badOutage.add("%s: acknowledged (%d) while PostgreSQL was down", what, r.Status)
			}
		case r.Status == http.StatusServiceUnavailable:
			if p := checkProblem(r, http.StatusServiceUnavailable); p != "" {
				badOutage.add("%s (database %s): %s", what, name, p)
			}
			if ra, err := strconv.Atoi(r.Header.Get("Retry-After")); err != nil || ra < 1 {
				badOutage.add("%s (database %s): 503 with Retry-After %q, want a number of seconds", what, name, r.Header.Get("Retry-After"))
			}
			if d > budget {
				badOutage.add("%s (database %s): 503 after %v, want under %v (2 x DB_TIMEOUT)", what, name, d.Round(time.Millisecond), budget)
			}
		default:
			badOutage.add("%s (database %s): %s, want 2xx or 503", what, name, r)
		}
	}
	stop := make(chan struct{})
	var wg sync.WaitGroup
	for slot := range 2 {
		for g := 0; g < workers; g++ {
			wg.Add(1)
			go func(c *client, seed uint64) {
				defer wg.Done()
				rng := rand.New(rand.NewPCG(seed, 6))
				tick := time.NewTicker(every)
				defer tick.Stop()
				for n := 0; n < int(2*time.Minute/every); n++ {
					select {
					case <-stop:
						return
					case <-tick.C:
					}
					ph0, start := phase.Load(), time.Now()
					switch k := rng.IntN(4); k {
					case 0, 1:
						i := rng.IntN(len(seeded))
						want := ackedVersion[i].Load()
						ctx, cancel := context.WithTimeout(context.Background(), 15*time.Second)
						p, r, err := getProduct(ctx, c, seeded[i].ID)
						cancel()
						what := fmt.Sprintf("GET /products/%d at %s", seeded[i].ID, c.base)
						record(ph0, false, what, start, r, err)
						if err == nil && r.Status == http.StatusOK && p.Version < want {
							stale.add("%s: version %d after version %d was acknowledged", what, p.Version, want)
						}
					case 2:
						r, err, _ := led.create(c)
						record(ph0, true, "create at "+c.base, start, r, err)
					case 3:
						r, err, o := led.adjust(c, rng)
						record(ph0, true, "adjust at "+c.base, start, r, err)
						if o == outAcked {
							if p, err := decodeProduct(r); err == nil {
								storeMax(&ackedVersion[index[p.ID]], p.Version)
							}
						}
					}
				}
			}(f.client(slot), uint64(slot*10+g))
		}
	}
	stopLoad := func() {
		select {
		case <-stop:
		default:
			close(stop)
		}
		wg.Wait()
	}
	defer stopLoad()

	type cycle struct {
		name string
		mode pgtest.ShutdownMode
	}
	var figures []string
	for _, cy := range []cycle{{"fast shutdown", pgtest.Fast}, {"immediate shutdown", pgtest.Immediate}} {
		time.Sleep(time.Second) // a fixed window of load with the database up
		// The phases advance stopping, down, recovering, up.
		phase.Add(1)
		if err := pg.Shutdown(cy.mode); err != nil {
			t.Fatalf("%s: %v", cy.name, err)
		}
		stoppedAt := time.Now()
		phase.Add(1)
		// Every replica must notice: a write there is refused.
		for slot := range 2 {
			if !pollUntil(10*time.Second, 50*time.Millisecond, func() bool {
				ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
				defer cancel()
				r, err := adjustStock(ctx, f.client(slot), probe.ID, 1, "")
				return err == nil && r.Status == http.StatusServiceUnavailable
			}) {
				t.Errorf("%s: replica %d still accepts writes 10s after PostgreSQL stopped", cy.name, slot)
			}
		}
		if rest := down - time.Since(stoppedAt); rest > 0 {
			time.Sleep(rest) // a fixed outage, not a wait for a condition
		}
		phase.Add(1)
		if err := pg.Restart(); err != nil {
			t.Fatalf("%s: restart PostgreSQL: %v", cy.name, err)
		}
		restartedAt := time.Now()
		// Recovered: every replica ready with both breakers closed and
		// taking writes, with no help from the test.
		var last string
		for slot := range 2 {
			if !pollUntil(recover-time.Since(restartedAt), 50*time.Millisecond, func() bool {
				rb, r, err := getReady(f.client(slot))
				if err != nil || r.Status != http.StatusOK || rb.Checks.Breaker.State != "closed" {
					last = fmt.Sprintf("/ready: %v %v", r, err)
					return false
				}
				ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
				defer cancel()
				r, err = adjustStock(ctx, f.client(slot), probe.ID, 1, "")
				last = fmt.Sprintf("write: %v %v", r, err)
				return err == nil && r.Status == http.StatusOK
			}) {
				t.Fatalf("%s: replica %d not recovered %v after PostgreSQL restarted; last %s", cy.name, slot, recover, last)
			}
		}
		recovered := time.Since(restartedAt)
		phase.Add(1)
		figures = append(figures, fmt.Sprintf("%s: down %v, recovered %v after restart", cy.name,
			restartedAt.Sub(stoppedAt).Round(time.Millisecond), recovered.Round(time.Millisecond)))
	}
	time.Sleep(time.Second) // a fixed window of load after the last recovery
	stopLoad()

	failed.report(t, "failed requests while PostgreSQL was up")
	badOutage.report(t, "wrong answers while PostgreSQL was stopping, down or recovering")
	acked, unknown, _ := led.counts()
	// Each write refused during the outage, sent again with its key, is
	// applied once: the counters' stock must then come out exact.
	resolved, rproblems := led.resolve(f.client(0))
	for i, p := range rproblems {
		if i == 10 {
			break
		}
		t.Errorf("%s", p)
	}
	checked, problems := led.check(f.dbReader())
	for i, p := range problems {
		if i == 10 {
			break
		}
		t.Errorf("lost write (database): %s", p)
	}
	for slot := range 2 {
		_, ps := led.check(f.client(slot))
		for _, p := range ps {
			stale.add("replica %d at the end: %s", slot, p)
		}
	}
	stale.report(t, "stale reads (a replica answered an older version than one acknowledged before the read)")
	mu.Lock()
	t.Logf("RESULT %s; answers while up %v, while down %v, while stopping or recovering %v (slowest away from up %v, budget %v); writes acknowledged=%d refused or unknown=%d (%d applied once by a keyed retry), checked in the database=%d lost=%d; stale reads=%d",
		strings.Join(figures, "; "), byPhase["up"], byPhase["down"], byPhase["between"], maxAway.Round(time.Millisecond), budget, acked, unknown, resolved, checked, len(problems), stale.count())
	mu.Unlock()
}

// TestFleetRedisFaults writes at one replica and reads at the others while
// the shared Redis is paused, killed, and restarted from an old snapshot:
// requests keep succeeding within a bound set by REDIS_TIMEOUT, and no read
// returns a version older than one acknowledged before it.
func TestFleetRedisFaults(t *testing.T) {
	requireFleet(t)
	const (
		redisTimeout = 100 * time.Millisecond
		// A request makes at most two Redis calls, each bounded by
		// REDIS_TIMEOUT, besides its database work; the rest is margin for
		// a 2-core machine running everything.
		budget    = 2*redisTimeout + 500*time.Millisecond
		nProducts = 10
		rounds    = 30 // writes per phase
	)
	f := startFleet(t, fleetConfig{replicas: 3, spare: 1, env: map[string]string{"REDIS_TIMEOUT": redisTimeout.String()}})
	rds := f.redis
	ps := createProducts(t, f, "rf", "fleet-redis", nProducts, 10)
	fr := newFreshness(f, "fleet-redis", ps)
	fr.warm(3, "warm-up")
	fr.failed.report(t, "failed requests during warm-up")

	var figures []string
	phase := func(name string, fn func()) {
		fr.reads.Store(0)
		fr.maxLat.Store(0)
		fr.stale, fr.failed, fr.slow = findings{}, findings{}, findings{}
		fn()
		figures = append(figures, fmt.Sprintf("%s: reads=%d stale=%d failed=%d slowest=%v", name, fr.reads.Load(), fr.stale.count(), fr.failed.count(),
			time.Duration(fr.maxLat.Load()).Round(time.Millisecond)))
		fr.failed.report(t, name+": failed requests")
		fr.slow.report(t, name+": requests over budget")
		fr.stale.report(t, name+": stale reads (a replica answered an older version than one acknowledged before the read)")
	}
	writeRounds := func(what string, base int64) {
		for w := 0; w < rounds; w++ {
			fr.writeThenRead(w%3, w%nProducts, base+int64(w), what)
		}
	}
	// cacheUp waits until every replica's /ready shows Redis usable again.
	cacheUp := func(what string) {
		for slot, s := range f.reps {
			if s == nil || s.Exited() {
				continue
			}
			var last string
			if !pollUntil(15*time.Second, 50*time.Millisecond, func() bool {
				rb, r, err := getReady(f.client(slot))
				last = fmt.Sprintf("%v %v", r, err)
				return err == nil && rb.Checks.Cache.Status == "ok"
			}) {
				t.Errorf("%s: replica %d's /ready did not show the cache ok within 15s; last %s", what, slot, last)
			}
		}
	}

	fr.budget = budget
	phase("redis paused", func() {
		rds.Pause()
		defer rds.Resume()
		writeRounds("redis paused", 10000)
	})
	cacheUp("after SIGCONT")
	phase("after SIGCONT", func() { writeRounds("after SIGCONT", 20000) })

	phase("redis killed", func() {
		rds.Kill()
		writeRounds("redis killed", 30000)
	})
	rds.start() // empty, on the same port
	cacheUp("after restart")
	phase("after restart", func() { writeRounds("after restart", 40000) })

	fr.budget = 0
	phase("old snapshot", func() {
		fr.warm(2, "before SAVE") // the current versions into Redis
		if reply, err := redisCommand(rds.Addr, "SAVE"); err != nil || reply != "+OK" {
			t.Fatalf("redis SAVE: %q %v", reply, err)
		}
		saved, _ := redisDBSize(rds.Addr)
		// Newer versions of every product, read at every replica, so that
		// Redis holds them as the snapshot does not.
		for i := 0; i < 2*nProducts; i++ {
			fr.writeThenRead(i%3, i%nProducts, 50000+int64(i), "after SAVE")
		}
		rds.Kill()
		rds.start() // loads the snapshot: every product at an older version
		loaded, err := redisDBSize(rds.Addr)
		if err != nil || loaded == 0 || saved == 0 {
			t.Fatalf("redis restarted from the snapshot holds %d keys (%v), %d when saved: the old entries are not back, nothing to test", loaded, err, saved)
		}
		cacheUp("after restart from the snapshot")
		// The replicas may answer from memory without asking Redis; a new
		// one has nothing in memory, so what it answers comes from Redis
		// or the database.
		f.start(3)
		fr.warm(3, "after restart from the snapshot")
		figures = append(figures, fmt.Sprintf("snapshot keys=%d", loaded))
	})

	t.Logf("RESULT replicas=3 (a 4th started after the snapshot restart) products=%d REDIS_TIMEOUT=%v budget=%v; %s", nProducts, redisTimeout, budget, strings.Join(figures, "; "))
}
