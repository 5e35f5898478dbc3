package main

// The follower: how a replica learns the writes of every other replica
// sharing its database, and the read fence that keeps its caches from
// answering with anything older than an acknowledged write.

import (
	"context"
	"crypto/rand"
	"errors"
	"log/slog"
	"sync"
	"sync/atomic"
	"time"

	"github.com/sony/gobreaker/v2"
)

// sharedLog is implemented by a store that other processes write to as
// well (PostgreSQL: any number of replicas). The service then follows the
// store's change log (Events) to learn their writes; see follower. SQLite
// does not implement it: one process holds the file, so its own writes
// are all the writes.
type sharedLog interface {
	// Head returns the change log's head and whether committed writes
	// without a seq exist: when not, and head is at or below a position,
	// every write committed before Head was called is at or below it. One
	// read-only query.
	Head(ctx context.Context) (head int64, pending bool, err error)
	// Changes returns the change log's head, and up to limit events: those
	// after seq after, in seq order, then those of committed writes not
	// given a seq yet (seq 0). Every write committed before Changes was
	// called has an event at or below head, or among those returned. It
	// writes nothing, and returns a *FeedGoneError when events after after
	// were trimmed.
	Changes(ctx context.Context, after int64, limit int) (head int64, es []Event, err error)
	// Sequence gives the events of committed writes their seqs. Events
	// does it too; writers call it so that Changes finds few without one.
	Sequence(ctx context.Context) error
	// Listen calls wake with the sender's name whenever Notify is called,
	// by any process, until ctx ends, and with "" after each (re)connect.
	// Notifications may be lost (a reconnect); they only save the
	// follower from waiting for its next periodic look.
	Listen(ctx context.Context, wake func(from string)) error
	// Notify tells every Listen that process from wrote to the change log.
	Notify(ctx context.Context, from string) error
}

// follower keeps this process's caches coherent with a shared store's
// change log (sharedLog): every write by any replica appends an event in
// its own transaction, and the follower applies the events to the
// in-process caches (a cached product is replaced by its newer version;
// every cached page is dropped) and pushes them to Redis. Versions decide,
// so events committed but not numbered yet are applied as they are.
//
// Strict reads: before a read is answered from a cache, fence makes sure
// the follower has applied every write committed before a moment after the
// read arrived: a write acknowledged anywhere before that has committed.
// One head check (one read-only query) serves every read waiting when it
// is sent, as Raft's ReadIndex serves reads with one heartbeat round; only
// when it finds something new do the reads wait for a round that applies
// it. A round is bounded (passes queries of batch events); when the head
// is further away than that, the round fails with errBacklog, and the
// reads waiting for it go to the database until a later round catches up.
//
// Redis is trusted for a read only when it holds every event the follower
// has applied (or something newer): the follower pushes each batch of
// events to Redis before applying it in memory, and when a push fails it
// stops trusting Redis before applying, until it has pushed the missed
// events again. A replica that adopts a generation (at start, after Redis
// restarted, after a write could not reach Redis) pushes the events after
// the position the generation is known to be current at
// (cache.SettleGeneration), or starts a new generation when they are too
// many.
//
// Notifications (LISTEN/NOTIFY) and a periodic look only keep the caches
// fresh between reads; correctness rests on the fence alone, so a lost
// notification costs latency, never a stale read.
//
// The follower reads the change log; what the caches hold of it, and
// whether Redis is trusted, is productCaches' to keep.
type follower struct {
	holds   *holdClock // learns the holds of every replica from the log
	log     sharedLog
	caches  *productCaches
	readCB  *gobreaker.CircuitBreaker[struct{}] // the change log is read through the database read breaker
	metrics *metrics
	logger  *slog.Logger

	mu       sync.Mutex
	next     *fenceRound // the round that reads arriving now wait for
	open     *headCheck  // the head check reads arriving now wait for
	checking int         // head checks in flight

	interval time.Duration // periodic look; followInterval
	batch    int           // events read per query; followBatch
	passes   int           // queries a round (or a push to Redis) makes at most; followPasses
	name     string        // this process, in its notifications

	wake   chan struct{} // a round is wanted
	wrote  chan struct{} // events to number (this process wrote)
	notify atomic.Bool   // ... and the other replicas to notify
	closed chan struct{} // the follower stopped

	started bool // touched by the round loop only
}

// fenceRound is one round of the loop (head query and catch-up), shared
// by the reads that arrived before it started.
type fenceRound struct {
	done chan struct{}
	err  error
}

// headCheck is one head query, shared by the reads that arrived before it
// was sent: when nothing was written since the follower's position, they
// need no round.
type headCheck struct {
	done  chan struct{}
	fresh bool
	err   error
}

// maxHeadChecks bounds the head queries in flight at once: a read that
// finds them all busy joins the next, sent as soon as one returns. One:
// on 2 cores shared with PostgreSQL, four in flight served fewer reads
// (29,000/s against 38,000/s in make bench), each query shared by fewer
// of them, for twice PostgreSQL's CPU.
const maxHeadChecks = 1

const (
	followBatch    = 500              // events read per query
	followPasses   = 1000             // queries per round: up to 500,000 events
	followInterval = time.Second      // periodic look, should a notification be lost
	maxRepush      = 20 * followBatch // events pushed again to Redis before giving up its generation
)

// newFollower returns a follower that keeps caches coherent with log,
// reading log through readCB.
func newFollower(log sharedLog, caches *productCaches, holds *holdClock, readCB *gobreaker.CircuitBreaker[struct{}], m *metrics, logger *slog.Logger) *follower {
	return &follower{
		log: log, caches: caches, holds: holds, readCB: readCB, metrics: m, logger: logger,
		interval: followInterval, batch: followBatch, passes: followPasses,
		name: rand.Text(),
		wake: make(chan struct{}, 1), wrote: make(chan struct{}, 1), closed: make(chan struct{}),
	}
}

// fence returns once the follower has applied the change log up to its
// head as of a moment after fence was called. It returns an
// *UnavailableError when the database is failing, and errBacklog when the
// head is more than a round away.
//
// First a head check: one read-only query, shared with the reads waiting
// for it. When it finds nothing written beyond
// what the follower applied, the read goes on; else the read waits for a
// round of the loop, which applies what is new.
func (f *follower) fence(ctx context.Context) error {
	start := time.Now()
	defer func() { f.metrics.fenceWait.Observe(time.Since(start).Seconds()) }()
	f.mu.Lock()
	if f.open == nil {
		f.open = &headCheck{done: make(chan struct{})}
	}
	c := f.open
	send := f.checking < maxHeadChecks
	if send {
		f.open = nil
		f.checking++
	}
	f.mu.Unlock()
	if send {
		go f.check(c)
	}
	if err := f.await(ctx, c.done); err != nil {
		return err
	}
	if c.err != nil || c.fresh {
		return c.err
	}
	f.mu.Lock()
	if f.next == nil {
		f.next = &fenceRound{done: make(chan struct{})}
	}
	r := f.next
	f.mu.Unlock()
	f.kick()
	if err := f.await(ctx, r.done); err != nil {
		return err
	}
	return r.err
}

// await waits for done, the follower's end, or ctx's.
func (f *follower) await(ctx context.Context, done <-chan struct{}) error {
	select {
	case <-done:
		return nil
	case <-f.closed:
		return &UnavailableError{Reason: "shutting down", RetryAfter: time.Second}
	case <-ctx.Done():
		return ctx.Err()
	}
}

// check runs head check c, then the checks that reads opened meanwhile,
// until none is waiting.
func (f *follower) check(c *headCheck) {
	for c != nil {
		var head int64
		var pending bool
		c.err = guard(f.readCB, func() error {
			var err error
			head, pending, err = f.log.Head(context.Background())
			return err
		})
		f.metrics.fenceRounds.Inc()
		c.fresh = c.err == nil && !pending && head <= f.caches.position()
		close(c.done)
		f.mu.Lock()
		c = f.open
		if c != nil {
			f.open = nil
		} else {
			f.checking--
		}
		f.mu.Unlock()
	}
}

// kick asks for a round.
func (f *follower) kick() {
	select {
	case f.wake <- struct{}{}:
	default:
	}
}

// written tells the follower that this process committed a write: its
// event is numbered and the other replicas are notified.
func (f *follower) written() { f.askSequence(true) }

// Run follows the change log until ctx ends: it listens for other
// replicas' notifications, numbers this process's events and notifies the
// others after its writes, and runs rounds when a read waits, a
// notification comes, or every interval.
func (f *follower) Run(ctx context.Context) {
	var wg sync.WaitGroup
	defer wg.Wait()
	wg.Go(func() {
		f.log.Listen(ctx, func(from string) {
			if from != f.name { // this process's own writes are in its caches already
				f.kick()
			}
		})
	})
	wg.Go(func() { f.sequence(ctx) })
	defer close(f.closed)
	t := time.NewTicker(f.interval)
	defer t.Stop()
	for {
		periodic := false
		select {
		case <-ctx.Done():
			return
		case <-f.wake:
		case <-t.C:
			periodic = true
		}
		f.mu.Lock()
		r := f.next
		f.next = nil
		f.mu.Unlock()
		unnumbered, err := f.round(ctx)
		f.metrics.fenceRounds.Inc()
		if ctx.Err() != nil {
			err = &UnavailableError{Reason: "shutting down", RetryAfter: time.Second}
		}
		if r != nil {
			r.err = err
			close(r.done)
		}
		if errors.Is(err, errBacklog) {
			f.kick() // go on applying without waiting for a read
		}
		if periodic && unnumbered {
			f.askSequence(false) // a writer died before numbering its events
		}
	}
}

// sequence numbers events and notifies the other replicas, when asked to
// (askSequence), until ctx ends. Numbering is a write (a commit), so it is
// done here rather than in a round, where reads wait.
func (f *follower) sequence(ctx context.Context) {
	for {
		select {
		case <-ctx.Done():
			return
		case <-f.wrote:
		}
		if err := f.log.Sequence(ctx); err != nil && ctx.Err() == nil {
			f.logger.Debug("change log: sequencing failed", "err", err)
		}
		if f.notify.Swap(false) {
			if err := f.log.Notify(ctx, f.name); err != nil && ctx.Err() == nil {
				f.logger.Debug("change log: notify failed", "err", err)
			}
		}
	}
}

// askSequence asks for the events to be numbered, and the other replicas
// notified when notify is set.
func (f *follower) askSequence(notify bool) {
	if notify {
		f.notify.Store(true)
	}
	select {
	case f.wrote <- struct{}{}:
	default:
	}
}

// errBacklog is what a round, or a push of what Redis missed, returns
// when it ran out of passes before it caught up with the change log: more
// events wait than it applies (or pushes) in one go. The next round goes
// on from where it stopped.
var errBacklog = errors.New("change log: more events waiting than one round applies")

// round applies the change log up to its head as of the round's start,
// then brings Redis up to date. It reports whether it met events not
// numbered yet. It returns errBacklog when the head is more than f.passes
// queries away: the caches are then behind, and must not answer a read.
func (f *follower) round(ctx context.Context) (unnumbered bool, err error) {
	unnumbered, redisFailed, err := f.catchUp(ctx)
	if err != nil {
		return unnumbered, err
	}
	if !redisFailed { // a failing Redis costs a round one REDIS_TIMEOUT at most
		f.syncRedis(ctx)
	}
	return unnumbered, nil
}

// catchUp applies the change log up to its head, in at most f.passes
// queries of f.batch events. It reports whether it met events not numbered
// yet, and whether a push to Redis failed.
func (f *follower) catchUp(ctx context.Context) (unnumbered, redisFailed bool, err error) {
	for range f.passes {
		after := f.caches.position()
		head, es, err := f.changes(ctx, after)
		var gone *FeedGoneError
		if errors.As(err, &gone) {
			f.caches.resync(gone.Oldest - 1)
			f.holds.forget() // holds made in what was trimmed are not known
			continue
		}
		if err != nil {
			return unnumbered, redisFailed, err
		}
		if !f.started {
			// The caches are empty until the first round ends: every read
			// fences first, and a write only replaces what is cached.
			f.started = true
			f.caches.start(head)
			return unnumbered, redisFailed, nil
		}
		through, done := position(after, head, es, f.batch)
		unnumbered = unnumbered || (len(es) > 0 && es[len(es)-1].Seq == 0)
		if !f.caches.apply(ctx, es, through) {
			redisFailed = true
		}
		for i := range es {
			if r := es[i].Reservation; r != nil && es[i].Type == EventReservationHeld {
				f.holds.lower(r.ExpiresAt) // another replica's hold, before any read it must count for
			}
		}
		if done {
			return unnumbered, redisFailed, nil
		}
		if through == after { // a full batch of events not numbered yet
			if err := f.log.Sequence(ctx); err != nil {
				return unnumbered, redisFailed, err
			}
		}
	}
	return unnumbered, redisFailed, errBacklog
}

// changes reads a batch of the change log after seq after through the
// read breaker.
func (f *follower) changes(ctx context.Context, after int64) (int64, []Event, error) {
	var head int64
	var es []Event
	err := guard(f.readCB, func() error {
		var err error
		head, es, err = f.log.Changes(ctx, after, f.batch)
		return err
	})
	return head, es, err
}

// position returns the seq through which es (as Changes returned them
// for after, head and batch) leave nothing unapplied, and whether that is
// all there was: a batch shorter than asked for holds every event through
// head.
func position(after, head int64, es []Event, batch int) (through int64, done bool) {
	if len(es) < batch {
		return max(after, head), true
	}
	through = after
	for i := range es {
		through = max(through, es[i].Seq)
	}
	return through, false
}

// syncRedis brings the generation the follower pushes to up to the applied
// position, adopting the current one first, and trusts Redis once it is.
func (f *follower) syncRedis(ctx context.Context) {
	if !f.caches.redisEnabled {
		return
	}
	for range 4 { // a few generation changes at most; the next round goes on
		err := f.caches.adoptGeneration(ctx)
		if err == nil {
			err = f.repush(ctx)
		}
		if errors.Is(err, errStaleGeneration) {
			continue
		}
		if err != nil {
			f.caches.distrustRedis()
			return
		}
		f.caches.trustRedis()
		return
	}
	f.caches.distrustRedis()
}

// repush reads from the change log the events the generation may lack,
// and pushes them, in at most f.passes queries; it returns errBacklog when
// they are more. When they are too many, or trimmed, a new generation is
// asked for instead and it returns errStaleGeneration.
func (f *follower) repush(ctx context.Context) error {
	for pass := 0; ; pass++ {
		after, missing, err := f.caches.redisMissing()
		if err != nil || !missing {
			return err
		}
		if pass == f.passes {
			return errBacklog
		}
		head, es, err := f.changes(ctx, after)
		if errors.Is(err, ErrFeedGone) {
			return f.caches.giveUpGeneration()
		}
		if err != nil {
			return err
		}
		// Not beyond what is applied in memory: the round applies the rest.
		through, done := position(after, min(head, f.caches.position()), es, f.batch)
		if err := f.caches.pushMissing(ctx, es, through, done); err != nil {
			return err
		}
		if !done && through == after { // a full batch of events not numbered yet
			if err := f.log.Sequence(ctx); err != nil {
				return err
			}
		}
	}
}
