package main

import (
	"fmt"
	"path/filepath"
	"testing"
	"time"
)

// TestFTSMerge checks that the full-text index's segments are merged in
// the background: automerge is off, so without ftsMergeLoop every commit
// that changes the index would leave a segment of its own, up to the 16
// a level at which FTS5 merges by itself.
func TestFTSMerge(t *testing.T) {
	s, err := openSQLite(t.Context(), StoreConfig{Path: filepath.Join(t.TempDir(), "fts.db"), Sync: "normal"})
	if err != nil {
		t.Fatal(err)
	}
	defer s.Close()
	var automerge int
	if err := s.rdb.QueryRow(`SELECT v FROM products_fts_config WHERE k = 'automerge'`).Scan(&automerge); err != nil || automerge != 0 {
		t.Fatalf("automerge = %d, %v; want 0", automerge, err)
	}
	segments := func() (n int) {
		// A structure record, the averages and one row per leaf page: a
		// small segment is one leaf.
		if err := s.rdb.QueryRow(`SELECT count(*) FROM products_fts_data`).Scan(&n); err != nil {
			t.Fatal(err)
		}
		return n
	}
	for i := range 15 { // one commit each (sequential writes are groups of one); FTS5 merges by itself at 16
		if _, _, err := s.Create(t.Context(), "", Product{SKU: fmt.Sprintf("FTS-%d", i), Name: fmt.Sprintf("lamp %d", i), Currency: "USD"}, nil); err != nil {
			t.Fatal(err)
		}
	}
	waitFor(t, 10*time.Second, "the index's segments merged", func() bool { return segments() < 10 })
	var n int
	if err := s.rdb.QueryRow(`SELECT count(*) FROM products_fts WHERE products_fts MATCH 'lamp'`).Scan(&n); err != nil || n != 15 {
		t.Fatalf("MATCH lamp = %d, %v after the merges; want 15", n, err)
	}
}
