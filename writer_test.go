package main

import (
	"context"
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
		_, err := s.write(context.Background(), nil, func(context.Context, querier) ([]byte, error) {
			close(entered)
			<-gate
			return nil, nil
		})
		done <- err
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

// insertRow is a write that inserts a product row with sku, then fails with
// err or panics with p, on the writer goroutine.
func insertRow(s *sqliteStore, sku string, err error, p any) func() (Product, error) {
	return func() (Product, error) {
		_, werr := s.write(context.Background(), nil, func(ctx context.Context, q querier) ([]byte, error) {
			if _, err := q.exec(ctx, `INSERT INTO products (sku, name, price_cents, created_at, updated_at) VALUES (?, 'x', 1, 0, 0)`, sku); err != nil {
				return nil, err
			}
			if p != nil {
				panic(p)
			}
			return nil, err
		})
		return Product{}, werr
	}
}

// TestStore_failingWriteFailsOnlyItself queues, in one group, plain creates
// and writes that insert a row and then fail: with an error of a kind the
// store has never seen, with a panic, and with a panic under an idempotency
// key. Each failing write fails alone (a panic as a *writePanic carrying the
// stack); every other write commits; nothing of the failing ones is left.
func TestStore_failingWriteFailsOnlyItself(t *testing.T) {
	s := newTestStore(t)
	release := holdWriter(t, s)

	type result struct {
		name string
		p    Product
		err  error
	}
	results := make(chan result, 16)
	var wg sync.WaitGroup
	queued := 0
	queue := func(name string, fn func() (Product, error)) {
		wg.Go(func() {
			p, err := fn()
			results <- result{name, p, err}
		})
		queued++
		waitQueued(t, s, queued) // in a known order, so that creates come on both sides of the failures
	}
	errNew := errors.New("a refusal no list names")
	for i := range 3 {
		queue(fmt.Sprintf("create %d", i), func() (Product, error) {
			p, _, err := s.Create(context.Background(), "", newProduct(fmt.Sprintf("OK-%d", i)), nil)
			return p, err
		})
		if i == 0 {
			queue("new refusal", insertRow(s, "REFUSED", errNew, nil))
			queue("panic", insertRow(s, "HALF", nil, "bug after the first statement"))
			queue("idempotent panic", func() (Product, error) {
				_, err := s.write(context.Background(), &IdempotencyKey{Scope: "s", Key: "k", Fingerprint: "f"},
					func(ctx context.Context, q querier) ([]byte, error) {
						if _, err := q.exec(ctx, `INSERT INTO products (sku, name, price_cents, created_at, updated_at) VALUES ('IDEM', 'x', 1, 0, 0)`); err != nil {
							return nil, err
						}
						panic("bug making the snapshot")
					})
				return Product{}, err
			})
		}
	}
	release()
	wg.Wait()
	close(results)

	for r := range results {
		var wp *writePanic
		isPanic := errors.As(r.err, &wp)
		switch r.name {
		case "new refusal":
			if !errors.Is(r.err, errNew) {
				t.Errorf("%s: error = %v, want its own error", r.name, r.err)
			}
		case "panic", "idempotent panic":
			if !isPanic || len(wp.Stack()) == 0 {
				t.Errorf("%s: error = %v, want a *writePanic with a stack", r.name, r.err)
			}
		default:
			if r.err != nil {
				t.Errorf("%s: error = %v, want nil: a failure of another write in its group must not fail it", r.name, r.err)
				continue
			}
			if got, err := s.Get(t.Context(), r.p.ID); err != nil || got.SKU != r.p.SKU {
				t.Errorf("%s: Get(%d) = %+v, %v, want the committed product", r.name, r.p.ID, got, err)
			}
		}
	}
	for _, sku := range []string{"REFUSED", "HALF", "IDEM"} {
		var n int
		if err := s.rdb.QueryRowContext(t.Context(), `SELECT count(*) FROM products WHERE sku = ?`, sku).Scan(&n); err != nil || n != 0 {
			t.Errorf("rows with sku %s = %d, %v, want 0: a failed write left part of itself", sku, n, err)
		}
	}
	var keys int
	if err := s.rdb.QueryRowContext(t.Context(), `SELECT count(*) FROM idempotency_keys`).Scan(&keys); err != nil || keys != 0 {
		t.Errorf("idempotency records = %d, %v, want 0", keys, err)
	}
	// The writer is alive and the count maintained.
	if _, _, err := s.Create(t.Context(), "", newProduct("LATER"), nil); err != nil {
		t.Errorf("Create after the failures error = %v, want nil", err)
	}
	var rows int64
	if err := s.rdb.QueryRowContext(t.Context(), `SELECT count(*) FROM products`).Scan(&rows); err != nil || rows != s.Count() {
		t.Errorf("products table holds %d rows, Count() = %d", rows, s.Count())
	}
}

// TestServer_panicOnWriterAnswers500 makes the write of a PATCH panic on
// the store's writer goroutine: the client gets a 500 problem, the
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

// panickyStore makes Update panic on the writer goroutine.
type panickyStore struct {
	*sqliteStore
	panicUpdates bool
}

func (s *panickyStore) Update(ctx context.Context, actor string, id int64, u ProductUpdate) (Product, bool, error) {
	if s.panicUpdates {
		_, err := s.write(ctx, nil, func(context.Context, querier) ([]byte, error) { panic("bug in a write") })
		return Product{}, false, err
	}
	return s.sqliteStore.Update(ctx, actor, id, u)
}
