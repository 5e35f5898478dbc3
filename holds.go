package main

// Expired holds stop counting the moment they expire, for reads too. A
// write releases a product's expired lines itself (releaseDueLines), but a
// read answers from what is stored or cached: without a write since, an
// expired hold would still show as reserved until the sweeper records it.
// So the service knows when the earliest open hold expires (holdClock), and
// a read that arrives at or after that moment first records every due hold
// as expired (sweepHolds, shared by all the reads waiting for it), then
// answers with the products that sweep changed. Reads before it pay one
// atomic load and a comparison, no lock.

import (
	"context"
	"math"
	"sync"
	"sync/atomic"
	"time"
)

// holdClock knows when the earliest open hold expires, as far as this
// process has learned: from the database (a sweep ends by looking it up),
// from its own reservations, and, on a shared store, from the change log's
// reservation.held events, which the read fence applies before any read.
type holdClock struct {
	// dueAt is what every read looks at, without a lock: 0 when the clock
	// must be looked up, math.MaxInt64 when no hold is open, else the
	// earliest expiry in Unix nanoseconds. The fields below it are
	// changed under mu, which then stores dueAt.
	dueAt atomic.Int64

	mu      sync.Mutex
	known   bool      // next was looked up; false: look before the next read
	next    time.Time // the earliest expiry of an open hold; zero: none is open
	looking bool      // a look is in flight ...
	lowered time.Time // ... and this is the earliest hold made meanwhile (zero: none)
}

// due reports whether a hold may have expired by now, or the clock must be
// looked up. It takes no lock: every read asks it.
func (c *holdClock) due(now time.Time) bool {
	at := c.dueAt.Load()
	return at == 0 || now.UnixNano() >= at
}

// publish stores what due reads; c.mu is held.
func (c *holdClock) publish() {
	switch {
	case !c.known:
		c.dueAt.Store(0)
	case c.next.IsZero():
		c.dueAt.Store(math.MaxInt64)
	default:
		c.dueAt.Store(max(c.next.UnixNano(), 1))
	}
}

// forget makes the next read look the clock up again.
func (c *holdClock) forget() {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.known = false
	c.publish()
}

// lower records a hold that expires at t.
func (c *holdClock) lower(t time.Time) {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.looking && (c.lowered.IsZero() || t.Before(c.lowered)) {
		c.lowered = t
	}
	if c.known && (c.next.IsZero() || t.Before(c.next)) {
		c.next = t
		c.publish()
	}
}

// begin starts a look; finish ends it with next, the earliest expiry the
// database holds (ok false: the look failed, and the next read looks
// again). A hold made while the look ran, which the database may not have
// shown it, is kept.
func (c *holdClock) begin() {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.looking, c.lowered = true, time.Time{}
}

func (c *holdClock) finish(next time.Time, ok bool) {
	c.mu.Lock()
	defer c.mu.Unlock()
	defer c.publish()
	c.looking, c.known = false, ok
	if !ok {
		return
	}
	if !c.lowered.IsZero() && (next.IsZero() || c.lowered.Before(next)) {
		next = c.lowered
	}
	c.next = next
}

// sweepBatch is how many due holds one store call records as expired;
// sweepRounds bounds the calls of one sweep (the rest wait for the next).
const (
	sweepBatch  = 100
	sweepRounds = 100
)

// expireDue records every hold whose time ran out as expired, before a read
// answers, when the clock says one may have, or always when exact is false:
// the read fence fell back to the database because this replica is behind
// the change log, so the clock may lack holds other replicas made. It is
// shared by the reads waiting for it. A sweep that fails (the database refuses writes) is
// logged, and the read goes on: reads keep working while writes fail, and
// the hold's units count as reserved until a sweep succeeds.
func (s *ProductService) expireDue(ctx context.Context, exact bool) {
	if exact && !s.holds.due(time.Now()) {
		return
	}
	s.flight.Do("expire holds", func() (any, error) {
		if err := s.sweepHolds(context.WithoutCancel(ctx)); err != nil {
			s.log.Warn("expire due reservations before a read", "err", err.Error())
		}
		return nil, nil
	})
}

// fenceHolds makes sure a reservation read, which the database answers,
// finds every hold that expired before it recorded as expired: the read
// fence first, so the clock knows the holds of every replica.
func (s *ProductService) fenceHolds(ctx context.Context) error {
	cached, err := s.fence(ctx)
	if err != nil {
		return err
	}
	s.expireDue(ctx, cached)
	return nil
}

// holdExpirer is what a sweep needs of the store.
type holdExpirer interface {
	// ExpireReservations records up to limit held reservations whose time
	// ran out as expired, and returns how many and the products changed.
	ExpireReservations(ctx context.Context, limit int) (int, []Product, error)
	// NextHoldExpiry returns when the earliest open hold expires.
	NextHoldExpiry(ctx context.Context) (time.Time, error)
}

// sweepHolds records due holds as expired, through the write breaker, and
// looks up when the next one expires.
func (s *ProductService) sweepHolds(ctx context.Context) error {
	var store holdExpirer = s.store // the sweep's needs, held to by the compiler
	s.holds.begin()
	for range sweepRounds {
		var n int
		var changed []Product
		err := guard(s.writeCB, func() error {
			var err error
			n, changed, err = store.ExpireReservations(ctx, sweepBatch)
			return err
		})
		s.publishAll(ctx, changed)
		for range n {
			s.metrics.reservation(StateExpired)
		}
		if err != nil {
			s.holds.finish(time.Time{}, false)
			return err
		}
		if n < sweepBatch {
			break
		}
	}
	var next time.Time
	err := guard(s.readCB, func() error {
		var err error
		next, err = store.NextHoldExpiry(ctx)
		return err
	})
	s.holds.finish(next, err == nil)
	return err
}
