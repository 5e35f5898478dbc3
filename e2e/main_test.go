// Package e2e is the black-box fault suite for productsvc: every scenario
// builds nothing itself, starts the binary TestMain built as a child process
// on a loopback port with a temporary database, and drives it over HTTP.
//
// Run with: go test -count=1 -v -timeout 20m ./e2e/
//
// Knobs (environment):
//
//	E2E_CRASH_CYCLES    number of kill -9 cycles in TestCrashDurability (default 20)
//	E2E_SOAK_DURATION   length of TestSoak's steady load (default 60s)
//	E2E_SAGA_ORDERS     orders TestSagaSimulation plays (default 600)
//	E2E_SAGA_KILLS      kill -9 restarts during the saga load (default 2)
//	E2E_SAGA_DURATION   time the saga load may take at most (default 30s)
//	REQUIRE_REDIS=1     fail instead of skip when redis-server is absent
//	E2E_BACKEND         sqlite (default) or postgres: the store every
//	                    scenario runs on; postgres starts a throwaway
//	                    PostgreSQL server and gives each test a database
//	REQUIRE_RABBITMQ=1  fail instead of skip when rabbitmq-server is absent
//	                    (TestRelayCrash, TestRelayTakeover; one server
//	                    for the whole binary, started on first use)
//	REQUIRE_POSTGRES=1  fail instead of skip when haproxy is absent (the
//	                    fleet suite, TestFleet*, runs only on postgres)
package e2e

import (
	"bufio"
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"maps"
	"math"
	"net"
	"net/http"
	"net/url"
	"os"
	"os/exec"
	"path/filepath"
	"sort"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/google/go-cmp/cmp"

	"productsvc/internal/pgtest"
)

const (
	testToken = "e2e-token"
	// startTimeout bounds how long a fresh process may take to log its
	// listening line.
	startTimeout = 30 * time.Second
	// readyTimeout bounds the wait for GET /ready to answer 200.
	readyTimeout = 30 * time.Second
)

// binPath is the productsvc binary built once by TestMain; pgServer is the
// PostgreSQL server the suite runs on with E2E_BACKEND=postgres. Both are
// set before any test runs and never change.
var (
	binPath  string
	pgServer *pgtest.Server
)

func TestMain(m *testing.M) {
	os.Exit(runTests(m))
}

// runTests builds the service, runs the tests and removes the build
// directory; it is split from TestMain so the deferred cleanup runs.
func runTests(m *testing.M) int {
	dir, err := os.MkdirTemp("", "productsvc-e2e-bin-")
	if err != nil {
		fmt.Fprintf(os.Stderr, "e2e: temp dir: %v\n", err)
		return 1
	}
	defer os.RemoveAll(dir)
	defer stopRabbit()
	binPath = filepath.Join(dir, "productsvc")

	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Minute)
	defer cancel()
	cmd := exec.CommandContext(ctx, "go", "build", "-o", binPath, ".")
	cmd.Dir = ".."
	cmd.Env = append(os.Environ(), "CGO_ENABLED=0")
	start := time.Now()
	if out, err := cmd.CombinedOutput(); err != nil {
		fmt.Fprintf(os.Stderr, "e2e: go build productsvc failed: %v\n%s\n", err, out)
		return 1
	}
	fmt.Printf("e2e: built %s in %v\n", binPath, time.Since(start).Round(time.Millisecond))
	switch b := os.Getenv("E2E_BACKEND"); b {
	case "", "sqlite":
	case "postgres":
		if pgServer, err = pgtest.Start(); err != nil {
			fmt.Fprintf(os.Stderr, "e2e: E2E_BACKEND=postgres: %v\n", err)
			return 1
		}
		defer pgServer.Stop()
		fmt.Printf("e2e: PostgreSQL on 127.0.0.1:%d\n", pgServer.Port())
	default:
		fmt.Fprintf(os.Stderr, "e2e: E2E_BACKEND=%q: want sqlite or postgres\n", b)
		return 1
	}
	return m.Run()
}

// onPostgres reports whether the suite runs on PostgreSQL.
func onPostgres() bool { return pgServer != nil }

// storeEnv returns the settings that give a test a database of its own,
// kept across the service restarts within the test: a DB_PATH in
// t.TempDir(), or on PostgreSQL a new database's DATABASE_URL.
func storeEnv(t testing.TB) map[string]string {
	t.Helper()
	if !onPostgres() {
		return map[string]string{"DB_PATH": filepath.Join(t.TempDir(), "products.db")}
	}
	name, url, err := pgServer.CreateDatabase(context.Background())
	if err != nil {
		t.Fatalf("create database: %v", err)
	}
	t.Cleanup(func() {
		if err := pgServer.DropDatabase(context.Background(), name); err != nil {
			t.Errorf("drop database %s: %v", name, err)
		}
	})
	return map[string]string{"DATABASE_URL": url, "DB_PATH": filepath.Join(t.TempDir(), "unused.db")}
}

// withStore returns env with the database settings of store added.
func withStore(store, env map[string]string) map[string]string {
	out := maps.Clone(store)
	maps.Copy(out, env)
	return out
}

// ---------------------------------------------------------------------------
// Child processes.

// lineLog collects a child's output line by line, keeping the last maxLines.
// When onLine is set it sees every complete line.
type lineLog struct {
	mu       sync.Mutex
	partial  []byte
	lines    []string
	dropped  int
	maxLines int
	onLine   func(string)
}

func newLineLog(maxLines int, onLine func(string)) *lineLog {
	return &lineLog{maxLines: maxLines, onLine: onLine}
}

func (l *lineLog) Write(p []byte) (int, error) {
	l.mu.Lock()
	defer l.mu.Unlock()
	l.partial = append(l.partial, p...)
	for {
		i := bytes.IndexByte(l.partial, '\n')
		if i < 0 {
			break
		}
		line := string(l.partial[:i])
		l.partial = l.partial[i+1:]
		l.lines = append(l.lines, line)
		if len(l.lines) > l.maxLines {
			n := len(l.lines) - l.maxLines
			l.dropped += n
			l.lines = append([]string(nil), l.lines[n:]...)
		}
		if l.onLine != nil {
			l.onLine(line)
		}
	}
	// A line longer than 1 MiB without a newline is kept as it is; it only
	// costs memory.
	return len(p), nil
}

// Lines returns a copy of the kept lines, plus the unterminated tail.
func (l *lineLog) Lines() []string {
	l.mu.Lock()
	defer l.mu.Unlock()
	out := append([]string(nil), l.lines...)
	if len(l.partial) > 0 {
		out = append(out, string(l.partial))
	}
	return out
}

// Tail returns the last n lines joined for a failure message.
func (l *lineLog) Tail(n int) string {
	lines := l.Lines()
	if len(lines) > n {
		lines = lines[len(lines)-n:]
	}
	return strings.Join(lines, "\n")
}

// service is a running productsvc child process.
type service struct {
	t       testing.TB
	cmd     *exec.Cmd
	Addr    string // host:port from the listening log line
	BaseURL string // http://host:port
	DBPath  string
	Stdout  *lineLog
	Stderr  *lineLog

	done    chan struct{} // closed when the process has exited
	state   *os.ProcessState
	waitErr error
}

// childEnv builds a small environment for a child: nothing from the test
// process leaks in (a REDIS_URL in the developer's shell must not change a
// scenario). An empty value in overrides removes the variable.
func childEnv(defaults, overrides map[string]string) []string {
	m := map[string]string{}
	for _, k := range []string{"PATH", "HOME", "TMPDIR", "LANG"} {
		if v, ok := os.LookupEnv(k); ok {
			m[k] = v
		}
	}
	for k, v := range defaults {
		m[k] = v
	}
	for k, v := range overrides {
		m[k] = v
	}
	env := make([]string, 0, len(m))
	for k, v := range m {
		if v == "" {
			continue
		}
		env = append(env, k+"="+v)
	}
	sort.Strings(env)
	return env
}

// startService starts productsvc with env on top of the suite defaults
// (ADDR=127.0.0.1:0, API_TOKEN, LOG_LEVEL=info and a DB_PATH in a fresh
// t.TempDir()), waits for its listening line and returns the handle. It does
// not wait for readiness; see waitReady. The process is killed at cleanup if
// it is still running.
func startService(t testing.TB, env map[string]string) *service {
	t.Helper()
	defaults := map[string]string{
		"ADDR":      "127.0.0.1:0",
		"API_TOKEN": testToken,
		"LOG_LEVEL": "info",
	}
	if _, ok := env["DB_PATH"]; !ok {
		maps.Copy(defaults, storeEnv(t))
	}
	s := &service{t: t, done: make(chan struct{})}
	s.DBPath = defaults["DB_PATH"]
	if v, ok := env["DB_PATH"]; ok {
		s.DBPath = v
	}

	listening := make(chan string, 1)
	var once sync.Once
	s.Stdout = newLineLog(5000, func(line string) {
		if !strings.Contains(line, "listening") {
			return
		}
		var rec struct {
			Msg  string `json:"msg"`
			Addr string `json:"addr"`
		}
		if json.Unmarshal([]byte(line), &rec) == nil && rec.Msg == "listening" && rec.Addr != "" {
			once.Do(func() { listening <- rec.Addr })
		}
	})
	s.Stderr = newLineLog(2000, nil)

	s.cmd = exec.Command(binPath)
	s.cmd.Env = childEnv(defaults, env)
	s.cmd.Stdout = s.Stdout
	s.cmd.Stderr = s.Stderr
	// The output copiers must not keep Wait hanging if something inherited
	// the pipes.
	s.cmd.WaitDelay = 3 * time.Second
	if err := s.cmd.Start(); err != nil {
		t.Fatalf("start %s: %v", binPath, err)
	}
	go func() {
		s.waitErr = s.cmd.Wait()
		s.state = s.cmd.ProcessState
		close(s.done)
	}()
	t.Cleanup(func() {
		if !s.Exited() {
			_ = s.cmd.Process.Signal(syscall.SIGKILL)
			select {
			case <-s.done:
			case <-time.After(10 * time.Second):
				t.Errorf("productsvc pid %d did not exit after SIGKILL", s.PID())
			}
		}
		if t.Failed() {
			t.Logf("productsvc pid %d stdout (last lines):\n%s", s.PID(), s.Stdout.Tail(25))
			t.Logf("productsvc pid %d stderr:\n%s", s.PID(), s.Stderr.Tail(50))
		}
	})

	timer := time.NewTimer(startTimeout)
	defer timer.Stop()
	select {
	case addr := <-listening:
		s.Addr = addr
		s.BaseURL = "http://" + addr
	case <-s.done:
		t.Fatalf("productsvc exited before listening (%v); env=%v\nstderr:\n%s\nstdout:\n%s",
			s.waitErr, s.cmd.Env, s.Stderr.Tail(50), s.Stdout.Tail(20))
	case <-timer.C:
		t.Fatalf("productsvc logged no {\"msg\":\"listening\"} line within %v\nstdout:\n%s\nstderr:\n%s",
			startTimeout, s.Stdout.Tail(20), s.Stderr.Tail(20))
	}
	return s
}

// PID returns the child's process id.
func (s *service) PID() int { return s.cmd.Process.Pid }

// Signal sends sig to the child.
func (s *service) Signal(sig os.Signal) error { return s.cmd.Process.Signal(sig) }

// Exited reports whether the child has exited.
func (s *service) Exited() bool {
	select {
	case <-s.done:
		return true
	default:
		return false
	}
}

// Wait waits up to timeout for the child to exit and returns its exit code
// (-1 when it died of a signal). ok is false on timeout.
func (s *service) Wait(timeout time.Duration) (code int, ok bool) {
	timer := time.NewTimer(timeout)
	defer timer.Stop()
	select {
	case <-s.done:
		return s.state.ExitCode(), true
	case <-timer.C:
		return 0, false
	}
}

// Kill sends SIGKILL and waits for the process to be gone.
func (s *service) Kill() {
	s.t.Helper()
	if err := s.Signal(syscall.SIGKILL); err != nil && !s.Exited() {
		s.t.Fatalf("SIGKILL pid %d: %v", s.PID(), err)
	}
	if _, ok := s.Wait(10 * time.Second); !ok {
		s.t.Fatalf("pid %d still running 10s after SIGKILL", s.PID())
	}
}

// Stop sends SIGTERM and waits up to timeout for the exit; it returns the
// exit code. On timeout it kills the process and fails the test.
func (s *service) Stop(timeout time.Duration) int {
	s.t.Helper()
	if s.Exited() {
		return s.state.ExitCode()
	}
	_ = s.Signal(syscall.SIGTERM)
	code, ok := s.Wait(timeout)
	if !ok {
		s.t.Errorf("productsvc pid %d did not exit within %v of SIGTERM; killing it", s.PID(), timeout)
		s.Kill()
		return -1
	}
	return code
}

// RSS returns the child's resident set size in bytes (VmRSS).
func (s *service) RSS() (int64, error) {
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/status", s.PID()))
	if err != nil {
		return 0, err
	}
	for _, line := range strings.Split(string(b), "\n") {
		if rest, ok := strings.CutPrefix(line, "VmRSS:"); ok {
			f := strings.Fields(rest) // "12345 kB"
			if len(f) < 1 {
				break
			}
			kb, err := strconv.ParseInt(f[0], 10, 64)
			if err != nil {
				return 0, err
			}
			return kb * 1024, nil
		}
	}
	return 0, errors.New("no VmRSS line")
}

// Client returns an API client for the service carrying the suite token.
func (s *service) Client() *client {
	c := newClient(s.BaseURL, testToken)
	s.t.Cleanup(c.Close)
	return c
}

// startReadyService starts the service and waits for GET /ready to be 200.
func startReadyService(t testing.TB, env map[string]string) (*service, *client) {
	t.Helper()
	s := startService(t, env)
	c := s.Client()
	waitReady(t, c, readyTimeout)
	return s, c
}

// waitReady polls GET /ready until it answers 200, for at most timeout.
func waitReady(t testing.TB, c *client, timeout time.Duration) {
	t.Helper()
	deadline := time.Now().Add(timeout)
	var last string
	for i := 0; time.Now().Before(deadline) && i < 10000; i++ {
		ctx, cancel := context.WithTimeout(context.Background(), 2*time.Second)
		r, err := c.do(ctx, http.MethodGet, "/ready", nil, nil)
		cancel()
		if err == nil && r.Status == http.StatusOK {
			return
		}
		if err != nil {
			last = err.Error()
		} else {
			last = fmt.Sprintf("%d %s", r.Status, r.Body)
		}
		time.Sleep(50 * time.Millisecond)
	}
	t.Fatalf("GET %s/ready not 200 within %v; last: %s", c.base, timeout, last)
}

// ---------------------------------------------------------------------------
// HTTP client.

// client is a JSON client for productsvc that sends the bearer token and
// never follows redirects (a redirect is itself a finding).
type client struct {
	base  string
	token string
	hc    *http.Client
	tr    *http.Transport
}

func newClient(base, token string) *client {
	tr := &http.Transport{
		Proxy:               nil,
		DialContext:         (&net.Dialer{Timeout: 5 * time.Second}).DialContext,
		MaxIdleConns:        512,
		MaxIdleConnsPerHost: 512,
		IdleConnTimeout:     30 * time.Second,
		DisableCompression:  true,
	}
	return &client{
		base:  base,
		token: token,
		tr:    tr,
		hc: &http.Client{
			Transport: tr,
			Timeout:   20 * time.Second,
			CheckRedirect: func(*http.Request, []*http.Request) error {
				return http.ErrUseLastResponse
			},
		},
	}
}

// Close drops idle connections.
func (c *client) Close() { c.tr.CloseIdleConnections() }

// response is a fully read HTTP response.
type response struct {
	Status int
	Header http.Header
	Body   []byte
}

func (r *response) String() string {
	b := r.Body
	if len(b) > 300 {
		b = append(b[:300:300], "..."...)
	}
	return fmt.Sprintf("%d %s %s", r.Status, r.Header.Get("Content-Type"), b)
}

// newRequest builds a request to path. A non-nil body gets Content-Type
// application/json unless hdr sets one; the token is sent unless hdr sets
// Authorization.
func (c *client) newRequest(ctx context.Context, method, path string, body []byte, hdr http.Header) (*http.Request, error) {
	var rd io.Reader
	if body != nil {
		rd = bytes.NewReader(body)
	}
	req, err := http.NewRequestWithContext(ctx, method, c.base+path, rd)
	if err != nil {
		return nil, err
	}
	for k, vs := range hdr {
		req.Header[k] = vs
	}
	if body != nil && req.Header.Get("Content-Type") == "" {
		req.Header.Set("Content-Type", "application/json")
	}
	if c.token != "" && req.Header.Get("Authorization") == "" {
		req.Header.Set("Authorization", "Bearer "+c.token)
	}
	return req, nil
}

// send performs req and reads the whole body.
func (c *client) send(req *http.Request) (*response, error) {
	res, err := c.hc.Do(req)
	if err != nil {
		return nil, err
	}
	defer res.Body.Close()
	b, err := io.ReadAll(res.Body)
	if err != nil {
		return nil, fmt.Errorf("read body of %d response: %w", res.StatusCode, err)
	}
	return &response{Status: res.StatusCode, Header: res.Header, Body: b}, nil
}

// do is newRequest plus send.
func (c *client) do(ctx context.Context, method, path string, body []byte, hdr http.Header) (*response, error) {
	req, err := c.newRequest(ctx, method, path, body, hdr)
	if err != nil {
		return nil, err
	}
	return c.send(req)
}

// product is the service's product representation.
type product struct {
	ID          int64     `json:"id"`
	SKU         string    `json:"sku"`
	Name        string    `json:"name"`
	Description string    `json:"description"`
	Category    string    `json:"category"`
	PriceCents  int64     `json:"price_cents"`
	Currency    string    `json:"currency"`
	Stock       int64     `json:"stock"`
	Version     int64     `json:"version"`
	CreatedAt   time.Time `json:"created_at"`
	UpdatedAt   time.Time `json:"updated_at"`
}

// diffProduct describes how got differs from want, "" when equal.
// Timestamps compare as instants (time.Time's Equal).
func diffProduct(want, got product) string {
	return cmp.Diff(want, got)
}

// createBody is the JSON for POST /products.
func createBody(sku, name string, price int64, extra map[string]any) []byte {
	m := map[string]any{"sku": sku, "name": name, "price_cents": price}
	for k, v := range extra {
		m[k] = v
	}
	b, _ := json.Marshal(m)
	return b
}

// mustCreate creates a product and fails the test unless the service
// answers 201 with a product.
func mustCreate(t testing.TB, c *client, sku, name string, price int64, extra map[string]any) product {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	r, err := c.do(ctx, http.MethodPost, "/products", createBody(sku, name, price, extra), nil)
	if err != nil {
		t.Fatalf("POST /products sku=%s: %v", sku, err)
	}
	if r.Status != http.StatusCreated {
		t.Fatalf("POST /products sku=%s: got %s, want 201", sku, r)
	}
	var p product
	if err := json.Unmarshal(r.Body, &p); err != nil || p.ID <= 0 {
		t.Fatalf("POST /products sku=%s: bad body %q: %v", sku, r.Body, err)
	}
	return p
}

// getProduct fetches one product; the response is returned for any status.
func getProduct(ctx context.Context, c *client, id int64) (product, *response, error) {
	r, err := c.do(ctx, http.MethodGet, "/products/"+strconv.FormatInt(id, 10), nil, nil)
	if err != nil {
		return product{}, nil, err
	}
	var p product
	if r.Status == http.StatusOK {
		if err := json.Unmarshal(r.Body, &p); err != nil {
			return product{}, r, fmt.Errorf("GET /products/%d: decode %q: %w", id, r.Body, err)
		}
	}
	return p, r, nil
}

// listPage is the body of GET /products.
type listPage struct {
	Items      []product `json:"items"`
	NextCursor *string   `json:"next_cursor"`
}

// listAll pages through GET /products?limit=100 and returns every product.
func listAll(ctx context.Context, c *client) ([]product, error) {
	return listQuery(ctx, c, "limit=100", 2000)
}

// listQuery pages through GET /products?query, at most maxPages pages,
// and returns every product.
func listQuery(ctx context.Context, c *client, query string, maxPages int) ([]product, error) {
	var all []product
	path := "/products?" + query
	for page := 0; page < maxPages; page++ {
		r, err := c.do(ctx, http.MethodGet, path, nil, nil)
		if err != nil {
			return nil, fmt.Errorf("GET %s: %w", path, err)
		}
		if r.Status != http.StatusOK {
			return nil, fmt.Errorf("GET %s: %s", path, r)
		}
		var lp listPage
		if err := json.Unmarshal(r.Body, &lp); err != nil {
			return nil, fmt.Errorf("GET %s: decode: %w", path, err)
		}
		all = append(all, lp.Items...)
		if lp.NextCursor == nil || *lp.NextCursor == "" {
			return all, nil
		}
		path = "/products?cursor=" + url.QueryEscape(*lp.NextCursor) // the cursor carries the query
	}
	return nil, fmt.Errorf("GET /products?%s: more than %d pages", query, maxPages)
}

// mustListAll is listAll failing the test on error.
func mustListAll(t testing.TB, c *client) []product {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	all, err := listAll(ctx, c)
	if err != nil {
		t.Fatalf("list all products: %v", err)
	}
	return all
}

// problem is an RFC 9457 problem document.
type problem struct {
	Type     string            `json:"type"`
	Title    string            `json:"title"`
	Status   int               `json:"status"`
	Detail   string            `json:"detail"`
	Instance string            `json:"instance"`
	Errors   map[string]string `json:"errors"`
}

// checkProblem returns "" if r is a well-formed problem+json response with
// the given status, else a description of what is wrong.
func checkProblem(r *response, status int) string {
	var errs []string
	if r.Status != status {
		errs = append(errs, fmt.Sprintf("status %d, want %d", r.Status, status))
	}
	ct := r.Header.Get("Content-Type")
	if !strings.HasPrefix(ct, "application/problem+json") {
		errs = append(errs, fmt.Sprintf("Content-Type %q, want application/problem+json", ct))
	}
	var p problem
	if err := json.Unmarshal(r.Body, &p); err != nil {
		errs = append(errs, fmt.Sprintf("body is not a problem document: %v", err))
	} else {
		if p.Status != r.Status {
			errs = append(errs, fmt.Sprintf("problem status %d != HTTP status %d", p.Status, r.Status))
		}
		if !strings.HasPrefix(p.Type, "/problems/") {
			errs = append(errs, fmt.Sprintf("problem type %q, want /problems/<slug>", p.Type))
		}
	}
	return strings.Join(errs, "; ")
}

// isConnRefused reports whether err is a refused TCP connection, which
// means the request never reached the service.
func isConnRefused(err error) bool {
	return errors.Is(err, syscall.ECONNREFUSED)
}

// ---------------------------------------------------------------------------
// Metrics.

// scrapeMetrics returns the Prometheus text exposition of GET /metrics.
func scrapeMetrics(ctx context.Context, c *client) (string, error) {
	r, err := c.do(ctx, http.MethodGet, "/metrics", nil, nil)
	if err != nil {
		return "", err
	}
	if r.Status != http.StatusOK {
		return "", fmt.Errorf("GET /metrics: %s", r)
	}
	return string(r.Body), nil
}

// metricSum adds up every sample of the metric called exactly name whose
// labels include want. found is false when no sample matched.
func metricSum(text, name string, want map[string]string) (sum float64, found bool) {
	for _, line := range strings.Split(text, "\n") {
		line = strings.TrimSpace(line)
		if line == "" || line[0] == '#' {
			continue
		}
		metric, labels, value, ok := parseSample(line)
		if !ok || metric != name {
			continue
		}
		match := true
		for k, v := range want {
			if labels[k] != v {
				match = false
				break
			}
		}
		if !match {
			continue
		}
		sum += value
		found = true
	}
	return sum, found
}

// parseSample parses `name{a="b",c="d"} 12.5 [timestamp]`.
func parseSample(line string) (name string, labels map[string]string, value float64, ok bool) {
	labels = map[string]string{}
	rest := line
	if i := strings.IndexAny(line, "{ "); i >= 0 && line[i] == '{' {
		name = line[:i]
		j := strings.LastIndexByte(line, '}')
		if j < i {
			return "", nil, 0, false
		}
		for _, kv := range splitLabels(line[i+1 : j]) {
			k, v, found := strings.Cut(kv, "=")
			if !found {
				continue
			}
			if uq, err := strconv.Unquote(strings.TrimSpace(v)); err == nil {
				v = uq
			}
			labels[strings.TrimSpace(k)] = v
		}
		rest = line[j+1:]
	} else {
		f := strings.Fields(line)
		if len(f) < 2 {
			return "", nil, 0, false
		}
		name = f[0]
		rest = strings.TrimPrefix(line, f[0])
	}
	f := strings.Fields(rest)
	if len(f) < 1 {
		return "", nil, 0, false
	}
	v, err := strconv.ParseFloat(f[0], 64)
	if err != nil {
		return "", nil, 0, false
	}
	return name, labels, v, true
}

// splitLabels splits a label list on commas outside quotes.
func splitLabels(s string) []string {
	var out []string
	inQuote, esc := false, false
	start := 0
	for i := 0; i < len(s); i++ {
		switch {
		case esc:
			esc = false
		case s[i] == '\\':
			esc = true
		case s[i] == '"':
			inQuote = !inQuote
		case s[i] == ',' && !inQuote:
			out = append(out, s[start:i])
			start = i + 1
		}
	}
	if strings.TrimSpace(s[start:]) != "" {
		out = append(out, s[start:])
	}
	return out
}

// ---------------------------------------------------------------------------
// Statistics and small helpers.

// latencies is a concurrency-safe list of durations.
type latencies struct {
	mu sync.Mutex
	d  []time.Duration
}

func (l *latencies) add(d time.Duration) {
	l.mu.Lock()
	l.d = append(l.d, d)
	l.mu.Unlock()
}

// summary returns count, p50, p99 and max.
func (l *latencies) summary() (n int, p50, p99, max time.Duration) {
	l.mu.Lock()
	d := append([]time.Duration(nil), l.d...)
	l.mu.Unlock()
	if len(d) == 0 {
		return 0, 0, 0, 0
	}
	sort.Slice(d, func(i, j int) bool { return d[i] < d[j] })
	return len(d), percentile(d, 0.50), percentile(d, 0.99), d[len(d)-1]
}

// percentile returns the q-quantile of sorted d (nearest rank).
func percentile(sorted []time.Duration, q float64) time.Duration {
	if len(sorted) == 0 {
		return 0
	}
	i := int(math.Ceil(q*float64(len(sorted)))) - 1
	if i < 0 {
		i = 0
	}
	if i >= len(sorted) {
		i = len(sorted) - 1
	}
	return sorted[i]
}

func envInt(t testing.TB, name string, def int) int {
	t.Helper()
	v := os.Getenv(name)
	if v == "" {
		return def
	}
	n, err := strconv.Atoi(v)
	if err != nil || n <= 0 {
		t.Fatalf("%s=%q: want a positive integer", name, v)
	}
	return n
}

func envDuration(t testing.TB, name string, def time.Duration) time.Duration {
	t.Helper()
	v := os.Getenv(name)
	if v == "" {
		return def
	}
	d, err := time.ParseDuration(v)
	if err != nil || d <= 0 {
		t.Fatalf("%s=%q: want a positive duration such as 60s", name, v)
	}
	return d
}

// pollUntil calls cond every interval until it returns true or timeout
// passes; it reports whether cond succeeded. The number of calls is bounded
// by timeout/interval+1.
func pollUntil(timeout, interval time.Duration, cond func() bool) bool {
	deadline := time.Now().Add(timeout)
	maxIter := int(timeout/interval) + 1
	for i := 0; i < maxIter; i++ {
		if cond() {
			return true
		}
		if time.Now().After(deadline) {
			return false
		}
		time.Sleep(interval)
	}
	return cond()
}

// readyBody is the body of GET /ready.
type readyBody struct {
	Status string `json:"status"`
	Checks struct {
		Database struct {
			Status string `json:"status"`
		} `json:"database"`
		Cache struct {
			Status string `json:"status"`
		} `json:"cache"`
		Breaker struct {
			State string `json:"state"`
			Read  string `json:"read"`
			Write string `json:"write"`
		} `json:"breaker"`
	} `json:"checks"`
}

// getReady fetches and decodes GET /ready.
func getReady(c *client) (readyBody, *response, error) {
	ctx, cancel := context.WithTimeout(context.Background(), 3*time.Second)
	defer cancel()
	var rb readyBody
	r, err := c.do(ctx, http.MethodGet, "/ready", nil, nil)
	if err != nil {
		return rb, nil, err
	}
	if err := json.Unmarshal(r.Body, &rb); err != nil {
		return rb, r, fmt.Errorf("GET /ready: decode %q: %w", r.Body, err)
	}
	return rb, r, nil
}

// rawHTTP sends req (a complete HTTP/1.1 request, ideally with
// Connection: close) over a fresh TCP connection and reads one response.
// The request is written concurrently with reading, so an early answer
// (413, 431) is seen even when the server stops reading.
func rawHTTP(addr string, req []byte, timeout time.Duration) (*response, error) {
	conn, err := net.DialTimeout("tcp", addr, 5*time.Second)
	if err != nil {
		return nil, err
	}
	defer conn.Close()
	_ = conn.SetDeadline(time.Now().Add(timeout))
	writeErr := make(chan error, 1)
	go func() {
		_, err := conn.Write(req)
		writeErr <- err
	}()
	res, err := http.ReadResponse(bufio.NewReader(conn), nil)
	if err != nil {
		werr := <-writeErr
		return nil, fmt.Errorf("read response: %w (write: %v)", err, werr)
	}
	defer res.Body.Close()
	b, err := io.ReadAll(res.Body)
	if err != nil {
		return nil, fmt.Errorf("read body of %d: %w", res.StatusCode, err)
	}
	return &response{Status: res.StatusCode, Header: res.Header, Body: b}, nil
}
