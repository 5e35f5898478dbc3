package e2e

import (
	"context"
	"database/sql"
	"encoding/json"
	"fmt"
	"math/rand/v2"
	"net/http"
	"strconv"
	"sync"
	"testing"
	"time"

	_ "modernc.org/sqlite" // driver "sqlite" for the integrity check
)

// outcome is what the client knows about one write.
type outcome int

const (
	outPending outcome = iota
	outAcked           // 2xx with a body: the write must be durable
	outFailed          // a definite error response: the write must not be applied
	outNotSent         // connection refused: the request never reached the service
	outUnknown         // the connection broke after sending: either is allowed
)

// crashCreate is one POST /products the writers sent.
type crashCreate struct {
	sku, name, description string
	price                  int64
	state                  outcome
	ack                    product // set when state == outAcked
	verifiedByGet          bool
	// seen records, for an unknown outcome, whether the row was present at
	// the first restart; later restarts must agree.
	seen *bool
}

// crashCounter is a product whose stock the writers bump by +1.
type crashCounter struct {
	id                     int64
	sku                    string
	acked, unknown, failed int64
	observed               int64 // stock seen at the first restart, -1 before
}

// crashLedger records every write of TestCrashDurability and verifies the
// database against it after each restart.
type crashLedger struct {
	mu       sync.Mutex
	creates  map[string]*crashCreate
	counters []*crashCounter

	unexpected []string // statuses the contract does not allow here
	verified   int      // rows checked in the last verification
}

func (l *crashLedger) noteUnexpected(format string, args ...any) {
	l.mu.Lock()
	defer l.mu.Unlock()
	if len(l.unexpected) < 20 {
		l.unexpected = append(l.unexpected, fmt.Sprintf(format, args...))
	}
}

// crashCycleStats counts one cycle's outcomes.
type crashCycleStats struct {
	createAcked, createFailed, createNotSent, createUnknown int
	adjAcked, adjFailed, adjNotSent, adjUnknown             int
}

func TestCrashDurability(t *testing.T) {
	cycles := envInt(t, "E2E_CRASH_CYCLES", 20)
	const writers = 8
	env := storeEnv(t)
	led := &crashLedger{creates: map[string]*crashCreate{}}
	rng := rand.New(rand.NewPCG(uint64(time.Now().UnixNano()), 42))

	var total crashCycleStats
	for cycle := 0; cycle < cycles; cycle++ {
		svc, c := startReadyService(t, env)
		if cycle > 0 {
			led.verify(t, c, fmt.Sprintf("restart before cycle %d", cycle))
			if t.Failed() {
				t.FailNow()
			}
		}
		var ctrs []*crashCounter
		for i := 0; i < 2; i++ {
			sku := fmt.Sprintf("ctr-%03d-%d", cycle, i)
			p := mustCreate(t, c, sku, "counter "+sku, 100, map[string]any{"category": "counter"})
			ctr := &crashCounter{id: p.ID, sku: sku, observed: -1}
			ctrs = append(ctrs, ctr)
			led.counters = append(led.counters, ctr)
		}
		killAfter := 400*time.Millisecond + time.Duration(rng.Int64N(int64(1100*time.Millisecond)))
		st := runCrashCycle(t, svc, c, led, ctrs, cycle, writers, killAfter)
		t.Logf("cycle %2d: kill -9 after %4dms; creates acked=%d failed=%d unknown=%d not-sent=%d; adjustments acked=%d failed=%d unknown=%d not-sent=%d",
			cycle, killAfter.Milliseconds(), st.createAcked, st.createFailed, st.createUnknown, st.createNotSent,
			st.adjAcked, st.adjFailed, st.adjUnknown, st.adjNotSent)
		total.add(st)
		if st.createAcked+st.adjAcked == 0 {
			t.Errorf("cycle %d: no write was acknowledged before the kill", cycle)
		}
	}

	svc, c := startReadyService(t, env)
	led.verify(t, c, "final restart")
	if code := svc.Stop(40 * time.Second); code != 0 {
		t.Errorf("final SIGTERM: exit status %d, want 0", code)
	}
	for _, u := range led.unexpected {
		t.Errorf("unexpected response during load: %s", u)
	}

	integrity, rows := "n/a", "n/a" // PostgreSQL checks its own pages
	if !onPostgres() {
		integrity, rows = checkIntegrity(t, env["DB_PATH"])
		if integrity != "ok" {
			t.Errorf("PRAGMA integrity_check = %q, want ok", integrity)
		}
	}

	t.Logf("RESULT cycles=%d acknowledged writes=%d (creates %d, adjustments %d) definite failures=%d unknown outcomes=%d (creates %d, adjustments %d) not sent=%d verified rows=%d sqlite rows=%s integrity_check=%s backend=%s",
		cycles, total.createAcked+total.adjAcked, total.createAcked, total.adjAcked,
		total.createFailed+total.adjFailed, total.createUnknown+total.adjUnknown,
		total.createUnknown, total.adjUnknown, total.createNotSent+total.adjNotSent,
		led.verified, rows, integrity, map[bool]string{false: "sqlite", true: "postgres"}[onPostgres()])
}

func (s *crashCycleStats) add(o crashCycleStats) {
	s.createAcked += o.createAcked
	s.createFailed += o.createFailed
	s.createNotSent += o.createNotSent
	s.createUnknown += o.createUnknown
	s.adjAcked += o.adjAcked
	s.adjFailed += o.adjFailed
	s.adjNotSent += o.adjNotSent
	s.adjUnknown += o.adjUnknown
}

// runCrashCycle runs the writers against svc, SIGKILLs it after killAfter
// and returns once every writer has stopped.
func runCrashCycle(t *testing.T, svc *service, c *client, led *crashLedger, ctrs []*crashCounter, cycle, writers int, killAfter time.Duration) crashCycleStats {
	t.Helper()
	stop := make(chan struct{})
	var mu sync.Mutex
	var st crashCycleStats
	var wg sync.WaitGroup
	for w := 0; w < writers; w++ {
		wg.Add(1)
		go func(w int) {
			defer wg.Done()
			rng := rand.New(rand.NewPCG(uint64(cycle), uint64(w)))
			for i := 0; i < 5000; i++ {
				select {
				case <-stop:
					return
				default:
				}
				if rng.IntN(2) == 0 {
					o := crashCreateOnce(c, led, cycle, w, i, rng)
					mu.Lock()
					switch o {
					case outAcked:
						st.createAcked++
					case outFailed:
						st.createFailed++
					case outNotSent:
						st.createNotSent++
					case outUnknown:
						st.createUnknown++
					}
					mu.Unlock()
				} else {
					o := crashAdjustOnce(c, led, ctrs[rng.IntN(len(ctrs))])
					mu.Lock()
					switch o {
					case outAcked:
						st.adjAcked++
					case outFailed:
						st.adjFailed++
					case outNotSent:
						st.adjNotSent++
					case outUnknown:
						st.adjUnknown++
					}
					mu.Unlock()
				}
			}
		}(w)
	}

	timer := time.NewTimer(killAfter)
	<-timer.C
	svc.Kill()
	close(stop)

	done := make(chan struct{})
	go func() { wg.Wait(); close(done) }()
	select {
	case <-done:
	case <-time.After(60 * time.Second):
		t.Fatalf("cycle %d: writers did not stop within 60s of the kill", cycle)
	}
	c.Close()
	return st
}

// crashCreateOnce sends one create and records its outcome.
func crashCreateOnce(c *client, led *crashLedger, cycle, w, i int, rng *rand.Rand) outcome {
	rec := &crashCreate{
		sku:         fmt.Sprintf("c%03d-w%d-%05d", cycle, w, i),
		price:       rng.Int64N(1_000_000),
		description: fmt.Sprintf("crash test item %d/%d/%d", cycle, w, i),
	}
	rec.name = "item " + rec.sku
	led.mu.Lock()
	led.creates[rec.sku] = rec
	led.mu.Unlock()

	body := createBody(rec.sku, rec.name, rec.price, map[string]any{"description": rec.description, "category": "crash"})
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	r, err := c.do(ctx, http.MethodPost, "/products", body, nil)
	o := outUnknown
	switch {
	case err != nil && isConnRefused(err):
		o = outNotSent
	case err != nil:
		o = outUnknown
	case r.Status == http.StatusCreated:
		var p product
		if jerr := json.Unmarshal(r.Body, &p); jerr != nil || p.ID <= 0 {
			led.noteUnexpected("POST /products sku=%s: 201 with undecodable body %q", rec.sku, r.Body)
			o = outUnknown
		} else {
			o = outAcked
			rec.ack = p
		}
	case r.Status >= 400 && r.Status < 500, r.Status == http.StatusServiceUnavailable:
		// 503 is load shedding or an open breaker: nothing applied.
		o = outFailed
		if r.Status != http.StatusTooManyRequests && r.Status != http.StatusServiceUnavailable {
			led.noteUnexpected("POST /products sku=%s: %s", rec.sku, r)
		}
	default:
		// A 500 is not definite: the commit may have happened.
		o = outUnknown
		led.noteUnexpected("POST /products sku=%s: %s", rec.sku, r)
	}
	led.mu.Lock()
	rec.state = o
	led.mu.Unlock()
	return o
}

// crashAdjustOnce sends one {"delta":1} adjustment and records its outcome.
func crashAdjustOnce(c *client, led *crashLedger, ctr *crashCounter) outcome {
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	path := "/products/" + strconv.FormatInt(ctr.id, 10) + "/stock/adjustments"
	r, err := c.do(ctx, http.MethodPost, path, []byte(`{"delta":1}`), nil)
	o := outUnknown
	switch {
	case err != nil && isConnRefused(err):
		o = outNotSent
	case err != nil:
		o = outUnknown
	case r.Status == http.StatusOK:
		var p product
		if jerr := json.Unmarshal(r.Body, &p); jerr != nil || p.ID != ctr.id {
			led.noteUnexpected("POST %s: 200 with bad body %q", path, r.Body)
		} else {
			o = outAcked
		}
	case r.Status >= 400 && r.Status < 500, r.Status == http.StatusServiceUnavailable:
		o = outFailed
		if r.Status != http.StatusTooManyRequests && r.Status != http.StatusServiceUnavailable {
			led.noteUnexpected("POST %s: %s", path, r)
		}
	default:
		led.noteUnexpected("POST %s: %s", path, r)
	}
	led.mu.Lock()
	switch o {
	case outAcked:
		ctr.acked++
	case outFailed:
		ctr.failed++
	case outUnknown:
		ctr.unknown++
	}
	led.mu.Unlock()
	return o
}

// verify checks the restarted service against everything recorded so far.
func (l *crashLedger) verify(t *testing.T, c *client, when string) {
	t.Helper()
	l.mu.Lock()
	defer l.mu.Unlock()
	all := mustListAll(t, c)
	bySKU := make(map[string]product, len(all))
	ids := make(map[int64]bool, len(all))
	errs := 0
	fail := func(format string, args ...any) {
		errs++
		if errs <= 25 {
			t.Errorf("%s: "+format, append([]any{when}, args...)...)
		}
	}
	for _, p := range all {
		if _, dup := bySKU[p.SKU]; dup {
			fail("sku %s listed twice", p.SKU)
		}
		if ids[p.ID] {
			fail("id %d listed twice", p.ID)
		}
		bySKU[p.SKU] = p
		ids[p.ID] = true
	}

	verified := 0
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	for sku, rec := range l.creates {
		got, present := bySKU[sku]
		switch rec.state {
		case outAcked:
			if !present {
				fail("acknowledged create sku=%s id=%d is missing", sku, rec.ack.ID)
				continue
			}
			if d := diffProduct(rec.ack, got); d != "" {
				fail("acknowledged create sku=%s listed as %+v: %s", sku, got, d)
			}
			if !rec.verifiedByGet {
				p, r, err := getProduct(ctx, c, rec.ack.ID)
				switch {
				case err != nil:
					fail("GET /products/%d: %v", rec.ack.ID, err)
				case r.Status != http.StatusOK:
					fail("GET /products/%d (acknowledged create): %s", rec.ack.ID, r)
				default:
					if d := diffProduct(rec.ack, p); d != "" {
						fail("GET /products/%d differs from the acknowledged body: %s", rec.ack.ID, d)
					}
					rec.verifiedByGet = true
				}
			}
			verified++
		case outFailed, outNotSent:
			if present {
				fail("create sku=%s got a definite failure (or was never sent) but is present: %+v", sku, got)
			}
		case outUnknown, outPending:
			if rec.seen == nil {
				seen := present
				rec.seen = &seen
			} else if *rec.seen != present {
				fail("create sku=%s with unknown outcome: present=%v at an earlier restart, now present=%v", sku, *rec.seen, present)
			}
			if present {
				want := product{ID: got.ID, SKU: sku, Name: rec.name, Description: rec.description, Category: "crash",
					PriceCents: rec.price, Currency: "USD", Stock: 0, Version: 1, CreatedAt: got.CreatedAt, UpdatedAt: got.UpdatedAt}
				if d := diffProduct(want, got); d != "" {
					fail("create sku=%s (unknown outcome) is present with other values: %s", sku, d)
				}
				verified++
			}
		}
	}
	for _, ctr := range l.counters {
		got, present := bySKU[ctr.sku]
		if !present {
			fail("counter product sku=%s id=%d is missing", ctr.sku, ctr.id)
			continue
		}
		verified++
		s := got.Stock
		if s < ctr.acked {
			fail("counter id=%d: stock %d < %d acknowledged +1 adjustments (lost writes)", ctr.id, s, ctr.acked)
		}
		if s > ctr.acked+ctr.unknown {
			fail("counter id=%d: stock %d > %d acknowledged + %d unknown adjustments (%d definitely failed were applied?)",
				ctr.id, s, ctr.acked, ctr.unknown, ctr.failed)
		}
		if got.Version != 1+s {
			fail("counter id=%d: version %d with stock %d; want version 1+stock (each adjustment bumps both)", ctr.id, got.Version, s)
		}
		if ctr.observed >= 0 && ctr.observed != s {
			fail("counter id=%d: stock %d, was %d at an earlier restart", ctr.id, s, ctr.observed)
		}
		ctr.observed = s
	}
	known := len(l.creates)
	for _, p := range all {
		if _, ok := l.creates[p.SKU]; ok {
			continue
		}
		isCtr := false
		for _, ctr := range l.counters {
			if ctr.sku == p.SKU {
				isCtr = true
				break
			}
		}
		if !isCtr {
			fail("unknown row present: %+v", p)
		}
	}
	l.verified = verified
	t.Logf("%s: %d rows listed, %d verified against %d recorded creates and %d counters", when, len(all), verified, known, len(l.counters))
}

// checkIntegrity runs PRAGMA integrity_check on the stopped service's
// database and counts the products table if it exists.
func checkIntegrity(t *testing.T, dbPath string) (result, rows string) {
	t.Helper()
	db, err := sql.Open("sqlite", dbPath)
	if err != nil {
		t.Fatalf("open %s: %v", dbPath, err)
	}
	defer db.Close()
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	rs, err := db.QueryContext(ctx, "PRAGMA integrity_check")
	if err != nil {
		t.Fatalf("PRAGMA integrity_check: %v", err)
	}
	defer rs.Close()
	var lines []string
	for rs.Next() {
		var s string
		if err := rs.Scan(&s); err != nil {
			t.Fatalf("PRAGMA integrity_check scan: %v", err)
		}
		lines = append(lines, s)
	}
	if err := rs.Err(); err != nil {
		t.Fatalf("PRAGMA integrity_check: %v", err)
	}
	result = fmt.Sprint(lines)
	if len(lines) == 1 {
		result = lines[0]
	}
	var n int64
	if err := db.QueryRowContext(ctx, "SELECT count(*) FROM products").Scan(&n); err != nil {
		rows = "n/a (" + err.Error() + ")"
	} else {
		rows = strconv.FormatInt(n, 10)
	}
	return result, rows
}
