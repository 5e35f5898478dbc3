package main

// GET /events: the change feed, as pages of JSON or as a stream of
// Server-Sent Events.

import (
	"errors"
	"fmt"
	"mime"
	"net/http"
	"strconv"
	"strings"
	"sync"
	"time"
)

const (
	defaultEventsLimit = 100
	maxEventsLimit     = 1000
	// defaultFeedStreams bounds the Server-Sent Events streams one process
	// serves at once (FEED_MAX_STREAMS): each holds a connection and a
	// goroutine for as long as its consumer stays.
	defaultFeedStreams = 64
	feedHeartbeat      = 15 * time.Second
	// feedPoll is how often a stream looks for events when nothing woke it:
	// writes of other replicas, on PostgreSQL, wake no one here.
	feedPoll = time.Second
	// streamCatchUp is how many events a stream that has fallen behind
	// reads at once: large enough to catch up with a heavy write load,
	// small enough that FEED_MAX_STREAMS streams stay within a few MiB each.
	streamCatchUp = 500
)

// streamSlots bounds concurrent streams.
type streamSlots struct {
	slots     chan struct{}
	heartbeat time.Duration
	poll      time.Duration
}

func newStreamSlots(n int) *streamSlots {
	return &streamSlots{slots: make(chan struct{}, n), heartbeat: feedHeartbeat, poll: feedPoll}
}

// handleEvents serves GET /events?after=SEQ&limit=N: up to limit events
// after seq after, and the seq to ask after next. With Accept:
// text/event-stream the events stream instead, starting after after (or the
// Last-Event-ID of a reconnecting EventSource) and following new writes.
func handleEvents(svc *ProductService, life *lifecycle, streams *streamSlots) http.Handler {
	if streams == nil {
		streams = newStreamSlots(defaultFeedStreams)
	}
	return handlerFunc(func(w http.ResponseWriter, r *http.Request) error {
		after, limit, logID, err := parseEventsQuery(r.URL.RawQuery)
		if err != nil {
			return err
		}
		current, err := svc.LogID(r.Context(), logID)
		if err != nil {
			return err
		}
		if wantsEventStream(r.Header.Get("Accept")) {
			if v := r.Header.Get("Last-Event-ID"); v != "" {
				n, err := strconv.ParseInt(v, 10, 64)
				if err != nil || n < 0 {
					return &BadRequestError{Detail: "Last-Event-ID must be a seq from this feed",
						Problems: map[string]string{"Last-Event-ID": "must be a non-negative integer"}}
				}
				after = n
			}
			return streamEvents(w, r, svc, life, streams, after)
		}
		es, err := svc.Events(r.Context(), after, limit)
		if err != nil {
			return err
		}
		next := after
		b := append(make([]byte, 0, 512*len(es)+80), `{"log_id":`...)
		b = appendString(b, current)
		b = append(b, `,"events":[`...)
		for i := range es {
			if i > 0 {
				b = append(b, ',')
			}
			b = appendEventJSON(b, &es[i])
			next = es[i].Seq
		}
		b = append(b, `],"next_after":`...)
		b = strconv.AppendInt(b, next, 10)
		w.Header().Set("Cache-Control", "no-store")
		writeJSON(w, http.StatusOK, append(b, '}'))
		return nil
	})
}

// parseEventsQuery reads after (default 0) and limit (default 100).
func parseEventsQuery(raw string) (after int64, limit int, logID string, err error) {
	values, err := parseQuery(raw)
	if err != nil {
		return 0, 0, "", err
	}
	limit = defaultEventsLimit
	problems := map[string]string{}
	for name, vals := range values {
		if len(vals) > 1 {
			problems[name] = "must be given at most once"
			continue
		}
		switch name {
		case "after":
			n, err := strconv.ParseInt(vals[0], 10, 64)
			if err != nil || n < 0 {
				problems[name] = "must be a non-negative integer (a seq)"
				continue
			}
			after = n
		case "limit":
			n, err := strconv.Atoi(vals[0])
			if err != nil || n < 1 || n > maxEventsLimit {
				problems[name] = fmt.Sprintf("must be an integer from 1 to %d", maxEventsLimit)
				continue
			}
			limit = n
		case "log_id":
			if !validLogID(vals[0]) {
				problems[name] = "must be the log_id of a page of this feed (32 hexadecimal digits)"
				continue
			}
			logID = vals[0]
		default:
			problems[name] = "is not a known parameter"
		}
	}
	if len(problems) > 0 {
		return 0, 0, "", &BadRequestError{Detail: "invalid query parameters", Problems: problems}
	}
	return after, limit, logID, nil
}

// validLogID reports whether s has the form of a change log's id.
func validLogID(s string) bool {
	if len(s) != 32 {
		return false
	}
	for i := 0; i < len(s); i++ {
		if !('0' <= s[i] && s[i] <= '9' || 'a' <= s[i] && s[i] <= 'f') {
			return false
		}
	}
	return true
}

// wantsEventStream reports whether an Accept header asks for
// text/event-stream.
func wantsEventStream(accept string) bool {
	for part := range strings.SplitSeq(accept, ",") {
		if mt, _, err := mime.ParseMediaType(strings.TrimSpace(part)); err == nil && mt == "text/event-stream" {
			return true
		}
	}
	return false
}

// streamEvents follows the feed after seq after as Server-Sent Events: id
// is the seq, event the type, data the event's JSON. It sends a heartbeat
// comment when quiet, ends cleanly when the process shuts down or the
// consumer leaves, and refuses (503) beyond the bound on streams.
func streamEvents(w http.ResponseWriter, r *http.Request, svc *ProductService, life *lifecycle, streams *streamSlots, after int64) error {
	select {
	case streams.slots <- struct{}{}:
		defer func() { <-streams.slots }()
	default:
		return &UnavailableError{Reason: "too many change-feed streams; poll GET /events or retry", RetryAfter: 5 * time.Second}
	}
	// The first page comes before the stream starts, so a position that is
	// gone is an ordinary 410 problem. wake is taken before each read: a
	// write that commits after the read closes it, so none waits for a poll.
	wake := svc.feed.wait()
	es, err := svc.Events(r.Context(), after, defaultEventsLimit)
	if err != nil {
		return err
	}
	svc.metrics.feedStreams.Inc()
	defer svc.metrics.feedStreams.Dec()
	rc := http.NewResponseController(w)
	h := w.Header()
	h.Set("Content-Type", "text/event-stream")
	h.Set("Cache-Control", "no-store")
	h.Set("X-Accel-Buffering", "no") // proxies must not hold events back
	w.WriteHeader(http.StatusOK)

	heartbeat := time.NewTicker(streams.heartbeat)
	defer heartbeat.Stop()
	poll := time.NewTicker(streams.poll)
	defer poll.Stop()
	var buf []byte
	live := false // the first page is a backlog: its age is not delivery lag
	batch := defaultEventsLimit
	write := func(b []byte) bool {
		// Past the server's WriteTimeout, which a stream outlives.
		rc.SetWriteDeadline(time.Now().Add(30 * time.Second))
		if _, err := w.Write(b); err != nil {
			return false
		}
		return rc.Flush() == nil
	}
	if !write([]byte(": following the change feed\n\n")) {
		return nil
	}
	for {
		if len(es) > 0 {
			buf = buf[:0]
			for i := range es {
				buf = append(buf, "id: "...)
				buf = strconv.AppendInt(buf, es[i].Seq, 10)
				buf = append(buf, "\nevent: "...)
				buf = append(buf, es[i].Type...)
				buf = append(buf, "\ndata: "...)
				buf = appendEventJSON(buf, &es[i])
				buf = append(buf, "\n\n"...)
				after = es[i].Seq
			}
			if !write(buf) {
				return nil // the consumer left; it resumes with Last-Event-ID
			}
			if live {
				for i := range es {
					svc.metrics.delivered(es[i].OccurredAt)
				}
			}
		}
		behind := len(es) == batch
		live = !behind // caught up: what comes next is new
		batch = defaultEventsLimit
		if behind {
			batch = streamCatchUp
		} else {
			select {
			case <-r.Context().Done():
				return nil
			case <-life.ending():
				write([]byte(": the service is shutting down; reconnect with Last-Event-ID\n\n"))
				return nil
			case <-heartbeat.C:
				if !write([]byte(": heartbeat\n\n")) {
					return nil
				}
			case <-wake:
			case <-poll.C:
			}
		}
		wake = svc.feed.wait()
		es, err = svc.Events(r.Context(), after, batch)
		if errors.Is(err, ErrFeedGone) {
			write(fmt.Appendf(nil, "event: gone\ndata: {\"detail\":%q}\n\n", err.Error()))
			return nil
		}
		if err != nil {
			es = nil // the database is failing: keep the stream, try again at the next tick
		}
	}
}

// appendEventJSON appends e as the API's JSON: seq, type, occurred_at,
// actor (who made the write; null for the service's own, such as an
// expiry), the product id and version or the reservation id and state, and
// data, the resource as it became (null after a delete).
func appendEventJSON(b []byte, e *Event) []byte {
	b = append(b, `{"seq":`...)
	b = strconv.AppendInt(b, e.Seq, 10)
	b = append(b, `,"type":`...)
	b = appendString(b, e.Type)
	b = append(b, `,"occurred_at":"`...)
	b = e.OccurredAt.UTC().AppendFormat(b, timeLayout)
	b = append(b, `","actor":`...)
	if e.Actor != "" {
		b = appendString(b, e.Actor)
	} else {
		b = append(b, "null"...)
	}
	switch {
	case e.Reservation != nil:
		b = append(b, `,"reservation_id":`...)
		b = appendString(b, e.Reservation.ID)
		b = append(b, `,"state":`...)
		b = appendString(b, e.Reservation.State)
		b = append(b, `,"data":`...)
		b = appendReservation(b, e.Reservation)
	default:
		b = append(b, `,"product_id":`...)
		b = strconv.AppendInt(b, e.ProductID, 10)
		b = append(b, `,"version":`...)
		b = strconv.AppendInt(b, e.Version, 10)
		b = append(b, `,"data":`...)
		if e.Product != nil {
			b = appendProduct(b, e.Product)
		} else {
			b = append(b, "null"...)
		}
	}
	return append(b, '}')
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
