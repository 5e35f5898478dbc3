package main

import (
	"context"
	"log/slog"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"sync"
	"sync/atomic"
	"testing"
	"time"
)

// fillProducts inserts n products (and their full-text entries) in one
// maintenance transaction: a large catalog in seconds, without the API.
func fillProducts(tb testing.TB, s *sqliteStore, n int) {
	tb.Helper()
	err := s.alone(context.Background(), func(ctx context.Context, q querier) error {
		now := time.Now().UnixMicro()
		if _, err := q.exec(ctx, `WITH RECURSIVE i(n) AS (SELECT 1 UNION ALL SELECT n + 1 FROM i WHERE n < ?)
			INSERT INTO products (sku, name, description, category, price_cents, stock, created_at, updated_at)
			SELECT 'FILL-' || n, 'product ' || n || ' ' || hex(randomblob(6)), 'a description of product ' || n || ' ' || hex(randomblob(24)),
				'cat-' || (n % 50), n % 100000, 1000000, ?, ? FROM i`, n, now, now); err != nil {
			return err
		}
		_, err := q.exec(ctx, `INSERT INTO products_fts (rowid, name, description)
			SELECT id, name, description FROM products WHERE sku LIKE 'FILL-%'`)
		return err
	})
	if err != nil {
		tb.Fatalf("fill %d products: %v", n, err)
	}
	s.count.Add(int64(n))
}

// TestBackup_measure compares the two ways of taking an online snapshot on
// a large catalog: how long each takes, and the p99 of concurrent writes
// while it runs against without. Set BACKUP_MEASURE=N (products) to run it.
func TestBackup_measure(t *testing.T) {
	n, _ := strconv.Atoi(os.Getenv("BACKUP_MEASURE"))
	if n == 0 {
		t.Skip("BACKUP_MEASURE=products not set")
	}
	dir := t.TempDir()
	s, err := openSQLite(context.Background(), StoreConfig{Path: filepath.Join(dir, "products.db"), Sync: "full", Timeout: 60 * time.Second})
	if err != nil {
		t.Fatal(err)
	}
	defer s.Close()
	fillProducts(t, s, n)
	st, _ := os.Stat(s.path)
	t.Logf("%d products, database %.1f MB", n, float64(st.Size())/1e6)

	// writes runs 8 writers adjusting stock until stop is closed, and
	// returns the latencies.
	writes := func(stop <-chan struct{}) func() []time.Duration {
		var mu sync.Mutex
		var lat []time.Duration
		var wg sync.WaitGroup
		var i atomic.Int64
		for range 8 {
			wg.Go(func() {
				for {
					select {
					case <-stop:
						return
					default:
					}
					id := i.Add(1)%int64(n) + 1
					t0 := time.Now()
					if _, _, err := s.AdjustStock(context.Background(), "", id, 1, nil, nil); err != nil {
						t.Error(err)
						return
					}
					d := time.Since(t0)
					mu.Lock()
					lat = append(lat, d)
					mu.Unlock()
				}
			})
		}
		return func() []time.Duration { wg.Wait(); return lat }
	}
	p := func(lat []time.Duration, q float64) time.Duration {
		slices.Sort(lat)
		if len(lat) == 0 {
			return 0
		}
		return lat[int(float64(len(lat)-1)*q)]
	}

	stop := make(chan struct{})
	wait := writes(stop)
	time.Sleep(3 * time.Second)
	close(stop)
	base := wait()
	t.Logf("writes alone: %d writes in 3s, p50 %v p99 %v max %v", len(base), p(base, .5), p(base, .99), p(base, 1))

	for _, m := range []struct {
		name string
		fn   func(ctx context.Context, src, dst string) error
	}{{"backup API", snapshotBackupAPI}, {"VACUUM INTO", snapshotVacuumInto}, {"backup API", snapshotBackupAPI}, {"VACUUM INTO", snapshotVacuumInto}} {
		dst := filepath.Join(dir, "snap")
		t0 := time.Now()
		if err := m.fn(context.Background(), s.path, dst); err != nil {
			t.Fatalf("%s: %v", m.name, err)
		}
		alone := time.Since(t0)
		fi, _ := os.Stat(dst)
		os.Remove(dst)
		stop := make(chan struct{})
		wait := writes(stop)
		time.Sleep(200 * time.Millisecond)
		t0 = time.Now()
		if err := m.fn(context.Background(), s.path, dst); err != nil {
			t.Fatalf("%s: %v", m.name, err)
		}
		loaded := time.Since(t0)
		time.Sleep(200 * time.Millisecond)
		close(stop)
		lat := wait()
		os.Remove(dst)
		t.Logf("%s: snapshot only %v alone (%.0f MB/s, %.1f MB); %v under 8 writers; writes in that time + 0.4s: %d, p50 %v p99 %v max %v",
			m.name, alone.Round(time.Millisecond), float64(fi.Size())/1e6/alone.Seconds(), float64(fi.Size())/1e6,
			loaded.Round(time.Millisecond), len(lat), p(lat, .5), p(lat, .99), p(lat, 1))
	}

	bk, err := newBackups(filepath.Join(dir, "backups"), 0, s, slog.New(slog.NewTextHandler(os.Stderr, nil)), newMetrics(nil))
	if err != nil {
		t.Fatal(err)
	}
	for _, m := range []struct {
		name string
		fn   func(ctx context.Context, src, dst string) error
	}{{"backup API", snapshotBackupAPI}, {"VACUUM INTO", snapshotVacuumInto}, {"backup API", snapshotBackupAPI}, {"VACUUM INTO", snapshotVacuumInto}} {
		bk.snapshot = m.fn
		t0 := time.Now()
		man, err := bk.Create(context.Background())
		if err != nil {
			t.Fatalf("%s: %v", m.name, err)
		}
		alone := time.Since(t0)
		bk.Delete(man.Name)
		stop := make(chan struct{})
		wait := writes(stop)
		time.Sleep(200 * time.Millisecond)
		t0 = time.Now()
		man, err = bk.Create(context.Background())
		if err != nil {
			t.Fatalf("%s: %v", m.name, err)
		}
		loaded := time.Since(t0)
		time.Sleep(200 * time.Millisecond)
		close(stop)
		lat := wait()
		bk.Delete(man.Name)
		t.Logf("%s: whole backup %v alone (%.0f MB/s, %.1f MB); %v under 8 writers; writes in that time + 0.4s: %d, p50 %v p99 %v max %v",
			m.name, alone.Round(time.Millisecond), float64(man.Size)/1e6/alone.Seconds(), float64(man.Size)/1e6,
			loaded.Round(time.Millisecond), len(lat), p(lat, .5), p(lat, .99), p(lat, 1))
	}
}
