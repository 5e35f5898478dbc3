package e2e

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"math/rand/v2"
	"net/http"
	"net/http/httptrace"
	"os"
	"strconv"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"
)

// shutdownCounts classifies every request of the graceful-shutdown load.
type shutdownCounts struct {
	mu sync.Mutex
	// ok: a response below 500 with a complete JSON body.
	ok, okAfterSignal int
	// notAccepted: refused, or reset on a fresh connection before any byte
	// of a response (the listener was closing); the request was not served.
	notAccepted int
	// bad: 5xx, a body that does not parse, or an error after the response
	// started or on a request the server had accepted.
	bad     int
	badDesc []string
	byCode  map[int]int
}

func (c *shutdownCounts) record(f func(c *shutdownCounts)) {
	c.mu.Lock()
	defer c.mu.Unlock()
	f(c)
}

func (c *shutdownCounts) fail(format string, args ...any) {
	c.bad++
	if len(c.badDesc) < 20 {
		c.badDesc = append(c.badDesc, fmt.Sprintf(format, args...))
	}
}

func TestGracefulShutdownUnderLoad(t *testing.T) {
	const (
		shutdownDelay   = 1 * time.Second
		shutdownTimeout = 10 * time.Second
		exitMargin      = 10 * time.Second
		loaders         = 6
	)
	svc, c := startReadyService(t, map[string]string{
		"SHUTDOWN_DELAY":   shutdownDelay.String(),
		"SHUTDOWN_TIMEOUT": shutdownTimeout.String(),
	})
	var ids []int64
	for i := 0; i < 20; i++ {
		ids = append(ids, mustCreate(t, c, fmt.Sprintf("gs-%02d", i), "graceful item", 100+int64(i), nil).ID)
	}

	counts := &shutdownCounts{byCode: map[int]int{}}
	var signalled atomic.Bool
	var seq atomic.Int64
	stop := make(chan struct{})
	var wg sync.WaitGroup
	loadClient := newClient(svc.BaseURL, testToken)
	defer loadClient.Close()
	for g := 0; g < loaders; g++ {
		wg.Add(1)
		go func(g int) {
			defer wg.Done()
			rng := rand.New(rand.NewPCG(uint64(g), 7))
			tick := time.NewTicker(4 * time.Millisecond)
			defer tick.Stop()
			// Bounded: at most 30000 requests or until stop.
			for i := 0; i < 30000; i++ {
				select {
				case <-stop:
					return
				case <-tick.C:
				}
				shutdownRequest(loadClient, counts, &signalled, &seq, ids, rng)
			}
		}(g)
	}

	// Warm up: wait for some successful traffic before the signal.
	if !pollUntil(10*time.Second, 20*time.Millisecond, func() bool {
		counts.mu.Lock()
		defer counts.mu.Unlock()
		return counts.ok >= 100
	}) {
		t.Fatalf("load produced fewer than 100 successes in 10s: %+v", counts.byCode)
	}

	signalled.Store(true)
	sigAt := time.Now()
	if err := svc.Signal(syscall.SIGTERM); err != nil {
		t.Fatalf("SIGTERM: %v", err)
	}

	// /ready must turn 503 while the listener is still open (the delay).
	readyClient := newClient(svc.BaseURL, "")
	defer readyClient.Close()
	var readyAfter time.Duration
	var readyLast string
	saw503 := pollUntil(shutdownDelay+2*time.Second, 10*time.Millisecond, func() bool {
		ctx, cancel := context.WithTimeout(context.Background(), time.Second)
		defer cancel()
		r, err := readyClient.do(ctx, http.MethodGet, "/ready", nil, nil)
		if err != nil {
			readyLast = err.Error()
			return false
		}
		readyLast = r.String()
		if r.Status == http.StatusServiceUnavailable {
			readyAfter = time.Since(sigAt)
			var rb readyBody
			if err := json.Unmarshal(r.Body, &rb); err != nil {
				t.Errorf("GET /ready during shutdown: 503 body does not parse: %q", r.Body)
			}
			return true
		}
		return false
	})
	if !saw503 {
		t.Errorf("GET /ready never answered 503 within %v of SIGTERM; last: %s", shutdownDelay+2*time.Second, readyLast)
	} else {
		t.Logf("GET /ready answered 503 %v after SIGTERM", readyAfter.Round(time.Millisecond))
	}

	exitLimit := shutdownDelay + shutdownTimeout + exitMargin
	code, exited := svc.Wait(exitLimit)
	exitAfter := time.Since(sigAt)
	close(stop)
	wg.Wait()
	if !exited {
		t.Errorf("process still running %v after SIGTERM (limit SHUTDOWN_DELAY+SHUTDOWN_TIMEOUT+%v)", exitLimit, exitMargin)
		svc.Kill()
	} else if code != 0 {
		t.Errorf("exit status %d after SIGTERM, want 0; stderr:\n%s", code, svc.Stderr.Tail(20))
	}
	if exited && exitAfter < shutdownDelay {
		t.Errorf("process exited %v after SIGTERM, before SHUTDOWN_DELAY=%v elapsed", exitAfter, shutdownDelay)
	}

	counts.mu.Lock()
	defer counts.mu.Unlock()
	t.Logf("RESULT requests ok=%d (after SIGTERM %d) not-accepted=%d bad=%d statuses=%v; exit status %d after %v (limit %v)",
		counts.ok, counts.okAfterSignal, counts.notAccepted, counts.bad, counts.byCode, code,
		exitAfter.Round(time.Millisecond), exitLimit)
	for _, d := range counts.badDesc {
		t.Errorf("bad request outcome: %s", d)
	}
	if counts.okAfterSignal == 0 {
		t.Errorf("no request succeeded after SIGTERM: the service should keep serving for SHUTDOWN_DELAY=%v", shutdownDelay)
	}

	if !onPostgres() { // SQLite checkpoints its WAL into the main file at shutdown
		wal := svc.DBPath + "-wal"
		fi, err := os.Stat(wal)
		switch {
		case errors.Is(err, os.ErrNotExist):
			t.Logf("WAL file %s absent after shutdown", wal)
		case err != nil:
			t.Errorf("stat %s: %v", wal, err)
		case fi.Size() != 0:
			t.Errorf("WAL file %s is %d bytes after a clean shutdown, want absent or empty (checkpointed)", wal, fi.Size())
		default:
			t.Logf("WAL file %s empty after shutdown", wal)
		}
	}
}

// shutdownRequest sends one read or write and classifies the result.
func shutdownRequest(c *client, counts *shutdownCounts, signalled *atomic.Bool, seq *atomic.Int64, ids []int64, rng *rand.Rand) {
	afterSignal := signalled.Load()
	var method, path string
	var body []byte
	hdr := http.Header{}
	id := ids[rng.IntN(len(ids))]
	switch n := rng.IntN(10); {
	case n < 5:
		method, path = http.MethodGet, "/products/"+strconv.FormatInt(id, 10)
	case n < 7:
		method, path = http.MethodGet, "/products?limit=10"
	case n < 9:
		method, path = http.MethodPatch, "/products/"+strconv.FormatInt(id, 10)
		body = []byte(fmt.Sprintf(`{"price_cents":%d}`, rng.IntN(100000)))
		hdr.Set("Content-Type", "application/merge-patch+json")
	default:
		k := seq.Add(1)
		method, path = http.MethodPost, "/products"
		body = createBody(fmt.Sprintf("gs-new-%06d", k), "graceful new", 1, nil)
	}
	// With an Idempotency-Key the transport may replay a write whose
	// keep-alive connection was closed before it was read, as it does for
	// GETs; the service honours the key on POST /products, and the PATCH
	// sets an absolute price, so a replay is harmless.
	if method != http.MethodGet {
		hdr.Set("Idempotency-Key", fmt.Sprintf("gs-%d-%d", seq.Add(1), rng.Int64()))
	}

	var gotFirstByte, reused atomic.Bool
	trace := &httptrace.ClientTrace{
		GotConn:              func(i httptrace.GotConnInfo) { reused.Store(i.Reused) },
		GotFirstResponseByte: func() { gotFirstByte.Store(true) },
	}
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	ctx = httptrace.WithClientTrace(ctx, trace)
	req, err := c.newRequest(ctx, method, path, body, hdr)
	if err != nil {
		counts.record(func(c *shutdownCounts) { c.fail("build %s %s: %v", method, path, err) })
		return
	}
	res, err := c.hc.Do(req)
	if err != nil {
		counts.record(func(c *shutdownCounts) {
			switch {
			case isConnRefused(err):
				c.notAccepted++
			case !gotFirstByte.Load() && !reused.Load() && errors.Is(err, syscall.ECONNRESET):
				// A fresh connection that sat in the accept queue when the
				// listener closed: never accepted.
				c.notAccepted++
			default:
				c.fail("%s %s (after SIGTERM=%v, first byte=%v, reused conn=%v): %v",
					method, path, afterSignal, gotFirstByte.Load(), reused.Load(), err)
			}
		})
		return
	}
	b, rerr := io.ReadAll(res.Body)
	res.Body.Close()
	counts.record(func(c *shutdownCounts) {
		c.byCode[res.StatusCode]++
		switch {
		case rerr != nil:
			c.fail("%s %s: response %d cut mid-body: %v", method, path, res.StatusCode, rerr)
		case res.StatusCode >= 500:
			c.fail("%s %s (after SIGTERM=%v): %d %s", method, path, afterSignal, res.StatusCode, b)
		case !json.Valid(b):
			c.fail("%s %s: %d with a body that is not complete JSON: %q", method, path, res.StatusCode, b)
		default:
			c.ok++
			if afterSignal {
				c.okAfterSignal++
			}
		}
	})
}
