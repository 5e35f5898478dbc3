package main

import (
	"context"
	"database/sql"
	"database/sql/driver"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"sync"
	"testing"
	"time"

	"github.com/google/go-cmp/cmp"
	"github.com/sony/gobreaker/v2"
)

// newProduct returns a valid product to store.
func newProduct(sku string) Product {
	return Product{SKU: sku, Name: "product " + sku, PriceCents: 100, Currency: "USD"}
}

func TestOpenStore_migrationsIdempotent(t *testing.T) {
	path := filepath.Join(t.TempDir(), "products.db")
	var created Product
	for i := range 3 {
		s, err := OpenStore(t.Context(), StoreConfig{Path: path, Sync: "normal"})
		if err != nil {
			t.Fatalf("OpenStore #%d error = %v, want nil", i+1, err)
		}
		var applied int
		if err := s.read.QueryRowContext(t.Context(), `SELECT count(*) FROM schema_migrations`).Scan(&applied); err != nil {
			t.Fatal(err)
		}
		if applied != len(migrations) {
			t.Errorf("open #%d: %d migrations recorded, want %d", i+1, applied, len(migrations))
		}
		if i == 0 {
			if created, err = s.Create(t.Context(), newProduct("MIG-1"), nil, nil); err != nil {
				t.Fatal(err)
			}
		}
		got, err := s.Get(t.Context(), created.ID)
		if err != nil {
			t.Errorf("open #%d: Get(%d) error = %v", i+1, created.ID, err)
		}
		if diff := cmp.Diff(created, got); diff != "" {
			t.Errorf("open #%d: product (-want +got):\n%s", i+1, diff)
		}
		if n := s.Count(); n != 1 {
			t.Errorf("open #%d: Count() = %d, want 1", i+1, n)
		}
		if err := s.Close(); err != nil {
			t.Fatalf("Close #%d error = %v", i+1, err)
		}
	}
}

func TestStore_Close(t *testing.T) {
	for _, sync := range []string{"full", "normal"} {
		t.Run(sync, func(t *testing.T) {
			path := filepath.Join(t.TempDir(), "products.db")
			s, err := OpenStore(t.Context(), StoreConfig{Path: path, Sync: sync})
			if err != nil {
				t.Fatal(err)
			}
			for i := range 20 {
				if _, err := s.Create(t.Context(), newProduct(fmt.Sprintf("WAL-%d", i)), nil, nil); err != nil {
					t.Fatal(err)
				}
			}
			// Reads keep pooled connections open, as in service.
			if _, err := s.List(t.Context(), ListFilter{Limit: 5, Sort: "id"}); err != nil {
				t.Fatal(err)
			}
			if err := s.Close(); err != nil {
				t.Fatalf("Close() error = %v, want nil", err)
			}
			if fi, err := os.Stat(path + "-wal"); err == nil && fi.Size() != 0 {
				t.Errorf("after Close the -wal file has %d bytes, want it gone or empty (checkpointed)", fi.Size())
			} else if err != nil && !errors.Is(err, os.ErrNotExist) {
				t.Fatal(err)
			}
			// Everything is in the main file.
			s2 := openTestStore(t, path)
			if n := s2.Count(); n != 20 {
				t.Errorf("after reopening Count() = %d, want 20", n)
			}
			// Close twice is harmless.
			if err := s.Close(); err != nil {
				t.Errorf("second Close() error = %v, want nil", err)
			}
		})
	}
}

func TestStore_writeAfterClose(t *testing.T) {
	s := newTestStore(t)
	p, err := s.Create(t.Context(), newProduct("CL-1"), nil, nil)
	if err != nil {
		t.Fatal(err)
	}
	if err := s.Close(); err != nil {
		t.Fatal(err)
	}
	// Every write after Close fails with ErrUnavailable; none may block.
	writes := map[string]func(ctx context.Context) error{
		"Create": func(ctx context.Context) error { _, err := s.Create(ctx, newProduct("CL-2"), nil, nil); return err },
		"Update": func(ctx context.Context) error {
			_, err := s.Update(ctx, p.ID, func(p *Product) error { p.Name = "x"; return nil }, nil)
			return err
		},
		"AdjustStock": func(ctx context.Context) error { _, err := s.AdjustStock(ctx, p.ID, 1, nil, nil, nil); return err },
		"Delete":      func(ctx context.Context) error { return s.Delete(ctx, p.ID, nil, nil) },
	}
	for name, write := range writes {
		t.Run(name, func(t *testing.T) {
			for i := range 50 {
				errc := make(chan error, 1)
				go func() { errc <- write(context.Background()) }()
				select {
				case err := <-errc:
					if !errors.Is(err, ErrUnavailable) {
						t.Fatalf("%s #%d after Close error = %v, want ErrUnavailable", name, i, err)
					}
				case <-time.After(5 * time.Second):
					t.Fatalf("%s #%d after Close did not return within 5s", name, i)
				}
			}
		})
	}
}

func TestStore_closeWithWritesInFlight(t *testing.T) {
	s := newTestStore(t)
	// Writers race Close: each write either commits or fails with
	// ErrUnavailable, and none blocks.
	var wg sync.WaitGroup
	errs := make(chan error, 200)
	for i := range 200 {
		wg.Go(func() {
			_, err := s.Create(context.Background(), newProduct(fmt.Sprintf("RACE-%d", i)), nil, nil)
			errs <- err
		})
	}
	if err := s.Close(); err != nil {
		t.Fatal(err)
	}
	done := make(chan struct{})
	go func() { wg.Wait(); close(done) }()
	select {
	case <-done:
	case <-time.After(10 * time.Second):
		t.Fatal("writes racing Close did not all return within 10s")
	}
	close(errs)
	for err := range errs {
		if err != nil && !errors.Is(err, ErrUnavailable) {
			t.Errorf("write racing Close error = %v, want nil or ErrUnavailable", err)
		}
	}
}

func TestStore_Create_duplicateSKU(t *testing.T) {
	s := newTestStore(t)
	if _, err := s.Create(t.Context(), newProduct("UNIQ-1"), nil, nil); err != nil {
		t.Fatal(err)
	}
	_, err := s.Create(t.Context(), newProduct("UNIQ-1"), nil, nil)
	if !errors.Is(err, ErrConflict) {
		t.Errorf("Create(duplicate sku) error = %v, want ErrConflict", err)
	}
	if errors.Is(err, ErrUnavailable) {
		t.Errorf("Create(duplicate sku) error = %v is a database failure, want a conflict only", err)
	}
	if n := s.Count(); n != 1 {
		t.Errorf("Count() = %d, want 1", n)
	}
	// Update onto a taken sku is a conflict too.
	q, err := s.Create(t.Context(), newProduct("UNIQ-2"), nil, nil)
	if err != nil {
		t.Fatal(err)
	}
	_, err = s.Update(t.Context(), q.ID, func(p *Product) error { p.SKU = "UNIQ-1"; return nil }, nil)
	if !errors.Is(err, ErrConflict) {
		t.Errorf("Update(sku taken) error = %v, want ErrConflict", err)
	}
}

func TestTranslate(t *testing.T) {
	s := newTestStore(t)
	// Real driver errors, from the database itself.
	if _, err := s.write.ExecContext(t.Context(), `INSERT INTO products (sku, name, price_cents, created_at, updated_at) VALUES ('T-1', 'n', 1, 0, 0)`); err != nil {
		t.Fatal(err)
	}
	_, uniqueErr := s.write.ExecContext(t.Context(), `INSERT INTO products (sku, name, price_cents, created_at, updated_at) VALUES ('T-1', 'n', 1, 0, 0)`)
	_, checkErr := s.write.ExecContext(t.Context(), `INSERT INTO products (sku, name, price_cents, created_at, updated_at) VALUES ('T-2', 'n', -1, 0, 0)`)
	_, syntaxErr := s.write.ExecContext(t.Context(), `SELEKT 1`)
	noRowsErr := s.read.QueryRowContext(t.Context(), `SELECT id FROM products WHERE id = -1`).Scan(new(int64))

	canceled, cancel := context.WithCancel(context.Background())
	cancel()
	expired, cancel2 := context.WithDeadline(context.Background(), time.Unix(1, 0))
	defer cancel2()
	bg := context.Background()

	tests := []struct {
		name          string
		ctx           context.Context
		err           error
		wantIs        []error
		wantNotIs     []error
		wantUntouched bool
	}{
		{name: "nil", ctx: bg, err: nil},
		{name: "UNIQUE", ctx: bg, err: uniqueErr, wantIs: []error{ErrConflict}, wantNotIs: []error{ErrUnavailable}},
		{name: "CHECK", ctx: bg, err: checkErr, wantIs: []error{ErrInvalid}, wantNotIs: []error{ErrConflict, ErrUnavailable}},
		{name: "no rows", ctx: bg, err: noRowsErr, wantIs: []error{ErrNotFound}},
		{name: "wrapped no rows", ctx: bg, err: fmt.Errorf("scan: %w", sql.ErrNoRows), wantIs: []error{ErrNotFound}},
		{name: "SQL logic error", ctx: bg, err: syntaxErr, wantNotIs: []error{ErrUnavailable, ErrNotFound, ErrConflict}},
		{name: "deadline", ctx: bg, err: context.DeadlineExceeded, wantIs: []error{ErrUnavailable}},
		{name: "bad connection", ctx: bg, err: driver.ErrBadConn, wantIs: []error{ErrUnavailable}},
		{name: "connection done", ctx: bg, err: sql.ErrConnDone, wantIs: []error{ErrUnavailable}},
		{name: "canceled", ctx: bg, err: context.Canceled, wantIs: []error{context.Canceled}, wantNotIs: []error{ErrUnavailable}},
		{name: "error under canceled context", ctx: canceled, err: errors.New("interrupted"), wantIs: []error{context.Canceled}, wantNotIs: []error{ErrUnavailable}},
		{name: "error under expired context", ctx: expired, err: errors.New("interrupted"), wantIs: []error{ErrUnavailable}},
		{name: "already a domain error", ctx: bg, err: ErrNotFound, wantIs: []error{ErrNotFound}, wantUntouched: true},
		{name: "already unavailable", ctx: bg, err: &dbFailure{errors.New("x")}, wantIs: []error{ErrUnavailable}, wantUntouched: true},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			if tt.name != "nil" && tt.err == nil {
				t.Fatalf("setup: the database returned no error for %s", tt.name)
			}
			got := translate(tt.ctx, tt.err)
			if tt.err == nil {
				if got != nil {
					t.Errorf("translate(nil) = %v, want nil", got)
				}
				return
			}
			for _, want := range tt.wantIs {
				if !errors.Is(got, want) {
					t.Errorf("translate(%v) = %v, want errors.Is %v", tt.err, got, want)
				}
			}
			for _, notWant := range tt.wantNotIs {
				if errors.Is(got, notWant) {
					t.Errorf("translate(%v) = %v, want it not to be %v", tt.err, got, notWant)
				}
			}
			if tt.wantUntouched && got != tt.err {
				t.Errorf("translate(%v) = %v, want the error unchanged", tt.err, got)
			}
		})
	}
}

func TestStore_AdjustStock(t *testing.T) {
	s := newTestStore(t)
	p := newProduct("ADJ")
	p.Stock = 5
	p, err := s.Create(t.Context(), p, nil, nil)
	if err != nil {
		t.Fatal(err)
	}
	tests := []struct {
		name      string
		id, delta int64
		check     func(int64) error
		wantErr   error
		wantStock int64
	}{
		{name: "add", id: p.ID, delta: 3, wantStock: 8},
		{name: "to zero", id: p.ID, delta: -8, wantStock: 0},
		{name: "below zero", id: p.ID, delta: -1, wantErr: ErrInsufficientStock, wantStock: 0},
		{name: "above max", id: p.ID, delta: maxStock + 1, wantErr: ErrInsufficientStock, wantStock: 0},
		{name: "check refuses", id: p.ID, delta: 1, check: func(int64) error { return ErrPrecondition }, wantErr: ErrPrecondition, wantStock: 0},
		{name: "unknown id", id: p.ID + 100, delta: 1, wantErr: ErrNotFound, wantStock: 0},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			before, _ := s.Get(t.Context(), p.ID)
			committed := false
			_, err := s.AdjustStock(t.Context(), tt.id, tt.delta, tt.check, nil, func(Product) { committed = true })
			if !errors.Is(err, tt.wantErr) || (tt.wantErr == nil && err != nil) {
				t.Fatalf("AdjustStock(%d, %d) error = %v, want %v", tt.id, tt.delta, err, tt.wantErr)
			}
			if committed != (tt.wantErr == nil) {
				t.Errorf("onCommit called = %t, want %t", committed, tt.wantErr == nil)
			}
			got, err := s.Get(t.Context(), p.ID)
			if err != nil {
				t.Fatal(err)
			}
			if got.Stock != tt.wantStock {
				t.Errorf("stock = %d, want %d", got.Stock, tt.wantStock)
			}
			wantVersion := before.Version
			if tt.wantErr == nil {
				wantVersion++
			}
			if got.Version != wantVersion {
				t.Errorf("version = %d, want %d", got.Version, wantVersion)
			}
		})
	}
}

func TestStore_Get_notFound(t *testing.T) {
	s := newTestStore(t)
	if _, err := s.Get(t.Context(), 1); !errors.Is(err, ErrNotFound) {
		t.Errorf("Get(1) on an empty store error = %v, want ErrNotFound", err)
	}
	if err := s.Delete(t.Context(), 1, nil, nil); !errors.Is(err, ErrNotFound) {
		t.Errorf("Delete(1) on an empty store error = %v, want ErrNotFound", err)
	}
	if _, err := s.Update(t.Context(), 1, func(*Product) error { return nil }, nil); !errors.Is(err, ErrNotFound) {
		t.Errorf("Update(1) on an empty store error = %v, want ErrNotFound", err)
	}
}

func TestStore_ExpireIdempotencyKeys(t *testing.T) {
	s := newTestStore(t)
	// The writer goroutine reads the clock while it runs a write; the test
	// moves it only between writes, which the write channel orders.
	clock := time.Now()
	s.now = func() time.Time { return clock }
	countKeys := func() int {
		t.Helper()
		var n int
		if err := s.read.QueryRowContext(t.Context(), `SELECT count(*) FROM idempotency_keys`).Scan(&n); err != nil {
			t.Fatal(err)
		}
		return n
	}
	key := &IdempotencyKey{Scope: "s", Key: "k", Fingerprint: "f"}
	first, err := s.Create(t.Context(), newProduct("EXP-1"), key, nil)
	if err != nil {
		t.Fatal(err)
	}
	var replay *Replay
	if _, err := s.Create(t.Context(), newProduct("EXP-1"), key, nil); !errors.As(err, &replay) || replay.ProductID != first.ID || replay.Status != 201 {
		t.Fatalf("Create with a used key error = %v, want a *Replay of product %d with status 201", err, first.ID)
	}
	if _, err := s.ExpireIdempotencyKeys(t.Context()); err != nil {
		t.Fatal(err)
	}
	if n := countKeys(); n != 1 {
		t.Errorf("%d keys after expiring none, want 1", n)
	}

	clock = clock.Add(idempotencyTTL + time.Minute)
	if _, err := s.ExpireIdempotencyKeys(t.Context()); err != nil {
		t.Fatal(err)
	}
	if n := countKeys(); n != 0 {
		t.Errorf("%d keys after expiring all, want 0", n)
	}
	// An expired key is a new request.
	second, err := s.Create(t.Context(), newProduct("EXP-2"), key, nil)
	if err != nil || second.ID == first.ID {
		t.Errorf("Create with an expired key = %+v, %v, want a new product", second, err)
	}
}

// TestStore_ExpireIdempotencyKeys_backlog expires a backlog of a million
// keys while clients write through the service: no client write fails, the
// write breaker stays closed, and writes are served while expiry runs.
// Under -race (or -short) the backlog is a tenth: the race detector makes
// SQLite itself some thirty times slower, and the concurrency it checks is
// the same.
func TestStore_ExpireIdempotencyKeys_backlog(t *testing.T) {
	backlog := 1_000_000
	if raceEnabled || testing.Short() {
		backlog = 100_000
	}
	s := newTestStore(t)
	if _, err := s.write.ExecContext(t.Context(), `WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n WHERE i < ?)
		INSERT INTO idempotency_keys (scope, key, fingerprint, status, body, product_id, version, created_at)
		SELECT 'old', 'key-' || i, 'f', 201, x'7b7d', 1, 1, 0 FROM n`, backlog); err != nil {
		t.Fatal(err)
	}
	svc := newTestService(t, s, ServiceConfig{})

	type result struct {
		deleted int64
		err     error
	}
	expired := make(chan result, 1)
	go func() {
		n, err := s.ExpireIdempotencyKeys(context.Background())
		expired <- result{n, err}
	}()
	var res *result
	writes, during := 0, 0
	for res == nil || writes < 20 {
		if writes > backlog {
			t.Fatal("expiry did not finish")
		}
		key := &IdempotencyKey{Scope: "new", Key: fmt.Sprintf("w-%d", writes), Fingerprint: "f"}
		if _, err := svc.Create(t.Context(), ProductInput{SKU: new(fmt.Sprintf("BL-%d", writes)), Name: new("x"), PriceCents: new(int64(1))}, key); err != nil {
			t.Fatalf("client write %d during expiry error = %v, want nil", writes, err)
		}
		writes++
		select {
		case r := <-expired:
			res = &r
		default:
			if res == nil {
				during++
			}
		}
	}
	if res.err != nil || res.deleted != int64(backlog) {
		t.Fatalf("ExpireIdempotencyKeys = %d, %v, want %d, nil", res.deleted, res.err, backlog)
	}
	if during == 0 {
		t.Error("no client write was served while expiry ran")
	}
	if st := svc.writeCB.State(); st != gobreaker.StateClosed {
		t.Errorf("write breaker %s after the expiry, want closed", st)
	}
	var left int
	if err := s.read.QueryRowContext(t.Context(), `SELECT count(*) FROM idempotency_keys`).Scan(&left); err != nil || left != writes {
		t.Errorf("keys left = %d, %v, want the %d of the client writes", left, err, writes)
	}
	t.Logf("%d keys expired; %d client writes served during the expiry, all succeeded", res.deleted, during)
}
