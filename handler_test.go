package main

import (
	"bufio"
	"bytes"
	"context"
	"encoding/base64"
	"encoding/json"
	"errors"
	"fmt"
	"go/ast"
	"go/parser"
	"go/token"
	"io"
	"math"
	"math/rand/v2"
	"net"
	"net/http"
	"net/http/httptest"
	"net/url"
	"path/filepath"
	"regexp"
	"slices"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/google/go-cmp/cmp"
	"github.com/google/go-cmp/cmp/cmpopts"
)

// omit is a productBody value that leaves the member out.
const omit = "\x00omit"

// productBody returns a valid create body for sku with the members in over
// replaced (or left out when their value is omit).
func productBody(tb testing.TB, sku string, over map[string]any) string {
	tb.Helper()
	m := map[string]any{"sku": sku, "name": "pen", "price_cents": 150}
	for k, v := range over {
		if v == omit {
			delete(m, k)
			continue
		}
		m[k] = v
	}
	b, err := json.Marshal(m)
	if err != nil {
		tb.Fatalf("json.Marshal(%v): %v", m, err)
	}
	return string(b)
}

// ignoreServerFields ignores what the service assigns.
var ignoreServerFields = cmpopts.IgnoreFields(Product{}, "ID", "CreatedAt", "UpdatedAt")

func TestHandleCreateProduct_validation(t *testing.T) {
	raw := func(s string) json.RawMessage { return json.RawMessage(s) }
	tests := []struct {
		name       string
		over       map[string]any
		wantStatus int
		wantErrors []string // members named in "errors"
	}{
		{name: "minimal", wantStatus: 201},
		{name: "all fields", over: map[string]any{"description": "blue ink", "category": "office", "currency": "EUR", "stock": 5}, wantStatus: 201},

		{name: "sku missing", over: map[string]any{"sku": omit}, wantStatus: 422, wantErrors: []string{"sku"}},
		{name: "sku null", over: map[string]any{"sku": nil}, wantStatus: 400, wantErrors: []string{"sku"}},
		{name: "sku empty", over: map[string]any{"sku": ""}, wantStatus: 422, wantErrors: []string{"sku"}},
		{name: "sku 64 chars", over: map[string]any{"sku": strings.Repeat("s", 64)}, wantStatus: 201},
		{name: "sku 65 chars", over: map[string]any{"sku": strings.Repeat("s", 65)}, wantStatus: 422, wantErrors: []string{"sku"}},
		{name: "sku all allowed characters", over: map[string]any{"sku": "Az09._-"}, wantStatus: 201},
		{name: "sku with space", over: map[string]any{"sku": "A 1"}, wantStatus: 422, wantErrors: []string{"sku"}},
		{name: "sku with slash", over: map[string]any{"sku": "A/1"}, wantStatus: 422, wantErrors: []string{"sku"}},
		{name: "sku non-ASCII", over: map[string]any{"sku": "Ä-1"}, wantStatus: 422, wantErrors: []string{"sku"}},
		{name: "sku wrong type", over: map[string]any{"sku": 7}, wantStatus: 400, wantErrors: []string{"sku"}},

		{name: "name missing", over: map[string]any{"name": omit}, wantStatus: 422, wantErrors: []string{"name"}},
		{name: "name empty", over: map[string]any{"name": ""}, wantStatus: 422, wantErrors: []string{"name"}},
		{name: "name blank", over: map[string]any{"name": "   "}, wantStatus: 422, wantErrors: []string{"name"}},
		{name: "name 200 runes", over: map[string]any{"name": strings.Repeat("é", 200)}, wantStatus: 201},
		{name: "name 201 runes", over: map[string]any{"name": strings.Repeat("é", 201)}, wantStatus: 422, wantErrors: []string{"name"}},
		{name: "name unicode", over: map[string]any{"name": "Crème brûlée ✓ 日本"}, wantStatus: 201},
		{name: "name newline", over: map[string]any{"name": "a\nb"}, wantStatus: 422, wantErrors: []string{"name"}},
		{name: "name tab", over: map[string]any{"name": "a\tb"}, wantStatus: 422, wantErrors: []string{"name"}},
		{name: "name bell", over: map[string]any{"name": "a\u0007"}, wantStatus: 422, wantErrors: []string{"name"}},
		{name: "name NUL", over: map[string]any{"name": "\u0000"}, wantStatus: 422, wantErrors: []string{"name"}},
		{name: "name DEL", over: map[string]any{"name": "a\u007f"}, wantStatus: 422, wantErrors: []string{"name"}},
		{name: "name C1 control", over: map[string]any{"name": "a\u0085"}, wantStatus: 422, wantErrors: []string{"name"}},

		{name: "description 4000 runes", over: map[string]any{"description": strings.Repeat("ü", 4000)}, wantStatus: 201},
		{name: "description 4001 runes", over: map[string]any{"description": strings.Repeat("ü", 4001)}, wantStatus: 422, wantErrors: []string{"description"}},
		{name: "description multiline", over: map[string]any{"description": "line 1\nline 2\r\n\tindented"}, wantStatus: 201},
		{name: "description control", over: map[string]any{"description": "a\u0001"}, wantStatus: 422, wantErrors: []string{"description"}},
		{name: "description empty", over: map[string]any{"description": ""}, wantStatus: 201},
		{name: "description null", over: map[string]any{"description": nil}, wantStatus: 400, wantErrors: []string{"description"}},
		{name: "category null", over: map[string]any{"category": nil}, wantStatus: 400, wantErrors: []string{"category"}},
		{name: "currency null", over: map[string]any{"currency": nil}, wantStatus: 400, wantErrors: []string{"currency"}},
		{name: "name null", over: map[string]any{"name": nil}, wantStatus: 400, wantErrors: []string{"name"}},

		{name: "category 64 chars", over: map[string]any{"category": strings.Repeat("c", 64)}, wantStatus: 201},
		{name: "category 65 chars", over: map[string]any{"category": strings.Repeat("c", 65)}, wantStatus: 422, wantErrors: []string{"category"}},
		{name: "category tab", over: map[string]any{"category": "a\tb"}, wantStatus: 422, wantErrors: []string{"category"}},

		{name: "price missing", over: map[string]any{"price_cents": omit}, wantStatus: 422, wantErrors: []string{"price_cents"}},
		{name: "price null", over: map[string]any{"price_cents": nil}, wantStatus: 400, wantErrors: []string{"price_cents"}},
		{name: "price zero", over: map[string]any{"price_cents": 0}, wantStatus: 201},
		{name: "price max", over: map[string]any{"price_cents": int64(1e12)}, wantStatus: 201},
		{name: "price above max", over: map[string]any{"price_cents": int64(1e12) + 1}, wantStatus: 422, wantErrors: []string{"price_cents"}},
		{name: "price negative", over: map[string]any{"price_cents": -1}, wantStatus: 422, wantErrors: []string{"price_cents"}},
		{name: "price fraction", over: map[string]any{"price_cents": raw("1.5")}, wantStatus: 400, wantErrors: []string{"price_cents"}},
		{name: "price exponent", over: map[string]any{"price_cents": raw("1e3")}, wantStatus: 400, wantErrors: []string{"price_cents"}},
		{name: "price string", over: map[string]any{"price_cents": "150"}, wantStatus: 400, wantErrors: []string{"price_cents"}},
		{name: "price above int64", over: map[string]any{"price_cents": raw("9223372036854775808")}, wantStatus: 400, wantErrors: []string{"price_cents"}},
		{name: "price below int64", over: map[string]any{"price_cents": raw("-9223372036854775809")}, wantStatus: 400, wantErrors: []string{"price_cents"}},

		{name: "currency EUR", over: map[string]any{"currency": "EUR"}, wantStatus: 201},
		{name: "currency lower case", over: map[string]any{"currency": "usd"}, wantStatus: 422, wantErrors: []string{"currency"}},
		{name: "currency two letters", over: map[string]any{"currency": "US"}, wantStatus: 422, wantErrors: []string{"currency"}},
		{name: "currency four letters", over: map[string]any{"currency": "EURO"}, wantStatus: 422, wantErrors: []string{"currency"}},
		{name: "currency empty", over: map[string]any{"currency": ""}, wantStatus: 422, wantErrors: []string{"currency"}},
		{name: "currency digit", over: map[string]any{"currency": "U5D"}, wantStatus: 422, wantErrors: []string{"currency"}},
		{name: "currency non-ASCII", over: map[string]any{"currency": "ÄBC"}, wantStatus: 422, wantErrors: []string{"currency"}},

		{name: "stock zero", over: map[string]any{"stock": 0}, wantStatus: 201},
		{name: "stock max", over: map[string]any{"stock": int64(1e12)}, wantStatus: 201},
		{name: "stock above max", over: map[string]any{"stock": int64(1e12) + 1}, wantStatus: 422, wantErrors: []string{"stock"}},
		{name: "stock negative", over: map[string]any{"stock": -1}, wantStatus: 422, wantErrors: []string{"stock"}},
		{name: "stock fraction", over: map[string]any{"stock": raw("2.5")}, wantStatus: 400, wantErrors: []string{"stock"}},
		{name: "stock null", over: map[string]any{"stock": nil}, wantStatus: 400, wantErrors: []string{"stock"}},

		{name: "every required field missing", over: map[string]any{"sku": omit, "name": omit, "price_cents": omit}, wantStatus: 422, wantErrors: []string{"name", "price_cents", "sku"}},
		{name: "several rules broken", over: map[string]any{"name": "", "currency": "usd", "stock": -1}, wantStatus: 422, wantErrors: []string{"currency", "name", "stock"}},
		{name: "id is not writable", over: map[string]any{"id": 7}, wantStatus: 400, wantErrors: []string{"id"}},
		{name: "version is not writable", over: map[string]any{"version": 7}, wantStatus: 400, wantErrors: []string{"version"}},
	}
	ts := newTestServer(t, nil)
	for i, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			body := productBody(t, fmt.Sprintf("V-%d", i), tt.over)
			before := ts.svc.store.Count()
			r := ts.write(t, http.MethodPost, "/products", body)
			if tt.wantStatus != http.StatusCreated {
				slug := map[int]string{400: "bad-request", 422: "validation"}[tt.wantStatus]
				checkProblem(t, r, tt.wantStatus, slug, tt.wantErrors)
				if got := ts.svc.store.Count(); got != before {
					t.Errorf("POST /products %s: product count = %d, want %d (nothing created)", body, got, before)
				}
				return
			}
			if r.status != http.StatusCreated {
				t.Fatalf("POST /products %s = %v, want 201", body, r)
			}
			// What was stored is what was sent, with the defaults filled in.
			var in ProductInput
			if err := json.Unmarshal([]byte(body), &in); err != nil {
				t.Fatal(err)
			}
			var want Product
			in.apply(&want, false)
			want.Version = 1
			got := decodeProduct(t, r.body)
			if diff := cmp.Diff(want, got, ignoreServerFields); diff != "" {
				t.Errorf("POST /products %s product mismatch (-want +got):\n%s", body, diff)
			}
			if diff := cmp.Diff(got, ts.getProduct(t, got.ID)); diff != "" {
				t.Errorf("GET after POST %s mismatch (-want +got):\n%s", body, diff)
			}
		})
	}
}

func TestHandleCreateProduct_created(t *testing.T) {
	ts := newTestServer(t, nil)
	r := ts.write(t, http.MethodPost, "/products", `{"sku":"A-1","name":"pen","price_cents":150}`)
	if r.status != http.StatusCreated {
		t.Fatalf("POST /products = %v, want 201", r)
	}
	got := decodeProduct(t, r.body)
	want := Product{SKU: "A-1", Name: "pen", PriceCents: 150, Currency: "USD", Version: 1}
	if diff := cmp.Diff(want, got, ignoreServerFields); diff != "" {
		t.Errorf("created product mismatch (-want +got):\n%s", diff)
	}
	if got.ID < 1 {
		t.Errorf("id = %d, want a positive id", got.ID)
	}
	if loc, want := r.header.Get("Location"), "/products/"+strconv.FormatInt(got.ID, 10); loc != want {
		t.Errorf("Location = %q, want %q", loc, want)
	}
	if et := r.header.Get("ETag"); et != `"1"` {
		t.Errorf("ETag = %q, want %q", et, `"1"`)
	}
	if ct := r.header.Get("Content-Type"); ct != "application/json" {
		t.Errorf("Content-Type = %q, want application/json", ct)
	}
	if !got.CreatedAt.Equal(got.UpdatedAt) || got.CreatedAt.IsZero() {
		t.Errorf("created_at = %v, updated_at = %v, want equal and set", got.CreatedAt, got.UpdatedAt)
	}

	// Members in the documented order, timestamps in UTC with microseconds.
	dec := json.NewDecoder(bytes.NewReader(r.body))
	dec.UseNumber()
	var keys []string
	values := map[string]any{}
	dec.Token()
	for dec.More() {
		k, _ := dec.Token()
		var v any
		dec.Decode(&v)
		keys = append(keys, k.(string))
		values[k.(string)] = v
	}
	wantKeys := []string{"id", "sku", "name", "description", "category", "price_cents", "currency", "stock", "reserved", "available", "version", "created_at", "updated_at"}
	if diff := cmp.Diff(wantKeys, keys); diff != "" {
		t.Errorf("member order mismatch (-want +got):\n%s", diff)
	}
	stamp := regexp.MustCompile(`^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{6}Z$`)
	for _, k := range []string{"created_at", "updated_at"} {
		if s, _ := values[k].(string); !stamp.MatchString(s) {
			t.Errorf("%s = %q, want RFC 3339 UTC with microseconds", k, s)
		}
	}

	// The Location answers with the same product and ETag.
	r2 := ts.get(t, r.header.Get("Location"))
	if r2.status != http.StatusOK {
		t.Fatalf("GET Location = %v, want 200", r2)
	}
	if diff := cmp.Diff(got, decodeProduct(t, r2.body)); diff != "" {
		t.Errorf("GET Location mismatch (-want +got):\n%s", diff)
	}
	if et := r2.header.Get("ETag"); et != `"1"` {
		t.Errorf("GET ETag = %q, want %q", et, `"1"`)
	}
}

func TestHandleCreateProduct_duplicateSKU(t *testing.T) {
	ts := newTestServer(t, nil)
	first := ts.createProduct(t, "DUP-1", 100)
	r := ts.write(t, http.MethodPost, "/products", `{"sku":"DUP-1","name":"other","price_cents":5}`)
	checkProblem(t, r, http.StatusConflict, "conflict", nil)
	if got := ts.svc.store.Count(); got != 1 {
		t.Errorf("product count = %d, want 1", got)
	}
	if diff := cmp.Diff(first, ts.getProduct(t, first.ID)); diff != "" {
		t.Errorf("first product changed (-want +got):\n%s", diff)
	}
	// A PUT that takes another product's sku is a conflict too.
	second := ts.createProduct(t, "DUP-2", 100)
	r = ts.write(t, http.MethodPut, fmt.Sprintf("/products/%d", second.ID), `{"sku":"DUP-1","name":"x","price_cents":1}`)
	checkProblem(t, r, http.StatusConflict, "conflict", nil)
	if diff := cmp.Diff(second, ts.getProduct(t, second.ID)); diff != "" {
		t.Errorf("second product changed (-want +got):\n%s", diff)
	}
}

func TestParseID(t *testing.T) {
	ts := newTestServer(t, nil)
	p := ts.createProduct(t, "ID-1", 100)
	tests := []struct {
		id         string
		wantStatus int
	}{
		{id: strconv.FormatInt(p.ID, 10), wantStatus: 200},
		{id: "0", wantStatus: 400},
		{id: "-1", wantStatus: 400},
		{id: "abc", wantStatus: 400},
		{id: "1.0", wantStatus: 400},
		{id: "+1", wantStatus: 400},
		{id: "0x1", wantStatus: 400},
		{id: "%201", wantStatus: 400},
		{id: "9223372036854775808", wantStatus: 400},
		{id: "99999999999999999999", wantStatus: 400},
		{id: "9223372036854775807", wantStatus: 404},
		{id: "424242", wantStatus: 404},
	}
	for _, tt := range tests {
		t.Run(tt.id, func(t *testing.T) {
			r := ts.get(t, "/products/"+tt.id)
			switch tt.wantStatus {
			case 200:
				if r.status != 200 {
					t.Fatalf("GET /products/%s = %v, want 200", tt.id, r)
				}
			case 400:
				checkProblem(t, r, 400, "bad-request", []string{"id"})
			case 404:
				checkProblem(t, r, 404, "not-found", nil)
			}
			if tt.wantStatus == 200 {
				return
			}
			// Every write route reads the id the same way, and a bad id
			// changes nothing.
			writes := []struct{ method, suffix, body string }{
				{http.MethodPut, "", `{"sku":"ID-1","name":"x","price_cents":1}`},
				{http.MethodPatch, "", `{"name":"x"}`},
				{http.MethodDelete, "", ""},
				{http.MethodPut, "/stock", `{"stock":1}`},
				{http.MethodPost, "/stock/adjustments", `{"delta":1}`},
			}
			for _, w := range writes {
				r := ts.write(t, w.method, "/products/"+tt.id+w.suffix, w.body)
				if tt.wantStatus == 400 {
					checkProblem(t, r, 400, "bad-request", []string{"id"})
				} else {
					checkProblem(t, r, 404, "not-found", nil)
				}
			}
		})
	}
	if diff := cmp.Diff(p, ts.getProduct(t, p.ID)); diff != "" {
		t.Errorf("product changed by requests for other ids (-want +got):\n%s", diff)
	}
}

func TestHandleGetProduct_ifNoneMatch(t *testing.T) {
	ts := newTestServer(t, nil)
	p := ts.createProduct(t, "INM-1", 100)
	path := fmt.Sprintf("/products/%d", p.ID)
	tests := []struct {
		header     string
		wantStatus int
	}{
		{header: `"1"`, wantStatus: 304},
		{header: `W/"1"`, wantStatus: 304},
		{header: `*`, wantStatus: 304},
		{header: `"7", "1"`, wantStatus: 304},
		{header: `"2"`, wantStatus: 200},
		{header: `1`, wantStatus: 200},
		{header: `"0"`, wantStatus: 200},
	}
	for _, tt := range tests {
		t.Run(tt.header, func(t *testing.T) {
			r := ts.get(t, path, "If-None-Match", tt.header)
			if r.status != tt.wantStatus {
				t.Fatalf("GET %s If-None-Match: %s = %v, want %d", path, tt.header, r, tt.wantStatus)
			}
			if et := r.header.Get("ETag"); et != `"1"` {
				t.Errorf("ETag = %q, want %q", et, `"1"`)
			}
			if tt.wantStatus == 304 && len(r.body) != 0 {
				t.Errorf("304 body = %q, want empty", r.body)
			}
			if tt.wantStatus == 200 {
				if diff := cmp.Diff(p, decodeProduct(t, r.body)); diff != "" {
					t.Errorf("body mismatch (-want +got):\n%s", diff)
				}
			}
		})
	}
	// After a change the old tag no longer matches.
	ts.write(t, http.MethodPatch, path, `{"name":"renamed"}`)
	if r := ts.get(t, path, "If-None-Match", `"1"`); r.status != 200 || r.header.Get("ETag") != `"2"` {
		t.Errorf("GET after PATCH with If-None-Match \"1\" = %v ETag %q, want 200 with ETag \"2\"", r, r.header.Get("ETag"))
	}
}

// writeKinds are the writes of a product that honour If-Match.
var writeKinds = []struct {
	name, method, suffix, body string
}{
	{"PUT", http.MethodPut, "", `{"sku":"IFM","name":"replaced","price_cents":999}`},
	{"PATCH", http.MethodPatch, "", `{"name":"patched"}`},
	{"DELETE", http.MethodDelete, "", ""},
	{"stock set", http.MethodPut, "/stock", `{"stock":42}`},
	{"stock adjustment", http.MethodPost, "/stock/adjustments", `{"delta":3}`},
}

func TestWriteTarget_ifMatch(t *testing.T) {
	for _, w := range writeKinds {
		t.Run(w.name, func(t *testing.T) {
			ts := newTestServer(t, nil)
			p := ts.createProduct(t, "IFM", 100, `"stock":5`)
			path := fmt.Sprintf("/products/%d%s", p.ID, w.suffix)

			// Stale, weak (never matches a strong comparison) or unknown tags: 412.
			for _, tag := range []string{`"2"`, `"0"`, `W/"1"`, `"2", "3"`} {
				r := ts.write(t, w.method, path, w.body, "If-Match", tag)
				checkProblem(t, r, http.StatusPreconditionFailed, "precondition-failed", nil)
				if diff := cmp.Diff(p, ts.getProduct(t, p.ID)); diff != "" {
					t.Errorf("%s %s If-Match: %s changed the product (-want +got):\n%s", w.method, path, tag, diff)
				}
			}
			// A malformed header is a bad request, and changes nothing.
			r := ts.write(t, w.method, path, w.body, "If-Match", `1`)
			checkProblem(t, r, http.StatusBadRequest, "bad-request", []string{"If-Match"})
			if diff := cmp.Diff(p, ts.getProduct(t, p.ID)); diff != "" {
				t.Errorf("malformed If-Match changed the product (-want +got):\n%s", diff)
			}

			// The current tag, in a list, passes.
			r = ts.write(t, w.method, path, w.body, "If-Match", `"9", "1"`)
			wantStatus := http.StatusOK
			if w.method == http.MethodDelete {
				wantStatus = http.StatusNoContent
			}
			if r.status != wantStatus {
				t.Fatalf("%s %s with If-Match \"1\" = %v, want %d", w.method, path, r, wantStatus)
			}
			if w.method != http.MethodDelete {
				if et := r.header.Get("ETag"); et != `"2"` {
					t.Errorf("ETag after write = %q, want %q", et, `"2"`)
				}
				// "*" matches any current version.
				r = ts.write(t, w.method, path, w.body, "If-Match", `*`)
				if r.status != http.StatusOK {
					t.Errorf("%s %s with If-Match * = %v, want 200", w.method, path, r)
				}
			}
		})
	}
}

func TestHandleDeleteProduct(t *testing.T) {
	ts := newTestServer(t, nil)
	p := ts.createProduct(t, "DEL-1", 100)
	keep := ts.createProduct(t, "DEL-2", 100)
	path := fmt.Sprintf("/products/%d", p.ID)

	r := ts.write(t, http.MethodDelete, path, "")
	if r.status != http.StatusNoContent || len(r.body) != 0 {
		t.Fatalf("DELETE %s = %v, want 204 with no body", path, r)
	}
	checkProblem(t, ts.get(t, path), http.StatusNotFound, "not-found", nil)
	checkProblem(t, ts.write(t, http.MethodDelete, path, ""), http.StatusNotFound, "not-found", nil)
	if diff := cmp.Diff(keep, ts.getProduct(t, keep.ID)); diff != "" {
		t.Errorf("other product changed (-want +got):\n%s", diff)
	}
	// The sku is free again.
	again := ts.createProduct(t, "DEL-1", 100)
	if again.ID == p.ID {
		t.Errorf("new product reused deleted id %d", p.ID)
	}
}

func TestHandleReplaceProduct(t *testing.T) {
	ts := newTestServer(t, nil)
	p := ts.createProduct(t, "PUT-1", 100, `"description":"old","category":"office","currency":"EUR","stock":7`)
	path := fmt.Sprintf("/products/%d", p.ID)

	// Omitted optional fields take their defaults, except stock, which is kept.
	r := ts.write(t, http.MethodPut, path, `{"sku":"PUT-1b","name":"new name","price_cents":250}`)
	if r.status != http.StatusOK {
		t.Fatalf("PUT %s = %v, want 200", path, r)
	}
	got := decodeProduct(t, r.body)
	want := p
	want.SKU, want.Name, want.PriceCents = "PUT-1b", "new name", 250
	want.Description, want.Category, want.Currency = "", "", "USD"
	want.Version = 2
	if diff := cmp.Diff(want, got, cmpopts.IgnoreFields(Product{}, "UpdatedAt")); diff != "" {
		t.Errorf("PUT without stock (-want +got):\n%s", diff)
	}
	if got.Stock != 7 {
		t.Errorf("stock after PUT without stock = %d, want 7 (kept)", got.Stock)
	}
	if !got.CreatedAt.Equal(p.CreatedAt) || got.UpdatedAt.Before(p.UpdatedAt) {
		t.Errorf("created_at %v -> %v, updated_at %v -> %v: want created_at kept and updated_at not earlier",
			p.CreatedAt, got.CreatedAt, p.UpdatedAt, got.UpdatedAt)
	}
	if et := r.header.Get("ETag"); et != `"2"` {
		t.Errorf("ETag = %q, want %q", et, `"2"`)
	}

	// With stock, stock is replaced too.
	r = ts.write(t, http.MethodPut, path, `{"sku":"PUT-1b","name":"new name","price_cents":250,"stock":0}`)
	if got := decodeProduct(t, r.body); r.status != 200 || got.Stock != 0 || got.Version != 3 {
		t.Errorf("PUT with stock 0 = %v, want 200 with stock 0 and version 3", r)
	}

	// The same content again is not a change: the version stays.
	r = ts.write(t, http.MethodPut, path, `{"sku":"PUT-1b","name":"new name","price_cents":250}`)
	if got := decodeProduct(t, r.body); r.status != 200 || got.Version != 3 {
		t.Errorf("PUT of identical content = %v, want 200 with version 3", r)
	}

	// Validation as for create; nothing changes.
	before := ts.getProduct(t, p.ID)
	r = ts.write(t, http.MethodPut, path, `{"sku":"PUT-1b","name":"","price_cents":-5}`)
	checkProblem(t, r, http.StatusUnprocessableEntity, "validation", []string{"name", "price_cents"})
	r = ts.write(t, http.MethodPut, path, `{"name":"x","price_cents":5}`)
	checkProblem(t, r, http.StatusUnprocessableEntity, "validation", []string{"sku"})
	// null is a wrong type in a PUT body, for every field: leaving a field
	// out is how to ask for its default.
	for _, field := range []string{"description", "category", "currency", "stock"} {
		body := `{"sku":"PUT-1b","name":"new name","price_cents":250,"` + field + `":null}`
		checkProblem(t, ts.write(t, http.MethodPut, path, body), http.StatusBadRequest, "bad-request", []string{field})
	}
	if diff := cmp.Diff(before, ts.getProduct(t, p.ID)); diff != "" {
		t.Errorf("invalid PUT changed the product (-want +got):\n%s", diff)
	}
	checkProblem(t, ts.write(t, http.MethodPut, "/products/424242", `{"sku":"Z","name":"x","price_cents":5}`),
		http.StatusNotFound, "not-found", nil)
}

func TestHandlePatchProduct(t *testing.T) {
	tests := []struct {
		name        string
		contentType string
		body        string
		change      func(p *Product) // nil: no change
		wantStatus  int
		wantErrors  []string
	}{
		{name: "name", body: `{"name":"renamed"}`, change: func(p *Product) { p.Name = "renamed" }, wantStatus: 200},
		{name: "merge-patch content type", contentType: "application/merge-patch+json", body: `{"price_cents":99}`,
			change: func(p *Product) { p.PriceCents = 99 }, wantStatus: 200},
		{name: "several fields", body: `{"price_cents":99,"currency":"GBP","stock":1}`,
			change: func(p *Product) { p.PriceCents, p.Currency, p.Stock = 99, "GBP", 1 }, wantStatus: 200},
		{name: "null description resets it", body: `{"description":null}`, change: func(p *Product) { p.Description = "" }, wantStatus: 200},
		{name: "null category resets it", body: `{"category":null}`, change: func(p *Product) { p.Category = "" }, wantStatus: 200},
		{name: "null currency resets it", body: `{"currency":null}`, change: func(p *Product) { p.Currency = "USD" }, wantStatus: 200},
		{name: "null stock resets it", body: `{"stock":null}`, change: func(p *Product) { p.Stock = 0 }, wantStatus: 200},
		{name: "empty patch", body: `{}`, wantStatus: 200},
		{name: "same value", body: `{"name":"patch me"}`, wantStatus: 200},

		{name: "null name", body: `{"name":null}`, wantStatus: 422, wantErrors: []string{"name"}},
		{name: "null sku", body: `{"sku":null}`, wantStatus: 422, wantErrors: []string{"sku"}},
		{name: "null price", body: `{"price_cents":null}`, wantStatus: 422, wantErrors: []string{"price_cents"}},
		{name: "empty name", body: `{"name":""}`, wantStatus: 422, wantErrors: []string{"name"}},
		{name: "bad sku", body: `{"sku":"a b"}`, wantStatus: 422, wantErrors: []string{"sku"}},
		{name: "negative stock", body: `{"stock":-1}`, wantStatus: 422, wantErrors: []string{"stock"}},
		{name: "bad currency", body: `{"currency":"eur"}`, wantStatus: 422, wantErrors: []string{"currency"}},
		{name: "long description", body: `{"description":"` + strings.Repeat("d", 4001) + `"}`, wantStatus: 422, wantErrors: []string{"description"}},
		{name: "long category", body: `{"category":"` + strings.Repeat("c", 65) + `"}`, wantStatus: 422, wantErrors: []string{"category"}},
		{name: "valid and invalid together", body: `{"name":"ok","price_cents":-1}`, wantStatus: 422, wantErrors: []string{"price_cents"}},

		{name: "id", body: `{"id":3}`, wantStatus: 400, wantErrors: []string{"id"}},
		{name: "version", body: `{"version":3}`, wantStatus: 400, wantErrors: []string{"version"}},
		{name: "unknown field", body: `{"colour":"red"}`, wantStatus: 400, wantErrors: []string{"colour"}},
		{name: "wrong type", body: `{"price_cents":"1"}`, wantStatus: 400, wantErrors: []string{"price_cents"}},
		{name: "fraction", body: `{"stock":1.5}`, wantStatus: 400, wantErrors: []string{"stock"}},
		{name: "out of int64 range", body: `{"stock":9223372036854775808}`, wantStatus: 400, wantErrors: []string{"stock"}},
		{name: "duplicate key", body: `{"name":"a","name":"b"}`, wantStatus: 400, wantErrors: []string{"name"}},
		{name: "array", body: `[]`, wantStatus: 400},
		{name: "trailing data", body: `{"name":"a"} {}`, wantStatus: 400},
		{name: "text/plain", contentType: "text/plain", body: `{"name":"a"}`, wantStatus: 415},
	}
	ts := newTestServer(t, nil)
	for i, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			p := ts.createProduct(t, fmt.Sprintf("P-%d", i), 100, `"name":"patch me"`,
				`"description":"desc"`, `"category":"cat"`, `"currency":"EUR"`, `"stock":5`)
			path := fmt.Sprintf("/products/%d", p.ID)
			ct := tt.contentType
			if ct == "" {
				ct = "application/json"
			}
			r := ts.write(t, http.MethodPatch, path, tt.body, "Content-Type", ct)
			switch tt.wantStatus {
			case 200:
				if r.status != 200 {
					t.Fatalf("PATCH %s = %v, want 200", tt.body, r)
				}
			case 400:
				checkProblem(t, r, 400, "bad-request", tt.wantErrors)
			case 415:
				checkProblem(t, r, 415, "unsupported-media-type", nil)
			case 422:
				checkProblem(t, r, 422, "validation", tt.wantErrors)
			}
			want := p
			if tt.wantStatus == 200 && tt.change != nil {
				tt.change(&want)
				want.Version++
			}
			got := ts.getProduct(t, p.ID)
			if diff := cmp.Diff(want, got, cmpopts.IgnoreFields(Product{}, "UpdatedAt")); diff != "" {
				t.Errorf("product after PATCH %s (-want +got):\n%s", tt.body, diff)
			}
			if tt.wantStatus == 200 {
				if diff := cmp.Diff(got, decodeProduct(t, r.body)); diff != "" {
					t.Errorf("PATCH response differs from GET (-want +got):\n%s", diff)
				}
			}
		})
	}
}

func TestHandleSetStock(t *testing.T) {
	tests := []struct {
		name       string
		body       string
		wantStatus int
		wantStock  int64
		wantErrors []string
	}{
		{name: "set", body: `{"stock":7}`, wantStatus: 200, wantStock: 7},
		{name: "zero", body: `{"stock":0}`, wantStatus: 200, wantStock: 0},
		{name: "max", body: `{"stock":1000000000000}`, wantStatus: 200, wantStock: 1e12},
		{name: "unchanged", body: `{"stock":5}`, wantStatus: 200, wantStock: 5},
		{name: "above max", body: `{"stock":1000000000001}`, wantStatus: 422, wantErrors: []string{"stock"}},
		{name: "negative", body: `{"stock":-1}`, wantStatus: 422, wantErrors: []string{"stock"}},
		{name: "missing", body: `{}`, wantStatus: 422, wantErrors: []string{"stock"}},
		{name: "null", body: `{"stock":null}`, wantStatus: 400, wantErrors: []string{"stock"}},
		{name: "string", body: `{"stock":"7"}`, wantStatus: 400, wantErrors: []string{"stock"}},
		{name: "fraction", body: `{"stock":1.5}`, wantStatus: 400, wantErrors: []string{"stock"}},
		{name: "unknown field", body: `{"stock":1,"delta":1}`, wantStatus: 400, wantErrors: []string{"delta"}},
		{name: "duplicate key", body: `{"stock":1,"stock":2}`, wantStatus: 400, wantErrors: []string{"stock"}},
		{name: "trailing data", body: `{"stock":1}x`, wantStatus: 400},
	}
	ts := newTestServer(t, nil)
	for i, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			p := ts.createProduct(t, fmt.Sprintf("S-%d", i), 100, `"stock":5`)
			r := ts.write(t, http.MethodPut, fmt.Sprintf("/products/%d/stock", p.ID), tt.body)
			want := p
			switch tt.wantStatus {
			case 200:
				if r.status != 200 {
					t.Fatalf("PUT stock %s = %v, want 200", tt.body, r)
				}
				if tt.wantStock != p.Stock {
					want.Stock = tt.wantStock
					want.Version++
				}
				if diff := cmp.Diff(want, decodeProduct(t, r.body), cmpopts.IgnoreFields(Product{}, "UpdatedAt")); diff != "" {
					t.Errorf("PUT stock %s response (-want +got):\n%s", tt.body, diff)
				}
			case 400:
				checkProblem(t, r, 400, "bad-request", tt.wantErrors)
			case 422:
				checkProblem(t, r, 422, "validation", tt.wantErrors)
			}
			if diff := cmp.Diff(want, ts.getProduct(t, p.ID), cmpopts.IgnoreFields(Product{}, "UpdatedAt")); diff != "" {
				t.Errorf("product after PUT stock %s (-want +got):\n%s", tt.body, diff)
			}
		})
	}
}

func TestHandleAdjustStock(t *testing.T) {
	tests := []struct {
		name       string
		body       string
		wantStatus int
		wantSlug   string
		wantStock  int64 // with wantStatus 200
		wantErrors []string
	}{
		{name: "add", body: `{"delta":5}`, wantStatus: 200, wantStock: 15},
		{name: "remove", body: `{"delta":-4}`, wantStatus: 200, wantStock: 6},
		{name: "remove all", body: `{"delta":-10}`, wantStatus: 200, wantStock: 0},
		{name: "remove too many", body: `{"delta":-11}`, wantStatus: 409, wantSlug: "insufficient-stock"},
		{name: "above max", body: `{"delta":1000000000000}`, wantStatus: 409, wantSlug: "insufficient-stock"},
		{name: "zero", body: `{"delta":0}`, wantStatus: 422, wantSlug: "validation", wantErrors: []string{"delta"}},
		{name: "out of range", body: `{"delta":-1000000000001}`, wantStatus: 422, wantSlug: "validation", wantErrors: []string{"delta"}},
		{name: "missing", body: `{}`, wantStatus: 422, wantSlug: "validation", wantErrors: []string{"delta"}},
		{name: "null", body: `{"delta":null}`, wantStatus: 400, wantSlug: "bad-request", wantErrors: []string{"delta"}},
		{name: "string", body: `{"delta":"1"}`, wantStatus: 400, wantSlug: "bad-request", wantErrors: []string{"delta"}},
		{name: "out of int64 range", body: `{"delta":-9223372036854775809}`, wantStatus: 400, wantSlug: "bad-request", wantErrors: []string{"delta"}},
		{name: "duplicate key", body: `{"delta":1,"delta":2}`, wantStatus: 400, wantSlug: "bad-request", wantErrors: []string{"delta"}},
		{name: "unknown field", body: `{"delta":1,"stock":2}`, wantStatus: 400, wantSlug: "bad-request", wantErrors: []string{"stock"}},
	}
	ts := newTestServer(t, nil)
	for i, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			p := ts.createProduct(t, fmt.Sprintf("ADJ-%d", i), 100, `"stock":10`)
			r := ts.write(t, http.MethodPost, fmt.Sprintf("/products/%d/stock/adjustments", p.ID), tt.body)
			want := p
			if tt.wantStatus == 200 {
				if r.status != 200 {
					t.Fatalf("POST adjustment %s = %v, want 200", tt.body, r)
				}
				want.Stock, want.Version = tt.wantStock, 2
				if diff := cmp.Diff(want, decodeProduct(t, r.body), cmpopts.IgnoreFields(Product{}, "UpdatedAt")); diff != "" {
					t.Errorf("POST adjustment %s response (-want +got):\n%s", tt.body, diff)
				}
			} else {
				checkProblem(t, r, tt.wantStatus, tt.wantSlug, tt.wantErrors)
			}
			// A refused adjustment changes nothing, not even the version.
			if diff := cmp.Diff(want, ts.getProduct(t, p.ID), cmpopts.IgnoreFields(Product{}, "UpdatedAt")); diff != "" {
				t.Errorf("product after adjustment %s (-want +got):\n%s", tt.body, diff)
			}
		})
	}
	checkProblem(t, ts.write(t, http.MethodPost, "/products/424242/stock/adjustments", `{"delta":1}`),
		http.StatusNotFound, "not-found", nil)
}

func TestRequireToken(t *testing.T) {
	ts := newTestServer(t, nil)
	p := ts.createProduct(t, "AUTH-1", 100)
	id := strconv.FormatInt(p.ID, 10)
	writes := []struct{ method, path, body string }{
		{http.MethodPost, "/products", `{"sku":"AUTH-2","name":"x","price_cents":1}`},
		{http.MethodPut, "/products/" + id, `{"sku":"AUTH-1","name":"x","price_cents":1}`},
		{http.MethodPatch, "/products/" + id, `{"name":"x"}`},
		{http.MethodDelete, "/products/" + id, ""},
		{http.MethodPut, "/products/" + id + "/stock", `{"stock":1}`},
		{http.MethodPost, "/products/" + id + "/stock/adjustments", `{"delta":1}`},
	}
	tests := []struct {
		name          string
		authorization string
		wantChallenge string
	}{
		{name: "missing", authorization: "", wantChallenge: `Bearer realm="productsvc"`},
		{name: "wrong token", authorization: "Bearer not-the-token", wantChallenge: `Bearer realm="productsvc", error="invalid_token"`},
		{name: "token prefix", authorization: "Bearer " + testToken[:4], wantChallenge: `Bearer realm="productsvc", error="invalid_token"`},
		{name: "token with suffix", authorization: "Bearer " + testToken + "x", wantChallenge: `Bearer realm="productsvc", error="invalid_token"`},
		{name: "empty bearer", authorization: "Bearer ", wantChallenge: `Bearer realm="productsvc", error="invalid_token"`},
		{name: "basic scheme", authorization: "Basic dGVzdC10b2tlbjo=", wantChallenge: `Bearer realm="productsvc", error="invalid_token"`},
		{name: "token without scheme", authorization: testToken, wantChallenge: `Bearer realm="productsvc", error="invalid_token"`},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			for _, w := range writes {
				r := ts.write(t, w.method, w.path, w.body, "Authorization", tt.authorization)
				checkProblem(t, r, http.StatusUnauthorized, "unauthorized", nil)
				if got := r.header.Get("WWW-Authenticate"); got != tt.wantChallenge {
					t.Errorf("%s %s: WWW-Authenticate = %q, want %q", w.method, w.path, got, tt.wantChallenge)
				}
			}
		})
	}
	if diff := cmp.Diff(p, ts.getProduct(t, p.ID)); diff != "" {
		t.Errorf("unauthorised writes changed the product (-want +got):\n%s", diff)
	}
	if n := ts.svc.store.Count(); n != 1 {
		t.Errorf("product count = %d, want 1", n)
	}
	// Reads need no token; the scheme is case-insensitive.
	if r := ts.get(t, "/products/"+id); r.status != 200 {
		t.Errorf("GET without a token = %v, want 200", r)
	}
	if r := ts.write(t, http.MethodPatch, "/products/"+id, `{"name":"y"}`, "Authorization", "bearer "+testToken); r.status != 200 {
		t.Errorf("PATCH with scheme \"bearer\" = %v, want 200", r)
	}
}

func TestRequireToken_rotation(t *testing.T) {
	// API_TOKEN is a comma-separated list: during a rotation both the old
	// and the new token work; afterwards only the new one.
	tokensFrom := func(apiToken string) []string {
		cfg, err := parseConfig([]string{"productsvc"}, func(k string) string {
			return map[string]string{"API_TOKEN": apiToken}[k]
		}, io.Discard)
		if err != nil {
			t.Fatalf("parseConfig(API_TOKEN=%q) error = %v", apiToken, err)
		}
		return cfg.APITokens
	}
	tests := []struct {
		apiToken string
		accepted []string
		refused  []string
	}{
		{apiToken: "old-token", accepted: []string{"old-token"}, refused: []string{"new-token", "old-token,new-token"}},
		{apiToken: "old-token, new-token", accepted: []string{"old-token", "new-token"}, refused: []string{"other", "old-token, new-token", "old-token,new-token"}},
		{apiToken: " new-token ,", accepted: []string{"new-token"}, refused: []string{"old-token", ""}},
	}
	for _, tt := range tests {
		t.Run(tt.apiToken, func(t *testing.T) {
			ts := newTestServer(t, nil, tokensFrom(tt.apiToken)...)
			for i, tok := range tt.accepted {
				body := fmt.Sprintf(`{"sku":"ROT-%d","name":"x","price_cents":1}`, i)
				if r := ts.write(t, http.MethodPost, "/products", body, "Authorization", "Bearer "+tok); r.status != http.StatusCreated {
					t.Errorf("API_TOKEN=%q: POST with token %q = %v, want 201", tt.apiToken, tok, r)
				}
			}
			for _, tok := range tt.refused {
				r := ts.write(t, http.MethodPost, "/products", `{"sku":"ROT-X","name":"x","price_cents":1}`, "Authorization", "Bearer "+tok)
				if r.status != http.StatusUnauthorized || r.header.Get("WWW-Authenticate") == "" {
					t.Errorf("API_TOKEN=%q: POST with token %q = %v, want 401 with WWW-Authenticate", tt.apiToken, tok, r)
				}
			}
		})
	}
}

func TestNewServer_methodNotAllowed(t *testing.T) {
	ts := newTestServer(t, nil)
	tests := []struct {
		method, path string
		wantAllow    []string
	}{
		{http.MethodDelete, "/products", []string{"GET", "POST"}},
		{http.MethodPut, "/products", []string{"GET", "POST"}},
		{http.MethodPost, "/products/1", []string{"DELETE", "GET", "PATCH", "PUT"}},
		{http.MethodGet, "/products/1/stock", []string{"PUT"}},
		{http.MethodGet, "/products/1/stock/adjustments", []string{"POST"}},
		{http.MethodPost, "/health", []string{"GET"}},
		{http.MethodDelete, "/ready", []string{"GET"}},
	}
	for _, tt := range tests {
		t.Run(tt.method+" "+tt.path, func(t *testing.T) {
			r := ts.write(t, tt.method, tt.path, `{}`)
			checkProblem(t, r, http.StatusMethodNotAllowed, "method-not-allowed", nil)
			var allow []string
			for m := range strings.SplitSeq(r.header.Get("Allow"), ",") {
				allow = append(allow, strings.TrimSpace(m))
			}
			for _, m := range tt.wantAllow {
				if !slices.Contains(allow, m) {
					t.Errorf("Allow = %q, want it to list %s", r.header.Get("Allow"), m)
				}
			}
			if slices.Contains(allow, tt.method) {
				t.Errorf("Allow = %q lists the refused method %s", r.header.Get("Allow"), tt.method)
			}
		})
	}
}

// serveRecorded runs one request through the handler in process. Tests of
// oversized bodies use it: over a real connection the server may close the
// connection before the client has finished sending, and the client then
// sees a write error instead of the 413.
func (ts *testServer) serveRecorded(tb testing.TB, req *http.Request) response {
	tb.Helper()
	rec := httptest.NewRecorder()
	ts.handler.ServeHTTP(rec, req)
	return response{status: rec.Code, header: rec.Result().Header, body: rec.Body.Bytes()}
}

// lengthless hides a reader's length, so the request is sent chunked.
type lengthless struct{ io.Reader }

func TestReadBody_tooLarge(t *testing.T) {
	ts := newTestServer(t, nil)
	// A valid body padded with spaces to exactly n bytes.
	padded := func(sku string, n int) []byte {
		b := []byte(fmt.Sprintf(`{"sku":%q,"name":"big","price_cents":1}`, sku))
		return append(b, bytes.Repeat([]byte(" "), n-len(b))...)
	}
	tests := []struct {
		name       string
		body       []byte
		chunked    bool
		wantStatus int
	}{
		{name: "exactly 1 MiB", body: padded("BIG-1", maxBodyBytes), wantStatus: 201},
		{name: "1 MiB plus one byte", body: padded("BIG-2", maxBodyBytes+1), wantStatus: 413},
		{name: "2 MiB", body: padded("BIG-3", 2*maxBodyBytes), wantStatus: 413},
		{name: "1 MiB plus one byte chunked", body: padded("BIG-4", maxBodyBytes+1), chunked: true, wantStatus: 413},
		{name: "exactly 1 MiB chunked", body: padded("BIG-5", maxBodyBytes), chunked: true, wantStatus: 201},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			var body io.Reader = bytes.NewReader(tt.body)
			if tt.chunked {
				body = lengthless{body}
			}
			req := httptest.NewRequest(http.MethodPost, "/products", body)
			if tt.chunked {
				req.ContentLength = -1
			}
			req.Header.Set("Authorization", "Bearer "+testToken)
			req.Header.Set("Content-Type", "application/json")
			before := ts.svc.store.Count()
			r := ts.serveRecorded(t, req)
			if tt.wantStatus == 413 {
				checkProblem(t, r, http.StatusRequestEntityTooLarge, "payload-too-large", nil)
				if got := ts.svc.store.Count(); got != before {
					t.Errorf("product count = %d, want %d", got, before)
				}
			} else if r.status != tt.wantStatus {
				t.Errorf("POST %d bytes = %v, want %d", len(tt.body), r, tt.wantStatus)
			}
		})
	}
	// Every write with a body is capped.
	p := ts.createProduct(t, "BIG-6", 1)
	for _, w := range []struct{ method, target string }{
		{http.MethodPut, fmt.Sprintf("/products/%d", p.ID)},
		{http.MethodPatch, fmt.Sprintf("/products/%d", p.ID)},
		{http.MethodPut, fmt.Sprintf("/products/%d/stock", p.ID)},
		{http.MethodPost, fmt.Sprintf("/products/%d/stock/adjustments", p.ID)},
	} {
		req := httptest.NewRequest(w.method, w.target, bytes.NewReader(padded("BIG-6", maxBodyBytes+1)))
		req.Header.Set("Authorization", "Bearer "+testToken)
		req.Header.Set("Content-Type", "application/json")
		checkProblem(t, ts.serveRecorded(t, req), http.StatusRequestEntityTooLarge, "payload-too-large", nil)
	}
	if diff := cmp.Diff(p, ts.getProduct(t, p.ID)); diff != "" {
		t.Errorf("oversized writes changed the product (-want +got):\n%s", diff)
	}
}

func TestCheckContentType(t *testing.T) {
	ts := newTestServer(t, nil)
	p := ts.createProduct(t, "CT-1", 100)
	id := strconv.FormatInt(p.ID, 10)
	writes := []struct {
		method, path, body string
		mergePatch         bool
	}{
		{http.MethodPost, "/products", `{"sku":"CT-%d","name":"x","price_cents":1}`, false},
		{http.MethodPut, "/products/" + id, `{"sku":"CT-1","name":"x%d","price_cents":1}`, false},
		{http.MethodPatch, "/products/" + id, `{"name":"y%d"}`, true},
		{http.MethodPut, "/products/" + id + "/stock", `{"stock":%d}`, false},
		{http.MethodPost, "/products/" + id + "/stock/adjustments", `{"delta":%d}`, false},
	}
	tests := []struct {
		contentType string
		ok          bool // for a merge patch, see okPatch
		okPatch     bool
	}{
		{contentType: "", ok: false, okPatch: false},
		{contentType: "text/plain", ok: false, okPatch: false},
		{contentType: "application/xml", ok: false, okPatch: false},
		{contentType: "application/x-www-form-urlencoded", ok: false, okPatch: false},
		{contentType: "application/json; charset=latin1", ok: false, okPatch: false},
		{contentType: "application/json-patch+json", ok: false, okPatch: false},
		{contentType: "application/merge-patch+json", ok: false, okPatch: true},
		{contentType: "json", ok: false, okPatch: false},
		{contentType: "application/json", ok: true, okPatch: true},
		{contentType: "application/json; charset=utf-8", ok: true, okPatch: true},
		{contentType: "Application/JSON; charset=UTF-8", ok: true, okPatch: true},
	}
	n := 1
	for _, tt := range tests {
		t.Run(tt.contentType, func(t *testing.T) {
			for _, w := range writes {
				n++
				body := fmt.Sprintf(w.body, n)
				r := ts.write(t, w.method, w.path, body, "Content-Type", tt.contentType)
				want := tt.ok
				if w.mergePatch {
					want = tt.okPatch
				}
				if !want {
					checkProblem(t, r, http.StatusUnsupportedMediaType, "unsupported-media-type", nil)
				} else if r.status >= 300 {
					t.Errorf("%s %s Content-Type %q = %v, want success", w.method, w.path, tt.contentType, r)
				}
			}
		})
	}
}

func TestDecodeStrict(t *testing.T) {
	tests := []struct {
		name       string
		body       string
		wantErrors []string // nil: "errors" is not checked
	}{
		{name: "empty", body: ``},
		{name: "blank", body: "  \n"},
		{name: "truncated", body: `{"sku":"X-1"`},
		{name: "open brace", body: `{`},
		{name: "trailing comma", body: `{"sku":"X-1","name":"n","price_cents":1,}`},
		{name: "single quotes", body: `{'sku':'X-1'}`},
		{name: "array", body: `[{"sku":"X-1","name":"n","price_cents":1}]`},
		{name: "string", body: `"x"`},
		{name: "null", body: `null`},
		{name: "number", body: `1`},
		{name: "byte order mark", body: "\uFEFF" + `{"sku":"X-1","name":"n","price_cents":1}`},
		{name: "unknown field", body: `{"sku":"X-1","name":"n","price_cents":1,"colour":"red"}`, wantErrors: []string{"colour"}},
		{name: "differently cased field", body: `{"SKU":"X-1","name":"n","price_cents":1}`, wantErrors: []string{"SKU"}},
		{name: "duplicate key", body: `{"sku":"X-1","sku":"X-2","name":"n","price_cents":1}`, wantErrors: []string{"sku"}},
		{name: "duplicate unknown key", body: `{"sku":"X-1","name":"n","price_cents":1,"zz":1,"zz":2}`, wantErrors: []string{"zz"}},
		{name: "trailing object", body: `{"sku":"X-1","name":"n","price_cents":1}{"sku":"X-2"}`},
		{name: "trailing word", body: `{"sku":"X-1","name":"n","price_cents":1} x`},
		{name: "trailing bracket", body: `{"sku":"X-1","name":"n","price_cents":1}]`},
		{name: "invalid UTF-8 in a string", body: `{"sku":"X-1","name":"` + "\xff\xfe" + `","price_cents":1}`},
		{name: "invalid UTF-8 outside strings", body: `{"sku":"X-1","name":"n","price_cents":1}` + "\xc3"},
		{name: "overlong UTF-8", body: `{"sku":"X-1","name":"` + "\xc0\xaf" + `","price_cents":1}`},
		{name: "name number", body: `{"sku":"X-1","name":5,"price_cents":1}`, wantErrors: []string{"name"}},
		{name: "sku object", body: `{"sku":{},"name":"n","price_cents":1}`, wantErrors: []string{"sku"}},
		{name: "description array", body: `{"sku":"X-1","name":"n","description":[],"price_cents":1}`, wantErrors: []string{"description"}},
		{name: "price string", body: `{"sku":"X-1","name":"n","price_cents":"1"}`, wantErrors: []string{"price_cents"}},
		{name: "price fraction", body: `{"sku":"X-1","name":"n","price_cents":1.5}`, wantErrors: []string{"price_cents"}},
		{name: "price bool", body: `{"sku":"X-1","name":"n","price_cents":true}`, wantErrors: []string{"price_cents"}},
		{name: "price above int64", body: `{"sku":"X-1","name":"n","price_cents":9223372036854775808}`, wantErrors: []string{"price_cents"}},
		{name: "price huge", body: `{"sku":"X-1","name":"n","price_cents":1` + strings.Repeat("0", 400) + `}`, wantErrors: []string{"price_cents"}},
		{name: "stock below int64", body: `{"sku":"X-1","name":"n","price_cents":1,"stock":-9223372036854775809}`, wantErrors: []string{"stock"}},
		{name: "stock bool", body: `{"sku":"X-1","name":"n","price_cents":1,"stock":false}`, wantErrors: []string{"stock"}},
	}
	ts := newTestServer(t, nil)
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			r := ts.write(t, http.MethodPost, "/products", tt.body)
			p := checkProblem(t, r, http.StatusBadRequest, "bad-request", tt.wantErrors)
			if strings.Contains(p.Detail, "json:") || strings.Contains(p.Detail, "main.") {
				t.Errorf("detail %q leaks Go error text", p.Detail)
			}
		})
	}
	if n := ts.svc.store.Count(); n != 0 {
		t.Errorf("product count = %d after only bad requests, want 0", n)
	}
}

// listBody is the document GET /products answers.
type listBody struct {
	Items      []Product `json:"items"`
	NextCursor *string   `json:"next_cursor"`
}

func (ts *testServer) list(tb testing.TB, query string) (listBody, response) {
	tb.Helper()
	r := ts.get(tb, "/products?"+query)
	var lb listBody
	if r.status == http.StatusOK {
		// Field names are the contract tests' business (the document says
		// additionalProperties false); here, the products.
		if err := json.Unmarshal(r.body, &lb); err != nil {
			tb.Fatalf("GET /products?%s: decoding %s: %v", query, r.body, err)
		}
	}
	return lb, r
}

func skus(ps []Product) []string {
	out := make([]string, len(ps))
	for i, p := range ps {
		out[i] = p.SKU
	}
	return out
}

// seedCatalog creates a small catalog for the listing tests:
//
//	id sku    name           category price stock
//	1  apple  "Apple juice"  drinks   300   10   (description "fresh pressed")
//	2  beer   "Beer"         drinks   500    0   ("lager")
//	3  bread  "Bread"        bakery   250    3   ("sourdough loaf")
//	4  cake   "Cake"         bakery  1200    0   ("chocolate")
//	5  cafe   "Café crème"   drinks   350    7   ("coffee with cream")
//	6  pen    "pen"          ""       150  100   ("")
func seedCatalog(tb testing.TB, ts *testServer) {
	tb.Helper()
	for _, body := range []string{
		`{"sku":"apple","name":"Apple juice","description":"fresh pressed","category":"drinks","price_cents":300,"stock":10}`,
		`{"sku":"beer","name":"Beer","description":"lager","category":"drinks","price_cents":500,"stock":0}`,
		`{"sku":"bread","name":"Bread","description":"sourdough loaf","category":"bakery","price_cents":250,"stock":3}`,
		`{"sku":"cake","name":"Cake","description":"chocolate","category":"bakery","price_cents":1200,"stock":0}`,
		`{"sku":"cafe","name":"Café crème","description":"coffee with cream","category":"drinks","price_cents":350,"stock":7}`,
		`{"sku":"pen","name":"pen","price_cents":150,"stock":100}`,
	} {
		if r := ts.write(tb, http.MethodPost, "/products", body); r.status != http.StatusCreated {
			tb.Fatalf("POST %s = %v, want 201", body, r)
		}
	}
}

func TestHandleListProducts(t *testing.T) {
	forEachStore(t, func(t *testing.T, s productStore) {
		ts := newTestServer(t, newTestService(t, s, ServiceConfig{}))
		seedCatalog(t, ts)
		all := []string{"apple", "beer", "bread", "cake", "cafe", "pen"}
		tests := []struct {
			query string
			want  []string
		}{
			{"", all},
			{"limit=100", all},
			{"sort=id", all},
			{"sort=-id", []string{"pen", "cafe", "cake", "bread", "beer", "apple"}},
			{"sort=name", []string{"apple", "beer", "bread", "cafe", "cake", "pen"}},
			{"sort=-name", []string{"pen", "cake", "cafe", "bread", "beer", "apple"}},
			{"sort=price_cents", []string{"pen", "bread", "apple", "cafe", "beer", "cake"}},
			{"sort=-price_cents", []string{"cake", "beer", "cafe", "apple", "bread", "pen"}},
			{"sort=created_at", all},
			{"sort=-created_at", []string{"pen", "cafe", "cake", "bread", "beer", "apple"}},
			{"category=drinks", []string{"apple", "beer", "cafe"}},
			{"category=bakery&sort=-price_cents", []string{"cake", "bread"}},
			{"category=", []string{"pen"}},
			{"category=Drinks", []string{}},
			{"q=juice", []string{"apple"}},
			{"q=CREAM", []string{"cafe"}},
			{"q=cafe", []string{"cafe"}},
			{"q=crème", []string{"cafe"}},
			{"q=cho", []string{"cake"}},
			{"q=bread+loaf", []string{"bread"}},
			{"q=bread+cake", []string{}},
			{"q=" + url.QueryEscape(`lager"`), []string{"beer"}},
			// FTS5 syntax in q is searched for as words, never run.
			{"q=" + url.QueryEscape(`"lager" OR NEAR(x) *`), []string{}},
			{"q=" + url.QueryEscape(`name:pen`), []string{}},
			{"min_price_cents=300", []string{"apple", "beer", "cake", "cafe"}},
			{"max_price_cents=300", []string{"apple", "bread", "pen"}},
			{"min_price_cents=250&max_price_cents=350", []string{"apple", "bread", "cafe"}},
			{"min_price_cents=0&max_price_cents=1000000000000", all},
			{"in_stock=true", []string{"apple", "bread", "cafe", "pen"}},
			{"in_stock=false", []string{"beer", "cake"}},
			{"category=drinks&in_stock=true&sort=-price_cents", []string{"cafe", "apple"}},
			{"q=c&sort=name", []string{"cafe", "cake"}},
		}
		for _, tt := range tests {
			t.Run(tt.query, func(t *testing.T) {
				lb, r := ts.list(t, tt.query)
				if r.status != http.StatusOK {
					t.Fatalf("GET /products?%s = %v, want 200", tt.query, r)
				}
				if diff := cmp.Diff(tt.want, skus(lb.Items)); diff != "" {
					t.Errorf("GET /products?%s items (-want +got):\n%s", tt.query, diff)
				}
				if lb.NextCursor != nil {
					t.Errorf("GET /products?%s next_cursor = %q, want null", tt.query, *lb.NextCursor)
				}
			})
		}

		// Walking with a small limit gives the same order as one big page.
		for _, sort := range []string{"id", "-id", "name", "-name", "price_cents", "-price_cents", "created_at", "-created_at"} {
			t.Run("pages sort="+sort, func(t *testing.T) {
				whole, _ := ts.list(t, "limit=100&sort="+sort)
				var walked []string
				query := "limit=2&sort=" + sort
				for pages := 0; ; pages++ {
					if pages > 10 {
						t.Fatalf("more than 10 pages of 2 for 6 products")
					}
					lb, r := ts.list(t, query)
					if r.status != http.StatusOK {
						t.Fatalf("GET /products?%s = %v, want 200", query, r)
					}
					walked = append(walked, skus(lb.Items)...)
					if lb.NextCursor == nil {
						break
					}
					if len(lb.Items) != 2 {
						t.Errorf("page with a next_cursor has %d items, want 2", len(lb.Items))
					}
					query = "limit=2&sort=" + sort + "&cursor=" + url.QueryEscape(*lb.NextCursor)
				}
				if diff := cmp.Diff(skus(whole.Items), walked); diff != "" {
					t.Errorf("pages of 2 differ from one page (-want +got):\n%s", diff)
				}
			})
		}
	})
}

func TestParseListQuery_invalid(t *testing.T) {
	ts := newTestServer(t, nil)
	seedCatalog(t, ts)
	byName, _ := ts.list(t, "limit=1&sort=name")
	if byName.NextCursor == nil {
		t.Fatal("first page of 1 by name has no next_cursor")
	}
	nameCursor := url.QueryEscape(*byName.NextCursor)
	tests := []struct {
		query      string
		wantErrors []string
	}{
		{"limit=0", []string{"limit"}},
		{"limit=101", []string{"limit"}},
		{"limit=-1", []string{"limit"}},
		{"limit=abc", []string{"limit"}},
		{"limit=1.5", []string{"limit"}},
		{"limit=", []string{"limit"}},
		{"limit=1&limit=2", []string{"limit"}},
		{"cursor=garbage", []string{"cursor"}},
		{"cursor=%21%21%21", []string{"cursor"}},
		{"cursor=" + nameCursor + "&cursor=" + nameCursor, []string{"cursor"}},
		{"limit=2&sort=name&cursor=" + nameCursor, []string{"cursor"}},
		{"limit=1&cursor=" + nameCursor, []string{"cursor"}},
		{"limit=1&sort=name&category=drinks&cursor=" + nameCursor, []string{"cursor"}},
		{"limit=0&sort=name&cursor=" + nameCursor, []string{"limit"}},
		{"cursor=" + base64.RawURLEncoding.EncodeToString([]byte(`{"q":{"limit":"1","sort":"name","colour":"red"},"k":"a","i":1}`)), []string{"cursor"}},
		{"cursor=" + base64.RawURLEncoding.EncodeToString([]byte(`{"q":{"limit":"1000","sort":"id"},"i":1}`)), []string{"cursor"}},
		{"cursor=" + base64.RawURLEncoding.EncodeToString([]byte(`{"q":{"limit":"1","sort":"name"},"k":7,"i":1}`)), []string{"cursor"}},
		{"cursor=" + base64.RawURLEncoding.EncodeToString([]byte(`{"s":"id","i":1}`)), []string{"cursor"}},
		{"sort=price_cents&cursor=" + nameCursor, []string{"cursor"}},
		{"sort=-name&cursor=" + nameCursor, []string{"cursor"}},
		{"category=" + strings.Repeat("c", 65), []string{"category"}},
		{"category=a%09b", []string{"category"}},
		{"category=a&category=b", []string{"category"}},
		{"q=", []string{"q"}},
		{"q=%21%21%21", []string{"q"}},
		{"q=" + strings.Repeat("a", 201), []string{"q"}},
		{"q=" + strings.Repeat("a+", 17), []string{"q"}},
		{"q=%FF", []string{"q"}},
		{"min_price_cents=-1", []string{"min_price_cents"}},
		{"min_price_cents=abc", []string{"min_price_cents"}},
		{"min_price_cents=1000000000001", []string{"min_price_cents"}},
		{"min_price_cents=1.0", []string{"min_price_cents"}},
		{"max_price_cents=9223372036854775808", []string{"max_price_cents"}},
		{"min_price_cents=500&max_price_cents=100", []string{"min_price_cents"}},
		{"in_stock=yes", []string{"in_stock"}},
		{"in_stock=1", []string{"in_stock"}},
		{"in_stock=TRUE", []string{"in_stock"}},
		{"sort=colour", []string{"sort"}},
		{"sort=--id", []string{"sort"}},
		{"sort=%2Bid", []string{"sort"}},
		{"sort=stock", []string{"sort"}},
		{"sort=", []string{"sort"}},
		{"colour=red", []string{"colour"}},
		{"Limit=5", []string{"Limit"}},
		{"categry=drinks", []string{"categry"}},
		{"limit=0&sort=x&bogus=1", []string{"bogus", "limit", "sort"}},
		{"%zz", nil},
	}
	for _, tt := range tests {
		t.Run(tt.query, func(t *testing.T) {
			_, r := ts.list(t, tt.query)
			checkProblem(t, r, http.StatusBadRequest, "bad-request", tt.wantErrors)
		})
	}
}

// TestHandleListProducts_cursorCarriesQuery checks that a next_cursor sent
// alone continues the query it came from, that the same query sent with it
// is the same request, and that any other query with it is a 400 naming
// the cursor, never a silent change of query.
func TestHandleListProducts_cursorCarriesQuery(t *testing.T) {
	ts := newTestServer(t, nil)
	seedCatalog(t, ts)
	const query = "limit=1&category=drinks&sort=-price_cents&in_stock=true"
	want := []string{"cafe", "apple"} // drinks in stock, dearest first (beer has none)

	var walked []string
	first, r := ts.list(t, query)
	if r.status != http.StatusOK || first.NextCursor == nil {
		t.Fatalf("GET /products?%s = %v, want 200 with a next_cursor", query, r)
	}
	walked = append(walked, skus(first.Items)...)
	cur := url.QueryEscape(*first.NextCursor)
	for next := first.NextCursor; next != nil; {
		if len(walked) > 10 {
			t.Fatal("more than 10 pages of 1 for 2 products")
		}
		lb, r := ts.list(t, "cursor="+url.QueryEscape(*next))
		if r.status != http.StatusOK {
			t.Fatalf("GET /products?cursor=… alone = %v, want 200", r)
		}
		if len(lb.Items) > 1 {
			t.Errorf("a cursor from limit=1 sent alone gave %d items, want at most 1", len(lb.Items))
		}
		walked = append(walked, skus(lb.Items)...)
		next = lb.NextCursor
	}
	if diff := cmp.Diff(want, walked); diff != "" {
		t.Errorf("pages walked with the cursor alone (-want +got):\n%s", diff)
	}

	alone, _ := ts.list(t, "cursor="+cur)
	for _, same := range []string{
		query + "&cursor=" + cur,
		"cursor=" + cur + "&in_stock=true&sort=-price_cents&category=drinks&limit=1",
	} {
		lb, r := ts.list(t, same)
		if r.status != http.StatusOK {
			t.Errorf("GET /products?%s (its own query repeated) = %v, want 200", same, r)
			continue
		}
		if diff := cmp.Diff(alone, lb); diff != "" {
			t.Errorf("GET /products?%s differs from the cursor alone (-alone +got):\n%s", same, diff)
		}
	}
	for _, other := range []string{
		"limit=2&category=drinks&sort=-price_cents&in_stock=true",     // limit
		"limit=1&category=bakery&sort=-price_cents&in_stock=true",     // filter
		"limit=1&category=drinks&sort=price_cents&in_stock=true",      // sort
		"limit=1&category=drinks&sort=-price_cents",                   // a filter left out
		"limit=1&category=drinks&sort=-price_cents&in_stock=true&q=x", // a filter added
		"category=drinks",
	} {
		_, r := ts.list(t, other+"&cursor="+cur)
		checkProblem(t, r, http.StatusBadRequest, "bad-request", []string{"cursor"})
	}
}

// TestCursor_longest builds the longest cursor the service can make and
// checks that it is within maxCursorLen and decodes.
func TestCursor_longest(t *testing.T) {
	category := strings.Repeat("\u2028", maxCategoryLen) // 6 bytes each in JSON
	q := strings.Repeat("\U0001D400", maxQueryLen)       // a 4-byte letter
	name := strings.Repeat("\u2028", maxNameLen)         // the sort key
	raw := url.Values{"limit": {"100"}, "category": {category}, "q": {q}, "sort": {"-name"},
		"min_price_cents": {"1000000000000"}, "max_price_cents": {"1000000000000"}, "in_stock": {"false"}}
	f, err := parseListQuery(raw.Encode())
	if err != nil {
		t.Fatalf("parseListQuery(longest query): %v", err)
	}
	enc := cursorAfter(f, Product{ID: math.MaxInt64, Name: name}).encode()
	if len(enc) > maxCursorLen {
		t.Fatalf("longest cursor is %d bytes, over maxCursorLen %d", len(enc), maxCursorLen)
	}
	if _, _, err := decodeCursor(enc); err != nil {
		t.Errorf("decodeCursor(longest cursor, %d bytes): %v", len(enc), err)
	}
	t.Logf("longest cursor: %d bytes", len(enc))
}

func TestHandleListProducts_concurrentInserts(t *testing.T) {
	// With the in-process caches on, listing pages are cached too.
	for _, local := range []int{0, 1000} {
		t.Run(fmt.Sprintf("local=%d", local), func(t *testing.T) {
			forEachStore(t, func(t *testing.T, s productStore) {
				testWalkWhileInserting(t, newTestServer(t, newTestService(t, s, ServiceConfig{LocalCacheSize: local})))
			})
		})
	}
}

// testWalkWhileInserting walks every page of a listing, in several sorts,
// while products are inserted: each product that existed before the walk
// appears exactly once, and no product twice.
func testWalkWhileInserting(t *testing.T, ts *testServer) {
	rng := rand.New(rand.NewPCG(1, 2))
	const existing = 40
	pre := make(map[string]bool)
	for i := range existing {
		sku := fmt.Sprintf("PRE-%02d", i)
		pre[sku] = true
		ts.createProduct(t, sku, rng.Int64N(1000), fmt.Sprintf(`"name":"n%03d"`, rng.IntN(1000)))
	}
	if n := ts.svc.store.Count(); n != existing {
		t.Fatalf("seeded %d products, want %d", n, existing)
	}

	for si, sort := range []string{"id", "-id", "name", "-price_cents", "created_at"} {
		t.Run("sort="+sort, func(t *testing.T) {
			// Inserter: new products with keys before, among and after the
			// walk's position, until the walk ends.
			// The inserts are bounded: in id order, an inserter that outpaces
			// the walk would keep adding pages after the walk's position.
			const maxInserts = 150
			var inserted atomic.Int64
			var insertsDone atomic.Bool
			stop := make(chan struct{})
			var wg sync.WaitGroup
			var insertErr atomic.Value
			wg.Go(func() {
				defer insertsDone.Store(true)
				rng := rand.New(rand.NewPCG(3, uint64(si)))
				for i := 0; i < maxInserts; i++ {
					select {
					case <-stop:
						return
					default:
					}
					sku := fmt.Sprintf("NEW-%d-%d", si, i)
					name := fmt.Sprintf("n%03d", rng.IntN(1000))
					price := rng.Int64N(1000)
					in := ProductInput{SKU: &sku, Name: &name, PriceCents: &price}
					if _, _, err := ts.svc.Create(t.Context(), in, nil); err != nil {
						insertErr.Store(err)
						return
					}
					inserted.Add(1)
				}
			})
			defer func() {
				close(stop)
				wg.Wait()
				if err, _ := insertErr.Load().(error); err != nil {
					t.Errorf("concurrent insert failed: %v", err)
				}
			}()

			seen := make(map[string]int)
			query := "limit=7&sort=" + sort
			for pages := 0; ; pages++ {
				if pages > 1000 {
					t.Fatal("walk did not end after 1000 pages")
				}
				// Make sure at least one insert lands between pages.
				n := inserted.Load()
				waitFor(t, 10*time.Second, "a concurrent insert", func() bool {
					return inserted.Load() > n || insertErr.Load() != nil || insertsDone.Load()
				})
				lb, r := ts.list(t, query)
				if r.status != http.StatusOK {
					t.Fatalf("GET /products?%s = %v, want 200", query, r)
				}
				for _, p := range lb.Items {
					seen[p.SKU]++
				}
				if lb.NextCursor == nil {
					break
				}
				query = "limit=7&sort=" + sort + "&cursor=" + url.QueryEscape(*lb.NextCursor)
			}
			for sku, n := range seen {
				if n != 1 {
					t.Errorf("sort=%s: %s listed %d times, want once", sort, sku, n)
				}
			}
			for sku := range pre {
				if seen[sku] != 1 {
					t.Errorf("sort=%s: pre-existing %s listed %d times, want once", sort, sku, seen[sku])
				}
			}
		})
	}
}

func TestObserve_headers(t *testing.T) {
	ts := newTestServer(t, nil)
	p := ts.createProduct(t, "HDR-1", 100, `"stock":1`)
	path := fmt.Sprintf("/products/%d", p.ID)
	long := strings.Repeat("r", 128)
	tests := []struct {
		name       string
		method     string
		path       string
		body       string
		kv         []string
		wantStatus int
	}{
		{name: "health", method: "GET", path: "/health", wantStatus: 200},
		{name: "live", method: "GET", path: "/livez", wantStatus: 200},
		{name: "ready", method: "GET", path: "/ready", wantStatus: 200},
		{name: "startup", method: "GET", path: "/health/startup", wantStatus: 200},
		{name: "metrics", method: "GET", path: "/metrics", wantStatus: 200},
		{name: "openapi", method: "GET", path: "/openapi.json", wantStatus: 200},
		{name: "list", method: "GET", path: "/products", wantStatus: 200},
		{name: "get", method: "GET", path: path, wantStatus: 200},
		{name: "not modified", method: "GET", path: path, kv: []string{"If-None-Match", "*"}, wantStatus: 304},
		{name: "create", method: "POST", path: "/products", body: `{"sku":"HDR-2","name":"x","price_cents":1}`, wantStatus: 201},
		{name: "patch", method: "PATCH", path: path, body: `{"name":"y"}`, wantStatus: 200},
		{name: "bad id", method: "GET", path: "/products/abc", wantStatus: 400},
		{name: "bad list parameter", method: "GET", path: "/products?limit=0", wantStatus: 400},
		{name: "unauthorized", method: "POST", path: "/products", body: `{}`, kv: []string{"Authorization", ""}, wantStatus: 401},
		{name: "unknown product", method: "GET", path: "/products/999999", wantStatus: 404},
		{name: "unknown route", method: "GET", path: "/nope", wantStatus: 404},
		{name: "non-canonical path", method: "GET", path: "/products/../health", wantStatus: 404},
		{name: "double slash", method: "GET", path: "//products", wantStatus: 404},
		{name: "method not allowed", method: "DELETE", path: "/products", wantStatus: 405},
		{name: "duplicate", method: "POST", path: "/products", body: `{"sku":"HDR-1","name":"x","price_cents":1}`, wantStatus: 409},
		{name: "insufficient stock", method: "POST", path: path + "/stock/adjustments", body: `{"delta":-5}`, wantStatus: 409},
		{name: "stale If-Match", method: "PATCH", path: path, body: `{"name":"z"}`, kv: []string{"If-Match", `"1"`}, wantStatus: 412},
		{name: "unsupported media type", method: "POST", path: "/products", body: `{}`, kv: []string{"Content-Type", "text/plain"}, wantStatus: 415},
		{name: "validation", method: "POST", path: "/products", body: `{}`, wantStatus: 422},
		{name: "delete", method: "DELETE", path: "/products/%d", wantStatus: 204},
	}
	requestIDs := []struct {
		name, sent string
		echoed     bool
	}{
		{name: "sane id", sent: "req-1_A.b", echoed: true},
		{name: "128 chars", sent: long, echoed: true},
		{name: "none", sent: ""},
		{name: "129 chars", sent: long + "r"},
		{name: "space", sent: "has space"},
		{name: "slash", sent: "a/b"},
		{name: "quote", sent: `a"b`},
		{name: "non-ASCII", sent: "ünï"},
	}
	n := 0
	for _, tt := range tests {
		for _, rid := range requestIDs {
			t.Run(tt.name+"/"+rid.name, func(t *testing.T) {
				n++
				target := tt.path
				body := tt.body
				if tt.name == "delete" {
					target = fmt.Sprintf(tt.path, ts.createProduct(t, fmt.Sprintf("HDR-D%d", n), 1).ID)
				}
				if tt.name == "create" {
					body = strings.Replace(body, "HDR-2", fmt.Sprintf("HDR-C%d", n), 1)
				}
				kv := append([]string{"X-Request-ID", rid.sent}, tt.kv...)
				r := ts.write(t, tt.method, target, body, kv...)
				if r.status != tt.wantStatus {
					t.Fatalf("%s %s = %v, want %d", tt.method, target, r, tt.wantStatus)
				}
				if got := r.header.Get("X-Content-Type-Options"); got != "nosniff" {
					t.Errorf("X-Content-Type-Options = %q, want nosniff", got)
				}
				got := r.header.Get("X-Request-ID")
				switch {
				case rid.echoed && got != rid.sent:
					t.Errorf("X-Request-ID = %q, want the sent %q echoed", got, rid.sent)
				case !rid.echoed && (got == rid.sent || !validRequestID(got)):
					t.Errorf("X-Request-ID = %q for sent %q, want a newly generated sane id", got, rid.sent)
				}
				if r.status >= 400 {
					slug := problemTypes[r.status]
					if tt.name == "insufficient stock" {
						slug = "insufficient-stock"
					}
					prob := checkProblem(t, r, r.status, slug, nil)
					if u, _ := url.Parse(ts.URL + target); prob.Instance != u.Path {
						t.Errorf("problem instance = %q, want %q", prob.Instance, u.Path)
					}
				}
			})
		}
	}

	// The access log carries the same id.
	r := ts.get(t, path, "X-Request-ID", "trace-me-123")
	found := false
	for _, l := range ts.logs.logLines() {
		if l["msg"] == "request" && l["request_id"] == "trace-me-123" {
			found = true
			if l["status"] != float64(r.status) || l["route"] != "GET /products/{id}" {
				t.Errorf("access log line %v, want status %d and route GET /products/{id}", l, r.status)
			}
		}
	}
	if !found {
		t.Errorf("no access log line with request_id trace-me-123 in:\n%s", ts.logs)
	}
}

func TestCanonicalPaths(t *testing.T) {
	ts := newTestServer(t, nil)
	p := ts.createProduct(t, "CAN-1", 1)
	id := strconv.FormatInt(p.ID, 10)
	for _, target := range []string{
		"/products//" + id,
		"/products/./" + id,
		"/products/x/../" + id,
		"/products/%2F" + id,
		"/products/" + id + "/",
		"/./products",
		"/products/%2e%2e/health",
	} {
		t.Run(target, func(t *testing.T) {
			r := ts.get(t, target)
			if r.status != http.StatusNotFound && r.status != http.StatusBadRequest {
				t.Fatalf("GET %s = %v (Location %q), want 404 or 400 and never a redirect", target, r, r.header.Get("Location"))
			}
			checkProblem(t, r, r.status, problemTypes[r.status], nil)
		})
	}
}

// leakyCause is a database error whose text must never reach a client.
const leakyCause = "SELECT id, sku FROM products WHERE id = ?: open /var/lib/productsvc/products.db: disk I/O error (sqlite3.c:1234)"

func TestWriteError_serverErrorsDoNotLeak(t *testing.T) {
	tests := []struct {
		name       string
		err        error
		wantStatus int
	}{
		{name: "database failure", err: &dbFailure{errors.New(leakyCause)}, wantStatus: 503},
		{name: "wrapped ErrUnavailable", err: fmt.Errorf("%s: %w", leakyCause, ErrUnavailable), wantStatus: 503},
		{name: "unexpected error", err: errors.New(leakyCause), wantStatus: 500},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			fs := &failingStore{productStore: newTestStore(t)}
			ts := newTestServer(t, newTestService(t, fs, ServiceConfig{}))
			p := ts.createProduct(t, "LEAK-1", 100)
			fs.failReads(tt.err)
			fs.failWrites(tt.err)
			requests := []struct{ method, path, body string }{
				{"GET", fmt.Sprintf("/products/%d", p.ID), ""},
				{"GET", "/products", ""},
				{"POST", "/products", `{"sku":"LEAK-2","name":"x","price_cents":1}`},
				{"PATCH", fmt.Sprintf("/products/%d", p.ID), `{"name":"x"}`},
				{"DELETE", fmt.Sprintf("/products/%d", p.ID), ""},
			}
			for _, req := range requests {
				r := ts.write(t, req.method, req.path, req.body, "X-Request-ID", "leak-"+req.method)
				slug := problemTypes[tt.wantStatus]
				checkProblem(t, r, tt.wantStatus, slug, nil)
				if tt.wantStatus == 503 && r.header.Get("Retry-After") == "" {
					t.Errorf("%s %s: 503 without Retry-After", req.method, req.path)
				}
				body := strings.ToLower(string(r.body))
				for _, secret := range []string{"select", "products.db", "/var/", "sqlite", "disk i/o", "error (", "main."} {
					if strings.Contains(body, secret) {
						t.Errorf("%s %s: %d body %s contains %q", req.method, req.path, r.status, r.body, secret)
					}
				}
				// The cause goes to the log, tagged with the request id.
				found := false
				for _, l := range ts.logs.logLines() {
					if l["request_id"] == "leak-"+req.method && strings.Contains(fmt.Sprint(l["err"]), "disk I/O error") {
						found = true
					}
				}
				if !found {
					t.Errorf("%s %s: no log line with the cause and request id leak-%s in:\n%s", req.method, req.path, req.method, ts.logs)
				}
			}
		})
	}
}

func TestWriteError_closedStore(t *testing.T) {
	store := newTestStore(t)
	ts := newTestServer(t, newTestService(t, store, ServiceConfig{}))
	p := ts.createProduct(t, "CLOSED-1", 100)
	if err := store.Close(); err != nil {
		t.Fatal(err)
	}
	for _, req := range []struct{ method, path, body string }{
		{"GET", fmt.Sprintf("/products/%d", p.ID), ""},
		{"GET", "/products?sort=name", ""},
		{"POST", "/products", `{"sku":"CLOSED-2","name":"x","price_cents":1}`},
		{"POST", fmt.Sprintf("/products/%d/stock/adjustments", p.ID), `{"delta":1}`},
		{"GET", "/ready", ""},
	} {
		r := ts.write(t, req.method, req.path, req.body)
		if r.status != http.StatusServiceUnavailable {
			t.Errorf("%s %s on a closed store = %v, want 503", req.method, req.path, r)
			continue
		}
		body := strings.ToLower(string(r.body))
		for _, secret := range []string{"sql:", "products.db", "/tmp", "is closed"} {
			if strings.Contains(body, secret) {
				t.Errorf("%s %s: body %s contains %q", req.method, req.path, r.body, secret)
			}
		}
	}
}

func TestIdempotencyKey_create(t *testing.T) {
	forEachStore(t, func(t *testing.T, s productStore) {
		ts := newTestServer(t, newTestService(t, s, ServiceConfig{}))
		body := `{"sku":"IDEM-1","name":"pen","price_cents":150}`
		first := ts.write(t, http.MethodPost, "/products", body, "Idempotency-Key", "key-1")
		if first.status != http.StatusCreated {
			t.Fatalf("first POST = %v, want 201", first)
		}
		if first.header.Get("Idempotency-Replayed") != "" {
			t.Errorf("first POST has Idempotency-Replayed %q, want none", first.header.Get("Idempotency-Replayed"))
		}
		created := decodeProduct(t, first.body)
		// Change the product, so a replay that re-read it would show.
		ts.write(t, http.MethodPatch, fmt.Sprintf("/products/%d", created.ID), `{"name":"renamed"}`)

		for i := range 3 {
			again := ts.write(t, http.MethodPost, "/products", body, "Idempotency-Key", "key-1")
			if again.status != http.StatusCreated {
				t.Fatalf("retry %d = %v, want 201", i, again)
			}
			if got := again.header.Get("Idempotency-Replayed"); got != "true" {
				t.Errorf("retry %d Idempotency-Replayed = %q, want true", i, got)
			}
			if diff := cmp.Diff(created, decodeProduct(t, again.body)); diff != "" {
				t.Errorf("retry %d body differs from the first response (-want +got):\n%s", i, diff)
			}
			for _, h := range []string{"Location", "ETag"} {
				if got, want := again.header.Get(h), first.header.Get(h); got != want {
					t.Errorf("retry %d %s = %q, want %q", i, h, got, want)
				}
			}
		}
		if n := ts.svc.store.Count(); n != 1 {
			t.Errorf("product count = %d after retries, want 1", n)
		}

		// The same key with another body is refused, and creates nothing.
		r := ts.write(t, http.MethodPost, "/products", `{"sku":"IDEM-2","name":"pen","price_cents":150}`, "Idempotency-Key", "key-1")
		checkProblem(t, r, http.StatusUnprocessableEntity, "idempotency-key-reused", nil)
		if n := ts.svc.store.Count(); n != 1 {
			t.Errorf("product count = %d after a reused key, want 1", n)
		}
		// A different key is a different request: here, a duplicate sku.
		r = ts.write(t, http.MethodPost, "/products", body, "Idempotency-Key", "key-2")
		checkProblem(t, r, http.StatusConflict, "conflict", nil)

		// Malformed keys.
		for _, k := range []string{strings.Repeat("k", 256), "tab\there", "ünï"} {
			r := ts.write(t, http.MethodPost, "/products", `{"sku":"IDEM-3","name":"pen","price_cents":150}`, "Idempotency-Key", k)
			checkProblem(t, r, http.StatusBadRequest, "bad-request", []string{"Idempotency-Key"})
		}
	})
}

func TestIdempotencyKey_adjustment(t *testing.T) {
	forEachStore(t, func(t *testing.T, s productStore) {
		ts := newTestServer(t, newTestService(t, s, ServiceConfig{}), testToken, "token-a", "token-b")
		p := ts.createProduct(t, "IDEM-ADJ", 1, `"stock":10`)
		other := ts.createProduct(t, "IDEM-OTHER", 1, `"stock":10`)
		path := fmt.Sprintf("/products/%d/stock/adjustments", p.ID)
		adjust := func(token, key, body string) response {
			t.Helper()
			return ts.write(t, http.MethodPost, path, body, "Authorization", "Bearer "+token, "Idempotency-Key", key)
		}
		stock := func(id int64) int64 {
			t.Helper()
			return ts.getProduct(t, id).Stock
		}

		a1 := adjust("token-a", "adj-1", `{"delta":3}`)
		if a1.status != 200 || a1.header.Get("Idempotency-Replayed") != "" {
			t.Fatalf("first adjustment = %v (replayed %q), want 200 not replayed", a1, a1.header.Get("Idempotency-Replayed"))
		}
		a2 := adjust("token-a", "adj-1", `{"delta":3}`)
		if a2.status != 200 || a2.header.Get("Idempotency-Replayed") != "true" {
			t.Errorf("retry = %v (replayed %q), want 200 replayed", a2, a2.header.Get("Idempotency-Replayed"))
		}
		if diff := cmp.Diff(decodeProduct(t, a1.body), decodeProduct(t, a2.body)); diff != "" {
			t.Errorf("retry body differs from the first response (-want +got):\n%s", diff)
		}
		if a2.header.Get("ETag") != a1.header.Get("ETag") {
			t.Errorf("retry ETag = %q, want %q", a2.header.Get("ETag"), a1.header.Get("ETag"))
		}
		if got := stock(p.ID); got != 13 {
			t.Errorf("stock after an adjustment and its retry = %d, want 13 (applied once)", got)
		}

		// Keys are scoped per token: token-b's "adj-1" is another request.
		b1 := adjust("token-b", "adj-1", `{"delta":3}`)
		if b1.status != 200 || b1.header.Get("Idempotency-Replayed") != "" {
			t.Errorf("same key with another token = %v (replayed %q), want 200 not replayed", b1, b1.header.Get("Idempotency-Replayed"))
		}
		b2 := adjust("token-b", "adj-1", `{"delta":3}`)
		if b2.status != 200 || b2.header.Get("Idempotency-Replayed") != "true" {
			t.Errorf("token-b retry = %v, want 200 replayed", b2)
		}
		if got := stock(p.ID); got != 16 {
			t.Errorf("stock = %d, want 16 (one adjustment per token)", got)
		}

		// The same key with another body, or for another product, is refused.
		checkProblem(t, adjust("token-a", "adj-1", `{"delta":4}`), http.StatusUnprocessableEntity, "idempotency-key-reused", nil)
		r := ts.write(t, http.MethodPost, fmt.Sprintf("/products/%d/stock/adjustments", other.ID), `{"delta":3}`,
			"Authorization", "Bearer token-a", "Idempotency-Key", "adj-1")
		checkProblem(t, r, http.StatusUnprocessableEntity, "idempotency-key-reused", nil)
		if got := stock(p.ID); got != 16 {
			t.Errorf("stock = %d after refused reuses, want 16", got)
		}
		if got := stock(other.ID); got != 10 {
			t.Errorf("other product's stock = %d, want 10", got)
		}

		// A refused adjustment records nothing: once stock allows it, the same
		// key applies it.
		checkProblem(t, adjust("token-a", "adj-2", `{"delta":-20}`), http.StatusConflict, "insufficient-stock", nil)
		ts.write(t, http.MethodPut, fmt.Sprintf("/products/%d/stock", p.ID), `{"stock":30}`)
		if r := adjust("token-a", "adj-2", `{"delta":-20}`); r.status != 200 || r.header.Get("Idempotency-Replayed") != "" {
			t.Errorf("retry of a refused adjustment = %v, want 200 applied", r)
		}
		if got := stock(p.ID); got != 10 {
			t.Errorf("stock = %d, want 10", got)
		}
	})
}

func TestIdempotencyKey_concurrentRetries(t *testing.T) {
	forEachStore(t, func(t *testing.T, s productStore) {
		ts := newTestServer(t, newTestService(t, s, ServiceConfig{}))
		p := ts.createProduct(t, "IDEM-CONC", 1, `"stock":100`)
		path := fmt.Sprintf("/products/%d/stock/adjustments", p.ID)
		const retries = 20
		responses := make([]response, retries)
		var wg sync.WaitGroup
		for i := range retries {
			wg.Go(func() {
				r, err := ts.try(http.MethodPost, path, strings.NewReader(`{"delta":-7}`), writeHeaders("Idempotency-Key", "conc-1")...)
				if err != nil {
					t.Error(err)
				}
				responses[i] = r
			})
		}
		wg.Wait()
		applied := 0
		var bodies []Product
		for i, r := range responses {
			if r.status != 200 {
				t.Errorf("retry %d = %v, want 200", i, r)
				continue
			}
			if r.header.Get("Idempotency-Replayed") != "true" {
				applied++
			}
			bodies = append(bodies, decodeProduct(t, r.body))
		}
		if applied != 1 {
			t.Errorf("%d of %d concurrent requests with one key were applied, want exactly 1", applied, retries)
		}
		for i := 1; i < len(bodies); i++ {
			if diff := cmp.Diff(bodies[0], bodies[i]); diff != "" {
				t.Errorf("response %d differs from response 0 (-want +got):\n%s", i, diff)
			}
		}
		if got := ts.getProduct(t, p.ID); got.Stock != 93 || got.Version != 2 {
			t.Errorf("stock, version = %d, %d, want 93, 2 (one adjustment)", got.Stock, got.Version)
		}
	})
}

func TestHandleReady(t *testing.T) {
	forEachStore(t, testHandleReady)
}

func testHandleReady(t *testing.T, s productStore) {
	ts := newTestServer(t, newTestService(t, s, ServiceConfig{}))
	type readyDoc struct {
		Status string `json:"status"`
		Checks struct {
			Database struct{ Status, Backend string }    `json:"database"`
			Cache    struct{ Status string }             `json:"cache"`
			Breaker  struct{ State, Read, Write string } `json:"breaker"`
		} `json:"checks"`
	}
	ready := func() (int, readyDoc) {
		t.Helper()
		r := ts.get(t, "/ready")
		var d readyDoc
		if err := json.Unmarshal(r.body, &d); err != nil {
			t.Fatalf("GET /ready body %s: %v", r.body, err)
		}
		return r.status, d
	}
	status, d := ready()
	var want readyDoc
	want.Status = "ok"
	want.Checks.Database.Status, want.Checks.Database.Backend = "ok", s.Backend()
	want.Checks.Cache.Status = "disabled"
	want.Checks.Breaker.State, want.Checks.Breaker.Read, want.Checks.Breaker.Write = "closed", "closed", "closed"
	if status != 200 {
		t.Errorf("GET /ready status = %d, want 200", status)
	}
	if diff := cmp.Diff(want, d); diff != "" {
		t.Errorf("GET /ready (-want +got):\n%s", diff)
	}
	for _, p := range []string{"/health", "/health/live", "/livez", "/health/ready", "/readyz", "/health/startup"} {
		if r := ts.get(t, p); r.status != 200 {
			t.Errorf("GET %s = %v, want 200", p, r)
		}
	}

	// Shutting down: readiness fails at once, liveness does not.
	ts.life.shuttingDown.Store(true)
	status, d = ready()
	if status != 503 || d.Status != "unavailable" {
		t.Errorf("GET /ready while shutting down = %d %q, want 503 unavailable", status, d.Status)
	}
	if r := ts.get(t, "/health"); r.status != 200 {
		t.Errorf("GET /health while shutting down = %v, want 200", r)
	}
	ts.life.shuttingDown.Store(false)
	ts.life.started.Store(false)
	if r := ts.get(t, "/health/startup"); r.status != 503 {
		t.Errorf("GET /health/startup before start = %v, want 503", r)
	}
	if status, _ := ready(); status != 503 {
		t.Errorf("GET /ready before start = %d, want 503", status)
	}
}

func TestHandleAdjustStock_noOversell(t *testing.T) {
	forEachStore(t, func(t *testing.T, s productStore) {
		ts := newTestServer(t, newTestService(t, s, ServiceConfig{}))
		const initial, buyers = 30, 100
		p := ts.createProduct(t, "OVERSELL", 1, fmt.Sprintf(`"stock":%d`, initial))
		path := fmt.Sprintf("/products/%d/stock/adjustments", p.ID)
		responses := make([]response, buyers)
		var wg sync.WaitGroup
		for i := range buyers {
			wg.Go(func() {
				r, err := ts.try(http.MethodPost, path, strings.NewReader(`{"delta":-1}`), writeHeaders()...)
				if err != nil {
					t.Error(err)
				}
				responses[i] = r
			})
		}
		wg.Wait()
		sold := make(map[int64]int)
		refused := 0
		for i, r := range responses {
			switch r.status {
			case http.StatusOK:
				got := decodeProduct(t, r.body)
				if got.Stock < 0 {
					t.Errorf("buyer %d: stock after sale = %d, want >= 0", i, got.Stock)
				}
				sold[got.Stock]++
			case http.StatusConflict:
				checkProblem(t, r, http.StatusConflict, "insufficient-stock", nil)
				refused++
			default:
				t.Errorf("buyer %d: %v, want 200 or 409", i, r)
			}
		}
		if len(sold) != initial || refused != buyers-initial {
			t.Errorf("%d sales and %d refusals, want %d and %d", len(sold), refused, initial, buyers-initial)
		}
		// Each sale saw its own remaining stock: 29, 28, ..., 0, once each.
		for s := range int64(initial) {
			if sold[s] != 1 {
				t.Errorf("%d sales left stock %d, want exactly 1", sold[s], s)
			}
		}
		if got := ts.getProduct(t, p.ID); got.Stock != 0 || got.Version != 1+initial {
			t.Errorf("final stock, version = %d, %d, want 0, %d", got.Stock, got.Version, 1+initial)
		}
	})
}

func TestHandleCreateProduct_concurrentSameSKU(t *testing.T) {
	forEachStore(t, func(t *testing.T, s productStore) {
		ts := newTestServer(t, newTestService(t, s, ServiceConfig{}))
		const clients = 20
		responses := make([]response, clients)
		var wg sync.WaitGroup
		for i := range clients {
			wg.Go(func() {
				body := fmt.Sprintf(`{"sku":"SAME-SKU","name":"client %d","price_cents":%d}`, i, i)
				r, err := ts.try(http.MethodPost, "/products", strings.NewReader(body), writeHeaders()...)
				if err != nil {
					t.Error(err)
				}
				responses[i] = r
			})
		}
		wg.Wait()
		created, conflicts := 0, 0
		var winner Product
		for i, r := range responses {
			switch r.status {
			case http.StatusCreated:
				created++
				winner = decodeProduct(t, r.body)
			case http.StatusConflict:
				conflicts++
				checkProblem(t, r, http.StatusConflict, "conflict", nil)
			default:
				t.Errorf("client %d: %v, want 201 or 409", i, r)
			}
		}
		if created != 1 || conflicts != clients-1 {
			t.Fatalf("%d created and %d conflicts, want 1 and %d", created, conflicts, clients-1)
		}
		if n := ts.svc.store.Count(); n != 1 {
			t.Errorf("product count = %d, want 1", n)
		}
		if diff := cmp.Diff(winner, ts.getProduct(t, winner.ID)); diff != "" {
			t.Errorf("stored product differs from the 201 body (-want +got):\n%s", diff)
		}
	})
}

func TestHandleListProducts_freshAfterWrites(t *testing.T) {
	forEachStore(t, func(t *testing.T, s productStore) {
		// With the in-process caches on, listing pages are cached; every kind
		// of write must show in the next listing.
		ts := newTestServer(t, newTestService(t, s, ServiceConfig{LocalCacheSize: 1000}))
		p := ts.createProduct(t, "FRESH-1", 100, `"category":"c"`, `"stock":5`)
		path := fmt.Sprintf("/products/%d", p.ID)
		const query = "category=c&sort=-price_cents"
		listed := func() []Product {
			t.Helper()
			lb, r := ts.list(t, query)
			if r.status != http.StatusOK {
				t.Fatalf("GET /products?%s = %v, want 200", query, r)
			}
			// Twice: the second answer may come from the page cache.
			lb2, _ := ts.list(t, query)
			if diff := cmp.Diff(lb.Items, lb2.Items); diff != "" {
				t.Fatalf("two listings without a write differ (-first +second):\n%s", diff)
			}
			return lb.Items
		}
		tests := []struct {
			name, method, path, body string
		}{
			{"create", http.MethodPost, "/products", `{"sku":"FRESH-2","name":"x","category":"c","price_cents":50}`},
			{"PUT", http.MethodPut, path, `{"sku":"FRESH-1","name":"replaced","category":"c","price_cents":200}`},
			{"PATCH", http.MethodPatch, path, `{"price_cents":10}`},
			{"stock set", http.MethodPut, path + "/stock", `{"stock":9}`},
			{"adjustment", http.MethodPost, path + "/stock/adjustments", `{"delta":-2}`},
			{"PATCH out of the category", http.MethodPatch, path, `{"category":"d"}`},
			{"DELETE", http.MethodDelete, "/products/%d", ""},
		}
		for _, tt := range tests {
			t.Run(tt.name, func(t *testing.T) {
				listed() // cache the page
				target := tt.path
				if strings.Contains(target, "%d") {
					target = fmt.Sprintf(target, listed()[0].ID)
				}
				if r := ts.write(t, tt.method, target, tt.body); r.status >= 300 {
					t.Fatalf("%s %s = %v, want success", tt.method, target, r)
				}
				// The listing now equals what each product's GET says.
				var want []Product
				lb, _ := ts.list(t, "limit=100")
				for _, q := range lb.Items {
					if q.Category == "c" {
						want = append(want, ts.getProduct(t, q.ID))
					}
				}
				slices.SortFunc(want, func(a, b Product) int {
					if a.PriceCents != b.PriceCents {
						return int(b.PriceCents - a.PriceCents)
					}
					return int(b.ID - a.ID)
				})
				if diff := cmp.Diff(want, listed(), cmpopts.EquateEmpty()); diff != "" {
					t.Errorf("listing after %s (-want +got):\n%s", tt.name, diff)
				}
			})
		}
	})
}

// TestWriteError_everySentinel walks every exported sentinel error declared
// in the package (found by parsing its sources, so a new one cannot be
// missed) and every domain error type: none may reach 500 by omission from
// the status table.
func TestWriteError_everySentinel(t *testing.T) {
	sentinels := map[string]error{
		"ErrNotFound":            ErrNotFound,
		"ErrConflict":            ErrConflict,
		"ErrInsufficientStock":   ErrInsufficientStock,
		"ErrInvalid":             ErrInvalid,
		"ErrPrecondition":        ErrPrecondition,
		"ErrUnavailable":         ErrUnavailable,
		"ErrIdempotencyMismatch": ErrIdempotencyMismatch,
		"ErrReserved":            ErrReserved,
		"ErrReservationNotFound": ErrReservationNotFound,
		"ErrInvalidState":        ErrInvalidState,
		"ErrReservationExpired":  ErrReservationExpired,
		"ErrFeedGone":            ErrFeedGone,
		"ErrBackupNotFound":      ErrBackupNotFound,
		"ErrBackupRunning":       ErrBackupRunning,
		"ErrBackupsUnsupported":  ErrBackupsUnsupported,
		"ErrHoldCap":             ErrHoldCap,
	}
	files, err := filepath.Glob("*.go")
	if err != nil {
		t.Fatal(err)
	}
	fset := token.NewFileSet()
	for _, name := range files {
		if strings.HasSuffix(name, "_test.go") {
			continue
		}
		f, err := parser.ParseFile(fset, name, nil, parser.SkipObjectResolution)
		if err != nil {
			t.Fatal(err)
		}
		for _, d := range f.Decls {
			gd, ok := d.(*ast.GenDecl)
			if !ok || gd.Tok != token.VAR {
				continue
			}
			for _, spec := range gd.Specs {
				for _, id := range spec.(*ast.ValueSpec).Names {
					if strings.HasPrefix(id.Name, "Err") {
						if _, ok := sentinels[id.Name]; !ok {
							t.Errorf("%s declares sentinel %s; add it to this test and to errorStatus", name, id.Name)
						}
					}
				}
			}
		}
	}
	// A constraint the database enforces comes back as ErrInvalid.
	_, _, constraintErr := newTestStore(t).Create(t.Context(), "", Product{SKU: "C-1", Name: "x", PriceCents: -1, Currency: "USD"}, nil)
	if !errors.Is(constraintErr, ErrInvalid) {
		t.Fatalf("Create with a negative price error = %v, want ErrInvalid", constraintErr)
	}
	cases := map[string]error{
		"CHECK constraint":  constraintErr,
		"ValidationError":   &ValidationError{Problems: map[string]string{"name": "required"}},
		"BadRequestError":   &BadRequestError{Detail: "bad"},
		"UnavailableError":  &UnavailableError{Reason: "down", RetryAfter: time.Second},
		"rateLimitError":    &rateLimitError{retryAfter: time.Second},
		"httpError":         &httpError{status: http.StatusNotFound, detail: "gone"},
		"wrapped not found": fmt.Errorf("get product 1: %w", ErrNotFound),
	}
	for name, err := range sentinels {
		cases[name] = fmt.Errorf("wrapped: %w", err)
	}
	for name, err := range cases {
		r := httptest.NewRequest("GET", "/products/1", nil)
		w := httptest.NewRecorder()
		writeError(w, r, err)
		if w.Code == http.StatusInternalServerError || w.Code < 400 {
			t.Errorf("writeError(%s: %v) status = %d, want a status from the table", name, err, w.Code)
		}
	}
}

func TestLoggerFrom_neverNil(t *testing.T) {
	ctxs := map[string]context.Context{
		"no request info":     context.Background(),
		"request info no log": context.WithValue(context.Background(), requestInfoKey{}, &requestInfo{id: "x"}),
	}
	for name, ctx := range ctxs {
		if loggerFrom(ctx, nil) == nil {
			t.Errorf("loggerFrom(%s, nil) = nil", name)
		}
		loggerFrom(ctx, nil).InfoContext(ctx, "must not panic")
	}
}

// TestWriteProblem_matchesEncodingJSON checks the hand-written encoding of
// problem documents against encoding/json, byte for byte.
func TestWriteProblem_matchesEncodingJSON(t *testing.T) {
	tests := []struct {
		name     string
		path     string
		detail   string
		problems map[string]string
	}{
		{name: "plain", path: "/products/1", detail: "no product has this id"},
		{name: "escapes", path: "/products/\"<x>\"\\", detail: "tab\there, é, \u2028, \x01, <&>"},
		{name: "field errors", path: "/products", detail: "see errors", problems: map[string]string{"sku": "required", "name": "too \"long\"", "a": "é"}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			r := httptest.NewRequest("GET", "/", nil)
			r.URL.Path = tt.path
			r = r.WithContext(context.WithValue(r.Context(), requestInfoKey{}, &requestInfo{id: "req-1"}))
			w := httptest.NewRecorder()
			n := writeProblem(w, r, http.StatusUnprocessableEntity, "validation", tt.detail, tt.problems)
			var want bytes.Buffer
			enc := json.NewEncoder(&want)
			enc.SetEscapeHTML(false)
			enc.Encode(problem{Type: "/problems/validation", Title: http.StatusText(422), Status: 422, Detail: tt.detail,
				Instance: tt.path, RequestID: "req-1", Errors: tt.problems})
			if got := w.Body.String(); got != want.String() || n != want.Len() {
				t.Errorf("writeProblem body = %q (%d bytes), want %q", got, n, want.String())
			}
			if cl := w.Header().Get("Content-Length"); cl != strconv.Itoa(want.Len()) {
				t.Errorf("Content-Length = %s, want %d", cl, want.Len())
			}
		})
	}
}

// TestServer_rejectedByNetHTTP pins down what the README says of requests
// net/http refuses before any handler runs: Go's own plain-text 400, without
// X-Request-ID or a problem document. No hook in net/http lets the service
// answer these itself.
func TestServer_rejectedByNetHTTP(t *testing.T) {
	ts := newTestServer(t, nil)
	srv := httptest.NewServer(ts.handler)
	t.Cleanup(srv.Close)
	for name, raw := range map[string]string{
		"control character in a header value": "GET /health HTTP/1.1\r\nHost: x\r\nX-Note: a\x01b\r\n\r\n",
		"malformed request line":              "GET /health\r\nHost: x\r\n\r\n",
		"HTTP/1.1 without Host":               "GET /health HTTP/1.1\r\n\r\n",
	} {
		t.Run(name, func(t *testing.T) {
			conn, err := net.Dial("tcp", srv.Listener.Addr().String())
			if err != nil {
				t.Fatal(err)
			}
			defer conn.Close()
			if _, err := io.WriteString(conn, raw); err != nil {
				t.Fatal(err)
			}
			resp, err := http.ReadResponse(bufio.NewReader(conn), nil)
			if err != nil {
				t.Fatalf("reading the response to %q: %v", raw, err)
			}
			resp.Body.Close()
			if resp.StatusCode != http.StatusBadRequest || !strings.HasPrefix(resp.Header.Get("Content-Type"), "text/plain") || resp.Header.Get("X-Request-ID") != "" {
				t.Errorf("%q: status %d, Content-Type %q, X-Request-ID %q; the README says net/http answers 400 text/plain without a request id",
					raw, resp.StatusCode, resp.Header.Get("Content-Type"), resp.Header.Get("X-Request-ID"))
			}
		})
	}
}
