package main

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"slices"
	"strings"
	"syscall"
	"testing"
	"time"
)

// envFunc returns a getenv that reads env.
func envFunc(env map[string]string) func(string) string {
	return func(k string) string { return env[k] }
}

// runningService is run running in a goroutine.
type runningService struct {
	stdout, stderr *syncBuffer // JSON log lines; usage and errors
	cancel         context.CancelFunc
	done           chan struct{} // closed when run has returned
	err            error         // run's result, once done is closed
}

// runService starts run in a goroutine with env and args. Cancelling its
// context (stop) is the shutdown signal. The test's cleanup stops it.
func runService(tb testing.TB, env map[string]string, args ...string) *runningService {
	tb.Helper()
	ctx, cancel := context.WithCancel(context.Background())
	s := &runningService{stdout: &syncBuffer{}, stderr: &syncBuffer{}, cancel: cancel, done: make(chan struct{})}
	go func() {
		defer close(s.done)
		s.err = run(ctx, append([]string{"productsvc"}, args...), envFunc(env), s.stdout, s.stderr)
	}()
	tb.Cleanup(func() {
		cancel()
		select {
		case <-s.done:
		case <-time.After(30 * time.Second):
			tb.Errorf("run did not return within 30s of cancel")
		}
		if tb.Failed() {
			tb.Logf("stdout:\n%s\nstderr:\n%s", s.stdout, s.stderr)
		}
	})
	return s
}

// stop sends the shutdown signal and returns run's result. The bound only
// proves that shutdown does not hang.
func (s *runningService) stop(tb testing.TB) error {
	tb.Helper()
	s.cancel()
	select {
	case <-s.done:
		return s.err
	case <-time.After(30 * time.Second):
		tb.Fatal("run did not return within 30s of the shutdown signal")
		return nil
	}
}

// listeningAddr waits for run's {"msg":"listening"} log line and returns its
// address.
func (s *runningService) listeningAddr(tb testing.TB) string {
	tb.Helper()
	var addr string
	waitFor(tb, 30*time.Second, `the "listening" log line`, func() bool {
		select {
		case <-s.done:
			tb.Fatalf("run returned before listening: %v", s.err)
		default:
		}
		for _, l := range s.stdout.logLines() {
			if l["msg"] == "listening" {
				addr, _ = l["addr"].(string)
				return true
			}
		}
		return false
	})
	if addr == "" {
		tb.Fatalf("listening line without an addr in:\n%s", s.stdout)
	}
	return addr
}

func TestRun(t *testing.T) {
	dbPath := filepath.Join(t.TempDir(), "products.db")
	svc := runService(t, map[string]string{
		"ADDR":          "127.0.0.1:0",
		"DB_PATH":       dbPath,
		"API_TOKEN":     "run-token",
		"LOG_LEVEL":     "info",
		"DB_SYNC":       "normal",
		"MAX_IN_FLIGHT": "0",
	})
	addr := svc.listeningAddr(t)
	if !strings.HasPrefix(addr, "127.0.0.1:") || strings.HasSuffix(addr, ":0") {
		t.Fatalf("listening addr = %q, want the bound 127.0.0.1 port", addr)
	}
	base := "http://" + addr
	client := &http.Client{Timeout: 10 * time.Second}
	defer client.CloseIdleConnections()
	send := func(method, path, body string, hdr ...string) response {
		t.Helper()
		var rd io.Reader
		if body != "" {
			rd = strings.NewReader(body)
		}
		req, err := http.NewRequest(method, base+path, rd)
		if err != nil {
			t.Fatal(err)
		}
		for i := 0; i+1 < len(hdr); i += 2 {
			req.Header.Set(hdr[i], hdr[i+1])
		}
		resp, err := client.Do(req)
		if err != nil {
			t.Fatalf("%s %s: %v", method, path, err)
		}
		defer resp.Body.Close()
		b, _ := io.ReadAll(resp.Body)
		return response{status: resp.StatusCode, header: resp.Header, body: b}
	}

	waitFor(t, 30*time.Second, "GET /ready to answer 200", func() bool {
		return send("GET", "/ready", "").status == http.StatusOK
	})
	r := send("POST", "/products", `{"sku":"RUN-1","name":"pen","price_cents":150}`,
		"Authorization", "Bearer run-token", "Content-Type", "application/json")
	if r.status != http.StatusCreated {
		t.Fatalf("POST /products = %v, want 201", r)
	}
	created := decodeProduct(t, r.body)
	r = send("GET", r.header.Get("Location"), "")
	if r.status != http.StatusOK {
		t.Fatalf("GET %s = %v, want 200", r.header.Get("Location"), r)
	}
	if got := decodeProduct(t, r.body); got != created {
		t.Errorf("GET after POST = %+v, want %+v", got, created)
	}
	if r := send("POST", "/products", `{"sku":"RUN-2","name":"pen","price_cents":150}`,
		"Authorization", "Bearer wrong", "Content-Type", "application/json"); r.status != http.StatusUnauthorized {
		t.Errorf("POST with a wrong token = %v, want 401", r)
	}
	if r := send("GET", "/metrics", ""); r.status != http.StatusOK || !strings.Contains(string(r.body), "http_requests_total") {
		t.Errorf("GET /metrics = %d, want 200 with http_requests_total", r.status)
	}

	// Cancelling ctx is the shutdown signal.
	client.CloseIdleConnections()
	if err := svc.stop(t); err != nil {
		t.Errorf("run() = %v after shutdown, want nil", err)
	}
	var msgs []string
	for _, l := range svc.stdout.logLines() {
		if m, ok := l["msg"].(string); ok {
			msgs = append(msgs, m)
		}
	}
	for _, want := range []string{"starting", "listening", "request", "shutting down", "drained"} {
		if !slices.Contains(msgs, want) {
			t.Errorf("log has no %q line; messages: %q", want, msgs)
		}
	}
	// The store was closed with its WAL checkpointed.
	if fi, err := os.Stat(dbPath + "-wal"); err == nil && fi.Size() != 0 {
		t.Errorf("after run returned the -wal file has %d bytes, want it gone or empty", fi.Size())
	}
	// The product is durable: a new run sees it.
	svc2 := runService(t, map[string]string{"ADDR": "127.0.0.1:0", "DB_PATH": dbPath, "API_TOKEN": "run-token"})
	base = "http://" + svc2.listeningAddr(t)
	r = send("GET", fmt.Sprintf("/products/%d", created.ID), "")
	if r.status != http.StatusOK {
		t.Fatalf("GET after restart = %v, want 200", r)
	}
	if got := decodeProduct(t, r.body); got != created {
		t.Errorf("GET after restart = %+v, want %+v", got, created)
	}
}

// TestRun_invalidConfig checks that every setting fails alike: a
// *configError (exit status 2), one line naming the setting, and nothing
// opened or created.
func TestRun_invalidConfig(t *testing.T) {
	tests := []struct {
		name     string
		env      map[string]string
		args     []string
		wantName string // what the error must name
		wantText string // and, when set, what else it must say
	}{
		{name: "ADDR not host:port", env: map[string]string{"ADDR": "nonsense"}, wantName: "ADDR"},
		{name: "ADDR port out of range", env: map[string]string{"ADDR": "127.0.0.1:70000"}, wantName: "ADDR"},
		{name: "ADDR port not a number", env: map[string]string{"ADDR": "localhost:http"}, wantName: "ADDR"},
		{name: "DB_PATH empty flag", args: []string{"-db="}, wantName: "-db"},
		{name: "DB_TIMEOUT not a duration", env: map[string]string{"DB_TIMEOUT": "abc"}, wantName: "DB_TIMEOUT"},
		{name: "DB_TIMEOUT too small", env: map[string]string{"DB_TIMEOUT": "0s"}, wantName: "DB_TIMEOUT"},
		{name: "DB_SYNC", env: map[string]string{"DB_SYNC": "off"}, wantName: "DB_SYNC", wantText: "full, normal"},
		{name: "LOG_LEVEL", env: map[string]string{"LOG_LEVEL": "verbose"}, wantName: "LOG_LEVEL", wantText: "debug, info, warn, error"},
		{name: "LOG_LEVEL offset", env: map[string]string{"LOG_LEVEL": "INFO+2"}, wantName: "LOG_LEVEL"},
		{name: "LOCAL_CACHE_SIZE", env: map[string]string{"LOCAL_CACHE_SIZE": "-1"}, wantName: "LOCAL_CACHE_SIZE"},
		{name: "CACHE_MEMORY", env: map[string]string{"CACHE_MEMORY": "lots"}, wantName: "CACHE_MEMORY"},
		{name: "CACHE_MEMORY negative", env: map[string]string{"CACHE_MEMORY": "-1MiB"}, wantName: "CACHE_MEMORY"},
		{name: "REDIS_URL scheme", env: map[string]string{"REDIS_URL": "http://localhost:6379"}, wantName: "REDIS_URL"},
		{name: "REDIS_URL database", env: map[string]string{"REDIS_URL": "redis://:secret@localhost:6379/x"}, wantName: "REDIS_URL", wantText: "xxxxx"},
		{name: "REDIS_TIMEOUT", env: map[string]string{"REDIS_TIMEOUT": "fast"}, wantName: "REDIS_TIMEOUT"},
		{name: "CACHE_TTL", env: map[string]string{"CACHE_TTL": "1ms"}, wantName: "CACHE_TTL"},
		{name: "API_TOKEN only commas", env: map[string]string{"API_TOKEN": " , ,"}, wantName: "API_TOKEN"},
		{name: "TRUSTED_PROXIES", env: map[string]string{"TRUSTED_PROXIES": "10.0.0.0/8, proxy.internal"}, wantName: "TRUSTED_PROXIES", wantText: "proxy.internal"},
		{name: "JWT_ISSUER alone", env: map[string]string{"JWT_ISSUER": "https://idp.example.com/"}, wantName: "JWT_ISSUER"},
		{name: "JWT_AUDIENCE alone", env: map[string]string{"JWT_AUDIENCE": "productsvc"}, wantName: "JWT_AUDIENCE"},
		{name: "JWT_JWKS_URL plain http", env: map[string]string{"JWT_JWKS_URL": "http://idp.example.com/jwks"}, wantName: "JWT_JWKS_URL"},
		{name: "JWT_MAX_HELD", env: map[string]string{"JWT_MAX_HELD": "-1"}, wantName: "JWT_MAX_HELD"},
		{name: "API_TOKENS_FILE missing", env: map[string]string{"API_TOKENS_FILE": "/nonexistent/tokens"}, wantName: "API_TOKENS_FILE"},
		{name: "SHUTDOWN_DELAY", env: map[string]string{"SHUTDOWN_DELAY": "-1s"}, wantName: "SHUTDOWN_DELAY"},
		{name: "SHUTDOWN_TIMEOUT", env: map[string]string{"SHUTDOWN_TIMEOUT": "48h"}, wantName: "SHUTDOWN_TIMEOUT"},
		{name: "METRICS_ADDR", env: map[string]string{"METRICS_ADDR": "nonsense"}, wantName: "METRICS_ADDR"},
		{name: "ADMIN_ADDR not loopback", env: map[string]string{"ADMIN_ADDR": "0.0.0.0:6060"}, wantName: "ADMIN_ADDR"},
		{name: "ADMIN_ADDR not host:port", env: map[string]string{"ADMIN_ADDR": "6060"}, wantName: "ADMIN_ADDR"},
		{name: "RATE_LIMIT_RPS", env: map[string]string{"RATE_LIMIT_RPS": "-1"}, wantName: "RATE_LIMIT_RPS"},
		{name: "RATE_LIMIT_BURST", env: map[string]string{"RATE_LIMIT_BURST": "lots"}, wantName: "RATE_LIMIT_BURST"},
		{name: "MAX_IN_FLIGHT", env: map[string]string{"MAX_IN_FLIGHT": "many"}, wantName: "MAX_IN_FLIGHT"},
		{name: "EVENTS_RETENTION", env: map[string]string{"EVENTS_RETENTION": "forever"}, wantName: "EVENTS_RETENTION"},
		{name: "FEED_MAX_STREAMS", env: map[string]string{"FEED_MAX_STREAMS": "0"}, wantName: "FEED_MAX_STREAMS"},
		{name: "MAX_CONNS", env: map[string]string{"MAX_CONNS": "-1"}, wantName: "MAX_CONNS", wantText: "from 0 to"},
		{name: "MAX_CONNS_PER_IP", env: map[string]string{"MAX_CONNS_PER_IP": "lots"}, wantName: "MAX_CONNS_PER_IP"},
		{name: "AMQP_URL scheme", env: map[string]string{"AMQP_URL": "http://relay:s3cret@localhost:5672/"}, wantName: "AMQP_URL", wantText: "xxxxx"},
		{name: "AMQP_URL without host", env: map[string]string{"AMQP_URL": "amqp://"}, wantName: "AMQP_URL"},
		{name: "AMQP_EXCHANGE empty flag", args: []string{"-amqp-exchange="}, wantName: "-amqp-exchange"},
		{name: "AMQP_SOURCE empty flag", args: []string{"-amqp-source="}, wantName: "-amqp-source"},
		{name: "RELAY_WARN_AGE", env: map[string]string{"RELAY_WARN_AGE": "soon"}, wantName: "RELAY_WARN_AGE"},
		{name: "flag wins and is named", env: map[string]string{"DB_TIMEOUT": "1s"}, args: []string{"-db-timeout=abc"}, wantName: "-db-timeout"},
		{name: "unknown flag", args: []string{"-no-such-flag"}, wantName: "no-such-flag"},
		{name: "stray argument", args: []string{"serve"}, wantName: "serve"},
		{name: "DATABASE_URL not postgres", env: map[string]string{"DATABASE_URL": "mysql://u:p@localhost/db"}, wantName: "DATABASE_URL"},
		{name: "DATABASE_URL not a URL", env: map[string]string{"DATABASE_URL": "host=localhost dbname=x"}, wantName: "DATABASE_URL"},
		{name: "-copy-to not postgres", args: []string{"-copy-to", "sqlite:///x.db"}, wantName: "-copy-to"},
		{name: "BACKUP_DIR a file", env: map[string]string{"BACKUP_DIR": "/dev/null"}, wantName: "BACKUP_DIR"},
		{name: "BACKUP_INTERVAL too short", env: map[string]string{"BACKUP_INTERVAL": "30s"}, wantName: "BACKUP_INTERVAL"},
		{name: "BACKUP_KEEP", env: map[string]string{"BACKUP_KEEP": "-1"}, wantName: "BACKUP_KEEP"},
		{name: "-restore on PostgreSQL", env: map[string]string{"DATABASE_URL": "postgres://u@localhost/db"}, args: []string{"-restore", "x.db"}, wantName: "-restore"},
		{name: "-restore twice", args: []string{"-restore", "x.db", "-restore-if-missing", "y.db"}, wantName: "-restore-if-missing"},
		{name: "-restore and -renew-log-id", args: []string{"-restore", "x.db", "-renew-log-id"}, wantName: "-renew-log-id"},
	}

	// Every setting has a case: a new one cannot be added without its test.
	covered := make(map[string]bool)
	for _, tt := range tests {
		covered[strings.TrimPrefix(tt.wantName, "-")] = true
	}
	for _, s := range (&config{}).settings() {
		if !covered[s.env] && !covered[s.flag] {
			t.Errorf("setting %s has no invalid-value case", s.env)
		}
	}

	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			dir := t.TempDir()
			dbPath := filepath.Join(dir, "products.db")
			env := map[string]string{"ADDR": "127.0.0.1:0", "DB_PATH": dbPath}
			for k, v := range tt.env {
				env[k] = v
			}
			var stdout, stderr syncBuffer
			errc := make(chan error, 1)
			go func() {
				errc <- run(t.Context(), append([]string{"productsvc"}, tt.args...), envFunc(env), &stdout, &stderr)
			}()
			var err error
			select {
			case err = <-errc:
			case <-time.After(30 * time.Second):
				t.Fatal("run with an invalid setting did not return within 30s")
			}
			var cerr *configError
			if !errors.As(err, &cerr) {
				t.Fatalf("run() error = %v (%T), want a *configError", err, err)
			}
			msg := err.Error()
			if !strings.Contains(msg, tt.wantName) || !strings.Contains(msg, tt.wantText) {
				t.Errorf("run() error = %q, want it to name %s and say %q", msg, tt.wantName, tt.wantText)
			}
			if strings.Contains(msg, "\n") {
				t.Errorf("run() error = %q, want one line", msg)
			}
			if strings.Contains(msg, "secret") {
				t.Errorf("run() error = %q shows a password", msg)
			}
			if strings.Contains(stdout.String(), `"listening"`) {
				t.Errorf("run listened despite invalid config; stdout:\n%s", stdout.String())
			}
			if entries, err := os.ReadDir(dir); err != nil || len(entries) > 0 {
				t.Errorf("after an invalid setting the directory holds %v (error %v), want nothing created", entries, err)
			}
		})
	}
}

func TestRun_version(t *testing.T) {
	var stdout, stderr syncBuffer
	dbPath := filepath.Join(t.TempDir(), "products.db")
	err := run(t.Context(), []string{"productsvc", "-version"}, envFunc(map[string]string{"ADDR": "127.0.0.1:0", "DB_PATH": dbPath}), &stdout, &stderr)
	if err != nil {
		t.Fatalf("run(-version) = %v, want nil", err)
	}
	out := strings.TrimSpace(stdout.String())
	name, ver, ok := strings.Cut(out, " ")
	if !ok || name != "productsvc" || ver == "" || strings.Contains(out, "\n") {
		t.Errorf("run(-version) printed %q, want one line \"productsvc <version>\"", out)
	}
	if _, err := os.Stat(dbPath); !errors.Is(err, os.ErrNotExist) {
		t.Errorf("run(-version) created the database (stat error %v)", err)
	}
}

// TestRun_help: -h is asked for, so its usage goes to stdout and run
// returns nil (exit status 0); each flag shows what its value is.
func TestRun_help(t *testing.T) {
	for _, arg := range []string{"-h", "-help", "--help"} {
		t.Run(arg, func(t *testing.T) {
			var stdout, stderr syncBuffer
			dir := t.TempDir()
			err := run(t.Context(), []string{"productsvc", arg}, envFunc(map[string]string{"DB_PATH": filepath.Join(dir, "products.db")}), &stdout, &stderr)
			if err != nil {
				t.Fatalf("run(%s) = %v, want nil", arg, err)
			}
			if stderr.String() != "" {
				t.Errorf("run(%s) wrote to stderr: %q", arg, stderr.String())
			}
			usage := stdout.String()
			if !strings.HasPrefix(usage, "Usage: productsvc [flags]") {
				t.Errorf("run(%s) usage starts %q, want \"Usage: productsvc [flags]\"", arg, usage[:min(len(usage), 40)])
			}
			for _, s := range (&config{}).settings() {
				if !strings.Contains(usage, "(env "+s.env+")") {
					t.Errorf("run(%s) usage does not name %s", arg, s.env)
				}
			}
			for line := range strings.Lines(usage) {
				if f := strings.Fields(line); len(f) == 2 && strings.HasPrefix(f[0], "-") && (f[1] == "string" || f[1] == "value") {
					t.Errorf("run(%s) usage line %q: want a placeholder that says what the value is", arg, strings.TrimSpace(line))
				}
			}
			if entries, _ := os.ReadDir(dir); len(entries) > 0 {
				t.Errorf("run(%s) created %v", arg, entries)
			}
		})
	}
}

// TestSettings_examplesAccepted: an error that suggests values ("such as
// 5s or 10m") suggests values the setting accepts.
func TestSettings_examplesAccepted(t *testing.T) {
	for _, s := range (&config{}).settings() {
		err := s.set("\x00not valid")
		if err == nil {
			continue // accepts anything (API_TOKEN)
		}
		_, examples, ok := strings.Cut(err.Error(), "such as ")
		if !ok {
			continue
		}
		examples, _, _ = strings.Cut(examples, ", ")
		examples, _, _ = strings.Cut(examples, ": ")
		for ex := range strings.SplitSeq(examples, " or ") {
			if err := s.set(ex); err != nil {
				t.Errorf("%s suggests %q, which it refuses: %v", s.env, ex, err)
			}
		}
	}
}

// TestRun_portInUse: a listen address another process holds stops the
// start before the store is opened, so no database file or lock is left
// behind, and the error names the setting.
func TestRun_portInUse(t *testing.T) {
	busy, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer busy.Close()
	for _, setting := range []string{"ADDR", "METRICS_ADDR", "ADMIN_ADDR"} {
		t.Run(setting, func(t *testing.T) {
			dir := t.TempDir()
			env := map[string]string{"ADDR": "127.0.0.1:0", "DB_PATH": filepath.Join(dir, "products.db"), "API_TOKEN": "t"}
			env[setting] = busy.Addr().String()
			var stdout, stderr syncBuffer
			err := run(t.Context(), []string{"productsvc"}, envFunc(env), &stdout, &stderr)
			if err == nil || !strings.Contains(err.Error(), setting+" "+busy.Addr().String()) || !errors.Is(err, syscall.EADDRINUSE) {
				t.Fatalf("run() with %s busy = %v, want an error naming %s %s, address in use", setting, err, setting, busy.Addr())
			}
			if entries, err := os.ReadDir(dir); err != nil || len(entries) > 0 {
				t.Errorf("after a busy %s the directory holds %v (error %v), want nothing created", setting, entries, err)
			}
		})
	}
}

// TestRun_redisUnreachable: a REDIS_URL nothing answers at is logged at
// WARN at start, without its password, and the service starts anyway.
func TestRun_redisUnreachable(t *testing.T) {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	closed := ln.Addr().String()
	ln.Close() // a port nothing listens on: connection refused
	svc := runService(t, map[string]string{
		"ADDR": "127.0.0.1:0", "DB_PATH": filepath.Join(t.TempDir(), "products.db"), "API_TOKEN": "t",
		"REDIS_URL": "redis://:hunter2@" + closed + "/0", "REDIS_TIMEOUT": "50ms",
	})
	addr := svc.listeningAddr(t)
	var warned bool
	for _, l := range svc.stdout.logLines() {
		if l["level"] == "WARN" && strings.Contains(fmt.Sprint(l["msg"]), "Redis") {
			warned = true
			if got := fmt.Sprint(l["redis_url"]); got != "redis://:xxxxx@"+closed+"/0" {
				t.Errorf("redis_url = %q, want the URL with its password redacted", got)
			}
			if got := fmt.Sprint(l["err"]); !strings.Contains(got, "refused") {
				t.Errorf("err = %q, want the cause (connection refused)", got)
			}
		}
	}
	if !warned {
		t.Errorf("no WARN line about Redis before listening; log:\n%s", svc.stdout)
	}
	if strings.Contains(svc.stdout.String()+svc.stderr.String(), "hunter2") {
		t.Errorf("the log shows the Redis password:\n%s", svc.stdout)
	}
	resp, err := http.Get("http://" + addr + "/health")
	if err != nil {
		t.Fatalf("GET /health: %v", err)
	}
	resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		t.Errorf("GET /health = %d, want 200: Redis is optional", resp.StatusCode)
	}
}

// TestRun_databaseInUse starts a second run on the database file of a
// running one: it must refuse to start, naming DB_PATH and the holder, and
// the first must keep serving. Once the first has stopped, the file is free.
func TestRun_databaseInUse(t *testing.T) {
	dbPath := filepath.Join(t.TempDir(), "products.db")
	env := map[string]string{"ADDR": "127.0.0.1:0", "DB_PATH": dbPath, "API_TOKEN": "t"}
	first := runService(t, env)
	addr := first.listeningAddr(t)

	var stdout, stderr syncBuffer
	err := run(t.Context(), []string{"productsvc"}, envFunc(env), &stdout, &stderr)
	var cerr *configError
	if !errors.As(err, &cerr) {
		t.Fatalf("second run() = %v, want a *configError (exit status 2)", err)
	}
	if msg := err.Error(); !strings.Contains(msg, "DB_PATH "+dbPath) || !strings.Contains(msg, fmt.Sprintf("pid %d", os.Getpid())) || strings.Contains(msg, "\n") {
		t.Errorf("second run() error = %q, want one line naming DB_PATH %s and pid %d", msg, dbPath, os.Getpid())
	}
	for _, l := range stdout.logLines() {
		if l["msg"] == "listening" {
			t.Errorf("second run logged %v", l)
		}
	}
	resp, err := http.Get("http://" + addr + "/health")
	if err != nil || resp.StatusCode != http.StatusOK {
		t.Fatalf("first instance after the refused start: GET /health = %v, %v", resp, err)
	}
	resp.Body.Close()

	if err := first.stop(t); err != nil {
		t.Fatalf("first run() = %v", err)
	}
	again := runService(t, env)
	again.listeningAddr(t) // the lock was released with the first process's store
}

// TestRun_backgroundJoined stops run and then looks for its background
// goroutines (expiries, trim, breaker probe, sweep): run must have joined
// them before it closed the store and returned.
func TestRun_backgroundJoined(t *testing.T) {
	svc := runService(t, map[string]string{"ADDR": "127.0.0.1:0", "DB_PATH": filepath.Join(t.TempDir(), "b.db"), "API_TOKEN": "t"})
	svc.listeningAddr(t)
	if err := svc.stop(t); err != nil {
		t.Fatal(err)
	}
	buf := make([]byte, 1<<20)
	stacks := string(buf[:runtime.Stack(buf, true)])
	for _, fn := range []string{"main.expireIdempotencyKeys", "main.trimChangeFeed", "(*ProductService).Probe", "(*ProductService).SweepReservations"} {
		if strings.Contains(stacks, fn) {
			t.Errorf("after run returned, a goroutine is still in %s:\n%s", fn, stacks)
		}
	}
}

// TestTracing_closeHasDeadline closes a tracer whose exporter never
// finishes flushing: close gives up with the deadline instead of hanging.
func TestTracing_closeHasDeadline(t *testing.T) {
	tr := noTracing()
	tr.shutdown = func(ctx context.Context) error { <-ctx.Done(); return ctx.Err() }
	if err := tr.close(10 * time.Millisecond); !errors.Is(err, context.DeadlineExceeded) {
		t.Errorf("close() = %v, want context.DeadlineExceeded", err)
	}
}

// TestMain_redisDownLogsOnlyJSON runs the service as a process against a
// real Redis, kills Redis and brings it back, and checks that everything
// the process wrote to stdout and stderr is JSON (go-redis's own lines
// included), and that Redis failing and recovering is logged once each.
func TestMain_redisDownLogsOnlyJSON(t *testing.T) {
	r := startRedis(t)
	var stdout, stderr syncBuffer
	cmd := exec.Command(os.Args[0])
	cmd.Env = append(os.Environ(), "PRODUCTSVC_AS_MAIN=1",
		"ADDR=127.0.0.1:0", "DB_PATH="+filepath.Join(t.TempDir(), "products.db"),
		"REDIS_URL="+r.URL, "REDIS_TIMEOUT=50ms", "LOCAL_CACHE_SIZE=0", "API_TOKEN=json-token", "LOG_LEVEL=info")
	cmd.Stdout, cmd.Stderr = &stdout, &stderr
	if err := cmd.Start(); err != nil {
		t.Fatalf("start the service: %v", err)
	}
	exited := make(chan struct{})
	var waitErr error
	go func() { waitErr = cmd.Wait(); close(exited) }()
	t.Cleanup(func() {
		cmd.Process.Kill()
		<-exited
		if t.Failed() {
			t.Logf("stdout:\n%s\nstderr:\n%s", &stdout, &stderr)
		}
	})

	var addr string
	waitFor(t, 30*time.Second, `the "listening" log line`, func() bool {
		for _, l := range stdout.logLines() {
			if l["msg"] == "listening" {
				addr, _ = l["addr"].(string)
			}
		}
		return addr != ""
	})
	base := "http://" + addr
	req, _ := http.NewRequest(http.MethodPost, base+"/products", strings.NewReader(`{"sku":"J-1","name":"pen","price_cents":1}`))
	req.Header.Set("Content-Type", "application/json")
	req.Header.Set("Authorization", "Bearer json-token")
	resp, err := http.DefaultClient.Do(req)
	if err != nil || resp.StatusCode != http.StatusCreated {
		t.Fatalf("POST /products: %v %v", resp, err)
	}
	resp.Body.Close()
	get := func() {
		resp, err := http.Get(base + "/products/1")
		if err != nil {
			t.Fatalf("GET /products/1: %v", err)
		}
		io.Copy(io.Discard, resp.Body)
		resp.Body.Close()
		if resp.StatusCode != http.StatusOK {
			t.Fatalf("GET /products/1 status = %d, want 200 (Redis is optional)", resp.StatusCode)
		}
	}
	countMsg := func(prefix string) int {
		n := 0
		for _, l := range stdout.logLines() {
			if msg, _ := l["msg"].(string); strings.HasPrefix(msg, prefix) && l["breaker"] == "redis" {
				n++
			}
		}
		return n
	}

	r.Kill()
	waitFor(t, 30*time.Second, "the redis breaker opening", func() bool {
		get()
		return countMsg("circuit breaker opened") > 0
	})
	for range 20 {
		get() // more failures while down: no more WARN lines about it
	}
	r.Restart()
	waitFor(t, 30*time.Second, "the redis breaker closing", func() bool {
		get()
		return countMsg("circuit breaker closed") > 0
	})

	if err := cmd.Process.Signal(syscall.SIGTERM); err != nil {
		t.Fatalf("SIGTERM: %v", err)
	}
	select {
	case <-exited:
		if waitErr != nil {
			t.Errorf("service exited with %v, want status 0", waitErr)
		}
	case <-time.After(30 * time.Second):
		t.Fatal("service did not exit within 30s of SIGTERM")
	}

	for name, out := range map[string]string{"stdout": stdout.String(), "stderr": stderr.String()} {
		for line := range strings.Lines(out) {
			var m map[string]any
			if err := json.Unmarshal([]byte(line), &m); err != nil {
				t.Errorf("%s line is not JSON: %q", name, line)
			}
		}
	}
	var levels []string
	for _, l := range stdout.logLines() {
		if l["breaker"] == "redis" {
			levels = append(levels, fmt.Sprint(l["level"], " ", l["msg"]))
		}
	}
	want := []string{"WARN circuit breaker opened: Redis is failing", "INFO circuit breaker closed: Redis is back"}
	if !slices.Equal(levels, want) {
		t.Errorf("redis breaker log lines at INFO and above = %q, want %q", levels, want)
	}
	routed := false
	for _, l := range stdout.logLines() {
		routed = routed || l["msg"] == "redis client"
	}
	if !routed {
		t.Logf("go-redis logged nothing while Redis was down (fine: nothing reached stderr either)")
	}
}
