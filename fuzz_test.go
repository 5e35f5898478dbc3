package main

import (
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"net/http"
	"net/http/httptest"
	"net/url"
	"strconv"
	"strings"
	"testing"
	"time"
	"unicode"
	"unicode/utf8"

	"github.com/getkin/kin-openapi/openapi3"
	"github.com/google/go-cmp/cmp"
)

// fzSchema returns the named schema of the OpenAPI document.
func fzSchema(tb testing.TB, doc *openapi3.T, name string) *openapi3.Schema {
	tb.Helper()
	ref := doc.Components.Schemas[name]
	if ref == nil || ref.Value == nil {
		tb.Fatalf("openapi.json has no schema %s", name)
	}
	return ref.Value
}

// fzVisit validates the JSON document b against schema.
func fzVisit(schema *openapi3.Schema, b []byte, asResponse bool) error {
	var v any
	if err := json.Unmarshal(b, &v); err != nil {
		return err
	}
	opts := []openapi3.SchemaValidationOption{openapi3.EnableJSONSchema2020(), openapi3.MultiErrors()}
	if asResponse {
		opts = append(opts, openapi3.VisitAsResponse())
	} else {
		opts = append(opts, openapi3.VisitAsRequest())
	}
	return schema.VisitJSON(v, opts...)
}

// FuzzDecodeProductInput checks that decoding a create/replace body never
// panics, fails only with a *BadRequestError, and that an input the service
// accepts becomes a product whose JSON reads back to the same product and
// matches the documented schemas.
func FuzzDecodeProductInput(f *testing.F) {
	for _, s := range []string{
		`{"sku":"A-1","name":"pen","price_cents":150}`,
		`{"sku":"A-1","name":"pen","description":"blue\nink\t\"x\"","category":"office","price_cents":0,"currency":"EUR","stock":1000000000000}`,
		`{"sku":"A-1","name":"\u2028 caf\u00e9 <&> \ud83d\ude00","price_cents":1}`,
		`{"sku":"A-1","name":"pen","price_cents":1.5}`,
		`{"sku":"A-1","name":"pen","price_cents":1e3}`,
		`{"sku":"A-1","name":"pen","price_cents":99999999999999999999}`,
		`{"sku":"A-1","sku":"A-2","name":"pen","price_cents":1}`,
		`{"sku":"A-1","name":"pen","price_cents":1,"extra":true}`,
		`{"sku":"A-1","name":"pen","price_cents":1} []`,
		`{"sku":null,"name":"pen","price_cents":1}`,
		`{"sku":"A-1","name":"\ud800","price_cents":1}`,
		`{"sku":"A-1","name":"\u00a0","price_cents":1}`,
		`[]`, `null`, `"x"`, ``, `{`, "{\"sku\":\"\xff\"}",
	} {
		f.Add([]byte(s))
	}
	doc := oaLoadDoc(f)
	productSchema := fzSchema(f, doc, "Product")
	inputSchema := fzSchema(f, doc, "ProductInput")
	created := time.Date(2026, 11, 21, 6, 0, 0, 123456000, time.UTC)

	f.Fuzz(func(t *testing.T, body []byte) {
		var in ProductInput
		if err := decodeStrict(body, &in); err != nil {
			if bre, ok := errors.AsType[*BadRequestError](err); !ok || bre.Detail == "" {
				t.Fatalf("decodeStrict(%q) error = %#v, want a *BadRequestError with a detail", body, err)
			}
			return
		}
		if problems := in.Valid(); len(problems) > 0 {
			return
		}
		// The service accepted it: so must the document.
		if err := fzVisit(inputSchema, body, false); err != nil {
			t.Errorf("body %q is valid to the service but not to the ProductInput schema: %v", body, err)
		}

		want := Product{ID: 7, Version: 3, CreatedAt: created, UpdatedAt: created.Add(time.Microsecond)}
		in.apply(&want, false)
		b := appendProduct(nil, &want)
		if !utf8.Valid(b) || !json.Valid(b) {
			t.Fatalf("appendProduct(%+v) = %q, not valid UTF-8 JSON", want, b)
		}
		var got Product
		if err := json.Unmarshal(b, &got); err != nil {
			t.Fatalf("json.Unmarshal(%q): %v", b, err)
		}
		if diff := cmp.Diff(want, got); diff != "" {
			t.Errorf("product from %q does not survive appendProduct and json.Unmarshal (-want +got):\n%s", body, diff)
		}
		if err := fzVisit(productSchema, b, true); err != nil {
			t.Errorf("product JSON %q does not match the Product schema: %v", b, err)
		}
	})
}

// FuzzDecodeReservationInput checks that decoding a POST /reservations body
// never panics, fails only with a *BadRequestError or a *ValidationError,
// and that a body the service accepts is valid to the ReservationInput
// schema (the reference pattern says what unicode.IsPrint allows).
func FuzzDecodeReservationInput(f *testing.F) {
	for _, s := range []string{
		`{"reference":"order-123","lines":[{"product_id":1,"quantity":2}],"ttl_seconds":900}`,
		`{"reference":"caf\u00e9 \ud83d\ude00 #1","lines":[{"product_id":1,"quantity":1},{"product_id":2,"quantity":1000000000000}]}`,
		`{"reference":"a\u00a0b","lines":[{"product_id":1,"quantity":1}]}`,
		`{"reference":"a\u200bb","lines":[{"product_id":1,"quantity":1}]}`,
		`{"reference":"\ud800","lines":[{"product_id":1,"quantity":1}]}`,
		`{"reference":" ","lines":[{"product_id":1,"quantity":1}],"ttl_seconds":86400}`,
		`{"reference":"o","lines":[{"product_id":1,"quantity":1},{"product_id":1,"quantity":2}]}`,
		`{"reference":"o","lines":[{"product_id":1}]}`,
		`{"reference":"o","lines":[{"product_id":1,"quantity":1,"x":1}]}`,
		`{"reference":"o","lines":[null]}`,
		`{"reference":"o","lines":{}}`,
		`{"reference":"o","lines":[],"ttl_seconds":0}`,
		`[]`, `{`, ``,
	} {
		f.Add([]byte(s))
	}
	inputSchema := fzSchema(f, oaLoadDoc(f), "ReservationInput")
	f.Fuzz(func(t *testing.T, body []byte) {
		in, err := decodeReservationInput(body)
		if err != nil {
			_, bad := errors.AsType[*BadRequestError](err)
			_, invalid := errors.AsType[*ValidationError](err)
			if !bad && !invalid {
				t.Fatalf("decodeReservationInput(%q) error = %#v, want a *BadRequestError or a *ValidationError", body, err)
			}
			return
		}
		if problems := in.Valid(); len(problems) > 0 {
			return
		}
		if err := fzVisit(inputSchema, body, false); err != nil {
			t.Errorf("body %q is valid to the service but not to the ReservationInput schema: %v", body, err)
		}
	})
}

// FuzzParseListQuery checks that parsing a listing query never panics,
// that an accepted query gives a filter within the documented bounds, and
// that the cursor after any real product decodes back to itself.
func FuzzParseListQuery(f *testing.F) {
	f.Add("", int64(1), "pen", int64(150), int64(0))
	f.Add("limit=100&sort=-price_cents&min_price_cents=0&max_price_cents=1000000000000&in_stock=true", int64(9223372036854775807), "Ä <&>", int64(1000000000000), int64(-62135596800000000))
	f.Add("q=blue+ink&category=office&sort=name", int64(42), strings.Repeat("\U0001F600", 200), int64(0), int64(1763704800123456))
	f.Add("sort=name&cursor=eyJxIjp7ImxpbWl0IjoiMjAiLCJzb3J0IjoibmFtZSJ9LCJrIjoicGVuIiwiaSI6MX0", int64(2), strings.Repeat("<", 200), int64(1), int64(1))
	f.Add("cursor=eyJxIjp7ImxpbWl0IjoiMjAiLCJzb3J0IjoibmFtZSJ9LCJrIjoicGVuIiwiaSI6MX0", int64(2), "pen", int64(1), int64(1))
	f.Add("limit=100&category=\u2028&q=a+b&min_price_cents=1&max_price_cents=2&in_stock=false&sort=-name", int64(3), strings.Repeat("\u2028x", 100), int64(1), int64(1))
	f.Add("limit=1&limit=2", int64(1), "x", int64(0), int64(0))
	f.Add("categry=x&sort=size", int64(1), "x", int64(0), int64(0))
	f.Add("cursor=%ff&q=%e2%80", int64(1), "x", int64(0), int64(0))
	f.Add("min_price_cents=5&max_price_cents=4", int64(1), "x", int64(0), int64(0))

	f.Fuzz(func(t *testing.T, raw string, id int64, name string, price, createdMicro int64) {
		fl, err := parseListQuery(raw)
		if err != nil {
			if bre, ok := errors.AsType[*BadRequestError](err); !ok || bre.Detail == "" {
				t.Fatalf("parseListQuery(%q) error = %#v, want a *BadRequestError", raw, err)
			}
		} else {
			fzCheckFilter(t, raw, fl)
		}

		// Cursors after real products: positive ids, valid names, prices
		// and timestamps as the store holds them.
		if id < 1 || validText(name, 1, maxNameLen, false) != "" || validPrice(price) != "" {
			return
		}
		p := Product{ID: id, Name: name, PriceCents: price, CreatedAt: time.UnixMicro(createdMicro).UTC()}
		for key := range sortColumns {
			for _, desc := range []bool{false, true} {
				lf := ListFilter{Limit: defaultLimit, Sort: key, Desc: desc}
				if err == nil {
					lf = fl // the fuzzed query, when it is a valid one
					lf.Sort, lf.Desc, lf.After = key, desc, nil
				}
				c := cursorAfter(lf, p)
				enc := c.encode()
				got, gotF, err := decodeCursor(enc)
				if err != nil {
					t.Fatalf("decodeCursor(cursorAfter(%+v, %+v).encode() = %q (%d bytes)): %v", lf, p, enc, len(enc), err)
				}
				if diff := cmp.Diff(c, got); diff != "" {
					t.Fatalf("cursor for sort %s does not round-trip (-want +got):\n%s", lf.sortParam(), diff)
				}
				if diff := cmp.Diff(lf, gotF); diff != "" {
					t.Fatalf("the query of a cursor does not round-trip (-want +got):\n%s", diff)
				}
				// Alone, the cursor continues its query; with its own
				// query repeated, too.
				for _, q := range []string{"cursor=" + url.QueryEscape(enc), fzEncodeParams(lf.params()) + "&cursor=" + url.QueryEscape(enc)} {
					pf, err := parseListQuery(q)
					if err != nil {
						t.Fatalf("parseListQuery(%q): %v", q, err)
					}
					if pf.After == nil || !cmp.Equal(*pf.After, c) {
						t.Fatalf("parseListQuery(%q).After = %+v, want %+v", q, pf.After, c)
					}
					pf.After = nil
					if diff := cmp.Diff(lf, pf); diff != "" {
						t.Fatalf("parseListQuery(%q) filter (-want +got):\n%s", q, diff)
					}
				}
			}
		}
	})
}

// fzEncodeParams writes listing parameters as a query string.
func fzEncodeParams(p map[string]string) string {
	v := make(url.Values, len(p))
	for k, s := range p {
		v.Set(k, s)
	}
	return v.Encode()
}

// fzCheckFilter checks an accepted listing filter against the contract.
func fzCheckFilter(t *testing.T, raw string, fl ListFilter) {
	t.Helper()
	if fl.Limit < 1 || fl.Limit > maxLimit {
		t.Errorf("parseListQuery(%q).Limit = %d, want 1..100", raw, fl.Limit)
	}
	if _, ok := sortColumns[fl.Sort]; !ok {
		t.Errorf("parseListQuery(%q).Sort = %q, not a sort column", raw, fl.Sort)
	}
	for name, v := range map[string]*int64{"min_price_cents": fl.MinPriceCents, "max_price_cents": fl.MaxPriceCents} {
		if v != nil && validPrice(*v) != "" {
			t.Errorf("parseListQuery(%q): %s = %d, want 0..1e12", raw, name, *v)
		}
	}
	if fl.MinPriceCents != nil && fl.MaxPriceCents != nil && *fl.MinPriceCents > *fl.MaxPriceCents {
		t.Errorf("parseListQuery(%q): min_price_cents %d > max_price_cents %d", raw, *fl.MinPriceCents, *fl.MaxPriceCents)
	}
	if fl.Category != nil && validText(*fl.Category, 0, maxCategoryLen, false) != "" {
		t.Errorf("parseListQuery(%q).Category = %q, not a valid category", raw, *fl.Category)
	}
	if len(fl.Terms) > maxQueryTerms {
		t.Errorf("parseListQuery(%q).Terms has %d words, want at most %d", raw, len(fl.Terms), maxQueryTerms)
	}
	for _, term := range fl.Terms {
		// Only words reach the store, so no input is read as query syntax
		// by either engine.
		if term == "" || strings.IndexFunc(term, func(r rune) bool { return !unicode.IsLetter(r) && !unicode.IsDigit(r) }) >= 0 {
			t.Errorf("parseListQuery(%q).Terms = %q: %q is not a word of letters and digits", raw, fl.Terms, term)
		}
	}
	if fl.After != nil && fl.After.Sort != fl.sortParam() {
		t.Errorf("parseListQuery(%q): cursor for sort %q with sort %q", raw, fl.After.Sort, fl.sortParam())
	}
}

// fzStatuses are the statuses the document allows without rate limiting,
// load shedding or a failing database: never a 5xx, never a redirect.
var fzStatuses = map[int]bool{200: true, 201: true, 204: true, 304: true, 400: true, 401: true,
	403: true, 404: true, 405: true, 409: true, 412: true, 413: true, 415: true, 422: true}

// fzValidMethod reports whether m is an HTTP token, as a server would
// require of a request line.
func fzValidMethod(m string) bool {
	if m == "" {
		return false
	}
	for i := 0; i < len(m); i++ {
		c := m[i]
		if c <= ' ' || c >= 0x7f || strings.IndexByte(`"(),/:;<=>?@[\]{}`, c) >= 0 {
			return false
		}
	}
	return true
}

// FuzzHandler sends arbitrary requests through the whole handler over a
// real SQLite store: no panic, no 5xx, only documented statuses, and a
// created product reads back as it was returned.
func FuzzHandler(f *testing.F) {
	seeds := []struct {
		method, path, ct, body string
		auth                   bool
		header                 string
	}{
		{"GET", "/health", "", "", false, ""},
		{"GET", "/ready", "", "", false, ""},
		{"GET", "/products?limit=2&sort=-name", "", "", false, ""},
		{"GET", "/products/1", "", "", false, ""},
		{"HEAD", "/products/1", "", "", false, ""},
		{"POST", "/products", "application/json", `{"sku":"F-1","name":"pen","price_cents":150}`, true, ""},
		{"POST", "/products", "application/json; charset=UTF-8", `{"sku":"F-2","name":"\u2028<&>","description":"a\nb","price_cents":0,"currency":"EUR","stock":5}`, true, ""},
		{"POST", "/products", "application/json", `{"sku":"F-3","name":"pen","price_cents":150}`, false, ""},
		{"POST", "/products", "text/plain", `{}`, true, ""},
		{"POST", "/products", "application/json", `{"sku":"F-4","name":"pen","price_cents":1.5}`, true, ""},
		{"PUT", "/products/1", "application/json", `{"sku":"SEED-1","name":"pencil","price_cents":99}`, true, ""},
		{"PATCH", "/products/1", "application/merge-patch+json", `{"category":null,"stock":3}`, true, ""},
		{"PUT", "/products/2/stock", "application/json", `{"stock":9}`, true, ""},
		{"POST", "/products/2/stock/adjustments", "application/json", `{"delta":-100}`, true, ""},
		{"DELETE", "/products/3", "", "", true, ""},
		{"DELETE", "/health", "", "", false, ""},
		{"BREW", "/products", "", "", false, ""},
		{"GET", "/products/../health", "", "", false, ""},
		{"GET", "/products/%2e%2e/health", "", "", false, ""},
		{"GET", "/products/1%2Fstock", "", "", false, ""},
		{"GET", "//products", "", "", false, ""},
		{"GET", "*", "", "", false, ""},
		{"CONNECT", "/products", "", "", false, ""},
		{"GET", "/products/9223372036854775808", "", "", false, ""},
		{"GET", "/products?cursor=eyJzIjoiaWQiLCJpIjotMX0", "", "", false, ""},
		{"GET", "/products/1", "", "", false, `If-None-Match: W/"1", "2"`},
		{"PUT", "/products/2/stock", "application/json", `{"stock":4}`, true, `If-Match: "1", W/"2", *`},
		{"DELETE", "/products/3", "", "", true, `If-Match: "x`},
		{"POST", "/products", "application/json", `{"sku":"F-9","name":"pen","price_cents":1}`, true, "Idempotency-Key: k1"},
		{"POST", "/products/1/stock/adjustments", "application/json", `{"delta":1}`, true, "Idempotency-Key: \x01"},
		{"GET", "/health", "", "", false, "X-Request-ID: abc.DEF_1-2"},
	}
	for _, s := range seeds {
		f.Add(s.method, s.path, s.ct, []byte(s.body), s.auth, s.header, "")
	}
	// The Authorization header, fuzzed: credentials with one scope, the
	// scheme's spellings, and what is not a bearer token at all.
	for _, s := range []struct{ method, path, ct, body, authorization string }{
		{"POST", "/products", "application/json", `{"sku":"F-20","name":"pen","price_cents":1}`, "Bearer " + mtCatalogToken},
		{"POST", "/products", "application/json", `{"sku":"F-21","name":"pen","price_cents":1}`, "Bearer " + mtFeedToken},
		{"GET", "/events", "", "", "Bearer " + mtFeedToken},
		{"GET", "/events", "", "", "Bearer " + mtCatalogToken},
		{"PUT", "/products/1/stock", "application/json", `{"stock":2}`, "bearer   " + mtToken + " "},
		{"DELETE", "/products/1", "", "", "Basic dDp0"},
		{"GET", "/reservations?reference=x", "", "", "Bearer"},
		{"GET", "/products/1", "", "", "Bearer " + mtFeedToken},
	} {
		f.Add(s.method, s.path, s.ct, []byte(s.body), false, "", s.authorization)
	}

	// One store per fuzz target (and per fuzzing worker process), with a
	// few products for the id routes to find.
	s := mtNewServer(f)
	for i := 1; i <= 3; i++ {
		if rec := s.do(f, http.MethodPost, "/products", fmt.Sprintf(`{"sku":"SEED-%d","name":"seed","price_cents":100,"stock":10}`, i)); rec.Code != http.StatusCreated {
			f.Fatalf("seed product %d: status %d: %s", i, rec.Code, rec.Body)
		}
	}

	f.Fuzz(func(t *testing.T, method, target, contentType string, body []byte, auth bool, header, authorization string) {
		// What a server would refuse before the handler sees it.
		hname, hvalue, _ := strings.Cut(header, ":")
		hvalue = strings.TrimSpace(hvalue)
		if !fzValidMethod(method) || strings.ContainsAny(contentType, "\r\n\x00") || strings.ContainsAny(target, " \r\n\x00") || strings.ContainsAny(authorization, "\r\n\x00") ||
			(header != "" && (!fzValidMethod(hname) || strings.ContainsAny(hvalue, "\r\n\x00"))) {
			return
		}
		u, err := url.ParseRequestURI(target)
		if err != nil || (target != "*" && !strings.HasPrefix(target, "/")) {
			return
		}
		req := httptest.NewRequest(http.MethodGet, "/", bytes.NewReader(body))
		req.Method, req.URL, req.RequestURI = method, u, target
		if contentType != "" {
			req.Header.Set("Content-Type", contentType)
		}
		if auth {
			req.Header.Set("Authorization", "Bearer "+mtToken)
		}
		if authorization != "" {
			req.Header.Set("Authorization", authorization)
		}
		if header != "" {
			req.Header.Add(hname, hvalue)
		}
		rec := httptest.NewRecorder()
		s.handler.ServeHTTP(rec, req)

		desc := fmt.Sprintf("%s %q (Content-Type %q, auth %v, header %q, Authorization %q, body %q)", method, target, contentType, auth, header, authorization, body)
		if !fzStatuses[rec.Code] {
			t.Fatalf("%s: status %d, not a documented status; headers %v; body: %s", desc, rec.Code, rec.Header(), rec.Body)
		}
		h := rec.Header()
		if h.Get("X-Content-Type-Options") != "nosniff" || h.Get("X-Request-Id") == "" {
			t.Errorf("%s: X-Content-Type-Options %q, X-Request-ID %q; want nosniff and an id", desc, h.Get("X-Content-Type-Options"), h.Get("X-Request-Id"))
		}
		if id := req.Header.Get("X-Request-Id"); validRequestID(id) && h.Get("X-Request-Id") != id {
			t.Errorf("%s: X-Request-ID %q, want the request's %q echoed", desc, h.Get("X-Request-Id"), id)
		}
		switch wa := h.Get("WWW-Authenticate"); rec.Code {
		case http.StatusUnauthorized:
			if !strings.HasPrefix(wa, "Bearer ") {
				t.Errorf("%s: 401 with WWW-Authenticate %q, want a Bearer challenge", desc, wa)
			}
		case http.StatusForbidden:
			if !strings.Contains(wa, `error="insufficient_scope", scope="`) {
				t.Errorf("%s: 403 with WWW-Authenticate %q, want insufficient_scope naming the scope", desc, wa)
			}
		}
		if rec.Code >= 400 && h.Get("Content-Type") != contentTypeProblem {
			t.Errorf("%s: status %d with Content-Type %q, want %s", desc, rec.Code, h.Get("Content-Type"), contentTypeProblem)
		}
		if rec.Code != http.StatusNoContent && rec.Code != http.StatusNotModified && method != http.MethodHead &&
			h.Get("Content-Type") != "" && strings.Contains(h.Get("Content-Type"), "json") && !json.Valid(rec.Body.Bytes()) {
			t.Errorf("%s: status %d body is not valid JSON: %q", desc, rec.Code, rec.Body)
		}

		// A replay answers with the original body, which later writes may
		// have made stale.
		if method == http.MethodPost && u.Path == "/products" && rec.Code == http.StatusCreated && h.Get("Idempotency-Replayed") == "" {
			loc := h.Get("Location")
			var p Product
			if err := json.Unmarshal(rec.Body.Bytes(), &p); err != nil {
				t.Fatalf("%s: 201 body %q: %v", desc, rec.Body, err)
			}
			if loc != "/products/"+strconv.FormatInt(p.ID, 10) {
				t.Fatalf("%s: Location %q, want /products/%d", desc, loc, p.ID)
			}
			got := s.do(t, http.MethodGet, loc, "")
			if got.Code != http.StatusOK || !bytes.Equal(got.Body.Bytes(), rec.Body.Bytes()) {
				t.Errorf("%s: GET %s = %d %q, want 200 %q", desc, loc, got.Code, got.Body, rec.Body)
			}
			if got.Header().Get("ETag") != h.Get("ETag") {
				t.Errorf("%s: GET %s ETag %q, want %q as on the 201", desc, loc, got.Header().Get("ETag"), h.Get("ETag"))
			}
		}
	})
}
