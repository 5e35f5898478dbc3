package main

import (
	"context"
	"database/sql"
	"database/sql/driver"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/google/go-cmp/cmp"
	"github.com/sony/gobreaker/v2"
)

// newProduct returns a valid product to store.
func newProduct(sku string) Product {
	return Product{SKU: sku, Name: "product " + sku, PriceCents: 100, Currency: "USD"}
}

// The tests named TestStore_* are the store conformance suite: each runs
// the same body against SQLite and PostgreSQL (forEachStore).

func TestStore_migrationsIdempotent(t *testing.T) {
	forEachBackend(t, func(t *testing.T, open storeOpener) {
		var created Product
		for i := range 3 {
			s := open(t)
			if i == 0 {
				var err error
				if created, _, err = s.Create(t.Context(), "", newProduct("MIG-1"), nil); err != nil {
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
	})
}

func TestSQLite_migrationsRecorded(t *testing.T) {
	path := filepath.Join(t.TempDir(), "products.db")
	for i := range 2 {
		s := openTestStore(t, path)
		var applied int
		if err := s.rdb.QueryRowContext(t.Context(), `SELECT count(*) FROM schema_migrations`).Scan(&applied); err != nil {
			t.Fatal(err)
		}
		if applied != len(migrations) {
			t.Errorf("open #%d: %d migrations recorded, want %d", i+1, applied, len(migrations))
		}
		s.Close()
	}
	// A schema newer than this binary knows is refused.
	s := openTestStore(t, path)
	if _, err := s.wdb.ExecContext(t.Context(), `INSERT INTO schema_migrations (version, applied_at) VALUES (?, 0)`, len(migrations)+1); err != nil {
		t.Fatal(err)
	}
	s.Close()
	if _, err := openSQLite(t.Context(), StoreConfig{Path: path}); !errors.Is(err, errSchemaNewer) {
		t.Errorf("openSQLite on a newer schema error = %v, want errSchemaNewer", err)
	}
}

func TestSQLite_Close(t *testing.T) {
	for _, sync := range []string{"full", "normal"} {
		t.Run(sync, func(t *testing.T) {
			path := filepath.Join(t.TempDir(), "products.db")
			s, err := openSQLite(t.Context(), StoreConfig{Path: path, Sync: sync})
			if err != nil {
				t.Fatal(err)
			}
			for i := range 20 {
				if _, _, err := s.Create(t.Context(), "", newProduct(fmt.Sprintf("WAL-%d", i)), nil); err != nil {
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
	forEachStore(t, testWriteAfterClose)
}

func testWriteAfterClose(t *testing.T, s productStore) {
	p, _, err := s.Create(t.Context(), "", newProduct("CL-1"), nil)
	if err != nil {
		t.Fatal(err)
	}
	if err := s.Close(); err != nil {
		t.Fatal(err)
	}
	// Every write after Close fails with ErrUnavailable; none may block.
	writes := map[string]func(ctx context.Context) error{
		"Create": func(ctx context.Context) error { _, _, err := s.Create(ctx, "", newProduct("CL-2"), nil); return err },
		"Update": func(ctx context.Context) error {
			_, _, err := s.Update(ctx, "", p.ID, ProductUpdate{Patch: ProductPatch{Name: optional[string]{Set: true, Value: "x"}}})
			return err
		},
		"AdjustStock": func(ctx context.Context) error { _, _, err := s.AdjustStock(ctx, "", p.ID, 1, nil, nil); return err },
		"Delete":      func(ctx context.Context) error { _, err := s.Delete(ctx, "", p.ID, nil); return err },
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
	forEachStore(t, testCloseWithWritesInFlight)
}

func testCloseWithWritesInFlight(t *testing.T, s productStore) {
	// Writers race Close: each write either commits or fails with
	// ErrUnavailable, and none blocks.
	var wg sync.WaitGroup
	errs := make(chan error, 200)
	for i := range 200 {
		wg.Go(func() {
			_, _, err := s.Create(context.Background(), "", newProduct(fmt.Sprintf("RACE-%d", i)), nil)
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
	forEachStore(t, testCreateDuplicateSKU)
}

func testCreateDuplicateSKU(t *testing.T, s productStore) {
	if _, _, err := s.Create(t.Context(), "", newProduct("UNIQ-1"), nil); err != nil {
		t.Fatal(err)
	}
	_, _, err := s.Create(t.Context(), "", newProduct("UNIQ-1"), nil)
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
	q, _, err := s.Create(t.Context(), "", newProduct("UNIQ-2"), nil)
	if err != nil {
		t.Fatal(err)
	}
	_, _, err = s.Update(t.Context(), "", q.ID, ProductUpdate{Patch: ProductPatch{SKU: optional[string]{Set: true, Value: "UNIQ-1"}}})
	if !errors.Is(err, ErrConflict) {
		t.Errorf("Update(sku taken) error = %v, want ErrConflict", err)
	}
}

func TestSQLite_translate(t *testing.T) {
	s := newTestStore(t)
	// Real driver errors, from the database itself.
	if _, err := s.wdb.ExecContext(t.Context(), `INSERT INTO products (sku, name, price_cents, created_at, updated_at) VALUES ('T-1', 'n', 1, 0, 0)`); err != nil {
		t.Fatal(err)
	}
	_, uniqueErr := s.wdb.ExecContext(t.Context(), `INSERT INTO products (sku, name, price_cents, created_at, updated_at) VALUES ('T-1', 'n', 1, 0, 0)`)
	_, checkErr := s.wdb.ExecContext(t.Context(), `INSERT INTO products (sku, name, price_cents, created_at, updated_at) VALUES ('T-2', 'n', -1, 0, 0)`)
	_, syntaxErr := s.wdb.ExecContext(t.Context(), `SELEKT 1`)
	noRowsErr := s.rdb.QueryRowContext(t.Context(), `SELECT id FROM products WHERE id = -1`).Scan(new(int64))

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
	forEachStore(t, testAdjustStock)
}

func testAdjustStock(t *testing.T, s productStore) {
	p := newProduct("ADJ")
	p.Stock = 5
	p, _, err := s.Create(t.Context(), "", p, nil)
	if err != nil {
		t.Fatal(err)
	}
	tests := []struct {
		name      string
		id, delta int64
		cond      *IfMatch
		wantErr   error
		wantStock int64
	}{
		{name: "add", id: p.ID, delta: 3, wantStock: 8},
		{name: "to zero", id: p.ID, delta: -8, wantStock: 0},
		{name: "below zero", id: p.ID, delta: -1, wantErr: ErrInsufficientStock, wantStock: 0},
		{name: "above max", id: p.ID, delta: maxStock + 1, wantErr: ErrInsufficientStock, wantStock: 0},
		{name: "check refuses", id: p.ID, delta: 1, cond: &IfMatch{Versions: []int64{99}}, wantErr: ErrPrecondition, wantStock: 0},
		{name: "unknown id", id: p.ID + 100, delta: 1, wantErr: ErrNotFound, wantStock: 0},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			before, _ := s.Get(t.Context(), p.ID)
			out, _, err := s.AdjustStock(t.Context(), "", tt.id, tt.delta, tt.cond, nil)
			if !errors.Is(err, tt.wantErr) || (tt.wantErr == nil && err != nil) {
				t.Fatalf("AdjustStock(%d, %d) error = %v, want %v", tt.id, tt.delta, err, tt.wantErr)
			}
			if err == nil && (out.Stock != tt.wantStock || out.Version != before.Version+1) {
				t.Errorf("AdjustStock returned stock %d version %d, want %d and %d", out.Stock, out.Version, tt.wantStock, before.Version+1)
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
	forEachStore(t, testGetNotFound)
}

func testGetNotFound(t *testing.T, s productStore) {
	if _, err := s.Get(t.Context(), 1); !errors.Is(err, ErrNotFound) {
		t.Errorf("Get(1) on an empty store error = %v, want ErrNotFound", err)
	}
	if _, err := s.Delete(t.Context(), "", 1, nil); !errors.Is(err, ErrNotFound) {
		t.Errorf("Delete(1) on an empty store error = %v, want ErrNotFound", err)
	}
	if _, _, err := s.Update(t.Context(), "", 1, ProductUpdate{}); !errors.Is(err, ErrNotFound) {
		t.Errorf("Update(1) on an empty store error = %v, want ErrNotFound", err)
	}
}

func TestStore_ExpireIdempotencyKeys(t *testing.T) {
	forEachStore(t, testExpireIdempotencyKeys)
}

func testExpireIdempotencyKeys(t *testing.T, s productStore) {
	// The store reads the clock while it runs a write; the test moves it
	// only between writes.
	var clock atomic.Pointer[time.Time]
	now := time.Now()
	clock.Store(&now)
	setStoreClock(s, func() time.Time { return *clock.Load() })
	key := &IdempotencyKey{Scope: "s", Key: "k", Fingerprint: "f"}
	first, _, err := s.Create(t.Context(), "", newProduct("EXP-1"), key)
	if err != nil {
		t.Fatal(err)
	}
	again, replayed, err := s.Create(t.Context(), "", newProduct("EXP-1"), key)
	if err != nil || !replayed || !cmp.Equal(again, first) {
		t.Fatalf("Create with a used key = %+v, replayed %v, %v, want a replay of %+v", again, replayed, err, first)
	}
	if _, _, err := s.Create(t.Context(), "", newProduct("EXP-X"), &IdempotencyKey{Scope: "s", Key: "k", Fingerprint: "other"}); !errors.Is(err, ErrIdempotencyMismatch) {
		t.Errorf("Create with a used key and another request error = %v, want ErrIdempotencyMismatch", err)
	}
	if _, err := s.ExpireIdempotencyKeys(t.Context()); err != nil {
		t.Fatal(err)
	}
	if _, replayed, err := s.Create(t.Context(), "", newProduct("EXP-1"), key); err != nil || !replayed {
		t.Errorf("after expiring none, Create with the key = replayed %v, %v, want a replay", replayed, err)
	}

	later := now.Add(idempotencyTTL + time.Minute)
	clock.Store(&later)
	if _, err := s.ExpireIdempotencyKeys(t.Context()); err != nil {
		t.Fatal(err)
	}
	// An expired key is a new request.
	second, _, err := s.Create(t.Context(), "", newProduct("EXP-2"), key)
	if err != nil || second.ID == first.ID {
		t.Errorf("Create with an expired key = %+v, %v, want a new product", second, err)
	}
}

func TestSQLite_ExpireIdempotencyKeys_deletes(t *testing.T) {
	s := newTestStore(t)
	now := time.Now()
	s.now = func() time.Time { return now }
	if _, _, err := s.Create(t.Context(), "", newProduct("DEL-1"), &IdempotencyKey{Scope: "s", Key: "k", Fingerprint: "f"}); err != nil {
		t.Fatal(err)
	}
	count := func() (n int) {
		t.Helper()
		if err := s.rdb.QueryRowContext(t.Context(), `SELECT count(*) FROM idempotency_keys`).Scan(&n); err != nil {
			t.Fatal(err)
		}
		return n
	}
	if n := count(); n != 1 {
		t.Fatalf("%d records, want 1", n)
	}
	now = now.Add(idempotencyTTL + time.Minute)
	if _, err := s.ExpireIdempotencyKeys(t.Context()); err != nil {
		t.Fatal(err)
	}
	if n := count(); n != 0 {
		t.Errorf("%d records after expiry, want 0", n)
	}
}

func TestStore_List_sameOrderOnBoth(t *testing.T) {
	// Names that byte order and a linguistic collation sort differently.
	names := []string{"b", "B", "a", "Z", "é", "e", "_x", "10", "9", "ä", "A b", "Ab", "a-b"}
	var walks [][]string
	forEachStore(t, func(t *testing.T, s productStore) {
		for i, n := range names {
			p := newProduct(fmt.Sprintf("ORD-%d", i))
			p.Name = n
			if _, _, err := s.Create(t.Context(), "", p, nil); err != nil {
				t.Fatal(err)
			}
		}
		for _, desc := range []bool{false, true} {
			var got []string
			f := ListFilter{Limit: 4, Sort: "name", Desc: desc}
			for range 10 {
				page, err := s.List(t.Context(), f)
				if err != nil {
					t.Fatal(err)
				}
				for _, p := range page.Items {
					got = append(got, p.Name)
				}
				if page.NextCursor == "" {
					break
				}
				c, _, err := decodeCursor(page.NextCursor)
				if err != nil {
					t.Fatal(err)
				}
				f.After = &c
			}
			want := slices.Sorted(slices.Values(names)) // Go compares strings by bytes
			if desc {
				slices.Reverse(want)
			}
			if !slices.Equal(got, want) {
				t.Errorf("walk by name (desc %t) = %q, want byte order %q", desc, got, want)
			}
			walks = append(walks, got)
		}
	})
	if len(walks) == 4 && (!slices.Equal(walks[0], walks[2]) || !slices.Equal(walks[1], walks[3])) {
		t.Errorf("the stores walk in different orders: %q and %q", walks[:2], walks[2:])
	}
}

func TestStore_List_search(t *testing.T) {
	forEachStore(t, func(t *testing.T, s productStore) {
		for i, pr := range [][2]string{
			{"Fountain pen", "Steel nib, blue ink"},
			{"Crème brûlée torch", "for the kitchen"},
			{"Pencil", "HB graphite; steel-free"},
			{"Notebook", "A5 dotted, 120 pages"},
		} {
			p := newProduct(fmt.Sprintf("FTS-%d", i))
			p.Name, p.Description = pr[0], pr[1]
			if _, _, err := s.Create(t.Context(), "", p, nil); err != nil {
				t.Fatal(err)
			}
		}
		tests := []struct {
			q    string
			want []string
		}{
			{"pen", []string{"Fountain pen", "Pencil"}}, // prefix of a word
			{"steel", []string{"Fountain pen", "Pencil"}},
			{"steel nib", []string{"Fountain pen"}}, // every word must match
			{"NIB", []string{"Fountain pen"}},       // case-insensitive
			{"creme brulee", []string{"Crème brûlée torch"}},
			{"crème", []string{"Crème brûlée torch"}}, // diacritics folded both ways
			{"a5 120", []string{"Notebook"}},
			{"free", []string{"Pencil"}},
			{"ink kitchen", nil},
			{"xyz", nil},
		}
		for _, tt := range tests {
			terms, msg := searchTerms(tt.q)
			if msg != "" {
				t.Fatal(msg)
			}
			page, err := s.List(t.Context(), ListFilter{Limit: 100, Sort: "id", Terms: terms})
			if err != nil {
				t.Fatalf("search %q: %v", tt.q, err)
			}
			var got []string
			for _, p := range page.Items {
				got = append(got, p.Name)
			}
			if !slices.Equal(got, tt.want) {
				t.Errorf("search %q = %q, want %q", tt.q, got, tt.want)
			}
		}
	})
}

func TestStore_concurrentWrites(t *testing.T) {
	forEachStore(t, func(t *testing.T, s productStore) {
		p := newProduct("CONC-1")
		p.Stock = 100
		p, _, err := s.Create(t.Context(), "", p, nil)
		if err != nil {
			t.Fatal(err)
		}
		// 60 decrements of 2 race for 100 units: exactly 50 succeed.
		// 20 updates race with them: every version is unique, and the
		// last update's description is the one kept.
		var wg sync.WaitGroup
		var okAdjust, short atomic.Int64
		versions := make(chan int64, 100)
		var lastMu sync.Mutex
		var last Product // the update committed at the highest version
		for range 60 {
			wg.Go(func() {
				q, _, err := s.AdjustStock(context.Background(), "", p.ID, -2, nil, nil)
				switch {
				case err == nil:
					okAdjust.Add(1)
					versions <- q.Version
				case errors.Is(err, ErrInsufficientStock):
					short.Add(1)
				default:
					t.Errorf("AdjustStock: %v", err)
				}
			})
		}
		for i := range 20 {
			wg.Go(func() {
				q, _, err := s.Update(context.Background(), "", p.ID, ProductUpdate{Patch: ProductPatch{
					Description: optional[string]{Set: true, Value: fmt.Sprintf("[%d]", i)}}})
				if err != nil {
					t.Errorf("Update: %v", err)
					return
				}
				lastMu.Lock()
				if q.Version > last.Version {
					last = q
				}
				lastMu.Unlock()
				versions <- q.Version
			})
		}
		wg.Wait()
		close(versions)
		if okAdjust.Load() != 50 || short.Load() != 10 {
			t.Errorf("adjustments: %d succeeded and %d were short, want 50 and 10", okAdjust.Load(), short.Load())
		}
		seen := map[int64]bool{}
		for v := range versions {
			if seen[v] {
				t.Errorf("version %d returned twice", v)
			}
			seen[v] = true
		}
		got, err := s.Get(t.Context(), p.ID)
		if err != nil {
			t.Fatal(err)
		}
		if got.Stock != 0 || got.Version != 1+50+20 {
			t.Errorf("after the race stock %d version %d, want 0 and %d", got.Stock, got.Version, 1+50+20)
		}
		if got.Description != last.Description {
			t.Errorf("description %q, want %q: the update at version %d was lost", got.Description, last.Description, last.Version)
		}
	})
}

func TestStore_idempotencyKeyRace(t *testing.T) {
	forEachStore(t, func(t *testing.T, s productStore) {
		p := newProduct("IDEM-R")
		p.Stock = 10
		p, _, err := s.Create(t.Context(), "", p, nil)
		if err != nil {
			t.Fatal(err)
		}
		// 20 retries of one adjustment race: it applies once, and every
		// caller sees the product that one application produced.
		key := &IdempotencyKey{Scope: "s", Key: "race", Fingerprint: "f"}
		results := make(chan Product, 20)
		var wg sync.WaitGroup
		for range 20 {
			wg.Go(func() {
				q, _, err := s.AdjustStock(context.Background(), "", p.ID, -3, nil, key)
				if err != nil {
					t.Errorf("AdjustStock: %v", err)
					return
				}
				results <- q
			})
		}
		wg.Wait()
		close(results)
		for q := range results {
			if q.Stock != 7 || q.Version != 2 {
				t.Errorf("a caller saw stock %d version %d, want 7 and 2 (one application)", q.Stock, q.Version)
			}
		}
		got, _ := s.Get(t.Context(), p.ID)
		if got.Stock != 7 {
			t.Errorf("stock = %d, want 7: the key applied more than once", got.Stock)
		}
	})
}

func TestStore_Delete_returnsProduct(t *testing.T) {
	forEachStore(t, func(t *testing.T, s productStore) {
		p, _, err := s.Create(t.Context(), "", newProduct("DEL-R"), nil)
		if err != nil {
			t.Fatal(err)
		}
		if _, err := s.Delete(t.Context(), "", p.ID, &IfMatch{Versions: []int64{p.Version + 1}}); !errors.Is(err, ErrPrecondition) {
			t.Errorf("Delete with a failing If-Match error = %v, want ErrPrecondition", err)
		}
		gone, err := s.Delete(t.Context(), "", p.ID, nil)
		if err != nil {
			t.Fatal(err)
		}
		if diff := cmp.Diff(p, gone); diff != "" {
			t.Errorf("Delete returned (-want +got):\n%s", diff)
		}
		if _, err := s.Get(t.Context(), p.ID); !errors.Is(err, ErrNotFound) {
			t.Errorf("Get after Delete error = %v, want ErrNotFound", err)
		}
		// Ids are never reused.
		q, _, err := s.Create(t.Context(), "", newProduct("DEL-R2"), nil)
		if err != nil {
			t.Fatal(err)
		}
		if q.ID <= p.ID {
			t.Errorf("new product id %d, want above the deleted %d", q.ID, p.ID)
		}
	})
}

func TestStore_List_cursorWalkEverySort(t *testing.T) {
	forEachStore(t, func(t *testing.T, s productStore) {
		// Ties in every sort key, so the id breaks them.
		var all []Product
		for i := range 11 {
			p := newProduct(fmt.Sprintf("WALK-%02d", i))
			p.Name = []string{"b", "a", "c"}[i%3]
			p.PriceCents = int64(i % 4 * 100)
			p.Stock = int64(i % 2)
			q, _, err := s.Create(t.Context(), "", p, nil)
			if err != nil {
				t.Fatal(err)
			}
			all = append(all, q)
		}
		for _, sort := range []string{"id", "name", "price_cents", "created_at"} {
			for _, desc := range []bool{false, true} {
				for _, inStock := range []*bool{nil, new(true)} {
					f := ListFilter{Limit: 3, Sort: sort, Desc: desc, InStock: inStock}
					var got []int64
					for range 20 {
						page, err := s.List(t.Context(), f)
						if err != nil {
							t.Fatal(err)
						}
						for _, p := range page.Items {
							got = append(got, p.ID)
						}
						if page.NextCursor == "" {
							break
						}
						c, _, err := decodeCursor(page.NextCursor)
						if err != nil {
							t.Fatalf("the store's own cursor %q: %v", page.NextCursor, err)
						}
						f.After = &c
					}
					want := slices.Clone(all)
					if inStock != nil {
						want = slices.DeleteFunc(want, func(p Product) bool { return p.Stock == 0 })
					}
					slices.SortStableFunc(want, func(a, b Product) int {
						c := 0
						switch sort {
						case "name":
							c = strings.Compare(a.Name, b.Name)
						case "price_cents":
							c = cmpInt(a.PriceCents, b.PriceCents)
						case "created_at":
							c = a.CreatedAt.Compare(b.CreatedAt)
						}
						if c == 0 {
							c = cmpInt(a.ID, b.ID)
						}
						if desc {
							c = -c
						}
						return c
					})
					var wantIDs []int64
					for _, p := range want {
						wantIDs = append(wantIDs, p.ID)
					}
					if !slices.Equal(got, wantIDs) {
						t.Errorf("walk sort=%s desc=%t in_stock=%v = %v, want %v", sort, desc, inStock != nil, got, wantIDs)
					}
				}
			}
		}
	})
}

func cmpInt(a, b int64) int {
	switch {
	case a < b:
		return -1
	case a > b:
		return 1
	}
	return 0
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
	if _, err := s.wdb.ExecContext(t.Context(), `WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n WHERE i < ?)
		INSERT INTO idempotency_keys (scope, key, fingerprint, product, product_id, version, created_at)
		SELECT 'old', 'key-' || i, 'f', x'7b7d', 1, 1, 0 FROM n`, backlog); err != nil {
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
		if _, _, err := svc.Create(t.Context(), ProductInput{SKU: new(fmt.Sprintf("BL-%d", writes)), Name: new("x"), PriceCents: new(int64(1))}, key); err != nil {
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
	if err := s.rdb.QueryRowContext(t.Context(), `SELECT count(*) FROM idempotency_keys`).Scan(&left); err != nil || left != writes {
		t.Errorf("keys left = %d, %v, want the %d of the client writes", left, err, writes)
	}
	t.Logf("%d keys expired; %d client writes served during the expiry, all succeeded", res.deleted, during)
}
