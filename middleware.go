package main

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"fmt"
	"hash/maphash"
	"log/slog"
	"math"
	"net"
	"net/http"
	"net/netip"
	"path"
	"runtime/debug"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"go.opentelemetry.io/otel/attribute"
	"go.opentelemetry.io/otel/trace"
	"golang.org/x/time/rate"
)

// requestInfo is the mutable per-request record the outer middleware puts
// in the context: handlers add to it, the access log reads it.
type requestInfo struct {
	id       string
	cache    string
	log      *slog.Logger // the service logger; loggerFrom adds the request id
	rejected bool         // refused by load shedding or a rate limit
	actor    string       // the credential's name, once authenticated
	client   string       // the client's address (see trustedProxies.client)
	auth     *authOutcome // who the request authenticated as, once tokenSet.match ran
}

type requestInfoKey struct{}

func infoFrom(ctx context.Context) *requestInfo {
	info, _ := ctx.Value(requestInfoKey{}).(*requestInfo)
	return info
}

// discardLogger is what loggerFrom returns when it has nothing better.
var discardLogger = slog.New(slog.DiscardHandler)

// loggerFrom returns a logger that tags lines with the request id: the
// request's, else fallback, else one that discards. It never returns nil.
func loggerFrom(ctx context.Context, fallback *slog.Logger) *slog.Logger {
	if info := infoFrom(ctx); info != nil && info.log != nil {
		return info.log.With("request_id", info.id)
	}
	if fallback != nil {
		return fallback
	}
	return discardLogger
}

// markRejected records that the request is being refused by load shedding or
// a rate limit. Such requests are counted in metrics but logged only by
// sample (see rejectLog): under a flood of them, a log line each would make
// refusing dearer than serving.
func markRejected(ctx context.Context) {
	if info := infoFrom(ctx); info != nil {
		info.rejected = true
	}
}

func isRejected(ctx context.Context) bool {
	info := infoFrom(ctx)
	return info != nil && info.rejected
}

// rejectLog samples the log of rejected requests: at most one line per
// interval, carrying how many were rejected since the last line.
type rejectLog struct {
	interval time.Duration
	last     atomic.Int64 // Unix nanoseconds of the last line
	count    atomic.Int64 // rejected since the last line
}

// note counts one rejected request and reports whether to log it, with the
// count of those rejected since the last line (this one included).
func (l *rejectLog) note(now time.Time) (int64, bool) {
	l.count.Add(1)
	last := l.last.Load()
	if now.UnixNano()-last < int64(l.interval) || !l.last.CompareAndSwap(last, now.UnixNano()) {
		return 0, false
	}
	return l.count.Swap(0), true
}

func setCacheResult(ctx context.Context, result string) {
	if info := infoFrom(ctx); info != nil {
		info.cache = result
	}
}

// validRequestID accepts client request ids that are safe to log and echo.
func validRequestID(s string) bool {
	if len(s) == 0 || len(s) > 128 {
		return false
	}
	for i := 0; i < len(s); i++ {
		c := s[i]
		if !(c >= 'a' && c <= 'z' || c >= 'A' && c <= 'Z' || c >= '0' && c <= '9' || c == '-' || c == '_' || c == '.') {
			return false
		}
	}
	return true
}

func newRequestID() string {
	var b [12]byte
	rand.Read(b[:])
	return hex.EncodeToString(b[:])
}

// recorder captures the status and size of a response for the access log
// and metrics. It also turns the plain-text 404 and 405 that ServeMux writes
// for unmatched requests into problem+json: r.Pattern is empty exactly when
// no route matched.
type recorder struct {
	http.ResponseWriter
	r       *http.Request
	status  int
	bytes   int
	swallow bool // the mux's own error body is being replaced
}

func (rec *recorder) WriteHeader(code int) {
	if rec.status != 0 {
		return
	}
	if code >= 400 && rec.r.Pattern == "" && rec.Header().Get("Content-Type") != contentTypeProblem {
		rec.swallow = true
		rec.status = code
		rec.bytes = writeProblem(rec.ResponseWriter, rec.r, code, "", "", nil)
		return
	}
	rec.status = code
	rec.ResponseWriter.WriteHeader(code)
}

func (rec *recorder) Write(b []byte) (int, error) {
	if rec.swallow {
		return len(b), nil
	}
	if rec.status == 0 {
		rec.WriteHeader(http.StatusOK)
		if rec.swallow {
			return len(b), nil
		}
	}
	n, err := rec.ResponseWriter.Write(b)
	rec.bytes += n
	return n, err
}

// Unwrap lets http.ResponseController reach the connection.
func (rec *recorder) Unwrap() http.ResponseWriter { return rec.ResponseWriter }

var nosniff = []string{"nosniff"}

// observe is the outermost middleware: request id, security headers, access
// log, metrics and panic recovery, for every request. The access log line is
// at INFO, except for probes and scrapes (isProbe) that succeed: DEBUG.
//
// The client's address is resolved here once, through proxies, for the
// limits and the log.
func observe(log *slog.Logger, m *metrics, proxies trustedProxies, next http.Handler) http.Handler {
	rejects := &rejectLog{interval: time.Second}
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		start := time.Now()
		id := r.Header.Get("X-Request-ID")
		if !validRequestID(id) {
			id = newRequestID()
		}
		h := w.Header()
		h["X-Request-Id"] = []string{id}
		h["X-Content-Type-Options"] = nosniff

		info := &requestInfo{id: id, log: log, client: proxies.client(r)}
		r = r.WithContext(context.WithValue(r.Context(), requestInfoKey{}, info))
		rec := &recorder{ResponseWriter: w, r: r}
		m.inFlight.Inc()
		defer func() {
			m.inFlight.Dec()
			if p := recover(); p != nil {
				if p == http.ErrAbortHandler {
					panic(p)
				}
				log.LogAttrs(r.Context(), slog.LevelError, "panic", slog.String("request_id", id),
					slog.Any("panic", p), slog.String("stack", string(debug.Stack())))
				if rec.status == 0 {
					writeProblem(rec, r, http.StatusInternalServerError, "", "", nil)
				}
			}
			route := r.Pattern
			if route == "" {
				route = "unmatched"
			}
			if rec.status == 0 {
				rec.status = http.StatusOK
			}
			if span := trace.SpanFromContext(r.Context()); span.IsRecording() {
				span.SetName(r.Method + " " + strings.TrimPrefix(route, r.Method+" "))
				span.SetAttributes(attribute.String("http.route", route))
			}
			elapsed := time.Since(start)
			m.observe(r.Method, route, rec.status, elapsed)
			level, rejected := slog.LevelInfo, int64(0)
			if rec.status < 400 && isProbe(r) {
				// A load balancer checks /ready a few times a second per
				// replica: answers that only say "still fine" would bury
				// the log. A failing probe stays at INFO.
				level = slog.LevelDebug
			}
			if info.rejected {
				n, ok := rejects.note(start)
				if !ok {
					return // counted in metrics; a sampled line tells the log
				}
				level, rejected = slog.LevelWarn, n
			}
			if log.Enabled(r.Context(), level) {
				attrs := []slog.Attr{
					slog.String("method", r.Method),
					slog.String("route", route),
					slog.String("path", r.URL.Path),
					slog.Int("status", rec.status),
					slog.Int("bytes", rec.bytes),
					slog.Float64("duration_ms", float64(elapsed.Microseconds())/1000),
					slog.String("request_id", id),
					slog.String("client_ip", info.client),
				}
				if info.actor != "" {
					attrs = append(attrs, slog.String("actor", info.actor))
				}
				if info.cache != "" {
					attrs = append(attrs, slog.String("cache", info.cache))
				}
				msg := "request"
				if rejected > 0 {
					msg = "requests rejected" // this one stands for the rest since the last such line
					attrs = append(attrs, slog.Int64("rejected_since_last", rejected))
				}
				log.LogAttrs(r.Context(), level, msg, attrs...)
			}
		}()
		next.ServeHTTP(rec, r)
	})
}

// canonicalPaths answers 404 for paths that are not in canonical form
// ("//", "/./", "/../") instead of letting ServeMux redirect them: a client
// of an API wants an answer, not a redirect to a different resource.
func canonicalPaths(next http.Handler) http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		p := r.URL.EscapedPath()
		if r.Method != http.MethodConnect && p != "*" {
			clean := path.Clean(p)
			if strings.HasSuffix(p, "/") && clean != "/" {
				clean += "/"
			}
			if p == "" || clean != p || strings.ContainsAny(r.URL.Path, "\x00") {
				writeError(w, r, &httpError{status: http.StatusNotFound, detail: "the path is not in canonical form"})
				return
			}
		}
		next.ServeHTTP(w, r)
	})
}

// isProbe reports whether r is for an endpoint that load shedding and rate
// limits never refuse: health, readiness and metrics must answer under load.
func isProbe(r *http.Request) bool {
	switch r.URL.Path {
	case "/health", "/health/live", "/livez", "/ready", "/health/ready", "/readyz", "/health/startup", "/metrics":
		return true
	}
	return false
}

// shedLoad refuses requests beyond max in flight with 503 at once, instead
// of queueing them until every request times out.
func shedLoad(max int, m *metrics, next http.Handler) http.Handler {
	if max <= 0 {
		return next
	}
	var inFlight atomic.Int64
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if isProbe(r) {
			next.ServeHTTP(w, r)
			return
		}
		if inFlight.Add(1) > int64(max) {
			inFlight.Add(-1)
			m.shed.Inc()
			markRejected(r.Context())
			writeError(w, r, &UnavailableError{Reason: "the server is at capacity; retry shortly", RetryAfter: time.Second})
			return
		}
		defer inFlight.Add(-1)
		next.ServeHTTP(w, r)
	})
}

// clientIP returns the client's address: as observe resolved it (through
// TRUSTED_PROXIES), else the TCP peer's.
func clientIP(r *http.Request) string {
	if info := infoFrom(r.Context()); info != nil && info.client != "" {
		return info.client
	}
	return peerIP(r)
}

// peerIP returns the address of the TCP peer.
func peerIP(r *http.Request) string {
	host, _, err := net.SplitHostPort(r.RemoteAddr)
	if err != nil {
		return r.RemoteAddr
	}
	return host
}

// trustedProxies are the networks of TRUSTED_PROXIES: the reverse proxies
// whose X-Forwarded-For is believed. Empty: the header is never read.
type trustedProxies []netip.Prefix

// parseTrustedProxies parses a comma-separated list of CIDRs (a bare
// address is its own /32 or /128).
func parseTrustedProxies(s string) (trustedProxies, error) {
	var tp trustedProxies
	for _, f := range strings.Split(s, ",") {
		if f = strings.TrimSpace(f); f == "" {
			continue
		}
		p, err := netip.ParsePrefix(f)
		if err != nil {
			a, aerr := netip.ParseAddr(f)
			if aerr != nil {
				return nil, fmt.Errorf("%q is not a CIDR or an address, such as 10.0.0.0/8 or 192.168.1.1", f)
			}
			p = netip.PrefixFrom(a, a.BitLen())
		}
		tp = append(tp, p.Masked())
	}
	return tp, nil
}

func (tp trustedProxies) trusts(a netip.Addr) bool {
	a = a.Unmap().WithZone("")
	for _, p := range tp {
		if p.Contains(a) {
			return true
		}
	}
	return false
}

// client returns the address a request comes from. Only when the TCP peer
// is a trusted proxy is X-Forwarded-For read, from the right: each trusted
// proxy appends the address it took the request from, so the rightmost
// address that is not a trusted proxy is the client; what is left of it
// anyone could have written. A hop that is not an address stops the walk
// at the proxy that passed it on.
func (tp trustedProxies) client(r *http.Request) string {
	peer := peerIP(r)
	if len(tp) == 0 {
		return peer
	}
	a, err := netip.ParseAddr(peer)
	if err != nil || !tp.trusts(a) {
		return peer
	}
	hops := r.Header.Values("X-Forwarded-For")
	client := a
	for i := len(hops) - 1; i >= 0; i-- {
		list := strings.Split(hops[i], ",")
		for j := len(list) - 1; j >= 0; j-- {
			hop, err := netip.ParseAddr(strings.TrimSpace(list[j]))
			if err != nil {
				return client.Unmap().String()
			}
			client = hop
			if !tp.trusts(hop) {
				return hop.Unmap().WithZone("").String()
			}
		}
	}
	return client.Unmap().WithZone("").String() // every hop is a trusted proxy: the leftmost
}

// clientKey is what a client is limited by when it has no valid token: its
// IPv4 address, or the /64 of its IPv6 address. A host is routinely given a
// whole /64, so keying by the full address would let one host take as many
// buckets as it likes.
func clientKey(r *http.Request) string {
	ip := clientIP(r)
	a, err := netip.ParseAddr(ip)
	if err != nil {
		return ip
	}
	p := clientPrefix(a)
	if p.Addr().Is4() {
		return p.Addr().String()
	}
	return p.String()
}

// clientPrefix is the block of addresses one client is taken to hold: its
// IPv4 address (/32), or the /64 of its IPv6 address. The rate limit and
// the connection limits (connLimiter) both count clients by it.
func clientPrefix(a netip.Addr) netip.Prefix {
	a = a.Unmap().WithZone("")
	bits := 32
	if a.Is6() {
		bits = 64
	}
	p, _ := a.Prefix(bits)
	return p
}

// rateLimiter keeps a token bucket per client: the bearer token's digest
// when the token is valid (so a client is one client from any address),
// else the client's address (clientKey); and a tighter bucket per address
// for failed authentication. The buckets are spread over shards, each with
// its own lock and a fixed capacity, and no request ever walks a whole
// shard: a new client looks at a few buckets and drops those that have
// refilled (forgetting them changes nothing for their clients), and when
// the shard is still full it drops one of them.
type rateLimiter struct {
	rps    rate.Limit // 0: no general limit, only failed authentication is limited
	burst  int
	tokens *tokenSet

	seed   maphash.Seed
	shards [limiterShards]limiterShard

	authRetryAfter time.Duration
	examined       atomic.Int64 // buckets looked at to make room, for tests
}

type limiterShard struct {
	mu       sync.Mutex
	buckets  map[string]*rate.Limiter
	failures map[string]*rate.Limiter
}

const (
	limiterShards     = 64
	maxBuckets        = 64 << 10            // clients tracked by the general limit, across shards
	maxFailureBuckets = 16 << 10            // addresses tracked for failed authentication
	evictSample       = 4                   // buckets a new client looks at
	authFailureRate   = rate.Limit(1.0 / 6) // one failed authentication per 6 s...
	authFailureBurst  = 10                  // ...after a burst of 10
)

// newRateLimiter returns a limiter of rps requests per second per client
// (0: none) with burst; failed authentication is limited either way.
func newRateLimiter(rps float64, burst int, tokens *tokenSet) *rateLimiter {
	if burst <= 0 {
		burst = max(1, int(math.Ceil(rps)))
	}
	rl := &rateLimiter{
		rps: rate.Limit(rps), burst: burst, tokens: tokens, seed: maphash.MakeSeed(),
		authRetryAfter: time.Duration(float64(time.Second) / float64(authFailureRate)),
	}
	for i := range rl.shards {
		rl.shards[i].buckets = make(map[string]*rate.Limiter)
		rl.shards[i].failures = make(map[string]*rate.Limiter)
	}
	return rl
}

func (rl *rateLimiter) shard(key string) *limiterShard {
	return &rl.shards[maphash.String(rl.seed, key)%limiterShards]
}

// get returns key's bucket in m, making one if needed. Call it with the
// shard's lock held. It looks at no more than evictSample other buckets.
func (rl *rateLimiter) get(m map[string]*rate.Limiter, key string, lim rate.Limit, burst, capacity int, now time.Time) *rate.Limiter {
	if b, ok := m[key]; ok {
		return b
	}
	victim, n := "", 0
	for k, b := range m { // map iteration starts at a random place
		if n == evictSample {
			break
		}
		n++
		if b.TokensAt(now) >= float64(b.Burst()) {
			delete(m, k)
			continue
		}
		victim = k
	}
	rl.examined.Add(int64(n))
	if len(m) >= capacity && victim != "" {
		delete(m, victim) // still full of active clients: drop one at random
	}
	b := rate.NewLimiter(lim, burst)
	m[key] = b
	return b
}

// len returns the number of buckets of the general limit and of failed
// authentication.
func (rl *rateLimiter) len() (buckets, failures int) {
	for i := range rl.shards {
		s := &rl.shards[i]
		s.mu.Lock()
		buckets += len(s.buckets)
		failures += len(s.failures)
		s.mu.Unlock()
	}
	return buckets, failures
}

func (rl *rateLimiter) allowAuthFailure(key string) bool {
	now := time.Now()
	s := rl.shard(key)
	s.mu.Lock()
	defer s.mu.Unlock()
	return rl.get(s.failures, key, authFailureRate, authFailureBurst, maxFailureBuckets/limiterShards, now).AllowN(now, 1)
}

// limit applies the per-client rate limit. Probes are never limited.
func (rl *rateLimiter) limit(m *metrics, next http.Handler) http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if isProbe(r) {
			next.ServeHTTP(w, r)
			return
		}
		key := "ip:" + clientKey(r)
		if p, ok := rl.tokens.match(r); ok {
			key = "token:" + p.key
		}
		now := time.Now()
		s := rl.shard(key)
		s.mu.Lock()
		lim := rl.get(s.buckets, key, rl.rps, rl.burst, maxBuckets/limiterShards, now)
		allowed := lim.AllowN(now, 1)
		remaining := lim.TokensAt(now)
		s.mu.Unlock()

		h := w.Header()
		h.Set("RateLimit-Limit", strconv.Itoa(rl.burst))
		h.Set("RateLimit-Remaining", strconv.Itoa(max(0, int(remaining))))
		untilOne := time.Duration(0)
		if remaining < 1 {
			untilOne = time.Duration((1 - remaining) / float64(rl.rps) * float64(time.Second))
		}
		h.Set("RateLimit-Reset", strconv.Itoa(int(math.Ceil(untilOne.Seconds()))))
		if !allowed {
			m.rateLimited.Inc()
			markRejected(r.Context())
			writeError(w, r, &rateLimitError{retryAfter: untilOne})
			return
		}
		next.ServeHTTP(w, r)
	})
}

// rateLimitError is a request refused by a rate limit.
type rateLimitError struct{ retryAfter time.Duration }

func (e *rateLimitError) Error() string {
	return fmt.Sprintf("too many requests; retry in %s", e.retryAfter.Round(time.Second))
}
