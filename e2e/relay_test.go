package e2e

import (
	"context"
	"encoding/json"
	"fmt"
	"net/http"
	"os"
	"sort"
	"sync"
	"testing"
	"time"

	"productsvc/internal/rabbittest"
)

// The RabbitMQ server the relay tests share: started by the first that
// needs it, stopped when the test binary ends. Each test uses an exchange
// (and so a queue) of its own.
var (
	rabbitOnce sync.Once
	rabbitSrv  *rabbittest.Server
	rabbitErr  error
)

// startRabbit returns the suite's RabbitMQ server, starting it on first
// use. Without rabbitmq-server the test skips, unless REQUIRE_RABBITMQ=1.
func startRabbit(t *testing.T) *rabbittest.Server {
	t.Helper()
	rabbitOnce.Do(func() { rabbitSrv, rabbitErr = rabbittest.Start() })
	if rabbitErr != nil {
		if os.Getenv("REQUIRE_RABBITMQ") == "1" {
			t.Fatalf("REQUIRE_RABBITMQ=1 but RabbitMQ could not start: %v", rabbitErr)
		}
		t.Skipf("RabbitMQ not available: %v", rabbitErr)
	}
	return rabbitSrv
}

// stopRabbit stops the suite's RabbitMQ server if one was started.
func stopRabbit() {
	if rabbitSrv != nil {
		rabbitSrv.Stop()
	}
}

// TestRelayCrash kills the service with SIGKILL under a write load while
// its relay publishes to RabbitMQ, several times, then restarts it: every
// acknowledged create's product.created message arrives (at least once),
// whatever moment the kill hit — between a publish and the position
// update included.
func TestRelayCrash(t *testing.T) {
	rmq := startRabbit(t)
	const exchange = "products.e2e"
	cons, err := rabbittest.Consume(rmq.URL, exchange)
	if err != nil {
		t.Fatal(err)
	}
	defer cons.Close()
	env := storeEnv(t)
	env["AMQP_URL"] = rmq.URL
	env["AMQP_EXCHANGE"] = exchange

	var mu sync.Mutex
	acked := map[int64]bool{} // product ids of acknowledged creates
	for cycle := range 4 {
		svc, c := startReadyService(t, env)
		stop := make(chan struct{})
		var wg sync.WaitGroup
		for w := range 4 {
			wg.Go(func() {
				for i := 0; ; i++ {
					select {
					case <-stop:
						return
					default:
					}
					ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
					r, err := c.do(ctx, http.MethodPost, "/products", createBody(fmt.Sprintf("rc%d-w%d-%d", cycle, w, i), "relay crash", 100, nil), nil)
					cancel()
					if err != nil {
						return // killed
					}
					if r.Status == http.StatusCreated {
						var p product
						if json.Unmarshal(r.Body, &p) == nil && p.ID > 0 {
							mu.Lock()
							acked[p.ID] = true
							mu.Unlock()
						}
					}
				}
			})
		}
		// Kill it once a few hundred more creates were acknowledged: with
		// the relay publishing meanwhile, the kill lands anywhere in its
		// cycle of read, publish, confirm and position update.
		mu.Lock()
		until := len(acked) + 200 + 100*cycle
		mu.Unlock()
		for deadline := time.Now().Add(30 * time.Second); time.Now().Before(deadline); time.Sleep(5 * time.Millisecond) {
			mu.Lock()
			n := len(acked)
			mu.Unlock()
			if n >= until {
				break
			}
		}
		svc.Kill()
		close(stop)
		wg.Wait()
	}
	startReadyService(t, env)

	mu.Lock()
	want := len(acked)
	mu.Unlock()
	got := map[int64]bool{}
	deadline := time.Now().Add(60 * time.Second)
	for len(got) < want && time.Now().Before(deadline) {
		got = createdAmong(cons, acked)
		time.Sleep(100 * time.Millisecond)
	}
	for id := range acked {
		if !got[id] {
			t.Errorf("product %d: create acknowledged, its product.created never arrived", id)
		}
	}
	ids, dups := cons.Distinct()
	t.Logf("RESULT kill -9 cycles=4 acknowledged creates=%d delivered=%d distinct messages=%d duplicate deliveries=%d backend=%s",
		want, len(got), ids, dups, map[bool]string{false: "sqlite", true: "postgres"}[onPostgres()])
}

// relayLeaders returns the slots of f's running replicas whose /metrics
// show relay_leader 1, among slots.
func relayLeaders(f *fleet, slots []int) []int {
	var out []int
	for _, i := range slots {
		if f.reps[i] == nil || f.reps[i].Exited() {
			continue
		}
		ctx, cancel := context.WithTimeout(context.Background(), 2*time.Second)
		text, err := scrapeMetrics(ctx, f.client(i))
		cancel()
		if err != nil {
			continue
		}
		if v, ok := metricSum(text, "relay_leader", nil); ok && v == 1 {
			out = append(out, i)
		}
	}
	return out
}

// brokerStatus returns checks.broker.status of slot's GET /ready.
func brokerStatus(f *fleet, slot int) string {
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Second)
	defer cancel()
	r, err := f.client(slot).do(ctx, http.MethodGet, "/ready", nil, nil)
	if err != nil {
		return "unreachable: " + err.Error()
	}
	var body struct {
		Checks struct {
			Broker struct {
				Status string `json:"status"`
			} `json:"broker"`
		} `json:"checks"`
	}
	if json.Unmarshal(r.Body, &body) != nil {
		return fmt.Sprintf("undecodable %d", r.Status)
	}
	return body.Checks.Broker.Status
}

// TestRelayTakeover runs three replicas on one PostgreSQL database, all
// with the same broker and exchange, kills the one whose relay publishes
// with SIGKILL under a steady write load through the two others, and
// checks that another replica takes the relay's lease over within a few
// seconds and that every acknowledged create's product.created arrives.
func TestRelayTakeover(t *testing.T) {
	requireFleet(t)
	rmq := startRabbit(t)
	const exchange = "products.e2e.takeover"
	cons, err := rabbittest.Consume(rmq.URL, exchange)
	if err != nil {
		t.Fatal(err)
	}
	defer cons.Close()
	f := startFleet(t, fleetConfig{replicas: 3, env: map[string]string{
		"AMQP_URL":      rmq.URL,
		"AMQP_EXCHANGE": exchange,
	}})
	all := []int{0, 1, 2}

	// Exactly one replica publishes; the others stand by.
	var leaders []int
	if !pollUntil(15*time.Second, 50*time.Millisecond, func() bool {
		leaders = relayLeaders(f, all)
		return len(leaders) == 1
	}) {
		t.Fatalf("want exactly one replica with relay_leader 1 within 15s, got slots %v", leaders)
	}
	leader := leaders[0]
	var others []int
	for _, i := range all {
		if i != leader {
			others = append(others, i)
			if st := brokerStatus(f, i); st != "standby" {
				t.Errorf("slot %d: checks.broker.status %q, want standby while slot %d publishes", i, st, leader)
			}
		}
	}
	if st := brokerStatus(f, leader); st != "up" {
		t.Errorf("publishing slot %d: checks.broker.status %q, want up", leader, st)
	}
	t.Logf("slot %d (pid %d) publishes; writes go through slots %v", leader, f.reps[leader].PID(), others)

	// A steady load of creates through the standbys.
	var mu sync.Mutex
	acked := map[int64]bool{}
	nAcked := func() int {
		mu.Lock()
		defer mu.Unlock()
		return len(acked)
	}
	var failed findings
	stop := make(chan struct{})
	var wg sync.WaitGroup
	for w := range 4 {
		c := f.client(others[w%len(others)])
		wg.Go(func() {
			for i := 0; i < 1_000_000; i++ {
				select {
				case <-stop:
					return
				default:
				}
				ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
				r, err := c.do(ctx, http.MethodPost, "/products", createBody(fmt.Sprintf("rt-w%d-%d", w, i), "relay takeover", 100, nil), nil)
				cancel()
				switch {
				case err != nil:
					failed.add("writer %d: %v", w, err)
				case r.Status != http.StatusCreated:
					failed.add("writer %d: %s", w, r)
				default:
					if p, err := decodeProduct(r); err == nil {
						mu.Lock()
						acked[p.ID] = true
						mu.Unlock()
					}
				}
			}
		})
	}
	stopLoad := sync.OnceFunc(func() { close(stop); wg.Wait() })
	defer stopLoad()

	// delivered counts the acknowledged creates whose product.created
	// arrived.
	delivered := func() (got, want int, missing []int64) {
		mu.Lock()
		ids := make(map[int64]bool, len(acked))
		for id := range acked {
			ids[id] = true
		}
		mu.Unlock()
		seen := createdAmong(cons, ids)
		for id := range ids {
			if !seen[id] {
				missing = append(missing, id)
			}
		}
		return len(seen), len(ids), missing
	}

	// Kill the publisher once it has been publishing the load for a while.
	if !pollUntil(30*time.Second, 10*time.Millisecond, func() bool {
		got, _, _ := delivered()
		return nAcked() >= 300 && got >= 200
	}) {
		got, want, _ := delivered()
		t.Fatalf("before the kill: %d creates acknowledged, %d delivered within 30s", want, got)
	}
	ackedAtKill := nAcked()
	var maxAtKill int64 // creates acknowledged later were published by the next leader
	mu.Lock()
	for id := range acked {
		maxAtKill = max(maxAtKill, id)
	}
	mu.Unlock()
	killed := time.Now()
	f.reps[leader].Kill()

	// Another replica takes over and publishes again.
	const takeoverWithin = 10 * time.Second
	var next []int
	if !pollUntil(takeoverWithin, 20*time.Millisecond, func() bool {
		next = relayLeaders(f, others)
		return len(next) == 1
	}) {
		t.Fatalf("no replica took the relay over within %v of the kill (relay_leader 1 on slots %v)", takeoverWithin, next)
	}
	tookOver := time.Since(killed)
	var up string
	if !pollUntil(takeoverWithin, 20*time.Millisecond, func() bool {
		up = brokerStatus(f, next[0])
		return up == "up"
	}) {
		t.Errorf("slot %d took over but checks.broker.status is %q, want up", next[0], up)
	}
	if !pollUntil(takeoverWithin, 10*time.Millisecond, func() bool {
		for _, d := range cons.Deliveries() {
			var ce struct {
				Data struct {
					ProductID int64 `json:"product_id"`
				} `json:"data"`
			}
			if d.Type == "product.created" && json.Unmarshal(d.Body, &ce) == nil && ce.Data.ProductID > maxAtKill {
				return true
			}
		}
		return false
	}) {
		t.Fatalf("no create acknowledged after the kill was delivered within %v of the takeover", takeoverWithin)
	}
	resumed := time.Since(killed)
	for _, i := range others {
		if i != next[0] {
			if st := brokerStatus(f, i); st != "standby" {
				t.Errorf("slot %d: checks.broker.status %q, want standby", i, st)
			}
		}
	}

	// Go on writing a while, then every acknowledged create must arrive.
	if !pollUntil(30*time.Second, 10*time.Millisecond, func() bool { return nAcked() >= ackedAtKill+300 }) {
		t.Errorf("after the takeover: only %d creates acknowledged within 30s", nAcked()-ackedAtKill)
	}
	stopLoad()
	failed.report(t, "writes through the surviving replicas failed")
	var got, want int
	var missing []int64
	pollUntil(60*time.Second, 100*time.Millisecond, func() bool {
		got, want, missing = delivered()
		return got == want
	})
	if len(missing) > 0 {
		sort.Slice(missing, func(i, j int) bool { return missing[i] < missing[j] })
		t.Errorf("%d of %d acknowledged creates never arrived as product.created; the first: %v", len(missing), want, missing[:min(len(missing), 10)])
	}
	ids, dups := cons.Distinct()
	t.Logf("RESULT relay takeover: slot %d killed, slot %d publishing %v later (relay_leader 1), deliveries again after %v; acknowledged creates=%d (%d before the kill) delivered=%d distinct messages=%d duplicate deliveries=%d",
		leader, next[0], tookOver.Round(time.Millisecond), resumed.Round(time.Millisecond), want, ackedAtKill, got, ids, dups)
}

// createdAmong returns the products among ids whose product.created cons
// has received.
func createdAmong(cons *rabbittest.Consumer, ids map[int64]bool) map[int64]bool {
	got := map[int64]bool{}
	for _, d := range cons.Deliveries() {
		if d.Type != "product.created" {
			continue
		}
		var ce struct {
			Data struct {
				ProductID int64 `json:"product_id"`
			} `json:"data"`
		}
		if json.Unmarshal(d.Body, &ce) == nil && ids[ce.Data.ProductID] {
			got[ce.Data.ProductID] = true
		}
	}
	return got
}
