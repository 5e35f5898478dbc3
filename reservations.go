package main

// The service's inventory for order sagas: reservations that hold stock
// until they are confirmed, released or expire, and the change feed of
// every committed write.

import (
	"context"
	"log/slog"
	"sync"
	"time"
)

// maxByReference bounds GET /reservations?reference=…: an order has a few
// reservations, never thousands.
const maxByReference = 100

// Reserve validates in and holds its lines, all or nothing. It returns a
// *ValidationError (also for a line whose product does not exist), a
// *ShortageError, ErrIdempotencyMismatch, a *Replay when idem was used
// before, or an *UnavailableError.
func (s *ProductService) Reserve(ctx context.Context, in ReservationInput, idem *IdempotencyKey) (Reservation, error) {
	if problems := in.Valid(); len(problems) > 0 {
		return Reservation{}, &ValidationError{Problems: problems}
	}
	ttl := time.Duration(defaultHoldTTL) * time.Second
	if in.TTLSeconds != nil {
		ttl = time.Duration(*in.TTLSeconds) * time.Second
	}
	r := Reservation{ID: newReservationID(), Reference: *in.Reference, Lines: in.Lines}
	var changed []Product
	err := s.write(ctx, "reserve", func(ctx context.Context) error {
		var err error
		r, changed, err = s.store.Reserve(ctx, r, ttl, idem)
		return err
	})
	if err != nil {
		return Reservation{}, err
	}
	s.publishAll(ctx, changed)
	s.metrics.reservation(StateHeld)
	return r, nil
}

// Confirm confirms reservation id: its units leave stock. Confirming again
// returns it as it is. It returns ErrReservationNotFound, ErrInvalidState
// (it was released), ErrReservationExpired (with the reservation as it
// is), or an *UnavailableError.
func (s *ProductService) Confirm(ctx context.Context, id string) (Reservation, error) {
	return s.transition(ctx, id, StateConfirmed)
}

// Release releases reservation id: its units are available again. Errors
// as Confirm (ErrInvalidState: it was confirmed).
func (s *ProductService) Release(ctx context.Context, id string) (Reservation, error) {
	return s.transition(ctx, id, StateReleased)
}

func (s *ProductService) transition(ctx context.Context, id, to string) (Reservation, error) {
	var r Reservation
	var changed []Product
	err := s.write(ctx, "reservation "+to, func(ctx context.Context) error {
		var err error
		r, changed, err = s.store.Transition(ctx, id, to)
		return err
	})
	if err != nil {
		return Reservation{}, err
	}
	s.publishAll(ctx, changed)
	if len(changed) > 0 {
		s.metrics.reservation(r.State) // this call moved it
	}
	if r.State == StateExpired {
		return r, ErrReservationExpired
	}
	return r, nil
}

// Reservation returns reservation id, or ErrReservationNotFound.
func (s *ProductService) Reservation(ctx context.Context, id string) (Reservation, error) {
	var r Reservation
	err := guard(s.readCB, func() error {
		var err error
		r, err = s.store.Reservation(ctx, id)
		return err
	})
	return r, err
}

// ReservationsByReference returns the newest reservations made under ref,
// newest first.
func (s *ProductService) ReservationsByReference(ctx context.Context, ref string) ([]Reservation, error) {
	var rs []Reservation
	err := guard(s.readCB, func() error {
		var err error
		rs, err = s.store.ReservationsByReference(ctx, ref, maxByReference)
		return err
	})
	return rs, err
}

// publishAll records the products a committed write changed; see
// committed.
func (s *ProductService) publishAll(ctx context.Context, ps []Product) {
	for _, p := range ps {
		s.committed(ctx, p, false)
	}
}

// reservationExpirer is what SweepReservations needs of the store.
type reservationExpirer interface {
	// ExpireReservations records up to limit held reservations whose time
	// ran out as expired, and returns how many and the products changed.
	ExpireReservations(ctx context.Context, limit int) (int, []Product, error)
}

// SweepReservations runs until ctx ends, recording due holds as expired
// every interval. Their units count as available from the moment they
// expire (writes release due lines themselves); the sweep records the
// state and frees what no write has touched.
func (s *ProductService) SweepReservations(ctx context.Context, interval time.Duration) {
	var store reservationExpirer = s.store // the sweep's needs, held to by the compiler
	t := time.NewTicker(interval)
	defer t.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case <-t.C:
		}
		for range 100 { // at most 10,000 a round; the rest next round
			n, changed, err := store.ExpireReservations(ctx, 100)
			s.publishAll(ctx, changed)
			for range n {
				s.metrics.reservation(StateExpired)
			}
			if err != nil {
				if ctx.Err() == nil {
					s.log.Warn("expire reservations", "err", err.Error())
				}
				break
			}
			if n < 100 {
				break
			}
		}
	}
}

// Events returns up to limit change-feed events after seq after. It
// returns a *FeedGoneError or an *UnavailableError.
func (s *ProductService) Events(ctx context.Context, after int64, limit int) ([]Event, error) {
	var es []Event
	err := guard(s.readCB, func() error {
		var err error
		es, err = s.store.Events(ctx, after, limit)
		return err
	})
	return es, err
}

// eventTrimmer is what trimChangeFeed needs of the store.
type eventTrimmer interface {
	// TrimEvents deletes events older than before, in small batches.
	TrimEvents(ctx context.Context, before time.Time) (int64, error)
}

// trimChangeFeed deletes change-feed events older than retention every
// interval, until ctx ends.
func trimChangeFeed(ctx context.Context, store eventTrimmer, log *slog.Logger, retention, interval time.Duration) {
	t := time.NewTicker(interval)
	defer t.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case <-t.C:
		}
		n, err := store.TrimEvents(ctx, time.Now().Add(-retention))
		if err != nil && ctx.Err() == nil {
			log.Warn("trim events", "err", err.Error())
		} else if n > 0 {
			log.Debug("trimmed events", slog.Int64("events", n))
		}
	}
}

// feedSignal wakes change-feed streams when this process commits a write.
// Writes of other processes (PostgreSQL replicas) are found by polling.
type feedSignal struct {
	mu sync.Mutex
	ch chan struct{}
}

func newFeedSignal() *feedSignal { return &feedSignal{ch: make(chan struct{})} }

// wait returns a channel closed at the next notify.
func (f *feedSignal) wait() <-chan struct{} {
	f.mu.Lock()
	defer f.mu.Unlock()
	return f.ch
}

// notify wakes every waiter.
func (f *feedSignal) notify() {
	f.mu.Lock()
	defer f.mu.Unlock()
	close(f.ch)
	f.ch = make(chan struct{})
}
