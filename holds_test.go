package main

import (
	"encoding/json"
	"fmt"
	"slices"
	"testing"
	"time"
)

// TestServer_expiredHoldStopsCountingOnReads holds every unit of a product
// for one second, with the sweeper not running, and reads the product and
// listings before and after the hold's expires_at: before, the units are
// reserved; from the moment it passes, the product (cached or not) and the
// listings (in_stock=true among them) count them as available again, and
// the reservation reads as expired.
func TestServer_expiredHoldStopsCountingOnReads(t *testing.T) {
	forEachStore(t, func(t *testing.T, s productStore) {
		svc := newTestService(t, s, ServiceConfig{LocalCacheSize: 100})
		ts := newTestServer(t, svc)
		p := ts.createProduct(t, "HOLD-EXP", 100, `"stock":5`)
		r := ts.write(t, "POST", "/reservations", fmt.Sprintf(`{"reference":"o-exp","ttl_seconds":1,"lines":[{"product_id":%d,"quantity":5}]}`, p.ID))
		if r.status != 201 {
			t.Fatalf("reserve = %v, want 201", r)
		}
		var res Reservation
		if err := json.Unmarshal(r.body, &res); err != nil {
			t.Fatal(err)
		}
		inStock := func() []int64 {
			r := ts.get(t, "/products?in_stock=true&limit=100")
			var page struct{ Items []Product }
			if r.status != 200 || json.Unmarshal(r.body, &page) != nil {
				t.Fatalf("list in stock = %v", r)
			}
			var ids []int64
			for _, q := range page.Items {
				ids = append(ids, q.ID)
			}
			return ids
		}
		// Before expires_at: held, and cached that way.
		if got := ts.getProduct(t, p.ID); got.Reserved != 5 {
			t.Fatalf("before expiry reserved = %d, want 5", got.Reserved)
		}
		if ids := inStock(); slices.Contains(ids, p.ID) {
			t.Fatalf("before expiry in_stock=true lists %v, want without %d", ids, p.ID)
		}
		waitFor(t, 10*time.Second, "the hold's expires_at to pass", func() bool { return time.Now().After(res.ExpiresAt) })

		if got := ts.getProduct(t, p.ID); got.Reserved != 0 || got.Stock != 5 {
			t.Errorf("after expiry GET = reserved %d stock %d, want 0 and 5: an expired hold still counts", got.Reserved, got.Stock)
		}
		if ids := inStock(); !slices.Contains(ids, p.ID) {
			t.Errorf("after expiry in_stock=true lists %v, want %d among them", ids, p.ID)
		}
		r = ts.get(t, "/reservations/"+res.ID, "Authorization", "Bearer "+testToken)
		var after Reservation
		if r.status != 200 || json.Unmarshal(r.body, &after) != nil || after.State != StateExpired {
			t.Errorf("after expiry GET reservation = %v, want state expired", r)
		}
		if got := mustGet(t, s, p.ID); got.Reserved != 0 {
			t.Errorf("after expiry the store holds reserved %d, want 0", got.Reserved)
		}
	})
}

// TestHoldClock follows the clock through a look that a new hold overtakes.
func TestHoldClock(t *testing.T) {
	var c holdClock
	now := time.Now()
	if !c.due(now) {
		t.Fatal("a clock never looked up is not due; want due")
	}
	c.begin()
	c.lower(now.Add(time.Second)) // a hold made while the look runs
	c.finish(now.Add(time.Hour), true)
	if c.due(now) || !c.due(now.Add(time.Second)) {
		t.Errorf("after a look overtaken by a hold at +1s: due(now) = %v, due(+1s) = %v, want false, true", c.due(now), c.due(now.Add(time.Second)))
	}
	c.begin()
	c.finish(time.Time{}, true) // none open
	if c.due(now.Add(48 * time.Hour)) {
		t.Error("with no open hold the clock is due; want not")
	}
	c.lower(now.Add(time.Minute))
	if !c.due(now.Add(time.Minute)) {
		t.Error("a hold made after the look is not due at its expiry; want due")
	}
	c.begin()
	c.finish(time.Time{}, false)
	if !c.due(now) {
		t.Error("after a failed look the clock is not due; want due (look again)")
	}
}

// TestFollower_expiredHoldAcrossReplicas: replica A holds every unit of a
// product for one second; replica B, which has the product cached (and so
// does Redis), answers reserved 5 before the hold expires and 0 from the
// moment it has, with no sweeper running anywhere.
func TestFollower_expiredHoldAcrossReplicas(t *testing.T) {
	r := startRedis(t)
	a, b := replicaPair(t, r)
	p, _, err := a.Create(t.Context(), ProductInput{SKU: new("HOLD-R"), Name: new("held"), PriceCents: new(int64(1)), Stock: new(int64(5))}, nil)
	if err != nil {
		t.Fatal(err)
	}
	read := func() Product {
		t.Helper()
		v, _, err := b.Get(t.Context(), p.ID)
		if err != nil {
			t.Fatal(err)
		}
		return decodeProduct(t, v.JSON)
	}
	read() // B has looked for open holds, and found none, before A makes one
	res, _, err := a.Reserve(t.Context(), ReservationInput{Reference: new("o-r"), TTLSeconds: new(int64(1)),
		Lines: []ReservationLine{{ProductID: p.ID, Quantity: 5}}}, nil)
	if err != nil {
		t.Fatal(err)
	}
	if got := read(); got.Reserved != 5 {
		t.Fatalf("B before expiry: reserved %d, want 5", got.Reserved)
	}
	waitFor(t, 10*time.Second, "the hold's expires_at to pass", func() bool { return time.Now().After(res.ExpiresAt) })
	if got := read(); got.Reserved != 0 {
		t.Errorf("B after expiry: reserved %d, want 0: an expired hold of replica A still counts", got.Reserved)
	}
}
