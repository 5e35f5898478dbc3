package main

import (
	"bufio"
	"context"
	"fmt"
	"io"
	"log/slog"
	"sync"
	"time"
)

// logWriter buffers log output and flushes it every interval, so the access
// log costs one write system call per batch of lines rather than per request
// (a fifth of a cached read's cost otherwise). flushHandler flushes it after
// records above INFO; at worst the last interval of INFO lines is lost if the
// process is killed. Close flushes what is left.
type logWriter struct {
	mu   sync.Mutex
	buf  *bufio.Writer
	stop context.CancelFunc
	done chan struct{}
}

func newLogWriter(w io.Writer, interval time.Duration) *logWriter {
	ctx, cancel := context.WithCancel(context.Background())
	lw := &logWriter{buf: bufio.NewWriterSize(w, 64<<10), stop: cancel, done: make(chan struct{})}
	go func() {
		defer close(lw.done)
		t := time.NewTicker(interval)
		defer t.Stop()
		for {
			select {
			case <-ctx.Done():
				return
			case <-t.C:
				lw.Flush()
			}
		}
	}()
	return lw
}

func (lw *logWriter) Write(p []byte) (int, error) {
	lw.mu.Lock()
	defer lw.mu.Unlock()
	return lw.buf.Write(p)
}

// Flush writes out what is buffered.
func (lw *logWriter) Flush() error {
	lw.mu.Lock()
	defer lw.mu.Unlock()
	return lw.buf.Flush()
}

// Close stops the flusher and flushes.
func (lw *logWriter) Close() error {
	lw.stop()
	<-lw.done
	return lw.Flush()
}

// flushHandler writes records through its handler into lw and flushes lw
// after each record above INFO, so warnings and errors are out at once while
// INFO lines wait for the next tick. It decides by the record's level, not
// by reading the bytes written.
type flushHandler struct {
	slog.Handler
	lw *logWriter
}

func (h flushHandler) Handle(ctx context.Context, r slog.Record) error {
	err := h.Handler.Handle(ctx, r)
	if r.Level > slog.LevelInfo {
		if ferr := h.lw.Flush(); err == nil {
			err = ferr
		}
	}
	return err
}

func (h flushHandler) WithAttrs(attrs []slog.Attr) slog.Handler {
	return flushHandler{h.Handler.WithAttrs(attrs), h.lw}
}

func (h flushHandler) WithGroup(name string) slog.Handler {
	return flushHandler{h.Handler.WithGroup(name), h.lw}
}

// limitedLogEvery is how often at most a limitedLog passes a line on.
const limitedLogEvery = time.Minute

// limitedLog passes a library's own log lines (go-redis, OpenTelemetry) on
// to slog, at WARN, so every line the process writes is JSON. A failing
// dependency makes such libraries log on every attempt, so at most one line
// per limitedLogEvery is passed on, with the number suppressed since the
// last one.
type limitedLog struct {
	log   *slog.Logger
	msg   string
	every time.Duration
	now   func() time.Time

	mu         sync.Mutex
	last       time.Time
	suppressed int
}

func newLimitedLog(log *slog.Logger, msg string) *limitedLog {
	return &limitedLog{log: log, msg: msg, every: limitedLogEvery, now: time.Now}
}

// Printf logs one line, unless one was logged less than every ago. It is
// the signature go-redis's logger interface asks for.
func (l *limitedLog) Printf(ctx context.Context, format string, v ...any) {
	l.mu.Lock()
	now := l.now()
	if !l.last.IsZero() && now.Sub(l.last) < l.every {
		l.suppressed++
		l.mu.Unlock()
		return
	}
	suppressed := l.suppressed
	l.last, l.suppressed = now, 0
	l.mu.Unlock()
	l.log.LogAttrs(ctx, slog.LevelWarn, l.msg,
		slog.String("detail", fmt.Sprintf(format, v...)), slog.Int("suppressed", suppressed))
}
