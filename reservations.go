package main

// The service's inventory for order sagas: reservations that hold stock
// until they are confirmed, released or expire, and the change feed of
// every committed write.

import (
	"context"
	"log/slog"
	"time"
)

// maxByReference bounds GET /reservations?reference=…: an order has a few
// reservations, never thousands.
const maxByReference = 100

// Reserve validates in and holds its lines, all or nothing, and reports
// whether the reservation is the replay of an earlier request with the same
// idem. The request's credential holds it, within its cap (max_held). It
// returns a *ValidationError (also for a line whose product does not
// exist), a *ShortageError, a *HoldCapError, ErrIdempotencyMismatch, or an
// *UnavailableError.
func (s *ProductService) Reserve(ctx context.Context, in ReservationInput, idem *IdempotencyKey) (Reservation, bool, error) {
	if problems := in.Valid(); len(problems) > 0 {
		return Reservation{}, false, &ValidationError{Problems: problems}
	}
	ttl := time.Duration(defaultHoldTTL) * time.Second
	if in.TTLSeconds != nil {
		ttl = time.Duration(*in.TTLSeconds) * time.Second
	}
	who, _ := principalFrom(ctx)
	r := Reservation{ID: newReservationID(), Reference: *in.Reference, Lines: in.Lines, CreatedBy: who.Name}
	var held Reserved
	err := s.write(ctx, "reserve", func(ctx context.Context) error {
		var err error
		held, err = s.store.Reserve(ctx, r, ttl, who.MaxHeld, idem)
		return err
	})
	if err != nil {
		return Reservation{}, false, err
	}
	if held.Replayed {
		return held.Reservation, true, nil
	}
	s.holds.lower(held.Reservation.ExpiresAt)
	s.publishAll(ctx, held.Changed)
	s.metrics.reservation(StateHeld)
	return held.Reservation, false, nil
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
	var out Reserved
	err := s.write(ctx, "reservation "+to, func(ctx context.Context) error {
		var err error
		out, err = s.store.Transition(ctx, actorFrom(ctx), id, to)
		return err
	})
	if err != nil {
		return Reservation{}, err
	}
	r, changed := out.Reservation, out.Changed
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
	if err := s.fenceHolds(ctx); err != nil {
		return Reservation{}, err
	}
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
	if err := s.fenceHolds(ctx); err != nil {
		return nil, err
	}
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

// SweepReservations runs until ctx ends, recording due holds as expired
// every interval, so that holds no read or write touches are recorded too
// (see expireDue for reads, releaseDueLines for writes).
func (s *ProductService) SweepReservations(ctx context.Context, interval time.Duration) {
	every(ctx, interval, func() {
		s.flight.Do("expire holds", func() (any, error) {
			if err := s.sweepHolds(ctx); err != nil && ctx.Err() == nil {
				s.log.Warn("expire reservations", "err", err.Error())
			}
			return nil, nil
		})
	})
}

// LogID returns the change log's identity. With want set (the log_id a
// consumer's position came from) it returns a *FeedResetError when the log
// is another.
func (s *ProductService) LogID(ctx context.Context, want string) (string, error) {
	var id string
	var head int64
	err := guard(s.readCB, func() error {
		var err error
		if id, err = s.store.LogID(ctx); err != nil || want == "" || want == id {
			return err
		}
		head, err = s.store.FeedHead(ctx)
		return err
	})
	if err == nil && want != "" && want != id {
		err = &FeedResetError{Head: head, LogID: id}
	}
	return id, err
}

// Events returns up to limit change-feed events after seq after. It
// returns a *FeedGoneError, a *FeedResetError when after is beyond the
// feed's head, or an *UnavailableError.
func (s *ProductService) Events(ctx context.Context, after int64, limit int) ([]Event, error) {
	var es []Event
	err := guard(s.readCB, func() error {
		var err error
		es, err = s.store.Events(ctx, after, limit)
		if err != nil || len(es) > 0 || after == 0 {
			return err
		}
		// Nothing after after: it is the head, or beyond it. Only the
		// empty answer pays for the look.
		head, err := s.store.FeedHead(ctx)
		if err == nil && after > head {
			err = &FeedResetError{Head: head}
		}
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
	every(ctx, interval, func() {
		n, err := store.TrimEvents(ctx, time.Now().Add(-retention))
		if err != nil && ctx.Err() == nil {
			log.Warn("trim events", "err", err.Error())
		} else if n > 0 {
			log.Debug("trimmed events", slog.Int64("events", n))
		}
	})
}
