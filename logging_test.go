package main

import (
	"fmt"
	"log/slog"
	"testing"
	"time"

	"github.com/google/go-cmp/cmp"
)

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
