package e2e

import (
	"context"
	"encoding/base64"
	"encoding/json"
	"fmt"
	"math/rand/v2"
	"net/http"
	"net/url"
	"slices"
	"strconv"
	"strings"
	"testing"
	"time"
)

// badCase is one malformed request and the statuses the contract allows.
type badCase struct {
	name   string
	method string
	path   string // already escaped as it goes on the wire
	body   []byte
	// hdr overrides request headers; an empty value removes the header
	// (for example "Content-Type": "" sends no Content-Type).
	hdr map[string]string
	// raw, when set, is sent as is over a fresh TCP connection; used for
	// requests net/http would refuse, normalise or not finish sending.
	raw   []byte
	want  []int
	allow []string // for 405: methods the Allow header must list
	// check adds case-specific assertions; it returns "" when fine.
	check func(r *response) string
}

// rawRequest assembles an HTTP/1.1 request for rawHTTP.
func rawRequest(host, method, target string, headers []string, body []byte) []byte {
	var b strings.Builder
	fmt.Fprintf(&b, "%s %s HTTP/1.1\r\nHost: %s\r\nConnection: close\r\n", method, target, host)
	for _, h := range headers {
		b.WriteString(h + "\r\n")
	}
	if body != nil {
		fmt.Fprintf(&b, "Content-Length: %d\r\n", len(body))
	}
	b.WriteString("\r\n")
	out := []byte(b.String())
	return append(out, body...)
}

// chunkedRequest assembles a request whose body is sent chunked.
func chunkedRequest(host, method, target string, headers []string, body []byte) []byte {
	var b strings.Builder
	fmt.Fprintf(&b, "%s %s HTTP/1.1\r\nHost: %s\r\nConnection: close\r\nTransfer-Encoding: chunked\r\n", method, target, host)
	for _, h := range headers {
		b.WriteString(h + "\r\n")
	}
	b.WriteString("\r\n")
	for len(body) > 0 {
		n := min(len(body), 32<<10)
		fmt.Fprintf(&b, "%x\r\n%s\r\n", n, body[:n])
		body = body[n:]
	}
	b.WriteString("0\r\n\r\n")
	return []byte(b.String())
}

// emptyItems checks a 200 list response has no items.
func emptyItems(r *response) string {
	if r.Status != http.StatusOK {
		return ""
	}
	var lp listPage
	if err := json.Unmarshal(r.Body, &lp); err != nil {
		return fmt.Sprintf("list body does not parse: %v", err)
	}
	if len(lp.Items) != 0 {
		return fmt.Sprintf("an SQL-looking filter matched %d items, want 0", len(lp.Items))
	}
	return ""
}

func problemType(slug string) func(*response) string {
	return func(r *response) string {
		var p problem
		_ = json.Unmarshal(r.Body, &p)
		if p.Type != "/problems/"+slug {
			return fmt.Sprintf("problem type %q, want /problems/%s", p.Type, slug)
		}
		return ""
	}
}

func TestBadInputCorpus(t *testing.T) {
	svc, c := startReadyService(t, nil)

	// Seed rows whose names hold no digits and no "or", so that an
	// SQL-looking search term cannot legitimately match them.
	names := []string{"alpha pen", "beta pencil", "gamma notebook", "delta eraser", "epsilon ruler"}
	var seeded []product
	for i, n := range names {
		seeded = append(seeded, mustCreate(t, c, fmt.Sprintf("bi-%d", i), n, int64(100*(i+1)), map[string]any{"category": "office", "stock": 5}))
	}
	// Bump the first product so that If-Match "1" is stale for it.
	ctx := context.Background()
	p1 := "/products/" + strconv.FormatInt(seeded[0].ID, 10)
	p2 := "/products/" + strconv.FormatInt(seeded[1].ID, 10)
	p3 := "/products/" + strconv.FormatInt(seeded[2].ID, 10)
	if r, err := c.do(ctx, http.MethodPatch, p1, []byte(`{"price_cents":111}`), http.Header{"Content-Type": {"application/merge-patch+json"}}); err != nil || r.Status != http.StatusOK {
		t.Fatalf("PATCH %s: %v %v", p1, r, err)
	}
	cursorOf := func(path string) string {
		r, err := c.do(ctx, http.MethodGet, path, nil, nil)
		if err != nil || r.Status != http.StatusOK {
			t.Fatalf("GET %s: %v %v", path, r, err)
		}
		var lp listPage
		if err := json.Unmarshal(r.Body, &lp); err != nil || lp.NextCursor == nil || *lp.NextCursor == "" {
			t.Fatalf("GET %s: no next_cursor in %s (%v)", path, r.Body, err)
		}
		return url.QueryEscape(*lp.NextCursor)
	}
	curID := cursorOf("/products?limit=2")
	curPrice := cursorOf("/products?limit=2&sort=price_cents")
	randomB64 := make([]byte, 24)
	for i := range randomB64 {
		randomB64[i] = byte(rand.IntN(256))
	}

	before := mustListAll(t, c)
	beforeGets := map[int64]product{}
	for _, s := range seeded {
		p, r, err := getProduct(ctx, c, s.ID)
		if err != nil || r.Status != http.StatusOK {
			t.Fatalf("GET /products/%d: %v %v", s.ID, r, err)
		}
		beforeGets[s.ID] = p
	}

	host := svc.Addr
	auth := "Authorization: Bearer " + testToken
	// valid returns the members of a valid create with a fresh sku, so that
	// a case the service wrongly accepts does not turn later ones into 409s.
	nValid := 0
	valid := func() string {
		nValid++
		return fmt.Sprintf(`"sku":"bad-v%d","name":"valid name","price_cents":150`, nValid)
	}
	post := func(name, body string, want ...int) badCase {
		return badCase{name: name, method: http.MethodPost, path: "/products", body: []byte(body), want: want}
	}
	get := func(name, path string, want ...int) badCase {
		return badCase{name: name, method: http.MethodGet, path: path, want: want}
	}
	rawGet := func(name, path string, want ...int) badCase {
		return badCase{name: name, raw: rawRequest(host, http.MethodGet, path, nil, nil), want: want}
	}
	const sqlq = "%27%20OR%201%3D1%20--" // ' OR 1=1 --
	deepArrays := `{"sku":` + strings.Repeat("[", 10000) + strings.Repeat("]", 10000) + `}`
	deepObjects := strings.Repeat(`{"a":`, 10000) + "1" + strings.Repeat("}", 10000)
	big := []byte(`{"sku":"big-1","name":"big","price_cents":1,"description":"` + strings.Repeat("a", 2<<20) + `"}`)

	cases := []badCase{
		// Broken JSON.
		post("truncated object", `{"sku":"bad-1","name":"x"`, 400),
		post("unquoted key", `{sku:"bad-2","name":"x","price_cents":1}`, 400),
		post("single quotes", `{'sku':'bad-3','name':'x','price_cents':1}`, 400),
		post("trailing comma", `{"sku":"bad-4","name":"x","price_cents":1,}`, 400),
		post("top-level array", `[{"sku":"bad-5","name":"x","price_cents":1}]`, 400),
		post("top-level string", `"hello"`, 400),
		post("top-level number", `42`, 400),
		post("top-level null", `null`, 400, 422),
		post("deep nesting 10000 arrays", deepArrays, 400),
		post("deep nesting 10000 objects", deepObjects, 400),
		// Numbers.
		post("price 1e400", `{"sku":"bad-n1","name":"x","price_cents":1e400}`, 400),
		post("price 20 digits", `{"sku":"bad-n2","name":"x","price_cents":99999999999999999999}`, 400),
		post("stock 20 digits", `{"sku":"bad-n3","name":"x","price_cents":1,"stock":99999999999999999999}`, 400),
		post("price below int64 min", `{"sku":"bad-n4","name":"x","price_cents":-9223372036854775809}`, 400),
		post("price NaN", `{"sku":"bad-n5","name":"x","price_cents":NaN}`, 400),
		post("price Infinity", `{"sku":"bad-n6","name":"x","price_cents":Infinity}`, 400),
		post("price -Infinity", `{"sku":"bad-n7","name":"x","price_cents":-Infinity}`, 400),
		post("price float 1.5", `{"sku":"bad-n8","name":"x","price_cents":1.5}`, 400),
		post("price float 150.0", `{"sku":"bad-n9","name":"x","price_cents":150.0}`, 400, 422),
		post("price exponent 1e3", `{"sku":"bad-n10","name":"x","price_cents":1e3}`, 400, 422),
		post("price hex", `{"sku":"bad-n11","name":"x","price_cents":0x10}`, 400),
		post("price leading zero", `{"sku":"bad-n12","name":"x","price_cents":0150}`, 400),
		post("price as string", `{"sku":"bad-n13","name":"x","price_cents":"150"}`, 400),
		post("price as bool", `{"sku":"bad-n14","name":"x","price_cents":true}`, 400),
		post("price null", `{"sku":"bad-n15","name":"x","price_cents":null}`, 400, 422),
		post("negative price", `{"sku":"bad-n16","name":"x","price_cents":-1}`, 422),
		post("price above 1e12", `{"sku":"bad-n17","name":"x","price_cents":1000000000001}`, 422),
		post("price int64 max", `{"sku":"bad-n18","name":"x","price_cents":9223372036854775807}`, 422),
		post("negative stock", `{"sku":"bad-n19","name":"x","price_cents":1,"stock":-5}`, 422),
		post("stock above 1e12", `{"sku":"bad-n20","name":"x","price_cents":1,"stock":1000000000001}`, 422),
		post("stock float", `{"sku":"bad-n21","name":"x","price_cents":1,"stock":2.5}`, 400),
		// Types and strings.
		post("name as number", `{"sku":"bad-s1","name":5,"price_cents":1}`, 400),
		post("sku as object", `{"sku":{"a":1},"name":"x","price_cents":1}`, 400),
		post("invalid UTF-8 in name", "{\"sku\":\"bad-s2\",\"name\":\"a\xff\xfeb\",\"price_cents\":1}", 400),
		post("invalid UTF-8 in sku", "{\"sku\":\"bad-\xc3\",\"name\":\"x\",\"price_cents\":1}", 400),
		post("overlong UTF-8 in description", "{\"sku\":\"bad-s3\",\"name\":\"x\",\"price_cents\":1,\"description\":\"\xc0\xaf\"}", 400),
		post("invalid UTF-8 in a key", "{\"sku\":\"bad-s4\",\"name\":\"x\",\"price_cents\":1,\"\xff\":1}", 400),
		post("NUL in name", `{"sku":"bad-s5","name":"a\u0000b","price_cents":1}`, 422),
		post("newline in name", `{"sku":"bad-s6","name":"line\nbreak","price_cents":1}`, 422),
		post("sku with space", `{"sku":"a b","name":"x","price_cents":1}`, 422),
		post("sku SQL", `{"sku":"x' OR 1=1 --","name":"x","price_cents":1}`, 422),
		post("sku 65 chars", `{"sku":"`+strings.Repeat("s", 65)+`","name":"x","price_cents":1}`, 422),
		post("empty sku", `{"sku":"","name":"x","price_cents":1}`, 422),
		post("missing name", `{"sku":"bad-s7","price_cents":1}`, 422),
		post("name 201 runes", `{"sku":"bad-s8","name":"`+strings.Repeat("é", 201)+`","price_cents":1}`, 422),
		post("description 4001 runes", `{"sku":"bad-s9","name":"x","price_cents":1,"description":"`+strings.Repeat("d", 4001)+`"}`, 422),
		post("category 65 chars", `{"sku":"bad-s10","name":"x","price_cents":1,"category":"`+strings.Repeat("c", 65)+`"}`, 422),
		post("currency lower case", `{"sku":"bad-s11","name":"x","price_cents":1,"currency":"usd"}`, 422),
		post("currency 2 letters", `{"sku":"bad-s12","name":"x","price_cents":1,"currency":"US"}`, 422),
		post("missing price_cents", `{"sku":"bad-s13","name":"x"}`, 422),
		post("duplicate sku of a seeded row", `{"sku":"bi-1","name":"x","price_cents":1}`, 409),
		// Structure.
		post("duplicate key sku", `{"sku":"dup-1","sku":"dup-2","name":"x","price_cents":1}`, 400),
		post("duplicate key price", `{"sku":"dup-3","name":"x","price_cents":1,"price_cents":2}`, 400),
		post("unknown field", `{`+valid()+`,"colour":"red"}`, 400),
		post("case-variant key SKU", `{"SKU":"case-1","name":"x","price_cents":1}`, 400, 422),
		post("read-only field id", `{`+valid()+`,"id":12345}`, 400, 422),
		post("trailing object", `{`+valid()+`} {}`, 400),
		post("trailing garbage", `{`+valid()+`}xyz`, 400),
		post("two objects", `{`+valid()+`}{`+valid()+`}`, 400),
		post("empty body", ``, 400),
		post("whitespace body", "   \n", 400),
		// Content types.
		{name: "text/plain", method: http.MethodPost, path: "/products", body: []byte(`{` + valid() + `}`), hdr: map[string]string{"Content-Type": "text/plain"}, want: []int{415}},
		{name: "missing Content-Type", method: http.MethodPost, path: "/products", body: []byte(`{` + valid() + `}`), hdr: map[string]string{"Content-Type": ""}, want: []int{415}},
		{name: "application/xml", method: http.MethodPost, path: "/products", body: []byte(`<product><sku>x</sku></product>`), hdr: map[string]string{"Content-Type": "application/xml"}, want: []int{415}},
		{name: "form urlencoded", method: http.MethodPost, path: "/products", body: []byte(`sku=bad-f&name=x&price_cents=1`), hdr: map[string]string{"Content-Type": "application/x-www-form-urlencoded"}, want: []int{415}},
		{name: "PATCH json-patch", method: http.MethodPatch, path: p1, body: []byte(`[{"op":"replace","path":"/price_cents","value":5}]`), hdr: map[string]string{"Content-Type": "application/json-patch+json"}, want: []int{415}},
		// Sizes.
		{name: "body 2 MiB", raw: rawRequest(host, http.MethodPost, "/products", []string{auth, "Content-Type: application/json"}, big), want: []int{413}, check: problemType("payload-too-large")},
		{name: "body 2 MiB chunked", raw: chunkedRequest(host, http.MethodPost, "/products", []string{auth, "Content-Type: application/json"}, big), want: []int{413}, check: problemType("payload-too-large")},
		{name: "header 2 MiB", raw: rawRequest(host, http.MethodGet, "/products", []string{"X-Big: " + strings.Repeat("h", 2<<20)}, nil), want: []int{431}},
		// Paths.
		rawGet("path ..%2f", "/products/..%2f", 400, 404),
		rawGet("path 1%00", "/products/1%00", 400, 404),
		rawGet("path %2e%2e", "/products/%2e%2e", 400, 404),
		rawGet("path -1", "/products/-1", 400),
		rawGet("path 0", "/products/0", 400),
		rawGet("path int64 overflow", "/products/9223372036854775808", 400),
		rawGet("path 1.5", "/products/1.5", 400),
		rawGet("path abc", "/products/abc", 400),
		rawGet("path +1", "/products/+1", 400),
		rawGet("path 0x1", "/products/0x1", 400),
		rawGet("path double slash", "/products//1", 400, 404),
		rawGet("path dot-dot", "/products/../products/1", 400, 404),
		rawGet("path dot", "/products/./1", 400, 404),
		rawGet("path encoded slash", "/products/1%2f", 400, 404),
		rawGet("path SQL", "/products/1%20OR%201=1", 400),
		rawGet("path unknown id", "/products/987654321", 404),
		// SQL-looking strings in every query parameter.
		get("SQL in limit", "/products?limit="+sqlq, 400),
		get("SQL in cursor", "/products?cursor="+sqlq, 400),
		{name: "SQL in category", method: http.MethodGet, path: "/products?category=" + sqlq, want: []int{200}, check: emptyItems},
		{name: "SQL in q", method: http.MethodGet, path: "/products?q=" + sqlq, want: []int{200, 400}, check: emptyItems},
		{name: "SQL quote in q", method: http.MethodGet, path: "/products?q=%22unbalanced", want: []int{200, 400}, check: emptyItems},
		get("SQL in min_price_cents", "/products?min_price_cents="+sqlq, 400),
		get("SQL in max_price_cents", "/products?max_price_cents="+sqlq, 400),
		get("SQL in in_stock", "/products?in_stock="+sqlq, 400),
		get("SQL in sort", "/products?sort="+sqlq, 400),
		get("SQL in sort 2", "/products?sort=id%3BDROP%20TABLE%20products", 400),
		// Cursors.
		get("cursor random base64", "/products?cursor="+url.QueryEscape(base64.RawURLEncoding.EncodeToString(randomB64)), 400),
		get("cursor random std base64", "/products?cursor="+url.QueryEscape(base64.StdEncoding.EncodeToString(randomB64)), 400),
		get("cursor not base64", "/products?cursor=%21%21%21not-base64%21%21", 400),
		get("cursor of price sort with sort=name", "/products?sort=name&cursor="+curPrice, 400),
		get("cursor of price sort with another limit", "/products?limit=3&sort=price_cents&cursor="+curPrice, 400),
		get("cursor of id sort with sort=-id", "/products?sort=-id&cursor="+curID, 400),
		get("cursor truncated", "/products?cursor="+curID[:len(curID)/2], 400),
		// Limits and other parameters.
		get("limit 0", "/products?limit=0", 400),
		get("limit 101", "/products?limit=101", 400),
		get("limit -1", "/products?limit=-1", 400),
		get("limit abc", "/products?limit=abc", 400),
		get("limit 1.5", "/products?limit=1.5", 400),
		get("limit 20 digits", "/products?limit=99999999999999999999", 400),
		get("limit empty", "/products?limit=", 400),
		get("min_price_cents -1", "/products?min_price_cents=-1", 400),
		get("max_price_cents above 1e12", "/products?max_price_cents=1000000000001", 400),
		get("in_stock yes", "/products?in_stock=yes", 400),
		get("sort unknown column", "/products?sort=colour", 400),
		get("sort double minus", "/products?sort=--id", 400),
		get("unknown param", "/products?foo=bar", 400),
		get("unknown param case", "/products?LIMIT=5", 400),
		get("repeated limit", "/products?limit=5&limit=6", 400),
		get("repeated sort", "/products?sort=id&sort=name", 400),
		get("repeated category", "/products?category=a&category=b", 400),
		// Preconditions.
		{name: "If-Match malformed", method: http.MethodPatch, path: p1, body: []byte(`{"price_cents":777}`), hdr: map[string]string{"If-Match": "abc", "Content-Type": "application/merge-patch+json"}, want: []int{400, 412}},
		{name: "If-Match stale", method: http.MethodPatch, path: p1, body: []byte(`{"price_cents":777}`), hdr: map[string]string{"If-Match": `"1"`, "Content-Type": "application/merge-patch+json"}, want: []int{412}, check: problemType("precondition-failed")},
		{name: "If-Match zero", method: http.MethodPatch, path: p1, body: []byte(`{"price_cents":777}`), hdr: map[string]string{"If-Match": `"0"`, "Content-Type": "application/merge-patch+json"}, want: []int{412}},
		{name: "If-Match weak", method: http.MethodPatch, path: p1, body: []byte(`{"price_cents":777}`), hdr: map[string]string{"If-Match": `W/"2"`, "Content-Type": "application/merge-patch+json"}, want: []int{400, 412}},
		{name: "If-Match stale PUT", method: http.MethodPut, path: p1, body: []byte(`{"sku":"bi-0","name":"replaced","price_cents":5}`), hdr: map[string]string{"If-Match": `"1"`}, want: []int{412}},
		{name: "If-Match stale DELETE", method: http.MethodDelete, path: p2, hdr: map[string]string{"If-Match": `"99"`}, want: []int{412}},
		// Stock.
		{name: "adjust below zero", method: http.MethodPost, path: p2 + "/stock/adjustments", body: []byte(`{"delta":-1000000}`), want: []int{409}, check: problemType("insufficient-stock")},
		{name: "adjust float", method: http.MethodPost, path: p2 + "/stock/adjustments", body: []byte(`{"delta":1.5}`), want: []int{400}},
		{name: "adjust string", method: http.MethodPost, path: p2 + "/stock/adjustments", body: []byte(`{"delta":"1"}`), want: []int{400}},
		{name: "adjust 20 digits", method: http.MethodPost, path: p2 + "/stock/adjustments", body: []byte(`{"delta":99999999999999999999}`), want: []int{400}},
		{name: "adjust unknown field", method: http.MethodPost, path: p2 + "/stock/adjustments", body: []byte(`{"delta":1,"reason":"x"}`), want: []int{400}},
		{name: "set stock negative", method: http.MethodPut, path: p2 + "/stock", body: []byte(`{"stock":-1}`), want: []int{422}},
		{name: "set stock string", method: http.MethodPut, path: p2 + "/stock", body: []byte(`{"stock":"5"}`), want: []int{400}},
		// Methods.
		{name: "PATCH collection", method: http.MethodPatch, path: "/products", body: []byte(`{}`), want: []int{405}, allow: []string{"GET", "POST"}},
		{name: "DELETE collection", method: http.MethodDelete, path: "/products", want: []int{405}, allow: []string{"GET", "POST"}},
		{name: "PUT collection", method: http.MethodPut, path: "/products", body: []byte(`{}`), want: []int{405}, allow: []string{"GET", "POST"}},
		{name: "POST item", method: http.MethodPost, path: p1, body: []byte(`{}`), want: []int{405}, allow: []string{"GET", "PUT", "PATCH", "DELETE"}},
		{name: "GET adjustments", method: http.MethodGet, path: p1 + "/stock/adjustments", want: []int{405}, allow: []string{"POST"}},
		{name: "POST health", method: http.MethodPost, path: "/health", body: []byte(`{}`), want: []int{405}, allow: []string{"GET"}},
		{name: "DELETE ready", method: http.MethodDelete, path: "/ready", want: []int{405}, allow: []string{"GET"}},
		// Authentication.
		{name: "no token", method: http.MethodPost, path: "/products", body: []byte(`{"sku":"auth-1","name":"x","price_cents":1}`), hdr: map[string]string{"Authorization": ""}, want: []int{401}},
		{name: "wrong token", method: http.MethodPost, path: "/products", body: []byte(`{"sku":"auth-2","name":"x","price_cents":1}`), hdr: map[string]string{"Authorization": "Bearer wrong"}, want: []int{401}},
		{name: "token with suffix", method: http.MethodPost, path: "/products", body: []byte(`{"sku":"auth-3","name":"x","price_cents":1}`), hdr: map[string]string{"Authorization": "Bearer " + testToken + "2"}, want: []int{401}},
		{name: "token prefix", method: http.MethodPost, path: "/products", body: []byte(`{"sku":"auth-4","name":"x","price_cents":1}`), hdr: map[string]string{"Authorization": "Bearer " + testToken[:4]}, want: []int{401}},
		{name: "Basic scheme", method: http.MethodPost, path: "/products", body: []byte(`{"sku":"auth-5","name":"x","price_cents":1}`), hdr: map[string]string{"Authorization": "Basic " + testToken}, want: []int{401}},
		{name: "Bearer without token", method: http.MethodPost, path: "/products", body: []byte(`{"sku":"auth-6","name":"x","price_cents":1}`), hdr: map[string]string{"Authorization": "Bearer "}, want: []int{401}},
		{name: "PATCH without token", method: http.MethodPatch, path: p1, body: []byte(`{"price_cents":5}`), hdr: map[string]string{"Authorization": "", "Content-Type": "application/merge-patch+json"}, want: []int{401}},
		{name: "PUT without token", method: http.MethodPut, path: p1, body: []byte(`{"sku":"bi-0","name":"x","price_cents":5}`), hdr: map[string]string{"Authorization": ""}, want: []int{401}},
		{name: "DELETE without token", method: http.MethodDelete, path: p3, hdr: map[string]string{"Authorization": ""}, want: []int{401}},
		{name: "adjust without token", method: http.MethodPost, path: p3 + "/stock/adjustments", body: []byte(`{"delta":1}`), hdr: map[string]string{"Authorization": ""}, want: []int{401}},
		// The eleventh failed authentication from this address in a row:
		// the failed-authentication limit, on by default (10, then one per
		// 6 s), answers 429 instead.
		{name: "set stock with wrong token", method: http.MethodPut, path: p3 + "/stock", body: []byte(`{"stock":1}`), hdr: map[string]string{"Authorization": "Bearer nope"}, want: []int{429}},
	}

	passed := 0
	for _, tc := range cases {
		ok := t.Run(tc.name, func(t *testing.T) {
			r, err := sendBadCase(c, host, tc)
			if err != nil {
				t.Fatalf("%s: %v", describeCase(tc), err)
			}
			var pb problem
			_ = json.Unmarshal(r.Body, &pb)
			t.Logf("-> %d %s type=%q", r.Status, r.Header.Get("Content-Type"), pb.Type)
			for _, msg := range checkBadResponse(tc, r) {
				t.Errorf("%s: %s", describeCase(tc), msg)
			}
		})
		if ok {
			passed++
		}
	}

	after := mustListAll(t, c)
	if len(after) != len(before) {
		t.Errorf("row count after the corpus: %d, want %d (unchanged)", len(after), len(before))
	}
	afterByID := map[int64]product{}
	for _, p := range after {
		afterByID[p.ID] = p
	}
	for _, p := range before {
		if d := diffProduct(p, afterByID[p.ID]); d != "" {
			t.Errorf("product %d changed by the corpus (list): %s", p.ID, d)
		}
	}
	for id, want := range beforeGets {
		p, r, err := getProduct(ctx, c, id)
		if err != nil || r.Status != http.StatusOK {
			t.Errorf("GET /products/%d after the corpus: %v %v", id, r, err)
			continue
		}
		if d := diffProduct(want, p); d != "" {
			t.Errorf("GET /products/%d changed by the corpus: %s", id, d)
		}
	}
	rb, r, err := getReady(c)
	if err != nil || r.Status != http.StatusOK {
		t.Errorf("GET /ready after the corpus: %v %v, want 200", r, err)
	}
	t.Logf("RESULT corpus cases=%d passed=%d failed=%d; rows before=%d after=%d; ready=%q",
		len(cases), passed, len(cases)-passed, len(before), len(after), rb.Status)
	if len(cases) < 60 {
		t.Errorf("corpus has %d cases, want >= 60", len(cases))
	}
}

func describeCase(tc badCase) string {
	if tc.raw != nil {
		line, _, _ := strings.Cut(string(tc.raw), "\r\n")
		if len(line) > 120 {
			line = line[:120] + "..."
		}
		return fmt.Sprintf("raw %q (want %v)", line, tc.want)
	}
	body := string(tc.body)
	if len(body) > 100 {
		body = body[:100] + "..."
	}
	return fmt.Sprintf("%s %s body=%q hdr=%v (want %v)", tc.method, tc.path, body, tc.hdr, tc.want)
}

// sendBadCase sends tc through net/http, or raw TCP when tc.raw is set.
func sendBadCase(c *client, host string, tc badCase) (*response, error) {
	if tc.raw != nil {
		return rawHTTP(host, tc.raw, 30*time.Second)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 15*time.Second)
	defer cancel()
	req, err := c.newRequest(ctx, tc.method, tc.path, tc.body, nil)
	if err != nil {
		return nil, err
	}
	for k, v := range tc.hdr {
		if v == "" {
			req.Header.Del(k)
		} else {
			req.Header.Set(k, v)
		}
	}
	return c.send(req)
}

// checkBadResponse applies the contract's rules for an error response.
func checkBadResponse(tc badCase, r *response) []string {
	var errs []string
	if !slices.Contains(tc.want, r.Status) {
		errs = append(errs, fmt.Sprintf("got %s, want status %v", r, tc.want))
	}
	if r.Status >= 300 && r.Status < 400 {
		errs = append(errs, fmt.Sprintf("redirect %d to %q: never a redirect", r.Status, r.Header.Get("Location")))
	}
	if r.Status == http.StatusRequestHeaderFieldsTooLarge {
		// net/http's own header limit answers in text/plain before any
		// middleware runs; accepted as is.
		return errs
	}
	if r.Status >= 400 {
		if d := checkProblem(r, r.Status); d != "" {
			errs = append(errs, d)
		}
	}
	if r.Header.Get("X-Request-ID") == "" {
		errs = append(errs, "no X-Request-ID header")
	}
	if got := r.Header.Get("X-Content-Type-Options"); got != "nosniff" {
		errs = append(errs, fmt.Sprintf("X-Content-Type-Options %q, want nosniff", got))
	}
	if r.Status == http.StatusUnauthorized && !strings.HasPrefix(r.Header.Get("WWW-Authenticate"), "Bearer") {
		errs = append(errs, fmt.Sprintf("401 with WWW-Authenticate %q, want Bearer", r.Header.Get("WWW-Authenticate")))
	}
	if r.Status == http.StatusMethodNotAllowed {
		allow := r.Header.Get("Allow")
		for _, m := range tc.allow {
			if !slices.Contains(splitList(allow), m) {
				errs = append(errs, fmt.Sprintf("405 Allow %q does not list %s", allow, m))
			}
		}
	}
	if r.Status >= 500 {
		lower := strings.ToLower(string(r.Body))
		for _, leak := range []string{"sql", "sqlite", "/tmp/", ".go:", "panic", "runtime error"} {
			if strings.Contains(lower, leak) {
				errs = append(errs, fmt.Sprintf("5xx body leaks %q", leak))
			}
		}
	}
	if tc.check != nil && slices.Contains(tc.want, r.Status) {
		if msg := tc.check(r); msg != "" {
			errs = append(errs, msg)
		}
	}
	return errs
}

func splitList(s string) []string {
	var out []string
	for _, f := range strings.Split(s, ",") {
		if f = strings.TrimSpace(f); f != "" {
			out = append(out, f)
		}
	}
	return out
}
