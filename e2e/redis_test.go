package e2e

import (
	"bufio"
	"context"
	"encoding/json"
	"fmt"
	"math/rand/v2"
	"net"
	"net/http"
	"os"
	"os/exec"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"
)

// redisProc is a redis-server child on a fixed loopback port.
type redisProc struct {
	t    testing.TB
	port int
	Addr string
	dir  string
	cmd  *exec.Cmd
	done chan struct{}
	out  *lineLog
}

// requireRedisServer skips the test when redis-server is not installed,
// unless REQUIRE_REDIS=1, in which case it fails.
func requireRedisServer(t testing.TB) string {
	t.Helper()
	path, err := exec.LookPath("redis-server")
	if err != nil {
		if os.Getenv("REQUIRE_REDIS") == "1" {
			t.Fatalf("redis-server not found in PATH and REQUIRE_REDIS=1: %v", err)
		}
		t.Skipf("SKIP: redis-server not found in PATH (%v); install it (apt-get install redis-server) or set REQUIRE_REDIS=1 to make this a failure", err)
	}
	return path
}

// freePort returns a loopback TCP port that was free a moment ago.
func freePort(t testing.TB) int {
	t.Helper()
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatalf("find a free port: %v", err)
	}
	defer l.Close()
	return l.Addr().(*net.TCPAddr).Port
}

// startRedis starts redis-server without persistence on port (0 picks a
// free one) and waits until it answers PING.
func startRedis(t testing.TB, port int) *redisProc {
	t.Helper()
	requireRedisServer(t)
	if port == 0 {
		port = freePort(t)
	}
	r := &redisProc{t: t, port: port, Addr: net.JoinHostPort("127.0.0.1", strconv.Itoa(port)), dir: t.TempDir()}
	r.start()
	t.Cleanup(func() {
		if r.running() {
			_ = r.cmd.Process.Signal(syscall.SIGKILL)
			<-r.done
		}
		if t.Failed() {
			t.Logf("redis-server output (last lines):\n%s", r.out.Tail(15))
		}
	})
	return r
}

// start (re)starts the server on the same port and waits for PING.
func (r *redisProc) start() {
	r.t.Helper()
	r.out = newLineLog(500, nil)
	r.cmd = exec.Command("redis-server",
		"--port", strconv.Itoa(r.port), "--bind", "127.0.0.1",
		"--save", "", "--appendonly", "no",
		"--protected-mode", "no", "--daemonize", "no",
		"--dir", r.dir, "--logfile", "")
	r.cmd.Stdout = r.out
	r.cmd.Stderr = r.out
	r.cmd.WaitDelay = 3 * time.Second
	if err := r.cmd.Start(); err != nil {
		r.t.Fatalf("start redis-server: %v", err)
	}
	done := make(chan struct{})
	r.done = done
	cmd := r.cmd
	go func() { _ = cmd.Wait(); close(done) }()
	var last error
	ok := pollUntil(10*time.Second, 20*time.Millisecond, func() bool {
		if !r.running() {
			return false
		}
		var reply string
		reply, last = redisCommand(r.Addr, "PING")
		return last == nil && reply == "+PONG"
	})
	if !ok {
		r.t.Fatalf("redis-server on %s did not answer PING within 10s (last: %v)\n%s", r.Addr, last, r.out.Tail(20))
	}
}

func (r *redisProc) running() bool {
	select {
	case <-r.done:
		return false
	default:
		return true
	}
}

// Kill SIGKILLs the server and waits for it to be gone.
func (r *redisProc) Kill() {
	r.t.Helper()
	_ = r.cmd.Process.Signal(syscall.SIGKILL)
	select {
	case <-r.done:
	case <-time.After(10 * time.Second):
		r.t.Fatalf("redis-server still running 10s after SIGKILL")
	}
}

// Pause sends SIGSTOP: connections stay open but nothing is answered.
func (r *redisProc) Pause() {
	r.t.Helper()
	if err := r.cmd.Process.Signal(syscall.SIGSTOP); err != nil {
		r.t.Fatalf("SIGSTOP redis-server: %v", err)
	}
}

// Resume sends SIGCONT.
func (r *redisProc) Resume() {
	r.t.Helper()
	if err := r.cmd.Process.Signal(syscall.SIGCONT); err != nil {
		r.t.Fatalf("SIGCONT redis-server: %v", err)
	}
}

// redisCommand sends one command in RESP and returns the first reply line
// ("+PONG", ":42", "$-1", ...).
func redisCommand(addr string, args ...string) (string, error) {
	conn, err := net.DialTimeout("tcp", addr, time.Second)
	if err != nil {
		return "", err
	}
	defer conn.Close()
	_ = conn.SetDeadline(time.Now().Add(2 * time.Second))
	var b strings.Builder
	fmt.Fprintf(&b, "*%d\r\n", len(args))
	for _, a := range args {
		fmt.Fprintf(&b, "$%d\r\n%s\r\n", len(a), a)
	}
	if _, err := conn.Write([]byte(b.String())); err != nil {
		return "", err
	}
	line, err := bufio.NewReader(conn).ReadString('\n')
	if err != nil {
		return "", err
	}
	return strings.TrimRight(line, "\r\n"), nil
}

// redisDBSize returns DBSIZE of database 0.
func redisDBSize(addr string) (int64, error) {
	reply, err := redisCommand(addr, "DBSIZE")
	if err != nil {
		return 0, err
	}
	if !strings.HasPrefix(reply, ":") {
		return 0, fmt.Errorf("DBSIZE reply %q", reply)
	}
	return strconv.ParseInt(reply[1:], 10, 64)
}

// redisLoad is the read-mostly load of TestRedisFaultsUnderLoad.
type redisLoad struct {
	c   *client
	ids []int64
	// acked[i] is the highest version acknowledged by a PATCH of ids[i];
	// a GET that starts after the ack must return at least that version.
	acked []atomic.Int64

	phase      atomic.Int32
	phaseNames []string
	readLat    []*latencies // per phase
	writeLat   []*latencies

	mu        sync.Mutex
	reads     int
	writes    int
	failures  int
	stale     int
	failDescs []string
}

func (l *redisLoad) fail(format string, args ...any) {
	l.mu.Lock()
	defer l.mu.Unlock()
	l.failures++
	if len(l.failDescs) < 20 {
		l.failDescs = append(l.failDescs, fmt.Sprintf(format, args...))
	}
}

func (l *redisLoad) setPhase(name string) {
	for i, n := range l.phaseNames {
		if n == name {
			l.phase.Store(int32(i))
			return
		}
	}
	panic("unknown phase " + name)
}

func (l *redisLoad) read(rng *rand.Rand) {
	i := rng.IntN(len(l.ids))
	id := l.ids[i]
	minVersion := l.acked[i].Load()
	ph := l.phase.Load()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	start := time.Now()
	p, r, err := getProduct(ctx, l.c, id)
	l.readLat[ph].add(time.Since(start))
	l.mu.Lock()
	l.reads++
	l.mu.Unlock()
	switch {
	case err != nil:
		l.fail("[%s] GET /products/%d: %v", l.phaseNames[ph], id, err)
	case r.Status != http.StatusOK:
		l.fail("[%s] GET /products/%d: %s", l.phaseNames[ph], id, r)
	case p.Version < minVersion:
		l.mu.Lock()
		l.stale++
		l.mu.Unlock()
		l.fail("[%s] GET /products/%d returned version %d after version %d was acknowledged (stale cache)", l.phaseNames[ph], id, p.Version, minVersion)
	}
}

func (l *redisLoad) write(rng *rand.Rand) {
	// Writes touch the first 50 ids so that reads often meet them.
	i := rng.IntN(min(50, len(l.ids)))
	id := l.ids[i]
	ph := l.phase.Load()
	price := rng.Int64N(1_000_000)
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	start := time.Now()
	r, err := l.c.do(ctx, http.MethodPatch, "/products/"+strconv.FormatInt(id, 10),
		[]byte(fmt.Sprintf(`{"price_cents":%d}`, price)), http.Header{"Content-Type": {"application/merge-patch+json"}})
	l.writeLat[ph].add(time.Since(start))
	l.mu.Lock()
	l.writes++
	l.mu.Unlock()
	if err != nil {
		l.fail("[%s] PATCH /products/%d: %v", l.phaseNames[ph], id, err)
		return
	}
	if r.Status != http.StatusOK {
		l.fail("[%s] PATCH /products/%d: %s", l.phaseNames[ph], id, r)
		return
	}
	var p product
	if err := json.Unmarshal(r.Body, &p); err != nil || p.PriceCents != price {
		l.fail("[%s] PATCH /products/%d: body %q does not show price %d", l.phaseNames[ph], id, r.Body, price)
		return
	}
	// Only one writer: versions of an id arrive in order.
	if p.Version > l.acked[i].Load() {
		l.acked[i].Store(p.Version)
	}
}

// cacheHits scrapes cache_requests_total{result="hit"}.
func cacheHits(t testing.TB, c *client) float64 {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	text, err := scrapeMetrics(ctx, c)
	if err != nil {
		t.Fatalf("scrape /metrics: %v", err)
	}
	v, ok := metricSum(text, "cache_requests_total", map[string]string{"result": "hit"})
	if !ok {
		t.Fatalf(`/metrics has no cache_requests_total{result="hit"} sample`)
	}
	return v
}

func TestRedisFaultsUnderLoad(t *testing.T) {
	const (
		redisTimeout = 100 * time.Millisecond
		p99Budget    = redisTimeout + 250*time.Millisecond
		nProducts    = 200
		readers      = 4
		readEvery    = 20 * time.Millisecond  // per reader: 200 reads/s in all
		writeEvery   = 100 * time.Millisecond // 10 writes/s
	)
	rds := startRedis(t, 0)
	store := storeEnv(t)
	env := withStore(store, map[string]string{
		"REDIS_URL":     "redis://" + rds.Addr + "/0",
		"REDIS_TIMEOUT": redisTimeout.String(),
		// The service also keeps an in-process cache in front of Redis
		// (LOCAL_CACHE_SIZE, beyond the contract); it would answer every
		// hot read and keep Redis off the read path. Turn it off so that
		// each read goes through Redis and the faults are felt.
		"LOCAL_CACHE_SIZE": "0",
	})
	svc, c := startReadyService(t, env)

	var ids []int64
	for i := 0; i < nProducts; i++ {
		ids = append(ids, mustCreate(t, c, fmt.Sprintf("rf-%03d", i), "redis item", int64(1000+i), nil).ID)
	}

	// Warm the cache and make sure it is used at all.
	hits0 := cacheHits(t, c)
	for pass := 0; pass < 2; pass++ {
		for _, id := range ids {
			ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
			_, r, err := getProduct(ctx, c, id)
			cancel()
			if err != nil || r.Status != http.StatusOK {
				t.Fatalf("warm-up GET /products/%d: %v %v", id, r, err)
			}
		}
	}
	if h := cacheHits(t, c); h <= hits0 {
		t.Fatalf("cache_requests_total{result=\"hit\"} did not increase over two passes of GETs (%v -> %v): the cache is not used", hits0, h)
	}

	phases := []string{"baseline", "redis-killed", "after-restart", "redis-stopped", "after-resume"}
	load := &redisLoad{c: newClient(svc.BaseURL, testToken), ids: ids, acked: make([]atomic.Int64, len(ids)), phaseNames: phases}
	defer load.c.Close()
	for range phases {
		load.readLat = append(load.readLat, &latencies{})
		load.writeLat = append(load.writeLat, &latencies{})
	}
	for i := range ids {
		load.acked[i].Store(1)
	}

	stop := make(chan struct{})
	var wg sync.WaitGroup
	// Bounded: each loop stops after 2 minutes' worth of ticks or at stop.
	for g := 0; g < readers; g++ {
		wg.Add(1)
		go func(g int) {
			defer wg.Done()
			rng := rand.New(rand.NewPCG(uint64(g), 11))
			tick := time.NewTicker(readEvery)
			defer tick.Stop()
			for i := 0; i < int(2*time.Minute/readEvery); i++ {
				select {
				case <-stop:
					return
				case <-tick.C:
				}
				load.read(rng)
			}
		}(g)
	}
	wg.Add(1)
	go func() {
		defer wg.Done()
		rng := rand.New(rand.NewPCG(99, 11))
		tick := time.NewTicker(writeEvery)
		defer tick.Stop()
		for i := 0; i < int(2*time.Minute/writeEvery); i++ {
			select {
			case <-stop:
				return
			case <-tick.C:
			}
			load.write(rng)
		}
	}()
	stopLoad := func() {
		select {
		case <-stop:
		default:
			close(stop)
		}
		wg.Wait()
	}
	defer stopLoad()

	// waitHitsResume polls until cache hits grow after a recovery.
	waitHitsResume := func(what string) {
		h0 := cacheHits(t, c)
		start := time.Now()
		var h float64
		if !pollUntil(15*time.Second, 100*time.Millisecond, func() bool {
			h = cacheHits(t, c)
			return h > h0
		}) {
			t.Errorf("%s: cache hits did not resume within 15s (cache_requests_total{result=\"hit\"} stuck at %v)", what, h0)
			return
		}
		t.Logf("%s: cache hits resumed after %v (%v -> %v)", what, time.Since(start).Round(time.Millisecond), h0, h)
	}
	// checkReady asserts /ready stays 200 and eventually shows the cache status.
	checkReady := func(what, wantCache string) {
		var rb readyBody
		var last string
		if !pollUntil(5*time.Second, 50*time.Millisecond, func() bool {
			var r *response
			var err error
			rb, r, err = getReady(c)
			if err != nil {
				last = err.Error()
				return false
			}
			last = r.String()
			if r.Status != http.StatusOK {
				return false
			}
			return rb.Checks.Cache.Status == wantCache
		}) {
			t.Errorf("%s: GET /ready did not show 200 with checks.cache.status=%q within 5s; last: %s", what, wantCache, last)
		}
	}

	// Phase: baseline.
	time.Sleep(2 * time.Second) // a fixed window of load, not a wait for a condition

	// (a) Redis killed for ~2s, then restarted empty on the same port.
	load.setPhase("redis-killed")
	rds.Kill()
	killedAt := time.Now()
	checkReady("redis killed", "down")
	if rest := 2*time.Second - time.Since(killedAt); rest > 0 {
		time.Sleep(rest)
	}
	rds.start()
	load.setPhase("after-restart")
	restartAt := time.Now()
	waitHitsResume("after redis restart")
	checkReady("after redis restart", "ok")
	if rest := 2*time.Second - time.Since(restartAt); rest > 0 {
		time.Sleep(rest)
	}

	// (b) Redis frozen (SIGSTOP) for ~3s: connects succeed, replies never come.
	load.setPhase("redis-stopped")
	rds.Pause()
	time.Sleep(3 * time.Second)
	rds.Resume()
	load.setPhase("after-resume")
	resumeAt := time.Now()
	waitHitsResume("after SIGCONT")
	if rest := 3*time.Second - time.Since(resumeAt); rest > 0 {
		time.Sleep(rest)
	}
	stopLoad()

	// Every id must now read back at exactly its last acknowledged version.
	finalStale := 0
	for i, id := range ids {
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		p, r, err := getProduct(ctx, c, id)
		cancel()
		if err != nil || r.Status != http.StatusOK {
			t.Errorf("final GET /products/%d: %v %v", id, r, err)
			continue
		}
		if want := load.acked[i].Load(); p.Version != want {
			finalStale++
			if finalStale <= 10 {
				t.Errorf("final GET /products/%d: version %d, want %d (last acknowledged)", id, p.Version, want)
			}
		}
	}

	load.mu.Lock()
	t.Logf("RESULT reads=%d writes=%d failed=%d stale-reads=%d final-stale=%d", load.reads, load.writes, load.failures, load.stale, finalStale)
	for _, d := range load.failDescs {
		t.Errorf("failed client request: %s", d)
	}
	load.mu.Unlock()
	for i, name := range phases {
		n, p50, p99, mx := load.readLat[i].summary()
		wn, wp50, wp99, wmx := load.writeLat[i].summary()
		t.Logf("phase %-14s reads n=%4d p50=%7v p99=%7v max=%7v | writes n=%3d p50=%7v p99=%7v max=%7v",
			name, n, p50.Round(100*time.Microsecond), p99.Round(100*time.Microsecond), mx.Round(100*time.Microsecond),
			wn, wp50.Round(100*time.Microsecond), wp99.Round(100*time.Microsecond), wmx.Round(100*time.Microsecond))
		if (name == "redis-killed" || name == "redis-stopped") && p99 >= p99Budget {
			t.Errorf("phase %s: read p99 %v >= REDIS_TIMEOUT+250ms = %v", name, p99, p99Budget)
		}
		if (name == "redis-killed" || name == "redis-stopped") && n < 100 {
			t.Errorf("phase %s: only %d reads measured; the load did not run during the fault", name, n)
		}
	}

	// Restart: the new process must not trust entries cached by the old one.
	{
		// Make sure every product is cached by the current process.
		for _, id := range ids {
			ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
			_, _, _ = getProduct(ctx, c, id)
			cancel()
		}
		if code := svc.Stop(40 * time.Second); code != 0 {
			t.Errorf("SIGTERM: exit status %d, want 0", code)
		}
		before, err := redisDBSize(rds.Addr)
		if err != nil {
			t.Fatalf("DBSIZE: %v", err)
		}
		if before == 0 {
			t.Fatalf("redis holds no keys after the cached reads; cannot test stale entries")
		}

		// Modify products through a process without a cache, so redis keeps
		// the old values.
		nc := startService(t, withStore(store, map[string]string{"REDIS_URL": ""}))
		ncc := nc.Client()
		waitReady(t, ncc, readyTimeout)
		want := map[int64]product{}
		for _, id := range ids[:50] {
			ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
			r, err := ncc.do(ctx, http.MethodPatch, "/products/"+strconv.FormatInt(id, 10),
				[]byte(`{"price_cents":424242,"name":"changed while cache was stale"}`),
				http.Header{"Content-Type": {"application/merge-patch+json"}})
			cancel()
			if err != nil || r.Status != http.StatusOK {
				t.Fatalf("PATCH /products/%d without cache: %v %v", id, r, err)
			}
			var p product
			if err := json.Unmarshal(r.Body, &p); err != nil {
				t.Fatalf("PATCH /products/%d: %v", id, err)
			}
			want[id] = p
		}
		if code := nc.Stop(40 * time.Second); code != 0 {
			t.Errorf("no-cache process: exit status %d, want 0", code)
		}
		after, _ := redisDBSize(rds.Addr)

		svc2 := startService(t, env)
		c2 := svc2.Client()
		waitReady(t, c2, readyTimeout)
		stale := 0
		for pass := 0; pass < 2; pass++ {
			for id, w := range want {
				ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
				p, r, err := getProduct(ctx, c2, id)
				cancel()
				if err != nil || r.Status != http.StatusOK {
					t.Errorf("GET /products/%d after restart: %v %v", id, r, err)
					continue
				}
				if p.Version != w.Version || p.PriceCents != w.PriceCents || p.Name != w.Name {
					stale++
					if stale <= 5 {
						t.Errorf("GET /products/%d after restart (pass %d): version %d price %d, want version %d price %d (a pre-restart cache entry was trusted)",
							id, pass, p.Version, p.PriceCents, w.Version, w.PriceCents)
					}
				}
			}
		}
		t.Logf("RESULT restart: redis keys before=%d after no-cache writes=%d; %d modified products read twice, stale=%d", before, after, len(want), stale)
		svc2.Stop(40 * time.Second)
	}
}
