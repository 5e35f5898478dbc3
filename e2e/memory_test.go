package e2e

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"net/http"
	"net/url"
	"os"
	"os/exec"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"
)

// peakRSS returns the child's peak resident set size in bytes (VmHWM).
func (s *service) peakRSS() (int64, error) {
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/status", s.PID()))
	if err != nil {
		return 0, err
	}
	for line := range strings.Lines(string(b)) {
		if rest, ok := strings.CutPrefix(line, "VmHWM:"); ok {
			f := strings.Fields(rest) // "12345 kB"
			if len(f) < 1 {
				break
			}
			kb, err := strconv.ParseInt(f[0], 10, 64)
			return kb * 1024, err
		}
	}
	return 0, errors.New("no VmHWM line")
}

// TestMemoryFlood seeds 100 products with 4,000-character descriptions and
// sends anonymous listings of 100 products under 2,000 distinct queries, 8
// at a time, then the same with a full-text query: anyone can choose the
// keys of the page cache. The process's peak RSS must stay within 128 MB,
// no request may fail with a 5xx, and a product changed during the flood
// must read back fresh after it, by id and in a listing.
func TestMemoryFlood(t *testing.T) {
	const (
		products    = 100
		queries     = 2000
		workers     = 8
		maxPeakRSS  = 128 << 20
		description = "\u00e9"
	)
	svc, c := startReadyService(t, nil)
	anon := newClient(svc.BaseURL, "")
	defer anon.Close()

	desc := strings.Repeat(description, 4000)
	var ids []int64
	for i := range products {
		p := mustCreate(t, c, fmt.Sprintf("FLOOD-%03d", i), fmt.Sprintf("flood lamp %d", i), int64(i)*10, map[string]any{"description": desc})
		ids = append(ids, p.ID)
	}
	before, _ := svc.peakRSS()

	var fivexx, other atomic.Int64
	var firstBad atomic.Value
	flood := func(name, query string) {
		next := make(chan int)
		var wg sync.WaitGroup
		for range workers {
			wg.Go(func() {
				for n := range next {
					// Prices are 0, 10, ..., 990: pages of 1 to 100 products,
					// from a few KB to most of a megabyte.
					path := fmt.Sprintf("/products?limit=100&max_price_cents=%d%s", n, query)
					want := min(products, n/10+1)
					ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
					r, err := anon.do(ctx, http.MethodGet, path, nil, nil)
					cancel()
					switch {
					case err != nil:
						other.Add(1)
						firstBad.CompareAndSwap(nil, fmt.Sprintf("%s GET %s: %v", name, path, err))
					case r.Status >= 500:
						fivexx.Add(1)
						firstBad.CompareAndSwap(nil, fmt.Sprintf("%s GET %s: %s", name, path, r))
					case r.Status != http.StatusOK || bytes.Count(r.Body, []byte(`"sku":`)) != want:
						other.Add(1)
						firstBad.CompareAndSwap(nil, fmt.Sprintf("%s GET %s: %s, want 200 with %d products", name, path, r, want))
					}
				}
			})
		}
		for n := range queries {
			next <- n
			if n == queries/2 && query == "" {
				// A write in the middle of the flood.
				ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
				r, err := c.do(ctx, http.MethodPatch, fmt.Sprintf("/products/%d", ids[7]), []byte(`{"name":"flood lamp renamed"}`),
					http.Header{"Content-Type": {"application/merge-patch+json"}})
				cancel()
				if err != nil || r.Status != http.StatusOK {
					t.Errorf("PATCH during the flood: %v %v", r, err)
				}
			}
		}
		close(next)
		wg.Wait()
	}
	flood("listing", "")
	flood("full-text", "&q=flood")

	peak, err := svc.peakRSS()
	if err != nil {
		t.Fatal(err)
	}
	t.Logf("peak RSS %.1f MB after seeding, %.1f MB after %d listings of %d large products", float64(before)/(1<<20), float64(peak)/(1<<20), 2*queries, products)
	if peak > maxPeakRSS {
		t.Errorf("peak RSS (VmHWM) = %.1f MB, want at most %d MB", float64(peak)/(1<<20), maxPeakRSS>>20)
	}
	if n := fivexx.Load(); n > 0 {
		t.Errorf("%d responses were 5xx, want 0; first: %v", n, firstBad.Load())
	}
	if n := other.Load(); n > 0 {
		t.Errorf("%d reads were not answered normally; first: %v", n, firstBad.Load())
	}

	// The write made during the flood reads back fresh, by id and listed.
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	got, r, err := getProduct(ctx, anon, ids[7])
	if err != nil || r.Status != http.StatusOK || got.Name != "flood lamp renamed" {
		t.Errorf("GET /products/%d after the flood = %+v (%v, %v), want the PATCH's name", ids[7], got, r, err)
	}
	r, err = anon.do(ctx, http.MethodGet, "/products?limit=100&q="+url.QueryEscape("renamed"), nil, nil)
	if err != nil || r.Status != http.StatusOK {
		t.Fatalf("listing after the flood: %v %v", r, err)
	}
	var lp listPage
	if err := json.Unmarshal(r.Body, &lp); err != nil || len(lp.Items) != 1 || lp.Items[0].ID != ids[7] {
		t.Errorf("listing q=renamed after the flood = %d items (%v), want product %d alone", len(lp.Items), err, ids[7])
	}

	text, err := scrapeMetrics(ctx, c)
	if err != nil {
		t.Fatal(err)
	}
	for _, name := range []string{"go_memstats_heap_inuse_bytes", "go_memstats_heap_sys_bytes", "go_memstats_sys_bytes", "process_resident_memory_bytes"} {
		v, _ := metricSum(text, name, nil)
		t.Logf("%s %.1f MB", name, v/(1<<20))
	}
	for _, name := range []string{"local_cache_bytes", "page_cache_bytes"} {
		v, found := metricSum(text, name, nil)
		if !found || v > 16<<20 {
			t.Errorf("%s = %v (found %v), want at most half the 32 MiB default CACHE_MEMORY", name, v, found)
		}
	}
}

// TestSecondProcessRefused starts a second process on the database file of
// a running one: it must exit 2 at once with one line naming DB_PATH and the
// holder's pid, and the first must go on serving.
func TestSecondProcessRefused(t *testing.T) {
	if onPostgres() {
		t.Skip("SKIP: the one-process rule is SQLite's; replicas share PostgreSQL")
	}
	first, c := startReadyService(t, nil)
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	cmd := exec.CommandContext(ctx, binPath)
	cmd.Env = childEnv(map[string]string{"ADDR": "127.0.0.1:0", "API_TOKEN": testToken, "DB_PATH": first.DBPath}, nil)
	var stdout, stderr bytes.Buffer
	cmd.Stdout, cmd.Stderr = &stdout, &stderr
	err := cmd.Run()
	var exit *exec.ExitError
	if !errors.As(err, &exit) || exit.ExitCode() != 2 {
		t.Fatalf("second process: %v, want exit status 2\nstdout:\n%s\nstderr:\n%s", err, stdout.String(), stderr.String())
	}
	msg := strings.TrimSpace(stderr.String())
	if strings.Count(msg, "\n") != 0 || !strings.Contains(msg, "DB_PATH "+first.DBPath) || !strings.Contains(msg, fmt.Sprintf("pid %d", first.PID())) {
		t.Errorf("second process stderr = %q, want one line naming DB_PATH %s and pid %d", msg, first.DBPath, first.PID())
	}
	if strings.Contains(stdout.String(), `"msg":"listening"`) {
		t.Errorf("second process logged listening:\n%s", stdout.String())
	}
	p := mustCreate(t, c, "AFTER-REFUSAL", "still serving", 100, nil)
	if got, r, err := getProduct(ctx, c, p.ID); err != nil || r.Status != http.StatusOK || got.ID != p.ID {
		t.Errorf("first process after the refusal: GET /products/%d = %v, %v", p.ID, r, err)
	}
	// Once the first has stopped, the file is free again.
	if code := first.Stop(30 * time.Second); code != 0 {
		t.Fatalf("first process exit code %d, want 0", code)
	}
	again := startService(t, map[string]string{"DB_PATH": first.DBPath})
	waitReady(t, again.Client(), readyTimeout)
}
