package main

// Reservations and the change feed: conformance tests run on both stores
// (TestStore_*), and the service and HTTP behaviour around them.

import (
	"context"
	"errors"
	"fmt"
	"net/http"
	"net/http/httptest"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/google/go-cmp/cmp"
	dto "github.com/prometheus/client_model/go"
)

// testClock is a store clock the test moves.
type testClock struct{ t atomic.Pointer[time.Time] }

func newTestClock(s productStore) *testClock {
	c := &testClock{}
	now := time.Now().UTC().Truncate(time.Microsecond)
	c.t.Store(&now)
	setStoreClock(s, c.now)
	return c
}

func (c *testClock) now() time.Time { return *c.t.Load() }
func (c *testClock) advance(d time.Duration) {
	t := c.now().Add(d)
	c.t.Store(&t)
}

// stocked creates a product with stock units.
func stocked(tb testing.TB, s productStore, sku string, stock int64) Product {
	tb.Helper()
	p := newProduct(sku)
	p.Stock = stock
	p, _, err := s.Create(context.Background(), "", p, nil)
	if err != nil {
		tb.Fatal(err)
	}
	return p
}

func hold(ref string, lines ...ReservationLine) Reservation {
	return Reservation{ID: newReservationID(), Reference: ref, Lines: lines}
}

func mustGet(tb testing.TB, s productStore, id int64) Product {
	tb.Helper()
	p, err := s.Get(context.Background(), id)
	if err != nil {
		tb.Fatal(err)
	}
	return p
}

func TestStore_Reserve_allOrNothing(t *testing.T) {
	forEachStore(t, func(t *testing.T, s productStore) {
		a, b := stocked(t, s, "RA", 5), stocked(t, s, "RB", 2)
		// One short line: nothing is held, and every short line is named.
		_, _, err := storeReserve(s, t.Context(), hold("o-1", ReservationLine{a.ID, 6}, ReservationLine{b.ID, 1}), time.Minute, nil)
		var short *ShortageError
		if !errors.As(err, &short) || !errors.Is(err, ErrInsufficientStock) {
			t.Fatalf("Reserve beyond stock error = %v, want a *ShortageError", err)
		}
		if want := []Shortage{{Line: 0, ProductID: a.ID, Requested: 6, Available: 5}}; !cmp.Equal(short.Lines, want) {
			t.Errorf("shortages = %+v, want %+v", short.Lines, want)
		}
		_, _, err = storeReserve(s, t.Context(), hold("o-1", ReservationLine{a.ID, 9}, ReservationLine{b.ID, 3}), time.Minute, nil)
		if !errors.As(err, &short) || len(short.Lines) != 2 {
			t.Errorf("two short lines: error = %v, want both named", err)
		}
		if got := mustGet(t, s, a.ID); got.Reserved != 0 || got.Version != a.Version {
			t.Errorf("after refused reservations product = %+v, want nothing held and its version unchanged", got)
		}
		// An unknown product is named by its line.
		_, _, err = storeReserve(s, t.Context(), hold("o-1", ReservationLine{a.ID, 1}, ReservationLine{a.ID + 1000, 1}), time.Minute, nil)
		var verr *ValidationError
		if !errors.As(err, &verr) || verr.Problems["lines[1].product_id"] == "" {
			t.Errorf("unknown product error = %v, want a *ValidationError naming lines[1].product_id", err)
		}

		r, changed, err := storeReserve(s, t.Context(), hold("o-1", ReservationLine{b.ID, 2}, ReservationLine{a.ID, 3}), time.Minute, nil)
		if err != nil {
			t.Fatal(err)
		}
		if r.State != StateHeld || r.Reference != "o-1" || len(r.Lines) != 2 || !r.ExpiresAt.After(r.CreatedAt) {
			t.Errorf("reservation = %+v, want held with both lines", r)
		}
		if len(changed) != 2 {
			t.Errorf("changed products = %d, want 2", len(changed))
		}
		ga, gb := mustGet(t, s, a.ID), mustGet(t, s, b.ID)
		if ga.Reserved != 3 || ga.Stock != 5 || gb.Reserved != 2 || ga.Version != a.Version+1 {
			t.Errorf("after holding: a = %+v, b = %+v, want reserved 3 and 2, stock kept, a new version", ga, gb)
		}
		got, err := s.Reservation(t.Context(), r.ID)
		if err != nil || !cmp.Equal(got, r) {
			t.Errorf("Reservation(%s) = %+v, %v, want %+v", r.ID, got, err, r)
		}
		byRef, err := s.ReservationsByReference(t.Context(), "o-1", 10)
		if err != nil || len(byRef) != 1 || byRef[0].ID != r.ID {
			t.Errorf("ReservationsByReference(o-1) = %+v, %v, want the one reservation", byRef, err)
		}
		if _, err := s.Reservation(t.Context(), newReservationID()); !errors.Is(err, ErrReservationNotFound) {
			t.Errorf("Reservation(unknown) error = %v, want ErrReservationNotFound", err)
		}
	})
}

func TestStore_Reservation_transitions(t *testing.T) {
	forEachStore(t, func(t *testing.T, s productStore) {
		p := stocked(t, s, "TR", 10)
		reserveOne := func(q int64) Reservation {
			t.Helper()
			r, _, err := storeReserve(s, t.Context(), hold("o-t", ReservationLine{p.ID, q}), time.Minute, nil)
			if err != nil {
				t.Fatal(err)
			}
			return r
		}
		a, b := reserveOne(3), reserveOne(2)
		ca, changed, err := storeTransition(s, t.Context(), a.ID, StateConfirmed)
		if err != nil || ca.State != StateConfirmed || len(changed) != 1 {
			t.Fatalf("confirm = %+v, %d changed, %v", ca, len(changed), err)
		}
		if got := mustGet(t, s, p.ID); got.Stock != 7 || got.Reserved != 2 {
			t.Errorf("after confirming 3 of 10 with 2 more held: stock %d reserved %d, want 7 and 2", got.Stock, got.Reserved)
		}
		again, changed, err := storeTransition(s, t.Context(), a.ID, StateConfirmed)
		if err != nil || len(changed) != 0 || !cmp.Equal(again, ca) {
			t.Errorf("confirm again = %+v, %d changed, %v, want the same reservation, nothing changed", again, len(changed), err)
		}
		if _, _, err := storeTransition(s, t.Context(), a.ID, StateReleased); !errors.Is(err, ErrInvalidState) {
			t.Errorf("release after confirm error = %v, want ErrInvalidState", err)
		}
		rb, _, err := storeTransition(s, t.Context(), b.ID, StateReleased)
		if err != nil || rb.State != StateReleased {
			t.Fatalf("release = %+v, %v", rb, err)
		}
		if got := mustGet(t, s, p.ID); got.Stock != 7 || got.Reserved != 0 {
			t.Errorf("after releasing 2: stock %d reserved %d, want 7 and 0", got.Stock, got.Reserved)
		}
		if _, _, err := storeTransition(s, t.Context(), b.ID, StateConfirmed); !errors.Is(err, ErrInvalidState) {
			t.Errorf("confirm after release error = %v, want ErrInvalidState", err)
		}
		if _, _, err := storeTransition(s, t.Context(), newReservationID(), StateConfirmed); !errors.Is(err, ErrReservationNotFound) {
			t.Errorf("confirm unknown error = %v, want ErrReservationNotFound", err)
		}
	})
}

func TestStore_Reservation_expiry(t *testing.T) {
	forEachStore(t, func(t *testing.T, s productStore) {
		clock := newTestClock(s)
		p := stocked(t, s, "EX", 10)
		r, _, err := storeReserve(s, t.Context(), hold("o-x", ReservationLine{p.ID, 8}), time.Minute, nil)
		if err != nil {
			t.Fatal(err)
		}
		if _, _, err := storeReserve(s, t.Context(), hold("o-y", ReservationLine{p.ID, 5}), time.Minute, nil); !errors.Is(err, ErrInsufficientStock) {
			t.Fatalf("reserve 5 beside a hold of 8 of 10 error = %v, want insufficient stock", err)
		}
		clock.advance(time.Minute)
		// The moment it expires its units count again, before any sweep.
		r2, _, err := storeReserve(s, t.Context(), hold("o-y", ReservationLine{p.ID, 5}), time.Minute, nil)
		if err != nil {
			t.Fatalf("reserve after the hold expired error = %v, want nil", err)
		}
		if got := mustGet(t, s, p.ID); got.Reserved != 5 {
			t.Errorf("reserved = %d, want 5: the expired hold no longer counts", got.Reserved)
		}
		// An adjustment, too, may take what the expired hold had.
		clock.advance(time.Minute) // r2 expires as well
		if q, _, err := s.AdjustStock(t.Context(), "", p.ID, -10, nil, nil); err != nil || q.Stock != 0 || q.Reserved != 0 {
			t.Errorf("adjust -10 after both holds expired = %+v, %v, want stock 0, reserved 0", q, err)
		}
		// Confirming an expired hold is refused, and records it expired.
		got, changed, err := storeTransition(s, t.Context(), r.ID, StateConfirmed)
		if err != nil || got.State != StateExpired {
			t.Errorf("confirm expired = %+v, %v, want it returned expired", got, err)
		}
		if len(changed) != 0 {
			t.Errorf("confirm expired changed %d products, want none (the adjustment released its lines)", len(changed))
		}
		// The sweeper records the rest.
		n, _, err := s.ExpireReservations(t.Context(), 100)
		if err != nil || n != 1 {
			t.Errorf("ExpireReservations = %d, %v, want 1 (r2)", n, err)
		}
		if got, _ := s.Reservation(t.Context(), r2.ID); got.State != StateExpired {
			t.Errorf("r2 state = %s, want expired", got.State)
		}
		if n, _, err := s.ExpireReservations(t.Context(), 100); err != nil || n != 0 {
			t.Errorf("second sweep = %d, %v, want nothing left", n, err)
		}
	})
}

func TestStore_Reservation_sweeperReleases(t *testing.T) {
	forEachStore(t, func(t *testing.T, s productStore) {
		clock := newTestClock(s)
		a, b := stocked(t, s, "SA", 4), stocked(t, s, "SB", 4)
		r, _, err := storeReserve(s, t.Context(), hold("o-s", ReservationLine{a.ID, 4}, ReservationLine{b.ID, 1}), time.Second, nil)
		if err != nil {
			t.Fatal(err)
		}
		clock.advance(2 * time.Second)
		n, changed, err := s.ExpireReservations(t.Context(), 100)
		if err != nil || n != 1 || len(changed) != 2 {
			t.Fatalf("ExpireReservations = %d, %d changed, %v, want 1 and both products", n, len(changed), err)
		}
		if ga, gb := mustGet(t, s, a.ID), mustGet(t, s, b.ID); ga.Reserved != 0 || gb.Reserved != 0 || ga.Stock != 4 {
			t.Errorf("after the sweep a = %+v, b = %+v, want nothing reserved, stock kept", ga, gb)
		}
		if got, _ := s.Reservation(t.Context(), r.ID); got.State != StateExpired {
			t.Errorf("state = %s, want expired", got.State)
		}
		if _, _, err := storeTransition(s, t.Context(), r.ID, StateReleased); err != nil {
			t.Errorf("release of an expired reservation error = %v, want it returned as it is", err)
		}
	})
}

func TestStore_Reservation_stockKeepsHolds(t *testing.T) {
	forEachStore(t, func(t *testing.T, s productStore) {
		p := stocked(t, s, "KH", 10)
		if _, _, err := storeReserve(s, t.Context(), hold("o-k", ReservationLine{p.ID, 6}), time.Minute, nil); err != nil {
			t.Fatal(err)
		}
		if _, _, err := s.AdjustStock(t.Context(), "", p.ID, -5, nil, nil); !errors.Is(err, ErrInsufficientStock) {
			t.Errorf("adjust below the held units error = %v, want ErrInsufficientStock", err)
		}
		if q, _, err := s.AdjustStock(t.Context(), "", p.ID, -4, nil, nil); err != nil || q.Stock != 6 {
			t.Errorf("adjust down to the held units = %+v, %v, want stock 6", q, err)
		}
		if _, _, err := s.Update(t.Context(), "", p.ID, ProductUpdate{Patch: ProductPatch{Stock: optional[int64]{Set: true, Value: 5}}}); !errors.Is(err, ErrInsufficientStock) {
			t.Errorf("set stock below the held units error = %v, want ErrInsufficientStock", err)
		}
		if _, err := s.Delete(t.Context(), "", p.ID, nil); !errors.Is(err, ErrReserved) {
			t.Errorf("delete with open holds error = %v, want ErrReserved", err)
		}
		if got := mustGet(t, s, p.ID); got.Stock != 6 || got.Reserved != 6 {
			t.Errorf("product = %+v, want stock 6 reserved 6", got)
		}
	})
}

func TestStore_Reserve_idempotent(t *testing.T) {
	forEachStore(t, func(t *testing.T, s productStore) {
		p := stocked(t, s, "IR", 10)
		key := &IdempotencyKey{Scope: "s", Key: "order-9-reserve", Fingerprint: "f"}
		first, _, err := storeReserve(s, t.Context(), hold("o-9", ReservationLine{p.ID, 4}), time.Minute, key)
		if err != nil {
			t.Fatal(err)
		}
		again, err := s.Reserve(t.Context(), hold("o-9", ReservationLine{p.ID, 4}), time.Minute, 0, key)
		if err != nil || !again.Replayed || !cmp.Equal(again.Reservation, first) || len(again.Changed) != 0 {
			t.Fatalf("retried Reserve = %+v, %v, want a replay of %+v changing nothing", again, err, first)
		}
		if got := mustGet(t, s, p.ID); got.Reserved != 4 {
			t.Errorf("reserved = %d after a retried reservation, want 4 (held once)", got.Reserved)
		}
	})
}

func TestStore_Reserve_concurrentNoOversell(t *testing.T) {
	forEachStore(t, func(t *testing.T, s productStore) {
		hot := []Product{stocked(t, s, "H1", 30), stocked(t, s, "H2", 30)}
		var wg sync.WaitGroup
		var mu sync.Mutex
		var held []Reservation
		var refused [2]int // refusals of the reservations taking 2 units of hot[0], of hot[1]
		for i := range 40 {
			wg.Go(func() {
				lines := []ReservationLine{{hot[i%2].ID, 2}, {hot[(i+1)%2].ID, 1}}
				r, _, err := storeReserve(s, context.Background(), hold(fmt.Sprintf("c-%d", i), lines...), time.Minute, nil)
				switch {
				case err == nil:
					mu.Lock()
					held = append(held, r)
					mu.Unlock()
				case errors.Is(err, ErrInsufficientStock):
					mu.Lock()
					refused[i%2]++
					mu.Unlock()
				default:
					t.Errorf("Reserve: %v", err)
				}
			})
		}
		wg.Wait()
		// Half confirm, half release, concurrently, each twice.
		for i, r := range held {
			to := StateConfirmed
			if i%2 == 1 {
				to = StateReleased
			}
			for range 2 {
				wg.Go(func() {
					if _, _, err := storeTransition(s, context.Background(), r.ID, to); err != nil {
						t.Errorf("%s %s: %v", to, r.ID, err)
					}
				})
			}
		}
		wg.Wait()
		for _, h := range hot {
			var confirmed int64
			for i, r := range held {
				if i%2 == 0 {
					for _, l := range r.Lines {
						if l.ProductID == h.ID {
							confirmed += l.Quantity
						}
					}
				}
			}
			got := mustGet(t, s, h.ID)
			if got.Reserved != 0 || got.Stock != 30-confirmed || got.Stock < 0 {
				t.Errorf("product %d: stock %d reserved %d, want %d and 0 (%d holds)", h.ID, got.Stock, got.Reserved, 30-confirmed, len(held))
			}
		}
		var left [2]int64 // units of hot[0] and hot[1] no hold took
		for k, h := range hot {
			left[k] = 30
			for _, r := range held {
				for _, l := range r.Lines {
					if l.ProductID == h.ID {
						left[k] -= l.Quantity
					}
				}
			}
			if left[k] < 0 {
				t.Errorf("product %d: %d units held of 30: oversold", h.ID, 30-left[k])
			}
		}
		// Refused only when short: a kind of reservation that was refused
		// does not fit in what is left (the stock only went down meanwhile).
		// How many are held depends on the order they came in (18 to 20).
		for k := range 2 {
			if refused[k] > 0 && left[k] >= 2 && left[1-k] >= 1 {
				t.Errorf("%d reservations taking 2 of product %d refused, yet %d and %d units are left", refused[k], hot[k].ID, left[k], left[1-k])
			}
		}
		if len(held) > 20 || len(held)+refused[0]+refused[1] != 40 {
			t.Errorf("%d held and %v refused of 40 reservations of 3 units on 60", len(held), refused)
		}
	})
}

func TestStore_Events_everyWrite(t *testing.T) {
	forEachStore(t, func(t *testing.T, s productStore) {
		ctx := t.Context()
		p := stocked(t, s, "EV", 5)
		created := p
		p, _, _ = s.Update(ctx, "", p.ID, ProductUpdate{Patch: ProductPatch{Name: optional[string]{Set: true, Value: "renamed"}}})
		updated := p
		p, _, _ = s.AdjustStock(ctx, "", p.ID, 1, nil, nil)
		adjusted := p
		r, _, err := storeReserve(s, ctx, hold("o-e", ReservationLine{p.ID, 2}), time.Minute, nil)
		if err != nil {
			t.Fatal(err)
		}
		if _, _, err := storeTransition(s, ctx, r.ID, StateConfirmed); err != nil {
			t.Fatal(err)
		}
		// A refused write leaves no event.
		if _, _, err := s.AdjustStock(ctx, "", p.ID, -100, nil, nil); !errors.Is(err, ErrInsufficientStock) {
			t.Fatal(err)
		}
		q := stocked(t, s, "EV2", 0)
		if _, err := s.Delete(ctx, "", q.ID, nil); err != nil {
			t.Fatal(err)
		}
		es, err := s.Events(ctx, 0, 100)
		if err != nil {
			t.Fatal(err)
		}
		var got []string
		for i, e := range es {
			got = append(got, e.Type)
			if i > 0 && e.Seq <= es[i-1].Seq {
				t.Errorf("seq %d after %d", e.Seq, es[i-1].Seq)
			}
		}
		want := []string{EventProductCreated, EventProductUpdated, EventStockChanged, EventStockChanged, EventReservationHeld,
			EventStockChanged, EventReservationConfirmed, EventProductCreated, EventProductDeleted}
		if !cmp.Equal(got, want) {
			t.Fatalf("event types = %q, want %q", got, want)
		}
		for i, want := range []Product{created, updated, adjusted} {
			if es[i].Product == nil || !cmp.Equal(*es[i].Product, want) {
				t.Errorf("event %d (%s) data = %+v, want the product its write returned, %+v", i, es[i].Type, es[i].Product, want)
			}
		}
		final := mustGet(t, s, p.ID)
		if last := es[5]; last.Product == nil || !cmp.Equal(*last.Product, final) || last.Version != final.Version {
			t.Errorf("last product event = %+v, want the product as it is, %+v", last, final)
		}
		if e := es[6]; e.Reservation == nil || e.Reservation.State != StateConfirmed || e.Reservation.ID != r.ID {
			t.Errorf("confirm event = %+v, want reservation %s confirmed", e, r.ID)
		}
		if e := es[8]; e.Product != nil || e.ProductID != q.ID || e.Version != q.Version+1 {
			t.Errorf("delete event = %+v, want product %d at the tombstone version %d, no data", e, q.ID, q.Version+1)
		}
		// after and limit page through it.
		page, err := s.Events(ctx, es[2].Seq, 2)
		if err != nil || len(page) != 2 || page[0].Seq != es[3].Seq {
			t.Errorf("Events(after %d, 2) = %+v, %v, want events 4 and 5", es[2].Seq, page, err)
		}
		if page, err := s.Events(ctx, es[8].Seq, 10); err != nil || len(page) != 0 {
			t.Errorf("Events after the last = %+v, %v, want none", page, err)
		}
	})
}

func TestStore_TrimEvents(t *testing.T) {
	forEachStore(t, func(t *testing.T, s productStore) {
		clock := newTestClock(s)
		for i := range 3 {
			stocked(t, s, fmt.Sprintf("TE-%d", i), 1)
		}
		clock.advance(time.Hour)
		stocked(t, s, "TE-new", 1)
		n, err := s.TrimEvents(t.Context(), clock.now().Add(-time.Minute))
		if err != nil || n != 3 {
			t.Fatalf("TrimEvents = %d, %v, want the 3 old events", n, err)
		}
		_, err = s.Events(t.Context(), 0, 10)
		gone, ok := errors.AsType[*FeedGoneError](err)
		if !ok || gone.Oldest != 4 {
			t.Fatalf("Events(after 0) after a trim error = %v, want a *FeedGoneError naming seq 4", err)
		}
		es, err := s.Events(t.Context(), 3, 10)
		if err != nil || len(es) != 1 || es[0].Seq != 4 {
			t.Errorf("Events(after 3) = %+v, %v, want the one kept event", es, err)
		}
	})
}

// TestPostgres_Events_outOfOrderCommits holds a transaction with an event
// open while a later write commits: the feed must not let a consumer step
// past the open transaction's event, which gets its seq once it commits.
func TestPostgres_Events_outOfOrderCommits(t *testing.T) {
	s := newTestPostgres(t)
	ctx := t.Context()
	stocked(t, s, "OO-1", 1)
	tx, err := s.pool.Begin(ctx)
	if err != nil {
		t.Fatal(err)
	}
	defer tx.Rollback(ctx)
	if _, err := tx.Exec(ctx, `INSERT INTO events (type, occurred_at, product_id, version) VALUES ('product.updated', now(), 1, 99)`); err != nil {
		t.Fatal(err)
	}
	later := stocked(t, s, "OO-2", 1) // commits first, inserted second
	es, err := s.Events(ctx, 0, 10)
	if err != nil {
		t.Fatal(err)
	}
	after := es[len(es)-1].Seq
	if es[len(es)-1].ProductID != later.ID {
		t.Fatalf("last event = %+v, want the committed create of %d", es[len(es)-1], later.ID)
	}
	if err := tx.Commit(ctx); err != nil {
		t.Fatal(err)
	}
	es, err = s.Events(ctx, after, 10)
	if err != nil || len(es) != 1 || es[0].Version != 99 {
		t.Errorf("events after %d once the slow transaction committed = %+v, %v, want its event", after, es, err)
	}
}

func TestHandleReservations(t *testing.T) {
	forEachStore(t, func(t *testing.T, s productStore) {
		ts := newTestServer(t, newTestService(t, s, ServiceConfig{LocalCacheSize: 100}))
		p := ts.createProduct(t, "HR-1", 100, `"stock":5`)
		ts.getProduct(t, p.ID) // cached now
		body := fmt.Sprintf(`{"reference":"order-123","lines":[{"product_id":%d,"quantity":2}],"ttl_seconds":60}`, p.ID)
		r := ts.write(t, http.MethodPost, "/reservations", body, "Idempotency-Key", "res-1")
		if r.status != http.StatusCreated || !strings.HasPrefix(r.header.Get("Location"), "/reservations/res_") {
			t.Fatalf("POST /reservations = %v, Location %q", r, r.header.Get("Location"))
		}
		again := ts.write(t, http.MethodPost, "/reservations", body, "Idempotency-Key", "res-1")
		if again.status != http.StatusCreated || string(again.body) != string(r.body) || again.header.Get("Idempotency-Replayed") != "true" {
			t.Errorf("retried POST /reservations = %v, want the same 201 body, replayed", again)
		}
		if got := ts.getProduct(t, p.ID); got.Reserved != 2 {
			t.Errorf("GET product after the hold: reserved %d, want 2 (no stale cache)", got.Reserved)
		}
		loc := r.header.Get("Location")
		if g := ts.get(t, loc, "Authorization", "Bearer "+testToken); g.status != 200 || string(g.body) != string(r.body) {
			t.Errorf("GET %s = %v, want the reservation", loc, g)
		}
		if g := ts.get(t, "/reservations?reference=order-123", "Authorization", "Bearer "+testToken); g.status != 200 || !strings.Contains(string(g.body), loc[len("/reservations/"):]) {
			t.Errorf("GET /reservations?reference = %v, want it listed", g)
		}
		short := ts.write(t, http.MethodPost, "/reservations", fmt.Sprintf(`{"reference":"o-2","lines":[{"product_id":%d,"quantity":4}]}`, p.ID))
		checkProblem(t, short, http.StatusConflict, "insufficient-stock", []string{"lines[0].quantity"})
		unknown := ts.write(t, http.MethodPost, "/reservations", `{"reference":"o-3","lines":[{"product_id":999999,"quantity":1}]}`)
		checkProblem(t, unknown, http.StatusUnprocessableEntity, "validation", []string{"lines[0].product_id"})
		if d := ts.write(t, http.MethodDelete, fmt.Sprintf("/products/%d", p.ID), ""); d.status != http.StatusConflict {
			t.Errorf("DELETE a product with open holds = %v, want 409", d)
		}
		c := ts.write(t, http.MethodPost, loc+"/confirm", "")
		if c.status != 200 || !strings.Contains(string(c.body), `"state":"confirmed"`) {
			t.Fatalf("confirm = %v", c)
		}
		if c2 := ts.write(t, http.MethodPost, loc+"/confirm", ""); c2.status != 200 || string(c2.body) != string(c.body) {
			t.Errorf("confirm again = %v, want the same 200 body", c2)
		}
		checkProblem(t, ts.write(t, http.MethodPost, loc+"/release", ""), http.StatusConflict, "invalid-state", nil)
		if got := ts.getProduct(t, p.ID); got.Stock != 3 || got.Reserved != 0 {
			t.Errorf("after confirming 2 of 5: stock %d reserved %d, want 3 and 0", got.Stock, got.Reserved)
		}
		checkProblem(t, ts.get(t, "/reservations/res_nope", "Authorization", "Bearer "+testToken), http.StatusNotFound, "reservation-not-found", nil)
		if g := ts.get(t, loc); g.status != http.StatusUnauthorized {
			t.Errorf("GET a reservation without a token = %v, want 401", g)
		}
		// The feed has every write, in order.
		ev := ts.get(t, "/events?after=0&limit=1000", "Authorization", "Bearer "+testToken)
		for _, typ := range []string{EventProductCreated, EventStockChanged, EventReservationHeld, EventReservationConfirmed} {
			if !strings.Contains(string(ev.body), `"type":"`+typ+`"`) {
				t.Errorf("GET /events = %s, want a %s event", ev.body, typ)
			}
		}
	})
}

func TestHandleEvents_stream(t *testing.T) {
	ts := newTestServer(t, nil)
	p := ts.createProduct(t, "SSE-1", 100)
	ctx, cancel := context.WithTimeout(t.Context(), 30*time.Second)
	defer cancel()
	req, _ := http.NewRequestWithContext(ctx, http.MethodGet, ts.URL+"/events", nil)
	req.Header.Set("Authorization", "Bearer "+testToken)
	req.Header.Set("Accept", "text/event-stream")
	resp, err := ts.client.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	if resp.StatusCode != 200 || resp.Header.Get("Content-Type") != "text/event-stream" {
		t.Fatalf("stream answered %d %s", resp.StatusCode, resp.Header.Get("Content-Type"))
	}
	lines := make(chan string, 100)
	go func() {
		defer close(lines)
		buf := make([]byte, 4096)
		var partial string
		for {
			n, err := resp.Body.Read(buf)
			partial += string(buf[:n])
			for {
				i := strings.IndexByte(partial, '\n')
				if i < 0 {
					break
				}
				lines <- partial[:i]
				partial = partial[i+1:]
			}
			if err != nil {
				return
			}
		}
	}()
	next := func(prefix string) string {
		t.Helper()
		for {
			select {
			case l, ok := <-lines:
				if !ok {
					t.Fatalf("stream ended waiting for %q", prefix)
				}
				if strings.HasPrefix(l, prefix) {
					return l
				}
			case <-ctx.Done():
				t.Fatalf("no %q line", prefix)
			}
		}
	}
	if l := next("id: "); l != "id: 1" {
		t.Errorf("first event line %q, want id: 1", l)
	}
	ts.write(t, http.MethodPost, fmt.Sprintf("/products/%d/stock/adjustments", p.ID), `{"delta":3}`)
	if l := next("id: "); l != "id: 2" {
		t.Errorf("after a write the stream sent %q, want id: 2", l)
	}
	if l := next("data: "); !strings.Contains(l, `"type":"stock.changed"`) || !strings.Contains(l, `"stock":3`) {
		t.Errorf("data line %q, want the stock change", l)
	}
	ts.life.endStreams()
	for range lines { // the stream ends cleanly
	}
}

func TestHandleEvents_boundedStreams(t *testing.T) {
	svc := newTestService(t, nil, ServiceConfig{})
	life := &lifecycle{}
	life.started.Store(true)
	srv := httptest.NewServer(newServer(serverDeps{svc: svc, log: svc.log, metrics: svc.metrics,
		tokens: newTokenSet([]string{testToken}), life: life, streams: newStreamSlots(1)}))
	defer srv.Close()
	defer life.endStreams() // before srv.Close: the open stream must end for Close to return
	open := func() *http.Response {
		t.Helper()
		req, _ := http.NewRequestWithContext(t.Context(), http.MethodGet, srv.URL+"/events", nil)
		req.Header.Set("Authorization", "Bearer "+testToken)
		req.Header.Set("Accept", "text/event-stream")
		resp, err := srv.Client().Do(req)
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { resp.Body.Close() })
		return resp
	}
	if first := open(); first.StatusCode != 200 {
		t.Fatalf("first stream = %d, want 200", first.StatusCode)
	}
	second := open()
	if second.StatusCode != http.StatusServiceUnavailable || second.Header.Get("Retry-After") == "" {
		t.Errorf("second stream beyond FEED_MAX_STREAMS=1 = %d, want 503 with Retry-After", second.StatusCode)
	}
	var m dto.Metric
	if err := svc.metrics.feedStreams.Write(&m); err != nil || m.GetGauge().GetValue() != 1 {
		t.Errorf("feed_streams = %v, %v, want 1", m.GetGauge().GetValue(), err)
	}
}
