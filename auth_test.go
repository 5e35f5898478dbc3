package main

import (
	"bytes"
	"context"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net/http"
	"net/http/httptest"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/google/go-cmp/cmp"
	"github.com/prometheus/client_golang/prometheus"
)

// addTestCredential adds a credential named name with scopes s for token
// to ts, as a line of the tokens file would.
func addTestCredential(tb testing.TB, ts *tokenSet, name string, s scope, token string) {
	tb.Helper()
	sum := sha256.Sum256([]byte(token))
	creds := append([]credential(nil), *ts.creds.Load()...)
	creds = append(creds, credential{principal: principal{Name: name, Scopes: s, key: name}, digest: sum})
	ts.creds.Store(&creds)
}

// digestOf is the sha256:<hex> field of a tokens-file line for token.
func digestOf(token string) string {
	sum := sha256.Sum256([]byte(token))
	return "sha256:" + hex.EncodeToString(sum[:])
}

// writeTokensFile writes lines to a tokens file in dir and returns its path.
func writeTokensFile(tb testing.TB, path string, lines ...string) string {
	tb.Helper()
	if err := os.WriteFile(path, []byte(strings.Join(lines, "\n")+"\n"), 0o600); err != nil {
		tb.Fatal(err)
	}
	return path
}

// routeScopes is the scope each route of addRoutes needs; a route not
// listed is anonymous.
var routeScopes = map[string]scope{
	"POST /products":                        scopeCatalogWrite,
	"PUT /products/{id}":                    scopeCatalogWrite,
	"PATCH /products/{id}":                  scopeCatalogWrite,
	"DELETE /products/{id}":                 scopeCatalogWrite,
	"PUT /products/{id}/stock":              scopeStockWrite,
	"POST /products/{id}/stock/adjustments": scopeStockWrite,
	"POST /reservations":                    scopeReservationsWrite,
	"POST /reservations/{id}/confirm":       scopeReservationsWrite,
	"POST /reservations/{id}/release":       scopeReservationsWrite,
	"GET /reservations":                     scopeReservationsRead,
	"GET /reservations/{id}":                scopeReservationsRead,
	"GET /events":                           scopeEventsRead,
	"POST /admin/backups":                   scopeAdmin,
	"GET /admin/backups":                    scopeAdmin,
	"GET /admin/backups/{name}":             scopeAdmin,
	"DELETE /admin/backups/{name}":          scopeAdmin,
}

// TestRequireScope_everyRoute sends every route of addRoutes a well-formed
// request with no credential, a wrong token, a credential of each scope
// alone and an admin credential, and checks the answer: 401, 403 naming
// the scope, or through to the handler; and that a refusal changed
// nothing (the change feed's head stays where it was).
func TestRequireScope_everyRoute(t *testing.T) {
	dir := t.TempDir()
	lines := []string{"# one credential per scope, and an administrator", ""}
	for _, n := range scopeNames {
		lines = append(lines, fmt.Sprintf("only-%s %s %s", strings.ReplaceAll(n.name, ":", "-"), n.name, digestOf("tok-"+n.name)))
	}
	ts := newTokenSet(nil)
	if err := ts.useFile(writeTokensFile(t, filepath.Join(dir, "tokens"), lines...)); err != nil {
		t.Fatal(err)
	}
	store, err := openSQLite(t.Context(), StoreConfig{Path: filepath.Join(dir, "products.db")})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { store.Close() })
	m := newMetrics(prometheus.NewRegistry())
	life := &lifecycle{}
	life.started.Store(true)
	h := newServer(serverDeps{svc: NewProductService(store, ServiceConfig{Metrics: m}), log: slog.New(slog.DiscardHandler),
		metrics: m, tokens: ts, life: life, serveMetrics: true, streams: newStreamSlots(4)})

	send := func(method, target, body, token string) *httptest.ResponseRecorder {
		t.Helper()
		var r io.Reader
		if body != "" {
			r = strings.NewReader(body)
		}
		req := httptest.NewRequest(method, target, r)
		if body != "" {
			req.Header.Set("Content-Type", "application/json")
		}
		if token != "" {
			req.Header.Set("Authorization", "Bearer "+token)
		}
		rec := httptest.NewRecorder()
		h.ServeHTTP(rec, req)
		return rec
	}
	admin := "tok-admin"
	var resID string
	for i := range 40 {
		if rec := send("POST", "/products", fmt.Sprintf(`{"sku":"S-%d","name":"pen","price_cents":1,"stock":100}`, i), admin); rec.Code != http.StatusCreated {
			t.Fatalf("seed: %d %s", rec.Code, rec.Body)
		}
	}
	rec := send("POST", "/reservations", `{"reference":"o-1","lines":[{"product_id":1,"quantity":1}]}`, admin)
	if rec.Code != http.StatusCreated {
		t.Fatalf("seed reservation: %d %s", rec.Code, rec.Body)
	}
	var res struct{ ID string }
	json.Unmarshal(rec.Body.Bytes(), &res)
	resID = res.ID

	// A request each route answers with something other than 401 or 403
	// when let through; the product ids differ so that one credential's
	// delete does not turn the next one's request into a 404.
	next := 10
	product := func() string { next++; return fmt.Sprint(next) }
	request := func(route string) (method, target, body string) {
		method, path, _ := strings.Cut(route, " ")
		switch route {
		case "POST /products":
			return method, path, fmt.Sprintf(`{"sku":"N-%d","name":"pen","price_cents":1}`, next+1000)
		case "PUT /products/{id}":
			id := product()
			return method, "/products/" + id, fmt.Sprintf(`{"sku":"S-%s","name":"pencil","price_cents":2}`, id)
		case "PATCH /products/{id}":
			return method, "/products/" + product(), `{"name":"patched"}`
		case "DELETE /products/{id}":
			return method, "/products/" + product(), ""
		case "PUT /products/{id}/stock":
			return method, "/products/" + product() + "/stock", `{"stock":7}`
		case "POST /products/{id}/stock/adjustments":
			return method, "/products/" + product() + "/stock/adjustments", `{"delta":1}`
		case "POST /reservations":
			return method, path, fmt.Sprintf(`{"reference":"o-2","lines":[{"product_id":%s,"quantity":1}]}`, product())
		case "GET /reservations":
			return method, "/reservations?reference=o-1", ""
		case "GET /events":
			return method, "/events?limit=1", ""
		}
		return method, strings.ReplaceAll(strings.ReplaceAll(path, "{id}", "1"), "/reservations/1", "/reservations/"+resID), ""
	}

	routes := oaSourceRoutes(t)
	for route := range routeScopes {
		if !strings.Contains(strings.Join(routes, "\n"), route) {
			t.Errorf("routeScopes names %s, which addRoutes does not have", route)
		}
	}
	type who struct{ name, token string }
	creds := []who{{"no credential", ""}, {"wrong token", "tok-nope"}}
	for _, n := range scopeNames {
		creds = append(creds, who{n.name, "tok-" + n.name})
	}
	for _, route := range routes {
		need, secured := routeScopes[route]
		for _, c := range creds {
			method, target, body := request(route)
			head, err := store.FeedHead(t.Context())
			if err != nil {
				t.Fatal(err)
			}
			rec := send(method, target, body, c.token)
			s, _ := scopeNamed(c.name)
			switch {
			case !secured:
				if rec.Code == http.StatusUnauthorized || rec.Code == http.StatusForbidden {
					t.Errorf("%s with %s = %d, want the anonymous answer", route, c.name, rec.Code)
				}
				continue
			case c.token == "" || c.token == "tok-nope":
				if rec.Code != http.StatusUnauthorized || !strings.HasPrefix(rec.Header().Get("WWW-Authenticate"), "Bearer ") {
					t.Errorf("%s with %s = %d (WWW-Authenticate %q), want 401 with a Bearer challenge", route, c.name, rec.Code, rec.Header().Get("WWW-Authenticate"))
				}
			case s.allows(need):
				// 501: the backups of a store that has none of its own
				// (this server is given none) is an answer past the check.
				if rec.Code == http.StatusUnauthorized || rec.Code == http.StatusForbidden || rec.Code >= 500 && rec.Code != http.StatusNotImplemented {
					t.Errorf("%s with %s = %d %s, want it let through", route, c.name, rec.Code, rec.Body)
				}
				continue
			default:
				wantChallenge := fmt.Sprintf(`Bearer realm="productsvc", error="insufficient_scope", scope="%s"`, need)
				var p problem
				json.Unmarshal(rec.Body.Bytes(), &p)
				if rec.Code != http.StatusForbidden || rec.Header().Get("WWW-Authenticate") != wantChallenge ||
					p.Type != "/problems/insufficient-scope" || p.Errors["scope"] != need.String()+" is required" {
					t.Errorf("%s with %s = %d (WWW-Authenticate %q) %s, want 403 insufficient-scope with %q",
						route, c.name, rec.Code, rec.Header().Get("WWW-Authenticate"), rec.Body, wantChallenge)
				}
			}
			if after, _ := store.FeedHead(t.Context()); after != head {
				t.Errorf("%s with %s was refused %d but the feed moved from %d to %d", route, c.name, rec.Code, head, after)
			}
		}
	}
}

func TestParseTokensFile(t *testing.T) {
	d1, d2 := digestOf("one"), digestOf("two")
	good := strings.Join([]string{
		"# comment",
		"",
		"  checkout   reservations:write,reservations:read  " + d1 + "  max_held=50",
		"ops admin sha256:" + strings.ToUpper(strings.TrimPrefix(d2, "sha256:")),
	}, "\n")
	creds, err := parseTokensFile(strings.NewReader(good))
	if err != nil {
		t.Fatalf("parseTokensFile: %v", err)
	}
	if len(creds) != 2 || creds[0].Name != "checkout" || creds[0].Scopes != scopeReservationsWrite|scopeReservationsRead ||
		creds[0].MaxHeld != 50 || creds[1].Name != "ops" || creds[1].Scopes != scopeAdmin || creds[1].digest != sha256.Sum256([]byte("two")) {
		t.Errorf("parseTokensFile = %+v", creds)
	}

	tests := []struct{ name, text, want string }{
		{"too few fields", "a admin", "line 1: too few fields"},
		{"unknown scope", "# x\na catalog:read " + d1, `line 2: unknown scope "catalog:read"`},
		{"empty scope", "a admin, " + d1, `unknown scope ""`},
		{"bad name", "a/b admin " + d1, "line 1: the name"},
		{"token in clear", "a admin one", "line 1: the third field must be sha256:"},
		{"short digest", "a admin " + d1[:40], "line 1: the third field"},
		{"duplicate name", "a admin " + d1 + "\na admin " + d2, `line 2: name "a" is already used on line 1`},
		{"duplicate digest", "a admin " + d1 + "\nb admin " + d1, "line 2: the digest is already used on line 1"},
		{"bad max_held", "a admin " + d1 + " max_held=0", "line 1: max_held must be"},
		{"unknown option", "a admin " + d1 + " ttl=5", `line 1: unknown option "ttl"`},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			_, err := parseTokensFile(strings.NewReader(tt.text))
			if err == nil || !strings.Contains(err.Error(), tt.want) {
				t.Fatalf("parseTokensFile(%q) error = %v, want one containing %q", tt.text, err, tt.want)
			}
			for _, d := range []string{d1, d2} {
				if h := strings.TrimPrefix(d, "sha256:"); strings.Contains(strings.ToLower(err.Error()), h[:16]) {
					t.Errorf("error %q shows a digest", err)
				}
			}
		})
	}
}

// TestTokenSet_watch checks the reload path SIGHUP triggers and the one a
// change to the file triggers: a new file replaces the credentials (API_TOKEN's
// stay), and one that does not parse leaves them as they were and says
// why, by line number and without the digest.
func TestTokenSet_watch(t *testing.T) {
	path := filepath.Join(t.TempDir(), "tokens")
	writeTokensFile(t, path, "alice catalog:write "+digestOf("a-token"))
	ts := newTokenSet([]string{"static"})
	if err := ts.useFile(path); err != nil {
		t.Fatal(err)
	}
	var logs syncBuffer
	log := slog.New(slog.NewJSONHandler(&logs, nil))
	watch := func(interval time.Duration) (chan os.Signal, func()) {
		hup := make(chan os.Signal, 1)
		ctx, cancel := context.WithCancel(t.Context())
		done := make(chan struct{})
		go func() { defer close(done); ts.watch(ctx, hup, interval, log) }()
		return hup, func() { cancel(); <-done }
	}
	// First only the signal: the file is not looked at in the meantime.
	hup, stop := watch(time.Hour)
	defer func() { stop() }()

	accepts := func(token string) (string, bool) {
		r := httptest.NewRequest("GET", "/", nil)
		r.Header.Set("Authorization", "Bearer "+token)
		p, ok := ts.match(r)
		return p.Name, ok
	}
	if name, ok := accepts("a-token"); !ok || name != "alice" {
		t.Fatalf("a-token = %q, %v; want alice", name, ok)
	}

	// SIGHUP.
	writeTokensFile(t, path, "bobby catalog:write "+digestOf("b-token"))
	hup <- syscallSIGHUP
	waitFor(t, 10*time.Second, "bobby after SIGHUP", func() bool { _, ok := accepts("b-token"); return ok })
	if _, ok := accepts("a-token"); ok {
		t.Error("a-token is still accepted after the file dropped it")
	}
	if name, ok := accepts("static"); !ok || name != apiTokenName {
		t.Errorf("API_TOKEN = %q, %v after a reload; want %s", name, ok, apiTokenName)
	}

	// A file that does not parse keeps the previous set.
	bad := digestOf("c-token")
	writeTokensFile(t, path, "# header", "carol catalog:write "+bad, "dave catalog:writ "+digestOf("d-token"))
	hup <- syscallSIGHUP
	waitFor(t, 10*time.Second, "the refusal in the log", func() bool { return strings.Contains(logs.String(), "not reloaded") })
	if _, ok := accepts("b-token"); !ok {
		t.Error("b-token was dropped by a file that does not parse")
	}
	if _, ok := accepts("c-token"); ok {
		t.Error("c-token accepted from a file that does not parse")
	}
	if l := logs.String(); !strings.Contains(l, "line 3") || strings.Contains(l, strings.TrimPrefix(bad, "sha256:")[:16]) {
		t.Errorf("log %s: want the line number and no digest", l)
	}

	// A change to the file, without a signal.
	stop()
	_, stop = watch(10 * time.Millisecond)
	writeTokensFile(t, path, "erin events:read "+digestOf("e-token"), "# a longer file")
	waitFor(t, 10*time.Second, "erin after the file changed", func() bool { _, ok := accepts("e-token"); return ok })
	// The new set is in use before the reload is logged; wait for the line.
	waitFor(t, 10*time.Second, "a reload for the changed file in the log", func() bool {
		return bytes.Contains([]byte(logs.String()), []byte(`"why":"file changed"`))
	})
}

// TestStore_actor checks, on both engines, that each write records its
// actor on its change-feed events, that a reservation records who holds
// it, and that an expiry, which nobody asked for, records none.
func TestStore_actor(t *testing.T) {
	forEachStore(t, func(t *testing.T, s productStore) {
		ctx := t.Context()
		head, err := s.FeedHead(ctx)
		if err != nil {
			t.Fatal(err)
		}
		p, _, err := s.Create(ctx, "editor", Product{SKU: "ACT-1", Name: "pen", Currency: "USD", Stock: 5}, nil)
		if err != nil {
			t.Fatal(err)
		}
		if _, _, err := s.AdjustStock(ctx, "stocker", p.ID, 1, nil, nil); err != nil {
			t.Fatal(err)
		}
		held, err := s.Reserve(ctx, Reservation{ID: newReservationID(), Reference: "o-1", Lines: []ReservationLine{{ProductID: p.ID, Quantity: 2}},
			CreatedBy: "checkout"}, time.Minute, 0, nil)
		if err != nil {
			t.Fatal(err)
		}
		if _, err := s.Transition(ctx, "clerk", held.Reservation.ID, StateReleased); err != nil {
			t.Fatal(err)
		}
		if _, _, err := s.Update(ctx, "", p.ID, ProductUpdate{Patch: ProductPatch{Name: optional[string]{Set: true, Value: "ink"}}}); err != nil {
			t.Fatal(err)
		}
		if _, err := s.Delete(ctx, "editor", p.ID, nil); err != nil {
			t.Fatal(err)
		}
		got, err := s.Reservation(ctx, held.Reservation.ID)
		if err != nil || got.CreatedBy != "checkout" {
			t.Errorf("Reservation(%s) = created_by %q, %v; want checkout", held.Reservation.ID, got.CreatedBy, err)
		}
		if held.Reservation.CreatedBy != "checkout" {
			t.Errorf("Reserve returned created_by %q, want checkout", held.Reservation.CreatedBy)
		}
		var es []Event
		waitFor(t, 10*time.Second, "the events sequenced", func() bool {
			es, err = s.Events(ctx, head, 100)
			return err == nil && len(es) == 8
		})
		var actors []string
		for _, e := range es {
			actors = append(actors, e.Type+" "+e.Actor)
		}
		want := []string{"product.created editor", "stock.changed stocker", "stock.changed checkout", "reservation.held checkout",
			"stock.changed clerk", "reservation.released clerk", "product.updated ", "product.deleted editor"}
		if diff := cmp.Diff(want, actors); diff != "" {
			t.Errorf("event actors (-want +got):\n%s", diff)
		}
	})
}

// TestActor_recorded checks, through the handler, that a write's actor is
// the credential's name in the access log, in GET /events and on the
// reservation, and that no token appears in any of them.
func TestActor_recorded(t *testing.T) {
	dir := t.TempDir()
	ts := newTokenSet([]string{"static-token-1"})
	if err := ts.useFile(writeTokensFile(t, filepath.Join(dir, "tokens"),
		"editor catalog:write "+digestOf("editor-token-1"),
		"checkout reservations:write,reservations:read "+digestOf("checkout-token-1"),
		"feeder events:read "+digestOf("feeder-token-1"))); err != nil {
		t.Fatal(err)
	}
	store, err := openSQLite(t.Context(), StoreConfig{Path: filepath.Join(dir, "products.db")})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { store.Close() })
	var logs syncBuffer
	m := newMetrics(prometheus.NewRegistry())
	life := &lifecycle{}
	life.started.Store(true)
	h := newServer(serverDeps{svc: NewProductService(store, ServiceConfig{Metrics: m}), log: slog.New(slog.NewJSONHandler(&logs, nil)),
		metrics: m, tokens: ts, life: life, streams: newStreamSlots(4)})
	send := func(method, target, body, token string) *httptest.ResponseRecorder {
		t.Helper()
		var r io.Reader
		if body != "" {
			r = strings.NewReader(body)
		}
		req := httptest.NewRequest(method, target, r)
		req.Header.Set("Content-Type", "application/json")
		req.Header.Set("Authorization", "Bearer "+token)
		rec := httptest.NewRecorder()
		h.ServeHTTP(rec, req)
		return rec
	}
	if rec := send("POST", "/products", `{"sku":"A-1","name":"pen","price_cents":1,"stock":3}`, "editor-token-1"); rec.Code != http.StatusCreated {
		t.Fatalf("create: %d %s", rec.Code, rec.Body)
	}
	if rec := send("POST", "/products/1/stock/adjustments", `{"delta":1}`, "static-token-1"); rec.Code != http.StatusOK {
		t.Fatalf("adjust: %d %s", rec.Code, rec.Body)
	}
	rec := send("POST", "/reservations", `{"reference":"o-1","lines":[{"product_id":1,"quantity":1}]}`, "checkout-token-1")
	var res Reservation
	if err := json.Unmarshal(rec.Body.Bytes(), &res); rec.Code != http.StatusCreated || err != nil || res.CreatedBy != "checkout" {
		t.Fatalf("reserve: %d %s; want 201 with created_by checkout", rec.Code, rec.Body)
	}
	rec = send("GET", "/reservations/"+res.ID, "", "checkout-token-1")
	if !strings.Contains(rec.Body.String(), `"created_by":"checkout"`) {
		t.Errorf("GET /reservations/%s = %s, want created_by checkout", res.ID, rec.Body)
	}
	rec = send("GET", "/events", "", "feeder-token-1")
	var page struct {
		Events []struct {
			Type  string
			Actor *string
		}
	}
	if err := json.Unmarshal(rec.Body.Bytes(), &page); err != nil || rec.Code != http.StatusOK {
		t.Fatalf("GET /events = %d %s", rec.Code, rec.Body)
	}
	var got []string
	for _, e := range page.Events {
		got = append(got, e.Type+" "+*e.Actor)
	}
	want := []string{"product.created editor", "stock.changed api-token", "stock.changed checkout", "reservation.held checkout"}
	if diff := cmp.Diff(want, got); diff != "" {
		t.Errorf("GET /events actors (-want +got):\n%s", diff)
	}

	var logged []string
	for _, l := range logs.logLines() {
		if l["msg"] == "request" {
			actor, _ := l["actor"].(string)
			logged = append(logged, fmt.Sprint(l["method"], " ", l["route"], " ", actor))
		}
	}
	wantLog := []string{"POST POST /products editor", "POST POST /products/{id}/stock/adjustments api-token",
		"POST POST /reservations checkout", "GET GET /reservations/{id} checkout", "GET GET /events feeder"}
	if diff := cmp.Diff(wantLog, logged); diff != "" {
		t.Errorf("access log actors (-want +got):\n%s", diff)
	}
	for _, tok := range []string{"editor-token-1", "checkout-token-1", "feeder-token-1", "static-token-1"} {
		if strings.Contains(logs.String(), tok) {
			t.Errorf("the log shows the token %s", tok)
		}
	}
}

func TestTrustedProxies_client(t *testing.T) {
	tp, err := parseTrustedProxies("10.0.0.0/8, 192.168.1.1, fd00::/8")
	if err != nil {
		t.Fatal(err)
	}
	tests := []struct {
		name, peer string
		xff        []string
		want       string
	}{
		{"no proxies trusted: header ignored", "203.0.113.9:5000", []string{"198.51.100.1"}, "203.0.113.9"},
		{"untrusted peer: header ignored", "203.0.113.9:5000", []string{"198.51.100.1"}, "203.0.113.9"},
		{"trusted peer, one hop", "10.1.2.3:5000", []string{"198.51.100.1"}, "198.51.100.1"},
		{"forged left part is skipped", "10.1.2.3:5000", []string{"1.2.3.4, 198.51.100.1"}, "198.51.100.1"},
		{"chain of trusted proxies", "10.1.2.3:5000", []string{"198.51.100.1, 192.168.1.1", "10.9.9.9"}, "198.51.100.1"},
		{"trusted peer without the header", "10.1.2.3:5000", nil, "10.1.2.3"},
		{"garbage hop stops at the proxy", "10.1.2.3:5000", []string{"198.51.100.1, not-an-ip"}, "10.1.2.3"},
		{"all hops trusted: the leftmost", "10.1.2.3:5000", []string{"10.0.0.1, 10.0.0.2"}, "10.0.0.1"},
		{"IPv6 proxy", "[fd00::1]:5000", []string{"2001:db8::7"}, "2001:db8::7"},
		{"IPv4-mapped peer", "[::ffff:10.1.2.3]:5000", []string{"198.51.100.1"}, "198.51.100.1"},
	}
	for i, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			r := httptest.NewRequest("GET", "/", nil)
			r.RemoteAddr = tt.peer
			for _, v := range tt.xff {
				r.Header.Add("X-Forwarded-For", v)
			}
			p := tp
			if i == 0 {
				p = nil
			}
			if got := p.client(r); got != tt.want {
				t.Errorf("client(peer %s, X-Forwarded-For %q) = %s, want %s", tt.peer, tt.xff, got, tt.want)
			}
		})
	}
	if _, err := parseTrustedProxies("10.0.0.0/33"); err == nil {
		t.Error("parseTrustedProxies(10.0.0.0/33) = nil error, want one")
	}
}

// TestTrustedProxies_limits checks that failed authentication is limited
// per client behind a trusted proxy, and per peer when the peer is not
// trusted however it fills X-Forwarded-For.
func TestTrustedProxies_limits(t *testing.T) {
	tp, _ := parseTrustedProxies("10.0.0.0/8")
	ts := newTokenSet([]string{"tok"})
	m := newMetrics(prometheus.NewRegistry())
	var logs syncBuffer
	h := newServer(serverDeps{svc: NewProductService(newTestStore(t), ServiceConfig{Metrics: m}), log: slog.New(slog.NewJSONHandler(&logs, nil)),
		metrics: m, tokens: ts, life: &lifecycle{}, limiter: newRateLimiter(0, 0, ts), proxies: tp})
	fail := func(peer, xff string) int {
		r := httptest.NewRequest("DELETE", "/products/1", nil)
		r.RemoteAddr = peer + ":4000"
		r.Header.Set("Authorization", "Bearer wrong")
		r.Header.Set("X-Forwarded-For", xff)
		rec := httptest.NewRecorder()
		h.ServeHTTP(rec, r)
		return rec.Code
	}
	for range authFailureBurst {
		if code := fail("10.0.0.1", "198.51.100.1"); code != http.StatusUnauthorized {
			t.Fatalf("failure within the burst = %d, want 401", code)
		}
	}
	if code := fail("10.0.0.1", "198.51.100.1"); code != http.StatusTooManyRequests {
		t.Errorf("client 198.51.100.1 past its burst = %d, want 429", code)
	}
	if code := fail("10.0.0.1", "198.51.100.2"); code != http.StatusUnauthorized {
		t.Errorf("another client behind the same proxy = %d, want 401 (its own budget)", code)
	}
	// An untrusted peer cannot buy fresh budgets by varying the header.
	for i := range authFailureBurst {
		fail("203.0.113.5", fmt.Sprintf("198.51.100.%d", 100+i))
	}
	if code := fail("203.0.113.5", "198.51.100.250"); code != http.StatusTooManyRequests {
		t.Errorf("untrusted peer with a new X-Forwarded-For = %d, want 429", code)
	}
	if !strings.Contains(logs.String(), `"client_ip":"198.51.100.2"`) || !strings.Contains(logs.String(), `"client_ip":"203.0.113.5"`) {
		t.Errorf("access log does not show the resolved client addresses:\n%.2000s", logs.String())
	}
}

// TestStore_holdCap checks, on both engines, that a holder's cap on units
// in open reservations is kept: by concurrent holds too, counting neither
// released holds nor another holder's, and refusing with nothing held.
func TestStore_holdCap(t *testing.T) {
	forEachStore(t, func(t *testing.T, s productStore) {
		ctx := t.Context()
		p, _, err := s.Create(ctx, "", Product{SKU: "CAP-1", Name: "pen", Currency: "USD", Stock: 1000}, nil)
		if err != nil {
			t.Fatal(err)
		}
		hold := func(who string, qty, maxHeld int64) (Reserved, error) {
			return s.Reserve(ctx, Reservation{ID: newReservationID(), Reference: "o", CreatedBy: who,
				Lines: []ReservationLine{{ProductID: p.ID, Quantity: qty}}}, time.Minute, maxHeld, nil)
		}
		const capUnits = 5
		var wg sync.WaitGroup
		var ok, refused atomic.Int64
		for range 20 {
			wg.Go(func() {
				_, err := hold("shop", 1, capUnits)
				switch {
				case err == nil:
					ok.Add(1)
				case errors.Is(err, ErrHoldCap):
					refused.Add(1)
				default:
					t.Errorf("Reserve: %v", err)
				}
			})
		}
		wg.Wait()
		if ok.Load() != capUnits || refused.Load() != 20-capUnits {
			t.Fatalf("20 concurrent holds of 1 under a cap of %d: %d held, %d refused; want %d and %d",
				capUnits, ok.Load(), refused.Load(), capUnits, 20-capUnits)
		}
		got, _ := s.Get(ctx, p.ID)
		if got.Reserved != capUnits {
			t.Errorf("reserved = %d after the refusals, want %d", got.Reserved, capUnits)
		}
		var capErr *HoldCapError
		if _, err := hold("shop", 2, capUnits); !errors.As(err, &capErr) || *capErr != (HoldCapError{Cap: capUnits, Held: capUnits, Requested: 2}) {
			t.Errorf("hold past the cap = %v, want HoldCapError{5 5 2}", err)
		}
		if _, err := hold("other", capUnits, capUnits); err != nil {
			t.Errorf("another holder's hold = %v, want it held (caps are per holder)", err)
		}
		if _, err := hold("shop", 100, 0); err != nil {
			t.Errorf("a hold without a cap = %v, want it held", err)
		}
		// Releasing frees room under the cap.
		rs, err := s.ReservationsByReference(ctx, "o", 100)
		if err != nil {
			t.Fatal(err)
		}
		for _, r := range rs {
			if r.CreatedBy == "shop" && r.Lines[0].Quantity == 1 {
				if _, err := s.Transition(ctx, "shop", r.ID, StateReleased); err != nil {
					t.Fatal(err)
				}
				break
			}
		}
		// shop now holds 4 + 100: one more fits under 105, a second does not.
		if _, err := hold("shop", 1, capUnits+100); err != nil {
			t.Errorf("hold of 1 with 104 held under a cap of 105 = %v, want it held", err)
		}
		if _, err := hold("shop", 1, capUnits+100); !errors.Is(err, ErrHoldCap) {
			t.Errorf("hold of 1 with 105 held under a cap of 105 = %v, want ErrHoldCap", err)
		}
	})
}

// TestHoldCap_tokensFile checks the cap end to end: max_held on a line of
// the tokens file refuses the hold that would pass it with 409
// hold-cap-exceeded, naming the cap, and holds nothing.
func TestHoldCap_tokensFile(t *testing.T) {
	dir := t.TempDir()
	ts := newTokenSet(nil)
	if err := ts.useFile(writeTokensFile(t, filepath.Join(dir, "tokens"),
		"shop reservations:write,catalog:write "+digestOf("shop-token")+" max_held=2")); err != nil {
		t.Fatal(err)
	}
	m := newMetrics(prometheus.NewRegistry())
	store := newTestStore(t)
	h := newServer(serverDeps{svc: NewProductService(store, ServiceConfig{Metrics: m}), log: slog.New(slog.DiscardHandler),
		metrics: m, tokens: ts, life: &lifecycle{}})
	send := func(method, target, body string) *httptest.ResponseRecorder {
		req := httptest.NewRequest(method, target, strings.NewReader(body))
		req.Header.Set("Content-Type", "application/json")
		req.Header.Set("Authorization", "Bearer shop-token")
		rec := httptest.NewRecorder()
		h.ServeHTTP(rec, req)
		return rec
	}
	if rec := send("POST", "/products", `{"sku":"C-1","name":"pen","price_cents":1,"stock":10}`); rec.Code != http.StatusCreated {
		t.Fatalf("create: %d %s", rec.Code, rec.Body)
	}
	if rec := send("POST", "/reservations", `{"reference":"o-1","lines":[{"product_id":1,"quantity":2}]}`); rec.Code != http.StatusCreated {
		t.Fatalf("hold of 2 under a cap of 2: %d %s", rec.Code, rec.Body)
	}
	rec := send("POST", "/reservations", `{"reference":"o-2","lines":[{"product_id":1,"quantity":1}]}`)
	var p problem
	json.Unmarshal(rec.Body.Bytes(), &p)
	if rec.Code != http.StatusConflict || p.Type != "/problems/hold-cap-exceeded" || !strings.Contains(p.Detail, "at most 2 units") {
		t.Errorf("hold past the cap = %d %s, want 409 hold-cap-exceeded naming the cap", rec.Code, rec.Body)
	}
	if got, _ := store.Get(t.Context(), 1); got.Reserved != 2 {
		t.Errorf("reserved = %d after the refusal, want 2", got.Reserved)
	}
}
