package main

import (
	"context"
	"slices"
	"sync"
	"testing"
)

// TestStore_FullTextIndexFollowsWrites checks the full-text index the writer
// maintains once per group: after creates, renames and deletes — also
// several to one product inside one group — search finds exactly the
// current text, and SQLite's own integrity check of the index passes.
func TestStore_FullTextIndexFollowsWrites(t *testing.T) {
	forEachStore(t, testFullTextIndexFollowsWrites)
}

func testFullTextIndexFollowsWrites(t *testing.T, s productStore) {
	ctx := context.Background()
	search := func(word string) []int64 {
		t.Helper()
		terms, msg := searchTerms(word)
		if msg != "" {
			t.Fatal(msg)
		}
		page, err := s.List(ctx, ListFilter{Limit: 100, Sort: "id", Terms: terms})
		if err != nil {
			t.Fatalf("search %q: %v", word, err)
		}
		var ids []int64
		for _, p := range page.Items {
			ids = append(ids, p.ID)
		}
		return ids
	}
	rename := func(id int64, name string) {
		t.Helper()
		if _, _, err := s.Update(ctx, "", id, ProductUpdate{Patch: ProductPatch{Name: optional[string]{Set: true, Value: name}}}); err != nil {
			t.Fatal(err)
		}
	}

	// Many concurrent writes land in shared groups.
	var wg sync.WaitGroup
	ids := make([]int64, 40)
	for i := range ids {
		wg.Go(func() {
			p, _, err := s.Create(ctx, "", Product{SKU: "F-" + string(rune('A'+i%26)) + string(rune('a'+i/26)), Name: "alpha widget",
				Description: "gamma", Currency: "USD"}, nil)
			if err != nil {
				t.Error(err)
			}
			ids[i] = p.ID
		})
	}
	wg.Wait()
	slices.Sort(ids)
	if got := search("alpha"); !slices.Equal(got, ids) {
		t.Fatalf("search alpha = %v, want all %d created %v", got, len(ids), ids)
	}

	// Renames and deletes, several per product, concurrently.
	for _, id := range ids[:10] {
		wg.Go(func() {
			rename(id, "beta widget")
			rename(id, "delta widget")
		})
	}
	for _, id := range ids[10:20] {
		wg.Go(func() {
			rename(id, "beta widget")
			if _, err := s.Delete(ctx, "", id, nil); err != nil {
				t.Error(err)
			}
		})
	}
	wg.Wait()

	if got, want := search("alpha"), ids[20:]; !slices.Equal(got, want) {
		t.Errorf("search alpha = %v, want %v", got, want)
	}
	if got := search("beta"); len(got) != 0 {
		t.Errorf("search beta = %v, want none (renamed again or deleted)", got)
	}
	if got, want := search("delta"), ids[:10]; !slices.Equal(got, want) {
		t.Errorf("search delta = %v, want %v", got, want)
	}
	if got, want := search("widget"), append(slices.Clone(ids[:10]), ids[20:]...); !slices.Equal(got, want) {
		t.Errorf("search widget = %v, want %v", got, want)
	}
	if s, ok := s.(*sqliteStore); ok {
		if _, err := s.wdb.ExecContext(ctx, `INSERT INTO products_fts (products_fts) VALUES ('integrity-check')`); err != nil {
			t.Errorf("full-text index integrity-check: %v", err)
		}
	}
}
