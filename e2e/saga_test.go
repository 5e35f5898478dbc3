package e2e

import (
	"bufio"
	"context"
	"encoding/json"
	"fmt"
	"math/rand/v2"
	"net/http"
	"net/url"
	"slices"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"
)

// The saga simulation: order services reserve stock, then pay (confirm),
// fail (release) or vanish (let the hold expire), while the service is
// killed with -9 under them. At the end the stock, the holds and the change
// feed must all tell the same story.

// sagaLine is one line of a reservation.
type sagaLine struct {
	ProductID int64 `json:"product_id"`
	Quantity  int64 `json:"quantity"`
}

// sagaReservation is the service's reservation representation.
type sagaReservation struct {
	ID        string     `json:"id"`
	State     string     `json:"state"`
	Reference string     `json:"reference"`
	Lines     []sagaLine `json:"lines"`
	CreatedAt time.Time  `json:"created_at"`
	ExpiresAt time.Time  `json:"expires_at"`
	UpdatedAt time.Time  `json:"updated_at"`
}

// invProduct is the inventory side of a product: what a reservation changes.
type invProduct struct {
	ID        int64     `json:"id"`
	SKU       string    `json:"sku"`
	Stock     int64     `json:"stock"`
	Reserved  int64     `json:"reserved"`
	Available *int64    `json:"available"` // absent from a feed event's data
	Version   int64     `json:"version"`
	UpdatedAt time.Time `json:"updated_at"`
}

// feedEvent is one event of GET /events.
type feedEvent struct {
	Seq           int64           `json:"seq"`
	Type          string          `json:"type"`
	OccurredAt    time.Time       `json:"occurred_at"`
	ProductID     int64           `json:"product_id"`
	Version       int64           `json:"version"`
	ReservationID string          `json:"reservation_id"`
	State         string          `json:"state"`
	Data          json.RawMessage `json:"data"`
}

// eventsPage is the body of GET /events.
type eventsPage struct {
	Events    []feedEvent `json:"events"`
	NextAfter int64       `json:"next_after"`
}

type sagaPlan int

const (
	planPay        sagaPlan = iota // reserve, then confirm
	planCompensate                 // reserve, then release
	planAbandon                    // reserve with a short ttl, never touch it again
)

func (p sagaPlan) String() string {
	return [...]string{"pay", "compensate", "abandon"}[p]
}

// sagaOrder is one order of the simulation and what the service told it.
type sagaOrder struct {
	ref   string
	key   string // the Idempotency-Key of its POST /reservations
	plan  sagaPlan
	lines []sagaLine
	ttl   int64
	retry bool // repeats its reserve and its step, as a client after a timeout

	resID    string
	short    bool   // refused with insufficient-stock; nothing held
	acked    string // the last state the service acknowledged
	unknowns int    // requests whose outcome the kill made unknown
	final    sagaReservation
}

// sagaRun is the shared state of the simulation's workers.
type sagaRun struct {
	cur atomic.Pointer[client] // the client of the running process

	unknown atomic.Int64
	mu      sync.Mutex
	errs    []string
}

func (s *sagaRun) fail(format string, args ...any) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if len(s.errs) < 30 {
		s.errs = append(s.errs, fmt.Sprintf(format, args...))
	}
}

// call makes one request to whichever process is running. A transport
// error or a 5xx is an unknown outcome, reported as err.
func (s *sagaRun) call(method, path string, body []byte, hdr http.Header) (*response, error) {
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	r, err := s.cur.Load().do(ctx, method, path, body, hdr)
	if err != nil {
		return nil, err
	}
	if r.Status >= 500 {
		return nil, fmt.Errorf("%s %s: %s", method, path, r)
	}
	return r, nil
}

// await repeats a read until the service (restarted, maybe) answers it
// below 500, for at most 60 s.
func (s *sagaRun) await(path string) (*response, bool) {
	for i := 0; i < 1200; i++ {
		if r, err := s.call(http.MethodGet, path, nil, nil); err == nil {
			return r, true
		}
		time.Sleep(50 * time.Millisecond)
	}
	s.fail("GET %s: no answer within 60s", path)
	return nil, false
}

// byReference returns the reservations made under ref, as the service
// lists them once it answers.
func (s *sagaRun) byReference(ref string) ([]sagaReservation, bool) {
	r, ok := s.await("/reservations?reference=" + url.QueryEscape(ref))
	if !ok {
		return nil, false
	}
	var body struct {
		Items []sagaReservation `json:"items"`
	}
	if r.Status != http.StatusOK || json.Unmarshal(r.Body, &body) != nil {
		s.fail("GET /reservations?reference=%s: %s", ref, r)
		return nil, false
	}
	return body.Items, true
}

// reservation returns reservation id once the service answers.
func (s *sagaRun) reservation(id string) (sagaReservation, bool) {
	r, ok := s.await("/reservations/" + id)
	if !ok {
		return sagaReservation{}, false
	}
	var res sagaReservation
	if r.Status != http.StatusOK || json.Unmarshal(r.Body, &res) != nil {
		s.fail("GET /reservations/%s: %s", id, r)
		return sagaReservation{}, false
	}
	return res, true
}

func problemSlug(r *response) string {
	var p problem
	_ = json.Unmarshal(r.Body, &p)
	return strings.TrimPrefix(p.Type, "/problems/")
}

// run plays one order to its end.
func (s *sagaRun) run(o *sagaOrder, rng *rand.Rand) {
	if !s.reserve(o) {
		return
	}
	if o.plan == planAbandon {
		return
	}
	time.Sleep(time.Duration(rng.IntN(15)) * time.Millisecond) // the payment
	to := "confirmed"
	if o.plan == planCompensate {
		to = "released"
	}
	s.transition(o, to)
}

// reserve posts the order's reservation. After an unknown outcome it finds
// the order's holds by reference and retries with the same Idempotency-Key,
// which must answer with the reservation found, if there was one. It
// reports whether the order holds its lines.
func (s *sagaRun) reserve(o *sagaOrder) bool {
	body, _ := json.Marshal(map[string]any{"reference": o.ref, "lines": o.lines, "ttl_seconds": o.ttl})
	hdr := http.Header{"Idempotency-Key": {o.key}}
	found := "" // a reservation the service holds under o.ref, seen after an unknown outcome
	var lastErr error
	for attempt := 0; attempt < 10; attempt++ {
		r, err := s.call(http.MethodPost, "/reservations", body, hdr)
		if err != nil {
			lastErr = err
			o.unknowns++
			s.unknown.Add(1)
			rs, ok := s.byReference(o.ref)
			if !ok {
				return false
			}
			if len(rs) > 1 {
				s.fail("order %s: %d reservations under one reference after a retry", o.ref, len(rs))
			}
			if len(rs) > 0 {
				found = rs[0].ID
			}
			continue
		}
		switch {
		case r.Status == http.StatusCreated:
			var res sagaReservation
			if err := json.Unmarshal(r.Body, &res); err != nil || res.ID == "" {
				s.fail("order %s: POST /reservations: bad body %s", o.ref, r)
				return false
			}
			if loc := r.Header.Get("Location"); loc != "/reservations/"+res.ID {
				s.fail("order %s: Location %q for reservation %s", o.ref, loc, res.ID)
			}
			if found != "" && res.ID != found {
				s.fail("order %s: retried POST with the same Idempotency-Key answered %s, but %s was held", o.ref, res.ID, found)
			}
			if found != "" && r.Header.Get("Idempotency-Replayed") != "true" {
				s.fail("order %s: retried POST of the committed reservation %s is not marked Idempotency-Replayed", o.ref, found)
			}
			if res.Reference != o.ref || !slices.Equal(res.Lines, o.lines) {
				s.fail("order %s: reservation %s has reference %q lines %v, want %v", o.ref, res.ID, res.Reference, res.Lines, o.lines)
			}
			o.resID, o.acked = res.ID, "held"
			if o.retry {
				s.retryReserve(o, body, hdr)
			}
			return true
		case r.Status == http.StatusConflict && problemSlug(r) == "insufficient-stock":
			if found != "" {
				s.fail("order %s: retried POST answered insufficient-stock although %s was held under the same key", o.ref, found)
			}
			o.short = true
			return false
		default:
			s.fail("order %s: POST /reservations: %s", o.ref, r)
			return false
		}
	}
	s.fail("order %s: POST /reservations: no definite answer in 10 attempts; last: %v", o.ref, lastErr)
	return false
}

// retryReserve repeats a POST that succeeded, as a saga step retried after
// a timeout: the same reservation comes back, marked as a replay.
func (s *sagaRun) retryReserve(o *sagaOrder, body []byte, hdr http.Header) {
	r, err := s.call(http.MethodPost, "/reservations", body, hdr)
	if err != nil {
		return // the kill came between; the final check covers the order
	}
	var res sagaReservation
	_ = json.Unmarshal(r.Body, &res)
	if r.Status != http.StatusCreated || res.ID != o.resID || r.Header.Get("Idempotency-Replayed") != "true" {
		s.fail("order %s: repeated POST with the same Idempotency-Key: %s (replayed=%q), want 201 with %s",
			o.ref, r, r.Header.Get("Idempotency-Replayed"), o.resID)
	}
}

// transition confirms or releases the order's reservation. After an
// unknown outcome it reads the reservation and retries only if it is still
// held.
func (s *sagaRun) transition(o *sagaOrder, to string) {
	verb := map[string]string{"confirmed": "confirm", "released": "release"}[to]
	path := "/reservations/" + o.resID + "/" + verb
	var lastErr error
	for attempt := 0; attempt < 10; attempt++ {
		r, err := s.call(http.MethodPost, path, nil, nil)
		if err != nil {
			lastErr = err
			o.unknowns++
			s.unknown.Add(1)
			res, ok := s.reservation(o.resID)
			if !ok {
				return
			}
			switch res.State {
			case to, "expired":
				o.acked = res.State
				return
			case "held":
				continue
			default:
				s.fail("order %s: after an unknown %s, reservation %s is %s", o.ref, verb, o.resID, res.State)
				return
			}
		}
		switch {
		case r.Status == http.StatusOK:
			var res sagaReservation
			if json.Unmarshal(r.Body, &res) != nil || res.State != to || res.ID != o.resID {
				s.fail("order %s: POST %s: %s, want state %s", o.ref, path, r, to)
				return
			}
			o.acked = to
			if o.retry {
				s.retryTransition(o, path, to)
			}
			return
		case r.Status == http.StatusConflict && problemSlug(r) == "reservation-expired" && to == "confirmed":
			o.acked = "expired"
			return
		default:
			s.fail("order %s: POST %s: %s", o.ref, path, r)
			return
		}
	}
	s.fail("order %s: POST %s: no definite answer in 10 attempts; last: %v", o.ref, path, lastErr)
}

// retryTransition repeats a transition that succeeded (200, same state),
// and after a release tries the other one (409 invalid-state).
func (s *sagaRun) retryTransition(o *sagaOrder, path, to string) {
	if r, err := s.call(http.MethodPost, path, nil, nil); err == nil {
		var res sagaReservation
		if json.Unmarshal(r.Body, &res) != nil || r.Status != http.StatusOK || res.State != to {
			s.fail("order %s: repeated POST %s: %s, want 200 %s", o.ref, path, r, to)
		}
	}
	if to != "released" {
		return
	}
	other := "/reservations/" + o.resID + "/confirm"
	if r, err := s.call(http.MethodPost, other, nil, nil); err == nil {
		if r.Status != http.StatusConflict || problemSlug(r) != "invalid-state" {
			s.fail("order %s: POST %s after a release: %s, want 409 invalid-state", o.ref, other, r)
		}
	}
}

// TestSagaSimulation plays many concurrent orders against the real binary,
// kills it with -9 in the middle (E2E_SAGA_KILLS times) and restarts it on
// the same store, then checks stock, holds and the replayed feed against the
// final state of every reservation.
func TestSagaSimulation(t *testing.T) {
	const (
		nProducts = 20
		workers   = 16
	)
	nOrders := envInt(t, "E2E_SAGA_ORDERS", 600)
	kills := envInt(t, "E2E_SAGA_KILLS", 2)
	budget := envDuration(t, "E2E_SAGA_DURATION", 30*time.Second)
	seed := uint64(time.Now().UnixNano())
	t.Logf("seed %d: %d orders, %d workers, %d kills, budget %v", seed, nOrders, workers, kills, budget)
	rng := rand.New(rand.NewPCG(seed, 12))

	env := storeEnv(t)
	svc, c := startReadyService(t, env)
	initial := map[int64]int64{}
	var ids []int64
	for i := 0; i < nProducts; i++ {
		stock := 50 + rng.Int64N(101)
		p := mustCreate(t, c, fmt.Sprintf("saga-%02d", i), "saga product", 1000, map[string]any{"stock": stock})
		initial[p.ID] = stock
		ids = append(ids, p.ID)
	}

	orders := make([]*sagaOrder, nOrders)
	for i := range orders {
		o := &sagaOrder{ref: fmt.Sprintf("order-%d-%04d", seed%100000, i), plan: sagaPlan(rng.IntN(3)), ttl: 60, retry: rng.IntN(5) == 0}
		o.key = "idem-" + o.ref
		if o.plan == planAbandon {
			o.ttl = 1 + rng.Int64N(2)
		}
		for _, j := range rng.Perm(nProducts)[:1+rng.IntN(3)] {
			o.lines = append(o.lines, sagaLine{ProductID: ids[j], Quantity: 1 + rng.Int64N(5)})
		}
		orders[i] = o
	}

	run := &sagaRun{}
	run.cur.Store(c)
	fol := &feedFollower{run: run}
	folCtx, stopFollower := context.WithCancel(context.Background())
	defer stopFollower()
	folDone := make(chan struct{})
	go func() {
		defer close(folDone)
		fol.follow(folCtx)
	}()
	var next, done atomic.Int64
	deadline := time.Now().Add(budget)
	var wg sync.WaitGroup
	for w := 0; w < workers; w++ {
		wg.Add(1)
		go func(w int) {
			defer wg.Done()
			wrng := rand.New(rand.NewPCG(seed, uint64(w)))
			for time.Now().Before(deadline) {
				i := next.Add(1) - 1
				if i >= int64(len(orders)) {
					return
				}
				run.run(orders[i], wrng)
				done.Add(1)
			}
		}(w)
	}

	// kill -9 at evenly spaced points of progress, restarting on the same
	// store each time; the workers carry on against the new process.
	killed := 0
	for k := 1; k <= kills; k++ {
		at := int64(nOrders * k / (kills + 1))
		if !pollUntil(time.Until(deadline), 5*time.Millisecond, func() bool { return done.Load() >= at }) {
			break
		}
		svc.Kill()
		killed++
		svc, c = startReadyService(t, env)
		run.cur.Store(c)
		t.Logf("kill %d after %d orders; restarted as pid %d", k, at, svc.PID())
	}
	wg.Wait()
	for _, e := range run.errs {
		t.Error(e)
	}
	played := int(done.Load())
	if played < nOrders {
		t.Errorf("only %d of %d orders finished within %v", played, nOrders, budget)
	}
	if killed < kills {
		t.Errorf("only %d of %d kills happened", killed, kills)
	}

	// Every abandoned hold must come to read expired, recorded by the
	// sweeper; nothing else may still be held.
	final := map[string]*sagaOrder{}
	for _, o := range orders[:played] {
		if o.resID != "" {
			final[o.resID] = o
		}
	}
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	getRes := func(o *sagaOrder) bool {
		r, err := c.do(ctx, http.MethodGet, "/reservations/"+o.resID, nil, nil)
		if err != nil || r.Status != http.StatusOK || json.Unmarshal(r.Body, &o.final) != nil {
			return false
		}
		return o.final.State != "held"
	}
	pending := make([]*sagaOrder, 0, len(final))
	for _, o := range final {
		pending = append(pending, o)
	}
	if !pollUntil(30*time.Second, 100*time.Millisecond, func() bool {
		pending = slices.DeleteFunc(pending, getRes)
		return len(pending) == 0
	}) {
		for _, o := range pending[:min(5, len(pending))] {
			t.Errorf("order %s (%s, ttl %ds): reservation %s still %s at %v, expires_at %v",
				o.ref, o.plan, o.ttl, o.resID, o.final.State, time.Now().UTC(), o.final.ExpiresAt)
		}
		t.Fatalf("%d reservations still held 30s after the load", len(pending))
	}

	// The final state of every order: at most one reservation under its
	// reference, the one it knows, in a state consistent with what the
	// service acknowledged.
	confirmed := map[int64]int64{}
	held := map[int64]int64{}
	var nHeld, nConfirmed, nReleased, nExpired, nShort, nUnknownOrders int
	for _, o := range orders[:played] {
		if o.unknowns > 0 {
			nUnknownOrders++
		}
		r, err := c.do(ctx, http.MethodGet, "/reservations?reference="+url.QueryEscape(o.ref), nil, nil)
		var body struct {
			Items []sagaReservation `json:"items"`
		}
		if err != nil || r.Status != http.StatusOK || json.Unmarshal(r.Body, &body) != nil {
			t.Fatalf("GET /reservations?reference=%s: %v %v", o.ref, r, err)
		}
		switch {
		case len(body.Items) > 1:
			t.Errorf("order %s: %d reservations under its reference, want at most 1", o.ref, len(body.Items))
		case o.resID == "" && len(body.Items) == 1:
			t.Errorf("order %s (short=%v): reservation %s exists that no answer acknowledged", o.ref, o.short, body.Items[0].ID)
		case o.resID != "" && (len(body.Items) == 0 || body.Items[0].ID != o.resID):
			t.Errorf("order %s: reservation %s not found by reference (got %v)", o.ref, o.resID, body.Items)
		}
		if o.short {
			nShort++
		}
		if o.resID == "" {
			continue
		}
		f := o.final
		want := map[sagaPlan]string{planPay: "confirmed", planCompensate: "released", planAbandon: "expired"}[o.plan]
		if f.State != want && !(o.plan == planPay && f.State == "expired" && o.acked == "expired") {
			t.Errorf("order %s (%s): reservation %s ends %s (acknowledged %q), want %s", o.ref, o.plan, o.resID, f.State, o.acked, want)
		}
		if o.acked != "held" && o.acked != f.State {
			t.Errorf("order %s: the service acknowledged %s, but reservation %s reads %s", o.ref, o.acked, o.resID, f.State)
		}
		switch f.State {
		case "held":
			nHeld++
		case "confirmed":
			nConfirmed++
		case "released":
			nReleased++
		case "expired":
			nExpired++
		}
		for _, l := range f.Lines {
			switch f.State {
			case "confirmed":
				confirmed[l.ProductID] += l.Quantity
			case "held":
				held[l.ProductID] += l.Quantity
			}
		}
	}

	// Stock = initial − confirmed; reserved = what is held; available =
	// stock − reserved; never more held and confirmed than there was.
	products := map[int64]invProduct{}
	for _, id := range ids {
		r, err := c.do(ctx, http.MethodGet, "/products/"+strconv.FormatInt(id, 10), nil, nil)
		var p invProduct
		if err != nil || r.Status != http.StatusOK || json.Unmarshal(r.Body, &p) != nil {
			t.Fatalf("GET /products/%d: %v %v", id, r, err)
		}
		products[id] = p
		if want := initial[id] - confirmed[id]; p.Stock != want {
			t.Errorf("product %d: stock %d, want %d (initial %d − confirmed %d)", id, p.Stock, want, initial[id], confirmed[id])
		}
		if p.Reserved != held[id] {
			t.Errorf("product %d: reserved %d, want %d held", id, p.Reserved, held[id])
		}
		if p.Available == nil || *p.Available != p.Stock-p.Reserved {
			t.Errorf("product %d: available %v, want stock %d − reserved %d", id, p.Available, p.Stock, p.Reserved)
		}
		if held[id]+confirmed[id] > initial[id] {
			t.Errorf("product %d over-committed: %d held + %d confirmed > %d initial", id, held[id], confirmed[id], initial[id])
		}
	}

	events := checkSagaFeed(t, c, ids, products, initial, final)

	// The consumer that followed the stream through the kills, resuming
	// with Last-Event-ID each time, saw exactly the replayed feed.
	head := events[len(events)-1].Seq
	if !pollUntil(20*time.Second, 20*time.Millisecond, func() bool { return fol.last() >= head }) {
		t.Errorf("stream consumer at seq %d, %v after the feed's last event %d", fol.last(), 20*time.Second, head)
	}
	stopFollower()
	<-folDone
	seqs, reconnects := fol.result()
	if len(fol.errs) > 0 {
		t.Errorf("stream consumer: %v", fol.errs)
	}
	want := make([]int64, len(events))
	for i, e := range events {
		want[i] = e.Seq
	}
	if !slices.Equal(seqs, want) {
		t.Errorf("stream consumer received %d events (last %v), the feed has %d: the stream skipped, repeated or invented events",
			len(seqs), seqs[max(0, len(seqs)-3):], len(want))
	}

	t.Logf("RESULT backend=%s orders=%d held=%d confirmed=%d released=%d expired=%d shorts=%d kills=%d unknown_outcomes=%d (orders %d) events_replayed=%d streamed=%d (reconnects %d)",
		map[bool]string{false: "sqlite", true: "postgres"}[onPostgres()],
		played, nHeld, nConfirmed, nReleased, nExpired, nShort, killed, run.unknown.Load(), nUnknownOrders, len(events), len(seqs), reconnects)
	if code := svc.Stop(30 * time.Second); code != 0 {
		t.Errorf("final SIGTERM: exit status %d, want 0", code)
	}
}

// readFeed pages through GET /events from after until next_after stops
// moving.
func readFeed(t *testing.T, c *client, after int64) []feedEvent {
	t.Helper()
	var all []feedEvent
	for page := 0; page < 10000; page++ {
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		r, err := c.do(ctx, http.MethodGet, fmt.Sprintf("/events?after=%d&limit=1000", after), nil, nil)
		cancel()
		var p eventsPage
		if err != nil || r.Status != http.StatusOK || json.Unmarshal(r.Body, &p) != nil {
			t.Fatalf("GET /events?after=%d: %v %v", after, r, err)
		}
		all = append(all, p.Events...)
		if p.NextAfter == after {
			if len(p.Events) > 0 {
				t.Fatalf("GET /events?after=%d: %d events but next_after did not move", after, len(p.Events))
			}
			return all
		}
		if len(p.Events) == 0 || p.NextAfter != p.Events[len(p.Events)-1].Seq {
			t.Fatalf("GET /events?after=%d: next_after %d is not the last event's seq (%d events)", after, p.NextAfter, len(p.Events))
		}
		after = p.NextAfter
	}
	t.Fatalf("GET /events: more than 10000 pages")
	return nil
}

// checkSagaFeed replays the whole feed and checks it against the final
// products and reservations. It returns the events replayed.
func checkSagaFeed(t *testing.T, c *client, ids []int64, products map[int64]invProduct, initial map[int64]int64, final map[string]*sagaOrder) []feedEvent {
	t.Helper()
	events := readFeed(t, c, 0)
	last := map[int64]invProduct{}
	resState := map[string]string{}
	resEvents := map[string][]string{}
	confirmedByFeed := map[int64]int64{}
	var prev int64
	for i, e := range events {
		if e.Seq <= prev {
			t.Fatalf("event %d: seq %d after %d; want strictly increasing", i, e.Seq, prev)
		}
		prev = e.Seq
		switch {
		case e.ReservationID != "":
			var r sagaReservation
			if err := json.Unmarshal(e.Data, &r); err != nil || r.ID != e.ReservationID || r.State != e.State {
				t.Errorf("event %d (%s): data %s does not match reservation %s state %s", e.Seq, e.Type, e.Data, e.ReservationID, e.State)
			}
			if e.Type != "reservation."+e.State {
				t.Errorf("event %d: type %s with state %s", e.Seq, e.Type, e.State)
			}
			resState[e.ReservationID] = e.State
			resEvents[e.ReservationID] = append(resEvents[e.ReservationID], e.State)
			if e.State == "confirmed" {
				for _, l := range r.Lines {
					confirmedByFeed[l.ProductID] += l.Quantity
				}
			}
		case e.ProductID > 0:
			var p invProduct
			if err := json.Unmarshal(e.Data, &p); err != nil || p.ID != e.ProductID || p.Version != e.Version {
				t.Errorf("event %d (%s): data %s does not match product %d version %d", e.Seq, e.Type, e.Data, e.ProductID, e.Version)
				continue
			}
			if before, ok := last[p.ID]; ok && p.Version <= before.Version {
				t.Errorf("event %d: product %d version %d after version %d", e.Seq, p.ID, p.Version, before.Version)
			}
			if p.Stock < 0 || p.Reserved < 0 || p.Reserved > p.Stock {
				t.Errorf("event %d: product %d over-committed: stock %d, reserved %d", e.Seq, p.ID, p.Stock, p.Reserved)
			}
			last[p.ID] = p
		default:
			t.Errorf("event %d (%s) names neither a product nor a reservation", e.Seq, e.Type)
		}
	}
	for _, id := range ids {
		got, want := last[id], products[id]
		got.Available, want.Available = nil, nil
		if got.Stock != want.Stock || got.Reserved != want.Reserved || got.Version != want.Version || got.SKU != want.SKU || !got.UpdatedAt.Equal(want.UpdatedAt) {
			t.Errorf("product %d: replaying the feed gives %+v, GET gives %+v", id, got, want)
		}
		if confirmedByFeed[id] != initial[id]-want.Stock {
			t.Errorf("product %d: the feed confirms %d units, stock fell by %d", id, confirmedByFeed[id], initial[id]-want.Stock)
		}
	}
	for id, o := range final {
		states := resEvents[id]
		if len(states) == 0 || states[0] != "held" || len(states) > 2 {
			t.Errorf("reservation %s (order %s): events %v, want held then at most one end", id, o.ref, states)
		}
		if resState[id] != o.final.State {
			t.Errorf("reservation %s (order %s): last event says %s, GET says %s", id, o.ref, resState[id], o.final.State)
		}
	}
	for id := range resState {
		if final[id] == nil {
			t.Errorf("the feed has events of reservation %s, which no order knows", id)
		}
	}
	return events
}

// feedFollower follows GET /events as Server-Sent Events through the whole
// simulation, reconnecting to whichever process runs with the Last-Event-ID
// of the last event it read, and records every seq it received.
type feedFollower struct {
	run *sagaRun

	mu         sync.Mutex
	seqs       []int64
	reconnects int
	errs       []string
}

func (f *feedFollower) last() int64 {
	f.mu.Lock()
	defer f.mu.Unlock()
	if len(f.seqs) == 0 {
		return 0
	}
	return f.seqs[len(f.seqs)-1]
}

func (f *feedFollower) result() ([]int64, int) {
	f.mu.Lock()
	defer f.mu.Unlock()
	return slices.Clone(f.seqs), f.reconnects
}

// follow runs until ctx ends, for at most 2000 connections.
func (f *feedFollower) follow(ctx context.Context) {
	for attempt := 0; attempt < 2000 && ctx.Err() == nil; attempt++ {
		if attempt > 0 {
			f.mu.Lock()
			f.reconnects++
			f.mu.Unlock()
			select {
			case <-ctx.Done():
				return
			case <-time.After(20 * time.Millisecond):
			}
		}
		f.stream(ctx)
	}
}

// stream reads one connection's events until it ends.
func (f *feedFollower) stream(ctx context.Context) {
	c := f.run.cur.Load()
	hdr := http.Header{"Accept": {"text/event-stream"}, "Last-Event-ID": {strconv.FormatInt(f.last(), 10)}}
	req, err := c.newRequest(ctx, http.MethodGet, "/events", nil, hdr)
	if err != nil {
		return
	}
	res, err := (&http.Client{Transport: c.tr}).Do(req)
	if err != nil {
		return // the process is gone or not yet back
	}
	defer res.Body.Close()
	if res.StatusCode != http.StatusOK {
		return
	}
	sc := bufio.NewScanner(res.Body)
	sc.Buffer(make([]byte, 64<<10), 4<<20)
	for sc.Scan() {
		v, ok := strings.CutPrefix(sc.Text(), "id: ")
		if !ok {
			continue
		}
		seq, err := strconv.ParseInt(v, 10, 64)
		f.mu.Lock()
		switch {
		case err != nil:
			f.errs = append(f.errs, "bad id line "+v)
		case len(f.seqs) > 0 && seq <= f.seqs[len(f.seqs)-1]:
			if len(f.errs) < 10 {
				f.errs = append(f.errs, fmt.Sprintf("seq %d after %d", seq, f.seqs[len(f.seqs)-1]))
			}
		default:
			f.seqs = append(f.seqs, seq)
		}
		f.mu.Unlock()
	}
}
