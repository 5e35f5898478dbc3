package main

import (
	"bytes"
	"crypto/rand"
	"encoding/hex"
	"fmt"
	"io"
	"log/slog"
	"maps"
	"net/http"
	"net/http/httptest"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"sort"
	"strings"
	"testing"

	"github.com/prometheus/client_golang/prometheus"
	dto "github.com/prometheus/client_model/go"
	"github.com/prometheus/common/expfmt"
	"github.com/prometheus/common/model"
)

// mtToken is the API token of the servers mtNewServer builds.
const mtToken = "t"

// mtServer is the whole service over a real SQLite file, wired as run wires
// it, without a listener.
type mtServer struct {
	handler http.Handler
	store   *sqliteStore
	svc     *ProductService
}

// mtFeedToken and mtCatalogToken are credentials with one scope each, for
// requests refused 403.
const (
	mtFeedToken    = "feed-only"
	mtCatalogToken = "catalog-only"
	mtCappedToken  = "capped" // reservations:write, holding at most mtCap units
	mtCap          = 3
)

// mtTokens accepts mtToken with every scope, mtFeedToken with events:read
// and mtCatalogToken with catalog:write.
func mtTokens(tb testing.TB) *tokenSet {
	tb.Helper()
	ts := newTokenSet([]string{mtToken})
	addTestCredential(tb, ts, "feed-reader", scopeEventsRead, mtFeedToken)
	addTestCredential(tb, ts, "catalog-editor", scopeCatalogWrite, mtCatalogToken)
	addTestCredential(tb, ts, "capped", scopeReservationsWrite, mtCappedToken)
	creds := *ts.creds.Load()
	creds[len(creds)-1].MaxHeld = mtCap
	return ts
}

// mtNewServer builds the service's handler over a new SQLite database in a
// temporary directory, with the in-process cache on, no Redis, no rate limit
// and no load shedding.
func mtNewServer(tb testing.TB) *mtServer {
	tb.Helper()
	store, err := openSQLite(tb.Context(), StoreConfig{Path: filepath.Join(tb.TempDir(), "products.db")})
	if err != nil {
		tb.Fatalf("OpenStore: %v", err)
	}
	tb.Cleanup(func() {
		if err := store.Close(); err != nil {
			tb.Errorf("close store: %v", err)
		}
	})
	m := newMetrics(prometheus.NewRegistry())
	m.dbPools(sqlPoolCollector(store.rdb, "sqlite_read"), sqlPoolCollector(store.wdb, "sqlite_write"))
	svc := NewProductService(store, ServiceConfig{Metrics: m, LocalCacheSize: 1000})
	life := &lifecycle{}
	life.started.Store(true)
	h := newServer(serverDeps{
		svc:          svc,
		log:          slog.New(slog.DiscardHandler),
		metrics:      m,
		tokens:       mtTokens(tb),
		life:         life,
		serveMetrics: true,
		maxFlight:    0,
	})
	return &mtServer{handler: h, store: store, svc: svc}
}

// do sends one request through the handler. A write body is sent as JSON
// with the server's token.
func (s *mtServer) do(tb testing.TB, method, target, body string) *httptest.ResponseRecorder {
	tb.Helper()
	var r io.Reader
	if body != "" {
		r = strings.NewReader(body)
	}
	req := httptest.NewRequest(method, target, r)
	if body != "" {
		req.Header.Set("Content-Type", "application/json")
	}
	if method != http.MethodGet && method != http.MethodHead {
		req.Header.Set("Authorization", "Bearer "+mtToken)
	}
	rec := httptest.NewRecorder()
	s.handler.ServeHTTP(rec, req)
	return rec
}

// scrape gets /metrics and parses the exposition.
func (s *mtServer) scrape(tb testing.TB) map[string]*dto.MetricFamily {
	tb.Helper()
	rec := s.do(tb, http.MethodGet, "/metrics", "")
	if rec.Code != http.StatusOK {
		tb.Fatalf("GET /metrics status = %d, want 200; body:\n%s", rec.Code, rec.Body)
	}
	p := expfmt.NewTextParser(model.UTF8Validation)
	fams, err := p.TextToMetricFamilies(bytes.NewReader(rec.Body.Bytes()))
	if err != nil {
		tb.Fatalf("parse /metrics exposition: %v\n%s", err, rec.Body)
	}
	return fams
}

// mtLabels renders a metric's labels as `a="x",b="y"`, sorted by name.
func mtLabels(m *dto.Metric) string {
	parts := make([]string, 0, len(m.GetLabel()))
	for _, l := range m.GetLabel() {
		parts = append(parts, fmt.Sprintf("%s=%q", l.GetName(), l.GetValue()))
	}
	sort.Strings(parts)
	return strings.Join(parts, ",")
}

// mtSeries maps each series of the family name (by mtLabels) to its value:
// the value of a counter or gauge, the sample count of a histogram.
func mtSeries(fams map[string]*dto.MetricFamily, name string) map[string]float64 {
	out := make(map[string]float64)
	f := fams[name]
	if f == nil {
		return out
	}
	for _, m := range f.GetMetric() {
		var v float64
		switch f.GetType() {
		case dto.MetricType_COUNTER:
			v = m.GetCounter().GetValue()
		case dto.MetricType_GAUGE:
			v = m.GetGauge().GetValue()
		case dto.MetricType_HISTOGRAM:
			v = float64(m.GetHistogram().GetSampleCount())
		default:
			v = m.GetUntyped().GetValue()
		}
		out[mtLabels(m)] = v
	}
	return out
}

func mtReq(method, route, code string) string {
	return fmt.Sprintf("code=%q,method=%q,route=%q", code, method, route)
}

func mtDur(method, route string) string {
	return fmt.Sprintf("method=%q,route=%q", method, route)
}

// mtDiff reports the series of got that differ from want, and those missing.
func mtDiff(tb testing.TB, name string, got, want map[string]float64) {
	tb.Helper()
	for _, k := range slices.Sorted(maps.Keys(want)) {
		if g, ok := got[k]; !ok {
			tb.Errorf("%s{%s} missing, want %v", name, k, want[k])
		} else if g != want[k] {
			tb.Errorf("%s{%s} = %v, want %v", name, k, g, want[k])
		}
	}
	for _, k := range slices.Sorted(maps.Keys(got)) {
		if _, ok := want[k]; !ok {
			tb.Errorf("%s{%s} = %v, not expected", name, k, got[k])
		}
	}
}

func TestMetrics_Scripted(t *testing.T) {
	s := mtNewServer(t)
	want := func(rec *httptest.ResponseRecorder, code int) {
		t.Helper()
		if rec.Code != code {
			t.Fatalf("status = %d, want %d; body: %s", rec.Code, code, rec.Body)
		}
	}
	for range 3 {
		want(s.do(t, http.MethodGet, "/health", ""), http.StatusOK)
	}
	for i := range 2 {
		want(s.do(t, http.MethodPost, "/products", fmt.Sprintf(`{"sku":"M-%d","name":"pen","price_cents":150}`, i+1)), http.StatusCreated)
	}
	for i := range 4 {
		want(s.do(t, http.MethodGet, fmt.Sprintf("/products/%d", i%2+1), ""), http.StatusOK)
	}
	want(s.do(t, http.MethodGet, "/products/999", ""), http.StatusNotFound)
	want(s.do(t, http.MethodGet, "/no/such/path", ""), http.StatusNotFound)

	fams := s.scrape(t)

	mtDiff(t, "http_requests_total", mtSeries(fams, "http_requests_total"), map[string]float64{
		mtReq("GET", "GET /health", "200"):        3,
		mtReq("POST", "POST /products", "201"):    2,
		mtReq("GET", "GET /products/{id}", "200"): 4,
		mtReq("GET", "GET /products/{id}", "404"): 1,
		mtReq("GET", "unmatched", "404"):          1,
	})
	mtDiff(t, "http_request_duration_seconds", mtSeries(fams, "http_request_duration_seconds"), map[string]float64{
		mtDur("GET", "GET /health"):        3,
		mtDur("POST", "POST /products"):    2,
		mtDur("GET", "GET /products/{id}"): 5,
		mtDur("GET", "unmatched"):          1,
	})
	// A write never adds a product to the in-process cache (it only
	// replaces a cached one), so the first read of each of the two products
	// misses and fills it, the next two hit, and the missing id is the third
	// miss. Without Redis nothing asks Redis.
	mtDiff(t, "local_cache_requests_total", mtSeries(fams, "local_cache_requests_total"), map[string]float64{
		`result="hit"`:  2,
		`result="miss"`: 3,
	})
	mtDiff(t, "cache_requests_total", mtSeries(fams, "cache_requests_total"), map[string]float64{
		`result="hit"`: 0, `result="miss"`: 0, `result="error"`: 0, `result="skipped"`: 0,
	})
	mtDiff(t, "products_stored", mtSeries(fams, "products_stored"), map[string]float64{"": 2})
	if got, ok := mtSeries(fams, "circuit_breaker_state")[`name="database_read"`]; !ok || got != 0 {
		t.Errorf(`circuit_breaker_state{name="database_read"} = %v (present %v), want 0`, got, ok)
	}
	for _, pool := range []string{"sqlite_read", "sqlite_write"} {
		if _, ok := mtSeries(fams, "go_sql_open_connections")[`db_name="`+pool+`"`]; !ok {
			t.Errorf(`go_sql_open_connections{db_name=%q} missing; families: %v`, pool, slices.Sorted(maps.Keys(fams)))
		}
	}
	for _, name := range []string{"go_goroutines", "process_resident_memory_bytes", "http_requests_in_flight"} {
		if fams[name] == nil {
			t.Errorf("%s missing from /metrics", name)
		}
	}

	// The scrape counts itself once it has answered.
	if got := mtSeries(s.scrape(t), "http_requests_total")[mtReq("GET", "GET /metrics", "200")]; got != 1 {
		t.Errorf(`http_requests_total{GET /metrics,200} after one scrape = %v, want 1`, got)
	}
}

// TestMetrics_BoundedLabels checks that clients cannot grow the number of
// series: every unmatched path shares one route label, and methods outside
// the standard set share "OTHER".
func TestMetrics_BoundedLabels(t *testing.T) {
	s := mtNewServer(t)
	s.do(t, http.MethodGet, "/health", "")
	count := func() (requests, durations int) {
		fams := s.scrape(t)
		return len(mtSeries(fams, "http_requests_total")), len(mtSeries(fams, "http_request_duration_seconds"))
	}
	// The first scrape adds its own series; take the baseline after it.
	count()
	req0, dur0 := count()

	for range 1000 {
		var b [8]byte
		rand.Read(b[:])
		if rec := s.do(t, http.MethodGet, "/"+hex.EncodeToString(b[:])+"/x", ""); rec.Code != http.StatusNotFound {
			t.Fatalf("GET random path status = %d, want 404", rec.Code)
		}
	}
	req1, dur1 := count()
	if req1 != req0+1 || dur1 != dur0+1 {
		t.Errorf("after 1000 random paths: http_requests_total series %d -> %d, duration series %d -> %d; want +1 each",
			req0, req1, dur0, dur1)
	}
	fams := s.scrape(t)
	if got := mtSeries(fams, "http_requests_total")[mtReq("GET", "unmatched", "404")]; got != 1000 {
		t.Errorf(`http_requests_total{GET,unmatched,404} = %v, want 1000`, got)
	}

	// Weird methods on a real path (405 from the mux) and on no path (404):
	// two OTHER series, whatever the methods.
	req1, dur1 = count()
	for i := range 200 {
		var b [4]byte
		rand.Read(b[:])
		m := "X" + strings.ToUpper(hex.EncodeToString(b[:]))
		target := "/health"
		if i%2 == 1 {
			target = "/nowhere"
		}
		s.do(t, m, target, "")
	}
	for _, m := range []string{"PROPFIND", "BREW", "TRACE", "CONNECT", "get", "Post"} {
		s.do(t, m, "/products", "")
	}
	fams = s.scrape(t)
	methods := map[string]bool{}
	for _, m := range fams["http_requests_total"].GetMetric() {
		for _, l := range m.GetLabel() {
			if l.GetName() == "method" {
				methods[l.GetValue()] = true
			}
		}
	}
	for m := range methods {
		switch m {
		case "GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS", "OTHER":
		default:
			t.Errorf("http_requests_total has method label %q, want only standard methods and OTHER", m)
		}
	}
	reqs := mtSeries(fams, "http_requests_total")
	if got := reqs[mtReq("OTHER", "unmatched", "405")] + reqs[mtReq("OTHER", "unmatched", "404")]; got != 206 {
		t.Errorf("OTHER requests counted = %v, want 206; series: %v", got, reqs)
	}
	// The scrape before the loop was the first at this count; the new
	// series are the OTHER ones (405 and 404), and nothing else.
	req2, dur2 := len(reqs), len(mtSeries(fams, "http_request_duration_seconds"))
	if req2-req1 > 2 || dur2-dur1 > 1 {
		t.Errorf("weird methods: http_requests_total series %d -> %d (want at most +2), duration series %d -> %d (want at most +1); series: %v",
			req1, req2, dur1, dur2, slices.Sorted(maps.Keys(reqs)))
	}
}

// TestMetrics_promtool runs Prometheus's own linter, `promtool check
// metrics`, on a scrape taken after a scripted set of requests, so every
// series family has samples. It runs when PROMTOOL names the binary (CI sets
// it); a finding or a non-zero exit fails it.
func TestMetrics_promtool(t *testing.T) {
	promtool := os.Getenv("PROMTOOL")
	if promtool == "" {
		t.Skip("PROMTOOL is not set")
	}
	s := mtNewServer(t)
	script := []struct {
		method, target, body string
		want                 int
	}{
		{"POST", "/products", `{"sku":"PT-1","name":"pen","price_cents":100,"stock":2}`, 201},
		{"POST", "/products", `{"sku":"PT-1","name":"pen","price_cents":100}`, 409},
		{"GET", "/products/1", "", 200},
		{"GET", "/products/99", "", 404},
		{"GET", "/products?limit=1&sort=-name", "", 200},
		{"GET", "/products?limit=0", "", 400},
		{"PATCH", "/products/1", `{"stock":5}`, 200},
		{"POST", "/products/1/stock/adjustments", `{"delta":-1}`, 200},
		{"PUT", "/products/1/stock", `{"stock":1}`, 200},
		{"DELETE", "/products/1", "", 204},
		{"GET", "/ready", "", 200},
		{"GET", "/nowhere", "", 404},
		{"BREW", "/products", "", 405},
	}
	for _, r := range script {
		if rec := s.do(t, r.method, r.target, r.body); rec.Code != r.want {
			t.Fatalf("%s %s status = %d, want %d; body: %s", r.method, r.target, rec.Code, r.want, rec.Body)
		}
	}
	// The relay's series (registered when AMQP_URL is set), with samples.
	rm := s.svc.metrics.relay()
	rm.published.Add(3)
	rm.confirm.Observe(0.004)
	rm.returned.Inc()
	rm.leader.Set(1)
	rec := s.do(t, http.MethodGet, "/metrics", "")
	if rec.Code != http.StatusOK {
		t.Fatalf("GET /metrics status = %d, want 200", rec.Code)
	}
	cmd := exec.CommandContext(t.Context(), promtool, "check", "metrics")
	cmd.Stdin = bytes.NewReader(rec.Body.Bytes())
	out, err := cmd.CombinedOutput()
	if err != nil || len(bytes.TrimSpace(out)) > 0 {
		t.Errorf("promtool check metrics: %v\n%s", err, out)
	}
}
