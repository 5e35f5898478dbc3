package main

import (
	"bytes"
	"context"
	"fmt"
	"go/ast"
	"go/parser"
	"go/token"
	"io"
	"maps"
	"net/http"
	"net/http/httptest"
	"slices"
	"strconv"
	"strings"
	"testing"

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
	// docRejects marks a request the server refuses for a rule the document
	// states in its schemas: validating it against the document must fail
	// too, so generated clients and testers learn the rule from the document.
	docRejects bool
}

// TestOpenAPI_Responses sends real requests over loopback through the real
// handler and validates every response against the document: status,
// headers and body. Successful requests are validated as requests too.
func TestOpenAPI_Responses(t *testing.T) {
	s := mtNewServer(t)
	srv := httptest.NewServer(s.handler)
	t.Cleanup(srv.Close)

	// Route against the test server: a copy of the document with its servers replaced.
	doc := oaLoadDoc(t)
	doc.Servers = openapi3.Servers{{URL: srv.URL}}
	router, err := gorillamux.NewRouter(doc)
	if err != nil {
		t.Fatalf("gorillamux.NewRouter: %v", err)
	}

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

		{name: "patch", method: "PATCH", path: "/products/1", body: `{"description":null,"stock":7}`,
			header: map[string]string{"Content-Type": "application/merge-patch+json"}, want: 200},
		{name: "patch stale", method: "PATCH", path: "/products/1", body: `{"stock":8}`, header: map[string]string{"If-Match": `"2"`}, want: 412},
		{name: "patch null name", method: "PATCH", path: "/products/1", body: `{"name":null}`, want: 422, docRejects: true},
		{name: "patch null price", method: "PATCH", path: "/products/1", body: `{"price_cents":null}`, want: 422, docRejects: true},
		{name: "patch wrong type", method: "PATCH", path: "/products/1", body: `{"price_cents":"1"}`, want: 400},
		{name: "patch text/plain", method: "PATCH", path: "/products/1", body: `{"stock":1}`, header: map[string]string{"Content-Type": "text/plain"}, want: 415},
		{name: "patch taken sku", method: "PATCH", path: "/products/1", body: `{"sku":"OA-2"}`, want: 409},

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

		{name: "delete stale", method: "DELETE", path: "/products/2", header: map[string]string{"If-Match": `"9"`}, want: 412},
		{name: "delete", method: "DELETE", path: "/products/2", header: map[string]string{"If-Match": `"1"`}, want: 204},
		{name: "delete again", method: "DELETE", path: "/products/2", want: 404},
		{name: "delete bad id", method: "DELETE", path: "/products/x", want: 400},
		{name: "delete without token", method: "DELETE", path: "/products/1", noAuth: true, want: 401},
	}

	seen := make(map[int]bool)
	for _, tc := range cases {
		// Sequential and in order: later cases depend on earlier writes.
		oaRun(t, srv, router, tc)
		seen[tc.want] = true
	}
	for _, code := range []int{200, 201, 204, 304, 400, 401, 404, 405, 409, 412, 413, 415, 422} {
		if !seen[code] {
			t.Errorf("no case answers %d", code)
		}
	}
}

// oaRun sends tc to srv and validates the response with the route router
// finds for it.
func oaRun(t *testing.T, srv *httptest.Server, router routers.Router, tc oaCase) {
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
		if !tc.noAuth && method != http.MethodGet {
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
		return
	}

	routeMethod := tc.method
	if tc.docMethod != "" {
		routeMethod = tc.docMethod
	}
	routeReq := newReq(routeMethod)
	route, params, err := router.FindRoute(routeReq)
	if err != nil {
		t.Errorf("%s: no documented route for %s %s: %v", tc.name, routeMethod, tc.path, err)
		return
	}
	opts := &openapi3filter.Options{
		IncludeResponseStatus: true, // an undocumented status is an error
		MultiError:            true,
		AuthenticationFunc:    openapi3filter.NoopAuthenticationFunc,
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
		// ValidateRequest consumed the body; the response check needs none.
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
