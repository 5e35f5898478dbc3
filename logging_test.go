package main

import (
	"log/slog"
	"strings"
	"testing"
	"time"
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
