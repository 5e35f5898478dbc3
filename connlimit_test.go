package main

import (
	"bufio"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"runtime"
	"strings"
	"syscall"
	"testing"
	"time"
)

// dialFrom opens a TCP connection to addr from the loopback address from
// (127.0.0.1, 127.0.0.2, …: each is another client to the server).
func dialFrom(tb testing.TB, from, addr string) net.Conn {
	tb.Helper()
	d := net.Dialer{LocalAddr: &net.TCPAddr{IP: net.ParseIP(from)}, Timeout: 5 * time.Second}
	c, err := d.Dial("tcp", addr)
	if err != nil {
		tb.Fatalf("dial %s from %s: %v", addr, from, err)
	}
	tb.Cleanup(func() { c.Close() })
	return c
}

// roundTrip sends GET path on c, keeping the connection alive, and returns
// the status, or an error when the connection gives no answer.
func roundTrip(c net.Conn, br *bufio.Reader, path string) (int, error) {
	c.SetDeadline(time.Now().Add(10 * time.Second))
	defer c.SetDeadline(time.Time{})
	if _, err := fmt.Fprintf(c, "GET %s HTTP/1.1\r\nHost: x\r\n\r\n", path); err != nil {
		return 0, err
	}
	resp, err := http.ReadResponse(br, nil)
	if err != nil {
		return 0, err
	}
	io.Copy(io.Discard, resp.Body)
	resp.Body.Close()
	return resp.StatusCode, nil
}

// heldConn is a keep-alive connection that has been answered once.
type heldConn struct {
	net.Conn
	br *bufio.Reader
}

func holdConns(tb testing.TB, from, addr string, n int) []heldConn {
	tb.Helper()
	held := make([]heldConn, n)
	for i := range held {
		c := dialFrom(tb, from, addr)
		held[i] = heldConn{c, bufio.NewReader(c)}
		if code, err := roundTrip(c, held[i].br, "/health"); err != nil || code != http.StatusOK {
			tb.Fatalf("connection %d from %s: GET /health = %d, %v; want 200", i+1, from, code, err)
		}
	}
	return held
}

// closedByServer reports whether the server closed c (without answering)
// within a few seconds: a read ends in EOF or a reset, not a timeout.
func closedByServer(c net.Conn) error {
	c.SetReadDeadline(time.Now().Add(5 * time.Second))
	n, err := c.Read(make([]byte, 1))
	var ne net.Error
	switch {
	case n > 0:
		return fmt.Errorf("read %d bytes, want the connection closed unanswered", n)
	case errors.As(err, &ne) && ne.Timeout():
		return errors.New("still open after 5s, want it closed")
	}
	return nil
}

// refusedFrom dials addr from the address from and reports whether the
// server closed the connection unanswered: the dial itself may already
// see the reset.
func refusedFrom(from, addr string) error {
	d := net.Dialer{LocalAddr: &net.TCPAddr{IP: net.ParseIP(from)}, Timeout: 5 * time.Second}
	c, err := d.Dial("tcp", addr)
	if err != nil {
		if errors.Is(err, syscall.ECONNRESET) {
			return nil
		}
		return err
	}
	defer c.Close()
	return closedByServer(c)
}

// scrape reads one sample from the /metrics at addr, -1 if it is absent.
func scrape(tb testing.TB, addr, sample string) float64 {
	tb.Helper()
	resp, err := http.Get("http://" + addr + "/metrics")
	if err != nil {
		tb.Fatal(err)
	}
	defer resp.Body.Close()
	b, _ := io.ReadAll(resp.Body)
	for l := range strings.Lines(string(b)) {
		if rest, ok := strings.CutPrefix(l, sample+" "); ok {
			var v float64
			fmt.Sscan(rest, &v)
			return v
		}
	}
	return -1
}

// TestRun_connectionsPerAddress runs the service with MAX_CONNS_PER_IP=10
// and holds ten keep-alive connections from one address: an eleventh from
// it is closed unanswered, another address is still served, and when the
// clients go every connection is closed.
func TestRun_connectionsPerAddress(t *testing.T) {
	svc := runService(t, map[string]string{"ADDR": "127.0.0.1:0", "METRICS_ADDR": "127.0.0.1:0",
		"DB_PATH": filepath.Join(t.TempDir(), "c.db"), "API_TOKEN": "t", "MAX_CONNS_PER_IP": "10", "MAX_CONNS": "100"})
	addr := svc.listeningAddr(t)
	var metricsAddr string
	waitFor(t, 10*time.Second, "the metrics listener", func() bool {
		for _, l := range svc.stdout.logLines() {
			if l["msg"] == "metrics listening" {
				metricsAddr, _ = l["addr"].(string)
			}
		}
		return metricsAddr != ""
	})

	held := holdConns(t, "127.0.0.1", addr, 10)
	if over, err := net.Dial("tcp", addr); err == nil { // else refused before the dial returned
		if code, err := roundTrip(over, bufio.NewReader(over), "/health"); err == nil {
			t.Errorf("11th connection from one address: GET /health = %d, want the connection refused", code)
		}
		over.Close()
	}
	// Another client is served, and so are the ten, on their connections.
	client := &http.Client{Timeout: 10 * time.Second, Transport: &http.Transport{
		DialContext: (&net.Dialer{LocalAddr: &net.TCPAddr{IP: net.ParseIP("127.0.0.2")}}).DialContext,
	}}
	resp, err := client.Get("http://" + addr + "/health")
	if err != nil {
		t.Fatalf("a new client, from 127.0.0.2, while 127.0.0.1 is at its limit: %v", err)
	}
	resp.Body.Close()
	for i, h := range held {
		if code, err := roundTrip(h, h.br, "/health"); err != nil || code != http.StatusOK {
			t.Errorf("held connection %d: GET /health = %d, %v; want 200", i+1, code, err)
		}
	}
	if got := scrape(t, metricsAddr, `http_connections_refused_total{reason="max_conns_per_ip"}`); got != 1 {
		t.Errorf(`http_connections_refused_total{reason="max_conns_per_ip"} = %v, want 1`, got)
	}

	client.CloseIdleConnections()
	for _, h := range held {
		h.Close()
	}
	waitFor(t, 10*time.Second, "every connection closed", func() bool {
		return scrape(t, metricsAddr, "http_connections_open") == 0
	})
}

// TestRun_oneAddressCannotTakeEveryConnection opens 1,000 keep-alive
// connections from one address to the service with its default limits,
// answering a request on each and keeping them all: no more than the
// default per-address limit are served, and the process's file descriptors
// and memory stay bounded. It logs the figures.
func TestRun_oneAddressCannotTakeEveryConnection(t *testing.T) {
	if testing.Short() {
		t.Skip("opens 1,000 connections")
	}
	svc := runService(t, map[string]string{"ADDR": "127.0.0.1:0", "DB_PATH": filepath.Join(t.TempDir(), "c.db"), "API_TOKEN": "t"})
	addr := svc.listeningAddr(t)
	fds := func() int { es, _ := os.ReadDir("/proc/self/fd"); return len(es) }
	var before, after runtime.MemStats
	runtime.GC()
	runtime.ReadMemStats(&before)
	fdsBefore := fds()

	const conns = 1000
	served := 0
	for range conns {
		c, err := net.Dial("tcp", addr)
		if err != nil {
			continue // refused before the dial returned
		}
		if code, err := roundTrip(c, bufio.NewReader(c), "/health"); err == nil && code == http.StatusOK {
			served++
			t.Cleanup(func() { c.Close() })
		} else {
			c.Close() // refused: the client lets it go
		}
	}
	runtime.GC()
	runtime.ReadMemStats(&after)
	// Each connection served holds two descriptors here: the client's end
	// and the server's.
	t.Logf("%d connections from one address: %d served and held; descriptors %d → %d; heap+stacks %.1f → %.1f MiB",
		conns, served, fdsBefore, fds(), float64(before.HeapInuse+before.StackInuse)/(1<<20), float64(after.HeapInuse+after.StackInuse)/(1<<20))
	if served > defaultMaxConnsPerAddr {
		t.Errorf("one address holds %d connections, want at most the default MAX_CONNS_PER_IP, %d", served, defaultMaxConnsPerAddr)
	}
	// A new client is still answered.
	c := dialFrom(t, "127.0.0.2", addr)
	if code, err := roundTrip(c, bufio.NewReader(c), "/health"); err != nil || code != http.StatusOK {
		t.Errorf("new client from 127.0.0.2: GET /health = %d, %v; want 200", code, err)
	}
}

func open(l *connLimiter) int { n, _ := l.counts(); return n }

// limitedServer serves handler on 127.0.0.1 behind a connLimiter of max
// connections in all and perAddr from one address. The cleanup checks
// that every connection is closed once the server is.
func limitedServer(t *testing.T, max, perAddr int) (*connLimiter, *metrics, string) {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	m := newMetrics(nil)
	lim := newConnLimiter(max, perAddr, m, slog.New(slog.DiscardHandler))
	srv := &http.Server{Handler: http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		w.Write([]byte("ok"))
	}), ReadHeaderTimeout: 10 * time.Second}
	ln = lim.wrap(ln, srv)
	done := make(chan struct{})
	go func() { defer close(done); srv.Serve(ln) }()
	t.Cleanup(func() {
		srv.Close()
		<-done
		waitFor(t, 5*time.Second, "every connection released", func() bool { return open(lim) == 0 })
	})
	return lim, m, ln.Addr().String()
}

// TestConnLimiter_total fills MAX_CONNS with connections that have sent
// nothing yet (not idle: they are not closed early): the next is refused,
// and once one goes a new client is served.
func TestConnLimiter_total(t *testing.T) {
	lim, m, addr := limitedServer(t, 5, 0)
	var waiting []net.Conn
	for i := range 5 {
		waiting = append(waiting, dialFrom(t, fmt.Sprintf("127.0.0.%d", i+1), addr))
	}
	waitFor(t, 5*time.Second, "five connections accepted", func() bool { return open(lim) == 5 })
	if err := refusedFrom("127.0.0.9", addr); err != nil {
		t.Errorf("connection over MAX_CONNS=5: %v", err)
	}
	if got := counterValue(t, m.connsRefused.WithLabelValues("max_conns")); got != 1 {
		t.Errorf(`http_connections_refused_total{reason="max_conns"} = %v, want 1`, got)
	}
	waiting[0].Close()
	waitFor(t, 5*time.Second, "a slot given back", func() bool { return open(lim) == 4 })
	c := dialFrom(t, "127.0.0.9", addr)
	if code, err := roundTrip(c, bufio.NewReader(c), "/"); err != nil || code != http.StatusOK {
		t.Errorf("new client after a slot came back: %d, %v; want 200", code, err)
	}
	// The four that sent nothing are still there: they were not idle.
	for i, w := range waiting[1:] {
		if code, err := roundTrip(w, bufio.NewReader(w), "/"); err != nil || code != http.StatusOK {
			t.Errorf("waiting connection %d: %d, %v; want 200", i+2, code, err)
		}
	}
}

// TestConnLimiter_perAddress holds ten connections from one address with a
// limit of ten: the eleventh from it is refused, another address is served.
func TestConnLimiter_perAddress(t *testing.T) {
	lim, m, addr := limitedServer(t, 1000, 10)
	held := holdConns(t, "127.0.0.1", addr, 10)
	if err := refusedFrom("127.0.0.1", addr); err != nil {
		t.Errorf("11th connection from 127.0.0.1: %v", err)
	}
	c := dialFrom(t, "127.0.0.2", addr)
	if code, err := roundTrip(c, bufio.NewReader(c), "/"); err != nil || code != http.StatusOK {
		t.Errorf("client from 127.0.0.2: %d, %v; want 200", code, err)
	}
	if got := counterValue(t, m.connsRefused.WithLabelValues("max_conns_per_ip")); got != 1 {
		t.Errorf(`http_connections_refused_total{reason="max_conns_per_ip"} = %v, want 1`, got)
	}
	held[0].Close()
	waitFor(t, 5*time.Second, "a slot given back", func() bool { return open(lim) == 10 })
	holdConns(t, "127.0.0.1", addr, 1) // 127.0.0.1 has room again
}

// TestConnLimiter_idleClosedWhenCrowded holds eight idle keep-alive
// connections of ten allowed: a ninth makes the listener crowded, so the
// idle ones are closed, the ninth is served, and a connection falling idle
// while crowded is closed too.
func TestConnLimiter_idleClosedWhenCrowded(t *testing.T) {
	lim, m, addr := limitedServer(t, 10, 0)
	held := holdConns(t, "127.0.0.1", addr, 8) // 80%: not yet crowded
	// The server marks a connection idle just after writing its answer.
	waitFor(t, 5*time.Second, "eight idle connections", func() bool { _, idle := lim.counts(); return idle == 8 })
	if got := counterValue(t, m.idleClosed); got != 0 {
		t.Fatalf("idle connections closed at 80%% = %v, want 0", got)
	}
	c := dialFrom(t, "127.0.0.2", addr)
	for i, h := range held {
		if err := closedByServer(h); err != nil {
			t.Errorf("idle connection %d once crowded: %v", i+1, err)
		}
	}
	if code, err := roundTrip(c, bufio.NewReader(c), "/"); err != nil || code != http.StatusOK {
		t.Errorf("the ninth connection: %d, %v; want 200", code, err)
	}
	if got := counterValue(t, m.idleClosed); got != 8 {
		t.Errorf("http_idle_connections_closed_total = %v, want 8", got)
	}

	// Crowded again with nine connections that sent nothing: the tenth's
	// answer is followed by its close.
	lim2, _, addr2 := limitedServer(t, 10, 0)
	for i := range 8 {
		dialFrom(t, fmt.Sprintf("127.0.1.%d", i+1), addr2)
	}
	waitFor(t, 5*time.Second, "eight connections accepted", func() bool { return open(lim2) == 8 })
	c = dialFrom(t, "127.0.0.2", addr2)
	br := bufio.NewReader(c)
	if code, err := roundTrip(c, br, "/"); err != nil || code != http.StatusOK {
		t.Fatalf("the ninth connection: %d, %v; want 200", code, err)
	}
	if _, err := br.ReadByte(); err == nil {
		t.Errorf("a connection falling idle at 9 of 10 stayed open, want it closed after its answer")
	}
}
