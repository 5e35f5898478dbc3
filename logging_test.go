package main

import (
	"fmt"
	"log/slog"
	"strings"
	"testing"
	"time"

	"github.com/google/go-cmp/cmp"
)

// TestFlushHandler_byLevel: INFO lines wait in the buffer; a WARN line is
// written out at once, with what was buffered before it.
func TestFlushHandler_byLevel(t *testing.T) {
	out := &syncBuffer{}
	lw := newLogWriter(out, time.Hour) // no tick during the test
	defer lw.Close()
	log := slog.New(flushHandler{slog.NewJSONHandler(lw, nil), lw}).With("k", "v")
	log.Info("request", "msg_level", `"level":"WARN"`) // text that looks like a level changes nothing
	if got := out.String(); got != "" {
		t.Fatalf("after an INFO line the output holds %q, want nothing yet", got)
	}
	log.Warn("unavailable")
	got := out.String()
	if !strings.Contains(got, `"msg":"request"`) || !strings.Contains(got, `"msg":"unavailable"`) {
		t.Errorf("after a WARN line the output holds %q, want both lines", got)
	}
}

func TestLimitedLog_Printf(t *testing.T) {
	var out syncBuffer
	l := newLimitedLog(slog.New(slog.NewJSONHandler(&out, nil)), "redis client")
	now := time.Date(2026, 1, 1, 0, 0, 0, 0, time.UTC)
	l.now = func() time.Time { return now }
	for i := range 5 {
		l.Printf(t.Context(), "failed to dial %d", i)
	}
	now = now.Add(limitedLogEvery)
	l.Printf(t.Context(), "failed to dial %d", 5)

	var got []string
	for _, line := range out.logLines() {
		got = append(got, fmt.Sprintf("%v %v %v suppressed=%v", line["level"], line["msg"], line["detail"], line["suppressed"]))
	}
	want := []string{
		"WARN redis client failed to dial 0 suppressed=0",
		"WARN redis client failed to dial 5 suppressed=4",
	}
	if diff := cmp.Diff(want, got); diff != "" {
		t.Errorf("limitedLog lines (-want +got):\n%s", diff)
	}
}

// TestObserve_probeLevels: a load balancer's checks that pass are logged at
// DEBUG, so they do not bury the access log; a failing check, and every
// other request, at INFO.
func TestObserve_probeLevels(t *testing.T) {
	ts := newTestServer(t, nil)
	for _, path := range []string{"/health", "/health/live", "/livez", "/ready", "/health/ready", "/readyz", "/health/startup", "/metrics", "/products"} {
		ts.do(t, "GET", path, nil)
	}
	ts.do(t, "POST", "/ready", nil) // 405: not a passing probe
	ts.life.shuttingDown.Store(true)
	ts.do(t, "GET", "/ready", nil) // 503
	ts.do(t, "GET", "/health", nil)

	var got []string
	for _, l := range ts.logs.logLines() {
		if l["msg"] == "request" {
			got = append(got, fmt.Sprintf("%v %v %v %v", l["level"], l["method"], l["path"], l["status"]))
		}
	}
	want := []string{
		"DEBUG GET /health 200",
		"DEBUG GET /health/live 200",
		"DEBUG GET /livez 200",
		"DEBUG GET /ready 200",
		"DEBUG GET /health/ready 200",
		"DEBUG GET /readyz 200",
		"DEBUG GET /health/startup 200",
		"DEBUG GET /metrics 200",
		"INFO GET /products 200",
		"INFO POST /ready 405",
		"INFO GET /ready 503",
		"DEBUG GET /health 200",
	}
	if diff := cmp.Diff(want, got); diff != "" {
		t.Errorf("access log lines (-want +got):\n%s", diff)
	}
}
