package main

import (
	"bufio"
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"go/ast"
	"go/parser"
	"go/token"
	"io"
	"log/slog"
	"maps"
	"net/http"
	"net/http/httptest"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/getkin/kin-openapi/openapi3"
	"github.com/getkin/kin-openapi/openapi3filter"
	"github.com/getkin/kin-openapi/routers"
	"github.com/getkin/kin-openapi/routers/gorillamux"
	"github.com/google/go-cmp/cmp"
)

// oaLoadDoc loads and validates the OpenAPI document the binary embeds.
func oaLoadDoc(tb testing.TB) *openapi3.T {
	tb.Helper()
	loader := openapi3.NewLoader()
	doc, err := loader.LoadFromData(openAPIDocument)
	if err != nil {
		tb.Fatalf("load openapi.json: %v", err)
	}
	if err := doc.Validate(loader.Context); err != nil {
		tb.Fatalf("openapi.json is not a valid OpenAPI document: %v", err)
	}
	return doc
}

func TestOpenAPI_Valid(t *testing.T) {
	doc := oaLoadDoc(t)
	if !doc.IsOpenAPI31OrLater() {
		t.Errorf("openapi = %q, want 3.1.x", doc.OpenAPI)
	}

	s := mtNewServer(t)
	rec := s.do(t, http.MethodGet, "/openapi.json", "")
	if rec.Code != http.StatusOK {
		t.Fatalf("GET /openapi.json status = %d, want 200", rec.Code)
	}
	if ct := rec.Header().Get("Content-Type"); ct != "application/json" {
		t.Errorf("GET /openapi.json Content-Type = %q, want application/json", ct)
	}
	if !bytes.Equal(rec.Body.Bytes(), openAPIDocument) {
		t.Errorf("GET /openapi.json body is not the embedded document")
	}
}

// oaSourceRoutes returns the patterns addRoutes registers, read from the
// source of handler.go: string literals, and "METHOD "+p inside a range over
// a literal list of paths. It fails on a registration it cannot read, so a
// new route cannot slip past the comparison with the document.
func oaSourceRoutes(tb testing.TB) []string {
	tb.Helper()
	fset := token.NewFileSet()
	f, err := parser.ParseFile(fset, "handler.go", nil, 0)
	if err != nil {
		tb.Fatalf("parse handler.go: %v", err)
	}
	var fn *ast.FuncDecl
	for _, d := range f.Decls {
		if d, ok := d.(*ast.FuncDecl); ok && d.Name.Name == "addRoutes" && d.Recv == nil {
			fn = d
		}
	}
	if fn == nil {
		tb.Fatal("handler.go has no func addRoutes")
	}
	muxName := fn.Type.Params.List[0].Names[0].Name

	isRegister := func(n ast.Node) (*ast.CallExpr, bool) {
		call, ok := n.(*ast.CallExpr)
		if !ok {
			return nil, false
		}
		sel, ok := call.Fun.(*ast.SelectorExpr)
		if !ok {
			return nil, false
		}
		x, ok := sel.X.(*ast.Ident)
		return call, ok && x.Name == muxName && (sel.Sel.Name == "Handle" || sel.Sel.Name == "HandleFunc")
	}

	// eval returns the strings expr can be, given the loop variables in env.
	var eval func(e ast.Expr, env map[string][]string) ([]string, bool)
	eval = func(e ast.Expr, env map[string][]string) ([]string, bool) {
		switch e := e.(type) {
		case *ast.BasicLit:
			if e.Kind != token.STRING {
				return nil, false
			}
			s, err := strconv.Unquote(e.Value)
			return []string{s}, err == nil
		case *ast.Ident:
			v, ok := env[e.Name]
			return v, ok
		case *ast.ParenExpr:
			return eval(e.X, env)
		case *ast.BinaryExpr:
			if e.Op != token.ADD {
				return nil, false
			}
			l, ok1 := eval(e.X, env)
			r, ok2 := eval(e.Y, env)
			var out []string
			for _, a := range l {
				for _, b := range r {
					out = append(out, a+b)
				}
			}
			return out, ok1 && ok2
		}
		return nil, false
	}

	var routes []string
	resolved := make(map[*ast.CallExpr]bool)
	var walk func(stmts []ast.Stmt, env map[string][]string)
	walk = func(stmts []ast.Stmt, env map[string][]string) {
		for _, st := range stmts {
			switch st := st.(type) {
			case *ast.ExprStmt:
				if call, ok := isRegister(st.X); ok && len(call.Args) == 2 {
					if pats, ok := eval(call.Args[0], env); ok {
						routes = append(routes, pats...)
						resolved[call] = true
					}
				}
			case *ast.RangeStmt:
				lit, ok := st.X.(*ast.CompositeLit)
				v, ok2 := st.Value.(*ast.Ident)
				if !ok || !ok2 {
					continue
				}
				var vals []string
				for _, el := range lit.Elts {
					s, ok := eval(el, env)
					if !ok {
						vals = nil
						break
					}
					vals = append(vals, s...)
				}
				inner := maps.Clone(env)
				inner[v.Name] = vals
				walk(st.Body.List, inner)
			case *ast.IfStmt:
				// Conditional routes (GET /metrics) are part of the API.
				walk(st.Body.List, env)
				if els, ok := st.Else.(*ast.BlockStmt); ok {
					walk(els.List, env)
				}
			case *ast.BlockStmt:
				walk(st.List, env)
			}
		}
	}
	walk(fn.Body.List, map[string][]string{})

	ast.Inspect(fn.Body, func(n ast.Node) bool {
		if call, ok := isRegister(n); ok && !resolved[call] {
			tb.Errorf("%s: cannot read the pattern of this route registration; teach oaSourceRoutes about it", fset.Position(call.Pos()))
		}
		return true
	})
	slices.Sort(routes)
	return routes
}

// oaDocRoutes returns "METHOD /path" for every operation in doc.
func oaDocRoutes(doc *openapi3.T) []string {
	var routes []string
	for path, item := range doc.Paths.Map() {
		for method := range item.Operations() {
			routes = append(routes, method+" "+path)
		}
	}
	slices.Sort(routes)
	return routes
}

// TestOpenAPI_RoutesMatchAddRoutes fails when a route is added to addRoutes
// and not to the document, or the other way round.
func TestOpenAPI_RoutesMatchAddRoutes(t *testing.T) {
	doc := oaLoadDoc(t)
	src := oaSourceRoutes(t)
	if len(src) < 10 {
		t.Fatalf("found only %d routes in addRoutes: %v", len(src), src)
	}
	if diff := cmp.Diff(src, oaDocRoutes(doc)); diff != "" {
		t.Errorf("routes in addRoutes (-) and openapi.json (+) differ:\n%s", diff)
	}

	// The mux built by addRoutes routes each documented operation to the
	// pattern of the same name: the source reading above is not fooling us.
	mux := http.NewServeMux()
	addRoutes(mux, serverDeps{metrics: newMetrics(nil), tokens: newTokenSet([]string{mtToken}), life: &lifecycle{}, serveMetrics: true})
	for _, route := range oaDocRoutes(doc) {
		method, path, _ := strings.Cut(route, " ")
		req := httptest.NewRequest(method, strings.ReplaceAll(path, "{id}", "1"), nil)
		if _, pattern := mux.Handler(req); pattern != route {
			t.Errorf("mux routes %s %s to pattern %q, want %q", method, req.URL.Path, pattern, route)
		}
	}
}

// oaCase is one request of TestOpenAPI_Responses.
type oaCase struct {
	name   string
	method string
	path   string
	body   string
	header map[string]string // Content-Type defaults to application/json when there is a body
	noAuth bool              // writes carry the valid token unless set
	want   int
	// docMethod is the operation whose responses document this one, for a
	// 405 to a method the path does not have.
	docMethod string
	// problem, if set, is the problem type the answer must name
	// ("insufficient-stock" for /problems/insufficient-stock).
	problem string
	// docRejects marks a request the server refuses for a rule the document
	// states in its schemas: validating it against the document must fail
	// too, so generated clients and testers learn the rule from the document.
	docRejects bool
}

// oaUnexercised lists the documented responses no contract request
// provokes, each with the reason. Anything else declared must be seen.
var oaUnexercised = map[string]string{
	"GET /health 500":         "liveness calls nothing that can fail; 500 is declared because the recovery middleware answers a panic on any route with it",
	"GET /health/live 500":    "as GET /health",
	"GET /livez 500":          "as GET /health",
	"GET /health/startup 500": "as GET /health",
	"GET /openapi.json 500":   "serves an embedded document; 500 only from the recovery middleware",
	"GET /metrics 500":        "promhttp writes its own errors; 500 only from the recovery middleware",
}

// TestOpenAPI_Responses sends real requests over loopback through the real
// handler and validates every response against the document: status,
// headers and body. Successful requests are validated as requests too. It
// then provokes the statuses that need a fault (rate limits, load shedding,
// shutdown, a panicking store), and fails unless every status the document
// declares for every operation was seen (but for oaUnexercised). An
// undeclared status fails the validation of its response.
func TestOpenAPI_Responses(t *testing.T) {
	s := mtNewServer(t)
	// The store's clock runs ahead by skew, so a hold can expire without a
	// wait. Set before the server takes any request.
	var skew atomic.Int64
	s.store.now = func() time.Time { return time.Now().Add(time.Duration(skew.Load())) }
	srv := httptest.NewServer(s.handler)
	t.Cleanup(srv.Close)
	router := oaRouter(t, srv)
	seen := make(oaCoverage)

	product := func(sku string) string {
		return fmt.Sprintf(`{"sku":%q,"name":"pen","description":"blue ink","category":"office","price_cents":150,"currency":"EUR","stock":3}`, sku)
	}
	big := `{"sku":"BIG","name":"` + strings.Repeat("x", maxBodyBytes) + `","price_cents":1}`
	cases := []oaCase{
		{name: "health", method: "GET", path: "/health", want: 200},
		{name: "health live", method: "GET", path: "/health/live", want: 200},
		{name: "livez", method: "GET", path: "/livez", want: 200},
		{name: "ready", method: "GET", path: "/ready", want: 200},
		{name: "health ready", method: "GET", path: "/health/ready", want: 200},
		{name: "readyz", method: "GET", path: "/readyz", want: 200},
		{name: "startup", method: "GET", path: "/health/startup", want: 200},
		{name: "metrics", method: "GET", path: "/metrics", want: 200},
		{name: "openapi", method: "GET", path: "/openapi.json", want: 200},
		{name: "health wrong method", method: "DELETE", path: "/health", want: 405, docMethod: "GET"},
		{name: "health live wrong method", method: "POST", path: "/health/live", want: 405, docMethod: "GET"},
		{name: "livez wrong method", method: "PUT", path: "/livez", want: 405, docMethod: "GET"},
		{name: "ready wrong method", method: "POST", path: "/ready", want: 405, docMethod: "GET"},
		{name: "health ready wrong method", method: "POST", path: "/health/ready", want: 405, docMethod: "GET"},
		{name: "readyz wrong method", method: "POST", path: "/readyz", want: 405, docMethod: "GET"},
		{name: "startup wrong method", method: "POST", path: "/health/startup", want: 405, docMethod: "GET"},
		{name: "metrics wrong method", method: "POST", path: "/metrics", want: 405, docMethod: "GET"},
		{name: "openapi wrong method", method: "PUT", path: "/openapi.json", want: 405, docMethod: "GET"},

		{name: "create", method: "POST", path: "/products", body: product("OA-1"), want: 201},
		{name: "create with idempotency key", method: "POST", path: "/products", body: product("OA-2"),
			header: map[string]string{"Idempotency-Key": "k1", "X-Request-ID": "oa-test.1"}, want: 201},
		{name: "create replayed", method: "POST", path: "/products", body: product("OA-2"),
			header: map[string]string{"Idempotency-Key": "k1"}, want: 201},
		{name: "create key reused with another body", method: "POST", path: "/products", body: product("OA-3"),
			header: map[string]string{"Idempotency-Key": "k1"}, want: 422},
		{name: "create duplicate sku", method: "POST", path: "/products", body: product("OA-1"), want: 409},
		{name: "create without token", method: "POST", path: "/products", body: product("OA-4"), noAuth: true, want: 401},
		{name: "create wrong token", method: "POST", path: "/products", body: product("OA-4"), noAuth: true,
			header: map[string]string{"Authorization": "Bearer nope"}, want: 401},
		{name: "create text/plain", method: "POST", path: "/products", body: product("OA-4"),
			header: map[string]string{"Content-Type": "text/plain"}, want: 415},
		{name: "create malformed JSON", method: "POST", path: "/products", body: `{"sku":`, want: 400},
		{name: "create unknown field", method: "POST", path: "/products", body: `{"sku":"OA-4","name":"pen","price_cents":1,"colour":"red"}`, want: 400},
		{name: "create null stock", method: "POST", path: "/products", body: `{"sku":"OA-5","name":"pen","price_cents":1,"stock":null}`, want: 400, docRejects: true},
		{name: "create null description", method: "POST", path: "/products", body: `{"sku":"OA-5","name":"pen","price_cents":1,"description":null}`, want: 400, docRejects: true},
		{name: "create invalid fields", method: "POST", path: "/products", body: `{"sku":"bad sku","name":" ","price_cents":-1}`, want: 422},
		{name: "create too large", method: "POST", path: "/products", body: big, want: 413},
		{name: "products wrong method", method: "PUT", path: "/products", body: product("OA-4"), want: 405, docMethod: "GET"},

		{name: "list", method: "GET", path: "/products?limit=1", want: 200},
		{name: "list filtered", method: "GET", path: "/products?sort=-name&category=office&in_stock=true&min_price_cents=0&max_price_cents=1000&q=blue", want: 200},
		{name: "list bad limit", method: "GET", path: "/products?limit=0", want: 400},
		{name: "list unknown parameter", method: "GET", path: "/products?categry=x", want: 400},
		{name: "list q without a word", method: "GET", path: "/products?q=%21%21", want: 400, docRejects: true},
		{name: "list bad sort", method: "GET", path: "/products?sort=stock", want: 400, docRejects: true},

		{name: "get", method: "GET", path: "/products/1", want: 200},
		{name: "get not modified", method: "GET", path: "/products/1", header: map[string]string{"If-None-Match": `"1"`}, want: 304},
		{name: "get bad id", method: "GET", path: "/products/abc", want: 400},
		{name: "get missing", method: "GET", path: "/products/999", want: 404},
		{name: "get id zero", method: "GET", path: "/products/0", want: 400, docRejects: true},
		{name: "get id beyond int64", method: "GET", path: "/products/9223372036854775808", want: 400, docRejects: true},
		{name: "product wrong method", method: "POST", path: "/products/1", body: `{}`, want: 405, docMethod: "GET"},

		{name: "replace", method: "PUT", path: "/products/1", body: strings.Replace(product("OA-1"), "150", "175", 1), header: map[string]string{"If-Match": `"1"`}, want: 200},
		{name: "replace stale", method: "PUT", path: "/products/1", body: product("OA-1"), header: map[string]string{"If-Match": `"1"`}, want: 412},
		{name: "replace taken sku", method: "PUT", path: "/products/1", body: product("OA-2"), want: 409},
		{name: "replace missing", method: "PUT", path: "/products/999", body: product("OA-9"), want: 404},
		{name: "replace invalid", method: "PUT", path: "/products/1", body: `{"sku":"OA-1","name":"pen","price_cents":1,"currency":"eur"}`, want: 422},
		{name: "replace without token", method: "PUT", path: "/products/1", body: product("OA-1"), noAuth: true, want: 401},
		{name: "replace too large", method: "PUT", path: "/products/1", body: big, want: 413},
		{name: "replace text/plain", method: "PUT", path: "/products/1", body: product("OA-1"), header: map[string]string{"Content-Type": "text/plain"}, want: 415},
		{name: "replace bad id", method: "PUT", path: "/products/-1", body: product("OA-1"), want: 400, docRejects: true},
		{name: "replace null category", method: "PUT", path: "/products/1", body: `{"sku":"OA-1","name":"pen","price_cents":1,"category":null}`, want: 400, docRejects: true},

		{name: "patch", method: "PATCH", path: "/products/1", body: `{"description":null,"stock":7}`,
			header: map[string]string{"Content-Type": "application/merge-patch+json"}, want: 200},
		{name: "patch stale", method: "PATCH", path: "/products/1", body: `{"stock":8}`, header: map[string]string{"If-Match": `"2"`}, want: 412},
		{name: "patch null name", method: "PATCH", path: "/products/1", body: `{"name":null}`, want: 422, docRejects: true},
		{name: "patch null price", method: "PATCH", path: "/products/1", body: `{"price_cents":null}`, want: 422, docRejects: true},
		{name: "patch wrong type", method: "PATCH", path: "/products/1", body: `{"price_cents":"1"}`, want: 400},
		{name: "patch text/plain", method: "PATCH", path: "/products/1", body: `{"stock":1}`, header: map[string]string{"Content-Type": "text/plain"}, want: 415},
		{name: "patch taken sku", method: "PATCH", path: "/products/1", body: `{"sku":"OA-2"}`, want: 409},
		{name: "patch without token", method: "PATCH", path: "/products/1", body: `{"stock":1}`, noAuth: true, want: 401},
		{name: "patch missing", method: "PATCH", path: "/products/999", body: `{"stock":1}`, want: 404},
		{name: "patch too large", method: "PATCH", path: "/products/1", body: big, want: 413},

		{name: "set stock", method: "PUT", path: "/products/1/stock", body: `{"stock":5}`, want: 200},
		{name: "set stock negative", method: "PUT", path: "/products/1/stock", body: `{"stock":-1}`, want: 422},
		{name: "set stock missing", method: "PUT", path: "/products/999/stock", body: `{"stock":1}`, want: 404},
		{name: "set stock bad id", method: "PUT", path: "/products/0/stock", body: `{"stock":1}`, want: 400},
		{name: "set stock if-match", method: "PUT", path: "/products/1/stock", body: `{"stock":6}`, header: map[string]string{"If-Match": `"4"`}, want: 200},
		{name: "set stock stale", method: "PUT", path: "/products/1/stock", body: `{"stock":7}`, header: map[string]string{"If-Match": `"4"`}, want: 412},
		{name: "set stock malformed if-match", method: "PUT", path: "/products/1/stock", body: `{"stock":7}`, header: map[string]string{"If-Match": `4`}, want: 400, docRejects: true},
		{name: "set stock null", method: "PUT", path: "/products/1/stock", body: `{"stock":null}`, want: 400, docRejects: true},
		{name: "set stock wrong content type", method: "PUT", path: "/products/1/stock", body: `{"stock":1}`, header: map[string]string{"Content-Type": "application/xml"}, want: 415},
		{name: "stock wrong method", method: "GET", path: "/products/1/stock", want: 405, docMethod: "PUT"},
		{name: "set stock without token", method: "PUT", path: "/products/1/stock", body: `{"stock":1}`, noAuth: true, want: 401},
		{name: "set stock too large", method: "PUT", path: "/products/1/stock", body: `{"stock":1` + strings.Repeat(" ", maxBodyBytes) + `}`, want: 413},

		{name: "adjust", method: "POST", path: "/products/1/stock/adjustments", body: `{"delta":-2}`, header: map[string]string{"Idempotency-Key": "adj-1"}, want: 200},
		{name: "adjust replayed", method: "POST", path: "/products/1/stock/adjustments", body: `{"delta":-2}`, header: map[string]string{"Idempotency-Key": "adj-1"}, want: 200},
		{name: "adjust below zero", method: "POST", path: "/products/1/stock/adjustments", body: `{"delta":-100}`, want: 409},
		{name: "adjust zero", method: "POST", path: "/products/1/stock/adjustments", body: `{"delta":0}`, want: 422, docRejects: true},
		{name: "adjust out of range", method: "POST", path: "/products/1/stock/adjustments", body: `{"delta":1000000000001}`, want: 422, docRejects: true},
		{name: "adjust null", method: "POST", path: "/products/1/stock/adjustments", body: `{"delta":null}`, want: 400, docRejects: true},
		{name: "adjust stale", method: "POST", path: "/products/1/stock/adjustments", body: `{"delta":1}`, header: map[string]string{"If-Match": `"1"`}, want: 412},
		{name: "adjust malformed if-match", method: "POST", path: "/products/1/stock/adjustments", body: `{"delta":1}`, header: map[string]string{"If-Match": `"1`}, want: 400, docRejects: true},
		{name: "adjust malformed idempotency key", method: "POST", path: "/products/1/stock/adjustments", body: `{"delta":1}`, header: map[string]string{"Idempotency-Key": strings.Repeat("k", 256)}, want: 400, docRejects: true},
		{name: "adjust missing", method: "POST", path: "/products/999/stock/adjustments", body: `{"delta":1}`, want: 404},
		{name: "adjust trailing data", method: "POST", path: "/products/1/stock/adjustments", body: `{"delta":1} {}`, want: 400},
		{name: "adjust without token", method: "POST", path: "/products/1/stock/adjustments", body: `{"delta":1}`, noAuth: true, want: 401},
		{name: "adjust too large", method: "POST", path: "/products/1/stock/adjustments", body: `{"delta":1` + strings.Repeat(" ", maxBodyBytes) + `}`, want: 413},
		{name: "adjust text/plain", method: "POST", path: "/products/1/stock/adjustments", body: `{"delta":1}`, header: map[string]string{"Content-Type": "text/plain"}, want: 415},
		{name: "adjust wrong method", method: "GET", path: "/products/1/stock/adjustments", want: 405, docMethod: "POST"},

		{name: "delete stale", method: "DELETE", path: "/products/2", header: map[string]string{"If-Match": `"9"`}, want: 412},
		{name: "delete", method: "DELETE", path: "/products/2", header: map[string]string{"If-Match": `"1"`}, want: 204},
		{name: "delete again", method: "DELETE", path: "/products/2", want: 404},
		{name: "delete bad id", method: "DELETE", path: "/products/x", want: 400},
		{name: "delete without token", method: "DELETE", path: "/products/1", noAuth: true, want: 401},
	}

	for _, tc := range cases {
		// Sequential and in order: later cases depend on earlier writes.
		oaRun(t, srv, router, seen, tc)
	}
	oaReservationResponses(t, srv, router, seen, &skew)
	oaEventResponses(t, srv, router, seen, s.store, &skew)

	oaFaultResponses(t, seen)
	oaBackupResponses(t, seen)
	oaScopeResponses(t, srv, router, seen)

	// Every declared response of every operation was seen.
	doc := oaLoadDoc(t)
	requests := 0
	for _, route := range oaDocRoutes(doc) {
		method, path, _ := strings.Cut(route, " ")
		op := doc.Paths.Find(path).GetOperation(method)
		for code := range op.Responses.Map() {
			status, err := strconv.Atoi(code)
			if err != nil {
				t.Errorf("%s declares response %q: want numeric statuses only", route, code)
				continue
			}
			key := route + " " + code
			if why, ok := oaUnexercised[key]; ok {
				if seen[route][status] {
					t.Errorf("%s is listed in oaUnexercised (%s) but a contract request provokes it: remove it from the list", key, why)
				}
				continue
			}
			if !seen[route][status] {
				t.Errorf("%s: no contract request provokes this documented response", key)
			}
			requests++
		}
	}
	t.Logf("%d documented (operation, status) pairs seen and validated; %d declared but not provoked (oaUnexercised)", requests, len(oaUnexercised))
}

// oaScopeResponses sends each operation that needs a token a valid token
// without its scope: 403, with the scope named in WWW-Authenticate.
func oaScopeResponses(t *testing.T, srv *httptest.Server, router routers.Router, seen oaCoverage) {
	doc := oaLoadDoc(t)
	for _, route := range oaDocRoutes(doc) {
		method, path, _ := strings.Cut(route, " ")
		op := doc.Paths.Find(path).GetOperation(method)
		if op.Security == nil || len(*op.Security) == 0 {
			continue
		}
		need := (*op.Security)[0]["bearerAuth"]
		tok := mtFeedToken
		if slices.Contains(need, "events:read") {
			tok = mtCatalogToken
		}
		target := strings.ReplaceAll(path, "{id}", "1")
		if strings.HasPrefix(path, "/reservations/{id}") {
			target = strings.ReplaceAll(path, "{id}", oaNoSuchReservation)
		}
		oaRun(t, srv, router, seen, oaCase{name: route + " without its scope", method: method, path: target, noAuth: true,
			header: map[string]string{"Authorization": "Bearer " + tok}, want: 403, problem: "insufficient-scope"})
	}
}

// oaFaultResponses provokes the documented responses that need a fault:
// 429 from the rate limiter, 503 from load shedding and from a shutdown
// or a start not finished, and 500 from a store that panics.
func oaFaultResponses(t *testing.T, seen oaCoverage) {
	product := `{"sku":"F-1","name":"pen","price_cents":1}`
	// Every operation the rate limiter and load shedding guard, with a
	// request that would otherwise succeed or fail in the handler.
	guarded := func(want int) []oaCase {
		return []oaCase{
			{name: "openapi", method: "GET", path: "/openapi.json", want: want},
			{name: "list", method: "GET", path: "/products", want: want},
			{name: "create", method: "POST", path: "/products", body: product, want: want},
			{name: "get", method: "GET", path: "/products/1", want: want},
			{name: "replace", method: "PUT", path: "/products/1", body: product, want: want},
			{name: "patch", method: "PATCH", path: "/products/1", body: `{"stock":1}`, want: want},
			{name: "delete", method: "DELETE", path: "/products/1", want: want},
			{name: "set stock", method: "PUT", path: "/products/1/stock", body: `{"stock":1}`, want: want},
			{name: "adjust", method: "POST", path: "/products/1/stock/adjustments", body: `{"delta":1}`, want: want},
			{name: "reserve", method: "POST", path: "/reservations", body: `{"reference":"f","lines":[{"product_id":1,"quantity":1}]}`, want: want},
			{name: "find reservations", method: "GET", path: "/reservations?reference=f", want: want},
			{name: "get reservation", method: "GET", path: "/reservations/" + oaNoSuchReservation, want: want},
			{name: "confirm", method: "POST", path: "/reservations/" + oaNoSuchReservation + "/confirm", want: want},
			{name: "release", method: "POST", path: "/reservations/" + oaNoSuchReservation + "/release", want: want},
			{name: "events", method: "GET", path: "/events", want: want},
		}
	}
	run := func(srv *httptest.Server, prefix string, cases []oaCase) {
		router := oaRouter(t, srv)
		for _, tc := range cases {
			tc.name = prefix + ": " + tc.name
			oaRun(t, srv, router, seen, tc)
		}
	}

	// 429: a bucket of one request, refilled once in 1000 s. The first
	// read (by address) and the first write (by token) take it.
	srv, _ := oaNewServer(t, nil, func(d *serverDeps) { d.limiter = newRateLimiter(0.001, 1, d.tokens) })
	run(srv, "rate limited", append([]oaCase{
		{name: "first read", method: "GET", path: "/health/startup", want: 200}, // probes are never limited
		{name: "first read", method: "GET", path: "/openapi.json", want: 200},
		{name: "first write", method: "POST", path: "/products", body: `{"sku":"F-0","name":"pen","price_cents":1}`, want: 201},
	}, guarded(429)...))

	// 503: one request in flight of MAX_IN_FLIGHT=1, held inside the store.
	var gate *oaGateStore
	srv, _ = oaNewServer(t, func(st *sqliteStore) productStore {
		gate = &oaGateStore{sqliteStore: st, entered: make(chan struct{}), release: make(chan struct{})}
		return gate
	}, func(d *serverDeps) { d.maxFlight = 1 })
	held := make(chan error, 1)
	go func() {
		resp, err := srv.Client().Get(srv.URL + "/products/1")
		if err == nil {
			resp.Body.Close()
		}
		held <- err
	}()
	<-gate.entered
	run(srv, "shedding", append(guarded(503),
		oaCase{name: "ready is never shed", method: "GET", path: "/ready", want: 200}))
	close(gate.release)
	if err := <-held; err != nil {
		t.Errorf("the held request: %v", err)
	}

	// 503 from the lifecycle: shutting down, and not started.
	srv, _ = oaNewServer(t, nil, func(d *serverDeps) { d.life = &lifecycle{}; d.life.shuttingDown.Store(true) })
	run(srv, "shutting down", []oaCase{
		{name: "ready", method: "GET", path: "/ready", want: 503},
		{name: "health ready", method: "GET", path: "/health/ready", want: 503},
		{name: "readyz", method: "GET", path: "/readyz", want: 503},
		{name: "startup", method: "GET", path: "/health/startup", want: 503},
	})

	// 500: a store that panics, as a bug would. The recovery middleware
	// answers; validation of the bodies comes first, so they are valid.
	srv, _ = oaNewServer(t, func(st *sqliteStore) productStore { return oaPanicStore{st} }, nil)
	var panics []oaCase
	for _, tc := range guarded(500)[1:] {
		panics = append(panics, tc)
	}
	panics = append(panics,
		oaCase{name: "ready", method: "GET", path: "/ready", want: 500},
		oaCase{name: "health ready", method: "GET", path: "/health/ready", want: 500},
		oaCase{name: "readyz", method: "GET", path: "/readyz", want: 500})
	run(srv, "panicking store", panics)
}

// oaBackupResponses provokes the responses of the /admin/backups routes:
// each success, 404 for names that are not a backup's, 409 while a backup
// is being taken, 500 from a backup or a backup directory that fails, 429
// and 503 (shed while a backup holds the one request slot), and 501
// without backups (PostgreSQL).
func oaBackupResponses(t *testing.T, seen oaCoverage) {
	run := func(srv *httptest.Server, prefix string, cases []oaCase) {
		router := oaRouter(t, srv)
		for _, tc := range cases {
			tc.name = prefix + ": " + tc.name
			oaRun(t, srv, router, seen, tc)
		}
	}
	// newSrv serves the API with backups of its store.
	newSrv := func(configure func(*serverDeps)) (*httptest.Server, *backups) {
		var b *backups
		srv, _ := oaNewServer(t, func(st *sqliteStore) productStore { b = newTestBackups(t, st, 0); return st }, func(d *serverDeps) {
			d.backups = b
			if configure != nil {
				configure(d)
			}
		})
		return srv, b
	}
	srv, bk := newSrv(nil)
	var man backupManifest
	body := oaRun(t, srv, oaRouter(t, srv), seen, oaCase{name: "backup", method: "POST", path: "/admin/backups", want: 201})
	if err := json.Unmarshal(body, &man); err != nil {
		t.Fatalf("manifest %s: %v", body, err)
	}
	missing := "productsvc-20200101T000000.000000Z.db"
	run(srv, "backups", []oaCase{
		{name: "list", method: "GET", path: "/admin/backups", want: 200},
		{name: "download", method: "GET", path: "/admin/backups/" + man.Name, want: 200},
		{name: "download a range", method: "GET", path: "/admin/backups/" + man.Name, header: map[string]string{"Range": "bytes=0-99"}, want: 206},
		{name: "download beyond the end", method: "GET", path: "/admin/backups/" + man.Name, header: map[string]string{"Range": "bytes=999999999-"}, want: 416},
		{name: "download unknown", method: "GET", path: "/admin/backups/" + missing, want: 404, problem: "backup-not-found"},
		{name: "download a path", method: "GET", path: "/admin/backups/..%2Fproducts.db", want: 404},
		{name: "delete", method: "DELETE", path: "/admin/backups/" + man.Name, want: 204},
		{name: "delete again", method: "DELETE", path: "/admin/backups/" + man.Name, want: 404, problem: "backup-not-found"},
		{name: "backup without token", method: "POST", path: "/admin/backups", noAuth: true, want: 401},
		{name: "list without token", method: "GET", path: "/admin/backups", noAuth: true, want: 401},
		{name: "download without token", method: "GET", path: "/admin/backups/" + missing, noAuth: true, want: 401},
		{name: "delete without token", method: "DELETE", path: "/admin/backups/" + missing, noAuth: true, want: 401},
		{name: "backups wrong method", method: "PUT", path: "/admin/backups", want: 405, docMethod: "GET"},
		{name: "backup wrong method", method: "POST", path: "/admin/backups/" + missing, want: 405, docMethod: "GET"},
	})

	// 500s: a manifest whose digest is not hex, a copy that will not go,
	// a backup that fails, a directory that is gone.
	bad, err := bk.Create(t.Context())
	if err != nil {
		t.Fatal(err)
	}
	js, _ := json.Marshal(backupManifest{Name: bad.Name, SHA256: "not hex"})
	os.WriteFile(filepath.Join(bk.dir, bad.Name+".json"), js, 0o644)
	stuck := "productsvc-20200101T000001.000000Z.db"
	os.MkdirAll(filepath.Join(bk.dir, stuck, "x"), 0o755) // a directory with something in it: Remove fails
	os.WriteFile(filepath.Join(bk.dir, stuck+".json"), []byte("{}"), 0o644)
	bk.failAt = func(string) error { return errors.New("test: the disk is full") }
	run(srv, "failing", []oaCase{
		{name: "download", method: "GET", path: "/admin/backups/" + bad.Name, want: 500},
		{name: "delete", method: "DELETE", path: "/admin/backups/" + stuck, want: 500},
		{name: "backup", method: "POST", path: "/admin/backups", want: 500},
	})
	os.RemoveAll(bk.dir)
	run(srv, "no backup dir", []oaCase{{name: "list", method: "GET", path: "/admin/backups", want: 500}})

	// 409, then 503 and 429: a backup held in its snapshot.
	hold := func(srv *httptest.Server, b *backups) (release func()) {
		entered, done := make(chan struct{}), make(chan struct{})
		b.snapshot = func(ctx context.Context, src, dst string) error {
			close(entered)
			<-done
			return snapshotBackupAPI(ctx, src, dst)
		}
		held := make(chan error, 1)
		go func() {
			req, _ := http.NewRequest("POST", srv.URL+"/admin/backups", nil)
			req.Header.Set("Authorization", "Bearer "+mtToken)
			resp, err := srv.Client().Do(req)
			if err == nil {
				resp.Body.Close()
			}
			held <- err
		}()
		<-entered
		return func() {
			close(done)
			if err := <-held; err != nil {
				t.Errorf("the held backup: %v", err)
			}
		}
	}
	srv, bk = newSrv(nil)
	release := hold(srv, bk)
	run(srv, "during a backup", []oaCase{{name: "backup", method: "POST", path: "/admin/backups", want: 409, problem: "backup-running"}})
	release()
	guarded := func(want int) []oaCase {
		return []oaCase{
			{name: "backup", method: "POST", path: "/admin/backups", want: want},
			{name: "list", method: "GET", path: "/admin/backups", want: want},
			{name: "download", method: "GET", path: "/admin/backups/" + missing, want: want},
			{name: "delete", method: "DELETE", path: "/admin/backups/" + missing, want: want},
		}
	}
	srv, bk = newSrv(func(d *serverDeps) { d.maxFlight = 1 })
	release = hold(srv, bk)
	run(srv, "shedding", guarded(503))
	release()
	srv, _ = newSrv(func(d *serverDeps) { d.limiter = newRateLimiter(0.001, 1, d.tokens) })
	run(srv, "rate limited", append([]oaCase{{name: "first", method: "GET", path: "/admin/backups", want: 200}}, guarded(429)...))

	srv, _ = oaNewServer(t, nil, nil)
	run(srv, "postgres", []oaCase{
		{name: "backup", method: "POST", path: "/admin/backups", want: 501, problem: "backups-unsupported"},
		{name: "list", method: "GET", path: "/admin/backups", want: 501},
		{name: "download", method: "GET", path: "/admin/backups/" + missing, want: 501},
		{name: "delete", method: "DELETE", path: "/admin/backups/" + missing, want: 501},
	})
}

// oaNewServer starts the service's handler over a new SQLite database,
// the store wrapped by wrap when it is not nil, with deps changed by
// configure. The in-process cache is off, so reads reach the store.
func oaNewServer(tb testing.TB, wrap func(*sqliteStore) productStore, configure func(*serverDeps)) (*httptest.Server, *sqliteStore) {
	tb.Helper()
	st, err := openSQLite(tb.Context(), StoreConfig{Path: filepath.Join(tb.TempDir(), "products.db")})
	if err != nil {
		tb.Fatalf("OpenStore: %v", err)
	}
	tb.Cleanup(func() { st.Close() })
	var ps productStore = st
	if wrap != nil {
		ps = wrap(st)
	}
	m := newMetrics(nil)
	life := &lifecycle{}
	life.started.Store(true)
	d := serverDeps{
		svc:          NewProductService(ps, ServiceConfig{Metrics: m}),
		log:          slog.New(slog.DiscardHandler),
		metrics:      m,
		tokens:       newTokenSet([]string{mtToken}),
		life:         life,
		serveMetrics: true,
	}
	if configure != nil {
		configure(&d)
	}
	srv := httptest.NewServer(newServer(d))
	tb.Cleanup(srv.Close)
	return srv, st
}

// oaGateStore holds its first Get until release is closed, so a request
// stays in flight.
type oaGateStore struct {
	*sqliteStore
	once             sync.Once
	entered, release chan struct{}
}

func (g *oaGateStore) Get(ctx context.Context, id int64) (Product, error) {
	g.once.Do(func() {
		close(g.entered)
		<-g.release
	})
	return g.sqliteStore.Get(ctx, id)
}

// oaPanicStore panics in every operation a request can reach.
type oaPanicStore struct{ *sqliteStore }

func (oaPanicStore) Get(context.Context, int64) (Product, error)    { panic("test: store bug") }
func (oaPanicStore) List(context.Context, ListFilter) (Page, error) { panic("test: store bug") }
func (oaPanicStore) Ping(context.Context) error                     { panic("test: store bug") }
func (oaPanicStore) Create(context.Context, string, Product, *IdempotencyKey) (Product, bool, error) {
	panic("test: store bug")
}
func (oaPanicStore) Update(context.Context, string, int64, ProductUpdate) (Product, bool, error) {
	panic("test: store bug")
}
func (oaPanicStore) AdjustStock(context.Context, string, int64, int64, *IfMatch, *IdempotencyKey) (Product, bool, error) {
	panic("test: store bug")
}
func (oaPanicStore) Delete(context.Context, string, int64, *IfMatch) (Product, error) {
	panic("test: store bug")
}
func (oaPanicStore) Reserve(context.Context, Reservation, time.Duration, int64, *IdempotencyKey) (Reserved, error) {
	panic("test: store bug")
}
func (oaPanicStore) Transition(context.Context, string, string, string) (Reserved, error) {
	panic("test: store bug")
}
func (oaPanicStore) Reservation(context.Context, string) (Reservation, error) {
	panic("test: store bug")
}
func (oaPanicStore) ReservationsByReference(context.Context, string, int) ([]Reservation, error) {
	panic("test: store bug")
}
func (oaPanicStore) Events(context.Context, int64, int) ([]Event, error) { panic("test: store bug") }

// oaCoverage records the documented responses the contract tests saw:
// "GET /products/{id}" → status → seen.
type oaCoverage map[string]map[int]bool

func (c oaCoverage) add(route string, status int) {
	if c[route] == nil {
		c[route] = make(map[int]bool)
	}
	c[route][status] = true
}

// oaRouter routes requests to srv against a copy of the document whose
// servers are replaced by srv.
func oaRouter(tb testing.TB, srv *httptest.Server) routers.Router {
	tb.Helper()
	doc := oaLoadDoc(tb)
	doc.Servers = openapi3.Servers{{URL: srv.URL}}
	router, err := gorillamux.NewRouter(doc)
	if err != nil {
		tb.Fatalf("gorillamux.NewRouter: %v", err)
	}
	return router
}

// oaRun sends tc to srv and validates the response with the route router
// finds for it, recording what it saw in seen, and returns the body. A 405
// is validated against, and recorded for, every operation of the path: each
// documents it.
func oaRun(t *testing.T, srv *httptest.Server, router routers.Router, seen oaCoverage, tc oaCase) []byte {
	t.Helper()
	newReq := func(method string) *http.Request {
		var body io.Reader
		if tc.body != "" {
			body = strings.NewReader(tc.body)
		}
		req, err := http.NewRequestWithContext(t.Context(), method, srv.URL+tc.path, body)
		if err != nil {
			t.Fatalf("%s: %v", tc.name, err)
		}
		if tc.body != "" {
			req.Header.Set("Content-Type", "application/json")
		}
		if !tc.noAuth && (method != http.MethodGet || oaNeedsToken(router, req)) {
			req.Header.Set("Authorization", "Bearer "+mtToken)
		}
		for k, v := range tc.header {
			req.Header.Set(k, v)
		}
		return req
	}

	req := newReq(tc.method)
	resp, err := srv.Client().Do(req)
	if err != nil {
		t.Fatalf("%s: %s %s: %v", tc.name, tc.method, tc.path, err)
	}
	body, err := io.ReadAll(resp.Body)
	resp.Body.Close()
	if err != nil {
		t.Fatalf("%s: read body: %v", tc.name, err)
	}
	if resp.StatusCode != tc.want {
		t.Errorf("%s: %s %s status = %d, want %d; body: %s", tc.name, tc.method, tc.path, resp.StatusCode, tc.want, body)
		return body
	}
	if tc.problem != "" {
		var p struct{ Type string }
		if json.Unmarshal(body, &p); p.Type != "/problems/"+tc.problem {
			t.Errorf("%s: %s %s problem type = %q, want /problems/%s", tc.name, tc.method, tc.path, p.Type, tc.problem)
		}
	}

	routeMethod := tc.method
	if tc.docMethod != "" {
		routeMethod = tc.docMethod
	}
	route, _, err := router.FindRoute(newReq(routeMethod))
	if err != nil {
		t.Errorf("%s: no documented route for %s %s: %v", tc.name, routeMethod, tc.path, err)
		return body
	}
	methods := []string{routeMethod}
	if resp.StatusCode == http.StatusMethodNotAllowed {
		methods = slices.Sorted(maps.Keys(route.PathItem.Operations()))
	}
	for _, method := range methods {
		oaValidate(t, router, newReq(method), tc, resp, body)
		seen.add(method+" "+route.Path, resp.StatusCode)
	}
	return body
}

// oaNeedsToken reports whether the operation req is for requires the bearer
// token: reads of products are public, reservations and the feed are not.
func oaNeedsToken(router routers.Router, req *http.Request) bool {
	route, _, err := router.FindRoute(req)
	if err != nil {
		return false
	}
	sec := route.Operation.Security
	if sec == nil {
		sec = &route.Spec.Security
	}
	return len(*sec) > 0
}

// oaValidate checks one response against the operation routeReq routes to.
func oaValidate(t *testing.T, router routers.Router, routeReq *http.Request, tc oaCase, resp *http.Response, body []byte) {
	t.Helper()
	route, params, err := router.FindRoute(routeReq)
	if err != nil {
		t.Errorf("%s: no documented route for %s %s: %v", tc.name, routeReq.Method, tc.path, err)
		return
	}
	opts := &openapi3filter.Options{
		IncludeResponseStatus: true, // an undocumented status is an error
		MultiError:            true,
		AuthenticationFunc:    openapi3filter.NoopAuthenticationFunc,
		// Validate the request as sent: filling in defaults would turn a
		// null the server refuses into the default the schema accepts.
		SkipSettingDefaults: true,
	}
	in := &openapi3filter.RequestValidationInput{Request: routeReq, PathParams: params, Route: route, Options: opts}
	if resp.StatusCode < 300 {
		if err := openapi3filter.ValidateRequest(context.Background(), in); err != nil {
			t.Errorf("%s: the request %s %s does not match openapi.json: %v", tc.name, tc.method, tc.path, err)
		}
	}
	if tc.docRejects {
		if err := openapi3filter.ValidateRequest(context.Background(), in); err == nil {
			t.Errorf("%s: the server answers %d to %s %s, but openapi.json accepts the request: the schema is looser than the server",
				tc.name, resp.StatusCode, tc.method, tc.path)
		}
	}
	out := &openapi3filter.ResponseValidationInput{
		RequestValidationInput: in,
		Status:                 resp.StatusCode,
		Header:                 resp.Header,
		Options:                opts,
	}
	out.SetBodyBytes(body)
	if err := openapi3filter.ValidateResponse(context.Background(), out); err != nil {
		t.Errorf("%s: %s %s: the %d response does not match openapi.json: %v\nheaders: %v\nbody: %.500s",
			tc.name, tc.method, tc.path, resp.StatusCode, err, resp.Header, body)
	}
	if resp.StatusCode == http.StatusNotModified {
		// ValidateResponse skips 304: check its documented headers here.
		if resp.Header.Get("ETag") == "" || resp.Header.Get("X-Request-ID") == "" || len(body) != 0 {
			t.Errorf("%s: 304 with ETag %q, X-Request-ID %q and %d body bytes; want both headers and no body",
				tc.name, resp.Header.Get("ETag"), resp.Header.Get("X-Request-ID"), len(body))
		}
	}
}

// TestOpenAPI_declaredStatuses checks, from the code's own tables, that
// every operation declares each status the shared machinery can give it:
// the problem types and the error table of handler.go, the middleware every
// request passes (405, 500; 429 and 503 unless isProbe exempts the path),
// the token check (401), body reading (400, 413, 415, 422), the {id} path
// value (400, 404) and conditional headers (If-Match: 400, 412;
// If-None-Match: 304). 499, written when the client has gone, reaches no
// one and is not declared.
func TestOpenAPI_declaredStatuses(t *testing.T) {
	doc := oaLoadDoc(t)
	declaredAnywhere := make(map[int]bool)
	for _, route := range oaDocRoutes(doc) {
		method, path, _ := strings.Cut(route, " ")
		item := doc.Paths.Find(path)
		op := item.GetOperation(method)
		declared := make(map[int]bool)
		for code := range op.Responses.Map() {
			n, _ := strconv.Atoi(code)
			declared[n] = true
			declaredAnywhere[n] = true
		}
		params := make(map[string]bool)
		for _, p := range append(slices.Clone(item.Parameters), op.Parameters...) {
			params[p.Value.In+" "+p.Value.Name] = true
		}
		want := []int{http.StatusMethodNotAllowed, http.StatusInternalServerError}
		if !isProbe(httptest.NewRequest(method, strings.ReplaceAll(path, "{id}", "1"), nil)) {
			want = append(want, http.StatusTooManyRequests, http.StatusServiceUnavailable)
		}
		if op.Security == nil || len(*op.Security) > 0 {
			want = append(want, http.StatusUnauthorized)
		}
		if op.RequestBody != nil {
			want = append(want, http.StatusBadRequest, http.StatusRequestEntityTooLarge, http.StatusUnsupportedMediaType, http.StatusUnprocessableEntity)
		}
		if params["path id"] {
			want = append(want, http.StatusNotFound)
			for _, p := range append(slices.Clone(item.Parameters), op.Parameters...) {
				if p.Value.In == "path" && p.Value.Schema.Value.Type.Is("integer") {
					// parseID refuses what is not a positive int64; an
					// opaque (string) id that cannot exist is only not found.
					want = append(want, http.StatusBadRequest)
				}
			}
		}
		if params["header If-Match"] {
			want = append(want, http.StatusBadRequest, http.StatusPreconditionFailed)
		}
		if params["header If-None-Match"] {
			want = append(want, http.StatusNotModified)
		}
		if params["header Idempotency-Key"] {
			want = append(want, http.StatusBadRequest, http.StatusUnprocessableEntity)
		}
		for _, status := range want {
			if !declared[status] {
				t.Errorf("%s can answer %d but openapi.json does not declare it", route, status)
			}
		}
		// And the other way: a header the handler honours is declared.
		if strings.HasPrefix(path, "/products/{id}") && method != http.MethodGet && !params["header If-Match"] {
			t.Errorf("%s honours If-Match (writeTarget) but openapi.json does not declare the header", route)
		}
	}
	for status := range problemTypes {
		if !declaredAnywhere[status] {
			t.Errorf("problemTypes has %d, which no operation declares", status)
		}
	}
	for _, e := range errorStatus {
		if !declaredAnywhere[e.status] {
			t.Errorf("errorStatus maps %v to %d, which no operation declares", e.err, e.status)
		}
	}
}

// oaNoSuchReservation is a well-formed reservation id no test creates.
const oaNoSuchReservation = "res_00000000000000000000000000000000"

// oaID reads the id of a product or reservation from a response body.
func oaID[T int64 | string](t *testing.T, body []byte) T {
	t.Helper()
	var v struct{ ID T }
	if err := json.Unmarshal(body, &v); err != nil {
		t.Fatalf("read the id of %s: %v", body, err)
	}
	return v.ID
}

// oaReservationResponses provokes the responses of the reservation routes,
// and the ones open holds give the product routes. skew moves the store's
// clock, so a hold expires at once.
func oaReservationResponses(t *testing.T, srv *httptest.Server, router routers.Router, seen oaCoverage, skew *atomic.Int64) {
	run := func(tc oaCase) []byte { t.Helper(); return oaRun(t, srv, router, seen, tc) }
	p := oaID[int64](t, run(oaCase{name: "product to reserve", method: "POST", path: "/products",
		body: `{"sku":"OA-R","name":"pen","price_cents":150,"stock":10}`, want: 201}))
	q := oaID[int64](t, run(oaCase{name: "scarce product", method: "POST", path: "/products",
		body: `{"sku":"OA-S","name":"ink","price_cents":90,"stock":1}`, want: 201}))
	hold := func(ref string, qty int64, extra string) string {
		return fmt.Sprintf(`{"reference":%q,"lines":[{"product_id":%d,"quantity":%d}]%s}`, ref, p, qty, extra)
	}
	big := `{"reference":"order-x","lines":[],"pad":"` + strings.Repeat("x", maxBodyBytes) + `"}`

	a := oaID[string](t, run(oaCase{name: "reserve", method: "POST", path: "/reservations", body: hold("order-1", 2, `,"ttl_seconds":600`),
		header: map[string]string{"Idempotency-Key": "res-1"}, want: 201}))
	for _, tc := range []oaCase{
		{name: "reserve replayed", method: "POST", path: "/reservations", body: hold("order-1", 2, `,"ttl_seconds":600`),
			header: map[string]string{"Idempotency-Key": "res-1"}, want: 201},
		{name: "reserve key reused with another body", method: "POST", path: "/reservations", body: hold("order-1", 3, ""),
			header: map[string]string{"Idempotency-Key": "res-1"}, want: 422, problem: "idempotency-key-reused"},
		{name: "reserve malformed idempotency key", method: "POST", path: "/reservations", body: hold("order-1", 1, ""),
			header: map[string]string{"Idempotency-Key": ""}, want: 400, docRejects: true},
		{name: "reserve short lines", method: "POST", path: "/reservations",
			body: fmt.Sprintf(`{"reference":"order-2","lines":[{"product_id":%d,"quantity":100},{"product_id":%d,"quantity":5}]}`, p, q), want: 409, problem: "insufficient-stock"},
		{name: "reserve past the hold cap", method: "POST", path: "/reservations", body: hold("order-cap", mtCap+1, ""), noAuth: true,
			header: map[string]string{"Authorization": "Bearer " + mtCappedToken}, want: 409, problem: "hold-cap-exceeded"},
		{name: "reserve unknown product", method: "POST", path: "/reservations", body: `{"reference":"order-2","lines":[{"product_id":999999,"quantity":1}]}`, want: 422, problem: "validation"},
		{name: "reserve blank reference", method: "POST", path: "/reservations", body: `{"reference":"","lines":[{"product_id":1,"quantity":1}]}`, want: 422, docRejects: true},
		{name: "reserve unprintable reference", method: "POST", path: "/reservations", body: `{"reference":"a\u0007b","lines":[{"product_id":1,"quantity":1}]}`, want: 422, docRejects: true},
		{name: "reserve no lines", method: "POST", path: "/reservations", body: `{"reference":"order-2","lines":[]}`, want: 422, docRejects: true},
		{name: "reserve a product twice", method: "POST", path: "/reservations",
			body: fmt.Sprintf(`{"reference":"order-2","lines":[{"product_id":%d,"quantity":1},{"product_id":%d,"quantity":1}]}`, p, p), want: 422, docRejects: true},
		{name: "reserve zero quantity", method: "POST", path: "/reservations", body: hold("order-2", 0, ""), want: 422, docRejects: true},
		{name: "reserve ttl too long", method: "POST", path: "/reservations", body: hold("order-2", 1, `,"ttl_seconds":86401`), want: 422, docRejects: true},
		{name: "reserve line without quantity", method: "POST", path: "/reservations", body: `{"reference":"order-2","lines":[{"product_id":1}]}`, want: 422, docRejects: true},
		{name: "reserve line unknown field", method: "POST", path: "/reservations", body: `{"reference":"order-2","lines":[{"product_id":1,"quantity":1,"sku":"A"}]}`, want: 400, docRejects: true},
		{name: "reserve null ttl", method: "POST", path: "/reservations", body: hold("order-2", 1, `,"ttl_seconds":null`), want: 400, docRejects: true},
		{name: "reserve malformed JSON", method: "POST", path: "/reservations", body: `{"reference":`, want: 400},
		{name: "reserve text/plain", method: "POST", path: "/reservations", body: hold("order-2", 1, ""), header: map[string]string{"Content-Type": "text/plain"}, want: 415},
		{name: "reserve too large", method: "POST", path: "/reservations", body: big, want: 413},
		{name: "reserve without token", method: "POST", path: "/reservations", body: hold("order-2", 1, ""), noAuth: true, want: 401},
		{name: "reservations wrong method", method: "PUT", path: "/reservations", body: hold("order-2", 1, ""), want: 405, docMethod: "GET"},

		{name: "find by reference", method: "GET", path: "/reservations?reference=order-1", want: 200},
		{name: "find by unknown reference", method: "GET", path: "/reservations?reference=nobody", want: 200},
		{name: "find without reference", method: "GET", path: "/reservations", want: 400, docRejects: true},
		{name: "find unknown parameter", method: "GET", path: "/reservations?reference=order-1&state=held", want: 400},
		{name: "find without token", method: "GET", path: "/reservations?reference=order-1", noAuth: true, want: 401},

		{name: "get reservation", method: "GET", path: "/reservations/" + a, want: 200},
		{name: "get unknown reservation", method: "GET", path: "/reservations/" + oaNoSuchReservation, want: 404, problem: "reservation-not-found"},
		{name: "get malformed reservation id", method: "GET", path: "/reservations/42", want: 404, problem: "reservation-not-found"},
		{name: "get reservation without token", method: "GET", path: "/reservations/" + a, noAuth: true, want: 401},
		{name: "reservation wrong method", method: "DELETE", path: "/reservations/" + a, want: 405, docMethod: "GET"},

		{name: "delete a held product", method: "DELETE", path: fmt.Sprintf("/products/%d", p), want: 409, problem: "product-reserved"},
		{name: "set stock below reserved", method: "PUT", path: fmt.Sprintf("/products/%d/stock", p), body: `{"stock":1}`, want: 409, problem: "insufficient-stock"},

		{name: "confirm", method: "POST", path: "/reservations/" + a + "/confirm", want: 200},
		{name: "confirm again", method: "POST", path: "/reservations/" + a + "/confirm", want: 200},
		{name: "release a confirmed one", method: "POST", path: "/reservations/" + a + "/release", want: 409, problem: "invalid-state"},
		{name: "confirm with a body", method: "POST", path: "/reservations/" + a + "/confirm", body: `{}`, want: 400},
		{name: "confirm unknown", method: "POST", path: "/reservations/" + oaNoSuchReservation + "/confirm", want: 404, problem: "reservation-not-found"},
		{name: "confirm without token", method: "POST", path: "/reservations/" + a + "/confirm", noAuth: true, want: 401},
		{name: "confirm wrong method", method: "GET", path: "/reservations/" + a + "/confirm", want: 405, docMethod: "POST"},
	} {
		run(tc)
	}

	b := oaID[string](t, run(oaCase{name: "reserve to release", method: "POST", path: "/reservations", body: hold("order-3", 1, ""), want: 201}))
	for _, tc := range []oaCase{
		{name: "release", method: "POST", path: "/reservations/" + b + "/release", want: 200},
		{name: "release again", method: "POST", path: "/reservations/" + b + "/release", want: 200},
		{name: "confirm a released one", method: "POST", path: "/reservations/" + b + "/confirm", want: 409, problem: "invalid-state"},
		{name: "release with a body", method: "POST", path: "/reservations/" + b + "/release", body: `{"reason":"payment failed"}`, want: 400},
		{name: "release unknown", method: "POST", path: "/reservations/" + oaNoSuchReservation + "/release", want: 404, problem: "reservation-not-found"},
		{name: "release without token", method: "POST", path: "/reservations/" + b + "/release", noAuth: true, want: 401},
		{name: "release wrong method", method: "PUT", path: "/reservations/" + b + "/release", want: 405, docMethod: "POST"},
	} {
		run(tc)
	}

	// A hold that runs out: the store's clock jumps past expires_at.
	c := oaID[string](t, run(oaCase{name: "reserve to expire", method: "POST", path: "/reservations", body: hold("order-4", 1, `,"ttl_seconds":60`), want: 201}))
	skew.Add(int64(2 * time.Minute))
	run(oaCase{name: "confirm an expired one", method: "POST", path: "/reservations/" + c + "/confirm", want: 409, problem: "reservation-expired"})
	run(oaCase{name: "release an expired one", method: "POST", path: "/reservations/" + c + "/release", want: 409, problem: "reservation-expired"})
	if body := run(oaCase{name: "get an expired one", method: "GET", path: "/reservations/" + c, want: 200}); !bytes.Contains(body, []byte(`"state":"expired"`)) {
		t.Errorf("GET /reservations/%s after its expiry = %s, want state expired", c, body)
	}
	run(oaCase{name: "delete a product whose holds ended", method: "DELETE", path: fmt.Sprintf("/products/%d", q), want: 204})
}

// oaEventResponses provokes the responses of GET /events, as JSON and as a
// stream, and the 410 of a position retention has trimmed.
func oaEventResponses(t *testing.T, srv *httptest.Server, router routers.Router, seen oaCoverage, st *sqliteStore, skew *atomic.Int64) {
	run := func(tc oaCase) []byte { t.Helper(); return oaRun(t, srv, router, seen, tc) }
	body := run(oaCase{name: "events", method: "GET", path: "/events?limit=1000", want: 200})
	var page struct {
		Events []struct {
			Seq  int64
			Type string
		}
		NextAfter int64 `json:"next_after"`
	}
	if err := json.Unmarshal(body, &page); err != nil || len(page.Events) == 0 {
		t.Fatalf("GET /events = %s (%v), want the events of the writes above", body, err)
	}
	types := make(map[string]bool)
	for _, e := range page.Events {
		types[e.Type] = true
	}
	// Each type was validated against the document above.
	for _, typ := range []string{EventProductCreated, EventProductUpdated, EventProductDeleted, EventStockChanged,
		EventReservationHeld, EventReservationConfirmed, EventReservationReleased, EventReservationExpired} {
		if !types[typ] {
			t.Errorf("GET /events has no %s event; the contract requests above should make one", typ)
		}
	}
	last := page.NextAfter
	for _, tc := range []oaCase{
		{name: "events page", method: "GET", path: "/events?after=1&limit=2", want: 200},
		{name: "events up to date", method: "GET", path: fmt.Sprintf("/events?after=%d", last), want: 200},
		{name: "events negative after", method: "GET", path: "/events?after=-1", want: 400, docRejects: true},
		{name: "events limit too big", method: "GET", path: "/events?limit=1001", want: 400, docRejects: true},
		{name: "events unknown parameter", method: "GET", path: "/events?since=1", want: 400},
		{name: "events malformed Last-Event-ID", method: "GET", path: "/events",
			header: map[string]string{"Accept": "text/event-stream", "Last-Event-ID": "x"}, want: 400, docRejects: true},
		{name: "events without token", method: "GET", path: "/events", noAuth: true, want: 401},
		{name: "events wrong method", method: "POST", path: "/events", want: 405, docMethod: "GET"},
	} {
		run(tc)
	}
	oaStream(t, srv, router, seen, "events stream", "/events", map[string]string{"Last-Event-ID": strconv.FormatInt(last-3, 10)})
	oaStream(t, srv, router, seen, "events stream after", "/events?after=1", nil)

	// One stream open of FEED_MAX_STREAMS=1: the next is refused.
	srv1, _ := oaNewServer(t, nil, func(d *serverDeps) { d.streams = newStreamSlots(1) })
	router1 := oaRouter(t, srv1)
	ctx, cancel := context.WithCancel(t.Context())
	defer cancel()
	req, _ := http.NewRequestWithContext(ctx, http.MethodGet, srv1.URL+"/events", nil)
	req.Header.Set("Accept", "text/event-stream")
	req.Header.Set("Authorization", "Bearer "+mtToken)
	resp, err := srv1.Client().Do(req)
	if err != nil || resp.StatusCode != http.StatusOK {
		t.Fatalf("open a stream: %v, %v", resp, err)
	}
	defer resp.Body.Close()
	if _, err := bufio.NewReader(resp.Body).ReadString('\n'); err != nil { // the stream holds its slot
		t.Fatalf("read the stream: %v", err)
	}
	oaRun(t, srv1, router1, seen, oaCase{name: "a stream too many", method: "GET", path: "/events",
		header: map[string]string{"Accept": "text/event-stream"}, want: 503, problem: "unavailable"})
	cancel()

	// Retention trims every event: positions before the last are gone.
	if _, err := st.TrimEvents(t.Context(), time.Now().Add(time.Duration(skew.Load())+time.Hour)); err != nil {
		t.Fatalf("TrimEvents: %v", err)
	}
	run(oaCase{name: "events trimmed", method: "GET", path: "/events?after=1", want: 410, problem: "feed-gone"})
	run(oaCase{name: "events stream trimmed", method: "GET", path: "/events",
		header: map[string]string{"Accept": "text/event-stream", "Last-Event-ID": "0"}, want: 410, problem: "feed-gone"})
	run(oaCase{name: "events after the trim", method: "GET", path: fmt.Sprintf("/events?after=%d", last), want: 200})
	run(oaCase{name: "events of another log", method: "GET", path: "/events?after=1&log_id=00000000000000000000000000000000", want: 410, problem: "feed-reset"})
	run(oaCase{name: "events beyond the head", method: "GET", path: fmt.Sprintf("/events?after=%d", last+1000), want: 410, problem: "feed-reset"})
	run(oaCase{name: "events stream beyond the head", method: "GET", path: "/events",
		header: map[string]string{"Accept": "text/event-stream", "Last-Event-ID": strconv.FormatInt(last+1000, 10)}, want: 410, problem: "feed-reset"})
}

// oaStream opens GET path as a text/event-stream, validates the status and
// headers against the document, reads the first event and validates its
// framing (id is the seq, event the type) and its data against the Event
// schema, then leaves.
func oaStream(t *testing.T, srv *httptest.Server, router routers.Router, seen oaCoverage, name, path string, header map[string]string) {
	t.Helper()
	ctx, cancel := context.WithTimeout(t.Context(), 10*time.Second)
	defer cancel()
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, srv.URL+path, nil)
	if err != nil {
		t.Fatal(err)
	}
	req.Header.Set("Accept", "text/event-stream")
	req.Header.Set("Authorization", "Bearer "+mtToken)
	for k, v := range header {
		req.Header.Set(k, v)
	}
	resp, err := srv.Client().Do(req)
	if err != nil {
		t.Fatalf("%s: GET %s: %v", name, path, err)
	}
	defer resp.Body.Close()
	if resp.StatusCode != http.StatusOK || resp.Header.Get("Content-Type") != "text/event-stream" {
		b, _ := io.ReadAll(resp.Body)
		t.Fatalf("%s: GET %s = %d %q, want 200 text/event-stream; body %s", name, path, resp.StatusCode, resp.Header.Get("Content-Type"), b)
	}
	route, params, err := router.FindRoute(req)
	if err != nil {
		t.Fatalf("%s: no documented route for GET %s: %v", name, path, err)
	}
	if route.Operation.Responses.Status(200).Value.Content.Get("text/event-stream") == nil {
		t.Errorf("%s: openapi.json does not document a text/event-stream 200 for GET %s", name, route.Path)
	}
	opts := &openapi3filter.Options{IncludeResponseStatus: true, MultiError: true, AuthenticationFunc: openapi3filter.NoopAuthenticationFunc,
		ExcludeResponseBody: true} // a stream does not end; its events are checked below
	in := &openapi3filter.RequestValidationInput{Request: req, PathParams: params, Route: route, Options: opts}
	if err := openapi3filter.ValidateRequest(context.Background(), in); err != nil {
		t.Errorf("%s: the request does not match openapi.json: %v", name, err)
	}
	out := &openapi3filter.ResponseValidationInput{RequestValidationInput: in, Status: resp.StatusCode, Header: resp.Header, Options: opts}
	if err := openapi3filter.ValidateResponse(context.Background(), out); err != nil {
		t.Errorf("%s: the 200 stream's headers do not match openapi.json: %v", name, err)
	}

	// Comment lines first, then one event: id, event, data, blank line.
	r := bufio.NewReader(resp.Body)
	fields := map[string]string{}
	for {
		line, err := r.ReadString('\n')
		if err != nil {
			t.Fatalf("%s: read the stream: %v (so far %q)", name, err, fields)
		}
		line = strings.TrimSuffix(line, "\n")
		if strings.HasPrefix(line, ":") {
			continue
		}
		if line == "" {
			if len(fields) > 0 {
				break
			}
			continue
		}
		k, v, ok := strings.Cut(line, ": ")
		if !ok {
			t.Fatalf("%s: stream line %q is not a field", name, line)
		}
		fields[k] = v
	}
	var e struct {
		Seq  int64
		Type string
	}
	if err := json.Unmarshal([]byte(fields["data"]), &e); err != nil {
		t.Fatalf("%s: event data %q: %v", name, fields["data"], err)
	}
	if fields["id"] != strconv.FormatInt(e.Seq, 10) || fields["event"] != e.Type || len(fields) != 3 {
		t.Errorf("%s: event fields %q, want id %d, event %s and data only", name, fields, e.Seq, e.Type)
	}
	if err := fzVisit(fzSchema(t, route.Spec, "Event"), []byte(fields["data"]), true); err != nil {
		t.Errorf("%s: event data %s does not match the Event schema: %v", name, fields["data"], err)
	}
	seen.add("GET "+route.Path, resp.StatusCode)
}
