package e2e

import (
	"context"
	"encoding/json"
	"fmt"
	"net/http"
	"os"
	"sync"
	"testing"
	"time"

	"productsvc/internal/rabbittest"
)

// startRabbit starts a RabbitMQ server of the test's own, stopped when the
// test ends. Without rabbitmq-server the test skips, unless
// REQUIRE_RABBITMQ=1.
func startRabbit(t *testing.T) *rabbittest.Server {
	t.Helper()
	s, err := rabbittest.Start()
	if err != nil {
		if os.Getenv("REQUIRE_RABBITMQ") == "1" {
			t.Fatalf("REQUIRE_RABBITMQ=1 but RabbitMQ could not start: %v", err)
		}
		t.Skipf("RabbitMQ not available: %v", err)
	}
	t.Cleanup(s.Stop)
	return s
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
		got = map[int64]bool{}
		for _, d := range cons.Deliveries() {
			if d.Type != "product.created" {
				continue
			}
			var ce struct {
				Data struct {
					ProductID int64 `json:"product_id"`
				} `json:"data"`
			}
			if json.Unmarshal(d.Body, &ce) == nil && acked[ce.Data.ProductID] {
				got[ce.Data.ProductID] = true
			}
		}
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
