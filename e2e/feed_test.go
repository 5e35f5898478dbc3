package e2e

import (
	"bufio"
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"net/http"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"
)

// sseMessage is one Server-Sent Events message, or a comment line.
type sseMessage struct {
	ID, Event, Data string
	Comment         string
}

// sseStream is a GET /events stream read by a plain HTTP client, line by
// line.
type sseStream struct {
	msgs   chan sseMessage
	done   chan struct{}
	err    error // how the body ended, nil at EOF; set before done closes
	cancel context.CancelFunc
}

// openStream follows the feed with Accept: text/event-stream; hdr adds
// headers (Last-Event-ID).
func openStream(t *testing.T, c *client, path string, hdr http.Header) *sseStream {
	t.Helper()
	ctx, cancel := context.WithCancel(context.Background())
	req, err := c.newRequest(ctx, http.MethodGet, path, nil, hdr)
	if err != nil {
		cancel()
		t.Fatal(err)
	}
	req.Header.Set("Accept", "text/event-stream")
	hc := &http.Client{Transport: c.tr} // no overall timeout: the body lasts
	res, err := hc.Do(req)
	if err != nil {
		cancel()
		t.Fatalf("GET %s as a stream: %v", path, err)
	}
	if res.StatusCode != http.StatusOK || !strings.HasPrefix(res.Header.Get("Content-Type"), "text/event-stream") {
		res.Body.Close()
		cancel()
		t.Fatalf("GET %s as a stream: %d %s", path, res.StatusCode, res.Header.Get("Content-Type"))
	}
	s := &sseStream{msgs: make(chan sseMessage, 1000), done: make(chan struct{}), cancel: cancel}
	go func() {
		defer close(s.done)
		defer res.Body.Close()
		sc := bufio.NewScanner(res.Body)
		sc.Buffer(make([]byte, 64<<10), 4<<20)
		var m sseMessage
		for sc.Scan() {
			line := sc.Text()
			switch {
			case line == "":
				if m.ID != "" || m.Event != "" || m.Data != "" {
					s.msgs <- m
				}
				m = sseMessage{}
			case strings.HasPrefix(line, ":"):
				s.msgs <- sseMessage{Comment: strings.TrimSpace(line[1:])}
			case strings.HasPrefix(line, "id: "):
				m.ID = line[4:]
			case strings.HasPrefix(line, "event: "):
				m.Event = line[7:]
			case strings.HasPrefix(line, "data: "):
				m.Data += line[6:]
			default:
				s.msgs <- sseMessage{Comment: "UNEXPECTED LINE " + line}
			}
		}
		s.err = sc.Err()
	}()
	t.Cleanup(cancel)
	return s
}

// next returns the next event (comments are skipped, unexpected lines fail
// the test), or ok=false after timeout or at the end of the stream.
func (s *sseStream) next(t *testing.T, timeout time.Duration) (m sseMessage, ok bool) {
	t.Helper()
	timer := time.NewTimer(timeout)
	defer timer.Stop()
	for {
		select {
		case m := <-s.msgs:
			if strings.HasPrefix(m.Comment, "UNEXPECTED") {
				t.Errorf("stream: %s", m.Comment)
				continue
			}
			if m.Comment != "" {
				continue
			}
			return m, true
		case <-s.done:
			select {
			case m := <-s.msgs:
				if m.Comment == "" {
					return m, true
				}
				continue
			default:
			}
			return sseMessage{}, false
		case <-timer.C:
			return sseMessage{}, false
		}
	}
}

// expectEvents reads len(want) events from s and checks each against the
// page of GET /events that should contain it: the same seq as id, the
// type as event, the same JSON as data.
func expectEvents(t *testing.T, s *sseStream, want []feedEvent, pageJSON map[int64][]byte) {
	t.Helper()
	for _, w := range want {
		m, ok := s.next(t, 10*time.Second)
		if !ok {
			t.Fatalf("stream: event seq %d (%s) did not arrive within 10s", w.Seq, w.Type)
		}
		if m.ID != strconv.FormatInt(w.Seq, 10) || m.Event != w.Type {
			t.Fatalf("stream: got id %q event %q, want id %d event %s (in order, each once)", m.ID, m.Event, w.Seq, w.Type)
		}
		var got bytes.Buffer
		if err := json.Compact(&got, []byte(m.Data)); err != nil || !bytes.Equal(got.Bytes(), pageJSON[w.Seq]) {
			t.Errorf("stream: event %d data\n%s\nwant, as GET /events has it,\n%s", w.Seq, m.Data, pageJSON[w.Seq])
		}
	}
}

// feedAfter reads the events after seq after, with each event's JSON.
func feedAfter(t *testing.T, c *client, after int64) ([]feedEvent, map[int64][]byte) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	r, err := c.do(ctx, http.MethodGet, fmt.Sprintf("/events?after=%d&limit=1000", after), nil, nil)
	if err != nil || r.Status != http.StatusOK {
		t.Fatalf("GET /events?after=%d: %v %v", after, r, err)
	}
	var page struct {
		Events []json.RawMessage `json:"events"`
	}
	if err := json.Unmarshal(r.Body, &page); err != nil {
		t.Fatalf("GET /events: %v", err)
	}
	var es []feedEvent
	raw := map[int64][]byte{}
	for _, b := range page.Events {
		var e feedEvent
		if err := json.Unmarshal(b, &e); err != nil {
			t.Fatalf("GET /events: event %s: %v", b, err)
		}
		var buf bytes.Buffer
		_ = json.Compact(&buf, b)
		raw[e.Seq] = buf.Bytes()
		es = append(es, e)
	}
	return es, raw
}

// TestFeedStream follows the change feed as Server-Sent Events: every write
// arrives once and in order with id = seq, a consumer that reconnects with
// Last-Event-ID gets exactly the events it missed, and SIGTERM ends the
// stream cleanly before the process exits 0.
func TestFeedStream(t *testing.T) {
	const shutdownTimeout = 10 * time.Second
	svc, c := startReadyService(t, map[string]string{"SHUTDOWN_TIMEOUT": shutdownTimeout.String()})
	first := mustCreate(t, c, "feed-0", "feed product", 100, map[string]any{"stock": 50})

	s := openStream(t, c, "/events?after=0", nil)
	want, raw := feedAfter(t, c, 0)
	if len(want) != 1 || want[0].Type != "product.created" || want[0].ProductID != first.ID {
		t.Fatalf("feed after the first create: %+v, want one product.created of %d", want, first.ID)
	}
	expectEvents(t, s, want, raw)
	last := want[len(want)-1].Seq

	// write performs one write and checks that exactly its events arrive.
	write := func(desc, method, path string, body []byte, status int) []byte {
		t.Helper()
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		defer cancel()
		r, err := c.do(ctx, method, path, body, nil)
		if err != nil || r.Status != status {
			t.Fatalf("%s: %s %s: %v %v, want %d", desc, method, path, r, err, status)
		}
		return r.Body
	}
	follow := func(desc string) {
		t.Helper()
		start := time.Now()
		want, raw := feedAfter(t, c, last)
		if len(want) == 0 {
			t.Fatalf("%s: no event in GET /events after %d", desc, last)
		}
		expectEvents(t, s, want, raw)
		last = want[len(want)-1].Seq
		t.Logf("%s: %d events (%s … seq %d) streamed within %v", desc, len(want), want[0].Type, last, time.Since(start).Round(time.Millisecond))
	}

	pid := strconv.FormatInt(first.ID, 10)
	for i := 1; i <= 3; i++ {
		write("create", http.MethodPost, "/products", createBody(fmt.Sprintf("feed-%d", i), "feed product", 100, map[string]any{"stock": 10}), http.StatusCreated)
		follow(fmt.Sprintf("create %d", i))
	}
	write("adjust", http.MethodPost, "/products/"+pid+"/stock/adjustments", []byte(`{"delta":5}`), http.StatusOK)
	follow("stock adjustment")
	b := write("reserve", http.MethodPost, "/reservations", []byte(`{"reference":"feed-order","lines":[{"product_id":`+pid+`,"quantity":2}]}`), http.StatusCreated)
	var res sagaReservation
	if err := json.Unmarshal(b, &res); err != nil {
		t.Fatal(err)
	}
	follow("reserve")
	write("confirm", http.MethodPost, "/reservations/"+res.ID+"/confirm", nil, http.StatusOK)
	follow("confirm")
	// A refused write appends nothing: the next event is the next write's.
	write("short reserve", http.MethodPost, "/reservations", []byte(`{"reference":"feed-short","lines":[{"product_id":`+pid+`,"quantity":1000}]}`), http.StatusConflict)
	write("patch", http.MethodPatch, "/products/"+pid, []byte(`{"name":"renamed"}`), http.StatusOK)
	follow("refused reserve, then patch")
	if m, ok := s.next(t, 300*time.Millisecond); ok {
		t.Errorf("stream: unexpected event %+v after the last write", m)
	}

	// Disconnect, write while away, resume with Last-Event-ID.
	s.cancel()
	<-s.done
	missed := last
	for i := 4; i <= 6; i++ {
		write("create while away", http.MethodPost, "/products", createBody(fmt.Sprintf("feed-%d", i), "feed product", 100, nil), http.StatusCreated)
	}
	s = openStream(t, c, "/events", http.Header{"Last-Event-ID": {strconv.FormatInt(missed, 10)}})
	want, raw = feedAfter(t, c, missed)
	if len(want) != 3 {
		t.Fatalf("GET /events after %d: %d events, want the 3 creates", missed, len(want))
	}
	expectEvents(t, s, want, raw)
	last = want[len(want)-1].Seq
	if m, ok := s.next(t, 300*time.Millisecond); ok {
		t.Errorf("resumed stream: unexpected event %+v after the missed ones", m)
	}
	write("create after resume", http.MethodPost, "/products", createBody("feed-7", "feed product", 100, nil), http.StatusCreated)
	follow("create after resume")

	// SIGTERM: the body ends cleanly, then the process exits 0.
	start := time.Now()
	if err := svc.Signal(syscall.SIGTERM); err != nil {
		t.Fatal(err)
	}
	var comments []string
	ended := false
	for i := 0; i < 100 && !ended; i++ {
		select {
		case m := <-s.msgs:
			if m.Comment == "" {
				t.Errorf("stream: event %+v after SIGTERM with no write", m)
			}
			comments = append(comments, m.Comment)
		case <-s.done:
			ended = true
		case <-time.After(shutdownTimeout):
			t.Fatalf("stream still open %v after SIGTERM", shutdownTimeout)
		}
	}
	if s.err != nil && !errors.Is(s.err, context.Canceled) {
		t.Errorf("stream ended with %v, want a clean EOF", s.err)
	}
	streamEnd := time.Since(start)
	code, ok := svc.Wait(shutdownTimeout + 5*time.Second)
	if !ok {
		t.Fatalf("process still running %v after SIGTERM", shutdownTimeout+5*time.Second)
	}
	if code != 0 {
		t.Errorf("exit status %d after SIGTERM, want 0", code)
	}
	t.Logf("SIGTERM: stream reached EOF after %v (comments %q), process exited %d after %v",
		streamEnd.Round(time.Millisecond), comments, code, time.Since(start).Round(time.Millisecond))
}
