package main

import (
	"errors"
	"testing"
	"time"
)

// TestStore_Events_afterTrimmingEverything checks that seqs keep
// increasing when retention has trimmed every event: a consumer at the last
// seq it saw still receives the next write, and a position before the trim
// is gone.
func TestStore_Events_afterTrimmingEverything(t *testing.T) {
	forEachStore(t, func(t *testing.T, s productStore) {
		ctx := t.Context()
		if _, _, err := s.Create(ctx, "", newProduct("TRIM-1"), nil); err != nil {
			t.Fatal(err)
		}
		es, err := s.Events(ctx, 0, 100)
		if err != nil || len(es) == 0 {
			t.Fatalf("Events(0) = %v, %v; want the create", es, err)
		}
		last := es[len(es)-1].Seq
		if n, err := s.TrimEvents(ctx, time.Now().Add(time.Hour)); err != nil || n != int64(len(es)) {
			t.Fatalf("TrimEvents(an hour from now) = %d, %v; want %d", n, err, len(es))
		}
		if _, _, err := s.Create(ctx, "", newProduct("TRIM-2"), nil); err != nil {
			t.Fatal(err)
		}
		es, err = s.Events(ctx, last, 100)
		if err != nil || len(es) != 1 || es[0].Seq <= last || es[0].Type != EventProductCreated {
			t.Fatalf("Events(%d) after trimming everything = %+v, %v; want the second create, with a seq above %d", last, es, err, last)
		}
		if _, err := s.Events(ctx, last-1, 100); !errorsAsGone(err) {
			t.Errorf("Events(%d), a trimmed position = %v, want a *FeedGoneError", last-1, err)
		}
	})
}

func errorsAsGone(err error) bool {
	var gone *FeedGoneError
	return errors.As(err, &gone)
}
