package main

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"net/http"
	"net/http/httptest"
	"slices"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	amqp "github.com/rabbitmq/amqp091-go"

	"productsvc/internal/rabbittest"
)

// consumer is a rabbittest.Consumer that ends with the test.
type consumer struct{ *rabbittest.Consumer }

// startConsumer consumes everything published to exchange until the test
// ends.
func startConsumer(t *testing.T, url, exchange string) *consumer {
	t.Helper()
	c, err := rabbittest.Consume(url, exchange)
	if err != nil {
		t.Fatalf("consume %s: %v", exchange, err)
	}
	t.Cleanup(c.Close)
	return &consumer{c}
}

func (c *consumer) deliveries() []rabbittest.Delivery { return c.Deliveries() }
func (c *consumer) distinct() (ids, duplicates int)   { return c.Distinct() }

// waitDistinct waits until at least n distinct messages arrived.
func (c *consumer) waitDistinct(t *testing.T, n int, timeout time.Duration) {
	t.Helper()
	waitFor(t, timeout, fmt.Sprintf("%d distinct messages", n), func() bool {
		got, _ := c.distinct()
		return got >= n
	})
}

var exchangeSeq atomic.Int64

// newExchangeName returns an exchange name no other test uses.
func newExchangeName(t *testing.T) string {
	return fmt.Sprintf("test.%d.%d", time.Now().UnixNano(), exchangeSeq.Add(1))
}

// startRelay runs a relay of store publishing to exchange at url until the
// test ends (or stop is called); it returns the relay and stop.
func startRelay(t *testing.T, store productStore, url, exchange string, tweak func(r *relay)) (*relay, func()) {
	t.Helper()
	m := newMetrics(nil).relay()
	r := newRelay(store.(relayStore), relayConfig{Source: "/productsvc", Dial: dialRelayPublisher(url, exchange, m), BrokerURL: url, Metrics: m})
	r.poll = 20 * time.Millisecond
	r.backoff = 500 * time.Millisecond
	if tweak != nil {
		tweak(r)
	}
	ctx, cancel := context.WithCancel(context.Background())
	var wg sync.WaitGroup
	wg.Go(func() { r.Run(ctx) })
	var once sync.Once
	stop := func() { once.Do(func() { cancel(); wg.Wait() }) }
	t.Cleanup(stop)
	return r, stop
}

// cloudEventDoc is a published message's body.
type cloudEventDoc struct {
	SpecVersion     string          `json:"specversion"`
	ID              string          `json:"id"`
	Source          string          `json:"source"`
	Type            string          `json:"type"`
	Subject         string          `json:"subject"`
	Time            string          `json:"time"`
	DataContentType string          `json:"datacontenttype"`
	Sequence        string          `json:"sequence"`
	Data            json.RawMessage `json:"data"`
}

func TestRelay_publishesEveryKindOfWrite(t *testing.T) {
	rmq := sharedRabbit(t)
	forEachStore(t, func(t *testing.T, s productStore) {
		ctx := t.Context()
		exchange := newExchangeName(t)
		cons := startConsumer(t, rmq.URL, exchange)
		clock := time.Now()
		setStoreClock(s, func() time.Time { return clock })

		p, _, err := s.Create(ctx, "", Product{SKU: "R-1", Name: "pen", PriceCents: 100, Currency: "EUR", Stock: 10}, nil)
		if err != nil {
			t.Fatal(err)
		}
		if _, _, err := s.Update(ctx, "", p.ID, ProductUpdate{Patch: ProductPatch{Name: optional[string]{Set: true, Value: "pencil"}}}); err != nil {
			t.Fatal(err)
		}
		if _, _, err := s.AdjustStock(ctx, "", p.ID, 5, nil, nil); err != nil {
			t.Fatal(err)
		}
		for _, to := range []string{StateConfirmed, StateReleased} {
			r, _, err := storeReserve(s, ctx, Reservation{ID: newReservationID(), Reference: "order-" + to, Lines: []ReservationLine{{ProductID: p.ID, Quantity: 1}}}, time.Minute, nil)
			if err != nil {
				t.Fatal(err)
			}
			if _, _, err := storeTransition(s, ctx, r.ID, to); err != nil {
				t.Fatal(err)
			}
		}
		if _, _, err := storeReserve(s, ctx, Reservation{ID: newReservationID(), Reference: "order-late", Lines: []ReservationLine{{ProductID: p.ID, Quantity: 1}}}, time.Second, nil); err != nil {
			t.Fatal(err)
		}
		clock = clock.Add(2 * time.Second)
		if n, _, err := s.ExpireReservations(ctx, 10); err != nil || n != 1 {
			t.Fatalf("ExpireReservations = %d, %v; want 1", n, err)
		}
		if _, err := s.Delete(ctx, "", p.ID, nil); err != nil {
			t.Fatal(err)
		}
		es, err := s.Events(ctx, 0, 100)
		if err != nil {
			t.Fatal(err)
		}
		logID, err := s.LogID(ctx)
		if err != nil {
			t.Fatal(err)
		}

		startRelay(t, s, rmq.URL, exchange, nil)
		cons.waitDistinct(t, len(es), 30*time.Second)

		types := map[string]bool{}
		byID := map[string]rabbittest.Delivery{}
		for _, d := range cons.deliveries() {
			byID[d.MessageID] = d
		}
		for i := range es {
			e := &es[i]
			id := logID + "-" + strconv.FormatInt(e.Seq, 10)
			d, ok := byID[id]
			if !ok {
				t.Fatalf("no message %s for event %+v", id, e)
			}
			types[e.Type] = true
			if d.RoutingKey != e.Type || d.Type != e.Type || d.ContentType != "application/cloudevents+json" ||
				d.AppID != "productsvc" || d.DeliveryMode != amqp.Persistent || !d.Timestamp.Equal(e.OccurredAt.Truncate(time.Second)) {
				t.Errorf("message %s: routing key %q type %q content type %q app id %q delivery mode %d timestamp %v; want %q, %q, application/cloudevents+json, productsvc, 2, %v",
					id, d.RoutingKey, d.Type, d.ContentType, d.AppID, d.DeliveryMode, d.Timestamp, e.Type, e.Type, e.OccurredAt.Truncate(time.Second))
			}
			var ce cloudEventDoc
			if err := json.Unmarshal(d.Body, &ce); err != nil {
				t.Fatalf("message %s body %s: %v", id, d.Body, err)
			}
			subject := "products/" + strconv.FormatInt(e.ProductID, 10)
			if e.Reservation != nil {
				subject = "reservations/" + e.Reservation.ID
			}
			want := cloudEventDoc{SpecVersion: "1.0", ID: id, Source: "/productsvc", Type: e.Type, Subject: subject,
				Time: e.OccurredAt.UTC().Format(timeLayout), DataContentType: "application/json", Sequence: strconv.FormatInt(e.Seq, 10)}
			gotData := ce.Data
			ce.Data = nil
			if fmt.Sprint(ce) != fmt.Sprint(want) {
				t.Errorf("message %s:\n got %+v\nwant %+v", id, ce, want)
			}
			if wantData := appendEventJSON(nil, e); string(gotData) != string(wantData) {
				t.Errorf("message %s data:\n got %s\nwant %s (as GET /events)", id, gotData, wantData)
			}
		}
		for _, typ := range []string{EventProductCreated, EventProductUpdated, EventProductDeleted, EventStockChanged,
			EventReservationHeld, EventReservationConfirmed, EventReservationReleased, EventReservationExpired} {
			if !types[typ] {
				t.Errorf("no %s event among %d", typ, len(es))
			}
		}
		_, dups := cons.distinct()
		t.Logf("%d events, %d duplicate deliveries", len(es), dups)
	})
}

// writeLoad runs writers that adjust the stock of products until stop is
// closed, recording every acknowledged write's (product, version) and
// counting refused ones.
type writeLoad struct {
	mu      sync.Mutex
	acked   map[int64][]int64 // product id -> acknowledged versions
	refused atomic.Int64
	failed  atomic.Int64
	errs    []error
}

func runWriteLoad(t *testing.T, s productStore, writers int, stop <-chan struct{}) (*writeLoad, *sync.WaitGroup) {
	t.Helper()
	w := &writeLoad{acked: map[int64][]int64{}}
	var ids []int64
	for i := range writers {
		p, _, err := s.Create(t.Context(), "", Product{SKU: fmt.Sprintf("L-%d", i), Name: "load", PriceCents: 1, Currency: "EUR", Stock: 5}, nil)
		if err != nil {
			t.Fatal(err)
		}
		ids = append(ids, p.ID)
		w.acked[p.ID] = []int64{1}
	}
	var wg sync.WaitGroup
	for i := range writers {
		wg.Go(func() {
			for n := 0; ; n++ {
				select {
				case <-stop:
					return
				default:
				}
				id := ids[(i+n)%len(ids)]
				delta := int64(1)
				if n%5 == 4 {
					delta = -1_000_000 // refused: stock cannot go below zero
				}
				p, _, err := s.AdjustStock(context.Background(), "", id, delta, nil, nil)
				switch {
				case errors.Is(err, ErrInsufficientStock):
					w.refused.Add(1)
				case err != nil:
					w.failed.Add(1)
					w.mu.Lock()
					w.errs = append(w.errs, err)
					w.mu.Unlock()
				default:
					w.mu.Lock()
					w.acked[id] = append(w.acked[id], p.Version)
					w.mu.Unlock()
				}
				time.Sleep(2 * time.Millisecond) // a steady load, not a flood
			}
		})
	}
	return w, &wg
}

// checkDelivered checks that every acknowledged write's event arrived, that
// first deliveries are in version order per product, and that no event
// arrived for a version no write acknowledged. It returns the duplicates.
func checkDelivered(t *testing.T, cons *consumer, w *writeLoad) int {
	t.Helper()
	first := map[string]bool{}
	last := map[int64]int64{}
	got := map[int64]map[int64]bool{}
	dups := 0
	for _, d := range cons.deliveries() {
		if first[d.MessageID] {
			dups++
			continue
		}
		first[d.MessageID] = true
		var ce struct {
			Data struct {
				ProductID int64 `json:"product_id"`
				Version   int64 `json:"version"`
			} `json:"data"`
		}
		if err := json.Unmarshal(d.Body, &ce); err != nil {
			t.Fatal(err)
		}
		id, v := ce.Data.ProductID, ce.Data.Version
		if v <= last[id] {
			t.Errorf("product %d: first delivery of version %d after version %d", id, v, last[id])
		}
		last[id] = v
		if got[id] == nil {
			got[id] = map[int64]bool{}
		}
		got[id][v] = true
	}
	w.mu.Lock()
	defer w.mu.Unlock()
	acked := 0
	for id, vs := range w.acked {
		for _, v := range vs {
			acked++
			if !got[id][v] {
				t.Errorf("product %d version %d: acknowledged, never delivered", id, v)
			}
		}
		if len(got[id]) != len(vs) {
			t.Errorf("product %d: %d versions delivered, %d acknowledged (a refused write's event?)", id, len(got[id]), len(vs))
		}
	}
	return dups
}

// ackedCount returns how many writes were acknowledged.
func (w *writeLoad) ackedCount() int {
	w.mu.Lock()
	defer w.mu.Unlock()
	n := 0
	for _, vs := range w.acked {
		n += len(vs)
	}
	return n
}

func TestRelay_brokerKilledAndPaused(t *testing.T) {
	rmq := sharedRabbit(t)
	forEachStore(t, func(t *testing.T, s productStore) {
		exchange := newExchangeName(t)
		cons := startConsumer(t, rmq.URL, exchange)
		rl, _ := startRelay(t, s, rmq.URL, exchange, nil)
		stop := make(chan struct{})
		w, wg := runWriteLoad(t, s, 8, stop)
		defer func() {
			select {
			case <-stop:
			default:
				close(stop)
			}
			wg.Wait()
		}()
		// Writes go on whatever the broker does; wait for a few between steps.
		waitWrites := func(n int) {
			at := w.ackedCount()
			waitFor(t, 30*time.Second, fmt.Sprintf("%d more writes", n), func() bool { return w.ackedCount() >= at+n })
		}
		waitFor(t, 30*time.Second, "the relay to connect", func() bool { return rl.Status().BrokerUp })
		waitWrites(100)

		rmq.Kill()
		waitFor(t, 30*time.Second, "the relay to see the broker down", func() bool { return !rl.Status().BrokerUp })
		waitWrites(100)
		if err := rmq.Restart(); err != nil {
			t.Fatalf("restart RabbitMQ: %v", err)
		}
		waitWrites(100)

		rmq.Pause()
		waitFor(t, 30*time.Second, "the relay to see the paused broker down", func() bool { return !rl.Status().BrokerUp })
		waitWrites(100)
		rmq.Resume()
		waitFor(t, 60*time.Second, "the relay to reconnect", func() bool { return rl.Status().BrokerUp })
		waitWrites(100)

		close(stop)
		wg.Wait()
		if n := w.failed.Load(); n > 0 {
			t.Fatalf("%d writes failed while the broker was down, e.g. %v; want none", n, w.errs[0])
		}
		cons.waitDistinct(t, w.ackedCount(), 60*time.Second)
		dups := checkDelivered(t, cons, w)
		t.Logf("%d acknowledged writes, %d refused, %d duplicate deliveries", w.ackedCount(), w.refused.Load(), dups)
	})
}

func TestRelay_crashBetweenPublishAndPositionUpdate(t *testing.T) {
	rmq := sharedRabbit(t)
	forEachStore(t, func(t *testing.T, s productStore) {
		exchange := newExchangeName(t)
		cons := startConsumer(t, rmq.URL, exchange)
		const n = 50
		for i := range n {
			if _, _, err := s.Create(t.Context(), "", Product{SKU: fmt.Sprintf("C-%d", i), Name: "x", PriceCents: 1, Currency: "EUR"}, nil); err != nil {
				t.Fatal(err)
			}
		}
		// The first relay fails once the broker confirmed its first
		// batch, before it stores its position; then it is stopped.
		crashed, resume := make(chan struct{}), make(chan struct{})
		var once sync.Once
		_, stopFirst := startRelay(t, s, rmq.URL, exchange, func(r *relay) {
			r.beforeMove = func(RelayPosition) error {
				err := errors.New("crashed before the position update")
				once.Do(func() {
					close(crashed)
					<-resume
				})
				return err // every time: this relay never moves its position
			}
		})
		<-crashed
		pos, _, _, err := s.(relayStore).RelayPosition(t.Context())
		close(resume)
		stopFirst()
		if err != nil || pos.Seq != 0 {
			t.Fatalf("position after the crash = %+v, %v; want seq 0", pos, err)
		}
		if got, _ := cons.distinct(); got == 0 {
			t.Logf("no message arrived before the crash")
		}
		startRelay(t, s, rmq.URL, exchange, nil)
		cons.waitDistinct(t, n, 30*time.Second)
		// The second relay sends the first one's batch again.
		waitFor(t, 30*time.Second, "the batch sent before the crash to arrive again", func() bool {
			return len(cons.deliveries()) >= 2*n
		})
		ids, dups := cons.distinct()
		if dups == 0 {
			t.Errorf("no duplicates: the first relay's batch was not sent again")
		}
		t.Logf("%d events, %d duplicate deliveries (re-sent after the crash)", ids, dups)
	})
}

func TestRelay_retentionKeepsUnpublished(t *testing.T) {
	rmq := sharedRabbit(t)
	forEachStore(t, func(t *testing.T, s productStore) {
		switch st := s.(type) {
		case *sqliteStore:
			st.keepUnpublished = true
		case *postgresStore:
			st.keepUnpublished = true
		}
		exchange := newExchangeName(t)
		cons := startConsumer(t, rmq.URL, exchange)
		// The broker is unreachable: a port nothing listens on.
		port, err := freePort()
		if err != nil {
			t.Fatal(err)
		}
		down, stopDown := startRelay(t, s, fmt.Sprintf("amqp://guest:guest@127.0.0.1:%d/", port), exchange, nil)
		const n = 30
		for i := range n {
			if _, _, err := s.Create(t.Context(), "", Product{SKU: fmt.Sprintf("T-%d", i), Name: "x", PriceCents: 1, Currency: "EUR"}, nil); err != nil {
				t.Fatal(err)
			}
		}
		waitFor(t, 10*time.Second, "the relay to fail to connect", func() bool { return down.Status().Err != "" })
		if got, err := s.TrimEvents(t.Context(), time.Now().Add(time.Hour)); err != nil || got != 0 {
			t.Fatalf("TrimEvents with nothing published = %d, %v; want 0", got, err)
		}
		// The broker is back (at another address: the relay of a restarted
		// replica; on PostgreSQL the first must give up the lease).
		stopDown()
		startRelay(t, s, rmq.URL, exchange, nil)
		cons.waitDistinct(t, n, 30*time.Second)
		waitFor(t, 10*time.Second, "the position to reach the head", func() bool {
			pos, _, _, err := s.(relayStore).RelayPosition(t.Context())
			head, herr := s.FeedHead(t.Context())
			return err == nil && herr == nil && pos.Seq == head
		})
		if got, err := s.TrimEvents(t.Context(), time.Now().Add(time.Hour)); err != nil || got != n {
			t.Fatalf("TrimEvents after publishing = %d, %v; want %d", got, err, n)
		}
		_, dups := cons.distinct()
		t.Logf("%d events, %d duplicate deliveries", n, dups)
	})
}

func TestRelay_oneOfThreeReplicasPublishes(t *testing.T) {
	rmq := sharedRabbit(t)
	url := newTestDatabase(t)
	exchange := newExchangeName(t)
	cons := startConsumer(t, rmq.URL, exchange)
	stores := make([]*postgresStore, 3)
	relays := make([]*relay, 3)
	stops := make([]func(), 3)
	for i := range stores {
		stores[i] = openTestPostgres(t, url)
		relays[i], stops[i] = startRelay(t, stores[i], rmq.URL, exchange, nil)
	}
	leaders := func() (n, which int) {
		for i, r := range relays {
			if stops[i] != nil && r.Status().Leader {
				n, which = n+1, i
			}
		}
		return n, which
	}
	waitFor(t, 10*time.Second, "one relay to lead", func() bool { n, _ := leaders(); return n == 1 })
	_, first := leaders()
	total := 0
	write := func(k int) {
		for i := range k {
			s := stores[i%3]
			if _, _, err := s.Create(t.Context(), "", Product{SKU: fmt.Sprintf("P-%d", total), Name: "x", PriceCents: 1, Currency: "EUR"}, nil); err != nil {
				t.Fatal(err)
			}
			total++
		}
	}
	write(30)
	cons.waitDistinct(t, total, 30*time.Second)
	if n, _ := leaders(); n != 1 {
		t.Fatalf("%d relays lead; want 1", n)
	}
	stops[first]()
	stops[first] = nil
	write(30)
	began := time.Now()
	waitFor(t, 10*time.Second, "another relay to take over", func() bool { n, _ := leaders(); return n == 1 })
	_, second := leaders()
	tookOver := time.Since(began)
	cons.waitDistinct(t, total, 30*time.Second)

	// The publishing replica's session dies (as when its process is
	// killed): PostgreSQL frees the lock, the relay sees its connection
	// gone and stops, and a relay takes the lock again.
	var killed int
	err := stores[first].pool.QueryRow(t.Context(), `SELECT count(pg_terminate_backend(pid)) FROM pg_locks
		WHERE locktype = 'advisory' AND granted AND classid = $1 AND objid = $2
			AND database = (SELECT oid FROM pg_database WHERE datname = current_database())`,
		uint32(pgRelayLock>>32), uint32(pgRelayLock&0xffffffff)).Scan(&killed)
	if err != nil || killed != 1 {
		t.Fatalf("terminating the relay lock's session: %d, %v; want 1", killed, err)
	}
	write(30)
	cons.waitDistinct(t, total, 30*time.Second)
	if n, _ := leaders(); n != 1 {
		t.Errorf("%d relays lead after the session died; want 1", n)
	}
	ids, dups := cons.distinct()
	t.Logf("relay %d stopped, relay %d took over in %v; a relay's session killed, publishing went on; %d events, %d duplicate deliveries",
		first, second, tookOver.Round(time.Millisecond), ids, dups)
	if ids != total {
		t.Errorf("%d distinct events delivered, want %d", ids, total)
	}
}

func TestRelay_readyReportsBrokerDown(t *testing.T) {
	port, err := freePort()
	if err != nil {
		t.Fatal(err)
	}
	url := fmt.Sprintf("amqp://relay:s3cret-pw@127.0.0.1:%d/", port)
	s := newTestStore(t)
	logs := &syncBuffer{}
	rl, _ := startRelay(t, s, url, "products", func(r *relay) {
		r.log = slog.New(slog.NewJSONHandler(logs, &slog.HandlerOptions{Level: slog.LevelDebug}))
	})
	waitFor(t, 10*time.Second, "the relay to fail to connect", func() bool { return rl.Status().Err != "" })
	waitFor(t, 10*time.Second, "the relay to log the failure", func() bool { return strings.Contains(logs.String(), "broker unavailable") })
	if strings.Contains(logs.String(), "s3cret-pw") {
		t.Errorf("the relay's log shows the broker's password:\n%s", logs)
	}
	if m := counterValue(t, rl.m.failures.WithLabelValues(relayFailConnect)); m == 0 {
		t.Errorf("relay_failures_total{reason=connect} = 0 after failed connects")
	}
	svc := newTestService(t, s, ServiceConfig{})
	life := &lifecycle{}
	life.started.Store(true)
	h := newServer(serverDeps{svc: svc, log: svc.log, metrics: svc.metrics, tokens: newTokenSet([]string{testToken}), life: life, relay: rl})
	rec := httptest.NewRecorder()
	h.ServeHTTP(rec, httptest.NewRequest(http.MethodGet, "/ready", nil))
	var body readyBody
	if err := json.Unmarshal(rec.Body.Bytes(), &body); err != nil {
		t.Fatal(err)
	}
	if rec.Code != http.StatusOK || body.Status != "degraded" || body.Checks.Broker.Status != "down" {
		t.Errorf("GET /ready = %d %s; want 200, degraded, broker down", rec.Code, rec.Body)
	}
	if strings.Contains(rec.Body.String(), "s3cret-pw") {
		t.Errorf("GET /ready shows the broker's password: %s", rec.Body)
	}
}

func TestParseConfig_amqpURL(t *testing.T) {
	for _, v := range []string{"http://u:s3cret@host/", "amqp://", "redis://h:1"} {
		_, err := parseConfig([]string{"productsvc"}, func(k string) string {
			if k == "AMQP_URL" {
				return v
			}
			return ""
		}, nil)
		var cerr *configError
		if !errors.As(err, &cerr) || !strings.Contains(err.Error(), "AMQP_URL") || strings.Contains(err.Error(), "s3cret") {
			t.Errorf("AMQP_URL=%q: error %v; want a configError naming AMQP_URL, without the password", v, err)
		}
	}
}

// TestRelay_lag measures the time from a write's acknowledgement to its
// message's first delivery, under a steady load, with the relay woken by
// this process's writes and polling at its production interval.
func TestRelay_lag(t *testing.T) {
	rmq := sharedRabbit(t)
	forEachStore(t, func(t *testing.T, s productStore) {
		exchange := newExchangeName(t)
		cons := startConsumer(t, rmq.URL, exchange)
		wake := newFeedSignal()
		startRelay(t, s, rmq.URL, exchange, func(r *relay) {
			r.cfg.Wake = wake
			r.poll = relayPoll
		})
		p, _, err := s.Create(t.Context(), "", Product{SKU: "LAG-1", Name: "x", PriceCents: 1, Currency: "EUR"}, nil)
		if err != nil {
			t.Fatal(err)
		}
		var mu sync.Mutex
		acked := map[int64]time.Time{} // version -> acknowledged at
		var wg sync.WaitGroup
		deadline := time.Now().Add(3 * time.Second)
		for range 4 {
			wg.Go(func() {
				for time.Now().Before(deadline) {
					q, _, err := s.AdjustStock(context.Background(), "", p.ID, 1, nil, nil)
					if err != nil {
						t.Error(err)
						return
					}
					now := time.Now()
					wake.notify()
					mu.Lock()
					acked[q.Version] = now
					mu.Unlock()
					time.Sleep(5 * time.Millisecond)
				}
			})
		}
		wg.Wait()
		cons.waitDistinct(t, len(acked)+1, 30*time.Second)
		var lags []time.Duration
		seen := map[string]bool{}
		for _, d := range cons.deliveries() {
			if seen[d.MessageID] {
				continue
			}
			seen[d.MessageID] = true
			var ce struct {
				Data struct{ Version int64 } `json:"data"`
			}
			json.Unmarshal(d.Body, &ce)
			if at, ok := acked[ce.Data.Version]; ok {
				lags = append(lags, d.Received.Sub(at))
			}
		}
		slices.Sort(lags)
		pct := func(p float64) time.Duration { return lags[int(p*float64(len(lags)-1))].Round(100 * time.Microsecond) }
		t.Logf("%d writes: acknowledgement to delivery p50 %v, p99 %v, max %v", len(lags), pct(.5), pct(.99), lags[len(lags)-1].Round(100*time.Microsecond))
	})
}

// TestRelay_unroutableAndBlocked: events no queue is bound for are returned,
// counted and passed over; a broker that blocks publishers (a memory alarm)
// is down for the relay until the alarm clears, and then it drains.
func TestRelay_unroutableAndBlocked(t *testing.T) {
	rmq := sharedRabbit(t)
	s := newTestStore(t)
	exchange := newExchangeName(t) // no queue bound yet
	rl, _ := startRelay(t, s, rmq.URL, exchange, nil)
	for i := range 5 {
		if _, _, err := s.Create(t.Context(), "", Product{SKU: fmt.Sprintf("U-%d", i), Name: "x", PriceCents: 1, Currency: "EUR"}, nil); err != nil {
			t.Fatal(err)
		}
	}
	waitFor(t, 30*time.Second, "5 returned messages", func() bool { return counterValue(t, rl.m.returned) == 5 })
	waitFor(t, 10*time.Second, "the position to pass them", func() bool {
		pos, _, _, err := s.RelayPosition(t.Context())
		return err == nil && pos.Seq == 5
	})

	cons := startConsumer(t, rmq.URL, exchange)
	if err := rmq.Ctl("set_vm_memory_high_watermark", "0.0000001"); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { rmq.Ctl("set_vm_memory_high_watermark", "0.4") })
	for i := range 5 {
		if _, _, err := s.Create(t.Context(), "", Product{SKU: fmt.Sprintf("B-%d", i), Name: "x", PriceCents: 1, Currency: "EUR"}, nil); err != nil {
			t.Fatalf("a write while the broker blocks publishers: %v", err)
		}
	}
	waitFor(t, 30*time.Second, "the relay to see the blocked broker down", func() bool { return !rl.Status().BrokerUp })
	if got, _ := cons.distinct(); got != 0 {
		t.Errorf("%d messages arrived while the broker blocked publishers", got)
	}
	if err := rmq.Ctl("set_vm_memory_high_watermark", "0.4"); err != nil {
		t.Fatal(err)
	}
	cons.waitDistinct(t, 5, 60*time.Second)
	_, dups := cons.distinct()
	t.Logf("5 returned, 5 published after the alarm cleared, %d duplicate deliveries; relay error while blocked: %s", dups, rl.Status().Err)
}

// storeExec runs one statement on s in a transaction of its own.
func storeExec(t *testing.T, s productStore, query string, args ...any) {
	t.Helper()
	var ss *sqlStore
	switch st := s.(type) {
	case *sqliteStore:
		ss = &st.sqlStore
	case *postgresStore:
		ss = &st.sqlStore
	}
	err := ss.eng.alone(t.Context(), func(ctx context.Context, q querier) error {
		_, err := q.exec(ctx, query, args...)
		return err
	})
	if err != nil {
		t.Fatalf("%s: %v", query, err)
	}
}

func TestStore_moveRelay(t *testing.T) {
	forEachStore(t, func(t *testing.T, s productStore) {
		rs := s.(relayStore)
		lease, err := rs.LockRelay(t.Context())
		if err != nil {
			t.Fatal(err)
		}
		defer lease.Release()
		pos, logID, start, err := rs.RelayPosition(t.Context())
		if err != nil || pos != (RelayPosition{}) || logID == "" || start != 0 {
			t.Fatalf("RelayPosition() = %+v, %q, %d, %v; want the zero position, the feed's log id, 0", pos, logID, start, err)
		}
		at5 := RelayPosition{LogID: logID, Seq: 5}
		if err := lease.Move(t.Context(), pos, at5); err != nil {
			t.Fatalf("Move(zero → %+v) = %v", at5, err)
		}
		// A relay that read the position before the move can neither
		// move it back nor skip from there.
		for _, to := range []RelayPosition{{LogID: logID, Seq: 3}, {LogID: logID, Seq: 9}} {
			if err := lease.Move(t.Context(), RelayPosition{LogID: logID, Seq: 2}, to); !errors.Is(err, errRelayMoved) {
				t.Errorf("Move(from a stale seq 2 → %d) = %v; want errRelayMoved", to.Seq, err)
			}
		}
		if err := lease.Move(t.Context(), pos, RelayPosition{LogID: logID, Seq: 1}); !errors.Is(err, errRelayMoved) {
			t.Errorf("Move(from the zero position again) = %v; want errRelayMoved", err)
		}
		if got, _, _, _ := rs.RelayPosition(t.Context()); got != at5 {
			t.Errorf("position = %+v; want %+v", got, at5)
		}
	})
}

// TestRelay_newLog: when the feed's log_id changes (a restore), the relay
// starts the new log from its oldest kept event, under the new log's ids.
func TestRelay_newLog(t *testing.T) {
	rmq := sharedRabbit(t)
	forEachStore(t, func(t *testing.T, s productStore) {
		exchange := newExchangeName(t)
		cons := startConsumer(t, rmq.URL, exchange)
		for i := range 3 {
			if _, _, err := s.Create(t.Context(), "", Product{SKU: fmt.Sprintf("N-%d", i), Name: "x", PriceCents: 1, Currency: "EUR"}, nil); err != nil {
				t.Fatal(err)
			}
		}
		_, stop := startRelay(t, s, rmq.URL, exchange, nil)
		cons.waitDistinct(t, 3, 30*time.Second)
		stop()
		// Trim the three published events, write a fourth, then give the
		// log a new identity, as a restore does: the new log starts after
		// seq 3, its trimmed-through mark.
		if _, err := s.TrimEvents(t.Context(), time.Now().Add(time.Hour)); err != nil {
			t.Fatal(err)
		}
		if _, _, err := s.Create(t.Context(), "", Product{SKU: "N-3", Name: "x", PriceCents: 1, Currency: "EUR"}, nil); err != nil {
			t.Fatal(err)
		}
		const newLog = "0123456789abcdef0123456789abcdef"
		storeExec(t, s, `UPDATE feed_state SET log_id = ? WHERE id = 1`, newLog)
		startRelay(t, s, rmq.URL, exchange, nil)
		waitFor(t, 30*time.Second, "the new log's event to arrive", func() bool {
			for _, d := range cons.deliveries() {
				if d.MessageID == newLog+"-4" {
					return true
				}
			}
			return false
		})
		// The position moves once the broker's confirm is back, which may
		// be after the consumer has the message.
		var pos RelayPosition
		var err error
		waitFor(t, 30*time.Second, "the relay's position to reach the new log's seq 4", func() bool {
			pos, _, _, err = s.(relayStore).RelayPosition(t.Context())
			return err == nil && pos.LogID == newLog && pos.Seq == 4
		})
		ids, dups := cons.distinct()
		t.Logf("%d distinct messages over two logs, %d duplicate deliveries", ids, dups)
	})
}
