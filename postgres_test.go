package main

// What only PostgreSQL has: its error codes, migrating from many replicas
// at once, the password in DATABASE_URL, and -copy-to from SQLite. The
// behaviour both stores share is tested by the conformance suite
// (forEachStore).

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"net/http"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/google/go-cmp/cmp"
)

func TestPostgres_translate(t *testing.T) {
	s := newTestPostgres(t)
	ctx := t.Context()
	exec := func(sql string) error {
		_, err := s.pool.Exec(ctx, sql)
		return err
	}
	if err := exec(`INSERT INTO products (sku, name, price_cents, created_at, updated_at, search) VALUES ('T-1', 'n', 1, now(), now(), '')`); err != nil {
		t.Fatal(err)
	}
	uniqueErr := exec(`INSERT INTO products (sku, name, price_cents, created_at, updated_at, search) VALUES ('T-1', 'n', 1, now(), now(), '')`)
	checkErr := exec(`INSERT INTO products (sku, name, price_cents, created_at, updated_at, search) VALUES ('T-2', 'n', -1, now(), now(), '')`)
	syntaxErr := exec(`SELEKT 1`)
	noRowsErr := s.pool.QueryRow(ctx, `SELECT id FROM products WHERE id = -1`).Scan(new(int64))
	// A server that closes the connection (an administrator, a failover).
	var pid int
	conn, err := s.pool.Acquire(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if err := conn.QueryRow(ctx, `SELECT pg_backend_pid()`).Scan(&pid); err != nil {
		t.Fatal(err)
	}
	if _, err := s.pool.Exec(ctx, `SELECT pg_terminate_backend($1)`, pid); err != nil {
		t.Fatal(err)
	}
	_, terminatedErr := conn.Exec(ctx, `SELECT 1`)
	conn.Release()
	canceled, cancel := context.WithCancel(context.Background())
	cancel()
	_, canceledErr := s.pool.Exec(canceled, `SELECT 1`)
	expired, cancel2 := context.WithTimeout(context.Background(), time.Millisecond)
	defer cancel2()
	_, timeoutErr := s.pool.Exec(expired, `SELECT pg_sleep(1)`)

	tests := []struct {
		name      string
		ctx       context.Context
		err       error
		wantIs    []error
		wantNotIs []error
	}{
		{name: "unique", ctx: ctx, err: uniqueErr, wantIs: []error{ErrConflict}, wantNotIs: []error{ErrUnavailable}},
		{name: "check", ctx: ctx, err: checkErr, wantIs: []error{ErrInvalid}, wantNotIs: []error{ErrConflict, ErrUnavailable}},
		{name: "no rows", ctx: ctx, err: noRowsErr, wantIs: []error{ErrNotFound}},
		{name: "syntax error is a bug", ctx: ctx, err: syntaxErr, wantNotIs: []error{ErrUnavailable, ErrNotFound, ErrConflict, ErrInvalid}},
		{name: "terminated connection", ctx: ctx, err: terminatedErr, wantIs: []error{ErrUnavailable}},
		{name: "canceled by the client", ctx: canceled, err: canceledErr, wantIs: []error{context.Canceled}, wantNotIs: []error{ErrUnavailable}},
		{name: "deadline", ctx: expired, err: timeoutErr, wantIs: []error{ErrUnavailable}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			if tt.err == nil {
				t.Fatalf("setup: PostgreSQL returned no error for %s", tt.name)
			}
			got := pgTranslate(tt.ctx, tt.err)
			for _, want := range tt.wantIs {
				if !errors.Is(got, want) {
					t.Errorf("pgTranslate(%v) = %v, want errors.Is %v", tt.err, got, want)
				}
			}
			for _, notWant := range tt.wantNotIs {
				if errors.Is(got, notWant) {
					t.Errorf("pgTranslate(%v) = %v, want it not to be %v", tt.err, got, notWant)
				}
			}
		})
	}
}

func TestPostgres_migrateFromManyReplicas(t *testing.T) {
	url := newTestDatabase(t)
	// Replicas starting at once all come up, and each migration runs once.
	var wg sync.WaitGroup
	for i := range 6 {
		wg.Go(func() {
			s, err := openPostgres(context.Background(), StoreConfig{DatabaseURL: url, Timeout: 5 * time.Second})
			if err != nil {
				t.Errorf("replica %d: openPostgres error = %v", i, err)
				return
			}
			s.Close()
		})
	}
	wg.Wait()
	s := openTestPostgres(t, url)
	var n, top int
	if err := s.pool.QueryRow(t.Context(), `SELECT count(*), max(version) FROM schema_migrations`).Scan(&n, &top); err != nil {
		t.Fatal(err)
	}
	if n != len(pgMigrations) || top != len(pgMigrations) {
		t.Errorf("schema_migrations has %d rows up to %d, want %d", n, top, len(pgMigrations))
	}
	// A schema newer than this binary knows is refused.
	if _, err := s.pool.Exec(t.Context(), `INSERT INTO schema_migrations (version) VALUES ($1)`, len(pgMigrations)+1); err != nil {
		t.Fatal(err)
	}
	if _, err := openPostgres(t.Context(), StoreConfig{DatabaseURL: url}); !errors.Is(err, errSchemaNewer) {
		t.Errorf("openPostgres on a newer schema error = %v, want errSchemaNewer", err)
	}
}

func TestRun_postgres(t *testing.T) {
	url := newTestDatabase(t)
	withPassword := strings.Replace(url, "postgres@", "postgres:s3cret-pw@", 1) // trust ignores it
	svc := runService(t, map[string]string{
		"ADDR": "127.0.0.1:0", "DATABASE_URL": withPassword, "API_TOKEN": "pg-token",
		"DB_PATH": t.TempDir() + "/unused.db",
	})
	base := "http://" + svc.listeningAddr(t)
	req, _ := http.NewRequest(http.MethodPost, base+"/products", strings.NewReader(`{"sku":"PG-1","name":"pen","price_cents":5}`))
	req.Header.Set("Authorization", "Bearer pg-token")
	req.Header.Set("Content-Type", "application/json")
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	resp.Body.Close()
	if resp.StatusCode != http.StatusCreated {
		t.Fatalf("POST /products = %d, want 201", resp.StatusCode)
	}
	resp, err = http.Get(base + "/ready")
	if err != nil {
		t.Fatal(err)
	}
	var ready struct {
		Checks struct {
			Database struct{ Status, Backend string } `json:"database"`
		} `json:"checks"`
	}
	decodeJSON(t, resp, &ready)
	if ready.Checks.Database.Backend != "postgres" || ready.Checks.Database.Status != "ok" {
		t.Errorf("/ready database = %+v, want ok on postgres", ready.Checks.Database)
	}
	if err := svc.stop(t); err != nil {
		t.Fatalf("run() = %v, want nil", err)
	}
	for _, out := range []string{svc.stdout.String(), svc.stderr.String()} {
		if strings.Contains(out, "s3cret-pw") {
			t.Errorf("the DATABASE_URL password reached the log:\n%s", out)
		}
	}
	if !strings.Contains(svc.stdout.String(), `"backend":"postgres"`) {
		t.Errorf("the starting line does not name the backend:\n%s", svc.stdout)
	}
}

func TestRun_copyTo(t *testing.T) {
	dbPath := t.TempDir() + "/products.db"
	src := openTestStore(t, dbPath)
	var want []Product
	for i := range 2500 { // more than one copy batch
		p := newProduct(fmt.Sprintf("CP-%04d", i))
		p.Description = "é " + fmt.Sprint(i)
		p.Stock = int64(i)
		p, _, err := src.Create(t.Context(), "", p, nil)
		if err != nil {
			t.Fatal(err)
		}
		want = append(want, p)
	}
	// Versions above 1, a gap in the ids, an idempotency record.
	if p, _, err := src.AdjustStock(t.Context(), "", want[10].ID, 5, nil, nil); err != nil {
		t.Fatal(err)
	} else {
		want[10] = p
	}
	if _, err := src.Delete(t.Context(), "", want[20].ID, nil); err != nil {
		t.Fatal(err)
	}
	want = append(want[:20], want[21:]...)
	key := &IdempotencyKey{Scope: "scope", Key: "order-1", Fingerprint: "fp"}
	keyed, _, err := src.Create(t.Context(), "", newProduct("CP-KEYED"), key)
	if err != nil {
		t.Fatal(err)
	}
	want = append(want, keyed)
	// A hold still open and one confirmed: the move keeps both, and the
	// units they hold or took.
	open, _, err := storeReserve(src, t.Context(), hold("cp-open", ReservationLine{want[1].ID, 1}), time.Hour, nil)
	if err != nil {
		t.Fatal(err)
	}
	done, _, err := storeReserve(src, t.Context(), hold("cp-done", ReservationLine{want[2].ID, 2}), time.Hour, nil)
	if err != nil {
		t.Fatal(err)
	}
	if done, _, err = storeTransition(src, t.Context(), done.ID, StateConfirmed); err != nil {
		t.Fatal(err)
	}
	for _, i := range []int{1, 2} {
		want[i] = mustGet(t, src, want[i].ID)
	}
	srcEvents, err := src.Events(t.Context(), 0, 10_000)
	if err != nil {
		t.Fatal(err)
	}
	src.Close()

	url := newTestDatabase(t)
	copyOnce := func() string {
		t.Helper()
		var stdout, stderr syncBuffer
		err := run(t.Context(), []string{"productsvc", "-copy-to", url}, envFunc(map[string]string{"DB_PATH": dbPath}), &stdout, &stderr)
		if err != nil {
			t.Fatalf("run -copy-to error = %v; stderr:\n%s", err, stderr.String())
		}
		return stderr.String()
	}
	progress := copyOnce()
	if !strings.Contains(progress, "copying 2500 products") || !strings.Contains(progress, "2500 products (2500 written") {
		t.Errorf("progress on stderr = %q, want the count and the outcome", progress)
	}
	dst := openTestPostgres(t, url)
	check := func() {
		t.Helper()
		var got []Product
		f := ListFilter{Limit: 100, Sort: "id"}
		for range 100 {
			page, err := dst.List(t.Context(), f)
			if err != nil {
				t.Fatal(err)
			}
			got = append(got, page.Items...)
			if page.NextCursor == "" {
				break
			}
			c, _, _ := decodeCursor(page.NextCursor)
			f.After = &c
		}
		if diff := cmp.Diff(want, got); diff != "" {
			t.Errorf("PostgreSQL catalog after copy (-want +got):\n%s", diff)
		}
	}
	check()
	for _, r := range []Reservation{open, done} {
		if got, err := dst.Reservation(t.Context(), r.ID); err != nil || !cmp.Equal(got, r) {
			t.Errorf("copied reservation = %+v, %v, want %+v", got, err, r)
		}
	}
	dstEvents, err := dst.Events(t.Context(), 0, 10_000)
	if err != nil {
		t.Fatal(err)
	}
	if diff := cmp.Diff(srcEvents, dstEvents); diff != "" {
		t.Errorf("copied feed (-sqlite +postgres):\n%s", diff)
	}
	// Search works on copied rows; the key replays; new ids follow the old.
	if page, err := dst.List(t.Context(), ListFilter{Limit: 5, Sort: "id", Terms: []string{"e", "2499"}}); err != nil || len(page.Items) != 1 {
		t.Errorf("search on copied rows = %+v, %v, want one product", page.Items, err)
	}
	if _, replayed, err := dst.Create(t.Context(), "", newProduct("CP-KEYED"), key); err != nil || !replayed {
		t.Errorf("Create with a copied key = replayed %v, %v, want a replay", replayed, err)
	}
	fresh, _, err := dst.Create(t.Context(), "", newProduct("CP-NEW"), nil)
	if err != nil {
		t.Fatal(err)
	}
	if fresh.ID <= keyed.ID {
		t.Errorf("first PostgreSQL id = %d, want above the copied %d", fresh.ID, keyed.ID)
	}
	if es, err := dst.Events(t.Context(), srcEvents[len(srcEvents)-1].Seq, 10); err != nil || len(es) != 1 || es[0].Seq != srcEvents[len(srcEvents)-1].Seq+1 {
		t.Errorf("the feed after the copied events = %+v, %v, want the new product's event next", es, err)
	}
	// The open hold still holds, on PostgreSQL now.
	if _, _, err := storeTransition(dst, t.Context(), open.ID, StateReleased); err != nil {
		t.Errorf("releasing the copied hold: %v", err)
	}
	want[1] = mustGet(t, dst, want[1].ID)

	// Re-running changes nothing, and keeps a change made in PostgreSQL.
	changed, _, err := dst.AdjustStock(t.Context(), "", want[0].ID, 7, nil, nil)
	if err != nil {
		t.Fatal(err)
	}
	want[0] = changed
	want = append(want, fresh)
	if progress := copyOnce(); !strings.Contains(progress, "(0 written, 2500 already up to date)") {
		t.Errorf("second copy progress = %q, want nothing written", progress)
	}
	check()
}

// decodeJSON decodes resp's body into v and closes it.
func decodeJSON(tb testing.TB, resp *http.Response, v any) {
	tb.Helper()
	defer resp.Body.Close()
	if err := json.NewDecoder(resp.Body).Decode(v); err != nil {
		tb.Fatalf("decode %s: %v", resp.Request.URL, err)
	}
}

// TestPostgres_changesUnnumbered: Changes finds a committed write before
// its event has a seq, so the read fence never needs to write; once
// numbered, the event is found by its seq, and nothing after the head.
func TestPostgres_changesUnnumbered(t *testing.T) {
	s := newTestPostgres(t)
	p, _, err := s.Create(t.Context(), "", newProduct("CH-1"), nil)
	if err != nil {
		t.Fatal(err)
	}
	head, es, err := s.Changes(t.Context(), 0, 10)
	if err != nil || head != 0 || len(es) != 1 || es[0].Seq != 0 || es[0].ProductID != p.ID || es[0].Version != 1 {
		t.Fatalf("Changes(0) before numbering = head %d, %+v, %v; want head 0 and the create without a seq", head, es, err)
	}
	if es[0].Product == nil || es[0].Product.SKU != "CH-1" {
		t.Errorf("the unnumbered event carries %+v, want the product", es[0].Product)
	}
	if err := s.Sequence(t.Context()); err != nil {
		t.Fatal(err)
	}
	head, es, err = s.Changes(t.Context(), 0, 10)
	if err != nil || head != 1 || len(es) != 1 || es[0].Seq != 1 {
		t.Fatalf("Changes(0) after numbering = head %d, %+v, %v; want head 1 and the event at seq 1", head, es, err)
	}
	if head, es, err = s.Changes(t.Context(), 1, 10); err != nil || head != 1 || len(es) != 0 {
		t.Fatalf("Changes(1) = head %d, %d events, %v; want head 1 and none", head, len(es), err)
	}
}
