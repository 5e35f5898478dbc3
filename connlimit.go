package main

// Connection limits of the API listener: how many TCP connections it holds
// in all (MAX_CONNS) and from one client address (MAX_CONNS_PER_IP), and
// which it lets go first when it nears the first limit.

import (
	"log/slog"
	"net"
	"net/http"
	"net/netip"
	"sync"
	"time"
)

const (
	// defaultMaxConnsPerAddr is MAX_CONNS_PER_IP's default: far more than
	// a browser (6) or a client's connection pool needs, far fewer than it
	// takes to run a process out of descriptors.
	defaultMaxConnsPerAddr = 256
	// connsCrowdedPercent is how full MAX_CONNS may be before idle
	// keep-alive connections are closed.
	connsCrowdedPercent = 80
)

// defaultMaxConns is MAX_CONNS's default: the open-file limit less room
// for what else the process opens (the database and its WAL, Redis and
// PostgreSQL pools, the other listeners, logs): a tenth, at least 64.
func defaultMaxConns() int {
	n := openFileLimit()
	return max(1, n-max(64, n/10))
}

// connLimiter bounds the connections of one listener: at most max open at
// once and perAddr from one client (0: no bound). The client is the TCP
// peer, keyed as the rate limit keys it (clientPrefix): an IPv4 address,
// or the /64 of an IPv6 one.
//
// A connection over a limit is closed as it is accepted, unanswered: an
// HTTP answer would need its request read first, which holds the very
// descriptor the limit is there to keep free, for as long as the client
// cares to take to send it. The client sees a reset; refusals are counted
// in http_connections_refused_total and logged a line a second at most.
//
// Idle keep-alive connections are what one client can hold most cheaply,
// for IdleTimeout each. When more than connsCrowdedPercent of max are
// open, every idle one is closed, and so is each that falls idle while it
// stays so: a client's next request opens a new connection (HTTP clients
// do that by themselves), and one that needs a slot gets one instead of a
// refusal. This is done per connection through http.Server.ConnState
// rather than with SetKeepAlivesEnabled(false), which would end keep-alive
// for every client, and stays off until something turns it back on.
// Connections that have not sent a request yet are left to
// ReadHeaderTimeout.
type connLimiter struct {
	max, perAddr int
	metrics      *metrics
	log          *slog.Logger
	refusals     rejectLog

	mu     sync.Mutex
	open   int
	byAddr map[netip.Prefix]int
	idle   map[*limitedConn]struct{}
}

// newConnLimiter returns a limiter of max connections in all and perAddr
// from one client address; 0 means no bound.
func newConnLimiter(max, perAddr int, m *metrics, log *slog.Logger) *connLimiter {
	if files := openFileLimit(); max > files {
		log.Warn("MAX_CONNS is above the open-file limit: the process may run out of descriptors before refusing a connection",
			"max_conns", max, "open_file_limit", files)
	}
	return &connLimiter{
		max: max, perAddr: perAddr, metrics: m, log: log,
		refusals: rejectLog{interval: time.Second},
		byAddr:   make(map[netip.Prefix]int),
		idle:     make(map[*limitedConn]struct{}),
	}
}

// wrap returns ln with its connections bounded, and hooks srv, which is to
// serve it, so idle connections can be closed under pressure.
func (l *connLimiter) wrap(ln net.Listener, srv *http.Server) net.Listener {
	srv.ConnState = l.connState
	return &limitedListener{Listener: ln, limits: l}
}

// crowded reports whether open connections leave little room. Call it with
// mu held.
func (l *connLimiter) crowded(open int) bool {
	return l.max > 0 && open*100 > l.max*connsCrowdedPercent
}

// admit takes c into the limits, or closes it and returns nil. Only the
// accepting goroutine calls it, so counts can only fall between its steps.
func (l *connLimiter) admit(c net.Conn) *limitedConn {
	key := remotePrefix(c)
	l.mu.Lock()
	if l.perAddr > 0 && l.byAddr[key] >= l.perAddr {
		l.mu.Unlock()
		l.refuse(c, key, "max_conns_per_ip")
		return nil
	}
	var idle []*limitedConn
	if l.crowded(l.open + 1) {
		for ic := range l.idle {
			idle = append(idle, ic)
		}
		clear(l.idle)
	}
	l.mu.Unlock()
	for _, ic := range idle {
		ic.Close() // gives its slot back at once
		l.metrics.idleClosed.Inc()
	}

	l.mu.Lock()
	if l.max > 0 && l.open >= l.max {
		l.mu.Unlock()
		l.refuse(c, key, "max_conns")
		return nil
	}
	l.open++
	l.byAddr[key]++
	l.mu.Unlock()
	l.metrics.connsOpen.Inc()
	return &limitedConn{Conn: c, limits: l, key: key}
}

// refuse closes c, counts it, and logs a sampled line.
func (l *connLimiter) refuse(c net.Conn, key netip.Prefix, reason string) {
	if tc, ok := c.(*net.TCPConn); ok {
		// A reset frees the socket at once; a polite close would leave it
		// in TIME_WAIT here, a flood of refusals' worth of them.
		tc.SetLinger(0)
	}
	c.Close()
	l.metrics.connsRefused.WithLabelValues(reason).Inc()
	if n, ok := l.refusals.note(time.Now()); ok {
		l.log.Warn("connections refused", "reason", reason, "client", key.String(),
			"refused_since_last", n, "max_conns", l.max, "max_conns_per_ip", l.perAddr)
	}
}

// release gives c's slot back. limitedConn.Close calls it once.
func (l *connLimiter) release(c *limitedConn) {
	l.mu.Lock()
	l.open--
	if l.byAddr[c.key]--; l.byAddr[c.key] <= 0 {
		delete(l.byAddr, c.key)
	}
	delete(l.idle, c)
	l.mu.Unlock()
	l.metrics.connsOpen.Dec()
}

// connState is srv's ConnState hook: it keeps the set of idle connections,
// and closes a connection falling idle while the listener is crowded.
func (l *connLimiter) connState(nc net.Conn, state http.ConnState) {
	c, ok := nc.(*limitedConn)
	if !ok {
		return
	}
	switch state {
	case http.StateIdle:
		l.mu.Lock()
		crowded := l.crowded(l.open)
		if !crowded {
			l.idle[c] = struct{}{}
		}
		l.mu.Unlock()
		if crowded {
			// The answer is written; the server's read of the next
			// request fails and it lets the connection go.
			c.Close()
			l.metrics.idleClosed.Inc()
		}
	case http.StateActive:
		l.mu.Lock()
		delete(l.idle, c)
		l.mu.Unlock()
	}
}

// counts returns the connections open and, of those, idle.
func (l *connLimiter) counts() (open, idle int) {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.open, len(l.idle)
}

// limitedListener is a listener whose connections are bounded by limits.
type limitedListener struct {
	net.Listener
	limits *connLimiter
}

// Accept returns the next connection within the limits, closing those
// over them meanwhile.
func (ll *limitedListener) Accept() (net.Conn, error) {
	for {
		c, err := ll.Listener.Accept()
		if err != nil {
			return nil, err
		}
		if lc := ll.limits.admit(c); lc != nil {
			return lc, nil
		}
	}
}

// limitedConn is an admitted connection: closing it gives its slot back.
type limitedConn struct {
	net.Conn
	limits *connLimiter
	key    netip.Prefix
	once   sync.Once
}

func (c *limitedConn) Close() error {
	err := c.Conn.Close()
	c.once.Do(func() { c.limits.release(c) })
	return err
}

// CloseWrite half-closes the connection. net/http does that before
// closing one whose request it did not read to the end, so the client
// reads the answer rather than a reset; it looks for this method, which
// embedding the *net.TCPConn as a net.Conn would hide.
func (c *limitedConn) CloseWrite() error {
	if cw, ok := c.Conn.(interface{ CloseWrite() error }); ok {
		return cw.CloseWrite()
	}
	return nil
}

// remotePrefix is the client address c counts against: clientPrefix of its
// TCP peer.
func remotePrefix(c net.Conn) netip.Prefix {
	if ta, ok := c.RemoteAddr().(*net.TCPAddr); ok {
		return clientPrefix(ta.AddrPort().Addr())
	}
	return netip.Prefix{} // not TCP: every such connection is one client
}
