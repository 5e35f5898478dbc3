package main

// The relay publishes the change feed to a message broker (AMQP_URL), one
// message per event, in feed order, at least once: a transactional outbox
// whose outbox is the change log every write already appends to in its own
// transaction. The relay's position — the last seq the broker confirmed,
// and the log it belongs to — is kept in the database and moves only past
// confirmed events, contiguously; after any failure the relay sends again
// from it. With N replicas one relay publishes at a time: the one holding
// the store's relay lease.

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"strconv"
	"sync"
	"time"
)

// cloudEventsContentType is the content type of a CloudEvent in structured
// JSON mode.
const cloudEventsContentType = "application/cloudevents+json"

// outMessage is one event as the relay publishes it.
type outMessage struct {
	ID   string    // the CloudEvents id, <log_id>-<seq>: stable across re-sends
	Type string    // the event type: the routing key
	Time time.Time // when the event occurred
	Body []byte    // the CloudEvent
}

// publisher sends messages to a broker. Another broker than RabbitMQ would
// be another publisher.
type publisher interface {
	// Publish sends msgs in order and waits for the broker to take them.
	// It returns how many leading msgs the broker confirmed: all of them
	// when the error is nil.
	Publish(ctx context.Context, msgs []outMessage) (confirmed int, err error)
	Close() error
}

// relayLease is the right to publish and to move the relay's position.
type relayLease interface {
	// Move sets the relay's position to to if it is still from; else it
	// returns errRelayMoved.
	Move(ctx context.Context, from, to RelayPosition) error
	// Check returns an error once the lease is lost.
	Check(ctx context.Context) error
	// Release gives the lease up.
	Release()
}

// relayStore is what the relay needs of the store.
type relayStore interface {
	Events(ctx context.Context, after int64, limit int) ([]Event, error)
	FeedHead(ctx context.Context) (int64, error)
	// RelayPosition returns the relay's position and the change log's id
	// and start (the seq its oldest kept event follows).
	RelayPosition(ctx context.Context) (pos RelayPosition, logID string, start int64, err error)
	// LockRelay waits for the relay's lease until ctx ends: at once
	// where one process is the only relay (SQLite), else while another
	// replica holds it.
	LockRelay(ctx context.Context) (relayLease, error)
}

// relayConfig configures newRelay.
type relayConfig struct {
	Source string // the CloudEvents source
	// Dial connects a publisher; the relay owns reconnection.
	Dial func(ctx context.Context) (publisher, error)
	// BrokerURL is shown, redacted, in /ready.
	BrokerURL string
	// WarnAge: a warning is logged while the oldest unpublished event is
	// older.
	WarnAge time.Duration
	Log     *slog.Logger
	Metrics *relayMetrics
	// Wake, when set, wakes the relay after this process's writes;
	// others' are found by polling.
	Wake *feedSignal
}

// Relay timings.
const (
	relayBatch      = 256
	relayPoll       = 200 * time.Millisecond // look for others' events this often
	relayLockRetry  = time.Second            // a standby tries the lease this often
	relayBackoffMin = 100 * time.Millisecond
	relayBackoffMax = 5 * time.Second
	relayTimeout    = 5 * time.Second // dial, and each batch up to its last confirm
)

// relay owns the relay's state in this process: whether it holds the
// lease, whether the broker is up, and the publishing loop. The position
// itself is the database's, moved only through the lease.
type relay struct {
	store   relayStore
	cfg     relayConfig
	log     *slog.Logger
	m       *relayMetrics
	poll    time.Duration
	backoff time.Duration // the longest wait between tries

	// beforeMove, when set, is called with the position about to be
	// stored after a confirmed publish; an error stops the step there, as
	// a crash between publish and position update would (a test's).
	beforeMove func(to RelayPosition) error

	mu       sync.Mutex
	leader   bool
	brokerUp bool
	lastErr  string    // the last broker failure, redacted
	warnedAt time.Time // when the backlog warning was last logged
}

// newRelay returns a relay that publishes store's change feed.
func newRelay(store relayStore, cfg relayConfig) *relay {
	if cfg.Log == nil {
		cfg.Log = slog.New(slog.DiscardHandler)
	}
	if cfg.Metrics == nil {
		cfg.Metrics = newMetrics(nil).relay()
	}
	if cfg.WarnAge <= 0 {
		cfg.WarnAge = 5 * time.Minute
	}
	return &relay{store: store, cfg: cfg, log: cfg.Log.With("component", "relay"), m: cfg.Metrics,
		poll: relayPoll, backoff: relayBackoffMax}
}

// RelayStatus is what /ready shows of the relay.
type RelayStatus struct {
	Leader   bool   // this replica publishes
	BrokerUp bool   // its connection to the broker works (only known while Leader)
	Err      string // the last broker failure, redacted
	URL      string // the broker's URL, redacted
}

// Status reports the relay's state.
func (r *relay) Status() RelayStatus {
	r.mu.Lock()
	defer r.mu.Unlock()
	return RelayStatus{Leader: r.leader, BrokerUp: r.brokerUp, Err: r.lastErr, URL: redactURL(r.cfg.BrokerURL)}
}

func (r *relay) setLeader(v bool) {
	r.mu.Lock()
	r.leader = v
	if !v {
		r.brokerUp = false
	}
	r.mu.Unlock()
	r.m.leader.Set(b2f(v))
	if !v {
		r.m.brokerUp.Set(0)
	}
}

func (r *relay) setBroker(up bool, err error) {
	r.mu.Lock()
	was := r.brokerUp
	r.brokerUp = up
	if err != nil {
		r.lastErr = err.Error()
	}
	r.mu.Unlock()
	r.m.brokerUp.Set(b2f(up))
	switch {
	case up && !was:
		r.log.Info("relay: connected to the broker", "url", redactURL(r.cfg.BrokerURL))
	case !up && err != nil:
		// Every failure is logged: they are at most one per backoff.
		r.log.Warn("relay: broker unavailable; writes go on, events wait in the change log", "url", redactURL(r.cfg.BrokerURL), "err", err.Error())
	}
}

func b2f(v bool) float64 {
	if v {
		return 1
	}
	return 0
}

// Run publishes until ctx ends: it waits for the lease (at once on
// SQLite), then publishes while it holds it.
func (r *relay) Run(ctx context.Context) {
	for ctx.Err() == nil {
		lease, err := r.store.LockRelay(ctx)
		if err != nil {
			if ctx.Err() == nil {
				r.log.Warn("relay: cannot wait for the lease", "err", err.Error())
			}
			sleepCtx(ctx, relayLockRetry)
			continue
		}
		r.setLeader(true)
		r.log.Info("relay: this replica publishes the change feed")
		err = r.lead(ctx, lease)
		lease.Release()
		r.setLeader(false)
		if ctx.Err() == nil {
			r.m.failures.WithLabelValues(relayFailLease).Inc()
			r.log.Warn("relay: gave up the lease", "err", err.Error())
			sleepCtx(ctx, relayLockRetry)
		}
	}
}

// brokerError is a publisher's failure: the publisher is closed and
// another dialled after a backoff.
type brokerError struct{ err error }

func (e *brokerError) Error() string { return e.err.Error() }
func (e *brokerError) Unwrap() error { return e.err }

// lead publishes while the lease holds. It returns why it stopped: ctx
// ended, the lease was lost, or another relay moved the position.
func (r *relay) lead(ctx context.Context, lease relayLease) error {
	var pub publisher
	defer func() {
		if pub != nil {
			pub.Close()
		}
	}()
	wait := relayBackoffMin
	backoff := func() {
		sleepCtx(ctx, wait)
		wait = min(2*wait, r.backoff)
	}
	for {
		if ctx.Err() != nil {
			return ctx.Err()
		}
		if err := lease.Check(ctx); err != nil {
			return err
		}
		if pub == nil {
			p, err := r.cfg.Dial(ctx)
			if err != nil {
				if ctx.Err() != nil {
					return ctx.Err()
				}
				r.m.failures.WithLabelValues(relayFailConnect).Inc()
				r.setBroker(false, err)
				r.observeBacklog(ctx)
				backoff()
				continue
			}
			pub = p
			r.setBroker(true, nil)
		}
		var woken <-chan struct{}
		if r.cfg.Wake != nil {
			woken = r.cfg.Wake.wait() // before reading: a write after it wakes us
		}
		n, err := r.step(ctx, lease, pub)
		var be *brokerError
		switch {
		case ctx.Err() != nil:
			return ctx.Err()
		case errors.Is(err, errRelayMoved):
			return err
		case errors.As(err, &be):
			r.m.failures.WithLabelValues(relayFailPublish).Inc()
			pub.Close()
			pub = nil
			r.setBroker(false, be.err)
			backoff()
			continue
		case err != nil:
			r.m.failures.WithLabelValues(relayFailStore).Inc()
			r.log.Warn("relay: change log unavailable", "err", err.Error())
			backoff()
			continue
		}
		wait = relayBackoffMin
		if n > 0 {
			continue // there may be more
		}
		t := time.NewTimer(r.poll)
		select {
		case <-ctx.Done():
		case <-woken:
		case <-t.C:
		}
		t.Stop()
	}
}

// step publishes the next batch of events after the relay's position and
// moves the position past those the broker confirmed. It returns how many.
func (r *relay) step(ctx context.Context, lease relayLease, pub publisher) (int, error) {
	pos, logID, start, err := r.store.RelayPosition(ctx)
	if err != nil {
		return 0, err
	}
	if pos.LogID != logID {
		// A new log (the first run, or a restore): start from its
		// oldest kept event.
		to := RelayPosition{LogID: logID, Seq: start}
		if err := lease.Move(ctx, pos, to); err != nil {
			return 0, err
		}
		r.log.Info("relay: starting the change log from its oldest kept event", "log_id", logID, "after", start, "previous_log_id", pos.LogID)
		pos = to
	}
	es, err := r.store.Events(ctx, pos.Seq, relayBatch)
	var gone *FeedGoneError
	if errors.As(err, &gone) {
		// Retention deleted events before they were published: only
		// possible while the relay was off. Nothing can bring them back.
		to := RelayPosition{LogID: logID, Seq: gone.Oldest - 1}
		if err := lease.Move(ctx, pos, to); err != nil {
			return 0, err
		}
		r.m.failures.WithLabelValues(relayFailTrimmed).Inc()
		r.log.Error("relay: events were trimmed before they were published; going on from the oldest kept",
			"log_id", logID, "from", pos.Seq+1, "to", to.Seq)
		return 1, nil
	}
	if err != nil {
		return 0, err
	}
	r.observe(ctx, pos, es)
	if len(es) == 0 {
		return 0, nil
	}
	msgs := make([]outMessage, len(es))
	for i := range es {
		msgs[i] = cloudEvent(logID, r.cfg.Source, &es[i])
	}
	began := time.Now()
	confirmed, perr := pub.Publish(ctx, msgs)
	if confirmed > 0 {
		to := RelayPosition{LogID: logID, Seq: es[confirmed-1].Seq}
		if r.beforeMove != nil {
			if err := r.beforeMove(to); err != nil {
				return 0, err
			}
		}
		if err := lease.Move(ctx, pos, to); err != nil {
			return 0, err
		}
		r.m.published.Add(float64(confirmed))
		if perr == nil {
			r.m.confirm.Observe(time.Since(began).Seconds())
		}
	}
	if perr != nil {
		return confirmed, &brokerError{perr}
	}
	return confirmed, nil
}

// observe sets the backlog series from the position and the events after
// it, and warns while the oldest unpublished event is older than WarnAge.
func (r *relay) observe(ctx context.Context, pos RelayPosition, next []Event) {
	head, err := r.store.FeedHead(ctx)
	if err == nil {
		r.m.backlog.Set(float64(max(0, head-pos.Seq)))
	}
	if len(next) == 0 {
		r.m.oldestAge.Set(0)
		return
	}
	age := time.Since(next[0].OccurredAt)
	r.m.oldestAge.Set(age.Seconds())
	if age > r.cfg.WarnAge {
		r.mu.Lock()
		warn := time.Since(r.warnedAt) >= time.Minute
		if warn {
			r.warnedAt = time.Now()
		}
		r.mu.Unlock()
		if warn {
			r.log.Warn("relay: the oldest unpublished event is old", "age", age.Round(time.Second).String(),
				"seq", next[0].Seq, "backlog", head-pos.Seq)
		}
	}
}

// observeBacklog sets the backlog series while the broker is down.
func (r *relay) observeBacklog(ctx context.Context) {
	pos, _, _, err := r.store.RelayPosition(ctx)
	if err != nil {
		return
	}
	es, err := r.store.Events(ctx, pos.Seq, 1)
	if err != nil {
		return
	}
	r.observe(ctx, pos, es)
}

// cloudEvent is e as a CloudEvents 1.0 event in structured JSON mode; its
// data is the event as GET /events returns it.
func cloudEvent(logID, source string, e *Event) outMessage {
	id := logID + "-" + strconv.FormatInt(e.Seq, 10)
	b := make([]byte, 0, 1024)
	b = append(b, `{"specversion":"1.0","id":`...)
	b = appendString(b, id)
	b = append(b, `,"source":`...)
	b = appendString(b, source)
	b = append(b, `,"type":`...)
	b = appendString(b, e.Type)
	b = append(b, `,"subject":`...)
	if e.Reservation != nil {
		b = appendString(b, "reservations/"+e.Reservation.ID)
	} else {
		b = appendString(b, "products/"+strconv.FormatInt(e.ProductID, 10))
	}
	b = append(b, `,"time":"`...)
	b = e.OccurredAt.UTC().AppendFormat(b, timeLayout)
	b = append(b, `","datacontenttype":"application/json","sequence":"`...)
	b = strconv.AppendInt(b, e.Seq, 10)
	b = append(b, `","data":`...)
	b = appendEventJSON(b, e)
	b = append(b, '}')
	return outMessage{ID: id, Type: e.Type, Time: e.OccurredAt, Body: b}
}

// sleepCtx waits d or until ctx ends.
func sleepCtx(ctx context.Context, d time.Duration) {
	t := time.NewTimer(d)
	defer t.Stop()
	select {
	case <-ctx.Done():
	case <-t.C:
	}
}

// dialRelayPublisher returns how the relay connects to the broker at url.
func dialRelayPublisher(url, exchange string, m *relayMetrics) func(ctx context.Context) (publisher, error) {
	return func(ctx context.Context) (publisher, error) {
		p, err := dialAMQP(ctx, amqpConfig{URL: url, Exchange: exchange, Timeout: relayTimeout, Returned: m.returned})
		if err != nil {
			return nil, fmt.Errorf("broker %s: %w", redactURL(url), err)
		}
		return p, nil
	}
}

// Both engines are relay stores.
var (
	_ relayStore = (*sqliteStore)(nil)
	_ relayStore = (*postgresStore)(nil)
)
