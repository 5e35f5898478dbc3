package main

import (
	"bytes"
	"encoding/json"
	"fmt"
	"net/http"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/google/go-cmp/cmp"
)

// TestRenewLogID_postgres is the PostgreSQL restore the README documents:
// pg_dump -Fc, pg_restore into an empty database, then productsvc
// -renew-log-id. The restored database holds what the dump did, and
// consumers of the old change log are told to resync.
func TestRenewLogID_postgres(t *testing.T) {
	ctx := t.Context()
	srcURL := newTestDatabase(t)
	src := openTestPostgres(t, srcURL)
	var ids []int64
	for i := range 20 {
		p := newProduct(fmt.Sprintf("PG-%d", i))
		p.Stock = 10
		c, _, err := src.Create(ctx, "", p, nil)
		if err != nil {
			t.Fatal(err)
		}
		ids = append(ids, c.ID)
	}
	if _, err := src.Reserve(ctx, Reservation{ID: newReservationID(), Reference: "order-1",
		Lines: []ReservationLine{{ProductID: ids[0], Quantity: 2}}}, time.Hour, 0, nil); err != nil {
		t.Fatal(err)
	}
	oldID, _ := src.LogID(ctx)
	head, _ := src.FeedHead(ctx)
	wantEvents, err := src.Events(ctx, 0, 1000)
	if err != nil {
		t.Fatal(err)
	}

	pg := sharedPostgres(t)
	dump := filepath.Join(t.TempDir(), "products.dump")
	if out, err := exec.CommandContext(ctx, pg.Tool("pg_dump"), "--format=custom", "--file="+dump, "--dbname="+srcURL).CombinedOutput(); err != nil {
		t.Fatalf("pg_dump: %v: %s", err, out)
	}
	dstURL := newTestDatabase(t)
	if out, err := exec.CommandContext(ctx, pg.Tool("pg_restore"), "--no-owner", "--exit-on-error", "--dbname="+dstURL, dump).CombinedOutput(); err != nil {
		t.Fatalf("pg_restore: %v: %s", err, out)
	}

	var stdout, stderr bytes.Buffer
	getenv := func(k string) string { return map[string]string{"DATABASE_URL": dstURL, "LOG_LEVEL": "error"}[k] }
	if err := run(ctx, []string{"productsvc", "-renew-log-id"}, getenv, &stdout, &stderr); err != nil {
		t.Fatalf("productsvc -renew-log-id: %v; stderr %s", err, stderr.String())
	}
	if !strings.Contains(stdout.String(), "was "+oldID) {
		t.Errorf("-renew-log-id printed %q, want the old log_id %s named", stdout.String(), oldID)
	}

	dst := openTestPostgres(t, dstURL)
	newID, _ := dst.LogID(ctx)
	if newID == oldID || !validLogID(newID) {
		t.Errorf("log_id after -renew-log-id = %q, want a new one (was %s)", newID, oldID)
	}
	gotEvents, err := dst.Events(ctx, 0, 1000)
	if err != nil {
		t.Fatal(err)
	}
	if diff := cmp.Diff(wantEvents, gotEvents); diff != "" {
		t.Errorf("restored events (-dumped +restored):\n%s", diff)
	}
	for _, id := range ids {
		want, _ := src.Get(ctx, id)
		got, err := dst.Get(ctx, id)
		if err != nil {
			t.Errorf("restored product %d: %v", id, err)
		} else if diff := cmp.Diff(want, got); diff != "" {
			t.Errorf("restored product %d (-dumped +restored):\n%s", id, diff)
		}
	}
	// New writes continue the id and seq sequences.
	c, _, err := dst.Create(ctx, "", newProduct("PG-new"), nil)
	if err != nil || c.ID <= ids[len(ids)-1] {
		t.Errorf("create after the restore: id %d, %v; want an id above %d", c.ID, err, ids[len(ids)-1])
	}

	ts := newTestServer(t, newTestService(t, dst, ServiceConfig{}))
	auth := "Bearer " + testToken
	resp := ts.do(t, "GET", fmt.Sprintf("/events?after=%d&log_id=%s", head, oldID), nil, "Authorization", auth)
	var p problem
	json.Unmarshal(resp.body, &p)
	if resp.status != http.StatusGone || p.Type != "/problems/feed-reset" {
		t.Errorf("GET /events with the old log_id: %s, want 410 feed-reset", resp)
	}
}

// TestRenewLogID_sqlite renews a SQLite database's log_id, and refuses
// while the service holds the file.
func TestRenewLogID_sqlite(t *testing.T) {
	ctx := t.Context()
	path := filepath.Join(t.TempDir(), "products.db")
	s := openTestStore(t, path)
	old, _ := s.LogID(ctx)
	var out bytes.Buffer
	if err := renewLogID(ctx, StoreConfig{Path: path}, &out); err == nil || !strings.Contains(err.Error(), "in use") {
		t.Errorf("renew beside a running service: %v, want a refusal", err)
	}
	s.Close()
	if err := renewLogID(ctx, StoreConfig{Path: path}, &out); err != nil {
		t.Fatalf("renew: %v", err)
	}
	s = openTestStore(t, path)
	if id, _ := s.LogID(ctx); id == old || !validLogID(id) {
		t.Errorf("log_id after renew = %q, was %q", id, old)
	}
}
