package e2e

import (
	"context"
	"encoding/csv"
	"fmt"
	"math/rand/v2"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"
)

// haproxyBinary is where Debian's haproxy package installs the binary;
// /usr/sbin is not on every user's PATH.
const haproxyBinary = "/usr/sbin/haproxy"

// requireHAProxy returns the haproxy binary. When it is missing the test
// skips, unless REQUIRE_POSTGRES=1: the load balancer is only used by the
// fleet suite, which runs only on PostgreSQL, so the setting that makes a
// missing PostgreSQL a failure (CI) makes a missing haproxy one too.
func requireHAProxy(t testing.TB) string {
	t.Helper()
	if p, err := exec.LookPath("haproxy"); err == nil {
		return p
	}
	if st, err := os.Stat(haproxyBinary); err == nil && st.Mode().IsRegular() && st.Mode()&0o111 != 0 {
		return haproxyBinary
	}
	if os.Getenv("REQUIRE_POSTGRES") == "1" {
		t.Fatalf("haproxy not found on PATH or at %s and REQUIRE_POSTGRES=1", haproxyBinary)
	}
	t.Skipf("SKIP: haproxy not found on PATH or at %s; install it (apt-get install haproxy) or set REQUIRE_POSTGRES=1 to make this a failure", haproxyBinary)
	return ""
}

// fixedPorts returns n distinct loopback ports that were free a moment ago,
// for servers that must come back on the same port (HAProxy's server
// slots, a restarted Redis). They are taken below the kernel's ephemeral
// range: a port from that range left unbound for a while (a spare slot)
// can meanwhile become the local port of some outgoing connection, and the
// replica meant for it would then fail to listen.
func fixedPorts(t testing.TB, n int) []int {
	t.Helper()
	lo := 32768
	if b, err := os.ReadFile("/proc/sys/net/ipv4/ip_local_port_range"); err == nil {
		if f := strings.Fields(string(b)); len(f) == 2 {
			if v, err := strconv.Atoi(f[0]); err == nil && v > 12000 {
				lo = v
			}
		}
	}
	seen := map[int]bool{}
	var ports []int
	for try := 0; try < 1000 && len(ports) < n; try++ {
		p := 10000 + rand.IntN(lo-10000)
		if seen[p] {
			continue
		}
		seen[p] = true
		l, err := net.Listen("tcp", net.JoinHostPort("127.0.0.1", strconv.Itoa(p)))
		if err != nil {
			continue
		}
		l.Close()
		ports = append(ports, p)
	}
	if len(ports) < n {
		t.Fatalf("found only %d of %d free loopback ports below %d", len(ports), n, lo)
	}
	return ports
}

// haproxyProc is an haproxy child balancing HTTP over fixed loopback
// server slots: server s<i> is Slots[i], whether or not anything listens
// there yet, so a replica can start on a spare slot before the one it
// replaces stops.
type haproxyProc struct {
	t        testing.TB
	URL      string   // the frontend, http://127.0.0.1:port
	Slots    []string // the servers' addresses; slot i is server "s<i>"
	statsURL string
	cmd      *exec.Cmd
	done     chan struct{}
	out      *lineLog
}

// haproxyConfig is the configuration startHAProxy writes. The placeholders
// are the frontend port, the server lines and the stats port.
//
// Health checks: GET /ready every 100 ms, one failure marks a server DOWN
// and one success UP, so a replica whose /ready turns 503 at SIGTERM is
// out of rotation within about 100 ms, well inside SHUTDOWN_DELAY, and a
// new one is in rotation as soon as it is ready.
//
// Retries: a request is retried (twice, each time on another server:
// "option redispatch 1") when the connection could not be made — the
// server never saw the request, so this is safe for every method — and,
// for GET and HEAD alone, also when the server closed the connection
// without answering (a replica killed mid-request). A write that reached a
// replica may have committed before it died, so it is never sent again by
// HAProxy ("http-request disable-l7-retry"): a POST could create a product
// or adjust stock twice. Its client gets a 502 and retries it itself, with
// its Idempotency-Key, which the service then applies once. HAProxy cannot
// do that for the client: it cannot tell which endpoints honour the key (a
// DELETE or a PATCH ignores it), and it would hide from the tests exactly
// the failures a client must handle. Timeouts and 5xx answers are never
// retried: the write may have committed, and a 503 carries Retry-After
// for the client. This is the policy of deploy/haproxy/haproxy.cfg, with
// faster checks.
//
// Keep-alive towards clients outlasts the Go client's 30 s idle timeout,
// so the client, not HAProxy, closes idle connections: a request never
// races HAProxy closing the connection it was sent on.
const haproxyConfig = `global
	maxconn 4096

defaults
	mode http
	timeout connect 1s
	timeout client 60s
	timeout server 30s
	timeout http-request 10s
	timeout http-keep-alive 60s
	timeout queue 5s
	retries 2
	option redispatch 1
	retry-on conn-failure empty-response

frontend api
	bind 127.0.0.1:%d
	default_backend replicas

backend replicas
	balance roundrobin
	option httpchk GET /ready
	http-check expect status 200
	http-request disable-l7-retry unless METH_GET
	default-server inter 100ms fastinter 100ms downinter 100ms fall 1 rise 1
%s
listen stats
	bind 127.0.0.1:%d
	stats enable
	stats uri /stats
`

// startHAProxy writes a configuration for slots into t.TempDir(), starts
// haproxy in the foreground and waits until its frontend and stats answer.
// It is stopped at cleanup.
func startHAProxy(t testing.TB, slots []string) *haproxyProc {
	t.Helper()
	bin := requireHAProxy(t)
	ports := fixedPorts(t, 2)
	var servers strings.Builder
	for i, s := range slots {
		fmt.Fprintf(&servers, "\tserver s%d %s check\n", i, s)
	}
	dir := t.TempDir()
	cfg := filepath.Join(dir, "haproxy.cfg")
	if err := os.WriteFile(cfg, []byte(fmt.Sprintf(haproxyConfig, ports[0], servers.String(), ports[1])), 0o644); err != nil {
		t.Fatalf("write haproxy config: %v", err)
	}
	if out, err := exec.Command(bin, "-c", "-f", cfg).CombinedOutput(); err != nil {
		t.Fatalf("haproxy -c -f %s: %v\n%s", cfg, err, out)
	}
	h := &haproxyProc{
		t:        t,
		URL:      fmt.Sprintf("http://127.0.0.1:%d", ports[0]),
		Slots:    slots,
		statsURL: fmt.Sprintf("http://127.0.0.1:%d/stats;csv", ports[1]),
		out:      newLineLog(500, nil),
		done:     make(chan struct{}),
	}
	h.cmd = exec.Command(bin, "-db", "-f", cfg) // -db: foreground, no daemon
	h.cmd.Stdout, h.cmd.Stderr = h.out, h.out
	h.cmd.WaitDelay = 3 * time.Second
	if err := h.cmd.Start(); err != nil {
		t.Fatalf("start haproxy: %v", err)
	}
	go func() { _ = h.cmd.Wait(); close(h.done) }()
	t.Cleanup(func() {
		_ = h.cmd.Process.Signal(syscall.SIGTERM)
		select {
		case <-h.done:
		case <-time.After(5 * time.Second):
			_ = h.cmd.Process.Kill()
			<-h.done
		}
		if t.Failed() {
			t.Logf("haproxy output (last lines):\n%s", h.out.Tail(20))
		}
	})
	var last error
	if !pollUntil(10*time.Second, 20*time.Millisecond, func() bool {
		select {
		case <-h.done:
			return false
		default:
		}
		_, last = h.States()
		return last == nil
	}) {
		t.Fatalf("haproxy stats at %s did not answer within 10s (last: %v)\n%s", h.statsURL, last, h.out.Tail(20))
	}
	return h
}

// haproxyServer is one server row of HAProxy's CSV statistics.
type haproxyServer struct {
	Status       string // UP, DOWN, MAINT, ...
	Retries      int64  // wretr: requests retried on a connection or empty response
	Redispatches int64  // wredis: retries sent to another server
}

// States returns HAProxy's view of each slot ("s0", "s1", ...).
func (h *haproxyProc) States() (map[string]haproxyServer, error) {
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Second)
	defer cancel()
	req, _ := http.NewRequestWithContext(ctx, http.MethodGet, h.statsURL, nil)
	res, err := http.DefaultClient.Do(req)
	if err != nil {
		return nil, err
	}
	defer res.Body.Close()
	if res.StatusCode != http.StatusOK {
		return nil, fmt.Errorf("GET %s: %s", h.statsURL, res.Status)
	}
	rd := csv.NewReader(res.Body)
	rd.FieldsPerRecord = -1
	rows, err := rd.ReadAll()
	if err != nil {
		return nil, fmt.Errorf("parse %s: %w", h.statsURL, err)
	}
	if len(rows) == 0 {
		return nil, fmt.Errorf("GET %s: empty", h.statsURL)
	}
	col := map[string]int{}
	for i, name := range rows[0] {
		col[strings.TrimPrefix(strings.TrimSpace(name), "# ")] = i
	}
	for _, name := range []string{"pxname", "svname", "status", "wretr", "wredis"} {
		if _, ok := col[name]; !ok {
			return nil, fmt.Errorf("GET %s: no %q column in %q", h.statsURL, name, rows[0])
		}
	}
	out := map[string]haproxyServer{}
	for _, r := range rows[1:] {
		if len(r) <= col["wredis"] || r[col["pxname"]] != "replicas" || !strings.HasPrefix(r[col["svname"]], "s") {
			continue
		}
		retr, _ := strconv.ParseInt(r[col["wretr"]], 10, 64)
		redis, _ := strconv.ParseInt(r[col["wredis"]], 10, 64)
		out[r[col["svname"]]] = haproxyServer{Status: r[col["status"]], Retries: retr, Redispatches: redis}
	}
	return out, nil
}

// WaitStatus polls the statistics until slot's server has status want
// ("UP", "DOWN") and returns how long that took; it fails the test after
// timeout.
func (h *haproxyProc) WaitStatus(slot int, want string, timeout time.Duration) time.Duration {
	h.t.Helper()
	start := time.Now()
	name := "s" + strconv.Itoa(slot)
	var got string
	if !pollUntil(timeout, 20*time.Millisecond, func() bool {
		st, err := h.States()
		if err != nil {
			got = err.Error()
			return false
		}
		got = st[name].Status
		return got == want
	}) {
		h.t.Fatalf("haproxy: server %s (%s) not %s within %v; last status %q", name, h.Slots[slot], want, timeout, got)
	}
	return time.Since(start)
}

// Totals adds up the retries and redispatches of every server.
func (h *haproxyProc) Totals() (retries, redispatches int64) {
	h.t.Helper()
	st, err := h.States()
	if err != nil {
		h.t.Errorf("haproxy stats: %v", err)
		return 0, 0
	}
	for _, s := range st {
		retries += s.Retries
		redispatches += s.Redispatches
	}
	return retries, redispatches
}
