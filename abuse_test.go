package main

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"log/slog"
	"net"
	"net/http"
	"net/http/httptest"
	"net/netip"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"
)

// abuseServer is a real handler on real SQLite with the given limits.
func abuseServer(tb testing.TB, store productStore, limiter *rateLimiter, maxFlight int) *httptest.Server {
	tb.Helper()
	m := newMetrics(nil)
	svc := NewProductService(store, ServiceConfig{Metrics: m})
	life := &lifecycle{}
	life.started.Store(true)
	srv := httptest.NewServer(newServer(serverDeps{svc: svc, log: slog.New(slog.DiscardHandler), metrics: m,
		tokens: newTokenSet([]string{"tok-a", "tok-b"}), life: life, limiter: limiter, maxFlight: maxFlight, serveMetrics: true}))
	tb.Cleanup(srv.Close)
	return srv
}

func abuseStore(tb testing.TB) *sqliteStore {
	tb.Helper()
	s, err := openSQLite(context.Background(), StoreConfig{Path: filepath.Join(tb.TempDir(), "a.db"), Sync: "normal"})
	if err != nil {
		tb.Fatal(err)
	}
	tb.Cleanup(func() { s.Close() })
	return s
}

func get(tb testing.TB, url, token string) *http.Response {
	tb.Helper()
	req, _ := http.NewRequest("GET", url, nil)
	if token != "" {
		req.Header.Set("Authorization", "Bearer "+token)
	}
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		tb.Fatal(err)
	}
	resp.Body.Close()
	return resp
}

func TestRateLimiter_Limit(t *testing.T) {
	// A rate so low no token comes back during the test: the burst is all.
	limiter := newRateLimiter(0.001, 3, newTokenSet([]string{"tok-a", "tok-b"}))
	srv := abuseServer(t, abuseStore(t), limiter, 0)

	for i := range 3 {
		if resp := get(t, srv.URL+"/products", ""); resp.StatusCode != http.StatusOK {
			t.Fatalf("request %d status = %d, want 200 within the burst", i+1, resp.StatusCode)
		}
	}
	resp := get(t, srv.URL+"/products", "")
	if resp.StatusCode != http.StatusTooManyRequests {
		t.Fatalf("request 4 status = %d, want 429", resp.StatusCode)
	}
	if resp.Header.Get("Content-Type") != contentTypeProblem {
		t.Errorf("429 Content-Type = %q, want %q", resp.Header.Get("Content-Type"), contentTypeProblem)
	}
	if ra, err := strconv.Atoi(resp.Header.Get("Retry-After")); err != nil || ra < 1 {
		t.Errorf("429 Retry-After = %q, want a positive number of seconds", resp.Header.Get("Retry-After"))
	}
	for _, h := range []string{"RateLimit-Limit", "RateLimit-Remaining", "RateLimit-Reset"} {
		if resp.Header.Get(h) == "" {
			t.Errorf("429 has no %s header", h)
		}
	}
	if got := resp.Header.Get("RateLimit-Remaining"); got != "0" {
		t.Errorf("RateLimit-Remaining = %q, want 0", got)
	}

	// Probes are never limited; another client has its own bucket; a valid
	// token is one client whatever its address.
	for _, path := range []string{"/health", "/ready", "/livez", "/metrics"} {
		if resp := get(t, srv.URL+path, ""); resp.StatusCode != http.StatusOK {
			t.Errorf("GET %s status = %d while rate limited, want 200", path, resp.StatusCode)
		}
	}
	if resp := get(t, srv.URL+"/products", "tok-a"); resp.StatusCode != http.StatusOK {
		t.Errorf("GET with a valid token status = %d, want 200 (its own bucket)", resp.StatusCode)
	}
	if resp := get(t, srv.URL+"/products", "not-a-token"); resp.StatusCode != http.StatusTooManyRequests {
		t.Errorf("GET with an invalid token status = %d, want 429 (limited by address like no token)", resp.StatusCode)
	}
}

func TestRateLimiter_FailedAuthentication(t *testing.T) {
	limiter := newRateLimiter(1000, 1000, newTokenSet([]string{"tok-a"}))
	srv := abuseServer(t, abuseStore(t), limiter, 0)
	post := func(token string) int {
		req, _ := http.NewRequest("POST", srv.URL+"/products", strings.NewReader(`{"sku":"X-1","name":"x","price_cents":1}`))
		req.Header.Set("Content-Type", "application/json")
		req.Header.Set("Authorization", "Bearer "+token)
		resp, err := http.DefaultClient.Do(req)
		if err != nil {
			t.Fatal(err)
		}
		resp.Body.Close()
		return resp.StatusCode
	}
	for i := range authFailureBurst {
		if got := post("guess-" + strconv.Itoa(i)); got != http.StatusUnauthorized {
			t.Fatalf("failed attempt %d status = %d, want 401", i+1, got)
		}
	}
	if got := post("guess-more"); got != http.StatusTooManyRequests {
		t.Errorf("attempt %d status = %d, want 429: failed authentication is limited more tightly", authFailureBurst+1, got)
	}
}

func TestRateLimiter_EvictsIdleBuckets(t *testing.T) {
	rl := newRateLimiter(1e6, 1, nil) // refills at once: every bucket is idle
	now := time.Now()
	for i := range 1000 {
		key := "ip:" + strconv.Itoa(i)
		s := rl.shard(key)
		s.mu.Lock()
		rl.get(s.buckets, key, rl.rps, rl.burst, maxBuckets/limiterShards, now)
		s.mu.Unlock()
	}
	// Each new client dropped the idle buckets it looked at.
	if n, _ := rl.len(); n > 1000/2 {
		t.Errorf("buckets after 1000 idle clients = %d, want most of the idle ones dropped", n)
	}
}

// TestRateLimiter_boundedWork fills the limiter with active clients, more
// than it holds, and checks that no request looks at more than a handful of
// buckets to make room, however full the map.
func TestRateLimiter_boundedWork(t *testing.T) {
	rl := newRateLimiter(0.001, 5, nil) // nobody refills during the test
	h := rl.limit(newMetrics(nil), http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {}))
	const clients = maxBuckets + maxBuckets/4
	before := rl.examined.Load()
	for i := range clients {
		r := httptest.NewRequest("GET", "/products", nil)
		r.RemoteAddr = netip.AddrFrom4([4]byte{10, byte(i >> 16), byte(i >> 8), byte(i)}).String() + ":1234"
		h.ServeHTTP(httptest.NewRecorder(), r)
	}
	if perRequest := float64(rl.examined.Load()-before) / clients; perRequest > evictSample {
		t.Errorf("buckets examined per new client = %.1f, want at most %d", perRequest, evictSample)
	}
	if n, _ := rl.len(); n > maxBuckets {
		t.Errorf("buckets = %d after %d clients, want at most %d", n, clients, maxBuckets)
	}
}

func TestClientKey(t *testing.T) {
	tests := []struct{ remote, want string }{
		{"192.0.2.7:1234", "192.0.2.7"},
		{"[2001:db8:1:2:3:4:5:6]:443", "2001:db8:1:2::/64"},
		{"[2001:db8:1:2:ffff:ffff:ffff:ffff]:443", "2001:db8:1:2::/64"}, // same host, same /64
		{"[2001:db8:1:3::1]:443", "2001:db8:1:3::/64"},
		{"[::ffff:192.0.2.7]:80", "192.0.2.7"},
		{"[fe80::1%eth0]:80", "fe80::/64"},
		{"not-an-address", "not-an-address"},
	}
	for _, tt := range tests {
		r := httptest.NewRequest("GET", "/", nil)
		r.RemoteAddr = tt.remote
		if got := clientKey(r); got != tt.want {
			t.Errorf("clientKey(%q) = %q, want %q", tt.remote, got, tt.want)
		}
	}
}

// TestRateLimiter_ipv6SameBucket sends from many addresses of one /64: they
// share one bucket, so one host cannot escape the limit or fill the map.
func TestRateLimiter_ipv6SameBucket(t *testing.T) {
	rl := newRateLimiter(0.001, 3, nil)
	h := rl.limit(newMetrics(nil), http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {}))
	codes := map[int]int{}
	for i := range 10 {
		r := httptest.NewRequest("GET", "/products", nil)
		r.RemoteAddr = fmt.Sprintf("[2001:db8:0:7::%x]:5555", i+1)
		w := httptest.NewRecorder()
		h.ServeHTTP(w, r)
		codes[w.Code]++
	}
	if codes[http.StatusOK] != 3 || codes[http.StatusTooManyRequests] != 7 {
		t.Errorf("10 requests from one /64 with a burst of 3: statuses %v, want 3 × 200 and 7 × 429", codes)
	}
	if n, _ := rl.len(); n != 1 {
		t.Errorf("buckets = %d, want 1 for one /64", n)
	}
}

// TestRun_authFailuresLimitedByDefault runs the service with no rate limit
// configured: failed authentication is limited all the same.
func TestRun_authFailuresLimitedByDefault(t *testing.T) {
	svc := runService(t, map[string]string{"ADDR": "127.0.0.1:0", "DB_PATH": filepath.Join(t.TempDir(), "a.db"), "API_TOKEN": "right"})
	base := "http://" + svc.listeningAddr(t)
	codes := map[int]int{}
	for i := range authFailureBurst + 5 {
		req, _ := http.NewRequest("POST", base+"/products", strings.NewReader(`{"sku":"X-1","name":"x","price_cents":1}`))
		req.Header.Set("Content-Type", "application/json")
		req.Header.Set("Authorization", "Bearer guess-"+strconv.Itoa(i))
		resp, err := http.DefaultClient.Do(req)
		if err != nil {
			t.Fatal(err)
		}
		resp.Body.Close()
		codes[resp.StatusCode]++
	}
	if codes[http.StatusUnauthorized] != authFailureBurst || codes[http.StatusTooManyRequests] != 5 {
		t.Errorf("%d failed authentications without RATE_LIMIT_RPS: statuses %v, want %d × 401 then 429", authFailureBurst+5, codes, authFailureBurst)
	}
}

// blockingStore holds every List call until release is closed.
type blockingStore struct {
	productStore
	entered chan struct{}
	release chan struct{}
}

func (s *blockingStore) List(ctx context.Context, f ListFilter) (Page, error) {
	s.entered <- struct{}{}
	<-s.release
	return s.productStore.List(ctx, f)
}

func TestShedLoad(t *testing.T) {
	bs := &blockingStore{productStore: abuseStore(t), entered: make(chan struct{}, 10), release: make(chan struct{})}
	srv := abuseServer(t, bs, nil, 2)
	var wg sync.WaitGroup
	codes := make(chan int, 2)
	for range 2 {
		wg.Go(func() { codes <- get(t, srv.URL+"/products", "").StatusCode })
	}
	for range 2 {
		<-bs.entered // both slots taken
	}
	resp := get(t, srv.URL+"/products?limit=1", "")
	if resp.StatusCode != http.StatusServiceUnavailable || resp.Header.Get("Retry-After") == "" {
		t.Errorf("third concurrent request status = %d, Retry-After %q; want 503 with Retry-After at once",
			resp.StatusCode, resp.Header.Get("Retry-After"))
	}
	if resp := get(t, srv.URL+"/ready", ""); resp.StatusCode != http.StatusOK {
		t.Errorf("GET /ready at capacity = %d, want 200: probes are never shed", resp.StatusCode)
	}
	close(bs.release)
	wg.Wait()
	close(codes)
	for c := range codes {
		if c != http.StatusOK {
			t.Errorf("held request status = %d, want 200", c)
		}
	}
}

// TestRun_SlowClients opens many connections that send their headers at a
// crawl (slowloris) and shows normal requests are served meanwhile, and that
// the server cuts the slow connections (ReadHeaderTimeout).
func TestRun_SlowClients(t *testing.T) {
	if testing.Short() {
		t.Skip("waits for the server's header timeout")
	}
	ctx, cancel := context.WithCancel(context.Background())
	out := &syncBuffer{}
	env := map[string]string{"ADDR": "127.0.0.1:0", "DB_PATH": filepath.Join(t.TempDir(), "s.db"), "API_TOKEN": "t", "LOG_LEVEL": "info"}
	done := make(chan error, 1)
	go func() { done <- run(ctx, []string{"productsvc"}, func(k string) string { return env[k] }, out, out) }()
	t.Cleanup(func() {
		cancel()
		select {
		case <-done:
		case <-time.After(30 * time.Second):
			t.Error("run did not return after cancel")
		}
	})
	var addr string
	for deadline := time.Now().Add(10 * time.Second); addr == "" && time.Now().Before(deadline); {
		for l := range strings.Lines(out.String()) {
			var m map[string]any
			if json.Unmarshal([]byte(l), &m) == nil && m["msg"] == "listening" {
				addr, _ = m["addr"].(string)
			}
		}
		time.Sleep(10 * time.Millisecond) // polling the log for the address
	}
	if addr == "" {
		t.Fatalf("no listening line in the log:\n%s", out.String())
	}

	const slow = 200
	conns := make([]net.Conn, 0, slow)
	for range slow {
		c, err := net.Dial("tcp", addr)
		if err != nil {
			t.Fatal(err)
		}
		conns = append(conns, c)
		fmt.Fprintf(c, "GET /products HTTP/1.1\r\nHost: x\r\nX-Slow: ")
	}
	defer func() {
		for _, c := range conns {
			c.Close()
		}
	}()
	client := &http.Client{Timeout: 5 * time.Second}
	for i := range 20 {
		resp, err := client.Get("http://" + addr + "/products/" + strconv.Itoa(i+1))
		if err != nil {
			t.Fatalf("normal request %d with %d slow connections open: %v", i+1, slow, err)
		}
		resp.Body.Close()
		if resp.StatusCode != http.StatusNotFound {
			t.Fatalf("normal request %d status = %d, want 404 (no such product)", i+1, resp.StatusCode)
		}
	}
	// The server must close a connection that never finishes its headers.
	c := conns[0]
	c.SetReadDeadline(time.Now().Add(20 * time.Second))
	buf := make([]byte, 512)
	for {
		if _, err := c.Read(buf); err != nil {
			if ne, ok := err.(net.Error); ok && ne.Timeout() {
				t.Fatalf("slow connection still open after 20s; want it closed by ReadHeaderTimeout")
			}
			break // EOF or reset: closed by the server
		}
	}
}

func TestRejectLog_note(t *testing.T) {
	l := &rejectLog{interval: time.Second}
	t0 := time.Unix(1000, 0)
	if n, ok := l.note(t0); !ok || n != 1 {
		t.Errorf("first note = %d, %v, want 1, true", n, ok)
	}
	for i := range 99 {
		if _, ok := l.note(t0.Add(time.Duration(i) * time.Millisecond)); ok {
			t.Fatalf("note %d within the interval asked to log", i+2)
		}
	}
	if n, ok := l.note(t0.Add(time.Second)); !ok || n != 100 {
		t.Errorf("note after the interval = %d, %v, want 100 (99 suppressed and this one), true", n, ok)
	}
}

// TestObserve_rejectsSampled floods a rate-limited server: every refusal is
// counted in metrics, but the log gets a sampled line, not one per request,
// and nothing at WARN per request (which would be written synchronously).
func TestObserve_rejectsSampled(t *testing.T) {
	logs := &syncBuffer{}
	m := newMetrics(nil)
	svc := NewProductService(abuseStore(t), ServiceConfig{Metrics: m})
	life := &lifecycle{}
	life.started.Store(true)
	tokens := newTokenSet([]string{"t"})
	h := newServer(serverDeps{svc: svc, log: slog.New(slog.NewJSONHandler(logs, nil)), metrics: m,
		tokens: tokens, life: life, limiter: newRateLimiter(1e-9, 1, tokens), maxFlight: 100})
	const flood = 2000
	h.ServeHTTP(httptest.NewRecorder(), httptest.NewRequest("GET", "/products", nil)) // the burst
	for range flood {
		w := httptest.NewRecorder()
		h.ServeHTTP(w, httptest.NewRequest("GET", "/products", nil))
		if w.Code != http.StatusTooManyRequests {
			t.Fatalf("status = %d, want 429", w.Code)
		}
	}
	lines := logs.logLines()
	sampled := 0
	for _, l := range lines {
		if l["msg"] == "requests rejected" {
			sampled++
		}
	}
	// One line a second at most: the loop would have to take 100 s to
	// reach the bound.
	if len(lines) > flood/20 || sampled == 0 {
		t.Errorf("%d refused requests wrote %d log lines (%d sampled), want a few sampled ones", flood, len(lines), sampled)
	}
	if got := counterValue(t, m.rateLimited); got != flood {
		t.Errorf("http_requests_rate_limited_total = %v, want %d", got, flood)
	}
}

// manyLinesBody is a POST /reservations body just under maxBodyBytes whose
// lines are all empty objects: about 350,000 lines, each missing both its
// fields.
func manyLinesBody() string {
	var b strings.Builder
	b.WriteString(`{"reference":"a","lines":[{}`)
	for b.Len() < maxBodyBytes-8 {
		b.WriteString(",{}")
	}
	b.WriteString("]}")
	return b.String()
}

// TestReservation_manyLinesRefusedCheaply sends a body of hundreds of
// thousands of empty lines: it is refused for its line count, without
// validating each line, in an answer that lists a bounded number of
// problems.
func TestReservation_manyLinesRefusedCheaply(t *testing.T) {
	ts := newTestServer(t, nil)
	body := manyLinesBody()
	start := time.Now()
	r := ts.write(t, "POST", "/reservations", body)
	elapsed := time.Since(start)
	t.Logf("%d-byte body: %d answered in %v with %d bytes", len(body), r.status, elapsed, len(r.body))
	p := checkProblem(t, r, http.StatusUnprocessableEntity, "validation", []string{"lines"})
	if want := fmt.Sprintf("must have 1 to %d lines", maxReservationLines); p.Errors["lines"] != want {
		t.Errorf("errors.lines = %q, want %q", p.Errors["lines"], want)
	}
	if len(r.body) > 1024 {
		t.Errorf("answer is %d bytes, want under 1 KiB", len(r.body))
	}
}

// TestReservation_tooManyLinesIgnoresLineProblems sends one line more than
// the limit, each wrong: the count is the only problem named.
func TestReservation_tooManyLinesIgnoresLineProblems(t *testing.T) {
	ts := newTestServer(t, nil)
	lines := strings.Repeat(`{"product_id":0,"quantity":0},`, maxReservationLines+1)
	r := ts.write(t, "POST", "/reservations", `{"reference":"a","lines":[`+strings.TrimSuffix(lines, ",")+`]}`)
	checkProblem(t, r, http.StatusUnprocessableEntity, "validation", []string{"lines"})

	in := ReservationInput{Reference: new("a"), Lines: make([]ReservationLine, maxReservationLines+1)}
	if got := in.Valid(); len(got) != 1 || got["lines"] == "" {
		t.Errorf("Valid() of %d zero lines = %v, want only the lines count", len(in.Lines), got)
	}
}

// TestWriteProblem_capsErrors answers an error with many problems: the
// first maxProblemsListed by name are listed, and the rest are counted in
// errors_omitted and in the detail.
func TestWriteProblem_capsErrors(t *testing.T) {
	problems := make(map[string]string)
	for i := range 1000 {
		problems[fmt.Sprintf("f%04d", i)] = "is wrong"
	}
	w := httptest.NewRecorder()
	writeError(w, httptest.NewRequest("GET", "/products", nil), &ValidationError{Problems: problems})
	var p struct {
		Detail  string            `json:"detail"`
		Errors  map[string]string `json:"errors"`
		Omitted int               `json:"errors_omitted"`
	}
	if err := json.Unmarshal(w.Body.Bytes(), &p); err != nil {
		t.Fatalf("decoding %s: %v", w.Body.Bytes(), err)
	}
	if len(p.Errors) != maxProblemsListed || p.Omitted != 1000-maxProblemsListed {
		t.Errorf("errors lists %d, errors_omitted = %d; want %d and %d", len(p.Errors), p.Omitted, maxProblemsListed, 1000-maxProblemsListed)
	}
	for i := range maxProblemsListed {
		if k := fmt.Sprintf("f%04d", i); p.Errors[k] == "" {
			t.Errorf("errors has no %q; want the first %d names", k, maxProblemsListed)
		}
	}
	if !strings.Contains(p.Detail, strconv.Itoa(1000-maxProblemsListed)) {
		t.Errorf("detail %q does not say how many problems are left out", p.Detail)
	}
	// Byte for byte what encoding/json makes of the same document.
	var want bytes.Buffer
	enc := json.NewEncoder(&want)
	enc.SetEscapeHTML(false)
	enc.Encode(problem{Type: "/problems/validation", Title: http.StatusText(422), Status: 422, Detail: p.Detail,
		Instance: "/products", Errors: p.Errors, ErrorsOmitted: p.Omitted})
	if w.Body.String() != want.String() {
		t.Errorf("capped problem = %s, want %s", w.Body.Bytes(), want.Bytes())
	}

	// Within the cap, nothing is omitted and errors_omitted is absent.
	w = httptest.NewRecorder()
	writeError(w, httptest.NewRequest("GET", "/products", nil), badParam("limit", "is wrong"))
	if strings.Contains(w.Body.String(), "errors_omitted") {
		t.Errorf("one problem: body %s has errors_omitted", w.Body.Bytes())
	}
}

// manyKeysPatch is a merge patch just under maxBodyBytes of distinct,
// unknown keys (0, 1, … in base 36): about 130,000 of them.
func manyKeysPatch() string {
	var b strings.Builder
	b.WriteString("{")
	for i := 0; b.Len() < maxBodyBytes-16; i++ {
		if i > 0 {
			b.WriteString(",")
		}
		fmt.Fprintf(&b, `"%s":1`, strconv.FormatInt(int64(i), 36))
	}
	b.WriteString("}")
	return b.String()
}

// TestPatch_manyKeysRefusedAtOnce sends a merge patch of some hundred
// thousand distinct keys: the first unknown one is refused, at once.
func TestPatch_manyKeysRefusedAtOnce(t *testing.T) {
	ts := newTestServer(t, nil)
	p := ts.createProduct(t, "K-1", 100)
	body := manyKeysPatch()
	done := make(chan response, 1)
	start := time.Now()
	go func() {
		r, err := ts.try("PATCH", "/products/"+strconv.FormatInt(p.ID, 10), strings.NewReader(body), writeHeaders()...)
		if err != nil {
			t.Error(err)
		}
		done <- r
	}()
	var r response
	select {
	case r = <-done:
	case <-time.After(5 * time.Second):
		t.Fatalf("a %d-byte merge patch of distinct keys was not answered within 5s", len(body))
	}
	t.Logf("%d-byte patch: %d answered in %v with %d bytes", len(body), r.status, time.Since(start), len(r.body))
	checkProblem(t, r, http.StatusBadRequest, "bad-request", []string{"0"})

	// A map target (no known names) keeps its keys in a set: the same
	// body, every key distinct and allowed, is read in linear time.
	var m map[string]json.RawMessage
	start = time.Now()
	if err := decodeStrict([]byte(body), &m); err != nil || len(m) < 100_000 {
		t.Fatalf("decodeStrict of %d distinct keys = %v with %d keys", strings.Count(body, ":"), err, len(m))
	}
	if d := time.Since(start); d > 5*time.Second {
		t.Errorf("decodeStrict of %d distinct keys took %v, want well under 5s", len(m), d)
	}
}

// manyParams is a query string of n unknown parameters.
func manyParams(n int) string {
	var b strings.Builder
	for i := range n {
		if i > 0 {
			b.WriteString("&")
		}
		fmt.Fprintf(&b, "p%04d=1", i)
	}
	return b.String()
}

// TestQuery_manyParamsRefusedSmall sends 9,999 unknown query parameters
// (url.ParseQuery reads up to 10,000) to each endpoint that reads a query:
// each answers 400 with a small body.
func TestQuery_manyParamsRefusedSmall(t *testing.T) {
	ts := newTestServer(t, nil)
	q := manyParams(9999)
	for _, path := range []string{"/products", "/events", "/reservations"} {
		r := ts.get(t, path+"?"+q, "Authorization", "Bearer "+testToken)
		t.Logf("GET %s with 9,999 parameters: %d, %d bytes", path, r.status, len(r.body))
		checkProblem(t, r, http.StatusBadRequest, "bad-request", nil)
		if len(r.body) > 2048 {
			t.Errorf("GET %s with 9,999 unknown parameters: %d-byte answer, want under 2 KiB", path, len(r.body))
		}
	}
}

// The benchmarks below give the cost of each refusal: run them with
// -benchmem -benchtime=1x for the figures of one request.

func BenchmarkReservation_manyLines(b *testing.B) {
	ts := newTestServer(b, nil)
	benchRefusal(b, ts.handler, "POST", "/reservations", manyLinesBody())
}

func BenchmarkPatch_manyKeys(b *testing.B) {
	ts := newTestServer(b, nil)
	p := ts.createProduct(b, "K-1", 100)
	benchRefusal(b, ts.handler, "PATCH", "/products/"+strconv.FormatInt(p.ID, 10), manyKeysPatch())
}

func BenchmarkQuery_manyParams(b *testing.B) {
	ts := newTestServer(b, nil)
	benchRefusal(b, ts.handler, "GET", "/products?"+manyParams(9999), "")
}

// benchRefusal serves one request per iteration and reports the size of
// the answer.
func benchRefusal(b *testing.B, h http.Handler, method, target, body string) {
	b.Helper()
	var n int
	b.ReportAllocs()
	for b.Loop() {
		req := httptest.NewRequest(method, target, strings.NewReader(body))
		req.Header.Set("Authorization", "Bearer "+testToken)
		req.Header.Set("Content-Type", "application/json")
		w := httptest.NewRecorder()
		h.ServeHTTP(w, req)
		if w.Code < 400 {
			b.Fatalf("%s %s = %d, want a refusal", method, target, w.Code)
		}
		n = w.Body.Len()
	}
	b.ReportMetric(float64(n), "resp-bytes")
}
