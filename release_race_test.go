package main

import (
	"context"
	"errors"
	"fmt"
	"sync"
	"testing"
	"time"
)

// TestStore_releaseRace checks, on both engines, that a hold's units are
// given back once however its end races with other writes: holds that
// run out while new holds on the same product release them
// (releaseDueLines) and the sweep records them expired (finish). Once
// every hold has ended, nothing may remain reserved. On PostgreSQL a
// finish that read its lines before taking the product's lock gave units
// back twice, and reserved drifted below what the open holds held.
func TestStore_releaseRace(t *testing.T) {
	forEachStore(t, func(t *testing.T, s productStore) {
		ctx := t.Context()
		p, _, err := s.Create(ctx, "", Product{SKU: "RACE-1", Name: "race", Currency: "USD", Stock: 1_000_000}, nil)
		if err != nil {
			t.Fatal(err)
		}
		var wg sync.WaitGroup
		stop := make(chan struct{})
		errs := make(chan error, 16)
		for w := range 4 {
			wg.Go(func() {
				for n := 0; n < 150; n++ {
					_, err := s.Reserve(ctx, Reservation{ID: newReservationID(), Reference: fmt.Sprintf("o-%d-%d", w, n),
						Lines: []ReservationLine{{ProductID: p.ID, Quantity: 1}}}, time.Millisecond, 0, nil)
					if err != nil {
						errs <- fmt.Errorf("reserve: %w", err)
						return
					}
				}
			})
		}
		var sweeps sync.WaitGroup
		for range 2 {
			sweeps.Go(func() {
				for {
					select {
					case <-stop:
						return
					default:
					}
					if _, _, err := s.ExpireReservations(ctx, 5); err != nil && !errors.Is(err, context.Canceled) {
						errs <- fmt.Errorf("expire: %w", err)
						return
					}
				}
			})
		}
		wg.Wait()
		close(stop)
		sweeps.Wait()
		close(errs)
		for err := range errs {
			t.Error(err)
		}
		time.Sleep(5 * time.Millisecond) // past the last hold's 1 ms
		for i := 0; ; i++ {
			n, _, err := s.ExpireReservations(ctx, 100)
			if err != nil {
				t.Fatalf("expire the rest: %v", err)
			}
			if n == 0 {
				break
			}
			if i == 100 {
				t.Fatal("holds still expiring after 100 sweeps")
			}
		}
		got, err := s.Get(ctx, p.ID)
		if err != nil {
			t.Fatal(err)
		}
		if got.Reserved != 0 || got.Stock != 1_000_000 {
			t.Errorf("after every hold ended: stock %d reserved %d; want 1000000 and 0", got.Stock, got.Reserved)
		}
	})
}
