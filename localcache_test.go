package main

import (
	"bytes"
	"fmt"
	"strings"
	"testing"
	"time"
)

func TestLocalCache_boundedInBytes(t *testing.T) {
	const budget = 1 << 20
	c := newLocalCache(1_000_000, budget, time.Minute)
	big := bytes.Repeat([]byte("x"), 2000)
	for id := int64(1); id <= 5000; id++ { // 10 MB offered to a 1 MiB cache
		c.fill(id, c.token(id), cachedProduct{JSON: big, Version: 1})
		if got := c.size(); got > budget {
			t.Fatalf("after %d fills the cache holds %d bytes, want at most %d", id, got, budget)
		}
	}
	if c.size() < budget/2 {
		t.Errorf("cache holds %d bytes of a %d budget, want it used", c.size(), budget)
	}
	var held int64
	for i := range c.shards {
		for _, e := range c.shards[i].entries {
			held += int64(len(e.cached.JSON) + entryOverhead)
		}
	}
	if held != c.size() {
		t.Errorf("entries add up to %d bytes, size() = %d", held, c.size())
	}
	// Replacing and deleting keep the count exact. A delete leaves a
	// tombstone one version above the product: it costs only its overhead.
	c.written(1, cachedProduct{JSON: []byte("{}"), Version: 2}, false)
	c.written(1, cachedProduct{Version: 3}, false)
	for id := int64(2); id <= 5000; id++ {
		c.written(id, cachedProduct{Version: 2}, false)
	}
	if got, want := c.size(), int64(c.len()*entryOverhead); got != want {
		t.Errorf("after deleting everything size() = %d, want %d (%d tombstones)", got, want, c.len())
	}
	for id := int64(1); id <= 5000; id++ {
		if _, ok := c.get(id); ok {
			t.Fatalf("get(%d) after its delete hit, want a miss", id)
		}
	}
	// A late report of an older version never replaces the tombstone.
	c.written(7, cachedProduct{JSON: []byte(`{"id":7}`), Version: 1}, false)
	if _, ok := c.get(7); ok {
		t.Error("an older version replaced a tombstone")
	}
}

func TestLocalCache_tooLargeNotKept(t *testing.T) {
	c := newLocalCache(1000, 64*4096, time.Minute) // 4 KiB per shard, 1 KiB per entry at most
	c.fill(1, c.token(1), cachedProduct{JSON: bytes.Repeat([]byte("x"), 2000), Version: 1})
	if _, ok := c.get(1); ok {
		t.Error("a product larger than its share was cached")
	}
	c.fill(2, c.token(2), cachedProduct{JSON: []byte(`{"id":2}`), Version: 1})
	if _, ok := c.get(2); !ok {
		t.Error("a small product was not cached")
	}
}

func TestPageCache_boundedInBytes(t *testing.T) {
	const budget = 1 << 20
	c := newPageCache(1_000_000, budget)
	page := bytes.Repeat([]byte("é"), 5000) // 10 KB, under budget/64
	for n := range 2000 {
		key := fmt.Sprintf("limit=100&max_price_cents=%d", n)
		_, writes, _ := c.get(key)
		c.fill(key, writes, page)
		if got := c.size(); got > budget {
			t.Fatalf("after %d fills the page cache holds %d bytes, want at most %d", n+1, got, budget)
		}
	}
	if _, _, ok := c.get("limit=100&max_price_cents=1999"); !ok {
		t.Error("the last page filled is not cached")
	}
	_, writes, _ := c.get("huge")
	c.fill("huge", writes, bytes.Repeat([]byte("x"), budget/64+1))
	if _, _, ok := c.get("huge"); ok {
		t.Error("a page larger than a 64th of the budget was cached")
	}
	c.fill(strings.Repeat("k", budget), writes, []byte("{}"))
	if got := c.size(); got > budget {
		t.Errorf("a huge key took the cache to %d bytes", got)
	}
	c.written()
	if got := c.size(); got != 0 {
		t.Errorf("after a write size() = %d, want 0", got)
	}
}

// TestProductService_pageFloodBounded lists pages of large products under
// many distinct queries, as an anonymous client can: the page cache stays
// within its share of the budget and every answer stays right.
func TestProductService_pageFloodBounded(t *testing.T) {
	const budget = 4 << 20
	svc := newTestService(t, nil, ServiceConfig{LocalCacheSize: 1000, CacheMemory: budget})
	desc := strings.Repeat("\u00e9", maxDescriptionLen)
	for i := range 20 {
		if _, _, err := svc.Create(t.Context(), ProductInput{SKU: new(fmt.Sprintf("F-%d", i)), Name: new("flood"),
			Description: new(desc), PriceCents: new(int64(i))}, nil); err != nil {
			t.Fatal(err)
		}
	}
	for n := range 300 {
		limit := 1 + n%5
		f := ListFilter{Limit: limit, MaxPriceCents: new(int64(n)), Sort: "id"}
		b, err := svc.ListJSON(t.Context(), fmt.Sprintf("limit=%d&max_price_cents=%d", limit, n), f)
		if err != nil {
			t.Fatal(err)
		}
		if want := min(limit, n+1); bytes.Count(b, []byte(`"sku":`)) != want {
			t.Fatalf("page %d holds %d products, want %d", n, bytes.Count(b, []byte(`"sku":`)), want)
		}
		if got := svc.caches.pages.size(); got > budget/2 {
			t.Fatalf("page cache holds %d bytes, want at most %d", got, budget/2)
		}
	}
	if svc.caches.pages.size() == 0 {
		t.Error("no page was cached")
	}
}
