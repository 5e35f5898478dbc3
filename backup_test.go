package main

import (
	"bytes"
	"context"
	"crypto/sha256"
	"database/sql"
	"encoding/base64"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"math/rand/v2"
	"net/http"
	"net/http/httptest"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/google/go-cmp/cmp"
	"github.com/prometheus/client_golang/prometheus"
	dto "github.com/prometheus/client_model/go"
)

// newTestBackups returns the backups of s in a directory of its own.
func newTestBackups(tb testing.TB, s *sqliteStore, keep int) *backups {
	tb.Helper()
	b, err := newBackups(filepath.Join(tb.TempDir(), "backups"), keep, s, slog.New(slog.DiscardHandler), newMetrics(nil))
	if err != nil {
		tb.Fatalf("newBackups error = %v", err)
	}
	return b
}

// dirNames returns the names in dir, sorted.
func dirNames(tb testing.TB, dir string) []string {
	tb.Helper()
	entries, err := os.ReadDir(dir)
	if err != nil {
		tb.Fatal(err)
	}
	var names []string
	for _, e := range entries {
		names = append(names, e.Name())
	}
	return names
}

func TestBackups_Create(t *testing.T) {
	ctx := t.Context()
	s := newTestStore(t)
	for i := range 5 {
		if _, _, err := s.Create(ctx, "", newProduct(fmt.Sprintf("B-%d", i)), nil); err != nil {
			t.Fatal(err)
		}
	}
	b := newTestBackups(t, s, 0)
	man, err := b.Create(ctx)
	if err != nil {
		t.Fatalf("Create() error = %v", err)
	}
	logID, _ := s.LogID(ctx)
	head, _ := s.FeedHead(ctx)
	if man.FeedSeq != head || man.LogID != logID || man.SchemaVersion != len(migrations) {
		t.Errorf("manifest feed_seq %d, log_id %s, schema %d; want %d, %s, %d", man.FeedSeq, man.LogID, man.SchemaVersion, head, logID, len(migrations))
	}
	if !backupName.MatchString(man.Name) {
		t.Errorf("name %q is not a backup's", man.Name)
	}
	sum, size, err := digestFile(filepath.Join(b.dir, man.Name))
	if err != nil || sum != man.SHA256 || size != man.Size {
		t.Errorf("file sha-256 %s, %d bytes (%v); manifest %s, %d", sum, size, err, man.SHA256, man.Size)
	}
	if got, want := dirNames(t, b.dir), []string{man.Name, man.Name + ".json"}; !slices.Equal(got, want) {
		t.Errorf("backup dir holds %v, want %v", got, want)
	}
	gauge := func(g prometheus.Gauge) float64 {
		var m dto.Metric
		g.Write(&m)
		return m.GetGauge().GetValue()
	}
	if got := gauge(b.m.backupSize); got != float64(man.Size) {
		t.Errorf("backup_last_size_bytes = %v, want %d", got, man.Size)
	}
	if got := gauge(b.m.backupLast); got != float64(man.CreatedAt.UnixMilli())/1000 {
		t.Errorf("backup_last_success_timestamp_seconds = %v, want %v", got, man.CreatedAt)
	}
	onDisk, err := readManifest(filepath.Join(b.dir, man.Name+".json"))
	if err != nil {
		t.Fatal(err)
	}
	if diff := cmp.Diff(man, onDisk); diff != "" {
		t.Errorf("manifest on disk (-returned +on disk):\n%s", diff)
	}
	// The copy is a database whole on its own: read-only, no WAL.
	if _, err := inspectBackup(ctx, filepath.Join(b.dir, man.Name)); err != nil {
		t.Errorf("inspect the backup read-only: %v", err)
	}
	list, err := b.List()
	if err != nil || len(list) != 1 || list[0].Name != man.Name {
		t.Errorf("List() = %v, %v; want the one backup", list, err)
	}
	if err := b.Delete(man.Name); err != nil {
		t.Errorf("Delete() error = %v", err)
	}
	if err := b.Delete(man.Name); !errors.Is(err, ErrBackupNotFound) {
		t.Errorf("second Delete() error = %v, want ErrBackupNotFound", err)
	}
	if got := dirNames(t, b.dir); len(got) != 0 {
		t.Errorf("backup dir holds %v after the delete, want nothing", got)
	}
}

func TestBackups_keep(t *testing.T) {
	s := newTestStore(t)
	b := newTestBackups(t, s, 2)
	var names []string
	for range 4 {
		man, err := b.Create(t.Context())
		if err != nil {
			t.Fatal(err)
		}
		names = append(names, man.Name)
	}
	list, _ := b.List()
	var got []string
	for _, m := range list {
		got = append(got, m.Name)
	}
	if !slices.Equal(got, names[2:]) {
		t.Errorf("kept %v, want the newest two %v", got, names[2:])
	}
}

func TestBackups_oneAtATime(t *testing.T) {
	s := newTestStore(t)
	b := newTestBackups(t, s, 0)
	entered, release := make(chan struct{}), make(chan struct{})
	b.snapshot = func(ctx context.Context, src, dst string) error {
		close(entered)
		<-release
		return snapshotBackupAPI(ctx, src, dst)
	}
	errc := make(chan error, 1)
	go func() { _, err := b.Create(context.Background()); errc <- err }()
	<-entered
	if _, err := b.Create(t.Context()); !errors.Is(err, ErrBackupRunning) {
		t.Errorf("Create() during another: error = %v, want ErrBackupRunning", err)
	}
	close(release)
	if err := <-errc; err != nil {
		t.Errorf("first Create() error = %v", err)
	}
}

// A backup that fails at any stage, as a crash there would, leaves nothing
// under a final name, is counted, and the next one succeeds.
func TestBackups_failureLeavesNothing(t *testing.T) {
	for _, stage := range []string{"snapshot", "verify", "rename"} {
		t.Run(stage, func(t *testing.T) {
			s := newTestStore(t)
			if _, _, err := s.Create(t.Context(), "", newProduct("F-1"), nil); err != nil {
				t.Fatal(err)
			}
			b := newTestBackups(t, s, 0)
			b.failAt = func(at string) error {
				if at == stage {
					return errors.New("crash at " + at)
				}
				return nil
			}
			if _, err := b.Create(t.Context()); err == nil {
				t.Fatal("Create() error = nil, want the failure")
			}
			if got := dirNames(t, b.dir); len(got) != 0 {
				t.Errorf("after a failure at %s the backup dir holds %v, want nothing", stage, got)
			}
			if got := counterValue(t, b.m.backupFailures); got != 1 {
				t.Errorf("backup_failures_total = %v, want 1", got)
			}
			b.failAt = nil
			man, err := b.Create(t.Context())
			if err != nil {
				t.Fatalf("next Create() error = %v", err)
			}
			if list, _ := b.List(); len(list) != 1 || list[0].Name != man.Name {
				t.Errorf("List() = %v, want the one backup", list)
			}
		})
	}
}

// What a process killed during a backup leaves (a temporary copy, a copy
// renamed without its manifest) is never listed, and is removed at start.
func TestBackups_crashLeftovers(t *testing.T) {
	s := newTestStore(t)
	b := newTestBackups(t, s, 0)
	man, err := b.Create(t.Context())
	if err != nil {
		t.Fatal(err)
	}
	orphan := "productsvc-20260101T000000.000000Z.db"
	for _, name := range []string{tempPrefix + "productsvc-20260101T000001.000000Z.db", tempPrefix + "x.db.json", orphan} {
		if err := os.WriteFile(filepath.Join(b.dir, name), []byte("partial"), 0o644); err != nil {
			t.Fatal(err)
		}
	}
	if list, _ := b.List(); len(list) != 1 {
		t.Errorf("List() = %v, want only the complete backup", list)
	}
	if _, _, err := b.Open(orphan); !errors.Is(err, ErrBackupNotFound) {
		t.Errorf("Open(copy without manifest) error = %v, want ErrBackupNotFound", err)
	}
	if _, err := newBackups(b.dir, 0, s, slog.New(slog.DiscardHandler), newMetrics(nil)); err != nil {
		t.Fatal(err)
	}
	if got, want := dirNames(t, b.dir), []string{man.Name, man.Name + ".json"}; !slices.Equal(got, want) {
		t.Errorf("after a restart the backup dir holds %v, want %v", got, want)
	}
}

func TestBackups_names(t *testing.T) {
	s := newTestStore(t)
	b := newTestBackups(t, s, 0)
	secret := filepath.Join(filepath.Dir(b.dir), "secret.db")
	os.WriteFile(secret, []byte("x"), 0o644)
	os.WriteFile(secret+".json", []byte("{}"), 0o644)
	for _, name := range []string{"../secret.db", "..", "", "secret.db", "/etc/passwd", "productsvc-20260101T000000.000000Z.db/../../secret.db"} {
		if _, _, err := b.Open(name); !errors.Is(err, ErrBackupNotFound) {
			t.Errorf("Open(%q) error = %v, want ErrBackupNotFound", name, err)
		}
		if err := b.Delete(name); !errors.Is(err, ErrBackupNotFound) {
			t.Errorf("Delete(%q) error = %v, want ErrBackupNotFound", name, err)
		}
	}
	if !exists(secret) {
		t.Error("a name outside the backup dir was deleted")
	}
}

// TestBackup_underWritersRestoresAcknowledged takes a backup while 8
// writers change products and reservations, restores it, and compares the
// restored database with what the live change feed says up to the
// manifest's seq: every event, every product, every reservation.
func TestBackup_underWritersRestoresAcknowledged(t *testing.T) {
	ctx := t.Context()
	dir := t.TempDir()
	s := openTestStore(t, filepath.Join(dir, "live.db"))
	for i := range 50 {
		p := newProduct(fmt.Sprintf("W-%d", i))
		p.Stock = 1000
		if _, _, err := s.Create(ctx, "", p, nil); err != nil {
			t.Fatal(err)
		}
	}
	b := newTestBackups(t, s, 0)

	var (
		stop    atomic.Bool
		wg      sync.WaitGroup
		mu      sync.Mutex
		acked   []int64 // seqs' lower bound: feed heads read after acknowledged writes
		started = make(chan struct{})
	)
	var once sync.Once
	for w := range 8 {
		wg.Go(func() {
			rng := rand.New(rand.NewPCG(uint64(w), 1))
			for n := 0; !stop.Load(); n++ {
				if n == 20 {
					once.Do(func() { close(started) })
				}
				id := rng.Int64N(50) + 1
				var err error
				switch rng.IntN(5) {
				case 0:
					_, _, err = s.Create(ctx, "", newProduct(fmt.Sprintf("N-%d-%d", w, n)), nil)
				case 1, 2:
					_, _, err = s.AdjustStock(ctx, "", id, rng.Int64N(5)-1, nil, nil)
				case 3:
					var r Reserved
					r, err = s.Reserve(ctx, Reservation{ID: newReservationID(), Reference: fmt.Sprintf("o-%d-%d", w, n),
						Lines: []ReservationLine{{ProductID: id, Quantity: 1}}}, time.Hour, 0, nil)
					if err == nil && rng.IntN(2) == 0 {
						_, err = s.Transition(ctx, "", r.Reservation.ID, StateConfirmed)
					} else if err == nil {
						_, err = s.Transition(ctx, "", r.Reservation.ID, StateReleased)
					}
				case 4:
					p := newProduct(fmt.Sprintf("D-%d-%d", w, n))
					var c Product
					if c, _, err = s.Create(ctx, "", p, nil); err == nil {
						_, err = s.Delete(ctx, "", c.ID, nil)
					}
				}
				if err != nil && !errors.Is(err, ErrInsufficientStock) {
					t.Errorf("writer %d: %v", w, err)
					return
				}
				if err == nil {
					if head, err := s.FeedHead(ctx); err == nil {
						mu.Lock()
						acked = append(acked, head)
						mu.Unlock()
					}
				}
			}
		})
	}
	<-started
	mu.Lock()
	ackedBefore := slices.Max(acked) // every write acknowledged before the backup began is at or below it
	mu.Unlock()
	man, err := b.Create(ctx)
	if err != nil {
		stop.Store(true)
		wg.Wait()
		t.Fatalf("Create() under writers error = %v", err)
	}
	time.Sleep(50 * time.Millisecond) // writes after the backup, which it must not hold
	stop.Store(true)
	wg.Wait()
	if man.FeedSeq < ackedBefore {
		t.Errorf("backup holds the feed up to %d; writes acknowledged before it began reach %d", man.FeedSeq, ackedBefore)
	}
	liveHead, _ := s.FeedHead(ctx)
	t.Logf("backup at seq %d of %d", man.FeedSeq, liveHead)

	restored := filepath.Join(dir, "restored.db")
	var out bytes.Buffer
	if err := restoreSQLite(ctx, restored, filepath.Join(b.dir, man.Name), false, &out); err != nil {
		t.Fatalf("restore: %v", err)
	}
	r := openTestStore(t, restored)

	live, err := s.Events(ctx, 0, 1_000_000)
	if err != nil {
		t.Fatal(err)
	}
	var want []Event
	for _, e := range live {
		if e.Seq <= man.FeedSeq {
			want = append(want, e)
		}
	}
	got, err := r.Events(ctx, 0, 1_000_000)
	if err != nil {
		t.Fatal(err)
	}
	if diff := cmp.Diff(want, got); diff != "" {
		t.Fatalf("restored events (-live up to seq %d +restored):\n%s", man.FeedSeq, diff)
	}

	// The state the feed says, up to the manifest's seq.
	products := map[int64]Product{}
	reservations := map[string]Reservation{}
	for _, e := range want {
		switch {
		case e.Reservation != nil:
			reservations[e.Reservation.ID] = *e.Reservation
		case e.Type == EventProductDeleted:
			delete(products, e.ProductID)
		case e.Product != nil:
			products[e.ProductID] = *e.Product
		}
	}
	for id, p := range products {
		gp, err := r.Get(ctx, id)
		if err != nil {
			t.Errorf("restored product %d: %v", id, err)
			continue
		}
		if diff := cmp.Diff(p, gp); diff != "" {
			t.Errorf("restored product %d (-feed +restored):\n%s", id, diff)
		}
	}
	if got := r.Count(); got != int64(len(products)) {
		t.Errorf("restored database holds %d products, the feed %d", got, len(products))
	}
	for id, res := range reservations {
		gr, err := r.Reservation(ctx, id)
		if err != nil {
			t.Errorf("restored reservation %s: %v", id, err)
			continue
		}
		if diff := cmp.Diff(res, gr); diff != "" {
			t.Errorf("restored reservation %s (-feed +restored):\n%s", id, diff)
		}
	}
	if newID, _ := r.LogID(ctx); newID == man.LogID || newID == "" {
		t.Errorf("restored log_id %q, want a new one (the backup's is %s)", newID, man.LogID)
	}
	t.Logf("compared %d events, %d products, %d reservations", len(want), len(products), len(reservations))
}

// corruptBackup returns a copy of backup (and its manifest) in a new
// directory, changed by change.
func copyBackup(tb testing.TB, src string, change func(path string)) string {
	tb.Helper()
	dst := filepath.Join(tb.TempDir(), filepath.Base(src))
	for _, suffix := range []string{"", ".json"} {
		b, err := os.ReadFile(src + suffix)
		if err != nil {
			tb.Fatal(err)
		}
		if err := os.WriteFile(dst+suffix, b, 0o644); err != nil {
			tb.Fatal(err)
		}
	}
	change(dst)
	return dst
}

func TestRestore_refuses(t *testing.T) {
	ctx := t.Context()
	s := newTestStore(t)
	for i := range 200 {
		if _, _, err := s.Create(ctx, "", newProduct(fmt.Sprintf("R-%d", i)), nil); err != nil {
			t.Fatal(err)
		}
	}
	b := newTestBackups(t, s, 0)
	man, err := b.Create(ctx)
	if err != nil {
		t.Fatal(err)
	}
	good := filepath.Join(b.dir, man.Name)
	flip := func(path string) {
		f, _ := os.OpenFile(path, os.O_RDWR, 0)
		defer f.Close()
		buf := make([]byte, 1)
		at := man.Size / 2
		f.ReadAt(buf, at)
		buf[0] ^= 0x10
		f.WriteAt(buf, at)
	}
	truncate := func(path string) { os.Truncate(path, man.Size/2) }
	noManifest := func(path string) { os.Remove(path + ".json") }
	newer := func(path string) {
		db, err := openRW(path)
		if err != nil {
			t.Fatal(err)
		}
		defer db.Close()
		if _, err := db.Exec(`INSERT INTO schema_migrations (version, applied_at) VALUES (?, 0)`, len(migrations)+1); err != nil {
			t.Fatal(err)
		}
	}
	// A page of the products table rewritten with garbage: the manifest
	// would catch it; without one integrity_check must.
	badPage := func(path string) {
		noManifest(path)
		f, _ := os.OpenFile(path, os.O_RDWR, 0)
		defer f.Close()
		f.WriteAt(bytes.Repeat([]byte{0xA5}, 2048), 4096*3+1024)
	}

	tests := []struct {
		name   string
		change func(string)
		want   string
	}{
		{"one flipped byte", flip, "does not match its manifest"},
		{"truncated", truncate, "does not match its manifest"},
		{"truncated without manifest", func(p string) { noManifest(p); truncate(p) }, ""},
		{"corrupt page without manifest", badPage, ""},
		{"schema newer than the binary", func(p string) { newer(p); noManifest(p) }, "newer than this binary"},
		{"not a database", func(p string) { noManifest(p); os.WriteFile(p, []byte("hello"), 0o644) }, ""},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			src := copyBackup(t, good, tt.change)
			dir := t.TempDir()
			dbPath := filepath.Join(dir, "products.db")
			os.WriteFile(dbPath, []byte("the current database"), 0o644)
			before := dirNames(t, dir)
			var out bytes.Buffer
			err := restoreSQLite(ctx, dbPath, src, false, &out)
			if err == nil || !strings.Contains(err.Error(), "restore refused") || !strings.Contains(err.Error(), tt.want) {
				t.Fatalf("restore error = %v, want a refusal saying %q", err, tt.want)
			}
			if got := dirNames(t, dir); !slices.Equal(got, append(before, "products.db.lock")) {
				t.Errorf("after a refusal DB_PATH's dir holds %v, want %v and the lock", got, before)
			}
			if b, _ := os.ReadFile(dbPath); string(b) != "the current database" {
				t.Errorf("DB_PATH changed by a refused restore")
			}
		})
	}
}

// openRW opens the SQLite file at path for writing, outside any store.
func openRW(path string) (*sql.DB, error) { return sql.Open("sqlite", sqliteURI(path, "mode=rwc")) }

// serveHandler serves h on a test server.
func serveHandler(tb testing.TB, h http.Handler) *testServer {
	srv := httptest.NewServer(h)
	tb.Cleanup(srv.Close)
	return &testServer{Server: srv, handler: h, client: srv.Client()}
}

func TestRestore_besideRunningService(t *testing.T) {
	ctx := t.Context()
	dir := t.TempDir()
	dbPath := filepath.Join(dir, "products.db")
	s := openTestStore(t, dbPath)
	b := newTestBackups(t, s, 0)
	man, err := b.Create(ctx)
	if err != nil {
		t.Fatal(err)
	}
	before := dirNames(t, dir)
	var out bytes.Buffer
	err = restoreSQLite(ctx, dbPath, filepath.Join(b.dir, man.Name), false, &out)
	if err == nil || !strings.Contains(err.Error(), "in use by another productsvc process") {
		t.Fatalf("restore beside a running service: error = %v, want a refusal naming the lock", err)
	}
	var cerr *configError
	if errors.As(err, &cerr) {
		t.Errorf("refusal is a configError (exit 2); want exit 1")
	}
	if got := dirNames(t, dir); !slices.Equal(got, before) {
		t.Errorf("DB_PATH's dir holds %v after the refusal, want %v", got, before)
	}
}

func TestRestore_ifMissing(t *testing.T) {
	ctx := t.Context()
	s := newTestStore(t)
	if _, _, err := s.Create(ctx, "", newProduct("M-1"), nil); err != nil {
		t.Fatal(err)
	}
	b := newTestBackups(t, s, 0)
	man, err := b.Create(ctx)
	if err != nil {
		t.Fatal(err)
	}
	src := filepath.Join(b.dir, man.Name)
	dbPath := filepath.Join(t.TempDir(), "data", "products.db") // the directory too is missing
	var out bytes.Buffer
	if err := restoreSQLite(ctx, dbPath, src, true, &out); err != nil {
		t.Fatalf("restore-if-missing into nothing: %v", err)
	}
	r := openTestStore(t, dbPath)
	if r.Count() != 1 {
		t.Errorf("restored database holds %d products, want 1", r.Count())
	}
	r.Close()
	out.Reset()
	sum, _, _ := digestFile(dbPath)
	if err := restoreSQLite(ctx, dbPath, src, true, &out); err != nil || !strings.Contains(out.String(), "nothing restored") {
		t.Errorf("restore-if-missing over a database: %v, %q; want nothing done", err, out.String())
	}
	if after, _, _ := digestFile(dbPath); after != sum {
		t.Error("restore-if-missing changed an existing database")
	}
}

// A restore over a database with changes in its WAL keeps that database,
// whole, beside the restored one.
func TestRestore_keepsCurrent(t *testing.T) {
	ctx := t.Context()
	dir := t.TempDir()
	dbPath := filepath.Join(dir, "products.db")
	s := openTestStore(t, dbPath)
	for i := range 3 {
		if _, _, err := s.Create(ctx, "", newProduct(fmt.Sprintf("K-%d", i)), nil); err != nil {
			t.Fatal(err)
		}
	}
	b := newTestBackups(t, s, 0)
	man, err := b.Create(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if _, _, err := s.Create(ctx, "", newProduct("K-after"), nil); err != nil {
		t.Fatal(err)
	}
	// Stop without a checkpoint, as a crash would: the last write is
	// only in the WAL.
	s.stopWriter()
	s.rdb.Close()
	s.wdb.Close()
	s.unlock()
	s.closeOnce.Do(func() {})

	var out bytes.Buffer
	if err := restoreSQLite(ctx, dbPath, filepath.Join(b.dir, man.Name), false, &out); err != nil {
		t.Fatalf("restore: %v", err)
	}
	t.Log(out.String())
	var aside string
	for _, n := range dirNames(t, dir) {
		if strings.HasPrefix(n, "products.db.before-restore-") && !strings.HasSuffix(n, "-wal") && !strings.HasSuffix(n, "-shm") {
			aside = filepath.Join(dir, n)
		}
	}
	if aside == "" || !strings.Contains(out.String(), aside) {
		t.Fatalf("no database kept aside in %v (output %q)", dirNames(t, dir), out.String())
	}
	if exists(dbPath+"-wal") || exists(dbPath+"-shm") {
		t.Errorf("the old database's WAL or shm is still beside the restored one: %v", dirNames(t, dir))
	}
	kept := openTestStore(t, aside)
	if kept.Count() != 4 {
		t.Errorf("kept database holds %d products, want 4 (the last only in its WAL)", kept.Count())
	}
	r := openTestStore(t, dbPath)
	if r.Count() != 3 {
		t.Errorf("restored database holds %d products, want the backup's 3", r.Count())
	}
}

// After a restore, consumers holding positions of the old log get 410
// feed-reset: with its log_id, beyond the restored head, and over SSE.
func TestRestore_feedReset(t *testing.T) {
	ctx := t.Context()
	dir := t.TempDir()
	s := openTestStore(t, filepath.Join(dir, "live.db"))
	for i := range 3 {
		if _, _, err := s.Create(ctx, "", newProduct(fmt.Sprintf("E-%d", i)), nil); err != nil {
			t.Fatal(err)
		}
	}
	b := newTestBackups(t, s, 0)
	man, err := b.Create(ctx)
	if err != nil {
		t.Fatal(err)
	}
	for i := range 5 {
		if _, _, err := s.Create(ctx, "", newProduct(fmt.Sprintf("E-after-%d", i)), nil); err != nil {
			t.Fatal(err)
		}
	}
	oldHead, _ := s.FeedHead(ctx)
	restored := filepath.Join(dir, "restored.db")
	var out bytes.Buffer
	if err := restoreSQLite(ctx, restored, filepath.Join(b.dir, man.Name), false, &out); err != nil {
		t.Fatal(err)
	}
	ts := newTestServer(t, newTestService(t, openTestStore(t, restored), ServiceConfig{}))
	auth := "Bearer " + testToken
	wantReset := func(name string, resp response) {
		t.Helper()
		var p problem
		json.Unmarshal(resp.body, &p)
		if resp.status != http.StatusGone || p.Type != "/problems/feed-reset" {
			t.Errorf("%s: %s, want 410 feed-reset", name, resp)
		}
	}
	wantReset("old log_id", ts.do(t, "GET", fmt.Sprintf("/events?after=%d&log_id=%s", man.FeedSeq, man.LogID), nil, "Authorization", auth))
	wantReset("beyond the head", ts.do(t, "GET", fmt.Sprintf("/events?after=%d", oldHead), nil, "Authorization", auth))
	wantReset("SSE Last-Event-ID beyond the head", ts.do(t, "GET", "/events", nil, "Authorization", auth,
		"Accept", "text/event-stream", "Last-Event-ID", fmt.Sprint(oldHead)))
	// At the backup's own head, with no log_id: the restored feed goes on
	// from there.
	if resp := ts.do(t, "GET", fmt.Sprintf("/events?after=%d", man.FeedSeq), nil, "Authorization", auth); resp.status != http.StatusOK {
		t.Errorf("at the restored head: %s, want 200", resp)
	}
}

func TestBackupsAPI(t *testing.T) {
	s := newTestStore(t)
	if _, _, err := s.Create(t.Context(), "", newProduct("A-1"), nil); err != nil {
		t.Fatal(err)
	}
	svc := newTestService(t, s, ServiceConfig{})
	b := newTestBackups(t, s, 0)
	h := newServer(serverDeps{svc: svc, log: slog.New(slog.DiscardHandler), metrics: svc.metrics,
		tokens: newTokenSet([]string{testToken}), life: &lifecycle{}, backups: b})
	ts := serveHandler(t, h)
	auth := "Bearer " + testToken

	if resp := ts.do(t, "POST", "/admin/backups", nil); resp.status != http.StatusUnauthorized {
		t.Errorf("POST /admin/backups without a token: %s, want 401", resp)
	}
	resp := ts.do(t, "POST", "/admin/backups", nil, "Authorization", auth)
	if resp.status != http.StatusCreated {
		t.Fatalf("POST /admin/backups: %s, want 201", resp)
	}
	var man backupManifest
	if err := json.Unmarshal(resp.body, &man); err != nil || man.Name == "" || man.SHA256 == "" {
		t.Fatalf("manifest %s: %v", resp.body, err)
	}
	if loc := resp.header.Get("Location"); loc != "/admin/backups/"+man.Name {
		t.Errorf("Location %q", loc)
	}
	resp = ts.do(t, "GET", "/admin/backups", nil, "Authorization", auth)
	var list struct{ Backups []backupManifest }
	if json.Unmarshal(resp.body, &list); resp.status != 200 || len(list.Backups) != 1 || list.Backups[0].Name != man.Name {
		t.Errorf("GET /admin/backups: %s", resp)
	}
	resp = ts.do(t, "GET", "/admin/backups/"+man.Name, nil, "Authorization", auth)
	sum := sha256.Sum256(resp.body)
	if resp.status != 200 || hex.EncodeToString(sum[:]) != man.SHA256 || int64(len(resp.body)) != man.Size {
		t.Errorf("GET /admin/backups/%s: %d, %d bytes, sha-256 %x; want 200 and the manifest's", man.Name, resp.status, len(resp.body), sum)
	}
	if got, want := resp.header.Get("Repr-Digest"), "sha-256=:"+base64.StdEncoding.EncodeToString(sum[:])+":"; got != want {
		t.Errorf("Repr-Digest %q, want %q", got, want)
	}
	for _, bad := range []string{"..%2Fproducts.db", "nope.db", "productsvc-20260101T000000.000000Z.db"} {
		if resp := ts.do(t, "GET", "/admin/backups/"+bad, nil, "Authorization", auth); resp.status != http.StatusNotFound {
			t.Errorf("GET /admin/backups/%s: %s, want 404", bad, resp)
		}
	}
	if resp := ts.do(t, "DELETE", "/admin/backups/"+man.Name, nil, "Authorization", auth); resp.status != http.StatusNoContent {
		t.Errorf("DELETE: %s, want 204", resp)
	}
	if resp := ts.do(t, "DELETE", "/admin/backups/"+man.Name, nil, "Authorization", auth); resp.status != http.StatusNotFound {
		t.Errorf("DELETE again: %s, want 404", resp)
	}

	// Without backups (PostgreSQL): a problem that says why.
	h = newServer(serverDeps{svc: svc, log: slog.New(slog.DiscardHandler), metrics: svc.metrics,
		tokens: newTokenSet([]string{testToken}), life: &lifecycle{}})
	ts = serveHandler(t, h)
	resp = ts.do(t, "POST", "/admin/backups", nil, "Authorization", auth)
	if resp.status != http.StatusNotImplemented || !strings.Contains(string(resp.body), "pg_dump") {
		t.Errorf("POST /admin/backups on PostgreSQL: %s, want 501 naming pg_dump", resp)
	}
}

func TestBackups_Schedule(t *testing.T) {
	s := newTestStore(t)
	b := newTestBackups(t, s, 2)
	var taken atomic.Int64
	b.snapshot = func(ctx context.Context, src, dst string) error {
		taken.Add(1)
		return snapshotBackupAPI(ctx, src, dst)
	}
	ctx, cancel := context.WithCancel(t.Context())
	done := make(chan struct{})
	go func() { b.Schedule(ctx, 20*time.Millisecond); close(done) }()
	waitFor(t, 10*time.Second, "three scheduled backups", func() bool { return taken.Load() >= 3 })
	cancel()
	<-done
	if list, _ := b.List(); len(list) != 2 {
		t.Errorf("after %d scheduled backups %d are kept, want BACKUP_KEEP=2", taken.Load(), len(list))
	}
}

// A database of an older schema (here before the change feed) is restored
// as it is, and migrated when the service opens it.
func TestRestore_olderSchema(t *testing.T) {
	ctx := t.Context()
	src := filepath.Join(t.TempDir(), "old.db")
	db, err := openRW(src)
	if err != nil {
		t.Fatal(err)
	}
	db.SetMaxOpenConns(1)
	if _, err := db.Exec(`CREATE TABLE schema_migrations (version INTEGER PRIMARY KEY, applied_at INTEGER NOT NULL)`); err != nil {
		t.Fatal(err)
	}
	for i, m := range migrations[:5] {
		if _, err := db.Exec(m); err != nil {
			t.Fatalf("migration %d: %v", i+1, err)
		}
		db.Exec(`INSERT INTO schema_migrations VALUES (?, 0)`, i+1)
	}
	if _, err := db.Exec(`INSERT INTO products (sku, name, price_cents, created_at, updated_at) VALUES ('OLD-1', 'old', 1, 0, 0)`); err != nil {
		t.Fatal(err)
	}
	db.Close()

	dbPath := filepath.Join(t.TempDir(), "products.db")
	var out bytes.Buffer
	if err := restoreSQLite(ctx, dbPath, src, false, &out); err != nil {
		t.Fatalf("restore of a schema 5 database: %v", err)
	}
	if !strings.Contains(out.String(), "schema version 5") {
		t.Errorf("restore printed %q, want schema version 5", out.String())
	}
	s := openTestStore(t, dbPath)
	if id, _ := s.LogID(ctx); !validLogID(id) {
		t.Errorf("log_id after migrating the restored database = %q", id)
	}
	if s.Count() != 1 {
		t.Errorf("restored database holds %d products, want 1", s.Count())
	}
}
