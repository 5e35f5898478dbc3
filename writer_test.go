package main

import (
	"context"
	"database/sql"
	"errors"
	"fmt"
	"sync"
	"testing"
	"time"
)

// holdWriter occupies the writer goroutine with a write that waits until the
// returned release is called, so that writes queued meanwhile form one group.
func holdWriter(tb testing.TB, s *sqliteStore) (release func()) {
	tb.Helper()
	entered, gate := make(chan struct{}), make(chan struct{})
	done := make(chan error, 1)
	go func() {
		done <- s.writeTx(context.Background(), nil, func(ctx context.Context, tx *sql.Tx) error {
			close(entered)
			<-gate
			return nil
		}, nil)
	}()
	<-entered
	return func() {
		close(gate)
		if err := <-done; err != nil {
			tb.Errorf("holding write error = %v", err)
		}
	}
}

// waitQueued polls until n writes wait in the writer's queue.
func waitQueued(tb testing.TB, s *sqliteStore, n int) {
	tb.Helper()
	waitFor(tb, 10*time.Second, fmt.Sprintf("%d queued writes", n), func() bool { return len(s.writes) >= n })
}

// TestStore_panicInWriteFailsOnlyItself queues, in one group, plain creates,
// a write that inserts a row and then panics (no savepoint: the group must be
// run again without it), a write with an idempotency key that panics after
// its insert (its savepoint takes it back), and a callback after commit that
// panics. Each panicking write fails alone with a *writePanic carrying the
// stack; every other write commits; nothing of the panicking ones is left.
func TestStore_panicInWriteFailsOnlyItself(t *testing.T) {
	s := newTestStore(t)
	release := holdWriter(t, s)

	type result struct {
		name string
		p    Product
		err  error
	}
	results := make(chan result, 16)
	var wg sync.WaitGroup
	queue := func(name string, fn func() (Product, error)) {
		wg.Go(func() {
			p, err := fn()
			results <- result{name, p, err}
		})
	}
	queued := 0
	for i := range 3 {
		queue(fmt.Sprintf("create %d", i), func() (Product, error) {
			return s.Create(context.Background(), newProduct(fmt.Sprintf("OK-%d", i)), nil)
		})
		queued++
		waitQueued(t, s, queued) // in a known order, so that creates come on both sides of the panics
		if i == 0 {
			queue("half-written panic", func() (Product, error) {
				return Product{}, s.writeTx(context.Background(), nil, func(ctx context.Context, tx *sql.Tx) error {
					if _, err := s.exec(ctx, tx, `INSERT INTO products (sku, name, price_cents, created_at, updated_at) VALUES ('HALF', 'x', 1, 0, 0)`); err != nil {
						return err
					}
					panic("bug after the first statement")
				}, nil)
			})
			queued++
			waitQueued(t, s, queued)
			queue("idempotent panic", func() (Product, error) {
				idem := &idemWrite{key: &IdempotencyKey{Scope: "s", Key: "k", Fingerprint: "f"},
					result: func() any { panic("bug recording the response") }, replay: productReplay}
				return Product{}, s.writeTx(context.Background(), idem, func(ctx context.Context, tx *sql.Tx) error {
					_, err := s.exec(ctx, tx, `INSERT INTO products (sku, name, price_cents, created_at, updated_at) VALUES ('IDEM', 'x', 1, 0, 0)`)
					return err
				}, nil)
			})
			queued++
			waitQueued(t, s, queued)
			queue("onCommit panic", func() (Product, error) {
				return Product{}, s.writeTx(context.Background(), nil, func(ctx context.Context, tx *sql.Tx) error {
					_, err := s.exec(ctx, tx, `INSERT INTO products (sku, name, price_cents, created_at, updated_at) VALUES ('AFTER', 'x', 1, 0, 0)`)
					return err
				}, func() { panic("bug in a commit callback") })
			})
			queued++
			waitQueued(t, s, queued)
		}
	}
	release()
	wg.Wait()
	close(results)

	for r := range results {
		var wp *writePanic
		isPanic := errors.As(r.err, &wp)
		switch r.name {
		case "half-written panic", "idempotent panic", "onCommit panic":
			if !isPanic || len(wp.stack) == 0 {
				t.Errorf("%s: error = %v, want a *writePanic with a stack", r.name, r.err)
			}
		default:
			if r.err != nil {
				t.Errorf("%s: error = %v, want nil: a panic in another write must not fail it", r.name, r.err)
				continue
			}
			if got, err := s.Get(t.Context(), r.p.ID); err != nil || got.SKU != r.p.SKU {
				t.Errorf("%s: Get(%d) = %+v, %v, want the committed product", r.name, r.p.ID, got, err)
			}
		}
	}
	for _, sku := range []string{"HALF", "IDEM"} {
		var n int
		if err := s.read.QueryRowContext(t.Context(), `SELECT count(*) FROM products WHERE sku = ?`, sku).Scan(&n); err != nil || n != 0 {
			t.Errorf("rows with sku %s = %d, %v, want 0: a panicking write left half of itself", sku, n, err)
		}
	}
	// The writer is alive and the count maintained.
	if _, err := s.Create(t.Context(), newProduct("LATER"), nil); err != nil {
		t.Errorf("Create after the panics error = %v, want nil", err)
	}
	var rows int64
	// AFTER committed (only its callback panicked) but was not counted.
	if err := s.read.QueryRowContext(t.Context(), `SELECT count(*) FROM products WHERE sku != 'AFTER'`).Scan(&rows); err != nil || rows != s.Count() {
		t.Errorf("products table holds %d rows, Count() = %d", rows, s.Count())
	}
}

// TestServer_panicOnWriterAnswers500 makes the change function of a PATCH
// panic on the store's writer goroutine: the client gets a 500 problem, the
// log the stack, and the next request is served.
func TestServer_panicOnWriterAnswers500(t *testing.T) {
	ps := &panickyStore{sqliteStore: newTestStore(t)}
	ts := newTestServer(t, newTestService(t, ps, ServiceConfig{}))
	p := ts.createProduct(t, "PANIC-1", 100)
	ps.panicUpdates = true
	r := ts.write(t, "PATCH", fmt.Sprintf("/products/%d", p.ID), `{"name":"new"}`, "X-Request-ID", "panic-1")
	checkProblem(t, r, 500, "internal", nil)
	found := false
	for _, l := range ts.logs.logLines() {
		if l["request_id"] == "panic-1" && l["stack"] != nil && l["stack"] != "" {
			found = true
		}
	}
	if !found {
		t.Errorf("no log line with the stack for request panic-1 in:\n%s", ts.logs)
	}
	ps.panicUpdates = false
	if r := ts.write(t, "PATCH", fmt.Sprintf("/products/%d", p.ID), `{"name":"newer"}`); r.status != 200 {
		t.Errorf("PATCH after the panic = %v, want 200", r)
	}
}

// panickyStore makes Update's change function panic, on the writer goroutine.
type panickyStore struct {
	*sqliteStore
	panicUpdates bool
}

func (s *panickyStore) Update(ctx context.Context, id int64, change func(*Product) error) (Product, error) {
	if s.panicUpdates {
		change = func(*Product) error { panic("bug in a change function") }
	}
	return s.sqliteStore.Update(ctx, id, change)
}
