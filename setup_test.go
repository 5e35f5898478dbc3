package main

// Shared test setup: real SQLite files in t.TempDir(), a real redis-server
// on a free loopback port, an httptest server over the real handler, and a
// few small helpers to send requests and read their answers.

import (
	"bufio"
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/http"
	"net/http/httptest"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	dto "github.com/prometheus/client_model/go"

	"productsvc/internal/pgtest"
	"productsvc/internal/rabbittest"
)

// testToken is the bearer token test servers accept unless told otherwise.
const testToken = "test-token"

// newTestStore opens a migrated SQLite store in a file under tb.TempDir()
// and closes it when the test ends. Sync is "normal": these tests are not
// about surviving power loss, and an fsync per group slows them down.
func newTestStore(tb testing.TB) *sqliteStore {
	tb.Helper()
	return openTestStore(tb, filepath.Join(tb.TempDir(), "products.db"))
}

// openTestStore opens the store at path and closes it when the test ends.
func openTestStore(tb testing.TB, path string) *sqliteStore {
	tb.Helper()
	s, err := openSQLite(context.Background(), StoreConfig{Path: path, Sync: "normal", Timeout: 5 * time.Second})
	if err != nil {
		tb.Fatalf("openSQLite(%q) error = %v, want nil", path, err)
	}
	tb.Cleanup(func() {
		if err := s.Close(); err != nil {
			tb.Errorf("Store.Close() error = %v, want nil", err)
		}
	})
	return s
}

// newTestService returns a service over store (a new test store when nil)
// configured by cfg. With a zero cfg there is no Redis and the in-process
// cache is off (LocalCacheSize 0), so reads reach the store.
func newTestService(tb testing.TB, store productStore, cfg ServiceConfig) *ProductService {
	tb.Helper()
	if store == nil {
		store = newTestStore(tb)
	}
	if cfg.Metrics == nil {
		cfg.Metrics = newMetrics(nil)
	}
	svc := NewProductService(store, cfg)
	// As run does: the follower runs until the test ends (a store other
	// processes share only; see follower).
	stop := runFollower(svc)
	tb.Cleanup(func() {
		stop()
		svc.Close()
	})
	return svc
}

// testServer is an httptest server over newServer, as run wires it.
type testServer struct {
	*httptest.Server
	handler http.Handler // what the server serves, for httptest.NewRecorder
	svc     *ProductService
	life    *lifecycle
	logs    *syncBuffer // the server's JSON log lines
	client  *http.Client
}

// newTestServer serves the real handler for svc (a new service over a new
// test store when nil). tokens are the accepted bearer tokens; none means
// testToken.
func newTestServer(tb testing.TB, svc *ProductService, tokens ...string) *testServer {
	tb.Helper()
	if svc == nil {
		svc = newTestService(tb, nil, ServiceConfig{})
	}
	if len(tokens) == 0 {
		tokens = []string{testToken}
	}
	logs := &syncBuffer{}
	life := &lifecycle{}
	life.started.Store(true)
	h := newServer(serverDeps{
		svc:          svc,
		log:          slog.New(slog.NewJSONHandler(logs, &slog.HandlerOptions{Level: slog.LevelDebug})),
		metrics:      svc.metrics,
		tokens:       newTokenSet(tokens),
		life:         life,
		serveMetrics: true,
	})
	srv := httptest.NewServer(h)
	tb.Cleanup(srv.Close)
	client := srv.Client()
	// An API answers; it must never redirect. Show redirects to the test.
	client.CheckRedirect = func(*http.Request, []*http.Request) error { return http.ErrUseLastResponse }
	return &testServer{Server: srv, handler: h, svc: svc, life: life, logs: logs, client: client}
}

// response is a finished HTTP exchange.
type response struct {
	status int
	header http.Header
	body   []byte
}

func (r response) String() string {
	return fmt.Sprintf("%d %s", r.status, bytes.TrimSpace(r.body))
}

// do sends a request with body (none if nil) and headers given as
// name/value pairs; an empty value deletes a header set by a caller. It
// fails the test if the exchange fails; use try from other goroutines.
func (ts *testServer) do(tb testing.TB, method, target string, body io.Reader, kv ...string) response {
	tb.Helper()
	r, err := ts.try(method, target, body, kv...)
	if err != nil {
		tb.Fatal(err)
	}
	return r
}

// try is do for goroutines other than the test's: it returns the error.
func (ts *testServer) try(method, target string, body io.Reader, kv ...string) (response, error) {
	req, err := http.NewRequestWithContext(context.Background(), method, ts.URL+target, body)
	if err != nil {
		return response{}, fmt.Errorf("NewRequest(%s %s): %w", method, target, err)
	}
	if len(kv)%2 != 0 {
		return response{}, fmt.Errorf("%s %s: odd number of header arguments %q", method, target, kv)
	}
	for i := 0; i < len(kv); i += 2 {
		if kv[i+1] == "" {
			req.Header.Del(kv[i])
		} else {
			req.Header.Set(kv[i], kv[i+1])
		}
	}
	resp, err := ts.client.Do(req)
	if err != nil {
		return response{}, fmt.Errorf("%s %s: %w", method, target, err)
	}
	defer resp.Body.Close()
	b, err := io.ReadAll(resp.Body)
	if err != nil {
		return response{}, fmt.Errorf("%s %s: reading body: %w", method, target, err)
	}
	return response{status: resp.StatusCode, header: resp.Header, body: b}, nil
}

// writeHeaders are the headers of an authorised JSON write, followed by kv.
func writeHeaders(kv ...string) []string {
	return append([]string{"Authorization", "Bearer " + testToken, "Content-Type", "application/json"}, kv...)
}

// get sends a GET with headers given as name/value pairs.
func (ts *testServer) get(tb testing.TB, target string, kv ...string) response {
	tb.Helper()
	return ts.do(tb, http.MethodGet, target, nil, kv...)
}

// write sends an authorised JSON write. kv adds or overrides headers (an
// empty value removes one, e.g. "Authorization", "").
func (ts *testServer) write(tb testing.TB, method, target, body string, kv ...string) response {
	tb.Helper()
	var r io.Reader
	if body != "" {
		r = strings.NewReader(body)
	}
	return ts.do(tb, method, target, r, writeHeaders(kv...)...)
}

// createProduct creates a product through the API and returns it. fields
// are extra or replacing JSON members, e.g. `"stock":5`; the default name is
// "product <sku>".
func (ts *testServer) createProduct(tb testing.TB, sku string, price int64, fields ...string) Product {
	tb.Helper()
	m := map[string]json.RawMessage{}
	base := fmt.Sprintf(`{"sku":%q,"name":"product %s","price_cents":%d}`, sku, sku, price)
	for _, obj := range append([]string{base}, fields...) {
		if !strings.HasPrefix(obj, "{") {
			obj = "{" + obj + "}"
		}
		if err := json.Unmarshal([]byte(obj), &m); err != nil {
			tb.Fatalf("createProduct: bad field %s: %v", obj, err)
		}
	}
	body, _ := json.Marshal(m)
	r := ts.write(tb, http.MethodPost, "/products", string(body))
	if r.status != http.StatusCreated {
		tb.Fatalf("POST /products %s = %v, want 201", body, r)
	}
	return decodeProduct(tb, r.body)
}

// getProduct reads a product through the API; it fails the test unless the
// answer is 200.
func (ts *testServer) getProduct(tb testing.TB, id int64) Product {
	tb.Helper()
	r := ts.get(tb, "/products/"+strconv.FormatInt(id, 10))
	if r.status != http.StatusOK {
		tb.Fatalf("GET /products/%d = %v, want 200", id, r)
	}
	return decodeProduct(tb, r.body)
}

// decodeProduct parses a product document strictly.
func decodeProduct(tb testing.TB, b []byte) Product {
	tb.Helper()
	var p struct {
		Product
		Available int64 `json:"available"` // derived: checked, then dropped
	}
	dec := json.NewDecoder(bytes.NewReader(b))
	dec.DisallowUnknownFields()
	if err := dec.Decode(&p); err != nil {
		tb.Fatalf("decoding product %s: %v", b, err)
	}
	if p.Available != p.Stock-p.Reserved {
		tb.Fatalf("product %s: available %d, want stock - reserved = %d", b, p.Available, p.Stock-p.Reserved)
	}
	return p.Product
}

// problemDoc is an RFC 9457 problem document as the service writes it.
type problemDoc struct {
	Type      string            `json:"type"`
	Title     string            `json:"title"`
	Status    int               `json:"status"`
	Detail    string            `json:"detail"`
	Instance  string            `json:"instance"`
	RequestID string            `json:"request_id"`
	Errors    map[string]string `json:"errors"`
}

// checkProblem checks that r is a problem+json answer with status, type
// /problems/<slug>, every member RFC 9457 and the contract require, and an
// "errors" map naming exactly fields (when fields is not nil). It returns
// the parsed document.
func checkProblem(tb testing.TB, r response, status int, slug string, fields []string) problemDoc {
	tb.Helper()
	if r.status != status {
		tb.Fatalf("status = %v, want %d", r, status)
	}
	if ct := r.header.Get("Content-Type"); ct != contentTypeProblem {
		tb.Errorf("Content-Type = %q, want %q", ct, contentTypeProblem)
	}
	var members map[string]json.RawMessage
	if err := json.Unmarshal(r.body, &members); err != nil {
		tb.Fatalf("problem body %s is not a JSON object: %v", r.body, err)
	}
	for _, m := range []string{"type", "title", "status", "detail", "instance", "request_id"} {
		if _, ok := members[m]; !ok {
			tb.Errorf("problem %s has no %q member", r.body, m)
		}
	}
	var p problemDoc
	if err := json.Unmarshal(r.body, &p); err != nil {
		tb.Fatalf("decoding problem %s: %v", r.body, err)
	}
	if want := "/problems/" + slug; p.Type != want {
		tb.Errorf("problem type = %q, want %q (body %s)", p.Type, want, r.body)
	}
	if p.Status != status {
		tb.Errorf("problem status = %d, want %d", p.Status, status)
	}
	if want := http.StatusText(status); p.Title != want {
		tb.Errorf("problem title = %q, want %q", p.Title, want)
	}
	if got := r.header.Get("X-Content-Type-Options"); got != "nosniff" {
		tb.Errorf("X-Content-Type-Options = %q, want nosniff", got)
	}
	if p.Detail == "" {
		tb.Errorf("problem detail is empty (body %s)", r.body)
	}
	if id := r.header.Get("X-Request-ID"); p.RequestID != id || id == "" {
		tb.Errorf("problem request_id = %q, want the X-Request-ID header %q", p.RequestID, id)
	}
	if fields != nil {
		got := make([]string, 0, len(p.Errors))
		for k := range p.Errors {
			got = append(got, k)
		}
		slices.Sort(got)
		want := slices.Sorted(slices.Values(fields))
		if !slices.Equal(got, want) {
			tb.Errorf("problem errors names %q, want %q (body %s)", got, want, r.body)
		}
	}
	return p
}

// syncBuffer is a bytes.Buffer safe for concurrent writers and readers:
// loggers write to it from server goroutines while the test reads it.
type syncBuffer struct {
	mu  sync.Mutex
	buf bytes.Buffer
}

func (b *syncBuffer) Write(p []byte) (int, error) {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.buf.Write(p)
}

func (b *syncBuffer) String() string {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.buf.String()
}

// logLines parses each JSON log line written so far; lines that are not
// JSON are skipped.
func (b *syncBuffer) logLines() []map[string]any {
	var lines []map[string]any
	sc := bufio.NewScanner(strings.NewReader(b.String()))
	sc.Buffer(make([]byte, 0, 64<<10), 1<<20)
	for sc.Scan() {
		var m map[string]any
		if json.Unmarshal(sc.Bytes(), &m) == nil {
			lines = append(lines, m)
		}
	}
	return lines
}

// waitFor polls cond until it returns true, failing the test if timeout
// passes first. timeout only proves that something did not hang.
func waitFor(tb testing.TB, timeout time.Duration, what string, cond func() bool) {
	tb.Helper()
	deadline := time.Now().Add(timeout)
	tick := time.NewTicker(5 * time.Millisecond)
	defer tick.Stop()
	for !cond() {
		if time.Now().After(deadline) {
			tb.Fatalf("gave up after %v waiting for %s", timeout, what)
		}
		<-tick.C
	}
}

// counterValue reads a Prometheus counter.
func counterValue(tb testing.TB, c prometheus.Counter) float64 {
	tb.Helper()
	var m dto.Metric
	if err := c.Write(&m); err != nil {
		tb.Fatalf("reading counter: %v", err)
	}
	return m.GetCounter().GetValue()
}

// failingStore is a store whose operations can be made to fail with a
// given error. Each operation counts the calls that reached it.
type failingStore struct {
	productStore

	mu       sync.Mutex
	readErr  error // returned by Get and List when set
	writeErr error // returned by Create, Update, AdjustStock, Delete when set

	reads  atomic.Int64
	writes atomic.Int64
}

func (f *failingStore) failReads(err error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.readErr = err
}

func (f *failingStore) failWrites(err error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.writeErr = err
}

func (f *failingStore) errs() (read, write error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	return f.readErr, f.writeErr
}

func (f *failingStore) Get(ctx context.Context, id int64) (Product, error) {
	f.reads.Add(1)
	if err, _ := f.errs(); err != nil {
		return Product{}, fmt.Errorf("get product %d: %w", id, err)
	}
	return f.productStore.Get(ctx, id)
}

func (f *failingStore) List(ctx context.Context, lf ListFilter) (Page, error) {
	f.reads.Add(1)
	if err, _ := f.errs(); err != nil {
		return Page{}, fmt.Errorf("list products: %w", err)
	}
	return f.productStore.List(ctx, lf)
}

func (f *failingStore) Create(ctx context.Context, actor string, p Product, idem *IdempotencyKey) (Product, bool, error) {
	f.writes.Add(1)
	if _, err := f.errs(); err != nil {
		return Product{}, false, fmt.Errorf("create product: %w", err)
	}
	return f.productStore.Create(ctx, actor, p, idem)
}

func (f *failingStore) Update(ctx context.Context, actor string, id int64, u ProductUpdate) (Product, bool, error) {
	f.writes.Add(1)
	if _, err := f.errs(); err != nil {
		return Product{}, false, fmt.Errorf("update product %d: %w", id, err)
	}
	return f.productStore.Update(ctx, actor, id, u)
}

func (f *failingStore) AdjustStock(ctx context.Context, actor string, id, delta int64, cond *IfMatch, idem *IdempotencyKey) (Product, bool, error) {
	f.writes.Add(1)
	if _, err := f.errs(); err != nil {
		return Product{}, false, fmt.Errorf("adjust stock of product %d: %w", id, err)
	}
	return f.productStore.AdjustStock(ctx, actor, id, delta, cond, idem)
}

// ProbeWrite fails like the writes: the write breaker's background probe
// must not close the breaker while writes still fail. Ping is not
// overridden: readiness then shows what the breakers alone decide.
func (f *failingStore) ProbeWrite(ctx context.Context) error {
	if _, err := f.errs(); err != nil {
		return fmt.Errorf("probe write: %w", err)
	}
	return f.productStore.ProbeWrite(ctx)
}

func (f *failingStore) Delete(ctx context.Context, actor string, id int64, check *IfMatch) (Product, error) {
	f.writes.Add(1)
	if _, err := f.errs(); err != nil {
		return Product{}, fmt.Errorf("delete product %d: %w", id, err)
	}
	return f.productStore.Delete(ctx, actor, id, check)
}

// redisServer is a redis-server child process on a fixed loopback port,
// with no persistence. Kill and Restart keep the port, so clients
// configured with Addr reconnect to the new process.
type redisServer struct {
	tb   testing.TB
	bin  string
	dir  string
	Addr string
	URL  string
	log  *syncBuffer

	mu   sync.Mutex
	cmd  *exec.Cmd
	done chan struct{} // closed when cmd has exited
}

// startRedis starts a redis-server on a free 127.0.0.1 port and kills it
// when the test ends. It skips the test when redis-server is not installed,
// unless REQUIRE_REDIS=1.
func startRedis(tb testing.TB) *redisServer {
	tb.Helper()
	bin, err := exec.LookPath("redis-server")
	if err != nil {
		if os.Getenv("REQUIRE_REDIS") == "1" {
			tb.Fatalf("redis-server is not installed (%v) and REQUIRE_REDIS=1", err)
		}
		tb.Skipf("skipping: redis-server is not installed (%v); install it, or set REQUIRE_REDIS=1 to make this a failure", err)
	}
	r := &redisServer{tb: tb, bin: bin, dir: tb.TempDir(), log: &syncBuffer{}}
	tb.Cleanup(r.Kill)
	// Another process may take the free port between our probe and Redis's
	// bind; try a few ports before giving up.
	for attempt := 0; ; attempt++ {
		port, err := freePort()
		if err != nil {
			tb.Fatalf("finding a free port: %v", err)
		}
		r.Addr = net.JoinHostPort("127.0.0.1", strconv.Itoa(port))
		r.URL = "redis://" + r.Addr + "/0"
		err = r.start()
		if err == nil {
			return r
		}
		if attempt == 4 {
			tb.Fatalf("starting redis-server: %v\n%s", err, r.log)
		}
	}
}

func freePort() (int, error) {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return 0, err
	}
	defer ln.Close()
	return ln.Addr().(*net.TCPAddr).Port, nil
}

// start runs redis-server on r.Addr and waits until it answers PING.
func (r *redisServer) start() error {
	_, port, _ := net.SplitHostPort(r.Addr)
	cmd := exec.Command(r.bin,
		"--port", port, "--bind", "127.0.0.1",
		"--save", "", "--appendonly", "no",
		"--dir", r.dir, "--daemonize", "no", "--loglevel", "warning")
	cmd.Stdout = r.log
	cmd.Stderr = r.log
	if err := cmd.Start(); err != nil {
		return err
	}
	done := make(chan struct{})
	go func() {
		cmd.Wait()
		close(done)
	}()
	r.mu.Lock()
	r.cmd, r.done = cmd, done
	r.mu.Unlock()

	// Poll until it answers PING or exits (its port was taken, say).
	timeout := time.After(10 * time.Second)
	tick := time.NewTicker(5 * time.Millisecond)
	defer tick.Stop()
	for {
		if redisPing(r.Addr) == nil {
			return nil
		}
		select {
		case <-done:
			return fmt.Errorf("redis-server on %s exited at start", r.Addr)
		case <-timeout:
			r.Kill()
			return fmt.Errorf("redis-server on %s did not answer PING within 10s", r.Addr)
		case <-tick.C:
		}
	}
}

// redisPing sends PING over a fresh connection.
func redisPing(addr string) error {
	c, err := net.DialTimeout("tcp", addr, time.Second)
	if err != nil {
		return err
	}
	defer c.Close()
	c.SetDeadline(time.Now().Add(time.Second))
	if _, err := io.WriteString(c, "PING\r\n"); err != nil {
		return err
	}
	line, err := bufio.NewReader(c).ReadString('\n')
	if err != nil {
		return err
	}
	if line != "+PONG\r\n" {
		return fmt.Errorf("PING answered %q", line)
	}
	return nil
}

func (r *redisServer) signal(sig syscall.Signal) {
	r.mu.Lock()
	cmd := r.cmd
	r.mu.Unlock()
	if cmd == nil {
		return
	}
	if err := cmd.Process.Signal(sig); err != nil && !errors.Is(err, os.ErrProcessDone) {
		r.tb.Errorf("signal %v to redis-server: %v", sig, err)
	}
}

// Kill kills redis-server with SIGKILL and waits for it to exit. Killing
// a killed server does nothing.
func (r *redisServer) Kill() {
	r.mu.Lock()
	cmd, done := r.cmd, r.done
	r.cmd = nil
	r.mu.Unlock()
	if cmd == nil {
		return
	}
	cmd.Process.Signal(syscall.SIGKILL)
	<-done
}

// Restart starts a new, empty redis-server on the same port.
func (r *redisServer) Restart() {
	r.tb.Helper()
	r.Kill()
	// The port was ours a moment ago; retry for a while in case the kernel
	// has not released it yet.
	waitFor(r.tb, 10*time.Second, "redis-server to restart on "+r.Addr, func() bool {
		return r.start() == nil
	})
}

// Pause stops redis-server with SIGSTOP: connections stay open and nothing
// answers, like a hung server. It returns once the kernel reports the
// process stopped (the signal takes effect asynchronously).
func (r *redisServer) Pause() {
	r.tb.Helper()
	r.signal(syscall.SIGSTOP)
	r.mu.Lock()
	cmd := r.cmd
	r.mu.Unlock()
	if cmd == nil {
		return
	}
	stat := fmt.Sprintf("/proc/%d/stat", cmd.Process.Pid)
	if _, err := os.Stat(stat); err != nil {
		return // no procfs: nothing to poll
	}
	waitFor(r.tb, 10*time.Second, "redis-server to stop", func() bool {
		b, err := os.ReadFile(stat)
		if err != nil {
			return false
		}
		// "pid (comm) state ...": the state follows the last ')'.
		i := bytes.LastIndexByte(b, ')')
		return i >= 0 && i+2 < len(b) && (b[i+2] == 'T' || b[i+2] == 't')
	})
}

// Resume continues a paused redis-server with SIGCONT.
func (r *redisServer) Resume() { r.signal(syscall.SIGCONT) }

// newTestRedisCache returns a cache client for r with per-call timeout.
func newTestRedisCache(tb testing.TB, r *redisServer, timeout time.Duration) *redisCache {
	tb.Helper()
	c, err := newRedisCache(r.URL, timeout, 5*time.Minute)
	if err != nil {
		tb.Fatalf("newRedisCache(%q) error = %v", r.URL, err)
	}
	return c
}

// TestMain stops the shared PostgreSQL server, if a test started one. With
// PRODUCTSVC_AS_MAIN=1 the test binary is the service instead (main, its
// stdout and stderr), so a test can run the real process without building
// the binary (TestMain_redisDownLogsOnlyJSON).
func TestMain(m *testing.M) {
	if os.Getenv("PRODUCTSVC_AS_MAIN") == "1" {
		main()
		os.Exit(0)
	}
	code := m.Run()
	if pgServer != nil {
		pgServer.Stop()
	}
	if rabbit != nil {
		rabbit.Stop()
	}
	os.Exit(code)
}

var (
	pgOnce     sync.Once
	pgServer   *pgtest.Server
	pgStartErr error
)

// sharedPostgres returns the PostgreSQL server of this test binary,
// starting it on first use. Without PostgreSQL installed the test is
// skipped, or fails when REQUIRE_POSTGRES=1 (as in CI).
func sharedPostgres(tb testing.TB) *pgtest.Server {
	tb.Helper()
	pgOnce.Do(func() { pgServer, pgStartErr = pgtest.Start() })
	if pgStartErr != nil {
		if os.Getenv("REQUIRE_POSTGRES") == "1" {
			tb.Fatalf("REQUIRE_POSTGRES=1 but PostgreSQL could not start: %v", pgStartErr)
		}
		tb.Skipf("PostgreSQL not available: %v", pgStartErr)
	}
	return pgServer
}

// newTestDatabase creates an empty PostgreSQL database, dropped when the
// test ends, and returns its URL.
func newTestDatabase(tb testing.TB) string {
	tb.Helper()
	srv := sharedPostgres(tb)
	name, url, err := srv.CreateDatabase(context.Background())
	if err != nil {
		tb.Fatalf("create database: %v", err)
	}
	tb.Cleanup(func() {
		if err := srv.DropDatabase(context.Background(), name); err != nil {
			tb.Errorf("drop database %s: %v", name, err)
		}
	})
	return url
}

// openTestPostgres opens a store on the database at url, closed when the
// test ends.
func openTestPostgres(tb testing.TB, url string) *postgresStore {
	tb.Helper()
	s, err := openPostgres(context.Background(), StoreConfig{DatabaseURL: url, Timeout: 5 * time.Second})
	if err != nil {
		tb.Fatalf("openPostgres error = %v, want nil", err)
	}
	tb.Cleanup(func() { s.Close() })
	return s
}

// newTestPostgres opens a PostgreSQL store on a new database.
func newTestPostgres(tb testing.TB) *postgresStore {
	tb.Helper()
	return openTestPostgres(tb, newTestDatabase(tb))
}

// storeOpener opens a store on the same test database each time it is
// called; the first call creates the database.
type storeOpener func(tb testing.TB) productStore

// forEachBackend runs test once per engine, each on a database of its own:
// one behaviour, two stores.
func forEachBackend(t *testing.T, test func(t *testing.T, open storeOpener)) {
	t.Run("sqlite", func(t *testing.T) {
		path := filepath.Join(t.TempDir(), "products.db")
		test(t, func(tb testing.TB) productStore { return openTestStore(tb, path) })
	})
	t.Run("postgres", func(t *testing.T) {
		var url string
		test(t, func(tb testing.TB) productStore {
			if url == "" {
				url = newTestDatabase(t)
			}
			return openTestPostgres(tb, url)
		})
	})
}

// forEachStore runs test against a new store of each engine.
func forEachStore(t *testing.T, test func(t *testing.T, s productStore)) {
	forEachBackend(t, func(t *testing.T, open storeOpener) { test(t, open(t)) })
}

// setStoreClock makes s read the time from now.
func setStoreClock(s productStore, now func() time.Time) {
	switch s := s.(type) {
	case *sqliteStore:
		s.now = now
	case *postgresStore:
		s.now = now
	}
}

// storeReserve and storeTransition call a store's Reserve and Transition
// and return the reservation and the products changed apart.
func storeReserve(s productStore, ctx context.Context, r Reservation, ttl time.Duration, key *IdempotencyKey) (Reservation, []Product, error) {
	out, err := s.Reserve(ctx, r, ttl, 0, key)
	return out.Reservation, out.Changed, err
}

func storeTransition(s productStore, ctx context.Context, id, to string) (Reservation, []Product, error) {
	out, err := s.Transition(ctx, "", id, to)
	return out.Reservation, out.Changed, err
}

var (
	rabbitOnce     sync.Once
	rabbit         *rabbittest.Server
	rabbitStartErr error
)

// sharedRabbit returns the RabbitMQ server of this test binary, starting
// it (about 10 s) on first use. Without rabbitmq-server the test is
// skipped, or fails when REQUIRE_RABBITMQ=1 (as in CI).
func sharedRabbit(tb testing.TB) *rabbittest.Server {
	tb.Helper()
	rabbitOnce.Do(func() { rabbit, rabbitStartErr = rabbittest.Start() })
	if rabbitStartErr != nil {
		if os.Getenv("REQUIRE_RABBITMQ") == "1" {
			tb.Fatalf("REQUIRE_RABBITMQ=1 but RabbitMQ could not start: %v", rabbitStartErr)
		}
		tb.Skipf("RabbitMQ not available: %v", rabbitStartErr)
	}
	return rabbit
}
